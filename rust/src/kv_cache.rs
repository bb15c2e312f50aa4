//! Key/value cache: post-RoPE keys and values of every processed token, per layer (SPEC §4.6).
//!
//! Full-attention layers keep every position, growing up to `max_context`. Sliding layers only ever
//! look back `sliding_window` positions, so they keep a ring of the last `window + ROLLBACK_SLOTS`:
//! the extra slots let [`KvCache::truncate`] step back that far without recomputing anything.
//!
//! Keys and values are stored in blocks of [`KEY_BLOCK`] slots, each KV head's part contiguous so
//! that attention streams it: values `[block, kv_heads, KEY_BLOCK, head_dim]` and keys transposed,
//! `[block, kv_heads, head_dim, KEY_BLOCK]`, so that attention scores vectorise over positions.

use crate::config::Config;
use crate::error::{try_zeroed, Result};
use crate::kernels::attention::{KeyValues, KEY_BLOCK};

/// Positions a sliding layer keeps beyond its window, so that short rollbacks (regenerating a reply,
/// reusing a prompt prefix) stay cheap.
pub const ROLLBACK_SLOTS: usize = 1024;

pub struct LayerCache {
    keys: Vec<f32>,
    values: Vec<f32>,
    /// Ring capacity in positions (a multiple of `KEY_BLOCK`) for sliding layers; `None` for full
    /// layers.
    ring: Option<usize>,
    /// Keys a position attends to, itself included (`usize::MAX` for full layers).
    window: usize,
    kv_dim: usize,
    head_dim: usize,
}

impl LayerCache {
    fn slot(&self, position: usize) -> usize {
        self.ring.map_or(position, |capacity| position % capacity)
    }

    /// Where the block of positions `block·KEY_BLOCK..` lies in `keys` or `values`.
    #[inline]
    fn block_range(&self, block: usize) -> std::ops::Range<usize> {
        let block = self
            .ring
            .map_or(block, |capacity| block % (capacity / KEY_BLOCK));
        let len = KEY_BLOCK * self.kv_dim;
        block * len..(block + 1) * len
    }

    /// Stores keys and values `[n, kv_dim]` of positions `first..first + n`, dropping anything cached
    /// at or after `first`. Attention then reads this chunk from the cache, so a ring must be able to
    /// hold the chunk and the window before it.
    pub fn store(&mut self, first: usize, keys: &[f32], values: &[f32]) {
        let n = keys.len() / self.kv_dim;
        match self.ring {
            None => {
                let len = (first + n).next_multiple_of(KEY_BLOCK) * self.kv_dim;
                self.keys.resize(len, 0.0);
                self.values.resize(len, 0.0);
            }
            Some(capacity) => assert!(
                first + n - (first + 1).saturating_sub(self.window) <= capacity,
                "a chunk of {n} positions overruns a ring of {capacity}"
            ),
        }
        let block_len = KEY_BLOCK * self.kv_dim;
        let part_len = KEY_BLOCK * self.head_dim;
        for (i, (key, value)) in keys
            .chunks_exact(self.kv_dim)
            .zip(values.chunks_exact(self.kv_dim))
            .enumerate()
        {
            let slot = self.slot(first + i);
            let (block, lane) = (slot / KEY_BLOCK * block_len, slot % KEY_BLOCK);
            for (g, (key, value)) in key
                .chunks_exact(self.head_dim)
                .zip(value.chunks_exact(self.head_dim))
                .enumerate()
            {
                let part = block + g * part_len;
                self.values[part + lane * self.head_dim..][..self.head_dim].copy_from_slice(value);
                for (row, &k) in self.keys[part..part + part_len]
                    .chunks_exact_mut(KEY_BLOCK)
                    .zip(key)
                {
                    row[lane] = k;
                }
            }
        }
    }

    fn bytes(&self) -> usize {
        (self.keys.capacity() + self.values.capacity()) * std::mem::size_of::<f32>()
    }
}

impl KeyValues for LayerCache {
    #[inline]
    fn key_block(&self, block: usize) -> &[f32] {
        &self.keys[self.block_range(block)]
    }

