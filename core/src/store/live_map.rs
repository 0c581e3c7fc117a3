//! The log store's live pairs, with each inbox's messages and counter kept together.
//!
//! Nearly every commit writes message keys (`q/{inbox}/{seq}`, new seqs at the end of their
//! inbox) and counter keys (`c/{inbox}`), and acks delete messages from the start of their
//! inbox. In one ordered map of all keys each of those is a search from the root, which in
//! a map of a million keys misses the cache at nearly every level (the store bench: a fifth
//! of its time). Here an inbox is found by hashing its id, its counter is a field, and its
//! messages are a queue in seq order: a new message is appended, an ack pops from the front.
//! A sorted set of the inboxes held keeps range visits in key order; it changes only when an
//! inbox appears or goes. Expiry index entries (`e/{bucket}/{inbox}`, one per inbox and
//! expiry bucket, so one for nearly every send to a recipient of few messages) are held by
//! bucket, then by inbox in a map of numbers: an insert compares `u64`s, where the packed
//! keys of a [`KeyMap`] node span four times the cache lines. Every other key, and any key
//! of those tags with another shape, is in a [`KeyMap`]. Range visits merge the kinds in byte
//! order, so the map behaves as one ordered map of byte strings.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::{Bound, RangeInclusive};

use super::key_map::{KeyMap, MapKey, merge};
use super::overlay::Bytes;
use crate::{FastHashMap, keys};

/// Deleted slots an inbox's queue may hold beyond its live messages before it is compacted.
const HOLES_MIN: usize = 32;
/// A queue's capacity kept beyond twice its length once it is this large.
const CAPACITY_KEPT_MIN: usize = 64;

/// One inbox's counter and messages.
#[derive(Debug, Default)]
struct Inbox {
    counter: Option<Bytes>,
    /// By seq, ascending. A message deleted from the middle (expiry of a message with a
    /// shorter time to live than those before it) leaves a hole, `None`, so the delete moves
    /// nothing; holes at either end are popped, and the queue is compacted once they
    /// outnumber its live messages (and `HOLES_MIN`): each delete costs O(1) amortized.
    messages: VecDeque<(u64, Option<Bytes>)>,
    /// `None`s in `messages`.
    holes: usize,
}

impl Inbox {
    fn is_empty(&self) -> bool {
        self.counter.is_none() && self.messages.len() == self.holes
    }

    /// Where `seq` is or would go. An ack deletes its inbox's first message: looked at first.
    fn position(&self, seq: u64) -> Result<usize, usize> {
        match self.messages.front() {
            Some((first, _)) if *first == seq => Ok(0),
            _ => self.messages.binary_search_by_key(&seq, |(held, _)| *held),
        }
    }

    /// Sets message `seq`; returns the value it replaced.
    fn set(&mut self, seq: u64, value: Bytes) -> Option<Bytes> {
        if self.messages.back().is_none_or(|(last, _)| *last < seq) {
            self.messages.push_back((seq, Some(value)));
            return None;
        }
        match self.position(seq) {
            Ok(at) => {
                let old = self.messages[at].1.replace(value);
                if old.is_none() {
                    self.holes -= 1;
                }
                old
            }
            // Only a recovery's replay sets a seq below the highest, and only in seq order.
            Err(at) => {
                self.messages.insert(at, (seq, Some(value)));
                None
            }
        }
    }

    /// Deletes message `seq`; returns its value.
    fn delete(&mut self, seq: u64) -> Option<Bytes> {
        let at = self.position(seq).ok()?;
        let old = self.messages[at].1.take()?;
        self.holes += 1;
        while self
            .messages
            .front()
            .is_some_and(|(_, value)| value.is_none())
        {
            self.messages.pop_front();
            self.holes -= 1;
        }
        while self
            .messages
            .back()
            .is_some_and(|(_, value)| value.is_none())
        {
            self.messages.pop_back();
            self.holes -= 1;
        }
        if self.holes > HOLES_MIN && self.holes > self.messages.len() - self.holes {
            self.messages.retain(|(_, value)| value.is_some());
            self.holes = 0;
        }
        if self.messages.is_empty() {
            // An emptied inbox gives its queue's memory back (most inboxes are caught up).
            self.messages = VecDeque::new();
        } else if self.messages.capacity() > CAPACITY_KEPT_MIN
            && self.messages.len() < self.messages.capacity() / 4
        {
            self.messages.shrink_to(self.messages.len() * 2);
        }
        Some(old)
    }

