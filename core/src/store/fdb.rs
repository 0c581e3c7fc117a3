//! The FoundationDB backend (feature `fdb`): the same key layout and commit logic as the
//! embedded store, on one or several FoundationDB clusters.
//!
//! Pieces, in the order a process uses them:
//!
//! 1. [`FdbNetwork::start`], once per process: selects the client API version (710) and runs
//!    FoundationDB's network thread. The handle must outlive every cluster and store; each of
//!    them holds an `Arc` of it, so it stops after the last one is dropped.
//! 2. [`FdbClusters::open`]: one database handle per cluster file of the config; one process
//!    opens all of them over the one network thread.
//! 3. [`FdbClusters::claim_shard`]: makes this process the owner of a shard on every cluster
//!    (bumps the shard's owner epoch) and returns one [`FdbStore`] per cluster.
//! 4. [`FdbStore`] implements [`Store`]: the shard's writer thread runs the Committer on it,
//!    blocking on FoundationDB's futures (the trait is synchronous, decision record 0001).
//!
//! Fencing: every transaction reads the shard's owner key (`o/{shard}`, kept after the key
//! prefix under the metadata byte `0xff`, outside the data ranges) and fails with
//! [`StoreError::Fenced`] unless it still holds this store's claim. The read is serializable,
//! so a claim that lands between the read and the commit makes the commit conflict; the retry
//! then sees the new owner. A stale owner can therefore never commit.
//!
//! Errors map onto [`StoreError`] as `fdb_error.rs` describes; after a retryable error the
//! backend waits FoundationDB's backoff (`on_error`) before returning, and the Committer
//! retries up to `CoreConfig::commit_attempts_max` times. docs/foundationdb.md has the rest.

use std::cell::RefCell;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use foundationdb::future::FdbSlice;
use foundationdb::options::{DatabaseOption, MutationType, StreamingMode};
use foundationdb::{Database, FdbError, FdbResult, RangeOption};
use futures_executor::block_on;

use super::config::{FdbConfig, fdb_key_prefix, fdb_owner_key, key_prefix_is_valid};
use super::fdb_error::{FdbPhase, FdbVerdict, classify};
use super::{CommitVersion, KeyValue, Store, StoreError, Transaction};
use crate::keys;
use crate::placement::{ClusterId, ShardId};

/// The client API version this build selects (the `fdb-7_1` feature of the `foundationdb`
/// crate): it works with libfdb_c 7.1 and later, against clusters of the same version as the
/// installed libfdb_c.
pub const FDB_API_VERSION: i32 = 710;

/// Set once the network was started: FoundationDB can start its network once per process.
static NETWORK_STARTED: AtomicBool = AtomicBool::new(false);

/// FoundationDB's client network thread, started once per process.
///
/// Create it at the top of `main`, before opening any cluster, and let it drop after the last
/// store: every [`FdbCluster`] holds an `Arc` of it, so it cannot stop while a database handle
/// exists. It must be dropped before the process exits normally (FoundationDB's requirement:
/// its thread must be stopped before static destructors run); an abort is fine. FoundationDB
/// cannot restart its network, so a second [`FdbNetwork::start`] in the same process fails,
/// even after the first handle was dropped.
pub struct FdbNetwork {
    /// Stops the network thread and joins it when dropped.
    _stop: foundationdb::api::NetworkAutoStop,
}

impl std::fmt::Debug for FdbNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdbNetwork")
            .field("api_version", &FDB_API_VERSION)
            .finish_non_exhaustive()
    }
}

impl FdbNetwork {
    /// Selects API version [`FDB_API_VERSION`] and starts the network thread.
    pub fn start() -> Result<Arc<FdbNetwork>, StoreError> {
        if NETWORK_STARTED.swap(true, Ordering::SeqCst) {
            return Err(StoreError::Io(
                "the foundationdb network was already started in this process: share its \
                 FdbNetwork handle"
                    .into(),
            ));
        }
        let builder = foundationdb::api::FdbApiBuilder::default()
            .set_runtime_version(FDB_API_VERSION)
            .build()
            .map_err(|error| {
                StoreError::Io(format!(
                    "cannot select foundationdb api version {FDB_API_VERSION} (is libfdb_c 7.1 \
                     or later installed?): {error}"
                ))
            })?;
        // SAFETY: `boot` requires the returned guard to be dropped before the process exits
        // normally. The guard lives in this `FdbNetwork`, whose doc makes that the caller's
        // duty (keep it in `main`), and every database handle holds an `Arc` of it, so the
        // network stops only after the last database is destroyed.
        #[allow(unsafe_code)]
        let stop = unsafe { builder.boot() }.map_err(|error| {
            StoreError::Io(format!("cannot start the foundationdb network: {error}"))
        })?;
        Ok(Arc::new(FdbNetwork { _stop: stop }))
    }
}

