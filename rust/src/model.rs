//! The gpt-oss forward pass, block by block as SPEC §4 describes it, in fp32 activations with the
//! checkpoint's own weights. Matrix products go through [`crate::kernels`]; everything else is here.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::dense_q8;
use crate::error::{try_with_capacity, Error, Result};
use crate::kernels::attention::{self, KvElement, Query};
use crate::kernels::{self, scalar::bf16_to_f32, Isa, Matmul, Precision, WeightMatrix};
use crate::kv_cache::{with_layers, KvCache, KvFormat, LayerCache};
use crate::weights::{DenseFormat, LayerWeights, Linear, Mxfp4Experts, Weights};

/// Tokens per forward chunk: bounds activation memory for long prompts.
const PREFILL_CHUNK: usize = 512;

/// Upper bound on `threads`: a typo should not try to start millions of threads.
const MAX_THREADS: usize = 4096;

pub struct Model {
    pub config: Config,
    pub dir: PathBuf,
    /// Bytes of tensor data in the checkpoint (what decoding may read).
    pub checkpoint_bytes: u64,
    /// Instruction set of the matrix kernels.
    pub isa: Isa,
    /// Whether the products round their activations.
    pub precision: Precision,
    /// The format the attention and unembedding matrices are read in.
    pub dense: DenseFormat,
    /// The element type of the sessions' keys and values.
    pub kv_cache: KvFormat,
    /// Identifies the weights, so a saved session is only resumed with the model that made it.
    pub fingerprint: u64,
    weights: Weights,
    rope: Rope,
    pool: rayon::ThreadPool,
}

/// Which positions of a chunk need logits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    All,
    Last,
    None,
}

/// Debug record of a forward pass: router choices and the residual stream after each layer.
#[derive(Default)]
pub struct Trace {
    /// Per layer: `[tokens, k]` expert ids in descending router-logit order.
    pub topk_idx: Vec<Vec<u32>>,
    /// Per layer: `[tokens, k]` routing weights.
    pub topk_weights: Vec<Vec<f32>>,
    /// Per layer: `[tokens, hidden]`.
    pub layer_outputs: Vec<Vec<f32>>,
}

/// How [`Model::load`] sets up a model.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Compute threads; `None`: one per physical core ([`default_threads`]).
    pub threads: Option<usize>,
    /// Kernel instruction set; `None`: the best this CPU supports (or `GPT_OSS_CPU_ISA`).
    pub isa: Option<Isa>,
    pub precision: Precision,
    pub dense: DenseFormat,
    /// Element type of the sessions' keys and values.
    pub kv_cache: KvFormat,
}

impl Model {
    /// Maps a checkpoint directory (Hugging Face or `original/` layout) and checks every tensor.
    pub fn load(dir: &Path, options: LoadOptions) -> Result<Model> {
        Model::load_with_progress(dir, options, &|_, _| true)
    }

