//! The log store's own guarantees, beyond the conformance suite: recovery after a crash cut a
//! commit short, snapshots taken while commits go on, deleted values gone from every file
//! after an erase pass, refusals that say what to do, and the memory bound.

mod common;

use std::path::Path;

use courier_core::store::log::{LogOptions, LogStore};
use courier_core::store::{Store, StoreError, Transaction};

fn set(store: &LogStore, key: &[u8], value: &[u8]) {
    let mut txn = store.begin().expect("begin");
    txn.set(key, value);
    txn.commit().expect("commit");
}

fn get(store: &LogStore, key: &[u8]) -> Option<Vec<u8>> {
    store.begin_read().expect("begin").get(key).expect("get")
}

/// Every file under `dir`, the dedupe tier's included.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("list") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The journal with the highest id that holds anything (not a spare segment).
fn newest_journal(dir: &Path) -> std::path::PathBuf {
    files(dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("journal-0")
        })
        .rfind(|p| std::fs::metadata(p).unwrap().len() > 0)
        .expect("a journal with commits")
}

/// A store in `dir` holding keys 0..`count` set to `value`, closed again.
fn store_with(dir: &Path, count: u32, value: &[u8]) {
    let store = LogStore::open(dir, &LogOptions::default()).unwrap();
    for i in 0..count {
        set(&store, &i.to_be_bytes(), value);
    }
}

/// Where the journal's records end: after its last byte that is not zero (the segment's zeros
/// follow; the tests' records end in a byte that is not zero).
fn records_end(journal: &[u8]) -> usize {
    journal.iter().rposition(|byte| *byte != 0).unwrap() + 1
}

/// Writes `bytes` at `offset` into `path`, as a write that reached the disk before a crash.
fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(bytes, offset)
        .unwrap();
}

/// A crash in the middle of a commit's write leaves part of a record at the journal's end:
/// recovery keeps every commit before it, drops the torn one (never acknowledged), cuts it
/// off, and later commits and recoveries go on normally.
#[test]
fn a_torn_last_record_is_dropped_and_everything_before_it_kept() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 100, b"kept");
    // The first 20 bytes of another record like the last one (31 bytes: header, count, and a
    // set of a 4-byte key to a 4-byte value), written where the next record goes: into the
    // zeros of the journal's segment, as a crash mid-write leaves it.
    let journal = newest_journal(dir.path());
    let whole = std::fs::read(&journal).unwrap();
    let end = records_end(&whole);
    assert!(
        whole.len() > end,
        "the segment was filled with zeros in advance"
    );
    write_at(&journal, end as u64, &whole[end - 31..end - 11]);
    {
        let store = LogStore::open(dir.path(), &LogOptions::default()).unwrap();
        for i in 0..100u32 {
            assert_eq!(get(&store, &i.to_be_bytes()).as_deref(), Some(&b"kept"[..]));
        }
        // Cut at the last whole record: the torn bytes and the segment's zeros are gone.
        assert_eq!(std::fs::metadata(&journal).unwrap().len(), end as u64);
        assert!((1..=20).contains(&store.recovery().torn_bytes_cut));
        assert_eq!(store.recovery().keys, 100);
        set(&store, b"after", b"recovery");
    }
    let store = LogStore::open(dir.path(), &LogOptions::default()).unwrap();
    assert_eq!(store.recovery().torn_bytes_cut, 0);
    assert_eq!(get(&store, b"after").as_deref(), Some(&b"recovery"[..]));
    assert_eq!(
        get(&store, &99u32.to_be_bytes()).as_deref(),
        Some(&b"kept"[..])
    );
}

/// Damage in a journal that newer journals follow is not a torn write: the store refuses to
/// open and says to restore, instead of silently dropping acknowledged commits.
#[test]
fn damage_before_the_last_journal_is_refused_as_corruption() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LogStore::open(dir.path(), &LogOptions::default()).unwrap();
        set(&store, b"a", b"1");
    }
    let damaged = newest_journal(dir.path());
    {
        // A second run writes a newer journal.
        let store = LogStore::open(dir.path(), &LogOptions::default()).unwrap();
        set(&store, b"b", b"2");
    }
    let mut bytes = std::fs::read(&damaged).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&damaged, bytes).unwrap();
    match LogStore::open(dir.path(), &LogOptions::default()) {
        Err(StoreError::Corrupt(message)) => assert!(message.contains("restore"), "{message}"),
        other => panic!("expected a corruption error, got {other:?}"),
    }
}

/// Checkpoints copy the map in chunks while commits go on (a fuzzy snapshot); recovery from
/// the snapshot plus the journals after it must give exactly the committed state.
#[test]
fn snapshots_taken_during_commits_recover_the_exact_state() {
    snapshots_during_commits_recover_exactly(&LogOptions::default());
}

/// The same with journal segments of 4 KiB: the writer moves to a spare segment every ~100
/// commits (or appends past a full one while no spare is ready) while checkpoints rotate
/// journals too; recovery reads them all in order, zero tails and all.
#[test]
fn small_journal_segments_recover_the_exact_state() {
    snapshots_during_commits_recover_exactly(&LogOptions {
        journal_segment_bytes: 4096,
        ..LogOptions::default()
    });
}

fn snapshots_during_commits_recover_exactly(options: &LogOptions) {
    let dir = tempfile::tempdir().unwrap();
    let mut expected = std::collections::BTreeMap::new();
    {
        let store = LogStore::open(dir.path(), options).unwrap();
        std::thread::scope(|scope| {
            let checkpoints = scope.spawn(|| {
                for _ in 0..20 {
                    store.checkpoint().expect("checkpoint");
                }
            });
            // Sets, overwrites and deletes over 20,000 keys, while the checkpoints run.
            let mut x = 1u64;
            for _ in 0..30_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let key = (x % 20_000).to_be_bytes();
                let mut txn = store.begin().unwrap();
                if x % 3 == 0 {
                    txn.clear(&key);
                    expected.remove(key.as_slice());
                } else {
                    let value = x.to_le_bytes();
                    txn.set(&key, &value);
                    expected.insert(key.to_vec(), value.to_vec());
                }
                txn.commit().unwrap();
            }
            checkpoints.join().unwrap();
        });
    }
    let store = LogStore::open(dir.path(), options).unwrap();
    let all = store
        .begin_read()
        .unwrap()
        .get_range(&[], &[0xff; 9], usize::MAX)
        .unwrap();
    let expected: Vec<_> = expected.into_iter().collect();
    assert_eq!(all.len(), expected.len());
    assert!(
        all == expected,
        "recovered state differs from what was committed"
    );
}

/// R4: a value deleted before an erase pass is in no file of the store after it.
#[test]
fn a_deleted_marker_is_in_no_file_after_an_erase_pass() {
    a_deleted_marker_is_in_no_file_after_an_erase_pass_under(b"q-marker");
}

