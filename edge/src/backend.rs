//! The store behind a shard: an embedded store (fjall, or the log store with `store.engine =
//! "log"`), or FoundationDB (feature `fdb`).
//!
//! Shards call the store only through [`ShardStore`], on their store threads (`lanes`). The
//! embedded store is one database per shard (`stores`), so shards never wait on each
//! other's commits; with FoundationDB each shard claims its shard id on every cluster (fencing any
//! earlier owner) and commits one transaction per cluster a batch touches. In a cluster of
//! edges on FoundationDB the process claims one owner key for the edge instead, and with
//! takeover every commit also runs under a lease (`courier_core::takeover`).

use std::sync::Arc;

use courier_core::commit::{
    Committer, ExpireReport, InboxPage, Outcome, Request, expire, read_inbox,
};
use courier_core::placement::EdgeId;
use std::path::Path;

use courier_core::commit::KeySizes;
use courier_core::store::fjall::{FjallOptions, FjallStore};
use courier_core::store::log::{LogOptions, LogStore};
use courier_core::store::worker_priority::BackgroundPriority;
use courier_core::store::{Store, StoreError};
use courier_core::takeover::Lease;
use courier_core::{CoreConfig, UnixMillis, UserId};

/// Makes a commit written by [`ShardStore::commit_unsynced`] durable; blocks for an fsync.
pub type SyncCommit = Box<dyn FnOnce() -> Result<(), StoreError> + Send>;

/// What a shard needs from its store. Every method blocks: call it from a blocking thread.
pub trait ShardStore: Send + Sync + 'static {
    /// Commits one group-commit batch.
    fn commit(
        &self,
        committer: &mut Committer,
        requests: &[Request],
        now: UnixMillis,
    ) -> Result<Vec<Outcome>, StoreError>;

    /// Commits one batch like [`commit`](ShardStore::commit), but a store that can returns
    /// once the batch is written, before its fsync, with the call that makes it durable
    /// (decision 0027): nobody is told about the batch before that call succeeds. The next
    /// batch may be committed meanwhile, on top of this one. `None`: durable already.
    fn commit_unsynced(
        &self,
        committer: &mut Committer,
        requests: &[Request],
        now: UnixMillis,
    ) -> Result<(Vec<Outcome>, Option<SyncCommit>), StoreError> {
        self.commit(committer, requests, now)
            .map(|outcomes| (outcomes, None))
    }

    /// Commits a batch of a guest edge's users under the lease this edge claimed for them
    /// (takeover, decision 0015). Only a store every edge shares serves guests; the others
    /// refuse as fenced.
    fn commit_guest(
        &self,
        committer: &mut Committer,
        guest: EdgeId,
        lease: Lease,
        requests: &[Request],
        now: UnixMillis,
    ) -> Result<Vec<Outcome>, StoreError> {
        let _ = (committer, guest, lease, requests, now);
        Err(StoreError::Fenced)
    }

    /// A page of `inbox` after `after_seq`, for a connection catching up.
    fn read_inbox(
        &self,
        inbox: UserId,
        after_seq: u64,
        now: UnixMillis,
        core: &CoreConfig,
    ) -> Result<InboxPage, StoreError>;

    /// One expiry pass over everything this store holds.
    fn expire(&self, now: UnixMillis, core: &CoreConfig) -> Result<ExpireReport, StoreError>;

    /// One more pass of the device sweep, while a round is behind its schedule
    /// (`ExpireReport::devices_behind`, `commit::sweep_devices`): whether it still is.
    fn sweep_devices(&self, now: UnixMillis, core: &CoreConfig) -> Result<bool, StoreError>;

    /// The highest time any commit used, where the server clock starts (`core::clock`).
    fn clock_high_water(&self) -> Result<UnixMillis, StoreError>;

    /// The sizes one of this shard's stores was written with, when they differ from
    /// `expiry_bucket_ms` or `dedupe_window_ms` (`commit::stored_key_sizes`).
    fn key_sizes_mismatch(
        &self,
        expiry_bucket_ms: u64,
        dedupe_window_ms: u64,
    ) -> Result<Option<KeySizes>, StoreError>;

    /// Records the sizes in the stores that have none, or no dedupe window
    /// (`commit::record_key_sizes`).
    fn record_key_sizes(
        &self,
        expiry_bucket_ms: u64,
        dedupe_window_ms: u64,
    ) -> Result<(), StoreError>;

    /// Makes deleted data physically gone from disk (`FjallStore::erase_deleted`,
    /// `LogStore::erase_deleted`). FoundationDB reclaims deleted data in its own storage
    /// engine, so its backend does nothing here.
    fn erase_deleted(&self) -> Result<Option<ErasePass>, StoreError> {
        Ok(None)
    }

    /// When this shard's store last finished an erase pass that left nothing to the next
    /// one (`crate::erase_record`), in Unix milliseconds; `None` without a record.
    fn last_complete_erase_ms(&self) -> Option<u64> {
        None
    }

    /// When this shard's embedded stores were made, Unix milliseconds
    /// (`stores::stores_created_unix_ms`): before it nothing was deleted from them, what the
    /// erase metric claims for a store without a record. `None` on FoundationDB.
    fn stores_made_ms(&self) -> Option<u64> {
        None
    }

    /// Brings a store that refused with `Poisoned` (a failed write or fsync: a full disk, a
    /// disk error) back: the embedded store reopens this shard's database, which recovers
    /// what was committed. Until it succeeds every call fails with `Poisoned`, and the shard
    /// answers sends with the retryable `StoreUnavailable`. FoundationDB never poisons.
    fn recover(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Whether this shard's store refuses everything until [`ShardStore::recover`]: a failed
    /// write poisons an embedded store, and the call that failed reports its cause (`Io`),
    /// only the later ones `Poisoned`. Called on the shard's own thread: it must never block.
    fn refuses_until_recovered(&self) -> bool {
        false
    }

    /// Stored message keys of this shard, approximately (deleted keys count until compaction
    /// drops them), for the backlog gauge; `None` where counting is not cheap, or now would
    /// mean waiting. Called on the shard's own thread: it must never block.
    fn message_keys_approximate(&self) -> Option<u64> {
        None
    }

    /// How full this shard's own store is against its memory bound (the log engine's
    /// `store.log_memory_bytes_max`): from 90% the shard refuses sends until acks and expiry
    /// bring it below 80%. Called on the shard's own thread: it must never block.
    fn memory_fill(&self) -> MemoryFill {
        MemoryFill::Unbounded
    }

    /// Memory the stored keys take, where the store keeps them in memory (the log engine);
    /// never blocks.
    fn memory_bytes(&self) -> Option<u64> {
        None
    }

    /// Memory the dedupe records of recent sends take before they move to disk (the log
    /// engine); never blocks.
    fn dedupe_memory_bytes(&self) -> Option<u64> {
        None
    }

    /// fjall's background workers' priority (decision 0039), where the store manages it;
    /// never blocks.
    fn background_priority(&self) -> Option<BackgroundPriority> {
        None
    }
}

