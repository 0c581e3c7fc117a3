//! The embedded default store: fjall 3, one `fdatasync` per commit.
//!
//! One writer at a time: a transaction holds the store's lock from `begin` to `commit`, reads
//! the latest committed state, and commits its writes as one fjall write batch persisted with
//! `PersistMode::SyncData` before `commit` returns (decision 0041). Readers (`begin_read`) take
//! no lock: they read a fjall snapshot, so a sync never waits for a commit's fsync. A failed
//! write or fsync poisons the fjall database; every later call then fails with
//! [`StoreError::Poisoned`] until the process reopens the store and recovers from the journal.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use fjall::AbstractTree as _;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable, Snapshot};

use super::dedupe_filter::DedupeFilter;
use super::overlay::{self, Bytes, Engine, Overlay};
use super::worker_priority::{self, BackgroundPriority, Backlog, WorkerPriority};
use super::{CommitVersion, Store, StoreError};
use crate::keys;

/// Key tags that get a fjall keyspace of their own (see [`crate::keys`]); every other key
/// goes to the `misc` keyspace. Separate keyspaces keep each memtable small and let messages,
/// counters and dedupe records flush and compact on their own schedules. Sorted.
const PARTITIONED_TAGS: [u8; 4] = [
    keys::TAG_COUNTER,
    keys::TAG_DEDUPE,
    keys::TAG_EXPIRY,
    keys::TAG_MESSAGE,
];
const MISC_KEYSPACE: &str = "misc";
/// The longest an erase pass waits for a keyspace's memtables to reach tables.
const FLUSH_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(60);
/// Major compactions an erase pass tries per keyspace while lsm-tree skips them.
const COMPACTION_ATTEMPTS_MAX: usize = 5;
/// How long an erase pass waits for reads open across its compactions to end, so that the
/// tables those reads keep (deleted values in them) can go; past it, the next pass collects.
const GARBAGE_WAIT_MAX: std::time::Duration = std::time::Duration::from_millis(500);

/// How a commit reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `fsync` of the journal before `commit` returns: also the file's timestamps, which on a
    /// journaling file system commits the file system's journal whenever they changed.
    SyncAll,
    /// `fdatasync` of the journal before `commit` returns: the data and whatever metadata
    /// reading it back needs (blocks allocated, a new size), not the timestamps. The default
    /// (decision 0041); equally durable, since fjall's recovery reads no timestamp.
    SyncData,
}

/// Options of the embedded store.
#[derive(Debug, Clone)]
pub struct FjallOptions {
    pub durability: Durability,
    /// Block cache bytes.
    pub cache_bytes: u64,
    /// fjall's background threads for flushes and compactions. With two or more, one only
    /// flushes and the others only compact, so a flush never waits behind a compaction
    /// (decision 0040, vendor/README.md); with one, it does both. 0 only in tests: nothing
    /// is ever flushed, and writes halt once a keyspace has four sealed memtables.
    pub worker_threads: usize,
    /// Bytes of the in-memory write buffer before it is flushed to a table. Smaller keeps
    /// memtable lookups (a skiplist) shallow; larger means fewer flushes.
    pub memtable_bytes_max: u64,
    /// Bytes of journal kept before fjall flushes the memtables that pin the oldest journal.
    /// A restart replays the journal, so this bounds recovery time (fjall's minimum: 64 MiB).
    pub journal_bytes_max: u64,
    /// After this many bytes written, every keyspace's memtable is sealed and flushed (but for
    /// a keyspace that has a sealed memtable waiting already: it is sealed next time), so no
    /// slowly written keyspace keeps old journals alive: a restart replays about this much,
    /// at most about twice.
    pub flush_every_bytes: u64,
    /// Memory for the filter that answers most dedupe-record lookups without a read (decision
    /// 0018). The current and the previous dedupe bucket (a day each by default) get half of
    /// it each, at the bucket's first write (decision 0030): 16 MiB answers ~99.9% of lookups
    /// up to ~3.3 million sends per shard and day, ~99% at ~6 million, ~60% at ~20 million,
    /// past which the bucket's lookups read the store. Below 64 KiB: off.
    pub dedupe_filter_bytes_max: usize,
    /// Dedupe records an open loads into the filter, from the highest bucket and the one
    /// before it (loading 65,536 added 25–50 ms to an open here). With more, lookups in those
    /// two buckets read the store until time has moved two buckets on.
    pub dedupe_filter_warm_keys_max: usize,
    /// Sorted runs level 0 collects before fjall merges them into level 1 (its
    /// `l0_threshold`, 4 by default; 0 counts as 1). Each merge rewrites the level 1 tables
    /// the runs overlap. Like the filters below, fixed when a keyspace is created: fjall
    /// keeps a keyspace's options with it.
    pub level0_runs_max: u8,
    /// `level0_runs_max` of the dedupe records' keyspace. Its records are written once under
    /// keys spread over the whole bucket, so every merge of level 0 rewrites all of level 1:
    /// merging sixteen runs at a time instead of four does a quarter of the merges (a fifth
    /// less edge CPU in a sustained loop with two workers, decision 0040). Its lookups are
    /// rare (the dedupe filter answers most).
    pub dedupe_level0_runs_max: u8,
    /// Filters in partitions, of which a lookup reads one, instead of one filter per table.
    /// A full filter is about 1.25 bytes per key, over a megabyte for a 64 MiB table, and a
    /// lookup the block cache cannot serve reads it whole and checksums it: for a store
    /// whose tables outgrow its cache (the log store's dedupe tier, decision 0029).
    pub filters_partitioned: bool,
    /// Write the journal around the page cache (`O_DIRECT`) where the file system allows it:
    /// a commit sends the disk the 512-byte blocks its batch touches instead of the 4 KiB
    /// pages around them (decision 0033, vendor/README.md). The journal's bytes and recovery
    /// are the same either way.
    pub direct_journal_writes: bool,
    /// fjall's background workers at `SCHED_IDLE` while they keep up, at normal priority
    /// once memtables or level-0 tables pile up (decision 0039, `store::worker_priority`).
    /// Only where the process may take a thread back from `SCHED_IDLE`
    /// (`worker_priority::idle_priority_reversible`); otherwise ignored.
    pub workers_idle_unless_behind: bool,
}

