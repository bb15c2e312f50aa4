//! Key/value cache: post-RoPE keys and values of every processed token, per layer (SPEC §4.6).
//!
//! Full-attention layers keep every position, growing up to `max_context`. Sliding layers only ever
//! look back `sliding_window` positions, so they keep a ring of the last `window + ROLLBACK_SLOTS`:
//! the extra slots let [`KvCache::truncate`] step back that far without recomputing anything.
//!
//! Each KV head's keys and values are stored apart, in blocks of [`KEY_BLOCK`] slots: values
//! `[block, KEY_BLOCK, head_dim]` and keys transposed, `[block, head_dim, KEY_BLOCK]`, so that
//! attention scores vectorise over positions. Attention reads one KV head at a time, so it streams
//! one run of memory per head, which the hardware prefetchers follow; blocks that interleaved the
//! heads left it runs of `KEY_BLOCK · head_dim` elements a whole block apart, read at ~2/3 of the
//! bandwidth. Elements are f32, or bf16 where the model was loaded with `kv_cache="bf16"`
//! ([`KvFormat`]).

use crate::config::Config;
use crate::error::{try_zeroed, Result};
use crate::kernels::attention::{Bf16, KeyValues, KvElement, KEY_BLOCK};

/// The element type of a cache's keys and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvFormat {
    F32,
    /// Rounded to bf16 (to nearest even): half the memory, and half the bytes attention streams
    /// per decoded token at long context (406 MB instead of 812 MB at depth 16384 for the 20b).
    Bf16,
}

impl KvFormat {
    pub const ALL: [KvFormat; 2] = [KvFormat::F32, KvFormat::Bf16];

    pub fn name(self) -> &'static str {
        match self {
            KvFormat::F32 => "f32",
            KvFormat::Bf16 => "bf16",
        }
    }

    /// The format called `name` (`"f32"` or `"bf16"`).
    pub fn from_name(name: &str) -> std::result::Result<KvFormat, String> {
        crate::error::by_name(&KvFormat::ALL, KvFormat::name, name)
    }
}

/// Positions a sliding layer keeps beyond its window, so that short rollbacks (regenerating a reply,
/// reusing a prompt prefix) stay cheap.
pub const ROLLBACK_SLOTS: usize = 1024;

pub struct LayerCache<E> {
    /// Per KV head: its blocks of keys.
    keys: Vec<Vec<E>>,
    /// Per KV head: its blocks of values.
    values: Vec<Vec<E>>,
    /// Ring capacity in positions (a multiple of `KEY_BLOCK`) for sliding layers; `None` for full
    /// layers.
    ring: Option<usize>,
    /// Keys a position attends to, itself included (`usize::MAX` for full layers).
    window: usize,
    head_dim: usize,
}

impl<E: KvElement> LayerCache<E> {
    fn new(config: &Config, layer: usize, ring_capacity: usize) -> Result<Self> {
        let sliding = config.is_sliding(layer);
        let ring = sliding.then_some(ring_capacity);
        let len = ring.unwrap_or(0).saturating_mul(config.head_dim);
        let heads = || {
            (0..config.num_key_value_heads)
                .map(|_| try_zeroed(len, "sliding-window KV cache"))
                .collect::<Result<Vec<_>>>()
        };
        Ok(LayerCache {
            keys: heads()?,
            values: heads()?,
            ring,
            window: if sliding {
                config.sliding_window
            } else {
                usize::MAX
            },
            head_dim: config.head_dim,
        })
    }

    fn slot(&self, position: usize) -> usize {
        self.ring.map_or(position, |capacity| position % capacity)
    }

    /// Where the block of positions `block·KEY_BLOCK..` lies in a KV head's keys or values.
    #[inline]
    fn block_range(&self, block: usize) -> std::ops::Range<usize> {
        let block = self
            .ring
            .map_or(block, |capacity| block % (capacity / KEY_BLOCK));
        let len = KEY_BLOCK * self.head_dim;
        block * len..(block + 1) * len
    }

