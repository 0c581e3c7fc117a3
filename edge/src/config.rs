//! The edge's configuration: TOML, every key known, every value checked at start-up.
//!
//! `Config::default()` is the built-in configuration that `serve` runs with when no file is
//! given, and `print-default-config` prints it. Unknown keys are rejected with the file and the
//! key; bad values with the key and what is expected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use courier_core::CoreConfig;
use courier_core::store::config::{FdbConfig, StoreConfig, StoreKind};
use courier_core::store::fjall::FjallOptions;
use serde::{Deserialize, Serialize};

/// The whole configuration file.
/// Messages one shard's cross-shard channels hold together at most
/// ([`Config::mesh_channel_capacity`]).
pub const MESH_MESSAGES_PER_SHARD_MAX: usize = 65_536;
/// The fewest messages a cross-shard channel holds, however many shards there are.
const MESH_CHANNEL_MESSAGES_MIN: usize = 256;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerSection,
    pub tls: TlsSection,
    pub auth: AuthSection,
    pub limits: LimitsSection,
    pub quic: QuicSection,
    pub retention: RetentionSection,
    pub batching: BatchingSection,
    pub store: StoreSection,
    pub log: LogSection,
    pub metrics: MetricsSection,
    pub control: ControlSection,
    pub cluster: ClusterSection,
}

/// A cluster of edges (docs/cluster.md): users are placed on edges by rendezvous hashing of
/// the members' ids; an edge redirects clients to their user's home edge and forwards sends to
/// users of other edges over QUIC links, authenticated by mutual TLS with the cluster's CA.
/// No members (the default): the edge runs on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// This edge's id: one of `members`, kept for the edge's life (placement hashes it).
    pub edge_id: u32,
    /// PEM certificate of the cluster's CA: a link's peer must present a certificate it signed.
    pub ca_cert_path: PathBuf,
    /// PEM certificate (signed by the CA, with the DNS name `courier-link`) and key this edge
    /// presents on links, both as the connecting and the accepting side.
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// A link that broke is opened again after a backoff that doubles from the minimum to the
    /// maximum (with jitter).
    pub link_reconnect_ms_min: u64,
    pub link_reconnect_ms_max: u64,
    /// Bytes a link may hold unsent; past it the link is closed and opened again, and the
    /// sends it carried are refused as retryable (`ShardUnavailable`).
    pub link_outbound_bytes_max: usize,
    /// Forwarded sends one link may have waiting for their commit; beyond it: `Overloaded`.
    pub link_requests_in_flight_max: usize,
    /// Every edge's link certificate also names the edge, `edge-{id}.courier-link`: a link's
    /// dialing side checks it reached the member it meant, and the accepting side accepts
    /// `Hello { edge }` only for an edge the certificate names. Off, any certificate the CA
    /// signed may claim any edge id (and name any sender in a forwarded send), so one leaked
    /// edge key speaks for the whole cluster. Turn it on once every edge's certificate
    /// carries its name (docs/cluster.md).
    pub link_certificates_name_the_edge: bool,
    /// While an edge is dead, another serves its users (decision 0015). Needs a store every
    /// edge shares: `store.kind = "foundationdb"`.
    pub takeover: bool,
    /// An edge whose lease beat stood still this long is dead to the others, which take its
    /// users over. Several renew intervals, and longer than a pause the edge may take.
    pub lease_timeout_ms: u64,
    /// How often an edge beats its lease and reads the others'.
    pub lease_renew_ms: u64,
    /// Raise it with every change of `members`, in every edge's config (decision 0016). On
    /// FoundationDB the first edge started with a later epoch fences every edge still on the
    /// earlier one, which exits; an edge started with an earlier epoch than the store's is
    /// refused. So a rolling change never lets two edges serve one user.
    pub membership_epoch: u64,
    /// Every edge of the cluster, this one included, in any order.
    pub members: Vec<ClusterMember>,
}

/// One edge of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterMember {
    pub id: u32,
    /// Where clients reach it (`host:port`): what a redirect to it says.
    pub client_address: String,
    /// Where other edges open links to it: its `server.listen` address as they reach it.
    pub link_address: SocketAddr,
}

impl Default for ClusterSection {
    fn default() -> ClusterSection {
        ClusterSection {
            edge_id: 0,
            ca_cert_path: PathBuf::new(),
            cert_path: PathBuf::new(),
            key_path: PathBuf::new(),
            link_reconnect_ms_min: 500,
            link_reconnect_ms_max: 30_000,
            link_outbound_bytes_max: 16 * 1024 * 1024,
            link_requests_in_flight_max: 4096,
            link_certificates_name_the_edge: false,
            takeover: false,
            lease_timeout_ms: 10_000,
            lease_renew_ms: 1_000,
            membership_epoch: 1,
            members: Vec::new(),
        }
    }
}

impl ClusterSection {
    /// Whether the edge is part of a cluster.
    pub fn enabled(&self) -> bool {
        !self.members.is_empty()
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        if !self.enabled() {
            return Ok(());
        }
        if self.members.len() > courier_core::membership::MEMBERS_MAX {
            return Err((
                "cluster.members",
                format!("at most {} members", courier_core::membership::MEMBERS_MAX),
            ));
        }
        if self.membership_epoch == 0 {
            return Err((
                "cluster.membership_epoch",
                "at least 1, raised with every change of the members".into(),
            ));
        }
        if !self.members.iter().any(|member| member.id == self.edge_id) {
            return Err((
                "cluster.edge_id",
                format!("one of the members' ids, and {} is not", self.edge_id),
            ));
        }
        let mut ids: Vec<u32> = self.members.iter().map(|member| member.id).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|pair| pair[0] == pair[1]) {
            return Err(("cluster.members", "a different id for every member".into()));
        }
        for member in &self.members {
            let address = member.client_address.trim();
            // Clients resolve it as given: without a port they can neither parse nor look it
            // up, and every redirect to this member would fail.
            let has_port = address.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port != 0)
            });
            if !has_port || address.len() > courier_protocol::ADDRESS_BYTES_MAX {
                return Err((
                    "cluster.members.client_address",
                    format!(
                        "host:port of at most {} bytes for every member",
                        courier_protocol::ADDRESS_BYTES_MAX
                    ),
                ));
            }
        }
        for (key, path) in [
            ("cluster.ca_cert_path", &self.ca_cert_path),
            ("cluster.cert_path", &self.cert_path),
            ("cluster.key_path", &self.key_path),
        ] {
            if path.as_os_str().is_empty() {
                return Err((key, "a PEM file: links need mutual TLS".into()));
            }
        }
        if self.link_reconnect_ms_min == 0
            || self.link_reconnect_ms_max < self.link_reconnect_ms_min
        {
            return Err((
                "cluster.link_reconnect_ms_min/max",
                "a minimum of at least 1 and a maximum at least the minimum".into(),
            ));
        }
        if self.link_outbound_bytes_max < 2 * courier_protocol::FRAME_BYTES_MAX {
            return Err((
                "cluster.link_outbound_bytes_max",
                "at least two maximal frames (133120 bytes)".into(),
            ));
        }
        if self.link_requests_in_flight_max == 0 {
            return Err(("cluster.link_requests_in_flight_max", "at least 1".into()));
        }
        if self.lease_renew_ms == 0
            || self.lease_timeout_ms
                < self
                    .lease_renew_ms
                    .saturating_mul(courier_core::takeover::BEATS_PER_TIMEOUT_MIN)
        {
            return Err((
                "cluster.lease_renew_ms/lease_timeout_ms",
                "a renew interval of at least 1 and a timeout of at least three of them".into(),
            ));
        }
        Ok(())
    }
}

/// Edge ids with FoundationDB stay below this: the edge's owner key is `EDGE_ID_FDB_MAX | id`,
/// above the owner keys of a lone edge's shards.
pub const EDGE_ID_FDB_MAX: u32 = 1 << 31;

