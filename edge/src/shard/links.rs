//! The shard's side of a cluster of edges (issue 13, decision 0013): its links to the other
//! edges, driven by the same quinn-proto endpoint and loop as client connections.
//!
//! A shard opens one link to every other edge (`ConnKind::LinkOut`): a QUIC connection with
//! the link ALPN, mutual TLS with the cluster's CA, and one bidirectional stream that starts
//! with `LinkFrame::Hello`. Links other edges open land on whichever shard their connection
//! ids steer them to (`ConnKind::LinkIn`). What the links carry, and what happens when one
//! drops, is the session's (`courier_core::session`); this file moves the bytes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_core::placement::EdgeId;
use courier_core::session::{ClusterView, EdgeMember};
use courier_protocol::ErrorCode;
use courier_protocol::link::{LINK_ALPN, LinkFrame, decode_link, encode_link};
use quinn_proto::{ConnectionHandle, Dir, VarInt};
use tracing::{debug, info, warn};

use super::{
    Conn, INBUF_BYTES_MAX, Shard, StreamRead, connection_log_allowed, flush_outbuf, read_chunk,
};
use crate::config::Config;
use crate::mesh::MeshMessage;

/// What a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConnKind {
    /// A client, speaking the client protocol to the session.
    Client,
    /// This shard's link to the edge `peer`.
    LinkOut { peer: EdgeId },
    /// A link another edge opened; `link` is the session's id for it.
    LinkIn { link: u64 },
}

/// The cluster as one shard sees it.
pub(super) struct Cluster {
    edge: EdgeId,
    client_config: quinn_proto::ClientConfig,
    /// `cluster.link_certificates_name_the_edge`: links are bound to the edge their
    /// certificate names.
    names_per_edge: bool,
    /// Every other edge: where to reach it, and this shard's link to it.
    peers: BTreeMap<EdgeId, PeerLink>,
    reconnect_min: Duration,
    reconnect_max: Duration,
    outbound_bytes_max: usize,
}

struct PeerLink {
    address: SocketAddr,
    /// The link's connection, from `connect` until it is gone.
    conn: Option<ConnectionHandle>,
    /// When to open it again, and the backoff after that.
    retry_at: Instant,
    backoff: Duration,
    /// Since when the link has been up: one that lasted `reconnect_max` resets the backoff
    /// when it drops (a peer that accepts the handshake and then closes is redialled slowly).
    up_since: Option<Instant>,
    /// When the peer last said hello on a link it opened to this edge (any shard): it is up.
    peer_hello_at: Option<Instant>,
    /// Before then a peer's hello brings no redial forward (`peer_is_back`), and before
    /// `early_redial_at_drop_from` a link dropped after the peer's hello is not redialled at
    /// the shortest wait (`link_gone`): each once per backoff, so two edges whose links fail
    /// after their hellos do not redial each other at the shortest wait for good. Apart, so
    /// that a hello from before a drop (the peer's last life) does not use up the redial its
    /// restart's hello brings.
    early_redial_from: Instant,
    early_redial_at_drop_from: Instant,
}

/// The session's view of the cluster (`None` for an edge on its own).
pub(super) fn cluster_view(config: &Config) -> Option<ClusterView> {
    let cluster = &config.cluster;
    cluster.enabled().then(|| ClusterView {
        edge: cluster.edge_id,
        members: cluster
            .members
            .iter()
            .map(|member| EdgeMember {
                id: member.id,
                client_address: member.client_address.trim().to_string(),
            })
            .collect(),
    })
}

impl Cluster {
    pub(super) fn new(config: &Config, client_config: quinn_proto::ClientConfig) -> Cluster {
        let cluster = &config.cluster;
        let now = Instant::now();
        let reconnect_min = Duration::from_millis(cluster.link_reconnect_ms_min);
        Cluster {
            edge: cluster.edge_id,
            client_config,
            names_per_edge: cluster.link_certificates_name_the_edge,
            peers: cluster
                .members
                .iter()
                .filter(|member| member.id != cluster.edge_id)
                .map(|member| {
                    let link = PeerLink {
                        address: member.link_address,
                        conn: None,
                        retry_at: now,
                        backoff: reconnect_min,
                        up_since: None,
                        peer_hello_at: None,
                        early_redial_from: now,
                        early_redial_at_drop_from: now,
                    };
                    (member.id, link)
                })
                .collect(),
            reconnect_min,
            reconnect_max: Duration::from_millis(cluster.link_reconnect_ms_max),
            outbound_bytes_max: cluster.link_outbound_bytes_max,
        }
    }
}

