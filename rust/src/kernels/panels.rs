//! Products of many tokens (prefill) by broadcasting: the rows are decoded once, [`PANEL_COLS`]
//! columns at a time, into panels of a few vectors of rows stored column by column; each
//! activation is then broadcast against a panel column and multiplied into a vector of rows of
//! its token. The sums need no horizontal reduction, and each weight is decoded once per call
//! rather than once per register tile of tokens. The exact kernels decode to f32 and sum each
//! output in column order, its partial sums kept in `out` between column blocks, so results do
//! not depend on the ISA's vector width; AVX-512 BF16 keeps bf16 pairs of adjacent columns for
//! `vdpbf16ps` (the fast path).
//!
//! The loops are here; each kernel family supplies its decoder and its tile ([`PanelKernels`]).

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

impl PanelSource<'_> {
    /// Rows `first..first + count` of these rows of `cols` columns.
    fn rows(self, first: usize, count: usize, cols: usize) -> Self {
        match self {
            PanelSource::Bf16(w) => PanelSource::Bf16(&w[first * cols..(first + count) * cols]),
            PanelSource::Mxfp4 { blocks, scales } => {
                let (row_bytes, row_scales) = (cols / 2, cols / 32);
                PanelSource::Mxfp4 {
                    blocks: &blocks[first * row_bytes..(first + count) * row_bytes],
                    scales: &scales[first * row_scales..(first + count) * row_scales],
                }
            }
        }
    }
}

/// One tile: up to [`PanelKernels::TILE_TOKENS`] tokens × one panel's rows over one block of
/// columns.
pub struct BroadcastTile<'a, A, V> {
    /// The tile's first token from the block's first column; token t starts `t · cols` later.
    pub x: &'a [A],
    pub cols: usize,
    /// `[width / COLUMNS_PER_VALUE, PANEL_ROWS]`.
    pub panel: &'a [V],
    /// The tile's first token from its first row; token t starts `t · out_stride` later.
    pub out: &'a mut [f32],
    /// Rows of the panel that exist (the rest of it is zeros).
    pub rows: usize,
    pub out_stride: usize,
    /// Add to the sums in `out` (of the previous column blocks) rather than start from zero.
    pub accumulate: bool,
}

/// A kernel family's parts of [`matmul_broadcast`].
pub trait PanelKernels {
    /// An activation as the tiles read it: f32, or bf16 bits.
    type Activation: Copy;
    /// A panel entry: one f32 weight, or the bf16 weights of two adjacent columns.
    type Value: Copy + Default;
    /// Columns per panel entry.
    const COLUMNS_PER_VALUE: usize;
    /// Rows of a panel: the vectors of rows that each broadcast activation multiplies.
    const PANEL_ROWS: usize;
    /// Tokens of a full tile, as many as the registers hold accumulators for.
    const TILE_TOKENS: usize;

    /// Columns `k0..k0 + width` of up to `PANEL_ROWS` rows (for MXFP4, `k0` and `width` are
    /// multiples of 32) into `panel` (`[width / COLUMNS_PER_VALUE, PANEL_ROWS]`), zeros below
    /// the last row.
    ///
    /// # Safety
    /// The CPU must support the instruction set; `weights` holds at most `PANEL_ROWS` whole rows
    /// of `cols` columns, `k0 + width <= cols`, and `panel` is zeros where no row is.
    unsafe fn decode(
        weights: PanelSource,
        cols: usize,
        k0: usize,
        width: usize,
        panel: &mut [Self::Value],
    );

    /// The products of one tile of `tokens` (1 to `TILE_TOKENS`) tokens.
    ///
    /// # Safety
    /// The CPU must support the instruction set.
    unsafe fn tile(tokens: usize, tile: BroadcastTile<Self::Activation, Self::Value>);
}

/// `out[t * rows + r] = Σ_c x[t, c] · w[r, c]`, token-major, with `x` `[tokens, cols]` and
/// `weights` holding `out.len() / tokens` rows of `cols` columns (a multiple of
/// `K::COLUMNS_PER_VALUE`; for MXFP4 of 32).
///
/// # Safety
/// The CPU must support `K`'s instruction set.
pub unsafe fn matmul_broadcast<K: PanelKernels>(
    x: &[K::Activation],
    tokens: usize,
    weights: PanelSource,
    cols: usize,
    out: &mut [f32],
) {
    let rows = out.len() / tokens;
    assert!(x.len() == tokens * cols && out.len() == tokens * rows);
    assert!(cols.is_multiple_of(K::COLUMNS_PER_VALUE));
    let panel_len = K::PANEL_ROWS * PANEL_COLS / K::COLUMNS_PER_VALUE;
    let mut decoded = vec![K::Value::default(); rows.div_ceil(K::PANEL_ROWS) * panel_len];
    for k0 in (0..cols).step_by(PANEL_COLS) {
        let width = PANEL_COLS.min(cols - k0);
        for (p, panel) in decoded.chunks_exact_mut(panel_len).enumerate() {
            let first = p * K::PANEL_ROWS;
            let count = K::PANEL_ROWS.min(rows - first);
            // SAFETY: the caller guarantees the CPU's support; `count <= PANEL_ROWS` whole rows,
            // `k0 + width <= cols`, and the panel's rows past `count` are never written, so
            // they stay the zeros it was allocated with.
            unsafe { K::decode(weights.rows(first, count, cols), cols, k0, width, panel) };
        }
        for t0 in (0..tokens).step_by(K::TILE_TOKENS) {
            for (p, panel) in decoded.chunks_exact(panel_len).enumerate() {
                let tile = BroadcastTile {
                    x: &x[t0 * cols + k0..],
                    cols,
                    panel: &panel[..width / K::COLUMNS_PER_VALUE * K::PANEL_ROWS],
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
