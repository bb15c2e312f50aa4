//! The compute kernels behind one narrow interface: matrix × activations for bf16 and MXFP4 weights.
//!
//! Each instruction set lives in its own file (`scalar.rs`, `avx2.rs`, `avx512.rs`, `neon.rs`) and
//! provides the same functions (`matmul_bf16`, `matmul_mxfp4`, and the 8-bit products) over a block
//! of output rows; [`Isa`] picks one at run time (never at build time, so one wheel runs on any
//! x86-64, and one on any aarch64). The scalar kernels are the oracle every SIMD kernel is tested
//! against. The drivers here split output rows over the current rayon pool. On x86-64, products
//! of many tokens run the loops of `panels.rs`, with a decoder and a register tile from the AVX2
//! or AVX-512 file.

use std::sync::OnceLock;

use rayon::prelude::*;

pub mod attention;
#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
#[cfg(target_arch = "aarch64")]
pub mod neon;
#[cfg(target_arch = "x86_64")]
pub mod panels;
pub mod q8;
pub mod scalar;

/// Values in one MXFP4 block (they share a scale).
pub const MXFP4_BLOCK_VALUES: usize = 32;

/// Bytes of one packed MXFP4 block (32 four-bit codes).
pub const MXFP4_BLOCK_BYTES: usize = 16;

/// Environment variable that forces an instruction set (for tests and benchmarks).
pub const ISA_ENV: &str = "GPT_OSS_CPU_ISA";

/// Instruction set of the kernels in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
    Neon,
}

impl Isa {
    /// Every instruction set, from the least to the most preferred where several are supported.
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    /// The instruction set called `name` (`"scalar"`, `"avx2"`, `"avx512"` or `"neon"`).
    pub fn from_name(name: &str) -> Result<Isa, String> {
        crate::error::by_name(&Isa::ALL, Isa::name, name)
    }

    /// Panics unless this CPU can run the kernels of `self`: running them anyway would be
    /// undefined behaviour.
    fn assert_supported(self) {
        assert!(
            self.is_supported(),
            "this CPU does not support {}",
            self.name()
        );
    }

    /// Whether this CPU can run the kernels of `self`.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            _ => false,
        }
    }

    /// The best supported instruction set, or the one `GPT_OSS_CPU_ISA` names.
    fn select() -> Result<Isa, String> {
        match std::env::var(ISA_ENV) {
            Ok(name) if !name.is_empty() => {
                let isa = Isa::from_name(&name).map_err(|e| format!("{ISA_ENV}: {e}"))?;
                if isa.is_supported() {
                    Ok(isa)
                } else {
                    Err(format!(
                        "{ISA_ENV}={name}: this CPU does not support {name}"
                    ))
                }
            }
            _ => Ok(Isa::ALL
                .into_iter()
                .rev()
                .find(|i| i.is_supported())
                .unwrap_or(Isa::Scalar)),
        }
    }
}

/// How activations enter the matrix products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// fp32 activations: the exact forward pass of SPEC §4.
    Exact,
    /// Activations rounded where that buys speed: to 8 bits per 32-block ([`q8`]) for the MXFP4
    /// products (integer dot products), to bf16 for the bf16 products (`vdpbf16ps`). The same
    /// rounding on every instruction set, so results do not depend on the CPU.
    Fast,
}

impl Precision {
    pub const ALL: [Precision; 2] = [Precision::Exact, Precision::Fast];

    pub fn name(self) -> &'static str {
        match self {
            Precision::Exact => "exact",
            Precision::Fast => "fast",
        }
    }

    /// The precision called `name` (`"exact"` or `"fast"`).
    pub fn from_name(name: &str) -> Result<Precision, String> {
        crate::error::by_name(&Precision::ALL, Precision::name, name)
    }
}

/// Whether the AVX-512 integer kernels (`vpdpbusd`) can run; without VNNI, AVX-512 CPUs run the
/// 8-bit products with the AVX2 kernels.
#[cfg(target_arch = "x86_64")]
fn has_avx512_vnni() -> bool {
    static VNNI: OnceLock<bool> = OnceLock::new();
    *VNNI.get_or_init(|| is_x86_feature_detected!("avx512vnni"))
}

/// Whether the AVX-512 bf16 dot products (`vdpbf16ps`) can run.
#[cfg(target_arch = "x86_64")]
fn has_avx512_bf16() -> bool {
    static BF16: OnceLock<bool> = OnceLock::new();
    *BF16.get_or_init(|| is_x86_feature_detected!("avx512bf16"))
}

/// The optional extensions of this CPU that the kernels use where present: VNNI and BF16 with
/// AVX-512, the dot product with NEON.
pub fn cpu_extensions() -> Vec<&'static str> {
    let mut found = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512_vnni() {
            found.push("avx512vnni");
        }
        if has_avx512_bf16() {
            found.push("avx512bf16");
        }
    }
    #[cfg(target_arch = "aarch64")]
    if neon::has_dotprod() {
        found.push("dotprod");
    }
    found
}

/// The instruction set models use unless told otherwise: chosen once, at first use.
pub fn default_isa() -> Result<Isa, String> {
    static DEFAULT: OnceLock<Result<Isa, String>> = OnceLock::new();
    DEFAULT.get_or_init(Isa::select).clone()
}

/// From this many tokens on, AVX-512 runs 8-bit MXFP4 products with the tokens in vector lanes.
#[cfg(target_arch = "x86_64")]
const COLUMN_KERNEL_TOKENS: usize = 16;

/// From how many tokens on products with f32 activations (exact, and fast bf16 without AVX-512
/// BF16) run by broadcasting activations against decoded panels of rows
/// ([`panels::matmul_broadcast`]) on x86-64. That decodes each weight once and
/// then spends fewer instructions per product than the register tiles, which decode each weight
/// once per 4 tokens. Measured against them (kernel benchmarks, 5760 × 2880, 2 threads):
/// * AVX-512 bf16: -8 % at 11 tokens, +7 % at 12, +35 % at 32, +100 % at 512;
/// * AVX-512 MXFP4, whose tiles decode cheaply: -2 % at 20, +7.5 % at 24, +15 % at 32, +60 % at
///   512;
/// * AVX2 bf16: -15 % at 4, +13 % at 6, +33 % at 16, +86 % at 512;
/// * AVX2 MXFP4: -9 % at 6, -2 % at 8, +17 % at 10, +84 % at 64, +111 % at 512.
#[cfg(target_arch = "x86_64")]
fn broadcast_tokens(isa: Isa, weights: WeightMatrix) -> usize {
    match (isa, weights) {
        (Isa::Avx512, WeightMatrix::Mxfp4 { .. }) => 22,
        (Isa::Avx512, _) => 12,
        (_, WeightMatrix::Mxfp4 { .. }) => 9,
        _ => 6,
    }
}

/// As [`broadcast_tokens`] for the fast path's bf16 pairs on AVX-512 BF16
/// ([`avx512::Bf16Pairs`]), against [`avx512::matmul_bf16_dot`]'s register tiles: -7 % at 6
/// tokens, +4 % at 8, +25 % at 10, +47 % at 64, +107 % at 512.
#[cfg(target_arch = "x86_64")]
const BROADCAST_PAIRS_TOKENS: usize = 8;

/// Weight bytes per parallel task: enough for the hardware prefetcher to get up to speed and to
/// amortise scheduling, little enough to balance the threads. Prefill is compute-bound and gets
/// the smallest; a single token streams its weights, and each task restarts that stream, so it
/// gets tasks up to 4 times larger while every thread still gets ~4 of a region's tasks. Measured
/// in the 20b on 2 threads (one process alternating sizes or builds), against 256 KiB everywhere:
/// decoding +0-2 % exact, +1.5 % fast, +2-4 % fast + q8 with 1 MiB; exact prefill -2.6 % with
/// 1 MiB.
const TASK_BYTES: std::ops::RangeInclusive<usize> = (256 << 10)..=(1 << 20);

