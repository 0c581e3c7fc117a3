//! `pairs --driver direct`: the same pairs, checks and clocks as the SDK's, with every client
//! driven from one thread by quinn-proto and the protocol's sans-IO `ClientSession` (the
//! edge's own design, mirrored), instead of the SDK's tokio tasks (decision 0025).
//!
//! Why: through the SDK each client is several tokio tasks (its driver, quinn's connection and
//! endpoint drivers, the workload's) and a message crosses a few of them on each side; at
//! 10,000 msgs/s from 100 pairs that keeps the load generator's core full, so the latencies it
//! reports are its own queueing as much as the edge's (docs/benchmarks.md). Here a datagram
//! goes from its socket to its connection and its session in one call, like the Redis peer's
//! minimal client, which is the fair footing for a side-by-side.
//!
//! What is the SDK's: the protocol logic (`ClientSession`: `Hello`, sends in order with retries
//! under the same id, deliveries in sequence, coalesced acks), the QUIC and TLS configuration
//! (`Connector::quic_client_config`), the session settings (`ConnectOptions::session_config`),
//! and one UDP socket per client, so the edge's shards share the clients as the kernel spreads
//! them. What it leaves out: reconnecting (a lost connection ends the run with an error),
//! following a `Goaway` to another edge (so no `--spawn-edges`), and the SDK's buffer of
//! deliveries the application has not taken (each delivery is taken at once).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::IoSliceMut;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use courier_protocol::client::{ClientEvent, ClientSession};
use hdrhistogram::Histogram;
use quinn_proto::{
    ClientConfig, ConnectionHandle, DatagramEvent, Dir, EcnCodepoint, Endpoint, EndpointConfig,
    Event, StreamId,
};

use crate::report::latency_histogram;
use crate::workloads::{body, body_intact, micros, parse_body, tick_phase};

/// Bytes of encoded frames a client holds for its stream before it stops asking its session
/// for more: QUIC's flow control then holds the sends back.
const OUTBUF_BYTES_MAX: usize = 64 * 1024;
/// Bytes of one received datagram buffer (a GRO batch fits).
const RECV_BUFFER_BYTES: usize = 64 * 1024;
/// Datagrams a connection may hand its socket per pass, so one busy connection cannot starve
/// the others; one that has more is driven again at once.
const TRANSMITS_PER_PASS_MAX: usize = 64;
/// Sockets reported ready per wait.
const READY_EVENTS_MAX: usize = 256;
/// How long connecting and logging in may take before the run gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest the loop sleeps without a deadline (progress lines come about this often).
const IDLE_WAIT_MAX: Duration = Duration::from_millis(100);
/// At the end, how long the edge has to read the last acks and close the connections.
const CLOSE_WAIT: Duration = Duration::from_millis(500);

/// What the clients do.
pub(crate) struct Plan {
    pub addr: SocketAddr,
    pub quic: ClientConfig,
    pub server_name: String,
    /// Per pair: the sender's and the receiver's session settings, and the receiver's user.
    pub pairs: Vec<(
        courier_protocol::client::ClientConfig,
        courier_protocol::client::ClientConfig,
        u64,
    )>,
    pub msgs: u32,
    pub bytes: usize,
    pub in_flight: u32,
    pub rate: Option<f64>,
    pub aligned: bool,
    /// `offline`: the receivers log in once and leave; they come back together once every
    /// send is answered, and drain.
    pub offline: bool,
    /// After the last answer, or after the last progress before it, how long to wait for the
    /// rest before giving up.
    pub drain_timeout: Duration,
    /// Message bodies carry their send time relative to this.
    pub epoch: Instant,
}

/// What the run saw, for the same checks and report as the SDK's `pairs`.
#[derive(Default)]
pub(crate) struct Outcome {
    /// Per pair and index: the seq the sender was told (0: not acknowledged).
    pub acked_seq: Vec<Vec<u64>>,
    /// Per pair and index: the seq it was delivered with (0: not delivered).
    pub delivered_seq: Vec<Vec<u64>>,
    pub sent: u64,
    pub acked: u64,
    /// Sends the edge refused for good.
    pub failed: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub misdelivered: u64,
    pub ack_hist: Option<Histogram<u64>>,
    pub deliver_hist: Option<Histogram<u64>>,
    /// UDP datagrams of every client's connection, both ways, from the first send to the
    /// last delivery.
    pub datagrams: u64,
    pub start: Option<Instant>,
    pub sends_done: Option<Instant>,
    /// `offline`: when the receivers started to come back.
    pub drain_start: Option<Instant>,
    pub last_delivery: Option<Instant>,
    pub errors: Vec<String>,
}

enum Role {
    Sender {
        pair: usize,
        to: u64,
        next_index: u32,
        /// Sent and not yet answered.
        outstanding: u32,
        /// Paced: when the next send is due.
        next_tick: Option<Instant>,
        /// Client message id → (index, when it was sent); at most the messages of the run.
        waiting: HashMap<u64, (u32, Instant)>,
    },
    Receiver {
        pair: usize,
        last_seq: u64,
    },
    /// `connections --driver direct`: logs in and stays, idle but for its keep-alives.
    Idle,
}

