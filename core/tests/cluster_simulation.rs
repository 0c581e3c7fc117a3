//! Deterministic simulation of a cluster of edges (issue 13): several edges, each with its own
//! shards and its own stores (the embedded mode: one per shard, each holding the inboxes homed
//! on its shard; a shard reads the others' but writes only its own), linked shard to edge,
//! driven through the real `EdgeSession` (placement, redirects, forwarding over links, link
//! failure) and the real `Committer`, with the client's real `ClientSession`.
//!
//! Clients connect to a random edge; the edge redirects each to its user's home edge, and the
//! client follows `Goaway { reconnect_to }` as the SDK does. Sends to users of other edges go
//! over this shard's link to that edge. In the chaotic phase links break (the requests and
//! answers on them are lost), edges crash and restart on their stores, and connections die.
//! Then a calm phase must converge, and the checker asserts R2 across edges: every message a
//! server acknowledged reached its recipient exactly once, in inbox order, at the acknowledged
//! seq; nothing was stored twice.
//!
//! Half the seeds run the edges on shared stores instead (one or two, as FoundationDB
//! clusters, each holding a copy of every lease), with takeover (decision 0015): each edge
//! claims its own lease at start and beats it; a crashed edge stays down for a while (or a
//! live one stalls, missing its beats), and its successor claims its lease, serves its users
//! and forwarded sends for them, and gives them back when the edge returns and claims its
//! lease again. Every commit runs under a lease (`LeasedStore`), so an edge whose lease was
//! taken is fenced, and exits (here: crashes). A quarter of those seeds run without takeover
//! (`cluster.takeover` off): leases and beats as before, so membership changes still fence,
//! but no edge serves another's users.
//!
//! In half of the shared-store seeds the operator also changes the members mid-run (decision
//! 0016): an edge is added, and maybe another removed, one edge at a time in random order,
//! while the rest still run on the old members. The first edge on the new members fences the
//! others through the membership epoch; an edge restarted on the old config is refused until
//! its config is updated.
//!
//! Expiry runs as on the edges: on its own stores every shard passes over its own; on shared
//! stores shard 0 of the edge that runs it (the lowest live member in its planner's view) makes
//! passes over every store, every shard lists a page of the inboxes the passes recorded as
//! emptied, and an inbox's home shard forgets it on the edge serving its users: its home
//! edge, or a guest that took over its lease (decision 0011). Some sends
//! carry a TTL of 1 to 3 s: such a message may expire into a hole declared to its recipient,
//! and a hole may cover nothing else. After the run, time moves past the retention, and expiry
//! must leave no message, counter, expiry entry, dedupe or emptied-inbox record in any store
//! (R4).
//!
//! The single-edge simulation (`simulation.rs`) covers what happens inside one edge (store
//! faults, clock steps, abuse limits, several devices); this one covers what crosses edges.
//! `SIM_SEED=<n>` replays one seed; `SIM_SEEDS=<count>` sets how many run (default 500).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;

mod common;
use common::{SimAuth, dump_prefix};

use courier_core::commit::{self, Committer};
use courier_core::keys;
use courier_core::membership::{self, JoinError, Joined, Membership};
use courier_core::placement::{EdgeId, cluster_of, home_edge, home_shard};
use courier_core::rng::Rng;
use courier_core::session::{
    ClusterView, ConnRef, EdgeMember, EdgeSession, Effect, SessionConfig, ShardMessage,
};
use courier_core::shard::Batch;
use courier_core::store::StoreError;
use courier_core::store::clusters::{commit_batch_split, inbox_of};
use courier_core::store::memory::MemoryStore;
use courier_core::takeover::{
    self, GuestCommit, Lease, LeasedStore, Planner, ShardGuests, TakeoverAction,
};
use courier_core::{CoreConfig, UnixMillis, UserId};
use courier_protocol::client::{ClientConfig, ClientEvent, ClientSession, SessionError};
use courier_protocol::link::LinkFrame;
use courier_protocol::{ErrorCode, Frame};

const SEEDS_DEFAULT: u64 = 500;
const CHAOS_STEPS: usize = 2_000;
const DRAIN_STEPS_MAX: usize = 50_000;
const IDLE_TIMEOUT_MS: u64 = 300;
/// Takeover seeds: an edge whose beat stood still this long is dead to the others.
const LEASE_TIMEOUT_MS: u64 = 300;
const RENEW_MS: u64 = 50;
/// Seeds with mixed `[cluster]` lease timings: some edges beat this slowly (with a timeout of
/// three beats), slower than the others' timeout. Each edge judges another by that edge's
/// published interval too, so a slow beater is never taken over while it beats.
const SLOW_RENEW_MS: u64 = 400;
/// Passes one expiry turn makes at most while each has more to do (the edge loops until done).
const EXPIRY_PASSES_PER_TURN_MAX: usize = 64;

#[test]
fn cluster_simulation_over_many_seeds() {
    let Some((seeds, results)) = common::run_seeds("cluster simulation", SEEDS_DEFAULT, run_seed)
    else {
        return;
    };
    let mut total = Stats::default();
    for stats in &results {
        total.add(stats);
    }
    eprintln!("cluster simulation: {seeds} seeds, {total:?}");
    // A simulation that stopped crossing edges, or stopped breaking links, proves nothing.
    if seeds >= 100 {
        assert!(total.messages_acked > 5_000, "too few messages: {total:?}");
        assert!(
            total.redirects > 0 && total.forwarded_sends > 0 && total.forwarded_signals > 0,
            "{total:?}"
        );
        assert!(
            total.link_failures > 0 && total.refused_link_down > 0 && total.edge_crashes > 0,
            "{total:?}"
        );
        assert!(
            total.duplicate_sends > 0,
            "no retry was deduplicated: {total:?}"
        );
        assert!(
            total.takeovers > 0 && total.takeovers_given_back > 0 && total.guest_commits > 0,
            "no takeover served a dead edge's users: {total:?}"
        );
        assert!(total.fenced > 0, "no stale holder was fenced: {total:?}");
        assert!(total.drains > 0, "no edge was drained: {total:?}");
        assert!(
            total.slow_beaters > 0,
            "no seed mixed lease timings: {total:?}"
        );
        assert!(
            total.released_in_flight > 0,
            "no guest was released with a batch in flight: {total:?}"
        );
        assert!(
            total.membership_changes > 0 && total.stale_joins > 0,
            "no rolling change of the members fenced an edge on the old ones: {total:?}"
        );
        assert!(
            total.expired > 0 && total.expired_in_holes > 0,
            "no message expired into a declared hole: {total:?}"
        );
        assert!(
            total.forgets_queued > 0,
            "expiry emptied no inbox that its home shard forgot: {total:?}"
        );
        assert!(
            total.guest_forgets_queued > 0,
            "no edge forgot an inbox of another edge's it served as a guest: {total:?}"
        );
    }
}

#[derive(Debug, Default, Clone)]
struct Stats {
    messages_acked: u64,
    /// Connections the edge sent to the user's home edge.
    redirects: u64,
    forwarded_sends: u64,
    forwarded_signals: u64,
    link_failures: u64,
    /// `SendError { ShardUnavailable }` written to clients: a link down, or failed under them.
    refused_link_down: u64,
    edge_crashes: u64,
    disconnects: u64,
    /// Sends answered from the dedupe record instead of being stored again.
    duplicate_sends: u64,
    /// Leases of dead edges claimed by a successor, and given back (released).
    takeovers: u64,
    takeovers_given_back: u64,
    /// Batches a successor committed for a dead edge's users.
    guest_commits: u64,
    /// Commits or beats refused because another edge claimed the lease since.
    fenced: u64,
    /// Edges drained: leases handed to a successor, clients redirected there.
    drains: u64,
    /// Guest commit results that came back after the guest was released.
    released_in_flight: u64,
    /// Joins that brought in a new membership (fencing every edge on the old one), and
    /// starts refused because the edge's config had the old members.
    membership_changes: u64,
    stale_joins: u64,
    /// Edges that beat more slowly than the others' lease timeout (mixed `[cluster]` timings).
    slow_beaters: u64,
    /// Messages expiry deleted, and acknowledged ones a recipient never got because they
    /// expired into a hole declared to it.
    expired: u64,
    expired_in_holes: u64,
    /// Forgets of emptied inboxes queued on their home shard, during the run.
    forgets_queued: u64,
    /// Of those, forgets queued on a guest's queue: another edge's users this edge served.
    guest_forgets_queued: u64,
}

impl Stats {
    fn add(&mut self, other: &Stats) {
        self.messages_acked += other.messages_acked;
        self.redirects += other.redirects;
        self.forwarded_sends += other.forwarded_sends;
        self.forwarded_signals += other.forwarded_signals;
        self.link_failures += other.link_failures;
        self.refused_link_down += other.refused_link_down;
        self.edge_crashes += other.edge_crashes;
        self.disconnects += other.disconnects;
        self.duplicate_sends += other.duplicate_sends;
        self.takeovers += other.takeovers;
        self.takeovers_given_back += other.takeovers_given_back;
        self.guest_commits += other.guest_commits;
        self.fenced += other.fenced;
        self.drains += other.drains;
        self.released_in_flight += other.released_in_flight;
        self.membership_changes += other.membership_changes;
        self.stale_joins += other.stale_joins;
        self.slow_beaters += other.slow_beaters;
        self.expired += other.expired;
        self.expired_in_holes += other.expired_in_holes;
        self.forgets_queued += other.forgets_queued;
        self.guest_forgets_queued += other.guest_forgets_queued;
    }
}

