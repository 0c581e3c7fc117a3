//! `pairs --driver direct`: the same pairs, checks and clocks as the SDK's, with every client
//! driven from one thread by quinn-proto and the protocol's sans-IO `ClientSession` (the
//! edge's own design, mirrored), instead of the SDK's tokio tasks.
//!
//! Why: through the SDK each client is four tokio tasks (its driver, quinn's connection and
//! endpoint drivers, the workload's) and a message crosses several of them on each side; at
//! 10,000 msgs/s from 100 pairs that keeps the load generator's core full, so the latencies it
//! reports are its own queueing as much as the edge's (docs/benchmarks.md). Here a datagram
//! goes from the socket to its connection and its session in one call, like the Redis peer's
//! minimal client, which is the fair footing for a side-by-side. The protocol logic is the
//! SDK's own (`ClientSession`: `Hello`, sends in order with retries under the same id,
//! deliveries in sequence, coalesced acks), and so is the QUIC and TLS configuration
//! (`Connector::quic_client_config`). What it leaves out is the SDK's reconnecting: a lost
//! connection ends the run with an error.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::IoSliceMut;
use std::net::{SocketAddr, UdpSocket};
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
use crate::workloads::{body, micros, parse_body, tick_phase};

/// Bytes of encoded frames a client holds for its stream before it stops asking its session
/// for more (as the SDK does): QUIC's flow control then holds the sends back.
const OUTBUF_BYTES_MAX: usize = 64 * 1024;
/// Bytes of one received datagram buffer (a GRO batch fits).
const RECV_BUFFER_BYTES: usize = 64 * 1024;
/// Datagrams a connection may hand the socket per pass, so one busy connection cannot starve
/// the others of the loop.
const TRANSMITS_PER_PASS_MAX: usize = 64;
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
    pub delivered: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub ack_hist: Option<Histogram<u64>>,
    pub deliver_hist: Option<Histogram<u64>>,
    /// UDP datagrams of every client's connection, both ways, from the first send on.
    pub datagrams: u64,
    pub start: Option<Instant>,
    pub sends_done: Option<Instant>,
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
        /// Client message id → (index, when it was sent).
        waiting: HashMap<u64, (u32, Instant)>,
    },
    Receiver {
        pair: usize,
        received: u32,
        last_seq: u64,
    },
}

struct Client {
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
    /// The deadline this client has in the timer heap.
    armed: Option<Instant>,
}

/// Runs the plan to the end: connects every client, calls `on_connected` (the run's clock
/// starts after it), sends and receives, and returns what it saw.
pub(crate) fn run(plan: &Plan, on_connected: impl FnOnce()) -> Result<Outcome, String> {
    let mut driver = Driver::new(plan)?;
    driver.connect_all()?;
    on_connected();
    driver.exchange()?;
    Ok(driver.finish())
}

struct Driver<'a> {
    plan: &'a Plan,
    endpoint: Endpoint,
    socket: UdpSocket,
    state: quinn_udp::UdpSocketState,
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
    next_progress: Instant,
    /// The run is over: connections ending are expected.
    closing: bool,
    /// Datagram buffers, kept between passes.
    recv_buffers: Vec<Vec<u8>>,
    /// Clients that got a datagram in this pass.
    touched: Vec<usize>,
}

