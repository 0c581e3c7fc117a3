//! The thread that holds this edge's lease (takeover, decision 0015; membership, 0016).
//!
//! In a cluster on a shared store (FoundationDB) the edge joins the cluster's membership
//! (`courier_core::membership::join`) and claims its own lease at start, before any shard
//! commits, and every commit runs under it (`courier_core::takeover::LeasedStore`). This
//! thread then beats the lease every `cluster.lease_renew_ms`, reads every member's lease and
//! beat, and runs the sans-IO [`Planner`]. With `cluster.takeover` it claims a dead edge's
//! users when this edge is the successor, and releases them when their lease moves on.
//! Without takeover the planner only watches (`Planner::watching_only`): it claims nothing,
//! and learns who serves whom. The shards read the outcome (a
//! [`View`]) once per tick and apply it to their sessions: guests to serve, and which edges
//! serve whom.
//!
//! A beat refused as `Fenced` means another edge took this edge's users over (this edge
//! stalled longer than the timeout, or the network cut it off from the store), or an edge
//! joined with a later membership epoch: nothing it commits can land any more, and the process exits for its supervisor to restart it, as a
//! fenced shard does. A drain ([`Takeover::drain`]) hands every lease to the successor first.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use courier_core::membership::{self, Joined, Membership};
use courier_core::placement::EdgeId;
use courier_core::store::{Store, StoreError};
use courier_core::takeover::{self, Lease, Planner, TakeoverAction};
use tracing::{info, warn};

/// What the shards apply to their sessions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// Edges whose users this edge serves besides its own, with the lease to commit under.
    pub guests: BTreeMap<EdgeId, Lease>,
    /// Edges not serving their own users: home → serving edge, `None` while no one does.
    pub servers: BTreeMap<EdgeId, Option<EdgeId>>,
    /// Set by a drain: every lease went to this edge, and clients are redirected there.
    pub drained_to: Option<EdgeId>,
}

/// Where the edge's lease settings come from (`[cluster]`).
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub edge: EdgeId,
    /// `cluster.membership_epoch` and the members' ids.
    pub membership: Membership,
    /// Whether this edge takes dead edges' users over (`cluster.takeover`).
    pub takeover: bool,
    pub timeout_ms: u64,
    pub renew_ms: u64,
    /// A fenced beat ends the process (the edge); off, only the lease thread stops (tests,
    /// which must not end the test process).
    pub exit_when_fenced: bool,
}

enum Command {
    /// Hand every lease to the successor; answer with it (`None`: no other edge is alive).
    Drain(flume::Sender<Option<EdgeId>>),
    /// End the thread without handing anything over (the edge stopped, or crashed in a test).
    Stop,
    /// A shard's commit for this guest under this lease was fenced: stop serving it now.
    Fenced(EdgeId, Lease),
}

/// The lease thread's shared side.
#[derive(Debug)]
pub struct Takeover {
    view: Mutex<View>,
    /// Raised on every change of `view`, so shards copy it only when it changed.
    version: AtomicU64,
    commands: flume::Sender<Command>,
    /// Set before a drain hands the first lease over: from then on this edge's own commits
    /// may be fenced, which is expected and no reason to exit.
    handing_over: AtomicBool,
    /// Set when a beat was fenced and the thread stopped instead of ending the process
    /// (`LeaseSettings::exit_when_fenced` off): the shards stop as the process would.
    fenced_out: AtomicBool,
    /// Whether this edge runs the cluster's expiry passes ([`Planner::runs_expiry`]); every
    /// edge does until its first round of observations.
    runs_expiry: AtomicBool,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Drain(_) => f.write_str("Drain"),
            Command::Stop => f.write_str("Stop"),
            Command::Fenced(edge, lease) => write!(f, "Fenced({edge}, epoch {})", lease.epoch),
        }
    }
}

