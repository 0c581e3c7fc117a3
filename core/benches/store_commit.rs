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
//! With `--log`, the same commit logic runs over the log store (`store::log`: live keys in
//! memory, one journal append and fdatasync per commit).
//!
//! With `--buffered`, the store's journal goes through the page cache instead of around it
//! (`FjallOptions::direct_journal_writes`, `LogOptions::direct_writes`: decisions 0032, 0033).
//!
//! With `--log --append`, the log store's journals grow by appending instead of being
//! zero-filled a segment ahead (`LogOptions::journal_segment_bytes = 0`): what preallocation
//! saves.
//!
//! With `--log --pipelined`, commits return once written (`Committer::commit_batch_unsynced`)
//! and a second thread makes each durable (`Store::sync_through`) while the next batch is
//! built and written, as an edge shard with two batches in flight does (decision 0027). A
//! batch's latency then runs from its start until it is durable.
//!
//! With `--reopen`, each writer's store is closed after its run and opened again, timed: how
//! long a restart takes to recover what the run stored (fjall replays its journal; the log
//! store loads its snapshot and replays its journals).
//!
//! With `--messages N`, each writer stops after N messages (rounded up to whole batches)
//! instead of after `--seconds`: the same work every run, for counting instructions
//! (`valgrind --tool=callgrind`).
//!
//! With `--drain`, each writer first stores `--messages` messages (default 100,000) spread
//! over `--inboxes` inboxes (default 100), unmeasured, then drains them as the edge does for
//! devices coming back: it reads each inbox a page at a time (`read_inbox`) and acknowledges
//! every page in one batch of acks per round (`Committer::commit_batch`), which deletes the
//! messages. The drain alone is timed, and runs inside `drain_stored_messages`, so
//! `valgrind --tool=callgrind --toggle-collect='*drain_stored_messages*'` counts it alone.
//!
//! Run: `cargo bench -p courier-core --bench store_commit -- [--seconds N] [--messages N] [--dir PATH] [--batch N] [--writers N] [--inboxes N] [--raw] [--memory] [--log] [--pipelined] [--drain] [--reopen] [--append]`
//! On glibc's malloc; `--features bench-jemalloc` (before `--`) for the edge's allocator.
//! The directory must be on the disk you want to measure (not tmpfs); default: `target/`.
//! Before the table it prints the disk's flush latency there (`store::flush_probe`): the
//! figures depend on it (decision 0028). With `--dir` on tmpfs the syncs cost nothing, which
//! shows what the commit path alone reaches; nothing there is durable.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use courier_core::commit::{Committer, Request, SendRequest, read_inbox};
use courier_core::rng::Rng;
use courier_core::store::fjall::{FjallOptions, FjallStore};
use courier_core::store::{Store, Transaction};
use courier_core::{CoreConfig, keys};

/// With `--features bench-jemalloc`, the edge's allocator (decision 0022): the committer
/// allocates and frees on every commit, and fjall's memtables free what another thread
/// allocated.
#[cfg(feature = "bench-jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const BODY_BYTES: usize = 200;
/// Users messages go between, unless `--inboxes` says otherwise.
const INBOXES_DEFAULT: u64 = 100_000;
/// With `--drain`: inboxes, and messages stored before the drain, unless told otherwise (the
/// edge bench's `offline --pairs 100 --msgs 1000`).
const DRAIN_INBOXES_DEFAULT: u64 = 100;
const DRAIN_MESSAGES_DEFAULT: u64 = 100_000;

