//! The model's parameters, typed and shape-checked, as views into the mapped checkpoint.
//!
//! Large matrices stay where they are in the file: bf16 matrices as `u16` bit patterns, MXFP4 experts
//! as packed nibbles and E8M0 scales (SPEC §3). Only the small vectors (norm scales, biases, sinks) are
//! converted to f32 once, at load.

use std::path::PathBuf;

use safetensors::Dtype;

use crate::checkpoint::{Checkpoint, TensorBytes};
use crate::config::{Config, Layout, MXFP4_BLOCK};
use crate::dense_q8::{self, Q8Matrix};
use crate::error::Result;
use crate::kernels::{Isa, WeightMatrix};

/// The format the dense matrices (attention and unembedding) are read in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseFormat {
    /// The checkpoint's own bf16, in place.
    Bf16,
    /// Requantized at load to 8 bits per value and a bf16 scale per 32 (34 bytes per 32 weights
    /// instead of 64), as ggml's published gpt-oss GGUF stores them (with an f16 scale).
    Q8,
}

impl DenseFormat {
    pub const ALL: [DenseFormat; 2] = [DenseFormat::Bf16, DenseFormat::Q8];

    pub fn name(self) -> &'static str {
        match self {
            DenseFormat::Bf16 => "bf16",
            DenseFormat::Q8 => "q8",
        }
    }

    /// The format called `name` (`"bf16"` or `"q8"`).
    pub fn from_name(name: &str) -> std::result::Result<DenseFormat, String> {
        crate::error::by_name(&DenseFormat::ALL, DenseFormat::name, name)
    }
}

/// A row-major `[rows, cols]` bf16 matrix in the `nn.Linear` orientation `[out, in]`.
pub struct Bf16Matrix {
    bytes: TensorBytes,
    pub rows: usize,
    pub cols: usize,
}

impl Bf16Matrix {
    /// The raw bf16 bit patterns. Alignment was checked by [`Checkpoint::take`].
    pub fn data(&self) -> &[u16] {
        bytemuck::cast_slice(&self.bytes)
    }

    pub fn row(&self, r: usize) -> &[u16] {
        &self.data()[r * self.cols..(r + 1) * self.cols]
    }
}

/// `y = x·Wᵀ + b`.
pub struct Linear {
    pub weight: Bf16Matrix,
    pub bias: Vec<f32>,
    /// `weight` in 8 bits, when the dense format is [`DenseFormat::Q8`].
    pub q8: Option<Q8Matrix>,
}

impl Linear {
    /// The weights in the format the kernels read.
    pub fn matrix(&self) -> WeightMatrix<'_> {
        dense_matrix(&self.weight, self.q8.as_ref())
    }
}

fn dense_matrix<'a>(bf16: &'a Bf16Matrix, q8: Option<&'a Q8Matrix>) -> WeightMatrix<'a> {
    match q8 {
        Some(q) => WeightMatrix::Q8 {
            codes: q.codes(),
            scales: q.scales(),
        },
        None => WeightMatrix::Bf16(bf16.data()),
    }
}

/// One projection of every expert of a layer, MXFP4-packed: logical shape `[experts, rows, cols]`.
pub struct Mxfp4Experts {
    /// `[experts, rows, cols / 32, 16]`: byte j of a block holds element 2j (low nibble) and 2j+1.
    blocks: TensorBytes,
    /// `[experts, rows, cols / 32]`: E8M0 exponents.
    scales: TensorBytes,
    /// `[experts, rows]`.
    pub bias: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl Mxfp4Experts {
    /// The packed blocks and scales of one expert's `[rows, cols]` matrix.
    pub fn expert(&self, e: usize) -> (&[u8], &[u8]) {
        let block_bytes = self.rows * self.cols / 2;
        let scale_bytes = self.rows * self.cols / MXFP4_BLOCK;
        (
            &self.blocks[e * block_bytes..(e + 1) * block_bytes],
            &self.scales[e * scale_bytes..(e + 1) * scale_bytes],
        )
    }

    pub fn expert_bias(&self, e: usize) -> &[f32] {
        &self.bias[e * self.rows..(e + 1) * self.rows]
    }
}

pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// One logit per query head, added to the softmax denominator (SPEC §4.3.4).
    pub sinks: Vec<f32>,
    pub mlp_norm: Vec<f32>,
    pub router: Linear,
    /// Rows interleave gate (even) and up (odd) of each intermediate unit (SPEC §2.4).
    pub gate_up: Mxfp4Experts,
    pub down: Mxfp4Experts,
}

