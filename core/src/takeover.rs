//! Takeover: while an edge is dead, another edge serves its users (issue 13, decision 0015).
//!
//! Only where the edges share one store (FoundationDB): an inbox's keys do not depend on the
//! edge serving it, so any edge can commit for any user, and the question is only who may.
//! That is a [`Lease`] per edge, at `l/{edge}` in the store:
//!
//! - An edge starting up claims its own lease ([`claim_own`]): a new epoch, itself as holder.
//!   While it lives it raises a beat counter next to it ([`renew`]), a key of its own so the
//!   beat never conflicts with the commits that read the lease.
//! - Every commit runs through a [`LeasedStore`], which reads the lease inside the transaction
//!   and fails with [`StoreError::Fenced`] unless it is still the claim the committer holds.
//!   On FoundationDB that read also makes a concurrent claim abort the commit (a read
//!   conflict); on the embedded backends writers are serialised. So a claim fences every
//!   commit of the earlier holder at once, as the owner epoch fences a shard.
//! - The [`Planner`] (one per edge, sans-IO) reads every lease and beat each period. An edge
//!   whose beat stood still for `lease_timeout_ms` of the observer's own clock (no clocks are
//!   compared across machines), and for [`BEATS_PER_TIMEOUT_MIN`] of the intervals it said it
//!   beats at ([`publish_renew_interval`]), is dead: edges configured apart never judge a
//!   slower-beating one dead between two of its beats. Its successor, by rendezvous hashing over the edges
//!   alive, claims its lease ([`claim`]) if the record is still the one it saw, and serves its
//!   users on its own shards until the lease changes again: the edge restarted and claimed
//!   its own lease back, or the successor is fenced.
//!
//! - A drain hands the lease over instead ([`hand_over`]): the draining edge names its
//!   successor as holder, which claims it at its next observation without waiting for the
//!   timeout, and the draining edge redirects its clients there.
//!
//! Edges that see things differently cannot both commit: each claim raises the epoch, and
//! only the latest claim's commits pass. What differs is only where clients and forwarded
//! sends go, and a wrong guess is answered with a redirect or a retryable refusal.

use std::collections::{BTreeMap, BTreeSet};

use crate::commit::{Committer, Outcome};
use crate::keys;
use crate::membership;
use crate::placement::{EdgeId, home_edge};
use crate::session::{Authenticator, ConnRef, EdgeSession};
use crate::shard::Batch;
use crate::store::{Store, StoreError, Transaction};
use crate::{CoreConfig, UnixMillis};

/// Who serves an edge's users, under which epoch: the value at `l/{edge}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Raised by every claim; commits under an earlier claim are fenced.
    pub epoch: u64,
    /// The edge serving the users: the edge itself, or the one that took it over.
    pub holder: EdgeId,
    /// The holder's process (random per start), so a restarted holder is a new claim.
    pub owner: u64,
}

const LEASE_BYTES: usize = 20;

impl Lease {
    pub fn encode(&self) -> [u8; LEASE_BYTES] {
        let mut value = [0u8; LEASE_BYTES];
        value[..8].copy_from_slice(&self.epoch.to_le_bytes());
        value[8..12].copy_from_slice(&self.holder.to_le_bytes());
        value[12..].copy_from_slice(&self.owner.to_le_bytes());
        value
    }

    pub fn decode(value: &[u8]) -> Result<Lease, StoreError> {
        let value: &[u8; LEASE_BYTES] = value.try_into().map_err(|_| {
            StoreError::Corrupt(format!(
                "lease of {} bytes, expected {LEASE_BYTES}",
                value.len()
            ))
        })?;
        let u64_at = |at: usize| u64::from_le_bytes(value[at..at + 8].try_into().expect("8"));
        Ok(Lease {
            epoch: u64_at(0),
            holder: u32::from_le_bytes(value[8..12].try_into().expect("4")),
            owner: u64_at(12),
        })
    }
}

/// An edge's lease and beat as read from the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Observed {
    /// `None` while the edge never started.
    pub lease: Option<Lease>,
    /// Raised by the edge every renew interval while it holds its own lease.
    pub beat: u64,
    /// The renew interval the edge said at its start; `None` from edges before it said one.
    pub renew_ms: Option<u64>,
    /// Whether the edge said it takes over dead edges' users (`cluster.takeover`); `None`
    /// from edges before they said so, taken as yes.
    pub takes_over: Option<bool>,
}

/// What `r/{edge}` says: the renew interval (8 bytes, little-endian), then whether the edge
/// takes over (1 byte; absent from edges before it).
fn parse_beat_settings(value: Option<&[u8]>) -> (Option<u64>, Option<bool>) {
    let Some(value) = value else {
        return (None, None);
    };
    (keys::le_u64(value), value.get(8).map(|flag| *flag != 0))
}

/// Beats an edge may miss before it is judged dead, at the least: an edge's own
/// `lease_timeout_ms` is at least this many of its renew intervals (`cluster.lease_renew_ms`),
/// and it waits at least this many of another edge's intervals, whatever its own timeout.
pub const BEATS_PER_TIMEOUT_MIN: u64 = 3;

/// Says how often `edge` beats (on the first store, where [`observe_all`] reads), so that
/// edges whose `lease_timeout_ms` is shorter than a few of its intervals wait longer before
/// judging it dead, instead of taking its users over while it lives; and whether it takes
/// over (`takes_over`), so that no edge hands its users to, or leaves a dead edge's users
/// for, one that would never claim them. Written at every start.
pub fn publish_renew_interval<S: Store>(
    stores: &[S],
    edge: EdgeId,
    renew_ms: u64,
    takes_over: bool,
) -> Result<(), StoreError> {
    let mut value = [0u8; 9];
    value[..8].copy_from_slice(&renew_ms.to_le_bytes());
    value[8] = u8::from(takes_over);
    let mut txn = first(stores)?.begin()?;
    txn.set(&keys::renew_interval(edge), &value);
    txn.commit()?;
    Ok(())
}

/// `b/{edge}`: the beat, apart from the lease so that raising it conflicts with no commit,
/// and outside the leases' range so that it conflicts with no membership join either (a join
/// reads every lease: with the beats among them, any edge's beat would abort it).
fn beat_key(edge: EdgeId) -> [u8; 5] {
    keys::beat(edge)
}

fn read_lease<T: Transaction>(txn: &mut T, edge: EdgeId) -> Result<Option<Lease>, StoreError> {
    txn.get(&keys::lease(edge))?
        .map(|value| Lease::decode(&value))
        .transpose()
}

fn read_observed<T: Transaction>(txn: &mut T, edge: EdgeId) -> Result<Observed, StoreError> {
    let lease = read_lease(txn, edge)?;
    let beat = txn
        .get(&beat_key(edge))?
        .and_then(|value| keys::le_u64(&value))
        .unwrap_or(0);
    let (renew_ms, takes_over) =
        parse_beat_settings(txn.get(&keys::renew_interval(edge))?.as_deref());
    Ok(Observed {
        lease,
        beat,
        renew_ms,
        takes_over,
    })
}

/// Every edge's lease and beat, from one snapshot of the first store (see [`claim`] for why
/// the first one decides). The reads go out together ([`Transaction::get_many`]): read one
/// after another, on FoundationDB a large cluster's round of observations would take two
/// round trips per member, past the transaction's lifetime at the most members.
pub fn observe_all<S: Store>(
    stores: &[S],
    edges: &[EdgeId],
) -> Result<BTreeMap<EdgeId, Observed>, StoreError> {
    let mut txn = first(stores)?.begin_read()?;
    let keys: Vec<[u8; 5]> = edges
        .iter()
        .flat_map(|edge| {
            [
                keys::lease(*edge),
                beat_key(*edge),
                keys::renew_interval(*edge),
            ]
        })
        .collect();
    let key_refs: Vec<&[u8]> = keys.iter().map(|key| key.as_slice()).collect();
    let values = txn.get_many(&key_refs)?;
    edges
        .iter()
        .zip(values.chunks_exact(3))
        .map(|(edge, read)| {
            let lease = read[0].as_deref().map(Lease::decode).transpose()?;
            let beat = read[1].as_deref().and_then(keys::le_u64).unwrap_or(0);
            let (renew_ms, takes_over) = parse_beat_settings(read[2].as_deref());
            Ok((
                *edge,
                Observed {
                    lease,
                    beat,
                    renew_ms,
                    takes_over,
                },
            ))
        })
        .collect()
}

