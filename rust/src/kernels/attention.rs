//! Attention of the query heads that share one KV head (a GQA group) over their keys (SPEC
//! §4.3.4), fused: scores, the sink, softmax and the weighted sum of values, with only the group's
//! rows of scores in memory. Each key and value row is read from memory once for the whole group.
//!
//! Keys come transposed in blocks of [`KEY_BLOCK`] positions, so a query's scores against a block
//! are `KEY_BLOCK` independent sums over the head dimension: they vectorise over positions with no
//! horizontal reductions.
//!
//! The arithmetic is written once, in plain Rust with 16-lane partial sums, and compiled three
//! times: as is (the scalar oracle) and inside `#[target_feature]` wrappers where LLVM
//! vectorises it for AVX2 or AVX-512. The summation order is the same in all three, and the
//! products are fused multiply-adds (one rounding: an FMA instruction, or libm's `fmaf` in the
//! scalar build), so they agree bit for bit.

use super::{exp, Isa};

/// Positions per block of transposed keys.
pub const KEY_BLOCK: usize = 64;

/// gpt-oss's head size, for which the weighted sum of values keeps a head in registers.
const GPT_OSS_HEAD_DIM: usize = 64;

/// How the cache stores one key or value element: f32, or bf16 (`kv_cache="bf16"`: half the
/// memory and half the bytes to stream at long context). Attention widens each element to f32 as
/// it reads it.
pub trait KvElement: Copy + Default + Send + Sync + bytemuck::Pod + 'static {
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl KvElement for f32 {
    #[inline(always)]
    fn from_f32(x: f32) -> f32 {
        x
    }

    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

/// bf16 bits: the top half of an f32, so widening is a shift that vectorises.
#[derive(Clone, Copy, Default, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl KvElement for Bf16 {
    /// Rounded to nearest, ties to even.
    #[inline(always)]
    fn from_f32(x: f32) -> Bf16 {
        Bf16(half::bf16::from_f32(x).to_bits())
    }

    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
}

/// Where one KV head's keys and values of positions `0..` come from, in blocks of positions
/// `block·KEY_BLOCK..(block + 1)·KEY_BLOCK`.
pub trait KeyValues: Sync {
    type Element: KvElement;
    /// The block's keys for KV head `kv_head`, transposed: `[head_dim, KEY_BLOCK]`.
    fn key_block(&self, kv_head: usize, block: usize) -> &[Self::Element];
    /// The block's values for KV head `kv_head`: `[KEY_BLOCK, head_dim]`.
    fn value_block(&self, kv_head: usize, block: usize) -> &[Self::Element];
}

/// The query heads of one GQA group at one position.
pub struct Query<'a> {
    /// `[heads, head_dim]`: consecutive query heads sharing one KV head.
    pub q: &'a [f32],
    /// Index of the group's KV head.
    pub kv_head: usize,
    /// Attended positions `first..=last`.
    pub first: usize,
    pub last: usize,
    /// Per head: a learned logit added to the softmax denominator only.
    pub sinks: &'a [f32],
    pub scale: f32,
}

