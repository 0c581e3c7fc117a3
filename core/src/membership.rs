//! Membership epochs: edges that disagree about the members never both commit (decision 0016).
//!
//! Where the edges share a store (FoundationDB), a user's inbox can be written by any edge, and
//! the members decide which edge may: the user's home by rendezvous hashing over them. While
//! an operator changes the members one edge at a time, an edge on the old list and one on the
//! new list would both take a moving user as theirs and, each under its own lease, both commit
//! to its inbox. Leases alone cannot fence that: each edge holds its own.
//!
//! So the members have an epoch, `cluster.membership_epoch`, which the operator raises with
//! every change, and the store holds the current one at `m` ([`Membership`]):
//!
//! - An edge [`join`]s before it claims anything. The store's epoch equal to its own (with the
//!   same members) lets it in; a later one in the store refuses it (its config is stale); an
//!   earlier one is replaced, and in the same transaction **every lease of the previous
//!   members is raised**, so every edge still on the old members is fenced: its next commit
//!   and its next beat fail, and it exits for its supervisor to restart it with the new config.
//! - Every lease change and every beat checks the membership epoch in its transaction, and
//!   that the lease is a member's ([`check`]), so an edge on the old members cannot claim a
//!   lease after the change either, and no lease outside the members is ever claimed: the
//!   previous members' leases are all a change has to raise.
//!
//! Commits need no extra read: they check their lease, and the change raised every lease.

use crate::keys;
use crate::placement::EdgeId;
use crate::store::{KeyValue, Store, StoreError, Transaction};

/// The most members a cluster may list.
pub const MEMBERS_MAX: usize = 1024;

/// The most keys a join reads in the leases' range: every edge id that ever held a lease.
const LEASE_KEYS_MAX: usize = 1 << 17;

/// The members of the cluster and their epoch: the value at `m`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// Raised by the operator with every change of the members (`cluster.membership_epoch`).
    pub epoch: u64,
    /// Sorted, without duplicates.
    pub members: Vec<EdgeId>,
}

impl Membership {
    pub fn new(epoch: u64, members: &[EdgeId]) -> Membership {
        let mut members = members.to_vec();
        members.sort_unstable();
        members.dedup();
        Membership { epoch, members }
    }

    /// Epoch u64 LE, then each member u32 LE.
    pub fn encode(&self) -> Vec<u8> {
        let mut value = Vec::with_capacity(8 + 4 * self.members.len());
        value.extend_from_slice(&self.epoch.to_le_bytes());
        for member in &self.members {
            value.extend_from_slice(&member.to_le_bytes());
        }
        value
    }

    pub fn decode(value: &[u8]) -> Result<Membership, StoreError> {
        let corrupt = || {
            StoreError::Corrupt(format!(
                "membership record of {} bytes: expected 8 and 4 per member, at most {MEMBERS_MAX}",
                value.len()
            ))
        };
        let (epoch, members) = value.split_first_chunk::<8>().ok_or_else(corrupt)?;
        if members.len() % 4 != 0 || members.len() / 4 > MEMBERS_MAX {
            return Err(corrupt());
        }
        let members: Vec<EdgeId> = members
            .chunks_exact(4)
            .map(|id| u32::from_le_bytes(id.try_into().expect("4 bytes")))
            .collect();
        Ok(Membership::new(u64::from_le_bytes(*epoch), &members))
    }
}

impl std::fmt::Display for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "epoch {} with members {:?}", self.epoch, self.members)
    }
}

/// Why an edge may not join the cluster.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error(
        "the cluster runs membership {stored}, later than this edge's config ({ours}): give \
         this edge the current [cluster] members and membership_epoch"
    )]
    Stale {
        ours: Membership,
        stored: Membership,
    },
    #[error(
        "the store holds membership {stored}, and this edge's config has the same epoch with \
         other members ({ours}): raise cluster.membership_epoch with every change of the members"
    )]
    Conflict {
        ours: Membership,
        stored: Membership,
    },
    #[error("cannot read or write the membership: {0}")]
    Store(#[from] StoreError),
}

