//! Starting the edge: data directory, keys, TLS, the store, and one executor per shard.

use std::sync::Arc;

use courier_core::store::fjall::FjallOptions;
use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement};
use tracing::{info, warn};

use crate::backend::{Embedded, OpenShardStore, ShardStore};
use crate::config::Config;
use crate::shard::{self, ShardSetup};
use crate::{auth, tls};

/// glommio registers this much memory per executor for its own I/O buffers. The network path
/// does not use them, and this machine's locked-memory limit is 8 MiB.
const IO_MEMORY_BYTES: usize = 512 * 1024;

/// Runs the edge until SIGINT or SIGTERM.
pub fn serve(config: Config, config_path: Option<std::path::PathBuf>) -> Result<(), String> {
    install_panic_exit();
    // Block the shutdown signals before any thread starts (the store's own threads included),
    // so every thread inherits the mask and only this thread, in `sigwait`, receives them: a
    // second SIGTERM during the drain then waits instead of killing the process.
    let signals = block_shutdown_signals()?;
    // A failed check exits 1 (`?`): the config or the machine needs an operator. A start that
    // failed after its checks passed (the port still held by the process before, the store's
    // disk, FoundationDB unreachable, a shard that could not start) exits 4, which a
    // supervisor restarts: it may be gone by the next try.
    Edge::check(&config, &EdgeStore::Configured)?;
    let edge = match Edge::start_checked(config, EdgeStore::Configured) {
        Ok(edge) => edge,
        // What the store says of the config (another expiry bucket or dedupe window than
        // its records were written with) stays true at every restart: exit 1, as a failed
        // check does, or a supervisor restarts into the same refusal, replaying the store
        // each time.
        Err(StartError { message, lasting }) => {
            tracing::error!(error = %message, "could not start");
            eprintln!("courier-edge: {message}");
            std::process::exit(if lasting { 1 } else { EXIT_START_FAILED });
        }
    };
    let signal = loop {
        let signal = wait_for_signal(&signals);
        if signal != libc::SIGHUP {
            break signal;
        }
        reload(config_path.as_deref(), &edge.config, &edge.verifier);
    };
    info!(
        signal,
        "shutting down: finishing commits and closing connections"
    );
    match edge.shut_down() {
        Ok(()) => std::process::exit(0),
        Err(_) => std::process::exit(EXIT_SHUTDOWN_INCOMPLETE),
    }
}

/// Where an edge's store comes from.
#[derive(Debug)]
pub enum EdgeStore {
    /// `[store]` in the config.
    Configured,
    /// Memory stores that every edge of this process given the same ones shares, standing in
    /// for FoundationDB (one per cluster): for end-to-end tests of takeover, drains and
    /// membership changes where FoundationDB cannot run. Nothing survives the process.
    SharedMemory(Arc<Vec<Arc<courier_core::store::memory::MemoryStore>>>),
}

/// A running edge: its shards' executors and what stops them.
pub struct Edge {
    config: Arc<Config>,
    verifier: Arc<auth::VerifierCell>,
    shard_count: u32,
    shutdown: Arc<std::sync::atomic::AtomicBool>,
    /// Set as the stop begins, before any hand-over: `/readyz` answers 503 from then on.
    stopping: Arc<std::sync::atomic::AtomicBool>,
    /// Set to stop every shard at once, as if the process died (`Edge::crash`).
    abort: Arc<std::sync::atomic::AtomicBool>,
    stopped: std::sync::mpsc::Receiver<u8>,
    takeover: TakeoverHandle,
    executors: Vec<glommio::ExecutorJoinHandle<()>>,
    /// The TLS sessions clients resume from, saved when the edge stops
    /// (`tls.sessions_survive_restart`), under the fingerprint of its certificates.
    tls_sessions: Arc<tls::SessionCache>,
    sessions_fingerprint: [u8; 32],
    /// What must live as long as the edge (FoundationDB's network thread).
    _keep_alive: Box<dyn std::any::Any>,
}

/// Stops the lease thread and the shards of an edge whose start failed, when dropped
/// (disarmed once the edge serves).
struct StopOnDrop {
    abort: Arc<std::sync::atomic::AtomicBool>,
    takeover: TakeoverHandle,
    armed: bool,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.abort.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(takeover) = &self.takeover {
            takeover.stop();
        }
    }
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("listen", &self.config.server.listen)
            .field("shards", &self.shard_count)
            .finish_non_exhaustive()
    }
}

/// Why a start failed after its checks passed, and whether trying again can help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartError {
    pub message: String,
    /// The config disagrees with what the store recorded: a restart meets the same refusal.
    pub lasting: bool,
}

