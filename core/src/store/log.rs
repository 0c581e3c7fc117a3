//! The log store: every live key in memory, every commit appended to a journal.
//!
//! Chat messages live for milliseconds: written, delivered, acknowledged, deleted. In fjall
//! (an LSM tree) each of those writes is a memtable insert, and flushes and compactions then
//! rewrite what is mostly already deleted. This store keeps the live keys in an ordered map
//! and appends each commit to a journal file, fsynced before `commit` returns (durable before
//! acknowledged). Deleting is dropping the key from the map; the journal that held it is
//! deleted whole at the next checkpoint (decision 0023).
//!
//! Files in the store's directory:
//! - `journal-{id}`: commits in order, each one record (below). New ones get higher ids. A
//!   journal is a segment zero-filled in advance (`journal_segment_bytes`): records overwrite
//!   zeros, so an fdatasync need not persist a new file size. Records go to a segment around
//!   the page cache where the file system allows it, as the blocks they touch
//!   (`fjall::direct_journal`, decision 0032); the file's bytes are the same either way.
//! - `journal-spare-{n}.tmp`: the next segment, being or already zero-filled by the background
//!   thread; the writer renames it to the next journal id when its segment is full.
//! - `snapshot-{id}`: every live pair, taken while journal `id` was the current one. Recovery
//!   loads the newest snapshot and replays the journals from `id` on: a commit is a list of
//!   plain sets and deletes, so replaying one the snapshot already holds changes nothing, and
//!   the snapshot may be taken while commits go on (a fuzzy checkpoint). It ends with an
//!   empty record (version 4), so one cut at a record's boundary is refused.
//! - `snapshot-{id}.tmp`: a snapshot being written; recovery deletes it.
//! - `FORMAT`: names this layout, so an engine never opens another's directory.
//! - `dedupe/`: the dedupe tier (below), a fjall store.
//!
//! Dedupe records (one per send, kept for the dedupe window, a day by default, and read only
//! when a send is retried) would make memory grow with a day of sends instead of with what is
//! undelivered. They move to the dedupe tier instead: a commit's journal record holds them like
//! any change, and memory holds them in a map of their own until it reaches
//! `dedupe_memory_bytes_max` or a checkpoint comes. Then the background thread takes that map
//! whole (readers still find it there) and writes it into the tier as new sorted tables, in
//! one sequential write (fjall's ingestion) instead of one memtable insert per send. A
//! deleted dedupe record's tombstone goes to the tier at once, and again after a move that ran
//! meanwhile (its tables are newer than the first tombstone). A checkpoint moves the records
//! and syncs the tier's tombstones before it writes its snapshot, which leaves dedupe records
//! out, so a journal is deleted only once the tier holds its dedupe records durably; recovery
//! replays the journals into memory and the tombstones into the tier. Every other key stays in
//! memory.
//!
//! A record is `[u32 LE payload bytes][u64 LE checksum][payload]`: xxh3 of the payload,
//! seeded with the store's salt (`Salt`: a body cannot hold a record that checks), whose low
//! 24 bits are a keyed hash of the length instead (`Codec`: a candidate record in a torn
//! record's bytes is told from a real one without hashing its payload); a payload is a
//! `u32 LE` count of changes, each `[u8 kind (1 set, 2 delete)][u16 LE key bytes][key]` and,
//! for a set, `[u32 LE value bytes][value]`. A crash can leave a torn record at the end of the
//! newest journal only (each commit is fsynced before the next is written), with only zeros
//! after it: recovery cuts it off, and gives back a segment's unused zeros. A bad record with
//! data after it is corruption, reported as such.
//!
//! Checkpoints run on their own thread when the journals since the last one pass
//! `journal_bytes_max` (and at least the live data's size), and on [`LogStore::erase_deleted`].
//! They bound how much deleted data a restart replays and how long a deleted value stays on
//! disk. A restart still reads everything live (about 60 MB/s here): its time grows with the
//! backlog, where fjall's does not (docs/benchmarks.md).
//!
//! Readers (`begin_read`) hold the map's read lock for their transaction, a consistent
//! snapshot. A commit reaches the map only after its journal record is fsynced, so a reader
//! never sees a commit that is not yet durable, and never waits for an fsync.
//!
//! A commit from [`Store::begin_unsynced`] returns once its record is written, before the
//! fsync (decision 0027): it waits as the *pending* commit, whose changes the next write
//! transaction reads in front of the map, until [`Store::sync_through`] (or the next commit)
//! fsyncs the journal and moves them into the map. A commit first makes the one before it
//! durable, so at most one record is ever unsynced, and a crash tears at most the last one.

use std::collections::BTreeSet;
use std::collections::hash_map::Entry;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use super::dedupe_filter::DedupeFilter;
use super::dedupe_records::DedupeRecords;
use super::fjall::{FjallOptions, FjallStore};
use super::key_map::{MapKey, MediumKey};
use super::live_map::LiveMap;
use super::overlay::{self, Bytes, Engine, Overlay, WriteKey};
use super::{CommitVersion, Store, StoreError};
use crate::{FastHashMap, keys};
use fjall::direct_journal::DirectJournal;

/// The first line of `FORMAT`. Version 4 checks each record's length with a keyed hash in its
/// checksum ([`Codec`]); version 3 keys the records' checksums with the store's salt ([`Salt`],
/// on the lines after it); version 2 keeps dedupe records in the dedupe tier (`DEDUPE_DIR`).
/// A store of version 1 (every key in the map), 2 or 3 is upgraded when opened.
const FORMAT_HEADER: &str = "courier log store 4\n";
const FORMAT_V3: &str = "courier log store 3\n";
const FORMAT_V2: &str = "courier log store 2\n";
const FORMAT_V1: &str = "courier log store 1\n";
/// The dedupe tier: a fjall store, in this subdirectory, holding the dedupe records.
const DEDUPE_DIR: &str = "dedupe";
const FORMAT_FILE: &str = "FORMAT";
const JOURNAL_PREFIX: &str = "journal-";
const SNAPSHOT_PREFIX: &str = "snapshot-";
const TMP_SUFFIX: &str = ".tmp";
/// Spare journal segments are zero-filled as `journal-spare-{n}.tmp`: a `.tmp` name, so an
/// open deletes one a previous process left, and a new name each time, so the writer renames
/// exactly the file it was offered.
const SPARE_PREFIX: &str = "journal-spare-";
/// Zeros written per call while filling a segment, each chunk sent to the disk before the
/// next.
const ZERO_CHUNK_BYTES: usize = 1 << 20;
/// Records longer than this go through the page cache even with direct writes on, and the
/// direct writer goes on after them (`DirectJournal::wrote_elsewhere`): a direct write pays
/// where a record is small (at a pace, a message or a few), since the page cache would write
/// back a whole 4 KiB page for it; for a large one that rounding costs little, and a direct
/// write holds the writer until the device has the record, where a write to the page cache
/// is a copy and the fdatasync, on the syncer, sends it (measured: decision 0032's later
/// note). fjall's journal has the same rule (decision 0033).
const DIRECT_RECORD_BYTES_MAX: usize = 8 * 1024;
/// Header of a record: payload length and checksum.
const RECORD_HEADER_BYTES: usize = 4 + 8;
/// The largest record recovery accepts: larger is corruption, not a commit.
const RECORD_BYTES_MAX: usize = 1 << 30;
/// A journal file grows past this (or past its segment, if larger) only by a single record:
/// the commit after goes to a new file. Recovery reads each journal whole, beside the map it
/// rebuilds; without segments (`journal_segment_bytes = 0`), or with a spare segment that is
/// late or cannot be made, one journal grew until the next checkpoint, which waits for the
/// journals to pass the live data's size: a store holding 3 GiB needed about 3 GiB more to
/// restart.
const JOURNAL_FILE_BYTES_MAX: u64 = 64 << 20;
const KIND_SET: u8 = 1;
const KIND_DELETE: u8 = 2;
/// Replayed changes merged into the map at once, at least (`State::merge_replayed`), unless
/// their keys and values reach `REPLAY_RUN_BYTES_MAX` first.
const REPLAY_RUN_CHANGES_MIN: usize = 65_536;
/// Estimated bytes (`pair_bytes`) a run of replayed changes holds at most, values later
/// overwritten or deleted included: what a replay holds beyond the map.
const REPLAY_RUN_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Pairs a checkpoint copies per hold of the read lock: a commit waits at most for one chunk.
const CHECKPOINT_CHUNK_PAIRS: usize = 4096;
/// Key and value bytes a checkpoint copies per hold of the read lock, at most (one pair more
/// when a pair crosses it): 4,096 bodies of 64 KiB made one record of 256 MiB, held in memory
/// at the checkpoint and again at the restart that reads it, and a commit waited for its copy.
const CHECKPOINT_CHUNK_BYTES: usize = 4 << 20;
/// Map overhead counted per live pair (node or hash slots, key head, `Bytes` headers), for the
/// memory bound: an estimate, so the bound is approximate (a hash table growing holds two for
/// a moment).
const PAIR_OVERHEAD_BYTES: u64 = 96;

/// Options of the log store.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Journal bytes written since the last checkpoint that start a new one (when they also
    /// exceed the live data's size). Bounds recovery (a restart replays this much) and the
    /// disk used.
    pub journal_bytes_max: u64,
    /// Bytes of each journal segment, written with zeros before commits go to it: an
    /// fdatasync after overwriting zeros need not persist a new file size, which halved its
    /// time and CPU here (decision 0023). When a segment is full the writer moves to a spare
    /// one a background thread zero-filled. 0: journals grow by appending.
    pub journal_segment_bytes: u64,
    /// Memory the live pairs may take (estimated). A commit that would grow past it fails
    /// with an I/O error saying so; commits that shrink the store (acks, expiry) still pass.
    pub memory_bytes_max: u64,
    /// Memory for the dedupe filter (as `FjallOptions::dedupe_filter_bytes_max`; below
    /// 64 KiB: off).
    pub dedupe_filter_bytes_max: usize,
    /// Dedupe records an open loads into the filter, from the highest bucket and the one
    /// before it (as `FjallOptions::dedupe_filter_warm_keys_max`).
    pub dedupe_filter_warm_keys_max: usize,
    /// Memory the dedupe records written since the last move to the tier may take
    /// (estimated) before the background thread moves them, in one sorted write. A move also
    /// comes with every checkpoint. About twice this is held while a move runs. Not part of
    /// `memory_bytes_max`, which bounds what stays in memory until it is delivered.
    pub dedupe_memory_bytes_max: u64,
    /// Run the background work (spare segments, checkpoints, dedupe moves) on the store's own
    /// thread, as it becomes due. `false`: only when the owner calls
    /// [`LogStore::run_background_work`], at points of its choosing; the simulation does, so
    /// that a seed replays exactly (when a checkpoint ran decides what a power cut loses).
    pub background_thread: bool,
    /// Write records into zero-filled segments around the page cache (`O_DIRECT`), each as
    /// the few blocks it touches, where the file system allows it (`fjall::direct_journal`):
    /// at one message per commit, a quarter of the disk writes and less CPU than the 4 KiB
    /// page an fdatasync writes back otherwise. `false`, or a file system that refuses: the
    /// page cache.
    pub direct_writes: bool,
}

impl Default for LogOptions {
    fn default() -> LogOptions {
        LogOptions {
            journal_bytes_max: 64 * 1024 * 1024,
            journal_segment_bytes: 16 * 1024 * 1024,
            memory_bytes_max: 4 * 1024 * 1024 * 1024,
            dedupe_filter_bytes_max: 16 * 1024 * 1024,
            dedupe_filter_warm_keys_max: 65_536,
            dedupe_memory_bytes_max: 16 * 1024 * 1024,
            background_thread: true,
            direct_writes: true,
        }
    }
}

/// The committed state: what readers see.
#[derive(Debug, Default)]
struct State {
    /// Every live key but the dedupe records.
    map: LiveMap,
    /// Estimated bytes of the live pairs of `map` (`pair_bytes`): what the memory bound counts.
    live_bytes: u64,
    /// Message keys (`q`) in `map`.
    message_keys: u64,
    /// Dedupe records committed since the last move to the tier. They move in one sorted
    /// ingestion when they reach `dedupe_memory_bytes_max` or at a checkpoint.
    dedupe_recent: DedupeRecords,
    /// Estimated bytes of `dedupe_recent`.
    dedupe_recent_bytes: u64,
    /// The records a move is ingesting into the tier, read-only meanwhile.
    dedupe_moving: Option<Arc<DedupeRecords>>,
    /// Estimated bytes of `dedupe_moving`.
    dedupe_moving_bytes: u64,
    /// Dedupe keys deleted while a move runs: deleted whatever `dedupe_moving` holds. The
    /// ingested tables are newer than the tombstones those deletes wrote to the tier, so the
    /// move writes their tombstones again once its tables are in.
    dedupe_deleted_while_moving: BTreeSet<Bytes>,
    /// Dedupe keys a commit deleted whose tombstones are not in the tier yet. The commit
    /// writes them after its changes reach memory (never under the map's lock, since a tier
    /// write can wait for an fsync), so until then memory says "deleted" and a reader never
    /// sees the tier's answer change under it.
    dedupe_tombstones_pending: BTreeSet<Bytes>,
    /// Only while the store opens: replayed changes of the map not merged into it yet, and
    /// their estimated bytes (`pair_bytes`).
    replayed: Vec<(WriteKey, Option<Bytes>)>,
    replayed_bytes: u64,
    /// Only while the store opens: replayed dedupe changes, and their estimated bytes.
    dedupe_replayed: Vec<(WriteKey, Option<Bytes>)>,
    dedupe_replayed_bytes: u64,
}

/// Sorts `changes` by key (not stably). A transaction hands them over in the order first
/// written, and comparing packed keys (numbers) instead of byte strings makes the sort
/// several times cheaper; a key too long to pack (none of Courier's) sorts them all by bytes.
fn sort_by_key_bytes(changes: &mut Vec<(Bytes, Option<Bytes>)>) {
    let Some(mut order) = changes
        .iter()
        .enumerate()
        .map(|(at, (key, _))| Some((MediumKey::new(key)?, at as u32)))
        .collect::<Option<Vec<_>>>()
    else {
        changes.sort_unstable_by(|a, b| a.0[..].cmp(&b.0[..]));
        return;
    };
    order.sort_unstable();
    let mut unsorted: Vec<Option<(Bytes, Option<Bytes>)>> = changes.drain(..).map(Some).collect();
    changes.extend(
        order
            .into_iter()
            .filter_map(|(_, at)| unsorted[at as usize].take()),
    );
}

/// Each key's last change, in key order: sorted stably, so a key's changes keep their order.
fn last_change_per_key(
    mut changes: Vec<(WriteKey, Option<Bytes>)>,
) -> Vec<(WriteKey, Option<Bytes>)> {
    changes.sort_by(|a, b| a.0.cmp(&b.0));
    // In place: of two neighbours with one key, the later (the one `dedup_by` drops) moves
    // into the kept slot.
    changes.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            std::mem::swap(later, kept);
        }
        same
    });
    changes
}

/// What the memory part of the state knows of a dedupe key.
enum DedupeInMemory {
    Value(Vec<u8>),
    Deleted,
    /// Not in memory: the tier has the answer.
    Unknown,
}

fn pair_bytes(key: &[u8], value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64 + PAIR_OVERHEAD_BYTES
}

/// Whether `key` lives in the dedupe tier.
fn is_dedupe(key: &[u8]) -> bool {
    key.first() == Some(&keys::TAG_DEDUPE)
}

/// The dedupe tier's keys: `[DEDUPE_BEGIN, DEDUPE_END)`.
const DEDUPE_BEGIN: &[u8] = &[keys::TAG_DEDUPE];
const DEDUPE_END: &[u8] = &[keys::TAG_DEDUPE + 1];

