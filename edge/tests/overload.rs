//! Regression tests for issue 8: overload of the cross-shard mesh and of a connection that
//! never reads must not take the edge down, and a shard that does go down must take the
//! process with it (so a supervisor restarts it).
//!
//! Each test runs the real `courier-edge` binary (see `common`). None asserts on speed.

mod common;

use std::time::Duration;

use common::{EVENT_TIMEOUT, Edge, free_addr, next_message};
use courier_client::{ConnectOptions, Incoming};
use courier_protocol::{Frame, SignalKind};

/// The tiniest mesh the config allows more or less: every burst of cross-shard traffic fills
/// it, so the full-channel path runs all the time.
const TINY_MESH: &str =
    "[limits]\nmesh_channel_messages_max = 2\nsignals_per_connection_per_sec = 0\n";

/// With cross-shard channels of two messages, a burst of sends, registrations and signals
/// crossing both shards is served in full: every send is acknowledged (after retries of
/// `Overloaded`), every recipient gets every message once and in order, the signal target keeps
/// reading, the edge stays up, and a pair that starts afterwards chats normally.
///
/// Before the fix the first full channel panicked both shards ("RefCell already borrowed").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_mesh_under_cross_shard_load_serves_every_connection() {
    let mut edge = Edge::start_with(2, TINY_MESH, &[]);
    const SENDERS: u64 = 4;
    const RECIPIENTS: u64 = 4;
    const SENDS_PER_PAIR: u32 = 150;

    let mut recipients = Vec::new();
    for r in 0..RECIPIENTS {
        recipients.push(edge.client(800 + r).await);
    }
    // The signal target holds several connections, so each signal fans out across shards.
    let signal_target = 850;
    let mut signal_readers = Vec::new();
    for device in 0..4 {
        let client = edge
            .connector()
            .connect(ConnectOptions::new(
                edge.addr,
                edge.token(signal_target, device),
                device,
            ))
            .await
            .expect("connect signal reader");
        signal_readers.push(client);
    }
    let signalling = edge.client(851).await;

    let mut senders = Vec::new();
    for s in 0..SENDERS {
        senders.push(edge.client(810 + s).await);
    }

    // Sends: every sender pipelines to every recipient at once.
    let mut sending = Vec::new();
    for (s, client) in senders.iter().enumerate() {
        for r in 0..RECIPIENTS {
            let sender = client.sender();
            sending.push(tokio::spawn(async move {
                let mut sends = Vec::new();
                for i in 0..SENDS_PER_PAIR {
                    let sender = sender.clone();
                    let body = format!("{s}:{i}").into_bytes();
                    sends.push(tokio::spawn(
                        async move { sender.send(800 + r, body).await },
                    ));
                }
                for send in sends {
                    send.await
                        .expect("task")
                        .expect("every send is acknowledged");
                }
            }));
        }
    }
    // Signals: a burst that overflows the two-message channels many times over.
    for i in 0..20_000u32 {
        signalling.signal(signal_target, SignalKind::Typing, i.to_be_bytes().to_vec());
    }
    // Registrations: connections of other users come and go during the burst.
    let churn = {
        let connector = edge.connector();
        let options: Vec<ConnectOptions> = (0..20)
            .map(|i| ConnectOptions::new(edge.addr, edge.token(870 + i, 0), 0))
            .collect();
        tokio::spawn(async move {
            for options in options {
                let client = connector.connect(options).await.expect("churn connect");
                client.close();
            }
        })
    };
    // The signal readers read whatever arrives (some signals may be dropped by design): they
    // wait as long as an event may take for their first signal (a slow shared box may drop the
    // whole burst, so more follow below), then until two quiet seconds pass.
    let reading_signals: Vec<_> = signal_readers
        .into_iter()
        .map(|mut reader| {
            tokio::spawn(async move {
                let mut signals = 0u64;
                loop {
                    let quiet = if signals == 0 {
                        EVENT_TIMEOUT
                    } else {
                        Duration::from_secs(2)
                    };
                    match tokio::time::timeout(quiet, reader.recv()).await {
                        Ok(Some(Incoming::Signal { .. })) => signals += 1,
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    }
                }
                signals
            })
        })
        .collect();

    // Every recipient gets SENDERS * SENDS_PER_PAIR messages at dense seqs, each exactly once.
    // (The sends of one sender run concurrently, so their order is not defined.)
    for (r, recipient) in recipients.iter_mut().enumerate() {
        let mut seen = std::collections::HashSet::new();
        for expected_seq in 1..=(SENDERS * u64::from(SENDS_PER_PAIR)) {
            let got = next_message(recipient).await;
            assert_eq!(got.seq, expected_seq, "recipient {r}: dense and in order");
            let body = String::from_utf8(got.body).expect("utf-8 body");
            assert!(seen.insert(body.clone()), "recipient {r}: {body} twice");
        }
        for s in 0..SENDERS {
            for i in 0..SENDS_PER_PAIR {
                assert!(
                    seen.contains(&format!("{s}:{i}")),
                    "recipient {r}: {s}:{i} missing"
                );
            }
        }
    }
    for task in sending {
        tokio::time::timeout(EVENT_TIMEOUT, task)
            .await
            .expect("sends finish in time")
            .expect("send task");
    }
    tokio::time::timeout(EVENT_TIMEOUT, churn)
        .await
        .expect("churn in time")
        .expect("churn task");
    // Once the burst is over, a trickle of signals crosses an idle mesh.
    for i in 0..20u32 {
        signalling.signal(signal_target, SignalKind::Typing, i.to_be_bytes().to_vec());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut signals_read = 0;
    for reader in reading_signals {
        signals_read += reader.await.expect("reader task");
    }
    assert!(signals_read > 0, "some signals reach the readers");

    // The edge is still up and a new pair chats.
    assert!(
        edge.wait_exit(Duration::from_millis(10)).is_none(),
        "the edge is still running"
    );
    let alice = edge.client(890).await;
    let mut bob = edge.client(891).await;
    for i in 0..10u32 {
        alice
            .send(891, i.to_be_bytes().to_vec())
            .await
            .expect("send after the burst");
        assert_eq!(next_message(&mut bob).await.body, i.to_be_bytes().to_vec());
    }
}