impl StartError {
    /// A refusal that a restart would meet again: the config must change.
    pub fn lasting(message: String) -> StartError {
        StartError {
            message,
            lasting: true,
        }
    }
}

/// Anything else (a port still held, the store's disk, a shard that could not start) may be
/// gone at the next try.
impl From<String> for StartError {
    fn from(message: String) -> StartError {
        StartError {
            message,
            lasting: false,
        }
    }
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl Edge {
    /// Checks the config, opens the store and starts every shard; returns once all serve.
    pub fn start(config: Config, store: EdgeStore) -> Result<Edge, String> {
        Edge::check(&config, &store)?;
        Edge::start_checked(config, store).map_err(|error| error.message)
    }

    /// The checks [`Edge::start`] makes before it writes anything: the config, and the files
    /// and directories it names (`preflight`).
    pub fn check(config: &Config, store: &EdgeStore) -> Result<(), String> {
        let shared_store = matches!(store, EdgeStore::SharedMemory(_));
        config
            .validate_on("built-in or loaded config", shared_store)
            .map_err(|e| e.to_string())?;
        preflight(config)
    }

    /// [`Edge::start`] after [`Edge::check`] passed: binds, opens the store, starts the shards.
    pub fn start_checked(config: Config, store: EdgeStore) -> Result<Edge, StartError> {
        probe_address_free(config.server.listen)?;
        // Before the store opens (in a cluster with takeover that claims the users' lease, and
        // fences whoever served them meanwhile): a metrics port in use fails the start here.
        if let Some(listen) = config.metrics.listen_addr()? {
            std::net::TcpListener::bind(listen).map_err(|e| {
                format!(
                    "cannot listen for metrics on {listen}: {e} (is another courier-edge \
                     running? set metrics.listen)"
                )
            })?;
        }
        let config = Arc::new(config);
        std::fs::create_dir_all(&config.server.data_dir).map_err(|e| {
            format!(
                "cannot create data directory {}: {e}",
                config.server.data_dir.display()
            )
        })?;

        let (signing_key, generated_key) = auth::load_or_create_signing_key(&config)?;
        if generated_key {
            info!(path = %auth::signing_key_path(&config).display(), "generated a development token-signing key");
        }
        let verifier = Arc::new(auth::VerifierCell::new(auth::verifier(
            &config,
            &signing_key,
        )?));
        let (identity, generated_cert) = tls::load_identity(&config)?;
        if generated_cert {
            let (cert, _) = tls::dev_cert_paths(&config);
            info!(path = %cert.display(), "generated a development TLS certificate (clients must trust it)");
        }
        let cluster_tls = if config.cluster.enabled() {
            Some(tls::load_cluster_tls(&config)?)
        } else {
            None
        };
        let sessions_fingerprint = tls::sessions_fingerprint(
            std::iter::once(identity.certs.as_slice()).chain(
                cluster_tls
                    .iter()
                    .flat_map(|cluster| [cluster.certs(), cluster.ca_certs()]),
            ),
            &config,
        );
        let (server_config, tls_sessions) =
            tls::server_config(&config, identity, cluster_tls.as_ref())?;
        restore_tls_sessions(&config, &tls_sessions, &sessions_fingerprint);
        let link_client_config = match &cluster_tls {
            Some(cluster) => Some(tls::link_client_config(&config, cluster)?),
            None => None,
        };
        let (reset_key, generated_reset_key) = tls::load_or_create_reset_key(&config)?;
        if generated_reset_key {
            info!(path = %tls::reset_key_path(&config).display(), "generated the stateless-reset key");
        }

        let core = config.core_config();
        let opening = std::time::Instant::now();
        let (open_store, keep_alive, takeover, exit_when_fenced) = match store {
            EdgeStore::Configured => {
                let (open, keep_alive, takeover) = open_store(&config, &core)?;
                (open, keep_alive, takeover, true)
            }
            EdgeStore::SharedMemory(stores) => {
                let (open, takeover) = open_shared_edge(&config, stores, rand::random(), false)?;
                (
                    open,
                    Box::new(()) as Box<dyn std::any::Any>,
                    takeover,
                    false,
                )
            }
        };
        let abort = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // A start that fails from here on stops the lease thread (which would beat on, and
        // keep other edges from taking this one over) and the shards already started.
        let mut start_failed = StopOnDrop {
            abort: abort.clone(),
            takeover: takeover.clone(),
            armed: true,
        };
        // Recovery (replaying the journal) is most of a restart's time on a big store.
        info!(
            elapsed_ms = opening.elapsed().as_millis() as u64,
            "store opened"
        );
        let idle = crate::idle::IdlePolicy::read();
        if idle.halts_at_once() {
            info!(
                cpuidle_driver = idle.driver.as_deref().unwrap_or("unknown"),
                cpuidle_governor = idle.governor.as_deref().unwrap_or("unknown"),
                "this virtual machine halts idle CPUs without polling first: each wake-up of an \
                 idle core costs a VM exit, tens of microseconds on the path of every message at \
                 a modest rate; see \"Virtual machines\" in docs/operations.md"
            );
        }
        let shard_count = config.shard_count();
        // Shard n is pinned to the n-th CPU this process may run on (a cpuset, `taskset`, a
        // container's CPU list), not to CPU n, which may not be among them.
        let cpus = allowed_cpus();

        let mesh = (shard_count > 1)
            .then(|| MeshBuilder::full(shard_count as usize, config.mesh_channel_capacity()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stopped_tx, stopped_rx) = std::sync::mpsc::channel();
        let shutdown = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Set when the stop begins, before a hand-over to the successor (which can take
        // seconds): load balancers stop sending new clients here at once.
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let health = crate::health::Health::new(shard_count as usize, stopping.clone());
        let store_dirs = match config.store_config().map_err(|e| e.to_string())? {
            courier_core::store::config::StoreConfig::Embedded { .. } => (0..shard_count)
                .map(|shard| {
                    crate::stores::shard_dir(
                        &crate::stores::stores_dir(&config.server.data_dir),
                        shard,
                    )
                })
                .collect(),
            // FoundationDB's storage is the cluster's, not this machine's.
            _ => Vec::new(),
        };
        let metrics = Arc::new(crate::metrics::Metrics::new(
            store_dirs,
            Some(tls_sessions.clone()),
            config.retention.erase_within_secs,
        ));
        let (control_shards, mut control_receivers) = crate::control::Shards::new(shard_count);
        if let Some(listen) = config.metrics.listen_addr()? {
            crate::health::start(listen, health.clone(), metrics.clone())?;
        }
        let memory = crate::memory::MemoryGuard::start(config.limits.memory_bytes_max)
            .map_err(|e| format!("cannot start the memory sampling thread: {e}"))?;
        let clock = Arc::new(crate::shard::EdgeClock::default());
        let mut executors = Vec::new();
        for index in 0..shard_count {
            let placement = match cpus.get(index as usize) {
                Some(cpu) if config.server.pin_shards => Placement::Fixed(*cpu),
                _ => Placement::Unbound,
            };
            let setup = ShardSetup {
                cpu: match placement {
                    Placement::Fixed(cpu) => Some(cpu),
                    _ => None,
                },
                config: config.clone(),
                core: core.clone(),
                shard_count,
                open_store: open_store.clone(),
                verifier: verifier.clone(),
                server_config: server_config.clone(),
                link_client_config: link_client_config.clone(),
                reset_key: reset_key.clone(),
                ready: ready_tx.clone(),
                shutdown: shutdown.clone(),
                abort: abort.clone(),
                exit_when_fenced,
                stopped: stopped_tx.clone(),
                memory: memory.clone(),
                health: health.clone(),
                metrics: metrics.clone(),
                control: control_receivers.remove(0),
                takeover: takeover.clone(),
                clock: clock.clone(),
            };
            let mesh = mesh.clone();
            let executor = LocalExecutorBuilder::new(placement)
                .name(&format!("shard-{index}"))
                .io_memory(IO_MEMORY_BYTES)
                .ring_depth(256)
                .spawn(move || shard::run(setup, mesh))
                .map_err(|e| format!("cannot start shard executor {index}: {e}"))?;
            executors.push(executor);
        }
        drop(ready_tx);
        drop(stopped_tx);
        let mut ready = 0;
        while ready < shard_count {
            match ready_rx.recv_timeout(std::time::Duration::from_millis(100)) {
                Ok(Ok(_)) => {
                    health.shard_ready();
                    ready += 1;
                }
                Ok(Err(error)) => return Err(error),
                // A shard whose executor could not be built (its thread ended before it ran)
                // says nothing, and the others would wait for it in the mesh forever.
                Err(timeout_or_gone) => {
                    if timeout_or_gone == std::sync::mpsc::RecvTimeoutError::Disconnected {
                        // Every shard's sender is gone: its thread is ending; do not spin.
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    if let Some(index) = executors.iter().position(|e| e.is_finished()) {
                        let cause = match executors.swap_remove(index).join() {
                            Err(error) => error.to_string(),
                            Ok(()) => "it ended".into(),
                        };
                        return Err(StartError::from(format!(
                            "shard {index} could not start: {cause}. Usual causes: \
                             `server.pin_shards` onto a CPU this process may not use (set it to \
                             false), io_uring refused (a seccomp profile: allow io_uring_setup, \
                             io_uring_enter and io_uring_register), or the locked memory limit \
                             (RLIMIT_MEMLOCK, LimitMEMLOCK=) below 512 KiB"
                        )));
                    }
                }
            }
        }
        if config.control.enabled {
            crate::control::start(&config.control_socket_path(), control_shards)?;
        }
        info!(
            listen = %config.server.listen,
            shards = shard_count,
            data_dir = %config.server.data_dir.display(),
            "courier-edge listening"
        );
        start_failed.armed = false;
        Ok(Edge {
            config,
            verifier,
            shard_count,
            shutdown,
            stopping,
            abort,
            stopped: stopped_rx,
            takeover,
            executors,
            tls_sessions,
            sessions_fingerprint,
            _keep_alive: keep_alive,
        })
    }

    /// Drains the edge: with takeover its users go to the successor first and its clients are
    /// redirected there; then every shard finishes its commits and closes its connections,
    /// within a grace period. `Err` with the shards that did not finish in time.
    pub fn shut_down(&self) -> Result<(), u32> {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // Without takeover the lease thread only fences (decision 0016): no one to hand over to.
        if let Some(takeover) = self
            .takeover
            .as_ref()
            .filter(|_| self.config.cluster.takeover)
        {
            // Hand the users to the successor first, so the redirected clients find it serving.
            match takeover.drain(DRAIN_HANDOVER_WAIT) {
                Some(edge) => info!(
                    edge,
                    "draining to the successor: clients are redirected there"
                ),
                None => warn!(
                    "no other edge took the users up: clients are closed instead (they \
                     reconnect through their first address)"
                ),
            }
        }
        self.shutdown
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // Every acknowledged message is already on disk, so the grace period only spares
        // clients a timeout: they see `ShuttingDown` and reconnect. The deadline bounds it.
        let grace = std::time::Duration::from_secs(self.config.server.shutdown_grace_secs);
        let deadline = std::time::Instant::now() + grace;
        let mut stopped = 0;
        while stopped < self.shard_count {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.stopped.recv_timeout(left) {
                Ok(_) => stopped += 1,
                Err(_) => break,
            }
        }
        // Let the executors put the closes on the wire.
        std::thread::sleep(std::time::Duration::from_millis(50));
        if self.config.control.enabled {
            let _ = std::fs::remove_file(self.config.control_socket_path());
        }
        if stopped == self.shard_count {
            self.save_tls_sessions();
        } else if self.config.tls.sessions_survive_restart {
            // A shard still running may still resume a session (a handshake it accepted
            // before the drain): saved too, it could be resumed twice.
            warn!("the TLS sessions were not saved: some shards were still running");
        }
        if stopped < self.shard_count {
            tracing::error!(
                shards_stopped = stopped,
                shards = self.shard_count,
                grace_secs = grace.as_secs(),
                "stopped, but some shards did not finish in time: what they acknowledged is on \
                 disk, but some clients were not told to reconnect (raise \
                 server.shutdown_grace_secs when shards hold many connections)"
            );
            return Err(self.shard_count - stopped);
        }
        info!(shards_stopped = stopped, "stopped");
        Ok(())
    }

    /// Saves the TLS sessions for the next start, so that its clients resume instead of all
    /// making full handshakes at once (`tls.sessions_survive_restart`). Only once every shard
    /// has stopped: then no session can be resumed after it was saved.
    fn save_tls_sessions(&self) {
        if !self.config.tls.sessions_survive_restart {
            return;
        }
        let path = tls::saved_sessions_path(&self.config);
        match self.tls_sessions.save(&path, &self.sessions_fingerprint) {
            Ok(sessions) => info!(
                sessions,
                path = %path.display(),
                "saved the TLS sessions for the next start"
            ),
            Err(error) => warn!(
                %error,
                "could not save the TLS sessions: after the restart every client makes a full \
                 handshake"
            ),
        }
    }

    /// Stops the edge at once, as if its process died: no hand-over, no closes, no last
    /// commits; its lease stops beating. For tests of an edge that runs in-process.
    pub fn crash(self) {
        self.join();
    }

    /// Stops whatever still runs (every shard, the lease thread) and waits for the shards'
    /// executors to end, so that their sockets are closed and the address can be served
    /// again. After [`Edge::shut_down`] the shards have finished already.
    pub fn join(self) {
        self.abort.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(takeover) = &self.takeover {
            takeover.stop();
        }
        for executor in self.executors {
            let _ = executor.join();
        }
    }

    /// Whether the store refused this edge (another edge claimed its lease, or the members
    /// changed): its shards stop, as its process would exit (an in-process edge).
    pub fn fenced(&self) -> bool {
        self.abort.load(std::sync::atomic::Ordering::SeqCst)
            || self.takeover.as_ref().is_some_and(|t| t.fenced_out())
    }
}

/// Takes back the TLS sessions the last stop saved (`tls.sessions_survive_restart`), or
/// deletes them unused when that is off. Sessions that cannot be restored only cost their
/// clients a full handshake, so this warns and goes on.
fn restore_tls_sessions(config: &Config, sessions: &tls::SessionCache, fingerprint: &[u8; 32]) {
    let path = tls::saved_sessions_path(config);
    if !config.tls.sessions_survive_restart {
        // And the copy of a save cut short.
        for path in [tls::saving_path(&path), path] {
            match std::fs::remove_file(&path) {
                Ok(()) => info!(
                    path = %path.display(),
                    "deleted the TLS sessions a stop saved: tls.sessions_survive_restart is off"
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    warn!(%error, path = %path.display(), "cannot delete the saved TLS sessions")
                }
            }
        }
        return;
    }
    match sessions.restore(&path, fingerprint) {
        Ok(0) => {}
        Ok(restored) => info!(
            restored,
            "restored the TLS sessions saved at the last stop: their clients resume"
        ),
        Err(error) => warn!(
            %error,
            path = %path.display(),
            "the saved TLS sessions were not restored: their clients make full handshakes"
        ),
    }
}

/// Exit status when a shard panicked: the process must not live on serving nothing, and a
/// supervisor must see a failure (Rust's own status for a panicking `main`).
pub const EXIT_SHARD_PANICKED: i32 = 101;
/// `serve`'s checks passed but the start failed (see `serve`): worth restarting.
pub const EXIT_START_FAILED: i32 = 4;
/// Exit status when shutdown ended with shards that never reported done.
pub const EXIT_SHUTDOWN_INCOMPLETE: i32 = 2;

/// Makes a panic on any thread (a shard, its blocking pool, the main thread) end the whole
/// process with `EXIT_SHARD_PANICKED` after the usual panic message. Without it a panicking
/// executor thread dies alone and the process stays up, listening on nothing.
pub fn install_panic_exit() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        let thread = std::thread::current();
        tracing::error!(
            thread = thread.name().unwrap_or("unnamed"),
            "a thread of the edge panicked; exiting so that a supervisor restarts it"
        );
        std::process::exit(EXIT_SHARD_PANICKED);
    }));
}