/// The same for a dedupe record, which lives in the dedupe tier (`dedupe/`): deleted while in
/// memory, and deleted after a checkpoint moved it into the tier's tables.
#[test]
fn a_deleted_dedupe_marker_is_in_no_file_after_an_erase_pass() {
    a_deleted_marker_is_in_no_file_after_an_erase_pass_under(b"d-marker");
    a_deleted_marker_is_in_no_file_after_an_erase_pass_checkpointed(b"d-marker", true);
}

fn a_deleted_marker_is_in_no_file_after_an_erase_pass_under(key: &[u8]) {
    a_deleted_marker_is_in_no_file_after_an_erase_pass_checkpointed(key, false);
}

fn a_deleted_marker_is_in_no_file_after_an_erase_pass_checkpointed(key: &[u8], checkpoint: bool) {
    let dir = tempfile::tempdir().unwrap();
    let marker = b"MARKER-4f1c9a-deleted-body";
    let store = LogStore::open(dir.path(), &LogOptions::default()).unwrap();
    set(&store, key, marker);
    set(&store, b"kept", b"still here");
    if checkpoint {
        store.checkpoint().unwrap();
    }
    let contains_marker = |dir: &Path| {
        files(dir).iter().any(|path| {
            // The tier's background compactions delete files while this reads.
            std::fs::read(path)
                .or_else(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => Ok(Vec::new()),
                    _ => Err(e),
                })
                .unwrap()
                .windows(marker.len())
                .any(|w| w == marker)
        })
    };
    assert!(
        contains_marker(dir.path()),
        "the marker reached the journal"
    );
    let mut txn = store.begin().unwrap();
    txn.clear(key);
    txn.commit().unwrap();
    let report = store.erase_deleted().unwrap();
    assert!(report.checkpointed);
    assert!(!contains_marker(dir.path()), "the marker is still on disk");
    drop(store);
    let store = LogStore::open(dir.path(), &LogOptions::default()).unwrap();
    assert_eq!(get(&store, key), None);
    assert_eq!(get(&store, b"kept").as_deref(), Some(&b"still here"[..]));
}

/// The log store never opens another engine's directory, nor one a live store holds.
#[test]
fn foreign_and_locked_directories_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("version"), b"fjall").unwrap();
    let error = LogStore::open(dir.path(), &LogOptions::default()).unwrap_err();
    assert!(error.to_string().contains("not a log store"), "{error}");

    let dir = tempfile::tempdir().unwrap();
    let _open = LogStore::open(dir.path(), &LogOptions::default()).unwrap();
    let error = LogStore::open(dir.path(), &LogOptions::default()).unwrap_err();
    assert!(error.to_string().contains("locked"), "{error}");
}

/// Past its memory bound the store refuses commits that only add, with a message naming the
/// setting, and still takes deletes (acks, expiry), which make room again.
#[test]
fn the_memory_bound_refuses_growth_but_not_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        memory_bytes_max: 64 * 1024,
        ..LogOptions::default()
    };
    let store = LogStore::open(dir.path(), &options).unwrap();
    let value = [7u8; 1000];
    let mut stored = 0u32;
    let error = loop {
        let mut txn = store.begin().unwrap();
        txn.set(&stored.to_be_bytes(), &value);
        match txn.commit() {
            Ok(_) => stored += 1,
            Err(error) => break error,
        }
        assert!(stored < 1000, "the bound never refused");
    };
    assert!(
        error.to_string().contains("log_memory_bytes_max"),
        "{error}"
    );
    assert!(stored > 10);
    // A send that comes with an ack freeing as much passes; one without is refused.
    let mut txn = store.begin().unwrap();
    txn.clear(&0u32.to_be_bytes());
    txn.set(&stored.to_be_bytes(), &value);
    txn.commit()
        .expect("a commit that frees what it adds passes at the bound");
    let mut txn = store.begin().unwrap();
    txn.set(&(stored + 1).to_be_bytes(), &value);
    assert!(txn.commit().is_err(), "growth past the bound was refused");
    let mut txn = store.begin().unwrap();
    txn.clear(&1u32.to_be_bytes());
    txn.commit().expect("a delete passes at the bound");
    set(&store, &(stored + 1).to_be_bytes(), &value);
}

/// A record overwrites zeros in place, so a crash can leave a later page of it on disk while
/// the page with its header is still zeros. That is a torn write too (nothing whole follows
/// it): recovery keeps everything before it and opens.
#[test]
fn a_torn_record_whose_header_never_reached_the_disk_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 100, b"kept");
    let journal = newest_journal(dir.path());
    let end = records_end(&std::fs::read(&journal).unwrap());
    // The tail of a large record, 5,000 bytes past where its header should be.
    write_at(&journal, end as u64 + 5_000, &[0x5a; 300]);
    let store = LogStore::open(dir.path(), &LogOptions::default()).unwrap();
    for i in 0..100u32 {
        assert_eq!(get(&store, &i.to_be_bytes()).as_deref(), Some(&b"kept"[..]));
    }
    assert!(store.recovery().torn_bytes_cut > 0);
}

/// A damaged length field in the first record of the newest journal must not make recovery
/// cut every acknowledged record after it as if the journal were torn there.
#[test]
fn a_damaged_length_with_records_after_it_is_refused_as_corruption() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 10, b"acknowledged");
    let journal = newest_journal(dir.path());
    let mut bytes = std::fs::read(&journal).unwrap();
    // The length's high bytes: past the record size limit, or past the file's end.
    bytes[2] = 0xff;
    bytes[3] = 0x7f;
    std::fs::write(&journal, &bytes).unwrap();
    match LogStore::open(dir.path(), &LogOptions::default()) {
        Err(StoreError::Corrupt(message)) => assert!(message.contains("restore"), "{message}"),
        other => panic!("expected a corruption error, got {other:?}"),
    }
}

/// Damage inside the newest journal with whole records after it is bit rot, not a torn
/// write: cutting there would drop acknowledged commits, so the store refuses instead.
#[test]
fn damage_with_whole_records_after_it_is_refused_as_corruption() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 10, b"acknowledged");
    let journal = newest_journal(dir.path());
    let mut bytes = std::fs::read(&journal).unwrap();
    // Inside the first record's payload.
    bytes[20] ^= 0xff;
    std::fs::write(&journal, &bytes).unwrap();
    match LogStore::open(dir.path(), &LogOptions::default()) {
        Err(StoreError::Corrupt(message)) => assert!(message.contains("restore"), "{message}"),
        other => panic!("expected a corruption error, got {other:?}"),
    }
    assert_eq!(std::fs::read(&journal).unwrap(), bytes, "nothing was cut");
}

