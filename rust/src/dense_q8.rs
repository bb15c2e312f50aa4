//! The `dense="q8"` weights: the attention and unembedding matrices requantized to 8 bits per value
//! and a bf16 scale per 32 ([`crate::kernels::quantize_bf16_row`]). The first load writes
//! them to a cache file, `$XDG_CACHE_HOME/gpt-oss-cpu/dense-q8/<key>.bin` (else `~/.cache/...`),
//! that later loads map in place, as the checkpoint is; where no cache can be written they are
//! built in memory at every load.
//!
//! File: a 64-byte header (magic, format version, key, matrix count, total length), then per
//! matrix its codes (`[rows, cols]`, stored `+ 128`, each row in the grouped order of
//! [`crate::kernels::q8::group_row`]) and its scales (`[rows, cols / 32]` bf16), each
//! starting on a 4096-byte boundary. The key hashes the checkpoint's fingerprint and the names,
//! sizes and modification times of its files, so a changed checkpoint gets a new file.

use std::fs::File;
use std::io::{Seek, Write};
use std::ops::{Deref, Range};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Mmap, MmapMut};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels::{self, Isa, MXFP4_BLOCK_VALUES as BLOCK};
use crate::weights::{fnv1a, Bf16Matrix};

const MAGIC: &[u8; 8] = b"GOCPUQ8\0";
/// 2: codes in the grouped order of [`crate::kernels::q8::group_row`]. 3: bf16 scales, not f32.
const VERSION: u32 = 3;
const HEADER_BYTES: usize = 64;
const ALIGN: usize = 4096;
/// Rows quantized per write: bounds the staging buffer.
const CHUNK_ROWS: usize = 4096;
/// Bytes written between flushes to disk while building: a single flush at the end stalled for
/// seconds with the progress at 100 %, and flushing as it goes measured faster (first q8 load of
/// the synthetic 20b 1.7 s against 2.2-2.5 s, same minute).
const SYNC_BYTES: usize = 64 << 20;

/// Told `(bytes done, bytes in all)` as a build of the 8-bit weights goes on, last with
/// `done == all`; returning false cancels it (even then: no cache file is kept), and the load
/// fails.
pub type Progress<'a> = &'a (dyn Fn(usize, usize) -> bool + Sync);

/// The error inside the `io::Error` of a build that [`Progress`] cancelled.
#[derive(Debug, thiserror::Error)]
#[error("the build of the 8-bit dense weights was cancelled")]
struct Cancelled;

fn cancelled() -> Error {
    Error::Input(Cancelled.to_string())
}

/// The bytes behind the matrices: the mapped cache file, or anonymous memory.
enum Store {
    File(Mmap),
    Memory(MmapMut),
}

impl Deref for Store {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Store::File(map) => map,
            Store::Memory(map) => map,
        }
    }
}

/// One requantized matrix.
pub struct Q8Matrix {
    store: Arc<Store>,
    codes: Range<usize>,
    scales: Range<usize>,
}

impl Q8Matrix {
    /// `[rows, cols]` codes, stored `+ 128`.
    pub fn codes(&self) -> &[u8] {
        &self.store[self.codes.clone()]
    }

    /// `[rows, cols / 32]` bf16 scales (2-byte aligned: sections start on 4096-byte boundaries
    /// of a page-aligned mapping).
    pub fn scales(&self) -> &[u16] {
        bytemuck::cast_slice(&self.store[self.scales.clone()])
    }
}

/// Where each matrix's sections lie, and the total length.
struct Layout {
    sections: Vec<(Range<usize>, Range<usize>)>,
    len: usize,
}

impl Layout {
    fn new(sources: &[&Bf16Matrix]) -> Layout {
        let mut at = HEADER_BYTES.next_multiple_of(ALIGN);
        let mut sections = Vec::with_capacity(sources.len());
        for m in sources {
            let codes = at..at + m.rows * m.cols;
            let scales_at = codes.end.next_multiple_of(ALIGN);
            let scales = scales_at..scales_at + m.rows * m.cols / BLOCK * 2;
            at = scales.end.next_multiple_of(ALIGN);
            sections.push((codes, scales));
        }
        Layout { sections, len: at }
    }

    fn header(&self, key: u64) -> [u8; HEADER_BYTES] {
        let mut header = [0u8; HEADER_BYTES];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[16..24].copy_from_slice(&key.to_le_bytes());
        header[24..32].copy_from_slice(&(self.sections.len() as u64).to_le_bytes());
        header[32..40].copy_from_slice(&(self.len as u64).to_le_bytes());
        header
    }