/// The CPUs this process may run on, in order; every CPU the machine has if that cannot be
/// read.
#[allow(unsafe_code)]
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set, and sched_getaffinity writes at most its
    // size into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let read =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if read != 0 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        return (0..cores).collect();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, the set's size.
        .filter(|cpu| unsafe { libc::CPU_ISSET(*cpu, &set) })
        .collect()
}

/// How long a drain waits for the lease thread to hand the leases over and see them claimed.
const DRAIN_HANDOVER_WAIT: std::time::Duration =
    std::time::Duration::from_secs(5).saturating_add(crate::takeover::DRAIN_CLAIM_WAIT);

/// The lease thread, in a cluster on a shared store.
type TakeoverHandle = Option<Arc<crate::takeover::Takeover>>;

/// How each shard gets its part of the embedded stores: its own, and the others' for reads.
fn embedded_opener<E: crate::backend::EmbeddedEngine + Send + Sync>(
    stores: Vec<Arc<E>>,
    options: E::Options,
) -> OpenShardStore {
    let all = Arc::new(
        stores
            .into_iter()
            .map(|store| crate::backend::EmbeddedSlot::new(store, options.clone()))
            .collect::<Vec<_>>(),
    );
    Arc::new(move |shard| {
        if usize::from(shard) >= all.len() {
            return Err(format!("no store for shard {shard}"));
        }
        let store: Arc<dyn ShardStore> = Arc::new(Embedded {
            shard,
            all: all.clone(),
        });
        Ok(store)
    })
}

