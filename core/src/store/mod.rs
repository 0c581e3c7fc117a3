//! The FoundationDB-shaped store trait and its backends.
//!
//! A [`Store`] hands out [`Transaction`]s over one ordered byte-key space. A transaction reads
//! its own writes, and its writes land atomically at [`Transaction::commit`] or not at all. The
//! commit logic ([`crate::commit`]) is written once against this trait.
//!
//! The trait is synchronous: the runtime calls it from a thread that may block (a writer thread
//! per shard), never from an executor thread. The FoundationDB backend blocks on its futures in
//! that thread.
//!
//! Backends: [`memory::MemoryStore`] (simulation and tests), [`fjall::FjallStore`] (the embedded
//! default, one fsync per commit) and, behind the `fdb` feature, `fdb::FdbStore` (FoundationDB,
//! see docs/foundationdb.md). The [`fault::FaultStore`] wrapper injects the errors the
//! backends report: conflicts, unknown commit results, failed fsyncs and fencing.
//! [`config::StoreConfig`] says which backend a process runs on; [`clusters`] splits a batch
//! over several stores (one per FoundationDB cluster).

pub mod clusters;
pub mod config;
pub mod conformance;
mod dedupe_filter;
mod dedupe_records;
pub mod fault;
#[cfg(feature = "fdb")]
pub mod fdb;
mod fdb_error;
pub mod fjall;
pub mod flush_probe;
mod key_map;
mod live_map;
pub mod log;
pub mod memory;
mod overlay;
pub mod worker_priority;
mod write_set;

/// Bytes of disk blocks the files under `dir` use: fjall preallocates its journals as sparse
/// files, so their length is not what they use. Unreadable entries (a file deleted meanwhile)
/// count as nothing.
pub fn allocated_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    visit_files(dir, |_, metadata| total += metadata.blocks() * 512);
    total
}

/// Drops the page cache's copy of every file under `dir`, so that what is read next is what
/// the disk holds. After a failed fsync Linux keeps the pages it could not write, marked clean,
/// and reports the error once, to that fsync: a store opened again (by this process after the
/// failure, or by a restarted one while the machine stays up) would read them back as durable
/// commits, answer a retry of the failed commit with "stored", and lose it at the next power
/// cut ("fsyncgate"; `core/tests/writeback_error.rs`). Pages not yet written back (dirty) are
/// kept. A file that cannot be opened is skipped (it cannot be read either).
pub fn drop_cached_pages(dir: &std::path::Path) {
    use std::os::fd::AsRawFd;
    visit_files(dir, |path, _| {
        if let Ok(file) = std::fs::File::open(path) {
            // SAFETY: a plain call on a file descriptor this function holds open.
            #[allow(unsafe_code)]
            unsafe {
                libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
        }
    });
}

/// Calls `visit` with the path and metadata of each file under `dir`, at most `FILES_MAX` of
/// them. Entries that cannot be read (a file deleted meanwhile) are skipped.
fn visit_files(dir: &std::path::Path, mut visit: impl FnMut(&std::path::Path, &std::fs::Metadata)) {
    /// More than a store holds: fjall's tables and journals, the log engine's segments.
    const FILES_MAX: usize = 100_000;
    let mut files = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.metadata() {
                Ok(metadata) if metadata.is_dir() => pending.push(entry.path()),
                Ok(metadata) if metadata.is_file() => {
                    files += 1;
                    if files > FILES_MAX {
                        return;
                    }
                    visit(&entry.path(), &metadata);
                }
                _ => {}
            }
        }
    }
}

/// What can go wrong in a store. The doc of each variant says what the caller does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Nothing was written, and the same transaction may succeed if retried from the start:
    /// another transaction changed what this one read or, on FoundationDB, the transaction was
    /// too old, throttled or timed out before its commit was sent.
    #[error("transaction conflict: retry")]
    Conflict,
    /// The commit may or may not have happened (on FoundationDB also: the transaction timed out
    /// during its commit). Retry; the dedupe key makes the retry a no-op if the first attempt
    /// landed.
    #[error("commit result unknown: retry, the retry is idempotent")]
    CommitUnknown,
    /// The shard's owner epoch in the store is no longer the one this store was opened with:
    /// another process claimed the shard (FoundationDB fencing). Nothing was written, and no
    /// retry can succeed: stop serving the shard. See docs/foundationdb.md, "Fencing".
    #[error("another edge owns this shard: stop serving it")]
    Fenced,
    /// A write or fsync failed (a full disk, a disk error). The store is poisoned: every later
    /// call fails until it is reopened, because what is on disk is no longer known. The edge
    /// reopens it by itself (`ShardStore::recover`).
    #[error("the store failed a write (full disk or disk error) and refuses until it is reopened")]
    Poisoned,
    /// An I/O error, with the underlying message.
    #[error("store i/o error: {0}")]
    Io(String),
    /// The store holds data this version cannot read.
    #[error("store data is corrupt or from a newer version: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether retrying the same transaction may succeed without operator action.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Conflict | StoreError::CommitUnknown)
    }
}

/// A version number assigned to a commit; later commits get larger versions.
pub type CommitVersion = u64;

