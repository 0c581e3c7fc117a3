//! Journal writes around the page cache (`fjall::direct_journal`, decisions 0032 and 0033):
//! the writer itself, and fjall's journal through it, leave the bytes the page cache would.

use std::path::Path;

use courier_core::store::fjall::{FjallOptions, FjallStore};
use courier_core::store::{Store, Transaction};
use fjall::direct_journal::{BUFFER_KEPT_BYTES_MAX, DirectJournal};

/// A zero-filled file of `bytes` beside the sources, on a disk (`/tmp` may be tmpfs, which
/// reports no alignment for direct writes), or `None` where direct writes are refused.
fn segment(bytes: usize) -> Option<(tempfile::TempDir, std::path::PathBuf, DirectJournal)> {
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("temp dir");
    let path = dir.path().join("journal");
    std::fs::write(&path, vec![0u8; bytes]).expect("zero-fill");
    let journal = DirectJournal::open(&path)?;
    Some((dir, path, journal))
}

#[test]
fn records_written_directly_read_back_as_through_the_page_cache() {
    let Some((_dir, path, mut journal)) = segment(64 * 1024) else {
        eprintln!("this file system takes no direct writes: nothing to check");
        return;
    };
    // Records that start and end inside blocks, fill one exactly, span several.
    let mut expected = vec![0u8; 64 * 1024];
    let mut offset = 0u64;
    for (index, length) in [300usize, 212, 512, 1, 5_000, 511, 513, 3_000]
        .iter()
        .enumerate()
    {
        let record: Vec<u8> = (0..*length).map(|i| (index * 31 + i) as u8 | 1).collect();
        assert!(journal.fits(offset, record.len() as u64, 64 * 1024));
        journal.write_at(&record, offset).expect("direct write");
        expected[offset as usize..offset as usize + length].copy_from_slice(&record);
        offset += *length as u64;
        let on_disk = std::fs::read(&path).expect("read the journal");
        assert_eq!(on_disk, expected, "after record {index}");
    }
}

/// A record larger than the buffer kept between writes: the buffer shrinks back, and the
/// tail it keeps still starts the next record.
#[test]
fn a_large_record_leaves_a_small_buffer_and_the_right_tail() {
    let bytes = 4 * 1024 * 1024;
    let Some((_dir, path, mut journal)) = segment(bytes) else {
        return;
    };
    let mut expected = vec![0u8; bytes];
    let mut offset = 0u64;
    for (index, length) in [300usize, BUFFER_KEPT_BYTES_MAX + 700, 300]
        .iter()
        .enumerate()
    {
        let record: Vec<u8> = (0..*length).map(|i| (index * 7 + i) as u8 | 1).collect();
        journal.write_at(&record, offset).expect("direct write");
        expected[offset as usize..offset as usize + length].copy_from_slice(&record);
        offset += *length as u64;
    }
    assert!(std::fs::read(&path).expect("read") == expected);
    assert!(journal.buffer_bytes() < BUFFER_KEPT_BYTES_MAX);
}

#[test]
fn a_write_elsewhere_than_the_journals_end_is_refused_before_any_byte() {
    let Some((_dir, path, mut journal)) = segment(4_096) else {
        return;
    };
    journal.write_at(&[7; 100], 0).expect("first record");
    let error = journal
        .write_at(&[8; 100], 50)
        .expect_err("an overlapping write");
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
    assert!(!journal.fits(50, 100, 4_096));
    let on_disk = std::fs::read(&path).expect("read");
    assert!(on_disk[..100].iter().all(|b| *b == 7) && on_disk[100..].iter().all(|b| *b == 0));
    // A record whose padded end passes the segment does not fit.
    assert!(!journal.fits(100, 4_000, 4_096));
    assert!(journal.fits(100, 3_996, 4_096));
}