    /// [`Model::load`], telling `progress` how a `dense="q8"` load builds the 8-bit weights (the
    /// first load of a checkpoint, or every load where no cache file can be written): the only
    /// part of a load that takes long.
    pub fn load_with_progress(
        dir: &Path,
        options: LoadOptions,
        progress: dense_q8::Progress,
    ) -> Result<Model> {
        let LoadOptions {
            threads,
            isa,
            precision,
            dense,
            kv_cache,
        } = options;
        if dense == DenseFormat::Q8 && precision == Precision::Exact {
            return Err(Error::Input(
                "dense=\"q8\" rounds the weights and quantizes the activations: it needs \
                 precision=\"fast\""
                    .into(),
            ));
        }
        let isa = match isa {
            Some(isa) if !isa.is_supported() => {
                return Err(Error::Input(format!(
                    "this CPU does not support {}",
                    isa.name()
                )))
            }
            Some(isa) => isa,
            None => kernels::default_isa().map_err(Error::Input)?,
        };
        if !dir.is_dir() {
            return Err(Error::Checkpoint(format!(
                "{}: not a directory (expected a checkpoint directory with config.json)",
                dir.display()
            )));
        }
        let config = Config::from_file(&dir.join("config.json"))?;
        if dense == DenseFormat::Q8 && config.q_dim() % 32 != 0 {
            return Err(Error::Input(format!(
                "dense=\"q8\" quantizes blocks of 32 values: the attention width \
                 (num_attention_heads x head_dim = {}) is not a multiple of 32",
                config.q_dim()
            )));
        }
        let mut checkpoint = Checkpoint::open(dir)?;
        let mut weights = Weights::load(&mut checkpoint, &config)?;
        let checkpoint_bytes = checkpoint.total_bytes;
        let files = checkpoint.files.clone();
        checkpoint.finish()?;
        let threads = match threads {
            Some(n) if n == 0 || n > MAX_THREADS => {
                return Err(Error::Input(format!(
                    "threads must be between 1 and {MAX_THREADS}, found {n}"
                )))
            }
            Some(n) => n,
            None => default_threads(),
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("gpt-oss-cpu-{i}"))
            .build()
            .map_err(|e| Error::Input(format!("cannot start {threads} threads: {e}")))?;
        // Before requantizing, which releases the bf16 pages the fingerprint samples.
        let fingerprint = weights.fingerprint(&config);
        if dense == DenseFormat::Q8 {
            pool.install(|| weights.requantize_dense(fingerprint, &files, isa, progress))?;
        }
        Ok(Model {
            fingerprint,
            rope: Rope::new(&config),
            config,
            dir: dir.to_path_buf(),
            checkpoint_bytes,
            isa,
            precision,
            dense,
            kv_cache,
            weights,
            pool,
        })
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Read bandwidth in bytes per second (best of `repeats`) over the unembedding weights in the
    /// format the kernels read, on this model's threads: memory that every decoded token
    /// streams, in the same state (mapped, resident once a token has been decoded), and no
    /// buffer of its own to inflate the process's peak memory.
    pub fn measure_read_bandwidth(&self, repeats: usize) -> f64 {
        let bytes: &[u8] = match self.weights.unembedding_matrix() {
            WeightMatrix::Bf16(w) => bytemuck::cast_slice(w),
            WeightMatrix::Q8 { codes, .. } => codes,
            WeightMatrix::Mxfp4 { blocks, .. } => blocks,
        };
        self.pool
            .install(|| crate::bandwidth::best_read_bandwidth(bytes, repeats))
    }

    /// An empty cache for `max_context` positions from `position_offset` on, in this model's
    /// element type.
    pub fn new_cache(&self, max_context: usize, position_offset: usize) -> Result<KvCache> {
        KvCache::new(&self.config, max_context, position_offset, self.kv_cache)
    }

    /// Logits `[T, vocab]` of `tokens` placed at positions `start_position..`, with no cache kept.
    pub fn forward(&self, tokens: &[u32], start_position: usize) -> Result<Vec<f32>> {
        self.check_positions(start_position, tokens.len())?;
        let mut cache = self.new_cache(tokens.len(), start_position)?;
        self.extend(&mut cache, tokens, LogitRows::All, None)
    }

    /// As [`Model::forward`], also recording router choices and per-layer outputs.
    pub fn trace(&self, tokens: &[u32], start_position: usize) -> Result<(Vec<f32>, Trace)> {
        self.check_positions(start_position, tokens.len())?;
        let mut cache = self.new_cache(tokens.len(), start_position)?;
        let layers = self.config.num_hidden_layers;
        let mut trace = Trace {
            topk_idx: vec![Vec::new(); layers],
            topk_weights: vec![Vec::new(); layers],
            layer_outputs: vec![Vec::new(); layers],
        };
        let logits = self.extend(&mut cache, tokens, LogitRows::All, Some(&mut trace))?;
        Ok((logits, trace))
    }

    pub fn check_positions(&self, start: usize, len: usize) -> Result<()> {
        let limit = self.config.max_position_embeddings;
        if start.checked_add(len).is_none_or(|end| end > limit) {
            return Err(Error::Input(format!(
                "positions {start}..{} exceed max_position_embeddings ({limit})",
                start.saturating_add(len)
            )));
        }
        Ok(())
    }

    pub fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::Input("no token ids given".into()));
        }
        let vocab = self.config.vocab_size;
        if let Some((i, &id)) = tokens
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= vocab)
        {
            return Err(Error::Input(format!(
                "token id {id} at index {i} is outside the vocabulary (0..{vocab})"
            )));
        }
        Ok(())
    }

    /// Runs `tokens` through the model after what `cache` holds, appending to it. Returns the
    /// requested logits, `[rows, vocab]`.
    pub fn extend(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        rows: LogitRows,
        mut trace: Option<&mut Trace>,
    ) -> Result<Vec<f32>> {
        self.check_tokens(tokens)?;
        if cache.len() + tokens.len() > cache.max_context {
            return Err(Error::ContextOverflow(format!(
                "appending {} tokens to {} would exceed max_context {}",
                tokens.len(),
                cache.len(),
                cache.max_context
            )));
        }
        let logit_rows = match rows {
            LogitRows::All => tokens.len(),
            LogitRows::Last => 1,
            LogitRows::None => 0,
        };
        let mut logits =
            try_with_capacity(logit_rows.saturating_mul(self.config.vocab_size), "logits")?;
        self.pool.install(|| {
            let chunks = tokens.chunks(PREFILL_CHUNK);
            let last_chunk = chunks.len() - 1;
            for (i, chunk) in chunks.enumerate() {
                let chunk_rows = match rows {
                    LogitRows::Last if i < last_chunk => LogitRows::None,
                    other => other,
                };
                let out = self.forward_chunk(cache, chunk, chunk_rows, trace.as_deref_mut());
                logits.extend_from_slice(&out);
            }
            Ok(logits)
        })
    }

    /// SPEC §4.1: embed, the decoder layers, final norm, unembedding.
    fn forward_chunk(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        rows: LogitRows,
        mut trace: Option<&mut Trace>,
    ) -> Vec<f32> {
        let c = &self.config;
        let d = c.hidden_size;
        let first = cache.len();
        let positions: Vec<usize> = (0..tokens.len())
            .map(|i| cache.position_offset + first + i)
            .collect();
        let rope = self.rope.tables(&positions);

        let mut x = vec![0f32; tokens.len() * d];
        for (row, &token) in x.chunks_exact_mut(d).zip(tokens) {
            for (xi, &w) in row
                .iter_mut()
                .zip(self.weights.embedding.row(token as usize))
            {
                *xi = bf16_to_f32(w);
            }
        }
        for (l, layer) in self.weights.layers.iter().enumerate() {
            let window = c.is_sliding(l).then_some(c.sliding_window);
            with_layers!(&mut cache.layers, |caches| {
                self.attention_block(layer, &mut x, &rope, &mut caches[l], first, window)
            });
            let routes = self.moe_block(layer, &mut x);
            if let Some(trace) = trace.as_deref_mut() {
                trace.topk_idx[l].extend(
                    routes
                        .iter()
                        .flat_map(|r| r.experts.iter().map(|&e| e as u32)),
                );
                trace.topk_weights[l].extend(routes.iter().flat_map(|r| r.weights.iter().copied()));
                trace.layer_outputs[l].extend_from_slice(&x);
            }
        }
        cache.commit(tokens);

        let x = match rows {
            LogitRows::All => &x[..],
            LogitRows::Last => &x[x.len() - d..],
            LogitRows::None => return Vec::new(),
        };
        let h = rms_norm(x, &self.weights.final_norm, c.rms_norm_eps);
        let unembedding = &self.weights.unembedding;
        let mut logits = vec![0f32; h.len() / d * c.vocab_size];
        let job = Matmul {
            weights: self.weights.unembedding_matrix(),
            rows: unembedding.rows,
            cols: d,
            x: &h,
            bias: None,
            y: &mut logits,
        };
        kernels::matmul(self.isa, self.precision, job);
        logits
    }

    /// SPEC §4.3: x += o_proj(attention(rope(q), rope(k), v)) over the cache and this chunk.
    fn attention_block<E: KvElement>(
        &self,
        layer: &LayerWeights,
        x: &mut [f32],
        rope: &RopeTables,
        cache: &mut LayerCache<E>,
        first: usize,
        window: Option<usize>,
    ) {
        let c = &self.config;
        let t = rms_norm(x, &layer.attn_norm, c.rms_norm_eps);
        let tokens = t.len() / c.hidden_size;
        let mut q = vec![0f32; tokens * c.q_dim()];
        let mut k = vec![0f32; tokens * c.kv_dim()];
        let mut v = vec![0f32; tokens * c.kv_dim()];
        kernels::matmul_batch(
            self.isa,
            self.precision,
            vec![
                linear_job(&t, &layer.q, &mut q),
                linear_job(&t, &layer.k, &mut k),
                linear_job(&t, &layer.v, &mut v),
            ],
        );
        self.rope.apply(&mut q, rope, c.head_dim);
        self.rope.apply(&mut k, rope, c.head_dim);

        let heads = Heads {
            q: c.num_attention_heads,
            kv: c.num_key_value_heads,
            dim: c.head_dim,
        };
        let mut attn = vec![0f32; q.len()];
        cache.store(first, &k, &v);
        attend(
            self.isa,
            &q,
            cache,
            first,
            &layer.sinks,
            heads,
            window,
            &mut attn,
        );

        let y = linear(self.isa, self.precision, &attn, &layer.o);
        add_assign(x, &y);
    }

    /// SPEC §4.4: route each token to its top-k experts, run each expert once over all of its
    /// tokens, and add the weighted outputs to the residual stream.
    fn moe_block(&self, layer: &LayerWeights, x: &mut [f32]) -> Vec<Route> {
        let c = &self.config;
        let d = c.hidden_size;
        let t = rms_norm(x, &layer.mlp_norm, c.rms_norm_eps);
        // The router stays exact: rounding could flip a near-tie in its top-k.
        let router_logits = linear(self.isa, Precision::Exact, &t, &layer.router);
        let routes: Vec<Route> = router_logits
            .chunks_exact(c.num_local_experts)
            .map(|logits| Route::top_k(logits, c.num_experts_per_tok))
            .collect();

        // Per expert: the tokens routed to it, their weights, and their normalized activations.
        let mut groups: Vec<ExpertGroup> = Vec::new();
        for e in 0..c.num_local_experts {
            let assigned: Vec<(usize, f32)> = routes
                .iter()
                .enumerate()
                .filter_map(|(token, r)| r.weight_of(e).map(|w| (token, w)))
                .collect();
            if !assigned.is_empty() {
                // Borrowed when every token is routed here (always, decoding), so the batch
                // prepares these activations once for all such experts.
                let x = if assigned.len() == t.len() / d {
                    Cow::Borrowed(&t[..])
                } else {
                    assigned
                        .iter()
                        .flat_map(|&(token, _)| &t[token * d..(token + 1) * d])
                        .copied()
                        .collect()
                };
                groups.push(ExpertGroup {
                    expert: e,
                    assigned,
                    x,
                });
            }
        }
        // Every routed expert's gate/up projection in one parallel region, then every down.
        let mut hidden: Vec<Vec<f32>> = groups
            .iter()
            .map(|g| vec![0f32; g.assigned.len() * 2 * c.intermediate_size])
            .collect();
        let jobs = groups
            .iter()
            .zip(&mut hidden)
            .map(|(g, h)| expert_job(&g.x, &layer.gate_up, g.expert, h));
        kernels::matmul_batch(self.isa, self.precision, jobs.collect());
        // In parallel for a prompt's experts (serial, it took ~1 % of exact prefill); a decoded
        // token's 4 stay on this thread.
        let one_token = t.len() == d;
        let activated: Vec<Vec<f32>> = hidden
            .par_iter()
            .with_min_len(if one_token { hidden.len() } else { 1 })
            .map(|h| kernels::swiglu(self.isa, h, c.swiglu_limit))
            .collect();
        let mut outputs: Vec<Vec<f32>> = groups
            .iter()
            .map(|g| vec![0f32; g.assigned.len() * d])
            .collect();
        let jobs = groups
            .iter()
            .zip(&activated)
            .zip(&mut outputs)
            .map(|((g, z), out)| expert_job(z, &layer.down, g.expert, out));
        kernels::matmul_batch(self.isa, self.precision, jobs.collect());

        // Each token's weighted expert outputs, summed in expert order whatever the split:
        // tokens in parallel, 16 or more a task (serially it took ~1 % of exact prefill).
        let mut contributions: Vec<Vec<(f32, &[f32])>> = vec![Vec::new(); x.len() / d];
        for (g, out) in groups.iter().zip(&outputs) {
            for (&(token, w), out_row) in g.assigned.iter().zip(out.chunks_exact(d)) {
                contributions[token].push((w, out_row));
            }
        }
        x.par_chunks_mut(d)
            .with_min_len(16)
            .zip(&contributions)
            .for_each(|(x_row, token)| {
                let mut y = vec![0f32; d];
                for &(w, out_row) in token {
                    for (yi, &o) in y.iter_mut().zip(out_row) {
                        *yi += w * o;
                    }
                }
                add_assign(x_row, &y);
            });
        routes
    }
}