/// An edge starting up claims its own users: a new epoch, one above the highest on any store,
/// with itself as holder, whoever held them (a successor's commits for them are fenced from
/// now on). `Fenced` unless the cluster's membership epoch is `members_epoch` (the edge
/// [`crate::membership::join`]ed first).
///
/// A successor claiming this edge's users at the same moment (it judged the edge dead before
/// the restart) can write the same epoch first; the claim then reads again and goes one
/// higher, up to `CLAIM_OWN_ATTEMPTS` times, instead of failing the start.
pub fn claim_own<S: Store>(
    stores: &[S],
    edge: EdgeId,
    owner: u64,
    members_epoch: u64,
) -> Result<Lease, StoreError> {
    let mut attempt = 1;
    loop {
        match try_claim_own(stores, edge, owner, members_epoch) {
            Err(StoreError::Fenced) if attempt < CLAIM_OWN_ATTEMPTS => attempt += 1,
            result => return result,
        }
    }
}

/// Claims of an edge's own lease at its start that find the epoch taken meanwhile, in a row.
const CLAIM_OWN_ATTEMPTS: u32 = 5;

fn try_claim_own<S: Store>(
    stores: &[S],
    edge: EdgeId,
    owner: u64,
    members_epoch: u64,
) -> Result<Lease, StoreError> {
    let mut highest = 0;
    for store in stores {
        let mut txn = store.begin_read()?;
        highest = highest.max(read_lease(&mut txn, edge)?.map_or(0, |lease| lease.epoch));
    }
    let lease = Lease {
        epoch: highest + 1,
        holder: edge,
        owner,
    };
    for (index, store) in stores.iter().enumerate() {
        write_if_newer(store, edge, lease, (index == 0).then_some(members_epoch))?;
    }
    Ok(lease)
}

/// Claims `edge`'s users for `holder` if its lease and beat are still `expected` (what the
/// planner saw when it judged the edge dead): a beat that moved since means it lives, and a
/// lease that changed means someone else acted first. Either way: `Fenced`, nothing written.
///
/// With several stores (FoundationDB clusters; an inbox lives on one) every store holds a
/// copy of the lease, and each store's commits check their own copy. A claim checks and
/// writes the first store, then the others in order, each only over an earlier epoch; every
/// claimer goes in the same order, so of concurrent claims one wins the first store and the
/// later epoch wins every other. The claimer serves the users only once every store is
/// written, so it reads their inboxes after the last commit the earlier holder made. A claim
/// cut short is finished by the next one, which the planner makes once the holder it names
/// stops beating. Like every lease change, only under the membership epoch `members_epoch`.
pub fn claim<S: Store>(
    stores: &[S],
    edge: EdgeId,
    holder: EdgeId,
    owner: u64,
    expected: Observed,
    members_epoch: u64,
) -> Result<Lease, StoreError> {
    let mut txn = first(stores)?.begin()?;
    membership::check(&mut txn, members_epoch, edge)?;
    if read_observed(&mut txn, edge)? != expected {
        return Err(StoreError::Fenced);
    }
    let lease = Lease {
        epoch: expected.lease.map_or(0, |lease| lease.epoch) + 1,
        holder,
        owner,
    };
    txn.set(&keys::lease(edge), &lease.encode());
    txn.commit()?;
    for store in &stores[1..] {
        write_if_newer(store, edge, lease, None)?;
    }
    Ok(lease)
}

/// The owner a handed-over lease carries until its new holder claims it.
const HANDOVER_OWNER: u64 = 0;

impl Lease {
    /// Whether a drain handed these users to `holder`, which has not claimed them yet.
    pub fn is_handed_over(&self) -> bool {
        self.owner == HANDOVER_OWNER
    }
}

/// Whether every lease a drain handed over (`observed`, read after [`hand_over`]) was taken
/// up: claimed by its new holder (or by anyone else since). Only then does the draining edge
/// redirect its clients, so that the successor serves them when they arrive; before, it
/// would send them back to the draining edge's address, where nothing will answer soon.
pub fn taken_up(observed: &BTreeMap<EdgeId, Observed>) -> bool {
    observed
        .values()
        .all(|seen| !seen.lease.is_some_and(|lease| lease.is_handed_over()))
}

/// A draining edge gives the users of `edge` (its own, or a guest's) to `to`: the lease names
/// `to` as holder, and `to` claims it at its next observation. Commits under `lease` are
/// fenced from now on; `Fenced` if `lease` was no longer the latest claim.
pub fn hand_over<S: Store>(
    stores: &[S],
    edge: EdgeId,
    lease: Lease,
    to: EdgeId,
    members_epoch: u64,
) -> Result<(), StoreError> {
    let mut txn = begin_holding(stores, edge, lease, members_epoch)?;
    let handed = Lease {
        epoch: lease.epoch + 1,
        holder: to,
        owner: HANDOVER_OWNER,
    };
    txn.set(&keys::lease(edge), &handed.encode());
    txn.commit()?;
    for store in &stores[1..] {
        write_if_newer(store, edge, handed, None)?;
    }
    Ok(())
}

/// Raises the beat of `edge`'s own lease, on the first store; `Fenced` once another claim
/// replaced `lease` (every claim writes the first store first) or the members changed.
pub fn renew<S: Store>(
    stores: &[S],
    edge: EdgeId,
    lease: Lease,
    members_epoch: u64,
) -> Result<(), StoreError> {
    let mut txn = begin_holding(stores, edge, lease, members_epoch)?;
    txn.atomic_add(&beat_key(edge), 1);
    txn.commit()?;
    Ok(())
}

/// A transaction on the first store that goes on only while `lease` is still `edge`'s latest
/// claim under the membership epoch `members_epoch`; `Fenced` otherwise.
fn begin_holding<S: Store>(
    stores: &[S],
    edge: EdgeId,
    lease: Lease,
    members_epoch: u64,
) -> Result<S::Transaction<'_>, StoreError> {
    let mut txn = first(stores)?.begin()?;
    membership::check(&mut txn, members_epoch, edge)?;
    if read_lease(&mut txn, edge)? != Some(lease) {
        return Err(StoreError::Fenced);
    }
    Ok(txn)
}

fn first<S>(stores: &[S]) -> Result<&S, StoreError> {
    stores
        .first()
        .ok_or_else(|| StoreError::Io("a lease needs at least one store".into()))
}

/// Writes `lease` unless the store holds the same or a later epoch already (a concurrent,
/// later claim): then `Fenced`. Writing the same lease again is fine (a retry). On the first
/// store, also `Fenced` unless the membership epoch is `members_epoch`.
pub(crate) fn write_if_newer<S: Store>(
    store: &S,
    edge: EdgeId,
    lease: Lease,
    members_epoch: Option<u64>,
) -> Result<(), StoreError> {
    let mut txn = store.begin()?;
    if let Some(epoch) = members_epoch {
        membership::check(&mut txn, epoch, edge)?;
    }
    match read_lease(&mut txn, edge)? {
        Some(current) if current == lease => return Ok(()),
        Some(current) if current.epoch >= lease.epoch => return Err(StoreError::Fenced),
        _ => {}
    }
    txn.set(&keys::lease(edge), &lease.encode());
    txn.commit()?;
    Ok(())
}

/// A store whose transactions first check that `lease` still stands for `edge`'s users:
/// commits for them go through one of these (the owner epoch of a shard, per edge).
#[derive(Debug)]
pub struct LeasedStore<'a, S> {
    store: &'a S,
    edge: EdgeId,
    lease: Lease,
}

impl<'a, S: Store> LeasedStore<'a, S> {
    pub fn new(store: &'a S, edge: EdgeId, lease: Lease) -> LeasedStore<'a, S> {
        LeasedStore { store, edge, lease }
    }
}

impl<S: Store> Store for LeasedStore<'_, S> {
    type Transaction<'b>
        = S::Transaction<'b>
    where
        Self: 'b;

