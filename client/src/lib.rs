//! The Courier client SDK (quinn + tokio).
//!
//! A [`Connector`] holds the QUIC endpoint and TLS settings; keep one per process so later
//! connections can resume the TLS session and send their first frames as 0-RTT data. A
//! [`Client`] is one logged-in device. Its protocol logic is
//! [`courier_protocol::client::ClientSession`] (sans-IO, the same type the simulation drives);
//! this crate is the I/O around it:
//!
//! - [`Client::send`] stores a message durably: it retries under the same client message id until
//!   the server's `SendAck`, across reconnects, so a message is stored exactly once. Sends go out
//!   in the order they were made, at most `sends_in_flight_max` unanswered at a time.
//! - [`Client::recv`] yields deliveries in sequence order, each once. Holes the server declares
//!   (messages acknowledged elsewhere, expired) are skipped; a gap it did not declare makes the
//!   client sync.
//! - Only what the application took is acknowledged: with [`ConnectOptions::auto_ack`] a
//!   delivery is acked when [`Client::recv`] hands it out, otherwise by [`Client::ack`].
//!   Deliveries still buffered in the SDK are never acked for the application.
//! - A lost connection is re-established with jittered exponential backoff (capped at
//!   [`ConnectOptions::reconnect_backoff_max`], 2 s by default). `Hello` carries what the device
//!   holds (delivery resumes after it) apart from what it consumed (the server may delete that).
//! - [`Client::close`] (or dropping the client) sends the last ack before it closes (when the
//!   client had no connection then, over one made for it, given at most a second, written
//!   again if the edge rejects its 0-RTT and taken to the edge a `Goaway` names), and a
//!   closed client never reconnects; [`Client::recv`] hands out nothing after it.
//! - When the client stops on its own (a fatal error from the edge, such as an expired token,
//!   or a lost connection with [`ConnectOptions::reconnect`] off), [`Client::recv`] returns
//!   `None` and [`Client::error`] says why. Deliveries it had buffered are not handed out
//!   (their acks could no longer be sent): they come again at the next login.
//! - A new connection sends few datagrams: path MTU discovery probes 1,452 bytes first (one
//!   probe where quinn's search takes four), and the TLS key exchange is ring's unless the
//!   application passes other groups ([`Connector::with_key_exchange_groups`]; `courier-bench`
//!   passes aws-lc-rs's, which are faster).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use courier_protocol::client::{
    ClientConfig, ClientEvent, ClientSession, SendRefused, SessionError,
};
pub use courier_protocol::client::{Delivery, SendReceipt};
use courier_protocol::{ErrorCode, Frame, SignalKind};
pub use quinn::ConnectionStats;
use quinn::crypto::rustls::QuicClientConfig;
/// The TLS library whose types [`Connector::with_key_exchange_groups`] takes.
pub use rustls;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::debug;

/// Errors the SDK reports. Each says whether trying again can help.
///
/// A send that fails with `Shutdown`, `Closed`, `Connect`, `Protocol` or `Unconfirmed` was not
/// acknowledged, but it may have been stored all the same: it was written, and the connection
/// ended before its receipt came. Sending it again under a new id (what [`Sender::send`] picks)
/// may then deliver it twice. An application that must not duplicate sends with
/// [`Sender::send_with_id`] and retries under the same id; within the edge's dedupe window (24 h
/// by default) the server answers a retry of a stored message with its first receipt
/// (`Unconfirmed` says that window may have passed). `Refused` is always a refusal: nothing was
/// stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("server closed the connection: {code:?}: {reason}")]
    Closed {
        code: Option<ErrorCode>,
        reason: String,
    },
    #[error("server refused the message: {0:?}")]
    Refused(ErrorCode),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the client was closed")]
    Shutdown,
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The edge sent the client to its user's home edge (`Goaway { reconnect_to }`). The
    /// client follows by itself; `connect` reports this when the edges kept redirecting
    /// (more than four times in a row: they disagree about where the user lives), or when
    /// `to` does not resolve.
    #[error(
        "redirected to {to} (the edges disagree about this user's home, or it does not resolve)"
    )]
    Redirected { to: String },
    /// The send was written and no answer came within
    /// [`ConnectOptions::send_retry_window`]: it may have been stored, or not, and it is not
    /// written again (past the edge's dedupe window a retry is stored as a second copy).
    #[error(
        "the send was not confirmed within the retry window: it may or may not have been \
         stored, and a retry now could store it twice"
    )]
    Unconfirmed,
}

impl ClientError {
    /// The server's error code, when the server gave one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Closed { code, .. } => *code,
            ClientError::Refused(code) => Some(*code),
            _ => None,
        }
    }
}

/// Something for the application: a stored message or an ephemeral signal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Message(Delivery),
    Signal {
        from: u64,
        kind: SignalKind,
        payload: Vec<u8>,
    },
}

/// The QUIC endpoint and TLS configuration, shared by connections so they can resume.
#[derive(Debug, Clone)]
pub struct Connector {
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    roots: Arc<rustls::RootCertStore>,
    server_name: String,
    transport: Transport,
}

/// The settings a [`Connector`] builds its TLS and QUIC configuration from.
#[derive(Debug, Clone)]
struct Transport {
    keep_alive: Duration,
    edge_ack_delay: Duration,
    key_exchange_groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
}

/// How long the SDK lets the edge delay its acknowledgements by default (QUIC ACK frequency
/// extension): QUIC's own default, so a lost packet is recovered as quickly as without the
/// extension. [`Connector::with_edge_ack_delay`] trades that for fewer datagrams.
pub const EDGE_ACK_DELAY_DEFAULT: Duration = Duration::from_millis(25);

/// The longest acknowledgement delay the SDK asks of the edge: a lost packet of the client
/// waits this much more to be resent, and quinn stretches the idle timeout to three probe
/// timeouts, so a longer one would also delay noticing a dead edge. The edge has the same bound.
const ACK_DELAY_MAX: Duration = Duration::from_secs(1);

/// How often an idle connection sends a keep-alive. It is also how soon an idle client learns
/// that a restarted edge forgot its connection (the edge answers the keep-alive with a
/// stateless reset, and the client reconnects), so with 2 s an idle client is back within about
/// 2 s of a crashed edge listening again. This SDK serves agents and servers; a phone app
/// would pick a longer interval (radio time, idle traffic at scale) and accept slower
/// detection: [`Connector::with_keep_alive`].
pub const KEEP_ALIVE_DEFAULT: Duration = Duration::from_secs(2);

/// The key exchange groups the client offers by default, X25519 first: ring's, which build
/// without a C toolchain ([`Connector::with_key_exchange_groups`] takes others).
fn key_exchange_groups_default() -> Vec<&'static dyn rustls::crypto::SupportedKxGroup> {
    use rustls::crypto::ring::kx_group;
    vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1]
}

/// TLS 1.3 with ALPN `courier/2`, early data on, and a fresh session cache.
fn client_config(
    roots: &Arc<rustls::RootCertStore>,
    transport_settings: &Transport,
) -> Result<quinn::ClientConfig, ClientError> {
    // AES-128-GCM/SHA-256 first: cheaper than rustls's default AES-256/SHA-384 on both ends
    // (SHA-256 runs on the CPU's SHA extensions); the edge prefers it too.
    use rustls::crypto::ring::cipher_suite;
    let provider = Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        kx_groups: transport_settings.key_exchange_groups.clone(),
        ..rustls::crypto::ring::default_provider()
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Config(e.to_string()))?
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    tls.alpn_protocols = vec![courier_protocol::ALPN.to_vec()];
    tls.enable_early_data = true;
    let quic = QuicClientConfig::try_from(Arc::new(tls))
        .map_err(|e| ClientError::Config(e.to_string()))?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(transport_settings.keep_alive));
    // No QUIC DATAGRAM frames: the protocol has no use for them, and a server could otherwise
    // fill quinn's queue of unread ones (1.25 MB by default) in every client.
    transport.datagram_receive_buffer_size(None);
    // Let the edge acknowledge our packets in its next answer (a `SendAck`, a delivery)
    // instead of an ACK-only datagram; loss recovery waits up to this much longer.
    let mut ack_frequency = quinn::AckFrequencyConfig::default();
    ack_frequency
        .max_ack_delay(Some(transport_settings.edge_ack_delay))
        .ack_eliciting_threshold(quinn::VarInt::from_u32(4));
    transport.ack_frequency_config(Some(ack_frequency));
    transport.mtu_discovery_config(Some(mtu_discovery()));
    client_config.transport_config(Arc::new(transport));
    Ok(client_config)
}

/// The largest UDP payload path MTU discovery looks for: what fits a 1,500-byte Ethernet MTU
/// over IPv6 (quinn's default bound).
const MTU_PROBE_BYTES_MAX: u16 = 1452;

/// The smallest payload QUIC allows (RFC 9000), which every path carries.
const MTU_BYTES_MIN: u16 = 1200;

/// Path MTU discovery that probes the Ethernet size first. quinn's default binary search takes
/// four probes from 1,200 to 1,452 bytes (1,326, 1,389, 1,420, 1,452), and the edge
/// acknowledges each one at once in a datagram of its own: a third of a new connection's
/// datagrams. quinn probes the upper bound as soon as the next midpoint is closer to the last
/// success than `minimum_change`; with that set just above the first step, the first probe is
/// 1,452 bytes, and where it gets through (any path of a 1,500-byte MTU) the search ends there.
/// A path that drops it (a tunnel, PPPoE) loses three tries of it, then gets up to three tries
/// at 1,325 bytes and keeps 1,325 or 1,200: up to about 95 bytes per packet less than the full
/// search would find there, which would also have taken more probes.
fn mtu_discovery() -> quinn::MtuDiscoveryConfig {
    let mut config = quinn::MtuDiscoveryConfig::default();
    config
        .upper_bound(MTU_PROBE_BYTES_MAX)
        .minimum_change((MTU_PROBE_BYTES_MAX - MTU_BYTES_MIN) / 2 + 1);
    config
}