/// One thread per physical core this process may run on: a second hyper-thread on a core only
/// competes for the same vector units and memory bandwidth.
pub fn default_threads() -> usize {
    let allowed = std::thread::available_parallelism().map_or(1, |n| n.get());
    physical_cores()
        .map_or(allowed, |cores| cores.min(allowed))
        .max(1)
}

/// Distinct (package, core) pairs in Linux's sysfs topology; `None` elsewhere.
fn physical_cores() -> Option<usize> {
    let mut cores = std::collections::HashSet::new();
    for entry in std::fs::read_dir("/sys/devices/system/cpu").ok()?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name
            .strip_prefix("cpu")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        let read =
            |file: &str| std::fs::read_to_string(entry.path().join("topology").join(file)).ok();
        if let (Some(package), Some(core)) = (read("physical_package_id"), read("core_id")) {
            cores.insert((package.trim().to_string(), core.trim().to_string()));
        }
    }
    (!cores.is_empty()).then_some(cores.len())
}

/// RMSNorm of each row (SPEC §4.2): `x / sqrt(mean(x²) + eps) * scale`, no bias, no `1 + w`.
fn rms_norm(x: &[f32], scale: &[f32], eps: f32) -> Vec<f32> {
    let d = scale.len();
    let mut out = vec![0f32; x.len()];
    for (row, out_row) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mean_square = row.iter().map(|&v| v * v).sum::<f32>() / d as f32;
        let inv_rms = 1.0 / (mean_square + eps).sqrt();
        for ((o, &v), &s) in out_row.iter_mut().zip(row).zip(scale) {
            *o = v * inv_rms * s;
        }
    }
    out
}