/// For each head h of the group, `out[h] = Σ_j softmax_j · v_j` where the softmax runs over the
/// scores `q_h·k_j · scale` and the head's sink, whose probability is dropped (SPEC §9.5).
/// `out` is `[heads, head_dim]`; `scores` is scratch space.
pub fn attend<S: KeyValues>(
    isa: Isa,
    kv: &S,
    query: &Query,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    match isa {
        // SAFETY: every `Isa` a model holds was checked with `Isa::is_supported`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { attend_avx2(kv, query, scores, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { attend_avx512(kv, query, scores, out) },
        // Scalar, and NEON: aarch64's baseline, so the generic code is already vectorised for it.
        _ => attend_generic(kv, query, scores, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2<S: KeyValues>(kv: &S, query: &Query, scores: &mut Vec<f32>, out: &mut [f32]) {
    attend_generic(kv, query, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn attend_avx512<S: KeyValues>(
    kv: &S,
    query: &Query,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    attend_generic(kv, query, scores, out)
}

#[inline(always)]
fn attend_generic<S: KeyValues>(kv: &S, query: &Query, scores: &mut Vec<f32>, out: &mut [f32]) {
    let heads = query.sinks.len();
    let dim = out.len() / heads;
    let first_block = query.first / KEY_BLOCK;
    let blocks = query.last / KEY_BLOCK + 1 - first_block;
    // Per head, a row of scores for every position of the blocks; `valid` is the attended part.
    let span = blocks * KEY_BLOCK;
    let start = first_block * KEY_BLOCK;
    let valid = query.first - start..query.last + 1 - start;
    // Scratch: the rows of scores, then each head's 1 / softmax denominator.
    let needed = heads * span + heads;
    if scores.len() < needed {
        scores.resize(needed, 0.0);
    }
    let (scores, inv_denominator) = scores[..needed].split_at_mut(heads * span);
    for b in 0..blocks {
        let keys = kv.key_block(query.kv_head, first_block + b);
        let next_keys = next_block(blocks, b, |n| kv.key_block(query.kv_head, first_block + n));
        let rows = query.q.chunks_exact(dim).zip(scores.chunks_exact_mut(span));
        let rows = rows.map(|(q, row)| {
            let block: &mut [f32; KEY_BLOCK] =
                (&mut row[b * KEY_BLOCK..][..KEY_BLOCK]).try_into().unwrap();
            (q, block)
        });
        in_fours(
            rows,
            |[(q0, s0), (q1, s1), (q2, s2), (q3, s3)]| {
                block_scores(
                    [q0, q1, q2, q3],
                    keys,
                    next_keys,
                    query.scale,
                    [s0, s1, s2, s3],
                )
            },
            |(q, s)| block_scores([q], keys, next_keys, query.scale, [s]),
        );
    }
    for ((row, &sink), inv) in scores
        .chunks_exact_mut(span)
        .zip(query.sinks)
        .zip(inv_denominator.iter_mut())
    {
        let row = &mut row[valid.clone()];
        let max = sink.max(max(row));
        *inv = 1.0 / (exp(sink - max) + exp_in_place_and_sum(row, max));
    }
    out.fill(0.0);
    // Block by block, so that the block's values stay in L1 while every head of the group reads
    // them.
    for b in 0..blocks {
        let lanes = valid.start.max(b * KEY_BLOCK)..valid.end.min((b + 1) * KEY_BLOCK);
        let values = &kv.value_block(query.kv_head, first_block + b)
            [(lanes.start - b * KEY_BLOCK) * dim..(lanes.end - b * KEY_BLOCK) * dim];
        let next_values = next_block(blocks, b, |n| {
            kv.value_block(query.kv_head, first_block + n)
        });
        let heads = scores
            .chunks_exact(span)
            .map(|row| &row[lanes.clone()])
            .zip(out.chunks_exact_mut(dim));
        if dim == GPT_OSS_HEAD_DIM {
            let heads = heads.map(|(p, o)| {
                let o: &mut [f32; GPT_OSS_HEAD_DIM] = o.try_into().unwrap();
                (p, o)
            });
            in_fours(
                heads,
                |[(p0, o0), (p1, o1), (p2, o2), (p3, o3)]| {
                    weighted_sum([o0, o1, o2, o3], [p0, p1, p2, p3], values, next_values)
                },
                |(p, o)| weighted_sum([o], [p], values, next_values),
            );
        } else {
            for (p, o) in heads {
                weighted_sum_any(o, p, values);
            }
        }
    }
    for (o, &inv) in out.chunks_exact_mut(dim).zip(inv_denominator.iter()) {
        o.iter_mut().for_each(|oi| *oi *= inv);
    }
}

/// Hands `items` to `four` four at a time (a GQA group's query heads share each key and value
/// load: measured 1.6x faster attention at depth 8192 than one head at a time), and those left
/// over to `one`.
#[inline(always)]
fn in_fours<T>(
    mut items: impl Iterator<Item = T>,
    mut four: impl FnMut([T; 4]),
    one: impl FnMut(T),
) {
    loop {
        match (items.next(), items.next(), items.next(), items.next()) {
            (Some(a), Some(b), Some(c), Some(d)) => four([a, b, c, d]),
            (a, b, c, _) => {
                [a, b, c].into_iter().flatten().for_each(one);
                return;
            }
        }
    }
}

/// `out[h][i] = scale · Σ_d q[h][d] · keys[d][i]` for the `KEY_BLOCK` positions of one block of
/// transposed keys `[dim, KEY_BLOCK]`, for `H` heads at once: each key vector is loaded (and
/// widened) once for all of them, and `H` independent accumulator chains hide the FMA latency.
/// Each head's sums run in the same order whatever `H`. Row `d` of the `next` block (if any) is
/// prefetched with row `d` of this one.
#[inline(always)]
fn block_scores<const H: usize, E: KvElement>(
    q: [&[f32]; H],
    keys: &[E],
    next: &[E],
    scale: f32,
    out: [&mut [f32; KEY_BLOCK]; H],
) {
    let mut acc = [[0f32; KEY_BLOCK]; H];
    let mut next_rows = next.chunks_exact(KEY_BLOCK);
    for (d, k) in keys.chunks_exact(KEY_BLOCK).enumerate() {
        if let Some(row) = next_rows.next() {
            prefetch(row);
        }
        let k: &[E; KEY_BLOCK] = k.try_into().unwrap();
        let k = k.map(E::to_f32);
        for h in 0..H {
            let qd = q[h][d];
            for i in 0..KEY_BLOCK {
                acc[h][i] = qd.mul_add(k[i], acc[h][i]);
            }
        }
    }
    for (o, acc) in out.into_iter().zip(acc) {
        for i in 0..KEY_BLOCK {
            o[i] = acc[i] * scale;
        }
    }
}

/// `out[h] += Σ_j p[h][j] · values[j]` (`values` is `[p[h].len(), D]`) for `H` heads at once,
/// with `out` held in registers: as in [`block_scores`], each value vector is loaded (and
/// widened) once for all of them, and each head's sums run in the same order whatever `H`. The
/// `next` block's rows (if any) are prefetched one per row read.
#[inline(always)]
fn weighted_sum<const D: usize, const H: usize, E: KvElement>(
    out: [&mut [f32; D]; H],
    p: [&[f32]; H],
    values: &[E],
    next: &[E],
) {
    let mut acc = [[0f32; D]; H];
    for h in 0..H {
        acc[h] = *out[h];
    }
    let mut next_rows = next.chunks_exact(D);
    for (j, v) in values.chunks_exact(D).enumerate() {
        if let Some(row) = next_rows.next() {
            prefetch(row);
        }
        let v: &[E; D] = v.try_into().unwrap();
        let v = v.map(E::to_f32);
        for h in 0..H {
            let pj = p[h][j];
            for i in 0..D {
                acc[h][i] = pj.mul_add(v[i], acc[h][i]);
            }
        }
    }
    for (o, acc) in out.into_iter().zip(acc) {
        *o = acc;
    }
}

/// [`weighted_sum`] for any head size, in the same order.
#[inline(always)]
fn weighted_sum_any<E: KvElement>(out: &mut [f32], p: &[f32], values: &[E]) {
    for (&pj, v) in p.iter().zip(values.chunks_exact(out.len())) {
        for (oi, &vi) in out.iter_mut().zip(v) {
            *oi = pj.mul_add(vi.to_f32(), *oi);
        }
    }
}

/// The block after `b` of `blocks` through `block`, or nothing after the last one.
#[inline(always)]
fn next_block<'a, E: 'a>(blocks: usize, b: usize, block: impl Fn(usize) -> &'a [E]) -> &'a [E] {
    if b + 1 < blocks {
        block(b + 1)
    } else {
        &[]
    }
}

/// Asks for `data` (a row of a block) in the cache ahead of use. A KV head's blocks follow one
/// another in memory, but the hardware prefetchers stop at page boundaries. The next block's rows
/// are spread over the reads of this one, as in the matrix kernels. Measured in the 20b's decoding
/// at depth 16384, one process alternating builds, against prefetching the whole next block before
/// reading this one: +2.3 % a token with the bf16 cache, +5.6 % with f32. The whole block in a
/// tight loop instead lost 13 %, and no prefetching 6 %.
#[inline(always)]
fn prefetch<E: KvElement>(data: &[E]) {
    #[cfg(target_arch = "x86_64")]
    {
        let start = data.as_ptr().cast::<i8>();
        for offset in (0..std::mem::size_of_val(data)).step_by(64) {
            // SAFETY: prefetching is a hint; it never faults, and `offset` lies inside `data`.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    start.add(offset),
                )
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Largest value, with 16 partial maxima (the result does not depend on the order). A comparison
/// (`vmaxps`) rather than `f32::max`, whose NaN rule cost a compare and a blend per step, 7 % of
/// attention at depth 16384. A NaN score still reaches the output through its own exponential.
#[inline(always)]
fn max(values: &[f32]) -> f32 {
    let larger = |a: f32, b: f32| if a > b { a } else { b };
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = values.chunks_exact(16);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &s| larger(m, s));
    for chunk in chunks {
        for i in 0..16 {
            acc[i] = larger(acc[i], chunk[i]);
        }
    }
    acc.iter().fold(tail, |m, &s| larger(m, s))
}

/// Replaces each score `s` by `e^(s - max)` and returns their sum, in one pass: 16 partial sums
/// (vectorisable, and the same order on every instruction set).
#[inline(always)]
fn exp_in_place_and_sum(scores: &mut [f32], max: f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = scores.chunks_exact_mut(16);
    for chunk in &mut chunks {
        for i in 0..16 {
            chunk[i] = exp(chunk[i] - max);
            acc[i] += chunk[i];
        }
    }
    let tail: f32 = chunks
        .into_remainder()
        .iter_mut()
        .map(|s| {
            *s = exp(*s - max);
            *s
        })
        .sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys and values `[positions, kv_heads, head_dim]` as stored (rounded to `E`), also in the
    /// block layout, `[kv_heads, blocks, ..]`.
    struct Rows<E> {
        keys: Vec<f32>,
        values: Vec<f32>,
        key_blocks: Vec<E>,
        value_blocks: Vec<E>,
        kv_dim: usize,
        dim: usize,
        blocks: usize,
    }

    impl<E: KvElement> Rows<E> {
        fn new(positions: usize, kv_heads: usize, dim: usize) -> Rows<E> {
            let kv_dim = kv_heads * dim;
            let element =
                |i: usize, m: usize| E::from_f32(((i * m % 101) as f32 - 50.0) / 40.0 + 1e-3);
            let keys: Vec<E> = (0..positions * kv_dim).map(|i| element(i, 37)).collect();
            let values: Vec<E> = (0..positions * kv_dim).map(|i| element(i, 53)).collect();
            let blocks = positions.div_ceil(KEY_BLOCK);
            let len = blocks * KEY_BLOCK * kv_dim;
            let (mut key_blocks, mut value_blocks) =
                (vec![E::default(); len], vec![E::default(); len]);
            for j in 0..positions {
                let (block, lane) = (j / KEY_BLOCK, j % KEY_BLOCK);
                for g in 0..kv_heads {
                    let part = (g * blocks + block) * dim * KEY_BLOCK;
                    for d in 0..dim {
                        let row = j * kv_dim + g * dim + d;
                        key_blocks[part + d * KEY_BLOCK + lane] = keys[row];
                        value_blocks[part + lane * dim + d] = values[row];
                    }
                }
            }
            let widen = |v: Vec<E>| v.into_iter().map(E::to_f32).collect();
            let (keys, values) = (widen(keys), widen(values));
            Rows {
                keys,
                values,
                key_blocks,
                value_blocks,
                kv_dim,
                dim,
                blocks,
            }
        }

        fn block_range(&self, kv_head: usize, block: usize) -> std::ops::Range<usize> {
            let len = self.dim * KEY_BLOCK;
            let start = (kv_head * self.blocks + block) * len;
            start..start + len
        }

        fn key(&self, j: usize) -> &[f32] {
            &self.keys[j * self.kv_dim..(j + 1) * self.kv_dim]
        }

        fn value(&self, j: usize) -> &[f32] {
            &self.values[j * self.kv_dim..(j + 1) * self.kv_dim]
        }
    }

    impl<E: KvElement> KeyValues for Rows<E> {
        type Element = E;

        fn key_block(&self, kv_head: usize, block: usize) -> &[E] {
            &self.key_blocks[self.block_range(kv_head, block)]
        }

        fn value_block(&self, kv_head: usize, block: usize) -> &[E] {
            &self.value_blocks[self.block_range(kv_head, block)]
        }
    }

    /// gpt-oss's head size (values held in registers) and another one, over several key blocks,
    /// for the second of two KV heads, with f32 and bf16 keys and values. Every head's output is
    /// checked, so one that takes another's scores or sink fails.
    #[test]
    fn every_isa_matches_the_reference_softmax_bit_for_bit() {
        matches_the_reference::<f32>();
        matches_the_reference::<Bf16>();
    }

    #[test]
    fn bf16_rounds_to_nearest_even_and_widens_exactly() {
        for x in [
            1.0f32,
            -3.5,
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            1e-30,
            3e38,
        ] {
            let b = Bf16::from_f32(x);
            assert_eq!(b.to_f32(), half::bf16::from_f32(x).to_f32(), "{x}");
            assert!((b.to_f32() - x).abs() <= x.abs() * 2f32.powi(-8), "{x}");
        }
        // Ties go to the even neighbour: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7.
        assert_eq!(Bf16::from_f32(1.0 + 2f32.powi(-8)).to_f32(), 1.0);
    }

    fn matches_the_reference<E: KvElement>() {
        for (dim, first, last) in [(64, 3, 39), (64, 70, 200), (24, 0, 130)] {
            let kv = Rows::<E>::new(last + 1, 2, dim);
            // Five query heads sharing the KV head (four together, then one), different sinks.
            let q: Vec<f32> = (0..5 * dim)
                .map(|i| ((i * 13 % 67) as f32 - 30.0) / 25.0)
                .collect();
            let sinks = [0.7, -0.3, 0.0, 1.5, -2.0];
            let query = Query {
                q: &q,
                kv_head: 1,
                first,
                last,
                sinks: &sinks,
                scale: 0.125,
            };
            // Reference in f64: softmax over the scores and the sink, sink probability dropped.
            let mut want = Vec::new();
            for (qh, &sink) in q.chunks(dim).zip(&sinks) {
                let scores: Vec<f64> = (first..=last)
                    .map(|j| {
                        qh.iter()
                            .zip(&kv.key(j)[dim..])
                            .map(|(a, b)| (a * b) as f64)
                            .sum::<f64>()
                            * 0.125
                    })
                    .collect();
                let max = scores.iter().cloned().fold(sink as f64, f64::max);
                let den: f64 =
                    scores.iter().map(|s| (s - max).exp()).sum::<f64>() + (sink as f64 - max).exp();
                want.extend((0..dim).map(|d| {
                    (first..=last)
                        .zip(&scores)
                        .map(|(j, s)| (s - max).exp() * kv.value(j)[dim + d] as f64)
                        .sum::<f64>()
                        / den
                }));
            }
            let mut first_out = None;
            for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
                let mut out = vec![0f32; 5 * dim];
                // Scratch left over from a longer call must not matter.
                let mut scores = vec![f32::NAN; 4096];
                attend(isa, &kv, &query, &mut scores, &mut out);
                for (o, w) in out.iter().zip(&want) {
                    assert!((*o as f64 - w).abs() < 1e-5, "{isa:?} {dim}: {o} vs {w}");
                }
                assert_eq!(
                    *first_out.get_or_insert_with(|| out.clone()),
                    out,
                    "{isa:?} differs from scalar"
                );
            }
        }
    }
}