impl WeightMatrix<'_> {
    /// Bytes of one row of `cols` weights.
    fn row_bytes(&self, cols: usize) -> usize {
        match self {
            WeightMatrix::Bf16(_) => cols * 2,
            WeightMatrix::Mxfp4 { .. } => cols / 2 + cols / MXFP4_BLOCK_VALUES,
            WeightMatrix::Q8 { .. } => cols + cols / MXFP4_BLOCK_VALUES * 2,
        }
    }

    /// Output rows per parallel task of about `task_bytes`: a multiple of `multiple` (whole
    /// register tiles).
    fn rows_per_task(&self, cols: usize, task_bytes: usize, multiple: usize) -> usize {
        (task_bytes / self.row_bytes(cols)).max(multiple) / multiple * multiple
    }
}

/// A weight matrix `[rows, cols]` in one of the checkpoint's formats.
#[derive(Clone, Copy)]
pub enum WeightMatrix<'a> {
    /// bf16 bit patterns, row-major.
    Bf16(&'a [u16]),
    /// MXFP4: packed `blocks` (`cols / 2` bytes a row) and E8M0 `scales` (`cols / 32` bytes a row).
    Mxfp4 { blocks: &'a [u8], scales: &'a [u8] },
    /// 8-bit blocks (`dense="q8"`): `codes` stored `+ 128` (`cols` bytes a row, in the grouped
    /// order of [`q8::group_row`]; 1..=255 as the quantizer writes them, which the AVX2 kernel
    /// needs; the others take 0 too) and bf16 `scales` (`cols / 32` a row, bit patterns). The
    /// activations are quantized to 8 bits at every precision.
    Q8 { codes: &'a [u8], scales: &'a [u16] },
}

/// One product of a batch: `y[t, r] = Σ_c x[t, c] · W[r, c] + bias[r]`, with `x` `[tokens, cols]`
/// and `y` `[tokens, rows]`.
pub struct Matmul<'a> {
    pub weights: WeightMatrix<'a>,
    pub rows: usize,
    pub cols: usize,
    pub x: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub y: &'a mut [f32],
}

/// Runs several products as one parallel region, their rows split into tasks over the current
/// rayon pool: one synchronisation instead of one per matrix (q/k/v, or the routed experts).
/// `precision` says whether the activations are rounded (see [`Precision`]); 8-bit weights
/// always take 8-bit activations.
///
/// # Panics
/// If this CPU does not support `isa` (running its kernels would be undefined behaviour), or a
/// job has no columns.
pub fn matmul_batch(isa: Isa, precision: Precision, jobs: Vec<Matmul<'_>>) {
    isa.assert_supported();
    struct Spec<'a> {
        weights: WeightMatrix<'a>,
        cols: usize,
        tokens: usize,
        /// Index into `activations`.
        x: usize,
        bias: Option<&'a [f32]>,
    }
    let mut specs = Vec::with_capacity(jobs.len());
    let mut outputs = Vec::with_capacity(jobs.len());
    // Jobs that read the same `x` in the same weight format share its prepared activations
    // (q, k and v; a decoded token's routed experts).
    let mut activations: Vec<Activations> = Vec::new();
    let mut prepared_for = Vec::new();
    for job in jobs {
        assert!(job.cols > 0, "a matrix product needs at least one column");
        if let Some(bias) = job.bias {
            assert_eq!(bias.len(), job.rows, "a bias needs one value per row");
        }
        let tokens = job.x.len() / job.cols;
        debug_assert_eq!(job.y.len(), tokens * job.rows);
        if tokens == 0 {
            continue;
        }
        let key = (
            std::mem::discriminant(&job.weights),
            job.x.as_ptr(),
            job.x.len(),
            job.cols,
        );
        let x = match prepared_for.iter().position(|k| *k == key) {
            Some(x) => x,
            None => {
                activations.push(prepare_activations(
                    isa,
                    precision,
                    job.weights,
                    job.x,
                    job.cols,
                ));
                prepared_for.push(key);
                activations.len() - 1
            }
        };
        specs.push(Spec {
            weights: job.weights,
            cols: job.cols,
            tokens,
            x,
            bias: job.bias,
        });
        outputs.push((job.y, job.rows, tokens));
    }

    let task_bytes = if specs.iter().all(|s| s.tokens == 1) {
        let bytes: usize = specs
            .iter()
            .zip(&outputs)
            .map(|(s, (_, rows, _))| s.weights.row_bytes(s.cols) * rows)
            .sum();
        let threads = rayon::current_num_threads();
        (bytes / (4 * threads)).clamp(*TASK_BYTES.start(), *TASK_BYTES.end())
    } else {
        *TASK_BYTES.start()
    };
    // One token: `[rows, 1]` is y's layout, and each task owns a slice of it. Several: the
    // kernels compute a `[rows, tokens]` (or `[tokens, rows]`) block, which the task writes into
    // y's token-major rows.
    enum TaskOut<'a> {
        Slice(&'a mut [f32]),
        Rows(usize, TokenMajor),
    }
    let mut tasks = Vec::new();
    for (j, (y, rows, tokens)) in outputs.into_iter().enumerate() {
        let s = &specs[j];
        let multiple = activations[s.x].task_rows_multiple();
        let task_rows = s.weights.rows_per_task(s.cols, task_bytes, multiple);
        if tokens == 1 {
            for (i, out) in y.chunks_mut(task_rows).enumerate() {
                tasks.push((j, i * task_rows, TaskOut::Slice(out)));
            }
        } else {
            let y = TokenMajor::new(y, rows, tokens);
            for first in (0..rows).step_by(task_rows) {
                tasks.push((j, first, TaskOut::Rows(task_rows.min(rows - first), y)));
            }
        }
    }
    // Split down to single tasks, so the thread that finishes first steals a task, not waits for
    // the other's unsplit run: the threads' last tasks end 4 µs apart instead of 14 (20b decode).
    tasks
        .into_par_iter()
        .with_max_len(1)
        .for_each(|(j, first, out)| {
            let s = &specs[j];
            // Each task's own block, which stays in its core's cache, rather than slices of one
            // `[rows, tokens]` buffer per job (megabytes, zeroed and page-faulted anew on each
            // call): pp512 +4.7 % exact, +1.3-5.9 % fast, +0.7 % fast q8 (alternating builds).
            let mut block = Vec::new();
            let (out, y) = match out {
                TaskOut::Slice(out) => (out, None),
                TaskOut::Rows(n, y) => {
                    block.resize(n * s.tokens, 0f32);
                    (&mut block[..], Some(y))
                }
            };
            let n = out.len() / s.tokens;
            let token_major = activations[s.x].token_major();
            if let Some(bias) = s.bias {
                prefetch_values(&bias[first..first + n]);
            }
            run_kernel(
                isa,
                s.weights,
                &activations[s.x],
                s.tokens,
                s.cols,
                first,
                out,
            );
            // Here, while the rows are in this core's cache. Added after the region, serially,
            // from rows the other core wrote, they took ~1 % of a decoded token's time.
            match s.bias {
                // One token, or a token-major block: a flat sum per token that vectorises.
                Some(bias) if s.tokens == 1 || token_major => {
                    for token in out.chunks_exact_mut(n) {
                        token
                            .iter_mut()
                            .zip(&bias[first..])
                            .for_each(|(v, b)| *v += b);
                    }
                }
                Some(bias) => {
                    for (row, b) in out.chunks_exact_mut(s.tokens).zip(&bias[first..]) {
                        row.iter_mut().for_each(|v| *v += b);
                    }
                }
                None => {}
            }
            if let Some(y) = y {
                // SAFETY: this task alone computes rows `first..` of job j.
                unsafe { y.write_rows(first, out, token_major) };
            }
        });
}

/// The output `y` (`[tokens, rows]`) of a product of several tokens, shared by the tasks that
/// each write their own rows of every token into it. Their blocks are still in cache there: a
/// transpose after the parallel region, serial and row by row, took 8 % of a
/// 512-token prefill, and 6 % in parallel blocks of 16 tokens.
#[derive(Clone, Copy)]
struct TokenMajor {
    y: *mut f32,
    rows: usize,
    tokens: usize,
}

