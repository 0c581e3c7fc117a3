//! The test harness shared by the end-to-end test files: the real `courier-edge` binary on
//! loopback with its own port and data directory, stopped (by its PID) when the test ends.

#![allow(dead_code)] // Each test file uses a different part of the harness.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use courier_client::raw::RawConnection;
use courier_client::{ConnectOptions, Connector, Delivery};
use courier_protocol::Frame;

pub const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
/// A test still running after this long is hung: the watchdog stops its edge and the test
/// binary, so CI fails instead of waiting forever.
const TEST_DEADLINE: Duration = Duration::from_secs(180);

pub struct Edge {
    child: Option<Child>,
    /// Set when the test is over; until then the watchdog may end a hung test.
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pid: std::sync::Arc<std::sync::atomic::AtomicU32>,
    pub dir: tempfile::TempDir,
    /// `server.data_dir`: `dir/data` unless the test chose another.
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    pub addr: SocketAddr,
    /// Extra environment for the edge process.
    env: Vec<(String, String)>,
    /// Every line the edge wrote to stderr (at most `LOG_LINES_MAX`), for tests that check logs.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// Lines of edge output a test keeps.
const LOG_LINES_MAX: usize = 1_000_000;

impl Edge {
    pub fn start(shards: u32) -> Edge {
        Edge::start_with(shards, "", &[])
    }

    /// Starts an edge with `extra_config` appended to its config file (whole TOML sections,
    /// such as `[limits]`) and `env` set for the process.
    pub fn start_with(shards: u32, extra_config: &str, env: &[(&str, &str)]) -> Edge {
        Edge::start_in(shards, None, extra_config, env)
    }

