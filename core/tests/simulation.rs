//! Deterministic simulation of the real session layer: the edge's `EdgeSession` (one per shard,
//! with its inbox queue and the real `Committer` on the shard's own fault-injecting store, as
//! the edge's embedded stores are one per shard) and the client's `ClientSession` (one per
//! device), exchanging real frames over a simulated network, on a
//! virtual clock, with lost connections, shard crashes, fencing, store faults, mesh
//! back-pressure, app restarts (some of which lose the app's unanswered sends), several devices
//! per user, messages with short TTLs that expire, commits answered with an unknown result
//! that land seconds later, after later commits, as FoundationDB's may, a transport that takes
//! the edge's writes late while bodies near the maximum fill connections' outbound buffers,
//! clients that ask for their inbox again (`Sync`) after any cursor, and operators who purge
//! users (`ctl purge`: disconnect, then erase) while their devices log in again.
//!
//! The types are the ones the edge (`edge/src/shard.rs`) and the SDK (`client/src/lib.rs`) run;
//! only the I/O is simulated. The network keeps each connection's frames in order (a QUIC stream
//! is reliable and ordered) and loses a connection, never a frame; mesh lanes between shards are
//! ordered too, and congestion there follows `ShardMessage::on_overload`, as the edge does.
//!
//! Goal: prove R2, R4 and liveness. After a chaotic phase, a calm phase (no new faults, every
//! device online) must converge within a bounded number of steps. Then the checkers assert:
//! every message the server acknowledged reached every device of its recipient exactly once,
//! in inbox order, at the acknowledged seq (a device added to an inbox that had others starts
//! at the head it was told in `Welcome`), unless it expired, and then inside a hole the server
//! declared; no hole ever covered a live message; one device's ack never deleted a message
//! another device had not received; a retried send was stored once; after every device acked,
//! the store holds no message; after expiry no dedupe record or index entry is left. A purge
//! excuses what it erased before a device got it, and every device logs in again after it
//! (no connection stays linked across one). The checker cannot see when a purge whose result
//! was unknown was written, so a purge excuses from when it was first asked for.
//!
//! Everything random comes from one seed. A failure prints it; `SIM_SEED=<n>` replays exactly
//! that run, and `SIM_SEEDS=<count>` changes how many seeds run (default 1000). A failure that
//! does not converge names the devices behind and their edge-side state; `SIM_TRACE_USER=<id>`
//! with `SIM_SEED` prints that user's frames and the mesh messages that name it.

use std::collections::{BTreeMap, HashMap, VecDeque};

mod common;
use common::SimAuth;
use common::dump_prefix;

use courier_core::budget::{Rate, SendBudget};
use courier_core::clock::ServerClock;
use courier_core::commit::{self, Committer};
use courier_core::keys;
use courier_core::rng::Rng;
use courier_core::session::{
    ConnRef, EdgeSession, Effect, Overload, PurgeRefused, SessionConfig, ShardMessage,
};
use courier_core::shard::UNKNOWN_RESULT_LANDS_WITHIN_MS;
use courier_core::store::clusters::inbox_of;
use courier_core::store::fault::{FaultRates, FaultStore};
use courier_core::store::log::{LogOptions, LogStore};
use courier_core::store::memory::MemoryStore;
use courier_core::store::{Store, StoreError};
use courier_core::{CoreConfig, UnixMillis, UserId};
use courier_protocol::client::{ClientConfig, ClientEvent, ClientSession};
use courier_protocol::{ErrorCode, Frame};

const SEEDS_DEFAULT: u64 = 1_000;
/// Seeds on the log store (`simulation_on_the_log_store`) unless `SIM_LOG_SEEDS` says otherwise.
const LOG_SEEDS_DEFAULT: u64 = 200;
/// Steps of the chaotic phase.
const CHAOS_STEPS: usize = 3_000;
/// Bound on the calm phase: liveness means converging within it.
const DRAIN_STEPS_MAX: usize = 100_000;
/// How long a dead connection lingers at the edge before its idle timeout ends it.
const IDLE_TIMEOUT_MS: u64 = 300;

#[test]
fn simulation_over_many_seeds() {
    let Some((seeds, results)) = common::run_seeds("simulation", SEEDS_DEFAULT, run_seed) else {
        return;
    };
    let total = Stats::sum(&results);
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
            total.commit_unknown_applied > 0
                && total.commit_unknown_dropped > 0
                && total.late_landings > 0
                && total.late_landings_fenced > 0,
            "{total:?}"
        );
        assert!(
            total.duplicate_sends > 0,
            "no retry was deduplicated: {total:?}"
        );
        assert!(
            total.overloaded > 0,
            "backpressure never triggered: {total:?}"
        );
        assert!(
            total.disconnects > 0 && total.app_restarts > 0 && total.outboxes_lost > 0,
            "{total:?}"
        );
        assert!(
            total.mesh_degraded > 0,
            "mesh congestion never hit: {total:?}"
        );
        assert!(
            total.sends_unconfirmed > 0,
            "no send outlived the SDK's retry window: {total:?}"
        );
        assert!(
            total.clock_steps > 0,
            "the wall clock never stepped: {total:?}"
        );
        assert!(
            total.expired > 0 && total.holes > 0,
            "no message expired into a declared hole: {total:?}"
        );
        assert!(
            total.sends_over_budget > 0
                && total.sends_over_recipient_limit > 0
                && total.connections_timed_out > 0,
            "the abuse limits never refused anything: {total:?}"
        );
        assert!(
            total.slow_commits > 0 && total.sends_store_slow > 0 && total.store_reopens > 0,
            "no slow commit tripped the breaker, or no poisoned store was reopened: {total:?}"
        );
        assert!(
            total.batches_behind_another > 0,
            "no batch was taken while another was in flight: {total:?}"
        );
        assert!(
            total.logins_without_read > 0,
            "every login read the store, so skipping the read was never checked: {total:?}"
        );
        assert!(
            total.logins_unwritten > 0,
            "every login rewrote its device record, so a login that writes nothing was never \
             checked: {total:?}"
        );
        assert!(
            total.deliveries_held_for_acks > 0,
            "no delivery waited for room in its connection's window: {total:?}"
        );
        assert!(
            total.deliveries_held_for_room > 0,
            "no delivery waited for room in its connection's outbound buffer: {total:?}"
        );
        assert!(
            total.syncs_made > 0,
            "no client asked for its inbox again (`Sync`): {total:?}"
        );
        assert!(total.purges > 0, "no purge was answered: {total:?}");
        assert!(
            total.device_sweep_extra_passes > 0,
            "no device sweep fell behind its round and caught up: {total:?}"
        );
        assert!(
            total.inboxes_emptied > 0 && total.seqs_from_floor > 0,
            "expiry never emptied an inbox, or no send went to a forgotten one: {total:?}"
        );
    }
}

/// What happened across a run, to prove the faults really were exercised.
#[derive(Debug, Default, Clone)]
struct Stats {
    messages_acked: u64,
    crashes: u64,
    disconnects: u64,
    app_restarts: u64,
    conflicts: u64,
    commit_unknown_applied: u64,
    commit_unknown_dropped: u64,
    fsync_failures: u64,
    fenced: u64,
    /// Sends answered from the dedupe record instead of being stored again.
    duplicate_sends: u64,
    /// Retries stored a second time because they came more than a dedupe window after the
    /// first attempt was stored (allowed: client ids are unique within the window).
    stored_again_past_dedupe_window: u64,
    overloaded: u64,
    /// Mesh messages that met simulated congestion (dropped, refused or degraded).
    mesh_degraded: u64,
    /// Acknowledged messages that expired before delivery.
    expired: u64,
    /// Holes the server declared to a client.
    holes: u64,
    /// `Sync` frames the SDK sent for gaps: the edge never leaves one undeclared, so a run
    /// where this is not 0 fails (`check`).
    syncs: u64,
    /// `Sync` frames clients sent on their own, naming any cursor (`syncs_per_thousand`).
    syncs_made: u64,
    /// Passes of the device sweep alone, for rounds behind their schedule.
    device_sweep_extra_passes: u64,
    /// Steps of the calm phase until convergence, summed.
    drain_steps: u64,
    /// Wall-clock steps (the edge sees them when it restarts).
    clock_steps: u64,
    /// Sends refused over a send budget (their connection's input paused) or over the
    /// distinct-recipients limit.
    sends_over_budget: u64,
    sends_over_recipient_limit: u64,
    /// Connections closed for a late `Hello`.
    connections_timed_out: u64,
    /// Commits whose result came back later than the step they were taken in.
    slow_commits: u64,
    /// Sends refused while a commit was slow (the breaker).
    sends_store_slow: u64,
    /// Batches taken while another of their shard's was still in flight (decision 0027).
    batches_behind_another: u64,
    /// Batches committed unsynced, synced when their result came back (the log store).
    commits_unsynced: u64,
    /// Unsynced commits a power cut lost (the log store).
    unsynced_lost: u64,
    /// Power cuts just after an unsynced batch was answered (the log store).
    power_cuts_after_answers: u64,
    /// Poisoned stores reopened in place (without a process crash).
    store_reopens: u64,
    /// Inboxes expiry emptied and handed to their home shard to be forgotten.
    inboxes_emptied: u64,
    /// Sends to a forgotten inbox, which continued from the seq floor.
    seqs_from_floor: u64,
    /// Restarts that recovered the store from a snapshot and journals (log store only).
    recoveries_from_snapshot: u64,
    /// Logins that read nothing from the store (nothing stored after the device's cursor).
    logins_without_read: u64,
    /// Logins that left the device's record as it was and wrote nothing (decision 0034).
    logins_unwritten: u64,
    /// Deliveries held back until their connection acknowledged some of its window.
    deliveries_held_for_acks: u64,
    /// Sends of commits answered with an unknown result that landed later.
    late_landings: u64,
    /// Late landings a crash fenced (the restarted edge's claim): they never land.
    late_landings_fenced: u64,
    /// App restarts that lost the app's unanswered sends (it kept no outbox).
    outboxes_lost: u64,
    /// Deliveries held back until their connection's outbound buffer had room.
    deliveries_held_for_room: u64,
    /// Purges (`ctl purge`) answered.
    purges: u64,
    /// Sends stored again after a purge erased their first copy and its dedupe record.
    stored_again_after_purge: u64,
    /// Sends the SDK gave up as unconfirmed: unanswered past its retry window.
    sends_unconfirmed: u64,
}

impl Stats {
    fn sum(all: &[Stats]) -> Stats {
        let mut total = Stats::default();
        for stats in all {
            total.add(stats);
        }
        total
    }

    fn add(&mut self, other: &Stats) {
        self.messages_acked += other.messages_acked;
        self.crashes += other.crashes;
        self.disconnects += other.disconnects;
        self.app_restarts += other.app_restarts;
        self.conflicts += other.conflicts;
        self.commit_unknown_applied += other.commit_unknown_applied;
        self.commit_unknown_dropped += other.commit_unknown_dropped;
        self.fsync_failures += other.fsync_failures;
        self.fenced += other.fenced;
        self.duplicate_sends += other.duplicate_sends;
        self.stored_again_past_dedupe_window += other.stored_again_past_dedupe_window;
        self.overloaded += other.overloaded;
        self.mesh_degraded += other.mesh_degraded;
        self.expired += other.expired;
        self.holes += other.holes;
        self.syncs += other.syncs;
        self.syncs_made += other.syncs_made;
        self.device_sweep_extra_passes += other.device_sweep_extra_passes;
        self.drain_steps += other.drain_steps;
        self.clock_steps += other.clock_steps;
        self.sends_over_budget += other.sends_over_budget;
        self.sends_over_recipient_limit += other.sends_over_recipient_limit;
        self.connections_timed_out += other.connections_timed_out;
        self.slow_commits += other.slow_commits;
        self.sends_store_slow += other.sends_store_slow;
        self.batches_behind_another += other.batches_behind_another;
        self.commits_unsynced += other.commits_unsynced;
        self.unsynced_lost += other.unsynced_lost;
        self.power_cuts_after_answers += other.power_cuts_after_answers;
        self.store_reopens += other.store_reopens;
        self.inboxes_emptied += other.inboxes_emptied;
        self.seqs_from_floor += other.seqs_from_floor;
        self.recoveries_from_snapshot += other.recoveries_from_snapshot;
        self.logins_without_read += other.logins_without_read;
        self.logins_unwritten += other.logins_unwritten;
        self.deliveries_held_for_acks += other.deliveries_held_for_acks;
        self.late_landings += other.late_landings;
        self.late_landings_fenced += other.late_landings_fenced;
        self.outboxes_lost += other.outboxes_lost;
        self.deliveries_held_for_room += other.deliveries_held_for_room;
        self.purges += other.purges;
        self.stored_again_after_purge += other.stored_again_after_purge;
        self.sends_unconfirmed += other.sends_unconfirmed;
    }
}

fn run_seed(seed: u64) -> Result<Stats, String> {
    // Every other seed's stores drop whole tables, as fjall's do: expiry then clears old
    // dedupe buckets by a drop and a sweep from the first bucket (decision 0038).
    if seed % 2 == 0 {
        World::new(seed, |_| MemoryStore::new()).run()
    } else {
        World::new(seed, |_| MemoryStore::dropping_tables()).run()
    }
}