/// Commits `batch` over the stores (one transaction per store it touches), each checking its
/// copy of `edge`'s lease, as the edge's FoundationDB backend does.
fn commit_leased(
    committer: &mut Committer,
    stores: &[MemoryStore],
    edge: EdgeId,
    lease: Lease,
    batch: &Batch<ConnRef>,
    now: UnixMillis,
) -> Result<Vec<commit::Outcome>, StoreError> {
    let leased: Vec<LeasedStore<'_, MemoryStore>> = stores
        .iter()
        .map(|store| LeasedStore::new(store, edge, lease))
        .collect();
    commit_batch_split(committer, &leased, &batch.requests, now)
}

/// Sends of a commit answered from the dedupe record instead of being stored again.
fn duplicates_in(result: &Result<Vec<commit::Outcome>, StoreError>) -> u64 {
    result.as_ref().map_or(0, |outcomes| {
        outcomes
            .iter()
            .filter(|o| matches!(o, commit::Outcome::Stored { fresh: false, .. }))
            .count() as u64
    })
}

/// Notes the seq each stored send of `batch` got, with when it expires (a TTL's; `None`:
/// kept until acknowledged), for the checker. A retry answered from the dedupe record keeps
/// the first commit's time.
fn record_assigned(
    assigned: &mut HashMap<(UserId, u64), Option<UnixMillis>>,
    batch: &Batch<ConnRef>,
    result: &Result<Vec<commit::Outcome>, StoreError>,
    now: UnixMillis,
) {
    let Ok(outcomes) = result else {
        return;
    };
    for (request, outcome) in batch.requests.iter().zip(outcomes) {
        if let (commit::Request::Send(send), commit::Outcome::Stored { seq, .. }) =
            (request, outcome)
        {
            let expire_at = send.ttl_secs.map(|ttl| now + u64::from(ttl) * 1_000);
            assigned.entry((send.to, *seq)).or_insert(expire_at);
        }
    }
}

fn run_seed(seed: u64) -> Result<Stats, String> {
    World::new(seed).run()
}

/// The address a redirect names for an edge, and back.
fn address_of(edge: EdgeId) -> String {
    format!("edge-{edge}")
}

