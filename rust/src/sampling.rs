//! Choosing the next token from logits: greedy at temperature 0, otherwise seeded sampling from
//! `softmax(logits / temperature)`, optionally restricted to the top-p nucleus.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

pub struct Sampler {
    pub temperature: f32,
    pub top_p: f32,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// `seed = None` seeds from the operating system.
    pub fn new(temperature: f32, top_p: f32, seed: Option<u64>) -> Result<Self> {
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(Error::Input(format!(
                "temperature must be a finite number >= 0, found {temperature}"
            )));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(Error::Input(format!(
                "top_p must be in (0, 1], found {top_p}"
            )));
        }
        let rng = match seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        Ok(Sampler {
            temperature,
            top_p,
            rng,
        })
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let inv_t = 1.0 / self.temperature;
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) * inv_t).exp()))
            .filter(|&(_, p)| p > 0.0)
            .collect();
        if self.top_p < 1.0 {
            probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let total: f32 = probs.iter().map(|p| p.1).sum();
            let mut kept = 0.0;
            let cut = probs
                .iter()
                .position(|p| {
                    kept += p.1;
                    kept >= self.top_p * total
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(cut);
        }
        let total: f32 = probs.iter().map(|p| p.1).sum();
        // 24 random bits give a uniform f32 in [0, 1).
        let u = (self.rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32 * total;
        let mut acc = 0.0;
        for &(id, p) in &probs {
            acc += p;
            if u < acc {
                return id;
            }
        }
        probs.last().map_or_else(|| argmax(logits), |p| p.0)
    }
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

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.2]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_frequencies_follow_softmax() {
        let logits = [0.0f32, 1.0, 2.0];
        let draw = |seed| {
            let mut s = Sampler::new(1.0, 1.0, Some(seed)).unwrap();
            (0..20000).map(|_| s.sample(&logits)).collect::<Vec<_>>()
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
        assert!((0..1000).all(|_| s.sample(&[2.0, 1.0, 0.0]) == 0));
    }
}