impl Connector {
    /// A connector that trusts the PEM certificates in `trusted_pem` (for example the edge's
    /// development certificate) and checks the server's name against `server_name`.
    pub fn new(trusted_pem: &[u8], server_name: &str) -> Result<Connector, ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut &trusted_pem[..]) {
            let cert = cert
                .map_err(|e| ClientError::Config(format!("trusted certificate is not PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| ClientError::Config(format!("cannot trust certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(ClientError::Config("no trusted certificate given".into()));
        }
        let roots = Arc::new(roots);
        let transport = Transport {
            keep_alive: KEEP_ALIVE_DEFAULT,
            edge_ack_delay: EDGE_ACK_DELAY_DEFAULT,
            key_exchange_groups: key_exchange_groups_default(),
        };
        let client_config = client_config(&roots, &transport)?;
        let endpoint = quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0)))
            .map_err(|e| ClientError::Config(format!("cannot bind a UDP socket: {e}")))?;
        Ok(Connector {
            endpoint,
            client_config,
            roots,
            server_name: server_name.to_string(),
            transport,
        })
    }

    /// A connector on the same socket with an empty TLS session cache: its next connection
    /// makes a full handshake, like a freshly installed app.
    pub fn fresh_session(&self) -> Result<Connector, ClientError> {
        self.with_transport(self.transport.clone())
    }

    /// A connector on the same socket whose connections send a keep-alive every `interval`
    /// when idle ([`KEEP_ALIVE_DEFAULT`]: 2 s), with an empty TLS session cache. After an edge
    /// crash, an idle client notices at its next keep-alive; a client that sends notices at
    /// once.
    pub fn with_keep_alive(&self, interval: Duration) -> Result<Connector, ClientError> {
        self.with_transport(Transport {
            keep_alive: interval,
            ..self.transport.clone()
        })
    }

    /// A connector on the same socket whose connections let the edge delay acknowledging
    /// their packets by up to `delay` ([`EDGE_ACK_DELAY_DEFAULT`]: 25 ms), with an empty TLS
    /// session cache. A client that sends again within the delay carries the edge's
    /// acknowledgement in the answer to it instead of an ACK-only datagram: an agent sending
    /// several messages a second saves a datagram per message. In exchange a lost packet of
    /// this client is resent up to `delay` later. At most 1 s.
    pub fn with_edge_ack_delay(&self, delay: Duration) -> Result<Connector, ClientError> {
        if delay.is_zero() || delay > ACK_DELAY_MAX {
            return Err(ClientError::Config(format!(
                "edge acknowledgement delay {delay:?}: give between 1 ms and {ACK_DELAY_MAX:?}"
            )));
        }
        self.with_transport(Transport {
            edge_ack_delay: delay,
            ..self.transport.clone()
        })
    }

    /// A connector on the same socket that offers the edge `groups` for the TLS key exchange,
    /// in order of preference, with an empty TLS session cache. By default the SDK offers
    /// ring's X25519, P-256 and P-384, which build without a C toolchain. An application that
    /// builds aws-lc-rs (rustls's `aws_lc_rs` feature, through [`rustls`] re-exported here)
    /// can pass `rustls::crypto::aws_lc_rs::kx_group`'s instead: about half the CPU of the
    /// key exchange (docs/decisions/0017). The edge accepts X25519, P-256 and P-384. A client
    /// sends a key share for its first group only: if the edge does not accept that one, every
    /// full handshake takes an extra round trip (a HelloRetryRequest).
    pub fn with_key_exchange_groups(
        &self,
        groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
    ) -> Result<Connector, ClientError> {
        if groups.is_empty() {
            return Err(ClientError::Config(
                "no key exchange group given: pass one the edge accepts (X25519, P-256 or P-384)"
                    .into(),
            ));
        }
        self.with_transport(Transport {
            key_exchange_groups: groups,
            ..self.transport.clone()
        })
    }

    fn with_transport(&self, transport: Transport) -> Result<Connector, ClientError> {
        Ok(Connector {
            endpoint: self.endpoint.clone(),
            client_config: client_config(&self.roots, &transport)?,
            roots: self.roots.clone(),
            server_name: self.server_name.clone(),
            transport,
        })
    }

    /// Moves the endpoint to a new local socket (a phone changing networks). Open
    /// connections migrate to it.
    pub fn rebind(&self, socket: std::net::UdpSocket) -> std::io::Result<()> {
        self.endpoint.rebind(socket)
    }

    /// The endpoint's local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Connects and logs in.
    pub async fn connect(&self, options: ConnectOptions) -> Result<Client, ClientError> {
        Client::connect(self.clone(), options).await
    }

    /// The QUIC and TLS configuration this connector's connections use, for tools that drive
    /// quinn-proto themselves on the same settings (the load generator's `--driver direct`).
    pub fn quic_client_config(&self) -> quinn::ClientConfig {
        self.client_config.clone()
    }

    /// The name the server's certificate is checked against.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }
}

/// How a client connects and behaves.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub addr: SocketAddr,
    /// Token minted for this user and device (`courier-edge token`).
    pub token: String,
    pub device: u32,
    /// The highest sequence number this device's application already consumed (and keeps,
    /// for example in its database): delivery starts after it, and the server may delete up to
    /// it. 0 for a fresh install.
    pub resume_after_seq: u64,
    /// Ack each delivery when [`Client::recv`] hands it out. Off: the application acks with
    /// [`Client::ack`], and nothing is acked for it, across reconnects too. The edge gives a
    /// connection at most `limits.deliveries_unacked_per_connection_max` (1,024) messages not
    /// acknowledged and then waits for an ack: acking less often than that stops delivery.
    pub auto_ack: bool,
    /// Reconnect when the connection is lost, with jittered exponential backoff between these
    /// bounds (each at least 10 ms, whatever is given: `courier_protocol::client::WAIT_MIN_MS`).
    pub reconnect: bool,
    pub reconnect_backoff_min: Duration,
    pub reconnect_backoff_max: Duration,
    /// Wait this long before retrying a send the server refused with a retryable error
    /// (`Overloaded`, `StoreUnavailable`, ...); each further refusal of the same send doubles
    /// the wait, up to `retry_after_max`, and retries are spread over the second half of it.
    /// Both at least 10 ms.
    pub retry_after: Duration,
    pub retry_after_max: Duration,
    /// Sends written and not yet answered; the rest wait in the client. At most the server's
    /// `limits.sends_in_flight_per_connection_max` (256 by default).
    pub sends_in_flight_max: usize,
    /// Sends queued or in flight; beyond it `send` fails with `Refused(TooManyInFlight)`.
    pub sends_pending_max: usize,
    /// Bytes of the bodies of sends queued or in flight; beyond it `send` fails with
    /// `Refused(TooManyInFlight)` too.
    pub sends_pending_bytes_max: usize,
    /// Deliveries buffered for the application: the client stops reading the connection
    /// once it holds more (the read that passes it may add what one read holds, at most
    /// `READ_CHUNK_BYTES`, 64 KiB, of frames). Receipts of sends and signals come on the same
    /// stream; the edge gives a connection at most
    /// `limits.deliveries_unacked_per_connection_max` (1,024) messages not acknowledged, so
    /// with a buffer at least that large a slow application does not hold up its own sends'
    /// receipts. With a smaller one (or the edge's limit raised past
    /// it), or after a reconnect while the buffer still holds deliveries from before, `send`
    /// may wait for its receipt until the application takes its deliveries
    /// ([`Client::recv`]).
    pub deliveries_buffered_max: usize,
    /// Messages to send in the connection's first flight, right after `Hello` (as 0-RTT data
    /// when the connector resumes a session). Wait for their receipts with
    /// [`Client::early_receipts`].
    pub early_sends: Vec<EarlySend>,
    /// A connection whose handshake and `Welcome` take longer is given up and another is
    /// tried; after a redirect, at the first address. Without it a resumed session to an edge
    /// that is gone (0-RTT needs no answer to start) would wait for QUIC's idle timeout.
    pub welcome_timeout: Duration,
    /// A send written and not answered this long after its first write (on the wall clock,
    /// which counts the device's sleep) is not written again: it fails with
    /// [`ClientError::Unconfirmed`]. The edge recognizes a retry only within its dedupe window
    /// (`retention.dedupe_window_secs`, 24 h by default); past it a retry is stored as a second
    /// copy. 23 h by default: keep it below the edge's window, by more than the clocks of the
    /// device and the edge may differ. The window is this client's: an app that keeps its
    /// own outbox across restarts and sends its entries again under their ids
    /// ([`Sender::send_with_id`]) starts a new window each time, so it must keep each entry's
    /// first attempt time and stop resending past the same bound itself.
    pub send_retry_window: Duration,
}

/// A message sent in the first flight of a connection.
#[derive(Debug, Clone)]
pub struct EarlySend {
    pub client_id: u64,
    pub to: u64,
    pub body: Vec<u8>,
}

impl ConnectOptions {
    pub fn new(addr: SocketAddr, token: impl Into<String>, device: u32) -> ConnectOptions {
        ConnectOptions {
            addr,
            token: token.into(),
            device,
            resume_after_seq: 0,
            auto_ack: true,
            reconnect: true,
            reconnect_backoff_min: Duration::from_millis(50),
            reconnect_backoff_max: Duration::from_secs(2),
            retry_after: Duration::from_millis(200),
            retry_after_max: Duration::from_secs(5),
            sends_in_flight_max: 256,
            sends_pending_max: 100_000,
            sends_pending_bytes_max: 64 * 1024 * 1024,
            deliveries_buffered_max: 4096,
            early_sends: Vec::new(),
            welcome_timeout: Duration::from_secs(10),
            send_retry_window: Duration::from_secs(23 * 3_600),
        }
    }

    /// Refuses options whose `Hello` the protocol's limits would refuse (the checks every
    /// frame passes, `Frame::check_limits`): without it the link would end with a protocol
    /// error at its first frame.
    fn check(&self) -> Result<(), ClientError> {
        Frame::Hello {
            token: self.token.as_bytes().to_vec(),
            device: self.device,
            acked_up_to: self.resume_after_seq,
            resume_after_seq: self.resume_after_seq,
        }
        .check_limits()
        .map_err(|error| {
            ClientError::Config(format!(
                "connect options: {error} (the token and device `courier-edge token` printed \
                 fit)"
            ))
        })
    }

    /// The protocol session's settings these options make, for tools that drive
    /// [`ClientSession`] themselves (the load generator's `--driver direct`).
    pub fn session_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new(self.token.as_bytes().to_vec(), self.device);
        config.sends_in_flight_max = self.sends_in_flight_max.max(1);
        config.sends_pending_max = self.sends_pending_max.max(1);
        config.sends_pending_bytes_max = self.sends_pending_bytes_max.max(1);
        config.retry_after_ms = self.retry_after.as_millis() as u64;
        config.retry_after_max_ms = self.retry_after_max.as_millis() as u64;
        config.reconnect_backoff_min_ms = self.reconnect_backoff_min.as_millis() as u64;
        config.reconnect_backoff_max_ms = self.reconnect_backoff_max.as_millis() as u64;
        config.send_retry_window_ms = self.send_retry_window.as_millis() as u64;
        config
    }
}

/// Unix milliseconds by the wall clock, which goes on while the device sleeps (the driver's
/// monotonic clock stops then, on Linux and Android): what a send's retry window is timed by.
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// What the application side can see of the driver's state.
#[derive(Debug, Default)]
struct Shared {
    received_up_to: u64,
    pending_sends: usize,
    zero_rtt_accepted: Option<bool>,
    connections: u64,
    closed: Option<ClientError>,
    /// The QUIC connection in use, for its statistics; taken out when the link ends
    /// (`PublishedConnection`), so this handle keeps no finished connection open.
    connection: Option<quinn::Connection>,
    /// The statistics of the last connection, kept when it ended.
    last_stats: Option<quinn::ConnectionStats>,
}

type Waiter = oneshot::Sender<Result<SendReceipt, ClientError>>;

enum Command {
    Send {
        client_id: u64,
        to: u64,
        body: Vec<u8>,
        ttl_secs: Option<u32>,
        waiter: Waiter,
    },
    Signal {
        peer: u64,
        kind: SignalKind,
        payload: Vec<u8>,
    },
}

/// Sends and signals the application may have handed to the driver and it has not taken yet:
/// past it `send` waits for room and a signal is dropped. (While a connection is being set
/// up, up to `welcome_timeout`, the driver takes none.)
const COMMANDS_QUEUED_MAX: usize = 1024;

/// What the application asks of the driver that is never dropped nor queued: the highest ack
/// and whether to close. One value, however often the application asks.
#[derive(Debug, Default, Clone, Copy)]
struct Control {
    ack_up_to: u64,
    close: bool,
}

/// One logged-in device.
pub struct Client {
    sender: Sender,
    control: watch::Sender<Control>,
    /// The highest seq [`Client::recv`] handed to the application (from the start, what it
    /// consumed before: `resume_after_seq`): an ack never goes past it.
    handed_up_to: std::sync::atomic::AtomicU64,
    incoming: mpsc::Receiver<Incoming>,
    auto_ack: bool,
    user: u64,
    early_receipts: Vec<oneshot::Receiver<Result<SendReceipt, ClientError>>>,
}

