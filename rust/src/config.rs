//! `config.json` in either checkpoint layout (SPEC §1.1 Hugging Face keys, §1.2 `original/` keys),
//! read into one typed, validated [`Config`].

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Which file layout a checkpoint directory uses (SPEC §2.2 vs §2.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `model.layers.N.*` names, separate q/k/v projections.
    HuggingFace,
    /// OpenAI's `block.N.*` names, fused qkv.
    Original,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKind {
    Sliding,
    Full,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub layout: Layout,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub num_local_experts: usize,
    pub num_experts_per_tok: usize,
    pub intermediate_size: usize,
    pub sliding_window: usize,
    pub layer_types: Vec<AttentionKind>,
    pub rope_theta: f64,
    pub rope_scaling_factor: f64,
    pub rope_beta_fast: f64,
    pub rope_beta_slow: f64,
    pub rope_original_max_position_embeddings: usize,
    /// Floor/ceil the YaRN correction range. gpt-oss ships `false`; transformers defaults a missing key to `true`.
    pub rope_truncate: bool,
    pub swiglu_limit: f32,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    pub eos_token_ids: Vec<u32>,
}

/// The fixed MXFP4 block length: scales cover 32 consecutive inputs (SPEC §3.3).
pub const MXFP4_BLOCK: usize = 32;

/// Sanity bounds, far above any gpt-oss model (24 or 36 layers, widths <= 201,088), so that a
/// corrupt config fails with a message instead of an impossible allocation.
const MAX_LAYERS: usize = 1024;
const MAX_DIM: usize = 1 << 24;

impl Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read config {}: {e}", path.display())))?;
        Self::from_json_str(&text).map_err(|e| match e {
            Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(Error::Config("expected a JSON object".into()));
        };
        let keys = Keys(&map);
        // The original layout is recognised by its own key names (SPEC §1.2).
        let config = if map.contains_key("num_experts") && !map.contains_key("num_local_experts") {
            Self::from_original_keys(&keys)?
        } else {
            Self::from_hf_keys(&keys)?
        };
        config.validate()?;
        Ok(config)
    }

    fn from_hf_keys(k: &Keys) -> Result<Self> {
        let layers = k.layer_count()?;
        // Newer transformers call it `rope_parameters` and move rope_theta inside (SPEC §1.1).
        let present = |key| k.0.get(key).filter(|v| !v.is_null());
        let rope = match present("rope_scaling").or_else(|| present("rope_parameters")) {
            Some(Value::Object(m)) => Some(m),
            Some(Value::Null) | None => None,
            Some(_) => return Err(Error::Config("'rope_scaling' must be an object".into())),
        };
        let rope = rope.map(Keys);
        let rope_theta = match (&rope, k.0.get("rope_theta")) {
            (_, Some(_)) => k.f64("rope_theta")?,
            (Some(r), None) => r.f64("rope_theta")?,
            (None, None) => return Err(Error::Config("missing key 'rope_theta'".into())),
        };
        let (factor, beta_fast, beta_slow, original_max, truncate) = match &rope {
            Some(r) => {
                let rope_type = r.0.get("rope_type").or_else(|| r.0.get("type"));
                if let Some(t) = rope_type.and_then(Value::as_str) {
                    if t != "yarn" {
                        return Err(Error::Config(format!(
                            "rope_scaling.rope_type: expected \"yarn\", found \"{t}\""
                        )));
                    }
                }
                (
                    r.f64("factor")?,
                    r.f64_or("beta_fast", 32.0)?,
                    r.f64_or("beta_slow", 1.0)?,
                    r.usize("original_max_position_embeddings")?,
                    r.bool_or("truncate", true)?,
                )
            }
            None => (1.0, 32.0, 1.0, k.usize("max_position_embeddings")?, false),
        };
        let layer_types = match k.0.get("layer_types") {
            None | Some(Value::Null) => alternating_layer_types(layers),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v.as_str() {
                    Some("sliding_attention") => Ok(AttentionKind::Sliding),
                    Some("full_attention") => Ok(AttentionKind::Full),
                    _ => Err(Error::Config(format!(
                        "layer_types[{i}]: expected \"sliding_attention\" or \"full_attention\", found {v}"
                    ))),
                })
                .collect::<Result<_>>()?,
            Some(other) => {
                return Err(Error::Config(format!(
                    "layer_types: expected a list, found {other}"
                )))
            }
        };
        let eos_token_ids = match k.0.get("eos_token_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| token_id(v, "eos_token_id"))
                .collect::<Result<_>>()?,
            Some(v) => vec![token_id(v, "eos_token_id")?],
        };
        let heads = k.usize("num_attention_heads")?;
        let hidden = k.usize("hidden_size")?;
        Ok(Config {
            layout: Layout::HuggingFace,
            vocab_size: k.usize("vocab_size")?,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: k.usize("num_key_value_heads")?,
            head_dim: k.usize_or("head_dim", 64)?,
            num_local_experts: k.usize("num_local_experts")?,
            num_experts_per_tok: match k.0.get("num_experts_per_tok") {
                Some(_) => k.usize("num_experts_per_tok")?,
                None => k.usize("experts_per_token")?,
            },
            intermediate_size: k.usize("intermediate_size")?,
            sliding_window: k.usize("sliding_window")?,
            layer_types,
            rope_theta,
            rope_scaling_factor: factor,
            rope_beta_fast: beta_fast,
            rope_beta_slow: beta_slow,
            rope_original_max_position_embeddings: original_max,
            rope_truncate: truncate,
            swiglu_limit: k.f64_or("swiglu_limit", 7.0)? as f32,
            rms_norm_eps: k.f64_or("rms_norm_eps", 1e-5)? as f32,
            max_position_embeddings: k.usize("max_position_embeddings")?,
            eos_token_ids,
        })
    }

    fn from_original_keys(k: &Keys) -> Result<Self> {
        let layers = k.layer_count()?;
        let initial_context = k.usize("initial_context_length")?;
        let factor = k.f64("rope_scaling_factor")?;
        let vocab_size = k.usize("vocab_size")?;
        Ok(Config {
            layout: Layout::Original,
            vocab_size,
            hidden_size: k.usize("hidden_size")?,
            num_hidden_layers: layers,
            num_attention_heads: k.usize("num_attention_heads")?,
            num_key_value_heads: k.usize("num_key_value_heads")?,
            head_dim: k.usize("head_dim")?,
            num_local_experts: k.usize("num_experts")?,
            num_experts_per_tok: k.usize("experts_per_token")?,
            intermediate_size: k.usize("intermediate_size")?,
            sliding_window: k.usize("sliding_window")?,
            // The reference slides on even layers (SPEC §4.3.4); the original config has no list.
            layer_types: alternating_layer_types(layers),
            rope_theta: k.f64("rope_theta")?,
            rope_scaling_factor: factor,
            // Names look swapped but are not: ntk_beta is beta_fast (SPEC §9.15).
            rope_beta_fast: k.f64("rope_ntk_beta")?,
            rope_beta_slow: k.f64("rope_ntk_alpha")?,
            rope_original_max_position_embeddings: initial_context,
            rope_truncate: false,
            swiglu_limit: k.f64("swiglu_limit")? as f32,
            // Hard-coded in the reference: the original config has no eps.
            rms_norm_eps: 1e-5,
            max_position_embeddings: (initial_context as f64 * factor) as usize,
            // No token ids in this layout: <|return|> is gpt-oss's (SPEC §1.3), if the vocabulary has it.
            eos_token_ids: [200002]
                .into_iter()
                .filter(|&id| id < vocab_size as u32)
                .collect(),
        })
    }

    fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("num_local_experts", self.num_local_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("intermediate_size", self.intermediate_size),
            ("sliding_window", self.sliding_window),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, value) in positive {
            if value == 0 || value > MAX_DIM {
                return Err(Error::Config(format!(
                    "{name}: expected a positive integer up to {MAX_DIM}, found {value}"
                )));
            }
        }
        // Widths derived from the above must stay sane too (q and kv projections).
        let q_dim = self.num_attention_heads.checked_mul(self.head_dim);
        if q_dim.is_none_or(|q| q > MAX_DIM) {
            return Err(Error::Config(format!(
                "num_attention_heads x head_dim = {} x {} exceeds {MAX_DIM}",
                self.num_attention_heads, self.head_dim
            )));
        }
        let bad = |msg: String| Err(Error::Config(msg));
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.num_experts_per_tok > self.num_local_experts {
            return bad(format!(
                "num_experts_per_tok ({}) exceeds num_local_experts ({})",
                self.num_experts_per_tok, self.num_local_experts
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim must be even for RoPE, found {}",
                self.head_dim
            ));
        }
        for (name, value) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
        ] {
            if !value.is_multiple_of(MXFP4_BLOCK) {
                return bad(format!(
                    "{name}: expected a multiple of the MXFP4 block size {MXFP4_BLOCK}, found {value}"
                ));
            }
        }
        if self.layer_types.len() != self.num_hidden_layers {
            return bad(format!(
                "layer_types: expected {} entries (num_hidden_layers), found {}",
                self.num_hidden_layers,
                self.layer_types.len()
            ));
        }
        let finite_positive = [
            ("rope_theta", self.rope_theta),
            ("rope_scaling.factor", self.rope_scaling_factor),
            ("rope_scaling.beta_fast", self.rope_beta_fast),
            ("rope_scaling.beta_slow", self.rope_beta_slow),
            ("swiglu_limit", self.swiglu_limit as f64),
            ("rms_norm_eps", self.rms_norm_eps as f64),
        ];
        for (name, value) in finite_positive {
            if !(value.is_finite() && value > 0.0) {
                return bad(format!(
                    "{name}: expected a finite positive number, found {value}"
                ));
            }
        }
        if self.rope_theta <= 1.0 || self.rope_original_max_position_embeddings == 0 {
            return bad(
                "rope_theta must exceed 1 and original_max_position_embeddings be positive".into(),
            );
        }
        if let Some(id) = self
            .eos_token_ids
            .iter()
            .find(|&&id| id as usize >= self.vocab_size)
        {
            return bad(format!(
                "eos_token_id {id} is outside the vocabulary ({})",
                self.vocab_size
            ));
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    pub fn is_sliding(&self, layer: usize) -> bool {
        self.layer_types[layer] == AttentionKind::Sliding
    }
}

