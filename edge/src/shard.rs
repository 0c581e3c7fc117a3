//! One shard: a glommio executor pinned to a core, with its own UDP socket, its own quinn-proto
//! endpoint and connections, and the inboxes homed to it.
//!
//! This file is wiring. What to do with frames, registrations, cursors, syncs, acks and
//! signals is decided by `courier_core::session::EdgeSession` (sans-IO, the same type the
//! simulation drives); here are the QUIC driver (endpoint, connection slab, timers, CID
//! steering, stream buffers) and the runtime (glommio tasks, mesh channels with their
//! backlogs, store reads and commits on the shard's store threads). After every input the shard
//! applies the session's effects (`apply_effects`), starts a group commit if none is in flight,
//! and flushes transmits.
//!
//! State lives in one `Rc<RefCell<Shard>>` owned by the executor. Tasks feed it inputs and never
//! hold the borrow across an await. Code that runs under the borrow never lets another task
//! run inside it: glommio's `spawn_local` polls a new task at once, so the shard spawns only
//! through `spawn_detached`, which defers the task's body to a later turn; channel sends under
//! the borrow only wake tasks (`try_send`), they never run them. The tasks:
//! - the socket task waits for readability (io_uring peek), then drains at most
//!   `datagrams_per_wakeup_max` datagrams with quinn-udp (GRO) and hands them to the endpoint;
//!   with `batching.receive_linger_us` set it may instead sleep that long after a wake-up and
//!   read what arrived meanwhile (`receive_linger`, decision 0042);
//! - one task per mesh peer receives cross-shard messages;
//! - the timer task drives quinn's timeouts;
//! - commit, sync and expiry tasks hand the store work to the shard's store threads
//!   (`lanes`: a writer, a reader, a maintenance thread), so an fsync never blocks the executor
//!   and a sync never waits for a commit.
//!
//! After every input the shard drains its local queue, starts a group commit if none is in
//! flight, and flushes pending transmits (quinn-udp, GSO).

use std::cell::RefCell;
use std::collections::{BTreeSet, VecDeque};
use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use courier_core::clock::{ServerClock, wall_clock_ms};
use courier_core::commit::{Committer, ExpireReport};
use courier_core::placement::EdgeId;
use courier_core::session::{
    AuthFailure, Authenticator, ConnRef, EdgeSession, Effect, Overload, PurgeRefused,
    SessionConfig, SessionStats, ShardMessage,
};
use courier_core::shard::Batch;
use courier_core::store::StoreError;
use courier_core::takeover::{GuestCommit, ShardGuests};
use courier_core::{CoreConfig, FastHashMap, UserId, placement};
use courier_protocol::{ErrorCode, Frame};
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};
use glommio::channels::local_channel::{self, LocalSender};
use quinn_proto::{
    ConnectionHandle, DatagramEvent, Dir, EcnCodepoint, Endpoint, EndpointConfig, Event,
    StreamEvent, StreamId, VarInt,
};
use tracing::{debug, info, warn};

use crate::backend::ShardStore;

mod links;
mod receive_linger;
use crate::cid::{self, ShardCidGenerator};
use crate::config::Config;
use crate::lanes::StoreLanes;
use crate::mesh::MeshMessage;
use crate::server::StartError;
use links::ConnKind;
use receive_linger::{NextRead, ReceiveLinger};

/// How far the wall clock may be behind the stores' high-water mark at start before the
/// operator is warned (the mark can run a little ahead of the wall clock: it is never set
/// back, and a restart can come within a second of the last write).
const CLOCK_BEHIND_WARN_MS: u64 = 1_000;

/// How late a shard may run its timers so that timers due close together share one wake-up:
/// quinn's own timer granularity. Each connection arms its own acknowledgement and loss timers,
/// and without slack the shard woke for each one separately: at 1,000 msgs/s those wake-ups
/// were most of its parks (docs/decisions/0009).
const TIMER_SLACK: Duration = Duration::from_millis(1);
/// Timer entries one wake-up looks at for delayed acknowledgements due soon
/// (`Shard::send_acks_due_soon`).
const ACKS_EARLY_ENTRIES_MAX: usize = 64;
/// How often a shard checks for a shutdown request.
const SHUTDOWN_POLL: Duration = Duration::from_millis(100);
/// Bytes of one receive buffer; GRO may coalesce up to 64 KiB.
const RECV_BUFFER_BYTES: usize = 64 * 1024;
/// Transmits one connection may produce per flush, so one busy connection cannot starve others.
const TRANSMITS_PER_FLUSH_MAX: usize = 64;
/// The session's frames for a connection collect in its `outbuf` and go to QUIC's stream once
/// per flush, or as soon as this many bytes wait: one stream write (one segment of QUIC's
/// send buffer, one copy) per wake-up instead of one per frame.
const OUTBUF_FLUSH_BYTES: usize = 16 * 1024;
/// Floor of the hard maximum of a peer backlog (`Shard::mesh_backlog_messages_max`).
const MESH_BACKLOG_MESSAGES_MIN: usize = 65_536;
/// Pause before a failed store read is handed back (the session then reads again).
const READ_RETRY_DELAY: Duration = Duration::from_millis(100);
/// After a failed commit, the next one waits this long: a failing store (a full disk) answers
/// at once, and the requeued acks would otherwise be committed again in a tight loop.
const COMMIT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// When the batch timer fires, in the shard's ms: the earliest of the own and the guests'
/// batch deadlines (`(deadline, not before)` each), none before the end of its retry delay
/// (`not before`, 0 when none runs). A deadline of acks put back after a failed commit is
/// already past; armed at it while the retry waited, the timer fired at once, took nothing,
/// and was armed again, in a loop that held the shard's executor until the delay ended.
fn batch_timer_deadline_ms(own: (Option<u64>, u64), guests: (Option<u64>, u64)) -> Option<u64> {
    [own, guests]
        .into_iter()
        .filter_map(|(deadline, not_before)| Some(deadline?.max(not_before)))
        .min()
}
/// Share of the store's memory bound (`store.log_memory_bytes_max`) from which the shard
/// refuses sends; the rest is room for what is already queued and for acks.
const STORE_FULL_ON_PERCENT: u64 = 90;
/// ... and below which it takes them again.
const STORE_FULL_OFF_PERCENT: u64 = 80;
/// Connection close and loss lines a shard logs at info per second (and at once); beyond, they
/// are counted in the periodic summary instead.
const CONNECTION_LOGS: courier_core::budget::Rate = courier_core::budget::Rate {
    per_sec: 100,
    burst: 1_000,
};
/// Pauses between attempts to reopen a store that failed a write, doubling up to the maximum.
const STORE_RECOVERY_PAUSE_MIN: Duration = Duration::from_millis(500);
const STORE_RECOVERY_PAUSE_MAX: Duration = Duration::from_secs(30);
/// A store that fails again within this long of its last reopen waits twice that reopen's
/// first pause before the next (`Shard::store_recovery_pause`).
const STORE_RECOVERY_PAUSE_KEPT: Duration = Duration::from_secs(60);
/// Cross-shard messages a shard handles from one peer before it lets its other tasks run.
const MESH_MESSAGES_PER_TURN_MAX: usize = 256;
/// How often a shard logs what it dropped under overload, if anything.
const STATS_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How often a shard sets its gauges (open connections, queue and backlog depths).
const GAUGES_INTERVAL: Duration = Duration::from_secs(1);
/// Bytes of decoded input one connection buffers: room for one maximal frame and its prefix.
const INBUF_BYTES_MAX: usize =
    courier_protocol::FRAME_BYTES_MAX + courier_protocol::LENGTH_PREFIX_BYTES;

/// Everything a shard needs from the process, built once in `server`.
pub struct ShardSetup {
    /// The core this shard's executor is pinned to (its store threads run there too).
    pub cpu: Option<usize>,
    pub config: Arc<Config>,
    pub core: CoreConfig,
    pub shard_count: u32,
    /// Opens this shard's store once the shard knows its id.
    pub open_store: crate::backend::OpenShardStore,
    pub verifier: Arc<crate::auth::VerifierCell>,
    pub server_config: Arc<quinn_proto::ServerConfig>,
    /// How this shard opens its links to the other edges (`[cluster]`); `None` on its own.
    pub link_client_config: Option<quinn_proto::ClientConfig>,
    pub reset_key: Arc<ring::hmac::Key>,
    pub ready: std::sync::mpsc::Sender<Result<u8, StartError>>,
    /// Set by the main thread on SIGTERM/SIGINT: finish in-flight commits, then close every
    /// connection with `ShuttingDown` and report on `stopped`.
    pub shutdown: Arc<std::sync::atomic::AtomicBool>,
    /// Set to stop at once, as if the process died: nothing is closed or committed
    /// (`server::Edge::crash`, and a fenced in-process edge).
    pub abort: Arc<std::sync::atomic::AtomicBool>,
    /// A fenced store ends the process (the edge); off, it sets `abort` (a test's edge, which
    /// must not end the test process).
    pub exit_when_fenced: bool,
    pub stopped: std::sync::mpsc::Sender<u8>,
    /// Says when memory is near its ceiling: refuse new connections and sends then.
    pub memory: Arc<crate::memory::MemoryGuard>,
    /// What `/readyz` reports; the shard says when its store is being reopened.
    pub health: Arc<crate::health::Health>,
    /// The edge's Prometheus series; the shard takes its own handles.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Requests from `courier-edge ctl`, through the control thread.
    pub control: flume::Receiver<crate::control::ShardRequest>,
    /// The lease thread, when the edge takes part in takeover (decision 0015).
    pub takeover: Option<Arc<crate::takeover::Takeover>>,
    /// The edge's one server clock, shared by its shards.
    pub clock: Arc<EdgeClock>,
}

/// The transport side of one connection; its login and cursor live in the session.
struct Conn {
    quic: quinn_proto::Connection,
    generation: u64,
    stream: Option<StreamId>,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    /// The handshake finished; before that, stream data is 0-RTT.
    handshake_done: bool,
    /// The session closed it: decode nothing more.
    closing: bool,
    dirty: bool,
    /// Stopped decoding frames while the mesh is congested; on `Shard::parked`.
    parked: bool,
    timer_armed: Option<Instant>,
    /// The peer's address group ([`address_group`]) until its handshake is done and its
    /// `Hello` accepted (counted in `Shard::handshakes_by_address`); `None` after.
    handshaking_from: Option<IpAddr>,
    /// The session was told that `inbuf` holds the start of an unfinished frame.
    partial_frame: bool,
    /// A client, or a link between edges.
    kind: ConnKind,
    /// Close it then, if it is still open: a redirected client had time to read `Goaway`.
    close_at: Option<Instant>,
    /// A close the session asked for before the handshake completed (a `Hello` in 0-RTT
    /// refused): sent once it completes, or at `close_at`. A close during the handshake is a
    /// transport close that carries no application code (RFC 9000, 10.2.3), and a client
    /// told nothing but "closed" would retry where its code says stop (`TokenExpired`).
    close_once_connected: Option<(ErrorCode, Bytes)>,
    /// Dropped then if not drained before: set when QUIC first reports it closed
    /// (`CLOSED_LINGER_MAX`).
    drain_by: Option<Instant>,
    /// Closed then if its TLS handshake is not done (`limits.hello_timeout_ms` from its first
    /// packet). The session's `Hello` deadline does not cover a `Hello` that came as 0-RTT
    /// data: that connection is logged in while its handshake may never finish, and QUIC
    /// has no handshake timeout of its own (any packet restarts the idle timeout).
    handshake_by: Option<Instant>,
}

impl Conn {
    fn new(
        quic: quinn_proto::Connection,
        generation: u64,
        kind: ConnKind,
        handshaking_from: Option<IpAddr>,
    ) -> Conn {
        Conn {
            quic,
            generation,
            stream: None,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            handshake_done: false,
            closing: false,
            dirty: false,
            parked: false,
            timer_armed: None,
            handshaking_from,
            partial_frame: false,
            kind,
            close_at: None,
            close_once_connected: None,
            drain_by: None,
            handshake_by: None,
        }
    }
}

/// How soon a connection past its handshake deadline but still awaiting `Hello` (the
/// session's to close) is looked at again (`Conn::handshake_by`).
const HANDSHAKE_RECHECK: Duration = Duration::from_millis(500);

/// How long a redirected client has to read `Goaway` and close before the edge closes.
const REDIRECT_CLOSE_AFTER: Duration = Duration::from_secs(2);
/// How long a close asked for during the handshake waits for it to complete
/// (`Conn::close_once_connected`) before it goes without its code.
const HELD_CLOSE_WAIT_MAX: Duration = Duration::from_secs(2);
/// How long a closed connection is kept at most before it is dropped. QUIC keeps one three
/// probe timeouts (RFC 9000, 10.2) to answer a late packet with its close again, and the probe
/// timeout includes the peer's `max_ack_delay`, which the peer chooses, up to 16 s: a client
/// closed before it logged in (and so no longer counted against its address or the
/// unauthenticated limit) could otherwise hold its slot and QUIC state for about 50 s, and
/// enough of them every slot of the shard. Three seconds is three probe timeouts of a round
/// trip near a second; a peer whose close went missing meanwhile learns of it from a
/// stateless reset.
const CLOSED_LINGER_MAX: Duration = Duration::from_secs(3);

/// Checks `Hello` tokens with the edge's keys, for the session, remembering the ones that
/// verified (`auth::VerifiedTokens`).
struct TokenAuthenticator {
    verifier: Arc<crate::auth::VerifierCell>,
    verified: RefCell<crate::auth::VerifiedTokens>,
    /// The verifier generation the cache of verified tokens belongs to.
    verified_generation: std::cell::Cell<u64>,
}

impl Authenticator for TokenAuthenticator {
    /// A token's expiry is wall time, minted by the issuer's clock: it is judged by the wall
    /// clock now, not by the server clock (`_server_secs`), which keeps the wall time of the
    /// edge's start and stays behind a clock set forward since (a VM booted with a slow clock
    /// and synced after the edge started: tokens expired hours ago were taken until a restart)
    /// or ahead of it by the stores' mark (valid tokens refused as expired).
    fn authenticate(
        &self,
        token: &[u8],
        device: u32,
        _server_secs: u64,
    ) -> Result<courier_core::UserId, AuthFailure> {
        let now_secs = courier_core::clock::wall_clock_ms() / 1_000;
        let (verifier, generation) = self.verifier.current();
        if generation != self.verified_generation.get() {
            // The keys were reloaded: what verified before may not any more.
            self.verified.borrow_mut().clear();
            self.verified_generation.set(generation);
        }
        let claims = self
            .verified
            .borrow_mut()
            .verify(&verifier, token, now_secs)
            .map_err(|error| AuthFailure {
                code: match error {
                    crate::auth::AuthError::Expired { .. } => ErrorCode::TokenExpired,
                    _ => ErrorCode::Unauthenticated,
                },
                reason: error.to_string(),
            })?;
        if claims.device != device {
            return Err(AuthFailure {
                code: ErrorCode::Unauthenticated,
                reason: "token was minted for another device".into(),
            });
        }
        Ok(claims.user)
    }
}

/// Where the control thread waits for a purge's commit.
type PurgeReply = flume::Sender<Result<(), String>>;

