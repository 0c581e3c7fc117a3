//! The log store's live pairs, with each inbox's messages and counter kept together.
//!
//! Nearly every commit writes message keys (`q/{inbox}/{seq}`, new seqs at the end of their
//! inbox) and counter keys (`c/{inbox}`), and acks delete messages from the start of their
//! inbox. In one ordered map of all keys each of those is a search from the root, which in
//! a map of a million keys misses the cache at nearly every level (the store bench: a fifth
//! of its time). Here an inbox is found by hashing its id, its counter is a field, and its
//! messages are a queue in seq order: a new message is appended, an ack pops from the front.
//! A sorted set of the inboxes held keeps range visits in key order; it changes only when an
//! inbox appears or goes. Every other key, and any key of those tags with another shape, is
//! in a [`KeyMap`]. Range visits merge the three kinds in byte order, so the map behaves as
//! one ordered map of byte strings.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ops::Bound;

use super::key_map::{KeyMap, MapKey, merge};
use super::overlay::Bytes;
use crate::keys;

/// One inbox's counter and messages.
#[derive(Debug, Default)]
struct Inbox {
    counter: Option<Bytes>,
    /// By seq, ascending.
    messages: VecDeque<(u64, Bytes)>,
}

impl Inbox {
    fn is_empty(&self) -> bool {
        self.counter.is_none() && self.messages.is_empty()
    }

    /// Where `seq` is or would go.
    fn position(&self, seq: u64) -> Result<usize, usize> {
        self.messages.binary_search_by_key(&seq, |(held, _)| *held)
    }
}

/// A key the map keeps with its inbox.
enum InboxKey {
    Counter(u64),
    Message(u64, u64),
}

impl InboxKey {
    fn parse(key: &[u8]) -> Option<InboxKey> {
        if let Some((inbox, seq)) = keys::parse_message(key) {
            return Some(InboxKey::Message(inbox, seq));
        }
        let counter: &[u8; 9] = key.try_into().ok()?;
        (counter[0] == keys::TAG_COUNTER).then(|| {
            InboxKey::Counter(u64::from_be_bytes(
                counter[1..].try_into().expect("8 bytes"),
            ))
        })
    }
}

/// Live keys and their values, in byte order.
#[derive(Debug, Default)]
pub(crate) struct LiveMap {
    other: KeyMap<Bytes>,
    inboxes: HashMap<u64, Inbox>,
    /// The ids of `inboxes`, in order.
    ordered: BTreeSet<u64>,
    /// Counters and messages held in `inboxes`.
    inbox_keys: usize,
}

impl LiveMap {
    pub(crate) fn len(&self) -> usize {
        self.other.len() + self.inbox_keys
    }

    /// Sets `key`; returns the value it replaced.
    pub(crate) fn insert(&mut self, key: Bytes, value: Bytes) -> Option<Bytes> {
        let Some(parsed) = InboxKey::parse(&key) else {
            return self.other.insert(key, value);
        };
        let id = match parsed {
            InboxKey::Counter(id) | InboxKey::Message(id, _) => id,
        };
        let inbox = self.inboxes.entry(id).or_insert_with(|| {
            self.ordered.insert(id);
            Inbox::default()
        });
        let old = match parsed {
            InboxKey::Counter(_) => inbox.counter.replace(value),
            InboxKey::Message(_, seq) => {
                if inbox.messages.back().is_none_or(|(last, _)| *last < seq) {
                    inbox.messages.push_back((seq, value));
                    None
                } else {
                    match inbox.position(seq) {
                        Ok(at) => Some(std::mem::replace(&mut inbox.messages[at].1, value)),
                        Err(at) => {
                            inbox.messages.insert(at, (seq, value));
                            None
                        }
                    }
                }
            }
        };
        if old.is_none() {
            self.inbox_keys += 1;
        }
        old
    }