    #[inline]
    fn value_block(&self, block: usize) -> &[f32] {
        &self.values[self.block_range(block)]
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
        let capacity = (config.sliding_window + ROLLBACK_SLOTS)
            .min(max_context)
            .next_multiple_of(KEY_BLOCK);
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let sliding = config.is_sliding(l);
                let ring = sliding.then_some(capacity);
                let len = ring.unwrap_or(0).saturating_mul(kv_dim);
                Ok(LayerCache {
                    keys: try_zeroed(len, "sliding-window KV cache")?,
                    values: try_zeroed(len, "sliding-window KV cache")?,
                    ring,
                    window: if sliding {
                        config.sliding_window
                    } else {
                        usize::MAX
                    },
                    kv_dim,
                    head_dim: config.head_dim,
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

    /// What a session file stores per layer, in the cache's own layout: the keys and values of the
    /// blocks of cached positions (full layers) or the whole ring (sliding layers).
    pub fn layer_data(&self) -> Vec<(&[f32], &[f32])> {
        self.layers
            .iter()
            .map(|l| {
                let n = if l.ring.is_some() {
                    l.keys.len()
                } else {
                    self.len().next_multiple_of(KEY_BLOCK) * l.kv_dim
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
                tokens.len().next_multiple_of(KEY_BLOCK) * layer.kv_dim
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One sliding and one full layer; 2 KV heads of 4 dimensions.
    fn config() -> Config {
        Config::from_json_str(
            r#"{"hidden_size":128,"num_hidden_layers":2,"num_attention_heads":4,
            "num_key_value_heads":2,"head_dim":4,"num_local_experts":8,"num_experts_per_tok":4,
            "intermediate_size":96,"sliding_window":8,"vocab_size":512,"rope_theta":150000,
            "rope_scaling":{"factor":32.0,"beta_fast":32.0,"beta_slow":1.0,
            "original_max_position_embeddings":4096,"rope_type":"yarn","truncate":false},
            "max_position_embeddings":131072,"swiglu_limit":7.0,"rms_norm_eps":1e-5}"#,
        )
        .unwrap()
    }

    /// Key (or value, `+ 0.5`) element `c` of position `j`, as stored by `fill`.
    fn element(j: usize, c: usize, generation: usize) -> f32 {
        (generation * 100_000 + j * 8 + c) as f32
    }

    fn fill(layer: &mut LayerCache, positions: std::ops::Range<usize>, generation: usize) {
        for chunk in positions.collect::<Vec<_>>().chunks(100) {
            let keys: Vec<f32> = chunk
                .iter()
                .flat_map(|&j| (0..8).map(move |c| element(j, c, generation)))
                .collect();
            let values: Vec<f32> = keys.iter().map(|k| k + 0.5).collect();
            layer.store(chunk[0], &keys, &values);
        }
    }

    /// Position `j`'s key and value rows read back through the block layout.
    fn read(layer: &LayerCache, j: usize) -> (Vec<f32>, Vec<f32>) {
        let (keys, values) = (
            layer.key_block(j / KEY_BLOCK),
            layer.value_block(j / KEY_BLOCK),
        );
        let lane = j % KEY_BLOCK;
        (0..2)
            .flat_map(|g| (0..4).map(move |d| (g, d)))
            .map(|(g, d)| {
                let part = g * 4 * KEY_BLOCK;
                (
                    keys[part + d * KEY_BLOCK + lane],
                    values[part + lane * 4 + d],
                )
            })
            .unzip()
    }

    #[test]
    fn blocks_hold_every_position_and_rings_the_last_ones() {
        let mut cache = KvCache::new(&config(), 3000, 0).unwrap();
        let capacity = (8 + ROLLBACK_SLOTS).next_multiple_of(KEY_BLOCK);
        for layer in &mut cache.layers {
            fill(layer, 0..1500, 0);
            // Rewrite from 700 on, as after a truncation.
            fill(layer, 700..1450, 1);
        }
        for j in 0..1450 {
            let generation = usize::from(j >= 700);
            let want: Vec<f32> = (0..8).map(|c| element(j, c, generation)).collect();
            let want_values: Vec<f32> = want.iter().map(|k| k + 0.5).collect();
            assert_eq!(
                read(&cache.layers[1], j),
                (want.clone(), want_values.clone())
            );
            // Slots of positions before 1500 - capacity went to positions the rewrite dropped.
            if j + capacity >= 1500 {
                assert_eq!(read(&cache.layers[0], j), (want, want_values), "ring {j}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "overruns a ring")]
    fn a_chunk_longer_than_the_ring_is_refused() {
        let mut cache = KvCache::new(&config(), 3000, 0).unwrap();
        let n = ROLLBACK_SLOTS + KEY_BLOCK * 2;
        cache.layers[0].store(0, &vec![0.0; n * 8], &vec![0.0; n * 8]);
    }
}