#[derive(Debug)]
enum Packet {
    ToEdge {
        edge: usize,
        conn: ConnRef,
        frame: Frame,
    },
    ToClient {
        client: usize,
        conn: ConnRef,
        frame: Frame,
    },
    Closed {
        client: usize,
        conn: ConnRef,
    },
    Mesh {
        edge: usize,
        shard: u8,
        message: ShardMessage,
    },
    /// On a link, from the shard that opened it to the shard it landed on.
    LinkRequest {
        link: u64,
        frame: LinkFrame,
    },
    /// On a link, back to the shard that opened it.
    LinkAnswer {
        link: u64,
        frame: LinkFrame,
    },
    ReadDone {
        edge: usize,
        shard: u8,
        conn: ConnRef,
        after_seq: u64,
        result: Result<commit::InboxPage, StoreError>,
    },
    IdleTimeout {
        edge: usize,
        conn: ConnRef,
    },
    /// A guest's batch committed (or refused) on the store thread, its result on the way
    /// back to the shard: meanwhile the guest may be released, or served again.
    GuestCommitDone {
        edge: usize,
        shard: u8,
        commit: Box<GuestCommit>,
        result: Result<Vec<commit::Outcome>, StoreError>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Lane {
    Up(usize),
    Down(usize),
    Mesh(usize, u8),
    LinkRequest(u64),
    LinkAnswer(u64),
    Local(usize),
    GuestCommit(usize, u8),
}

impl Packet {
    fn lane(&self) -> Lane {
        match self {
            Packet::ToEdge { conn, .. } => Lane::Up(conn.slot),
            Packet::ToClient { conn, .. } | Packet::Closed { conn, .. } => Lane::Down(conn.slot),
            Packet::Mesh { edge, shard, .. } => Lane::Mesh(*edge, *shard),
            Packet::LinkRequest { link, .. } => Lane::LinkRequest(*link),
            Packet::LinkAnswer { link, .. } => Lane::LinkAnswer(*link),
            Packet::ReadDone { conn, .. } | Packet::IdleTimeout { conn, .. } => {
                Lane::Local(conn.slot)
            }
            Packet::GuestCommitDone { edge, shard, .. } => Lane::GuestCommit(*edge, *shard),
        }
    }

    /// Whether the packet lives in the process of edge `edge` (lost when it crashes).
    fn touches_edge(&self, edge: usize, world: &World) -> bool {
        match self {
            Packet::ToEdge { edge: e, .. }
            | Packet::Mesh { edge: e, .. }
            | Packet::ReadDone { edge: e, .. }
            | Packet::IdleTimeout { edge: e, .. }
            | Packet::GuestCommitDone { edge: e, .. } => *e == edge,
            Packet::ToClient { conn, .. } | Packet::Closed { conn, .. } => {
                world.slot_edge.get(&conn.slot) == Some(&edge)
            }
            Packet::LinkRequest { link, .. } | Packet::LinkAnswer { link, .. } => world
                .links
                .get(link)
                .is_none_or(|l| l.from_edge == edge || l.to_edge == edge),
        }
    }
}

/// One edge process: its shards and its store (its own, or the one all edges share).
/// While the edge is down, `shards` is empty.
struct Edge {
    id: EdgeId,
    /// The members in its config file (the operator changes it), and those its process
    /// started with (what it places users by, and the epoch its lease changes carry).
    config: Membership,
    running: Membership,
    /// Shared-store seeds: one store per FoundationDB cluster stand-in, inboxes spread over
    /// them (`cluster_of`). Otherwise the edge's embedded stores, one per shard, each holding
    /// the inboxes homed on its shard (`home_shard`), as `data_dir/stores/shard-N` does.
    stores: Rc<Vec<MemoryStore>>,
    /// Whether `stores` are the edge's own, one per shard (decision 0008).
    per_shard_stores: bool,
    shards: Vec<EdgeSession<SimAuth>>,
    committers: Vec<Committer>,
    /// Takeover seeds: the lease this process claimed at start, its view of the others, and
    /// each shard's guests (`ShardGuests`, as in the edge).
    lease: Option<Lease>,
    planner: Option<Planner>,
    guests: Vec<ShardGuests>,
    next_beat_at: UnixMillis,
    /// Its `[cluster]` lease timings: `lease_renew_ms`, `lease_timeout_ms`.
    renew_ms: u64,
    lease_timeout_ms: u64,
    /// When its last beat went through.
    last_beat_at: UnixMillis,
    /// This process's owner id, which its claims carry.
    owner: u64,
    /// Down until then (takeover seeds: a crashed edge stays down a while).
    down_until: Option<UnixMillis>,
    /// Misses its beats until then, while serving on (a stall: a long pause, a slow store).
    stalled_until: UnixMillis,
    /// Draining: its leases were handed to this successor, which has until the deadline to
    /// claim them before the clients are redirected there (`takeover::taken_up`).
    handing_over: Option<(EdgeId, Vec<EdgeId>, UnixMillis)>,
    /// Draining: its leases are handed over and its clients redirected; its process exits
    /// then (time for the `Goaway`s to leave).
    exits_at: Option<UnixMillis>,
    /// Per shard, per store: where its listing of the emptied inboxes goes on.
    expiry_state: Vec<commit::SharedExpiry>,
    /// What its lease thread last published: whether this edge runs the expiry passes
    /// (`Planner::runs_expiry`); true until its first round.
    runs_expiry: bool,
}

impl Edge {
    /// The store that holds `inbox`'s keys: its home shard's own, or its cluster's.
    fn store_of(&self, inbox: UserId) -> &MemoryStore {
        let count = self.stores.len() as u32;
        let at = if self.per_shard_stores {
            home_shard(inbox, count)
        } else {
            cluster_of(inbox, count)
        };
        &self.stores[at as usize]
    }
}

/// A link that is up: opened by (from_edge, from_shard), landed on (to_edge, to_shard).
#[derive(Debug, Clone, Copy)]
struct Link {
    from_edge: usize,
    from_shard: u8,
    to_edge: usize,
    to_shard: u8,
}

#[derive(Debug)]
struct Client {
    user: UserId,
    session: ClientSession,
    conn: Option<ConnRef>,
    /// The edge it connects to next: a random one at first, then where it was redirected.
    target_edge: usize,
    reconnect_at: UnixMillis,
    /// Still to send: (client id, recipient index, TTL).
    planned: VecDeque<(u64, usize, Option<u32>)>,
    /// Sent and not answered: client id → recipient.
    outbox: BTreeMap<u64, UserId>,
    /// Answered: client id → (recipient, seq).
    acked: HashMap<u64, (UserId, u64)>,
    /// Deliveries the application took, in order: (seq, from, body).
    received: Vec<(u64, UserId, Vec<u8>)>,
    /// Holes the edge declared to it (expired messages): (after seq, up to seq, when).
    holes: Vec<(u64, u64, UnixMillis)>,
    linked_after: Option<u64>,
}

struct World {
    rng: Rng,
    now: UnixMillis,
    config: CoreConfig,
    session_config: SessionConfig,
    edges: Vec<Edge>,
    /// Every edge's id, members or not (a spare one may join, a member may be removed).
    edge_ids: Vec<EdgeId>,
    /// The members the operator wants: every config ends with them.
    members: Membership,
    /// When the operator changes the members (seeds with a spare edge), and the edges whose
    /// config is updated (then restarted) at which time.
    change_members_at: Option<UnixMillis>,
    rollout: Vec<(UnixMillis, usize)>,
    /// Links up, by id; a packet on a link that is gone is lost.
    links: HashMap<u64, Link>,
    /// Per (edge, shard, peer edge): the link up, or when to open one again.
    out_links: BTreeMap<(usize, u8, usize), Result<u64, UnixMillis>>,
    next_link: u64,
    clients: Vec<Client>,
    slot_owner: HashMap<usize, usize>,
    slot_edge: HashMap<usize, usize>,
    next_slot: usize,
    network: BTreeMap<(UnixMillis, u64), Packet>,
    lane_clock: HashMap<Lane, UnixMillis>,
    packet_counter: u64,
    link_fail_per_thousand: u64,
    crash_per_thousand: u64,
    disconnect_per_thousand: u64,
    /// The edges share one store, commit under leases and take over each other's users.
    takeover: bool,
    /// Shared-store seeds where `cluster.takeover` is off: each edge still joins, holds and
    /// beats its lease (so a change of the members fences it), but its planner knows only
    /// itself, so no edge serves another's users.
    lease_only: bool,
    /// Links bound to the edge their certificate names
    /// (`cluster.link_certificates_name_the_edge`): a link then sends only as the users its
    /// edge serves, in this shard's view of who serves whom.
    links_named: bool,
    stall_per_thousand: u64,
    drain_per_thousand: u64,
    /// How often each live shard takes its expiry interval's turn (`expire_on`).
    expire_per_thousand: u64,
    /// How often a client goes away for 0.5 to 4 s.
    away_per_thousand: u64,
    /// Every seq a commit gave, with when it expires: (inbox, seq) → its TTL's end, `None`
    /// without a TTL.
    assigned: HashMap<(UserId, u64), Option<UnixMillis>>,
    next_owner: u64,
    stats: Stats,
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = Rng::new(seed);
        let batch_requests_max = 1 + rng.below(8) as usize;
        let config = CoreConfig {
            batch_requests_max,
            queue_requests_max: batch_requests_max + 16 + rng.below(32) as usize,
            queue_requests_per_sender_max: 1 + rng.below(8) as usize,
            sync_messages_max: 1 + rng.below(20) as usize,
            seq_cache_entries_max: rng.below(8) as usize,
            expire_scan_keys_max: 2 + rng.below(50) as usize,
            expiry_bucket_ms: 1_000,
            ..CoreConfig::default()
        };
        config.validate().expect("valid sim config");
        let edge_count = 2 + rng.below(2) as usize;
        let takeover = rng.below(2) == 0;
        // With takeover, half the seeds change the members mid-run: a spare edge joins.
        let spare = takeover && rng.below(2) == 0;
        // Ids that are not indexes, so a mix-up of the two shows.
        let edge_ids: Vec<EdgeId> = (0..edge_count + usize::from(spare))
            .map(|i| 10 * (i as u32 + 1) + 3)
            .collect();
        let members = Membership::new(1, &edge_ids[..edge_count]);
        let shard_count = 1 + rng.below(3) as u32;
        let session_config = SessionConfig {
            sends_in_flight_per_connection_max: 1 + rng.below(8) as usize,
            link_requests_in_flight_max: 1 + rng.below(16) as usize,
            // Bodies are about ten bytes: a few sends fill it.
            link_send_bytes_in_flight_max: 1 + rng.below(64) as usize,
            cluster: Some(cluster_view(edge_ids[0], &members)),
            ..SessionConfig::new(0, shard_count, config.clone())
        };
        let user_count = 3 + rng.below(6) as usize;
        let users: Vec<UserId> = (0..user_count).map(|i| 1000 + i as u64 * 7919).collect();
        let messages_per_client = 1 + rng.below(30);
        let in_flight_max = 1 + rng.below(4) as usize;
        // In quarters: how many seeds send some messages with a TTL of 1 to 3 s.
        let ttl_share = rng.below(4);
        let clients = users
            .iter()
            .map(|user| {
                let planned = (1..=messages_per_client)
                    .map(|n| {
                        let to = rng.below(user_count as u64) as usize;
                        let ttl = (rng.below(4) < ttl_share && rng.chance(1, 3))
                            .then(|| 1 + rng.below(3) as u32);
                        (n, to, ttl)
                    })
                    .collect();
                let mut client_config = ClientConfig::new(format!("{user}:0").into_bytes(), 0);
                client_config.sends_in_flight_max = in_flight_max;
                client_config.retry_after_ms = 100;
                Client {
                    user: *user,
                    session: ClientSession::new(client_config, 0),
                    conn: None,
                    target_edge: rng.below(edge_ids.len() as u64) as usize,
                    reconnect_at: 0,
                    planned,
                    outbox: BTreeMap::new(),
                    acked: HashMap::new(),
                    received: Vec::new(),
                    holes: Vec::new(),
                    linked_after: None,
                }
            })
            .collect();
        let change_members_at = spare.then(|| 1_700_000_000_000 + 100 + rng.below(1_500));
        let mut world = World {
            takeover,
            lease_only: takeover && rng.below(4) == 0,
            links_named: rng.below(2) == 0,
            stall_per_thousand: if takeover { rng.below(2) } else { 0 },
            drain_per_thousand: if takeover { rng.below(2) } else { 0 },
            expire_per_thousand: rng.below(40),
            away_per_thousand: rng.below(2),
            assigned: HashMap::new(),
            next_owner: 1,
            link_fail_per_thousand: rng.below(20),
            crash_per_thousand: rng.below(3),
            disconnect_per_thousand: rng.below(10),
            rng,
            now: 1_700_000_000_000,
            config,
            session_config,
            edges: Vec::new(),
            edge_ids: edge_ids.clone(),
            members: members.clone(),
            change_members_at,
            rollout: Vec::new(),
            links: HashMap::new(),
            out_links: BTreeMap::new(),
            next_link: 1,
            clients,
            slot_owner: HashMap::new(),
            slot_edge: HashMap::new(),
            next_slot: 0,
            network: BTreeMap::new(),
            lane_clock: HashMap::new(),
            packet_counter: 0,
            stats: Stats::default(),
        };
        // With takeover, one or two FoundationDB clusters: a lease then has a copy on each.
        let cluster_count = if takeover { 1 + world.rng.below(2) } else { 1 };
        let shared = Rc::new((0..cluster_count).map(|_| MemoryStore::new()).collect());
        let mixed_timings = takeover && world.rng.below(4) == 0;
        for id in &edge_ids {
            let (renew_ms, lease_timeout_ms) = if mixed_timings && world.rng.below(2) == 0 {
                world.stats.slow_beaters += 1;
                (SLOW_RENEW_MS, 3 * SLOW_RENEW_MS)
            } else {
                (RENEW_MS, LEASE_TIMEOUT_MS)
            };
            let stores = if takeover {
                Rc::clone(&shared)
            } else {
                let shards = world.session_config.shard_count;
                Rc::new((0..shards).map(|_| MemoryStore::new()).collect())
            };
            world.edges.push(Edge {
                id: *id,
                config: members.clone(),
                running: members.clone(),
                stores,
                per_shard_stores: !takeover,
                shards: Vec::new(),
                committers: Vec::new(),
                lease: None,
                planner: None,
                guests: Vec::new(),
                next_beat_at: 0,
                renew_ms,
                lease_timeout_ms,
                last_beat_at: 0,
                owner: 0,
                down_until: None,
                stalled_until: 0,
                handing_over: None,
                exits_at: None,
                expiry_state: Vec::new(),
                runs_expiry: true,
            });
        }
        for index in 0..edge_count {
            world.start_edge(index);
        }
        world
    }

    /// The edge's process starts on its store: new shards, links to every peer to be opened.
    /// With takeover it first claims its own lease, fencing whoever served its users.
    fn start_edge(&mut self, edge: usize) {
        let count = self.session_config.shard_count;
        let owner = self.next_owner;
        self.next_owner += 1;
        let now = self.now;
        let retry_at = now + 20 + self.rng.below(100);
        let e = &mut self.edges[edge];
        e.down_until = None;
        e.handing_over = None;
        e.exits_at = None;
        e.guests.clear();
        e.running = e.config.clone();
        let cluster = cluster_view(e.id, &e.running);
        if self.takeover {
            // As the edge does: join the members first, then claim its own lease.
            match membership::join(&e.stores, &e.running) {
                Ok(Joined::Same) => {}
                Ok(Joined::Changed { previous }) => {
                    self.stats.membership_changes += u64::from(previous.is_some());
                }
                Err(JoinError::Stale { .. }) => {
                    // Its config still has the old members: it exits, and its supervisor
                    // tries again (the operator updates the config meanwhile).
                    self.stats.stale_joins += 1;
                    e.down_until = Some(retry_at);
                    return;
                }
                Err(error) => panic!("edge {} cannot join: {error}", e.id),
            }
            let lease = takeover::claim_own(&e.stores, e.id, owner, e.running.epoch)
                .expect("claim own lease");
            takeover::publish_renew_interval(&e.stores, e.id, e.renew_ms, !self.lease_only)
                .expect("publish");
            e.lease = Some(lease);
            e.owner = owner;
            // As the edge's lease thread: without takeover it watches, and claims no one.
            let planner = Planner::new(e.id, &e.running.members, e.lease_timeout_ms);
            e.planner = Some(if self.lease_only {
                planner.watching_only()
            } else {
                planner
            });
            e.next_beat_at = now;
        }
        e.shards = (0..count)
            .map(|shard| {
                let config = SessionConfig {
                    shard: shard as u8,
                    cluster: Some(cluster.clone()),
                    ..self.session_config.clone()
                };
                EdgeSession::new(config, SimAuth)
            })
            .collect();
        e.committers = (0..count).map(|_| Committer::new(&self.config)).collect();
        e.guests = (0..count).map(|_| ShardGuests::new(&self.config)).collect();
        e.expiry_state = vec![commit::SharedExpiry::default(); count as usize];
        e.runs_expiry = true;
        for shard in 0..count as u8 {
            for peer in 0..self.edges.len() {
                if peer != edge
                    && self.edges[edge]
                        .running
                        .members
                        .contains(&self.edge_ids[peer])
                {
                    self.out_links.insert((edge, shard, peer), Err(self.now));
                }
            }
        }
    }

    /// The operator changes the members: the spare edge joins, and in half the seeds a
    /// member leaves. Every edge's config is then updated, and the edge restarted (a member)
    /// or stopped (not one), one at a time in random order.
    fn change_members(&mut self) {
        let spare = *self.edge_ids.last().expect("edges");
        let mut members = self.members.members.clone();
        members.push(spare);
        if self.rng.below(2) == 0 {
            let leaving = self.rng.below(members.len() as u64 - 1) as usize;
            members.remove(leaving);
        }
        self.members = Membership::new(self.members.epoch + 1, &members);
        // Often one edge's lease thread is paused right then: it beats (and so learns of the
        // change) late, while its shards commit on; only the raised leases fence them.
        if self.rng.below(2) == 0 {
            let edge = self.rng.below(self.edges.len() as u64) as usize;
            self.edges[edge].stalled_until = self.now + self.rng.below(3 * LEASE_TIMEOUT_MS);
        }
        for edge in 0..self.edges.len() {
            let at = self.now + self.rng.below(6 * LEASE_TIMEOUT_MS);
            self.rollout.push((at, edge));
        }
    }

    /// Config updates that are due: the edge restarts on the new members, or stops for good
    /// (drained when it can be) if it is no longer one of them.
    fn roll_out(&mut self) {
        let now = self.now;
        let due: Vec<usize> = self
            .rollout
            .iter()
            .filter(|(at, _)| *at <= now)
            .map(|(_, edge)| *edge)
            .collect();
        self.rollout.retain(|(at, _)| *at > now);
        for edge in due {
            self.edges[edge].config = self.members.clone();
            let member = self.members.members.contains(&self.edges[edge].id);
            if self.edges[edge].shards.is_empty() {
                self.edges[edge].down_until = member.then_some(now);
            } else if member {
                self.crash_edge(edge);
                self.edges[edge].down_until = Some(now);
            } else {
                self.drain_edge(edge);
                let e = &self.edges[edge];
                if e.exits_at.is_none() && e.handing_over.is_none() {
                    self.crash_edge(edge);
                }
            }
        }
    }

    fn run(mut self) -> Result<Stats, String> {
        for _ in 0..CHAOS_STEPS {
            self.step(true);
        }
        let mut steps = 0;
        while !self.converged() {
            self.step(false);
            steps += 1;
            if steps > DRAIN_STEPS_MAX {
                return Err(format!(
                    "did not converge within {DRAIN_STEPS_MAX} calm steps: {}",
                    self.describe()
                ));
            }
        }
        self.check()
    }

    fn describe(&self) -> String {
        let clients: Vec<String> = self
            .clients
            .iter()
            .map(|c| {
                format!(
                    "{} on {:?} target {} pending {} planned {} received {}/{}",
                    c.user,
                    c.conn.map(|conn| self.slot_edge[&conn.slot]),
                    c.target_edge,
                    c.session.pending_sends(),
                    c.planned.len(),
                    c.session.received_up_to(),
                    self.head(c.user)
                )
            })
            .collect();
        let network: Vec<String> = self
            .network
            .iter()
            .take(8)
            .map(|((at, _), packet)| {
                let text: String = format!("{packet:?}").chars().take(160).collect();
                format!("at {at}: {text}")
            })
            .collect();
        format!(
            "now {} edges {:?} links {:?} network {} [{}] clients [{}]",
            self.now,
            self.edge_ids,
            self.out_links,
            self.network.len(),
            network.join("; "),
            clients.join("; ")
        )
    }

    fn home_index(&self, user: UserId) -> usize {
        let id = home_edge(user, &self.members.members);
        self.edge_ids.iter().position(|e| *e == id).expect("member")
    }

    /// The last seq of `user`'s inbox: its counter, read on its home edge, or, once expiry
    /// emptied it and it was forgotten (the seq floor is above it and may come from another
    /// inbox), the highest seq a commit gave it.
    fn head(&self, user: UserId) -> u64 {
        let store = self.edges[self.home_index(user)].store_of(user);
        if commit::has_counter(store, user).expect("read") {
            commit::last_seq(store, user).expect("read")
        } else {
            self.assigned
                .keys()
                .filter(|(inbox, _)| *inbox == user)
                .map(|(_, seq)| *seq)
                .max()
                .unwrap_or(0)
        }
    }

    fn schedule(&mut self, packet: Packet, latency: u64) {
        let lane = packet.lane();
        let earliest = self.lane_clock.get(&lane).copied().unwrap_or(0);
        let at = (self.now + latency).max(earliest);
        self.lane_clock.insert(lane, at);
        self.packet_counter += 1;
        self.network.insert((at, self.packet_counter), packet);
    }

    fn step(&mut self, chaos: bool) {
        self.now += 1 + self.rng.below(5);
        while let Some(entry) = self.network.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let packet = entry.remove();
            self.receive(packet);
        }
        if self.change_members_at.is_some_and(|at| at <= self.now) {
            self.change_members_at = None;
            self.change_members();
        }
        self.roll_out();
        if self.takeover {
            for edge in 0..self.edges.len() {
                self.run_leases(edge, chaos);
            }
        }
        self.open_links();
        for client in 0..self.clients.len() {
            self.client_tick(client);
        }
        for edge in 0..self.edges.len() {
            for shard in 0..self.edges[edge].shards.len() {
                if self.rng.below(1000) < self.expire_per_thousand {
                    self.stats.forgets_queued += self.expire_on(edge, shard) as u64;
                }
                self.commit_own(edge, shard);
                self.commit_guests(edge, shard);
            }
        }
        if chaos {
            if self.rng.below(1000) < self.link_fail_per_thousand && !self.links.is_empty() {
                let mut ids: Vec<u64> = self.links.keys().copied().collect();
                ids.sort_unstable();
                let link = ids[self.rng.below(ids.len() as u64) as usize];
                self.break_link(link);
            }
            if self.rng.below(1000) < self.crash_per_thousand {
                let edge = self.rng.below(self.edges.len() as u64) as usize;
                self.crash_edge(edge);
            }
            for client in 0..self.clients.len() {
                if self.rng.below(1000) < self.disconnect_per_thousand {
                    self.drop_connection(client);
                }
                if self.rng.below(1000) < self.away_per_thousand {
                    // The app is closed for a while: messages with a TTL may expire before
                    // it comes back, and then it is told of a hole instead.
                    self.drop_connection(client);
                    self.clients[client].reconnect_at = self.now + 500 + self.rng.below(3_500);
                }
            }
            if self.rng.below(1000) < self.drain_per_thousand {
                let edge = self.rng.below(self.edges.len() as u64) as usize;
                self.drain_edge(edge);
            }
            if self.rng.below(1000) < self.stall_per_thousand {
                let edge = self.rng.below(self.edges.len() as u64) as usize;
                self.edges[edge].stalled_until = self.now + self.rng.below(3 * LEASE_TIMEOUT_MS);
            }
        }
    }

