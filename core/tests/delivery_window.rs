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

/// A `Sync` that names a cursor below what the device acknowledged resends from its ack, not
/// before: a device holding those messages drops their resend as held and never acknowledges
/// them again, so they stayed in its window and held every later delivery back for good
/// (found by the simulation once its clients sent `Sync` on their own).
#[test]
fn a_sync_before_what_the_device_acknowledged_resends_from_its_ack() {
    let mut edge = edge();
    for client_id in 1..=3 {
        edge.frame(WRITER, send(client_id, 1, &[b'x'; 10]));
    }
    assert_eq!(delivered(&edge.settle(), READER), vec![1, 2]);
    edge.frame(READER, Frame::Ack { up_to_seq: 2 });
    assert_eq!(delivered(&edge.settle(), READER), vec![3]);
    edge.frame(READER, Frame::Sync { after_seq: 0 });
    assert_eq!(
        delivered(&edge.settle(), READER),
        vec![3],
        "only what the device did not acknowledge comes again"
    );
    edge.frame(READER, Frame::Ack { up_to_seq: 3 });
    edge.frame(WRITER, send(4, 1, b"after"));
    assert_eq!(
        delivered(&edge.settle(), READER),
        vec![4],
        "the window is free"
    );
}

/// An ack that reaches the edge after a `Sync` moved the cursor back, for messages given
/// before it, counts: the device holds them, so they are not resent (a resend would be dropped
/// as held and never acknowledged again, and fill the window for good).
#[test]
fn an_ack_after_a_sync_counts_what_was_given_before_it() {
    let mut edge = edge();
    for client_id in 1..=2 {
        edge.frame(WRITER, send(client_id, 1, &[b'x'; 10]));
    }
    assert_eq!(delivered(&edge.settle(), READER), vec![1, 2]);
    // The `Sync` and the ack of what the device consumed cross on the way.
    edge.frame(READER, Frame::Sync { after_seq: 0 });
    edge.frame(READER, Frame::Ack { up_to_seq: 2 });
    assert!(
        delivered(&edge.settle(), READER).is_empty(),
        "nothing the device acknowledged comes again"
    );
    for client_id in 3..=4 {
        edge.frame(WRITER, send(client_id, 1, &[b'x'; 10]));
    }
    assert_eq!(
        delivered(&edge.settle(), READER),
        vec![3, 4],
        "the whole window is free"
    );
}

/// Messages a device was not given yet (its window was full) expire, and expiry finds the
/// inbox empty, so its home shard forgets it (deletes its counter). The device is told that
/// those seqs are gone: a read of an inbox without a counter declares no hole past what it
/// scans, so before, the device waited for them until the inbox's next message or its next
/// login (found by the simulation, seed 369838).
#[test]
fn a_device_behind_its_inbox_is_told_when_the_inbox_is_forgotten() {
    let mut edge = edge();
    for client_id in 1..=4 {
        edge.frame(
            WRITER,
            Frame::Send {
                client_id,
                to: 1,
                body: b"soon gone".to_vec(),
                ttl_secs: Some(1),
            },
        );
    }
    assert_eq!(
        delivered(&edge.settle(), READER),
        vec![1, 2],
        "a full window"
    );

    edge.now += 2 * edge.core.expiry_bucket_ms;
    loop {
        let report = courier_core::commit::expire(&edge.store, edge.now, &edge.core).unwrap();
        assert_eq!(edge.session.handle_emptied(&report.emptied, edge.now), 0);
        if !report.more {
            break;
        }
    }
    edge.now += edge.core.ack_commit_delay_ms;
    let frames = edge.settle();
    assert!(
        !courier_core::commit::has_counter(&edge.store, 1).unwrap(),
        "the inbox is forgotten"
    );
    assert!(
        frames.contains(&(READER, Frame::Hole { up_to_seq: 4 })),
        "{frames:?}"
    );
    // The device acknowledges what it had; nothing is left to read, nothing to wait for.
    edge.frame(READER, Frame::Ack { up_to_seq: 4 });
    assert!(delivered(&edge.settle(), READER).is_empty());
}