/// The local control channel of `courier-edge ctl` (docs/decisions/0012).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlSection {
    /// Serve `courier-edge ctl` on a Unix socket.
    pub enabled: bool,
    /// The socket's path. Empty: `control.sock` in `server.data_dir`. It is created readable
    /// and writable by the edge's user only: whoever can open it can disconnect users and
    /// erase inboxes.
    pub socket: String,
}

impl Default for ControlSection {
    fn default() -> ControlSection {
        ControlSection {
            enabled: true,
            socket: String::new(),
        }
    }
}

impl Config {
    /// Where the control socket is (or would be).
    pub fn control_socket_path(&self) -> std::path::PathBuf {
        if self.control.socket.trim().is_empty() {
            self.server.data_dir.join("control.sock")
        } else {
            std::path::PathBuf::from(self.control.socket.trim())
        }
    }
}

/// The observability listener (HTTP): `/metrics`, `/livez` and `/readyz`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// TCP address of the listener, like `127.0.0.1:9464`. Empty: off. Keep it on loopback or
    /// a private network: it needs no credentials.
    pub listen: String,
}

impl MetricsSection {
    /// The address to listen on, if any.
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>, String> {
        if self.listen.trim().is_empty() {
            return Ok(None);
        }
        self.listen
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("{:?} is not an address like 127.0.0.1:9464", self.listen))
    }
}

/// Where logs go: always stderr, for the supervisor (journald, Kubernetes) to collect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `text` (one human line per event; colours only when stderr is a terminal) or `json`
    /// (one JSON object per line). `--log-format` overrides it.
    pub format: String,
    /// Which events to log, in `RUST_LOG` syntax (`info`, `courier_edge=debug,info`). The
    /// `RUST_LOG` environment variable overrides it.
    pub filter: String,
}