/// The state of one shard.
pub struct Shard {
    id: u8,
    shard_count: u32,
    /// The largest UDP payload the endpoint takes (`EndpointConfig::max_udp_payload_size`).
    datagram_bytes_max: u64,
    /// Messages in each channel to another shard (`Config::mesh_channel_capacity`).
    mesh_channel_messages: usize,
    config: Arc<Config>,
    core: CoreConfig,
    store: Arc<dyn ShardStore>,
    /// Threads that run the store's commits, reads and maintenance.
    lanes: StoreLanes,
    /// Server time for commits, reads, expiry and logins; never runs backwards.
    clock: ServerClock,
    endpoint: Endpoint,
    /// Boxed: a quinn connection is several KB, and a map of inline values would keep that
    /// much in every empty slot of its capacity.
    conns: FastHashMap<ConnectionHandle, Box<Conn>>,
    next_generation: u64,
    /// Each connection's next timeout, exactly one entry per connection with a timer
    /// (`Conn::timer_armed`): re-arming replaces the entry, so the set never holds more than
    /// the open connections. (A heap with lazily skipped stale entries grew by one far-future
    /// idle deadline per timer fire and was 8% of the edge's CPU at 10,000 msgs/s.)
    timers: BTreeSet<(Instant, usize, u64)>,
    timer_wake: Option<LocalSender<()>>,
    armed_deadline: Option<Instant>,
    /// When waiting acks are due to be committed on their own (server ms and its instant).
    batch_timer: Option<(u64, Instant)>,
    dirty: Vec<ConnectionHandle>,
    session: EdgeSession<TokenAuthenticator>,
    committer: Option<Committer>,
    mesh: Option<Rc<Senders<MeshMessage>>>,
    /// Per peer shard: messages that found its channel full, in order. A task per peer feeds
    /// them in as room appears; while it runs, new messages queue behind them.
    mesh_backlog: Vec<VecDeque<MeshMessage>>,
    mesh_draining: Vec<bool>,
    /// Connections with undecoded input, waiting for the mesh to drain.
    parked: Vec<ConnectionHandle>,
    /// Connections per peer address group ([`address_group`]) whose handshake is in progress
    /// or whose `Hello` was not accepted yet (`limits.handshakes_per_address_max`).
    handshakes_by_address: FastHashMap<IpAddr, usize>,
    memory: Arc<crate::memory::MemoryGuard>,
    health: Arc<crate::health::Health>,
    metrics: crate::metrics::ShardMetrics,
    /// Operators waiting for a purge of this user's inbox to commit, each with the number of
    /// the first batch that can carry its purge (`EdgeSession::batches_taken` when it asked).
    purge_waiters: FastHashMap<UserId, Vec<(u64, PurgeReply)>>,
    /// Own batches taken and not yet handed to the session, oldest first: each one's number
    /// and, once its commit is written and durable (or failed), its result. The session
    /// takes them in this order (decision 0027: two can be in flight).
    own_commits: VecDeque<(u64, Option<OwnCommitDone>)>,
    /// A commit the committer wrote failed to become durable while the committer was out on
    /// the writer: what it cached may be ahead of the store, so it forgets it on return.
    committer_stale: bool,
    /// After a failed commit, no batch is taken before this (`COMMIT_RETRY_DELAY`); the timer
    /// task, which wakes at least every `SHUTDOWN_POLL`, tries again.
    commit_retry_at: Option<Instant>,
    /// When the gauges were last set (`publish_gauges`).
    gauges_published_at: Instant,
    /// `EdgeSession::deliveries_held_for_acks` at the last publish: the counter's increments.
    deliveries_held_published: u64,
    /// `EdgeSession::deliveries_held_for_room` at the last publish.
    deliveries_held_for_room_published: u64,
    stats: ShardStats,
    stats_logged: ShardStats,
    stats_logged_at: Instant,
    socket: Rc<Socket>,
    /// The socket this shard's links to other edges send from, on a port of its own: the
    /// shards share the listening port, and the answers to a link's handshake (long-header
    /// packets, which are not steered by connection id) must come back to this shard.
    link_socket: Option<Rc<Socket>>,
    transmit_buf: Vec<u8>,
    self_ref: Weak<RefCell<Shard>>,
    shutdown: Arc<std::sync::atomic::AtomicBool>,
    abort: Arc<std::sync::atomic::AtomicBool>,
    exit_when_fenced: bool,
    /// Shutting down: no new connections; connections close once commits are done.
    draining: bool,
    /// The store failed a write and is being reopened (`store_refused`).
    store_recovering: bool,
    /// The first pause of the last reopen, and when that reopen worked: the next failure
    /// within `STORE_RECOVERY_PAUSE_KEPT` of it waits twice as long before its reopen. On
    /// fjall a reopen works on a full disk and a commit soon fails again: each reopen
    /// starting from the shortest pause, a shard replayed its journal every 0.6 s for as long
    /// as the disk stayed full.
    store_recovery_pause: Duration,
    store_reopened_at: Option<Instant>,
    /// The store is near its memory bound (`note_store_full`): sends are refused.
    store_full: bool,
    /// The store's count of its background work falling behind, at the last gauges: the
    /// counter moves on by the difference (a reopened store counts from 0 again).
    background_behind_seen: u64,
    /// Budget of connection close and loss log lines, so a connection flood is not a log flood.
    connection_logs: courier_core::budget::TokenBucket,
    connections_closed: bool,
    /// The other edges and this shard's links to them (`[cluster]`).
    cluster: Option<links::Cluster>,
    /// Links other edges opened to this shard, by the session's id for them.
    in_links: FastHashMap<u64, ConnectionHandle>,
    /// The lease thread (takeover), and the version of its view this shard applied last.
    takeover: Option<Arc<crate::takeover::Takeover>>,
    takeover_version: u64,
    /// The guest edges this shard serves (takeover): each one's lease and committer.
    guests: ShardGuests,
    /// A drain handed this edge's users to this edge: clients are redirected there.
    drained_to: Option<EdgeId>,
    /// After a failed guest commit, guests commit again from then on.
    guest_retry_at: Option<Instant>,
}

/// Counts of what a shard dropped under overload, logged periodically (see `log_stats`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct ShardStats {
    session: SessionStats,
    /// Datagrams and signals dropped because a peer shard's backlog was full.
    mesh_messages_dropped: u64,
    /// Control messages dropped at the backlog's hard maximum (should stay 0).
    mesh_control_dropped: u64,
    /// New connections refused: too many unauthenticated on the shard, or too many
    /// handshakes from one address.
    handshakes_refused: u64,
    /// New connections asked to prove their address first (QUIC Retry).
    retries_sent: u64,
    /// Connections closed with their TLS handshake not done by `limits.hello_timeout_ms`.
    handshakes_timed_out: u64,
    /// Connection close and loss lines not logged (over `CONNECTION_LOGS_PER_SEC`).
    connection_logs_suppressed: u64,
}

/// The shard's UDP socket: glommio waits for readability, quinn-udp does the I/O.
struct Socket {
    std: std::net::UdpSocket,
    glommio: glommio::net::UdpSocket,
    state: quinn_udp::UdpSocketState,
}

/// The session's settings from the edge's configuration.
fn session_config(id: u8, shard_count: u32, config: &Config, core: &CoreConfig) -> SessionConfig {
    let limits = &config.limits;
    SessionConfig {
        shard: id,
        shard_count,
        connections_per_user_max: limits.connections_per_user_max,
        sends_in_flight_per_connection_max: limits.sends_in_flight_per_connection_max,
        send_bytes_in_flight_per_connection_max: limits.send_bytes_in_flight_per_connection_max,
        outbound_bytes_per_connection_max: limits.outbound_bytes_per_connection_max,
        deliveries_unacked_per_connection_max: limits.deliveries_unacked_per_connection_max,
        send_budget_per_connection: limits.send_per_connection.budget(),
        signal_rate_per_connection: courier_core::budget::Rate {
            per_sec: limits.signals_per_connection_per_sec,
            burst: limits.signals_per_connection_burst,
        },
        control_frame_rate_per_connection: courier_core::budget::Rate {
            per_sec: limits.control_frames_per_connection_per_sec,
            burst: limits.control_frames_per_connection_burst,
        },
        send_budget_per_user: limits.send_per_user.budget(),
        recipients_per_user_per_window_max: limits.recipients_per_user_per_window_max,
        recipients_window_ms: limits.recipients_window_secs.saturating_mul(1000),
        hello_timeout_ms: limits.hello_timeout_ms,
        frame_timeout_ms: limits.frame_timeout_ms,
        cluster: links::cluster_view(config),
        link_requests_in_flight_max: config.cluster.link_requests_in_flight_max,
        // Half the unsent bytes a link may hold: sends beyond it are refused as `Overloaded`
        // before the link would have to be closed for them.
        link_send_bytes_in_flight_max: config.cluster.link_outbound_bytes_max / 2,
        core: core.clone(),
    }
}

/// Whether one more connection close or loss may be logged now; counts it if not. A function
/// of the two fields, not of the shard, so it can run while a connection is borrowed.
fn connection_log_allowed(
    budget: &mut courier_core::budget::TokenBucket,
    stats: &mut ShardStats,
) -> bool {
    if budget.has(CONNECTION_LOGS, 1, monotonic_ms()) {
        budget.take(CONNECTION_LOGS, 1);
        true
    } else {
        stats.connection_logs_suppressed += 1;
        false
    }
}

/// What `limits.handshakes_per_address_max` counts by: an IPv4 address, or an IPv6 address's
/// /64 (one subscriber's network: a single host may hold all of it). An IPv4 address mapped into
/// IPv6 (a dual-stack socket) counts as itself, not as one /64 with every IPv4 client.
fn address_group(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !u128::from(u64::MAX),
            )),
        },
    }
}

/// The edge's server clock, started by the first shard to need it and then the same for
/// every shard. Each shard started its own before: whenever the wall clock was behind the
/// stores' mark, each anchored at the mark at its own start, and a shard that started later
/// ran behind the others by the time between their starts for the life of the process (and
/// judged another shard's inbox, or a dedupe bucket, by a time its owner had not reached).
#[derive(Debug, Default)]
pub struct EdgeClock(std::sync::Mutex<Option<ServerClock>>);

impl EdgeClock {
    /// The clock, started by `start` if no shard has started it yet (an error leaves it for
    /// the next shard to try).
    pub fn get_or_start<E>(
        &self,
        start: impl FnOnce() -> Result<ServerClock, E>,
    ) -> Result<ServerClock, E> {
        let mut clock = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(clock) = *clock {
            return Ok(clock);
        }
        let started = start()?;
        *clock = Some(started);
        Ok(started)
    }
}

/// Milliseconds of a monotonic clock shared by the process's shards.
fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

fn bind_socket(listen: SocketAddr, buffer_bytes: usize) -> std::io::Result<Socket> {
    let domain = socket2::Domain::for_address(listen);
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    socket.set_reuse_address(true)?;
    // The kernel may cap these (net.core.rmem_max); that is not fatal.
    let _ = socket.set_recv_buffer_size(buffer_bytes);
    let _ = socket.set_send_buffer_size(buffer_bytes);
    socket.set_nonblocking(true)?;
    socket.bind(&listen.into())?;
    let std_socket: std::net::UdpSocket = socket.into();
    let state = quinn_udp::UdpSocketState::new((&std_socket).into())?;
    let for_glommio = std_socket.try_clone()?;
    let glommio = glommio::net::UdpSocket::from(socket2_glommio::Socket::from(for_glommio));
    Ok(Socket {
        std: std_socket,
        glommio,
        state,
    })
}

