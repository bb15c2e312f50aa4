//! Attention of one query head over its keys (SPEC §4.3.4), fused: scores, the sink, softmax and
//! the weighted sum of values, with only one row of scores in memory.
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

/// One query head at one position.
pub struct Query<'a> {
    pub q: &'a [f32],
    /// Offset of this head's KV head inside a key or value row.
    pub kv_offset: usize,
    /// Attended positions `first..=last`.
    pub first: usize,
    pub last: usize,
    /// Learned logit added to the softmax denominator only.
    pub sink: f32,
    pub scale: f32,
}

/// `out = Σ_j softmax_j · v_j` where the softmax runs over the scores `q·k_j · scale` and the sink,
/// whose probability is dropped (SPEC §9.5). `scores` is scratch space.
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
    let dim = out.len();
    scores.clear();
    let mut max = query.sink;
    for j in query.first..=query.last {
        let k = &kv.key(j)[query.kv_offset..query.kv_offset + dim];
        let s = dot(query.q, k) * query.scale;
        max = max.max(s);
        scores.push(s);
    }
    for s in scores.iter_mut() {
        *s = exp(*s - max);
    }
    let denominator = exp(query.sink - max) + sum(scores);
    out.fill(0.0);
    for (j, &p) in (query.first..=query.last).zip(scores.iter()) {
        let v = &kv.value(j)[query.kv_offset..query.kv_offset + dim];
        for (o, &vi) in out.iter_mut().zip(v) {
            *o += p * vi;
        }
    }
    let inv = 1.0 / denominator;
    out.iter_mut().for_each(|o| *o *= inv);
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
        let q: Vec<f32> = (0..dim).map(|i| (i as f32 - 30.0) / 25.0).collect();
        let query = Query {
            q: &q,
            kv_offset: 0,
            first: 3,
            last: 39,
            sink: 0.7,
            scale: 0.125,
        };
        // Reference in f64: softmax over the scores and the sink, sink probability dropped.
        let scores: Vec<f64> = (3..=39)
            .map(|j| {
                q.iter()
                    .zip(kv.key(j))
                    .map(|(a, b)| (a * b) as f64)
                    .sum::<f64>()
                    * 0.125
            })
            .collect();
        let max = scores.iter().cloned().fold(0.7f64, f64::max);
        let den: f64 = scores.iter().map(|s| (s - max).exp()).sum::<f64>() + (0.7 - max).exp();
        let want: Vec<f64> = (0..dim)
            .map(|d| {
                (3..=39)
                    .zip(&scores)
                    .map(|(j, s)| (s - max).exp() * kv.value(j)[d] as f64)
                    .sum::<f64>()
                    / den
            })
            .collect();
        let mut first = None;
        for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
            let mut out = vec![0f32; dim];
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
