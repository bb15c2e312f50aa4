//! AVX-512 (F, BW, VL) kernels. Register tiles of `R` weight rows × `T` tokens: each weight vector is decoded
//! once and reused for `T` tokens, each activation vector loaded once for `R` rows.

// Tiles index accumulators by (row, token); iterator chains would obscure the register tile.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::panels::{tile_tokens, BroadcastTile, PanelKernels, PanelSource, PANEL_COLS};
use super::q8::{
    weight_groups, Q8Activations, Q8Group, Q8Span, TokenColumns, FP4_DOUBLED, FP4_DOUBLED_PLUS_12,
    GROUP_TOKENS,
};
use super::DecodeOrder::{Lanes, Rows};
use super::{for_each_tile, prefetch, TileRows, MXFP4_BLOCK_BYTES, TILE_ROWS};
use crate::kernels::scalar::{bf16_to_f32, e8m0_to_f32, FP4_VALUES};

/// `out[r * tokens + t] = Σ_c x[t, c] · w[r, c]` for the `out.len() / tokens` rows of `w`.
///
/// `x` must be in the order [`super::unpack_order`] gives for 32-wide blocks: each 64-byte load of
/// 32 bf16 weights is widened by interleaving with zeros (`vpunpck{l,h}wd`), which yields the
/// weights of each 128-bit lane's low and high halves, so the activations are pre-permuted to match.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VL; `x` is `[tokens, cols]`, `w` is `[rows, cols]`, `out` is
/// `[rows, tokens]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn matmul_bf16(x: &[f32], tokens: usize, w: &[u16], cols: usize, out: &mut [f32]) {
    for_each_tile!(out, tokens, TILE_ROWS, 4, Rows, |tile, t0, R, T| {
        // SAFETY: the tile lies inside `w`, `x` and `out` by construction of `for_each_tile`.
        unsafe { tile_bf16::<R, T>(x, w, cols, tile, t0, tokens, out) }
    });
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn tile_bf16<const R: usize, const T: usize>(
    x: &[f32],
    w: &[u16],
    cols: usize,
    tile: TileRows,
    t0: usize,
    tokens: usize,
    out: &mut [f32],
) {
    // Rows below each tile row to prefetch.
    let ahead = tile.ahead();
    let zero = _mm512_setzero_si512();
    // Each load's low and high halves go to their own accumulators when the tile is small (a
    // decoded token's one-row tile): a single chain of dependent FMAs would wait on their latency.
    // Tiles of more outputs already have more chains.
    let split = R * T <= 4;
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut acc_high = [[_mm512_setzero_ps(); T]; R];
    let full = cols / 32 * 32;
    for c in (0..full).step_by(32) {
        let mut low = [_mm512_setzero_ps(); R];
        let mut high = [_mm512_setzero_ps(); R];
        for r in 0..R {
            let at = tile.row(r) * cols + c;
            prefetch(w.as_ptr() as *const u8, (at + ahead * cols) * 2);
            // SAFETY: 32 weights of tile row r from column c < full <= cols.
            let bits = unsafe { _mm512_loadu_si512(w.as_ptr().add(at) as *const _) };
            low[r] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, bits));
            high[r] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, bits));
        }
        for t in 0..T {
            let base = (t0 + t) * cols + c;
            // SAFETY: 32 activations of token t0 + t from column c.
            let (xl, xh) = unsafe {
                (
                    _mm512_loadu_ps(x.as_ptr().add(base)),
                    _mm512_loadu_ps(x.as_ptr().add(base + 16)),
                )
            };
            for r in 0..R {
                acc[r][t] = _mm512_fmadd_ps(low[r], xl, acc[r][t]);
                if split {
                    acc_high[r][t] = _mm512_fmadd_ps(high[r], xh, acc_high[r][t]);
                } else {
                    acc[r][t] = _mm512_fmadd_ps(high[r], xh, acc[r][t]);
                }
            }
        }
    }
    for r in 0..R {
        let w_row = &w[tile.row(r) * cols..(tile.row(r) + 1) * cols];
        for t in 0..T {
            // The ragged tail is left in natural order by `unpack_order`.
            let x_row = &x[(t0 + t) * cols..(t0 + t + 1) * cols];
            let tail = super::scalar::dot_bf16(&x_row[full..], &w_row[full..]);
            let sum = _mm512_add_ps(acc[r][t], acc_high[r][t]);
            out[tile.row(r) * tokens + t0 + t] = _mm512_reduce_add_ps(sum) + tail;
        }
    }
}

/// MXFP4 rows × activations. `x` is in [`super::nibble_order`]: for each full span of 128 inputs
/// (4 blocks, one 64-byte load per row), the inputs that nibble `k` of each 32-bit lane holds; the
/// remaining blocks de-interleaved into their 16 even then 16 odd inputs.
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
    for_each_tile!(out, tokens, TILE_ROWS, 4, Lanes, |tile, t0, R, T| {
        // SAFETY: the tile lies inside the operands by construction of `for_each_tile`.
        unsafe { tile_mxfp4::<R, T>(x, blocks, scales, cols, tile, t0, tokens, out) }
    });
}

