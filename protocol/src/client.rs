//! The client side of the protocol, sans-IO: what a conforming client does with the frames.
//!
//! [`ClientSession`] is one device's protocol state across connections: sends waiting for their
//! `SendAck` (retried under the same id), the delivery cursor (what the device holds) apart
//! from the ack cursor (what the application consumed), hole handling, coalesced acks and the
//! reconnect backoff. It performs no I/O and reads no clock: time is an argument in
//! milliseconds of any monotonic clock, and randomness (backoff jitter) is an argument too. The
//! SDK (`courier-client`) drives it over quinn; the deterministic simulation
//! (`core/tests/simulation.rs`) drives the very same type over a simulated network.
//!
//! Methods, in the order a driver uses them:
//! - connection: [`ClientSession::connected`] when a stream is open (queues `Hello` and every
//!   unanswered send), [`ClientSession::disconnected`] when it is gone;
//! - input: [`ClientSession::handle_frame`] for each frame from the server,
//!   [`ClientSession::handle_timeout`] once [`ClientSession::poll_timeout`] has passed;
//! - application: [`ClientSession::send`], [`ClientSession::consumed`] (or
//!   [`ClientSession::ack`]), [`ClientSession::signal`], [`ClientSession::close`];
//! - output, after any of the above: [`ClientSession::set_wall_clock`], then
//!   [`ClientSession::poll_transmit`] until `None` (frames to write, in order), then
//!   [`ClientSession::poll_event`] until `None` (for the application).
//!
//! The cursors: `received_up_to` is the highest seq handed to the application (or declared a
//! hole); `acked_up_to` is the highest the application consumed. `Hello` carries both, so a
//! reconnect neither re-delivers what the device still buffers nor deletes what the
//! application never saw.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::{BODY_BYTES_MAX, ErrorCode, Frame, SIGNAL_PAYLOAD_BYTES_MAX, SignalKind, TTL_SECS_MAX};

/// Milliseconds of the driver's monotonic clock.
pub type Millis = u64;

/// Settings of a [`ClientSession`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// The signed token for `Hello`.
    pub token: Vec<u8>,
    /// The device number the token was minted for.
    pub device: u32,
    /// Sends written and not yet answered. Keep it at most the server's
    /// `sends_in_flight_per_connection_max` (256 by default), so queued sends wait here instead
    /// of being refused with `TooManyInFlight`.
    pub sends_in_flight_max: usize,
    /// Sends the application may have queued or in flight; beyond it `send` is refused.
    pub sends_pending_max: usize,
    /// Bytes of bodies the application may have queued or in flight; beyond it `send` is
    /// refused. With bodies of up to 64 KiB, `sends_pending_max` alone would let 100,000
    /// pending sends hold 6.5 GB.
    pub sends_pending_bytes_max: usize,
    /// Wait before resending a send the server refused with a retryable code (`Overloaded`,
    /// `StoreUnavailable`, ...); each further refusal of the same send doubles it, up to
    /// `retry_after_max_ms`. A retry comes due at a point spread over the second half of its
    /// wait, so a window of sends refused together does not come back together.
    /// Both at least `WAIT_MIN_MS`.
    pub retry_after_ms: u64,
    pub retry_after_max_ms: u64,
    /// Acks are gathered this long and the highest sent (acks are cumulative). The default,
    /// 25 ms, is the QUIC acknowledgement delay the edge asks its clients for
    /// (`quic.client_ack_delay_ms`): the app's `Ack` and the transport's ACK of the same
    /// deliveries leave in one datagram, and a receiver of several messages within it sends
    /// one `Ack` for all of them (at 100 messages/s per receiver, 3.3 datagrams per message
    /// instead of 4.0). Only deletion waits for it; a message acked late is at worst delivered
    /// again after a reconnect, and dropped by its seq.
    pub ack_delay_ms: u64,
    /// Signals waiting to be written; the oldest is dropped beyond it (signals are ephemeral).
    pub signals_queued_max: usize,
    /// First reconnect delay; doubles per failed attempt, with jitter, up to the maximum.
    /// Both at least `WAIT_MIN_MS`.
    pub reconnect_backoff_min_ms: u64,
    pub reconnect_backoff_max_ms: u64,
    /// A link that stayed up this long after its `Welcome` starts the backoff over when it
    /// ends. A shorter one keeps it growing: two instances of one device that supersede each
    /// other, or edges that redirect a client back and forth, reconnect at the backoff's
    /// maximum instead of as fast as a handshake allows.
    pub link_healthy_after_ms: u64,
    /// A send written and not answered this long after its first write (on the wall clock,
    /// which counts a device's sleep) is not written again at the next connection: it ends
    /// with `ErrorCode::TimedOut`, stored or not, no one can say. The server recognizes a
    /// retry only within its dedupe window (`retention.dedupe_window_secs`: 24 h by default,
    /// at least 10 minutes); past it a retry is stored again, a second copy of the message.
    /// Keep it below that window, by more than the client's and server's clocks may differ.
    pub send_retry_window_ms: u64,
}

impl ClientConfig {
    pub fn new(token: Vec<u8>, device: u32) -> ClientConfig {
        ClientConfig {
            token,
            device,
            sends_in_flight_max: 256,
            sends_pending_max: 100_000,
            sends_pending_bytes_max: 64 * 1024 * 1024,
            retry_after_ms: 200,
            retry_after_max_ms: 5_000,
            ack_delay_ms: 25,
            signals_queued_max: 1024,
            reconnect_backoff_min_ms: 50,
            reconnect_backoff_max_ms: 2_000,
            link_healthy_after_ms: 10_000,
            send_retry_window_ms: 23 * 3_600_000,
        }
    }
}

/// A stored message for this device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub seq: u64,
    pub from: u64,
    pub sent_at_ms: u64,
    pub body: Vec<u8>,
}

/// The server's confirmation that a message is durably stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendReceipt {
    pub client_id: u64,
    /// Position in the recipient's inbox.
    pub seq: u64,
    pub server_time_ms: u64,
}