/// The sending half of a [`Client`]: cheap to clone, shareable between tasks. It stops working
/// (with [`ClientError::Shutdown`]) when its `Client` is dropped.
#[derive(Clone)]
pub struct Sender {
    shared: Arc<Mutex<Shared>>,
    commands: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sender")
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Client {
    async fn connect(connector: Connector, options: ConnectOptions) -> Result<Client, ClientError> {
        options.check()?;
        let mut session = ClientSession::new(options.session_config(), options.resume_after_seq);
        let mut waiters: HashMap<u64, Vec<Waiter>> = HashMap::new();
        let mut early_receipts = Vec::new();
        for early in &options.early_sends {
            let (tx, rx) = oneshot::channel();
            session
                .send(early.client_id, early.to, early.body.clone(), None)
                .map_err(refusal_error)?;
            waiters.entry(early.client_id).or_default().push(tx);
            early_receipts.push(rx);
        }
        let shared = Arc::new(Mutex::new(Shared {
            received_up_to: options.resume_after_seq,
            ..Shared::default()
        }));
        let (commands_tx, commands_rx) = mpsc::channel(COMMANDS_QUEUED_MAX);
        let (control_tx, control_rx) = watch::channel(Control::default());
        let (channel_max, _) = delivery_buffers(options.deliveries_buffered_max);
        let (incoming_tx, incoming_rx) = mpsc::channel(channel_max);
        let (welcomed_tx, welcomed_rx) = oneshot::channel();
        let driver = Driver {
            connector,
            options: options.clone(),
            session,
            waiters,
            shared: shared.clone(),
            commands: commands_rx,
            control: control_rx,
            incoming: incoming_tx,
            to_app: VecDeque::new(),
            started: Instant::now(),
            welcomed: Some(welcomed_tx),
            redirects: 0,
            first_addr: options.addr,
        };
        tokio::spawn(driver.run());
        let user = welcomed_rx.await.map_err(|_| ClientError::Shutdown)??;
        Ok(Client {
            sender: Sender {
                shared,
                commands: commands_tx,
            },
            control: control_tx,
            handed_up_to: std::sync::atomic::AtomicU64::new(options.resume_after_seq),
            incoming: incoming_rx,
            auto_ack: options.auto_ack,
            user,
            early_receipts,
        })
    }

    /// The user this client is logged in as.
    pub fn user(&self) -> u64 {
        self.user
    }

    /// A handle for sending from other tasks.
    pub fn sender(&self) -> Sender {
        self.sender.clone()
    }

    /// Sends `body` to `to` and waits until the server has stored it durably.
    pub async fn send(
        &self,
        to: u64,
        body: impl Into<Vec<u8>>,
    ) -> Result<SendReceipt, ClientError> {
        self.sender.send(to, body).await
    }

    /// Sends with a chosen client message id; see [`Sender::send_with_id`].
    pub async fn send_with_id(
        &self,
        client_id: u64,
        to: u64,
        body: impl Into<Vec<u8>>,
        ttl_secs: Option<u32>,
    ) -> Result<SendReceipt, ClientError> {
        self.sender
            .send_with_id(client_id, to, body, ttl_secs)
            .await
    }

    /// The receipts of [`ConnectOptions::early_sends`], in order, once each is stored.
    pub async fn early_receipts(&mut self) -> Vec<Result<SendReceipt, ClientError>> {
        let mut receipts = Vec::new();
        for receiver in std::mem::take(&mut self.early_receipts) {
            receipts.push(receiver.await.unwrap_or(Err(ClientError::Shutdown)));
        }
        receipts
    }

    /// The next message or signal, in sequence order; `None` once the client is closed or
    /// has stopped ([`Client::error`] says why). With `auto_ack`, handing out a message
    /// acknowledges it.
    pub async fn recv(&mut self) -> Option<Incoming> {
        // What the driver buffered before a close, or before a fatal error stopped it, would
        // be handed out with acks that no longer go anywhere, and delivered again at the
        // next login: an application that keeps no state of its own could not tell. Not
        // handed out, those messages come once at the next login.
        if self.control.borrow().close {
            return None;
        }
        // A stopped driver has dropped its end of the channel: with nothing buffered `recv`
        // reads `None` here, and what it buffered is not handed out (below).
        let incoming = self.incoming.recv().await?;
        if self.error().is_some() {
            return None;
        }
        if let Incoming::Message(delivery) = &incoming {
            self.handed_up_to
                .fetch_max(delivery.seq, std::sync::atomic::Ordering::Relaxed);
            if self.auto_ack {
                self.ack(delivery.seq);
            }
        }
        Some(incoming)
    }

    /// The next stored message, skipping signals.
    pub async fn recv_message(&mut self) -> Option<Delivery> {
        loop {
            match self.recv().await? {
                Incoming::Message(delivery) => return Some(delivery),
                Incoming::Signal { .. } => continue,
            }
        }
    }

    /// Acknowledges every message up to `up_to_seq`, at most what [`Client::recv`] handed out
    /// (or `resume_after_seq`); the server deletes them once every device of the user
    /// acknowledged them.
    pub fn ack(&self, up_to_seq: u64) {
        // Clamped now, to what the application was handed: the value stays, and applied
        // later it would also cover deliveries that arrived since and were never handed out.
        let handed = self.handed_up_to.load(std::sync::atomic::Ordering::Relaxed);
        let up_to_seq = up_to_seq.min(handed);
        self.control
            .send_modify(|control| control.ack_up_to = control.ack_up_to.max(up_to_seq));
    }

    /// Sends an ephemeral signal (typing, presence) to `peer`; dropped if the peer is offline,
    /// this client is between connections, or the driver has not taken the last
    /// `COMMANDS_QUEUED_MAX` (1,024) sends and signals yet.
    pub fn signal(&self, peer: u64, kind: SignalKind, payload: Vec<u8>) {
        let _ = self.sender.commands.try_send(Command::Signal {
            peer,
            kind,
            payload,
        });
    }

    /// The highest sequence number received (handed to the application's buffer, or skipped
    /// as a declared hole).
    pub fn last_seq(&self) -> u64 {
        self.sender
            .shared
            .lock()
            .expect("client state")
            .received_up_to
    }

    /// Whether the server accepted the latest connection's 0-RTT data (`None`: no 0-RTT was
    /// attempted).
    pub fn zero_rtt_accepted(&self) -> Option<bool> {
        self.sender
            .shared
            .lock()
            .expect("client state")
            .zero_rtt_accepted
    }

    /// QUIC's counters of the connection in use (or, between connections, of the last one):
    /// datagrams, packets and frames each way, round-trip time. `None` before the first
    /// connection.
    pub fn transport_stats(&self) -> Option<quinn::ConnectionStats> {
        let shared = self.sender.shared.lock().expect("client state");
        match &shared.connection {
            Some(connection) => Some(connection.stats()),
            None => shared.last_stats,
        }
    }

    /// Why the client stopped, once it has: what a waiting send was failed with (a fatal
    /// error from the edge such as `TokenExpired`, `Unauthenticated` or `Disconnected`, a
    /// connection lost with reconnects off, or [`ClientError::Shutdown`] after
    /// [`Client::close`]). `None` while it runs. An application that only receives learns
    /// here why [`Client::recv`] returned `None`: a new token or a new login may be needed.
    pub fn error(&self) -> Option<ClientError> {
        self.sender.stopped()
    }

    /// Connections welcomed so far, including reconnects.
    pub fn connections(&self) -> u64 {
        self.sender.shared.lock().expect("client state").connections
    }

    /// Sends not yet acknowledged by the server.
    pub fn pending_sends(&self) -> usize {
        self.sender
            .shared
            .lock()
            .expect("client state")
            .pending_sends
    }

    /// Sends the last ack, then closes the connection; pending sends fail with
    /// [`ClientError::Shutdown`] (those already written may have been stored all the same:
    /// see [`ClientError::Shutdown`]). The client never reconnects afterwards.
    pub fn close(&self) {
        self.control.send_modify(|control| control.close = true);
    }
}

impl Sender {
    /// Sends `body` to `to` and waits until the server has stored it durably.
    pub async fn send(
        &self,
        to: u64,
        body: impl Into<Vec<u8>>,
    ) -> Result<SendReceipt, ClientError> {
        let client_id = loop {
            let id: u64 = rand::random();
            if id != 0 {
                break id;
            }
        };
        self.send_with_id(client_id, to, body, None).await
    }

    /// Sends with a chosen client message id (unique per sender), for callers that persist
    /// their outbox and must retry with the same id after a restart. A second call with an id
    /// already stored is answered with the first copy's receipt, within the edge's dedupe
    /// window (24 h by default; past it the message is stored again).
    pub async fn send_with_id(
        &self,
        client_id: u64,
        to: u64,
        body: impl Into<Vec<u8>>,
        ttl_secs: Option<u32>,
    ) -> Result<SendReceipt, ClientError> {
        if let Some(error) = self.stopped() {
            return Err(error);
        }
        let (waiter, answer) = oneshot::channel();
        self.commands
            .send(Command::Send {
                client_id,
                to,
                body: body.into(),
                ttl_secs,
                waiter,
            })
            .await
            .map_err(|_| self.stopped().unwrap_or(ClientError::Shutdown))?;
        answer
            .await
            .map_err(|_| self.stopped().unwrap_or(ClientError::Shutdown))?
    }

    /// Why the client stopped, once it has. A send whose waiter the stopped driver dropped
    /// untaken answers with it, not `Shutdown`: an application renews its token on
    /// `TokenExpired`, not on a close it did not make.
    fn stopped(&self) -> Option<ClientError> {
        self.shared.lock().expect("client state").closed.clone()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.control.send_modify(|control| control.close = true);
    }
}

fn refusal_error(refused: SendRefused) -> ClientError {
    match refused {
        SendRefused::ReservedId
        | SendRefused::NoRecipient
        | SendRefused::TtlTooLong(_)
        | SendRefused::BodyTooLarge(_) => ClientError::Config(refused.to_string()),
        SendRefused::QueueFull => ClientError::Refused(ErrorCode::TooManyInFlight),
        SendRefused::Closed => ClientError::Shutdown,
    }
}

fn session_error(error: SessionError) -> ClientError {
    match error {
        SessionError::Closed { code, reason } => ClientError::Closed {
            code: Some(code),
            reason,
        },
        SessionError::Goaway {
            reconnect_to: Some(to),
            ..
        } => ClientError::Redirected { to },
        SessionError::Goaway { reason, .. } => ClientError::Closed {
            code: Some(ErrorCode::ShuttingDown),
            reason,
        },
        SessionError::Unexpected(kind) => {
            ClientError::Protocol(format!("unexpected {kind} from the server"))
        }
    }
}

/// Errors after which reconnecting cannot help.
fn is_fatal(error: &ClientError) -> bool {
    error
        .code()
        .is_some_and(courier_protocol::client::is_fatal_code)
        || matches!(error, ClientError::Config(_) | ClientError::Protocol(_))
}

/// Bytes of encoded frames the driver buffers for the stream; past it, it stops taking frames
/// from the session until the stream drains.
const OUTBUF_BYTES_MAX: usize = 1024 * 1024;
/// How long a close waits for the server to take the last frames (the last ack).
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the client waits for the connection to close after the server ended, reset or
/// stopped the protocol stream, before closing it itself.
const STREAM_END_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Most bytes taken from the stream at a time; quinn usually hands over less (about one packet).
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// One QUIC connection with its protocol stream. The driver reads and writes the stream
/// itself (quinn's `read_chunk` and `write` are cancel-safe), so no other task ever holds it: after
/// a rejected 0-RTT the new stream reuses the old one's id, and a second reader would race
/// for its data.
struct Link {
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// Bytes read and not yet decoded: at most one partial frame between reads.
    inbuf: Vec<u8>,
    /// Bytes of frames not yet written to `send`.
    outbuf: Vec<u8>,
    /// Bytes at the front of `outbuf` that finish a frame already partly written; whole
    /// frames follow them.
    outbuf_front_rest: usize,
}

impl Link {
    /// `written` bytes from the front of `outbuf` went to the stream.
    fn wrote(&mut self, written: usize) {
        let written = written.min(self.outbuf.len());
        // The first frame boundary at or past what was written.
        let mut boundary = self.outbuf_front_rest;
        while boundary < written {
            boundary += encoded_frame_bytes(&self.outbuf[boundary..]);
        }
        self.outbuf.drain(..written);
        self.outbuf_front_rest = boundary - written;
    }

