//! The edge under load: one this process spawned, or one already running.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use courier_client::{ConnectOptions, Connector};
use courier_protocol::token::{Claims, Role, SigningKey, mint, signing_key_from_base64};

use crate::report::Report;
use crate::{EdgeCert, TargetArgs};

/// How long a spawned edge may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything a workload needs to reach the edge and log in.
pub struct Target {
    pub addr: SocketAddr,
    /// Every edge clients connect to, spread by user (`--spawn-edges`: the cluster's edges;
    /// a client on an edge that is not its user's home is redirected there).
    addrs: Vec<SocketAddr>,
    /// Every spawned edge's PID, for their CPU time and memory together.
    pids: Vec<u32>,
    /// A spawned cluster's edges, stopped on drop.
    cluster: Vec<SpawnedEdge>,
    cert_pem: Vec<u8>,
    server_name: String,
    key: SigningKey,
    key_id: u32,
    pub pid: Option<u32>,
    /// Users of this run start above this, so runs against a long-lived edge do not mix.
    pub user_base: u64,
    spawned: Option<std::sync::Mutex<SpawnedEdge>>,
    /// `--ack-delay-ms`, for the clients' side.
    edge_ack_delay: Option<Duration>,
}

impl Target {
    pub async fn open(args: &TargetArgs) -> Result<Target, String> {
        let user_base = (u64::from(rand::random::<u32>()) + 1) << 20;
        if let Some(count) = args.spawn_edges {
            return Target::spawn_cluster(args, count, user_base);
        }
        if args.spawn_edge {
            let cpus = args.edge_cpus.as_ref().map(|cpus| cpus.0.as_slice());
            let extra = spawned_edge_extra(args)?;
            let spawned = SpawnedEdge::start(
                args.edge_shards,
                cpus,
                &extra,
                EdgeCert::key_of(args.edge_cert),
            )?;
            return Ok(Target {
                addr: spawned.addr,
                addrs: vec![spawned.addr],
                pids: vec![spawned.child.id()],
                cluster: Vec::new(),
                cert_pem: std::fs::read(spawned.data_dir().join("tls/cert.pem"))
                    .map_err(|e| format!("spawned edge wrote no certificate: {e}"))?,
                server_name: "localhost".into(),
                key: read_key(&spawned.data_dir().join("keys/token-signing.key"))?,
                key_id: 1,
                pid: Some(spawned.child.id()),
                user_base,
                spawned: Some(std::sync::Mutex::new(spawned)),
                edge_ack_delay: args.ack_delay_ms.map(Duration::from_millis),
            });
        }
        Ok(Target {
            addr: args.addr,
            addrs: vec![args.addr],
            pids: args.edge_pid.into_iter().collect(),
            cluster: Vec::new(),
            cert_pem: std::fs::read(&args.cert).map_err(|e| {
                format!(
                    "cannot read --cert {}: {e} (or use --spawn-edge)",
                    args.cert.display()
                )
            })?,
            server_name: args.server_name.clone(),
            key: read_key(&args.token_key)?,
            key_id: args.token_key_id,
            pid: args.edge_pid,
            user_base,
            spawned: None,
            edge_ack_delay: args.ack_delay_ms.map(Duration::from_millis),
        })
    }

