//! An in-memory store for simulation and tests.
//!
//! Commits are atomic and "durable" in the sense the simulation needs: a simulated crash drops
//! the shard's memory, never the store's.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

use super::dedupe_filter::DedupeFilter;
use super::overlay::{self, Bytes, Engine, Overlay};
use super::{CommitVersion, KeyValue, Store, StoreError};

/// The memory store's dedupe filter budget: the same filter as the embedded store, so the
/// simulation runs the reads it saves.
const DEDUPE_FILTER_BYTES_MAX: usize = 4 * 1024 * 1024;

/// A store kept in a `BTreeMap` behind a lock.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<MemoryState>,
    /// Models an engine that drops whole tables (`Store::drop_tables_within`).
    drops_tables: bool,
}

#[derive(Debug)]
struct MemoryState {
    data: BTreeMap<Vec<u8>, Vec<u8>>,
    version: CommitVersion,
    /// Every write goes through `apply`, which notes it here first.
    dedupe_filter: DedupeFilter,
}

impl Default for MemoryState {
    fn default() -> MemoryState {
        MemoryState {
            data: BTreeMap::new(),
            version: 0,
            dedupe_filter: DedupeFilter::new(None, DEDUPE_FILTER_BYTES_MAX),
        }
    }
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// A memory store that drops tables as fjall does (`Store::drop_tables_within`), modelled:
    /// a drop removes about half the keys of its range (those in tables wholly inside it, as
    /// if the rest lay in tables reaching past its ends or in memtables), which the sweep after
    /// it must clear key by key. So the simulation drives expiry's drops and its sweeps.
    pub fn dropping_tables() -> MemoryStore {
        MemoryStore {
            drops_tables: true,
            ..MemoryStore::default()
        }
    }

    fn lock(&self) -> MutexGuard<'_, MemoryState> {
        // A panic while holding the lock is a bug in a test; the data is still consistent
        // because commits apply under the lock in one step.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every committed pair whose key starts with `prefix`, for checkers in tests.
    pub fn dump_prefix(&self, prefix: &[u8]) -> Vec<KeyValue> {
        self.lock()
            .data
            .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// A transaction on a [`MemoryStore`].
#[derive(Debug)]
pub struct MemoryTransaction<'a> {
    overlay: Overlay<MemoryEngine<'a>>,
}

#[derive(Debug)]
struct MemoryEngine<'a> {
    state: MutexGuard<'a, MemoryState>,
}

impl Engine for MemoryEngine<'_> {
    fn prefetch(&self, key: &[u8]) {
        self.state.dedupe_filter.prefetch(key);
    }

    fn read(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if self.state.dedupe_filter.is_absent(key) {
            return Ok(None);
        }
        Ok(self.state.data.get(key).cloned())
    }

    fn scan(
        &self,
        begin: &[u8],
        end: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        for (key, value) in self
            .state
            .data
            .range::<[u8], _>((Bound::Included(begin), Bound::Excluded(end)))
        {
            if !visit(key, value) {
                break;
            }
        }
        Ok(())
    }

    fn apply(&mut self, changes: Vec<(Bytes, Option<Bytes>)>) -> Result<CommitVersion, StoreError> {
        for (key, value) in changes {
            match value {
                Some(value) => {
                    self.state.dedupe_filter.note_written(&key);
                    self.state.data.insert(key.to_vec(), value.to_vec())
                }
                None => self.state.data.remove(&*key),
            };
        }
        self.state.version += 1;
        Ok(self.state.version)
    }
}

impl Store for MemoryStore {
    type Transaction<'a> = MemoryTransaction<'a>;

    fn begin(&self) -> Result<MemoryTransaction<'_>, StoreError> {
        Ok(MemoryTransaction {
            overlay: Overlay::new(MemoryEngine { state: self.lock() }),
        })
    }

    fn drops_tables(&self) -> bool {
        self.drops_tables
    }

    fn drop_tables_within(&self, begin: &[u8], end: &[u8]) -> Result<(), StoreError> {
        if !self.drops_tables || begin >= end {
            return Ok(());
        }
        let mut state = self.lock();
        let in_dropped_tables: Vec<Vec<u8>> = state
            .data
            .range::<[u8], _>((Bound::Included(begin), Bound::Excluded(end)))
            .map(|(key, _)| key)
            .filter(|key| key.iter().fold(0u8, |parity, byte| parity ^ byte) & 1 == 0)
            .cloned()
            .collect();
        for key in in_dropped_tables {
            state.data.remove(&key);
        }
        Ok(())
    }
}

overlay::overlay_transaction!(MemoryTransaction<'_>);
