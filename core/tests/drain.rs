//! A drain on one shard of a cluster (decision 0015), step by step: the logged-in client is
//! redirected to the edge the leases went to, and the shutdown that follows does not close
//! it a second time (which would discard the `Goaway` before it is sent); nothing is
//! committed here afterwards, and a send forwarded for a user of the drained edge is refused
//! as retryable.

mod common;
use common::SimAuth;
use common::one_shard::{OneShard, cluster_shard, conn, effects, hello, user_homed_on};

use courier_core::CoreConfig;
use courier_core::commit::Committer;
use courier_core::session::{EdgeSession, Effect, SessionConfig, ShardMessage};
use courier_core::store::memory::MemoryStore;
use courier_protocol::link::{LinkFrame, LinkSendResult};
use courier_protocol::{ErrorCode, Frame};

const EDGES: [u32; 2] = [1, 2];

fn session() -> EdgeSession<SimAuth> {
    cluster_shard(1, &EDGES)
}

/// A user whose home is `edge`.
fn user_of(edge: u32) -> u64 {
    user_homed_on(edge, &EDGES)
}

#[test]
fn a_drained_shard_redirects_once_and_commits_nothing_more() {
    let now = 1_700_000_000_000;
    let user = user_of(1);
    let mut shard = session();
    let store = MemoryStore::new();
    let mut committer = Committer::new(&CoreConfig::default());
    let conn = conn(0);
    shard.open_connection(now, conn);
    shard.handle_frame(now, conn, hello(user, 0), false);
    let batch = shard.poll_batch(now).expect("the login commits");
    let result = committer.commit_batch(&store, &batch.requests, now);
    shard.handle_commit(now, batch, result);
    let welcomed = effects(&mut shard).into_iter().any(|effect| {
        matches!(
            effect,
            Effect::Write {
                frame: Frame::Welcome { .. },
                ..
            }
        )
    });
    assert!(welcomed, "logged in");

    // A send from the client is queued, then the edge drains to edge 2.
    let send = Frame::Send {
        client_id: 1,
        to: user,
        body: b"queued".to_vec(),
        ttl_secs: None,
    };
    shard.handle_frame(now, conn, send, false);
    shard.drain_to(2);
    let drained = effects(&mut shard);
    assert!(
        drained.iter().any(|effect| matches!(
            effect,
            Effect::Redirect { conn: c, reconnect_to, .. } if *c == conn && reconnect_to == "edge-2"
        )),
        "the client is sent to edge 2: {drained:?}"
    );
    assert_eq!(shard.queued_requests(), 0, "the queued send was refused");
    assert!(
        shard.poll_batch(now).is_none(),
        "nothing commits here after a drain"
    );

    // Shutdown closes what is left, but not the redirected connection.
    shard.close_all(ErrorCode::ShuttingDown, "the edge is shutting down");
    let closed = effects(&mut shard);
    assert!(
        !closed
            .iter()
            .any(|effect| matches!(effect, Effect::Close { conn: c, .. } if *c == conn)),
        "a second close would discard the Goaway: {closed:?}"
    );

    // The peer forwards a send for the drained edge's user: refused as retryable.
    shard.open_link(7, None);
    shard
        .handle_link_request(now, 7, LinkFrame::Hello { edge: 2 })
        .expect("a member links");
    let forwarded = LinkFrame::Send {
        request_id: 1,
        sender: 99,
        client_id: 1,
        to: user,
        body: b"late".to_vec(),
        ttl_secs: None,
    };
    shard
        .handle_link_request(now, 7, forwarded)
        .expect("a well-formed request");
    let answered = effects(&mut shard);
    assert!(
        answered.iter().any(|effect| matches!(
            effect,
            Effect::LinkReply {
                frame: LinkFrame::SendResult {
                    result: LinkSendResult::Refused {
                        code: ErrorCode::ShardUnavailable
                    },
                    ..
                },
                ..
            }
        )),
        "a forwarded send after the drain is refused as retryable: {answered:?}"
    );
    // Nothing else the drained shard could still be asked to commit.
    shard.handle_message(
        now,
        ShardMessage::Ack {
            inbox: user,
            device: 0,
            up_to_seq: 1,
        },
    );
    assert_eq!(shard.queued_requests(), 0);
    assert_eq!(shard.handle_emptied(&[user], now), 0);
    assert_eq!(shard.queued_requests(), 0);
}

/// A stopping edge refuses new sends as retryable (`ShuttingDown`), so that what it accepted
/// can finish and its shard close its connections; before, a busy shard's queue was never
/// empty when it looked, and the drain ran out its grace period.
#[test]
fn a_stopping_shard_refuses_new_sends_as_retryable() {
    let mut shard = OneShard::new(SessionConfig::new(0, 1, CoreConfig::default()));
    shard.login(0, 5, 0);
    shard.session.stop_taking_sends();
    shard.frame(
        0,
        Frame::Send {
            client_id: 1,
            to: 5,
            body: b"late".to_vec(),
            ttl_secs: None,
        },
    );
    assert_eq!(
        shard.session.queued_requests(),
        0,
        "nothing new to wait for"
    );
    let answered = shard.settle();
    assert!(
        answered.iter().any(|(slot, frame)| *slot == 0
            && matches!(
                frame,
                Frame::SendError {
                    client_id: 1,
                    code: ErrorCode::ShuttingDown,
                    retryable: true,
                }
            )),
        "{answered:?}"
    );
}

/// A client redirected at its `Hello` (its user lives on another edge) whose 0-RTT data also
/// carried an `Ack` (not idempotent, so not allowed there): the connection is already closing,
/// and the frame is ignored. Before, it was answered with a second close, which can discard the
/// `Goaway` (and its address) not yet sent.
#[test]
fn an_early_frame_on_a_redirected_connection_does_not_close_it_again() {
    let now = 1_700_000_000_000;
    let user = user_of(2);
    let mut shard = session();
    let conn = conn(0);
    shard.open_connection(now, conn);
    shard.handle_frame(now, conn, hello(user, 0), true);
    let redirected = effects(&mut shard);
    assert!(
        redirected
            .iter()
            .any(|effect| matches!(effect, Effect::Redirect { .. })),
        "{redirected:?}"
    );
    shard.handle_frame(now, conn, Frame::Ack { up_to_seq: 1 }, true);
    let after = effects(&mut shard);
    assert!(
        !after
            .iter()
            .any(|effect| matches!(effect, Effect::Close { .. })),
        "a second close: {after:?}"
    );
}

/// A client redirected at its `Hello` that ends its stream before reading the answer (the
/// driver reads `Hello` and the stream's end in one go): the end does not close the connection
/// again, which would discard the `Goaway` and its address before it is sent.
#[test]
fn a_stream_ended_after_a_redirecting_hello_does_not_close_it_again() {
    let now = 1_700_000_000_000;
    let user = user_of(2);
    let mut shard = session();
    let conn = conn(0);
    shard.open_connection(now, conn);
    shard.handle_frame(now, conn, hello(user, 0), false);
    shard.close_connection(conn, ErrorCode::ShuttingDown, "stream finished".into());
    let effects = effects(&mut shard);
    assert!(
        effects
            .iter()
            .any(|effect| matches!(effect, Effect::Redirect { .. })),
        "{effects:?}"
    );
    assert!(
        !effects
            .iter()
            .any(|effect| matches!(effect, Effect::Close { .. })),
        "a second close: {effects:?}"
    );
}