/// One FoundationDB cluster, opened from its cluster file.
pub struct FdbCluster {
    // Declared before `_network`: fields drop in order, and the database must be destroyed
    // before the network thread stops.
    db: Database,
    cluster_file: PathBuf,
    _network: Arc<FdbNetwork>,
}

impl std::fmt::Debug for FdbCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdbCluster")
            .field("cluster_file", &self.cluster_file)
            .finish_non_exhaustive()
    }
}

impl FdbCluster {
    /// Opens the cluster described by `cluster_file` and sets the transaction options of
    /// `config` (timeout, maximum retry delay, size limit) on every transaction it creates.
    /// Connecting happens in the background: an unreachable cluster shows up as timeouts.
    pub fn open(
        network: &Arc<FdbNetwork>,
        cluster_file: &Path,
        config: &FdbConfig,
    ) -> Result<FdbCluster, StoreError> {
        let cannot_open = |error: &dyn std::fmt::Display| {
            StoreError::Io(format!(
                "cannot open foundationdb cluster file {}: {error}",
                cluster_file.display()
            ))
        };
        let path = cluster_file
            .to_str()
            .ok_or_else(|| cannot_open(&"the path is not UTF-8"))?;
        let db = Database::from_path(path).map_err(|error| cannot_open(&error))?;
        let as_option = |value: usize| i32::try_from(value).unwrap_or(i32::MAX);
        let options = [
            DatabaseOption::TransactionTimeout(as_option(config.transaction_timeout_ms as usize)),
            DatabaseOption::TransactionMaxRetryDelay(as_option(config.retry_delay_ms_max as usize)),
            DatabaseOption::TransactionSizeLimit(as_option(config.transaction_bytes_limit())),
        ];
        for option in options {
            db.set_option(option).map_err(|error| cannot_open(&error))?;
        }
        Ok(FdbCluster {
            db,
            cluster_file: cluster_file.to_path_buf(),
            _network: Arc::clone(network),
        })
    }

    pub fn cluster_file(&self) -> &Path {
        &self.cluster_file
    }

    /// The raw database handle, for operator tools and tests (for example to clear a test's
    /// key prefix). The commit logic goes through [`FdbStore`].
    pub fn database(&self) -> &Database {
        &self.db
    }
}

/// Every cluster of a deployment, opened by one process, and the deployment's key prefix.
#[derive(Debug)]
pub struct FdbClusters {
    clusters: Vec<Arc<FdbCluster>>,
    key_prefix: Vec<u8>,
}

/// A process's ownership of a shard: the epoch it claimed and its owner id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardClaim {
    pub shard: ShardId,
    pub epoch: u64,
    /// Who claimed: an id unique to the claiming process (for example the edge id mixed with
    /// a boot counter), so that a claim whose commit result was unknown recognises itself.
    pub owner: u64,
}

impl ShardClaim {
    /// The value of the owner key: epoch, then owner, u64 little-endian each.
    fn value(&self) -> [u8; 16] {
        let mut value = [0u8; 16];
        value[..8].copy_from_slice(&self.epoch.to_le_bytes());
        value[8..].copy_from_slice(&self.owner.to_le_bytes());
        value
    }
}

/// The epoch in an owner key's value (0 when the shard was never claimed).
fn epoch_of(value: Option<&[u8]>) -> Result<u64, StoreError> {
    match value {
        None => Ok(0),
        Some(value) if value.len() == 16 => keys::le_u64(value)
            .ok_or_else(|| StoreError::Corrupt("owner key of unexpected shape".into())),
        Some(value) => Err(StoreError::Corrupt(format!(
            "owner key of {} bytes, expected 16",
            value.len()
        ))),
    }
}

/// Maps an error of a FoundationDB call.
fn store_error(error: FdbError, phase: FdbPhase) -> StoreError {
    classify(
        FdbVerdict {
            code: error.code(),
            message: error.message(),
            maybe_committed: error.is_maybe_committed(),
            retryable_not_committed: error.is_retryable_not_committed(),
        },
        phase,
    )
}

