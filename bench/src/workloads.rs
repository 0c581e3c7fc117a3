//! The workloads. Each connects real clients (through the SDK, or for `pairs --driver direct`
//! through `direct`), measures, and checks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use courier_client::{Client, ConnectOptions, Connector, Delivery, EarlySend};
use hdrhistogram::Histogram;
use serde_json::json;

use crate::edge::{Target, process_usage};
use crate::report::{Latency, Report, latency_histogram};

/// Bytes of the header every bench message body starts with: pair, index, send time.
pub(crate) const HEADER_BYTES: usize = 4 + 4 + 8;

#[derive(Args, Debug, Clone)]
pub struct PairsArgs {
    /// Sender→receiver pairs.
    #[arg(long, default_value_t = 100)]
    pub pairs: u32,
    /// Messages each sender sends.
    #[arg(long, default_value_t = 1000)]
    pub msgs: u32,
    /// Bytes of each message body (at least 16).
    #[arg(long, default_value_t = 200)]
    pub bytes: usize,
    /// Closed loop: unacknowledged sends per sender.
    #[arg(long, default_value_t = 32)]
    pub in_flight: u32,
    /// Paced instead of closed loop: messages per second per sender.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Paced only: every sender ticks at the same instants, so the edge gets bursts of
    /// `--pairs` sends at once (how paced runs were made before 2026-11-29). By default the
    /// senders' ticks are spread over the interval, as independent clients' would be.
    #[arg(long)]
    pub aligned: bool,
    /// After the last send, wait at most this long for deliveries before counting the rest lost.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout_secs: u64,
    /// Spawned edge only: after the drain, wait this long and measure the store's size on
    /// disk again (with a short `retention.erase_within_secs` from --edge-config, it shows
    /// deleted messages leaving the disk). 0: do not wait.
    #[arg(long, default_value_t = 0)]
    pub settle_secs: u64,
    /// Courier's `pairs` only: `sdk` drives each client through the client SDK (its tokio
    /// tasks, what applications run); `direct` drives every client from one thread with
    /// quinn-proto and the SDK's own protocol session, a half to three quarters of the load
    /// generator's CPU per message, so the edge rather than the load generator bounds the run
    /// (bench/src/direct.rs). Same checks and report.
    #[arg(long, value_enum, default_value_t = Driver::Sdk)]
    pub driver: Driver,
}

/// How `pairs` drives its clients (`--driver`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Sdk,
    Direct,
}

#[derive(Args, Debug, Clone)]
pub struct ConnectionsArgs {
    /// Idle connections to open.
    #[arg(long, default_value_t = 10_000)]
    pub connections: u32,
    /// Seconds to hold them.
    #[arg(long, default_value_t = 10)]
    pub hold_secs: u64,
    /// Client UDP sockets to spread the connections over.
    #[arg(long, default_value_t = 16)]
    pub sockets: u32,
    /// Connections opened at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: u32,
    /// The clients' keep-alive interval. Idle connections are not free: every keep-alive is a
    /// packet in and an acknowledgement out, so 2 s (the SDK's default for agents) at 100,000
    /// connections is 50,000 packets/s. The default is what a phone app would choose.
    #[arg(long, default_value_t = 25_000)]
    pub keep_alive_ms: u64,
    /// Connections started per second (0: as fast as `--concurrency` allows). A rate the load
    /// generator keeps up with measures the edge's cost per connection, not the generator's.
    #[arg(long, default_value_t = 0)]
    pub rate: u32,
    /// Give every connection an empty TLS session cache, so that each makes a full handshake
    /// (the edge's certificate and its signature) like a freshly installed app. Without it a
    /// socket's connections resume the sessions of the ones before them (a ticket each), as
    /// a device reconnecting does: resumed handshakes, with a key exchange but no certificate.
    #[arg(long)]
    pub full_handshakes: bool,
    /// `sdk` opens each connection through the client SDK (a connector per socket, tokio
    /// tasks); `direct` drives every connection from one thread with quinn-proto and the SDK's
    /// protocol session (bench/src/direct.rs), so the load generator is not the limit of the
    /// rate. Direct connections resume TLS sessions without 0-RTT data (their `Hello` goes
    /// once the handshake is done); the SDK's send it as 0-RTT.
    #[arg(long, value_enum, default_value_t = Driver::Sdk)]
    pub driver: Driver,
}

#[derive(Args, Debug, Clone)]
pub struct HandshakesArgs {
    /// Handshakes to make.
    #[arg(long, default_value_t = 5_000)]
    pub connections: u32,
    /// Handshakes under way at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: u32,
    /// Client UDP sockets to spread them over.
    #[arg(long, default_value_t = 16)]
    pub sockets: u32,
    /// Resume the TLS session of the socket's previous connection (a ticket each, as a
    /// device reconnecting): a key exchange, no certificate. Default: full handshakes, each
    /// with an empty session cache, as a freshly installed app.
    #[arg(long)]
    pub resumed: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ReconnectArgs {
    /// Connections per phase (full handshakes, then resumed with 0-RTT).
    #[arg(long, default_value_t = 2000)]
    pub connections: u32,
    /// Connections made at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: u32,
}

#[derive(Args, Debug, Clone)]
pub struct RestartArgs {
    /// Clients connected (idle, with the SDK's own reconnect) when the edge is killed.
    #[arg(long, default_value_t = 1000)]
    pub clients: u32,
    /// SIGKILL-and-restart cycles.
    #[arg(long, default_value_t = 3)]
    pub restarts: u32,
    /// Stop the edge with SIGTERM and wait for its exit instead of killing it, as a deploy
    /// does: it closes its connections and saves its TLS sessions
    /// (`tls.sessions_survive_restart`), so the clients come back resuming them.
    #[arg(long)]
    pub graceful: bool,
    /// Undelivered messages to store first (to offline recipients), so every restart
    /// recovers a store that size.
    #[arg(long, default_value_t = 0)]
    pub fill: u64,
    /// Bytes of each fill message body.
    #[arg(long, default_value_t = 200)]
    pub bytes: usize,
    /// Fill senders, each closed loop with --in-flight unanswered sends.
    #[arg(long, default_value_t = 32)]
    pub fill_senders: u32,
    #[arg(long, default_value_t = 64)]
    pub in_flight: u32,
    /// The clients' keep-alive interval: how soon an idle client learns that the restarted
    /// edge forgot its connection.
    #[arg(long, default_value_t = 2_000)]
    pub keep_alive_ms: u64,
    /// Client UDP sockets to spread the clients over.
    #[arg(long, default_value_t = 16)]
    pub sockets: u32,
}

/// A receiver's client: connected already, or to connect in its own task.
enum ReceiverClient {
    Connected(Client),
    Connect(Box<Connector>, ConnectOptions),
}

/// CPU seconds (user + system) this process has used so far.
pub(crate) fn own_cpu_secs() -> Option<f64> {
    process_usage(std::process::id()).map(|(cpu, _)| cpu)
}

pub(crate) fn micros(duration: Duration) -> u64 {
    (duration.as_micros() as u64).max(1)
}

/// What the edge used over a run (every edge's, added up), if its PID is known: CPU seconds,
/// memory at the end, bytes handed to `write`, context switches and disk writes.
struct EdgeUsage {
    cpu_start: Option<f64>,
    write_calls_start: Option<u64>,
    counters: crate::edge::ServerCounters,
    /// This process's CPU seconds at the start: a load generator near one full core adds its
    /// own queueing to the latencies it measures.
    bench_cpu_start: Option<f64>,
    /// When the CPU counting began: `cpu_window_secs` in the report, to set against the
    /// run's duration.
    started: Instant,
}

impl EdgeUsage {
    fn start(target: &Target) -> EdgeUsage {
        EdgeUsage {
            cpu_start: target.edge_usage().map(|(cpu, _)| cpu),
            write_calls_start: target.edge_write_call_bytes(),
            counters: target.server_counters(),
            bench_cpu_start: own_cpu_secs(),
            started: Instant::now(),
        }
    }

