//! The log store's map of live keys, with short keys held as three numbers.
//!
//! Every key the log store keeps in memory but the dedupe records is at most 17 bytes
//! (`keys`: a tag and one or two big-endian numbers). Held as a [`WriteKey`] each took 64
//! bytes (40 of numbers and a `Bytes` header), so a B-tree node's keys spanned 11 cache lines
//! and an insert into a large map missed the cache at nearly every key it compared. A key of
//! up to [`ShortKey::BYTES_MAX`] bytes is held here as 24 bytes instead: its bytes, zero
//! padded, then its length, as three big-endian `u64`s, which order as the bytes do. Longer
//! keys (none of Courier's, but the store takes any) go to a second map of `WriteKey`s, and a
//! range visit merges the two.

use std::collections::BTreeMap;
use std::ops::Bound;

use super::overlay::{Bytes, WriteKey};

/// A key of at most `BYTES_MAX` bytes: its bytes zero-padded to 23, then its length, as three
/// big-endian words. Keys that agree up to the shorter one's length differ in the padding or
/// the length, and the shorter sorts first, as in byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ShortKey([u64; 3]);

impl ShortKey {
    pub(crate) const BYTES_MAX: usize = 23;

    /// `None` for a key longer than `BYTES_MAX`.
    pub(crate) fn new(key: &[u8]) -> Option<ShortKey> {
        if key.len() > Self::BYTES_MAX {
            return None;
        }
        let mut padded = [0u8; 24];
        padded[..key.len()].copy_from_slice(key);
        padded[23] = key.len() as u8;
        Some(Self::from_padded(&padded))
    }

    fn from_padded(padded: &[u8; 24]) -> ShortKey {
        let word = |at: usize| u64::from_be_bytes(padded[at..at + 8].try_into().expect("8 bytes"));
        ShortKey([word(0), word(8), word(16)])
    }

    /// The key's bytes, written into `buffer`.
    pub(crate) fn bytes<'a>(&self, buffer: &'a mut [u8; 24]) -> &'a [u8] {
        for (at, word) in self.0.iter().enumerate() {
            buffer[at * 8..at * 8 + 8].copy_from_slice(&word.to_be_bytes());
        }
        let len = usize::from(buffer[23]);
        &buffer[..len]
    }

    /// The short keys at or above (`lower`) or below (`!lower`) the byte string `bound`.
    fn bound(bound: Bound<&[u8]>, lower: bool) -> Bound<ShortKey> {
        let key = match bound {
            Bound::Unbounded => return Bound::Unbounded,
            Bound::Included(key) | Bound::Excluded(key) => key,
        };
        if let Some(short) = ShortKey::new(key) {
            return match bound {
                Bound::Included(_) => Bound::Included(short),
                _ => Bound::Excluded(short),
            };
        }
        // A bound longer than any short key: no short key equals it, and a short key sorts
        // after it exactly when it sorts after the bound's first 23 bytes (equal to those, it
        // is a prefix of the bound, so before it).
        let head = ShortKey::new(&key[..Self::BYTES_MAX]).expect("23 bytes");
        if lower {
            Bound::Excluded(head)
        } else {
            Bound::Included(head)
        }
    }
}

/// Live keys and their values, in byte order.
#[derive(Debug, Default)]
pub(crate) struct KeyMap {
    short: BTreeMap<ShortKey, Bytes>,
    long: BTreeMap<WriteKey, Bytes>,
}

impl KeyMap {
    pub(crate) fn len(&self) -> usize {
        self.short.len() + self.long.len()
    }

    /// Sets `key`; returns the value it replaced.
    pub(crate) fn insert(&mut self, key: Bytes, value: Bytes) -> Option<Bytes> {
        match ShortKey::new(&key) {
            Some(short) => self.short.insert(short, value),
            None => self.long.insert(WriteKey::new(key), value),
        }
    }

