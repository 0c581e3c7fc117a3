//! Delivery that converges (issue 9), end to end on the real binary with the real SDK: holes
//! are declared instead of waited for, only what the application took is acknowledged, the last
//! ack goes out before a close, and queued sends survive a restart of the edge.

mod common;

use std::time::Duration;

use common::{EVENT_TIMEOUT, Edge, assert_quiet, next_message};
use courier_client::{ConnectOptions, Incoming};
use courier_core::CoreConfig;
use courier_core::commit::read_inbox;
use courier_core::store::fjall::{FjallOptions, FjallStore};
use courier_core::store::log::{LogOptions, LogStore};
use courier_protocol::Frame;

/// Messages still stored in `inbox`, read from the edge's data directory after it stopped.
fn stored_messages(edge: &Edge, inbox: u64) -> Vec<u64> {
    let stores = courier_edge::stores::open_existing::<FjallStore>(
        &edge.dir.path().join("data"),
        &FjallOptions::default(),
    )
    .expect("open the stopped edge's stores");
    let home = courier_core::placement::home_shard(inbox, stores.len() as u32);
    let page =
        read_inbox(&*stores[home as usize], inbox, 0, 0, &CoreConfig::default()).expect("read");
    page.messages.iter().map(|m| m.seq).collect()
}

/// [`stored_messages`] for an edge on the log engine (`store.engine = "log"`).
fn stored_messages_in_log(edge: &Edge, inbox: u64) -> Vec<u64> {
    let stores = courier_edge::stores::open_existing::<LogStore>(
        &edge.dir.path().join("data"),
        &LogOptions::default(),
    )
    .expect("open the stopped edge's log stores");
    let home = courier_core::placement::home_shard(inbox, stores.len() as u32);
    let page =
        read_inbox(&*stores[home as usize], inbox, 0, 0, &CoreConfig::default()).expect("read");
    page.messages.iter().map(|m| m.seq).collect()
}

/// The README's two-terminal chat: user 2 reads "first" and quits; user 1 sends "second"; user
/// 2 runs the same command again (a fresh client, resume 0, on an inbox whose seq 1 was acked
/// and deleted) and gets "second" and then live messages. Before the fix it waited for seq 1
/// forever, syncing in a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_chat_receives_what_was_sent_while_it_was_away() {
    let edge = Edge::start(2);
    let one = edge.client(1001).await;
    let mut two = edge.client(1002).await;
    one.send(1002, b"first".to_vec()).await.expect("send");
    assert_eq!(next_message(&mut two).await.body, b"first");
    two.close();
    drop(two);

    one.send(1002, b"second".to_vec()).await.expect("send");
    let mut two = edge.client(1002).await;
    let got = next_message(&mut two).await;
    assert_eq!((got.seq, got.body), (2, b"second".to_vec()));
    one.send(1002, b"third".to_vec()).await.expect("send");
    let got = next_message(&mut two).await;
    assert_eq!((got.seq, got.body), (3, b"third".to_vec()));
    assert_quiet(&mut two).await;
}

/// A fresh install on an inbox with a long acknowledged history starts at its head: it is
/// told the history is a hole and receives what is sent next, live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_install_on_an_acked_inbox_receives_new_messages() {
    let edge = Edge::start(1);
    let sender = edge.client(1011).await;
    let mut old = edge.client(1012).await;
    for i in 0..100u32 {
        sender
            .send(1012, i.to_be_bytes().to_vec())
            .await
            .expect("send");
        assert_eq!(next_message(&mut old).await.seq, u64::from(i) + 1);
    }
    old.close();
    drop(old);
    // A new phone: new TLS session, nothing held.
    let connector = edge.connector().fresh_session().expect("fresh connector");
    let mut fresh = connector
        .connect(ConnectOptions::new(edge.addr, edge.token(1012, 0), 0))
        .await
        .expect("connect");
    sender.send(1012, b"new".to_vec()).await.expect("send");
    let got = next_message(&mut fresh).await;
    assert_eq!((got.seq, got.body), (101, b"new".to_vec()));
    assert_eq!(fresh.last_seq(), 101);
}

