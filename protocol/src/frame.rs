//! The frames of the client protocol.

use rkyv::{Archive, Deserialize, Serialize};

use crate::DecodeError;
use crate::limits::*;

/// One message of the client protocol, in either direction.
///
/// Client to server: `Hello`, `Send`, `Ack`, `Sync`, `Signal`, `Ping`, `Pong`.
/// Server to client: `Welcome`, `SendAck`, `SendError`, `Deliver`, `Hole`, `Signal`, `Ping`,
/// `Pong`, `Goaway`, `Error`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// First frame of every connection: who the client is and where its device left off.
    Hello {
        /// Signed token that names the user, device, role and expiry.
        token: Vec<u8>,
        /// Device number of the user, at most [`DEVICE_ID_MAX`].
        device: u32,
        /// Highest sequence number the application consumed (or acknowledged explicitly) on
        /// this device: the server may delete up to here. 0 for none.
        acked_up_to: u64,
        /// Highest sequence number this device holds, consumed or still buffered: delivery
        /// resumes after it. At least `acked_up_to`; 0 for a fresh install.
        resume_after_seq: u64,
    },
    /// The server accepted `Hello`: from now on live deliveries and signals reach this
    /// connection.
    Welcome {
        user: u64,
        device: u32,
        server_time_ms: u64,
        /// The device's durable cursor: everything up to here it consumed (on this install or
        /// an earlier one) and is not delivered again. A device new to the inbox starts at the
        /// inbox's head.
        acked_up_to: u64,
        /// The inbox's first stored message after `acked_up_to` (or the next seq it will
        /// assign, when none is stored): every seq in between is gone, a declared hole.
        first_seq: u64,
    },
    /// Store and deliver `body` to user `to`. The sender is the authenticated user.
    Send {
        /// Chosen by the sender, unique per sender; a retry reuses it and is stored once.
        client_id: u64,
        to: u64,
        body: Vec<u8>,
        /// Delete the message if undelivered after this many seconds (capped by retention).
        ttl_secs: Option<u32>,
    },
    /// The message with `client_id` is durably stored as `seq` of the recipient's inbox.
    SendAck {
        client_id: u64,
        seq: u64,
        server_time_ms: u64,
    },
    /// The message with `client_id` was not stored. Retry with the same id if `retryable`.
    SendError {
        client_id: u64,
        code: ErrorCode,
        retryable: bool,
    },
    /// A stored message for the connected user.
    Deliver {
        /// Dense, gapless position in the recipient's inbox.
        seq: u64,
        from: u64,
        sent_at_ms: u64,
        body: Vec<u8>,
    },
    /// The device holds every message up to and including `up_to_seq`; the server deletes them.
    Ack {
        up_to_seq: u64,
    },
    /// Send again every stored message after `after_seq`.
    Sync {
        after_seq: u64,
    },
    /// Every message after the device's cursor up to and including `up_to_seq` is gone
    /// (acknowledged, expired or past retention): the client moves its cursor to `up_to_seq`
    /// instead of waiting for them. A server declares a hole before delivering past it, so a
    /// `Deliver` with `seq > cursor + 1` and no `Hole` before it is a real gap (then `Sync`).
    Hole {
        up_to_seq: u64,
    },
    /// Ephemeral signal (typing, presence); never stored, dropped when the peer is offline.
    /// Client to server, `peer` is the recipient; server to client, `peer` is the sender.
    Signal {
        peer: u64,
        kind: SignalKind,
        payload: Vec<u8>,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// The server is going away: reconnect, to `reconnect_to` if given.
    Goaway {
        reason: String,
        reconnect_to: Option<String>,
    },
    /// A protocol-level error; the server closes the connection after sending it.
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// Kinds of ephemeral signals.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalKind {
    Typing,
    StoppedTyping,
    Online,
    Offline,
    /// Application-defined; the meaning is in the payload.
    Custom,
}