    /// Deletes `key`; returns its value.
    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<Bytes> {
        match ShortKey::new(key) {
            Some(short) => self.short.remove(&short),
            None => self.long.remove(key),
        }
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<&Bytes> {
        match ShortKey::new(key) {
            Some(short) => self.short.get(&short),
            None => self.long.get(key),
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
        let mut short = self
            .short
            .range((ShortKey::bound(begin, true), ShortKey::bound(end, false)))
            .peekable();
        let mut long = self.long.range::<[u8], _>((begin, end)).peekable();
        let mut buffer = [0u8; 24];
        loop {
            // The next of the two maps; a key is in one of them only.
            let short_first = match (short.peek(), long.peek()) {
                (None, None) => return true,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((short_key, _)), Some((long_key, _))) => {
                    short_key.bytes(&mut buffer) < &long_key.bytes[..]
                }
            };
            let going = if short_first {
                let (key, value) = short.next().expect("peeked");
                visit(key.bytes(&mut buffer), value)
            } else {
                let (key, value) = long.next().expect("peeked");
                visit(&key.bytes, value)
            };
            if !going {
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn as_ref(bound: &Bound<Vec<u8>>) -> Bound<&[u8]> {
        match bound {
            Bound::Unbounded => Bound::Unbounded,
            Bound::Included(key) => Bound::Included(&key[..]),
            Bound::Excluded(key) => Bound::Excluded(&key[..]),
        }
    }

    /// Short keys order as their bytes do, and give their bytes back, at every length
    /// around the padding and the length byte (zeros and 0xff at the end of a key).
    #[test]
    fn short_keys_order_as_their_bytes() {
        let mut rng = Rng::new(7);
        let mut keys: Vec<Vec<u8>> = vec![vec![], vec![0], vec![0, 0], vec![0xff], vec![1]];
        for _ in 0..2000 {
            let len = (rng.next_u64() % 24) as usize;
            let pick = [0u8, 1, 0x7f, 0xff];
            keys.push(
                (0..len)
                    .map(|_| pick[(rng.next_u64() % 4) as usize])
                    .collect(),
            );
        }
        for a in &keys {
            let short_a = ShortKey::new(a).unwrap();
            let mut buffer = [0u8; 24];
            assert_eq!(short_a.bytes(&mut buffer), &a[..]);
            for b in keys.iter().take(200) {
                let short_b = ShortKey::new(b).unwrap();
                assert_eq!(short_a.cmp(&short_b), a.cmp(b), "{a:?} vs {b:?}");
            }
        }
        assert!(ShortKey::new(&[0; 24]).is_none());
    }

    /// The map agrees with a plain ordered map of byte strings: sets, deletes, lookups and
    /// range visits with every kind of bound, over keys short and long (longer than 23 bytes,
    /// sharing prefixes with the short ones).
    #[test]
    fn the_map_agrees_with_an_ordered_map_of_bytes() {
        let mut rng = Rng::new(11);
        let mut map = KeyMap::default();
        let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let key = |rng: &mut Rng| -> Vec<u8> {
            let len = [0usize, 1, 9, 17, 22, 23, 24, 25, 33][(rng.next_u64() % 9) as usize];
            (0..len).map(|_| (rng.next_u64() % 3) as u8).collect()
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
            if step % 50 == 0 {
                let (a, b) = (key(&mut rng), key(&mut rng));
                let bound = |key: &Vec<u8>, kind: u64| match kind {
                    0 => Bound::Unbounded,
                    1 => Bound::Included(key.clone()),
                    _ => Bound::Excluded(key.clone()),
                };
                let (begin, end) = (bound(&a, rng.next_u64() % 3), bound(&b, rng.next_u64() % 3));
                let valid = match (&begin, &end) {
                    (
                        Bound::Included(a) | Bound::Excluded(a),
                        Bound::Included(b) | Bound::Excluded(b),
                    ) => {
                        a < b
                            || (a == b
                                && matches!(
                                    (&begin, &end),
                                    (Bound::Included(_), Bound::Included(_))
                                ))
                    }
                    _ => true,
                };
                if !valid {
                    continue;
                }
                let limit = (rng.next_u64() % 40) as usize + 1;
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
                assert_eq!(seen, expected, "{begin:?}..{end:?}");
            }
        }
    }
}