/// Scales of 4 consecutive blocks as 16 lanes, each repeated over the 4 lanes of its block.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn span_scales(bytes: [u8; 4]) -> __m512 {
    let spread = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    e8m0_lanes(_mm512_cvtepu8_epi32(_mm_shuffle_epi8(
        _mm_cvtsi32_si128(i32::from_le_bytes(bytes)),
        spread,
    )))
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
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
    // Rows below each tile row to prefetch.
    let ahead = tile.ahead();
    // SAFETY: FP4_VALUES has 16 f32.
    let lut = unsafe { _mm512_loadu_ps(FP4_VALUES.as_ptr()) };
    let groups = cols / 32;
    let spans = cols / 128;
    let mut acc = [[_mm512_setzero_ps(); T]; R];

    // Spans of 4 blocks: one 64-byte load per row. 32-bit lane i holds inputs 8i..8i+8 (block
    // i / 4) as 8 nibbles; shifting by 4k brings nibble k to the bits vpermps reads.
    for span in 0..spans {
        let g = span * 4;
        let mut codes = [_mm512_setzero_si512(); R];
        let mut scale = [_mm512_setzero_ps(); R];
        for r in 0..R {
            let row = tile.row(r);
            let at = (row * groups + g) * MXFP4_BLOCK_BYTES;
            prefetch(blocks.as_ptr(), at + ahead * groups * MXFP4_BLOCK_BYTES);
            // SAFETY: blocks g..g+4 of `row` are 64 bytes inside `blocks`.
            codes[r] = unsafe { _mm512_loadu_si512(blocks.as_ptr().add(at) as *const _) };
            let s = &scales[row * groups + g..row * groups + g + 4];
            scale[r] = span_scales([s[0], s[1], s[2], s[3]]);
        }
        let mut sums = [_mm512_setzero_ps(); R];
        for k in 0..8 {
            let mut w = [_mm512_setzero_ps(); R];
            for r in 0..R {
                w[r] = _mm512_permutexvar_ps(codes[r], lut);
                codes[r] = _mm512_srli_epi32(codes[r], 4);
                if T > 1 {
                    // Scale once, reuse for every token (power-of-two scaling is exact).
                    w[r] = _mm512_mul_ps(w[r], scale[r]);
                }
            }
            for t in 0..T {
                // SAFETY: 16 activations of span `span`, nibble k, token t0 + t.
                let xv = unsafe {
                    _mm512_loadu_ps(x.as_ptr().add((t0 + t) * cols + span * 128 + k * 16))
                };
                for r in 0..R {
                    if T > 1 {
                        acc[r][t] = _mm512_fmadd_ps(w[r], xv, acc[r][t]);
                    } else {
                        sums[r] = _mm512_fmadd_ps(w[r], xv, sums[r]);
                    }
                }
            }
        }
        if T == 1 {
            // One token: scale the span's sums once.
            for r in 0..R {
                acc[r][0] = _mm512_fmadd_ps(sums[r], scale[r], acc[r][0]);
            }
        }
    }

    // Remaining blocks one at a time, `x` de-interleaved per block.
    for g in spans * 4..groups {
        let mut even = [_mm512_setzero_ps(); R];
        let mut odd = [_mm512_setzero_ps(); R];
        for r in 0..R {
            let row = tile.row(r);
            // SAFETY: block g of `row` is 16 bytes inside `blocks`.
            let bytes = unsafe {
                _mm_loadu_si128(
                    blocks.as_ptr().add((row * groups + g) * MXFP4_BLOCK_BYTES) as *const __m128i
                )
            };
            let codes = _mm512_cvtepu8_epi32(bytes);
            let scale = _mm512_set1_ps(super::scalar::e8m0_to_f32(scales[row * groups + g]));
            even[r] = _mm512_mul_ps(_mm512_permutexvar_ps(codes, lut), scale);
            odd[r] = _mm512_mul_ps(
                _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), lut),
                scale,
            );
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
            out[tile.row(r) * tokens + t0 + t] = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
}

/// MXFP4 rows × 8-bit activations ([`Q8Span`]s, `[tokens, ceil(cols / 128)]`). Per span of 4
/// blocks and row: one 64-byte load of codes, split into low and high nibbles, each mapped by
/// `vpshufb` to offset doubled values (unsigned bytes) and multiplied into the activation codes by
/// `vpdpbusd` starting from the span's offset correction; each lane's exact integer sum (8
/// products of one block) is then scaled by its block's activation and weight scales.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI; `blocks` is `[rows, cols / 2]`, `scales`
/// `[rows, cols / 32]`, `spans` as [`super::q8::to_spans`] gives for `[tokens, cols]`, `out`
/// `[rows, tokens]`, and `cols` a multiple of 32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn matmul_mxfp4_q8(
    spans: &[Q8Span],
    tokens: usize,
    blocks: &[u8],
    scales: &[u8],
    cols: usize,
    out: &mut [f32],
) {
    // 4 rows x 2 tokens: wider tiles spill registers (measured 20 % slower at 4 x 4).
    for_each_tile!(out, tokens, TILE_ROWS, 2, Lanes, |tile, t0, R, T| {
        // SAFETY: the tile lies inside the operands by construction of `for_each_tile`.
        unsafe { tile_mxfp4_q8::<R, T>(spans, blocks, scales, cols, tile, t0, tokens, out) }
    });
}