    /// Deletes `key`; returns its value.
    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<Bytes> {
        let Some(parsed) = InboxKey::parse(key) else {
            return self.other.remove(key);
        };
        let id = match parsed {
            InboxKey::Counter(id) | InboxKey::Message(id, _) => id,
        };
        let inbox = self.inboxes.get_mut(&id)?;
        let old = match parsed {
            InboxKey::Counter(_) => inbox.counter.take(),
            InboxKey::Message(_, seq) => {
                if inbox
                    .messages
                    .front()
                    .is_some_and(|(first, _)| *first == seq)
                {
                    inbox.messages.pop_front().map(|(_, value)| value)
                } else {
                    inbox
                        .position(seq)
                        .ok()
                        .and_then(|at| inbox.messages.remove(at))
                        .map(|(_, value)| value)
                }
            }
        };
        if inbox.messages.is_empty() && inbox.messages.capacity() > 0 {
            // An emptied inbox gives its queue's memory back.
            inbox.messages = VecDeque::new();
        }
        if inbox.is_empty() {
            self.inboxes.remove(&id);
            self.ordered.remove(&id);
        }
        if old.is_some() {
            self.inbox_keys -= 1;
        }
        old
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<&Bytes> {
        match InboxKey::parse(key) {
            None => self.other.get(key),
            Some(InboxKey::Counter(id)) => self.inboxes.get(&id)?.counter.as_ref(),
            Some(InboxKey::Message(id, seq)) => {
                let inbox = self.inboxes.get(&id)?;
                let at = inbox.position(seq).ok()?;
                Some(&inbox.messages[at].1)
            }
        }
    }

    /// Calls `visit` with the pairs between `begin` and `end` in key order until it returns
    /// false; returns whether it never did.
    pub(crate) fn visit_range(
        &self,
        begin: Bound<&[u8]>,
        end: Bound<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &Bytes) -> bool,
    ) -> bool {
        let first = |a: &(MapKey, &Bytes), b: &(MapKey, &Bytes)| a.0.bytes() < b.0.bytes();
        let counters = self
            .inboxes_between(keys::TAG_COUNTER, begin, end)
            .filter_map(|(id, inbox)| {
                let value = inbox.counter.as_ref()?;
                Some((MapKey::from_bytes(&keys::counter(id)), value))
            });
        let messages =
            self.inboxes_between(keys::TAG_MESSAGE, begin, end)
                .flat_map(move |(id, inbox)| {
                    // Messages below `begin` in the first inbox are skipped by a binary search.
                    let skipped = inbox
                        .messages
                        .partition_point(|(seq, _)| !is_above(&keys::message(id, *seq), begin));
                    inbox.messages.range(skipped..).map(move |(seq, value)| {
                        (MapKey::from_bytes(&keys::message(id, *seq)), value)
                    })
                });
        let in_range = |(key, _): &(MapKey, &Bytes)| {
            is_above(key.bytes(), begin) && is_below(key.bytes(), end)
        };
        let counters = counters.filter(in_range);
        let messages = messages.take_while(move |(key, _)| is_below(key.bytes(), end));
        merge(
            merge(self.other.range(begin, end), counters, first),
            messages,
            first,
        )
        .all(|(key, value)| visit(key.bytes(), value))
    }

    /// The inboxes whose keys of `tag` (`tag` and the inbox's id, then anything) can lie
    /// between `begin` and `end`, in order: a few more at the ends, never fewer.
    fn inboxes_between<'a>(
        &'a self,
        tag: u8,
        begin: Bound<&[u8]>,
        end: Bound<&[u8]>,
    ) -> impl Iterator<Item = (u64, &'a Inbox)> + 'a {
        // A key `tag, id, ...` at or above a bound `tag, b...` has `id` at least `b`'s first
        // eight bytes (zero-padded); one below such a bound, at most those.
        let id_in = |key: &[u8]| {
            let mut id = [0u8; 8];
            let tail = &key[1..];
            id[..tail.len().min(8)].copy_from_slice(&tail[..tail.len().min(8)]);
            u64::from_be_bytes(id)
        };
        let low = match begin {
            Bound::Unbounded => Some(0),
            Bound::Included(key) | Bound::Excluded(key) => match key.first() {
                None => Some(0),
                Some(first) if *first < tag => Some(0),
                Some(first) if *first > tag => None,
                Some(_) => Some(id_in(key)),
            },
        };
        let high = match end {
            Bound::Unbounded => Some(u64::MAX),
            Bound::Included(key) | Bound::Excluded(key) => match key.first() {
                None => None,
                Some(first) if *first < tag => None,
                Some(first) if *first > tag => Some(u64::MAX),
                Some(_) => Some(id_in(key)),
            },
        };
        let ids = match (low, high) {
            (Some(low), Some(high)) if low <= high => Some(low..=high),
            _ => None,
        };
        ids.into_iter()
            .flat_map(|ids| self.ordered.range(ids))
            .map(|id| (*id, &self.inboxes[id]))
    }
}

fn is_above(key: &[u8], begin: Bound<&[u8]>) -> bool {
    match begin {
        Bound::Unbounded => true,
        Bound::Included(bound) => key >= bound,
        Bound::Excluded(bound) => key > bound,
    }
}

