//! Prometheus metrics: `GET /metrics` on `[metrics] listen`, in the text exposition format
//! (prometheus-client, the Prometheus project's Rust client).
//!
//! Each shard holds [`ShardMetrics`]: its own handles to every series labelled with its shard
//! id. An increment is a relaxed atomic add on a counter no other shard touches, and a
//! histogram observation takes an uncontended lock, so the data path never waits for another
//! thread. Series with a second label (frame kind, error code) are created once per shard and
//! kept in a small map, so the registry's lock is not taken per frame. The health thread
//! encodes the registry when Prometheus scrapes; gauges that describe a shard's state are set
//! by the shard about once a second, and store sizes are read on the scrape.
//!
//! Naming follows Prometheus's conventions: a `courier_` prefix, base units in the name
//! (`_seconds`, `_bytes`), `_total` on counters. docs/operations.md lists every series.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use courier_core::FastHashMap;
use courier_protocol::ErrorCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardLabel {
    shard: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    shard: u32,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    shard: u32,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    shard: u32,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    shard: u32,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabel {
    shard: u32,
    path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ZeroRttLabel {
    shard: u32,
    zero_rtt: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Seconds from 100 µs to ~52 s, doubling: the latency buckets.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

/// Requests per commit batch: 1 to 2,048, doubling.
fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 12))
}

/// Every series of the edge, registered once; shards take their handles with [`Metrics::shard`].
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    connections_open: Family<ShardLabel, Gauge>,
    connections_unauthenticated: Family<ShardLabel, Gauge>,
    connections_accepted: Family<ShardLabel, Counter>,
    connections_closed: Family<ReasonLabel, Counter>,
    handshakes_completed: Family<ZeroRttLabel, Counter>,
    handshakes_refused: Family<ShardLabel, Counter>,
    retries_sent: Family<ShardLabel, Counter>,
    frames_received: Family<KindLabel, Counter>,
    frames_sent: Family<KindLabel, Counter>,
    sends_acked: Family<ShardLabel, Counter>,
    sends_refused: Family<CodeLabel, Counter>,
    deliveries: Family<PathLabel, Counter>,
    delivery_latency: Histograms<PathLabel>,
    send_ack_latency: Histograms<ShardLabel>,
    commit_batches: Family<ShardLabel, Counter>,
    commit_failures: Family<ShardLabel, Counter>,
    commit_batches_overlapped: Family<ShardLabel, Counter>,
    receive_lingers: Family<ShardLabel, Counter>,
    receive_linger_datagrams: Family<ShardLabel, Counter>,
    quic_acks_sent_early: Family<ShardLabel, Counter>,
    commit_batch_requests: Histograms<ShardLabel>,
    commit_duration: Histograms<ShardLabel>,
    sync_reads: Family<ShardLabel, Counter>,
    deliveries_held_for_acks: Family<ShardLabel, Counter>,
    deliveries_held_for_room: Family<ShardLabel, Counter>,
    expired_messages: Family<ShardLabel, Counter>,
    expiry_index_entries_cleared: Family<ShardLabel, Counter>,
    inboxes_emptied: Family<ShardLabel, Counter>,
    inbox_queue_requests: Family<ShardLabel, Gauge>,
    store_message_keys: Family<ShardLabel, Gauge>,
    store_memory_bytes: Family<ShardLabel, Gauge>,
    store_dedupe_memory_bytes: Family<ShardLabel, Gauge>,
    store_full: Family<ShardLabel, Gauge>,
    store_reopening: Family<ShardLabel, Gauge>,
    store_background_workers_idle: Family<ShardLabel, Gauge>,
    store_background_behind: Family<ShardLabel, Counter>,
    mesh_backlog_messages: Family<ShardLabel, Gauge>,
    mesh_messages_dropped: Family<ShardLabel, Counter>,
    mesh_backpressure: Family<ShardLabel, Counter>,
    links_up: Family<ShardLabel, Gauge>,
    guest_edges: Family<ShardLabel, Gauge>,
    link_failures: Family<ShardLabel, Counter>,
    link_sends_forwarded: Family<ShardLabel, Counter>,
    link_requests_received: Family<ShardLabel, Counter>,
    erase_passes: Family<ResultLabel, Counter>,
    erase_last_complete: Family<ShardLabel, Gauge>,
    /// Read on each scrape.
    store_disk_bytes: Family<ShardLabel, Gauge>,
    stores: Vec<PathBuf>,
    /// Read on each scrape: one cache for every shard.
    tls_sessions_cached: Gauge,
    tls_sessions: Option<Arc<crate::tls::SessionCache>>,
    /// Serialises scrapes (the disk walk sets gauges before encoding).
    scrape: Mutex<()>,
}

