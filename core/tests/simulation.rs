//! Deterministic simulation of the core: many clients sending to each other through home shards
//! over a lossy simulated network, on a virtual clock, with random shard crashes and injected
//! store faults (including fencing: the shards stop and a new owner takes over).
//!
//! Goal: prove R2 and R4 under failure. After a chaotic phase and a calm drain phase, the
//! checkers assert that every message the server acknowledged is delivered exactly once (after
//! the client's dedupe by sequence number), in per-inbox order, at the sequence number the
//! sender was told; that a retried send is stored once; that after all acks the store holds no
//! messages; and that expired dedupe records and index entries are gone.
//!
//! Everything random comes from one seed. A failure prints it; `SIM_SEED=<n>` replays exactly
//! that run, and `SIM_SEEDS=<count>` changes how many seeds run (default 1000).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};

use courier_core::commit::{self, Request, SendRequest};
use courier_core::keys;
use courier_core::placement::home_shard;
use courier_core::rng::Rng;
use courier_core::shard::{Batch, InboxShard, Output};
use courier_core::store::StoreError;
use courier_core::store::fault::{FaultRates, FaultStore};
use courier_core::store::memory::MemoryStore;
use courier_core::{CoreConfig, UnixMillis, UserId};
use courier_protocol::ErrorCode;

const SEEDS_DEFAULT: u64 = 1_000;
/// Steps of the chaotic phase.
const CHAOS_STEPS: usize = 3_000;
/// Bound on the calm phase; a run that has not converged by then has lost something.
const DRAIN_STEPS_MAX: usize = 200_000;
const RETRY_AFTER_MS: u64 = 150;

#[test]
fn simulation_over_many_seeds() {
    if let Ok(seed) = std::env::var("SIM_SEED") {
        let seed: u64 = seed.parse().expect("SIM_SEED must be a number");
        run_seed(seed).unwrap_or_else(|failure| panic!("SIM_SEED={seed} failed: {failure}"));
        return;
    }
    let seeds: u64 = std::env::var("SIM_SEEDS")
        .map(|count| count.parse().expect("SIM_SEEDS must be a number"))
        .unwrap_or(SEEDS_DEFAULT);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let results: Vec<(u64, Result<Stats, String>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|worker| {
                scope.spawn(move || {
                    (0..seeds)
                        .filter(|seed| seed % threads == worker)
                        .map(|seed| (seed, run_seed(seed)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("worker"))
            .collect()
    });
    let failures: Vec<&(u64, Result<Stats, String>)> =
        results.iter().filter(|(_, r)| r.is_err()).collect();
    if let Some((seed, Err(failure))) = failures.first() {
        panic!(
            "{} of {seeds} seeds failed; first: seed {seed}: {failure}\nreplay with SIM_SEED={seed}",
            failures.len()
        );
    }
    let mut total = Stats::default();
    for (_, stats) in &results {
        total.add(stats.as_ref().expect("no failures"));
    }
    eprintln!("simulation: {seeds} seeds, {total:?}");
    // A simulation that stopped injecting faults would pass without proving anything.
    if seeds >= 100 {
        assert!(total.messages_acked > 10_000, "too few messages: {total:?}");
        assert!(
            total.crashes > 0
                && total.conflicts > 0
                && total.fsync_failures > 0
                && total.fenced > 0,
            "{total:?}"
        );
        assert!(
            total.commit_unknown_applied > 0 && total.commit_unknown_dropped > 0,
            "{total:?}"
        );
        assert!(
            total.duplicate_sends > 0,
            "no retry was ever deduplicated: {total:?}"
        );
        assert!(
            total.overloaded > 0,
            "backpressure never triggered: {total:?}"
        );
        assert!(total.disconnects > 0, "{total:?}");
    }
}

/// What happened across a run, to prove the faults really were exercised.
#[derive(Debug, Default, Clone)]
struct Stats {
    messages_acked: u64,
    crashes: u64,
    disconnects: u64,
    conflicts: u64,
    commit_unknown_applied: u64,
    commit_unknown_dropped: u64,
    fsync_failures: u64,
    fenced: u64,
    /// Sends answered from the dedupe record instead of being stored again.
    duplicate_sends: u64,
    overloaded: u64,
}

impl Stats {
    fn add(&mut self, other: &Stats) {
        self.messages_acked += other.messages_acked;
        self.crashes += other.crashes;
        self.disconnects += other.disconnects;
        self.conflicts += other.conflicts;
        self.commit_unknown_applied += other.commit_unknown_applied;
        self.commit_unknown_dropped += other.commit_unknown_dropped;
        self.fsync_failures += other.fsync_failures;
        self.fenced += other.fenced;
        self.duplicate_sends += other.duplicate_sends;
        self.overloaded += other.overloaded;
    }
}

/// Runs one seed, turning checker failures and panics into an error message.
fn run_seed(seed: u64) -> Result<Stats, String> {
    match catch_unwind(AssertUnwindSafe(|| World::new(seed).run())) {
        Ok(result) => result,
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into())),
    }
}

/// Whom a shard's answer goes to: the sending client and its connection generation, so an
/// answer for a connection that has since dropped is lost like a real one would be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tag {
    client: usize,
    connection: u64,
}

