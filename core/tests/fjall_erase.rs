//! `FjallStore::erase_deleted`: deleted values leave the disk (journals and tables), and disk
//! use falls back near its baseline.

mod common;

use common::bulk_sends::{dedupe_records, spread_send};
use courier_core::keys;
use courier_core::store::fjall::{FjallOptions, FjallStore};
use courier_core::store::{Store, Transaction};

/// Bytes allocated on disk by the files under `dir` (journals are preallocated sparse files:
/// their length is not disk use), and the files that hold `needle`.
fn scan(dir: &std::path::Path, needle: &[u8]) -> (u64, Vec<String>) {
    let mut bytes = 0;
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            // A file fjall's background work deleted since the listing held nothing to find.
            let (Ok(content), Ok(metadata)) = (std::fs::read(&path), entry.metadata()) else {
                continue;
            };
            bytes += std::os::unix::fs::MetadataExt::blocks(&metadata) * 512;
            if content.windows(needle.len()).any(|w| w == needle) {
                found.push(path.display().to_string());
            }
        }
    }
    (bytes, found)
}

/// Values flushed to tables and then deleted are gone from every file after one pass, and the
/// tables shrink to what is still live.
#[test]
fn deleted_values_leave_tables_and_journals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FjallStore::open(dir.path(), &FjallOptions::default()).expect("open");
    let marker: Vec<u8> = (0..48).map(|_| rand::random::<u8>()).collect();
    // 20 MB of messages: more than a memtable, so most reach tables before the delete.
    let body = |i: u64| {
        let mut body: Vec<u8> = (0..200).map(|_| rand::random::<u8>()).collect();
        if i == 17 {
            body[..marker.len()].copy_from_slice(&marker);
        }
        body
    };
    for chunk in 0..100u64 {
        let mut txn = store.begin().expect("begin");
        for i in chunk * 1000..(chunk + 1) * 1000 {
            txn.set(&keys::message(1 + i % 100, i), &body(i));
        }
        txn.commit().expect("commit");
    }
    // A little that stays.
    let mut txn = store.begin().expect("begin");
    txn.set(&keys::counter(5), &7u64.to_le_bytes());
    txn.commit().expect("commit");
    store.erase_deleted().expect("a first pass flushes");
    let (filled, found) = scan(dir.path(), &marker);
    assert!(!found.is_empty(), "the marker is on disk before the delete");

    for inbox in 1..=100 {
        let mut txn = store.begin().expect("begin");
        txn.clear_range(&keys::message(inbox, 0), &keys::message(inbox, u64::MAX));
        txn.commit().expect("commit");
    }
    let report = store.erase_deleted().expect("erase");
    let (erased, found) = scan(dir.path(), &marker);
    assert_eq!(found, Vec::<String>::new(), "the deleted marker is gone");
    assert!(
        erased < filled / 2,
        "disk use falls: {filled} bytes filled, {erased} after the erase ({report:?})"
    );
}

/// A delete committed while a pass runs, after its flush and before its compactions, is gone
/// after the next pass, with no write after it. (The pass used to take stock of the deletes
/// after its flush: it counted this one, compacted without its tombstone, and the next pass
/// saw no delete to compact for, so the value stayed in a table; `edge/tests/erase.rs` caught
/// it once in CI. And without a write after the next pass's compaction, fjall kept its input
/// tables until one came: the vendor patch's `collect_garbage` now moves the sequence number
/// on.)
#[test]
fn a_delete_racing_a_pass_is_erased_by_the_next() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FjallStore::open(dir.path(), &FjallOptions::default()).expect("open");
    let marker: Vec<u8> = (0..48).map(|_| rand::random::<u8>()).collect();
    let key = keys::message(7, 1);
    let write = |key: &[u8], value: &[u8]| {
        let mut txn = store.begin().expect("begin");
        txn.set(key, value);
        txn.commit().expect("commit");
    };
    write(&key, &marker);
    store.erase_deleted().expect("erase");
    assert!(
        !scan(dir.path(), &marker).1.is_empty(),
        "the marker is in a table (else this test could not fail)"
    );
    // Something written, so the next pass runs; the delete comes in the middle of it.
    write(&keys::message(8, 1), b"kept");
    store
        .erase_deleted_then(|| {
            let mut txn = store.begin().expect("begin");
            txn.clear(&key);
            txn.commit().expect("commit");
        })
        .expect("erase");
    store.erase_deleted().expect("erase");
    let (_, found) = scan(dir.path(), &marker);
    assert!(found.is_empty(), "the deleted marker is still in {found:?}");
}