/// How full a store is against a memory bound (`ShardStore::memory_fill`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryFill {
    /// The store keeps its data on disk: no memory bound.
    Unbounded,
    /// Not known right now (the store is being reopened).
    Unknown,
    /// Percent of the bound in use.
    Percent(u64),
}

/// What one erase pass of an embedded store did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasePass {
    /// Files rewritten without deleted data: fjall keyspaces compacted, or log store
    /// snapshots written.
    pub rewrites: usize,
    pub disk_bytes_before: u64,
    pub disk_bytes_after: u64,
    /// The pass left nothing to the next one (`crate::erase_record`).
    pub complete: bool,
    /// Why the record of a complete pass could not be written (a restart then schedules
    /// the next pass from the record before, which is earlier: no pass is put off).
    pub record_failed: Option<String>,
    /// When the pass started, Unix milliseconds: what was deleted before it is gone once it
    /// is `complete`.
    pub started_unix_ms: u64,
}

/// An embedded engine: one per shard, in its own directory (`stores`).
pub trait EmbeddedEngine: Store + std::fmt::Debug + Sized + 'static {
    type Options: Clone + std::fmt::Debug + Send + Sync + 'static;
    fn open(path: &Path, options: &Self::Options) -> Result<Self, StoreError>;
    /// Whether `path` holds a store of this engine (its marker file is there).
    fn exists(path: &Path) -> bool;
    fn path(&self) -> &Path;
    fn erase_deleted(&self) -> Result<ErasePass, StoreError>;
    /// Stored message keys, possibly counting deleted ones; `None` rather than waiting.
    fn message_keys_approximate(&self) -> Option<u64>;
    /// `ShardStore::memory_fill`; never blocks.
    fn memory_fill(&self) -> MemoryFill {
        MemoryFill::Unbounded
    }
    /// `ShardStore::memory_bytes`; never blocks.
    fn memory_bytes(&self) -> Option<u64> {
        None
    }
    /// `ShardStore::dedupe_memory_bytes`; never blocks.
    fn dedupe_memory_bytes(&self) -> Option<u64> {
        None
    }
    /// `ShardStore::background_priority`; never blocks.
    fn background_priority(&self) -> Option<BackgroundPriority> {
        None
    }
    /// Whether a failed write poisoned the store; never blocks.
    fn is_poisoned(&self) -> bool;
}

