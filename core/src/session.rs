//! The edge's session layer, sans-IO: what one shard decides about connections and inboxes.
//!
//! [`EdgeSession`] holds, for one shard, the state of every connection it terminates (login,
//! delivery cursor, sync paging, sends in flight) and, for the users homed on it, the registry
//! of their connections and the inbox queue ([`InboxShard`]). Inputs are frames from clients,
//! messages from other shards, results of store reads and commits; every effect is an output
//! ([`Effect`]: write a frame, close a connection, route to a shard, read an inbox) or a batch
//! to commit ([`EdgeSession::poll_batch`]). Time is an argument. The edge (`edge/src/shard.rs`)
//! runs it on glommio and quinn-proto; the simulation (`core/tests/simulation.rs`) runs the
//! same type over a simulated network and store.
//!
//! Methods, in the order a driver uses them:
//! - connections: [`EdgeSession::open_connection`], [`EdgeSession::connection_lost`],
//!   [`EdgeSession::set_outbound_bytes`] after writing (it resumes paused syncs);
//! - input: [`EdgeSession::handle_frame`], [`EdgeSession::close_connection`],
//!   [`EdgeSession::handle_message`], [`EdgeSession::handle_read`],
//!   [`EdgeSession::handle_commit`], [`EdgeSession::close_all`];
//! - output, after any input: [`EdgeSession::poll_effect`] until `None`, and
//!   [`EdgeSession::poll_batch`] when no commit is in flight;
//! - in a cluster of edges (`SessionConfig::cluster`, issue 13): this shard's links to the
//!   other edges ([`EdgeSession::link_up`], [`EdgeSession::link_down`],
//!   [`EdgeSession::handle_link_answer`]) and the links other edges opened to this shard
//!   ([`EdgeSession::open_link`], [`EdgeSession::handle_link_request`],
//!   [`EdgeSession::link_closed`]).
//!
//! In a cluster, a client whose user lives on another edge is redirected there at `Hello`
//! ([`Effect::Redirect`]), so a connection always lives on its user's home edge. A send or a
//! signal to a user of another edge is forwarded on this shard's link to that edge
//! ([`Effect::LinkWrite`]); the answer comes back on the same link. If the link is down, or goes
//! down with sends unanswered, those sends get the retryable `ShardUnavailable`: the client
//! retries with the same client id, and the dedupe record on the far edge makes a retry of a
//! send that did commit return the same seq.
//!
//! Takeover (decision 0015): while another edge is dead, the runtime may make this edge serve
//! its users ([`EdgeSession::serve_guest`], after claiming the dead edge's lease with
//! [`crate::takeover`]). Each guest edge gets a commit queue of its own
//! ([`EdgeSession::poll_guest_batch`]), committed under that edge's lease, until
//! [`EdgeSession::release_guest`] sends its clients on. [`EdgeSession::set_servers`] says
//! which edges other edges serve, so clients and sends for those users go there.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use crate::{FastHashMap, FastHashSet};

use courier_protocol::link::{LinkFrame, LinkSendResult};
use courier_protocol::{ErrorCode, Frame, SignalKind};

use crate::budget::{Rate, SendBuckets, SendBudget, TokenBucket};
use crate::commit::{InboxPage, Outcome, SendRequest};
use crate::envelope::StoredMessage;
use crate::placement::{EdgeId, home_edge, home_shard};
use crate::shard::{Batch, InboxShard, Output};
use crate::store::StoreError;
use crate::{CoreConfig, UnixMillis, UserId};

/// Bytes a frame adds to its body or payload (prefix and fields), for the outbound bound.
const FRAME_OVERHEAD_BYTES_MAX: usize = 64;
/// The longest an over-budget connection's input stays paused at once.
const INPUT_PAUSE_MS_MAX: u64 = 1_000;
/// The slot of the stand-in connection a forwarded send from another edge is answered to: a
/// driver never gives a real connection this slot.
pub const LINK_PROXY_SLOT: usize = usize::MAX;

/// A connection anywhere in the edge: its shard, its slot there, and the generation that tells
/// a reused slot from the connection that held it before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnRef {
    pub shard: u8,
    pub slot: usize,
    pub generation: u64,
}

/// One message between shards of an edge, at the session level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardMessage {
    /// To the recipient's home shard: store this message.
    Send {
        send: SendRequest,
        reply: ConnRef,
    },
    /// Back to the sender's shard: the outcome of a send.
    SendResult {
        reply: ConnRef,
        client_id: u64,
        /// The send's body bytes, which its connection no longer has in flight.
        body_bytes: usize,
        result: Result<(u64, u64), ErrorCode>,
    },
    /// To the inbox's home shard: a device consumed everything up to `up_to_seq`.
    Ack {
        inbox: UserId,
        device: u32,
        up_to_seq: u64,
    },
    /// To the user's home shard: this connection of `device` wants live deliveries. It
    /// replaces an earlier connection of the same device (a phone that reconnected before its
    /// old connection timed out).
    Register {
        user: UserId,
        device: u32,
        conn: ConnRef,
        /// When the connection said `Hello`: of two connections of one device, the later one
        /// wins, whichever `Register` arrives first (they travel on different lanes).
        hello_at_ms: UnixMillis,
        /// What the device's application consumed (`Hello`): the link moves its cursor there.
        acked_up_to: u64,
    },
    /// From the home shard to an older connection of a device that registered again: close.
    Superseded {
        conn: ConnRef,
    },
    /// Back from the home shard once the device is linked (committed): live deliveries flow
    /// from now on, so the connection can read the store after `cursor` without a gap.
    /// `stored_after_cursor` false: the inbox held nothing after the cursor at the link, so
    /// there is nothing to read (the common reconnect of a device that is up to date).
    Registered {
        conn: ConnRef,
        cursor: u64,
        first_seq: u64,
        stored_after_cursor: bool,
    },
    /// Back from the home shard when the user already has the maximum of connections
    /// (`TooManyConnections`) or logins wait in numbers (`Overloaded`).
    RegisterRefused {
        conn: ConnRef,
        code: ErrorCode,
    },
    Unregister {
        user: UserId,
        conn: ConnRef,
    },
    /// To the shard holding `conn`: push this stored message.
    Deliver {
        conn: ConnRef,
        message: StoredMessage,
    },
    /// To the peer's home shard: an ephemeral signal, never stored.
    Signal {
        to: UserId,
        from: UserId,
        kind: SignalKind,
        payload: Vec<u8>,
    },
    /// To the shard holding `conn`: push this signal.
    SignalDeliver {
        conn: ConnRef,
        from: UserId,
        kind: SignalKind,
        payload: Vec<u8>,
    },
    /// To the shard holding `conn`: a live delivery of `seq` did not reach it, or there was
    /// none; read the store, unless the connection already has `seq`.
    CatchUp {
        conn: ConnRef,
        seq: u64,
    },
    /// To the shard holding `conn`: every seq of its inbox up to `up_to_seq` is gone (the
    /// inbox was forgotten or purged); declare the hole if the connection is behind it. A
    /// purge also reset the device records: the connection is closed to log in again
    /// (`Output::Gone`).
    Gone {
        conn: ConnRef,
        up_to_seq: u64,
        purged: bool,
    },
}

/// What may happen to a message that a congested lane cannot take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overload {
    /// Ephemeral: drop it.
    Drop,
    /// A send: answer `Overloaded`; the client retries under the same id.
    Refuse,
    /// A live delivery: send a `CatchUp` instead; the store holds the message.
    CatchUp,
    /// Control: never dropped.
    Keep,
}

impl ShardMessage {
    pub fn on_overload(&self) -> Overload {
        match self {
            ShardMessage::Signal { .. } | ShardMessage::SignalDeliver { .. } => Overload::Drop,
            ShardMessage::Send { .. } => Overload::Refuse,
            ShardMessage::Deliver { .. } => Overload::CatchUp,
            ShardMessage::SendResult { .. }
            | ShardMessage::Ack { .. }
            | ShardMessage::Register { .. }
            | ShardMessage::Registered { .. }
            | ShardMessage::RegisterRefused { .. }
            | ShardMessage::Superseded { .. }
            | ShardMessage::Unregister { .. }
            | ShardMessage::CatchUp { .. }
            | ShardMessage::Gone { .. } => Overload::Keep,
        }
    }

    /// The variant's name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ShardMessage::Send { .. } => "Send",
            ShardMessage::SendResult { .. } => "SendResult",
            ShardMessage::Ack { .. } => "Ack",
            ShardMessage::Register { .. } => "Register",
            ShardMessage::Registered { .. } => "Registered",
            ShardMessage::RegisterRefused { .. } => "RegisterRefused",
            ShardMessage::Superseded { .. } => "Superseded",
            ShardMessage::Unregister { .. } => "Unregister",
            ShardMessage::Deliver { .. } => "Deliver",
            ShardMessage::Signal { .. } => "Signal",
            ShardMessage::SignalDeliver { .. } => "SignalDeliver",
            ShardMessage::CatchUp { .. } => "CatchUp",
            ShardMessage::Gone { .. } => "Gone",
        }
    }

    /// The message for `conn` when a `Deliver` cannot be carried: read the store instead.
    pub fn degrade(self) -> ShardMessage {
        match self {
            ShardMessage::Deliver { conn, message } => ShardMessage::CatchUp {
                conn,
                seq: message.seq,
            },
            other => other,
        }
    }
}

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Write `frame` on the connection's stream.
    /// `live` marks a `Deliver` written as its commit completed, not read back from the store
    /// (the driver measures online delivery latency on those).
    Write {
        conn: ConnRef,
        frame: Frame,
        live: bool,
    },
    /// Close the connection with `code`. The session already forgot its login. `user` is who
    /// it was logged in as, if it got that far (for the operator's log).
    Close {
        conn: ConnRef,
        user: Option<UserId>,
        code: ErrorCode,
        reason: String,
    },
    /// Deliver `message` to another shard (never this one: the session handles its own).
    Route { shard: u8, message: ShardMessage },
    /// Read a page of `inbox` after `after_seq` and hand it to [`EdgeSession::handle_read`].
    Read {
        conn: ConnRef,
        inbox: UserId,
        after_seq: u64,
    },
    /// Read the connection's input again: it was paused ([`EdgeSession::input_paused`])
    /// until its send budget refilled.
    ResumeInput { conn: ConnRef },
    /// The connection's user lives on another edge: write `Goaway { reconnect_to }` and close
    /// the connection once it is sent. The session already forgot the connection's login.
    Redirect {
        conn: ConnRef,
        user: UserId,
        reconnect_to: String,
    },
    /// Write `frame` on this shard's link to `edge` (which [`EdgeSession::link_up`] said is up).
    LinkWrite { edge: EdgeId, frame: LinkFrame },
    /// Write `frame` on the link another edge opened to this shard ([`EdgeSession::open_link`]).
    LinkReply { link: u64, frame: LinkFrame },
}

/// Why [`EdgeSession::handle_purge`] did not queue a purge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeRefused {
    /// Too many purges wait already: try again.
    QueueFull,
    /// The user's inbox is not this edge's to write: run the purge on `edge`.
    ServedElsewhere { edge: EdgeId },
}

/// Checks `Hello`'s token. The edge verifies signatures; the simulation trusts a user id.
pub trait Authenticator {
    /// The user the token names, if it is valid for `device`. `now_secs` is the server clock;
    /// an authenticator of wall-time claims (the edge's tokens) reads the wall clock instead.
    fn authenticate(&self, token: &[u8], device: u32, now_secs: u64)
    -> Result<UserId, AuthFailure>;
}

/// Why a token was refused: the code for the client and a short text (never the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFailure {
    pub code: ErrorCode,
    pub reason: String,
}