/// A read open while a pass compacts (a device's catch-up reading its inbox) keeps fjall's
/// version from before the compaction, and with it the input table that still holds a
/// deleted value. The pass after it, with nothing written since, still erases the value.
/// (The pass counted its compaction done, so the next one, seeing no write, did nothing, and
/// the value stayed on disk past the erase bound until something was written.)
#[test]
fn a_read_open_during_a_pass_does_not_keep_a_deleted_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FjallStore::open(dir.path(), &FjallOptions::default()).expect("open");
    let marker: Vec<u8> = (0..48).map(|_| rand::random::<u8>()).collect();
    let key = keys::message(7, 1);
    let mut txn = store.begin().expect("begin");
    txn.set(&key, &marker);
    txn.commit().expect("commit");
    store.erase_deleted().expect("a first pass flushes");
    assert!(
        !scan(dir.path(), &marker).1.is_empty(),
        "the marker is in a table (else this test could not fail)"
    );
    let mut txn = store.begin().expect("begin");
    txn.clear(&key);
    txn.commit().expect("commit");
    let mut read = None;
    let held = store
        .erase_deleted_then(|| read = Some(store.begin_read().expect("read")))
        .expect("erase");
    assert!(
        !held.complete,
        "a pass whose old tables a read kept says it left work to the next one (the edge \
         records only complete passes: edge/src/erase_record.rs)"
    );
    drop(read);
    let after = store.erase_deleted().expect("erase");
    assert!(after.complete, "the next pass finished the work");
    let (_, found) = scan(dir.path(), &marker);
    assert!(found.is_empty(), "the deleted marker is still in {found:?}");
}

/// A delete followed by a restart, with no pass between and no write after: the pass after
/// the reopen erases it. (What a store deleted since its last pass was known only in memory,
/// so a restart forgot it, and with nothing written after the reopen every pass did nothing:
/// the value stayed in the replayed journal and the tables.)
#[test]
fn a_delete_before_a_restart_is_erased_by_the_first_pass_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker: Vec<u8> = (0..48).map(|_| rand::random::<u8>()).collect();
    {
        let store = FjallStore::open(dir.path(), &FjallOptions::default()).expect("open");
        let mut txn = store.begin().expect("begin");
        txn.set(&keys::message(9, 1), &marker);
        txn.set(&keys::counter(9), &1u64.to_le_bytes());
        txn.commit().expect("commit");
        store.erase_deleted().expect("a first pass flushes");
        let mut txn = store.begin().expect("begin");
        txn.clear(&keys::message(9, 1));
        txn.commit().expect("commit");
    }
    let store = FjallStore::open(dir.path(), &FjallOptions::default()).expect("reopen");
    let (_, found) = scan(dir.path(), &marker);
    assert!(!found.is_empty(), "the marker is on disk before the pass");
    let report = store.erase_deleted().expect("erase");
    let (_, found) = scan(dir.path(), &marker);
    assert_eq!(
        found,
        Vec::<String>::new(),
        "the deleted marker is gone ({report:?})"
    );
}