    /// Starts `count` edges on loopback as one cluster (docs/cluster.md): a shared public
    /// certificate and token key, a cluster CA and a link certificate per edge, all generated
    /// in a temporary directory.
    fn spawn_cluster(args: &TargetArgs, count: u32, user_base: u64) -> Result<Target, String> {
        if count < 2 {
            return Err("--spawn-edges needs at least 2 edges (use --spawn-edge for one)".into());
        }
        let files =
            tempfile::tempdir().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let write = |name: &str, text: String| {
            let path = files.path().join(name);
            std::fs::write(&path, text)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            Ok::<String, String>(path.display().to_string())
        };
        let (public_cert_pem, public_key_pem) = courier_edge::tls::generate_dev_cert(
            EdgeCert::key_of(args.edge_cert),
            vec!["localhost".to_string()],
        )?;
        let public_cert = write("public.pem", public_cert_pem)?;
        let public_key = write("public.key", public_key_pem)?;
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let signing_key = write(
            "signing.key",
            courier_protocol::token::signing_key_to_base64(&key),
        )?;
        let ca_key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let mut ca_params =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).map_err(|e| e.to_string())?;
        let ca_cert = write("ca.pem", ca.pem())?;
        let members: Vec<(u32, SocketAddr)> = (1..=count)
            .map(|id| free_addr().map(|addr| (id, addr)))
            .collect::<Result<_, _>>()?;
        let mut member_tables = String::new();
        for (id, addr) in &members {
            member_tables += &format!(
                "\n[[cluster.members]]\nid = {id}\nclient_address = \"{addr}\"\nlink_address = \"{addr}\"\n"
            );
        }
        let extra = spawned_edge_extra(args)?;
        let cpus = args.edge_cpus.as_ref().map(|cpus| cpus.0.as_slice());
        let mut cluster = Vec::new();
        for (id, addr) in &members {
            let link_key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
            let mut params = rcgen::CertificateParams::new(vec!["courier-link".to_string()])
                .map_err(|e| e.to_string())?;
            params.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let link = params
                .signed_by(&link_key, &ca, &ca_key)
                .map_err(|e| e.to_string())?;
            let link_cert = write(&format!("link-{id}.pem"), link.pem())?;
            let link_key = write(&format!("link-{id}.key"), link_key.serialize_pem())?;
            let config = format!(
                "[tls]\ncert_path = \"{public_cert}\"\nkey_path = \"{public_key}\"\n\n\
                 [auth]\nsigning_key_path = \"{signing_key}\"\n\n\
                 [cluster]\nedge_id = {id}\nca_cert_path = \"{ca_cert}\"\n\
                 cert_path = \"{link_cert}\"\nkey_path = \"{link_key}\"\n{member_tables}\n"
            );
            let mut config: toml::Table = config
                .parse()
                .map_err(|e| format!("the cluster member's config: {e}"))?;
            merge_config(&mut config, extra.clone());
            cluster.push(SpawnedEdge::start_on(
                *addr,
                args.edge_shards,
                cpus,
                &config,
            )?);
        }
        // An edge started before its peers dialled them while they were not listening yet;
        // QUIC resends the first packet after 1 s and then 2 s. Wait that out, or a
        // workload's first sends meet links still opening (refused as retryable, retried).
        std::thread::sleep(Duration::from_secs(3));
        let pem = std::fs::read(files.path().join("public.pem"))
            .map_err(|e| format!("cannot read the public certificate: {e}"))?;
        let target = Target {
            addr: members[0].1,
            addrs: members.iter().map(|(_, addr)| *addr).collect(),
            pids: cluster.iter().map(|edge| edge.child.id()).collect(),
            cluster,
            cert_pem: pem,
            server_name: "localhost".into(),
            key,
            key_id: 1,
            pid: None,
            user_base,
            spawned: None,
            edge_ack_delay: args.ack_delay_ms.map(Duration::from_millis),
        };
        // The files (keys included) are read at start; the directory can go.
        drop(files);
        Ok(target)
    }

    /// CPU seconds and resident bytes of every edge under load, added up (`None` when no PID
    /// is known).
    pub fn edge_usage(&self) -> Option<(f64, u64)> {
        if self.pids.is_empty() {
            return None;
        }
        self.pids.iter().try_fold((0.0, 0), |(cpu, rss), pid| {
            process_usage(*pid).map(|(c, r)| (cpu + c, rss + r))
        })
    }

    /// Bytes the edge processes handed to `write` calls (`wchar` in /proc/PID/io: the store's
    /// journal, flushes and compactions; datagrams go by `sendmsg`, which it does not count),
    /// added up. (Not `write_bytes`: Linux 6.18 counts there the whole page-cache folio a
    /// write dirties, 2 MiB for one 300-byte journal append, while the disk is sent 4 KiB:
    /// see `disk_written_bytes` for what the disk got.)
    pub fn edge_write_call_bytes(&self) -> Option<u64> {
        if self.pids.is_empty() {
            return None;
        }
        self.pids.iter().try_fold(0, |wchar, pid| {
            let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
            let written: u64 = io
                .lines()
                .find_map(|line| line.strip_prefix("wchar:"))?
                .trim()
                .parse()
                .ok()?;
            Some(wchar + written)
        })
    }

    /// How many edges the clients are spread over (`--spawn-edges`: the cluster's).
    pub fn edge_count(&self) -> usize {
        self.addrs.len()
    }

    /// Starts counting the edges' context switches and their disk's writes
    /// (`ServerCounters`): every edge process, and the disk under the spawned edge's data
    /// directory (the first edge's, for a cluster on this machine).
    pub fn server_counters(&self) -> ServerCounters {
        let dir = match &self.spawned {
            Some(spawned) => spawned.lock().ok().map(|spawned| spawned.data_dir()),
            None => self.cluster.first().map(|edge| edge.data_dir()),
        };
        ServerCounters::start(self.pids.clone(), dir)
    }

    /// Bytes of the spawned edge's store on disk (`None` for an edge this process did not
    /// start).
    pub fn store_disk_bytes(&self) -> Option<u64> {
        let spawned = self.spawned.as_ref()?.lock().ok()?;
        Some(courier_edge::stores::allocated_bytes(
            &spawned.data_dir().join("stores"),
        ))
    }

    /// A token for `user`, valid for a day.
    pub fn token(&self, user: u64) -> String {
        self.device_token(user, 0)
    }

    /// A token for `device` of `user`, valid for a day.
    pub fn device_token(&self, user: u64, device: u32) -> String {
        let now_secs = courier_core::clock::wall_clock_ms() / 1000;
        mint(
            &self.key,
            &Claims {
                key_id: self.key_id,
                user,
                device,
                role: Role::Agent,
                expires_at_secs: now_secs + 86_400,
            },
        )
    }

    /// A connector with its own UDP socket and session cache.
    pub fn connector(&self) -> Result<Connector, String> {
        let connector = Connector::new(&self.cert_pem, &self.server_name)
            .and_then(|connector| {
                connector.with_key_exchange_groups(courier_edge::tls::key_exchange_groups())
            })
            .map_err(|e| e.to_string())?;
        match self.edge_ack_delay {
            Some(delay) => connector
                .with_edge_ack_delay(delay)
                .map_err(|e| format!("--ack-delay-ms: {e}")),
            None => Ok(connector),
        }
    }

    pub fn options(&self, user: u64) -> ConnectOptions {
        let addr = self.addrs[(user % self.addrs.len() as u64) as usize];
        ConnectOptions::new(addr, self.token(user), 0)
    }

    /// Kills the spawned edge with SIGKILL (`graceful`: stops it with SIGTERM and waits for
    /// its exit, as a deploy does) and starts it again on the same data directory. Returns
    /// the new PID and the time from spawning to its "listening" line.
    pub fn restart_edge(&self, graceful: bool) -> Result<(u32, Duration), String> {
        let spawned = self
            .spawned
            .as_ref()
            .ok_or("restarting needs --spawn-edge")?;
        let mut spawned = spawned.lock().map_err(|_| "edge lock poisoned")?;
        if graceful {
            let status = stop_with_sigterm(&mut spawned.child)?;
            if !status.success() {
                eprintln!("the edge's stop ended with {status} (docs/operations.md, Signals)");
            }
        } else {
            let _ = spawned.child.kill();
            let _ = spawned.child.wait();
        }
        let started = std::time::Instant::now();
        let child = spawn_and_wait(
            &spawned.config_path(),
            spawned.addr,
            spawned.cpus.as_deref(),
        )?;
        spawned.child = child;
        Ok((spawned.child.id(), started.elapsed()))
    }
}