    /// Takes the `Send` frames not yet written, none of whose bytes went out, out of `outbuf`;
    /// the rest of a frame partly written stays, so that the stream stays whole.
    fn drop_unwritten_sends(&mut self) {
        let mut kept = self.outbuf[..self.outbuf_front_rest].to_vec();
        let mut at = self.outbuf_front_rest;
        while at < self.outbuf.len() {
            let frame_bytes = encoded_frame_bytes(&self.outbuf[at..]);
            let frame = &self.outbuf[at..at + frame_bytes];
            if !matches!(
                courier_protocol::decode(frame),
                Ok(Some((Frame::Send { .. }, _)))
            ) {
                kept.extend_from_slice(frame);
            }
            at += frame_bytes;
        }
        self.outbuf = kept;
    }

    async fn open(
        connector: &Connector,
        options: &ConnectOptions,
    ) -> Result<(Link, Option<quinn::ZeroRttAccepted>), ClientError> {
        let connecting = connector
            .endpoint
            .connect_with(
                connector.client_config.clone(),
                options.addr,
                &connector.server_name,
            )
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let (connection, zero_rtt) = match connecting.into_0rtt() {
            Ok((connection, accepted)) => (connection, Some(accepted)),
            Err(connecting) => (
                connecting.await.map_err(|e| map_connection_error(&e))?,
                None,
            ),
        };
        let link = Link::on_new_stream(connection).await?;
        Ok((link, zero_rtt))
    }

    async fn on_new_stream(connection: quinn::Connection) -> Result<Link, ClientError> {
        let (send, recv) = connection
            .open_bi()
            .await
            .map_err(|e| map_connection_error(&e))?;
        Ok(Link {
            connection,
            send,
            recv,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            outbuf_front_rest: 0,
        })
    }

    /// Why the connection ended, after the server ended, reset or stopped the stream. The
    /// edge closes the connection right after (a `Goaway` comes first); a server that leaves
    /// it open (keep-alives would hold it forever) has it closed here after `wait`, and the
    /// client reconnects.
    async fn lost(&self, wait: Duration) -> ClientError {
        match tokio::time::timeout(wait, self.connection.closed()).await {
            Ok(error) => map_connection_error(&error),
            Err(_) => {
                self.connection.close(0u32.into(), b"stream ended");
                ClientError::Connect(
                    "the server ended the protocol stream but not the connection".into(),
                )
            }
        }
    }
}

/// Owns the session and drives it over one connection after another.
struct Driver {
    connector: Connector,
    options: ConnectOptions,
    session: ClientSession,
    waiters: HashMap<u64, Vec<Waiter>>,
    shared: Arc<Mutex<Shared>>,
    commands: mpsc::Receiver<Command>,
    /// The application's acks and close.
    control: watch::Receiver<Control>,
    incoming: mpsc::Sender<Incoming>,
    /// Events for the application waiting for room in `incoming`.
    to_app: VecDeque<Incoming>,
    started: Instant,
    /// Until the first `Welcome`: where `Client::connect` waits for the outcome.
    welcomed: Option<oneshot::Sender<Result<u64, ClientError>>>,
    /// Redirects followed since the last `Welcome`: more than `REDIRECTS_MAX` is a loop
    /// (edges that disagree about the cluster, as in a rolling restart). Before the first
    /// `Welcome` it fails `connect`; after it, the client waits its backoff and starts over.
    redirects: usize,
    /// The address the application gave. After a redirect the client connects where it was
    /// sent; if that edge cannot be reached, it goes back here, and this edge redirects it to
    /// whoever serves its user now (another edge may have taken a dead one's users over).
    first_addr: SocketAddr,
}

fn welcome_timed_out(timeout: Duration) -> ClientError {
    ClientError::Connect(format!(
        "no Welcome within {} ms (ConnectOptions::welcome_timeout)",
        timeout.as_millis()
    ))
}

/// The link's connection, visible to `Client::transport_stats` while the link runs. Dropped
/// when `run_link` ends in any way (returns, or its task is cancelled or panics), it takes the
/// handle back out and keeps the connection's last statistics: quinn closes a connection when
/// its last handle goes, so a handle left in `Shared` would keep a finished one open.
struct PublishedConnection {
    shared: Arc<Mutex<Shared>>,
}

impl PublishedConnection {
    fn new(shared: &Arc<Mutex<Shared>>, connection: &quinn::Connection) -> PublishedConnection {
        shared.lock().expect("client state").connection = Some(connection.clone());
        PublishedConnection {
            shared: shared.clone(),
        }
    }
}

impl Drop for PublishedConnection {
    fn drop(&mut self) {
        // Not `expect`: this may run while a panic unwinds, and a poisoned lock still holds
        // the handle to give back.
        let mut shared = self
            .shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(connection) = shared.connection.take() {
            shared.last_stats = Some(connection.stats());
        }
    }
}

/// Redirects a client follows in a row before it gives up.
const REDIRECTS_MAX: usize = 4;

enum LinkEnd {
    /// The application closed the client (or dropped it).
    Closed,
    Lost(ClientError),
}

/// Commands (sends, signals) the driver applies in one pass of its loop, at most.
const COMMANDS_PER_PASS_MAX: usize = 256;

impl Driver {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    async fn run(mut self) {
        loop {
            let welcome_by = tokio::time::Instant::now() + self.options.welcome_timeout;
            let opened =
                tokio::time::timeout_at(welcome_by, Link::open(&self.connector, &self.options))
                    .await
                    .unwrap_or_else(|_| Err(welcome_timed_out(self.options.welcome_timeout)));
            let end = match opened {
                Ok((link, zero_rtt)) => self.run_link(link, zero_rtt, welcome_by).await,
                Err(error) => LinkEnd::Lost(error),
            };
            // What the link's last read brought before it ended (a `SendAck` in the same read
            // as a `Goaway`) goes to its owners now, not after the next `Welcome`, and never
            // as a failure: the send is stored.
            self.take_events();
            let unreachable = matches!(&end, LinkEnd::Lost(error)
                if !matches!(error, ClientError::Redirected { .. }));
            // No `Welcome` on a connection to an edge it was redirected to: that edge is gone
            // or going. The first address leads to one that is up, which redirects again.
            let back_to_first =
                unreachable && !self.session.is_active() && self.options.addr != self.first_addr;
            let error = match end {
                LinkEnd::Closed => {
                    self.fail(ClientError::Shutdown);
                    return;
                }
                LinkEnd::Lost(error) => error,
            };
            // A redirect on a link that was welcomed (a `Goaway`) waits the reconnect backoff:
            // edges that disagree on the user's home cannot bounce the client at full speed.
            let redirected_after_welcome = self.session.is_active();
            let now = self.now();
            if error.code() == Some(ErrorCode::TimedOut) {
                self.session.disconnected_unhealthy(now);
            } else {
                self.session.disconnected(now);
            }
            if back_to_first {
                debug!(%error, "the edge redirected to is unreachable; back to the first address");
                self.options.addr = self.first_addr;
                if self.welcomed.is_some() && !is_fatal(&error) {
                    // Still in `connect`: go on at once; the redirect count bounds the rounds.
                    continue;
                }
            }
            let error = match error {
                ClientError::Redirected { to } => match self.follow_redirect(&to).await {
                    Ok(()) => {
                        if redirected_after_welcome {
                            let delay = self.session.reconnect_delay_ms(rand::random());
                            if self.wait_or_close(Duration::from_millis(delay)).await {
                                self.flush_acks_at_close().await;
                                self.fail(ClientError::Shutdown);
                                return;
                            }
                        }
                        continue;
                    }
                    Err(error) => error,
                },
                error => error,
            };
            if let Some(welcomed) = self.welcomed.take() {
                // The first connection failed: `connect` reports it.
                let _ = welcomed.send(Err(error.clone()));
                self.fail(error);
                return;
            }
            debug!(%error, "connection lost");
            if !self.options.reconnect || is_fatal(&error) {
                self.fail(error);
                return;
            }
            let delay = self.session.reconnect_delay_ms(rand::random());
            if self.wait_or_close(Duration::from_millis(delay)).await {
                self.flush_acks_at_close().await;
                self.fail(ClientError::Shutdown);
                return;
            }
        }
    }

    /// Points the next connection at `to` (`host:port`), the edge the server redirected to.
    async fn follow_redirect(&mut self, to: &str) -> Result<(), ClientError> {
        self.redirects += 1;
        if self.redirects > REDIRECTS_MAX {
            // Start over after the backoff: the edges may agree by then.
            self.redirects = 0;
            return Err(ClientError::Redirected { to: to.to_string() });
        }
        let addr = match to.parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => tokio::net::lookup_host(to)
                .await
                .ok()
                .and_then(|mut addrs| addrs.next())
                .ok_or_else(|| ClientError::Redirected { to: to.to_string() })?,
        };
        debug!(%addr, "redirected to the user's home edge");
        self.options.addr = addr;
        Ok(())
    }