/// Opens the configured store and returns how each shard gets its part, plus whatever must
/// live as long as the process (FoundationDB's network thread).
fn open_store(
    config: &Config,
    core: &courier_core::CoreConfig,
) -> Result<(OpenShardStore, Box<dyn std::any::Any>, TakeoverHandle), String> {
    use courier_core::store::config::StoreConfig;
    match config.store_config().map_err(|e| e.to_string())? {
        StoreConfig::Embedded { .. } => {
            let shards = config.shard_count();
            if config.store.engine == "log" {
                let options = courier_core::store::log::LogOptions {
                    memory_bytes_max: config.store.log_memory_bytes_max,
                    dedupe_filter_bytes_max: config.store.dedupe_filter_bytes_max,
                    journal_segment_bytes: config.store.log_journal_segment_bytes,
                    direct_writes: config.store.direct_writes,
                    dedupe_memory_bytes_max: config.store.log_dedupe_memory_bytes_max,
                    ..Default::default()
                };
                let stores =
                    crate::stores::open_embedded_log(&config.server.data_dir, shards, &options)?;
                return Ok((embedded_opener(stores, options), Box::new(()), None));
            }
            let options = FjallOptions {
                // One block cache budget for the edge, split between its shards' stores.
                cache_bytes: (FjallOptions::default().cache_bytes / u64::from(shards))
                    .max(8 * 1024 * 1024),
                dedupe_filter_bytes_max: config.store.dedupe_filter_bytes_max,
                direct_journal_writes: config.store.direct_writes,
                workers_idle_unless_behind: config.store.fjall_workers_idle_unless_behind,
                worker_threads: config.store.fjall_worker_threads,
                ..FjallOptions::default()
            };
            if config.store.fjall_workers_idle_unless_behind
                && !courier_core::store::worker_priority::idle_priority_reversible()
            {
                warn!(
                    "store: fjall's background workers stay at normal priority: this process \
                     may not take a thread back from idle priority (run as root, or give it \
                     CAP_SYS_NICE or systemd's LimitNICE=0), or set \
                     store.fjall_workers_idle_unless_behind = false to silence this"
                );
            }
            let stores = crate::stores::open_embedded(&config.server.data_dir, shards, &options)?;
            Ok((embedded_opener(stores, options), Box::new(()), None))
        }
        #[cfg(feature = "fdb")]
        StoreConfig::FoundationDb(fdb) => {
            use courier_core::store::fdb::{FdbClusters, FdbNetwork};
            let network = FdbNetwork::start()
                .map_err(|e| format!("cannot start FoundationDB's client: {e}"))?;
            let clusters = Arc::new(
                FdbClusters::open(&network, &fdb)
                    .map_err(|e| format!("cannot open the FoundationDB clusters: {e}"))?,
            );
            // This process's claim on its shards; a later claim (another edge) fences it.
            let owner: u64 = rand::random();
            let attempts = core.commit_attempts_max;
            if config.cluster.enabled() {
                return open_cluster_edge(config, &clusters, owner, attempts).map(
                    |(open, takeover)| {
                        (open, Box::new(network) as Box<dyn std::any::Any>, takeover)
                    },
                );
            }
            let open: OpenShardStore = Arc::new(move |shard| {
                let stores = clusters
                    .claim_shard(u32::from(shard), owner, attempts)
                    .map_err(|e| format!("cannot claim shard {shard} in FoundationDB: {e}"))?;
                let store: Arc<dyn ShardStore> = Arc::new(crate::backend::FoundationDb::new(
                    stores,
                    None,
                    shard == 0,
                    None,
                ));
                Ok(store)
            });
            info!(
                clusters = fdb.cluster_files.len(),
                owner, "store: FoundationDB"
            );
            Ok((open, Box::new(network), None))
        }
        #[cfg(not(feature = "fdb"))]
        StoreConfig::FoundationDb(_) => {
            let _ = core;
            Err(courier_core::store::config::StoreConfigError::FdbNotBuilt.to_string())
        }
    }
}