    fn finish(&self, target: &Target, report: &mut Report) {
        report.extra.insert(
            "cpu_window_secs".into(),
            json!(self.started.elapsed().as_secs_f64()),
        );
        if let Some(start) = self.cpu_start
            && let Some((cpu, rss)) = target.edge_usage()
        {
            report.edge_cpu_secs = Some(cpu - start);
            report.edge_rss_bytes = Some(rss);
        }
        if let (Some(start), Some(now)) = (self.bench_cpu_start, own_cpu_secs()) {
            report
                .extra
                .insert("bench_cpu_secs".into(), json!(now - start));
        }
        // What the store handed to `write` for the run (journal, flushes, compactions): unlike
        // CPU time, it hardly depends on how busy the machine is.
        if let (Some(start), Some(now)) = (self.write_calls_start, target.edge_write_call_bytes()) {
            report.record_count("edge_write_call_bytes", now.saturating_sub(start));
        }
        self.counters.finish(report);
    }
}

/// The drain's own CPU, apart from the sends before it: the edge's and this process's (the
/// receivers'), to tell which side bounds the drain rate.
#[derive(Clone, Copy)]
struct DrainCpu {
    edge_start: Option<f64>,
    bench_start: Option<f64>,
}

impl DrainCpu {
    fn start(target: &Target) -> DrainCpu {
        DrainCpu {
            edge_start: target.edge_usage().map(|(cpu, _)| cpu),
            bench_start: own_cpu_secs(),
        }
    }

    /// Adds `drain_edge_cpu_secs` and `drain_bench_cpu_secs`.
    fn finish(&self, target: &Target, report: &mut Report) {
        if let (Some(start), Some((cpu, _))) = (self.edge_start, target.edge_usage()) {
            report
                .extra
                .insert("drain_edge_cpu_secs".into(), json!(cpu - start));
        }
        if let (Some(start), Some(now)) = (self.bench_start, own_cpu_secs()) {
            report
                .extra
                .insert("drain_bench_cpu_secs".into(), json!(now - start));
        }
    }
}

/// What the receivers saw, per pair.
struct PairState {
    /// Seq the sender was told for each message index (0: not acknowledged).
    acked_seq: Vec<AtomicU64>,
    /// Seq each index was delivered with (0: not delivered).
    delivered_seq: Mutex<Vec<u64>>,
}

/// Shared counters for the progress line and the checks.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
    delivered: AtomicU64,
    /// UDP datagrams the receivers' connections sent and received, added as each receiver
    /// finishes (see `client_datagrams`).
    receiver_datagrams: AtomicU64,
    duplicates: AtomicU64,
    reordered: AtomicU64,
    misdelivered: AtomicU64,
    /// Receivers that have every message of their pair, or have given up: the run's
    /// figures end when all have (`all_received`).
    receivers_done: AtomicU64,
    receiver_done: tokio::sync::Notify,
}

/// Counts a receiver as done once, when told or when its task ends however it ends.
struct ReceiverDone(Option<Arc<Counters>>);

impl ReceiverDone {
    fn now(&mut self) {
        if let Some(counters) = self.0.take() {
            counters.receivers_done.fetch_add(1, Ordering::Relaxed);
            counters.receiver_done.notify_one();
        }
    }
}

impl Drop for ReceiverDone {
    fn drop(&mut self) {
        self.now();
    }
}

/// How long a receiver goes on reading after its last expected message: a copy the edge
/// delivers after it (a message stored twice, under a new seq) counts as a duplicate, not
/// unseen because the run had ended.
pub(crate) const TRAILING_QUIET: Duration = Duration::from_millis(200);

/// A message's body: its pair, its index and when it was meant to be sent (`sent_at`, ns since
/// `epoch`), padded to `bytes`. A paced send's time is its tick, not when the load generator
/// got to it: a generator running late would otherwise leave its own lag out of the latency
/// (coordinated omission), and that lag comes when deliveries arrive in bursts.
pub(crate) fn body(
    pair: u32,
    index: u32,
    bytes: usize,
    epoch: Instant,
    sent_at: Instant,
) -> Vec<u8> {
    let mut body = Vec::with_capacity(bytes.max(HEADER_BYTES));
    body.extend_from_slice(&pair.to_be_bytes());
    body.extend_from_slice(&index.to_be_bytes());
    let sent_ns = sent_at.saturating_duration_since(epoch).as_nanos() as u64;
    body.extend_from_slice(&sent_ns.to_be_bytes());
    body.resize(bytes.max(HEADER_BYTES), 0x5A);
    body
}

/// Whether `body` is as [`body`] made it for a message of `bytes`: its length, and padding
/// untouched. A damaged or cut body must not pass for a delivery.
pub(crate) fn body_intact(body: &[u8], bytes: usize) -> bool {
    body.len() == bytes.max(HEADER_BYTES) && body[HEADER_BYTES..].iter().all(|b| *b == 0x5A)
}

pub(crate) fn parse_body(body: &[u8]) -> Option<(u32, u32, u64)> {
    let pair = u32::from_be_bytes(body.get(0..4)?.try_into().ok()?);
    let index = u32::from_be_bytes(body.get(4..8)?.try_into().ok()?);
    let sent_ns = u64::from_be_bytes(body.get(8..16)?.try_into().ok()?);
    Some((pair, index, sent_ns))
}

async fn connect(target: &Target, user: u64) -> Result<Client, String> {
    let connector = target.connector()?;
    connector
        .connect(target.options(user))
        .await
        .map_err(|e| format!("user {user} cannot connect: {e}"))
}

/// Prints a progress line every second until `stop` is set.
fn progress(
    counters: Arc<Counters>,
    expected: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let start = Instant::now();
        let mut last_delivered = 0;
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let delivered = counters.delivered.load(Ordering::Relaxed);
            eprintln!(
                "[{:>5.1}s] sent {} acked {} delivered {}/{} ({} /s)",
                start.elapsed().as_secs_f64(),
                counters.sent.load(Ordering::Relaxed),
                counters.acked.load(Ordering::Relaxed),
                delivered,
                expected,
                delivered - last_delivered
            );
            last_delivered = delivered;
        }
    })
}