/// The dedupe tier's options: small caches (it is read only on retried sends and the false
/// positives of the writer's dedupe filter), no dedupe filter of its own (the log store's
/// writer keeps one), its tables' Bloom filters in partitions and sixteen runs in level 0
/// before a merge (decision 0029: its tables outgrow the cache, and every run spans the
/// bucket's whole key range).
fn dedupe_tier_options(direct_writes: bool) -> FjallOptions {
    FjallOptions {
        direct_journal_writes: direct_writes,
        cache_bytes: 8 * 1024 * 1024,
        worker_threads: 1,
        memtable_bytes_max: 8 * 1024 * 1024,
        dedupe_filter_bytes_max: 0,
        dedupe_filter_warm_keys_max: 0,
        level0_runs_max: 16,
        dedupe_level0_runs_max: 16,
        filters_partitioned: true,
        ..FjallOptions::default()
    }
}

/// What the writer lock guards.
#[derive(Debug)]
struct Writer {
    /// Shared with `Pending`, whose syncer fsyncs it.
    journal: Arc<File>,
    journal_id: u64,
    /// Where the next record goes in `journal`.
    journal_offset: u64,
    /// Bytes of `journal` zero-filled in advance (0: an appending journal).
    journal_capacity: u64,
    /// The same segment open for direct writes (`LogOptions::direct_writes`), until a record
    /// goes through the page cache instead because it did not fit or the kernel refused (a
    /// record past `DIRECT_RECORD_BYTES_MAX` goes through the page cache and keeps it).
    direct: Option<DirectJournal>,
    version: CommitVersion,
    /// The record being written, reused.
    record: Vec<u8>,
    /// Answers most dedupe lookups of a send without searching the map (decision 0018): a
    /// miss there is a search of the largest part of the map, about a sixth of a commit.
    dedupe_filter: DedupeFilter,
    /// This writer left its last commit pending (unsynced): until it syncs it, its reads look
    /// at the pending commit first. Only a hint: the syncer may have synced it meanwhile.
    left_pending: bool,
}

/// The log store in one directory.
pub struct LogStore {
    inner: Arc<Inner>,
    checkpointer: Option<std::thread::JoinHandle<()>>,
    recovery: LogRecovery,
}

/// What [`LogStore::open`] recovered, for the operator's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRecovery {
    /// Live keys in memory after recovery, dedupe records not counted.
    pub keys: u64,
    /// Recovery started from a snapshot (else from the journals alone).
    pub snapshot: bool,
    /// Bytes of journal replayed: bounded by `journal_bytes_max` plus the live size.
    pub journal_bytes: u64,
    /// Bytes of a torn last record cut off (a crash during a commit), usually 0.
    pub torn_bytes_cut: u64,
    /// Journals whose records recovery made durable before using them. A process that died
    /// between a commit's write and its sync left that record where the reopen reads it (the
    /// page cache, or the disk's volatile cache) but not durable: used unsynced, a reader or
    /// a retried send's dedupe lookup would see a commit a power cut could still take away.
    pub journals_synced: u64,
    /// Times the replay moved the dedupe records it had read to the tier, because they
    /// reached `dedupe_memory_bytes_max`.
    pub dedupe_moves: u64,
    /// Records go to the disk around the page cache (`LogOptions::direct_writes`, where the
    /// file system takes it).
    pub direct_writes: bool,
    pub elapsed: std::time::Duration,
}

/// A commit written to the journal and not yet known durable (at most one).
struct PendingCommit {
    version: CommitVersion,
    /// Its changes, in the order the transaction handed them over; sorted by key, one per
    /// key (`sorted`), once a writer's range asks. Reads walk them, then use `index`: a sort
    /// of every send batch cost more than its transaction's writes.
    changes: Vec<(Bytes, Option<Bytes>)>,
    sorted: bool,
    /// Reads answered by a walk over the unsorted changes (every commit reads the clock key
    /// back): past `PENDING_WALKS_MAX` reads go through `index`.
    walks: u32,
    /// Where each key is in the unsorted changes, built on the first read past the walks.
    index: Option<PendingIndex>,
    /// The index's hash of a key (`hash_pending_key`; tests force collisions).
    hash: fn(&[u8]) -> u64,
    /// Where its record is in the journal, and its length.
    record_at: u64,
    record_bytes: u64,
}

/// Where each key is in a pending commit's unsorted changes, by a hash of the key: built
/// without a copy of any key (a copy of one held on the heap, a dedupe record's, was an atomic
/// increment on the writer, and its drop another on the syncer). `None` when two keys share a
/// hash: reads walk instead.
type PendingIndex = Option<FastHashMap<u64, u32>>;

/// A pending commit's index of `changes` by `hash`.
fn index_changes(changes: &[(Bytes, Option<Bytes>)], hash: fn(&[u8]) -> u64) -> PendingIndex {
    let mut index = FastHashMap::default();
    index.reserve(changes.len());
    for (at, (key, _)) in changes.iter().enumerate() {
        match index.entry(hash(key)) {
            Entry::Vacant(slot) => {
                slot.insert(at as u32);
            }
            // The same key again (a repeated delete): either answers.
            Entry::Occupied(held) if changes[*held.get() as usize].0 == *key => {}
            Entry::Occupied(_) => return None,
        }
    }
    Some(index)
}

/// The hash a pending commit's index keeps of a key: keyed once per process, since keys are
/// chosen by senders (decision 0021).
fn hash_pending_key(key: &[u8]) -> u64 {
    static HASHER: std::sync::OnceLock<ahash::RandomState> = std::sync::OnceLock::new();
    std::hash::BuildHasher::hash_one(HASHER.get_or_init(ahash::RandomState::new), key)
}

/// What the syncer needs: the pending commit, and the journal it is in.
struct Pending {
    commit: Option<PendingCommit>,
    journal: Arc<File>,
}

impl PendingCommit {
    /// The pending value of `key`: `Some(None)` if the commit deletes it.
    fn get(&mut self, key: &[u8]) -> Option<Option<Bytes>> {
        let at = if self.sorted {
            self.changes
                .binary_search_by(|(changed, _)| changed[..].cmp(key))
                .ok()?
        } else if self.walks < PENDING_WALKS_MAX {
            self.walks += 1;
            // A key repeats only as deletes (overlapping cleared ranges): any one answers.
            self.changes
                .iter()
                .position(|(changed, _)| changed[..] == *key)?
        } else {
            let (changes, hash) = (&self.changes, self.hash);
            match self
                .index
                .get_or_insert_with(|| index_changes(changes, hash))
            {
                Some(index) => {
                    let at = *index.get(&hash(key))? as usize;
                    // Another key of the same hash, when `key` is not in the commit.
                    if changes[at].0[..] != *key {
                        return None;
                    }
                    at
                }
                None => changes
                    .iter()
                    .position(|(changed, _)| changed[..] == *key)?,
            }
        };
        Some(self.changes[at].1.clone())
    }

    /// The changes sorted by key, one per key.
    fn sorted_changes(&mut self) -> &[(Bytes, Option<Bytes>)] {
        if !self.sorted {
            // Positions change.
            self.index = None;
            sort_by_key_bytes(&mut self.changes);
            // Only cleared keys can repeat (overlapping ranges), all as deletes: keeping one
            // changes nothing.
            self.changes.dedup_by(|a, b| a.0 == b.0);
            self.sorted = true;
        }
        &self.changes
    }

    /// The changes in `[begin, end)`, in key order.
    fn range(&mut self, begin: &[u8], end: &[u8]) -> &[(Bytes, Option<Bytes>)] {
        let changes = self.sorted_changes();
        let from = changes.partition_point(|(key, _)| key[..] < *begin);
        let to = changes.partition_point(|(key, _)| key[..] < *end);
        &changes[from..to.max(from)]
    }
}

/// Reads of a pending commit answered by walking its unsorted changes before the commit
/// builds a hash index of them: a walk costs about a comparison per change, the index about
/// a hash and an insert per change.
const PENDING_WALKS_MAX: u32 = 8;

impl Pending {
    /// The pending value of `key`: `Some(None)` if the pending commit deletes it.
    fn get(&mut self, key: &[u8]) -> Option<Option<Bytes>> {
        self.commit.as_mut()?.get(key)
    }

    /// The pending changes in `[begin, end)`, in key order.
    fn range(&mut self, begin: &[u8], end: &[u8]) -> Vec<(Bytes, Option<Bytes>)> {
        let Some(commit) = &mut self.commit else {
            return Vec::new();
        };
        commit.range(begin, end).to_vec()
    }
}

struct Inner {
    dir: PathBuf,
    options: LogOptions,
    /// Keys the checksums of every record this process writes (`Salt`).
    salt: Salt,
    state: RwLock<State>,
    writer: Mutex<Writer>,
    /// Lock order: `pending` before `state`.
    pending: Mutex<Pending>,
    /// One fsync of the journal at a time (`sync_through`).
    sync_running: Mutex<()>,
    /// A write or fsync failed: what is on disk is unknown until the store is reopened.
    poisoned: AtomicBool,
    /// `State::live_bytes` after the last commit, readable without the lock.
    live_bytes_now: AtomicU64,
    /// `State::dedupe_memory_bytes` after the last commit or move, readable without the lock.
    dedupe_bytes_now: AtomicU64,
    /// Journal bytes written since the journal the last checkpoint started.
    journal_bytes_since_checkpoint: AtomicU64,
    /// Something was deleted since the last checkpoint started.
    deleted_since_checkpoint: AtomicBool,
    /// A zero-filled journal segment and its path, ready for the writer once the background
    /// thread has written and synced it.
    spare: Mutex<Option<(File, PathBuf)>>,
    /// Numbers the spare segments' names.
    spares_made: AtomicU64,
    /// One checkpoint at a time; the background thread waits on `checkpoint_wanted`.
    checkpoint_running: Mutex<()>,
    /// One move of dedupe records to the tier at a time (a checkpoint's included).
    dedupe_move_running: Mutex<()>,
    checkpoint_wanted: Mutex<CheckpointRequest>,
    checkpoint_signal: Condvar,
    /// The dedupe tier: every key tagged `keys::TAG_DEDUPE`, nothing else. Written by the
    /// writer (under the writer lock) just before it applies the rest of a commit to the map.
    dedupe: FjallStore,
    /// Held for the store's life: a second process opening the directory fails.
    _lock: File,
}

impl CheckpointRequest {
    /// What is wanted, `(checkpoint, spare, dedupe_move)`, cleared.
    fn take(&mut self) -> (bool, bool, bool) {
        (
            std::mem::take(&mut self.wanted),
            std::mem::take(&mut self.spare_wanted),
            std::mem::take(&mut self.dedupe_move_wanted),
        )
    }
}

#[derive(Debug, Default)]
struct CheckpointRequest {
    wanted: bool,
    /// The writer took the spare journal segment: zero-fill another.
    spare_wanted: bool,
    /// The recent dedupe records reached `dedupe_memory_bytes_max`: move them to the tier.
    dedupe_move_wanted: bool,
    closing: bool,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

/// What one [`LogStore::erase_deleted`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogEraseReport {
    /// A checkpoint ran (something was deleted since the last one).
    pub checkpointed: bool,
    pub disk_bytes_before: u64,
    pub disk_bytes_after: u64,
    /// Everything deleted before the pass started is in no file of the store (the dedupe
    /// tier's pass left nothing to the next one either).
    pub complete: bool,
}

fn io(context: impl std::fmt::Display, error: std::io::Error) -> StoreError {
    StoreError::Io(format!("{context}: {error}"))
}

fn file_name(prefix: &str, id: u64) -> String {
    format!("{prefix}{id:020}")
}

/// Ids of the files named `prefix{id}` in `dir`, sorted; `.tmp` files go to `tmp`.
fn list_ids(dir: &Path, prefix: &str, tmp: &mut Vec<PathBuf>) -> Result<Vec<u64>, StoreError> {
    let mut ids = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| io(format!("list {}", dir.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io(format!("list {}", dir.display()), e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        if rest.ends_with(TMP_SUFFIX) {
            tmp.push(entry.path());
        } else if let Ok(id) = rest.parse::<u64>() {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(format!("fsync directory {}", dir.display()), e))
}

/// How a file's record checksums are keyed (`FORMAT` version 3): xxh3 seeded with a random
/// number the store drew when it was created or upgraded, kept in `FORMAT`. A message body is
/// the sender's to choose: with an unkeyed checksum one could hold a whole record that checks,
/// and a crash's tear of the record around it would look like damage after the tear (recovery
/// refuses that), keeping the store shut. Without the seed no one can make a record that
/// checks. Files (journals, snapshots) with ids below `salted_from` were written before the
/// upgrade, unkeyed, and are read that way (xxh3 with seed 0 is xxh3 unseeded). Files from
/// `tagged_from` on (version 4) carry the length tag ([`Codec`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Salt {
    seed: u64,
    salted_from: u64,
    tagged_from: u64,
}

impl Salt {
    /// A store's files before version 3: all unkeyed.
    const NONE: Salt = Salt {
        seed: 0,
        salted_from: u64::MAX,
        tagged_from: u64::MAX,
    };

    /// A new salt for the files from `salted_from` on, which carry the length tag too.
    fn draw(salted_from: u64) -> Result<Salt, StoreError> {
        let mut seed = 0u64;
        while seed == 0 {
            let mut bytes = [0u8; 8];
            File::open("/dev/urandom")
                .and_then(|mut random| random.read_exact(&mut bytes))
                .map_err(|e| io("read /dev/urandom for the store's salt", e))?;
            seed = u64::from_le_bytes(bytes);
        }
        Ok(Salt {
            seed,
            salted_from,
            tagged_from: salted_from,
        })
    }

    /// How the records of file `id` are checked.
    fn codec_of(&self, id: u64) -> Codec {
        Codec {
            seed: if id >= self.salted_from { self.seed } else { 0 },
            tagged: id >= self.tagged_from,
        }
    }

    /// How the records of the files written from now on are checked: an open store writes
    /// only files from `tagged_from` on (commits go to a new journal after recovery).
    fn codec(&self) -> Codec {
        Codec {
            seed: self.seed,
            tagged: true,
        }
    }

    /// The whole `FORMAT` file of version 4.
    fn format(&self) -> String {
        format!(
            "{FORMAT_HEADER}salt {:016x}\nsalted_from {}\ntagged_from {}\n",
            self.seed, self.salted_from, self.tagged_from
        )
    }

    /// The salt a version 4 `FORMAT` file names, or a version 3 one (no file tagged);
    /// `None` if it is neither.
    fn parse(format: &str) -> Option<Salt> {
        let (body, tagged) = match format.strip_prefix(FORMAT_HEADER) {
            Some(body) => (body, true),
            None => (format.strip_prefix(FORMAT_V3)?, false),
        };
        let mut lines = body.lines();
        let seed = u64::from_str_radix(lines.next()?.strip_prefix("salt ")?, 16).ok()?;
        let salted_from = lines.next()?.strip_prefix("salted_from ")?.parse().ok()?;
        let tagged_from = if tagged {
            lines.next()?.strip_prefix("tagged_from ")?.parse().ok()?
        } else {
            u64::MAX
        };
        (lines.next().is_none() && seed != 0).then_some(Salt {
            seed,
            salted_from,
            tagged_from,
        })
    }
}

/// Bits of a tagged record's checksum that hash its length alone, keyed by the salt.
/// Recovery searches a torn record's bytes for a whole record after it, to tell a crash's
/// tear from damage, and every offset whose four bytes read as a length that fits is a
/// candidate. Without the tag each candidate's payload had to be hashed: a message body of
/// repeated large lengths (its sender's to choose) made every fourth offset a candidate of a
/// megabyte or more, the search gave up at its budget, and the store refused to open after an
/// ordinary crash. With it, one candidate in 16 million gets that far, and no sender can aim:
/// the key is the salt. The payload's own check keeps 40 bits.
const LENGTH_TAG_MASK: u64 = (1 << 24) - 1;

/// How a file's records are checked: the checksum's seed ([`Salt`]) and whether its low bits
/// are the length tag (`LENGTH_TAG_MASK`; files of version 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Codec {
    seed: u64,
    tagged: bool,
}

impl Codec {
    fn checksum(self, payload: &[u8]) -> u64 {
        let hash = xxhash_rust::xxh3::xxh3_64_with_seed(payload, self.seed);
        if self.tagged {
            (hash & !LENGTH_TAG_MASK) | self.length_tag(payload.len())
        } else {
            hash
        }
    }

    fn length_tag(self, payload_bytes: usize) -> u64 {
        // Another key than the payload's: the tag says nothing of the payload's hash.
        let key = self.seed.rotate_left(32) ^ 0x6c65_6e67_7468_7461;
        xxhash_rust::xxh3::xxh3_64_with_seed(&(payload_bytes as u32).to_le_bytes(), key)
            & LENGTH_TAG_MASK
    }

    /// Whether a header's checksum may belong to a record of this length, checked without
    /// reading the payload (always, for a file without tags).
    fn length_checks(self, payload_bytes: usize, checksum: u64) -> bool {
        !self.tagged || checksum & LENGTH_TAG_MASK == self.length_tag(payload_bytes)
    }

    /// Whether the payload's hash is the checksum's (its bits that are not the length tag,
    /// which `length_checks` checked).
    fn payload_checks(self, payload: &[u8], checksum: u64) -> bool {
        let hash = xxhash_rust::xxh3::xxh3_64_with_seed(payload, self.seed);
        let mask = if self.tagged {
            !LENGTH_TAG_MASK
        } else {
            u64::MAX
        };
        (hash ^ checksum) & mask == 0
    }
}

/// Appends one record holding `changes` to `out`, checked as `codec` says.
fn encode_record<'a>(
    out: &mut Vec<u8>,
    changes: impl ExactSizeIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    codec: Codec,
) {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER_BYTES]);
    out.extend_from_slice(&(changes.len() as u32).to_le_bytes());
    for (key, value) in changes {
        out.push(if value.is_some() {
            KIND_SET
        } else {
            KIND_DELETE
        });
        out.extend_from_slice(&(key.len() as u16).to_le_bytes());
        out.extend_from_slice(key);
        if let Some(value) = value {
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
            out.extend_from_slice(value);
        }
    }
    let payload_bytes = out.len() - start - RECORD_HEADER_BYTES;
    let checksum = codec.checksum(&out[start + RECORD_HEADER_BYTES..]);
    out[start..start + 4].copy_from_slice(&(payload_bytes as u32).to_le_bytes());
    out[start + 4..start + RECORD_HEADER_BYTES].copy_from_slice(&checksum.to_le_bytes());
}

