//! A link another edge opened says which edge it is in its `Hello`. When links are bound to
//! the edge their certificate names (`cluster.link_certificates_name_the_edge`), the session
//! accepts only a `Hello` for one of those edges, and sends on it only as the users that edge
//! serves: one leaked edge key then speaks for its own edge and its users, not for the whole
//! cluster.

mod common;
use common::SimAuth;
use common::one_shard::{conn, hello};

use courier_core::commit::{Committer, Request};
use courier_core::placement::{EdgeId, home_edge};
use courier_core::session::{ClusterView, EdgeMember, EdgeSession, Effect, SessionConfig};
use courier_core::store::memory::MemoryStore;
use courier_core::{CoreConfig, UserId};
use courier_protocol::link::{LinkFrame, LinkSendResult};
use courier_protocol::{ErrorCode, Frame, SignalKind};

/// Edge 3 of the cluster 1, 2, 3.
fn session() -> EdgeSession<SimAuth> {
    let mut config = SessionConfig::new(0, 1, CoreConfig::default());
    config.cluster = Some(ClusterView {
        edge: 3,
        members: (1..=3)
            .map(|id| EdgeMember {
                id,
                client_address: format!("edge-{id}"),
            })
            .collect(),
    });
    EdgeSession::new(config, SimAuth)
}

#[test]
fn a_link_may_say_only_an_edge_its_certificate_names() {
    let mut edge = session();
    // The certificate names edge 1: it cannot say it is edge 2.
    edge.open_link(7, Some(vec![1]));
    let refused = edge
        .handle_link_request(0, 7, LinkFrame::Hello { edge: 2 })
        .expect_err("a Hello for an edge the certificate does not name");
    assert!(refused.contains("names [1]"), "{refused}");
    // It can say it is edge 1.
    edge.open_link(8, Some(vec![1]));
    edge.handle_link_request(0, 8, LinkFrame::Hello { edge: 1 })
        .expect("the edge the certificate names");
    // A certificate that names no member links as nothing.
    edge.open_link(9, Some(Vec::new()));
    assert!(
        edge.handle_link_request(0, 9, LinkFrame::Hello { edge: 1 })
            .is_err()
    );
    // Without names per edge, any member.
    edge.open_link(10, None);
    edge.handle_link_request(0, 10, LinkFrame::Hello { edge: 2 })
        .expect("any member");
}

/// A user whose home is `edge` in the cluster 1, 2, 3.
fn user_of(edge: EdgeId) -> UserId {
    (1..)
        .find(|user| home_edge(*user, &[1, 2, 3]) == edge)
        .expect("a user")
}

/// The sends a link `link` of `edge` delivered to this shard's commit queue (their senders), and
/// the refusals it answered on the link.
fn sent_on_link(
    edge: &mut EdgeSession<SimAuth>,
    link: u64,
    senders: &[UserId],
) -> (Vec<UserId>, Vec<(u64, LinkSendResult)>) {
    for (request_id, sender) in (1..).zip(senders) {
        let send = LinkFrame::Send {
            request_id,
            sender: *sender,
            client_id: request_id,
            to: user_of(3),
            body: b"hi".to_vec(),
            ttl_secs: None,
        };
        edge.handle_link_request(0, link, send).expect("a send");
    }
    let refused = std::iter::from_fn(|| edge.poll_effect())
        .filter_map(|effect| match effect {
            Effect::LinkReply {
                frame: LinkFrame::SendResult { request_id, result },
                ..
            } => Some((request_id, result)),
            _ => None,
        })
        .collect();
    let taken = edge
        .poll_batch(0)
        .map(|batch| {
            batch
                .requests
                .iter()
                .filter_map(|request| match request {
                    Request::Send(send) => Some(send.sender),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    (taken, refused)
}

/// On a link bound to edge 1's certificate, a send as a user of edge 2 is refused (retryable,
/// as when views of who serves whom differ for a moment); one as edge 1's user is taken.
/// Without names per edge the `Hello` is the peer's word, and nothing is checked against it.
#[test]
fn a_bound_link_sends_only_as_the_users_its_edge_serves() {
    let mut edge = session();
    edge.open_link(7, Some(vec![1]));
    edge.handle_link_request(0, 7, LinkFrame::Hello { edge: 1 })
        .expect("hello");
    let (taken, refused) = sent_on_link(&mut edge, 7, &[user_of(2), user_of(1)]);
    assert_eq!(taken, vec![user_of(1)]);
    assert_eq!(
        refused,
        vec![(
            1,
            LinkSendResult::Refused {
                code: ErrorCode::ShardUnavailable
            }
        )]
    );

    let mut edge = session();
    edge.open_link(8, None);
    edge.handle_link_request(0, 8, LinkFrame::Hello { edge: 1 })
        .expect("hello");
    let (taken, refused) = sent_on_link(&mut edge, 8, &[user_of(2), user_of(1)]);
    assert_eq!(taken, vec![user_of(2), user_of(1)]);
    assert_eq!(refused, vec![]);
}

/// Signals too: on a link bound to edge 1's certificate, a signal from a user of edge 2 to a
/// user connected here is dropped; one from edge 1's user is delivered. Without names per
/// edge both are.
#[test]
fn a_bound_link_signals_only_as_the_users_its_edge_serves() {
    for named in [true, false] {
        let now = 1_700_000_000_000;
        let mut edge = session();
        let recipient = user_of(3);
        let store = MemoryStore::new();
        let mut committer = Committer::new(&CoreConfig::default());
        edge.open_connection(now, conn(0));
        edge.handle_frame(now, conn(0), hello(recipient, 0), false);
        let login = edge.poll_batch(now).expect("the login commits");
        let result = committer.commit_batch(&store, &login.requests, now);
        edge.handle_commit(now, login, result);
        while edge.poll_effect().is_some() {}
        edge.open_link(7, named.then(|| vec![1]));
        edge.handle_link_request(now, 7, LinkFrame::Hello { edge: 1 })
            .expect("hello");
        for from in [user_of(2), user_of(1)] {
            let signal = LinkFrame::Signal {
                to: recipient,
                from,
                kind: SignalKind::Typing,
                payload: Vec::new(),
            };
            edge.handle_link_request(now, 7, signal).expect("a signal");
        }
        let signalled: Vec<UserId> = std::iter::from_fn(|| edge.poll_effect())
            .filter_map(|effect| match effect {
                Effect::Write {
                    frame: Frame::Signal { peer, .. },
                    ..
                } => Some(peer),
                _ => None,
            })
            .collect();
        let expected = if named {
            vec![user_of(1)]
        } else {
            vec![user_of(2), user_of(1)]
        };
        assert_eq!(signalled, expected, "named: {named}");
    }
}