/// A UDP socket of the load generator and its quinn-udp state. A pairs client has its own;
/// idle connections share a few, as the SDK's connectors do.
struct Socket {
    socket: UdpSocket,
    state: quinn_udp::UdpSocketState,
}

struct Client {
    /// Index of its socket in `Driver::sockets`.
    socket: usize,
    handle: ConnectionHandle,
    quic: quinn_proto::Connection,
    session: ClientSession,
    stream: Option<StreamId>,
    /// Received bytes not yet decoded into a whole frame.
    inbuf: Vec<u8>,
    /// Encoded frames the stream has not taken yet.
    outbuf: Vec<u8>,
    role: Role,
    welcomed: bool,
    /// The stream is finished (the run is over, or the client left).
    finished: bool,
    /// Its session is closed and its connection ending: the run is over, or an `offline`
    /// receiver left.
    leaving: bool,
    /// The deadline this client has in the timer heap.
    armed: Option<Instant>,
}

/// Runs the plan: connects every client, calls `on_connected` (the run's clock starts after
/// it), sends and receives (`offline`: calls `on_drain` when the receivers start to come
/// back), calls `on_done` at the last delivery (before the connections close, so what it
/// measures is the run's), goes on reading for `TRAILING_QUIET` (a copy delivered after the
/// last expected message counts as a duplicate), closes, and returns what it saw.
pub(crate) fn run(
    plan: &Plan,
    on_connected: impl FnOnce(),
    on_drain: impl FnOnce(),
    on_done: impl FnOnce(),
) -> Result<Outcome, String> {
    let mut driver = Driver::new(plan)?;
    driver.connect_all()?;
    if plan.offline {
        driver.receivers_leave();
    }
    on_connected();
    driver.exchange(on_drain)?;
    on_done();
    // A connection lost now ends nothing the run measured: said, not fatal.
    if let Err(error) = driver.listen_for_stragglers(crate::workloads::TRAILING_QUIET) {
        driver.outcome.errors.push(error);
    }
    Ok(driver.finish())
}

/// `connections --driver direct`: many idle, logged-in connections from one thread, so that
/// the load generator, not saturated, measures what an open connection costs the edge (the
/// SDK's tasks filled its core at about 2,300 new connections/s: docs/benchmarks.md).
pub(crate) struct Idle {
    /// One per connection, in the order they open (each its own user and token).
    pub sessions: Vec<courier_protocol::client::ClientConfig>,
    /// UDP sockets the connections share, round robin (the SDK's `--sockets`).
    pub sockets: usize,
    /// Connections started per second (0: as fast as `concurrency` allows).
    pub rate: u32,
    /// Connections that may be logging in at once.
    pub concurrency: usize,
    /// How long to hold them all open.
    pub hold: Duration,
}

/// What an idle run saw.
pub(crate) struct IdleOutcome {
    /// Connections welcomed (logged in).
    pub opened: usize,
    /// Connections lost, before or after their login.
    pub lost: usize,
    /// From the first connection started until every one was welcomed or lost.
    pub connect_secs: f64,
    /// Keep-alives the clients sent while held (PING or IMMEDIATE_ACK frames).
    pub keep_alives_holding: u64,
    pub errors: Vec<String>,
}

/// Opens `idle.sessions.len()` connections and logs each in, `quic_for(n)` giving connection
/// `n`'s QUIC configuration (a shared one resumes TLS sessions; a fresh one per connection
/// makes full handshakes); calls `on_start(n)` before it starts connection `n`, `on_open`
/// once every one is welcomed or lost, `on_held` after the hold (before any closes), then
/// closes them all.
pub(crate) fn run_idle(
    plan: &Plan,
    idle: Idle,
    mut quic_for: impl FnMut(usize) -> Result<ClientConfig, String>,
    mut on_start: impl FnMut(usize),
    on_open: impl FnOnce(),
    on_held: impl FnOnce(),
) -> Result<IdleOutcome, String> {
    let mut driver = Driver::new(plan)?;
    let total = idle.sessions.len();
    driver.clients.reserve(total);
    for socket in 0..idle.sockets.max(1) {
        let opened = driver.open_socket(socket)?;
        driver.sockets.push(opened);
    }
    let start = Instant::now();
    let mut sessions = idle.sessions.into_iter();
    let mut next_progress = start + Duration::from_secs(1);
    let mut progressed_at = start;
    let mut progress = 0;
    loop {
        let now = Instant::now();
        // Each connection settles once: welcomed, or lost before its login.
        let settled = driver.welcomed + driver.idle_lost_unwelcomed;
        let started = driver.clients.len();
        if settled >= total {
            break;
        }
        if settled != progress {
            (progress, progressed_at) = (settled, now);
        }
        if now > progressed_at + CONNECT_TIMEOUT {
            return Err(format!(
                "no connection logged in for {CONNECT_TIMEOUT:?}: {} of {total} open, {} lost",
                driver.welcomed, driver.idle_lost
            ));
        }
        let mut next_start = None;
        while driver.clients.len() < total
            && driver.clients.len() - settled < idle.concurrency.max(1)
        {
            let index = driver.clients.len();
            if idle.rate > 0 {
                let due = start + Duration::from_secs_f64(index as f64 / f64::from(idle.rate));
                if due > now {
                    next_start = Some(due);
                    break;
                }
            }
            on_start(index);
            let session = sessions.next().ok_or("a session per connection")?;
            driver.connect_client(
                index % driver.sockets.len(),
                quic_for(index)?,
                session,
                Role::Idle,
            )?;
        }
        if started != driver.clients.len() {
            continue; // Take what the new connections' first packets brought first.
        }
        let limit = next_start.map_or(now + IDLE_WAIT_MAX, |at| at.min(now + IDLE_WAIT_MAX));
        driver.turn(limit)?;
        if Instant::now() >= next_progress {
            next_progress += Duration::from_secs(1);
            eprintln!(
                "[{:>5.1}s] {} connections started, {} logged in, {} lost",
                start.elapsed().as_secs_f64(),
                driver.clients.len(),
                driver.welcomed,
                driver.idle_lost
            );
        }
    }
    let connect_secs = start.elapsed().as_secs_f64();
    on_open();
    let keep_alives_sent = |driver: &Driver<'_>| -> u64 {
        driver
            .clients
            .iter()
            .map(|client| {
                let frames = client.quic.stats().frame_tx;
                frames.ping + frames.immediate_ack
            })
            .sum()
    };
    let keep_alives_from = keep_alives_sent(&driver);
    let hold_end = Instant::now() + idle.hold;
    while Instant::now() < hold_end {
        driver.turn(hold_end)?;
    }
    let keep_alives_holding = keep_alives_sent(&driver).saturating_sub(keep_alives_from);
    on_held();
    let (opened, lost) = (driver.welcomed, driver.idle_lost);
    let outcome = driver.finish();
    Ok(IdleOutcome {
        opened,
        lost,
        connect_secs,
        keep_alives_holding,
        errors: outcome.errors,
    })
}