    fn get(&self, seq: u64) -> Option<&Bytes> {
        self.messages[self.position(seq).ok()?].1.as_ref()
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
    /// Keyed like the committer's inbox caches (decision 0021): inbox ids are chosen by
    /// senders.
    inboxes: FastHashMap<u64, Inbox>,
    /// The ids of `inboxes`, in order.
    ordered: BTreeSet<u64>,
    /// Counters and messages held in `inboxes`.
    inbox_keys: usize,
    /// Expiry index entries: bucket, then inbox.
    expiry: BTreeMap<u64, BTreeMap<u64, Bytes>>,
    /// Entries held in `expiry`.
    expiry_keys: usize,
    /// Inboxes range visits looked at, for a test that they stay proportional to the pairs
    /// visited.
    #[cfg(test)]
    inboxes_looked_at: std::sync::atomic::AtomicUsize,
}

impl LiveMap {
    pub(crate) fn len(&self) -> usize {
        self.other.len() + self.inbox_keys + self.expiry_keys
    }

    /// Sets `key`; returns the value it replaced.
    pub(crate) fn insert(&mut self, key: Bytes, value: Bytes) -> Option<Bytes> {
        if let Some((bucket, inbox)) = keys::parse_expiry(&key) {
            let old = self.expiry.entry(bucket).or_default().insert(inbox, value);
            if old.is_none() {
                self.expiry_keys += 1;
            }
            return old;
        }
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
            InboxKey::Message(_, seq) => inbox.set(seq, value),
        };
        if old.is_none() {
            self.inbox_keys += 1;
        }
        old
    }

    /// Deletes `key`; returns its value.
    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<Bytes> {
        if let Some((bucket, inbox)) = keys::parse_expiry(key) {
            let entries = self.expiry.get_mut(&bucket)?;
            let old = entries.remove(&inbox)?;
            if entries.is_empty() {
                self.expiry.remove(&bucket);
            }
            self.expiry_keys -= 1;
            return Some(old);
        }
        let Some(parsed) = InboxKey::parse(key) else {
            return self.other.remove(key);
        };
        let id = match parsed {
            InboxKey::Counter(id) | InboxKey::Message(id, _) => id,
        };
        let inbox = self.inboxes.get_mut(&id)?;
        let old = match parsed {
            InboxKey::Counter(_) => inbox.counter.take(),
            InboxKey::Message(_, seq) => inbox.delete(seq),
        };
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
        if let Some((bucket, inbox)) = keys::parse_expiry(key) {
            return self.expiry.get(&bucket)?.get(&inbox);
        }
        match InboxKey::parse(key) {
            None => self.other.get(key),
            Some(InboxKey::Counter(id)) => self.inboxes.get(&id)?.counter.as_ref(),
            Some(InboxKey::Message(id, seq)) => self.inboxes.get(&id)?.get(seq),
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
        // In two parts, below the message tag (other keys, counters and expiry entries) and
        // from it on (other keys and messages), so that a visit of the first part never looks
        // for messages: on a shard whose inboxes are mostly caught up that search would pass
        // every inbox with a counter and no message, and a checkpoint visits in chunks.
        const MESSAGES: &[u8] = &[keys::TAG_MESSAGE];
        let first = |a: &(MapKey, &Bytes), b: &(MapKey, &Bytes)| a.0.bytes() < b.0.bytes();
        let below_messages = match end {
            Bound::Included(key) | Bound::Excluded(key) if key < MESSAGES => end,
            _ => Bound::Excluded(MESSAGES),
        };
        if is_below_bound(begin, MESSAGES) {
            let counters = self
                .inboxes_between(keys::TAG_COUNTER, begin, below_messages)
                .filter_map(|(id, inbox)| {
                    let value = inbox.counter.as_ref()?;
                    Some((MapKey::from_bytes(&keys::counter(id)), value))
                })
                .filter(|(key, _)| is_above(key.bytes(), begin) && is_below(key.bytes(), end));
            let expiry = self
                .expiry_between(begin, below_messages)
                .filter(|(key, _)| is_above(key.bytes(), begin) && is_below(key.bytes(), end));
            let below = merge(self.other.range(begin, below_messages), counters, &first);
            if !merge(below, expiry, &first).all(|(key, value)| visit(key.bytes(), value)) {
                return false;
            }
        }
        let from_messages = match begin {
            Bound::Included(key) | Bound::Excluded(key) if key >= MESSAGES => begin,
            _ => Bound::Included(MESSAGES),
        };
        let reaches_messages = match end {
            Bound::Unbounded => true,
            Bound::Included(key) => key >= MESSAGES,
            Bound::Excluded(key) => key > MESSAGES,
        };
        if !reaches_messages {
            return true;
        }
        let messages = self
            .inboxes_between(keys::TAG_MESSAGE, from_messages, end)
            .flat_map(move |(id, inbox)| {
                // Only the first inbox can hold messages below `begin`: a binary search
                // skips them.
                let skipped = match inbox.messages.front() {
                    Some((seq, _)) if !is_above(&keys::message(id, *seq), from_messages) => {
                        inbox.messages.partition_point(|(seq, _)| {
                            !is_above(&keys::message(id, *seq), from_messages)
                        })
                    }
                    _ => 0,
                };
                inbox
                    .messages
                    .range(skipped..)
                    .filter_map(move |(seq, value)| {
                        Some((
                            MapKey::from_bytes(&keys::message(id, *seq)),
                            value.as_ref()?,
                        ))
                    })
            })
            .take_while(move |(key, _)| is_below(key.bytes(), end));
        merge(self.other.range(from_messages, end), messages, first)
            .all(|(key, value)| visit(key.bytes(), value))
    }

    /// The expiry entries whose keys can lie between `begin` and `end`, in key order: a few
    /// more at the ends, never fewer.
    fn expiry_between<'a>(
        &'a self,
        begin: Bound<&'a [u8]>,
        end: Bound<&'a [u8]>,
    ) -> impl Iterator<Item = (MapKey<'a>, &'a Bytes)> + 'a {
        numbers_between(&[keys::TAG_EXPIRY], begin, end)
            .into_iter()
            .flat_map(|buckets| self.expiry.range(buckets))
            .flat_map(move |(&bucket, entries)| {
                let start = keys::expiry_bucket_start(bucket);
                numbers_between(&start, begin, end)
                    .into_iter()
                    .flat_map(|inboxes| entries.range(inboxes))
                    .map(move |(&inbox, value)| {
                        (MapKey::from_bytes(&keys::expiry(bucket, inbox)), value)
                    })
            })
    }

    /// The inboxes whose keys of `tag` (`tag` and the inbox's id, then anything) can lie
    /// between `begin` and `end`, in order: a few more at the ends, never fewer.
    fn inboxes_between<'a>(
        &'a self,
        tag: u8,
        begin: Bound<&[u8]>,
        end: Bound<&[u8]>,
    ) -> impl Iterator<Item = (u64, &'a Inbox)> + 'a {
        numbers_between(&[tag], begin, end)
            .into_iter()
            .flat_map(|ids| self.ordered.range(ids))
            .map(|id| {
                #[cfg(test)]
                self.inboxes_looked_at
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                (*id, &self.inboxes[id])
            })
    }
}

