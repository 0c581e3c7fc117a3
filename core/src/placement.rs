//! Where a user's inbox lives.
//!
//! A user is homed to one shard of the edge by a stable hash: `jump_hash(mix64(user), shards)`.
//! Jump consistent hashing (Lamping and Veach, 2014) moves only about `1/n` of the users when the
//! shard count grows from `n - 1` to `n`, and needs no table. The function is part of the
//! on-disk contract: changing it re-homes users, so it is pinned by a test of known values.
//! Across several edges, rendezvous hashing picks the edge first ([`home_edge`]), then this
//! picks the core within it (docs/cluster.md).
//!
//! With FoundationDB, an inbox's keys also live on one of several clusters:
//! `jump_hash(mix64(inbox ^ CLUSTER_SALT), clusters)` ([`cluster_of`]). The salt makes it
//! independent of the home shard, so the shard count and the cluster count change apart; the
//! cluster is where the data is, so this function is pinned by a test too (decision record
//! docs/decisions/0004-foundationdb-backend.md).

use crate::UserId;
use crate::rng::mix64;

/// Index of a shard (one per core) within an edge.
pub type ShardId = u32;

/// Index of a FoundationDB cluster in the configured list of cluster files.
pub type ClusterId = u32;

/// An edge's id in a cluster of edges (`[cluster] edge_id`): stable for the edge's life, since
/// placement hashes it.
pub type EdgeId = u32;

/// Mixed into the user before scoring edges, so a user's home edge says nothing about its
/// home shard: the users of one edge spread over all of its shards.
const EDGE_SALT: u64 = 0xD1B5_4A32_D192_ED03;

/// Mixed into the inbox before hashing it to a cluster, so that an inbox's cluster says
/// nothing about its home shard (the 64-bit golden ratio, as any odd constant would do).
const CLUSTER_SALT: u64 = 0x9E37_79B9_7F4A_7C15;

/// The home shard of `user` among `shards` shards. `shards` must be positive.
pub fn home_shard(user: UserId, shards: u32) -> ShardId {
    assert!(shards > 0, "an edge has at least one shard");
    jump_hash(mix64(user), shards)
}

/// The cluster, among `clusters`, that holds every key of `inbox` (its messages, counter,
/// dedupe records and expiry index entries all carry the inbox id, so they move together).
/// `clusters` must be positive.
///
/// Growing from `k` to `k + 1` clusters moves about `1/(k + 1)` of the inboxes, all of them to
/// the new cluster `k`; docs/foundationdb.md describes the migration.
pub fn cluster_of(inbox: UserId, clusters: u32) -> ClusterId {
    assert!(clusters > 0, "a deployment has at least one cluster");
    jump_hash(mix64(inbox ^ CLUSTER_SALT), clusters)
}

/// The home edge of `user` among the cluster's `edges`, by rendezvous (highest random weight)
/// hashing: each edge scores `mix64(mix64(user ^ salt) ^ mix64(edge))`, and the highest score
/// wins (the lower id on a tie). Integer arithmetic only, so every edge computes the same
/// answer on any machine.
///
/// Adding an edge moves to it the users it now outscores, about `1/(n + 1)` of them, and moves
/// no one else; removing an edge moves only its own users, spread over the rest. The order of
/// `edges` does not matter. `edges` must not be empty.
pub fn home_edge(user: UserId, edges: &[EdgeId]) -> EdgeId {
    let key = mix64(user ^ EDGE_SALT);
    edges
        .iter()
        .copied()
        .max_by_key(|edge| {
            (
                mix64(key ^ mix64(u64::from(*edge))),
                std::cmp::Reverse(*edge),
            )
        })
        .expect("a cluster has at least one edge")
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
    fn clusters_are_pinned_to_known_values() {
        // If this fails, inboxes would be looked up on clusters that do not hold them.
        let clusters: Vec<ClusterId> = (1..=8).map(|inbox| cluster_of(inbox, 4)).collect();
        assert_eq!(clusters, PINNED_CLUSTERS);
        assert!((1..=1000).all(|inbox| cluster_of(inbox, 1) == 0));
    }

    const PINNED_CLUSTERS: [ClusterId; 8] = [3, 0, 3, 2, 3, 2, 1, 0];

    #[test]
    fn clusters_spread_evenly_and_independently_of_shards() {
        // Users of one home shard must still spread over every cluster, or one cluster would
        // carry a whole shard's traffic.
        let mut counts = [[0u32; 4]; 4];
        for user in 1..=80_000u64 {
            counts[home_shard(user, 4) as usize][cluster_of(user, 4) as usize] += 1;
        }
        for row in counts {
            for count in row {
                assert!((4_500..5_500).contains(&count), "uneven: {counts:?}");
            }
        }
    }

    #[test]
    fn growing_by_one_cluster_moves_few_inboxes_all_to_the_new_one() {
        let moved: Vec<u64> = (1..=10_000u64)
            .filter(|&inbox| cluster_of(inbox, 4) != cluster_of(inbox, 5))
            .collect();
        // Ideal is 1/5 of the inboxes.
        assert!(
            (1_700..2_300).contains(&moved.len()),
            "{} moved",
            moved.len()
        );
        assert!(moved.iter().all(|&inbox| cluster_of(inbox, 5) == 4));
    }

    #[test]
    fn home_edges_are_pinned_to_known_values() {
        // If this fails, every cluster would re-home its users.
        let edges = [0, 1, 2, 3, 4];
        let homes: Vec<EdgeId> = (1..=8).map(|user| home_edge(user, &edges)).collect();
        assert_eq!(homes, PINNED_EDGES);
        let shuffled = [3, 0, 4, 2, 1];
        assert!((1..=1000).all(|user| home_edge(user, &shuffled) == home_edge(user, &edges)));
    }

    const PINNED_EDGES: [EdgeId; 8] = [4, 2, 4, 0, 3, 3, 0, 4];

    #[test]
    fn users_spread_over_edges_and_over_each_edges_shards() {
        let edges = [10, 11, 12, 13];
        let mut counts = [[0u32; 4]; 4];
        for user in 1..=80_000u64 {
            let edge = home_edge(user, &edges) - 10;
            counts[edge as usize][home_shard(user, 4) as usize] += 1;
        }
        for row in counts {
            for count in row {
                assert!((4_500..5_500).contains(&count), "uneven: {counts:?}");
            }
        }
    }

    #[test]
    fn adding_an_edge_moves_a_fair_share_all_to_it_and_removing_moves_only_its_users() {
        let before = [1, 2, 3, 4];
        let after = [1, 2, 3, 4, 5];
        let moved: Vec<u64> = (1..=10_000u64)
            .filter(|&user| home_edge(user, &before) != home_edge(user, &after))
            .collect();
        // Ideal is 1/5 of the users.
        assert!(
            (1_700..2_300).contains(&moved.len()),
            "{} moved",
            moved.len()
        );
        assert!(moved.iter().all(|&user| home_edge(user, &after) == 5));
        // Removing edge 2 moves its users and no one else.
        let without = [1, 3, 4, 5];
        for user in 1..=10_000u64 {
            let home = home_edge(user, &after);
            if home != 2 {
                assert_eq!(home_edge(user, &without), home, "user {user} moved");
            }
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