/// What [`join`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    /// The store already held this membership.
    Same,
    /// This edge brought the membership in: every lease was raised, fencing the edges still
    /// on `previous` (`None`: the store held none).
    Changed { previous: Option<Membership> },
}

/// Lets an edge with membership `ours` into the cluster (see the module). With several
/// stores the membership lives on the first; every store's leases are then brought up to
/// the first store's, which finishes a change (or a claim) cut short between stores before
/// this edge serves anyone.
pub fn join<S: Store>(stores: &[S], ours: &Membership) -> Result<Joined, JoinError> {
    let first = stores
        .first()
        .ok_or_else(|| StoreError::Io("a membership needs at least one store".into()))?;
    let mut txn = first.begin()?;
    let stored = read_in(&mut txn)?;
    let joined = match stored {
        Some(stored) if stored.epoch > ours.epoch => {
            return Err(JoinError::Stale {
                ours: ours.clone(),
                stored,
            });
        }
        Some(stored) if stored.epoch == ours.epoch && stored.members != ours.members => {
            return Err(JoinError::Conflict {
                ours: ours.clone(),
                stored,
            });
        }
        Some(stored) if stored.epoch == ours.epoch => {
            drop(txn);
            Joined::Same
        }
        previous => {
            txn.set(&keys::members(), &ours.encode());
            // Under an epoch only its members' leases are claimed, beaten or handed over
            // (`check`), and every earlier change raised the leases claimed before it: the
            // previous members' leases are all an edge on the previous members can commit
            // under. Raising only those keeps the transaction small however many edge ids
            // were ever used (raising every lease passed FoundationDB's transaction size
            // limit at some ten thousand). A store without a membership was written by a
            // version before memberships, whose claims named no epoch: all of its leases.
            let raised = match &previous {
                Some(previous) => {
                    let keys: Vec<[u8; 5]> = previous
                        .members
                        .iter()
                        .map(|edge| keys::lease(*edge))
                        .collect();
                    let key_refs: Vec<&[u8]> = keys.iter().map(|key| key.as_slice()).collect();
                    let values = txn.get_many(&key_refs)?;
                    keys.iter()
                        .zip(values)
                        .filter_map(|(key, value)| Some((key.to_vec(), value?)))
                        .collect()
                }
                None => leases_in(&mut txn)?,
            };
            for (key, value) in raised {
                let mut lease = crate::takeover::Lease::decode(&value)?;
                lease.epoch += 1;
                txn.set(&key, &lease.encode());
            }
            txn.commit()?;
            Joined::Changed { previous }
        }
    };
    // The other stores' copies are brought up to the first store's: each store's leases in
    // one read, and a write only for each copy that is behind.
    let leases = {
        let mut txn = first.begin_read()?;
        leases_in(&mut txn)?
    };
    for store in &stores[1..] {
        let copies: std::collections::HashMap<Vec<u8>, Vec<u8>> = {
            let mut txn = store.begin_read()?;
            leases_in(&mut txn)?.into_iter().collect()
        };
        for (key, value) in &leases {
            let lease = crate::takeover::Lease::decode(value)?;
            let copy = copies
                .get(key)
                .map(|copy| crate::takeover::Lease::decode(copy))
                .transpose()?;
            if copy.is_some_and(|copy| copy.epoch >= lease.epoch) {
                continue;
            }
            let edge = u32::from_be_bytes(key[1..5].try_into().expect("a lease key"));
            match crate::takeover::write_if_newer(store, edge, lease, None) {
                // A later claim landed there meanwhile: newer still.
                Ok(()) | Err(StoreError::Fenced) => {}
                Err(error) => return Err(error.into()),
            }
        }
    }
    Ok(joined)
}

/// The membership the store holds (on the first store), if any.
pub fn read<S: Store>(stores: &[S]) -> Result<Option<Membership>, StoreError> {
    match stores.first() {
        Some(store) => read_in(&mut store.begin_read()?),
        None => Ok(None),
    }
}

