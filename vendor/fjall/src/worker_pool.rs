// Copyright (c) 2024-present, fjall-rs
// This source code is licensed under both the Apache 2.0 and MIT License
// (found in the LICENSE-* files in the repository)

use crate::{
    compaction::worker::run as run_compaction, flush::worker::run as run_flush, poison::PoisonDart,
    stats::Stats, supervisor::Supervisor, Keyspace,
};
use lsm_tree::{AbstractTree, MemtableId};
use std::{
    borrow::Cow,
    sync::{
        atomic::{AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
    thread::JoinHandle,
};

pub enum WorkerMessage {
    Flush,
    Compact(Keyspace),
    Close,
    RotateMemtable(Keyspace, MemtableId),
}

impl std::fmt::Debug for WorkerMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}",
            match self {
                Self::Flush => Cow::Borrowed("WorkerMessage:Flush"),
                Self::Compact(k) => Cow::Owned(format!("WorkerMessage:Compact({:?})", k.name)),
                Self::Close => Cow::Borrowed("WorkerMessage:Close"),
                Self::RotateMemtable(k, memtable_id) =>
                    Cow::Owned(format!("WorkerMessage:Rotate({:?}, {memtable_id})", k.name)),
            }
        )
    }
}

type WorkerHandle = JoinHandle<Result<(), crate::Error>>;

/// Where a keyspace sends its workers' tasks (Courier's change, vendor/README.md). With more
/// than one worker, compactions go to a queue of their own, which workers 1 and up take, and
/// everything else (flushes, memtable rotations) to worker 0: a flush never waits behind a
/// compaction. Upstream had one queue, and its worker 0 put every compaction it took back on
/// it and took it again at once, spinning while the others compacted. With one worker
/// everything goes to the one queue, as upstream.
#[derive(Clone)]
pub struct WorkerMessager {
    flushes: flume::Sender<WorkerMessage>,
    compactions: flume::Sender<WorkerMessage>,
    compactions_apart: bool,
}

impl WorkerMessager {
    fn queue(&self, message: &WorkerMessage) -> &flume::Sender<WorkerMessage> {
        match message {
            WorkerMessage::Compact(_) if self.compactions_apart => &self.compactions,
            _ => &self.flushes,
        }
    }

    pub fn send(&self, message: WorkerMessage) -> Result<(), flume::SendError<WorkerMessage>> {
        self.queue(&message).send(message)
    }

    pub fn try_send(
        &self,
        message: WorkerMessage,
    ) -> Result<(), flume::TrySendError<WorkerMessage>> {
        self.queue(&message).try_send(message)
    }

    /// Asks every worker to stop, whichever queue it takes.
    pub(crate) fn try_send_close(&self) {
        let _ = self.flushes.try_send(WorkerMessage::Close);
        if self.compactions_apart {
            let _ = self.compactions.try_send(WorkerMessage::Close);
        }
    }

    /// Whether both queues are empty.
    pub fn is_empty(&self) -> bool {
        self.flushes.is_empty() && self.compactions.is_empty()
    }
}

pub struct WorkerPool {
    thread_handles: Mutex<Vec<WorkerHandle>>,
    /// The workers' kernel thread ids, each pushed by the worker as it starts (Courier's:
    /// `Database::worker_thread_ids`, so that the application can set their priority).
    pub(crate) thread_ids: Arc<Mutex<Vec<i32>>>,
    /// Flushes, memtable rotations and closing.
    pub(crate) rx: flume::Receiver<WorkerMessage>,
    /// Compactions.
    pub(crate) compact_rx: flume::Receiver<WorkerMessage>,
    pub(crate) sender: WorkerMessager,
}