/// Runs one shard until the process ends.
pub async fn run(setup: ShardSetup, mesh: Option<MeshBuilder<MeshMessage, Full>>) {
    let (senders, receivers) = match mesh {
        Some(builder) => match builder.join().await {
            Ok((senders, receivers)) => (Some(senders), Some(receivers)),
            Err(error) => {
                let _ = setup
                    .ready
                    .send(Err(format!("cannot join the shard mesh: {error}").into()));
                return;
            }
        },
        None => (None, None),
    };
    let id = senders.as_ref().map_or(0, |s| s.peer_id()) as u8;
    let socket = match bind_socket(
        setup.config.server.listen,
        setup.config.server.socket_buffer_bytes,
    ) {
        Ok(socket) => Rc::new(socket),
        Err(error) => {
            let _ = setup.ready.send(Err(StartError::from(format!(
                "shard {id}: cannot bind {}: {error}",
                setup.config.server.listen
            ))));
            return;
        }
    };
    let link_socket = if setup.link_client_config.is_some() {
        let address = SocketAddr::new(setup.config.server.listen.ip(), 0);
        match bind_socket(address, setup.config.server.socket_buffer_bytes) {
            Ok(socket) => Some(Rc::new(socket)),
            Err(error) => {
                let _ = setup.ready.send(Err(StartError::from(format!(
                    "shard {id}: cannot bind a socket for links on {address}: {error}"
                ))));
                return;
            }
        }
    } else {
        None
    };
    let store = match (setup.open_store)(id) {
        Ok(store) => store,
        Err(error) => {
            let _ = setup
                .ready
                .send(Err(StartError::from(format!("shard {id}: {error}"))));
            return;
        }
    };
    let lanes = match StoreLanes::start(
        id,
        setup.config.limits.store_reads_queued_max,
        setup.cpu,
        setup.config.server.store_writer_nice,
    ) {
        Ok(lanes) => lanes,
        Err(error) => {
            let _ = setup
                .ready
                .send(Err(StartError::from(format!("shard {id}: {error}"))));
            return;
        }
    };
    // Dedupe buckets and expiry run on a clock that never goes back (core::clock), the
    // edge's one clock.
    let clock = setup
        .clock
        .get_or_start(|| -> Result<ServerClock, StoreError> {
            let high_water_ms = store.clock_high_water()?;
            let wall_ms = wall_clock_ms();
            // A wall clock well behind the stores' mark means the host's clock stepped back (or
            // NTP is not running): send times and expiry run from the mark instead, ahead of wall
            // time by as much for the life of the process.
            let behind_ms = high_water_ms.saturating_sub(wall_ms);
            if behind_ms > CLOCK_BEHIND_WARN_MS {
                warn!(
                    behind_ms,
                    "the wall clock is behind the latest time the stores used; the edge runs from \
                 that time, ahead of the wall clock by as much until it restarts after the wall \
                 clock caught up: check the host's clock and NTP"
                );
            }
            Ok(ServerClock::start(wall_ms, high_water_ms, monotonic_ms()))
        });
    let clock = match clock {
        Ok(clock) => clock,
        Err(error) => {
            let _ = setup.ready.send(Err(StartError::from(format!(
                "shard {id}: cannot read the clock high-water mark: {error}"
            ))));
            return;
        }
    };
    // The expiry index's keys hold bucket numbers, and dedupe records' keys window numbers: a
    // store written with another size would keep what they index for good (and, for the
    // window, store again a retry sent across the change).
    let (expiry_bucket_ms, dedupe_window_ms) =
        (setup.core.expiry_bucket_ms, setup.core.dedupe_window_ms);
    match store.key_sizes_mismatch(expiry_bucket_ms, dedupe_window_ms) {
        Ok(None) => {}
        Ok(Some(stored)) if stored.expiry_bucket_ms != expiry_bucket_ms => {
            let _ = setup.ready.send(Err(StartError::lasting(format!(
                "shard {id}: retention.expiry_bucket_secs is {} but this store's expiry index \
                 was written with {}: set it back to {} (the size cannot change on a store \
                 that holds messages; to change it, start on empty stores)",
                expiry_bucket_ms / 1000,
                stored.expiry_bucket_ms / 1000,
                stored.expiry_bucket_ms / 1000
            ))));
            return;
        }
        Ok(Some(stored)) => {
            let stored_secs = stored.dedupe_window_ms.unwrap_or_default() / 1000;
            let _ = setup.ready.send(Err(StartError::lasting(format!(
                "shard {id}: retention.dedupe_window_secs is {} but this store's dedupe records \
                 were written with {stored_secs}: set it back to {stored_secs} (the window \
                 cannot change on a store that holds messages: expiry would never reach the \
                 records written before, and a retry sent across the change would be stored \
                 twice; to change it, start on empty stores)",
                dedupe_window_ms / 1000,
            ))));
            return;
        }
        Err(error) => {
            let _ = setup.ready.send(Err(StartError::from(format!(
                "shard {id}: cannot read the store's expiry bucket and dedupe window: {error}"
            ))));
            return;
        }
    }
    // Recorded where they are not yet. A store that refuses the write now (at its memory
    // bound, on a full disk) still starts, so that expiry can free it: the next start records
    // them.
    if let Err(error) = store.record_key_sizes(expiry_bucket_ms, dedupe_window_ms) {
        warn!(
            shard = id,
            %error,
            "cannot record the expiry bucket and dedupe window in the store; the next start tries \
             again"
        );
    }
    let mut endpoint_config = EndpointConfig::new(setup.reset_key.clone());
    endpoint_config.cid_generator(move || Box::new(ShardCidGenerator::new(id)));
    endpoint_config.supported_versions(vec![1]);
    // A restarted edge answers every packet of a connection it forgot with a stateless reset,
    // so its clients reconnect at once. quinn spaces resets 20 ms apart by default, which
    // turns a thousand clients into twenty seconds of waiting. A reset is always smaller than
    // the packet that caused it, so answering each one amplifies nothing.
    endpoint_config.min_reset_interval(Duration::ZERO);
    let datagram_bytes_max = endpoint_config.get_max_udp_payload_size();
    let endpoint = Endpoint::new(
        Arc::new(endpoint_config),
        Some(setup.server_config.clone()),
        !socket.state.may_fragment(),
        None,
    );
    let shard = Rc::new(RefCell::new(Shard {
        id,
        shard_count: setup.shard_count,
        datagram_bytes_max,
        mesh_channel_messages: setup.config.mesh_channel_capacity(),
        core: setup.core.clone(),
        store,
        lanes,
        clock,
        endpoint,
        conns: FastHashMap::default(),
        next_generation: 1,
        timers: BTreeSet::new(),
        timer_wake: None,
        armed_deadline: None,
        batch_timer: None,
        dirty: Vec::new(),
        session: EdgeSession::new(
            session_config(id, setup.shard_count, &setup.config, &setup.core),
            TokenAuthenticator {
                verifier: setup.verifier.clone(),
                verified_generation: std::cell::Cell::new(0),
                verified: RefCell::new(crate::auth::VerifiedTokens::new(
                    setup.config.auth.verified_tokens_per_shard_max,
                )),
            },
        ),
        committer: Some(Committer::new(&setup.core)),
        mesh: senders.map(Rc::new),
        mesh_backlog: (0..setup.shard_count).map(|_| VecDeque::new()).collect(),
        mesh_draining: vec![false; setup.shard_count as usize],
        parked: Vec::new(),
        handshakes_by_address: FastHashMap::default(),
        memory: setup.memory.clone(),
        health: setup.health.clone(),
        metrics: setup.metrics.shard(u32::from(id)),
        purge_waiters: FastHashMap::default(),
        own_commits: VecDeque::new(),
        committer_stale: false,
        commit_retry_at: None,
        gauges_published_at: Instant::now(),
        deliveries_held_published: 0,
        deliveries_held_for_room_published: 0,
        stats: ShardStats::default(),
        stats_logged: ShardStats::default(),
        stats_logged_at: Instant::now(),
        socket: socket.clone(),
        link_socket: link_socket.clone(),
        transmit_buf: Vec::with_capacity(64 * 1024),
        self_ref: Weak::new(),
        shutdown: setup.shutdown.clone(),
        abort: setup.abort.clone(),
        exit_when_fenced: setup.exit_when_fenced,
        draining: false,
        store_recovering: false,
        store_recovery_pause: STORE_RECOVERY_PAUSE_MIN,
        store_reopened_at: None,
        store_full: false,
        background_behind_seen: 0,
        connection_logs: courier_core::budget::TokenBucket::full(CONNECTION_LOGS, monotonic_ms()),
        connections_closed: false,
        takeover: setup.takeover.clone(),
        takeover_version: 0,
        guests: ShardGuests::new(&setup.core),
        drained_to: None,
        guest_retry_at: None,
        cluster: setup
            .link_client_config
            .clone()
            .map(|client| links::Cluster::new(&setup.config, client)),
        in_links: FastHashMap::default(),
        config: setup.config.clone(),
    }));
    shard.borrow_mut().connect_links(Instant::now());
    shard.borrow_mut().self_ref = Rc::downgrade(&shard);
    // A store recovered above its memory bound refuses sends from the first one on.
    shard.borrow_mut().note_store_full();

    if let Some(mut receivers) = receivers {
        for (_peer, receiver) in receivers.streams() {
            let shard = shard.clone();
            spawn_task(async move {
                let mut handled = 0;
                while let Some(message) = receiver.recv().await {
                    {
                        let mut shard = shard.borrow_mut();
                        shard.handle_mesh(message);
                        shard.after_input();
                    }
                    // `recv` returns at once while the channel holds a message, and glommio
                    // never interrupts a task: a peer that kept the channel full (a flood of
                    // datagrams naming this shard, steered here by the others) held this
                    // shard's every other task, its socket, timers and health beat included.
                    handled += 1;
                    if handled >= MESH_MESSAGES_PER_TURN_MAX {
                        handled = 0;
                        futures_lite::future::yield_now().await;
                    }
                }
            });
        }
    }

    let stopped = setup.stopped.clone();
    // The timer task ends the executor (the receive loop below never ends by itself) once the
    // shard finished a shutdown, or at once on an abort.
    let (end_tx, end_rx) = local_channel::new_bounded::<()>(1);
    let (wake_tx, wake_rx) = local_channel::new_bounded::<()>(1);
    shard.borrow_mut().timer_wake = Some(wake_tx);
    {
        let shard = shard.clone();
        spawn_task(async move {
            loop {
                let deadline = shard.borrow().armed_deadline;
                // Wake at least every SHUTDOWN_POLL to notice a shutdown request.
                // Timer slack: timers due within TIMER_SLACK of the earliest fire together, one
                // wake-up for many connections' acknowledgement and loss timers.
                let wait = deadline
                    .map_or(SHUTDOWN_POLL, |d| {
                        d.saturating_duration_since(Instant::now()) + TIMER_SLACK
                    })
                    .min(SHUTDOWN_POLL);
                futures_lite::future::or(
                    async {
                        glommio::timer::sleep(wait).await;
                    },
                    async {
                        let _ = wake_rx.recv().await;
                    },
                )
                .await;
                let mut shard = shard.borrow_mut();
                if shard.aborted() {
                    let _ = end_tx.try_send(());
                    return;
                }
                shard.handle_timeouts(Instant::now());
                shard.notice_poisoned_store();
                shard.apply_takeover();
                shard.after_input();
                shard.log_stats(Instant::now());
                shard.publish_gauges(Instant::now());
                if shard.poll_shutdown() {
                    shard.after_input();
                    let _ = stopped.send(shard.id);
                    let _ = end_tx.try_send(());
                    return;
                }
            }
        });
    }

    {
        // Requests from `courier-edge ctl` (the control thread).
        let shard = shard.clone();
        let control = setup.control.clone();
        spawn_task(async move {
            while let Ok(request) = control.recv_async().await {
                shard.borrow_mut().handle_control(request);
            }
        });
    }

    {
        // Every shard expires its own store, on its maintenance thread.
        let shard = shard.clone();
        let interval = Duration::from_secs(setup.config.retention.expiry_interval_secs);
        spawn_task(async move {
            loop {
                glommio::timer::sleep(interval).await;
                let (store, core, clock, lane) = {
                    let shard = shard.borrow();
                    (
                        shard.store.clone(),
                        shard.core.clone(),
                        shard.clock,
                        shard.lanes.maintenance.clone(),
                    )
                };
                loop {
                    let (store, core) = (store.clone(), core.clone());
                    let now = clock.now(monotonic_ms());
                    let report = lane.run_store(move || store.expire(now, &core)).await;
                    if let Ok(report) = &report {
                        let mut shard = shard.borrow_mut();
                        shard
                            .metrics
                            .expired_messages
                            .inc_by(report.messages_deleted);
                        shard
                            .metrics
                            .expiry_index_entries_cleared
                            .inc_by(report.index_entries_cleared);
                        shard.forget_emptied(&report.emptied);
                        // Expiry frees room in a store at its memory bound.
                        shard.note_store_full();
                        if let Some(error) = &report.dedupe_tables_drop_failed {
                            warn!(
                                shard = id,
                                %error,
                                "dropping old dedupe tables failed; expiry deletes their records \
                                 one by one"
                            );
                        }
                    }
                    if let Ok(ExpireReport {
                        store_failed: Some(error),
                        ..
                    }) = &report
                    {
                        // One of the shared stores: the others' passes ran and go on.
                        shard.borrow_mut().store_refused(error);
                        warn!(
                            shard = id,
                            %error,
                            "expiry pass failed on one store; the others go on, and it is tried \
                             again at the next interval"
                        );
                    }
                    match report {
                        Ok(report) if report.more => continue,
                        Ok(report) => {
                            debug!(deleted = report.messages_deleted, "expiry pass");
                            if report.devices_behind {
                                sweep_devices_behind(&shard, now).await;
                            }
                            break;
                        }
                        Err(error) => {
                            shard.borrow_mut().store_refused(&error);
                            warn!(%error, "expiry pass failed; retrying at the next interval");
                            break;
                        }
                    }
                }
            }
        });
    }

    {
        // Deleted means gone from disk (R4): every half of the bound, on the maintenance thread.
        // The first after a start comes when the period the last complete pass began is due
        // (its record is in the store's directory), and at most `OVERDUE_WAIT_MAX` after the
        // start when that is past: an edge restarted often (deploys, a crash loop) still
        // erases, and a restart does not redo a pass that just ran.
        let shard = shard.clone();
        let erase_within_ms = setup.config.retention.erase_within_secs * 1000;
        let interval = Duration::from_millis(erase_within_ms / 2);
        let now_ms = wall_clock_ms();
        let last_pass_ms = shard.borrow().store.last_complete_erase_ms();
        let mut wait = crate::erase_record::first_wait(last_pass_ms, now_ms, interval);
        // For the metric (and the alert on it; no series on FoundationDB): a store without a
        // usable record counts from when the stores were made, so one that never completed a
        // pass shows overdue, and with neither known it claims nothing (0).
        let since_ms = last_pass_ms
            .filter(|last| *last <= now_ms)
            .or_else(|| shard.borrow().store.stores_made_ms())
            .unwrap_or(0)
            .min(now_ms);
        shard.borrow().metrics.erase_complete_since(since_ms);
        debug!(
            shard = id,
            wait_ms = wait.as_millis() as u64,
            "first erase pass scheduled"
        );
        spawn_task(async move {
            let mut unfinished_in_a_row = 0u32;
            loop {
                glommio::timer::sleep(wait).await;
                let (store, lane) = {
                    let shard = shard.borrow();
                    (shard.store.clone(), shard.lanes.maintenance.clone())
                };
                let started = Instant::now();
                let report = lane.run_store(move || store.erase_deleted()).await;
                let complete = match &report {
                    Ok(Some(pass)) => pass.complete,
                    Ok(None) => true,
                    Err(_) => false,
                };
                unfinished_in_a_row = if complete {
                    0
                } else {
                    unfinished_in_a_row.saturating_add(1)
                };
                wait = crate::erase_record::next_wait(
                    unfinished_in_a_row,
                    started.elapsed(),
                    interval,
                );
                {
                    let metrics = &shard.borrow().metrics;
                    match &report {
                        Ok(Some(pass)) if pass.complete => {
                            metrics.erase_pass_complete(pass.started_unix_ms)
                        }
                        Ok(Some(_)) => metrics.erase_pass_partial(),
                        Ok(None) => {}
                        Err(_) => metrics.erase_pass_failed(),
                    }
                }
                match report {
                    Ok(Some(report)) => {
                        if report.rewrites > 0 {
                            debug!(
                                shard = id,
                                rewrites = report.rewrites,
                                disk_bytes_before = report.disk_bytes_before,
                                disk_bytes_after = report.disk_bytes_after,
                                complete = report.complete,
                                elapsed_ms = started.elapsed().as_millis() as u64,
                                "erase pass"
                            );
                        }
                        if let Some(error) = report.record_failed {
                            warn!(
                                shard = id,
                                %error,
                                "recording the erase pass failed; a restart schedules the \
                                 next pass from the record before (earlier: no pass put off)"
                            );
                        }
                    }
                    Ok(None) => {}
                    Err(error) => {
                        shard.borrow_mut().store_refused(&error);
                        warn!(
                            shard = id,
                            %error,
                            retry_in_ms = wait.as_millis() as u64,
                            "erase pass failed; retrying soon"
                        );
                    }
                }
            }
        });
    }

    if let Some(delay) = forced_panic_delay(id) {
        spawn_task(async move {
            glommio::timer::sleep(delay).await;
            panic!("shard {id}: forced panic ({FORCED_PANIC_ENV})");
        });
    }

    info!(shard = id, listen = %setup.config.server.listen, "shard ready");
    let _ = setup.ready.send(Ok(id));
    // `/livez` fails when this stops: the executor no longer runs its tasks.
    let health = setup.health.clone();
    spawn_detached(async move {
        loop {
            health.beat(usize::from(id));
            glommio::timer::sleep(crate::health::SHARD_BEAT_INTERVAL).await;
        }
    });
    if let Some(link_socket) = link_socket {
        spawn_task(receive_loop(shard.clone(), link_socket));
    }
    futures_lite::future::or(
        async {
            let _ = end_rx.recv().await;
        },
        receive_loop(shard, socket),
    )
    .await;
    end_tasks().await;
}

/// An own batch whose commit is over, waiting for the ones taken before it.
struct OwnCommitDone {
    batch: Batch<ConnRef>,
    result: Result<Vec<courier_core::commit::Outcome>, StoreError>,
    /// Writing and syncing, not the wait in between.
    took: Duration,
}

/// Extra passes of the device sweep in one expiry turn, at most: 65,536 records, a day's round
/// of a store with about 94 million of them at the default minute between turns. A round still
/// behind after them says so again at the next turn.
const DEVICE_SWEEP_PASSES_PER_TURN_MAX: usize = 1024;

/// Runs the device sweep's extra passes while its round is behind its schedule
/// (`commit::sweep_devices`), on the maintenance thread, at the expiry pass's time.
async fn sweep_devices_behind(shard: &Rc<RefCell<Shard>>, now: courier_core::UnixMillis) {
    let (id, store, core, lane) = {
        let shard = shard.borrow();
        (
            shard.id,
            shard.store.clone(),
            shard.core.clone(),
            shard.lanes.maintenance.clone(),
        )
    };
    for pass in 1..=DEVICE_SWEEP_PASSES_PER_TURN_MAX {
        let (store, core) = (store.clone(), core.clone());
        match lane
            .run_store(move || store.sweep_devices(now, &core))
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                debug!(passes = pass, "device sweep caught up with its round");
                return;
            }
            Err(error) => {
                shard.borrow_mut().store_refused(&error);
                warn!(shard = id, %error, "device sweep failed; retrying at the next interval");
                return;
            }
        }
    }
}