/// `Fenced` unless the store's membership epoch is `epoch` and `edge`, whose lease the
/// transaction changes or beats, is one of its members: in a lease change's or a beat's
/// transaction (on the first store), so an edge on other members changes nothing. Only
/// members' leases are claimed under an epoch, which is why a change of the members need
/// raise only the previous members' leases ([`join`]).
pub(crate) fn check<T: Transaction>(
    txn: &mut T,
    epoch: u64,
    edge: EdgeId,
) -> Result<(), StoreError> {
    match read_in(txn)? {
        Some(stored) if stored.epoch == epoch && stored.members.binary_search(&edge).is_ok() => {
            Ok(())
        }
        _ => Err(StoreError::Fenced),
    }
}

fn read_in<T: Transaction>(txn: &mut T) -> Result<Option<Membership>, StoreError> {
    txn.get(&keys::members())?
        .map(|value| Membership::decode(&value))
        .transpose()
}

/// Every lease key and value (`l/{edge}`). The range holds nothing else now; keys of another
/// length (beats of older versions, at `l/{edge}/b`) are skipped.
fn leases_in<T: Transaction>(txn: &mut T) -> Result<Vec<KeyValue>, StoreError> {
    let (start, end) = keys::tag_range(keys::TAG_LEASE);
    let pairs = txn.get_range(&start, &end, LEASE_KEYS_MAX)?;
    if pairs.len() >= LEASE_KEYS_MAX {
        return Err(StoreError::Corrupt(format!(
            "{LEASE_KEYS_MAX} lease keys or more: edge ids are not meant to be used up"
        )));
    }
    Ok(pairs
        .into_iter()
        .filter(|(key, _)| key.len() == keys::lease(0).len())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::takeover;

    #[test]
    fn membership_round_trips_and_rejects_bad_lengths() {
        let membership = Membership::new(7, &[30, 10, 20, 10]);
        assert_eq!(membership.members, vec![10, 20, 30]);
        assert_eq!(Membership::decode(&membership.encode()), Ok(membership));
        for bad in [
            &[0u8; 7][..],
            &[0u8; 9][..],
            &vec![0u8; 8 + 4 * (MEMBERS_MAX + 1)],
        ] {
            assert!(matches!(
                Membership::decode(bad),
                Err(StoreError::Corrupt(_))
            ));
        }
    }

    #[test]
    fn a_later_membership_fences_every_edge_on_the_earlier_one() {
        let stores = [MemoryStore::new(), MemoryStore::new()];
        let old = Membership::new(1, &[1, 2]);
        assert_eq!(join(&stores, &old), Ok(Joined::Changed { previous: None }));
        let one = takeover::claim_own(&stores, 1, 11, 1).unwrap();
        let two = takeover::claim_own(&stores, 2, 22, 1).unwrap();
        assert_eq!(join(&stores, &old), Ok(Joined::Same));

        // Edge 3 joins with the members changed: both old leases are raised on every store.
        let new = Membership::new(2, &[1, 2, 3]);
        assert_eq!(
            join(&stores, &new),
            Ok(Joined::Changed {
                previous: Some(old.clone())
            })
        );
        for store in &stores {
            let leased = takeover::LeasedStore::new(store, 1, one);
            assert_eq!(leased.begin().err(), Some(StoreError::Fenced));
            let leased = takeover::LeasedStore::new(store, 2, two);
            assert_eq!(leased.begin().err(), Some(StoreError::Fenced));
        }
        assert_eq!(takeover::renew(&stores, 1, one, 1), Err(StoreError::Fenced));

        // Edge 2, still on the old config, can neither come back nor claim anything.
        assert!(matches!(join(&stores, &old), Err(JoinError::Stale { .. })));
        assert_eq!(
            takeover::claim_own(&stores, 2, 23, 1),
            Err(StoreError::Fenced)
        );
        let seen = takeover::observe_all(&stores, &[1]).unwrap()[&1];
        assert_eq!(
            takeover::claim(&stores, 1, 2, 23, seen, 1),
            Err(StoreError::Fenced)
        );
        // The same epoch with other members is a mistake, said as such.
        let mistaken = Membership::new(2, &[1, 3]);
        assert!(matches!(
            join(&stores, &mistaken),
            Err(JoinError::Conflict { .. })
        ));

        // On the new config, edge 2 joins and claims its lease again; it commits.
        assert_eq!(join(&stores, &new), Ok(Joined::Same));
        let two = takeover::claim_own(&stores, 2, 24, 2).unwrap();
        for store in &stores {
            let leased = takeover::LeasedStore::new(store, 2, two);
            assert!(leased.begin().is_ok());
        }
        assert_eq!(takeover::renew(&stores, 2, two, 2), Ok(()));
    }

    /// On FoundationDB a join reads the leases' whole range: a beat inside it (every edge
    /// raises its own every second) would abort nearly every join of a large cluster.
    #[test]
    fn beats_lie_outside_the_range_a_join_reads() {
        let (start, end) = keys::tag_range(keys::TAG_LEASE);
        for edge in [0, 7, u32::MAX] {
            let beat = keys::beat(edge);
            assert!(beat.as_slice() < start.as_slice() || beat.as_slice() >= end.as_slice());
        }
    }

    /// A change of the members raises the previous members' leases and no other: those are
    /// all the leases claimed under the previous epoch (an edge outside the members can
    /// neither claim nor be claimed), and they fit in one transaction however many edge ids
    /// were ever used, which all the leases did not.
    #[test]
    fn a_change_raises_only_the_previous_members_leases() {
        let stores = [MemoryStore::new(), MemoryStore::new()];
        join(&stores, &Membership::new(1, &[1, 2])).unwrap();
        let one = takeover::claim_own(&stores, 1, 11, 1).unwrap();
        assert_eq!(
            takeover::claim_own(&stores, 3, 33, 1),
            Err(StoreError::Fenced),
            "an edge outside the members claims nothing"
        );
        let seen = takeover::observe_all(&stores, &[3]).unwrap()[&3];
        assert_eq!(
            takeover::claim(&stores, 3, 1, 11, seen, 1),
            Err(StoreError::Fenced),
            "nor is an edge outside the members taken over"
        );
        // Leases of ids retired long ago, left in the store.
        const RETIRED: std::ops::Range<u32> = 1_000..21_000;
        let retired = |edge: EdgeId| takeover::Lease {
            epoch: 5,
            holder: edge,
            owner: 7,
        };
        for store in &stores {
            let mut txn = store.begin().unwrap();
            for edge in RETIRED {
                txn.set(&keys::lease(edge), &retired(edge).encode());
            }
            txn.commit().unwrap();
        }

        join(&stores, &Membership::new(2, &[1, 2, 4])).unwrap();
        for store in &stores {
            let leased = takeover::LeasedStore::new(store, 1, one);
            assert_eq!(leased.begin().err(), Some(StoreError::Fenced));
            let mut txn = store.begin_read().unwrap();
            for edge in RETIRED.step_by(997) {
                let value = txn.get(&keys::lease(edge)).unwrap().expect("kept");
                assert_eq!(takeover::Lease::decode(&value), Ok(retired(edge)));
            }
        }
    }

    #[test]
    fn a_change_cut_short_between_stores_is_finished_by_the_next_join() {
        let stores = [MemoryStore::new(), MemoryStore::new()];
        let old = Membership::new(1, &[1, 2]);
        join(&stores, &old).unwrap();
        let one = takeover::claim_own(&stores, 1, 11, 1).unwrap();
        // The change reached the first store only (its joiner died before the second).
        join(&stores[..1], &Membership::new(2, &[1, 2, 3])).unwrap();
        let leased = takeover::LeasedStore::new(&stores[1], 1, one);
        assert!(
            leased.begin().is_ok(),
            "the second store was not written yet"
        );
        // Whoever joins next on the new members finishes it before serving.
        assert_eq!(
            join(&stores, &Membership::new(2, &[1, 2, 3])),
            Ok(Joined::Same)
        );
        let leased = takeover::LeasedStore::new(&stores[1], 1, one);
        assert_eq!(leased.begin().err(), Some(StoreError::Fenced));
    }
}