// SAFETY: the tasks holding a `TokenMajor` write disjoint rows of `y` (see `write_rows`), which
// outlives them: `matmul_batch` borrows it mutably until its parallel region has ended.
unsafe impl Send for TokenMajor {}
unsafe impl Sync for TokenMajor {}

impl TokenMajor {
    fn new(y: &mut [f32], rows: usize, tokens: usize) -> TokenMajor {
        assert_eq!(y.len(), rows * tokens);
        TokenMajor {
            y: y.as_mut_ptr(),
            rows,
            tokens,
        }
    }

    /// Rows `first..first + n` of every token from `block`: `[tokens, n]` if `token_major`,
    /// else `[n, tokens]`.
    ///
    /// # Safety
    /// No other thread reads or writes these rows of `y` during the call.
    unsafe fn write_rows(&self, first: usize, block: &[f32], token_major: bool) {
        let n = block.len() / self.tokens;
        assert!(first + n <= self.rows);
        for t in 0..self.tokens {
            // SAFETY: token t's rows `first..first + n` lie inside `y` (asserted above), and the
            // caller guarantees that no other thread touches them.
            let row =
                unsafe { std::slice::from_raw_parts_mut(self.y.add(t * self.rows + first), n) };
            if token_major {
                row.copy_from_slice(&block[t * n..(t + 1) * n]);
            } else {
                for (r, v) in row.iter_mut().enumerate() {
                    *v = block[r * self.tokens + t];
                }
            }
        }
    }
}

/// A single product (see [`matmul_batch`]).
pub fn matmul(isa: Isa, precision: Precision, job: Matmul<'_>) {
    matmul_batch(isa, precision, vec![job]);
}

/// One product's activations, as its kernel reads them.
enum Activations<'a> {
    F32(std::borrow::Cow<'a, [f32]>),
    /// 8-bit, natural order (the scalar kernel).
    Q8(q8::Q8Activations),
    /// 8-bit, `[tokens, spans]` (the SIMD kernels).
    Q8Spans(Vec<q8::Q8Span>),
    /// 8-bit, tokens in vector lanes (the AVX-512 prefill kernel).
    #[cfg(target_arch = "x86_64")]
    Q8Columns(q8::TokenColumns),
    /// 8-bit, `[tokens, groups of blocks]` (the SIMD kernels for 8-bit weights).
    Q8Groups(Vec<q8::Q8Group>),
    /// `[tokens, cols]` rounded to bf16 bits (the fast path's `vdpbf16ps` kernels), for the
    /// register tiles (`broadcast: false`) or for [`panels::matmul_broadcast`], which computes
    /// `[tokens, rows]` blocks.
    #[cfg(target_arch = "x86_64")]
    Bf16 {
        bits: Vec<u16>,
        broadcast: bool,
    },
    /// `[tokens, cols]` for [`panels::matmul_broadcast`], which computes `[tokens, rows]`
    /// blocks.
    #[cfg(target_arch = "x86_64")]
    Broadcast(std::borrow::Cow<'a, [f32]>),
}

impl Activations<'_> {
    /// Whether the kernel for these activations writes `[tokens, rows]` rather than
    /// `[rows, tokens]`.
    fn token_major(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Activations::Broadcast(_)
        | Activations::Bf16 {
            broadcast: true, ..
        } = self
        {
            return true;
        }
        false
    }

    /// Rows that a task's count is a multiple of (but for the matrix's last task).
    fn task_rows_multiple(&self) -> usize {
        #[cfg(target_arch = "x86_64")]
        if self.token_major() {
            // Whole panels on either instruction set (32 rows on AVX-512, 16 on AVX2).
            return 32;
        }
        8
    }
}

/// The activations in the form and order the kernels of `isa` read them for `weights`.
fn prepare_activations<'a>(
    isa: Isa,
    precision: Precision,
    weights: WeightMatrix<'_>,
    x: &'a [f32],
    cols: usize,
) -> Activations<'a> {
    match (isa, weights, precision) {
        (_, WeightMatrix::Q8 { .. }, _) if q8_kernels(isa) != Isa::Scalar => {
            Activations::Q8Groups(q8::to_groups(&quantize_activations(isa, x), cols))
        }
        (_, WeightMatrix::Q8 { .. }, _) => Activations::Q8(quantize_activations(isa, x)),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, WeightMatrix::Mxfp4 { .. }, Precision::Fast)
            if q8_kernels(isa) == Isa::Avx512 && x.len() >= COLUMN_KERNEL_TOKENS * cols =>
        {
            Activations::Q8Columns(q8::to_token_columns(&quantize_activations(isa, x), cols))
        }
        (_, WeightMatrix::Mxfp4 { .. }, Precision::Fast) if q8_kernels(isa) != Isa::Scalar => {
            Activations::Q8Spans(q8::to_spans(&quantize_activations(isa, x), cols))
        }
        (_, WeightMatrix::Mxfp4 { .. }, Precision::Fast) => {
            Activations::Q8(quantize_activations(isa, x))
        }
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, WeightMatrix::Bf16(_), Precision::Fast) if has_avx512_bf16() => {
            Activations::Bf16 {
                bits: x
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_bits())
                    .collect(),
                // Pairs of columns: an odd count keeps the register tiles.
                broadcast: x.len() >= BROADCAST_PAIRS_TOKENS * cols && cols.is_multiple_of(2),
            }
        }
        (_, WeightMatrix::Bf16(_), Precision::Fast) => {
            let rounded: Vec<f32> = x
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect();
            match prepare_activations(isa, Precision::Exact, weights, &rounded, cols) {
                Activations::F32(x) => Activations::F32(x.into_owned().into()),
                #[cfg(target_arch = "x86_64")]
                Activations::Broadcast(x) => Activations::Broadcast(x.into_owned().into()),
                _ => unreachable!("exact bf16 activations are fp32"),
            }
        }
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512 | Isa::Avx2, WeightMatrix::Bf16(_) | WeightMatrix::Mxfp4 { .. }, _)
            if x.len() >= broadcast_tokens(isa, weights) * cols =>
        {
            Activations::Broadcast(x.into())
        }
        (Isa::Scalar, _, _) | (Isa::Neon, WeightMatrix::Bf16(_), _) => Activations::F32(x.into()),
        (Isa::Avx512, WeightMatrix::Bf16(_), _) => {
            Activations::F32(unpack_order(x, cols, 32).into())
        }
        (Isa::Avx2, WeightMatrix::Bf16(_), _) => Activations::F32(unpack_order(x, cols, 16).into()),
        (Isa::Avx2 | Isa::Neon, WeightMatrix::Mxfp4 { .. }, _) => {
            Activations::F32(deinterleave_pairs(x).into())
        }
        (Isa::Avx512, WeightMatrix::Mxfp4 { .. }, _) => {
            Activations::F32(nibble_order(x, cols).into())
        }
    }
}

/// `e^x` for `x <= 0` within 2 ulp, in plain arithmetic so that loops over it vectorise (libm's
/// `expf` is an opaque call). Cody-Waite reduction `x = n ln2 + f`, |f| <= ln2/2, Cephes' degree-7
/// polynomial for `e^f`, and `2^n` built in the exponent bits. Below -87 the result is ~1e-38
/// instead of smaller: negligible next to the softmax's largest term, which is 1, and to 1 in
/// SwiGLU's sigmoid `1 / (1 + e^−|z|)`.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 0.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let f = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * f + 1.398_199_9e-3;
    let p = p * f + 8.333_452e-3;
    let p = p * f + 4.166_579_6e-2;
    let p = p * f + 1.666_666_5e-1;
    let p = p * f + 0.5;
    let e_f = p * f * f + f + 1.0;
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    e_f * f32::from_bits(((n_bits + 127) as u32) << 23)
}

/// SwiGLU gate slope, hard-coded in the reference (SPEC §4.4).
const SWIGLU_ALPHA: f32 = 1.702;

/// Clamped SwiGLU with the "+1" on the linear half (SPEC §4.4). `h` interleaves gate (even) and up
/// (odd) of each unit.
pub fn swiglu(isa: Isa, h: &[f32], limit: f32) -> Vec<f32> {
    isa.assert_supported();
    match isa {
        // SAFETY: `assert_supported` above checked this CPU supports `isa`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::swiglu(h, limit) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::swiglu(h, limit) },
        _ => swiglu_plain(h, limit),
    }
}

