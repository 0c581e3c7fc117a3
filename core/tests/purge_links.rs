//! A purge racing a device's login (`ctl purge` disconnects the user, then purges; a device may
//! log in between), step by step on one shard's real session. The purge erases the inbox's
//! device records, so no device may stay linked across it: a login queued before it is
//! refused (its link would write a record for the purged user after the purge, for a
//! connection the disconnect may have closed), and a connection linked before it is closed
//! to log in again (left open it had no record: its acks moved nothing, and another device's
//! acks could delete what it had not been given).

mod common;
use common::SimAuth;
use common::one_shard::{OneShard, conn, delivered, hello};

use courier_core::CoreConfig;
use courier_core::commit::Committer;
use courier_core::session::{EdgeSession, Effect, SessionConfig};
use courier_core::store::memory::MemoryStore;
use courier_protocol::{ErrorCode, Frame};

const NOW: u64 = 1_700_000_000_000;
const USER: u64 = 5;

fn session() -> EdgeSession<SimAuth> {
    EdgeSession::new(SessionConfig::new(0, 1, CoreConfig::default()), SimAuth)
}

/// Routes and collects the session's effects until none are left.
fn settle(shard: &mut EdgeSession<SimAuth>) -> Vec<Effect> {
    let mut seen = Vec::new();
    while let Some(effect) = shard.poll_effect() {
        if let Effect::Route { message, .. } = &effect {
            shard.handle_message(NOW, message.clone());
        }
        seen.push(effect);
    }
    seen
}

fn commit_all(shard: &mut EdgeSession<SimAuth>, store: &MemoryStore, committer: &mut Committer) {
    while let Some(batch) = shard.poll_batch(NOW) {
        let result = committer.commit_batch(store, &batch.requests, NOW);
        shard.handle_commit(NOW, batch, result);
    }
}

fn closed(effects: &[Effect], slot: usize) -> Option<ErrorCode> {
    effects.iter().find_map(|effect| match effect {
        Effect::Close { conn: c, code, .. } if *c == conn(slot) => Some(*code),
        _ => None,
    })
}

/// A session, its store and committer, and `USER`'s device 0 saying `Hello` on slot 0 (its
/// link queued, not committed).
fn logging_in() -> (EdgeSession<SimAuth>, MemoryStore, Committer) {
    let mut shard = session();
    shard.open_connection(NOW, conn(0));
    shard.handle_frame(NOW, conn(0), hello(USER, 0), false);
    settle(&mut shard);
    (
        shard,
        MemoryStore::new(),
        Committer::new(&CoreConfig::default()),
    )
}

#[test]
fn a_login_queued_before_a_purge_is_refused_not_linked_after_it() {
    let (mut shard, store, mut committer) = logging_in();
    assert_eq!(shard.queued_requests(), 1, "its link waits for a batch");
    shard.handle_purge(USER).expect("the purge is queued");
    let refused = settle(&mut shard);
    assert!(
        closed(&refused, 0).is_some(),
        "the login is refused (the device logs in again): {refused:?}"
    );
    commit_all(&mut shard, &store, &mut committer);
    let after = settle(&mut shard);
    assert!(
        !after.iter().any(|effect| matches!(
            effect,
            Effect::Write {
                frame: Frame::Welcome { .. },
                ..
            }
        )),
        "nothing was linked after the purge: {after:?}"
    );
}

#[test]
fn a_connection_linked_before_a_purge_is_closed_to_log_in_again() {
    let (mut shard, store, mut committer) = logging_in();
    commit_all(&mut shard, &store, &mut committer);
    let welcomed = settle(&mut shard);
    assert!(
        welcomed.iter().any(|effect| matches!(
            effect,
            Effect::Write {
                frame: Frame::Welcome { .. },
                ..
            }
        )),
        "logged in: {welcomed:?}"
    );
    shard.handle_purge(USER).expect("the purge is queued");
    settle(&mut shard);
    commit_all(&mut shard, &store, &mut committer);
    let purged = settle(&mut shard);
    assert_eq!(
        closed(&purged, 0),
        Some(ErrorCode::Disconnected),
        "closed to log in again: {purged:?}"
    );
}

/// After a purge every device of the user logs in again, each without a device record. Each
/// device that had consumed from the inbox gets what was stored since the purge, whichever
/// logs in first. Before, only the first did: the others were taken for companions new to an
/// inbox that has a live device and started at its head, so the messages sent between the
/// purge and their login never reached them.
#[test]
fn every_returning_device_gets_what_was_sent_after_a_purge() {
    const WRITER: u64 = 6;
    let mut edge = OneShard::new(SessionConfig::new(0, 1, CoreConfig::default()));
    edge.login(0, USER, 0);
    edge.login(1, USER, 1);
    edge.login(2, WRITER, 0);
    let send = |client_id| Frame::Send {
        client_id,
        to: USER,
        body: b"hi".to_vec(),
        ttl_secs: None,
    };
    edge.frame(2, send(1));
    let frames = edge.settle();
    assert_eq!(delivered(&frames, 0), vec![1]);
    assert_eq!(delivered(&frames, 1), vec![1]);
    edge.frame(0, Frame::Ack { up_to_seq: 1 });
    edge.frame(1, Frame::Ack { up_to_seq: 1 });
    edge.now += edge.core.ack_commit_delay_ms;
    edge.settle();

    // `ctl purge`: disconnect, then erase.
    assert_eq!(edge.session.disconnect_user(USER, "purged"), 2);
    edge.session
        .handle_purge(USER)
        .expect("the purge is queued");
    edge.settle();
    edge.frame(2, send(2));
    let frames = edge.settle();
    let Some(seq) = frames.iter().find_map(|(_, frame)| match frame {
        Frame::SendAck { seq, .. } => Some(*seq),
        _ => None,
    }) else {
        panic!("the send after the purge is answered: {frames:?}");
    };

    let first = edge.login_holding(3, USER, 0, 1);
    assert_eq!(delivered(&first, 3), vec![seq], "the first device back");
    let second = edge.login_holding(4, USER, 1, 1);
    assert_eq!(delivered(&second, 4), vec![seq], "the second device back");
}