impl WorkerPool {
    /// `pool_size`: the workers `start` will be given.
    pub fn prepare(pool_size: usize) -> Self {
        let (flushes, rx) = flume::bounded(1_000);
        let (compactions, compact_rx) = flume::bounded(1_000);

        Self {
            thread_handles: Mutex::default(),
            thread_ids: Arc::default(),
            rx,
            compact_rx,
            sender: WorkerMessager {
                flushes,
                compactions,
                compactions_apart: pool_size > 1,
            },
        }
    }

    /// Drops every queued message.
    pub(crate) fn drain(&self) {
        let _ = self.rx.drain().count();
        let _ = self.compact_rx.drain().count();
    }

    pub fn start(
        &self,
        pool_size: usize,
        supervisor: &Supervisor,
        stats: &Arc<Stats>,
        poison_dart: &PoisonDart,
        thread_counter: &Arc<AtomicUsize>,
    ) -> crate::Result<()> {
        log::debug!("Starting worker pool with {pool_size} threads");

        let thread_handles = claim_and_spawn(pool_size, thread_counter, |i| {
            std::thread::Builder::new()
                .name("fjall:worker".to_string())
                .spawn({
                    log::trace!("Starting fjall worker thread #{i}");

                    let worker_state = WorkerState {
                        pool_size,
                        worker_id: i,
                        rx: self.rx.clone(),
                        compact_rx: self.compact_rx.clone(),
                        supervisor: supervisor.clone(),
                        stats: stats.clone(),
                        sender: self.sender.clone(),
                    };

                    let thread_counter = thread_counter.clone();
                    let poison_dart = poison_dart.clone();
                    let thread_ids = self.thread_ids.clone();

                    move || {
                        #[allow(unsafe_code)]
                        // SAFETY: gettid takes nothing and returns the calling thread's id.
                        let tid = unsafe { libc::gettid() };
                        if let Ok(mut ids) = thread_ids.lock() {
                            ids.push(tid);
                        }

                        // The counter must drop on *every* way out of this
                        // thread, not just the graceful one: `Database::drop`
                        // spins on it (`while counter > 0`), so a worker that
                        // returns an error or unwinds would keep the database
                        // closing forever.
                        let _counter_guard = ActiveThreadGuard(thread_counter);

                        loop {
                            match worker_tick(&worker_state) {
                                Ok(should_abort) => {
                                    if should_abort {
                                        log::debug!("Worker #{i} closes because DB is dropping");
                                        return Ok(());
                                    }
                                }
                                Err(e) => {
                                    log::error!("Worker #{i} crashed: {e:?}");
                                    poison_dart.poison();
                                    return Err(e);
                                }
                            }
                        }
                    }
                })
        })?;

        *self.thread_handles.lock().expect("lock is poisoned") = thread_handles;

        Ok(())
    }
}

/// Claims one slot in the active thread counter per worker, immediately before
/// that worker is spawned, and hands the slot straight back if the spawn fails.
///
/// Claiming the whole pool up front would leak the slots of the workers that failed
/// spawn never reaches: nothing ever decrements them, because those threads do
/// not exist, and `DatabaseInner::drop` waits for the counter to reach zero.
///
/// The spawn is a parameter so the failure path can be tested without having to
/// exhaust the operating system's thread limit.
fn claim_and_spawn<H, S: FnMut(usize) -> std::io::Result<H>>(
    pool_size: usize,
    thread_counter: &Arc<AtomicUsize>,
    mut spawn: S,
) -> std::io::Result<Vec<H>> {
    (0..pool_size)
        .map(|i| {
            thread_counter.fetch_add(1, Relaxed);

            spawn(i).inspect_err(|_| {
                thread_counter.fetch_sub(1, Relaxed);
            })
        })
        .collect()
}

/// Decrements the pool's active thread counter when a worker thread leaves,
/// whatever the reason: graceful close, error return or unwinding panic.
///
/// `DatabaseInner::drop` waits for this counter to reach zero, so a leaked
/// increment makes closing the database hang forever.
struct ActiveThreadGuard(Arc<AtomicUsize>);

impl Drop for ActiveThreadGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