/// `x·Wᵀ + b` for every row of `x`.
fn linear(isa: Isa, precision: Precision, x: &[f32], layer: &Linear) -> Vec<f32> {
    let mut y = vec![0f32; x.len() / layer.weight.cols * layer.weight.rows];
    kernels::matmul(isa, precision, linear_job(x, layer, &mut y));
    y
}

fn linear_job<'a>(x: &'a [f32], layer: &'a Linear, y: &'a mut [f32]) -> Matmul<'a> {
    let w = &layer.weight;
    Matmul {
        weights: layer.matrix(),
        rows: w.rows,
        cols: w.cols,
        x,
        bias: Some(&layer.bias),
        y,
    }
}

/// One expert's MXFP4 projection of every row of `x`, plus that expert's bias.
fn expert_job<'a>(
    x: &'a [f32],
    experts: &'a Mxfp4Experts,
    e: usize,
    y: &'a mut [f32],
) -> Matmul<'a> {
    let (blocks, scales) = experts.expert(e);
    Matmul {
        weights: WeightMatrix::Mxfp4 { blocks, scales },
        rows: experts.rows,
        cols: experts.cols,
        x,
        bias: Some(experts.expert_bias(e)),
        y,
    }
}

/// The tokens routed to one expert: `(token, routing weight)` and their activations `[n, hidden]`.
struct ExpertGroup<'a> {
    expert: usize,
    assigned: Vec<(usize, f32)>,
    x: Cow<'a, [f32]>,
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// One token's chosen experts and their weights.
pub struct Route {
    pub experts: Vec<usize>,
    pub weights: Vec<f32>,
}