impl Metrics {
    /// The registry with every series. `stores` are the shards' embedded store directories
    /// (empty with FoundationDB), whose disk use each scrape reports, as it reports how many
    /// sessions `tls_sessions` holds; `erase_within_secs` is their erase bound
    /// (`retention.erase_within_secs`).
    pub fn new(
        stores: Vec<PathBuf>,
        tls_sessions: Option<Arc<crate::tls::SessionCache>>,
        erase_within_secs: u64,
    ) -> Metrics {
        let mut registry = Registry::with_prefix("courier");
        macro_rules! family {
            ($name:literal, $help:literal) => {{
                let family = Family::default();
                registry.register($name, $help, family.clone());
                family
            }};
            ($name:literal, $help:literal, $unit:expr, $histogram:expr) => {{
                let family: Histograms<_> = Family::new_with_constructor($histogram);
                registry.register_with_unit($name, $help, $unit, family.clone());
                family
            }};
        }
        let connections_open = family!("connections_open", "QUIC connections the shard holds");
        let connections_unauthenticated = family!(
            "connections_unauthenticated",
            "Connections whose Hello has not been accepted yet"
        );
        let connections_accepted = family!(
            "connections_accepted",
            "Connections accepted from clients (before the handshake completes)"
        );
        let connections_closed = family!(
            "connections_closed",
            "Connections ended, by reason: the error code the edge closed with, or lost (the client closed, went silent or the idle timeout passed)"
        );
        let handshakes_completed = family!(
            "handshakes_completed",
            "TLS handshakes completed, by whether 0-RTT data was accepted"
        );
        let handshakes_refused = family!(
            "handshakes_refused",
            "New connections refused: too many unauthenticated on the shard, or too many handshakes from one address"
        );
        let retries_sent = family!(
            "retries_sent",
            "QUIC Retry packets sent (address validation under a handshake flood)"
        );
        let frames_received = family!(
            "frames_received",
            "Protocol frames decoded from clients, by kind"
        );
        let frames_sent = family!("frames_sent", "Protocol frames written to clients, by kind");
        let sends_acked = family!(
            "sends_acked",
            "Sends answered with SendAck (durably stored) on this shard's connections"
        );
        let sends_refused = family!(
            "sends_refused",
            "Sends answered with SendError, by error code"
        );
        let deliveries = family!(
            "deliveries",
            "Messages written to a recipient's connection: live (as committed) or sync (read back from the store)"
        );
        let delivery_latency = family!(
            "delivery_latency",
            "From a message's commit (its server time) to its Deliver frame handed to QUIC; path=live is the online-delivery SLO",
            Unit::Seconds,
            latency_histogram as fn() -> Histogram
        );
        let send_ack_latency = family!(
            "send_ack_latency",
            "From the home shard queuing a send to its commit completing (what SendAck waits for)",
            Unit::Seconds,
            latency_histogram as fn() -> Histogram
        );
        let commit_batches = family!(
            "commit_batches",
            "Group-commit batches committed (one transaction and fsync each)"
        );
        let commit_failures = family!("commit_failures", "Group-commit batches the store refused");
        let commit_batches_overlapped = family!(
            "commit_batches_overlapped",
            "Batches written while more waited, their fsync then overlapping the next batch's \
             work (the log engine, decision 0027)"
        );
        let receive_lingers = family!(
            "receive_lingers",
            "Times the shard left datagrams in its socket after a wake-up \
             (batching.receive_linger_us, decision 0042)"
        );
        let receive_linger_datagrams = family!(
            "receive_linger_datagrams",
            "Datagrams read after a linger: divided by the lingers, the datagrams each gathered"
        );
        let quic_acks_sent_early = family!(
            "quic_acks_sent_early",
            "Delayed QUIC acknowledgements sent in a wake-up the shard had for other work, \
             before they were due, instead of in a timer wake-up of their own"
        );
        let commit_batch_requests: Histograms<ShardLabel> =
            Family::new_with_constructor(batch_histogram as fn() -> Histogram);
        registry.register(
            "commit_batch_requests",
            "Requests (sends, logins, acks, forgets) per committed batch",
            commit_batch_requests.clone(),
        );
        let commit_duration = family!(
            "commit_duration",
            "Time a batch's commit took on the writer thread, fsync included",
            Unit::Seconds,
            latency_histogram as fn() -> Histogram
        );
        let deliveries_held_for_acks = family!(
            "deliveries_held_for_acks",
            "Deliveries held back until their connection acknowledged some of what it was given (limits.deliveries_unacked_per_connection_max): clients slow to take their messages"
        );
        let deliveries_held_for_room = family!(
            "deliveries_held_for_room",
            "Deliveries held back until their connection's outbound buffer had room (limits.outbound_bytes_per_connection_max): clients, or paths, slower than their messages"
        );
        let sync_reads = family!(
            "sync_reads",
            "Store reads for connections catching up (after login, a gap or a full buffer)"
        );
        let expired_messages = family!(
            "expired_messages",
            "Undelivered messages deleted after their retention or TTL"
        );
        let expiry_index_entries_cleared = family!(
            "expiry_index_entries_cleared",
            "Expiry index entries processed and cleared"
        );
        let inboxes_emptied = family!(
            "inboxes_emptied",
            "Forgets committed: inboxes expiry left empty, whose counter is deleted unless a message came in since"
        );
        let inbox_queue_requests = family!(
            "inbox_queue_requests",
            "Sends, logins, acks and forgets waiting for the next commit batch"
        );
        let store_message_keys = family!(
            "store_message_keys",
            "Stored message keys, approximately (the embedded store counts deleted keys until compaction drops them): the inbox backlog"
        );
        let store_memory_bytes = family!(
            "store_memory_bytes",
            "Memory the stored keys take, estimated (store.engine = \"log\" only; bounded by store.log_memory_bytes_max)"
        );
        let store_dedupe_memory_bytes = family!(
            "store_dedupe_memory_bytes",
            "Memory the dedupe records of recent sends take before they move to the dedupe tier on disk, estimated (store.engine = \"log\" only; moved past store.log_dedupe_memory_bytes_max)"
        );
        let store_full = family!(
            "store_full",
            "1 while the store is near its memory bound and the shard refuses sends with StoreUnavailable, else 0"
        );
        let store_reopening = family!(
            "store_reopening",
            "1 while the shard reopens its store after a failed write (sends get StoreUnavailable), else 0"
        );
        let store_background_workers_idle = family!(
            "store_background_workers_idle",
            "fjall's background workers (flushes, compactions) at idle priority now, all of them (store.fjall_worker_threads) while they keep up (store.fjall_workers_idle_unless_behind; store.engine = \"fjall\" only)"
        );
        let store_background_behind = family!(
            "store_background_behind",
            "Times fjall's background work piled up (two sealed memtables, or four level-0 tables past where a keyspace merges them) and its workers went back to normal priority; fjall halts writes at four sealed memtables"
        );
        let mesh_backlog_messages = family!(
            "mesh_backlog_messages",
            "Messages waiting for room in the channels to other shards"
        );
        let mesh_messages_dropped = family!(
            "mesh_messages_dropped",
            "Datagrams for another shard dropped (its channel full, or larger than the endpoint takes), and signals dropped because another shard's backlog or a link to another edge was full"
        );
        let mesh_backpressure = family!(
            "mesh_backpressure",
            "Times a connection's input was held back because the channels to other shards were congested"
        );
        let links_up = family!(
            "links_up",
            "This shard's links to the other edges of the cluster that are up"
        );
        let guest_edges = family!(
            "guest_edges",
            "Dead or drained edges whose users this shard serves (takeover)"
        );
        let link_failures = family!(
            "link_failures",
            "Links of this shard to other edges that went down (or never came up)"
        );
        let link_sends_forwarded = family!(
            "link_sends_forwarded",
            "Sends this shard forwarded to the edge where their recipient lives"
        );
        let link_requests_received = family!(
            "link_requests_received",
            "Sends other edges forwarded to this shard, for users of this edge"
        );
        let erase_passes = family!(
            "erase_passes",
            "Erase passes of the shard's embedded store, by result: complete (what was deleted before it started is in no file of the store), partial (it left work to the next pass: a read held old tables, or a rewrite was skipped) or failed"
        );
        let erase_last_complete: Family<ShardLabel, Gauge> = Family::default();
        registry.register_with_unit(
            "erase_last_complete_timestamp",
            "Unix time at which the shard's last complete erase pass started, whatever was deleted before it being in no file of the store; at start, from the store's record of its last complete pass, else when the stores were made (claiming nothing for a store that never completed one). Embedded stores only",
            Unit::Seconds,
            erase_last_complete.clone(),
        );
        let erase_within = Gauge::<i64>::default();
        erase_within.set(i64::try_from(erase_within_secs).unwrap_or(i64::MAX));
        registry.register_with_unit(
            "erase_within",
            "retention.erase_within_secs: the bound within which a deleted body is in no file of an embedded store",
            Unit::Seconds,
            erase_within,
        );
        let store_disk_bytes: Family<ShardLabel, Gauge> = Family::default();
        registry.register_with_unit(
            "store_disk",
            "Disk blocks the shard's embedded store uses",
            Unit::Bytes,
            store_disk_bytes.clone(),
        );
        let tls_sessions_cached = Gauge::default();
        registry.register(
            "tls_sessions_cached",
            "TLS sessions held for resumption and 0-RTT, one per recent handshake (at most tls.session_cache_entries)",
            tls_sessions_cached.clone(),
        );
        let build_info: Family<Vec<(String, String)>, Gauge> = Family::default();
        build_info
            .get_or_create(&vec![(
                "version".to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            )])
            .set(1);
        registry.register("build_info", "The edge's version", build_info);
        Metrics {
            registry,
            connections_open,
            connections_unauthenticated,
            connections_accepted,
            connections_closed,
            handshakes_completed,
            handshakes_refused,
            retries_sent,
            frames_received,
            frames_sent,
            sends_acked,
            sends_refused,
            deliveries,
            delivery_latency,
            send_ack_latency,
            commit_batches,
            commit_failures,
            commit_batches_overlapped,
            receive_lingers,
            receive_linger_datagrams,
            quic_acks_sent_early,
            commit_batch_requests,
            commit_duration,
            sync_reads,
            deliveries_held_for_acks,
            deliveries_held_for_room,
            expired_messages,
            expiry_index_entries_cleared,
            inboxes_emptied,
            inbox_queue_requests,
            store_message_keys,
            store_memory_bytes,
            store_dedupe_memory_bytes,
            store_full,
            store_reopening,
            store_background_workers_idle,
            store_background_behind,
            mesh_backlog_messages,
            mesh_messages_dropped,
            mesh_backpressure,
            links_up,
            guest_edges,
            link_failures,
            link_sends_forwarded,
            link_requests_received,
            erase_passes,
            erase_last_complete,
            store_disk_bytes,
            stores,
            tls_sessions_cached,
            tls_sessions,
            scrape: Mutex::new(()),
        }
    }