/// Old dedupe buckets leave fjall by whole tables (decision 0038): a day's records flushed to
/// tables go in a few expiry passes, where a tombstone per record took one pass per half of
/// the scan budget (here 250), and the current bucket's records stay.
#[test]
fn old_dedupe_buckets_go_by_whole_tables() {
    use courier_core::CoreConfig;
    use courier_core::commit::{Committer, DEDUPE_CLEAR_SLACK_MS, Request, expire};
    let dir = tempfile::tempdir().expect("tempdir");
    // Small memtables, so that the records reach several tables.
    let options = FjallOptions {
        memtable_bytes_max: 64 * 1024,
        flush_every_bytes: 256 * 1024,
        ..FjallOptions::default()
    };
    let store = FjallStore::open(dir.path(), &options).expect("open");
    let config = CoreConfig {
        expire_scan_keys_max: 40,
        ..CoreConfig::default()
    };
    let window = config.dedupe_window_ms;
    let mut committer = Committer::new(&config);
    // 5,000 sends in bucket 1, then 3 in bucket 3, the current one at the expiry below.
    let old: Vec<Request> = (1..=5_000).map(spread_send).collect();
    for batch in old.chunks(config.batch_requests_max) {
        committer
            .commit_batch(&store, batch, window + 1)
            .expect("commit");
    }
    store
        .erase_deleted()
        .expect("a pass flushes the memtables to tables");
    let new: Vec<Request> = (10_001..=10_003).map(spread_send).collect();
    committer
        .commit_batch(&store, &new, 3 * window + 1)
        .expect("commit");
    let dedupe_records = |bucket: u64| dedupe_records(&store, bucket);
    assert_eq!((dedupe_records(1), dedupe_records(3)), (5_000, 3));
    let mut passes = 0;
    loop {
        passes += 1;
        assert!(
            passes <= 20,
            "old dedupe records still there after 20 passes"
        );
        if !expire(&store, 3 * window + DEDUPE_CLEAR_SLACK_MS + 2, &config)
            .expect("expire")
            .more
        {
            break;
        }
    }
    assert_eq!(dedupe_records(1), 0, "bucket 1 is past its window");
    assert_eq!(dedupe_records(3), 3, "the current bucket stays");
}

