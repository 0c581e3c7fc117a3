//! The log store's dedupe records in memory: by bucket, each bucket's records in a hash map.
//!
//! Every send writes a dedupe record (`keys::dedupe`: a tag, then bucket, inbox, sender and
//! client id as big-endian numbers, 33 bytes). In an ordered map of them each insert was a
//! search from the root through up to a hundred thousand keys chosen by senders, missing the
//! cache at nearly every level (a tenth of the store bench's time). Here an insert is a hash
//! probe in its bucket's map. Order is needed only by ranges over dedupe keys (a move to the
//! tier, which takes them all on the background thread; the tier's expiry of old buckets; the
//! filter's warm-up at open), and a range sorts the records of the buckets it overlaps then.
//! A key of another shape (none that Courier writes) is kept in an ordered [`KeyMap`].

use std::collections::BTreeMap;
use std::ops::Bound;

use super::key_map::{KeyMap, MapKey, merge};
use super::overlay::Bytes;
use crate::{FastHashMap, keys};

/// A dedupe key's numbers after its bucket: inbox, sender, client id.
type Record = (u64, u64, u64);

fn split(key: &[u8]) -> Option<(u64, Record)> {
    let (bucket, inbox, sender, client_id) = keys::parse_dedupe(key)?;
    Some((bucket, (inbox, sender, client_id)))
}

fn join(bucket: u64, (inbox, sender, client_id): Record) -> [u8; 33] {
    keys::dedupe(bucket, inbox, sender, client_id)
}

/// Dedupe records (and any other key), behaving as an ordered map of byte strings.
#[derive(Debug, Default)]
pub(crate) struct DedupeRecords {
    buckets: BTreeMap<u64, FastHashMap<Record, Bytes>>,
    other: KeyMap<Bytes>,
}

impl DedupeRecords {
    pub(crate) fn is_empty(&self) -> bool {
        self.buckets.is_empty() && self.other.is_empty()
    }

    /// Sets `key`; returns the value it replaced.
    pub(crate) fn insert(&mut self, key: Bytes, value: Bytes) -> Option<Bytes> {
        match split(&key) {
            Some((bucket, record)) => self
                .buckets
                .entry(bucket)
                .or_default()
                .insert(record, value),
            None => self.other.insert(key, value),
        }
    }

