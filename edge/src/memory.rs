//! The memory ceiling: a thread off the data path reads the process's resident memory every
//! `SAMPLE_INTERVAL`; above `SHED_ABOVE` of `limits.memory_bytes_max` the shards refuse new
//! connections and new sends (`Overloaded`) until it falls below `RESUME_BELOW`, while
//! deliveries and acks (which free memory) go on. After load falls, freed heap is handed back
//! to the kernel (jemalloc's purge and glibc's `malloc_trim`), so the resident size follows the
//! load down.
//!
//! The ceiling is the last line: the limits in `[limits]` bound each connection, queue and
//! cache (docs/security.md has the formula), and the ceiling catches what their sum allows
//! beyond what the machine has.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::{info, warn};

const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// Start shedding above this share of the ceiling, in percent.
const SHED_ABOVE_PERCENT: u64 = 90;
/// Stop shedding below this share.
const RESUME_BELOW_PERCENT: u64 = 80;
/// Trim the heap when the resident size is this much above where the last trim left it.
const TRIM_AFTER_GROWTH_BYTES: u64 = 32 * 1024 * 1024;
/// How often the trim condition is checked.
const TRIM_INTERVAL: Duration = Duration::from_secs(5);
/// The ceiling when the configuration leaves it to the edge: this share of what the machine
/// (or the container's memory limit) allows, in percent.
const AUTO_CEILING_PERCENT: u64 = 75;

/// Shared by the shards: whether to refuse new work.
#[derive(Debug)]
pub struct MemoryGuard {
    ceiling_bytes: u64,
    shedding: AtomicBool,
}

impl MemoryGuard {
    /// Starts the sampling thread. `configured_bytes` 0 means the automatic ceiling.
    pub fn start(configured_bytes: u64) -> std::io::Result<Arc<MemoryGuard>> {
        let ceiling_bytes = if configured_bytes > 0 {
            configured_bytes
        } else {
            available_bytes().map_or(u64::MAX, |bytes| bytes / 100 * AUTO_CEILING_PERCENT)
        };
        let guard = Arc::new(MemoryGuard {
            ceiling_bytes,
            shedding: AtomicBool::new(false),
        });
        info!(
            ceiling_mib = ceiling_bytes / (1024 * 1024),
            "memory ceiling: new connections and sends are refused above {SHED_ABOVE_PERCENT}% of it"
        );
        let sampled = guard.clone();
        std::thread::Builder::new()
            .name("courier-memory".into())
            .spawn(move || sampled.run())?;
        Ok(guard)
    }

    /// Whether the shards should refuse new connections and sends now.
    pub fn shedding(&self) -> bool {
        self.shedding.load(Ordering::Relaxed)
    }

    fn run(&self) {
        let shed_above = self.ceiling_bytes / 100 * SHED_ABOVE_PERCENT;
        let resume_below = self.ceiling_bytes / 100 * RESUME_BELOW_PERCENT;
        let mut trimmed_at_bytes = resident_bytes().unwrap_or(0);
        let mut since_trim_check = Duration::ZERO;
        loop {
            std::thread::sleep(SAMPLE_INTERVAL);
            let Some(mut resident) = resident_bytes() else {
                continue;
            };
            let shedding = self.shedding.load(Ordering::Relaxed);
            if !shedding && resident > shed_above {
                // Free heap first: what the allocators hold but nobody uses counts as resident.
                resident = trim().unwrap_or(resident);
                trimmed_at_bytes = resident;
                if resident > shed_above {
                    warn!(
                        resident_mib = resident / (1024 * 1024),
                        ceiling_mib = self.ceiling_bytes / (1024 * 1024),
                        "memory near its ceiling: refusing new connections and sends"
                    );
                    self.shedding.store(true, Ordering::Relaxed);
                }
            } else if shedding && resident < resume_below {
                info!(
                    resident_mib = resident / (1024 * 1024),
                    "memory back under its ceiling: accepting new work"
                );
                self.shedding.store(false, Ordering::Relaxed);
            }
            since_trim_check += SAMPLE_INTERVAL;
            if since_trim_check >= TRIM_INTERVAL {
                since_trim_check = Duration::ZERO;
                if resident > trimmed_at_bytes + TRIM_AFTER_GROWTH_BYTES || shedding {
                    trimmed_at_bytes = trim().unwrap_or(resident);
                }
            }
        }
    }
}

/// Returns free heap to the kernel; the resident size afterwards.
fn trim() -> Option<u64> {
    // C libraries (aws-lc, glibc itself) still allocate from glibc.
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
    #[cfg(feature = "jemalloc")]
    if let Err(status) = purge_jemalloc() {
        warn!(status, "jemalloc refused to purge its arenas");
    }
    resident_bytes()
}

/// Hands jemalloc's freed pages back now. Without it they go only as their arena's decay
/// (10 s) moves on, and it moves only when that arena allocates: an idle shard's could stay.
#[cfg(feature = "jemalloc")]
fn purge_jemalloc() -> Result<(), i32> {
    // `MALLCTL_ARENAS_ALL` (4096): every arena.
    let name = c"arena.4096.purge";
    #[allow(unsafe_code)]
    // SAFETY: a NUL-terminated control name with no input or output; jemalloc purges under
    // its own locks.
    let status = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if status == 0 { Ok(()) } else { Err(status) }
}

/// The process's resident memory, from /proc/self/statm.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    #[allow(unsafe_code)]
    // SAFETY: sysconf only reads a system value.
    let page_bytes = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page_bytes).ok()?)
}

/// What this process may use: the cgroup's memory limit if one is set, else the machine's
/// memory.
fn available_bytes() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok());
    let machine = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let kib: u64 = text
                .lines()
                .find(|line| line.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some(kib * 1024)
        });
    match (cgroup, machine) {
        (Some(cgroup), Some(machine)) => Some(cgroup.min(machine)),
        (cgroup, machine) => cgroup.or(machine),
    }
}

#[cfg(all(test, feature = "jemalloc"))]
mod tests {
    /// The control name is one jemalloc knows (a wrong one only logs a warning at run time).
    #[test]
    fn jemalloc_purges_every_arena() {
        let held: Vec<Vec<u8>> = (0..64).map(|_| vec![1u8; 64 * 1024]).collect();
        drop(held);
        assert_eq!(super::purge_jemalloc(), Ok(()));
    }
}