/// The stores of an edge in a cluster on FoundationDB. The shard ids of different edges are
/// the same numbers, so the process claims one owner key for the edge (`EDGE_ID_FDB_MAX | id`)
/// that all its shards commit under, then joins the cluster's membership, claims the edge's
/// lease and starts the lease thread (decisions 0015 and 0016).
#[cfg(feature = "fdb")]
fn open_cluster_edge(
    config: &Config,
    clusters: &Arc<courier_core::store::fdb::FdbClusters>,
    owner: u64,
    attempts: u32,
) -> Result<(OpenShardStore, TakeoverHandle), String> {
    let edge = config.cluster.edge_id;
    let slot = crate::config::EDGE_ID_FDB_MAX | edge;
    let stores = clusters
        .claim_shard(slot, owner, attempts)
        .map_err(|e| format!("cannot claim edge {edge} in FoundationDB: {e}"))?;
    let claim = stores
        .first()
        .map(|store| store.claim())
        .ok_or("no FoundationDB cluster configured")?;
    let clusters = Arc::clone(clusters);
    open_leased(config, Arc::new(stores), owner, true, move || {
        clusters.open_shard(claim)
    })
}

/// An edge of a cluster on memory stores shared in this process (`EdgeStore::SharedMemory`),
/// as [`open_cluster_edge`] on FoundationDB, without the owner key: the lease fences.
fn open_shared_edge(
    config: &Config,
    stores: Arc<Vec<Arc<courier_core::store::memory::MemoryStore>>>,
    owner: u64,
    exit_when_fenced: bool,
) -> Result<(OpenShardStore, TakeoverHandle), String> {
    if !config.cluster.enabled() {
        return Err("shared memory stores stand in for FoundationDB in a cluster only".into());
    }
    let shard_stores = Arc::clone(&stores);
    open_leased(config, stores, owner, exit_when_fenced, move || {
        shard_stores.to_vec()
    })
}