/// A record that could not be read: the bytes end inside it, its checksum does not match, or
/// its payload is malformed. Recovery tells a tear from damage by what follows (`replay`).
#[derive(Debug, PartialEq, Eq)]
struct BadRecord;

/// The record at the start of `bytes`, checked as `codec` says: its changes and its length.
#[allow(clippy::type_complexity)]
fn decode_record(
    bytes: &[u8],
    codec: Codec,
) -> Result<(Vec<(&[u8], Option<&[u8]>)>, usize), BadRecord> {
    let header = bytes.get(..RECORD_HEADER_BYTES).ok_or(BadRecord)?;
    let payload_bytes = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    if payload_bytes > RECORD_BYTES_MAX {
        return Err(BadRecord);
    }
    let checksum = u64::from_le_bytes(header[4..].try_into().expect("8 bytes"));
    if !codec.length_checks(payload_bytes, checksum) {
        return Err(BadRecord);
    }
    let payload = bytes
        .get(RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + payload_bytes)
        .ok_or(BadRecord)?;
    if !codec.payload_checks(payload, checksum) {
        return Err(BadRecord);
    }
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], BadRecord> {
        let part = payload.get(at..at + n).ok_or(BadRecord)?;
        at += n;
        Ok(part)
    };
    let count = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
    let mut changes = Vec::with_capacity(count.min(payload_bytes));
    for _ in 0..count {
        let kind = take(1)?[0];
        let key_bytes = u16::from_le_bytes(take(2)?.try_into().expect("2 bytes")) as usize;
        let key = take(key_bytes)?;
        let value = match kind {
            KIND_SET => {
                let value_bytes = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
                Some(take(value_bytes as usize)?)
            }
            KIND_DELETE => None,
            _ => return Err(BadRecord),
        };
        changes.push((key, value));
    }
    if at != payload.len() {
        return Err(BadRecord);
    }
    Ok((changes, RECORD_HEADER_BYTES + payload_bytes))
}

impl State {
    fn set(&mut self, key: Bytes, value: Bytes) {
        let added = pair_bytes(&key, &value);
        let is_message = key.first() == Some(&keys::TAG_MESSAGE);
        let key_bytes = key.len();
        match self.map.insert(key, value) {
            Some(old) => {
                let removed = (key_bytes + old.len()) as u64 + PAIR_OVERHEAD_BYTES;
                self.live_bytes = (self.live_bytes + added).saturating_sub(removed);
            }
            None => {
                self.live_bytes += added;
                if is_message {
                    self.message_keys += 1;
                }
            }
        }
    }

    fn delete(&mut self, key: Bytes) {
        if let Some(value) = self.map.remove(&key) {
            self.live_bytes = self.live_bytes.saturating_sub(pair_bytes(&key, &value));
            if key.first() == Some(&keys::TAG_MESSAGE) {
                self.message_keys = self.message_keys.saturating_sub(1);
            }
        }
    }

    /// Replays one record's changes (at open): dedupe records at once, the map's changes into
    /// `replayed`, merged into the map in sorted runs.
    fn replay<'a>(&mut self, changes: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>) {
        for (key, value) in changes {
            let key = Bytes::from(key);
            let value = value.map(Bytes::from);
            if is_dedupe(&key) {
                self.dedupe_replayed_bytes += pair_bytes(&key, value.as_deref().unwrap_or(&[]));
                self.dedupe_replayed.push((WriteKey::new(key), value));
            } else {
                self.replayed_bytes += pair_bytes(&key, value.as_deref().unwrap_or(&[]));
                self.replayed.push((WriteKey::new(key), value));
            }
        }
        if self.replayed.len() >= REPLAY_RUN_CHANGES_MIN.max(self.map.len() / 4)
            || self.replayed_bytes >= REPLAY_RUN_BYTES_MAX
        {
            self.merge_replayed();
        }
    }

    /// Applies `replayed` to the map in key order: sorted stably (a key's changes keep their
    /// order), only each key's last change. Inserting a large backlog's keys one by one in
    /// journal order (inboxes at random) missed the cache at every level of the tree: 3.6 µs
    /// per key here, most of a restart; in key order each insert follows the path the last
    /// one warmed. A run holds a quarter of the map's keys (at least 65,536) or 64 MiB
    /// (estimated as the map's pairs are), whichever comes first: the replay's memory beyond
    /// the map.
    fn merge_replayed(&mut self) {
        if self.replayed.is_empty() {
            return;
        }
        self.replayed_bytes = 0;
        // In key order, consecutive inserts follow the path the last one warmed.
        for (key, change) in last_change_per_key(std::mem::take(&mut self.replayed)) {
            match change {
                Some(value) => {
                    self.map.insert(key.bytes, value);
                }
                None => {
                    self.map.remove(&key.bytes);
                }
            }
        }
    }

    /// Applies the replayed dedupe changes: each key's last one, in key order. Sets go into
    /// the tier as one ingestion (or, with `into_memory`, at the end of the replay, into
    /// `dedupe_recent`), then deletes become tombstones, newer than every table: a delete
    /// replayed after its record's set, in this run or an earlier one, hides it.
    fn move_replayed_dedupe(
        &mut self,
        tier: &FjallStore,
        into_memory: bool,
    ) -> Result<(), StoreError> {
        let last = last_change_per_key(std::mem::take(&mut self.dedupe_replayed));
        self.dedupe_replayed_bytes = 0;
        let (sets, deletes): (Vec<_>, Vec<_>) =
            last.into_iter().partition(|(_, value)| value.is_some());
        let sets = sets
            .into_iter()
            .filter_map(|(key, value)| Some((key, value?)));
        if into_memory {
            debug_assert!(self.dedupe_recent.is_empty(), "replay fills it only here");
            for (key, value) in sets {
                self.dedupe_recent_bytes += pair_bytes(&key.bytes, &value);
                self.dedupe_recent.insert(key.bytes, value);
            }
        } else {
            tier.ingest_sorted(sets.map(|(key, value)| (key.bytes, value)))?;
        }
        tier.write_unsynced(deletes.iter().map(|(key, _)| (&key.bytes[..], None)))
    }

    /// Ends a replay: the last runs applied, and the map's counts taken.
    fn finish_replay(&mut self, tier: &FjallStore) -> Result<(), StoreError> {
        self.move_replayed_dedupe(tier, true)?;
        self.merge_replayed();
        self.replayed = Vec::new();
        let (mut live_bytes, mut message_keys) = (0, 0);
        self.map
            .visit_range(Bound::Unbounded, Bound::Unbounded, &mut |key, value| {
                live_bytes += pair_bytes(key, value);
                if key.first() == Some(&keys::TAG_MESSAGE) {
                    message_keys += 1;
                }
                true
            });
        self.live_bytes = live_bytes;
        self.message_keys = message_keys;
        Ok(())
    }

    /// Sets a key of either kind.
    fn set_any(&mut self, key: Bytes, value: Bytes) {
        if is_dedupe(&key) {
            self.set_dedupe(key, value);
        } else {
            self.set(key, value);
        }
    }

    fn set_dedupe(&mut self, key: Bytes, value: Bytes) {
        if self.dedupe_moving.is_some() {
            self.dedupe_deleted_while_moving.remove(&key[..]);
        }
        let added = pair_bytes(&key, &value);
        let key_bytes = key.len();
        let removed = self.dedupe_recent.insert(key, value).map_or(0, |old| {
            (key_bytes + old.len()) as u64 + PAIR_OVERHEAD_BYTES
        });
        self.dedupe_recent_bytes = (self.dedupe_recent_bytes + added).saturating_sub(removed);
    }

    fn delete_dedupe(&mut self, key: Bytes) {
        if let Some(value) = self.dedupe_recent.remove(&key) {
            self.dedupe_recent_bytes = self
                .dedupe_recent_bytes
                .saturating_sub(pair_bytes(&key, &value));
        }
        if self.dedupe_moving.is_some() {
            self.dedupe_deleted_while_moving.insert(key);
        }
    }

    /// Estimated bytes of the dedupe records in memory, a move's included.
    fn dedupe_memory_bytes(&self) -> u64 {
        self.dedupe_recent_bytes + self.dedupe_moving_bytes
    }

    fn dedupe_in_memory(&self, key: &[u8]) -> DedupeInMemory {
        if let Some(value) = self.dedupe_recent.get(key) {
            return DedupeInMemory::Value(value.to_vec());
        }
        if self.dedupe_tombstones_pending.contains(key) {
            return DedupeInMemory::Deleted;
        }
        let Some(moving) = &self.dedupe_moving else {
            return DedupeInMemory::Unknown;
        };
        if self.dedupe_deleted_while_moving.contains(key) {
            return DedupeInMemory::Deleted;
        }
        match moving.get(key) {
            Some(value) => DedupeInMemory::Value(value.to_vec()),
            None => DedupeInMemory::Unknown,
        }
    }

    /// Visits the dedupe records in `[begin, end)` in key order, memory over the tier, until
    /// `visit` returns false (then returns false).
    fn scan_dedupe(
        &self,
        tier: &FjallStore,
        begin: &[u8],
        end: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<bool, StoreError> {
        let (lower, upper) = (Bound::Included(begin), Bound::Excluded(end));
        let deleted = &self.dedupe_deleted_while_moving;
        let mut recent = self.dedupe_recent.range(lower, upper).peekable();
        let mut moving = self
            .dedupe_moving
            .iter()
            .flat_map(|moving| moving.range(lower, upper))
            .filter(|(key, _)| !deleted.contains(key.bytes()))
            .peekable();
        // The next pair in memory: recent over moving for a key in both.
        let mut next_in_memory = move || -> Option<(MapKey<'_>, &Bytes)> {
            match (recent.peek(), moving.peek()) {
                (None, None) => None,
                (Some(_), None) => recent.next(),
                (None, Some(_)) => moving.next(),
                (Some((a, _)), Some((b, _))) => match a.bytes().cmp(b.bytes()) {
                    std::cmp::Ordering::Less => recent.next(),
                    std::cmp::Ordering::Greater => moving.next(),
                    std::cmp::Ordering::Equal => {
                        moving.next();
                        recent.next()
                    }
                },
            }
        };
        let mut pending = next_in_memory();
        let mut stopped = false;
        let completed = tier.scan_latest(begin, end, &mut |key, value| {
            while let Some((memory_key, memory_value)) = pending.take() {
                if memory_key.bytes() > key {
                    pending = Some((memory_key, memory_value));
                    break;
                }
                let shadows = memory_key.bytes() == key;
                pending = next_in_memory();
                if !visit(memory_key.bytes(), memory_value) {
                    stopped = true;
                    return false;
                }
                if shadows {
                    return true;
                }
            }
            if deleted.contains(key) || self.dedupe_tombstones_pending.contains(key) {
                return true;
            }
            if !visit(key, value) {
                stopped = true;
                return false;
            }
            true
        })?;
        if stopped || !completed {
            return Ok(false);
        }
        while let Some((key, value)) = pending {
            if !visit(key.bytes(), value) {
                return Ok(false);
            }
            pending = next_in_memory();
        }
        Ok(true)
    }
}

/// How a file of records ends.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// After its last whole record.
    Clean,
    /// After its last whole record come only zeros: a segment's space filled in advance (or
    /// blocks the file system allocated that a write never filled).
    ZeroTail,
    /// In a record a crash cut short: the file ends inside it, or only zeros follow the
    /// record's declared end.
    Torn,
    /// In a record that is whole but wrong, with more data after it: damage, not a crash.
    Damaged,
    /// In a bad record after which the search for whole records gave up
    /// (`TAIL_SCAN_HASH_BYTES_MAX`): a tear or damage, recovery cannot tell.
    Undecided,
}

/// A replay at open: the state it builds, and the tier its dedupe records move to whenever
/// they reach `dedupe_bytes_max` (the journals of a large backlog can hold gigabytes of them).
struct Replay<'a> {
    state: State,
    tier: &'a FjallStore,
    /// `LogOptions::dedupe_memory_bytes_max`.
    dedupe_bytes_max: u64,
    /// Moves of dedupe records to the tier so far (`LogRecovery::dedupe_moves`).
    dedupe_moves: u64,
}

impl Replay<'_> {
    /// Replays one record's changes.
    fn record(&mut self, changes: Vec<(&[u8], Option<&[u8]>)>) -> Result<(), StoreError> {
        self.state.replay(changes.into_iter());
        if self.state.dedupe_replayed_bytes >= self.dedupe_bytes_max {
            self.state.move_replayed_dedupe(self.tier, false)?;
            self.dedupe_moves += 1;
        }
        Ok(())
    }

    /// Replays a snapshot (whole records, ending cleanly) as it reads it, a record at a time: a
    /// snapshot holds every live pair, and read whole it doubled the memory a restart needs.
    /// One of version 4 must end with its end record (`write_snapshot`).
    fn snapshot(&mut self, path: &Path, codec: Codec) -> Result<(), StoreError> {
        let file = File::open(path).map_err(|e| io(format!("open {}", path.display()), e))?;
        let mut file = std::io::BufReader::with_capacity(1 << 20, file);
        let mut record = Vec::new();
        let mut at = 0u64;
        let mut ended = false;
        let damaged = |at: u64| {
            StoreError::Corrupt(format!(
                "{} is damaged at byte {at}: restore the store from a backup",
                path.display()
            ))
        };
        loop {
            record.resize(RECORD_HEADER_BYTES, 0);
            // The end of the file, between two records: done.
            let first = loop {
                match file.read(&mut record[..1]) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    read => break read.map_err(|e| io(format!("read {}", path.display()), e))?,
                }
            };
            if first == 0 {
                if codec.tagged && !ended {
                    return Err(StoreError::Corrupt(format!(
                        "{} ends at byte {at} without its end record: the file was cut short \
                         (copied or restored in part?); restore the store from a backup",
                        path.display()
                    )));
                }
                return Ok(());
            }
            if ended {
                // Bytes after the end record.
                return Err(damaged(at));
            }
            let whole = file
                .read_exact(&mut record[1..RECORD_HEADER_BYTES])
                .and_then(|()| {
                    let payload_bytes =
                        u32::from_le_bytes(record[..4].try_into().expect("4 bytes")) as usize;
                    if payload_bytes > RECORD_BYTES_MAX {
                        return Err(std::io::ErrorKind::InvalidData.into());
                    }
                    record.resize(RECORD_HEADER_BYTES + payload_bytes, 0);
                    file.read_exact(&mut record[RECORD_HEADER_BYTES..])
                });
            match whole {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
                    ) =>
                {
                    return Err(damaged(at));
                }
                Err(e) => return Err(io(format!("read {}", path.display()), e)),
            }
            let (changes, len) = decode_record(&record, codec).map_err(|_| damaged(at))?;
            // The end record holds no change; no other snapshot record is empty.
            ended = codec.tagged && changes.is_empty();
            self.record(changes)?;
            at += len as u64;
        }
    }

    /// Replays the records at the start of `bytes` (a journal). Returns the length of the valid
    /// prefix and how the file ends after it.
    fn journal(&mut self, bytes: &[u8], codec: Codec) -> Result<(usize, Ending), StoreError> {
        let mut at = 0usize;
        while at < bytes.len() {
            match decode_record(&bytes[at..], codec) {
                Ok((changes, len)) => {
                    self.record(changes)?;
                    at += len;
                }
                Err(_) => {
                    let rest = &bytes[at..];
                    if is_zeros(rest) {
                        return Ok((at, Ending::ZeroTail));
                    }
                    // A torn write is the last write: no whole record can follow it. Whatever its
                    // pages look like (a record's later page can reach the disk before the page
                    // with its header), only a record that decodes after it proves damage.
                    return Ok((
                        at,
                        match whole_record_after(rest, TAIL_SCAN_HASH_BYTES_MAX, codec) {
                            Some(true) => Ending::Damaged,
                            Some(false) => Ending::Torn,
                            None => Ending::Undecided,
                        },
                    ));
                }
            }
        }
        Ok((at, Ending::Clean))
    }
}