/// `count` (at most 16) E8M0 scale bytes as f32, exactly; absent lanes are 0.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn block_scales(scales: *const u8, count: usize) -> __m512 {
    let present = ((1u32 << count) - 1) as u16;
    // SAFETY: the caller guarantees `count` readable bytes at `scales`; masked-off bytes are not
    // read (AVX-512 masked loads suppress faults). Masked loads are slow on some CPUs (Zen 4), so
    // only a partial group uses one.
    let bytes = unsafe {
        if count == 16 {
            _mm_loadu_si128(scales as *const __m128i)
        } else {
            _mm_maskz_loadu_epi8(present, scales as *const i8)
        }
    };
    let s = _mm512_cvtepu8_epi32(bytes);
    // 2^(s-127) is the exponent field s; s = 0 (2^-127, subnormal) is kept exact by a blend.
    // Absent lanes stay 0, not subnormal: multiplying by a subnormal can take a slow path.
    let zero = _mm512_mask_cmpeq_epi32_mask(present, s, _mm512_setzero_si512());
    let bits = _mm512_mask_blend_epi32(
        zero,
        _mm512_slli_epi32(s, 23),
        _mm512_set1_epi32(0x0040_0000),
    );
    _mm512_castsi512_ps(bits)
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile_mxfp4_q8<const R: usize, const T: usize>(
    spans: &[Q8Span],
    blocks: &[u8],
    scales: &[u8],
    cols: usize,
    tile: TileRows,
    t0: usize,
    tokens: usize,
    out: &mut [f32],
) {
    // Rows below each tile row to prefetch.
    let ahead = tile.ahead();
    // SAFETY: the table has 16 bytes.
    let lut = _mm512_broadcast_i32x4(unsafe {
        _mm_loadu_si128(FP4_DOUBLED_PLUS_12.as_ptr() as *const __m128i)
    });
    let nibble = _mm512_set1_epi8(0x0F);
    // Lane i of a span reads the scale of its block i / 4.
    let lane_block = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    let groups = cols / 32;
    let spans_per_row = groups.div_ceil(4);
    let mut acc = [[_mm512_setzero_ps(); T]; R];

    // Scales are loaded 16 blocks (4 spans) at a time.
    for quad in (0..groups).step_by(16) {
        let mut row_scales = [_mm512_setzero_ps(); R];
        for r in 0..R {
            prefetch(scales.as_ptr(), (tile.row(r) + ahead) * groups + quad);
            // SAFETY: blocks quad.. of tile row r have min(16, groups - quad) scales.
            row_scales[r] = unsafe {
                block_scales(
                    scales.as_ptr().add(tile.row(r) * groups + quad),
                    (groups - quad).min(16),
                )
            };
        }
        for span in quad / 4..(quad / 4 + 4).min(spans_per_row) {
            let span_blocks = (groups - span * 4).min(4);
            let code_mask = u64::MAX >> (64 - 16 * span_blocks);
            let lanes = _mm512_add_epi32(lane_block, _mm512_set1_epi32((span * 4 - quad) as i32));
            let mut low = [_mm512_setzero_si512(); R];
            let mut high = [_mm512_setzero_si512(); R];
            let mut weight_scale = [_mm512_setzero_ps(); R];
            for r in 0..R {
                let at = (tile.row(r) * groups + span * 4) * MXFP4_BLOCK_BYTES;
                prefetch(blocks.as_ptr(), at + ahead * groups * MXFP4_BLOCK_BYTES);
                // SAFETY: the span's `span_blocks` blocks of tile row r lie inside `blocks`; the
                // bytes of absent blocks are masked off and not read.
                let codes = unsafe {
                    let at = blocks.as_ptr().add(at);
                    match span_blocks {
                        4 => _mm512_loadu_si512(at as *const _),
                        2 => _mm512_zextsi256_si512(_mm256_loadu_si256(at as *const _)),
                        _ => _mm512_maskz_loadu_epi8(code_mask, at as *const i8),
                    }
                };
                low[r] = _mm512_shuffle_epi8(lut, _mm512_and_si512(codes, nibble));
                high[r] =
                    _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(codes, 4), nibble));
                weight_scale[r] = _mm512_permutexvar_ps(lanes, row_scales[r]);
            }
            for t in 0..T {
                let s = &spans[(t0 + t) * spans_per_row + span];
                // SAFETY: `Q8Span` is 64-byte aligned and its fields are 64 bytes each.
                let (even, odd, correction, half_scale) = unsafe {
                    (
                        _mm512_load_si512(s.even.as_ptr() as *const _),
                        _mm512_load_si512(s.odd.as_ptr() as *const _),
                        _mm512_load_si512(s.correction.as_ptr() as *const _),
                        _mm512_load_ps(s.half_scale.as_ptr()),
                    )
                };
                for r in 0..R {
                    let dot = _mm512_dpbusd_epi32(correction, low[r], even);
                    let dot = _mm512_dpbusd_epi32(dot, high[r], odd);
                    let partial = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), half_scale);
                    acc[r][t] = _mm512_fmadd_ps(partial, weight_scale[r], acc[r][t]);
                }
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            out[tile.row(r) * tokens + t0 + t] = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
}

/// bf16 rows × activations rounded to bf16 (the fast path): `vdpbf16ps` multiplies the 32 bf16
/// pairs of one 64-byte load of weights and of activations exactly and adds each pair's sum into
/// an f32 lane, so row-major weights and activations need no reordering.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and BF16; `x` is `[tokens, cols]` bf16 bits, `w`
/// `[rows, cols]`, `out` `[rows, tokens]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn matmul_bf16_dot(x: &[u16], tokens: usize, w: &[u16], cols: usize, out: &mut [f32]) {
    for_each_tile!(out, tokens, TILE_ROWS, 4, Rows, |tile, t0, R, T| {
        // SAFETY: the tile lies inside `w`, `x` and `out` by construction of `for_each_tile`.
        unsafe { tile_bf16_dot::<R, T>(x, w, cols, tile, t0, tokens, out) }
    });
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn tile_bf16_dot<const R: usize, const T: usize>(
    x: &[u16],
    w: &[u16],
    cols: usize,
    tile: TileRows,
    t0: usize,
    tokens: usize,
    out: &mut [f32],
) {
    // Rows below each tile row to prefetch.
    let ahead = tile.ahead();
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let full = cols / 32 * 32;
    for c in (0..full).step_by(32) {
        let mut rows = [_mm512_setzero_si512(); R];
        for r in 0..R {
            let at = tile.row(r) * cols + c;
            prefetch(w.as_ptr() as *const u8, (at + ahead * cols) * 2);
            // SAFETY: 32 weights of tile row r from column c < full <= cols.
            rows[r] = unsafe { _mm512_loadu_si512(w.as_ptr().add(at) as *const _) };
        }
        for t in 0..T {
            // SAFETY: 32 activations of token t0 + t from column c.
            let xs = unsafe { _mm512_loadu_si512(x.as_ptr().add((t0 + t) * cols + c) as *const _) };
            for r in 0..R {
                // SAFETY: `__m512bh` and `__m512i` are the same 64 bytes, read as 32 bf16.
                acc[r][t] = unsafe {
                    _mm512_dpbf16_ps(
                        acc[r][t],
                        std::mem::transmute::<__m512i, __m512bh>(rows[r]),
                        std::mem::transmute::<__m512i, __m512bh>(xs),
                    )
                };
            }
        }
    }
    for r in 0..R {
        let w_row = &w[tile.row(r) * cols..(tile.row(r) + 1) * cols];
        for t in 0..T {
            let x_row = &x[(t0 + t) * cols..(t0 + t + 1) * cols];
            let tail: f32 = x_row[full..]
                .iter()
                .zip(&w_row[full..])
                .map(|(&a, &b)| bf16_to_f32(a) * bf16_to_f32(b))
                .sum();
            out[tile.row(r) * tokens + t0 + t] = _mm512_reduce_add_ps(acc[r][t]) + tail;
        }
    }
}

/// MXFP4 rows × 8-bit activations with the tokens in vector lanes ([`TokenColumns`]), for
/// prefill: the rows are first decoded to signed doubled values (kept in L1/L2 for the whole
/// token range), then each 4-byte piece of a row is broadcast and multiplied into 16 tokens by
/// one `vpdpbusd`, so a block costs 8 of them per row and 16 tokens, plus one scaling step.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI; `blocks` is `[rows, cols / 2]`, `scales`
/// `[rows, cols / 32]`, `columns` holds `[tokens, cols]`, `out` is `[rows, tokens]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn matmul_mxfp4_q8_columns(
    columns: &TokenColumns,
    blocks: &[u8],
    scales: &[u8],
    out: &mut [f32],
) {
    let rows = out.len() / columns.tokens;
    // SAFETY: `blocks` and `scales` hold `rows` rows of `columns.blocks` blocks.
    let decoded = unsafe { decode_rows(blocks, scales, columns.blocks, rows) };
    let mut r0 = 0;
    while r0 < rows {
        // SAFETY: rows r0.. of `decoded` and `out` exist.
        if rows - r0 >= 8 {
            unsafe { columns_tile::<8>(columns, &decoded, r0, out) };
            r0 += 8;
        } else {
            unsafe { columns_tile::<1>(columns, &decoded, r0, out) };
            r0 += 1;
        }
    }
}

