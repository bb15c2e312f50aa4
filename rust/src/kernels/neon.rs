//! NEON kernels, for aarch64 (where NEON is part of the baseline). The 8-bit products use `sdot`
//! (ARMv8.2 dot product: Apple M1 on, Graviton 2 on, Cortex-A76 on) where the CPU has it, and
//! widening multiplies on ARMv8.0 CPUs (Cortex-A53/A72, Raspberry Pi 4). Both give the same exact
//! integer sums, so results do not depend on which one runs.
//!
//! Unlike the x86 kernels these do not issue software prefetches: that choice was measured on x86
//! and could not be measured here (the aarch64 kernels are tested under emulation only).

// Tiles index accumulators by (row, token); iterator chains would obscure the register tile.
#![allow(clippy::needless_range_loop)]

use std::arch::aarch64::*;
use std::arch::asm;

use super::q8::{weight_groups, Q8Group, Q8Span, FP4_DOUBLED};
use super::DecodeOrder::Tiles;
use super::{for_each_tile, TileRows, MXFP4_BLOCK_BYTES};

/// Whether the CPU has the dot-product instructions (`sdot`).
pub fn has_dotprod() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

/// `out[r * tokens + t] = Σ_c x[t, c] · w[r, c]`, `x` in natural order: widening a bf16 to f32 is
/// a shift, which `vshll` does for the low and high four of eight lanes in place.
///
/// # Safety
/// `x` is `[tokens, cols]`, `w` is `[rows, cols]`, `out` is `[rows, tokens]`.
#[target_feature(enable = "neon")]
pub unsafe fn matmul_bf16(x: &[f32], tokens: usize, w: &[u16], cols: usize, out: &mut [f32]) {
    for_each_tile!(out, tokens, 4, 2, Tiles, |tile, t0, R, T| {
        // SAFETY: the tile lies inside the operands by construction of `for_each_tile`.
        unsafe { tile_bf16::<R, T>(x, w, cols, tile, t0, tokens, out) }
    });
}

#[target_feature(enable = "neon")]
unsafe fn tile_bf16<const R: usize, const T: usize>(
    x: &[f32],
    w: &[u16],
    cols: usize,
    tile: TileRows,
    t0: usize,
    tokens: usize,
    out: &mut [f32],
) {
    // Two accumulators per (row, token): one chain of dependent FMAs would wait on their latency.
    let mut acc = [[[vdupq_n_f32(0.0); 2]; T]; R];
    let full = cols / 8 * 8;
    for c in (0..full).step_by(8) {
        let mut low = [vdupq_n_f32(0.0); R];
        let mut high = [vdupq_n_f32(0.0); R];
        for r in 0..R {
            // SAFETY: 8 weights of tile row r from column c < full <= cols.
            let bits = unsafe { vld1q_u16(w.as_ptr().add(tile.row(r) * cols + c)) };
            low[r] = vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(bits)));
            high[r] = vreinterpretq_f32_u32(vshll_high_n_u16::<16>(bits));
        }
        for t in 0..T {
            // SAFETY: 8 activations of token t0 + t from column c.
            let (xl, xh) = unsafe {
                let at = x.as_ptr().add((t0 + t) * cols + c);
                (vld1q_f32(at), vld1q_f32(at.add(4)))
            };
            for r in 0..R {
                acc[r][t][0] = vfmaq_f32(acc[r][t][0], low[r], xl);
                acc[r][t][1] = vfmaq_f32(acc[r][t][1], high[r], xh);
            }
        }
    }
    for r in 0..R {
        let w_row = &w[tile.row(r) * cols..(tile.row(r) + 1) * cols];
        for t in 0..T {
            let x_row = &x[(t0 + t) * cols..(t0 + t + 1) * cols];
            let tail = super::scalar::dot_bf16(&x_row[full..], &w_row[full..]);
            let sum = vaddvq_f32(vaddq_f32(acc[r][t][0], acc[r][t][1]));
            out[tile.row(r) * tokens + t0 + t] = sum + tail;
        }
    }
}