    fn begin(&self) -> Result<Self::Transaction<'_>, StoreError> {
        let mut txn = self.store.begin()?;
        if read_lease(&mut txn, self.edge)? != Some(self.lease) {
            return Err(StoreError::Fenced);
        }
        Ok(txn)
    }

    /// Reads need no lease: what is committed is true whoever serves the users.
    fn begin_read(&self) -> Result<Self::Transaction<'_>, StoreError> {
        self.store.begin_read()
    }

    fn lease_claim(&self) -> Option<(u32, u64)> {
        Some((self.edge, self.lease.epoch))
    }
}

/// Mixed into an edge id to pick its successor, so that it says nothing about user placement.
const SUCCESSOR_SALT: u64 = 0x5851_F42D_4C95_7F2D;

/// What the runtime must do for the [`Planner`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeoverAction {
    /// `edge` is dead and this edge is its successor: [`claim`] it with `expected`, and
    /// report the result to [`Planner::claimed`]. On success, every shard serves its users.
    Claim { edge: EdgeId, expected: Observed },
    /// Another claim replaced this edge's lease for `edge`: every shard stops serving its
    /// users (redirects their clients, refuses what it queued for them).
    Release { edge: EdgeId },
}

/// How long `observed`'s beat may stand still before its edge is dead, for an edge whose own
/// timeout is `lease_timeout_ms` ([`Planner::timeout_of`]).
fn timeout_ms_of(lease_timeout_ms: u64, observed: &Observed) -> u64 {
    observed.renew_ms.map_or(lease_timeout_ms, |renew_ms| {
        lease_timeout_ms.max(renew_ms.saturating_mul(BEATS_PER_TIMEOUT_MIN))
    })
}

/// One edge's view of who serves whom, from the leases it reads (sans-IO; see the module).
#[derive(Debug)]
pub struct Planner {
    edge: EdgeId,
    members: Vec<EdgeId>,
    lease_timeout_ms: u64,
    /// When the last full round of observations was read.
    last_round_ms: Option<UnixMillis>,
    /// A round failed since (the store could not be read): beats went unwatched.
    round_missed: bool,
    /// When the first of this edge's beats that failed in a row began
    /// ([`Planner::beat_result`]).
    beat_failing_since_ms: Option<UnixMillis>,
    /// Whether this edge claims anyone (`cluster.takeover`); one that does not still watches,
    /// to know who serves a dead or drained edge's users ([`Planner::watching_only`]).
    claims: bool,
    /// Per other member: what was read last, and when that last changed.
    seen: BTreeMap<EdgeId, (Observed, UnixMillis)>,
    /// Edges whose users this edge serves besides its own, with the lease it claimed.
    guests: BTreeMap<EdgeId, Lease>,
    /// Claims asked for and not reported yet.
    claiming: BTreeSet<EdgeId>,
}

impl Planner {
    /// `members` includes `edge`. An edge counts as dead once its beat stood still for
    /// `lease_timeout_ms`, so that must be several renew intervals.
    pub fn new(edge: EdgeId, members: &[EdgeId], lease_timeout_ms: u64) -> Planner {
        Planner {
            edge,
            members: members.to_vec(),
            lease_timeout_ms,
            last_round_ms: None,
            round_missed: false,
            beat_failing_since_ms: None,
            claims: true,
            seen: BTreeMap::new(),
            guests: BTreeMap::new(),
            claiming: BTreeSet::new(),
        }
    }

    /// One round of observations, every member's lease and beat as read together. After a
    /// failed round ([`Planner::round_failed`]: the store could not be read, as may have been
    /// true for every edge) or a pause of this edge as long as the timeout, no beat was watched
    /// in between, so every edge gets a full timeout again instead of being judged dead on the
    /// spot.
    pub fn observe_round(&mut self, now_ms: UnixMillis, observed: BTreeMap<EdgeId, Observed>) {
        let paused = self
            .last_round_ms
            .is_some_and(|last| now_ms.saturating_sub(last) >= self.lease_timeout_ms);
        if paused || std::mem::take(&mut self.round_missed) {
            for (_, changed_ms) in self.seen.values_mut() {
                *changed_ms = now_ms;
            }
        }
        self.last_round_ms = Some(now_ms);
        for (edge, seen) in observed {
            self.observe(now_ms, edge, seen);
        }
    }

    /// A planner for an edge with `cluster.takeover` off: it watches every member, so that
    /// it knows who serves a dead or drained edge's users (its clients' sends and logins for
    /// them go there), and claims no one, not even a lease that names it (an edge that took
    /// over before a restart with takeover off): others claim that from it.
    pub fn watching_only(mut self) -> Planner {
        self.claims = false;
        self
    }

    /// A round of observations could not be read.
    pub fn round_failed(&mut self) {
        self.round_missed = true;
    }

    /// The result of this edge's beat of its own lease begun at `now_ms` (before the store
    /// answered: a failed beat may take a whole transaction timeout), before the round it
    /// belongs to is observed. While its beats fail this edge may be the one cut off, so it
    /// claims no one ([`Planner::actions`] gives releases only). And a store that took no
    /// writes took no one's beats: had the others' beats failed as long, the first edge whose
    /// beat landed again would find every other beat standing still past the timeout and
    /// claim them all, fencing every other edge out. So once its beat lands again, the time
    /// its beats failed does not count against an edge that was alive when they began to
    /// fail, counted from the start of the first that failed (the interval before it is the
    /// timeout's margin). Only that time: an edge already dead then stays dead, and a
    /// successor whose beats fail now and then still claims a dead edge, later by the time
    /// they failed (a full timeout for everyone at each failed beat put the claim off for as
    /// long as the failures came once per timeout; counted from the last beat that landed, a
    /// beat failing every other time forgave the dead edge as much as it waited).
    pub fn beat_result(&mut self, now_ms: UnixMillis, landed: bool) {
        if !landed {
            self.beat_failing_since_ms.get_or_insert(now_ms);
            return;
        }
        let Some(since) = self.beat_failing_since_ms.take() else {
            return;
        };
        let failed_ms = now_ms.saturating_sub(since);
        let lease_timeout_ms = self.lease_timeout_ms;
        for (observed, changed_ms) in self.seen.values_mut() {
            if since.saturating_sub(*changed_ms) < timeout_ms_of(lease_timeout_ms, observed) {
                *changed_ms = now_ms.min(changed_ms.saturating_add(failed_ms));
            }
        }
    }

    /// What the store says of `edge` now (this edge's own record is ignored).
    pub fn observe(&mut self, now_ms: UnixMillis, edge: EdgeId, observed: Observed) {
        if edge == self.edge || !self.members.contains(&edge) {
            return;
        }
        match self.seen.get_mut(&edge) {
            Some((seen, _)) if *seen == observed => {}
            Some(entry) => *entry = (observed, now_ms),
            None => {
                self.seen.insert(edge, (observed, now_ms));
            }
        }
    }

    /// Whether `edge` holds its own lease and beat within the timeout.
    pub fn alive(&self, edge: EdgeId, now_ms: UnixMillis) -> bool {
        if edge == self.edge {
            return true;
        }
        self.seen.get(&edge).is_some_and(|(observed, changed_ms)| {
            observed.lease.is_some_and(|lease| lease.holder == edge)
                && now_ms.saturating_sub(*changed_ms) < self.timeout_of(observed)
        })
    }

    /// Whether `edge` would claim a dead or drained edge's users: not one that said it does
    /// not take over (`cluster.takeover` off), though it beats and counts as alive.
    fn takes_over(&self, edge: EdgeId) -> bool {
        edge == self.edge
            || self
                .seen
                .get(&edge)
                .is_none_or(|(observed, _)| observed.takes_over != Some(false))
    }

    /// The edges alive that would take users over: the successors a rendezvous picks from.
    fn successors_alive(&self, now_ms: UnixMillis) -> Vec<EdgeId> {
        self.members
            .iter()
            .copied()
            .filter(|edge| self.alive(*edge, now_ms) && self.takes_over(*edge))
            .collect()
    }

