//! Ordered maps of byte-string keys, with keys of up to 39 bytes held as numbers.
//!
//! Every key Courier writes is at most 17 bytes (`keys`: a tag and one or two big-endian
//! numbers) but the dedupe records' (33). Held as a [`WriteKey`] each took 64 bytes (40 of
//! numbers and a `Bytes` header), so a B-tree node's keys spanned 11 cache lines, an insert
//! into a large map missed the cache at nearly every key it compared, and a lookup by a byte
//! slice compared with `memcmp`. Here a key of up to 23 bytes is held as 24 bytes (its bytes,
//! zero padded, then its length, as three big-endian `u64`s, which order as the bytes do), a
//! key of up to 39 bytes as 40, and only longer keys (none of Courier's, but the stores take
//! any) as `WriteKey`s; a range merges the three maps.

use std::collections::BTreeMap;
use std::ops::Bound;

use super::overlay::{Bytes, WriteKey};

/// Bytes of the longest key a [`PackedKey`] holds, plus its length byte.
const PACKED_BYTES_MAX: usize = 40;

/// A key of at most `WORDS * 8 - 1` bytes: its bytes zero-padded to that, then its length,
/// as big-endian words. Keys that agree up to the shorter one's length differ in the padding
/// or the length, and the shorter sorts first, as in byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct PackedKey<const WORDS: usize>([u64; WORDS]);

/// Keys of up to 23 bytes: every key of the log store's map.
pub(crate) type ShortKey = PackedKey<3>;
/// Keys of 24 to 39 bytes: dedupe records' (33).
pub(crate) type MediumKey = PackedKey<5>;

impl<const WORDS: usize> PackedKey<WORDS> {
    pub(crate) const BYTES_MAX: usize = WORDS * 8 - 1;

    /// `None` for a key longer than `BYTES_MAX`.
    pub(crate) fn new(key: &[u8]) -> Option<Self> {
        const { assert!(WORDS * 8 <= PACKED_BYTES_MAX) };
        if key.len() > Self::BYTES_MAX {
            return None;
        }
        let mut padded = [0u8; PACKED_BYTES_MAX];
        padded[..key.len()].copy_from_slice(key);
        padded[Self::BYTES_MAX] = key.len() as u8;
        Some(PackedKey(std::array::from_fn(|word| {
            u64::from_be_bytes(padded[word * 8..word * 8 + 8].try_into().expect("8 bytes"))
        })))
    }

    /// The key's bytes, written into `buffer`.
    pub(crate) fn bytes<'a>(&self, buffer: &'a mut [u8; PACKED_BYTES_MAX]) -> &'a [u8] {
        for (at, word) in self.0.iter().enumerate() {
            buffer[at * 8..at * 8 + 8].copy_from_slice(&word.to_be_bytes());
        }
        let len = usize::from(buffer[Self::BYTES_MAX]);
        &buffer[..len]
    }

    /// The packed keys at or above (`lower`) or below (`!lower`) the byte string `bound`.
    fn bound(bound: Bound<&[u8]>, lower: bool) -> Bound<Self> {
        let key = match bound {
            Bound::Unbounded => return Bound::Unbounded,
            Bound::Included(key) | Bound::Excluded(key) => key,
        };
        if let Some(packed) = Self::new(key) {
            return match bound {
                Bound::Included(_) => Bound::Included(packed),
                _ => Bound::Excluded(packed),
            };
        }
        // A bound longer than any packed key: none equals it, and a packed key sorts after it
        // exactly when it sorts after the bound's first `BYTES_MAX` bytes (equal to those, it
        // is a prefix of the bound, so before it).
        let head = Self::new(&key[..Self::BYTES_MAX]).expect("fits");
        if lower {
            Bound::Excluded(head)
        } else {
            Bound::Included(head)
        }
    }
}

/// Keys and their values, in byte order: the log store's live pairs and dedupe records. Each
/// key is in one of three maps by its length. (A transaction's writes are a `WriteSet`,
/// ordered only when a range asks.)
#[derive(Debug)]
pub(crate) struct KeyMap<V> {
    short: BTreeMap<ShortKey, V>,
    medium: BTreeMap<MediumKey, V>,
    long: BTreeMap<WriteKey, V>,
}

impl<V> Default for KeyMap<V> {
    fn default() -> Self {
        KeyMap {
            short: BTreeMap::new(),
            medium: BTreeMap::new(),
            long: BTreeMap::new(),
        }
    }
}

/// A key a range of a [`KeyMap`] yields: a packed key's bytes rebuilt, or a long key's own.
pub(crate) enum MapKey<'a> {
    Packed {
        padded: [u8; PACKED_BYTES_MAX],
        len: u8,
    },
    Long(&'a Bytes),
}