/// A key-value pair read from a store.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// What [`Transaction::clear_range_bounded`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundedClear {
    /// Keys read to find what to delete (0 where the engine clears a range without reading).
    pub keys_read: usize,
    /// The whole range is cleared; otherwise only a first part of it, and the rest is left
    /// for another transaction.
    pub finished: bool,
    /// When not finished: the first key left, where the next clear can begin (below it the
    /// range is cleared).
    pub resume_at: Option<Vec<u8>>,
}

/// An ordered, transactional key-value store.
pub trait Store: Send + Sync {
    type Transaction<'a>: Transaction
    where
        Self: 'a;

    /// Starts a transaction. Embedded backends serialise writers: hold a transaction briefly.
    fn begin(&self) -> Result<Self::Transaction<'_>, StoreError>;

    /// Starts a transaction that only reads, from a consistent snapshot. Embedded backends take
    /// no writer lock for it, so reads (syncs) never wait for a commit's fsync. Committing
    /// writes from it is an error.
    fn begin_read(&self) -> Result<Self::Transaction<'_>, StoreError> {
        self.begin()
    }

    /// Whether [`begin_unsynced`](Store::begin_unsynced) transactions commit before they are
    /// durable (the log store). The others' commits are durable when they return.
    fn defers_sync(&self) -> bool {
        false
    }

    /// Starts a write transaction whose `commit` returns once its writes are in the store's
    /// log, before they are durable (decision 0027): later write transactions see them,
    /// readers (`begin_read`) do not until [`sync_through`](Store::sync_through) has made them
    /// durable. The caller tells nobody about the commit before that. Stores that do not
    /// [`defer_sync`](Store::defers_sync) start a plain transaction.
    fn begin_unsynced(&self) -> Result<Self::Transaction<'_>, StoreError> {
        self.begin()
    }

    /// Whether [`drop_tables_within`](Store::drop_tables_within) can drop anything: the engine
    /// keeps keys in tables it can drop whole (fjall). Expiry then clears old dedupe buckets
    /// by dropping their tables rather than with a tombstone per record.
    fn drops_tables(&self) -> bool {
        false
    }

    /// Drops the tables that hold only keys in `begin..end`, without a tombstone per key: a
    /// fast clear of a range nothing reads any more (old dedupe buckets). What is in no such
    /// table (memtables, tables that reach past either end) stays, to be cleared key by key;
    /// and a key deleted before may come back (its tombstone gone with a dropped table, its
    /// value in one that stayed), so clear the range from its start after a drop.
    fn drop_tables_within(&self, begin: &[u8], end: &[u8]) -> Result<(), StoreError> {
        let _ = (begin, end);
        Ok(())
    }

    /// Makes every commit up to `version` (what `commit` returned) durable and visible to
    /// readers. An error (a failed fsync) poisons the store: the commit may or may not be on
    /// disk, and every later call fails until it is reopened.
    fn sync_through(&self, version: CommitVersion) -> Result<(), StoreError> {
        let _ = version;
        Ok(())
    }

    /// The lease this store's commits run under (edge and epoch; `crate::takeover`), if any.
    /// A committer forgets what it cached when it changes: another holder may have written
    /// the inboxes in between.
    fn lease_claim(&self) -> Option<(u32, u64)> {
        None
    }
}

/// A shared store: the edges of a test process share one memory store this way, standing in
/// for FoundationDB (`courier_edge::server::EdgeStore::SharedMemory`).
impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    type Transaction<'a>
        = S::Transaction<'a>
    where
        Self: 'a;

    fn begin(&self) -> Result<Self::Transaction<'_>, StoreError> {
        (**self).begin()
    }

    fn begin_read(&self) -> Result<Self::Transaction<'_>, StoreError> {
        (**self).begin_read()
    }

    fn defers_sync(&self) -> bool {
        (**self).defers_sync()
    }

    fn begin_unsynced(&self) -> Result<Self::Transaction<'_>, StoreError> {
        (**self).begin_unsynced()
    }

    fn sync_through(&self, version: CommitVersion) -> Result<(), StoreError> {
        (**self).sync_through(version)
    }

    fn lease_claim(&self) -> Option<(u32, u64)> {
        (**self).lease_claim()
    }
}

/// One transaction. Dropping it without [`commit`](Transaction::commit) discards its writes.
pub trait Transaction {
    /// The value of `key`, seeing this transaction's own writes.
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Like [`get`](Transaction::get), without a read conflict: a concurrent writer of `key`
    /// does not make this transaction fail (FoundationDB's snapshot read). Embedded backends
    /// serialise writers, so for them it is `get`. Use it only where a stale value is safe.
    fn get_snapshot(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(key)
    }

    /// The values of `keys`, in their order, as [`get`](Transaction::get) reads each. On
    /// FoundationDB the reads are in flight together, one round trip for all instead of one
    /// each; the embedded backends read one after another, from memory.
    fn get_many(&mut self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        keys.iter().map(|key| self.get(key)).collect()
    }

    /// Up to `limit` pairs with `begin <= key < end`, in key order, seeing own writes.
    fn get_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError>;