/// [`swiglu`] in plain arithmetic, which the SIMD instruction sets compile for their vector width
/// (the same results): with libm's `expf`, a decoded token spent 1.7 % of its time here, serially
/// between parallel products. The sigmoid takes `e^−|z|`, which cannot overflow.
#[inline(always)]
pub(crate) fn swiglu_plain(h: &[f32], limit: f32) -> Vec<f32> {
    let mut out = vec![0f32; h.len() / 2];
    for (o, pair) in out.iter_mut().zip(h.chunks_exact(2)) {
        let gate = pair[0].min(limit);
        let up = pair[1].clamp(-limit, limit);
        let z = SWIGLU_ALPHA * gate;
        let e = exp(-z.abs());
        let sigmoid = if z >= 0.0 {
            1.0 / (1.0 + e)
        } else {
            e / (1.0 + e)
        };
        *o = gate * sigmoid * (up + 1.0);
    }
    out
}

/// [`q8::quantize`] at the vector width of `isa`.
fn quantize_activations(isa: Isa, x: &[f32]) -> q8::Q8Activations {
    match isa {
        // SAFETY: its only caller, `matmul_batch` (through `prepare_activations`), asserted
        // that this CPU supports `isa`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::quantize_activations(x) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::quantize_activations(x) },
        // Baseline aarch64 has NEON: the plain code vectorises there as it is.
        _ => q8::quantize(x),
    }
}

/// `$kernel` of the SIMD instruction set `$isa`, which the caller has checked this CPU supports
/// (running another's would be undefined behaviour).
macro_rules! simd_kernel {
    ($isa:expr, $kernel:ident($($arg:expr),*)) => {
        match $isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::$kernel($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::$kernel($($arg),*) },
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => unsafe { neon::$kernel($($arg),*) },
            other => unreachable!("no {} {} on this CPU", other.name(), stringify!($kernel)),
        }
    };
}

/// Rows `first..first + out.len() / tokens` of one product into `out`: `[n, tokens]`, or
/// `[tokens, n]` where [`Activations::token_major`].
fn run_kernel(
    isa: Isa,
    weights: WeightMatrix<'_>,
    x: &Activations,
    tokens: usize,
    cols: usize,
    first: usize,
    out: &mut [f32],
) {
    let n = out.len() / tokens;
    match (weights, x) {
        (WeightMatrix::Bf16(w), Activations::F32(x)) => {
            let w = &w[first * cols..(first + n) * cols];
            match isa {
                Isa::Scalar => scalar::matmul_bf16(x, tokens, w, cols, out),
                // SAFETY: every `Isa` a model holds was checked with `Isa::is_supported`, `x` is
                // in the order `prepare_activations` gives, and the slices have the documented shapes.
                _ => simd_kernel!(isa, matmul_bf16(x, tokens, w, cols, out)),
            }
        }
        (WeightMatrix::Mxfp4 { blocks, scales }, x) => {
            let (row_bytes, row_scales) = (cols / 2, cols / 32);
            let blocks = &blocks[first * row_bytes..(first + n) * row_bytes];
            let scales = &scales[first * row_scales..(first + n) * row_scales];
            match (x, q8_kernels(isa)) {
                (Activations::Q8(q), _) => {
                    scalar::matmul_mxfp4_q8(&q.codes, &q.scales, tokens, blocks, scales, cols, out)
                }
                // SAFETY: as above; `cols` is a multiple of 32 (checked by `Config`), and
                // `q8_kernels` checked the CPU's support for the 8-bit kernels.
                #[cfg(target_arch = "x86_64")]
                (Activations::Q8Spans(spans), Isa::Avx512) => unsafe {
                    avx512::matmul_mxfp4_q8(spans, tokens, blocks, scales, cols, out)
                },
                #[cfg(target_arch = "x86_64")]
                (Activations::Broadcast(x), _) => {
                    let w = panels::PanelSource::Mxfp4 { blocks, scales };
                    broadcast(isa, x, tokens, w, cols, out)
                }
                #[cfg(target_arch = "x86_64")]
                (Activations::Q8Columns(columns), Isa::Avx512) => unsafe {
                    avx512::matmul_mxfp4_q8_columns(columns, blocks, scales, out)
                },
                #[cfg(target_arch = "x86_64")]
                (Activations::Q8Spans(spans), Isa::Avx2) => unsafe {
                    avx2::matmul_mxfp4_q8(spans, tokens, blocks, scales, cols, out)
                },
                #[cfg(target_arch = "aarch64")]
                (Activations::Q8Spans(spans), Isa::Neon) => unsafe {
                    neon::matmul_mxfp4_q8(spans, tokens, blocks, scales, cols, out)
                },
                (Activations::F32(x), _) => match isa {
                    Isa::Scalar => scalar::matmul_mxfp4(x, tokens, blocks, scales, cols, out),
                    _ => simd_kernel!(isa, matmul_mxfp4(x, tokens, blocks, scales, cols, out)),
                },
                _ => unreachable!("activations prepared for another kernel"),
            }
        }
        #[cfg(target_arch = "x86_64")]
        (WeightMatrix::Bf16(w), Activations::Broadcast(x)) => {
            let w = panels::PanelSource::Bf16(&w[first * cols..(first + n) * cols]);
            broadcast(isa, x, tokens, w, cols, out)
        }
        // SAFETY: `prepare_activations` gave bf16 activations only where AVX-512 BF16 runs.
        #[cfg(target_arch = "x86_64")]
        (WeightMatrix::Bf16(w), Activations::Bf16 { bits, broadcast }) => unsafe {
            let w = &w[first * cols..(first + n) * cols];
            if *broadcast {
                let w = panels::PanelSource::Bf16(w);
                panels::matmul_broadcast::<avx512::Bf16Pairs>(bits, tokens, w, cols, out)
            } else {
                avx512::matmul_bf16_dot(bits, tokens, w, cols, out)
            }
        },
        (WeightMatrix::Bf16(_), _) => unreachable!("no bf16 kernel for these activations"),
        (WeightMatrix::Q8 { codes, scales }, x) => {
            let codes = &codes[first * cols..(first + n) * cols];
            let scales = &scales[first * cols / 32..(first + n) * cols / 32];
            match x {
                Activations::Q8(q) => {
                    scalar::matmul_q8_q8(&q.codes, &q.scales, tokens, codes, scales, cols, out)
                }
                // SAFETY: `prepare_activations` gave groups only where `q8_kernels` runs SIMD,
                // whose support it checked.
                Activations::Q8Groups(groups) => simd_kernel!(
                    q8_kernels(isa),
                    matmul_q8_q8(groups, tokens, codes, scales, cols, out)
                ),
                _ => unreachable!("8-bit weights take 8-bit activations"),
            }
        }
    }
}

/// [`panels::matmul_broadcast`] with the kernels of `isa`.
#[cfg(target_arch = "x86_64")]
fn broadcast(
    isa: Isa,
    x: &[f32],
    tokens: usize,
    weights: panels::PanelSource,
    cols: usize,
    out: &mut [f32],
) {
    // SAFETY: `matmul_batch` checked this CPU's support for `isa`; `cols` is a multiple of 32
    // for MXFP4 (checked by `Config`).
    match isa {
        Isa::Avx512 => unsafe {
            panels::matmul_broadcast::<avx512::Panels>(x, tokens, weights, cols, out)
        },
        Isa::Avx2 => unsafe {
            panels::matmul_broadcast::<avx2::Panels>(x, tokens, weights, cols, out)
        },
        other => unreachable!("no broadcast kernels for {}", other.name()),
    }
}