/// With `auto_ack = false`, nothing is acknowledged for the application, across a reconnect
/// too: the client holds 5 messages and acks 2; the edge is killed and restarted, the client
/// reconnects by itself and is not given the 5 again; messages 3 to 5 are still stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_ack_a_reconnect_acknowledges_nothing_the_application_did_not() {
    let mut edge = Edge::start(2);
    let sender = edge.client(1021).await;
    let mut options = ConnectOptions::new(edge.addr, edge.token(1022, 0), 0);
    options.auto_ack = false;
    let connector = edge.connector();
    let mut manual = connector.connect(options).await.expect("connect");
    for i in 1..=5u64 {
        sender
            .send(1022, i.to_be_bytes().to_vec())
            .await
            .expect("send");
        assert_eq!(next_message(&mut manual).await.seq, i);
    }
    manual.ack(2);
    tokio::time::sleep(Duration::from_millis(200)).await; // The coalesced ack goes out.
    edge.kill9();
    edge.spawn();
    // The SDK reconnects by itself; a send through it proves it did.
    tokio::time::timeout(EVENT_TIMEOUT, manual.send(1021, b"back".to_vec()))
        .await
        .expect("reconnected in time")
        .expect("send after reconnect");
    if let Ok(Some(Incoming::Message(extra))) =
        tokio::time::timeout(Duration::from_millis(500), manual.recv()).await
    {
        panic!("the reconnected client got {} again", extra.seq);
    }
    assert!(edge.terminate(), "the edge stops cleanly");
    assert_eq!(stored_messages(&edge, 1022), vec![3, 4, 5]);
}

/// A signal to a user with two devices online reaches both, with its payload, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_reaches_every_device_of_its_user() {
    let edge = Edge::start(2);
    let sender = edge.client(1061).await;
    let device = |id: u32| ConnectOptions::new(edge.addr, edge.token(1062, id), id);
    let connector = edge.connector();
    let mut phone = connector.connect(device(0)).await.expect("phone");
    let mut laptop = connector.connect(device(1)).await.expect("laptop");
    let kind = courier_protocol::SignalKind::Typing;
    sender.signal(1062, kind, b"typing".to_vec());
    for client in [&mut phone, &mut laptop] {
        let incoming = tokio::time::timeout(EVENT_TIMEOUT, client.recv())
            .await
            .expect("in time")
            .expect("open");
        let expected = Incoming::Signal {
            from: 1061,
            kind,
            payload: b"typing".to_vec(),
        };
        assert_eq!(incoming, expected);
    }
    assert_quiet(&mut phone).await;
    assert_quiet(&mut laptop).await;
}

/// Two devices of one user each receive every message, and one device's acks do not delete
/// what the other has not acknowledged: device 1 reads everything while device 0 is away;
/// device 0 comes back and still gets all of it; once both acked, nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_each_receive_everything_and_one_ack_does_not_delete_for_the_other() {
    let mut edge = Edge::start(2);
    let sender = edge.client(1051).await;
    let device = |id: u32| ConnectOptions::new(edge.addr, edge.token(1052, id), id);
    let connector = edge.connector();
    let mut phone = connector.connect(device(0)).await.expect("phone");
    let mut laptop = connector.connect(device(1)).await.expect("laptop");
    sender
        .send(1052, b"both online".to_vec())
        .await
        .expect("send");
    assert_eq!(next_message(&mut phone).await.body, b"both online");
    assert_eq!(next_message(&mut laptop).await.body, b"both online");
    phone.close();
    drop(phone);
    for i in 0..20u32 {
        sender
            .send(1052, i.to_be_bytes().to_vec())
            .await
            .expect("send");
        assert_eq!(next_message(&mut laptop).await.seq, u64::from(i) + 2);
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // The laptop's acks are committed.
    // The phone comes back (its app persisted that it consumed seq 1).
    let mut options = device(0);
    options.resume_after_seq = 1;
    let mut phone = connector.connect(options).await.expect("phone again");
    for i in 0..20u32 {
        let got = next_message(&mut phone).await;
        assert_eq!(
            (got.seq, got.body),
            (u64::from(i) + 2, i.to_be_bytes().to_vec())
        );
    }
    assert_quiet(&mut phone).await;
    phone.close();
    laptop.close();
    drop((phone, laptop));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(edge.terminate(), "the edge stops cleanly");
    assert_eq!(stored_messages(&edge, 1052), Vec::<u64>::new());
}