impl MapKey<'_> {
    fn packed<const WORDS: usize>(key: &PackedKey<WORDS>) -> Self {
        let mut padded = [0u8; PACKED_BYTES_MAX];
        let len = key.bytes(&mut padded).len() as u8;
        MapKey::Packed { padded, len }
    }

    /// A copy of `key`, of at most `PACKED_BYTES_MAX` bytes.
    pub(crate) fn from_bytes(key: &[u8]) -> Self {
        let mut padded = [0u8; PACKED_BYTES_MAX];
        padded[..key.len()].copy_from_slice(key);
        MapKey::Packed {
            padded,
            len: key.len() as u8,
        }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            MapKey::Packed { padded, len } => &padded[..usize::from(*len)],
            MapKey::Long(bytes) => bytes,
        }
    }
}

impl AsRef<[u8]> for MapKey<'_> {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
    }
}

impl<V> KeyMap<V> {
    pub(crate) fn len(&self) -> usize {
        self.short.len() + self.medium.len() + self.long.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sets `key`; returns the value it replaced.
    pub(crate) fn insert(&mut self, key: Bytes, value: V) -> Option<V> {
        if let Some(short) = ShortKey::new(&key) {
            self.short.insert(short, value)
        } else if let Some(medium) = MediumKey::new(&key) {
            self.medium.insert(medium, value)
        } else {
            self.long.insert(WriteKey::new(key), value)
        }
    }

    /// Deletes `key`; returns its value.
    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<V> {
        if let Some(short) = ShortKey::new(key) {
            self.short.remove(&short)
        } else if let Some(medium) = MediumKey::new(key) {
            self.medium.remove(&medium)
        } else {
            self.long.remove(key)
        }
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<&V> {
        if let Some(short) = ShortKey::new(key) {
            self.short.get(&short)
        } else if let Some(medium) = MediumKey::new(key) {
            self.medium.get(&medium)
        } else {
            self.long.get(key)
        }
    }

    /// The highest key.
    pub(crate) fn last_key(&self) -> Option<Vec<u8>> {
        let mut padded = [0u8; PACKED_BYTES_MAX];
        let short = self
            .short
            .keys()
            .next_back()
            .map(|key| key.bytes(&mut padded).to_vec());
        let medium = self
            .medium
            .keys()
            .next_back()
            .map(|key| key.bytes(&mut padded).to_vec());
        let long = self.long.keys().next_back().map(|key| key.bytes.to_vec());
        short.max(medium).max(long)
    }

    /// The pairs between `begin` and `end`, in key order.
    pub(crate) fn range<'a>(
        &'a self,
        begin: Bound<&[u8]>,
        end: Bound<&[u8]>,
    ) -> impl Iterator<Item = (MapKey<'a>, &'a V)> + 'a {
        let short = self
            .short
            .range((ShortKey::bound(begin, true), ShortKey::bound(end, false)))
            .map(|(key, value)| (MapKey::packed(key), value));
        let medium = self
            .medium
            .range((MediumKey::bound(begin, true), MediumKey::bound(end, false)))
            .map(|(key, value)| (MapKey::packed(key), value));
        let long = self
            .long
            .range::<[u8], _>((begin, end))
            .map(|(key, value)| (MapKey::Long(&key.bytes), value));
        let first = |a: &(MapKey, &V), b: &(MapKey, &V)| a.0.bytes() < b.0.bytes();
        merge(merge(short, medium, first), long, first)
    }
}

/// Two ordered sequences with no key in both, as one (`first`: whether `a` comes before `b`).
pub(crate) fn merge<T>(
    a: impl Iterator<Item = T>,
    b: impl Iterator<Item = T>,
    first: impl Fn(&T, &T) -> bool,
) -> impl Iterator<Item = T> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (None, None) => None,
        (Some(_), None) => a.next(),
        (None, Some(_)) => b.next(),
        (Some(next_a), Some(next_b)) => {
            if first(next_a, next_b) {
                a.next()
            } else {
                b.next()
            }
        }
    })
}

/// Range bounds over byte strings for the ordered-map model tests of the embedded stores' maps.
#[cfg(test)]
pub(crate) mod test_bounds {
    use std::ops::Bound;

    pub(crate) fn as_slices(bound: &Bound<Vec<u8>>) -> Bound<&[u8]> {
        bound.as_ref().map(Vec::as_slice)
    }

