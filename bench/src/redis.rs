//! The same pairs workloads against Redis Streams, the durable peer issue 10 compares with,
//! so the comparison can be run again side by side on any box (decision 0024).
//!
//! Each pair has a stream. The sender adds its messages with `XADD` (at most `--in-flight`
//! unanswered, or paced); Redis runs with `appendonly yes` and `appendfsync always`, so it
//! answers an `XADD` only after the append is fsynced, as Courier answers a send only after
//! its commit is. The receiver reads its stream with `XREAD BLOCK` and deletes what it read
//! with `XDEL` (the acknowledgement: nothing is kept once delivered). The checks are
//! Courier's: every acknowledged message delivered once, in order.
//!
//! The client is a minimal RESP2 one written here (commands out, replies parsed in order),
//! pipelined per connection like Courier's clients; no Redis client crate is needed.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Semaphore;

use crate::edge::process_usage;
use crate::report::{Latency, Report, latency_histogram};
use crate::workloads::PairsArgs;

/// Bytes of the header every message body starts with: pair, index, send time (as Courier's
/// workloads write it).
const HEADER_BYTES: usize = 4 + 4 + 8;
/// Entries one `XREAD` returns at most.
const READ_COUNT: usize = 1000;
/// Nesting of a reply the parser accepts (an `XREAD` reply is four deep).
const REPLY_DEPTH_MAX: usize = 8;
/// Bytes of one bulk string the parser accepts.
const BULK_BYTES_MAX: usize = 64 << 20;

#[derive(Args, Debug, Clone)]
pub struct RedisArgs {
    #[command(flatten)]
    pub pairs: PairsArgs,
    /// A running Redis to use instead of starting one (it must fsync as this run is meant to
    /// compare: `appendonly yes`, `appendfsync always`). Its streams `courier-bench:*` are
    /// deleted first.
    #[arg(long)]
    pub redis_addr: Option<String>,
    /// The `redis-server` binary to start (without --redis-addr).
    #[arg(long, default_value = "redis-server")]
    pub redis_server: PathBuf,
    /// CPUs the started Redis may run on, like `0` (as --edge-cpus pins a spawned edge).
    #[arg(long)]
    pub server_cpus: Option<String>,
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

/// A pipelined RESP connection: commands are buffered until `flush`, replies read in order.
struct Connection {
    reader: BufReader<OwnedReadHalf>,
    writer: BufWriter<OwnedWriteHalf>,
}

impl Connection {
    async fn open(addr: &str) -> Result<Connection, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect to Redis at {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (read, write) = stream.into_split();
        Ok(Connection {
            reader: BufReader::with_capacity(1 << 16, read),
            writer: BufWriter::with_capacity(1 << 16, write),
        })
    }

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

    async fn reply(&mut self) -> Result<Reply, String> {
        read_reply(&mut self.reader, 0).await
    }