    fn matrices(&self, store: Store) -> Vec<Q8Matrix> {
        let store = Arc::new(store);
        self.sections
            .iter()
            .map(|(codes, scales)| Q8Matrix {
                store: Arc::clone(&store),
                codes: codes.clone(),
                scales: scales.clone(),
            })
            .collect()
    }
}

/// The 8-bit versions of `sources` (named `names`, for errors), from the cache file for `key`
/// (written first if missing or invalid), or built in memory when no cache file can be written.
///
/// # Errors
/// A source holds NaN or infinity, which 8 bits cannot hold (the bf16 path would pass it on to
/// the logits; requantizing would hide it).
pub fn load_or_build(
    sources: &[&Bf16Matrix],
    names: &[String],
    key: u64,
    isa: Isa,
    progress: Progress,
) -> Result<Vec<Q8Matrix>> {
    let layout = Layout::new(sources);
    let cache = cache_path(key);
    if let Some(map) = cache.as_deref().and_then(|p| open_valid(p, key, &layout)) {
        return Ok(layout.matrices(Store::File(map)));
    }
    check_finite(sources, names)?;
    if let Some(path) = cache {
        match write_file(&path, sources, key, &layout, isa, progress) {
            Ok(()) => {
                if let Some(map) = open_valid(&path, key, &layout) {
                    return Ok(layout.matrices(Store::File(map)));
                }
            }
            Err(e) if e.get_ref().is_some_and(|inner| inner.is::<Cancelled>()) => {
                return Err(cancelled())
            }
            // Unwritable: build in memory.
            Err(_) => {}
        }
    }
    let mut memory = MmapMut::map_anon(layout.len).map_err(|e| {
        Error::Input(format!(
            "cannot allocate {} bytes for the 8-bit dense weights: {e}",
            layout.len
        ))
    })?;
    let _ = memory.advise(memmap2::Advice::HugePage); // only advice
    for (m, (codes, scales)) in sources.iter().zip(&layout.sections) {
        let (head, tail) = memory.split_at_mut(scales.start);
        let end = scales.end;
        let scales = bytemuck::cast_slice_mut(&mut tail[..scales.len()]);
        quantize_rows(m, 0, &mut head[codes.clone()], scales, isa);
        if !progress(end, layout.len) {
            return Err(cancelled());
        }
    }
    if !progress(layout.len, layout.len) {
        return Err(cancelled());
    }
    Ok(layout.matrices(Store::Memory(memory)))
}

/// An error naming the first source, and row, that holds a NaN or an infinity (exponent bits all
/// ones in bf16).
fn check_finite(sources: &[&Bf16Matrix], names: &[String]) -> Result<()> {
    for (m, name) in sources.iter().zip(names) {
        let bad = m
            .data()
            .par_chunks(m.cols)
            .position_first(|row| row.iter().any(|&b| b & 0x7F80 == 0x7F80));
        if let Some(row) = bad {
            return Err(Error::Checkpoint(format!(
                "{name}: row {row} holds NaN or infinity, which dense=\"q8\" cannot quantize"
            )));
        }
    }
    Ok(())
}

/// A key for the cache file of a checkpoint: its fingerprint and its files' names, sizes and
/// modification times.
pub fn cache_key(fingerprint: u64, files: &[PathBuf]) -> u64 {
    let mut bytes = fingerprint.to_le_bytes().to_vec();
    bytes.extend(VERSION.to_le_bytes());
    for file in files {
        bytes.extend(file.to_string_lossy().as_bytes());
        if let Ok(meta) = std::fs::metadata(file) {
            bytes.extend(meta.len().to_le_bytes());
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            bytes.extend(modified.map_or(0, |d| d.as_nanos()).to_le_bytes());
        }
    }
    fnv1a(&bytes)
}

fn cache_path(key: u64) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))?;
    Some(
        base.join("gpt-oss-cpu")
            .join("dense-q8")
            .join(format!("{key:016x}.bin")),
    )
}

/// The cache file mapped, if it exists and has this layout's header and length.
fn open_valid(path: &Path, key: u64, layout: &Layout) -> Option<Mmap> {
    let file = File::open(path).ok()?;
    if file.metadata().ok()?.len() != layout.len as u64 {
        return None;
    }
    // SAFETY: read-only mapping of a file this library writes under a fresh name and renames
    // into place, so it is complete once visible; as with the checkpoint, it must not be
    // truncated while mapped.
    let map = unsafe { Mmap::map(&file) }.ok()?;
    (map[..HEADER_BYTES] == layout.header(key)).then_some(map)
}