impl EmbeddedEngine for FjallStore {
    type Options = FjallOptions;
    fn open(path: &Path, options: &FjallOptions) -> Result<FjallStore, StoreError> {
        if LogStore::is_log_store(path) {
            return Err(StoreError::Corrupt(format!(
                "{} holds a log store: set store.engine = \"log\" (the engines cannot read \
                 each other's files)",
                path.display()
            )));
        }
        FjallStore::open(path, options)
    }
    fn exists(path: &Path) -> bool {
        // fjall's version marker, written when it creates a database.
        path.join("version").exists()
    }
    fn path(&self) -> &Path {
        FjallStore::path(self)
    }
    fn erase_deleted(&self) -> Result<ErasePass, StoreError> {
        let report = FjallStore::erase_deleted(self)?;
        Ok(ErasePass {
            rewrites: report.keyspaces_compacted,
            disk_bytes_before: report.disk_bytes_before,
            disk_bytes_after: report.disk_bytes_after,
            complete: report.complete,
            record_failed: None,
            started_unix_ms: 0,
        })
    }
    fn message_keys_approximate(&self) -> Option<u64> {
        Some(FjallStore::message_keys_approximate(self))
    }
    fn background_priority(&self) -> Option<BackgroundPriority> {
        FjallStore::background_priority(self)
    }
    fn is_poisoned(&self) -> bool {
        FjallStore::is_poisoned(self)
    }
}

impl EmbeddedEngine for LogStore {
    type Options = LogOptions;
    fn open(path: &Path, options: &LogOptions) -> Result<LogStore, StoreError> {
        LogStore::open(path, options)
    }
    fn exists(path: &Path) -> bool {
        LogStore::is_log_store(path)
    }
    fn path(&self) -> &Path {
        LogStore::path(self)
    }
    fn erase_deleted(&self) -> Result<ErasePass, StoreError> {
        let report = LogStore::erase_deleted(self)?;
        Ok(ErasePass {
            rewrites: usize::from(report.checkpointed),
            disk_bytes_before: report.disk_bytes_before,
            disk_bytes_after: report.disk_bytes_after,
            complete: report.complete,
            record_failed: None,
            started_unix_ms: 0,
        })
    }
    fn message_keys_approximate(&self) -> Option<u64> {
        // Exact, but it needs the map's read lock: skip a beat rather than wait for a commit.
        self.message_keys_without_waiting()
    }
    fn memory_fill(&self) -> MemoryFill {
        MemoryFill::Percent(self.memory_fill_percent())
    }
    fn memory_bytes(&self) -> Option<u64> {
        Some(self.live_bytes_without_waiting())
    }
    fn dedupe_memory_bytes(&self) -> Option<u64> {
        Some(LogStore::dedupe_memory_bytes(self))
    }
    fn is_poisoned(&self) -> bool {
        LogStore::is_poisoned(self)
    }
}

/// One shard's embedded store, which can be closed and opened again in place.
#[derive(Debug)]
pub struct EmbeddedSlot<E: EmbeddedEngine> {
    path: std::path::PathBuf,
    options: E::Options,
    /// `None` while the store is being reopened, or after a reopen failed.
    current: std::sync::RwLock<Option<Arc<E>>>,
}

impl<E: EmbeddedEngine> EmbeddedSlot<E> {
    pub fn new(store: Arc<E>, options: E::Options) -> EmbeddedSlot<E> {
        EmbeddedSlot {
            path: store.path().to_path_buf(),
            options,
            current: std::sync::RwLock::new(Some(store)),
        }
    }

