//! One shard, several stores: a batch split over FoundationDB clusters.
//!
//! One FoundationDB cluster cannot carry every inbox, so a deployment may list several; each
//! inbox lives on [`cluster_of`]`(inbox, clusters)`. A shard's batch holds requests for inboxes
//! on any of them, and a transaction cannot span clusters, so [`commit_batch_split`] commits one
//! part per cluster, each in its own transaction, and puts the outcomes back in request order.
//! Why this shape, and what it costs: docs/decisions/0004-foundationdb-backend.md.

use super::{Store, StoreError};
use crate::UnixMillis;
use crate::commit::{Committer, Outcome, Request};
use crate::placement::{ClusterId, cluster_of};

/// The inbox whose keys a request writes (a commit may also touch the store's clock and seq
/// floor, which every store has).
pub fn inbox_of(request: &Request) -> crate::UserId {
    match request {
        Request::Send(send) => send.to,
        Request::Link { inbox, .. }
        | Request::Ack { inbox, .. }
        | Request::Forget { inbox }
        | Request::Purge { inbox } => *inbox,
    }
}

/// Positions of `requests` per cluster: entry `c` lists, in order, the requests whose inbox
/// lives on cluster `c`. `clusters` must be positive.
pub fn split_by_cluster(requests: &[Request], clusters: u32) -> Vec<Vec<usize>> {
    let mut parts = vec![Vec::new(); clusters as usize];
    for (position, request) in requests.iter().enumerate() {
        let cluster: ClusterId = cluster_of(inbox_of(request), clusters);
        parts[cluster as usize].push(position);
    }
    parts
}