    /// Commits the shard's next batch of its own edge's users (with takeover: under the
    /// edge's lease; fenced, the process exits as the edge does).
    fn commit_own(&mut self, edge: usize, shard: usize) {
        let now = self.now;
        let e = &mut self.edges[edge];
        if e.shards.len() <= shard {
            return; // Fenced and down since the loop over its shards began.
        }
        let Some(batch) = e.shards[shard].poll_batch(now) else {
            return;
        };
        let result = match e.lease {
            Some(lease) => commit_leased(
                &mut e.committers[shard],
                &e.stores,
                e.id,
                lease,
                &batch,
                now,
            ),
            None if e.per_shard_stores => {
                // The edge's `Embedded::commit`: a shard writes only its own store, so every
                // request its session batched must be for an inbox homed on it.
                let count = e.stores.len() as u32;
                for request in &batch.requests {
                    let inbox = inbox_of(request);
                    assert_eq!(
                        home_shard(inbox, count),
                        shard as u32,
                        "shard {shard} batched a request for inbox {inbox} of another shard"
                    );
                }
                e.committers[shard].commit_batch(&e.stores[shard], &batch.requests, now)
            }
            None => commit_batch_split(&mut e.committers[shard], &e.stores, &batch.requests, now),
        };
        self.stats.duplicate_sends += duplicates_in(&result);
        record_assigned(&mut self.assigned, &batch, &result, now);
        let fenced = result == Err(StoreError::Fenced);
        self.edges[edge].shards[shard].handle_commit(now, batch, result);
        self.apply_effects(edge, shard as u8);
        if fenced {
            self.stats.fenced += 1;
            // After a drain handed the lease over, fenced commits are expected (the edge's
            // `Takeover::handed_over`): the clients are redirected soon.
            let e = &self.edges[edge];
            if e.handing_over.is_none() && e.exits_at.is_none() {
                self.crash_edge(edge);
            }
        }
    }