fn main() {
    let mut seconds = 5.0f64;
    let mut messages_max: Option<u64> = None;
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/store-bench");
    let mut batch_sizes = vec![1usize, 10, 100, 1000];
    let mut writers = 1usize;
    let mut raw = false;
    let mut memory = false;
    let mut log = false;
    let mut reopen = false;
    let mut append = false;
    let mut buffered = false;
    let mut pipelined = false;
    let mut inboxes = None;
    let mut drain = false;
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
            "--log" => log = true,
            "--reopen" => reopen = true,
            "--append" => append = true,
            "--buffered" => buffered = true,
            "--pipelined" => pipelined = true,
            "--drain" => drain = true,
            "--memtable-mib" => {
                memtable_mib = Some(
                    args.next()
                        .and_then(|v| v.parse::<u64>().ok())
                        .filter(|&n| n > 0)
                        .expect("--memtable-mib N (at least 1)"),
                )
            }
            "--inboxes" => {
                inboxes = Some(
                    args.next()
                        .and_then(|v| v.parse().ok())
                        .filter(|n| *n > 0)
                        .expect("--inboxes N (at least 1)"),
                )
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
                    "unknown argument {other}; usage: store_commit [--seconds N] [--messages N] [--dir PATH] [--batch N] [--writers N] [--inboxes N] [--memtable-mib N] [--raw] [--memory] [--log] [--pipelined] [--drain] [--reopen] [--append] [--buffered]"
                );
                std::process::exit(2);
            }
        }
    }
    if pipelined && (raw || drain || !log) {
        eprintln!(
            "--pipelined runs the commit logic's sends on the log store: with --log, not with --raw or --drain"
        );
        std::process::exit(2);
    }
    if drain && raw {
        eprintln!("--drain reads and acknowledges what the commit logic stored; not with --raw");
        std::process::exit(2);
    }
    let inboxes = inboxes.unwrap_or(if drain {
        DRAIN_INBOXES_DEFAULT
    } else {
        INBOXES_DEFAULT
    });
    let drain_messages = drain.then(|| messages_max.unwrap_or(DRAIN_MESSAGES_DEFAULT));
    println!(
        "allocator: {}",
        if cfg!(feature = "bench-jemalloc") {
            "jemalloc (the edge's)"
        } else {
            "glibc malloc (--features bench-jemalloc for the edge's)"
        }
    );
    println!(
        "mode: {}",
        if raw {
            "raw set per message"
        } else if drain {
            "drain: read pages and acknowledge them (fill before, not timed)"
        } else if pipelined {
            "commit logic, pipelined: the next batch is written while this one syncs"
        } else {
            "commit logic"
        }
    );
    if !memory {
        print_disk_flush(&dir);
    }
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
                        } else if log {
                            Engine::Log { append, buffered }
                        } else {
                            Engine::Fjall {
                                memtable_mib,
                                buffered,
                            }
                        };
                        let workload = Workload {
                            batch_size,
                            writer: writer as u64,
                            duration,
                            messages_max,
                            raw,
                            pipelined,
                            inboxes,
                            drain_messages,
                        };
                        let result = run(&run_dir, engine, &workload);
                        if reopen {
                            reopen_timed(&run_dir, engine, writer);
                        }
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
    /// The embedded store, with fjall's default memtable size unless given; `buffered`: its
    /// journal through the page cache, not direct writes.
    Fjall {
        memtable_mib: Option<u64>,
        buffered: bool,
    },
    /// An in-memory map: what the commit logic costs without an engine.
    Memory,
    /// The log store; `append`: without preallocated journal segments; `buffered`: records
    /// through the page cache, not direct writes.
    Log { append: bool, buffered: bool },
}

/// Prints how long the disk under `dir` takes per flush just before the run: a commit waits
/// for one, so on this shared machine the disk's speed at the hour decides the figures
/// (decision 0028).
fn print_disk_flush(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).expect("create bench dir");
    use courier_core::store::flush_probe::{BATCH_FLUSHES, BATCH_WRITE_BYTES, measure};
    match measure(dir, BATCH_FLUSHES, BATCH_WRITE_BYTES) {
        Ok(latency) => println!(
            "disk flush: p50 {} µs, p90 {} µs, max {} µs ({} overwrites of {} KiB, each with \
             fdatasync): about {} flushes/s one after another",
            latency.p50_us,
            latency.p90_us,
            latency.max_us,
            latency.flushes,
            BATCH_WRITE_BYTES / 1024,
            latency.flushes_per_sec()
        ),
        Err(error) => println!("disk flush: not measured ({error})"),
    }
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
    /// Sync each batch on a second thread while the next is written.
    pipelined: bool,
    inboxes: u64,
    /// Store this many messages, then time their drain instead of the sends.
    drain_messages: Option<u64>,
}

