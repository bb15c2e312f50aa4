//! Choosing the next token from logits.
//!
//! The logits go through these steps, in this order (each one off at its default):
//!
//! 1. `repetition_penalty` (CTRL / Hugging Face style): for every token in the sampler's history,
//!    a positive logit is divided by the penalty and a negative one multiplied by it.
//! 2. `presence_penalty` and `frequency_penalty` (OpenAI style): a token seen `c > 0` times in
//!    the history loses `presence + frequency * c`.
//! 3. `logit_bias`: an additive bias per token id (`-inf` forbids a token, a large value forces it).
//! 4. Temperature 0 takes the argmax of these *processed logits* (lowest index on ties), ignoring
//!    top-k / top-p / min-p. Otherwise the logits are divided by the temperature and
//! 5. `top_k` keeps the `k` highest, 6. `top_p` keeps the smallest highest-first prefix whose
//!    probability (renormalised over what top-k kept) reaches `top_p`, 7. `min_p` keeps tokens
//!    whose probability is at least `min_p` times the highest one's (as in Hugging Face's
//!    warper order) and a token is drawn from what is left, renormalised. Ties are broken toward
//!    the lower token id at every cut.
//!
//! **History.** The penalties see the sampler's own history: every token it sampled plus every
//! token passed to [`Sampler::accept`] (for tokens chosen elsewhere, or a prompt when Hugging
//! Face style penalties over the prompt are wanted). By default this is the generated tokens
//! only, as in OpenAI's API.
//!
//! **Log-probabilities.** With `logprobs = n > 0` each draw records the log-probability of the
//! chosen token and the `n` most likely tokens under `log_softmax(processed logits / T)` over the
//! whole vocabulary (T = 1 at temperature 0): the distribution sampled from after penalties,
//! bias and temperature, but before the top-k / top-p / min-p cuts, so that, as in OpenAI's API,
//! alternatives are reported even when a cut made them impossible and every value is finite.
//!
//! **Speed.** No step sorts the vocabulary: top-k uses `select_nth_unstable`, and top-p sorts a
//! prefix of a few hundred candidates selected the same way, growing it fourfold (and, in the
//! worst case, to everything) only when the nucleus is larger.

use std::cmp::Ordering;
use std::collections::HashMap;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

/// How many of the best candidates top-p sorts first (the nucleus rarely holds more).
const NUCLEUS_PREFILTER: usize = 256;

/// Top-p first looks among the tokens weighing at least this much relative to the best one.
const NUCLEUS_MIN_WEIGHT: f32 = 1e-4;

/// The knobs of a [`Sampler`]. `Default` is OpenAI's recommendation for gpt-oss: temperature 1,
/// top-p 1, everything else off.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 0 = off; relative to the highest probability.
    pub min_p: f32,
    /// 1 = off.
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    /// How many top alternatives to record per draw; 0 = no log-probabilities.
    pub logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            logprobs: 0,
        }
    }
}

impl SamplingParams {
    /// Rejects values no sampler can use. Token ids in `logit_bias` are checked against the
    /// logits when sampling.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Input(msg));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!(
                "temperature must be a finite number >= 0, found {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], found {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], found {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!(
                "repetition_penalty must be a finite number > 0, found {}",
                self.repetition_penalty
            ));
        }
        if !self.presence_penalty.is_finite() {
            return bad(format!(
                "presence_penalty must be a finite number, found {}",
                self.presence_penalty
            ));
        }
        if !self.frequency_penalty.is_finite() {
            return bad(format!(
                "frequency_penalty must be a finite number, found {}",
                self.frequency_penalty
            ));
        }
        if let Some(&(id, b)) = self.logit_bias.iter().find(|(_, b)| b.is_nan()) {
            return bad(format!(
                "logit_bias for token {id} is {b}: expected a number"
            ));
        }
        Ok(())
    }
}