/// Waits FoundationDB's backoff for `error` when the mapped error will be retried, so an
/// immediate retry does not hammer a busy or throttling cluster. `on_error` also resets the
/// transaction; the caller drops it either way and starts a fresh one.
fn back_off(trx: foundationdb::Transaction, error: FdbError, mapped: &StoreError) {
    if mapped.is_retryable() {
        // Its result only says whether FoundationDB would retry, which the mapping decided.
        let _ = block_on(trx.on_error(error));
    }
}

impl FdbClusters {
    /// Opens every cluster of `config`, in config order (index = [`ClusterId`]). Call
    /// [`super::config::StoreConfig::validate`] first.
    pub fn open(network: &Arc<FdbNetwork>, config: &FdbConfig) -> Result<FdbClusters, StoreError> {
        if config.cluster_files.is_empty() {
            return Err(StoreError::Io(
                "no foundationdb cluster files configured".into(),
            ));
        }
        if !key_prefix_is_valid(&config.key_prefix) {
            return Err(StoreError::Io(
                "invalid foundationdb key prefix: 1 to 64 bytes, not starting with 0xff".into(),
            ));
        }
        let clusters = config
            .cluster_files
            .iter()
            .map(|file| FdbCluster::open(network, file, config).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(FdbClusters {
            clusters,
            key_prefix: fdb_key_prefix(&config.key_prefix),
        })
    }

    /// The number of clusters; inboxes map onto them with `placement::cluster_of`.
    pub fn len(&self) -> u32 {
        self.clusters.len() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty()
    }

    pub fn cluster(&self, id: ClusterId) -> Option<&Arc<FdbCluster>> {
        self.clusters.get(id as usize)
    }

    pub fn key_prefix(&self) -> &[u8] {
        &self.key_prefix
    }

    fn owner_key(&self, shard: ShardId) -> Vec<u8> {
        fdb_owner_key(&self.key_prefix, shard)
    }

    /// Makes `owner` the owner of `shard` on every cluster and returns its stores, one per
    /// cluster (index = [`ClusterId`]). Every earlier claim is fenced: its transactions fail
    /// with [`StoreError::Fenced`] from now on.
    ///
    /// The new epoch is one above the highest found on any cluster, written cluster by
    /// cluster in cluster order. A claim that finds an epoch at least as high as its own on a
    /// cluster lost a race with a concurrent claim and fails with [`StoreError::Fenced`],
    /// writing no further cluster. Because every claimer goes in the same order, at most one
    /// of several concurrent claims of the same epoch completes. Each cluster's write is
    /// retried up to `attempts_max` times on retryable errors (pass
    /// `CoreConfig::commit_attempts_max`).
    pub fn claim_shard(
        &self,
        shard: ShardId,
        owner: u64,
        attempts_max: u32,
    ) -> Result<Vec<FdbStore>, StoreError> {
        let key = self.owner_key(shard);
        let mut highest = 0;
        for cluster in &self.clusters {
            let trx = cluster
                .db
                .create_trx()
                .map_err(|error| store_error(error, FdbPhase::Read))?;
            let value = block_on(trx.get(&key, false))
                .map_err(|error| store_error(error, FdbPhase::Read))?;
            highest = highest.max(epoch_of(value.as_deref())?);
        }
        let claim = ShardClaim {
            shard,
            epoch: highest + 1,
            owner,
        };
        for cluster in &self.clusters {
            claim_on(cluster, &key, claim, attempts_max.max(1))?;
        }
        Ok(self.open_shard(claim))
    }

    /// Stores for a claim made earlier by this process (for example to reopen them). They
    /// are fenced like any other if the claim is no longer the latest.
    pub fn open_shard(&self, claim: ShardClaim) -> Vec<FdbStore> {
        self.clusters
            .iter()
            .map(|cluster| FdbStore {
                cluster: Arc::clone(cluster),
                prefix: self.key_prefix.clone(),
                owner_key: self.owner_key(claim.shard),
                owner_value: claim.value(),
                claim,
            })
            .collect()
    }
}

/// Writes `claim` to `key` on one cluster, unless an equal or later epoch is there.
fn claim_on(
    cluster: &FdbCluster,
    key: &[u8],
    claim: ShardClaim,
    attempts_max: u32,
) -> Result<(), StoreError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let trx = cluster
            .db
            .create_trx()
            .map_err(|error| store_error(error, FdbPhase::Read))?;
        let current = match block_on(trx.get(key, false)) {
            Ok(current) => current,
            Err(error) => {
                let mapped = store_error(error, FdbPhase::Read);
                back_off(trx, error, &mapped);
                if mapped.is_retryable() && attempt < attempts_max {
                    continue;
                }
                return Err(mapped);
            }
        };
        if current.as_deref() == Some(claim.value().as_slice()) {
            // An earlier attempt whose result was unknown did land.
            return Ok(());
        }
        if epoch_of(current.as_deref())? >= claim.epoch {
            return Err(StoreError::Fenced);
        }
        trx.set(key, &claim.value());
        match block_on(trx.commit()) {
            Ok(_) => return Ok(()),
            Err(failed) => {
                let mapped = store_error(*failed, FdbPhase::Commit);
                if mapped.is_retryable() {
                    // FoundationDB's backoff; see `back_off`.
                    let _ = block_on(failed.on_error());
                    if attempt < attempts_max {
                        continue;
                    }
                }
                return Err(mapped);
            }
        }
    }
}