/// Joins the membership, claims the edge's lease and starts the lease thread on `stores`;
/// each shard then commits under the lease on the stores `shard_stores` gives it. With or
/// without takeover the edge commits under its lease, so that a change of the members fences
/// the edges still on the earlier ones (decision 0016). Every store (FoundationDB cluster)
/// holds a copy of every lease (`courier_core::takeover::claim`).
fn open_leased<S, F>(
    config: &Config,
    stores: Arc<Vec<S>>,
    owner: u64,
    exit_when_fenced: bool,
    shard_stores: F,
) -> Result<(OpenShardStore, TakeoverHandle), String>
where
    S: courier_core::store::Store + 'static,
    F: Fn() -> Vec<S> + Send + Sync + 'static,
{
    let cluster = &config.cluster;
    let ids: Vec<u32> = cluster.members.iter().map(|member| member.id).collect();
    let settings = crate::takeover::LeaseSettings {
        edge: cluster.edge_id,
        membership: courier_core::membership::Membership::new(cluster.membership_epoch, &ids),
        takeover: cluster.takeover,
        timeout_ms: cluster.lease_timeout_ms,
        renew_ms: cluster.lease_renew_ms,
        exit_when_fenced,
    };
    let (takeover, lease) = crate::takeover::Takeover::start(stores, settings, owner)?;
    let lease = Some((cluster.edge_id, lease));
    let expiry_turn = Arc::clone(&takeover);
    let open: OpenShardStore = Arc::new(move |shard| {
        let store: Arc<dyn ShardStore> = Arc::new(crate::backend::Shared::new(
            shard_stores(),
            lease,
            shard == 0,
            Some(Arc::clone(&expiry_turn)),
        ));
        Ok(store)
    });
    Ok((open, Some(takeover)))
}