    /// Sends one command and waits for its reply, which must not be an error.
    async fn call(&mut self, args: &[&[u8]]) -> Result<Reply, String> {
        self.send(args).await?;
        self.flush().await?;
        match self.reply().await? {
            Reply::Error(error) => Err(format!(
                "Redis refused {}: {error}",
                String::from_utf8_lossy(args[0])
            )),
            reply => Ok(reply),
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
    reader: &'a mut BufReader<OwnedReadHalf>,
    depth: usize,
) -> Pin<Box<dyn Future<Output = Result<Reply, String>> + Send + 'a>> {
    Box::pin(async move {
        if depth > REPLY_DEPTH_MAX {
            return Err("a Redis reply nested too deep".into());
        }
        let mut line = Vec::new();
        reader
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
                if len < 0 {
                    return Ok(Reply::Bulk(None));
                }
                let len = len as usize;
                if len > BULK_BYTES_MAX {
                    return Err(format!("a Redis bulk string of {len} bytes"));
                }
                let mut bytes = vec![0; len + 2];
                reader
                    .read_exact(&mut bytes)
                    .await
                    .map_err(|e| format!("read from Redis: {e}"))?;
                bytes.truncate(len);
                Ok(Reply::Bulk(Some(bytes)))
            }
            b'*' => {
                let count = number()?;
                if count < 0 {
                    return Ok(Reply::Array(None));
                }
                let mut items = Vec::with_capacity((count as usize).min(READ_COUNT));
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
    _dir: tempfile::TempDir,
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

/// Starts `redis-server` on a free loopback port, fsyncing before every reply.
async fn start_server(args: &RedisArgs) -> Result<(Server, String), String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map_err(|e| format!("find a free port: {e}"))?
        .port();
    let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
    let server_args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--dir",
        &dir.path().display().to_string(),
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
        "--protected-mode",
        "no",
        "--daemonize",
        "no",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut command = match &args.server_cpus {
        Some(cpus) => {
            let mut command = Command::new("taskset");
            command.arg("-c").arg(cpus).arg(&args.redis_server);
            command
        }
        None => Command::new(&args.redis_server),
    };
    let child = command
        .args(&server_args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| {
            format!(
                "start {}: {e} (install it, for example `apt-get install redis-server`, or \
                 pass --redis-server or --redis-addr)",
                args.redis_server.display()
            )
        })?;
    let server = Server { child, _dir: dir };
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut connection) = Connection::open(&addr).await
            && let Ok(Reply::Simple(pong)) = connection.call(&[b"PING"]).await
            && pong == "PONG"
        {
            return Ok((server, addr));
        }
        if Instant::now() > deadline {
            return Err(format!("redis-server did not answer on {addr} within 10 s"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn stream_key(pair: u32) -> Vec<u8> {
    format!("courier-bench:{pair}").into_bytes()
}

/// What one sender saw.
#[derive(Default)]
struct SenderResult {
    acked: u64,
    send_ack_us: Vec<u64>,
}

/// Adds `args.msgs` messages to the pair's stream, at most `args.in_flight` unanswered (or
/// paced at `args.rate`), and times each answer.
async fn sender(
    addr: String,
    pair: u32,
    args: PairsArgs,
    epoch: Instant,
) -> Result<SenderResult, String> {
    let connection = Connection::open(&addr).await?;
    let Connection { mut reader, writer } = connection;
    let window = Arc::new(Semaphore::new(args.in_flight.max(1) as usize));
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let msgs = args.msgs;
    let reader_window = window.clone();
    // Answers come in order: this task matches each with its send time.
    let answers = tokio::spawn(async move {
        let mut result = SenderResult::default();
        for _ in 0..msgs {
            let reply = read_reply(&mut reader, 0).await?;
            let sent = sent_rx
                .recv()
                .await
                .ok_or("the sender stopped before its answers")?;
            match reply {
                Reply::Bulk(Some(_)) => {}
                other => return Err(format!("XADD answered {other:?}")),
            }
            result.acked += 1;
            result.send_ack_us.push(sent.elapsed().as_micros() as u64);
            reader_window.add_permits(1);
        }
        Ok::<_, String>(result)
    });
    let key = stream_key(pair);
    let mut writer = Connection::writer_only(writer);
    let interval = args.rate.map(|rate| Duration::from_secs_f64(1.0 / rate));
    let start = Instant::now();
    let mut body = vec![0u8; args.bytes.max(HEADER_BYTES)];
    for index in 0..args.msgs {
        if let Some(interval) = interval {
            // Spread over the interval, as independent clients' ticks would be.
            let offset = interval.mul_f64(f64::from(pair % 100) / 100.0);
            tokio::time::sleep_until((start + offset + interval * index).into()).await;
        }
        window.acquire().await.map_err(|e| e.to_string())?.forget();
        body[..4].copy_from_slice(&pair.to_le_bytes());
        body[4..8].copy_from_slice(&index.to_le_bytes());
        body[8..16].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
        writer.send(&[b"XADD", &key, b"*", b"b", &body]).await?;
        sent_tx.send(Instant::now()).map_err(|e| e.to_string())?;
        // Flush unless the next send is free to go at once (closed loop with room left).
        if interval.is_some() || window.available_permits() == 0 || index + 1 == args.msgs {
            writer.flush().await?;
        }
    }
    answers.await.map_err(|e| format!("sender task: {e}"))?
}

impl Connection {
    /// The write half alone (a task reads the answers).
    fn writer_only(writer: BufWriter<OwnedWriteHalf>) -> WriteOnly {
        WriteOnly { writer }
    }
}

struct WriteOnly {
    writer: BufWriter<OwnedWriteHalf>,
}

impl WriteOnly {
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

/// What one receiver saw.
#[derive(Default)]
struct ReceiverResult {
    delivered: u64,
    duplicates: u64,
    reordered: u64,
    deliver_us: Vec<u64>,
}

/// Reads the pair's stream until `expected` messages came, deleting each batch it read.
async fn receiver(
    addr: String,
    pair: u32,
    expected: u32,
    epoch: Instant,
    timeout: Duration,
    delivered_total: Arc<AtomicU64>,
) -> Result<ReceiverResult, String> {
    let mut connection = Connection::open(&addr).await?;
    let key = stream_key(pair);
    let mut result = ReceiverResult::default();
    let mut last_id = b"0".to_vec();
    let mut next_index = 0u32;
    let count = READ_COUNT.to_string();
    let mut pending_delete: Vec<Vec<u8>> = Vec::new();
    let mut last_progress = Instant::now();
    while next_index < expected {
        if last_progress.elapsed() > timeout {
            break;
        }
        // The acknowledgement of the last batch goes with the next read.
        let deleting = !pending_delete.is_empty();
        if deleting {
            let mut command: Vec<&[u8]> = vec![b"XDEL", &key];
            command.extend(pending_delete.iter().map(|id| id.as_slice()));
            connection.send(&command).await?;
        }
        connection
            .send(&[
                b"XREAD",
                b"COUNT",
                count.as_bytes(),
                b"BLOCK",
                b"1000",
                b"STREAMS",
                &key,
                &last_id,
            ])
            .await?;
        connection.flush().await?;
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
        let now = epoch.elapsed().as_nanos() as u64;
        for entry in entries {
            let Reply::Array(Some(mut entry)) = entry else {
                return Err("an XREAD entry that is not an array".into());
            };
            let (Some(Reply::Array(Some(mut fields))), Some(Reply::Bulk(Some(id)))) =
                (entry.pop(), entry.pop())
            else {
                return Err("an XREAD entry without an id and fields".into());
            };
            let Some(Reply::Bulk(Some(body))) = fields.pop() else {
                return Err("an XREAD entry without a body".into());
            };
            if body.len() < HEADER_BYTES {
                return Err(format!("a body of {} bytes", body.len()));
            }
            let index = u32::from_le_bytes(body[4..8].try_into().expect("4 bytes"));
            let sent = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
            if index < next_index {
                result.duplicates += 1;
            } else {
                if index > next_index {
                    result.reordered += 1;
                }
                next_index = index + 1;
                result.delivered += 1;
                delivered_total.fetch_add(1, Ordering::Relaxed);
                result.deliver_us.push(now.saturating_sub(sent) / 1000);
            }
            last_id = id.clone();
            pending_delete.push(id);
            last_progress = Instant::now();
        }
    }
    if !pending_delete.is_empty() {
        let mut command: Vec<&[u8]> = vec![b"XDEL", &key];
        command.extend(pending_delete.iter().map(|id| id.as_slice()));
        connection.call(&command).await?;
    }
    Ok(result)
}

/// Runs the pairs workload (`offline`: senders first, then the receivers drain) on Redis.
pub async fn pairs(args: &RedisArgs, offline: bool) -> Result<Report, String> {
    let pairs_args = &args.pairs;
    if pairs_args.bytes < HEADER_BYTES {
        return Err(format!("--bytes must be at least {HEADER_BYTES}"));
    }
    if pairs_args.pairs == 0 || pairs_args.msgs == 0 {
        return Err("--pairs and --msgs must be at least 1".into());
    }
    let (server, addr) = match &args.redis_addr {
        Some(addr) => (None, addr.clone()),
        None => {
            let (server, addr) = start_server(args).await?;
            (Some(server), addr)
        }
    };
    let server_pid = server.as_ref().map(|s| s.child.id());
    let mut admin = Connection::open(&addr).await?;
    for pair in 0..pairs_args.pairs {
        admin.call(&[b"DEL", &stream_key(pair)]).await?;
    }
    let fsync = match admin.call(&[b"CONFIG", b"GET", b"appendfsync"]).await? {
        Reply::Array(Some(mut items)) => match items.pop() {
            Some(Reply::Bulk(Some(value))) => String::from_utf8_lossy(&value).into_owned(),
            _ => "unknown".into(),
        },
        _ => "unknown".into(),
    };
    let version = match admin.call(&[b"INFO", b"server"]).await? {
        Reply::Bulk(Some(info)) => String::from_utf8_lossy(&info)
            .lines()
            .find_map(|line| line.strip_prefix("redis_version:").map(str::to_string))
            .unwrap_or_default(),
        _ => String::new(),
    };

    let workload = if offline {
        "redis-offline"
    } else {
        "redis-pairs"
    };
    let mut report = Report::new(
        workload,
        json!({
            "pairs": pairs_args.pairs,
            "msgs": pairs_args.msgs,
            "bytes": pairs_args.bytes,
            "in_flight": pairs_args.in_flight,
            "rate": pairs_args.rate,
        }),
    );
    report.server = format!("redis {version}");
    report
        .extra
        .insert("redis_appendfsync".into(), json!(fsync));
    let cpu = |pid: Option<u32>| pid.and_then(process_usage).map(|(cpu, _)| cpu);
    let server_cpu_start = cpu(server_pid);
    let bench_cpu_start = cpu(Some(std::process::id()));
    let epoch = Instant::now();
    let timeout = Duration::from_secs(pairs_args.drain_timeout_secs);
    let delivered_total = Arc::new(AtomicU64::new(0));

    let spawn_receivers = || {
        (0..pairs_args.pairs)
            .map(|pair| {
                tokio::spawn(receiver(
                    addr.clone(),
                    pair,
                    pairs_args.msgs,
                    epoch,
                    timeout,
                    delivered_total.clone(),
                ))
            })
            .collect::<Vec<_>>()
    };
    let receivers = (!offline).then(spawn_receivers);
    let senders: Vec<_> = (0..pairs_args.pairs)
        .map(|pair| tokio::spawn(sender(addr.clone(), pair, pairs_args.clone(), epoch)))
        .collect();
    let mut send_ack = latency_histogram();
    for task in senders {
        let result = task.await.map_err(|e| format!("sender task: {e}"))??;
        report.messages_acked += result.acked;
        for us in result.send_ack_us {
            let _ = send_ack.record(us.max(1));
        }
    }
    report.messages_sent = u64::from(pairs_args.pairs) * u64::from(pairs_args.msgs);
    let drain_start = Instant::now();
    let drain_cpu_start = (cpu(server_pid), cpu(Some(std::process::id())));
    let receivers = match receivers {
        Some(receivers) => receivers,
        None => spawn_receivers(),
    };
    let mut deliver = latency_histogram();
    for task in receivers {
        let result = task.await.map_err(|e| format!("receiver task: {e}"))??;
        report.messages_delivered += result.delivered;
        report.duplicates += result.duplicates;
        report.reordered += result.reordered;
        for us in result.deliver_us {
            let _ = deliver.record(us.max(1));
        }
    }
    let elapsed = epoch.elapsed();
    report.duration_secs = elapsed.as_secs_f64();
    report.lost = report
        .messages_acked
        .saturating_sub(report.messages_delivered);
    report.send_ack_latency = Latency::from_histogram(&send_ack);
    if offline {
        let drain_secs = drain_start.elapsed().as_secs_f64();
        report.delivered_per_sec = report.messages_delivered as f64 / drain_secs.max(1e-9);
        report.extra.insert("drain_secs".into(), json!(drain_secs));
        report
            .extra
            .insert("drain_per_sec".into(), json!(report.delivered_per_sec));
        if let (Some(start), Some(now)) = (drain_cpu_start.0, cpu(server_pid)) {
            report
                .extra
                .insert("drain_server_cpu_secs".into(), json!(now - start));
        }
        if let (Some(start), Some(now)) = (drain_cpu_start.1, cpu(Some(std::process::id()))) {
            report
                .extra
                .insert("drain_bench_cpu_secs".into(), json!(now - start));
        }
    } else {
        report.delivered_per_sec = report.messages_delivered as f64 / elapsed.as_secs_f64();
        report.deliver_latency = Latency::from_histogram(&deliver);
    }
    if let (Some(start), Some(now)) = (server_cpu_start, cpu(server_pid)) {
        report.edge_cpu_secs = Some(now - start);
        report.edge_rss_bytes = server_pid.and_then(process_usage).map(|(_, rss)| rss);
    }
    if let (Some(start), Some(now)) = (bench_cpu_start, cpu(Some(std::process::id()))) {
        report
            .extra
            .insert("bench_cpu_secs".into(), json!(now - start));
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
    #[tokio::test]
    async fn replies_parse_and_garbage_is_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            socket
                .write_all(
                    b"+OK\r\n:12\r\n$-1\r\n*-1\r\n*1\r\n*2\r\n$3\r\nkey\r\n*1\r\n*2\r\n$3\r\n1-0\r\n\
                      *2\r\n$1\r\nb\r\n$5\r\nhello\r\n-ERR nope\r\n?what\r\n",
                )
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        let mut connection = Connection::open(&addr.to_string()).await.unwrap();
        assert!(matches!(connection.reply().await, Ok(Reply::Simple(s)) if s == "OK"));
        assert!(matches!(connection.reply().await, Ok(Reply::Integer(12))));
        assert!(matches!(connection.reply().await, Ok(Reply::Bulk(None))));
        assert!(matches!(connection.reply().await, Ok(Reply::Array(None))));
        let Ok(Reply::Array(Some(streams))) = connection.reply().await else {
            panic!("an XREAD reply");
        };
        assert_eq!(streams.len(), 1);
        assert!(matches!(connection.reply().await, Ok(Reply::Error(e)) if e == "ERR nope"));
        assert!(connection.reply().await.is_err());
        server.await.unwrap();
    }
}
