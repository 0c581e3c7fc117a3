//! A transaction for embedded engines: a write overlay over a locked engine.
//!
//! The embedded backends serialise transactions with a lock held from `begin` to `commit`, so
//! every transaction sees the latest committed state and no conflict can arise. The overlay
//! records the final state of every key this transaction touched plus the ranges it cleared;
//! `commit` turns that into one atomic engine write.

use std::ops::Bound;

use super::write_set::WriteSet;
use super::{AtomicOp, BoundedClear, CommitVersion, KeyValue, StoreError, apply_atomic};

/// Bytes a transaction writes: fjall's own type, so a commit hands the engine what the
/// transaction built without copying it again. Keys and values up to 20 bytes (message,
/// counter and device keys) are stored inline, without an allocation.
pub(crate) type Bytes = fjall::Slice;

/// The committed state a transaction reads and writes. Implementations hold the store's lock.
pub(crate) trait Engine {
    fn read(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Calls `visit` for each pair with `begin <= key < end` in order until it returns false.
    fn scan(
        &self,
        begin: &[u8],
        end: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError>;

    /// Writes all `changes` (`None` deletes) atomically and durably.
    fn apply(&mut self, changes: Vec<(Bytes, Option<Bytes>)>) -> Result<CommitVersion, StoreError>;

    /// See [`Transaction::prefetch`](super::Transaction::prefetch).
    fn prefetch(&self, _key: &[u8]) {}
}

/// A key longer than a [`super::key_map::MediumKey`] in a [`super::key_map::KeyMap`] (none of
/// Courier's), and a replayed change's key in the log store's recovery, with its first
/// `KEY_WORDS_BYTES` bytes as big-endian numbers (zero past a short key's end), which order
/// as the bytes do wherever they differ. An insert into the map then compares numbers where it
/// compared two `Bytes` (a `memcmp` call, and a pointer to follow for keys longer than 20
/// bytes). Every key Courier writes fits in the words (dedupe keys, the longest, are 33
/// bytes), so equal words mean equal bytes up to the shorter length, and the length decides;
/// longer keys fall back to the bytes. Lookups borrow it as `[u8]`, in the same order.
#[derive(Debug, Clone)]
pub(crate) struct WriteKey {
    head: u128,
    middle: u128,
    tail: u64,
    pub(crate) bytes: Bytes,
}

/// Bytes of a key held in `WriteKey`'s numbers.
const KEY_WORDS_BYTES: usize = 40;

impl WriteKey {
    pub(crate) fn new(bytes: Bytes) -> WriteKey {
        let mut words = [0u8; KEY_WORDS_BYTES];
        let shared = bytes.len().min(KEY_WORDS_BYTES);
        words[..shared].copy_from_slice(&bytes[..shared]);
        WriteKey {
            head: u128::from_be_bytes(words[..16].try_into().expect("16 bytes")),
            middle: u128::from_be_bytes(words[16..32].try_into().expect("16 bytes")),
            tail: u64::from_be_bytes(words[32..].try_into().expect("8 bytes")),
            bytes,
        }
    }
}

impl PartialEq for WriteKey {
    fn eq(&self, other: &WriteKey) -> bool {
        self.head == other.head
            && self.middle == other.middle
            && self.tail == other.tail
            && self.bytes == other.bytes
    }
}

impl Eq for WriteKey {}

impl Ord for WriteKey {
    fn cmp(&self, other: &WriteKey) -> std::cmp::Ordering {
        self.head
            .cmp(&other.head)
            .then_with(|| self.middle.cmp(&other.middle))
            .then_with(|| self.tail.cmp(&other.tail))
            .then_with(|| {
                if self.bytes.len().max(other.bytes.len()) <= KEY_WORDS_BYTES {
                    // Equal up to the shorter length, zeros after it: the shorter is first.
                    self.bytes.len().cmp(&other.bytes.len())
                } else {
                    self.bytes.as_ref().cmp(other.bytes.as_ref())
                }
            })
    }
}

impl PartialOrd for WriteKey {
    fn partial_cmp(&self, other: &WriteKey) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::borrow::Borrow<[u8]> for WriteKey {
    fn borrow(&self) -> &[u8] {
        &self.bytes
    }
}

/// A range a transaction cleared.
#[derive(Debug)]
struct ClearedRange {
    begin: Vec<u8>,
    end: Vec<u8>,
    /// Every key the range can hold, when the caller listed them
    /// (`Transaction::clear_range_with_keys`): the commit deletes these instead of scanning
    /// the range for what it holds.
    keys: Option<Vec<Bytes>>,
}

impl ClearedRange {
    fn contains(&self, key: &[u8]) -> bool {
        self.begin.as_slice() <= key && key < self.end.as_slice()
    }
}

/// A transaction's writes on top of an engine.
#[derive(Debug)]
pub(crate) struct Overlay<E> {
    engine: E,
    /// Final state of each written key: `Some` set, `None` cleared.
    writes: WriteSet,
    /// Ranges cleared, except for keys written again afterwards (those are in `writes`).
    cleared: Vec<ClearedRange>,
    /// A read error inside an atomic mutation, reported by `commit`: mutations return
    /// nothing, as in FoundationDB, where they are blind writes.
    deferred_error: Option<StoreError>,
}

impl<E: Engine> Overlay<E> {
    pub(crate) fn new(engine: E) -> Overlay<E> {
        Overlay {
            engine,
            writes: WriteSet::new(),
            cleared: Vec::new(),
            deferred_error: None,
        }
    }

    fn in_cleared_range(&self, key: &[u8]) -> bool {
        self.cleared.iter().any(|range| range.contains(key))
    }

    pub(crate) fn prefetch(&self, key: &[u8]) {
        self.engine.prefetch(key);
    }

    pub(crate) fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(state) = self.writes.get(key) {
            return Ok(state.map(|value| value.to_vec()));
        }
        if self.in_cleared_range(key) {
            return Ok(None);
        }
        self.engine.read(key)
    }

    pub(crate) fn get_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let mut out = Vec::new();
        self.scan_range(begin, end, limit, &mut |key, value| {
            out.push((key.to_vec(), value.to_vec()));
            true
        })?;
        Ok(out)
    }

    /// Calls `visit` with up to `limit` pairs of `begin..end` in key order, seeing this
    /// transaction's writes, until it returns false. The engine's bytes are lent, not copied.
    pub(crate) fn scan_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        if begin >= end || limit == 0 {
            return Ok(());
        }
        let mut own = self
            .writes
            .range(Bound::Included(begin), Bound::Excluded(end))
            .peekable();
        let cleared = &self.cleared;
        let in_cleared = |key: &[u8]| cleared.iter().any(|range| range.contains(key));
        let mut emitted = 0usize;
        // Whether to go on after one more pair.
        let mut emit = |key: &[u8], value: &[u8]| {
            emitted += 1;
            visit(key, value) && emitted < limit
        };
        let mut going = true;
        self.engine.scan(begin, end, &mut |key, value| {
            // Emit own writes that sort before this engine key.
            while let Some((own_key, own_value)) = own.next_if(|(k, _)| &k[..] < key) {
                if let Some(v) = own_value
                    && !emit(own_key, v)
                {
                    going = false;
                    return false;
                }
            }
            let more = match own.next_if(|(k, _)| &k[..] == key) {
                Some((_, Some(v))) => emit(key, v),
                Some((_, None)) => true,
                None if in_cleared(key) => true,
                None => emit(key, value),
            };
            going = more;
            more
        })?;
        if going {
            for (own_key, own_value) in own {
                if let Some(v) = own_value
                    && !emit(own_key, v)
                {
                    break;
                }
            }
        }
        Ok(())
    }

