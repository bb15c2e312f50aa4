//! PyO3 bindings: the `gpt_oss_cpu._core` extension module. Heavy calls release the GIL; every
//! engine error becomes one of the module's exception classes.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use crate::config::{AttentionKind, Config, Layout};
use crate::error::Error;
use crate::kernels::{self, Isa, Matmul, Precision, WeightMatrix};
use crate::kv_cache::KvFormat;
use crate::model::{LoadOptions, Model};
use crate::sampling::{Sampler, SamplingParams};
use crate::session::Session;
use crate::weights::DenseFormat;

/// Exception classes, created at import so that some can also derive from `ValueError`.
struct Exceptions {
    base: Py<PyType>,
    checkpoint: Py<PyType>,
    config: Py<PyType>,
    input: Py<PyType>,
    context_overflow: Py<PyType>,
}

static EXCEPTIONS: PyOnceLock<Exceptions> = PyOnceLock::new();

fn new_exception(
    py: Python<'_>,
    name: &str,
    bases: Vec<Bound<'_, PyType>>,
    doc: &str,
) -> PyResult<Py<PyType>> {
    let namespace = PyDict::new(py);
    namespace.set_item("__doc__", doc)?;
    namespace.set_item("__module__", "gpt_oss_cpu")?;
    let class = py
        .get_type::<PyType>()
        .call1((name, PyTuple::new(py, bases)?, namespace))?;
    Ok(class.cast_into::<PyType>()?.unbind())
}

fn exceptions(py: Python<'_>) -> PyResult<&Exceptions> {
    EXCEPTIONS.get_or_try_init(py, || {
        let base = new_exception(
            py,
            "GptOssError",
            vec![py.get_type::<PyException>()],
            "Base class of every error raised by gpt_oss_cpu.",
        )?;
        let sub = |name, value_error: bool, doc| {
            let mut bases = vec![base.bind(py).clone()];
            if value_error {
                bases.push(py.get_type::<PyValueError>());
            }
            new_exception(py, name, bases, doc)
        };
        Ok::<_, PyErr>(Exceptions {
            checkpoint: sub(
                "CheckpointError",
                false,
                "A checkpoint file or tensor is missing, truncated, corrupt, misshaped or mistyped.",
            )?,
            config: sub(
                "ConfigError",
                true,
                "config.json is missing, unreadable, or holds a value the engine cannot use.",
            )?,
            input: sub(
                "InputError",
                true,
                "A call got bad arguments: token ids out of range, empty input, bad sizes.",
            )?,
            context_overflow: sub(
                "ContextOverflowError",
                false,
                "Appending would exceed the session's max_context.",
            )?,
            base,
        })
    })
}

fn to_py_err(py: Python<'_>, err: Error) -> PyErr {
    let classes = match exceptions(py) {
        Ok(classes) => classes,
        Err(e) => return e,
    };
    let class = match &err {
        Error::Checkpoint(_) => &classes.checkpoint,
        Error::Config(_) => &classes.config,
        Error::Input(_) => &classes.input,
        Error::ContextOverflow(_) => &classes.context_overflow,
    };
    PyErr::from_type(class.bind(py).clone(), err.to_string())
}

fn input_error(py: Python<'_>, msg: String) -> PyErr {
    to_py_err(py, Error::Input(msg))
}

/// Token ids from a 1-D int64 array, checked to fit u32 (range against the vocabulary is checked
/// by the model).
fn token_ids(py: Python<'_>, ids: &PyReadonlyArray1<'_, i64>) -> PyResult<Vec<u32>> {
    let ids = ids.as_array();
    ids.iter()
        .enumerate()
        .map(|(i, &id)| {
            u32::try_from(id).map_err(|_| {
                input_error(
                    py,
                    format!("token id {id} at index {i} is not a valid token id"),
                )
            })
        })
        .collect()
}

fn position(py: Python<'_>, value: i64, name: &str) -> PyResult<usize> {
    usize::try_from(value)
        .map_err(|_| input_error(py, format!("{name} must be >= 0, found {value}")))
}

/// `[rows, cols]` array from a row-major buffer.
fn array2<T: numpy::Element>(
    py: Python<'_>,
    data: Vec<T>,
    cols: usize,
) -> PyResult<Bound<'_, numpy::PyArray2<T>>> {
    let rows = data.len() / cols.max(1);
    PyArray1::from_vec(py, data).reshape([rows, cols])
}