/// MXFP4 rows as the token-column kernel reads them: per block, 32 signed doubled values (the
/// 16 low nibbles, then the 16 high) as 8 pieces of 4 bytes, the block's weight scale, and
/// `−128 · Σ values`, which cancels the `+128` of the activations.
struct DecodedRows {
    values: Vec<[i32; 8]>,
    scales: Vec<f32>,
    corrections: Vec<i32>,
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn decode_rows(blocks: &[u8], scales: &[u8], per_row: usize, rows: usize) -> DecodedRows {
    let mut values = vec![[0i32; 8]; rows * per_row];
    let mut corrections = vec![0i32; rows * per_row];
    // SAFETY: the table has 16 bytes.
    let lut =
        _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(FP4_DOUBLED.as_ptr() as *const __m128i) });
    let nibble = _mm512_set1_epi8(0x0F);
    let bias = _mm512_set1_epi8(-128);
    // Qword indices into (low, high): block i's 16 low values, then its 16 high ones.
    let first_two = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
    let last_two = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    let even_dwords = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    let full_spans = per_row / 4;
    for row in 0..rows {
        for span in 0..full_spans {
            let at = row * per_row + span * 4;
            // The task's rows are one sequential run, which each task starts anew: loads stalled
            // here on memory (11 % of this kernel's samples in pp512). 4 KiB ahead, against none:
            // fast q8 pp512 +7-10 % (2 KiB +6 %, 8 KiB as 4; alternating builds).
            prefetch(blocks.as_ptr(), at * MXFP4_BLOCK_BYTES + 4096);
            // SAFETY: blocks at..at + 4 are 64 bytes inside `blocks`.
            let codes = unsafe {
                _mm512_loadu_si512(blocks.as_ptr().add(at * MXFP4_BLOCK_BYTES) as *const _)
            };
            let low = _mm512_shuffle_epi8(lut, _mm512_and_si512(codes, nibble));
            let high =
                _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(codes, 4), nibble));
            // SAFETY: `values[at..at + 4]` is 128 bytes.
            unsafe {
                let dst = values.as_mut_ptr().add(at) as *mut __m512i;
                _mm512_storeu_si512(dst, _mm512_permutex2var_epi64(low, first_two, high));
                _mm512_storeu_si512(dst.add(1), _mm512_permutex2var_epi64(low, last_two, high));
            }
            // Block sums: |low + high| <= 24, so +128 makes them unsigned bytes for vpsadbw,
            // which sums each 8; adding the swapped qword gives each block's 16 in both.
            let pairs = _mm512_xor_si512(_mm512_add_epi8(low, high), bias);
            let sums = _mm512_sad_epu8(pairs, _mm512_setzero_si512());
            let sums = _mm512_add_epi64(sums, _mm512_shuffle_epi32(sums, _MM_PERM_BADC));
            let per_block = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(
                _mm512_cvtepi64_epi32(sums),
                even_dwords,
            ));
            // Σ values = sum − 16 · 128; the correction is −128 · Σ values.
            let correction = _mm_slli_epi32(_mm_sub_epi32(_mm_set1_epi32(16 * 128), per_block), 7);
            // SAFETY: `corrections[at..at + 4]` is 16 bytes.
            unsafe { _mm_storeu_si128(corrections.as_mut_ptr().add(at) as *mut _, correction) };
        }
        for b in full_spans * 4..per_row {
            let at = row * per_row + b;
            let codes = &blocks[at * MXFP4_BLOCK_BYTES..(at + 1) * MXFP4_BLOCK_BYTES];
            let mut block = [0i8; 32];
            for (j, &byte) in codes.iter().enumerate() {
                block[j] = FP4_DOUBLED[(byte & 0x0F) as usize];
                block[16 + j] = FP4_DOUBLED[(byte >> 4) as usize];
            }
            for (piece, bytes) in values[at].iter_mut().zip(block.chunks_exact(4)) {
                *piece = i32::from_le_bytes([
                    bytes[0] as u8,
                    bytes[1] as u8,
                    bytes[2] as u8,
                    bytes[3] as u8,
                ]);
            }
            corrections[at] = -128 * block.iter().map(|&v| v as i32).sum::<i32>();
        }
    }
    DecodedRows {
        values,
        scales: scales[..rows * per_row]
            .iter()
            .map(|&s| e8m0_to_f32(s))
            .collect(),
        corrections,
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn columns_tile<const R: usize>(
    columns: &TokenColumns,
    decoded: &DecodedRows,
    r0: usize,
    out: &mut [f32],
) {
    let (tokens, per_row) = (columns.tokens, columns.blocks);
    for group in 0..tokens.div_ceil(GROUP_TOKENS) {
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..per_row {
            let at = (group * per_row + b) * 8 * GROUP_TOKENS;
            let mut pieces = [_mm512_setzero_si512(); 8];
            for (k, piece) in pieces.iter_mut().enumerate() {
                // SAFETY: piece k of block b holds 16 tokens × 4 bytes.
                *piece = unsafe {
                    _mm512_loadu_si512(
                        columns.pieces.as_ptr().add(at + k * GROUP_TOKENS) as *const _
                    )
                };
            }
            // SAFETY: 16 half scales of this group and block.
            let half_scale = unsafe {
                _mm512_loadu_ps(
                    columns
                        .half_scales
                        .as_ptr()
                        .add((group * per_row + b) * GROUP_TOKENS),
                )
            };
            for r in 0..R {
                let at = (r0 + r) * per_row + b;
                let values = &decoded.values[at];
                let mut dot = _mm512_set1_epi32(decoded.corrections[at]);
                for (&piece, &weights) in pieces.iter().zip(values) {
                    dot = _mm512_dpbusd_epi32(dot, piece, _mm512_set1_epi32(weights));
                }
                let scale = _mm512_mul_ps(half_scale, _mm512_set1_ps(decoded.scales[at]));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
            }
        }
        let first = group * GROUP_TOKENS;
        let valid = (tokens - first).min(GROUP_TOKENS);
        for r in 0..R {
            let mut lanes = [0f32; GROUP_TOKENS];
            // SAFETY: `lanes` is 64 bytes.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc[r]) };
            let row = (r0 + r) * tokens + first;
            out[row..row + valid].copy_from_slice(&lanes[..valid]);
        }
    }
}

/// 8-bit weight rows (`dense="q8"`: codes stored `+ 128` in the grouped order of
/// [`super::q8::grouped_offset`], one bf16 scale per 32) × 8-bit activations ([`Q8Group`]s). Per
/// group of up to 16 blocks and row: 8 loads and 8 `vpdpbusd` into one accumulator whose lane `i`
/// is block `i`'s exact integer sum (started from the offset correction), then one conversion
/// and one multiply-add by both scales. Applying the scales per 64-byte load instead streamed
/// 7-12 % slower (the two kernels alternating): the extra instructions left fewer loads in flight.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI; `codes` is `[rows, cols]`, `scales`
/// `[rows, cols / 32]`, `groups` as [`super::q8::to_groups`] gives for `[tokens, cols]`, `out`
/// `[rows, tokens]`, and `cols` a multiple of 32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn matmul_q8_q8(
    groups: &[Q8Group],
    tokens: usize,
    codes: &[u8],
    scales: &[u16],
    cols: usize,
    out: &mut [f32],
) {
    // 4 rows x 2 tokens, as the 8-bit MXFP4 kernel.
    for_each_tile!(out, tokens, TILE_ROWS, 2, Rows, |tile, t0, R, T| {
        // SAFETY: the tile lies inside the operands by construction of `for_each_tile`.
        unsafe { tile_q8_q8::<R, T>(groups, codes, scales, cols, tile, t0, tokens, out) }
    });
}