    pub(crate) fn set(&mut self, key: &[u8], value: &[u8]) {
        self.writes
            .insert(Bytes::from(key), Some(Bytes::from(value)));
    }

    pub(crate) fn set_concat(&mut self, key: &[u8], head: &[u8], tail: &[u8]) {
        let value = Bytes::from(byteview::ByteView::fused(head, tail));
        self.writes.insert(Bytes::from(key), Some(value));
    }

    pub(crate) fn clear(&mut self, key: &[u8]) {
        self.writes.insert(Bytes::from(key), None);
    }

    pub(crate) fn clear_range(&mut self, begin: &[u8], end: &[u8]) {
        self.clear_range_listed(begin, end, None);
    }

    /// `clear_range` where `keys` are every key the range can hold: the commit deletes them
    /// without scanning the range. Keys outside the range are ignored.
    pub(crate) fn clear_range_with_keys<K: AsRef<[u8]>>(
        &mut self,
        begin: &[u8],
        end: &[u8],
        keys: impl IntoIterator<Item = K>,
    ) {
        let keys = keys
            .into_iter()
            .filter(|key| begin <= key.as_ref() && key.as_ref() < end)
            .map(|key| Bytes::from(key.as_ref()))
            .collect();
        self.clear_range_listed(begin, end, Some(keys));
    }