/// One shard's store on one cluster: keys under the deployment's prefix, every transaction
/// checked against the shard's claim.
pub struct FdbStore {
    cluster: Arc<FdbCluster>,
    prefix: Vec<u8>,
    /// The prefixed owner key of the shard.
    owner_key: Vec<u8>,
    /// The value the owner key must hold: this store's claim.
    owner_value: [u8; 16],
    claim: ShardClaim,
}

impl std::fmt::Debug for FdbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdbStore")
            .field("cluster_file", &self.cluster.cluster_file)
            .field("claim", &self.claim)
            .finish_non_exhaustive()
    }
}

impl FdbStore {
    /// The claim this store commits under.
    pub fn claim(&self) -> ShardClaim {
        self.claim
    }

    pub fn cluster(&self) -> &Arc<FdbCluster> {
        &self.cluster
    }

    fn prefixed(&self, key: &[u8]) -> Vec<u8> {
        [self.prefix.as_slice(), key].concat()
    }
}

/// The most reads [`Transaction::prefetch`] keeps in flight in one transaction: two dedupe
/// lookups and a counter per send of the largest batch, with room.
const PREFETCHED_MAX: usize = 4096;

/// A read in flight: the owner key's, started with the transaction, or one of a
/// [`Transaction::get_many`] or a [`Transaction::prefetch`].
type PendingRead = Box<dyn Future<Output = FdbResult<Option<FdbSlice>>> + Send + Unpin>;

/// A transaction of an [`FdbStore`].
///
/// The owner key is read as soon as the transaction starts, in parallel with what follows;
/// the first operation that waits for the cluster (a read or the commit) first checks it.
/// After any error the transaction is failed for good: later reads and the commit return the
/// same error, and writes are ignored, because FoundationDB resets a transaction on error.
pub struct FdbTransaction<'a> {
    // Declared before `trx`: a pending read is dropped before its transaction.
    fence: Option<PendingRead>,
    /// Reads that [`Transaction::prefetch`] sent, by prefixed key, for the `get` of the key
    /// to wait for: a batch's lookups then take about one round trip, not one each. A write
    /// to a key drops its read, which was sent before the write and would not see it.
    prefetched: RefCell<HashMap<Vec<u8>, PendingRead>>,
    /// `None` once the transaction failed or committed.
    trx: Option<foundationdb::Transaction>,
    store: &'a FdbStore,
    wrote: bool,
    failed: Option<StoreError>,
}

impl std::fmt::Debug for FdbTransaction<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdbTransaction")
            .field("claim", &self.store.claim)
            .field("wrote", &self.wrote)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Store for FdbStore {
    type Transaction<'a> = FdbTransaction<'a>;

    fn begin(&self) -> Result<FdbTransaction<'_>, StoreError> {
        let trx = self
            .cluster
            .db
            .create_trx()
            .map_err(|error| store_error(error, FdbPhase::Read))?;
        // A serializable read: a claim committed after it makes this transaction conflict.
        let fence: PendingRead = Box::new(trx.get(&self.owner_key, false));
        Ok(FdbTransaction {
            fence: Some(fence),
            prefetched: RefCell::new(HashMap::new()),
            trx: Some(trx),
            store: self,
            wrote: false,
            failed: None,
        })
    }
}