/// The same seeds on the log store engine (`store.engine = "log"`) in a temporary directory:
/// every crash and every reopen of a poisoned store closes it and recovers it from its files
/// (snapshot and journals), so recovery and checkpoints run under the checkers. Journals are
/// small and checkpoints frequent, so each seed crosses segments and snapshots. Seed N is the
/// world of seed N on memory (the store's options come from a generator of their own), so a
/// seed that fails here alone points at the store.
///
/// A simulated crash closes the store as a process would end, not mid-write (torn records and
/// cut snapshots are `core/tests/log_store.rs`'s), or as a power cut would (the commit written
/// and not yet fsynced is lost). The store's background work (checkpoints, spare segments,
/// dedupe moves) runs at steps the seed chooses, not on its own thread, so a seed replays
/// exactly.
fn run_seed_on_the_log_store(seed: u64) -> Result<Stats, String> {
    World::new(seed, |shard| SimLog::open(seed, shard)).run()
}

/// The simulation on the log store: fewer seeds than on memory (each opens real files), set
/// with `SIM_LOG_SEEDS`; `SIM_SEED` replays one seed on both stores.
#[test]
fn simulation_on_the_log_store() {
    let Some((seeds, results)) = common::run_seeds_counted_by(
        "simulation on the log store",
        "SIM_LOG_SEEDS",
        LOG_SEEDS_DEFAULT,
        run_seed_on_the_log_store,
    ) else {
        return;
    };
    let total = Stats::sum(&results);
    eprintln!("simulation on the log store: {seeds} seeds, {total:?}");
    if seeds >= 100 {
        // Recovery from files is what this test adds: it must have run, often.
        assert!(
            total.crashes > 50
                && total.store_reopens > 10
                && total.recoveries_from_snapshot > 50
                && total.messages_acked > 1_000,
            "too few crashes, reopens, snapshots or messages to test recovery: {total:?}"
        );
        assert!(
            total.commits_unsynced > 1_000 && total.batches_behind_another > 1_000,
            "too few unsynced commits, or too few taken while another was in flight: {total:?}"
        );
        assert!(
            // About 50 in 200 seeds: 50 exactly on seeds 400000–400199.
            total.power_cuts_after_answers > 30 && total.unsynced_lost > 0,
            "too few power cuts after answers, or none lost an unsynced commit: {total:?}"
        );
    }
}

/// A store the simulation runs on. A crash, or reopening a poisoned store, calls `restart`:
/// what a restarted edge finds is what the store made durable.
trait SimStore: Store {
    fn restart(&mut self);

    /// Restarts after a power cut: what was written and never fsynced is lost. Returns the
    /// keys a lost commit had set, if a written commit was lost.
    fn cut_power(&mut self) -> Option<Vec<Vec<u8>>> {
        self.restart();
        None
    }

    /// Restarts so far that recovered from a snapshot.
    fn recoveries_from_snapshot(&self) -> u64 {
        0
    }

    /// Runs the store's background work that is due (the log store's checkpoints).
    fn run_background_work(&self) {}
}

impl SimStore for MemoryStore {
    /// Everything committed is durable: the map stays.
    fn restart(&mut self) {}
}

/// The log store engine in its own temporary directory, closed and opened again on restart.
struct SimLog {
    /// Before `dir`: fields drop in order, and the store's thread must stop before its
    /// directory goes.
    store: Option<LogStore>,
    dir: tempfile::TempDir,
    options: LogOptions,
    recoveries_from_snapshot: u64,
}

impl SimLog {
    /// Shard `shard`'s store: each shard's has options of its own.
    fn open(seed: u64, shard: u32) -> SimLog {
        // "logstore", and the shard.
        let mut rng = Rng::new(seed ^ 0x6c6f_6773_746f_7265 ^ (u64::from(shard) << 8));
        let rng = &mut rng;
        // On tmpfs where there is one: fsync is free there, and a process crash (which is what
        // the simulation's crash is) keeps what was written, as the page cache would.
        let dir = match std::path::Path::new("/dev/shm") {
            shm if shm.is_dir() => tempfile::tempdir_in(shm),
            _ => tempfile::tempdir(),
        }
        .expect("temp dir for the log store");
        let options = LogOptions {
            // A checkpoint every few dozen commits, and segments from tiny to none.
            journal_bytes_max: 4_096 << rng.below(4),
            journal_segment_bytes: [0, 512, 4_096][rng.below(3) as usize],
            // Dedupe records moved to the tier every few commits, or only at checkpoints.
            dedupe_memory_bytes_max: [256, 4_096, u64::MAX][rng.below(3) as usize],
            // Checkpoints, spare segments and moves run when the world says (`step`), so a
            // seed replays exactly.
            background_thread: false,
            ..LogOptions::default()
        };
        let store = LogStore::open(dir.path(), &options).expect("open the log store");
        SimLog {
            store: Some(store),
            dir,
            options,
            recoveries_from_snapshot: 0,
        }
    }

    fn store(&self) -> &LogStore {
        self.store.as_ref().expect("the log store is open")
    }
}

impl SimStore for SimLog {
    fn run_background_work(&self) {
        self.store().run_background_work();
    }

    /// The pending commit's record (written by an unsynced commit, not yet synced) is lost.
    fn cut_power(&mut self) -> Option<Vec<Vec<u8>>> {
        let lost = self
            .store
            .take()
            .expect("the log store is open")
            .cut_power_for_test();
        self.restart();
        lost
    }

    fn restart(&mut self) {
        // Close first: the store locks its directory.
        self.store = None;
        let store = LogStore::open(self.dir.path(), &self.options)
            .unwrap_or_else(|error| panic!("recover the log store: {error}"));
        self.recoveries_from_snapshot += u64::from(store.recovery().snapshot);
        self.store = Some(store);
    }

    fn recoveries_from_snapshot(&self) -> u64 {
        self.recoveries_from_snapshot
    }
}

impl Store for SimLog {
    type Transaction<'a> = <LogStore as Store>::Transaction<'a>;

    fn begin(&self) -> Result<Self::Transaction<'_>, StoreError> {
        self.store().begin()
    }

    fn begin_read(&self) -> Result<Self::Transaction<'_>, StoreError> {
        self.store().begin_read()
    }

    fn defers_sync(&self) -> bool {
        self.store().defers_sync()
    }

    fn drops_tables(&self) -> bool {
        self.store().drops_tables()
    }

    fn drop_tables_within(&self, begin: &[u8], end: &[u8]) -> Result<(), StoreError> {
        self.store().drop_tables_within(begin, end)
    }

    fn begin_unsynced(&self) -> Result<Self::Transaction<'_>, StoreError> {
        self.store().begin_unsynced()
    }

    fn sync_through(&self, version: courier_core::store::CommitVersion) -> Result<(), StoreError> {
        self.store().sync_through(version)
    }
}

#[derive(Debug)]
enum Packet {
    /// A frame from a client's connection to the shard that holds it.
    ToEdge { conn: ConnRef, frame: Frame },
    /// A frame from the edge to a client's connection.
    ToClient {
        client: usize,
        conn: ConnRef,
        frame: Frame,
    },
    /// The edge closed the connection (a QUIC close reaching the client).
    Closed {
        client: usize,
        conn: ConnRef,
        code: ErrorCode,
    },
    /// A message on the mesh lane to `shard`.
    Mesh { shard: u8, message: ShardMessage },
    /// A store read finished.
    ReadDone {
        shard: u8,
        conn: ConnRef,
        after_seq: u64,
        result: Result<commit::InboxPage, StoreError>,
    },
    /// The edge notices a connection whose client is gone (idle timeout).
    IdleTimeout { conn: ConnRef },
}

