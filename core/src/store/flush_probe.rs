//! How long the disk under a directory takes to make a write durable, measured the way the
//! log store's journal writes: overwrites of a file already written, each followed by
//! `fdatasync`.
//!
//! A commit waits for one such flush, so on a disk whose cache must be flushed through a
//! virtual layer the flush, not the commit logic, bounds a store's commits per second and a
//! paced message's latency (decision 0028). The benchmarks print it next to their results:
//! on a shared machine it changes by the hour, and a figure without it says little.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Bytes the probe file holds; its writes cycle through it.
const PROBE_FILE_BYTES: u64 = 1 << 20;

/// What the benchmarks probe before a run: writes of about a batch of 100 sends' journal
/// record, 100 of them (20–100 ms on the development machine).
pub const BATCH_WRITE_BYTES: usize = 36 * 1024;
pub const BATCH_FLUSHES: usize = 100;

/// Latencies of a probe's flushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushLatency {
    /// Writes measured.
    pub flushes: usize,
    pub p50_us: u64,
    pub p90_us: u64,
    pub max_us: u64,
}

impl FlushLatency {
    /// Flushes a second the disk sustains one after another, from the median.
    pub fn flushes_per_sec(&self) -> u64 {
        1_000_000 / self.p50_us.max(1)
    }
}

/// Writes `flushes` times `write_bytes` (at most 1 MiB) over a file of zeros in `dir`, each
/// followed by `fdatasync`, and returns their latencies. The file is removed afterwards.
pub fn measure(dir: &Path, flushes: usize, write_bytes: usize) -> std::io::Result<FlushLatency> {
    if flushes == 0 || write_bytes == 0 || write_bytes as u64 > PROBE_FILE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a flush probe needs at least one write of 1 byte to 1 MiB",
        ));
    }
    // A name of its own per probe, so that two probes never share (or remove) one file.
    static PROBES: AtomicU64 = AtomicU64::new(0);
    let path = dir.join(format!(
        "flush-probe-{}-{}.tmp",
        std::process::id(),
        PROBES.fetch_add(1, Ordering::Relaxed)
    ));
    let file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&path)
        .map_err(|error| {
            std::io::Error::new(
                error.kind(),
                format!("create the flush probe's file {}: {error}", path.display()),
            )
        })?;
    let result = probe(file, flushes, write_bytes);
    let removed = std::fs::remove_file(&path).map_err(|error| {
        std::io::Error::new(
            error.kind(),
            format!("remove the flush probe's file {}: {error}", path.display()),
        )
    });
    let latency = result?;
    removed?;
    Ok(latency)
}

fn probe(mut file: File, flushes: usize, write_bytes: usize) -> std::io::Result<FlushLatency> {
    // Written and synced first, as the journal's segments are: the overwrites below then
    // need no change of the file's size or extents, only the data's flush.
    file.write_all(&vec![0u8; PROBE_FILE_BYTES as usize])?;
    file.sync_all()?;
    let data = vec![0x5au8; write_bytes];
    let slots = PROBE_FILE_BYTES / write_bytes as u64;
    let mut latencies_us = Vec::with_capacity(flushes);
    for index in 0..flushes as u64 {
        let started = Instant::now();
        file.write_all_at(&data, (index % slots) * write_bytes as u64)?;
        file.sync_data()?;
        latencies_us.push(started.elapsed().as_micros() as u64);
    }
    latencies_us.sort_unstable();
    // Nearest rank: the smallest latency at or above `quantile` of them.
    let at = |quantile: f64| {
        let rank = (latencies_us.len() as f64 * quantile).ceil() as usize;
        latencies_us[rank.clamp(1, latencies_us.len()) - 1]
    };
    Ok(FlushLatency {
        flushes,
        p50_us: at(0.5),
        p90_us: at(0.9),
        max_us: at(1.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_measures_every_flush_and_leaves_no_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let latency = measure(dir.path(), 5, 4096).expect("probe");
        assert_eq!(latency.flushes, 5);
        assert!(latency.p50_us <= latency.p90_us && latency.p90_us <= latency.max_us);
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("list").collect();
        assert!(left.is_empty(), "the probe file stays: {left:?}");
    }

    #[test]
    fn a_probe_refuses_writes_it_cannot_cycle_through_its_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        for (flushes, bytes) in [(0, 4096), (3, 0), (3, (1 << 20) + 1)] {
            let error = measure(dir.path(), flushes, bytes).expect_err("refused");
            assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
        }
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 0);
    }
}
