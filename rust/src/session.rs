//! A conversation's state: the KV cache of one [`Model`] and the logits of its last position.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::kv_cache::{KvCache, KvFormat};
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
        let cache = model.new_cache(max_context, 0)?;
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

    /// Writes the cached tokens, keys and values and the last logits to `path`, so that
    /// [`Session::load`] resumes exactly here without recomputing anything.
    pub fn save(&self, path: &Path) -> Result<()> {
        let header = serde_json::json!({
            "format": SESSION_FORMAT,
            "model": format!("{:016x}", self.model.fingerprint),
            "precision": self.model.precision.name(),
            "dense": self.model.dense.name(),
            "max_context": self.cache.max_context,
            "tokens": self.cache.tokens(),
            "ring_valid_from": self.cache.ring_valid_from(),
            "kv": self.cache.format().name(),
            "layer_values": self.cache.layer_values(),
            "logits": self.last_logits.as_ref().map_or(0, Vec::len),
        })
        .to_string();
        let io = |e: std::io::Error| {
            Error::Input(format!("cannot write session file {}: {e}", path.display()))
        };
        let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
        out.write_all(SESSION_MAGIC).map_err(io)?;
        out.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(header.as_bytes()).map_err(io)?;
        self.cache
            .write_layers(|bytes| out.write_all(bytes).map_err(io))?;
        let last_logits = self.last_logits.as_deref().unwrap_or_default();
        out.write_all(bytemuck::cast_slice(last_logits))
            .map_err(io)?;
        out.flush().map_err(io)
    }

    /// Resumes a session saved by [`Session::save`] with the same model.
    pub fn load(model: Arc<Model>, path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Input(format!("session file {}: {msg}", path.display()));
        let mut file =
            std::io::BufReader::new(std::fs::File::open(path).map_err(|e| bad(e.to_string()))?);
        let mut magic = [0u8; 8];
        let mut len = [0u8; 8];
        file.read_exact(&mut magic)
            .map_err(|e| bad(e.to_string()))?;
        if &magic != SESSION_MAGIC {
            return Err(bad("not a gpt-oss-cpu session file".into()));
        }
        file.read_exact(&mut len).map_err(|e| bad(e.to_string()))?;
        let len = u64::from_le_bytes(len);
        if len > 1 << 30 {
            return Err(bad(format!("header of {len} bytes")));
        }
        let mut header = vec![0u8; len as usize];
        file.read_exact(&mut header)
            .map_err(|e| bad(format!("truncated header: {e}")))?;
        let header: SessionHeader =
            serde_json::from_slice(&header).map_err(|e| bad(format!("bad header: {e}")))?;
        if !(OLDEST_SESSION_FORMAT..=SESSION_FORMAT).contains(&header.format) {
            return Err(bad(format!(
                "format {}, expected {OLDEST_SESSION_FORMAT} to {SESSION_FORMAT}",
                header.format
            )));
        }
        let fingerprint = format!("{:016x}", model.fingerprint);
        if header.model != fingerprint {
            return Err(bad(format!(
                "saved with another model (fingerprint {}, this model {fingerprint} at {})",
                header.model,
                model.dir.display()
            )));
        }
        let settings = (model.precision.name(), model.dense.name());
        if (header.precision.as_str(), header.dense.as_str()) != settings {
            return Err(bad(format!(
                "its keys and values were computed with precision={:?}, dense={:?}; this model \
                 runs precision={:?}, dense={:?} (load the model with those to resume)",
                header.precision, header.dense, settings.0, settings.1
            )));
        }
        let mut session = Session::new(model, header.max_context)?;
        let stored = KvFormat::from_name(&header.kv).map_err(|e| bad(format!("kv: {e}")))?;
        if stored != session.cache.format() {
            return Err(bad(format!(
                "keys and values stored as {}, this model's cache holds {} (load the model \
                 with kv_cache={:?} to resume)",
                stored.name(),
                session.cache.format().name(),
                stored.name()
            )));
        }
        session
            .cache
            .check_restore(
                header.tokens.len(),
                header.ring_valid_from,
                &header.layer_values,
            )
            .map_err(bad)?;
        let mut read = |bytes: &mut [u8]| -> Result<()> {
            file.read_exact(bytes)
                .map_err(|e| bad(format!("truncated data: {e}")))
        };
        session
            .cache
            .restore(header.tokens, header.ring_valid_from, &mut read)?;
        let mut logits: Vec<f32> = crate::error::try_zeroed(header.logits, "session file")?;
        read(bytemuck::cast_slice_mut(&mut logits))?;
        if !logits.is_empty() {
            if logits.len() != session.model.config.vocab_size {
                return Err(bad(format!(
                    "{} logits, expected the vocabulary size",
                    logits.len()
                )));
            }
            session.last_logits = Some(logits);
        }
        Ok(session)
    }
}

const SESSION_MAGIC: &[u8; 8] = b"GOCPUKV\0";
/// 2: keys and values stored in blocks of 64 positions (version 1 files would load misread).
/// 3: the element type of the keys and values is recorded (`kv`: f32, or bf16 for models loaded
/// with `kv_cache="bf16"`).
const SESSION_FORMAT: u32 = 3;
/// Format 2 files are format 3 files with f32 keys and values and no `kv` field.
const OLDEST_SESSION_FORMAT: u32 = 2;

#[derive(serde::Deserialize)]
struct SessionHeader {
    format: u32,
    model: String,
    precision: String,
    dense: String,
    max_context: usize,
    tokens: Vec<u32>,
    ring_valid_from: usize,
    #[serde(default = "f32_name")]
    kv: String,
    layer_values: Vec<usize>,
    logits: usize,
}

fn f32_name() -> String {
    KvFormat::F32.name().into()
}