/// Keys of `[server]` the harness sets itself: an `--edge-config` that sets them is refused.
const HARNESS_SERVER_KEYS: [&str; 4] = ["listen", "data_dir", "shards", "pin_shards"];

/// What a spawned edge's config gets besides its own sections: `--edge-config`, and the
/// edge's side of `--ack-delay-ms`, to be merged into them (`merge_config`).
fn spawned_edge_extra(args: &TargetArgs) -> Result<toml::Table, String> {
    let text = match &args.edge_config {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read --edge-config {}: {e}", path.display()))?,
        None => String::new(),
    };
    edge_extra_from(&text, args.ack_delay_ms)
}

fn edge_extra_from(text: &str, ack_delay_ms: Option<u64>) -> Result<toml::Table, String> {
    let mut extra: toml::Table = text
        .parse()
        .map_err(|e| format!("--edge-config is not a valid TOML file: {e}"))?;
    if let Some(server) = extra.get("server").and_then(toml::Value::as_table)
        && let Some(key) = HARNESS_SERVER_KEYS
            .iter()
            .find(|key| server.contains_key(**key))
    {
        return Err(format!(
            "--edge-config sets server.{key}, which the spawned edge gets from the load \
             generator (its address, a temporary data directory, --edge-shards, and shards \
             left unpinned for --edge-cpus): leave it out"
        ));
    }
    let Some(ms) = ack_delay_ms else {
        return Ok(extra);
    };
    let quic = extra
        .entry("quic")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(quic) = quic.as_table_mut() else {
        return Err("--edge-config: `quic` must be a section".into());
    };
    if quic.contains_key("client_ack_delay_ms") {
        return Err(
            "--ack-delay-ms and quic.client_ack_delay_ms in --edge-config: set one of them".into(),
        );
    }
    let ms = i64::try_from(ms).map_err(|_| format!("--ack-delay-ms {ms}: too large"))?;
    quic.insert("client_ack_delay_ms".into(), toml::Value::Integer(ms));
    Ok(extra)
}