/// `pairs` and `offline`: senders send to receivers; check every acknowledged message arrives
/// once, in order, at the seq the sender was told.
pub async fn pairs(target: &Target, args: &PairsArgs, offline: bool) -> Result<Report, String> {
    let workload = if offline { "offline" } else { "pairs" };
    let mut report = Report::new(workload, args.params());
    if args.bytes < HEADER_BYTES {
        return Err(format!("--bytes must be at least {HEADER_BYTES}"));
    }
    let epoch = Instant::now();
    let sender_user = |pair: u32| pair_users(target, pair).0;
    let receiver_user = |pair: u32| pair_users(target, pair).1;
    let states: Arc<Vec<PairState>> = Arc::new(
        (0..args.pairs)
            .map(|_| PairState {
                acked_seq: (0..args.msgs).map(|_| AtomicU64::new(0)).collect(),
                delivered_seq: Mutex::new(vec![0; args.msgs as usize]),
            })
            .collect(),
    );
    let counters = Arc::new(Counters::default());
    let deliver_hist = Arc::new(Mutex::new(latency_histogram()));
    let expected = u64::from(args.pairs) * u64::from(args.msgs);

    let mut senders = Vec::new();
    for pair in 0..args.pairs {
        senders.push(connect(target, sender_user(pair)).await?);
    }
    let mut receivers = Vec::new();
    if !offline {
        for pair in 0..args.pairs {
            receivers.push(connect(target, receiver_user(pair)).await?);
        }
    } else {
        // Receivers log in once, so they exist, and leave.
        for pair in 0..args.pairs {
            drop(connect(target, receiver_user(pair)).await?);
        }
    }
    eprintln!("{workload}: {} pairs connected", args.pairs);

    let disk_baseline = target.store_disk_bytes();
    let usage = EdgeUsage::start(target);
    // Datagrams the clients' connections carried before the clock starts (their handshakes
    // and logins), taken off at the end.
    let datagrams_before: u64 = senders.iter().chain(&receivers).map(client_datagrams).sum();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let progress_task = progress(counters.clone(), expected, stop.clone());
    let start = Instant::now();
    let mut receive_tasks = Vec::new();
    let spawn_receiver =
        |pair: usize,
         client: ReceiverClient,
         receive_tasks: &mut Vec<tokio::task::JoinHandle<Result<Instant, String>>>| {
            let states = states.clone();
            let counters = counters.clone();
            let hist = deliver_hist.clone();
            let (msgs, bytes) = (args.msgs as usize, args.bytes);
            receive_tasks.push(tokio::spawn(async move {
                let mut done = ReceiverDone(Some(counters.clone()));
                let mut client = match client {
                    ReceiverClient::Connected(client) => client,
                    ReceiverClient::Connect(connector, options) => connector
                        .connect(options)
                        .await
                        .map_err(|e| format!("receiver of pair {pair} cannot connect: {e}"))?,
                };
                let mut last = Instant::now();
                let mut received = 0usize;
                let mut last_seq = 0;
                let mut local = latency_histogram();
                // Checks one delivery; true if it is a message of this pair not seen before.
                let mut check = |delivery: &Delivery, local: &mut Histogram<u64>| {
                    if delivery.seq <= last_seq {
                        counters.reordered.fetch_add(1, Ordering::Relaxed);
                    }
                    last_seq = delivery.seq;
                    let parsed = parse_body(&delivery.body)
                        .filter(|_| body_intact(&delivery.body, bytes))
                        .filter(|(from_pair, index, _)| {
                            *from_pair as usize == pair && (*index as usize) < msgs
                        });
                    let Some((_, index, sent_ns)) = parsed else {
                        counters.misdelivered.fetch_add(1, Ordering::Relaxed);
                        return false;
                    };
                    let mut delivered = states[pair].delivered_seq.lock().expect("state");
                    if delivered[index as usize] != 0 {
                        counters.duplicates.fetch_add(1, Ordering::Relaxed);
                        return false;
                    }
                    delivered[index as usize] = delivery.seq;
                    drop(delivered);
                    counters.delivered.fetch_add(1, Ordering::Relaxed);
                    let now_ns = epoch.elapsed().as_nanos() as u64;
                    let _ = local.record((now_ns.saturating_sub(sent_ns) / 1000).max(1));
                    true
                };
                while received < msgs {
                    let Some(delivery) = client.recv_message().await else {
                        break;
                    };
                    last = Instant::now();
                    if check(&delivery, &mut local) {
                        received += 1;
                    }
                }
                // The run's figures end here; what comes after is only checked.
                done.now();
                let datagrams = client_datagrams(&client);
                if received == msgs {
                    let quiet_until = tokio::time::Instant::now() + TRAILING_QUIET;
                    while let Ok(Some(delivery)) =
                        tokio::time::timeout_at(quiet_until, client.recv_message()).await
                    {
                        check(&delivery, &mut local);
                    }
                }
                hist.lock()
                    .expect("histogram")
                    .add(&local)
                    .expect("same bounds");
                counters
                    .receiver_datagrams
                    .fetch_add(datagrams, Ordering::Relaxed);
                Ok(last)
            }));
        };
    for (pair, client) in std::mem::take(&mut receivers).into_iter().enumerate() {
        spawn_receiver(pair, ReceiverClient::Connected(client), &mut receive_tasks);
    }

    // Senders. Paced senders' phases count from one start, not from when each task first runs.
    let paced_start = tokio::time::Instant::now();
    let mut send_tasks = Vec::new();
    for (pair, client) in senders.iter().enumerate() {
        let pair = pair as u32;
        let to = receiver_user(pair);
        let sender = client.sender();
        let states = states.clone();
        let counters = counters.clone();
        let args = args.clone();
        send_tasks.push(tokio::spawn(async move {
            let hist = Arc::new(Mutex::new(latency_histogram()));
            let next = Arc::new(AtomicU64::new(0));
            let lanes = if args.rate.is_some() {
                1
            } else {
                args.in_flight.max(1)
            };
            let paced_interval = args
                .rate
                .map(|rate| Duration::from_secs_f64(1.0 / rate.max(0.001)));
            let mut lane_tasks = Vec::new();
            if let Some(interval) = paced_interval {
                // Paced: one send started per tick, each in its own task so a slow ack does
                // not delay the next send.
                let mut ticker = tokio::time::interval_at(
                    paced_start + tick_phase(pair, interval, args.aligned),
                    interval,
                );
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                for index in 0..args.msgs {
                    let scheduled = ticker.tick().await.into_std();
                    let sender = sender.clone();
                    let (states, counters, hist) = (states.clone(), counters.clone(), hist.clone());
                    let bytes = args.bytes;
                    lane_tasks.push(tokio::spawn(async move {
                        send_one(
                            &sender,
                            to,
                            (pair, index, bytes),
                            (epoch, scheduled),
                            &states,
                            &counters,
                            &hist,
                        )
                        .await
                    }));
                }
            } else {
                for _ in 0..lanes {
                    let sender = sender.clone();
                    let (states, counters, hist, next) =
                        (states.clone(), counters.clone(), hist.clone(), next.clone());
                    let (msgs, bytes) = (args.msgs, args.bytes);
                    lane_tasks.push(tokio::spawn(async move {
                        loop {
                            let index = next.fetch_add(1, Ordering::Relaxed);
                            if index >= u64::from(msgs) {
                                return Ok(());
                            }
                            send_one(
                                &sender,
                                to,
                                (pair, index as u32, bytes),
                                (epoch, Instant::now()),
                                &states,
                                &counters,
                                &hist,
                            )
                            .await?;
                        }
                    }));
                }
            }
            let mut errors = Vec::new();
            for task in lane_tasks {
                match task.await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => errors.push(error),
                    Err(error) => errors.push(error.to_string()),
                }
            }
            let hist = hist.lock().expect("histogram").clone();
            (hist, errors)
        }));
    }
    let mut ack_hist = latency_histogram();
    // Bounded: an edge that stops answering (killed, hung) leaves every send waiting, since
    // the clients reconnect and keep them pending. The run ends once no send was acknowledged
    // and nothing was delivered for `--drain-timeout-secs`.
    let stall_max = Duration::from_secs(args.drain_timeout_secs);
    let mut progress = (0, 0);
    let mut progress_at = Instant::now();
    for mut task in send_tasks {
        let (hist, errors) = loop {
            match tokio::time::timeout(Duration::from_secs(1), &mut task).await {
                Ok(joined) => break joined.map_err(|e| e.to_string())?,
                Err(_) => {
                    let now = (
                        counters.acked.load(Ordering::Relaxed),
                        counters.delivered.load(Ordering::Relaxed),
                    );
                    if now != progress {
                        (progress, progress_at) = (now, Instant::now());
                    } else if progress_at.elapsed() >= stall_max {
                        task.abort();
                        return Err(format!(
                            "{workload}: no send acknowledged and nothing delivered for {} s \
                             ({} of {} acknowledged): is the edge still running?",
                            stall_max.as_secs(),
                            now.0,
                            u64::from(args.pairs) * u64::from(args.msgs)
                        ));
                    }
                }
            }
        };
        ack_hist.add(&hist).expect("same bounds");
        report.errors.extend(errors.into_iter().take(5));
    }
    let sends_done = Instant::now();
    eprintln!(
        "{workload}: all sends acknowledged after {:.2} s",
        start.elapsed().as_secs_f64()
    );
    let disk_filled = target.store_disk_bytes();

    let drain_start = Instant::now();
    let drain_cpu = DrainCpu::start(target);
    if offline {
        // The receivers come back together, as a fleet of phones does when a network returns:
        // each connects in its own task and drains as soon as it is in. (Connected one after
        // another, the drain measured mostly the 100 handshakes in a row, ~3.7 ms each on a
        // busy edge, not the edge's delivery.)
        for pair in 0..args.pairs {
            let connect = ReceiverClient::Connect(
                Box::new(target.connector()?),
                target.options(receiver_user(pair)),
            );
            spawn_receiver(pair as usize, connect, &mut receive_tasks);
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.drain_timeout_secs);
    // The CPU figures end when the last receiver has its messages, not after the receivers'
    // trailing quiet and closes, nor at the progress line's next second.
    let receivers = receive_tasks.len() as u64;
    let all_received = async {
        while counters.receivers_done.load(Ordering::Relaxed) < receivers {
            counters.receiver_done.notified().await;
        }
    };
    let all_in = tokio::time::timeout_at(deadline, all_received)
        .await
        .is_ok();
    // Receivers that have everything are only in their trailing quiet: wait it out, even
    // past the drain's deadline, which they met.
    let join_deadline = if all_in {
        tokio::time::Instant::now() + TRAILING_QUIET + Duration::from_secs(2)
    } else {
        deadline
    };
    if offline {
        drain_cpu.finish(target, &mut report);
    }
    usage.finish(target, &mut report);
    stop.store(true, Ordering::Relaxed);
    progress_task.abort();
    let mut last_delivery = sends_done;
    for task in receive_tasks {
        match tokio::time::timeout_at(join_deadline, task).await {
            Ok(Ok(Ok(last))) => last_delivery = last_delivery.max(last),
            Ok(Ok(Err(error))) => report.errors.push(error),
            Ok(Err(error)) => report.errors.push(error.to_string()),
            Err(_) => {
                report
                    .errors
                    .push("deliveries still missing at the drain timeout".into());
                break;
            }
        }
    }
    // Every datagram between the clients and the edge, both ways, is one the clients sent or
    // received: counted by their QUIC connections, so a GSO batch counts each datagram in it.
    let datagrams = senders.iter().map(client_datagrams).sum::<u64>()
        + counters.receiver_datagrams.load(Ordering::Relaxed);
    let datagrams = datagrams.saturating_sub(datagrams_before);
    if let (Some(baseline), Some(filled)) = (disk_baseline, disk_filled) {
        report
            .extra
            .insert("store_disk_bytes_before".into(), json!(baseline));
        report
            .extra
            .insert("store_disk_bytes_filled".into(), json!(filled));
        report.extra.insert(
            "store_disk_bytes_drained".into(),
            json!(target.store_disk_bytes()),
        );
        if args.settle_secs > 0 {
            tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
            report.extra.insert(
                "store_disk_bytes_settled".into(),
                json!(target.store_disk_bytes()),
            );
        }
    }

    // Checks: every acknowledged message delivered, at the seq the sender was told.
    for state in states.iter() {
        let delivered = state.delivered_seq.lock().expect("state");
        let acked = state
            .acked_seq
            .iter()
            .map(|seq| seq.load(Ordering::Relaxed));
        report.check_seqs(acked, delivered.iter().copied());
    }
    report.messages_sent = counters.sent.load(Ordering::Relaxed);
    report.messages_acked = counters.acked.load(Ordering::Relaxed);
    report.messages_delivered = counters.delivered.load(Ordering::Relaxed);
    report.duplicates = counters.duplicates.load(Ordering::Relaxed);
    report.misdelivered = counters.misdelivered.load(Ordering::Relaxed);
    report.reordered = counters.reordered.load(Ordering::Relaxed);
    report.record_count("udp_datagrams", datagrams);
    let clocks = RunClocks {
        start,
        sends_done,
        drain_start,
        last_delivery,
    };
    clocks.fill(&mut report, offline);
    report.send_ack_latency = Latency::from_histogram(&ack_hist);
    if !offline {
        report.deliver_latency = Latency::from_histogram(&deliver_hist.lock().expect("histogram"));
    }
    drop(senders);
    Ok(report)
}

