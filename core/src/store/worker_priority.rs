//! fjall's background workers (memtable flushes and compactions) at idle priority while they
//! keep up, and at normal priority once they fall behind (decision 0039).
//!
//! The worker runs for 2–5 ms at a time on whatever core it shares with a shard, and the
//! scheduler lets it finish its slice before a woken shard runs: at a pace, those waits were
//! fjall's paced 99.9th percentile. At `SCHED_IDLE` it runs only when the core has nothing
//! else to do, which at a pace is most of the time; under sustained load it would starve, and
//! fjall stops writes once four memtables wait for it, so the store's writer raises it back
//! to normal as soon as memtables or level-0 runs pile up (RocksDB puts its compactions at
//! idle priority for the same reason, with its write stalls as the only guard).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Sealed memtables of one keyspace that make the workers normal priority (fjall halts
/// writes at 4).
pub const SEALED_MEMTABLES_BEHIND: usize = 2;
/// Level-0 tables of one keyspace beyond the runs at which it merges level 0 into level 1
/// that make the workers normal priority (8 in all at fjall's default of 4).
pub const LEVEL0_TABLES_OVER_BEHIND: usize = 4;
/// fjall slows writes from this many level-0 runs in a keyspace (and halts them from 30).
pub const LEVEL0_RUNS_SLOWED: usize = 20;

/// Level-0 tables of a keyspace that merges level 0 at `runs_max` runs beyond the mark the
/// backlog counts from: `runs_max`, but low enough that the workers are back at normal
/// priority two runs before fjall slows writes.
pub fn level0_tables_over(tables: usize, runs_max: usize) -> usize {
    tables.saturating_sub(runs_max.min(LEVEL0_RUNS_SLOWED - LEVEL0_TABLES_OVER_BEHIND - 2))
}
/// How often the writer looks at the backlog, at most: each look reads two counts per
/// keyspace under fjall's locks.
const CHECK_EVERY: Duration = Duration::from_millis(2);

/// Whether this process may put a thread at `SCHED_IDLE` and take it back to normal
/// priority. Leaving `SCHED_IDLE` needs `CAP_SYS_NICE` or an `RLIMIT_NICE` that allows nice
/// 0 (systemd: `LimitNICE=0`): without it a worker made idle would stay idle, starve under
/// load and stall every write, so the caller leaves the workers as they are. Tried once, on
/// a thread of its own.
pub fn idle_priority_reversible() -> bool {
    static REVERSIBLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REVERSIBLE.get_or_init(|| {
        std::thread::Builder::new()
            .name("courier-probe".into())
            .spawn(|| set_idle(0, true).is_ok() && set_idle(0, false).is_ok())
            .ok()
            .and_then(|probe| probe.join().ok())
            .unwrap_or(false)
    })
}

