//! AVX2 + FMA kernels, for x86-64 CPUs without AVX-512. Same register tiling as `avx512.rs` with
//! 8-lane vectors.

// Tiles index accumulators by (row, token); iterator chains would obscure the register tile.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::panels::{tile_tokens, BroadcastTile, PanelKernels, PanelSource, PANEL_COLS};
use super::q8::{weight_groups, Q8Activations, Q8Group, Q8Span, FP4_DOUBLED_PLUS_12};
use super::DecodeOrder::{Lanes, Rows};
use super::{for_each_tile, prefetch, TileRows, MXFP4_BLOCK_BYTES, TILE_ROWS};

/// `out[r * tokens + t] = Σ_c x[t, c] · w[r, c]`, with `x` in [`super::unpack_order`] for 16-wide
/// blocks (see the AVX-512 kernel).
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x` is `[tokens, cols]`, `w` is `[rows, cols]`, `out` is
/// `[rows, tokens]`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn matmul_bf16(x: &[f32], tokens: usize, w: &[u16], cols: usize, out: &mut [f32]) {
    for_each_tile!(out, tokens, TILE_ROWS, 4, Lanes, |tile, t0, R, T| {
        // SAFETY: the tile lies inside the operands by construction of `for_each_tile`.
        unsafe { tile_bf16::<R, T>(x, w, cols, tile, t0, tokens, out) }
    });
}

#[target_feature(enable = "avx2,fma")]
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
    let zero = _mm256_setzero_si256();
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let full = cols / 16 * 16;
    for c in (0..full).step_by(16) {
        let mut low = [_mm256_setzero_ps(); R];
        let mut high = [_mm256_setzero_ps(); R];
        for r in 0..R {
            let at = tile.row(r) * cols + c;
            prefetch(w.as_ptr() as *const u8, (at + ahead * cols) * 2);
            // SAFETY: 16 weights of tile row r from column c < full <= cols.
            let bits = unsafe { _mm256_loadu_si256(w.as_ptr().add(at) as *const __m256i) };
            low[r] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, bits));
            high[r] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, bits));
        }
        for t in 0..T {
            let base = (t0 + t) * cols + c;
            // SAFETY: 16 activations of token t0 + t from column c.
            let (xl, xh) = unsafe {
                (
                    _mm256_loadu_ps(x.as_ptr().add(base)),
                    _mm256_loadu_ps(x.as_ptr().add(base + 8)),
                )
            };
            for r in 0..R {
                acc[r][t] = _mm256_fmadd_ps(low[r], xl, acc[r][t]);
                acc[r][t] = _mm256_fmadd_ps(high[r], xh, acc[r][t]);
            }
        }
    }
    for r in 0..R {
        let w_row = &w[tile.row(r) * cols..(tile.row(r) + 1) * cols];
        for t in 0..T {
            // The ragged tail is left in natural order by `unpack_order`.
            let x_row = &x[(t0 + t) * cols..(t0 + t + 1) * cols];
            let tail = super::scalar::dot_bf16(&x_row[full..], &w_row[full..]);
            out[tile.row(r) * tokens + t0 + t] = horizontal_sum(acc[r][t]) + tail;
        }
    }
}

#[target_feature(enable = "avx2,fma")]
fn horizontal_sum(v: __m256) -> f32 {
    let pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let pair = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
    _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)))
}

/// FP4 E2M1 codes → value × 2 as int8 (exact integers), for `pshufb`; the ½ goes into the scale.
const FP4_TIMES_TWO: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// MXFP4 rows × activations, `x` de-interleaved per 32-input block as for the AVX-512 kernel.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `blocks` is `[rows, cols / 2]`, `scales` `[rows, cols / 32]`,
/// `x` `[tokens, cols]`, `out` `[rows, tokens]`, and `cols` a multiple of 32.
#[target_feature(enable = "avx2,fma")]
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
#[target_feature(enable = "avx2,fma")]
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
    // SAFETY: the table is 16 bytes.
    let lut = unsafe { _mm_loadu_si128(FP4_TIMES_TWO.as_ptr() as *const __m128i) };
    let mask = _mm_set1_epi8(0x0F);
    let groups = cols / 32;
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for g in 0..groups {
        // Per row: the 16 even then 16 odd weights of block g, as 4 vectors of 8.
        let mut wv = [[_mm256_setzero_ps(); 4]; R];
        let mut scale = [_mm256_setzero_ps(); R];
        for (r, wr) in wv.iter_mut().enumerate() {
            let row = tile.row(r);
            let at = (row * groups + g) * MXFP4_BLOCK_BYTES;
            if g % 4 == 0 {
                prefetch(blocks.as_ptr(), at + ahead * groups * MXFP4_BLOCK_BYTES);
            }
            // SAFETY: block g of `row` is 16 bytes inside `blocks`.
            let bytes = unsafe { _mm_loadu_si128(blocks.as_ptr().add(at) as *const __m128i) };
            let even = _mm_shuffle_epi8(lut, _mm_and_si128(bytes, mask));
            let odd = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(bytes, 4), mask));
            scale[r] = _mm256_set1_ps(0.5 * super::scalar::e8m0_to_f32(scales[row * groups + g]));
            let widen = |v: __m128i| {
                let w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
                // Scale once for every token; one token scales its block sum instead.
                if T > 1 {
                    _mm256_mul_ps(w, scale[r])
                } else {
                    w
                }
            };
            *wr = [
                widen(even),
                widen(_mm_srli_si128(even, 8)),
                widen(odd),
                widen(_mm_srli_si128(odd, 8)),
            ];
        }
        let mut sums = [_mm256_setzero_ps(); R];
        for t in 0..T {
            let base = (t0 + t) * cols + g * 32;
            for (q, offset) in [0, 8, 16, 24].into_iter().enumerate() {
                // SAFETY: 8 of the 32 activations of block g of token t0 + t.
                let xv = unsafe { _mm256_loadu_ps(x.as_ptr().add(base + offset)) };
                for r in 0..R {
                    if T > 1 {
                        acc[r][t] = _mm256_fmadd_ps(wv[r][q], xv, acc[r][t]);
                    } else {
                        sums[r] = _mm256_fmadd_ps(wv[r][q], xv, sums[r]);
                    }
                }
            }
        }
        if T == 1 {
            for r in 0..R {
                acc[r][0] = _mm256_fmadd_ps(sums[r], scale[r], acc[r][0]);
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            out[tile.row(r) * tokens + t0 + t] = horizontal_sum(acc[r][t]);
        }
    }
}

/// MXFP4 rows × 8-bit activations ([`Q8Span`]s, as for the AVX-512 kernel). A span's 4 blocks are
/// read as two 32-byte halves (blocks 0-1 and 2-3); each half's nibbles map to offset doubled values
/// (unsigned bytes), `vpmaddubsw` multiplies them into the activation codes and `vpmaddwd` by ones
/// sums each 32-bit lane; 16-bit sums of both nibbles' pairs are at most 4 · 24 · 127, so all exact.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `blocks` is `[rows, cols / 2]`, `scales` `[rows, cols / 32]`,
/// `spans` as [`super::q8::to_spans`] gives for `[tokens, cols]`, `out` `[rows, tokens]`, and
/// `cols` a multiple of 32.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn matmul_mxfp4_q8(
    spans: &[Q8Span],
    tokens: usize,
    blocks: &[u8],
    scales: &[u8],
    cols: usize,
    out: &mut [f32],
) {
    for_each_tile!(out, tokens, |tile, t0, R, T| {
        // SAFETY: the tile lies inside the operands by construction of `for_each_tile`.
        unsafe { tile_mxfp4_q8::<R, T>(spans, blocks, scales, cols, tile, t0, tokens, out) }
    });
}

/// The first `count` (1 to 8) of `scales` as f32 lanes, exactly; absent lanes are 0.
#[target_feature(enable = "avx2,fma")]
fn block_scales(scales: &[u8], count: usize) -> __m256 {
    // Byte by byte only for a row's last, partial octet: a variable-length copy would be a call,
    // which spills every vector register.
    let bytes = match scales.first_chunk::<8>() {
        Some(&all) if count == 8 => u64::from_le_bytes(all),
        _ => scales[..count]
            .iter()
            .rev()
            .fold(0, |v, &b| v << 8 | u64::from(b)),
    };
    let s = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes as i64));
    // 2^(s-127) is the exponent field s; s = 0 (2^-127, subnormal) is kept exact by a blend.
    // Absent lanes stay 0, not subnormal: multiplying by a subnormal can take a slow path.
    let present = _mm256_cmpgt_epi32(
        _mm256_set1_epi32(count as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    );
    let subnormal = _mm256_and_si256(present, _mm256_set1_epi32(0x0040_0000));
    let bits = _mm256_blendv_epi8(
        _mm256_slli_epi32(s, 23),
        subnormal,
        _mm256_cmpeq_epi32(s, _mm256_setzero_si256()),
    );
    _mm256_castsi256_ps(bits)
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
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
    let lut = _mm256_broadcastsi128_si256(unsafe {
        _mm_loadu_si128(FP4_DOUBLED_PLUS_12.as_ptr() as *const __m128i)
    });
    let nibble = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    // Lane i of a half reads the scale of its block i / 4.
    let lane_block = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    let groups = cols / 32;
    let spans_per_row = groups.div_ceil(4);
    let mut acc = [[_mm256_setzero_ps(); T]; R];

    // Pair p is blocks 2p and 2p + 1 of a row, half p % 2 of span p / 2. Scales are converted 8
    // blocks (4 pairs) at a time.
    for octet in (0..groups).step_by(8) {
        let mut row_scales = [_mm256_setzero_ps(); R];
        for r in 0..R {
            let first = tile.row(r) * groups + octet;
            row_scales[r] = block_scales(&scales[first..], (groups - octet).min(8));
        }
        for pair in octet / 2..(octet + 8).min(groups).div_ceil(2) {
            let lanes = _mm256_add_epi32(lane_block, _mm256_set1_epi32((pair * 2 - octet) as i32));
            let lone = pair * 2 + 1 == groups;
            let mut low = [_mm256_setzero_si256(); R];
            let mut high = [_mm256_setzero_si256(); R];
            let mut weight_scale = [_mm256_setzero_ps(); R];
            for r in 0..R {
                let at = (tile.row(r) * groups + pair * 2) * MXFP4_BLOCK_BYTES;
                if pair % 2 == 0 {
                    prefetch(blocks.as_ptr(), at + ahead * groups * MXFP4_BLOCK_BYTES);
                }
                // SAFETY: blocks 2p and 2p + 1 of tile row r lie inside `blocks`; if 2p is the row's
                // last block (`lone`), only its 16 bytes are read.
                let codes = unsafe {
                    let at = blocks.as_ptr().add(at);
                    if lone {
                        _mm256_zextsi128_si256(_mm_loadu_si128(at as *const __m128i))
                    } else {
                        _mm256_loadu_si256(at as *const __m256i)
                    }
                };
                low[r] = _mm256_shuffle_epi8(lut, _mm256_and_si256(codes, nibble));
                high[r] =
                    _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(codes, 4), nibble));
                weight_scale[r] = _mm256_permutevar8x32_ps(row_scales[r], lanes);
            }
            // The pair's first byte and lane within its span.
            let (byte, lane) = (pair % 2 * 32, pair % 2 * 8);
            for t in 0..T {
                let s = &spans[(t0 + t) * spans_per_row + pair / 2];
                // SAFETY: `Q8Span` is 64-byte aligned and its fields are 64 bytes each, so each
                // half is 32 aligned bytes inside the span.
                let (even, odd, correction, half_scale) = unsafe {
                    (
                        _mm256_load_si256(s.even.as_ptr().add(byte) as *const __m256i),
                        _mm256_load_si256(s.odd.as_ptr().add(byte) as *const __m256i),
                        _mm256_load_si256(s.correction.as_ptr().add(lane) as *const __m256i),
                        _mm256_load_ps(s.half_scale.as_ptr().add(lane)),
                    )
                };
                for r in 0..R {
                    let pairs = _mm256_add_epi16(
                        _mm256_maddubs_epi16(low[r], even),
                        _mm256_maddubs_epi16(high[r], odd),
                    );
                    let dot = _mm256_add_epi32(_mm256_madd_epi16(pairs, ones), correction);
                    let partial = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), half_scale);
                    acc[r][t] = _mm256_fmadd_ps(partial, weight_scale[r], acc[r][t]);
                }
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            out[tile.row(r) * tokens + t0 + t] = horizontal_sum(acc[r][t]);
        }
    }
}

/// 8-bit weight rows (`dense="q8"`, codes stored `+ 128` in the grouped order of
/// [`super::q8::grouped_offset`]) × 8-bit activations ([`Q8Group`]s), a group in halves of up to 8
/// blocks, one block per 32-bit lane (see the AVX-512 kernel). `vpmaddubsw` would saturate on the
/// offset codes, so the weights are made signed again and multiplied by the activations'
/// magnitudes with the activations' signs moved onto them (`vpsignb`), which keeps each pair sum
/// within 2 · 127 · 127. That needs the codes the quantizer writes, 1..=255 (signed −127..=127):
/// `vpsignb` cannot negate −128.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `codes` is `[rows, cols]`, `scales` `[rows, cols / 32]`,
/// `groups` as [`super::q8::to_groups`] gives for `[tokens, cols]`, `out` `[rows, tokens]`, and
/// `cols` a multiple of 32.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn matmul_q8_q8(
    groups: &[Q8Group],
    tokens: usize,
    codes: &[u8],
    scales: &[u16],
    cols: usize,
    out: &mut [f32],
) {
    for_each_tile!(out, tokens, TILE_ROWS, 2, Rows, |tile, t0, R, T| {
        // SAFETY: the tile lies inside the operands by construction of `for_each_tile`.
        unsafe { tile_q8_q8::<R, T>(groups, codes, scales, cols, tile, t0, tokens, out) }
    });
}

/// `4 · lanes` bytes at `at` (`lanes` one of 8, 4, 2, 1) in the low 32-bit lanes of a vector, the
/// others zero.
///
/// # Safety
/// `4 · lanes` bytes at `at` must be readable.
#[inline(always)]
unsafe fn load_lanes(at: *const u8, lanes: usize) -> __m256i {
    debug_assert!(matches!(lanes, 1 | 2 | 4 | 8));
    // SAFETY: each arm reads exactly `4 · lanes` bytes, unaligned.
    unsafe {
        match lanes {
            8 => _mm256_loadu_si256(at as *const _),
            4 => _mm256_zextsi128_si256(_mm_loadu_si128(at as *const _)),
            2 => _mm256_zextsi128_si256(_mm_loadl_epi64(at as *const _)),
            _ => _mm256_zextsi128_si256(_mm_cvtsi32_si128((at as *const i32).read_unaligned())),
        }
    }
}

/// `lanes` bf16 scales at `at` (`lanes` one of 8, 4, 2, 1) as f32 in the low lanes of a vector,
/// the others zero.
///
/// # Safety
/// `lanes` values at `at` must be readable.
#[inline(always)]
unsafe fn load_bf16_lanes(at: *const u16, lanes: usize) -> __m256 {
    // SAFETY: both arms read exactly `2 · lanes` bytes.
    let bits = unsafe {
        match lanes {
            1 => _mm_cvtsi32_si128(at.read_unaligned() as i32),
            _ => _mm256_castsi256_si128(load_lanes(at as *const u8, lanes / 2)),
        }
    };
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(bits)))
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
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
    let offset = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for (g, (first, size)) in weight_groups(blocks).enumerate() {
        let x = |t: usize| &groups[(t0 + t) * groups_per_row + g];
        let lanes = size.min(8);
        for half in 0..size / lanes {
            let mut dot = [[_mm256_setzero_si256(); T]; R];
            for step in 0..8 {
                let mut weights = [_mm256_setzero_si256(); R];
                for r in 0..R {
                    let at = tile.row(r) * cols + first * 32 + 4 * size * step + 32 * half;
                    if half == 0 {
                        prefetch(codes.as_ptr(), at + ahead * cols);
                    }
                    // SAFETY: this half of step `step` of the group, `4 · lanes` codes of
                    // tile row r, lies inside `codes`.
                    let stored = unsafe { load_lanes(codes.as_ptr().add(at), lanes) };
                    weights[r] = _mm256_xor_si256(stored, offset);
                }
                for t in 0..T {
                    // SAFETY: `steps[step]` has 64 bytes; this half is 32 of them.
                    let xs = unsafe {
                        _mm256_loadu_si256(x(t).steps[step].as_ptr().add(32 * half) as *const _)
                    };
                    let magnitude = _mm256_sign_epi8(xs, xs);
                    for r in 0..R {
                        let signed = _mm256_sign_epi8(weights[r], xs);
                        let four = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, signed), ones);
                        dot[r][t] = _mm256_add_epi32(dot[r][t], four);
                    }
                }
            }
            let mut weight_scale = [_mm256_setzero_ps(); R];
            for r in 0..R {
                let at = tile.row(r) * blocks + first + 8 * half;
                // SAFETY: this half's `lanes` scales of tile row r lie inside `scales`.
                weight_scale[r] = unsafe { load_bf16_lanes(scales.as_ptr().add(at), lanes) };
            }
            for t in 0..T {
                // SAFETY: `scale` has 16 lanes; this half is 8 of them.
                let x_scale = unsafe { _mm256_loadu_ps(x(t).scale.as_ptr().add(8 * half)) };
                for r in 0..R {
                    let partial = _mm256_mul_ps(_mm256_cvtepi32_ps(dot[r][t]), x_scale);
                    acc[r][t] = _mm256_fmadd_ps(partial, weight_scale[r], acc[r][t]);
                }
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            out[tile.row(r) * tokens + t0 + t] = horizontal_sum(acc[r][t]);
        }
    }
}

/// [`super::q8::quantize_bf16_weights`] compiled for 8-lane vectors (its codes and scales
/// exactly).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_bf16_weights(bits: &[u16], codes: &mut [u8], scales: &mut [u16]) {
    super::q8::quantize_bf16_weights(bits, codes, scales)
}

/// [`super::q8::quantize`] compiled for 8-lane vectors (its codes exactly): a decoded token
/// quantizes some 20 000 activations a layer, serially, between parallel products.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_activations(x: &[f32]) -> Q8Activations {
    super::q8::quantize(x)
}

/// [`super::swiglu_plain`] compiled for 8-lane vectors (its results exactly).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn swiglu(h: &[f32], limit: f32) -> Vec<f32> {
    super::swiglu_plain(h, limit)
}

/// The parts of [`super::panels::matmul_broadcast`]: panels of 16 rows (two vectors), tiles of
/// up to 6 tokens (12 accumulators, 2 panel vectors and a broadcast value in 16 registers).
pub struct Panels;

impl PanelKernels for Panels {
    type Activation = f32;
    type Value = f32;
    const COLUMNS_PER_VALUE: usize = 1;
    const PANEL_ROWS: usize = PANEL_ROWS;
    const TILE_TOKENS: usize = 6;

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
        tile_tokens!(tokens, T, [1 2 3 4 5 6], unsafe { broadcast_tile::<T>(tile) })
    }
}

const PANEL_ROWS: usize = 16;

#[target_feature(enable = "avx2,fma")]
unsafe fn broadcast_tile<const T: usize>(tile: BroadcastTile<f32, f32>) {
    let width = tile.panel.len() / PANEL_ROWS;
    assert!(tile.x.len() >= (T - 1) * tile.cols + width);
    assert!(tile.out.len() >= (T - 1) * tile.out_stride + tile.rows);
    let mut acc = [[_mm256_setzero_ps(); 2]; T];
    if tile.accumulate {
        for (t, acc) in acc.iter_mut().enumerate() {
            let at = t * tile.out_stride;
            *acc = load_rows(&tile.out[at..at + tile.rows]);
        }
    }
    let x = tile.x.as_ptr();
    let panel = tile.panel.as_ptr();
    for k in 0..width {
        // SAFETY: column k of the panel is 16 values inside it.
        let (w0, w1) = unsafe {
            (
                _mm256_loadu_ps(panel.add(k * PANEL_ROWS)),
                _mm256_loadu_ps(panel.add(k * PANEL_ROWS + 8)),
            )
        };
        for (t, acc) in acc.iter_mut().enumerate() {
            // SAFETY: column k of token t lies inside `x` (asserted).
            let xv = _mm256_set1_ps(unsafe { *x.add(t * tile.cols + k) });
            acc[0] = _mm256_fmadd_ps(w0, xv, acc[0]);
            acc[1] = _mm256_fmadd_ps(w1, xv, acc[1]);
        }
    }
    for (t, acc) in acc.iter().enumerate() {
        let at = t * tile.out_stride;
        store_rows(&mut tile.out[at..at + tile.rows], *acc);
    }
}

/// Up to 16 values as two vectors, zeros past the end. A partial panel goes through a buffer:
/// AMD runs `vmaskmovps` slowly.
#[target_feature(enable = "avx2,fma")]
fn load_rows(values: &[f32]) -> [__m256; 2] {
    let mut buffer = [0f32; 16];
    let values = match values.first_chunk::<16>() {
        Some(all) => all,
        None => {
            buffer[..values.len()].copy_from_slice(values);
            &buffer
        }
    };
    // SAFETY: `values` is 16 floats.
    unsafe {
        [
            _mm256_loadu_ps(values.as_ptr()),
            _mm256_loadu_ps(values.as_ptr().add(8)),
        ]
    }
}

/// The first `values.len()` (up to 16) lanes of two vectors into `values`.
#[target_feature(enable = "avx2,fma")]
fn store_rows(values: &mut [f32], v: [__m256; 2]) {
    let mut buffer = [0f32; 16];
    // SAFETY: `buffer` is 16 floats.
    unsafe {
        _mm256_storeu_ps(buffer.as_mut_ptr(), v[0]);
        _mm256_storeu_ps(buffer.as_mut_ptr().add(8), v[1]);
    }
    let n = values.len();
    values.copy_from_slice(&buffer[..n]);
}

/// Lane `j` of vector `i` becomes lane `i` of vector `j` (32-bit lanes).
#[target_feature(enable = "avx2,fma")]
fn transpose_8x8(v: [__m256i; 8]) -> [__m256i; 8] {
    let v = v.map(|v| _mm256_castsi256_ps(v));
    // Per 128-bit lane L: pairs of rows interleaved, then quads[4g + m] holding rows 4g..4g + 4
    // of column 4L + m.
    let mut pairs = [_mm256_setzero_ps(); 8];
    for i in 0..4 {
        pairs[2 * i] = _mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]);
        pairs[2 * i + 1] = _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    }
    let mut quads = [_mm256_setzero_ps(); 8];
    for g in 0..2 {
        let (a, b) = (4 * g, 4 * g + 2);
        for h in 0..2 {
            quads[a + 2 * h] = _mm256_shuffle_ps::<0x44>(pairs[a + h], pairs[b + h]);
            quads[a + 2 * h + 1] = _mm256_shuffle_ps::<0xEE>(pairs[a + h], pairs[b + h]);
        }
    }
    let mut out = [_mm256_setzero_ps(); 8];
    for m in 0..4 {
        out[m] = _mm256_permute2f128_ps::<0x20>(quads[m], quads[4 + m]);
        out[4 + m] = _mm256_permute2f128_ps::<0x31>(quads[m], quads[4 + m]);
    }
    out.map(|v| _mm256_castps_si256(v))
}

/// The 32-bit lanes `[0, lanes)` (`lanes` one of 8, 4) of up to 8 rows `stride` bytes apart
/// from `at`, one vector per row (zeros for rows past `rows`), transposed: vector `i` holds lane
/// `i` of every row.
///
/// # Safety
/// `4 · lanes` bytes from `at + r · stride` must be readable for each `r < rows`.
#[target_feature(enable = "avx2,fma")]
unsafe fn load_transposed(at: *const u8, stride: usize, rows: usize, lanes: usize) -> [__m256i; 8] {
    let mut v = [_mm256_setzero_si256(); 8];
    for (r, v) in v.iter_mut().enumerate().take(rows) {
        // SAFETY: the caller guarantees these bytes are readable.
        *v = unsafe { load_lanes(at.add(r * stride), lanes) };
    }
    transpose_8x8(v)
}

/// Stores a vector of 8 rows of panel column `column`, rows `8 · half..`.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn store_column(panel: &mut [f32], column: usize, half: usize, values: __m256) {
    let at = column * PANEL_ROWS + half * 8;
    let dst = &mut panel[at..at + 8];
    // SAFETY: `dst` is 8 floats.
    unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), values) };
}

/// [`Panels`]' bf16 decoder: per 8 rows and 16 columns, one transpose of 32-bit pairs of
/// values.
#[target_feature(enable = "avx2,fma")]
fn decode_bf16_panel(w: &[u16], cols: usize, k0: usize, width: usize, panel: &mut [f32]) {
    let rows = w.len() / cols;
    let full = width / 16 * 16;
    let high_half = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    for half in 0..2 {
        let first = half * 8;
        let count = rows.saturating_sub(first).min(8);
        if count == 0 {
            // No rows here: the panel's zeros stay (and no address past the rows is formed).
            break;
        }
        for c in (0..full).step_by(16) {
            let at = first * cols + k0 + c;
            if c.is_multiple_of(32) {
                for r in 0..count {
                    // The same columns of the next block, read after this block's products.
                    prefetch(w.as_ptr() as *const u8, 2 * (at + r * cols + PANEL_COLS));
                }
            }
            // SAFETY: 16 values of each of the `count` rows from column k0 + c < cols.
            let pairs =
                unsafe { load_transposed(w.as_ptr().add(at) as *const u8, 2 * cols, count, 8) };
            for (i, pair) in pairs.into_iter().enumerate() {
                let even = _mm256_slli_epi32::<16>(pair);
                let odd = _mm256_and_si256(pair, high_half);
                store_column(panel, c + 2 * i, half, _mm256_castsi256_ps(even));
                store_column(panel, c + 2 * i + 1, half, _mm256_castsi256_ps(odd));
            }
        }
    }
    for c in full..width {
        for r in 0..PANEL_ROWS {
            panel[c * PANEL_ROWS + r] = if r < rows {
                super::scalar::bf16_to_f32(w[r * cols + k0 + c])
            } else {
                0.0
            };
        }
    }
}

/// [`Panels`]' MXFP4 decoder: per 8 rows and 2 blocks, one transpose of the 32-bit lanes of
/// their codes; nibble n of lane i is column 8i + n (SPEC §3.3). `vpermps` reads 3 bits, so
/// it looks up the magnitude and the code's top bit is moved onto the sign.
#[target_feature(enable = "avx2,fma")]
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
    // SAFETY: FP4_VALUES has 16 f32; the first 8 are the magnitudes.
    let magnitudes = unsafe { _mm256_loadu_ps(super::scalar::FP4_VALUES.as_ptr()) };
    let sign = _mm256_set1_epi32(i32::MIN);
    for half in 0..2 {
        let first = half * 8;
        let count = rows.saturating_sub(first).min(8);
        if count == 0 {
            // As for bf16.
            break;
        }
        for g in (k0 / 32..(k0 + width) / 32).step_by(2) {
            let block_count = ((k0 + width) / 32 - g).min(2);
            let mut row_scales = [[0u32; 8]; 2];
            for r in 0..count {
                let at = (first + r) * groups + g;
                for b in 0..block_count {
                    row_scales[b][r] = scales[at + b] as u32;
                }
                if (g - k0 / 32).is_multiple_of(4) {
                    // As for bf16: the next block of columns, its codes and scales.
                    let ahead = PANEL_COLS / 32;
                    prefetch(blocks.as_ptr(), (at + ahead) * MXFP4_BLOCK_BYTES);
                    prefetch(scales.as_ptr(), at + ahead);
                }
            }
            // SAFETY: `block_count` blocks of each of the `count` rows from block g.
            let codes = unsafe {
                load_transposed(
                    blocks
                        .as_ptr()
                        .add((first * groups + g) * MXFP4_BLOCK_BYTES),
                    groups * MXFP4_BLOCK_BYTES,
                    count,
                    block_count * 4,
                )
            };
            let first_column = g * 32 - k0;
            for (i, &codes) in codes.iter().enumerate().take(block_count * 4) {
                // SAFETY: 8 u32.
                let scale = e8m0_lanes(unsafe {
                    _mm256_loadu_si256(row_scales[i / 4].as_ptr() as *const _)
                });
                for n in 0..8 {
                    let shifted = _mm256_srlv_epi32(codes, _mm256_set1_epi32(4 * n as i32));
                    let magnitude = _mm256_permutevar8x32_ps(magnitudes, shifted);
                    let negative = _mm256_and_si256(
                        _mm256_sllv_epi32(codes, _mm256_set1_epi32(28 - 4 * n as i32)),
                        sign,
                    );
                    let value = _mm256_xor_ps(magnitude, _mm256_castsi256_ps(negative));
                    let column = first_column + 8 * i + n;
                    store_column(panel, column, half, _mm256_mul_ps(value, scale));
                }
            }
        }
    }
}

/// E8M0 scale bytes (one per 32-bit lane) as f32 2^(s − 127), exactly: the exponent field s;
/// 0 is the subnormal 2^−127, kept by a blend.
#[target_feature(enable = "avx2,fma")]
fn e8m0_lanes(s: __m256i) -> __m256 {
    let bits = _mm256_blendv_epi8(
        _mm256_slli_epi32(s, 23),
        _mm256_set1_epi32(0x0040_0000),
        _mm256_cmpeq_epi32(s, _mm256_setzero_si256()),
    );
    _mm256_castsi256_ps(bits)
}