    fn get(&self) -> Result<Arc<E>, StoreError> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
            .ok_or(StoreError::Poisoned)
    }

    /// The store if it is open and nobody is reopening it right now: for callers that must
    /// not wait (a shard's own thread; a sync read, which must not wait for a replay),
    /// never blocking.
    fn try_get(&self) -> Option<Arc<E>> {
        self.try_slot()?.clone()
    }

    /// The slot under its read lock, if nobody is reopening the store right now.
    fn try_slot(&self) -> Option<std::sync::RwLockReadGuard<'_, Option<Arc<E>>>> {
        match self.current.try_read() {
            Ok(current) => Some(current),
            // As `get`: a panic elsewhere while holding the lock leaves the slot as it was.
            Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// `read` of the store if it is open and nobody is reopening it right now, under the
    /// slot's read lock, without a handle of its own: for the shard's own thread, which must
    /// neither wait nor ever hold the last handle of a store being reopened (dropping it
    /// there would run the store's shutdown, joining its threads, on the executor).
    fn with_current<R>(&self, read: impl FnOnce(&E) -> R) -> Option<R> {
        self.try_slot()?.as_deref().map(read)
    }

    /// Closes the database (once every reader let go of it) and opens it again.
    fn reopen(&self) -> Result<(), StoreError> {
        let mut current = self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Ours is dropped here; a read on another thread may hold the database a moment
        // longer, and its lock file with it: then the open fails and the next attempt retries.
        current.take();
        // Both engines create a store where none is. One that vanished (its volume unmounted
        // after disk errors, its files deleted to free a full disk) would be replaced by an
        // empty one: every inbox of the shard back at seq 1, everything stored before gone
        // from service. The reopen fails instead, and is tried again until it is back.
        if !E::exists(&self.path) {
            return Err(StoreError::Io(format!(
                "the store at {} is gone (its files removed, or its volume unmounted): \
                 restore it there, and the edge reopens it; no empty store is made in its \
                 place",
                self.path.display()
            )));
        }
        let store = E::open(&self.path, &self.options)?;
        *current = Some(Arc::new(store));
        Ok(())
    }
}

/// Opens the store of the shard with the given id (called once per shard, at start).
pub type OpenShardStore = Arc<dyn Fn(u8) -> Result<Arc<dyn ShardStore>, String> + Send + Sync>;

/// A shard's embedded store, and its view of the other shards' stores for reads: a connection
/// on this shard syncs the inbox of its user, which lives in the user's home shard's store.
#[derive(Debug)]
pub struct Embedded<E: EmbeddedEngine> {
    /// This shard's id, the index of its own store in `all`.
    pub shard: u8,
    /// Every shard's store, in shard order.
    pub all: Arc<Vec<EmbeddedSlot<E>>>,
}

impl<E: EmbeddedEngine> Embedded<E> {
    fn own(&self) -> Result<Arc<E>, StoreError> {
        self.all[usize::from(self.shard)].get()
    }
}

impl<E: EmbeddedEngine> ShardStore for Embedded<E> {
    fn commit(
        &self,
        committer: &mut Committer,
        requests: &[Request],
        now: UnixMillis,
    ) -> Result<Vec<Outcome>, StoreError> {
        // Every request of a shard's batch is for an inbox homed to it (the session routes them).
        committer.commit_batch(&*self.own()?, requests, now)
    }

    fn commit_unsynced(
        &self,
        committer: &mut Committer,
        requests: &[Request],
        now: UnixMillis,
    ) -> Result<(Vec<Outcome>, Option<SyncCommit>), StoreError> {
        let own = self.own()?;
        let (outcomes, version) = committer.commit_batch_unsynced(&*own, requests, now)?;
        // The sync holds this store instance (a version means something to it alone): a
        // reopen waits for it to let go (the directory's lock), and a sync of a poisoned store
        // fails unless its commit was durable already.
        let sync =
            version.map(|version| -> SyncCommit { Box::new(move || own.sync_through(version)) });
        Ok((outcomes, sync))
    }