pub struct Weights {
    pub embedding: Bf16Matrix,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Vec<f32>,
    pub unembedding: Bf16Matrix,
    unembedding_q8: Option<Q8Matrix>,
}

/// Tensor names of one layout (SPEC §2.2 and §2.3).
struct Names {
    layout: Layout,
}

impl Names {
    fn global(&self, hf: &str, original: &str) -> String {
        match self.layout {
            Layout::HuggingFace => hf.to_string(),
            Layout::Original => original.to_string(),
        }
    }

    fn layer(&self, l: usize, hf: &str, original: &str) -> String {
        match self.layout {
            Layout::HuggingFace => format!("model.layers.{l}.{hf}"),
            Layout::Original => format!("block.{l}.{original}"),
        }
    }
}

impl Weights {
    pub fn load(checkpoint: &mut Checkpoint, config: &Config) -> Result<Self> {
        let names = Names {
            layout: config.layout,
        };
        let d = config.hidden_size;
        let vocab = config.vocab_size;
        let embedding = matrix(
            checkpoint,
            &names.global("model.embed_tokens.weight", "embedding.weight"),
            vocab,
            d,
        )?;
        let layers = (0..config.num_hidden_layers)
            .map(|l| load_layer(checkpoint, config, &names, l))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = vector(
            checkpoint,
            &names.global("model.norm.weight", "norm.scale"),
            d,
        )?;
        let unembedding = matrix(
            checkpoint,
            &names.global("lm_head.weight", "unembedding.weight"),
            vocab,
            d,
        )?;
        Ok(Weights {
            embedding,
            layers,
            final_norm,
            unembedding,
            unembedding_q8: None,
        })
    }

    /// The unembedding in the format the kernels read.
    pub fn unembedding_matrix(&self) -> WeightMatrix<'_> {
        dense_matrix(&self.unembedding, self.unembedding_q8.as_ref())
    }

    /// Switches the attention projections and the unembedding to 8 bits ([`DenseFormat::Q8`],
    /// from the cache file of this checkpoint, see [`dense_q8`]) and releases their bf16 pages.
    /// The router stays bf16 (rounding could flip its top-k) and so does the embedding (one row
    /// is read per token). `fingerprint` is [`Weights::fingerprint`], taken before the release.
    pub fn requantize_dense(
        &mut self,
        fingerprint: u64,
        files: &[PathBuf],
        isa: Isa,
        progress: dense_q8::Progress,
    ) -> Result<()> {
        let key = dense_q8::cache_key(fingerprint, files);
        let mut sources: Vec<&Bf16Matrix> = Vec::new();
        let mut names = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            sources.extend([&layer.q, &layer.k, &layer.v, &layer.o].map(|l| &l.weight));
            names.extend(["q", "k", "v", "o"].map(|p| format!("layer {l} attention {p} weight")));
        }
        sources.push(&self.unembedding);
        names.push("unembedding".into());
        let mut matrices =
            dense_q8::load_or_build(&sources, &names, key, isa, progress)?.into_iter();
        for source in &sources {
            source.bytes.release();
        }
        for layer in &mut self.layers {
            for linear in [&mut layer.q, &mut layer.k, &mut layer.v, &mut layer.o] {
                linear.q8 = matrices.next();
            }
        }
        self.unembedding_q8 = matrices.next();
        Ok(())
    }
}

impl Weights {
    /// FNV-1a over the configuration and samples of the embedding, first layer and unembedding:
    /// cheap (a few pages), and different for any two checkpoints one would confuse.
    pub fn fingerprint(&self, config: &Config) -> u64 {
        let sample = |m: &Bf16Matrix| -> Vec<u8> {
            let data = m.data();
            let n = data.len().min(4096);
            data[..n]
                .iter()
                .chain(&data[data.len() - n..])
                .flat_map(|v| v.to_le_bytes())
                .collect()
        };
        let mut bytes = format!("{config:?}").into_bytes();
        bytes.extend(sample(&self.embedding));
        bytes.extend(sample(&self.unembedding));
        if let Some(layer) = self.layers.first() {
            bytes.extend(sample(&layer.q.weight));
        }
        fnv1a(&bytes)
    }
}