impl<'a> Driver<'a> {
    fn new(plan: &'a Plan) -> Result<Driver<'a>, String> {
        let socket = UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .map_err(|e| format!("bind a UDP socket: {e}"))?;
        socket
            .set_nonblocking(true)
            .map_err(|e| format!("UDP socket: {e}"))?;
        let state = quinn_udp::UdpSocketState::new((&socket).into())
            .map_err(|e| format!("UDP socket: {e}"))?;
        let pairs = plan.pairs.len();
        let msgs = plan.msgs as usize;
        Ok(Driver {
            plan,
            endpoint: Endpoint::new(Arc::new(EndpointConfig::default()), None, true, None),
            socket,
            state,
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
            next_progress: Instant::now(),
            closing: false,
            recv_buffers: Vec::new(),
            touched: Vec::new(),
        })
    }

    fn now_ms(&self, now: Instant) -> u64 {
        now.duration_since(self.started).as_millis() as u64
    }

    /// Opens every connection and waits until each session is welcomed.
    fn connect_all(&mut self) -> Result<(), String> {
        let now = Instant::now();
        for (pair, (sender, receiver, to)) in self.plan.pairs.iter().enumerate() {
            for (config, role) in [
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
                (
                    receiver,
                    Role::Receiver {
                        pair,
                        received: 0,
                        last_seq: 0,
                    },
                ),
            ] {
                let (handle, quic) = self
                    .endpoint
                    .connect(
                        now,
                        self.plan.quic.clone(),
                        self.plan.addr,
                        &self.plan.server_name,
                    )
                    .map_err(|e| format!("connect to {}: {e}", self.plan.addr))?;
                let index = self.clients.len();
                self.by_handle.insert(handle.0, index);
                self.clients.push(Client {
                    handle,
                    quic,
                    session: ClientSession::new(config.clone(), 0),
                    stream: None,
                    inbuf: Vec::new(),
                    outbuf: Vec::new(),
                    role,
                    welcomed: false,
                    armed: None,
                });
                self.drive(index, now)?;
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

    /// Sends and receives until every message is delivered and answered, or the drain
    /// timeout passes after the last send.
    fn exchange(&mut self) -> Result<(), String> {
        let start = Instant::now();
        self.outcome.start = Some(start);
        self.datagrams_before = self.datagrams();
        let interval = self
            .plan
            .rate
            .map(|rate| Duration::from_secs_f64(1.0 / rate.max(0.001)));
        for index in 0..self.clients.len() {
            if let Role::Sender {
                pair, next_tick, ..
            } = &mut self.clients[index].role
            {
                *next_tick = interval
                    .map(|interval| start + tick_phase(*pair as u32, interval, self.plan.aligned));
            }
            self.drive(index, start)?;
        }
        let expected = self.plan.pairs.len() as u64 * u64::from(self.plan.msgs);
        let mut give_up_at: Option<Instant> = None;
        self.next_progress = start + Duration::from_secs(1);
        loop {
            let sends_done = self.outcome.acked + self.errors_count() >= expected;
            if sends_done && self.outcome.sends_done.is_none() {
                self.outcome.sends_done = Some(Instant::now());
                give_up_at = Some(Instant::now() + self.plan.drain_timeout);
            }
            if sends_done && self.outcome.delivered >= expected {
                break;
            }
            if let Some(at) = give_up_at
                && Instant::now() > at
            {
                self.outcome
                    .errors
                    .push("deliveries still missing at the drain timeout".into());
                break;
            }
            let wait_until = give_up_at.unwrap_or_else(|| Instant::now() + IDLE_WAIT_MAX);
            self.turn(wait_until)?;
            if Instant::now() >= self.next_progress {
                self.next_progress += Duration::from_secs(1);
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
        Ok(())
    }

    fn errors_count(&self) -> u64 {
        self.outcome.errors.len() as u64
    }

    fn datagrams(&self) -> u64 {
        self.clients
            .iter()
            .map(|client| {
                let stats = client.quic.stats();
                stats.udp_tx.datagrams + stats.udp_rx.datagrams
            })
            .sum()
    }

    /// Closes every session (its last ack goes out, as the SDK's close sends it), finishes its
    /// stream, waits briefly for the edge to close the connections, and hands over what was
    /// seen.
    fn finish(mut self) -> Outcome {
        self.outcome.datagrams = self.datagrams().saturating_sub(self.datagrams_before);
        self.closing = true;
        let now = Instant::now();
        for index in 0..self.clients.len() {
            self.clients[index].session.close();
            let _ = self.drive(index, now);
            let client = &mut self.clients[index];
            if let Some(id) = client.stream {
                let _ = client.quic.send_stream(id).finish();
            }
            let _ = self.drive(index, now);
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
                let _ = self.drive(index, now);
            }
        }
        self.outcome.ack_hist = Some(self.ack_hist);
        self.outcome.deliver_hist = Some(self.deliver_hist);
        self.outcome
    }

    /// One pass: waits for a datagram or the next deadline (at most until `limit`), takes
    /// every datagram waiting, then runs the clients whose deadline came.
    fn turn(&mut self, limit: Instant) -> Result<(), String> {
        let now = Instant::now();
        let next = self
            .next_deadline()
            .map_or(limit, |deadline| deadline.min(limit));
        if next > now {
            wait_readable(&self.socket, next - now);
        }
        self.receive()?;
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
            self.drive(index, now)?;
        }
        Ok(())
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

    /// Hands every waiting datagram to its connection, then drives those that got one.
    fn receive(&mut self) -> Result<(), String> {
        let batch = quinn_udp::BATCH_SIZE;
        let mut buffers = std::mem::take(&mut self.recv_buffers);
        buffers.resize_with(batch, || vec![0u8; RECV_BUFFER_BYTES]);
        let mut metas = vec![quinn_udp::RecvMeta::default(); batch];
        let mut touched = std::mem::take(&mut self.touched);
        touched.clear();
        loop {
            let count = {
                let mut slices: Vec<IoSliceMut<'_>> =
                    buffers.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                match self
                    .state
                    .recv((&self.socket).into(), &mut slices, &mut metas)
                {
                    Ok(count) => count,
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(error) => {
                        self.recv_buffers = buffers;
                        return Err(format!("receive: {error}"));
                    }
                }
            };
            let now = Instant::now();
            for (meta, buffer) in metas.iter().zip(&buffers).take(count) {
                let stride = meta.stride.max(1);
                for segment in buffer[..meta.len].chunks(stride) {
                    let ecn = meta.ecn.map(|ecn| match ecn {
                        quinn_udp::EcnCodepoint::Ect0 => EcnCodepoint::Ect0,
                        quinn_udp::EcnCodepoint::Ect1 => EcnCodepoint::Ect1,
                        quinn_udp::EcnCodepoint::Ce => EcnCodepoint::Ce,
                    });
                    self.response_buf.clear();
                    match self.endpoint.handle(
                        now,
                        meta.addr,
                        meta.dst_ip,
                        ecn,
                        BytesMut::from(segment),
                        &mut self.response_buf,
                    ) {
                        Some(DatagramEvent::ConnectionEvent(handle, event)) => {
                            if let Some(&index) = self.by_handle.get(&handle.0) {
                                self.clients[index].quic.handle_event(event);
                                touched.push(index);
                            }
                        }
                        Some(DatagramEvent::Response(transmit)) => {
                            let buf = std::mem::take(&mut self.response_buf);
                            self.send(&transmit, &buf);
                            self.response_buf = buf;
                        }
                        // A client endpoint accepts no connections.
                        Some(DatagramEvent::NewConnection(_)) | None => {}
                    }
                }
            }
            if count < batch {
                break;
            }
        }
        self.recv_buffers = buffers;
        touched.sort_unstable();
        touched.dedup();
        let now = Instant::now();
        let mut result = Ok(());
        for &index in &touched {
            result = self.drive(index, now);
            if result.is_err() {
                break;
            }
        }
        self.touched = touched;
        result
    }

    fn send(&self, transmit: &quinn_proto::Transmit, buf: &[u8]) {
        let udp = quinn_udp::Transmit {
            destination: transmit.destination,
            ecn: transmit.ecn.map(|ecn| match ecn {
                EcnCodepoint::Ect0 => quinn_udp::EcnCodepoint::Ect0,
                EcnCodepoint::Ect1 => quinn_udp::EcnCodepoint::Ect1,
                EcnCodepoint::Ce => quinn_udp::EcnCodepoint::Ce,
            }),
            contents: &buf[..transmit.size],
            segment_size: transmit.segment_size,
            src_ip: transmit.src_ip,
        };
        // A full socket buffer drops the datagram; QUIC resends it.
        let _ = self.state.try_send((&self.socket).into(), &udp);
    }

    /// Everything client `index` has to do now: QUIC events, its stream's input, its
    /// session's events and timers, due sends, its stream's output, its datagrams, and its
    /// next deadline.
    fn drive(&mut self, index: usize, now: Instant) -> Result<(), String> {
        let now_ms = self.now_ms(now);
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
                Event::ConnectionLost { reason } if !self.closing => {
                    return Err(format!("a connection was lost: {reason}"));
                }
                _ => {}
            }
        }
        if !self.closing {
            read_stream(client, now_ms)?;
        }
        if client
            .session
            .poll_timeout()
            .is_some_and(|due| due <= now_ms)
        {
            client.session.handle_timeout(now_ms);
        }
        self.take_events(index, now, now_ms)?;
        self.send_due(index, now, now_ms)?;
        let client = &mut self.clients[index];
        while client.outbuf.len() < OUTBUF_BYTES_MAX {
            let Some(frame) = client.session.poll_transmit() else {
                break;
            };
            courier_protocol::encode(&frame, &mut client.outbuf)
                .map_err(|e| format!("encode a frame: {e}"))?;
        }
        if let Some(id) = client.stream
            && !client.outbuf.is_empty()
        {
            match client.quic.send_stream(id).write(&client.outbuf) {
                Ok(written) => {
                    client.outbuf.drain(..written);
                }
                Err(quinn_proto::WriteError::Blocked) => {}
                Err(error) => return Err(format!("stream write: {error}")),
            }
        }
        let max_datagrams = self.state.max_gso_segments().max(1);
        let mut buf = std::mem::take(&mut self.transmit_buf);
        for _ in 0..TRANSMITS_PER_PASS_MAX {
            buf.clear();
            let Some(transmit) =
                self.clients[index]
                    .quic
                    .poll_transmit(now, max_datagrams, &mut buf)
            else {
                break;
            };
            self.send(&transmit, &buf);
        }
        self.transmit_buf = buf;
        self.arm(index);
        Ok(())
    }

    /// Takes the session's events: logins, deliveries (checked, timed and consumed, so
    /// the session acknowledges them) and send answers (timed, recorded).
    fn take_events(&mut self, index: usize, now: Instant, now_ms: u64) -> Result<(), String> {
        let epoch = self.plan.epoch;
        let msgs = self.plan.msgs;
        let client = &mut self.clients[index];
        while let Some(event) = client.session.poll_event() {
            match event {
                ClientEvent::Welcome { .. } => client.welcomed = true,
                ClientEvent::Message(delivery) => {
                    client.session.consumed(now_ms, delivery.seq);
                    let Role::Receiver {
                        pair,
                        received,
                        last_seq,
                    } = &mut client.role
                    else {
                        continue;
                    };
                    if delivery.seq <= *last_seq {
                        self.outcome.reordered += 1;
                    }
                    *last_seq = delivery.seq;
                    let Some((from_pair, message, sent_ns)) = parse_body(&delivery.body) else {
                        continue;
                    };
                    if from_pair as usize != *pair || message >= msgs {
                        continue;
                    }
                    let slot = &mut self.outcome.delivered_seq[*pair][message as usize];
                    if *slot != 0 {
                        self.outcome.duplicates += 1;
                        continue;
                    }
                    *slot = delivery.seq;
                    *received += 1;
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
                            let _ = self.ack_hist.record(micros(now.duration_since(sent_at)));
                            self.outcome.acked_seq[*pair][message as usize] = receipt.seq;
                            self.outcome.acked += 1;
                        }
                        Err(code) => self
                            .outcome
                            .errors
                            .push(format!("send failed: the edge refused it: {code:?}")),
                    }
                }
                ClientEvent::Hole { .. } | ClientEvent::Signal { .. } => {}
            }
        }
        Ok(())
    }

    /// A sender's sends that are due: closed loop, up to `in_flight` unanswered; paced, one
    /// per tick that has come (missed ticks are sent at once, as the SDK driver's ticker does).
    fn send_due(&mut self, index: usize, now: Instant, _now_ms: u64) -> Result<(), String> {
        if self.outcome.start.is_none() {
            return Ok(()); // Still connecting.
        }
        let (msgs, bytes, in_flight, epoch) = (
            self.plan.msgs,
            self.plan.bytes,
            self.plan.in_flight.max(1),
            self.plan.epoch,
        );
        let interval = self
            .plan
            .rate
            .map(|rate| Duration::from_secs_f64(1.0 / rate.max(0.001)));
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
            let due = match (interval, next_tick.as_mut()) {
                (Some(interval), Some(tick)) if *tick <= now => {
                    *tick += interval;
                    true
                }
                (Some(_), _) => false,
                (None, _) => *outstanding < in_flight,
            };
            if !due {
                break;
            }
            let message = *next_index;
            let client_id = u64::from(message) + 1;
            client
                .session
                .send(
                    client_id,
                    *to,
                    body(*pair as u32, message, bytes, epoch),
                    None,
                )
                .map_err(|e| format!("send refused by the session: {e}"))?;
            waiting.insert(client_id, (message, now));
            *next_index += 1;
            *outstanding += 1;
            self.outcome.sent += 1;
        }
        Ok(())
    }