    fn read_inbox(
        &self,
        inbox: UserId,
        after_seq: u64,
        now: UnixMillis,
        core: &CoreConfig,
    ) -> Result<InboxPage, StoreError> {
        // On fjall a snapshot read takes no lock. On the log store a read holds the map's read
        // lock for its page (bounded by `batching.sync_messages_max`), during which the home
        // shard's next commit waits to apply (not to fsync). A read that meets a message
        // expired since the home store's last commit raises its clock mark first, in a commit
        // of its own behind the home shard's writer (decision 0047: rare).
        let home = courier_core::placement::home_shard(inbox, self.all.len() as u32);
        // Never waits for a reopen: replaying a large store takes seconds, and this shard's
        // one reader thread would hold every read of its own users behind it. The session
        // reads again shortly, as after any failed read.
        let store = self.all[home as usize]
            .try_get()
            .ok_or(StoreError::Poisoned)?;
        read_inbox(&*store, inbox, after_seq, now, core)
    }

    fn expire(&self, now: UnixMillis, core: &CoreConfig) -> Result<ExpireReport, StoreError> {
        expire(&*self.own()?, now, core)
    }

    fn sweep_devices(&self, now: UnixMillis, core: &CoreConfig) -> Result<bool, StoreError> {
        courier_core::commit::sweep_devices(&*self.own()?, now, core)
    }

    /// The highest mark of every shard's store, not this shard's alone: the edge starts its
    /// one clock (`shard::EdgeClock`) from it. From its own store only, a shard whose store
    /// saw no recent commit could start days behind another after the wall clock stepped back
    /// (or one ahead judge another's inbox by a later time than its owner, declaring a
    /// message with days of its TTL left expired when it reads it).
    fn clock_high_water(&self) -> Result<UnixMillis, StoreError> {
        let mut highest = 0;
        for slot in self.all.iter() {
            highest = highest.max(courier_core::commit::clock_high_water(&*slot.get()?)?);
        }
        Ok(highest)
    }

    fn erase_deleted(&self) -> Result<Option<ErasePass>, StoreError> {
        let store = self.own()?;
        // What was deleted before this instant is gone once the pass completes.
        let started = courier_core::clock::wall_clock_ms();
        let mut pass = store.erase_deleted()?;
        pass.started_unix_ms = started;
        if pass.complete {
            pass.record_failed = crate::erase_record::write(store.path(), started).err();
        }
        Ok(Some(pass))
    }

    fn last_complete_erase_ms(&self) -> Option<u64> {
        crate::erase_record::read(&self.all[usize::from(self.shard)].path)
    }

    fn stores_made_ms(&self) -> Option<u64> {
        crate::stores::stores_created_unix_ms(&self.all[usize::from(self.shard)].path)
    }

    fn key_sizes_mismatch(
        &self,
        expiry_bucket_ms: u64,
        dedupe_window_ms: u64,
    ) -> Result<Option<KeySizes>, StoreError> {
        let stored = courier_core::commit::stored_key_sizes(&*self.own()?)?;
        Ok(stored.filter(|stored| stored.differ_from(expiry_bucket_ms, dedupe_window_ms)))
    }

    fn record_key_sizes(
        &self,
        expiry_bucket_ms: u64,
        dedupe_window_ms: u64,
    ) -> Result<(), StoreError> {
        courier_core::commit::record_key_sizes(&*self.own()?, expiry_bucket_ms, dedupe_window_ms)
    }

    fn recover(&self) -> Result<(), StoreError> {
        self.all[usize::from(self.shard)].reopen()
    }

    // Called on the shard's thread: each skips a beat rather than wait for a reopen, and
    // never holds a handle of its own (`EmbeddedSlot::with_current`).

    fn message_keys_approximate(&self) -> Option<u64> {
        self.all[usize::from(self.shard)]
            .with_current(|own| own.message_keys_approximate())
            .flatten()
    }

    fn memory_fill(&self) -> MemoryFill {
        // While the store is being reopened nobody knows: the shard keeps what it had.
        self.all[usize::from(self.shard)]
            .with_current(|own| own.memory_fill())
            .unwrap_or(MemoryFill::Unknown)
    }

    fn memory_bytes(&self) -> Option<u64> {
        self.all[usize::from(self.shard)]
            .with_current(|own| own.memory_bytes())
            .flatten()
    }

    fn dedupe_memory_bytes(&self) -> Option<u64> {
        self.all[usize::from(self.shard)]
            .with_current(|own| own.dedupe_memory_bytes())
            .flatten()
    }

    fn background_priority(&self) -> Option<BackgroundPriority> {
        self.all[usize::from(self.shard)]
            .with_current(|own| own.background_priority())
            .flatten()
    }