impl Route {
    /// Top-k of the router logits (descending; ties to the lower index), then a softmax over those
    /// k only (SPEC §4.4, §9.4).
    fn top_k(logits: &[f32], k: usize) -> Route {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        order.truncate(k);
        let max = logits[order[0]];
        let exps: Vec<f32> = order.iter().map(|&e| (logits[e] - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        Route {
            experts: order,
            weights: exps.iter().map(|&v| v / sum).collect(),
        }
    }

    fn weight_of(&self, expert: usize) -> Option<f32> {
        self.experts
            .iter()
            .position(|&e| e == expert)
            .map(|i| self.weights[i])
    }
}

#[derive(Clone, Copy)]
struct Heads {
    q: usize,
    kv: usize,
    dim: usize,
}

/// Scaled dot-product attention with GQA (query heads `g·(H/G)..(g+1)·(H/G)` read KV head g), a
/// per-head sink logit, causal masking, and an optional sliding window of `window` keys including
/// the current one (SPEC §4.3.4), for the chunk of positions `first..` already in `cache`. One task
/// per (token, KV head), ordered by KV head: the threads split the tasks into runs, and a run's
/// tokens then read the same keys and values from the CPU caches, where token-major runs streamed
/// every KV head from memory for each token. Measured on the 20b's prefill (512 tokens, fast q8,
/// one process alternating builds) at depth 16384: +19.7 % with the f32 cache, +4.8 % with bf16;
/// +1.8 % at depth 4096, no change at depth 0.
#[allow(clippy::too_many_arguments)]
fn attend<E: KvElement>(
    isa: Isa,
    q: &[f32],
    cache: &LayerCache<E>,
    first: usize,
    sinks: &[f32],
    heads: Heads,
    window: Option<usize>,
    out: &mut [f32],
) {
    let scale = 1.0 / (heads.dim as f32).sqrt();
    let group = heads.q / heads.kv;
    let group_width = group * heads.dim;
    let mut tasks: Vec<(usize, &mut [f32])> = out.chunks_mut(group_width).enumerate().collect();
    tasks.sort_by_key(|&(task, _)| (task % heads.kv, task / heads.kv));
    tasks
        .into_par_iter()
        .for_each_init(Vec::new, |scores, (task, o)| {
            let (i, g) = (task / heads.kv, task % heads.kv);
            let position = first + i;
            let query = Query {
                q: &q[task * group_width..(task + 1) * group_width],
                kv_head: g,
                first: window.map_or(0, |w| (position + 1).saturating_sub(w)),
                last: position,
                sinks: &sinks[g * group..(g + 1) * group],
                scale,
            };
            attention::attend(isa, cache, &query, scores, o);
        });
}

/// YaRN-scaled rotary embedding with rotate-half pairing (SPEC §4.3.2, §4.3.3).
pub struct Rope {
    /// `head_dim / 2` frequencies.
    pub inv_freq: Vec<f32>,
    /// Multiplies cos and sin (so every q·k logit by its square).
    pub concentration: f32,
}

/// cos and sin (concentration included) of each position of a chunk, `[tokens, head_dim / 2]`.
pub struct RopeTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    pub fn new(c: &Config) -> Rope {
        let factor = c.rope_scaling_factor;
        let concentration = if factor > 1.0 {
            0.1 * factor.ln() + 1.0
        } else {
            1.0
        };
        let inv_freq = if is_gpt_oss_rope(c) {
            GPT_OSS_INV_FREQ_BITS
                .iter()
                .map(|&b| f32::from_bits(b))
                .collect()
        } else {
            yarn_inv_freq(c)
        };
        Rope {
            inv_freq,
            concentration: concentration as f32,
        }
    }

    /// The angle is one fp32 product `float32(p) · inv_freq`, like the reference (SPEC §4.3.3).
    pub fn tables(&self, positions: &[usize]) -> RopeTables {
        let mut cos = Vec::with_capacity(positions.len() * self.inv_freq.len());
        let mut sin = Vec::with_capacity(cos.capacity());
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32 * self.concentration);
                sin.push(angle.sin() as f32 * self.concentration);
            }
        }
        RopeTables { cos, sin }
    }

    /// Rotates every head of every token in `x` (`[tokens, heads · head_dim]`): dimension i pairs
    /// with i + head_dim/2.
    fn apply(&self, x: &mut [f32], tables: &RopeTables, head_dim: usize) {
        let half = head_dim / 2;
        let tokens = tables.cos.len() / half;
        let per_token = x.len() / tokens;
        for (t, row) in x.chunks_exact_mut(per_token).enumerate() {
            let cos = &tables.cos[t * half..(t + 1) * half];
            let sin = &tables.sin[t * half..(t + 1) * half];
            for head in row.chunks_exact_mut(head_dim) {
                let (x1, x2) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (x1[i], x2[i]);
                    x1[i] = a * cos[i] - b * sin[i];
                    x2[i] = b * cos[i] + a * sin[i];
                }
            }
        }
    }
}