/// Waits for datagrams and hands them to the shard, a bounded number per wake-up.
async fn receive_loop(shard: Rc<RefCell<Shard>>, socket: Rc<Socket>) {
    let batch = quinn_udp::BATCH_SIZE;
    let mut buffers: Vec<Vec<u8>> = (0..batch).map(|_| vec![0u8; RECV_BUFFER_BYTES]).collect();
    let mut metas = vec![quinn_udp::RecvMeta::default(); batch];
    let (datagrams_max, linger) = {
        let config = &shard.borrow().config;
        (
            config.limits.datagrams_per_wakeup_max,
            Duration::from_micros(config.batching.receive_linger_us),
        )
    };
    let mut linger = ReceiveLinger::new(linger, datagrams_max);
    let mut next = NextRead::WhenReadable;
    let mut peek = [0u8; 1];
    loop {
        match next {
            // Peeking waits for readability without taking the datagram; quinn-udp reads it
            // below. Through the ring alone: the socket was usually just drained, so a first
            // non-blocking try (glommio's `peek_from`) would mostly fail.
            NextRead::WhenReadable => {
                if let Err(error) = socket.glommio.peek_through_ring(&mut peek).await {
                    warn!(%error, "socket peek failed");
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
            // What arrived meanwhile is read below; an empty socket reads nothing.
            NextRead::After(wait) => glommio::timer::sleep(wait).await,
        }
        let mut handled = 0;
        while handled < datagrams_max {
            let count = {
                let mut slices: Vec<IoSliceMut<'_>> =
                    buffers.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                match socket
                    .state
                    .recv((&socket.std).into(), &mut slices, &mut metas)
                {
                    Ok(count) => count,
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(error) => {
                        debug!(%error, "recv failed");
                        break;
                    }
                }
            };
            let now = Instant::now();
            let mut shard = shard.borrow_mut();
            // The lease thread's latest view before any `Hello` is placed: a client redirected
            // here by a drained edge must not be sent back because this shard's timer task has
            // not looked yet (it looks at least every SHUTDOWN_POLL). One atomic load when
            // nothing changed.
            shard.apply_takeover();
            for (meta, buffer) in metas.iter().zip(&buffers).take(count) {
                if meta.len == 0 {
                    // An empty datagram has no segment, and counts all the same: a flood of
                    // them otherwise never reached `datagrams_max`, and the loop never yielded.
                    handled += 1;
                    continue;
                }
                let stride = meta.stride.max(1);
                for segment in buffer[..meta.len].chunks(stride) {
                    handled += 1;
                    let ecn = meta.ecn.map(|e| e as u8);
                    shard.handle_datagram(now, meta.addr, meta.dst_ip, ecn, segment);
                }
            }
            shard.after_input();
            if count < batch {
                // A short read drained the socket: wait for readability instead of asking
                // again (one `recvmmsg` that would fail per wake-up).
                break;
            }
        }
        // With the linger off (the default) every wake-up waits for readability: no clock
        // read, no borrow.
        if linger.is_on() {
            let shard = shard.borrow();
            if let NextRead::After(_) = next {
                shard
                    .metrics
                    .receive_linger_datagrams
                    .inc_by(handled as u64);
            }
            next = linger.after_reads(Instant::now(), handled);
            if let NextRead::After(_) = next {
                shard.metrics.receive_lingers.inc();
            }
        }
        glommio::yield_if_needed().await;
    }
}

/// Ends the process when another edge took the shard over, or the cluster's members changed
/// (decision 0016): nothing this process does with it can succeed any more, and its supervisor
/// restarts it as a fresh claimant. An in-process edge (tests) aborts instead.
/// What the operator is told of a purge the shard would not take.
fn purge_refused(user: UserId, refused: PurgeRefused) -> String {
    match refused {
        PurgeRefused::QueueFull => "too many purges are queued; try again".into(),
        PurgeRefused::ServedElsewhere { edge } => format!(
            "user {user} lives on edge {edge} (or is served there now): run the purge on that \
             edge"
        ),
    }
}

fn exit_if_fenced(error: &StoreError, exit: bool, abort: &std::sync::atomic::AtomicBool) {
    if matches!(error, StoreError::Fenced) {
        tracing::error!(
            %error,
            "the store refuses this process (another edge took its users over, or the \
             cluster's members changed); exiting"
        );
        if exit {
            std::process::exit(3);
        }
        abort.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Fault injection for tests: `COURIER_FAULT_PANIC_SHARD=<shard>[:<ms>]` makes that shard
/// panic `ms` milliseconds (default 500) after it is ready, to check that a panicking shard
/// ends the process with a failure status (`server::install_panic_exit`).
const FORCED_PANIC_ENV: &str = "COURIER_FAULT_PANIC_SHARD";

fn forced_panic_delay(shard: u8) -> Option<Duration> {
    let value = std::env::var(FORCED_PANIC_ENV).ok()?;
    let (target, delay_ms) = match value.split_once(':') {
        Some((target, delay)) => (target, delay.parse().ok()?),
        None => (value.as_str(), 500),
    };
    (target.parse::<u8>().ok()? == shard).then(|| Duration::from_millis(delay_ms))
}

/// Spawns a detached task whose body starts on a later turn of the executor, never inside the
/// caller.
///
/// glommio's `spawn_local` polls a new task at once, inside the spawning call. The shard spawns
/// from code that holds `RefCell<Shard>` borrowed, and a task that borrows the shard before its
/// first await would then panic with "already borrowed" (issue 8). Every spawn from shard code
/// goes through here.
fn spawn_detached(future: impl std::future::Future<Output = ()> + 'static) {
    spawn_task(async move {
        // Pending once (it wakes itself), so the body runs on a later turn.
        futures_lite::future::yield_now().await;
        future.await;
    });
}

/// Spawns a detached task of this shard that ends, at the latest, when the shard does
/// ([`end_tasks`]). glommio drops no task when its executor stops, and a task left waiting
/// keeps the shard, and so its socket and io_uring, alive: an edge that stops in-process
/// (tests) could not be started again on its address. Every task of the shard goes through
/// here.
fn spawn_task(future: impl std::future::Future<Output = ()> + 'static) {
    // The end first: a task woken by the end must not take one more step.
    glommio::spawn_local(futures_lite::future::or(shard_ended(), future)).detach();
}

/// This thread's shard end (one shard per executor thread): whether it ended, and the tasks
/// waiting for it, by key. A task that ends first removes its entry, so the map holds only
/// tasks that are still waiting.
#[derive(Default)]
struct ShardEnd {
    ended: bool,
    waiting: FastHashMap<u64, std::task::Waker>,
    next_key: u64,
}

thread_local! {
    static SHARD_END: RefCell<ShardEnd> = RefCell::new(ShardEnd::default());
}

/// Completes once [`end_tasks`] ran on this thread.
fn shard_ended() -> ShardEnded {
    ShardEnded { key: None }
}

struct ShardEnded {
    key: Option<u64>,
}

impl std::future::Future for ShardEnded {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        SHARD_END.with(|end| {
            let mut end = end.borrow_mut();
            if end.ended {
                return std::task::Poll::Ready(());
            }
            let key = *self.key.get_or_insert_with(|| {
                end.next_key += 1;
                end.next_key
            });
            match end.waiting.get_mut(&key) {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                Some(waker) => waker.clone_from(cx.waker()),
                None => {
                    end.waiting.insert(key, cx.waker().clone());
                }
            }
            std::task::Poll::Pending
        })
    }
}

impl Drop for ShardEnded {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            // During thread teardown the map may be gone already; nothing to remove then.
            let _ = SHARD_END.try_with(|end| end.borrow_mut().waiting.remove(&key));
        }
    }
}

/// Ends every task of this thread's shard (see [`spawn_task`]), and lets them run once to
/// drop what they hold.
async fn end_tasks() {
    let wakers = SHARD_END.with(|end| {
        let mut end = end.borrow_mut();
        end.ended = true;
        std::mem::take(&mut end.waiting)
    });
    for waker in wakers.into_values() {
        waker.wake();
    }
    for _ in 0..4 {
        futures_lite::future::yield_now().await;
    }
}

fn ecn_from_bits(bits: u8) -> Option<EcnCodepoint> {
    EcnCodepoint::from_bits(bits)
}

impl Shard {
    /// The server time (never backwards; see `core::clock`).
    fn now_ms(&self) -> u64 {
        self.clock.now(monotonic_ms())
    }

    fn conn_ref(&self, handle: ConnectionHandle, conn: &Conn) -> ConnRef {
        ConnRef {
            shard: self.id,
            slot: handle.0,
            generation: conn.generation,
        }
    }

    /// Sends a message to another shard, through its backlog when its channel is full.
    fn route(&mut self, shard: u8, message: MeshMessage) {
        let Some(senders) = self.mesh.clone() else {
            warn!(shard, "no mesh: dropping a message for another shard");
            return;
        };
        let peer = shard as usize;
        if !self.mesh_draining[peer] {
            match senders.try_send_to(peer, message) {
                Ok(()) => return,
                Err(glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(message))) => {
                    self.queue_for_peer(peer, message, senders);
                }
                Err(other) => warn!(shard, error = %other, "mesh send failed; message dropped"),
            }
            return;
        }
        self.queue_for_peer(peer, message, senders);
    }

    /// Queues a message behind a full channel and makes sure a task is feeding that channel.
    ///
    /// The backlog holds at most `mesh_backlog_data_max` messages; past that, what may be lost
    /// is dropped (datagrams, signals), sends are refused with `Overloaded`, and a live
    /// delivery becomes a small `CatchUp` so the connection reads the store instead. Control
    /// messages are never dropped for overload: the shard stops decoding client frames and
    /// starting commits while any backlog is congested, which bounds them; past
    /// `mesh_backlog_messages_max` (a safety net the back-pressure keeps out of reach) even they
    /// are dropped, loudly, so memory stays bounded.
    fn queue_for_peer(
        &mut self,
        peer: usize,
        mut message: MeshMessage,
        senders: Rc<Senders<MeshMessage>>,
    ) {
        let queued = self.mesh_backlog[peer].len();
        if queued >= self.mesh_backlog_data_max() {
            match message.on_overload() {
                Overload::Drop => {
                    self.stats.mesh_messages_dropped += 1;
                    self.metrics.mesh_messages_dropped.inc();
                    return;
                }
                Overload::Refuse => {
                    if let MeshMessage::Session(ShardMessage::Send { send, reply }) = message {
                        // Answer as the home shard would have.
                        let now = self.now_ms();
                        self.session.handle_message(
                            now,
                            ShardMessage::SendResult {
                                reply,
                                client_id: send.client_id,
                                body_bytes: send.body.len(),
                                result: Err(ErrorCode::Overloaded),
                            },
                        );
                    }
                    return;
                }
                Overload::CatchUp => {
                    if let MeshMessage::Session(inner) = message {
                        message = MeshMessage::Session(inner.degrade());
                    }
                }
                Overload::Keep => {}
            }
            if queued >= self.mesh_backlog_messages_max() {
                tracing::error!(
                    peer,
                    queued,
                    kind = message.kind(),
                    "mesh backlog at its hard maximum: control message dropped"
                );
                self.stats.mesh_control_dropped += 1;
                return;
            }
        }
        self.mesh_backlog[peer].push_back(message);
        if self.mesh_draining[peer] {
            return;
        }
        self.mesh_draining[peer] = true;
        let Some(shard) = self.self_ref.upgrade() else {
            return;
        };
        spawn_detached(async move {
            loop {
                let next = shard.borrow_mut().mesh_backlog[peer].pop_front();
                let Some(message) = next else {
                    let mut shard = shard.borrow_mut();
                    shard.mesh_draining[peer] = false;
                    shard.resume_parked();
                    shard.after_input();
                    return;
                };
                if let Err(error) = senders.send_to(peer, message).await {
                    warn!(peer, %error, "mesh peer gone; dropping its backlog");
                    let mut shard = shard.borrow_mut();
                    shard.mesh_backlog[peer].clear();
                    shard.mesh_draining[peer] = false;
                    // The backlog that parked connections is gone with it.
                    shard.resume_parked();
                    shard.after_input();
                    return;
                }
                let mut shard = shard.borrow_mut();
                if !shard.parked.is_empty() && !shard.mesh_congested() {
                    shard.resume_parked();
                    shard.after_input();
                }
            }
        });
    }

    /// Backlog length past which droppable messages are dropped and sends refused.
    fn mesh_backlog_data_max(&self) -> usize {
        4 * self.mesh_channel_messages
    }

    /// Backlog length past which even control messages are dropped. Back-pressure keeps the
    /// backlog far below it; it exists so that memory stays bounded whatever happens.
    fn mesh_backlog_messages_max(&self) -> usize {
        (64 * self.mesh_channel_messages).max(MESH_BACKLOG_MESSAGES_MIN)
    }

    /// True while some peer's backlog holds a channel's worth: the shard then decodes no client
    /// frames and starts no commits, the two sources of new cross-shard messages.
    fn mesh_congested(&self) -> bool {
        let channel = self.mesh_channel_messages;
        self.mesh_backlog
            .iter()
            .any(|backlog| backlog.len() >= channel)
    }

    /// Decodes and reads again the connections that stopped decoding while the mesh was
    /// congested.
    fn resume_parked(&mut self) {
        let now = Instant::now();
        for handle in std::mem::take(&mut self.parked) {
            let Some(mut conn) = self.conns.remove(&handle) else {
                continue;
            };
            conn.parked = false;
            if conn.kind == ConnKind::Client {
                self.decode_frames(now, handle, &mut conn);
                self.read_stream(now, handle, &mut conn);
            } else {
                self.decode_link_frames(handle, &mut conn);
                self.read_link_stream(handle, &mut conn);
            }
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(handle);
            }
            self.conns.insert(handle, conn);
        }
    }

    /// Work after any input: the session's effects, a group commit, transmits.
    fn after_input(&mut self) {
        self.apply_effects();
        self.maybe_start_commit();
        let acks_sent_early = self.send_acks_due_soon(Instant::now());
        self.flush();
        // Connections that drained during the flush leave unregistrations behind.
        self.apply_effects();
        if acks_sent_early {
            self.timer_task_sleeps_on();
        }
    }

    /// Marks for the coming flush the connections whose delayed acknowledgement is due before
    /// the shard would next wake anyway, so that it leaves in this wake-up rather than in one
    /// of its own: at a low rate each recipient's `Ack` of a delivery was acknowledged in a
    /// timer wake-up of its own. "Next" is `TIMER_SLACK` (how late timers may fire) plus the
    /// receive linger (how long a lingering shard leaves its socket), and no more: a later
    /// acknowledgement still has time to ride in the next packet to its peer (measured: at
    /// 10 ms, 2,500 msgs/s took 0.5 datagrams more per message; decision 0009). Looks only at
    /// the front of the timer set: a connection whose earliest timer is later has no
    /// acknowledgement due sooner. Returns whether any will be sent.
    fn send_acks_due_soon(&mut self, now: Instant) -> bool {
        let by = now + TIMER_SLACK + Duration::from_micros(self.config.batching.receive_linger_us);
        let mut any = false;
        for &(at, slot, generation) in self.timers.iter().take(ACKS_EARLY_ENTRIES_MAX) {
            if at > by {
                break;
            }
            let handle = ConnectionHandle(slot);
            let Some(conn) = self.conns.get_mut(&handle) else {
                continue;
            };
            if conn.generation != generation || !conn.quic.send_delayed_ack_due_by(by) {
                continue;
            }
            any = true;
            self.metrics.quic_acks_sent_early.inc();
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(handle);
            }
        }
        any
    }

    /// After timers were taken early: when the earliest left is later than the one the timer
    /// task sleeps for, wakes it now (the executor is running: no wake-up of the core) to
    /// sleep for the new one, instead of waking later for nothing.
    fn timer_task_sleeps_on(&mut self) {
        let later = match (self.earliest_deadline(), self.armed_deadline) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(earliest), Some(armed)) => earliest > armed,
        };
        if later && let Some(wake) = &self.timer_wake {
            let _ = wake.try_send(());
        }
    }

    /// Carries out what the session decided. Writing may let a paused sync continue, which
    /// adds effects; the loop takes them too.
    fn apply_effects(&mut self) {
        while let Some(effect) = self.session.poll_effect() {
            match effect {
                Effect::Write { conn, frame, live } => {
                    let handle = ConnectionHandle(conn.slot);
                    let Some(c) = self.conns.get_mut(&handle) else {
                        continue;
                    };
                    if c.generation != conn.generation || c.quic.is_closed() {
                        continue;
                    }
                    // Written to the stream by `flush`, with the rest of this wake-up's frames.
                    encode_frame(c, &frame);
                    if c.outbuf.len() >= OUTBUF_FLUSH_BYTES {
                        flush_outbuf(c);
                    }
                    self.metrics.frame_sent(frame.kind());
                    match &frame {
                        Frame::SendAck { .. } => {
                            self.metrics.sends_acked.inc();
                        }
                        Frame::SendError { code, .. } => self.metrics.send_refused(*code),
                        Frame::Deliver { sent_at_ms, .. } => {
                            let age_ms = self.clock.now(monotonic_ms()).saturating_sub(*sent_at_ms);
                            self.metrics.delivered(live, age_ms);
                        }
                        _ => {}
                    }
                    let buffered = c.outbuf.len();
                    self.mark_dirty(handle);
                    self.session.set_outbound_bytes(conn, buffered);
                }
                Effect::Close {
                    conn,
                    user,
                    code,
                    reason,
                } => {
                    let handle = ConnectionHandle(conn.slot);
                    let Some(c) = self.conns.get_mut(&handle) else {
                        continue;
                    };
                    if c.generation != conn.generation {
                        continue;
                    }
                    self.metrics.connection_closed(Some(code));
                    // Who and why, never a token or a body; at most `CONNECTION_LOGS`.
                    if connection_log_allowed(&mut self.connection_logs, &mut self.stats) {
                        info!(
                            peer = %c.quic.remote_address(),
                            user = %user.map_or_else(|| "-".to_string(), |u| u.to_string()),
                            code = ?code,
                            reason,
                            "closing connection"
                        );
                    }
                    c.closing = true;
                    let reason = Bytes::copy_from_slice(reason.as_bytes());
                    if !c.handshake_done && c.quic.is_handshaking() {
                        c.close_once_connected = Some((code, reason));
                        c.close_at = Some(Instant::now() + HELD_CLOSE_WAIT_MAX);
                        let mut held = self.conns.remove(&handle).expect("just found");
                        self.arm_timer(handle, &mut held);
                        self.conns.insert(handle, held);
                    } else {
                        c.quic.close(
                            Instant::now(),
                            VarInt::from_u32(code.to_u16().into()),
                            reason,
                        );
                    }
                    self.mark_dirty(handle);
                }
                Effect::Route { shard, message } => {
                    self.route(shard, MeshMessage::Session(message))
                }
                Effect::Read {
                    conn,
                    inbox,
                    after_seq,
                } => {
                    self.metrics.sync_reads.inc();
                    self.start_read(conn, inbox, after_seq)
                }
                Effect::ResumeInput { conn } => {
                    let handle = ConnectionHandle(conn.slot);
                    let Some(mut c) = self.conns.remove(&handle) else {
                        continue;
                    };
                    if c.generation == conn.generation {
                        let now = Instant::now();
                        // Frames that waited in the buffer first, then what QUIC holds (reading
                        // it reopens the client's flow-control window).
                        self.decode_frames(now, handle, &mut c);
                        self.read_stream(now, handle, &mut c);
                        if !c.dirty {
                            c.dirty = true;
                            self.dirty.push(handle);
                        }
                    }
                    self.conns.insert(handle, c);
                }
                Effect::Redirect {
                    conn,
                    user,
                    reconnect_to,
                } => self.redirect(conn, user, reconnect_to),
                Effect::LinkWrite { edge, frame } => self.write_link_out(edge, &frame),
                Effect::LinkReply { link, frame } => self.write_link_in(link, &frame),
            }
        }
    }

    /// Tells a client its user lives on another edge: `Goaway` with the address, the stream
    /// finished, and the connection closed by the client or, at the latest, after
    /// `REDIRECT_CLOSE_AFTER` (a close right away would discard the unsent `Goaway`).
    fn redirect(&mut self, conn: ConnRef, user: UserId, reconnect_to: String) {
        let handle = ConnectionHandle(conn.slot);
        let Some(mut c) = self.conns.remove(&handle) else {
            return;
        };
        if c.generation == conn.generation {
            debug!(user, reconnect_to, "redirecting a client to its home edge");
            let frame = Frame::Goaway {
                reason: "this user lives on another edge".into(),
                reconnect_to: Some(reconnect_to),
            };
            write_frame(&mut c, &frame);
            self.metrics.frame_sent(frame.kind());
            // Finished only once all of `Goaway` is in the stream (a finished stream takes no
            // more bytes); otherwise the close deadline ends it.
            if let Some(stream) = c.stream
                && c.outbuf.is_empty()
            {
                let _ = c.quic.send_stream(stream).finish();
            }
            c.closing = true;
            c.close_at = Some(Instant::now() + REDIRECT_CLOSE_AFTER);
            self.arm_timer(handle, &mut c);
        }
        self.conns.insert(handle, c);
        self.mark_dirty(handle);
    }

    fn mark_dirty(&mut self, handle: ConnectionHandle) {
        if let Some(conn) = self.conns.get_mut(&handle)
            && !conn.dirty
        {
            conn.dirty = true;
            self.dirty.push(handle);
        }
    }

    // ---- QUIC input ------------------------------------------------------------------------

    fn handle_datagram(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        local_ip: Option<IpAddr>,
        ecn: Option<u8>,
        data: &[u8],
    ) {
        if let Some(target) = cid::shard_of_datagram(data)
            && target != self.id
            && u32::from(target) < self.shard_count
        {
            tracing::trace!(from = self.id, to = target, %remote, "steering a datagram to its connection's shard");
            self.steer_datagram(target, remote, local_ip, ecn, data);
            return;
        }
        self.endpoint_input(now, remote, local_ip, ecn, data);
    }

    /// Hands a short-header datagram to the shard its connection id names, or drops it.
    ///
    /// Anyone can send such datagrams without a handshake, so they are never queued behind a
    /// full channel: a queue would count towards the mesh's congestion, which stops this
    /// shard decoding client frames and starting commits, and would hold up to a 64 KiB
    /// copy per datagram; and while a backlog to that shard drains, its messages go first.
    /// QUIC resends what is lost. A datagram larger than the endpoint
    /// takes (`max_udp_payload_size`, which the clients are told) is junk and goes first.
    fn steer_datagram(
        &mut self,
        target: u8,
        remote: SocketAddr,
        local_ip: Option<IpAddr>,
        ecn: Option<u8>,
        data: &[u8],
    ) {
        let peer = target as usize;
        let handed_over = data.len() as u64 <= self.datagram_bytes_max
            && !self.mesh_draining[peer]
            && self.mesh.clone().is_some_and(|senders| {
                senders
                    .try_send_to(
                        peer,
                        MeshMessage::Datagram {
                            remote,
                            local_ip,
                            ecn,
                            data: data.to_vec(),
                        },
                    )
                    .is_ok()
            });
        if !handed_over {
            self.stats.mesh_messages_dropped += 1;
            self.metrics.mesh_messages_dropped.inc();
        }
    }

    fn endpoint_input(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        local_ip: Option<IpAddr>,
        ecn: Option<u8>,
        data: &[u8],
    ) {
        let mut buf = Vec::new();
        let event = self.endpoint.handle(
            now,
            remote,
            local_ip,
            ecn.and_then(ecn_from_bits),
            BytesMut::from(data),
            &mut buf,
        );
        match event {
            None => {}
            Some(DatagramEvent::Response(transmit)) => self.send_transmit(&transmit, &buf),
            Some(DatagramEvent::ConnectionEvent(handle, event)) => {
                if let Some(conn) = self.conns.get_mut(&handle) {
                    conn.quic.handle_event(event);
                    self.process_conn(now, handle);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                let limits = &self.config.limits;
                let address = address_group(incoming.remote_address().ip());
                let unauthenticated = self.session.unauthenticated_connections();
                let from_address = self
                    .handshakes_by_address
                    .get(&address)
                    .copied()
                    .unwrap_or(0);
                // An address group holding half its budget must prove its address (Retry)
                // before it takes more: spoofed Initials never come back with the token, so
                // they cannot fill another address's budget and lock its clients out.
                let address_half_full =
                    from_address >= limits.handshakes_per_address_max.div_ceil(2);
                let retry = (unauthenticated >= limits.retry_above_unauthenticated
                    || address_half_full)
                    && incoming.may_retry();
                let refuse = self.draining
                    || self.memory.shedding()
                    || self.conns.len() >= limits.connections_per_shard_max
                    || unauthenticated >= limits.unauthenticated_connections_per_shard_max
                    || (!retry && from_address >= limits.handshakes_per_address_max);
                if refuse {
                    if !self.draining {
                        self.stats.handshakes_refused += 1;
                        self.metrics.handshakes_refused.inc();
                    }
                    let transmit = self.endpoint.refuse(incoming, &mut buf);
                    self.send_transmit(&transmit, &buf);
                    return;
                }
                if retry {
                    // Stateless: a spoofed source never comes back with the token, and the
                    // Retry packet is smaller than the Initial that caused it.
                    self.stats.retries_sent += 1;
                    self.metrics.retries_sent.inc();
                    debug!(%address, unauthenticated, "asking a new client to prove its address (QUIC Retry)");
                    match self.endpoint.retry(incoming, &mut buf) {
                        Ok(transmit) => self.send_transmit(&transmit, &buf),
                        Err(error) => self.endpoint.ignore(error.into_incoming()),
                    }
                    return;
                }
                match self.endpoint.accept(incoming, now, &mut buf, None) {
                    Ok((handle, quic)) => {
                        self.metrics.connections_accepted.inc();
                        *self.handshakes_by_address.entry(address).or_insert(0) += 1;
                        let generation = self.next_generation;
                        self.next_generation += 1;
                        let mut conn = Conn::new(quic, generation, ConnKind::Client, Some(address));
                        conn.handshake_by =
                            Some(now + Duration::from_millis(self.config.limits.hello_timeout_ms));
                        self.conns.insert(handle, Box::new(conn));
                        let now_ms = self.now_ms();
                        self.session.open_connection(
                            now_ms,
                            ConnRef {
                                shard: self.id,
                                slot: handle.0,
                                generation,
                            },
                        );
                        self.process_conn(now, handle);
                    }
                    Err(error) => {
                        debug!(cause = %error.cause, "handshake refused");
                        if let Some(transmit) = error.response {
                            self.send_transmit(&transmit, &buf);
                        }
                    }
                }
            }
        }
    }

    fn handle_timeouts(&mut self, now: Instant) {
        while let Some(&(at, slot, generation)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            let handle = ConnectionHandle(slot);
            // Dropping a connection disarms its entry, so these two checks only guard a
            // future path that forgets to.
            let Some(conn) = self.conns.get_mut(&handle) else {
                continue;
            };
            if conn.generation != generation {
                continue;
            }
            conn.timer_armed = None;
            if conn.quic.poll_timeout().is_some_and(|t| t <= now) {
                conn.quic.handle_timeout(now);
            }
            if conn.handshake_by.is_some_and(|at| at <= now) {
                conn.handshake_by = None;
                // A connection still without `Hello` is the session's to close at its own
                // deadline (the same length, checked at wake-ups), and one it closed already
                // is closing: closed here too, each would be counted twice. The first is
                // looked at again shortly: a `Hello` in 0-RTT data may come before the
                // session's deadline does, and then only this one is left.
                let awaiting_hello = self.session.awaiting_hello(ConnRef {
                    shard: self.id,
                    slot,
                    generation,
                });
                if awaiting_hello && !conn.closing && !conn.handshake_done {
                    conn.handshake_by = Some(now + HANDSHAKE_RECHECK);
                }
                if !conn.handshake_done
                    && !conn.closing
                    && !awaiting_hello
                    && !conn.quic.is_closed()
                {
                    self.stats.handshakes_timed_out += 1;
                    self.metrics.connection_closed(Some(ErrorCode::TimedOut));
                    let reason = format!(
                        "TLS handshake not done within {} ms",
                        self.config.limits.hello_timeout_ms
                    );
                    conn.quic.close(
                        now,
                        VarInt::from_u32(ErrorCode::TimedOut.to_u16().into()),
                        Bytes::from(reason),
                    );
                }
            }
            if conn.close_at.is_some_and(|at| at <= now) {
                conn.close_at = None;
                let (code, reason) = conn.close_once_connected.take().unwrap_or((
                    ErrorCode::ShuttingDown,
                    Bytes::from_static(b"redirected to the user's home edge"),
                ));
                // A link that never said hello (its deadline, `link_handshake_done`): the
                // session never saw it, so it is counted and logged here. A cluster key in
                // the wrong hands shows as these.
                if matches!(conn.kind, ConnKind::LinkIn { .. }) {
                    self.metrics.connection_closed(Some(code));
                    if connection_log_allowed(&mut self.connection_logs, &mut self.stats) {
                        warn!(
                            peer = %conn.quic.remote_address(),
                            "closing a link that never said hello"
                        );
                    }
                }
                conn.quic
                    .close(now, VarInt::from_u32(code.to_u16().into()), reason);
            }
            self.process_conn(now, handle);
        }
        self.connect_links(now);
        if self.batch_timer.is_some_and(|(_, at)| at <= now) {
            self.batch_timer = None;
        }
        // `Hello` and frame deadlines are seconds long: checking them at every wake-up of
        // this task (at least every SHUTDOWN_POLL) is precise enough.
        let now_ms = self.now_ms();
        self.session.set_shedding(self.memory.shedding());
        if self
            .session
            .next_deadline_ms()
            .is_some_and(|at| at <= now_ms)
        {
            self.session.handle_deadlines(now_ms);
        }
        self.armed_deadline = self.earliest_deadline();
    }

    /// The earliest of the connections' timers and the batch timer: what the timer task
    /// sleeps for.
    fn earliest_deadline(&self) -> Option<Instant> {
        let connections_next = self.timers.first().map(|(at, _, _)| *at);
        let batch_next = self.batch_timer.map(|(_, at)| at);
        connections_next.into_iter().chain(batch_next).min()
    }

    /// Runs a connection's state machine after an input: endpoint events, application
    /// events, stream data, timers.
    fn process_conn(&mut self, now: Instant, handle: ConnectionHandle) {
        let Some(mut conn) = self.conns.remove(&handle) else {
            return;
        };
        while let Some(event) = conn.quic.poll_endpoint_events() {
            if let Some(reply) = self.endpoint.handle_event(handle, event) {
                conn.quic.handle_event(reply);
            }
        }
        while let Some(event) = conn.quic.poll() {
            match event {
                Event::Connected => {
                    conn.handshake_done = true;
                    conn.handshake_by = None;
                    if let Some((code, reason)) = conn.close_once_connected.take() {
                        conn.close_at = None;
                        conn.quic
                            .close(now, VarInt::from_u32(code.to_u16().into()), reason);
                    }
                    if self.cluster.is_some() {
                        self.link_handshake_done(handle, &mut conn);
                    }
                    // A client counts against its address until its `Hello` is accepted (it
                    // may have come as 0-RTT data); a link is done.
                    if conn.kind != ConnKind::Client
                        || !self.session.awaiting_hello(self.conn_ref(handle, &conn))
                    {
                        self.handshake_finished(&mut conn);
                    }
                    // Clients only (an accepted link became `LinkIn` just above).
                    // On a server, `has_0rtt` says the early data was accepted (`accepted_0rtt` is a client's).
                    if conn.kind == ConnKind::Client && !conn.closing {
                        self.metrics.handshake_completed(conn.quic.has_0rtt());
                    }
                }
                Event::HandshakeDataReady => {}
                Event::ConnectionLost { .. } if conn.kind != ConnKind::Client => {
                    self.link_gone(handle, conn.kind);
                }
                Event::ConnectionLost { reason } => {
                    let conn_ref = self.conn_ref(handle, &conn);
                    if reason != quinn_proto::ConnectionError::LocallyClosed {
                        self.metrics.connection_closed(None);
                    }
                    // A connection this edge closed was logged when it closed it.
                    if reason != quinn_proto::ConnectionError::LocallyClosed
                        && connection_log_allowed(&mut self.connection_logs, &mut self.stats)
                    {
                        info!(
                        peer = %conn.quic.remote_address(),
                        user = %self
                            .session
                            .user_of(conn_ref)
                            .map_or_else(|| "-".to_string(), |u| u.to_string()),
                            %reason,
                            "connection lost"
                        );
                    }
                    if reason != quinn_proto::ConnectionError::LocallyClosed && !conn.closing {
                        self.apply_last_acks(handle, &mut conn);
                    }
                    self.session.connection_lost(conn_ref);
                }
                Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                    while let Some(id) = conn.quic.streams().accept(Dir::Bi) {
                        tracing::trace!(?id, existing = ?conn.stream, "stream opened");
                        if conn.stream.is_none() {
                            conn.stream = Some(id);
                            // A newly opened stream gets no Readable event: read it now.
                            if conn.kind == ConnKind::Client {
                                self.read_stream(now, handle, &mut conn);
                            } else {
                                self.read_link_stream(handle, &mut conn);
                            }
                        } else {
                            // One stream per connection carries the protocol.
                            let _ = conn
                                .quic
                                .recv_stream(id)
                                .stop(VarInt::from_u32(ErrorCode::UnexpectedFrame.to_u16().into()));
                        }
                    }
                }
                Event::Stream(StreamEvent::Readable { id } | StreamEvent::Writable { id })
                    if Some(id) == conn.stream && conn.kind != ConnKind::Client =>
                {
                    flush_outbuf(&mut conn);
                    if conn.closing {
                        // Its stream was stopped (`flush_outbuf`): fail the link over now.
                        self.link_gone(handle, conn.kind);
                        continue;
                    }
                    self.read_link_stream(handle, &mut conn);
                }
                Event::Stream(StreamEvent::Readable { id }) if Some(id) == conn.stream => {
                    self.read_stream(now, handle, &mut conn);
                }
                Event::Stream(StreamEvent::Writable { id }) if Some(id) == conn.stream => {
                    flush_outbuf(&mut conn);
                    // A sync may have paused for room.
                    let conn_ref = self.conn_ref(handle, &conn);
                    self.session.set_outbound_bytes(conn_ref, conn.outbuf.len());
                    // Input may have waited for room to answer it.
                    self.read_stream(now, handle, &mut conn);
                }
                Event::Stream(StreamEvent::Stopped { id, .. }) if Some(id) == conn.stream => {
                    close_for_stopped_stream(&mut conn);
                    if conn.kind != ConnKind::Client {
                        self.link_gone(handle, conn.kind);
                    }
                }
                Event::Stream(_) | Event::DatagramReceived | Event::DatagramsUnblocked => {}
            }
        }
        if conn.closing && conn.kind != ConnKind::Client {
            // A link this shard closed (its stream was stopped, a write failed): the session
            // fails what it carried now, not once the connection drains (a few round trips).
            self.link_gone(handle, conn.kind);
        }
        if self.done_with(handle, &mut conn, now) {
            let conn_ref = self.conn_ref(handle, &conn);
            self.session.connection_lost(conn_ref);
            self.link_gone(handle, conn.kind);
            self.handshake_finished(&mut conn);
            self.disarm_timer(handle, &mut conn);
            return;
        }
        self.arm_timer(handle, &mut conn);
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(handle);
        }
        self.conns.insert(handle, conn);
    }

    fn read_stream(&mut self, now: Instant, handle: ConnectionHandle, conn: &mut Conn) {
        let Some(id) = conn.stream else {
            return;
        };
        // A closed connection's stream still holds what arrived before its close: nothing of
        // it is read any more (`done_with` freed the buffers).
        if conn.quic.is_closed() {
            return;
        }
        loop {
            // Backpressure: a client that does not read its answers stops being read; QUIC
            // flow control then stops it from sending. Reading resumes on `Writable`. While
            // decoding waits (input paused, or parked for the mesh) reading waits too: read
            // on, it could reach the stream's end and close the connection with frames still
            // undecoded (`ResumeInput` and `resume_parked` read on).
            let paused = self.session.input_paused(self.conn_ref(handle, conn)) || conn.parked;
            if paused || conn.outbuf.len() >= self.config.limits.outbound_bytes_per_connection_max {
                if conn.partial_frame {
                    // The rest of the frame may wait in QUIC's buffer: not the client's delay.
                    conn.partial_frame = false;
                    let (conn_ref, now_ms) = (self.conn_ref(handle, conn), self.now_ms());
                    self.session.set_partial_frame(now_ms, conn_ref, false);
                }
                return;
            }
            let room = INBUF_BYTES_MAX.saturating_sub(conn.inbuf.len());
            if room == 0 {
                // A whole frame fits in the buffer, so a full buffer always holds one: decode.
                self.decode_frames(now, handle, conn);
                if INBUF_BYTES_MAX == conn.inbuf.len() || conn.closing || conn.parked {
                    return;
                }
                continue;
            }
            let Some(StreamRead { got, finished }) = read_chunk(conn, id, room) else {
                return;
            };
            if got {
                self.decode_frames(now, handle, conn);
            }
            if finished {
                // The client finished its stream (a graceful close, after its last frames).
                let conn_ref = self.conn_ref(handle, conn);
                self.session.close_connection(
                    conn_ref,
                    ErrorCode::ShuttingDown,
                    "stream finished".into(),
                );
                conn.closing = true;
                return;
            }
            if !got || conn.closing {
                return;
            }
        }
    }

    /// The client left (closed its connection, or went silent) while frames it sent waited
    /// here: decoding had stopped for its budget or for the mesh, or they came with its
    /// close. Its acks are applied now. They only move its cursor, and without them what it
    /// consumed stays stored until it logs in again: a graceful close's last ack was lost
    /// when the edge had not read it within the second the client waits. Other frames are
    /// dropped, as on any connection that ends. At most what QUIC's stream window holds.
    ///
    /// Acks are cumulative, so only the highest is applied: one message to the inbox's home
    /// shard per lost connection. Applied one by one, a client that filled its stream window
    /// with small acks and closed sent thousands of messages at once, past the mesh's
    /// back-pressure (nothing here waits for it), until other users' control messages were
    /// dropped at the backlog's hard maximum.
    fn apply_last_acks(&mut self, handle: ConnectionHandle, conn: &mut Conn) {
        let conn_ref = self.conn_ref(handle, conn);
        if self.session.awaiting_hello(conn_ref) {
            return;
        }
        if let Some(up_to_seq) = highest_ack_left(conn) {
            let now_ms = self.now_ms();
            self.session
                .handle_frame(now_ms, conn_ref, Frame::Ack { up_to_seq }, false);
        }
    }

    /// Decodes whole frames from the connection's input and hands them to the session.
    fn decode_frames(&mut self, _now: Instant, handle: ConnectionHandle, conn: &mut Conn) {
        let conn_ref = self.conn_ref(handle, conn);
        let now_ms = self.now_ms();
        let mut consumed_total = 0;
        let mut incomplete = false;
        loop {
            if conn.closing {
                break;
            }
            // Back-pressure: the frame waits in `inbuf`, and once that is full QUIC flow
            // control stops the client.
            if self.park_while_congested(handle, conn) {
                break;
            }
            let Some(frame_bytes_max) = self.session.frame_bytes_max(conn_ref) else {
                // Input paused (over its send budget, or at its in-flight limit): the rest
                // waits, and QUIC flow control slows the client.
                break;
            };
            let pending = &conn.inbuf[consumed_total..];
            if let Ok(Some(length_bytes)) = courier_protocol::peek_length(pending)
                && length_bytes > frame_bytes_max
            {
                let reason = format!(
                    "a frame of {length_bytes} bytes before Hello; the first frame must be a \
                     Hello of at most {frame_bytes_max} bytes"
                );
                self.session
                    .close_connection(conn_ref, ErrorCode::FrameTooLarge, reason);
                conn.closing = true;
                conn.inbuf.clear();
                return;
            }
            match courier_protocol::decode(pending) {
                Ok(Some((frame, consumed))) => {
                    consumed_total += consumed;
                    tracing::trace!(kind = frame.kind(), "frame from client");
                    self.metrics.frame_received(frame.kind());
                    let early = !conn.handshake_done && conn.quic.is_handshaking();
                    self.session.handle_frame(now_ms, conn_ref, frame, early);
                }
                Ok(None) => {
                    incomplete = consumed_total < conn.inbuf.len();
                    break;
                }
                Err(error) => {
                    self.session
                        .close_connection(conn_ref, error.code(), error.to_string());
                    conn.closing = true;
                    conn.inbuf.clear();
                    return;
                }
            }
        }
        conn.inbuf.drain(..consumed_total);
        if conn.handshaking_from.is_some()
            && conn.handshake_done
            && !self.session.awaiting_hello(conn_ref)
        {
            self.handshake_finished(conn);
        }
        // The frame timeout runs only while the rest of a frame is the client's to send: not
        // while this shard holds whole frames back (mesh congestion) or stopped reading
        // (the client does not read its answers).
        let partial = incomplete
            && !conn.parked
            && conn.outbuf.len() < self.config.limits.outbound_bytes_per_connection_max;
        if partial != conn.partial_frame {
            conn.partial_frame = partial;
            self.session.set_partial_frame(now_ms, conn_ref, partial);
        } else if partial && consumed_total > 0 {
            // A frame was finished and the next one started in this read: the timeout is
            // the new frame's, from now (a client uploading large frames back to back rarely
            // ends a read on a frame's boundary).
            self.session.restart_partial_frame(now_ms, conn_ref);
        }
    }

    // ---- Cross-shard input ------------------------------------------------------------------

    fn handle_mesh(&mut self, message: MeshMessage) {
        match message {
            MeshMessage::Datagram {
                remote,
                local_ip,
                ecn,
                data,
            } => self.endpoint_input(Instant::now(), remote, local_ip, ecn, &data),
            MeshMessage::Session(message) => {
                let now = self.now_ms();
                self.session.handle_message(now, message)
            }
            MeshMessage::PeerBack { peer } => self.peer_is_back(peer),
        }
    }

    // ---- Shutdown ---------------------------------------------------------------------------

    /// Logs what the shard dropped under overload since the last log, at most every
    /// `STATS_LOG_INTERVAL`.
    fn log_stats(&mut self, now: Instant) {
        self.stats.session = self.session.stats();
        if now < self.stats_logged_at + STATS_LOG_INTERVAL || self.stats == self.stats_logged {
            return;
        }
        let (was, is) = (self.stats_logged, self.stats);
        warn!(
            shard = self.id,
            signals_dropped = is.session.signals_dropped - was.session.signals_dropped,
            sends_overloaded = is.session.sends_overloaded - was.session.sends_overloaded,
            mesh_messages_dropped = is.mesh_messages_dropped - was.mesh_messages_dropped,
            mesh_control_dropped = is.mesh_control_dropped - was.mesh_control_dropped,
            sends_over_budget = is.session.sends_over_budget - was.session.sends_over_budget,
            frames_over_budget = is.session.frames_over_budget - was.session.frames_over_budget,
            sends_over_recipient_limit =
                is.session.sends_over_recipient_limit - was.session.sends_over_recipient_limit,
            connections_timed_out =
                is.session.connections_timed_out - was.session.connections_timed_out,
            handshakes_refused = is.handshakes_refused - was.handshakes_refused,
            handshakes_timed_out = is.handshakes_timed_out - was.handshakes_timed_out,
            sends_shed = is.session.sends_shed - was.session.sends_shed,
            retries_sent = is.retries_sent - was.retries_sent,
            connection_logs_suppressed =
                is.connection_logs_suppressed - was.connection_logs_suppressed,
            "dropped or refused under overload or abuse since the last report (signals to \
             connections that do not read, sends to a full inbox queue or over a send budget, \
             mesh messages to a busy shard, connections without Hello or with an unfinished \
             frame or handshake, handshakes over a limit)"
        );
        self.stats_logged = is;
        self.stats_logged_at = now;
    }

    /// Whether the shard must stop at once, as if its process died: an abort, or (in-process)
    /// a lease thread fenced out.
    fn aborted(&self) -> bool {
        self.abort.load(std::sync::atomic::Ordering::SeqCst)
            || self.takeover.as_ref().is_some_and(|t| t.fenced_out())
    }

    /// Advances a requested shutdown. Returns true once the shard has finished: no commit in
    /// flight, nothing queued, and every connection closed with `ShuttingDown` (clients
    /// reconnect, to this edge once it is back or to another).
    fn poll_shutdown(&mut self) -> bool {
        if !self.shutdown.load(std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        if !self.draining {
            self.draining = true;
            self.session.stop_taking_sends();
            info!(
                shard = self.id,
                "draining: refusing new connections and sends, finishing commits"
            );
        }
        // The main thread published the drain before it set `shutdown`: read it now, even if
        // this tick's earlier look came just before.
        self.apply_takeover();
        if let Some(edge) = self.drained_to {
            // The leases went to `edge`: clients are redirected there, and what was queued
            // here is refused as retryable (the session does this once). Purges waiting for
            // a commit here will not get one.
            self.session.drain_to(edge);
            for (user, waiters) in self.purge_waiters.drain() {
                let message =
                    format!("the edge drained to edge {edge}: run the purge of {user} there");
                for (_, waiter) in waiters {
                    let _ = waiter.try_send(Err(message.clone()));
                }
            }
        }
        // The sends queued are answered before the connections close: their senders wait.
        if self.committer.is_none()
            || self.session.queued_sends() > 0
            || self.session.batch_in_flight()
        {
            return false;
        }
        if !self.connections_closed {
            self.connections_closed = true;
            self.session
                .close_all(ErrorCode::ShuttingDown, "the edge is shutting down");
            self.close_links();
        }
        // Acks, logins and forgets still queued commit with the next batches. They are waited
        // for only now that the connections are closed: while clients were connected their
        // acks (each waiting `ack_commit_delay_ms`) kept the queue from ever being empty at a
        // check, and a busy edge ran out its grace without telling its clients to reconnect.
        // No new ack comes now: those waiting go at once, not after their delay.
        self.session.acks_due_now();
        self.session.queued_requests() == 0 && !self.session.batch_in_flight()
    }

    // ---- Store reads ------------------------------------------------------------------------

    /// Reads a page of `inbox` for the session on the blocking pool.
    fn start_read(&mut self, conn: ConnRef, inbox: courier_core::UserId, after_seq: u64) {
        let store = self.store.clone();
        let core = self.core.clone();
        let now = self.now_ms();
        let lane = self.lanes.reader.clone();
        let Some(shard) = self.self_ref.upgrade() else {
            return;
        };
        // The inbox may live in another shard's embedded store: its failure is that shard's to
        // recover (its own commits see it), not a reason to reopen this one's.
        let own_store = placement::home_shard(inbox, self.shard_count) == u32::from(self.id);
        spawn_detached(async move {
            let result = lane
                .run_store(move || store.read_inbox(inbox, after_seq, now, &core))
                .await;
            if let Err(error) = &result {
                if own_store {
                    shard.borrow_mut().store_refused(error);
                }
                // The session reads again at once: pause, so a failing store is not spun on.
                if *error == StoreError::Poisoned {
                    debug!(%error, "sync read failed while the store recovers; reading again shortly");
                } else {
                    warn!(%error, "sync read failed; reading again shortly");
                }
                glommio::timer::sleep(READ_RETRY_DELAY).await;
            }
            let mut shard = shard.borrow_mut();
            shard.session.handle_read(conn, after_seq, result);
            shard.after_input();
        });
    }

    // ---- Group commit -----------------------------------------------------------------------

    /// Inboxes an expiry pass emptied: those homed here are forgotten with a later batch
    /// (decision 0011; the session keeps only its own). On FoundationDB a pass covers a whole
    /// cluster; another shard's inboxes keep their counters, since only an inbox's home shard
    /// may write it.
    fn forget_emptied(&mut self, emptied: &[UserId]) {
        if emptied.is_empty() {
            return;
        }
        let now_ms = self.now_ms();
        let dropped = self.session.handle_emptied(emptied, now_ms);
        if dropped > 0 {
            debug!(dropped, "forget queue full; those inbox counters stay");
        }
        self.maybe_start_commit();
    }

    fn maybe_start_commit(&mut self) {
        self.start_own_commit();
        self.start_guest_commits();
    }

    /// Applies the lease thread's latest view to the session: guests to serve or release,
    /// and which edges serve whom.
    fn apply_takeover(&mut self) {
        let Some(takeover) = &self.takeover else {
            return;
        };
        let version = takeover.version();
        if version == self.takeover_version {
            return;
        }
        self.takeover_version = version;
        let view = takeover.view();
        self.session.set_servers(view.servers.clone());
        self.guests.apply(&mut self.session, &view.guests);
        self.drained_to = view.drained_to;
    }

    /// Starts a commit for each guest edge with a batch waiting, under its lease.
    fn start_guest_commits(&mut self) {
        if self.guests.is_empty() || self.mesh_congested() {
            return;
        }
        if self.guest_retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let now = self.now_ms();
        while let Some(mut commit) = self.guests.next(&mut self.session, now) {
            let store = self.store.clone();
            self.on_writer(
                move || {
                    let result = store.commit_guest(
                        &mut commit.committer,
                        commit.guest,
                        commit.lease,
                        &commit.batch.requests,
                        now,
                    );
                    (commit, result)
                },
                |shard, (commit, result), took| {
                    shard.measure_commit(&commit.batch, result.is_ok(), took);
                    shard.finish_guest_commit(commit, result);
                },
            );
        }
    }

    /// Runs `work` on the shard's writer thread, then `done` on the shard with its result and
    /// how long it took. The writer thread ends only with the process (a panic exits it).
    fn on_writer<R: Send + 'static>(
        &self,
        work: impl FnOnce() -> R + Send + 'static,
        done: impl FnOnce(&mut Shard, R, Duration) + 'static,
    ) {
        self.on_lane(self.lanes.writer.clone(), work, done);
    }

    /// `on_writer` on any of the shard's store lanes.
    fn on_lane<R: Send + 'static>(
        &self,
        lane: crate::lanes::Lane,
        work: impl FnOnce() -> R + Send + 'static,
        done: impl FnOnce(&mut Shard, R, Duration) + 'static,
    ) {
        let Some(shard) = self.self_ref.upgrade() else {
            return;
        };
        // Handed to the lane now, while this wake-up goes on; the task only waits for the
        // result.
        let running = lane.run(move || {
            let started = Instant::now();
            let result = work();
            (result, started.elapsed())
        });
        spawn_detached(async move {
            let Ok((result, took)) = running.await else {
                tracing::error!("the store writer thread stopped; exiting");
                std::process::exit(3);
            };
            let mut shard = shard.borrow_mut();
            done(&mut shard, result, took);
            shard.after_input();
        });
    }

    fn finish_guest_commit(
        &mut self,
        commit: GuestCommit,
        result: Result<Vec<courier_core::commit::Outcome>, StoreError>,
    ) {
        // A failing store is not spun on: guests wait as this edge's own commits do. A fenced
        // result is no failure of the store: that guest is released, the others go on.
        let failed = result
            .as_ref()
            .is_err_and(|error| *error != StoreError::Fenced);
        self.guest_retry_at = failed.then(|| Instant::now() + COMMIT_RETRY_DELAY);
        if let Err(error) = &result {
            warn!(guest = commit.guest, %error, "commit for a guest edge failed; senders will retry");
        }
        let now_ms = self.now_ms();
        if let Some((guest, lease)) = self
            .guests
            .finish(&mut self.session, now_ms, commit, result)
        {
            // Claimed by someone else since: this shard released them; the lease thread
            // stops serving them on every shard.
            if let Some(takeover) = &self.takeover {
                takeover.fenced(guest, lease);
            }
        }
    }

    /// While the channels to other shards are congested, parks the connection (a client or a
    /// link) until the mesh drains, which resumes it; returns whether it is parked.
    fn park_while_congested(&mut self, handle: ConnectionHandle, conn: &mut Conn) -> bool {
        if !self.mesh_congested() {
            return false;
        }
        if !conn.parked {
            self.metrics.mesh_backpressure.inc();
            conn.parked = true;
            self.parked.push(handle);
        }
        true
    }

    fn start_own_commit(&mut self) {
        // A commit's results and deliveries go to other shards: wait while the mesh is
        // congested (the drain task calls back once it has room).
        if self.committer.is_none() || self.mesh_congested() {
            return;
        }
        if self.commit_retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let now_ms = self.now_ms();
        let Some(batch) = self.session.poll_batch(now_ms) else {
            self.arm_batch_timer(now_ms);
            return;
        };
        let Some(mut committer) = self.committer.take() else {
            return;
        };
        self.own_commits.push_back((batch.number, None));
        let store = self.store.clone();
        let now = self.now_ms();
        // With more waiting, the writer returns once the batch is written; on the log engine
        // its fsync then runs on the syncer lane while the next batch is built and written
        // (decision 0027). Otherwise the writer commits it in one step: no next batch to
        // overlap, and one hand-over between threads fewer.
        self.on_writer(
            move || {
                let result = if batch.more_waiting {
                    store.commit_unsynced(&mut committer, &batch.requests, now)
                } else {
                    store
                        .commit(&mut committer, &batch.requests, now)
                        .map(|outcomes| (outcomes, None))
                };
                (committer, batch, result)
            },
            move |shard, (mut committer, batch, result), took| {
                if std::mem::take(&mut shard.committer_stale) {
                    committer.forget_cached();
                }
                shard.committer = Some(committer);
                match result {
                    Ok((outcomes, Some(sync))) => {
                        shard.metrics.commit_batches_overlapped.inc();
                        shard.sync_own_commit(batch, outcomes, sync, took);
                    }
                    Ok((outcomes, None)) => {
                        shard.own_commit_done(batch, Ok(outcomes), took);
                    }
                    Err(error) => shard.own_commit_done(batch, Err(error), took),
                }
            },
        );
    }

    /// Makes a written batch durable on the syncer lane, then hands it on.
    fn sync_own_commit(
        &self,
        batch: Batch<ConnRef>,
        outcomes: Vec<courier_core::commit::Outcome>,
        sync: crate::backend::SyncCommit,
        wrote: Duration,
    ) {
        self.on_lane(
            self.lanes.syncer.clone(),
            sync,
            move |shard, synced, took| {
                if synced.is_err() {
                    // Facts the committer learned from this batch (seqs, cursors) may be
                    // lost with it.
                    match shard.committer.as_mut() {
                        Some(committer) => committer.forget_cached(),
                        None => shard.committer_stale = true,
                    }
                }
                let result = synced.map(|()| outcomes);
                shard.own_commit_done(batch, result, wrote + took);
            },
        );
    }

    /// Records an own batch's result and hands the session every result that is next in
    /// order: a batch is answered only after every batch taken before it.
    fn own_commit_done(
        &mut self,
        batch: Batch<ConnRef>,
        result: Result<Vec<courier_core::commit::Outcome>, StoreError>,
        took: Duration,
    ) {
        if let Some((_, slot)) = self
            .own_commits
            .iter_mut()
            .find(|(number, _)| *number == batch.number)
        {
            *slot = Some(OwnCommitDone {
                batch,
                result,
                took,
            });
        }
        while self
            .own_commits
            .front()
            .is_some_and(|(_, done)| done.is_some())
        {
            let Some((_, Some(done))) = self.own_commits.pop_front() else {
                unreachable!("the front was just seen done");
            };
            self.measure_commit(&done.batch, done.result.is_ok(), done.took);
            if done.result.is_ok() {
                self.answer_commit(&done.batch);
            }
            self.finish_commit(done.batch, done.result);
        }
    }

    fn measure_commit(&self, batch: &Batch<ConnRef>, committed: bool, took: Duration) {
        let metrics = &self.metrics;
        if !committed {
            metrics.commit_failures.inc();
            return;
        }
        metrics.commit_batches.inc();
        metrics
            .commit_batch_requests
            .observe(batch.requests.len() as f64);
        metrics.commit_duration.observe(took.as_secs_f64());
        let now_ms = self.now_ms();
        for queued_ms in &batch.send_queued_ms {
            metrics
                .send_ack_latency
                .observe(now_ms.saturating_sub(*queued_ms) as f64 / 1000.0);
        }
    }

    /// What a committed batch settles beyond the session's answers: the operators waiting for
    /// its purges (those who asked before the batch was taken; a later request waits for its
    /// own purge), and the forgets it committed.
    fn answer_commit(&mut self, batch: &Batch<ConnRef>) {
        for request in &batch.requests {
            match request {
                courier_core::commit::Request::Purge { inbox } => {
                    if let Some(waiters) = self.purge_waiters.get_mut(inbox) {
                        waiters.retain(|(first_batch, waiter)| {
                            if *first_batch <= batch.number {
                                let _ = waiter.try_send(Ok(()));
                                false
                            } else {
                                true
                            }
                        });
                        if waiters.is_empty() {
                            self.purge_waiters.remove(inbox);
                        }
                    }
                    info!(
                        shard = self.id,
                        user = inbox,
                        "purged the user's inbox; its devices start again after it"
                    );
                }
                courier_core::commit::Request::Forget { .. } => {
                    self.metrics.inboxes_emptied.inc();
                }
                _ => {}
            }
        }
    }

    /// Carries out a request from `courier-edge ctl`.
    fn handle_control(&mut self, request: crate::control::ShardRequest) {
        use crate::control::{ConnectionInfo, ShardRequest, ShardStatus};
        match request {
            ShardRequest::Status { reply } => {
                let _ = reply.try_send(ShardStatus {
                    shard: self.id,
                    connections: self.conns.len(),
                    unauthenticated: self.session.unauthenticated_connections(),
                    queued_requests: self.session.queued_requests(),
                    draining: self.draining,
                    store_recovering: self.store_recovering,
                });
            }
            ShardRequest::Connections { user, reply } => {
                let now_ms = self.now_ms();
                let connections = self
                    .session
                    .connections_of(user)
                    .into_iter()
                    .filter_map(|(conn, device, opened_at_ms)| {
                        let c = self.conns.get(&ConnectionHandle(conn.slot))?;
                        Some(ConnectionInfo {
                            shard: self.id,
                            device,
                            peer: c.quic.remote_address().to_string(),
                            open_secs: now_ms.saturating_sub(opened_at_ms) / 1000,
                        })
                    })
                    .collect();
                let _ = reply.try_send(connections);
            }
            ShardRequest::Disconnect { user, reply } => {
                let closed = self
                    .session
                    .disconnect_user(user, "disconnected by an operator");
                self.after_input();
                let _ = reply.try_send(closed);
            }
            ShardRequest::CheckPurge { user, reply } => {
                let checked = self.session.check_purge(user);
                let _ = reply.try_send(checked.map_err(|refused| {
                    format!(
                        "{} (no connection was closed)",
                        purge_refused(user, refused)
                    )
                }));
            }
            ShardRequest::Purge { user, reply } => match self.session.handle_purge(user) {
                Ok(()) => {
                    let waiters = self.purge_waiters.entry(user).or_default();
                    // Operators who gave up waiting (their control request timed out).
                    waiters.retain(|(_, waiter)| !waiter.is_disconnected());
                    waiters.push((self.session.batches_taken(), reply));
                    self.after_input();
                }
                Err(refused) => {
                    let _ = reply.try_send(Err(purge_refused(user, refused)));
                }
            },
        }
    }

    /// Sets the gauges that describe the shard's state, about once a second.
    fn publish_gauges(&mut self, now: Instant) {
        if now < self.gauges_published_at + GAUGES_INTERVAL {
            return;
        }
        self.gauges_published_at = now;
        let metrics = &self.metrics;
        // Client connections: links to and from other edges have their own gauge.
        let (links_open, links_up) = self.cluster.as_ref().map_or((0, 0), |cluster| {
            (cluster.links_open() as i64, cluster.links_up() as i64)
        });
        let links = self.in_links.len() as i64 + links_open;
        metrics
            .connections_open
            .set(self.conns.len() as i64 - links);
        metrics.links_up.set(links_up);
        metrics.guest_edges.set(self.guests.len() as i64);
        metrics
            .connections_unauthenticated
            .set(self.session.unauthenticated_connections() as i64);
        metrics
            .inbox_queue_requests
            .set(self.session.queued_requests() as i64);
        let backlog: usize = self.mesh_backlog.iter().map(VecDeque::len).sum();
        metrics.mesh_backlog_messages.set(backlog as i64);
        if let Some(keys) = self.store.message_keys_approximate() {
            metrics.store_message_keys.set(keys as i64);
        }
        if let Some(bytes) = self.store.memory_bytes() {
            metrics.store_memory_bytes.set(bytes as i64);
        }
        if let Some(bytes) = self.store.dedupe_memory_bytes() {
            metrics.store_dedupe_memory_bytes.set(bytes as i64);
        }
        if let Some(background) = self.store.background_priority() {
            metrics
                .store_background_workers_idle
                .set(background.workers_idle as i64);
            metrics.store_background_behind.inc_by(
                background
                    .behind_total
                    .saturating_sub(self.background_behind_seen),
            );
            self.background_behind_seen = background.behind_total;
        }
        metrics.store_full.set(i64::from(self.store_full));
        metrics
            .store_reopening
            .set(i64::from(self.store_recovering));
        let held = self.session.deliveries_held_for_acks();
        metrics
            .deliveries_held_for_acks
            .inc_by(held - self.deliveries_held_published);
        self.deliveries_held_published = held;
        let held_for_room = self.session.deliveries_held_for_room();
        metrics
            .deliveries_held_for_room
            .inc_by(held_for_room - self.deliveries_held_for_room_published);
        self.deliveries_held_for_room_published = held_for_room;
    }

    fn finish_commit(
        &mut self,
        batch: Batch<ConnRef>,
        result: Result<Vec<courier_core::commit::Outcome>, StoreError>,
    ) {
        self.commit_retry_at = result.is_err().then(|| Instant::now() + COMMIT_RETRY_DELAY);
        if let Err(error) = &result {
            self.store_refused(error);
            if !(self.store_recovering && *error == StoreError::Poisoned) {
                warn!(%error, requests = batch.requests.len(), "commit failed; senders will retry");
            }
        }
        self.session.handle_commit(self.now_ms(), batch, result);
        self.note_store_full();
    }

    /// Asks the store how full it is against its memory bound and tells the session, which
    /// refuses sends from `STORE_FULL_ON_PERCENT` until the store is below
    /// `STORE_FULL_OFF_PERCENT` (the gap keeps the gate from flapping on every commit); logs
    /// each change.
    fn note_store_full(&mut self) {
        let full = match self.store.memory_fill() {
            crate::backend::MemoryFill::Unbounded => false,
            crate::backend::MemoryFill::Unknown => self.store_full,
            crate::backend::MemoryFill::Percent(percent) if self.store_full => {
                percent >= STORE_FULL_OFF_PERCENT
            }
            crate::backend::MemoryFill::Percent(percent) => percent >= STORE_FULL_ON_PERCENT,
        };
        if full != self.store_full {
            self.store_full = full;
            if full {
                warn!(
                    shard = self.id,
                    "the store is near store.log_memory_bytes_max: refusing sends with \
                     StoreUnavailable until deliveries and expiry free room (or raise the limit)"
                );
            } else {
                info!(shard = self.id, "the store has room again: accepting sends");
            }
        }
        self.session.set_store_full(full);
    }

    /// Starts the recovery of this shard's store if it was poisoned by a write of another
    /// thread: a sync read of another shard raising its store's clock mark (decision 0047).
    /// A quiet shard would otherwise learn of it only at its next commit or expiry pass,
    /// while every read of its users' inboxes failed.
    fn notice_poisoned_store(&mut self) {
        if !self.store_recovering && self.store.refuses_until_recovered() {
            self.store_refused(&StoreError::Poisoned);
        }
    }

    /// Acts on a store error: a fenced shard ends the process; a poisoned store (a failed write
    /// or fsync: a full disk, a disk error) is reopened in place, again and again with a
    /// growing pause, until it works. Meanwhile sends get the retryable `StoreUnavailable`
    /// and the edge keeps serving everything that needs no write.
    fn store_refused(&mut self, error: &StoreError) {
        // After a drain handed the lease over, own commits are fenced as expected.
        if !self.takeover.as_ref().is_some_and(|t| t.handed_over()) {
            exit_if_fenced(error, self.exit_when_fenced, &self.abort);
        }
        // The commit whose write failed reports why (`Io`), and its store is poisoned from
        // then on: reopen at once, not at the next commit, which a quiet shard may not have
        // for a long time while other shards' reads of its users' inboxes keep failing.
        let poisoned = *error == StoreError::Poisoned || self.store.refuses_until_recovered();
        if !poisoned || self.store_recovering {
            return;
        }
        self.store_recovering = true;
        self.health.store_recovering(true);
        tracing::error!(
            shard = self.id,
            %error,
            "the store failed a write; refusing sends with StoreUnavailable and reopening it"
        );
        let (store, lane) = (self.store.clone(), self.lanes.maintenance.clone());
        let (id, shard) = (self.id, self.self_ref.clone());
        let again_soon = self
            .store_reopened_at
            .is_some_and(|at| at.elapsed() < STORE_RECOVERY_PAUSE_KEPT);
        let first_pause = if again_soon {
            (self.store_recovery_pause * 2).min(STORE_RECOVERY_PAUSE_MAX)
        } else {
            STORE_RECOVERY_PAUSE_MIN
        };
        self.store_recovery_pause = first_pause;
        spawn_detached(async move {
            let mut pause = first_pause;
            loop {
                glommio::timer::sleep(pause).await;
                let store = store.clone();
                match lane.run_store(move || store.recover()).await {
                    Ok(()) => {
                        info!(shard = id, "store reopened; accepting sends again");
                        if let Some(shard) = shard.upgrade() {
                            let mut shard = shard.borrow_mut();
                            shard.store_recovering = false;
                            shard.store_reopened_at = Some(Instant::now());
                            shard.health.store_recovering(false);
                            shard.note_store_full();
                        }
                        return;
                    }
                    Err(error) => {
                        warn!(shard = id, %error, retry_in_ms = pause.as_millis() as u64, "the store cannot be reopened yet");
                        pause = (pause * 2).min(STORE_RECOVERY_PAUSE_MAX);
                    }
                }
            }
        });
    }

    // ---- Output -----------------------------------------------------------------------------

    fn flush(&mut self) {
        let now = Instant::now();
        let max_datagrams = self.socket.state.max_gso_segments().max(1);
        let dirty = std::mem::take(&mut self.dirty);
        for handle in dirty {
            let Some(mut conn) = self.conns.remove(&handle) else {
                continue;
            };
            conn.dirty = false;
            let buffered = conn.outbuf.len();
            flush_outbuf(&mut conn);
            if conn.kind == ConnKind::Client && conn.outbuf.len() != buffered {
                // What QUIC took may let a paused sync continue (`after_input` takes its effects).
                let conn_ref = self.conn_ref(handle, &conn);
                self.session.set_outbound_bytes(conn_ref, conn.outbuf.len());
            }
            let mut buf = std::mem::take(&mut self.transmit_buf);
            for _ in 0..TRANSMITS_PER_FLUSH_MAX {
                buf.clear();
                let Some(transmit) = conn.quic.poll_transmit(now, max_datagrams, &mut buf) else {
                    break;
                };
                match (&conn.kind, &self.link_socket) {
                    (ConnKind::LinkOut { .. }, Some(socket)) => {
                        send_transmit_on(socket, &transmit, &buf)
                    }
                    _ => self.send_transmit(&transmit, &buf),
                }
            }
            self.transmit_buf = buf;
            // Stream writes and closes change timers and may finish the connection.
            self.conns.insert(handle, conn);
            self.process_timer_only(handle);
        }
    }

    /// Re-arms a connection's timer and drops it when drained, without reading input.
    fn process_timer_only(&mut self, handle: ConnectionHandle) {
        let Some(mut conn) = self.conns.remove(&handle) else {
            return;
        };
        if self.done_with(handle, &mut conn, Instant::now()) {
            let conn_ref = self.conn_ref(handle, &conn);
            self.session.connection_lost(conn_ref);
            self.link_gone(handle, conn.kind);
            self.handshake_finished(&mut conn);
            self.disarm_timer(handle, &mut conn);
            return;
        }
        self.arm_timer(handle, &mut conn);
        self.conns.insert(handle, conn);
    }

    /// Whether the connection is to be dropped: QUIC drained it, or it has been closed for
    /// `CLOSED_LINGER_MAX`, and the endpoint is then told it is drained. A closed connection's
    /// buffers are freed when its close is first seen: nothing more is read from it or written
    /// to it.
    fn done_with(&mut self, handle: ConnectionHandle, conn: &mut Conn, now: Instant) -> bool {
        if conn.quic.is_drained() {
            return true;
        }
        if !conn.quic.is_closed() {
            return false;
        }
        let drain_by = match conn.drain_by {
            Some(drain_by) => drain_by,
            None => {
                conn.inbuf = Vec::new();
                conn.outbuf = Vec::new();
                *conn.drain_by.insert(now + CLOSED_LINGER_MAX)
            }
        };
        if now < drain_by {
            return false;
        }
        // No event of this connection reaches the endpoint after this one.
        let _ = self
            .endpoint
            .handle_event(handle, quinn_proto::EndpointEvent::drained());
        true
    }

    /// The connection's handshake is done and its `Hello` accepted, or it is gone: it no
    /// longer counts against its address.
    fn handshake_finished(&mut self, conn: &mut Conn) {
        let Some(address) = conn.handshaking_from.take() else {
            return;
        };
        if let Some(count) = self.handshakes_by_address.get_mut(&address) {
            *count -= 1;
            if *count == 0 {
                self.handshakes_by_address.remove(&address);
            }
        }
    }

    /// Makes the timer task wake when waiting acks are due to be committed on their own.
    /// Arms once per deadline: the timer task re-runs this after every wake, and waking it
    /// again for the same deadline would spin it until the deadline passed.
    fn arm_batch_timer(&mut self, now_ms: u64) {
        // A batch held back after a failed commit is due when its retry delay ends, not
        // before: armed at its deadline (acks put back are due at once), the timer fired,
        // found nothing it could take, and was armed again at once, a loop that held the
        // shard's executor until the delay ended.
        let not_before_ms = |retry_at: Option<Instant>| {
            retry_at
                .and_then(|at| at.checked_duration_since(Instant::now()))
                .map_or(0, |left| now_ms + left.as_millis() as u64 + 1)
        };
        let Some(deadline_ms) = batch_timer_deadline_ms(
            (
                self.session.own_batch_deadline_ms(),
                not_before_ms(self.commit_retry_at),
            ),
            (
                self.session.guest_batch_deadline_ms(),
                not_before_ms(self.guest_retry_at),
            ),
        ) else {
            return;
        };
        if self
            .batch_timer
            .is_some_and(|(armed_ms, _)| armed_ms == deadline_ms)
        {
            return;
        }
        let at = Instant::now() + Duration::from_millis(deadline_ms.saturating_sub(now_ms));
        self.batch_timer = Some((deadline_ms, at));
        if self.armed_deadline.is_none_or(|armed| at < armed) {
            self.armed_deadline = Some(at);
            if let Some(wake) = &self.timer_wake {
                let _ = wake.try_send(());
            }
        }
    }

    /// Sets the connection's entry in the timer set to its next timeout, and wakes the timer
    /// task when that is the shard's earliest.
    fn arm_timer(&mut self, handle: ConnectionHandle, conn: &mut Conn) {
        let timeout = [
            conn.quic.poll_timeout(),
            conn.close_at,
            conn.drain_by,
            conn.handshake_by,
        ]
        .into_iter()
        .flatten()
        .min();
        if conn.timer_armed == timeout {
            return;
        }
        self.disarm_timer(handle, conn);
        let Some(timeout) = timeout else {
            return;
        };
        conn.timer_armed = Some(timeout);
        self.timers.insert((timeout, handle.0, conn.generation));
        if self.armed_deadline.is_none_or(|armed| timeout < armed) {
            self.armed_deadline = Some(timeout);
            if let Some(wake) = &self.timer_wake {
                let _ = wake.try_send(());
            }
        }
    }

    /// Removes the connection's entry from the timer set: before re-arming, and when the
    /// connection is dropped.
    fn disarm_timer(&mut self, handle: ConnectionHandle, conn: &mut Conn) {
        if let Some(armed) = conn.timer_armed.take() {
            self.timers.remove(&(armed, handle.0, conn.generation));
        }
    }

    fn send_transmit(&self, transmit: &quinn_proto::Transmit, buf: &[u8]) {
        send_transmit_on(&self.socket, transmit, buf);
    }
}