/// Error codes carried by `SendError`, `Error` and QUIC connection closes.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The bytes were not a valid frame.
    Malformed = 1,
    /// The frame's length prefix exceeds `FRAME_BYTES_MAX`.
    FrameTooLarge = 2,
    /// A field exceeds its limit.
    LimitExceeded = 3,
    /// The token is missing, malformed or not signed by a known key.
    Unauthenticated = 4,
    /// The token has expired: get a new one.
    TokenExpired = 5,
    /// The frame is not allowed in this state (for example `Send` before `Hello`, or a
    /// non-idempotent frame in 0-RTT data).
    UnexpectedFrame = 6,
    /// The recipient does not exist or is the reserved id.
    BadRecipient = 7,
    /// Too many unacknowledged sends on this connection: wait for acks, then retry.
    TooManyInFlight = 8,
    /// The server is overloaded: retry after backing off.
    Overloaded = 9,
    /// The store did not confirm the commit: retry with the same client id.
    StoreUnavailable = 10,
    /// The recipient's home shard cannot be reached: retry with the same client id.
    ShardUnavailable = 11,
    /// The server is shutting down: reconnect.
    ShuttingDown = 12,
    /// A bug in the server.
    Internal = 13,
    /// A newer connection of the same device replaced this one (the device reconnected before
    /// this connection timed out). Retryable: a client that still runs reconnects, and its
    /// newer connection replaces the other in turn.
    Superseded = 14,
    /// An operator ended this connection (`courier-edge ctl disconnect`). Not retryable: the
    /// application decides whether to log in again.
    Disconnected = 15,
    /// The user already has `limits.connections_per_user_max` connections on this edge.
    /// Retryable: the client reconnects with backoff and gets in once another of the user's
    /// devices goes offline.
    TooManyConnections = 16,
    /// `Hello`, or the rest of a started frame, did not arrive within its deadline
    /// (`limits.hello_timeout_ms`, `limits.frame_timeout_ms`). Retryable: the client
    /// reconnects. An honest client on a slow link meets it too (a 64 KiB frame takes over
    /// 10 s below about 52 kbit/s); a fatal code stopped such a client for good.
    TimedOut = 17,
}

impl ErrorCode {
    /// Whether retrying the same request (same client id) later may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::TooManyInFlight
                | ErrorCode::Overloaded
                | ErrorCode::StoreUnavailable
                | ErrorCode::ShardUnavailable
                | ErrorCode::ShuttingDown
                | ErrorCode::Superseded
                | ErrorCode::TooManyConnections
                | ErrorCode::TimedOut
        )
    }

    /// The numeric code, as used for QUIC application close codes.
    pub fn to_u16(self) -> u16 {
        self as u16
    }

    /// The code for a number, if it is one.
    pub fn from_u16(code: u16) -> Option<ErrorCode> {
        ALL_ERROR_CODES.iter().copied().find(|c| c.to_u16() == code)
    }
}

/// Every error code, for lookups and documentation.
pub const ALL_ERROR_CODES: [ErrorCode; 17] = [
    ErrorCode::Malformed,
    ErrorCode::FrameTooLarge,
    ErrorCode::LimitExceeded,
    ErrorCode::Unauthenticated,
    ErrorCode::TokenExpired,
    ErrorCode::UnexpectedFrame,
    ErrorCode::BadRecipient,
    ErrorCode::TooManyInFlight,
    ErrorCode::Overloaded,
    ErrorCode::StoreUnavailable,
    ErrorCode::ShardUnavailable,
    ErrorCode::ShuttingDown,
    ErrorCode::Internal,
    ErrorCode::Superseded,
    ErrorCode::Disconnected,
    ErrorCode::TooManyConnections,
    ErrorCode::TimedOut,
];

impl Frame {
    /// Whether the frame may be accepted from 0-RTT data, which an attacker can replay.
    /// `Send` qualifies because the (sender, client id) dedupe makes a replay a no-op.
    pub fn is_idempotent(&self) -> bool {
        matches!(
            self,
            Frame::Hello { .. } | Frame::Send { .. } | Frame::Sync { .. } | Frame::Ping { .. }
        )
    }