    /// Puts the client's next deadline (QUIC's, its session's, its next paced send) in the
    /// timer heap, unless it is there already.
    fn arm(&mut self, index: usize) {
        let started = self.started;
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
            } if *next_index < self.plan.msgs => Some(*tick),
            _ => None,
        };
        let deadline = [client.quic.poll_timeout(), session, tick]
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
    }
}

/// Reads what the client's stream has and hands each whole frame to its session.
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
    let mut result = Ok(());
    loop {
        match chunks.next(usize::MAX) {
            Ok(Some(chunk)) => client.inbuf.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                result = Err("the edge finished the stream".to_string());
                break;
            }
            Err(quinn_proto::ReadError::Blocked) => break,
            Err(error) => {
                result = Err(format!("stream read: {error}"));
                break;
            }
        }
    }
    // Gives the edge its flow-control credit back.
    let _ = chunks.finalize();
    result?;
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
    Ok(())
}

/// Blocks until the socket is readable or `timeout` passes.
fn wait_readable(socket: &UdpSocket, timeout: Duration) {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let spec = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    #[allow(unsafe_code)]
    // SAFETY: one valid pollfd and a valid timespec, both alive for the call; no signal mask.
    unsafe {
        libc::ppoll(&mut fd, 1, &spec, std::ptr::null());
    }
}