/// The dedupe filter answers lookups of records never written without searching the map; it
/// must never hide a record that is there: written in this run, recovered from the journal,
/// or recovered when more records exist than an open warms the filter with.
#[test]
fn dedupe_records_are_found_across_reopens_whatever_the_filter_knows() {
    use courier_core::keys;
    for warm_keys_max in [65_536, 3] {
        let dir = tempfile::tempdir().unwrap();
        let options = LogOptions {
            dedupe_filter_warm_keys_max: warm_keys_max,
            ..LogOptions::default()
        };
        let records: Vec<[u8; 33]> = (0..10u64)
            .map(|i| keys::dedupe(7 + i % 2, 100 + i, 5, i))
            .collect();
        {
            let store = LogStore::open(dir.path(), &options).unwrap();
            for key in &records {
                set(&store, key, b"seq");
            }
            let mut txn = store.begin().unwrap();
            assert_eq!(txn.get(&records[3]).unwrap().as_deref(), Some(&b"seq"[..]));
            assert_eq!(txn.get(&keys::dedupe(8, 999, 5, 1)).unwrap(), None);
        }
        let store = LogStore::open(dir.path(), &options).unwrap();
        let mut txn = store.begin().unwrap();
        for key in &records {
            assert_eq!(
                txn.get(key).unwrap().as_deref(),
                Some(&b"seq"[..]),
                "warm_keys_max {warm_keys_max}"
            );
        }
        assert_eq!(txn.get(&keys::dedupe(8, 999, 5, 1)).unwrap(), None);
    }
}

/// Dedupe records (a day of sends by default) live in the dedupe tier on disk, not in the
/// memory the bound counts: a store whose bound a few messages would fill takes thousands of
/// them. Past `dedupe_memory_bytes_max` the background thread moves them to the tier; reads
/// and range scans merge what memory still holds with the tier, in key order, deletes
/// included, before and after a checkpoint (whose snapshot leaves them out, and which deletes
/// the journals that held them) and a reopen.
#[test]
fn dedupe_records_move_to_the_tier_and_reads_merge_memory_and_tier() {
    use courier_core::keys;
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        memory_bytes_max: 4096,
        dedupe_memory_bytes_max: 16 * 1024,
        ..LogOptions::default()
    };
    let moved: Vec<[u8; 33]> = (0..5_000u64)
        .map(|i| keys::dedupe(7, 100 + i % 50, 5, 2 * i))
        .collect();
    // Between the moved ones in key order, and few enough to stay in memory.
    let recent: Vec<[u8; 33]> = (0..50u64)
        .map(|i| keys::dedupe(7, 100 + i % 50, 5, 2 * i + 1))
        .collect();
    let (gone_moved, gone_recent) = (moved[4_321], recent[17]);
    let check = |store: &LogStore, when: &str| {
        let mut txn = store.begin_read().unwrap();
        for key in moved.iter().step_by(97).chain(recent.iter().step_by(7)) {
            if *key != gone_moved && *key != gone_recent {
                assert_eq!(
                    txn.get(key).unwrap().as_deref(),
                    Some(&[7u8; 24][..]),
                    "{when}"
                );
            }
        }
        assert_eq!(txn.get(&gone_moved).unwrap(), None, "{when}");
        assert_eq!(txn.get(&gone_recent).unwrap(), None, "{when}");
        let scanned = txn.get_range(b"c", b"f", 10_000).unwrap();
        assert_eq!(scanned.len(), moved.len() + recent.len() - 2 + 2, "{when}");
        assert_eq!(scanned.first().unwrap().0, b"c-below", "{when}");
        assert_eq!(scanned.last().unwrap().0, b"e-above", "{when}");
        assert!(
            scanned.windows(2).all(|pair| pair[0].0 < pair[1].0),
            "{when}"
        );
        assert!(
            !scanned
                .iter()
                .any(|(key, _)| key[..] == gone_moved[..] || key[..] == gone_recent[..]),
            "{when}"
        );
    };
    {
        let store = LogStore::open(dir.path(), &options).unwrap();
        for chunk in moved.chunks(500) {
            let mut txn = store.begin().unwrap();
            for key in chunk {
                txn.set(key, &[7u8; 24]);
            }
            txn.commit().unwrap();
        }
        assert_eq!(store.live_bytes_without_waiting(), 0);
        // Each commit asked for a move; the last one ends in the background.
        let waited = std::time::Instant::now();
        while store.dedupe_memory_bytes() > 0 {
            assert!(
                waited.elapsed() < std::time::Duration::from_secs(60),
                "the records never moved to the tier"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let mut txn = store.begin().unwrap();
        for key in &recent {
            txn.set(key, &[7u8; 24]);
        }
        txn.commit().unwrap();
        assert!(
            store.dedupe_memory_bytes() > 0,
            "the last ones wait in memory"
        );
        set(&store, b"c-below", b"1");
        set(&store, b"e-above", b"2");
        let mut txn = store.begin().unwrap();
        txn.clear(&gone_moved);
        txn.clear(&gone_recent);
        txn.commit().unwrap();
        check(&store, "in memory and in the tier");
        store.checkpoint().unwrap();
        assert_eq!(
            store.dedupe_memory_bytes(),
            0,
            "a checkpoint moves them all"
        );
        check(&store, "after a checkpoint");
        let journals_with_records = files(dir.path())
            .iter()
            .filter(|path| {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                name.starts_with("journal-") && !name.ends_with(".tmp")
            })
            .filter(|path| std::fs::read(path).unwrap().iter().any(|b| *b != 0))
            .count();
        assert_eq!(journals_with_records, 0, "the checkpoint kept a journal");
    }
    let store = LogStore::open(dir.path(), &options).unwrap();
    check(&store, "after a reopen");
}

/// A record of the log store's files (`core/src/store/log.rs`) as versions 1 and 2 wrote it
/// (its checksum unkeyed), written here independently of the engine, to build directories an
/// older version left, or what a sender who knows the format can put in a message body.
fn record(changes: &[(&[u8], Option<&[u8]>)]) -> Vec<u8> {
    record_seeded(changes, 0)
}

/// A record as version 3 wrote it: its checksum keyed with the store's salt, no length tag.
fn record_seeded(changes: &[(&[u8], Option<&[u8]>)], seed: u64) -> Vec<u8> {
    let mut payload = (changes.len() as u32).to_le_bytes().to_vec();
    for (key, value) in changes {
        payload.push(if value.is_some() { 1 } else { 2 });
        payload.extend_from_slice(&(key.len() as u16).to_le_bytes());
        payload.extend_from_slice(key);
        if let Some(value) = value {
            payload.extend_from_slice(&(value.len() as u32).to_le_bytes());
            payload.extend_from_slice(value);
        }
    }
    let mut out = (payload.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64_with_seed(&payload, seed).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// A store written before the dedupe tier (`FORMAT` version 1: dedupe records in the
/// snapshot and journals, no `dedupe/`) is upgraded when opened: its records reach the tier,
/// `FORMAT` says version 4, and nothing is lost across the next checkpoint and reopen. A tier
/// an unfinished earlier upgrade left is not trusted: a record deleted since does not return.
#[test]
fn a_version_1_store_is_upgraded_on_open() {
    use courier_core::keys;
    use courier_core::store::fjall::{FjallOptions, FjallStore};
    let dir = tempfile::tempdir().unwrap();
    let kept = keys::dedupe(7, 100, 5, 1);
    let deleted_since = keys::dedupe(7, 100, 5, 2);
    std::fs::write(dir.path().join("FORMAT"), "courier log store 1\n").unwrap();
    std::fs::write(
        dir.path().join("snapshot-00000000000000000001"),
        record(&[(&kept, Some(b"seq")), (b"q-message", Some(b"body"))]),
    )
    .unwrap();
    {
        let stale_tier =
            FjallStore::open(&dir.path().join("dedupe"), &FjallOptions::default()).unwrap();
        let mut txn = stale_tier.begin().unwrap();
        txn.set(&deleted_since, b"seq");
        txn.commit().unwrap();
    }
    {
        let store = LogStore::open(dir.path(), &LogOptions::default()).unwrap();
        assert_eq!(get(&store, &kept).as_deref(), Some(&b"seq"[..]));
        assert_eq!(get(&store, &deleted_since), None);
        let format = std::fs::read_to_string(dir.path().join("FORMAT")).unwrap();
        assert!(format.starts_with("courier log store 4\n"), "{format}");
        store.checkpoint().unwrap();
        assert!(!dir.path().join("snapshot-00000000000000000001").exists());
    }
    let store = LogStore::open(dir.path(), &LogOptions::default()).unwrap();
    assert_eq!(get(&store, &kept).as_deref(), Some(&b"seq"[..]));
    assert_eq!(get(&store, b"q-message").as_deref(), Some(&b"body"[..]));
}

/// A store of version 2 (records' checksums unkeyed) is upgraded when opened: its journals are
/// read as they were written, `FORMAT` names a salt for the journals from the next one on, and
/// everything is there after more commits, a checkpoint and reopens.
#[test]
fn a_version_2_store_is_read_and_its_new_files_salted() {
    use courier_core::store::fjall::{FjallOptions, FjallStore};
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("FORMAT"), "courier log store 2\n").unwrap();
    drop(FjallStore::open(&dir.path().join("dedupe"), &FjallOptions::default()).unwrap());
    let mut journal = record(&[(b"q-old-1", Some(b"one"))]);
    journal.extend_from_slice(&record(&[(b"q-old-2", Some(b"two")), (b"q-old-1", None)]));
    std::fs::write(dir.path().join("journal-00000000000000000001"), journal).unwrap();
    {
        let store = LogStore::open(dir.path(), &LogOptions::default()).unwrap();
        assert_eq!(get(&store, b"q-old-1"), None);
        assert_eq!(get(&store, b"q-old-2").as_deref(), Some(&b"two"[..]));
        let format = std::fs::read_to_string(dir.path().join("FORMAT")).unwrap();
        assert!(format.starts_with("courier log store 4\nsalt "), "{format}");
        assert!(
            format.ends_with("salted_from 2\ntagged_from 2\n"),
            "{format}"
        );
        set(&store, b"q-new", b"three");
    }
    {
        let store = LogStore::open(dir.path(), &LogOptions::default()).unwrap();
        assert_eq!(get(&store, b"q-old-2").as_deref(), Some(&b"two"[..]));
        assert_eq!(get(&store, b"q-new").as_deref(), Some(&b"three"[..]));
        store.checkpoint().unwrap();
        set(&store, b"q-after", b"four");
    }
    let store = LogStore::open(dir.path(), &LogOptions::default()).unwrap();
    for (key, value) in [
        (&b"q-old-2"[..], &b"two"[..]),
        (b"q-new", b"three"),
        (b"q-after", b"four"),
    ] {
        assert_eq!(get(&store, key).as_deref(), Some(value));
    }
    // A damaged FORMAT (its salt unreadable) is refused, not read as some other version.
    drop(store);
    std::fs::write(dir.path().join("FORMAT"), "courier log store 4\nsalt zz\n").unwrap();
    match LogStore::open(dir.path(), &LogOptions::default()) {
        Err(StoreError::Corrupt(message)) => assert!(message.contains("salt"), "{message}"),
        other => panic!("expected a corruption error, got {other:?}"),
    }
}

/// A message body is the sender's to choose, and one can hold a whole record as the format
/// writes it. If a crash tears the record that carries that body, the bytes after the tear
/// hold a record that would check with an unkeyed checksum: recovery took that for damage
/// after the tear and refused to open. Keyed with the store's salt, the crafted record does
/// not check, and the tear is cut like any other.
#[test]
fn a_body_holding_a_whole_record_does_not_make_a_tear_look_like_damage() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 10, b"kept");
    let mut body = vec![0xaa; 64];
    body.extend_from_slice(&record(&[(b"q-forged", Some(b"forged"))]));
    body.extend_from_slice(&[0xbb; 64]);
    {
        let store = LogStore::open(dir.path(), &LogOptions::default()).unwrap();
        set(&store, b"q-crafted", &body);
    }
    // The crash: the record's last 32 bytes (in the body's tail) never reached the disk.
    let journal = newest_journal(dir.path());
    let bytes = std::fs::read(&journal).unwrap();
    let end = records_end(&bytes);
    write_at(&journal, (end - 32) as u64, &[0u8; 32]);
    let store = LogStore::open(dir.path(), &LogOptions::default()).expect("a tear, cut");
    assert!(store.recovery().torn_bytes_cut > 0);
    assert_eq!(
        get(&store, b"q-crafted"),
        None,
        "the torn commit is dropped"
    );
    assert_eq!(get(&store, b"q-forged"), None);
    assert_eq!(
        get(&store, &9u32.to_be_bytes()).as_deref(),
        Some(&b"kept"[..])
    );
}