    /// Like [`get_range`](Transaction::get_range), handing each pair to `visit` (which returns
    /// false to stop) instead of collecting copies: the embedded engines lend their own bytes.
    fn scan_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        for (key, value) in self.get_range(begin, end, limit)? {
            if !visit(&key, &value) {
                break;
            }
        }
        Ok(())
    }

    fn set(&mut self, key: &[u8], value: &[u8]);

    /// A hint that `key` is read soon: an engine may start loading from memory what that
    /// read will touch (or, on FoundationDB, send the read), so that the loads of a batch's
    /// reads overlap instead of each waiting in turn. No effect on any answer: a read must
    /// still see the writes made between the hint and it.
    fn prefetch(&self, _key: &[u8]) {}

    /// Makes the commit conflict with any other that writes `key` after this transaction
    /// began, as a read of `key` would, without reading it: for a caller that decides from a
    /// value it knows already (the committer's cache of an inbox's last seq). On FoundationDB
    /// a read conflict range, which costs no round trip; a commit whose result was unknown and
    /// lands late then cannot overwrite what a later commit wrote from the value it read. The
    /// embedded stores commit one transaction at a time and never land one late: nothing.
    fn add_read_conflict(&mut self, _key: &[u8]) {}

    /// [`Transaction::add_read_conflict`] for every key from `begin` up to `end`, those not
    /// stored included, as a range read would: for a caller that decides from what it knows
    /// of a whole range (the committer's cache of an inbox's device records), which a later
    /// commit may add a key to.
    fn add_read_conflict_range(&mut self, _begin: &[u8], _end: &[u8]) {}

    /// Whether this store holds values of up to 20 bytes inline (fjall's byte strings, in
    /// every embedded engine), so that a shorter value saves an allocation. The committer
    /// writes dedupe records short only then (decision 0002): FoundationDB gains nothing from
    /// it, and edges of two versions share its records during a rolling upgrade.
    fn holds_short_values_inline(&self) -> bool {
        false
    }

    /// Sets `key` to `head` followed by `tail` (a message's header and body): the embedded
    /// engines build the value in one allocation, without a buffer to join them first.
    fn set_concat(&mut self, key: &[u8], head: &[u8], tail: &[u8]) {
        let mut value = Vec::with_capacity(head.len() + tail.len());
        value.extend_from_slice(head);
        value.extend_from_slice(tail);
        self.set(key, &value);
    }

    fn clear(&mut self, key: &[u8]);

    /// Clears every key with `begin <= key < end`.
    fn clear_range(&mut self, begin: &[u8], end: &[u8]);

    /// Clears every key with `begin <= key < end`, like
    /// [`clear_range`](Transaction::clear_range), where the caller knows every key the range
    /// can hold: `keys`, each inside the range (a run of message keys of one inbox, say). The
    /// embedded engines have no range delete: for a plain range clear they scan the range at
    /// commit for the keys to delete; here they delete the listed keys without reading.
    /// FoundationDB clears the range. A key of the range that is not listed may survive on the
    /// embedded engines, so list them all, keys this transaction wrote included.
    fn clear_range_with_keys<K: AsRef<[u8]>>(
        &mut self,
        begin: &[u8],
        end: &[u8],
        keys: impl IntoIterator<Item = K>,
    ) {
        let _ = keys;
        self.clear_range(begin, end);
    }

    /// Clears `begin..end`, but on engines that delete key by key (the embedded ones: no range
    /// delete) at most its first `keys_max` keys (at least one), so that a transaction clearing a range of
    /// unknown size stays bounded; `finished` says whether the whole range is gone. FoundationDB
    /// clears the whole range without reading.
    fn clear_range_bounded(
        &mut self,
        begin: &[u8],
        end: &[u8],
        keys_max: usize,
    ) -> Result<BoundedClear, StoreError> {
        let _ = keys_max;
        self.clear_range(begin, end);
        Ok(BoundedClear {
            keys_read: 0,
            finished: true,
            resume_at: None,
        })
    }

    /// Adds `delta` to the little-endian u64 at `key` (a missing key counts as 0), wrapping,
    /// like FoundationDB's `ADD` mutation.
    fn atomic_add(&mut self, key: &[u8], delta: u64);

    /// Stores the larger of `value` and the little-endian u64 at `key`, like FoundationDB's
    /// `MAX` mutation.
    fn atomic_max(&mut self, key: &[u8], value: u64);

    /// Makes every write durable and visible, atomically.
    fn commit(self) -> Result<CommitVersion, StoreError>;
}

/// Applies a little-endian u64 mutation to an existing value, as FoundationDB does.
pub(crate) fn apply_atomic(existing: Option<&[u8]>, op: AtomicOp) -> Vec<u8> {
    let current = existing.and_then(crate::keys::le_u64).unwrap_or(0);
    let next = match op {
        AtomicOp::Add(delta) => current.wrapping_add(delta),
        AtomicOp::Max(value) => current.max(value),
    };
    next.to_le_bytes().to_vec()
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum AtomicOp {
    Add(u64),
    Max(u64),
}