/// A pass compacts a keyspace with deletes and counts it done while other keyspaces keep
/// flushing and compacting under constant writes, pass after pass. (It judged an overlap by
/// the database's compaction counters, so another keyspace's compaction during its own
/// counted as one: under constant writes, as in the edge's sustained loop, no pass was ever
/// complete, the rewrite of a keyspace with deletes being retried pass after pass, and the
/// edge recorded none: 0 of 2 passes complete in a 17 s closed loop, docs/benchmarks.md.
/// Here the old check failed 1 run of 3: timing decides. This check cannot be disturbed by
/// another keyspace.)
#[test]
fn passes_complete_while_other_keyspaces_compact() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dir = tempfile::tempdir().expect("tempdir");
    let options = FjallOptions {
        memtable_bytes_max: 64 * 1024,
        flush_every_bytes: 256 * 1024,
        level0_runs_max: 1,
        ..FjallOptions::default()
    };
    let store = Arc::new(FjallStore::open(dir.path(), &options).expect("open"));
    let marker: Vec<u8> = (0..48).map(|_| rand::random::<u8>()).collect();
    // 200,000 messages in tables, the marker among them.
    for chunk in 0..200u64 {
        let mut txn = store.begin().expect("begin");
        for seq in chunk * 1_000..(chunk + 1) * 1_000 {
            let body = if seq == 7 {
                marker.clone()
            } else {
                vec![seq as u8; 200]
            };
            txn.set(&keys::message(1, seq + 1), &body);
        }
        txn.commit().expect("commit");
    }
    store.erase_deleted().expect("a first pass flushes");
    // Constant writes to another keyspace: flushes and compactions that never stop.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (store, stop, written) = (store.clone(), stop.clone(), written.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut txn = store.begin().expect("begin");
                for _ in 0..100 {
                    n += 1;
                    txn.set(&keys::counter(n), &[7; 64]);
                }
                txn.commit().expect("commit");
                written.store(n, Ordering::Relaxed);
            }
        })
    };
    let mut reports = Vec::new();
    for round in 0..4u64 {
        let at_least = written.load(Ordering::Relaxed) + 10_000;
        while written.load(Ordering::Relaxed) < at_least {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let mut txn = store.begin().expect("begin");
        for seq in round * 10_000..(round + 1) * 10_000 {
            txn.clear(&keys::message(1, seq + 1));
        }
        txn.commit().expect("commit");
        reports.push(store.erase_deleted().expect("erase"));
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    assert!(
        reports.iter().all(|report| report.complete),
        "a pass left work to the next: {reports:?}"
    );
    let (_, found) = scan(dir.path(), &marker);
    assert!(found.is_empty(), "the deleted marker is still in {found:?}");
}

/// A pass that reports itself complete leaves no sealed journal holding a deleted value.
/// The journal a pass sealed was deleted only once every keyspace's tables held a seqno at
/// least its last write's; a compaction into the last level that dropped the pass's newest
/// tombstones (with the values they deleted) could lower that below the mark, and the
/// journal, with the deleted marker in it, stayed while the pass said complete. Rounds, since
/// a background compaction's timing decides.
#[test]
fn a_complete_pass_leaves_no_journal_with_a_deleted_value() {
    for round in 0..20u64 {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = FjallOptions {
            level0_runs_max: 1,
            ..FjallOptions::default()
        };
        let store = FjallStore::open(dir.path(), &options).expect("open");
        let set = |key: &[u8], value: &[u8]| {
            let mut txn = store.begin().expect("begin");
            txn.set(key, value);
            txn.commit().expect("commit");
        };
        set(&keys::message(7, 1), b"first");
        set(&keys::message(7, 3), b"third");
        store.erase_deleted().expect("a first pass");
        let marker: Vec<u8> = (0..48).map(|_| rand::random::<u8>()).collect();
        set(&keys::message(7, 2), &marker);
        let mut txn = store.begin().expect("begin");
        txn.clear(&keys::message(7, 2));
        txn.set(&keys::clock(), &round.to_le_bytes());
        txn.commit().expect("commit");
        let report = store.erase_deleted().expect("erase");
        if report.complete {
            let (_, found) = scan(dir.path(), &marker);
            assert_eq!(
                found,
                Vec::<String>::new(),
                "round {round}: a complete pass left the deleted marker ({report:?})"
            );
        }
    }
}

/// A read open from before a delete, through the memtable rotations before the pass, held
/// fjall's garbage-collection mark below the delete; it ended before the pass compacted, but
/// the compaction still used the mark the last rotation left, kept the deleted value, and the
/// pass reported itself complete: on a quiet store no later pass ran, and the value stayed on
/// disk for good (found by review). The mark is now brought up to date before each rewrite,
/// and a rewrite under a mark below the pass's deletes does not count as done.
#[test]
fn a_read_ended_before_the_rewrite_does_not_keep_a_deleted_value_through_a_stale_mark() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = FjallOptions {
        flush_every_bytes: 1 << 20,
        ..FjallOptions::default()
    };
    let store = FjallStore::open(dir.path(), &options).expect("open");
    let marker: Vec<u8> = (0..48).map(|_| rand::random::<u8>()).collect();
    let key = keys::message(7, 1);
    let mut txn = store.begin().expect("begin");
    txn.set(&key, &marker);
    txn.commit().expect("commit");
    let mut read = Some(store.begin_read().expect("read"));
    // Another inbox's writes rotate memtables while the read is open.
    for seq in 1..=48u64 {
        let mut txn = store.begin().expect("begin");
        txn.set(&keys::message(8, seq), &[seq as u8; 32 << 10]);
        txn.commit().expect("commit");
    }
    let mut txn = store.begin().expect("begin");
    txn.clear(&key);
    txn.commit().expect("commit");
    let pass = store
        .erase_deleted_then(|| drop(read.take()))
        .expect("erase");
    let next = store.erase_deleted().expect("erase");
    let (_, found) = scan(dir.path(), &marker);
    assert!(
        found.is_empty(),
        "the deleted marker is still in {found:?} after a pass that said complete: {}, \
         and the next: {}",
        pass.complete,
        next.complete
    );
}