/// Bytes of candidate records the search after a bad record may hash. Each offset whose four
/// bytes read as a length that fits (and, in a file of version 4, whose checksum's length tag
/// checks) is hashed over that length: in a file without tags random bytes (an encrypted body)
/// make about one offset in 256 a candidate, but a body of repeated small lengths makes every
/// fourth one, and a 16 MiB tail of them would take terabytes of hashing.
const TAIL_SCAN_HASH_BYTES_MAX: usize = 32 << 30;

/// Whether a whole record starts anywhere after the first byte of `rest` (a bad record and
/// what follows it), before the last byte that is not zero; `None` when the search gave up
/// after hashing `hash_bytes_max` (the caller then refuses the file as damaged rather than
/// cut records that may follow).
fn whole_record_after(rest: &[u8], hash_bytes_max: usize, codec: Codec) -> Option<bool> {
    let last = rest.iter().rposition(|byte| *byte != 0).unwrap_or(0);
    let mut hashed = 0usize;
    for offset in 1..=last {
        let Some(payload_bytes) = record_fits(&rest[offset..], codec) else {
            continue;
        };
        hashed = hashed.saturating_add(payload_bytes);
        if hashed > hash_bytes_max {
            return None;
        }
        if decode_record(&rest[offset..], codec).is_ok() {
            return Some(true);
        }
    }
    Some(false)
}

/// The payload length `bytes`' header declares, if a record of it fits in `bytes` and its
/// length tag checks. Checked before hashing anything, so scanning garbage byte by byte stays
/// cheap.
fn record_fits(bytes: &[u8], codec: Codec) -> Option<usize> {
    let header = bytes.get(..RECORD_HEADER_BYTES)?;
    let payload_bytes = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    let checksum = u64::from_le_bytes(header[4..].try_into().expect("8 bytes"));
    // The smallest payload is a count of 4 bytes.
    (payload_bytes >= 4
        && RECORD_HEADER_BYTES + payload_bytes <= bytes.len()
        && codec.length_checks(payload_bytes, checksum))
    .then_some(payload_bytes)
}

fn is_zeros(bytes: &[u8]) -> bool {
    bytes.iter().all(|byte| *byte == 0)
}

/// Bytes a torn record took, from `valid` to the last byte that is not zero.
fn torn_bytes(bytes: &[u8], valid: usize) -> u64 {
    bytes[valid..]
        .iter()
        .rposition(|byte| *byte != 0)
        .map_or(0, |last| last as u64 + 1)
}

/// The dedupe filter of a store just recovered (`DedupeFilter::opened`), from the records in
/// memory and in the tier.
fn open_dedupe_filter(
    state: &State,
    dedupe: &FjallStore,
    bytes_max: usize,
    warm_keys_max: usize,
) -> Result<DedupeFilter, StoreError> {
    DedupeFilter::opened(
        bytes_max,
        warm_keys_max,
        || {
            let in_tier = dedupe.highest_key_in(DEDUPE_BEGIN, DEDUPE_END)?;
            let in_memory = state.dedupe_recent.last_key();
            Ok::<_, StoreError>(in_tier.max(in_memory))
        },
        |start, take| {
            let mut found = Vec::new();
            state.scan_dedupe(dedupe, start, DEDUPE_END, &mut |key, _| {
                found.push(key.to_vec());
                found.len() < take
            })?;
            Ok(found)
        },
    )
}

/// Writes `FORMAT` (this version, with `salt`) durably: a copy, renamed over the old one.
fn write_format(dir: &Path, salt: &Salt) -> Result<(), StoreError> {
    let format_path = dir.join(FORMAT_FILE);
    let tmp_path = dir.join(format!("{FORMAT_FILE}{TMP_SUFFIX}"));
    std::fs::write(&tmp_path, salt.format())
        .and_then(|()| File::open(&tmp_path)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp_path, &format_path))
        .map_err(|e| io(format!("write {}", format_path.display()), e))?;
    sync_dir(dir)
}

fn read_file(path: &Path) -> Result<Vec<u8>, StoreError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| io(format!("read {}", path.display()), e))?;
    Ok(bytes)
}

impl LogStore {
    /// Opens the store in `dir`, creating it if needed, and recovers what was committed.
    pub fn open(dir: &Path, options: &LogOptions) -> Result<LogStore, StoreError> {
        let started = std::time::Instant::now();
        let mut torn_bytes_cut = 0u64;
        let mut journals_synced = 0u64;
        std::fs::create_dir_all(dir)
            .map_err(|e| io(format!("create store directory {}", dir.display()), e))?;
        // The lock before anything is read or made: a second process opening a new directory
        // at the same time would otherwise write its own `FORMAT`, and its salt, over the one
        // the first is committing under (every record would then fail its check on the next
        // open, as a torn one).
        let lock = lock_dir(dir)?;
        // What recovery reads is what the disk holds, not pages a failed sync left behind.
        super::drop_cached_pages(dir);
        let format_path = dir.join(FORMAT_FILE);
        let mut upgrade_from_v1 = false;
        // `None` while the store is of a version before salts (1 or 2): its files are read
        // unkeyed, and the salt is drawn once it is open.
        let mut salt: Option<Salt> = None;
        match std::fs::read_to_string(&format_path) {
            Ok(format) if format.starts_with(FORMAT_HEADER) || format.starts_with(FORMAT_V3) => {
                salt = Some(Salt::parse(&format).ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "{} is damaged ({format:?}): it must name the store's salt; restore \
                         the store from a backup",
                        format_path.display()
                    ))
                })?);
            }
            Ok(format) if format == FORMAT_V2 => {}
            Ok(format) if format == FORMAT_V1 => upgrade_from_v1 = true,
            Ok(other) => {
                return Err(StoreError::Corrupt(format!(
                    "{} says {:?}, not {:?}: this directory belongs to another store \
                     format; point the log engine at an empty directory",
                    format_path.display(),
                    other.trim(),
                    FORMAT_HEADER.trim()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // A crash while this store was first created can leave the unrenamed copy.
                remove(dir, &format!("{FORMAT_FILE}{TMP_SUFFIX}"))?;
                let occupied = std::fs::read_dir(dir)
                    .map_err(|e| io(format!("list {}", dir.display()), e))?
                    .any(|entry| entry.is_ok_and(|entry| entry.file_name() != LOCK_FILE));
                if occupied {
                    return Err(StoreError::Corrupt(format!(
                        "{} holds files but no {FORMAT_FILE}: it is not a log store (another \
                         engine's data?); point the log engine at an empty directory or \
                         switch back to the engine that wrote it",
                        dir.display()
                    )));
                }
                let fresh = Salt::draw(0)?;
                write_format(dir, &fresh)?;
                salt = Some(fresh);
            }
            Err(e) => return Err(io(format!("read {}", format_path.display()), e)),
        }
        let dedupe_dir = dir.join(DEDUPE_DIR);
        if upgrade_from_v1 {
            // A version 1 store holds every dedupe record in its snapshot and journals. A tier
            // left by an upgrade that did not finish (and a rollback since) may hold records
            // deleted after it: the replay below fills a new one.
            match std::fs::remove_dir_all(&dedupe_dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(format!("remove {}", dedupe_dir.display()), e)),
            }
        } else if !dedupe_dir.exists() {
            // A store whose creation stopped before its tier was made has no journal yet;
            // any other without a tier lost the dedupe records it held.
            let mut tmp = Vec::new();
            let holds_data = !list_ids(dir, JOURNAL_PREFIX, &mut tmp)?.is_empty()
                || !list_ids(dir, SNAPSHOT_PREFIX, &mut tmp)?.is_empty();
            if holds_data {
                return Err(StoreError::Corrupt(format!(
                    "{} is missing: the dedupe records of this log store are gone; restore \
                     the store from a backup",
                    dedupe_dir.display()
                )));
            }
        }
        // Its page cache went with the store's own, above.
        let dedupe = FjallStore::open_cache_dropped(
            &dedupe_dir,
            &dedupe_tier_options(options.direct_writes),
        )?;

        let mut stale = Vec::new();
        let snapshots = list_ids(dir, SNAPSHOT_PREFIX, &mut stale)?;
        let journals = list_ids(dir, JOURNAL_PREFIX, &mut stale)?;
        for path in &stale {
            std::fs::remove_file(path).map_err(|e| io(format!("remove {}", path.display()), e))?;
        }
        let mut replay = Replay {
            state: State::default(),
            tier: &dedupe,
            dedupe_bytes_max: options.dedupe_memory_bytes_max,
            dedupe_moves: 0,
        };
        let read_salt = salt.unwrap_or(Salt::NONE);
        let first_journal = match snapshots.last() {
            Some(&id) => {
                replay.snapshot(
                    &dir.join(file_name(SNAPSHOT_PREFIX, id)),
                    read_salt.codec_of(id),
                )?;
                id
            }
            None => 0,
        };
        let replayed: Vec<u64> = journals
            .iter()
            .copied()
            .filter(|id| *id >= first_journal)
            .collect();
        for (index, id) in replayed.iter().enumerate() {
            let path = dir.join(file_name(JOURNAL_PREFIX, *id));
            // Synced before it is replayed: its last record may never have been (a crash
            // between write and sync), and the replay may move the records' dedupe records
            // to the tier, durably; one saying a message is stored must not outlive the
            // message at a power cut (`journals_synced`).
            OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.sync_data())
                .map_err(|e| io(format!("sync the recovered {}", path.display()), e))?;
            journals_synced += 1;
            let bytes = read_file(&path)?;
            let (valid, ending) = replay.journal(&bytes, read_salt.codec_of(*id))?;
            // Journals after this one that hold no commit (started by a checkpoint, a reopen or
            // a full segment, then a crash or a failed write) do not make its tear a damage.
            let newer_hold_commits = ending == Ending::Torn
                && replayed[index + 1..].iter().any(|newer| {
                    read_file(&dir.join(file_name(JOURNAL_PREFIX, *newer))).map_or(true, |bytes| {
                        decode_record(&bytes, read_salt.codec_of(*newer)).is_ok()
                    })
                });
            if ending == Ending::Undecided {
                return Err(StoreError::Corrupt(format!(
                    "{} has a bad record at byte {valid}, and the search for whole records \
                     after it gave up: a crash's tear or damage, recovery cannot tell. Keep a \
                     copy of the directory; truncating the file at byte {valid} accepts the \
                     loss of anything after it, or restore the store from a backup",
                    path.display()
                )));
            }
            if ending == Ending::Damaged || (ending == Ending::Torn && newer_hold_commits) {
                return Err(StoreError::Corrupt(format!(
                    "{} is damaged at byte {valid}{}: restore the store from a backup",
                    path.display(),
                    if newer_hold_commits {
                        " and newer journals follow it"
                    } else {
                        ", with whole records after the damage"
                    }
                )));
            }
            if ending == Ending::Torn {
                // A commit cut short by a crash: never acknowledged, so dropped.
                torn_bytes_cut = torn_bytes(&bytes, valid);
            }
            if ending == Ending::Torn || ending == Ending::ZeroTail {
                // Commits go to a new journal after recovery, so a segment's unused zeros are
                // given back too.
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| {
                        f.set_len(valid as u64)?;
                        f.sync_all()
                    })
                    .map_err(|e| io(format!("cut the torn end of {}", path.display()), e))?;
            }
        }
        // Older files a crash left behind after a checkpoint.
        for id in journals.iter().filter(|id| **id < first_journal) {
            remove(dir, &file_name(JOURNAL_PREFIX, *id))?;
        }
        for id in snapshots.iter().filter(|id| **id < first_journal) {
            remove(dir, &file_name(SNAPSHOT_PREFIX, *id))?;
        }
        // Commits go to a new journal: recovered files are never appended to.
        let journal_id = journals
            .last()
            .map_or(0, |last| last + 1)
            .max(first_journal)
            .max(1);
        let segment_bytes = options.journal_segment_bytes;
        let (journal, direct) = if segment_bytes > 0 {
            let path = dir.join(file_name(JOURNAL_PREFIX, journal_id));
            let file = zero_filled_file(&path, segment_bytes)?;
            sync_dir(dir)?;
            (file, open_direct(options, &path))
        } else {
            (create_journal(dir, journal_id)?, None)
        };
        let journal_bytes: u64 = replayed
            .iter()
            .map(|id| {
                std::fs::metadata(dir.join(file_name(JOURNAL_PREFIX, *id))).map_or(0, |m| m.len())
            })
            .sum();

        let (mut state, dedupe_moves) = (replay.state, replay.dedupe_moves);
        state.finish_replay(&dedupe)?;
        let recovery = LogRecovery {
            keys: state.map.len() as u64,
            snapshot: snapshots.last().is_some(),
            journal_bytes,
            torn_bytes_cut,
            journals_synced,
            dedupe_moves,
            direct_writes: direct.is_some(),
            elapsed: started.elapsed(),
        };
        let live_bytes = state.live_bytes;
        let dedupe_bytes = state.dedupe_memory_bytes();
        let dedupe_filter = open_dedupe_filter(
            &state,
            &dedupe,
            options.dedupe_filter_bytes_max,
            options.dedupe_filter_warm_keys_max,
        )?;
        if upgrade_from_v1 {
            // A version 1 snapshot's dedupe records are in memory now, as version 2 replays
            // them, and its deletes' tombstones in the tier: synced, so that the snapshot and
            // journals may go at the next checkpoint, which moves the records to the tier.
            dedupe.persist()?;
        }
        // A store of a version before salts gets one now, and one of version 3 its length
        // tags, for the files from the new journal on. Written before the first commit: the
        // new journal holds nothing yet (a crash before this leaves zeros, which any version
        // reads as the end).
        let salt = match salt {
            Some(salt) if salt.tagged_from != u64::MAX => salt,
            Some(untagged) => {
                let salt = Salt {
                    tagged_from: journal_id,
                    ..untagged
                };
                write_format(dir, &salt)?;
                salt
            }
            None => {
                let salt = Salt::draw(journal_id)?;
                write_format(dir, &salt)?;
                salt
            }
        };
        let dedupe_move_due = state.dedupe_recent_bytes >= options.dedupe_memory_bytes_max;
        let journal = Arc::new(journal);
        let inner = Arc::new(Inner {
            dir: dir.to_path_buf(),
            options: options.clone(),
            salt,
            state: RwLock::new(state),
            pending: Mutex::new(Pending {
                commit: None,
                journal: Arc::clone(&journal),
            }),
            sync_running: Mutex::new(()),
            writer: Mutex::new(Writer {
                journal,
                journal_id,
                journal_offset: 0,
                journal_capacity: segment_bytes,
                direct,
                version: 0,
                record: Vec::new(),
                dedupe_filter,
                left_pending: false,
            }),
            poisoned: AtomicBool::new(false),
            live_bytes_now: AtomicU64::new(live_bytes),
            dedupe_bytes_now: AtomicU64::new(dedupe_bytes),
            journal_bytes_since_checkpoint: AtomicU64::new(journal_bytes),
            deleted_since_checkpoint: AtomicBool::new(true),
            spare: Mutex::new(None),
            spares_made: AtomicU64::new(0),
            checkpoint_running: Mutex::new(()),
            dedupe_move_running: Mutex::new(()),
            checkpoint_wanted: Mutex::new(CheckpointRequest::default()),
            checkpoint_signal: Condvar::new(),
            dedupe,
            _lock: lock,
        });
        let background = Arc::clone(&inner);
        let checkpointer = if options.background_thread {
            Some(
                std::thread::Builder::new()
                    .name("store-checkpoint".into())
                    .spawn(move || background.run_checkpoints())
                    .map_err(|e| io("start the checkpoint thread", e))?,
            )
        } else {
            None
        };
        inner.want_checkpoint_if_due();
        inner.want_spare();
        if dedupe_move_due {
            inner.want_background(|request| request.dedupe_move_wanted = true);
        }
        Ok(LogStore {
            inner,
            checkpointer,
            recovery,
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.dir
    }

    /// What opening the store recovered.
    pub fn recovery(&self) -> LogRecovery {
        self.recovery
    }

    /// Whether the writer still writes records around the page cache (it stops for the rest
    /// of a segment when a record does not fit it in whole blocks, or the kernel refuses).
    pub fn writes_directly(&self) -> bool {
        self.inner.lock_writer().direct.is_some()
    }

    /// Whether `dir` holds a log store (its `FORMAT` file).
    pub fn is_log_store(dir: &Path) -> bool {
        dir.join(FORMAT_FILE).exists()
    }

    /// Message keys in the store (exact), or `None` if a commit holds the map now.
    pub fn message_keys_without_waiting(&self) -> Option<u64> {
        self.inner
            .state
            .try_read()
            .ok()
            .map(|state| state.message_keys)
    }

    /// Estimated bytes of memory the live pairs take, as of the last commit, without a lock.
    pub fn live_bytes_without_waiting(&self) -> u64 {
        self.inner.live_bytes_now.load(Ordering::Relaxed)
    }

    /// Whether a failed write poisoned the store: every call fails with `Poisoned` until it
    /// is opened again. Never blocks.
    pub fn is_poisoned(&self) -> bool {
        self.inner.poisoned.load(Ordering::Acquire)
    }

    /// Estimated bytes of memory the dedupe records not yet in the tier take (those a move is
    /// writing included), as of the last commit or move, without a lock.
    pub fn dedupe_memory_bytes(&self) -> u64 {
        self.inner.dedupe_bytes_now.load(Ordering::Relaxed)
    }

    /// How full the store is, in percent of `memory_bytes_max`, without waiting for a lock
    /// (the edge refuses sends from 90% until it falls below 80%).
    pub fn memory_fill_percent(&self) -> u64 {
        let bound = self.inner.options.memory_bytes_max.max(1);
        let live = self.inner.live_bytes_now.load(Ordering::Relaxed);
        u64::try_from(u128::from(live) * 100 / u128::from(bound)).unwrap_or(u64::MAX)
    }

    /// Bytes of the store's files.
    pub fn disk_bytes(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        let entries = std::fs::read_dir(&self.inner.dir)
            .map_err(|e| io(format!("list {}", self.inner.dir.display()), e))?;
        for entry in entries.flatten() {
            total += entry
                .metadata()
                .map_or(0, |m| if m.is_file() { m.len() } else { 0 });
        }
        Ok(total + super::allocated_bytes(&self.inner.dir.join(DEDUPE_DIR)))
    }

    /// Makes what was deleted physically gone from disk: a checkpoint, after which the
    /// journals that held deleted values are deleted. Everything deleted before the pass
    /// started is then in no file of the store. Does nothing if nothing was deleted since the
    /// last checkpoint.
    pub fn erase_deleted(&self) -> Result<LogEraseReport, StoreError> {
        let disk_bytes_before = self.disk_bytes()?;
        // Waits for a background checkpoint that is running: until it deletes the old
        // journals, what it cleared the flag for is still on disk.
        let running = self.inner.lock_checkpoint();
        let checkpointed = self.inner.deleted_since_checkpoint.load(Ordering::Acquire);
        if checkpointed {
            self.inner.checkpoint_locked(&running, None)?;
        }
        drop(running);
        // Deleted dedupe records leave the tier's journal and tables (it does nothing if
        // nothing was written to it since its last pass).
        let dedupe = self.inner.dedupe.erase_deleted()?;
        Ok(LogEraseReport {
            checkpointed,
            disk_bytes_before,
            disk_bytes_after: self.disk_bytes()?,
            complete: dedupe.complete,
        })
    }

    /// Runs a checkpoint now, on this thread.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.inner.checkpoint()
    }

    /// Runs the background work that is due (a spare journal segment, a checkpoint, a move of
    /// dedupe records to the tier), on this thread: with `LogOptions::background_thread` off,
    /// nothing else does.
    pub fn run_background_work(&self) {
        self.inner.run_background_work();
    }

    /// For tests of durability (the simulation's power cut): closes the store as a power cut
    /// would, losing the journal record of the pending commit (written, never fsynced: zeros
    /// again where it was) and nothing synced. Returns the keys the lost commit set, or `None`
    /// when no commit was pending.
    #[doc(hidden)]
    pub fn cut_power_for_test(self) -> Option<Vec<Vec<u8>>> {
        use std::os::unix::fs::FileExt;
        let inner = &self.inner;
        let _writer = inner.lock_writer();
        let _running = inner.sync_running.lock().unwrap_or_else(|p| p.into_inner());
        // Nothing syncs from here: not a background checkpoint, not the close.
        inner.poisoned.store(true, Ordering::Release);
        let pending = inner.lock_pending();
        let commit = pending.commit.as_ref()?;
        let zeros = vec![0; commit.record_bytes as usize];
        pending
            .journal
            .write_all_at(&zeros, commit.record_at)
            .expect("zero the unsynced record");
        Some(
            commit
                .changes
                .iter()
                .filter(|(_, value)| value.is_some())
                .map(|(key, _)| key.to_vec())
                .collect(),
        )
    }
}

