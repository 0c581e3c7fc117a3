//! A fault-injecting store wrapper for tests and simulation.
//!
//! It fails commits the ways real backends do: a conflict (nothing written), an unknown result
//! (written or not, decided by the seeded RNG), a failed fsync (written or not, and the store
//! is poisoned until [`FaultStore::reopen`]) and fencing (nothing written, and every later
//! transaction is fenced until [`FaultStore::reopen`], as a FoundationDB store stays fenced
//! until its shard is claimed again). These cover every error kind the FoundationDB backend
//! maps its errors to (`Conflict`, `CommitUnknown`, `Fenced`, `Io`), so the retry and recovery
//! paths are exercised without a cluster.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{CommitVersion, KeyValue, Store, StoreError, Transaction};
use crate::rng::Rng;

/// How often each fault happens, as a fraction `per_million / 1_000_000` of commits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultRates {
    pub conflict_per_million: u64,
    pub commit_unknown_per_million: u64,
    pub fsync_failure_per_million: u64,
    /// Another process claimed the shard: this commit and every later transaction fail with
    /// [`StoreError::Fenced`] until [`FaultStore::reopen`].
    pub fenced_per_million: u64,
}

/// Counts of injected faults, for tests that check the faults really happened.
#[derive(Debug, Default)]
pub struct FaultCounts {
    pub conflicts: AtomicU64,
    pub commit_unknown_applied: AtomicU64,
    pub commit_unknown_dropped: AtomicU64,
    pub fsync_failures: AtomicU64,
    pub fenced: AtomicU64,
}

/// Wraps a store and injects commit faults.
#[derive(Debug)]
pub struct FaultStore<S> {
    inner: S,
    rates: Mutex<FaultRates>,
    rng: Mutex<Rng>,
    poisoned: AtomicBool,
    fenced: AtomicBool,
    /// A transaction that read more keys than this fails its commit with a conflict (0: no
    /// limit): FoundationDB's time limit on a transaction (its five seconds, or the backend's
    /// timeout), which one that reads too much under load runs into on every attempt.
    reads_per_transaction_max: AtomicU64,
    pub counts: FaultCounts,
}

impl<S: Store> FaultStore<S> {
    pub fn new(inner: S, rates: FaultRates, seed: u64) -> FaultStore<S> {
        FaultStore {
            inner,
            rates: Mutex::new(rates),
            rng: Mutex::new(Rng::new(seed)),
            poisoned: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            reads_per_transaction_max: AtomicU64::new(0),
            counts: FaultCounts::default(),
        }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The store behind the faults, to close and reopen it as a restart would.
    pub fn inner_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Changes the fault rates, for example to zero for a final drain.
    pub fn set_rates(&self, rates: FaultRates) {
        *self.rates.lock().expect("fault rates lock") = rates;
    }

    /// Fails the commit of every transaction that read more than `keys_max` keys, with a
    /// conflict (0: no limit).
    pub fn set_reads_per_transaction_max(&self, keys_max: u64) {
        self.reads_per_transaction_max
            .store(keys_max, Ordering::SeqCst);
    }

    /// Clears the poisoned and fenced states, as reopening a real store after a crash, or
    /// claiming the shard again after being fenced, would.
    pub fn reopen(&self) {
        self.poisoned.store(false, Ordering::SeqCst);
        self.fenced.store(false, Ordering::SeqCst);
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    fn roll(&self) -> Fault {
        let rates = *self.rates.lock().expect("fault rates lock");
        let mut rng = self.rng.lock().expect("fault rng lock");
        let draw = rng.below(1_000_000);
        let applied = rng.chance(1, 2);
        let mut threshold = rates.conflict_per_million;
        if draw < threshold {
            return Fault::Conflict;
        }
        threshold += rates.commit_unknown_per_million;
        if draw < threshold {
            return Fault::CommitUnknown { applied };
        }
        threshold += rates.fsync_failure_per_million;
        if draw < threshold {
            return Fault::FsyncFailed { applied };
        }
        threshold += rates.fenced_per_million;
        if draw < threshold {
            return Fault::Fenced;
        }
        Fault::None
    }
}

enum Fault {
    None,
    Conflict,
    CommitUnknown { applied: bool },
    FsyncFailed { applied: bool },
    Fenced,
}

/// A transaction of a [`FaultStore`].
#[derive(Debug)]
pub struct FaultTransaction<'a, S: Store + 'a> {
    store: &'a FaultStore<S>,
    inner: S::Transaction<'a>,
    keys_read: u64,
}

impl<S: Store> Store for FaultStore<S> {
    type Transaction<'a>
        = FaultTransaction<'a, S>
    where
        S: 'a;

    fn begin(&self) -> Result<FaultTransaction<'_, S>, StoreError> {
        self.check_open()?;
        Ok(FaultTransaction {
            store: self,
            inner: self.inner.begin()?,
            keys_read: 0,
        })
    }

    fn begin_read(&self) -> Result<FaultTransaction<'_, S>, StoreError> {
        self.check_open()?;
        Ok(FaultTransaction {
            store: self,
            inner: self.inner.begin_read()?,
            keys_read: 0,
        })
    }

