//! The same pairs workloads against Redis Streams, the durable peer issue 10 compares with,
//! so the comparison can be run again side by side on any box (decision 0024).
//!
//! Each pair has a stream. The sender adds its messages with `XADD`: closed loop with at most
//! `--in-flight` unanswered, pipelined on one connection, or paced with one `XADD` per tick and
//! no window, as `pairs` paces Courier's sends. Redis runs with `appendonly yes` and
//! `appendfsync always`, so it answers an `XADD` only after the append is fsynced, as Courier
//! answers a send only after its commit is. The receiver reads its stream with `XREAD BLOCK`
//! and deletes what it read with `XDEL` (the acknowledgement: nothing is kept once delivered).
//! The checks and clocks are `pairs`': every acknowledged message delivered once, in order,
//! under the id the sender was told; the run's clock starts once everyone is connected and
//! stops at the last delivery.
//!
//! The client is a minimal RESP2 one written here (commands out, replies parsed in order, with
//! bounded lines, sizes and nesting); no Redis client crate is needed.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;

use crate::edge::{ServerCounters, process_usage};
use crate::report::{Latency, Report, TcpSegments, latency_histogram};
use crate::workloads::{
    HEADER_BYTES, PairsArgs, RunClocks, body, body_intact, micros, own_cpu_secs, parse_body,
    tick_phase,
};
use crate::{CpuList, parse_cpus};

/// Entries one `XREAD` returns at most.
const READ_ENTRIES_MAX: usize = 1000;
/// Nesting of a reply the parser accepts (an `XREAD` reply is four deep).
const REPLY_DEPTH_MAX: usize = 8;
/// Bytes of one reply line (a type byte, a number or a short status) the parser accepts.
const REPLY_LINE_BYTES_MAX: u64 = 4096;
/// Bytes of one bulk string the parser accepts.
const BULK_BYTES_MAX: usize = 64 << 20;
/// Elements of one array the parser accepts.
const ARRAY_ITEMS_MAX: i64 = 1 << 20;

#[derive(Args, Debug, Clone)]
pub struct RedisArgs {
    #[command(flatten)]
    pub pairs: PairsArgs,
    /// A running Redis to use instead of starting one. It must fsync before it answers
    /// (`appendonly yes`, `appendfsync always`), or the run refuses to compare. Its streams
    /// `courier-bench:*` are deleted first.
    #[arg(long)]
    pub redis_addr: Option<String>,
    /// The `redis-server` binary to start (without --redis-addr).
    #[arg(long, default_value = "redis-server")]
    pub redis_server: PathBuf,
    /// CPUs the started Redis may run on, like `0` (as --edge-cpus pins a spawned edge).
    /// Default: every CPU, whatever --bench-cpus pinned the load generator to.
    #[arg(long, value_parser = parse_cpus)]
    pub server_cpus: Option<CpuList>,
    /// Serve and connect over TLS 1.3 (AES-128-GCM, the edge's QUIC cipher), with a
    /// certificate made for the run: the peer encrypting every byte as Courier does. Needs a
    /// `redis-server` built with TLS (Debian's is); not with --redis-addr.
    #[arg(long)]
    pub tls: bool,
}

/// The reading half of a connection, plain or TLS.
type ReadHalf = BufReader<Box<dyn AsyncRead + Unpin + Send>>;

/// Where the clients connect: the address, and the TLS settings when Redis serves TLS.
#[derive(Clone)]
struct Dial {
    addr: String,
    tls: Option<TlsConnector>,
}

/// One RESP2 reply.
#[derive(Debug)]
enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

/// The write side of a connection: commands are buffered until `flush`.
struct Commands {
    writer: BufWriter<Box<dyn AsyncWrite + Unpin + Send>>,
}

impl Commands {
    async fn send(&mut self, args: &[&[u8]]) -> Result<(), String> {
        self.writer
            .write_all(&encode(args))
            .await
            .map_err(|e| format!("write to Redis: {e}"))
    }

    async fn flush(&mut self) -> Result<(), String> {
        self.writer
            .flush()
            .await
            .map_err(|e| format!("write to Redis: {e}"))
    }
}

/// A pipelined RESP connection: replies come in the order of the commands.
struct Connection {
    reader: ReadHalf,
    commands: Commands,
}