/// 64-bit FNV-1a: a stable hash for identifying files (std's hashers may change between runs).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn load_layer(ck: &mut Checkpoint, c: &Config, names: &Names, l: usize) -> Result<LayerWeights> {
    let d = c.hidden_size;
    let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
    let name = |hf: &str, original: &str| names.layer(l, hf, original);
    let (q, k, v) = match c.layout {
        Layout::HuggingFace => (
            linear(ck, &name("self_attn.q_proj", ""), q_dim, d)?,
            linear(ck, &name("self_attn.k_proj", ""), kv_dim, d)?,
            linear(ck, &name("self_attn.v_proj", ""), kv_dim, d)?,
        ),
        Layout::Original => split_qkv(ck, &name("", "attn.qkv"), q_dim, kv_dim, d)?,
    };
    let experts = c.num_local_experts;
    let inter = c.intermediate_size;
    Ok(LayerWeights {
        attn_norm: vector(ck, &name("input_layernorm.weight", "attn.norm.scale"), d)?,
        q,
        k,
        v,
        o: linear(ck, &name("self_attn.o_proj", "attn.out"), d, q_dim)?,
        sinks: vector(
            ck,
            &name("self_attn.sinks", "attn.sinks"),
            c.num_attention_heads,
        )?,
        mlp_norm: vector(
            ck,
            &name("post_attention_layernorm.weight", "mlp.norm.scale"),
            d,
        )?,
        router: linear(ck, &name("mlp.router", "mlp.gate"), experts, d)?,
        gate_up: mxfp4(
            ck,
            [
                &name("mlp.experts.gate_up_proj_blocks", "mlp.mlp1_weight.blocks"),
                &name("mlp.experts.gate_up_proj_scales", "mlp.mlp1_weight.scales"),
                &name("mlp.experts.gate_up_proj_bias", "mlp.mlp1_bias"),
            ],
            experts,
            2 * inter,
            d,
        )?,
        down: mxfp4(
            ck,
            [
                &name("mlp.experts.down_proj_blocks", "mlp.mlp2_weight.blocks"),
                &name("mlp.experts.down_proj_scales", "mlp.mlp2_weight.scales"),
                &name("mlp.experts.down_proj_bias", "mlp.mlp2_bias"),
            ],
            experts,
            d,
            inter,
        )?,
    })
}

fn matrix(ck: &mut Checkpoint, name: &str, rows: usize, cols: usize) -> Result<Bf16Matrix> {
    let bytes = ck.take(name, Dtype::BF16, &[rows, cols])?;
    Ok(Bf16Matrix { bytes, rows, cols })
}

fn vector(ck: &mut Checkpoint, name: &str, len: usize) -> Result<Vec<f32>> {
    let bytes = ck.take(name, Dtype::BF16, &[len])?;
    Ok(bf16_to_f32_vec(&bytes))
}

fn linear(ck: &mut Checkpoint, prefix: &str, rows: usize, cols: usize) -> Result<Linear> {
    Ok(Linear {
        weight: matrix(ck, &format!("{prefix}.weight"), rows, cols)?,
        bias: vector(ck, &format!("{prefix}.bias"), rows)?,
        q8: None,
    })
}

/// The original layout fuses q, k and v row-wise as Q|K|V (SPEC §2.4); split it without copying.
fn split_qkv(
    ck: &mut Checkpoint,
    prefix: &str,
    q_dim: usize,
    kv_dim: usize,
    cols: usize,
) -> Result<(Linear, Linear, Linear)> {
    let fused = matrix(ck, &format!("{prefix}.weight"), q_dim + 2 * kv_dim, cols)?;
    let bias = vector(ck, &format!("{prefix}.bias"), q_dim + 2 * kv_dim)?;
    let part = |start: usize, rows: usize| Linear {
        weight: Bf16Matrix {
            bytes: fused
                .bytes
                .slice(start * cols * 2..(start + rows) * cols * 2),
            rows,
            cols,
        },
        bias: bias[start..start + rows].to_vec(),
        q8: None,
    };
    Ok((
        part(0, q_dim),
        part(q_dim, kv_dim),
        part(q_dim + kv_dim, kv_dim),
    ))
}

fn mxfp4(
    ck: &mut Checkpoint,
    [blocks, scales, bias]: [&str; 3],
    experts: usize,
    rows: usize,
    cols: usize,
) -> Result<Mxfp4Experts> {
    let groups = cols / MXFP4_BLOCK;
    let blocks = ck.take(blocks, Dtype::U8, &[experts, rows, groups, MXFP4_BLOCK / 2])?;
    let scales = ck.take(scales, Dtype::U8, &[experts, rows, groups])?;
    let bias = ck.take(bias, Dtype::BF16, &[experts, rows])?;
    Ok(Mxfp4Experts {
        blocks,
        scales,
        bias: bf16_to_f32_vec(&bias),
        rows,
        cols,
    })
}

fn bf16_to_f32_vec(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect()
}
