//! 8-bit activations for the fast path's MXFP4 products (and the `dense="q8"` weights' 8-bit
//! format, [`quantize_bf16_weights`]): each block of 32 activations becomes 32
//! int8 codes and one f32 scale (as llama.cpp's Q8_0), so the products run as integer dot products
//! (`vpdpbusd`, 64 multiply-adds an instruction) instead of fp32 FMAs (16). The weights stay
//! exactly the checkpoint's; only the activations are rounded (relative error ≤ 1/254 of each
//! block's largest magnitude).

use super::MXFP4_BLOCK_VALUES as BLOCK;

/// FP4 E2M1 code → twice its value, offset by 12 to be non-negative (`vpdpbusd` multiplies unsigned
/// bytes by signed ones): `2·v + 12` ∈ 0..=24. The offset is undone by [`Q8Span::correction`].
pub const FP4_DOUBLED_PLUS_12: [u8; 16] =
    [12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0];

/// The offset in [`FP4_DOUBLED_PLUS_12`].
pub const FP4_OFFSET: i32 = 12;

/// FP4 E2M1 code → twice its value, as a signed byte.
pub const FP4_DOUBLED: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Activations `[tokens, cols]` quantized per 32-block, in natural order.
pub struct Q8Activations {
    /// `[tokens, cols]` codes in −127..=127.
    pub codes: Vec<i8>,
    /// `[tokens, cols / 32]`: the value of code 1 in each block.
    pub scales: Vec<f32>,
}

/// `x` (|x| ≤ 127) rounded to the nearest integer, ties to even: adding 1.5 · 2^23 leaves no
/// fraction bits, so the FPU rounds (to nearest even), and the integer sits in the low mantissa
/// bits. `f32::round_ties_even` is a libm call on baseline x86-64 (no SSE4.1), which made
/// quantizing a fifth of a prefill product's time, and `as i8` a saturating conversion: neither
/// vectorises.
#[inline(always)]
fn round_to_code(x: f32) -> i8 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    ((x + MAGIC).to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32) as i8
}

/// Quantizes each 32-block of `x` to `round(x / s)` with `s = max|x| / 127`. `x.len()` must be a
/// multiple of 32. Written to vectorise: the SIMD instruction sets compile this same code for
/// their vector width (`quantize_activations`), so every instruction set gives the same codes.
#[inline(always)]
pub fn quantize(x: &[f32]) -> Q8Activations {
    let mut codes = vec![0i8; x.len()];
    let mut scales = vec![0f32; x.len() / BLOCK];
    // A plain loop, not `collect`: its out-of-line helper would run the body at baseline width.
    for ((block, out), scale) in x
        .chunks_exact(BLOCK)
        .zip(codes.chunks_exact_mut(BLOCK))
        .zip(&mut scales)
    {
        *scale = quantize_block(block, out);
    }
    Q8Activations { codes, scales }
}

/// One block into `codes`; returns its scale.
#[inline(always)]
fn quantize_block(block: &[f32], codes: &mut [i8]) -> f32 {
    let max = max_magnitude(block);
    let inverse = if max > 0.0 { 127.0 / max } else { 0.0 };
    for (q, &v) in codes.iter_mut().zip(block) {
        // |v · inverse| ≤ 127 up to rounding; the clamp keeps an overshoot in range.
        *q = round_to_code((v * inverse).clamp(-127.0, 127.0));
    }
    max / 127.0
}

/// The largest |v| of `block`, found as the largest bit pattern, which orders non-negative floats:
/// an integer maximum vectorises where `f32::max` does not. A NaN has the largest pattern of all,
/// so it reaches the scale (and the product) instead of being skipped.
#[inline(always)]
fn max_magnitude(block: &[f32]) -> f32 {
    f32::from_bits(
        block
            .iter()
            .fold(0, |m, v| m.max(v.to_bits() & 0x7FFF_FFFF)),
    )
}

