//! Where a user's inbox lives.
//!
//! A user is homed to one shard of the edge by a stable hash: `jump_hash(mix64(user), shards)`.
//! Jump consistent hashing (Lamping and Veach, 2014) moves only about `1/n` of the users when the
//! shard count grows from `n - 1` to `n`, and needs no table. The function is part of the
//! on-disk contract: changing it re-homes users, so it is pinned by a test of known values.
//! Across several edges, rendezvous hashing will pick the edge first, then this picks the core.

use crate::UserId;
use crate::rng::mix64;

/// Index of a shard (one per core) within an edge.
pub type ShardId = u32;

/// The home shard of `user` among `shards` shards. `shards` must be positive.
pub fn home_shard(user: UserId, shards: u32) -> ShardId {
    assert!(shards > 0, "an edge has at least one shard");
    jump_hash(mix64(user), shards)
}

/// Jump consistent hash: maps `key` to a bucket in `0..buckets`.
fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let mut bucket: i64 = -1;
    let mut next: i64 = 0;
    while next < i64::from(buckets) {
        bucket = next;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        next = ((bucket + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    bucket as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_is_pinned_to_known_values() {
        // If this fails, placement changed and every deployment would re-home its users.
        let homes: Vec<ShardId> = (1..=8).map(|user| home_shard(user, 16)).collect();
        assert_eq!(homes, PINNED_HOMES);
    }

    const PINNED_HOMES: [ShardId; 8] = [9, 13, 9, 11, 8, 13, 8, 15];

    #[test]
    fn every_user_lands_in_range_and_spreads_evenly() {
        let shards = 8;
        let mut counts = [0u32; 8];
        for user in 1..=80_000u64 {
            let shard = home_shard(user, shards);
            counts[shard as usize] += 1;
        }
        for count in counts {
            assert!(
                (9_000..11_000).contains(&count),
                "uneven spread: {counts:?}"
            );
        }
    }

    #[test]
    fn growing_by_one_shard_moves_few_users() {
        let moved = (1..=10_000u64)
            .filter(|&user| home_shard(user, 9) != home_shard(user, 10))
            .count();
        // Ideal is 1/10 of the users; a modulo hash would move 9/10.
        assert!(moved < 1_300, "{moved} of 10000 users moved");
    }
}