/// `4 · lanes` bytes at `at` (`lanes` one of 16, 8, 4, 2, 1) in the low 32-bit lanes of a
/// vector, the others zero. Whole loads of each size: masked loads are slow on Zen 4.
///
/// # Safety
/// `4 · lanes` bytes at `at` must be readable.
#[inline(always)]
unsafe fn load_lanes(at: *const u8, lanes: usize) -> __m512i {
    debug_assert!(matches!(lanes, 1 | 2 | 4 | 8 | 16));
    // SAFETY: each arm reads exactly `4 · lanes` bytes, unaligned.
    unsafe {
        match lanes {
            16 => _mm512_loadu_si512(at as *const _),
            8 => _mm512_zextsi256_si512(_mm256_loadu_si256(at as *const _)),
            4 => _mm512_zextsi128_si512(_mm_loadu_si128(at as *const _)),
            2 => _mm512_zextsi128_si512(_mm_loadl_epi64(at as *const _)),
            _ => _mm512_zextsi128_si512(_mm_cvtsi32_si128((at as *const i32).read_unaligned())),
        }
    }
}

/// `lanes` bf16 scales at `at` (`lanes` one of 16, 8, 4, 2, 1) as f32 in the low lanes of a
/// vector, the others zero.
///
/// # Safety
/// `lanes` values at `at` must be readable.
#[inline(always)]
unsafe fn load_bf16_lanes(at: *const u16, lanes: usize) -> __m512 {
    // SAFETY: both arms read exactly `2 · lanes` bytes.
    let bits = unsafe {
        match lanes {
            1 => _mm256_zextsi128_si256(_mm_cvtsi32_si128(at.read_unaligned() as i32)),
            _ => _mm512_castsi512_si256(load_lanes(at as *const u8, lanes / 2)),
        }
    };
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile_q8_q8<const R: usize, const T: usize>(
    groups: &[Q8Group],
    codes: &[u8],
    scales: &[u16],
    cols: usize,
    tile: TileRows,
    t0: usize,
    tokens: usize,
    out: &mut [f32],
) {
    // Rows below each tile row to prefetch.
    let ahead = tile.ahead();
    let blocks = cols / 32;
    let groups_per_row = weight_groups(blocks).count();
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    for (g, (first, size)) in weight_groups(blocks).enumerate() {
        let x = |t: usize| &groups[(t0 + t) * groups_per_row + g];
        let mut dot = [[_mm512_setzero_si512(); T]; R];
        for t in 0..T {
            // SAFETY: `Q8Group` is 64-byte aligned and its fields are multiples of 64 bytes.
            let correction = unsafe { _mm512_load_si512(x(t).correction.as_ptr() as *const _) };
            for r in 0..R {
                dot[r][t] = correction;
            }
        }
        for step in 0..8 {
            let mut weights = [_mm512_setzero_si512(); R];
            for r in 0..R {
                let at = tile.row(r) * cols + first * 32 + 4 * size * step;
                prefetch(codes.as_ptr(), at + ahead * cols);
                // SAFETY: step `step` of the group, `4 · size` codes of tile row r, lies inside
                // `codes`.
                weights[r] = unsafe { load_lanes(codes.as_ptr().add(at), size) };
            }
            for t in 0..T {
                // SAFETY: as above.
                let xs = unsafe { _mm512_load_si512(x(t).steps[step].as_ptr() as *const _) };
                for r in 0..R {
                    dot[r][t] = _mm512_dpbusd_epi32(dot[r][t], weights[r], xs);
                }
            }
        }
        let mut weight_scale = [_mm512_setzero_ps(); R];
        for r in 0..R {
            let at = (tile.row(r) + ahead) * blocks + first;
            prefetch(scales.as_ptr() as *const u8, 2 * at);
            // SAFETY: the group's `size` scales of tile row r lie inside `scales`.
            weight_scale[r] =
                unsafe { load_bf16_lanes(scales.as_ptr().add(tile.row(r) * blocks + first), size) };
        }
        for t in 0..T {
            // SAFETY: as above.
            let x_scale = unsafe { _mm512_load_ps(x(t).scale.as_ptr()) };
            for r in 0..R {
                let partial = _mm512_mul_ps(_mm512_cvtepi32_ps(dot[r][t]), x_scale);
                acc[r][t] = _mm512_fmadd_ps(partial, weight_scale[r], acc[r][t]);
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            out[tile.row(r) * tokens + t0 + t] = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
}

/// [`super::q8::quantize_bf16_weights`] compiled for 16-lane vectors (its codes and scales
/// exactly).
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn quantize_bf16_weights(bits: &[u16], codes: &mut [u8], scales: &mut [u16]) {
    super::q8::quantize_bf16_weights(bits, codes, scales)
}

/// [`super::q8::quantize`] compiled for 16-lane vectors (its codes exactly): a decoded token
/// quantizes some 20 000 activations a layer, serially, between parallel products.
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn quantize_activations(x: &[f32]) -> Q8Activations {
    super::q8::quantize(x)
}

/// [`super::swiglu_plain`] compiled for 16-lane vectors (its results exactly).
///
/// # Safety
/// The CPU must support AVX-512 F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn swiglu(h: &[f32], limit: f32) -> Vec<f32> {
    super::swiglu_plain(h, limit)
}

/// The parts of [`super::panels::matmul_broadcast`]: panels of 32 rows (two vectors), tiles of
/// up to 12 tokens (24 accumulators, 2 panel vectors and a broadcast value in 32 registers).
pub struct Panels;

impl PanelKernels for Panels {
    type Activation = f32;
    type Value = f32;
    const COLUMNS_PER_VALUE: usize = 1;
    const PANEL_ROWS: usize = PANEL_ROWS;
    const TILE_TOKENS: usize = 12;

    unsafe fn decode(
        weights: PanelSource,
        cols: usize,
        k0: usize,
        width: usize,
        panel: &mut [f32],
    ) {
        // SAFETY: the caller guarantees the CPU's support.
        unsafe {
            match weights {
                PanelSource::Bf16(w) => decode_bf16_panel(w, cols, k0, width, panel),
                PanelSource::Mxfp4 { blocks, scales } => {
                    decode_mxfp4_panel(blocks, scales, cols, k0, width, panel)
                }
            }
        }
    }

    unsafe fn tile(tokens: usize, tile: BroadcastTile<f32, f32>) {
        // SAFETY: as above.
        tile_tokens!(tokens, T, [1 2 3 4 5 6 7 8 9 10 11 12], unsafe {
            exact_tile::<T>(tile)
        })
    }
}

impl LaneProduct for Panels {
    #[inline(always)]
    unsafe fn activation_bits(x: *const f32) -> i32 {
        // SAFETY: the caller guarantees `x` is readable.
        unsafe { x.read() }.to_bits() as i32
    }

    #[inline(always)]
    unsafe fn multiply_add(acc: __m512, weights: __m512i, activations: __m512i) -> __m512 {
        _mm512_fmadd_ps(
            _mm512_castsi512_ps(weights),
            _mm512_castsi512_ps(activations),
            acc,
        )
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn exact_tile<const T: usize>(tile: BroadcastTile<f32, f32>) {
    // SAFETY: the caller guarantees the CPU's support.
    unsafe { broadcast_tile::<T, Panels>(tile) }
}

/// The fast path's parts of [`super::panels::matmul_broadcast`] for bf16 weights (AVX-512
/// BF16): panel entries are the weights of two adjacent columns, which `vdpbf16ps` multiplies
/// into the two activations (rounded to bf16), adding both products into an f32 lane. Each
/// product of two bf16 is exact in f32, but the instruction treats subnormal inputs as zero and
/// flushes subnormal results. Panels of 32 rows, tiles of up to 12 tokens.
pub struct Bf16Pairs;

impl PanelKernels for Bf16Pairs {
    type Activation = u16;
    type Value = u32;
    const COLUMNS_PER_VALUE: usize = 2;
    const PANEL_ROWS: usize = PANEL_ROWS;
    const TILE_TOKENS: usize = 12;

    unsafe fn decode(
        weights: PanelSource,
        cols: usize,
        k0: usize,
        width: usize,
        panel: &mut [u32],
    ) {
        match weights {
            // SAFETY: the caller guarantees the CPU's support.
            PanelSource::Bf16(w) => unsafe { decode_bf16_pairs(w, cols, k0, width, panel) },
            PanelSource::Mxfp4 { .. } => unreachable!("bf16 pairs are decoded from bf16 weights"),
        }
    }

    unsafe fn tile(tokens: usize, tile: BroadcastTile<u16, u32>) {
        // SAFETY: as above.
        tile_tokens!(tokens, T, [1 2 3 4 5 6 7 8 9 10 11 12], unsafe {
            pairs_tile::<T>(tile)
        })
    }
}

impl LaneProduct for Bf16Pairs {
    #[inline(always)]
    unsafe fn activation_bits(x: *const u16) -> i32 {
        // SAFETY: the caller guarantees that the two values at `x` are readable.
        unsafe { (x as *const i32).read_unaligned() }
    }

    #[inline(always)]
    unsafe fn multiply_add(acc: __m512, weights: __m512i, activations: __m512i) -> __m512 {
        // SAFETY: `__m512bh` and `__m512i` are the same 64 bytes, read as 32 bf16.
        unsafe {
            _mm512_dpbf16_ps(
                acc,
                std::mem::transmute::<__m512i, __m512bh>(weights),
                std::mem::transmute::<__m512i, __m512bh>(activations),
            )
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pairs_tile<const T: usize>(tile: BroadcastTile<u16, u32>) {
    // SAFETY: the caller guarantees the CPU's support.
    unsafe { broadcast_tile::<T, Bf16Pairs>(tile) }
}

/// How a broadcast tile multiplies one panel entry per row (a 32-bit lane) into its
/// accumulators.
trait LaneProduct: PanelKernels {
    /// The activations of one token that multiply a panel entry, as a 32-bit lane.
    ///
    /// # Safety
    /// `COLUMNS_PER_VALUE` activations at `x` must be readable.
    unsafe fn activation_bits(x: *const Self::Activation) -> i32;

    /// `acc` plus the products of `weights` and `activations`, lane by lane.
    ///
    /// # Safety
    /// The CPU must support the kernels' instruction set.
    unsafe fn multiply_add(acc: __m512, weights: __m512i, activations: __m512i) -> __m512;
}

const PANEL_ROWS: usize = 32;

/// Vectors of rows in a panel.
const PANEL_VECTORS: usize = PANEL_ROWS / 16;

/// One tile of `T` tokens, inlined into each kernel family's `#[target_feature]` function.
///
/// # Safety
/// The CPU must support `P`'s instruction set.
#[inline(always)]
unsafe fn broadcast_tile<const T: usize, P: LaneProduct>(
    tile: BroadcastTile<P::Activation, P::Value>,
) {
    let entries = tile.panel.len() / PANEL_ROWS;
    let width = entries * P::COLUMNS_PER_VALUE;
    assert!(tile.x.len() >= (T - 1) * tile.cols + width);
    assert!(tile.out.len() >= (T - 1) * tile.out_stride + tile.rows);
    // SAFETY (every intrinsic below): the caller guarantees the CPU's support.
    let masks: [__mmask16; PANEL_VECTORS] =
        std::array::from_fn(|v| lane_mask(tile.rows.saturating_sub(16 * v)));
    let mut acc = [[unsafe { _mm512_setzero_ps() }; PANEL_VECTORS]; T];
    if tile.accumulate {
        for (t, acc) in acc.iter_mut().enumerate() {
            let at = tile.out.as_ptr().wrapping_add(t * tile.out_stride);
            for (v, acc) in acc.iter_mut().enumerate() {
                // SAFETY: the masks select the tile's rows of token t, inside `out` (asserted).
                *acc = unsafe { _mm512_maskz_loadu_ps(masks[v], at.wrapping_add(16 * v)) };
            }
        }
    }
    let x = tile.x.as_ptr();
    let panel = tile.panel.as_ptr();
    for j in 0..entries {
        // SAFETY: entry j of the panel is PANEL_ROWS values inside it.
        let w: [__m512i; PANEL_VECTORS] = std::array::from_fn(|v| unsafe {
            _mm512_loadu_si512(panel.add(j * PANEL_ROWS + 16 * v) as *const _)
        });
        for (t, acc) in acc.iter_mut().enumerate() {
            // SAFETY: the activations of entry j of token t lie inside `x` (asserted).
            let xv = unsafe {
                _mm512_set1_epi32(P::activation_bits(
                    x.add(t * tile.cols + j * P::COLUMNS_PER_VALUE),
                ))
            };
            for (acc, &w) in acc.iter_mut().zip(&w) {
                *acc = unsafe { P::multiply_add(*acc, w, xv) };
            }
        }
    }
    for (t, acc) in acc.iter().enumerate() {
        let at = tile.out.as_mut_ptr().wrapping_add(t * tile.out_stride);
        for (v, &acc) in acc.iter().enumerate() {
            // SAFETY: as for the loads.
            unsafe { _mm512_mask_storeu_ps(at.wrapping_add(16 * v), masks[v], acc) };
        }
    }
}

/// The low `lanes` (at most 16) lanes of a vector.
fn lane_mask(lanes: usize) -> __mmask16 {
    if lanes >= 16 {
        0xFFFF
    } else {
        (1u16 << lanes) - 1
    }
}

/// Lane `j` of vector `i` becomes lane `i` of vector `j` (32-bit lanes).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn transpose_16x16(v: [__m512i; 16]) -> [__m512i; 16] {
    let v = v.map(|v| _mm512_castsi512_ps(v));
    // Pairs of rows interleaved: per 128-bit lane L, (2i, 4L), (2i + 1, 4L), (2i, 4L + 1), ...
    let mut pairs = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        pairs[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
        pairs[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    }
    // quads[4g + m], lane L: rows 4g..4g + 4 of column 4L + m.
    let mut quads = [_mm512_setzero_ps(); 16];
    for g in 0..4 {
        let (a, b) = (4 * g, 4 * g + 2);
        for h in 0..2 {
            let (lo, hi) = (
                _mm512_castps_pd(pairs[a + h]),
                _mm512_castps_pd(pairs[b + h]),
            );
            quads[a + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo, hi));
            quads[a + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo, hi));
        }
    }
    // Column 4L + m gathers lane L of quads[4g + m] for g = 0..4: a 4 × 4 transpose of 128-bit
    // lanes, in two rounds of shuffles.
    let mut out = [_mm512_setzero_ps(); 16];
    for m in 0..4 {
        let q = |g: usize| quads[4 * g + m];
        let even01 = _mm512_shuffle_f32x4::<0x88>(q(0), q(1));
        let odd01 = _mm512_shuffle_f32x4::<0xDD>(q(0), q(1));
        let even23 = _mm512_shuffle_f32x4::<0x88>(q(2), q(3));
        let odd23 = _mm512_shuffle_f32x4::<0xDD>(q(2), q(3));
        out[m] = _mm512_shuffle_f32x4::<0x88>(even01, even23);
        out[8 + m] = _mm512_shuffle_f32x4::<0xDD>(even01, even23);
        out[4 + m] = _mm512_shuffle_f32x4::<0x88>(odd01, odd23);
        out[12 + m] = _mm512_shuffle_f32x4::<0xDD>(odd01, odd23);
    }
    out.map(|v| _mm512_castps_si512(v))
}

/// The first `lanes` 32-bit lanes (4, 8, 12 or 16) of up to 16 rows `stride` bytes apart from
/// `at`, one vector per row (zeros for rows past `rows`), transposed: vector `i` holds lane `i`
/// of every row.
///
/// # Safety
/// `4 · lanes` bytes from `at + r · stride` must be readable for each `r < rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn load_transposed(
    at: *const u8,
    stride: usize,
    rows: usize,
    lanes: usize,
) -> [__m512i; 16] {
    let mask = lane_mask(lanes);
    let mut v = [_mm512_setzero_si512(); 16];
    for (r, v) in v.iter_mut().enumerate().take(rows) {
        let row = at.wrapping_add(r * stride);
        // SAFETY: the caller guarantees these bytes are readable. Whole loads where they can
        // be: masked ones are slow on Zen 4.
        *v = unsafe {
            match lanes {
                16 | 8 | 4 => load_lanes(row, lanes),
                _ => _mm512_maskz_loadu_epi32(mask, row as *const _),
            }
        };
    }
    transpose_16x16(v)
}

/// Stores a vector of 16 rows of panel column `column`, rows `16 · half..`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn store_column(panel: &mut [f32], column: usize, half: usize, values: __m512) {
    let at = column * PANEL_ROWS + half * 16;
    let dst = &mut panel[at..at + 16];
    // SAFETY: `dst` is 16 floats.
    unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), values) };
}

/// Columns `k0..k0 + width` of up to [`PANEL_ROWS`] bf16 rows (`w`, `[rows, cols]`) into
/// `panel` (`[width, PANEL_ROWS]`), zeros below the last row.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn decode_bf16_panel(w: &[u16], cols: usize, k0: usize, width: usize, panel: &mut [f32]) {
    let high_half = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    bf16_pairs(w, cols, k0, width, |i, half, pair| {
        let even = _mm512_slli_epi32::<16>(pair);
        store_column(panel, 2 * i, half, _mm512_castsi512_ps(even));
        if 2 * i + 1 < width {
            let odd = _mm512_and_si512(pair, high_half);
            store_column(panel, 2 * i + 1, half, _mm512_castsi512_ps(odd));
        }
    });
}

