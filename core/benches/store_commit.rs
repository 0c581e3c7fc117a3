//! Durable commit throughput of the embedded (fjall) store through the real commit logic.
//!
//! For each batch size (1, 10, 100, 1000) it commits batches of 200-byte sends to random
//! inboxes with `Committer::commit_batch` (dedupe lookups, sequence counters, message, dedupe and
//! expiry-index writes) and one fsync per batch, for a fixed time, and prints a Markdown table.
//!
//! Run: `cargo bench -p courier-core --bench store_commit -- [--seconds N] [--dir PATH] [--batch N]`
//! The directory must be on the disk you want to measure (not tmpfs); default: `target/`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use courier_core::CoreConfig;
use courier_core::commit::{Committer, Request, SendRequest};
use courier_core::rng::Rng;
use courier_core::store::fjall::{FjallOptions, FjallStore};

const BODY_BYTES: usize = 200;
const INBOXES: u64 = 100_000;

fn main() {
    let mut seconds = 5.0f64;
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/store-bench");
    let mut batch_sizes = vec![1usize, 10, 100, 1000];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => seconds = args.next().and_then(|v| v.parse().ok()).expect("--seconds N"),
            "--dir" => dir = PathBuf::from(args.next().expect("--dir PATH")),
            "--batch" => batch_sizes = vec![args.next().and_then(|v| v.parse().ok()).expect("--batch N")],
            // `cargo bench` passes --bench; anything else is a mistake worth reporting.
            "--bench" => {}
            other => {
                eprintln!("unknown argument {other}; usage: store_commit [--seconds N] [--dir PATH] [--batch N]");
                std::process::exit(2);
            }
        }
    }
    println!("| batch size | messages/s | batches/s (fsyncs/s) | commit p50 | commit p99 |");
    println!("|---:|---:|---:|---:|---:|");
    for batch_size in batch_sizes {
        let run_dir = dir.join(format!("batch-{batch_size}"));
        let _ = std::fs::remove_dir_all(&run_dir);
        std::fs::create_dir_all(&run_dir).expect("create bench dir");
        let result = run(&run_dir, batch_size, Duration::from_secs_f64(seconds));
        println!(
            "| {batch_size} | {:.0} | {:.0} | {:.2} ms | {:.2} ms |",
            result.messages as f64 / result.elapsed.as_secs_f64(),
            result.batches as f64 / result.elapsed.as_secs_f64(),
            result.p50.as_secs_f64() * 1e3,
            result.p99.as_secs_f64() * 1e3,
        );
        let _ = std::fs::remove_dir_all(&run_dir);
    }
}

struct RunResult {
    messages: u64,
    batches: u64,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
}

fn run(dir: &std::path::Path, batch_size: usize, duration: Duration) -> RunResult {
    let store = FjallStore::open(dir, &FjallOptions::default()).expect("open store");
    let config = CoreConfig {
        batch_requests_max: batch_size,
        ..CoreConfig::default()
    };
    let mut committer = Committer::new(&config);
    let mut rng = Rng::new(batch_size as u64);
    let mut client_id = 0u64;
    let mut latencies = Vec::new();
    let mut messages = 0u64;
    let now_ms = 1_700_000_000_000u64;
    let start = Instant::now();
    while start.elapsed() < duration {
        let batch: Vec<Request> = (0..batch_size)
            .map(|_| {
                client_id += 1;
                Request::Send(SendRequest {
                    sender: 1 + rng.below(INBOXES),
                    client_id,
                    to: 1 + rng.below(INBOXES),
                    body: vec![0x5A; BODY_BYTES],
                    ttl_secs: None,
                })
            })
            .collect();
        let commit_start = Instant::now();
        let outcomes = committer.commit_batch(&store, &batch, now_ms + messages).expect("commit");
        latencies.push(commit_start.elapsed());
        assert_eq!(outcomes.len(), batch_size);
        messages += batch_size as u64;
    }
    let elapsed = start.elapsed();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    RunResult {
        messages,
        batches: latencies.len() as u64,
        elapsed,
        p50: at(0.50),
        p99: at(0.99),
    }
}