/// Puts thread `tid` (0: the calling thread) at `SCHED_IDLE`, or back at `SCHED_OTHER`.
#[allow(unsafe_code)]
fn set_idle(tid: i32, idle: bool) -> std::io::Result<()> {
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call; the kernel only reads it.
    if unsafe { libc::sched_setscheduler(tid, policy, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The workers' priority, changed by the store's writer after its commits.
#[derive(Debug)]
pub struct WorkerPriority {
    state: Mutex<State>,
    /// `status`, published without the lock: the shard reads it for its gauges and must
    /// never wait for the writer, which holds the lock while it reads fjall's backlog.
    workers_idle: AtomicUsize,
    behind_total: AtomicU64,
}

#[derive(Debug)]
struct State {
    /// Workers put at `SCHED_IDLE` and not yet taken back.
    idle_tids: Vec<i32>,
    /// How many workers fjall starts: until all have been seen, new ones are looked for.
    workers: usize,
    /// Callers that need the workers at normal priority whatever the backlog (an erase pass
    /// waiting for flushes and compactions).
    held_normal: usize,
    /// Whether the backlog said "behind" at the last look (kept until it is cleared).
    behind: bool,
    checked_at: Option<Instant>,
}

/// The workers' priority, for metrics (`courier_store_background_workers_idle`,
/// `courier_store_background_behind_total`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackgroundPriority {
    /// Workers at `SCHED_IDLE` now.
    pub workers_idle: usize,
    /// Times the backlog piled up and put the workers back at normal priority.
    pub behind_total: u64,
}

/// What the writer sees of fjall's backlog: the most sealed memtables of any keyspace, and
/// the most level-0 tables any keyspace holds beyond the mark where it merges them
/// (`level0_tables_over`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Backlog {
    pub sealed_memtables_max: usize,
    pub level0_tables_over_max: usize,
}

impl Backlog {
    fn behind(self) -> bool {
        self.sealed_memtables_max >= SEALED_MEMTABLES_BEHIND
            || self.level0_tables_over_max >= LEVEL0_TABLES_OVER_BEHIND
    }

    /// Caught up: nothing waits to be flushed and no level 0 is past its mark.
    fn caught_up(self) -> bool {
        self.sealed_memtables_max == 0 && self.level0_tables_over_max == 0
    }
}

impl WorkerPriority {
    pub fn new(workers: usize) -> WorkerPriority {
        WorkerPriority {
            state: Mutex::new(State {
                idle_tids: Vec::new(),
                workers,
                held_normal: 0,
                behind: false,
                checked_at: None,
            }),
            workers_idle: AtomicUsize::new(0),
            behind_total: AtomicU64::new(0),
        }
    }

    /// After a commit: looks at the backlog (at most every `CHECK_EVERY`) and moves the
    /// workers between idle and normal priority. `worker_tids` lists the workers started so
    /// far; `backlog` is only called when it is time to look.
    pub fn after_commit(
        &self,
        now: Instant,
        worker_tids: impl FnOnce() -> Vec<i32>,
        backlog: impl FnOnce() -> Backlog,
    ) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if state
            .checked_at
            .is_some_and(|at| now.saturating_duration_since(at) < CHECK_EVERY)
        {
            return;
        }
        state.checked_at = Some(now);
        let backlog = backlog();
        if backlog.behind() {
            if !state.behind {
                self.behind_total.fetch_add(1, Ordering::Relaxed);
            }
            state.behind = true;
        } else if backlog.caught_up() {
            state.behind = false;
        }
        state.apply(worker_tids);
        self.publish(&state);
    }

    fn publish(&self, state: &State) {
        self.workers_idle
            .store(state.idle_tids.len(), Ordering::Relaxed);
    }

    /// Keeps the workers at normal priority until the guard drops, whatever the backlog: for
    /// a caller that waits for their flushes and compactions.
    pub fn hold_normal(&self) -> HeldNormal<'_> {
        if let Ok(mut state) = self.state.lock() {
            state.held_normal += 1;
            state.apply(Vec::new);
            self.publish(&state);
        }
        HeldNormal { priority: self }
    }

    /// What the workers' priority is now, and how often they fell behind. Never blocks.
    pub fn status(&self) -> BackgroundPriority {
        BackgroundPriority {
            workers_idle: self.workers_idle.load(Ordering::Relaxed),
            behind_total: self.behind_total.load(Ordering::Relaxed),
        }
    }
}

impl State {
    fn apply(&mut self, worker_tids: impl FnOnce() -> Vec<i32>) {
        if self.behind || self.held_normal > 0 {
            for tid in std::mem::take(&mut self.idle_tids) {
                // A worker that has exited (the store closing) is gone either way.
                let _ = set_idle(tid, false);
            }
        } else if self.idle_tids.len() < self.workers {
            for tid in worker_tids() {
                // Only a thread of this process: the id of a worker that has exited could
                // have gone to another process's thread.
                let ours = std::path::Path::new(&format!("/proc/self/task/{tid}")).exists();
                if ours && !self.idle_tids.contains(&tid) && set_idle(tid, true).is_ok() {
                    self.idle_tids.push(tid);
                }
            }
        }
    }
}

/// Workers held at normal priority (`WorkerPriority::hold_normal`).
#[derive(Debug)]
pub struct HeldNormal<'a> {
    priority: &'a WorkerPriority,
}