impl Drop for LogStore {
    fn drop(&mut self) {
        self.inner
            .checkpoint_wanted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .closing = true;
        self.inner.checkpoint_signal.notify_all();
        if let Some(thread) = self.checkpointer.take() {
            let _ = thread.join();
        }
    }
}

fn remove(dir: &Path, name: &str) -> Result<(), StoreError> {
    let path = dir.join(name);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(format!("remove {}", path.display()), e)),
    }
}

/// `path`, a new zero-filled segment, opened for direct writes if the options ask for them and
/// its file system takes them.
fn open_direct(options: &LogOptions, path: &Path) -> Option<DirectJournal> {
    options
        .direct_writes
        .then(|| DirectJournal::open(path))
        .flatten()
}

fn create_journal(dir: &Path, id: u64) -> Result<File, StoreError> {
    let path = dir.join(file_name(JOURNAL_PREFIX, id));
    // Not `append`: records go at the writer's offset (`write_all_at`), which Linux ignores
    // for files opened to append.
    let file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&path)
        .map_err(|e| io(format!("create {}", path.display()), e))?;
    sync_dir(dir)?;
    Ok(file)
}

/// Creates `path` holding `bytes` zeros, synced (its directory is not).
fn zero_filled_file(path: &Path, bytes: u64) -> Result<File, StoreError> {
    use std::os::unix::fs::FileExt;
    let fill = || -> std::io::Result<File> {
        let file = OpenOptions::new().create_new(true).write(true).open(path)?;
        let zeros = vec![0u8; ZERO_CHUNK_BYTES];
        let mut offset = 0u64;
        while offset < bytes {
            let chunk = (bytes - offset).min(ZERO_CHUNK_BYTES as u64) as usize;
            file.write_all_at(&zeros[..chunk], offset)?;
            // Sent to the disk a chunk at a time (no cache flush: the sync at the end does
            // that), so that no burst of the whole segment's pages stands in the disk's queue
            // in front of the commits' fsyncs. The pages stay cached: a record written
            // through the page cache over part of one then needs no read.
            write_out(&file, offset, chunk as u64)?;
            offset += chunk as u64;
        }
        file.sync_all()?;
        Ok(file)
    };
    fill().map_err(|e| io(format!("fill {} with zeros", path.display()), e))
}

/// Writes `[offset, offset + bytes)` of `file`'s dirty pages to the disk and waits for them
/// (`sync_file_range`): no metadata, no flush of the disk's cache.
#[allow(unsafe_code)]
fn write_out(file: &File, offset: u64, bytes: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain integers; the descriptor is `file`'s, open for the call.
    let done = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            bytes as libc::off64_t,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )
    };
    if done != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `work` on a thread of its own at the lowest priority (nice 19) and waits for it: a
/// spare segment's zero-fill (16 MiB by default) then waits for any thread that serves
/// instead of taking a busy core from the shard for milliseconds (measured: the paced tail,
/// docs/benchmarks.md, forty-third session). A thread of its own because a thread cannot
/// raise its priority again without privilege, and checkpoints and dedupe moves must not be
/// starved: under sustained load a late spare only sends records past the segment's end,
/// through the page cache, until the next one is ready.
fn at_lowest_priority<T: Send>(
    name: &str,
    work: impl FnOnce() -> T + Send,
) -> Result<T, StoreError> {
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name(name.into())
            .spawn_scoped(scope, || {
                lower_this_threads_priority();
                work()
            })
            .map_err(|e| io(format!("start the {name} thread"), e))?;
        worker
            .join()
            .map_err(|_| StoreError::Io(format!("the {name} thread panicked")))
    })
}