struct WorkerState {
    pool_size: usize,
    worker_id: usize,
    supervisor: Supervisor,
    rx: flume::Receiver<WorkerMessage>,
    compact_rx: flume::Receiver<WorkerMessage>,
    sender: WorkerMessager,
    stats: Arc<Stats>,
}

impl WorkerState {
    /// Whether compactions have a queue of their own: the messager's routing decides, so
    /// that what is sent and what is taken cannot disagree.
    fn compactions_apart(&self) -> bool {
        self.sender.compactions_apart
    }

    /// The next task. Worker 0 of several takes only flushes and memtable rotations, the
    /// others only compactions; a lone worker takes everything from the one queue.
    fn recv(&self) -> Option<WorkerMessage> {
        if self.compactions_apart() && self.worker_id > 0 {
            self.compact_rx.recv().ok()
        } else {
            self.rx.recv().ok()
        }
    }

    /// Workers that compact.
    fn compactors(&self) -> usize {
        if self.compactions_apart() {
            self.pool_size - 1
        } else {
            1
        }
    }
}

/// Frees the retired memtables nothing else refers to any more, outside every lock (Courier's
/// change, vendor/README.md).
fn free_retired_memtables(supervisor: &Supervisor) {
    let unused: Vec<_> = {
        let Ok(mut retired) = supervisor.retired_memtables.lock() else {
            return;
        };
        let (unused, used) = std::mem::take(&mut *retired)
            .into_iter()
            .partition(|memtable| Arc::strong_count(memtable) == 1);
        *retired = used;
        unused
    };
    drop(unused);
}

/// How long a flush of a keyspace with one sealed memtable waits for a second (Courier's
/// change, vendor/README.md). A flush merges all of a keyspace's sealed memtables, dropping
/// what a later one overwrote or deleted: a message and the delete that acknowledged it,
/// written milliseconds apart, often land in consecutive memtables. A lone worker gets that
/// merge for free, since memtables seal while it compacts; a flusher of its own flushed each
/// one alone, and wrote a quarter more to disk and to compactions in a sustained loop.
const FLUSH_GATHER: std::time::Duration = std::time::Duration::from_millis(100);
const FLUSH_GATHER_STEP: std::time::Duration = std::time::Duration::from_millis(5);

/// Waits, at most `FLUSH_GATHER`, until `task`'s keyspace has two sealed memtables to flush
/// together, unless another flush is queued behind it.
fn gather_sealed_memtables(task: &crate::flush::Task, supervisor: &Supervisor) {
    let deadline = std::time::Instant::now() + FLUSH_GATHER;
    while task.keyspace.tree.sealed_memtable_count() == 1
        && supervisor.flush_manager.len() == 0
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(FLUSH_GATHER_STEP);
    }
}

fn worker_tick(ctx: &WorkerState) -> crate::Result<bool> {
    free_retired_memtables(&ctx.supervisor);

    let Some(item) = ctx.recv() else {
        return Ok(true);
    };

    log::trace!("Worker #{} got message: {item:?}", ctx.worker_id);

    match item {
        WorkerMessage::Close => {
            return Ok(true);
        }
        WorkerMessage::RotateMemtable(keyspace, memtable_id) => {
            log::trace!("acquiring journal lock");
            let journal_writer = keyspace.supervisor.journal.get_writer()?;
            // The flush its rotation queued is taken here, not told by a message to this
            // worker's own queue (Courier's change, vendor/README.md): rotation requests, one
            // per write past the memtable's size, can fill that queue, and the message then
            // waited for room that only this worker makes.
            if keyspace.inner_rotate_memtable(journal_writer, memtable_id, false)? {
                flush_next(ctx)?;
            }
        }
        WorkerMessage::Flush => flush_next(ctx)?,
        WorkerMessage::Compact(keyspace) => {
            // Worker 0 of several never takes one (`WorkerState::recv`): it keeps flushing.
            run_compaction(&keyspace, &ctx.supervisor.snapshot_tracker, &ctx.stats)?;
        }
    }

    Ok(false)
}