/// SIGHUP: reads the config file again and applies what can change while the edge runs: the
/// token keys (`auth`) and the log filter (`log.filter`). Everything else needs a restart. A
/// file that does not load changes nothing.
fn reload(config_path: Option<&std::path::Path>, running: &Config, verifier: &auth::VerifierCell) {
    let Some(path) = config_path else {
        info!("SIGHUP received: no config file to reload (the edge runs on built-in defaults)");
        return;
    };
    let reloaded = Config::load(path)
        .map_err(|e| e.to_string())
        .and_then(|config| {
            // Read only: a reload never generates a key.
            let key = auth::read_signing_key(&auth::signing_key_path(&config))?;
            let keys = auth::verifier(&config, &key)?;
            crate::cli::set_log_filter(&config.log.filter)?;
            Ok((
                keys,
                config.auth.verify_keys.len(),
                not_reloaded(running, &config),
            ))
        });
    match reloaded {
        Ok((keys, verify_keys, not_reloaded)) => {
            verifier.replace(keys);
            info!(
                path = %path.display(),
                verify_keys,
                "SIGHUP: reloaded the token keys and the log filter (other settings need a restart)"
            );
            if !not_reloaded.is_empty() {
                tracing::warn!(
                    sections = %not_reloaded.join(", "),
                    "SIGHUP: these sections of the file differ from what the edge runs with and \
                     take effect only at a restart"
                );
            }
        }
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "SIGHUP: reload failed; nothing changed");
        }
    }
}

/// The sections of `reloaded` that differ from `running` beyond what a reload applies (the
/// token keys and the log filter): an operator who edited them learns they are not live.
fn not_reloaded(running: &Config, reloaded: &Config) -> Vec<&'static str> {
    let mut running = running.clone();
    running.auth.signing_key_path = reloaded.auth.signing_key_path.clone();
    running.auth.signing_key_id = reloaded.auth.signing_key_id;
    running.auth.verify_keys = reloaded.auth.verify_keys.clone();
    running.log.filter = reloaded.log.filter.clone();
    let mut differ = Vec::new();
    let mut check = |name, same: bool| {
        if !same {
            differ.push(name);
        }
    };
    check("server", running.server == reloaded.server);
    check("tls", running.tls == reloaded.tls);
    check("auth", running.auth == reloaded.auth);
    check("limits", running.limits == reloaded.limits);
    check("quic", running.quic == reloaded.quic);
    check("retention", running.retention == reloaded.retention);
    check("batching", running.batching == reloaded.batching);
    check("store", running.store == reloaded.store);
    check("log", running.log == reloaded.log);
    check("metrics", running.metrics == reloaded.metrics);
    check("control", running.control == reloaded.control);
    check("cluster", running.cluster == reloaded.cluster);
    differ
}