    /// Stores keys and values `[n, kv_dim]` of positions `first..first + n`, dropping anything cached
    /// at or after `first`. Attention then reads this chunk from the cache, so a ring must be able to
    /// hold the chunk and the window before it.
    pub fn store(&mut self, first: usize, keys: &[f32], values: &[f32]) {
        let kv_dim = self.keys.len() * self.head_dim;
        let n = keys.len() / kv_dim;
        match self.ring {
            None => {
                let len = (first + n).next_multiple_of(KEY_BLOCK) * self.head_dim;
                for head in self.keys.iter_mut().chain(&mut self.values) {
                    head.resize(len, E::default());
                }
            }
            Some(capacity) => assert!(
                first + n - (first + 1).saturating_sub(self.window) <= capacity,
                "a chunk of {n} positions overruns a ring of {capacity}"
            ),
        }
        let dim = self.head_dim;
        for (i, (key, value)) in keys
            .chunks_exact(kv_dim)
            .zip(values.chunks_exact(kv_dim))
            .enumerate()
        {
            let slot = self.slot(first + i);
            let (block, lane) = (slot / KEY_BLOCK * KEY_BLOCK * dim, slot % KEY_BLOCK);
            let heads = self.keys.iter_mut().zip(&mut self.values);
            for ((stored_keys, stored_values), (key, value)) in
                heads.zip(key.chunks_exact(dim).zip(value.chunks_exact(dim)))
            {
                let stored = &mut stored_values[block + lane * dim..][..dim];
                for (s, &v) in stored.iter_mut().zip(value) {
                    *s = E::from_f32(v);
                }
                for (row, &k) in stored_keys[block..][..KEY_BLOCK * dim]
                    .chunks_exact_mut(KEY_BLOCK)
                    .zip(key)
                {
                    row[lane] = E::from_f32(k);
                }
            }
        }
    }

    fn bytes(&self) -> usize {
        let elements: usize = self
            .keys
            .iter()
            .chain(&self.values)
            .map(Vec::capacity)
            .sum();
        elements * std::mem::size_of::<E>()
    }

    /// Blocks a session file stores for this layer when the cache holds `tokens` positions: those
    /// of cached positions (full layer) or the whole ring (sliding layer).
    fn stored_blocks(&self, tokens: usize) -> usize {
        self.ring.unwrap_or(tokens).div_ceil(KEY_BLOCK)
    }

    /// Elements of the keys (or of the values) a session file stores for this layer.
    fn stored_len(&self, tokens: usize) -> usize {
        self.stored_blocks(tokens) * KEY_BLOCK * self.keys.len() * self.head_dim
    }

    /// Where the stored blocks of this layer's keys (or values) lie, as (KV head, range), in a
    /// session file's order: block by block, each block's KV heads in turn. That was the cache's
    /// layout for format 2, and files keep it.
    fn file_order(&self, tokens: usize) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> {
        let (heads, len) = (self.keys.len(), KEY_BLOCK * self.head_dim);
        (0..self.stored_blocks(tokens))
            .flat_map(move |block| (0..heads).map(move |g| (g, block * len..(block + 1) * len)))
    }
}

impl<E: KvElement> KeyValues for LayerCache<E> {
    type Element = E;

    #[inline]
    fn key_block(&self, kv_head: usize, block: usize) -> &[E] {
        &self.keys[kv_head][self.block_range(block)]
    }

    #[inline]
    fn value_block(&self, kv_head: usize, block: usize) -> &[E] {
        &self.values[kv_head][self.block_range(block)]
    }
}

/// Every layer's cache, in one element type.
pub enum Layers {
    F32(Vec<LayerCache<f32>>),
    Bf16(Vec<LayerCache<Bf16>>),
}

/// `$body` with `$caches` bound to the `Vec<LayerCache<E>>` of `$layers` (a [`Layers`], or a
/// reference to one), whichever element type it holds: the code is the same for both.
macro_rules! with_layers {
    ($layers:expr, |$caches:ident| $body:expr) => {
        match $layers {
            $crate::kv_cache::Layers::F32($caches) => $body,
            $crate::kv_cache::Layers::Bf16($caches) => $body,
        }
    };
}
pub(crate) use with_layers;

