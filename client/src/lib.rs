//! The Courier client SDK (quinn + tokio).
//!
//! A [`Connector`] holds the QUIC endpoint and TLS settings; keep one per process so later
//! connections can resume the TLS session and send their first frames as 0-RTT data. A
//! [`Client`] is one logged-in device:
//!
//! - [`Client::send`] stores a message durably: it retries under the same client message id until
//!   the server's `SendAck`, across reconnects, so a message is stored exactly once.
//! - [`Client::recv`] yields deliveries in sequence order, each once: the client drops any
//!   sequence number it already has and asks the server to sync when it sees a gap.
//! - Acks are sent automatically when a delivery is handed out (or manually with
//!   [`Client::ack`] when [`ConnectOptions::auto_ack`] is off).
//! - A lost connection is re-established with backoff; `Hello` carries the last sequence
//!   number held, so delivery resumes after it and nothing is delivered twice.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier_protocol::{ErrorCode, Frame, SignalKind};
use quinn::crypto::rustls::QuicClientConfig;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

/// Errors the SDK reports. Each says whether trying again can help.
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

/// A message for this device.
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
}

/// TLS 1.3 with ALPN `courier/1`, early data on, and a fresh session cache.
fn client_config(roots: &Arc<rustls::RootCertStore>) -> Result<quinn::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
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
    transport.keep_alive_interval(Some(Duration::from_secs(10)));
    client_config.transport_config(Arc::new(transport));
    Ok(client_config)
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
        let client_config = client_config(&roots)?;
        let endpoint = quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0)))
            .map_err(|e| ClientError::Config(format!("cannot bind a UDP socket: {e}")))?;
        Ok(Connector {
            endpoint,
            client_config,
            roots,
            server_name: server_name.to_string(),
        })
    }

    /// A connector on the same socket with an empty TLS session cache: its next connection
    /// makes a full handshake, like a freshly installed app.
    pub fn fresh_session(&self) -> Result<Connector, ClientError> {
        Ok(Connector {
            endpoint: self.endpoint.clone(),
            client_config: client_config(&self.roots)?,
            roots: self.roots.clone(),
            server_name: self.server_name.clone(),
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
}

/// How a client connects and behaves.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub addr: SocketAddr,
    /// Token minted for this user and device (`courier-edge token`).
    pub token: String,
    pub device: u32,
    /// The last sequence number this device already holds; delivery starts after it.
    pub resume_after_seq: u64,
    /// Ack each delivery when [`Client::recv`] hands it out.
    pub auto_ack: bool,
    /// Reconnect when the connection is lost (with backoff between these bounds).
    pub reconnect: bool,
    pub reconnect_backoff_min: Duration,
    pub reconnect_backoff_max: Duration,
    /// Wait this long before retrying a send the server refused with a retryable error.
    pub retry_after: Duration,
    /// Deliveries buffered for the application before the client stops reading.
    pub deliveries_buffered_max: usize,
    /// Messages to send in the connection's first flight, right after `Hello` (as 0-RTT data
    /// when the connector resumes a session). Wait for their receipts with
    /// [`Client::send_with_id`] and the same ids.
    pub early_sends: Vec<EarlySend>,
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
            reconnect_backoff_max: Duration::from_secs(5),
            retry_after: Duration::from_millis(200),
            deliveries_buffered_max: 4096,
            early_sends: Vec::new(),
        }
    }
}

struct PendingSend {
    to: u64,
    body: Vec<u8>,
    ttl_secs: Option<u32>,
    waiters: Vec<oneshot::Sender<Result<SendReceipt, ClientError>>>,
}

#[derive(Default)]
struct Shared {
    pending: BTreeMap<u64, PendingSend>,
    last_seq: u64,
    acked_up_to: u64,
    zero_rtt_accepted: Option<bool>,
    connections: u64,
    closed: Option<ClientError>,
}

/// How long acks are gathered before the highest is sent.
const ACK_COALESCE: Duration = Duration::from_millis(5);