    /// How long `observed`'s beat may stand still before its edge is dead: this edge's
    /// timeout, or [`BEATS_PER_TIMEOUT_MIN`] of the edge's own renew intervals if longer.
    fn timeout_of(&self, observed: &Observed) -> u64 {
        timeout_ms_of(self.lease_timeout_ms, observed)
    }

    /// Members that beat too slowly for this edge's `lease_timeout_ms`, with their renew
    /// interval: the edges' `[cluster]` timings differ. Each is given the longer timeout, so
    /// nothing is taken over wrongly, but a dead one's users wait that much longer.
    pub fn slow_beaters(&self) -> Vec<(EdgeId, u64)> {
        self.seen
            .iter()
            .filter_map(|(edge, (observed, _))| {
                let renew_ms = observed.renew_ms?;
                (self.timeout_of(observed) > self.lease_timeout_ms).then_some((*edge, renew_ms))
            })
            .collect()
    }

    /// The edge serving `home`'s users: `home` while alive, else the live holder of its
    /// lease if it takes over (one restarted with `cluster.takeover` off serves no guests,
    /// and is claimed from); `None` while no one does (sends to them are refused as
    /// retryable).
    pub fn server_of(&self, home: EdgeId, now_ms: UnixMillis) -> Option<EdgeId> {
        if self.alive(home, now_ms) {
            return Some(home);
        }
        if self.guests.contains_key(&home) {
            return Some(self.edge);
        }
        let holder = self.seen.get(&home)?.0.lease?.holder;
        (holder != home
            && holder != self.edge
            && self.alive(holder, now_ms)
            && self.takes_over(holder))
        .then_some(holder)
    }

    /// Every edge not serving its own users, for
    /// [`crate::session::EdgeSession::set_servers`]: home → the edge serving them, or `None`
    /// while no one does (the home judged dead, its lease not yet claimed by a live edge).
    /// An edge never observed (not read yet) is left out: unknown, not unserved.
    pub fn servers(&self, now_ms: UnixMillis) -> BTreeMap<EdgeId, Option<EdgeId>> {
        self.members
            .iter()
            .filter(|home| **home != self.edge)
            .filter_map(|home| match self.server_of(*home, now_ms) {
                Some(server) if server == *home => None,
                Some(server) => Some((*home, Some(server))),
                None => self.seen.contains_key(home).then_some((*home, None)),
            })
            .collect()
    }

    /// Whether this edge is the one that runs the cluster's expiry passes: the lowest id
    /// among the members it sees alive, itself included. The expiry index covers every inbox
    /// of the store, so one runner does the work once; every edge running it did the same
    /// scans and deletes and conflicted. Edges that see each other differently may both run
    /// for a while, which costs conflicts and retries, not messages; a dead runner's turn
    /// passes to the next once it is judged dead, as its users do.
    pub fn runs_expiry(&self, now_ms: UnixMillis) -> bool {
        self.members
            .iter()
            .filter(|edge| self.alive(**edge, now_ms))
            .min()
            .is_none_or(|runner| *runner == self.edge)
    }

    /// The edges whose users this edge serves besides its own.
    pub fn guests(&self) -> impl Iterator<Item = (EdgeId, Lease)> + '_ {
        self.guests.iter().map(|(edge, lease)| (*edge, *lease))
    }

    /// Where a drain of this edge sends its users: the successor among the edges alive, by
    /// the same rendezvous a takeover uses. `None` when no other edge is alive.
    pub fn drain_target(&self, now_ms: UnixMillis) -> Option<EdgeId> {
        let alive: Vec<EdgeId> = self
            .successors_alive(now_ms)
            .into_iter()
            .filter(|edge| *edge != self.edge)
            .collect();
        (!alive.is_empty()).then(|| home_edge(SUCCESSOR_SALT ^ u64::from(self.edge), &alive))
    }

    /// What to do after the latest observations: releases first, then claims (a lease
    /// handed over to this edge at once, a dead edge's after the timeout).
    pub fn actions(&mut self, now_ms: UnixMillis) -> Vec<TakeoverAction> {
        let mut actions = Vec::new();
        let lost: Vec<EdgeId> = self
            .guests
            .iter()
            .filter(|(edge, lease)| {
                self.seen.get(edge).and_then(|(observed, _)| observed.lease) != Some(**lease)
            })
            .map(|(edge, _)| *edge)
            .collect();
        for edge in lost {
            self.guests.remove(&edge);
            actions.push(TakeoverAction::Release { edge });
        }
        if self.beat_failing_since_ms.is_some() || !self.claims {
            return actions;
        }
        let alive = self.successors_alive(now_ms);
        for (edge, (observed, changed_ms)) in &self.seen {
            // Names this edge but is not held here: handed over by a drain, claimed in a claim
            // whose answer was lost (unknown, or cut short between clusters), or claimed by
            // this edge's previous process. Claim at once (a compare-and-set that raises the
            // epoch), or no other edge would: they see this live edge as the holder.
            let ours = observed
                .lease
                .is_some_and(|lease| lease.holder == self.edge);
            if ours && !self.guests.contains_key(edge) && !self.claiming.contains(edge) {
                actions.push(TakeoverAction::Claim {
                    edge: *edge,
                    expected: *observed,
                });
                continue;
            }
            let dead_long_enough = now_ms.saturating_sub(*changed_ms) >= self.timeout_of(observed);
            if self.guests.contains_key(edge)
                || self.claiming.contains(edge)
                || !dead_long_enough
                || self.server_of(*edge, now_ms).is_some()
                || home_edge(SUCCESSOR_SALT ^ u64::from(*edge), &alive) != self.edge
            {
                continue;
            }
            actions.push(TakeoverAction::Claim {
                edge: *edge,
                expected: *observed,
            });
        }
        for action in &actions {
            if let TakeoverAction::Claim { edge, .. } = action {
                self.claiming.insert(*edge);
            }
        }
        actions
    }

    /// The result of a [`TakeoverAction::Claim`]. On success this edge serves `edge`'s users
    /// until [`TakeoverAction::Release`]; a failed claim is tried again if still due.
    pub fn claimed(&mut self, edge: EdgeId, result: Result<Lease, StoreError>) {
        self.claiming.remove(&edge);
        if let Ok(lease) = result {
            self.guests.insert(edge, lease);
        }
    }

    /// A commit for `edge`'s users under `lease` came back `Fenced`: someone claimed them
    /// since. Returns whether this edge was serving them under that lease (then every shard
    /// must release them now, without waiting for the next observation); a report about an
    /// earlier claim changes nothing.
    pub fn fenced(&mut self, edge: EdgeId, lease: Lease) -> bool {
        if self.guests.get(&edge) != Some(&lease) {
            return false;
        }
        self.guests.remove(&edge);
        true
    }
}

/// One shard's side of the guests its edge serves: the lease each is served under and its
/// committer, kept in step with the session. The edge's shards and the simulation both drive
/// the session's guests through this.
#[derive(Debug)]
pub struct ShardGuests {
    config: CoreConfig,
    /// Per guest: the lease, and its committer (`None` while a batch is in flight). A new
    /// claim gets a new committer.
    guests: BTreeMap<EdgeId, (Lease, Option<Committer>)>,
}

/// A guest's batch to commit under `lease` with `committer` (hand all three back to
/// [`ShardGuests::finish`]).
#[derive(Debug)]
pub struct GuestCommit {
    pub guest: EdgeId,
    pub lease: Lease,
    pub committer: Committer,
    pub batch: Batch<ConnRef>,
}