/// A store of version 3 (keyed checksums without length tags) is upgraded when opened: its
/// files are read as they were written, `FORMAT` tags the files from the next journal on, and
/// everything is there after more commits, a checkpoint and reopens.
#[test]
fn a_version_3_store_is_read_and_its_new_files_tagged() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LogStore::open(dir.path(), &LogOptions::default()).unwrap();
        set(&store, b"q-old", b"one");
    }
    // What this store was before version 4: the same salt, no file tagged. Its journal is
    // rewritten as version 3 wrote it.
    let format = std::fs::read_to_string(dir.path().join("FORMAT")).unwrap();
    let salt_line = format.lines().nth(1).unwrap().to_string();
    let seed = u64::from_str_radix(salt_line.strip_prefix("salt ").unwrap(), 16).unwrap();
    std::fs::write(
        dir.path().join("FORMAT"),
        format!("courier log store 3\n{salt_line}\nsalted_from 0\n"),
    )
    .unwrap();
    let journal = newest_journal(dir.path());
    let mut untagged = record_seeded(&[(b"q-old", Some(b"one"))], seed);
    untagged.extend_from_slice(&record_seeded(&[(b"q-old-2", Some(b"two"))], seed));
    std::fs::write(&journal, untagged).unwrap();
    let tagged_from = {
        let store = LogStore::open(dir.path(), &LogOptions::default()).unwrap();
        assert_eq!(get(&store, b"q-old").as_deref(), Some(&b"one"[..]));
        assert_eq!(get(&store, b"q-old-2").as_deref(), Some(&b"two"[..]));
        let format = std::fs::read_to_string(dir.path().join("FORMAT")).unwrap();
        assert!(
            format.starts_with(&format!(
                "courier log store 4\n{salt_line}\nsalted_from 0\n"
            )),
            "{format}"
        );
        set(&store, b"q-new", b"three");
        format
            .lines()
            .nth(3)
            .and_then(|line| line.strip_prefix("tagged_from "))
            .expect("tagged_from")
            .parse::<u64>()
            .unwrap()
    };
    assert!(tagged_from > 0, "the old journal stays untagged");
    {
        let store = LogStore::open(dir.path(), &LogOptions::default()).unwrap();
        assert_eq!(get(&store, b"q-old-2").as_deref(), Some(&b"two"[..]));
        assert_eq!(get(&store, b"q-new").as_deref(), Some(&b"three"[..]));
        store.checkpoint().unwrap();
        set(&store, b"q-after", b"four");
    }
    let store = LogStore::open(dir.path(), &LogOptions::default()).unwrap();
    for (key, value) in [
        (&b"q-old"[..], &b"one"[..]),
        (b"q-old-2", b"two"),
        (b"q-new", b"three"),
        (b"q-after", b"four"),
    ] {
        assert_eq!(get(&store, key).as_deref(), Some(value));
    }
}