/// Junk short-header datagrams that name the other shard, which anyone can send without a
/// handshake, are not queued for it: those larger than a QUIC datagram the edge takes are
/// dropped and counted, and the edge goes on serving. Before the fix each was copied (up to
/// 64 KiB) into the cross-shard channel and, once that was full, into a backlog whose
/// congestion stopped the shard decoding client frames and committing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_datagrams_for_another_shard_are_dropped_not_queued() {
    let metrics = free_addr();
    let mut edge = Edge::start_with(2, &format!("[metrics]\nlisten = \"{metrics}\"\n"), &[]);
    // Let both shards listen (the first client proves it).
    let alice = edge.client(900).await;
    const SOCKETS: usize = 16;
    const OVERSIZED_PER_SOCKET: usize = 20;
    for socket_number in 0..SOCKETS {
        // Each socket's datagrams land on one shard (the kernel hashes the 4-tuple); they name
        // shard 0 and shard 1 in turn, so half of them name the other shard.
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        for i in 0..OVERSIZED_PER_SOCKET {
            let mut datagram = vec![0x5au8; 4_000];
            datagram[0] = 0x40; // a short header
            datagram[1] = (i % 2) as u8; // the shard its connection id names
            datagram[2] = socket_number as u8;
            socket.send_to(&datagram, edge.addr).expect("send junk");
        }
    }
    let mut bob = edge.client(901).await;
    for i in 0..5u32 {
        alice
            .send(901, i.to_be_bytes().to_vec())
            .await
            .expect("send during the junk");
        assert_eq!(next_message(&mut bob).await.body, i.to_be_bytes().to_vec());
    }
    let mut dropped = 0.0;
    for _ in 0..50 {
        dropped = common::metric_sum_at(metrics, "courier_mesh_messages_dropped_total")
            .expect("metrics listener");
        if dropped > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        dropped > 0.0,
        "oversized datagrams naming the other shard are dropped, not handed over"
    );
    assert!(
        dropped <= (SOCKETS * OVERSIZED_PER_SOCKET / 2) as f64,
        "only those: {dropped}"
    );
    assert!(
        edge.wait_exit(Duration::from_millis(10)).is_none(),
        "the edge is still running"
    );
}