struct Driver<'a> {
    plan: &'a Plan,
    endpoint: Endpoint,
    /// Every socket, watched under its index in `sockets`.
    epoll: OwnedFd,
    sockets: Vec<Socket>,
    clients: Vec<Client>,
    /// Endpoint handle → index in `clients`.
    by_handle: HashMap<usize, usize>,
    /// (deadline, client index): lazily invalidated (`Client::armed` says what is current).
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    started: Instant,
    transmit_buf: Vec<u8>,
    response_buf: Vec<u8>,
    outcome: Outcome,
    ack_hist: Histogram<u64>,
    deliver_hist: Histogram<u64>,
    datagrams_before: u64,
    /// Datagrams of connections that ended (an `offline` receiver's first).
    datagrams_retired: u64,
    /// The run is over: connections ending are expected.
    closing: bool,
    /// Datagram buffers and their metadata, kept between passes.
    recv_buffers: Vec<Vec<u8>>,
    recv_metas: Vec<quinn_udp::RecvMeta>,
    ready: Vec<libc::epoll_event>,
    /// Clients welcomed so far (each once).
    welcomed: usize,
    /// Idle connections lost (`Role::Idle`), and of those, lost before their login.
    idle_lost: usize,
    idle_lost_unwelcomed: usize,
}