impl FdbTransaction<'_> {
    /// Records a FoundationDB error: maps it, waits the backoff if it will be retried, and
    /// fails the transaction for good.
    fn fail(&mut self, error: FdbError, phase: FdbPhase) -> StoreError {
        let mapped = store_error(error, phase);
        self.fence = None;
        self.prefetched.get_mut().clear();
        if let Some(trx) = self.trx.take() {
            back_off(trx, error, &mapped);
        }
        self.failed = Some(mapped.clone());
        mapped
    }

    /// The transaction, once the owner check passed; the error if it failed.
    fn checked(&mut self) -> Result<&foundationdb::Transaction, StoreError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        if let Some(fence) = self.fence.take() {
            match block_on(fence) {
                Ok(value) if value.as_deref() == Some(self.store.owner_value.as_slice()) => {}
                Ok(_) => {
                    self.prefetched.get_mut().clear();
                    self.trx = None;
                    self.failed = Some(StoreError::Fenced);
                    return Err(StoreError::Fenced);
                }
                Err(error) => return Err(self.fail(error, FdbPhase::Read)),
            }
        }
        self.trx
            .as_ref()
            .ok_or_else(|| StoreError::Io("the transaction already failed or committed".into()))
    }

    /// Drops the prefetched reads of keys in `[begin, end)` (prefixed), which a write is
    /// about to change.
    fn forget_prefetched(&mut self, begin: &[u8], end: &[u8]) {
        let prefetched = self.prefetched.get_mut();
        if !prefetched.is_empty() {
            prefetched.retain(|key, _| key.as_slice() < begin || key.as_slice() >= end);
        }
    }

    /// Drops the prefetched read of `key` (prefixed), which a write is about to change.
    fn forget_prefetched_key(&mut self, key: &[u8]) {
        let prefetched = self.prefetched.get_mut();
        if !prefetched.is_empty() {
            prefetched.remove(key);
        }
    }

    /// Applies a write unless the transaction already failed (then the commit reports it).
    fn write(&mut self, apply: impl FnOnce(&foundationdb::Transaction)) {
        if let Some(trx) = &self.trx {
            apply(trx);
            self.wrote = true;
        }
    }
}