impl Connection {
    async fn open(dial: &Dial) -> Result<Connection, String> {
        let addr = &dial.addr;
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect to Redis at {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (read, write): (
            Box<dyn AsyncRead + Unpin + Send>,
            Box<dyn AsyncWrite + Unpin + Send>,
        ) = match &dial.tls {
            None => {
                let (read, write) = stream.into_split();
                (Box::new(read), Box::new(write))
            }
            Some(connector) => {
                let name =
                    rustls::pki_types::ServerName::try_from("localhost").expect("a valid name");
                let stream = connector
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("TLS handshake with Redis at {addr}: {e}"))?;
                let (read, write) = tokio::io::split(stream);
                (Box::new(read), Box::new(write))
            }
        };
        Ok(Connection {
            reader: BufReader::with_capacity(1 << 16, read),
            commands: Commands {
                writer: BufWriter::with_capacity(1 << 16, write),
            },
        })
    }

    async fn reply(&mut self) -> Result<Reply, String> {
        read_reply(&mut self.reader, 0).await
    }

    /// Sends one command and waits for its reply, which must not be an error.
    async fn call(&mut self, args: &[&[u8]]) -> Result<Reply, String> {
        self.commands.send(args).await?;
        self.commands.flush().await?;
        match self.reply().await? {
            Reply::Error(error) => Err(format!(
                "Redis refused {}: {error}",
                String::from_utf8_lossy(args[0])
            )),
            reply => Ok(reply),
        }
    }

    /// A `CONFIG GET` value, or "" where Redis has no such setting.
    async fn config(&mut self, name: &str) -> Result<String, String> {
        match self.call(&[b"CONFIG", b"GET", name.as_bytes()]).await? {
            Reply::Array(Some(mut items)) => match items.pop() {
                Some(Reply::Bulk(Some(value))) => Ok(String::from_utf8_lossy(&value).into_owned()),
                _ => Ok(String::new()),
            },
            other => Err(format!("CONFIG GET {name} answered {other:?}")),
        }
    }

    /// A field of `INFO server`.
    async fn info(&mut self, field: &str) -> Result<String, String> {
        match self.call(&[b"INFO", b"server"]).await? {
            Reply::Bulk(Some(info)) => Ok(String::from_utf8_lossy(&info)
                .lines()
                .find_map(|line| {
                    line.strip_prefix(field)
                        .and_then(|rest| rest.strip_prefix(':'))
                        .map(str::to_string)
                })
                .unwrap_or_default()),
            other => Err(format!("INFO answered {other:?}")),
        }
    }
}

/// A command as RESP: an array of bulk strings.
fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut command = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    command.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        command.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        command.extend_from_slice(arg);
        command.extend_from_slice(b"\r\n");
    }
    command
}

fn read_reply<'a>(
    reader: &'a mut ReadHalf,
    depth: usize,
) -> Pin<Box<dyn Future<Output = Result<Reply, String>> + Send + 'a>> {
    Box::pin(async move {
        if depth > REPLY_DEPTH_MAX {
            return Err("a Redis reply nested too deep".into());
        }
        let mut line = Vec::new();
        (&mut *reader)
            .take(REPLY_LINE_BYTES_MAX)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| format!("read from Redis: {e}"))?;
        if line.len() < 3 || !line.ends_with(b"\r\n") {
            return Err("Redis closed the connection or sent a malformed reply".into());
        }
        let text = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
        let number = || -> Result<i64, String> {
            text.parse()
                .map_err(|_| format!("a malformed Redis reply: {text:?}"))
        };
        match line[0] {
            b'+' => Ok(Reply::Simple(text)),
            b'-' => Ok(Reply::Error(text)),
            b':' => Ok(Reply::Integer(number()?)),
            b'$' => {
                let len = number()?;
                if len == -1 {
                    return Ok(Reply::Bulk(None));
                }
                let len = usize::try_from(len)
                    .ok()
                    .filter(|len| *len <= BULK_BYTES_MAX)
                    .ok_or_else(|| format!("a Redis bulk string of {len} bytes"))?;
                let mut bytes = vec![0; len + 2];
                reader
                    .read_exact(&mut bytes)
                    .await
                    .map_err(|e| format!("read from Redis: {e}"))?;
                if !bytes.ends_with(b"\r\n") {
                    return Err("a Redis bulk string without its line end".into());
                }
                bytes.truncate(len);
                Ok(Reply::Bulk(Some(bytes)))
            }
            b'*' => {
                let count = number()?;
                if count == -1 {
                    return Ok(Reply::Array(None));
                }
                if !(0..=ARRAY_ITEMS_MAX).contains(&count) {
                    return Err(format!("a Redis array of {count} items"));
                }
                let mut items = Vec::with_capacity((count as usize).min(READ_ENTRIES_MAX));
                for _ in 0..count {
                    items.push(read_reply(reader, depth + 1).await?);
                }
                Ok(Reply::Array(Some(items)))
            }
            other => Err(format!("a Redis reply starting with {:?}", other as char)),
        }
    })
}