    /// Shard `shard`'s handles.
    pub fn shard(&self, shard: u32) -> ShardMetrics {
        let label = ShardLabel { shard };
        // Every code and reason from the start: a series that appears only with its first
        // event loses that event to `rate()`, and alerts on it would see nothing at all.
        let closed = |reason| {
            self.connections_closed
                .get_or_create_owned(&ReasonLabel { shard, reason })
        };
        let mut sends_refused = FastHashMap::default();
        let mut connections_closed = FastHashMap::default();
        for code in courier_protocol::ALL_ERROR_CODES {
            let counter = self.sends_refused.get_or_create_owned(&CodeLabel {
                shard,
                code: code_name(code),
            });
            sends_refused.insert(code, counter);
            connections_closed.insert(Some(code), closed(code_name(code)));
        }
        connections_closed.insert(None, closed("lost"));
        let path = |path| PathLabel { shard, path };
        ShardMetrics {
            shard,
            connections_open: self.connections_open.get_or_create_owned(&label),
            connections_unauthenticated: self
                .connections_unauthenticated
                .get_or_create_owned(&label),
            connections_accepted: self.connections_accepted.get_or_create_owned(&label),
            connections_closed,
            handshakes_completed: [
                self.handshakes_completed
                    .get_or_create_owned(&ZeroRttLabel {
                        shard,
                        zero_rtt: "accepted",
                    }),
                self.handshakes_completed
                    .get_or_create_owned(&ZeroRttLabel {
                        shard,
                        zero_rtt: "none",
                    }),
            ],
            handshakes_refused: self.handshakes_refused.get_or_create_owned(&label),
            retries_sent: self.retries_sent.get_or_create_owned(&label),
            frames_received_family: self.frames_received.clone(),
            frames_sent_family: self.frames_sent.clone(),
            frames_received: FastHashMap::default(),
            frames_sent: FastHashMap::default(),
            sends_acked: self.sends_acked.get_or_create_owned(&label),
            sends_refused,
            deliveries: [
                self.deliveries.get_or_create_owned(&path("live")),
                self.deliveries.get_or_create_owned(&path("sync")),
            ],
            delivery_latency: [
                self.delivery_latency.get_or_create_owned(&path("live")),
                self.delivery_latency.get_or_create_owned(&path("sync")),
            ],
            send_ack_latency: self.send_ack_latency.get_or_create_owned(&label),
            commit_batches: self.commit_batches.get_or_create_owned(&label),
            commit_failures: self.commit_failures.get_or_create_owned(&label),
            commit_batches_overlapped: self.commit_batches_overlapped.get_or_create_owned(&label),
            receive_lingers: self.receive_lingers.get_or_create_owned(&label),
            receive_linger_datagrams: self.receive_linger_datagrams.get_or_create_owned(&label),
            quic_acks_sent_early: self.quic_acks_sent_early.get_or_create_owned(&label),
            commit_batch_requests: self.commit_batch_requests.get_or_create_owned(&label),
            commit_duration: self.commit_duration.get_or_create_owned(&label),
            sync_reads: self.sync_reads.get_or_create_owned(&label),
            deliveries_held_for_acks: self.deliveries_held_for_acks.get_or_create_owned(&label),
            deliveries_held_for_room: self.deliveries_held_for_room.get_or_create_owned(&label),
            expired_messages: self.expired_messages.get_or_create_owned(&label),
            expiry_index_entries_cleared: self
                .expiry_index_entries_cleared
                .get_or_create_owned(&label),
            inboxes_emptied: self.inboxes_emptied.get_or_create_owned(&label),
            inbox_queue_requests: self.inbox_queue_requests.get_or_create_owned(&label),
            store_message_keys: self.store_message_keys.get_or_create_owned(&label),
            store_memory_bytes: self.store_memory_bytes.get_or_create_owned(&label),
            store_dedupe_memory_bytes: self.store_dedupe_memory_bytes.get_or_create_owned(&label),
            store_full: self.store_full.get_or_create_owned(&label),
            store_reopening: self.store_reopening.get_or_create_owned(&label),
            store_background_workers_idle: self
                .store_background_workers_idle
                .get_or_create_owned(&label),
            store_background_behind: self.store_background_behind.get_or_create_owned(&label),
            mesh_backlog_messages: self.mesh_backlog_messages.get_or_create_owned(&label),
            mesh_messages_dropped: self.mesh_messages_dropped.get_or_create_owned(&label),
            mesh_backpressure: self.mesh_backpressure.get_or_create_owned(&label),
            links_up: self.links_up.get_or_create_owned(&label),
            guest_edges: self.guest_edges.get_or_create_owned(&label),
            link_failures: self.link_failures.get_or_create_owned(&label),
            link_sends_forwarded: self.link_sends_forwarded.get_or_create_owned(&label),
            link_requests_received: self.link_requests_received.get_or_create_owned(&label),
            erase_passes: ["complete", "partial", "failed"].map(|result| {
                self.erase_passes
                    .get_or_create_owned(&ResultLabel { shard, result })
            }),
            // FoundationDB erases on its own: no series, rather than one that stays 0.
            erase_last_complete: (!self.stores.is_empty())
                .then(|| self.erase_last_complete.get_or_create_owned(&label)),
        }
    }

