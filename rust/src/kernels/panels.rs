//! Exact products of many tokens (prefill) by broadcasting: the rows are decoded to f32 once,
//! [`PANEL_COLS`] columns at a time, into panels of a few vectors of rows stored column by column;
//! each activation is then broadcast against a panel column and multiplied into a vector of rows
//! of its token. The sums need no horizontal reduction, and each weight is decoded once per call
//! rather than once per register tile of tokens. Each output is summed in column order, its
//! partial sums kept in `out` between column blocks, so results do not depend on the ISA's
//! vector width.
//!
//! The loops are here; each instruction set supplies its decoders and its tile
//! ([`PanelKernels`]).

/// Columns decoded at a time: a panel (16 KiB on AVX-512) and a tile's activations (6 KiB) stay in
/// L1.
pub const PANEL_COLS: usize = 128;

/// The weights of [`matmul_broadcast`], in a checkpoint format it decodes.
#[derive(Clone, Copy)]
pub enum PanelSource<'a> {
    /// bf16 rows.
    Bf16(&'a [u16]),
    /// MXFP4 rows (`cols / 2` bytes of blocks, `cols / 32` E8M0 scales).
    Mxfp4 { blocks: &'a [u8], scales: &'a [u8] },
}

/// One tile: up to [`PanelKernels::TILE_TOKENS`] tokens × one panel's rows over one block of
/// columns.
pub struct BroadcastTile<'a> {
    /// The tile's first token from the block's first column; token t starts `t · cols` later.
    pub x: &'a [f32],
    pub cols: usize,
    /// `[width, PANEL_ROWS]`.
    pub panel: &'a [f32],
    /// The tile's first token from its first row; token t starts `t · out_stride` later.
    pub out: &'a mut [f32],
    /// Rows of the panel that exist (the rest of it is zeros).
    pub rows: usize,
    pub out_stride: usize,
    /// Add to the sums in `out` (of the previous column blocks) rather than start from zero.
    pub accumulate: bool,
}

/// An instruction set's parts of [`matmul_broadcast`].
pub trait PanelKernels {
    /// Rows of a panel: the vectors of rows that each broadcast activation multiplies.
    const PANEL_ROWS: usize;
    /// Tokens of a full tile, as many as the registers hold accumulators for.
    const TILE_TOKENS: usize;

    /// Columns `k0..k0 + width` of up to `PANEL_ROWS` bf16 rows (`w`, `[rows, cols]`) into
    /// `panel` (`[width, PANEL_ROWS]`), zeros below the last row.
    ///
    /// # Safety
    /// The CPU must support the instruction set.
    unsafe fn decode_bf16(w: &[u16], cols: usize, k0: usize, width: usize, panel: &mut [f32]);

    /// As `decode_bf16` for MXFP4 rows (`blocks` `[rows, cols / 2]`, `scales`
    /// `[rows, cols / 32]`; `k0` and `width` multiples of 32).
    ///
    /// # Safety
    /// The CPU must support the instruction set.
    unsafe fn decode_mxfp4(
        blocks: &[u8],
        scales: &[u8],
        cols: usize,
        k0: usize,
        width: usize,
        panel: &mut [f32],
    );

    /// The products of one tile of `tokens` (1 to `TILE_TOKENS`) tokens.
    ///
    /// # Safety
    /// The CPU must support the instruction set.
    unsafe fn tile(tokens: usize, tile: BroadcastTile);
}

/// `out[t * rows + r] = Σ_c x[t, c] · w[r, c]`, token-major, with `x` `[tokens, cols]` and
/// `weights` holding `out.len() / tokens` rows of `cols` columns (for MXFP4 a multiple of 32).
///
/// # Safety
/// The CPU must support `K`'s instruction set.
pub unsafe fn matmul_broadcast<K: PanelKernels>(
    x: &[f32],
    tokens: usize,
    weights: PanelSource,
    cols: usize,
    out: &mut [f32],
) {
    let rows = out.len() / tokens;
    assert!(x.len() == tokens * cols && out.len() == tokens * rows);
    let panel_len = K::PANEL_ROWS * PANEL_COLS;
    let mut decoded = vec![0f32; rows.div_ceil(K::PANEL_ROWS) * panel_len];
    for k0 in (0..cols).step_by(PANEL_COLS) {
        let width = PANEL_COLS.min(cols - k0);
        for (p, panel) in decoded.chunks_exact_mut(panel_len).enumerate() {
            let first = p * K::PANEL_ROWS;
            let count = K::PANEL_ROWS.min(rows - first);
            // SAFETY: the caller guarantees the CPU's support.
            match weights {
                PanelSource::Bf16(w) => unsafe {
                    K::decode_bf16(
                        &w[first * cols..(first + count) * cols],
                        cols,
                        k0,
                        width,
                        panel,
                    )
                },
                PanelSource::Mxfp4 { blocks, scales } => unsafe {
                    let (row_bytes, row_scales) = (cols / 2, cols / 32);
                    K::decode_mxfp4(
                        &blocks[first * row_bytes..(first + count) * row_bytes],
                        &scales[first * row_scales..(first + count) * row_scales],
                        cols,
                        k0,
                        width,
                        panel,
                    )
                },
            }
        }
        for t0 in (0..tokens).step_by(K::TILE_TOKENS) {
            for (p, panel) in decoded.chunks_exact(panel_len).enumerate() {
                let tile = BroadcastTile {
                    x: &x[t0 * cols + k0..],
                    cols,
                    panel: &panel[..width * K::PANEL_ROWS],
                    out: &mut out[t0 * rows + p * K::PANEL_ROWS..],
                    rows: (rows - p * K::PANEL_ROWS).min(K::PANEL_ROWS),
                    out_stride: rows,
                    accumulate: k0 > 0,
                };
                // SAFETY: as above.
                unsafe { K::tile(K::TILE_TOKENS.min(tokens - t0), tile) };
            }
        }
    }
}

/// Turns a run-time token count (one of the literals listed) into the const `$T` for `$body`.
macro_rules! tile_tokens {
    ($count:expr, $T:ident, [$($t:literal)*], $body:expr) => {
        match $count {
            $( $t => {
                const $T: usize = $t;
                $body
            } )*
            other => unreachable!("no broadcast tile of {other} tokens"),
        }
    };
}
pub(crate) use tile_tokens;
