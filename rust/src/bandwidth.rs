//! Memory read bandwidth of this machine: the roofline decoding is measured against.

use std::time::Instant;

use rayon::prelude::*;

/// Best-of-`repeats` read bandwidth in bytes per second over a `bytes`-sized buffer, read by
/// `threads` threads (as decoding reads weights: each thread streams its own contiguous share).
pub fn measure_read_bandwidth(bytes: usize, threads: usize, repeats: usize) -> Result<f64, String> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| format!("cannot start {threads} threads: {e}"))?;
    let words = (bytes / 8).max(1 << 16);
    let mut buffer: Vec<u64> = Vec::new();
    buffer
        .try_reserve_exact(words)
        .map_err(|_| format!("cannot allocate a {bytes}-byte buffer"))?;
    // Non-zero contents so the pages are really allocated, not shared zero pages.
    buffer.extend(0..words as u64);
    let chunk = (1 << 20) / 8; // 1 MiB per task
    let mut best = f64::INFINITY;
    let mut checksum = 0u64;
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        checksum ^= pool.install(|| {
            buffer
                .par_chunks(chunk)
                .map(|c| c.iter().fold(0u64, |acc, &v| acc.wrapping_add(v)))
                .reduce(|| 0, u64::wrapping_add)
        });
        best = best.min(start.elapsed().as_secs_f64());
    }
    std::hint::black_box(checksum);
    Ok((words * 8) as f64 / best)
}