fn is_below(key: &[u8], end: Bound<&[u8]>) -> bool {
    match end {
        Bound::Unbounded => true,
        Bound::Included(bound) => key <= bound,
        Bound::Excluded(bound) => key < bound,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::rng::Rng;

    fn as_ref(bound: &Bound<Vec<u8>>) -> Bound<&[u8]> {
        match bound {
            Bound::Unbounded => Bound::Unbounded,
            Bound::Included(key) => Bound::Included(&key[..]),
            Bound::Excluded(key) => Bound::Excluded(&key[..]),
        }
    }

    /// A key near the inbox shapes: message and counter keys of a few inboxes, keys of those
    /// tags one byte short or long, other tags, and short prefixes (as range bounds are).
    fn some_key(rng: &mut Rng) -> Vec<u8> {
        let inbox = [0u64, 1, 2, 255, 256, u64::MAX - 1, u64::MAX][rng.below(7) as usize];
        let seq = rng.below(6);
        let mut key = match rng.below(8) {
            0..=2 => keys::message(inbox, seq).to_vec(),
            3 | 4 => keys::counter(inbox).to_vec(),
            5 => keys::device(inbox, seq as u32).to_vec(),
            6 => keys::dedupe(inbox, seq, 1, 2).to_vec(),
            _ => vec![[b'c', b'q', b'd', b'a', b'z'][rng.below(5) as usize]],
        };
        match rng.below(6) {
            0 => key.truncate(rng.below(key.len() as u64 + 1) as usize),
            1 => key.push(rng.below(3) as u8),
            _ => {}
        }
        key
    }

    /// The map agrees with a plain ordered map of byte strings: sets, deletes, lookups and
    /// range visits with every kind of bound, over keys of inboxes (messages set out of seq
    /// order and deleted from the middle too) and every other shape around them.
    #[test]
    fn the_map_agrees_with_an_ordered_map_of_bytes() {
        for seed in 0..20 {
            let mut rng = Rng::new(seed);
            let mut map = LiveMap::default();
            let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            for step in 0..3000u64 {
                let key = some_key(&mut rng);
                match rng.below(5) {
                    0 | 1 => {
                        let value = step.to_le_bytes().to_vec();
                        let old = map.insert(Bytes::from(&key[..]), Bytes::from(&value[..]));
                        assert_eq!(old.as_deref(), model.insert(key, value).as_deref());
                    }
                    2 => assert_eq!(map.remove(&key).as_deref(), model.remove(&key).as_deref()),
                    3 => {
                        // Deletes the lowest message of an inbox, as an ack does.
                        if let Some(first) = model
                            .keys()
                            .find(|k| keys::parse_message(k).is_some())
                            .cloned()
                        {
                            assert_eq!(
                                map.remove(&first).as_deref(),
                                model.remove(&first).as_deref()
                            );
                        }
                    }
                    _ => assert_eq!(
                        map.get(&key).map(|v| &v[..]),
                        model.get(&key).map(|v| &v[..])
                    ),
                }
                assert_eq!(map.len(), model.len());
                let (a, b) = (some_key(&mut rng), some_key(&mut rng));
                let bound = |key: &Vec<u8>, kind: u64| match kind {
                    0 => Bound::Unbounded,
                    1 => Bound::Included(key.clone()),
                    _ => Bound::Excluded(key.clone()),
                };
                let (begin, end) = (bound(&a, rng.below(3)), bound(&b, rng.below(3)));
                let valid = match (&begin, &end) {
                    (Bound::Included(a), Bound::Included(b)) => a <= b,
                    (
                        Bound::Included(a) | Bound::Excluded(a),
                        Bound::Included(b) | Bound::Excluded(b),
                    ) => a < b,
                    _ => true,
                };
                if !valid {
                    continue;
                }
                let limit = rng.below(30) as usize + 1;
                let mut seen = Vec::new();
                map.visit_range(as_ref(&begin), as_ref(&end), &mut |k, v| {
                    seen.push((k.to_vec(), v.to_vec()));
                    seen.len() < limit
                });
                let expected: Vec<(Vec<u8>, Vec<u8>)> = model
                    .range::<[u8], _>((as_ref(&begin), as_ref(&end)))
                    .take(limit)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                assert_eq!(
                    seen, expected,
                    "seed {seed} step {step}: {begin:?}..{end:?}"
                );
            }
            // Emptied inboxes are gone from the index.
            for key in model.keys() {
                map.remove(key);
            }
            assert_eq!(map.len(), 0);
            assert!(map.inboxes.is_empty() && map.ordered.is_empty());
        }
    }
}