/// What the session has for the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The server accepted `Hello`; live deliveries flow from now on. `acked_up_to` is the
    /// device's durable cursor (a device new to an inbox that has others starts at its head);
    /// if it is past what this session held, a `Hole` up to it follows.
    Welcome {
        user: u64,
        device: u32,
        acked_up_to: u64,
    },
    /// The next message, in sequence order, never twice.
    Message(Delivery),
    /// Messages after `after_seq` up to `up_to_seq` are gone (acknowledged by another device,
    /// expired, or past retention) and will not be delivered.
    Hole { after_seq: u64, up_to_seq: u64 },
    Signal {
        from: u64,
        kind: SignalKind,
        payload: Vec<u8>,
    },
    /// A send's final answer: stored, or refused for good, or `TimedOut`: written and not
    /// answered within `send_retry_window_ms` (stored or not, no one can say; it is not
    /// written again, since past the server's dedupe window a retry is stored again).
    SendDone {
        client_id: u64,
        result: Result<SendReceipt, ErrorCode>,
    },
}

/// Why a send was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendRefused {
    #[error("client message id 0 is reserved")]
    ReservedId,
    #[error("user id 0 is not a recipient")]
    NoRecipient,
    #[error("a time to live of {0} s exceeds the protocol's maximum of {max} s", max = TTL_SECS_MAX)]
    TtlTooLong(u32),
    #[error("body of {0} bytes exceeds the protocol's maximum")]
    BodyTooLarge(usize),
    #[error("too many sends pending: wait for receipts")]
    QueueFull,
    #[error("the session is closed")]
    Closed,
}

/// Why the server ended the connection, from a frame it sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("server closed the session: {code:?}: {reason}")]
    Closed { code: ErrorCode, reason: String },
    #[error("server is going away: {reason}")]
    Goaway {
        reason: String,
        reconnect_to: Option<String>,
    },
    #[error("protocol error: unexpected {0} from the server")]
    Unexpected(&'static str),
}

impl SessionError {
    /// Whether reconnecting cannot help (a bad token, a protocol violation).
    pub fn is_fatal(&self) -> bool {
        match self {
            SessionError::Closed { code, .. } => is_fatal_code(*code),
            SessionError::Goaway { .. } => false,
            SessionError::Unexpected(_) => true,
        }
    }
}

/// Codes after which reconnecting cannot help (or, for `Disconnected`, must not happen
/// without the application deciding to log in again).
pub fn is_fatal_code(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Disconnected
            | ErrorCode::Unauthenticated
            | ErrorCode::TokenExpired
            | ErrorCode::Malformed
            | ErrorCode::FrameTooLarge
            | ErrorCode::LimitExceeded
            | ErrorCode::UnexpectedFrame
    )
}

/// The least a retry or reconnect waits, whatever the configuration says: with no wait a
/// client whose edge is down or overloaded would retry as fast as its CPU goes (a zero backoff
/// made every reconnect delay 0 ms).
pub const WAIT_MIN_MS: u64 = 10;