/// Model hyper-parameters read from config.json (Hugging Face or original/ keys).
#[pyclass(module = "gpt_oss_cpu", name = "Config", frozen)]
struct PyConfig {
    inner: Config,
}

#[pymethods]
impl PyConfig {
    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size
    }
    #[getter]
    fn hidden_size(&self) -> usize {
        self.inner.hidden_size
    }
    #[getter]
    fn num_hidden_layers(&self) -> usize {
        self.inner.num_hidden_layers
    }
    #[getter]
    fn num_attention_heads(&self) -> usize {
        self.inner.num_attention_heads
    }
    #[getter]
    fn num_key_value_heads(&self) -> usize {
        self.inner.num_key_value_heads
    }
    #[getter]
    fn head_dim(&self) -> usize {
        self.inner.head_dim
    }
    #[getter]
    fn num_local_experts(&self) -> usize {
        self.inner.num_local_experts
    }
    #[getter]
    fn num_experts_per_tok(&self) -> usize {
        self.inner.num_experts_per_tok
    }
    #[getter]
    fn intermediate_size(&self) -> usize {
        self.inner.intermediate_size
    }
    #[getter]
    fn sliding_window(&self) -> usize {
        self.inner.sliding_window
    }
    #[getter]
    fn layer_types(&self) -> Vec<&'static str> {
        self.inner
            .layer_types
            .iter()
            .map(|kind| match kind {
                AttentionKind::Sliding => "sliding_attention",
                AttentionKind::Full => "full_attention",
            })
            .collect()
    }
    #[getter]
    fn rope_theta(&self) -> f64 {
        self.inner.rope_theta
    }
    #[getter]
    fn rope_scaling_factor(&self) -> f64 {
        self.inner.rope_scaling_factor
    }
    #[getter]
    fn rope_beta_fast(&self) -> f64 {
        self.inner.rope_beta_fast
    }
    #[getter]
    fn rope_beta_slow(&self) -> f64 {
        self.inner.rope_beta_slow
    }
    #[getter]
    fn rope_original_max_position_embeddings(&self) -> usize {
        self.inner.rope_original_max_position_embeddings
    }
    #[getter]
    fn rope_truncate(&self) -> bool {
        self.inner.rope_truncate
    }
    #[getter]
    fn swiglu_limit(&self) -> f32 {
        self.inner.swiglu_limit
    }
    #[getter]
    fn rms_norm_eps(&self) -> f32 {
        self.inner.rms_norm_eps
    }
    #[getter]
    fn max_position_embeddings(&self) -> usize {
        self.inner.max_position_embeddings
    }
    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.inner.eos_token_ids.clone()
    }

    /// All fields as a plain dict.
    fn to_dict<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(slf.py());
        for name in FIELDS {
            dict.set_item(name, slf.getattr(name)?)?;
        }
        Ok(dict)
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        let c = &slf.get().inner;
        Ok(format!(
            "Config(layers={}, hidden={}, heads={}/{}, experts={} top-{}, vocab={})",
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.num_local_experts,
            c.num_experts_per_tok,
            c.vocab_size
        ))
    }
}

const FIELDS: [&str; 21] = [
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_local_experts",
    "num_experts_per_tok",
    "intermediate_size",
    "sliding_window",
    "layer_types",
    "rope_theta",
    "rope_scaling_factor",
    "rope_beta_fast",
    "rope_beta_slow",
    "rope_original_max_position_embeddings",
    "rope_truncate",
    "swiglu_limit",
    "rms_norm_eps",
    "max_position_embeddings",
    "eos_token_ids",
];

/// A memory-mapped gpt-oss checkpoint and the thread pool that runs it.
#[pyclass(module = "gpt_oss_cpu._core", name = "Engine", frozen)]
struct PyEngine {
    model: Arc<Model>,
}