/// The sender's and the receiver's user of `pair`.
fn pair_users(target: &Target, pair: u32) -> (u64, u64) {
    let base = target.user_base + 2 * u64::from(pair);
    (base + 1, base + 2)
}

impl PairsArgs {
    /// The report's `params`.
    fn params(&self) -> serde_json::Value {
        json!({
            "pairs": self.pairs, "msgs": self.msgs, "bytes": self.bytes,
            "in_flight": self.in_flight, "rate": self.rate, "aligned": self.aligned,
            "driver": match self.driver { Driver::Sdk => "sdk", Driver::Direct => "direct" },
        })
    }
}

/// `pairs` and `offline` with `--driver direct`: the same workloads, checks and report as
/// `pairs` (but for `store_disk_bytes_filled` and `--settle-secs`), with the clients driven by
/// `direct` from this thread (blocking it for the run).
pub async fn pairs_direct(
    target: &Target,
    args: &PairsArgs,
    offline: bool,
) -> Result<Report, String> {
    let workload = if offline { "offline" } else { "pairs" };
    let report = Report::new(workload, args.params());
    if args.bytes < HEADER_BYTES {
        return Err(format!("--bytes must be at least {HEADER_BYTES}"));
    }
    if args.settle_secs > 0 {
        return Err("--settle-secs needs --driver sdk".into());
    }
    if target.edge_count() > 1 {
        return Err(
            "--driver direct connects every client to one edge and does not follow a \
             redirect to another: not with --spawn-edges (use --driver sdk)"
                .into(),
        );
    }
    let connector = target.connector()?;
    let plan = crate::direct::Plan {
        addr: target.options(target.user_base).addr,
        quic: connector.quic_client_config(),
        server_name: connector.server_name().to_string(),
        pairs: (0..args.pairs)
            .map(|pair| {
                let (sender, receiver) = pair_users(target, pair);
                (
                    target.options(sender).session_config(),
                    target.options(receiver).session_config(),
                    receiver,
                )
            })
            .collect(),
        msgs: args.msgs,
        bytes: args.bytes,
        in_flight: args.in_flight,
        rate: args.rate,
        aligned: args.aligned,
        offline,
        drain_timeout: Duration::from_secs(args.drain_timeout_secs),
        epoch: Instant::now(),
    };
    let drain_cpu = std::cell::Cell::new(None);
    let usage = std::cell::RefCell::new(None);
    let disk = std::cell::Cell::new((None, None));
    let report_cell = std::cell::RefCell::new(report);
    let outcome = tokio::task::block_in_place(|| {
        crate::direct::run(
            &plan,
            || {
                eprintln!("{workload}: {} pairs connected (direct driver)", args.pairs);
                disk.set((target.store_disk_bytes(), None));
                *usage.borrow_mut() = Some(EdgeUsage::start(target));
            },
            || {
                eprintln!("{workload}: all sends acknowledged; the receivers come back");
                drain_cpu.set(Some(DrainCpu::start(target)));
            },
            || {
                let mut report = report_cell.borrow_mut();
                if let Some(usage) = usage.borrow().as_ref() {
                    usage.finish(target, &mut report);
                }
                disk.set((disk.get().0, target.store_disk_bytes()));
                if let Some(drain_cpu) = drain_cpu.get() {
                    drain_cpu.finish(target, &mut report);
                }
            },
        )
    })?;
    let mut report = report_cell.into_inner();
    if let (Some(before), Some(drained)) = disk.get() {
        report
            .extra
            .insert("store_disk_bytes_before".into(), json!(before));
        report
            .extra
            .insert("store_disk_bytes_drained".into(), json!(drained));
    }
    for (acked, delivered) in outcome.acked_seq.iter().zip(&outcome.delivered_seq) {
        report.check_seqs(acked.iter().copied(), delivered.iter().copied());
    }
    report.messages_sent = outcome.sent;
    report.messages_acked = outcome.acked;
    report.messages_delivered = outcome.delivered;
    report.duplicates = outcome.duplicates;
    report.reordered = outcome.reordered;
    report.misdelivered = outcome.misdelivered;
    // The last error (a drain timeout) always; the first few otherwise.
    let errors = &outcome.errors;
    report.errors.extend(errors.iter().take(4).cloned());
    if errors.len() > 4 {
        report.errors.extend(errors.last().cloned());
    }
    report.record_count("udp_datagrams", outcome.datagrams);
    let start = outcome.start.unwrap_or_else(Instant::now);
    let sends_done = outcome.sends_done.unwrap_or(start);
    let drain_start = outcome.drain_start.unwrap_or(sends_done);
    let clocks = RunClocks {
        start,
        sends_done,
        drain_start,
        last_delivery: outcome.last_delivery.unwrap_or(sends_done),
    };
    clocks.fill(&mut report, offline);
    report.send_ack_latency = outcome.ack_hist.as_ref().and_then(Latency::from_histogram);
    if !offline {
        report.deliver_latency = outcome
            .deliver_hist
            .as_ref()
            .and_then(Latency::from_histogram);
    }
    Ok(report)
}