/// A journal whose records end inside a block, opened again for direct writes there, goes on
/// where it ended: the block's first bytes are read back and written again, not zeroed.
#[test]
fn a_journal_opened_at_its_end_keeps_the_block_it_ends_in() {
    let Some((_dir, path, mut journal)) = segment(8 * 1024) else {
        return;
    };
    journal.write_at(&[5; 700], 0).expect("first record");
    drop(journal);
    let mut journal = DirectJournal::open_at(&path, 700).expect("open at the end");
    assert_eq!(journal.next_offset(), 700);
    journal.write_at(&[6; 100], 700).expect("second record");
    let on_disk = std::fs::read(&path).expect("read");
    assert!(
        on_disk[..700].iter().all(|b| *b == 5),
        "the first record was damaged"
    );
    assert!(on_disk[700..800].iter().all(|b| *b == 6));
    assert!(on_disk[800..].iter().all(|b| *b == 0));
}

/// Bytes written past the journal's end some other way (the page cache), ending inside a
/// block or in the block the last record ended in: the next direct write keeps them.
#[test]
fn bytes_written_elsewhere_are_kept_by_the_next_direct_write() {
    let Some((_dir, path, mut journal)) = segment(16 * 1024) else {
        return;
    };
    let mut expected = vec![0u8; 16 * 1024];
    let mut offset = 0u64;
    for (index, (length, direct)) in [
        (300usize, true),
        (100, false),
        (1_500, false),
        (40, true),
        (5_000, false),
        (10, true),
    ]
    .iter()
    .enumerate()
    {
        let record: Vec<u8> = (0..*length).map(|i| (index * 13 + i) as u8 | 1).collect();
        if *direct {
            journal.write_at(&record, offset).expect("direct write");
        } else {
            use std::os::unix::fs::FileExt;
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            file.write_all_at(&record, offset).unwrap();
            journal.wrote_elsewhere(&record, offset).unwrap();
        }
        expected[offset as usize..offset as usize + length].copy_from_slice(&record);
        offset += *length as u64;
        assert!(
            std::fs::read(&path).unwrap() == expected,
            "after record {index}"
        );
    }
}

/// A write that carries zeros up to a point allocates the file's blocks up to there (in a
/// sparse file), and the records after it go on from the record's end, not from the zeros'.
#[test]
fn zeros_carried_by_a_write_allocate_ahead_and_hold_no_record() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("journal");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(1 << 20).unwrap();
    let Some(mut journal) = DirectJournal::open(&path) else {
        eprintln!("this file system takes no direct writes: nothing to check");
        return;
    };
    let allocated = |path: &Path| std::fs::metadata(path).unwrap().blocks() * 512;
    assert_eq!(allocated(&path), 0, "a hole to start with");
    journal
        .write_at_zeroing_to(&[3; 300], 0, 64 * 1024)
        .unwrap();
    assert!(allocated(&path) >= 64 * 1024, "the zeros were written");
    journal.write_at(&[4; 200], 300).unwrap();
    let on_disk = std::fs::read(&path).unwrap();
    assert!(on_disk[..300].iter().all(|b| *b == 3));
    assert!(on_disk[300..500].iter().all(|b| *b == 4));
    assert!(on_disk[500..].iter().all(|b| *b == 0));
    assert!(allocated(&path) < 128 * 1024, "no more than asked for");
}

