//! AVX-512 (F, BW, VL) kernels. Register tiles of `R` weight rows × `T` tokens: each weight vector is decoded
//! once and reused for `T` tokens, each activation vector loaded once for `R` rows.

// Tiles index accumulators by (row, token); iterator chains would obscure the register tile.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::{for_each_tile, MXFP4_BLOCK_BYTES};
use crate::kernels::scalar::FP4_VALUES;

/// `out[r * tokens + t] = Σ_c x[t, c] · w[r, c]` for the `out.len() / tokens` rows of `w`.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VL; `x` is `[tokens, cols]`, `w` is `[rows, cols]`, `out` is
/// `[rows, tokens]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn matmul_bf16(x: &[f32], tokens: usize, w: &[u16], cols: usize, out: &mut [f32]) {
    for_each_tile!(out, tokens, |r0, t0, R, T| {
        // SAFETY: the tile lies inside `w`, `x` and `out` by construction of `for_each_tile`.
        unsafe { tile_bf16::<R, T>(x, w, cols, r0, t0, tokens, out) }
    });
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn tile_bf16<const R: usize, const T: usize>(
    x: &[f32],
    w: &[u16],
    cols: usize,
    r0: usize,
    t0: usize,
    tokens: usize,
    out: &mut [f32],
) {
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let full = cols / 16 * 16;
    let tail: __mmask16 = (1u32 << (cols - full)).wrapping_sub(1) as __mmask16;
    let mut c = 0;
    while c < cols {
        let mask = if c < full { 0xFFFF } else { tail };
        let mut wv = [_mm512_setzero_ps(); R];
        for (r, wr) in wv.iter_mut().enumerate() {
            // SAFETY: `mask` limits the load to the row's remaining `cols - c` elements.
            let bits = unsafe {
                _mm256_maskz_loadu_epi16(mask, w.as_ptr().add((r0 + r) * cols + c) as *const i16)
            };
            *wr = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
        }
        for t in 0..T {
            // SAFETY: as above, within token `t0 + t`'s row of `x`.
            let xv = unsafe { _mm512_maskz_loadu_ps(mask, x.as_ptr().add((t0 + t) * cols + c)) };
            for r in 0..R {
                acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
            }
        }
        c += 16;
    }
    for r in 0..R {
        for t in 0..T {
            out[(r0 + r) * tokens + t0 + t] = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
}

/// MXFP4 rows × activations. `x` holds each token's activations with every 32-input block
/// de-interleaved into its 16 even then 16 odd inputs ([`super::deinterleave_pairs`]), so that low
/// and high nibbles each meet a contiguous vector.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VL; `blocks` is `[rows, cols / 2]`, `scales` `[rows, cols / 32]`,
/// `x` `[tokens, cols]`, `out` `[rows, tokens]`, and `cols` a multiple of 32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn matmul_mxfp4(
    x: &[f32],
    tokens: usize,
    blocks: &[u8],
    scales: &[u8],
    cols: usize,
    out: &mut [f32],
) {
    for_each_tile!(out, tokens, |r0, t0, R, T| {
        // SAFETY: the tile lies inside the operands by construction of `for_each_tile`.
        unsafe { tile_mxfp4::<R, T>(x, blocks, scales, cols, r0, t0, tokens, out) }
    });
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn tile_mxfp4<const R: usize, const T: usize>(
    x: &[f32],
    blocks: &[u8],
    scales: &[u8],
    cols: usize,
    r0: usize,
    t0: usize,
    tokens: usize,
    out: &mut [f32],
) {
    // SAFETY: FP4_VALUES has 16 f32.
    let lut = unsafe { _mm512_loadu_ps(FP4_VALUES.as_ptr()) };
    let low_nibble = _mm512_set1_epi32(0x0F);
    let groups = cols / 32;
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    for g in 0..groups {
        let mut even = [_mm512_setzero_ps(); R];
        let mut odd = [_mm512_setzero_ps(); R];
        for r in 0..R {
            let row = r0 + r;
            // SAFETY: block g of `row` is 16 bytes inside `blocks`.
            let bytes = unsafe {
                _mm_loadu_si128(
                    blocks.as_ptr().add((row * groups + g) * MXFP4_BLOCK_BYTES) as *const __m128i
                )
            };
            let codes = _mm512_cvtepu8_epi32(bytes);
            let scale = _mm512_set1_ps(super::scalar::e8m0_to_f32(scales[row * groups + g]));
            let lo = _mm512_permutexvar_ps(_mm512_and_si512(codes, low_nibble), lut);
            let hi = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), lut);
            // Power-of-two scaling of FP4 values is exact.
            even[r] = _mm512_mul_ps(lo, scale);
            odd[r] = _mm512_mul_ps(hi, scale);
        }
        for t in 0..T {
            let base = (t0 + t) * cols + g * 32;
            // SAFETY: 32 activations of block g of token t0 + t.
            let (xe, xo) = unsafe {
                (
                    _mm512_loadu_ps(x.as_ptr().add(base)),
                    _mm512_loadu_ps(x.as_ptr().add(base + 16)),
                )
            };
            for r in 0..R {
                acc[r][t] = _mm512_fmadd_ps(even[r], xe, acc[r][t]);
                acc[r][t] = _mm512_fmadd_ps(odd[r], xo, acc[r][t]);
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            out[(r0 + r) * tokens + t0 + t] = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
}