/// 128 quantized activations (4 blocks) in the order the SIMD kernels read them against one 64-byte
/// load of MXFP4 codes, whose byte `j` holds values `2j` and `2j + 1` of block `j / 16` in its low
/// and high nibbles. 32-bit lane `i` of a 512-bit vector (bytes `4i..4i + 4`) lies in block `i / 4`.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct Q8Span {
    /// Byte `j`: the activation the low nibble of code byte `j` multiplies.
    pub even: [i8; 64],
    /// Byte `j`: the activation the high nibble of code byte `j` multiplies.
    pub odd: [i8; 64],
    /// Lane `i`: `−12 · Σ` of the codes lane `i` covers in `even` and `odd`, the starting value of
    /// an integer dot product with offset weights so that it comes out exact.
    pub correction: [i32; 16],
    /// Lane `i`: half the scale of block `i / 4` (the weights are doubled).
    pub half_scale: [f32; 16],
}

const EMPTY_SPAN: Q8Span = Q8Span {
    even: [0; 64],
    odd: [0; 64],
    correction: [0; 16],
    half_scale: [0.0; 16],
};

/// `[tokens, ceil(cols / 128)]` spans; a row's last span is padded with zero activations.
pub fn to_spans(q: &Q8Activations, cols: usize) -> Vec<Q8Span> {
    let blocks_per_row = cols / BLOCK;
    let spans_per_row = blocks_per_row.div_ceil(4);
    let tokens = q.scales.len() / blocks_per_row;
    let mut spans = vec![EMPTY_SPAN; tokens * spans_per_row];
    for t in 0..tokens {
        for b in 0..blocks_per_row {
            let span = &mut spans[t * spans_per_row + b / 4];
            let slot = b % 4;
            let codes = &q.codes[(t * blocks_per_row + b) * BLOCK..][..BLOCK];
            for j in 0..16 {
                span.even[slot * 16 + j] = codes[2 * j];
                span.odd[slot * 16 + j] = codes[2 * j + 1];
            }
            let scale = q.scales[t * blocks_per_row + b];
            for lane in slot * 4..slot * 4 + 4 {
                let covered = span.even[lane * 4..lane * 4 + 4]
                    .iter()
                    .chain(&span.odd[lane * 4..lane * 4 + 4])
                    .map(|&c| c as i32)
                    .sum::<i32>();
                span.correction[lane] = -FP4_OFFSET * covered;
                span.half_scale[lane] = scale * 0.5;
            }
        }
    }
    spans
}

/// Tokens per [`TokenColumns`] group: one 512-bit vector of 32-bit lanes.
pub const GROUP_TOKENS: usize = 16;

/// Quantized activations with the tokens in vector lanes, for the prefill kernel that multiplies
/// each broadcast 4-byte piece of a weight row into 16 tokens at once (`vpdpbusd`'s broadcast
/// operand is signed, so the weights are signed and the activations are stored as unsigned
/// `code + 128`; the kernel subtracts `128 · Σ w` per block).
///
/// Within a block, piece `k` (4 values) is values `8k, 8k+2, 8k+4, 8k+6` for `k < 4` and
/// `8(k−4) + 1, +3, +5, +7` after: the low nibbles of code bytes `4k..4k+4`, then the high.
pub struct TokenColumns {
    pub tokens: usize,
    /// Blocks of 32 values per token.
    pub blocks: usize,
    /// `[group, block, piece, token in group]` 4-byte pieces (`code + 128`, so 128 is zero).
    pub pieces: Vec<[u8; 4]>,
    /// `[group, block, token in group]`: half the activation scale (the weights are doubled).
    pub half_scales: Vec<f32>,
}

/// The 4 values of a block that piece `k` of [`TokenColumns`] holds.
const fn piece_values(k: usize) -> [usize; 4] {
    let first = if k < 4 { 8 * k } else { 8 * (k - 4) + 1 };
    [first, first + 2, first + 4, first + 6]
}

