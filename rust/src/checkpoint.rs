//! The safetensors files of a checkpoint directory, memory-mapped (SPEC §2).
//!
//! Every shard is mapped read-only and validated with the `safetensors` crate's header parser (size
//! limits, JSON, contiguous in-bounds offsets). Tensors are handed out as [`TensorBytes`]: a range of a
//! mapping that keeps the mapping alive, so the weights are never copied.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::{Deref, Range};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

#[cfg(target_endian = "big")]
compile_error!("safetensors data is little-endian and is reinterpreted in place; big-endian targets are not supported");

/// Bytes of one tensor inside a memory-mapped file.
#[derive(Clone)]
pub struct TensorBytes {
    map: Arc<Mmap>,
    range: Range<usize>,
}

impl TensorBytes {
    /// Drops this tensor's pages from the process (they stay in the page cache and come back
    /// from the file if read again): for tensors replaced by a copy in another format, so the
    /// original no longer counts in resident memory. Only whole pages inside the tensor.
    pub fn release(&self) {
        const PAGE: usize = 4096;
        let start = self.range.start.div_ceil(PAGE) * PAGE;
        let end = self.range.end / PAGE * PAGE;
        if end > start {
            // SAFETY: the mapping is read-only, so MADV_DONTNEED loses nothing: a later read
            // faults the same bytes back in from the file. Rust references into these pages
            // stay valid for the same reason. Only advice: a failure changes nothing.
            let _ = unsafe {
                self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
    }

    /// A sub-range, relative to this tensor's first byte.
    pub fn slice(&self, range: Range<usize>) -> TensorBytes {
        assert!(range.end <= self.range.len(), "slice out of tensor bounds");
        TensorBytes {
            map: Arc::clone(&self.map),
            range: self.range.start + range.start..self.range.start + range.end,
        }
    }
}

impl Deref for TensorBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }
}

/// One tensor as its header describes it.
pub struct TensorEntry {
    pub file: PathBuf,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: TensorBytes,
}

/// All tensors of a checkpoint directory. Consumers [`take`](Checkpoint::take) each tensor they need
/// with the dtype and shape they expect; [`finish`](Checkpoint::finish) rejects leftovers.
pub struct Checkpoint {
    pub dir: PathBuf,
    /// The safetensors files, sorted.
    pub files: Vec<PathBuf>,
    tensors: BTreeMap<String, TensorEntry>,
    pub total_bytes: u64,
}

const INDEX_FILE: &str = "model.safetensors.index.json";
const SINGLE_FILE: &str = "model.safetensors";

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let (files, weight_map) = if index_path.is_file() {
            let weight_map = read_index(&index_path)?;
            let mut files: Vec<PathBuf> = weight_map.values().map(|f| dir.join(f)).collect();
            files.sort();
            files.dedup();
            (files, Some(weight_map))
        } else if dir.join(SINGLE_FILE).is_file() {
            (vec![dir.join(SINGLE_FILE)], None)
        } else {
            // The original layout of gpt-oss-120b has no index: every *.safetensors file is a shard.
            let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, &e))?;
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(Error::Checkpoint(format!(
                    "{}: no {SINGLE_FILE}, {INDEX_FILE} or other *.safetensors file",
                    dir.display()
                )));
            }
            (files, None)
        };

        let mut tensors = BTreeMap::new();
        let mut total_bytes = 0u64;
        for file in &files {
            let map = Arc::new(map_file(file)?);
            let parsed = SafeTensors::deserialize(&map).map_err(|e| {
                let detail = describe_bad_tensor(&map).unwrap_or_else(|| e.to_string());
                Error::checkpoint(file, format!("not a valid safetensors file: {detail}"))
            })?;
            for (name, view) in parsed.iter() {
                // The view borrows from `map`, so this is its offset in the file.
                let start = view.data().as_ptr() as usize - map.as_ptr() as usize;
                let entry = TensorEntry {
                    file: file.clone(),
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    bytes: TensorBytes {
                        map: Arc::clone(&map),
                        range: start..start + view.data().len(),
                    },
                };
                total_bytes += entry.bytes.len() as u64;
                if let Some(previous) = tensors.insert(name.to_string(), entry) {
                    return Err(Error::checkpoint(
                        file,
                        format!(
                            "tensor '{name}' also appears in {}",
                            previous.file.display()
                        ),
                    ));
                }
            }
        }

        if let Some(weight_map) = weight_map {
            check_index_matches(&index_path, dir, &weight_map, &tensors)?;
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            tensors,
            total_bytes,
        })
    }

    /// Removes a tensor, checking its dtype and shape.
    pub fn take(&mut self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<TensorBytes> {
        let entry = self.tensors.remove(name).ok_or_else(|| {
            Error::Checkpoint(format!("{}: missing tensor '{name}'", self.dir.display()))
        })?;
        if entry.dtype != dtype {
            return Err(Error::checkpoint(
                &entry.file,
                format!(
                    "tensor '{name}': expected dtype {dtype:?}, found {:?}",
                    entry.dtype
                ),
            ));
        }
        if entry.shape != shape {
            return Err(Error::checkpoint(
                &entry.file,
                format!(
                    "tensor '{name}': expected shape {shape:?}, found {:?}",
                    entry.shape
                ),
            ));
        }
        // The kernels read bf16 in place as u16; the safetensors writers pad headers to 8 bytes.
        if dtype == Dtype::BF16 && !(entry.bytes.as_ptr() as usize).is_multiple_of(2) {
            return Err(Error::checkpoint(
                &entry.file,
                format!("tensor '{name}': bf16 data is not 2-byte aligned (header not padded)"),
            ));
        }
        Ok(entry.bytes)
    }

    /// Fails if any tensor was not taken: an unknown tensor means a layout we do not understand.
    pub fn finish(self) -> Result<()> {
        let extra: Vec<String> = self
            .tensors
            .iter()
            .take(5)
            .map(|(name, t)| format!("'{name}' in {}", t.file.display()))
            .collect();
        if extra.is_empty() {
            Ok(())
        } else {
            Err(Error::Checkpoint(format!(
                "{}: {} unexpected tensor(s): {}",
                self.dir.display(),
                self.tensors.len(),
                extra.join(", ")
            )))
        }
    }
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, &e))?;
    let len = file.metadata().map_err(|e| Error::io(path, &e))?.len();
    if len < 8 {
        return Err(Error::checkpoint(
            path,
            format!("file is {len} bytes, too short for a safetensors header"),
        ));
    }
    // SAFETY: the mapping is read-only and private to this process. Like every mmap-based loader we
    // rely on the checkpoint not being truncated or rewritten while it is loaded; all offsets into it
    // are validated against its length before use.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, &e))?;
    // Decoding streams the whole file per token: with 4 KiB pages, TLB misses and page-bounded
    // prefetch cost ~20% of bandwidth. This lets the kernel back the mapping with huge pages
    // (read-only file THP, collapsed by khugepaged). Only advice: ignore failure.
    let _ = map.advise(memmap2::Advice::HugePage);
    Ok(map)
}