/// Gives the calling thread the lowest priority (nice 19); where the kernel refuses, it keeps
/// its own and says so.
#[allow(unsafe_code)]
fn lower_this_threads_priority() {
    // SAFETY: gettid and setpriority take plain integers and touch no memory of ours.
    let lowered =
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
    if lowered != 0 {
        eprintln!(
            "courier: a log store thread keeps its priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The file whose lock says the store is open.
const LOCK_FILE: &str = "LOCK";

/// An exclusive lock on `dir/LOCK`, held while the file stays open.
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io(format!("open {}", path.display()), e))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function owns and keeps open; it only sets a lock.
    #[allow(unsafe_code)]
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if !locked {
        return Err(StoreError::Io(format!(
            "{} is locked: another process (or store) has this directory open",
            dir.display()
        )));
    }
    Ok(file)
}

impl Inner {
    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        // Commits change the map in one step under the write lock; a panic cannot leave half.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_poisoned(&self) -> Result<(), StoreError> {
        if self.poisoned.load(Ordering::Acquire) {
            Err(StoreError::Poisoned)
        } else {
            Ok(())
        }
    }

    fn lock_pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes every commit `writer` wrote durable (`sync_through` its last version).
    fn sync_written(&self, writer: &mut Writer) -> Result<(), StoreError> {
        self.sync_through(writer.version)?;
        writer.left_pending = false;
        Ok(())
    }

    /// Writes one commit to the journal. Unless `unsynced`, also fsyncs it and applies it to
    /// the map before returning; otherwise it is the pending commit until `sync_through` (or
    /// the next commit) makes it durable. A commit that deletes dedupe records is always
    /// synced at once: their tombstones go to the tier under the writer lock (rare: a bucket
    /// of records a day).
    fn commit(
        &self,
        writer: &mut Writer,
        changes: Vec<(Bytes, Option<Bytes>)>,
        unsynced: bool,
    ) -> Result<CommitVersion, StoreError> {
        self.check_poisoned()?;
        if changes.is_empty() {
            // Durable when it returns, unless unsynced: so is every commit before it.
            if !unsynced {
                self.sync_written(writer)?;
            }
            writer.version += 1;
            return Ok(writer.version);
        }
        if let Some((key, _)) = changes
            .iter()
            .find(|(key, _)| key.len() > usize::from(u16::MAX))
        {
            return Err(StoreError::Io(format!(
                "a key of {} bytes: the log store takes keys up to 65,535 bytes",
                key.len()
            )));
        }
        // The commit before this one durable and in the map first (usually it is, or its
        // fsync is running): then a crash tears at most this record, and nothing after a torn
        // one is acknowledged; and the memory bound counts the map with it.
        self.sync_written(writer)?;
        self.check_memory_bound(&changes)?;
        writer.record.clear();
        encode_record(
            &mut writer.record,
            changes
                .iter()
                .map(|(key, value)| (&key[..], value.as_ref().map(|v| &v[..]))),
            self.salt.codec(),
        );
        if writer.record.len() > RECORD_BYTES_MAX {
            return Err(StoreError::Io(format!(
                "a commit of {} bytes: the log store takes commits up to {RECORD_BYTES_MAX} bytes",
                writer.record.len()
            )));
        }
        let record_bytes = writer.record.len() as u64;
        if writer.journal_offset > 0
            && writer.journal_offset + record_bytes > writer.journal_capacity
            && self.options.journal_segment_bytes > 0
        {
            // The segment is full (or the journal appends): on to the spare, if it is ready.
            self.next_journal(writer, true)?;
        }
        let file_bytes_max = JOURNAL_FILE_BYTES_MAX.max(self.options.journal_segment_bytes);
        if writer.journal_offset > 0 && writer.journal_offset + record_bytes > file_bytes_max {
            // No spare, or no segments: a new file all the same.
            self.next_journal(writer, false)?;
        }
        let written = self.write_record(writer);
        if let Err(error) = written {
            // The record may be on disk in part or whole: only recovery can tell.
            self.poisoned.store(true, Ordering::Release);
            return Err(io(
                format!(
                    "append to journal {} in {}",
                    writer.journal_id,
                    self.dir.display()
                ),
                error,
            ));
        }
        let mut deletes = false;
        let mut deletes_dedupe = false;
        writer.dedupe_filter.note_all_written(
            changes
                .iter()
                .filter(|(_, value)| value.is_some())
                .map(|(key, _)| &**key),
        );
        for (key, _) in changes.iter().filter(|(_, value)| value.is_none()) {
            deletes = true;
            deletes_dedupe |= is_dedupe(key);
        }
        if deletes {
            self.deleted_since_checkpoint.store(true, Ordering::Release);
        }
        let record_at = writer.journal_offset;
        writer.journal_offset += record_bytes;
        self.journal_bytes_since_checkpoint
            .fetch_add(record_bytes, Ordering::Relaxed);
        // A large one-off record is not kept for the next commit.
        if writer.record.capacity() > 1 << 20 {
            writer.record = Vec::new();
        }
        writer.version += 1;
        let version = writer.version;
        let mut pending = self.lock_pending();
        debug_assert!(
            pending.commit.is_none(),
            "the commit before was synced before this one was written"
        );
        pending.commit = Some(PendingCommit {
            version,
            changes,
            sorted: false,
            walks: 0,
            index: None,
            hash: hash_pending_key,
            record_at,
            record_bytes,
        });
        drop(pending);
        if unsynced && !deletes_dedupe {
            writer.left_pending = true;
        } else {
            self.sync_written(writer)?;
        }
        self.want_checkpoint_if_due();
        Ok(version)
    }

    /// Writes `writer.record` at the journal's offset: directly while the segment has room for
    /// it in whole blocks, else (and from then on in this journal) through the page cache; a
    /// record longer than `DIRECT_RECORD_BYTES_MAX` through the page cache, the direct writer
    /// going on after it. Not synced.
    fn write_record(&self, writer: &mut Writer) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let (record, offset) = (&writer.record, writer.journal_offset);
        if let Some(direct) = &mut writer.direct {
            if record.len() > DIRECT_RECORD_BYTES_MAX
                && offset + record.len() as u64 <= writer.journal_capacity
            {
                writer.journal.write_all_at(record, offset)?;
                // Within the zero-filled segment: the blocks after the record still read as
                // zeros, so direct writes may go on (an error here leaves the page cache).
                if direct.wrote_elsewhere(record, offset).is_err() {
                    writer.direct = None;
                }
                return Ok(());
            }
            if direct.fits(offset, record.len() as u64, writer.journal_capacity) {
                match direct.write_at(record, offset) {
                    Err(error) if error.kind() == std::io::ErrorKind::InvalidInput => {
                        // Nothing written: the page cache takes this record and the rest.
                        eprintln!(
                            "courier: the kernel refused a direct write to the journal of the \
                             log store in {} ({error}); this journal goes through the page cache",
                            self.dir.display()
                        );
                    }
                    done => return done,
                }
            }
            // A record through the page cache leaves the direct writer's tail stale.
            writer.direct = None;
        }
        writer.journal.write_all_at(record, offset)
    }

    /// Makes every commit up to `version` durable: fsyncs the journal if the pending commit
    /// is one of them, then applies it to the map, where readers see it. One fsync at a time;
    /// a caller that finds its commit synced meanwhile returns at once.
    fn sync_through(&self, version: CommitVersion) -> Result<(), StoreError> {
        let _running = self.sync_running.lock().unwrap_or_else(|p| p.into_inner());
        let journal = {
            let pending = self.lock_pending();
            match &pending.commit {
                Some(commit) if commit.version <= version => Arc::clone(&pending.journal),
                // Synced already (a later commit may be pending: the writer syncs the one
                // before it first). Durable is durable, even if the store failed since.
                _ => return Ok(()),
            }
        };
        self.check_poisoned()?;
        if let Err(error) = journal.sync_data() {
            // The record may be on disk in part or whole: only recovery can tell.
            self.poisoned.store(true, Ordering::Release);
            return Err(io(
                format!("fsync the journal in {}", self.dir.display()),
                error,
            ));
        }
        // Under the pending lock until the map holds the changes: a writer's read finds them
        // in one or the other, never in neither. It is still the commit synced: a writer
        // replaces the pending commit only after its own `sync_through` of it, which waits for
        // `sync_running`.
        let mut pending = self.lock_pending();
        let Some(commit) = pending.commit.take() else {
            return Ok(());
        };
        // A deleted dedupe record may be in the tier, so it gets a tombstone there. Memory
        // first: the commit's changes become visible together, its deleted dedupe keys marked
        // as pending tombstones; then the tombstones, outside the map's lock (a tier write can
        // wait for fjall's journal lock, which a tier sync holds across an fsync, and readers
        // must not wait on that). Rare: dedupe records go a bucket at a time, a day after.
        let mut tombstones = Vec::new();
        let dedupe_recent_bytes = {
            let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
            for (key, value) in commit.changes {
                match value {
                    Some(value) => state.set_any(key, value),
                    None if is_dedupe(&key) => {
                        state.delete_dedupe(key.clone());
                        state.dedupe_tombstones_pending.insert(key.clone());
                        tombstones.push(key);
                    }
                    None => state.delete(key),
                }
            }
            self.live_bytes_now
                .store(state.live_bytes, Ordering::Relaxed);
            self.dedupe_bytes_now
                .store(state.dedupe_memory_bytes(), Ordering::Relaxed);
            state.dedupe_recent_bytes
        };
        drop(pending);
        if !tombstones.is_empty() {
            let tiered = self
                .dedupe
                .write_unsynced(tombstones.iter().map(|key| (&key[..], None)));
            if let Err(error) = tiered {
                // The commit is durable in the journal and visible, its tombstones not in the
                // tier (memory keeps answering "deleted"): the reopen replays them there.
                self.poisoned.store(true, Ordering::Release);
                return Err(error);
            }
            let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
            for key in &tombstones {
                state.dedupe_tombstones_pending.remove(&key[..]);
            }
        }
        if dedupe_recent_bytes >= self.options.dedupe_memory_bytes_max {
            self.want_background(|request| request.dedupe_move_wanted = true);
        }
        Ok(())
    }

    /// Refuses a commit that would leave the live pairs above `memory_bytes_max`. What its
    /// deletes free counts: acks and expiry always pass, and make room for sends.
    fn check_memory_bound(&self, changes: &[(Bytes, Option<Bytes>)]) -> Result<(), StoreError> {
        // Dedupe records go to the tier, on disk.
        let added: u64 = changes
            .iter()
            .filter(|(key, _)| !is_dedupe(key))
            .filter_map(|(key, value)| value.as_ref().map(|v| pair_bytes(key, v)))
            .sum();
        let state = self.read_state();
        if state.live_bytes + added <= self.options.memory_bytes_max {
            return Ok(());
        }
        // Near the bound only: look up what the deletes and overwrites free (each key once:
        // overlapping cleared ranges can list one twice).
        let mut counted = std::collections::HashSet::new();
        let freed: u64 = changes
            .iter()
            .filter(|(key, _)| !is_dedupe(key) && counted.insert(&key[..]))
            .filter_map(|(key, _)| {
                let old = state.map.get(key)?;
                Some(pair_bytes(key, old))
            })
            .sum();
        // A commit that shrinks the store always passes, even above the bound (after a
        // restart with a lower one): acks and expiry must be able to make room.
        if added <= freed || state.live_bytes + added <= self.options.memory_bytes_max + freed {
            return Ok(());
        }
        Err(StoreError::Io(format!(
            "the log store in {} holds about {} bytes in memory, at its limit of {} \
             (store.log_memory_bytes_max): deliver or expire stored messages, or raise the limit",
            self.dir.display(),
            state.live_bytes,
            self.options.memory_bytes_max
        )))
    }

    /// Wakes the checkpoint thread once the journals outgrow both the bound and the live data.
    fn want_checkpoint_if_due(&self) {
        let journal = self.journal_bytes_since_checkpoint.load(Ordering::Relaxed);
        if journal < self.options.journal_bytes_max {
            return;
        }
        // Reading live_bytes takes the read lock: only past the bound, so rarely.
        if journal < self.read_state().live_bytes {
            return;
        }
        let mut request = self
            .checkpoint_wanted
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !request.wanted {
            request.wanted = true;
            self.checkpoint_signal.notify_one();
        }
    }

    fn run_checkpoints(&self) {
        loop {
            let wanted = {
                let mut request = self
                    .checkpoint_wanted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                while !request.wanted
                    && !request.spare_wanted
                    && !request.dedupe_move_wanted
                    && !request.closing
                {
                    request = self
                        .checkpoint_signal
                        .wait(request)
                        .unwrap_or_else(|p| p.into_inner());
                }
                if request.closing {
                    return;
                }
                request.take()
            };
            self.run_wanted(wanted);
        }
    }

    /// Runs the background work that is due now, on this thread, without waiting for more.
    fn run_background_work(&self) {
        let wanted = self
            .checkpoint_wanted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.run_wanted(wanted);
    }

    /// Carries out `(checkpoint, spare, dedupe_move)`, as `CheckpointRequest::take` gave them.
    fn run_wanted(&self, (checkpoint, spare, dedupe_move): (bool, bool, bool)) {
        // A failed spare leaves the writer appending to its journal past the segment, more
        // slowly; the next segment change asks again.
        if spare && let Err(error) = self.prepare_spare() {
            warn_background_failed(&self.dir, "zero-filling a spare journal segment", &error);
        }
        // A failure leaves the old files in place, which recovery still reads; the next commit
        // past the bound asks again.
        if checkpoint && let Err(error) = self.checkpoint() {
            warn_background_failed(&self.dir, "a checkpoint", &error);
        }
        // After a checkpoint (which moved them too) this finds few or none.
        if dedupe_move && let Err(error) = self.move_dedupe_records() {
            warn_move_failed(&self.dir, &error);
        }
    }

    /// Sets what `set` asks of the background thread and wakes it.
    fn want_background(&self, set: impl FnOnce(&mut CheckpointRequest)) {
        let mut request = self
            .checkpoint_wanted
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        set(&mut request);
        self.checkpoint_signal.notify_one();
    }

    /// Moves the recent dedupe records to the tier, in one sorted ingestion.
    fn move_dedupe_records(&self) -> Result<(), StoreError> {
        let running = self.lock_dedupe_move();
        self.check_poisoned()?;
        let moving = {
            let _writer = self.lock_writer();
            self.freeze_dedupe_records()
        };
        self.ingest_dedupe_records(moving, None, &running)
    }

    /// Takes the recent dedupe records for a move (the caller holds the writer lock): readers
    /// find them in `dedupe_moving` until it ends.
    fn freeze_dedupe_records(&self) -> Option<Arc<DedupeRecords>> {
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        if state.dedupe_recent.is_empty() {
            return None;
        }
        let moving = Arc::new(std::mem::take(&mut state.dedupe_recent));
        state.dedupe_moving = Some(Arc::clone(&moving));
        state.dedupe_moving_bytes = std::mem::take(&mut state.dedupe_recent_bytes);
        Some(moving)
    }

    /// Writes `moving` into the tier as new tables, then ends the move: tombstones again for
    /// what was deleted meanwhile (the tables are newer than the first ones), and memory given
    /// back. A failure poisons the store: the tier's state is unknown, and the reopen replays
    /// the journals, which still hold every record. `_running` is the move lock. Records
    /// within `skipped` (begin, end) are not written: they end with the move.
    fn ingest_dedupe_records(
        &self,
        moving: Option<Arc<DedupeRecords>>,
        skipped: Option<(&[u8], &[u8])>,
        _running: &MutexGuard<'_, ()>,
    ) -> Result<(), StoreError> {
        let Some(moving) = moving else {
            return Ok(());
        };
        let poison = |error: StoreError| {
            self.poisoned.store(true, Ordering::Release);
            error
        };
        let (below, from) = match skipped {
            Some((begin, end)) => (Bound::Excluded(begin), Bound::Included(end)),
            None => (Bound::Unbounded, Bound::Unbounded),
        };
        let ingested = moving.range(Bound::Unbounded, below);
        // Without a skipped range the first part holds every record.
        let after_skipped = skipped.map(|_| moving.range(from, Bound::Unbounded));
        self.dedupe
            .ingest_sorted(
                ingested
                    .chain(after_skipped.into_iter().flatten())
                    .map(|(key, value)| (key, value.clone())),
            )
            .map_err(poison)?;
        // The writer lock keeps commits out from here until the move ends: a delete that
        // wrote its tombstone before the ingestion but reaches memory after the end would
        // otherwise leave the record alive in the new tables.
        let _writer = self.lock_writer();
        let deleted: Vec<Bytes> = self
            .read_state()
            .dedupe_deleted_while_moving
            .iter()
            .cloned()
            .collect();
        self.dedupe
            .write_unsynced(deleted.iter().map(|key| (&key[..], None)))
            .map_err(poison)?;
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        state.dedupe_moving = None;
        state.dedupe_moving_bytes = 0;
        state.dedupe_deleted_while_moving.clear();
        self.dedupe_bytes_now
            .store(state.dedupe_memory_bytes(), Ordering::Relaxed);
        Ok(())
    }

    /// Asks the background thread to zero-fill a spare journal segment.
    fn want_spare(&self) {
        if self.options.journal_segment_bytes == 0 {
            return;
        }
        self.want_background(|request| request.spare_wanted = true);
    }

    /// Zero-fills a new spare segment and offers it to the writer, unless one is ready.
    fn prepare_spare(&self) -> Result<(), StoreError> {
        if self
            .spare
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            return Ok(());
        }
        let number = self.spares_made.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{SPARE_PREFIX}{number}{TMP_SUFFIX}"));
        let segment_bytes = self.options.journal_segment_bytes;
        let filled =
            at_lowest_priority("store-zero-fill", || zero_filled_file(&path, segment_bytes))
                .and_then(std::convert::identity);
        let file = match filled {
            Ok(file) => file,
            Err(error) => {
                let _ = std::fs::remove_file(&path);
                return Err(error);
            }
        };
        *self.spare.lock().unwrap_or_else(|p| p.into_inner()) = Some((file, path));
        Ok(())
    }

    /// Moves the writer to journal `journal_id + 1`: the zero-filled spare if one is ready;
    /// otherwise, unless `only_spare`, a new appending journal (with `only_spare` the writer
    /// stays and writes past its segment's end).
    fn next_journal(&self, writer: &mut Writer, only_spare: bool) -> Result<(), StoreError> {
        // The pending commit is in the current journal: durable and in the map before the
        // writer leaves it (a checkpoint snapshots the map and deletes the journals before).
        self.sync_written(writer)?;
        let id = writer.journal_id + 1;
        let spare = self.spare.lock().unwrap_or_else(|p| p.into_inner()).take();
        let (journal, capacity, direct) = match spare {
            Some((file, spare_path)) => {
                let path = self.dir.join(file_name(JOURNAL_PREFIX, id));
                if let Err(error) = std::fs::rename(&spare_path, &path) {
                    let _ = std::fs::remove_file(&spare_path);
                    self.want_spare();
                    return Err(io(
                        format!("rename the spare journal to {}", path.display()),
                        error,
                    ));
                }
                if let Err(error) = sync_dir(&self.dir) {
                    // The next journal exists, maybe not durably: only a reopen (recovery)
                    // knows where commits can go. Until then the store refuses.
                    self.poisoned.store(true, Ordering::Release);
                    return Err(error);
                }
                self.want_spare();
                let direct = open_direct(&self.options, &path);
                (file, self.options.journal_segment_bytes, direct)
            }
            // No spare ready: ask again, since a spare whose preparation failed is not
            // retried until something asks; meanwhile records append through the page cache.
            None if only_spare => {
                self.want_spare();
                return Ok(());
            }
            None => match create_journal(&self.dir, id) {
                Ok(file) => {
                    self.want_spare();
                    (file, 0, None)
                }
                Err(error) => {
                    // The file may exist (its directory sync failed): as above.
                    self.poisoned.store(true, Ordering::Release);
                    return Err(error);
                }
            },
        };
        let journal = Arc::new(journal);
        self.lock_pending().journal = Arc::clone(&journal);
        writer.journal = journal;
        writer.journal_id = id;
        writer.journal_offset = 0;
        writer.journal_capacity = capacity;
        writer.direct = direct;
        Ok(())
    }

    /// Starts a new journal, writes every live pair to a snapshot named after it, and deletes
    /// the older journals and snapshots.
    fn checkpoint(&self) -> Result<(), StoreError> {
        let running = self.lock_checkpoint();
        self.checkpoint_locked(&running, None)
    }

    fn lock_dedupe_move(&self) -> MutexGuard<'_, ()> {
        self.dedupe_move_running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a move of dedupe records that commits asked for meanwhile, if any: a checkpoint
    /// calls it between the chunks of its snapshot, which can take seconds, so the records
    /// stay near their bound.
    fn move_dedupe_records_if_wanted(&self) -> Result<(), StoreError> {
        let wanted = std::mem::take(
            &mut self
                .checkpoint_wanted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .dedupe_move_wanted,
        );
        if wanted {
            self.move_dedupe_records()
                .inspect_err(|error| warn_move_failed(&self.dir, error))?;
        }
        Ok(())
    }

    fn lock_checkpoint(&self) -> MutexGuard<'_, ()> {
        self.checkpoint_running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// [`checkpoint`](Inner::checkpoint) with `checkpoint_running` held by the caller. On a
    /// failure after the journal switch it puts the counts back, so the next erase pass or
    /// full journal tries again, and deletes its partial snapshot.
    ///
    /// `dropping`: a range of dedupe records the caller drops from the tier next (decision
    /// 0038). Those still in memory are not ingested first: they leave with the journals
    /// that held them, and readers stop finding them when the move ends, as they stop
    /// finding the tier's once its tables are dropped.
    fn checkpoint_locked(
        &self,
        _running: &MutexGuard<'_, ()>,
        dropping: Option<(&[u8], &[u8])>,
    ) -> Result<(), StoreError> {
        let moving_lock = self.lock_dedupe_move();
        self.check_poisoned()?;
        let (id, journal_bytes, deleted, moving) = {
            let mut writer = self.lock_writer();
            // A commit that failed while this waited for the lock poisoned the store: a new
            // journal after its torn record would make recovery see damage.
            self.check_poisoned()?;
            self.next_journal(&mut writer, false)?;
            let id = writer.journal_id;
            // Counted from here: what goes to the new journal.
            (
                id,
                self.journal_bytes_since_checkpoint
                    .swap(0, Ordering::Relaxed),
                self.deleted_since_checkpoint.swap(false, Ordering::AcqRel),
                // Every dedupe record of the journals before `id`, unless already in the tier.
                self.freeze_dedupe_records(),
            )
        };
        // The journals before `id` may go once the snapshot is written and the tier holds
        // their dedupe records (ingested, durable) and their deletes' tombstones (synced here).
        let written = self
            .ingest_dedupe_records(moving, dropping, &moving_lock)
            .and_then(|()| {
                // Moves may run again (between the snapshot's chunks): what they move is in
                // the journals this checkpoint keeps.
                drop(moving_lock);
                self.dedupe.persist()
            })
            .inspect_err(|_| {
                // fjall is poisoned now: every later tier write fails. Refuse commits from here
                // (not after a durable one), until the reopen recovers the tier.
                self.poisoned.store(true, Ordering::Release);
            })
            .and_then(|()| self.write_snapshot(id));
        if written.is_err() {
            self.journal_bytes_since_checkpoint
                .fetch_add(journal_bytes, Ordering::Relaxed);
            if deleted {
                self.deleted_since_checkpoint.store(true, Ordering::Release);
            }
            let _ = std::fs::remove_file(
                self.dir
                    .join(format!("{}{TMP_SUFFIX}", file_name(SNAPSHOT_PREFIX, id))),
            );
        }
        written
    }

    /// Writes `snapshot-{id}` from the map, then deletes the journals and snapshots before it.
    fn write_snapshot(&self, id: u64) -> Result<(), StoreError> {
        let name = file_name(SNAPSHOT_PREFIX, id);
        let tmp_path = self.dir.join(format!("{name}{TMP_SUFFIX}"));
        let write = || -> std::io::Result<()> {
            let mut file = std::io::BufWriter::with_capacity(
                1 << 20,
                OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .write(true)
                    .open(&tmp_path)?,
            );
            let mut chunk = Vec::new();
            let mut after: Option<Vec<u8>> = None;
            loop {
                chunk.clear();
                let mut last = None;
                {
                    let state = self.read_state();
                    let lower = match &after {
                        Some(key) => Bound::Excluded(key.as_slice()),
                        None => Bound::Unbounded,
                    };
                    // The map holds short keys as numbers: each is copied out (inline in a
                    // `Bytes`, no allocation), values shared.
                    let mut pairs: Vec<(Bytes, Bytes)> = Vec::new();
                    let mut pairs_bytes = 0usize;
                    state
                        .map
                        .visit_range(lower, Bound::Unbounded, &mut |key, value| {
                            pairs_bytes += key.len() + value.len();
                            pairs.push((Bytes::from(key), value.clone()));
                            pairs.len() < CHECKPOINT_CHUNK_PAIRS
                                && pairs_bytes < CHECKPOINT_CHUNK_BYTES
                        });
                    if let Some((key, _)) = pairs.last() {
                        last = Some(key.to_vec());
                        encode_record(
                            &mut chunk,
                            pairs
                                .iter()
                                .map(|(key, value)| (&key[..], Some(&value[..]))),
                            self.salt.codec(),
                        );
                    }
                }
                let Some(last) = last else { break };
                file.write_all(&chunk)?;
                after = Some(last);
                // A failed move poisoned the store: this checkpoint ends with it.
                self.move_dedupe_records_if_wanted()
                    .map_err(|error| std::io::Error::other(error.to_string()))?;
            }
            // The end record, empty: a snapshot cut at a record's boundary (a copy or restore
            // in part; a crash cannot, the file is synced before it is renamed) is refused
            // rather than read as a store without the pairs after the cut.
            chunk.clear();
            encode_record(&mut chunk, std::iter::empty(), self.salt.codec());
            file.write_all(&chunk)?;
            let file = file.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()
        };
        write().map_err(|e| io(format!("write snapshot {}", tmp_path.display()), e))?;
        let path = self.dir.join(&name);
        std::fs::rename(&tmp_path, &path).map_err(|e| {
            io(
                format!("rename {} to {}", tmp_path.display(), path.display()),
                e,
            )
        })?;
        sync_dir(&self.dir)?;
        // The snapshot and the journals from `id` on hold everything now. Partial snapshots
        // of failed checkpoints go too.
        // (A spare journal segment is a `.tmp` of the journals: it stays.)
        let mut spares = Vec::new();
        for old in list_ids(&self.dir, JOURNAL_PREFIX, &mut spares)? {
            if old < id {
                remove(&self.dir, &file_name(JOURNAL_PREFIX, old))?;
            }
        }
        let mut partial_snapshots = Vec::new();
        for old in list_ids(&self.dir, SNAPSHOT_PREFIX, &mut partial_snapshots)? {
            if old < id {
                remove(&self.dir, &file_name(SNAPSHOT_PREFIX, old))?;
            }
        }
        for path in partial_snapshots {
            let _ = std::fs::remove_file(path);
        }
        sync_dir(&self.dir)
    }
}