    /// Short name of the frame's kind, for logs and metrics (never the contents).
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "hello",
            Frame::Welcome { .. } => "welcome",
            Frame::Send { .. } => "send",
            Frame::SendAck { .. } => "send_ack",
            Frame::SendError { .. } => "send_error",
            Frame::Deliver { .. } => "deliver",
            Frame::Ack { .. } => "ack",
            Frame::Sync { .. } => "sync",
            Frame::Hole { .. } => "hole",
            Frame::Signal { .. } => "signal",
            Frame::Ping { .. } => "ping",
            Frame::Pong { .. } => "pong",
            Frame::Goaway { .. } => "goaway",
            Frame::Error { .. } => "error",
        }
    }

    /// Checks every field against its limit. [`crate::decode`] and [`crate::encode`] call this.
    pub fn check_limits(&self) -> Result<(), DecodeError> {
        match self {
            Frame::Hello {
                token,
                device,
                acked_up_to,
                resume_after_seq,
            } => {
                check_len("hello.token", token.len(), TOKEN_BYTES_MAX)?;
                check_max("hello.device", u64::from(*device), u64::from(DEVICE_ID_MAX))?;
                // A device cannot have consumed what it does not hold.
                check_max("hello.acked_up_to", *acked_up_to, *resume_after_seq)
            }
            Frame::Welcome { user, device, .. } => {
                check_nonzero("welcome.user", *user)?;
                check_max(
                    "welcome.device",
                    u64::from(*device),
                    u64::from(DEVICE_ID_MAX),
                )
            }
            Frame::Send {
                client_id,
                to,
                body,
                ttl_secs,
            } => {
                check_nonzero("send.client_id", *client_id)?;
                check_nonzero("send.to", *to)?;
                check_len("send.body", body.len(), BODY_BYTES_MAX)?;
                match ttl_secs {
                    Some(ttl) => {
                        check_max("send.ttl_secs", u64::from(*ttl), u64::from(TTL_SECS_MAX))
                    }
                    None => Ok(()),
                }
            }
            Frame::SendAck { client_id, seq, .. } => {
                check_nonzero("send_ack.client_id", *client_id)?;
                check_nonzero("send_ack.seq", *seq)
            }
            Frame::SendError { client_id, .. } => check_nonzero("send_error.client_id", *client_id),
            Frame::Deliver {
                seq, from, body, ..
            } => {
                check_nonzero("deliver.seq", *seq)?;
                check_nonzero("deliver.from", *from)?;
                check_len("deliver.body", body.len(), BODY_BYTES_MAX)
            }
            Frame::Ack { .. }
            | Frame::Sync { .. }
            | Frame::Hole { .. }
            | Frame::Ping { .. }
            | Frame::Pong { .. } => Ok(()),
            Frame::Signal { peer, payload, .. } => {
                check_nonzero("signal.peer", *peer)?;
                check_len("signal.payload", payload.len(), SIGNAL_PAYLOAD_BYTES_MAX)
            }
            Frame::Goaway {
                reason,
                reconnect_to,
            } => {
                check_len("goaway.reason", reason.len(), TEXT_BYTES_MAX)?;
                match reconnect_to {
                    Some(address) => {
                        check_len("goaway.reconnect_to", address.len(), ADDRESS_BYTES_MAX)
                    }
                    None => Ok(()),
                }
            }
            Frame::Error { message, .. } => {
                check_len("error.message", message.len(), TEXT_BYTES_MAX)
            }
        }
    }
}

pub(crate) fn check_len(
    field: &'static str,
    actual: usize,
    limit: usize,
) -> Result<(), DecodeError> {
    check_max(field, actual as u64, limit as u64)
}

pub(crate) fn check_max(field: &'static str, actual: u64, limit: u64) -> Result<(), DecodeError> {
    if actual > limit {
        return Err(DecodeError::LimitExceeded {
            field,
            actual,
            limit,
        });
    }
    Ok(())
}

pub(crate) fn check_nonzero(field: &'static str, value: u64) -> Result<(), DecodeError> {
    if value == 0 {
        return Err(DecodeError::ZeroId { field });
    }
    Ok(())
}