impl<'a> Driver<'a> {
    fn new(plan: &'a Plan) -> Result<Driver<'a>, String> {
        #[allow(unsafe_code)]
        // SAFETY: epoll_create1 takes no pointers; a new descriptor is owned by nobody else.
        let epoll = unsafe {
            let fd = libc::epoll_create1(libc::EPOLL_CLOEXEC);
            if fd < 0 {
                return Err(format!("epoll: {}", std::io::Error::last_os_error()));
            }
            OwnedFd::from_raw_fd(fd)
        };
        let pairs = plan.pairs.len();
        let msgs = plan.msgs as usize;
        Ok(Driver {
            plan,
            endpoint: Endpoint::new(Arc::new(EndpointConfig::default()), None, true, None),
            epoll,
            sockets: Vec::with_capacity(2 * pairs),
            clients: Vec::with_capacity(2 * pairs),
            by_handle: HashMap::new(),
            timers: BinaryHeap::new(),
            started: Instant::now(),
            transmit_buf: Vec::new(),
            response_buf: Vec::new(),
            outcome: Outcome {
                acked_seq: vec![vec![0; msgs]; pairs],
                delivered_seq: vec![vec![0; msgs]; pairs],
                ..Outcome::default()
            },
            ack_hist: latency_histogram(),
            deliver_hist: latency_histogram(),
            datagrams_before: 0,
            datagrams_retired: 0,
            closing: false,
            recv_buffers: (0..quinn_udp::BATCH_SIZE)
                .map(|_| vec![0u8; RECV_BUFFER_BYTES])
                .collect(),
            recv_metas: vec![quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE],
            ready: vec![libc::epoll_event { events: 0, u64: 0 }; READY_EVENTS_MAX],
            welcomed: 0,
            idle_lost: 0,
            idle_lost_unwelcomed: 0,
        })
    }

    fn now_ms(&self, now: Instant) -> u64 {
        now.duration_since(self.started).as_millis() as u64
    }

    /// A new UDP socket, watched by the epoll set under `index` (its place in `sockets`).
    fn open_socket(&self, index: usize) -> Result<Socket, String> {
        let socket = UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .map_err(|e| format!("bind a UDP socket: {e}"))?;
        socket
            .set_nonblocking(true)
            .map_err(|e| format!("UDP socket: {e}"))?;
        let state = quinn_udp::UdpSocketState::new((&socket).into())
            .map_err(|e| format!("UDP socket: {e}"))?;
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: index as u64,
        };
        #[allow(unsafe_code)]
        // SAFETY: both descriptors are open for the call; `event` outlives it.
        let added = unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                socket.as_raw_fd(),
                &mut event,
            )
        };
        if added != 0 {
            return Err(format!("epoll: {}", std::io::Error::last_os_error()));
        }
        Ok(Socket { socket, state })
    }

    /// Starts a client's connection on socket `socket`.
    fn connect_client(
        &mut self,
        socket: usize,
        quic: ClientConfig,
        session: courier_protocol::client::ClientConfig,
        role: Role,
    ) -> Result<(), String> {
        let index = self.clients.len();
        let (handle, quic) = self
            .endpoint
            .connect(Instant::now(), quic, self.plan.addr, &self.plan.server_name)
            .map_err(|e| format!("connect to {}: {e}", self.plan.addr))?;
        self.by_handle.insert(handle.0, index);
        self.clients.push(Client {
            socket,
            handle,
            quic,
            session: ClientSession::new(session, 0),
            stream: None,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            role,
            welcomed: false,
            finished: false,
            leaving: false,
            armed: None,
        });
        self.drive(index)
    }

    /// Opens every connection and waits until each session is welcomed.
    fn connect_all(&mut self) -> Result<(), String> {
        for (pair, (sender, receiver, to)) in self.plan.pairs.iter().enumerate() {
            let roles = [
                (
                    sender,
                    Role::Sender {
                        pair,
                        to: *to,
                        next_index: 0,
                        outstanding: 0,
                        next_tick: None,
                        waiting: HashMap::new(),
                    },
                ),
                (receiver, Role::Receiver { pair, last_seq: 0 }),
            ];
            for (config, role) in roles {
                let socket = self.sockets.len();
                self.sockets.push(self.open_socket(socket)?);
                self.connect_client(socket, self.plan.quic.clone(), config.clone(), role)?;
            }
        }
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        while !self.clients.iter().all(|client| client.welcomed) {
            if Instant::now() > deadline {
                let missing = self.clients.iter().filter(|c| !c.welcomed).count();
                return Err(format!(
                    "{missing} clients not logged in after {CONNECT_TIMEOUT:?}"
                ));
            }
            self.turn(deadline)?;
        }
        Ok(())
    }

    /// Sends and receives until every message is answered and delivered, or nothing moves
    /// for the drain timeout (after the last answer, or before it).
    fn exchange(&mut self, on_drain: impl FnOnce()) -> Result<(), String> {
        let mut on_drain = Some(on_drain);
        let start = Instant::now();
        self.outcome.start = Some(start);
        self.datagrams_before = self.datagrams();
        let interval = self.send_interval();
        for index in 0..self.clients.len() {
            if let Role::Sender {
                pair, next_tick, ..
            } = &mut self.clients[index].role
            {
                *next_tick = interval
                    .map(|interval| start + tick_phase(*pair as u32, interval, self.plan.aligned));
            }
            self.drive(index)?;
        }
        let expected = self.plan.pairs.len() as u64 * u64::from(self.plan.msgs);
        let mut next_progress = start + Duration::from_secs(1);
        let mut progress = (0, 0);
        let mut progressed_at = start;
        loop {
            let answered = self.outcome.acked + self.outcome.failed;
            if answered >= expected && self.outcome.sends_done.is_none() {
                self.outcome.sends_done = Some(Instant::now());
                if self.plan.offline
                    && let Some(on_drain) = on_drain.take()
                {
                    on_drain();
                    self.outcome.drain_start = Some(Instant::now());
                    self.receivers_return()?;
                }
            }
            if answered >= expected && self.outcome.delivered >= expected {
                break;
            }
            let now = Instant::now();
            if (answered, self.outcome.delivered) != progress {
                progress = (answered, self.outcome.delivered);
                progressed_at = now;
            }
            let give_up_at = progressed_at + self.plan.drain_timeout;
            if now > give_up_at {
                self.outcome.errors.push(format!(
                    "nothing moved for {:?}: {} of {expected} answered, {} delivered",
                    self.plan.drain_timeout, answered, self.outcome.delivered
                ));
                break;
            }
            self.turn(give_up_at.min(now + IDLE_WAIT_MAX))?;
            if Instant::now() >= next_progress {
                next_progress += Duration::from_secs(1);
                eprintln!(
                    "[{:>5.1}s] sent {} acked {} delivered {}/{}",
                    start.elapsed().as_secs_f64(),
                    self.outcome.sent,
                    self.outcome.acked,
                    self.outcome.delivered,
                    expected
                );
            }
        }
        if self.outcome.sends_done.is_none() {
            self.outcome.sends_done = Some(Instant::now());
        }
        self.outcome.datagrams = self.datagrams().saturating_sub(self.datagrams_before);
        Ok(())
    }

    fn send_interval(&self) -> Option<Duration> {
        self.plan
            .rate
            .map(|rate| Duration::from_secs_f64(1.0 / rate.max(0.001)))
    }

    fn datagrams(&self) -> u64 {
        self.datagrams_retired + self.clients.iter().map(connection_datagrams).sum::<u64>()
    }

    /// `offline`: every receiver closes its session (its first login done) and its connection,
    /// as the SDK's receivers that connect once and are dropped.
    fn receivers_leave(&mut self) {
        let receivers: Vec<usize> = (0..self.clients.len())
            .filter(|index| matches!(self.clients[*index].role, Role::Receiver { .. }))
            .collect();
        for &index in &receivers {
            self.clients[index].session.close();
            self.clients[index].leaving = true;
            let _ = self.drive(index);
        }
        let deadline = Instant::now() + CLOSE_WAIT;
        while Instant::now() < deadline
            && receivers
                .iter()
                .any(|index| !self.clients[*index].quic.is_closed())
        {
            let _ = self.turn(deadline);
        }
    }

    /// `offline`: every receiver connects again, from a new socket (as the SDK's receivers do
    /// with a new connector), on a new connection and session, all together.
    fn receivers_return(&mut self) -> Result<(), String> {
        let now = Instant::now();
        for index in 0..self.clients.len() {
            let Role::Receiver { pair, .. } = self.clients[index].role else {
                continue;
            };
            // The old socket leaves the epoll set as it closes; the new one takes its place.
            let socket = self.clients[index].socket;
            self.sockets[socket] = self.open_socket(socket)?;
            let (handle, quic) = self
                .endpoint
                .connect(
                    now,
                    self.plan.quic.clone(),
                    self.plan.addr,
                    &self.plan.server_name,
                )
                .map_err(|e| format!("connect to {}: {e}", self.plan.addr))?;
            let retired = connection_datagrams(&self.clients[index]);
            self.datagrams_retired += retired;
            let client = &mut self.clients[index];
            // The endpoint frees a drained connection's handle and may have given it to
            // another returning receiver already: forget the old one only if it is still ours.
            if self.by_handle.get(&client.handle.0) == Some(&index) {
                self.by_handle.remove(&client.handle.0);
            }
            self.by_handle.insert(handle.0, index);
            client.handle = handle;
            client.quic = quic;
            client.session = ClientSession::new(self.plan.pairs[pair].1.clone(), 0);
            client.stream = None;
            client.inbuf.clear();
            client.outbuf.clear();
            client.welcomed = false;
            client.finished = false;
            client.leaving = false;
            client.role = Role::Receiver { pair, last_seq: 0 };
            self.drive(index)?;
        }
        Ok(())
    }

    /// Reads on for `quiet` after the run's last expected delivery, counting what comes as
    /// the run's other deliveries are (a second copy under a new seq is a duplicate).
    fn listen_for_stragglers(&mut self, quiet: Duration) -> Result<(), String> {
        let until = Instant::now() + quiet;
        while Instant::now() < until {
            self.turn(until)?;
        }
        Ok(())
    }

    /// Closes every session (its last ack goes out, as the SDK's close sends it), finishes its
    /// stream once the stream took everything, waits briefly for the edge to close the
    /// connections, and hands over what was seen.
    fn finish(mut self) -> Outcome {
        self.closing = true;
        for index in 0..self.clients.len() {
            if !self.clients[index].leaving {
                self.clients[index].session.close();
            }
            let _ = self.drive(index);
        }
        let deadline = Instant::now() + CLOSE_WAIT;
        while Instant::now() < deadline && self.clients.iter().any(|c| !c.quic.is_closed()) {
            let _ = self.turn(deadline);
        }
        let now = Instant::now();
        for index in 0..self.clients.len() {
            if !self.clients[index].quic.is_closed() {
                self.clients[index].quic.close(
                    now,
                    0u32.into(),
                    bytes::Bytes::from_static(b"done"),
                );
                let _ = self.drive(index);
            }
        }
        self.outcome.ack_hist = Some(self.ack_hist);
        self.outcome.deliver_hist = Some(self.deliver_hist);
        self.outcome
    }

    /// One pass: waits until a socket is readable or the next deadline (at most until
    /// `limit`), takes every datagram waiting, then runs the clients whose deadline came.
    fn turn(&mut self, limit: Instant) -> Result<(), String> {
        let now = Instant::now();
        let next = self
            .next_deadline()
            .map_or(limit, |deadline| deadline.min(limit));
        let ready = self.wait(next.saturating_duration_since(now));
        for slot in 0..ready {
            let socket = self.ready[slot].u64 as usize;
            self.receive(socket)?;
        }
        let now = Instant::now();
        while let Some(Reverse((deadline, index))) = self.timers.peek().copied() {
            if deadline > now {
                break;
            }
            self.timers.pop();
            if self.clients[index].armed != Some(deadline) {
                continue; // Re-armed since.
            }
            self.clients[index].armed = None;
            self.drive(index)?;
        }
        Ok(())
    }

    /// Waits up to `timeout` for readable sockets; returns how many `self.ready` holds.
    fn wait(&mut self, timeout: Duration) -> usize {
        let spec = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
        };
        #[allow(unsafe_code)]
        // SAFETY: `ready` has room for READY_EVENTS_MAX events and outlives the call, as does
        // `spec`; no signal mask is passed.
        let count = unsafe {
            libc::epoll_pwait2(
                self.epoll.as_raw_fd(),
                self.ready.as_mut_ptr(),
                READY_EVENTS_MAX as libc::c_int,
                &spec,
                std::ptr::null(),
            )
        };
        usize::try_from(count).unwrap_or(0)
    }

    fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(Reverse((deadline, index))) = self.timers.peek().copied() {
            if self.clients[index].armed == Some(deadline) {
                return Some(deadline);
            }
            self.timers.pop();
        }
        None
    }

    /// Hands every datagram waiting on socket `socket` to the connection the endpoint routes
    /// it to, then drives the connections that got one.
    fn receive(&mut self, socket: usize) -> Result<(), String> {
        let mut buffers = std::mem::take(&mut self.recv_buffers);
        let mut metas = std::mem::take(&mut self.recv_metas);
        let mut touched = Vec::new();
        let mut result = Ok(());
        loop {
            let count = {
                let socket = &self.sockets[socket];
                let mut slices: Vec<IoSliceMut<'_>> =
                    buffers.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                match socket
                    .state
                    .recv((&socket.socket).into(), &mut slices, &mut metas)
                {
                    Ok(count) => count,
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(error) => {
                        result = Err(format!("receive: {error}"));
                        break;
                    }
                }
            };
            let now = Instant::now();
            for (meta, buffer) in metas.iter().zip(&buffers).take(count) {
                let stride = meta.stride.max(1);
                for segment in buffer[..meta.len].chunks(stride) {
                    self.response_buf.clear();
                    match self.endpoint.handle(
                        now,
                        meta.addr,
                        meta.dst_ip,
                        meta.ecn.map(from_udp_ecn),
                        BytesMut::from(segment),
                        &mut self.response_buf,
                    ) {
                        Some(DatagramEvent::ConnectionEvent(handle, event)) => {
                            if let Some(&owner) = self.by_handle.get(&handle.0) {
                                self.clients[owner].quic.handle_event(event);
                                touched.push(owner);
                            }
                        }
                        Some(DatagramEvent::Response(transmit)) => {
                            send(&self.sockets[socket], &transmit, &self.response_buf);
                        }
                        // A client endpoint accepts no connections.
                        Some(DatagramEvent::NewConnection(_)) | None => {}
                    }
                }
            }
            if count < buffers.len() {
                break;
            }
        }
        self.recv_buffers = buffers;
        self.recv_metas = metas;
        result?;
        touched.sort_unstable();
        touched.dedup();
        for owner in touched {
            self.drive(owner)?;
        }
        Ok(())
    }

    /// Everything client `index` has to do now: QUIC events, its stream's input, its
    /// session's events and timers, due sends, its stream's output, its datagrams, and its
    /// next deadline.
    fn drive(&mut self, index: usize) -> Result<(), String> {
        let now = Instant::now();
        let now_ms = self.now_ms(now);
        let closing = self.closing || self.clients[index].leaving;
        let client = &mut self.clients[index];
        if client.quic.poll_timeout().is_some_and(|due| due <= now) {
            client.quic.handle_timeout(now);
        }
        while let Some(event) = client.quic.poll_endpoint_events() {
            if let Some(event) = self.endpoint.handle_event(client.handle, event) {
                client.quic.handle_event(event);
            }
        }
        while let Some(event) = client.quic.poll() {
            match event {
                Event::Connected => {
                    let id = client
                        .quic
                        .streams()
                        .open(Dir::Bi)
                        .ok_or("the edge allows no stream")?;
                    client.stream = Some(id);
                    client.session.connected(now_ms);
                }
                Event::ConnectionLost { reason }
                    if !closing && matches!(client.role, Role::Idle) =>
                {
                    // One idle connection lost (the edge refused it, or it timed out) does not
                    // end the run: it is counted, and the report says how many stayed open.
                    // (`closing` covers `leaving`, so each is counted once.)
                    client.leaving = true;
                    self.idle_lost += 1;
                    if !client.welcomed {
                        self.idle_lost_unwelcomed += 1;
                    }
                    if self.outcome.errors.len() < 5 {
                        let state = if client.welcomed {
                            "logged in"
                        } else {
                            "before its login"
                        };
                        self.outcome
                            .errors
                            .push(format!("an idle connection was lost {state}: {reason}"));
                    }
                }
                Event::ConnectionLost { reason } if !closing => {
                    let role = match client.role {
                        Role::Sender { .. } => "sender",
                        Role::Receiver { .. } => "receiver",
                        Role::Idle => "idle connection",
                    };
                    let state = if client.welcomed {
                        "logged in"
                    } else {
                        "before its login"
                    };
                    let stats = client.quic.stats();
                    return Err(format!(
                        "a {role}'s connection was lost {state}: {reason} (it sent {} \
                         datagrams and received {})",
                        stats.udp_tx.datagrams, stats.udp_rx.datagrams
                    ));
                }
                _ => {}
            }
        }
        if !closing {
            read_stream(client, now_ms)?;
            if client
                .session
                .poll_timeout()
                .is_some_and(|due| due <= now_ms)
            {
                client.session.handle_timeout(now_ms);
            }
            self.take_events(index, now_ms);
            self.send_due(index, now)?;
        }
        let client = &mut self.clients[index];
        client
            .session
            .set_wall_clock(courier_core::clock::wall_clock_ms());
        while client.outbuf.len() < OUTBUF_BYTES_MAX {
            let Some(frame) = client.session.poll_transmit() else {
                break;
            };
            courier_protocol::encode(&frame, &mut client.outbuf)
                .map_err(|e| format!("encode a frame: {e}"))?;
        }
        if let Some(id) = client.stream
            && !client.finished
        {
            if !client.outbuf.is_empty() {
                match client.quic.send_stream(id).write(&client.outbuf) {
                    Ok(written) => {
                        client.outbuf.drain(..written);
                    }
                    Err(quinn_proto::WriteError::Blocked) => {}
                    // Closing: the edge may have stopped the stream; the datagrams below
                    // still go (the connection's close among them).
                    Err(_) if closing => client.outbuf.clear(),
                    Err(error) => return Err(format!("stream write: {error}")),
                }
            }
            if closing && client.outbuf.is_empty() {
                // Everything written, the last ack included: a graceful end, as the SDK's.
                let _ = client.quic.send_stream(id).finish();
                client.finished = true;
            }
        }
        let mut buf = std::mem::take(&mut self.transmit_buf);
        let mut more = false;
        let client = &mut self.clients[index];
        let socket = &self.sockets[client.socket];
        let max_datagrams = socket.state.max_gso_segments().max(1);
        for sent in 0..=TRANSMITS_PER_PASS_MAX {
            buf.clear();
            let Some(transmit) = client.quic.poll_transmit(now, max_datagrams, &mut buf) else {
                break;
            };
            send(socket, &transmit, &buf);
            if sent == TRANSMITS_PER_PASS_MAX {
                more = true;
            }
        }
        self.transmit_buf = buf;
        self.arm(index, more.then_some(now));
        Ok(())
    }

    /// Takes the session's events: logins, deliveries (checked, timed and consumed, so
    /// the session acknowledges them) and send answers (timed, recorded).
    fn take_events(&mut self, index: usize, now_ms: u64) {
        let epoch = self.plan.epoch;
        let (msgs, bytes) = (self.plan.msgs, self.plan.bytes);
        let client = &mut self.clients[index];
        while let Some(event) = client.session.poll_event() {
            match event {
                ClientEvent::Welcome { .. } => {
                    if !client.welcomed {
                        self.welcomed += 1;
                    }
                    client.welcomed = true;
                }
                ClientEvent::Message(delivery) => {
                    let now = Instant::now();
                    client.session.consumed(now_ms, delivery.seq);
                    let Role::Receiver { pair, last_seq } = &mut client.role else {
                        continue;
                    };
                    // The same checks as the SDK's receivers, in the same order.
                    if delivery.seq <= *last_seq {
                        self.outcome.reordered += 1;
                    }
                    *last_seq = delivery.seq;
                    let parsed = parse_body(&delivery.body)
                        .filter(|_| body_intact(&delivery.body, bytes))
                        .filter(|(from_pair, message, _)| {
                            *from_pair as usize == *pair && *message < msgs
                        });
                    let Some((_, message, sent_ns)) = parsed else {
                        self.outcome.misdelivered += 1;
                        continue;
                    };
                    let slot = &mut self.outcome.delivered_seq[*pair][message as usize];
                    if *slot != 0 {
                        self.outcome.duplicates += 1;
                        continue;
                    }
                    *slot = delivery.seq;
                    self.outcome.delivered += 1;
                    self.outcome.last_delivery = Some(now);
                    let now_ns = now.duration_since(epoch).as_nanos() as u64;
                    let _ = self
                        .deliver_hist
                        .record((now_ns.saturating_sub(sent_ns) / 1000).max(1));
                }
                ClientEvent::SendDone { client_id, result } => {
                    let Role::Sender {
                        pair,
                        outstanding,
                        waiting,
                        ..
                    } = &mut client.role
                    else {
                        continue;
                    };
                    let Some((message, sent_at)) = waiting.remove(&client_id) else {
                        continue;
                    };
                    *outstanding = outstanding.saturating_sub(1);
                    match result {
                        Ok(receipt) => {
                            let _ = self.ack_hist.record(micros(sent_at.elapsed()));
                            self.outcome.acked_seq[*pair][message as usize] = receipt.seq;
                            self.outcome.acked += 1;
                        }
                        Err(code) => {
                            self.outcome.failed += 1;
                            self.outcome
                                .errors
                                .push(format!("send failed: the edge refused it: {code:?}"));
                        }
                    }
                }
                ClientEvent::Hole { .. } | ClientEvent::Signal { .. } => {}
            }
        }
    }

    /// A sender's sends that are due: closed loop, up to `in_flight` unanswered; paced, one
    /// per tick that has come (missed ticks are sent at once, as the SDK driver's ticker does).
    fn send_due(&mut self, index: usize, now: Instant) -> Result<(), String> {
        if self.outcome.start.is_none() {
            return Ok(()); // Still connecting.
        }
        let (msgs, bytes, in_flight, epoch) = (
            self.plan.msgs,
            self.plan.bytes,
            self.plan.in_flight.max(1),
            self.plan.epoch,
        );
        let interval = self.send_interval();
        let client = &mut self.clients[index];
        let Role::Sender {
            pair,
            to,
            next_index,
            outstanding,
            next_tick,
            waiting,
        } = &mut client.role
        else {
            return Ok(());
        };
        while *next_index < msgs {
            // When the send was meant to go: its tick when paced (latencies count from it,
            // however late this loop got to it), else now.
            let due_at = match (interval, next_tick.as_mut()) {
                (Some(interval), Some(tick)) if *tick <= now => {
                    let scheduled = *tick;
                    *tick += interval;
                    Some(scheduled)
                }
                (Some(_), _) => None,
                (None, _) => (*outstanding < in_flight).then(Instant::now),
            };
            let Some(sent_at) = due_at else {
                break;
            };
            let message = *next_index;
            let client_id = u64::from(message) + 1;
            client
                .session
                .send(
                    client_id,
                    *to,
                    body(*pair as u32, message, bytes, epoch, sent_at),
                    None,
                )
                .map_err(|e| format!("send refused by the session: {e}"))?;
            waiting.insert(client_id, (message, sent_at));
            *next_index += 1;
            *outstanding += 1;
            self.outcome.sent += 1;
        }
        Ok(())
    }

    /// Puts the client's next deadline (QUIC's, its session's, its next paced send, or `now`
    /// when it has more to send) in the timer heap, unless it is there already.
    fn arm(&mut self, index: usize, again_at: Option<Instant>) {
        let started = self.started;
        let msgs = self.plan.msgs;
        let client = &mut self.clients[index];
        let session = client
            .session
            .poll_timeout()
            .map(|ms| started + Duration::from_millis(ms));
        let tick = match &client.role {
            Role::Sender {
                next_tick: Some(tick),
                next_index,
                ..
            } if *next_index < msgs => Some(*tick),
            _ => None,
        };
        let deadline = [client.quic.poll_timeout(), session, tick, again_at]
            .into_iter()
            .flatten()
            .min();
        if deadline == client.armed {
            return;
        }
        client.armed = deadline;
        if let Some(deadline) = deadline {
            self.timers.push(Reverse((deadline, index)));
        }
        // Entries re-armed since stay until they reach the top: rebuild before they pile up.
        if self.timers.len() > 4 * self.clients.len().max(16) {
            let clients = &self.clients;
            self.timers
                .retain(|Reverse((deadline, index))| clients[*index].armed == Some(*deadline));
        }
    }
}

