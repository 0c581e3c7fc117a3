//! How long expiry holds an embedded store when a dedupe window's records fall due.
//!
//! Stores `--sends N` messages (default 200,000) to random inboxes in one dedupe bucket (not
//! timed), then moves the clock two windows (and `DEDUPE_CLEAR_SLACK_MS`) on and runs `expire` passes until none says
//! there is more, as a shard's maintenance thread does. Each pass holds the store's writer
//! lock, so a pass's length is how long every commit of the shard may wait. Prints the
//! passes, the median and the longest pass, the total, and the process's peak memory.
//!
//! With `--ttl-secs N` the messages expire too (N at most a day): the passes also clear the
//! expiry index, delete the messages and list the inboxes they empty. `--inboxes N` (default
//! 100,000) spreads the sends over that many inboxes: one expiry index entry each.
//!
//! With `--log` the store is the log engine (decision 0023) instead of fjall; the table then
//! also gives the CPU the passes took, every thread of the process counted (the log engine's
//! background thread and its dedupe tier's fjall worker too).
//!
//! With `--devices N` it measures the sweep of device records instead: N users each link one
//! device and leave (no message: their inboxes are as expiry leaves forgotten ones), the clock
//! moves past the retention, a first pass begins the sweep's round, and a pass a round's
//! length (`device_sweep_round_ms`) later finds it behind; `sweep_devices` passes then run
//! until it no longer is, as a shard's expiry turn does. Prints those passes as above.
//!
//! Run: `cargo bench -p courier-core --bench expiry -- [--sends N] [--inboxes N] [--ttl-secs N] [--devices N] [--log] [--dir PATH]`
//! The directory must be on the disk you want to measure; default: `target/expiry-bench`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use courier_core::CoreConfig;
use courier_core::commit::{
    Committer, DEDUPE_CLEAR_SLACK_MS, Request, SendRequest, device_sweep_round_ms, expire,
    sweep_devices,
};
use courier_core::rng::Rng;
use courier_core::store::Store;
use courier_core::store::fjall::{FjallOptions, FjallStore};
use courier_core::store::log::{LogOptions, LogStore};