/// Settings of an [`EdgeSession`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    pub shard: u8,
    pub shard_count: u32,
    pub connections_per_user_max: usize,
    pub sends_in_flight_per_connection_max: usize,
    /// Body bytes of one connection's sends waiting for their `SendAck`; beyond it:
    /// `TooManyInFlight`. At least one maximal frame.
    pub send_bytes_in_flight_per_connection_max: usize,
    pub outbound_bytes_per_connection_max: usize,
    /// Messages one connection may hold delivered and not acknowledged; past it, delivery
    /// waits for the device's `Ack` and then reads the store. A client's buffer of at least
    /// this many deliveries never fills, so it never stops reading the stream that also
    /// carries its sends' receipts (a slow application would otherwise hold up its own
    /// sends). Messages the device held when it said `Hello` are not counted.
    pub deliveries_unacked_per_connection_max: usize,
    /// What one connection may send; beyond it: `Overloaded`.
    pub send_budget_per_connection: SendBudget,
    /// What one user may send through the connections this shard holds; beyond it:
    /// `Overloaded`.
    pub send_budget_per_user: SendBudget,
    /// Signals one connection may send. A signal costs its recipient's home shard a message
    /// per connection of the recipient (up to `connections_per_user_max`), so without a bound
    /// one client could congest the shards' channels and stall their commits. Beyond it the
    /// signal is dropped (signals are ephemeral) and the connection is not read until the
    /// budget holds one again.
    pub signal_rate_per_connection: Rate,
    /// `Ack`, `Sync` and `Ping` frames one connection may send; beyond it the connection is
    /// not read until the budget holds one again (the frame itself is handled).
    pub control_frame_rate_per_connection: Rate,
    /// Distinct recipients one user may send to per `recipients_window_ms` on this shard
    /// (0: no limit): each new recipient leaves a record in the store, so a sender cannot
    /// spray ids.
    pub recipients_per_user_per_window_max: usize,
    pub recipients_window_ms: u64,
    /// The handshake and `Hello` must be done this long after the connection opened.
    pub hello_timeout_ms: u64,
    /// A frame whose first bytes arrived must be complete this long after.
    pub frame_timeout_ms: u64,
    /// The edges of the cluster; `None` for an edge on its own.
    pub cluster: Option<ClusterView>,
    /// Forwarded sends one link may carry unanswered: the sending shard refuses more with
    /// `Overloaded`, and so does the receiving one.
    pub link_requests_in_flight_max: usize,
    /// Body bytes of the sends one link of this shard carries unanswered; beyond it more are
    /// refused with `Overloaded` (one send is always let through).
    pub link_send_bytes_in_flight_max: usize,
    pub core: CoreConfig,
}

/// The edges of a cluster, as one shard needs them (issue 13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterView {
    /// This edge.
    pub edge: EdgeId,
    /// Every edge of the cluster, this one included: its id and the address its clients
    /// connect to (what a redirect tells them).
    pub members: Vec<EdgeMember>,
}

/// One edge of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeMember {
    pub id: EdgeId,
    pub client_address: String,
}

impl SessionConfig {
    /// A configuration with the given identity and core, and the edge's default limits.
    pub fn new(shard: u8, shard_count: u32, core: CoreConfig) -> SessionConfig {
        SessionConfig {
            shard,
            shard_count,
            connections_per_user_max: 16,
            sends_in_flight_per_connection_max: 256,
            send_bytes_in_flight_per_connection_max: 1024 * 1024,
            outbound_bytes_per_connection_max: 1024 * 1024,
            deliveries_unacked_per_connection_max: 1024,
            send_budget_per_connection: SendBudget::UNLIMITED,
            send_budget_per_user: SendBudget::UNLIMITED,
            signal_rate_per_connection: Rate::UNLIMITED,
            control_frame_rate_per_connection: Rate::UNLIMITED,
            recipients_per_user_per_window_max: 0,
            recipients_window_ms: 60_000,
            hello_timeout_ms: 10_000,
            frame_timeout_ms: 10_000,
            cluster: None,
            link_requests_in_flight_max: 4096,
            link_send_bytes_in_flight_max: 8 * 1024 * 1024,
            core,
        }
    }
}

/// Counts of what the session dropped under overload.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SessionStats {
    /// Signals not written because their connection's outbound buffer was full.
    pub signals_dropped: u64,
    /// Sends refused because the inbox queue was full.
    pub sends_overloaded: u64,
    /// Sends refused because their connection or user spent its send budget.
    pub sends_over_budget: u64,
    /// Signals dropped, and acks, syncs and pings that paused their connection's input,
    /// because the connection spent its budget for them.
    pub frames_over_budget: u64,
    /// Sends refused because their user passed its distinct recipients per minute.
    pub sends_over_recipient_limit: u64,
    /// Connections closed because `Hello` or a started frame did not arrive in time.
    pub connections_timed_out: u64,
    /// Sends refused because the edge's memory was near its ceiling.
    pub sends_shed: u64,
    /// Sends refused because the commit in flight was slow (the store breaker).
    pub sends_store_slow: u64,
}

/// The kinds of [`Deadline`]: a live connection has at most one entry of each.
const DEADLINE_KINDS: usize = 4;
/// Entries of closed connections the deadline heap may hold beyond `DEADLINE_KINDS` per live
/// connection before it is compacted.
const DEADLINES_SLACK: usize = 1024;

/// Why a connection has an entry in the deadline heap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Deadline {
    Hello,
    Frame,
    /// The connection's input is paused until its send budget refills.
    Resume,
    /// The connection's device record is due to be marked seen again (`refresh_seen`).
    Seen,
}

/// What the session tracks of a user that has connections on this shard.
#[derive(Debug)]
struct Sender {
    connections: usize,
    budget: SendBuckets,
    /// Recipients of the current window, at most `recipients_per_user_per_window_max`.
    recipients: FastHashSet<UserId>,
    recipients_since_ms: UnixMillis,
}

/// Where a connection's login is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Login {
    AwaitingHello,
    /// Authenticated; waiting for the home shard to register the connection.
    Registering {
        user: UserId,
    },
    Active {
        user: UserId,
    },
    Closing,
}

impl Login {
    fn user(self) -> Option<UserId> {
        match self {
            Login::Registering { user } | Login::Active { user } => Some(user),
            Login::AwaitingHello | Login::Closing => None,
        }
    }
}

#[derive(Debug)]
struct Connection {
    generation: u64,
    login: Login,
    device: u32,
    sends_in_flight: usize,
    send_bytes_in_flight: usize,
    budget: SendBuckets,
    /// `signal_rate_per_connection`.
    signal_budget: TokenBucket,
    /// `control_frame_rate_per_connection`.
    control_frame_budget: TokenBucket,
    opened_at_ms: UnixMillis,
    /// Since when the driver holds the start of a frame whose rest has not arrived.
    partial_frame_since_ms: Option<UnixMillis>,
    frame_deadline_queued: bool,
    /// Input is paused until this time: the connection spent its send budget.
    input_paused_until_ms: Option<UnixMillis>,
    /// Input is paused until one of the connection's sends is answered: it has the maximum
    /// in flight.
    input_paused_for_answer: bool,
    /// Highest seq written to this connection, or declared a hole, or held by the device.
    delivered_up_to: u64,
    /// The highest `delivered_up_to` before a `Sync` moved it back (0 if none did): the
    /// device was given everything up to it, so it may acknowledge that much.
    given_before_sync: u64,
    /// Messages written to this connection and not acknowledged on it.
    unacked: UnackedDeliveries,
    /// What the device acknowledged, as far as this connection knows: its cursor at login,
    /// raised by its acks. At most its stored cursor.
    acked_up_to: u64,
    sync_running: bool,
    sync_again: bool,
    /// Bytes written and not yet taken by the transport, as last reported by the driver plus
    /// what the session wrote since.
    outbound_bytes: usize,
}

/// The messages a connection was given and has not acknowledged, as runs of consecutive
/// seqs in delivery order (which is seq order): usually one run, a new one after each hole.
/// At most as many runs as messages, and those at most the window.
#[derive(Debug, Default)]
struct UnackedDeliveries {
    /// First and last seq of each run.
    runs: VecDeque<(u64, u64)>,
    messages: usize,
}

impl UnackedDeliveries {
    /// `seq` was written to the connection; above every seq before it.
    fn delivered(&mut self, seq: u64) {
        self.messages += 1;
        match self.runs.back_mut() {
            Some((_, last)) if last.checked_add(1) == Some(seq) => *last = seq,
            _ => self.runs.push_back((seq, seq)),
        }
    }

    /// The device acknowledged everything up to `up_to_seq`.
    fn acked(&mut self, up_to_seq: u64) {
        while let Some((first, last)) = self.runs.front_mut() {
            if *first > up_to_seq {
                break;
            }
            if *last <= up_to_seq {
                self.messages -= (*last - *first + 1) as usize;
                self.runs.pop_front();
            } else {
                self.messages -= (up_to_seq - *first + 1) as usize;
                *first = up_to_seq + 1;
                break;
            }
        }
    }

    /// The device asked for everything after `after_seq` again (`Sync`): what it was given
    /// above it is given anew.
    fn resent_after(&mut self, after_seq: u64) {
        while let Some((first, last)) = self.runs.back_mut() {
            if *last <= after_seq {
                break;
            }
            if *first > after_seq {
                self.messages -= (*last - *first + 1) as usize;
                self.runs.pop_back();
            } else {
                self.messages -= (*last - after_seq) as usize;
                *last = after_seq;
                break;
            }
        }
    }
}

/// A connection registered at its user's home shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Registration {
    device: u32,
    conn: ConnRef,
    hello_at_ms: UnixMillis,
}

/// One shard's session layer. See the module documentation for the calling order.
#[derive(Debug)]
pub struct EdgeSession<A> {
    config: SessionConfig,
    auth: A,
    conns: FastHashMap<usize, Connection>,
    /// Connections of users homed here that want live deliveries.
    registry: FastHashMap<UserId, Vec<Registration>>,
    inbox: InboxShard<ConnRef>,
    /// Messages for this shard itself, handled before the call returns.
    local: VecDeque<ShardMessage>,
    effects: VecDeque<Effect>,
    stats: SessionStats,
    /// Logins that needed no store read: the link saw nothing after the device's cursor.
    logins_without_read: u64,
    /// Deliveries held back because their connection had its window of unacknowledged ones.
    deliveries_held_for_acks: u64,
    /// Deliveries held back because their connection's outbound buffer had no room.
    deliveries_held_for_room: u64,
    /// The time of the latest input, for the messages handled from `local`.
    now_ms: UnixMillis,
    /// Users with connections on this shard: their send budgets and recipient counts.
    senders: FastHashMap<UserId, Sender>,
    /// Connections that have not said a valid `Hello` (handshaking or waiting).
    unauthenticated: usize,
    /// At most one entry per live connection and kind, and those of closed connections not yet
    /// due (compacted in `connection_lost`): (when, slot, generation, kind).
    deadlines: BinaryHeap<Reverse<(UnixMillis, usize, u64, Deadline)>>,
    /// The edge is near its memory ceiling: refuse sends.
    shedding: bool,
    /// The cluster's edge ids, for placement (empty for an edge on its own).
    edge_ids: Vec<EdgeId>,
    /// This shard's links to the other edges of the cluster.
    out_links: FastHashMap<EdgeId, OutLink>,
    next_request_id: u64,
    /// Links other edges opened to this shard.
    in_links: FastHashMap<u64, InLink>,
    /// Forwarded sends from other edges waiting for their commit, by the generation of their
    /// stand-in connection (`LINK_PROXY_SLOT`): the link and request to answer.
    link_proxies: FastHashMap<u64, (u64, u64)>,
    next_proxy: u64,
    /// Edges whose users this shard serves besides its own (takeover), each with its own
    /// commit queue: their batches commit under that edge's lease. At most one per member.
    guests: BTreeMap<EdgeId, InboxShard<ConnRef>>,
    /// Queues of guests released while a batch of theirs was in flight, until it is answered.
    released: BTreeMap<EdgeId, InboxShard<ConnRef>>,
    /// Edges whose users another edge serves (a takeover elsewhere): home → serving edge.
    servers: BTreeMap<EdgeId, Option<EdgeId>>,
    /// A drain handed this edge's users (and its guests') to this edge: nothing is committed
    /// here any more, and clients and sends for them go there.
    drained_to: Option<EdgeId>,
    /// The edge is stopping ([`EdgeSession::stop_taking_sends`]): new sends are refused as
    /// retryable, so that what is queued can finish.
    taking_sends: bool,
}

/// This shard's link to another edge.
#[derive(Debug, Default)]
struct OutLink {
    up: bool,
    /// Sends forwarded on the link and not answered yet, by request id (in order, so a link
    /// that drops fails them in the order they were sent): at most
    /// `link_requests_in_flight_max` of them and `link_send_bytes_in_flight_max` body bytes.
    pending: BTreeMap<u64, PendingSend>,
    pending_bytes: usize,
}

/// A send this shard forwarded to another edge.
#[derive(Debug, Clone, Copy)]
struct PendingSend {
    reply: ConnRef,
    client_id: u64,
    body_bytes: usize,
}

/// A link another edge opened to this shard.
#[derive(Debug, Default)]
struct InLink {
    /// The edge it said it is (`LinkFrame::Hello`); nothing else is accepted before.
    edge: Option<EdgeId>,
    /// The edges its certificate names, when links are bound to them: `Hello` must say one.
    named: Option<Vec<EdgeId>>,
    /// Its forwarded sends waiting for their commit.
    requests_in_flight: usize,
}