/// The spawned edge's config file: the harness's `[server]` keys with `extra` merged in.
fn spawned_edge_config(
    addr: SocketAddr,
    data_dir: &std::path::Path,
    shards: u32,
    extra: &toml::Table,
) -> Result<String, String> {
    let mut server = toml::Table::new();
    server.insert("listen".into(), toml::Value::String(addr.to_string()));
    let data_dir = data_dir.to_str().ok_or_else(|| {
        format!(
            "the temporary directory {} is not UTF-8",
            data_dir.display()
        )
    })?;
    server.insert("data_dir".into(), toml::Value::String(data_dir.into()));
    server.insert("shards".into(), toml::Value::Integer(i64::from(shards)));
    server.insert("pin_shards".into(), toml::Value::Boolean(false));
    let mut config = toml::Table::new();
    config.insert("server".into(), toml::Value::Table(server));
    merge_config(&mut config, extra.clone());
    toml::to_string(&config).map_err(|e| format!("cannot write the edge config: {e}"))
}

/// Merges `from` into `into`: sections present in both are merged key by key, and a key of
/// `from` replaces the same key of `into`. So `--edge-config` can add keys to `[server]`, which
/// the harness writes too, where appending a second `[server]` would not parse.
fn merge_config(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(into_section)), toml::Value::Table(from_section)) => {
                merge_config(into_section, from_section);
            }
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

fn read_key(path: &std::path::Path) -> Result<SigningKey, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read --token-key {}: {e} (or use --spawn-edge)",
            path.display()
        )
    })?;
    signing_key_from_base64(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// An edge running as a child process of this binary, stopped on drop.
struct SpawnedEdge {
    child: Child,
    dir: tempfile::TempDir,
    addr: SocketAddr,
    /// `--edge-cpus`, as the list the child parses.
    cpus: Option<String>,
}

/// A loopback address whose UDP port was free a moment ago.
fn free_addr() -> Result<SocketAddr, String> {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|socket| socket.local_addr())
        .map_err(|e| format!("cannot find a free port: {e}"))?
        .port();
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

impl SpawnedEdge {
    /// Starts an edge on its development certificate, generated here with a `cert_key` key.
    fn start(
        shards: u32,
        cpus: Option<&[usize]>,
        extra: &toml::Table,
        cert_key: courier_edge::tls::DevCertKey,
    ) -> Result<SpawnedEdge, String> {
        let dir =
            tempfile::tempdir().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let tls = dir.path().join("data/tls");
        let (cert_pem, key_pem) =
            courier_edge::tls::generate_dev_cert(cert_key, vec!["localhost".into()])?;
        courier_edge::tls::write_dev_cert(
            &tls.join("cert.pem"),
            &tls.join("key.pem"),
            &cert_pem,
            &key_pem,
        )?;
        SpawnedEdge::start_in(dir, free_addr()?, shards, cpus, extra)
    }

    fn start_on(
        addr: SocketAddr,
        shards: u32,
        cpus: Option<&[usize]>,
        extra: &toml::Table,
    ) -> Result<SpawnedEdge, String> {
        let dir =
            tempfile::tempdir().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        SpawnedEdge::start_in(dir, addr, shards, cpus, extra)
    }

    fn start_in(
        dir: tempfile::TempDir,
        addr: SocketAddr,
        shards: u32,
        cpus: Option<&[usize]>,
        extra: &toml::Table,
    ) -> Result<SpawnedEdge, String> {
        let config_path = dir.path().join("courier.toml");
        let config = spawned_edge_config(addr, &dir.path().join("data"), shards, extra)?;
        std::fs::write(&config_path, config)
            .map_err(|e| format!("cannot write the edge config: {e}"))?;
        let cpus = cpus.map(|cpus| {
            cpus.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        });
        let child = spawn_and_wait(&config_path, addr, cpus.as_deref())?;
        eprintln!("spawned courier-edge (pid {}) on {addr}", child.id());
        Ok(SpawnedEdge {
            child,
            dir,
            addr,
            cpus,
        })
    }

    fn config_path(&self) -> std::path::PathBuf {
        self.dir.path().join("courier.toml")
    }

    fn data_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }
}