/// Names the tensor whose size disagrees with its offsets, which the `safetensors` crate's
/// `TensorInvalidInfo` error leaves out. `None` when the header itself is unreadable.
fn describe_bad_tensor(file: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(file.get(..8)?.try_into().ok()?);
    let header = file.get(8..8usize.checked_add(usize::try_from(n).ok()?)?)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
    header.iter().filter(|(name, _)| *name != "__metadata__").find_map(|(name, info)| {
        let dtype: Dtype = serde_json::from_value(info.get("dtype")?.clone()).ok()?;
        let shape: Vec<usize> = serde_json::from_value(info.get("shape")?.clone()).ok()?;
        let offsets: (usize, usize) = serde_json::from_value(info.get("data_offsets")?.clone()).ok()?;
        let elements = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
        let expected = elements.checked_mul(dtype.bitsize())? / 8;
        let found = offsets.1.checked_sub(offsets.0)?;
        (expected != found).then(|| {
            format!(
                "tensor '{name}': {dtype:?} {shape:?} needs {expected} bytes, its offsets span {found}"
            )
        })
    })
}

fn read_index(path: &Path) -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, &e))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::checkpoint(path, format!("not valid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::checkpoint(path, "expected an object 'weight_map'"))?;
    map.iter()
        .map(|(name, file)| {
            let file = file
                .as_str()
                .filter(|f| !f.contains('/') && !f.contains('\\'));
            match file {
                Some(f) => Ok((name.clone(), f.to_string())),
                None => Err(Error::checkpoint(
                    path,
                    format!("weight_map['{name}']: expected a file name in this directory"),
                )),
            }
        })
        .collect()
}

fn check_index_matches(
    index_path: &Path,
    dir: &Path,
    weight_map: &HashMap<String, String>,
    tensors: &BTreeMap<String, TensorEntry>,
) -> Result<()> {
    for (name, file) in weight_map {
        match tensors.get(name) {
            Some(t) if t.file == dir.join(file) => {}
            Some(t) => {
                return Err(Error::checkpoint(
                    index_path,
                    format!("lists '{name}' in {file}, found in {}", t.file.display()),
                ))
            }
            None => {
                return Err(Error::checkpoint(
                    index_path,
                    format!("lists '{name}' in {file}, but that file does not contain it"),
                ))
            }
        }
    }
    if let Some((name, t)) = tensors
        .iter()
        .find(|(name, _)| !weight_map.contains_key(*name))
    {
        return Err(Error::checkpoint(
            index_path,
            format!(
                "weight_map does not list tensor '{name}' found in {}",
                t.file.display()
            ),
        ));
    }
    Ok(())
}