pub struct KvCache {
    pub layers: Layers,
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
    pub fn new(
        config: &Config,
        max_context: usize,
        position_offset: usize,
        format: KvFormat,
    ) -> Result<Self> {
        let capacity = (config.sliding_window + ROLLBACK_SLOTS)
            .min(max_context)
            .next_multiple_of(KEY_BLOCK);
        let layers = 0..config.num_hidden_layers;
        let layers = match format {
            KvFormat::F32 => Layers::F32(
                layers
                    .map(|l| LayerCache::new(config, l, capacity))
                    .collect::<Result<_>>()?,
            ),
            KvFormat::Bf16 => Layers::Bf16(
                layers
                    .map(|l| LayerCache::new(config, l, capacity))
                    .collect::<Result<_>>()?,
            ),
        };
        let sliding = (0..config.num_hidden_layers).any(|l| config.is_sliding(l));
        let ring_capacity = if sliding { capacity } else { usize::MAX };
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

    pub fn format(&self) -> KvFormat {
        match self.layers {
            Layers::F32(_) => KvFormat::F32,
            Layers::Bf16(_) => KvFormat::Bf16,
        }
    }

    pub fn bytes(&self) -> usize {
        with_layers!(&self.layers, |layers| layers
            .iter()
            .map(LayerCache::bytes)
            .sum())
    }

    /// Elements of the keys (and as many of the values) a session file stores per layer: the blocks
    /// of cached positions (full layers) or the whole ring (sliding layers).
    pub fn layer_values(&self) -> Vec<usize> {
        with_layers!(&self.layers, |layers| layers
            .iter()
            .map(|l| l.stored_len(self.len()))
            .collect())
    }

    /// Gives `write` what a session file stores after its header: each layer's keys, then its
    /// values, as bytes of the cache's element type.
    pub fn write_layers(&self, mut write: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
        fn each<E: KvElement>(
            layers: &[LayerCache<E>],
            tokens: usize,
            write: &mut impl FnMut(&[u8]) -> Result<()>,
        ) -> Result<()> {
            for layer in layers {
                for heads in [&layer.keys, &layer.values] {
                    for (g, range) in layer.file_order(tokens) {
                        write(bytemuck::cast_slice(&heads[g][range]))?;
                    }
                }
            }
            Ok(())
        }
        with_layers!(&self.layers, |layers| each(layers, self.len(), &mut write))
    }

    pub fn ring_valid_from(&self) -> usize {
        self.ring_valid_from
    }

    /// Whether a session file's `layer_values` (as [`KvCache::layer_values`] gave them) and
    /// `ring_valid_from` fit this cache holding `tokens` positions.
    pub fn check_restore(
        &self,
        tokens: usize,
        ring_valid_from: usize,
        layer_values: &[usize],
    ) -> std::result::Result<(), String> {
        if tokens > self.max_context {
            return Err(format!(
                "{tokens} tokens exceed max_context {}",
                self.max_context
            ));
        }
        if ring_valid_from > tokens {
            return Err(format!(
                "ring_valid_from {ring_valid_from} is past the {tokens} tokens"
            ));
        }
        let expected: Vec<usize> = with_layers!(&self.layers, |layers| layers
            .iter()
            .map(|l| l.stored_len(tokens))
            .collect());
        if layer_values.len() != expected.len() {
            return Err(format!(
                "{} layers, expected {}",
                layer_values.len(),
                expected.len()
            ));
        }
        for (i, (&n, &want)) in layer_values.iter().zip(&expected).enumerate() {
            if n != want {
                return Err(format!("layer {i}: {n} values, expected {want}"));
            }
        }
        Ok(())
    }

    /// Refills an empty cache from a session file whose sizes [`KvCache::check_restore`]
    /// accepted: `read` fills each layer's keys, then its values, with the stored bytes.
    pub fn restore(
        &mut self,
        tokens: Vec<u32>,
        ring_valid_from: usize,
        mut read: impl FnMut(&mut [u8]) -> Result<()>,
    ) -> Result<()> {
        fn fill<E: KvElement>(
            layers: &mut [LayerCache<E>],
            tokens: usize,
            read: &mut impl FnMut(&mut [u8]) -> Result<()>,
        ) -> Result<()> {
            for layer in layers {
                let len = layer.stored_blocks(tokens) * KEY_BLOCK * layer.head_dim;
                let order: Vec<_> = layer.file_order(tokens).collect();
                for heads in [&mut layer.keys, &mut layer.values] {
                    for head in heads.iter_mut() {
                        *head = try_zeroed(len, "session file")?;
                    }
                    for (g, range) in &order {
                        read(bytemuck::cast_slice_mut(&mut heads[*g][range.clone()]))?;
                    }
                }
            }
            Ok(())
        }
        with_layers!(&mut self.layers, |layers| fill(
            layers,
            tokens.len(),
            &mut read
        ))?;
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

    fn fill<E: KvElement>(
        layer: &mut LayerCache<E>,
        positions: std::ops::Range<usize>,
        generation: usize,
    ) {
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
    fn read<E: KvElement>(layer: &LayerCache<E>, j: usize) -> (Vec<f32>, Vec<f32>) {
        let (block, lane) = (j / KEY_BLOCK, j % KEY_BLOCK);
        (0..2)
            .flat_map(|g| (0..4).map(move |d| (g, d)))
            .map(|(g, d)| {
                (
                    layer.key_block(g, block)[d * KEY_BLOCK + lane].to_f32(),
                    layer.value_block(g, block)[lane * 4 + d].to_f32(),
                )
            })
            .unzip()
    }

    #[test]
    fn blocks_hold_every_position_and_rings_the_last_ones() {
        let mut cache = KvCache::new(&config(), 3000, 0, KvFormat::F32).unwrap();
        let Layers::F32(layers) = &mut cache.layers else {
            panic!("f32 cache expected")
        };
        let capacity = (8 + ROLLBACK_SLOTS).next_multiple_of(KEY_BLOCK);
        for layer in layers.iter_mut() {
            fill(layer, 0..1500, 0);
            // Rewrite from 700 on, as after a truncation.
            fill(layer, 700..1450, 1);
        }
        for j in 0..1450 {
            let generation = usize::from(j >= 700);
            let want: Vec<f32> = (0..8).map(|c| element(j, c, generation)).collect();
            let want_values: Vec<f32> = want.iter().map(|k| k + 0.5).collect();
            assert_eq!(read(&layers[1], j), (want.clone(), want_values.clone()));
            // Slots of positions before 1500 - capacity went to positions the rewrite dropped.
            if j + capacity >= 1500 {
                assert_eq!(read(&layers[0], j), (want, want_values), "ring {j}");
            }
        }
    }

    /// Session files keep the layout the cache had for format 2: per layer, the keys then the
    /// values, block by block, each block holding every KV head's part in turn.
    #[test]
    fn session_data_keeps_the_file_layout_and_restores_every_position() {
        let mut cache = KvCache::new(&config(), 3000, 0, KvFormat::F32).unwrap();
        let Layers::F32(layers) = &mut cache.layers else {
            panic!("f32 cache expected")
        };
        for layer in layers.iter_mut() {
            fill(layer, 0..100, 0);
        }
        cache.commit(&[7; 100]);
        let ring = (8 + ROLLBACK_SLOTS).next_multiple_of(KEY_BLOCK);
        assert_eq!(cache.layer_values(), [ring * 8, 2 * KEY_BLOCK * 8]);
        let mut bytes = Vec::new();
        cache
            .write_layers(|b| {
                bytes.extend_from_slice(b);
                Ok(())
            })
            .unwrap();
        let stored: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_ne_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(stored.len(), 2 * (ring * 8 + 2 * KEY_BLOCK * 8));
        // The ring's first 100 slots hold positions 0..100, as the full layer's do.
        let (ring_layer, full_layer) = stored.split_at(2 * ring * 8);
        for (layer, len) in [(ring_layer, ring * 8), (full_layer, 2 * KEY_BLOCK * 8)] {
            let (keys, values) = layer.split_at(len);
            for j in 0..100 {
                let (block, lane) = (j / KEY_BLOCK, j % KEY_BLOCK);
                for (g, d) in (0..2).flat_map(|g| (0..4).map(move |d| (g, d))) {
                    let part = (block * 2 + g) * 4 * KEY_BLOCK;
                    let want = element(j, g * 4 + d, 0);
                    assert_eq!(keys[part + d * KEY_BLOCK + lane], want);
                    assert_eq!(values[part + lane * 4 + d], want + 0.5);
                }
            }
        }

        let mut restored = KvCache::new(&config(), 3000, 0, KvFormat::F32).unwrap();
        let mut offset = 0;
        restored
            .restore(cache.tokens().to_vec(), 0, |buffer| {
                buffer.copy_from_slice(&bytes[offset..][..buffer.len()]);
                offset += buffer.len();
                Ok(())
            })
            .unwrap();
        assert_eq!(offset, bytes.len());
        let (Layers::F32(layers), Layers::F32(restored_layers)) = (&cache.layers, &restored.layers)
        else {
            panic!("f32 caches expected")
        };
        for j in 0..100 {
            for l in 0..2 {
                assert_eq!(read(&restored_layers[l], j), read(&layers[l], j));
            }
        }
    }

    #[test]
    fn a_bf16_cache_stores_rounded_values_in_half_the_bytes() {
        let f32_bytes = KvCache::new(&config(), 3000, 0, KvFormat::F32)
            .unwrap()
            .bytes();
        let mut cache = KvCache::new(&config(), 3000, 0, KvFormat::Bf16).unwrap();
        assert_eq!(cache.bytes() * 2, f32_bytes);
        let Layers::Bf16(layers) = &mut cache.layers else {
            panic!("bf16 cache expected")
        };
        let keys: Vec<f32> = (0..8).map(|c| 1.0 + c as f32 / 300.0).collect();
        let values: Vec<f32> = keys.iter().map(|k| -k).collect();
        layers[1].store(70, &keys, &values);
        let round =
            |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| Bf16::from_f32(x).to_f32()).collect() };
        assert_eq!(read(&layers[1], 70), (round(&keys), round(&values)));
        assert_ne!(round(&keys), keys);
    }

    #[test]
    #[should_panic(expected = "overruns a ring")]
    fn a_chunk_longer_than_the_ring_is_refused() {
        let mut cache = KvCache::new(&config(), 3000, 0, KvFormat::F32).unwrap();
        let n = ROLLBACK_SLOTS + KEY_BLOCK * 2;
        let Layers::F32(layers) = &mut cache.layers else {
            panic!("f32 cache expected")
        };
        layers[0].store(0, &vec![0.0; n * 8], &vec![0.0; n * 8]);
    }
}