    /// Commits the shard's batches of guest edges' users, each under the lease this edge
    /// claimed for them; a fenced one releases that guest on every shard.
    fn commit_guests(&mut self, edge: usize, shard: usize) {
        let now = self.now;
        let Some(e) = self.edges.get_mut(edge) else {
            return;
        };
        if e.shards.len() <= shard {
            return; // Crashed while committing its own batch.
        }
        let Some(mut commit) = e.guests[shard].next(&mut e.shards[shard], now) else {
            return;
        };
        let result = commit_leased(
            &mut commit.committer,
            &e.stores,
            commit.guest,
            commit.lease,
            &commit.batch,
            now,
        );
        self.stats.guest_commits += 1;
        self.stats.duplicate_sends += duplicates_in(&result);
        record_assigned(&mut self.assigned, &commit.batch, &result, now);
        let latency = self.rng.below(10);
        let done = Packet::GuestCommitDone {
            edge,
            shard: shard as u8,
            commit: Box::new(commit),
            result,
        };
        self.schedule(done, latency);
    }

    /// A shard's expiry interval, as the edge's expiry task runs it: on its own store
    /// `commit::expire` (the edge's `Embedded::expire`), on shared stores
    /// `commit::expire_shared` (`Shared::expire`), again at once while a pass has more to do,
    /// each report's emptied inboxes handed to the session, which keeps those homed on its
    /// shard and edge. On shared stores shard 0 runs the passes when its edge's lease thread
    /// last published that the edge runs them. Returns how many forgets it queued.
    fn expire_on(&mut self, edge: usize, shard: usize) -> usize {
        let now = self.now;
        let e = &mut self.edges[edge];
        if e.shards.len() <= shard {
            return 0;
        }
        let runs_passes = shard == 0 && e.runs_expiry;
        let queued_before = e.shards[shard].queued_requests();
        let guest_queued_before = e.shards[shard].guest_queued_requests();
        for _ in 0..EXPIRY_PASSES_PER_TURN_MAX {
            let report = if e.per_shard_stores {
                // The edge's `Embedded::expire`: every shard passes over its own store.
                commit::expire(&e.stores[shard], now, &self.config)
            } else {
                commit::expire_shared(
                    &e.stores[..],
                    runs_passes,
                    &mut e.expiry_state[shard],
                    now,
                    &self.config,
                )
            }
            .expect("expire");
            assert_eq!(
                report.store_failed, None,
                "the simulation's stores do not fail"
            );
            self.stats.expired += report.messages_deleted;
            e.shards[shard].handle_emptied(&report.emptied, now);
            if !report.more {
                break;
            }
        }
        self.stats.guest_forgets_queued += e.shards[shard]
            .guest_queued_requests()
            .saturating_sub(guest_queued_before) as u64;
        e.shards[shard]
            .queued_requests()
            .saturating_sub(queued_before)
    }

    /// A guest's commit result reaches its shard; a fenced one is released there and
    /// reported to the planner, which releases it on the other shards (unless the report is
    /// about an earlier claim).
    fn guest_commit_done(
        &mut self,
        edge: usize,
        shard: u8,
        commit: GuestCommit,
        result: Result<Vec<commit::Outcome>, StoreError>,
    ) {
        let e = &mut self.edges[edge];
        let held = (commit.guest, commit.lease);
        let serving = e
            .planner
            .as_ref()
            .is_some_and(|p| p.guests().any(|guest| guest == held));
        self.stats.released_in_flight += u64::from(!serving);
        self.stats.fenced += u64::from(result == Err(StoreError::Fenced));
        let s = shard as usize;
        let fenced = e.guests[s].finish(&mut e.shards[s], self.now, commit, result);
        self.apply_effects(edge, shard);
        if let Some((guest, lease)) = fenced {
            let e = &mut self.edges[edge];
            if e.planner.as_mut().is_some_and(|p| p.fenced(guest, lease)) {
                self.stats.takeovers_given_back += 1;
                self.apply_guests(edge);
            }
        }
    }

    /// Takeover seeds: a down edge restarts when due; a live one beats its lease (unless
    /// stalled), reads everyone's, and claims or releases what its planner says.
    fn run_leases(&mut self, edge: usize, chaos: bool) {
        let now = self.now;
        if self.edges[edge].shards.is_empty() {
            let e = &self.edges[edge];
            // An edge its own config leaves out is stopped for good (the edge refuses to
            // start with an id that is not a member).
            let due = e.config.members.contains(&e.id)
                && e.down_until.is_some_and(|at| at <= now || !chaos);
            if due {
                self.start_edge(edge);
            }
            return;
        }
        if let Some(exits_at) = self.edges[edge].exits_at {
            if exits_at <= now {
                self.crash_edge(edge);
            }
            return;
        }
        if let Some((target, handed, deadline)) = self.edges[edge].handing_over.clone() {
            // As the edge's lease thread: no beat (the lease is handed over); redirect once
            // the successor claimed what it was handed, or the wait is over.
            let e = &self.edges[edge];
            let observed = takeover::observe_all(&e.stores, &handed).expect("read leases");
            // Not claimed in time (the successor is draining too, or down): the clients go
            // there anyway, and come back through their first address.
            if takeover::taken_up(&observed) || now >= deadline {
                self.finish_drain(edge, target);
            }
            return;
        }
        let e = &mut self.edges[edge];
        if now < e.stalled_until && chaos {
            // Its lease thread is paused (its shards serve on): no beat, no observation.
            return;
        }
        if now >= e.next_beat_at {
            e.next_beat_at = now + e.renew_ms;
            let lease = e.lease.expect("a live edge holds its lease");
            match takeover::renew(&e.stores, e.id, lease, e.running.epoch) {
                // Its users were taken over while it stalled, or the members changed: the
                // process exits.
                Err(StoreError::Fenced) => {
                    self.stats.fenced += 1;
                    return self.crash_edge(edge);
                }
                Ok(()) => e.last_beat_at = now,
                Err(_) => {}
            }
            let landed = e.last_beat_at == now;
            e.planner
                .as_mut()
                .expect("a live edge plans")
                .beat_result(now, landed);
        }
        let observed = takeover::observe_all(&e.stores, &e.running.members).expect("read leases");
        let planner = e.planner.as_mut().expect("a live edge plans");
        planner.observe_round(now, observed);
        let actions = planner.actions(now);
        e.runs_expiry = planner.runs_expiry(now);
        for action in actions {
            match action {
                TakeoverAction::Claim {
                    edge: dead,
                    expected,
                } => {
                    let e = &mut self.edges[edge];
                    let result =
                        takeover::claim(&e.stores, dead, e.id, e.owner, expected, e.running.epoch);
                    let ok = result.is_ok();
                    // Taken over while it beat on time (up, not stalled, not draining): a
                    // watcher judged it by its own timeout, not by the edge's interval.
                    let dead_index = self.edge_ids.iter().position(|id| *id == dead);
                    let d = &self.edges[dead_index.expect("a member")];
                    let beating = d.down_until.is_none()
                        && d.handing_over.is_none()
                        && d.exits_at.is_none()
                        && now >= d.stalled_until
                        && now - d.last_beat_at < d.renew_ms;
                    assert!(
                        !(ok && beating),
                        "edge {} took over edge {dead}, which beat {} ms ago (every {} ms)",
                        self.edges[edge].id,
                        now - d.last_beat_at,
                        d.renew_ms
                    );
                    let e = &mut self.edges[edge];
                    e.planner.as_mut().expect("planner").claimed(dead, result);
                    self.stats.takeovers += u64::from(ok);
                }
                TakeoverAction::Release { .. } => self.stats.takeovers_given_back += 1,
            }
        }
        self.apply_guests(edge);
    }

    /// An operator drains `edge` (SIGTERM): it hands its own lease and its guests' to its
    /// successor, redirects every client there, and exits a little later.
    fn drain_edge(&mut self, edge: usize) {
        let now = self.now;
        let e = &mut self.edges[edge];
        if e.shards.is_empty() || e.exits_at.is_some() || e.handing_over.is_some() {
            return;
        }
        let planner = e.planner.as_ref().expect("a live edge plans");
        let Some(target) = planner.drain_target(now) else {
            return; // No other edge alive: a drain closes with `ShuttingDown` instead.
        };
        // Its own lease first: if that fails (it was taken: the next beat ends the process),
        // the edge keeps its users and a drain closes with `ShuttingDown` instead.
        let own = e.lease.expect("a live edge holds its lease");
        if takeover::hand_over(&e.stores, e.id, own, target, e.running.epoch).is_err() {
            return;
        }
        let mut handed = vec![e.id];
        let guests: Vec<(EdgeId, Lease)> = planner.guests().collect();
        for (users_of, lease) in guests {
            // Fenced: a claim came first, and that claimer serves them.
            if takeover::hand_over(&e.stores, users_of, lease, target, e.running.epoch).is_ok() {
                handed.push(users_of);
            }
        }
        e.handing_over = Some((target, handed, now + 3 * RENEW_MS));
        self.stats.drains += 1;
    }

