//! One edge of one shard, driven step by step: a session, its store and its committer, with
//! the simulated clock in the test's hands. For tests that walk one behaviour through the real
//! session (`delivery_window.rs`, `device_seen.rs`) rather than over many seeds.

use courier_core::CoreConfig;
use courier_core::commit::{self, Committer};
use courier_core::session::{ConnRef, EdgeSession, Effect, SessionConfig};
use courier_core::store::memory::MemoryStore;
use courier_protocol::Frame;

use super::SimAuth;

/// Connection slots a test uses: each gets its outbound bytes taken at every settle.
const SLOTS: usize = 5;

pub struct OneShard {
    pub session: EdgeSession<SimAuth>,
    pub store: MemoryStore,
    pub committer: Committer,
    pub core: CoreConfig,
    pub now: u64,
}

impl OneShard {
    pub fn new(config: SessionConfig) -> OneShard {
        let core = config.core.clone();
        OneShard {
            session: EdgeSession::new(config, SimAuth),
            store: MemoryStore::new(),
            committer: Committer::new(&core),
            core,
            now: 1_700_000_000_000,
        }
    }

    /// Runs the session's deadlines, then commits, reads and routes at `now` until nothing is
    /// left, the transport taking every byte written; returns the frames written, by slot.
    pub fn settle(&mut self) -> Vec<(usize, Frame)> {
        let now = self.now;
        self.session.handle_deadlines(now);
        let mut written = Vec::new();
        loop {
            let mut progressed = false;
            while let Some(batch) = self.session.poll_batch(now) {
                let result = self
                    .committer
                    .commit_batch(&self.store, &batch.requests, now);
                self.session.handle_commit(now, batch, result);
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
                    // The driver closes the connection and tells the session it is gone.
                    Effect::Close { conn, .. } => self.session.connection_lost(conn),
                    Effect::ResumeInput { .. } => {}
                    other => panic!("unexpected effect {other:?}"),
                }
            }
            for slot in 0..SLOTS {
                self.session.set_outbound_bytes(conn(slot), 0);
            }
            if !progressed {
                return written;
            }
        }
    }

    /// Logs `user`'s `device` in on `slot` (a fresh install) and settles until its `Welcome`.
    pub fn login(&mut self, slot: usize, user: u64, device: u32) {
        self.login_holding(slot, user, device, 0);
    }

    /// Logs `user`'s `device` in on `slot`, holding and having consumed everything up to
    /// `held_up_to`, and settles until its `Welcome`; returns the frames written meanwhile.
    pub fn login_holding(
        &mut self,
        slot: usize,
        user: u64,
        device: u32,
        held_up_to: u64,
    ) -> Vec<(usize, Frame)> {
        self.session.open_connection(self.now, conn(slot));
        let hello = Frame::Hello {
            token: format!("{user}:{device}").into_bytes(),
            device,
            acked_up_to: held_up_to,
            resume_after_seq: held_up_to,
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
        frames
    }

    /// A client frame on `slot`, at `now`.
    pub fn frame(&mut self, slot: usize, frame: Frame) {
        self.session
            .handle_frame(self.now, conn(slot), frame, false);
    }
}

/// The `Hello` of `user`'s `device` as a fresh install (the test authenticator's token).
pub fn hello(user: u64, device: u32) -> Frame {
    Frame::Hello {
        token: format!("{user}:{device}").into_bytes(),
        device,
        acked_up_to: 0,
        resume_after_seq: 0,
    }
}

pub fn conn(slot: usize) -> ConnRef {
    ConnRef {
        shard: 0,
        slot,
        generation: 1,
    }
}

/// The seqs delivered to `slot` among `frames`.
pub fn delivered(frames: &[(usize, Frame)], slot: usize) -> Vec<u64> {
    frames
        .iter()
        .filter_map(|(to, frame)| match frame {
            Frame::Deliver { seq, .. } if *to == slot => Some(*seq),
            _ => None,
        })
        .collect()
}

/// A lone shard of edge `edge` in a cluster of `members`, whose members are reached at
/// `edge-{id}` (what a redirect names).
pub fn cluster_shard(edge: u32, members: &[u32]) -> EdgeSession<SimAuth> {
    let mut config = SessionConfig::new(0, 1, CoreConfig::default());
    config.cluster = Some(courier_core::session::ClusterView {
        edge,
        members: members
            .iter()
            .map(|id| courier_core::session::EdgeMember {
                id: *id,
                client_address: format!("edge-{id}"),
            })
            .collect(),
    });
    EdgeSession::new(config, SimAuth)
}

/// The first user whose home, among `members`, is `edge`.
pub fn user_homed_on(edge: u32, members: &[u32]) -> u64 {
    (1..)
        .find(|user| courier_core::placement::home_edge(*user, members) == edge)
        .expect("a user of every edge")
}

/// Every effect the session has for its driver now.
pub fn effects(session: &mut EdgeSession<SimAuth>) -> Vec<Effect> {
    std::iter::from_fn(|| session.poll_effect()).collect()
}