/// UDP datagrams `client`'s connection sent and received (QUIC's own counts, one per
/// datagram whether or not GSO or GRO batched it). Only the connection in use: a client that
/// reconnected during a run counts from its new connection.
fn client_datagrams(client: &Client) -> u64 {
    client
        .transport_stats()
        .map_or(0, |stats| stats.udp_tx.datagrams + stats.udp_rx.datagrams)
}

/// The instants a `pairs` or `offline` run is timed by (Courier's and the Redis peer's alike).
pub(crate) struct RunClocks {
    /// Every connection open; the first send.
    pub start: Instant,
    pub sends_done: Instant,
    /// `offline`: before the receivers come back.
    pub drain_start: Instant,
    pub last_delivery: Instant,
}

impl RunClocks {
    /// The run's duration and rate: from the first send (`offline`: from the drain's start) to
    /// the last delivery; for `offline` also `send_secs`, `drain_secs` and `drain_per_sec`.
    pub(crate) fn fill(&self, report: &mut Report, offline: bool) {
        let active = if offline {
            self.last_delivery - self.drain_start
        } else {
            self.last_delivery - self.start
        };
        report.duration_secs = (self.last_delivery - self.start).as_secs_f64();
        report.delivered_per_sec =
            report.messages_delivered as f64 / active.as_secs_f64().max(1e-9);
        if offline {
            report.extra.insert(
                "send_secs".into(),
                json!((self.sends_done - self.start).as_secs_f64()),
            );
            report
                .extra
                .insert("drain_secs".into(), json!(active.as_secs_f64()));
            report
                .extra
                .insert("drain_per_sec".into(), json!(report.delivered_per_sec));
        }
    }
}

/// When a paced sender's first tick comes, within its first interval. Spread over the interval
/// by the golden-ratio sequence (gaps within about 2.6× of each other, whatever the count)
/// unless `aligned`: senders that all tick at once are one burst per interval, which measures
/// how the edge drains a burst rather than its latency at a steady rate.
pub(crate) fn tick_phase(pair: u32, interval: Duration, aligned: bool) -> Duration {
    if aligned {
        return Duration::ZERO;
    }
    const GOLDEN_RATIO_FRACTION: f64 = 0.618_033_988_749_895;
    interval.mul_f64((f64::from(pair) * GOLDEN_RATIO_FRACTION).fract())
}

#[allow(clippy::too_many_arguments)]
/// Sends message `index` of `pair` (`bytes` long), meant to go at `sent_at` (its tick when
/// paced: latencies count from it).
async fn send_one(
    sender: &courier_client::Sender,
    to: u64,
    (pair, index, bytes): (u32, u32, usize),
    (epoch, sent_at): (Instant, Instant),
    states: &[PairState],
    counters: &Counters,
    hist: &Mutex<Histogram<u64>>,
) -> Result<(), String> {
    let started = sent_at;
    counters.sent.fetch_add(1, Ordering::Relaxed);
    let receipt = sender
        .send(to, body(pair, index, bytes, epoch, sent_at))
        .await
        .map_err(|e| format!("send failed: {e}"))?;
    let _ = hist
        .lock()
        .expect("histogram")
        .record(micros(started.elapsed()));
    states[pair as usize].acked_seq[index as usize].store(receipt.seq, Ordering::Relaxed);
    counters.acked.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// `connections`: hold many idle, authenticated connections; memory per connection.
pub async fn connections(target: &Target, args: &ConnectionsArgs) -> Result<Report, String> {
    if args.driver == Driver::Direct {
        return connections_direct(target, args);
    }
    let mut report = Report::new(
        "connections",
        json!({
            "connections": args.connections, "hold_secs": args.hold_secs,
            "sockets": args.sockets, "keep_alive_ms": args.keep_alive_ms, "rate": args.rate,
            "full_handshakes": args.full_handshakes,
        }),
    );
    // Tokens are minted before anything is measured: an app's client holds its token already,
    // and Ed25519 signing was about 4% of the load generator's samples in a storm.
    let all_options: Vec<_> = (0..args.connections)
        .map(|index| target.options(target.user_base + u64::from(index) + 1))
        .collect();
    let mut all_options = all_options.into_iter();
    let usage = EdgeUsage::start(target);
    let rss_before = target.edge_usage().map(|(_, rss)| rss);
    let keep_alive = Duration::from_millis(args.keep_alive_ms.max(1));
    let connectors: Vec<_> = (0..args.sockets.max(1))
        .map(|_| {
            target
                .connector()?
                .with_keep_alive(keep_alive)
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    let start = Instant::now();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1) as usize));
    let mut tasks = Vec::new();
    // The edge's CPU seconds each time another tenth of the connections has been started:
    // whether a connection costs more as more are open (item 7 of issue 10). Idle ones are not
    // free, so the later tenths also pay for the keep-alives of the earlier ones.
    let tenth_ends: Vec<u32> = (1..10)
        .map(|k| (u64::from(args.connections) * k / 10) as u32)
        .collect();
    let mut cpu_at_tenths = vec![(0, target.edge_usage().map(|(cpu, _)| cpu))];
    for index in 0..args.connections {
        if args.rate > 0 {
            let due = start + Duration::from_secs_f64(f64::from(index) / f64::from(args.rate));
            tokio::time::sleep_until(due.into()).await;
        }
        if args.connections >= 10 && tenth_ends.contains(&index) {
            cpu_at_tenths.push((index, target.edge_usage().map(|(cpu, _)| cpu)));
        }
        let connector = &connectors[index as usize % connectors.len()];
        let connector = if args.full_handshakes {
            connector.fresh_session().map_err(|e| e.to_string())?
        } else {
            connector.clone()
        };
        let options = all_options.next().expect("one per connection");
        let permit = semaphore
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        tasks.push(tokio::spawn(async move {
            let result = connector.connect(options).await;
            drop(permit);
            result
        }));
        if index % 1000 == 999 {
            eprintln!(
                "[{:>5.1}s] {} connections started",
                start.elapsed().as_secs_f64(),
                index + 1
            );
        }
    }
    let mut clients = Vec::new();
    for task in tasks {
        match task.await {
            Ok(Ok(client)) => clients.push(client),
            Ok(Err(error)) => {
                if report.errors.len() < 5 {
                    report.errors.push(error.to_string());
                }
            }
            Err(error) => report.errors.push(error.to_string()),
        }
    }
    let connect_secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{} connections open after {connect_secs:.2} s; holding {} s",
        clients.len(),
        args.hold_secs
    );
    cpu_at_tenths.push((args.connections, target.edge_usage().map(|(cpu, _)| cpu)));
    report_cpu_by_tenth(&mut report, &cpu_at_tenths);
    // Keep-alives the clients sent (PING, or IMMEDIATE_ACK to an edge that speaks ACK
    // frequency; loss probes, which also carry one, are rare on loopback).
    let keep_alives_sent = |clients: &[courier_client::Client]| -> u64 {
        clients
            .iter()
            .filter_map(|client| client.transport_stats())
            .map(|stats| stats.frame_tx.ping + stats.frame_tx.immediate_ack)
            .sum()
    };
    let keep_alives_from = keep_alives_sent(&clients);
    let cpu_held_from = target.edge_usage().map(|(cpu, _)| cpu);
    tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    // Holding idle connections costs the edge their keep-alives: one packet in and one
    // acknowledgement out per connection and interval (and whatever else an idle edge does).
    let keep_alives = keep_alives_sent(&clients).saturating_sub(keep_alives_from);
    report_holding(
        &mut report,
        target,
        cpu_held_from,
        args.hold_secs,
        keep_alives,
    );
    let still_open = clients.iter().filter(|c| c.connections() == 1).count();
    let rss_held = target.edge_usage().map(|(_, rss)| rss);
    usage.finish(target, &mut report);
    report.duration_secs = start.elapsed().as_secs_f64();
    report
        .extra
        .insert("connections_never_reconnected".into(), json!(still_open));
    report_opened(
        &mut report,
        args.connections,
        clients.len(),
        connect_secs,
        (rss_before, rss_held),
    );
    Ok(report)
}