/// A crash that tears the commit carrying bodies of repeated large lengths (a sender's to
/// choose: here `00 00 10 00`, a megabyte, at every fourth byte) is cut like any other tear.
/// Before the length tags (version 4), every fourth offset of such a body was a candidate
/// record whose megabyte had to be hashed, the search after the tear gave up at its budget,
/// and the store refused to open until an operator cut the journal by hand.
#[test]
fn a_tear_through_bodies_of_crafted_lengths_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        journal_segment_bytes: 16 << 20,
        ..LogOptions::default()
    };
    let body: Vec<u8> = [0x00, 0x00, 0x10, 0x00].repeat(16 * 1024);
    {
        let store = LogStore::open(dir.path(), &options).unwrap();
        set(&store, b"kept", b"before");
        let mut txn = store.begin().unwrap();
        for i in 0..6u8 {
            txn.set(&[b'q', i], &body);
        }
        txn.commit().unwrap();
    }
    // The crash: the last of the record's bodies never reached the disk. The search after
    // the tear then meets five bodies, about 16 GiB of candidates to hash each without tags:
    // past its budget of 32 GiB.
    let journal = newest_journal(dir.path());
    let bytes = std::fs::read(&journal).unwrap();
    let end = records_end(&bytes);
    write_at(&journal, (end - body.len()) as u64, &vec![0u8; body.len()]);
    let store = LogStore::open(dir.path(), &options).expect("a tear, cut");
    assert!(store.recovery().torn_bytes_cut > 0);
    assert_eq!(get(&store, b"kept").as_deref(), Some(&b"before"[..]));
    assert_eq!(get(&store, b"q\0"), None, "the torn commit is dropped");
}

/// A journal file stops growing at 64 MiB even without segments (or a spare segment to go
/// on to): recovery reads each journal whole beside the map it rebuilds, and one journal that
/// grew until the next checkpoint (which waits for the journals to pass the live data) made a
/// restart need about twice the store's memory.
#[test]
fn a_journal_without_segments_goes_on_in_a_new_file_past_64_mib() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        journal_segment_bytes: 0,
        background_thread: false,
        ..LogOptions::default()
    };
    let value = vec![7u8; 1 << 20];
    {
        let store = LogStore::open(dir.path(), &options).unwrap();
        for i in 0..100u32 {
            set(&store, &i.to_be_bytes(), &value);
        }
    }
    let journals: Vec<u64> = files(dir.path())
        .iter()
        .filter(|path| {
            let name = path.file_name().unwrap().to_str().unwrap();
            name.starts_with("journal-0")
        })
        .map(|path| std::fs::metadata(path).unwrap().len())
        .collect();
    assert!(journals.len() >= 2, "journal sizes: {journals:?}");
    assert!(
        journals
            .iter()
            .all(|bytes| *bytes <= (64 << 20) + (1 << 20) + 64),
        "journal sizes: {journals:?}"
    );
    let store = LogStore::open(dir.path(), &options).unwrap();
    assert_eq!(store.recovery().keys, 100);
    for i in [0u32, 63, 64, 99] {
        assert_eq!(get(&store, &i.to_be_bytes()).as_deref(), Some(&value[..]));
    }
}

/// A version 2 store whose tier is gone is refused, naming it, instead of opening without its
/// dedupe records; one whose creation stopped before the tier was made opens.
#[test]
fn a_store_without_its_dedupe_tier_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(LogStore::open(dir.path(), &LogOptions::default()).unwrap());
    std::fs::remove_dir_all(dir.path().join("dedupe")).unwrap();
    match LogStore::open(dir.path(), &LogOptions::default()) {
        Err(StoreError::Corrupt(message)) => assert!(message.contains("dedupe"), "{message}"),
        other => panic!("expected a corruption error, got {other:?}"),
    }

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("FORMAT"), "courier log store 2\n").unwrap();
    let store = LogStore::open(dir.path(), &LogOptions::default()).unwrap();
    set(&store, b"q-1", b"body");
}

/// A checkpoint deletes the journals that held dedupe records only after the tier holds them
/// durably (moved into its tables), and the journals that held their deletes only after the
/// tier's tombstones are synced (they wait in its journal's buffer until then). A copy of the
/// directory taken right after a checkpoint, while the store is open, is what a crash would
/// leave: opened, it has every record, then none of the deleted ones.
#[test]
fn a_crash_right_after_a_checkpoint_keeps_the_dedupe_records() {
    use courier_core::keys;
    let dir = tempfile::tempdir().unwrap();
    let records: Vec<[u8; 33]> = (0..20u64).map(|i| keys::dedupe(7, 100, 5, i)).collect();
    let store = LogStore::open(dir.path(), &LogOptions::default()).unwrap();
    for key in &records {
        set(&store, key, b"seq");
    }
    store.checkpoint().unwrap();
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), copy.path());
    let crashed = LogStore::open(copy.path(), &LogOptions::default()).unwrap();
    for key in &records {
        assert_eq!(get(&crashed, key).as_deref(), Some(&b"seq"[..]));
    }
    drop(crashed);
    // Deleted now, from the tier: the tombstones are synced before the journal holding the
    // deletes goes, or the records would come back.
    let mut txn = store.begin().unwrap();
    for key in &records {
        txn.clear(key);
    }
    txn.commit().unwrap();
    store.checkpoint().unwrap();
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), copy.path());
    let crashed = LogStore::open(copy.path(), &LogOptions::default()).unwrap();
    for key in &records {
        assert_eq!(get(&crashed, key), None);
    }
    drop(store);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else if let Err(error) = std::fs::copy(&path, &target) {
            // The tier's background compactions delete files while this copies, as a crash
            // could find them gone.
            assert_eq!(error.kind(), std::io::ErrorKind::NotFound, "{error}");
        }
    }
}