#[pymethods]
impl PyEngine {
    #[staticmethod]
    #[pyo3(signature = (path, threads=None, isa=None, precision="exact", dense="bf16", kv_cache="f32", progress=None))]
    #[allow(clippy::too_many_arguments)]
    fn load(
        py: Python<'_>,
        path: PathBuf,
        threads: Option<usize>,
        isa: Option<&str>,
        precision: &str,
        dense: &str,
        kv_cache: &str,
        progress: Option<Bound<'_, PyAny>>,
    ) -> PyResult<PyEngine> {
        if let Some(callback) = progress.as_ref().filter(|c| !c.is_callable()) {
            return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "progress must be callable, found {}",
                callback.get_type().name()?
            )));
        }
        let options = LoadOptions {
            threads,
            isa: isa.map(|name| parse_isa(py, Some(name))).transpose()?,
            precision: parse_precision(py, precision)?,
            dense: DenseFormat::from_name(dense)
                .map_err(|e| input_error(py, format!("dense: {e}")))?,
            kv_cache: KvFormat::from_name(kv_cache)
                .map_err(|e| input_error(py, format!("kv_cache: {e}")))?,
        };
        let model = load_reporting(py, &path, options, progress.as_ref())?;
        Ok(PyEngine {
            model: Arc::new(model),
        })
    }

    #[getter]
    fn config(&self) -> PyConfig {
        PyConfig {
            inner: self.model.config.clone(),
        }
    }

    #[getter]
    fn layout(&self) -> &'static str {
        match self.model.config.layout {
            Layout::HuggingFace => "hf",
            Layout::Original => "original",
        }
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.model.dir.clone()
    }

    #[getter]
    fn threads(&self) -> usize {
        self.model.threads()
    }

    #[getter]
    fn isa(&self) -> &'static str {
        self.model.isa.name()
    }

    #[getter]
    fn kv_cache(&self) -> &'static str {
        self.model.kv_cache.name()
    }

    /// Read bandwidth (bytes/s, best of `repeats`) over the unembedding weights, on the model's
    /// threads (see `Model::measure_read_bandwidth`).
    #[pyo3(signature = (repeats=3))]
    fn measure_read_bandwidth(&self, py: Python<'_>, repeats: usize) -> f64 {
        py.detach(|| self.model.measure_read_bandwidth(repeats))
    }

    #[getter]
    fn precision(&self) -> &'static str {
        self.model.precision.name()
    }

    #[getter]
    fn dense(&self) -> &'static str {
        self.model.dense.name()
    }

    #[getter]
    fn checkpoint_bytes(&self) -> u64 {
        self.model.checkpoint_bytes
    }

    #[pyo3(signature = (ids, start_position=0))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        ids: PyReadonlyArray1<'py, i64>,
        start_position: i64,
    ) -> PyResult<Bound<'py, numpy::PyArray2<f32>>> {
        let tokens = token_ids(py, &ids)?;
        let start = position(py, start_position, "start_position")?;
        let logits = py
            .detach(|| self.model.forward(&tokens, start))
            .map_err(|e| to_py_err(py, e))?;
        array2(py, logits, self.model.config.vocab_size)
    }

    /// Forward pass that also returns (router_topk_idx [L,T,k], router_topk_weights [L,T,k],
    /// layer_outputs [L,T,hidden]) after the logits.
    #[pyo3(signature = (ids, start_position=0))]
    #[allow(clippy::type_complexity)]
    fn trace<'py>(
        &self,
        py: Python<'py>,
        ids: PyReadonlyArray1<'py, i64>,
        start_position: i64,
    ) -> PyResult<(
        Bound<'py, numpy::PyArray2<f32>>,
        Bound<'py, numpy::PyArray3<i32>>,
        Bound<'py, numpy::PyArray3<f32>>,
        Bound<'py, numpy::PyArray3<f32>>,
    )> {
        let tokens = token_ids(py, &ids)?;
        let start = position(py, start_position, "start_position")?;
        let (logits, trace) = py
            .detach(|| self.model.trace(&tokens, start))
            .map_err(|e| to_py_err(py, e))?;
        let c = &self.model.config;
        let (layers, t, k) = (c.num_hidden_layers, tokens.len(), c.num_experts_per_tok);
        let idx: Vec<i32> = trace
            .topk_idx
            .concat()
            .into_iter()
            .map(|e| e as i32)
            .collect();
        Ok((
            array2(py, logits, c.vocab_size)?,
            PyArray1::from_vec(py, idx).reshape([layers, t, k])?,
            PyArray1::from_vec(py, trace.topk_weights.concat()).reshape([layers, t, k])?,
            PyArray1::from_vec(py, trace.layer_outputs.concat()).reshape([
                layers,
                t,
                c.hidden_size,
            ])?,
        ))
    }

    /// Resumes a session written by `Session.save` with this model.
    fn load_session(&self, py: Python<'_>, path: PathBuf) -> PyResult<PySession> {
        let model = Arc::clone(&self.model);
        let session = py
            .detach(|| Session::load(model, &path))
            .map_err(|e| to_py_err(py, e))?;
        Ok(PySession {
            inner: Mutex::new(session),
        })
    }

    fn session(&self, py: Python<'_>, max_context: i64) -> PyResult<PySession> {
        let max_context = position(py, max_context, "max_context")?;
        let session =
            Session::new(Arc::clone(&self.model), max_context).map_err(|e| to_py_err(py, e))?;
        Ok(PySession {
            inner: Mutex::new(session),
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "Engine(path={:?}, layout={:?}, threads={})",
            self.model.dir,
            self.layout(),
            self.threads()
        )
    }
}