/// fjall's journal written directly (`FjallOptions::direct_journal_writes`, decision 0033)
/// holds the bytes it holds through the page cache: the same commits of sizes that start and
/// end inside 512-byte blocks and span several, with a reopen in the middle (the recovered
/// journal goes on from inside a block), give journals whose records are equal byte for byte,
/// followed by zeros, and the same state after another reopen.
#[test]
fn fjall_journals_written_directly_hold_the_bytes_the_page_cache_would() {
    // On the disk under the target directory: `/tmp` may be tmpfs, which takes no direct
    // writes.
    let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let options = |direct_journal_writes| FjallOptions {
        direct_journal_writes,
        ..FjallOptions::default()
    };
    let run = |name: &str, direct: bool| {
        let dir = root.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let mut x = 7u64;
        for opening in 0..3 {
            let store = FjallStore::open(&dir, &options(direct)).unwrap();
            for commit in 0..200u64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let length = [1usize, 60, 300, 500, 1_000, 3_000][(x % 6) as usize];
                let key = [b"m/".as_slice(), &(x % 300).to_be_bytes()].concat();
                let mut txn = store.begin().unwrap();
                if x % 5 == 0 {
                    txn.clear(&key);
                } else {
                    txn.set(&key, &vec![(commit % 255) as u8 + 1 + opening; length]);
                }
                // Now and then a batch large enough to go through the page cache between
                // direct writes.
                if commit % 40 == 39 {
                    for extra in 0..30u64 {
                        let key = [b"m/big/".as_slice(), &extra.to_be_bytes()].concat();
                        txn.set(&key, &vec![opening + 1; 3_000]);
                    }
                }
                txn.commit().unwrap();
            }
        }
        dir
    };
    let direct_dir = run("direct", true);
    let buffered_dir = run("buffered", false);
    let scratch = root.path().join("scratch");
    std::fs::write(&scratch, [0u8; 4096]).unwrap();
    if DirectJournal::open(&scratch).is_none() {
        eprintln!("this file system takes no direct writes: both stores used the page cache");
    }
    // Each journal's records: its bytes up to the last one that is not zero (fjall's files
    // are longer than their records, by a hole the direct writer keeps after a reopen).
    let journals = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        let mut journals: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "jnl"))
            .map(|path| {
                let name = path.file_name().unwrap().to_str().unwrap().to_string();
                let mut bytes = std::fs::read(&path).unwrap();
                let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |at| at + 1);
                bytes.truncate(end);
                (name, bytes)
            })
            .collect();
        journals.sort();
        journals
    };
    let (direct_journals, buffered_journals) = (journals(&direct_dir), journals(&buffered_dir));
    assert!(!direct_journals.is_empty());
    assert!(
        direct_journals
            .iter()
            .map(|(_, bytes)| bytes.len())
            .sum::<usize>()
            > 200_000,
        "the commits reached the journals"
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
        FjallStore::open(dir, &options(true))
            .unwrap()
            .begin_read()
            .unwrap()
            .get_range(b"m/", b"m0", usize::MAX)
            .unwrap()
    };
    let recovered = state(&direct_dir);
    assert!(!recovered.is_empty());
    assert!(
        recovered == state(&buffered_dir),
        "the two stores recovered different states"
    );
}

/// A journal that outgrows its preallocated 64 MiB, as one under sustained load does before
/// fjall seals it at its next flush (100 MB seen in a closed loop of a million messages), goes
/// on writing around the page cache: it is grown, and a reopen reads every record. Before, the
/// first write past the length fell back to the page cache, and the journal's rotation carried
/// that over, so direct writes were off for the life of the process.
#[test]
fn a_journal_past_its_preallocated_length_goes_on_writing_directly() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let open = || {
        fjall::Database::builder(dir.path())
            .journal_direct_writes(true)
            .open()
            .unwrap()
    };
    let db = open();
    let keyspace = |db: &fjall::Database| {
        db.keyspace("k", || {
            fjall::KeyspaceCreateOptions::default().max_memtable_size(512 * 1024 * 1024)
        })
        .unwrap()
    };
    let k = keyspace(&db);
    k.insert("first", "small").unwrap();
    if !db.journal_writes_directly().unwrap() {
        eprintln!("this file system takes no direct writes: nothing to check");
        return;
    }
    // Bytes that do not compress (the journal may compress what does).
    let mut x = 7u64;
    let value: Vec<u8> = (0..1024 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    // 80 MiB in records of a megabyte, each followed by a small one (written directly).
    for i in 0..80u32 {
        k.insert(i.to_be_bytes(), &value).unwrap();
        k.insert(format!("small {i}"), "small").unwrap();
        db.persist(fjall::PersistMode::Buffer).unwrap();
        assert!(
            db.journal_writes_directly().unwrap(),
            "fell back to the page cache after {i} MiB"
        );
    }
    assert_eq!(
        db.journal_count(),
        1,
        "one journal, past its preallocated length"
    );
    drop(k);
    drop(db);
    let db = open();
    let k = keyspace(&db);
    for i in 0..80u32 {
        assert_eq!(
            k.get(i.to_be_bytes()).unwrap().as_deref(),
            Some(value.as_slice())
        );
        assert_eq!(
            k.get(format!("small {i}")).unwrap().as_deref(),
            Some(b"small".as_slice())
        );
    }
}
