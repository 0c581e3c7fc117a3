//! Issue 11, store trouble: a full disk makes sends fail with the retryable `StoreUnavailable`
//! instead of ending the process, and once space returns the same process stores again by
//! itself. The data directory is a small tmpfs (mounting it needs root, which CI has).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{EVENT_TIMEOUT, Edge};
use courier_client::raw::RawConnection;
use courier_protocol::{ErrorCode, Frame};

/// A tmpfs mounted for the test, unmounted when it ends.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size_mib: u32) -> Tmpfs {
        let dir = tempfile::tempdir().expect("temp dir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "this test mounts a small tmpfs to fill the disk: run it as root"
        );
        Tmpfs { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Fills the file system but for about `room` bytes with a file, whose path it returns
    /// (remove it to give the space back).
    fn fill_leaving(&self, room: u64) -> PathBuf {
        let filler = self.path().join("filler");
        let fill = fs_free_bytes(&self.path()).saturating_sub(room);
        let status = Command::new("fallocate")
            .args(["-l", &fill.to_string()])
            .arg(&filler)
            .status()
            .expect("run fallocate");
        assert!(status.success(), "fallocate of {fill} bytes failed");
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Sends a 60 KiB message to user 22 under `client_id` and returns the edge's answer.
async fn send_and_answer(sender: &mut RawConnection, client_id: u64) -> Frame {
    send_to_and_answer(sender, client_id, 22, vec![7; 60 * 1024]).await
}

/// Sends `body` to `to` under `client_id` and returns the edge's answer.
async fn send_to_and_answer(
    sender: &mut RawConnection,
    client_id: u64,
    to: u64,
    body: Vec<u8>,
) -> Frame {
    let send = Frame::Send {
        client_id,
        to,
        body,
        ttl_secs: None,
    };
    sender.write_frame(&send).await.expect("send");
    tokio::time::timeout(EVENT_TIMEOUT, sender.read_frame())
        .await
        .expect("answer in time")
        .expect("open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_sends_as_retryable_and_the_edge_recovers_by_itself() {
    full_disk_then_recovery("").await;
}

/// The same on the log engine, whose commits are written by the writer and fsynced by the
/// syncer, two batches in flight (decision 0027): a failed journal write poisons the store,
/// a batch waiting for its sync then fails unless it was durable already, and the store is
/// reopened in place. Small journal segments make the writer need a new one soon after the
/// disk fills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_on_the_log_engine_refuses_sends_as_retryable_and_recovers() {
    full_disk_then_recovery(
        "[store]\nengine = \"log\"\nlog_journal_segment_bytes = 1048576\n\
         [batching]\nbatches_in_flight_max = 2\n",
    )
    .await;
}

async fn full_disk_then_recovery(config: &str) {
    let disk = Tmpfs::mount(48);
    let data_dir = disk.path().join("data");
    let edge = Edge::start_in(
        1,
        Some(&data_dir),
        &format!(
            "[limits.send_per_connection]\nmessages_per_sec = 0\nmessages_burst = 0\n\
             bytes_per_sec = 0\nbytes_burst = 0\n\
             [limits.send_per_user]\nmessages_per_sec = 0\nmessages_burst = 0\n\
             bytes_per_sec = 0\nbytes_burst = 0\n{config}"
        ),
        &[],
    );
    let pid = edge.pid().expect("edge runs");
    let connector = edge.connector();
    let mut sender = edge.raw_session(&connector, 21, 0).await;

    // Fill the disk but for a little room, then send until the store refuses.
    let filler = disk.fill_leaving(2 * 1024 * 1024);
    let free = fs_free_bytes(&disk.path());
    assert!(free < 8 * 1024 * 1024, "the filler left {free} bytes free");
    let mut client_id = 0;
    let refused_at = loop {
        client_id += 1;
        assert!(client_id < 2_000, "the store never refused on a full disk");
        match send_and_answer(&mut sender, client_id).await {
            Frame::SendAck { .. } => continue,
            Frame::SendError {
                code: ErrorCode::StoreUnavailable,
                retryable: true,
                ..
            } => break client_id,
            other => panic!("unexpected {other:?}"),
        }
    };

    // The disk stays full a while, sends keep coming: reopens back off. fjall reopens on a
    // full disk and a commit soon fails again; each reopen started from the shortest pause,
    // and the shard replayed its journal about every 0.6 s for as long as the disk stayed
    // full. Backing off, the pauses grow 0.5, 1, 2 s...: at most 4 reopens in 6 s.
    let reopens = || {
        edge.log
            .lock()
            .expect("log")
            .iter()
            .filter(|line| line.contains("store reopened"))
            .count()
    };
    let reopens_before = reopens();
    let full_until = tokio::time::Instant::now() + Duration::from_secs(6);
    while tokio::time::Instant::now() < full_until {
        client_id += 1;
        match send_and_answer(&mut sender, client_id).await {
            // Stored in what room a reopen found, which fills the disk again.
            Frame::SendAck { .. } => {}
            Frame::SendError {
                code: ErrorCode::StoreUnavailable,
                ..
            } => {}
            other => panic!("unexpected on a full disk: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let reopened = reopens() - reopens_before;
    assert!(
        reopened <= 4,
        "{reopened} reopens in 6 s of a disk that stayed full: they do not back off"
    );

    // Space returns; the same send, retried, is stored by the same process.
    std::fs::remove_file(&filler).expect("remove filler");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match send_and_answer(&mut sender, refused_at).await {
            Frame::SendAck { .. } => break,
            Frame::SendError {
                code: ErrorCode::StoreUnavailable,
                ..
            } => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the store did not recover within a minute of space returning"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        edge.pid(),
        Some(pid),
        "the edge recovered without a restart"
    );
    drop(edge);
}

fn fs_free_bytes(path: &std::path::Path) -> u64 {
    let output = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .expect("df");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .nth(1)
        .and_then(|line| line.trim().parse().ok())
        .unwrap_or(u64::MAX)
}

/// Longer than the edge's pause between a failed sync read and the next (100 ms).
const READ_RETRY_WAIT: Duration = Duration::from_millis(500);

/// One shard's failing store stays that shard's trouble. A user homed on shard 0 whose
/// connection the kernel handed to shard 1 syncs from shard 0's store; while that store is
/// being reopened (its disk full) the read fails and is retried, but shard 1 must neither
/// reopen its own healthy store nor refuse its own users' sends. Before 0f6791a every such
/// failed read made the reading shard reopen its own store, refusing sends meanwhile, so one
/// shard's full disk spread to every shard its users' connections landed on. And the failing
/// shard reopens its store at its first failed write, not at its next commit: with nothing
/// more to commit it stayed poisoned, and reads of its users' inboxes from other shards kept
/// failing, for as long as it was quiet. On the log engine, whose reopen needs room for a
/// journal segment: fjall opens on a full disk, so its reads work again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_failing_on_another_shards_store_leaves_this_shards_store_alone() {
    use courier_core::placement::home_shard;
    let homed_on = |shard: u32, nth: usize| {
        (1..)
            .filter(|user| home_shard(*user, 2) == shard)
            .nth(nth)
            .expect("users on both shards")
    };
    let (reader, filler_sender, filler_recipient) =
        (homed_on(0, 0), homed_on(0, 1), homed_on(0, 2));
    let (sender, recipient) = (homed_on(1, 0), homed_on(1, 1));

    let metrics = common::free_addr();
    let data = tempfile::tempdir().expect("temp dir");
    let data_dir = data.path().join("data");
    let mut edge = Edge::start_in(
        2,
        Some(&data_dir),
        &format!(
            "[metrics]\nlisten = \"{metrics}\"\n[store]\nengine = \"log\"\nlog_journal_segment_bytes = 1048576\n\
             [limits.send_per_connection]\nmessages_per_sec = 0\nmessages_burst = 0\n\
             bytes_per_sec = 0\nbytes_burst = 0\n\
             [limits.send_per_user]\nmessages_per_sec = 0\nmessages_burst = 0\n\
             bytes_per_sec = 0\nbytes_burst = 0\n"
        ),
        &[],
    );
    // Shard 0's store moves to a small filesystem of its own; shard 1's stays where it was.
    assert!(edge.terminate(), "the edge stops cleanly");
    let disk = Tmpfs::mount(48);
    let shard_0 = data_dir.join("stores/shard-0");
    let moved = disk.path().join("shard-0");
    let status = Command::new("cp")
        .arg("-a")
        .arg(&shard_0)
        .arg(&moved)
        .status()
        .expect("run cp");
    assert!(status.success(), "copy shard 0's store to the tmpfs");
    std::fs::remove_dir_all(&shard_0).expect("remove shard 0's old directory");
    std::os::unix::fs::symlink(&moved, &shard_0).expect("link shard 0's store");
    edge.spawn();
    let logged = |text: &str, shard: u32| -> bool {
        let shard = format!("shard={shard}");
        let log = edge.log.lock().expect("log");
        log.iter()
            .any(|line| line.contains(text) && line.contains(&shard))
    };
    let metric = |name: &str, shard: u32| -> f64 {
        common::metric_at(metrics, name, &format!("shard=\"{shard}\"")).expect("metrics listener")
    };

    // The reader logs in from new UDP ports (the kernel picks a connection's shard by its
    // addresses) until its connection is on shard 1.
    let mut connectors = Vec::new();
    let mut reading = None;
    for _ in 0..32 {
        let before = metric("courier_connections_accepted_total", 1);
        let connector = edge.connector();
        let raw = edge.raw_session(&connector, reader, 0).await;
        connectors.push(connector);
        if metric("courier_connections_accepted_total", 1) > before {
            reading = Some(raw);
            break;
        }
    }
    let mut reading = reading.expect("32 connections from new ports, none on shard 1");

    // Fill shard 0's disk, then send to another user homed there until its store refuses.
    let connector = edge.connector();
    let mut filling = edge.raw_session(&connector, filler_sender, 0).await;
    let filler = disk.fill_leaving(2 * 1024 * 1024);
    let mut client_id = 0;
    loop {
        client_id += 1;
        assert!(
            client_id < 2_000,
            "shard 0's store never refused on a full disk"
        );
        let answer = send_to_and_answer(
            &mut filling,
            client_id,
            filler_recipient,
            vec![7; 60 * 1024],
        )
        .await;
        match answer {
            Frame::SendAck { .. } => continue,
            Frame::SendError {
                code: ErrorCode::StoreUnavailable,
                ..
            } => break,
            other => panic!("unexpected {other:?}"),
        }
    }

    // The reader on shard 1 asks to catch up: its reads of shard 0's store fail while that
    // store is being reopened, and are retried.
    let reads_before = metric("courier_sync_reads_total", 1);
    reading
        .write_frame(&Frame::Sync { after_seq: 0 })
        .await
        .expect("sync");
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    while !logged("reopening it", 0) || metric("courier_sync_reads_total", 1) < reads_before + 5.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "shard 1 did not keep reading shard 0's failing store (shard 0 reopening: {}; \
             shard 1's reads {} since the sync)",
            logged("reopening it", 0),
            metric("courier_sync_reads_total", 1) - reads_before,
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Shard 1 carries on: its users' sends are stored, and it never reopened its store.
    let mut sending = edge.raw_session(&connector, sender, 0).await;
    for client_id in 1..=20 {
        let answer = send_to_and_answer(
            &mut sending,
            client_id,
            recipient,
            b"shard 1 is fine".to_vec(),
        )
        .await;
        assert!(
            matches!(answer, Frame::SendAck { .. }),
            "a send homed on shard 1 was refused while shard 0's store was down: {answer:?}"
        );
        assert_eq!(
            metric("courier_store_reopening", 1),
            0.0,
            "shard 1 reopened its store"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !logged("reopening it", 1),
        "shard 1 reopened its own store for shard 0's failure"
    );
    assert!(
        !logged("store reopened", 0),
        "shard 0's store came back during the test: its reads no longer failed"
    );

    // Space returns: shard 0 reopens its store by itself (no send needed to notice), and the
    // reader on shard 1 catches up.
    std::fs::remove_file(&filler).expect("remove filler");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !logged("store reopened", 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "shard 0's store was not reopened within a minute of space returning"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(READ_RETRY_WAIT).await;
    let reads_after = metric("courier_sync_reads_total", 1);
    tokio::time::sleep(READ_RETRY_WAIT).await;
    assert_eq!(
        metric("courier_sync_reads_total", 1),
        reads_after,
        "the reader's reads still fail after shard 0's store came back"
    );
    drop((reading, filling, sending, connectors));
    drop(edge);
    drop(disk);
}