/// Starts the edge as a child of this binary and waits for its "listening" line.
fn spawn_and_wait(
    config_path: &std::path::Path,
    addr: SocketAddr,
    cpus: Option<&str>,
) -> Result<Child, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let mut command = Command::new(exe);
    if let Some(cpus) = cpus {
        command.env(crate::EDGE_CPUS_ENV, cpus);
    }
    let mut child = command
        .arg(crate::EDGE_SUBCOMMAND)
        .args(["serve", "--config"])
        .arg(config_path)
        .env("RUST_LOG", edge_log_filter())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the edge: {e}"))?;
    let stderr = child.stderr.take().ok_or("no stderr from the edge")?;
    let (ready_tx, ready_rx) = mpsc::channel();
    // With directives of their own, every line the edge writes is theirs to see.
    let forward_all = std::env::var_os("COURIER_BENCH_EDGE_LOG").is_some();
    std::thread::spawn(move || {
        let mut ready_tx = Some(ready_tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("courier-edge listening") {
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send(Ok(()));
                }
            } else if forward_all
                || line.contains("WARN")
                || line.contains("ERROR")
                || line.contains("courier-edge:")
                || line.contains("store opened")
            {
                eprintln!("edge: {line}");
                if line.contains("courier-edge:")
                    && let Some(tx) = ready_tx.take()
                {
                    let _ = tx.send(Err(line));
                }
            }
        }
    });
    match ready_rx.recv_timeout(START_TIMEOUT) {
        Ok(Ok(())) => Ok(child),
        Ok(Err(line)) => Err(format!("the spawned edge failed: {line}")),
        Err(_) => {
            let _ = child.kill();
            Err(format!("the spawned edge did not listen on {addr} in time"))
        }
    }
}

/// SIGTERM, then waits for the edge's exit: its default grace period and 2 s more (an
/// `--edge-config` raising it is cut short here), then SIGKILL.
fn stop_with_sigterm(child: &mut std::process::Child) -> Result<std::process::ExitStatus, String> {
    #[allow(unsafe_code)]
    // SAFETY: kill(2) with a PID we started and have not reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("the edge did not stop within 12 s of SIGTERM: killed".into());
            }
        }
    }
}

impl Drop for SpawnedEdge {
    fn drop(&mut self) {
        // SIGTERM: the edge finishes its commits and exits within its grace period
        // (`server.shutdown_grace_secs`, 10 s); everything acknowledged is on disk already.
        let _ = stop_with_sigterm(&mut self.child);
    }
}

/// What a server's run cost beyond CPU time, counted from `start` to `finish`: its threads'
/// context switches and the bytes its disk was sent. For the edge (`Target::server_counters`)
/// and for the Redis the bench starts alike.
#[derive(Debug)]
pub struct ServerCounters {
    pids: Vec<u32>,
    disk_dir: Option<std::path::PathBuf>,
    threads_start: Option<HashMap<(u32, u32), ThreadUsage>>,
    disk_start: Option<u64>,
    /// The disk's flush latency just before the run (`disk_flush_p50_us`, `_p90_us`).
    disk_flush: Option<courier_core::store::flush_probe::FlushLatency>,
}

impl ServerCounters {
    pub fn start(pids: Vec<u32>, disk_dir: Option<std::path::PathBuf>) -> ServerCounters {
        // A commit waits for one flush, so the disk's speed at the hour is part of every
        // latency and rate a run reports (decision 0028). Probed before the disk's counter is
        // read: the probe's writes are not the server's.
        let disk_flush = disk_dir.as_deref().and_then(|dir| {
            use courier_core::store::flush_probe::{BATCH_FLUSHES, BATCH_WRITE_BYTES, measure};
            measure(dir, BATCH_FLUSHES, BATCH_WRITE_BYTES)
                .map_err(|error| eprintln!("courier-bench: disk flush not measured: {error}"))
                .ok()
        });
        let threads_start = usage_by_thread(&pids);
        let disk_start = disk_dir.as_deref().and_then(disk_written_bytes);
        ServerCounters {
            pids,
            disk_dir,
            threads_start,
            disk_start,
            disk_flush,
        }
    }