    /// The exposition of every series, with the stores' disk use read now: OpenMetrics text
    /// when `openmetrics` (Prometheus asks for it), else the classic Prometheus text format
    /// 0.0.4, which `promtool check metrics` and older scrapers read.
    pub fn encode(&self, openmetrics: bool) -> String {
        let text = self.encode_openmetrics();
        if openmetrics {
            text
        } else {
            openmetrics_to_text_004(&text)
        }
    }

    fn encode_openmetrics(&self) -> String {
        let _scrape = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        for (shard, dir) in self.stores.iter().enumerate() {
            self.store_disk_bytes
                .get_or_create(&ShardLabel {
                    shard: shard as u32,
                })
                .set(crate::stores::allocated_bytes(dir) as i64);
        }
        if let Some(sessions) = &self.tls_sessions {
            self.tls_sessions_cached.set(sessions.len() as i64);
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// The classic text format from OpenMetrics text: a counter's `# HELP` and `# TYPE` name its
/// samples' `_total` name, and there are no `# UNIT` or `# EOF` lines. Samples, gauges and
/// histograms read the same in both.
fn openmetrics_to_text_004(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            counters.insert(name.to_string());
        }
    }
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let metadata = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|prefix| Some((prefix, line.strip_prefix(prefix)?)));
        if let Some((prefix, rest)) = metadata {
            let name = rest.split(' ').next().unwrap_or("");
            if counters.contains(name) {
                text.push_str(prefix);
                text.push_str(name);
                text.push_str("_total");
                text.push_str(&rest[name.len()..]);
                text.push('\n');
                continue;
            }
        }
        text.push_str(line);
        text.push('\n');
    }
    text
}