/// The numbers `n` such that keys `prefix, n, ...` (`n` as 8 big-endian bytes, then
/// anything) can lie between `begin` and `end`: a few more at the ends, never fewer. `None`
/// when no such key can.
fn numbers_between(
    prefix: &[u8],
    begin: Bound<&[u8]>,
    end: Bound<&[u8]>,
) -> Option<RangeInclusive<u64>> {
    // A key `prefix, n, ...` at or above a bound `prefix, b...` has `n` at least `b`'s first
    // eight bytes (zero-padded); one below such a bound, at most those. A bound that does not
    // start with `prefix` is below or above every such key.
    let number_in = |key: &[u8]| {
        let mut number = [0u8; 8];
        let tail = &key[prefix.len()..];
        number[..tail.len().min(8)].copy_from_slice(&tail[..tail.len().min(8)]);
        u64::from_be_bytes(number)
    };
    let low = match begin {
        Bound::Unbounded => Some(0),
        Bound::Included(key) | Bound::Excluded(key) if key.starts_with(prefix) => {
            Some(number_in(key))
        }
        Bound::Included(key) | Bound::Excluded(key) => (key < prefix).then_some(0),
    };
    let high = match end {
        Bound::Unbounded => Some(u64::MAX),
        Bound::Included(key) | Bound::Excluded(key) if key.starts_with(prefix) => {
            Some(number_in(key))
        }
        Bound::Included(key) | Bound::Excluded(key) => (key > prefix).then_some(u64::MAX),
    };
    match (low, high) {
        (Some(low), Some(high)) if low <= high => Some(low..=high),
        _ => None,
    }
}

