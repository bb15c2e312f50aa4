//! Portable reference kernels: straightforward, and the oracle for every SIMD kernel.

use super::q8::{self, FP4_DOUBLED_PLUS_12, FP4_OFFSET};

/// FP4 E2M1 code → value (SPEC §3.1).
pub const FP4_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// E8M0 scale byte → 2^(s − 127), exact (SPEC §3.2). 0 is the subnormal 2^−127; 255 gives +Inf, as in
/// the reference, which does not special-case it.
#[inline]
pub fn e8m0_to_f32(s: u8) -> f32 {
    if s == 0 {
        f32::from_bits(0x0040_0000)
    } else {
        f32::from_bits((s as u32) << 23)
    }
}

/// `out[r * tokens + t] = Σ_c x[t, c] · w[r, c]` for the `out.len() / tokens` rows of `w`.
pub fn matmul_bf16(x: &[f32], tokens: usize, w: &[u16], cols: usize, out: &mut [f32]) {
    for (w_row, out_row) in w.chunks_exact(cols).zip(out.chunks_exact_mut(tokens)) {
        for (x_row, o) in x.chunks_exact(cols).zip(out_row) {
            *o = dot_bf16(x_row, w_row);
        }
    }
}

/// As [`matmul_bf16`] for MXFP4 rows: `blocks` `[rows, cols / 2]`, `scales` `[rows, cols / 32]`.
pub fn matmul_mxfp4(
    x: &[f32],
    tokens: usize,
    blocks: &[u8],
    scales: &[u8],
    cols: usize,
    out: &mut [f32],
) {
    let rows = blocks
        .chunks_exact(cols / 2)
        .zip(scales.chunks_exact(cols / 32));
    for ((b, s), out_row) in rows.zip(out.chunks_exact_mut(tokens)) {
        for (x_row, o) in x.chunks_exact(cols).zip(out_row) {
            *o = dot_mxfp4(x_row, b, s);
        }
    }
}

pub fn dot_bf16(x: &[f32], w: &[u16]) -> f32 {
    debug_assert_eq!(x.len(), w.len());
    x.iter().zip(w).map(|(&a, &b)| a * bf16_to_f32(b)).sum()
}

/// One MXFP4 row: 32 inputs per block share a scale; byte j of a block holds element 2j in its low
/// nibble and 2j+1 in its high nibble (SPEC §3.3).
pub fn dot_mxfp4(x: &[f32], blocks: &[u8], scales: &[u8]) -> f32 {
    debug_assert_eq!(x.len(), blocks.len() * 2);
    debug_assert_eq!(x.len(), scales.len() * 32);
    let mut total = 0f32;
    for ((block, &scale), xs) in blocks.chunks_exact(16).zip(scales).zip(x.chunks_exact(32)) {
        let mut acc = 0f32;
        for (&byte, pair) in block.iter().zip(xs.chunks_exact(2)) {
            acc += FP4_VALUES[(byte & 0x0F) as usize] * pair[0];
            acc += FP4_VALUES[(byte >> 4) as usize] * pair[1];
        }
        total += acc * e8m0_to_f32(scale);
    }
    total
}

/// As [`matmul_mxfp4`] with 8-bit activations (`codes` `[tokens, cols]`, `act_scales`
/// `[tokens, cols / 32]`): per block, an exact integer dot product of doubled FP4 values and codes,
/// times the weight scale, the activation scale and ½.
#[allow(clippy::too_many_arguments)]
pub fn matmul_mxfp4_q8(
    codes: &[i8],
    act_scales: &[f32],
    tokens: usize,
    blocks: &[u8],
    scales: &[u8],
    cols: usize,
    out: &mut [f32],
) {
    let rows = blocks
        .chunks_exact(cols / 2)
        .zip(scales.chunks_exact(cols / 32));
    for ((b, s), out_row) in rows.zip(out.chunks_exact_mut(tokens)) {
        let activations = codes
            .chunks_exact(cols)
            .zip(act_scales.chunks_exact(cols / 32));
        for ((q, d), o) in activations.zip(out_row) {
            *o = dot_mxfp4_q8(q, d, b, s);
        }
    }
}

fn dot_mxfp4_q8(codes: &[i8], act_scales: &[f32], blocks: &[u8], scales: &[u8]) -> f32 {
    let doubled = |code: u8| FP4_DOUBLED_PLUS_12[code as usize] as i32 - FP4_OFFSET;
    let mut total = 0f32;
    let per_block = blocks.chunks_exact(16).zip(scales).zip(act_scales);
    for (((block, &scale), &d), q) in per_block.zip(codes.chunks_exact(32)) {
        let dot: i32 = block
            .iter()
            .zip(q.chunks_exact(2))
            .map(|(&byte, pair)| {
                doubled(byte & 0x0F) * pair[0] as i32 + doubled(byte >> 4) * pair[1] as i32
            })
            .sum();
        total += dot as f32 * (d * 0.5) * e8m0_to_f32(scale);
    }
    total
}

/// 8-bit weights (`codes` `[rows, cols]`, stored `+ 128` in the grouped order of
/// [`q8::grouped_offset`]; bf16 `scales` `[rows, cols / 32]`) × 8-bit activations (natural order): per
/// block an exact integer dot product times both scales.
#[allow(clippy::too_many_arguments)]
pub fn matmul_q8_q8(
    x_codes: &[i8],
    x_scales: &[f32],
    tokens: usize,
    codes: &[u8],
    scales: &[u16],
    cols: usize,
    out: &mut [f32],
) {
    let blocks = cols / 32;
    let rows = codes.chunks_exact(cols).zip(scales.chunks_exact(blocks));
    for ((w, ws), out_row) in rows.zip(out.chunks_exact_mut(tokens)) {
        let activations = x_codes
            .chunks_exact(cols)
            .zip(x_scales.chunks_exact(blocks));
        for ((q, qs), o) in activations.zip(out_row) {
            let mut total = 0f32;
            for (first, size) in q8::weight_groups(blocks) {
                let group = &w[first * 32..(first + size) * 32];
                for b in first..first + size {
                    let dot: i32 = (0..32)
                        .map(|e| {
                            let w = group[q8::grouped_offset(size, b - first, e)];
                            (w as i32 - 128) * q[b * 32 + e] as i32
                        })
                        .sum();
                    total += dot as f32 * qs[b] * bf16_to_f32(ws[b]);
                }
            }
            *o = total;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e8m0_is_exact_power_of_two() {
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(130), 8.0);
        assert_eq!(e8m0_to_f32(1), f32::MIN_POSITIVE);
        assert_eq!(e8m0_to_f32(0), f32::MIN_POSITIVE / 2.0);
        assert_eq!(e8m0_to_f32(255), f32::INFINITY);
    }

    #[test]
    fn mxfp4_nibble_order_is_low_first() {
        // One block: byte 0 = 0x72 → element 0 = code 2 (1.0), element 1 = code 7 (6.0).
        let mut block = [0u8; 16];
        block[0] = 0x72;
        block[15] = 0x9F; // element 30 = code F (-6.0), element 31 = code 9 (-0.5)
        let mut x = [0f32; 32];
        x[0] = 1.0;
        x[1] = 10.0;
        x[30] = 100.0;
        x[31] = 1000.0;
        let got = dot_mxfp4(&x, &block, &[128]); // scale 2
        assert_eq!(got, 2.0 * (1.0 + 60.0 - 600.0 - 500.0));
    }
}