/// One shard's handles to its series.
#[derive(Debug)]
pub struct ShardMetrics {
    shard: u32,
    pub connections_open: Gauge,
    pub connections_unauthenticated: Gauge,
    pub connections_accepted: Counter,
    /// By the code the edge closed with; `None`: lost.
    connections_closed: FastHashMap<Option<ErrorCode>, Counter>,
    /// [accepted 0-RTT, no 0-RTT].
    handshakes_completed: [Counter; 2],
    pub handshakes_refused: Counter,
    pub retries_sent: Counter,
    frames_received_family: Family<KindLabel, Counter>,
    frames_sent_family: Family<KindLabel, Counter>,
    /// Looked up for every frame, so hashed with ahash (std's SipHash was ~1% of a shard's
    /// samples in a drain).
    frames_received: FastHashMap<&'static str, Counter>,
    frames_sent: FastHashMap<&'static str, Counter>,
    pub sends_acked: Counter,
    sends_refused: FastHashMap<ErrorCode, Counter>,
    /// [live, sync].
    deliveries: [Counter; 2],
    delivery_latency: [Histogram; 2],
    pub send_ack_latency: Histogram,
    pub commit_batches: Counter,
    pub commit_failures: Counter,
    pub commit_batches_overlapped: Counter,
    pub receive_lingers: Counter,
    pub receive_linger_datagrams: Counter,
    pub quic_acks_sent_early: Counter,
    pub commit_batch_requests: Histogram,
    pub commit_duration: Histogram,
    pub sync_reads: Counter,
    pub deliveries_held_for_acks: Counter,
    pub deliveries_held_for_room: Counter,
    pub expired_messages: Counter,
    pub expiry_index_entries_cleared: Counter,
    pub inboxes_emptied: Counter,
    pub inbox_queue_requests: Gauge,
    pub store_message_keys: Gauge,
    pub store_memory_bytes: Gauge,
    pub store_dedupe_memory_bytes: Gauge,
    pub store_full: Gauge,
    pub store_reopening: Gauge,
    pub store_background_workers_idle: Gauge,
    pub store_background_behind: Counter,
    pub mesh_backlog_messages: Gauge,
    pub mesh_messages_dropped: Counter,
    pub mesh_backpressure: Counter,
    pub links_up: Gauge,
    pub guest_edges: Gauge,
    pub link_failures: Counter,
    pub link_sends_forwarded: Counter,
    pub link_requests_received: Counter,
    /// Complete, partial, failed.
    erase_passes: [Counter; 3],
    /// `None` on FoundationDB.
    erase_last_complete: Option<Gauge>,
}