/// Log-probabilities recorded by the last draw (see the module documentation).
#[derive(Clone, Debug, PartialEq)]
pub struct Logprobs {
    pub token: u32,
    pub logprob: f32,
    /// The most likely tokens, by descending log-probability (lower id first on ties).
    pub top: Vec<(u32, f32)>,
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    history: Vec<u32>,
    counts: HashMap<u32, u32>,
    last: Option<Logprobs>,
    /// An error of [`Sampler::sample`], which cannot return it (see there).
    /// Scratch buffers kept between draws.
    work: Vec<f32>,
    weights: Vec<f32>,
    cands: Vec<(f32, u32)>,
}

impl Sampler {
    /// Temperature and top-p only. `seed = None` seeds from the operating system.
    pub fn new(temperature: f32, top_p: f32, seed: Option<u64>) -> Result<Self> {
        Self::with_params(
            SamplingParams {
                temperature,
                top_p,
                ..SamplingParams::default()
            },
            seed,
        )
    }

    pub fn with_params(params: SamplingParams, seed: Option<u64>) -> Result<Self> {
        params.validate()?;
        let rng = match seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        Ok(Sampler {
            params,
            rng,
            history: Vec::new(),
            counts: HashMap::new(),
            last: None,
            work: Vec::new(),
            weights: Vec::new(),
            cands: Vec::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The tokens the penalties see: every sampled or accepted token, in order.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Adds a token chosen elsewhere to the history (sampled tokens are added by the sampler).
    pub fn accept(&mut self, token: u32) {
        self.history.push(token);
        *self.counts.entry(token).or_insert(0) += 1;
    }

    /// Forgets the history and the last log-probabilities (the random stream goes on).
    pub fn clear_history(&mut self) {
        self.history.clear();
        self.counts.clear();
        self.last = None;
    }

    /// Log-probabilities of the last draw, if `logprobs > 0` and a draw happened.
    pub fn last_logprobs(&self) -> Option<&Logprobs> {
        self.last.as_ref()
    }

    /// Draws the next token and adds it to the history. On error nothing changes.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::Input("logits are empty".into()));
        }
        if let Some(&(id, _)) = self
            .params
            .logit_bias
            .iter()
            .find(|&&(id, _)| id as usize >= logits.len())
        {
            return Err(Error::Input(format!(
                "logit_bias token id {id} is out of range for {} logits",
                logits.len()
            )));
        }
        let token = if self.changes_logits() {
            let mut work = std::mem::take(&mut self.work);
            work.clear();
            work.extend_from_slice(logits);
            self.process(&mut work);
            let token = self.choose(&work);
            self.work = work;
            token?
        } else {
            self.choose(logits)?
        };
        self.accept(token);
        Ok(token)
    }

    /// Whether steps 1 to 3 would change any logit.
    fn changes_logits(&self) -> bool {
        let p = &self.params;
        let penalties =
            p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
        (penalties && !self.counts.is_empty()) || !p.logit_bias.is_empty()
    }

    /// Steps 1 to 3: penalties over the history, then the logit bias.
    fn process(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&token, &count) in &self.counts {
                // A token beyond these logits (from `accept`) has nothing to penalise.
                let Some(l) = logits.get_mut(token as usize) else {
                    continue;
                };
                if p.repetition_penalty != 1.0 {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
                *l -= p.presence_penalty + p.frequency_penalty * count as f32;
            }
        }
        for &(id, bias) in &p.logit_bias {
            logits[id as usize] += bias;
        }
    }

    /// Steps 4 to 7 on processed logits, and the log-probabilities.
    fn choose(&mut self, logits: &[f32]) -> Result<u32> {
        let max = max_logit(logits);
        if max == f32::NEG_INFINITY {
            return Err(Error::Input(
                "every logit is -inf or NaN: no token can be sampled".into(),
            ));
        }
        let t = self.params.temperature;
        let scale = Scale {
            max,
            inv_t: if t == 0.0 { 1.0 } else { 1.0 / t },
        };
        let (token, total) = if t == 0.0 {
            // The first maximum: the lowest index on ties.
            let token = logits.iter().position(|&l| l == max).unwrap_or(0) as u32;
            (token, None)
        } else {
            self.draw(logits, scale)
        };
        self.last = (self.params.logprobs > 0)
            .then(|| logprobs(logits, scale, total, token, self.params.logprobs));
        Ok(token)
    }