impl<A: Authenticator> EdgeSession<A> {
    pub fn new(config: SessionConfig, auth: A) -> EdgeSession<A> {
        let members = config.cluster.iter().flat_map(|c| c.members.iter());
        let edge_ids: Vec<EdgeId> = members.map(|member| member.id).collect();
        let local_edge = config.cluster.as_ref().map(|cluster| cluster.edge);
        let out_links = edge_ids
            .iter()
            .filter(|id| Some(**id) != local_edge)
            .map(|id| (*id, OutLink::default()))
            .collect();
        EdgeSession {
            inbox: InboxShard::new(&config.core),
            config,
            auth,
            conns: FastHashMap::default(),
            registry: FastHashMap::default(),
            local: VecDeque::new(),
            effects: VecDeque::new(),
            stats: SessionStats::default(),
            logins_without_read: 0,
            deliveries_held_for_acks: 0,
            deliveries_held_for_room: 0,
            now_ms: 0,
            senders: FastHashMap::default(),
            unauthenticated: 0,
            deadlines: BinaryHeap::new(),
            shedding: false,
            edge_ids,
            out_links,
            next_request_id: 1,
            in_links: FastHashMap::default(),
            link_proxies: FastHashMap::default(),
            next_proxy: 1,
            guests: BTreeMap::new(),
            released: BTreeMap::new(),
            servers: BTreeMap::new(),
            drained_to: None,
            taking_sends: true,
        }
    }

    /// While set, every send is refused with `Overloaded` (the edge's memory is near its
    /// ceiling); deliveries and acks go on, and they free memory.
    pub fn set_shedding(&mut self, shedding: bool) {
        self.shedding = shedding;
    }

    // ---- Getters ----------------------------------------------------------------------------

    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// Logins that started without a store read (nothing was stored after the device's
    /// cursor), since the session started.
    pub fn logins_without_read(&self) -> u64 {
        self.logins_without_read
    }

    /// Deliveries (live, or from a read) held back until their connection acknowledged
    /// some of what it was given (`deliveries_unacked_per_connection_max`), since the session
    /// started.
    pub fn deliveries_held_for_acks(&self) -> u64 {
        self.deliveries_held_for_acks
    }

    /// Deliveries (live, or from a read) held back until their connection's outbound buffer
    /// had room (`outbound_bytes_per_connection_max`): the client, or its path, is slower than
    /// its messages. Since the session started.
    pub fn deliveries_held_for_room(&self) -> u64 {
        self.deliveries_held_for_room
    }

    /// Sends waiting for a commit (their senders wait for the answer).
    pub fn queued_sends(&self) -> usize {
        self.inbox.queued_sends()
            + self
                .guests
                .values()
                .map(InboxShard::queued_sends)
                .sum::<usize>()
    }

    /// Makes every ack (and forget) waiting now due at once, the guests' too: a draining edge
    /// commits them before it exits instead of waiting out `ack_commit_delay_ms`.
    pub fn acks_due_now(&mut self) {
        self.inbox.acks_due_now();
        for guest in self.guests.values_mut() {
            guest.acks_due_now();
        }
    }

    /// Requests waiting for a commit, and whether one is in flight: a shard is idle when both
    /// are zero.
    pub fn queued_requests(&self) -> usize {
        self.inbox.queued_requests()
            + self
                .guests
                .values()
                .map(InboxShard::queued_requests)
                .sum::<usize>()
    }

    /// Requests waiting in the queues of the guest edges this shard serves.
    pub fn guest_queued_requests(&self) -> usize {
        self.guests.values().map(InboxShard::queued_requests).sum()
    }

    /// Whether a batch of this edge's users or of a guest edge's (released or not) is in flight.
    pub fn batch_in_flight(&self) -> bool {
        self.inbox.batch_in_flight()
            || self.guests.values().any(InboxShard::batch_in_flight)
            || !self.released.is_empty()
    }

    /// Connections this shard holds.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// The user a connection is logged in as (or logging in as), for logs.
    pub fn user_of(&self, conn: ConnRef) -> Option<UserId> {
        self.conn(conn).and_then(|c| c.login.user())
    }

    /// Connections that have not said a valid `Hello` yet, handshakes included: the driver
    /// keeps them under their own, small limit.
    pub fn unauthenticated_connections(&self) -> usize {
        self.unauthenticated
    }

    /// Entries in the deadline heap: at most `DEADLINE_KINDS` per open connection, plus those
    /// of closed connections not yet due, which compaction bounds.
    pub fn deadline_entries(&self) -> usize {
        self.deadlines.len()
    }

    /// Whether the connection is open and has not said a valid `Hello` yet.
    pub fn awaiting_hello(&self, conn: ConnRef) -> bool {
        self.conn(conn)
            .is_some_and(|c| c.login == Login::AwaitingHello)
    }

    /// When [`EdgeSession::handle_deadlines`] has work: a `Hello` or a started frame is due,
    /// or failed commits have landed (`InboxShard::unknown_results_landed_by_ms`).
    pub fn next_deadline_ms(&self) -> Option<UnixMillis> {
        let connections = self.deadlines.peek().map(|Reverse((at, ..))| *at);
        let unknown_results = std::iter::once(&self.inbox)
            .chain(self.guests.values())
            .filter_map(InboxShard::unknown_results_landed_by_ms);
        connections.into_iter().chain(unknown_results).min()
    }

    /// The session's state of one connection, for diagnostics (simulation failures).
    pub fn describe_connection(&self, conn: ConnRef) -> Option<String> {
        self.conn(conn).map(|c| format!("{c:?}"))
    }

    // ---- Connections ------------------------------------------------------------------------

    /// A new connection on this shard; it must send `Hello` within `hello_timeout_ms`.
    pub fn open_connection(&mut self, now_ms: UnixMillis, conn: ConnRef) {
        let hello_due = now_ms.saturating_add(self.config.hello_timeout_ms);
        self.deadlines.push(Reverse((
            hello_due,
            conn.slot,
            conn.generation,
            Deadline::Hello,
        )));
        self.unauthenticated += 1;
        let budget = SendBuckets::full(self.config.send_budget_per_connection, now_ms);
        self.conns.insert(
            conn.slot,
            Connection {
                generation: conn.generation,
                login: Login::AwaitingHello,
                device: 0,
                sends_in_flight: 0,
                send_bytes_in_flight: 0,
                budget,
                signal_budget: TokenBucket::full(self.config.signal_rate_per_connection, now_ms),
                control_frame_budget: TokenBucket::full(
                    self.config.control_frame_rate_per_connection,
                    now_ms,
                ),
                opened_at_ms: now_ms,
                partial_frame_since_ms: None,
                frame_deadline_queued: false,
                input_paused_until_ms: None,
                input_paused_for_answer: false,
                delivered_up_to: 0,
                given_before_sync: 0,
                unacked: UnackedDeliveries::default(),
                acked_up_to: 0,
                sync_running: false,
                sync_again: false,
                outbound_bytes: 0,
            },
        );
    }

    /// The connection is gone (lost, drained or closed): forget it and its registration.
    pub fn connection_lost(&mut self, conn: ConnRef) {
        if self.conn(conn).is_none() {
            return;
        }
        self.end_login(conn);
        self.conns.remove(&conn.slot);
        // A closed connection's deadlines are dropped when they come due, and its `Seen` one
        // comes up to an hour later: under a churn of connections the heap would hold every
        // connection of the last hour. Past what the live ones can have, only theirs are kept
        // (amortized: the next compaction is at least as many closes away).
        if self.deadlines.len() > DEADLINE_KINDS * self.conns.len() + DEADLINES_SLACK {
            let conns = &self.conns;
            self.deadlines.retain(|Reverse((_, slot, generation, _))| {
                conns.get(slot).is_some_and(|c| c.generation == *generation)
            });
        }
        self.drain_local();
    }

    /// Whether the driver must stop reading the connection's input (leave its frames undecoded,
    /// and its bytes to QUIC flow control) until [`Effect::ResumeInput`]: the connection spent
    /// its send budget, and decoding more of its sends would only refuse them.
    pub fn input_paused(&self, conn: ConnRef) -> bool {
        self.conn(conn)
            .is_some_and(|c| c.input_paused_until_ms.is_some() || c.input_paused_for_answer)
    }

    /// What the driver may decode next from the connection, in one lookup per frame: `None`
    /// while its input is paused ([`EdgeSession::input_paused`]) or the session closed it (the
    /// frames after the one that closed it are not decoded), else the largest frame body it
    /// may send. Before `Hello` only a `Hello` fits, so an unauthenticated client cannot make
    /// the driver buffer a maximal frame.
    pub fn frame_bytes_max(&self, conn: ConnRef) -> Option<usize> {
        match self.conn(conn) {
            Some(c) if c.input_paused_until_ms.is_some() || c.input_paused_for_answer => None,
            Some(c) if c.login == Login::Closing => None,
            Some(c) if c.login == Login::AwaitingHello => {
                Some(courier_protocol::HELLO_FRAME_BYTES_MAX)
            }
            _ => Some(courier_protocol::FRAME_BYTES_MAX),
        }
    }

    /// Whether the driver holds the start of a frame from this connection whose rest has not
    /// arrived. A frame must be complete within `frame_timeout_ms` of its first bytes, so a
    /// client cannot park a partial frame (and its buffer) forever.
    pub fn set_partial_frame(&mut self, now_ms: UnixMillis, conn: ConnRef, partial: bool) {
        let timeout_ms = self.config.frame_timeout_ms;
        let Some(c) = self.conn_mut(conn) else {
            return;
        };
        if !partial {
            c.partial_frame_since_ms = None;
            return;
        }
        if c.partial_frame_since_ms.is_some() {
            return;
        }
        c.partial_frame_since_ms = Some(now_ms);
        if !c.frame_deadline_queued {
            c.frame_deadline_queued = true;
            let due = now_ms.saturating_add(timeout_ms);
            self.deadlines
                .push(Reverse((due, conn.slot, conn.generation, Deadline::Frame)));
        }
    }

    /// The frame that was partial was finished and another started since: the timeout is the
    /// new one's, from `now_ms`. (Its deadline, queued for the earlier frame, is put back when it
    /// comes due.)
    pub fn restart_partial_frame(&mut self, now_ms: UnixMillis, conn: ConnRef) {
        if let Some(c) = self.conn_mut(conn)
            && c.partial_frame_since_ms.is_some()
        {
            c.partial_frame_since_ms = Some(now_ms);
        }
    }

    /// Closes the connections whose `Hello` or started frame is overdue at `now_ms`, and
    /// sends connections to the store once failed commits have landed
    /// (`InboxShard::poll_unknown_results`).
    pub fn handle_deadlines(&mut self, now_ms: UnixMillis) {
        self.now_ms = now_ms;
        while let Some(Reverse((at, slot, generation, kind))) = self.deadlines.peek().copied() {
            if at > now_ms {
                break;
            }
            self.deadlines.pop();
            let conn = ConnRef {
                shard: self.config.shard,
                slot,
                generation,
            };
            let frame_timeout_ms = self.config.frame_timeout_ms;
            let Some(c) = self.conn_mut(conn) else {
                continue;
            };
            match kind {
                Deadline::Hello => {
                    if c.login == Login::AwaitingHello {
                        let waited_ms = now_ms.saturating_sub(c.opened_at_ms);
                        self.stats.connections_timed_out += 1;
                        self.close(
                            conn,
                            ErrorCode::TimedOut,
                            format!("no Hello within {waited_ms} ms of connecting"),
                        );
                    }
                }
                Deadline::Resume => {
                    if c.input_paused_until_ms.is_some_and(|until| until <= now_ms) {
                        c.input_paused_until_ms = None;
                        if !c.input_paused_for_answer {
                            self.effects.push_back(Effect::ResumeInput { conn });
                        }
                    }
                }
                Deadline::Seen => {
                    if let Login::Active { user } = c.login {
                        self.refresh_seen(now_ms, conn, user);
                    }
                }
                Deadline::Frame => match c.partial_frame_since_ms {
                    None => c.frame_deadline_queued = false,
                    Some(since) if since.saturating_add(frame_timeout_ms) <= now_ms => {
                        c.frame_deadline_queued = false;
                        self.stats.connections_timed_out += 1;
                        self.close(
                            conn,
                            ErrorCode::TimedOut,
                            format!(
                                "a frame was started and not finished within {frame_timeout_ms} ms"
                            ),
                        );
                    }
                    Some(since) => {
                        // A later frame started since: wait for its own deadline.
                        let due = since.saturating_add(frame_timeout_ms);
                        self.deadlines
                            .push(Reverse((due, slot, generation, Deadline::Frame)));
                    }
                },
            }
        }
        // Failed commits that may have stored sends have landed by now, if they ever will:
        // their inboxes' connections read the store.
        let mut outputs = self.inbox.poll_unknown_results(now_ms);
        for guest in self.guests.values_mut() {
            outputs.extend(guest.poll_unknown_results(now_ms));
        }
        self.apply_outputs(outputs);
    }

    /// The driver's count of bytes still waiting in the connection's outbound buffer. When it
    /// falls to zero, a sync that paused for room continues.
    pub fn set_outbound_bytes(&mut self, conn: ConnRef, bytes: usize) {
        let Some(c) = self.conn_mut(conn) else {
            return;
        };
        c.outbound_bytes = bytes;
        if bytes == 0 && c.sync_again && !c.sync_running {
            self.start_sync(conn);
        }
        self.drain_local();
    }

    // ---- Input ------------------------------------------------------------------------------