    /// Adds `edge_context_switches`, `edge_threads`, `disk_write_bytes` and the disk's flush
    /// latency before the run (those it could read) to `report`.
    pub fn finish(&self, report: &mut Report) {
        if let Some(flush) = &self.disk_flush {
            report.record_count("disk_flush_p50_us", flush.p50_us);
            report.record_count("disk_flush_p90_us", flush.p90_us);
        }
        // Waking an idle core moved paced medians by a third to a half here (courier_edge::idle).
        let idle = courier_edge::idle::IdlePolicy::read();
        if let Some(governor) = &idle.governor {
            report.extra.insert(
                "cpuidle_governor".into(),
                serde_json::Value::String(governor.clone()),
            );
        }
        if let Some(driver) = &idle.driver {
            report.extra.insert(
                "cpuidle_driver".into(),
                serde_json::Value::String(driver.clone()),
            );
        }
        if let Some(poll_ns) = idle.guest_halt_poll_ns {
            report.record_count("guest_halt_poll_ns", poll_ns);
        }
        // What applies: 0 with no cpuidle driver, whatever the haltpoll module's limit says.
        if let Some(poll_ns) = idle.halt_poll_ns() {
            report.record_count("halt_poll_ns", poll_ns);
        }
        if let (Some(start), Some(now)) = (&self.threads_start, usage_by_thread(&self.pids)) {
            let by_role = usage_since_by_role(start, &now);
            let switches = by_role
                .values()
                .map(|usage| usage.voluntary_switches + usage.involuntary_switches)
                .sum();
            report.record_count("edge_context_switches", switches);
            report.extra.insert(
                "edge_threads".into(),
                serde_json::Value::Array(
                    by_role
                        .into_values()
                        .filter(|usage| !usage.is_idle())
                        .map(|usage| usage.to_json())
                        .collect(),
                ),
            );
        }
        if let (Some(start), Some(now)) = (
            self.disk_start,
            self.disk_dir.as_deref().and_then(disk_written_bytes),
        ) {
            report.record_count("disk_write_bytes", now.saturating_sub(start));
        }
    }
}

/// What one thread of the server used so far, from `/proc/PID/task/TID/{comm,stat,status}`.
#[derive(Debug, Clone, Default, PartialEq)]
struct ThreadUsage {
    /// The thread's name without its numbers (`shard-0-1` is a `shard`, `store-w0` a
    /// `store-w`): its role, which the edge's threads of one kind share.
    role: String,
    /// User and system CPU, in clock ticks.
    cpu_ticks: u64,
    /// Times it went to sleep by itself: waiting for work, a lock or I/O.
    voluntary_switches: u64,
    /// Times the scheduler took the CPU from it while it could run: another thread of the
    /// same core (a store thread at a higher priority, say) was woken and preferred.
    involuntary_switches: u64,
}

impl ThreadUsage {
    fn is_idle(&self) -> bool {
        self.cpu_ticks == 0 && self.voluntary_switches == 0 && self.involuntary_switches == 0
    }

    /// One row of `edge_threads`: the role's threads together over the run.
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "thread": self.role,
            "cpu_secs": (self.cpu_ticks as f64 / clock_ticks_per_sec() * 100.0).round() / 100.0,
            "voluntary_switches": self.voluntary_switches,
            "involuntary_switches": self.involuntary_switches,
        })
    }
}

fn clock_ticks_per_sec() -> f64 {
    #[allow(unsafe_code)]
    // SAFETY: sysconf only reads a constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks.max(1.0)
}

/// Every thread of `pids` by (process, thread): where the server's CPU and wake-ups went,
/// thread by thread. `None` when no thread could be read.
fn usage_by_thread(pids: &[u32]) -> Option<HashMap<(u32, u32), ThreadUsage>> {
    let mut threads = HashMap::new();
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            // A thread may end between listing and reading.
            let read = |file: &str| std::fs::read_to_string(task.path().join(file)).ok();
            if let (Some(comm), Some(stat), Some(status)) =
                (read("comm"), read("stat"), read("status"))
                && let Some(usage) = thread_usage(&comm, &stat, &status)
            {
                threads.insert((*pid, tid), usage);
            }
        }
    }
    (!threads.is_empty()).then_some(threads)
}

/// One thread's usage from the texts of its `comm`, `stat` and `status` files.
fn thread_usage(comm: &str, stat: &str, status: &str) -> Option<ThreadUsage> {
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))?
            .trim()
            .parse()
            .ok()
    };
    Some(ThreadUsage {
        role: thread_role(comm.trim()),
        cpu_ticks: cpu_ticks_in_stat(stat)?,
        voluntary_switches: field("voluntary_ctxt_switches:")?,
        involuntary_switches: field("nonvoluntary_ctxt_switches:")?,
    })
}

/// User plus system CPU, in clock ticks, from the text of a process's or thread's `stat`.
fn cpu_ticks_in_stat(stat: &str) -> Option<u64> {
    // The fields after the name, which is in parentheses and may hold anything: utime and
    // stime are the 12th and 13th of them.
    let mut after_name = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .skip(11);
    let mut ticks = || -> Option<u64> { after_name.next()?.parse().ok() };
    Some(ticks()? + ticks()?)
}