    /// A token drawn at temperature > 0, and the total weight of all logits when computed.
    fn draw(&mut self, logits: &[f32], scale: Scale) -> (u32, Option<f64>) {
        let p = &self.params;
        let k = if p.top_k == 0 { logits.len() } else { p.top_k };
        if k >= logits.len() && p.top_p >= 1.0 && p.min_p == 0.0 {
            // No cut: draw from the whole vocabulary in index order.
            let mut weights = std::mem::take(&mut self.weights);
            weights.clear();
            weights.extend(logits.iter().map(|&l| scale.weight(l)));
            let total: f64 = weights.iter().map(|&w| w as f64).sum();
            let mut u = self.uniform() * total;
            let mut token = 0;
            for (i, &w) in weights.iter().enumerate() {
                if w > 0.0 {
                    // Rounding may leave u >= 0 after the last one: it then keeps the last token.
                    token = i;
                    u -= w as f64;
                    if u < 0.0 {
                        break;
                    }
                }
            }
            self.weights = weights;
            return (token as u32, Some(total));
        }

        let mut cands = std::mem::take(&mut self.cands);
        cands.clear();
        if k < logits.len() {
            // Top-k first: the k best lie among the logits within some margin of the maximum.
            for margin in [4.0, 16.0, 64.0, f32::INFINITY] {
                cands.clear();
                let floor = scale.max - margin;
                cands.extend(
                    logits
                        .iter()
                        .enumerate()
                        .filter(|&(_, &l)| l >= floor)
                        .map(|(i, &l)| (l, i as u32)),
                );
                if cands.len() >= k {
                    break;
                }
            }
            if k < cands.len() {
                cands.select_nth_unstable_by(k - 1, best_first);
                cands.truncate(k);
            }
            let total = cands.iter().map(|&(l, _)| scale.weight(l) as f64).sum();
            let token = self.draw_from(cands, total, scale);
            return (token, None);
        }
        // min_p is a threshold on the weight (the best token weighs exactly 1); without top-p it
        // commutes with top-k, so it can shrink the candidates right away.
        let early_min_p = if p.top_p >= 1.0 { p.min_p } else { 0.0 };
        // Top-p alone: the nucleus usually lies among the tokens weighing at least
        // NUCLEUS_MIN_WEIGHT, which is the case exactly when their mass reaches top_p.
        let nucleus_floor = if p.top_p < 1.0 {
            NUCLEUS_MIN_WEIGHT
        } else {
            early_min_p
        };
        let mut total = 0.0f64;
        let mut kept = 0.0f64;
        for (i, &l) in logits.iter().enumerate() {
            let w = scale.weight(l);
            if w > 0.0 {
                total += w as f64;
                if w >= nucleus_floor {
                    kept += w as f64;
                    cands.push((l, i as u32));
                }
            }
        }
        if p.top_p < 1.0 && kept < p.top_p as f64 * total {
            // A nucleus reaching below the floor: take every token.
            cands.clear();
            cands.extend(
                logits
                    .iter()
                    .enumerate()
                    .filter(|&(_, &l)| scale.weight(l) > 0.0)
                    .map(|(i, &l)| (l, i as u32)),
            );
        }
        let token = self.draw_from(cands, total, scale);
        (token, Some(total))
    }

