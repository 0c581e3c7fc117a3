//! The key layout shared by every store backend.
//!
//! Integers are big-endian so byte order is numeric order. Each key starts with a one-byte tag:
//!
//! | key | value | what |
//! |---|---|---|
//! | `q` inbox seq | [`crate::envelope`] | a stored message |
//! | `c` inbox | last seq, u64 LE | the inbox's sequence counter (kept after deletes, deleted when expiry empties the inbox) |
//! | `f` | highest last seq of a forgotten inbox, u64 LE (atomic max) | the seq floor: an inbox without a counter continues above it |
//! | `d` bucket inbox sender client_id | seq u64 LE, server time u64 LE, then the expiry: its ms after the server time u32 LE (20 bytes; embedded stores, when it fits) or itself u64 LE (24 bytes) | dedupe record (decision 0002) |
//! | `e` bucket inbox | empty (older stores: a seq, ignored) | expiry index: inbox has messages expiring in bucket |
//! | `g` inbox | empty | expiry emptied the inbox and its home shard has yet to forget it (`Request::Forget`) |
//! | `t` | highest commit time (and time of an expiry pass that wrote `k` or deleted, or of a read that declared an expired message gone), u64 LE (atomic max) | server time high-water mark (`clock`); reads judge expiry by it |
//! | `k` | a dedupe key | every dedupe record below it is deleted: where expiry goes on clearing buckets past their window (embedded stores, which delete key by key) |
//! | `v` inbox device | cursor u64 LE, last seen ms u64 LE | a device of the inbox: everything up to its cursor it has consumed |
//! | `p` | an `e` key | where a round of expiry passes goes on in the expiry index (set while a round runs out of budget, cleared when one finishes) |
//! | `w` | a `v` key | where expiry's sweep of device records goes on: records of forgotten inboxes unseen for the retention are deleted (`crate::commit::expire`) |
//! | `y` | round began ms, last round's records, this round's records, each u64 LE | the pace of the device sweep: a round that spans passes should end within `device_sweep_round_ms`, and one behind runs extra passes (`crate::commit::sweep_devices`) |
//! | `x` | expiry bucket size in ms, u64 LE | the size the `e` keys' bucket numbers were written with, set at the first start (`crate::commit::check_expiry_bucket`) |
//! | `l` edge | [`crate::takeover::Lease`] | who serves the edge's users (the edge itself or the edge that took it over), fencing every commit for them |
//! | `b` edge | beat, u64 LE (atomic add) | raised by the edge while it holds its own lease: how others see it alive (outside the `l` range, which a membership join reads whole) |
//! | `r` edge | renew interval ms, u64 LE | how often the edge beats, written at its start: others judge it dead only after several of its own intervals, whatever their own timeout (`crate::takeover`) |
//! | `m` | [`crate::membership::Membership`] | the cluster's members and their epoch: an edge on other members is fenced |
//! | `o` shard | owner epoch | shard ownership; the FoundationDB backend keeps it at `{prefix} 0xff o {shard}`, outside the data keys (`store::config::fdb_owner_key`) |
//!
//! Dedupe records are keyed by time bucket first so expiring them is one range clear (in bounded
//! passes on the embedded stores, decision 0020). They are
//! keyed by the recipient's inbox, so every key of an inbox is written by its home shard alone.

use crate::UserId;

pub const TAG_MESSAGE: u8 = b'q';
pub const TAG_COUNTER: u8 = b'c';
pub const TAG_DEDUPE: u8 = b'd';
pub const TAG_EXPIRY: u8 = b'e';
pub const TAG_OWNER: u8 = b'o';
pub const TAG_DEVICE: u8 = b'v';
pub const TAG_CLOCK: u8 = b't';
pub const TAG_FLOOR: u8 = b'f';
pub const TAG_EMPTIED: u8 = b'g';
pub const TAG_LEASE: u8 = b'l';
pub const TAG_MEMBERS: u8 = b'm';
pub const TAG_BEAT: u8 = b'b';
pub const TAG_RENEW_INTERVAL: u8 = b'r';
pub const TAG_DEDUPE_EXPIRED: u8 = b'k';
pub const TAG_DEVICES_SWEPT: u8 = b'w';
pub const TAG_EXPIRY_ROUND: u8 = b'p';
pub const TAG_EXPIRY_BUCKET: u8 = b'x';
pub const TAG_DEVICES_SWEEP_ROUND: u8 = b'y';

/// `x`: the expiry bucket size the store's expiry index was written with.
pub fn expiry_bucket_size() -> [u8; 1] {
    [TAG_EXPIRY_BUCKET]
}

/// `p`: the expiry index key the current round of expiry passes goes on from
/// (`crate::commit::expire`).
pub fn expiry_round_at() -> [u8; 1] {
    [TAG_EXPIRY_ROUND]
}

/// `w`: the device key expiry's sweep of device records got to (`crate::commit::expire`).
pub fn devices_swept_to() -> [u8; 1] {
    [TAG_DEVICES_SWEPT]
}

