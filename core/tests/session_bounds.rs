//! What a connection can make the session hold or do, step by step: state of closed
//! connections is bounded, and a `Sync` cannot make the session skip what it never gave.

mod common;
use common::one_shard::{OneShard, delivered, hello};

use courier_core::CoreConfig;
use courier_core::session::{ConnRef, SessionConfig};
use courier_protocol::Frame;

/// Each login arms a `Seen` deadline an hour or so out, which stays in the heap after its
/// connection closes until it comes due. A churn of connections (phones changing networks, a
/// client logging in and dropping in a loop) must not grow the heap with every connection of
/// the last hour: it is compacted past what the live connections can hold.
#[test]
fn a_churn_of_connections_leaves_the_deadline_heap_bounded() {
    let mut edge = OneShard::new(SessionConfig::new(0, 1, CoreConfig::default()));
    for generation in 1..=3_000 {
        let churning = ConnRef {
            shard: 0,
            slot: 0,
            generation,
        };
        edge.session.open_connection(edge.now, churning);
        edge.session
            .handle_frame(edge.now, churning, hello(1, 0), false);
        edge.settle();
        edge.session.connection_lost(churning);
        edge.now += 10;
    }
    let held = edge.session.deadline_entries();
    assert!(
        held <= 1_024 + 4,
        "{held} deadline entries with no connection open"
    );
}

/// A `Sync` cannot move what a connection was given past what it was given: otherwise the
/// messages stored after it up to the `Sync`'s seq would be skipped as already given, and the
/// `Ack` that follows (capped by what was given) would let the store delete them though the
/// device never received them.
#[test]
fn a_sync_past_what_was_delivered_skips_nothing() {
    let mut edge = OneShard::new(SessionConfig::new(0, 1, CoreConfig::default()));
    edge.login(0, 1, 0);
    edge.login(1, 2, 0);
    let send = |client_id| Frame::Send {
        client_id,
        to: 1,
        body: b"hi".to_vec(),
        ttl_secs: None,
    };
    for client_id in 1..=3 {
        edge.frame(1, send(client_id));
    }
    assert_eq!(delivered(&edge.settle(), 0), vec![1, 2, 3]);
    edge.frame(0, Frame::Sync { after_seq: 1_000 });
    edge.frame(0, Frame::Ack { up_to_seq: 1_000 });
    edge.settle();
    for client_id in 4..=5 {
        edge.frame(1, send(client_id));
    }
    assert_eq!(
        delivered(&edge.settle(), 0),
        vec![4, 5],
        "what is stored after the sync is still delivered"
    );
}

/// A device's new login refused because logins queue in numbers (`Overloaded`) leaves the
/// device's working connection alone. Before, the older connection was superseded first and
/// the new one then refused: both closed, and a login storm got one more reconnect for each
/// refusal.
#[test]
fn a_refused_login_leaves_the_devices_working_connection_open() {
    use courier_core::session::Effect;
    use courier_protocol::ErrorCode;
    let core = CoreConfig {
        queue_requests_max: 1,
        ..CoreConfig::default()
    };
    let mut edge = OneShard::new(SessionConfig::new(0, 1, core));
    edge.login(0, 1, 0);
    // Another user's login waits in the queue, not yet committed; then device 0 of user 1
    // logs in again on slot 2.
    for (slot, user) in [(1, 2), (2, 1)] {
        let conn = common::one_shard::conn(slot);
        edge.session.open_connection(edge.now, conn);
        edge.session
            .handle_frame(edge.now, conn, hello(user, 0), false);
    }
    let mut closed = Vec::new();
    while let Some(effect) = edge.session.poll_effect() {
        match effect {
            Effect::Route { message, .. } => edge.session.handle_message(edge.now, message),
            Effect::Close { conn, code, .. } => closed.push((conn.slot, code)),
            _ => {}
        }
    }
    assert_eq!(closed, vec![(2, ErrorCode::Overloaded)]);
    edge.session.connection_lost(common::one_shard::conn(2));
    // The queued login is committed; the working connection still gets its messages.
    edge.settle();
    edge.login(3, 4, 0);
    edge.frame(
        3,
        Frame::Send {
            client_id: 1,
            to: 1,
            body: b"still here".to_vec(),
            ttl_secs: None,
        },
    );
    assert_eq!(delivered(&edge.settle(), 0), vec![1]);
}