/// A restart replays the journals' dedupe records; a large backlog's journals can hold
/// gigabytes of them, so the replay moves them to the tier whenever they reach
/// `dedupe_memory_bytes_max`. Deletes replayed after their record's set (in the same run or
/// a later one) hide it, and a record set again after its delete is back: the recovered
/// records are exactly those a model of the commits holds.
#[test]
fn a_replay_moves_dedupe_records_to_the_tier_past_their_bound() {
    use courier_core::keys;
    let dir = tempfile::tempdir().unwrap();
    let records: Vec<[u8; 33]> = (0..2_000u64).map(|i| keys::dedupe(9, 1, 2, i)).collect();
    let mut model = std::collections::BTreeMap::<Vec<u8>, Vec<u8>>::new();
    {
        // Never moved while open, never checkpointed: all in the journal only.
        let store = LogStore::open(
            dir.path(),
            &LogOptions {
                dedupe_memory_bytes_max: u64::MAX,
                ..LogOptions::default()
            },
        )
        .unwrap();
        let mut commit = |changes: &mut dyn Iterator<Item = (&[u8; 33], Option<&[u8]>)>| {
            let mut txn = store.begin().unwrap();
            for (key, value) in changes {
                match value {
                    Some(value) => {
                        txn.set(key, value);
                        model.insert(key.to_vec(), value.to_vec());
                    }
                    None => {
                        txn.clear(key);
                        model.remove(&key[..]);
                    }
                }
            }
            txn.commit().unwrap();
        };
        for chunk in records.chunks(100) {
            commit(&mut chunk.iter().map(|key| (key, Some(&b"seq"[..]))));
        }
        // Deletes far from their sets (other runs), then some records set again.
        for chunk in records.chunks(100) {
            commit(&mut chunk.iter().step_by(3).map(|key| (key, None)));
        }
        for chunk in records.chunks(100) {
            commit(
                &mut chunk
                    .iter()
                    .step_by(9)
                    .map(|key| (key, Some(&b"again"[..]))),
            );
        }
        // Changes of one key close together, so within one run: set, deleted, set again,
        // deleted again.
        for chunk in records.chunks(100).take(5) {
            commit(
                &mut chunk
                    .iter()
                    .step_by(5)
                    .map(|key| (key, Some(&b"close"[..]))),
            );
            commit(&mut chunk.iter().step_by(10).map(|key| (key, None)));
            commit(
                &mut chunk
                    .iter()
                    .step_by(20)
                    .map(|key| (key, Some(&b"closer"[..]))),
            );
            commit(&mut chunk.iter().skip(40).step_by(40).map(|key| (key, None)));
        }
        // Last, deletes of records moved long ago: tombstones of the replay's final run.
        commit(
            &mut records
                .iter()
                .skip(1)
                .step_by(7)
                .take(50)
                .map(|key| (key, None)),
        );
    }
    let bound = 16 * 1024;
    let store = LogStore::open(
        dir.path(),
        &LogOptions {
            dedupe_memory_bytes_max: bound,
            ..LogOptions::default()
        },
    )
    .unwrap();
    // About 140 bytes each: over 3,000 changes pass 16 KiB more than ten times.
    assert!(
        store.recovery().dedupe_moves >= 10,
        "{:?}",
        store.recovery()
    );
    assert!(store.dedupe_memory_bytes() < bound);
    let mut txn = store.begin_read().unwrap();
    for key in &records {
        assert_eq!(
            txn.get(key).unwrap(),
            model.get(&key[..]).cloned(),
            "{key:?}"
        );
    }
    let scanned = txn
        .get_range(&[keys::TAG_DEDUPE], &[keys::TAG_DEDUPE + 1], 10_000)
        .unwrap();
    let expected: Vec<(Vec<u8>, Vec<u8>)> = model.into_iter().collect();
    assert_eq!(scanned, expected);
}

/// A restart replays the map's changes in sorted runs merged into it (at least 65,536 changes
/// or a quarter of the map each): 300,000 sets, overwrites and deletes over 30,000 keys, in
/// commits of 100, replayed from journals alone and then from a snapshot taken midway plus
/// the journals after it, recover exactly what a model of them holds.
#[test]
fn a_long_replay_in_sorted_runs_recovers_the_exact_state() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        // No checkpoint on its own: the first reopen replays journals only.
        journal_bytes_max: u64::MAX,
        ..LogOptions::default()
    };
    let mut model = std::collections::BTreeMap::<Vec<u8>, Vec<u8>>::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let recovered = |store: &LogStore| {
        let mut txn = store.begin_read().unwrap();
        txn.get_range(b"", &[0xff], 1_000_000).unwrap()
    };
    // Message keys (tag `q`) among others, so the recovered counts are checked too.
    let key_of = |roll: u64| {
        let index = roll % 30_000;
        if index % 2 == 0 {
            format!("q{index:05}").into_bytes()
        } else {
            format!("k{index:05}").into_bytes()
        }
    };
    let as_pairs = |model: &std::collections::BTreeMap<Vec<u8>, Vec<u8>>| {
        model
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>()
    };
    // The store's own counts before the last reopen, to compare with the recovered ones.
    let mut store_counts: (Option<u64>, Option<u64>) = (None, None);
    for half in 0..2 {
        let store = LogStore::open(dir.path(), &options).unwrap();
        if half == 1 {
            assert_eq!(recovered(&store), as_pairs(&model), "from journals only");
            assert!(!store.recovery().snapshot);
        }
        for _ in 0..1_500 {
            let mut txn = store.begin().unwrap();
            for _ in 0..100 {
                let roll = next();
                let key = key_of(roll);
                if roll % 5 == 0 {
                    txn.clear(&key);
                    model.remove(&key);
                } else {
                    let value = format!("v{}", roll >> 40).into_bytes();
                    txn.set(&key, &value);
                    model.insert(key, value);
                }
            }
            txn.commit().unwrap();
        }
        if half == 0 {
            drop(store);
            continue;
        }
        // A snapshot of everything so far, then more changes in journals after it.
        store.checkpoint().unwrap();
        for _ in 0..500 {
            let mut txn = store.begin().unwrap();
            for _ in 0..100 {
                let roll = next();
                let key = key_of(roll);
                if roll % 3 == 0 {
                    txn.clear(&key);
                    model.remove(&key);
                } else {
                    txn.set(&key, b"late");
                    model.insert(key, b"late".to_vec());
                }
            }
            txn.commit().unwrap();
        }
        store_counts = (
            Some(store.live_bytes_without_waiting()),
            store.message_keys_without_waiting(),
        );
    }
    let (live_bytes, message_keys) = (
        store_counts.0.expect("counted before the reopen"),
        store_counts.1.expect("counted before the reopen"),
    );
    let store = LogStore::open(dir.path(), &options).unwrap();
    assert!(store.recovery().snapshot);
    assert_eq!(store.recovery().keys, model.len() as u64);
    assert_eq!(
        recovered(&store),
        as_pairs(&model),
        "from a snapshot and journals"
    );
    assert_eq!(store.live_bytes_without_waiting(), live_bytes);
    assert_eq!(store.message_keys_without_waiting(), Some(message_keys));
    assert_eq!(
        message_keys,
        model.keys().filter(|key| key[0] == b'q').count() as u64
    );
}