    /// Like [`Edge::start_with`], with the data directory at `data_dir` when given (for
    /// example on a small filesystem).
    pub fn start_in(
        shards: u32,
        data_dir: Option<&std::path::Path>,
        extra_config: &str,
        env: &[(&str, &str)],
    ) -> Edge {
        // Ports come from outside the ephemeral range, but another process on the machine
        // may still bind one between `free_addr` and the edge: then take another.
        const ATTEMPTS: u32 = 3;
        for attempt in 1..=ATTEMPTS {
            let addr = free_addr();
            let mut edge = Edge::unspawned(addr, shards, data_dir, extra_config, env);
            match edge.try_spawn() {
                Ok(()) => return edge,
                Err(error)
                    if attempt < ATTEMPTS
                        && error.contains(&format!("cannot listen on {addr}")) =>
                {
                    eprintln!("port {addr} was taken before the edge bound it; another one");
                }
                Err(error) => panic!("{error}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Like [`Edge::start_in`], listening on `addr` (a cluster's members know each other's
    /// addresses before they start).
    pub fn start_on(
        addr: SocketAddr,
        shards: u32,
        data_dir: Option<&std::path::Path>,
        extra_config: &str,
        env: &[(&str, &str)],
    ) -> Edge {
        let mut edge = Edge::unspawned(addr, shards, data_dir, extra_config, env);
        edge.spawn();
        edge
    }

    /// An edge's directory, config and watchdog, its process not started yet.
    fn unspawned(
        addr: SocketAddr,
        shards: u32,
        data_dir: Option<&std::path::Path>,
        extra_config: &str,
        env: &[(&str, &str)],
    ) -> Edge {
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = data_dir.map_or_else(|| dir.path().join("data"), |d| d.to_path_buf());
        let config_path = dir.path().join("courier.toml");
        let config = format!(
            "[server]\nlisten = \"{addr}\"\ndata_dir = \"{}\"\nshards = {shards}\npin_shards = false\n",
            data_dir.display()
        ) + extra_config;
        std::fs::write(&config_path, config).expect("write config");
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pid = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        {
            let (done, pid) = (done.clone(), pid.clone());
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                while started.elapsed() < TEST_DEADLINE {
                    if done.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                eprintln!(
                    "e2e test hung for {TEST_DEADLINE:?}: stopping its edge and the test binary"
                );
                let _ = Command::new("kill")
                    .args([
                        "-9",
                        &pid.load(std::sync::atomic::Ordering::SeqCst).to_string(),
                    ])
                    .status();
                std::process::abort();
            });
        }
        Edge {
            child: None,
            done,
            pid,
            dir,
            data_dir,
            config_path,
            addr,
            env: env
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
            log: Default::default(),
        }
    }

    /// Starts the edge's process and waits for its listening line.
    pub fn spawn(&mut self) {
        if let Err(error) = self.try_spawn() {
            panic!("{error}");
        }
    }

    /// [`Edge::spawn`], with an edge that exits or hangs instead of listening stopped and
    /// reported with its last log lines.
    fn try_spawn(&mut self) -> Result<(), String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_courier-edge"))
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .env(
                "RUST_LOG",
                std::env::var("COURIER_TEST_EDGE_RUST_LOG")
                    .unwrap_or_else(|_| "info,lsm_tree=warn,fjall=warn".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn courier-edge");
        let stderr = child.stderr.take().expect("stderr");
        let (ready_tx, ready_rx) = mpsc::channel();
        let log = self.log.clone();
        std::thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                {
                    let mut log = log.lock().expect("log");
                    if log.len() < LOG_LINES_MAX {
                        log.push(line.clone());
                    }
                }
                if line.contains("courier-edge listening")
                    && let Some(tx) = ready_tx.take()
                {
                    let _ = tx.send(());
                }
                if std::env::var_os("COURIER_TEST_EDGE_LOG").is_some() {
                    eprintln!("edge: {line}");
                }
            }
        });
        // Stored before the wait: an edge that hangs instead of listening is still killed
        // when the panic below drops this `Edge`.
        self.pid
            .store(child.id(), std::sync::atomic::Ordering::SeqCst);
        self.child = Some(child);
        if let Err(error) = ready_rx.recv_timeout(EVENT_TIMEOUT) {
            self.kill9();
            let tail = {
                let log = self.log.lock().expect("log");
                log[log.len().saturating_sub(20)..].join("\n")
            };
            return Err(format!(
                "the edge on {} did not print its listening line ({error:?}); its last lines:\n{tail}",
                self.addr,
            ));
        }
        Ok(())
    }

    /// SIGTERM, then waits for the process; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        child.wait().expect("reap").success()
    }

    /// The edge's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits up to `timeout` for the process to exit by itself; returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            let child = self.child.as_mut()?;
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Resident memory of the edge process in bytes (from /proc).
    pub fn rss_bytes(&self) -> u64 {
        let pid = self.pid().expect("edge running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        kib * 1024
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9");
            child.wait().expect("reap");
        }
    }