/// Commits `requests` on `stores` (index = cluster id): one transaction per cluster that the
/// batch touches, in cluster order. Returns one outcome per request, in request order.
///
/// A failed part stops the batch and its error is returned; the parts before it stay
/// committed. The shard then answers the whole batch with a retryable error, and the retries
/// of the committed sends are found by their dedupe records, so nothing is stored twice. One
/// committer serves every cluster: its sequence cache is keyed by inbox, and an inbox lives on
/// one cluster.
pub fn commit_batch_split<S: Store>(
    committer: &mut Committer,
    stores: &[S],
    requests: &[Request],
    now: UnixMillis,
) -> Result<Vec<Outcome>, StoreError> {
    assert!(!stores.is_empty(), "at least one store");
    if let [store] = stores {
        // One cluster: no split, no copy.
        return committer.commit_batch(store, requests, now);
    }
    let parts = split_by_cluster(requests, stores.len() as u32);
    let mut outcomes: Vec<Option<Outcome>> = vec![None; requests.len()];
    let mut committed_a_part = false;
    for (store, positions) in stores.iter().zip(&parts) {
        if positions.is_empty() {
            continue;
        }
        let part: Vec<Request> = positions.iter().map(|&at| requests[at].clone()).collect();
        let part_outcomes =
            committer
                .commit_batch(store, &part, now)
                .map_err(|error| match error {
                    // A conflict says nothing was written, which is true of this part only: the
                    // caller must treat the batch's sends as maybe stored (their recipients'
                    // connections read the store again), not as refused before any write.
                    StoreError::Conflict if committed_a_part => StoreError::CommitUnknown,
                    error => error,
                })?;
        committed_a_part = true;
        for (&at, outcome) in positions.iter().zip(part_outcomes) {
            outcomes[at] = Some(outcome);
        }
    }
    outcomes
        .into_iter()
        .map(|outcome| {
            // Every position is in exactly one part, and commit_batch answers every request.
            outcome.ok_or_else(|| StoreError::Io("a request of the batch got no outcome".into()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commit::{self, SendRequest};
    use crate::keys;
    use crate::store::fault::{FaultRates, FaultStore};
    use crate::store::memory::MemoryStore;
    use crate::{CoreConfig, UserId};

    fn send(sender: UserId, client_id: u64, to: UserId) -> Request {
        Request::Send(SendRequest {
            sender,
            client_id,
            to,
            body: vec![client_id as u8],
            ttl_secs: None,
        })
    }

    /// Each inbox's keys land on its own cluster's store only, seqs stay dense per inbox,
    /// outcomes come back in request order, and a repeated batch is deduplicated.
    #[test]
    fn a_split_batch_lands_on_each_inboxs_cluster_in_order() {
        let config = CoreConfig::default();
        let stores: Vec<MemoryStore> = (0..3).map(|_| MemoryStore::new()).collect();
        let mut committer = Committer::new(&config);
        let inboxes: Vec<UserId> = (1..=12).collect();
        let mut batch: Vec<Request> = inboxes.iter().map(|&to| send(100, to, to)).collect();
        batch.extend(inboxes.iter().map(|&to| send(101, to, to)));
        batch.push(Request::Link {
            inbox: 5,
            device: 0,
            acked_up_to: 0,
        });
        batch.push(Request::Ack {
            inbox: 5,
            device: 0,
            up_to_seq: 1,
        });
        let outcomes = commit_batch_split(&mut committer, &stores, &batch, 1_000).unwrap();
        assert_eq!(outcomes.len(), batch.len());
        for (at, outcome) in outcomes.iter().enumerate() {
            let expected_seq = if at < inboxes.len() { 1 } else { 2 };
            match outcome {
                Outcome::Stored { seq, fresh, .. } => {
                    assert_eq!((*seq, *fresh), (expected_seq, true), "request {at}");
                }
                Outcome::Acked => assert_eq!(at, batch.len() - 1),
                Outcome::Linked { .. } => assert_eq!(at, batch.len() - 2),
                Outcome::Forgotten { .. } | Outcome::Purged { .. } | Outcome::UnknownRecipient => {
                    panic!("no forget, purge or unknown recipient in this batch")
                }
            }
        }
        for &inbox in &inboxes {
            let home = cluster_of(inbox, 3) as usize;
            for (cluster, store) in stores.iter().enumerate() {
                let counter = store.dump_prefix(&keys::counter(inbox));
                assert_eq!(counter.len(), usize::from(cluster == home), "inbox {inbox}");
            }
            let left = commit::read_inbox(&stores[home], inbox, 0, 1_000, &config)
                .unwrap()
                .messages;
            assert_eq!(left.len(), if inbox == 5 { 1 } else { 2 }, "inbox {inbox}");
        }
        let again = commit_batch_split(&mut committer, &stores, &batch[..1], 1_001).unwrap();
        assert!(matches!(
            again[0],
            Outcome::Stored {
                seq: 1,
                fresh: false,
                ..
            }
        ));
    }

    /// A failing cluster fails the batch; parts committed before it stay committed, so the
    /// batch's result is unknown, not a conflict (which says nothing was written: the
    /// shard then had no reason to read the committed part's inboxes again, and a message
    /// stored there waited for its recipient's next login).
    #[test]
    fn a_failed_part_fails_the_batch() {
        let config = CoreConfig {
            commit_attempts_max: 1,
            ..CoreConfig::default()
        };
        let always_conflicting = FaultRates {
            conflict_per_million: 1_000_000,
            ..FaultRates::default()
        };
        let stores = [
            FaultStore::new(MemoryStore::new(), FaultRates::default(), 1),
            FaultStore::new(MemoryStore::new(), always_conflicting, 2),
        ];
        let on_0 = (1..).find(|&inbox| cluster_of(inbox, 2) == 0).unwrap();
        let on_1 = (1..).find(|&inbox| cluster_of(inbox, 2) == 1).unwrap();
        let batch = [send(9, 1, on_1), send(9, 2, on_0)];
        let mut committer = Committer::new(&config);
        let result = commit_batch_split(&mut committer, &stores, &batch, 1_000);
        assert_eq!(result, Err(StoreError::CommitUnknown));
        assert_eq!(commit::last_seq(&stores[0], on_0).unwrap(), 1);
        assert_eq!(commit::last_seq(stores[1].inner(), on_1).unwrap(), 0);
        // A conflict on the first part: nothing was written.
        let batch = [send(9, 3, on_1)];
        let result = commit_batch_split(&mut committer, &stores, &batch, 1_001);
        assert_eq!(result, Err(StoreError::Conflict));
    }

    #[test]
    fn split_keeps_request_order_within_a_cluster() {
        let batch: Vec<Request> = (1..=50).map(|to| send(1, to, to)).collect();
        let parts = split_by_cluster(&batch, 4);
        assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), batch.len());
        for (cluster, positions) in parts.iter().enumerate() {
            assert!(positions.windows(2).all(|pair| pair[0] < pair[1]));
            for &at in positions {
                assert_eq!(cluster_of(inbox_of(&batch[at]), 4) as usize, cluster);
            }
        }
    }
}