/// `y`: the pace of the current round of expiry's sweep of device records
/// (`crate::commit::sweep_devices`).
pub fn devices_sweep_round() -> [u8; 1] {
    [TAG_DEVICES_SWEEP_ROUND]
}

/// `k`: below this dedupe key every record is deleted (`crate::commit::expire`).
pub fn dedupe_expired_below() -> [u8; 1] {
    [TAG_DEDUPE_EXPIRED]
}

/// `g/{inbox}`
pub fn emptied(inbox: UserId) -> [u8; 9] {
    tagged_u64(TAG_EMPTIED, inbox)
}

/// The inbox of an emptied-inbox key.
pub fn parse_emptied(key: &[u8]) -> Option<UserId> {
    let key: &[u8; 9] = key.try_into().ok()?;
    (key[0] == TAG_EMPTIED).then(|| be_u64(&key[1..9]))
}

/// `f`: the seq floor of the store's inboxes (`crate::commit`).
pub fn floor() -> [u8; 1] {
    [TAG_FLOOR]
}

/// `t`: the highest time any commit used (`crate::clock`).
pub fn clock() -> [u8; 1] {
    [TAG_CLOCK]
}

/// `q/{inbox}/{seq}`
pub fn message(inbox: UserId, seq: u64) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = TAG_MESSAGE;
    key[1..9].copy_from_slice(&inbox.to_be_bytes());
    key[9..17].copy_from_slice(&seq.to_be_bytes());
    key
}

/// The inbox and sequence number of a message key.
pub fn parse_message(key: &[u8]) -> Option<(UserId, u64)> {
    let key: &[u8; 17] = key.try_into().ok()?;
    if key[0] != TAG_MESSAGE {
        return None;
    }
    Some((be_u64(&key[1..9]), be_u64(&key[9..17])))
}

/// `c/{inbox}`
pub fn counter(inbox: UserId) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = TAG_COUNTER;
    key[1..9].copy_from_slice(&inbox.to_be_bytes());
    key
}

/// `v/{inbox}/{device}`
pub fn device(inbox: UserId, device: u32) -> [u8; 13] {
    let mut key = [0u8; 13];
    key[0] = TAG_DEVICE;
    key[1..9].copy_from_slice(&inbox.to_be_bytes());
    key[9..13].copy_from_slice(&device.to_be_bytes());
    key
}

/// The range `[start, end)` of every device key of `inbox`.
pub fn device_range(inbox: UserId) -> (Vec<u8>, Vec<u8>) {
    let start = tagged_u64(TAG_DEVICE, inbox).to_vec();
    let end = match inbox.checked_add(1) {
        Some(next) => tagged_u64(TAG_DEVICE, next).to_vec(),
        None => vec![TAG_DEVICE + 1],
    };
    (start, end)
}

/// The inbox and device of a device key.
pub fn parse_device(key: &[u8]) -> Option<(UserId, u32)> {
    let key: &[u8; 13] = key.try_into().ok()?;
    if key[0] != TAG_DEVICE {
        return None;
    }
    let mut device = [0u8; 4];
    device.copy_from_slice(&key[9..13]);
    Some((be_u64(&key[1..9]), u32::from_be_bytes(device)))
}

/// `d/{bucket}/{inbox}/{sender}/{client_id}`
pub fn dedupe(bucket: u64, inbox: UserId, sender: UserId, client_id: u64) -> [u8; 33] {
    let mut key = [0u8; 33];
    key[0] = TAG_DEDUPE;
    key[1..9].copy_from_slice(&bucket.to_be_bytes());
    key[9..17].copy_from_slice(&inbox.to_be_bytes());
    key[17..25].copy_from_slice(&sender.to_be_bytes());
    key[25..33].copy_from_slice(&client_id.to_be_bytes());
    key
}

/// `(bucket, inbox, sender, client_id)` of a dedupe key (`dedupe`); `None` for any other.
pub fn parse_dedupe(key: &[u8]) -> Option<(u64, UserId, UserId, u64)> {
    (key.len() == 33 && key[0] == TAG_DEDUPE).then(|| {
        (
            be_u64(&key[1..9]),
            be_u64(&key[9..17]),
            be_u64(&key[17..25]),
            be_u64(&key[25..33]),
        )
    })
}

/// The range `[start, end)` of every dedupe record of `inbox` in bucket `bucket`.
pub fn dedupe_inbox_range(bucket: u64, inbox: UserId) -> (Vec<u8>, Vec<u8>) {
    let start = dedupe(bucket, inbox, 0, 0)[..17].to_vec();
    let end = match inbox.checked_add(1) {
        Some(next) => dedupe(bucket, next, 0, 0)[..17].to_vec(),
        None => match bucket.checked_add(1) {
            Some(next_bucket) => dedupe_bucket_start(next_bucket).to_vec(),
            None => vec![TAG_DEDUPE + 1],
        },
    };
    (start, end)
}

/// The bucket of a dedupe key.
pub fn parse_dedupe_bucket(key: &[u8]) -> Option<u64> {
    (key.first() == Some(&TAG_DEDUPE) && key.len() >= 9).then(|| be_u64(&key[1..9]))
}