/// One bf16 weight row in the 8-bit format of `dense="q8"`: [`q8::quantize_bf16_weights`] at the
/// vector width of `isa`, the codes then put in the grouped order of [`q8::group_row`].
pub fn quantize_bf16_row(isa: Isa, bits: &[u16], codes: &mut [u8], scales: &mut [u16]) {
    isa.assert_supported();
    assert!(bits.len() == codes.len() && codes.len() == scales.len() * MXFP4_BLOCK_VALUES);
    let mut natural = vec![0u8; codes.len()];
    match isa {
        // SAFETY: `assert_supported` above checked this CPU supports `isa`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::quantize_bf16_weights(bits, &mut natural, scales) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::quantize_bf16_weights(bits, &mut natural, scales) },
        _ => q8::quantize_bf16_weights(bits, &mut natural, scales),
    }
    q8::group_row(&natural, codes);
}

/// The instruction set of the 8-bit MXFP4 kernels that run for `isa`.
fn q8_kernels(isa: Isa) -> Isa {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if has_avx512_vnni() => Isa::Avx512,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 if Isa::Avx2.is_supported() => Isa::Avx2,
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => Isa::Neon,
        _ => Isa::Scalar,
    }
}

/// Reorders each row's full `block`-wide blocks into the order in which interleaving bf16 weights
/// with zeros (`vpunpcklwd`/`vpunpckhwd`, per 128-bit lane) widens them: the low 4 values of every
/// 8 first, then the high 4. A ragged tail stays in natural order.
pub fn unpack_order(x: &[f32], cols: usize, block: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    let half = block / 2;
    for (src_row, dst_row) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        for (src, dst) in src_row
            .chunks_exact(block)
            .zip(dst_row.chunks_exact_mut(block))
        {
            for (lane, group) in src.chunks_exact(8).enumerate() {
                dst[lane * 4..lane * 4 + 4].copy_from_slice(&group[..4]);
                dst[half + lane * 4..half + lane * 4 + 4].copy_from_slice(&group[4..]);
            }
        }
    }
    out
}

/// The AVX-512 MXFP4 order: each full 128-value span of a row is read as 16 lanes × 8 nibbles,
/// lane i holding values 8i..8i+8; nibble k of every lane is one vector, so the span becomes
/// `[x[8i + k] for i in 0..16]` for k = 0..8. Remaining 32-blocks are de-interleaved as in
/// [`deinterleave_pairs`].
pub fn nibble_order(x: &[f32], cols: usize) -> Vec<f32> {
    let mut out = deinterleave_pairs(x);
    let spans = cols / 128;
    for (src_row, dst_row) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        for (src, dst) in src_row
            .chunks_exact(128)
            .zip(dst_row.chunks_exact_mut(128))
            .take(spans)
        {
            for k in 0..8 {
                for i in 0..16 {
                    dst[k * 16 + i] = src[8 * i + k];
                }
            }
        }
    }
    out
}

/// Reorders each 32-value block to its 16 even then 16 odd values, matching the low and high
/// nibbles of an MXFP4 block (SPEC §3.3) so SIMD kernels read both as contiguous vectors.
pub fn deinterleave_pairs(x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (src, dst) in x.chunks_exact(32).zip(out.chunks_exact_mut(32)) {
        for j in 0..16 {
            dst[j] = src[2 * j];
            dst[16 + j] = src[2 * j + 1];
        }
    }
    out
}

/// Rows a tile spans at most: the kernels prefetch each row at the same position `TILE_ROWS`
/// rows below, which is the next tile's (see [`TileRows::ahead`] for the decode orders).
/// Decoding spends enough instructions per byte that too few loads are in flight for the
/// hardware prefetcher alone, and a fixed distance ahead within the row fell into rows the tile
/// was already reading. Measured in one process alternating settings, decode GEMVs streaming
/// from DRAM (2 threads) against a fixed 4096 (MXFP4, 8-bit) or 2048 (bf16) bytes ahead: MXFP4
/// exact +44 %, fast +20 %; bf16 exact +7 % (a three-part `vdpbf16ps` kernel then), fast +12 %;
/// 8-bit dense +22 %. Two tiles ahead measured the same as one. The AVX-512 f32 bf16 kernel, with
/// prefetching against none: +17 % alone, +7.4 % in the 20b's exact decoding.
#[cfg(target_arch = "x86_64")]
const TILE_ROWS: usize = 4;
// `tile_sizes!` expands tiles of 1 to 4 rows.
#[cfg(target_arch = "x86_64")]
const _: () = assert!(TILE_ROWS <= 4);

/// How a kernel's tiles walk the rows of a single token's product (decoding). That product reads
/// each weight once, so how the reads stream from memory sets its speed.
///
/// Measured per matrix in the 20b's decoding, one process alternating orders (2 threads, 40-65
/// GB/s), against `Tiles`: AVX-512 bf16 `Rows` +20-31 % (fast) and -1-+15 % (exact, then a
/// three-part `vdpbf16ps` kernel), 8-bit dense `Rows` +15-24 %, MXFP4 `Lanes` +16 % (fast) and
/// +5-8 % (exact). Kernel benchmarks, AVX2: bf16 `Lanes` +13 %, 8-bit dense `Rows` +12 %. MXFP4
/// at `Rows` lost up to 18 % on AVX-512 (it spends more instructions per byte, and a 4-row tile
/// loads each activation once for 4 rows) and at `Lanes` 11 % on AVX2; bf16 and 8-bit dense at
/// `Lanes` up to 20 % on AVX-512; AVX2 bf16 (a single FMA chain) at `Rows` half. NEON keeps
/// `Tiles`: not measured on ARM hardware.
#[derive(Clone, Copy)]
pub(crate) enum DecodeOrder {
    /// Tiles of adjacent rows, as for several tokens: `TILE_ROWS` short streams a row apart.
    Tiles,
    /// One row at a time: each thread reads its rows as one sequential stream.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Rows,
    /// Tiles whose rows lie a quarter of the task apart (for 4-row tiles): 4 long sequential
    /// streams per thread, with each activation still loaded once for 4 rows.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Lanes,
}

/// The rows of one register tile: `first + r · stride` for each of its `R` rows.
#[derive(Clone, Copy)]
pub(crate) struct TileRows {
    pub first: usize,
    pub stride: usize,
}

impl TileRows {
    #[inline(always)]
    pub(crate) fn row(self, r: usize) -> usize {
        self.first + r * self.stride
    }

    /// How far below each of its rows the tile prefetches: `TILE_ROWS` rows, which is the next
    /// 4-row tile's row, or 4 rows ahead in the stream of [`DecodeOrder::Rows`]; down a lane of
    /// [`DecodeOrder::Lanes`], `LANE_PREFETCH_ROWS` (1 and 2 measured alike, 8 slower).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub(crate) fn ahead(self) -> usize {
        const LANE_PREFETCH_ROWS: usize = 2;
        if self.stride == 1 {
            TILE_ROWS
        } else {
            LANE_PREFETCH_ROWS
        }
    }
}

/// Hints the cache line at `base + offset` into L1. `wrapping_add` because the address may lie
/// past the slice; a prefetch never faults.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch(base: *const u8, offset: usize) {
    // SAFETY: prefetching is a hint that never faults, whatever the address.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(offset) as *const i8)
    }
}

/// Hints `values` into the cache, to be read after a kernel has run: the experts' biases, chosen
/// anew each token, are cold.
fn prefetch_values(values: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in values.chunks(16) {
        prefetch(line.as_ptr() as *const u8, 0);
    }
    // The NEON kernels issue no prefetches (see `neon.rs`).
    #[cfg(not(target_arch = "x86_64"))]
    let _ = values;
}