/// Chooses the next token from float32 logits.
///
/// Order: repetition_penalty (positive logits of tokens in the history divided by it, negative
/// ones multiplied), presence_penalty + frequency_penalty * count subtracted over the history,
/// logit_bias added; temperature 0 then takes the argmax (lowest id on ties), otherwise the
/// logits are divided by the temperature and cut by top_k (0 = off), top_p and min_p (relative
/// to the most likely token) before a seeded draw. The history is every token this sampler drew
/// plus the tokens given to accept(). With logprobs=n, last_logprobs() lists the n most likely
/// (token, logprob) of the last draw, best first, and last_token_logprob() the drawn one, under
/// log_softmax of the logits after penalties, bias and temperature (1 when greedy), before the
/// cuts. Defaults: temperature 1, top_p 1, everything else off.
///
/// >>> s = Sampler(0.8, top_k=40, seed=1, logprobs=2)
/// >>> token = s.sample(logits)
/// >>> s.last_logprobs()  # [(id, logprob), (id, logprob)]
#[pyclass(module = "gpt_oss_cpu", name = "Sampler")]
struct PySampler {
    inner: Sampler,
}

/// A non-negative Python integer as a usize, or an InputError naming the argument.
fn non_negative(py: Python<'_>, value: i64, name: &str) -> PyResult<usize> {
    usize::try_from(value)
        .map_err(|_| input_error(py, format!("{name} must be >= 0, found {value}")))
}