/// Whether some key at or above `begin` sorts below `key`.
fn is_below_bound(begin: Bound<&[u8]>, key: &[u8]) -> bool {
    match begin {
        Bound::Unbounded => true,
        Bound::Included(bound) | Bound::Excluded(bound) => bound < key,
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
    use crate::store::key_map::test_bounds::{as_slices as as_ref, is_valid};

    /// A key near the inbox shapes: message, counter and expiry keys of a few inboxes, keys
    /// of those tags one byte short or long, other tags, and short prefixes (as range bounds
    /// are).
    fn some_key(rng: &mut Rng) -> Vec<u8> {
        let inbox = [0u64, 1, 2, 255, 256, u64::MAX - 1, u64::MAX][rng.below(7) as usize];
        // Mostly a few seqs; sometimes one of hundreds, so that queues grow, wrap and get
        // holes deep inside.
        let seq = if rng.below(4) == 0 {
            rng.below(400)
        } else {
            rng.below(6)
        };
        let mut key = match rng.below(10) {
            0..=2 => keys::message(inbox, seq).to_vec(),
            3 | 4 => keys::counter(inbox).to_vec(),
            // Buckets among the ids, inboxes among the seqs and near the highest.
            9 => keys::expiry(inbox, [seq, u64::MAX - seq][rng.below(2) as usize]).to_vec(),
            5 => keys::device(inbox, seq as u32).to_vec(),
            6 => keys::dedupe(inbox, seq, 1, 2).to_vec(),
            // Longer than any packed key, starting like a message or counter key.
            7 => [&keys::message(inbox, seq)[..], &[7u8; 30][..]].concat(),
            _ => vec![[b'c', b'q', b'd', b'e', b'a', b'z'][rng.below(6) as usize]],
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
            for step in 0..6000u64 {
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
                if !is_valid(&begin, &end) {
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
            assert!(map.inboxes.is_empty() && map.ordered.is_empty() && map.expiry.is_empty());
        }
    }

    /// A checkpoint visits everything in chunks, each from just after the last key of the one
    /// before. On a shard whose inboxes hold counters but almost no messages, every chunk
    /// below the message keys once looked through every inbox for a message (quadratic in
    /// the inboxes): the inboxes looked at stay a small multiple of the pairs visited.
    #[test]
    fn chunked_visits_look_at_each_inbox_a_few_times() {
        let mut map = LiveMap::default();
        let inboxes = 5_000u64;
        for inbox in 0..inboxes {
            map.insert(
                Bytes::from(&keys::counter(inbox)[..]),
                Bytes::from(&b"1"[..]),
            );
            map.insert(
                Bytes::from(&keys::emptied(inbox)[..]),
                Bytes::from(&b""[..]),
            );
        }
        map.insert(
            Bytes::from(&keys::message(inboxes - 1, 1)[..]),
            Bytes::from(&b"m"[..]),
        );
        let mut after: Option<Vec<u8>> = None;
        let mut visited = 0usize;
        loop {
            let lower = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
            let mut chunk = Vec::new();
            map.visit_range(lower, Bound::Unbounded, &mut |key, _| {
                chunk.push(key.to_vec());
                chunk.len() < 100
            });
            let Some(last) = chunk.last() else { break };
            visited += chunk.len();
            after = Some(last.clone());
        }
        assert_eq!(visited, map.len());
        let looked_at = map
            .inboxes_looked_at
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            looked_at <= 3 * visited,
            "{looked_at} inboxes looked at to visit {visited} pairs"
        );
    }

    /// Messages deleted from the middle of a long queue (expiry of shorter lives) leave holes
    /// that are compacted away: the queue stays within twice its live messages (plus a few),
    /// and every message left is still found.
    #[test]
    fn holes_in_a_long_queue_are_compacted() {
        let mut map = LiveMap::default();
        for seq in 1..=10_000u64 {
            map.insert(
                Bytes::from(&keys::message(7, seq)[..]),
                Bytes::from(&seq.to_le_bytes()[..]),
            );
        }
        for seq in (1..=10_000u64).filter(|seq| seq % 10 != 0) {
            assert!(map.remove(&keys::message(7, seq)).is_some());
            let inbox = &map.inboxes[&7];
            let live = inbox.messages.len() - inbox.holes;
            assert!(inbox.messages.len() <= 2 * live + HOLES_MIN + 1);
        }
        assert_eq!(map.len(), 1_000);
        for seq in 1..=10_000u64 {
            let found = map.get(&keys::message(7, seq)).map(|v| v.to_vec());
            assert_eq!(found, (seq % 10 == 0).then(|| seq.to_le_bytes().to_vec()));
        }
    }
}