/// Visits `out` (`[rows, tokens]`) in register tiles of up to 4 rows × 4 tokens, binding the tile's
/// rows ([`TileRows`]), first token and const sizes `R` and `T` for the body. A single token's
/// rows are walked in the given [`DecodeOrder`].
macro_rules! for_each_tile {
    ($out:expr, $tokens:expr, |$tile:ident, $t0:ident, $R:ident, $T:ident| $body:expr) => {
        $crate::kernels::for_each_tile!(
            $out,
            $tokens,
            4,
            4,
            $crate::kernels::DecodeOrder::Tiles,
            |$tile, $t0, $R, $T| $body
        )
    };
    ($out:expr, $tokens:expr, $max_rows:expr, $max_tokens:expr, $decode:expr,
     |$tile:ident, $t0:ident, $R:ident, $T:ident| $body:expr) => {{
        // Full paths only: the caller may have imported the variants' names.
        let tokens: usize = $tokens;
        let rows = $out.len() / tokens;
        let mut max_rows: usize = $max_rows;
        let mut first = 0;
        if tokens == 1 {
            match $decode {
                $crate::kernels::DecodeOrder::Tiles => {}
                $crate::kernels::DecodeOrder::Rows => max_rows = 1,
                $crate::kernels::DecodeOrder::Lanes => {
                    // Full tiles with rows `lane` apart; the last `rows % max_rows` rows below.
                    let lane = rows / max_rows;
                    while first < lane {
                        let $tile = $crate::kernels::TileRows {
                            first,
                            stride: lane,
                        };
                        let $t0 = 0;
                        $crate::kernels::tile_sizes!((max_rows, 1), $R, $T, $body);
                        first += 1;
                    }
                    first = lane * max_rows;
                }
            }
        }
        while first < rows {
            let row_count = (rows - first).min(max_rows);
            let $tile = $crate::kernels::TileRows { first, stride: 1 };
            let mut $t0 = 0;
            while $t0 < tokens {
                let token_count = (tokens - $t0).min($max_tokens);
                $crate::kernels::tile_sizes!((row_count, token_count), $R, $T, $body);
                $t0 += token_count;
            }
            first += row_count;
        }
    }};
}
pub(crate) use for_each_tile;