impl Default for FjallOptions {
    fn default() -> FjallOptions {
        FjallOptions {
            durability: Durability::SyncData,
            cache_bytes: 64 * 1024 * 1024,
            worker_threads: 2,
            memtable_bytes_max: 8 * 1024 * 1024,
            // Small keyspaces (counters, devices, the clock) fill their memtables slowly and
            // would pin old journals up to fjall's default of 512 MiB: five seconds of replay.
            journal_bytes_max: 64 * 1024 * 1024,
            flush_every_bytes: 16 * 1024 * 1024,
            dedupe_filter_bytes_max: 16 * 1024 * 1024,
            dedupe_filter_warm_keys_max: 65_536,
            level0_runs_max: 4,
            dedupe_level0_runs_max: 16,
            filters_partitioned: false,
            direct_journal_writes: true,
            workers_idle_unless_behind: false,
        }
    }
}

/// The fjall-backed store in one directory.
pub struct FjallStore {
    path: PathBuf,
    db: Database,
    /// One keyspace per entry of `PARTITIONED_TAGS`, in the same order.
    tagged: Vec<Keyspace>,
    misc: Keyspace,
    persist_mode: PersistMode,
    /// The single-writer lock.
    writer: Mutex<Writer>,
    flush_every_bytes: u64,
    /// Bytes written since every memtable was last sealed (only the writer touches it).
    written_since_flush: std::sync::atomic::AtomicU64,
    /// Per keyspace (`tagged`, then `misc`): something was deleted since the last erase pass.
    deleted_since_erase: Vec<std::sync::atomic::AtomicBool>,
    /// Anything was written since the last erase pass.
    written_since_erase: std::sync::atomic::AtomicBool,
    /// The background workers' priority, when `workers_idle_unless_behind` applies.
    worker_priority: Option<WorkerPriority>,
    /// Per keyspace (`tagged`, then `misc`): the level-0 runs at which fjall merges level 0
    /// into level 1.
    level0_runs_max: Vec<usize>,
}

/// The level-0 runs at which fjall merges `keyspace`'s level 0 into level 1, as the keyspace
/// was created (fjall's default, 4, if it does not say).
fn level0_runs_max_of(keyspace: &Keyspace) -> usize {
    keyspace
        .config
        .compaction_strategy
        .get_config()
        .into_iter()
        .find(|(key, _)| &key[..] == b"leveled_l0_threshold")
        .and_then(|(_, value)| value.first().copied())
        .map_or(4, usize::from)
}

/// The dedupe filter of a store just opened (`DedupeFilter::opened`).
fn open_dedupe_filter(
    keyspace: &Keyspace,
    bytes_max: usize,
    warm_keys_max: usize,
) -> Result<DedupeFilter, StoreError> {
    DedupeFilter::opened(
        bytes_max,
        warm_keys_max,
        || {
            keyspace
                .last_key_value()
                .map(|highest| highest.key().map_err(io_error))
                .transpose()
        },
        |start, take| {
            keyspace
                .range(start.to_vec()..)
                .take(take)
                .map(|guard| guard.key().map_err(io_error))
                .collect()
        },
    )
}

/// What the writer lock guards.
#[derive(Debug)]
struct Writer {
    version: CommitVersion,
    /// Every write goes through a write transaction's `apply`, which notes it here first.
    dedupe_filter: DedupeFilter,
}

/// What one [`FjallStore::erase_deleted`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EraseReport {
    /// Keyspaces whose tables were rewritten without their deleted keys.
    pub keyspaces_compacted: usize,
    /// Bytes the store used on disk before and after the pass.
    pub disk_bytes_before: u64,
    pub disk_bytes_after: u64,
    /// Everything deleted before the pass started is in no file of the store: the pass left
    /// nothing to the next one (no keyspace whose rewrite lsm-tree skipped, no tables a read
    /// still held).
    pub complete: bool,
}