/// Hands a datagram (or a GSO batch) to a socket. A full socket buffer drops it; QUIC resends.
fn send(socket: &Socket, transmit: &quinn_proto::Transmit, buf: &[u8]) {
    let udp = quinn_udp::Transmit {
        destination: transmit.destination,
        ecn: transmit.ecn.map(to_udp_ecn),
        contents: &buf[..transmit.size],
        segment_size: transmit.segment_size,
        src_ip: transmit.src_ip,
    };
    let _ = socket.state.try_send((&socket.socket).into(), &udp);
}

/// UDP datagrams of the client's connection, both ways.
fn connection_datagrams(client: &Client) -> u64 {
    let stats = client.quic.stats();
    stats.udp_tx.datagrams + stats.udp_rx.datagrams
}

fn from_udp_ecn(ecn: quinn_udp::EcnCodepoint) -> EcnCodepoint {
    match ecn {
        quinn_udp::EcnCodepoint::Ect0 => EcnCodepoint::Ect0,
        quinn_udp::EcnCodepoint::Ect1 => EcnCodepoint::Ect1,
        quinn_udp::EcnCodepoint::Ce => EcnCodepoint::Ce,
    }
}

fn to_udp_ecn(ecn: EcnCodepoint) -> quinn_udp::EcnCodepoint {
    match ecn {
        EcnCodepoint::Ect0 => quinn_udp::EcnCodepoint::Ect0,
        EcnCodepoint::Ect1 => quinn_udp::EcnCodepoint::Ect1,
        EcnCodepoint::Ce => quinn_udp::EcnCodepoint::Ce,
    }
}