#[pymethods]
impl PySampler {
    #[new]
    #[pyo3(signature = (
        temperature=1.0,
        top_p=1.0,
        seed=None,
        *,
        top_k=0,
        min_p=0.0,
        repetition_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        logit_bias=None,
        logprobs=0,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        temperature: f32,
        top_p: f32,
        seed: Option<u64>,
        top_k: i64,
        min_p: f32,
        repetition_penalty: f32,
        presence_penalty: f32,
        frequency_penalty: f32,
        logit_bias: Option<std::collections::HashMap<i64, f32>>,
        logprobs: i64,
    ) -> PyResult<Self> {
        let mut bias = Vec::new();
        for (id, b) in logit_bias.unwrap_or_default() {
            let id = u32::try_from(id).map_err(|_| {
                input_error(py, format!("logit_bias token id {id} is out of range"))
            })?;
            bias.push((id, b));
        }
        bias.sort_by_key(|&(id, _)| id);
        let params = SamplingParams {
            temperature,
            top_p,
            top_k: non_negative(py, top_k, "top_k")?,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            logit_bias: bias,
            logprobs: non_negative(py, logprobs, "logprobs")?,
        };
        let inner = Sampler::with_params(params, seed).map_err(|e| to_py_err(py, e))?;
        Ok(PySampler { inner })
    }

    #[getter]
    fn temperature(&self) -> f32 {
        self.inner.params().temperature
    }

    #[getter]
    fn top_p(&self) -> f32 {
        self.inner.params().top_p
    }

    #[getter]
    fn top_k(&self) -> usize {
        self.inner.params().top_k
    }

    #[getter]
    fn min_p(&self) -> f32 {
        self.inner.params().min_p
    }

    #[getter]
    fn repetition_penalty(&self) -> f32 {
        self.inner.params().repetition_penalty
    }

    #[getter]
    fn presence_penalty(&self) -> f32 {
        self.inner.params().presence_penalty
    }

    #[getter]
    fn frequency_penalty(&self) -> f32 {
        self.inner.params().frequency_penalty
    }

    #[getter]
    fn logit_bias(&self) -> std::collections::HashMap<u32, f32> {
        self.inner.params().logit_bias.iter().copied().collect()
    }

    #[getter]
    fn logprobs(&self) -> usize {
        self.inner.params().logprobs
    }

    /// Sampled and accepted tokens, in order: what the penalties see.
    #[getter]
    fn history(&self) -> Vec<u32> {
        self.inner.history().to_vec()
    }

    /// Draws a token from float32 logits and adds it to the history.
    fn sample(&mut self, py: Python<'_>, logits: PyReadonlyArray1<'_, f32>) -> PyResult<u32> {
        let view = logits.as_array();
        let owned;
        let logits = match view.as_slice() {
            Some(slice) => slice,
            None => {
                owned = view.iter().copied().collect::<Vec<f32>>();
                &owned
            }
        };
        let sampler = &mut self.inner;
        py.detach(|| sampler.sample(logits))
            .map_err(|e| to_py_err(py, e))
    }

    /// Adds a token chosen elsewhere to the history.
    fn accept(&mut self, py: Python<'_>, token: i64) -> PyResult<()> {
        let token = u32::try_from(token)
            .map_err(|_| input_error(py, format!("token id {token} is out of range")))?;
        self.inner.accept(token);
        Ok(())
    }

    /// Forgets the history (the random stream goes on).
    fn clear_history(&mut self) {
        self.inner.clear_history();
    }

    /// `(token, logprob)` for the most likely tokens of the last draw, best first; empty when
    /// `logprobs` is 0 or nothing was drawn yet.
    fn last_logprobs(&self) -> Vec<(u32, f32)> {
        self.inner
            .last_logprobs()
            .map_or_else(Vec::new, |lp| lp.top.clone())
    }

    /// `(token, logprob)` of the last drawn token, or None when `logprobs` is 0.
    fn last_token_logprob(&self) -> Option<(u32, f32)> {
        self.inner.last_logprobs().map(|lp| (lp.token, lp.logprob))
    }

    fn __repr__(&self) -> String {
        let p = self.inner.params();
        format!(
            "Sampler(temperature={}, top_p={}, top_k={}, min_p={}, repetition_penalty={}, \
             presence_penalty={}, frequency_penalty={}, logit_bias={} ids, logprobs={})",
            p.temperature,
            p.top_p,
            p.top_k,
            p.min_p,
            p.repetition_penalty,
            p.presence_penalty,
            p.frequency_penalty,
            p.logit_bias.len(),
            p.logprobs
        )
    }
}

/// A KV cache bound to one Engine. Calls lock it after releasing the GIL, so concurrent use from
/// several Python threads is serialised rather than deadlocked.
#[pyclass(module = "gpt_oss_cpu._core", name = "Session", frozen)]
struct PySession {
    inner: Mutex<Session>,
}

impl PySession {
    fn lock(&self) -> MutexGuard<'_, Session> {
        // Engine calls return errors rather than panic; should one panic anyway, the session's
        // cache is still structurally valid, so a poisoned lock is taken over.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[pymethods]
impl PySession {
    #[getter]
    fn position(&self, py: Python<'_>) -> usize {
        py.detach(|| self.lock().position())
    }

    #[getter]
    fn max_context(&self, py: Python<'_>) -> usize {
        py.detach(|| self.lock().max_context())
    }

    #[getter]
    fn tokens(&self, py: Python<'_>) -> Vec<u32> {
        py.detach(|| self.lock().tokens().to_vec())
    }

    #[getter]
    fn cache_bytes(&self, py: Python<'_>) -> usize {
        py.detach(|| self.lock().cache_bytes())
    }