impl Default for LogSection {
    fn default() -> LogSection {
        LogSection {
            format: "text".into(),
            filter: "info,lsm_tree=warn,fjall=warn".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// `embedded` (fjall in `server.data_dir/store`) or `foundationdb` (needs a build with
    /// `--features fdb`; see docs/foundationdb.md).
    pub kind: String,
    /// Embedded store: memory per shard for the filter that answers dedupe lookups without a
    /// read (decisions 0018, 0030): half of it per dedupe bucket (a day), taken at the bucket's
    /// first send. 16 MiB answers ~99% of lookups from memory up to ~6 million sends per
    /// shard and day; 0 turns it off.
    pub dedupe_filter_bytes_max: usize,
    /// Embedded store: the engine, `fjall` (an LSM tree; the default) or `log` (live keys in
    /// memory, every commit appended to a journal; decision 0023).
    pub engine: String,
    /// `engine = "log"`: memory per shard the stored keys may take. Past it, sends fail with
    /// the retryable `StoreUnavailable` until deliveries and expiry free some.
    pub log_memory_bytes_max: u64,
    /// `engine = "log"`: bytes of each journal segment, zero-filled in advance so an fsync need
    /// not persist a new file size (decision 0023). Each shard holds a segment and a spare on
    /// disk. 0: journals grow by appending (slower fsyncs, no space held in advance).
    pub log_journal_segment_bytes: u64,
    /// Write each commit's journal bytes around the page cache (`O_DIRECT`), as the few
    /// 512-byte blocks they touch instead of the 4 KiB pages an fsync writes back: a quarter
    /// of the disk writes at a pace and less CPU per commit. Both engines (decisions 0032,
    /// 0033); `log_direct_writes`, its name before it applied to fjall, is still read. Where
    /// the file system does not take direct writes the journal goes through the page cache
    /// either way.
    #[serde(alias = "log_direct_writes")]
    pub direct_writes: bool,
    /// `engine = "log"`: memory per shard the dedupe records of recent sends may take before
    /// they move to the shard's dedupe tier on disk in one sorted write (decision 0023).
    pub log_dedupe_memory_bytes_max: u64,
    /// `engine = "fjall"`: fjall's background workers (flushes, compactions) at idle priority
    /// while they keep up, back at normal priority once memtables or level-0 tables pile up,
    /// so that they do not hold a shard's core for milliseconds at a pace (decision 0039).
    /// Needs the right to leave idle priority (root, CAP_SYS_NICE, or systemd's
    /// `LimitNICE=0`); without it the edge warns once and leaves them at normal priority.
    pub fjall_workers_idle_unless_behind: bool,
    /// `engine = "fjall"`: fjall's background threads per shard's store. With two or more,
    /// one of them only flushes memtables and the others only compact, so a flush never waits
    /// behind a compaction; with one, that thread does both (decision 0040).
    pub fjall_worker_threads: usize,
    pub foundationdb: FoundationDbSection,
}

/// The embedded engines `store.engine` names.
pub const STORE_ENGINES: [&str; 2] = ["fjall", "log"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FoundationDbSection {
    /// One cluster file per cluster; the order is part of the data layout (append only).
    pub cluster_files: Vec<PathBuf>,
    /// Prefix of every key, one per deployment sharing a cluster.
    pub key_prefix: String,
    pub transaction_timeout_ms: u32,
    pub retry_delay_ms_max: u32,
    pub transaction_bytes_max: usize,
}

impl Default for StoreSection {
    fn default() -> StoreSection {
        StoreSection {
            kind: StoreKind::Embedded.name().to_string(),
            dedupe_filter_bytes_max: FjallOptions::default().dedupe_filter_bytes_max,
            engine: STORE_ENGINES[0].to_string(),
            log_memory_bytes_max: courier_core::store::log::LogOptions::default().memory_bytes_max,
            log_journal_segment_bytes: courier_core::store::log::LogOptions::default()
                .journal_segment_bytes,
            direct_writes: courier_core::store::log::LogOptions::default().direct_writes,
            log_dedupe_memory_bytes_max: courier_core::store::log::LogOptions::default()
                .dedupe_memory_bytes_max,
            fjall_workers_idle_unless_behind: true,
            fjall_worker_threads: FjallOptions::default().worker_threads,
            foundationdb: FoundationDbSection::default(),
        }
    }
}

impl Default for FoundationDbSection {
    fn default() -> FoundationDbSection {
        let fdb = FdbConfig::default();
        FoundationDbSection {
            cluster_files: fdb.cluster_files,
            key_prefix: String::from_utf8_lossy(&fdb.key_prefix).into_owned(),
            transaction_timeout_ms: fdb.transaction_timeout_ms,
            retry_delay_ms_max: fdb.retry_delay_ms_max,
            transaction_bytes_max: fdb.transaction_bytes_max,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// UDP address every shard binds (with SO_REUSEPORT).
    pub listen: SocketAddr,
    /// Directory for the store, the development certificate and the signing key.
    pub data_dir: PathBuf,
    /// Shards (one glommio executor each); 0 means one per available core.
    pub shards: u32,
    /// Pin shard `n` to CPU `n`. Turn off when several edges share a machine (tests).
    pub pin_shards: bool,
    /// Socket receive and send buffer bytes per shard.
    pub socket_buffer_bytes: usize,
    /// Nice value of each shard's store writer thread (-20 to 19; 0 leaves it as the process
    /// is). The writer shares its shard's CPU; below 0 the scheduler lets it run as soon as a
    /// commit is due instead of after the shard's time slice: paced 10,000 msgs/s had a lower
    /// 99th percentile in 4 of 6 rounds, medians 20 ms and 11 ms (docs/benchmarks.md). Needs
    /// CAP_SYS_NICE or RLIMIT_NICE down to this value (systemd: `LimitNICE=-10`); without
    /// either the edge warns once and runs the writer at the process's priority. The value
    /// is absolute, and 0 means "leave it", so a process started at nice 5 cannot put its
    /// writer at exactly 0.
    pub store_writer_nice: i32,
    /// Seconds shutdown waits for the shards to finish their commits and close their
    /// connections before the process exits with code 2. Closing costs ~15 µs per connection
    /// on the development box (100,000 on one shard: 1.5 s), so raise it with
    /// `limits.connections_per_shard_max`; keep it below the supervisor's stop timeout, less
    /// the up to 8 s the hand-over to a successor takes first with `cluster.takeover`.
    pub shutdown_grace_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// PEM certificate chain. Empty: generate a development certificate in the data directory.
    pub cert_path: PathBuf,
    /// PEM private key, required when `cert_path` is set.
    pub key_path: PathBuf,
    /// TLS sessions remembered for resumption and 0-RTT (~275 bytes each), shared by shards.
    pub session_cache_entries: usize,
    /// A stopping edge (SIGTERM, `courier-edge ctl drain`) saves its TLS sessions in the data
    /// directory and the next start takes them back (and deletes the file), so its clients
    /// resume instead of all making full handshakes at once. A kill saves nothing.
    pub sessions_survive_restart: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// Ed25519 signing key (32-byte seed, base64) used by `courier-edge token`. Empty: the
    /// development key in the data directory, generated on first start.
    pub signing_key_path: PathBuf,
    /// Key id stamped into minted tokens.
    pub signing_key_id: u32,
    /// Tokens each shard remembers as verified, so a client reconnecting with the same token
    /// skips the signature check (until the token expires). 0: verify every time.
    pub verified_tokens_per_shard_max: usize,
    /// Further public keys accepted when verifying tokens, for rotation.
    pub verify_keys: Vec<VerifyKey>,
}

/// A public key that tokens may be signed with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyKey {
    pub id: u32,
    /// Ed25519 public key, 32 bytes, base64.
    pub public_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Connections one shard holds at most; further handshakes are refused.
    pub connections_per_shard_max: usize,
    /// Connections of one user across the edge.
    pub connections_per_user_max: usize,
    /// Sends of one connection waiting for their `SendAck`; beyond it: `TooManyInFlight`.
    pub sends_in_flight_per_connection_max: usize,
    /// Bytes queued for one connection; beyond it live deliveries pause and the connection
    /// catches up from the store.
    pub outbound_bytes_per_connection_max: usize,
    /// Messages one connection holds delivered and not acknowledged; beyond it delivery waits
    /// for the device's acks, then catches up from the store. Keep it at most the clients'
    /// buffer (the SDK's `deliveries_buffered_max`, 4,096 by default): then a client whose
    /// application is slow to take its messages still reads its sends' receipts, which come
    /// on the same stream.
    pub deliveries_unacked_per_connection_max: usize,
    /// Datagrams one shard reads per wake-up before it serves other work.
    pub datagrams_per_wakeup_max: usize,
    /// Messages in each cross-shard channel. A shard has a channel to every other shard and
    /// each is allocated whole at start, so with many shards each gets at most
    /// `MESH_MESSAGES_PER_SHARD_MAX / (shards - 1)` ([`Config::mesh_channel_capacity`]): memory
    /// grows with the shards, not with their square.
    pub mesh_channel_messages_max: usize,
    /// Sync reads queued for one shard's store reader; further reads wait their turn.
    pub store_reads_queued_max: usize,
    /// Body bytes of one connection's sends waiting for their `SendAck`; beyond it:
    /// `TooManyInFlight`. At least one maximal frame (66560).
    pub send_bytes_in_flight_per_connection_max: usize,
    /// What one connection may send (token buckets); beyond it sends get `Overloaded`.
    pub send_per_connection: SendRateSection,
    /// What one user may send through one shard's connections, all of them together.
    pub send_per_user: SendRateSection,
    /// Signals one connection may send per second, and at once after a quiet time (0: no
    /// limit). Each signal costs a message per connection of its recipient; beyond it signals
    /// are dropped and the connection is not read until the budget refills.
    pub signals_per_connection_per_sec: u64,
    pub signals_per_connection_burst: u64,
    /// `Ack`, `Sync` and `Ping` frames one connection may send per second, and at once (0: no
    /// limit); beyond it the connection is not read until the budget refills. The SDK acks at
    /// most every 25 ms.
    pub control_frames_per_connection_per_sec: u64,
    pub control_frames_per_connection_burst: u64,
    /// Distinct recipients one user may send to per `recipients_window_secs` on one shard
    /// (0: no limit). Beyond it: `Overloaded`. Every recipient ever addressed keeps a record.
    pub recipients_per_user_per_window_max: usize,
    pub recipients_window_secs: u64,
    /// Refuse sends to users that never logged in (`BadRecipient`, not retryable), so no
    /// inbox record is made for an id nobody uses. The edge's directory is its device
    /// records. Off: apps may message users before their first login.
    pub recipients_must_exist: bool,
    /// The handshake and `Hello` must be done this long after a connection's first packet.
    pub hello_timeout_ms: u64,
    /// A frame whose first bytes arrived must be complete this long after.
    pub frame_timeout_ms: u64,
    /// Connections of one shard that have not said a valid `Hello` (handshakes included);
    /// beyond it new connections are refused.
    pub unauthenticated_connections_per_shard_max: usize,
    /// Above this many unauthenticated connections on a shard, a new client must first prove
    /// its address with a QUIC Retry (one more round trip, no state kept for spoofed floods).
    pub retry_above_unauthenticated: usize,
    /// Connections from one IP address (an IPv6 /64) on one shard whose handshake is in
    /// progress or whose `Hello` was not accepted yet; beyond it new ones are refused.
    pub handshakes_per_address_max: usize,
    /// The edge's memory ceiling in bytes: above 90% of it new connections and sends are
    /// refused until it is back under 80%. 0: 75% of the machine's memory (or of the
    /// container's limit). docs/security.md gives the formula to size the other limits by.
    pub memory_bytes_max: u64,
}

/// A token bucket in messages and in body bytes. A `_per_sec` of 0 means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRateSection {
    pub messages_per_sec: u64,
    /// Messages that may be sent at once after a quiet time.
    pub messages_burst: u64,
    pub bytes_per_sec: u64,
    /// At least one maximal frame (66560).
    pub bytes_burst: u64,
}

impl SendRateSection {
    pub fn budget(&self) -> courier_core::budget::SendBudget {
        use courier_core::budget::{Rate, SendBudget};
        SendBudget {
            messages: Rate {
                per_sec: self.messages_per_sec,
                burst: self.messages_burst,
            },
            bytes: Rate {
                per_sec: self.bytes_per_sec,
                burst: self.bytes_burst,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuicSection {
    /// Close a connection after this long without traffic.
    pub idle_timeout_ms: u64,
    /// Bytes the peer may send on one stream before we read them.
    pub stream_receive_window_bytes: u32,
    /// Bytes the peer may send on the whole connection before we read them.
    pub receive_window_bytes: u32,
    /// Bytes we may have unacknowledged towards one peer.
    pub send_window_bytes: u64,
    /// Path MTU discovery (costs ~28% of handshake CPU; loopback and most paths do fine
    /// without it).
    pub mtu_discovery: bool,
    /// How long clients may delay acknowledging our packets (QUIC ACK frequency extension):
    /// longer lets their next packet carry the acknowledgement instead of a datagram of its
    /// own, shorter recovers a lost packet sooner.
    pub client_ack_delay_ms: u64,
}

/// Highest `quic.idle_timeout_ms`. Far past any use, and below where quinn takes a value (it
/// replaced larger ones with its default, silently).
const IDLE_TIMEOUT_MS_MAX: u64 = 3_600_000;
/// Highest `retention.erase_within_secs`: a year. Larger values overflowed the erase timer's
/// deadline, and the shard panicked.
const ERASE_WITHIN_SECS_MAX: u64 = 365 * 24 * 3600;
/// Highest `retention.expiry_interval_secs`: a day (larger overflowed the timer, as above).
const EXPIRY_INTERVAL_SECS_MAX: u64 = 24 * 3600;

/// The longest acknowledgement delay the edge asks of its peers. A lost packet is resent
/// after a probe timeout that includes it, and quinn stretches the idle timeout to three probe
/// timeouts. Links accepted from other edges get the same request (the edge cannot tell them
/// from clients before the handshake): at 1 s, on a path whose srtt + 4 × rttvar stays under
/// about 650 ms (a data centre), they still notice a dead peer within their 5 s idle timeout.
/// Their replies (a forwarded send's result) are resent up to the delay later when lost.
const CLIENT_ACK_DELAY_MS_MAX: u64 = 1000;
/// The largest dedupe filter budget per shard (`store.dedupe_filter_bytes_max`): 1 GiB answers
/// ~99% of lookups over a day of ~400 million sends, beyond what a shard commits.
const DEDUPE_FILTER_BYTES_MAX_LIMIT: usize = 1 << 30;
/// The config file's key for a field of `CoreConfig` (`Config::core_config`), so that a
/// refusal names what the operator wrote, not the field it became.
fn toml_key_of_core_field(field: &'static str) -> &'static str {
    match field {
        "retention_ms" => "retention.message_retention_secs",
        "dedupe_window_ms" => "retention.dedupe_window_secs",
        "expiry_bucket_ms" => {
            "retention.expiry_bucket_secs (at most retention.message_retention_secs)"
        }
        "batch_requests_max" => "batching.batch_requests_max",
        "batch_bytes_max" => "batching.batch_bytes_max",
        "queue_requests_max" => "batching.queue_requests_max",
        "queue_bytes_max" => "batching.queue_bytes_max",
        "queue_requests_per_sender_max" => "batching.queue_requests_per_sender_max",
        "queue_bytes_per_sender_max" => "batching.queue_bytes_per_sender_max",
        "commit_slow_ms" => "batching.commit_slow_ms",
        "ack_commit_delay_ms" => "batching.ack_commit_delay_ms",
        "batches_in_flight_max" => "batching.batches_in_flight_max",
        "expire_scan_keys_max/sync_messages_max" => {
            "retention.expire_scan_keys_max or batching.sync_messages_max"
        }
        other => other,
    }
}

/// `batching.receive_linger_us` by default (decision 0042).
const RECEIVE_LINGER_US_DEFAULT: u64 = 0;
/// Highest `batching.receive_linger_us`: a send's datagram may wait this long before the
/// shard reads it, which adds to its delivery's latency.
const RECEIVE_LINGER_US_MAX: u64 = 10_000;

/// Lowest `retention.dedupe_window_secs` (see `Config::validate_on`).
const DEDUPE_WINDOW_SECS_MIN: u64 = 600;

/// Highest `server.shutdown_grace_secs`: a stop that takes longer is a hung edge.
const SHUTDOWN_GRACE_SECS_LIMIT: u64 = 600;
/// The largest socket buffer asked for: the kernel takes the size as a C `int`, and socket2
/// casts without a check (4 GiB became 0, the kernel's minimum).
const SOCKET_BUFFER_BYTES_LIMIT: usize = 1 << 30;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSection {
    /// Undelivered messages are deleted this long after they were sent.
    pub message_retention_secs: u64,
    /// Retries with the same client id are deduplicated for at least this long.
    pub dedupe_window_secs: u64,
    /// Expiry granularity: messages are deleted at most this late.
    pub expiry_bucket_secs: u64,
    /// How often the expiry pass runs.
    pub expiry_interval_secs: u64,
    /// Keys one expiry pass may read (one transaction; FoundationDB needs it at most 2000).
    pub expire_scan_keys_max: usize,
    /// An acknowledged or expired message body is gone from every file of the embedded store
    /// within this long (an erase pass runs every half of it).
    pub erase_within_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingSection {
    pub batch_requests_max: usize,
    pub batch_bytes_max: usize,
    pub queue_requests_max: usize,
    pub queue_bytes_max: usize,
    /// One sender's share of a shard's queue: beyond it its sends get `Overloaded`.
    pub queue_requests_per_sender_max: usize,
    pub queue_bytes_per_sender_max: usize,
    pub sync_messages_max: usize,
    /// How long acks wait before they are committed, so that a device's acks share one
    /// cursor write; they ride in the first batch after the delay or make their own.
    pub ack_commit_delay_ms: u64,
    /// A commit running longer than this opens a circuit breaker: new sends get the
    /// retryable `StoreUnavailable` until it completes, instead of queueing behind a slow store.
    pub commit_slow_ms: u64,
    /// Batches a shard has in flight: 2 writes the next while the previous one's fsync runs
    /// (the log engine, decision 0027); 1 commits one at a time.
    pub batches_in_flight_max: usize,
    /// How long a shard leaves datagrams in its socket after a wake-up, so that those arriving
    /// meanwhile share the next one (and their sends one commit): each datagram waits at most
    /// this long. 0 wakes for every datagram. Paused for a while when a round of lingers
    /// gathered fewer than 1.5 datagrams each, or one gathered a burst (decision 0042).
    pub receive_linger_us: u64,
}

impl Default for ServerSection {
    fn default() -> ServerSection {
        ServerSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 4433)),
            data_dir: PathBuf::from("./courier-data"),
            shards: 0,
            pin_shards: true,
            socket_buffer_bytes: 4 * 1024 * 1024,
            store_writer_nice: -10,
            shutdown_grace_secs: 10,
        }
    }
}

impl Default for TlsSection {
    fn default() -> TlsSection {
        TlsSection {
            cert_path: PathBuf::new(),
            key_path: PathBuf::new(),
            session_cache_entries: 100_000,
            sessions_survive_restart: true,
        }
    }
}

impl Default for AuthSection {
    fn default() -> AuthSection {
        AuthSection {
            signing_key_path: PathBuf::new(),
            signing_key_id: 1,
            verified_tokens_per_shard_max: 8192,
            verify_keys: Vec::new(),
        }
    }
}

impl Default for LimitsSection {
    fn default() -> LimitsSection {
        LimitsSection {
            connections_per_shard_max: 100_000,
            connections_per_user_max: 16,
            sends_in_flight_per_connection_max: 256,
            outbound_bytes_per_connection_max: 1024 * 1024,
            deliveries_unacked_per_connection_max: 1024,
            datagrams_per_wakeup_max: 256,
            mesh_channel_messages_max: 4096,
            store_reads_queued_max: 64,
            send_bytes_in_flight_per_connection_max: 1024 * 1024,
            send_per_connection: SendRateSection {
                messages_per_sec: 2_000,
                messages_burst: 4_000,
                bytes_per_sec: 1024 * 1024,
                bytes_burst: 1024 * 1024,
            },
            send_per_user: SendRateSection {
                messages_per_sec: 4_000,
                messages_burst: 8_000,
                bytes_per_sec: 2 * 1024 * 1024,
                bytes_burst: 2 * 1024 * 1024,
            },
            signals_per_connection_per_sec: 50,
            signals_per_connection_burst: 100,
            control_frames_per_connection_per_sec: 1_000,
            control_frames_per_connection_burst: 2_000,
            recipients_per_user_per_window_max: 1_000,
            recipients_window_secs: 60,
            recipients_must_exist: false,
            hello_timeout_ms: 10_000,
            frame_timeout_ms: 10_000,
            unauthenticated_connections_per_shard_max: 4_096,
            retry_above_unauthenticated: 512,
            handshakes_per_address_max: 1_024,
            memory_bytes_max: 0,
        }
    }
}

impl Default for QuicSection {
    fn default() -> QuicSection {
        QuicSection {
            idle_timeout_ms: 30_000,
            stream_receive_window_bytes: 256 * 1024,
            receive_window_bytes: 1024 * 1024,
            send_window_bytes: 1024 * 1024,
            mtu_discovery: false,
            client_ack_delay_ms: 25,
        }
    }
}

impl Default for RetentionSection {
    fn default() -> RetentionSection {
        let core = CoreConfig::default();
        RetentionSection {
            message_retention_secs: core.retention_ms / 1000,
            dedupe_window_secs: core.dedupe_window_ms / 1000,
            expiry_bucket_secs: core.expiry_bucket_ms / 1000,
            expiry_interval_secs: 60,
            expire_scan_keys_max: core.expire_scan_keys_max,
            erase_within_secs: 3600,
        }
    }
}

impl Default for BatchingSection {
    fn default() -> BatchingSection {
        let core = CoreConfig::default();
        BatchingSection {
            batch_requests_max: core.batch_requests_max,
            batch_bytes_max: core.batch_bytes_max,
            queue_requests_max: core.queue_requests_max,
            queue_bytes_max: core.queue_bytes_max,
            queue_requests_per_sender_max: core.queue_requests_per_sender_max,
            queue_bytes_per_sender_max: core.queue_bytes_per_sender_max,
            sync_messages_max: core.sync_messages_max,
            ack_commit_delay_ms: core.ack_commit_delay_ms,
            commit_slow_ms: core.commit_slow_ms,
            batches_in_flight_max: core.batches_in_flight_max,
            receive_linger_us: RECEIVE_LINGER_US_DEFAULT,
        }
    }
}

/// A configuration that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {origin}: {key}: {expected}")]
    Invalid {
        origin: String,
        key: &'static str,
        expected: String,
    },
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        config.validate(&path.display().to_string())?;
        Ok(config)
    }

    /// Parses TOML text; the error names the key and line (toml's message does).
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|error| error.to_string().trim_end().to_string())
    }

    /// The default configuration as TOML, with every key.
    pub fn default_toml() -> String {
        let body =
            toml::to_string_pretty(&Config::default()).expect("the default config serialises");
        format!(
            "# Courier edge configuration. Every key is shown with its default.\n\
             # Docs: docs/configuration.md. Check a file with `courier-edge check-config PATH`.\n\n{body}"
        )
    }

    /// Checks every value and the relations between them.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        self.validate_on(origin, false)
    }

    /// [`Config::validate`] for an edge whose store every edge shares whatever `[store]` says
    /// (`server::EdgeStore::SharedMemory`, in tests): takeover is allowed on it.
    pub fn validate_on(&self, origin: &str, shared_store: bool) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, expected: &str| {
            Err(ConfigError::Invalid {
                origin: origin.to_string(),
                key,
                expected: expected.to_string(),
            })
        };
        if let Err(expected) = self.metrics.listen_addr() {
            return invalid("metrics.listen", &expected);
        }
        if self.log.format.parse::<LogFormat>().is_err() {
            return invalid("log.format", "\"text\" or \"json\"");
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.filter).is_err() {
            return invalid(
                "log.filter",
                "a RUST_LOG-style filter, like \"info\" or \"courier_edge=debug,info\"",
            );
        }
        if self.server.shards > 255 {
            return invalid(
                "server.shards",
                "at most 255 (the shard id is one byte of every connection id)",
            );
        }
        if self.server.listen.port() == 0 {
            return invalid(
                "server.listen",
                "an address with a port other than 0: every shard would bind a random port of \
                 its own, and clients could find none",
            );
        }
        if !(64 * 1024..=SOCKET_BUFFER_BYTES_LIMIT).contains(&self.server.socket_buffer_bytes) {
            return invalid(
                "server.socket_buffer_bytes",
                "from 65536 to 1073741824 (1 GiB; the kernel takes the size as a 32-bit int)",
            );
        }
        if !(-20..=19).contains(&self.server.store_writer_nice) {
            return invalid(
                "server.store_writer_nice",
                "a nice value from -20 to 19 (0 leaves the writer at the process's priority)",
            );
        }
        if !(1..=SHUTDOWN_GRACE_SECS_LIMIT).contains(&self.server.shutdown_grace_secs) {
            return invalid(
                "server.shutdown_grace_secs",
                "from 1 to 600 seconds, below the supervisor's stop timeout (systemd \
                 TimeoutStopSec, Kubernetes terminationGracePeriodSeconds)",
            );
        }
        let filter_bytes = self.store.dedupe_filter_bytes_max;
        if filter_bytes != 0 && !(64 * 1024..=DEDUPE_FILTER_BYTES_MAX_LIMIT).contains(&filter_bytes)
        {
            return invalid(
                "store.dedupe_filter_bytes_max",
                "0 (off) or from 65536 (64 KiB) to 1073741824 (1 GiB) per shard",
            );
        }
        if !STORE_ENGINES.contains(&self.store.engine.as_str()) {
            return invalid("store.engine", "\"fjall\" or \"log\"");
        }
        if self.store.log_memory_bytes_max < 16 * 1024 * 1024 {
            return invalid(
                "store.log_memory_bytes_max",
                "at least 16777216 (16 MiB) per shard",
            );
        }
        let segment = self.store.log_journal_segment_bytes;
        if segment != 0 && !(1024 * 1024..=1024 * 1024 * 1024).contains(&segment) {
            return invalid(
                "store.log_journal_segment_bytes",
                "0 (journals append) or from 1048576 (1 MiB) to 1073741824 (1 GiB)",
            );
        }
        if !(1..=8).contains(&self.store.fjall_worker_threads) {
            return invalid("store.fjall_worker_threads", "from 1 to 8 per shard");
        }
        let dedupe = self.store.log_dedupe_memory_bytes_max;
        if !(1024 * 1024..=1024 * 1024 * 1024).contains(&dedupe) {
            return invalid(
                "store.log_dedupe_memory_bytes_max",
                "from 1048576 (1 MiB) to 1073741824 (1 GiB) per shard",
            );
        }
        // Sends are refused from 90% of the bound; the last tenth must hold what is already
        // queued, or batches carrying acks fail on the bound with those sends.
        if self.store.engine == "log"
            && self.store.log_memory_bytes_max / 10 < self.batching.queue_bytes_max as u64
        {
            return invalid(
                "store.log_memory_bytes_max",
                "at least ten times batching.queue_bytes_max (the last tenth of the bound holds \
                 the sends already queued when the shard starts refusing new ones)",
            );
        }
        if self.tls.cert_path.as_os_str().is_empty() != self.tls.key_path.as_os_str().is_empty() {
            return invalid(
                "tls.cert_path/tls.key_path",
                "both set, or both empty for the development certificate",
            );
        }
        if self.batching.receive_linger_us > RECEIVE_LINGER_US_MAX {
            return invalid(
                "batching.receive_linger_us",
                "at most 10000 (10 ms): every datagram may wait this long; 0 turns it off",
            );
        }
        if self.tls.session_cache_entries == 0 {
            return invalid("tls.session_cache_entries", "at least 1");
        }
        let limits = &self.limits;
        for (key, value) in [
            (
                "limits.connections_per_shard_max",
                limits.connections_per_shard_max,
            ),
            (
                "limits.connections_per_user_max",
                limits.connections_per_user_max,
            ),
            (
                "limits.sends_in_flight_per_connection_max",
                limits.sends_in_flight_per_connection_max,
            ),
            (
                "limits.datagrams_per_wakeup_max",
                limits.datagrams_per_wakeup_max,
            ),
            (
                "limits.mesh_channel_messages_max",
                limits.mesh_channel_messages_max,
            ),
            (
                "limits.deliveries_unacked_per_connection_max",
                limits.deliveries_unacked_per_connection_max,
            ),
            (
                "limits.store_reads_queued_max",
                limits.store_reads_queued_max,
            ),
            (
                "limits.unauthenticated_connections_per_shard_max",
                limits.unauthenticated_connections_per_shard_max,
            ),
            (
                "limits.handshakes_per_address_max",
                limits.handshakes_per_address_max,
            ),
        ] {
            if value == 0 {
                return invalid(key, "at least 1");
            }
        }
        if limits.outbound_bytes_per_connection_max < 2 * courier_protocol::FRAME_BYTES_MAX {
            return invalid(
                "limits.outbound_bytes_per_connection_max",
                "at least two maximal frames (133120 bytes)",
            );
        }
        if limits.send_bytes_in_flight_per_connection_max < courier_protocol::FRAME_BYTES_MAX {
            return invalid(
                "limits.send_bytes_in_flight_per_connection_max",
                "at least one maximal frame (66560 bytes)",
            );
        }
        for (key, rate) in [
            ("limits.send_per_connection", limits.send_per_connection),
            ("limits.send_per_user", limits.send_per_user),
        ] {
            if rate.messages_per_sec > 0 && rate.messages_burst == 0 {
                return invalid(
                    key,
                    "messages_burst of at least 1 when messages_per_sec is set",
                );
            }
            if rate.bytes_per_sec > 0 && rate.bytes_burst < courier_protocol::FRAME_BYTES_MAX as u64
            {
                return invalid(
                    key,
                    "bytes_burst of at least one maximal frame (66560) when bytes_per_sec is set",
                );
            }
        }
        for (key, per_sec, burst) in [
            (
                "limits.signals_per_connection_burst",
                limits.signals_per_connection_per_sec,
                limits.signals_per_connection_burst,
            ),
            (
                "limits.control_frames_per_connection_burst",
                limits.control_frames_per_connection_per_sec,
                limits.control_frames_per_connection_burst,
            ),
        ] {
            if per_sec > 0 && burst == 0 {
                return invalid(key, "at least 1 when the matching _per_sec is set");
            }
        }
        if limits.memory_bytes_max != 0 && limits.memory_bytes_max < 64 * 1024 * 1024 {
            return invalid(
                "limits.memory_bytes_max",
                "0 (automatic) or at least 67108864 (64 MiB)",
            );
        }
        if limits.recipients_window_secs == 0 {
            return invalid("limits.recipients_window_secs", "at least 1");
        }
        if limits.hello_timeout_ms < 100 || limits.frame_timeout_ms < 100 {
            return invalid(
                "limits.hello_timeout_ms/limits.frame_timeout_ms",
                "at least 100 (a client on a slow network needs a few round trips)",
            );
        }
        if !(1000..=IDLE_TIMEOUT_MS_MAX).contains(&self.quic.idle_timeout_ms) {
            return invalid(
                "quic.idle_timeout_ms",
                "between 1000 and 3600000 (an hour; QUIC keep-alives hold a live connection \
                 open whatever it is)",
            );
        }
        if !(1..=CLIENT_ACK_DELAY_MS_MAX).contains(&self.quic.client_ack_delay_ms) {
            return invalid(
                "quic.client_ack_delay_ms",
                "between 1 and 1000 (a lost packet waits this long more to be resent)",
            );
        }
        if (self.quic.stream_receive_window_bytes as usize) < courier_protocol::FRAME_BYTES_MAX + 4
        {
            return invalid(
                "quic.stream_receive_window_bytes",
                "at least one maximal frame (66564 bytes)",
            );
        }
        // Below one maximal frame quinn blocks every stream write that would pass it: a
        // window of 0 let handshakes finish and then sent no reply at all.
        if (self.quic.send_window_bytes as usize) < courier_protocol::FRAME_BYTES_MAX + 4 {
            return invalid(
                "quic.send_window_bytes",
                "at least one maximal frame (66564 bytes)",
            );
        }
        if self.quic.receive_window_bytes < self.quic.stream_receive_window_bytes {
            return invalid(
                "quic.receive_window_bytes",
                "at least quic.stream_receive_window_bytes",
            );
        }
        if self.retention.dedupe_window_secs < DEDUPE_WINDOW_SECS_MIN {
            // A send is stored once only within the window: a client retrying across
            // reconnects (backoff up to seconds), or a 0-RTT first flight an attacker replays
            // later, must fall inside it, or it is stored again.
            return invalid(
                "retention.dedupe_window_secs",
                "at least 600 (10 minutes): retries and replayed 0-RTT sends must fall inside it",
            );
        }
        if !(2..=ERASE_WITHIN_SECS_MAX).contains(&self.retention.erase_within_secs) {
            return invalid(
                "retention.erase_within_secs",
                "between 2 and 31536000 (a year)",
            );
        }
        if !(1..=EXPIRY_INTERVAL_SECS_MAX).contains(&self.retention.expiry_interval_secs) {
            return invalid(
                "retention.expiry_interval_secs",
                "between 1 and 86400 (a day)",
            );
        }
        if let Err((key, expected)) = self.cluster.validate() {
            return invalid(key, &expected);
        }
        let core = self.core_config();
        if let Err(error) = core.validate() {
            return Err(ConfigError::Invalid {
                origin: origin.to_string(),
                key: toml_key_of_core_field(error.field),
                expected: error.expected.to_string(),
            });
        }
        let store = self.store_config().map_err(|error| ConfigError::Invalid {
            origin: origin.to_string(),
            key: "store.kind",
            expected: error.to_string(),
        })?;
        if let Err(error) = store.validate(&core) {
            return Err(ConfigError::Invalid {
                origin: origin.to_string(),
                key: "store",
                expected: error.to_string(),
            });
        }
        let on_foundationdb = matches!(store, StoreConfig::FoundationDb(_));
        let shared = on_foundationdb || shared_store;
        if self.cluster.enabled() && on_foundationdb && self.cluster.edge_id >= EDGE_ID_FDB_MAX {
            return invalid(
                "cluster.edge_id",
                "below 2147483648 with FoundationDB (it names the edge's owner key)",
            );
        }
        if self.cluster.enabled() && self.cluster.takeover && !shared {
            return invalid(
                "cluster.takeover",
                "false unless store.kind = \"foundationdb\": a successor can serve a dead \
                 edge's users only from a store every edge shares",
            );
        }
        Ok(())
    }