/// core has no logging: a failed background task goes to stderr.
fn warn_background_failed(dir: &Path, what: &str, error: &StoreError) {
    eprintln!(
        "courier: {what} of the log store in {} failed ({error}); the next one tries again",
        dir.display()
    );
}

fn warn_move_failed(dir: &Path, error: &StoreError) {
    eprintln!(
        "courier: moving dedupe records to the tier of the log store in {} failed ({error}); \
         the store refuses commits until it is reopened, which recovers them from its journals",
        dir.display()
    );
}

/// A transaction on a [`LogStore`].
pub struct LogTransaction<'a> {
    overlay: Overlay<LogEngine<'a>>,
}

impl std::fmt::Debug for LogTransaction<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogTransaction")
    }
}

struct LogEngine<'a> {
    inner: &'a Inner,
    access: LogAccess<'a>,
    /// A writer's commit returns before its fsync (`Store::begin_unsynced`).
    unsynced: bool,
}

impl std::fmt::Debug for LogEngine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogEngine")
    }
}

/// A writer reads the pending commit, then the map under short read locks (only it and the
/// syncer change the map, and the syncer only with what was pending); a reader holds the read
/// lock for its whole transaction, a consistent snapshot of what is durable.
enum LogAccess<'a> {
    Write(MutexGuard<'a, Writer>),
    Read(RwLockReadGuard<'a, State>),
}

impl LogEngine<'_> {
    fn with_state<T>(&self, read: impl FnOnce(&State) -> T) -> T {
        match &self.access {
            LogAccess::Write(_) => read(&self.inner.read_state()),
            LogAccess::Read(state) => read(state),
        }
    }

    /// Visits the durable pairs in `[begin, end)` and, for a writer, the pending commit's over
    /// them, in key order.
    fn scan_with_pending(
        &self,
        begin: &[u8],
        end: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let pending = match &self.access {
            LogAccess::Write(writer) if writer.left_pending => {
                self.inner.lock_pending().range(begin, end)
            }
            _ => Vec::new(),
        };
        if pending.is_empty() {
            return self.scan_durable(begin, end, visit);
        }
        let mut next = 0;
        let mut stopped = false;
        let mut give = |key: &[u8], value: &[u8], stopped: &mut bool| {
            *stopped = !visit(key, value);
            !*stopped
        };
        self.scan_durable(begin, end, &mut |key, value| {
            while let Some((pending_key, pending_value)) = pending.get(next)
                && pending_key[..] < *key
            {
                next += 1;
                if let Some(pending_value) = pending_value
                    && !give(pending_key, pending_value, &mut stopped)
                {
                    return false;
                }
            }
            if let Some((pending_key, pending_value)) = pending.get(next)
                && pending_key[..] == *key
            {
                next += 1;
                return match pending_value {
                    Some(pending_value) => give(key, pending_value, &mut stopped),
                    None => true,
                };
            }
            give(key, value, &mut stopped)
        })?;
        if !stopped {
            for (key, value) in &pending[next..] {
                if let Some(value) = value
                    && !visit(key, value)
                {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Visits the map's pairs in `[begin, end)`; false when `visit` stopped it.
    fn scan_map(
        &self,
        begin: &[u8],
        end: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> bool {
        self.with_state(|state| {
            state.map.visit_range(
                Bound::Included(begin),
                Bound::Excluded(end),
                &mut |key, value| visit(key, value),
            )
        })
    }
}

impl Engine for LogEngine<'_> {
    fn prefetch(&self, key: &[u8]) {
        if let LogAccess::Write(writer) = &self.access {
            writer.dedupe_filter.prefetch(key);
        }
    }

    fn read(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.check_poisoned()?;
        if let LogAccess::Write(writer) = &self.access {
            if writer.dedupe_filter.is_absent(key) {
                return Ok(None);
            }
            if writer.left_pending
                && let Some(pending) = self.inner.lock_pending().get(key)
            {
                return Ok(pending.map(|value| value.to_vec()));
            }
        }
        if is_dedupe(key) {
            // Memory first, then the tier. A writer holds the writer lock, so nothing changes
            // between the two. A reader holds the map's read lock, so no commit and no move
            // changes memory; what reaches the tier meanwhile (a move's tables, a commit's
            // tombstones) is already in memory, which answers for those keys first.
            return match self.with_state(|state| state.dedupe_in_memory(key)) {
                DedupeInMemory::Value(value) => Ok(Some(value)),
                DedupeInMemory::Deleted => Ok(None),
                DedupeInMemory::Unknown => self.inner.dedupe.read_latest(key),
            };
        }
        Ok(self.with_state(|state| state.map.get(key).map(|value| value.to_vec())))
    }

    fn scan(
        &self,
        begin: &[u8],
        end: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        self.inner.check_poisoned()?;
        if begin >= end {
            return Ok(());
        }
        self.scan_with_pending(begin, end, visit)
    }

    fn apply(&mut self, changes: Vec<(Bytes, Option<Bytes>)>) -> Result<CommitVersion, StoreError> {
        match &mut self.access {
            LogAccess::Write(writer) => self.inner.commit(writer, changes, self.unsynced),
            LogAccess::Read(_) if changes.is_empty() => Ok(0),
            LogAccess::Read(_) => Err(StoreError::Io(
                "a read-only transaction cannot commit writes: this is a bug".into(),
            )),
        }
    }
}

impl LogEngine<'_> {
    /// What is durable in `[begin, end)`: the map and the dedupe tier, in key order.
    fn scan_durable(
        &self,
        begin: &[u8],
        end: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        // In key order: the map below the tier's keys, the tier, the map above them.
        let below = (begin, end.min(DEDUPE_BEGIN));
        let tier = (begin.max(DEDUPE_BEGIN), end.min(DEDUPE_END));
        let above = (begin.max(DEDUPE_END), end);
        if below.0 < below.1 && !self.scan_map(below.0, below.1, visit) {
            return Ok(());
        }
        if tier.0 < tier.1
            && !self
                .with_state(|state| state.scan_dedupe(&self.inner.dedupe, tier.0, tier.1, visit))?
        {
            return Ok(());
        }
        if above.0 < above.1 {
            self.scan_map(above.0, above.1, visit);
        }
        Ok(())
    }
}

impl Store for LogStore {
    type Transaction<'a> = LogTransaction<'a>;

    fn begin(&self) -> Result<LogTransaction<'_>, StoreError> {
        self.begin_writer(false)
    }

    fn begin_read(&self) -> Result<LogTransaction<'_>, StoreError> {
        self.inner.check_poisoned()?;
        Ok(LogTransaction {
            overlay: Overlay::new(LogEngine {
                inner: &self.inner,
                access: LogAccess::Read(self.inner.read_state()),
                unsynced: false,
            }),
        })
    }

    fn defers_sync(&self) -> bool {
        true
    }

    fn begin_unsynced(&self) -> Result<LogTransaction<'_>, StoreError> {
        self.begin_writer(true)
    }

    fn sync_through(&self, version: CommitVersion) -> Result<(), StoreError> {
        self.inner.sync_through(version)
    }

    fn drops_tables(&self) -> bool {
        true
    }

    /// The dedupe tier's tables (decision 0038), after a checkpoint. A record moved to the
    /// tier stays in its journal until a checkpoint deletes the journal, and a restart replays
    /// what a journal holds: had its table been dropped meanwhile, the record would come back
    /// into memory below the mark of the sweep that cleared it. The checkpoint deletes every
    /// journal before it, and a commit after it writes records of the current bucket, which
    /// no drop reaches for a window. The range's records still in memory are not ingested
    /// into the tier by that checkpoint only to be dropped: they go with their journals.
    fn drop_tables_within(&self, begin: &[u8], end: &[u8]) -> Result<(), StoreError> {
        let (begin, end) = (begin.max(DEDUPE_BEGIN), end.min(DEDUPE_END));
        if begin >= end {
            return Ok(());
        }
        self.inner.check_poisoned()?;
        let running = self.inner.lock_checkpoint();
        self.inner.checkpoint_locked(&running, Some((begin, end)))?;
        drop(running);
        self.inner.dedupe.drop_tables_within(begin, end)
    }
}

impl LogStore {
    fn begin_writer(&self, unsynced: bool) -> Result<LogTransaction<'_>, StoreError> {
        self.inner.check_poisoned()?;
        Ok(LogTransaction {
            overlay: Overlay::new(LogEngine {
                inner: &self.inner,
                access: LogAccess::Write(self.inner.lock_writer()),
                unsynced,
            }),
        })
    }
}