    /// `clear_range` of at most the first `keys_max` keys the range holds (as this
    /// transaction sees it): the commit deletes what was read, without a scan of its own.
    pub(crate) fn clear_range_bounded(
        &mut self,
        begin: &[u8],
        end: &[u8],
        keys_max: usize,
    ) -> Result<BoundedClear, StoreError> {
        if begin >= end {
            return Ok(BoundedClear {
                keys_read: 0,
                finished: true,
                resume_at: None,
            });
        }
        // At least one key, so that a caller repeating the clear always gets to the end.
        let keys_max = keys_max.max(1);
        // One key past the bound says whether the range goes on, and where the part to clear
        // ends. Keys only: the values are not needed.
        let mut held: Vec<Bytes> = Vec::new();
        self.scan_range(begin, end, keys_max.saturating_add(1), &mut |key, _| {
            held.push(Bytes::from(key));
            true
        })?;
        let finished = held.len() <= keys_max;
        let keys_read = held.len().min(keys_max);
        let stop = if finished {
            end.to_vec()
        } else {
            held[keys_max].to_vec()
        };
        held.truncate(keys_read);
        self.clear_range_listed(begin, &stop, Some(held));
        Ok(BoundedClear {
            keys_read,
            finished,
            resume_at: (!finished).then_some(stop),
        })
    }

    fn clear_range_listed(&mut self, begin: &[u8], end: &[u8], keys: Option<Vec<Bytes>>) {
        if begin >= end {
            return;
        }
        match &keys {
            // Every key the range can hold is listed (`clear_range_with_keys`' contract; a
            // bounded clear lists what its scan found, this transaction's sets included): no
            // range over the writes (which would put them in order) is needed.
            Some(keys) => {
                for key in keys {
                    self.writes.remove(key);
                }
            }
            None => {
                let inside: Vec<Bytes> = self
                    .writes
                    .range(Bound::Included(begin), Bound::Excluded(end))
                    .map(|(key, _)| key.clone())
                    .collect();
                for key in inside {
                    self.writes.remove(&key);
                }
            }
        }
        self.cleared.push(ClearedRange {
            begin: begin.to_vec(),
            end: end.to_vec(),
            keys,
        });
    }

    pub(crate) fn atomic(&mut self, key: &[u8], op: AtomicOp) {
        match self.get(key) {
            Ok(existing) => {
                let next = apply_atomic(existing.as_deref(), op);
                self.set(key, &next);
            }
            Err(error) => {
                self.deferred_error.get_or_insert(error);
            }
        }
    }

    pub(crate) fn commit(mut self) -> Result<CommitVersion, StoreError> {
        if let Some(error) = self.deferred_error.take() {
            return Err(error);
        }
        let listed: usize = self
            .cleared
            .iter()
            .map(|range| range.keys.as_ref().map_or(0, Vec::len))
            .sum();
        let mut changes: Vec<(Bytes, Option<Bytes>)> =
            Vec::with_capacity(listed + self.writes.len());
        for range in &self.cleared {
            let writes = &self.writes;
            match &range.keys {
                Some(keys) => changes.extend(
                    keys.iter()
                        .filter(|key| !writes.contains_key(key.as_ref()))
                        .map(|key| (key.clone(), None)),
                ),
                None => self.engine.scan(&range.begin, &range.end, &mut |key, _| {
                    if !writes.contains_key(key) {
                        changes.push((Bytes::from(key), None));
                    }
                    true
                })?,
            }
        }
        changes.extend(self.writes.drain_pairs());
        self.engine.apply(changes)
    }
}