/// What `serve` checks before it writes anything, and all `check-config` checks, so that its
/// "ok" means the edge will start (unless its address is taken then): the files the config names
/// are readable and parse, the data directory can be written, and the store's layout fits the
/// shard count.
pub fn preflight(config: &Config) -> Result<(), String> {
    tls::check_identities(config)?;
    let signing_key_path = auth::signing_key_path(config);
    if !config.auth.signing_key_path.as_os_str().is_empty() || signing_key_path.exists() {
        let key = auth::read_signing_key(&signing_key_path)?;
        auth::verifier(config, &key)?;
    } else if auth::verify_keys(config)?.contains_key(&config.auth.signing_key_id) {
        // The development key is made at the first start: no entry can be its public half.
        return Err(format!(
            "auth.verify_keys has an entry under auth.signing_key_id {}, the id of the \
             development key this edge would make at {}: remove the entry, give it another \
             id, or set auth.signing_key_path to the key it belongs to",
            config.auth.signing_key_id,
            signing_key_path.display()
        ));
    }
    auth::verify_keys(config)?;
    check_writable(&config.server.data_dir)?;
    tls::check_reset_key(config)?;
    if config.control.enabled {
        crate::control::check_path(&config.control_socket_path(), &config.server.data_dir)?;
    }
    match config.store_config().map_err(|e| e.to_string())? {
        courier_core::store::config::StoreConfig::Embedded { .. } => crate::stores::check_layout(
            &config.server.data_dir,
            config.shard_count(),
            &config.store.engine,
        ),
        _ => Ok(()),
    }
}

/// The data directory, or the nearest directory above it that exists, accepts a new file.
fn check_writable(data_dir: &std::path::Path) -> Result<(), String> {
    let mut dir = data_dir;
    while !dir.exists() {
        dir = match dir.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => std::path::Path::new("."),
        };
    }
    let probe = dir.join(format!(".courier-write-check-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| {
            format!(
                "server.data_dir {}: {} is not writable ({e}); give the edge's user write access \
                 or choose another directory",
                data_dir.display(),
                dir.display()
            )
        })
}

/// Fails if another process already serves `listen`. Shards bind with SO_REUSEPORT, which
/// would otherwise silently share the port (and its traffic) with that process. A process that
/// just died may hold its socket for a moment while the kernel tears down its io_uring, so the
/// probe retries for up to `PORT_PROBE_WAIT` before it gives up.
fn probe_address_free(listen: std::net::SocketAddr) -> Result<(), String> {
    let deadline = std::time::Instant::now() + PORT_PROBE_WAIT;
    loop {
        match std::net::UdpSocket::bind(listen) {
            Ok(_probe) => return Ok(()),
            Err(error) if std::time::Instant::now() >= deadline => {
                return Err(format!(
                    "cannot listen on {listen}: {error} (is another courier-edge running? set server.listen)"
                ));
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
}

/// How long start-up waits for a port still held by a process that just ended.
const PORT_PROBE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

#[allow(unsafe_code)]
fn block_shutdown_signals() -> Result<libc::sigset_t, String> {
    // SAFETY: sigset_t is plain data initialised by sigemptyset before use; pthread_sigmask
    // only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        let result = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if result != 0 {
            return Err(format!("cannot block shutdown signals: error {result}"));
        }
        Ok(set)
    }
}

#[allow(unsafe_code)]
fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut signal: libc::c_int = 0;
    // SAFETY: `set` is a valid, initialised signal set; sigwait writes one int.
    unsafe {
        libc::sigwait(set, &mut signal);
    }
    signal
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reload names the sections edited beyond what it applies, and only those: the token
    /// keys and the log filter are applied, so they are not named.
    #[test]
    fn a_reload_names_the_sections_it_does_not_apply() {
        let running = Config::default();
        let mut edited = running.clone();
        edited.log.filter = "debug".into();
        edited.auth.signing_key_id = 9;
        assert!(not_reloaded(&running, &edited).is_empty());
        edited.limits.connections_per_user_max += 1;
        edited.tls.session_cache_entries += 1;
        assert_eq!(not_reloaded(&running, &edited), vec!["tls", "limits"]);
    }
}