    #[pyo3(signature = (ids, return_logits=true))]
    fn append<'py>(
        &self,
        py: Python<'py>,
        ids: PyReadonlyArray1<'py, i64>,
        return_logits: bool,
    ) -> PyResult<Option<Bound<'py, PyArray1<f32>>>> {
        let tokens = token_ids(py, &ids)?;
        let logits = py
            .detach(|| {
                let mut session = self.lock();
                let logits = session.append(&tokens)?;
                Ok(return_logits.then(|| logits.to_vec()))
            })
            .map_err(|e| to_py_err(py, e))?;
        Ok(logits.map(|l| PyArray1::from_vec(py, l)))
    }

    /// Draws from the logits of the last append with `sampler` (which adds the token to its
    /// history); the session itself is unchanged.
    fn sample(&self, py: Python<'_>, sampler: &Bound<'_, PySampler>) -> PyResult<u32> {
        // A sampler busy in another thread is a RuntimeError, not a panic.
        let mut sampler = sampler.try_borrow_mut()?;
        let sampler = &mut sampler.inner;
        py.detach(|| self.lock().sample(sampler))
            .map_err(|e| to_py_err(py, e))
    }

    fn truncate(&self, py: Python<'_>, n: i64) -> PyResult<()> {
        let n = position(py, n, "n")?;
        py.detach(|| self.lock().truncate(n))
            .map_err(|e| to_py_err(py, e))
    }

    /// Writes the session (tokens, KV cache, last logits) to `path`.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.lock().save(&path))
            .map_err(|e| to_py_err(py, e))
    }

    fn reset(&self, py: Python<'_>) {
        py.detach(|| self.lock().reset())
    }
}

fn parse_precision(py: Python<'_>, name: &str) -> PyResult<Precision> {
    Precision::from_name(name).map_err(|e| input_error(py, format!("precision: {e}")))
}

fn parse_isa(py: Python<'_>, name: Option<&str>) -> PyResult<Isa> {
    let isa = match name {
        None => kernels::default_isa().map_err(|msg| input_error(py, msg))?,
        Some(name) => Isa::from_name(name).map_err(|e| input_error(py, format!("isa: {e}")))?,
    };
    if !isa.is_supported() {
        return Err(input_error(
            py,
            format!("this CPU does not support {}", isa.name()),
        ));
    }
    Ok(isa)
}

/// `x @ w.T` for float32 `x` `[T, K]` and bf16 bit patterns `w` (uint16) `[N, K]`: the model's
/// dense kernel, exposed for benchmarks and cross-checks.
#[pyfunction]
#[pyo3(signature = (x, w, isa=None, precision="exact"))]
fn matmul_bf16<'py>(
    py: Python<'py>,
    x: numpy::PyReadonlyArray2<'py, f32>,
    w: numpy::PyReadonlyArray2<'py, u16>,
    isa: Option<&str>,
    precision: &str,
) -> PyResult<Bound<'py, numpy::PyArray2<f32>>> {
    let isa = parse_isa(py, isa)?;
    let precision = parse_precision(py, precision)?;
    let (tokens, cols, rows, w_cols) = (x.shape()[0], x.shape()[1], w.shape()[0], w.shape()[1]);
    if cols != w_cols || tokens == 0 || rows == 0 || cols == 0 {
        return Err(input_error(
            py,
            format!("shapes x {:?} and w {:?} do not fit", x.shape(), w.shape()),
        ));
    }
    let (x, w) = (x.as_slice()?, w.as_slice()?);
    let mut y = vec![0f32; tokens * rows];
    let job = Matmul {
        weights: WeightMatrix::Bf16(w),
        rows,
        cols,
        x,
        bias: None,
        y: &mut y,
    };
    py.detach(|| kernels::matmul(isa, precision, job));
    array2(py, y, rows)
}

/// One matrix in the 8-bit format of `dense="q8"`, as [`quantize_q8`] makes it: its stored
/// codes are 1..=255 by construction, which the AVX2 kernel needs, so products need not scan them.
#[pyclass(module = "gpt_oss_cpu._core", name = "Q8Weights", frozen)]
struct PyQ8Weights {
    /// `[rows, cols]`, stored `+ 128`, in the kernels' grouped order.
    codes: Vec<u8>,
    /// `[rows, cols / 32]`, bf16 bit patterns.
    scales: Vec<u16>,
    rows: usize,
    cols: usize,
}

#[pymethods]
impl PyQ8Weights {
    /// `(N, K)`.
    #[getter]
    fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes of codes and scales: what a product streams.
    #[getter]
    fn nbytes(&self) -> usize {
        self.codes.len() + 2 * self.scales.len()
    }
}