    /// The drain's second half, once the successor took the users up (or had its time to):
    /// every client is redirected there and the process exits a little later.
    fn finish_drain(&mut self, edge: usize, target: EdgeId) {
        let e = &mut self.edges[edge];
        e.handing_over = None;
        e.exits_at = Some(self.now + 30);
        for shard in 0..self.edges[edge].shards.len() {
            self.edges[edge].shards[shard].drain_to(target);
            self.apply_effects(edge, shard as u8);
        }
    }

    /// Every shard of `edge` serves exactly the guests its planner holds (through
    /// `ShardGuests`, as the edge's shards do), and knows who serves whom.
    fn apply_guests(&mut self, edge: usize) {
        let now = self.now;
        let e = &self.edges[edge];
        let Some(planner) = e.planner.as_ref() else {
            return;
        };
        let held: BTreeMap<EdgeId, Lease> = planner.guests().collect();
        let servers = planner.servers(now);
        for shard in 0..e.shards.len() {
            let e = &mut self.edges[edge];
            e.shards[shard].set_servers(servers.clone());
            e.guests[shard].apply(&mut e.shards[shard], &held);
            self.apply_effects(edge, shard as u8);
        }
    }

    /// Opens the links that are due: the landing shard learns of it and its `Hello` first,
    /// then the opening shard may forward on it.
    fn open_links(&mut self) {
        let due: Vec<(usize, u8, usize)> = self
            .out_links
            .iter()
            .filter(|(_, state)| matches!(state, Err(at) if *at <= self.now))
            .map(|(key, _)| *key)
            .collect();
        for (from_edge, from_shard, to_edge) in due {
            if self.edges[from_edge].shards.is_empty() {
                // Its process is down: the links open again when it starts.
                self.out_links.remove(&(from_edge, from_shard, to_edge));
                continue;
            }
            let from_id = self.edges[from_edge].id;
            let to = &self.edges[to_edge];
            let listed = self.edges[from_edge].running.members.contains(&to.id)
                && to.running.members.contains(&from_id);
            if to.shards.is_empty() || !listed {
                // Down, or running on members without this edge (a change rolling out): it
                // would refuse the hello.
                let again_at = self.now + 1 + self.rng.below(200);
                self.out_links
                    .insert((from_edge, from_shard, to_edge), Err(again_at));
                continue;
            }
            let link = self.next_link;
            self.next_link += 1;
            let to_shard = (u64::from(from_shard) + link) % self.edges[to_edge].shards.len() as u64;
            let to_shard = to_shard as u8;
            self.links.insert(
                link,
                Link {
                    from_edge,
                    from_shard,
                    to_edge,
                    to_shard,
                },
            );
            self.out_links
                .insert((from_edge, from_shard, to_edge), Ok(link));
            let hello = LinkFrame::Hello {
                edge: self.edges[from_edge].id,
            };
            let now = self.now;
            let named = self.links_named.then(|| vec![self.edges[from_edge].id]);
            let landing = &mut self.edges[to_edge].shards[to_shard as usize];
            landing.open_link(link, named);
            landing
                .handle_link_request(now, link, hello)
                .expect("a member's hello is accepted");
            let peer = self.edges[to_edge].id;
            self.edges[from_edge].shards[from_shard as usize].link_up(peer);
        }
    }

    /// A link breaks: what was on it is lost; both ends learn, and it is opened again later.
    fn break_link(&mut self, link: u64) {
        let Some(l) = self.links.remove(&link) else {
            return;
        };
        self.stats.link_failures += 1;
        let peer = self.edges[l.to_edge].id;
        self.edges[l.from_edge].shards[l.from_shard as usize].link_down(peer);
        self.apply_effects(l.from_edge, l.from_shard);
        self.edges[l.to_edge].shards[l.to_shard as usize].link_closed(link);
        let again_at = self.now + 1 + self.rng.below(200);
        self.out_links
            .insert((l.from_edge, l.from_shard, l.to_edge), Err(again_at));
    }

    /// The edge's process dies and restarts on its store (with takeover: after a while, maybe
    /// long enough to be taken over). Its connections and links die.
    fn crash_edge(&mut self, edge: usize) {
        if self.edges[edge].shards.is_empty() {
            return; // Down already.
        }
        self.stats.edge_crashes += 1;
        let mut dead: Vec<u64> = self
            .links
            .iter()
            .filter(|(_, l)| l.from_edge == edge || l.to_edge == edge)
            .map(|(id, _)| *id)
            .collect();
        // In id order, not the map's: a seed must replay exactly.
        dead.sort_unstable();
        for link in dead {
            let l = self.links.remove(&link).expect("listed");
            if l.from_edge != edge {
                // The peer sees its link drop.
                let id = self.edges[edge].id;
                self.edges[l.from_edge].shards[l.from_shard as usize].link_down(id);
                self.apply_effects(l.from_edge, l.from_shard);
                let again_at = self.now + 1 + self.rng.below(200);
                self.out_links
                    .insert((l.from_edge, l.from_shard, edge), Err(again_at));
            } else {
                self.edges[l.to_edge].shards[l.to_shard as usize].link_closed(link);
            }
        }
        let packets = std::mem::take(&mut self.network);
        self.network = packets
            .into_iter()
            .filter(|(_, packet)| !packet.touches_edge(edge, self))
            .collect();
        for client in 0..self.clients.len() {
            let on_edge = self.clients[client]
                .conn
                .is_some_and(|conn| self.slot_edge[&conn.slot] == edge);
            if on_edge {
                self.clients[client].conn = None;
                let now = self.now;
                let c = &mut self.clients[client];
                c.session.disconnected(now);
                c.reconnect_at = now + c.session.reconnect_delay_ms(self.rng.next_u64());
            }
        }
        if self.takeover {
            self.out_links.retain(|(from, _, _), _| *from != edge);
            let e = &mut self.edges[edge];
            e.shards.clear();
            e.committers.clear();
            e.guests.clear();
            e.planner = None;
            e.lease = None;
            e.down_until = Some(self.now + self.rng.below(3 * LEASE_TIMEOUT_MS));
        } else {
            self.start_edge(edge);
        }
    }

    fn drop_connection(&mut self, client: usize) {
        let Some(conn) = self.clients[client].conn.take() else {
            return;
        };
        self.stats.disconnects += 1;
        let now = self.now;
        let c = &mut self.clients[client];
        c.session.disconnected(now);
        c.reconnect_at = now + c.session.reconnect_delay_ms(self.rng.next_u64());
        let edge = self.slot_edge[&conn.slot];
        self.schedule(Packet::IdleTimeout { edge, conn }, IDLE_TIMEOUT_MS);
    }

    fn connect(&mut self, client: usize) {
        let edge = self.clients[client].target_edge;
        if self.edges[edge].shards.is_empty() || self.edges[edge].exits_at.is_some() {
            // The edge is down: the SDK waits its backoff and goes back to the address it
            // was given first (here: any edge), which redirects it to whoever serves it now.
            let now = self.now;
            let target = self.rng.below(self.edges.len() as u64) as usize;
            let delay = self.rng.below(100);
            let c = &mut self.clients[client];
            c.target_edge = target;
            c.reconnect_at = now + 1 + delay;
            return;
        }
        let shard = self.rng.below(self.edges[edge].shards.len() as u64) as u8;
        let conn = ConnRef {
            shard,
            slot: self.next_slot,
            generation: 1,
        };
        self.next_slot += 1;
        self.slot_owner.insert(conn.slot, client);
        self.slot_edge.insert(conn.slot, edge);
        let now = self.now;
        self.edges[edge].shards[shard as usize].open_connection(now, conn);
        let c = &mut self.clients[client];
        c.conn = Some(conn);
        c.session.connected(now);
    }

    fn receive(&mut self, packet: Packet) {
        let now = self.now;
        match packet {
            Packet::ToEdge { edge, conn, frame } => {
                self.edges[edge].shards[conn.shard as usize].handle_frame(now, conn, frame, false);
                self.apply_effects(edge, conn.shard);
            }
            Packet::ToClient {
                client,
                conn,
                frame,
            } => {
                if self.clients[client].conn != Some(conn) {
                    return;
                }
                match self.clients[client].session.handle_frame(now, frame) {
                    Ok(()) => {}
                    Err(SessionError::Goaway {
                        reconnect_to: Some(address),
                        ..
                    }) => {
                        // What the SDK does: reconnect at once, to the edge named.
                        let target = self
                            .edge_ids
                            .iter()
                            .position(|id| address_of(*id) == address)
                            .unwrap_or_else(|| panic!("redirected to an unknown {address}"));
                        let c = &mut self.clients[client];
                        c.conn = None;
                        c.session.disconnected(now);
                        c.target_edge = target;
                        c.reconnect_at = now;
                    }
                    Err(error) => panic!("client {client}: the edge broke the protocol: {error}"),
                }
            }
            Packet::Closed { client, conn } => {
                if self.clients[client].conn == Some(conn) {
                    self.drop_connection(client);
                }
            }
            Packet::Mesh {
                edge,
                shard,
                message,
            } => {
                self.edges[edge].shards[shard as usize].handle_message(now, message);
                self.apply_effects(edge, shard);
            }
            Packet::LinkRequest { link, frame } => {
                let Some(l) = self.links.get(&link).copied() else {
                    return; // The link broke with the frame on it.
                };
                let landing = &mut self.edges[l.to_edge].shards[l.to_shard as usize];
                if let Err(error) = landing.handle_link_request(now, link, frame) {
                    panic!("link {link}: the far edge refused a request: {error}");
                }
                self.apply_effects(l.to_edge, l.to_shard);
            }
            Packet::LinkAnswer { link, frame } => {
                let Some(l) = self.links.get(&link).copied() else {
                    return;
                };
                let peer = self.edges[l.to_edge].id;
                let opener = &mut self.edges[l.from_edge].shards[l.from_shard as usize];
                if let Err(error) = opener.handle_link_answer(now, peer, frame) {
                    panic!("link {link}: an answer was refused: {error}");
                }
                self.apply_effects(l.from_edge, l.from_shard);
            }
            Packet::ReadDone {
                edge,
                shard,
                conn,
                after_seq,
                result,
            } => {
                self.edges[edge].shards[shard as usize].handle_read(conn, after_seq, result);
                self.apply_effects(edge, shard);
            }
            Packet::IdleTimeout { edge, conn } => {
                self.edges[edge].shards[conn.shard as usize].connection_lost(conn);
                self.apply_effects(edge, conn.shard);
            }
            Packet::GuestCommitDone {
                edge,
                shard,
                commit,
                result,
            } => self.guest_commit_done(edge, shard, *commit, result),
        }
    }

