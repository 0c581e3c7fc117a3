//! A link another edge opened says which edge it is in its `Hello`. When links are bound to
//! the edge their certificate names (`cluster.link_certificates_name_the_edge`), the session
//! accepts only a `Hello` for one of those edges: one leaked edge key then speaks for its own
//! edge, not for the whole cluster.

mod common;
use common::SimAuth;

use courier_core::CoreConfig;
use courier_core::session::{ClusterView, EdgeMember, EdgeSession, SessionConfig};
use courier_protocol::link::LinkFrame;

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
