//! `abuse`: attacks on the edge, each bounded in time, while one clean pair chats alongside.
//!
//! For every attack the report gives what the attacker achieved, the edge's resident memory
//! (before, at its peak, and after the attack once `--settle-secs` have passed) and the clean
//! pair's send→deliver latency during the attack. The run fails when the clean pair loses an
//! acknowledged message or the edge passes `--rss-max-mib`. docs/security.md holds the table.

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use courier_client::raw::{RawConnection, initial_datagram};
use courier_client::{Client, Connector};
use courier_protocol::{ErrorCode, Frame};
use serde_json::json;

use crate::edge::{Target, process_usage};
use crate::report::{Latency, Report, latency_histogram};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Attack {
    /// No attack: the clean pair's quiet baseline.
    Quiet,
    /// One user, 16 connections (16 devices), each pipelining maximal (64 KiB) sends.
    FloodUser,
    /// One connection pipelining maximal sends.
    FloodConnection,
    /// Many connections, each parking most of a maximal frame, never saying `Hello`.
    PartialFrames,
    /// Many completed handshakes that never say `Hello`.
    NoHello,
    /// Many QUIC Initials (handshake starts) from several addresses, then silence.
    Initials,
    /// A logged-in connection sends a frame's length prefix and never its body.
    StalledFrame,
    /// One sender addressing a new recipient id with every send.
    Recipients,
}

impl Attack {
    const ALL: [Attack; 8] = [
        Attack::Quiet,
        Attack::FloodUser,
        Attack::FloodConnection,
        Attack::PartialFrames,
        Attack::NoHello,
        Attack::Initials,
        Attack::StalledFrame,
        Attack::Recipients,
    ];

