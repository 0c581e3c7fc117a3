//! Issue 11, item 6: a sender who addresses ids that never log in leaves no record once the
//! messages expire, and an inbox that was forgotten never reuses a seq (decision 0011).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Edge, next_message};
use courier_core::keys;
use courier_core::placement::home_shard;
use courier_core::store::fjall::{FjallOptions, FjallStore};
use courier_core::store::{Store, Transaction};

const SHARDS: u32 = 2;

/// Keys with `tag` in every shard's store of a stopped edge.
fn keys_with_tag(data: &Path, tag: u8) -> usize {
    (0..SHARDS)
        .map(|shard| {
            let store = FjallStore::open(
                &data.join("stores").join(format!("shard-{shard}")),
                &FjallOptions::default(),
            )
            .expect("open the stopped edge's store");
            let mut txn = store.begin_read().expect("read");
            let (start, end) = keys::tag_range(tag);
            txn.get_range(&start, &end, 100_000).expect("range").len()
        })
        .sum()
}

/// Ids homed on shard 0, from `first` up.
fn homed_on_shard_0(first: u64, count: usize) -> Vec<u64> {
    (first..)
        .filter(|id| home_shard(*id, SHARDS) == 0)
        .take(count)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_to_ids_that_never_log_in_leave_no_record_and_seqs_never_repeat() {
    let mut edge = Edge::start_with(
        SHARDS,
        "[retention]\nexpiry_bucket_secs = 1\nexpiry_interval_secs = 1\n",
        &[],
    );
    let data = edge.data_dir.clone();
    let sender = edge.client(6001).await;
    // `busy` gets five messages, so the seq floor of shard 0 reaches 5; the others one each.
    let on_shard_0 = homed_on_shard_0(7_000, 2);
    let (busy, quiet) = (on_shard_0[0], on_shard_0[1]);
    let mut client_id = 0;
    for _ in 0..5 {
        client_id += 1;
        sender
            .send_with_id(client_id, busy, b"gone soon".to_vec(), Some(1))
            .await
            .expect("send");
    }
    for to in std::iter::once(quiet).chain(8_000..8_030) {
        client_id += 1;
        let receipt = sender
            .send_with_id(client_id, to, b"gone soon".to_vec(), Some(1))
            .await
            .expect("send");
        assert_eq!(receipt.seq, 1);
    }
    drop(sender);
    assert!(
        keys_while_stopped(&mut edge, &data, [keys::TAG_COUNTER])[0] > 0,
        "the counters exist before expiry (else this test could not fail)"
    );

    // Expiry (a 1 s TTL, 1 s buckets, a pass every second) empties every inbox, and each
    // shard forgets its own. Look at the stores between runs of the edge, for up to 60 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let [counters, emptied, messages] = keys_while_stopped(
            &mut edge,
            &data,
            [keys::TAG_COUNTER, keys::TAG_EMPTIED, keys::TAG_MESSAGE],
        );
        if counters == 0 && emptied == 0 && messages == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{counters} counters, {emptied} emptied marks and {messages} messages left"
        );
    }

    // The quiet inbox had seq 1. Forgotten, it continues above shard 0's floor (5), so no
    // device can mistake a new message for one it consumed.
    let sender = edge.client(6001).await;
    let receipt = sender
        .send_with_id(client_id + 1, quiet, b"after the floor".to_vec(), None)
        .await
        .expect("send");
    assert!(receipt.seq > 5, "seq {} reused", receipt.seq);
    let mut recipient = edge.client(quiet).await;
    let delivery = next_message(&mut recipient).await;
    assert_eq!(
        (delivery.seq, delivery.body.as_slice()),
        (receipt.seq, b"after the floor".as_slice())
    );
}

/// Stops the edge (the stores are locked while it runs), counts the keys with each tag in its
/// stores, and starts it again.
fn keys_while_stopped<const N: usize>(edge: &mut Edge, data: &Path, tags: [u8; N]) -> [usize; N] {
    assert!(edge.terminate(), "the edge stops cleanly");
    let counts = tags.map(|tag| keys_with_tag(data, tag));
    edge.spawn();
    counts
}