impl ShardMetrics {
    /// An erase pass that left nothing to the next one, started at `started_unix_ms`.
    pub fn erase_pass_complete(&self, started_unix_ms: u64) {
        self.erase_passes[0].inc();
        self.erase_complete_since(started_unix_ms);
    }

    /// An erase pass that left work to the next one.
    pub fn erase_pass_partial(&self) {
        self.erase_passes[1].inc();
    }

    pub fn erase_pass_failed(&self) {
        self.erase_passes[2].inc();
    }

    /// Whatever was deleted before `unix_ms` is in no file of the store (a complete pass
    /// started then; at start, the store's record of one, else when the stores were made,
    /// before which nothing was deleted from them).
    pub fn erase_complete_since(&self, unix_ms: u64) {
        if let Some(gauge) = &self.erase_last_complete {
            gauge.set(i64::try_from(unix_ms / 1000).unwrap_or(i64::MAX));
        }
    }

    pub fn frame_received(&mut self, kind: &'static str) {
        let (family, shard) = (&self.frames_received_family, self.shard);
        self.frames_received
            .entry(kind)
            .or_insert_with(|| family.get_or_create_owned(&KindLabel { shard, kind }))
            .inc();
    }

    pub fn frame_sent(&mut self, kind: &'static str) {
        let (family, shard) = (&self.frames_sent_family, self.shard);
        self.frames_sent
            .entry(kind)
            .or_insert_with(|| family.get_or_create_owned(&KindLabel { shard, kind }))
            .inc();
    }