/// Start-up's store work, tried again while it fails retryably: on FoundationDB a join reads
/// every lease and beat, so any edge's beat during it is a conflict, and the first edge on a
/// new membership starts while the others still beat. Bounded: about 10 s in all.
fn retry_transient<T>(mut attempt: impl FnMut() -> Result<T, StoreError>) -> Result<T, StoreError> {
    let mut pause = Duration::from_millis(10);
    let mut tries = 1;
    loop {
        match attempt() {
            Ok(value) => return Ok(value),
            Err(error) if error.is_retryable() && tries < START_ATTEMPTS_MAX => {
                std::thread::sleep(pause.mul_f64(0.5 + rand::random::<f64>() / 2.0));
                pause = (pause * 2).min(Duration::from_secs(1));
                tries += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Attempts of a start-up transaction that conflicts (see [`retry_transient`]).
const START_ATTEMPTS_MAX: u32 = 20;

/// Commands the thread may hold unread: a fenced report per guest and a drain.
const COMMANDS_MAX: usize = 64;

/// The longest a drain waits for the successor to claim what it handed over (the server waits
/// for the drain's answer this long and more, `server::DRAIN_HANDOVER_WAIT`).
pub const DRAIN_CLAIM_WAIT: Duration = Duration::from_secs(3);

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drained {
    /// No other edge is alive, or this edge's lease could not be handed over: it keeps its
    /// users (and beats on), and its clients are closed.
    Kept,
    /// The leases went to this edge (which claimed them, or had its time to): clients are
    /// redirected there.
    Redirected(EdgeId),
}

impl Takeover {
    /// Joins the cluster's membership, claims this edge's own lease (fencing whoever served
    /// its users while it was down) and starts the lease thread. Returns the lease the edge's
    /// own commits run under.
    pub fn start<S: Store + 'static>(
        stores: Arc<Vec<S>>,
        settings: LeaseSettings,
        owner: u64,
    ) -> Result<(Arc<Takeover>, Lease), String> {
        let joined = retry_transient(|| match membership::join(&stores, &settings.membership) {
            Err(membership::JoinError::Store(error)) => Err(error),
            other => Ok(other),
        })
        .map_err(|e| format!("cannot join the cluster's membership in the store: {e}"))?;
        match joined {
            Ok(Joined::Same) => {}
            Ok(Joined::Changed { previous: None }) => {
                info!(membership = %settings.membership, "the cluster's first membership");
            }
            Ok(Joined::Changed {
                previous: Some(previous),
            }) => warn!(
                %previous,
                membership = %settings.membership,
                "the members changed: every edge still on the earlier ones is fenced and exits \
                 until it is restarted with this membership"
            ),
            Err(error) => return Err(error.to_string()),
        }
        // 0 marks a lease handed over and not yet claimed.
        let owner = owner.max(1);
        let epoch = settings.membership.epoch;
        let own = retry_transient(|| takeover::claim_own(&stores, settings.edge, owner, epoch))
            .map_err(|e| format!("cannot claim this edge's lease in the store: {e}"))?;
        // Before the first beat: an edge whose lease timeout is shorter than a few of this
        // edge's beats waits that many of them before judging it dead.
        retry_transient(|| {
            takeover::publish_renew_interval(
                &stores,
                settings.edge,
                settings.renew_ms,
                settings.takeover,
            )
        })
        .map_err(|e| {
            format!("cannot write this edge's renew interval and takeover in the store: {e}")
        })?;
        info!(
            edge = settings.edge,
            epoch = own.epoch,
            "claimed this edge's lease"
        );
        let (commands, receiver) = flume::bounded(COMMANDS_MAX);
        let shared = Arc::new(Takeover::new(commands));
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("lease".into())
            .spawn(move || {
                let planner = Planner::new(
                    settings.edge,
                    &settings.membership.members,
                    settings.timeout_ms,
                );
                LeaseThread {
                    // Without takeover the edge still watches: its clients' sends and logins
                    // for a dead or drained edge's users go to whoever serves them.
                    planner: if settings.takeover {
                        planner
                    } else {
                        planner.watching_only()
                    },
                    stores,
                    settings,
                    own,
                    owner,
                    shared: thread_shared,
                    started: Instant::now(),
                    slow_beaters_logged: Vec::new(),
                }
                .run(receiver)
            })
            .map_err(|e| format!("cannot start the lease thread: {e}"))?;
        Ok((shared, own))
    }

    /// The version of the view, raised on every change.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn view(&self) -> View {
        self.view
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Whether a drain is handing (or handed) the leases over: this edge's own commits may
    /// be fenced from then on, which is expected and no reason to exit.
    pub fn handed_over(&self) -> bool {
        self.handing_over.load(Ordering::Acquire)
    }

    /// Whether this edge's own lease was taken while the thread did not end the process: its
    /// shards must stop (a test's in-process edge).
    pub fn fenced_out(&self) -> bool {
        self.fenced_out.load(Ordering::Acquire)
    }

    /// Whether this edge runs the cluster's expiry passes now (one edge of the cluster does).
    pub fn runs_expiry(&self) -> bool {
        self.runs_expiry.load(Ordering::Acquire)
    }

    /// Ends the lease thread without handing anything over: its lease stops beating.
    pub fn stop(&self) {
        let _ = self
            .commands
            .send_timeout(Command::Stop, Duration::from_secs(1));
    }

    /// A shard's commit for `guest` under `lease` came back fenced: the thread stops serving
    /// it at once (unless it holds a later claim).
    pub fn fenced(&self, guest: EdgeId, lease: Lease) {
        // A full queue already carries reports enough; the next observation catches up.
        let _ = self.commands.try_send(Command::Fenced(guest, lease));
    }

    /// The shared side of a lease thread that reads `commands`.
    fn new(commands: flume::Sender<Command>) -> Takeover {
        Takeover {
            view: Mutex::new(View::default()),
            version: AtomicU64::new(0),
            commands,
            handing_over: AtomicBool::new(false),
            fenced_out: AtomicBool::new(false),
            runs_expiry: AtomicBool::new(true),
        }
    }

    /// Hands this edge's lease and its guests' to the successor, waiting at most `wait` in
    /// all (for room in the thread's commands and for its answer together), and returns it
    /// once it claimed them (or had its time to). `None`: no other edge is alive, the lease
    /// could not be handed over, or the thread did not answer; the edge's clients are then
    /// closed with `ShuttingDown`.
    pub fn drain(&self, wait: Duration) -> Option<EdgeId> {
        let deadline = Instant::now() + wait;
        let (reply, answer) = flume::bounded(1);
        self.commands
            .send_deadline(Command::Drain(reply), deadline)
            .ok()?;
        answer.recv_deadline(deadline).ok().flatten()
    }

    fn publish(&self, view: View) {
        let mut current = self
            .view
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if *current != view {
            *current = view;
            self.version.fetch_add(1, Ordering::Release);
        }
    }
}

struct LeaseThread<S> {
    /// One per FoundationDB cluster; each holds a copy of every lease.
    stores: Arc<Vec<S>>,
    settings: LeaseSettings,
    own: Lease,
    owner: u64,
    planner: Planner,
    shared: Arc<Takeover>,
    /// The planner's clock: this process's own, never compared with another machine's.
    started: Instant,
    /// The members last warned of for beating too slowly for this edge's timeout.
    slow_beaters_logged: Vec<(EdgeId, u64)>,
}

impl<S: Store> LeaseThread<S> {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn run(mut self, commands: flume::Receiver<Command>) {
        let renew = Duration::from_millis(self.settings.renew_ms);
        let mut next_tick = Instant::now();
        loop {
            match commands.recv_deadline(next_tick) {
                Ok(Command::Drain(reply)) => {
                    let drained = self.drain();
                    let _ = reply.send(match drained {
                        Drained::Redirected(target) => Some(target),
                        Drained::Kept => None,
                    });
                    if drained != Drained::Kept {
                        // The leases are gone: nothing to beat any more.
                        return;
                    }
                    continue;
                }
                Ok(Command::Fenced(guest, lease)) => {
                    if self.planner.fenced(guest, lease) {
                        warn!(guest, "a commit for a guest edge was fenced; releasing it");
                        // Who claimed it: without a look, the view still named this edge's
                        // stale lease until the next beat, and logins were turned away.
                        if let Ok(observed) = takeover::observe_all(&self.stores, &[guest]) {
                            let now = self.now_ms();
                            for (edge, observed) in observed {
                                self.planner.observe(now, edge, observed);
                            }
                        }
                        self.publish();
                    }
                    continue;
                }
                Ok(Command::Stop) | Err(flume::RecvTimeoutError::Disconnected) => return,
                Err(flume::RecvTimeoutError::Timeout) => {}
            }
            next_tick = Instant::now() + renew;
            if self.tick().is_err() {
                return;
            }
        }
    }

    /// Beats, observes, and acts on what the planner says. `Err` once this edge's own lease
    /// was taken (with `exit_when_fenced` off; on, the process has ended).
    fn tick(&mut self) -> Result<(), StoreError> {
        let edge = self.settings.edge;
        let epoch = self.settings.membership.epoch;
        // Before the store answers: a failed beat may take a whole transaction timeout, and
        // the planner counts the failure from the last beat that landed.
        let beat_at = self.now_ms();
        let renewed = match takeover::renew(&self.stores, edge, self.own, epoch) {
            Ok(()) => true,
            Err(StoreError::Fenced) => {
                match membership::read(&self.stores) {
                    Ok(Some(stored)) if stored.epoch != epoch => tracing::error!(
                        edge,
                        %stored,
                        "the cluster's members changed; exiting: restart this edge with the \
                         new [cluster] members and membership_epoch"
                    ),
                    _ => tracing::error!(
                        edge,
                        "another edge took this edge's users over (its lease beat stood still \
                         longer than cluster.lease_timeout_ms); exiting"
                    ),
                }
                if self.settings.exit_when_fenced {
                    std::process::exit(3);
                }
                self.shared.fenced_out.store(true, Ordering::Release);
                return Err(StoreError::Fenced);
            }
            // Transient: the next beat may pass, and the timeout is several beats long.
            Err(error) => {
                warn!(%error, "cannot beat this edge's lease");
                false
            }
        };
        self.planner.beat_result(beat_at, renewed);
        let observed = match takeover::observe_all(&self.stores, &self.settings.membership.members)
        {
            Ok(observed) => observed,
            Err(error) => {
                self.planner.round_failed();
                warn!(%error, "cannot read the edges' leases");
                return Ok(());
            }
        };
        let now = self.now_ms();
        self.planner.observe_round(now, observed);
        let slow_beaters = self.planner.slow_beaters();
        if slow_beaters != self.slow_beaters_logged {
            for (member, renew_ms) in &slow_beaters {
                warn!(
                    member,
                    renew_ms,
                    timeout_ms = self.settings.timeout_ms,
                    "a member beats too slowly for this edge's cluster.lease_timeout_ms: it is \
                     judged dead only after several of its beats, so its users wait longer \
                     for a takeover; give every edge the same [cluster] lease timings"
                );
            }
            self.slow_beaters_logged = slow_beaters;
        }
        // While this edge cannot beat, it may be the one cut off: the planner claims no one.
        for action in self.planner.actions(now) {
            match action {
                TakeoverAction::Claim {
                    edge: dead,
                    expected,
                } => {
                    let result =
                        takeover::claim(&self.stores, dead, edge, self.owner, expected, epoch);
                    match &result {
                        Ok(lease) => info!(
                            dead,
                            epoch = lease.epoch,
                            "took over the users of an edge that is dead or drained"
                        ),
                        Err(error) => info!(dead, %error, "another edge claimed a dead edge first"),
                    }
                    self.planner.claimed(dead, result);
                }
                TakeoverAction::Release { edge: guest } => {
                    info!(guest, "the users of a guest edge moved on; releasing them");
                }
            }
        }
        self.publish();
        Ok(())
    }

    fn drain(&mut self) -> Drained {
        let Some(target) = self.planner.drain_target(self.now_ms()) else {
            return Drained::Kept;
        };
        let epoch = self.settings.membership.epoch;
        // From the hand-over on, this edge's own commits are fenced: expected, no reason to exit.
        self.shared.handing_over.store(true, Ordering::Release);
        let own = self.settings.edge;
        if let Err(error) = self.hand_over_own(target) {
            // Not handed (a store error; or fenced, and then the next beat ends the process):
            // the edge keeps its users and closes its clients instead.
            warn!(%error, "cannot hand this edge's lease over; closing clients instead");
            self.shared.handing_over.store(false, Ordering::Release);
            return Drained::Kept;
        }
        info!(users_of = own, target, "handed a lease to the successor");
        let mut handed = vec![own];
        let guests: Vec<(EdgeId, Lease)> = self.planner.guests().collect();
        for (users_of, lease) in guests {
            match takeover::hand_over(&self.stores, users_of, lease, target, epoch) {
                Ok(()) => {
                    info!(users_of, target, "handed a lease to the successor");
                    handed.push(users_of);
                }
                // Fenced: someone claimed it first and serves them. Otherwise the
                // successor takes them over after the timeout instead.
                Err(error) => warn!(users_of, %error, "cannot hand a lease over"),
            }
        }
        // The successor claims at its next beat; clients redirected before that would be sent
        // back here. Bounded: a successor that does not claim in time (it is draining too, or
        // cut off) gets the clients anyway, and they come back through their first address.
        let claim_wait = Duration::from_millis(3 * self.settings.renew_ms).min(DRAIN_CLAIM_WAIT);
        let deadline = Instant::now() + claim_wait;
        loop {
            match takeover::observe_all(&self.stores, &handed) {
                Ok(observed) if takeover::taken_up(&observed) => break,
                Ok(_) | Err(_) if Instant::now() >= deadline => {
                    warn!(
                        target,
                        "the successor did not claim the handed leases in time; redirecting \
                         the clients there anyway"
                    );
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        // The guests go with the rest: their clients are redirected to the target too.
        let mut view = self.view();
        for (guest, _) in std::mem::take(&mut view.guests) {
            view.servers.insert(guest, Some(target));
        }
        view.drained_to = Some(target);
        self.shared.publish(view);
        Drained::Redirected(target)
    }

    /// Hands this edge's own lease to `target`, trying again on a conflict. An error whose
    /// write landed anyway (an unknown commit result; with several clusters, a later one
    /// failing after the first was written) counts as handed: the first store decides.
    fn hand_over_own(&self, target: EdgeId) -> Result<(), StoreError> {
        let (own, epoch) = (self.settings.edge, self.settings.membership.epoch);
        let handed = |lease: Lease| {
            lease.holder == target && lease.is_handed_over() && lease.epoch == self.own.epoch + 1
        };
        let mut attempts = 0;
        loop {
            attempts += 1;
            let Err(error) = takeover::hand_over(&self.stores, own, self.own, target, epoch) else {
                return Ok(());
            };
            let landed = takeover::observe_all(&self.stores, &[own])
                .ok()
                .and_then(|observed| observed.get(&own)?.lease)
                .is_some_and(handed);
            if landed {
                return Ok(());
            }
            if !error.is_retryable() || attempts >= 3 {
                return Err(error);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn view(&self) -> View {
        let now = self.now_ms();
        View {
            guests: self.planner.guests().collect(),
            servers: self.planner.servers(now),
            drained_to: None,
        }
    }

    fn publish(&self) {
        self.shared.publish(self.view());
        let runs_expiry = self.planner.runs_expiry(self.now_ms());
        self.shared
            .runs_expiry
            .store(runs_expiry, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_core::store::memory::MemoryStore;

    fn settings(edge: EdgeId) -> LeaseSettings {
        LeaseSettings {
            edge,
            membership: Membership::new(1, &[1, 2]),
            takeover: true,
            // Long next to the beat, so a busy test machine does not stall a thread into being
            // taken over (which would stop that edge's lease thread and fail the test).
            timeout_ms: 1_500,
            renew_ms: 20,
            exit_when_fenced: false,
        }
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `drain(wait)` waits at most `wait` in all: a lease thread that takes the command late
    /// and then never answers (stuck in a store call) does not get a second `wait` for its
    /// answer. Before, the two waits added up: a stop took up to twice the documented time.
    #[test]
    fn a_drain_waits_at_most_its_wait_in_all() {
        let (commands, receiver) = flume::bounded(1);
        let takeover = Takeover::new(commands);
        // Full, so the drain's command waits for room.
        takeover.commands.send(Command::Stop).expect("room for one");
        let wait = Duration::from_millis(1_000);
        let stuck = std::thread::spawn(move || {
            // Takes the first command most of the way into the wait, then the drain, and
            // holds its reply without answering until the drain gave up.
            std::thread::sleep(wait.mul_f64(0.9));
            let _stop = receiver.recv().expect("the first command");
            let drain = receiver.recv().expect("the drain");
            std::thread::sleep(wait * 2);
            drop(drain);
        });
        let started = Instant::now();
        assert_eq!(takeover.drain(wait), None);
        let took = started.elapsed();
        // Generous for a busy machine; the old code took at least 1.9 × `wait` here.
        assert!(
            took < wait.mul_f64(1.6),
            "the drain took {took:?} for a wait of {wait:?}"
        );
        stuck.join().expect("the stuck thread");
    }

    /// The lease threads of two edges on one store: a drained edge's users go to the other
    /// at once, and its own commits are fenced from then on.
    #[test]
    fn a_drain_hands_the_users_to_the_other_edge() {
        let store = Arc::new(vec![MemoryStore::new()]);
        let (one, lease_one) = Takeover::start(Arc::clone(&store), settings(1), 11).expect("1");
        let (two, _) = Takeover::start(Arc::clone(&store), settings(2), 22).expect("2");
        // Until edge 1 has read edge 2's lease it knows no one to drain to.
        wait_for("a drain to find edge 2", || {
            one.drain(Duration::from_secs(5)) == Some(2)
        });
        assert!(one.handed_over());
        let fenced = takeover::LeasedStore::new(&store[0], 1, lease_one);
        assert!(matches!(
            courier_core::store::Store::begin(&fenced),
            Err(StoreError::Fenced)
        ));
        wait_for("edge 2 to serve edge 1's users", || {
            two.view().guests.contains_key(&1)
        });
        let (_, lease) = two.view().guests.into_iter().next().expect("a guest");
        assert_eq!(lease.holder, 2);
    }

    /// An edge with `cluster.takeover` off claims no one but watches: it learns who serves a
    /// dead edge's users, so its clients' sends and logins for them go there. Before, it
    /// never read the leases, and sent them to the dead edge until it came back.
    #[test]
    fn an_edge_that_does_not_take_over_learns_who_serves_a_dead_edge() {
        let store = Arc::new(vec![MemoryStore::new()]);
        let three_members = |edge| LeaseSettings {
            membership: Membership::new(1, &[1, 2, 3]),
            ..settings(edge)
        };
        let (one, _) = Takeover::start(Arc::clone(&store), three_members(1), 11).expect("1");
        let mut off = three_members(2);
        off.takeover = false;
        let (two, _) = Takeover::start(Arc::clone(&store), off, 22).expect("2");
        // Edge 3 claims its lease once and never beats: as if it died at once.
        takeover::claim_own(&store, 3, 33, 1).expect("claim");
        wait_for("edge 1 to take edge 3 over", || {
            one.view().guests.contains_key(&3)
        });
        wait_for("edge 2 to learn that edge 1 serves edge 3's users", || {
            two.view().servers.get(&3) == Some(&Some(1))
        });
        assert!(two.view().guests.is_empty(), "edge 2 claims no one");
        assert!(
            one.runs_expiry() && !two.runs_expiry(),
            "one runner of the passes"
        );
        one.stop();
        two.stop();
    }

    /// An edge with `cluster.takeover` off is no drain target: it would never claim the
    /// users, and every other edge would leave them to it. Before, edge 1 handed them to
    /// edge 2 all the same, and they were served by no one until edge 1 came back.
    #[test]
    fn a_drain_hands_no_users_to_an_edge_that_does_not_take_over() {
        let store = Arc::new(vec![MemoryStore::new()]);
        let (one, _) = Takeover::start(Arc::clone(&store), settings(1), 11).expect("1");
        let mut off = settings(2);
        off.takeover = false;
        let (two, _) = Takeover::start(Arc::clone(&store), off, 22).expect("2");
        // Edge 1 reads edge 2's lease, beat and settings within a few of its beats (20 ms).
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(one.drain(Duration::from_secs(5)), None);
        assert!(!one.handed_over());
        two.stop();
    }

    /// A start whose join and claim conflict (on FoundationDB, every beat of another edge
    /// during the join is one) tries again instead of refusing to start; a stale config is
    /// refused at once, with what to change.
    #[test]
    fn start_retries_conflicts_and_refuses_a_stale_membership() {
        use courier_core::store::fault::{FaultRates, FaultStore};
        let rates = FaultRates {
            conflict_per_million: 700_000,
            ..FaultRates::default()
        };
        let store = Arc::new(vec![FaultStore::new(MemoryStore::new(), rates, 7)]);
        let (one, _) = Takeover::start(Arc::clone(&store), settings(1), 11).expect("started");
        assert!(store[0].counts.conflicts.load(Ordering::Relaxed) > 0);
        one.stop();
        store[0].set_rates(FaultRates::default());
        let mut later = settings(2);
        later.membership = Membership::new(2, &[1, 2]);
        let (two, _) = Takeover::start(Arc::clone(&store), later, 22).expect("epoch 2");
        let error = Takeover::start(Arc::clone(&store), settings(1), 12).unwrap_err();
        assert!(error.contains("membership_epoch"), "{error}");
        two.stop();
    }

    /// An edge that stops beating is taken over after the timeout; when it starts again it
    /// claims its users back and the other edge releases them. The cluster's expiry passes
    /// go the same way: edge 2 runs them while edge 1 is dead, and leaves them to edge 1,
    /// the lower id, once it is back.
    #[test]
    fn a_silent_edge_is_taken_over_and_given_back() {
        let store = Arc::new(vec![MemoryStore::new()]);
        let (two, _) = Takeover::start(Arc::clone(&store), settings(2), 22).expect("2");
        // Edge 1 claims its lease once and never beats: as if it died at once.
        membership::join(&store, &Membership::new(1, &[1, 2])).expect("join");
        takeover::claim_own(&store, 1, 11, 1).expect("claim");
        wait_for("edge 2 to take edge 1 over", || {
            two.view().guests.contains_key(&1)
        });
        assert!(
            two.runs_expiry(),
            "the only live edge runs the expiry passes"
        );
        let (one, _) = Takeover::start(Arc::clone(&store), settings(1), 12).expect("1");
        wait_for("edge 2 to give edge 1 back", || {
            two.view().guests.is_empty() && two.view().servers.is_empty()
        });
        wait_for("edge 2 to leave the expiry passes to edge 1", || {
            !two.runs_expiry()
        });
        assert!(one.runs_expiry());
    }
}