/// `connections --driver direct`: the same connections, report and figures as the SDK's, from
/// one thread of quinn-proto (bench/src/direct.rs).
fn connections_direct(target: &Target, args: &ConnectionsArgs) -> Result<Report, String> {
    let mut report = Report::new(
        "connections",
        json!({
            "connections": args.connections, "hold_secs": args.hold_secs,
            "sockets": args.sockets, "keep_alive_ms": args.keep_alive_ms, "rate": args.rate,
            "concurrency": args.concurrency, "full_handshakes": args.full_handshakes,
            "driver": "direct",
        }),
    );
    if target.edge_count() > 1 {
        return Err("--driver direct connects to one edge: not with --spawn-edges".into());
    }
    let connector = target
        .connector()?
        .with_keep_alive(Duration::from_millis(args.keep_alive_ms.max(1)))
        .map_err(|e| e.to_string())?;
    // A configuration per socket, each with its own TLS session cache, as the SDK's
    // connectors have: a connection resumes the session of one before it on its socket.
    let sockets = args.sockets.max(1) as usize;
    let shared: Vec<quinn_proto::ClientConfig> = (0..sockets)
        .map(|_| {
            connector
                .fresh_session()
                .map(|c| c.quic_client_config())
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    let plan = crate::direct::Plan {
        addr: target.options(target.user_base).addr,
        quic: shared[0].clone(),
        server_name: connector.server_name().to_string(),
        pairs: Vec::new(),
        msgs: 0,
        bytes: 0,
        in_flight: 1,
        rate: None,
        aligned: false,
        offline: false,
        drain_timeout: Duration::from_secs(30),
        epoch: Instant::now(),
    };
    // Tokens are minted before anything is measured, as the SDK's workload does.
    let sessions = (0..args.connections)
        .map(|index| {
            target
                .options(target.user_base + u64::from(index) + 1)
                .session_config()
        })
        .collect();
    let idle = crate::direct::Idle {
        sessions,
        sockets,
        rate: args.rate,
        concurrency: args.concurrency.max(1) as usize,
        hold: Duration::from_secs(args.hold_secs),
    };
    let usage = EdgeUsage::start(target);
    let rss_before = target.edge_usage().map(|(_, rss)| rss);
    let tenth_ends: Vec<u32> = (1..10)
        .map(|k| (u64::from(args.connections) * k / 10) as u32)
        .collect();
    let cpu_at_tenths = std::cell::RefCell::new(vec![(0, target.edge_usage().map(|(cpu, _)| cpu))]);
    let mut cpu_held_from = None;
    let mut rss_held = None;
    let start = Instant::now();
    let outcome = tokio::task::block_in_place(|| {
        crate::direct::run_idle(
            &plan,
            idle,
            |index| {
                if args.full_handshakes {
                    connector
                        .fresh_session()
                        .map(|c| c.quic_client_config())
                        .map_err(|e| e.to_string())
                } else {
                    Ok(shared[index % sockets].clone())
                }
            },
            |index| {
                if args.connections >= 10 && tenth_ends.contains(&(index as u32)) {
                    cpu_at_tenths
                        .borrow_mut()
                        .push((index as u32, target.edge_usage().map(|(cpu, _)| cpu)));
                }
            },
            || {
                cpu_at_tenths
                    .borrow_mut()
                    .push((args.connections, target.edge_usage().map(|(cpu, _)| cpu)));
                cpu_held_from = target.edge_usage().map(|(cpu, _)| cpu);
            },
            || rss_held = target.edge_usage().map(|(_, rss)| rss),
        )
    })?;
    eprintln!(
        "{} connections open after {:.2} s ({} lost); held {} s",
        outcome.opened, outcome.connect_secs, outcome.lost, args.hold_secs
    );
    report_cpu_by_tenth(&mut report, &cpu_at_tenths.borrow());
    report_holding(
        &mut report,
        target,
        cpu_held_from,
        args.hold_secs,
        outcome.keep_alives_holding,
    );
    usage.finish(target, &mut report);
    report.duration_secs = start.elapsed().as_secs_f64();
    report
        .extra
        .insert("connections_lost".into(), json!(outcome.lost));
    if outcome.lost > 0 {
        report.errors.push(format!(
            "{} connections lost (a keep-alive longer than the edge's idle timeout loses them all)",
            outcome.lost
        ));
    }
    report.errors.extend(outcome.errors);
    report_opened(
        &mut report,
        args.connections,
        outcome.opened,
        outcome.connect_secs,
        (rss_before, rss_held),
    );
    Ok(report)
}

/// The edge's CPU per connection opened in each tenth of the run (from the edge's CPU seconds
/// as each tenth started): whether a connection costs more as more are open (issue 10, item
/// 7). Idle ones are not free, so the later tenths also pay for the keep-alives of the earlier.
fn report_cpu_by_tenth(report: &mut Report, cpu_at_tenths: &[(u32, Option<f64>)]) {
    let per_tenth_us: Option<Vec<u64>> = cpu_at_tenths
        .windows(2)
        .map(|pair| {
            let ((from, cpu_from), (to, cpu_to)) = (pair[0], pair[1]);
            let opened = f64::from(to - from).max(1.0);
            Some(((cpu_to? - cpu_from?) * 1e6 / opened).round() as u64)
        })
        .collect();
    if let Some(per_tenth_us) = per_tenth_us.filter(|tenths| tenths.len() == 10) {
        eprintln!("edge CPU µs per connection, by tenth opened: {per_tenth_us:?}");
        report.extra.insert(
            "edge_cpu_us_per_connection_by_tenth".into(),
            json!(per_tenth_us),
        );
    }
}

/// What holding the connections cost the edge: their keep-alives, one packet in and one
/// acknowledgement out per connection and interval (and whatever else an idle edge does).
fn report_holding(
    report: &mut Report,
    target: &Target,
    cpu_held_from: Option<f64>,
    hold_secs: u64,
    keep_alives: u64,
) {
    report
        .extra
        .insert("keep_alives_holding".into(), json!(keep_alives));
    if let (Some(from), Some((to, _))) = (cpu_held_from, target.edge_usage())
        && hold_secs > 0
        && keep_alives > 0
    {
        report.extra.insert(
            "edge_cpu_secs_per_sec_holding".into(),
            json!((to - from) / hold_secs as f64),
        );
        report.extra.insert(
            "edge_cpu_us_per_keep_alive_holding".into(),
            json!(((to - from) * 1e6 / keep_alives as f64).round()),
        );
    }
}

/// How many opened, how fast, and the edge's memory per open connection (its resident set
/// while they were held, over what it was before the first).
fn report_opened(
    report: &mut Report,
    requested: u32,
    opened: usize,
    connect_secs: f64,
    (rss_before, rss_held): (Option<u64>, Option<u64>),
) {
    report
        .extra
        .insert("connections_open".into(), json!(opened));
    report.extra.insert(
        "connect_per_sec".into(),
        json!(opened as f64 / connect_secs.max(1e-9)),
    );
    if let (Some(before), Some(held)) = (rss_before, rss_held)
        && opened > 0
    {
        let per_connection = held.saturating_sub(before) as f64 / opened as f64;
        report
            .extra
            .insert("edge_rss_before_bytes".into(), json!(before));
        report.extra.insert(
            "edge_rss_per_connection_bytes".into(),
            json!(per_connection.round()),
        );
    }
    if opened < requested as usize {
        report
            .errors
            .push(format!("only {opened} of {requested} connections opened"));
    }
}

/// `handshakes`: QUIC handshakes alone (issue 10, item 4: "≥ 5,000 full handshakes/s per edge
/// core"). Each connection is closed as soon as its handshake is done, without `Hello`, so
/// the edge's CPU per connection is the handshake's, its close's and the connection's upkeep
/// in between: no token check, no login, no store. The load generator makes the client's
/// half of each handshake (the same key exchange, and the certificate's check) on its own
/// core, so it may be the limit of the rate; the edge's CPU per handshake is what says how
/// many one edge core makes (`edge_handshakes_per_core_sec`).
pub async fn handshakes(target: &Target, args: &HandshakesArgs) -> Result<Report, String> {
    let mut report = Report::new(
        "handshakes",
        json!({
            "connections": args.connections, "concurrency": args.concurrency,
            "sockets": args.sockets, "resumed": args.resumed,
        }),
    );
    let connectors: Vec<_> = (0..args.sockets.max(1))
        .map(|_| target.connector())
        .collect::<Result<_, _>>()?;
    // Resumed: every socket's first connection is a full handshake that leaves a ticket,
    // outside the count.
    if args.resumed {
        for connector in &connectors {
            let raw = courier_client::raw::RawConnection::connect(connector, target.addr)
                .await
                .map_err(|e| format!("a first handshake: {e}"))?;
            raw.connection.close(0u32.into(), b"");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let usage = EdgeUsage::start(target);
    let start = Instant::now();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1) as usize));
    let mut tasks = Vec::new();
    for index in 0..args.connections {
        let connector = &connectors[index as usize % connectors.len()];
        let connector = if args.resumed {
            connector.clone()
        } else {
            connector.fresh_session().map_err(|e| e.to_string())?
        };
        let permit = semaphore
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let addr = target.addr;
        tasks.push(tokio::spawn(async move {
            let result = courier_client::raw::RawConnection::connect(&connector, addr).await;
            drop(permit);
            let raw = result?;
            raw.connection.close(0u32.into(), b"");
            Ok::<_, courier_client::ClientError>(())
        }));
    }
    let mut made = 0u64;
    for task in tasks {
        match task.await {
            Ok(Ok(())) => made += 1,
            Ok(Err(error)) => {
                if report.errors.len() < 5 {
                    report.errors.push(error.to_string());
                }
            }
            Err(error) => report.errors.push(error.to_string()),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    // The closes reach the edge and are handled: part of each connection's cost.
    tokio::time::sleep(Duration::from_millis(300)).await;
    usage.finish(target, &mut report);
    report.duration_secs = secs;
    report.extra.insert("handshakes".into(), json!(made));
    report.extra.insert(
        "handshakes_per_sec".into(),
        json!(made as f64 / secs.max(1e-9)),
    );
    if let Some(cpu) = report.edge_cpu_secs.filter(|_| made > 0) {
        let per_handshake_us = cpu * 1e6 / made as f64;
        report.extra.insert(
            "edge_cpu_us_per_handshake".into(),
            json!(per_handshake_us.round()),
        );
        report.extra.insert(
            "edge_handshakes_per_core_sec".into(),
            json!((1e6 / per_handshake_us.max(1e-9)).round()),
        );
    }
    if made < u64::from(args.connections) {
        report.errors.push(format!(
            "only {made} of {} handshakes completed",
            args.connections
        ));
    }
    Ok(report)
}

/// `reconnect`: connect, send one message, wait for its ack, disconnect; full handshakes, then
/// resumed sessions whose first send rides in 0-RTT data.
pub async fn reconnect(target: &Target, args: &ReconnectArgs) -> Result<Report, String> {
    let mut report = Report::new(
        "reconnect",
        json!({ "connections": args.connections, "concurrency": args.concurrency }),
    );
    let usage = EdgeUsage::start(target);
    let recipient = target.user_base + 1;
    let start = Instant::now();
    for resumed in [false, true] {
        let phase = if resumed { "resumed_0rtt" } else { "full" };
        let hist = Arc::new(Mutex::new(latency_histogram()));
        let accepted_0rtt = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        // Lanes wait for this until every lane is primed, so the phase's time and edge CPU
        // count only its own connections.
        let (start_tx, start_rx) = tokio::sync::watch::channel(false);
        let mut lanes = Vec::new();
        for lane in 0..args.concurrency.max(1) {
            let (hist, accepted_0rtt, next) = (hist.clone(), accepted_0rtt.clone(), next.clone());
            let user = target.user_base + 10 + u64::from(lane);
            let options = target.options(user);
            // Resumed phase: one connector per lane, primed by one connection so it holds a
            // session ticket. Full phase: a fresh connector (no ticket) for every connection.
            let primed = if resumed {
                let connector = target.connector()?;
                let client = connector
                    .connect(options.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                client
                    .send(recipient, b"prime".to_vec())
                    .await
                    .map_err(|e| e.to_string())?;
                drop(client);
                Some(connector)
            } else {
                None
            };
            let connections = args.connections;
            let fresh = (!resumed).then(|| target.connector());
            let fresh = match fresh {
                Some(Ok(connector)) => Some(connector),
                Some(Err(error)) => return Err(error),
                None => None,
            };
            let cert_source = fresh.clone();
            let mut start_rx = start_rx.clone();
            lanes.push(tokio::spawn(async move {
                let _ = start_rx.wait_for(|started| *started).await;
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= u64::from(connections) {
                        return Ok::<(), String>(());
                    }
                    let connector = match (&primed, &cert_source) {
                        (Some(connector), _) => connector.clone(),
                        (None, Some(template)) => {
                            template.fresh_session().map_err(|e| e.to_string())?
                        }
                        (None, None) => unreachable!("one of the two is set"),
                    };
                    let mut options = options.clone();
                    options.reconnect = false;
                    options.early_sends = vec![EarlySend {
                        client_id: rand::random::<u64>() | 1,
                        to: recipient,
                        body: b"hello".to_vec(),
                    }];
                    let began = Instant::now();
                    let mut client = connector
                        .connect(options)
                        .await
                        .map_err(|e| e.to_string())?;
                    let receipts = client.early_receipts().await;
                    for receipt in receipts {
                        receipt.map_err(|e| e.to_string())?;
                    }
                    let _ = hist
                        .lock()
                        .expect("histogram")
                        .record(micros(began.elapsed()));
                    if client.zero_rtt_accepted() == Some(true) {
                        accepted_0rtt.fetch_add(1, Ordering::Relaxed);
                    }
                    client.close();
                }
            }));
        }
        let phase_cpu_start = target.edge_usage().map(|(cpu, _)| cpu);
        let phase_start = Instant::now();
        let _ = start_tx.send(true);
        for lane in lanes {
            if let Err(error) = lane.await.map_err(|e| e.to_string()).and_then(|r| r) {
                report.errors.push(format!("{phase}: {error}"));
            }
        }
        let secs = phase_start.elapsed().as_secs_f64();
        let hist = hist.lock().expect("histogram").clone();
        report.extra.insert(
            format!("{phase}_handshakes_per_sec"),
            json!(hist.len() as f64 / secs.max(1e-9)),
        );
        report.extra.insert(
            format!("{phase}_first_ack_latency"),
            serde_json::to_value(Latency::from_histogram(&hist)).unwrap_or_default(),
        );
        report.extra.insert(
            format!("{phase}_0rtt_accepted"),
            json!(accepted_0rtt.load(Ordering::Relaxed)),
        );
        // Each connection is a handshake, a login (one commit), one send (one commit) and a
        // close: the edge's CPU per connection bounds what one handshake costs.
        if let Some(cpu_start) = phase_cpu_start
            && let Some((cpu, _)) = target.edge_usage()
            && !hist.is_empty()
        {
            report.extra.insert(
                format!("{phase}_edge_cpu_us_per_connection"),
                json!((cpu - cpu_start) * 1e6 / hist.len() as f64),
            );
        }
        eprintln!(
            "reconnect {phase}: {} connections in {secs:.2} s",
            hist.len()
        );
    }
    usage.finish(target, &mut report);
    report.duration_secs = start.elapsed().as_secs_f64();
    Ok(report)
}

/// `restart`: fills the store (optionally), connects idle clients, then kills the edge with
/// SIGKILL and restarts it on the same data directory, `--restarts` times. Measures the time
/// from spawning to listening, and for each client the time from listening until it is
/// logged in again by itself. Needs `--spawn-edge`.
pub async fn restart(target: &Target, args: &RestartArgs) -> Result<Report, String> {
    let mut report = Report::new(
        "restart",
        json!({
            "clients": args.clients, "restarts": args.restarts, "fill": args.fill,
            "bytes": args.bytes, "keep_alive_ms": args.keep_alive_ms,
            "graceful": args.graceful,
        }),
    );
    let start = Instant::now();
    if args.fill > 0 {
        let filled = fill(target, args).await?;
        report.messages_sent = filled;
        report.messages_acked = filled;
    }
    let keep_alive = Duration::from_millis(args.keep_alive_ms.max(1));
    let mut connectors = Vec::new();
    for _ in 0..args.sockets.max(1) {
        connectors.push(
            target
                .connector()?
                .with_keep_alive(keep_alive)
                .map_err(|e| e.to_string())?,
        );
    }
    let mut clients = Vec::new();
    for index in 0..args.clients {
        // Each client its own TLS session cache, as each device has: a shared one would let
        // a client resume with a ticket another client's new connection just received.
        let connector = connectors[index as usize % connectors.len()]
            .fresh_session()
            .map_err(|e| e.to_string())?;
        let user = target.user_base + 10 + u64::from(index);
        clients.push(
            connector
                .connect(target.options(user))
                .await
                .map_err(|e| format!("client {index}: {e}"))?,
        );
    }
    eprintln!("restart: {} clients connected", clients.len());
    let mut listening = Vec::new();
    let mut all = latency_histogram();
    for cycle in 0..args.restarts {
        let before: Vec<u64> = clients.iter().map(Client::connections).collect();
        let (pid, to_listening) =
            tokio::task::block_in_place(|| target.restart_edge(args.graceful))?;
        let listening_at = Instant::now();
        // The new process's CPU from here until every client is back: what the reconnect
        // storm (handshakes and logins of known devices) cost it.
        let cpu_at_listening = process_usage(pid).map(|(cpu, _)| cpu);
        listening.push(to_listening.as_secs_f64() * 1000.0);
        let mut hist = latency_histogram();
        let mut back = vec![false; clients.len()];
        let mut left = clients.len();
        let deadline = listening_at + Duration::from_secs(90);
        while left > 0 && Instant::now() < deadline {
            for (index, client) in clients.iter().enumerate() {
                if !back[index] && client.connections() > before[index] {
                    back[index] = true;
                    left -= 1;
                    let _ = hist.record(micros(listening_at.elapsed()));
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if left > 0 {
            report.errors.push(format!(
                "restart {cycle}: {left} clients did not come back in 90 s"
            ));
        }
        let usage = process_usage(pid);
        let rss = usage.map(|(_, rss)| rss);
        let back_count = (clients.len() - left).max(1) as f64;
        // Left out, not reported as 0, when /proc could not be read.
        let cpu_us_per_client = match (cpu_at_listening, usage) {
            (Some(from), Some((to, _))) => Some(((to - from) * 1e6 / back_count).round()),
            _ => None,
        };
        let cpu_shown = cpu_us_per_client.map_or("unknown".to_string(), |us| us.to_string());
        eprintln!(
            "restart {cycle}: listening {:.0} ms after spawn; clients back p50 {} ms p99 {} ms max {} ms; edge rss {} MiB; edge CPU {cpu_shown} µs per client back",
            to_listening.as_secs_f64() * 1000.0,
            hist.value_at_quantile(0.5) / 1000,
            hist.value_at_quantile(0.99) / 1000,
            hist.max() / 1000,
            rss.unwrap_or(0) / (1024 * 1024)
        );
        if let Some(us) = cpu_us_per_client {
            report.extra.insert(
                format!("restart_{cycle}_edge_cpu_us_per_client_back"),
                json!(us),
            );
        }
        report.extra.insert(
            format!("restart_{cycle}_reconnect_after_listening"),
            serde_json::to_value(Latency::from_histogram(&hist)).unwrap_or_default(),
        );
        let _ = all.add(&hist);
    }
    report
        .extra
        .insert("spawn_to_listening_ms".into(), json!(listening));
    report.extra.insert(
        "reconnect_after_listening".into(),
        serde_json::to_value(Latency::from_histogram(&all)).unwrap_or_default(),
    );
    report.duration_secs = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Stores `args.fill` messages for offline recipients (1,000 inboxes nobody reads).
async fn fill(target: &Target, args: &RestartArgs) -> Result<u64, String> {
    let began = Instant::now();
    let senders = args.fill_senders.max(1);
    let per_sender = args.fill.div_ceil(u64::from(senders));
    let mut tasks = Vec::new();
    for sender in 0..senders {
        let client = connect(target, target.user_base + 1_000_000 + u64::from(sender)).await?;
        let inboxes = target.user_base + 2_000_000;
        let (in_flight, bytes) = (args.in_flight.max(1) as usize, args.bytes);
        let count = per_sender.min(args.fill.saturating_sub(u64::from(sender) * per_sender));
        tasks.push(tokio::spawn(async move {
            let handle = client.sender();
            let mut pending = tokio::task::JoinSet::new();
            for index in 0..count {
                while pending.len() >= in_flight {
                    if let Some(result) = pending.join_next().await {
                        result.map_err(|e| e.to_string())??;
                    }
                }
                let handle = handle.clone();
                let to = inboxes + (index + u64::from(sender)) % 1000;
                pending.spawn(async move {
                    handle
                        .send(to, vec![0x42; bytes])
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                });
            }
            while let Some(result) = pending.join_next().await {
                result.map_err(|e| e.to_string())??;
            }
            client.close();
            Ok::<u64, String>(count)
        }));
    }
    let mut stored = 0;
    for task in tasks {
        stored += task.await.map_err(|e| e.to_string())??;
    }
    eprintln!(
        "restart: stored {stored} undelivered messages in {:.1} s",
        began.elapsed().as_secs_f64()
    );
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A delivered body passes only as it was made: a changed padding byte or a cut body is
    /// a misdelivery, not a delivery (before, only the 16-byte header was read).
    #[test]
    fn only_an_intact_body_passes() {
        let epoch = Instant::now();
        let made = body(3, 7, 200, epoch, epoch);
        assert!(body_intact(&made, 200));
        assert_eq!(
            parse_body(&made).map(|(pair, index, _)| (pair, index)),
            Some((3, 7))
        );
        let mut changed = made.clone();
        changed[150] ^= 1;
        assert!(!body_intact(&changed, 200));
        assert!(!body_intact(&made[..199], 200));
        assert!(!body_intact(&made, 300));
        let mut report = Report::new("pairs", serde_json::json!({}));
        assert!(report.passed());
        report.misdelivered = 1;
        assert!(!report.passed(), "a misdelivery fails the run");
    }
}