impl std::fmt::Debug for FjallStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FjallStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn io_error(error: fjall::Error) -> StoreError {
    match error {
        fjall::Error::Poisoned => StoreError::Poisoned,
        // The OS's sentence ("No space left on device (os error 28)"), not fjall's debug dump.
        fjall::Error::Io(io) => StoreError::Io(io.to_string()),
        fjall::Error::Storage(fjall::LsmError::Io(io)) => StoreError::Io(io.to_string()),
        other => StoreError::Io(other.to_string()),
    }
}

impl FjallStore {
    /// Opens the store in `path`, creating it if needed, and recovers committed data.
    pub fn open(path: &Path, options: &FjallOptions) -> Result<FjallStore, StoreError> {
        // What fjall's recovery reads is what the disk holds, not pages a failed sync left
        // behind.
        super::drop_cached_pages(path);
        FjallStore::open_cache_dropped(path, options)
    }

    /// [`FjallStore::open`] for a caller that dropped the page cache of `path` already (the
    /// log store, whose directory holds its dedupe tier).
    pub(crate) fn open_cache_dropped(
        path: &Path,
        options: &FjallOptions,
    ) -> Result<FjallStore, StoreError> {
        let db = Database::builder(path)
            .cache_size(options.cache_bytes)
            .worker_threads_unchecked(options.worker_threads)
            .max_journaling_size(options.journal_bytes_max.max(64 * 1024 * 1024))
            .journal_direct_writes(options.direct_journal_writes)
            .open()
            .map_err(|error| {
                StoreError::Io(format!("cannot open store at {}: {error}", path.display()))
            })?;
        let open_keyspace = |name: &str, level0_runs_max: u8| {
            db.keyspace(name, || {
                let create = KeyspaceCreateOptions::default()
                    .max_memtable_size(options.memtable_bytes_max)
                    .compaction_strategy(std::sync::Arc::new(
                        fjall::compaction::Leveled::default()
                            .with_l0_threshold(level0_runs_max.max(1)),
                    ));
                if options.filters_partitioned {
                    create.filter_block_partitioning_policy(fjall::config::PartitioningPolicy::all(
                        true,
                    ))
                } else {
                    create
                }
            })
            .map_err(io_error)
        };
        let tagged = PARTITIONED_TAGS
            .iter()
            .map(|tag| {
                let level0_runs_max = if *tag == keys::TAG_DEDUPE {
                    options.dedupe_level0_runs_max
                } else {
                    options.level0_runs_max
                };
                open_keyspace(&format!("tag-{}", *tag as char), level0_runs_max)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let misc = open_keyspace(MISC_KEYSPACE, options.level0_runs_max)?;
        // What each keyspace was created with: fjall keeps a keyspace's options, so a store
        // created before a default changed keeps its own.
        let level0_runs_max = tagged
            .iter()
            .chain(std::iter::once(&misc))
            .map(level0_runs_max_of)
            .collect();
        let dedupe_filter = open_dedupe_filter(
            &tagged[FjallStore::keyspace_index(&[keys::TAG_DEDUPE])],
            options.dedupe_filter_bytes_max,
            options.dedupe_filter_warm_keys_max,
        )?;
        let persist_mode = match options.durability {
            Durability::SyncAll => PersistMode::SyncAll,
            Durability::SyncData => PersistMode::SyncData,
        };
        Ok(FjallStore {
            path: path.to_path_buf(),
            db,
            tagged,
            misc,
            persist_mode,
            writer: Mutex::new(Writer {
                version: 0,
                dedupe_filter,
            }),
            flush_every_bytes: options.flush_every_bytes.max(1024 * 1024),
            written_since_flush: std::sync::atomic::AtomicU64::new(0),
            // Nothing on disk says what the last process deleted since its last pass (a delete
            // then a restart, or a reopen after a failure): the first pass erases everything.
            deleted_since_erase: (0..=PARTITIONED_TAGS.len())
                .map(|_| std::sync::atomic::AtomicBool::new(true))
                .collect(),
            written_since_erase: std::sync::atomic::AtomicBool::new(true),
            worker_priority: (options.workers_idle_unless_behind
                && worker_priority::idle_priority_reversible())
            .then(|| WorkerPriority::new(options.worker_threads.max(1))),
            level0_runs_max,
        })
    }

    /// Sealed memtables waiting for fjall's worker to free them (vendor/README.md): they go
    /// once flushed and no version refers to them.
    #[doc(hidden)]
    pub fn retired_memtables(&self) -> usize {
        self.db.retired_memtable_count()
    }

    /// fjall's background workers' priority (decision 0039): `None` unless
    /// `workers_idle_unless_behind` applies.
    pub fn background_priority(&self) -> Option<BackgroundPriority> {
        self.worker_priority.as_ref().map(WorkerPriority::status)
    }

    /// The most sealed memtables and level-0 tables past their mark of any keyspace: how far
    /// the background workers are behind.
    fn backlog(&self) -> Backlog {
        self.keyspaces().zip(&self.level0_runs_max).fold(
            Backlog::default(),
            |most, (keyspace, runs_max)| Backlog {
                sealed_memtables_max: most
                    .sealed_memtables_max
                    .max(keyspace.sealed_memtable_count()),
                level0_tables_over_max: most.level0_tables_over_max.max(
                    worker_priority::level0_tables_over(keyspace.l0_table_count(), *runs_max),
                ),
            },
        )
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a failed write or fsync poisoned the database: every call fails with
    /// `Poisoned` until it is opened again. Never blocks.
    pub fn is_poisoned(&self) -> bool {
        self.db.is_poisoned()
    }

    fn keyspace_of(&self, key: &[u8]) -> &Keyspace {
        self.keyspace_at(Self::keyspace_index(key))
    }

    /// The position of a key's keyspace: in `tagged`, or `tagged.len()` for `misc`.
    fn keyspace_index(key: &[u8]) -> usize {
        key.first()
            .and_then(|tag| PARTITIONED_TAGS.binary_search(tag).ok())
            .unwrap_or(PARTITIONED_TAGS.len())
    }

    fn keyspace_at(&self, index: usize) -> &Keyspace {
        self.tagged.get(index).unwrap_or(&self.misc)
    }

    /// Every keyspace, in `keyspace_at` order.
    fn keyspaces(&self) -> impl Iterator<Item = &Keyspace> {
        self.tagged.iter().chain(std::iter::once(&self.misc))
    }

    /// Rewrites every table of `keyspace` into the last level, which drops deleted keys and
    /// their tombstones. The major compaction takes the keyspace's compaction lock for writing,
    /// so it waits for the keyspace's background compactions and none starts during it; as a
    /// fail-safe lsm-tree skips it when a table is still held by one. It worked when none of
    /// the tables from before it is left (tables flushed meanwhile hold later writes only).
    /// Returns false if it kept being skipped: the next pass tries again. The caller brings
    /// fjall's garbage-collection mark past the pass's deletes first
    /// (`garbage_mark_reaches`).
    ///
    /// (Until the fifty-fifth session this judged by the database's compaction counters, so
    /// any other keyspace's compaction during it counted as an overlap: under constant writes
    /// the dedupe keyspace's rewrite was never counted done, and no pass was complete.)
    fn compact_fully(&self, keyspace: &Keyspace) -> Result<bool, StoreError> {
        use fjall::AbstractTree;
        let table_ids = || -> std::collections::HashSet<u64> {
            let version = keyspace.tree.current_version();
            version.iter_tables().map(|table| table.id()).collect()
        };
        for _ in 0..COMPACTION_ATTEMPTS_MAX {
            let before = table_ids();
            keyspace.major_compact().map_err(io_error)?;
            let after = table_ids();
            if before.is_disjoint(&after) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Message keys in the store, from fjall's metadata (no read): deleted keys count until a
    /// compaction drops them.
    pub fn message_keys_approximate(&self) -> u64 {
        let index = PARTITIONED_TAGS
            .binary_search(&crate::keys::TAG_MESSAGE)
            .expect("messages have a keyspace");
        self.tagged[index].approximate_len() as u64
    }

    /// Bytes of the store's journals and tables as fjall counts them (a journal file at its
    /// preallocated length, not the blocks it uses).
    pub fn disk_bytes(&self) -> Result<u64, StoreError> {
        self.db.disk_space().map_err(io_error)
    }

    /// Makes what was deleted physically gone from disk, and disk use fall with it.
    ///
    /// A delete in an LSM store writes a tombstone; the old value stays in the journal until
    /// the journal is dropped, and in tables until a compaction merges it with its tombstone
    /// at the last level. This pass seals the journal, flushes every memtable, deletes the
    /// sealed journals (fjall patch, vendor/README.md), and rewrites the tables of every
    /// keyspace that had deletions into one run, which drops deleted keys with their
    /// tombstones. Everything deleted before the pass started is then in no file of the store.
    ///
    /// Its cost is a flush plus rewriting the live data of the keyspaces with deletions
    /// (undelivered messages, dedupe records): run it every few minutes, not per commit. It
    /// runs beside commits (fjall serialises what needs it) and does nothing if nothing was
    /// written since the last pass.
    pub fn erase_deleted(&self) -> Result<EraseReport, StoreError> {
        self.erase_deleted_then(|| {})
    }

    /// [`erase_deleted`](FjallStore::erase_deleted), calling `after_flush` once the pass has
    /// flushed the memtables and before it compacts: where a commit racing the pass lands in
    /// the tests (`core/tests/fjall_erase.rs`).
    #[doc(hidden)]
    pub fn erase_deleted_then(
        &self,
        after_flush: impl FnOnce(),
    ) -> Result<EraseReport, StoreError> {
        use std::sync::atomic::Ordering;
        let disk_bytes_before = self.disk_bytes()?;
        // The pass waits for the workers' flushes and compactions.
        let _workers_normal = self
            .worker_priority
            .as_ref()
            .map(WorkerPriority::hold_normal);
        if !self.written_since_erase.swap(false, Ordering::AcqRel) {
            return Ok(EraseReport {
                keyspaces_compacted: 0,
                disk_bytes_before,
                disk_bytes_after: disk_bytes_before,
                complete: true,
            });
        }
        // Which keyspaces had deletes, taken before the flush below: a delete counted here
        // committed before it, so its tombstone reaches the tables this pass compacts. (Taken
        // after the flush, a delete committed in between was counted here while its tombstone
        // stayed in the memtable, and the next pass, seeing no delete, never compacted it
        // away: the deleted value stayed in a table.) A delete after this goes to the next pass.
        let deleted: Vec<bool> = self
            .deleted_since_erase
            .iter()
            .map(|deleted| deleted.swap(false, Ordering::AcqRel))
            .collect();
        // Every delete counted above has a lower sequence number.
        let deletes_before = self.db.seqno();
        let mut compacted = vec![false; deleted.len()];
        let pass = || -> Result<bool, StoreError> {
            let sealed = self.db.seal_journal().map_err(io_error)?;
            for keyspace in self.keyspaces() {
                self.flush_memtables(keyspace)?;
            }
            // Deletes the journal sealed above, and any before it: everything in them is now
            // in tables. (fjall's own check, each keyspace's highest seqno in tables against
            // the journal's, can keep it for good: a compaction that drops the newest
            // tombstones with the values they deleted lowers that seqno below the mark.)
            let flushed: Vec<&Keyspace> = self.keyspaces().collect();
            let journals_gone = self
                .db
                .delete_journals_through(&sealed, &flushed)
                .map_err(io_error)?;
            after_flush();
            // A compaction drops a value its tombstone shadows only below fjall's
            // garbage-collection mark, which moves only when garbage is collected. Left as the
            // last memtable rotation set it while a read was open, a rewrite kept the deleted
            // value after the read had ended, and the pass counted it done. The mark only
            // rises: brought past the deletes once, it holds for every rewrite below. Below
            // them (a read from before a delete still open), nothing is rewritten and the next
            // pass tries again.
            if self.garbage_mark_reaches(deletes_before)? {
                for (index, _) in deleted.iter().enumerate().filter(|(_, deleted)| **deleted) {
                    // false: lsm-tree kept skipping ours (a table still held by a background
                    // compaction); the next pass tries again.
                    compacted[index] = self.compact_fully(self.keyspace_at(index))?;
                }
            }
            // The compactions' input tables hold the deleted values until their files go.
            Ok(self.collect_garbage_waiting()? && journals_gone)
        };
        let result = pass();
        // Tables a read still kept: the next pass compacts and collects again, even with
        // nothing written meanwhile (else it would skip, and the values stay on disk). It
        // compacts again too: a read open from before a delete (not one of Courier's, which
        // last a page) would have kept the value in the compaction's output as well.
        let collected = matches!(result, Ok(true));
        // What this pass did not finish (a failure part-way, a skipped rewrite, tables
        // a read kept) is the next pass's to do.
        let mut keyspaces_compacted = 0;
        let mut complete = true;
        for (index, was_deleted) in deleted.iter().enumerate() {
            if !was_deleted {
                continue;
            }
            if collected && compacted[index] {
                keyspaces_compacted += 1;
            } else {
                complete = false;
                self.deleted_since_erase[index].store(true, Ordering::Release);
                self.written_since_erase.store(true, Ordering::Release);
            }
        }
        if result.is_err() {
            self.written_since_erase.store(true, Ordering::Release);
        }
        result?;
        Ok(EraseReport {
            keyspaces_compacted,
            disk_bytes_before,
            disk_bytes_after: self.disk_bytes()?,
            complete,
        })
    }

    /// Collects garbage until fjall's garbage-collection mark reaches `seqno` (no read open
    /// from before it is left), or `GARBAGE_WAIT_MAX` has passed: whether it did.
    fn garbage_mark_reaches(&self, seqno: u64) -> Result<bool, StoreError> {
        let deadline = std::time::Instant::now() + GARBAGE_WAIT_MAX;
        loop {
            self.db.collect_garbage().map_err(io_error)?;
            if self.db.seqno_safe_to_gc() >= seqno {
                return Ok(true);
            }
            if std::time::Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Deletes the files of tables no current version uses. A read open across a change (a
    /// catch-up's snapshot) keeps the version before it, and the tables that version uses,
    /// until it ends: reads are short, so this waits for them, up to `GARBAGE_WAIT_MAX`.
    /// Returns whether every keyspace is down to its current version.
    fn collect_garbage_waiting(&self) -> Result<bool, StoreError> {
        let deadline = std::time::Instant::now() + GARBAGE_WAIT_MAX;
        loop {
            if self.db.collect_garbage().map_err(io_error)? {
                return Ok(true);
            }
            if std::time::Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Seals `keyspace`'s memtable and waits until none of its sealed memtables waits for a
    /// flush: an earlier one too, which fjall's own wait skips when the active memtable is
    /// empty (its tombstones would then miss the compaction that follows). Gives up when the
    /// database failed (its flush worker has stopped: the wait would never end, holding the
    /// maintenance lane and with it the store's reopen) or after `FLUSH_WAIT_MAX`.
    fn flush_memtables(&self, keyspace: &Keyspace) -> Result<(), StoreError> {
        keyspace.rotate_memtable().map_err(io_error)?;
        let deadline = std::time::Instant::now() + FLUSH_WAIT_MAX;
        while keyspace.sealed_memtable_count() > 0 {
            if self.db.is_poisoned() {
                return Err(StoreError::Poisoned);
            }
            if std::time::Instant::now() >= deadline {
                return Err(StoreError::Io(format!(
                    "a memtable flush did not finish within {} s: is the disk stalled?",
                    FLUSH_WAIT_MAX.as_secs()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(())
    }

    /// Splits `[begin, end)` into pieces that each lie in one keyspace, in key order.
    fn segments(&self, begin: &[u8], end: &[u8]) -> Vec<(&Keyspace, Vec<u8>, Vec<u8>)> {
        let mut segments = Vec::new();
        let mut cursor = begin.to_vec();
        while cursor.as_slice() < end {
            let (keyspace, boundary) = match cursor.first() {
                Some(tag) if PARTITIONED_TAGS.contains(tag) => {
                    (self.keyspace_of(&cursor), vec![tag + 1])
                }
                _ => {
                    // Misc keys run up to the next partitioned tag.
                    let next = PARTITIONED_TAGS
                        .iter()
                        .find(|tag| [**tag].as_slice() > cursor.as_slice());
                    (
                        &self.misc,
                        next.map(|tag| vec![*tag]).unwrap_or_else(|| end.to_vec()),
                    )
                }
            };
            let segment_end = if boundary.as_slice() < end {
                boundary
            } else {
                end.to_vec()
            };
            segments.push((keyspace, cursor, segment_end.clone()));
            cursor = segment_end;
        }
        segments
    }
}

/// A transaction on a [`FjallStore`]; it holds the writer lock.
pub struct FjallTransaction<'a> {
    overlay: Overlay<FjallEngine<'a>>,
}

impl std::fmt::Debug for FjallTransaction<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FjallTransaction")
    }
}

struct FjallEngine<'a> {
    store: &'a FjallStore,
    access: Access<'a>,
}

/// How a transaction reads: under the writer lock (it may commit), or from a snapshot.
enum Access<'a> {
    Write(MutexGuard<'a, Writer>),
    Read(Snapshot),
}

impl std::fmt::Debug for FjallEngine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FjallEngine")
    }
}

impl Engine for FjallEngine<'_> {
    fn prefetch(&self, key: &[u8]) {
        if let Access::Write(writer) = &self.access {
            writer.dedupe_filter.prefetch(key);
        }
    }

    fn read(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let keyspace = self.store.keyspace_of(key);
        let value = match &self.access {
            Access::Write(writer) if writer.dedupe_filter.is_absent(key) => return Ok(None),
            Access::Write(_) => keyspace.get(key),
            Access::Read(snapshot) => snapshot.get(keyspace, key),
        }
        .map_err(io_error)?;
        Ok(value.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        begin: &[u8],
        end: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        for (keyspace, segment_begin, segment_end) in self.store.segments(begin, end) {
            let range = match &self.access {
                Access::Write(_) => keyspace.range(segment_begin..segment_end),
                Access::Read(snapshot) => snapshot.range(keyspace, segment_begin..segment_end),
            };
            for guard in range {
                let (key, value) = guard.into_inner().map_err(io_error)?;
                if !visit(&key, &value) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, changes: Vec<(Bytes, Option<Bytes>)>) -> Result<CommitVersion, StoreError> {
        let Access::Write(writer) = &mut self.access else {
            if changes.is_empty() {
                return Ok(0);
            }
            return Err(StoreError::Io(
                "a read-only transaction cannot commit writes: this is a bug".into(),
            ));
        };
        self.store
            .write_batch(changes, Some(self.store.persist_mode), |key| {
                writer.dedupe_filter.note_written(key)
            })?;
        writer.version += 1;
        Ok(writer.version)
    }
}

impl FjallStore {
    /// Writes `changes` (`None` deletes) as one fjall batch persisted with `durability`
    /// (`None`: left in fjall's journal buffer), calling `on_set` with each key it sets.
    /// Nothing happens for no changes.
    fn write_batch<K, V>(
        &self,
        changes: impl IntoIterator<Item = (K, Option<V>)>,
        durability: Option<PersistMode>,
        mut on_set: impl FnMut(&[u8]),
    ) -> Result<(), StoreError>
    where
        K: AsRef<[u8]> + Into<fjall::Slice>,
        V: AsRef<[u8]> + Into<fjall::Slice>,
    {
        let mut changes = changes.into_iter().peekable();
        if changes.peek().is_none() {
            return Ok(());
        }
        let mut batch = self.db.batch().durability(durability);
        let mut bytes = 0u64;
        let mut deleted_in = [false; PARTITIONED_TAGS.len() + 1];
        for (key, value) in changes {
            let index = FjallStore::keyspace_index(key.as_ref());
            let keyspace = self.keyspace_at(index);
            bytes += (key.as_ref().len() + value.as_ref().map_or(0, |v| v.as_ref().len())) as u64;
            match value {
                Some(value) => {
                    on_set(key.as_ref());
                    batch.insert(keyspace, key, value)
                }
                None => {
                    deleted_in[index] = true;
                    batch.remove(keyspace, key)
                }
            }
        }
        batch.commit().map_err(io_error)?;
        self.note_written(bytes, &deleted_in);
        Ok(())
    }

    /// Counts bytes written and, every `flush_every_bytes`, seals every keyspace's memtable so
    /// fjall flushes it. Counters, device records and the clock are written a few bytes at a
    /// time and would otherwise pin the journal until it reaches `journal_bytes_max`.
    fn note_written(&self, bytes: u64, deleted_in: &[bool]) {
        use std::sync::atomic::Ordering;
        // The deletes first, then "written": an erase pass running beside this takes
        // "written" first and the deletes after. In the other order a pass could take
        // "written" between the two, then find no delete; this delete's flag set after it,
        // every later pass stopped at "nothing written", and the deleted body stayed on disk
        // until some other write came. In this order either the pass sees the delete, or
        // "written" is set again after its swap and the next pass sees both.
        for (flag, deleted) in self.deleted_since_erase.iter().zip(deleted_in) {
            if *deleted {
                flag.store(true, Ordering::Release);
            }
        }
        self.written_since_erase.store(true, Ordering::Release);
        let total = self.written_since_flush.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if total >= self.flush_every_bytes {
            self.written_since_flush.store(0, Ordering::Relaxed);
            for keyspace in self.keyspaces() {
                // A keyspace with a sealed memtable still waiting sealed itself since the last
                // round (its active memtable is younger than this round's bytes), or its flushes
                // are behind: sealing its active memtable too made two sealed memtables at once
                // whenever a keyspace filled its memtable just before a round, and at a pace that
                // put the workers at normal priority for a flush of both (decision 0040). It is
                // sealed at the next round; a restart replays at most about two rounds.
                if keyspace.sealed_memtable_count() > 0 {
                    continue;
                }
                // Best effort: a memtable that cannot be sealed now is sealed by fjall later.
                // (The memtables this frees are freed by fjall's worker: vendor/README.md.)
                let _ = keyspace.rotate_memtable();
            }
        }
        if let Some(priority) = &self.worker_priority {
            priority.after_commit(
                std::time::Instant::now(),
                || self.db.worker_thread_ids(),
                || self.backlog(),
            );
        }
    }
}

/// The log store's dedupe tier (`store::log`, decision 0023): reads of the latest state and
/// writes that are not synced, because the log store's own journal holds them durably first and
/// is replayed here after a crash. The log store calls [`FjallStore::persist`] before it drops
/// a journal, and serialises these calls with its own lock.
impl FjallStore {
    pub(crate) fn read_latest(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let value = self.keyspace_of(key).get(key).map_err(io_error)?;
        Ok(value.map(|v| v.to_vec()))
    }

    /// Calls `visit` for each pair in `[begin, end)` in order until it returns false.
    pub(crate) fn scan_latest(
        &self,
        begin: &[u8],
        end: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<bool, StoreError> {
        for (keyspace, segment_begin, segment_end) in self.segments(begin, end) {
            for guard in keyspace.range(segment_begin..segment_end) {
                let (key, value) = guard.into_inner().map_err(io_error)?;
                if !visit(&key, &value) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Writes `changes` (`None` deletes) as one batch into fjall's journal buffer (written out
    /// as it fills), not synced.
    pub(crate) fn write_unsynced<'a>(
        &self,
        changes: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    ) -> Result<(), StoreError> {
        self.write_batch(changes, None, |_| {})
    }

    /// The highest key in `[begin, end)`, which must lie in one keyspace.
    pub(crate) fn highest_key_in(
        &self,
        begin: &[u8],
        end: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.keyspace_of(begin)
            .range(begin.to_vec()..end.to_vec())
            .next_back()
            .map(|guard| guard.key().map(|key| key.to_vec()).map_err(io_error))
            .transpose()
    }

    /// Writes `pairs` (in ascending key order, all in one keyspace) straight into new tables
    /// with fjall's ingestion: no memtable, no journal, one sequential write, durable (tables
    /// and version fsynced) when it returns. The pairs are newer than every write before: a
    /// delete written earlier of a key among them no longer hides it.
    pub(crate) fn ingest_sorted<K: AsRef<[u8]>, V: Into<fjall::Slice>>(
        &self,
        pairs: impl Iterator<Item = (K, V)>,
    ) -> Result<(), StoreError> {
        let mut pairs = pairs.peekable();
        let Some((first, _)) = pairs.peek() else {
            return Ok(());
        };
        let index = FjallStore::keyspace_index(first.as_ref());
        let mut ingestion = self
            .keyspace_at(index)
            .start_ingestion()
            .map_err(io_error)?;
        let mut previous: Option<Vec<u8>> = None;
        for (key, value) in pairs {
            let key = key.as_ref();
            // fjall panics on keys out of order; a caller's bug should be an error instead.
            if FjallStore::keyspace_index(key) != index
                || previous.as_deref().is_some_and(|p| p >= key)
            {
                return Err(StoreError::Io(
                    "an ingestion's keys must ascend within one keyspace: this is a bug".into(),
                ));
            }
            // A value that is a `Slice` already (the log store's) goes in without a copy.
            ingestion.write(key, value).map_err(io_error)?;
            let previous = previous.get_or_insert_with(Vec::new);
            previous.clear();
            previous.extend_from_slice(key);
        }
        ingestion.finish().map_err(io_error)
    }

    /// Makes every write so far durable (`fsync` of fjall's journal).
    pub(crate) fn persist(&self) -> Result<(), StoreError> {
        self.db.persist(PersistMode::SyncAll).map_err(io_error)
    }
}

impl Store for FjallStore {
    type Transaction<'a> = FjallTransaction<'a>;

    fn begin(&self) -> Result<FjallTransaction<'_>, StoreError> {
        // A panic in another writer cannot leave a half-applied batch (fjall batches are
        // atomic), so a poisoned mutex is safe to reuse.
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(FjallTransaction {
            overlay: Overlay::new(FjallEngine {
                store: self,
                access: Access::Write(writer),
            }),
        })
    }

    fn begin_read(&self) -> Result<FjallTransaction<'_>, StoreError> {
        Ok(FjallTransaction {
            overlay: Overlay::new(FjallEngine {
                store: self,
                access: Access::Read(self.db.snapshot()),
            }),
        })
    }

    fn drops_tables(&self) -> bool {
        true
    }

    fn drop_tables_within(&self, begin: &[u8], end: &[u8]) -> Result<(), StoreError> {
        // Only within one tag's keyspace, which holds that tag's keys alone.
        let index = Self::keyspace_index(begin);
        let same_keyspace = !begin.is_empty() && end.first() == begin.first();
        if index == PARTITIONED_TAGS.len() || !same_keyspace || begin >= end {
            return Ok(());
        }
        if self.db.is_poisoned() {
            return Err(StoreError::Poisoned);
        }
        self.keyspace_at(index)
            .tree
            .drop_range::<&[u8], _>(begin..end)
            .map_err(|error| io_error(error.into()))
    }
}

overlay::overlay_transaction!(FjallTransaction<'_>);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, Transaction};

    /// A store opened with the defaults, as the edge opens it, syncs each commit's journal
    /// bytes with `fdatasync` (decision 0041); one asked for `SyncAll` keeps it.
    #[test]
    fn commits_sync_the_journals_data_unless_asked_for_more() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FjallStore::open(dir.path(), &FjallOptions::default()).expect("open");
        assert_eq!(store.persist_mode, PersistMode::SyncData);
        drop(store);
        let options = FjallOptions {
            durability: Durability::SyncAll,
            ..FjallOptions::default()
        };
        let store = FjallStore::open(dir.path(), &options).expect("reopen");
        assert_eq!(store.persist_mode, PersistMode::SyncAll);
    }

    /// A new store's dedupe keyspace merges level 0 at `dedupe_level0_runs_max` runs and the
    /// others at `level0_runs_max`; a store created with other values keeps them when it is
    /// opened with new defaults, and the backlog counts from what each keyspace has.
    #[test]
    fn each_keyspace_keeps_the_level0_mark_it_was_created_with() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dedupe = FjallStore::keyspace_index(&[keys::TAG_DEDUPE]);
        let message = FjallStore::keyspace_index(&[keys::TAG_MESSAGE]);
        {
            let store = FjallStore::open(dir.path(), &FjallOptions::default()).expect("open");
            assert_eq!(store.level0_runs_max[dedupe], 16);
            assert_eq!(store.level0_runs_max[message], 4);
            assert_eq!(store.level0_runs_max.len(), PARTITIONED_TAGS.len() + 1);
        }
        let other = tempfile::tempdir().expect("tempdir");
        let created = FjallOptions {
            level0_runs_max: 6,
            dedupe_level0_runs_max: 5,
            ..FjallOptions::default()
        };
        drop(FjallStore::open(other.path(), &created).expect("create"));
        let store = FjallStore::open(other.path(), &FjallOptions::default()).expect("reopen");
        assert_eq!(store.level0_runs_max[dedupe], 5);
        assert_eq!(store.level0_runs_max[message], 6);
    }

    /// The periodic seal (every `flush_every_bytes` written) leaves alone a keyspace whose
    /// sealed memtable still waits for its flush: sealing its active memtable too made two at
    /// once, which stalled a sustained loop (decision 0040). Without workers nothing is
    /// flushed, so the sealed memtables stay where the rounds left them.
    #[test]
    fn the_periodic_seal_leaves_a_keyspace_with_a_sealed_memtable_waiting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = FjallOptions {
            worker_threads: 0,
            flush_every_bytes: 1024 * 1024,
            ..FjallOptions::default()
        };
        let store = FjallStore::open(dir.path(), &options).expect("open");
        let message = FjallStore::keyspace_index(&[keys::TAG_MESSAGE]);
        let body = vec![7u8; 16 * 1024];
        // Three rounds' worth of writes, all to the message keyspace.
        for seq in 0..3 * 64 + 8 {
            let mut txn = store.begin().expect("begin");
            txn.set(&keys::message(1, seq), &body);
            txn.commit().expect("commit");
        }
        assert_eq!(
            store.keyspace_at(message).sealed_memtable_count(),
            1,
            "sealed once, then left alone while that one waits"
        );
    }
}
