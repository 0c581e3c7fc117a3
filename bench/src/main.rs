//! `courier-bench`: Courier's load generator and correctness checker.
//!
//! Workloads (`pairs`, `offline`, `connections`, `reconnect`, `restart`, `abuse`) run against an edge that is
//! already running (`--addr`, `--token-key`, `--cert`) or one it starts itself
//! (`--spawn-edge`: a child process of this binary on a temporary data directory). Every run
//! prints a table, a progress line while it runs, and with `--json PATH` one JSON object
//! (fields: docs/bench.md). Message workloads check what they measure: any lost message is a
//! non-zero exit.

mod abuse;
mod direct;
mod edge;
mod redis;
mod report;
mod workloads;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// The hidden first argument that makes this binary run `courier-edge` (for `--spawn-edge`).
pub const EDGE_SUBCOMMAND: &str = "__edge";

#[derive(Parser)]
#[command(
    name = "courier-bench",
    version,
    about = "Load generator and correctness checker for Courier"
)]
struct Cli {
    #[command(flatten)]
    target: TargetArgs,
    /// Write the run's results as one JSON object to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    #[command(subcommand)]
    workload: Workload,
}

/// Which edge to load.
#[derive(Args, Debug, Clone)]
pub struct TargetArgs {
    /// Start an edge on a temporary data directory, sign tokens with its key, stop it after.
    #[arg(long, global = true)]
    pub spawn_edge: bool,
    /// Start N edges as one cluster on loopback (docs/cluster.md) instead of one, and spread
    /// the clients over them by user: each is redirected to its user's home edge, and a send
    /// to a user of another edge crosses a link. The report's edge CPU and memory are the
    /// edges' sum. Not with `restart`.
    #[arg(long, global = true)]
    pub spawn_edges: Option<u32>,
    /// Shards of the spawned edge (0: one per core).
    #[arg(long, global = true, default_value_t = 0)]
    pub edge_shards: u32,
    /// Address of a running edge (ignored with --spawn-edge).
    #[arg(long, global = true, default_value = "127.0.0.1:4433")]
    pub addr: SocketAddr,
    /// The running edge's token-signing key file (base64 seed), to mint tokens.
    #[arg(
        long,
        global = true,
        default_value = "courier-data/keys/token-signing.key"
    )]
    pub token_key: PathBuf,
    /// Key id the edge knows the signing key by.
    #[arg(long, global = true, default_value_t = 1)]
    pub token_key_id: u32,
    /// PEM certificate of the running edge to trust.
    #[arg(long, global = true, default_value = "courier-data/tls/cert.pem")]
    pub cert: PathBuf,
    /// Name to check the edge's certificate against.
    #[arg(long, global = true, default_value = "localhost")]
    pub server_name: String,
    /// PID of the running edge, to report its CPU time and memory.
    #[arg(long, global = true)]
    pub edge_pid: Option<u32>,
    /// CPUs the spawned edge may run on, like `0` or `0,1` (default: any). With
    /// --bench-cpus on other CPUs, the two do not compete for a core.
    #[arg(long, global = true, value_parser = parse_cpus)]
    pub edge_cpus: Option<CpuList>,
    /// CPUs the load generator may run on, like `1` (default: any).
    #[arg(long, global = true, value_parser = parse_cpus)]
    pub bench_cpus: Option<CpuList>,
    /// A TOML file merged into the spawned edge's config, like a `[retention]` section with a
    /// short `erase_within_secs` or `[server]` with `store_writer_nice = 0` (the keys the load
    /// generator sets itself, `server.listen`, `data_dir`, `shards` and `pin_shards`, are refused).
    #[arg(long, global = true)]
    pub edge_config: Option<PathBuf>,
    /// QUIC acknowledgement delay in both directions, in ms (1 to 1000; default 25 both
    /// ways): the clients let the edge delay acknowledging their packets this long, and a
    /// spawned edge lets the clients delay theirs (`quic.client_ack_delay_ms`). A side that
    /// sends again within it carries the acknowledgement instead of an ACK-only datagram; a
    /// lost packet is resent up to this much later.
    #[arg(long, global = true)]
    pub ack_delay_ms: Option<u64>,
    /// Key type of the spawned edges' certificate: `ed25519` (default; what the edge
    /// generates) or `ecdsa-p256`, to compare a full handshake's cost in one binary.
    #[arg(long, global = true, value_enum)]
    pub edge_cert: Option<EdgeCert>,
}