/// Starts an edge on a new data directory with the `[retention]` lines `written`, then `serve`
/// on it with `changed`: the start must fail, its error holding every one of `says`; with
/// `written` again the edge starts.
fn another_size_is_refused_and_the_recorded_one_starts(
    written: &str,
    changed: &str,
    says: &[&str],
) {
    let data = tempfile::tempdir().expect("temp dir");
    let config = |lines: &str| format!("[retention]\n{lines}\n");
    let mut edge = Edge::start_in(SHARDS, Some(data.path()), &config(written), &[]);
    assert!(edge.terminate(), "the edge stops cleanly");

    let dir = tempfile::tempdir().expect("temp dir");
    let config_path = dir.path().join("courier.toml");
    std::fs::write(
        &config_path,
        format!(
            "[server]\nlisten = \"{}\"\ndata_dir = \"{}\"\nshards = {SHARDS}\npin_shards = false\n{}",
            common::free_addr(),
            data.path().display(),
            config(changed)
        ),
    )
    .expect("write config");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_courier-edge"))
        .args(["serve", "--config"])
        .arg(&config_path)
        .output()
        .expect("run courier-edge");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the edge must refuse: {stderr}");
    assert!(says.iter().all(|said| stderr.contains(said)), "{stderr}");
    // A refusal every restart would meet again exits 1, which a supervisor does not restart
    // (docs/operations.md); 4, "the cause may pass", restarted it into the same refusal,
    // replaying the store each time.
    assert_eq!(output.status.code(), Some(1), "{stderr}");

    let mut edge = Edge::start_in(SHARDS, Some(data.path()), &config(written), &[]);
    assert!(edge.terminate(), "the recorded size starts again");
}

/// The expiry index holds bucket numbers, so a store written with one bucket size cannot be
/// served with another: read with another size, every entry names the wrong time, and an
/// inbox that got no later message kept its messages for good. The edge refuses to start and
/// says what to do; with the size the store was written with, it starts again.
#[test]
fn an_edge_refuses_a_store_written_with_another_expiry_bucket_size() {
    another_size_is_refused_and_the_recorded_one_starts(
        "expiry_bucket_secs = 60",
        "expiry_bucket_secs = 120",
        &[
            "retention.expiry_bucket_secs is 120",
            "written with 60: set it back to 60",
        ],
    );
}

/// Dedupe records' keys hold window numbers, so a store written with one dedupe window cannot
/// be served with another: with a longer one, expiry never reached the records written before
/// (they stayed for decades), and a retry sent across the change was stored twice. The edge
/// refuses to start and says what to do; with the window the store was written with, it
/// starts again.
#[test]
fn an_edge_refuses_a_store_written_with_another_dedupe_window() {
    another_size_is_refused_and_the_recorded_one_starts(
        "dedupe_window_secs = 86400",
        "dedupe_window_secs = 172800",
        &[
            "retention.dedupe_window_secs is 172800",
            "written with 86400: set it back to 86400",
        ],
    );
}

/// Many users who logged in once and left: their device records go within the sweep's round
/// (an eighth of the retention), not at 64 records an expiry turn. 300 users homed on shard 0
/// log in and close; with a 2 s retention and a turn every 8 s, the second turn finds the
/// round (begun by the first) behind and sweeps the rest in passes of its own. Without them,
/// two turns read 128 of the 300 records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_records_of_many_users_who_left_go_within_the_sweeps_round() {
    let mut edge = Edge::start_with(
        SHARDS,
        "[retention]\nmessage_retention_secs = 2\nexpiry_bucket_secs = 1\n\
         expiry_interval_secs = 8\n",
        &[],
    );
    let started = Instant::now();
    let data = edge.data_dir.clone();
    for user in homed_on_shard_0(20_000, 300) {
        edge.client(user).await.close();
    }
    let logged_in = started.elapsed();
    assert!(
        logged_in < Duration::from_secs(12),
        "the logins took {logged_in:?}: too slow for the turns this test counts on"
    );
    // The second turn comes 16 s after the start, when every record is unseen for the
    // retention; its sweep's extra passes take milliseconds.
    tokio::time::sleep(Duration::from_secs(19).saturating_sub(started.elapsed())).await;
    let [devices] = keys_while_stopped(&mut edge, &data, [keys::TAG_DEVICE]);
    assert_eq!(devices, 0, "device records left after two expiry turns");
}