/// Writes the cache file under a temporary name (plain writes, so a full disk is an error, not a
/// fault in a mapping), the header last, then renames it into place.
fn write_file(
    path: &Path,
    sources: &[&Bf16Matrix],
    key: u64,
    layout: &Layout,
    isa: Isa,
    progress: Progress,
) -> std::io::Result<()> {
    let dir = path.parent().expect("cache paths have a directory");
    std::fs::create_dir_all(dir)?;
    remove_abandoned_builds(dir, key);
    // Unique per build, also between threads of one process (loads release the GIL).
    static BUILDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let build = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temporary = dir.join(format!(".{key:016x}.{}.{build}.tmp", std::process::id()));
    let result = write_sections(&temporary, sources, key, layout, isa, progress)
        .and_then(|()| std::fs::rename(&temporary, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    } else {
        remove_other_versions(dir);
    }
    result
}

/// Removes cache files of other format versions (1.3 GB each for the 20b): this library can no
/// longer read them, and their names (keyed by version) would never be reused.
fn remove_other_versions(dir: &Path) {
    remove_entries(dir, |entry| {
        let path = entry.path();
        let mut head = [0u8; 12];
        path.extension().is_some_and(|e| e == "bin")
            && File::open(&path)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
                .is_ok()
            && &head[..8] == MAGIC
            && head[8..12] != VERSION.to_le_bytes()
    });
}

/// Removes the files of `dir` for which `stale` holds (best effort: a cache).
fn remove_entries(dir: &Path, stale: impl Fn(&std::fs::DirEntry) -> bool) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten().filter(|e| stale(e)) {
        let _ = std::fs::remove_file(entry.path());
    }
}

fn write_sections(
    path: &Path,
    sources: &[&Bf16Matrix],
    key: u64,
    layout: &Layout,
    isa: Isa,
    progress: Progress,
) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    let mut file = std::io::BufWriter::new(file);
    let (mut at, mut synced) = (0, 0);
    for (m, (codes_at, scales_at)) in sources.iter().zip(&layout.sections) {
        pad(&mut file, &mut at, codes_at.start)?;
        let mut scales = vec![0u16; m.rows * m.cols / BLOCK];
        let mut codes = vec![0u8; CHUNK_ROWS.min(m.rows) * m.cols];
        let per_chunk = CHUNK_ROWS * m.cols / BLOCK;
        let chunks = (0..m.rows)
            .step_by(CHUNK_ROWS)
            .zip(scales.chunks_mut(per_chunk));
        for (first, chunk_scales) in chunks {
            let codes = &mut codes[..(m.rows - first).min(CHUNK_ROWS) * m.cols];
            quantize_rows(m, first, codes, chunk_scales, isa);
            file.write_all(codes)?;
            at += codes.len();
            if at - synced >= SYNC_BYTES {
                file.flush()?;
                file.get_ref().sync_data()?;
                synced = at;
            }
            if !progress(at, layout.len) {
                return Err(std::io::Error::other(Cancelled));
            }
        }
        pad(&mut file, &mut at, scales_at.start)?;
        file.write_all(bytemuck::cast_slice(&scales))?;
        at += scales_at.len();
    }
    pad(&mut file, &mut at, layout.len)?;
    let mut file = file.into_inner().map_err(|e| e.into_error())?;
    file.seek(std::io::SeekFrom::Start(0))?;
    file.write_all(&layout.header(key))?;
    file.sync_all()?;
    if !progress(layout.len, layout.len) {
        return Err(std::io::Error::other(Cancelled));
    }
    Ok(())
}

/// Removes temporary files of builds of `key` that stopped (a killed process) more than an hour
/// ago: a live build writes its file continuously.
fn remove_abandoned_builds(dir: &Path, key: u64) {
    let prefix = format!(".{key:016x}.");
    remove_entries(dir, |entry| {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let idle = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        name.starts_with(&prefix)
            && name.ends_with(".tmp")
            && idle.is_some_and(|d| d.as_secs() > 3600)
    });
}

/// Zeros from `*at` up to `to`.
fn pad(file: &mut impl Write, at: &mut usize, to: usize) -> std::io::Result<()> {
    file.write_all(&vec![0u8; to - *at])?;
    *at = to;
    Ok(())
}

/// Quantizes rows `first..` of `m` (as many as `codes` holds) in parallel on the current pool.
fn quantize_rows(m: &Bf16Matrix, first: usize, codes: &mut [u8], scales: &mut [u16], isa: Isa) {
    codes
        .par_chunks_mut(m.cols)
        .zip(scales.par_chunks_mut(m.cols / BLOCK))
        .enumerate()
        .for_each(|(r, (codes, scales))| {
            kernels::quantize_bf16_row(isa, m.row(first + r), codes, scales)
        });
}