impl ShardGuests {
    pub fn new(config: &CoreConfig) -> ShardGuests {
        ShardGuests {
            config: config.clone(),
            guests: BTreeMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.guests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.guests.is_empty()
    }

    /// Makes the session serve exactly the guests the edge holds now (`held`, from the
    /// planner): a guest gone or held under another lease is released (its clients
    /// redirected), a new one served with a new committer.
    pub fn apply<A: Authenticator>(
        &mut self,
        session: &mut EdgeSession<A>,
        held: &BTreeMap<EdgeId, Lease>,
    ) {
        let released: Vec<EdgeId> = self
            .guests
            .iter()
            .filter(|(guest, (lease, _))| held.get(guest) != Some(lease))
            .map(|(guest, _)| *guest)
            .collect();
        for guest in released {
            self.guests.remove(&guest);
            session.release_guest(guest);
        }
        for (guest, lease) in held {
            if !self.guests.contains_key(guest) {
                let committer = Committer::new(&self.config);
                self.guests.insert(*guest, (*lease, Some(committer)));
                session.serve_guest(*guest);
            }
        }
    }

    /// The next guest batch to commit, with its lease and committer.
    pub fn next<A: Authenticator>(
        &mut self,
        session: &mut EdgeSession<A>,
        now_ms: UnixMillis,
    ) -> Option<GuestCommit> {
        let (guest, batch) = session.poll_guest_batch(now_ms)?;
        let taken = self
            .guests
            .get_mut(&guest)
            .and_then(|(lease, committer)| Some((*lease, committer.take()?)));
        let Some((lease, committer)) = taken else {
            // Cannot happen: the session and this map change together. Answer the batch
            // (retryably) rather than commit it under no lease.
            session.handle_guest_commit(now_ms, guest, batch, Err(StoreError::Fenced));
            return None;
        };
        Some(GuestCommit {
            guest,
            lease,
            committer,
            batch,
        })
    }

    /// A guest commit's result. Returns the guest and lease to report to the planner when it
    /// was fenced while this shard still served it under that lease (released here already;
    /// the planner releases it on the other shards).
    pub fn finish<A: Authenticator>(
        &mut self,
        session: &mut EdgeSession<A>,
        now_ms: UnixMillis,
        commit: GuestCommit,
        result: Result<Vec<Outcome>, StoreError>,
    ) -> Option<(EdgeId, Lease)> {
        let GuestCommit {
            guest,
            lease,
            committer,
            batch,
        } = commit;
        let current = self
            .guests
            .get_mut(&guest)
            .filter(|(current, _)| *current == lease);
        let still_serving = current.is_some();
        if let Some((_, slot)) = current {
            *slot = Some(committer);
        }
        let fenced = result == Err(StoreError::Fenced);
        session.handle_guest_commit(now_ms, guest, batch, result);
        if !(fenced && still_serving) {
            return None;
        }
        self.guests.remove(&guest);
        session.release_fenced_guest(guest);
        Some((guest, lease))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    const TIMEOUT: u64 = 1_000;
    const MEMBERS_EPOCH: u64 = 1;

    /// Stores the members 1, 2 and 3 joined, as every edge does before it claims a lease.
    fn joined<const N: usize>(stores: [MemoryStore; N]) -> [MemoryStore; N] {
        let members = crate::membership::Membership::new(MEMBERS_EPOCH, &[1, 2, 3]);
        crate::membership::join(&stores, &members).expect("join");
        stores
    }

    fn observe_store(planner: &mut Planner, store: &[MemoryStore], now: UnixMillis) {
        for (edge, observed) in observe_all(store, &[1, 2, 3]).expect("read") {
            planner.observe(now, edge, observed);
        }
    }

    /// A store on which a successor's claim of edge 3 lands between the restarting edge's
    /// read of the highest epoch and its write (the successor judged it dead just before).
    struct ClaimedMeanwhile {
        store: MemoryStore,
        claimed: std::sync::atomic::AtomicBool,
    }

    impl Store for ClaimedMeanwhile {
        type Transaction<'a> = <MemoryStore as Store>::Transaction<'a>;

        fn begin(&self) -> Result<Self::Transaction<'_>, StoreError> {
            if !self.claimed.swap(true, std::sync::atomic::Ordering::SeqCst) {
                let mut txn = self.store.begin()?;
                let epoch = read_lease(&mut txn, 3)?.map_or(0, |lease| lease.epoch) + 1;
                let successor = Lease {
                    epoch,
                    holder: 1,
                    owner: 7,
                };
                txn.set(&keys::lease(3), &successor.encode());
                txn.commit()?;
            }
            self.store.begin()
        }

        fn begin_read(&self) -> Result<Self::Transaction<'_>, StoreError> {
            self.store.begin_read()
        }
    }

    /// An edge that restarts while its successor claims its users, both at the same epoch,
    /// claims one epoch higher instead of failing its start (which cost a restart).
    #[test]
    fn a_restart_racing_its_successors_claim_goes_one_epoch_higher() {
        let [store] = joined([MemoryStore::new()]);
        let first = claim_own(std::slice::from_ref(&store), 3, 1, MEMBERS_EPOCH).expect("claim");
        let raced = [ClaimedMeanwhile {
            store,
            claimed: std::sync::atomic::AtomicBool::new(false),
        }];
        let back = claim_own(&raced, 3, 2, MEMBERS_EPOCH).expect("claims after the race");
        assert_eq!(back.holder, 3);
        assert_eq!(back.epoch, first.epoch + 2, "above the successor's claim");
        let mut txn = raced[0].store.begin_read().expect("read");
        assert_eq!(read_lease(&mut txn, 3).expect("lease"), Some(back));
    }

    #[test]
    fn a_silent_edge_is_taken_over_by_one_successor_and_given_back_when_it_returns() {
        let store = joined([MemoryStore::new()]);
        let leases: Vec<Lease> = (1..=3)
            .map(|edge| {
                claim_own(&store, edge, 100 + u64::from(edge), MEMBERS_EPOCH).expect("claim")
            })
            .collect();
        let mut planners: Vec<Planner> = (1..=3)
            .map(|e| Planner::new(e, &[1, 2, 3], TIMEOUT))
            .collect();
        // Edges 1 and 2 keep beating; edge 3 stops at once.
        let mut now = 0;
        let mut claims = Vec::new();
        while now <= 3 * TIMEOUT {
            for (index, lease) in leases.iter().enumerate().take(2) {
                renew(&store, index as u32 + 1, *lease, MEMBERS_EPOCH).expect("renew");
            }
            for planner in planners.iter_mut().take(2) {
                observe_store(planner, &store, now);
                for action in planner.actions(now) {
                    let TakeoverAction::Claim { edge, expected } = action else {
                        panic!("nothing to release yet");
                    };
                    let result = claim(&store, edge, planner.edge, 7, expected, MEMBERS_EPOCH);
                    claims.push((planner.edge, edge, result.is_ok()));
                    planner.claimed(edge, result);
                }
            }
            now += 100;
        }
        assert_eq!(claims.len(), 1, "one successor claims: {claims:?}");
        let (successor, dead, ok) = claims[0];
        assert!(ok && dead == 3);
        let other = if successor == 1 { 2 } else { 1 };
        assert_eq!(
            planners[other as usize - 1].server_of(3, now),
            Some(successor)
        );
        assert_eq!(
            planners[successor as usize - 1].server_of(3, now),
            Some(successor)
        );
        // The successor's commits for edge 3 pass; edge 3's own (older claim) are fenced.
        let taken = planners[successor as usize - 1]
            .guests()
            .next()
            .expect("a guest")
            .1;
        assert!(LeasedStore::new(&store[0], 3, taken).begin().is_ok());
        assert!(matches!(
            LeasedStore::new(&store[0], 3, leases[2]).begin(),
            Err(StoreError::Fenced)
        ));
        assert!(matches!(
            renew(&store, 3, leases[2], MEMBERS_EPOCH),
            Err(StoreError::Fenced)
        ));
        // Edge 3 restarts: its new claim fences the successor, which releases.
        let back = claim_own(&store, 3, 999, MEMBERS_EPOCH).expect("claim");
        assert!(matches!(
            LeasedStore::new(&store[0], 3, taken).begin(),
            Err(StoreError::Fenced)
        ));
        renew(&store, 3, back, MEMBERS_EPOCH).expect("renew");
        let planner = &mut planners[successor as usize - 1];
        observe_store(planner, &store, now);
        assert_eq!(
            planner.actions(now),
            vec![TakeoverAction::Release { edge: 3 }]
        );
        assert_eq!(planner.server_of(3, now), Some(3));
        assert!(planner.servers(now).is_empty());
    }