impl Packet {
    /// The ordered lane the packet travels on: packets of one lane arrive in send order.
    fn lane(&self) -> Lane {
        match self {
            Packet::ToEdge { conn, .. } => Lane::Up(conn.slot),
            Packet::ToClient { conn, .. } | Packet::Closed { conn, .. } => Lane::Down(conn.slot),
            Packet::Mesh { shard, .. } => Lane::Mesh(*shard),
            Packet::ReadDone { conn, .. } | Packet::IdleTimeout { conn } => Lane::Local(conn.slot),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Lane {
    Up(usize),
    Down(usize),
    Mesh(u8),
    Local(usize),
}

/// What a sender learned from `SendAck`, with what it had asked for.
#[derive(Debug, Clone, Copy)]
struct Receipt {
    seq: u64,
    to: UserId,
    ttl_secs: Option<u32>,
    /// The edge's time when it stored the acknowledged copy.
    server_time_ms: u64,
}

/// The body of `user`'s send `client_id`: it names the message, so the checkers find it. In
/// worlds with large bodies some are padded toward `BODY_BYTES_MAX`, so that a few fill a
/// connection's outbound buffer; the padding follows from the id, so the checkers make the same
/// body.
fn body_of(user: UserId, client_id: u64, large_per_thousand: u64) -> Vec<u8> {
    let mut body = format!("{user}:{client_id}").into_bytes();
    let hash = (user.wrapping_mul(31) ^ client_id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    if (hash >> 40) % 1000 < large_per_thousand {
        let padded_bytes = 1024 + (hash as usize) % (courier_protocol::BODY_BYTES_MAX - 1024);
        body.push(b'#');
        body.resize(padded_bytes, b'.');
    }
    body
}

/// The sender and client id a body names (`body_of`).
fn body_id(body: &[u8]) -> Option<(UserId, u64)> {
    let name = body.split(|byte| *byte == b'#').next()?;
    let name = std::str::from_utf8(name).ok()?;
    let (user, client_id) = name.split_once(':')?;
    Some((user.parse().ok()?, client_id.parse().ok()?))
}

fn outbuf_key(conn: ConnRef) -> (u8, usize, u64) {
    (conn.shard, conn.slot, conn.generation)
}

fn new_client_session(
    user: UserId,
    device: u32,
    in_flight_max: usize,
    send_retry_window_ms: u64,
    consumed_up_to: u64,
) -> ClientSession {
    let mut config = ClientConfig::new(format!("{user}:{device}").into_bytes(), device);
    config.sends_in_flight_max = in_flight_max;
    config.retry_after_ms = 150;
    config.send_retry_window_ms = send_retry_window_ms;
    ClientSession::new(config, consumed_up_to)
}

/// What one device's application did and saw.
#[derive(Debug)]
struct Client {
    user: UserId,
    device: u32,
    session: ClientSession,
    /// The cursor the first `Welcome` gave: the device receives what comes after it.
    linked_after: Option<u64>,
    /// The connection this client is on, if any.
    conn: Option<ConnRef>,
    /// When to try connecting again while offline.
    reconnect_at: UnixMillis,
    /// Messages still to send: (client id, recipient user index, ttl).
    planned: VecDeque<(u64, usize, Option<u32>)>,
    /// The app's outbox: sends made and not answered, resent under their ids after a restart.
    outbox: BTreeMap<u64, (UserId, Vec<u8>, Option<u32>)>,
    /// Ids of sends the SDK gave up as unconfirmed: none may be written again.
    unconfirmed: std::collections::HashSet<u64>,
    /// Sends the server acknowledged.
    acked: HashMap<u64, Receipt>,
    /// Deliveries the application took: (seq, from, body).
    received: Vec<(u64, UserId, Vec<u8>)>,
    /// Declared holes: (after, up_to], the edge's time when the device heard of it, and the
    /// simulated time (which, unlike the edge's, never runs back across a restart).
    holes: Vec<(u64, u64, UnixMillis, u64)>,
    /// Highest seq the application consumed and persisted (survives an app restart).
    consumed_up_to: u64,
    /// Consumes deliveries only some of the time (a slow app, or one with manual acks).
    consume_per_thousand: u64,
    /// Deliveries handed out and not yet consumed, in order.
    unconsumed: VecDeque<(u64, UserId, Vec<u8>)>,
    /// The server time each received seq was stored at (`Deliver.sent_at_ms`).
    sent_at_ms: HashMap<u64, u64>,
    /// The simulated time each seq was handed to the application.
    delivered_at: HashMap<u64, u64>,
    /// Seqs handed to the application after a hole declared to it had covered them: (seq,
    /// the hole). A device told a message is gone never gets it (`check`).
    delivered_after_hole: Vec<(u64, (u64, u64))>,
    /// What the application had consumed when each purge of its user was first asked for:
    /// (simulated time of the ask, `consumed_up_to`).
    consumed_at_purges: Vec<(u64, u64)>,
    /// A purge of the user closed the device's connections: it must log in again
    /// (`record_answered`). If it had never linked, that link sets `linked_after`.
    relink_pending: bool,
    /// Such first links after purges: the simulated time each was answered, and the seq
    /// after which the device gets what is stored (its cursor, or past what was deleted
    /// before it linked).
    relinks: Vec<(u64, u64)>,
}

struct World<S: SimStore> {
    seed: u64,
    rng: Rng,
    now: UnixMillis,
    config: CoreConfig,
    /// One store per shard, as the edge's embedded stores (`data_dir/stores/shard-N`): a shard
    /// commits and expires its own; reads go to the inbox's home shard's.
    stores: Vec<FaultStore<S>>,
    shards: Vec<EdgeSession<SimAuth>>,
    committers: Vec<Committer>,
    /// Every (inbox, seq) a commit was seen to store, less those a power cut lost, with the
    /// time it expires at by the send's TTL (`None` for a send without one).
    assigned: HashMap<(UserId, u64), Option<UnixMillis>>,
    /// The highest of them per inbox.
    last_assigned: HashMap<UserId, u64>,
    clients: Vec<Client>,
    /// Which client holds each connection slot (slots are never reused).
    slot_owner: HashMap<usize, usize>,
    next_slot: usize,
    /// In-flight packets by delivery time; the counter keeps equal times in FIFO order.
    network: BTreeMap<(UnixMillis, u64), Packet>,
    /// Latest delivery time per lane, so each lane stays in order.
    lane_clock: HashMap<Lane, UnixMillis>,
    packet_counter: u64,
    loss_per_thousand: u64,
    crash_per_thousand: u64,
    disconnect_per_thousand: u64,
    restart_per_thousand: u64,
    congestion_per_thousand: u64,
    /// The wall clock's error: stepped back and forth in the chaotic phase. The edge reads the
    /// wall clock only when it starts, through the real `ServerClock`.
    wall_offset_ms: i64,
    clock: ServerClock,
    client_in_flight_max: usize,
    /// The SDK's `send_retry_window_ms`: its default (a day, never reached here) or, for a
    /// quarter of the seeds, seconds, so that sends stuck behind crashes and partitions fail
    /// as unconfirmed and are never written again.
    client_send_retry_window_ms: u64,
    session_config: SessionConfig,
    /// Per shard: the batches in flight, oldest first, each written and waiting for its
    /// result to come back at the given time (and, on the log store, for its sync).
    commits_in_flight: Vec<VecDeque<InFlight>>,
    slow_commit_per_thousand: u64,
    /// Per store: when it is reopened after it was poisoned (`store_refused`).
    store_reopen_at: Vec<Option<u64>>,
    /// When the power fails, a few steps after an unsynced batch was answered.
    power_cut_at: Option<u64>,
    /// Frames for connections whose input the edge paused, in arrival order. Ordered by
    /// connection, so a seed replays exactly.
    held: BTreeMap<(u8, usize, u64), VecDeque<Frame>>,
    /// Per connection: frames the edge wrote that QUIC has not taken yet (the driver's
    /// outbuf), with their encoded bytes, oldest first. Empty in worlds whose transport takes
    /// every write at once.
    outbufs: BTreeMap<(u8, usize, u64), VecDeque<(Frame, usize)>>,
    /// Chance per step that QUIC takes some of a connection's outbuf (a slow path or a
    /// client slow to read); 1000: it takes every write at once.
    transport_takes_per_thousand: u64,
    /// Share of sends whose body is padded toward the maximum (`body_of`).
    large_bodies_per_thousand: u64,
    /// Chance per step that a client with a live link asks for its inbox again after a
    /// cursor of its choosing (`Sync`), in the chaotic phase.
    syncs_per_thousand: u64,
    /// Chance per step, in the chaotic phase, that an operator purges a user (`ctl purge`).
    purge_per_thousand: u64,
    /// Users an operator purged whose purge was not answered yet, with the simulated time of
    /// the first request: run again after a crash (the operator is told to) or a full queue.
    purges_wanted: BTreeMap<UserId, u64>,
    /// When the operator runs the wanted purges again.
    purges_rerun_at: Option<u64>,
    /// Purges on their way to their home shard, after their users were disconnected: when
    /// each arrives.
    purges_to_queue: Vec<(u64, UserId)>,
    /// Per user: its answered purges, each with the simulated time it was first asked for
    /// (the edge's clock may run back across a restart: it resumes from the last commit) and
    /// the last seq it erased. A purge erases from when it is written, which may be before
    /// its answer, or before an answer of an earlier attempt that never came (an unknown
    /// result): never before it was asked for.
    purges: HashMap<UserId, Vec<(u64, u64)>>,
    /// The simulated time each (inbox, seq) was first seen stored.
    stored_at: HashMap<(UserId, u64), u64>,
    /// The recipient of every send an app made, by (sender, client id).
    sends_to: HashMap<(UserId, u64), UserId>,
    /// Per user: the next connection slot when its latest purge was answered. Connections
    /// before it may be closed with `Disconnected` by that purge.
    purge_slot_marks: HashMap<UserId, usize>,
    /// Per shard: the sends of batches answered with an unknown result and written later,
    /// each with when (sim time), as a FoundationDB commit may land after its result came
    /// back, within `UNKNOWN_RESULT_LANDS_WITHIN_MS`, and after later commits succeeded.
    /// Only sends: they are what a shard delivers. A landing writes them at the time the
    /// batch was taken (the transaction computed its writes then), on the store as it is
    /// when it lands (a FoundationDB commit whose reads changed meanwhile would not land).
    /// A crash fences them all (`crash_with`).
    late_landings: Vec<Vec<LateLanding>>,
    late_landing_per_thousand: u64,
    /// The bodies of sends that apps lost unanswered (`restart_app`): stored or not, they are
    /// never acknowledged.
    sends_lost: std::collections::HashSet<Vec<u8>>,
    stats: Stats,
}

/// The sends of a batch answered with an unknown result, written later.
struct LateLanding {
    /// Simulated time at which it lands.
    land_at: u64,
    /// The edge's time when the batch was taken: its commit time.
    taken_ms: UnixMillis,
    sends: Vec<commit::Request>,
}

/// A batch taken and written, waiting for its result to come back.
struct InFlight {
    due: u64,
    batch: courier_core::shard::Batch<ConnRef>,
    result: Result<Vec<commit::Outcome>, StoreError>,
    /// The version to sync before the result counts (the log store's unsynced commits).
    sync: Option<courier_core::store::CommitVersion>,
}

impl<S: SimStore> World<S> {
    fn new(seed: u64, open: impl Fn(u32) -> S) -> World<S> {
        let mut rng = Rng::new(seed);
        let batch_requests_max = 1 + rng.below(16) as usize;
        let config = CoreConfig {
            batch_requests_max,
            queue_requests_max: batch_requests_max + rng.below(32) as usize,
            queue_requests_per_sender_max: 1 + rng.below(8) as usize,
            commit_slow_ms: 5 + rng.below(50),
            batches_in_flight_max: [1, 2, 2][rng.below(3) as usize],
            commit_attempts_max: 1 + rng.below(4) as u32,
            expire_scan_keys_max: 2 + rng.below(50) as usize,
            // Half the seeds pace the device sweep's rounds in simulated time, so that rounds
            // fall behind and catch up (under the store's faults) while devices come and go.
            device_sweep_round_ms_max: if rng.chance(1, 2) {
                CoreConfig::default().device_sweep_round_ms_max
            } else {
                20 + rng.below(2_000)
            },
            sync_messages_max: 1 + rng.below(20) as usize,
            seq_cache_entries_max: rng.below(8) as usize,
            expiry_bucket_ms: 1_000,
            ..CoreConfig::default()
        };
        let config = CoreConfig {
            queue_requests_per_sender_max: config
                .queue_requests_per_sender_max
                .min(config.queue_requests_max),
            ..config
        };
        config.validate().expect("valid sim config");
        let fault_level = rng.below(4);
        let rates = FaultRates {
            conflict_per_million: fault_level * 20_000,
            commit_unknown_per_million: fault_level * 20_000,
            fsync_failure_per_million: fault_level * 5_000,
            fenced_per_million: fault_level * 2_000,
        };
        let shard_count = 1 + rng.below(4) as u32;
        let fault_seed = rng.next_u64();
        let stores: Vec<FaultStore<S>> = (0..shard_count)
            .map(|shard| FaultStore::new(open(shard), rates, fault_seed ^ u64::from(shard)))
            .collect();
        let messages_per_client = 1 + rng.below(60);
        let in_flight_max = 1 + rng.below(8) as usize;
        // From a generator of its own, so that the other three quarters of the seeds keep
        // the worlds they had before the window was simulated.
        let send_retry_window_ms = {
            let mut rng = Rng::new(seed ^ 0x5e4d_0000_7769_6e64);
            if rng.chance(1, 4) {
                500 + rng.below(4_000)
            } else {
                ClientConfig::new(Vec::new(), 0).send_retry_window_ms
            }
        };
        let ttl_share = rng.below(4); // in quarters of the sends
        let user_count = 2 + rng.below(10) as usize;
        let devices_max = 1 + rng.below(3) as u32;
        let devices: Vec<(UserId, u32)> = (0..user_count)
            .flat_map(|index| {
                // Spread user ids so placement puts them on different shards.
                let user = 1000 + index as u64 * 7919;
                let count = 1 + rng.below(u64::from(devices_max)) as u32;
                (0..count).map(move |device| (user, device))
            })
            .collect();
        let users: Vec<UserId> = (0..user_count).map(|i| 1000 + i as u64 * 7919).collect();
        let clients = devices
            .into_iter()
            .map(|(user, device)| {
                let planned = (1..=messages_per_client)
                    .map(|n| {
                        // Ids are unique per sender (the user), across its devices.
                        let client_id = n * 64 + u64::from(device);
                        let to = rng.below(users.len() as u64) as usize;
                        let ttl = (rng.below(4) < ttl_share && rng.chance(1, 3))
                            .then(|| 1 + rng.below(3) as u32);
                        (client_id, to, ttl)
                    })
                    .collect();
                Client {
                    user,
                    device,
                    session: new_client_session(
                        user,
                        device,
                        in_flight_max,
                        send_retry_window_ms,
                        0,
                    ),
                    linked_after: None,
                    conn: None,
                    reconnect_at: 0,
                    planned,
                    outbox: BTreeMap::new(),
                    unconfirmed: Default::default(),
                    acked: HashMap::new(),
                    received: Vec::new(),
                    holes: Vec::new(),
                    consumed_up_to: 0,
                    consume_per_thousand: if rng.chance(1, 2) {
                        1000
                    } else {
                        50 + rng.below(900)
                    },
                    unconsumed: VecDeque::new(),
                    sent_at_ms: HashMap::new(),
                    delivered_at: HashMap::new(),
                    delivered_after_hole: Vec::new(),
                    consumed_at_purges: Vec::new(),
                    relink_pending: false,
                    relinks: Vec::new(),
                }
            })
            .collect();
        // A third of the worlds send some large bodies, and half have a transport that takes
        // the edge's writes late: together they fill connections' outbound buffers, so
        // deliveries wait for room and the edge stops reading a connection.
        let large_bodies_per_thousand = if rng.chance(1, 3) {
            100 + rng.below(500)
        } else {
            0
        };
        let transport_takes_per_thousand = if rng.chance(1, 2) {
            1000
        } else {
            100 + rng.below(800)
        };
        // Limits against abuse, tight in some worlds so their refusals happen: every one is
        // retryable (or closes a connection that the client opens again), so delivery must
        // still converge.
        let rate = |rng: &mut Rng, per_sec_min: u64, burst_min: u64| {
            if rng.chance(1, 2) {
                Rate::UNLIMITED
            } else {
                Rate {
                    per_sec: per_sec_min + rng.below(10 * per_sec_min),
                    burst: burst_min + rng.below(4 * burst_min),
                }
            }
        };
        // Large bodies get a larger byte rate, so the calm phase sends them in its minutes.
        let bytes_per_sec_min = if large_bodies_per_thousand > 0 {
            64_000
        } else {
            2_000
        };
        let budget = |rng: &mut Rng| SendBudget {
            messages: rate(rng, 20, 1),
            // The burst holds at least one maximal body, so every send can pass eventually.
            bytes: rate(
                rng,
                bytes_per_sec_min,
                courier_protocol::FRAME_BYTES_MAX as u64,
            ),
        };
        let session_config = SessionConfig {
            connections_per_user_max: 4,
            sends_in_flight_per_connection_max: 1 + rng.below(8) as usize,
            send_bytes_in_flight_per_connection_max: 1 + rng.below(300) as usize,
            outbound_bytes_per_connection_max: 2 * courier_protocol::FRAME_BYTES_MAX,
            // Half the runs hold a device to a few unacknowledged deliveries, so that every
            // delivery waits for acks and reads the store.
            deliveries_unacked_per_connection_max: if rng.chance(1, 2) {
                1 + rng.below(4) as usize
            } else {
                1024
            },
            send_budget_per_connection: budget(&mut rng),
            send_budget_per_user: budget(&mut rng),
            // Tight enough to refuse in the chaos phase; windows short enough that a
            // client's peers all get through within the calm phase's simulated minutes.
            // A user's devices share the limit, so a tight one lets one device starve another
            // of the same user for a while: it must stay loose enough for every device's
            // peers to get through within the calm phase.
            recipients_per_user_per_window_max: if rng.chance(1, 2) {
                0
            } else {
                3 + rng.below(6) as usize
            },
            recipients_window_ms: 500 + rng.below(2_000),
            hello_timeout_ms: 50 + rng.below(2_000),
            ..SessionConfig::new(0, shard_count, config.clone())
        };
        let slow_commit_per_thousand = rng.below(200);
        let syncs_per_thousand = if rng.chance(1, 2) { rng.below(20) } else { 0 };
        let purge_per_thousand = if rng.chance(1, 3) {
            1 + rng.below(3)
        } else {
            0
        };
        let late_landing_per_thousand = fault_level * 10;
        let mut world = World {
            seed,
            loss_per_thousand: rng.below(30),
            crash_per_thousand: rng.below(5),
            disconnect_per_thousand: rng.below(15),
            restart_per_thousand: rng.below(5),
            congestion_per_thousand: rng.below(100),
            rng,
            now: 1_700_000_000_000,
            shards: Vec::new(),
            committers: Vec::new(),
            assigned: HashMap::new(),
            last_assigned: HashMap::new(),
            config,
            store_reopen_at: vec![None; stores.len()],
            stores,
            clients,
            slot_owner: HashMap::new(),
            held: BTreeMap::new(),
            outbufs: BTreeMap::new(),
            transport_takes_per_thousand,
            large_bodies_per_thousand,
            syncs_per_thousand,
            purge_per_thousand,
            purges_wanted: BTreeMap::new(),
            purges_rerun_at: None,
            purges_to_queue: Vec::new(),
            purges: HashMap::new(),
            stored_at: HashMap::new(),
            sends_to: HashMap::new(),
            purge_slot_marks: HashMap::new(),
            commits_in_flight: Vec::new(),
            slow_commit_per_thousand,
            late_landings: (0..shard_count).map(|_| Vec::new()).collect(),
            late_landing_per_thousand,
            sends_lost: Default::default(),
            power_cut_at: None,
            next_slot: 0,
            network: BTreeMap::new(),
            lane_clock: HashMap::new(),
            packet_counter: 0,
            wall_offset_ms: 0,
            clock: ServerClock::start(0, 0, 0),
            client_in_flight_max: in_flight_max,
            client_send_retry_window_ms: send_retry_window_ms,
            session_config,
            stats: Stats::default(),
        };
        world.start_shards();
        world
    }

    /// The edge's time: its `ServerClock`, advanced by the (monotonic) simulated time.
    fn edge_now(&self) -> UnixMillis {
        self.clock.now(self.now)
    }

    /// Adds what the shards' sessions refused to the run's stats (before they are replaced).
    fn harvest_session_stats(&mut self) {
        for shard in &self.shards {
            let stats = shard.stats();
            self.stats.sends_over_budget += stats.sends_over_budget;
            self.stats.sends_over_recipient_limit += stats.sends_over_recipient_limit;
            self.stats.connections_timed_out += stats.connections_timed_out;
            self.stats.sends_store_slow += stats.sends_store_slow;
            self.stats.logins_without_read += shard.logins_without_read();
            self.stats.deliveries_held_for_acks += shard.deliveries_held_for_acks();
            self.stats.deliveries_held_for_room += shard.deliveries_held_for_room();
        }
        for committer in &self.committers {
            self.stats.logins_unwritten += committer.logins_unwritten();
        }
    }

    /// The edge process starts: its clock from the wall clock and the highest high-water mark
    /// of its stores (every shard's, as `Embedded::clock_high_water` reads them: the shards'
    /// clocks agree, so a read of another shard's inbox expires what its owner would).
    fn start_shards(&mut self) {
        self.harvest_session_stats();
        let wall = self.now.saturating_add_signed(self.wall_offset_ms);
        let high_water = self
            .stores
            .iter()
            .map(|store| commit::clock_high_water(store.inner()).expect("read the clock"))
            .max()
            .expect("a store per shard");
        self.clock = ServerClock::start(wall, high_water, self.now);
        let count = self.session_config.shard_count;
        self.shards = (0..count)
            .map(|shard| {
                let config = SessionConfig {
                    shard: shard as u8,
                    ..self.session_config.clone()
                };
                EdgeSession::new(config, SimAuth)
            })
            .collect();
        self.committers = (0..count).map(|_| Committer::new(&self.config)).collect();
        self.commits_in_flight = (0..count).map(|_| VecDeque::new()).collect();
    }

    fn run(mut self) -> Result<Stats, String> {
        for client in 0..self.clients.len() {
            if self.rng.chance(3, 4) {
                self.connect(client);
            }
        }
        for _ in 0..CHAOS_STEPS {
            self.step(true);
        }
        // Calm phase: no new faults; every device reconnects by its own backoff and consumes
        // what it receives.
        for store in &self.stores {
            store.set_rates(FaultRates::default());
        }
        self.loss_per_thousand = 0;
        self.congestion_per_thousand = 0;
        for client in &mut self.clients {
            client.consume_per_thousand = 1000;
        }
        let mut steps = 0;
        while !self.converged() {
            self.step(false);
            steps += 1;
            if steps > DRAIN_STEPS_MAX {
                return Err(format!(
                    "did not converge within {DRAIN_STEPS_MAX} calm steps: {}",
                    self.describe()
                ));
            }
        }
        self.stats.drain_steps = steps as u64;
        self.stats.recoveries_from_snapshot = self
            .stores
            .iter()
            .map(|store| store.inner().recoveries_from_snapshot())
            .sum();
        self.harvest_session_stats();
        self.check()
    }

    fn describe(&self) -> String {
        let pending: usize = self
            .clients
            .iter()
            .map(|c| c.session.pending_sends() + c.planned.len())
            .sum();
        let cursors: Vec<String> = self
            .clients
            .iter()
            .map(|c| {
                let head = self.head(c.user);
                let behind = c.session.received_up_to() < head || c.session.pending_sends() > 0;
                let edge_side = c
                    .conn
                    .filter(|_| behind)
                    .and_then(|conn| self.shards[conn.shard as usize].describe_connection(conn))
                    .map(|state| format!(" edge: {state} client active: {}", c.session.is_active()))
                    .unwrap_or_default();
                format!(
                    "{}:{}/{}{}{edge_side}",
                    c.user,
                    c.session.received_up_to(),
                    head,
                    if c.conn.is_some() { "" } else { " offline" }
                )
            })
            .collect();
        let session_stats: Vec<String> = self
            .shards
            .iter()
            .map(|shard| format!("{:?}", shard.stats()))
            .collect();
        format!(
            "seed {} shards {} clients {} pending {} network {} held {:?} crashes {} session stats {} cursors/last [{}]",
            self.seed,
            self.shards.len(),
            self.clients.len(),
            pending,
            self.network.len(),
            self.held
                .iter()
                .map(|(key, q)| (key.1, q.len()))
                .collect::<Vec<_>>(),
            self.stats.crashes,
            session_stats.join(" "),
            cursors.join(" ")
        )
    }

    /// A frame the transport took for the client on `conn`.
    fn send_to_client(&mut self, conn: ConnRef, frame: Frame) {
        let client = self.slot_owner[&conn.slot];
        let latency = 1 + self.rng.below(20);
        self.schedule(
            Packet::ToClient {
                client,
                conn,
                frame,
            },
            latency,
        );
    }

    /// Whether the driver stops reading the connection: its outbuf holds the most it may
    /// (`read_stream` in edge/src/shard.rs).
    fn outbuf_full(&self, conn: ConnRef) -> bool {
        self.outbufs.get(&outbuf_key(conn)).is_some_and(|outbuf| {
            outbuf.iter().map(|(_, bytes)| bytes).sum::<usize>()
                >= self.session_config.outbound_bytes_per_connection_max
        })
    }

    /// QUIC takes some of each connection's outbuf, oldest first, now and then, and the driver
    /// tells the session what is left, as the edge's `flush` does: a sync that waited for
    /// room goes on when it is empty.
    fn take_outbufs(&mut self) {
        let keys: Vec<(u8, usize, u64)> = self.outbufs.keys().copied().collect();
        for key in keys {
            if self.rng.below(1000) >= self.transport_takes_per_thousand {
                continue;
            }
            // An earlier connection's effects may have closed this one.
            let Some(queued) = self.outbufs.get(&key).map(VecDeque::len) else {
                continue;
            };
            let take = if self.rng.chance(1, 2) {
                queued
            } else {
                1 + self.rng.below(queued as u64) as usize
            };
            let outbuf = self.outbufs.get_mut(&key).expect("listed");
            let taken: Vec<Frame> = outbuf.drain(..take).map(|(frame, _)| frame).collect();
            let buffered: usize = outbuf.iter().map(|(_, bytes)| bytes).sum();
            if outbuf.is_empty() {
                self.outbufs.remove(&key);
            }
            let (shard, slot, generation) = key;
            let conn = ConnRef {
                shard,
                slot,
                generation,
            };
            for frame in taken {
                self.send_to_client(conn, frame);
            }
            self.shards[shard as usize].set_outbound_bytes(conn, buffered);
            self.apply_effects(shard as usize);
        }
    }

    fn schedule(&mut self, packet: Packet, latency: u64) {
        let lane = packet.lane();
        let earliest = self.lane_clock.get(&lane).copied().unwrap_or(0);
        let at = (self.now + latency).max(earliest);
        self.lane_clock.insert(lane, at);
        self.packet_counter += 1;
        self.network.insert((at, self.packet_counter), packet);
    }

    /// A frame from a client. QUIC recovers lost packets, so loss here is the loss of the
    /// whole connection.
    fn client_frame(&mut self, client: usize, conn: ConnRef, frame: Frame) {
        if self.rng.below(1000) < self.loss_per_thousand {
            self.drop_connection(client);
            return;
        }
        let latency = 1 + self.rng.below(20);
        self.schedule(Packet::ToEdge { conn, frame }, latency);
    }

    /// The client asks for its inbox again after a cursor of its choosing, as a client that
    /// lost deliveries may: mostly one it holds (the edge resends what follows, which the
    /// SDK drops as held), sometimes one past it (the edge clamps it to what it gave), and
    /// never before `Welcome` (a `Sync` before `Hello` is a protocol error). Whatever it
    /// names, nothing may be lost, delivered twice or out of order.
    fn make_sync(&mut self, client: usize) {
        let c = &self.clients[client];
        let Some(conn) = c.conn.filter(|_| c.session.is_active()) else {
            return;
        };
        let held = c.session.received_up_to();
        let after_seq = match self.rng.below(10) {
            0..=5 => self.rng.below(held + 1),
            6 | 7 => held,
            8 => held + 1 + self.rng.below(10),
            _ => u64::MAX,
        };
        self.stats.syncs_made += 1;
        self.client_frame(client, conn, Frame::Sync { after_seq });
    }

    /// The client's connection dies without a close: the client notices now, the edge at its
    /// idle timeout.
    fn drop_connection(&mut self, client: usize) {
        let Some(conn) = self.clients[client].conn.take() else {
            return;
        };
        self.stats.disconnects += 1;
        let now = self.now;
        let c = &mut self.clients[client];
        c.session.disconnected(now);
        let delay = c.session.reconnect_delay_ms(self.rng.next_u64());
        c.reconnect_at = now + delay;
        self.schedule(Packet::IdleTimeout { conn }, IDLE_TIMEOUT_MS);
    }

    fn step(&mut self, chaos: bool) {
        self.now += 1 + self.rng.below(5);
        while let Some(entry) = self.network.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let packet = entry.remove();
            self.receive(packet);
        }
        self.take_outbufs();
        for client in 0..self.clients.len() {
            self.client_tick(client);
        }
        // Connections whose input resumed: their held frames, in order, until paused again.
        let held: Vec<(u8, usize, u64)> = self.held.keys().copied().collect();
        for key in held {
            let (shard, slot, generation) = key;
            let conn = ConnRef {
                shard,
                slot,
                generation,
            };
            let shard = shard as usize;
            while !self.shards[shard].input_paused(conn) && !self.outbuf_full(conn) {
                let Some(frame) = self.held.get_mut(&key).and_then(|q| q.pop_front()) else {
                    break;
                };
                let now = self.edge_now();
                self.shards[shard].handle_frame(now, conn, frame, false);
                self.apply_effects(shard);
            }
            if self.held.get(&key).is_some_and(|q| q.is_empty()) {
                self.held.remove(&key);
            }
        }
        while let Some(next) = self
            .purges_to_queue
            .iter()
            .position(|(at, _)| *at <= self.now)
        {
            let (_, user) = self.purges_to_queue.remove(next);
            self.queue_purge(user);
        }
        if self.purges_rerun_at.is_some_and(|at| at <= self.now) {
            self.purges_rerun_at = None;
            let wanted: Vec<UserId> = self.purges_wanted.keys().copied().collect();
            for user in wanted {
                self.purge(user);
            }
        }
        // Overdue `Hello`s close their connections, as the edge's timer does.
        for shard in 0..self.shards.len() {
            let now = self.edge_now();
            if self.shards[shard]
                .next_deadline_ms()
                .is_some_and(|at| at <= now)
            {
                self.shards[shard].handle_deadlines(now);
                self.apply_effects(shard);
            }
        }
        if self.power_cut_at.is_some_and(|at| at <= self.now) {
            self.power_cut_at = None;
            self.stats.power_cuts_after_answers += 1;
            self.crash_with(true);
        }
        // A poisoned store is reopened in place after a pause, as the edge does; the other
        // shards' stores carry on. A batch in flight syncs on the store that wrote it (the
        // edge's sync holds that instance): here it fails (the fault wrapper refuses every
        // sync once poisoned; the edge's log store succeeds for a commit durable already, so
        // this is the stricter case).
        for shard in 0..self.stores.len() {
            if self.store_reopen_at[shard].is_none_or(|at| at > self.now) {
                continue;
            }
            self.store_reopen_at[shard] = None;
            for in_flight in &mut self.commits_in_flight[shard] {
                if let Some(version) = in_flight.sync.take()
                    && in_flight.result.is_ok()
                    && let Err(error) = self.stores[shard].sync_through(version)
                {
                    in_flight.result = Err(error);
                    self.committers[shard].forget_cached();
                }
            }
            self.stores[shard].reopen();
            self.stores[shard].inner_mut().restart();
        }
        // Batches answered with an unknown result land when their time comes, after later
        // commits; not while the writer stalls for a power cut (a landing is a commit).
        for shard in 0..self.late_landings.len() {
            while self.power_cut_at.is_none() {
                let now_sim = self.now;
                let Some(next) = self.late_landings[shard]
                    .iter()
                    .position(|landing| landing.land_at <= now_sim)
                else {
                    break;
                };
                let LateLanding {
                    taken_ms: now,
                    sends,
                    ..
                } = self.late_landings[shard].remove(next);
                // FoundationDB refuses a commit whose read version is over 5 s old; the
                // edge's clock jumps at a restart after the wall clock stepped.
                let edge_now = self.edge_now();
                if edge_now < now || edge_now > now + 5_000 {
                    continue;
                }
                self.drop_conflicting_landings(shard, &sends);
                match self.committers[shard].commit_batch(&self.stores[shard], &sends, now) {
                    Ok(outcomes) => {
                        self.stats.late_landings += 1;
                        self.record_stored(shard, &sends, &outcomes, now);
                    }
                    // It never lands (or lands unknown, as any commit may).
                    Err(error) => self.store_refused(shard, &error),
                }
            }
        }
        // Shards commit: up to `batches_in_flight_max` batches per shard (decision 0027). A
        // batch is written when it is taken (on the log store unsynced: the next batch reads
        // it, readers do not); its result comes back, after its sync, now or some steps later
        // (a slow commit, or one whose fsync is still running when the next batch goes),
        // always in the order taken, while new requests queue (and the slow-store breaker may
        // refuse them).
        for shard in 0..self.shards.len() {
            while self.commits_in_flight[shard]
                .front()
                .is_some_and(|in_flight| in_flight.due <= self.now)
            {
                let in_flight = self.commits_in_flight[shard]
                    .pop_front()
                    .expect("in flight");
                self.finish_in_flight(shard, in_flight);
            }
            if self.power_cut_at.is_some() {
                // The writer stalls until the power cut.
                continue;
            }
            let now = self.edge_now();
            if let Some(batch) = self.shards[shard].poll_batch(now) {
                if !self.commits_in_flight[shard].is_empty() {
                    self.stats.batches_behind_another += 1;
                }
                // Now and then a batch's result is unknown and its sends are written later,
                // after later commits (`late_landings`).
                let lands_late = chaos
                    && self.late_landing_per_thousand > 0
                    && self.rng.below(1000) < self.late_landing_per_thousand;
                // As the edge does: unsynced when more waits (the next batch goes at once).
                let written = if lands_late {
                    let sends: Vec<commit::Request> = batch
                        .requests
                        .iter()
                        .filter(|request| matches!(request, commit::Request::Send(_)))
                        .cloned()
                        .collect();
                    if !sends.is_empty() {
                        let land_at =
                            self.now + 1 + self.rng.below(UNKNOWN_RESULT_LANDS_WITHIN_MS - 1_000);
                        self.late_landings[shard].push(LateLanding {
                            land_at,
                            taken_ms: now,
                            sends,
                        });
                    }
                    Err(StoreError::CommitUnknown)
                } else if batch.more_waiting {
                    self.committers[shard].commit_batch_unsynced(
                        &self.stores[shard],
                        &batch.requests,
                        now,
                    )
                } else {
                    self.committers[shard]
                        .commit_batch(&self.stores[shard], &batch.requests, now)
                        .map(|outcomes| (outcomes, None))
                };
                if !lands_late {
                    self.drop_conflicting_landings(shard, &batch.requests);
                }
                let (result, sync) = match written {
                    Ok((outcomes, sync)) => (Ok(outcomes), sync),
                    Err(error) => (Err(error), None),
                };
                self.stats.commits_unsynced += u64::from(sync.is_some());
                if let Ok(outcomes) = &result {
                    self.record_stored(shard, &batch.requests, outcomes, now);
                    self.record_written_purges(&batch.requests, outcomes);
                }
                let due = if self.rng.below(1000) < self.slow_commit_per_thousand {
                    self.stats.slow_commits += 1;
                    self.now + 1 + self.rng.below(3 * self.config.commit_slow_ms)
                } else if sync.is_some()
                    || (self.config.batches_in_flight_max > 1 && self.rng.chance(1, 3))
                {
                    // An unsynced commit's fsync takes a while: the next batch goes meanwhile,
                    // and a crash then may cut the power on it.
                    self.now + 1 + self.rng.below(2)
                } else {
                    self.now
                };
                // Behind the batches taken before it.
                let due = self.commits_in_flight[shard]
                    .back()
                    .map_or(due, |before| due.max(before.due));
                let in_flight = InFlight {
                    due,
                    batch,
                    result,
                    sync,
                };
                if due <= self.now && self.commits_in_flight[shard].is_empty() {
                    self.finish_in_flight(shard, in_flight);
                } else {
                    self.commits_in_flight[shard].push_back(in_flight);
                }
            }
        }
        // The store's background thread (checkpoints, spare segments, dedupe moves) runs at
        // points the seed chooses: between commits, or with one in flight and unsynced.
        for store in &self.stores {
            if self.rng.chance(1, 2) {
                store.inner().run_background_work();
            }
        }
        if chaos {
            if self.rng.chance(1, 300) {
                // The wall clock steps: back by up to three days (a VM restored from a
                // snapshot) or forward by up to six hours. The edge sees it at its next start.
                let step = if self.rng.chance(2, 3) {
                    -((self.rng.below(3 * 24 * 3600 * 1000)) as i64)
                } else {
                    self.rng.below(6 * 3600 * 1000) as i64
                };
                self.wall_offset_ms += step;
                self.stats.clock_steps += 1;
            }
            if self.rng.below(1000) < self.crash_per_thousand {
                self.crash();
            }
            if self.rng.below(1000) < self.purge_per_thousand {
                let user = self.clients[self.rng.below(self.clients.len() as u64) as usize].user;
                self.purge(user);
            }
            for client in 0..self.clients.len() {
                if self.rng.below(1000) < self.syncs_per_thousand {
                    self.make_sync(client);
                }
                if self.rng.below(1000) < self.disconnect_per_thousand {
                    self.drop_connection(client);
                }
                if self.rng.below(1000) < self.restart_per_thousand {
                    self.restart_app(client);
                }
            }
        }
        for shard in 0..self.stores.len() {
            if !self.rng.chance(1, 50) || self.power_cut_at.is_some() {
                continue;
            }
            // Expiry runs alongside, each shard's on its own store, as on the edge's
            // maintenance lanes; a store that refuses it is handled as the edge handles it.
            match commit::expire(&self.stores[shard], self.edge_now(), &self.config) {
                Ok(report) => {
                    self.stats.expired += report.messages_deleted;
                    self.hand_emptied(&report.emptied);
                    // As the edge's expiry turn: a device sweep behind its round catches up.
                    let mut behind = report.devices_behind;
                    while behind {
                        self.stats.device_sweep_extra_passes += 1;
                        match commit::sweep_devices(
                            &self.stores[shard],
                            self.edge_now(),
                            &self.config,
                        ) {
                            Ok(still) => behind = still,
                            Err(error) => {
                                self.store_refused(shard, &error);
                                break;
                            }
                        }
                    }
                }
                Err(error) => self.store_refused(shard, &error),
            }
        }
    }

    /// A power cut lost an unsynced commit: the seqs it gave were never stored (nobody was
    /// told of them), and a later commit may give them again.
    fn forget_lost_seqs(&mut self, lost_keys: &[Vec<u8>]) {
        for key in lost_keys {
            let Some((inbox, seq)) = keys::parse_message(key) else {
                continue;
            };
            self.assigned.remove(&(inbox, seq));
            self.stored_at.remove(&(inbox, seq));
            if self.last_assigned.get(&inbox) == Some(&seq) {
                let last = self
                    .assigned
                    .keys()
                    .filter(|(assigned_to, _)| *assigned_to == inbox)
                    .map(|(_, seq)| *seq)
                    .max()
                    .unwrap_or(0);
                self.last_assigned.insert(inbox, last);
            }
        }
    }

    /// The last seq an inbox used: its counter or, once it is forgotten (the floor is above
    /// it and may come from another inbox), the highest seq a commit gave it.
    fn head(&self, inbox: UserId) -> u64 {
        // Read past the fault injection: this is the checker looking, not the edge.
        let store = self.stores[self.home_shard(inbox)].inner();
        if commit::has_counter(store, inbox).expect("read the counter") {
            commit::last_seq(store, inbox).expect("read the counter")
        } else {
            self.last_assigned.get(&inbox).copied().unwrap_or(0)
        }
    }

    /// The shard an inbox is homed on, whose store holds it.
    fn home_shard(&self, inbox: UserId) -> usize {
        courier_core::placement::home_shard(inbox, self.stores.len() as u32) as usize
    }

    /// Inboxes an expiry pass emptied go to their home shards to be forgotten, as on the edge.
    fn hand_emptied(&mut self, emptied: &[UserId]) {
        self.stats.inboxes_emptied += emptied.len() as u64;
        let now = self.edge_now();
        for inbox in emptied {
            let home = self.home_shard(*inbox);
            self.shards[home].handle_emptied(&[*inbox], now);
        }
    }

    /// A batch in flight is synced (the log store's fsync) and its result reaches its shard.
    /// A failed sync fails the batch, and its committer forgets what it cached (as the edge's
    /// does): the batch's seqs may not be in the store.
    fn finish_in_flight(&mut self, shard: usize, in_flight: InFlight) {
        let InFlight {
            batch,
            result,
            sync,
            ..
        } = in_flight;
        let synced = sync.is_some();
        let result = match (result, sync) {
            (Ok(outcomes), Some(version)) => match self.stores[shard].sync_through(version) {
                Ok(()) => Ok(outcomes),
                Err(error) => {
                    self.committers[shard].forget_cached();
                    Err(error)
                }
            },
            (result, _) => result,
        };
        let answered = result.is_ok();
        self.finish_commit(shard, batch, result);
        // Now and then the power fails once an unsynced batch's answers have reached the
        // clients (the network's longest way is 30 ms), with no commit in between (the writer
        // stalls): a batch answered before its fsync would be lost with its acknowledgements.
        if synced && answered && self.power_cut_at.is_none() && self.rng.chance(1, 30) {
            self.power_cut_at = Some(self.now + 30 + self.rng.below(20));
        }
    }

    /// A commit of `requests` changed what the late landings waiting on `shard` read for
    /// their inboxes (counters, dedupe records, messages): on FoundationDB those conflict and
    /// never land.
    fn drop_conflicting_landings(&mut self, shard: usize, requests: &[commit::Request]) {
        if self.late_landings[shard].is_empty() {
            return;
        }
        let touched: std::collections::HashSet<UserId> = requests.iter().map(inbox_of).collect();
        self.late_landings[shard].retain(|landing| {
            !landing
                .sends
                .iter()
                .any(|send| touched.contains(&inbox_of(send)))
        });
    }

    /// The checker's record of what a commit stored: the seqs it gave and when they expire.
    fn record_stored(
        &mut self,
        shard: usize,
        requests: &[commit::Request],
        outcomes: &[commit::Outcome],
        now: UnixMillis,
    ) {
        for (request, outcome) in requests.iter().zip(outcomes) {
            if let (commit::Request::Send(send), commit::Outcome::Stored { seq, fresh, .. }) =
                (request, outcome)
            {
                // What the TTL promises: not expired before its time from the
                // commit. A retry answered from its dedupe record keeps the
                // first's, which the checker may not have seen (its answer was an
                // unknown result): then the stored message says, and if it is
                // gone already, 0 (any time).
                let expire_at = send.ttl_secs.map(|ttl| {
                    if *fresh {
                        return now + (u64::from(ttl) * 1000).min(self.config.retention_ms);
                    }
                    let key = keys::message(send.to, *seq);
                    dump_prefix(self.stores[shard].inner(), &key)
                        .first()
                        .and_then(|(_, value)| courier_core::envelope::expire_at_ms(value))
                        .unwrap_or(0)
                });
                if *fresh {
                    self.assigned.insert((send.to, *seq), expire_at);
                } else {
                    self.assigned.entry((send.to, *seq)).or_insert(expire_at);
                }
                self.stored_at.entry((send.to, *seq)).or_insert(self.now);
                let last = self.last_assigned.entry(send.to).or_insert(0);
                if *seq > *last + 1 {
                    // A forgotten inbox continued from the floor.
                    self.stats.seqs_from_floor += 1;
                }
                *last = (*last).max(*seq);
            }
        }
        self.stats.duplicate_sends += outcomes
            .iter()
            .filter(|o| matches!(o, commit::Outcome::Stored { fresh: false, .. }))
            .count() as u64;
    }

    /// A commit's result reaches its shard.
    fn finish_commit(
        &mut self,
        shard: usize,
        batch: courier_core::shard::Batch<ConnRef>,
        result: Result<Vec<commit::Outcome>, StoreError>,
    ) {
        let failed = result.as_ref().err().cloned();
        if let Ok(outcomes) = &result {
            self.record_answered(&batch.requests, outcomes);
        }
        let now = self.edge_now();
        self.shards[shard].handle_commit(now, batch, result);
        self.apply_effects(shard);
        if let Some(error) = failed {
            self.store_refused(shard, &error);
        }
    }

    /// A purge written may erase whether or not its answer comes: its batch's sync may fail
    /// after it (the store keeps it, or not), or a crash may come first. The operator, told
    /// nothing, runs it again, and a later run erases what was acknowledged since the first
    /// (as `ctl purge` says: "it stays queued and will run"). So the checkers count it from
    /// when it is written, as one first asked for then unless an earlier request still waits
    /// for its answer; its answer, if it comes, records it again (`record_answered`).
    /// (Counted from its answer only, a purge whose batch's sync failed erased messages
    /// acknowledged after the answered one, which the checker called lost: seed 406263.)
    fn record_written_purges(
        &mut self,
        requests: &[commit::Request],
        outcomes: &[commit::Outcome],
    ) {
        for (request, outcome) in requests.iter().zip(outcomes) {
            if let (commit::Request::Purge { inbox }, commit::Outcome::Purged { last_seq }) =
                (request, outcome)
            {
                let asked_at = self.purges_wanted.get(inbox).copied().unwrap_or(self.now);
                self.purges
                    .entry(*inbox)
                    .or_default()
                    .push((asked_at, *last_seq));
            }
        }
    }

    /// What an answered commit tells the checkers about purges. An answered purge erased its
    /// inbox up to `last_seq` (readers see it from now), and every device of the user lost its
    /// record: its next link starts it anew, as a device new to the inbox. Commits are
    /// answered in the order taken, so the links answered after the purge came after it.
    fn record_answered(&mut self, requests: &[commit::Request], outcomes: &[commit::Outcome]) {
        for (request, outcome) in requests.iter().zip(outcomes) {
            match (request, outcome) {
                (commit::Request::Purge { inbox }, commit::Outcome::Purged { last_seq }) => {
                    self.stats.purges += 1;
                    let asked_at = self.purges_wanted.remove(inbox).unwrap_or(self.now);
                    self.purge_slot_marks.insert(*inbox, self.next_slot);
                    self.purges
                        .entry(*inbox)
                        .or_default()
                        .push((asked_at, *last_seq));
                    for c in self.clients.iter_mut().filter(|c| c.user == *inbox) {
                        c.relink_pending = true;
                    }
                }
                (
                    commit::Request::Link { inbox, device, .. },
                    commit::Outcome::Linked {
                        cursor, first_seq, ..
                    },
                ) => {
                    // A device linked before the purge kept its record (reset past what the
                    // purge erased), so it is owed what came since as before. One that never
                    // linked is new to the inbox: without a record it held nothing back, and
                    // what was deleted before it linked (below `first_seq`) is not its to get.
                    let linked_after = (*cursor).max(first_seq.saturating_sub(1));
                    let now = self.now;
                    for c in &mut self.clients {
                        if c.user == *inbox && c.device == *device && c.relink_pending {
                            c.relink_pending = false;
                            if c.linked_after.is_none() {
                                c.linked_after = Some(linked_after);
                                c.relinks.push((now, linked_after));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// An operator erases `user` (`ctl purge`): it is disconnected on every shard, then, once
    /// the shards answered (a few milliseconds, in which its devices may log in again), its
    /// purge is queued on its home shard (`queue_purge`). Until the purge is answered the
    /// operator runs it again after a crash or a full queue.
    fn purge(&mut self, user: UserId) {
        for shard in 0..self.shards.len() {
            self.shards[shard].disconnect_user(user, "purged by an operator");
            self.apply_effects(shard);
        }
        if !self.purges_wanted.contains_key(&user) {
            self.purges_wanted.insert(user, self.now);
            let now = self.now;
            for c in self.clients.iter_mut().filter(|c| c.user == user) {
                c.consumed_at_purges.push((now, c.consumed_up_to));
            }
        }
        let at = self.now + 1 + self.rng.below(30);
        self.purges_to_queue.push((at, user));
    }

    fn queue_purge(&mut self, user: UserId) {
        let home = self.home_shard(user);
        match self.shards[home].handle_purge(user) {
            Ok(()) => {}
            Err(PurgeRefused::QueueFull) => {
                self.purges_rerun_at = Some(self.now + 50 + self.rng.below(500));
            }
            Err(refused) => panic!("a lone edge refused a purge: {refused:?}"),
        }
        self.apply_effects(home);
    }

    /// Whether a purge may have erased `seq` of the device's inbox before the device got it:
    /// one that erased it, asked for while the application had consumed nothing at or past
    /// it (it consumes in order, so anything it consumed past `seq` came after `seq`, or
    /// after a hole over it).
    fn erased_before_delivery(&self, device: &Client, seq: u64) -> bool {
        self.purges.get(&device.user).is_some_and(|purges| {
            purges.iter().any(|(asked_at, last_seq)| {
                seq <= *last_seq
                    && device
                        .consumed_at_purges
                        .iter()
                        .find(|(at, _)| at == asked_at)
                        .is_none_or(|(_, consumed)| *consumed < seq)
            })
        })
    }

    /// The last seq the purges of `user` asked for by simulated time `by` erased (0: none).
    fn purged_up_to(&self, user: UserId, by: u64) -> u64 {
        self.purges.get(&user).map_or(0, |purges| {
            purges
                .iter()
                .filter(|(asked_at, _)| *asked_at <= by)
                .map(|(_, last_seq)| *last_seq)
                .max()
                .unwrap_or(0)
        })
    }

    /// What the edge does when a shard's store refuses: fenced ends the process; poisoned (a
    /// failed write or fsync) is reopened in place after a pause while the shards keep running.
    fn store_refused(&mut self, shard: usize, error: &StoreError) {
        match error {
            StoreError::Fenced => self.crash(),
            StoreError::Poisoned if self.store_reopen_at[shard].is_none() => {
                self.stats.store_reopens += 1;
                self.store_reopen_at[shard] = Some(self.now + 1 + self.rng.below(200));
            }
            _ => {}
        }
    }

    /// A process crash: every shard loses its state and the stores are reopened. Packets to and
    /// from the process are lost; clients see their connections reset and reconnect.
    fn crash(&mut self) {
        // Half the crashes cut the power: on the log store an unsynced commit is lost then,
        // and no acknowledged message may go with it.
        let power_cut = self.rng.chance(1, 2);
        self.crash_with(power_cut);
    }

    fn crash_with(&mut self, power_cut: bool) {
        self.stats.crashes += 1;
        // A power cut waiting for answers that died with this crash is moot.
        self.power_cut_at = None;
        // Purges queued in the dead process, or on their way to it, are gone; their operators
        // were told to run them again.
        self.purges_to_queue.clear();
        if !self.purges_wanted.is_empty() {
            self.purges_rerun_at = Some(self.now + 50 + self.rng.below(500));
        }
        self.start_shards();
        self.network.clear();
        self.held.clear();
        self.outbufs.clear();
        self.lane_clock.clear();
        // Commits in flight die with the process: nobody hears of them.
        for in_flight in &mut self.commits_in_flight {
            in_flight.clear();
        }
        // Nor do the dead process's unknown results land later: the restarted edge claims
        // its shards before it serves anyone, and every transaction reads the shard's owner
        // key, so the claim makes each of the old process's commits still on its way
        // conflict (core/src/store/fdb.rs, "Fencing"). A landing after the restart would
        // reach a shard that never heard of its result.
        for landings in &mut self.late_landings {
            self.stats.late_landings_fenced += landings.len() as u64;
            landings.clear();
        }
        for shard in 0..self.stores.len() {
            self.store_reopen_at[shard] = None;
            self.stores[shard].reopen();
            if power_cut {
                if let Some(lost) = self.stores[shard].inner_mut().cut_power() {
                    self.stats.unsynced_lost += 1;
                    self.forget_lost_seqs(&lost);
                }
            } else {
                self.stores[shard].inner_mut().restart();
            }
        }
        for client in 0..self.clients.len() {
            if self.clients[client].conn.take().is_some() {
                let now = self.now;
                let c = &mut self.clients[client];
                c.session.disconnected(now);
                c.reconnect_at = now + c.session.reconnect_delay_ms(self.rng.next_u64());
            }
        }
    }

    /// The app process restarts: buffered deliveries and unsent acks are gone, pending sends
    /// are lost to the app (it would resend from its own outbox; here it resends under the
    /// same ids, unless it kept none), and the new session starts from the persisted consumed
    /// cursor.
    fn restart_app(&mut self, client: usize) {
        self.stats.app_restarts += 1;
        self.drop_connection(client);
        // Now and then the app keeps no outbox (an agent that crashed): its unanswered sends
        // are never made again, though a commit whose result was unknown may have stored
        // them, and nobody else will deliver them.
        if self.rng.chance(1, 4) && !self.clients[client].outbox.is_empty() {
            let lost = std::mem::take(&mut self.clients[client].outbox);
            self.sends_lost
                .extend(lost.into_values().map(|(_, body, _)| body));
            self.stats.outboxes_lost += 1;
        }
        let (in_flight_max, window_ms) =
            (self.client_in_flight_max, self.client_send_retry_window_ms);
        let c = &mut self.clients[client];
        let mut session =
            new_client_session(c.user, c.device, in_flight_max, window_ms, c.consumed_up_to);
        for (client_id, (to, body, ttl)) in &c.outbox {
            session
                .send(*client_id, *to, body.clone(), *ttl)
                .expect("resend under the same id");
        }
        c.session = session;
        c.unconsumed.clear();
    }

    fn connect(&mut self, client: usize) {
        let shard = self.rng.below(self.shards.len() as u64) as u8;
        let conn = ConnRef {
            shard,
            slot: self.next_slot,
            generation: 1,
        };
        self.next_slot += 1;
        self.slot_owner.insert(conn.slot, client);
        let now = self.edge_now();
        self.shards[shard as usize].open_connection(now, conn);
        let now = self.now;
        let c = &mut self.clients[client];
        c.conn = Some(conn);
        c.session.connected(now);
    }

    fn receive(&mut self, packet: Packet) {
        match packet {
            Packet::ToEdge { conn, frame } => {
                if let Some(client) = self.traced(conn.slot) {
                    eprintln!(
                        "t={} c{client} -> edge {conn:?}: {}",
                        self.now,
                        frame_summary(&frame)
                    );
                }
                let key = (conn.shard, conn.slot, conn.generation);
                if self.shards[conn.shard as usize].input_paused(conn)
                    || self.held.contains_key(&key)
                    || self.outbuf_full(conn)
                {
                    // Over its send budget, or its answers not taken: the edge reads nothing
                    // more from the connection until it resumes; its frames wait, in order,
                    // as in QUIC's buffers.
                    self.held.entry(key).or_default().push_back(frame);
                    return;
                }
                let now = self.edge_now();
                self.shards[conn.shard as usize].handle_frame(now, conn, frame, false);
                self.apply_effects(conn.shard as usize);
            }
            Packet::ToClient {
                client,
                conn,
                frame,
            } => {
                if self.traced(conn.slot).is_some() {
                    eprintln!(
                        "t={} edge -> c{client} {conn:?}: {}",
                        self.now,
                        frame_summary(&frame)
                    );
                }
                if self.clients[client].conn != Some(conn) {
                    return; // The connection is gone.
                }
                let now = self.now;
                if let Err(error) = self.clients[client].session.handle_frame(now, frame) {
                    panic!("client {client}: the edge broke the protocol: {error}");
                }
            }
            Packet::Closed { client, conn, code } => {
                if self.clients[client].conn == Some(conn) {
                    // An operator's purge disconnects the user, and closes its connections when
                    // it commits: its app logs in again.
                    let user = self.clients[client].user;
                    let purged = self.purges_wanted.contains_key(&user)
                        || self
                            .purge_slot_marks
                            .get(&user)
                            .is_some_and(|mark| conn.slot < *mark);
                    assert!(
                        !courier_protocol::client::is_fatal_code(code)
                            || (code == ErrorCode::Disconnected && purged),
                        "client {client}: its live connection was closed with {code:?}"
                    );
                    self.drop_connection(client);
                }
            }
            Packet::Mesh { shard, message } => {
                if let Ok(user) = std::env::var("SIM_TRACE_USER") {
                    let text = format!("{message:?}");
                    if text.contains(&user) {
                        let text: String = text.chars().take(200).collect();
                        eprintln!("t={} mesh -> shard {shard}: {text}", self.now);
                    }
                }
                let now = self.edge_now();
                self.shards[shard as usize].handle_message(now, message);
                self.apply_effects(shard as usize);
            }
            Packet::ReadDone {
                shard,
                conn,
                after_seq,
                result,
            } => {
                self.shards[shard as usize].handle_read(conn, after_seq, result);
                self.apply_effects(shard as usize);
            }
            Packet::IdleTimeout { conn } => {
                self.outbufs.remove(&outbuf_key(conn));
                self.shards[conn.shard as usize].connection_lost(conn);
                self.apply_effects(conn.shard as usize);
            }
        }
    }

    /// Carries out a shard's effects, as `edge/src/shard.rs` does.
    fn apply_effects(&mut self, shard: usize) {
        while let Some(effect) = self.shards[shard].poll_effect() {
            match effect {
                Effect::Write { conn, frame, .. } => {
                    if self.transport_takes_per_thousand >= 1000 {
                        // The transport takes the bytes at once.
                        self.send_to_client(conn, frame);
                        self.shards[shard].set_outbound_bytes(conn, 0);
                        continue;
                    }
                    // Into the driver's outbuf, for QUIC to take later (`take_outbufs`).
                    let bytes = courier_protocol::encode_to_vec(&frame)
                        .expect("the edge writes valid frames")
                        .len();
                    let outbuf = self.outbufs.entry(outbuf_key(conn)).or_default();
                    outbuf.push_back((frame, bytes));
                    let buffered = outbuf.iter().map(|(_, bytes)| bytes).sum();
                    self.shards[shard].set_outbound_bytes(conn, buffered);
                }
                Effect::Close { conn, code, .. } => {
                    let client = self.slot_owner[&conn.slot];
                    // QUIC's close discards what the stream had not sent.
                    self.outbufs.remove(&outbuf_key(conn));
                    self.schedule(Packet::Closed { client, conn, code }, 1);
                    self.shards[shard].connection_lost(conn);
                }
                Effect::Route { shard: to, message } => {
                    let latency = self.rng.below(3);
                    if self.rng.below(1000) < self.congestion_per_thousand {
                        // The lane to `to` is congested: what the edge does then.
                        self.stats.mesh_degraded += 1;
                        match message.on_overload() {
                            Overload::Drop => continue,
                            Overload::Refuse => {
                                if let ShardMessage::Send { send, reply } = message {
                                    self.stats.overloaded += 1;
                                    let now = self.edge_now();
                                    self.shards[shard].handle_message(
                                        now,
                                        ShardMessage::SendResult {
                                            reply,
                                            client_id: send.client_id,
                                            body_bytes: send.body.len(),
                                            result: Err(ErrorCode::Overloaded),
                                        },
                                    );
                                }
                                continue;
                            }
                            Overload::CatchUp => {
                                let degraded = message.degrade();
                                self.schedule(
                                    Packet::Mesh {
                                        shard: to,
                                        message: degraded,
                                    },
                                    latency,
                                );
                                continue;
                            }
                            Overload::Keep => {}
                        }
                    }
                    self.schedule(Packet::Mesh { shard: to, message }, latency);
                }
                // The step loop feeds held frames once input is no longer paused.
                Effect::ResumeInput { .. } => {}
                // One edge: cluster_simulation.rs covers redirects and links.
                Effect::Redirect { .. } | Effect::LinkWrite { .. } | Effect::LinkReply { .. } => {
                    panic!("an edge without a cluster redirected or used a link")
                }
                Effect::Read {
                    conn,
                    inbox,
                    after_seq,
                } => {
                    // From the inbox's home shard's store, which may be another shard's.
                    let home = self.home_shard(inbox);
                    let result = commit::read_inbox(
                        &self.stores[home],
                        inbox,
                        after_seq,
                        self.edge_now(),
                        &self.config,
                    );
                    // As the edge: another shard's store failing is that shard's to recover
                    // (its own commits and expiry see it), not a reason to reopen this one's.
                    if let Err(error) = &result
                        && home == shard
                    {
                        let fenced = *error == StoreError::Fenced;
                        self.store_refused(shard, error);
                        if fenced {
                            return; // The process ended.
                        }
                    }
                    let latency = 1 + self.rng.below(10);
                    self.schedule(
                        Packet::ReadDone {
                            shard: shard as u8,
                            conn,
                            after_seq,
                            result,
                        },
                        latency,
                    );
                }
            }
        }
    }

    fn client_tick(&mut self, client: usize) {
        let now = self.now;
        if self.clients[client].conn.is_none() {
            if now >= self.clients[client].reconnect_at {
                self.connect(client);
            } else {
                return;
            }
        }
        let mut recipients: Vec<UserId> = self.clients.iter().map(|c| c.user).collect();
        recipients.dedup();
        let consume_chance = self.clients[client].consume_per_thousand;
        let large_bodies_per_thousand = self.large_bodies_per_thousand;
        let c = &mut self.clients[client];
        // The application sends what it planned, a few at a time.
        while c.session.pending_sends() < 16 {
            let Some((client_id, recipient, ttl)) = c.planned.pop_front() else {
                break;
            };
            // The body names the message so checkers can find it.
            let body = body_of(c.user, client_id, large_bodies_per_thousand);
            let to = recipients[recipient];
            self.sends_to.insert((c.user, client_id), to);
            c.outbox.insert(client_id, (to, body.clone(), ttl));
            c.session
                .send(client_id, to, body, ttl)
                .expect("send queued");
        }
        c.session.handle_timeout(now);
        // The application consumes some of what it holds (in order) and the SDK acks it.
        while !c.unconsumed.is_empty() && self.rng.below(1000) < consume_chance {
            let (seq, from, body) = c.unconsumed.pop_front().expect("not empty");
            c.received.push((seq, from, body));
            c.consumed_up_to = seq;
            c.session.consumed(now, seq);
        }
        let edge_now = self.edge_now();
        let c = &mut self.clients[client];
        while let Some(event) = c.session.poll_event() {
            match event {
                ClientEvent::Welcome {
                    user, acked_up_to, ..
                } => {
                    assert_eq!(user, c.user);
                    if c.linked_after.is_none() {
                        c.linked_after = Some(acked_up_to);
                    }
                }
                ClientEvent::Message(delivery) => {
                    if let Some((after, up_to, ..)) = c
                        .holes
                        .iter()
                        .find(|(after, up_to, ..)| *after < delivery.seq && delivery.seq <= *up_to)
                    {
                        c.delivered_after_hole
                            .push((delivery.seq, (*after, *up_to)));
                    }
                    c.sent_at_ms.insert(delivery.seq, delivery.sent_at_ms);
                    c.delivered_at.entry(delivery.seq).or_insert(now);
                    c.unconsumed
                        .push_back((delivery.seq, delivery.from, delivery.body));
                }
                ClientEvent::Hole {
                    after_seq,
                    up_to_seq,
                } => {
                    // The hole a new device's link leaves (its start) is not a deletion.
                    if c.received.is_empty()
                        && c.unconsumed.is_empty()
                        && after_seq == 0
                        && Some(up_to_seq) == c.linked_after
                    {
                        continue;
                    }
                    self.stats.holes += 1;
                    c.holes.push((after_seq, up_to_seq, edge_now, now));
                }
                ClientEvent::Signal { .. } => {}
                ClientEvent::SendDone { client_id, result } => match result {
                    Ok(receipt) => {
                        let (to, _, ttl_secs) = c
                            .outbox
                            .remove(&client_id)
                            .expect("a receipt for a send made");
                        let earlier = c.acked.insert(
                            client_id,
                            Receipt {
                                seq: receipt.seq,
                                to,
                                ttl_secs,
                                server_time_ms: receipt.server_time_ms,
                            },
                        );
                        if let Some(earlier) = earlier {
                            assert_eq!(
                                earlier.seq, receipt.seq,
                                "client {client} id {client_id}: two different seqs acked"
                            );
                        }
                    }
                    // Unanswered past the SDK's retry window: stored or not, no one can say
                    // (the app is told `Unconfirmed`), and the SDK never writes it again.
                    Err(ErrorCode::TimedOut) => {
                        let (_, body, _) = c
                            .outbox
                            .remove(&client_id)
                            .expect("an unconfirmed send was made");
                        self.sends_lost.insert(body);
                        c.unconfirmed.insert(client_id);
                        self.stats.sends_unconfirmed += 1;
                    }
                    Err(code) => panic!("client {client}: send {client_id} refused: {code:?}"),
                },
            }
        }
        let Some(conn) = self.clients[client].conn else {
            return;
        };
        let mut frames = Vec::new();
        self.clients[client].session.set_wall_clock(now);
        while let Some(frame) = self.clients[client].session.poll_transmit() {
            if matches!(frame, Frame::Sync { .. }) {
                self.stats.syncs += 1;
            }
            if let Frame::Send { client_id, .. } = &frame {
                assert!(
                    !self.clients[client].unconfirmed.contains(client_id),
                    "client {client}: send {client_id} written again after the SDK gave it up"
                );
            }
            frames.push(frame);
        }
        for frame in frames {
            if self.clients[client].conn != Some(conn) {
                break;
            }
            self.client_frame(client, conn, frame);
        }
    }
}

impl<S: SimStore> World<S> {
    /// Done when every send is answered, every device consumed its inbox up to the head and
    /// its ack is committed, and nothing is in flight.
    fn converged(&mut self) -> bool {
        if !self.network.is_empty()
            || !self.held.is_empty()
            || !self.outbufs.is_empty()
            || self.store_reopen_at.iter().any(Option::is_some)
            || !self.purges_wanted.is_empty()
            || self.late_landings.iter().any(|landings| !landings.is_empty())
            // Poisoned by a write whose error was another one (an fsync failure reported as
            // an unknown result): the next store call notices, as on the edge.
            || self.stores.iter().any(FaultStore::is_poisoned)
            || self
                .shards
                .iter()
                .any(|s| s.queued_requests() > 0 || s.batch_in_flight())
        {
            return false;
        }
        for c in &self.clients {
            if c.conn.is_none()
                || !c.planned.is_empty()
                || !c.outbox.is_empty()
                || !c.unconsumed.is_empty()
                || !c.session.ack_flushed()
            {
                return false;
            }
            // Read past the fault injection: this is the checker looking, not the edge.
            let head = self.head(c.user);
            if c.session.received_up_to() < head {
                return false;
            }
        }
        true
    }

    /// The checkers. Runs after convergence.
    fn check(mut self) -> Result<Stats, String> {
        // The edge declares a hole before it delivers past it, so the SDK never saw a gap.
        if self.stats.syncs > 0 {
            return Err(format!(
                "the SDK asked {} times for a gap the edge did not declare",
                self.stats.syncs
            ));
        }
        // A purge erases its user's device records, so no connection stays linked across it:
        // every device logged in again since, and its link started it anew.
        if let Some(c) = self.clients.iter().find(|c| c.relink_pending) {
            return Err(format!(
                "device {}/{} stayed connected across a purge of its user without linking again",
                c.user, c.device
            ));
        }
        // Per device: deliveries in inbox order, from their claimed sender, each once.
        let mut delivered: Vec<HashMap<Vec<u8>, u64>> = Vec::new();
        for c in &self.clients {
            let mut previous = 0;
            let mut previous_sent_at = 0;
            let mut bodies = HashMap::new();
            for (seq, from, body) in &c.received {
                if *seq <= previous {
                    return Err(format!(
                        "device {}/{} out of order: {seq} after {previous}",
                        c.user, c.device
                    ));
                }
                // An inbox's seqs follow its commits' time (the clock never runs back, across
                // restarts too), which expiry's scan of an inbox relies on to stop early.
                let sent_at = c.sent_at_ms.get(seq).copied().unwrap_or(0);
                if sent_at < previous_sent_at {
                    return Err(format!(
                        "device {}/{}: message {seq} sent at {sent_at}, before {previous} \
                         (sent at {previous_sent_at})",
                        c.user, c.device
                    ));
                }
                previous_sent_at = sent_at;
                previous = *seq;
                let sender_prefix = format!("{from}:");
                if !body.starts_with(sender_prefix.as_bytes()) {
                    return Err(format!("message from {from} carries another sender's body"));
                }
                if let Some(earlier) = bodies.insert(body.clone(), *seq) {
                    let at = |seq: u64| c.sent_at_ms.get(&seq).copied().unwrap_or(0);
                    // A purge asked for before the second copy was stored erased the first
                    // and its dedupe record: the retry is a new message to the purged inbox.
                    // (A copy stored by a commit whose result was unknown was never seen
                    // stored: it was stored before it was delivered.)
                    let stored_at = self
                        .stored_at
                        .get(&(c.user, *seq))
                        .or_else(|| c.delivered_at.get(seq))
                        .copied()
                        .unwrap_or(0);
                    let purged_between = self.purges.get(&c.user).is_some_and(|purges| {
                        purges.iter().any(|(asked_at, last_seq)| {
                            *asked_at <= stored_at && earlier <= *last_seq
                        })
                    });
                    if purged_between {
                        self.stats.stored_again_after_purge += 1;
                        continue;
                    }
                    // A client id is unique within the dedupe window (docs/protocol.md): a
                    // retry that reaches the server more than a window after the first attempt
                    // was stored may be stored again. The simulated wall clock steps forward by
                    // hours within seconds of the client's time, so this happens here.
                    if at(*seq).saturating_sub(at(earlier)) >= self.config.dedupe_window_ms {
                        self.stats.stored_again_past_dedupe_window += 1;
                        continue;
                    }
                    return Err(format!(
                        "message {} stored or delivered twice (seqs {earlier} at {} and {seq} at {}) to device {}/{} (purges {:?})",
                        String::from_utf8_lossy(&body[..body.len().min(40)]),
                        at(earlier),
                        at(*seq),
                        c.user,
                        c.device,
                        self.purges.get(&c.user)
                    ));
                }
            }
            delivered.push(bodies);
        }
        let in_hole = |c: &Client, seq: u64| {
            c.holes
                .iter()
                .any(|(after, up_to, ..)| *after < seq && seq <= *up_to)
        };
        // Every acknowledged message reached every device of its recipient at its seq (those
        // linked before it was stored), or expired into a hole declared to that device, or a
        // purge erased it.
        let mut acked_total = 0;
        let mut expected_per_device: Vec<std::collections::HashSet<Vec<u8>>> =
            vec![Default::default(); self.clients.len()];
        let mut by_inbox_seq: HashMap<(UserId, u64), Option<u32>> = HashMap::new();
        for sender in &self.clients {
            for (client_id, receipt) in &sender.acked {
                acked_total += 1;
                by_inbox_seq.insert((receipt.to, receipt.seq), receipt.ttl_secs);
                let body = body_of(sender.user, *client_id, self.large_bodies_per_thousand);
                let erased_up_to = self.purged_up_to(receipt.to, u64::MAX);
                for (index, device) in self.clients.iter().enumerate() {
                    if device.user != receipt.to
                        || device
                            .linked_after
                            .is_some_and(|after| after >= receipt.seq)
                    {
                        continue;
                    }
                    let got = delivered[index].get(&body).copied();
                    if got == Some(receipt.seq) {
                        expected_per_device[index].insert(body.clone());
                        continue;
                    }
                    // A copy stored more than a dedupe window (by the edge's clock) before the
                    // acknowledged one is another message (docs/protocol.md): the retry was
                    // stored again, and the acknowledged copy must have come, or expired, by
                    // itself. The device's map holds its latest copy only.
                    let stored_again = got.is_some_and(|seq| {
                        seq < receipt.seq
                            && device.sent_at_ms.get(&seq).is_some_and(|sent_at| {
                                receipt.server_time_ms.saturating_sub(*sent_at)
                                    >= self.config.dedupe_window_ms
                            })
                    });
                    // A copy a purge erased (with its dedupe record) may have reached the
                    // device before the retry that was acknowledged.
                    if stored_again {
                        self.stats.stored_again_past_dedupe_window += 1;
                        expected_per_device[index].insert(body.clone());
                    }
                    if let Some(seq) = got.filter(|seq| *seq > erased_up_to && !stored_again) {
                        return Err(format!(
                            "message {}:{client_id} acked as {}#{} but delivered to device {} as {seq}",
                            sender.user, receipt.to, receipt.seq, device.device
                        ));
                    }
                    let expired = receipt.ttl_secs.is_some() && in_hole(device, receipt.seq);
                    if !expired && !self.erased_before_delivery(device, receipt.seq) {
                        return Err(format!(
                            "acknowledged message {}:{client_id} ({}#{}) was lost for device {}",
                            sender.user, receipt.to, receipt.seq, device.device
                        ));
                    }
                }
            }
        }
        for (index, c) in self.clients.iter().enumerate() {
            // Every message a device got was acknowledged to its sender at that seq, apart from
            // sends their apps lost (which may have been stored all the same) and copies a
            // purge erased (their sender may have been answered for a later copy).
            let purged_up_to = self.purged_up_to(c.user, u64::MAX);
            for (body, seq) in &delivered[index] {
                let sent_here = body_id(body)
                    .and_then(|id| self.sends_to.get(&id))
                    .is_some_and(|to| *to == c.user);
                let accounted = expected_per_device[index].contains(body)
                    || self.sends_lost.contains(body)
                    || (sent_here && *seq <= purged_up_to);
                if !accounted {
                    return Err(format!(
                        "device {}/{} got message {} as {seq}, which no sender was acked for",
                        c.user,
                        c.device,
                        String::from_utf8_lossy(&body[..body.len().min(40)])
                    ));
                }
            }
        }
        // A hole covers only messages that expired, never a live one, and none before its TTL
        // ran out; or, heard after a purge, what it erased and what came before the device
        // linked again (it joined the inbox anew).
        for c in &self.clients {
            for (after, up_to, heard_at, heard_at_sim) in &c.holes {
                let purged_up_to = self.purged_up_to(c.user, *heard_at_sim);
                // The device's link after the latest purge before the hole.
                let relinked_after = c
                    .relinks
                    .iter()
                    .rev()
                    .find(|(at, _)| at <= heard_at_sim)
                    .map(|(_, cursor)| *cursor);
                for seq in after + 1..=*up_to {
                    if seq <= purged_up_to || relinked_after.is_some_and(|cursor| seq <= cursor) {
                        continue;
                    }
                    if let Some(Some(expire_at)) = self.assigned.get(&(c.user, seq))
                        && expire_at > heard_at
                    {
                        return Err(format!(
                            "device {}/{}: a hole ({after}, {up_to}] heard at {heard_at} covered \
                             message {seq}, which expires at {expire_at}",
                            c.user, c.device
                        ));
                    }
                    match by_inbox_seq.get(&(c.user, seq)) {
                        Some(Some(_ttl)) => {}
                        Some(None) => {
                            return Err(format!(
                                "device {}/{}: a hole ({after}, {up_to}] covered live message {seq} (heard at {heard_at}, purges {:?}, links after them {:?})",
                                c.user,
                                c.device,
                                self.purges.get(&c.user),
                                c.relinks
                            ));
                        }
                        // Below the seq floor of a forgotten inbox: never used in this inbox.
                        None if !self.assigned.contains_key(&(c.user, seq)) => {}
                        // Stored with a TTL, its sender never told (its retries lost or
                        // still going): it may have expired like any other.
                        None if matches!(self.assigned.get(&(c.user, seq)), Some(Some(_))) => {}
                        None => {
                            return Err(format!(
                                "inbox {}: a hole covered seq {seq}, which no sender was acked for",
                                c.user
                            ));
                        }
                    }
                }
            }
        }

        // A device told a seq is gone (a hole) never gets it later: not after an app restart
        // that resumes below the hole, not from a clock that restarted behind the one that
        // declared it.
        for c in &self.clients {
            if let Some((seq, (after, up_to))) = c.delivered_after_hole.first() {
                return Err(format!(
                    "device {}/{}: message {seq} delivered after a hole ({after}, {up_to}] \
                     declared it gone",
                    c.user, c.device
                ));
            }
        }

        // R4: after all acks, no unexpired message is stored, and every store holds only
        // its own shard's inboxes.
        for (shard, store) in self.stores.iter().enumerate() {
            let left = dump_prefix(store.inner(), &[keys::TAG_MESSAGE]);
            for (key, value) in &left {
                let (inbox, seq) = keys::parse_message(key).expect("message key");
                if self.home_shard(inbox) != shard {
                    return Err(format!(
                        "message {inbox}#{seq} in shard {shard}'s store, not its home shard's"
                    ));
                }
                let message =
                    courier_core::envelope::decode(inbox, seq, value).expect("stored envelope");
                if message.expire_at_ms > self.edge_now() {
                    let (start, _) = keys::device_range(inbox);
                    let devices: Vec<String> = dump_prefix(store.inner(), &start)
                        .iter()
                        .map(|(key, value)| format!("{key:?}={value:?}"))
                        .collect();
                    return Err(format!(
                        "message {inbox}#{seq} left in the store after every device acked it \
                         (device records: {devices:?})"
                    ));
                }
            }
        }
        // After the dedupe window (twice, since records live up to two windows) and the
        // retention, expiry leaves no dedupe records, index entries or messages.
        self.now += 2 * self.config.dedupe_window_ms
            + courier_core::commit::DEDUPE_CLEAR_SLACK_MS
            + self.config.retention_ms
            + self.config.expiry_bucket_ms;
        // Every emptied inbox is forgotten by its home shard, so no counter outlives its inbox.
        // Each shard expires its own store; a round is over when every store's is.
        let mut passes = 0;
        loop {
            let mut round_over = true;
            for shard in 0..self.stores.len() {
                let report = commit::expire(&self.stores[shard], self.edge_now(), &self.config)
                    .map_err(|e| e.to_string())?;
                self.hand_emptied(&report.emptied);
                round_over &= report.round_began && !report.more && report.emptied.is_empty();
            }
            passes += 1;
            for shard in 0..self.shards.len() {
                while let Some(in_flight) = self.commits_in_flight[shard].pop_front() {
                    self.finish_in_flight(shard, in_flight);
                }
                let now = self.edge_now();
                while let Some(batch) =
                    self.shards[shard].poll_batch(now + self.config.ack_commit_delay_ms)
                {
                    let result = self.committers[shard].commit_batch(
                        &self.stores[shard],
                        &batch.requests,
                        now,
                    );
                    if let Err(error) = &result {
                        return Err(format!("forgetting emptied inboxes failed: {error}"));
                    }
                    self.shards[shard].handle_commit(now, batch, result);
                }
            }
            // A shard queues a bounded number of forgets; the rest are listed again by the
            // next round's first pass, which also scans the expiry index from its start (an
            // entry written below a round's mark waits for it).
            if round_over {
                break;
            }
            if passes > 10_000 {
                return Err("expiry never finished".into());
            }
        }
        // The inboxes are forgotten and their devices unseen for the retention: expiry's
        // sweep deletes their records, a bounded page a pass (`sweep_forgotten_devices`), with
        // the edge's extra passes while a round is behind.
        for shard in 0..self.stores.len() {
            for _ in 0..100 {
                if dump_prefix(self.stores[shard].inner(), &[keys::TAG_DEVICE]).is_empty() {
                    break;
                }
                let report = commit::expire(&self.stores[shard], self.edge_now(), &self.config)
                    .map_err(|e| e.to_string())?;
                let mut behind = report.devices_behind;
                while behind {
                    behind =
                        commit::sweep_devices(&self.stores[shard], self.edge_now(), &self.config)
                            .map_err(|e| e.to_string())?;
                }
            }
        }
        for tag in [
            keys::TAG_DEDUPE,
            keys::TAG_EXPIRY,
            keys::TAG_MESSAGE,
            keys::TAG_COUNTER,
            keys::TAG_EMPTIED,
            keys::TAG_DEVICE,
        ] {
            for (shard, store) in self.stores.iter().enumerate() {
                let left = dump_prefix(store.inner(), &[tag]);
                if !left.is_empty() {
                    return Err(format!(
                        "{} keys with tag {} left after expiry in shard {shard}'s store",
                        left.len(),
                        tag as char
                    ));
                }
            }
        }
        let load = |counter: &std::sync::atomic::AtomicU64| {
            counter.load(std::sync::atomic::Ordering::Relaxed)
        };
        self.stats.messages_acked = acked_total as u64;
        for store in &self.stores {
            let counts = &store.counts;
            self.stats.conflicts += load(&counts.conflicts);
            self.stats.commit_unknown_applied += load(&counts.commit_unknown_applied);
            self.stats.commit_unknown_dropped += load(&counts.commit_unknown_dropped);
            self.stats.fsync_failures += load(&counts.fsync_failures);
            self.stats.fenced += load(&counts.fenced);
        }
        Ok(self.stats)
    }
}

/// The checkers must notice a lost acknowledged message.
#[test]
fn simulation_detects_a_lost_acknowledged_message() {
    // A world where the server acknowledged a message that no recipient ever received.
    let mut world = World::new(7, |_| MemoryStore::new());
    let to = world.clients[1].user;
    world.clients[0].acked.insert(
        1,
        Receipt {
            seq: 1,
            to,
            ttl_secs: None,
            server_time_ms: 0,
        },
    );
    for client in &mut world.clients {
        client.linked_after = Some(0);
    }
    let failure = world
        .check()
        .expect_err("a lost acknowledged message must fail the check");
    assert!(failure.contains("lost"), "{failure}");
}

impl<S: SimStore> World<S> {
    /// The client on `slot`, if `SIM_TRACE_USER` names its user (debugging aid).
    fn traced(&self, slot: usize) -> Option<usize> {
        let user: UserId = std::env::var("SIM_TRACE_USER").ok()?.parse().ok()?;
        let client = *self.slot_owner.get(&slot)?;
        (self.clients[client].user == user).then_some(client)
    }
}

fn frame_summary(frame: &Frame) -> String {
    match frame {
        Frame::Deliver { seq, .. } => format!("Deliver {seq}"),
        Frame::Send { client_id, to, .. } => format!("Send {client_id} to {to}"),
        other => format!("{other:?}").chars().take(120).collect(),
    }
}
