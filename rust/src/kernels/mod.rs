//! The compute kernels behind one narrow interface: matrix × activations for bf16 and MXFP4 weights.
//!
//! Each instruction set lives in its own file and provides the same row-dot functions; [`Isa`] picks
//! one at run time. The scalar kernels are the oracle every SIMD kernel is tested against. The
//! matmul drivers here split output rows over the current rayon pool.

use std::sync::OnceLock;

use rayon::prelude::*;

pub mod scalar;

/// Instruction set of the kernels in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
        }
    }
}

/// The row kernels of one instruction set.
struct Kernels {
    isa: Isa,
    /// `Σ x[i] · bf16(w[i])`.
    dot_bf16: fn(&[f32], &[u16]) -> f32,
    /// `Σ x[i] · mxfp4(blocks, scales)[i]` over one packed row.
    dot_mxfp4: fn(&[f32], &[u8], &[u8]) -> f32,
}

static SCALAR: Kernels = Kernels {
    isa: Isa::Scalar,
    dot_bf16: scalar::dot_bf16,
    dot_mxfp4: scalar::dot_mxfp4,
};

fn kernels() -> &'static Kernels {
    static ACTIVE: OnceLock<&'static Kernels> = OnceLock::new();
    ACTIVE.get_or_init(|| &SCALAR)
}

/// The instruction set the kernels use in this process.
pub fn active_isa() -> Isa {
    kernels().isa
}

/// Output rows per parallel task: enough work to amortise scheduling, few enough to balance.
const ROWS_PER_TASK: usize = 64;

/// `y[t, r] = Σ_c x[t, c] · W[r, c] + bias[r]` with `W` a bf16 `[rows, cols]` matrix.
/// `x` is `[tokens, cols]`, `y` is `[tokens, rows]`.
pub fn matmul_bf16(
    x: &[f32],
    w: &[u16],
    rows: usize,
    cols: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let dot = kernels().dot_bf16;
    matmul_rows(x, cols, rows, bias, y, |r, xt| {
        dot(xt, &w[r * cols..(r + 1) * cols])
    });
}

/// As [`matmul_bf16`] for one MXFP4 matrix given as packed `blocks` (`cols / 2` bytes a row) and
/// E8M0 `scales` (`cols / 32` bytes a row).
pub fn matmul_mxfp4(
    x: &[f32],
    blocks: &[u8],
    scales: &[u8],
    rows: usize,
    cols: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let dot = kernels().dot_mxfp4;
    let (row_bytes, row_scales) = (cols / 2, cols / 32);
    matmul_rows(x, cols, rows, bias, y, |r, xt| {
        dot(
            xt,
            &blocks[r * row_bytes..(r + 1) * row_bytes],
            &scales[r * row_scales..(r + 1) * row_scales],
        )
    });
}

/// Runs `dot(row, x_t)` for every output row and token, rows split across threads. Rows are the
/// outer loop so each weight row is read from memory once and reused from cache for every token.
fn matmul_rows(
    x: &[f32],
    cols: usize,
    rows: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    dot: impl Fn(usize, &[f32]) -> f32 + Sync,
) {
    let tokens = x.len() / cols;
    debug_assert_eq!(x.len(), tokens * cols);
    debug_assert_eq!(y.len(), tokens * rows);
    let mut out = vec![0f32; tokens * rows];
    // Compute into a [rows, tokens] buffer so each task owns a contiguous block, then transpose.
    out.par_chunks_mut(ROWS_PER_TASK * tokens)
        .enumerate()
        .for_each(|(task, chunk)| {
            let first = task * ROWS_PER_TASK;
            for (i, row_out) in chunk.chunks_mut(tokens).enumerate() {
                let r = first + i;
                let b = bias.map_or(0.0, |b| b[r]);
                for (t, o) in row_out.iter_mut().enumerate() {
                    *o = dot(r, &x[t * cols..(t + 1) * cols]) + b;
                }
            }
        });
    for t in 0..tokens {
        for r in 0..rows {
            y[t * rows + r] = out[r * tokens + t];
        }
    }
}