impl Cluster {
    /// Connections of links this shard opened (up or still connecting).
    pub(super) fn links_open(&self) -> usize {
        self.peers
            .values()
            .filter(|link| link.conn.is_some())
            .count()
    }

    /// Links this shard opened that are up (their handshake done and `Hello` sent).
    pub(super) fn links_up(&self) -> usize {
        self.peers
            .values()
            .filter(|link| link.up_since.is_some())
            .count()
    }
}

/// The members among `peers` whose link name (`tls::link_name_of`) the peer's certificate
/// carries: the edges a link it opened may say it is.
fn edges_named(quic: &quinn_proto::Connection, peers: impl Iterator<Item = EdgeId>) -> Vec<EdgeId> {
    let certs = quic.crypto_session().peer_identity().and_then(|identity| {
        identity
            .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .ok()
    });
    let Some(leaf) = certs.as_ref().and_then(|certs| certs.first()) else {
        return Vec::new();
    };
    peers
        .filter(|peer| crate::tls::certificate_names(leaf, &crate::tls::link_name_of(*peer)))
        .collect()
}

/// The ALPN the handshake settled on.
fn negotiated_alpn(quic: &quinn_proto::Connection) -> Option<Vec<u8>> {
    let data = quic.crypto_session().handshake_data()?;
    data.downcast::<quinn_proto::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

impl Shard {
    /// Opens the links that are down and due.
    pub(super) fn connect_links(&mut self, now: Instant) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        if self.draining {
            return;
        }
        let mut opened = Vec::new();
        for (peer, link) in &mut cluster.peers {
            if link.conn.is_some() || link.retry_at > now {
                continue;
            }
            // With names per edge, the handshake checks that the peer is the member meant.
            let server_name = if cluster.names_per_edge {
                crate::tls::link_name_of(*peer)
            } else {
                crate::tls::LINK_SERVER_NAME.to_string()
            };
            match self.endpoint.connect(
                now,
                cluster.client_config.clone(),
                link.address,
                &server_name,
            ) {
                Ok((handle, quic)) => {
                    link.conn = Some(handle);
                    opened.push((*peer, handle, quic));
                }
                Err(error) => {
                    warn!(peer, address = %link.address, %error, "cannot open a link");
                    link.retry_at = now + link.backoff;
                    link.backoff = (link.backoff * 2).min(cluster.reconnect_max);
                }
            }
        }
        for (peer, handle, quic) in opened {
            debug!(shard = self.id, peer, "opening a link");
            let generation = self.next_generation;
            self.next_generation += 1;
            self.conns.insert(
                handle,
                Box::new(Conn::new(
                    quic,
                    generation,
                    ConnKind::LinkOut { peer },
                    None,
                )),
            );
            self.process_conn(now, handle);
        }
    }

    /// A connection's handshake finished: a link this shard opened starts its stream with
    /// `Hello`; an accepted connection that negotiated the link ALPN becomes a link if the
    /// peer presented a certificate (the TLS layer checked it against the cluster's CA).
    pub(super) fn link_handshake_done(&mut self, handle: ConnectionHandle, conn: &mut Conn) {
        match conn.kind {
            ConnKind::LinkOut { peer } => {
                let Some(cluster) = self.cluster.as_mut() else {
                    return;
                };
                let Some(stream) = conn.quic.streams().open(Dir::Bi) else {
                    conn.quic.close(
                        Instant::now(),
                        VarInt::from_u32(ErrorCode::Internal.to_u16().into()),
                        Bytes::from_static(b"no stream for the link"),
                    );
                    return;
                };
                conn.stream = Some(stream);
                if let Some(link) = cluster.peers.get_mut(&peer) {
                    link.up_since = Some(Instant::now());
                }
                let hello = LinkFrame::Hello { edge: cluster.edge };
                write_link_frame(conn, &hello);
                info!(edge = cluster.edge, shard = self.id, peer, "link up");
                self.session.link_up(peer);
            }
            ConnKind::Client => {
                if negotiated_alpn(&conn.quic).as_deref() != Some(LINK_ALPN) {
                    return;
                }
                let conn_ref = self.conn_ref(handle, conn);
                // It was opened as a client connection (its ALPN was not known yet).
                self.session.connection_lost(conn_ref);
                if self.cluster.is_none() || conn.quic.crypto_session().peer_identity().is_none() {
                    // Anyone can offer the link protocol: its refusals share the connection
                    // log budget, so a flood of them is not a log flood.
                    if connection_log_allowed(&mut self.connection_logs, &mut self.stats) {
                        warn!(peer = %conn.quic.remote_address(), "a link without a cluster certificate; closing it");
                    }
                    conn.quic.close(
                        Instant::now(),
                        VarInt::from_u32(ErrorCode::Unauthenticated.to_u16().into()),
                        Bytes::from_static(b"a link needs the cluster's certificate"),
                    );
                    conn.closing = true;
                    return;
                }
                let link = conn.generation;
                conn.kind = ConnKind::LinkIn { link };
                self.in_links.insert(link, handle);
                let named = self
                    .cluster
                    .as_ref()
                    .filter(|cluster| cluster.names_per_edge)
                    .map(|cluster| edges_named(&conn.quic, cluster.peers.keys().copied()));
                self.session.open_link(link, named);
                // Its hello is due as a client's is: a link that never says it (a leaked
                // cluster key) held a connection slot for good, kept alive by keep-alives.
                // The hello clears this (`decode_link_frames`).
                let hello_timeout = Duration::from_millis(self.config.limits.hello_timeout_ms);
                conn.close_at = Some(Instant::now() + hello_timeout);
                conn.close_once_connected = Some((
                    ErrorCode::TimedOut,
                    Bytes::from(format!(
                        "no link hello within {} ms",
                        hello_timeout.as_millis()
                    )),
                ));
                debug!(shard = self.id, link, peer = %conn.quic.remote_address(), "link accepted");
            }
            ConnKind::LinkIn { .. } => {}
        }
    }

    /// A link's connection (of `kind`) is gone: the session learns, and a link of this shard
    /// is opened again after its backoff. Called when the connection is lost or drained, and
    /// at once when this shard closes a link itself (so the session stops forwarding on it
    /// and fails what it carried without waiting for the drain). A second call for the same
    /// connection does nothing; a client connection is not a link and is ignored.
    pub(super) fn link_gone(&mut self, handle: ConnectionHandle, kind: ConnKind) {
        match kind {
            ConnKind::Client => {}
            ConnKind::LinkIn { link } => {
                self.in_links.remove(&link);
                self.session.link_closed(link);
            }
            ConnKind::LinkOut { peer } => {
                let Some(cluster) = self.cluster.as_mut() else {
                    return;
                };
                let Some(link) = cluster.peers.get_mut(&peer) else {
                    return;
                };
                if link.conn != Some(handle) {
                    return;
                }
                link.conn = None;
                let now = Instant::now();
                let up_since = link.up_since.take();
                self.metrics.link_failures.inc();
                if up_since.is_some_and(|since| now.duration_since(since) >= cluster.reconnect_max)
                {
                    link.backoff = cluster.reconnect_min;
                }
                // Jitter: links of every shard to a peer that restarted do not come back at once.
                let jitter = rand::random::<f64>() * 0.5 + 0.75;
                let mut wait = link.backoff.mul_f64(jitter);
                // The peer said hello since this link came up (it restarted while the link
                // still looked up): it is there now, so the link is redialled at once, once
                // per backoff.
                let hello_since_up = link
                    .peer_hello_at
                    .is_some_and(|at| up_since.is_none_or(|since| at > since));
                if hello_since_up && now >= link.early_redial_at_drop_from {
                    wait = cluster.reconnect_min.mul_f64(jitter);
                    link.early_redial_at_drop_from = now + link.backoff;
                }
                link.retry_at = now + wait;
                link.backoff = (link.backoff * 2).min(cluster.reconnect_max);
                info!(
                    shard = self.id,
                    peer,
                    retry_in_ms = wait.as_millis() as u64,
                    "link down"
                );
                self.session.link_down(peer);
            }
        }
    }

    /// Writes `frame` on this shard's link to `peer`.
    pub(super) fn write_link_out(&mut self, peer: EdgeId, frame: &LinkFrame) {
        if matches!(frame, LinkFrame::Send { .. }) {
            self.metrics.link_sends_forwarded.inc();
        }
        let handle = self
            .cluster
            .as_ref()
            .and_then(|cluster| cluster.peers.get(&peer))
            .and_then(|link| link.conn);
        match handle {
            Some(handle) => self.write_link(handle, frame),
            // The session hears `link_down` when the connection's loss is processed.
            None => debug!(peer, kind = frame.kind(), "no link to write on"),
        }
    }

    /// Writes `frame` on the link another edge opened as `link`.
    pub(super) fn write_link_in(&mut self, link: u64, frame: &LinkFrame) {
        if let Some(handle) = self.in_links.get(&link).copied() {
            self.write_link(handle, frame);
        }
    }

    fn write_link(&mut self, handle: ConnectionHandle, frame: &LinkFrame) {
        let outbound_bytes_max = self
            .cluster
            .as_ref()
            .map_or(usize::MAX, |c| c.outbound_bytes_max);
        let Some(conn) = self.conns.get_mut(&handle) else {
            return;
        };
        if conn.closing {
            return;
        }
        if matches!(frame, LinkFrame::Signal { .. }) && conn.outbuf.len() >= outbound_bytes_max / 4
        {
            // Signals are ephemeral and have no budget of their own on a link: past a quarter
            // of its outbound bytes they are dropped. Forwarded sends are admitted by their
            // bodies in flight, up to half, so the two together (with the frames' own bytes)
            // stay under the bound, and a flood of signals cannot push the link over it and
            // fail every send it carries.
            self.stats.mesh_messages_dropped += 1;
            self.metrics.mesh_messages_dropped.inc();
            return;
        }
        write_link_frame(conn, frame);
        if conn.outbuf.len() > outbound_bytes_max {
            // The peer does not keep up: start the link over. The session refuses what it
            // carried as retryable once the loss is processed.
            warn!(peer = %conn.quic.remote_address(), bytes = conn.outbuf.len(), "link over its outbound bytes; closing it");
            super::close_now(
                conn,
                ErrorCode::Overloaded,
                Bytes::from_static(b"link over its outbound bytes"),
            );
            let kind = conn.kind;
            self.link_gone(handle, kind);
        }
        self.mark_dirty(handle);
    }

    /// Reads and handles what a link's stream holds, until it is empty or the link's outbound
    /// bytes are at their maximum (then the peer waits, by QUIC flow control).
    pub(super) fn read_link_stream(&mut self, handle: ConnectionHandle, conn: &mut Conn) {
        let Some(id) = conn.stream else {
            return;
        };
        let outbound_bytes_max = self
            .cluster
            .as_ref()
            .map_or(0, |cluster| cluster.outbound_bytes_max);
        loop {
            if conn.closing || conn.parked || conn.outbuf.len() >= outbound_bytes_max {
                return;
            }
            let room = INBUF_BYTES_MAX.saturating_sub(conn.inbuf.len());
            if room == 0 {
                // Cannot happen: the buffer holds one maximal frame, and decoding takes every
                // whole frame. Stop rather than spin on empty reads.
                return;
            }
            let Some(StreamRead { got, finished }) = read_chunk(conn, id, room) else {
                return;
            };
            if got {
                self.decode_link_frames(handle, conn);
            }
            if finished {
                let reason = "link stream finished".into();
                self.close_link(handle, conn, ErrorCode::ShuttingDown, reason);
                return;
            }
            if !got {
                return;
            }
        }
    }

    pub(super) fn decode_link_frames(&mut self, handle: ConnectionHandle, conn: &mut Conn) {
        let now_ms = self.now_ms();
        let mut consumed_total = 0;
        while !conn.closing {
            // Back-pressure, as for a client: the requests wait in `inbuf`, then in QUIC's
            // buffers, and flow control slows the peer.
            if self.park_while_congested(handle, conn) {
                break;
            }
            match decode_link(&conn.inbuf[consumed_total..]) {
                Ok(Some((frame, consumed))) => {
                    consumed_total += consumed;
                    let handled = match conn.kind {
                        ConnKind::LinkIn { link } => {
                            if matches!(frame, LinkFrame::Send { .. }) {
                                self.metrics.link_requests_received.inc();
                            }
                            let hello_from = match frame {
                                LinkFrame::Hello { edge } => Some(edge),
                                _ => None,
                            };
                            let handled = self.session.handle_link_request(now_ms, link, frame);
                            if let (Ok(()), Some(peer)) = (&handled, hello_from) {
                                conn.close_at = None;
                                conn.close_once_connected = None;
                                // Each shard links on its own: tell them all.
                                self.peer_is_back(peer);
                                let own = self.id;
                                for shard in (0..self.shard_count as u8).filter(|s| *s != own) {
                                    self.route(shard, MeshMessage::PeerBack { peer });
                                }
                            }
                            handled
                        }
                        ConnKind::LinkOut { peer } => {
                            self.session.handle_link_answer(now_ms, peer, frame)
                        }
                        ConnKind::Client => Ok(()),
                    };
                    if let Err(reason) = handled {
                        self.close_link(handle, conn, ErrorCode::UnexpectedFrame, reason);
                    }
                }
                Ok(None) => break,
                Err(error) => self.close_link(handle, conn, error.code(), error.to_string()),
            }
        }
        conn.inbuf.drain(..consumed_total.min(conn.inbuf.len()));
        self.mark_dirty_conn(handle, conn);
    }

    /// `peer` opened a link to this edge (it said hello): it is up, so this shard's own link
    /// to it, if down, is tried at the next wake-up, once per backoff (the backoff itself
    /// goes on: a peer whose links keep failing is still redialled more and more slowly). Left
    /// to its backoff (up to `link_reconnect_ms_max`, 30 s, after a peer down for a while),
    /// sends to its users were refused as retryable for that long after it came back, though
    /// it served them. A link that still looks up is redialled at once when it drops
    /// (`link_gone`).
    pub(super) fn peer_is_back(&mut self, peer: EdgeId) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        let Some(link) = cluster.peers.get_mut(&peer) else {
            return;
        };
        let now = Instant::now();
        link.peer_hello_at = Some(now);
        if link.conn.is_none() && now >= link.early_redial_from && link.retry_at > now {
            link.retry_at = now;
            link.early_redial_from = now + link.backoff;
        }
    }

    fn close_link(
        &mut self,
        handle: ConnectionHandle,
        conn: &mut Conn,
        code: ErrorCode,
        reason: String,
    ) {
        warn!(shard = self.id, peer = %conn.quic.remote_address(), ?code, reason, "closing a link");
        conn.quic.close(
            Instant::now(),
            VarInt::from_u32(code.to_u16().into()),
            Bytes::from(reason.into_bytes()),
        );
        conn.closing = true;
        conn.inbuf.clear();
        self.link_gone(handle, conn.kind);
    }

    /// The edge is shutting down: its links close now, so peers fail what they carried at
    /// once instead of after the links' idle timeout.
    pub(super) fn close_links(&mut self) {
        let handles: Vec<ConnectionHandle> = self
            .conns
            .iter()
            .filter(|(_, conn)| conn.kind != ConnKind::Client)
            .map(|(handle, _)| *handle)
            .collect();
        for handle in handles {
            if let Some(conn) = self.conns.get_mut(&handle) {
                conn.quic.close(
                    Instant::now(),
                    VarInt::from_u32(ErrorCode::ShuttingDown.to_u16().into()),
                    Bytes::from_static(b"the edge is shutting down"),
                );
                conn.closing = true;
                let kind = conn.kind;
                self.link_gone(handle, kind);
            }
            self.mark_dirty(handle);
        }
    }

    /// Marks a connection that is out of the map (being processed) for a flush.
    fn mark_dirty_conn(&mut self, handle: ConnectionHandle, conn: &mut Conn) {
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(handle);
        }
    }
}

/// Queues a link frame on the connection's stream and writes what flow control allows.
fn write_link_frame(conn: &mut Conn, frame: &LinkFrame) {
    if conn.stream.is_none() {
        return;
    }
    if let Err(error) = encode_link(frame, &mut conn.outbuf) {
        warn!(%error, kind = frame.kind(), "cannot encode a link frame: this is a bug");
        return;
    }
    flush_outbuf(conn);
}