/// bf16 bit patterns `w` (uint16) `[N, K]` in the 8-bit format of `dense="q8"`: a [`PyQ8Weights`]
/// (codes `+ 128` in the kernels' grouped order, and a bf16 scale per 32).
#[pyfunction]
fn quantize_q8(py: Python<'_>, w: numpy::PyReadonlyArray2<'_, u16>) -> PyResult<PyQ8Weights> {
    let (rows, cols) = (w.shape()[0], w.shape()[1]);
    if rows == 0 || cols == 0 || cols % 32 != 0 {
        return Err(input_error(
            py,
            format!(
                "w {:?}: expected [N, K] with K a positive multiple of 32",
                w.shape()
            ),
        ));
    }
    let isa = parse_isa(py, None)?;
    let w = w.as_slice()?;
    let (mut codes, mut scales) = (vec![0u8; rows * cols], vec![0u16; rows * cols / 32]);
    py.detach(|| {
        let rows = codes
            .chunks_exact_mut(cols)
            .zip(scales.chunks_exact_mut(cols / 32));
        for (r, (codes, scales)) in rows.enumerate() {
            kernels::quantize_bf16_row(isa, &w[r * cols..(r + 1) * cols], codes, scales);
        }
    });
    Ok(PyQ8Weights {
        codes,
        scales,
        rows,
        cols,
    })
}

/// `x @ W.T` for one 8-bit matrix from [`quantize_q8`] (the activations are quantized to 8 bits
/// per 32, as with `dense="q8"`).
#[pyfunction]
#[pyo3(signature = (x, weights, isa=None))]
fn matmul_q8<'py>(
    py: Python<'py>,
    x: numpy::PyReadonlyArray2<'py, f32>,
    weights: &PyQ8Weights,
    isa: Option<&str>,
) -> PyResult<Bound<'py, numpy::PyArray2<f32>>> {
    let isa = parse_isa(py, isa)?;
    let (tokens, cols, rows) = (x.shape()[0], x.shape()[1], weights.rows);
    if tokens == 0 || cols != weights.cols {
        return Err(input_error(
            py,
            format!(
                "shapes x {:?} and weights {:?} do not fit",
                x.shape(),
                weights.shape()
            ),
        ));
    }
    let x = x.as_slice()?;
    let mut y = vec![0f32; tokens * rows];
    let job = Matmul {
        weights: WeightMatrix::Q8 {
            codes: &weights.codes,
            scales: &weights.scales,
        },
        rows,
        cols,
        x,
        bias: None,
        y: &mut y,
    };
    py.detach(|| kernels::matmul(isa, Precision::Fast, job));
    array2(py, y, rows)
}

/// `x @ W.T` for one MXFP4 matrix: `blocks` uint8 `[N, K/32, 16]`, `scales` uint8 `[N, K/32]`.
#[pyfunction]
#[pyo3(signature = (x, blocks, scales, isa=None, precision="exact"))]
fn matmul_mxfp4<'py>(
    py: Python<'py>,
    x: numpy::PyReadonlyArray2<'py, f32>,
    blocks: numpy::PyReadonlyArray3<'py, u8>,
    scales: numpy::PyReadonlyArray2<'py, u8>,
    isa: Option<&str>,
    precision: &str,
) -> PyResult<Bound<'py, numpy::PyArray2<f32>>> {
    let isa = parse_isa(py, isa)?;
    let precision = parse_precision(py, precision)?;
    let (tokens, cols) = (x.shape()[0], x.shape()[1]);
    let (rows, groups, block_bytes) = (blocks.shape()[0], blocks.shape()[1], blocks.shape()[2]);
    let (s_rows, s_groups) = (scales.shape()[0], scales.shape()[1]);
    if block_bytes != 16
        || groups == 0
        || rows == 0
        || groups.checked_mul(32) != Some(cols)
        || s_rows != rows
        || s_groups != groups
        || tokens == 0
    {
        return Err(input_error(
            py,
            format!(
                "shapes x {:?}, blocks {:?}, scales {:?} do not fit",
                x.dims(),
                blocks.dims(),
                scales.dims()
            ),
        ));
    }
    let (x, blocks, scales) = (x.as_slice()?, blocks.as_slice()?, scales.as_slice()?);
    let mut y = vec![0f32; tokens * rows];
    let weights = WeightMatrix::Mxfp4 { blocks, scales };
    let job = Matmul {
        weights,
        rows,
        cols,
        x,
        bias: None,
        y: &mut y,
    };
    py.detach(|| kernels::matmul(isa, precision, job));
    array2(py, y, rows)
}