    /// Whether `BTreeMap::range` takes `(begin, end)`: not past each other, and not one key
    /// excluded at both ends.
    pub(crate) fn is_valid(begin: &Bound<Vec<u8>>, end: &Bound<Vec<u8>>) -> bool {
        match (begin, end) {
            (Bound::Excluded(a), Bound::Excluded(b)) => a < b,
            (Bound::Included(a) | Bound::Excluded(a), Bound::Included(b) | Bound::Excluded(b)) => {
                a <= b
            }
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_bounds::{as_slices as as_ref, is_valid};
    use super::*;
    use crate::rng::Rng;

    /// Packed keys order as their bytes do, and give their bytes back, at every length
    /// around the padding and the length byte (zeros and 0xff at the end of a key).
    #[test]
    fn packed_keys_order_as_their_bytes() {
        let mut rng = Rng::new(7);
        let mut keys: Vec<Vec<u8>> = vec![vec![], vec![0], vec![0, 0], vec![0xff], vec![1]];
        for _ in 0..2000 {
            let len = (rng.next_u64() % 40) as usize;
            let pick = [0u8, 1, 0x7f, 0xff];
            keys.push(
                (0..len)
                    .map(|_| pick[(rng.next_u64() % 4) as usize])
                    .collect(),
            );
        }
        for a in &keys {
            let medium_a = MediumKey::new(a).unwrap();
            let mut buffer = [0u8; PACKED_BYTES_MAX];
            assert_eq!(medium_a.bytes(&mut buffer), &a[..]);
            let short_a = ShortKey::new(a);
            if let Some(short_a) = short_a {
                assert_eq!(short_a.bytes(&mut buffer), &a[..]);
            }
            for b in keys.iter().take(200) {
                let medium_b = MediumKey::new(b).unwrap();
                assert_eq!(medium_a.cmp(&medium_b), a.cmp(b), "{a:?} vs {b:?}");
                if let (Some(short_a), Some(short_b)) = (short_a, ShortKey::new(b)) {
                    assert_eq!(short_a.cmp(&short_b), a.cmp(b), "{a:?} vs {b:?}");
                }
            }
        }
        assert_eq!(ShortKey::new(&[0; 23]).map(|_| ()), Some(()));
        assert!(ShortKey::new(&[0; 24]).is_none());
        assert!(MediumKey::new(&[0; 40]).is_none());
    }

    /// The map agrees with a plain ordered map of byte strings: sets, deletes, lookups and
    /// range visits with every kind of bound, over keys of all three maps (around 23 and 39 bytes,
    /// sharing prefixes with the short ones).
    #[test]
    fn the_map_agrees_with_an_ordered_map_of_bytes() {
        let mut rng = Rng::new(11);
        let mut map = KeyMap::default();
        let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        // A few long base keys cut to lengths around the packed sizes, so that keys and
        // bounds longer than a map's keys often share their first 23 or 39 bytes with keys
        // held in it (where a bound's conversion decides).
        let bases: Vec<Vec<u8>> = (0..3)
            .map(|_| (0..45).map(|_| (rng.next_u64() % 3) as u8).collect())
            .collect();
        let key = |rng: &mut Rng| -> Vec<u8> {
            let lengths = [0usize, 1, 9, 17, 22, 23, 24, 25, 33, 38, 39, 40, 41, 45];
            let len = lengths[(rng.next_u64() % lengths.len() as u64) as usize];
            if rng.next_u64() % 2 == 0 {
                bases[(rng.next_u64() % 3) as usize][..len].to_vec()
            } else {
                (0..len).map(|_| (rng.next_u64() % 3) as u8).collect()
            }
        };
        for step in 0..20_000u64 {
            let k = key(&mut rng);
            match rng.next_u64() % 4 {
                0 | 1 => {
                    let value = step.to_le_bytes().to_vec();
                    let old = map.insert(Bytes::from(&k[..]), Bytes::from(&value[..]));
                    assert_eq!(old.as_deref(), model.insert(k, value).as_deref());
                }
                2 => assert_eq!(map.remove(&k).as_deref(), model.remove(&k).as_deref()),
                _ => assert_eq!(map.get(&k).map(|v| &v[..]), model.get(&k).map(|v| &v[..])),
            }
            assert_eq!(map.len(), model.len());
            assert_eq!(map.last_key(), model.keys().next_back().cloned());
            if step % 50 == 0 {
                let (a, b) = (key(&mut rng), key(&mut rng));
                let bound = |key: &Vec<u8>, kind: u64| match kind {
                    0 => Bound::Unbounded,
                    1 => Bound::Included(key.clone()),
                    _ => Bound::Excluded(key.clone()),
                };
                let (begin, end) = (bound(&a, rng.next_u64() % 3), bound(&b, rng.next_u64() % 3));
                if !is_valid(&begin, &end) {
                    continue;
                }
                let limit = (rng.next_u64() % 40) as usize + 1;
                let seen: Vec<(Vec<u8>, Vec<u8>)> = map
                    .range(as_ref(&begin), as_ref(&end))
                    .take(limit)
                    .map(|(k, v)| (k.bytes().to_vec(), v.to_vec()))
                    .collect();
                let expected: Vec<(Vec<u8>, Vec<u8>)> = model
                    .range::<[u8], _>((as_ref(&begin), as_ref(&end)))
                    .take(limit)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                assert_eq!(seen, expected, "{begin:?}..{end:?}");
            }
        }
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = map
            .range(Bound::Unbounded, Bound::Unbounded)
            .map(|(k, v)| (k.bytes().to_vec(), v.to_vec()))
            .collect();
        assert_eq!(pairs, model.into_iter().collect::<Vec<_>>());
    }
}