    /// Handles a frame from a client. `early` is true for 0-RTT data, which an attacker can
    /// replay: only idempotent frames are accepted there.
    pub fn handle_frame(&mut self, now_ms: UnixMillis, conn: ConnRef, frame: Frame, early: bool) {
        self.now_ms = now_ms;
        self.handle_client_frame(now_ms, conn, frame, early);
        self.drain_local();
    }

    /// The driver ends the connection (bytes that are not a valid frame, a finished stream):
    /// ends its login and closes it with `code`.
    pub fn close_connection(&mut self, conn: ConnRef, code: ErrorCode, reason: String) {
        self.close(conn, code, reason);
        self.drain_local();
    }

    /// Handles a message from another shard.
    pub fn handle_message(&mut self, now_ms: UnixMillis, message: ShardMessage) {
        self.now_ms = now_ms;
        self.handle_shard_message(now_ms, message);
        self.drain_local();
    }

    /// The result of a [`Effect::Read`] for `conn` at cursor `after_seq`. Writes each message
    /// in order, with a `Hole` in front of any seq the store no longer has (and up to where
    /// the page covers the inbox), so the client never waits for a message that is gone.
    pub fn handle_read(
        &mut self,
        conn: ConnRef,
        after_seq: u64,
        result: Result<InboxPage, StoreError>,
    ) {
        self.finish_read(conn, after_seq, result);
        self.drain_local();
    }

    // ---- Links between edges ----------------------------------------------------------------

    /// This shard's link to `edge` is connected (and said `Hello`): sends to its users are
    /// forwarded from now on.
    pub fn link_up(&mut self, edge: EdgeId) {
        if let Some(link) = self.out_links.get_mut(&edge) {
            link.up = true;
        }
    }

    /// This shard's link to `edge` is down: sends to its users are refused with the retryable
    /// `ShardUnavailable` until [`EdgeSession::link_up`], and so are the sends it carried that
    /// were not answered (their clients retry them; the far edge's dedupe record answers a
    /// retry of one that did commit with its seq).
    pub fn link_down(&mut self, edge: EdgeId) {
        let Some(link) = self.out_links.get_mut(&edge) else {
            return;
        };
        link.up = false;
        link.pending_bytes = 0;
        let pending = std::mem::take(&mut link.pending);
        for send in pending.into_values() {
            self.local.push_back(ShardMessage::SendResult {
                reply: send.reply,
                client_id: send.client_id,
                body_bytes: send.body_bytes,
                result: Err(ErrorCode::ShardUnavailable),
            });
        }
        self.drain_local();
    }

    /// A frame that arrived on this shard's link to `edge`: the answer to a forwarded send.
    /// An error means the peer broke the link protocol: the driver closes the link (and then
    /// calls [`EdgeSession::link_down`]).
    pub fn handle_link_answer(
        &mut self,
        now_ms: UnixMillis,
        edge: EdgeId,
        frame: LinkFrame,
    ) -> Result<(), String> {
        self.now_ms = now_ms;
        let LinkFrame::SendResult { request_id, result } = frame else {
            return Err(format!(
                "edge {edge} sent a {} frame on a link this edge opened",
                frame.kind()
            ));
        };
        let Some(link) = self.out_links.get_mut(&edge) else {
            return Err(format!("edge {edge} is not a member of the cluster"));
        };
        // An answer to a send already failed by `link_down` does not exist on a new link.
        let Some(send) = link.pending.remove(&request_id) else {
            return Err(format!(
                "edge {edge} answered request {request_id}, never sent"
            ));
        };
        link.pending_bytes = link.pending_bytes.saturating_sub(send.body_bytes);
        self.local.push_back(ShardMessage::SendResult {
            reply: send.reply,
            client_id: send.client_id,
            body_bytes: send.body_bytes,
            result: result.into_result(),
        });
        self.drain_local();
        Ok(())
    }

    /// Another edge opened a link to this shard; `link` is the driver's id for it.
    ///
    /// `named`: the edges the peer's certificate names, when links are bound to them (the
    /// edge's `cluster.link_certificates_name_the_edge`); its `Hello` must then say one of
    /// them. `None`: any member.
    pub fn open_link(&mut self, link: u64, named: Option<Vec<EdgeId>>) {
        self.in_links.insert(
            link,
            InLink {
                named,
                ..InLink::default()
            },
        );
    }

    /// A link another edge opened to this shard is gone: answers to its sends have nowhere to
    /// go (the other edge failed them as `ShardUnavailable` when it saw the link drop).
    pub fn link_closed(&mut self, link: u64) {
        if self.in_links.remove(&link).is_some() {
            self.link_proxies.retain(|_, (on, _)| *on != link);
        }
    }

    /// A frame on a link another edge opened to this shard. An error means the peer broke the
    /// link protocol: the driver closes the link (and calls [`EdgeSession::link_closed`]).
    pub fn handle_link_request(
        &mut self,
        now_ms: UnixMillis,
        link: u64,
        frame: LinkFrame,
    ) -> Result<(), String> {
        self.now_ms = now_ms;
        let result = self.link_request(link, frame);
        self.drain_local();
        result
    }

    fn link_request(&mut self, link: u64, frame: LinkFrame) -> Result<(), String> {
        let local_edge = self.config.cluster.as_ref().map(|cluster| cluster.edge);
        let requests_max = self.config.link_requests_in_flight_max;
        let Some(said_hello) = self.in_links.get(&link).map(|in_link| in_link.edge) else {
            return Err(format!("link {link} is not open"));
        };
        let peer = match (said_hello, frame) {
            (None, LinkFrame::Hello { edge }) => {
                if local_edge.is_none() || local_edge == Some(edge) {
                    return Err(format!("edge {edge} cannot link to this edge"));
                }
                if !self.edge_ids.contains(&edge) {
                    return Err(format!("edge {edge} is not a member of this cluster"));
                }
                if let Some(in_link) = self.in_links.get_mut(&link) {
                    if let Some(named) = &in_link.named
                        && !named.contains(&edge)
                    {
                        return Err(format!(
                            "a link said it is edge {edge}, but its certificate names {named:?}"
                        ));
                    }
                    in_link.edge = Some(edge);
                }
                return Ok(());
            }
            (None, frame) => {
                return Err(format!(
                    "a link must start with hello, not {}",
                    frame.kind()
                ));
            }
            (Some(edge), LinkFrame::Hello { .. }) => {
                return Err(format!("edge {edge} said hello twice"));
            }
            (Some(_), LinkFrame::SendResult { .. }) => {
                return Err("a send result on a link the other edge opened".into());
            }
            (Some(edge), frame) => (edge, frame),
        };
        let (edge, frame) = peer;
        let frame_kind = frame.kind();
        match frame {
            LinkFrame::Send {
                request_id,
                sender,
                client_id,
                to,
                body,
                ttl_secs,
            } => {
                // The sender's edge placed `to` here; if this edge disagrees (membership
                // changing), refuse as retryable instead of storing where no one reads.
                let misplaced = self.remote_home(to).is_some();
                let Some(in_link) = self.in_links.get(&link) else {
                    return Ok(());
                };
                // A link bound to its edge's certificate speaks only for the users that edge
                // serves, so one edge's leaked key cannot send as any user of the cluster. A
                // view that differs for a moment (a takeover, a member change) gets the same
                // retryable refusal as a misplaced recipient.
                let not_its_sender =
                    in_link.named.is_some() && self.remote_home(sender) != Some(edge);
                let Some(in_link) = self.in_links.get_mut(&link) else {
                    return Ok(());
                };
                let refusal = if misplaced || not_its_sender {
                    Some(ErrorCode::ShardUnavailable)
                } else if !self.taking_sends {
                    Some(ErrorCode::ShuttingDown)
                } else if in_link.requests_in_flight >= requests_max {
                    Some(ErrorCode::Overloaded)
                } else {
                    None
                };
                if let Some(code) = refusal {
                    let result = LinkSendResult::Refused { code };
                    let frame = LinkFrame::SendResult { request_id, result };
                    self.effects.push_back(Effect::LinkReply { link, frame });
                    return Ok(());
                }
                in_link.requests_in_flight += 1;
                let proxy = self.next_proxy;
                self.next_proxy += 1;
                self.link_proxies.insert(proxy, (link, request_id));
                let reply = ConnRef {
                    shard: self.config.shard,
                    slot: LINK_PROXY_SLOT,
                    generation: proxy,
                };
                let send = SendRequest {
                    sender,
                    client_id,
                    to,
                    body,
                    ttl_secs,
                };
                let home = self.home_of(to);
                self.route(home, ShardMessage::Send { send, reply });
            }
            LinkFrame::Signal {
                to,
                from,
                kind,
                payload,
            } => {
                // As a send: a bound link signals only as the users its edge serves. Signals
                // are best effort, so one that fails the check is dropped.
                let bound = self
                    .in_links
                    .get(&link)
                    .is_some_and(|in_link| in_link.named.is_some());
                let not_its_sender = bound && self.remote_home(from) != Some(edge);
                if self.remote_home(to).is_none() && !not_its_sender {
                    let home = self.home_of(to);
                    let message = ShardMessage::Signal {
                        to,
                        from,
                        kind,
                        payload,
                    };
                    self.route(home, message);
                }
            }
            LinkFrame::Hello { .. } | LinkFrame::SendResult { .. } => {
                return Err(format!("edge {edge} sent an unexpected {}", frame_kind));
            }
        }
        Ok(())
    }

    /// Own batches taken so far: the number the next own batch gets (`Batch::number`).
    pub fn batches_taken(&self) -> u64 {
        self.inbox.batches_taken()
    }

    /// Takes the next group-commit batch, if any and none is in flight.
    pub fn poll_batch(&mut self, now_ms: UnixMillis) -> Option<Batch<ConnRef>> {
        if self.drained_to.is_some() {
            // The lease is handed over: a commit could only be fenced.
            return None;
        }
        self.inbox.poll_batch(now_ms)
    }

    /// Expiry left these inboxes without a message: forget those homed on this shard with a
    /// later batch (their counters go; decision 0011). Returns how many of those the queue had
    /// no room for.
    ///
    /// Only an inbox's home shard may write it, and in a cluster only the edge that serves its
    /// users (their home edge, or this edge as its guest while it holds the home edge's
    /// lease): on a shared store an expiry pass (and `commit::expire_shared`'s listing) sees
    /// every shard's and every edge's, so each shard hands every inbox it heard of here.
    pub fn handle_emptied(&mut self, inboxes: &[UserId], now_ms: UnixMillis) -> usize {
        if self.drained_to.is_some() {
            // Nothing commits here any more; the edge serving them now forgets them.
            return 0;
        }
        let local_edge = self.config.cluster.as_ref().map(|cluster| cluster.edge);
        let mut dropped = 0;
        for inbox in inboxes {
            if home_shard(*inbox, self.config.shard_count) != u32::from(self.config.shard) {
                continue;
            }
            let home = (!self.edge_ids.is_empty()).then(|| home_edge(*inbox, &self.edge_ids));
            let queue = match home {
                Some(edge) if home != local_edge => {
                    // Another edge's user: forgotten here while this edge serves that edge's
                    // users (its lease fences the commit as it fences the guest's sends);
                    // otherwise by whoever serves them. A guest's emptied inboxes used to
                    // wait for their edge to come back.
                    match self.guests.get_mut(&edge) {
                        Some(guest) => guest,
                        None => continue,
                    }
                }
                _ => &mut self.inbox,
            };
            if !queue.handle_emptied(*inbox, now_ms) {
                dropped += 1;
            }
        }
        dropped
    }

    /// When `poll_batch` has a batch of waiting acks even if nothing else arrives: the driver
    /// calls it again then (`InboxShard::batch_deadline_ms`).
    pub fn own_batch_deadline_ms(&self) -> Option<UnixMillis> {
        self.drained_to
            .is_none()
            .then(|| self.inbox.batch_deadline_ms())
            .flatten()
    }

    /// When `poll_guest_batch` has a batch of a guest's waiting acks even if nothing else
    /// arrives. Apart from [`EdgeSession::own_batch_deadline_ms`]: the driver holds guest
    /// commits back after a failed one, and a deadline armed before that would find nothing to
    /// take, again and again.
    pub fn guest_batch_deadline_ms(&self) -> Option<UnixMillis> {
        self.guests
            .values()
            .filter_map(InboxShard::batch_deadline_ms)
            .min()
    }

    /// The next batch of a guest edge's users, if any: the driver commits it under that
    /// edge's lease and hands the result to [`EdgeSession::handle_guest_commit`]. One batch per
    /// guest is in flight at a time, apart from this edge's own.
    pub fn poll_guest_batch(&mut self, now_ms: UnixMillis) -> Option<(EdgeId, Batch<ConnRef>)> {
        self.guests
            .iter_mut()
            .find_map(|(edge, inbox)| Some((*edge, inbox.poll_batch(now_ms)?)))
    }