/// [`Bf16Pairs`]' decoder: the pairs of [`bf16_pairs`] are the panel's entries as they are.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn decode_bf16_pairs(w: &[u16], cols: usize, k0: usize, width: usize, panel: &mut [u32]) {
    bf16_pairs(w, cols, k0, width, |i, half, pair| {
        let at = i * PANEL_ROWS + half * 16;
        let dst = &mut panel[at..at + 16];
        // SAFETY: `dst` is 16 lanes.
        unsafe { _mm512_storeu_si512(dst.as_mut_ptr() as *mut _, pair) };
    });
}

/// Columns `k0..k0 + width` of up to [`PANEL_ROWS`] bf16 rows (`w`, `[rows, cols]`) as 32-bit
/// pairs of adjacent columns: `pair(i, half, v)` gets, for the rows `16 · half..` (zeros past
/// the last), columns `k0 + 2i` (low halves) and `k0 + 2i + 1` (high halves, zero past
/// `width`). Per 16 rows and 32 columns, one transpose; a last part of fewer than 32 columns is
/// gathered value by value.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn bf16_pairs(
    w: &[u16],
    cols: usize,
    k0: usize,
    width: usize,
    mut pair: impl FnMut(usize, usize, __m512i),
) {
    let rows = w.len() / cols;
    assert!(rows <= PANEL_ROWS && k0 + width <= cols);
    let full = width / 32 * 32;
    for half in 0..PANEL_VECTORS {
        let first = half * 16;
        let count = rows.saturating_sub(first).min(16);
        if count == 0 {
            // No rows here: the panel's zeros stay (and no address past the rows is formed).
            break;
        }
        for c in (0..full).step_by(32) {
            let at = first * cols + k0 + c;
            for r in 0..count {
                // The same columns of the next block, read after this block's products.
                prefetch(w.as_ptr() as *const u8, 2 * (at + r * cols + PANEL_COLS));
            }
            // SAFETY: 32 values of each of the `count` rows from column k0 + c (asserted).
            let pairs =
                unsafe { load_transposed(w.as_ptr().add(at) as *const u8, 2 * cols, count, 16) };
            for (i, v) in pairs.into_iter().enumerate() {
                pair(c / 2 + i, half, v);
            }
        }
        for c in (full..width).step_by(2) {
            let mut lanes = [0u32; 16];
            for (r, lane) in lanes.iter_mut().enumerate().take(count) {
                let at = (first + r) * cols + k0 + c;
                let high = if c + 1 < width { w[at + 1] } else { 0 };
                *lane = u32::from(w[at]) | u32::from(high) << 16;
            }
            // SAFETY: `lanes` is 64 bytes.
            pair(c / 2, half, unsafe {
                _mm512_loadu_si512(lanes.as_ptr() as *const _)
            });
        }
    }
}