/// A snapshot holds every live pair and is written whole before it replaces any journal, so
/// any damage in it (a flipped byte, a cut record) is corruption: the store refuses to open
/// and says which file, rather than starting without the pairs after the damage.
#[test]
fn a_damaged_or_cut_snapshot_is_refused_as_corruption() {
    // A flipped bit; a cut inside a record; a cut at a record's boundary (its end record of
    // 16 bytes gone: read as a whole snapshot before version 4); nothing left.
    for cut in ["flip", "inside", "boundary", "empty"] {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = LogStore::open(dir.path(), &LogOptions::default()).unwrap();
            for i in 0..5_000u32 {
                set(&store, format!("q-{i:05}").as_bytes(), &[9u8; 100]);
            }
            store.checkpoint().unwrap();
        }
        let snapshot = files(dir.path())
            .into_iter()
            .find(|path| {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                name.starts_with("snapshot-") && !name.ends_with(".tmp")
            })
            .expect("the checkpoint wrote a snapshot");
        let mut bytes = std::fs::read(&snapshot).unwrap();
        assert!(bytes.len() > 100_000, "{} bytes", bytes.len());
        match cut {
            "inside" => bytes.truncate(bytes.len() - 7 - 16),
            "boundary" => bytes.truncate(bytes.len() - 16),
            "empty" => bytes.clear(),
            _ => {
                let middle = bytes.len() / 2;
                bytes[middle] ^= 0x40;
            }
        }
        std::fs::write(&snapshot, &bytes).unwrap();
        let error = LogStore::open(dir.path(), &LogOptions::default()).unwrap_err();
        assert!(
            matches!(error, StoreError::Corrupt(_)) && error.to_string().contains("snapshot-"),
            "cut {cut}: {error}"
        );
    }
}

/// A new journal segment is zero-filled to its length and allocated (what lets direct writes
/// go into it without changing the file's metadata), in whole chunks and a part of one, and on
/// whatever file system `/tmp` is (tmpfs, where the write-out of each chunk does nothing).
#[test]
fn a_new_journal_segment_is_zeros_and_allocated() {
    use std::os::unix::fs::MetadataExt;
    let on_disk = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let in_tmp = tempfile::tempdir().unwrap();
    for root in [on_disk.path(), in_tmp.path()] {
        for bytes in [512u64, 4_096, 300 * 1024, 256 * 1024 + 100, 3 << 20] {
            let dir = root.join(format!("store-{bytes}"));
            let options = LogOptions {
                journal_segment_bytes: bytes,
                background_thread: false,
                ..LogOptions::default()
            };
            drop(LogStore::open(&dir, &options).unwrap());
            let journal = newest_journal(&dir);
            let metadata = std::fs::metadata(&journal).unwrap();
            assert_eq!(metadata.len(), bytes, "{}", journal.display());
            assert!(
                metadata.blocks() * 512 >= bytes,
                "{}: {} blocks allocated",
                journal.display(),
                metadata.blocks()
            );
            let read = std::fs::read(&journal).unwrap();
            assert!(read.iter().all(|&byte| byte == 0), "{}", journal.display());
        }
    }
}

/// A record past 8 KiB goes through the page cache and the small records after it go on
/// around it, directly: a batch of many messages does not turn direct writes off for the rest
/// of its segment. Every record reads back after a reopen.
#[test]
fn direct_writes_go_on_after_a_large_record() {
    let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let options = LogOptions {
        background_thread: false,
        ..LogOptions::default()
    };
    let store = LogStore::open(root.path(), &options).unwrap();
    if !store.recovery().direct_writes {
        eprintln!("this file system takes no direct writes: nothing to check");
        return;
    }
    set(&store, b"small-1", &[1; 300]);
    set(&store, b"large", &[2; 20_000]);
    set(&store, b"small-2", &[3; 300]);
    assert!(
        store.writes_directly(),
        "the record after a large one was written directly"
    );
    set(&store, b"small-3", &[4; 5_000]);
    assert!(store.writes_directly());
    drop(store);
    let store = LogStore::open(root.path(), &options).unwrap();
    assert_eq!(get(&store, b"small-1"), Some(vec![1; 300]));
    assert_eq!(get(&store, b"large"), Some(vec![2; 20_000]));
    assert_eq!(get(&store, b"small-2"), Some(vec![3; 300]));
    assert_eq!(get(&store, b"small-3"), Some(vec![4; 5_000]));
}

/// Direct journal writes (`LogOptions::direct_writes`, decision 0032) leave exactly the files
/// the page cache would: the same commits, synced and unsynced, of sizes that start and end
/// inside 512-byte blocks, fill them, span them, and run past small segments, give two stores
/// journals that are equal byte for byte, and the same state after a reopen. Records past
/// 8 KiB go through the page cache in both, and the direct writer goes on after them.
#[test]
fn direct_journal_writes_leave_the_bytes_the_page_cache_would() {
    // On the disk under the target directory: `/tmp` may be tmpfs, which takes no direct
    // writes.
    let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let options = |direct_writes| LogOptions {
        // A segment every few dozen commits; no background thread, so both stores change
        // segments at the same commits (a spare is ready whenever `run_background_work` ran).
        journal_segment_bytes: 32 * 1024,
        background_thread: false,
        direct_writes,
        ..LogOptions::default()
    };
    let run = |name: &str, direct_writes: bool| {
        let dir = root.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        // The same salt for both, or their checksums differ.
        std::fs::write(
            dir.join("FORMAT"),
            "courier log store 3\nsalt 0123456789abcdef\nsalted_from 0\n",
        )
        .unwrap();
        let store = LogStore::open(&dir, &options(direct_writes)).unwrap();
        let direct = store.recovery().direct_writes;
        let mut x = 7u64;
        for commit in 0..600u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let length = [1usize, 60, 300, 500, 1_000, 3_000, 9_000][(x % 7) as usize];
            let key = (x % 300).to_be_bytes();
            let mut txn = if commit % 3 == 0 {
                store.begin_unsynced().unwrap()
            } else {
                store.begin().unwrap()
            };
            if x % 5 == 0 {
                txn.clear(&key);
            } else {
                txn.set(&key, &vec![(commit % 255) as u8 + 1; length]);
            }
            let version = txn.commit().unwrap();
            store.sync_through(version).unwrap();
            // Spares for some segment changes, none for others (the writer then appends past
            // its segment's end, through the page cache).
            if commit % 50 < 25 {
                store.run_background_work();
            }
        }
        drop(store);
        (dir, direct)
    };
    let (direct_dir, direct) = run("direct", true);
    let (buffered_dir, buffered) = run("buffered", false);
    assert!(!buffered, "a store told not to write directly did");
    if !direct {
        eprintln!("this file system takes no direct writes: both stores used the page cache");
    }
    let journals = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        let mut journals: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| {
                path.file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .starts_with("journal-")
            })
            .map(|path| {
                let name = path.file_name().unwrap().to_str().unwrap().to_string();
                (name, std::fs::read(&path).unwrap())
            })
            .collect();
        journals.sort();
        journals
    };
    let (direct_journals, buffered_journals) = (journals(&direct_dir), journals(&buffered_dir));
    assert!(
        direct_journals.len() > 3,
        "the commits spanned several segments"
    );
    assert_eq!(
        direct_journals
            .iter()
            .map(|(name, _)| name)
            .collect::<Vec<_>>(),
        buffered_journals
            .iter()
            .map(|(name, _)| name)
            .collect::<Vec<_>>()
    );
    for ((name, direct_bytes), (_, buffered_bytes)) in
        direct_journals.iter().zip(&buffered_journals)
    {
        assert!(direct_bytes == buffered_bytes, "{name} differs");
    }
    let state = |dir: &Path| {
        LogStore::open(dir, &options(true))
            .unwrap()
            .begin_read()
            .unwrap()
            .get_range(&[], &[0xff; 9], usize::MAX)
            .unwrap()
    };
    let recovered = state(&direct_dir);
    assert!(!recovered.is_empty());
    assert!(
        recovered == state(&buffered_dir),
        "the two stores recovered different states"
    );
}