/// A flood of signals at connections that never read leaves the edge's memory bounded: over a
/// connection's outbound bound, signals are dropped (they are ephemeral). The flood carries
/// ~100 MB of signal frames to each of four connections; before the fix the edge grew by about
/// that much per connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_flood_at_connections_that_never_read_leaves_memory_bounded() {
    // Without the flooder's own signal budget, which would hold the flood back at its source.
    let edge = Edge::start_with(2, "[limits]\nsignals_per_connection_per_sec = 0\n", &[]);
    let connector = edge.connector();
    let target = 901;
    let mut silent = Vec::new();
    for device in 0..4 {
        // From here on this connection never reads.
        silent.push(edge.raw_session(&connector, target, device).await);
    }
    let mut flooder = edge.raw_session(&connector, 900, 0).await;

    let rss_before = edge.rss_bytes();
    let signal = courier_protocol::encode_to_vec(&Frame::Signal {
        peer: target,
        kind: SignalKind::Online,
        payload: vec![7; courier_protocol::SIGNAL_PAYLOAD_BYTES_MAX],
    })
    .expect("encode");
    let per_round: Vec<u8> = signal
        .iter()
        .copied()
        .cycle()
        .take(signal.len() * 10_000)
        .collect();
    let rounds = 40; // 400,000 signals, ~100 MB per target connection.
    tokio::time::timeout(Duration::from_secs(120), async {
        for _ in 0..rounds {
            flooder.write_bytes(&per_round).await.expect("flood");
        }
        // The edge handles a connection's frames in order: the pong means every signal
        // before it was handled.
        flooder
            .write_frame(&Frame::Ping { nonce: 9 })
            .await
            .expect("ping");
        let pong = flooder.read_frame().await.expect("pong");
        assert_eq!(pong, Frame::Pong { nonce: 9 });
    })
    .await
    .expect("the flood is handled in time");
    let rss_after = edge.rss_bytes();
    let grown_mb = rss_after.saturating_sub(rss_before) / (1024 * 1024);
    assert!(
        grown_mb < 100,
        "the edge grew by {grown_mb} MB under a signal flood (before {} MB, after {} MB)",
        rss_before / (1024 * 1024),
        rss_after / (1024 * 1024)
    );
    drop(silent);
}

/// A panic on one shard ends the process with a failure status (101), instead of leaving a
/// live process that serves nothing and exits 0 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_shard_ends_the_process_with_a_failure_status() {
    let mut edge = Edge::start_with(2, "", &[("COURIER_FAULT_PANIC_SHARD", "1:1500")]);
    let status = edge
        .wait_exit(EVENT_TIMEOUT)
        .expect("the edge exits after a shard panics");
    assert_eq!(status.code(), Some(101), "exit status: {status:?}");
}