/// Implements `Transaction` for a wrapper type whose `overlay` field is an [`Overlay`]: the
/// embedded backends differ only in their engine.
macro_rules! overlay_transaction {
    ($wrapper:ty) => {
        impl $crate::store::Transaction for $wrapper {
            fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, $crate::store::StoreError> {
                self.overlay.get(key)
            }
            fn get_range(
                &mut self,
                begin: &[u8],
                end: &[u8],
                limit: usize,
            ) -> Result<Vec<$crate::store::KeyValue>, $crate::store::StoreError> {
                self.overlay.get_range(begin, end, limit)
            }
            fn scan_range(
                &mut self,
                begin: &[u8],
                end: &[u8],
                limit: usize,
                visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
            ) -> Result<(), $crate::store::StoreError> {
                self.overlay.scan_range(begin, end, limit, visit)
            }
            fn set(&mut self, key: &[u8], value: &[u8]) {
                self.overlay.set(key, value);
            }
            fn prefetch(&self, key: &[u8]) {
                self.overlay.prefetch(key);
            }
            fn set_concat(&mut self, key: &[u8], head: &[u8], tail: &[u8]) {
                self.overlay.set_concat(key, head, tail);
            }
            fn holds_short_values_inline(&self) -> bool {
                true
            }
            fn clear(&mut self, key: &[u8]) {
                self.overlay.clear(key);
            }
            fn clear_range(&mut self, begin: &[u8], end: &[u8]) {
                self.overlay.clear_range(begin, end);
            }
            fn clear_range_with_keys<K: AsRef<[u8]>>(
                &mut self,
                begin: &[u8],
                end: &[u8],
                keys: impl IntoIterator<Item = K>,
            ) {
                self.overlay.clear_range_with_keys(begin, end, keys);
            }
            fn clear_range_bounded(
                &mut self,
                begin: &[u8],
                end: &[u8],
                keys_max: usize,
            ) -> Result<$crate::store::BoundedClear, $crate::store::StoreError> {
                self.overlay.clear_range_bounded(begin, end, keys_max)
            }
            fn atomic_add(&mut self, key: &[u8], delta: u64) {
                self.overlay
                    .atomic(key, $crate::store::AtomicOp::Add(delta));
            }
            fn atomic_max(&mut self, key: &[u8], value: u64) {
                self.overlay
                    .atomic(key, $crate::store::AtomicOp::Max(value));
            }
            fn commit(self) -> Result<$crate::store::CommitVersion, $crate::store::StoreError> {
                self.overlay.commit()
            }
        }
    };
}
pub(crate) use overlay_transaction;

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use byteview::ByteView;

    use super::{Bytes, WriteKey};
    use crate::rng::Rng;

    /// `bytes` as a `ByteView` built one of the ways fjall and lsm-tree build keys, since each
    /// fills the stored prefix its own way: copied, cut out of a longer string at an offset
    /// (heap or inline), joined from two parts, written into a fresh buffer, or read.
    fn built_some_way(bytes: &[u8], rng: &mut Rng) -> ByteView {
        match rng.below(6) {
            0 => ByteView::new(bytes),
            1 => {
                let before = rng.below(30) as usize;
                let mut longer = vec![0xEE; before];
                longer.extend_from_slice(bytes);
                longer.extend(std::iter::repeat_n(0x11, rng.below(30) as usize));
                ByteView::new(&longer).slice(before..before + bytes.len())
            }
            2 => {
                let split = rng.below(bytes.len() as u64 + 1) as usize;
                ByteView::fused(&bytes[..split], &bytes[split..])
            }
            3 => {
                let mut view = ByteView::with_size(bytes.len());
                view.get_mut()
                    .expect("a fresh view is unique")
                    .copy_from_slice(bytes);
                view
            }
            4 => ByteView::from_reader(&mut &bytes[..], bytes.len()).expect("read"),
            _ => ByteView::new(bytes).to_detached(),
        }
    }

    /// The log store's maps key long keys by `WriteKey` (a `Bytes` and its first 40 bytes as
    /// numbers) and look them up with byte slices, and fjall's memtables (and a transaction's
    /// write set) sort by `Bytes`: both
    /// must order exactly as byte slices do, including the patched comparison in
    /// vendor/byteview (short and heap-held strings, long shared prefixes, one string a prefix
    /// of the other, every way a string is built), and agree with equality and hashing.
    #[test]
    fn bytes_order_exactly_like_byte_slices() {
        let mut rng = Rng::new(7);
        let random = |rng: &mut Rng| -> Vec<u8> {
            let len = rng.below(49) as usize;
            // Few distinct bytes, so that strings share long prefixes.
            (0..len).map(|_| rng.below(3) as u8 * 127).collect()
        };
        let hasher = std::hash::RandomState::new();
        for _ in 0..200_000 {
            let left = random(&mut rng);
            let right = if rng.below(4) == 0 {
                let mut copy = left.clone();
                copy.truncate(rng.below(left.len() as u64 + 1) as usize);
                copy
            } else {
                random(&mut rng)
            };
            let (left_view, right_view) = (
                built_some_way(&left, &mut rng),
                built_some_way(&right, &mut rng),
            );
            assert_eq!(&*left_view, &left[..]);
            assert_eq!(
                left_view.cmp(&right_view),
                left.cmp(&right),
                "{left:?} against {right:?}"
            );
            assert_eq!(left_view == right_view, left == right);
            if left == right {
                assert_eq!(hasher.hash_one(&left_view), hasher.hash_one(&right_view));
            }
            let (left_bytes, right_bytes) = (Bytes::from(left_view), Bytes::from(right_view));
            assert_eq!(left_bytes.cmp(&right_bytes), left.cmp(&right));
            // The write map's keys, compared by their first 40 bytes as numbers first.
            let (left_key, right_key) = (WriteKey::new(left_bytes), WriteKey::new(right_bytes));
            assert_eq!(
                left_key.cmp(&right_key),
                left.cmp(&right),
                "write keys {left:?} against {right:?}"
            );
            assert_eq!(left_key == right_key, left == right);
        }
    }
}