fn main() {
    let mut sends = 200_000u64;
    let mut inboxes = 100_000u64;
    let mut ttl_secs = None;
    let mut devices = None;
    let mut log = false;
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/expiry-bench");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--sends" => {
                sends = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0)
                    .expect("--sends N (at least 1)")
            }
            "--inboxes" => {
                inboxes = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0)
                    .expect("--inboxes N (at least 1)")
            }
            "--ttl-secs" => {
                ttl_secs = Some(
                    args.next()
                        .and_then(|v| v.parse().ok())
                        .filter(|&n| (1..=86_400).contains(&n))
                        .expect("--ttl-secs N (1 to 86400)"),
                )
            }
            "--devices" => {
                devices = Some(
                    args.next()
                        .and_then(|v| v.parse().ok())
                        .filter(|&n| n > 0)
                        .expect("--devices N (at least 1)"),
                )
            }
            "--log" => log = true,
            "--dir" => dir = PathBuf::from(args.next().expect("--dir PATH")),
            // `cargo bench` passes --bench; anything else is a mistake worth reporting.
            "--bench" => {}
            other => {
                eprintln!(
                    "unknown argument {other}; usage: expiry [--sends N] [--inboxes N] [--ttl-secs N] [--devices N] [--log] [--dir PATH]"
                );
                std::process::exit(2);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create bench dir");
    if log {
        let store = LogStore::open(&dir, &LogOptions::default()).expect("open store");
        match devices {
            Some(devices) => sweep(&store, devices),
            None => run(&store, sends, inboxes, ttl_secs),
        }
    } else {
        let store = FjallStore::open(&dir, &FjallOptions::default()).expect("open store");
        match devices {
            Some(devices) => sweep(&store, devices),
            None => run(&store, sends, inboxes, ttl_secs),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Stores the sends, then runs expiry passes until none has more, and prints the table row.
fn run<S: Store>(store: &S, sends: u64, inboxes: u64, ttl_secs: Option<u32>) {
    let config = CoreConfig::default();
    let mut committer = Committer::new(&config);
    let mut rng = Rng::new(1);
    let window_ms = config.dedupe_window_ms;
    let mut stored = 0u64;
    while stored < sends {
        let batch: Vec<Request> = (0..config.batch_requests_max as u64)
            .map(|index| {
                Request::Send(SendRequest {
                    sender: 1 + rng.below(100_000),
                    client_id: stored + index + 1,
                    to: 1 + rng.below(inboxes),
                    body: vec![0x5A; 200],
                    ttl_secs,
                })
            })
            .collect();
        committer
            .commit_batch(store, &batch, window_ms + 1)
            .expect("commit");
        stored += batch.len() as u64;
    }
    // Past the slack expiry leaves for lagging clocks, or the bucket is not yet due.
    let now = 3 * window_ms + DEDUPE_CLEAR_SLACK_MS + 1;
    let mut passes: Vec<Duration> = Vec::new();
    let (mut messages_deleted, mut emptied_listed) = (0u64, 0usize);
    let start = Instant::now();
    let cpu_before = process_cpu_secs();
    loop {
        let pass_start = Instant::now();
        let report = expire(store, now, &config).expect("expire");
        passes.push(pass_start.elapsed());
        messages_deleted += report.messages_deleted;
        emptied_listed += report.emptied.len();
        if !report.more {
            break;
        }
    }
    let total = start.elapsed();
    let cpu = process_cpu_secs() - cpu_before;
    let (count, p50_ms, longest_ms) = pass_times(passes);
    println!(
        "| dedupe records due | messages deleted | emptied inboxes listed | expiry passes | pass p50 / longest | all passes | their CPU | peak RSS |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {stored} | {messages_deleted} | {emptied_listed} | {count} | {p50_ms:.1} / {longest_ms:.1} ms | {:.2} s | {cpu:.2} s | {} MiB |",
        total.as_secs_f64(),
        peak_rss_kib() / 1024
    );
}

/// Links `devices` users' devices, then catches the device sweep's round up past the
/// retention, and prints the table row.
fn sweep<S: Store>(store: &S, devices: u64) {
    let config = CoreConfig::default();
    let mut committer = Committer::new(&config);
    let t0 = 1_000;
    let mut linked = 0u64;
    while linked < devices {
        let batch: Vec<Request> = (linked..devices.min(linked + config.batch_requests_max as u64))
            .map(|user| Request::Link {
                inbox: user + 1,
                device: 0,
                acked_up_to: 0,
            })
            .collect();
        committer.commit_batch(store, &batch, t0).expect("link");
        linked += batch.len() as u64;
    }
    let begun = t0 + config.retention_ms + 1;
    expire(store, begun, &config).expect("the round's first pass");
    let now = begun + device_sweep_round_ms(&config);
    let start = Instant::now();
    let cpu_before = process_cpu_secs();
    let mut passes: Vec<Duration> = Vec::new();
    let mut behind = expire(store, now, &config).expect("expire").devices_behind;
    assert!(behind, "a round a day old is behind");
    while behind {
        let pass_start = Instant::now();
        behind = sweep_devices(store, now, &config).expect("sweep");
        passes.push(pass_start.elapsed());
    }
    let total = start.elapsed();
    let cpu = process_cpu_secs() - cpu_before;
    let (count, p50_ms, longest_ms) = pass_times(passes);
    println!(
        "| device records | sweep passes | pass p50 / longest | all passes | their CPU | per million records | peak RSS |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {devices} | {count} | {p50_ms:.2} / {longest_ms:.2} ms | {:.2} s | {cpu:.2} s | {:.1} s | {} MiB |",
        total.as_secs_f64(),
        total.as_secs_f64() * 1e6 / devices as f64,
        peak_rss_kib() / 1024
    );
}

/// How many passes, the median and the longest, in milliseconds.
fn pass_times(mut passes: Vec<Duration>) -> (usize, f64, f64) {
    passes.sort();
    let ms = |duration: Duration| duration.as_secs_f64() * 1e3;
    let count = passes.len();
    (count, ms(passes[count / 2]), ms(passes[count - 1]))
}

/// The CPU every thread of this process used so far (user and system), in seconds.
fn process_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |index: usize| fields.get(index).and_then(|v| v.parse::<f64>().ok());
    // utime and stime, fields 14 and 15 of the line: 11 and 12 counted from after the name.
    // Linux reports them in ticks of 100 per second (USER_HZ) on every architecture.
    let clock_ticks_per_sec = 100.0;
    (ticks(11).unwrap_or(0.0) + ticks(12).unwrap_or(0.0)) / clock_ticks_per_sec
}

/// The process's peak resident memory (VmHWM), in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmHWM:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}