/// As [`decode_bf16_panel`] for MXFP4 rows (`blocks` `[rows, cols / 2]`, `scales`
/// `[rows, cols / 32]`; `k0` and `width` multiples of 32). Per 16 rows, one transpose of the
/// 32-bit lanes of their codes: nibble n of lane i is column 8i + n (SPEC §3.3), so each shift
/// and `vpermps` decodes one column of 16 rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn decode_mxfp4_panel(
    blocks: &[u8],
    scales: &[u8],
    cols: usize,
    k0: usize,
    width: usize,
    panel: &mut [f32],
) {
    let groups = cols / 32;
    let rows = scales.len() / groups;
    // SAFETY: FP4_VALUES has 16 f32.
    let lut = unsafe { _mm512_loadu_ps(FP4_VALUES.as_ptr()) };
    // Spans of up to 4 blocks: 64 bytes of each row.
    for g0 in (k0 / 32..(k0 + width) / 32).step_by(4) {
        let block_count = ((k0 + width) / 32 - g0).min(4);
        for half in 0..PANEL_VECTORS {
            let first = half * 16;
            let count = rows.saturating_sub(first).min(16);
            if count == 0 {
                // As for bf16.
                break;
            }
            // Each row's scale bytes of these blocks, packed in one 32-bit lane per row.
            let mut row_scales = [0u32; 16];
            for (r, packed) in row_scales.iter_mut().enumerate().take(count) {
                let at = (first + r) * groups + g0;
                for (b, &scale) in scales[at..at + block_count].iter().enumerate() {
                    *packed |= (scale as u32) << (8 * b);
                }
                // As for bf16: the same span of the next block of columns, codes and scales.
                let ahead = PANEL_COLS / 32;
                prefetch(blocks.as_ptr(), (at + ahead) * MXFP4_BLOCK_BYTES);
                prefetch(scales.as_ptr(), at + ahead);
            }
            // SAFETY: 64 bytes.
            let row_scales = unsafe { _mm512_loadu_si512(row_scales.as_ptr() as *const _) };
            let at = (first * groups + g0) * MXFP4_BLOCK_BYTES;
            let lanes = block_count * MXFP4_BLOCK_BYTES / 4;
            // SAFETY: `block_count` blocks of each of the `count` rows from block g0.
            let codes = unsafe {
                load_transposed(
                    blocks.as_ptr().add(at),
                    groups * MXFP4_BLOCK_BYTES,
                    count,
                    lanes,
                )
            };
            let first_column = g0 * 32 - k0;
            for (i, &codes) in codes.iter().enumerate().take(lanes) {
                let scale = e8m0_lanes(_mm512_and_si512(
                    _mm512_srlv_epi32(row_scales, _mm512_set1_epi32(8 * (i / 4) as i32)),
                    _mm512_set1_epi32(0xFF),
                ));
                let mut codes = codes;
                for n in 0..8 {
                    let values = _mm512_mul_ps(_mm512_permutexvar_ps(codes, lut), scale);
                    store_column(panel, first_column + 8 * i + n, half, values);
                    codes = _mm512_srli_epi32::<4>(codes);
                }
            }
        }
    }
}

/// E8M0 scale bytes (one per 32-bit lane) as f32 2^(s − 127), exactly: the exponent field s;
/// 0 is the subnormal 2^−127, kept by a blend.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn e8m0_lanes(s: __m512i) -> __m512 {
    let zero = _mm512_cmpeq_epi32_mask(s, _mm512_setzero_si512());
    let bits = _mm512_mask_blend_epi32(
        zero,
        _mm512_slli_epi32(s, 23),
        _mm512_set1_epi32(0x0040_0000),
    );
    _mm512_castsi512_ps(bits)
}