/// Reads what the client's stream has and hands each whole frame to its session. Frames that
/// came before the edge ended the stream are handled first, so its last word (a `Goaway`, an
/// error) is what the run reports.
fn read_stream(client: &mut Client, now_ms: u64) -> Result<(), String> {
    let Some(id) = client.stream else {
        return Ok(());
    };
    let mut stream = client.quic.recv_stream(id);
    let mut chunks = match stream.read(true) {
        Ok(chunks) => chunks,
        Err(quinn_proto::ReadableError::ClosedStream) => return Ok(()),
        Err(error) => return Err(format!("stream read: {error}")),
    };
    let mut ended = None;
    loop {
        match chunks.next(usize::MAX) {
            Ok(Some(chunk)) => client.inbuf.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                ended = Some("the edge finished the stream".to_string());
                break;
            }
            Err(quinn_proto::ReadError::Blocked) => break,
            Err(error) => {
                ended = Some(format!("stream read: {error}"));
                break;
            }
        }
    }
    // Gives the edge its flow-control credit back.
    let _ = chunks.finalize();
    let mut consumed_total = 0;
    while let Some((frame, consumed)) = courier_protocol::decode(&client.inbuf[consumed_total..])
        .map_err(|e| format!("a frame from the edge: {e}"))?
    {
        consumed_total += consumed;
        client
            .session
            .handle_frame(now_ms, frame)
            .map_err(|e| format!("the session ended: {e}"))?;
    }
    client.inbuf.drain(..consumed_total);
    ended.map_or(Ok(()), Err)
}