enum Command {
    Send(u64),
    Ack(u64),
    Signal {
        peer: u64,
        kind: SignalKind,
        payload: Vec<u8>,
    },
    Close,
}

/// One logged-in device.
pub struct Client {
    sender: Sender,
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
    commands: mpsc::UnboundedSender<Command>,
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
        let mut early_receipts = Vec::new();
        let pending = options
            .early_sends
            .iter()
            .map(|early| {
                let (tx, rx) = oneshot::channel();
                early_receipts.push(rx);
                let send = PendingSend {
                    to: early.to,
                    body: early.body.clone(),
                    ttl_secs: None,
                    waiters: vec![tx],
                };
                (early.client_id, send)
            })
            .collect();
        let shared = Arc::new(Mutex::new(Shared {
            pending,
            last_seq: options.resume_after_seq,
            acked_up_to: options.resume_after_seq,
            ..Shared::default()
        }));
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        let (incoming_tx, incoming_rx) = mpsc::channel(options.deliveries_buffered_max.max(1));
        let session = Session::open(&connector, &options, &shared).await?;
        let user = session.user;
        let driver = Driver {
            connector,
            options: options.clone(),
            shared: shared.clone(),
            commands: commands_rx,
            incoming: incoming_tx,
        };
        tokio::spawn(driver.run(session));
        Ok(Client {
            sender: Sender {
                shared,
                commands: commands_tx,
            },
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

    /// The next message or signal, in sequence order; `None` once the client is closed.
    pub async fn recv(&mut self) -> Option<Incoming> {
        let incoming = self.incoming.recv().await?;
        if let Incoming::Message(delivery) = &incoming
            && self.auto_ack
        {
            let _ = self.sender.commands.send(Command::Ack(delivery.seq));
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

    /// Acknowledges every message up to `up_to_seq`; the server deletes them.
    pub fn ack(&self, up_to_seq: u64) {
        let _ = self.sender.commands.send(Command::Ack(up_to_seq));
    }

    /// Sends an ephemeral signal (typing, presence) to `peer`; dropped if the peer is offline.
    pub fn signal(&self, peer: u64, kind: SignalKind, payload: Vec<u8>) {
        let _ = self.sender.commands.send(Command::Signal {
            peer,
            kind,
            payload,
        });
    }

    /// The highest sequence number received.
    pub fn last_seq(&self) -> u64 {
        self.sender.shared.lock().expect("client state").last_seq
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

    /// Connections made so far, including reconnects.
    pub fn connections(&self) -> u64 {
        self.sender.shared.lock().expect("client state").connections
    }

    /// Sends not yet acknowledged by the server.
    pub fn pending_sends(&self) -> usize {
        self.sender
            .shared
            .lock()
            .expect("client state")
            .pending
            .len()
    }

    /// Closes the connection; pending sends fail with [`ClientError::Shutdown`].
    pub fn close(&self) {
        let _ = self.sender.commands.send(Command::Close);
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
    /// already stored is answered with the first copy's receipt.
    pub async fn send_with_id(
        &self,
        client_id: u64,
        to: u64,
        body: impl Into<Vec<u8>>,
        ttl_secs: Option<u32>,
    ) -> Result<SendReceipt, ClientError> {
        if client_id == 0 {
            return Err(ClientError::Config("client id 0 is reserved".into()));
        }
        let body = body.into();
        if body.len() > courier_protocol::BODY_BYTES_MAX {
            return Err(ClientError::Config(format!(
                "body of {} bytes exceeds {}",
                body.len(),
                courier_protocol::BODY_BYTES_MAX
            )));
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut shared = self.shared.lock().expect("client state");
            if let Some(error) = &shared.closed {
                return Err(error.clone());
            }
            let pending = shared.pending.entry(client_id).or_insert(PendingSend {
                to,
                body,
                ttl_secs,
                waiters: Vec::new(),
            });
            pending.waiters.push(tx);
        }
        self.commands
            .send(Command::Send(client_id))
            .map_err(|_| ClientError::Shutdown)?;
        rx.await.map_err(|_| ClientError::Shutdown)?
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.sender.commands.send(Command::Close);
    }
}

/// One QUIC connection with its protocol stream.
struct Session {
    connection: quinn::Connection,
    send: quinn::SendStream,
    frames: mpsc::Receiver<Result<Frame, ClientError>>,
    user: u64,
}

impl Session {
    async fn open(
        connector: &Connector,
        options: &ConnectOptions,
        shared: &Mutex<Shared>,
    ) -> Result<Session, ClientError> {
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
        let resume_after_seq = shared.lock().expect("client state").last_seq;
        let hello = Frame::Hello {
            token: options.token.as_bytes().to_vec(),
            device: options.device,
            resume_after_seq: (resume_after_seq > 0).then_some(resume_after_seq),
        };
        // The first flight: Hello and every unacknowledged send, as 0-RTT data when resuming.
        let first_flight = |shared: &Mutex<Shared>| -> Vec<Frame> {
            let shared = shared.lock().expect("client state");
            std::iter::once(hello.clone())
                .chain(
                    shared
                        .pending
                        .iter()
                        .map(|(client_id, pending)| Frame::Send {
                            client_id: *client_id,
                            to: pending.to,
                            body: pending.body.clone(),
                            ttl_secs: pending.ttl_secs,
                        }),
                )
                .collect()
        };
        let (mut send, recv) = connection
            .open_bi()
            .await
            .map_err(|e| map_connection_error(&e))?;
        for frame in first_flight(shared) {
            write_frame(&mut send, &frame).await?;
        }
        let (frames_tx, mut frames) = mpsc::channel(1024);
        tokio::spawn(read_frames(recv, frames_tx));
        if let Some(accepted) = zero_rtt {
            let accepted = accepted.await;
            shared.lock().expect("client state").zero_rtt_accepted = Some(accepted);
            if !accepted {
                // Streams opened in rejected 0-RTT data are gone: start over on a new one.
                let (new_send, new_recv) = connection
                    .open_bi()
                    .await
                    .map_err(|e| map_connection_error(&e))?;
                send = new_send;
                for frame in first_flight(shared) {
                    write_frame(&mut send, &frame).await?;
                }
                let (frames_tx, new_frames) = mpsc::channel(1024);
                frames = new_frames;
                tokio::spawn(read_frames(new_recv, frames_tx));
            }
        }
        let user = match frames.recv().await {
            Some(Ok(Frame::Welcome { user, .. })) => user,
            Some(Ok(other)) => {
                return Err(ClientError::Protocol(format!(
                    "expected Welcome, got {}",
                    other.kind()
                )));
            }
            Some(Err(error)) => return Err(error),
            None => {
                let reason = connection.closed().await;
                return Err(map_connection_error(&reason));
            }
        };
        shared.lock().expect("client state").connections += 1;
        Ok(Session {
            connection,
            send,
            frames,
            user,
        })
    }
}

async fn read_frames(
    mut recv: quinn::RecvStream,
    frames: mpsc::Sender<Result<Frame, ClientError>>,
) {
    let mut buffer: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        loop {
            match courier_protocol::decode(&buffer) {
                Ok(Some((frame, consumed))) => {
                    buffer.drain(..consumed);
                    if frames.send(Ok(frame)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    let _ = frames
                        .send(Err(ClientError::Protocol(error.to_string())))
                        .await;
                    return;
                }
            }
        }
        match recv.read(&mut chunk).await {
            Ok(Some(read)) => buffer.extend_from_slice(&chunk[..read]),
            Ok(None) | Err(_) => return,
        }
    }
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

/// Codes after which reconnecting cannot help.
fn is_fatal(error: &ClientError) -> bool {
    matches!(
        error.code(),
        Some(
            ErrorCode::Unauthenticated
                | ErrorCode::TokenExpired
                | ErrorCode::Malformed
                | ErrorCode::FrameTooLarge
                | ErrorCode::LimitExceeded
                | ErrorCode::UnexpectedFrame
        )
    ) || matches!(error, ClientError::Config(_))
}

struct Driver {
    connector: Connector,
    options: ConnectOptions,
    shared: Arc<Mutex<Shared>>,
    commands: mpsc::UnboundedReceiver<Command>,
    incoming: mpsc::Sender<Incoming>,
}

enum SessionEnd {
    Closed,
    Lost(ClientError),
}

impl Driver {
    async fn run(mut self, first: Session) {
        let mut session = Some(first);
        let mut backoff = self.options.reconnect_backoff_min;
        loop {
            let current = match session.take() {
                Some(session) => session,
                None => match Session::open(&self.connector, &self.options, &self.shared).await {
                    Ok(session) => {
                        backoff = self.options.reconnect_backoff_min;
                        session
                    }
                    Err(error) if is_fatal(&error) => {
                        self.fail(error);
                        return;
                    }
                    Err(error) => {
                        debug!(%error, "reconnect failed");
                        if self.wait_or_close(backoff).await {
                            self.fail(ClientError::Shutdown);
                            return;
                        }
                        backoff = (backoff * 2).min(self.options.reconnect_backoff_max);
                        continue;
                    }
                },
            };
            match self.run_session(current).await {
                SessionEnd::Closed => {
                    self.fail(ClientError::Shutdown);
                    return;
                }
                SessionEnd::Lost(error) => {
                    debug!(%error, "connection lost");
                    if !self.options.reconnect || is_fatal(&error) {
                        self.fail(error);
                        return;
                    }
                }
            }
        }
    }

    /// Sleeps for `delay`; returns true if the application closed the client meanwhile.
    async fn wait_or_close(&mut self, delay: Duration) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => return false,
                command = self.commands.recv() => match command {
                    None | Some(Command::Close) => return true,
                    // Sends wait in `pending` and go out after reconnecting.
                    Some(_) => {}
                },
            }
        }
    }

    fn fail(&self, error: ClientError) {
        let mut shared = self.shared.lock().expect("client state");
        shared.closed = Some(error.clone());
        for (_, pending) in std::mem::take(&mut shared.pending) {
            for waiter in pending.waiters {
                let _ = waiter.send(Err(error.clone()));
            }
        }
    }

    async fn run_session(&mut self, mut session: Session) -> SessionEnd {
        // Unacknowledged sends already went out in the session's first flight.
        let mut retry = tokio::time::interval(self.options.retry_after);
        let mut retry_due: Vec<u64> = Vec::new();
        let mut ack_tick = tokio::time::interval(ACK_COALESCE);
        ack_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ack_due: Option<u64> = None;
        loop {
            tokio::select! {
                _ = ack_tick.tick(), if ack_due.is_some() => {
                    if let Some(up_to_seq) = ack_due.take()
                        && let Err(error) = write_frame(&mut session.send, &Frame::Ack { up_to_seq }).await
                    {
                        return SessionEnd::Lost(error);
                    }
                }
                frame = session.frames.recv() => {
                    let frame = match frame {
                        Some(Ok(frame)) => frame,
                        Some(Err(error)) => return SessionEnd::Lost(error),
                        None => {
                            let reason = session.connection.closed().await;
                            return SessionEnd::Lost(map_connection_error(&reason));
                        }
                    };
                    if let Err(error) = self.handle_frame(&mut session, frame, &mut retry_due).await {
                        return SessionEnd::Lost(error);
                    }
                }
                command = self.commands.recv() => {
                    let result = match command {
                        None | Some(Command::Close) => {
                            session.connection.close(0u32.into(), b"client closed");
                            return SessionEnd::Closed;
                        }
                        Some(Command::Send(client_id)) => self.write_send(&mut session, client_id).await,
                        Some(Command::Ack(up_to_seq)) => {
                            // Acks are cumulative and not urgent: coalesce them and send the
                            // highest at the next ack tick.
                            let mut shared = self.shared.lock().expect("client state");
                            if up_to_seq > shared.acked_up_to {
                                shared.acked_up_to = up_to_seq;
                                ack_due = Some(up_to_seq);
                            }
                            Ok(())
                        }
                        Some(Command::Signal { peer, kind, payload }) => {
                            write_frame(&mut session.send, &Frame::Signal { peer, kind, payload }).await
                        }
                    };
                    if let Err(error) = result {
                        return SessionEnd::Lost(error);
                    }
                }
                _ = retry.tick() => {
                    for client_id in std::mem::take(&mut retry_due) {
                        if let Err(error) = self.write_send(&mut session, client_id).await {
                            return SessionEnd::Lost(error);
                        }
                    }
                }
            }
        }
    }

    async fn write_send(&self, session: &mut Session, client_id: u64) -> Result<(), ClientError> {
        let frame = {
            let shared = self.shared.lock().expect("client state");
            let Some(pending) = shared.pending.get(&client_id) else {
                return Ok(());
            };
            Frame::Send {
                client_id,
                to: pending.to,
                body: pending.body.clone(),
                ttl_secs: pending.ttl_secs,
            }
        };
        write_frame(&mut session.send, &frame).await
    }

    /// Hands a send's final result to everyone waiting for it.
    fn finish_send(&self, client_id: u64, result: Result<SendReceipt, ClientError>) {
        let pending = self
            .shared
            .lock()
            .expect("client state")
            .pending
            .remove(&client_id);
        for waiter in pending.into_iter().flat_map(|pending| pending.waiters) {
            let _ = waiter.send(result.clone());
        }
    }

    async fn handle_frame(
        &mut self,
        session: &mut Session,
        frame: Frame,
        retry_due: &mut Vec<u64>,
    ) -> Result<(), ClientError> {
        match frame {
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
                    retry_due.push(client_id);
                } else {
                    self.finish_send(client_id, Err(ClientError::Refused(code)));
                }
            }
            Frame::Deliver {
                seq,
                from,
                sent_at_ms,
                body,
            } => {
                let last = self.shared.lock().expect("client state").last_seq;
                if seq <= last {
                    return Ok(()); // Already held: drop the duplicate.
                }
                if seq != last + 1 {
                    // A gap: ask the server for everything after what we hold.
                    debug!(seq, last, "gap in deliveries; syncing");
                    return write_frame(&mut session.send, &Frame::Sync { after_seq: last }).await;
                }
                self.shared.lock().expect("client state").last_seq = seq;
                let delivery = Delivery {
                    seq,
                    from,
                    sent_at_ms,
                    body,
                };
                // Waiting here is backpressure: the server's stream stops while the app is busy.
                if self
                    .incoming
                    .send(Incoming::Message(delivery))
                    .await
                    .is_err()
                {
                    return Err(ClientError::Shutdown);
                }
            }
            Frame::Signal {
                peer,
                kind,
                payload,
            } => {
                let _ = self.incoming.try_send(Incoming::Signal {
                    from: peer,
                    kind,
                    payload,
                });
            }
            Frame::Ping { nonce } => write_frame(&mut session.send, &Frame::Pong { nonce }).await?,
            Frame::Pong { .. } | Frame::Welcome { .. } => {}
            Frame::Goaway { reason, .. } => {
                return Err(ClientError::Closed {
                    code: Some(ErrorCode::ShuttingDown),
                    reason,
                });
            }
            Frame::Error { code, message } => {
                return Err(ClientError::Closed {
                    code: Some(code),
                    reason: message,
                });
            }
            other => {
                return Err(ClientError::Protocol(format!(
                    "unexpected {} from the server",
                    other.kind()
                )));
            }
        }
        Ok(())
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
    }
}
