//! A transaction's writes: each key's final state, found by hashing, put in key order only
//! when a range asks.
//!
//! A send batch writes three to four keys per message and reads a few back, and nearly every
//! commit asks for no range before it ends. In an ordered map every write was a search from
//! the root (and the commit a merge of three maps by key length): a third of a commit's
//! instructions in the store bench. Here a write is a hash probe and a push, and the commit
//! hands the engine the pairs in the order they were first written. No engine needs them in
//! key order (the log store sorts its pending commit only when a writer's range asks), and
//! first-written order keeps what the committer wrote in order in order: an inbox's new
//! messages by ascending seq, which the log store's map appends. A range first sorts the keys
//! written since the last range and merges them into the ordered ones, so interleaved writes
//! and ranges cost a merge each, not a sort of everything.

use std::cell::Cell;
use std::collections::hash_map::Entry;
use std::ops::Bound;

use super::overlay::Bytes;
use crate::FastHashMap;

/// Keys a dropped write set may hold room for and still be kept for the thread's next
/// transaction: a commit then starts with its tables grown (growing them from empty was a
/// third of a write's cost), and a rare huge transaction does not keep its memory (nor make
/// every later small one clear a large table).
const SPARE_KEYS_MAX: usize = 8 * 1024;

thread_local! {
    /// The last write set this thread dropped, emptied, if it was not too large.
    static SPARE: Cell<Option<WriteSet>> = const { Cell::new(None) };
}

/// A key's state in a transaction.
#[derive(Debug)]
enum Write {
    /// Set to this value.
    Set(Bytes),
    /// Cleared.
    Cleared,
    /// Written, then taken back by a cleared range: as if never written. Kept so that the
    /// key keeps its one place in `entries` and `ordered`.
    Dropped,
}

impl Write {
    fn state(&self) -> Option<Option<&Bytes>> {
        match self {
            Write::Set(value) => Some(Some(value)),
            Write::Cleared => Some(None),
            Write::Dropped => None,
        }
    }
}

/// Each written key's final state: `Some` set, `None` cleared.
#[derive(Debug, Default)]
pub(crate) struct WriteSet {
    /// Each key and its state, in the order first written.
    entries: Vec<(Bytes, Write)>,
    /// Where each key is in `entries`.
    index: FastHashMap<Bytes, u32>,
    /// Positions in `entries` in key order: those before `ordered_upto`.
    ordered: Vec<u32>,
    ordered_upto: usize,
}

impl WriteSet {
    /// An empty write set: the one this thread dropped last, if it kept one.
    pub(crate) fn new() -> WriteSet {
        SPARE
            .try_with(Cell::take)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// Sets `key`'s state: `Some` a value, `None` cleared.
    pub(crate) fn insert(&mut self, key: Bytes, state: Option<Bytes>) {
        let write = match state {
            Some(value) => Write::Set(value),
            None => Write::Cleared,
        };
        // One hash and probe: nearly every key is new to the set.
        match self.index.entry(key.clone()) {
            Entry::Occupied(at) => self.entries[*at.get() as usize].1 = write,
            Entry::Vacant(slot) => {
                slot.insert(self.entries.len() as u32);
                self.entries.push((key, write));
            }
        }
    }

    /// Keys written, those taken back included (an upper bound for `drain_pairs`).
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// `key`'s state if this transaction wrote it: `Some(None)` cleared.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Option<&Bytes>> {
        let at = *self.index.get(key)?;
        self.entries[at as usize].1.state()
    }

    pub(crate) fn contains_key(&self, key: &[u8]) -> bool {
        self.get(key).is_some()
    }

    /// Takes back the write of `key`, if any: as if this transaction never wrote it.
    pub(crate) fn remove(&mut self, key: &[u8]) {
        if let Some(&at) = self.index.get(key) {
            self.entries[at as usize].1 = Write::Dropped;
        }
    }

    /// The written keys between `begin` and `end`, in key order, with their states.
    pub(crate) fn range(
        &mut self,
        begin: Bound<&[u8]>,
        end: Bound<&[u8]>,
    ) -> impl Iterator<Item = (&Bytes, Option<&Bytes>)> {
        self.order();
        let entries = &self.entries;
        let key_at = move |at: &u32| &entries[*at as usize].0[..];
        let start = match begin {
            Bound::Included(key) => self.ordered.partition_point(|at| key_at(at) < key),
            Bound::Excluded(key) => self.ordered.partition_point(|at| key_at(at) <= key),
            Bound::Unbounded => 0,
        };
        self.ordered[start..]
            .iter()
            .take_while(move |at| match end {
                Bound::Included(end) => key_at(at) <= end,
                Bound::Excluded(end) => key_at(at) < end,
                Bound::Unbounded => true,
            })
            .filter_map(move |at| {
                let (key, write) = &entries[*at as usize];
                Some((key, write.state()?))
            })
    }

    /// Takes every written key and its state, in the order first written.
    pub(crate) fn drain_pairs(&mut self) -> impl Iterator<Item = (Bytes, Option<Bytes>)> {
        self.index.clear();
        self.ordered.clear();
        self.ordered_upto = 0;
        self.entries
            .drain(..)
            .filter_map(|(key, write)| match write {
                Write::Set(value) => Some((key, Some(value))),
                Write::Cleared => Some((key, None)),
                Write::Dropped => None,
            })
    }