    /// The result of committing a guest edge's batch (`Fenced`: the driver also releases the
    /// guest, on every shard).
    pub fn handle_guest_commit(
        &mut self,
        now_ms: UnixMillis,
        edge: EdgeId,
        batch: Batch<ConnRef>,
        result: Result<Vec<Outcome>, StoreError>,
    ) {
        let outputs = match self.released.remove(&edge) {
            Some(mut inbox) => inbox.handle_commit(now_ms, batch, result),
            None => match self.guests.get_mut(&edge) {
                Some(inbox) => inbox.handle_commit(now_ms, batch, result),
                None => {
                    // A driver bug; ending the process for it would drop every connection.
                    debug_assert!(false, "handle_guest_commit for edge {edge} with no batch");
                    return;
                }
            },
        };
        self.apply_outputs(outputs);
    }

    /// Serves `edge`'s users from now on (this edge claimed its lease): their clients are
    /// accepted and their inboxes committed through [`EdgeSession::poll_guest_batch`].
    pub fn serve_guest(&mut self, edge: EdgeId) {
        let local_edge = self.config.cluster.as_ref().map(|cluster| cluster.edge);
        if local_edge == Some(edge) || !self.edge_ids.contains(&edge) {
            return;
        }
        self.servers.remove(&edge);
        if !self.guests.contains_key(&edge) {
            // A queue released with its batch in flight serves again as it is.
            let inbox = self.released.remove(&edge).unwrap_or_else(|| {
                // A guest's batches commit one at a time: its committer goes with each
                // (`takeover::ShardGuests`), and its stores sync every commit.
                InboxShard::new(&CoreConfig {
                    batches_in_flight_max: 1,
                    ..self.config.core.clone()
                })
            });
            self.guests.insert(edge, inbox);
        }
    }

    /// Stops serving `edge`'s users (its lease was claimed by someone else): their clients on
    /// this shard are redirected to whoever serves them now ([`EdgeSession::set_servers`] first),
    /// their queued sends refused as retryable. Queued acks and logins are dropped: the
    /// clients repeat both where they log in next.
    pub fn release_guest(&mut self, edge: EdgeId) {
        let Some(mut inbox) = self.guests.remove(&edge) else {
            return;
        };
        self.refuse_sends(inbox.take_queued_sends());
        if inbox.batch_in_flight() {
            self.released.insert(edge, inbox);
        }
        let mut moving: Vec<(ConnRef, UserId)> = self
            .conns
            .iter()
            .filter_map(|(slot, c)| {
                let user = c.login.user()?;
                let conn = ConnRef {
                    shard: self.config.shard,
                    slot: *slot,
                    generation: c.generation,
                };
                (home_edge(user, &self.edge_ids) == edge).then_some((conn, user))
            })
            .collect();
        // In slot order, not the map's: a simulation seed must replay exactly.
        moving.sort_unstable_by_key(|(conn, _)| conn.slot);
        for (conn, user) in moving {
            if self.home_unserved(user) {
                self.close(
                    conn,
                    ErrorCode::ShardUnavailable,
                    "another edge took this user over; reconnect".into(),
                );
                continue;
            }
            let server = self.remote_home(user).unwrap_or(edge);
            self.redirect(conn, user, server);
        }
        self.drain_local();
    }

    /// [`EdgeSession::release_guest`] after a commit for `edge`'s users came back fenced:
    /// someone claimed them, and the view does not say who until the edge's planner looks.
    /// Until it does, their clients are closed retryably rather than sent home (which may be
    /// the dead edge this one took over).
    pub fn release_fenced_guest(&mut self, edge: EdgeId) {
        if self.guests.contains_key(&edge) {
            self.servers.insert(edge, None);
        }
        self.release_guest(edge);
    }

    /// A drain: this edge's leases (its own and its guests') were handed to `edge`. Every
    /// logged-in client on this shard is sent there, the rest closed with `ShuttingDown`;
    /// queued sends are refused as retryable (the clients send them again there), and queued
    /// acks and logins dropped (repeated there). From now on nothing is committed here, and
    /// sends forwarded to this edge's users are refused as retryable.
    /// The edge is stopping: sends from now on (from clients or forwarded by other edges)
    /// are refused as retryable (`ShuttingDown`), so that the queue of what was accepted
    /// empties, its answers go out, and the shard can close its connections. While sends
    /// kept coming, a busy shard's queue was never empty at the moment it looked, and its
    /// drain ran out its grace period instead (no `ShuttingDown` to clients, no TLS sessions
    /// saved). Acks, logins and reads go on; they dwindle once nothing new is stored.
    pub fn stop_taking_sends(&mut self) {
        self.taking_sends = false;
    }

