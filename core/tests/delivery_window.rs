//! The window of unacknowledged deliveries, step by step: a device that does not acknowledge
//! is given at most the window, the rest waits in the store, and each `Ack` lets the rest
//! through by reading the store after the device's cursor. Meanwhile the device's own sends
//! are still answered. (The seeded simulation runs the same window at random sizes.)

mod common;
use common::SimAuth;

use courier_core::CoreConfig;
use courier_core::commit::{self, Committer};
use courier_core::session::{ConnRef, EdgeSession, Effect, SessionConfig};
use courier_core::store::memory::MemoryStore;
use courier_protocol::Frame;

const NOW: u64 = 1_700_000_000_000;
const WINDOW: usize = 2;

struct Edge {
    session: EdgeSession<SimAuth>,
    store: MemoryStore,
    committer: Committer,
    core: CoreConfig,
}

impl Edge {
    fn new() -> Edge {
        let core = CoreConfig::default();
        let mut config = SessionConfig::new(0, 1, core.clone());
        config.deliveries_unacked_per_connection_max = WINDOW;
        Edge {
            session: EdgeSession::new(config, SimAuth),
            store: MemoryStore::new(),
            committer: Committer::new(&core),
            core,
        }
    }

    /// Commits what is queued and runs the effects (reads against the store) until nothing
    /// is left; returns the frames written, by connection slot.
    fn settle(&mut self) -> Vec<(usize, Frame)> {
        let mut written = Vec::new();
        loop {
            let mut progressed = false;
            while let Some(batch) = self.session.poll_batch(NOW) {
                let result = self
                    .committer
                    .commit_batch(&self.store, &batch.requests, NOW);
                self.session.handle_commit(batch, result);
                progressed = true;
            }
            while let Some(effect) = self.session.poll_effect() {
                progressed = true;
                match effect {
                    Effect::Write { conn, frame, .. } => written.push((conn.slot, frame)),
                    Effect::Read {
                        conn,
                        inbox,
                        after_seq,
                    } => {
                        let page =
                            commit::read_inbox(&self.store, inbox, after_seq, NOW, &self.core);
                        self.session.handle_read(conn, after_seq, page);
                    }
                    Effect::Route { message, .. } => self.session.handle_message(NOW, message),
                    other => panic!("unexpected effect {other:?}"),
                }
            }
            // The transport took everything written.
            for slot in [0, 1] {
                self.session.set_outbound_bytes(conn(slot), 0);
            }
            if !progressed {
                return written;
            }
        }
    }
}

fn conn(slot: usize) -> ConnRef {
    ConnRef {
        shard: 0,
        slot,
        generation: 1,
    }
}

fn delivered(frames: &[(usize, Frame)], slot: usize) -> Vec<u64> {
    frames
        .iter()
        .filter_map(|(to, frame)| match frame {
            Frame::Deliver { seq, .. } if *to == slot => Some(*seq),
            _ => None,
        })
        .collect()
}

#[test]
fn a_device_that_does_not_ack_gets_its_window_and_the_rest_after_its_acks() {
    let mut edge = Edge::new();
    let (reader, writer) = (conn(0), conn(1));
    for (conn, user) in [(reader, 1), (writer, 2)] {
        edge.session.open_connection(NOW, conn);
        let hello = Frame::Hello {
            token: format!("{user}:0").into_bytes(),
            device: 0,
            acked_up_to: 0,
            resume_after_seq: 0,
        };
        edge.session.handle_frame(NOW, conn, hello, false);
    }
    edge.settle();

    // Five messages for the reader, which acknowledges nothing: it is given two.
    for client_id in 1..=5 {
        let send = Frame::Send {
            client_id,
            to: 1,
            body: format!("message {client_id}").into_bytes(),
            ttl_secs: None,
        };
        edge.session.handle_frame(NOW, writer, send, false);
    }
    let frames = edge.settle();
    assert_eq!(delivered(&frames, 0), vec![1, 2], "the window's worth");
    let receipts = frames
        .iter()
        .filter(|(to, frame)| *to == 1 && matches!(frame, Frame::SendAck { .. }))
        .count();
    assert_eq!(receipts, 5, "every send is answered");

    // The reader's own send is answered while its window is full.
    let send = Frame::Send {
        client_id: 1,
        to: 2,
        body: b"reply".to_vec(),
        ttl_secs: None,
    };
    edge.session.handle_frame(NOW, reader, send, false);
    let frames = edge.settle();
    assert!(
        frames
            .iter()
            .any(|(to, frame)| *to == 0 && matches!(frame, Frame::SendAck { client_id: 1, .. })),
        "{frames:?}"
    );
    assert!(delivered(&frames, 0).is_empty(), "still a full window");

    // Each ack makes room for as many more, read from the store in order.
    edge.session
        .handle_frame(NOW, reader, Frame::Ack { up_to_seq: 1 }, false);
    assert_eq!(delivered(&edge.settle(), 0), vec![3]);
    edge.session
        .handle_frame(NOW, reader, Frame::Ack { up_to_seq: 3 }, false);
    assert_eq!(delivered(&edge.settle(), 0), vec![4, 5]);
    edge.session
        .handle_frame(NOW, reader, Frame::Ack { up_to_seq: 5 }, false);

    // With the window empty again, a new message goes out live.
    let send = Frame::Send {
        client_id: 6,
        to: 1,
        body: b"live".to_vec(),
        ttl_secs: None,
    };
    edge.session.handle_frame(NOW, writer, send, false);
    assert_eq!(delivered(&edge.settle(), 0), vec![6]);
}

#[test]
fn a_sync_gives_again_what_it_asks_for_within_the_window() {
    let mut edge = Edge::new();
    let (reader, writer) = (conn(0), conn(1));
    for (conn, user) in [(reader, 1), (writer, 2)] {
        edge.session.open_connection(NOW, conn);
        let hello = Frame::Hello {
            token: format!("{user}:0").into_bytes(),
            device: 0,
            acked_up_to: 0,
            resume_after_seq: 0,
        };
        edge.session.handle_frame(NOW, conn, hello, false);
    }
    edge.settle();
    for client_id in 1..=3 {
        let send = Frame::Send {
            client_id,
            to: 1,
            body: vec![b'x'; 10],
            ttl_secs: None,
        };
        edge.session.handle_frame(NOW, writer, send, false);
    }
    assert_eq!(delivered(&edge.settle(), 0), vec![1, 2]);
    // The device lost seq 2 and asks again after 1: that frees one place, and seq 2 comes
    // again; seq 3 waits for an ack.
    edge.session
        .handle_frame(NOW, reader, Frame::Sync { after_seq: 1 }, false);
    assert_eq!(delivered(&edge.settle(), 0), vec![2]);
    edge.session
        .handle_frame(NOW, reader, Frame::Ack { up_to_seq: 2 }, false);
    assert_eq!(delivered(&edge.settle(), 0), vec![3]);
}