/// [`Model::load_with_progress`] on a scoped thread, while this one (holding the GIL between
/// waits) calls `progress(done, total)` for each report and checks for signals: Python runs signal
/// handlers, Ctrl-C's included, only on the main thread, and progress bars and thread-locals
/// expect the caller's thread. Each report waits for its answer, so an exception from `progress`
/// cancels the build right there (no cache file is kept) and is raised instead of the load's
/// error; a signal cancels it at the next report.
fn load_reporting(
    py: Python<'_>,
    path: &std::path::Path,
    options: LoadOptions,
    progress: Option<&Bound<'_, PyAny>>,
) -> PyResult<Model> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc::{channel, RecvTimeoutError};

    let (reports, received) = channel::<(usize, usize)>();
    let (answer, answers) = channel::<bool>();
    // The progress closure and `detach` need Sync captures; a Receiver is not.
    let (received, answers) = (Mutex::new(received), Mutex::new(answers));
    let stopped = AtomicBool::new(false);
    let mut raised: Option<PyErr> = None;
    let loaded = std::thread::scope(|scope| {
        let (answers, stopped) = (&answers, &stopped);
        let worker = scope.spawn(move || {
            let report = |done: usize, total: usize| {
                !stopped.load(Ordering::Relaxed)
                    && reports.send((done, total)).is_ok()
                    && answers.lock().is_ok_and(|a| a.recv().unwrap_or(false))
            };
            Model::load_with_progress(path, options, &report)
            // `reports` drops here: the loop below ends.
        });
        loop {
            let wait = std::time::Duration::from_millis(50);
            let next = py.detach(|| {
                let received = received.lock().unwrap_or_else(|e| e.into_inner());
                received.recv_timeout(wait)
            });
            match next {
                Ok((done, total)) => {
                    let go = raised.is_none()
                        && progress.is_none_or(|callback| match callback.call1((done, total)) {
                            Ok(_) => true,
                            Err(e) => {
                                raised = Some(e);
                                false
                            }
                        });
                    let _ = answer.send(go);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if raised.is_none() {
                if let Err(e) = py.check_signals() {
                    stopped.store(true, Ordering::Relaxed);
                    raised = Some(e);
                }
            }
        }
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    });
    match raised {
        Some(e) => Err(e),
        None => loaded.map_err(|e| to_py_err(py, e)),
    }
}

/// Version, kernel instruction sets and build details: ``isa`` (the default, or ``isa_error`` if
/// ``GPT_OSS_CPU_ISA`` names one this CPU lacks), ``supported_isas``, ``cpu_extensions`` (those
/// the kernels use where present: ``avx512vnni``, ``avx512bf16``, ``dotprod``), ``target_arch``,
/// ``debug_assertions`` and ``default_threads``.
///
/// Example:
///     >>> gpt_oss_cpu.build_info()["supported_isas"]  # doctest: +SKIP
///     ['scalar', 'avx2', 'avx512']
#[pyfunction]
fn build_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let info = PyDict::new(py);
    info.set_item("version", env!("CARGO_PKG_VERSION"))?;
    match kernels::default_isa() {
        Ok(isa) => info.set_item("isa", isa.name())?,
        Err(msg) => info.set_item("isa_error", msg)?,
    }
    let supported: Vec<&str> = Isa::ALL
        .into_iter()
        .filter(|i| i.is_supported())
        .map(Isa::name)
        .collect();
    info.set_item("supported_isas", supported)?;
    info.set_item("cpu_extensions", kernels::cpu_extensions())?;
    info.set_item("target_arch", std::env::consts::ARCH)?;
    info.set_item("debug_assertions", cfg!(debug_assertions))?;
    info.set_item("default_threads", crate::model::default_threads())?;
    Ok(info)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let classes = exceptions(py)?;
    m.add("GptOssError", classes.base.bind(py))?;
    m.add("CheckpointError", classes.checkpoint.bind(py))?;
    m.add("ConfigError", classes.config.bind(py))?;
    m.add("InputError", classes.input.bind(py))?;
    m.add("ContextOverflowError", classes.context_overflow.bind(py))?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<PyConfig>()?;
    m.add_class::<PyEngine>()?;
    m.add_class::<PySampler>()?;
    m.add_class::<PySession>()?;
    m.add_class::<PyQ8Weights>()?;
    m.add_function(wrap_pyfunction!(build_info, m)?)?;
    m.add_function(wrap_pyfunction!(matmul_bf16, m)?)?;
    m.add_function(wrap_pyfunction!(matmul_mxfp4, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_q8, m)?)?;
    m.add_function(wrap_pyfunction!(matmul_q8, m)?)?;
    Ok(())
}