    /// Sleeps for `delay` while taking commands and handing buffered deliveries to the
    /// application; returns true if the application closed the client meanwhile.
    async fn wait_or_close(&mut self, delay: Duration) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            let incoming = self.incoming.clone();
            tokio::select! {
                _ = &mut sleep => return false,
                command = self.commands.recv() => {
                    if self.apply(command) {
                        return true;
                    }
                }
                changed = self.control.changed() => {
                    if self.apply_control(changed.is_err()) {
                        return true;
                    }
                }
                permit = incoming.reserve(), if !self.to_app.is_empty() => match permit {
                    Ok(permit) => self.hand_to_app(permit),
                    Err(_) => {
                        self.close_session();
                        return true;
                    }
                }
            }
        }
    }

    /// Hands the oldest buffered event to the application through `permit`, and whatever
    /// else fits now: a pass of the driver's loop per delivery polled every branch and set up
    /// a timer each time.
    fn hand_to_app(&mut self, permit: mpsc::Permit<'_, Incoming>) {
        if let Some(incoming) = self.to_app.pop_front() {
            permit.send(incoming);
        }
        while !self.to_app.is_empty() {
            let Ok(permit) = self.incoming.try_reserve() else {
                break;
            };
            if let Some(incoming) = self.to_app.pop_front() {
                permit.send(incoming);
            }
        }
    }

    /// Applies the application's latest ack, and its close; returns true when the client is
    /// to close (also when the `Client` is gone: `client_gone`).
    fn apply_control(&mut self, client_gone: bool) -> bool {
        let control = *self.control.borrow_and_update();
        if control.close || client_gone {
            self.close_session();
            return true;
        }
        let now = self.now();
        self.session.ack(now, control.ack_up_to);
        self.publish();
        false
    }

    /// Closes the session with the application's last ack queued to go out; pending sends
    /// fail with `Shutdown`.
    fn close_session(&mut self) {
        let now = self.now();
        let ack_up_to = self.control.borrow().ack_up_to;
        self.session.ack(now, ack_up_to);
        for client_id in self.session.close() {
            for waiter in self.waiters.remove(&client_id).unwrap_or_default() {
                let _ = waiter.send(Err(ClientError::Shutdown));
            }
        }
    }

    /// Applies one command to the session; returns true when the client is to close (every
    /// sending handle is gone).
    fn apply(&mut self, command: Option<Command>) -> bool {
        match command {
            None => {
                self.close_session();
                return true;
            }
            Some(Command::Send {
                client_id,
                to,
                body,
                ttl_secs,
                waiter,
            }) => match self.session.send(client_id, to, body, ttl_secs) {
                Ok(()) => {
                    // A caller that gave up on an earlier call with this id (a timeout) left
                    // its waiter behind: retried forever, they would pile up.
                    let waiters = self.waiters.entry(client_id).or_default();
                    waiters.retain(|waiter| !waiter.is_closed());
                    waiters.push(waiter);
                }
                Err(refused) => {
                    let _ = waiter.send(Err(refusal_error(refused)));
                }
            },
            Some(Command::Signal {
                peer,
                kind,
                payload,
            }) => {
                self.session.signal(peer, kind, payload);
            }
        }
        self.publish();
        false
    }

    /// Hands the session's events to their owners and mirrors its state for the getters.
    fn take_events(&mut self) {
        while let Some(event) = self.session.poll_event() {
            match event {
                ClientEvent::Welcome { user, .. } => {
                    self.redirects = 0;
                    self.shared.lock().expect("client state").connections += 1;
                    if let Some(welcomed) = self.welcomed.take() {
                        let _ = welcomed.send(Ok(user));
                    }
                }
                ClientEvent::Message(delivery) => {
                    self.to_app.push_back(Incoming::Message(delivery))
                }
                ClientEvent::Signal {
                    from,
                    kind,
                    payload,
                } => {
                    // Signals are ephemeral: dropped when the application is behind.
                    let _ = self.incoming.try_send(Incoming::Signal {
                        from,
                        kind,
                        payload,
                    });
                }
                ClientEvent::Hole {
                    after_seq,
                    up_to_seq,
                } => debug!(
                    after_seq,
                    up_to_seq, "the server declared a hole; skipping it"
                ),
                ClientEvent::SendDone { client_id, result } => {
                    // The server never refuses a send with `TimedOut`: it is the session's
                    // retry window.
                    let result = result.map_err(|code| match code {
                        ErrorCode::TimedOut => ClientError::Unconfirmed,
                        code => ClientError::Refused(code),
                    });
                    for waiter in self.waiters.remove(&client_id).unwrap_or_default() {
                        let _ = waiter.send(result.clone());
                    }
                }
            }
        }
        self.publish();
    }

    fn publish(&self) {
        let mut shared = self.shared.lock().expect("client state");
        shared.received_up_to = self.session.received_up_to();
        shared.pending_sends = self.session.pending_sends();
    }

    /// Encodes the session's frames into the link's buffer, up to its bound.
    fn take_transmits(&mut self, link: &mut Link) -> Result<(), ClientError> {
        self.take_transmits_up_to(link, OUTBUF_BYTES_MAX)
    }

    /// Encodes the session's frames into the link's buffer while it holds less than
    /// `bytes_max`. After [`ClientSession::close`] the session holds only control frames (its
    /// last ack, or a `Hello` carrying it), and `close_link` takes them all, past the bound,
    /// so that a buffer full of sends cannot keep the last ack out.
    fn take_transmits_up_to(
        &mut self,
        link: &mut Link,
        bytes_max: usize,
    ) -> Result<(), ClientError> {
        self.session.set_wall_clock(wall_clock_ms());
        while link.outbuf.len() < bytes_max {
            let Some(frame) = self.session.poll_transmit() else {
                break;
            };
            courier_protocol::encode(&frame, &mut link.outbuf)
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
        }
        // A send past its retry window ends here (`Unconfirmed`): its caller learns it now.
        self.take_events();
        Ok(())
    }

    /// The application closed the client while it had no connection. Acks it made that the
    /// server is not known to hold (made while down, or written to a connection that then
    /// broke) would be lost, and their messages delivered again at the next login, perhaps
    /// to an application that no longer recognises them. One connection, within
    /// `CLOSE_FLUSH_TIMEOUT`, carries them in its `Hello`.
    async fn flush_acks_at_close(&mut self) {
        if !self.session.acks_unconfirmed() {
            return;
        }
        let attempt = async {
            // The edge reached first, and the one it names if it is not the user's home (an
            // edge that redirects applies no ack of the `Hello`).
            for _ in 0..2 {
                let (mut link, zero_rtt) = Link::open(&self.connector, &self.options).await.ok()?;
                let now = self.now();
                self.session.connected(now);
                if let Some(accepted) = zero_rtt {
                    // Rejected 0-RTT data is discarded, the `Hello` with it.
                    let by = tokio::time::Instant::now() + CLOSE_FLUSH_TIMEOUT;
                    link = self.first_flight_as_0rtt(link, accepted, by).await.ok()?;
                }
                match self.flush_link(link).await {
                    None => return Some(()),
                    Some(to) => self.follow_redirect(&to).await.ok()?,
                }
            }
            Some(())
        };
        if tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, attempt)
            .await
            .is_err()
        {
            debug!("closed without a connection, and none carried the last ack in time");
        }
    }

    /// Writes the first flight (the `Hello`) as 0-RTT data and waits, until `by`, for the
    /// server's verdict: rejected 0-RTT data is discarded, the stream with it, and the flight
    /// is written again on a new stream. Returns the link to go on with.
    async fn first_flight_as_0rtt(
        &mut self,
        mut link: Link,
        accepted: quinn::ZeroRttAccepted,
        by: tokio::time::Instant,
    ) -> Result<Link, ClientError> {
        let welcome_timeout = self.options.welcome_timeout;
        let timed_out = || welcome_timed_out(welcome_timeout);
        self.take_transmits(&mut link)?;
        // Bounded too: a gone edge never opens the stream window the first flight may need.
        // (A failed write shows in what the link reads next.)
        let _ = tokio::time::timeout_at(by, link.send.write_all(&link.outbuf))
            .await
            .map_err(|_| timed_out())?;
        link.wrote(link.outbuf.len());
        let accepted = tokio::time::timeout_at(by, accepted)
            .await
            .map_err(|_| timed_out())?;
        self.shared.lock().expect("client state").zero_rtt_accepted = Some(accepted);
        if accepted {
            return Ok(link);
        }
        // Streams opened in rejected 0-RTT data are gone: start over on a new one, after
        // letting go of the old one (the server allows one stream at a time).
        let connection = link.connection.clone();
        drop(link);
        let link = Link::on_new_stream(connection).await?;
        let now = self.now();
        self.session.connected(now);
        Ok(link)
    }

    async fn run_link(
        &mut self,
        mut link: Link,
        zero_rtt: Option<quinn::ZeroRttAccepted>,
        welcome_by: tokio::time::Instant,
    ) -> LinkEnd {
        let welcome_timeout = self.options.welcome_timeout;
        let now = self.now();
        self.session.connected(now);
        let _published = PublishedConnection::new(&self.shared, &link.connection);
        if let Some(accepted) = zero_rtt {
            link = match self.first_flight_as_0rtt(link, accepted, welcome_by).await {
                Ok(link) => link,
                Err(error) => return LinkEnd::Lost(error),
            };
        }
        loop {
            self.take_events();
            if let Err(error) = self.take_transmits(&mut link) {
                return LinkEnd::Lost(error);
            }
            let timeout = self.session.poll_timeout();
            let sleep_for =
                timeout.map(|due| Duration::from_millis(due.saturating_sub(self.now())));
            // A full buffer stops reading (the server's flow control then holds its
            // deliveries, and this connection's receipts and signals behind them), but not
            // before the link's `Welcome`: the buffer outlives a reconnect, and a link that
            // could not read its `Welcome` would time out and reconnect forever.
            let (_, to_app_max) = delivery_buffers(self.options.deliveries_buffered_max);
            let app_has_room = self.to_app.len() < to_app_max || !self.session.is_active();
            let incoming = self.incoming.clone();
            tokio::select! {
                // quinn hands over its own buffer (no copy); frames are decoded from it.
                read = link.recv.read_chunk(READ_CHUNK_BYTES, true), if app_has_room => {
                    let chunk = match read {
                        Ok(Some(chunk)) => chunk,
                        Ok(None) | Err(_) => return LinkEnd::Lost(link.lost(STREAM_END_CLOSE_WAIT).await),
                    };
                    if let Err(error) = self.handle_input(&mut link, &chunk.bytes) {
                        return LinkEnd::Lost(error);
                    }
                }
                written = link.send.write(&link.outbuf), if !link.outbuf.is_empty() => {
                    match written {
                        Ok(written) => link.wrote(written),
                        Err(error) => {
                            debug!(%error, "stream write failed");
                            return LinkEnd::Lost(link.lost(STREAM_END_CLOSE_WAIT).await);
                        }
                    }
                }
                permit = incoming.reserve(), if !self.to_app.is_empty() => {
                    match permit {
                        Ok(permit) => self.hand_to_app(permit),
                        // The application dropped its client: close as it asked.
                        Err(_) => {
                            self.close_session();
                            return self.close_link(link).await;
                        }
                    }
                }
                _ = async { tokio::time::sleep(sleep_for.unwrap_or_default()).await }, if sleep_for.is_some() => {
                    let now = self.now();
                    self.session.handle_timeout(now);
                }
                _ = tokio::time::sleep_until(welcome_by), if !self.session.is_active() => {
                    return LinkEnd::Lost(welcome_timed_out(welcome_timeout));
                }
                changed = self.control.changed() => {
                    if self.apply_control(changed.is_err()) {
                        return self.close_link(link).await;
                    }
                }
                command = self.commands.recv() => {
                    if self.apply(command) {
                        return self.close_link(link).await;
                    }
                    // The commands that queued meanwhile, in the same pass, up to a bound so
                    // reads and writes still get their turn.
                    for _ in 0..COMMANDS_PER_PASS_MAX {
                        let Ok(command) = self.commands.try_recv() else {
                            break;
                        };
                        if self.apply(Some(command)) {
                            return self.close_link(link).await;
                        }
                    }
                }
            }
        }
    }

    /// Hands every whole frame of `data` to the session (see [`take_frames`]).
    fn handle_input(&mut self, link: &mut Link, data: &[u8]) -> Result<(), ClientError> {
        // One clock read per read, not per frame: the session counts in milliseconds.
        let now = self.now();
        take_frames(&mut link.inbuf, data, |frame| {
            self.session.handle_frame(now, frame).map_err(session_error)
        })
    }

    /// [`Driver::close_link`] for the connection opened only to carry the last ack: the
    /// server's answer is read until it closes the connection. Returns where a `Goaway` sends
    /// the client (the edge is not the user's home, and applied no ack), or `None` once the
    /// server has closed without one.
    async fn flush_link(&mut self, mut link: Link) -> Option<String> {
        let _ = self.write_last(&mut link).await;
        let mut redirect = None;
        while let Ok(Some(chunk)) = link.recv.read_chunk(READ_CHUNK_BYTES, true).await {
            let read = take_frames(&mut link.inbuf, &chunk.bytes, |frame| {
                if let Frame::Goaway {
                    reconnect_to: Some(to),
                    ..
                } = frame
                {
                    redirect = Some(to);
                }
                Ok(())
            });
            if read.is_err() || redirect.is_some() {
                break;
            }
        }
        link.connection.close(0u32.into(), b"client closed");
        redirect
    }

    /// Writes what is left (the session's last ack), finishes the stream, and waits briefly for
    /// the server to close the connection after reading it.
    async fn close_link(&mut self, mut link: Link) -> LinkEnd {
        if !self.session.is_active() {
            // Not welcomed yet: an edge that is not the user's home answers the `Hello` with a
            // `Goaway` and applies none of its acks. The link is read to its end for that
            // answer (`flush_link`), and a redirect is followed as after a close without a
            // connection (`flush_acks_at_close`).
            let redirect = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, self.flush_link(link)).await;
            if let Ok(Some(to)) = redirect
                && self.follow_redirect(&to).await.is_ok()
            {
                let now = self.now();
                self.session.disconnected(now);
                self.flush_acks_at_close().await;
            }
            return LinkEnd::Closed;
        }
        let flush = async {
            self.write_last(&mut link).await?;
            link.connection.closed().await;
            Some(())
        };
        let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, flush).await;
        link.connection.close(0u32.into(), b"client closed");
        LinkEnd::Closed
    }

    /// Writes what is left at a close (the session's last ack) and finishes the stream.
    async fn write_last(&mut self, link: &mut Link) -> Option<()> {
        // The sends still in the buffer failed with `Shutdown`: written now, they could be
        // stored after their callers were told otherwise.
        link.drop_unwritten_sends();
        self.take_transmits_up_to(link, usize::MAX).ok()?;
        link.send.write_all(&link.outbuf).await.ok()?;
        link.send.finish().ok()
    }

    /// Ends the client: every waiting send gets `error`, later calls get it too. Sends already
    /// answered (the session holds their events) get their answers first.
    fn fail(&mut self, error: ClientError) {
        self.take_events();
        for client_id in self.session.close() {
            for waiter in self.waiters.remove(&client_id).unwrap_or_default() {
                let _ = waiter.send(Err(error.clone()));
            }
        }
        for (_, waiters) in self.waiters.drain() {
            for waiter in waiters {
                let _ = waiter.send(Err(error.clone()));
            }
        }
        if let Some(welcomed) = self.welcomed.take() {
            let _ = welcomed.send(Err(error.clone()));
        }
        // Sends handed over but not taken yet read this too (`Sender::stopped`) when their
        // waiters are dropped with the driver.
        let mut shared = self.shared.lock().expect("client state");
        shared.closed = Some(error);
        shared.pending_sends = 0;
    }
}