pub fn to_token_columns(q: &Q8Activations, cols: usize) -> TokenColumns {
    let blocks = cols / BLOCK;
    let tokens = q.scales.len() / blocks;
    let groups = tokens.div_ceil(GROUP_TOKENS);
    let mut pieces = vec![[128u8; 4]; groups * blocks * 8 * GROUP_TOKENS];
    let mut half_scales = vec![0f32; groups * blocks * GROUP_TOKENS];
    for t in 0..tokens {
        let (g, lane) = (t / GROUP_TOKENS, t % GROUP_TOKENS);
        for b in 0..blocks {
            let codes = &q.codes[(t * blocks + b) * BLOCK..][..BLOCK];
            for k in 0..8 {
                let piece = &mut pieces[((g * blocks + b) * 8 + k) * GROUP_TOKENS + lane];
                for (byte, j) in piece.iter_mut().zip(piece_values(k)) {
                    *byte = (codes[j] as u8) ^ 0x80;
                }
            }
            half_scales[(g * blocks + b) * GROUP_TOKENS + lane] = q.scales[t * blocks + b] * 0.5;
        }
    }
    TokenColumns {
        tokens,
        blocks,
        pieces,
        half_scales,
    }
}

/// Blocks in a full group of an 8-bit weight row (`dense="q8"`): one 32-bit lane of a 512-bit
/// vector per block.
pub const GROUP_BLOCKS: usize = 16;

/// The groups of a row of `blocks` 32-blocks, as `(first block, blocks)`: groups of
/// [`GROUP_BLOCKS`], then the rest as 8, 4, 2 and 1 (those present), so that every load of a
/// group is a whole 64-, 32-, 16-, 8- or 4-byte load.
pub fn weight_groups(blocks: usize) -> impl Iterator<Item = (usize, usize)> {
    let full = blocks / GROUP_BLOCKS * GROUP_BLOCKS;
    let tail = [8, 4, 2, 1]
        .into_iter()
        .filter(move |&g| (blocks - full) & g != 0);
    std::iter::repeat_n(GROUP_BLOCKS, blocks / GROUP_BLOCKS)
        .chain(tail)
        .scan(0, |first, size| {
            let group = (*first, size);
            *first += size;
            Some(group)
        })
}

/// Where value `e` of block `b` of a group of `size` blocks lies within the group's bytes: the
/// group is 8 steps of `4 · size` bytes, and step `k` holds values `4k..4k + 4` of each block in
/// turn. So one load of a step feeds every block of the group into its own 32-bit lane of one
/// `vpdpbusd`, and the block scales are applied once per group instead of once per load.
pub fn grouped_offset(size: usize, b: usize, e: usize) -> usize {
    4 * size * (e / 4) + 4 * b + e % 4
}

/// Reorders one row of codes from natural order (`natural`) into the grouped order of
/// [`weight_groups`] and [`grouped_offset`].
pub fn group_row(natural: &[u8], grouped: &mut [u8]) {
    for (first, size) in weight_groups(natural.len() / BLOCK) {
        let base = first * BLOCK;
        for b in 0..size {
            for e in 0..BLOCK {
                grouped[base + grouped_offset(size, b, e)] = natural[base + b * BLOCK + e];
            }
        }
    }
}

/// One group's quantized activations as the SIMD kernels read them against a group of an 8-bit
/// weight row (codes stored `+ 128` so that `vpdpbusd` multiplies them, unsigned, into these
/// signed codes). 32-bit lane `i` belongs to block `i` of the group; lanes past the group's size
/// are zero.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct Q8Group {
    /// Step `k`, lane `i`: values `4k..4k + 4` of block `i`.
    pub steps: [[i8; 64]; 8],
    /// Lane `i`: `−128 · Σ` of block `i`'s codes, cancelling the weights' `+ 128`.
    pub correction: [i32; 16],
    /// Lane `i`: the scale of block `i`.
    pub scale: [f32; 16],
}