    /// Deletes `key`; returns its value.
    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<Bytes> {
        let Some((bucket, record)) = split(key) else {
            return self.other.remove(key);
        };
        let records = self.buckets.get_mut(&bucket)?;
        let value = records.remove(&record);
        if records.is_empty() {
            self.buckets.remove(&bucket);
        }
        value
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<&Bytes> {
        match split(key) {
            Some((bucket, record)) => self.buckets.get(&bucket)?.get(&record),
            None => self.other.get(key),
        }
    }

    /// The highest key.
    pub(crate) fn last_key(&self) -> Option<Vec<u8>> {
        let record = self
            .buckets
            .iter()
            .next_back()
            .and_then(|(bucket, records)| {
                let highest = records.keys().max()?;
                Some(join(*bucket, *highest).to_vec())
            });
        record.max(self.other.last_key())
    }

    /// The pairs between `begin` and `end`, in key order. Sorts the records of every bucket
    /// the range overlaps.
    pub(crate) fn range<'a>(
        &'a self,
        begin: Bound<&[u8]>,
        end: Bound<&[u8]>,
    ) -> impl Iterator<Item = (MapKey<'a>, &'a Bytes)> + 'a {
        let after_begin = move |key: &[u8]| match begin {
            Bound::Included(bound) => key >= bound,
            Bound::Excluded(bound) => key > bound,
            Bound::Unbounded => true,
        };
        let before_end = move |key: &[u8]| match end {
            Bound::Included(bound) => key <= bound,
            Bound::Excluded(bound) => key < bound,
            Bound::Unbounded => true,
        };
        let mut records: Vec<(u64, Record, &'a Bytes)> = Vec::new();
        for (&bucket, held) in &self.buckets {
            // Every key of the bucket lies between its 9 bytes and the next bucket's: skip a
            // bucket wholly outside the range.
            let start = keys::dedupe_bucket_start(bucket);
            let past = match bucket.checked_add(1) {
                Some(next) => keys::dedupe_bucket_start(next).to_vec(),
                None => vec![keys::TAG_DEDUPE + 1],
            };
            let starts_after = match begin {
                Bound::Included(bound) | Bound::Excluded(bound) => bound >= &past[..],
                Bound::Unbounded => false,
            };
            if !before_end(&start) {
                // So do the buckets after it.
                break;
            }
            if starts_after {
                continue;
            }
            // A bound inside the bucket that reaches into the inbox bounds the inboxes: the
            // records outside them are passed by a number's comparison, so that a range over
            // one inbox (a purge's) costs a walk of the bucket, not a key built for each.
            let inbox_in = |bound: Bound<&[u8]>| match bound {
                Bound::Included(key) | Bound::Excluded(key)
                    if key.len() >= 17 && key[..9] == start[..] =>
                {
                    Some(u64::from_be_bytes(key[9..17].try_into().expect("8 bytes")))
                }
                _ => None,
            };
            let (inbox_min, inbox_max) = (
                inbox_in(begin).unwrap_or(0),
                inbox_in(end).unwrap_or(u64::MAX),
            );
            let whole = matches!((begin, end), (Bound::Unbounded, Bound::Unbounded));
            let from = records.len();
            records.extend(
                held.iter()
                    .filter(|(record, _)| {
                        whole
                            || ((inbox_min..=inbox_max).contains(&record.0) && {
                                let key = join(bucket, **record);
                                after_begin(&key) && before_end(&key)
                            })
                    })
                    .map(|(record, value)| (bucket, *record, value)),
            );
            records[from..].sort_unstable_by_key(|(_, record, _)| *record);
        }
        let records = records
            .into_iter()
            .map(|(bucket, record, value)| (MapKey::from_bytes(&join(bucket, record)), value));
        let first = |a: &(MapKey, &Bytes), b: &(MapKey, &Bytes)| a.0.bytes() < b.0.bytes();
        merge(records, self.other.range(begin, end), first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::store::key_map::test_bounds::{as_slices as as_ref, is_valid};

    /// The records behave as an ordered map of byte strings: dedupe keys of a few buckets
    /// (the highest bucket included), keys of other shapes among and around them, and range
    /// bounds of every kind, at and around bucket boundaries.
    #[test]
    fn behave_as_an_ordered_map() {
        let mut rng = Rng::new(3);
        let buckets = [0, 1, 7, u64::MAX - 1, u64::MAX];
        let key = |rng: &mut Rng| -> Vec<u8> {
            let bucket = buckets[rng.below(buckets.len() as u64) as usize];
            match rng.below(8) {
                0 => keys::dedupe_bucket_start(bucket).to_vec(),
                1 => {
                    let mut other =
                        keys::dedupe(bucket, rng.below(3), 0, 0)[..rng.below(33) as usize].to_vec();
                    other.push(rng.below(3) as u8);
                    other
                }
                2 => vec![keys::TAG_DEDUPE + 1],
                3 => {
                    // Longer than a record's key, and past what a packed key holds.
                    let mut long = keys::dedupe(bucket, rng.below(3), rng.below(3), 0).to_vec();
                    long.extend(std::iter::repeat_n(1, rng.below(14) as usize + 1));
                    long
                }
                _ => keys::dedupe(bucket, rng.below(3), rng.below(3), rng.below(4)).to_vec(),
            }
        };
        for _ in 0..100 {
            let mut records = DedupeRecords::default();
            let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            for step in 0..300 {
                let k = key(&mut rng);
                if rng.below(3) == 0 {
                    assert_eq!(records.remove(&k).map(|v| v.to_vec()), model.remove(&k));
                } else {
                    let value = vec![rng.below(250) as u8];
                    assert_eq!(
                        records
                            .insert(Bytes::from(&k[..]), Bytes::from(&value[..]))
                            .map(|v| v.to_vec()),
                        model.insert(k.clone(), value)
                    );
                }
                let probe = key(&mut rng);
                assert_eq!(
                    records.get(&probe).map(|v| v.to_vec()),
                    model.get(&probe).cloned()
                );
                assert_eq!(records.is_empty(), model.is_empty());
                assert_eq!(records.last_key(), model.keys().next_back().cloned());
                if step % 10 == 0 {
                    let bound = |rng: &mut Rng| match rng.below(3) {
                        0 => Bound::Unbounded,
                        1 => Bound::Included(key(rng)),
                        _ => Bound::Excluded(key(rng)),
                    };
                    let (begin, end) = (bound(&mut rng), bound(&mut rng));
                    if !is_valid(&begin, &end) {
                        continue;
                    }
                    let got: Vec<(Vec<u8>, Vec<u8>)> = records
                        .range(as_ref(&begin), as_ref(&end))
                        .map(|(k, v)| (k.bytes().to_vec(), v.to_vec()))
                        .collect();
                    let want: Vec<(Vec<u8>, Vec<u8>)> = model
                        .range::<[u8], _>((as_ref(&begin), as_ref(&end)))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    assert_eq!(got, want, "{begin:?}..{end:?}");
                }
            }
        }
    }
}