/// `deliveries_buffered_max` split between the channel [`Client::recv`] reads (it takes from
/// it without waking the driver) and the driver's own queue, which reading stops filling once
/// full: the two together, not each, hold the configured figure, and reading stops only past
/// it. So a buffer as large as the edge's window of unacknowledged deliveries holds all of
/// them and still reads the receipts behind them.
fn delivery_buffers(deliveries_buffered_max: usize) -> (usize, usize) {
    let channel_max = (deliveries_buffered_max / 2).max(1);
    let to_app_max = deliveries_buffered_max.saturating_sub(channel_max) + 1;
    (channel_max, to_app_max)
}

async fn write_frame(send: &mut quinn::SendStream, frame: &Frame) -> Result<(), ClientError> {
    let bytes =
        courier_protocol::encode_to_vec(frame).map_err(|e| ClientError::Protocol(e.to_string()))?;
    send.write_all(&bytes)
        .await
        .map_err(|e| ClientError::Connect(format!("write failed: {e}")))
}

fn map_connection_error(error: &quinn::ConnectionError) -> ClientError {
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => ClientError::Closed {
            code: u16::try_from(close.error_code.into_inner())
                .ok()
                .and_then(ErrorCode::from_u16),
            reason: String::from_utf8_lossy(&close.reason).into_owned(),
        },
        other => ClientError::Connect(other.to_string()),
    }
}

/// Raw access to a connection's protocol stream, for tests and tools that must send bytes a
/// well-behaved client never would (garbage, oversized frames, bad tokens).
pub mod raw {
    use super::*;

    /// A connection whose stream carries whatever the caller writes.
    #[derive(Debug)]
    pub struct RawConnection {
        pub connection: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        buffer: Vec<u8>,
    }

    impl RawConnection {
        /// Connects and opens the protocol stream, sending nothing.
        pub async fn connect(
            connector: &Connector,
            addr: SocketAddr,
        ) -> Result<RawConnection, ClientError> {
            let connection = connector
                .endpoint
                .connect_with(
                    connector.client_config.clone(),
                    addr,
                    &connector.server_name,
                )
                .map_err(|e| ClientError::Connect(e.to_string()))?
                .await
                .map_err(|e| map_connection_error(&e))?;
            let (send, recv) = connection
                .open_bi()
                .await
                .map_err(|e| map_connection_error(&e))?;
            Ok(RawConnection {
                connection,
                send,
                recv,
                buffer: Vec::new(),
            })
        }

        pub async fn write_bytes(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
            self.send
                .write_all(bytes)
                .await
                .map_err(|e| ClientError::Connect(format!("write failed: {e}")))
        }

        pub async fn write_frame(&mut self, frame: &Frame) -> Result<(), ClientError> {
            write_frame(&mut self.send, frame).await
        }

        /// Ends the stream's sending half, as a client closing gracefully does after its
        /// last frames; the server's answers can still be read.
        pub fn finish(&mut self) -> Result<(), ClientError> {
            self.send
                .finish()
                .map_err(|e| ClientError::Connect(format!("finish failed: {e}")))
        }

        /// The next frame from the server, or the error that closed the connection.
        pub async fn read_frame(&mut self) -> Result<Frame, ClientError> {
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                match courier_protocol::decode(&self.buffer) {
                    Ok(Some((frame, consumed))) => {
                        self.buffer.drain(..consumed);
                        return Ok(frame);
                    }
                    Ok(None) => {}
                    Err(error) => return Err(ClientError::Protocol(error.to_string())),
                }
                match self.recv.read(&mut chunk).await {
                    Ok(Some(read)) => self.buffer.extend_from_slice(&chunk[..read]),
                    Ok(None) | Err(_) => return Err(self.closed().await),
                }
            }
        }

        /// Waits until the server closes the connection and returns why.
        pub async fn closed(&self) -> ClientError {
            map_connection_error(&self.connection.closed().await)
        }

        /// The connection and its stream's halves, to write and read from separate tasks.
        pub fn into_parts(self) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
            (self.connection, self.send, self.recv)
        }
    }

    /// The first datagram of a handshake with `addr` (a QUIC Initial carrying a TLS
    /// ClientHello), as a client would send it, from a connection that will never send
    /// another: for handshake-flood tests.
    pub fn initial_datagram(
        connector: &Connector,
        addr: SocketAddr,
    ) -> Result<Vec<u8>, ClientError> {
        let mut endpoint = quinn_proto::Endpoint::new(
            Arc::new(quinn_proto::EndpointConfig::default()),
            None,
            false,
            None,
        );
        let now = Instant::now();
        let (_handle, mut connection) = endpoint
            .connect(
                now,
                connector.client_config.clone(),
                addr,
                &connector.server_name,
            )
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let mut buf = Vec::new();
        let transmit = connection
            .poll_transmit(now, 1, &mut buf)
            .ok_or_else(|| ClientError::Connect("no initial packet".into()))?;
        buf.truncate(transmit.size);
        Ok(buf)
    }
}

/// Hands every whole frame of `data` to `on_frame`, after the frame the previous read split
/// (buffered in `inbuf`), and buffers the frame split at its end; stops at the first error.
/// The length of the frame `buf` starts with, as this SDK encoded it: its prefix and body, or
/// all of `buf` where that cannot be read (never for the SDK's own frames).
fn encoded_frame_bytes(buf: &[u8]) -> usize {
    match courier_protocol::peek_length(buf) {
        Ok(Some(body)) => (courier_protocol::LENGTH_PREFIX_BYTES + body).min(buf.len()),
        _ => buf.len(),
    }
}

/// Only split frames are copied; the rest is decoded where quinn left it. quinn hands over
/// about one packet per read, so most reads finish or split a frame.
fn take_frames(
    inbuf: &mut Vec<u8>,
    mut data: &[u8],
    mut on_frame: impl FnMut(Frame) -> Result<(), ClientError>,
) -> Result<(), ClientError> {
    let protocol_error =
        |error: courier_protocol::DecodeError| ClientError::Protocol(error.to_string());
    // Finish the split frame with only the bytes it still lacks: its length prefix first,
    // which is checked as soon as it is whole.
    while !inbuf.is_empty() {
        let body_bytes = courier_protocol::peek_length(inbuf).map_err(protocol_error)?;
        let wanted = courier_protocol::LENGTH_PREFIX_BYTES + body_bytes.unwrap_or(0);
        if body_bytes.is_some() && inbuf.len() == wanted {
            let decoded = courier_protocol::decode(inbuf).map_err(protocol_error)?;
            inbuf.clear();
            if let Some((frame, _)) = decoded {
                on_frame(frame)?;
            }
            break;
        }
        if data.is_empty() {
            return Ok(());
        }
        let take = (wanted - inbuf.len()).min(data.len());
        inbuf.extend_from_slice(&data[..take]);
        data = &data[take..];
    }
    let mut consumed_total = 0;
    let result = loop {
        match courier_protocol::decode(&data[consumed_total..]) {
            Ok(Some((frame, consumed))) => {
                consumed_total += consumed;
                if let Err(error) = on_frame(frame) {
                    break Err(error);
                }
            }
            Ok(None) => break Ok(()),
            Err(error) => break Err(protocol_error(error)),
        }
    };
    inbuf.extend_from_slice(&data[consumed_total..]);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames cut at every possible place, as quinn's reads cut a stream, come out whole, in
    /// order and once each; a split length prefix, a split body and a read holding several
    /// frames and the start of the next are all among the cuts.
    #[test]
    fn frames_split_across_reads_come_out_whole_and_in_order() {
        let frames: Vec<Frame> = (0..40u64)
            .map(|i| Frame::Ping { nonce: i })
            .chain((0..20usize).map(|i| Frame::SendAck {
                client_id: 1 + i as u64,
                seq: 1000 + i as u64,
                server_time_ms: 7,
            }))
            .collect();
        let mut stream = Vec::new();
        for frame in &frames {
            courier_protocol::encode(frame, &mut stream).expect("encode");
        }
        // Reads of every size from 1 byte to past the whole stream, in turn.
        for read_bytes in 1..=stream.len() + 1 {
            let (mut inbuf, mut taken) = (Vec::new(), Vec::new());
            for data in stream.chunks(read_bytes) {
                take_frames(&mut inbuf, data, |frame| {
                    taken.push(frame);
                    Ok(())
                })
                .expect("valid frames");
            }
            assert!(
                inbuf.is_empty(),
                "reads of {read_bytes} B left bytes buffered"
            );
            assert_eq!(taken, frames, "reads of {read_bytes} B");
        }
    }

    /// A read that ends inside a frame whose length prefix is too large fails with a protocol
    /// error instead of buffering it.
    #[test]
    fn an_oversized_split_frame_is_refused() {
        let prefix = u32::try_from(courier_protocol::FRAME_BYTES_MAX + 1).expect("fits");
        let mut inbuf = Vec::new();
        let first = take_frames(&mut inbuf, &prefix.to_be_bytes()[..2], |_| Ok(()));
        assert!(first.is_ok(), "half a prefix waits for the rest");
        let error = take_frames(&mut inbuf, &prefix.to_be_bytes()[2..], |_| Ok(()))
            .expect_err("an oversized frame");
        assert!(matches!(error, ClientError::Protocol(_)), "{error:?}");
    }

    fn connector() -> Connector {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()])
            .expect("a self-signed certificate");
        Connector::new(certified.cert.pem().as_bytes(), "localhost").expect("connector")
    }

    /// An empty list of key exchange groups is refused with an error that says what to pass;
    /// a list is taken, and the connector's other settings carry over both ways.
    #[tokio::test]
    async fn key_exchange_groups_are_checked_and_kept() {
        let connector = connector();
        let error = connector
            .with_key_exchange_groups(Vec::new())
            .expect_err("no group at all");
        assert!(error.to_string().contains("X25519"), "{error}");

        let p256_only = connector
            .with_edge_ack_delay(Duration::from_millis(5))
            .expect("ack delay")
            .with_key_exchange_groups(vec![rustls::crypto::ring::kx_group::SECP256R1])
            .expect("one group");
        assert_eq!(p256_only.transport.key_exchange_groups.len(), 1);
        assert_eq!(p256_only.transport.edge_ack_delay, Duration::from_millis(5));
        let later = p256_only
            .with_keep_alive(Duration::from_secs(3))
            .expect("keep-alive");
        assert_eq!(later.transport.key_exchange_groups.len(), 1);
        assert_eq!(later.transport.keep_alive, Duration::from_secs(3));
        assert_eq!(
            connector.transport.key_exchange_groups.len(),
            3,
            "the default"
        );
    }
}