    /// The view says who serves a silent edge's users, and says so when no one does: between
    /// its death and a live edge's claim, and never for an edge it has not observed yet (it
    /// knows nothing of it, and sends each user home).
    #[test]
    fn the_servers_name_no_one_for_a_dead_edge_not_yet_claimed() {
        let store = joined([MemoryStore::new()]);
        let leases: Vec<Lease> = (1..=3)
            .map(|edge| {
                claim_own(&store, edge, 100 + u64::from(edge), MEMBERS_EPOCH).expect("claim")
            })
            .collect();
        let mut planner = Planner::new(1, &[1, 2, 3], TIMEOUT);
        assert!(
            planner.servers(0).is_empty(),
            "nothing observed: nothing said"
        );
        observe_store(&mut planner, &store, 0);
        assert!(
            planner.servers(0).is_empty(),
            "every edge serves its own users"
        );
        // Edge 3 falls silent; edge 2 beats on.
        let now = TIMEOUT + 100;
        renew(&store, 2, leases[1], MEMBERS_EPOCH).expect("renew");
        observe_store(&mut planner, &store, now);
        assert_eq!(planner.servers(now), BTreeMap::from([(3, None)]));
        // Edge 2 claims edge 3's users.
        let expected = observe_all(&store, &[3]).expect("read")[&3];
        claim(&store, 3, 2, 202, expected, MEMBERS_EPOCH).expect("claim");
        observe_store(&mut planner, &store, now + 100);
        assert_eq!(planner.servers(now + 100), BTreeMap::from([(3, Some(2))]));
    }

    /// Edges configured with different `[cluster]` lease timings: one beating every 500 ms is
    /// watched by one whose timeout is 1,000 ms. Before, the watcher took its users over
    /// whenever two of its beats were a little late, the slow edge's next beat was fenced and
    /// it exited. Now the watcher waits three of the slow edge's intervals, says so, and
    /// still takes over once the slow edge is silent that long.
    #[test]
    fn a_member_that_beats_slowly_is_judged_by_its_own_interval() {
        let store = joined([MemoryStore::new()]);
        let renew_ms = TIMEOUT / 2;
        let lease = claim_own(&store, 2, 22, MEMBERS_EPOCH).expect("claim");
        publish_renew_interval(&store, 2, renew_ms, true).expect("publish");
        claim_own(&store, 1, 11, MEMBERS_EPOCH).expect("claim");
        let mut planner = Planner::new(1, &[1, 2], TIMEOUT);
        // Every other beat is missed, and the next one is late (a busy store, a paused VM):
        // 1,100 ms between beats, past the watcher's timeout, within three intervals.
        let beat_every = 2 * renew_ms + 100;
        let mut last_beat = 0;
        for now in (0..10 * TIMEOUT).step_by(100) {
            if now % beat_every == 0 {
                renew(&store, 2, lease, MEMBERS_EPOCH).expect("renew");
                last_beat = now;
            }
            observe_store(&mut planner, &store, now);
            assert_eq!(
                planner.actions(now),
                vec![],
                "a live edge keeps its users ({now} ms)"
            );
        }
        assert_eq!(planner.slow_beaters(), vec![(2, renew_ms)]);
        // Silent from its last beat: taken over after three of its intervals, not sooner.
        let due = last_beat + 3 * renew_ms;
        for now in (10 * TIMEOUT..due).step_by(100) {
            observe_store(&mut planner, &store, now);
            assert_eq!(planner.actions(now), vec![], "{now} ms, due at {due}");
        }
        observe_store(&mut planner, &store, due);
        assert!(matches!(
            planner.actions(due)[..],
            [TakeoverAction::Claim { edge: 2, .. }]
        ));
    }

    #[test]
    fn a_claim_fails_when_the_edge_beat_since_it_was_judged_dead() {
        let store = joined([MemoryStore::new()]);
        let lease = claim_own(&store, 3, 1, MEMBERS_EPOCH).expect("claim");
        let seen = observe_all(&store, &[3]).expect("read")[&3];
        renew(&store, 3, lease, MEMBERS_EPOCH).expect("renew");
        assert_eq!(
            claim(&store, 3, 1, 2, seen, MEMBERS_EPOCH),
            Err(StoreError::Fenced)
        );
        assert!(LeasedStore::new(&store[0], 3, lease).begin().is_ok());
    }

    #[test]
    fn an_edge_that_never_started_is_taken_over_after_the_timeout() {
        let mut planner = Planner::new(1, &[1, 2], TIMEOUT);
        planner.observe(0, 2, Observed::default());
        assert!(planner.actions(TIMEOUT - 1).is_empty());
        let actions = planner.actions(TIMEOUT);
        assert_eq!(
            actions,
            vec![TakeoverAction::Claim {
                edge: 2,
                expected: Observed::default()
            }]
        );
        // Asked once until reported.
        assert!(planner.actions(TIMEOUT + 1).is_empty());
        planner.claimed(2, Err(StoreError::Conflict));
        assert_eq!(planner.actions(TIMEOUT + 2).len(), 1);
    }

    #[test]
    fn a_drained_edge_hands_its_users_to_its_successor_without_the_timeout() {
        let store = joined([MemoryStore::new()]);
        let lease = claim_own(&store, 1, 11, MEMBERS_EPOCH).expect("claim");
        let successor = claim_own(&store, 2, 22, MEMBERS_EPOCH).expect("claim");
        let mut draining = Planner::new(1, &[1, 2], TIMEOUT);
        let mut taker = Planner::new(2, &[1, 2], TIMEOUT);
        renew(&store, 2, successor, MEMBERS_EPOCH).expect("renew");
        for (edge, observed) in observe_all(&store, &[1, 2]).expect("read") {
            draining.observe(0, edge, observed);
        }
        assert_eq!(draining.drain_target(0), Some(2));
        hand_over(&store, 1, lease, 2, MEMBERS_EPOCH).expect("hand over");
        assert!(matches!(
            LeasedStore::new(&store[0], 1, lease).begin(),
            Err(StoreError::Fenced)
        ));
        for (edge, observed) in observe_all(&store, &[1, 2]).expect("read") {
            taker.observe(1, edge, observed);
        }
        let actions = taker.actions(1);
        let [TakeoverAction::Claim { edge: 1, expected }] = actions[..] else {
            panic!("the successor claims at once: {actions:?}");
        };
        let claimed = claim(&store, 1, 2, 22, expected, MEMBERS_EPOCH);
        assert!(claimed.is_ok());
        taker.claimed(1, claimed);
        assert_eq!(taker.server_of(1, 1), Some(2));
    }

    /// An edge with `cluster.takeover` off beats and counts as alive, but never claims
    /// anyone: a drain does not hand it the users, and a dead edge's users go to a successor
    /// that takes over. The non-taker here is the edge the rendezvous would pick, so before
    /// (when every live edge was a candidate) the drain went to it, and the other edge left
    /// the dead edge's users to it: served by no one, for good.
    #[test]
    fn an_edge_that_does_not_take_over_is_never_the_successor() {
        let store = joined([MemoryStore::new()]);
        let non_taker = home_edge(SUCCESSOR_SALT ^ 1, &[2, 3]);
        let taker = 5 - non_taker;
        claim_own(&store, 1, 11, MEMBERS_EPOCH).expect("claim");
        for (edge, takes_over) in [(taker, true), (non_taker, false)] {
            let own = claim_own(&store, edge, 20 + u64::from(edge), MEMBERS_EPOCH).expect("claim");
            publish_renew_interval(&store, edge, 100, takes_over).expect("publish");
            renew(&store, edge, own, MEMBERS_EPOCH).expect("renew");
        }
        let observed = observe_all(&store, &[1, 2, 3]).expect("read");
        assert_eq!(observed[&non_taker].takes_over, Some(false));
        assert_eq!(observed[&taker].takes_over, Some(true));
        assert_eq!(observed[&1].takes_over, None, "said nothing");
        let mut draining = Planner::new(1, &[1, 2, 3], TIMEOUT);
        draining.observe_round(0, observed.clone());
        assert_eq!(draining.drain_target(0), Some(taker));
        // Edge 1 dies instead: the taker claims its users once the timeout has passed,
        // though the non-taker is alive (its beat goes on).
        let mut successor = Planner::new(taker, &[1, 2, 3], TIMEOUT);
        let mut round = observed;
        for now in [0, TIMEOUT / 2, TIMEOUT] {
            round.get_mut(&non_taker).expect("observed").beat += 1;
            successor.observe_round(now, round.clone());
        }
        assert!(successor.alive(non_taker, TIMEOUT) && !successor.alive(1, TIMEOUT));
        let actions = successor.actions(TIMEOUT);
        assert!(
            matches!(actions[..], [TakeoverAction::Claim { edge: 1, .. }]),
            "the taker claims edge 1: {actions:?}"
        );
    }

