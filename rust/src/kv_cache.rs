//! Key/value cache: post-RoPE keys and values of every processed token, per layer (SPEC §4.6).
//!
//! Full-attention layers keep every position, growing up to `max_context`. Sliding layers only ever
//! look back `sliding_window` positions, so they keep a ring of the last `window + ROLLBACK_SLOTS`:
//! the extra slots let [`KvCache::truncate`] step back that far without recomputing anything.

use crate::config::Config;
use crate::error::{try_zeroed, Result};

/// Positions a sliding layer keeps beyond its window, so that short rollbacks (regenerating a reply,
/// reusing a prompt prefix) stay cheap.
pub const ROLLBACK_SLOTS: usize = 1024;

pub struct LayerCache {
    keys: Vec<f32>,
    values: Vec<f32>,
    /// Ring capacity in positions for sliding layers; `None` for full layers.
    ring: Option<usize>,
    kv_dim: usize,
}

impl LayerCache {
    fn slot(&self, position: usize) -> usize {
        self.ring.map_or(position, |capacity| position % capacity)
    }

    /// Key of cached position `j` (all KV heads).
    pub fn key(&self, j: usize) -> &[f32] {
        let s = self.slot(j) * self.kv_dim;
        &self.keys[s..s + self.kv_dim]
    }

    pub fn value(&self, j: usize) -> &[f32] {
        let s = self.slot(j) * self.kv_dim;
        &self.values[s..s + self.kv_dim]
    }

    /// Stores keys and values `[n, kv_dim]` of positions `first..first + n`, dropping anything cached
    /// at or after `first`.
    pub fn store(&mut self, first: usize, keys: &[f32], values: &[f32]) {
        let n = keys.len() / self.kv_dim;
        match self.ring {
            None => {
                self.keys.truncate(first * self.kv_dim);
                self.values.truncate(first * self.kv_dim);
                self.keys.extend_from_slice(keys);
                self.values.extend_from_slice(values);
            }
            Some(capacity) => {
                // Only the last `capacity` positions of the chunk survive in the ring.
                for i in n.saturating_sub(capacity)..n {
                    let s = self.slot(first + i) * self.kv_dim;
                    let src = i * self.kv_dim..(i + 1) * self.kv_dim;
                    self.keys[s..s + self.kv_dim].copy_from_slice(&keys[src.clone()]);
                    self.values[s..s + self.kv_dim].copy_from_slice(&values[src]);
                }
            }
        }
    }

    fn bytes(&self) -> usize {
        (self.keys.capacity() + self.values.capacity()) * std::mem::size_of::<f32>()
    }
}

pub struct KvCache {
    pub layers: Vec<LayerCache>,
    /// Token ids in the cache, in order.
    tokens: Vec<u32>,
    pub max_context: usize,
    /// RoPE position of the first cached token (a stateless forward may start anywhere).
    pub position_offset: usize,
    /// Ring capacity of the sliding layers (`usize::MAX` when there are none).
    ring_capacity: usize,
    /// Positions from here on are still in the rings. Never lowered by `truncate`: the slots of
    /// discarded positions may already have overwritten older ones.
    ring_valid_from: usize,
    sliding_window: usize,
}

impl KvCache {
    pub fn new(config: &Config, max_context: usize, position_offset: usize) -> Result<Self> {
        let kv_dim = config.kv_dim();
        let capacity = (config.sliding_window + ROLLBACK_SLOTS).min(max_context);
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let ring = config.is_sliding(l).then_some(capacity);
                let len = ring.unwrap_or(0).saturating_mul(kv_dim);
                Ok(LayerCache {
                    keys: try_zeroed(len, "sliding-window KV cache")?,
                    values: try_zeroed(len, "sliding-window KV cache")?,
                    ring,
                    kv_dim,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ring_capacity = if layers.iter().any(|l| l.ring.is_some()) {
            capacity
        } else {
            usize::MAX
        };
        Ok(KvCache {
            layers,
            tokens: Vec::new(),
            max_context,
            position_offset,
            ring_capacity,
            ring_valid_from: 0,
            sliding_window: config.sliding_window,
        })
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Records `tokens` as appended, once every layer has stored their keys and values.
    pub fn commit(&mut self, tokens: &[u32]) {
        self.tokens.extend_from_slice(tokens);
        self.ring_valid_from = self
            .ring_valid_from
            .max(self.len().saturating_sub(self.ring_capacity));
    }

    /// Drops every position from `n` on. Returns false when the sliding rings no longer hold the
    /// window before `n` (the caller must then recompute the prefix).
    pub fn truncate(&mut self, n: usize) -> bool {
        if n >= self.len() {
            return true;
        }
        // The next position, n, attends to the window n - (window - 1) ..= n.
        let reachable = n.saturating_sub(self.sliding_window - 1) >= self.ring_valid_from;
        if reachable {
            self.tokens.truncate(n);
        }
        reachable
    }

    pub fn clear(&mut self) {
        self.tokens.clear();
        self.ring_valid_from = 0;
    }

    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerCache::bytes).sum()
    }

    /// What a session file stores per layer: the keys and values of the cached positions (full
    /// layers) or the whole ring (sliding layers).
    pub fn layer_data(&self) -> Vec<(&[f32], &[f32])> {
        self.layers
            .iter()
            .map(|l| {
                let n = if l.ring.is_some() {
                    l.keys.len()
                } else {
                    self.len() * l.kv_dim
                };
                (&l.keys[..n], &l.values[..n])
            })
            .collect()
    }

    pub fn ring_valid_from(&self) -> usize {
        self.ring_valid_from
    }

    /// Refills an empty cache with the contents [`KvCache::layer_data`] gave, checking every size.
    pub fn restore(
        &mut self,
        tokens: Vec<u32>,
        ring_valid_from: usize,
        data: Vec<(Vec<f32>, Vec<f32>)>,
    ) -> std::result::Result<(), String> {
        if tokens.len() > self.max_context {
            return Err(format!(
                "{} tokens exceed max_context {}",
                tokens.len(),
                self.max_context
            ));
        }
        if data.len() != self.layers.len() {
            return Err(format!(
                "{} layers, expected {}",
                data.len(),
                self.layers.len()
            ));
        }
        for (i, (layer, (keys, values))) in self.layers.iter().zip(&data).enumerate() {
            let expected = if layer.ring.is_some() {
                layer.keys.len()
            } else {
                tokens.len() * layer.kv_dim
            };
            if keys.len() != expected || values.len() != expected {
                return Err(format!(
                    "layer {i}: {} values, expected {expected}",
                    keys.len()
                ));
            }
        }
        for (layer, (keys, values)) in self.layers.iter_mut().zip(data) {
            layer.keys = keys;
            layer.values = values;
        }
        self.tokens = tokens;
        self.ring_valid_from = ring_valid_from;
        Ok(())
    }
}
