//! fjall's background work out of the shard's way (decision 0039): sealed memtables freed by
//! fjall's worker, and the workers at idle priority while they keep up.

use courier_core::keys;
use courier_core::store::fjall::{FjallOptions, FjallStore};
use courier_core::store::worker_priority::idle_priority_reversible;
use courier_core::store::{Store, Transaction};

/// fjall's workers at idle priority now, as the store reports them.
fn workers_idle(store: &FjallStore) -> usize {
    store
        .background_priority()
        .map_or(0, |background| background.workers_idle)
}

/// Memtables sealed by rotations are freed by fjall's worker (not by the thread that rotates
/// next, which was the store's writer: vendor/README.md) once flushed and no longer in any
/// version: however many rotations, only the last few wait. If the worker kept them, memory
/// would grow with every rotation.
#[test]
fn sealed_memtables_are_freed_once_flushed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = FjallOptions {
        // Every commit below passes it: each seals every memtable it wrote to.
        flush_every_bytes: 1024 * 1024,
        ..FjallOptions::default()
    };
    let store = FjallStore::open(dir.path(), &options).expect("open");
    let body = vec![7u8; 1_100];
    for round in 0..60u64 {
        let mut txn = store.begin().expect("begin");
        for i in 0..1_000u64 {
            let seq = round * 1_000 + i;
            txn.set(&keys::message(1 + seq % 50, seq), &body);
        }
        txn.commit().expect("commit");
        // Acknowledged and deleted, as deliveries are.
        let mut txn = store.begin().expect("begin");
        for inbox in 1..=50 {
            txn.clear_range(&keys::message(inbox, 0), &keys::message(inbox, u64::MAX));
        }
        txn.commit().expect("commit");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while store.retired_memtables() > 4 && std::time::Instant::now() < deadline {
        // The worker frees at its next task: a rotation gives it one.
        store.erase_deleted().expect("erase");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        store.retired_memtables() <= 4,
        "after 60 rotations {} sealed memtables are still held",
        store.retired_memtables()
    );
}

/// With `workers_idle_unless_behind`, the store finds fjall's workers (the flusher and the
/// compactor, by default) and puts them at idle priority after its commits; during an erase
/// pass (which waits for them) they are back at normal priority, and after the pass's next
/// commit idle again.
#[test]
fn the_store_puts_its_worker_at_idle_priority_after_commits() {
    if !idle_priority_reversible() {
        eprintln!("skipped: this process may not leave SCHED_IDLE (no CAP_SYS_NICE)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let options = FjallOptions {
        workers_idle_unless_behind: true,
        ..FjallOptions::default()
    };
    let store = FjallStore::open(dir.path(), &options).expect("open");
    let commit_one = |seq: u64| {
        let mut txn = store.begin().expect("begin");
        txn.set(&keys::message(1, seq), b"body");
        txn.commit().expect("commit");
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut seq = 0;
    // Each worker records its thread id as it starts, and the store looks every 2 ms at most.
    let workers = options.worker_threads;
    while workers_idle(&store) < workers && std::time::Instant::now() < deadline {
        seq += 1;
        commit_one(seq);
        std::thread::sleep(std::time::Duration::from_millis(3));
    }
    assert_eq!(
        workers_idle(&store),
        workers,
        "the workers are idle after commits"
    );
    store.erase_deleted().expect("erase");
    // The pass let go of the workers; the next look after a commit makes them idle again.
    seq += 1;
    commit_one(seq);
    assert_eq!(workers_idle(&store), workers);
}

/// Without the option the worker stays as it is.
#[test]
fn without_the_option_the_worker_keeps_its_priority() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FjallStore::open(dir.path(), &FjallOptions::default()).expect("open");
    for seq in 0..20 {
        let mut txn = store.begin().expect("begin");
        txn.set(&keys::message(1, seq), b"body");
        txn.commit().expect("commit");
        std::thread::sleep(std::time::Duration::from_millis(3));
    }
    assert_eq!(workers_idle(&store), 0);
    assert_eq!(store.background_priority(), None);
}

/// Writes past a small memtable's size, with fjall's flusher of its own (two workers,
/// decision 0040): every write past the size asks for a rotation, and while the flusher waits
/// to gather a second sealed memtable (100 ms) those requests fill its queue (1,000). A
/// rotation it then made sent the flush to that full queue, of which it is the only reader,
/// and waited for room for good: no memtable was flushed again, the active one grew without
/// bound, and the next rotation asked by anyone else (Courier's store writer rotates every few
/// megabytes) waited too, and every commit behind it (seen in a paced run after a sustained
/// one: acks stopped for the rest of the run). Afterwards a rotation must be flushed; the bound
/// is minutes for what takes milliseconds, and a hang fails the test.
#[test]
fn rotation_requests_that_fill_the_flushers_queue_do_not_stop_its_flushes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = fjall::Database::builder(dir.path())
        .worker_threads(2)
        .open()
        .expect("open");
    let keyspace = db
        .keyspace("k", || {
            fjall::KeyspaceCreateOptions::default().max_memtable_size(64 * 1024)
        })
        .expect("keyspace");
    let value = [7u8; 200];
    // Past the size for longer than the flusher's gathering wait: a request per write.
    let started = std::time::Instant::now();
    let mut i = 0u64;
    while started.elapsed() < std::time::Duration::from_millis(500) || i < 50_000 {
        keyspace.insert(i.to_be_bytes(), value).expect("insert");
        i += 1;
    }
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        keyspace.rotate_memtable_and_wait().expect("rotate");
        let _ = done_tx.send(());
    });
    done_rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("a rotation was flushed: fjall's flusher did not wait on its own queue");
}