    /// A dead edge's lease held by an edge restarted with `cluster.takeover` off: that edge
    /// beats, but serves no guests (its planner watches no one), so it is no one's server and
    /// the successor claims the lease from it. Before, every edge left the users to it, and
    /// they were served by no one until their own edge came back.
    #[test]
    fn a_lease_held_by_an_edge_that_stopped_taking_over_is_claimed_again() {
        let store = joined([MemoryStore::new()]);
        claim_own(&store, 3, 13, MEMBERS_EPOCH).expect("claim");
        let holder = claim_own(&store, 2, 12, MEMBERS_EPOCH).expect("claim");
        let seen = observe_all(&store, &[3]).expect("read")[&3];
        claim(&store, 3, 2, 12, seen, MEMBERS_EPOCH).expect("edge 2 claims edge 3");
        // Edge 2 restarts with takeover off and beats on.
        publish_renew_interval(&store, 2, 100, false).expect("publish");
        renew(&store, 2, holder, MEMBERS_EPOCH).expect("renew");
        let mut planner = Planner::new(1, &[1, 2, 3], TIMEOUT);
        let mut now = 0;
        let mut actions = Vec::new();
        while now <= TIMEOUT && actions.is_empty() {
            renew(&store, 2, holder, MEMBERS_EPOCH).expect("renew");
            planner.beat_result(now, true);
            planner.observe_round(now, observe_all(&store, &[1, 2, 3]).expect("read"));
            actions = planner.actions(now);
            now += TIMEOUT / 4;
        }
        assert!(planner.alive(2, now), "edge 2 beats on");
        assert!(
            matches!(actions[..], [TakeoverAction::Claim { edge: 3, .. }]),
            "edge 1 claims edge 3's users from the non-taker: {actions:?}"
        );
    }

    /// With several stores (FoundationDB clusters) each holds a copy of the lease: a claim
    /// cut short after the first store is finished by the next claim, and a late write of an
    /// older epoch never replaces a newer one.
    #[test]
    fn every_store_ends_with_the_latest_claim() {
        let stores = joined([MemoryStore::new(), MemoryStore::new()]);
        let passes = |lease: Lease| {
            stores
                .iter()
                .all(|store| LeasedStore::new(store, 3, lease).begin().is_ok())
        };
        let fenced_everywhere = |lease: Lease| {
            stores.iter().all(|store| {
                matches!(
                    LeasedStore::new(store, 3, lease).begin(),
                    Err(StoreError::Fenced)
                )
            })
        };
        let own = claim_own(&stores, 3, 1, MEMBERS_EPOCH).expect("claim");
        assert!(passes(own));
        let seen = observe_all(&stores, &[3]).expect("read")[&3];
        let taken = claim(&stores, 3, 1, 7, seen, MEMBERS_EPOCH).expect("claim");
        assert!(passes(taken) && fenced_everywhere(own));
        // A claimer that dies after the first store: the second still names the earlier one.
        let seen = observe_all(&stores, &[3]).expect("read")[&3];
        let partial = claim(&stores[..1], 3, 2, 8, seen, MEMBERS_EPOCH).expect("claim");
        assert!(LeasedStore::new(&stores[1], 3, taken).begin().is_ok());
        let seen = observe_all(&stores, &[3]).expect("read")[&3];
        let next = claim(&stores, 3, 1, 9, seen, MEMBERS_EPOCH).expect("claim");
        assert!(passes(next) && fenced_everywhere(partial) && fenced_everywhere(taken));
        // The edge comes back; a claimer still writing an older epoch cannot undo that.
        let back = claim_own(&stores, 3, 10, MEMBERS_EPOCH).expect("claim");
        assert_eq!(
            write_if_newer(&stores[1], 3, next, None),
            Err(StoreError::Fenced)
        );
        assert!(passes(back) && fenced_everywhere(next));
    }

    /// A store that took no writes for longer than the timeout, while reads went on, took no
    /// edge's beat. The first edge whose beat lands again must not judge the others dead by
    /// the beats they could not make (it claimed them all, and every other edge, fenced at
    /// its next beat, exited): the time the beats failed does not count. While its own beats
    /// fail an edge claims no one.
    #[test]
    fn after_a_write_outage_no_edge_claims_the_others_for_beats_that_could_not_land() {
        let store = joined([MemoryStore::new()]);
        let leases: Vec<Lease> = [1, 2, 3]
            .into_iter()
            .map(|edge| claim_own(&store, edge, 10 + u64::from(edge), MEMBERS_EPOCH).unwrap())
            .collect();
        let mut planner = Planner::new(1, &[1, 2, 3], TIMEOUT);
        planner.beat_result(0, true);
        planner.observe_round(0, observe_all(&store, &[1, 2, 3]).unwrap());
        // Writes fail for two timeouts: no edge's beat lands; edge 1 reads on.
        let mut now = 0;
        while now < 2 * TIMEOUT {
            now += TIMEOUT / 4;
            planner.beat_result(now, false);
            planner.observe_round(now, observe_all(&store, &[1, 2, 3]).unwrap());
            assert_eq!(planner.actions(now), vec![], "{now} ms: its own beat fails");
        }
        // Edge 1's beat lands first.
        now += TIMEOUT / 4;
        renew(&store, 1, leases[0], MEMBERS_EPOCH).unwrap();
        planner.beat_result(now, true);
        planner.observe_round(now, observe_all(&store, &[1, 2, 3]).unwrap());
        assert_eq!(
            planner.actions(now),
            vec![],
            "the outage does not count against the others"
        );
        // Edge 2 beats again; edge 3 stays silent and is claimed once it has stood still for
        // a timeout outside the outage, which counts from the start of edge 1's first beat
        // that failed (the quarter before it counts).
        renew(&store, 2, leases[1], MEMBERS_EPOCH).unwrap();
        let recovered = now;
        let mut claimed = Vec::new();
        while claimed.is_empty() {
            now += TIMEOUT / 4;
            renew(&store, 1, leases[0], MEMBERS_EPOCH).unwrap();
            if now < recovered + TIMEOUT / 2 {
                renew(&store, 2, leases[1], MEMBERS_EPOCH).unwrap();
            }
            planner.beat_result(now, true);
            planner.observe_round(now, observe_all(&store, &[1, 2, 3]).unwrap());
            claimed = planner.actions(now);
            assert!(now < recovered + 3 * TIMEOUT, "edge 3 never claimed");
        }
        assert!(
            now >= recovered + TIMEOUT - TIMEOUT / 4,
            "claimed at {now} ms, recovered at {recovered} ms"
        );
        assert!(
            claimed
                .iter()
                .all(|action| matches!(action, TakeoverAction::Claim { edge: 2 | 3, .. })),
            "{claimed:?}"
        );
    }

    /// A successor whose own beats fail now and then (one in four, or every other one) still
    /// claims a dead edge, about a timeout plus its failed beats after the death: a failed
    /// beat forgives only the time it took. Giving everyone a full timeout after each failed
    /// beat put the claim off for good; counting from the last beat that landed did too, for
    /// a beat failing every other time.
    #[test]
    fn a_successor_whose_beats_fail_now_and_then_still_claims_a_dead_edge() {
        for failing_every in [4, 2] {
            a_successor_whose_beats_fail_claims(failing_every);
        }
    }