/// Flushes the next queued flush task, if any.
fn flush_next(ctx: &WorkerState) -> crate::Result<()> {
    let Some(task) = ctx.supervisor.flush_manager.dequeue() else {
        return Ok(());
    };

    {
        log::trace!("acquiring journal lock to maybe rotate journal");
        let mut journal_writer = ctx.supervisor.journal.get_writer()?;

        if journal_writer.pos()? > 64_000_000 {
            #[expect(clippy::expect_used)]
            let mut journal_manager = ctx
                .supervisor
                .journal_manager
                .write()
                .expect("lock is poisoned");

            let seqno_map = {
                #[expect(clippy::expect_used)]
                let keyspaces = ctx.supervisor.keyspaces.write().expect("lock is poisoned");

                ctx.supervisor.build_seqno_map(&keyspaces)
            };

            journal_manager.rotate_journal(&mut journal_writer, seqno_map)?;

            if journal_manager.disk_space_used()
                >= ctx.supervisor.db_config.max_journaling_size_in_bytes
            {
                let stragglers =
                    journal_manager.get_keyspaces_to_flush_for_oldest_journal_eviction();

                for keyspace in stragglers {
                    log::info!(
                        "Rotating {:?} to try to reduce journal size",
                        keyspace.name,
                    );
                    keyspace.request_rotation();
                }
            }
        } else {
            // https://github.com/fjall-rs/fjall/issues/329
            journal_writer.persist(crate::PersistMode::SyncAll)?;
        }
    }

    if ctx.compactions_apart() {
        gather_sealed_memtables(&task, &ctx.supervisor);
    }

    run_flush(
        &task,
        &ctx.supervisor.write_buffer_size,
        &ctx.supervisor.snapshot_tracker,
        &ctx.stats,
    )?;

    for _ in 0..ctx.compactors() {
        ctx.sender
            .try_send(WorkerMessage::Compact(task.keyspace.clone()))
            .ok();
    }

    ctx.supervisor
        .journal_manager
        .write()
        .expect("lock is poisoned")
        .maintenance()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AbstractTree, Database, KeyspaceCreateOptions};
    use test_log::test;

    // https://github.com/fjall-rs/fjall/pull/303
    #[test]
    fn keyspace_compact_after_startup() -> crate::Result<()> {
        let folder = tempfile::tempdir()?;

        {
            let db = Database::builder(&folder).open()?;

            let ks = db.keyspace("default", KeyspaceCreateOptions::default)?;

            ks.insert("a", "a")?;
            ks.rotate_memtable_and_wait()?;

            ks.insert("a", "a")?;
            ks.rotate_memtable_and_wait()?;

            ks.insert("a", "a")?;
            ks.rotate_memtable_and_wait()?;

            assert!(ks.tree.l0_run_count() > 0);
        }

        {
            let db = Database::builder(&folder)
                .worker_threads_unchecked(0)
                .open()?;

            assert_eq!(
                1,
                db.worker_pool.rx.len(),
                "worker message should be enqueued on startup",
            );
            let item = db.worker_pool.rx.try_recv().expect("should get message");
            assert!(
                matches!(item, WorkerMessage::Compact(_)),
                "worker message should be compaction request",
            );
        }

        Ok(())
    }

    /// With two workers, worker 0 takes the flushes and worker 1 the compactions, so a flush
    /// never waits behind a compaction (upstream's worker 0 put each compaction back on the
    /// shared queue and took it again, spinning); closing reaches both.
    #[test]
    fn worker_zero_of_two_flushes_and_leaves_compactions_to_the_others() -> crate::Result<()> {
        let folder = tempfile::tempdir()?;
        let db = Database::builder(&folder)
            .worker_threads_unchecked(0)
            .open()?;
        let ks = db.keyspace("default", KeyspaceCreateOptions::default)?;
        let pool = WorkerPool::prepare(2);
        let state = |worker_id| WorkerState {
            pool_size: 2,
            worker_id,
            supervisor: db.supervisor.clone(),
            rx: pool.rx.clone(),
            compact_rx: pool.compact_rx.clone(),
            sender: pool.sender.clone(),
            stats: db.stats.clone(),
        };

        pool.sender.send(WorkerMessage::Compact(ks.clone())).ok();
        pool.sender.send(WorkerMessage::Flush).ok();
        assert!(matches!(state(0).recv(), Some(WorkerMessage::Flush)));
        assert!(pool.rx.is_empty(), "worker 0 met no compaction");
        assert!(matches!(state(1).recv(), Some(WorkerMessage::Compact(_))));

        pool.sender.try_send_close();
        assert!(matches!(state(0).recv(), Some(WorkerMessage::Close)));
        assert!(matches!(state(1).recv(), Some(WorkerMessage::Close)));
        assert_eq!(2, state(1).compactors() + 1);

        let lone = WorkerPool::prepare(1);
        lone.sender.send(WorkerMessage::Compact(ks.clone())).ok();
        assert_eq!(1, lone.rx.len(), "a lone worker's one queue");
        Ok(())
    }

    /// Every worker that is actually spawned holds exactly one slot.
    #[test]
    fn claim_and_spawn_claims_one_slot_per_worker() {
        let counter = Arc::new(AtomicUsize::new(0));

        let handles = claim_and_spawn(3, &counter, |i| Ok::<_, std::io::Error>(i))
            .expect("all spawns succeed");

        assert_eq!(handles, vec![0, 1, 2]);
        assert_eq!(counter.load(Relaxed), 3);
    }

    /// A failed spawn releases its own slot and never claims one for the workers
    /// it did not get to. `DatabaseInner::drop` spins until the counter reaches
    /// zero, so a slot held by a thread that does not exist hangs the close
    /// forever.
    #[test]
    fn claim_and_spawn_counts_live_workers_only() {
        let counter = Arc::new(AtomicUsize::new(0));

        let result = claim_and_spawn(4, &counter, |i| {
            if i == 2 {
                Err(std::io::Error::other("cannot spawn thread"))
            } else {
                Ok(i)
            }
        });

        assert!(result.is_err());
        assert_eq!(
            counter.load(Relaxed),
            2,
            "only the two workers that started should hold a slot",
        );
    }

    /// A worker leaving normally releases its slot in the counter.
    #[test]
    fn active_thread_guard_decrements_on_scope_exit() {
        let counter = Arc::new(AtomicUsize::new(1));
        {
            let _guard = ActiveThreadGuard(counter.clone());
            assert_eq!(counter.load(Relaxed), 1);
        }
        assert_eq!(counter.load(Relaxed), 0);
    }

    /// A worker that returns an error releases its slot too: `Database::drop`
    /// spins until the counter reaches zero, so a leaked slot would hang the
    /// close forever.
    #[test]
    fn active_thread_guard_decrements_on_early_return() {
        let counter = Arc::new(AtomicUsize::new(1));

        fn failing_worker(counter: Arc<AtomicUsize>) -> Result<(), ()> {
            let _guard = ActiveThreadGuard(counter);
            Err(())
        }

        assert!(failing_worker(counter.clone()).is_err());
        assert_eq!(counter.load(Relaxed), 0);
    }

    /// A panicking worker releases its slot as well.
    #[test]
    fn active_thread_guard_decrements_on_panic() {
        let counter = Arc::new(AtomicUsize::new(1));
        let counter_in_thread = counter.clone();

        let outcome = std::thread::spawn(move || {
            let _guard = ActiveThreadGuard(counter_in_thread);
            panic!("worker crashed");
        })
        .join();

        assert!(outcome.is_err());
        assert_eq!(counter.load(Relaxed), 0);
    }
}