fn send_transmit_on(socket: &Socket, transmit: &quinn_proto::Transmit, buf: &[u8]) {
    {
        let udp = quinn_udp::Transmit {
            destination: transmit.destination,
            ecn: transmit.ecn.map(|e| match e {
                EcnCodepoint::Ect0 => quinn_udp::EcnCodepoint::Ect0,
                EcnCodepoint::Ect1 => quinn_udp::EcnCodepoint::Ect1,
                EcnCodepoint::Ce => quinn_udp::EcnCodepoint::Ce,
            }),
            contents: &buf[..transmit.size],
            segment_size: transmit.segment_size,
            src_ip: transmit.src_ip,
        };
        // A full socket buffer drops the datagram; QUIC's loss recovery resends it.
        if let Err(error) = socket.state.try_send((&socket.std).into(), &udp) {
            debug!(%error, "send failed");
        }
    }
}

/// What one read of a connection's stream did.
struct StreamRead {
    /// Bytes were appended to `inbuf`.
    got: bool,
    /// The peer finished or reset the stream.
    finished: bool,
}

/// Appends at most `room` bytes of stream `id` to the connection's `inbuf`; `None` when the
/// stream cannot be read (gone, or stopped).
fn read_chunk(conn: &mut Conn, id: StreamId, room: usize) -> Option<StreamRead> {
    let mut stream = conn.quic.recv_stream(id);
    let mut chunks = stream.read(true).ok()?;
    let mut read = StreamRead {
        got: false,
        finished: false,
    };
    match chunks.next(room) {
        Ok(Some(chunk)) => {
            conn.inbuf.extend_from_slice(&chunk.bytes);
            read.got = true;
        }
        Ok(None) | Err(quinn_proto::ReadError::Reset(_)) => read.finished = true,
        Err(quinn_proto::ReadError::Blocked) => {}
    }
    let _ = chunks.finalize();
    Some(read)
}