    fn refuses_until_recovered(&self) -> bool {
        // While a reopen holds the slot nobody knows; the shard that runs it knows already.
        self.all[usize::from(self.shard)]
            .with_current(|store| store.is_poisoned())
            .unwrap_or(false)
    }
}

/// A shard's stores on a store every edge shares: FoundationDB, one per cluster, claimed for
/// this shard (or, in a cluster of edges, for this edge's process); or, in tests, memory stores
/// that the edges of one process share (`server::EdgeStore::SharedMemory`).
#[derive(Debug)]
pub struct Shared<S> {
    pub stores: Vec<S>,
    /// In a cluster: this edge's own lease, under which its own commits run.
    pub lease: Option<(EdgeId, Lease)>,
    /// Whether this shard runs the expiry passes. A cluster's expiry index covers every
    /// inbox on it, whichever shard owns it, so one shard per edge runs them: from every
    /// shard the passes did the same work and conflicted with each other.
    pub runs_expiry: bool,
    /// In a cluster of edges, the lease thread, which says whether this edge is the one that
    /// runs them ([`crate::takeover::Takeover::runs_expiry`]).
    pub expiry_turn: Option<Arc<crate::takeover::Takeover>>,
    /// What this shard's expiry keeps between calls, per store (see `expire`).
    pub expiry: std::sync::Mutex<courier_core::commit::SharedExpiry>,
}

impl<S> Shared<S> {
    pub fn new(
        stores: Vec<S>,
        lease: Option<(EdgeId, Lease)>,
        runs_expiry: bool,
        expiry_turn: Option<Arc<crate::takeover::Takeover>>,
    ) -> Shared<S> {
        Shared {
            expiry: std::sync::Mutex::new(courier_core::commit::SharedExpiry::default()),
            stores,
            lease,
            runs_expiry,
            expiry_turn,
        }
    }
}

/// A shard's stores on FoundationDB.
#[cfg(feature = "fdb")]
pub type FoundationDb = Shared<courier_core::store::fdb::FdbStore>;

impl<S: Store> Shared<S> {
    fn store_of(&self, inbox: UserId) -> &S {
        let cluster = courier_core::placement::cluster_of(inbox, self.stores.len() as u32);
        &self.stores[cluster as usize]
    }

    /// Whether this shard runs the expiry passes now: the shard chosen for them, on the
    /// cluster's edge whose turn it is (always, outside a cluster of edges).
    fn runs_expiry_passes(&self) -> bool {
        self.runs_expiry
            && self
                .expiry_turn
                .as_ref()
                .is_none_or(|takeover| takeover.runs_expiry())
    }
}

