//! Memory read bandwidth of this machine: the roofline decoding is measured against.

use std::time::Instant;

use rayon::prelude::*;

/// Bytes per parallel task.
const TASK_BYTES: usize = 1 << 20;

/// Streams a task reads in turn, a cache line at a time, as an MXFP4 decode tile reads its
/// lanes: one sequential stream per task measured 4-8 % less bandwidth here, which would flatter
/// the roofline percentages.
const STREAMS: usize = 4;

/// Best-of-`repeats` read bandwidth in bytes per second over `bytes`, read on the current rayon
/// pool (as decoding reads weights: each thread streams its own tasks).
pub fn best_read_bandwidth(bytes: &[u8], repeats: usize) -> f64 {
    let (_, words, _) = bytemuck::pod_align_to::<u8, u64>(bytes);
    let mut best = f64::INFINITY;
    let mut checksum = 0u64;
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        checksum ^= words
            .par_chunks(TASK_BYTES / 8)
            .map(sum_streams)
            .reduce(|| 0, u64::wrapping_add);
        best = best.min(start.elapsed().as_secs_f64());
    }
    std::hint::black_box(checksum);
    (words.len() * 8) as f64 / best
}

/// Wrapping sum of `task`, read as [`STREAMS`] interleaved streams of 8-word cache lines.
fn sum_streams(task: &[u64]) -> u64 {
    let stream_lines = task.len() / 8 / STREAMS;
    let (streams, rest) = task.split_at(stream_lines * 8 * STREAMS);
    let mut sums = [0u64; STREAMS];
    for line in 0..stream_lines {
        for (s, sum) in sums.iter_mut().enumerate() {
            let at = (s * stream_lines + line) * 8;
            *sum = streams[at..at + 8]
                .iter()
                .fold(*sum, |acc, &v| acc.wrapping_add(v));
        }
    }
    rest.iter()
        .chain(&sums)
        .fold(0, |acc, &v| acc.wrapping_add(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_is_read_once() {
        // Two whole tasks, a partial one, and a ragged tail within it.
        let words: Vec<u64> = (1..=(2 * TASK_BYTES / 8 + 1000 + 3) as u64).collect();
        let want = words.iter().fold(0u64, |acc, &v| acc.wrapping_add(v));
        let got = words
            .par_chunks(TASK_BYTES / 8)
            .map(sum_streams)
            .reduce(|| 0, u64::wrapping_add);
        assert_eq!(got, want);
        assert!(best_read_bandwidth(bytemuck::cast_slice(&words), 2) > 0.0);
    }
}
