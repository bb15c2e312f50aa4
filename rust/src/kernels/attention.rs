//! Attention of the query heads that share one KV head (a GQA group) over their keys (SPEC
//! §4.3.4), fused: scores, the sink, softmax and the weighted sum of values, with only the group's
//! rows of scores in memory. Each key and value row is read once for the whole group.
//!
//! The arithmetic is written once, in plain Rust with 16-lane partial sums, and compiled three
//! times: as is (the scalar oracle) and inside `#[target_feature]` wrappers where LLVM
//! vectorises it for AVX2 or AVX-512. The summation order is the same in all three, so they agree
//! bit for bit.

use super::Isa;

/// Where the keys and values of positions `0..` come from (cache or current chunk).
pub trait KeyValues: Sync {
    /// Key of position `j`, all KV heads.
    fn key(&self, j: usize) -> &[f32];
    /// Value of position `j`, all KV heads.
    fn value(&self, j: usize) -> &[f32];
}

/// The query heads of one GQA group at one position.
pub struct Query<'a> {
    /// `[heads, head_dim]`: consecutive query heads sharing one KV head.
    pub q: &'a [f32],
    /// Offset of the group's KV head inside a key or value row.
    pub kv_offset: usize,
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
        Isa::Scalar => attend_generic(kv, query, scores, out),
        // SAFETY: every `Isa` a model holds was checked with `Isa::is_supported`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { attend_avx2(kv, query, scores, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { attend_avx512(kv, query, scores, out) },
        #[cfg(not(target_arch = "x86_64"))]
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
    let keys = query.last + 1 - query.first;
    scores.clear();
    scores.resize(heads * keys, 0.0);
    for (jj, j) in (query.first..=query.last).enumerate() {
        let k = &kv.key(j)[query.kv_offset..query.kv_offset + dim];
        for (h, q) in query.q.chunks_exact(dim).enumerate() {
            scores[h * keys + jj] = dot(q, k) * query.scale;
        }
    }
    let mut inv_denominator = vec![0f32; heads];
    for ((row, &sink), inv) in scores
        .chunks_exact_mut(keys)
        .zip(query.sinks)
        .zip(&mut inv_denominator)
    {
        let max = row.iter().fold(sink, |m, &s| m.max(s));
        for s in row.iter_mut() {
            *s = exp(*s - max);
        }
        *inv = 1.0 / (exp(sink - max) + sum(row));
    }
    out.fill(0.0);
    for (jj, j) in (query.first..=query.last).enumerate() {
        let v = &kv.value(j)[query.kv_offset..query.kv_offset + dim];
        for (h, o) in out.chunks_exact_mut(dim).enumerate() {
            let p = scores[h * keys + jj];
            for (oi, &vi) in o.iter_mut().zip(v) {
                *oi += p * vi;
            }
        }
    }
    for (o, &inv) in out.chunks_exact_mut(dim).zip(&inv_denominator) {
        o.iter_mut().for_each(|oi| *oi *= inv);
    }
}

/// Sum with 16 partial sums (vectorisable, and the same order on every instruction set).
#[inline(always)]
fn sum(values: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = values.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for i in 0..16 {
            acc[i] += chunk[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `e^x` for `x <= 0` within 2 ulp, in plain arithmetic so that loops over it vectorise (libm's
/// `expf` is an opaque call). Cody-Waite reduction `x = n ln2 + f`, |f| <= ln2/2, Cephes' degree-7
/// polynomial for `e^f`, and `2^n` built in the exponent bits. Below -87 the result is ~1e-38
/// instead of smaller: negligible next to the softmax's largest term, which is 1.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 0.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let f = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * f + 1.398_199_9e-3;
    let p = p * f + 8.333_452e-3;
    let p = p * f + 4.166_579_6e-2;
    let p = p * f + 1.666_666_5e-1;
    let p = p * f + 0.5;
    let e_f = p * f * f + f + 1.0;
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    e_f * f32::from_bits(((n_bits + 127) as u32) << 23)
}

/// Dot product with 16 partial sums, so it vectorises without reassociating anything.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm_on_the_softmax_range() {
        let mut worst = 0;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let (got, want) = (exp(x), (x as f64).exp() as f32);
            let ulps = (got.to_bits() as i64 - want.to_bits() as i64).unsigned_abs();
            worst = worst.max(ulps);
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37);
    }

    struct Rows(Vec<f32>, usize);

    impl KeyValues for Rows {
        fn key(&self, j: usize) -> &[f32] {
            &self.0[j * self.1..(j + 1) * self.1]
        }
        fn value(&self, j: usize) -> &[f32] {
            &self.0[j * self.1..(j + 1) * self.1]
        }
    }

    #[test]
    fn every_isa_matches_the_reference_softmax_bit_for_bit() {
        let dim = 64;
        let kv = Rows(
            (0..40 * dim)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
                .collect(),
            dim,
        );
        // Two query heads sharing the KV head, with different sinks.
        let q: Vec<f32> = (0..2 * dim)
            .map(|i| ((i * 13 % 64) as f32 - 30.0) / 25.0)
            .collect();
        let sinks = [0.7, -0.3];
        let query = Query {
            q: &q,
            kv_offset: 0,
            first: 3,
            last: 39,
            sinks: &sinks,
            scale: 0.125,
        };
        // Reference in f64: softmax over the scores and the sink, sink probability dropped.
        let mut want = Vec::new();
        for (qh, &sink) in q.chunks(dim).zip(&sinks) {
            let scores: Vec<f64> = (3..=39)
                .map(|j| {
                    qh.iter()
                        .zip(kv.key(j))
                        .map(|(a, b)| (a * b) as f64)
                        .sum::<f64>()
                        * 0.125
                })
                .collect();
            let max = scores.iter().cloned().fold(sink as f64, f64::max);
            let den: f64 =
                scores.iter().map(|s| (s - max).exp()).sum::<f64>() + (sink as f64 - max).exp();
            want.extend((0..dim).map(|d| {
                (3..=39)
                    .zip(&scores)
                    .map(|(j, s)| (s - max).exp() * kv.value(j)[d] as f64)
                    .sum::<f64>()
                    / den
            }));
        }
        let mut first = None;
        for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
            let mut out = vec![0f32; 2 * dim];
            attend(isa, &kv, &query, &mut Vec::new(), &mut out);
            for (o, w) in out.iter().zip(&want) {
                assert!((*o as f64 - w).abs() < 1e-5, "{isa:?}: {o} vs {w}");
            }
            assert_eq!(
                *first.get_or_insert_with(|| out.clone()),
                out,
                "{isa:?} differs from scalar"
            );
        }
    }
}