/// Turns run-time tile sizes (each 1 to 4) into the const generics `R` and `T`.
macro_rules! tile_sizes {
    ($sizes:expr, $R:ident, $T:ident, $body:expr) => {
        $crate::kernels::tile_sizes!(@rows $sizes, $R, $T, $body, [1 2 3 4])
    };
    (@rows $sizes:expr, $R:ident, $T:ident, $body:expr, [$($r:literal)*]) => {
        match $sizes {
            $( ($r, t) => $crate::kernels::tile_sizes!(@tokens t, $r, $R, $T, $body, [1 2 3 4]), )*
            _ => unreachable!("tiles are 1 to 4 rows"),
        }
    };
    (@tokens $t:expr, $r:literal, $R:ident, $T:ident, $body:expr, [$($tl:literal)*]) => {
        match $t {
            $( $tl => {
                const $R: usize = $r;
                const $T: usize = $tl;
                $body
            } )*
            _ => unreachable!("tiles are 1 to 4 tokens"),
        }
    };
}
pub(crate) use tile_sizes;

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_f32(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_u32() >> 8) as f32 / (1 << 23) as f32 - 1.0)
            .collect()
    }

    /// [`random_f32`] rounded to bf16 bits.
    fn random_bf16(rng: &mut ChaCha8Rng, n: usize) -> Vec<u16> {
        random_f32(rng, n)
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_bits())
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn matmul_bf16(
        isa: Isa,
        precision: Precision,
        x: &[f32],
        w: &[u16],
        rows: usize,
        cols: usize,
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) {
        matmul(
            isa,
            precision,
            Matmul {
                weights: WeightMatrix::Bf16(w),
                rows,
                cols,
                x,
                bias,
                y,
            },
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn matmul_mxfp4(
        isa: Isa,
        precision: Precision,
        x: &[f32],
        blocks: &[u8],
        scales: &[u8],
        rows: usize,
        cols: usize,
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) {
        matmul(
            isa,
            precision,
            Matmul {
                weights: WeightMatrix::Mxfp4 { blocks, scales },
                rows,
                cols,
                x,
                bias,
                y,
            },
        );
    }

    /// The `dense="q8"` product: `codes` `[rows, cols]` (stored `+ 128`, grouped), `x`
    /// `[tokens, cols]`.
    fn matmul_q8(isa: Isa, x: &[f32], codes: &[u8], scales: &[u16], rows: usize, y: &mut [f32]) {
        let weights = WeightMatrix::Q8 { codes, scales };
        let cols = codes.len() / rows;
        let job = Matmul {
            weights,
            rows,
            cols,
            x,
            bias: None,
            y,
        };
        matmul(isa, Precision::Fast, job);
    }

    fn simd_isas() -> Vec<Isa> {
        Isa::ALL
            .into_iter()
            .filter(|&i| i != Isa::Scalar && i.is_supported())
            .collect()
    }

    /// SIMD sums in another order: allow a few ulps of the sum of magnitudes.
    fn assert_close(isa: Isa, got: &[f32], want: &[f32], magnitude: &[f32], what: &str) {
        for (i, ((g, w), m)) in got.iter().zip(want).zip(magnitude).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * m + 1e-30,
                "{isa:?} {what}[{i}]: {g} vs {w} (|.| {m})"
            );
        }
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm_on_the_softmax_range() {
        let mut worst = 0;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let (got, want) = (exp(x), (x as f64).exp() as f32);
            let ulps = (got.to_bits() as i64 - want.to_bits() as i64).unsigned_abs();
            worst = worst.max(ulps);
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37);
    }

    #[test]
    fn swiglu_clamps_gate_above_only_and_adds_one_to_up() {
        let sigmoid = |v: f32| 1.0 / (1.0 + (-1.702 * v).exp());
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let mut h: Vec<f32> = random_f32(&mut rng, 2 * 1000)
            .iter()
            .map(|v| 30.0 * v)
            .collect();
        h[..6].copy_from_slice(&[10.0, 10.0, -10.0, 0.0, -100.0, 3.0]);
        let want: Vec<f32> = h
            .chunks_exact(2)
            .map(|p| {
                let gate = p[0].min(7.0);
                gate * sigmoid(gate) * (p[1].clamp(-7.0, 7.0) + 1.0)
            })
            .collect();
        let z = swiglu_plain(&h, 7.0);
        assert!((z[0] - 7.0 * sigmoid(7.0) * 8.0).abs() < 1e-5);
        assert!((z[1] - (-10.0 * sigmoid(-10.0))).abs() < 1e-6);
        for (i, (&got, &want)) in z.iter().zip(&want).enumerate() {
            assert!(
                (got - want).abs() <= 4e-7 * want.abs() + 1e-30,
                "[{i}] {got} vs {want}"
            );
        }
        for isa in simd_isas() {
            assert_eq!(swiglu(isa, &h, 7.0), z, "{isa:?}");
        }
    }

    #[test]
    fn simd_activation_quantizing_gives_the_scalar_codes() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut x = random_f32(&mut rng, 32 * 40);
        // A zero block, and a block of ties (its maximum 127 makes the step 1).
        x[..32].fill(0.0);
        let ties = [127.0, 2.5, -2.5, 3.5, -3.5, 0.5, -0.5, 126.5, -126.5];
        x[32..32 + ties.len()].copy_from_slice(&ties);
        let want = q8::quantize(&x);
        assert_eq!(&want.codes[32..41], &[127, 2, -2, 4, -4, 0, 0, 126, -126]);
        for isa in simd_isas() {
            let got = quantize_activations(isa, &x);
            assert_eq!(got.codes, want.codes, "{isa:?}");
            assert_eq!(got.scales, want.scales, "{isa:?}");
        }
    }

    /// Each task adds its own rows' biases, for one token and for several, and jobs that share
    /// `x` in different weight formats (bf16, MXFP4) each get activations in their own format.
    #[test]
    fn a_batch_adds_every_rows_bias_and_shares_activations_within_a_format_only() {
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        // Several tasks each: 5 of bf16 rows, 2 of MXFP4 rows.
        let (rows, cols) = (9000, 64);
        let w: Vec<u16> = random_bf16(&mut rng, rows * cols);
        let mut blocks = vec![0u8; rows * cols / 2];
        rng.fill_bytes(&mut blocks);
        let scales: Vec<u8> = (0..rows * cols / 32)
            .map(|i| 120 + (i % 10) as u8)
            .collect();
        let bias = random_f32(&mut rng, rows);
        for tokens in [1, 3] {
            let x = random_f32(&mut rng, tokens * cols);
            for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
                let (mut bf16_alone, mut mxfp4_alone) =
                    (vec![0f32; tokens * rows], vec![0f32; tokens * rows]);
                let fast = Precision::Fast;
                matmul_bf16(isa, fast, &x, &w, rows, cols, None, &mut bf16_alone);
                matmul_mxfp4(
                    isa,
                    fast,
                    &x,
                    &blocks,
                    &scales,
                    rows,
                    cols,
                    None,
                    &mut mxfp4_alone,
                );
                let (mut bf16_y, mut mxfp4_y) =
                    (vec![0f32; tokens * rows], vec![0f32; tokens * rows]);
                let job = |weights, y| Matmul {
                    weights,
                    rows,
                    cols,
                    x: &x,
                    bias: Some(&bias),
                    y,
                };
                let mxfp4 = WeightMatrix::Mxfp4 {
                    blocks: &blocks,
                    scales: &scales,
                };
                matmul_batch(
                    isa,
                    fast,
                    vec![
                        job(WeightMatrix::Bf16(&w), &mut bf16_y),
                        job(mxfp4, &mut mxfp4_y),
                    ],
                );
                for (got, alone) in [(&bf16_y, &bf16_alone), (&mxfp4_y, &mxfp4_alone)] {
                    for (i, (g, a)) in got.iter().zip(alone.iter()).enumerate() {
                        let want = a + bias[i % rows];
                        assert_eq!(*g, want, "{isa:?} tokens {tokens} [{i}]");
                    }
                }
            }
        }
    }

    #[test]
    fn simd_bf16_matches_scalar_on_ragged_shapes() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for &(rows, cols, tokens) in &[
            (1, 16, 1),
            (3, 8, 2),
            (5, 40, 3),
            (17, 100, 5),
            (64, 128, 4),
            (130, 2880, 9),
            (7, 33, 1),
            // One token, in lanes on AVX2: 5 tiles of 4 rows 5 apart, then 3 adjacent rows.
            (23, 100, 1),
            // Broadcast tiles on AVX-512: 12 + 12 + 1 tokens, a panel of 13 rows, a last block
            // of 22 columns gathered value by value (16 + 6 on AVX2).
            (45, 150, 25),
            // A last panel of 1 row; a last block of 64 columns.
            (33, 2880, 14),
            // Odd columns: the exact broadcast pairs the last column with zero; the fast path on
            // AVX-512 BF16 keeps its register tiles.
            (9, 33, 13),
        ] {
            let x = random_f32(&mut rng, tokens * cols);
            let w: Vec<u16> = random_bf16(&mut rng, rows * cols);
            let bias = random_f32(&mut rng, rows);
            let abs_x: Vec<f32> = x.iter().map(|v| v.abs()).collect();
            let abs_w: Vec<u16> = w.iter().map(|b| b & 0x7FFF).collect();
            let mut magnitude = vec![0f32; tokens * rows];
            let ex = Precision::Exact;
            matmul_bf16(
                Isa::Scalar,
                ex,
                &abs_x,
                &abs_w,
                rows,
                cols,
                None,
                &mut magnitude,
            );
            for precision in Precision::ALL {
                let mut want = vec![0f32; tokens * rows];
                let b = Some(&bias[..]);
                matmul_bf16(Isa::Scalar, precision, &x, &w, rows, cols, b, &mut want);
                for isa in simd_isas() {
                    let mut got = vec![0f32; tokens * rows];
                    matmul_bf16(isa, precision, &x, &w, rows, cols, b, &mut got);
                    let what = format!("bf16 {precision:?} {rows}x{cols}x{tokens}");
                    assert_close(isa, &got, &want, &magnitude, &what);
                }
            }
        }
    }

    /// Several tokens come back as `[tokens, rows]`, from several tasks, against a plain f64
    /// product.
    #[test]
    fn products_of_many_tokens_come_back_token_major() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let (rows, cols, tokens) = (9000, 40, 37);
        let x = random_f32(&mut rng, tokens * cols);
        let w: Vec<u16> = random_bf16(&mut rng, rows * cols);
        for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
            let mut y = vec![0f32; tokens * rows];
            matmul_bf16(isa, Precision::Exact, &x, &w, rows, cols, None, &mut y);
            for t in 0..tokens {
                for r in 0..rows {
                    let want: f64 = (0..cols)
                        .map(|c| {
                            x[t * cols + c] as f64 * scalar::bf16_to_f32(w[r * cols + c]) as f64
                        })
                        .sum();
                    let got = y[t * rows + r] as f64;
                    assert!(
                        (got - want).abs() < 1e-4,
                        "{isa:?} token {t} row {r}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn fast_bf16_rounds_the_activations_to_bf16() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let (rows, cols, tokens) = (9, 2880, 3);
        let x = random_f32(&mut rng, tokens * cols);
        let w: Vec<u16> = random_bf16(&mut rng, rows * cols);
        let rounded: Vec<f32> = x
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        let mut fast = vec![0f32; tokens * rows];
        let mut exact_of_rounded = vec![0f32; tokens * rows];
        let mut exact = vec![0f32; tokens * rows];
        let ex = Precision::Exact;
        matmul_bf16(
            Isa::Scalar,
            Precision::Fast,
            &x,
            &w,
            rows,
            cols,
            None,
            &mut fast,
        );
        matmul_bf16(
            Isa::Scalar,
            ex,
            &rounded,
            &w,
            rows,
            cols,
            None,
            &mut exact_of_rounded,
        );
        matmul_bf16(Isa::Scalar, ex, &x, &w, rows, cols, None, &mut exact);
        assert_eq!(fast, exact_of_rounded);
        assert_ne!(fast, exact);
    }

    /// Random MXFP4 rows: scales around 2^0, plus the extremes of the format.
    fn random_mxfp4(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> (Vec<u8>, Vec<u8>) {
        let blocks: Vec<u8> = (0..rows * cols / 2).map(|_| rng.next_u32() as u8).collect();
        let mut scales: Vec<u8> = (0..rows * cols / 32)
            .map(|_| 120 + (rng.next_u32() % 16) as u8)
            .collect();
        scales[0] = 1;
        if scales.len() > 1 {
            scales[1] = 0;
        }
        (blocks, scales)
    }

    /// Ragged rows, blocks and tokens; from 16 tokens on, AVX-512 runs the token-column kernel.
    /// One token ([`DecodeOrder::Lanes`] on AVX-512): 23 rows are 5 tiles of 4 rows 5 apart, then
    /// 3 adjacent rows; 6 rows one tile (rows 1 apart) and 2; 400 rows three tasks, the last of 64.
    const MXFP4_SHAPES: [(usize, usize, usize); 18] = [
        (1, 32, 1),
        (23, 96, 1),
        (6, 160, 1),
        (8, 2880, 1),
        (400, 2880, 1),
        (3, 64, 2),
        (5, 96, 3),
        (17, 320, 5),
        (64, 2880, 4),
        (9, 2880, 1),
        (6, 32, 7),
        (4, 544, 6),
        (2, 4096, 3),
        (13, 160, 16),
        (70, 2880, 37),
        (8, 96, 40),
        // 11 blocks: a lone last block in the second half of a span, past the first 8 blocks.
        (3, 352, 5),
        // Broadcast tiles on AVX-512: a panel of 3 rows, a last block of 32 columns.
        (35, 544, 23),
    ];

    #[test]
    fn simd_mxfp4_matches_scalar_on_ragged_shapes() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for &(rows, cols, tokens) in &MXFP4_SHAPES {
            let x = random_f32(&mut rng, tokens * cols);
            let (blocks, scales) = random_mxfp4(&mut rng, rows, cols);
            let bias = random_f32(&mut rng, rows);
            let abs_x: Vec<f32> = x.iter().map(|v| v.abs()).collect();
            // Clearing each nibble's sign bit gives |w|.
            let abs_blocks: Vec<u8> = blocks.iter().map(|b| b & 0x77).collect();
            for precision in Precision::ALL {
                let mut want = vec![0f32; tokens * rows];
                let mut magnitude = vec![0f32; tokens * rows];
                let (b, s) = (&blocks[..], &scales[..]);
                matmul_mxfp4(
                    Isa::Scalar,
                    precision,
                    &x,
                    b,
                    s,
                    rows,
                    cols,
                    Some(&bias),
                    &mut want,
                );
                matmul_mxfp4(
                    Isa::Scalar,
                    Precision::Exact,
                    &abs_x,
                    &abs_blocks,
                    s,
                    rows,
                    cols,
                    None,
                    &mut magnitude,
                );
                for isa in simd_isas() {
                    let mut got = vec![0f32; tokens * rows];
                    matmul_mxfp4(isa, precision, &x, b, s, rows, cols, Some(&bias), &mut got);
                    let what = format!("mxfp4 {precision:?} {rows}x{cols}x{tokens}");
                    assert_close(isa, &got, &want, &magnitude, &what);
                }
            }
        }
    }

    #[test]
    fn fast_mxfp4_is_within_the_8_bit_rounding_of_exact() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for &(rows, cols, tokens) in &MXFP4_SHAPES {
            let x = random_f32(&mut rng, tokens * cols);
            let (blocks, scales) = random_mxfp4(&mut rng, rows, cols);
            let abs_blocks: Vec<u8> = blocks.iter().map(|b| b & 0x77).collect();
            // Each activation moves by at most half a step, max|x of its block| / 254 <= 1 / 254.
            let ones = vec![1f32; tokens * cols];
            let mut exact = vec![0f32; tokens * rows];
            let mut fast = vec![0f32; tokens * rows];
            let mut bound = vec![0f32; tokens * rows];
            let (b, s) = (&blocks[..], &scales[..]);
            let ex = Precision::Exact;
            matmul_mxfp4(Isa::Scalar, ex, &x, b, s, rows, cols, None, &mut exact);
            matmul_mxfp4(
                Isa::Scalar,
                Precision::Fast,
                &x,
                b,
                s,
                rows,
                cols,
                None,
                &mut fast,
            );
            matmul_mxfp4(
                Isa::Scalar,
                ex,
                &ones,
                &abs_blocks,
                s,
                rows,
                cols,
                None,
                &mut bound,
            );
            let mut worst = 0f32;
            for ((e, f), m) in exact.iter().zip(&fast).zip(&bound) {
                assert!(
                    (e - f).abs() <= m / 254.0 * 1.0001,
                    "{e} vs {f} (bound {})",
                    m / 254.0
                );
                worst = worst.max((e - f).abs() / m);
            }
            // The fast path really rounded.
            assert!(worst > 0.0, "{rows}x{cols}x{tokens}");
        }
    }

    #[test]
    fn simd_q8_weights_match_scalar_on_ragged_shapes() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        for &(rows, cols, tokens) in &[
            (1, 32, 1),
            (5, 96, 3),
            (9, 2880, 1),
            (70, 2880, 5),
            (6, 4096, 2),
            // 31 blocks: groups of 16, 8, 4, 2 and 1.
            (7, 32 * 31, 3),
        ] {
            let x = random_f32(&mut rng, tokens * cols);
            let bits: Vec<u16> = random_bf16(&mut rng, rows * cols);
            let (mut codes, mut scales) = (vec![0u8; rows * cols], vec![0u16; rows * cols / 32]);
            let rows_of = codes
                .chunks_exact_mut(cols)
                .zip(scales.chunks_exact_mut(cols / 32));
            for (r, (codes, scales)) in rows_of.enumerate() {
                quantize_bf16_row(Isa::Scalar, &bits[r * cols..][..cols], codes, scales);
            }
            let product = |isa: Isa, y: &mut [f32]| matmul_q8(isa, &x, &codes, &scales, rows, y);
            let mut want = vec![0f32; tokens * rows];
            product(Isa::Scalar, &mut want);
            // The 8-bit product is within a few % of the exact one (a wrong kernel is not).
            let mut exact = vec![0f32; tokens * rows];
            matmul_bf16(
                Isa::Scalar,
                Precision::Exact,
                &x,
                &bits,
                rows,
                cols,
                None,
                &mut exact,
            );
            let ones = vec![1f32; tokens * cols];
            let abs_w: Vec<u16> = bits.iter().map(|b| b & 0x7FFF).collect();
            let mut magnitude = vec![0f32; tokens * rows];
            matmul_bf16(
                Isa::Scalar,
                Precision::Exact,
                &ones,
                &abs_w,
                rows,
                cols,
                None,
                &mut magnitude,
            );
            for ((w, e), m) in want.iter().zip(&exact).zip(&magnitude) {
                assert!((w - e).abs() <= 0.02 * m, "{w} vs exact {e} (|w|·1 = {m})");
            }
            for isa in simd_isas() {
                let mut got = vec![0f32; tokens * rows];
                product(isa, &mut got);
                assert_close(
                    isa,
                    &got,
                    &want,
                    &magnitude,
                    &format!("q8 {rows}x{cols}x{tokens}"),
                );
            }
        }
    }

    /// Every stored code, 0 (−128) included though the quantizer never writes it: random bytes.
    /// Not the AVX2 kernel, whose `vpsignb` trick needs 1..=255 (handling −128 there cost 25 %
    /// of its decode speed).
    #[test]
    fn simd_q8_weights_take_every_stored_code() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let (rows, cols, tokens) = (9, 32 * 31, 3);
        let x = random_f32(&mut rng, tokens * cols);
        let mut codes = vec![0u8; rows * cols];
        rng.fill_bytes(&mut codes);
        codes[..cols].fill(0);
        let scales: Vec<u16> = random_f32(&mut rng, rows * cols / 32)
            .iter()
            .map(|s| half::bf16::from_f32(s.abs() / 128.0).to_bits())
            .collect();
        let product = |isa: Isa, y: &mut [f32]| matmul_q8(isa, &x, &codes, &scales, rows, y);
        let mut want = vec![0f32; tokens * rows];
        product(Isa::Scalar, &mut want);
        // A bound on |x| · |w| per output: every weight is at most 128 times its block's scale.
        let mut magnitude = vec![0f32; tokens * rows];
        for t in 0..tokens {
            for r in 0..rows {
                magnitude[r * tokens + t] = (0..cols / 32)
                    .map(|b| {
                        let block_x: f32 =
                            x[t * cols + 32 * b..][..32].iter().map(|v| v.abs()).sum();
                        block_x * 128.0 * scalar::bf16_to_f32(scales[r * cols / 32 + b])
                    })
                    .sum();
            }
        }
        for isa in simd_isas()
            .into_iter()
            .filter(|&i| q8_kernels(i) != Isa::Avx2)
        {
            let mut got = vec![0f32; tokens * rows];
            product(isa, &mut got);
            assert_close(isa, &got, &want, &magnitude, "q8 codes 0..=255");
        }
    }

    #[test]
    fn simd_weight_quantization_matches_scalar() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut bits: Vec<u16> = random_f32(&mut rng, 64 * 96)
            .iter()
            .map(|v| half::bf16::from_f32(*v * 3.0).to_bits())
            .collect();
        bits[32..64].fill(0); // an all-zero block
        let (mut want_codes, mut want_scales) =
            (vec![0u8; bits.len()], vec![0u16; bits.len() / 32]);
        q8::quantize_bf16_weights(&bits, &mut want_codes, &mut want_scales);
        for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
            let (mut codes, mut scales) = (vec![0u8; 96], vec![0u16; 3]);
            for (r, row) in bits.chunks_exact(96).enumerate() {
                quantize_bf16_row(isa, row, &mut codes, &mut scales);
                let mut grouped = vec![0u8; 96];
                q8::group_row(&want_codes[r * 96..][..96], &mut grouped);
                assert_eq!(codes, grouped, "{isa:?} row {r}");
                assert_eq!(scales, want_scales[r * 3..][..3], "{isa:?} row {r}");
            }
        }
    }

    #[test]
    fn isa_names_round_trip_and_scalar_is_always_supported() {
        assert!(Isa::Scalar.is_supported());
        for isa in Isa::ALL {
            assert_eq!(
                Isa::ALL.into_iter().find(|i| i.name() == isa.name()),
                Some(isa)
            );
        }
    }
}