    pub fn drain_to(&mut self, edge: EdgeId) {
        if self.drained_to.is_some() {
            return;
        }
        self.drained_to = Some(edge);
        let guests: Vec<EdgeId> = self.guests.keys().copied().collect();
        for guest in guests {
            self.servers.insert(guest, Some(edge));
            self.release_guest(guest);
        }
        self.refuse_queued_own();
        let mut conns: Vec<(ConnRef, Option<UserId>)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.login != Login::Closing)
            .map(|(slot, c)| {
                let conn = ConnRef {
                    shard: self.config.shard,
                    slot: *slot,
                    generation: c.generation,
                };
                (conn, c.login.user())
            })
            .collect();
        conns.sort_unstable_by_key(|(conn, _)| conn.slot);
        for (conn, user) in conns {
            match user {
                Some(user) => self.redirect(conn, user, edge),
                None => self.close(conn, ErrorCode::ShuttingDown, "edge draining".into()),
            }
        }
        self.drain_local();
    }

    /// Refuses the sends queued for this edge's own users as retryable and drops the rest of
    /// the queue (a drain: the lease is gone).
    fn refuse_queued_own(&mut self) {
        let sends = self.inbox.take_queued_sends();
        self.refuse_sends(sends);
    }

    /// Answers `sends` with the retryable `ShardUnavailable`: their users are not served here
    /// (any more), and the clients send them again where they are.
    fn refuse_sends(&mut self, sends: Vec<(SendRequest, ConnRef)>) {
        for (send, reply) in sends {
            self.route(
                reply.shard,
                ShardMessage::SendResult {
                    reply,
                    client_id: send.client_id,
                    body_bytes: send.body.len(),
                    result: Err(ErrorCode::ShardUnavailable),
                },
            );
        }
    }

    /// Which edges other edges serve (from [`crate::takeover::Planner::servers`]): home →
    /// serving edge, for every edge not serving its own users. Entries naming this edge are
    /// ignored: what this edge serves is [`EdgeSession::serve_guest`]'s.
    pub fn set_servers(&mut self, servers: BTreeMap<EdgeId, Option<EdgeId>>) {
        self.servers = servers;
    }

    /// Whether this shard's own store is near its memory bound (`InboxShard::set_store_full`):
    /// sends for its inboxes are refused with `StoreUnavailable` while it is.
    pub fn set_store_full(&mut self, full: bool) {
        self.inbox.set_store_full(full);
    }

    /// The result of committing `batch`: answers to the senders and live deliveries.
    pub fn handle_commit(
        &mut self,
        now_ms: UnixMillis,
        batch: Batch<ConnRef>,
        result: Result<Vec<Outcome>, StoreError>,
    ) {
        let outputs = self.inbox.handle_commit(now_ms, batch, result);
        self.apply_outputs(outputs);
        if self.drained_to.is_some() {
            // A failed batch put its acks back: nothing here may commit them any more.
            self.refuse_queued_own();
            self.drain_local();
        }
    }

    fn apply_outputs(&mut self, outputs: Vec<Output<ConnRef>>) {
        for output in outputs {
            match output {
                Output::SendAck {
                    tag,
                    client_id,
                    body_bytes,
                    seq,
                    server_time_ms,
                } => self.route(
                    tag.shard,
                    ShardMessage::SendResult {
                        reply: tag,
                        client_id,
                        body_bytes,
                        result: Ok((seq, server_time_ms)),
                    },
                ),
                Output::SendError {
                    tag,
                    client_id,
                    body_bytes,
                    code,
                } => self.route(
                    tag.shard,
                    ShardMessage::SendResult {
                        reply: tag,
                        client_id,
                        body_bytes,
                        result: Err(code),
                    },
                ),
                Output::Linked {
                    tag,
                    cursor,
                    first_seq,
                    stored_after_cursor,
                } => self.route(
                    tag.shard,
                    ShardMessage::Registered {
                        conn: tag,
                        cursor,
                        first_seq,
                        stored_after_cursor,
                    },
                ),
                Output::Deliver(message) => {
                    self.fan_out(message.inbox, message, |conn, message| {
                        ShardMessage::Deliver { conn, message }
                    });
                }
                Output::CatchUp { inbox, seq } => {
                    self.fan_out(inbox, seq, |conn, seq| ShardMessage::CatchUp { conn, seq });
                }
                Output::Gone {
                    inbox,
                    up_to_seq,
                    purged,
                } => {
                    self.fan_out(inbox, up_to_seq, |conn, up_to_seq| ShardMessage::Gone {
                        conn,
                        up_to_seq,
                        purged,
                    });
                }
            }
        }
        self.drain_local();
    }

    /// The connections this shard holds for `user` (logged in or logging in): each with its
    /// device and when it opened. For operators (`courier-edge ctl connections`).
    pub fn connections_of(&self, user: UserId) -> Vec<(ConnRef, u32, UnixMillis)> {
        self.conns
            .iter()
            .filter(|(_, c)| c.login.user() == Some(user))
            .map(|(slot, c)| {
                let conn = ConnRef {
                    shard: self.config.shard,
                    slot: *slot,
                    generation: c.generation,
                };
                (conn, c.device, c.opened_at_ms)
            })
            .collect()
    }

    /// Closes every connection of `user` on this shard with `Disconnected`; returns how many.
    pub fn disconnect_user(&mut self, user: UserId, reason: &str) -> usize {
        let conns = self.connections_of(user);
        for (conn, ..) in &conns {
            self.close(*conn, ErrorCode::Disconnected, reason.to_string());
        }
        self.drain_local();
        conns.len()
    }

    /// Queues the erasure of `inbox`, homed on this shard, for the next batch
    /// (`Request::Purge`).
    ///
    /// Only for this edge's own users: a guest's purge would be answered by this edge's own
    /// batches, and the guest's edge can purge once it is back.
    pub fn handle_purge(&mut self, inbox: UserId) -> Result<(), PurgeRefused> {
        self.check_purge(inbox)?;
        let Some(refused) = self.inbox.handle_purge(inbox) else {
            return Err(PurgeRefused::QueueFull);
        };
        for conn in refused {
            self.refuse_registration(inbox, conn, ErrorCode::Overloaded);
        }
        self.drain_local();
        Ok(())
    }

    /// Whether [`EdgeSession::handle_purge`] would take `inbox` now, without queuing it: the
    /// control socket asks before it disconnects the user, so that a purge refused (a guest's
    /// user, a drained edge, a full queue) does not log the user out for nothing.
    pub fn check_purge(&self, inbox: UserId) -> Result<(), PurgeRefused> {
        let local_edge = self.config.cluster.as_ref().map(|cluster| cluster.edge);
        let home = (!self.edge_ids.is_empty()).then(|| home_edge(inbox, &self.edge_ids));
        if let Some(home) = home.filter(|home| Some(*home) != local_edge) {
            let edge = self.remote_home(inbox).unwrap_or(home);
            return Err(PurgeRefused::ServedElsewhere { edge });
        }
        if let Some(edge) = self.drained_to {
            return Err(PurgeRefused::ServedElsewhere { edge });
        }
        if !self.inbox.purge_has_room(inbox) {
            return Err(PurgeRefused::QueueFull);
        }
        Ok(())
    }

    /// Closes every connection with `code` (shutdown: clients reconnect).
    /// Connections already redirected or closed are left to finish: a second close would
    /// discard a `Goaway` not yet sent.
    pub fn close_all(&mut self, code: ErrorCode, reason: &str) {
        let conns: Vec<ConnRef> = self
            .conns
            .iter()
            .filter(|(_, c)| c.login != Login::Closing)
            .map(|(slot, c)| ConnRef {
                shard: self.config.shard,
                slot: *slot,
                generation: c.generation,
            })
            .collect();
        for conn in conns {
            self.close(conn, code, reason.to_string());
        }
        self.drain_local();
    }

    // ---- Output -----------------------------------------------------------------------------

    /// The next effect for the driver.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    // ---- Frames from clients ----------------------------------------------------------------

    fn handle_client_frame(
        &mut self,
        now_ms: UnixMillis,
        conn: ConnRef,
        frame: Frame,
        early: bool,
    ) {
        let Some(c) = self.conn(conn) else {
            return;
        };
        let user = match (c.login, &frame) {
            // A closing connection (redirected, refused, superseded) handles nothing more: a
            // second close could discard the `Goaway` it is waiting to send.
            (Login::Closing, _) => return,
            _ if early && !frame.is_idempotent() => {
                return self.close(
                    conn,
                    ErrorCode::UnexpectedFrame,
                    "only idempotent frames are allowed in 0-RTT data".into(),
                );
            }
            (Login::AwaitingHello, Frame::Hello { .. }) => 0,
            (Login::AwaitingHello, _) => {
                return self.close(
                    conn,
                    ErrorCode::UnexpectedFrame,
                    "the first frame must be Hello".into(),
                );
            }
            (Login::Registering { .. } | Login::Active { .. }, Frame::Hello { .. }) => {
                return self.close(
                    conn,
                    ErrorCode::UnexpectedFrame,
                    "Hello was already sent".into(),
                );
            }
            (Login::Registering { user } | Login::Active { user }, _) => user,
        };
        let over_budget = match frame {
            Frame::Signal { .. } => !self.spend_frame_budget(now_ms, conn, true),
            Frame::Ack { .. } | Frame::Sync { .. } | Frame::Ping { .. } => {
                !self.spend_frame_budget(now_ms, conn, false)
            }
            _ => false,
        };
        if over_budget {
            self.stats.frames_over_budget += 1;
            if matches!(frame, Frame::Signal { .. }) {
                return;
            }
        }
        match frame {
            Frame::Hello {
                token,
                device,
                acked_up_to,
                resume_after_seq,
            } => {
                let user = match self.auth.authenticate(&token, device, now_ms / 1000) {
                    Ok(user) => user,
                    Err(failure) => return self.close(conn, failure.code, failure.reason),
                };
                if self.home_unserved(user) {
                    return self.close(
                        conn,
                        ErrorCode::ShardUnavailable,
                        "no edge serves this user right now (their edge is down, or being \
                         taken over); retry"
                            .into(),
                    );
                }
                if let Some(edge) = self.remote_home(user) {
                    return self.redirect(conn, user, edge);
                }
                let Some(c) = self.conn_mut(conn) else {
                    return;
                };
                c.login = Login::Registering { user };
                c.device = device;
                c.delivered_up_to = resume_after_seq;
                self.unauthenticated -= 1;
                let budget = self.config.send_budget_per_user;
                self.senders
                    .entry(user)
                    .or_insert_with(|| Sender {
                        connections: 0,
                        budget: SendBuckets::full(budget, now_ms),
                        recipients: FastHashSet::default(),
                        recipients_since_ms: now_ms,
                    })
                    .connections += 1;
                // `Welcome` waits for `Registered`: once the client sees it, live deliveries
                // and signals reach this connection.
                let home = self.home_of(user);
                // What the application consumed is acknowledged with the link; what the device
                // merely holds is not (the decoder checked acked_up_to <= resume_after_seq).
                self.route(
                    home,
                    ShardMessage::Register {
                        user,
                        device,
                        conn,
                        hello_at_ms: now_ms,
                        acked_up_to,
                    },
                );
            }
            Frame::Send {
                client_id,
                to,
                body,
                ttl_secs,
            } => {
                let admitted = if self.taking_sends {
                    self.admit_send(now_ms, conn, user, to, body.len())
                } else {
                    Err(ErrorCode::ShuttingDown)
                };
                if let Err(code) = admitted {
                    return self.write(
                        conn,
                        Frame::SendError {
                            client_id,
                            code,
                            retryable: code.is_retryable(),
                        },
                    );
                }
                let send = SendRequest {
                    sender: user,
                    client_id,
                    to,
                    body,
                    ttl_secs,
                };
                if let Some(edge) = self.remote_home(to) {
                    return self.forward_send(edge, send, conn);
                }
                let home = self.home_of(to);
                self.route(home, ShardMessage::Send { send, reply: conn });
            }
            Frame::Ack { up_to_seq } => {
                // A device cannot acknowledge what it was never given.
                let Some(c) = self.conn_mut(conn) else {
                    return;
                };
                let up_to_seq = up_to_seq.min(c.delivered_up_to.max(c.given_before_sync));
                let device = c.device;
                // What the device holds is not sent again: after a `Sync` moved the cursor
                // back, a resend of it would be dropped as held and never acknowledged again,
                // and would keep the window full for good.
                c.delivered_up_to = c.delivered_up_to.max(up_to_seq);
                c.unacked.acked(up_to_seq);
                c.acked_up_to = c.acked_up_to.max(up_to_seq);
                // A read owed and not running waits for room in the window (or the outbound
                // buffer, `set_outbound_bytes`): this ack may have made it.
                if c.sync_again && !c.sync_running && c.outbound_bytes == 0 {
                    self.start_sync(conn);
                }
                if up_to_seq > 0 {
                    self.route_ack(user, device, up_to_seq);
                }
            }
            Frame::Sync { after_seq } => {
                let Some(c) = self.conn_mut(conn) else {
                    return;
                };
                // Not past what it was given: later messages up to a `Sync` beyond it would
                // be skipped as given, and the device's ack would then let the store delete
                // them. (A client can still claim to hold more in its `Hello`: that is its
                // own device's loss.) Not before what it acknowledged: the store deletes
                // that, and the device, holding it, would never acknowledge a resend of it
                // again, so it would stay in the window and hold deliveries back.
                let after_seq = after_seq.max(c.acked_up_to).min(c.delivered_up_to);
                c.given_before_sync = c.given_before_sync.max(c.delivered_up_to);
                c.delivered_up_to = after_seq;
                c.unacked.resent_after(after_seq);
                if matches!(c.login, Login::Active { .. }) {
                    self.start_sync(conn);
                }
            }
            Frame::Signal {
                peer,
                kind,
                payload,
            } => {
                if let Some(edge) = self.remote_home(peer) {
                    // Ephemeral: without a link up, it is dropped like one over a full lane.
                    if self.out_links.get(&edge).is_some_and(|link| link.up) {
                        let frame = LinkFrame::Signal {
                            to: peer,
                            from: user,
                            kind,
                            payload,
                        };
                        self.effects.push_back(Effect::LinkWrite { edge, frame });
                    }
                    return;
                }
                let home = self.home_of(peer);
                self.route(
                    home,
                    ShardMessage::Signal {
                        to: peer,
                        from: user,
                        kind,
                        payload,
                    },
                );
            }
            Frame::Ping { nonce } => self.write(conn, Frame::Pong { nonce }),
            Frame::Pong { .. } => {}
            Frame::Welcome { .. }
            | Frame::SendAck { .. }
            | Frame::SendError { .. }
            | Frame::Deliver { .. }
            | Frame::Hole { .. }
            | Frame::Goaway { .. }
            | Frame::Error { .. } => self.close(
                conn,
                ErrorCode::UnexpectedFrame,
                "that frame only goes from server to client".into(),
            ),
        }
    }

    // ---- Messages between shards ------------------------------------------------------------

    fn handle_shard_message(&mut self, now_ms: UnixMillis, message: ShardMessage) {
        match message {
            ShardMessage::Send { send, reply } => {
                let Some(queue) = self.inbox_of(send.to) else {
                    // Its edge's users stopped being served here (a takeover ended) since
                    // the send was placed: the client retries where they are now.
                    return self.refuse_sends(vec![(send, reply)]);
                };
                if let Err(refused) = queue.handle_send(send, reply, now_ms) {
                    if refused.code == ErrorCode::StoreUnavailable {
                        self.stats.sends_store_slow += 1;
                    } else {
                        self.stats.sends_overloaded += 1;
                    }
                    self.route(
                        refused.tag.shard,
                        ShardMessage::SendResult {
                            reply: refused.tag,
                            client_id: refused.send.client_id,
                            body_bytes: refused.send.body.len(),
                            result: Err(refused.code),
                        },
                    );
                }
            }
            ShardMessage::Ack {
                inbox,
                device,
                up_to_seq,
            } => {
                // Dropped if no longer served here: the device acks again where it logs in.
                if let Some(queue) = self.inbox_of(inbox) {
                    queue.handle_ack(inbox, device, up_to_seq, now_ms);
                }
            }
            ShardMessage::SendResult {
                reply,
                client_id: _,
                body_bytes: _,
                result,
            } if reply.slot == LINK_PROXY_SLOT => {
                // A send another edge forwarded: answer on its link, if that is still open.
                let Some((link, request_id)) = self.link_proxies.remove(&reply.generation) else {
                    return;
                };
                let Some(in_link) = self.in_links.get_mut(&link) else {
                    return;
                };
                in_link.requests_in_flight = in_link.requests_in_flight.saturating_sub(1);
                let result = LinkSendResult::from_result(result);
                let frame = LinkFrame::SendResult { request_id, result };
                self.effects.push_back(Effect::LinkReply { link, frame });
            }
            ShardMessage::SendResult {
                reply,
                client_id,
                body_bytes,
                result,
            } => {
                let Some(c) = self.conn_mut(reply) else {
                    return;
                };
                c.sends_in_flight = c.sends_in_flight.saturating_sub(1);
                c.send_bytes_in_flight = c.send_bytes_in_flight.saturating_sub(body_bytes);
                if c.input_paused_for_answer {
                    c.input_paused_for_answer = false;
                    if c.input_paused_until_ms.is_none() {
                        self.effects.push_back(Effect::ResumeInput { conn: reply });
                    }
                }
                let frame = match result {
                    Ok((seq, server_time_ms)) => Frame::SendAck {
                        client_id,
                        seq,
                        server_time_ms,
                    },
                    Err(code) => Frame::SendError {
                        client_id,
                        code,
                        retryable: code.is_retryable(),
                    },
                };
                self.write(reply, frame);
            }
            ShardMessage::Register {
                user,
                device,
                conn,
                hello_at_ms,
                acked_up_to,
            } => {
                let incoming = Registration {
                    device,
                    conn,
                    hello_at_ms,
                };
                let entries = self.registry.get(&user).map_or(&[][..], |e| &e[..]);
                // One connection per device: the later `Hello` wins.
                let existing = entries.iter().position(|r| r.device == device);
                if let Some(at) = existing {
                    let existing = entries[at];
                    if (existing.hello_at_ms, existing.conn.generation)
                        > (incoming.hello_at_ms, incoming.conn.generation)
                    {
                        self.route(conn.shard, ShardMessage::Superseded { conn });
                        return;
                    }
                }
                // The device's older connection makes room for it (it is replaced).
                if entries.len() - usize::from(existing.is_some())
                    >= self.config.connections_per_user_max
                {
                    let code = ErrorCode::TooManyConnections;
                    return self.route(conn.shard, ShardMessage::RegisterRefused { conn, code });
                }
                // `Registered` follows once the link is committed (`Output::Linked`).
                let linked = match self.inbox_of(user) {
                    Some(queue) => queue.handle_link(user, device, acked_up_to, conn),
                    // No longer served here: the connection is being redirected.
                    None => Err(conn),
                };
                if let Err(conn) = linked {
                    // Not served here any more (a takeover ended, a drain): the connection's
                    // shard sends it on; otherwise the queue was full. The device's older
                    // connection, if any, stays: closing it for a login refused would only
                    // add a reconnect to a login storm.
                    let code = if self.remote_home(user).is_some() {
                        ErrorCode::ShardUnavailable
                    } else {
                        ErrorCode::Overloaded
                    };
                    return self.refuse_registration(user, conn, code);
                }
                let entries = self.registry.entry(user).or_default();
                let replaced = existing.map(|at| entries.remove(at).conn);
                entries.push(incoming);
                if let Some(old) = replaced {
                    self.route(old.shard, ShardMessage::Superseded { conn: old });
                }
            }
            ShardMessage::Superseded { conn } => {
                if self.is_leaving(conn) {
                    return; // Redirected or closed already: a second close would cut it short.
                }
                if let Some(c) = self.conn_mut(conn) {
                    // The home shard already dropped its registration.
                    let login = std::mem::replace(&mut c.login, Login::Closing);
                    self.forget_login(login);
                    self.effects.push_back(Effect::Close {
                        conn,
                        user: login.user(),
                        code: ErrorCode::Superseded,
                        reason: "replaced by a newer connection of the same device".into(),
                    });
                }
            }
            ShardMessage::Registered {
                conn,
                cursor,
                first_seq,
                stored_after_cursor,
            } => {
                let Some(c) = self.conn_mut(conn) else {
                    return;
                };
                if let Login::Registering { user } = c.login {
                    c.login = Login::Active { user };
                    c.acked_up_to = c.acked_up_to.max(cursor);
                    // While the connection lives, its device is marked seen now and then; the
                    // first time within the second half of the interval, spread by slot, so
                    // that the connections of a reconnect storm do not all write at once an
                    // interval later.
                    let refresh_ms = crate::commit::device_seen_refresh_ms(&self.config.core);
                    let spread_ms = (conn.slot as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                        % (refresh_ms / 2).max(1);
                    let seen_due = now_ms.saturating_add(refresh_ms / 2 + spread_ms);
                    self.deadlines.push(Reverse((
                        seen_due,
                        conn.slot,
                        conn.generation,
                        Deadline::Seen,
                    )));
                    let Some(c) = self.conn_mut(conn) else {
                        return;
                    };
                    // What the device consumed (maybe on an earlier install) is not sent again,
                    // nor is anything before `first_seq`: `Welcome` declares that gone.
                    c.delivered_up_to = c
                        .delivered_up_to
                        .max(cursor)
                        .max(first_seq.saturating_sub(1));
                    // A read is owed if the link saw messages after the cursor, or if a live
                    // delivery or a catch-up reached this connection before it was active
                    // (`deliver` and `catch_up` set `sync_again`). Otherwise every message
                    // stored from now on arrives live, in order, or reveals its gap.
                    let read_owed = stored_after_cursor || c.sync_again;
                    let device = c.device;
                    self.write(
                        conn,
                        Frame::Welcome {
                            user,
                            device,
                            server_time_ms: now_ms,
                            acked_up_to: cursor,
                            first_seq,
                        },
                    );
                    if read_owed {
                        self.start_sync(conn);
                    } else {
                        self.logins_without_read += 1;
                    }
                }
            }
            ShardMessage::RegisterRefused { conn, code } => {
                if self.is_leaving(conn) {
                    return; // Redirected or closed already: a second close would cut it short.
                }
                let user = self.user_of(conn);
                let served_by = user.and_then(|user| Some((user, self.remote_home(user)?)));
                if let (ErrorCode::ShardUnavailable, Some((user, edge))) = (code, served_by) {
                    return self.redirect(conn, user, edge);
                }
                if let Some(c) = self.conn_mut(conn) {
                    // The home shard did not register it: nothing to unregister.
                    let login = std::mem::replace(&mut c.login, Login::Closing);
                    self.forget_login(login);
                    let reason = match code {
                        ErrorCode::TooManyConnections => "too many connections for this user",
                        ErrorCode::ShardUnavailable => "not served here any more: reconnect",
                        _ => "too many logins at once: reconnect later",
                    };
                    self.effects.push_back(Effect::Close {
                        conn,
                        user: login.user(),
                        code,
                        reason: reason.into(),
                    });
                }
            }
            ShardMessage::Unregister { user, conn } => {
                if let Some(entries) = self.registry.get_mut(&user) {
                    entries.retain(|r| r.conn != conn);
                    if entries.is_empty() {
                        self.registry.remove(&user);
                    }
                }
            }
            ShardMessage::Deliver { conn, message } => self.deliver(conn, message),
            ShardMessage::Signal {
                to,
                from,
                kind,
                payload,
            } => {
                self.fan_out(to, payload, |conn, payload| ShardMessage::SignalDeliver {
                    conn,
                    from,
                    kind,
                    payload,
                });
            }
            ShardMessage::SignalDeliver {
                conn,
                from,
                kind,
                payload,
            } => {
                let outbound_max = self.config.outbound_bytes_per_connection_max;
                let Some(c) = self.conn(conn) else {
                    return;
                };
                if !matches!(c.login, Login::Active { .. }) {
                    return;
                }
                // Signals are ephemeral: a connection that does not read loses them instead
                // of growing the edge.
                if c.outbound_bytes + payload.len() + FRAME_OVERHEAD_BYTES_MAX > outbound_max {
                    self.stats.signals_dropped += 1;
                    return;
                }
                self.write(
                    conn,
                    Frame::Signal {
                        peer: from,
                        kind,
                        payload,
                    },
                );
            }
            ShardMessage::CatchUp { conn, seq } => {
                if self.conn_mut(conn).is_some_and(|c| c.delivered_up_to < seq) {
                    self.catch_up(conn);
                }
            }
            ShardMessage::Gone {
                conn, purged: true, ..
            } => self.close(
                conn,
                ErrorCode::Disconnected,
                "this user's stored data was erased: log in again".into(),
            ),
            ShardMessage::Gone {
                conn, up_to_seq, ..
            } => self.declare_gone(conn, up_to_seq),
        }
    }

    // ---- Delivery ---------------------------------------------------------------------------

    /// Pushes a live message, in sequence order, or falls back to reading the store.
    fn deliver(&mut self, conn: ConnRef, message: StoredMessage) {
        let outbound_max = self.config.outbound_bytes_per_connection_max;
        let unacked_max = self.config.deliveries_unacked_per_connection_max;
        let Some(c) = self.conn_mut(conn) else {
            return;
        };
        if matches!(c.login, Login::Registering { .. }) {
            // Not active yet: the read that `Registered` starts finds it in the store.
            c.sync_again = true;
            return;
        }
        if !matches!(c.login, Login::Active { .. }) || message.seq <= c.delivered_up_to {
            return;
        }
        // `Sync` lets a client set the cursor anywhere, up to u64::MAX: never overflow.
        let in_order = c.delivered_up_to.checked_add(1) == Some(message.seq);
        let window_full = c.unacked.messages >= unacked_max;
        let bytes_fit =
            c.outbound_bytes + message.body.len() + FRAME_OVERHEAD_BYTES_MAX <= outbound_max;
        if in_order && bytes_fit && !window_full && !c.sync_running {
            c.delivered_up_to = message.seq;
            c.unacked.delivered(message.seq);
            self.write_frame(conn, deliver_frame(message), true);
        } else {
            // Held for room only when nothing else held it (a gap, a running read).
            let held_for_room = in_order && !c.sync_running && !bytes_fit;
            // A gap, a full buffer or a full window: the store has it; catch up from there.
            self.deliveries_held_for_acks += u64::from(window_full);
            self.deliveries_held_for_room += u64::from(held_for_room);
            self.catch_up(conn);
        }
    }

    /// Marks the device of a connection that lives as seen, and asks to be called again after
    /// the same while. A device unseen for the retention period is forgotten by the next
    /// commit that writes its inbox's devices, and the inbox's messages are then deleted up to
    /// the other devices' cursors. Only acks and logins that wrote its record marked it seen,
    /// so a device that stayed connected and acknowledged nothing for that long (nothing came)
    /// was forgotten while it lived, and the next message was deleted once another device
    /// acked it, before this one had it. An ack of what the device already acknowledged moves
    /// no cursor and rewrites its record, seen now.
    fn refresh_seen(&mut self, now_ms: UnixMillis, conn: ConnRef, user: UserId) {
        let due = now_ms.saturating_add(crate::commit::device_seen_refresh_ms(&self.config.core));
        let Some(c) = self.conn(conn) else {
            return;
        };
        let (device, up_to_seq) = (c.device, c.acked_up_to);
        self.deadlines
            .push(Reverse((due, conn.slot, conn.generation, Deadline::Seen)));
        self.route_ack(user, device, up_to_seq);
    }

    /// Sends `device`'s ack of `user`'s inbox to the inbox's home shard.
    fn route_ack(&mut self, user: UserId, device: u32, up_to_seq: u64) {
        let home = self.home_of(user);
        self.route(
            home,
            ShardMessage::Ack {
                inbox: user,
                device,
                up_to_seq,
            },
        );
    }

    /// Every seq of the connection's inbox up to `up_to_seq` is gone: a connection behind it
    /// is told so (`Hole`) and moves past it. A read running now started before and reads
    /// again when it ends (its cursor moved). A connection still logging in is left alone:
    /// its home shard took its link after the forget (results come in commit order), so its
    /// cursor starts past the hole.
    fn declare_gone(&mut self, conn: ConnRef, up_to_seq: u64) {
        let Some(c) = self.conn_mut(conn) else {
            return;
        };
        if !matches!(c.login, Login::Active { .. }) || c.delivered_up_to >= up_to_seq {
            return;
        }
        c.delivered_up_to = up_to_seq;
        self.write(conn, Frame::Hole { up_to_seq });
    }

    /// The connection reads the store after its cursor: now if no read runs and its outbound
    /// buffer is empty, else once they are (`set_outbound_bytes`, `finish_read`).
    fn catch_up(&mut self, conn: ConnRef) {
        let Some(c) = self.conn_mut(conn) else {
            return;
        };
        c.sync_again = true;
        if !c.sync_running && c.outbound_bytes == 0 {
            self.start_sync(conn);
        }
    }

    /// Asks the driver to read the store for everything after the connection's cursor.
    fn start_sync(&mut self, conn: ConnRef) {
        let unacked_max = self.config.deliveries_unacked_per_connection_max;
        let Some(c) = self.conn_mut(conn) else {
            return;
        };
        let Login::Active { user } = c.login else {
            return;
        };
        if c.sync_running || c.unacked.messages >= unacked_max {
            // After the read, or after the device's next `Ack` (`Frame::Ack`).
            c.sync_again = true;
            return;
        }
        c.sync_running = true;
        c.sync_again = false;
        let after_seq = c.delivered_up_to;
        self.effects.push_back(Effect::Read {
            conn,
            inbox: user,
            after_seq,
        });
    }

    fn finish_read(
        &mut self,
        conn: ConnRef,
        after_seq: u64,
        result: Result<InboxPage, StoreError>,
    ) {
        let outbound_max = self.config.outbound_bytes_per_connection_max;
        let unacked_max = self.config.deliveries_unacked_per_connection_max;
        let Some(c) = self.conn_mut(conn) else {
            return;
        };
        c.sync_running = false;
        let page = match result {
            Ok(page) => Some(page),
            Err(_) => {
                // Read again (the driver delays failed reads, so this does not spin).
                c.sync_again = true;
                None
            }
        };
        if page.is_some() && c.delivered_up_to != after_seq {
            // The client moved its cursor (`Sync`) while the read ran: read again.
            c.sync_again = true;
        } else if let Some(page) = page {
            let mut stopped = false;
            let mut held_for_acks = false;
            let mut held_for_room = false;
            let mut frames = Vec::new();
            let mut outbound = c.outbound_bytes;
            for message in page.messages {
                let window_full = c.unacked.messages >= unacked_max;
                let bytes_fit =
                    outbound + message.body.len() + 2 * FRAME_OVERHEAD_BYTES_MAX <= outbound_max;
                if !bytes_fit || window_full {
                    held_for_acks = window_full;
                    held_for_room = !bytes_fit;
                    stopped = true;
                    break;
                }
                if message.seq > c.delivered_up_to + 1 {
                    frames.push(Frame::Hole {
                        up_to_seq: message.seq - 1,
                    });
                }
                c.delivered_up_to = message.seq;
                c.unacked.delivered(message.seq);
                outbound += message.body.len() + 2 * FRAME_OVERHEAD_BYTES_MAX;
                frames.push(deliver_frame(message));
            }
            if !stopped && page.covered_up_to > c.delivered_up_to {
                c.delivered_up_to = page.covered_up_to;
                frames.push(Frame::Hole {
                    up_to_seq: page.covered_up_to,
                });
            }
            if stopped || page.more {
                c.sync_again = true;
            }
            self.deliveries_held_for_acks += u64::from(held_for_acks);
            self.deliveries_held_for_room += u64::from(held_for_room);
            for frame in frames {
                self.write(conn, frame);
            }
        }
        if let Some(c) = self.conn(conn)
            && c.sync_again
            && c.outbound_bytes == 0
        {
            self.start_sync(conn);
        }
    }

    // ---- Helpers ----------------------------------------------------------------------------

    fn home_of(&self, user: UserId) -> u8 {
        home_shard(user, self.config.shard_count) as u8
    }

    /// The edge serving `user`, if that is not this one: its home edge, or the edge that took
    /// its home over (`set_servers`). `None` for this edge's users and its guests'.
    fn remote_home(&self, user: UserId) -> Option<EdgeId> {
        let cluster = self.config.cluster.as_ref()?;
        if self.edge_ids.is_empty() {
            return None;
        }
        let home = home_edge(user, &self.edge_ids);
        if home == cluster.edge {
            return self.drained_to;
        }
        if self.guests.contains_key(&home) {
            return None;
        }
        let server = self.servers.get(&home).copied().flatten();
        Some(
            server
                .filter(|server| *server != cluster.edge)
                .unwrap_or(home),
        )
    }

    /// Whether no edge is known to serve `user`'s home right now: the home was judged dead
    /// and no live edge holds its lease yet, or the view still names this edge, which just
    /// stopped serving them (a guest commit fenced: someone claimed them, the view does not
    /// say who yet). A client is then closed retryably (`ShardUnavailable`) rather than sent
    /// to the home: a dead edge answers nothing, and the client would wait out its whole
    /// welcome timeout (10 s) before coming back.
    fn home_unserved(&self, user: UserId) -> bool {
        let Some(cluster) = self.config.cluster.as_ref() else {
            return false;
        };
        // Not this edge's own user, nor a guest's: another edge's.
        if self.remote_home(user).is_none() {
            return false;
        }
        match self.servers.get(&home_edge(user, &self.edge_ids)) {
            Some(None) => true,
            Some(Some(server)) => *server == cluster.edge,
            None => false,
        }
    }

    /// The commit queue of `user`'s inbox on this shard: this edge's own, or its guest
    /// edge's; `None` if this edge does not serve the user.
    fn inbox_of(&mut self, user: UserId) -> Option<&mut InboxShard<ConnRef>> {
        let Some(cluster) = self.config.cluster.as_ref() else {
            return Some(&mut self.inbox);
        };
        if self.edge_ids.is_empty() {
            return Some(&mut self.inbox);
        }
        let home = home_edge(user, &self.edge_ids);
        if home == cluster.edge {
            self.drained_to.is_none().then_some(&mut self.inbox)
        } else {
            self.guests.get_mut(&home)
        }
    }

    /// Tells the client of `conn` to reconnect to `edge`, where `user` lives.
    fn redirect(&mut self, conn: ConnRef, user: UserId, edge: EdgeId) {
        let reconnect_to = self
            .config
            .cluster
            .iter()
            .flat_map(|cluster| cluster.members.iter())
            .find(|member| member.id == edge)
            .map(|member| member.client_address.clone())
            .unwrap_or_default();
        if self.conn(conn).is_none() {
            return;
        }
        // A logged-in connection (a takeover ending) also leaves its home shard's registry.
        self.end_login(conn);
        self.effects.push_back(Effect::Redirect {
            conn,
            user,
            reconnect_to,
        });
    }

    /// Forwards a send from `reply`, a connection of this shard, to the edge `to` lives on.
    fn forward_send(&mut self, edge: EdgeId, send: SendRequest, reply: ConnRef) {
        let body_bytes = send.body.len();
        let pending_max = self.config.link_requests_in_flight_max;
        let pending_bytes_max = self.config.link_send_bytes_in_flight_max;
        let refusal = match self.out_links.get(&edge) {
            Some(link) if !link.up => Some(ErrorCode::ShardUnavailable),
            // As many as the far edge takes from one link: more would only wait there.
            Some(link) if link.pending.len() >= pending_max => Some(ErrorCode::Overloaded),
            Some(link)
                if !link.pending.is_empty()
                    && link.pending_bytes + body_bytes > pending_bytes_max =>
            {
                Some(ErrorCode::Overloaded)
            }
            Some(_) => None,
            None => Some(ErrorCode::ShardUnavailable),
        };
        let (Some(link), None) = (self.out_links.get_mut(&edge), refusal) else {
            return self.local.push_back(ShardMessage::SendResult {
                reply,
                client_id: send.client_id,
                body_bytes,
                result: Err(refusal.unwrap_or(ErrorCode::ShardUnavailable)),
            });
        };
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        link.pending_bytes += body_bytes;
        link.pending.insert(
            request_id,
            PendingSend {
                reply,
                client_id: send.client_id,
                body_bytes,
            },
        );
        let frame = LinkFrame::Send {
            request_id,
            sender: send.sender,
            client_id: send.client_id,
            to: send.to,
            body: send.body,
            ttl_secs: send.ttl_secs,
        };
        self.effects.push_back(Effect::LinkWrite { edge, frame });
    }

    fn conn(&self, conn: ConnRef) -> Option<&Connection> {
        self.conns
            .get(&conn.slot)
            .filter(|c| c.generation == conn.generation && conn.shard == self.config.shard)
    }

    fn conn_mut(&mut self, conn: ConnRef) -> Option<&mut Connection> {
        let shard = self.config.shard;
        self.conns
            .get_mut(&conn.slot)
            .filter(|c| c.generation == conn.generation && conn.shard == shard)
    }

    /// Routes to `shard`, or queues locally when that is this shard.
    /// Routes `make(conn, item)` to every connection registered for `user`. The last takes
    /// `item` itself and the others a clone (most users have one connection), and the
    /// registry is read in place, not copied.
    fn fan_out<T: Clone>(
        &mut self,
        user: UserId,
        item: T,
        make: impl Fn(ConnRef, T) -> ShardMessage,
    ) {
        let Some((last, others)) = self
            .registry
            .get(&user)
            .and_then(|targets| targets.split_last())
        else {
            return;
        };
        let (own, local, effects) = (self.config.shard, &mut self.local, &mut self.effects);
        for &Registration { conn, .. } in others {
            route_to(own, local, effects, conn.shard, make(conn, item.clone()));
        }
        route_to(own, local, effects, last.conn.shard, make(last.conn, item));
    }

    fn route(&mut self, shard: u8, message: ShardMessage) {
        route_to(
            self.config.shard,
            &mut self.local,
            &mut self.effects,
            shard,
            message,
        );
    }

    fn drain_local(&mut self) {
        // Every local message comes from a bounded input and produces a bounded number of
        // others (a signal fans out to at most `connections_per_user_max`), so this ends.
        while let Some(message) = self.local.pop_front() {
            self.handle_shard_message(self.now_ms, message);
        }
    }

    fn write(&mut self, conn: ConnRef, frame: Frame) {
        self.write_frame(conn, frame, false);
    }

    fn write_frame(&mut self, conn: ConnRef, frame: Frame, live: bool) {
        if let Some(c) = self.conn_mut(conn) {
            c.outbound_bytes += frame_bytes_estimate(&frame);
            self.effects.push_back(Effect::Write { conn, frame, live });
        }
    }

    /// Ends the login (unregisters it at its home shard) and asks the driver to close.
    fn close(&mut self, conn: ConnRef, code: ErrorCode, reason: String) {
        if self.conn(conn).is_none() || self.is_leaving(conn) {
            // Redirected or closed already: a second close would cut it short (the `Goaway`
            // with the address to reconnect to, not yet sent, would be discarded).
            return;
        }
        let user = self.user_of(conn);
        self.end_login(conn);
        self.effects.push_back(Effect::Close {
            conn,
            user,
            code,
            reason,
        });
    }

    /// Whether `conn` was redirected or closed already (its driver is finishing it).
    fn is_leaving(&self, conn: ConnRef) -> bool {
        self.conn(conn).is_some_and(|c| c.login == Login::Closing)
    }

    /// Takes `conn`, whose link was not queued or was taken back, out of `user`'s registry
    /// and tells its shard, which closes it with `code`.
    fn refuse_registration(&mut self, user: UserId, conn: ConnRef, code: ErrorCode) {
        if let Some(entries) = self.registry.get_mut(&user) {
            entries.retain(|r| r.conn != conn);
            if entries.is_empty() {
                self.registry.remove(&user);
            }
        }
        self.route(conn.shard, ShardMessage::RegisterRefused { conn, code });
    }

    fn end_login(&mut self, conn: ConnRef) {
        let Some(c) = self.conn_mut(conn) else {
            return;
        };
        let login = std::mem::replace(&mut c.login, Login::Closing);
        self.forget_login(login);
        if let Some(user) = login.user() {
            let home = self.home_of(user);
            self.route(home, ShardMessage::Unregister { user, conn });
        }
    }

    /// Updates the counts a connection's login was part of, once it leaves `login`.
    fn forget_login(&mut self, login: Login) {
        match login {
            Login::AwaitingHello => self.unauthenticated -= 1,
            Login::Registering { user } | Login::Active { user } => {
                if let Some(sender) = self.senders.get_mut(&user) {
                    sender.connections -= 1;
                    if sender.connections == 0 {
                        self.senders.remove(&user);
                    }
                }
            }
            Login::Closing => {}
        }
    }

    /// Takes one frame from the connection's signal or control frame budget; when there is
    /// none, pauses the connection's input until there is one again and returns false.
    fn spend_frame_budget(&mut self, now_ms: UnixMillis, conn: ConnRef, signal: bool) -> bool {
        let (rate, Some(c)) = (
            if signal {
                self.config.signal_rate_per_connection
            } else {
                self.config.control_frame_rate_per_connection
            },
            self.conns
                .get_mut(&conn.slot)
                .filter(|c| c.generation == conn.generation),
        ) else {
            return true;
        };
        let bucket = if signal {
            &mut c.signal_budget
        } else {
            &mut c.control_frame_budget
        };
        if bucket.has(rate, 1, now_ms) {
            bucket.take(rate, 1);
            return true;
        }
        let wait_ms = bucket.wait_ms(rate, 1, now_ms);
        pause_input(&mut self.deadlines, c, conn, now_ms, wait_ms);
        false
    }

    /// Checks a send of `bytes` from `user` on `conn` to `to` against the connection's
    /// in-flight limits, the send budgets and the recipient limit, and counts it in.
    fn admit_send(
        &mut self,
        now_ms: UnixMillis,
        conn: ConnRef,
        user: UserId,
        to: UserId,
        bytes: usize,
    ) -> Result<(), ErrorCode> {
        if self.shedding {
            self.stats.sends_shed += 1;
            return Err(ErrorCode::Overloaded);
        }
        let config = &self.config;
        let Some(c) = self
            .conns
            .get_mut(&conn.slot)
            .filter(|c| c.generation == conn.generation)
        else {
            return Err(ErrorCode::Internal);
        };
        // A send always fits when none is in flight (the limit is at least one frame).
        if c.sends_in_flight >= config.sends_in_flight_per_connection_max
            || (c.sends_in_flight > 0
                && c.send_bytes_in_flight + bytes > config.send_bytes_in_flight_per_connection_max)
        {
            // Read nothing more until an answer frees room: a pipelining client is held back
            // by flow control instead of having every further send refused.
            c.input_paused_for_answer = true;
            return Err(ErrorCode::TooManyInFlight);
        }
        let Some(sender) = self.senders.get_mut(&user) else {
            return Err(ErrorCode::Internal);
        };
        let connection_budget = config.send_budget_per_connection;
        let user_budget = config.send_budget_per_user;
        if !c.budget.allows(connection_budget, bytes, now_ms)
            || !sender.budget.allows(user_budget, bytes, now_ms)
        {
            self.stats.sends_over_budget += 1;
            // Refuse this one, and read nothing more from the connection until the budget
            // holds a send like it again: flow control slows the client from here.
            let wait_ms = c
                .budget
                .wait_ms(connection_budget, bytes, now_ms)
                .max(sender.budget.wait_ms(user_budget, bytes, now_ms));
            pause_input(&mut self.deadlines, c, conn, now_ms, wait_ms);
            return Err(ErrorCode::Overloaded);
        }
        let recipients_max = config.recipients_per_user_per_window_max;
        if recipients_max > 0 {
            if now_ms.saturating_sub(sender.recipients_since_ms) >= config.recipients_window_ms {
                sender.recipients.clear();
                sender.recipients_since_ms = now_ms;
            }
            if !sender.recipients.contains(&to) {
                if sender.recipients.len() >= recipients_max {
                    self.stats.sends_over_recipient_limit += 1;
                    // Slowed like a send over budget, until the window turns.
                    let window_left_ms = (sender.recipients_since_ms + config.recipients_window_ms)
                        .saturating_sub(now_ms);
                    pause_input(&mut self.deadlines, c, conn, now_ms, window_left_ms);
                    return Err(ErrorCode::Overloaded);
                }
                sender.recipients.insert(to);
            }
        }
        c.budget.spend(connection_budget, bytes);
        sender.budget.spend(user_budget, bytes);
        c.sends_in_flight += 1;
        c.send_bytes_in_flight += bytes;
        Ok(())
    }
}