    pub fn send_refused(&self, code: ErrorCode) {
        if let Some(counter) = self.sends_refused.get(&code) {
            counter.inc();
        }
    }

    /// A connection ended: closed by the edge with `code`, or lost (`None`).
    pub fn connection_closed(&self, code: Option<ErrorCode>) {
        if let Some(counter) = self.connections_closed.get(&code) {
            counter.inc();
        }
    }

    pub fn handshake_completed(&self, zero_rtt_accepted: bool) {
        self.handshakes_completed[usize::from(!zero_rtt_accepted)].inc();
    }

    /// A Deliver frame written: `live` as committed, or from a sync read; `age_ms` since its
    /// commit.
    pub fn delivered(&self, live: bool, age_ms: u64) {
        let path = usize::from(!live);
        self.deliveries[path].inc();
        self.delivery_latency[path].observe(age_ms as f64 / 1000.0);
    }
}

/// The label value of an error code: its name in snake case.
pub fn code_name(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Malformed => "malformed",
        ErrorCode::FrameTooLarge => "frame_too_large",
        ErrorCode::LimitExceeded => "limit_exceeded",
        ErrorCode::Unauthenticated => "unauthenticated",
        ErrorCode::TokenExpired => "token_expired",
        ErrorCode::UnexpectedFrame => "unexpected_frame",
        ErrorCode::BadRecipient => "bad_recipient",
        ErrorCode::TooManyInFlight => "too_many_in_flight",
        ErrorCode::Overloaded => "overloaded",
        ErrorCode::StoreUnavailable => "store_unavailable",
        ErrorCode::ShardUnavailable => "shard_unavailable",
        ErrorCode::ShuttingDown => "shutting_down",
        ErrorCode::Internal => "internal",
        ErrorCode::Superseded => "superseded",
        ErrorCode::Disconnected => "disconnected",
        ErrorCode::TooManyConnections => "too_many_connections",
        ErrorCode::TimedOut => "timed_out",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exposition has every family with its help, type and unit, per shard, and counts
    /// what the shards counted.
    #[test]
    fn shards_count_into_one_exposition() {
        let metrics = Metrics::new(Vec::new(), None, 3600);
        let mut zero = metrics.shard(0);
        let one = metrics.shard(1);
        zero.frame_received("send");
        zero.frame_received("send");
        zero.send_refused(ErrorCode::Overloaded);
        one.sends_acked.inc();
        one.delivered(true, 3);
        one.connection_closed(None);
        let text = metrics.encode(true);
        for line in [
            "courier_frames_received_total{shard=\"0\",kind=\"send\"} 2",
            "courier_sends_refused_total{shard=\"0\",code=\"overloaded\"} 1",
            "courier_sends_acked_total{shard=\"1\"} 1",
            "courier_deliveries_total{shard=\"1\",path=\"live\"} 1",
            "courier_connections_closed_total{shard=\"1\",reason=\"lost\"} 1",
            "# TYPE courier_delivery_latency_seconds histogram",
            "courier_delivery_latency_seconds_count{shard=\"1\",path=\"live\"} 1",
            "# UNIT courier_commit_duration_seconds seconds",
        ] {
            assert!(text.contains(line), "no {line:?} in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        let classic = metrics.encode(false);
        for line in [
            "# TYPE courier_frames_received_total counter",
            "# HELP courier_frames_received_total Protocol frames decoded from clients, by kind.",
            "courier_frames_received_total{shard=\"0\",kind=\"send\"} 2",
            "# TYPE courier_delivery_latency_seconds histogram",
        ] {
            assert!(classic.contains(line), "no {line:?} in:\n{classic}");
        }
        assert!(!classic.contains("# EOF") && !classic.contains("# UNIT"));
        // Series alerts use exist before their first event.
        for line in [
            "courier_sends_refused_total{shard=\"1\",code=\"store_unavailable\"} 0",
            "courier_connections_closed_total{shard=\"0\",reason=\"lost\"} 0",
            "# TYPE courier_commit_batch_requests histogram",
        ] {
            assert!(classic.contains(line), "no {line:?} in:\n{classic}");
        }
    }
}