/// A block's 16 code bytes as its 16 even and 16 odd weights (low and high nibbles), each twice
/// its FP4 value as a signed byte.
#[target_feature(enable = "neon")]
#[inline]
fn doubled_weights(bytes: uint8x16_t) -> (int8x16_t, int8x16_t) {
    // SAFETY: the table is 16 bytes.
    let lut = unsafe { vld1q_s8(FP4_DOUBLED.as_ptr()) };
    let even = vqtbl1q_s8(lut, vandq_u8(bytes, vdupq_n_u8(0x0F)));
    let odd = vqtbl1q_s8(lut, vshrq_n_u8::<4>(bytes));
    (even, odd)
}

/// MXFP4 rows × activations, `x` de-interleaved per 32-input block ([`super::deinterleave_pairs`]),
/// so a block's even and odd activations are 16 contiguous values each, matching the low and high
/// nibbles. Per block, a partial sum of the doubled weights times the activations, then scaled:
/// `vcvtq_n_f32_s32::<1>` halves while converting, so the weights are exact FP4 values.
///
/// # Safety
/// `blocks` is `[rows, cols / 2]`, `scales` `[rows, cols / 32]`, `x` `[tokens, cols]`, `out`
/// `[rows, tokens]`, and `cols` a multiple of 32.
#[target_feature(enable = "neon")]
pub unsafe fn matmul_mxfp4(
    x: &[f32],
    tokens: usize,
    blocks: &[u8],
    scales: &[u8],
    cols: usize,
    out: &mut [f32],
) {
    for_each_tile!(out, tokens, |tile, t0, R, T| {
        // SAFETY: the tile lies inside the operands by construction of `for_each_tile`.
        unsafe { tile_mxfp4::<R, T>(x, blocks, scales, cols, tile, t0, tokens, out) }
    });
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "neon")]
unsafe fn tile_mxfp4<const R: usize, const T: usize>(
    x: &[f32],
    blocks: &[u8],
    scales: &[u8],
    cols: usize,
    tile: TileRows,
    t0: usize,
    tokens: usize,
    out: &mut [f32],
) {
    let groups = cols / 32;
    let mut acc = [[vdupq_n_f32(0.0); T]; R];
    for g in 0..groups {
        for r in 0..R {
            let row = tile.row(r);
            // SAFETY: block g of `row` is 16 bytes inside `blocks`.
            let bytes =
                unsafe { vld1q_u8(blocks.as_ptr().add((row * groups + g) * MXFP4_BLOCK_BYTES)) };
            let (even, odd) = doubled_weights(bytes);
            let widen = |v: int16x8_t| {
                [
                    vcvtq_n_f32_s32::<1>(vmovl_s16(vget_low_s16(v))),
                    vcvtq_n_f32_s32::<1>(vmovl_high_s16(v)),
                ]
            };
            let [w0, w1] = widen(vmovl_s8(vget_low_s8(even)));
            let [w2, w3] = widen(vmovl_high_s8(even));
            let [w4, w5] = widen(vmovl_s8(vget_low_s8(odd)));
            let [w6, w7] = widen(vmovl_high_s8(odd));
            let scale = super::scalar::e8m0_to_f32(scales[row * groups + g]);
            for t in 0..T {
                // SAFETY: the 32 activations of block g of token t0 + t.
                let xv = |i: usize| unsafe {
                    vld1q_f32(x.as_ptr().add((t0 + t) * cols + g * 32 + 4 * i))
                };
                // Two partial sums halve the chain of dependent FMAs.
                let even_part = vfmaq_f32(
                    vfmaq_f32(vfmaq_f32(vmulq_f32(w0, xv(0)), w1, xv(1)), w2, xv(2)),
                    w3,
                    xv(3),
                );
                let odd_part = vfmaq_f32(
                    vfmaq_f32(vfmaq_f32(vmulq_f32(w4, xv(4)), w5, xv(5)), w6, xv(6)),
                    w7,
                    xv(7),
                );
                acc[r][t] = vfmaq_n_f32(acc[r][t], vaddq_f32(even_part, odd_part), scale);
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            out[tile.row(r) * tokens + t0 + t] = vaddvq_f32(acc[r][t]);
        }
    }
}

/// Signed 8-bit dot products of 4-byte pieces: lane `i` of the result is `acc[i] + Σ_{k<4}
/// a[4i + k] · b[4i + k]`, by `sdot` if `SDOT`, else by widening multiplies. Those add two
/// products in 16 bits, exact while `b` is within −127..=127 (at most 2 · 128 · 127 = 32512):
/// `b` is always the activations, which the quantizer clamps there.
///
/// # Safety
/// With `SDOT`, the CPU must have the dot-product extension.
#[inline(always)]
unsafe fn dot<const SDOT: bool>(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    if SDOT {
        let mut acc = acc;
        // SAFETY: `sdot` only reads and writes these registers; the caller guarantees the CPU has
        // it. (`vdotq_s32` is not yet stable in `std::arch`.) The directive lets the assembler
        // accept the instruction whichever function this ends up inlined into.
        unsafe {
            asm!(
                ".arch_extension dotprod",
                "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                acc = inout(vreg) acc,
                a = in(vreg) a,
                b = in(vreg) b,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        acc
    } else {
        let low = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        let high = vmull_high_s8(a, b);
        vpadalq_s16(acc, vpaddq_s16(low, high))
    }
}

/// Runs `$kernel::<SDOT>` on the arguments, with `sdot` (and a function compiled for it) where the
/// CPU has the dot-product extension.
macro_rules! with_dot_product {
    ($kernel:ident($($arg:ident: $ty:ty),*)) => {{
        #[target_feature(enable = "neon,dotprod")]
        unsafe fn with_sdot($($arg: $ty),*) {
            // SAFETY: as for the caller.
            unsafe { $kernel::<true>($($arg),*) }
        }
        if has_dotprod() {
            // SAFETY: the CPU has the dot-product extension; the caller's contract covers the rest.
            unsafe { with_sdot($($arg),*) }
        } else {
            // SAFETY: the caller's contract.
            unsafe { $kernel::<false>($($arg),*) }
        }
    }};
}

/// MXFP4 rows × 8-bit activations ([`Q8Span`]s, 4 blocks each). Per block, `sdot` multiplies the
/// doubled signed FP4 weights into the even and odd activation codes; the 4 blocks' sums are then
/// reduced into one vector, lane `i` for block `i`, and scaled once per span.
///
/// # Safety
/// `blocks` is `[rows, cols / 2]`, `scales` `[rows, cols / 32]`, `spans` as
/// [`super::q8::to_spans`] gives for `[tokens, cols]`, `out` `[rows, tokens]`, and `cols` a
/// multiple of 32.
pub unsafe fn matmul_mxfp4_q8(
    spans: &[Q8Span],
    tokens: usize,
    blocks: &[u8],
    scales: &[u8],
    cols: usize,
    out: &mut [f32],
) {
    with_dot_product!(mxfp4_q8(
        spans: &[Q8Span],
        tokens: usize,
        blocks: &[u8],
        scales: &[u8],
        cols: usize,
        out: &mut [f32]
    ))
}

#[inline(always)]
unsafe fn mxfp4_q8<const SDOT: bool>(
    spans: &[Q8Span],
    tokens: usize,
    blocks: &[u8],
    scales: &[u8],
    cols: usize,
    out: &mut [f32],
) {
    for_each_tile!(out, tokens, 4, 2, Tiles, |tile, t0, R, T| {
        // SAFETY: the tile lies inside the operands by construction of `for_each_tile`.
        unsafe { tile_mxfp4_q8::<R, T, SDOT>(spans, blocks, scales, cols, tile, t0, tokens, out) }
    });
}

/// The E8M0 scales of up to 4 blocks (`scales[..count]`) as f32 lanes, exactly; absent lanes are 0.
#[target_feature(enable = "neon")]
#[inline]
fn block_scales(scales: &[u8], count: usize) -> float32x4_t {
    let bytes = match scales.first_chunk::<4>() {
        Some(&all) if count == 4 => u32::from_le_bytes(all),
        _ => scales[..count]
            .iter()
            .rev()
            .fold(0, |v, &b| v << 8 | u32::from(b)),
    };
    let s = vmovl_u16(vget_low_u16(vmovl_u8(vcreate_u8(u64::from(bytes)))));
    // 2^(s-127) is the exponent field s; s = 0 is the subnormal 2^-127, but only in present lanes.
    let lane = {
        let index: [u32; 4] = [0, 1, 2, 3];
        // SAFETY: 4 u32s.
        unsafe { vld1q_u32(index.as_ptr()) }
    };
    let present = vcltq_u32(lane, vdupq_n_u32(count as u32));
    let subnormal = vandq_u32(present, vdupq_n_u32(0x0040_0000));
    let bits = vbslq_u32(vceqzq_u32(s), subnormal, vshlq_n_u32::<23>(s));
    vreinterpretq_f32_u32(bits)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile_mxfp4_q8<const R: usize, const T: usize, const SDOT: bool>(
    spans: &[Q8Span],
    blocks: &[u8],
    scales: &[u8],
    cols: usize,
    tile: TileRows,
    t0: usize,
    tokens: usize,
    out: &mut [f32],
) {
    let groups = cols / 32;
    let spans_per_row = groups.div_ceil(4);
    let mut acc = [[vdupq_n_f32(0.0); T]; R];
    for p in 0..spans_per_row {
        let present = (groups - 4 * p).min(4);
        for r in 0..R {
            let row = tile.row(r);
            let mut block_dots = [[vdupq_n_s32(0); 4]; T];
            for b in 0..present {
                let at = (row * groups + 4 * p + b) * MXFP4_BLOCK_BYTES;
                // SAFETY: block 4p + b < groups of `row` is 16 bytes inside `blocks`.
                let (even, odd) = doubled_weights(unsafe { vld1q_u8(blocks.as_ptr().add(at)) });
                for t in 0..T {
                    let span = &spans[(t0 + t) * spans_per_row + p];
                    // SAFETY: `even` and `odd` are 64 bytes each; block b's part is 16 of them.
                    let (xe, xo) = unsafe {
                        (
                            vld1q_s8(span.even.as_ptr().add(16 * b)),
                            vld1q_s8(span.odd.as_ptr().add(16 * b)),
                        )
                    };
                    // SAFETY: the caller runs `SDOT` only on CPUs with `sdot`.
                    block_dots[t][b] =
                        unsafe { dot::<SDOT>(dot::<SDOT>(vdupq_n_s32(0), even, xe), odd, xo) };
                }
            }
            let weight_scale = block_scales(&scales[row * groups + 4 * p..], present);
            for t in 0..T {
                let span = &spans[(t0 + t) * spans_per_row + p];
                let [d0, d1, d2, d3] = block_dots[t];
                let sums = vpaddq_s32(vpaddq_s32(d0, d1), vpaddq_s32(d2, d3));
                // SAFETY: `half_scale` has 16 lanes; de-interleaving by 4 gives lanes 0, 4, 8, 12,
                // one per block.
                let half_scale = unsafe { vld4q_f32(span.half_scale.as_ptr()).0 };
                let scale = vmulq_f32(half_scale, weight_scale);
                acc[r][t] = vfmaq_f32(acc[r][t], vcvtq_f32_s32(sums), scale);
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            out[tile.row(r) * tokens + t0 + t] = vaddvq_f32(acc[r][t]);
        }
    }
}

/// 8-bit weight rows (`dense="q8"`, codes stored `+ 128` in the grouped order of
/// [`super::q8::grouped_offset`]) × 8-bit activations ([`Q8Group`]s). A group is read in quarters
/// of up to 4 blocks: a 16-byte load of one step holds 4 codes of each of 4 blocks, so `sdot`
/// leaves each block's sum in its own lane and the scales apply once per quarter.
///
/// # Safety
/// `codes` is `[rows, cols]`, `scales` `[rows, cols / 32]`, `groups` as
/// [`super::q8::to_groups`] gives for `[tokens, cols]`, `out` `[rows, tokens]`, and `cols` a
/// multiple of 32.
pub unsafe fn matmul_q8_q8(
    groups: &[Q8Group],
    tokens: usize,
    codes: &[u8],
    scales: &[u16],
    cols: usize,
    out: &mut [f32],
) {
    with_dot_product!(q8_q8(
        groups: &[Q8Group],
        tokens: usize,
        codes: &[u8],
        scales: &[u16],
        cols: usize,
        out: &mut [f32]
    ))
}

#[inline(always)]
unsafe fn q8_q8<const SDOT: bool>(
    groups: &[Q8Group],
    tokens: usize,
    codes: &[u8],
    scales: &[u16],
    cols: usize,
    out: &mut [f32],
) {
    for_each_tile!(out, tokens, 4, 2, Tiles, |tile, t0, R, T| {
        // SAFETY: the tile lies inside the operands by construction of `for_each_tile`.
        unsafe { tile_q8_q8::<R, T, SDOT>(groups, codes, scales, cols, tile, t0, tokens, out) }
    });
}

/// `4 · lanes` bytes at `at` (`lanes` one of 4, 2, 1) in the low 32-bit lanes of a vector, the
/// others zero.
///
/// # Safety
/// `4 · lanes` bytes at `at` must be readable.
#[inline(always)]
unsafe fn load_lanes(at: *const u8, lanes: usize) -> uint8x16_t {
    debug_assert!(matches!(lanes, 1 | 2 | 4));
    // SAFETY: each arm reads exactly `4 · lanes` bytes, unaligned.
    unsafe {
        match lanes {
            4 => vld1q_u8(at),
            2 => vcombine_u8(vld1_u8(at), vdup_n_u8(0)),
            _ => vreinterpretq_u8_u32(vsetq_lane_u32::<0>(
                (at as *const u32).read_unaligned(),
                vdupq_n_u32(0),
            )),
        }
    }
}

/// `lanes` bf16 scales at `at` (`lanes` one of 4, 2, 1) as f32 in the low lanes, the others zero.
///
/// # Safety
/// `lanes` values at `at` must be readable.
#[inline(always)]
unsafe fn load_bf16_lanes(at: *const u16, lanes: usize) -> float32x4_t {
    // SAFETY: each arm reads exactly `2 · lanes` bytes.
    let bits = unsafe {
        match lanes {
            4 => vld1_u16(at),
            2 => vreinterpret_u16_u32(vset_lane_u32::<0>(
                (at as *const u32).read_unaligned(),
                vdup_n_u32(0),
            )),
            _ => vset_lane_u16::<0>(at.read_unaligned(), vdup_n_u16(0)),
        }
    };
    // A bf16 is the high half of its f32.
    vreinterpretq_f32_u32(vshll_n_u16::<16>(bits))
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile_q8_q8<const R: usize, const T: usize, const SDOT: bool>(
    groups: &[Q8Group],
    codes: &[u8],
    scales: &[u16],
    cols: usize,
    tile: TileRows,
    t0: usize,
    tokens: usize,
    out: &mut [f32],
) {
    let blocks = cols / 32;
    let groups_per_row = weight_groups(blocks).count();
    let offset = vdupq_n_u8(0x80);
    let mut acc = [[vdupq_n_f32(0.0); T]; R];
    for (g, (first, size)) in weight_groups(blocks).enumerate() {
        let x = |t: usize| &groups[(t0 + t) * groups_per_row + g];
        let lanes = size.min(4);
        for quarter in 0..size / lanes {
            let mut dots = [[vdupq_n_s32(0); T]; R];
            for step in 0..8 {
                let mut weights = [vdupq_n_s8(0); R];
                for r in 0..R {
                    let at = tile.row(r) * cols + first * 32 + 4 * size * step + 16 * quarter;
                    // SAFETY: this quarter of step `step` of the group, `4 · lanes` codes of
                    // tile row r, lies inside `codes`.
                    let stored = unsafe { load_lanes(codes.as_ptr().add(at), lanes) };
                    weights[r] = vreinterpretq_s8_u8(veorq_u8(stored, offset));
                }
                for t in 0..T {
                    // SAFETY: `steps[step]` has 64 bytes; this quarter is 16 of them.
                    let xs = unsafe { vld1q_s8(x(t).steps[step].as_ptr().add(16 * quarter)) };
                    for r in 0..R {
                        // SAFETY: the caller runs `SDOT` only on CPUs with `sdot`.
                        dots[r][t] = unsafe { dot::<SDOT>(dots[r][t], weights[r], xs) };
                    }
                }
            }
            for r in 0..R {
                let at = tile.row(r) * blocks + first + 4 * quarter;
                // SAFETY: this quarter's `lanes` scales of tile row r lie inside `scales`.
                let weight_scale = unsafe { load_bf16_lanes(scales.as_ptr().add(at), lanes) };
                for t in 0..T {
                    // SAFETY: `scale` has 16 lanes; this quarter is 4 of them.
                    let x_scale = unsafe { vld1q_f32(x(t).scale.as_ptr().add(4 * quarter)) };
                    let partial = vmulq_f32(vcvtq_f32_s32(dots[r][t]), x_scale);
                    acc[r][t] = vfmaq_f32(acc[r][t], partial, weight_scale);
                }
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            out[tile.row(r) * tokens + t0 + t] = vaddvq_f32(acc[r][t]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::scalar::e8m0_to_f32;

    /// `.ci/aarch64` says which emulated CPU has the dot-product extension, so a broken detection
    /// cannot quietly test only one of the two paths.
    #[test]
    fn dot_product_detection_matches_the_cpu() {
        if let Ok(expected) = std::env::var("GPT_OSS_CPU_EXPECT_DOTPROD") {
            assert_eq!(has_dotprod(), expected == "1");
        }
    }

    #[test]
    fn both_dot_products_are_exact_at_the_extremes() {
        let a: [i8; 16] = [
            -128, -128, -128, -128, 127, 127, 127, 127, -128, 127, -128, 127, 0, 1, -1, 5,
        ];
        let b: [i8; 16] = [
            127, 127, 127, 127, 127, 127, 127, 127, -127, -127, 127, 127, 9, -9, 9, 3,
        ];
        let want: Vec<i32> = (0..4)
            .map(|i| {
                7 + (0..4)
                    .map(|k| a[4 * i + k] as i32 * b[4 * i + k] as i32)
                    .sum::<i32>()
            })
            .collect();
        // SAFETY: 16-byte arrays; `sdot` only where the CPU has it.
        unsafe {
            let (va, vb, acc) = (vld1q_s8(a.as_ptr()), vld1q_s8(b.as_ptr()), vdupq_n_s32(7));
            let mut got = [0i32; 4];
            vst1q_s32(got.as_mut_ptr(), dot::<false>(acc, va, vb));
            assert_eq!(got.to_vec(), want, "widening");
            if has_dotprod() {
                vst1q_s32(got.as_mut_ptr(), dot::<true>(acc, va, vb));
                assert_eq!(got.to_vec(), want, "sdot");
            }
        }
    }

    #[test]
    fn block_scales_are_the_e8m0_values_and_absent_lanes_zero() {
        for byte in 0..=255u8 {
            let scales = [byte, byte.wrapping_add(1), byte.wrapping_mul(7), 255 - byte];
            for count in 1..=4 {
                let mut got = [0f32; 4];
                // SAFETY: 4 f32s.
                unsafe { vst1q_f32(got.as_mut_ptr(), block_scales(&scales[..count], count)) };
                for (lane, g) in got.iter().enumerate() {
                    let want = if lane < count {
                        e8m0_to_f32(scales[lane])
                    } else {
                        0.0
                    };
                    assert_eq!(
                        g.to_bits(),
                        want.to_bits(),
                        "{scales:?} count {count} lane {lane}"
                    );
                }
            }
        }
    }
}