impl<S: Store + 'static> ShardStore for Shared<S> {
    fn commit(
        &self,
        committer: &mut Committer,
        requests: &[Request],
        now: UnixMillis,
    ) -> Result<Vec<Outcome>, StoreError> {
        match self.lease {
            Some((edge, lease)) => self.commit_guest(committer, edge, lease, requests, now),
            None => courier_core::store::clusters::commit_batch_split(
                committer,
                &self.stores,
                requests,
                now,
            ),
        }
    }

    fn commit_guest(
        &self,
        committer: &mut Committer,
        edge: EdgeId,
        lease: Lease,
        requests: &[Request],
        now: UnixMillis,
    ) -> Result<Vec<Outcome>, StoreError> {
        let leased: Vec<_> = self
            .stores
            .iter()
            .map(|store| courier_core::takeover::LeasedStore::new(store, edge, lease))
            .collect();
        courier_core::store::clusters::commit_batch_split(committer, &leased, requests, now)
    }

    fn read_inbox(
        &self,
        inbox: UserId,
        after_seq: u64,
        now: UnixMillis,
        core: &CoreConfig,
    ) -> Result<InboxPage, StoreError> {
        read_inbox(self.store_of(inbox), inbox, after_seq, now, core)
    }

    fn sweep_devices(&self, now: UnixMillis, core: &CoreConfig) -> Result<bool, StoreError> {
        // Only the shard that runs the passes is told it is behind; a turn that moved on
        // since stops here, and its new runner's passes see the pace.
        if !self.runs_expiry_passes() {
            return Ok(false);
        }
        let mut state = self
            .expiry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        courier_core::commit::sweep_devices_shared(&self.stores, &mut state, now, core)
    }

    fn expire(&self, now: UnixMillis, core: &CoreConfig) -> Result<ExpireReport, StoreError> {
        let mut state = self
            .expiry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        courier_core::commit::expire_shared(
            &self.stores,
            self.runs_expiry_passes(),
            &mut state,
            now,
            core,
        )
    }

    fn clock_high_water(&self) -> Result<UnixMillis, StoreError> {
        let mut highest = 0;
        for store in &self.stores {
            highest = highest.max(courier_core::commit::clock_high_water(store)?);
        }
        Ok(highest)
    }

    fn key_sizes_mismatch(
        &self,
        expiry_bucket_ms: u64,
        dedupe_window_ms: u64,
    ) -> Result<Option<KeySizes>, StoreError> {
        for store in &self.stores {
            let stored = courier_core::commit::stored_key_sizes(store)?;
            if let Some(stored) =
                stored.filter(|stored| stored.differ_from(expiry_bucket_ms, dedupe_window_ms))
            {
                return Ok(Some(stored));
            }
        }
        Ok(None)
    }

    fn record_key_sizes(
        &self,
        expiry_bucket_ms: u64,
        dedupe_window_ms: u64,
    ) -> Result<(), StoreError> {
        for store in &self.stores {
            courier_core::commit::record_key_sizes(store, expiry_bucket_ms, dedupe_window_ms)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_core::commit::{Request, SendRequest};
    use courier_core::store::memory::MemoryStore;

    /// Two shards' log stores in temporary directories (kept while the first is held).
    fn two_log_stores() -> (Vec<tempfile::TempDir>, Arc<Vec<EmbeddedSlot<LogStore>>>) {
        let dirs: Vec<_> = (0..2)
            .map(|_| tempfile::tempdir().expect("tempdir"))
            .collect();
        let options = LogOptions::default();
        let slots = dirs
            .iter()
            .map(|dir| {
                let store = LogStore::open(dir.path(), &options).expect("open");
                EmbeddedSlot::new(Arc::new(store), options.clone())
            })
            .collect();
        (dirs, Arc::new(slots))
    }

    /// A store whose files vanished while it was open is not replaced by an empty one when
    /// the shard reopens it: the reopen fails, and works again once the files are back.
    #[test]
    fn a_reopen_does_not_make_an_empty_store_where_one_vanished() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("shard-0");
        let options = LogOptions::default();
        let store = LogStore::open(&path, &options).expect("open");
        let slot = EmbeddedSlot::new(Arc::new(store), options);
        let moved = dir.path().join("moved");
        std::fs::rename(&path, &moved).expect("move the store away");
        let refused = slot
            .reopen()
            .expect_err("a vanished store is not made anew");
        assert!(refused.to_string().contains("is gone"), "{refused}");
        assert!(!path.exists(), "no empty store was made in its place");
        std::fs::rename(&moved, &path).expect("put it back");
        slot.reopen().expect("the store is back");
    }

    /// A read of another shard's store while that store is being reopened fails at once
    /// (the session reads again shortly) instead of waiting for the reopen: a large store's
    /// replay takes seconds, and the reading shard's one reader thread would hold every read
    /// of its own users behind it. Once the store is back the read works.
    #[test]
    fn a_read_of_a_store_being_reopened_does_not_wait_for_it() {
        let (_dirs, all) = two_log_stores();
        let core = CoreConfig::default();
        let on_shard_0 = (1..)
            .find(|user| courier_core::placement::home_shard(*user, 2) == 0)
            .expect("a user on shard 0");
        let shard_1 = Arc::new(Embedded {
            shard: 1,
            all: Arc::clone(&all),
        });
        // Shard 0's reopen holds its slot, as `EmbeddedSlot::reopen` does while it opens.
        let reopening = all[0].current.write().expect("slot lock");
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let reader = Arc::clone(&shard_1);
        let core_for_read = core.clone();
        std::thread::spawn(move || {
            let _ = done_tx.send(reader.read_inbox(on_shard_0, 0, 1_000, &core_for_read));
        });
        // A hang detector, not a speed check: a read that waits for the reopen never returns
        // while it is held.
        let during = done_rx.recv_timeout(std::time::Duration::from_secs(30));
        drop(reopening);
        let during = during.expect("the read waited for shard 0's reopen");
        assert_eq!(during.err(), Some(StoreError::Poisoned));
        let after = shard_1.read_inbox(on_shard_0, 0, 1_000, &core);
        assert!(after.is_ok(), "{:?}", after.err());
    }

    /// Every shard of an edge starts its clock from the same mark, the highest of all its
    /// stores, even when only one shard's store saw the latest commit.
    #[test]
    fn the_shards_of_embedded_stores_start_their_clocks_from_one_mark() {
        let (_dirs, all) = two_log_stores();
        let core = CoreConfig::default();
        let late_ms = 1_700_000_000_000;
        // A user homed on shard 1 gets a message at a late time: only store 1 sees it.
        let to = (1..)
            .find(|user| courier_core::placement::home_shard(*user, 2) == 1)
            .expect("a user on shard 1");
        let shard_1 = Embedded {
            shard: 1,
            all: Arc::clone(&all),
        };
        let send = Request::Send(SendRequest {
            sender: 7,
            to,
            client_id: 1,
            body: b"late".to_vec(),
            ttl_secs: None,
        });
        shard_1
            .commit(&mut Committer::new(&core), &[send], late_ms)
            .expect("commit");
        let shard_0 = Embedded {
            shard: 0,
            all: Arc::clone(&all),
        };
        let (mark_0, mark_1) = (
            shard_0.clock_high_water().expect("shard 0's mark"),
            shard_1.clock_high_water().expect("shard 1's mark"),
        );
        assert!(mark_1 >= late_ms, "{mark_1}");
        assert_eq!(
            mark_0, mark_1,
            "shard 0's clock would start behind shard 1's"
        );
    }

    /// On a shared store one shard runs the expiry passes, but every shard lists the inboxes
    /// they emptied, a page per interval going round the records, so that each inbox's home
    /// shard forgets it. Before, only the runner's shard heard of them, and every other
    /// shard's emptied inboxes kept their counter and `g` record for good.
    #[test]
    fn on_shared_stores_every_shard_hears_of_the_inboxes_expiry_emptied() {
        let core = CoreConfig {
            expire_scan_keys_max: 4,
            ..CoreConfig::default()
        };
        let store = Arc::new(MemoryStore::new());
        let runner = Shared::new(vec![Arc::clone(&store)], None, true, None);
        let other = Shared::new(vec![Arc::clone(&store)], None, false, None);
        let sends: Vec<Request> = (1..=5)
            .map(|to| {
                Request::Send(SendRequest {
                    sender: 9,
                    client_id: to,
                    to,
                    body: b"short-lived".to_vec(),
                    ttl_secs: Some(1),
                })
            })
            .collect();
        Committer::new(&core)
            .commit_batch(&store, &sends, 1_000)
            .unwrap();
        let later = 1_000 + 10 * core.expiry_bucket_ms;
        loop {
            if !runner.expire(later, &core).unwrap().more {
                break;
            }
        }
        // Two a page (half the scan budget): the other shard's listing goes round all five
        // in three intervals, then starts over.
        let mut heard = Vec::new();
        for _ in 0..3 {
            let report = other.expire(later, &core).unwrap();
            assert_eq!(report.messages_deleted, 0, "it runs no passes");
            heard.extend(report.emptied);
        }
        heard.sort_unstable();
        assert_eq!(heard, vec![1, 2, 3, 4, 5]);
        assert_eq!(other.expire(later, &core).unwrap().emptied, vec![1, 2]);
    }

    /// On shared stores only the shard chosen to run expiry passes deletes anything; the
    /// others' passes do nothing (before, every shard ran the same pass over the cluster).
    #[test]
    fn on_shared_stores_one_shard_runs_the_expiry_passes() {
        let core = CoreConfig::default();
        let shared = |runs_expiry| Shared::new(vec![MemoryStore::new()], None, runs_expiry, None);
        for runs_expiry in [false, true] {
            let backend = shared(runs_expiry);
            let send = Request::Send(SendRequest {
                sender: 1,
                client_id: 1,
                to: 2,
                body: b"short-lived".to_vec(),
                ttl_secs: Some(1),
            });
            let mut committer = Committer::new(&core);
            committer
                .commit_batch(&backend.stores[0], &[send], 1_000)
                .unwrap();
            let later = 1_000 + 10 * core.expiry_bucket_ms;
            let report = backend.expire(later, &core).unwrap();
            assert_eq!(
                report.messages_deleted,
                u64::from(runs_expiry),
                "runs_expiry = {runs_expiry}"
            );
        }
    }
}