/// `--edge-cert`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeCert {
    Ed25519,
    EcdsaP256,
}

impl EdgeCert {
    /// The key of `--edge-cert`, Ed25519 without it.
    pub fn key_of(choice: Option<EdgeCert>) -> courier_edge::tls::DevCertKey {
        match choice {
            None | Some(EdgeCert::Ed25519) => courier_edge::tls::DevCertKey::Ed25519,
            Some(EdgeCert::EcdsaP256) => courier_edge::tls::DevCertKey::EcdsaP256,
        }
    }
}

/// A list of CPU numbers (`--edge-cpus 0,1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

/// Parses a CPU list like `0,2,3`.
pub(crate) fn parse_cpus(text: &str) -> Result<CpuList, String> {
    let cpus = text
        .split(',')
        .map(|part| {
            part.trim()
                .parse::<usize>()
                .map_err(|_| format!("{part:?} is not a CPU number (expected a list like 0,1)"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Online CPUs of the machine, not of this process (whose CPU set may be pinned already).
    #[allow(unsafe_code)]
    // SAFETY: sysconf only reads a system value.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let available = usize::try_from(online).unwrap_or(1).max(1);
    match cpus.iter().find(|cpu| **cpu >= available) {
        Some(cpu) => Err(format!(
            "CPU {cpu} does not exist (this machine has {available})"
        )),
        None if cpus.is_empty() => Err("an empty CPU list".into()),
        None => Ok(CpuList(cpus)),
    }
}

/// Restricts this process (and the threads it starts afterwards) to `cpus`.
#[allow(unsafe_code)]
pub fn pin_to_cpus(cpus: &[usize]) -> Result<(), String> {
    // SAFETY: cpu_set_t is plain data, zeroed then filled by CPU_SET for CPUs below the
    // machine's count (checked by parse_cpus); sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in cpus {
            libc::CPU_SET(*cpu, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(format!(
                "cannot pin to CPUs {cpus:?}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Environment variable that carries `--edge-cpus` to the spawned edge process.
pub const EDGE_CPUS_ENV: &str = "COURIER_BENCH_EDGE_CPUS";

#[derive(Subcommand, Debug, Clone)]
pub enum Workload {
    /// N sender→receiver pairs, M messages each: closed loop (at most K unacknowledged sends
    /// per sender) or paced (R messages/s per sender).
    Pairs(workloads::PairsArgs),
    /// Receivers connect once and leave; senders send everything; receivers come back and
    /// drain. Reports the drain rate.
    Offline(workloads::PairsArgs),
    /// Hold N authenticated idle connections for T seconds; reports the edge's memory per
    /// connection when it knows the edge's process.
    Connections(workloads::ConnectionsArgs),
    /// A storm of reconnects, full handshakes then resumed sessions with 0-RTT: handshakes/s
    /// and the time from starting to connect until the first send is acknowledged.
    Reconnect(workloads::ReconnectArgs),
    /// QUIC handshakes alone: N connections, each closed as soon as its handshake is done
    /// (no Hello, no login): the edge's CPU per full (or --resumed) handshake, and the
    /// handshakes per second one edge core would make at that cost.
    Handshakes(workloads::HandshakesArgs),
    /// Kill the spawned edge with SIGKILL (or stop it with SIGTERM: --graceful) under N idle
    /// clients and restart it on the same data directory (optionally holding --fill
    /// undelivered messages): time to listening, and how soon each client is logged in again
    /// by itself. Needs --spawn-edge.
    Restart(workloads::RestartArgs),
    /// Attacks, each bounded in time, while a clean pair chats alongside: what the attacker
    /// achieved, the edge's memory, the clean pair's latency and losses (docs/security.md).
    Abuse(abuse::AbuseArgs),
    /// `pairs` against Redis Streams, fsyncing before every reply (the durable peer issue 10
    /// compares with): starts `redis-server` unless --redis-addr names one. Ignores the edge
    /// options; pin Redis with --server-cpus and the load generator with --bench-cpus.
    RedisPairs(redis::RedisArgs),
    /// `offline` against Redis Streams: senders add everything, then receivers drain it.
    RedisOffline(redis::RedisArgs),
}

fn main() -> ExitCode {
    let mut args = std::env::args_os();
    let program = args.next();
    let rest: Vec<_> = args.collect();
    if rest.first().is_some_and(|first| first == EDGE_SUBCOMMAND) {
        // Pin before the edge starts any thread: its shards inherit the CPU set.
        if let Ok(list) = std::env::var(EDGE_CPUS_ENV) {
            let pinned = parse_cpus(&list).and_then(|cpus| pin_to_cpus(&cpus.0));
            if let Err(error) = pinned {
                eprintln!("courier-edge (spawned by courier-bench): {error}");
                return ExitCode::from(2);
            }
        }
        let edge_args = std::iter::once("courier-edge".into()).chain(rest.into_iter().skip(1));
        return courier_edge::cli::main(edge_args);
    }
    let cli = Cli::parse_from(program.into_iter().chain(rest));
    let spawning = cli.target.spawn_edge || cli.target.spawn_edges.is_some();
    if cli.target.edge_cpus.is_some() && !spawning {
        eprintln!(
            "courier-bench: --edge-cpus needs --spawn-edge or --spawn-edges (pin a running edge with taskset)"
        );
        return ExitCode::from(2);
    }
    if cli.target.spawn_edge && cli.target.spawn_edges.is_some() {
        eprintln!("courier-bench: choose --spawn-edge (one edge) or --spawn-edges N (a cluster)");
        return ExitCode::from(2);
    }
    if cli.target.edge_cert.is_some() && !spawning {
        eprintln!(
            "courier-bench: --edge-cert needs --spawn-edge or --spawn-edges (a running edge has its own certificate)"
        );
        return ExitCode::from(2);
    }
    // Before the runtime starts its threads, so they inherit the CPU set.
    if let Some(cpus) = &cli.target.bench_cpus
        && let Err(error) = pin_to_cpus(&cpus.0)
    {
        eprintln!("courier-bench: {error}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("courier-bench: cannot start the runtime: {error}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("courier-bench: the checks failed (see above)");
            ExitCode::from(1)
        }
        Err(error) => {
            eprintln!("courier-bench: {error}");
            ExitCode::from(2)
        }
    }
}

/// Runs the workload; `Ok(false)` means it ran but a check failed.
async fn run(cli: Cli) -> Result<bool, String> {
    let peer = match &cli.workload {
        Workload::RedisPairs(args) => Some(redis::pairs(args, false).await?),
        Workload::RedisOffline(args) => Some(redis::pairs(args, true).await?),
        _ => None,
    };
    let mut report = match peer {
        Some(report) => report,
        None => run_on_edge(&cli).await?,
    };
    // The CPUs this process may run on (`--bench-cpus`, or an outer taskset).
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    report.note_load_generator_busy(cpus);
    report.note_per_delivered();
    report.print();
    if report.load_generator_saturated() {
        eprintln!(
            "courier-bench: the load generator kept its {cpus} CPU(s) at least {:.0}% busy: its \
             own queueing is in the latencies above. Give it more or quieter CPUs \
             (--bench-cpus), or fewer pairs or a lower --rate",
            report::LOAD_GENERATOR_BUSY_WARN * 100.0
        );
    }
    if let Some(path) = &cli.json {
        report.write_json(path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(report.passed())
}

/// Runs a workload on Courier's edge.
async fn run_on_edge(cli: &Cli) -> Result<report::Report, String> {
    let target = edge::Target::open(&cli.target).await?;
    let report = match &cli.workload {
        Workload::Pairs(args) if args.driver == workloads::Driver::Direct => {
            workloads::pairs_direct(&target, args, false).await?
        }
        Workload::Pairs(args) => workloads::pairs(&target, args, false).await?,
        Workload::Offline(args) if args.driver == workloads::Driver::Direct => {
            workloads::pairs_direct(&target, args, true).await?
        }
        Workload::Offline(args) => workloads::pairs(&target, args, true).await?,
        Workload::Connections(args) => workloads::connections(&target, args).await?,
        Workload::Reconnect(args) => workloads::reconnect(&target, args).await?,
        Workload::Handshakes(args) => workloads::handshakes(&target, args).await?,
        Workload::Restart(args) => workloads::restart(&target, args).await?,
        Workload::Abuse(args) => abuse::abuse(&target, args).await?,
        Workload::RedisPairs(_) | Workload::RedisOffline(_) => {
            return Err("peer workloads run without an edge".into());
        }
    };
    Ok(report)
}
