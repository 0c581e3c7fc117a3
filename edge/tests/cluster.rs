//! Goal: a cluster of three real edges on loopback (issue 13). Each user lives on one edge;
//! a client that connects to another edge is redirected home and the SDK follows; sends
//! between users of different edges cross a link, both ways; while a user's edge is down,
//! sends to that user are refused as retryable and the SDK's retry delivers them once it is
//! back, exactly once; an edge whose cluster certificate another CA signed never links.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{EVENT_TIMEOUT, Edge, assert_quiet, free_addr, next_message};
use courier_client::raw::RawConnection;
use courier_client::{ConnectOptions, Connector};
use courier_core::placement::home_edge;
use courier_protocol::Frame;

const EDGE_IDS: [u32; 3] = [11, 22, 33];

/// Certificates and keys a cluster shares: the public TLS certificate every edge presents to
/// clients, the token-signing key, and the cluster CA with one link certificate per edge.
struct ClusterFiles {
    dir: tempfile::TempDir,
}

impl ClusterFiles {
    fn new() -> ClusterFiles {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = ClusterFiles { dir };
        // The public certificate, shared: a client trusts the deployment, not one machine.
        let public = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .expect("public certificate");
        std::fs::write(files.path("public.pem"), public.cert.pem()).expect("write");
        std::fs::write(files.path("public.key"), public.key_pair.serialize_pem()).expect("write");
        let keygen = Command::new(env!("CARGO_BIN_EXE_courier-edge"))
            .args(["keygen", "--key-id", "1", "--out"])
            .arg(files.path("signing.key"))
            .output()
            .expect("run courier-edge keygen");
        assert!(
            keygen.status.success(),
            "{}",
            String::from_utf8_lossy(&keygen.stderr)
        );
        files.make_ca("ca", &EDGE_IDS);
        files
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A CA (`{name}.pem`) and, for each id, a link certificate it signed (`{name}-{id}.pem`,
    /// `{name}-{id}.key`).
    fn make_ca(&self, name: &str, ids: &[u32]) {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} cluster CA"));
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        std::fs::write(self.path(&format!("{name}.pem")), ca.pem()).expect("write");
        for id in ids {
            let key = rcgen::KeyPair::generate().expect("key");
            let mut params =
                rcgen::CertificateParams::new(vec!["courier-link".to_string()]).expect("params");
            params.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = params.signed_by(&key, &ca, &ca_key).expect("sign");
            std::fs::write(self.path(&format!("{name}-{id}.pem")), cert.pem()).expect("write");
            std::fs::write(self.path(&format!("{name}-{id}.key")), key.serialize_pem())
                .expect("write");
        }
    }

    /// The config sections of edge `id` in a cluster of `members`, its link certificate from
    /// the CA `ca`.
    fn config(&self, id: u32, ca: &str, members: &[(u32, SocketAddr)]) -> String {
        self.config_with(id, ca, members, "")
    }

    /// [`ClusterFiles::config`] with more `[cluster]` keys (`key = value` lines).
    fn config_with(
        &self,
        id: u32,
        ca: &str,
        members: &[(u32, SocketAddr)],
        cluster_keys: &str,
    ) -> String {
        let path = |name: &str| self.path(name).display().to_string();
        let mut text = format!(
            "[tls]\ncert_path = \"{}\"\nkey_path = \"{}\"\n\n\
             [auth]\nsigning_key_path = \"{}\"\n\n\
             [cluster]\nedge_id = {id}\nca_cert_path = \"{}\"\ncert_path = \"{}\"\nkey_path = \"{}\"\n\
             link_reconnect_ms_min = 100\nlink_reconnect_ms_max = 500\n{cluster_keys}",
            path("public.pem"),
            path("public.key"),
            path("signing.key"),
            path(&format!("{ca}.pem")),
            path(&format!("{ca}-{id}.pem")),
            path(&format!("{ca}-{id}.key")),
        );
        for (member, addr) in members {
            text += &format!(
                "\n[[cluster.members]]\nid = {member}\nclient_address = \"{addr}\"\nlink_address = \"{addr}\"\n"
            );
        }
        text
    }

    fn connector(&self) -> Connector {
        let pem = std::fs::read(self.path("public.pem")).expect("public certificate");
        Connector::new(&pem, "localhost").expect("connector")
    }
}

/// Three edges of two shards each, on loopback, each with its metrics listener.
fn start_cluster(files: &ClusterFiles) -> (Vec<Edge>, Vec<(u32, SocketAddr)>) {
    start_cluster_with(files, "", "")
}

/// [`start_cluster`] with more `[cluster]` keys and `extra` sections in every edge's config.
fn start_cluster_with(
    files: &ClusterFiles,
    cluster_keys: &str,
    extra: &str,
) -> (Vec<Edge>, Vec<(u32, SocketAddr)>) {
    let members: Vec<(u32, SocketAddr)> = EDGE_IDS.iter().map(|id| (*id, free_addr())).collect();
    let edges = members
        .iter()
        .map(|(id, addr)| {
            let metrics = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .expect("free TCP port");
            let config = files.config_with(*id, "ca", &members, cluster_keys)
                + extra
                + &format!("\n[metrics]\nlisten = \"{metrics}\"\n");
            let edge = Edge::start_on(*addr, 2, None, &config, &[]);
            METRICS.lock().expect("metrics").insert(edge.addr, metrics);
            edge
        })
        .collect();
    (edges, members)
}

/// Each edge's metrics listener, by its QUIC address.
static METRICS: std::sync::Mutex<std::collections::BTreeMap<SocketAddr, SocketAddr>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// The sum of a metric's series on `edge`'s `/metrics`.
fn metric_sum(edge: &Edge, name: &str) -> f64 {
    use std::io::{Read, Write};
    let addr = METRICS.lock().expect("metrics")[&edge.addr];
    let mut stream = std::net::TcpStream::connect(addr).expect("metrics listener");
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("response");
    text.lines()
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with('{'))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A user id whose home is the edge at `index` of `EDGE_IDS`, the `nth` such id.
fn user_homed_on(index: usize, nth: usize) -> u64 {
    (1..)
        .filter(|user| home_edge(*user, &EDGE_IDS) == EDGE_IDS[index])
        .nth(nth)
        .expect("users on every edge")
}

/// Waits until every edge's log says its links to the other two are up (two shards each).
fn wait_links_up(edges: &[Edge]) {
    let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let up = edges.iter().all(|edge| {
            let log = edge.log.lock().expect("log");
            log.iter().filter(|line| line.contains("link up")).count() >= 4
        });
        if up {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "links did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn client_via(files: &ClusterFiles, edge: &Edge, user: u64) -> courier_client::Client {
    let mut options = ConnectOptions::new(edge.addr, edge.token(user, 0), 0);
    options.retry_after = Duration::from_millis(100);
    tokio::time::timeout(EVENT_TIMEOUT, files.connector().connect(options))
        .await
        .expect("connected in time")
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_edges_redirect_and_carry_messages_both_ways() {
    let files = ClusterFiles::new();
    let (edges, members) = start_cluster(&files);
    wait_links_up(&edges);
    let users: Vec<u64> = (0..3).map(|index| user_homed_on(index, 0)).collect();

    // The protocol: an edge answers the Hello of a user who lives elsewhere with Goaway and
    // the address of the user's home edge.
    let mut raw = RawConnection::connect(&files.connector(), edges[1].addr)
        .await
        .expect("raw connection");
    raw.write_frame(&Frame::Hello {
        token: edges[1].token(users[0], 0).into_bytes(),
        device: 0,
        acked_up_to: 0,
        resume_after_seq: 0,
    })
    .await
    .expect("hello");
    let answer = raw.read_frame().await.expect("an answer to Hello");
    assert_eq!(
        answer,
        Frame::Goaway {
            reason: "this user lives on another edge".into(),
            reconnect_to: Some(members[0].1.to_string()),
        }
    );

    // The SDK follows the redirect by itself: every client starts on the wrong edge.
    let mut clients = Vec::new();
    for (index, user) in users.iter().enumerate() {
        let wrong = &edges[(index + 1) % 3];
        clients.push(client_via(&files, wrong, *user).await);
    }
    // Every pair, both ways: each message crosses a link to the recipient's edge.
    for from in 0..3 {
        for to in 0..3 {
            if from == to {
                continue;
            }
            let body = format!("{from}->{to}").into_bytes();
            let receipt = clients[from]
                .send(users[to], body.clone())
                .await
                .expect("acknowledged");
            let delivery = next_message(&mut clients[to]).await;
            assert_eq!(delivery.body, body);
            assert_eq!(delivery.from, users[from]);
            assert_eq!(delivery.seq, receipt.seq);
        }
    }
    for client in &mut clients {
        assert_quiet(client).await;
    }
    // Operators see it: every edge has its four links up, and sends crossed them.
    for edge in &edges {
        // The gauge is set once a second.
        let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
        while metric_sum(edge, "courier_links_up") != 4.0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(metric_sum(edge, "courier_links_up"), 4.0);
        assert!(metric_sum(edge, "courier_link_sends_forwarded_total") >= 2.0);
        assert!(metric_sum(edge, "courier_link_requests_received_total") >= 2.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_to_a_stopped_edge_are_retried_until_it_is_back() {
    let files = ClusterFiles::new();
    let (mut edges, _members) = start_cluster(&files);
    wait_links_up(&edges);
    let alice = user_homed_on(0, 0);
    let bob = user_homed_on(1, 0);
    let alice_client = client_via(&files, &edges[0], alice).await;
    let mut bob_client = client_via(&files, &edges[1], bob).await;
    let first = alice_client
        .send(bob, b"before".to_vec())
        .await
        .expect("acknowledged");
    assert_eq!(next_message(&mut bob_client).await.seq, first.seq);

    // Bob's edge dies: Alice's send is refused as retryable while it is down, and her SDK
    // keeps retrying it under the same id.
    edges[1].kill9();
    let sender = alice_client.sender();
    let pending = tokio::spawn(async move { sender.send(bob, b"during".to_vec()).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !pending.is_finished(),
        "a send to a stopped edge cannot be acknowledged"
    );
    edges[1].spawn();
    let receipt = tokio::time::timeout(EVENT_TIMEOUT, pending)
        .await
        .expect("acknowledged once the edge is back")
        .expect("task")
        .expect("acknowledged");
    assert_eq!(receipt.seq, first.seq + 1);
    // Bob's SDK reconnects to his restarted edge and gets it, once.
    let delivery = next_message(&mut bob_client).await;
    assert_eq!(
        (delivery.seq, delivery.body),
        (receipt.seq, b"during".to_vec())
    );
    assert_quiet(&mut bob_client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_with_a_certificate_from_another_ca_never_links() {
    let files = ClusterFiles::new();
    files.make_ca("forged", &[44]);
    let real = EDGE_IDS[0];
    let (real_addr, forged_addr) = (free_addr(), free_addr());
    // Both claim the same cluster; only the real edge has the real CA's certificate.
    let members = [(real, real_addr), (44, forged_addr)];
    let real_edge = Edge::start_on(real_addr, 1, None, &files.config(real, "ca", &members), &[]);
    let forged_config = files.config(44, "forged", &members);
    let forged = Edge::start_on(forged_addr, 1, None, &forged_config, &[]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (edge, name) in [(&real_edge, "real"), (&forged, "forged")] {
        let log = edge.log.lock().expect("log");
        assert!(
            !log.iter().any(|line| line.contains("link up")),
            "the {name} edge linked to an edge of another CA"
        );
        // It tried: each attempt failed at the TLS handshake and is retried with backoff.
        assert!(
            log.iter().any(|line| line.contains("link down")),
            "the {name} edge never tried to link"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_chatting_across_an_edge_killed_and_restarted_lose_nothing() {
    const MESSAGES: usize = 30;
    let files = ClusterFiles::new();
    let (mut edges, _members) = start_cluster(&files);
    wait_links_up(&edges);
    // Three pairs, each across two edges; edge 1 holds one sender and one recipient.
    let pairs = [
        (user_homed_on(0, 1), user_homed_on(1, 1)),
        (user_homed_on(1, 2), user_homed_on(2, 1)),
        (user_homed_on(2, 2), user_homed_on(0, 2)),
    ];
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for (index, (from, to)) in pairs.iter().enumerate() {
        let sender = client_via(&files, &edges[index % 3], *from).await;
        let receiver = client_via(&files, &edges[(index + 1) % 3], *to).await;
        let to = *to;
        senders.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for n in 0..MESSAGES {
                let receipt = sender
                    .send(to, format!("{n}").into_bytes())
                    .await
                    .expect("every send is acknowledged in the end");
                seqs.push(receipt.seq);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            seqs
        }));
        receivers.push(tokio::spawn(async move {
            let mut receiver = receiver;
            let mut got = Vec::new();
            while got.len() < MESSAGES {
                let delivery = next_message(&mut receiver).await;
                got.push((
                    delivery.seq,
                    String::from_utf8(delivery.body).expect("text"),
                ));
            }
            assert_quiet(&mut receiver).await;
            got
        }));
    }
    // Midway, the edge in the middle of two pairs dies and comes back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    edges[1].kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    edges[1].spawn();
    for (sender, receiver) in senders.into_iter().zip(receivers) {
        let seqs = tokio::time::timeout(EVENT_TIMEOUT * 2, sender)
            .await
            .expect("sends finish")
            .expect("sender task");
        let got = tokio::time::timeout(EVENT_TIMEOUT * 2, receiver)
            .await
            .expect("deliveries finish")
            .expect("receiver task");
        // Every acknowledged message arrived once, in order, at its acknowledged seq.
        let expected: Vec<(u64, String)> = seqs
            .iter()
            .enumerate()
            .map(|(n, seq)| (*seq, format!("{n}")))
            .collect();
        assert_eq!(got, expected);
    }
}

/// Takeover and drain on FoundationDB (decision 0015). They run wherever `FDB_CLUSTER_FILE`
/// names a cluster and the edge is built with `--features fdb`; these machines can build but
/// not link FoundationDB's client, so here they are only type-checked (clippy in `.ci/run`).
#[cfg(feature = "fdb")]
mod takeover_on_foundationdb {
    use super::*;

    /// The config every edge adds: the shared store under a key prefix of this test run, and
    /// takeover with a short lease.
    fn shared_store() -> Option<String> {
        let Ok(cluster_file) = std::env::var("FDB_CLUSTER_FILE") else {
            eprintln!("skipped: FDB_CLUSTER_FILE is not set");
            return None;
        };
        let prefix = format!("courier-test/takeover-{}", rand::random::<u64>());
        Some(format!(
            "\n[store]\nkind = \"foundationdb\"\n\n[store.foundationdb]\n\
             cluster_files = [\"{cluster_file}\"]\nkey_prefix = \"{prefix}\"\n"
        ))
    }

    /// Takeover with a short lease, so a dead edge is taken over within seconds.
    const TAKEOVER: &str = "takeover = true\nlease_timeout_ms = 2000\nlease_renew_ms = 200\n";

    /// Alice (edge 0) writes to Bob (edge 1) across Bob's edge being killed: his successor
    /// serves him until his edge is back, and every acknowledged message arrives once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_killed_edge_is_taken_over_and_given_back_without_loss() {
        let Some(store) = shared_store() else {
            return;
        };
        let files = ClusterFiles::new();
        let (mut edges, _members) = start_cluster_with(&files, TAKEOVER, &store);
        wait_links_up(&edges);
        let alice = user_homed_on(0, 0);
        let bob = user_homed_on(1, 0);
        // Both start at edge 2: the address a client falls back to when its edge is gone.
        let alice_client = client_via(&files, &edges[2], alice).await;
        let mut bob_client = client_via(&files, &edges[2], bob).await;
        let mut acked = Vec::new();
        for n in 0..3 {
            acked.push(
                alice_client
                    .send(bob, format!("{n}").into_bytes())
                    .await
                    .expect("ack"),
            );
        }
        edges[1].kill9();
        // While edge 1 is dead its successor takes Bob over after the lease timeout.
        for n in 3..6 {
            let receipt = tokio::time::timeout(
                EVENT_TIMEOUT,
                alice_client.send(bob, format!("{n}").into_bytes()),
            )
            .await
            .expect("acknowledged once a successor serves Bob")
            .expect("ack");
            acked.push(receipt);
        }
        edges[1].spawn();
        for n in 6..9 {
            let receipt = tokio::time::timeout(
                EVENT_TIMEOUT,
                alice_client.send(bob, format!("{n}").into_bytes()),
            )
            .await
            .expect("acknowledged after edge 1 is back")
            .expect("ack");
            acked.push(receipt);
        }
        for (n, receipt) in acked.iter().enumerate() {
            let delivery = next_message(&mut bob_client).await;
            assert_eq!(
                (delivery.seq, delivery.body),
                (receipt.seq, format!("{n}").into_bytes())
            );
        }
        assert_quiet(&mut bob_client).await;
    }

    /// SIGTERM on Bob's edge hands him to its successor: his client is redirected there and
    /// Alice's messages keep being acknowledged and delivered, once each.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drained_edge_redirects_its_clients_to_its_successor() {
        let Some(store) = shared_store() else {
            return;
        };
        let files = ClusterFiles::new();
        let (mut edges, _members) = start_cluster_with(&files, TAKEOVER, &store);
        wait_links_up(&edges);
        let alice = user_homed_on(0, 1);
        let bob = user_homed_on(1, 1);
        let alice_client = client_via(&files, &edges[0], alice).await;
        let mut bob_client = client_via(&files, &edges[2], bob).await;
        let before = alice_client
            .send(bob, b"before".to_vec())
            .await
            .expect("ack");
        assert!(edges[1].terminate(), "a drain exits cleanly");
        let after = tokio::time::timeout(EVENT_TIMEOUT, alice_client.send(bob, b"after".to_vec()))
            .await
            .expect("acknowledged by the successor")
            .expect("ack");
        assert_eq!(after.seq, before.seq + 1);
        for (receipt, body) in [(before, &b"before"[..]), (after, &b"after"[..])] {
            let delivery = next_message(&mut bob_client).await;
            assert_eq!(
                (delivery.seq, delivery.body.as_slice()),
                (receipt.seq, body)
            );
        }
        assert_quiet(&mut bob_client).await;
    }
}