/// How long a send refused `refusals` times before waits for its next attempt: doubling from
/// `retry_after_ms` up to `retry_after_max_ms`, at a point in the second half of that wait
/// chosen by the send's id and attempt (no randomness needed: the ids of a refused window
/// differ, so their retries spread).
fn retry_wait_ms(config: &ClientConfig, client_id: u64, refusals: u32) -> Millis {
    let first = config.retry_after_ms.max(WAIT_MIN_MS);
    let wait = first
        .saturating_mul(1u64 << refusals.min(32))
        .min(config.retry_after_max_ms.max(first));
    // splitmix64's finaliser: neighbouring ids land far apart.
    let mut spread = client_id ^ u64::from(refusals).rotate_left(32);
    spread = (spread ^ (spread >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    spread = (spread ^ (spread >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    spread ^= spread >> 31;
    wait - wait / 2 + spread % (wait / 2 + 1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Down,
    AwaitingWelcome,
    Active,
}

#[derive(Debug)]
struct PendingSend {
    /// Submission order: sends go out in the order the application made them.
    order: u64,
    to: u64,
    body: Vec<u8>,
    ttl_secs: Option<u32>,
    in_flight: bool,
    /// Retryable refusals of this send so far: its next retry waits longer.
    refusals: u32,
    /// When it was first written, on the wall clock (`send_retry_window_ms`).
    first_written_wall_ms: Option<u64>,
}

/// One device's protocol state. See the module documentation for the calling order.
#[derive(Debug)]
pub struct ClientSession {
    config: ClientConfig,
    link: Link,
    user: Option<u64>,
    received_up_to: u64,
    acked_up_to: u64,
    /// Highest ack the server was told on the current connection (`Hello` or `Ack`).
    ack_sent_up_to: u64,
    /// The ack the current connection's `Hello` carried.
    ack_in_hello: u64,
    /// Highest ack the server is known to hold: the last `Welcome`'s (which answered a
    /// `Hello` carrying `ack_in_hello`). Acks beyond it were written to a connection that may
    /// have broken before they arrived, or never written.
    ack_confirmed_up_to: u64,
    ack_due_at: Option<Millis>,
    /// The `received_up_to` a `Sync` was sent for; another gap at the same cursor waits for
    /// its answer instead of asking again.
    sync_sent_for: Option<u64>,
    pending: HashMap<u64, PendingSend>,
    /// Bytes of the bodies in `pending` (`sends_pending_bytes_max`).
    pending_bytes: usize,
    /// Sends waiting to be written: order → client id.
    queue: BTreeMap<u64, u64>,
    /// Refused sends waiting for their retry: (due, order) → client id.
    retries: BTreeMap<(Millis, u64), u64>,
    next_order: u64,
    in_flight: usize,
    /// Control frames to write before any send.
    control: VecDeque<Frame>,
    signals: VecDeque<Frame>,
    events: VecDeque<ClientEvent>,
    closed: bool,
    reconnect_attempts: u32,
    /// When the current link was welcomed (`link_healthy_after_ms`).
    welcomed_at_ms: Option<Millis>,
    /// The wall clock as the driver last said (`set_wall_clock`): what a send's
    /// first write is timed by (`first_written_wall_ms`).
    wall_ms: u64,
}

impl ClientSession {
    /// A session for a device that consumed everything up to `acked_up_to` (0 for a fresh
    /// install). Delivery starts after it.
    pub fn new(config: ClientConfig, acked_up_to: u64) -> ClientSession {
        ClientSession {
            config,
            link: Link::Down,
            user: None,
            received_up_to: acked_up_to,
            acked_up_to,
            ack_sent_up_to: 0,
            ack_in_hello: 0,
            ack_confirmed_up_to: 0,
            ack_due_at: None,
            sync_sent_for: None,
            pending: HashMap::new(),
            pending_bytes: 0,
            queue: BTreeMap::new(),
            retries: BTreeMap::new(),
            next_order: 0,
            in_flight: 0,
            control: VecDeque::new(),
            signals: VecDeque::new(),
            events: VecDeque::new(),
            closed: false,
            reconnect_attempts: 0,
            welcomed_at_ms: None,
            wall_ms: 0,
        }
    }

    // ---- Getters ----------------------------------------------------------------------------

    /// The user, once a server welcomed this device.
    pub fn user(&self) -> Option<u64> {
        self.user
    }

    /// Whether the current connection was welcomed.
    pub fn is_active(&self) -> bool {
        self.link == Link::Active
    }

    /// Highest seq handed to the application or declared a hole.
    pub fn received_up_to(&self) -> u64 {
        self.received_up_to
    }

    /// Highest seq the application consumed or acknowledged.
    pub fn acked_up_to(&self) -> u64 {
        self.acked_up_to
    }

    /// Sends not yet answered (queued, in flight or waiting for a retry).
    pub fn pending_sends(&self) -> usize {
        self.pending.len()
    }

    /// Whether every ack the application made reached a connection.
    pub fn ack_flushed(&self) -> bool {
        self.acked_up_to <= self.ack_sent_up_to
    }

    /// Whether the application acked more than the server is known to hold (the last
    /// `Welcome` confirmed its `Hello`'s ack): acks written since may have been lost with
    /// their connection. A client closed without a connection then makes one to carry them.
    pub fn acks_unconfirmed(&self) -> bool {
        self.acked_up_to > self.ack_confirmed_up_to
    }

    /// Whether [`ClientSession::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    // ---- Connection ---------------------------------------------------------------------------

    /// A new connection's stream is open: queues `Hello` and every unanswered send (in the
    /// order they were made) as the first flight.
    pub fn connected(&mut self, _now: Millis) {
        self.link = Link::AwaitingWelcome;
        self.control.clear();
        self.signals.clear();
        self.sync_sent_for = None;
        self.in_flight = 0;
        self.retries.clear();
        self.queue.clear();
        for (client_id, pending) in &mut self.pending {
            pending.in_flight = false;
            self.queue.insert(pending.order, *client_id);
        }
        self.control.push_back(Frame::Hello {
            token: self.config.token.clone(),
            device: self.config.device,
            acked_up_to: self.acked_up_to,
            resume_after_seq: self.received_up_to,
        });
        self.ack_sent_up_to = self.acked_up_to;
        self.ack_in_hello = self.acked_up_to;
        self.ack_due_at = None;
    }

    /// The connection is gone. Unanswered sends go out again on the next connection, under
    /// the same ids; signals and control frames for this connection are dropped.
    pub fn disconnected(&mut self, now: Millis) {
        let welcomed_at_ms = self.welcomed_at_ms.take();
        if welcomed_at_ms
            .is_some_and(|at| now.saturating_sub(at) >= self.config.link_healthy_after_ms)
        {
            self.reconnect_attempts = 0;
        }
        self.link_gone();
    }

    /// The connection is gone, and however long it lived it was not healthy: the server
    /// closed it because a frame of this client did not arrive in time (`TimedOut`). The
    /// reconnect backoff goes on growing: a link too slow for a large send would otherwise
    /// reconnect at the shortest wait, send it again and time out again, for as long as it
    /// stays slow. Otherwise as [`ClientSession::disconnected`].
    pub fn disconnected_unhealthy(&mut self, _now: Millis) {
        self.welcomed_at_ms = None;
        self.link_gone();
    }

    fn link_gone(&mut self) {
        self.link = Link::Down;
        self.control.clear();
        self.signals.clear();
        self.in_flight = 0;
        for pending in self.pending.values_mut() {
            pending.in_flight = false;
        }
    }

    /// How long to wait before the next connection attempt: exponential from the minimum,
    /// capped at the maximum, with jitter (half to all of it) from `random`. Reset when a
    /// link that stayed up `link_healthy_after_ms` after its `Welcome` ends.
    pub fn reconnect_delay_ms(&mut self, random: u64) -> u64 {
        let min = self.config.reconnect_backoff_min_ms.max(WAIT_MIN_MS);
        let max = self.config.reconnect_backoff_max_ms.max(min);
        let base = min
            .saturating_mul(1u64 << self.reconnect_attempts.min(32))
            .min(max);
        self.reconnect_attempts = self.reconnect_attempts.saturating_add(1);
        base / 2 + random % (base / 2 + 1)
    }

    // ---- Input --------------------------------------------------------------------------------

    /// Handles one frame from the server. An error means the connection is over (the server
    /// closes it, or it broke the protocol); whether to reconnect: [`SessionError::is_fatal`].
    pub fn handle_frame(&mut self, now: Millis, frame: Frame) -> Result<(), SessionError> {
        match frame {
            Frame::Welcome {
                user,
                device,
                acked_up_to,
                first_seq,
                ..
            } => {
                self.link = Link::Active;
                self.user = Some(user);
                self.welcomed_at_ms = Some(now);
                self.events.push_back(ClientEvent::Welcome {
                    user,
                    device,
                    acked_up_to,
                });
                // The device consumed up to there (maybe on an earlier install): those are not
                // delivered again.
                if acked_up_to > self.received_up_to {
                    self.events.push_back(ClientEvent::Hole {
                        after_seq: self.received_up_to,
                        up_to_seq: acked_up_to,
                    });
                    self.received_up_to = acked_up_to;
                    self.sync_sent_for = None;
                }
                self.acked_up_to = self.acked_up_to.max(acked_up_to);
                self.ack_sent_up_to = self.ack_sent_up_to.max(acked_up_to);
                self.ack_confirmed_up_to = self
                    .ack_confirmed_up_to
                    .max(acked_up_to)
                    .max(self.ack_in_hello);
                // Nothing is stored between the cursor and `first_seq`: a declared hole.
                let gone_up_to = first_seq.saturating_sub(1);
                if gone_up_to > self.received_up_to {
                    self.events.push_back(ClientEvent::Hole {
                        after_seq: self.received_up_to,
                        up_to_seq: gone_up_to,
                    });
                    self.received_up_to = gone_up_to;
                    self.sync_sent_for = None;
                }
            }
            Frame::SendAck {
                client_id,
                seq,
                server_time_ms,
            } => self.finish_send(
                client_id,
                Ok(SendReceipt {
                    client_id,
                    seq,
                    server_time_ms,
                }),
            ),
            Frame::SendError {
                client_id,
                code,
                retryable,
            } => {
                if retryable {
                    if let Some(pending) = self.pending.get_mut(&client_id)
                        && pending.in_flight
                    {
                        pending.in_flight = false;
                        self.in_flight -= 1;
                        let wait_ms = retry_wait_ms(&self.config, client_id, pending.refusals);
                        pending.refusals = pending.refusals.saturating_add(1);
                        let due = now.saturating_add(wait_ms);
                        self.retries.insert((due, pending.order), client_id);
                    }
                } else {
                    self.finish_send(client_id, Err(code));
                }
            }
            // Deliveries, holes and signals come after `Welcome`: the edge sends none before
            // it. One that does is ignored, so a server cannot make the client buffer without
            // bound while it waits for `Welcome` (a dropped delivery is a gap the client
            // asks for again).
            Frame::Deliver { .. } | Frame::Hole { .. } | Frame::Signal { .. }
                if self.link != Link::Active => {}
            Frame::Deliver {
                seq,
                from,
                sent_at_ms,
                body,
            } => {
                if seq <= self.received_up_to {
                    return Ok(()); // Already held: a duplicate.
                }
                if Some(seq) != self.received_up_to.checked_add(1) {
                    // A gap the server did not declare: ask for everything after the cursor,
                    // once per cursor position.
                    if self.sync_sent_for != Some(self.received_up_to) {
                        self.sync_sent_for = Some(self.received_up_to);
                        // From the latest cursor: it asks for everything after it, so it
                        // stands for any older one.
                        self.queue_control_once(Frame::Sync {
                            after_seq: self.received_up_to,
                        });
                    }
                    return Ok(());
                }
                self.received_up_to = seq;
                self.sync_sent_for = None;
                self.events.push_back(ClientEvent::Message(Delivery {
                    seq,
                    from,
                    sent_at_ms,
                    body,
                }));
            }
            Frame::Hole { up_to_seq } => {
                if up_to_seq > self.received_up_to {
                    self.events.push_back(ClientEvent::Hole {
                        after_seq: self.received_up_to,
                        up_to_seq,
                    });
                    self.received_up_to = up_to_seq;
                    self.sync_sent_for = None;
                }
            }
            Frame::Signal {
                peer,
                kind,
                payload,
            } => self.events.push_back(ClientEvent::Signal {
                from: peer,
                kind,
                payload,
            }),
            // Answering the latest `Ping`.
            Frame::Ping { nonce } => self.queue_control_once(Frame::Pong { nonce }),
            Frame::Pong { .. } => {}
            Frame::Goaway {
                reason,
                reconnect_to,
            } => {
                return Err(SessionError::Goaway {
                    reason,
                    reconnect_to,
                });
            }
            Frame::Error { code, message } => {
                return Err(SessionError::Closed {
                    code,
                    reason: message,
                });
            }
            Frame::Hello { .. } | Frame::Send { .. } | Frame::Ack { .. } | Frame::Sync { .. } => {
                return Err(SessionError::Unexpected(frame.kind()));
            }
        }
        Ok(())
    }

    /// Runs what is due at `now`: the coalesced ack, retries of refused sends.
    pub fn handle_timeout(&mut self, now: Millis) {
        if self.ack_due_at.is_some_and(|due| due <= now) {
            self.ack_due_at = None;
            self.queue_ack();
        }
        while let Some((&(due, order), &client_id)) = self.retries.first_key_value() {
            if due > now {
                break;
            }
            self.retries.remove(&(due, order));
            if self.pending.contains_key(&client_id) {
                self.queue.insert(order, client_id);
            }
        }
    }

    // ---- Application --------------------------------------------------------------------------

    /// Queues a message for `to` under `client_id` (unique per sender; a retry after a restart
    /// reuses it). A second call with the id of a pending send joins it. The answer comes as
    /// [`ClientEvent::SendDone`].
    pub fn send(
        &mut self,
        client_id: u64,
        to: u64,
        body: Vec<u8>,
        ttl_secs: Option<u32>,
    ) -> Result<(), SendRefused> {
        if self.closed {
            return Err(SendRefused::Closed);
        }
        if client_id == 0 {
            return Err(SendRefused::ReservedId);
        }
        if body.len() > BODY_BYTES_MAX {
            return Err(SendRefused::BodyTooLarge(body.len()));
        }
        // Checked here as the server checks the frame: a frame that fails its limits would not
        // encode, and the link would end with a protocol error for every send pending.
        if to == 0 {
            return Err(SendRefused::NoRecipient);
        }
        if let Some(ttl) = ttl_secs.filter(|ttl| *ttl > TTL_SECS_MAX) {
            return Err(SendRefused::TtlTooLong(ttl));
        }
        if self.pending.contains_key(&client_id) {
            return Ok(());
        }
        if self.pending.len() >= self.config.sends_pending_max
            || self.pending_bytes.saturating_add(body.len()) > self.config.sends_pending_bytes_max
        {
            return Err(SendRefused::QueueFull);
        }
        self.pending_bytes += body.len();
        let order = self.next_order;
        self.next_order += 1;
        self.pending.insert(
            client_id,
            PendingSend {
                order,
                to,
                body,
                ttl_secs,
                in_flight: false,
                refusals: 0,
                first_written_wall_ms: None,
            },
        );
        self.queue.insert(order, client_id);
        Ok(())
    }

    /// The application took the message `seq`: acknowledge it (coalesced).
    pub fn consumed(&mut self, now: Millis, seq: u64) {
        self.ack(now, seq);
    }

    /// Acknowledges every message up to `up_to_seq` (at most what was received): the server
    /// may delete them. Sent after `ack_delay_ms`, the highest of the acks made meanwhile.
    pub fn ack(&mut self, now: Millis, up_to_seq: u64) {
        let up_to_seq = up_to_seq.min(self.received_up_to);
        if up_to_seq <= self.acked_up_to {
            return;
        }
        self.acked_up_to = up_to_seq;
        if self.ack_due_at.is_none() {
            self.ack_due_at = Some(now.saturating_add(self.config.ack_delay_ms));
        }
    }

    /// Queues an ephemeral signal for `peer`. Dropped when there is no connection (signals
    /// are never stored) and, oldest first, beyond `signals_queued_max`.
    pub fn signal(&mut self, peer: u64, kind: SignalKind, payload: Vec<u8>) -> bool {
        if self.link == Link::Down
            || self.closed
            || peer == 0
            || payload.len() > SIGNAL_PAYLOAD_BYTES_MAX
        {
            return false;
        }
        if self.signals.len() >= self.config.signals_queued_max {
            self.signals.pop_front();
        }
        self.signals.push_back(Frame::Signal {
            peer,
            kind,
            payload,
        });
        true
    }

    /// Closes the session: the last ack goes out at once (write what `poll_transmit` returns
    /// before closing the connection), and pending sends are dropped; returns their ids.
    pub fn close(&mut self) -> Vec<u64> {
        self.closed = true;
        self.ack_due_at = None;
        self.queue_ack();
        self.queue.clear();
        self.retries.clear();
        self.signals.clear();
        self.in_flight = 0;
        self.pending_bytes = 0;
        let mut abandoned: Vec<(u64, u64)> = self
            .pending
            .drain()
            .map(|(client_id, pending)| (pending.order, client_id))
            .collect();
        abandoned.sort_unstable();
        abandoned
            .into_iter()
            .map(|(_, client_id)| client_id)
            .collect()
    }

    // ---- Output -------------------------------------------------------------------------------

    /// When [`ClientSession::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let retry = self.retries.first_key_value().map(|(&(due, _), _)| due);
        match (self.ack_due_at, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The wall clock, Unix milliseconds (one that goes on while the device sleeps, unlike the
    /// driver's monotonic clock on Linux and Android): call it before
    /// [`ClientSession::poll_transmit`], which times each send's first write by it
    /// (`send_retry_window_ms`).
    pub fn set_wall_clock(&mut self, wall_ms: u64) {
        self.wall_ms = wall_ms;
    }

    /// The next frame to write on the connection: control frames, then signals, then sends
    /// while fewer than `sends_in_flight_max` are unanswered.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        if self.link == Link::Down {
            return None;
        }
        if let Some(frame) = self.control.pop_front() {
            return Some(frame);
        }
        if let Some(frame) = self.signals.pop_front() {
            return Some(frame);
        }
        if self.in_flight >= self.config.sends_in_flight_max {
            return None;
        }
        // A send first written more than `send_retry_window_ms` ago (its connection lost, or
        // refused since, before an answer) is not written again: it may have been stored, and
        // past the server's dedupe window a retry is stored again.
        let (client_id, pending) = loop {
            let (_, client_id) = self.queue.pop_first()?;
            let pending = self.pending.get(&client_id)?;
            let window_ms = self.config.send_retry_window_ms;
            if pending
                .first_written_wall_ms
                .is_some_and(|at| self.wall_ms.saturating_sub(at) >= window_ms)
            {
                self.finish_send(client_id, Err(ErrorCode::TimedOut));
                continue;
            }
            break (client_id, self.pending.get_mut(&client_id)?);
        };
        pending.in_flight = true;
        pending.first_written_wall_ms.get_or_insert(self.wall_ms);
        self.in_flight += 1;
        Some(Frame::Send {
            client_id,
            to: pending.to,
            body: pending.body.clone(),
            ttl_secs: pending.ttl_secs,
        })
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Queues an `Ack` of everything acknowledged (cumulative: it stands for any queued one).
    fn queue_ack(&mut self) {
        if self.link != Link::Down && self.acked_up_to > self.ack_sent_up_to {
            self.ack_sent_up_to = self.acked_up_to;
            self.queue_control_once(Frame::Ack {
                up_to_seq: self.acked_up_to,
            });
        }
    }

    /// Queues `frame`, replacing a queued frame of its kind (`Pong`, `Sync` and `Ack` each
    /// stand for any earlier one): one of each waits at most, so a server that withholds flow
    /// control credit while it pings, delivers or leaves gaps cannot grow the queue.
    fn queue_control_once(&mut self, frame: Frame) {
        let kind = std::mem::discriminant(&frame);
        match self
            .control
            .iter_mut()
            .find(|queued| std::mem::discriminant(&**queued) == kind)
        {
            Some(queued) => *queued = frame,
            None => self.control.push_back(frame),
        }
    }

    fn finish_send(&mut self, client_id: u64, result: Result<SendReceipt, ErrorCode>) {
        let Some(pending) = self.pending.remove(&client_id) else {
            return; // An answer to a send already answered (a retry's duplicate).
        };
        self.pending_bytes -= pending.body.len();
        if pending.in_flight {
            self.in_flight -= 1;
        } else {
            self.queue.remove(&pending.order);
            self.retries.retain(|_, id| *id != client_id);
        }
        self.events
            .push_back(ClientEvent::SendDone { client_id, result });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> ClientSession {
        ClientSession::new(ClientConfig::new(b"token".to_vec(), 0), 0)
    }

    fn drain(session: &mut ClientSession) -> Vec<Frame> {
        std::iter::from_fn(|| session.poll_transmit()).collect()
    }

    fn welcome() -> Frame {
        Frame::Welcome {
            user: 1,
            device: 0,
            server_time_ms: 0,
            acked_up_to: 0,
            first_seq: 1,
        }
    }

    fn deliver(seq: u64) -> Frame {
        Frame::Deliver {
            seq,
            from: 9,
            sent_at_ms: 0,
            body: vec![],
        }
    }

    /// A send or signal the protocol's limits would refuse is refused when the application
    /// asks, and the others go on: queued, such a frame would fail to encode and end the link
    /// for every pending send.
    #[test]
    fn sends_and_signals_outside_the_protocols_limits_are_refused_at_once() {
        let mut s = session();
        assert_eq!(s.send(1, 0, vec![], None), Err(SendRefused::NoRecipient));
        assert_eq!(
            s.send(2, 5, vec![], Some(TTL_SECS_MAX + 1)),
            Err(SendRefused::TtlTooLong(TTL_SECS_MAX + 1))
        );
        s.send(3, 5, vec![], Some(TTL_SECS_MAX)).unwrap();
        s.connected(0);
        assert!(!s.signal(0, SignalKind::Typing, vec![]));
        assert!(s.signal(5, SignalKind::Typing, vec![]));
        let frames = drain(&mut s);
        assert_eq!(
            frames.len(),
            3,
            "Hello, the valid send and signal: {frames:?}"
        );
        for frame in &frames {
            crate::encode(frame, &mut Vec::new()).expect("every queued frame encodes");
        }
    }

    /// A send written and unanswered past `send_retry_window_ms` (a device asleep for a day
    /// after its connection broke before the answer came: the driver's clock barely moved,
    /// the wall clock did) is not written again, since past the server's dedupe window the
    /// retry would be stored again, a second copy. It ends with `TimedOut`. A send never
    /// written, and one within the window, go out.
    #[test]
    fn a_send_unanswered_past_its_retry_window_is_not_written_again() {
        let mut s = session();
        let window_ms = s.config.send_retry_window_ms;
        let sent = |frames: &[Frame]| -> Vec<u64> {
            frames
                .iter()
                .filter_map(|frame| match frame {
                    Frame::Send { client_id, .. } => Some(*client_id),
                    _ => None,
                })
                .collect()
        };
        s.send(1, 9, b"written long ago".to_vec(), None).unwrap();
        s.set_wall_clock(1_000);
        s.connected(0);
        assert_eq!(sent(&drain(&mut s)), vec![1]);
        s.disconnected(5);
        s.send(2, 9, b"never written".to_vec(), None).unwrap();
        s.set_wall_clock(1_000 + window_ms / 2);
        s.connected(10);
        assert_eq!(sent(&drain(&mut s)), vec![1, 2], "within the window");
        s.disconnected(15);
        s.set_wall_clock(1_000 + window_ms);
        s.connected(20);
        assert_eq!(sent(&drain(&mut s)), vec![2]);
        let done: Vec<ClientEvent> = std::iter::from_fn(|| s.poll_event()).collect();
        assert_eq!(
            done,
            vec![ClientEvent::SendDone {
                client_id: 1,
                result: Err(ErrorCode::TimedOut),
            }]
        );
        assert_eq!(s.pending_sends(), 1);
    }

    /// A send's first write is timed by the wall clock the driver gives before it writes, not
    /// by the link's start: a send made late on a link quiet for most of the window, refused
    /// once, is written again when its retry comes. (A first version timed it from the link's
    /// last frame and failed such a send as unconfirmed seconds after its first write.)
    #[test]
    fn a_send_late_on_a_quiet_link_gets_its_whole_retry_window() {
        let mut s = session();
        let window_ms = s.config.send_retry_window_ms;
        let sends = |frames: Vec<Frame>| {
            frames
                .iter()
                .filter(|frame| matches!(frame, Frame::Send { .. }))
                .count()
        };
        s.connected(0);
        s.handle_frame(0, welcome()).unwrap();
        drain(&mut s);
        s.set_wall_clock(window_ms - 1_000);
        s.send(1, 9, b"late".to_vec(), None).unwrap();
        assert_eq!(sends(drain(&mut s)), 1);
        let refused = Frame::SendError {
            client_id: 1,
            code: ErrorCode::Overloaded,
            retryable: true,
        };
        s.handle_frame(10, refused).unwrap();
        s.set_wall_clock(window_ms + 1_000);
        s.handle_timeout(10 + 2 * s.config.retry_after_max_ms);
        assert_eq!(sends(drain(&mut s)), 1, "written again");
        let events: Vec<ClientEvent> = std::iter::from_fn(|| s.poll_event()).collect();
        assert!(
            !events
                .iter()
                .any(|event| matches!(event, ClientEvent::SendDone { .. })),
            "{events:?}"
        );
    }

    /// Resume and ack are separate: a reconnect carries what the device holds and what the
    /// application consumed, and acks only the latter.
    #[test]
    fn hello_acks_only_what_the_application_consumed() {
        let mut s = session();
        s.connected(0);
        drain(&mut s);
        s.handle_frame(0, welcome()).unwrap();
        for seq in 1..=3 {
            s.handle_frame(0, deliver(seq)).unwrap();
        }
        s.consumed(0, 1);
        s.disconnected(1);
        s.connected(2);
        assert_eq!(
            drain(&mut s).first(),
            Some(&Frame::Hello {
                token: b"token".to_vec(),
                device: 0,
                acked_up_to: 1,
                resume_after_seq: 3,
            })
        );
    }

    /// A server cannot make the client hold without bound what it sends: deliveries and
    /// signals before `Welcome` are ignored (the edge sends none; a dropped delivery is a gap
    /// asked for again), and pings answered while nothing is written leave one `Pong`, for
    /// the latest.
    #[test]
    fn a_server_cannot_grow_what_the_session_holds() {
        let mut s = session();
        s.connected(0);
        drain(&mut s);
        for seq in 1..=1_000 {
            s.handle_frame(0, deliver(seq)).unwrap();
            s.handle_frame(
                0,
                Frame::Signal {
                    peer: 9,
                    kind: SignalKind::Typing,
                    payload: vec![],
                },
            )
            .unwrap();
            s.handle_frame(0, Frame::Ping { nonce: seq }).unwrap();
        }
        assert_eq!(s.poll_event(), None, "nothing before Welcome");
        assert_eq!(s.received_up_to(), 0);
        assert_eq!(drain(&mut s), vec![Frame::Pong { nonce: 1_000 }]);
        s.handle_frame(0, welcome()).unwrap();
        assert!(matches!(s.poll_event(), Some(ClientEvent::Welcome { .. })));
        s.handle_frame(0, deliver(1)).unwrap();
        assert!(matches!(s.poll_event(), Some(ClientEvent::Message(d)) if d.seq == 1));
        // Nothing written meanwhile: gaps past a moving cursor leave one `Sync`, and acks
        // made as messages come leave one `Ack`, each for the latest.
        let mut now = 0;
        for round in 1..=1_000u64 {
            s.handle_frame(
                now,
                Frame::Hole {
                    up_to_seq: 3 * round - 1,
                },
            )
            .unwrap();
            s.handle_frame(now, deliver(3 * round + 1)).unwrap();
            s.handle_frame(now, deliver(3 * round)).unwrap();
            s.consumed(now, 3 * round);
            now += 1_000;
            s.handle_timeout(now);
        }
        while s.poll_event().is_some() {}
        assert_eq!(
            drain(&mut s),
            vec![
                Frame::Sync { after_seq: 2_999 },
                Frame::Ack { up_to_seq: 3_000 },
            ]
        );
    }

    /// Pending sends are bounded in bytes as well as in number, and a send answered gives
    /// its bytes back.
    #[test]
    fn pending_sends_are_bounded_in_bytes() {
        let mut config = ClientConfig::new(b"token".to_vec(), 0);
        config.sends_pending_bytes_max = 250;
        let mut s = ClientSession::new(config, 0);
        s.send(1, 5, vec![0; 100], None).unwrap();
        s.send(2, 5, vec![0; 100], None).unwrap();
        assert_eq!(
            s.send(3, 5, vec![0; 100], None),
            Err(SendRefused::QueueFull)
        );
        s.send(4, 5, vec![0; 50], None).unwrap();
        s.connected(0);
        drain(&mut s);
        s.handle_frame(0, welcome()).unwrap();
        s.handle_frame(
            0,
            Frame::SendAck {
                client_id: 1,
                seq: 1,
                server_time_ms: 0,
            },
        )
        .unwrap();
        s.send(3, 5, vec![0; 100], None).unwrap();
        assert_eq!(s.send(5, 5, vec![0; 1], None), Err(SendRefused::QueueFull));
    }

    /// A declared hole moves the cursor; an undeclared gap asks for a sync once.
    #[test]
    fn holes_are_skipped_and_gaps_synced_once() {
        let mut s = session();
        s.connected(0);
        drain(&mut s);
        s.handle_frame(0, welcome()).unwrap();
        assert!(matches!(s.poll_event(), Some(ClientEvent::Welcome { .. })));
        s.handle_frame(0, deliver(5)).unwrap();
        s.handle_frame(0, deliver(6)).unwrap();
        assert_eq!(drain(&mut s), vec![Frame::Sync { after_seq: 0 }]);
        s.handle_frame(0, Frame::Hole { up_to_seq: 4 }).unwrap();
        s.handle_frame(0, deliver(5)).unwrap();
        let events: Vec<_> = std::iter::from_fn(|| s.poll_event()).collect();
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(s.received_up_to(), 5);
    }

    /// Sends go out in order, at most `sends_in_flight_max` at a time, and a retryable refusal
    /// resends under the same id after `retry_after_ms`.
    #[test]
    fn sends_are_windowed_and_retried_under_their_id() {
        let mut s = session();
        for id in 1..=300 {
            s.send(id, 2, vec![], None).unwrap();
        }
        s.connected(0);
        let first = drain(&mut s);
        assert_eq!(first.len(), 1 + 256, "Hello and a window of sends");
        assert!(matches!(first[1], Frame::Send { client_id: 1, .. }));
        s.handle_frame(
            10,
            Frame::SendError {
                client_id: 1,
                code: ErrorCode::Overloaded,
                retryable: true,
            },
        )
        .unwrap();
        assert!(matches!(
            drain(&mut s).as_slice(),
            [Frame::Send { client_id: 257, .. }]
        ));
        s.handle_frame(
            20,
            Frame::SendAck {
                client_id: 2,
                seq: 1,
                server_time_ms: 0,
            },
        )
        .unwrap();
        s.handle_timeout(10 + 200);
        assert!(matches!(
            drain(&mut s).as_slice(),
            [Frame::Send { client_id: 1, .. }]
        ));
    }

    /// Messages consumed within the ack delay cost one `Ack`, with the highest seq, sent when
    /// the delay of the first ends: a receiver of a burst does not answer each message.
    #[test]
    fn acks_within_the_delay_leave_as_one() {
        let mut s = session();
        let delay = s.config.ack_delay_ms;
        assert!(delay >= 4, "the delay must leave room for three messages");
        s.connected(0);
        drain(&mut s);
        s.handle_frame(0, welcome()).unwrap();
        for seq in 1..=3 {
            s.handle_frame(seq, deliver(seq)).unwrap();
            s.consumed(seq, seq);
            s.handle_timeout(seq);
        }
        assert_eq!(drain(&mut s), vec![], "no ack before the delay ends");
        assert_eq!(s.poll_timeout(), Some(1 + delay));
        s.handle_timeout(1 + delay);
        assert_eq!(drain(&mut s), vec![Frame::Ack { up_to_seq: 3 }]);
    }

    /// Closing sends the last ack at once.
    #[test]
    fn close_flushes_the_last_ack() {
        let mut s = session();
        s.connected(0);
        drain(&mut s);
        s.handle_frame(0, welcome()).unwrap();
        s.handle_frame(0, deliver(1)).unwrap();
        s.consumed(0, 1);
        s.close();
        assert_eq!(drain(&mut s), vec![Frame::Ack { up_to_seq: 1 }]);
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let mut s = session();
        let delays: Vec<u64> = (0..10).map(|i| s.reconnect_delay_ms(i * 7919)).collect();
        assert!(delays.iter().all(|d| *d <= 2_000), "{delays:?}");
        assert!(delays[0] <= 50);
        assert!(delays[9] >= 1_000);
    }

    /// Links that end soon after their `Welcome` (another instance of the device superseding
    /// this one, over and over) keep the backoff growing to its maximum; a link that stayed up
    /// `link_healthy_after_ms` starts it over.
    #[test]
    fn only_a_link_that_stayed_up_resets_the_reconnect_backoff() {
        let mut s = session();
        let healthy_ms = s.config.link_healthy_after_ms;
        let mut now = 0;
        let mut delays = Vec::new();
        for _ in 0..8 {
            s.connected(now);
            s.handle_frame(now, welcome()).unwrap();
            now += 100;
            s.disconnected(now);
            // With no jitter drawn, the delay is half the backoff.
            let delay = s.reconnect_delay_ms(0);
            delays.push(delay);
            now += delay;
        }
        assert_eq!(
            delays.last(),
            Some(&(s.config.reconnect_backoff_max_ms / 2)),
            "{delays:?}"
        );
        assert!(
            delays.windows(2).all(|pair| pair[0] <= pair[1]),
            "{delays:?}"
        );
        s.connected(now);
        s.handle_frame(now, welcome()).unwrap();
        s.disconnected(now + healthy_ms);
        assert_eq!(
            s.reconnect_delay_ms(0),
            s.config.reconnect_backoff_min_ms / 2
        );
    }

    /// A link the server closed for a frame that did not arrive in time (`TimedOut`: a slow
    /// link and a large send, sent again first at every reconnect) keeps the backoff growing,
    /// however long it lived: before, it counted as healthy after 10 s (the frame deadline's
    /// length too) and reconnected at the shortest wait, to time out again.
    #[test]
    fn a_link_closed_for_a_slow_frame_keeps_the_reconnect_backoff_growing() {
        let mut s = session();
        let healthy_ms = s.config.link_healthy_after_ms;
        let mut now = 0;
        let mut delays = Vec::new();
        for _ in 0..4 {
            s.connected(now);
            s.handle_frame(now, welcome()).unwrap();
            now += 2 * healthy_ms;
            s.disconnected_unhealthy(now);
            delays.push(s.reconnect_delay_ms(0));
        }
        assert!(
            delays.windows(2).all(|pair| pair[0] < pair[1]),
            "{delays:?}"
        );
    }

    /// A configuration of no wait still waits `WAIT_MIN_MS` (half of it, with jitter) before
    /// each reconnect and each retry of a refused send: before, a zero backoff reconnected
    /// back to back, as fast as handshakes go.
    #[test]
    fn no_configured_wait_still_waits() {
        let mut config = ClientConfig::new(b"token".to_vec(), 0);
        config.reconnect_backoff_min_ms = 0;
        config.reconnect_backoff_max_ms = 0;
        config.retry_after_ms = 0;
        config.retry_after_max_ms = 0;
        let mut s = ClientSession::new(config.clone(), 0);
        for random in 0..100 {
            let delay = s.reconnect_delay_ms(random);
            assert!(delay >= WAIT_MIN_MS / 2, "reconnect after {delay} ms");
        }
        for client_id in 1..=100 {
            let wait = retry_wait_ms(&config, client_id, 3);
            assert!(wait >= WAIT_MIN_MS / 2, "retry after {wait} ms");
        }
    }

    /// Each retryable refusal of a send doubles its wait up to the maximum, and a window of
    /// sends refused at once comes due spread over the second half of the wait.
    #[test]
    fn refused_sends_back_off_and_spread() {
        let mut s = session();
        let (first_ms, max_ms) = (s.config.retry_after_ms, s.config.retry_after_max_ms);
        for id in 1..=100 {
            s.send(id, 2, vec![], None).unwrap();
        }
        s.connected(0);
        drain(&mut s);
        let refuse = |s: &mut ClientSession, now: Millis, client_id: u64| {
            s.handle_frame(
                now,
                Frame::SendError {
                    client_id,
                    code: ErrorCode::Overloaded,
                    retryable: true,
                },
            )
            .unwrap();
        };
        for id in 1..=100 {
            refuse(&mut s, 0, id);
        }
        let dues: Vec<Millis> = s.retries.keys().map(|(due, _)| *due).collect();
        assert!(
            dues.iter()
                .all(|due| (first_ms / 2..=first_ms).contains(due)),
            "{dues:?}"
        );
        let distinct: std::collections::BTreeSet<_> = dues.iter().collect();
        assert!(distinct.len() > 50, "retries spread: {distinct:?}");
        // Send 1 alone, refused again and again: 200, 400, 800, ... up to the maximum.
        let mut now = 0;
        let mut waits = Vec::new();
        for _ in 0..10 {
            let due = s
                .retries
                .iter()
                .find(|(_, id)| **id == 1)
                .map(|((due, _), _)| *due)
                .expect("send 1 waits for its retry");
            waits.push(due - now);
            now = due;
            s.handle_timeout(now);
            drain(&mut s);
            refuse(&mut s, now, 1);
        }
        for (attempt, wait) in waits.iter().enumerate() {
            let full = (first_ms << attempt).min(max_ms);
            assert!(
                (full / 2..=full).contains(wait),
                "attempt {attempt}: {waits:?}"
            );
        }
    }
}