    /// The store the core runs on, from the `[store]` section.
    pub fn store_config(
        &self,
    ) -> Result<StoreConfig, courier_core::store::config::StoreConfigError> {
        Ok(match self.store.kind.parse::<StoreKind>()? {
            StoreKind::Embedded => StoreConfig::Embedded {
                dir: self.store_dir(),
            },
            StoreKind::FoundationDb => {
                let fdb = &self.store.foundationdb;
                StoreConfig::FoundationDb(FdbConfig {
                    cluster_files: fdb.cluster_files.clone(),
                    key_prefix: fdb.key_prefix.as_bytes().to_vec(),
                    transaction_timeout_ms: fdb.transaction_timeout_ms,
                    retry_delay_ms_max: fdb.retry_delay_ms_max,
                    transaction_bytes_max: fdb.transaction_bytes_max,
                })
            }
        })
    }

    /// The core's configuration, from the retention and batching sections.
    pub fn core_config(&self) -> CoreConfig {
        CoreConfig {
            retention_ms: self.retention.message_retention_secs.saturating_mul(1000),
            dedupe_window_ms: self.retention.dedupe_window_secs.saturating_mul(1000),
            expiry_bucket_ms: self.retention.expiry_bucket_secs.saturating_mul(1000),
            batch_requests_max: self.batching.batch_requests_max,
            batch_bytes_max: self.batching.batch_bytes_max,
            queue_requests_max: self.batching.queue_requests_max,
            queue_bytes_max: self.batching.queue_bytes_max,
            queue_requests_per_sender_max: self.batching.queue_requests_per_sender_max,
            queue_bytes_per_sender_max: self.batching.queue_bytes_per_sender_max,
            sync_messages_max: self.batching.sync_messages_max,
            ack_commit_delay_ms: self.batching.ack_commit_delay_ms,
            commit_slow_ms: self.batching.commit_slow_ms,
            batches_in_flight_max: self.batching.batches_in_flight_max,
            recipients_must_exist: self.limits.recipients_must_exist,
            expire_scan_keys_max: self.retention.expire_scan_keys_max,
            ..CoreConfig::default()
        }
    }