#[derive(Debug)]
enum Packet {
    ToShard {
        shard: usize,
        request: Request,
        tag: Tag,
    },
    ToClient {
        client: usize,
        connection: u64,
        message: ClientMessage,
    },
}

#[derive(Debug)]
enum ClientMessage {
    SendAck {
        client_id: u64,
        seq: u64,
    },
    SendError {
        client_id: u64,
        code: ErrorCode,
    },
    Deliver {
        seq: u64,
        from: UserId,
        body: Vec<u8>,
    },
}

#[derive(Debug)]
struct Pending {
    to: UserId,
    body: Vec<u8>,
    last_attempt_ms: Option<UnixMillis>,
}

#[derive(Debug)]
struct Client {
    user: UserId,
    online: bool,
    /// Bumped on every reconnect; answers for an older connection are dropped.
    connection: u64,
    /// Messages still to start sending: (client id, recipient index).
    planned: VecDeque<(u64, usize)>,
    pending: BTreeMap<u64, Pending>,
    in_flight_max: usize,
    /// client id → (seq the server acknowledged, recipient).
    acked: HashMap<u64, (u64, UserId)>,
    /// Highest seq accepted from the own inbox.
    last_seq: u64,
    /// Accepted messages in order: (seq, from, body).
    received: Vec<(u64, UserId, Vec<u8>)>,
    /// A live delivery skipped a seq: sync before accepting more.
    needs_sync: bool,
    acked_up_to: u64,
}