overlay::overlay_transaction!(LogTransaction<'_>);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Transaction;

    fn pairs(list: &[(&[u8], &[u8])]) -> Vec<(Vec<u8>, Vec<u8>)> {
        list.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
    }

    /// What a reader sees of every key.
    fn read_all(store: &LogStore) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut txn = store.begin_read().expect("begin_read");
        txn.get_range(b"", b"\xff", 100).expect("range")
    }

    /// A pending commit answers reads the same whether it walks its unsorted changes, looks
    /// them up in its index (or walks, when two keys share a hash: forced in a third of the
    /// rounds) or searches them sorted (after a range), and its ranges are in key order: keys
    /// of every length (a key too long to sort as numbers included) and repeated deletes
    /// (overlapping cleared ranges).
    #[test]
    fn a_pending_commit_answers_reads_alike_unsorted_indexed_and_sorted() {
        use std::collections::BTreeMap;
        let mut rng = crate::rng::Rng::new(5);
        for round in 0..200 {
            let key = |rng: &mut crate::rng::Rng| -> Vec<u8> {
                let len = if rng.below(20) == 0 {
                    41
                } else {
                    rng.below(5) as usize
                };
                (0..len).map(|_| rng.below(3) as u8).collect()
            };
            let mut model: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
            let mut changes = Vec::new();
            for _ in 0..rng.below(40) {
                let k = key(&mut rng);
                let held = model.get(&k).cloned();
                if held == Some(None) && rng.below(2) == 0 {
                    // A delete repeated, as overlapping cleared ranges give.
                    changes.push((Bytes::from(&k[..]), None));
                } else if held.is_none() {
                    let value = (rng.below(2) == 0).then(|| key(&mut rng));
                    changes.push((Bytes::from(&k[..]), value.as_deref().map(Bytes::from)));
                    model.insert(k, value);
                }
            }
            changes.reverse();
            let mut commit = PendingCommit {
                version: 1,
                changes,
                sorted: false,
                walks: 0,
                index: None,
                // A hash of few values (keys collide) or of the key's length and first
                // byte (keys collide in some rounds, and a key absent from the commit can
                // hash like one in it), or the real one.
                hash: match round % 3 {
                    0 => |key: &[u8]| key.len() as u64 % 3,
                    1 => {
                        |key: &[u8]| (key.len() as u64) << 8 | u64::from(*key.first().unwrap_or(&9))
                    }
                    _ => hash_pending_key,
                },
                record_at: 0,
                record_bytes: 0,
            };
            let as_vec = |state: Option<Option<Bytes>>| state.map(|v| v.map(|v| v.to_vec()));
            // Walks, then the index; every few rounds a range sorts them part way.
            for read in 0..2 * PENDING_WALKS_MAX + 4 {
                if round % 3 == 0 && read == PENDING_WALKS_MAX + 2 {
                    let (begin, end) = (key(&mut rng), key(&mut rng));
                    let got: Vec<_> = commit
                        .range(&begin, &end)
                        .iter()
                        .map(|(k, v)| (k.to_vec(), v.as_ref().map(|v| v.to_vec())))
                        .collect();
                    let want: Vec<_> = model
                        .iter()
                        .filter(|(k, _)| begin <= **k && **k < end)
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    assert_eq!(got, want, "range {begin:?}..{end:?}");
                }
                let k = key(&mut rng);
                assert_eq!(as_vec(commit.get(&k)), model.get(&k).cloned(), "{k:?}");
            }
        }
    }

    /// A commit from `begin_unsynced` is pending until it is durable (decision 0027): the
    /// next writer reads it in front of the map (gets, dedupe records, ranges, its deletes);
    /// a reader sees it only once synced, by `sync_through` or by the next commit, which
    /// makes the one before it durable before it writes; and it survives a reopen.
    #[test]
    fn the_search_after_a_bad_record_finds_a_whole_one_and_gives_up_past_its_budget() {
        let mut record = Vec::new();
        // Files of version 3: no length tags.
        const SEED: Codec = Codec {
            seed: 0x5eed,
            tagged: false,
        };
        encode_record(
            &mut record,
            [(&b"key"[..], Some(&b"value"[..]))].into_iter(),
            SEED,
        );
        // A bad record (its checksum broken), then zeros: a tear.
        let mut tail = record.clone();
        tail[5] ^= 0xff;
        tail.extend_from_slice(&[0u8; 4096]);
        assert_eq!(whole_record_after(&tail, usize::MAX, SEED), Some(false));
        // A whole record after it: damage.
        let mut damaged = tail.clone();
        damaged.extend_from_slice(&record);
        assert_eq!(whole_record_after(&damaged, usize::MAX, SEED), Some(true));
        // One that checks only under another seed (a body's crafted record) is not.
        assert_eq!(
            whole_record_after(
                &damaged,
                usize::MAX,
                Codec {
                    seed: SEED.seed + 1,
                    ..SEED
                }
            ),
            Some(false)
        );
        // A body of repeated small lengths makes every fourth offset a candidate to hash: the
        // search stops at its budget instead of hashing for hours.
        let mut crafted = tail[..record.len()].to_vec();
        for _ in 0..(1 << 16) {
            crafted.extend_from_slice(&[0x00, 0x10, 0x00, 0x00]);
        }
        crafted.extend_from_slice(&[0u8; 1 << 16]);
        assert_eq!(whole_record_after(&crafted, 64 << 20, SEED), None);
    }

    /// In a file of version 4 a candidate's length tag is checked before its payload is
    /// hashed: the body of repeated lengths that made the search give up above (and the store
    /// refuse to open after an ordinary crash) is searched through, and called a tear; a whole
    /// record after a bad one is still found.
    #[test]
    fn length_tags_keep_a_crafted_body_from_exhausting_the_search() {
        const CODEC: Codec = Codec {
            seed: 0x5eed,
            tagged: true,
        };
        let mut record = Vec::new();
        encode_record(
            &mut record,
            [(&b"key"[..], Some(&b"value"[..]))].into_iter(),
            CODEC,
        );
        assert!(decode_record(&record, CODEC).is_ok());
        let mut bad = record.clone();
        bad[5] ^= 0xff;
        // A record of another length whose tag would not check: refused before its payload.
        let mut tail = bad.clone();
        for _ in 0..(1 << 16) {
            tail.extend_from_slice(&[0x00, 0x10, 0x00, 0x00]);
        }
        tail.extend_from_slice(&[0u8; 1 << 20]);
        // A budget of 0 bytes: any candidate hashed would end the search.
        assert_eq!(
            whole_record_after(&tail, 0, CODEC),
            Some(false),
            "no candidate of the crafted body got past its length tag"
        );
        let mut damaged = tail.clone();
        damaged.truncate(tail.len() - (1 << 20));
        damaged.extend_from_slice(&record);
        damaged.extend_from_slice(&[0u8; 4096]);
        assert_eq!(
            whole_record_after(&damaged, usize::MAX, CODEC),
            Some(true),
            "a whole record after the bad one: damage"
        );
        // A record checked without tags does not pass as a tagged one, nor the reverse.
        let untagged = Codec {
            tagged: false,
            ..CODEC
        };
        assert!(decode_record(&record, untagged).is_err());
        let mut old = Vec::new();
        encode_record(
            &mut old,
            [(&b"key"[..], Some(&b"value"[..]))].into_iter(),
            untagged,
        );
        assert!(decode_record(&old, CODEC).is_err());
    }

    #[test]
    fn a_commit_a_crash_left_unsynced_is_made_durable_before_a_reopen_uses_it() {
        // A journal appended through the page cache ends right after its last record, the
        // ending a replay calls clean; before, only torn or zero-padded endings were synced.
        for segment_bytes in [0, LogOptions::default().journal_segment_bytes] {
            let dir = tempfile::tempdir().expect("temp dir");
            let options = LogOptions {
                journal_segment_bytes: segment_bytes,
                ..LogOptions::default()
            };
            {
                let store = LogStore::open(dir.path(), &options).expect("open");
                let mut txn = store.begin_unsynced().expect("begin_unsynced");
                txn.set(b"xa", b"written, never synced");
                txn.commit().expect("commit");
                // The process dies here: no sync, the bytes wherever the write left them.
            }
            let store = LogStore::open(dir.path(), &options).expect("reopen");
            assert_eq!(
                read_all(&store),
                pairs(&[(b"xa", b"written, never synced")]),
                "segment {segment_bytes}"
            );
            assert!(
                store.recovery().journals_synced >= 1,
                "segment {segment_bytes}: recovery synced the journal it replayed"
            );
        }
    }

    #[test]
    fn a_pending_commit_is_seen_by_the_next_writer_and_by_readers_once_durable() {
        let dir = tempfile::tempdir().expect("temp dir");
        let options = LogOptions::default();
        let store = LogStore::open(dir.path(), &options).expect("open");
        let mut txn = store.begin().expect("begin");
        txn.set(b"xa", b"1");
        txn.set(b"xb", b"1");
        txn.commit().expect("commit");

        let mut txn = store.begin_unsynced().expect("begin_unsynced");
        txn.set(b"xc", b"2");
        txn.set(b"d-dedupe", b"2");
        txn.clear(b"xa");
        let first = txn.commit().expect("commit");
        let durable = pairs(&[(b"xa", b"1"), (b"xb", b"1")]);
        assert_eq!(
            read_all(&store),
            durable,
            "a reader never sees a pending commit"
        );

        let mut txn = store.begin_unsynced().expect("begin_unsynced");
        assert_eq!(txn.get(b"xa").expect("get"), None, "the pending delete");
        assert_eq!(txn.get(b"xc").expect("get"), Some(b"2".to_vec()));
        assert_eq!(txn.get(b"d-dedupe").expect("get"), Some(b"2".to_vec()));
        assert_eq!(
            txn.get_range(b"x", b"y", 10).expect("range"),
            pairs(&[(b"xb", b"1"), (b"xc", b"2")]),
            "ranges merge the pending commit over the map"
        );
        assert_eq!(
            txn.get_range(b"x", b"y", 1).expect("range"),
            pairs(&[(b"xb", b"1")]),
            "a limit stops the merge"
        );
        txn.clear_range(b"xc", b"xd");
        txn.set(b"xd", b"3");
        let second = txn.commit().expect("commit");
        assert_eq!(
            read_all(&store),
            pairs(&[(b"d-dedupe", b"2"), (b"xb", b"1"), (b"xc", b"2")]),
            "the second commit made the first durable before it wrote, and only the first"
        );
        store.sync_through(first).expect("sync");
        assert_eq!(
            read_all(&store).len(),
            3,
            "synced already: nothing more shows"
        );
        store.sync_through(second).expect("sync");
        let last = pairs(&[(b"d-dedupe", b"2"), (b"xb", b"1"), (b"xd", b"3")]);
        assert_eq!(read_all(&store), last);

        let mut txn = store.begin_unsynced().expect("begin_unsynced");
        txn.set(b"xe", b"4");
        txn.commit().expect("commit");
        drop(store);
        let store = LogStore::open(dir.path(), &options).expect("reopen");
        assert_eq!(
            read_all(&store).len(),
            4,
            "a written commit is in the journal (a process crash keeps the page cache)"
        );
    }

    /// Work handed to `at_lowest_priority` runs at nice 19, and the caller keeps its own.
    #[test]
    fn work_at_the_lowest_priority_leaves_the_callers_alone() {
        let nice = || -> i64 {
            let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("stat");
            // After the command in parentheses: state is field 3, nice field 19.
            let fields: Vec<&str> = stat[stat.rfind(')').expect(")") + 2..].split(' ').collect();
            fields[16].parse().expect("nice")
        };
        let before = nice();
        let inside = at_lowest_priority("test-low", nice).expect("ran");
        assert_eq!(inside, 19);
        assert_eq!(nice(), before, "the caller's priority is its own");
    }

    /// A checkpoint starts a new journal and deletes the older ones: the pending commit in
    /// the old journal must be in the map (and so in the snapshot) first.
    #[test]
    fn a_checkpoint_keeps_the_pending_commit() {
        let dir = tempfile::tempdir().expect("temp dir");
        let options = LogOptions::default();
        let store = LogStore::open(dir.path(), &options).expect("open");
        let mut txn = store.begin_unsynced().expect("begin_unsynced");
        txn.set(b"xa", b"1");
        txn.commit().expect("commit");
        store.checkpoint().expect("checkpoint");
        assert_eq!(read_all(&store), pairs(&[(b"xa", b"1")]));
        drop(store);
        let store = LogStore::open(dir.path(), &options).expect("reopen");
        assert!(store.recovery().snapshot);
        assert_eq!(read_all(&store), pairs(&[(b"xa", b"1")]));
    }

    /// A checkpoint of large values writes its snapshot in records of a few megabytes, not
    /// one record per 4,096 pairs (256 MiB of 64 KiB bodies, held whole in memory by the
    /// checkpoint and by the restart that reads it), and a reopen reads them all back.
    #[test]
    fn a_snapshot_of_large_values_is_written_in_bounded_records() {
        let dir = tempfile::tempdir().expect("temp dir");
        let options = LogOptions::default();
        let store = LogStore::open(dir.path(), &options).expect("open");
        let value_bytes = 60_000;
        let mut written = Vec::new();
        for batch in 0..6u8 {
            let mut txn = store.begin_unsynced().expect("begin_unsynced");
            for i in 0..30u8 {
                let key = vec![b'm', batch, i];
                let value = vec![batch ^ i; value_bytes];
                txn.set(&key, &value);
                written.push((key, value));
            }
            txn.commit().expect("commit");
        }
        store.checkpoint().expect("checkpoint");
        drop(store);

        let snapshot = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|entry| entry.expect("entry").path())
            .find(|path| {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                name.starts_with(SNAPSHOT_PREFIX) && !name.ends_with(TMP_SUFFIX)
            })
            .expect("a snapshot");
        let bytes = std::fs::read(&snapshot).expect("read the snapshot");
        let format = std::fs::read_to_string(dir.path().join(FORMAT_FILE)).expect("FORMAT");
        let codec = Salt::parse(&format).expect("a salted FORMAT").codec();
        let (mut at, mut records, mut pairs_read) = (0, 0, 0);
        while at < bytes.len() {
            let (changes, len) = decode_record(&bytes[at..], codec).expect("a whole record");
            assert!(
                len <= CHECKPOINT_CHUNK_BYTES + value_bytes + 4096,
                "a snapshot record of {len} bytes"
            );
            pairs_read += changes.len();
            records += 1;
            at += len;
        }
        assert_eq!(pairs_read, written.len());
        assert!(records >= 3, "{records} records for 10 MB");

        let store = LogStore::open(dir.path(), &options).expect("reopen");
        assert!(store.recovery().snapshot);
        written.sort();
        let mut txn = store.begin_read().expect("begin_read");
        let read = txn.get_range(b"", b"\xff", 1000).expect("range");
        assert_eq!(read, written);
    }

    /// A dedupe record deleted while a move writes it into the tier stays deleted: the
    /// ingested tables are newer than the delete's first tombstone, so the move writes it
    /// again before it ends. Reads and scans during the move merge the moving records, the
    /// recent ones and the deletes; after it, the tier itself holds no deleted record, an
    /// erase pass leaves its body in no file, and a reopen agrees.
    #[test]
    fn a_dedupe_record_deleted_during_its_move_stays_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let marker = b"MARKER-d2a7-deleted-during-a-move";
        let kept = keys::dedupe(3, 1, 2, 10);
        let deleted = keys::dedupe(3, 1, 2, 11);
        let set_again = keys::dedupe(3, 1, 2, 12);
        let recent = keys::dedupe(3, 1, 2, 13);
        let check = |store: &LogStore, when: &str| {
            let mut txn = store.begin_read().unwrap();
            assert_eq!(
                txn.get(&kept).unwrap().as_deref(),
                Some(&b"seq-10"[..]),
                "{when}"
            );
            assert_eq!(txn.get(&deleted).unwrap(), None, "{when}");
            assert_eq!(
                txn.get(&set_again).unwrap().as_deref(),
                Some(&b"again"[..]),
                "{when}"
            );
            assert_eq!(
                txn.get(&recent).unwrap().as_deref(),
                Some(&b"seq-13"[..]),
                "{when}"
            );
            let scanned = txn.get_range(DEDUPE_BEGIN, DEDUPE_END, 100).unwrap();
            let expected: Vec<(Vec<u8>, Vec<u8>)> = vec![
                (kept.to_vec(), b"seq-10".to_vec()),
                (set_again.to_vec(), b"again".to_vec()),
                (recent.to_vec(), b"seq-13".to_vec()),
            ];
            assert_eq!(scanned, expected, "{when}");
        };
        let contains_marker = |dir: &Path| {
            walk(dir).iter().any(|path| {
                std::fs::read(path)
                    .or_else(|e| match e.kind() {
                        std::io::ErrorKind::NotFound => Ok(Vec::new()),
                        _ => Err(e),
                    })
                    .unwrap()
                    .windows(marker.len())
                    .any(|w| w == marker)
            })
        };
        {
            let store = LogStore::open(dir.path(), &LogOptions::default()).unwrap();
            let mut txn = store.begin().unwrap();
            txn.set(&kept, b"seq-10");
            txn.set(&deleted, marker);
            txn.set(&set_again, b"seq-12");
            txn.commit().unwrap();
            let inner = &store.inner;
            let running = inner.lock_dedupe_move();
            let moving = {
                let _writer = inner.lock_writer();
                inner.freeze_dedupe_records()
            };
            assert!(moving.is_some(), "the records were in memory");
            // While the move runs: deletes (their tombstones older than the tables to come),
            // a record deleted and set again, and a new one.
            let mut txn = store.begin().unwrap();
            txn.clear(&deleted);
            txn.clear(&set_again);
            txn.commit().unwrap();
            let mut txn = store.begin().unwrap();
            txn.set(&set_again, b"again");
            txn.set(&recent, b"seq-13");
            txn.commit().unwrap();
            check(&store, "during the move");
            inner.ingest_dedupe_records(moving, None, &running).unwrap();
            drop(running);
            check(&store, "after the move");
            assert_eq!(inner.dedupe.read_latest(&deleted).unwrap(), None);
            assert_eq!(
                inner.dedupe.read_latest(&kept).unwrap().as_deref(),
                Some(&b"seq-10"[..])
            );
            store.erase_deleted().unwrap();
            assert!(
                !contains_marker(dir.path()),
                "the deleted body is still on disk"
            );
            check(&store, "after an erase pass");
        }
        let store = LogStore::open(dir.path(), &LogOptions::default()).unwrap();
        check(&store, "after a reopen");
    }

    /// Every file under `dir`.
    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return found;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                found.extend(walk(&path));
            } else {
                found.push(path);
            }
        }
        found
    }
}