/// Old dedupe buckets leave the dedupe tier by whole tables (decision 0038) in a few expiry
/// passes, the current bucket stays, and none of the old records comes back at a reopen: a
/// record moved to the tier stays in its journal until a checkpoint, so the drop checkpoints
/// first (without it, the replay brought the dropped records back into memory).
#[test]
fn old_dedupe_buckets_leave_the_tier_by_whole_tables_and_stay_gone_after_a_reopen() {
    old_dedupe_buckets_leave_by_whole_tables(true);
}

/// Old dedupe records still in memory at the drop (a shard whose day of sends fits its
/// dedupe memory) leave with their journals at the drop's checkpoint, not ingested into the
/// tier first, and stay gone after a reopen; the current bucket's records, in memory too,
/// are ingested and stay.
#[test]
fn old_dedupe_records_still_in_memory_go_with_their_journals_at_the_drop() {
    old_dedupe_buckets_leave_by_whole_tables(false);
}

/// 5,000 sends in dedupe bucket 1, moved to the tier before the day ends or not, and 3 in
/// bucket 3; then expiry passes until they say there is no more, and a reopen.
fn old_dedupe_buckets_leave_by_whole_tables(moved_to_the_tier: bool) {
    use common::bulk_sends::{dedupe_records, spread_send};
    use courier_core::CoreConfig;
    use courier_core::commit::{Committer, DEDUPE_CLEAR_SLACK_MS, Request, expire};
    let dir = tempfile::tempdir().unwrap();
    // Moved: records move to the tier every 16 KiB, between checkpoints. Not moved: they
    // stay in memory (no checkpoint either: the journals are far from their bound).
    let options = LogOptions {
        dedupe_memory_bytes_max: if moved_to_the_tier {
            16 * 1024
        } else {
            64 << 20
        },
        ..LogOptions::default()
    };
    let config = CoreConfig {
        expire_scan_keys_max: 40,
        ..CoreConfig::default()
    };
    let window = config.dedupe_window_ms;
    {
        let store = LogStore::open(dir.path(), &options).unwrap();
        let mut committer = Committer::new(&config);
        let old: Vec<Request> = (1..=5_000).map(spread_send).collect();
        for batch in old.chunks(config.batch_requests_max) {
            committer.commit_batch(&store, batch, window + 1).unwrap();
        }
        // A day goes by: the records move to the tier (moves leave the journals in place),
        // or stay in memory.
        let waited = std::time::Instant::now();
        while moved_to_the_tier && store.dedupe_memory_bytes() > 0 {
            assert!(
                waited.elapsed() < std::time::Duration::from_secs(60),
                "the records never moved to the tier"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let new: Vec<Request> = (10_001..=10_003).map(spread_send).collect();
        committer
            .commit_batch(&store, &new, 3 * window + 1)
            .unwrap();
        assert_eq!(
            (dedupe_records(&store, 1), dedupe_records(&store, 3)),
            (5_000, 3)
        );
        if !moved_to_the_tier {
            assert!(
                store.dedupe_memory_bytes() > 100_000,
                "the records moved after all"
            );
        }
        let mut passes = 0;
        loop {
            passes += 1;
            assert!(
                passes <= 20,
                "old dedupe records still there after 20 passes"
            );
            if !expire(&store, 3 * window + DEDUPE_CLEAR_SLACK_MS + 2, &config)
                .unwrap()
                .more
            {
                break;
            }
        }
        assert_eq!(dedupe_records(&store, 1), 0, "bucket 1 is past its window");
        assert_eq!(dedupe_records(&store, 3), 3, "the current bucket stays");
    }
    let store = LogStore::open(dir.path(), &options).unwrap();
    assert_eq!(
        dedupe_records(&store, 1),
        0,
        "a dropped record came back from a journal"
    );
    assert_eq!(dedupe_records(&store, 3), 3);
}

/// Two processes started on one new directory at once: one gets the store, the other is
/// refused, and what the first commits survives a reopen. Before, the `FORMAT` file (and the
/// salt every record is checked with) was written before the directory's lock was taken, so
/// the refused opener could replace the salt of the store the other was filling, and the next
/// open cut every journal as torn: an empty store, every acknowledged commit gone. (Threads
/// stand for the processes: each open takes the lock through a descriptor of its own.)
#[test]
fn two_openers_of_a_new_directory_cannot_change_the_salt_under_each_other() {
    for round in 0..200 {
        let dir = tempfile::tempdir().expect("temp dir");
        let barrier = std::sync::Barrier::new(2);
        let opened = std::thread::scope(|scope| {
            let openers: Vec<_> = (0..2)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        let store = LogStore::open(dir.path(), &LogOptions::default()).ok()?;
                        set(&store, b"acknowledged", b"kept");
                        // Held a moment, as a process that goes on serving does.
                        std::thread::sleep(std::time::Duration::from_millis(2));
                        Some(())
                    })
                })
                .collect();
            openers
                .into_iter()
                .filter_map(|opener| opener.join().expect("no panic"))
                .count()
        });
        assert!(opened <= 1, "round {round}: both openers held the store");
        if opened == 1 {
            let store = LogStore::open(dir.path(), &LogOptions::default())
                .unwrap_or_else(|e| panic!("round {round}: reopen: {e}"));
            assert_eq!(
                get(&store, b"acknowledged"),
                Some(b"kept".to_vec()),
                "round {round}: an acknowledged commit was lost"
            );
        }
    }
}