    /// Steps 6 and 7 on candidates (after top-k) of total weight `total`, and the draw.
    fn draw_from(&mut self, mut cands: Vec<(f32, u32)>, total: f64, scale: Scale) -> u32 {
        let p = &self.params;
        if p.top_p < 1.0 {
            let cut = nucleus(&mut cands, p.top_p as f64 * total, scale, NUCLEUS_PREFILTER);
            cands.truncate(cut);
        }
        if p.min_p > 0.0 {
            cands.retain(|&(l, _)| scale.weight(l) >= p.min_p);
        }
        let total: f64 = cands.iter().map(|&(l, _)| scale.weight(l) as f64).sum();
        let mut u = self.uniform() * total;
        let mut token = cands.first().map_or(0, |c| c.1);
        for &(l, id) in &cands {
            let w = scale.weight(l);
            if w > 0.0 {
                // Rounding may leave u >= 0 after the last one: it then keeps the last token.
                token = id;
                u -= w as f64;
                if u < 0.0 {
                    break;
                }
            }
        }
        self.cands = cands;
        token
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `exp((logit - max) / T)`: the unnormalised probability, exactly 1 for the best token(s).
#[derive(Clone, Copy)]
struct Scale {
    max: f32,
    inv_t: f32,
}

impl Scale {
    /// `log(weight)`; NaN logits count as -inf.
    fn log_weight(self, l: f32) -> f32 {
        if l == self.max {
            0.0
        } else if l.is_nan() {
            f32::NEG_INFINITY
        } else {
            (l - self.max) * self.inv_t
        }
    }

    fn weight(self, l: f32) -> f32 {
        self.log_weight(l).exp()
    }
}

/// Higher logit first, then lower token id.
fn best_first(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Sorts the best candidates to the front and returns how many of them form the top-p nucleus:
/// the shortest best-first prefix whose weight reaches `target` (top-p times the total weight;
/// at least one token). Only a prefix of `prefilter` candidates is selected and sorted at first;
/// it grows fourfold while the nucleus is not reached.
fn nucleus(cands: &mut [(f32, u32)], target: f64, scale: Scale, prefilter: usize) -> usize {
    let mut sorted = 0;
    let mut kept = 0.0f64;
    let mut size = prefilter.max(1);
    loop {
        let end = size.min(cands.len());
        let tail = &mut cands[sorted..];
        let want = end - sorted;
        if want < tail.len() {
            tail.select_nth_unstable_by(want - 1, best_first);
        }
        tail[..want].sort_unstable_by(best_first);
        for (i, &(l, _)) in cands.iter().enumerate().take(end).skip(sorted) {
            kept += scale.weight(l) as f64;
            if kept >= target {
                return i + 1;
            }
        }
        if end == cands.len() {
            return end;
        }
        sorted = end;
        size = size.saturating_mul(4);
    }
}

/// Log-probabilities under `log_softmax(log_weight)` of `token` and of the `n` best tokens.
/// `total` is the total weight when already known.
fn logprobs(logits: &[f32], scale: Scale, total: Option<f64>, token: u32, n: usize) -> Logprobs {
    let total =
        total.unwrap_or_else(|| logits.iter().map(|&l| scale.weight(l) as f64).sum::<f64>());
    let log_total = total.ln();
    let lp = |l: f32| (scale.log_weight(l) as f64 - log_total) as f32;
    // The n best usually lie within a few dozen of the maximum logit; if not, take them all.
    let collect = |floor: f32| -> Vec<(f32, u32)> {
        logits
            .iter()
            .enumerate()
            .filter(|&(_, &l)| l >= floor)
            .map(|(i, &l)| (l, i as u32))
            .collect()
    };
    let mut best = Vec::new();
    for margin in [4.0, 16.0, 64.0, f32::INFINITY] {
        best = collect(scale.max - margin);
        if best.len() >= n {
            break;
        }
    }
    let n = n.min(best.len());
    if n > 0 && n < best.len() {
        best.select_nth_unstable_by(n - 1, best_first);
    }
    best.truncate(n);
    best.sort_unstable_by(best_first);
    Logprobs {
        token,
        logprob: lp(logits[token as usize]),
        top: best.into_iter().map(|(l, id)| (id, lp(l))).collect(),
    }
}

/// The largest logit ignoring NaN (-inf if there is none), in 8 lanes that vectorise.
fn max_logit(logits: &[f32]) -> f32 {
    let pick = |a: f32, b: f32| if b > a { b } else { a };
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = logits.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &l) in lanes.iter_mut().zip(chunk) {
            *lane = pick(*lane, l);
        }
    }
    rest.iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |a, &b| pick(a, b))
}