/// `[tokens, groups]` activations, groups as [`weight_groups`] gives for `cols / 32` blocks.
pub fn to_groups(q: &Q8Activations, cols: usize) -> Vec<Q8Group> {
    const EMPTY: Q8Group = Q8Group {
        steps: [[0; 64]; 8],
        correction: [0; 16],
        scale: [0.0; 16],
    };
    let blocks_per_row = cols / BLOCK;
    let groups = weight_groups(blocks_per_row).count();
    let tokens = q.scales.len() / blocks_per_row;
    let mut out = vec![EMPTY; tokens * groups];
    for (t, row) in q.codes.chunks_exact(cols).enumerate() {
        for (g, (first, size)) in weight_groups(blocks_per_row).enumerate() {
            let group = &mut out[t * groups + g];
            for b in 0..size {
                let codes = &row[(first + b) * BLOCK..][..BLOCK];
                for (e, &c) in codes.iter().enumerate() {
                    group.steps[e / 4][4 * b + e % 4] = c;
                }
                group.correction[b] = -128 * codes.iter().map(|&c| c as i32).sum::<i32>();
                group.scale[b] = q.scales[t * blocks_per_row + first + b];
            }
        }
    }
    out
}

/// Requantizes bf16 weights `[rows, cols]` to 8 bits per value, codes stored `+ 128`, with one
/// bf16 scale per 32-block (bit patterns): the block's `max|w| / 127` rounded up to a bf16, so
/// that no code passes 127 and the step grows by less than 2^-7. Half an f32 scale's bytes: 2.9 %
/// of what a decoded token reads with `dense="q8"`. Written to vectorise, as [`quantize`].
#[inline(always)]
pub fn quantize_bf16_weights(bits: &[u16], codes: &mut [u8], scales: &mut [u16]) {
    for ((w, out), scale) in bits
        .chunks_exact(BLOCK)
        .zip(codes.chunks_exact_mut(BLOCK))
        .zip(scales.iter_mut())
    {
        let mut block = [0f32; BLOCK];
        for (v, &b) in block.iter_mut().zip(w) {
            *v = f32::from_bits((b as u32) << 16);
        }
        *scale = bf16_rounded_up(max_magnitude(&block) / 127.0);
        let step = f32::from_bits((*scale as u32) << 16);
        let inverse = if step > 0.0 { 1.0 / step } else { 0.0 };
        for (o, &v) in out.iter_mut().zip(&block) {
            *o = (round_to_code((v * inverse).clamp(-127.0, 127.0)) as u8) ^ 0x80;
        }
    }
}