/// The driver against a scripted server: a quinn endpoint that answers with the frames a test
/// chooses, for what the edge never does (two answers in one write, a stream ended without a
/// close) but another server, or a middlebox, may.
#[cfg(test)]
mod scripted_server_tests {
    use super::*;

    struct Scripted {
        endpoint: quinn::Endpoint,
        connector: Connector,
        server: quinn::ServerConfig,
        certified: rcgen::CertifiedKey,
    }

    /// A server configuration for `certified`'s certificate, with its own session cache:
    /// with `early_data`, it takes 0-RTT from a client resuming a session it issued.
    fn server_config(
        certified: &rcgen::CertifiedKey,
        transport: quinn::TransportConfig,
        early_data: bool,
    ) -> quinn::ServerConfig {
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(vec![certified.cert.der().clone()], key)
            .expect("certificate and key");
        tls.alpn_protocols = vec![courier_protocol::ALPN.to_vec()];
        if early_data {
            tls.max_early_data_size = u32::MAX;
        }
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))
            .expect("a QUIC server configuration");
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(transport));
        server
    }

    impl Scripted {
        fn start() -> Scripted {
            Scripted::start_with(quinn::TransportConfig::default())
        }

        fn start_with(transport: quinn::TransportConfig) -> Scripted {
            Scripted::serving(transport, false)
        }

        fn serving(transport: quinn::TransportConfig, early_data: bool) -> Scripted {
            let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()])
                .expect("a self-signed certificate");
            let server = server_config(&certified, transport, early_data);
            let endpoint = quinn::Endpoint::server(server.clone(), "127.0.0.1:0".parse().unwrap())
                .expect("a server endpoint on loopback");
            let connector =
                Connector::new(certified.cert.pem().as_bytes(), "localhost").expect("connector");
            Scripted {
                endpoint,
                connector,
                server,
                certified,
            }
        }

        /// Another server with the same certificate and session cache (another edge of the
        /// same cluster).
        fn another_endpoint(&self) -> quinn::Endpoint {
            quinn::Endpoint::server(self.server.clone(), "127.0.0.1:0".parse().unwrap())
                .expect("a server endpoint on loopback")
        }

        /// Another server with the same certificate and a session cache of its own, taking
        /// 0-RTT: it rejects the 0-RTT of a session this one issued.
        fn another_with_its_own_sessions(&self) -> quinn::Endpoint {
            let server = server_config(&self.certified, quinn::TransportConfig::default(), true);
            quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap())
                .expect("a server endpoint on loopback")
        }

        fn options(&self) -> ConnectOptions {
            let mut options =
                ConnectOptions::new(self.endpoint.local_addr().expect("bound"), "token", 0);
            options.reconnect_backoff_min = Duration::from_millis(10);
            options.reconnect_backoff_max = Duration::from_millis(20);
            options
        }

        /// A client of this server, connected (its first `Welcome` read).
        async fn client(&self) -> Client {
            self.connector
                .connect(self.options())
                .await
                .expect("connect")
        }

        /// The next connection's stream, after its `Hello` was read and `Welcome` written.
        async fn welcome(&self) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
            let connection = self
                .endpoint
                .accept()
                .await
                .expect("a connection")
                .await
                .expect("a handshake");
            let (mut send, mut recv) = connection.accept_bi().await.expect("the stream");
            let hello = read_frame(&mut recv).await;
            assert!(matches!(hello, Frame::Hello { .. }), "{hello:?}");
            let welcome = Frame::Welcome {
                user: 7,
                device: 0,
                server_time_ms: 0,
                acked_up_to: 0,
                first_seq: 1,
            };
            write_frame(&mut send, &welcome).await.expect("Welcome");
            (connection, send, recv)
        }
    }

    async fn read_frame(recv: &mut quinn::RecvStream) -> Frame {
        let mut prefix = [0u8; courier_protocol::LENGTH_PREFIX_BYTES];
        recv.read_exact(&mut prefix).await.expect("a length prefix");
        let length = courier_protocol::peek_length(&prefix)
            .expect("a valid prefix")
            .expect("whole");
        let mut body = vec![0u8; length];
        recv.read_exact(&mut body).await.expect("a frame body");
        courier_protocol::decode_body(&body).expect("a frame")
    }

    /// The SDK takes no QUIC DATAGRAM frames: it never reads them, so had it advertised them
    /// (quinn's default), a server could have filled quinn's queue of unread ones (1.25 MB)
    /// in every client.
    #[tokio::test]
    async fn a_client_takes_no_quic_datagrams() {
        let server = Scripted::start();
        let (served, _client) = tokio::join!(server.welcome(), server.client());
        let (connection, _send, _recv) = served;
        assert_eq!(
            connection.max_datagram_size(),
            None,
            "the client advertised QUIC datagrams"
        );
    }

    /// After `close`, `recv` hands out nothing more, not even deliveries the driver had
    /// buffered: acked then, their acks would go nowhere, and the messages would come again
    /// at the next login.
    #[tokio::test]
    async fn a_closed_client_hands_out_no_buffered_delivery() {
        let server = Scripted::start();
        let serve = async {
            let (_connection, mut send, _recv) = server.welcome().await;
            write_frame(&mut send, &delivery(1)).await.expect("Deliver");
            tokio::time::sleep(Duration::from_secs(30)).await;
        };
        let client = async {
            let mut client = server.client().await;
            // The driver reads the delivery into its buffer meanwhile.
            while client.last_seq() < 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            client.close();
            client.recv().await.map(|_| ())
        };
        let received = tokio::select! {
            received = client => received,
            () = serve => panic!("the client did not finish in time"),
        };
        assert_eq!(received, None, "nothing handed out after the close");
    }

    /// Sends still in the driver's buffer when the application closes the client are not
    /// written after it: their callers are told `Shutdown`, and stored after that, a resend
    /// under a new id would reach the recipient twice. Only what was written before the close
    /// (here at most the server's stream window) and the last ack go out. Before, the close
    /// wrote the whole buffer, up to 1 MiB of sends.
    #[tokio::test]
    async fn sends_failed_by_a_close_are_not_written_after_it() {
        const WINDOW_BYTES: u32 = 64 * 1024;
        const BODY_BYTES: usize = 30 * 1024;
        let mut transport = quinn::TransportConfig::default();
        transport.stream_receive_window(WINDOW_BYTES.into());
        let server = Scripted::start_with(transport);
        let (closed_tx, closed_rx) = oneshot::channel::<()>();
        let serve = async {
            let (_connection, _send, mut recv) = server.welcome().await;
            // Nothing read until the client closed: its writes stop at the window.
            closed_rx.await.expect("the client closes");
            let mut send_bytes = 0;
            let mut prefix = [0u8; courier_protocol::LENGTH_PREFIX_BYTES];
            while recv.read_exact(&mut prefix).await.is_ok() {
                let length = courier_protocol::peek_length(&prefix)
                    .expect("a valid prefix")
                    .expect("whole");
                let mut body = vec![0u8; length];
                recv.read_exact(&mut body).await.expect("a frame body");
                let frame = courier_protocol::decode_body(&body).expect("a frame");
                if let Frame::Send { body, .. } = frame {
                    send_bytes += body.len();
                }
            }
            send_bytes
        };
        let client = async {
            let client = server.client().await;
            let mut sending = tokio::task::JoinSet::new();
            for _ in 0..60 {
                let sender = client.sender();
                sending.spawn(async move { sender.send(9, vec![7u8; BODY_BYTES]).await });
            }
            // Long enough for the driver to fill the window and its buffer.
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(
                sending.try_join_next().map(|_| ()),
                None,
                "answered without a server"
            );
            client.close();
            while let Some(result) = sending.join_next().await {
                assert_eq!(
                    result.expect("a send task").map(|_| ()),
                    Err(ClientError::Shutdown)
                );
            }
            closed_tx.send(()).expect("the server waits");
            client
        };
        let (send_bytes, _client) = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(serve, client)
        })
        .await
        .expect("done in time");
        assert!(
            send_bytes <= WINDOW_BYTES as usize + BODY_BYTES,
            "{send_bytes} bytes of sends reached the server after the close"
        );
        assert!(
            send_bytes > 0,
            "the sends written before the close reached the server"
        );
    }

    /// A send the server acknowledged in the same read as a fatal error is reported stored,
    /// not failed: the caller would otherwise send it again under a new id, and the recipient
    /// get it twice. Before, the driver ended the link with the receipt still in the session.
    #[tokio::test]
    async fn a_receipt_read_with_a_fatal_error_is_still_a_receipt() {
        let server = Scripted::start();
        let serve = async {
            let (_connection, mut send, mut recv) = server.welcome().await;
            let Frame::Send { client_id, .. } = read_frame(&mut recv).await else {
                panic!("a Send");
            };
            let mut both = courier_protocol::encode_to_vec(&Frame::SendAck {
                client_id,
                seq: 1,
                server_time_ms: 0,
            })
            .expect("SendAck");
            courier_protocol::encode(
                &Frame::Error {
                    code: ErrorCode::Unauthenticated,
                    message: "token revoked".into(),
                },
                &mut both,
            )
            .expect("Error");
            send.write_all(&both).await.expect("one write");
            // Held open until the client is done with it.
            tokio::time::sleep(Duration::from_secs(5)).await;
        };
        let client = async {
            let client = server.client().await;
            client.send(9, b"hello".to_vec()).await
        };
        let receipt = tokio::select! {
            receipt = client => receipt,
            () = serve => panic!("the client did not answer in time"),
        };
        let receipt = receipt.expect("stored: the server acknowledged it");
        assert_eq!(receipt.seq, 1);
    }

    /// The next connection's stream on `endpoint`, and the `Hello` read from it.
    async fn accept_hello(
        endpoint: &quinn::Endpoint,
    ) -> (quinn::Connection, quinn::SendStream, Frame) {
        let connection = endpoint
            .accept()
            .await
            .expect("a connection")
            .await
            .expect("a handshake");
        let (send, mut recv) = connection.accept_bi().await.expect("the stream");
        let hello = read_frame(&mut recv).await;
        assert!(matches!(hello, Frame::Hello { .. }), "{hello:?}");
        (connection, send, hello)
    }

    /// The `Hello` that `serve` returns, unless `client` finishes first or 20 s pass, carries
    /// the application's ack of seq 1.
    async fn the_hello_carries_the_ack(
        serve: impl std::future::Future<Output = Frame>,
        client: impl std::future::Future<Output = ()>,
    ) {
        let hello = tokio::select! {
            hello = serve => hello,
            () = client => panic!("the client finished first"),
            () = tokio::time::sleep(Duration::from_secs(20)) => panic!("no Hello with the ack"),
        };
        let Frame::Hello { acked_up_to, .. } = hello else {
            panic!("a Hello: {hello:?}");
        };
        assert_eq!(acked_up_to, 1, "the last ack arrived");
    }

    /// The first connection of the last-ack tests, welcomed and given seq 1 (its streams
    /// returned, so that the caller keeps them open).
    async fn welcome_and_deliver_seq_1(
        first: &Scripted,
    ) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
        let (connection, mut send, recv) = first.welcome().await;
        let delivery = Frame::Deliver {
            seq: 1,
            from: 9,
            sent_at_ms: 0,
            body: b"read".to_vec(),
        };
        write_frame(&mut send, &delivery).await.expect("Deliver");
        (connection, send, recv)
    }

    /// The script of the last-ack tests: the first connection is welcomed and given seq 1,
    /// which the application takes (acked, the ack written); then `after_read` ends that
    /// connection its own way and returns the `Hello` the flush's last server read. The
    /// client is closed once it has no connection (its reconnect backoff is long), and that
    /// `Hello` must carry the ack.
    async fn the_last_ack_arrives<F, Fut>(first: &Scripted, after_read: F)
    where
        F: FnOnce(quinn::Connection, quinn::SendStream) -> Fut,
        Fut: std::future::Future<Output = Frame>,
    {
        let read = tokio::sync::Notify::new();
        let serve = async {
            let (connection, send, _recv) = welcome_and_deliver_seq_1(first).await;
            read.notified().await;
            after_read(connection, send).await
        };
        let client = async {
            let mut options = first.options();
            // Down until the close: no reconnect of its own in between.
            options.reconnect_backoff_min = Duration::from_secs(20);
            options.reconnect_backoff_max = Duration::from_secs(20);
            let mut client = first.connector.connect(options).await.expect("connect");
            let delivery = client.recv_message().await.expect("a delivery");
            assert_eq!(delivery.seq, 1);
            // The ack goes out (gathered for 25 ms) before the connection ends.
            tokio::time::sleep(Duration::from_millis(200)).await;
            read.notify_one();
            let connected = || client.sender.shared.lock().unwrap().connection.is_some();
            while connected() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            client.close();
            tokio::time::sleep(Duration::from_secs(30)).await;
        };
        the_hello_carries_the_ack(serve, client).await;
    }

    /// The last ack of a client closed while it had no connection reaches the user's home
    /// edge: the edge the flush reaches first is not the home, answers the `Hello` with a
    /// `Goaway` and applies no ack, and the flush follows it once. Before, it wrote the
    /// `Hello`, waited for the close and dropped the ack: the message came again at the next
    /// login.
    #[tokio::test]
    async fn the_last_ack_at_a_close_follows_a_redirect_to_the_home_edge() {
        let first = Scripted::start();
        let home = first.another_endpoint();
        let home_addr = home.local_addr().expect("bound");
        let (first_endpoint, home) = (&first.endpoint, &home);
        the_last_ack_arrives(&first, |connection, _send| async move {
            // The connection breaks under the client.
            connection.close(0u32.into(), b"gone");
            // The flush, at the first address: not the user's home.
            let (_connection, mut send, _hello) = accept_hello(first_endpoint).await;
            let goaway = Frame::Goaway {
                reason: "homed on another edge".into(),
                reconnect_to: Some(home_addr.to_string()),
            };
            write_frame(&mut send, &goaway).await.expect("Goaway");
            let _ = send.finish();
            accept_hello(home).await.2
        })
        .await;
    }

    /// The last ack of a client closed while it had no connection arrives when the edge it
    /// goes to rejects its 0-RTT: rejected early data is discarded, the `Hello` with it, and
    /// the flush writes it again on a new stream. Here the client was sent to an edge of its
    /// own session cache (a drain's `Goaway` after `Welcome`) and closed during the backoff
    /// before it reconnects. Before, the flush left the `Hello` in the rejected data.
    #[tokio::test]
    async fn the_last_ack_at_a_close_is_written_again_after_a_rejected_0rtt() {
        let first = Scripted::serving(quinn::TransportConfig::default(), true);
        let next = first.another_with_its_own_sessions();
        let next_addr = next.local_addr().expect("bound");
        the_last_ack_arrives(&first, |connection, mut send| async move {
            let goaway = Frame::Goaway {
                reason: "draining".into(),
                reconnect_to: Some(next_addr.to_string()),
            };
            write_frame(&mut send, &goaway).await.expect("Goaway");
            let _ = send.finish();
            let _ = connection.closed().await;
            // The flush: its 0-RTT is rejected here.
            accept_hello(&next).await.2
        })
        .await;
    }

    /// The last ack of a client closed while its reconnect waits for `Welcome` reaches the
    /// user's home edge: the edge the reconnect reached is not the home, answers the `Hello`
    /// with a `Goaway` and applies no ack, and the close follows it. Before, the close wrote
    /// into that connection, read nothing and ended: the message came again at the next
    /// login.
    #[tokio::test]
    async fn the_last_ack_at_a_close_before_welcome_reaches_the_home_edge() {
        let first = Scripted::start();
        let home = first.another_endpoint();
        let home_addr = home.local_addr().expect("bound");
        let (read, reconnected) = (tokio::sync::Notify::new(), tokio::sync::Notify::new());
        let goaway = Frame::Goaway {
            reason: "homed on another edge".into(),
            reconnect_to: Some(home_addr.to_string()),
        };
        let serve = async {
            let (connection, _send, _recv) = welcome_and_deliver_seq_1(&first).await;
            read.notified().await;
            connection.close(0u32.into(), b"gone");
            // The reconnect's `Hello` waits: the client closes before an answer.
            let (_held, mut held, _hello) = accept_hello(&first.endpoint).await;
            reconnected.notify_one();
            write_frame(&mut held, &goaway).await.expect("Goaway");
            let _ = held.finish();
            accept_hello(&home).await.2
        };
        let client = async {
            let mut options = first.options();
            options.reconnect_backoff_min = Duration::from_millis(10);
            options.reconnect_backoff_max = Duration::from_millis(10);
            let mut client = first.connector.connect(options).await.expect("connect");
            let delivery = client.recv_message().await.expect("a delivery");
            assert_eq!(delivery.seq, 1);
            // The ack goes out (gathered for 25 ms) before the connection ends.
            tokio::time::sleep(Duration::from_millis(200)).await;
            read.notify_one();
            reconnected.notified().await;
            client.close();
            tokio::time::sleep(Duration::from_secs(30)).await;
        };
        the_hello_carries_the_ack(serve, client).await;
    }

    /// An application that only receives learns why the client stopped: `recv` ends with
    /// `None`, as after its own close, and `error` says the edge refused the token. Before,
    /// only a send could find out.
    #[tokio::test]
    async fn a_receiver_learns_why_the_client_stopped() {
        let server = Scripted::start();
        let running = tokio::sync::Notify::new();
        let serve = async {
            let (_connection, mut send, _recv) = server.welcome().await;
            running.notified().await;
            write_frame(&mut send, &token_expired())
                .await
                .expect("Error");
            tokio::time::sleep(Duration::from_secs(30)).await;
        };
        let client = async {
            let mut client = server.client().await;
            assert_eq!(client.error(), None, "running");
            running.notify_one();
            let received = client.recv().await;
            (received, client.error())
        };
        let (received, error) = tokio::select! {
            ended = client => ended,
            () = serve => panic!("the client did not stop in time"),
        };
        assert_eq!(received, None);
        assert_eq!(error.and_then(|e| e.code()), Some(ErrorCode::TokenExpired));
    }

    fn token_expired() -> Frame {
        Frame::Error {
            code: ErrorCode::TokenExpired,
            message: "token expired".into(),
        }
    }

    fn delivery(seq: u64) -> Frame {
        Frame::Deliver {
            seq,
            from: 9,
            sent_at_ms: 0,
            body: format!("message {seq}").into_bytes(),
        }
    }

    /// Deliveries the client had buffered when a fatal error stopped it are not handed out:
    /// their acks would go nowhere (the driver is gone), so an application that keeps no
    /// state could not tell them from the same messages delivered again at its next login.
    /// Before, those read in an earlier read than the error's were handed out, the rest
    /// dropped. Both splits are tried: the deliveries in a write of their own, and in one
    /// write with the error.
    #[tokio::test]
    async fn a_stopped_client_hands_out_no_buffered_delivery() {
        for same_write in [false, true] {
            let server = Scripted::start();
            let serve = async {
                let (_connection, mut send, _recv) = server.welcome().await;
                let error = token_expired();
                if same_write {
                    let mut bytes = Vec::new();
                    for frame in [delivery(1), delivery(2), error] {
                        bytes.extend(courier_protocol::encode_to_vec(&frame).expect("encode"));
                    }
                    send.write_all(&bytes).await.expect("the frames");
                } else {
                    write_frame(&mut send, &delivery(1)).await.expect("Deliver");
                    write_frame(&mut send, &delivery(2)).await.expect("Deliver");
                    // Read into the client's buffer before the error comes.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    write_frame(&mut send, &error).await.expect("Error");
                }
                tokio::time::sleep(Duration::from_secs(30)).await;
            };
            let client = async {
                let mut client = server.client().await;
                while client.error().is_none() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                assert_eq!(client.last_seq(), 2, "both deliveries read");
                client.recv().await.map(|_| ())
            };
            let received = tokio::select! {
                received = client => received,
                () = serve => panic!("the client did not stop in time"),
            };
            assert_eq!(
                received, None,
                "a delivery handed out after the client stopped"
            );
        }
    }

    /// A send the application handed over that the driver had not taken when a fatal error
    /// stopped it is answered with that error, not `Shutdown`: an application renews its
    /// token on `TokenExpired`, not on a close it did not make. The sends queue while the
    /// driver waits for the connection's close after the server ended the stream (it takes
    /// no sends then); the close then says the token expired.
    #[tokio::test]
    async fn a_send_not_yet_taken_when_the_client_stops_learns_why() {
        let server = Scripted::start();
        let (ended_tx, ended_rx) = oneshot::channel::<()>();
        let (queued_tx, queued_rx) = oneshot::channel::<()>();
        let serve = async {
            let (connection, mut send, _recv) = server.welcome().await;
            send.finish().expect("end the stream");
            let _ = ended_tx.send(());
            queued_rx.await.expect("the sends queue");
            connection.close(
                u32::from(ErrorCode::TokenExpired as u16).into(),
                b"token expired",
            );
            tokio::time::sleep(Duration::from_secs(30)).await;
        };
        let client = async {
            let client = server.client().await;
            ended_rx.await.expect("the stream ends");
            // The driver has read the stream's end and waits for the close.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let sends: Vec<_> = (0..3)
                .map(|_| {
                    let sender = client.sender();
                    tokio::spawn(async move { sender.send(7, b"queued".to_vec()).await })
                })
                .collect();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = queued_tx.send(());
            let mut answers = Vec::new();
            for send in sends {
                answers.push(send.await.expect("the send task"));
            }
            answers
        };
        let answers = tokio::select! {
            answers = client => answers,
            () = serve => panic!("the sends were not answered in time"),
        };
        for answer in answers {
            assert_eq!(
                answer.err().and_then(|e| e.code()),
                Some(ErrorCode::TokenExpired),
                "a queued send was not told why the client stopped"
            );
        }
    }

    /// With the application taking nothing, the client stops reading once it holds more than
    /// `deliveries_buffered_max` deliveries in all (here 5 of a buffer of 4, more if frames
    /// arrive together in one read). Before, the channel to the application and the driver's
    /// queue each held that many: 8.
    #[tokio::test]
    async fn a_stalled_application_is_buffered_at_most_its_configured_deliveries() {
        let server = Scripted::start();
        let serve = async {
            let (_connection, mut send, _recv) = server.welcome().await;
            for seq in 1..=20 {
                write_frame(&mut send, &delivery(seq))
                    .await
                    .expect("Deliver");
                // A read each.
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        let mut options = server.options();
        options.deliveries_buffered_max = 4;
        let (_, client) = tokio::join!(serve, server.connector.connect(options));
        let client = client.expect("connect");
        assert!(
            (5..8).contains(&client.last_seq()),
            "{} deliveries buffered for an application that took none",
            client.last_seq()
        );
    }

    /// A server that ends the protocol stream but keeps the connection open (keep-alives
    /// would hold it forever) does not wedge the client: it closes that connection and
    /// reconnects. Before, the driver waited for the close forever, and neither `send` nor
    /// `close` was ever answered.
    #[tokio::test]
    async fn a_stream_ended_without_a_close_is_left_and_the_client_reconnects() {
        let server = Scripted::start();
        let serve = async {
            let (first, mut send, _recv) = server.welcome().await;
            send.finish().expect("finish the stream");
            let (_second, _send, _recv) = server.welcome().await;
            drop(first);
            tokio::time::sleep(Duration::from_secs(30)).await;
        };
        let client = async {
            let client = server.client().await;
            while client.connections() < 2 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            () = client => {}
            () = serve => panic!("the server's script ended first"),
            () = tokio::time::sleep(Duration::from_secs(20)) => {
                panic!("the client did not leave a connection whose stream ended")
            }
        }
    }
}