    fn defers_sync(&self) -> bool {
        self.inner.defers_sync()
    }

    fn drops_tables(&self) -> bool {
        self.inner.drops_tables()
    }

    fn drop_tables_within(&self, begin: &[u8], end: &[u8]) -> Result<(), StoreError> {
        self.check_open()?;
        self.inner.drop_tables_within(begin, end)
    }

    fn begin_unsynced(&self) -> Result<FaultTransaction<'_, S>, StoreError> {
        self.check_open()?;
        Ok(FaultTransaction {
            store: self,
            inner: self.inner.begin_unsynced()?,
            keys_read: 0,
        })
    }

    /// A poisoned store (an injected failed fsync) fails the sync of every commit before
    /// it too: their records may not be on disk. On a store that defers its syncs, a sync
    /// fails as often as a commit's fsync does (`fsync_failure_per_million`), synced or not,
    /// and poisons the store.
    fn sync_through(&self, version: CommitVersion) -> Result<(), StoreError> {
        self.check_open()?;
        if !self.inner.defers_sync() {
            return self.inner.sync_through(version);
        }
        let (failed, applied) = {
            let rates = *self.rates.lock().expect("fault rates lock");
            let mut rng = self.rng.lock().expect("fault rng lock");
            (
                rng.below(1_000_000) < rates.fsync_failure_per_million,
                rng.chance(1, 2),
            )
        };
        if !failed {
            return self.inner.sync_through(version);
        }
        self.counts.fsync_failures.fetch_add(1, Ordering::Relaxed);
        if applied {
            self.inner.sync_through(version)?;
        }
        self.poisoned.store(true, Ordering::SeqCst);
        Err(StoreError::Io("injected fsync failure".into()))
    }
}

impl<S: Store> FaultStore<S> {
    fn check_open(&self) -> Result<(), StoreError> {
        if self.is_poisoned() {
            return Err(StoreError::Poisoned);
        }
        if self.is_fenced() {
            return Err(StoreError::Fenced);
        }
        Ok(())
    }
}