    /// Merges the keys written since the last range into `ordered`.
    fn order(&mut self) {
        let written = self.entries.len();
        if self.ordered_upto == written {
            return;
        }
        let entries = &self.entries;
        let key_at = |at: &u32| &entries[*at as usize].0[..];
        let mut new: Vec<u32> = (self.ordered_upto as u32..written as u32).collect();
        new.sort_unstable_by(|a, b| key_at(a).cmp(key_at(b)));
        self.ordered_upto = written;
        if self.ordered.is_empty() {
            self.ordered = new;
            return;
        }
        let mut merged = Vec::with_capacity(self.ordered.len() + new.len());
        let mut new = new.into_iter().peekable();
        for at in self.ordered.drain(..) {
            while let Some(next) = new.next_if(|next| key_at(next) < key_at(&at)) {
                merged.push(next);
            }
            merged.push(at);
        }
        merged.extend(new);
        self.ordered = merged;
    }
}

impl Drop for WriteSet {
    fn drop(&mut self) {
        let capacity = self.index.capacity();
        if capacity == 0 || capacity > SPARE_KEYS_MAX {
            return;
        }
        // Kept only in an empty slot, so no set dropped here has tables left to keep: a
        // drop never leads to another. (Fails only while the thread exits: nothing kept.)
        let _ = SPARE.try_with(|slot| {
            let held = slot.take();
            if held.is_some() {
                slot.set(held);
                return;
            }
            // The hasher's keys go along; a new one would draw fresh ones on every drop.
            let hasher = self.index.hasher().clone();
            let mut spare = WriteSet {
                entries: std::mem::take(&mut self.entries),
                index: std::mem::replace(&mut self.index, FastHashMap::with_hasher(hasher)),
                ordered: std::mem::take(&mut self.ordered),
                ordered_upto: 0,
            };
            spare.entries.clear();
            spare.index.clear();
            spare.ordered.clear();
            slot.set(Some(spare));
        });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::rng::Rng;
    use crate::store::key_map::test_bounds::{as_slices, is_valid};

    /// The write set answers every question as an ordered map of byte strings does, through
    /// any mix of sets, clears, take-backs and ranges (ranges between writes exercise the
    /// merge of new keys into the ordered ones, and take-backs a key written again after),
    /// and hands its pairs over in the order their keys were first written.
    #[test]
    fn behaves_as_an_ordered_map() {
        let mut rng = Rng::new(11);
        for _ in 0..300 {
            // Each round takes the set the last one dropped: nothing of it may show.
            let mut set = WriteSet::new();
            let mut model: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
            // Every key ever written, in the order first written (taken back ones too).
            let mut first_written: Vec<Vec<u8>> = Vec::new();
            let key = |rng: &mut Rng| -> Vec<u8> {
                let len = rng.below(6) as usize;
                (0..len).map(|_| rng.below(4) as u8 * 85).collect()
            };
            let bound = |rng: &mut Rng| -> Bound<Vec<u8>> {
                match rng.below(3) {
                    0 => Bound::Included(key(rng)),
                    1 => Bound::Excluded(key(rng)),
                    _ => Bound::Unbounded,
                }
            };
            for _ in 0..rng.below(60) {
                match rng.below(6) {
                    0 | 1 => {
                        let (k, v) = (key(&mut rng), key(&mut rng));
                        if !first_written.contains(&k) {
                            first_written.push(k.clone());
                        }
                        set.insert(Bytes::from(&k[..]), Some(Bytes::from(&v[..])));
                        model.insert(k, Some(v));
                    }
                    2 => {
                        let k = key(&mut rng);
                        if !first_written.contains(&k) {
                            first_written.push(k.clone());
                        }
                        set.insert(Bytes::from(&k[..]), None);
                        model.insert(k, None);
                    }
                    3 => {
                        let k = key(&mut rng);
                        set.remove(&k);
                        model.remove(&k);
                    }
                    4 => {
                        let k = key(&mut rng);
                        assert_eq!(
                            set.get(&k).map(|state| state.map(|v| v.to_vec())),
                            model.get(&k).cloned()
                        );
                        assert_eq!(set.contains_key(&k), model.contains_key(&k));
                    }
                    _ => {
                        let (begin, end) = (bound(&mut rng), bound(&mut rng));
                        if !is_valid(&begin, &end) {
                            continue;
                        }
                        let got: Vec<(Vec<u8>, Option<Vec<u8>>)> = set
                            .range(as_slices(&begin), as_slices(&end))
                            .map(|(k, v)| (k.to_vec(), v.map(|v| v.to_vec())))
                            .collect();
                        let want: Vec<(Vec<u8>, Option<Vec<u8>>)> = model
                            .range::<Vec<u8>, _>((begin.clone(), end.clone()))
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect();
                        assert_eq!(got, want, "range {begin:?}..{end:?}");
                    }
                }
            }
            let pairs: Vec<(Vec<u8>, Option<Vec<u8>>)> = set
                .drain_pairs()
                .map(|(k, v)| (k.to_vec(), v.map(|v| v.to_vec())))
                .collect();
            let want: Vec<(Vec<u8>, Option<Vec<u8>>)> = first_written
                .into_iter()
                .filter_map(|k| Some((k.clone(), model.get(&k)?.clone())))
                .collect();
            assert_eq!(pairs, want);
        }
    }
}
