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
    let send = Frame::Send {
        client_id,
        to: 22,
        body: vec![7; 60 * 1024],
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
    let filler = disk.path().join("filler");
    let room = 2 * 1024 * 1024;
    let fill = fs_free_bytes(&disk.path()).saturating_sub(room);
    let status = Command::new("fallocate")
        .args(["-l", &fill.to_string()])
        .arg(&filler)
        .status()
        .expect("run fallocate");
    assert!(status.success(), "fallocate of {fill} bytes failed");
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
