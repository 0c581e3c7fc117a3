//! Durable commit throughput of the embedded (fjall) store through the real commit logic.
//!
//! For each batch size (1, 10, 100, 1000) it commits batches of 200-byte sends to random
//! inboxes with `Committer::commit_batch` (dedupe lookups, sequence counters, message, dedupe and
//! expiry-index writes) and one fsync per batch, for a fixed time, and prints a Markdown table.
//!
//! With `--raw`, each message is a single `Transaction::set` of its 200-byte body (no dedupe,
//! no counter, no index): the ceiling of the store layer, for comparison.
//!
//! With `--writers N`, N threads commit at once, each to its own store, as N shards of an edge
//! do (each shard owns an embedded store and a writer thread).
//!
//! With `--memory`, the same commit logic runs over `MemoryStore` (a map, no disk): what the
//! logic itself costs, the ceiling no embedded engine can pass.
//!
//! With `--messages N`, each writer stops after N messages (rounded up to whole batches)
//! instead of after `--seconds`: the same work every run, for counting instructions
//! (`valgrind --tool=callgrind`).
//!
//! Run: `cargo bench -p courier-core --bench store_commit -- [--seconds N] [--messages N] [--dir PATH] [--batch N] [--writers N] [--inboxes N] [--raw] [--memory]`
//! The directory must be on the disk you want to measure (not tmpfs); default: `target/`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use courier_core::commit::{Committer, Request, SendRequest};
use courier_core::rng::Rng;
use courier_core::store::fjall::{FjallOptions, FjallStore};
use courier_core::store::{Store, Transaction};
use courier_core::{CoreConfig, keys};

const BODY_BYTES: usize = 200;
/// Users messages go between, unless `--inboxes` says otherwise.
const INBOXES_DEFAULT: u64 = 100_000;

fn main() {
    let mut seconds = 5.0f64;
    let mut messages_max: Option<u64> = None;
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/store-bench");
    let mut batch_sizes = vec![1usize, 10, 100, 1000];
    let mut writers = 1usize;
    let mut raw = false;
    let mut memory = false;
    let mut inboxes = INBOXES_DEFAULT;
    let mut memtable_mib: Option<u64> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n: &f64| n > 0.0)
                    .expect("--seconds N (more than 0)")
            }
            "--messages" => {
                messages_max = Some(
                    args.next()
                        .and_then(|v| v.parse().ok())
                        .filter(|&n| n > 0)
                        .expect("--messages N (at least 1)"),
                )
            }
            "--dir" => dir = PathBuf::from(args.next().expect("--dir PATH")),
            "--raw" => raw = true,
            "--memory" => memory = true,
            "--memtable-mib" => {
                memtable_mib = Some(
                    args.next()
                        .and_then(|v| v.parse::<u64>().ok())
                        .filter(|&n| n > 0)
                        .expect("--memtable-mib N (at least 1)"),
                )
            }
            "--inboxes" => {
                inboxes = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n > 0)
                    .expect("--inboxes N (at least 1)")
            }
            "--writers" => {
                writers = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--writers N")
            }
            "--batch" => {
                batch_sizes = vec![args.next().and_then(|v| v.parse().ok()).expect("--batch N")]
            }
            // `cargo bench` passes --bench; anything else is a mistake worth reporting.
            "--bench" => {}
            other => {
                eprintln!(
                    "unknown argument {other}; usage: store_commit [--seconds N] [--messages N] [--dir PATH] [--batch N] [--writers N] [--inboxes N] [--memtable-mib N] [--raw] [--memory]"
                );
                std::process::exit(2);
            }
        }
    }
    println!(
        "mode: {}",
        if raw {
            "raw set per message"
        } else {
            "commit logic"
        }
    );
    println!(
        "| writers | batch size | messages/s | batches/s (fsyncs/s) | commit p50 | commit p99 |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for batch_size in batch_sizes {
        let duration = Duration::from_secs_f64(seconds);
        let results: Vec<RunResult> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..writers)
                .map(|writer| {
                    let run_dir = dir.join(format!("batch-{batch_size}-writer-{writer}"));
                    scope.spawn(move || {
                        let _ = std::fs::remove_dir_all(&run_dir);
                        std::fs::create_dir_all(&run_dir).expect("create bench dir");
                        let engine = if memory {
                            Engine::Memory
                        } else {
                            Engine::Fjall { memtable_mib }
                        };
                        let workload = Workload {
                            batch_size,
                            writer: writer as u64,
                            duration,
                            messages_max,
                            raw,
                            inboxes,
                        };
                        let result = run(&run_dir, engine, &workload);
                        let _ = std::fs::remove_dir_all(&run_dir);
                        result
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("writer thread"))
                .collect()
        });
        let elapsed = results.iter().map(|r| r.elapsed).max().expect("one writer");
        let messages: u64 = results.iter().map(|r| r.messages).sum();
        let mut latencies: Vec<Duration> = results.into_iter().flat_map(|r| r.latencies).collect();
        latencies.sort();
        let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
        println!(
            "| {writers} | {batch_size} | {:.0} | {:.0} | {:.2} ms | {:.2} ms |",
            messages as f64 / elapsed.as_secs_f64(),
            latencies.len() as f64 / elapsed.as_secs_f64(),
            at(0.50).as_secs_f64() * 1e3,
            at(0.99).as_secs_f64() * 1e3,
        );
    }
}

