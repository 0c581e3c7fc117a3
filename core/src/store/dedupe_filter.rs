//! Knowing, without a read, that a dedupe record does not exist.
//!
//! Every send looks up its dedupe record in two buckets (`crate::commit`), and nearly every
//! lookup misses: in fjall a miss still searches the memtable's skiplist and probes a Bloom
//! filter per table: ~15% of a commit's instructions, mostly cache misses (decision 0018).
//!
//! An embedded store sees every write to itself, so it can answer most of those misses from
//! memory: a [`DedupeFilter`] holds a Bloom filter per dedupe bucket of every record written
//! since the store was opened, plus, when they are few, the records of the highest bucket
//! at open and the one before it ([`DedupeFilter::warmed`]). A bucket above the ones it knows whole
//! can only hold records written since, so for it "not in the filter" means "not in the
//! store". Older buckets, a bucket whose filter was dropped to stay within its memory budget,
//! and a filter's false positives (half the budget per bucket: at 16 MiB under 0.1% up to
//! ~3.3 million sends a bucket, 1% at ~6 million, ~40% at ~20 million, where it is freed)
//! fall back to the real read. Deletes are not tracked: a deleted key left in the filter only
//! costs a read. Only the current and the previous bucket are kept: lookups go nowhere else.
//!
//! The filter never says a key exists, so the worst it can do is cost a read: the store's
//! answers are the same with or without it.

use std::collections::BTreeMap;

use crate::keys;

/// A filter block: one cache line, which holds every probe of a key.
const BLOCK_BITS: u64 = 512;
const BLOCK_WORDS: usize = (BLOCK_BITS / 64) as usize;
/// Probes per key: at 10 bits per key about 1% false positives, at 20 under 0.1%.
const PROBES: u64 = 6;
/// A bucket's first filter takes this share of the bucket's memory, and holds its first keys
/// at 20 bits each: small enough to stay in a core's cache through a light day or a short
/// run, tight enough to add under 0.1% of false positives once the rest is in use.
const FIRST_FILTER_SHARE: usize = 8;
const FIRST_FILTER_BITS_PER_KEY: usize = 20;
/// A bucket's second filter answers until it holds this few bits per key (about 40% false
/// positives): past that it saves too few reads for its memory, and both are freed.
const BITS_PER_KEY_MIN: usize = 3;
/// The least budget that turns the filter on (each bucket's filter is half of it).
const BYTES_MIN: usize = 64 * 1024;

type Block = [u64; BLOCK_WORDS];
const BLOCK_BYTES: usize = std::mem::size_of::<Block>();

/// Which dedupe records a store may hold, from the writes it saw since it was opened.
#[derive(Debug)]
pub(crate) struct DedupeFilter {
    /// Buckets at or below this may hold records the filter never saw (written before the
    /// store was opened, or in a bucket whose filters were dropped): always read.
    floor: Option<u64>,
    buckets: BTreeMap<u64, BucketFilter>,
    /// Bytes the answering buckets hold, each its whole share from its first write (its
    /// first filter is an eighth of it until full); at most `bytes_max`.
    bytes: usize,
    bytes_max: usize,
}

/// The filters of one bucket, which together take at most its share of the budget (half:
/// lookups go to two buckets). Two sizes rather than filters added as a bucket grows: a Bloom
/// filter cannot be resized without its keys, and each filter added cost a cache miss per
/// lookup and its own ~1% of false positives (doubling slices until the twenty-seventh
/// session: up to seven, decision 0030).
#[derive(Debug)]
enum BucketFilter {
    /// Holds every record written to the bucket since it was made: the first keys in
    /// `first`, the rest in `rest`, made when `first` is full.
    Answering { first: Bloom, rest: Option<Bloom> },
    /// The bucket outgrew its filters, or found no room for them: every read goes to the store.
    Saturated,
}

#[derive(Debug)]
struct Bloom {
    blocks: Vec<Block>,
    keys: usize,
    keys_max: usize,
}

impl DedupeFilter {
    /// A filter for a store whose highest dedupe key at open is `highest_key` (none: the
    /// store held no dedupe record). A `bytes_max` below 64 KiB disables it.
    pub(crate) fn new(highest_key: Option<&[u8]>, bytes_max: usize) -> DedupeFilter {
        DedupeFilter {
            floor: highest_key.map(|key| keys::parse_dedupe_bucket(key).unwrap_or(u64::MAX)),
            buckets: BTreeMap::new(),
            bytes: 0,
            bytes_max,
        }
    }

