//! Messages between shards: every cross-shard hop is one variant of [`MeshMessage`].
//!
//! Channels are glommio's bounded `channel_mesh`; a shard is addressed by its mesh peer id,
//! which is also its shard id (the byte in its connection ids). What the session layer sends
//! between shards is `courier_core::session::ShardMessage`; the transport adds steered
//! datagrams.

use std::net::{IpAddr, SocketAddr};

use courier_core::session::{Overload, ShardMessage};

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
    /// For the receiving shard's session layer.
    Session(ShardMessage),
    /// Edge `peer` opened a link to another shard of this edge: it is up, so this shard's own
    /// link to it is tried at once, not at the end of its backoff.
    PeerBack {
        peer: courier_core::placement::EdgeId,
    },
}

impl MeshMessage {
    /// What may happen to it when the peer's backlog is over its data maximum. A datagram is
    /// retransmitted by QUIC, so it may be dropped.
    pub fn on_overload(&self) -> Overload {
        match self {
            MeshMessage::Datagram { .. } | MeshMessage::PeerBack { .. } => Overload::Drop,
            MeshMessage::Session(message) => message.on_overload(),
        }
    }

    /// The variant's name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            MeshMessage::Datagram { .. } => "Datagram",
            MeshMessage::PeerBack { .. } => "PeerBack",
            MeshMessage::Session(message) => message.kind(),
        }
    }
}