/// Index of the largest logit, the lowest index on ties (SPEC §4.5). NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams, seed: u64) -> Sampler {
        Sampler::with_params(params, Some(seed)).unwrap()
    }

    /// A reference nucleus by full sort.
    fn nucleus_by_sort(logits: &[f32], top_p: f32, scale: Scale) -> Vec<u32> {
        let mut all: Vec<(f32, u32)> = logits.iter().zip(0..).map(|(&l, i)| (l, i)).collect();
        all.sort_by(best_first);
        let total: f64 = all.iter().map(|&(l, _)| scale.weight(l) as f64).sum();
        let mut kept = 0.0;
        let mut out = Vec::new();
        for (l, i) in all {
            out.push(i);
            kept += scale.weight(l) as f64;
            if kept >= top_p as f64 * total {
                break;
            }
        }
        out
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.2]), 1);
        let mut logits: Vec<f32> = (0..37).map(|i| (i % 11) as f32).collect();
        logits[3] = f32::NAN;
        assert_eq!(max_logit(&logits), 10.0);
        let mut greedy = Sampler::new(0.0, 1.0, None).unwrap();
        assert_eq!(greedy.sample(&logits).unwrap(), 10);
        assert_eq!(
            greedy.sample(&[f32::NAN, f32::NEG_INFINITY, -3.0]).unwrap(),
            2
        );
    }

    #[test]
    fn same_seed_same_tokens_and_frequencies_follow_softmax() {
        let logits = [0.0f32, 1.0, 2.0];
        let draw = |seed| {
            let mut s = Sampler::new(1.0, 1.0, Some(seed)).unwrap();
            (0..20000)
                .map(|_| s.sample(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        assert_ne!(a, draw(8));
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        for (id, l) in logits.iter().enumerate() {
            let freq = a.iter().filter(|&&t| t == id as u32).count() as f32 / a.len() as f32;
            assert!((freq - l.exp() / z).abs() < 0.015, "token {id}: {freq}");
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let mut s = Sampler::new(1.0, 0.5, Some(1)).unwrap();
        // p = [0.665, 0.245, 0.09]: the nucleus for 0.5 is the top token alone.
        assert!((0..1000).all(|_| s.sample(&[2.0, 1.0, 0.0]).unwrap() == 0));
    }

    #[test]
    fn nucleus_larger_than_the_prefilter_matches_a_full_sort() {
        // A flat-ish pseudo-random distribution: the 0.9 nucleus holds hundreds of tokens.
        let logits: Vec<f32> = (0..5000u32)
            .map(|i| ((i.wrapping_mul(2654435761) >> 7) % 1000) as f32 / 300.0)
            .collect();
        let scale = Scale {
            max: logits.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            inv_t: 1.0 / 0.8,
        };
        for (top_p, prefilter) in [(0.9, 2), (0.9, 256), (0.999, 3), (1e-6, 1), (0.5, 7)] {
            let mut cands: Vec<(f32, u32)> = logits.iter().zip(0..).map(|(&l, i)| (l, i)).collect();
            let total: f64 = logits.iter().map(|&l| scale.weight(l) as f64).sum();
            let cut = nucleus(&mut cands, top_p as f64 * total, scale, prefilter);
            let got: Vec<u32> = cands[..cut].iter().map(|c| c.1).collect();
            let want = nucleus_by_sort(&logits, top_p, scale);
            assert_eq!(got, want, "top_p {top_p}, prefilter {prefilter}");
            if top_p == 0.9 {
                assert!(cut > 256, "the nucleus should outgrow the prefilter: {cut}");
            }
        }
    }

    #[test]
    fn nucleus_reaching_below_the_weight_floor_takes_every_token() {
        // One token of weight 1 and 50000 of weight 5e-5 (below NUCLEUS_MIN_WEIGHT): total mass
        // 3.5, so the 0.5 nucleus (1.75) holds the best token and the 15000 lowest-id others.
        let mut logits = vec![(5e-5f32).ln(); 50001];
        logits[0] = 0.0;
        let mut s = Sampler::new(1.0, 0.5, Some(2)).unwrap();
        let drawn: Vec<u32> = (0..120).map(|_| s.sample(&logits).unwrap()).collect();
        // P(not token 0) = 0.75 / 1.75 = 0.43: about 51 of 120.
        let low = drawn.iter().filter(|&&t| t != 0).count();
        assert!((30..75).contains(&low), "{low}");
        assert!(drawn.iter().all(|&t| t <= 15010), "{drawn:?}");
        assert!(drawn.iter().any(|&t| t > 10000), "{drawn:?}");
        // A 0.2 nucleus (0.7) is the best token alone.
        let mut s = Sampler::new(1.0, 0.2, Some(2)).unwrap();
        assert!((0..100).all(|_| s.sample(&logits).unwrap() == 0));
    }

    #[test]
    fn logprobs_look_beyond_the_floor_when_needed() {
        let mut logits = vec![-100.0f32; 10];
        logits[4] = 0.0;
        let mut s = sampler(
            SamplingParams {
                temperature: 0.0,
                logprobs: 3,
                ..Default::default()
            },
            0,
        );
        assert_eq!(s.sample(&logits).unwrap(), 4);
        let top: Vec<u32> = s.last_logprobs().unwrap().top.iter().map(|t| t.0).collect();
        assert_eq!(top, [4, 0, 1]);
    }

    #[test]
    fn ties_go_to_the_lower_id_at_every_cut() {
        let logits = [1.0f32, 5.0, 3.0, 5.0, 5.0, 3.0];
        // top_k = 2 among three tied maxima keeps ids 1 and 3.
        let mut s = sampler(
            SamplingParams {
                top_k: 2,
                ..Default::default()
            },
            3,
        );
        let drawn: Vec<u32> = (0..400).map(|_| s.sample(&logits).unwrap()).collect();
        assert!(drawn.iter().all(|&t| t == 1 || t == 3));
        assert!(drawn.contains(&1) && drawn.contains(&3));
        // A tiny top_p keeps the single best token: the lowest of the tied ids.
        let mut s = Sampler::new(1.0, 1e-6, Some(4)).unwrap();
        assert!((0..100).all(|_| s.sample(&logits).unwrap() == 1));
        // Greedy ignores top-k but agrees on ties.
        let mut s = Sampler::new(0.0, 1.0, None).unwrap();
        assert_eq!(s.sample(&logits).unwrap(), 1);
    }

    #[test]
    fn top_k_widens_its_margin_until_k_tokens_are_in() {
        // Logits 10 apart: only the margins 16, 64 and then everything hold k = 2, 4 and 6.
        let logits = [
            0.0f32,
            -10.0,
            -20.0,
            -30.0,
            -100.0,
            -200.0,
            f32::NEG_INFINITY,
        ];
        for (k, reachable) in [(2, 2), (4, 4), (6, 6)] {
            let mut s = sampler(
                SamplingParams {
                    temperature: 60.0,
                    top_k: k,
                    ..Default::default()
                },
                k as u64,
            );
            let mut seen: Vec<u32> = (0..3000).map(|_| s.sample(&logits).unwrap()).collect();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen, (0..reachable).collect::<Vec<u32>>(), "top_k {k}");
        }
    }

    #[test]
    fn top_k_with_min_p_and_top_p_together() {
        // weights at T = 1: e^0, e^-1, e^-2, e^-3, e^-10
        let logits = [0.0f32, -1.0, -2.0, -3.0, -10.0];
        let mut s = sampler(
            SamplingParams {
                top_k: 4,
                min_p: 0.1, // drops e^-3 (0.05) but keeps e^-2 (0.135)
                ..Default::default()
            },
            5,
        );
        let drawn: Vec<u32> = (0..3000).map(|_| s.sample(&logits).unwrap()).collect();
        assert!(drawn.iter().all(|&t| t <= 2));
        assert!(drawn.contains(&2));
        let mut s = sampler(
            SamplingParams {
                top_k: 4,
                top_p: 0.8,
                min_p: 0.3,
                ..Default::default()
            },
            5,
        );
        // Nucleus over the top 4 (renormalised) is {0, 1}; min_p 0.3 keeps e^-1 = 0.37.
        let drawn: Vec<u32> = (0..3000).map(|_| s.sample(&logits).unwrap()).collect();
        assert!(drawn.iter().all(|&t| t <= 1));
        assert!(drawn.contains(&1));
    }

    #[test]
    fn penalties_bias_history_and_errors() {
        let mut s = sampler(
            SamplingParams {
                temperature: 0.0,
                repetition_penalty: 2.0,
                presence_penalty: 0.5,
                frequency_penalty: 0.25,
                logit_bias: vec![(3, -1.0)],
                ..Default::default()
            },
            0,
        );
        s.accept(0);
        s.accept(0);
        s.accept(1);
        let mut logits = [4.0f32, -1.0, 0.5, 1.0];
        s.process(&mut logits);
        assert_eq!(logits, [2.0 - 0.5 - 0.5, -2.0 - 0.75, 0.5, 0.0]);
        assert_eq!(s.sample(&[4.0, -1.0, 0.5, 1.0]).unwrap(), 0);
        assert_eq!(s.history(), &[0, 0, 1, 0]);
        // An out-of-range bias id is an error, and changes nothing.
        assert!(matches!(s.sample(&[0.0, 1.0]), Err(Error::Input(_))));
        assert_eq!(s.history().len(), 4);
        let mut s = Sampler::new(1.0, 1.0, Some(1)).unwrap();
        assert!(s.sample(&[f32::NEG_INFINITY, f32::NAN]).is_err());
        assert!(s.sample(&[]).is_err());
    }

    #[test]
    fn validation_rejects_bad_values() {
        let bad = [
            SamplingParams {
                temperature: -0.5,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                min_p: 1.5,
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..Default::default()
            },
            SamplingParams {
                presence_penalty: f32::NAN,
                ..Default::default()
            },
            SamplingParams {
                frequency_penalty: f32::INFINITY,
                ..Default::default()
            },
            SamplingParams {
                logit_bias: vec![(0, f32::NAN)],
                ..Default::default()
            },
        ];
        for params in bad {
            assert!(
                Sampler::with_params(params.clone(), Some(0)).is_err(),
                "{params:?}"
            );
        }
    }

    #[test]
    fn logprobs_are_the_log_softmax_after_temperature() {
        let logits = [1.0f32, 3.0, 2.0, f32::NEG_INFINITY];
        let mut s = sampler(
            SamplingParams {
                temperature: 0.5,
                top_k: 1,
                logprobs: 3,
                ..Default::default()
            },
            9,
        );
        assert_eq!(s.sample(&logits).unwrap(), 1);
        let lp = s.last_logprobs().unwrap();
        let z: f64 = [2.0f64, 6.0, 4.0].iter().map(|x| x.exp()).sum();
        let want = |l: f64| (2.0 * l - z.ln()) as f32;
        assert_eq!(lp.token, 1);
        assert!((lp.logprob - want(3.0)).abs() < 1e-5);
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 2, 0]);
        for &(id, v) in &lp.top {
            assert!((v - want(logits[id as usize] as f64)).abs() < 1e-5);
        }
    }
}