/// A thread's name without the shard, lane or worker numbers at its end.
fn thread_role(name: &str) -> String {
    let role = name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-' || c == '_');
    if role.is_empty() { name } else { role }.to_string()
}

/// The usage between two readings, summed per role: each thread's own difference. A thread
/// that started meanwhile counts from zero; one that ended is not read again, so what it used
/// after the first reading is missing, and one that started and ended in between is not seen:
/// the roles can add up to less than the process's CPU. Sorted by role.
fn usage_since_by_role(
    start: &HashMap<(u32, u32), ThreadUsage>,
    now: &HashMap<(u32, u32), ThreadUsage>,
) -> std::collections::BTreeMap<String, ThreadUsage> {
    let mut by_role = std::collections::BTreeMap::<String, ThreadUsage>::new();
    for (thread, usage) in now {
        let before = start.get(thread).cloned().unwrap_or_default();
        let sum = by_role
            .entry(usage.role.clone())
            .or_insert_with(|| ThreadUsage {
                role: usage.role.clone(),
                ..ThreadUsage::default()
            });
        sum.cpu_ticks += usage.cpu_ticks.saturating_sub(before.cpu_ticks);
        sum.voluntary_switches += usage
            .voluntary_switches
            .saturating_sub(before.voluntary_switches);
        sum.involuntary_switches += usage
            .involuntary_switches
            .saturating_sub(before.involuntary_switches);
    }
    by_role
}

/// Bytes written so far to the block device that holds `path`, from `/proc/diskstats`
/// (sectors written, 512 bytes each), after syncing its file system (`syncfs`), so that what
/// the run left in the page cache is in the count and what came before it is not: what reached
/// the disk, the file system's own writes included, from every process on the machine. `None`
/// when `path` is not on a block device listed there (tmpfs, overlay, btrfs, ZFS, NFS: their
/// device numbers are anonymous).
fn disk_written_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let dir = std::fs::File::open(path).ok()?;
    #[allow(unsafe_code)]
    // SAFETY: syncfs only reads the descriptor, which `dir` keeps open for the call.
    unsafe {
        libc::syncfs(dir.as_raw_fd());
    }
    let device = dir.metadata().ok()?.dev();
    let diskstats = std::fs::read_to_string("/proc/diskstats").ok()?;
    written_sectors_in_diskstats(&diskstats, libc::major(device), libc::minor(device))
        .map(|sectors| sectors * 512)
}

/// The sectors written of device `major:minor` in the text of `/proc/diskstats`.
fn written_sectors_in_diskstats(diskstats: &str, major: u32, minor: u32) -> Option<u64> {
    diskstats.lines().find_map(|line| {
        // major minor name reads reads_merged sectors_read ms_reading writes writes_merged
        // sectors_written ...
        let fields: Vec<&str> = line.split_whitespace().collect();
        let matches = fields.first()?.parse::<u32>().ok()? == major
            && fields.get(1)?.parse::<u32>().ok()? == minor;
        if matches {
            fields.get(9)?.parse().ok()
        } else {
            None
        }
    })
}

/// CPU seconds (user + system) and resident bytes of a process, from /proc.
pub fn process_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = cpu_ticks_in_stat(&stat)? as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((ticks / clock_ticks_per_sec(), rss_kib * 1024))
}