    pub fn token(&self, user: u64, device: u32) -> String {
        let output = Command::new(env!("CARGO_BIN_EXE_courier-edge"))
            .args(["token", "--config"])
            .arg(&self.config_path)
            .args(["--user", &user.to_string(), "--device", &device.to_string()])
            .output()
            .expect("run courier-edge token");
        assert!(
            output.status.success(),
            "token: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout)
            .expect("utf-8")
            .trim()
            .to_string()
    }

    pub fn connector(&self) -> Connector {
        let pem = std::fs::read(self.data_dir.join("tls/cert.pem")).expect("dev cert");
        Connector::new(&pem, "localhost").expect("connector")
    }

    /// A raw connection logged in as `user`/`device` (a fresh install: nothing acked or
    /// held), after its `Welcome`; what it reads and writes next is up to the test.
    pub async fn raw_session(
        &self,
        connector: &Connector,
        user: u64,
        device: u32,
    ) -> RawConnection {
        let mut raw = RawConnection::connect(connector, self.addr)
            .await
            .expect("raw connection");
        raw.write_frame(&Frame::Hello {
            token: self.token(user, device).into_bytes(),
            device,
            acked_up_to: 0,
            resume_after_seq: 0,
        })
        .await
        .expect("hello");
        let welcome = raw.read_frame().await.expect("welcome");
        assert!(matches!(welcome, Frame::Welcome { .. }), "{welcome:?}");
        raw
    }

    pub async fn client(&self, user: u64) -> courier_client::Client {
        self.client_device(user, 0).await
    }

    /// A client of `user`'s `device`, as a fresh install.
    pub async fn client_device(&self, user: u64, device: u32) -> courier_client::Client {
        self.connector()
            .connect(ConnectOptions::new(
                self.addr,
                self.token(user, device),
                device,
            ))
            .await
            .expect("connect")
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
        self.kill9();
    }
}

/// A loopback address whose port was free for UDP and TCP a moment ago, for an edge's QUIC
/// listener or its metrics listener.
///
/// The port comes from outside the kernel's ephemeral range, so no socket bound to port 0 (the
/// test clients', a scrape's) can take it between this check and the edge's bind; an edge
/// that lost its port that way exited before listening and failed a cluster test in CI. Ports
/// are handed out once per test binary, from an offset that differs per process.
pub fn free_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static RANGE: std::sync::OnceLock<(u16, u16)> = std::sync::OnceLock::new();
    let (low, high) = *RANGE.get_or_init(ports_outside_ephemeral);
    let span = u32::from(high - low);
    let offset = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let port = low + ((offset + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        if UdpSocket::bind(addr).is_ok() && std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no free loopback port in {low}..{high}");
}

/// 12,000 ports outside the kernel's ephemeral range (`net.ipv4.ip_local_port_range`): below
/// it when there is room, else above it; 20,000..32,000 when it cannot be read (Linux's default
/// range starts at 32,768).
fn ports_outside_ephemeral() -> (u16, u16) {
    const SPAN: u32 = 12_000;
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut bounds = text.split_whitespace().map(|n| n.parse::<u32>().ok());
            Some((bounds.next()??, bounds.next()??))
        });
    let Some((low, high)) = range else {
        return (20_000, 32_000);
    };
    let (from, to) = if low >= 1_024 + SPAN {
        (low - SPAN, low)
    } else if high < 65_535 - SPAN {
        (high + 1, high + 1 + SPAN)
    } else {
        panic!(
            "the ephemeral port range {low}-{high} leaves no 12,000 ports for test edges: \
             narrow net.ipv4.ip_local_port_range"
        )
    };
    (from as u16, to as u16)
}

pub async fn next_message(client: &mut courier_client::Client) -> Delivery {
    tokio::time::timeout(EVENT_TIMEOUT, client.recv_message())
        .await
        .expect("a delivery arrives in time")
        .expect("client still open")
}

/// Asserts that nothing more arrives for a while (a duplicate would).
pub async fn assert_quiet(client: &mut courier_client::Client) {
    if let Ok(Some(extra)) =
        tokio::time::timeout(Duration::from_millis(500), client.recv_message()).await
    {
        panic!("unexpected extra delivery: {extra:?}");
    }
}

/// The sum of a metric's series on the `/metrics` listener at `addr`; `None` if it cannot be
/// reached.
pub fn metric_sum_at(addr: SocketAddr, name: &str) -> Option<f64> {
    metric_at(addr, name, "")
}

/// The sum of a metric's series whose labels contain `labels` (for example `shard="1"`) on the
/// `/metrics` listener at `addr`; `None` if it cannot be reached.
pub fn metric_at(addr: SocketAddr, name: &str, labels: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("response");
    Some(
        text.lines()
            .filter_map(|line| {
                let series = line.strip_prefix(name)?.strip_prefix('{')?;
                let (series_labels, value) = series.rsplit_once(' ')?;
                series_labels.contains(labels).then_some(value)
            })
            .filter_map(|value| value.parse::<f64>().ok())
            .sum(),
    )
}
