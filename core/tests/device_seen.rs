//! A device that stays connected is never forgotten, however long it receives nothing.
//!
//! A device unseen for the retention period is forgotten by the next commit that writes its
//! inbox's devices, and its inbox's messages are then deleted up to the other devices'
//! cursors. Only acks and logins marked a device seen, so one that stayed connected longer than
//! the retention period with nothing to acknowledge was forgotten while it lived: the next
//! message was deleted as soon as another device of the user acknowledged it. The session now
//! marks a connected device seen every `min(retention / 8, 1 h)`.

mod common;
use common::SimAuth;

use courier_core::CoreConfig;
use courier_core::commit::{self, Committer};
use courier_core::session::{ConnRef, EdgeSession, Effect, SessionConfig};
use courier_core::store::memory::MemoryStore;
use courier_protocol::Frame;

struct Edge {
    session: EdgeSession<SimAuth>,
    store: MemoryStore,
    committer: Committer,
    core: CoreConfig,
    now: u64,
}

impl Edge {
    /// Runs commits, reads and the session's deadlines at `now` until nothing is left;
    /// returns the frames written, by connection slot.
    fn settle(&mut self) -> Vec<(usize, Frame)> {
        let now = self.now;
        self.session.handle_deadlines(now);
        let mut written = Vec::new();
        loop {
            let mut progressed = false;
            while let Some(batch) = self.session.poll_batch(now) {
                let result = self
                    .committer
                    .commit_batch(&self.store, &batch.requests, now);
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
                            commit::read_inbox(&self.store, inbox, after_seq, now, &self.core);
                        self.session.handle_read(conn, after_seq, page);
                    }
                    Effect::Route { message, .. } => self.session.handle_message(now, message),
                    Effect::ResumeInput { .. } => {}
                    other => panic!("unexpected effect {other:?}"),
                }
            }
            for slot in 0..3 {
                self.session.set_outbound_bytes(conn(slot), 0);
            }
            if !progressed {
                return written;
            }
        }
    }

    fn login(&mut self, slot: usize, user: u64, device: u32) {
        self.session.open_connection(self.now, conn(slot));
        let hello = Frame::Hello {
            token: format!("{user}:{device}").into_bytes(),
            device,
            acked_up_to: 0,
            resume_after_seq: 0,
        };
        self.session
            .handle_frame(self.now, conn(slot), hello, false);
        let frames = self.settle();
        assert!(
            frames
                .iter()
                .any(|(to, frame)| *to == slot && matches!(frame, Frame::Welcome { .. })),
            "{frames:?}"
        );
    }
}

fn conn(slot: usize) -> ConnRef {
    ConnRef {
        shard: 0,
        slot,
        generation: 1,
    }
}

#[test]
fn a_connected_device_is_not_forgotten_however_long_nothing_comes() {
    let core = CoreConfig {
        retention_ms: 80_000,
        ..CoreConfig::default()
    };
    let mut edge = Edge {
        session: EdgeSession::new(SessionConfig::new(0, 1, core.clone()), SimAuth),
        store: MemoryStore::new(),
        committer: Committer::new(&core),
        core,
        now: 1_700_000_000_000,
    };
    let (laptop, phone, sender) = (0, 1, 2);
    edge.login(laptop, 1, 0);
    edge.login(sender, 2, 0);
    // Three retention periods pass; the laptop stays connected and nothing comes.
    for _ in 0..240 {
        edge.now += 1_000;
        edge.settle();
    }
    edge.login(phone, 1, 1);
    let send = Frame::Send {
        client_id: 1,
        to: 1,
        body: b"for both devices".to_vec(),
        ttl_secs: None,
    };
    edge.session
        .handle_frame(edge.now, conn(sender), send, false);
    let frames = edge.settle();
    let seq = frames
        .iter()
        .find_map(|(to, frame)| match frame {
            Frame::Deliver { seq, .. } if *to == phone => Some(*seq),
            _ => None,
        })
        .expect("delivered to the phone");
    // The phone acknowledges it; the laptop has not yet.
    edge.session
        .handle_frame(edge.now, conn(phone), Frame::Ack { up_to_seq: seq }, false);
    for _ in 0..3 {
        edge.now += 1_000;
        edge.settle();
    }
    let stored = commit::read_inbox(&edge.store, 1, 0, edge.now, &edge.core)
        .expect("read")
        .messages;
    assert!(
        stored.iter().any(|message| message.seq == seq),
        "the message the laptop has not acknowledged is still stored"
    );
}