impl<'a, S: Store + 'a> Transaction for FaultTransaction<'a, S> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.keys_read += 1;
        self.inner.get(key)
    }
    fn add_read_conflict(&mut self, key: &[u8]) {
        self.inner.add_read_conflict(key);
    }
    fn add_read_conflict_range(&mut self, begin: &[u8], end: &[u8]) {
        self.inner.add_read_conflict_range(begin, end);
    }
    fn get_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let found = self.inner.get_range(begin, end, limit)?;
        self.keys_read += found.len() as u64;
        Ok(found)
    }
    fn scan_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let mut visited = 0;
        let result = self.inner.scan_range(begin, end, limit, &mut |key, value| {
            visited += 1;
            visit(key, value)
        });
        self.keys_read += visited;
        result
    }
    fn set(&mut self, key: &[u8], value: &[u8]) {
        self.inner.set(key, value);
    }
    fn set_concat(&mut self, key: &[u8], head: &[u8], tail: &[u8]) {
        self.inner.set_concat(key, head, tail);
    }
    fn holds_short_values_inline(&self) -> bool {
        self.inner.holds_short_values_inline()
    }
    fn clear(&mut self, key: &[u8]) {
        self.inner.clear(key);
    }
    fn clear_range(&mut self, begin: &[u8], end: &[u8]) {
        self.inner.clear_range(begin, end);
    }
    fn clear_range_bounded(
        &mut self,
        begin: &[u8],
        end: &[u8],
        keys_max: usize,
    ) -> Result<super::BoundedClear, StoreError> {
        let cleared = self.inner.clear_range_bounded(begin, end, keys_max)?;
        self.keys_read += cleared.keys_read as u64;
        Ok(cleared)
    }
    fn clear_range_with_keys<K: AsRef<[u8]>>(
        &mut self,
        begin: &[u8],
        end: &[u8],
        keys: impl IntoIterator<Item = K>,
    ) {
        self.inner.clear_range_with_keys(begin, end, keys);
    }
    fn atomic_add(&mut self, key: &[u8], delta: u64) {
        self.inner.atomic_add(key, delta);
    }
    fn atomic_max(&mut self, key: &[u8], value: u64) {
        self.inner.atomic_max(key, value);
    }
    fn commit(self) -> Result<CommitVersion, StoreError> {
        let store = self.store;
        let counts = &store.counts;
        let reads_max = store.reads_per_transaction_max.load(Ordering::SeqCst);
        if reads_max > 0 && self.keys_read > reads_max {
            counts.conflicts.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::Conflict);
        }
        match store.roll() {
            Fault::None => self.inner.commit(),
            Fault::Conflict => {
                counts.conflicts.fetch_add(1, Ordering::Relaxed);
                Err(StoreError::Conflict)
            }
            Fault::CommitUnknown { applied } => {
                if applied {
                    counts
                        .commit_unknown_applied
                        .fetch_add(1, Ordering::Relaxed);
                    self.inner.commit()?;
                } else {
                    counts
                        .commit_unknown_dropped
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(StoreError::CommitUnknown)
            }
            Fault::FsyncFailed { applied } => {
                counts.fsync_failures.fetch_add(1, Ordering::Relaxed);
                if applied {
                    self.inner.commit()?;
                }
                store.poisoned.store(true, Ordering::SeqCst);
                Err(StoreError::Io("injected fsync failure".into()))
            }
            Fault::Fenced => {
                // FoundationDB checks the owner epoch before committing: nothing is written.
                counts.fenced.fetch_add(1, Ordering::Relaxed);
                store.fenced.store(true, Ordering::SeqCst);
                Err(StoreError::Fenced)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    /// A fenced commit writes nothing, and the store stays fenced until it is reopened (the
    /// shard claimed again), as a FoundationDB store does.
    #[test]
    fn fencing_writes_nothing_and_sticks_until_reopen() {
        let always_fenced = FaultRates {
            fenced_per_million: 1_000_000,
            ..FaultRates::default()
        };
        let store = FaultStore::new(MemoryStore::new(), always_fenced, 7);
        let mut txn = store.begin().expect("begin");
        txn.set(b"k", b"v");
        assert_eq!(txn.commit(), Err(StoreError::Fenced));
        assert!(!StoreError::Fenced.is_retryable());
        assert_eq!(store.counts.fenced.load(Ordering::Relaxed), 1);
        assert!(matches!(store.begin(), Err(StoreError::Fenced)));

        store.set_rates(FaultRates::default());
        store.reopen();
        let mut txn = store.begin().expect("begin after reopen");
        assert_eq!(txn.get(b"k").expect("get"), None);
    }
}