    /// A frame from the edge to the client on `conn`, after the network's latency.
    fn send_to_client(&mut self, conn: ConnRef, frame: Frame) {
        let client = self.slot_owner[&conn.slot];
        let latency = 1 + self.rng.below(20);
        self.schedule(
            Packet::ToClient {
                client,
                conn,
                frame,
            },
            latency,
        );
    }

    /// Carries out a shard's effects, as `edge/src/shard.rs` does.
    fn apply_effects(&mut self, edge: usize, shard: u8) {
        while let Some(effect) = self.edges[edge].shards[shard as usize].poll_effect() {
            match effect {
                Effect::Write { conn, frame, .. } => {
                    if let Frame::SendError {
                        code: ErrorCode::ShardUnavailable,
                        ..
                    } = frame
                    {
                        self.stats.refused_link_down += 1;
                    }
                    self.send_to_client(conn, frame);
                    self.edges[edge].shards[shard as usize].set_outbound_bytes(conn, 0);
                }
                Effect::Close { conn, code, .. } => {
                    assert!(
                        !courier_protocol::client::is_fatal_code(code),
                        "a connection was closed with {code:?}"
                    );
                    let client = self.slot_owner[&conn.slot];
                    self.schedule(Packet::Closed { client, conn }, 1);
                    self.edges[edge].shards[shard as usize].connection_lost(conn);
                }
                Effect::Redirect {
                    conn,
                    user,
                    reconnect_to,
                } => {
                    let e = &self.edges[edge];
                    if e.exits_at.is_none() {
                        assert_ne!(
                            home_edge(user, &e.running.members),
                            e.id,
                            "redirected from its home edge"
                        );
                    }
                    if self.takeover {
                        // To its home, or to the edge that took its home over.
                        assert_ne!(reconnect_to, address_of(e.id));
                    } else {
                        let members = &self.members.members;
                        assert_eq!(reconnect_to, address_of(home_edge(user, members)));
                    }
                    self.stats.redirects += 1;
                    let frame = Frame::Goaway {
                        reason: "homed on another edge".into(),
                        reconnect_to: Some(reconnect_to),
                    };
                    self.send_to_client(conn, frame);
                    self.edges[edge].shards[shard as usize].connection_lost(conn);
                }
                Effect::Route { shard: to, message } => {
                    let latency = self.rng.below(3);
                    self.schedule(
                        Packet::Mesh {
                            edge,
                            shard: to,
                            message,
                        },
                        latency,
                    );
                }
                Effect::ResumeInput { .. } => {}
                Effect::Read {
                    conn,
                    inbox,
                    after_seq,
                } => {
                    // Another shard's store, for a user homed there: reads cross shards.
                    let store = self.edges[edge].store_of(inbox);
                    let result =
                        commit::read_inbox(store, inbox, after_seq, self.now, &self.config);
                    let latency = 1 + self.rng.below(10);
                    self.schedule(
                        Packet::ReadDone {
                            edge,
                            shard,
                            conn,
                            after_seq,
                            result,
                        },
                        latency,
                    );
                }
                Effect::LinkWrite { edge: peer, frame } => {
                    match &frame {
                        LinkFrame::Send { to, .. } => {
                            if !self.takeover {
                                assert_eq!(self.edge_ids[self.home_index(*to)], peer);
                            }
                            self.stats.forwarded_sends += 1;
                        }
                        LinkFrame::Signal { .. } => self.stats.forwarded_signals += 1,
                        LinkFrame::Hello { .. } | LinkFrame::SendResult { .. } => {
                            panic!("a shard wrote {} on its own link", frame.kind())
                        }
                    }
                    let peer = self
                        .edge_ids
                        .iter()
                        .position(|e| *e == peer)
                        .expect("member");
                    let Some(Ok(link)) = self.out_links.get(&(edge, shard, peer)).copied() else {
                        panic!("a shard wrote on a link that is down");
                    };
                    let latency = 1 + self.rng.below(10);
                    self.schedule(Packet::LinkRequest { link, frame }, latency);
                }
                Effect::LinkReply { link, frame } => {
                    if self.links.contains_key(&link) {
                        let latency = 1 + self.rng.below(10);
                        self.schedule(Packet::LinkAnswer { link, frame }, latency);
                    }
                }
            }
        }
    }

    fn client_tick(&mut self, client: usize) {
        let now = self.now;
        if self.clients[client].conn.is_none() {
            if now < self.clients[client].reconnect_at {
                return;
            }
            self.connect(client);
        }
        let users: Vec<UserId> = self.clients.iter().map(|c| c.user).collect();
        let c = &mut self.clients[client];
        while c.session.pending_sends() < 8 {
            let Some((client_id, recipient, ttl)) = c.planned.pop_front() else {
                break;
            };
            let to = users[recipient];
            let body = format!("{}:{client_id}", c.user).into_bytes();
            c.outbox.insert(client_id, to);
            c.session
                .send(client_id, to, body, ttl)
                .expect("send queued");
            // Now and then a typing signal too: it crosses edges like a send, unanswered.
            if client_id % 4 == 0 {
                // Signals are dropped while offline (false): ephemeral by design.
                let _sent = c
                    .session
                    .signal(to, courier_protocol::SignalKind::Typing, Vec::new());
            }
        }
        c.session.handle_timeout(now);
        while let Some(event) = c.session.poll_event() {
            match event {
                ClientEvent::Welcome {
                    user, acked_up_to, ..
                } => {
                    assert_eq!(user, c.user);
                    c.linked_after.get_or_insert(acked_up_to);
                }
                ClientEvent::Message(delivery) => {
                    c.received
                        .push((delivery.seq, delivery.from, delivery.body));
                    c.session.consumed(now, delivery.seq);
                }
                ClientEvent::Hole {
                    after_seq,
                    up_to_seq,
                } => c.holes.push((after_seq, up_to_seq, now)),
                ClientEvent::Signal { .. } => {}
                ClientEvent::SendDone { client_id, result } => match result {
                    Ok(receipt) => {
                        let to = c.outbox.remove(&client_id).expect("a send made");
                        if let Some((_, earlier)) = c.acked.insert(client_id, (to, receipt.seq)) {
                            assert_eq!(earlier, receipt.seq, "two seqs for one send");
                        }
                    }
                    Err(code) => panic!("client {client}: send {client_id} refused: {code:?}"),
                },
            }
        }
        let Some(conn) = self.clients[client].conn else {
            return;
        };
        let edge = self.slot_edge[&conn.slot];
        self.clients[client].session.set_wall_clock(now);
        while let Some(frame) = self.clients[client].session.poll_transmit() {
            let latency = 1 + self.rng.below(20);
            self.schedule(Packet::ToEdge { edge, conn, frame }, latency);
        }
    }

    fn converged(&self) -> bool {
        // Every member is up on the wanted members, every other edge stopped; with takeover,
        // each serves its own users alone.
        let settled = self.change_members_at.is_none()
            && self.rollout.is_empty()
            && self.edges.iter().all(|e| {
                if !self.members.members.contains(&e.id) {
                    return e.shards.is_empty();
                }
                // Not draining: a draining edge commits nothing of its own any more (its
                // forgets wait for its next start).
                !e.shards.is_empty()
                    && e.handing_over.is_none()
                    && e.exits_at.is_none()
                    && e.running == self.members
                    && e.planner.as_ref().is_none_or(|p| {
                        p.guests().next().is_none() && p.servers(self.now).is_empty()
                    })
            });
        if !settled
            || !self.network.is_empty()
            || self.out_links.values().any(|state| state.is_err())
            || self.edges.iter().any(|e| {
                e.shards
                    .iter()
                    .any(|s| s.queued_requests() > 0 || s.batch_in_flight())
            })
        {
            return false;
        }
        self.clients.iter().all(|c| {
            c.conn.is_some()
                && c.session.is_active()
                && c.planned.is_empty()
                && c.outbox.is_empty()
                && c.session.ack_flushed()
                && c.session.received_up_to() >= self.head(c.user)
        })
    }

