//! A conversation's state: the KV cache of one [`Model`] and the logits of its last position.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::model::{LogitRows, Model};
use crate::sampling::Sampler;

pub struct Session {
    model: Arc<Model>,
    cache: KvCache,
    last_logits: Option<Vec<f32>>,
}

impl Session {
    pub fn new(model: Arc<Model>, max_context: usize) -> Result<Self> {
        if max_context == 0 {
            return Err(Error::Input("max_context must be at least 1".into()));
        }
        model.check_positions(0, max_context)?;
        let cache = KvCache::new(&model.config, max_context, 0)?;
        Ok(Session {
            model,
            cache,
            last_logits: None,
        })
    }

    pub fn position(&self) -> usize {
        self.cache.len()
    }

    pub fn max_context(&self) -> usize {
        self.cache.max_context
    }

    pub fn tokens(&self) -> &[u32] {
        self.cache.tokens()
    }

    /// Runs `tokens` after the cached ones; returns the logits after the last of them.
    pub fn append(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        let logits = self
            .model
            .extend(&mut self.cache, tokens, LogitRows::Last, None)?;
        Ok(self.last_logits.insert(logits))
    }

    /// Draws the next token from the logits of the last append.
    pub fn sample(&self, sampler: &mut Sampler) -> Result<u32> {
        let logits = self
            .last_logits
            .as_deref()
            .ok_or_else(|| Error::Input("no logits to sample from: append tokens first".into()))?;
        sampler.sample(logits)
    }

    /// Keeps the first `n` tokens. The logits of the last append are dropped unless `n` keeps
    /// everything.
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        if n > self.cache.len() {
            return Err(Error::Input(format!(
                "cannot truncate to {n} tokens: the session holds {}",
                self.cache.len()
            )));
        }
        if n == self.cache.len() {
            return Ok(());
        }
        self.last_logits = None;
        if !self.cache.truncate(n) {
            // The sliding layers' rings no longer hold the window before `n`: recompute the prefix.
            let prefix = self.cache.tokens()[..n].to_vec();
            self.cache.clear();
            if !prefix.is_empty() {
                self.model
                    .extend(&mut self.cache, &prefix, LogitRows::None, None)?;
            }
        }
        Ok(())
    }

    pub fn reset(&mut self) {
        self.cache.clear();
        self.last_logits = None;
    }

    pub fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }
}