/// The spawned edge's log filter: warnings, and the line that says it listens (which the
/// bench waits for); `COURIER_BENCH_EDGE_LOG` adds directives, like `courier_edge=debug`.
fn edge_log_filter() -> String {
    let base = "warn,courier_edge::server=info";
    match std::env::var("COURIER_BENCH_EDGE_LOG") {
        Ok(extra) if !extra.trim().is_empty() => format!("{base},{extra}"),
        _ => base.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--edge-config` adds keys to the sections the harness writes (`[server]` among them)
    /// instead of a second section the edge would refuse, adds its own sections, and may not
    /// set what the harness owns; `--ack-delay-ms` joins a `[quic]` section the file has.
    #[test]
    fn edge_config_is_merged_into_the_harness_config() {
        let extra = edge_extra_from(
            "[server]\nstore_writer_nice = 0\n[store]\nengine = \"log\"\n[quic]\nidle_timeout_ms = 9000\n",
            Some(200),
        )
        .expect("valid extra");
        let text = spawned_edge_config(
            "127.0.0.1:4433".parse().expect("addr"),
            std::path::Path::new("/tmp/edge-data"),
            2,
            &extra,
        )
        .expect("config");
        let config: toml::Table = text.parse().expect("the merged config parses");
        let server = config["server"].as_table().expect("server");
        assert_eq!(server["listen"].as_str(), Some("127.0.0.1:4433"));
        assert_eq!(server["data_dir"].as_str(), Some("/tmp/edge-data"));
        assert_eq!(server["shards"].as_integer(), Some(2));
        assert_eq!(server["store_writer_nice"].as_integer(), Some(0));
        assert_eq!(config["store"]["engine"].as_str(), Some("log"));
        assert_eq!(config["quic"]["idle_timeout_ms"].as_integer(), Some(9000));
        assert_eq!(
            config["quic"]["client_ack_delay_ms"].as_integer(),
            Some(200)
        );

        let owned = edge_extra_from("[server]\nshards = 4\n", None).expect_err("harness key");
        assert!(owned.contains("server.shards"), "{owned}");
        let twice =
            edge_extra_from("[quic]\nclient_ack_delay_ms = 5\n", Some(200)).expect_err("set twice");
        assert!(twice.contains("set one of them"), "{twice}");
        assert!(edge_extra_from("[server\n", None).is_err());
    }

    #[test]
    fn thread_usage_is_summed_per_role_over_the_run() {
        let stat = "4242 (shard-0-1) S 1 4242 4242 0 -1 4194560 90 0 0 0 150 25 0 0 20 0 3 0 \
                    123 0 0";
        let status = "Name:\tshard-0-1\nState:\tS (sleeping)\nvoluntary_ctxt_switches:\t1200\n\
                      nonvoluntary_ctxt_switches:\t34\n";
        let usage = thread_usage("shard-0-1\n", stat, status).expect("parsed");
        assert_eq!(
            usage,
            ThreadUsage {
                role: "shard".into(),
                cpu_ticks: 175,
                voluntary_switches: 1200,
                involuntary_switches: 34,
            }
        );
        assert_eq!(thread_usage("x", stat, "Name:\tx\n"), None);
        // A name with a space and a parenthesis does not shift the fields.
        let odd = "7 (a) b) S 1 7 7 0 -1 0 0 0 0 0 3 4 0 0 20 0 1 0 5 0 0";
        assert_eq!(
            thread_usage("a) b", odd, status).map(|u| u.cpu_ticks),
            Some(7)
        );

        assert_eq!(thread_role("store-w0"), "store-w");
        assert_eq!(thread_role("store-checkpoin"), "store-checkpoin");
        assert_eq!(thread_role("fjall:worker"), "fjall:worker");
        assert_eq!(thread_role("2"), "2");

        let usage = |role: &str, cpu_ticks, voluntary_switches, involuntary_switches| ThreadUsage {
            role: role.into(),
            cpu_ticks,
            voluntary_switches,
            involuntary_switches,
        };
        // Two shards add up; a thread that ended takes nothing off, one that started counts
        // from zero.
        let start = HashMap::from([
            ((1, 1), usage("shard", 100, 10, 1)),
            ((1, 2), usage("shard", 50, 5, 0)),
            ((1, 3), usage("store-w", 7, 70, 0)),
        ]);
        let now = HashMap::from([
            ((1, 1), usage("shard", 130, 12, 4)),
            ((1, 2), usage("shard", 60, 9, 0)),
            ((1, 4), usage("store-w", 3, 30, 1)),
        ]);
        let by_role = usage_since_by_role(&start, &now);
        assert_eq!(by_role["shard"], usage("shard", 40, 6, 3));
        assert_eq!(by_role["store-w"], usage("store-w", 3, 30, 1));
        assert_eq!(by_role.len(), 2);

        // This process's threads can be read; a process that does not exist gives nothing.
        assert!(usage_by_thread(&[std::process::id()]).is_some());
        assert!(usage_by_thread(&[u32::MAX]).is_none());
    }

    #[test]
    fn disk_writes_are_the_devices_sectors_written() {
        let diskstats = "\
 253       0 vda 2391 12 141882 1093 931102 480123 12058936 201833 0 385628 372111 0 0 0 0 99 101
 253       1 vda1 10 0 80 1 7 0 56 2 0 9 3 0 0 0 0 0 0
";
        assert_eq!(
            written_sectors_in_diskstats(diskstats, 253, 0),
            Some(12_058_936)
        );
        assert_eq!(written_sectors_in_diskstats(diskstats, 253, 1), Some(56));
        assert_eq!(written_sectors_in_diskstats(diskstats, 8, 0), None);
    }
}