    fn a_successor_whose_beats_fail_claims(failing_every: u64) {
        let store = joined([MemoryStore::new()]);
        let own = claim_own(&store, 1, 11, MEMBERS_EPOCH).unwrap();
        claim_own(&store, 2, 12, MEMBERS_EPOCH).unwrap();
        let mut planner = Planner::new(1, &[1, 2], TIMEOUT);
        let mut now = 0;
        let mut actions = Vec::new();
        for round in 0u64.. {
            let landed = round % failing_every != failing_every - 1;
            if landed {
                renew(&store, 1, own, MEMBERS_EPOCH).unwrap();
            }
            planner.beat_result(now, landed);
            planner.observe_round(now, observe_all(&store, &[1, 2]).unwrap());
            actions = planner.actions(now);
            if !actions.is_empty() {
                break;
            }
            assert!(now < 3 * TIMEOUT, "edge 2 never claimed");
            now += TIMEOUT / 8;
        }
        assert!(
            matches!(actions[..], [TakeoverAction::Claim { edge: 2, .. }]),
            "{actions:?}"
        );
        assert!(now >= TIMEOUT, "claimed at {now} ms");
    }

    /// One edge of a cluster runs the expiry passes: the lowest id alive. While it lives the
    /// others leave them to it; once it is judged dead the next one takes them up, and gives
    /// them back when it returns.
    #[test]
    fn the_lowest_live_member_runs_the_expiry_passes() {
        let store = joined([MemoryStore::new()]);
        let leases: Vec<Lease> = [1, 2, 3]
            .into_iter()
            .map(|edge| claim_own(&store, edge, 10 + u64::from(edge), MEMBERS_EPOCH).unwrap())
            .collect();
        let mut planners: Vec<Planner> = [1, 2, 3]
            .into_iter()
            .map(|edge| Planner::new(edge, &[1, 2, 3], TIMEOUT))
            .collect();
        let runners = |planners: &[Planner], now| -> Vec<EdgeId> {
            planners
                .iter()
                .filter(|planner| planner.runs_expiry(now))
                .map(|planner| planner.edge)
                .collect()
        };
        assert_eq!(
            runners(&planners, 0),
            vec![1, 2, 3],
            "before it saw anyone, each runs them (expiry is not held up)"
        );
        for planner in &mut planners {
            planner.observe_round(0, observe_all(&store, &[1, 2, 3]).unwrap());
        }
        assert_eq!(runners(&planners, 0), vec![1]);
        // Edge 1 stops beating; edges 2 and 3 beat on.
        for now in [TIMEOUT / 2, TIMEOUT, TIMEOUT + TIMEOUT / 2] {
            for (edge, lease) in [(2, leases[1]), (3, leases[2])] {
                renew(&store, edge, lease, MEMBERS_EPOCH).unwrap();
            }
            for planner in &mut planners[1..] {
                planner.observe_round(now, observe_all(&store, &[1, 2, 3]).unwrap());
            }
        }
        let later = TIMEOUT + TIMEOUT / 2;
        assert_eq!(runners(&planners[1..], later), vec![2]);
        // Edge 1 comes back with a new lease: edge 2 leaves the passes to it again.
        claim_own(&store, 1, 19, MEMBERS_EPOCH).unwrap();
        planners[1].observe_round(later + 1, observe_all(&store, &[1, 2, 3]).unwrap());
        assert!(!planners[1].runs_expiry(later + 1));
    }

    /// A claim whose result this edge lost (it landed, but the answer did not) is claimed
    /// again at once instead of waiting for the timeout; a fenced report about an earlier
    /// claim releases nothing; and after a gap in this edge's own observations nobody is
    /// judged dead before a full timeout of watching.
    #[test]
    fn lost_claims_stale_reports_and_gaps_in_watching() {
        let store = joined([MemoryStore::new()]);
        claim_own(&store, 2, 20, MEMBERS_EPOCH).expect("claim");
        let mut planner = Planner::new(1, &[1, 2], TIMEOUT);
        planner.observe_round(0, observe_all(&store, &[1, 2]).expect("read"));
        let actions = planner.actions(TIMEOUT);
        let [TakeoverAction::Claim { edge: 2, expected }] = actions[..] else {
            panic!("edge 2 never beat: {actions:?}");
        };
        let lost = claim(&store, 2, 1, 11, expected, MEMBERS_EPOCH).expect("claim");
        planner.claimed(2, Err(StoreError::CommitUnknown));
        planner.observe_round(TIMEOUT + 1, observe_all(&store, &[1, 2]).expect("read"));
        let actions = planner.actions(TIMEOUT + 1);
        let [TakeoverAction::Claim { edge: 2, expected }] = actions[..] else {
            panic!("its own lost claim is claimed again: {actions:?}");
        };
        let held = claim(&store, 2, 1, 11, expected, MEMBERS_EPOCH).expect("claim");
        planner.claimed(2, Ok(held));
        assert!(!planner.fenced(2, lost), "a report about the lost claim");
        assert_eq!(planner.server_of(2, TIMEOUT + 1), Some(1));
        // Edge 2 returns; then edge 1 stops watching for a while (a store outage).
        let back = claim_own(&store, 2, 21, MEMBERS_EPOCH).expect("claim");
        renew(&store, 2, back, MEMBERS_EPOCH).expect("renew");
        planner.observe_round(TIMEOUT + 2, observe_all(&store, &[1, 2]).expect("read"));
        assert_eq!(
            planner.actions(TIMEOUT + 2),
            vec![TakeoverAction::Release { edge: 2 }]
        );
        let later = 10 * TIMEOUT;
        planner.observe_round(later, observe_all(&store, &[1, 2]).expect("read"));
        assert!(
            planner.alive(2, later),
            "not judged on the beats it did not watch"
        );
        assert!(planner.actions(later).is_empty());
        assert!(
            !planner.actions(later + TIMEOUT).is_empty(),
            "silent for a full timeout"
        );
    }

    /// A committer reused under a new claim must not trust what it cached under the old one:
    /// another edge may have written the inbox in between.
    #[test]
    fn a_committer_forgets_its_cache_when_its_lease_changes() {
        use crate::commit::{Committer, Request, SendRequest};
        let store = joined([MemoryStore::new()]);
        let config = CoreConfig::default();
        let send = |client_id: u64| {
            [Request::Send(SendRequest {
                sender: 1,
                client_id,
                to: 7,
                body: b"x".to_vec(),
                ttl_secs: None,
            })]
        };
        let seq = |outcomes: Vec<Outcome>| match outcomes[0] {
            Outcome::Stored { seq, .. } => seq,
            other => panic!("not stored: {other:?}"),
        };
        let own = claim_own(&store, 3, 1, MEMBERS_EPOCH).expect("claim");
        let mut reused = Committer::new(&config);
        let leased = LeasedStore::new(&store[0], 3, own);
        assert_eq!(
            seq(reused.commit_batch(&leased, &send(1), 1).expect("commit")),
            1
        );
        // Another edge takes the users over and stores seq 2.
        let seen = observe_all(&store, &[3]).expect("read")[&3];
        let other = claim(&store, 3, 2, 9, seen, MEMBERS_EPOCH).expect("claim");
        let mut theirs = Committer::new(&config);
        let leased = LeasedStore::new(&store[0], 3, other);
        assert_eq!(
            seq(theirs.commit_batch(&leased, &send(2), 2).expect("commit")),
            2
        );
        // The first holder claims them back and commits with its old committer.
        let back = claim_own(&store, 3, 1, MEMBERS_EPOCH).expect("claim");
        let leased = LeasedStore::new(&store[0], 3, back);
        assert_eq!(
            seq(reused.commit_batch(&leased, &send(3), 3).expect("commit")),
            3
        );
    }

    #[test]
    fn lease_round_trips_and_rejects_other_lengths() {
        let lease = Lease {
            epoch: 9,
            holder: 4,
            owner: u64::MAX,
        };
        assert_eq!(Lease::decode(&lease.encode()), Ok(lease));
        assert!(Lease::decode(&[0; 19]).is_err());
    }
}