/// The bit pattern of the smallest bf16 at or above `x` (`x ≥ 0`).
#[inline(always)]
fn bf16_rounded_up(x: f32) -> u16 {
    let bits = x.to_bits();
    ((bits >> 16) + u32::from(bits & 0xFFFF != 0)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::scalar::FP4_VALUES;

    #[test]
    fn offset_table_is_twice_the_fp4_values_plus_12() {
        for (code, &v) in FP4_VALUES.iter().enumerate() {
            assert_eq!(
                FP4_DOUBLED_PLUS_12[code] as f32,
                2.0 * v + FP4_OFFSET as f32
            );
        }
    }

    #[test]
    fn quantize_rounds_to_the_nearest_step_of_the_block_maximum() {
        let mut x = vec![0f32; 64];
        x[0] = -1.27;
        x[1] = 0.5;
        x[2] = 0.013;
        x[3] = -0.026;
        let q = quantize(&x);
        assert!((q.scales[0] - 0.01).abs() < 1e-9);
        assert_eq!(q.scales[1], 0.0);
        assert_eq!(&q.codes[..4], &[-127, 50, 1, -3]);
        for (x, want) in [
            (2.5, 2),
            (3.5, 4),
            (-2.5, -2),
            (-3.5, -4),
            (126.6, 127),
            (-127.0, -127),
            (-0.4, 0),
        ] {
            assert_eq!(round_to_code(x), want, "{x}");
        }
        assert!(q.codes[32..].iter().all(|&c| c == 0));
    }

    #[test]
    fn weights_round_to_the_nearest_step_and_groups_correct_the_offset() {
        let mut w: Vec<f32> = (0..96)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0)
            .collect();
        // Block 1's maximum 1.0: a power of two, where rounding the step up costs the most.
        let max1 = w[32..64].iter().fold(0f32, |m, v| m.max(v.abs()));
        w[32..64].iter_mut().for_each(|v| *v /= max1);
        w[33] = -1.0;
        let bits: Vec<u16> = w
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        let (mut codes, mut scales) = (vec![0u8; 96], vec![0u16; 3]);
        quantize_bf16_weights(&bits, &mut codes, &mut scales);
        for (b, block) in bits.chunks_exact(32).enumerate() {
            let step = f32::from_bits((scales[b] as u32) << 16);
            let max = block
                .iter()
                .map(|&w| f32::from_bits((w as u32 & 0x7FFF) << 16));
            let max = max.fold(0f32, f32::max);
            // The step is max / 127 rounded up to a bf16: less than 2^-7 above it.
            assert!(
                step >= max / 127.0 && step < max / 127.0 * (1.0 + 1.0 / 128.0),
                "{b}"
            );
            for (i, &w) in block.iter().enumerate() {
                let value = f32::from_bits((w as u32) << 16);
                let code = codes[32 * b + i] as i32 - 128;
                assert!((1..=255).contains(&codes[32 * b + i]), "{b} {i}");
                assert!(
                    (value - code as f32 * step).abs() <= step * 0.5 * 1.0001,
                    "{b} {i}"
                );
            }
        }
        assert_eq!(bf16_rounded_up(1.0), 0x3F80);
        assert_eq!(bf16_rounded_up(f32::from_bits(0x3F80_0001)), 0x3F81);
        assert_eq!(bf16_rounded_up(0.0), 0);
        // 3 blocks: a group of 2, then 1.
        assert_eq!(weight_groups(3).collect::<Vec<_>>(), [(0, 2), (2, 1)]);
        let q = quantize(&w);
        let groups = to_groups(&q, 96);
        assert_eq!(groups.len(), 2);
        // Step 1 of the first group: values 4..8 of block 0, then of block 1.
        assert_eq!(groups[0].steps[1][..4], q.codes[4..8]);
        assert_eq!(groups[0].steps[1][4..8], q.codes[36..40]);
        assert!(groups[0].steps[1][8..].iter().all(|&c| c == 0));
        assert_eq!(groups[1].scale[..2], [q.scales[2], 0.0]);
        let block: i32 = q.codes[64..].iter().map(|&c| c as i32).sum();
        assert_eq!(groups[1].correction[..2], [-128 * block, 0]);
        let mut grouped = vec![0u8; 96];
        group_row(&codes, &mut grouped);
        assert_eq!(grouped[grouped_offset(2, 1, 5)], codes[32 + 5]);
        assert_eq!(grouped[64..], codes[64..]);
    }

    #[test]
    fn groups_of_a_row_are_whole_loads_that_cover_it() {
        for blocks in [1, 3, 16, 90, 128, 127] {
            let groups: Vec<_> = weight_groups(blocks).collect();
            assert_eq!(groups.iter().map(|g| g.1).sum::<usize>(), blocks);
            assert!(groups.iter().all(|g| [1, 2, 4, 8, 16].contains(&g.1)));
            assert!(groups.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
        }
        assert_eq!(
            weight_groups(90).map(|g| g.1).collect::<Vec<_>>(),
            [16, 16, 16, 16, 16, 8, 2]
        );
    }

    #[test]
    fn spans_cover_each_block_and_correct_the_offset() {
        let x: Vec<f32> = (0..160).map(|i| (i as f32 - 80.0) / 7.0).collect();
        let q = quantize(&x);
        let spans = to_spans(&q, 160);
        assert_eq!(spans.len(), 2);
        // Block 4 (the fifth) starts the second span; its element 3 is the high nibble of byte 1.
        assert_eq!(spans[1].odd[1], q.codes[4 * 32 + 3]);
        assert_eq!(spans[1].half_scale[0], q.scales[4] * 0.5);
        assert_eq!(spans[1].half_scale[4], 0.0);
        let lane0: i32 = [0, 2, 4, 6, 1, 3, 5, 7]
            .iter()
            .map(|&k| q.codes[128 + k] as i32)
            .sum();
        assert_eq!(spans[1].correction[0], -12 * lane0);
    }
}
