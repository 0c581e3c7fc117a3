//! The window of unacknowledged deliveries, step by step: a device that does not acknowledge
//! is given at most the window, the rest waits in the store, and each `Ack` lets the rest
//! through by reading the store after the device's cursor. Meanwhile the device's own sends
//! are still answered. (The seeded simulation runs the same window at random sizes.)

mod common;
use common::one_shard::{OneShard, delivered};

use courier_core::CoreConfig;
use courier_core::session::SessionConfig;
use courier_protocol::Frame;

const WINDOW: usize = 2;
const READER: usize = 0;
const WRITER: usize = 1;

/// An edge with the window at `WINDOW`, the reader (user 1) and the writer (user 2) logged in.
fn edge() -> OneShard {
    let mut config = SessionConfig::new(0, 1, CoreConfig::default());
    config.deliveries_unacked_per_connection_max = WINDOW;
    let mut edge = OneShard::new(config);
    edge.login(READER, 1, 0);
    edge.login(WRITER, 2, 0);
    edge
}

fn send(client_id: u64, to: u64, body: &[u8]) -> Frame {
    Frame::Send {
        client_id,
        to,
        body: body.to_vec(),
        ttl_secs: None,
    }
}

#[test]
fn a_device_that_does_not_ack_gets_its_window_and_the_rest_after_its_acks() {
    let mut edge = edge();
    // Five messages for the reader, which acknowledges nothing: it is given two.
    for client_id in 1..=5 {
        edge.frame(
            WRITER,
            send(client_id, 1, format!("message {client_id}").as_bytes()),
        );
    }
    let frames = edge.settle();
    assert_eq!(delivered(&frames, READER), vec![1, 2], "the window's worth");
    let receipts = frames
        .iter()
        .filter(|(to, frame)| *to == WRITER && matches!(frame, Frame::SendAck { .. }))
        .count();
    assert_eq!(receipts, 5, "every send is answered");

    // The reader's own send is answered while its window is full.
    edge.frame(READER, send(1, 2, b"reply"));
    let frames = edge.settle();
    assert!(
        frames.iter().any(
            |(to, frame)| *to == READER && matches!(frame, Frame::SendAck { client_id: 1, .. })
        ),
        "{frames:?}"
    );
    assert!(delivered(&frames, READER).is_empty(), "still a full window");

    // Each ack makes room for as many more, read from the store in order.
    edge.frame(READER, Frame::Ack { up_to_seq: 1 });
    assert_eq!(delivered(&edge.settle(), READER), vec![3]);
    edge.frame(READER, Frame::Ack { up_to_seq: 3 });
    assert_eq!(delivered(&edge.settle(), READER), vec![4, 5]);
    edge.frame(READER, Frame::Ack { up_to_seq: 5 });

    // With the window empty again, a new message goes out live.
    edge.frame(WRITER, send(6, 1, b"live"));
    assert_eq!(delivered(&edge.settle(), READER), vec![6]);
}

#[test]
fn a_sync_gives_again_what_it_asks_for_within_the_window() {
    let mut edge = edge();
    for client_id in 1..=3 {
        edge.frame(WRITER, send(client_id, 1, &[b'x'; 10]));
    }
    assert_eq!(delivered(&edge.settle(), READER), vec![1, 2]);
    // The device lost seq 2 and asks again after 1: that frees one place, and seq 2 comes
    // again; seq 3 waits for an ack.
    edge.frame(READER, Frame::Sync { after_seq: 1 });
    assert_eq!(delivered(&edge.settle(), READER), vec![2]);
    edge.frame(READER, Frame::Ack { up_to_seq: 2 });
    assert_eq!(delivered(&edge.settle(), READER), vec![3]);
}
