//! Deleted means gone from disk (R4, issue 10): once a message is acknowledged, its body is in
//! no file of the data directory within `retention.erase_within_secs`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Edge, next_message};

/// Files under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|window| window == needle)
            {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

/// A marker body is on disk once its send is acknowledged, and after the recipient acked it,
/// within the configured bound (2 s here, polled for up to 60 s on a slow machine) no file of
/// the running edge's data directory holds it: not the journal, not a table.
///
/// The metrics say so: complete passes counted, and each shard's last complete pass started
/// after the edge did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_body_is_erased_from_every_file_within_the_bound() {
    let metrics = common::free_addr();
    let edge = Edge::start_with(
        2,
        &format!("[retention]\nerase_within_secs = 2\n[metrics]\nlisten = \"{metrics}\"\n"),
        &[],
    );
    let delivered_unix_secs = erased_within_the_bound(&edge).await;
    let metric = |name: &str, labels: &str| {
        common::metric_at(metrics, name, labels).expect("the metrics listener answers")
    };
    // Passes come every second here: each shard's last complete one started after the
    // marker's delivery (and so after its ack) within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    for shard in 0..2 {
        let labels = format!("shard=\"{shard}\"");
        loop {
            let last_complete = metric("courier_erase_last_complete_timestamp_seconds", &labels);
            let complete = metric(
                "courier_erase_passes_total",
                &format!("{labels},result=\"complete\""),
            );
            if last_complete >= delivered_unix_secs.floor() && complete >= 1.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "shard {shard}: {complete} complete passes, the last started at \
                 {last_complete}, the marker delivered at {delivered_unix_secs}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The same on the log engine, where the erase pass is a checkpoint that deletes the journals
/// before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_body_is_erased_from_every_file_within_the_bound_on_the_log_engine() {
    let edge = Edge::start_with(
        2,
        "[retention]\nerase_within_secs = 2\n[store]\nengine = \"log\"\n",
        &[],
    );
    assert!(
        edge.dir.path().join("data/stores/shard-0/FORMAT").exists(),
        "the edge runs on the log engine"
    );
    erased_within_the_bound(&edge).await;
}

/// Whether a file under `data` holds `marker`. A scan is not atomic: a checkpoint or
/// compaction that renames and deletes files while it reads can hide the marker from one scan,
/// so this looks a few times.
async fn on_disk(data: &Path, marker: &[u8]) -> bool {
    for _ in 0..20 {
        if !files_containing(data, marker).is_empty() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Returns when the marker was delivered, Unix seconds.
async fn erased_within_the_bound(edge: &Edge) -> f64 {
    let data = edge.dir.path().join("data");
    // Random bytes: compression cannot hide them, and nothing else on disk matches.
    let marker: Vec<u8> = (0..48).map(|_| rand::random::<u8>()).collect();
    let sender = edge.client(3001).await;
    // Traffic around the marker, so it shares journals and tables with messages that stay.
    let mut kept = edge.client(3003).await;
    for i in 0..50u32 {
        sender
            .send(3004, i.to_be_bytes().to_vec())
            .await
            .expect("send");
    }
    sender.send(3002, marker.clone()).await.expect("send");
    assert!(
        on_disk(&data, &marker).await,
        "an acknowledged send is on disk (else this test could not fail)"
    );
    // The recipient comes online only now: connected before, it acked the marker at once, and
    // an erase pass could remove it before the check above read the files.
    let mut recipient = edge.client(3002).await;
    assert_eq!(next_message(&mut recipient).await.body, marker);
    let delivered_unix_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs_f64();
    // The SDK acks what the application took; more traffic moves the ack along.
    for i in 0..50u32 {
        sender
            .send(3003, i.to_be_bytes().to_vec())
            .await
            .expect("send");
        next_message(&mut kept).await;
    }
    recipient.close();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = files_containing(&data, &marker);
        if found.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the acknowledged body is still on disk in {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    delivered_unix_secs
}

/// Stores a random marker body (checked on disk, else a test could not fail), has its
/// recipient take and ack it, and stops the edge cleanly. Returns the marker.
async fn marker_acked_then_stopped(edge: &mut Edge, data: &Path) -> Vec<u8> {
    let marker: Vec<u8> = (0..48).map(|_| rand::random::<u8>()).collect();
    let sender = edge.client(3001).await;
    sender.send(3002, marker.clone()).await.expect("send");
    assert!(
        on_disk(data, &marker).await,
        "a stored body is on disk (else this test could not fail)"
    );
    let mut recipient = edge.client(3002).await;
    assert_eq!(next_message(&mut recipient).await.body, marker);
    recipient.close();
    sender.close();
    // The ack commits within milliseconds; a graceful stop also commits what waits.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(edge.terminate(), "the edge stops cleanly");
    marker
}

/// An edge restarted more often than every half of the bound still erases: the first pass
/// after a start comes when the running period is due, an eighth of the bound after the start
/// at most for a bound this short. (It came half a bound after, so an edge whose every run was
/// shorter than that, restarted for deploys or in a crash loop, never erased, and a body
/// deleted just before a restart stayed past the bound.) Here the bound is 16 s, and the edge
/// is restarted every 5 s: each run is shorter than the 8 s half bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_restarted_often_still_erases() {
    let mut edge = Edge::start_with(2, "[retention]\nerase_within_secs = 16\n", &[]);
    let data = edge.dir.path().join("data");
    let marker = marker_acked_then_stopped(&mut edge, &data).await;
    for _ in 0..6 {
        edge.spawn();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(edge.terminate(), "the edge stops cleanly");
        if files_containing(&data, &marker).is_empty() {
            return;
        }
    }
    panic!(
        "the acknowledged body is still on disk after six runs of 5 s: {:?}",
        files_containing(&data, &marker)
    );
}

/// The stores' records of their last complete erase pass (`erase-pass` in each shard's store
/// directory), by shard.
fn erase_records(data: &Path) -> Vec<Option<String>> {
    (0..2)
        .map(|shard| {
            let path = data.join(format!("stores/shard-{shard}/erase-pass"));
            std::fs::read_to_string(path).ok()
        })
        .collect()
}

/// A crash loop whose runs are far shorter than the bound still erases, and a restart does not
/// redo a pass that just ran. The bound is 240 s here, so passes come every 120 s; each run
/// lasts 15 s, shorter than the 30 s (an eighth of the bound) after which the first pass of a
/// start used to come. Now a start whose period is past (or whose store has no record) passes
/// within 10 s; a start within the period waits for it, as the unchanged records show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_shorter_than_an_eighth_of_the_bound_still_erases() {
    let mut edge = Edge::start_with(2, "[retention]\nerase_within_secs = 240\n", &[]);
    let data = edge.dir.path().join("data");
    let marker = marker_acked_then_stopped(&mut edge, &data).await;
    let run = Duration::from_secs(15);
    edge.spawn();
    tokio::time::sleep(run).await;
    assert!(edge.terminate(), "the edge stops cleanly");
    let found = files_containing(&data, &marker);
    assert!(
        found.is_empty(),
        "the acknowledged body is still on disk after a run of {run:?}: {found:?}"
    );
    let records = erase_records(&data);
    assert!(
        records.iter().all(Option::is_some),
        "each shard recorded its complete pass: {records:?}"
    );
    // Within the period: the next start waits for it (about 100 s more), so no pass runs.
    edge.spawn();
    tokio::time::sleep(run).await;
    assert!(edge.terminate(), "the edge stops cleanly");
    assert_eq!(
        erase_records(&data),
        records,
        "a start within the period did not pass again"
    );
}

/// The metric an operator alerts on (`CourierEraseOverdue`) claims nothing unproven at start:
/// a shard whose store records a complete pass reports that pass's start, and one without a
/// record reports when the data directory's stores were made (their `layout` file), not the
/// edge's start, so a store that never completed a pass shows overdue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_erase_gauge_starts_from_the_record_or_the_stores_making() {
    let metrics = common::free_addr();
    let mut edge = Edge::start_with(
        2,
        &format!("[retention]\nerase_within_secs = 240\n[metrics]\nlisten = \"{metrics}\"\n"),
        &[],
    );
    assert!(edge.terminate(), "the edge stops cleanly");
    let stores = edge.dir.path().join("data/stores");
    let now_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // The stores made two hours ago; shard 1 completed a pass a minute ago, shard 0 never.
    let made = std::time::SystemTime::now() - Duration::from_secs(7_200);
    std::fs::File::options()
        .write(true)
        .open(stores.join("layout"))
        .and_then(|layout| layout.set_modified(made))
        .expect("set the layout's time");
    let _ = std::fs::remove_file(stores.join("shard-0/erase-pass"));
    std::fs::write(
        stores.join("shard-1/erase-pass"),
        format!("{}\n", (now_secs - 60) * 1000),
    )
    .expect("write shard 1's record");
    edge.spawn();
    let gauge = |shard: u32| {
        common::metric_at(
            metrics,
            "courier_erase_last_complete_timestamp_seconds",
            &format!("shard=\"{shard}\""),
        )
        .expect("the metrics listener answers")
    };
    // Read before the first pass, which comes 10 s after the start at the earliest.
    let (shard_0, shard_1) = (gauge(0), gauge(1));
    let near = |value: f64, expected: u64| (value - expected as f64).abs() <= 5.0;
    assert!(
        near(shard_0, now_secs - 7_200),
        "shard 0 (no record) counts from the stores' making: {shard_0}, now {now_secs}"
    );
    assert!(
        near(shard_1, now_secs - 60),
        "shard 1 counts from its recorded pass: {shard_1}, now {now_secs}"
    );
}