    /// Shards to run: the configured count, or one per available core.
    pub fn shard_count(&self) -> u32 {
        if self.server.shards > 0 {
            return self.server.shards;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get().min(255) as u32)
    }

    /// Messages in each cross-shard channel: `limits.mesh_channel_messages_max`, less with
    /// many shards so that one shard's channels hold at most [`MESH_MESSAGES_PER_SHARD_MAX`]
    /// together (at 64 shards and 4,096 each, the n·(n−1) channels took gigabytes at start).
    pub fn mesh_channel_capacity(&self) -> usize {
        let peers = self.shard_count().saturating_sub(1).max(1) as usize;
        self.limits
            .mesh_channel_messages_max
            .min((MESH_MESSAGES_PER_SHARD_MAX / peers).max(MESH_CHANNEL_MESSAGES_MIN))
    }

    pub fn store_dir(&self) -> PathBuf {
        crate::stores::stores_dir(&self.server.data_dir)
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<LogFormat, String> {
        match text {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?} is not a log format: use text or json")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_round_trips_through_its_printed_form() {
        let printed = Config::default_toml();
        let parsed = Config::parse(&printed).expect("printed default parses");
        assert_eq!(parsed, Config::default());
        parsed.validate("default").expect("default is valid");
    }

    /// Validates the default config with each case's value set by `set`: accepted or not as
    /// the case says, and a refusal names `key`.
    fn check_accepted_values<T: Copy + std::fmt::Debug>(
        key: &str,
        cases: &[(T, bool)],
        set: impl Fn(&mut Config, T),
    ) {
        for &(value, accepted) in cases {
            let mut config = Config::default();
            set(&mut config, value);
            let result = config.validate("test.toml");
            assert_eq!(result.is_ok(), accepted, "{key} = {value:?}: {result:?}");
            if let Err(error) = result {
                assert!(error.to_string().contains(key), "{error}");
            }
        }
    }

    #[test]
    fn the_listen_port_is_not_0() {
        check_accepted_values(
            "server.listen",
            &[(0u16, false), (1, true), (4433, true)],
            |config, port| config.server.listen.set_port(port),
        );
    }

    /// A size past `c_int` wrapped to the kernel's minimum without a word.
    #[test]
    fn socket_buffers_fit_the_kernels_int() {
        check_accepted_values(
            "server.socket_buffer_bytes",
            &[
                (65_535usize, false),
                (65_536, true),
                (1 << 30, true),
                ((1 << 30) + 1, false),
                (1 << 32, false),
            ],
            |config, bytes| config.server.socket_buffer_bytes = bytes,
        );
    }

    /// Acks delete delivered messages: waiting longer than a minute only keeps them.
    #[test]
    fn acks_wait_at_most_a_minute() {
        check_accepted_values(
            "batching.ack_commit_delay_ms",
            &[(0u64, true), (60_000, true), (60_001, false)],
            |config, delay_ms| config.batching.ack_commit_delay_ms = delay_ms,
        );
    }

    #[test]
    fn client_ack_delay_is_between_1_ms_and_1_s() {
        check_accepted_values(
            "quic.client_ack_delay_ms",
            &[(0, false), (1, true), (1_000, true), (1_001, false)],
            |config, delay_ms| config.quic.client_ack_delay_ms = delay_ms,
        );
    }

    /// A shard's channels to the others hold at most `MESH_MESSAGES_PER_SHARD_MAX` messages
    /// together, so the mesh allocated at start grows with the shards, not their square.
    #[test]
    fn mesh_channels_shrink_as_shards_grow() {
        let capacity = |shards: u32, configured: usize| {
            let mut config = Config::default();
            config.server.shards = shards;
            config.limits.mesh_channel_messages_max = configured;
            config.mesh_channel_capacity()
        };
        assert_eq!(capacity(2, 4096), 4096);
        assert_eq!(capacity(17, 4096), 4096);
        assert_eq!(capacity(64, 4096), MESH_MESSAGES_PER_SHARD_MAX / 63);
        assert_eq!(capacity(255, 4096), MESH_MESSAGES_PER_SHARD_MAX / 254);
        assert_eq!(capacity(2, 2), 2, "a smaller configured channel stays");
        assert!(64 * 63 * capacity(64, 4096) <= 64 * MESH_MESSAGES_PER_SHARD_MAX);
    }

    #[test]
    fn send_window_holds_at_least_one_maximal_frame() {
        check_accepted_values(
            "quic.send_window_bytes",
            &[(0, false), (66_563, false), (66_564, true), (1 << 20, true)],
            |config, bytes| config.quic.send_window_bytes = bytes,
        );
    }

    #[test]
    fn store_writer_nice_is_a_nice_value() {
        check_accepted_values(
            "server.store_writer_nice",
            &[
                (-21, false),
                (-20, true),
                (0, true),
                (19, true),
                (20, false),
            ],
            |config, nice| config.server.store_writer_nice = nice,
        );
    }

    #[test]
    fn shutdown_grace_is_between_1_s_and_10_minutes() {
        check_accepted_values(
            "server.shutdown_grace_secs",
            &[(0, false), (1, true), (600, true), (601, false)],
            |config, secs| config.server.shutdown_grace_secs = secs,
        );
    }

    #[test]
    fn dedupe_filter_budget_is_off_or_between_64_kib_and_1_gib() {
        check_accepted_values(
            "store.dedupe_filter_bytes_max",
            &[
                (0, true),
                (1, false),
                (65_535, false),
                (65_536, true),
                (1 << 30, true),
                ((1 << 30) + 1, false),
            ],
            |config, bytes| config.store.dedupe_filter_bytes_max = bytes,
        );
    }

    /// `store.direct_writes` was `log_direct_writes` while it applied to the log engine
    /// alone: a config written then still means what it said.
    #[test]
    fn direct_writes_is_read_under_its_former_name() {
        for (text, expected) in [
            ("[store]\nlog_direct_writes = false\n", false),
            ("[store]\ndirect_writes = false\n", false),
            ("[store]\n", true),
        ] {
            let config = Config::parse(text).expect(text);
            assert_eq!(config.store.direct_writes, expected, "{text}");
        }
    }

    #[test]
    fn store_engine_is_fjall_or_log() {
        check_accepted_values(
            "store.engine",
            &[
                ("fjall", true),
                ("log", true),
                ("rocksdb", false),
                ("", false),
            ],
            |config, engine: &str| config.store.engine = engine.to_string(),
        );
        check_accepted_values(
            "store.log_memory_bytes_max",
            &[(0, false), ((16 << 20) - 1, false), (16 << 20, true)],
            |config, bytes| config.store.log_memory_bytes_max = bytes,
        );
        check_accepted_values(
            "store.log_journal_segment_bytes",
            &[
                (0, true),
                (1, false),
                ((1 << 20) - 1, false),
                (1 << 20, true),
                (1 << 30, true),
                ((1 << 30) + 1, false),
            ],
            |config, bytes| config.store.log_journal_segment_bytes = bytes,
        );
        check_accepted_values(
            "store.fjall_worker_threads",
            &[(0, false), (1, true), (2, true), (8, true), (9, false)],
            |config, threads| config.store.fjall_worker_threads = threads,
        );
        check_accepted_values(
            "store.log_dedupe_memory_bytes_max",
            &[
                (0, false),
                ((1 << 20) - 1, false),
                (1 << 20, true),
                (1 << 30, true),
                ((1 << 30) + 1, false),
            ],
            |config, bytes| config.store.log_dedupe_memory_bytes_max = bytes,
        );
        // On the log engine the bound's last tenth must hold a full send queue (16 MiB).
        check_accepted_values(
            "store.log_memory_bytes_max",
            &[
                (16 << 20, false),
                ((160 << 20) - 1, false),
                (160 << 20, true),
            ],
            |config, bytes| {
                config.store.engine = "log".into();
                config.store.log_memory_bytes_max = bytes;
            },
        );
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let error = Config::parse("[server]\nlisten_port = 5\n").unwrap_err();
        assert!(error.contains("listen_port"), "{error}");
    }

    #[test]
    fn bad_value_names_the_key_and_the_expectation() {
        let mut config = Config::default();
        config.limits.sends_in_flight_per_connection_max = 0;
        let error = config.validate("test.toml").unwrap_err().to_string();
        assert_eq!(
            error,
            "config test.toml: limits.sends_in_flight_per_connection_max: at least 1"
        );
    }

    #[test]
    fn foundationdb_without_the_feature_is_refused_with_the_rebuild_command() {
        let config = Config::parse("[store]\nkind = \"foundationdb\"\n").expect("parses");
        let error = config.validate("test.toml").unwrap_err().to_string();
        if cfg!(feature = "fdb") {
            assert!(error.contains("cluster"), "{error}");
        } else {
            assert!(error.contains("--features fdb"), "{error}");
        }
        let typo = Config::parse("[store]\nkind = \"fundationdb\"\n").expect("parses");
        let error = typo.validate("test.toml").unwrap_err().to_string();
        assert!(
            error.contains("expected \"embedded\" or \"foundationdb\""),
            "{error}"
        );
    }

    fn cluster_of_two() -> Config {
        let mut config = Config::default();
        config.cluster.edge_id = 1;
        config.cluster.ca_cert_path = "ca.pem".into();
        config.cluster.cert_path = "edge.pem".into();
        config.cluster.key_path = "edge.key".into();
        config.cluster.members = (1..=2)
            .map(|id| ClusterMember {
                id,
                client_address: format!("edge-{id}:4433"),
                link_address: SocketAddr::from(([127, 0, 0, 1], 4433 + id as u16)),
            })
            .collect();
        config
    }

    /// A value the core refuses is reported under the key the operator wrote.
    #[test]
    fn core_refusals_name_the_config_files_key() {
        let mut config = Config::default();
        config.retention.message_retention_secs = 0;
        let error = config.validate("test").unwrap_err().to_string();
        assert!(
            error.contains("retention.message_retention_secs"),
            "{error}"
        );
        let mut config = Config::default();
        config.batching.batches_in_flight_max = 3;
        let error = config.validate("test").unwrap_err().to_string();
        assert!(error.contains("batching.batches_in_flight_max"), "{error}");
        let mut config = Config::default();
        config.batching.receive_linger_us = RECEIVE_LINGER_US_MAX;
        config
            .validate("test")
            .expect("the highest linger is accepted");
        config.batching.receive_linger_us = RECEIVE_LINGER_US_MAX + 1;
        let error = config.validate("test").unwrap_err().to_string();
        assert!(error.contains("batching.receive_linger_us"), "{error}");
    }

    /// A dedupe window shorter than a client's retries (or a replayed 0-RTT send) can take
    /// would store a send twice: refused, naming the key.
    #[test]
    fn a_dedupe_window_under_ten_minutes_is_refused() {
        let mut config = Config::default();
        config.retention.dedupe_window_secs = 60;
        let error = config.validate("test").unwrap_err().to_string();
        assert!(error.contains("retention.dedupe_window_secs"), "{error}");
        config.retention.dedupe_window_secs = 600;
        config.validate("test").expect("ten minutes is enough");
    }

    /// Periods past what any deployment means are refused with their key: larger ones
    /// overflowed a timer's deadline and panicked the shard, or were replaced by quinn's
    /// default without a word.
    #[test]
    fn periods_past_their_bound_are_refused() {
        for (key, set) in [
            (
                "retention.erase_within_secs",
                (|c: &mut Config| c.retention.erase_within_secs = u64::MAX) as fn(&mut Config),
            ),
            ("retention.expiry_interval_secs", |c: &mut Config| {
                c.retention.expiry_interval_secs = u64::MAX / 2
            }),
            ("quic.idle_timeout_ms", |c: &mut Config| {
                c.quic.idle_timeout_ms = 1 << 62
            }),
        ] {
            let mut config = Config::default();
            set(&mut config);
            let error = config.validate("test").unwrap_err().to_string();
            assert!(error.contains(key), "{error}");
        }
        let mut config = Config::default();
        config.retention.erase_within_secs = ERASE_WITHIN_SECS_MAX;
        config.retention.expiry_interval_secs = EXPIRY_INTERVAL_SECS_MAX;
        config.quic.idle_timeout_ms = IDLE_TIMEOUT_MS_MAX;
        config
            .validate("test")
            .expect("the bounds themselves are valid");
    }

    #[test]
    fn membership_epoch_starts_at_one_and_members_are_bounded() {
        let mut config = cluster_of_two();
        assert_eq!(config.cluster.membership_epoch, 1);
        config.cluster.membership_epoch = 0;
        let error = config.validate("test").unwrap_err().to_string();
        assert!(error.contains("cluster.membership_epoch"), "{error}");
        config.cluster.membership_epoch = 2;
        config.validate("test").expect("a raised epoch is valid");
        let member = config.cluster.members[1].clone();
        config.cluster.members = (1..=courier_core::membership::MEMBERS_MAX as u32 + 1)
            .map(|id| ClusterMember {
                id,
                ..member.clone()
            })
            .collect();
        let error = config.validate("test").unwrap_err().to_string();
        assert!(error.contains("cluster.members"), "{error}");
    }

    /// Clients resolve a member's `client_address` as given (a redirect carries it): one
    /// without a port could be neither parsed nor looked up.
    #[test]
    fn a_members_client_address_names_a_port() {
        for (address, accepted) in [
            ("edge-2.example.com:4433", true),
            ("10.0.0.2:4433", true),
            ("[2001:db8::2]:4433", true),
            ("edge-2.example.com", false),
            (":4433", false),
            ("edge-2:0", false),
            ("edge-2:port", false),
            ("", false),
        ] {
            let mut config = cluster_of_two();
            config.cluster.members[1].client_address = address.to_string();
            let result = config.validate("test");
            assert_eq!(result.is_ok(), accepted, "{address:?}: {result:?}");
            if let Err(error) = result {
                assert!(
                    error.to_string().contains("cluster.members.client_address"),
                    "{error}"
                );
            }
        }
    }

    #[test]
    fn takeover_needs_a_shared_store_and_a_timeout_of_several_beats() {
        let mut config = cluster_of_two();
        config.validate("test").expect("a cluster of two is valid");
        config.cluster.takeover = true;
        let error = config.validate("test").unwrap_err().to_string();
        assert!(
            error.contains("cluster.takeover") && error.contains("foundationdb"),
            "{error}"
        );
        if !cfg!(feature = "fdb") {
            // Without the feature, store = "foundationdb" is refused before takeover is read.
            return;
        }
        config.store.kind = "foundationdb".into();
        config.store.foundationdb.cluster_files = vec!["a.cluster".into(), "b.cluster".into()];
        config.validate("test").expect("takeover on FoundationDB");
        config.cluster.lease_timeout_ms = 2 * config.cluster.lease_renew_ms;
        let error = config.validate("test").unwrap_err().to_string();
        assert!(error.contains("cluster.lease_renew_ms"), "{error}");
        config.cluster.lease_timeout_ms = 10_000;
        config.cluster.edge_id = EDGE_ID_FDB_MAX;
        config.cluster.members[0].id = EDGE_ID_FDB_MAX;
        let error = config.validate("test").unwrap_err().to_string();
        assert!(error.contains("cluster.edge_id"), "{error}");
    }

    #[test]
    fn example_config_in_deploy_matches_the_default() {
        // deploy/courier.toml is generated from the code; regenerate it with
        // `cargo run -p courier-edge -- print-default-config > deploy/courier.toml`.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/courier.toml");
        let text = std::fs::read_to_string(&path).expect("deploy/courier.toml exists");
        assert_eq!(
            text,
            Config::default_toml(),
            "deploy/courier.toml drifted from the code"
        );
    }
}