/// Queues `message` for `shard`: handled here (`local`) when that is this shard (`own`), else
/// an [`Effect::Route`] for the driver. Takes the queues, not the session, so a caller can
/// route while it reads the registry.
fn route_to(
    own: u8,
    local: &mut VecDeque<ShardMessage>,
    effects: &mut VecDeque<Effect>,
    shard: u8,
    message: ShardMessage,
) {
    if shard == own {
        local.push_back(message);
    } else {
        effects.push_back(Effect::Route { shard, message });
    }
}

/// Pauses the connection's input for `wait_ms` (between 1 ms and `INPUT_PAUSE_MS_MAX`), unless
/// it is paused already: the session's deadline resumes it.
fn pause_input(
    deadlines: &mut BinaryHeap<Reverse<(UnixMillis, usize, u64, Deadline)>>,
    c: &mut Connection,
    conn: ConnRef,
    now_ms: UnixMillis,
    wait_ms: u64,
) {
    if c.input_paused_until_ms.is_some() {
        return;
    }
    let until = now_ms.saturating_add(wait_ms.clamp(1, INPUT_PAUSE_MS_MAX));
    c.input_paused_until_ms = Some(until);
    deadlines.push(Reverse((
        until,
        conn.slot,
        conn.generation,
        Deadline::Resume,
    )));
}

fn deliver_frame(message: StoredMessage) -> Frame {
    Frame::Deliver {
        seq: message.seq,
        from: message.from,
        sent_at_ms: message.sent_at_ms,
        body: message.body,
    }
}

/// Bytes a frame takes on the wire, at most (body or payload plus fields).
fn frame_bytes_estimate(frame: &Frame) -> usize {
    FRAME_OVERHEAD_BYTES_MAX
        + match frame {
            Frame::Deliver { body, .. } => body.len(),
            Frame::Signal { payload, .. } => payload.len(),
            Frame::Error { message, .. } => message.len(),
            _ => 0,
        }
}