/// The started `redis-server`, stopped (SIGTERM, then SIGKILL) when dropped.
struct Server {
    child: Child,
    dir: tempfile::TempDir,
}

impl Server {
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        #[allow(unsafe_code)]
        // SAFETY: kill only sends a signal to our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `redis-server` on a free loopback port, fsyncing before every reply, with no AOF
/// rewrite (a rewrite runs in a child process, whose CPU this run would not count). Retries on
/// another port if another process took the one it picked. With `--tls` it serves TLS 1.3
/// only, on that port.
async fn start_server(args: &RedisArgs) -> Result<(Server, Dial), String> {
    let mut last_error = String::new();
    for _ in 0..3 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(|e| format!("find a free port: {e}"))?
            .port();
        let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
        let mut command = Command::new(&args.redis_server);
        command
            .args(["--bind", "127.0.0.1", "--dir"])
            .arg(dir.path())
            .args(["--logfile", "redis.log"])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--auto-aof-rewrite-percentage", "0", "--save", ""])
            .args(["--protected-mode", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let tls = if args.tls {
            Some(serve_tls(&mut command, dir.path(), port)?)
        } else {
            command.arg("--port").arg(port.to_string());
            None
        };
        // Its own CPUs, not the ones --bench-cpus pinned this process to.
        let cpus = server_cpu_set(args.server_cpus.as_ref());
        #[allow(unsafe_code)]
        // SAFETY: between fork and exec the closure only calls sched_setaffinity, which is
        // async-signal-safe, on a set built before the fork; it allocates nothing.
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(move || {
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &cpus) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = command.spawn().map_err(|e| {
            format!(
                "start {}: {e} (install it, for example `apt-get install redis-server`, or \
                 pass --redis-server or --redis-addr)",
                args.redis_server.display()
            )
        })?;
        let mut server = Server { child, dir };
        let addr = format!("127.0.0.1:{port}");
        let dial = Dial {
            addr: addr.clone(),
            tls: tls.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        // Why the last attempt to talk to it failed (a refused connection while it starts, a
        // failed TLS handshake), for the error if it never answers.
        let mut not_answering;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                let hint = if args.tls {
                    " (with --tls it needs a redis-server built with TLS, as Debian's is; a \
                     build without it refuses the tls-* options on stderr, above)"
                } else {
                    ""
                };
                // Perhaps another process took the port: try another (three in all).
                last_error = format!(
                    "redis-server exited ({status}) before answering on {addr}{hint}:\n{}",
                    server.log_tail()
                );
                break;
            }
            match Connection::open(&dial).await {
                Ok(mut connection) => match connection.call(&[b"PING"]).await {
                    Ok(Reply::Simple(pong)) if pong == "PONG" => {
                        // Ours, not another Redis that took the port first.
                        if connection.info("process_id").await? == server.child.id().to_string() {
                            return Ok((server, dial));
                        }
                        last_error = format!("another Redis answered on {addr}");
                        break;
                    }
                    Ok(other) => not_answering = format!("PING answered {other:?}"),
                    Err(error) => not_answering = error,
                },
                Err(error) => not_answering = error,
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "redis-server did not answer on {addr} within 10 s ({not_answering}):\n{}",
                    server.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Err(last_error)
}

/// Makes `command` serve TLS 1.3 alone on `port` (instead of plain TCP), with a certificate
/// for `localhost` made now and written to `dir`, and returns a connector that trusts it.
/// The cipher is the edge's QUIC one (AES-128-GCM) and the key exchange X25519, as the edge
/// and its clients negotiate; clients are not asked for certificates (the edge authenticates
/// its clients with tokens, not TLS).
fn serve_tls(
    command: &mut Command,
    dir: &std::path::Path,
    port: u16,
) -> Result<TlsConnector, String> {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .map_err(|e| format!("make a certificate for Redis: {e}"))?;
    let (cert_path, key_path) = (dir.join("redis.crt"), dir.join("redis.key"));
    std::fs::write(&cert_path, certified.cert.pem())
        .and_then(|()| std::fs::write(&key_path, certified.key_pair.serialize_pem()))
        .map_err(|e| format!("write Redis's certificate to {}: {e}", dir.display()))?;
    command
        .args(["--port", "0", "--tls-port"])
        .arg(port.to_string())
        .arg("--tls-cert-file")
        .arg(&cert_path)
        .arg("--tls-key-file")
        .arg(&key_path)
        .arg("--tls-ca-cert-file")
        .arg(&cert_path)
        .args(["--tls-auth-clients", "no", "--tls-protocols", "TLSv1.3"])
        .args(["--tls-ciphersuites", "TLS_AES_128_GCM_SHA256"]);
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(certified.cert.der().clone())
        .map_err(|e| format!("trust Redis's certificate: {e}"))?;
    // X25519 alone, as the edge's clients use first.
    let provider = rustls::crypto::CryptoProvider {
        kx_groups: vec![rustls::crypto::ring::kx_group::X25519],
        ..rustls::crypto::ring::default_provider()
    };
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS settings: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(std::sync::Arc::new(config)))
}

/// The CPU set a started Redis runs on: `cpus`, or every online CPU.
fn server_cpu_set(cpus: Option<&CpuList>) -> libc::cpu_set_t {
    let all: Vec<usize> =
        (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
    let cpus = cpus.map_or(&all[..], |list| &list.0[..]);
    #[allow(unsafe_code)]
    // SAFETY: cpu_set_t is plain data, zeroed then filled by CPU_SET for CPUs parse_cpus
    // checked exist (or below the CPU count).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in cpus {
            libc::CPU_SET(*cpu, &mut set);
        }
        set
    }
}

fn stream_key(pair: u32) -> Vec<u8> {
    format!("courier-bench:{pair}").into_bytes()
}

/// A stream entry id, `ms-seq`, as numbers: ids order as these do.
fn parse_id(id: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(id).ok()?;
    let (ms, seq) = text.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// What a pair's sender was told and its receiver got, per message index, for the checks.
struct PairState {
    /// The id each `XADD` was answered with (`None`: not acknowledged).
    acked: Mutex<Vec<Option<(u64, u64)>>>,
    /// The id each index was read under (`None`: not delivered).
    delivered: Mutex<Vec<Option<(u64, u64)>>>,
}

/// Adds `args.msgs` messages to the pair's stream, closed loop (at most `args.in_flight`
/// unanswered) or paced (one per tick, no window), and times each from its send.
async fn sender(
    mut connection: Connection,
    pair: u32,
    args: PairsArgs,
    epoch: Instant,
    paced_start: tokio::time::Instant,
    state: Arc<PairState>,
) -> Result<Histogram<u64>, String> {
    let paced_interval = args
        .rate
        .map(|rate| Duration::from_secs_f64(1.0 / rate.max(0.001)));
    let window = Arc::new(Semaphore::new(args.in_flight.max(1) as usize));
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<(u32, Instant)>();
    let msgs = args.msgs;
    let answers_window = window.clone();
    let mut reader = connection.reader;
    // Answers come in order: this task matches each with its send. It closes the window on
    // every way out, so a sender waiting for room hears of a failure instead of hanging.
    let answers = tokio::spawn(async move {
        let result = async {
            let mut hist = latency_histogram();
            for _ in 0..msgs {
                let reply = read_reply(&mut reader, 0).await?;
                let (index, sent) = sent_rx
                    .recv()
                    .await
                    .ok_or("the sender stopped before its answers")?;
                let id = match &reply {
                    Reply::Bulk(Some(id)) => parse_id(id),
                    _ => None,
                };
                let Some(id) = id else {
                    return Err(format!("XADD answered {reply:?}"));
                };
                let _ = hist.record(micros(sent.elapsed()));
                state.acked.lock().expect("pair state")[index as usize] = Some(id);
                answers_window.add_permits(1);
            }
            Ok::<_, String>(hist)
        }
        .await;
        answers_window.close();
        result
    });
    let key = stream_key(pair);
    let mut ticker = paced_interval.map(|interval| {
        let mut ticker = tokio::time::interval_at(
            paced_start + tick_phase(pair, interval, args.aligned),
            interval,
        );
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        ticker
    });
    let sent: Result<(), String> = async {
        for index in 0..args.msgs {
            // When the send was meant to go: its tick when paced (latencies count from it),
            // else once the window let it.
            let sent_at = match &mut ticker {
                Some(ticker) => ticker.tick().await.into_std(),
                None => {
                    if window
                        .acquire()
                        .await
                        .map(|permit| permit.forget())
                        .is_err()
                    {
                        return Ok(()); // The answers stopped: their error is the run's.
                    }
                    Instant::now()
                }
            };
            let message = body(pair, index, args.bytes, epoch, sent_at);
            connection
                .commands
                .send(&[b"XADD", &key, b"*", b"b", &message])
                .await?;
            if sent_tx.send((index, sent_at)).is_err() {
                return Ok(()); // The answers stopped: their error is the run's.
            }
            // Closed loop: flush once the window is full (the next send waits for an answer),
            // or at the end; paced: every send goes at its tick.
            if ticker.is_some() || window.available_permits() == 0 || index + 1 == args.msgs {
                connection.commands.flush().await?;
            }
        }
        Ok(())
    }
    .await;
    if let Err(error) = sent {
        answers.abort();
        return Err(error);
    }
    answers.await.map_err(|e| format!("sender task: {e}"))?
}

/// Reads the pair's stream until every message came, deleting each batch it read with the
/// next read. Returns when it received the last one, with its latencies.
async fn receiver(
    mut connection: Connection,
    pair: u32,
    (msgs, bytes): (u32, usize),
    epoch: Instant,
    state: Arc<PairState>,
    counters: Arc<Counters>,
) -> Result<(Instant, Histogram<u64>), String> {
    let key = stream_key(pair);
    let mut hist = latency_histogram();
    let mut last_id = (0u64, 0u64);
    let mut last_delivery = Instant::now();
    let count = READ_ENTRIES_MAX.to_string();
    let mut pending_delete: Vec<Vec<u8>> = Vec::new();
    let mut received = 0u32;
    while received < msgs {
        let deleting = !pending_delete.is_empty();
        if deleting {
            let mut command: Vec<&[u8]> = vec![b"XDEL", &key];
            command.extend(pending_delete.iter().map(|id| id.as_slice()));
            connection.commands.send(&command).await?;
        }
        let from = format!("{}-{}", last_id.0, last_id.1);
        connection
            .commands
            .send(&[
                b"XREAD",
                b"COUNT",
                count.as_bytes(),
                b"BLOCK",
                b"1000",
                b"STREAMS",
                &key,
                from.as_bytes(),
            ])
            .await?;
        connection.commands.flush().await?;
        if deleting {
            match connection.reply().await? {
                Reply::Integer(deleted) if deleted as usize == pending_delete.len() => {}
                other => {
                    return Err(format!(
                        "XDEL of {} entries answered {other:?}",
                        pending_delete.len()
                    ));
                }
            }
            pending_delete.clear();
        }
        let entries = match connection.reply().await? {
            Reply::Array(None) => continue,
            Reply::Array(Some(mut streams)) if streams.len() == 1 => match streams.pop() {
                Some(Reply::Array(Some(mut stream))) if stream.len() == 2 => match stream.pop() {
                    Some(Reply::Array(Some(entries))) => entries,
                    other => return Err(format!("XREAD answered {other:?}")),
                },
                other => return Err(format!("XREAD answered {other:?}")),
            },
            other => return Err(format!("XREAD answered {other:?}")),
        };
        for entry in entries {
            let Reply::Array(Some(mut entry)) = entry else {
                return Err("an XREAD entry that is not an array".into());
            };
            let (Some(Reply::Array(Some(mut fields))), Some(Reply::Bulk(Some(id_bytes)))) =
                (entry.pop(), entry.pop())
            else {
                return Err("an XREAD entry without an id and fields".into());
            };
            let Some(id) = parse_id(&id_bytes) else {
                return Err(format!("an XREAD entry id {id_bytes:?}"));
            };
            let Some(Reply::Bulk(Some(message))) = fields.pop() else {
                return Err("an XREAD entry without a body".into());
            };
            let now_ns = epoch.elapsed().as_nanos() as u64;
            last_delivery = Instant::now();
            if id <= last_id {
                counters.reordered.fetch_add(1, Ordering::Relaxed);
            }
            last_id = last_id.max(id);
            pending_delete.push(id_bytes);
            let parsed = parse_body(&message)
                .filter(|_| body_intact(&message, bytes))
                .filter(|(from_pair, index, _)| *from_pair == pair && *index < msgs);
            let Some((_, index, sent_ns)) = parsed else {
                counters.misdelivered.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let mut delivered = state.delivered.lock().expect("pair state");
            if delivered[index as usize].is_some() {
                counters.duplicates.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            delivered[index as usize] = Some(id);
            drop(delivered);
            received += 1;
            counters.delivered.fetch_add(1, Ordering::Relaxed);
            let _ = hist.record((now_ns.saturating_sub(sent_ns) / 1000).max(1));
        }
    }
    if !pending_delete.is_empty() {
        let mut command: Vec<&[u8]> = vec![b"XDEL", &key];
        command.extend(pending_delete.iter().map(|id| id.as_slice()));
        connection.call(&command).await?;
    }
    Ok((last_delivery, hist))
}

#[derive(Default)]
struct Counters {
    delivered: AtomicU64,
    duplicates: AtomicU64,
    reordered: AtomicU64,
    misdelivered: AtomicU64,
}

/// Whether `addr` (`host:port`) is this machine's loopback.
fn is_loopback(addr: &str) -> bool {
    match addr.parse::<std::net::SocketAddr>() {
        Ok(addr) => addr.ip().is_loopback(),
        Err(_) => addr.starts_with("localhost:"),
    }
}

/// The server's CPU seconds so far, if this run started it.
fn server_cpu_secs(pid: Option<u32>) -> Option<f64> {
    pid.and_then(process_usage).map(|(cpu, _)| cpu)
}

/// Runs the pairs workload (`offline`: senders first, then the receivers drain) on Redis.
pub async fn pairs(args: &RedisArgs, offline: bool) -> Result<Report, String> {
    let pairs_args = &args.pairs;
    if pairs_args.bytes < HEADER_BYTES {
        return Err(format!("--bytes must be at least {HEADER_BYTES}"));
    }
    if pairs_args.driver != crate::workloads::Driver::Sdk {
        return Err("--driver chooses how Courier's clients are driven: not with Redis".into());
    }
    if pairs_args.settle_secs > 0 {
        return Err("--settle-secs measures an edge's store on disk: not with Redis".into());
    }
    if args.redis_addr.is_some() && args.server_cpus.is_some() {
        return Err(
            "--server-cpus pins a Redis this run starts: pin a running one with taskset".into(),
        );
    }
    if args.redis_addr.is_some() && args.tls {
        return Err(
            "--tls starts its own Redis with a certificate made for the run: not with \
                    --redis-addr"
                .into(),
        );
    }
    let (server, dial) = match &args.redis_addr {
        Some(addr) => (
            None,
            Dial {
                addr: addr.clone(),
                tls: None,
            },
        ),
        None => {
            let (server, dial) = start_server(args).await?;
            (Some(server), dial)
        }
    };
    let addr = dial.addr.clone();
    let server_pid = server.as_ref().map(|s| s.child.id());
    let mut admin = Connection::open(&dial).await?;
    let append_only = admin.config("appendonly").await?;
    let fsync = admin.config("appendfsync").await?;
    if append_only != "yes" || fsync != "always" {
        return Err(format!(
            "Redis at {addr} has appendonly {append_only:?} and appendfsync {fsync:?}: it \
             answers before its writes are on disk, which is not what Courier is compared with. \
             Run `CONFIG SET appendonly yes` and `CONFIG SET appendfsync always` on it first"
        ));
    }
    let version = admin.info("redis_version").await?;
    for pair in 0..pairs_args.pairs {
        admin.call(&[b"DEL", &stream_key(pair)]).await?;
    }

    let workload = if offline {
        "redis-offline"
    } else {
        "redis-pairs"
    };
    let mut report = Report::new(
        workload,
        json!({
            "pairs": pairs_args.pairs, "msgs": pairs_args.msgs, "bytes": pairs_args.bytes,
            "in_flight": pairs_args.in_flight, "rate": pairs_args.rate,
            "aligned": pairs_args.aligned,
        }),
    );
    report.server = if dial.tls.is_some() {
        format!("redis {version} over TLS")
    } else {
        format!("redis {version}")
    };
    report
        .extra
        .insert("redis_tls".into(), json!(dial.tls.is_some()));
    report
        .extra
        .insert("redis_appendfsync".into(), json!(fsync));
    let epoch = Instant::now();
    let states: Vec<Arc<PairState>> = (0..pairs_args.pairs)
        .map(|_| {
            Arc::new(PairState {
                acked: Mutex::new(vec![None; pairs_args.msgs as usize]),
                delivered: Mutex::new(vec![None; pairs_args.msgs as usize]),
            })
        })
        .collect();
    let counters = Arc::new(Counters::default());
    // Everyone connects before the clock starts, as in `pairs`; offline, the receivers come
    // back within the drain, as Courier's do (their handshakes and logins are its cost).
    let mut sender_connections = Vec::new();
    let mut receiver_connections = Vec::new();
    for _ in 0..pairs_args.pairs {
        sender_connections.push(Connection::open(&dial).await?);
        if !offline {
            receiver_connections.push(Connection::open(&dial).await?);
        }
    }

    let server_cpu_start = server_cpu_secs(server_pid);
    // Its context switches, and the disk under its append-only file.
    let server_counters = ServerCounters::start(
        server_pid.into_iter().collect(),
        server
            .as_ref()
            .map(|server| server.dir.path().to_path_buf()),
    );
    let bench_cpu_start = own_cpu_secs();
    let segments = TcpSegments::read();
    let start = Instant::now();
    let spawn_receivers = |connections: Vec<Connection>| {
        connections
            .into_iter()
            .enumerate()
            .map(|(pair, connection)| {
                tokio::spawn(receiver(
                    connection,
                    pair as u32,
                    (pairs_args.msgs, pairs_args.bytes),
                    epoch,
                    states[pair].clone(),
                    counters.clone(),
                ))
            })
            .collect::<Vec<_>>()
    };
    let mut receive_tasks = if offline {
        Vec::new()
    } else {
        spawn_receivers(std::mem::take(&mut receiver_connections))
    };
    let paced_start = tokio::time::Instant::now();
    let send_tasks: Vec<_> = sender_connections
        .into_iter()
        .enumerate()
        .map(|(pair, connection)| {
            tokio::spawn(sender(
                connection,
                pair as u32,
                pairs_args.clone(),
                epoch,
                paced_start,
                states[pair].clone(),
            ))
        })
        .collect();
    let mut ack_hist = latency_histogram();
    for task in send_tasks {
        match task.await {
            Ok(Ok(hist)) => ack_hist.add(&hist).expect("same bounds"),
            Ok(Err(error)) => report.errors.push(error),
            Err(error) => report.errors.push(error.to_string()),
        }
    }
    let sends_done = Instant::now();
    // The drain starts as the sends end (nothing is measured in between, as `offline` does).
    let drain_start = sends_done;
    let drain_cpu_start = (server_cpu_secs(server_pid), own_cpu_secs());
    if offline {
        for _ in 0..pairs_args.pairs {
            receiver_connections.push(Connection::open(&dial).await?);
        }
        receive_tasks = spawn_receivers(receiver_connections);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(pairs_args.drain_timeout_secs);
    let mut last_delivery = sends_done;
    let mut deliver_hist = latency_histogram();
    let mut receive_tasks = receive_tasks.into_iter();
    for task in receive_tasks.by_ref() {
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(Ok((last, hist)))) => {
                last_delivery = last_delivery.max(last);
                deliver_hist.add(&hist).expect("same bounds");
            }
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
    for task in receive_tasks {
        task.abort();
    }
    if offline {
        if let (Some(start), Some(now)) = (drain_cpu_start.0, server_cpu_secs(server_pid)) {
            report
                .extra
                .insert("drain_edge_cpu_secs".into(), json!(now - start));
        }
        if let (Some(start), Some(now)) = (drain_cpu_start.1, own_cpu_secs()) {
            report
                .extra
                .insert("drain_bench_cpu_secs".into(), json!(now - start));
        }
    }
    if let (Some(start), Some(now)) = (server_cpu_start, server_cpu_secs(server_pid)) {
        report.edge_cpu_secs = Some(now - start);
        report.edge_rss_bytes = server_pid.and_then(process_usage).map(|(_, rss)| rss);
    }
    server_counters.finish(&mut report);
    if let (Some(start), Some(now)) = (bench_cpu_start, own_cpu_secs()) {
        report
            .extra
            .insert("bench_cpu_secs".into(), json!(now - start));
    }

    // Checks: every acknowledged message delivered, under the id the sender was told.
    for state in &states {
        let acked = state.acked.lock().expect("pair state");
        let delivered = state.delivered.lock().expect("pair state");
        for (acked, delivered) in acked.iter().zip(delivered.iter()) {
            match (acked, delivered) {
                (Some(_), None) => report.lost += 1,
                (Some(acked), Some(delivered)) if acked != delivered => {
                    report.seq_mismatches += 1;
                }
                _ => {}
            }
            report.messages_acked += u64::from(acked.is_some());
        }
    }
    report.messages_sent = u64::from(pairs_args.pairs) * u64::from(pairs_args.msgs);
    report.messages_delivered = counters.delivered.load(Ordering::Relaxed);
    report.duplicates = counters.duplicates.load(Ordering::Relaxed);
    report.misdelivered = counters.misdelivered.load(Ordering::Relaxed);
    report.reordered = counters.reordered.load(Ordering::Relaxed);
    if let Some(segments) = segments {
        // The connections' closing segments are in the count too: a few hundred against
        // hundreds of thousands.
        segments.record_since(&mut report, is_loopback(&addr));
    }
    let clocks = RunClocks {
        start,
        sends_done,
        drain_start,
        last_delivery,
    };
    clocks.fill(&mut report, offline);
    report.send_ack_latency = Latency::from_histogram(&ack_hist);
    if !offline {
        report.deliver_latency = Latency::from_histogram(&deliver_hist);
    }
    for pair in 0..pairs_args.pairs {
        admin.call(&[b"DEL", &stream_key(pair)]).await?;
    }
    drop(server);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parser reads the replies an `XREAD` and its neighbours give, and refuses what is
    /// not RESP instead of guessing.
    /// A connection to a loopback server that writes `bytes` to its one client, then holds
    /// the connection open a moment.
    async fn connection_to_a_server_writing(bytes: Vec<u8>) -> Connection {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let _ = socket.write_all(&bytes).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        Connection::open(&Dial {
            addr: addr.to_string(),
            tls: None,
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn replies_parse_and_garbage_is_refused() {
        let mut connection = connection_to_a_server_writing(
            b"+OK\r\n:12\r\n$-1\r\n*-1\r\n*1\r\n*2\r\n$3\r\nkey\r\n*1\r\n*2\r\n$3\r\n1-0\r\n\
              *2\r\n$1\r\nb\r\n$5\r\nhello\r\n-ERR nope\r\n$-2\r\n$3\r\nabcXY?what\r\n"
                .to_vec(),
        )
        .await;
        assert!(matches!(connection.reply().await, Ok(Reply::Simple(s)) if s == "OK"));
        assert!(matches!(connection.reply().await, Ok(Reply::Integer(12))));
        assert!(matches!(connection.reply().await, Ok(Reply::Bulk(None))));
        assert!(matches!(connection.reply().await, Ok(Reply::Array(None))));
        let Ok(Reply::Array(Some(streams))) = connection.reply().await else {
            panic!("an XREAD reply");
        };
        assert_eq!(streams.len(), 1);
        assert!(matches!(connection.reply().await, Ok(Reply::Error(e)) if e == "ERR nope"));
        // A negative length other than -1, and a bulk string without its line end.
        assert!(connection.reply().await.is_err());
        assert!(connection.reply().await.is_err());
    }

    /// A reply line with no end in sight is refused once it passes the bound, not read into
    /// memory for ever.
    #[tokio::test]
    async fn an_endless_reply_line_is_refused() {
        let mut endless = vec![b'a'; 1 << 20];
        endless[0] = b'+';
        let mut connection = connection_to_a_server_writing(endless).await;
        assert!(connection.reply().await.is_err());
    }

    #[test]
    fn stream_ids_parse_and_order_as_numbers() {
        assert_eq!(parse_id(b"1700000000000-12"), Some((1_700_000_000_000, 12)));
        assert!(parse_id(b"9-2") < parse_id(b"10-0"));
        assert_eq!(parse_id(b"12"), None);
        assert_eq!(parse_id(b"a-b"), None);
    }
}