/// 1,000 sends queued while the edge is down go out once it is back (the SDK reconnects by
/// itself and keeps their ids), and each is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_sends_are_flushed_after_the_edge_restarts() {
    let mut edge = Edge::start(2);
    let sender = edge.client(1031).await;
    edge.kill9();
    let mut sends = Vec::new();
    for i in 0..1000u32 {
        let sender = sender.sender();
        sends.push(tokio::spawn(async move {
            sender.send(1032, i.to_be_bytes().to_vec()).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    edge.spawn();
    for send in sends {
        tokio::time::timeout(EVENT_TIMEOUT, send)
            .await
            .expect("acknowledged in time")
            .expect("task")
            .expect("stored");
    }
    let mut recipient = edge.client(1032).await;
    let mut seen = std::collections::HashSet::new();
    for seq in 1..=1000u64 {
        let got = next_message(&mut recipient).await;
        assert_eq!(got.seq, seq);
        assert!(seen.insert(got.body), "stored twice");
    }
    assert_quiet(&mut recipient).await;
}

/// A client that reads and then closes sends its last ack first: nothing stays stored. Before
/// the fix the coalesced ack died with the client and the messages stayed until the next login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_closes_after_reading_leaves_nothing_stored() {
    let mut edge = Edge::start(1);
    let sender = edge.client(1041).await;
    let mut reader = edge.client(1042).await;
    for i in 0..50u32 {
        sender
            .send(1042, i.to_be_bytes().to_vec())
            .await
            .expect("send");
    }
    for seq in 1..=50u64 {
        assert_eq!(next_message(&mut reader).await.seq, seq);
    }
    reader.close();
    drop(reader);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(edge.terminate(), "the edge stops cleanly");
    assert_eq!(stored_messages(&edge, 1042), Vec::<u64>::new());
}

/// Ten kill -9 cycles under load: pairs chat with closed-loop sends through the SDK's own
/// reconnect while the edge is killed and restarted on the same data directory every few
/// hundred milliseconds (the senders keep sending through every cycle). Afterwards every
/// acknowledged message was delivered to its recipient exactly once, in order, and once the
/// recipients acked and closed, nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loop_under_load_loses_nothing_and_leaves_nothing() {
    let edge = Edge::start(2);
    let edge = kill_9_loop_under_load(edge).await;
    for pair in 0..KILL_LOOP_PAIRS {
        assert_eq!(stored_messages(&edge, 1100 + pair), Vec::<u64>::new());
    }
}

/// The same on the log engine: its journal and snapshots recover every acknowledged message
/// through every kill, and acks delete them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loop_under_load_on_the_log_engine_loses_nothing_and_leaves_nothing() {
    let edge = Edge::start_with(2, "[store]\nengine = \"log\"\n", &[]);
    let edge = kill_9_loop_under_load(edge).await;
    for pair in 0..KILL_LOOP_PAIRS {
        assert_eq!(
            stored_messages_in_log(&edge, 1100 + pair),
            Vec::<u64>::new()
        );
    }
}

const KILL_LOOP_PAIRS: u64 = 4;