struct World {
    seed: u64,
    rng: Rng,
    now: UnixMillis,
    config: CoreConfig,
    store: FaultStore<MemoryStore>,
    shards: Vec<InboxShard<Tag>>,
    committers: Vec<commit::Committer>,
    clients: Vec<Client>,
    /// In-flight packets by delivery time; the counter keeps equal times in FIFO order.
    network: BTreeMap<(UnixMillis, u64), Packet>,
    packet_counter: u64,
    loss_per_thousand: u64,
    crash_per_thousand: u64,
    disconnect_per_thousand: u64,
    stats: Stats,
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = Rng::new(seed);
        let batch_requests_max = 1 + rng.below(16) as usize;
        let config = CoreConfig {
            batch_requests_max,
            queue_requests_max: batch_requests_max + rng.below(32) as usize,
            commit_attempts_max: 1 + rng.below(4) as u32,
            expire_scan_keys_max: 2 + rng.below(50) as usize,
            sync_messages_max: 1 + rng.below(20) as usize,
            seq_cache_entries_max: rng.below(8) as usize,
            ..CoreConfig::default()
        };
        config.validate().expect("valid sim config");
        let fault_level = rng.below(4);
        let rates = FaultRates {
            conflict_per_million: fault_level * 20_000,
            commit_unknown_per_million: fault_level * 20_000,
            fsync_failure_per_million: fault_level * 5_000,
            fenced_per_million: fault_level * 2_000,
        };
        let store = FaultStore::new(MemoryStore::new(), rates, rng.next_u64());
        let shard_count = 1 + rng.below(4) as usize;
        let client_count = 2 + rng.below(15) as usize;
        let messages_per_client = 1 + rng.below(60);
        let clients = (0..client_count)
            .map(|index| {
                let planned = (1..=messages_per_client)
                    .map(|client_id| (client_id, rng.below(client_count as u64) as usize))
                    .collect();
                Client {
                    // Spread user ids so placement puts them on different shards.
                    user: 1000 + index as u64 * 7919,
                    online: rng.chance(3, 4),
                    connection: 0,
                    planned,
                    pending: BTreeMap::new(),
                    in_flight_max: 1 + rng.below(8) as usize,
                    acked: HashMap::new(),
                    last_seq: 0,
                    received: Vec::new(),
                    needs_sync: false,
                    acked_up_to: 0,
                }
            })
            .collect();
        World {
            seed,
            loss_per_thousand: rng.below(30),
            crash_per_thousand: rng.below(8),
            disconnect_per_thousand: rng.below(15),
            rng,
            now: 1_700_000_000_000,
            shards: (0..shard_count).map(|_| InboxShard::new(&config)).collect(),
            committers: (0..shard_count)
                .map(|_| commit::Committer::new(&config))
                .collect(),
            config,
            store,
            clients,
            network: BTreeMap::new(),
            packet_counter: 0,
            stats: Stats::default(),
        }
    }

    fn run(mut self) -> Result<Stats, String> {
        for client in 0..self.clients.len() {
            if self.clients[client].online {
                self.connect(client);
            }
        }
        for _ in 0..CHAOS_STEPS {
            self.step(true);
        }
        // Calm phase: no new faults, everyone online, until every send is acknowledged,
        // delivered and acked by its recipient.
        self.store.set_rates(FaultRates::default());
        self.loss_per_thousand = 0;
        let mut steps = 0;
        while !self.converged() {
            for client in 0..self.clients.len() {
                if !self.clients[client].online {
                    self.connect(client);
                }
            }
            self.step(false);
            steps += 1;
            if steps > DRAIN_STEPS_MAX {
                return Err(format!(
                    "did not converge after {DRAIN_STEPS_MAX} calm steps: {}",
                    self.describe()
                ));
            }
        }
        self.check()
    }

    fn describe(&self) -> String {
        let pending: usize = self
            .clients
            .iter()
            .map(|c| c.pending.len() + c.planned.len())
            .sum();
        format!(
            "seed {} shards {} clients {} pending {} network {} crashes {} store poisoned {}",
            self.seed,
            self.shards.len(),
            self.clients.len(),
            pending,
            self.network.len(),
            self.stats.crashes,
            self.store.is_poisoned()
        )
    }

    /// Puts a packet on the network. QUIC streams are reliable, so the only way to lose a
    /// packet is to lose its connection: a lost packet disconnects its client.
    fn send_packet(&mut self, packet: Packet) {
        if self.rng.below(1000) < self.loss_per_thousand {
            let client = match &packet {
                Packet::ToShard { tag, .. } => tag.client,
                Packet::ToClient { client, .. } => *client,
            };
            self.clients[client].online = false;
            self.stats.disconnects += 1;
            return;
        }
        let latency = 1 + self.rng.below(20);
        self.packet_counter += 1;
        self.network
            .insert((self.now + latency, self.packet_counter), packet);
    }

    fn step(&mut self, chaos: bool) {
        self.now += self.rng.below(5);
        // Deliver every packet that is due.
        while let Some(entry) = self.network.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let packet = entry.remove();
            self.receive(packet);
        }
        // Clients act.
        for client in 0..self.clients.len() {
            self.client_tick(client);
        }
        // Shards commit. A shard whose queue is not empty commits one batch per step.
        for shard in 0..self.shards.len() {
            if let Some(batch) = self.shards[shard].poll_batch() {
                self.commit(shard, batch);
            }
        }
        if chaos {
            if self.rng.below(1000) < self.crash_per_thousand {
                self.crash_all_shards();
            }
            for client in 0..self.clients.len() {
                if self.rng.below(1000) < self.disconnect_per_thousand {
                    self.clients[client].online = false;
                    self.stats.disconnects += 1;
                } else if !self.clients[client].online && self.rng.chance(1, 20) {
                    self.connect(client);
                }
            }
        }
        if self.rng.chance(1, 50) {
            // Expiry runs alongside; nothing has expired yet, so it must delete nothing.
            match commit::expire(&self.store, self.now, &self.config) {
                Ok(report) => assert_eq!(report.messages_deleted, 0, "expired a live message"),
                Err(error) => self.handle_store_error(error),
            }
        }
    }

    /// A process crash: every shard loses its queue and the store is reopened.
    fn crash_all_shards(&mut self) {
        self.stats.crashes += 1;
        self.shards = (0..self.shards.len())
            .map(|_| InboxShard::new(&self.config))
            .collect();
        self.committers = (0..self.shards.len())
            .map(|_| commit::Committer::new(&self.config))
            .collect();
        // Packets to and from the crashed process are lost; clients reconnect.
        self.network.clear();
        for client in &mut self.clients {
            client.online = false;
        }
        self.store.reopen();
    }

    fn handle_store_error(&mut self, error: StoreError) {
        if !error.is_retryable() {
            // A poisoned store needs a restart, as the runtime would do. A fenced shard stops
            // serving and the shard's new owner starts from the store, which the restart
            // models (reopening the fault store re-claims it).
            self.crash_all_shards();
        }
    }

    fn commit(&mut self, shard: usize, batch: Batch<Tag>) {
        let result = self.committers[shard].commit_batch(&self.store, &batch.requests, self.now);
        let failed = result.as_ref().err().cloned();
        if let Ok(outcomes) = &result {
            self.stats.duplicate_sends += outcomes
                .iter()
                .filter(|o| matches!(o, commit::Outcome::Stored { fresh: false, .. }))
                .count() as u64;
        }
        let outputs = self.shards[shard].handle_commit(batch, result);
        for output in outputs {
            match output {
                Output::SendAck {
                    tag,
                    client_id,
                    seq,
                    ..
                } => self.send_packet(Packet::ToClient {
                    client: tag.client,
                    connection: tag.connection,
                    message: ClientMessage::SendAck { client_id, seq },
                }),
                Output::SendError {
                    tag,
                    client_id,
                    code,
                } => self.send_packet(Packet::ToClient {
                    client: tag.client,
                    connection: tag.connection,
                    message: ClientMessage::SendError { client_id, code },
                }),
                Output::Deliver(message) => {
                    let recipient = self.client_of(message.inbox);
                    if self.clients[recipient].online {
                        let connection = self.clients[recipient].connection;
                        self.send_packet(Packet::ToClient {
                            client: recipient,
                            connection,
                            message: ClientMessage::Deliver {
                                seq: message.seq,
                                from: message.from,
                                body: message.body,
                            },
                        });
                    }
                }
            }
        }
        if let Some(error) = failed {
            self.handle_store_error(error);
        }
    }

    fn client_of(&self, user: UserId) -> usize {
        self.clients
            .iter()
            .position(|c| c.user == user)
            .expect("every inbox belongs to a client")
    }

    fn receive(&mut self, packet: Packet) {
        match packet {
            Packet::ToShard {
                shard,
                request,
                tag,
            } => match request {
                Request::Send(send) => {
                    if let Err(refused) = self.shards[shard].handle_send(send, tag) {
                        self.stats.overloaded += 1;
                        self.send_packet(Packet::ToClient {
                            client: tag.client,
                            connection: tag.connection,
                            message: ClientMessage::SendError {
                                client_id: refused.send.client_id,
                                code: ErrorCode::Overloaded,
                            },
                        });
                    }
                }
                Request::Ack { inbox, up_to_seq } => {
                    // A refused ack is repeated by the client's next ack or reconnect.
                    let _ = self.shards[shard].handle_ack(inbox, up_to_seq);
                }
            },
            Packet::ToClient {
                client,
                connection,
                message,
            } => {
                let c = &self.clients[client];
                if !c.online || c.connection != connection {
                    return;
                }
                self.client_receive(client, message);
            }
        }
    }

    fn client_receive(&mut self, client: usize, message: ClientMessage) {
        let c = &mut self.clients[client];
        match message {
            ClientMessage::SendAck { client_id, seq } => {
                if let Some((earlier, _)) = c.acked.get(&client_id) {
                    assert_eq!(
                        *earlier, seq,
                        "client {client} id {client_id}: two different seqs acked"
                    );
                } else if let Some(pending) = c.pending.remove(&client_id) {
                    c.acked.insert(client_id, (seq, pending.to));
                }
            }
            ClientMessage::SendError { client_id, code } => {
                assert!(code.is_retryable(), "unexpected non-retryable {code:?}");
                // Retry after the usual delay, with the same client id.
                if let Some(pending) = c.pending.get_mut(&client_id) {
                    pending.last_attempt_ms = Some(self.now);
                }
            }
            ClientMessage::Deliver { seq, from, body } => {
                if seq <= c.last_seq {
                    return; // A duplicate: the client dedupes by seq.
                }
                if seq != c.last_seq + 1 || c.needs_sync {
                    // A gap: an earlier delivery was lost. Fetch from the store instead.
                    c.needs_sync = true;
                    return;
                }
                c.last_seq = seq;
                c.received.push((seq, from, body));
            }
        }
    }

    /// Connects a client: a new connection whose `Hello` carries the last seq the client holds,
    /// which acks everything up to it, then a sync of everything after it.
    fn connect(&mut self, client: usize) {
        let c = &mut self.clients[client];
        c.online = true;
        c.connection += 1;
        c.needs_sync = true;
        // Unacknowledged sends are retried on the new connection.
        for pending in c.pending.values_mut() {
            pending.last_attempt_ms = None;
        }
        let (inbox, up_to_seq, connection) = (c.user, c.last_seq, c.connection);
        c.acked_up_to = up_to_seq;
        if up_to_seq > 0 {
            let shard = home_shard(inbox, self.shards.len() as u32) as usize;
            self.send_packet(Packet::ToShard {
                shard,
                request: Request::Ack { inbox, up_to_seq },
                tag: Tag { client, connection },
            });
        }
    }

    fn sync(&mut self, client: usize) {
        let user = self.clients[client].user;
        loop {
            let after = self.clients[client].last_seq;
            let messages =
                match commit::read_inbox(&self.store, user, after, self.now, &self.config) {
                    Ok(page) => page.messages,
                    Err(error) => {
                        self.handle_store_error(error);
                        return;
                    }
                };
            let c = &mut self.clients[client];
            if messages.is_empty() {
                c.needs_sync = false;
                return;
            }
            for message in messages {
                assert!(message.seq > c.last_seq, "sync returned an old seq");
                assert_eq!(
                    message.seq,
                    c.last_seq + 1,
                    "client {client}: gap in the stored inbox (nothing expires in this run)"
                );
                c.last_seq = message.seq;
                c.received.push((message.seq, message.from, message.body));
            }
        }
    }

    fn client_tick(&mut self, client: usize) {
        if !self.clients[client].online {
            return;
        }
        if self.clients[client].needs_sync {
            self.sync(client);
            if !self.clients[client].online {
                return;
            }
        }
        // Start new sends while under the in-flight maximum.
        let recipients: Vec<UserId> = self.clients.iter().map(|c| c.user).collect();
        let c = &mut self.clients[client];
        while c.pending.len() < c.in_flight_max {
            let Some((client_id, recipient)) = c.planned.pop_front() else {
                break;
            };
            // The body names the message so checkers can find it.
            let body = format!("{}:{client_id}", c.user).into_bytes();
            c.pending.insert(
                client_id,
                Pending {
                    to: recipients[recipient],
                    body,
                    last_attempt_ms: None,
                },
            );
        }
        // (Re)send what is due.
        let now = self.now;
        let mut due = Vec::new();
        for (client_id, pending) in &mut c.pending {
            let is_due = pending
                .last_attempt_ms
                .is_none_or(|at| now >= at + RETRY_AFTER_MS);
            if is_due {
                pending.last_attempt_ms = Some(now);
                due.push(SendRequest {
                    sender: c.user,
                    client_id: *client_id,
                    to: pending.to,
                    body: pending.body.clone(),
                    ttl_secs: None,
                });
            }
        }
        let tag = Tag {
            client,
            connection: c.connection,
        };
        // Ack what has been received, cumulatively.
        let ack = (c.last_seq > c.acked_up_to && self.rng.chance(1, 4)).then(|| {
            c.acked_up_to = c.last_seq;
            (c.user, c.last_seq)
        });
        for send in due {
            let shard = home_shard(send.to, self.shards.len() as u32) as usize;
            self.send_packet(Packet::ToShard {
                shard,
                request: Request::Send(send),
                tag,
            });
        }
        if let Some((inbox, up_to_seq)) = ack {
            let shard = home_shard(inbox, self.shards.len() as u32) as usize;
            self.send_packet(Packet::ToShard {
                shard,
                request: Request::Ack { inbox, up_to_seq },
                tag,
            });
        }
    }

    fn converged(&mut self) -> bool {
        let all_sent = self
            .clients
            .iter()
            .all(|c| c.planned.is_empty() && c.pending.is_empty());
        if !all_sent {
            return false;
        }
        // Every acknowledged message has reached its recipient (seqs are dense, so the
        // recipient's last seq tells).
        let last_seqs: HashMap<UserId, u64> =
            self.clients.iter().map(|c| (c.user, c.last_seq)).collect();
        let all_received = self
            .clients
            .iter()
            .flat_map(|c| c.acked.values())
            .all(|(seq, to)| last_seqs[to] >= *seq);
        if !all_received {
            // A delivery may have been lost with the network; a sync picks it up.
            if self.rng.chance(1, 10) {
                for client in 0..self.clients.len() {
                    self.clients[client].needs_sync = true;
                }
            }
            return false;
        }
        // Every recipient has acked everything and the acks are committed.
        self.clients.iter().all(|c| c.acked_up_to == c.last_seq)
            && self.network.is_empty()
            && self
                .shards
                .iter()
                .all(|s| s.queued_requests() == 0 && !s.batch_in_flight())
    }

    /// The checkers. Runs after convergence.
    fn check(mut self) -> Result<Stats, String> {
        // Which message each (sender, client id) is, from the body.
        let mut delivered_at: HashMap<Vec<u8>, (UserId, u64)> = HashMap::new();
        for c in &self.clients {
            let mut previous = 0;
            for (seq, from, body) in &c.received {
                if *seq <= previous {
                    return Err(format!(
                        "inbox {} out of order: {seq} after {previous}",
                        c.user
                    ));
                }
                previous = *seq;
                let sender_prefix = format!("{from}:");
                if !body.starts_with(sender_prefix.as_bytes()) {
                    return Err(format!("message from {from} carries another sender's body"));
                }
                if delivered_at.insert(body.clone(), (c.user, *seq)).is_some() {
                    return Err(format!(
                        "message {} stored or delivered twice",
                        String::from_utf8_lossy(body)
                    ));
                }
            }
        }
        let mut acked_total = 0;
        for sender in &self.clients {
            for (client_id, (seq, _)) in &sender.acked {
                acked_total += 1;
                let body = format!("{}:{client_id}", sender.user).into_bytes();
                match delivered_at.get(&body) {
                    None => {
                        return Err(format!(
                            "acknowledged message {}:{client_id} was lost",
                            sender.user
                        ));
                    }
                    Some((_, delivered_seq)) if delivered_seq != seq => {
                        return Err(format!(
                            "message {}:{client_id} acked as seq {seq} but delivered as {delivered_seq}",
                            sender.user
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        if delivered_at.len() != acked_total {
            return Err(format!(
                "{} messages delivered but {acked_total} acknowledged",
                delivered_at.len()
            ));
        }
        let planned_total: HashSet<(UserId, u64)> = self
            .clients
            .iter()
            .flat_map(|c| c.acked.keys().map(move |id| (c.user, *id)))
            .collect();
        assert_eq!(planned_total.len(), acked_total);

        // R4: after all acks, no message is stored.
        let left = self.store.inner().dump_prefix(&[keys::TAG_MESSAGE]);
        if !left.is_empty() {
            return Err(format!(
                "{} messages left in the store after all acks",
                left.len()
            ));
        }
        // After the dedupe window (twice, since records live up to two windows) and the
        // retention, expiry leaves no dedupe records and no index entries.
        self.now += 2 * self.config.dedupe_window_ms
            + self.config.retention_ms
            + self.config.expiry_bucket_ms;
        let mut passes = 0;
        loop {
            let report =
                commit::expire(&self.store, self.now, &self.config).map_err(|e| e.to_string())?;
            passes += 1;
            if !report.more {
                break;
            }
            if passes > 10_000 {
                return Err("expiry never finished".into());
            }
        }
        for tag in [keys::TAG_DEDUPE, keys::TAG_EXPIRY, keys::TAG_MESSAGE] {
            let left = self.store.inner().dump_prefix(&[tag]);
            if !left.is_empty() {
                return Err(format!(
                    "{} keys with tag {} left after expiry",
                    left.len(),
                    tag as char
                ));
            }
        }
        let counts = &self.store.counts;
        let load = |counter: &std::sync::atomic::AtomicU64| {
            counter.load(std::sync::atomic::Ordering::Relaxed)
        };
        self.stats.messages_acked = acked_total as u64;
        self.stats.conflicts = load(&counts.conflicts);
        self.stats.commit_unknown_applied = load(&counts.commit_unknown_applied);
        self.stats.commit_unknown_dropped = load(&counts.commit_unknown_dropped);
        self.stats.fsync_failures = load(&counts.fsync_failures);
        self.stats.fenced = load(&counts.fenced);
        Ok(self.stats)
    }
}

/// The checkers must notice a lost acknowledged message.
#[test]
fn simulation_detects_a_store_that_loses_commits() {
    // A world where the server acknowledged a message that no recipient ever received.
    let mut world = World::new(7);
    let to = world.clients[1].user;
    world.clients[0].acked.insert(1, (1, to));
    let failure = world
        .check()
        .expect_err("a lost acknowledged message must fail the check");
    assert!(failure.contains("lost"), "{failure}");
}