impl Transaction for FdbTransaction<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.store.prefixed(key);
        self.checked()?;
        let read = match self.prefetched.get_mut().remove(&key) {
            Some(read) => read,
            None => Box::new(self.checked()?.get(&key, false)),
        };
        let result = block_on(read);
        match result {
            Ok(value) => Ok(value.map(|value| value.to_vec())),
            Err(error) => Err(self.fail(error, FdbPhase::Read)),
        }
    }

    fn get_snapshot(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.store.prefixed(key);
        let result = block_on(self.checked()?.get(&key, true));
        match result {
            Ok(value) => Ok(value.map(|value| value.to_vec())),
            Err(error) => Err(self.fail(error, FdbPhase::Read)),
        }
    }

    /// Every read is sent before the first is waited for: one round trip for all.
    fn get_many(&mut self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let keys: Vec<Vec<u8>> = keys.iter().map(|key| self.store.prefixed(key)).collect();
        let trx = self.checked()?;
        let reads: Vec<PendingRead> = keys
            .iter()
            .map(|key| Box::new(trx.get(key, false)) as PendingRead)
            .collect();
        let mut values = Vec::with_capacity(reads.len());
        let mut reads = reads.into_iter();
        while let Some(read) = reads.next() {
            match block_on(read) {
                Ok(value) => values.push(value.map(|value| value.to_vec())),
                Err(error) => {
                    // The reads still in flight go before their transaction.
                    drop(reads);
                    return Err(self.fail(error, FdbPhase::Read));
                }
            }
        }
        Ok(values)
    }

    fn get_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        self.checked()?;
        // FoundationDB reads a limit of 0 as "no limit" and refuses inverted ranges.
        if limit == 0 || begin >= end {
            return Ok(Vec::new());
        }
        let prefix_len = self.store.prefix.len();
        let (begin, end) = (self.store.prefixed(begin), self.store.prefixed(end));
        let mut next = Some(RangeOption {
            limit: Some(limit),
            mode: StreamingMode::WantAll,
            ..RangeOption::from((begin.as_slice(), end.as_slice()))
        });
        let mut pairs = Vec::new();
        let mut iteration = 1;
        while let Some(range) = next {
            let result = block_on(self.checked()?.get_range(&range, iteration, false));
            let values = match result {
                Ok(values) => values,
                Err(error) => return Err(self.fail(error, FdbPhase::Read)),
            };
            for pair in &values {
                // Every key in [prefix+begin, prefix+end) starts with the prefix.
                let key = pair.key().get(prefix_len..).ok_or_else(|| {
                    StoreError::Corrupt("a key outside the key prefix in a range read".into())
                })?;
                pairs.push((key.to_vec(), pair.value().to_vec()));
            }
            next = range.next_range(&values);
            iteration += 1;
        }
        Ok(pairs)
    }

    /// Sends the read of `key` now; its `get` waits for it (see `prefetched`). At most
    /// `PREFETCHED_MAX` wait at once; past that the hint is ignored.
    fn prefetch(&self, key: &[u8]) {
        let (Some(trx), None) = (&self.trx, &self.failed) else {
            return;
        };
        let mut prefetched = self.prefetched.borrow_mut();
        if prefetched.len() >= PREFETCHED_MAX {
            return;
        }
        let key = self.store.prefixed(key);
        if let Entry::Vacant(slot) = prefetched.entry(key) {
            let read: PendingRead = Box::new(trx.get(slot.key(), false));
            slot.insert(read);
        }
    }

    fn add_read_conflict(&mut self, key: &[u8]) {
        let mut end = Vec::with_capacity(key.len() + 1);
        end.extend_from_slice(key);
        end.push(0);
        self.add_read_conflict_range(key, &end);
    }

    fn add_read_conflict_range(&mut self, begin: &[u8], end: &[u8]) {
        let begin = self.store.prefixed(begin);
        let end = self.store.prefixed(end);
        let Some(trx) = &self.trx else {
            return;
        };
        let added =
            trx.add_conflict_range(&begin, &end, foundationdb::options::ConflictRangeType::Read);
        if let Err(error) = added {
            // Without the range the commit could overwrite a later one's writes: it fails.
            self.fail(error, FdbPhase::Read);
        }
    }

    fn set(&mut self, key: &[u8], value: &[u8]) {
        let key = self.store.prefixed(key);
        self.forget_prefetched_key(&key);
        self.write(|trx| trx.set(&key, value));
    }

    fn clear(&mut self, key: &[u8]) {
        let key = self.store.prefixed(key);
        self.forget_prefetched_key(&key);
        self.write(|trx| trx.clear(&key));
    }

    fn clear_range(&mut self, begin: &[u8], end: &[u8]) {
        // FoundationDB refuses inverted ranges; an empty one clears nothing anyway.
        if begin >= end {
            return;
        }
        let (begin, end) = (self.store.prefixed(begin), self.store.prefixed(end));
        self.forget_prefetched(&begin, &end);
        self.write(|trx| trx.clear_range(&begin, &end));
    }

    fn atomic_add(&mut self, key: &[u8], delta: u64) {
        let key = self.store.prefixed(key);
        self.forget_prefetched_key(&key);
        self.write(|trx| trx.atomic_op(&key, &delta.to_le_bytes(), MutationType::Add));
    }

    fn atomic_max(&mut self, key: &[u8], value: u64) {
        let key = self.store.prefixed(key);
        self.forget_prefetched_key(&key);
        self.write(|trx| trx.atomic_op(&key, &value.to_le_bytes(), MutationType::Max));
    }

    /// Checks the owner, then commits. A transaction that wrote nothing is not sent: its
    /// version is its read version.
    fn commit(mut self) -> Result<CommitVersion, StoreError> {
        self.checked()?;
        // Reads never waited for (a hint not followed) are dropped before the transaction.
        self.prefetched.get_mut().clear();
        let Some(trx) = self.trx.take() else {
            return Err(StoreError::Io(
                "the transaction already failed or committed".into(),
            ));
        };
        let version = if self.wrote {
            match block_on(trx.commit()) {
                Ok(committed) => committed
                    .committed_version()
                    .map_err(|error| store_error(error, FdbPhase::Commit))?,
                Err(failed) => {
                    let mapped = store_error(*failed, FdbPhase::Commit);
                    if mapped.is_retryable() {
                        // FoundationDB's backoff; see `back_off`.
                        let _ = block_on(failed.on_error());
                    }
                    return Err(mapped);
                }
            }
        } else {
            block_on(trx.get_read_version()).map_err(|error| store_error(error, FdbPhase::Read))?
        };
        u64::try_from(version)
            .map_err(|_| StoreError::Io(format!("foundationdb returned version {version}")))
    }
}