    fn check(mut self) -> Result<Stats, String> {
        for c in &self.clients {
            let home = self.home_index(c.user);
            let conn = c.conn.expect("converged clients are connected");
            if self.slot_edge[&conn.slot] != home {
                return Err(format!(
                    "user {} settled on an edge that is not its home",
                    c.user
                ));
            }
        }
        let mut delivered: Vec<HashMap<Vec<u8>, u64>> = Vec::new();
        for c in &self.clients {
            let mut previous = 0;
            let mut bodies = HashMap::new();
            for (seq, from, body) in &c.received {
                if *seq <= previous {
                    return Err(format!("user {} got {seq} after {previous}", c.user));
                }
                previous = *seq;
                if !body.starts_with(format!("{from}:").as_bytes()) {
                    return Err(format!(
                        "a message from {from} carries another sender's body"
                    ));
                }
                if bodies.insert(body.clone(), *seq).is_some() {
                    return Err(format!(
                        "message {} delivered twice to {}",
                        String::from_utf8_lossy(body),
                        c.user
                    ));
                }
            }
            delivered.push(bodies);
        }
        let in_hole = |c: &Client, seq: u64| {
            c.holes
                .iter()
                .any(|(after, up_to, _)| *after < seq && seq <= *up_to)
        };
        let mut acked = 0;
        let mut expected = vec![0usize; self.clients.len()];
        for sender in &self.clients {
            for (client_id, (to, seq)) in &sender.acked {
                acked += 1;
                let body = format!("{}:{client_id}", sender.user).into_bytes();
                let index = self
                    .clients
                    .iter()
                    .position(|c| c.user == *to)
                    .expect("a recipient");
                if self.clients[index]
                    .linked_after
                    .is_some_and(|after| after >= *seq)
                {
                    continue;
                }
                match delivered[index].get(&body) {
                    Some(got) if got == seq => expected[index] += 1,
                    Some(got) => {
                        return Err(format!(
                            "message {}:{client_id} acked as {to}#{seq}, delivered as {got}",
                            sender.user
                        ));
                    }
                    // It expired before it reached the device, which was told of the hole.
                    None if matches!(self.assigned.get(&(*to, *seq)), Some(Some(_)))
                        && in_hole(&self.clients[index], *seq) =>
                    {
                        self.stats.expired_in_holes += 1;
                    }
                    None => {
                        return Err(format!(
                            "acknowledged message {}:{client_id} ({to}#{seq}) was lost",
                            sender.user
                        ));
                    }
                }
            }
        }
        for (index, c) in self.clients.iter().enumerate() {
            if delivered[index].len() != expected[index] {
                return Err(format!(
                    "user {} got {} messages, {} of them acknowledged",
                    c.user,
                    delivered[index].len(),
                    expected[index]
                ));
            }
        }
        // A hole covers only messages that expired before it was declared, and seqs the
        // inbox never used (below a forgotten inbox's floor), never a live message.
        for ((inbox, seq), expire_at) in &self.assigned {
            let Some(recipient) = self.clients.iter().find(|c| c.user == *inbox) else {
                continue;
            };
            for (after, up_to, declared_at) in &recipient.holes {
                if !(*after < *seq && *seq <= *up_to) {
                    continue;
                }
                match expire_at {
                    None => {
                        return Err(format!(
                            "a hole declared to {inbox} covered live message {seq}"
                        ));
                    }
                    Some(expire_at) if declared_at < expire_at => {
                        return Err(format!(
                            "a hole declared to {inbox} at {declared_at} covered message {seq}, \
                             which expires at {expire_at}"
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        self.stats.messages_acked = acked;
        self.expire_everything()?;
        Ok(self.stats)
    }

    /// Every store the edges write: the shared ones once, or each edge's own.
    fn all_stores(&self) -> Vec<Rc<Vec<MemoryStore>>> {
        if self.takeover {
            vec![Rc::clone(&self.edges[0].stores)]
        } else {
            self.edges.iter().map(|e| Rc::clone(&e.stores)).collect()
        }
    }

    /// R4 once the cluster converged: every message was acknowledged by its recipient, so
    /// none that has yet to expire is stored; and past the dedupe window (twice: records live
    /// up to two windows) and the retention, the edges' expiry and forgetting leave no
    /// message, expiry entry, dedupe record, inbox counter or emptied-inbox record anywhere.
    fn expire_everything(&mut self) -> Result<(), String> {
        for stores in self.all_stores() {
            for store in stores.iter() {
                for (key, value) in dump_prefix(store, &[keys::TAG_MESSAGE]) {
                    let (inbox, seq) = keys::parse_message(&key).expect("message key");
                    let message = courier_core::envelope::decode(inbox, seq, &value)
                        .expect("stored envelope");
                    if message.expire_at_ms > self.now {
                        return Err(format!(
                            "message {inbox}#{seq} left in the store after its recipient acked it"
                        ));
                    }
                }
            }
        }
        self.now += 2 * self.config.dedupe_window_ms
            + courier_core::commit::DEDUPE_CLEAR_SLACK_MS
            + self.config.retention_ms
            + self.config.expiry_bucket_ms;
        let tags = [
            keys::TAG_DEDUPE,
            keys::TAG_EXPIRY,
            keys::TAG_MESSAGE,
            keys::TAG_COUNTER,
            keys::TAG_EMPTIED,
        ];
        let left = |world: &World| -> Vec<(char, usize)> {
            let mut left = Vec::new();
            for stores in world.all_stores() {
                for store in stores.iter() {
                    for tag in tags {
                        let count = dump_prefix(store, &[tag]).len();
                        if count > 0 {
                            left.push((tag as char, count));
                        }
                    }
                }
            }
            left
        };
        for _ in 0..10_000 {
            if left(self).is_empty() {
                return Ok(());
            }
            // Each interval: every shard's expiry turn, then its forgets commit (they wait
            // `ack_commit_delay_ms` like acks).
            self.now += self.config.ack_commit_delay_ms + 1;
            for edge in 0..self.edges.len() {
                for shard in 0..self.edges[edge].shards.len() {
                    self.expire_on(edge, shard);
                }
            }
            self.now += self.config.ack_commit_delay_ms + 1;
            for edge in 0..self.edges.len() {
                for shard in 0..self.edges[edge].shards.len() {
                    // Batches are bounded: a few rounds of them take the whole queue.
                    for _ in 0..64 {
                        if self.edges[edge].shards[shard].queued_requests() == 0 {
                            break;
                        }
                        self.commit_own(edge, shard);
                        if self.edges[edge].shards.len() <= shard {
                            return Err(format!("edge {edge} crashed while forgetting"));
                        }
                    }
                }
            }
        }
        Err(format!(
            "keys left after expiry (tag, count): {:?}",
            left(self)
        ))
    }
}

/// The view a shard of `edge` has of the cluster: the members its process runs with.
fn cluster_view(edge: EdgeId, members: &Membership) -> ClusterView {
    ClusterView {
        edge,
        members: members
            .members
            .iter()
            .map(|id| EdgeMember {
                id: *id,
                client_address: address_of(*id),
            })
            .collect(),
    }
}

/// A world of `seed` whose clients are settled on their home edges, as convergence would leave
/// them, for the checkers' own tests.
fn settled_world(seed: u64) -> World {
    let mut world = World::new(seed);
    for client in &mut world.clients {
        client.linked_after = Some(0);
        client.conn = None;
    }
    for client in 0..world.clients.len() {
        world.clients[client].target_edge = world.home_index(world.clients[client].user);
        world.connect(client);
    }
    world
}

/// The checker must notice an acknowledged message that never arrived.
#[test]
fn cluster_simulation_detects_a_lost_acknowledged_message() {
    let mut world = settled_world(3);
    let to = world.clients[1].user;
    world.clients[0].acked.insert(1, (to, 1));
    let failure = world
        .check()
        .expect_err("a lost acknowledged message must fail the check");
    assert!(failure.contains("lost"), "{failure}");
}

/// The checkers must notice a hole declared over a live message or over one yet to expire,
/// and an inbox counter that expiry never got rid of (R4).
#[test]
fn cluster_simulation_detects_early_holes_and_a_counter_left_behind() {
    let mut world = settled_world(3);
    let user = world.clients[1].user;
    world.assigned.insert((user, 1), None);
    world.clients[1].holes.push((0, 1, world.now));
    let failure = world
        .check()
        .expect_err("a hole over a live message must fail the check");
    assert!(failure.contains("covered live message"), "{failure}");

    let mut world = settled_world(3);
    let user = world.clients[1].user;
    let now = world.now;
    world.assigned.insert((user, 1), Some(now + 1_000));
    world.clients[1].holes.push((0, 1, now));
    let failure = world
        .check()
        .expect_err("a hole over a message yet to expire must fail the check");
    assert!(failure.contains("which expires at"), "{failure}");

    // A counter written past every edge's view: no expiry entry lists its inbox, so no pass
    // empties it and nothing forgets it.
    let world = settled_world(3);
    let user = world.clients[0].user;
    let home = world.home_index(user);
    {
        let store = world.edges[home].store_of(user);
        let mut txn = courier_core::store::Store::begin(store).expect("begin");
        courier_core::store::Transaction::set(&mut txn, &keys::counter(user), &7u64.to_le_bytes());
        courier_core::store::Transaction::commit(txn).expect("commit");
    }
    let failure = world
        .check()
        .expect_err("a counter left behind must fail the check");
    assert!(failure.contains("keys left after expiry"), "{failure}");
}