/// Encodes `frame` into the connection's `outbuf` and writes what it can to the stream now.
fn write_frame(conn: &mut Conn, frame: &Frame) {
    encode_frame(conn, frame);
    flush_outbuf(conn);
}

/// Encodes `frame` into the connection's `outbuf`; `flush_outbuf` writes it to the stream.
fn encode_frame(conn: &mut Conn, frame: &Frame) {
    if conn.stream.is_none() {
        return;
    }
    if let Err(error) = courier_protocol::encode(frame, &mut conn.outbuf) {
        warn!(%error, kind = frame.kind(), "cannot encode a frame: this is a bug");
    }
}

fn flush_outbuf(conn: &mut Conn) {
    let Some(id) = conn.stream else {
        return;
    };
    if let Err(error) = write_outbuf(&mut conn.quic, id, &mut conn.outbuf) {
        debug!(%error, "stream write failed; closing the connection");
        close_for_stopped_stream(conn);
    }
}

/// Writes as much of `outbuf` to stream `id` as QUIC takes now, and removes it from `outbuf`.
/// A write QUIC takes only part of is tried once more, to be refused: a refusal (`Blocked`)
/// is what makes quinn report the stream `Writable` once it has room again, and a partial
/// write alone does not. Without it a connection that stopped being read for a full `outbuf`
/// was never read again when its own send window, not the client, had held the answers back.
pub(crate) fn write_outbuf(
    quic: &mut quinn_proto::Connection,
    id: StreamId,
    outbuf: &mut Vec<u8>,
) -> Result<(), quinn_proto::WriteError> {
    // The first write, and the one that registers for `Writable` after a partial one.
    const WRITES_MAX: usize = 2;
    for _ in 0..WRITES_MAX {
        if outbuf.is_empty() {
            break;
        }
        match quic.send_stream(id).write(outbuf) {
            Ok(written) => {
                outbuf.drain(..written);
            }
            Err(quinn_proto::WriteError::Blocked) => break,
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// The peer stopped the connection's only stream (STOP_SENDING), or a write to it failed:
/// nothing written reaches the peer any more. The connection closes, so that a link fails
/// over (what it carried is refused as retryable) and a client reconnects, instead of both
/// writing into nothing while keep-alives hold the connection open.
fn close_for_stopped_stream(conn: &mut Conn) {
    close_now(
        conn,
        ErrorCode::UnexpectedFrame,
        Bytes::from_static(b"the stream was stopped"),
    );
}

/// The highest `Ack` among the frames a connection left unread: those in its input buffer and
/// those still in its stream, read up to its window. Reading stops at bytes that are no frame.
fn highest_ack_left(conn: &mut Conn) -> Option<u64> {
    /// Reads of the stream: far more than its window's worth of chunks.
    const READS_MAX: usize = 4096;
    let id = conn.stream?;
    let mut highest = None;
    for _ in 0..READS_MAX {
        let mut consumed_total = 0;
        loop {
            match courier_protocol::decode(&conn.inbuf[consumed_total..]) {
                Ok(Some((frame, consumed))) => {
                    consumed_total += consumed;
                    if let Frame::Ack { up_to_seq } = frame {
                        highest = highest.max(Some(up_to_seq));
                    }
                }
                Ok(None) => break,
                // Bytes that are no frame: nothing after them is read either.
                Err(_) => return highest,
            }
        }
        conn.inbuf.drain(..consumed_total);
        let room = INBUF_BYTES_MAX.saturating_sub(conn.inbuf.len());
        if room == 0 {
            break;
        }
        match read_chunk(conn, id, room) {
            Some(StreamRead { got: true, .. }) => {}
            _ => break,
        }
    }
    highest
}

/// Closes the QUIC connection (once) with `code`, and drops what waits to be written to it.
fn close_now(conn: &mut Conn, code: ErrorCode, reason: Bytes) {
    if !conn.closing {
        conn.quic.close(
            Instant::now(),
            VarInt::from_u32(code.to_u16().into()),
            reason,
        );
        conn.closing = true;
    }
    conn.outbuf.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token's expiry is judged by the wall clock, whatever the server clock says: that
    /// clock keeps the wall time of the edge's start (a host clock synced forward since left
    /// it hours behind, and expired tokens were taken) or is ahead of it by the stores' mark.
    #[test]
    fn a_tokens_expiry_is_judged_by_the_wall_clock_not_the_server_clock() {
        let key = crate::auth::SigningKey::from_bytes(&[7; 32]);
        let verifier =
            crate::auth::TokenVerifier::new([(1, key.verifying_key())].into_iter().collect());
        let authenticator = TokenAuthenticator {
            verifier: Arc::new(crate::auth::VerifierCell::new(verifier)),
            verified_generation: std::cell::Cell::new(0),
            verified: RefCell::new(crate::auth::VerifiedTokens::new(16)),
        };
        let wall_secs = courier_core::clock::wall_clock_ms() / 1_000;
        let token = |user: u64, expires_at_secs: u64| {
            crate::auth::mint(
                &key,
                &crate::auth::Claims {
                    key_id: 1,
                    user,
                    device: 3,
                    role: crate::auth::Role::User,
                    expires_at_secs,
                },
            )
        };
        let two_hours = 7_200;
        // Expired 90 minutes ago, the server clock two hours behind: refused.
        let expired = token(1, wall_secs - 5_400);
        let refused = authenticator
            .authenticate(expired.as_bytes(), 3, wall_secs - two_hours)
            .unwrap_err();
        assert_eq!(refused.code, ErrorCode::TokenExpired, "{refused:?}");
        // Valid for an hour, the server clock two hours ahead: taken.
        let valid = token(2, wall_secs + 3_600);
        assert_eq!(
            authenticator.authenticate(valid.as_bytes(), 3, wall_secs + two_hours),
            Ok(2)
        );
    }

    /// Every shard gets the clock the first one started, not one anchored at its own start:
    /// with the wall clock behind the stores' mark, a shard starting 30 ms after another ran
    /// 30 ms behind it for good. A start that failed leaves the clock to the next shard.
    #[test]
    fn the_shards_share_the_clock_the_first_one_started() {
        let clock = EdgeClock::default();
        let failed: Result<ServerClock, &str> = clock.get_or_start(|| Err("store closed"));
        assert_eq!(failed, Err("store closed"));
        let first = clock
            .get_or_start(|| Ok::<_, ()>(ServerClock::start(1_000, 5_000, 0)))
            .unwrap();
        let second = clock
            .get_or_start(|| Ok::<_, ()>(ServerClock::start(1_030, 5_000, 30)))
            .unwrap();
        assert_eq!(first.now(100), second.now(100), "the shards' clocks differ");
    }

    /// IPv6 peers are counted by their /64, IPv4 ones (mapped or not) by their address.
    #[test]
    fn addresses_are_grouped_by_what_one_subscriber_holds() {
        let group = |text: &str| address_group(text.parse().expect("an address"));
        assert_eq!(group("203.0.113.7"), group("203.0.113.7"));
        assert_ne!(group("203.0.113.7"), group("203.0.113.8"));
        assert_eq!(group("2001:db8:1:2::1"), group("2001:db8:1:2:ffff::9"));
        assert_ne!(group("2001:db8:1:2::1"), group("2001:db8:1:3::1"));
        assert_eq!(group("::ffff:203.0.113.7"), group("203.0.113.7"));
        assert_ne!(group("::ffff:203.0.113.7"), group("::ffff:203.0.113.8"));
    }

    /// Acks put back after a failed guest commit are due at once, but the guests' commits
    /// wait out their retry delay: the timer fires when the delay ends (here at 1,100), not at
    /// the past deadline (0), which had it fire and re-arm without end. The own deadline,
    /// with no retry running, keeps its time.
    #[test]
    fn the_batch_timer_waits_for_a_retry_delay() {
        assert_eq!(
            batch_timer_deadline_ms((None, 0), (Some(0), 1_100)),
            Some(1_100)
        );
        assert_eq!(
            batch_timer_deadline_ms((Some(1_050), 0), (Some(0), 1_100)),
            Some(1_050)
        );
        assert_eq!(
            batch_timer_deadline_ms((Some(0), 1_100), (Some(1_200), 0)),
            Some(1_100)
        );
        assert_eq!(
            batch_timer_deadline_ms((Some(7), 0), (None, 1_100)),
            Some(7)
        );
        assert_eq!(batch_timer_deadline_ms((None, 5), (None, 9)), None);
    }
}