fn run(dir: &std::path::Path, engine: Engine, workload: &Workload) -> RunResult {
    match engine {
        Engine::Memory => run_on(&courier_core::store::memory::MemoryStore::new(), workload),
        Engine::Log { append, buffered } => run_on(
            &courier_core::store::log::LogStore::open(dir, &log_options(append, buffered))
                .expect("open store"),
            workload,
        ),
        Engine::Fjall {
            memtable_mib,
            buffered,
        } => {
            let mut options = FjallOptions {
                direct_journal_writes: !buffered,
                ..FjallOptions::default()
            };
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

fn log_options(append: bool, buffered: bool) -> courier_core::store::log::LogOptions {
    let mut options = courier_core::store::log::LogOptions::default();
    if append {
        options.journal_segment_bytes = 0;
    }
    options.direct_writes = !buffered;
    options
}

/// `--reopen`: opens the store a run left in `dir` and prints how long that took.
fn reopen_timed(dir: &std::path::Path, engine: Engine, writer: usize) {
    let start = Instant::now();
    let what = match engine {
        Engine::Memory => return,
        Engine::Fjall { .. } => {
            let store = FjallStore::open(dir, &FjallOptions::default()).expect("reopen");
            let elapsed = start.elapsed();
            drop(store);
            (elapsed, "fjall".to_string())
        }
        Engine::Log { append, buffered } => {
            let store =
                courier_core::store::log::LogStore::open(dir, &log_options(append, buffered))
                    .expect("reopen");
            let elapsed = start.elapsed();
            let recovery = store.recovery();
            drop(store);
            (
                elapsed,
                format!(
                    "log: {} keys, from a snapshot: {}, {} journal bytes replayed",
                    recovery.keys, recovery.snapshot, recovery.journal_bytes
                ),
            )
        }
    };
    println!(
        "reopen of writer {writer}'s store: {:.0} ms ({})",
        what.0.as_secs_f64() * 1e3,
        what.1
    );
}

fn run_on<S: Store>(store: &S, workload: &Workload) -> RunResult {
    let &Workload {
        batch_size,
        writer,
        duration,
        messages_max,
        raw,
        pipelined,
        inboxes,
        drain_messages,
    } = workload;
    let config = CoreConfig {
        batch_requests_max: batch_size,
        ..CoreConfig::default()
    };
    if let Some(fill) = drain_messages {
        return fill_then_drain(store, &config, workload, fill);
    }
    if pipelined {
        return std::thread::scope(|scope| {
            // At most two batches in flight: the one syncing and the one being written.
            let (to_sync, synced) = std::sync::mpsc::sync_channel::<(u64, Instant)>(1);
            let syncer = scope.spawn(move || {
                let mut latencies = Vec::new();
                for (version, started) in synced {
                    store.sync_through(version).expect("sync");
                    latencies.push(started.elapsed());
                }
                latencies
            });
            let mut sends = SendSource::new(batch_size, writer, inboxes);
            let mut committer = Committer::new(&config);
            let mut messages = 0u64;
            let now_ms = 1_700_000_000_000u64;
            let start = Instant::now();
            while match messages_max {
                Some(max) => messages < max,
                None => start.elapsed() < duration,
            } {
                let batch = sends.next_batch();
                let started = Instant::now();
                let (outcomes, version) = committer
                    .commit_batch_unsynced(store, &batch, now_ms + messages)
                    .expect("commit");
                assert_eq!(outcomes.len(), batch_size);
                let version = version.expect("the log store defers its syncs");
                to_sync.send((version, started)).expect("syncer runs");
                messages += batch_size as u64;
            }
            drop(to_sync);
            let latencies = syncer.join().expect("syncer thread");
            RunResult {
                messages,
                elapsed: start.elapsed(),
                latencies,
            }
        });
    }
    let mut committer = Committer::new(&config);
    let mut sends = SendSource::new(batch_size, writer, inboxes);
    let mut latencies = Vec::new();
    let mut messages = 0u64;
    let now_ms = 1_700_000_000_000u64;
    let start = Instant::now();
    let more = |messages: u64| match messages_max {
        Some(max) => messages < max,
        None => start.elapsed() < duration,
    };
    while more(messages) {
        let batch = sends.next_batch();
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

/// First sends, 200 bytes each, between random users: the same for every engine and mode.
struct SendSource {
    batch_size: usize,
    inboxes: u64,
    rng: Rng,
    client_id: u64,
}

impl SendSource {
    fn new(batch_size: usize, writer: u64, inboxes: u64) -> SendSource {
        SendSource {
            batch_size,
            inboxes,
            rng: Rng::new(batch_size as u64 * 1000 + writer),
            client_id: 0,
        }
    }

    fn next_batch(&mut self) -> Vec<Request> {
        (0..self.batch_size)
            .map(|_| {
                self.client_id += 1;
                Request::Send(SendRequest {
                    sender: 1 + self.rng.below(self.inboxes),
                    client_id: self.client_id,
                    to: 1 + self.rng.below(self.inboxes),
                    body: vec![0x5A; BODY_BYTES],
                    ttl_secs: None,
                })
            })
            .collect()
    }
}

/// `--drain`: stores `fill` messages over `inboxes` inboxes (not timed), then drains them.
fn fill_then_drain<S: Store>(
    store: &S,
    config: &CoreConfig,
    workload: &Workload,
    fill: u64,
) -> RunResult {
    let mut committer = Committer::new(config);
    let now_ms = 1_700_000_000_000u64;
    // Each inbox's device logs in first, as the edge bench's receivers do: an ack of a device
    // without a record deletes nothing.
    let links: Vec<Request> = (1..=workload.inboxes)
        .map(|inbox| Request::Link {
            inbox,
            device: 0,
            acked_up_to: 0,
        })
        .collect();
    for chunk in links.chunks(config.batch_requests_max.max(1)) {
        committer.commit_batch(store, chunk, now_ms).expect("link");
    }
    let mut stored = 0u64;
    while stored < fill {
        let batch: Vec<Request> = (0..workload.batch_size as u64)
            .map(|index| {
                let n = stored + index;
                Request::Send(SendRequest {
                    sender: workload.inboxes + 1 + n % workload.inboxes,
                    client_id: n + 1,
                    to: 1 + n % workload.inboxes,
                    body: vec![0x5A; BODY_BYTES],
                    ttl_secs: None,
                })
            })
            .collect();
        committer
            .commit_batch(store, &batch, now_ms)
            .expect("commit");
        stored += workload.batch_size as u64;
    }
    let start = Instant::now();
    let (messages, latencies) =
        drain_stored_messages(store, &mut committer, config, workload.inboxes, now_ms + 1);
    assert_eq!(messages, stored, "the drain read every stored message");
    for inbox in 1..=workload.inboxes {
        let page = read_inbox(store, inbox, 0, now_ms + 1, config).expect("read inbox");
        assert!(page.messages.is_empty(), "the acks deleted inbox {inbox}");
    }
    RunResult {
        messages,
        elapsed: start.elapsed(),
        latencies,
    }
}

/// Reads every inbox a page at a time and acknowledges each round's pages in one commit, until
/// every inbox is empty: what the edge's reader lane and writer do while devices drain. Returns
/// the messages read and each round's read-and-commit time.
#[inline(never)]
fn drain_stored_messages<S: Store>(
    store: &S,
    committer: &mut Committer,
    config: &CoreConfig,
    inboxes: u64,
    now_ms: u64,
) -> (u64, Vec<Duration>) {
    let mut cursors = vec![0u64; inboxes as usize];
    let mut done = vec![false; inboxes as usize];
    let mut messages = 0u64;
    let mut latencies = Vec::new();
    while done.iter().any(|done| !done) {
        let round_start = Instant::now();
        let mut acks = Vec::new();
        for inbox in 1..=inboxes {
            let slot = (inbox - 1) as usize;
            if done[slot] {
                continue;
            }
            let page = read_inbox(store, inbox, cursors[slot], now_ms, config).expect("read inbox");
            messages += page.messages.len() as u64;
            if page.covered_up_to > cursors[slot] {
                cursors[slot] = page.covered_up_to;
                acks.push(Request::Ack {
                    inbox,
                    device: 0,
                    up_to_seq: page.covered_up_to,
                });
            }
            done[slot] = !page.more;
        }
        for chunk in acks.chunks(config.batch_requests_max.max(1)) {
            committer
                .commit_batch(store, chunk, now_ms)
                .expect("commit acks");
        }
        latencies.push(round_start.elapsed());
    }
    (messages, latencies)
}