fn alternating_layer_types(layers: usize) -> Vec<AttentionKind> {
    (0..layers)
        .map(|i| {
            if i % 2 == 0 {
                AttentionKind::Sliding
            } else {
                AttentionKind::Full
            }
        })
        .collect()
}

fn token_id(v: &Value, name: &str) -> Result<u32> {
    v.as_u64()
        .and_then(|id| u32::try_from(id).ok())
        .ok_or_else(|| Error::Config(format!("{name}: expected a token id, found {v}")))
}

/// Typed look-ups with messages that name the key and what was found.
struct Keys<'a>(&'a Map<String, Value>);

impl Keys<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.0
            .get(key)
            .ok_or_else(|| Error::Config(format!("missing key '{key}'")))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        // Accept 4096.0 as well as 4096: whether the files write ints or floats is unspecified (SPEC §10).
        let n = match v {
            Value::Number(n) => n.as_u64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1e15)
                    .map(|f| f as u64)
            }),
            _ => None,
        };
        n.and_then(|n| usize::try_from(n).ok()).ok_or_else(|| {
            Error::Config(format!(
                "'{key}': expected a non-negative integer, found {v}"
            ))
        })
    }

    /// `num_hidden_layers`, bounded before anything is sized by it.
    fn layer_count(&self) -> Result<usize> {
        let layers = self.usize("num_hidden_layers")?;
        if layers > MAX_LAYERS {
            return Err(Error::Config(format!(
                "num_hidden_layers: expected at most {MAX_LAYERS}, found {layers}"
            )));
        }
        Ok(layers)
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(_) => self.usize(key),
        }
    }

    fn f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        v.as_f64()
            .ok_or_else(|| Error::Config(format!("'{key}': expected a number, found {v}")))
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(_) => self.f64(key),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(Error::Config(format!(
                "'{key}': expected true or false, found {v}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = r#"{"hidden_size":128,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":1,"head_dim":64,"num_local_experts":8,"num_experts_per_tok":4,
        "intermediate_size":96,"sliding_window":8,"vocab_size":512,"rope_theta":150000,
        "rope_scaling":{"factor":32.0,"beta_fast":32.0,"beta_slow":1.0,
            "original_max_position_embeddings":4096,"rope_type":"yarn","truncate":false},
        "max_position_embeddings":131072,"swiglu_limit":7.0,"rms_norm_eps":1e-5,"eos_token_id":511}"#;

    #[test]
    fn hf_keys_parse_with_defaults() {
        let c = Config::from_json_str(TINY).unwrap();
        assert_eq!(c.layout, Layout::HuggingFace);
        assert_eq!(
            c.layer_types,
            vec![AttentionKind::Sliding, AttentionKind::Full]
        );
        assert_eq!(c.q_dim(), 256);
        assert!(!c.rope_truncate);
        assert_eq!(c.eos_token_ids, vec![511]);
    }

    #[test]
    fn original_keys_map_to_the_same_config() {
        let original = r#"{"num_hidden_layers":2,"num_experts":8,"experts_per_token":4,
            "vocab_size":512,"hidden_size":128,"intermediate_size":96,"swiglu_limit":7.0,
            "head_dim":64,"num_attention_heads":4,"num_key_value_heads":1,"sliding_window":8,
            "initial_context_length":4096,"rope_theta":150000,"rope_scaling_factor":32.0,
            "rope_ntk_alpha":1.0,"rope_ntk_beta":32.0}"#;
        let mut o = Config::from_json_str(original).unwrap();
        let h = Config::from_json_str(TINY).unwrap();
        assert_eq!(o.layout, Layout::Original);
        o.layout = Layout::HuggingFace;
        o.eos_token_ids = h.eos_token_ids.clone();
        assert_eq!(o, h);
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = Config::from_json_str(
            &TINY.replace("\"num_key_value_heads\":1", "\"num_key_value_heads\":3"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");
        let err = Config::from_json_str(&TINY.replace("\"hidden_size\":128", "\"hidden_size\":-1"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("'hidden_size'") && err.contains("-1"), "{err}");
        let err = Config::from_json_str("[1]").unwrap_err().to_string();
        assert!(err.contains("JSON object"), "{err}");
    }
}