    /// A filter that knows every record of bucket `first_bucket` and later: `records` are all
    /// the store held in them at open. Older buckets are read.
    pub(crate) fn warmed<'a>(
        first_bucket: u64,
        records: impl IntoIterator<Item = &'a [u8]>,
        bytes_max: usize,
    ) -> DedupeFilter {
        let mut filter = DedupeFilter {
            floor: first_bucket.checked_sub(1),
            ..DedupeFilter::new(None, bytes_max)
        };
        for key in records {
            filter.note_written(key);
        }
        filter
    }

    /// The filter of a store just opened (every embedded engine): warmed with every record of
    /// the highest bucket and the one before it when they are at most `warm_keys_max`, else
    /// knowing only buckets above the highest. `highest` reads the store's highest dedupe key;
    /// `keys_from(start, n)` reads up to `n` dedupe keys from `start` on, in order.
    pub(crate) fn opened<K: AsRef<[u8]>, E>(
        bytes_max: usize,
        warm_keys_max: usize,
        highest: impl FnOnce() -> Result<Option<K>, E>,
        keys_from: impl FnOnce(&[u8], usize) -> Result<Vec<K>, E>,
    ) -> Result<DedupeFilter, E> {
        if !DedupeFilter::is_budget_enough(bytes_max) {
            return Ok(DedupeFilter::new(None, bytes_max));
        }
        let Some(highest) = highest()? else {
            return Ok(DedupeFilter::new(None, bytes_max));
        };
        let highest = highest.as_ref();
        let Some(bucket) = keys::parse_dedupe_bucket(highest) else {
            return Ok(DedupeFilter::new(Some(highest), bytes_max));
        };
        let first_bucket = bucket.saturating_sub(1);
        let recent = keys_from(
            &keys::dedupe_bucket_start(first_bucket),
            warm_keys_max.saturating_add(1),
        )?;
        if recent.len() > warm_keys_max {
            return Ok(DedupeFilter::new(Some(highest), bytes_max));
        }
        Ok(DedupeFilter::warmed(
            first_bucket,
            recent.iter().map(AsRef::as_ref),
            bytes_max,
        ))
    }

    /// Whether a filter with `bytes_max` answers anything.
    pub(crate) fn is_budget_enough(bytes_max: usize) -> bool {
        bytes_max >= BYTES_MIN
    }

    fn enabled(&self) -> bool {
        Self::is_budget_enough(self.bytes_max)
    }

    /// The bucket of `key` when the filter speaks for it: the filter is on, `key` is a dedupe
    /// key, and its bucket is above the floor (below it, every lookup reads).
    fn bucket_known(&self, key: &[u8]) -> Option<u64> {
        if !self.enabled() {
            return None;
        }
        let bucket = keys::parse_dedupe_bucket(key)?;
        if self.floor.is_some_and(|floor| bucket <= floor) {
            return None;
        }
        Some(bucket)
    }

    /// Each bucket's share: half the budget, since lookups go to two buckets.
    fn bucket_bytes(&self) -> usize {
        self.bytes_max / 2 / BLOCK_BYTES * BLOCK_BYTES
    }

    /// Whether `key` is certainly not in the store. False means "read it": the key is no
    /// dedupe key, may predate the filter, or may be in the store.
    pub(crate) fn is_absent(&self, key: &[u8]) -> bool {
        let Some(bucket) = self.bucket_known(key) else {
            return false;
        };
        match self.buckets.get(&bucket) {
            // Nothing was written to this bucket since open, nor before (it is above the floor).
            None => true,
            Some(BucketFilter::Answering { first, rest }) => {
                let hash = hash(key);
                !first.may_contain(hash)
                    && !rest.as_ref().is_some_and(|rest| rest.may_contain(hash))
            }
            Some(BucketFilter::Saturated) => false,
        }
    }

    /// Starts loading the blocks that `is_absent` or `note_written` of `key` will touch. A
    /// filter past the core's cache misses once per probe, and a batch of sends probes it in
    /// a row: loaded together, the misses overlap (the writer's CPU: decision 0030).
    pub(crate) fn prefetch(&self, key: &[u8]) {
        let Some(bucket) = self.bucket_known(key) else {
            return;
        };
        if let Some(BucketFilter::Answering { first, rest }) = self.buckets.get(&bucket) {
            let hash = hash(key);
            first.prefetch(hash);
            if let Some(rest) = rest {
                rest.prefetch(hash);
            }
        }
    }

    /// Records that each of `keys` is written (call it before the writes can be seen), their
    /// blocks prefetched first so that a commit's misses overlap.
    pub(crate) fn note_all_written<'a>(&mut self, keys: impl Iterator<Item = &'a [u8]> + Clone) {
        for key in keys.clone() {
            self.prefetch(key);
        }
        for key in keys {
            self.note_written(key);
        }
    }

    /// Records that `key` is written (call it before the write can be seen).
    pub(crate) fn note_written(&mut self, key: &[u8]) {
        let Some(bucket) = self.bucket_known(key) else {
            return;
        };
        if !self.buckets.contains_key(&bucket) {
            self.drop_buckets_before_previous(bucket);
            self.make_bucket(bucket);
        }
        let bucket_bytes = self.bucket_bytes();
        let filter = self.buckets.get_mut(&bucket).expect("made above");
        let BucketFilter::Answering { first, rest } = filter else {
            return;
        };
        // Nearly every write: the bucket's newest filter has room.
        let newest = match rest {
            None if first.keys < first.keys_max => first,
            None => rest.insert(Bloom::new(bucket_bytes - first.bytes(), BITS_PER_KEY_MIN)),
            Some(rest) => rest,
        };
        if newest.keys < newest.keys_max {
            return newest.insert(hash(key));
        }
        self.bytes -= bucket_bytes;
        *filter = BucketFilter::Saturated;
    }

    /// Makes `bucket`'s filter, its whole share counted now, dropping older buckets' filters
    /// to make room. When no older bucket is left to drop, the bucket is saturated from the
    /// start.
    fn make_bucket(&mut self, bucket: u64) {
        let bucket_bytes = self.bucket_bytes();
        while self.bytes + bucket_bytes > self.bytes_max {
            let Some((&oldest, _)) = self.buckets.first_key_value() else {
                break;
            };
            if oldest >= bucket {
                break;
            }
            self.drop_bucket(oldest);
        }
        let filter = if self.bytes + bucket_bytes > self.bytes_max {
            BucketFilter::Saturated
        } else {
            self.bytes += bucket_bytes;
            BucketFilter::Answering {
                first: Bloom::new(bucket_bytes / FIRST_FILTER_SHARE, FIRST_FILTER_BITS_PER_KEY),
                rest: None,
            }
        };
        self.buckets.insert(bucket, filter);
    }

    /// A first write to `bucket` means time reached it: lookups go to it and the one before
    /// it only (`commit::find_dedupe`), so older buckets' filters are freed.
    fn drop_buckets_before_previous(&mut self, bucket: u64) {
        let Some(previous) = bucket.checked_sub(1) else {
            return;
        };
        while let Some((&oldest, _)) = self.buckets.first_key_value() {
            if oldest >= previous {
                break;
            }
            self.drop_bucket(oldest);
        }
    }

    /// Forgets `bucket`'s filter: it and every bucket below it are read from now on.
    fn drop_bucket(&mut self, bucket: u64) {
        if let Some(BucketFilter::Answering { .. }) = self.buckets.remove(&bucket) {
            self.bytes -= self.bucket_bytes();
        }
        self.floor = Some(self.floor.map_or(bucket, |floor| floor.max(bucket)));
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Bloom {
    /// A filter of about `bytes` (at least one block) that takes keys up to `bits_per_key`.
    fn new(bytes: usize, bits_per_key: usize) -> Bloom {
        let blocks = (bytes / BLOCK_BYTES).max(1);
        Bloom {
            blocks: vec![[0; BLOCK_WORDS]; blocks],
            keys: 0,
            keys_max: blocks * BLOCK_BITS as usize / bits_per_key,
        }
    }

    fn bytes(&self) -> usize {
        self.blocks.len() * BLOCK_BYTES
    }

    /// The block of `hash` and its probes' bit positions in it (double hashing).
    fn probes(&self, hash: u64) -> (usize, impl Iterator<Item = u64> + use<>) {
        let block = ((hash & 0xFFFF_FFFF) * self.blocks.len() as u64) >> 32;
        let high = hash >> 32;
        let first = high % BLOCK_BITS;
        let step = (high >> 9) | 1;
        let bits = (0..PROBES).map(move |i| (first + i * step) % BLOCK_BITS);
        (block as usize, bits)
    }

    fn insert(&mut self, hash: u64) {
        let (block, bits) = self.probes(hash);
        let block = &mut self.blocks[block];
        for bit in bits {
            block[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        self.keys += 1;
    }

    fn prefetch(&self, hash: u64) {
        let (block, _) = self.probes(hash);
        prefetch_line(&self.blocks[block]);
    }

    fn may_contain(&self, hash: u64) -> bool {
        let (block, mut bits) = self.probes(hash);
        let block = &self.blocks[block];
        bits.all(|bit| block[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }
}

/// Asks the CPU to load `block`'s cache line without waiting for it.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
fn prefetch_line(block: &Block) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    // SAFETY: a prefetch only hints the cache: it never faults, reads nothing into the
    // program and writes nothing; the pointer is that of a live reference besides.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(block.as_ptr().cast()) }
}

#[cfg(not(target_arch = "x86_64"))]
fn prefetch_line(_block: &Block) {}

/// A fixed hash, so a seeded simulation reads the same keys every run: 8-byte words mixed
/// with a multiply and a shift each, then the finalizer of MurmurHash3. Not built to resist
/// chosen keys; a sender who makes its keys collide only makes its own sends read.
fn hash(key: &[u8]) -> u64 {
    let mut hash = 0x9E37_79B9_7F4A_7C15 ^ key.len() as u64;
    let mut mix = |word: u64| {
        hash = (hash ^ word).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        hash ^= hash >> 31;
    };
    // Whole words without a copy (a copy of a variable length is a call to `memcpy`); the
    // rest zero-padded, as if every chunk were.
    let words = key.chunks_exact(8);
    let rest = words.remainder();
    for word in words {
        mix(u64::from_le_bytes(word.try_into().expect("8 bytes")));
    }
    if !rest.is_empty() {
        let mut word = [0u8; 8];
        word[..rest.len()].copy_from_slice(rest);
        mix(u64::from_le_bytes(word));
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    hash ^ (hash >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(bucket: u64, n: u64) -> [u8; 33] {
        keys::dedupe(bucket, n, n.wrapping_mul(7), n)
    }

    /// A filter of 1 MiB that saw keys 0 to 199,999 of bucket 5.
    fn filter_of_200_000_keys() -> DedupeFilter {
        let mut filter = DedupeFilter::new(None, 1 << 20);
        for n in 0..200_000 {
            filter.note_written(&key(5, n));
        }
        filter
    }

    /// How many of the 100,000 keys after those `filter` is sure it never saw.
    fn unwritten_known_absent(filter: &DedupeFilter) -> usize {
        (200_000..300_000)
            .filter(|&n| filter.is_absent(&key(5, n)))
            .count()
    }

    /// The hash reads whole words in place: the same values as zero-padding every chunk, so
    /// a seeded simulation keeps its false positives.
    #[test]
    fn the_hash_is_that_of_zero_padded_words() {
        fn padded(key: &[u8]) -> u64 {
            let mut hash = 0x9E37_79B9_7F4A_7C15 ^ key.len() as u64;
            for chunk in key.chunks(8) {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                hash = (hash ^ u64::from_le_bytes(word)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                hash ^= hash >> 31;
            }
            hash ^= hash >> 33;
            hash = hash.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
            hash ^ (hash >> 33)
        }
        let bytes: Vec<u8> = (0..48u8).map(|b| b.wrapping_mul(37) ^ 0x5A).collect();
        for len in 0..bytes.len() {
            assert_eq!(hash(&bytes[..len]), padded(&bytes[..len]), "{len} bytes");
        }
    }

    #[test]
    fn a_written_key_is_never_called_absent() {
        let filter = filter_of_200_000_keys();
        for n in 0..200_000 {
            assert!(!filter.is_absent(&key(5, n)), "key {n} was written");
        }
        // Keys never written are mostly known absent (false positives cost only a read).
        let absent = unwritten_known_absent(&filter);
        assert!(
            absent > 95_000,
            "only {absent} of 100,000 unwritten keys known absent"
        );
    }

    #[test]
    fn buckets_up_to_the_highest_at_open_are_always_read() {
        let highest = key(7, 3);
        let filter = DedupeFilter::new(Some(&highest), 1 << 20);
        assert!(!filter.is_absent(&key(6, 99)));
        assert!(
            !filter.is_absent(&key(7, 99)),
            "bucket 7 had records at open"
        );
        assert!(filter.is_absent(&key(8, 99)), "bucket 8 was empty at open");
        assert!(!filter.is_absent(&keys::message(1, 1)), "not a dedupe key");
    }

    /// Two filters per bucket, sized for the whole share: at ~20 bits per key almost every
    /// unwritten key is known absent. (Doubling slices, before decision 0030, answered ~98%
    /// here: two full slices of three, each adding its own ~1% of false positives.)
    #[test]
    fn a_bucket_well_within_its_share_has_almost_no_false_positives() {
        let absent = unwritten_known_absent(&filter_of_200_000_keys());
        assert!(
            absent > 99_800,
            "only {absent} of 100,000 unwritten keys known absent"
        );
    }

    #[test]
    fn a_bucket_past_its_keys_max_saturates_and_frees_its_filter() {
        let budget = 2 * BYTES_MIN;
        let mut filter = DedupeFilter::new(None, budget);
        for n in 0..20_000 {
            filter.note_written(&key(1, n));
        }
        // 64 KiB each: bucket 2 answers up to 156,193 keys (3,276 in its first filter at 20
        // bits each, the rest at 3 in the other 56 KiB), then saturates.
        for n in 0..400_000 {
            filter.note_written(&key(2, n));
            assert!(filter.bytes() <= budget);
        }
        assert_eq!(filter.bytes(), BYTES_MIN, "bucket 2's filter freed");
        assert!(!filter.is_absent(&key(2, 1_000_000)), "bucket 2 saturated");
        for n in (0..400_000).step_by(997) {
            assert!(!filter.is_absent(&key(2, n)));
        }
        assert!(
            filter.is_absent(&key(1, 1_000_000)),
            "bucket 1, the previous, still answers"
        );
        for n in 0..20_000 {
            assert!(!filter.is_absent(&key(1, n)), "key {n} was written");
        }
        filter.note_written(&key(3, 1));
        assert!(!filter.is_absent(&key(1, 1_000_000)), "bucket 1 dropped");
        assert!(filter.is_absent(&key(3, 2)), "a new bucket above is known");
        assert_eq!(filter.bytes(), BYTES_MIN);
    }

    #[test]
    fn a_bucket_older_than_the_two_held_is_read() {
        let mut filter = DedupeFilter::new(None, 1 << 20);
        filter.note_written(&key(3, 1));
        filter.note_written(&key(2, 1));
        filter.note_written(&key(1, 1));
        assert!(!filter.is_absent(&key(1, 2)), "no room for bucket 1");
        assert!(!filter.is_absent(&key(1, 1)));
        assert!(filter.is_absent(&key(2, 2)) && filter.is_absent(&key(3, 2)));
        assert_eq!(filter.bytes(), 1 << 20);
    }

    #[test]
    fn a_warmed_filter_knows_the_buckets_it_was_given_whole() {
        let records = [key(8, 1), key(9, 2)];
        let filter = DedupeFilter::warmed(8, records.iter().map(|k| k.as_slice()), 1 << 20);
        assert!(!filter.is_absent(&key(7, 5)), "bucket 7 was not loaded");
        assert!(!filter.is_absent(&key(8, 1)) && !filter.is_absent(&key(9, 2)));
        assert!(filter.is_absent(&key(8, 5)) && filter.is_absent(&key(9, 5)));
        assert!(filter.is_absent(&key(10, 5)));
        let from_zero = DedupeFilter::warmed(0, [], 1 << 20);
        assert!(
            from_zero.is_absent(&key(0, 5)),
            "nothing is older than bucket 0"
        );
    }

    #[test]
    fn a_new_bucket_frees_the_filters_no_lookup_reaches() {
        let mut filter = DedupeFilter::new(None, 1 << 20);
        filter.note_written(&key(1, 1));
        filter.note_written(&key(2, 1));
        assert_eq!(filter.bytes(), 1 << 20, "half the budget each");
        filter.note_written(&key(3, 1));
        assert_eq!(filter.bytes(), 1 << 20, "bucket 1 freed");
        assert!(!filter.is_absent(&key(1, 9)), "and read from now on");
        assert!(filter.is_absent(&key(2, 9)) && filter.is_absent(&key(3, 9)));
    }

    #[test]
    fn a_budget_below_64_kib_disables_the_filter() {
        let filter = DedupeFilter::new(None, BYTES_MIN - 1);
        assert!(!filter.is_absent(&key(1, 1)));
    }
}