/// The log engine's memory bound (`store.log_memory_bytes_max`, here its minimum, 16 MiB):
/// sends to an offline recipient are acknowledged until the store is nearly full, then held
/// (refused with the retryable `StoreUnavailable`, which the SDK retries), never acknowledged
/// and lost. Once the recipient connects, reads and acks, room comes back: the held send is
/// acknowledged, and every acknowledged message was delivered once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_store_at_its_memory_bound_holds_sends_until_acks_free_room() {
    // 1 MiB journal segments: the 14 MiB stored cross a dozen of them.
    const CONFIG: &str = "[store]\nengine = \"log\"\nlog_memory_bytes_max = 16777216\n\
        log_journal_segment_bytes = 1048576\n\
        [batching]\nqueue_bytes_max = 1048576\nqueue_bytes_per_sender_max = 1048576\n\
        [limits.send_per_connection]\nmessages_per_sec = 2000\nmessages_burst = 4000\n\
        bytes_per_sec = 67108864\nbytes_burst = 67108864\n\
        [limits.send_per_user]\nmessages_per_sec = 4000\nmessages_burst = 8000\n\
        bytes_per_sec = 67108864\nbytes_burst = 67108864\n";
    let edge = Edge::start_with(1, CONFIG, &[]);
    let sender = edge.client(4001).await;
    let body = |i: u32| {
        let mut body = vec![0u8; 16 * 1024];
        body[..4].copy_from_slice(&i.to_be_bytes());
        body
    };
    let mut acknowledged = Vec::new();
    let held = loop {
        let i = acknowledged.len() as u32;
        assert!(i < 2_000, "16 MiB never filled: the bound is not enforced");
        let send = tokio::spawn({
            let sender = sender.sender();
            let body = body(i);
            async move { sender.send(4002, body).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        match tokio::time::timeout(Duration::from_secs(3), send).await {
            Ok(receipt) => acknowledged.push(receipt.expect("task").expect("send").seq),
            Err(_) => break i,
        }
    };
    // Held at the door (the shard asked the store after a commit), not by a failed batch.
    assert!(
        edge.log
            .lock()
            .expect("log")
            .iter()
            .any(|line| line.contains("near store.log_memory_bytes_max")),
        "the edge said why it refuses sends"
    );
    let journals = std::fs::read_dir(edge.dir.path().join("data/stores/shard-0"))
        .expect("shard directory")
        .filter(|entry| {
            entry
                .as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("journal-0"))
        })
        .count();
    assert!(journals > 5, "1 MiB segments: {journals} journals");
    // About 90% of 16 MiB of 16 KiB bodies.
    assert!(
        (700..=1_000).contains(&acknowledged.len()),
        "{} sends acknowledged before the bound held them",
        acknowledged.len()
    );
    let mut recipient = edge.client(4002).await;
    for (i, seq) in acknowledged.iter().enumerate() {
        let delivery = next_message(&mut recipient).await;
        assert_eq!(
            (delivery.seq, &delivery.body[..4]),
            (*seq, &(i as u32).to_be_bytes()[..])
        );
    }
    // The recipient's acks free room; the held send goes through and arrives last.
    let delivery = tokio::time::timeout(Duration::from_secs(30), next_message(&mut recipient))
        .await
        .expect("the held send is delivered once the store has room");
    assert_eq!(&delivery.body[..4], &held.to_be_bytes()[..]);
}

/// Every frame a client wrote before ending its stream is decoded while the mesh is
/// congested: the shard stops reading the stream until the mesh drains. Before the fix it read
/// on to the stream's end while its frames waited undecoded, and closed the connection with
/// them dropped (a graceful close's last ack was lost that way). Each round's sends go to
/// users on both shards and fill a one-message mesh; the edge counts the frames it decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_before_a_finished_stream_are_decoded_while_the_mesh_is_congested() {
    let metrics = free_addr();
    let edge = Edge::start_with(
        2,
        &format!("[metrics]\nlisten = \"{metrics}\"\n[limits]\nmesh_channel_messages_max = 1\n"),
        &[],
    );
    let connector = edge.connector();
    const ROUNDS: u64 = 5;
    const SENDS: u64 = 200;
    for round in 0..ROUNDS {
        let mut raw = edge.raw_session(&connector, 960 + round, 0).await;
        let mut bytes = Vec::new();
        for i in 0..SENDS {
            let send = Frame::Send {
                client_id: i + 1,
                to: 5_000 + i % 16,
                body: i.to_be_bytes().to_vec(),
                ttl_secs: None,
            };
            bytes.extend(courier_protocol::encode_to_vec(&send).expect("encode"));
        }
        let ping = Frame::Ping { nonce: round };
        bytes.extend(courier_protocol::encode_to_vec(&ping).expect("encode"));
        raw.write_bytes(&bytes).await.expect("write");
        raw.finish().expect("finish");
        // The edge closes the connection once it has read the stream's end.
        let closed = tokio::time::timeout(EVENT_TIMEOUT, raw.closed()).await;
        assert!(
            closed.is_ok(),
            "round {round}: the edge closed the connection"
        );
    }
    let decoded = |kind: &str| {
        common::metric_at(
            metrics,
            "courier_frames_received_total",
            &format!("kind=\"{kind}\""),
        )
        .expect("metrics listener")
    };
    assert_eq!(
        decoded("send"),
        (ROUNDS * SENDS) as f64,
        "every send decoded"
    );
    assert_eq!(decoded("ping"), ROUNDS as f64, "every last frame decoded");
}