struct RunResult {
    messages: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

/// What the commits run on.
#[derive(Clone, Copy)]
enum Engine {
    /// The embedded store, with fjall's default memtable size unless given.
    Fjall { memtable_mib: Option<u64> },
    /// An in-memory map: what the commit logic costs without an engine.
    Memory,
}

/// What one writer thread commits, whatever the engine.
struct Workload {
    batch_size: usize,
    /// The writer's number, which seeds its random users.
    writer: u64,
    duration: Duration,
    /// Stop after this many messages instead (then `duration` does not apply).
    messages_max: Option<u64>,
    raw: bool,
    inboxes: u64,
}

fn run(dir: &std::path::Path, engine: Engine, workload: &Workload) -> RunResult {
    match engine {
        Engine::Memory => run_on(&courier_core::store::memory::MemoryStore::new(), workload),
        Engine::Fjall { memtable_mib } => {
            let mut options = FjallOptions::default();
            if let Some(mib) = memtable_mib {
                options.memtable_bytes_max = mib * 1024 * 1024;
            }
            run_on(
                &FjallStore::open(dir, &options).expect("open store"),
                workload,
            )
        }
    }
}

fn run_on<S: Store>(store: &S, workload: &Workload) -> RunResult {
    let &Workload {
        batch_size,
        writer,
        duration,
        messages_max,
        raw,
        inboxes,
    } = workload;
    let config = CoreConfig {
        batch_requests_max: batch_size,
        ..CoreConfig::default()
    };
    let mut committer = Committer::new(&config);
    let mut rng = Rng::new(batch_size as u64 * 1000 + writer);
    let mut client_id = 0u64;
    let mut latencies = Vec::new();
    let mut messages = 0u64;
    let now_ms = 1_700_000_000_000u64;
    let start = Instant::now();
    let more = |messages: u64| match messages_max {
        Some(max) => messages < max,
        None => start.elapsed() < duration,
    };
    while more(messages) {
        let batch: Vec<Request> = (0..batch_size)
            .map(|_| {
                client_id += 1;
                Request::Send(SendRequest {
                    sender: 1 + rng.below(inboxes),
                    client_id,
                    to: 1 + rng.below(inboxes),
                    body: vec![0x5A; BODY_BYTES],
                    ttl_secs: None,
                })
            })
            .collect();
        let commit_start = Instant::now();
        if raw {
            let mut txn = store.begin().expect("begin");
            for (index, request) in batch.iter().enumerate() {
                if let Request::Send(send) = request {
                    txn.set(&keys::message(send.to, messages + index as u64), &send.body);
                }
            }
            txn.commit().expect("commit");
        } else {
            let outcomes = committer
                .commit_batch(store, &batch, now_ms + messages)
                .expect("commit");
            assert_eq!(outcomes.len(), batch_size);
        }
        latencies.push(commit_start.elapsed());
        messages += batch_size as u64;
    }
    RunResult {
        messages,
        elapsed: start.elapsed(),
        latencies,
    }
}
