//! Messages between shards: every cross-shard hop is one variant of [`MeshMessage`].
//!
//! Channels are glommio's bounded `channel_mesh`; a shard is addressed by its mesh peer id,
//! which is also its shard id (the byte in its connection ids).

use std::net::{IpAddr, SocketAddr};

use courier_core::UserId;
use courier_core::commit::SendRequest;
use courier_core::envelope::StoredMessage;
use courier_protocol::{ErrorCode, SignalKind};

/// A connection anywhere in the edge: its shard, its slot there, and the generation that tells
/// a reused slot from the connection that held it before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnRef {
    pub shard: u8,
    pub slot: usize,
    pub generation: u64,
}

/// One cross-shard message.
#[derive(Debug)]
pub enum MeshMessage {
    /// A datagram whose connection id names the receiving shard (CID steering).
    Datagram {
        remote: SocketAddr,
        local_ip: Option<IpAddr>,
        ecn: Option<u8>,
        data: Vec<u8>,
    },
    /// To the recipient's home shard: store this message.
    Send {
        send: SendRequest,
        reply: ConnRef,
    },
    /// Back to the sender's shard: the outcome of a send.
    SendResult {
        reply: ConnRef,
        client_id: u64,
        result: Result<(u64, u64), ErrorCode>,
    },
    /// To the inbox's home shard: the device holds everything up to `up_to_seq`.
    Ack {
        inbox: UserId,
        up_to_seq: u64,
    },
    /// To the user's home shard: this connection wants live deliveries.
    Register {
        user: UserId,
        conn: ConnRef,
    },
    /// Back from the home shard: live deliveries flow from now on, so the connection can read
    /// the store for what it missed without a gap.
    Registered {
        conn: ConnRef,
    },
    /// Back from the home shard when the user already has the maximum of connections.
    RegisterRefused {
        conn: ConnRef,
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
    /// To the shard holding `conn`: a live delivery did not fit the mesh; read the store.
    CatchUp {
        conn: ConnRef,
    },
}

/// What happens to a message that finds its peer shard's backlog over its data maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overload {
    /// Ephemeral or retransmitted by QUIC: drop it.
    Drop,
    /// A send: answer `Overloaded`; the client retries under the same id.
    Refuse,
    /// A live delivery: send a `CatchUp` instead; the store holds the message.
    CatchUp,
    /// Control: never dropped for overload.
    Keep,
}

impl MeshMessage {
    pub fn on_overload(&self) -> Overload {
        match self {
            MeshMessage::Datagram { .. }
            | MeshMessage::Signal { .. }
            | MeshMessage::SignalDeliver { .. } => Overload::Drop,
            MeshMessage::Send { .. } => Overload::Refuse,
            MeshMessage::Deliver { .. } => Overload::CatchUp,
            MeshMessage::SendResult { .. }
            | MeshMessage::Ack { .. }
            | MeshMessage::Register { .. }
            | MeshMessage::Registered { .. }
            | MeshMessage::RegisterRefused { .. }
            | MeshMessage::Unregister { .. }
            | MeshMessage::CatchUp { .. } => Overload::Keep,
        }
    }

    /// The variant's name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            MeshMessage::Datagram { .. } => "Datagram",
            MeshMessage::Send { .. } => "Send",
            MeshMessage::SendResult { .. } => "SendResult",
            MeshMessage::Ack { .. } => "Ack",
            MeshMessage::Register { .. } => "Register",
            MeshMessage::Registered { .. } => "Registered",
            MeshMessage::RegisterRefused { .. } => "RegisterRefused",
            MeshMessage::Unregister { .. } => "Unregister",
            MeshMessage::Deliver { .. } => "Deliver",
            MeshMessage::Signal { .. } => "Signal",
            MeshMessage::SignalDeliver { .. } => "SignalDeliver",
            MeshMessage::CatchUp { .. } => "CatchUp",
        }
    }
}
