//! Kill the process mid-stream and check that every commit the store acknowledged survives.
//!
//! The test re-runs its own binary as a child that commits batches to a fjall store and prints
//! each acknowledged sequence number after `commit_batch` returns, then aborts (no destructors,
//! no clean close) partway through a batch. The parent reopens the store and checks that every
//! printed sequence number is there, in order, with its body. This catches acknowledgements that
//! run ahead of the write reaching the kernel; power loss (the fsync part) cannot be simulated
//! here.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use courier_core::CoreConfig;
use courier_core::commit::{Committer, Outcome, Request, SendRequest, read_inbox};
use courier_core::store::fjall::{FjallOptions, FjallStore};

const CHILD_ENV: &str = "COURIER_FJALL_CRASH_CHILD_DIR";
const INBOX: u64 = 77;

fn body(client_id: u64) -> Vec<u8> {
    format!("message {client_id}").into_bytes()
}

fn child(dir: &str) -> ! {
    let store =
        FjallStore::open(std::path::Path::new(dir), &FjallOptions::default()).expect("open");
    let mut committer = Committer::new(&CoreConfig::default());
    let mut stdout = std::io::stdout();
    let mut client_id = 0;
    for batch_number in 0u64.. {
        let batch: Vec<Request> = (0..10)
            .map(|_| {
                client_id += 1;
                Request::Send(SendRequest {
                    sender: 5,
                    client_id,
                    to: INBOX,
                    body: body(client_id),
                    ttl_secs: None,
                })
            })
            .collect();
        let outcomes = committer
            .commit_batch(&store, &batch, 1_000 + batch_number)
            .expect("commit");
        for (request, outcome) in batch.iter().zip(outcomes) {
            let (Request::Send(send), Outcome::Stored { seq, .. }) = (request, outcome) else {
                unreachable!("only sends were committed");
            };
            // Leading newline: libtest may have left "test name ... " on the line.
            writeln!(stdout, "\nACK {} {seq}", send.client_id).expect("stdout");
        }
        stdout.flush().expect("flush");
        if batch_number == 57 {
            // Die without closing the store: no destructors, no flush.
            std::process::abort();
        }
    }
    unreachable!("the loop aborts");
}

#[test]
fn acknowledged_commits_survive_an_abort() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(&dir);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "acknowledged_commits_survive_an_abort",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let mut acked = Vec::new();
    let stdout = child.stdout.take().expect("child stdout");
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("line");
        let Some(ack) = line.strip_prefix("ACK ") else {
            continue;
        };
        let mut fields = ack.split_whitespace().map(|f| f.parse::<u64>());
        if let (Some(Ok(client_id)), Some(Ok(seq))) = (fields.next(), fields.next()) {
            acked.push((client_id, seq));
        }
    }
    let status = child.wait().expect("wait for child");
    assert!(
        !status.success(),
        "the child must die by abort, not exit cleanly"
    );
    assert_eq!(
        acked.len(),
        580,
        "the child acknowledged 58 batches of 10 before aborting"
    );

    let store = FjallStore::open(dir.path(), &FjallOptions::default()).expect("reopen after abort");
    let config = CoreConfig {
        sync_messages_max: 10_000,
        ..CoreConfig::default()
    };
    let stored = read_inbox(&store, INBOX, 0, 2_000, &config)
        .expect("read")
        .messages;
    assert!(
        stored.len() >= acked.len(),
        "{} stored, {} acknowledged",
        stored.len(),
        acked.len()
    );
    for ((client_id, seq), message) in acked.iter().zip(&stored) {
        assert_eq!(message.seq, *seq);
        assert_eq!(message.body, body(*client_id));
    }
    // A client that resends after the crash gets its first seq back, not a second copy. The
    // reopened store's dedupe filter (decision 0018) must not answer for records written
    // before it opened: loaded into it (the default, few records), or, past the load's
    // bound, left to reads (bucket 0 held records at open, so it is never answered from
    // memory). Both ways.
    drop(store);
    let resent: Vec<&(u64, u64)> = acked.iter().step_by(29).collect();
    let requests: Vec<Request> = resent
        .iter()
        .map(|(client_id, _)| {
            Request::Send(SendRequest {
                sender: 5,
                client_id: *client_id,
                to: INBOX,
                body: body(*client_id),
                ttl_secs: None,
            })
        })
        .collect();
    for warm_keys_max in [FjallOptions::default().dedupe_filter_warm_keys_max, 10] {
        let options = FjallOptions {
            dedupe_filter_warm_keys_max: warm_keys_max,
            ..FjallOptions::default()
        };
        let store = FjallStore::open(dir.path(), &options).expect("reopen");
        let outcomes = Committer::new(&CoreConfig::default())
            .commit_batch(&store, &requests, 2_000)
            .expect("resend");
        for ((client_id, seq), outcome) in resent.iter().zip(outcomes) {
            assert!(
                matches!(outcome, Outcome::Stored { seq: found, fresh: false, .. } if found == *seq),
                "warm_keys_max {warm_keys_max}, client id {client_id}: {outcome:?}, first stored as {seq}"
            );
        }
    }
}