/// First key of dedupe bucket `bucket`; the end of the range of all earlier buckets.
pub fn dedupe_bucket_start(bucket: u64) -> [u8; 9] {
    tagged_u64(TAG_DEDUPE, bucket)
}

/// `e/{bucket}/{inbox}`
pub fn expiry(bucket: u64, inbox: UserId) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = TAG_EXPIRY;
    key[1..9].copy_from_slice(&bucket.to_be_bytes());
    key[9..17].copy_from_slice(&inbox.to_be_bytes());
    key
}

/// First key of expiry bucket `bucket`.
pub fn expiry_bucket_start(bucket: u64) -> [u8; 9] {
    tagged_u64(TAG_EXPIRY, bucket)
}

/// The bucket and inbox of an expiry key.
pub fn parse_expiry(key: &[u8]) -> Option<(u64, UserId)> {
    let key: &[u8; 17] = key.try_into().ok()?;
    if key[0] != TAG_EXPIRY {
        return None;
    }
    Some((be_u64(&key[1..9]), be_u64(&key[9..17])))
}

/// `l/{edge}`
pub fn lease(edge: u32) -> [u8; 5] {
    let mut key = [0u8; 5];
    key[0] = TAG_LEASE;
    key[1..5].copy_from_slice(&edge.to_be_bytes());
    key
}

/// `b/{edge}`
pub fn beat(edge: u32) -> [u8; 5] {
    let mut key = [0u8; 5];
    key[0] = TAG_BEAT;
    key[1..5].copy_from_slice(&edge.to_be_bytes());
    key
}

/// `r/{edge}`: how often the edge beats, as it said at its start (`crate::takeover`).
pub fn renew_interval(edge: u32) -> [u8; 5] {
    let mut key = [0u8; 5];
    key[0] = TAG_RENEW_INTERVAL;
    key[1..5].copy_from_slice(&edge.to_be_bytes());
    key
}

/// `m`
pub fn members() -> [u8; 1] {
    [TAG_MEMBERS]
}

/// `o/{shard}`
pub fn owner(shard: u32) -> [u8; 5] {
    let mut key = [0u8; 5];
    key[0] = TAG_OWNER;
    key[1..5].copy_from_slice(&shard.to_be_bytes());
    key
}

/// The range `[start, end)` holding every key with tag `tag`.
pub fn tag_range(tag: u8) -> ([u8; 1], [u8; 1]) {
    ([tag], [tag + 1])
}

/// Decodes an 8-byte little-endian value, as written by atomic add and max.
pub fn le_u64(value: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(value.get(..8)?.try_into().ok()?))
}

fn tagged_u64(tag: u8, value: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = tag;
    key[1..9].copy_from_slice(&value.to_be_bytes());
    key
}

fn be_u64(bytes: &[u8]) -> u64 {
    let mut array = [0u8; 8];
    array.copy_from_slice(bytes);
    u64::from_be_bytes(array)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_keys_sort_by_inbox_then_seq() {
        assert!(message(1, 2) < message(1, 10));
        assert!(message(1, u64::MAX) < message(2, 0));
        assert_eq!(parse_message(&message(7, 300)), Some((7, 300)));
        assert_eq!(parse_message(&counter(7)), None);
    }

    #[test]
    fn dedupe_buckets_sort_before_later_buckets() {
        assert!(
            dedupe(4, u64::MAX, u64::MAX, u64::MAX).as_slice() < dedupe_bucket_start(5).as_slice()
        );
        assert!(dedupe_bucket_start(5).as_slice() <= dedupe(5, 0, 0, 0).as_slice());
        assert_eq!(parse_expiry(&expiry(3, 9)), Some((3, 9)));
    }

    #[test]
    fn dedupe_records_of_an_inbox_fall_in_its_range() {
        for (bucket, inbox) in [(3, 7), (3, u64::MAX), (u64::MAX, u64::MAX)] {
            let (start, end) = dedupe_inbox_range(bucket, inbox);
            for (sender, client_id) in [(0, 0), (u64::MAX, u64::MAX), (5, 9)] {
                let key = dedupe(bucket, inbox, sender, client_id);
                assert!(start.as_slice() <= key.as_slice() && key.as_slice() < end.as_slice());
            }
            if inbox < u64::MAX {
                assert!(dedupe(bucket, inbox + 1, 0, 0).as_slice() >= end.as_slice());
            }
            assert!(dedupe(bucket, inbox - 1, u64::MAX, u64::MAX).as_slice() < start.as_slice());
        }
    }

    #[test]
    fn device_keys_of_an_inbox_fall_in_its_range() {
        let (start, end) = device_range(7);
        for device_id in [0, 1, 63, u32::MAX] {
            let key = device(7, device_id);
            assert!(start.as_slice() <= key.as_slice() && key.as_slice() < end.as_slice());
            assert_eq!(parse_device(&key), Some((7, device_id)));
        }
        assert!(device(8, 0).as_slice() >= end.as_slice());
        assert!(device(6, u32::MAX).as_slice() < start.as_slice());
        let (_, last_end) = device_range(u64::MAX);
        assert!(device(u64::MAX, u32::MAX).as_slice() < last_end.as_slice());
    }
}