impl Drop for HeldNormal<'_> {
    fn drop(&mut self) {
        if let Ok(mut state) = self.priority.state.lock() {
            state.held_normal = state.held_normal.saturating_sub(1);
            // The next look after a commit puts them back to idle if they keep up.
            state.checked_at = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Level 0 counts from where a keyspace merges it, and from two runs before fjall slows
    /// writes for a keyspace that merges later than that.
    #[test]
    fn level0_counts_from_the_keyspaces_mark() {
        assert_eq!(level0_tables_over(3, 4), 0);
        assert_eq!(level0_tables_over(8, 4), LEVEL0_TABLES_OVER_BEHIND);
        assert_eq!(level0_tables_over(16, 16), 2);
        assert_eq!(
            level0_tables_over(LEVEL0_RUNS_SLOWED - 2, 16),
            LEVEL0_TABLES_OVER_BEHIND,
            "behind two runs before fjall slows writes"
        );
    }

    /// Reads the scheduling policy of thread `tid`.
    #[allow(unsafe_code)]
    fn policy_of(tid: i32) -> i32 {
        // SAFETY: plain integer in, plain integer out.
        unsafe { libc::sched_getscheduler(tid) }
    }

    /// A worker goes idle while the backlog is small, back to normal once it piles up, stays
    /// normal until it is cleared, and is normal while an erase pass holds it.
    #[test]
    fn a_worker_is_idle_while_it_keeps_up_and_normal_once_it_falls_behind() {
        if !idle_priority_reversible() {
            eprintln!("skipped: this process may not leave SCHED_IDLE (no CAP_SYS_NICE)");
            return;
        }
        let (tid_sender, tid_receiver) = std::sync::mpsc::channel();
        let (stop_sender, stop_receiver) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            #[allow(unsafe_code)]
            // SAFETY: no arguments.
            let tid = unsafe { libc::gettid() };
            tid_sender.send(tid).unwrap();
            let _ = stop_receiver.recv();
        });
        let tid = tid_receiver.recv().unwrap();
        let priority = WorkerPriority::new(1);
        let mut now = Instant::now();
        let mut look = |backlog: Backlog| {
            now += CHECK_EVERY;
            priority.after_commit(now, || vec![tid], || backlog);
            policy_of(tid)
        };
        let quiet = Backlog::default();
        assert_eq!(look(quiet), libc::SCHED_IDLE);
        let one_sealed = Backlog {
            sealed_memtables_max: 1,
            level0_tables_over_max: 0,
        };
        assert_eq!(
            look(one_sealed),
            libc::SCHED_IDLE,
            "one memtable is normal work"
        );
        let behind = Backlog {
            sealed_memtables_max: SEALED_MEMTABLES_BEHIND,
            level0_tables_over_max: 0,
        };
        assert_eq!(look(behind), libc::SCHED_OTHER);
        assert_eq!(look(behind), libc::SCHED_OTHER);
        assert_eq!(look(one_sealed), libc::SCHED_OTHER, "until caught up");
        let level0 = Backlog {
            sealed_memtables_max: 0,
            level0_tables_over_max: 1,
        };
        assert_eq!(
            look(level0),
            libc::SCHED_OTHER,
            "level 0 still past its mark"
        );
        assert_eq!(look(quiet), libc::SCHED_IDLE);
        assert_eq!(
            priority.status(),
            BackgroundPriority {
                workers_idle: 1,
                behind_total: 1
            },
            "one episode of falling behind, however many looks saw it"
        );
        {
            let _held = priority.hold_normal();
            assert_eq!(policy_of(tid), libc::SCHED_OTHER);
            assert_eq!(look(quiet), libc::SCHED_OTHER, "held by an erase pass");
        }
        assert_eq!(look(quiet), libc::SCHED_IDLE);
        // Within CHECK_EVERY of the last look nothing changes.
        priority.after_commit(now, || vec![tid], || behind);
        assert_eq!(policy_of(tid), libc::SCHED_IDLE);
        stop_sender.send(()).unwrap();
        worker.join().unwrap();
    }
}