/// Runs the kill -9 loop's load and checks what the receivers got; returns the stopped edge.
async fn kill_9_loop_under_load(mut edge: Edge) -> Edge {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    const PAIRS: u64 = KILL_LOOP_PAIRS;
    const CYCLES: usize = 10;
    let stop = Arc::new(AtomicBool::new(false));
    let mut receivers = Vec::new();
    for pair in 0..PAIRS {
        receivers.push(edge.client(1100 + pair).await);
    }
    let mut senders = Vec::new();
    for pair in 0..PAIRS {
        let client = edge.client(1200 + pair).await;
        let stop = stop.clone();
        senders.push(tokio::spawn(async move {
            let mut receipts = Vec::new();
            let mut i = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let receipt = client
                    .send(1100 + pair, format!("{pair}:{i}").into_bytes())
                    .await
                    .expect("a send survives the kills");
                receipts.push(receipt.seq);
                i += 1;
            }
            client.close();
            receipts
        }));
    }
    let expected_counts: Vec<Arc<AtomicUsize>> = (0..PAIRS)
        .map(|_| Arc::new(AtomicUsize::new(usize::MAX)))
        .collect();
    let reading: Vec<_> = receivers
        .into_iter()
        .zip(expected_counts.clone())
        .map(|(mut receiver, expected)| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                while got.len() < expected.load(Ordering::SeqCst) {
                    match tokio::time::timeout(Duration::from_secs(1), receiver.recv_message())
                        .await
                    {
                        Ok(Some(delivery)) => got.push((delivery.seq, delivery.body)),
                        Ok(None) => break,
                        Err(_) => {} // Quiet for a while: look at the expected count again.
                    }
                }
                receiver.close();
                // Let the last ack go out before the client is dropped.
                tokio::time::sleep(Duration::from_millis(200)).await;
                got
            })
        })
        .collect();
    for cycle in 0..CYCLES {
        tokio::time::sleep(Duration::from_millis(200 + 50 * cycle as u64)).await;
        tokio::task::block_in_place(|| {
            edge.kill9();
            edge.spawn();
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for (pair, (sender, reader)) in senders.into_iter().zip(reading).enumerate() {
        let receipts = tokio::time::timeout(Duration::from_secs(120), sender)
            .await
            .expect("sends finish")
            .expect("sender task");
        total += receipts.len();
        expected_counts[pair].store(receipts.len(), Ordering::SeqCst);
        let got = tokio::time::timeout(Duration::from_secs(120), reader)
            .await
            .expect("reads finish")
            .expect("reader task");
        let expected: Vec<(u64, Vec<u8>)> = receipts
            .iter()
            .enumerate()
            .map(|(i, seq)| (*seq, format!("{pair}:{i}").into_bytes()))
            .collect();
        assert_eq!(
            got, expected,
            "pair {pair}: every acknowledged message once, in order"
        );
    }
    eprintln!("kill -9 loop: {total} acknowledged messages over {CYCLES} cycles");
    assert!(
        total > 100,
        "the load ran through the cycles ({total} messages)"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(edge.terminate(), "the edge stops cleanly");
    edge
}

/// Acks the application makes while its client has no connection reach the server when it
/// closes the client then: the close makes one connection whose `Hello` carries them. Before,
/// they were dropped, and the acknowledged messages stayed stored, to be delivered again at
/// the next login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_made_without_a_connection_reach_the_server_at_close() {
    let mut edge = Edge::start(2);
    let alice = edge.client(1301).await;
    let mut options = ConnectOptions::new(edge.addr, edge.token(1302, 0), 0);
    options.auto_ack = false;
    // Down, it stays down until the close (no reconnect of its own within the test).
    options.reconnect_backoff_min = Duration::from_secs(60);
    options.reconnect_backoff_max = Duration::from_secs(60);
    let mut bob = edge.connector().connect(options).await.expect("connect");
    let mut last_seq = 0;
    for i in 0..3u32 {
        alice
            .send(1302, i.to_be_bytes().to_vec())
            .await
            .expect("send");
        last_seq = next_message(&mut bob).await.seq;
    }
    // The edge stops (bob's connection ends) and comes back; bob waits out its backoff.
    tokio::task::block_in_place(|| {
        assert!(edge.terminate(), "the edge stops cleanly");
        std::thread::sleep(Duration::from_millis(300));
        edge.spawn();
    });
    bob.ack(last_seq);
    bob.close();
    drop(alice);
    // The close's connection has a second at most.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(edge.terminate(), "the edge stops cleanly");
    assert_eq!(stored_messages(&edge, 1302), Vec::<u64>::new());
}

/// A client that acks and leaves while the edge is not reading it (here its frame budget is
/// spent) still has its ack applied: the connection's loss applies the acks it left behind.
/// Before, they were dropped with the connection, and the messages stayed stored until the
/// device logged in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_left_unread_when_the_client_leaves_is_applied() {
    let mut edge = Edge::start_with(
        2,
        "[limits]\ncontrol_frames_per_connection_per_sec = 1\n\
         control_frames_per_connection_burst = 1\n",
        &[],
    );
    let alice = edge.client(1401).await;
    for i in 0..3u32 {
        alice
            .send(1402, i.to_be_bytes().to_vec())
            .await
            .expect("send");
    }
    let mut bob = edge.raw_session(&edge.connector(), 1402, 0).await;
    let mut last_seq = 0;
    while last_seq < 3 {
        match bob.read_frame().await.expect("a frame") {
            Frame::Deliver { seq, .. } => last_seq = seq,
            other => panic!("unexpected {other:?}"),
        }
    }
    // The first ping spends the budget; the second pauses reading until it refills, a
    // second from now; the ack waits behind it, and bob leaves before then.
    for frame in [
        Frame::Ping { nonce: 1 },
        Frame::Ping { nonce: 2 },
        Frame::Ack {
            up_to_seq: last_seq,
        },
    ] {
        bob.write_frame(&frame).await.expect("write");
    }
    // Long enough for the frames to reach the edge, well within the pause.
    tokio::time::sleep(Duration::from_millis(200)).await;
    bob.connection.close(0u32.into(), b"gone");
    drop(bob);
    drop(alice);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(edge.terminate(), "the edge stops cleanly");
    assert_eq!(stored_messages(&edge, 1402), Vec::<u64>::new());
}