    fn name(self) -> &'static str {
        match self {
            Attack::Quiet => "quiet",
            Attack::FloodUser => "flood-user",
            Attack::FloodConnection => "flood-connection",
            Attack::PartialFrames => "partial-frames",
            Attack::NoHello => "no-hello",
            Attack::Initials => "initials",
            Attack::StalledFrame => "stalled-frame",
            Attack::Recipients => "recipients",
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct AbuseArgs {
    /// Attacks to run, comma-separated (default: all, in this order: quiet, flood-user,
    /// flood-connection, partial-frames, no-hello, initials, stalled-frame, recipients).
    #[arg(long, value_delimiter = ',')]
    pub attacks: Vec<Attack>,
    /// Seconds each attack runs.
    #[arg(long, default_value_t = 12)]
    pub secs: u64,
    /// Seconds after each attack before the edge's memory is read again.
    #[arg(long, default_value_t = 5)]
    pub settle_secs: u64,
    /// The clean pair's messages per second.
    #[arg(long, default_value_t = 200)]
    pub clean_rate: u32,
    /// Connections of the connection attacks (partial-frames, no-hello).
    #[arg(long, default_value_t = 2000)]
    pub connections: u32,
    /// Initials of the handshake flood.
    #[arg(long, default_value_t = 5000)]
    pub initials: u32,
    /// Distinct recipients the recipients attack tries at most.
    #[arg(long, default_value_t = 100_000)]
    pub recipients: u32,
    /// Fail when the edge's resident memory passes this many MiB at any time.
    #[arg(long)]
    pub rss_max_mib: Option<u64>,
}

/// What one attack achieved, for the table.
struct Outcome {
    summary: String,
    details: serde_json::Value,
}

/// The edge's resident memory, sampled every 100 ms while an attack runs.
struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: Option<u32>) -> RssSampler {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (peak, stop) = (peak.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Some((_, rss)) = pid.and_then(process_usage) {
                        peak.fetch_max(rss, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        RssSampler { peak, stop, task }
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.peak.load(Ordering::Relaxed)
    }
}

/// One sender and one receiver chatting at a steady rate; every acknowledged message must
/// arrive.
struct CleanPair {
    stop: Arc<AtomicBool>,
    /// Set once every send has its answer: the receiver then waits for exactly the
    /// acknowledged ones (up to `CLEAN_DRAIN_MAX`).
    answered: Arc<AtomicBool>,
    sender_task: tokio::task::JoinHandle<(u64, u64)>,
    receiver_task: tokio::task::JoinHandle<(HashSet<u32>, hdrhistogram::Histogram<u64>)>,
    acked: Arc<Mutex<HashSet<u32>>>,
}

impl CleanPair {
    async fn start(target: &Target, users: (u64, u64), rate: u32) -> Result<CleanPair, String> {
        let (sender_user, receiver_user) = users;
        let sender = connect(target, sender_user).await?;
        let mut receiver = connect(target, receiver_user).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(HashSet::new()));
        let epoch = Instant::now();
        let sender_task = {
            let (stop, acked) = (stop.clone(), acked.clone());
            let handle = sender.sender();
            tokio::spawn(async move {
                let _keep = sender;
                let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
                let mut ticker = tokio::time::interval(interval);
                let mut index = 0u32;
                let mut tasks = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    ticker.tick().await;
                    let mut body = index.to_be_bytes().to_vec();
                    body.extend_from_slice(&(epoch.elapsed().as_nanos() as u64).to_be_bytes());
                    body.resize(200, 0x5A);
                    let (handle, acked) = (handle.clone(), acked.clone());
                    let this = index;
                    tasks.push(tokio::spawn(async move {
                        if handle.send(receiver_user, body).await.is_ok() {
                            acked.lock().expect("acked").insert(this);
                        }
                    }));
                    index += 1;
                }
                let mut errors = 0;
                for task in tasks {
                    if task.await.is_err() {
                        errors += 1;
                    }
                }
                (u64::from(index), errors)
            })
        };
        let receiver_task = {
            let (answered, acked) = (answered.clone(), acked.clone());
            tokio::spawn(async move {
                let mut seen = HashSet::new();
                let mut latency = latency_histogram();
                let mut answered_at = None;
                loop {
                    if answered.load(Ordering::Relaxed) {
                        let since = *answered_at.get_or_insert_with(Instant::now);
                        let all_seen = acked.lock().expect("acked").is_subset(&seen);
                        if all_seen || since.elapsed() > CLEAN_DRAIN_MAX {
                            break;
                        }
                    }
                    let next =
                        tokio::time::timeout(Duration::from_millis(200), receiver.recv_message())
                            .await;
                    let delivery = match next {
                        Ok(Some(delivery)) => delivery,
                        Ok(None) => break,
                        Err(_) => continue,
                    };
                    let (Some(index), Some(sent_ns)) = (
                        delivery.body.get(..4).and_then(|b| b.try_into().ok()),
                        delivery.body.get(4..12).and_then(|b| b.try_into().ok()),
                    ) else {
                        continue;
                    };
                    let sent_ns = u64::from_be_bytes(sent_ns);
                    let now_ns = epoch.elapsed().as_nanos() as u64;
                    let _ = latency.record((now_ns.saturating_sub(sent_ns) / 1000).max(1));
                    seen.insert(u32::from_be_bytes(index));
                }
                (seen, latency)
            })
        };
        Ok(CleanPair {
            stop,
            answered,
            sender_task,
            receiver_task,
            acked,
        })
    }

    /// Stops sending, waits up to `CLEAN_DRAIN_MAX` for every acknowledged message, and
    /// returns the latency, the number acknowledged and the number lost.
    async fn finish(self) -> Result<(Option<Latency>, u64, u64), String> {
        self.stop.store(true, Ordering::Relaxed);
        let (_sent, _errors) = self
            .sender_task
            .await
            .map_err(|e| format!("clean sender failed: {e}"))?;
        let acked: HashSet<u32> = self.acked.lock().expect("acked").clone();
        self.answered.store(true, Ordering::Relaxed);
        let (seen, latency) = self
            .receiver_task
            .await
            .map_err(|e| format!("clean receiver failed: {e}"))?;
        let lost = acked.difference(&seen).count() as u64;
        Ok((Latency::from_histogram(&latency), acked.len() as u64, lost))
    }
}

/// How long the clean receiver waits for the last acknowledged messages after sending stopped:
/// one still missing then counts as lost.
const CLEAN_DRAIN_MAX: Duration = Duration::from_secs(60);

async fn connect(target: &Target, user: u64) -> Result<Client, String> {
    target
        .connector()?
        .connect(target.options(user))
        .await
        .map_err(|e| format!("user {user} cannot connect: {e}"))
}

/// A raw connection logged in as `device` of `user`.
async fn raw_login(
    target: &Target,
    connector: &Connector,
    user: u64,
    device: u32,
) -> Result<RawConnection, String> {
    let mut raw = RawConnection::connect(connector, target.addr)
        .await
        .map_err(|e| format!("raw connection: {e}"))?;
    raw.write_frame(&Frame::Hello {
        token: target.device_token(user, device).into_bytes(),
        device,
        acked_up_to: 0,
        resume_after_seq: 0,
    })
    .await
    .map_err(|e| format!("hello: {e}"))?;
    match raw.read_frame().await {
        Ok(Frame::Welcome { .. }) => Ok(raw),
        Ok(other) => Err(format!("expected Welcome, got {}", other.kind())),
        Err(e) => Err(format!("login refused: {e}")),
    }
}

/// Answers to pipelined sends, by kind.
#[derive(Default)]
struct SendTally {
    written: AtomicU64,
    acked: AtomicU64,
    overloaded: AtomicU64,
    too_many_in_flight: AtomicU64,
    other_errors: AtomicU64,
    closed: AtomicU64,
    /// Recipients of acknowledged sends: each is an inbox record the attacker created.
    recipients_stored: Mutex<HashSet<u64>>,
}

impl SendTally {
    fn json(&self) -> serde_json::Value {
        json!({
            "sends_written": self.written.load(Ordering::Relaxed),
            "acked": self.acked.load(Ordering::Relaxed),
            "overloaded": self.overloaded.load(Ordering::Relaxed),
            "too_many_in_flight": self.too_many_in_flight.load(Ordering::Relaxed),
            "other_errors": self.other_errors.load(Ordering::Relaxed),
            "connections_closed": self.closed.load(Ordering::Relaxed),
            "distinct_recipients_stored": self.recipients_stored.lock().expect("tally").len(),
        })
    }
}

/// Pipelines sends on `raw` until `until`, reading every answer on a task of its own.
/// `recipient` picks each send's recipient from its index.
async fn pipeline_sends(
    raw: RawConnection,
    until: Instant,
    body_bytes: usize,
    recipient: impl Fn(u64) -> u64 + Send + Sync + 'static,
    tally: Arc<SendTally>,
) {
    let recipient = Arc::new(recipient);
    let (connection, mut send, mut recv) = raw.into_parts();
    let reader = {
        let tally = tally.clone();
        let recipient = recipient.clone();
        tokio::spawn(async move {
            let mut buffer = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                while let Ok(Some((frame, used))) = courier_protocol::decode(&buffer) {
                    buffer.drain(..used);
                    let counter = match frame {
                        Frame::SendAck { client_id, .. } => {
                            let to = recipient(client_id);
                            tally.recipients_stored.lock().expect("tally").insert(to);
                            &tally.acked
                        }
                        Frame::SendError {
                            code: ErrorCode::Overloaded,
                            ..
                        } => &tally.overloaded,
                        Frame::SendError {
                            code: ErrorCode::TooManyInFlight,
                            ..
                        } => &tally.too_many_in_flight,
                        Frame::SendError { .. } => &tally.other_errors,
                        _ => continue,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                match recv.read(&mut chunk).await {
                    Ok(Some(read)) => buffer.extend_from_slice(&chunk[..read]),
                    Ok(None) | Err(_) => return,
                }
            }
        })
    };
    let mut client_id = 1u64;
    while Instant::now() < until {
        let frame = Frame::Send {
            client_id,
            to: recipient(client_id),
            body: vec![0xAB; body_bytes],
            ttl_secs: Some(600),
        };
        let Ok(bytes) = courier_protocol::encode_to_vec(&frame) else {
            break;
        };
        let remaining = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, send.write_all(&bytes)).await {
            Ok(Ok(())) => {
                tally.written.fetch_add(1, Ordering::Relaxed);
                client_id += 1;
            }
            Ok(Err(_)) => {
                tally.closed.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Err(_) => break, // Flow control held the write until the attack's end.
        }
    }
    connection.close(0u32.into(), b"attack over");
    reader.abort();
}

/// Opens `count` raw connections (handshakes only) with up to 64 at once over 16 sockets.
async fn open_raw(target: &Target, count: u32) -> (Vec<RawConnection>, u64) {
    let connectors: Vec<Connector> = (0..16).filter_map(|_| target.connector().ok()).collect();
    let mut opened = Vec::new();
    let mut refused = 0;
    let mut next = 0u32;
    while next < count && !connectors.is_empty() {
        let batch = (count - next).min(64);
        let mut attempts = tokio::task::JoinSet::new();
        for i in 0..batch {
            let connector = connectors[((next + i) as usize) % connectors.len()].clone();
            let addr = target.addr;
            attempts.spawn(async move { RawConnection::connect(&connector, addr).await });
        }
        while let Some(result) = attempts.join_next().await {
            match result {
                Ok(Ok(raw)) => opened.push(raw),
                _ => refused += 1,
            }
        }
        next += batch;
    }
    (opened, refused)
}

/// Counts how many of `conns` the edge closes before `until`.
async fn count_closed(conns: &[RawConnection], until: Instant) -> u64 {
    let closed = Arc::new(AtomicU64::new(0));
    let mut waits = Vec::new();
    for raw in conns {
        let connection = raw.connection.clone();
        let closed = closed.clone();
        waits.push(tokio::spawn(async move {
            let remaining = until.saturating_duration_since(Instant::now());
            if tokio::time::timeout(remaining, connection.closed())
                .await
                .is_ok()
            {
                closed.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for wait in waits {
        let _ = wait.await;
    }
    closed.load(Ordering::Relaxed)
}

async fn run_attack(
    target: &Target,
    args: &AbuseArgs,
    attack: Attack,
    users: u64,
) -> Result<Outcome, String> {
    let until = Instant::now() + Duration::from_secs(args.secs);
    let victim = users + 50; // Never connects: floods pile up in its inbox.
    match attack {
        Attack::Quiet => {
            tokio::time::sleep_until(until.into()).await;
            Ok(Outcome {
                summary: "no attack".into(),
                details: json!(null),
            })
        }
        Attack::FloodUser | Attack::FloodConnection => {
            let connections = if attack == Attack::FloodUser { 16 } else { 1 };
            let tally = Arc::new(SendTally::default());
            let mut tasks = Vec::new();
            // One device per connection: a second connection of the same device would
            // replace the first.
            for device in 0..connections {
                let connector = target.connector()?;
                let raw = raw_login(target, &connector, users + 40, device).await?;
                let tally = tally.clone();
                tasks.push(tokio::spawn(async move {
                    let _connector = connector;
                    pipeline_sends(
                        raw,
                        until,
                        courier_protocol::BODY_BYTES_MAX,
                        move |_| victim,
                        tally,
                    )
                    .await;
                }));
            }
            for task in tasks {
                let _ = task.await;
            }
            let written = tally.written.load(Ordering::Relaxed);
            let acked = tally.acked.load(Ordering::Relaxed);
            Ok(Outcome {
                summary: format!(
                    "{connections} connection(s): {written} sends of 64 KiB written, {acked} stored \
                     ({:.1} MiB/s), {} refused Overloaded, {} TooManyInFlight",
                    acked as f64 * 64.0 / 1024.0 / args.secs as f64,
                    tally.overloaded.load(Ordering::Relaxed),
                    tally.too_many_in_flight.load(Ordering::Relaxed),
                ),
                details: tally.json(),
            })
        }
        Attack::PartialFrames | Attack::NoHello => {
            let (mut conns, refused) = open_raw(target, args.connections).await;
            if attack == Attack::PartialFrames {
                let frame = courier_protocol::encode_to_vec(&Frame::Send {
                    client_id: 1,
                    to: victim,
                    body: vec![0; courier_protocol::BODY_BYTES_MAX],
                    ttl_secs: None,
                })
                .map_err(|e| e.to_string())?;
                let partial = &frame[..frame.len() - 1024];
                for raw in conns.iter_mut() {
                    let _ = tokio::time::timeout(Duration::from_secs(1), raw.write_bytes(partial))
                        .await;
                }
            }
            let opened = conns.len() as u64;
            let closed = count_closed(&conns, until).await;
            drop(conns);
            Ok(Outcome {
                summary: format!(
                    "{opened} opened, {refused} refused at the handshake, {closed} closed by the \
                     edge within {} s",
                    args.secs
                ),
                details: json!({ "opened": opened, "refused": refused, "closed_by_edge": closed }),
            })
        }
        Attack::Initials => {
            let connector = target.connector()?;
            let mut sockets = Vec::new();
            for host in 2..18u8 {
                let socket = UdpSocket::bind(SocketAddr::from(([127, 0, 0, host], 0)))
                    .map_err(|e| format!("cannot bind 127.0.0.{host}: {e}"))?;
                socket
                    .set_read_timeout(Some(Duration::from_millis(50)))
                    .map_err(|e| e.to_string())?;
                sockets.push(socket);
            }
            let mut sent_bytes = 0u64;
            for i in 0..args.initials {
                let datagram =
                    initial_datagram(&connector, target.addr).map_err(|e| e.to_string())?;
                let socket = &sockets[i as usize % sockets.len()];
                if socket.send_to(&datagram, target.addr).is_ok() {
                    sent_bytes += datagram.len() as u64;
                }
            }
            // Count what comes back until the attack's end: handshake flights, retransmits,
            // Retry packets.
            let received = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
            let mut readers = Vec::new();
            for socket in sockets {
                let received = received.clone();
                readers.push(std::thread::spawn(move || {
                    let mut buf = vec![0u8; 65_536];
                    while Instant::now() < until {
                        if let Ok((n, _)) = socket.recv_from(&mut buf) {
                            received.0.fetch_add(1, Ordering::Relaxed);
                            received.1.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                }));
            }
            for reader in readers {
                let _ = reader.join();
            }
            let (datagrams, bytes) = (
                received.0.load(Ordering::Relaxed),
                received.1.load(Ordering::Relaxed),
            );
            Ok(Outcome {
                summary: format!(
                    "{} Initials ({:.1} MB) from 16 addresses; the edge sent back {datagrams} \
                     datagrams ({:.2} MB, {:.2}x what it received)",
                    args.initials,
                    sent_bytes as f64 / 1e6,
                    bytes as f64 / 1e6,
                    bytes as f64 / sent_bytes.max(1) as f64,
                ),
                details: json!({
                    "initials": args.initials, "initial_bytes": sent_bytes,
                    "datagrams_back": datagrams, "bytes_back": bytes,
                }),
            })
        }
        Attack::StalledFrame => {
            let connector = target.connector()?;
            let mut raw = raw_login(target, &connector, users + 41, 0).await?;
            // A real frame's length prefix and the first byte of its body.
            let ping = courier_protocol::encode_to_vec(&Frame::Ping { nonce: 1 })
                .map_err(|e| e.to_string())?;
            raw.write_bytes(&ping[..courier_protocol::LENGTH_PREFIX_BYTES + 1])
                .await
                .map_err(|e| e.to_string())?;
            let closed = count_closed(std::slice::from_ref(&raw), until).await;
            Ok(Outcome {
                summary: if closed == 1 {
                    format!("closed by the edge within {} s", args.secs)
                } else {
                    format!("still open after {} s", args.secs)
                },
                details: json!({ "closed_by_edge": closed == 1 }),
            })
        }
        Attack::Recipients => {
            let connector = target.connector()?;
            let raw = raw_login(target, &connector, users + 42, 0).await?;
            let tally = Arc::new(SendTally::default());
            let base = users + 1_000_000;
            let limit = u64::from(args.recipients);
            pipeline_sends(
                raw,
                until,
                16,
                move |i| base + (i % limit.max(1)),
                tally.clone(),
            )
            .await;
            let distinct = tally.recipients_stored.lock().expect("tally").len();
            Ok(Outcome {
                summary: format!(
                    "{} sends over {limit} ids: {distinct} distinct recipients stored (each a new \
                     inbox record), {} sends refused",
                    tally.written.load(Ordering::Relaxed),
                    tally.overloaded.load(Ordering::Relaxed)
                        + tally.too_many_in_flight.load(Ordering::Relaxed),
                ),
                details: tally.json(),
            })
        }
    }
}

/// Runs the attacks one after another, each with its own clean pair.
pub async fn abuse(target: &Target, args: &AbuseArgs) -> Result<Report, String> {
    let attacks = if args.attacks.is_empty() {
        Attack::ALL.to_vec()
    } else {
        args.attacks.clone()
    };
    let mut report = Report::new(
        "abuse",
        json!({
            "attacks": attacks.iter().map(|a| a.name()).collect::<Vec<_>>(),
            "secs": args.secs, "settle_secs": args.settle_secs, "clean_rate": args.clean_rate,
            "connections": args.connections, "initials": args.initials,
            "recipients": args.recipients, "rss_max_mib": args.rss_max_mib,
        }),
    );
    let started = Instant::now();
    let cpu_start = target.edge_usage().map(|(cpu, _)| cpu);
    let mut rows = Vec::new();
    for (index, attack) in attacks.iter().enumerate() {
        let users = target.user_base + 100 * index as u64;
        let rss_before = target.edge_usage().map(|(_, rss)| rss);
        eprintln!("attack {}: running for {} s", attack.name(), args.secs);
        let sampler = RssSampler::start(target.pid);
        let clean = CleanPair::start(target, (users + 1, users + 2), args.clean_rate).await?;
        let outcome = run_attack(target, args, *attack, users).await;
        let clean_result = clean.finish().await;
        let rss_peak = sampler.finish().await;
        tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
        let rss_after = target.edge_usage().map(|(_, rss)| rss);
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(error) => {
                report.errors.push(format!("{}: {error}", attack.name()));
                Outcome {
                    summary: format!("did not run: {error}"),
                    details: json!(null),
                }
            }
        };
        let (latency, acked, lost) = match clean_result {
            Ok(result) => result,
            Err(error) => {
                report.errors.push(format!("{}: {error}", attack.name()));
                (None, 0, 0)
            }
        };
        report.messages_acked += acked;
        report.lost += lost;
        if lost > 0 {
            report.errors.push(format!(
                "{}: the clean pair lost {lost} acknowledged messages",
                attack.name()
            ));
        }
        if let Some(max_mib) = args.rss_max_mib
            && rss_peak > max_mib * 1024 * 1024
        {
            report.errors.push(format!(
                "{}: edge memory peaked at {} MiB, over --rss-max-mib {max_mib}",
                attack.name(),
                rss_peak / (1024 * 1024)
            ));
        }
        let mib = |bytes: Option<u64>| bytes.map(|b| b / (1024 * 1024));
        let (p50, p99) = latency
            .as_ref()
            .map_or((None, None), |l| (Some(l.p50_us), Some(l.p99_us)));
        eprintln!(
            "attack {}: {}; edge RSS {:?} -> peak {} -> {:?} MiB; clean pair p50 {:?} µs p99 {:?} µs, {acked} acked, {lost} lost",
            attack.name(),
            outcome.summary,
            mib(rss_before),
            rss_peak / (1024 * 1024),
            mib(rss_after),
            p50,
            p99,
        );
        rows.push(json!({
            "attack": attack.name(),
            "outcome": outcome.summary,
            "details": outcome.details,
            "edge_rss_mib_before": mib(rss_before),
            "edge_rss_mib_peak": rss_peak / (1024 * 1024),
            "edge_rss_mib_after": mib(rss_after),
            "clean_p50_us": p50,
            "clean_p99_us": p99,
            "clean_acked": acked,
            "clean_lost": lost,
        }));
    }
    report.duration_secs = started.elapsed().as_secs_f64();
    if let (Some(start), Some((cpu, rss))) = (cpu_start, target.edge_usage()) {
        report.edge_cpu_secs = Some(cpu - start);
        report.edge_rss_bytes = Some(rss);
    }
    report.extra.insert("attacks".into(), json!(rows));
    Ok(report)
}