/// The frequencies as transformers' `_compute_yarn_parameters` builds them in fp32. The reference's
/// fp32 `pow` is not correctly rounded, so this can differ from it by an ulp (hence the table below).
fn yarn_inv_freq(c: &Config) -> Vec<f32> {
    let dim = c.head_dim as f64;
    let factor = c.rope_scaling_factor as f32;
    let base = c.rope_theta;
    let original = c.rope_original_max_position_embeddings as f64;
    let correction_dim = |rotations: f64| {
        dim * (original / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
    };
    let (mut low, mut high) = (
        correction_dim(c.rope_beta_fast),
        correction_dim(c.rope_beta_slow),
    );
    if c.rope_truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
    if low == high {
        high += 0.001;
    }
    (0..c.head_dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / c.head_dim as f32;
            let pos_freq = base.powf(exponent as f64) as f32;
            let extrapolation = 1.0 / pos_freq;
            let interpolation = 1.0 / (factor * pos_freq);
            let ramp = ((i as f32 - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
            let extrapolation_weight = 1.0 - ramp;
            interpolation * (1.0 - extrapolation_weight) + extrapolation * extrapolation_weight
        })
        .collect()
}

/// Whether `c` has gpt-oss's own rotary parameters, for which SPEC §4.3.3 gives the reference's
/// exact frequencies.
fn is_gpt_oss_rope(c: &Config) -> bool {
    c.head_dim == 64
        && c.rope_theta == 150000.0
        && c.rope_scaling_factor == 32.0
        && c.rope_beta_fast == 32.0
        && c.rope_beta_slow == 1.0
        && c.rope_original_max_position_embeddings == 4096
        && !c.rope_truncate
}

/// SPEC §4.3.3: inv_freq of gpt-oss exactly as the reference computes it (its fp32 `pow` included),
/// as fp32 bit patterns.
#[rustfmt::skip]
const GPT_OSS_INV_FREQ_BITS: [u32; 32] = [
    0x3F800000, 0x3F306535, 0x3EF316A2, 0x3EA77FAA, 0x3E66D3FA, 0x3E1F0CFD,
    0x3DDB2F9F, 0x3D970764, 0x3D502194, 0x3D01DDD5, 0x3C9E646F, 0x3C3DEC94,
    0x3BDEA840, 0x3B7CFE14, 0x3B093803, 0x3A89F778, 0x39EF543C, 0x390799B9,
    0x3820ADC6, 0x37DD6DFC, 0x37989328, 0x375242FA, 0x3710E12C, 0x36C7A82B,
    0x3689928C, 0x363D9647, 0x3602A245, 0x35B40668, 0x35781728, 0x352AF200,
    0x34EB93EB, 0x34A252D3,
];

#[cfg(test)]
mod tests {
    use super::*;

    /// SPEC §4.3.3's table of gpt-oss inv_freq, as fp32 bit patterns.
    const SPEC_INV_FREQ: [&str; 32] = [
        "0x1.000000p+0",
        "0x1.60ca6ap-1",
        "0x1.e62d44p-2",
        "0x1.4eff54p-2",
        "0x1.cda7f4p-3",
        "0x1.3e19fap-3",
        "0x1.b65f3ep-4",
        "0x1.2e0ec8p-4",
        "0x1.a04328p-5",
        "0x1.03bbaap-5",
        "0x1.3cc8dep-6",
        "0x1.7bd928p-7",
        "0x1.bd5080p-8",
        "0x1.f9fc28p-9",
        "0x1.127006p-9",
        "0x1.13eef0p-10",
        "0x1.dea878p-12",
        "0x1.0f3372p-13",
        "0x1.415b8cp-15",
        "0x1.badbf8p-16",
        "0x1.312650p-16",
        "0x1.a485f4p-17",
        "0x1.21c258p-17",
        "0x1.8f5056p-18",
        "0x1.132518p-18",
        "0x1.7b2c8ep-19",
        "0x1.05448ap-19",
        "0x1.680cd0p-20",
        "0x1.f02e50p-21",
        "0x1.55e400p-21",
        "0x1.d727d6p-22",
        "0x1.44a5a6p-22",
    ];

    fn parse_hex_float(s: &str) -> f32 {
        let (mantissa, exponent) = s.trim_start_matches("0x").split_once('p').unwrap();
        let (int, frac) = mantissa.split_once('.').unwrap();
        let bits = u32::from_str_radix(&format!("{int}{frac}"), 16).unwrap();
        (bits as f64 / 16f64.powi(frac.len() as i32) * 2f64.powi(exponent.parse().unwrap())) as f32
    }

    fn gpt_oss_20b_config() -> Config {
        Config::from_json_str(
            r#"{"hidden_size":2880,"num_hidden_layers":24,"num_attention_heads":64,
            "num_key_value_heads":8,"head_dim":64,"num_local_experts":32,"num_experts_per_tok":4,
            "intermediate_size":2880,"sliding_window":128,"vocab_size":201088,"rope_theta":150000,
            "rope_scaling":{"factor":32.0,"beta_fast":32.0,"beta_slow":1.0,
            "original_max_position_embeddings":4096,"rope_type":"yarn","truncate":false},
            "max_position_embeddings":131072,"swiglu_limit":7.0,"rms_norm_eps":1e-5}"#,
        )
        .unwrap()
    }

    #[test]
    fn gpt_oss_inv_freq_is_the_spec_table_bit_for_bit() {
        let rope = Rope::new(&gpt_oss_20b_config());
        for (i, (got, want)) in rope.inv_freq.iter().zip(SPEC_INV_FREQ).enumerate() {
            assert_eq!(
                got.to_bits(),
                parse_hex_float(want).to_bits(),
                "inv_freq[{i}]: {got:e}"
            );
        }
        assert_eq!(rope.concentration.to_bits(), 0x3FAC5C86);
    }

    #[test]
    fn general_yarn_formula_is_within_an_ulp_of_the_reference() {
        for (i, (got, want)) in yarn_inv_freq(&gpt_oss_20b_config())
            .iter()
            .zip(SPEC_INV_FREQ)
            .enumerate()
        {
            let ulps = (got.to_bits() as i64 - parse_hex_float(want).to_bits() as i64).abs();
            assert!(ulps <= 1, "inv_freq[{i}]: {got:e} is {ulps} ulps off");
        }
    }

    #[test]
    fn top_k_softmax_is_over_the_chosen_experts_only() {
        let route = Route::top_k(&[0.5, 3.0, -1.0, 3.0, 2.0], 3);
        assert_eq!(route.experts, vec![1, 3, 4]);
        let e = (-1.0f32).exp();
        let sum = 2.0 + e;
        assert!((route.weights[0] - 1.0 / sum).abs() < 1e-7);
        assert!((route.weights[2] - e / sum).abs() < 1e-7);
    }

    /// One array of a numpy `.npz` (a zip of `.npy` files): its shape and little-endian data.
    fn npz_array(path: &Path, name: &str) -> (Vec<usize>, Vec<u8>) {
        use std::io::Read;
        let file = std::fs::File::open(path).unwrap();
        let mut archive = zip::ZipArchive::new(file).unwrap();
        let mut npy = Vec::new();
        archive
            .by_name(&format!("{name}.npy"))
            .unwrap()
            .read_to_end(&mut npy)
            .unwrap();
        // Magic, version, then the header's length: 2 bytes in version 1, 4 after.
        assert_eq!(&npy[..6], b"\x93NUMPY");
        let (length, start) = match npy[6] {
            1 => (u16::from_le_bytes([npy[8], npy[9]]) as usize, 10),
            _ => (
                u32::from_le_bytes(npy[8..12].try_into().unwrap()) as usize,
                12,
            ),
        };
        let header = std::str::from_utf8(&npy[start..start + length]).unwrap();
        assert!(header.contains("'fortran_order': False"), "{header}");
        // Every array the test reads is int32 or float32, little-endian.
        assert!(
            header.contains("'descr': '<i4'") || header.contains("'descr': '<f4'"),
            "{header}"
        );
        let shape = header.split("'shape': (").nth(1).unwrap();
        let shape = shape[..shape.find(')').unwrap()]
            .split(',')
            .filter(|d| !d.trim().is_empty())
            .map(|d| d.trim().parse().unwrap())
            .collect();
        (shape, npy[start + length..].to_vec())
    }

    /// Every instruction set this CPU supports (NEON included, where the tests run on aarch64)
    /// reproduces the golden fp32 logits of the tiny checkpoints end to end, at position 0 and at
    /// an offset, and their greedy tokens through the KV cache; the fast path stays within OpenAI's bf16 path's error and argmax agreement,
    /// as the Python suite holds the x86 kernels to.
    #[test]
    fn every_isa_reproduces_the_golden_logits_of_the_tiny_checkpoints() {
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/models");
        for name in ["tiny-a", "tiny-b"] {
            let dir = models.join(name);
            let reference = dir.join("reference.npz");
            let words = |bytes: &[u8]| -> Vec<[u8; 4]> {
                bytes
                    .chunks_exact(4)
                    .map(|w| w.try_into().unwrap())
                    .collect()
            };
            let id_array = |array: &str| -> Vec<u32> {
                let (_, bytes) = npz_array(&reference, array);
                words(&bytes)
                    .into_iter()
                    .map(|w| i32::from_le_bytes(w) as u32)
                    .collect()
            };
            let ids = id_array("input_ids");
            let (prompt, greedy) = (id_array("gen_prompt_ids"), id_array("gen_ids"));
            let (_, offset) = npz_array(&reference, "position_offset");
            let offset = i32::from_le_bytes(words(&offset)[0]) as usize;
            let golden = |array: &str| {
                let (shape, data) = npz_array(&reference, array);
                assert_eq!((shape.len(), shape[0]), (2, ids.len()), "{array}");
                let values = words(&data).into_iter().map(f32::from_le_bytes);
                (values.collect::<Vec<f32>>(), shape[1])
            };
            let (logits, vocab) = golden("logits");
            let (offset_logits, _) = golden("logits_pos_offset");
            let crosscheck: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(dir.join("crosscheck_openai.json")).unwrap(),
            )
            .unwrap();
            let bf16 = &crosscheck["bfloat16-native"];
            let (bf16_max, bf16_argmax) = (
                bf16["max_abs"].as_f64().unwrap() as f32,
                bf16["argmax_agree"].as_u64().unwrap() as usize,
            );
            let max_diff = |got: &[f32], want: &[f32]| {
                assert_eq!(got.len(), want.len());
                got.iter()
                    .zip(want)
                    .map(|(g, w)| (g - w).abs())
                    .fold(0f32, f32::max)
            };
            let argmax = |row: &[f32]| {
                (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best })
            };
            for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
                let load = |precision| {
                    let options = LoadOptions {
                        threads: Some(2),
                        isa: Some(isa),
                        precision,
                        dense: DenseFormat::Bf16,
                        kv_cache: KvFormat::F32,
                    };
                    Model::load(&dir, options).unwrap()
                };
                let exact = load(Precision::Exact);
                // Greedy decoding, one token at a time through the KV cache.
                let mut cache = exact.new_cache(64, 0).unwrap();
                let mut next = prompt.clone();
                let mut decoded = Vec::new();
                while decoded.len() < greedy.len() {
                    let last = exact
                        .extend(&mut cache, &next, LogitRows::Last, None)
                        .unwrap();
                    next = vec![argmax(&last) as u32];
                    decoded.push(next[0]);
                }
                assert_eq!(decoded, greedy, "{name} {isa:?} greedy tokens");
                let diff = max_diff(&exact.forward(&ids, 0).unwrap(), &logits);
                assert!(diff <= 1e-3, "{name} {isa:?} exact: max |diff| {diff:e}");
                let diff = max_diff(&exact.forward(&ids, offset).unwrap(), &offset_logits);
                assert!(
                    diff <= 1e-3,
                    "{name} {isa:?} exact at {offset}: max |diff| {diff:e}"
                );

                let fast = load(Precision::Fast).forward(&ids, 0).unwrap();
                let diff = max_diff(&fast, &logits);
                assert!(
                    diff <= bf16_max,
                    "{name} {isa:?} fast: max |diff| {diff} > {bf16_max}"
                );
                let agree = fast
                    .chunks_exact(vocab)
                    .zip(logits.chunks_exact(vocab))
                    .filter(|(g, w)| argmax(g) == argmax(w))
                    .count();
                assert!(
                    agree >= bf16_argmax,
                    "{name} {isa:?} fast: argmax agrees at {agree}"
                );
            }
        }
    }
}
