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

use common::{EVENT_TIMEOUT, Edge, assert_quiet, free_addr, metric_sum_at, next_message};
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
        let files: Vec<(u32, Option<u32>)> = ids.iter().map(|id| (*id, None)).collect();
        self.make_ca_naming(name, &files);
    }

    /// [`ClusterFiles::make_ca`] whose certificates also name an edge: `(id, Some(named))`
    /// writes `{name}-{id}.pem` with the DNS name `edge-{named}.courier-link` too
    /// (`cluster.link_certificates_name_the_edge`).
    fn make_ca_naming(&self, name: &str, files: &[(u32, Option<u32>)]) {
        let ids: Vec<u32> = files.iter().map(|(id, _)| *id).collect();
        let ids = &ids[..];
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} cluster CA"));
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        std::fs::write(self.path(&format!("{name}.pem")), ca.pem()).expect("write");
        for (id, named) in ids.iter().zip(files.iter().map(|(_, named)| *named)) {
            let key = rcgen::KeyPair::generate().expect("key");
            let mut names = vec!["courier-link".to_string()];
            names.extend(named.map(|edge| format!("edge-{edge}.courier-link")));
            let mut params = rcgen::CertificateParams::new(names).expect("params");
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
        // Short reconnect waits, unless the test sets its own.
        let reconnect = if cluster_keys.contains("link_reconnect_ms") {
            ""
        } else {
            "link_reconnect_ms_min = 100\nlink_reconnect_ms_max = 500\n"
        };
        let mut text = format!(
            "[tls]\ncert_path = \"{}\"\nkey_path = \"{}\"\n\n\
             [auth]\nsigning_key_path = \"{}\"\n\n\
             [cluster]\nedge_id = {id}\nca_cert_path = \"{}\"\ncert_path = \"{}\"\nkey_path = \"{}\"\n\
             {reconnect}{cluster_keys}",
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
            let metrics = free_addr();
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
    let addr = METRICS.lock().expect("metrics")[&edge.addr];
    metric_sum_at(addr, name).expect("metrics listener")
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
    connect(
        files,
        edge.addr,
        edge.token(user, 0),
        Duration::from_secs(10),
    )
    .await
}

/// A client of `token` connected through `addr`, resending refused sends quickly, that gives a
/// connection `welcome_timeout` for its `Welcome`.
async fn connect(
    files: &ClusterFiles,
    addr: SocketAddr,
    token: String,
    welcome_timeout: Duration,
) -> courier_client::Client {
    let mut options = ConnectOptions::new(addr, token, 0);
    options.retry_after = Duration::from_millis(100);
    options.welcome_timeout = welcome_timeout;
    tokio::time::timeout(EVENT_TIMEOUT, files.connector().connect(options))
        .await
        .expect("connected in time")
        .expect("connect")
}

/// Sends the bodies `"{n}"` for `numbers` from `client` to `to`, each acknowledged within
/// `EVENT_TIMEOUT` (`what` says when, for the failure message).
async fn send_numbered(
    client: &courier_client::Client,
    to: u64,
    numbers: std::ops::Range<usize>,
    what: &str,
) -> Vec<courier_client::SendReceipt> {
    let mut acked = Vec::new();
    for n in numbers {
        let receipt =
            tokio::time::timeout(EVENT_TIMEOUT, client.send(to, format!("{n}").into_bytes()))
                .await
                .unwrap_or_else(|_| panic!("acknowledged {what}"))
                .expect("ack");
        acked.push(receipt);
    }
    acked
}

/// Asserts that `client` receives the numbered bodies of `acked` (body `n` is `acked[n]`), each
/// once, in order, at its acknowledged seq, and nothing more.
async fn assert_numbered_delivered(
    client: &mut courier_client::Client,
    acked: &[courier_client::SendReceipt],
) {
    for (n, receipt) in acked.iter().enumerate() {
        let delivery = next_message(client).await;
        assert_eq!(
            (delivery.seq, delivery.body),
            (receipt.seq, format!("{n}").into_bytes())
        );
    }
    assert_quiet(client).await;
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

/// Once the links are up: Alice on edge 0, Bob on edge 1, and a first message from her to
/// him delivered. Returns their clients, Bob's id, and the first message's receipt.
async fn alice_to_bob_across(
    files: &ClusterFiles,
    edges: &[Edge],
) -> (
    courier_client::Client,
    courier_client::Client,
    u64,
    courier_client::SendReceipt,
) {
    wait_links_up(edges);
    let alice = user_homed_on(0, 0);
    let bob = user_homed_on(1, 0);
    let alice_client = client_via(files, &edges[0], alice).await;
    let mut bob_client = client_via(files, &edges[1], bob).await;
    let first = alice_client
        .send(bob, b"before".to_vec())
        .await
        .expect("acknowledged");
    assert_eq!(next_message(&mut bob_client).await.seq, first.seq);
    (alice_client, bob_client, bob, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_to_a_stopped_edge_are_retried_until_it_is_back() {
    let files = ClusterFiles::new();
    let (mut edges, _members) = start_cluster(&files);
    let (alice_client, mut bob_client, bob, first) = alice_to_bob_across(&files, &edges).await;

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

/// A peer that comes back and links to this edge is linked to again at once, not at the end
/// of this edge's reconnect backoff: sends to its users were refused as retryable for as long
/// as the backoff had grown (up to `link_reconnect_ms_max`, 30 s by default) after the peer
/// served them again. Here the backoff starts at 20 s, so a link made within seconds of the
/// restart shows the peer's hello cut it short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_links_again_is_linked_to_at_once_whatever_the_backoff() {
    let files = ClusterFiles::new();
    let (mut edges, _members) = start_cluster_with(
        &files,
        "link_reconnect_ms_min = 20000\nlink_reconnect_ms_max = 40000\n",
        "",
    );
    let (alice_client, mut bob_client, bob, first) = alice_to_bob_across(&files, &edges).await;

    let logged_before = edges[0].log.lock().expect("log").len();
    edges[1].kill9();
    // Both of edge 0's shards' links to edge 1 time out (5 s without an answer) and wait
    // their backoff.
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    let peer = format!("peer={}", EDGE_IDS[1]);
    while edges[0].log.lock().expect("log")[logged_before..]
        .iter()
        .filter(|line| line.contains("link down") && line.contains(&peer))
        .count()
        < 2
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "edge 0 never saw its link to edge 1 go down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sender = alice_client.sender();
    let pending = tokio::spawn(async move { sender.send(bob, b"during".to_vec()).await });
    edges[1].spawn();
    let restarted = tokio::time::Instant::now();
    let receipt = tokio::time::timeout(EVENT_TIMEOUT, pending)
        .await
        .expect("acknowledged once the edge is back")
        .expect("task")
        .expect("acknowledged");
    let took = restarted.elapsed();
    assert_eq!(receipt.seq, first.seq + 1);
    // The backoff alone would wait at least 15 s (20 s, jittered by up to a quarter) from
    // the link's fall; the restart and a link take a few.
    assert!(
        took < Duration::from_secs(12),
        "the send waited {took:?} after the restart: edge 0 waited out its backoff"
    );
    let delivery = next_message(&mut bob_client).await;
    assert_eq!(delivery.body, b"during".to_vec());
}

/// A link that never says hello is closed at `limits.hello_timeout_ms`, as a client without
/// `Hello` is: before, once its handshake was done nothing closed it, and its keep-alives held
/// a connection slot for good (with a cluster key, which a leak would hand out, every slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_never_says_hello_is_closed_at_the_hello_timeout() {
    let files = ClusterFiles::new();
    let (edges, _members) = start_cluster_with(&files, "", "\n[limits]\nhello_timeout_ms = 1000\n");
    let certs = |name: &str| -> Vec<rustls::pki_types::CertificateDer<'static>> {
        let pem = std::fs::read(files.path(name)).expect("certificate");
        rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<_, _>>()
            .expect("certificates")
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs("ca.pem") {
        roots.add(cert).expect("root");
    }
    // A member's own certificate and key: the CA signed them.
    let member = EDGE_IDS[1];
    let key_pem = std::fs::read(files.path(&format!("ca-{member}.key"))).expect("key");
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .expect("key")
        .expect("a key");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_client_auth_cert(certs(&format!("ca-{member}.pem")), key)
        .expect("client certificate");
    tls.alpn_protocols = vec![courier_protocol::link::LINK_ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(std::sync::Arc::new(tls))
        .expect("QUIC TLS config");
    let mut config = quinn::ClientConfig::new(std::sync::Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    // Kept alive, as a link is, so only the edge can end it.
    transport.keep_alive_interval(Some(Duration::from_millis(300)));
    transport.max_idle_timeout(Some(Duration::from_secs(60).try_into().expect("idle")));
    config.transport_config(std::sync::Arc::new(transport));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let connection = endpoint
        .connect_with(config, edges[0].addr, "courier-link")
        .expect("connect")
        .await
        .expect("the link's handshake");
    // It says nothing.
    let closed = tokio::time::timeout(Duration::from_secs(10), connection.closed())
        .await
        .expect("the edge closes a silent link");
    match &closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            let timed_out = u64::from(courier_protocol::ErrorCode::TimedOut.to_u16());
            assert_eq!(u64::from(close.error_code), timed_out, "{closed}");
        }
        other => panic!("expected the edge's close, got {other}"),
    }
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
        let mut acked = send_numbered(&alice_client, bob, 0..3, "in time").await;
        edges[1].kill9();
        // While edge 1 is dead its successor takes Bob over after the lease timeout.
        acked.extend(send_numbered(&alice_client, bob, 3..6, "once a successor serves Bob").await);
        edges[1].spawn();
        acked.extend(send_numbered(&alice_client, bob, 6..9, "after edge 1 is back").await);
        assert_numbered_delivered(&mut bob_client, &acked).await;
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

/// A client whose edge never answers (gone, with a resumed session's 0-RTT needing no answer
/// to start) gives up after `welcome_timeout`, saying so, instead of waiting out QUIC's idle
/// timeout; after a redirect it would then go back to its first address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_a_welcome_is_given_up() {
    let files = ClusterFiles::new();
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let mut options = ConnectOptions::new(silent.local_addr().expect("addr"), "token", 0);
    options.welcome_timeout = Duration::from_millis(500);
    let error = tokio::time::timeout(EVENT_TIMEOUT, files.connector().connect(options))
        .await
        .expect("given up in time")
        .expect_err("no edge answers");
    assert!(error.to_string().contains("no Welcome"), "{error}");
}

/// Takeover, drain and a rolling change of the members (decisions 0015 and 0016), end to end
/// where FoundationDB cannot run: three edges run in this test process on memory stores they
/// share, standing in for FoundationDB (`EdgeStore::SharedMemory`), with everything else real:
/// QUIC, shards, links, the lease thread, the SDK following redirects. A crash stops an
/// edge's executors and lease thread at once, without a close or a last commit, as `kill -9`
/// would; a fenced edge does the same instead of ending the process.
mod takeover_on_shared_memory {
    use super::*;
    use courier_core::store::memory::MemoryStore;
    use courier_edge::config::Config;
    use courier_edge::server::{Edge as EdgeProcess, EdgeStore};
    use std::sync::Arc;

    /// One at a time: every in-process edge's executor locks memory for io_uring, and the
    /// process's locked-memory limit is small.
    static IN_PROCESS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    const TAKEOVER: &str = "takeover = true\nlease_timeout_ms = 3000\nlease_renew_ms = 200\n";

    type Stores = Arc<Vec<Arc<MemoryStore>>>;

    /// An edge of the shared-store cluster: its files, and its running edge (while it runs).
    struct InProcess {
        id: u32,
        addr: SocketAddr,
        dir: tempfile::TempDir,
        running: Option<EdgeProcess>,
        metrics: SocketAddr,
        signing_key: PathBuf,
    }

    impl InProcess {
        fn config_path(&self) -> PathBuf {
            self.dir.path().join("courier.toml")
        }

        /// Writes its config: one shard, members and `cluster_keys` as given.
        fn write_config(
            &mut self,
            files: &ClusterFiles,
            members: &[(u32, SocketAddr)],
            keys: &str,
        ) {
            self.metrics = free_addr();
            let config = format!(
                "[server]\nlisten = \"{}\"\ndata_dir = \"{}\"\nshards = 1\npin_shards = false\n\n\
                 [control]\nenabled = false\n\n[metrics]\nlisten = \"{}\"\n\n",
                self.addr,
                self.dir.path().join("data").display(),
                self.metrics,
            ) + &files.config_with(self.id, "ca", members, keys);
            std::fs::write(self.config_path(), config).expect("write config");
        }

        fn start(&mut self, stores: &Stores) -> Result<(), String> {
            if std::env::var_os("COURIER_TEST_LOG").is_some() {
                let _ = tracing_subscriber::fmt()
                    .with_env_filter(std::env::var("COURIER_TEST_LOG").unwrap_or_default())
                    .with_test_writer()
                    .try_init();
            }
            // A metrics listener of an earlier start keeps its port: take a new one, whatever
            // port the config file names.
            let path = self.config_path();
            self.metrics = free_addr();
            let text: String = std::fs::read_to_string(&path)
                .expect("config")
                .split_inclusive('\n')
                .scan(false, |in_metrics, line| {
                    if line.starts_with('[') {
                        *in_metrics = line.trim() == "[metrics]";
                    }
                    Some(if *in_metrics && line.starts_with("listen = ") {
                        format!("listen = \"{}\"\n", self.metrics)
                    } else {
                        line.to_string()
                    })
                })
                .collect();
            std::fs::write(&path, &text).expect("config");
            // Parsed here and checked by `start`, which allows takeover on the shared store.
            let config = Config::parse(&text)?;
            let edge = tokio::task::block_in_place(|| {
                EdgeProcess::start(config, EdgeStore::SharedMemory(Arc::clone(stores)))
            })?;
            self.running = Some(edge);
            Ok(())
        }

        fn crash(&mut self) {
            if let Some(edge) = self.running.take() {
                tokio::task::block_in_place(|| edge.crash());
            }
        }

        /// SIGTERM's path: hand over, redirect, finish, stop.
        fn drain(&mut self) {
            let edge = self.running.take().expect("running");
            tokio::task::block_in_place(|| {
                edge.shut_down().expect("every shard finished");
                edge.join();
            });
        }

        fn fenced(&self) -> bool {
            self.running.as_ref().is_some_and(|edge| edge.fenced())
        }

        /// A token from the cluster's signing key (through a config of its own: the edge's
        /// has takeover on a store that only this process shares, which the CLI refuses).
        fn token(&self, user: u64) -> String {
            let token_config = self.dir.path().join("token.toml");
            std::fs::write(
                &token_config,
                format!(
                    "[auth]\nsigning_key_path = \"{}\"\n",
                    self.signing_key.display()
                ),
            )
            .expect("write token config");
            let output = Command::new(env!("CARGO_BIN_EXE_courier-edge"))
                .args(["token", "--config"])
                .arg(&token_config)
                .args(["--user", &user.to_string()])
                .output()
                .expect("run courier-edge token");
            assert!(output.status.success(), "{output:?}");
            String::from_utf8(output.stdout)
                .expect("utf-8")
                .trim()
                .to_string()
        }

        /// The sum of a metric's series on its `/metrics` (0 while it cannot be reached).
        fn metric_sum(&self, name: &str) -> f64 {
            metric_sum_at(self.metrics, name).unwrap_or(0.0)
        }
    }

    impl Drop for InProcess {
        fn drop(&mut self) {
            if let Some(edge) = self.running.take() {
                edge.crash();
            }
        }
    }

    /// The three edges of `EDGE_IDS`, each with its config (members: all three unless
    /// `members` says which), none started.
    fn cluster(files: &ClusterFiles, ids: &[u32], keys: &str) -> Vec<InProcess> {
        let members: Vec<(u32, SocketAddr)> =
            EDGE_IDS.iter().map(|id| (*id, free_addr())).collect();
        EDGE_IDS
            .iter()
            .zip(&members)
            .map(|(id, (_, addr))| {
                let mut edge = InProcess {
                    id: *id,
                    addr: *addr,
                    dir: tempfile::tempdir().expect("temp dir"),
                    running: None,
                    metrics: "127.0.0.1:1".parse().expect("addr"),
                    signing_key: files.path("signing.key"),
                };
                let listed: Vec<(u32, SocketAddr)> = members
                    .iter()
                    .filter(|(member, _)| ids.contains(member))
                    .copied()
                    .collect();
                edge.write_config(files, &listed, keys);
                edge
            })
            .collect()
    }

    fn members_of(edges: &[InProcess], ids: &[u32]) -> Vec<(u32, SocketAddr)> {
        edges
            .iter()
            .filter(|edge| ids.contains(&edge.id))
            .map(|edge| (edge.id, edge.addr))
            .collect()
    }

    /// Waits until every running edge has a link up to each of the `peers` others.
    fn wait_links(edges: &[InProcess], peers: usize) {
        let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
        while !edges
            .iter()
            .filter(|edge| edge.running.is_some())
            .all(|edge| edge.metric_sum("courier_links_up") >= peers as f64)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "links did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    async fn client_via(
        files: &ClusterFiles,
        edge: &InProcess,
        user: u64,
    ) -> courier_client::Client {
        client_waiting(files, edge, user, Duration::from_secs(10)).await
    }

    /// A client that gives a connection `welcome_timeout` for its `Welcome`.
    async fn client_waiting(
        files: &ClusterFiles,
        edge: &InProcess,
        user: u64,
        welcome_timeout: Duration,
    ) -> courier_client::Client {
        connect(files, edge.addr, edge.token(user), welcome_timeout).await
    }

    /// Waits until a running edge serves another's users (its gauge is published about once
    /// a second).
    fn wait_for_a_guest(edges: &[InProcess]) {
        let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
        while !edges
            .iter()
            .any(|edge| edge.running.is_some() && edge.metric_sum("courier_guest_edges") > 0.0)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "no edge serves another's users"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Ends the test binary if a test hangs (in-process edges have no process to kill): CI
    /// fails instead of waiting forever.
    struct Watchdog(Arc<std::sync::atomic::AtomicBool>);

    impl Watchdog {
        fn start() -> Watchdog {
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let watched = Arc::clone(&done);
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                while started.elapsed() < Duration::from_secs(180) {
                    if watched.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                eprintln!("an in-process cluster test hung for 180 s: ending the test binary");
                std::process::abort();
            });
            Watchdog(done)
        }
    }

    impl Drop for Watchdog {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn shared_stores() -> Stores {
        Arc::new(vec![Arc::new(MemoryStore::new())])
    }

    /// The three edges with takeover on, started on `stores` and linked to each other.
    fn started_cluster(files: &ClusterFiles, stores: &Stores) -> Vec<InProcess> {
        started_cluster_with(files, stores, |config| config)
    }

    /// [`started_cluster`] with each edge's config file changed by `edit` first.
    fn started_cluster_with(
        files: &ClusterFiles,
        stores: &Stores,
        edit: impl Fn(String) -> String,
    ) -> Vec<InProcess> {
        let mut edges = cluster(files, &EDGE_IDS, TAKEOVER);
        for edge in &mut edges {
            let config = std::fs::read_to_string(edge.config_path()).expect("config");
            std::fs::write(edge.config_path(), edit(config)).expect("config");
            edge.start(stores).expect("start");
        }
        wait_links(&edges, 2);
        edges
    }

    /// Alice (edge 0) writes to Bob (edge 1) across Bob's edge crashing: his successor serves
    /// him until his edge is back, and every acknowledged message arrives once, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crashed_edge_is_taken_over_and_given_back_without_loss() {
        let _one_at_a_time = IN_PROCESS.lock().await;
        let _watchdog = Watchdog::start();
        let files = ClusterFiles::new();
        let stores = shared_stores();
        let mut edges = started_cluster(&files, &stores);
        let alice = user_homed_on(0, 0);
        let bob = user_homed_on(1, 0);
        // Both start at edge 2: the address a client falls back to when its edge is gone.
        let alice_client = client_via(&files, &edges[2], alice).await;
        let mut bob_client = client_via(&files, &edges[2], bob).await;
        let mut acked = send_numbered(&alice_client, bob, 0..3, "in time").await;
        edges[1].crash();
        acked.extend(send_numbered(&alice_client, bob, 3..6, "once a successor serves Bob").await);
        wait_for_a_guest(&edges);
        edges[1].start(&stores).expect("restart");
        acked.extend(send_numbered(&alice_client, bob, 6..9, "after edge 1 is back").await);
        assert_numbered_delivered(&mut bob_client, &acked).await;
    }

    /// A purge the edge refuses logs no one out. Bob's edge is down and a successor serves
    /// him; a purge of Bob run there is refused (his own edge purges him once it is back).
    /// Before, the control socket disconnected Bob's devices first, with the code the SDK
    /// gives up on, and only then asked, so the refused purge logged him out for good.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_purge_disconnects_no_one() {
        use courier_edge::control::{Answer, Command as Control};
        let _one_at_a_time = IN_PROCESS.lock().await;
        let _watchdog = Watchdog::start();
        let files = ClusterFiles::new();
        let stores = shared_stores();
        let mut edges = started_cluster_with(&files, &stores, |config| {
            config.replace(
                "[control]\nenabled = false\n",
                "[control]\nenabled = true\n",
            )
        });
        let alice = user_homed_on(0, 3);
        let bob = user_homed_on(1, 3);
        edges[1].crash();
        wait_for_a_guest(&edges);
        let successor = edges
            .iter()
            .position(|edge| edge.running.is_some() && edge.metric_sum("courier_guest_edges") > 0.0)
            .expect("a successor");
        let mut bob_client = client_via(&files, &edges[successor], bob).await;
        let socket = edges[successor]
            .dir
            .path()
            .join("data")
            .join("control.sock");
        let answer = tokio::task::block_in_place(|| {
            courier_edge::control::request(&socket, &Control::Purge { user: bob })
        });
        let Ok(Answer::Error { message }) = answer else {
            panic!("the successor refuses a purge of a guest's user: {answer:?}");
        };
        assert!(message.contains("no connection was closed"), "{message}");
        // Bob is still connected: Alice's next message reaches him.
        let alice_client = client_via(&files, &edges[0], alice).await;
        let sent = alice_client
            .send(bob, b"still here".to_vec())
            .await
            .expect("ack");
        let delivery = next_message(&mut bob_client).await;
        assert_eq!(delivery.seq, sent.seq);
    }

    /// A drain of Bob's edge hands him to its successor: his client is redirected there, and
    /// Alice's messages keep being acknowledged and delivered, once each.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drained_edge_redirects_its_clients_to_its_successor() {
        let _one_at_a_time = IN_PROCESS.lock().await;
        let _watchdog = Watchdog::start();
        let files = ClusterFiles::new();
        let stores = shared_stores();
        let mut edges = started_cluster(&files, &stores);
        let alice = user_homed_on(0, 1);
        let bob = user_homed_on(1, 1);
        let alice_client = client_via(&files, &edges[0], alice).await;
        // Bob's client would wait out a connection to the drained edge for longer than the
        // test: the drain must send him where he is served at once.
        let mut bob_client = client_waiting(&files, &edges[2], bob, 2 * EVENT_TIMEOUT).await;
        let before = alice_client
            .send(bob, b"before".to_vec())
            .await
            .expect("ack");
        let before_delivery = next_message(&mut bob_client).await;
        assert_eq!(before_delivery.seq, before.seq);
        edges[1].drain();
        let after = tokio::time::timeout(EVENT_TIMEOUT, alice_client.send(bob, b"after".to_vec()))
            .await
            .expect("acknowledged by the successor")
            .expect("ack");
        assert_eq!(after.seq, before.seq + 1);
        // Bob's client followed the redirect to the successor, which delivers. Sent back to
        // the drained edge instead, he would wait out QUIC's idle timeout (30 s) first: the
        // bound tells the two apart with room to spare on a slow machine.
        let delivery = tokio::time::timeout(Duration::from_secs(20), bob_client.recv_message())
            .await
            .expect("delivered without waiting out a connection to the drained edge")
            .expect("client open");
        assert_eq!(
            (delivery.seq, delivery.body.as_slice()),
            (after.seq, &b"after"[..])
        );
        assert_quiet(&mut bob_client).await;
        wait_for_a_guest(&edges);
    }

    /// Expiry runs on one shard of one edge of the shared store, and empties inboxes of every
    /// edge; each must be forgotten by its home edge (decision 0011), which only hears of it
    /// by listing the emptied inboxes itself. Before, the inboxes of the other edges kept their
    /// counter and `g` record for good (R4).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn inboxes_expiry_empties_are_forgotten_on_every_edge() {
        use courier_core::keys;
        use courier_core::store::{Store, Transaction};
        let _one_at_a_time = IN_PROCESS.lock().await;
        let _watchdog = Watchdog::start();
        let files = ClusterFiles::new();
        let stores = shared_stores();
        let edges = started_cluster_with(&files, &stores, |config| {
            config + "\n[retention]\nexpiry_interval_secs = 1\nexpiry_bucket_secs = 1\n"
        });
        let alice = user_homed_on(0, 2);
        let alice_client = client_via(&files, &edges[0], alice).await;
        let recipients: Vec<u64> = (0..EDGE_IDS.len())
            .map(|edge| user_homed_on(edge, 2))
            .collect();
        for (client_id, to) in (1..).zip(&recipients) {
            alice_client
                .send_with_id(client_id, *to, b"short-lived".to_vec(), Some(1))
                .await
                .expect("ack");
        }
        let left = || {
            let mut txn = stores[0].begin_read().expect("read");
            let counters: Vec<u64> = recipients
                .iter()
                .copied()
                .filter(|inbox| txn.get(&keys::counter(*inbox)).expect("read").is_some())
                .collect();
            let (start, end) = keys::tag_range(keys::TAG_EMPTIED);
            let emptied = txn.get_range(&start, &end, 100).expect("read").len();
            (counters, emptied)
        };
        assert_eq!(left().0, recipients, "each inbox has its counter");
        let deadline = std::time::Instant::now() + 2 * EVENT_TIMEOUT;
        while left() != (Vec::new(), 0) {
            assert!(
                std::time::Instant::now() < deadline,
                "counters of emptied inboxes left, and emptied records: {:?}",
                left()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The members change one edge at a time (decision 0016): edge 33 joins a cluster of 11 and
    /// 22 with a raised `membership_epoch`. The first edge on the new epoch fences the two on
    /// the old one at once; one restarted on its old config is refused; restarted on the new
    /// config they serve again, and users who moved to edge 33 lose nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rolling_change_of_the_members_fences_the_edges_on_the_old_ones() {
        let _one_at_a_time = IN_PROCESS.lock().await;
        let _watchdog = Watchdog::start();
        let files = ClusterFiles::new();
        let stores = shared_stores();
        let old = [EDGE_IDS[0], EDGE_IDS[1]];
        let mut edges = cluster(
            &files,
            &old,
            "lease_timeout_ms = 3000\nlease_renew_ms = 200\n",
        );
        edges[0].start(&stores).expect("start");
        edges[1].start(&stores).expect("start");
        wait_links(&edges, 1);
        // Carol moves from edge 11 or 22 to edge 33 with the change; Dave writes to her.
        let carol = (1..)
            .find(|user| home_edge(*user, &EDGE_IDS) == EDGE_IDS[2])
            .expect("a user of edge 33");
        let dave = user_homed_on(0, 0);
        let dave_client = client_via(&files, &edges[0], dave).await;
        let mut carol_client = client_via(&files, &edges[0], carol).await;
        let mut acked = send_numbered(&dave_client, carol, 0..3, "in time").await;

        // The operator raises the epoch with the new members in every config, and starts 33.
        let new_keys = "lease_timeout_ms = 3000\nlease_renew_ms = 200\nmembership_epoch = 2\n";
        let all = members_of(&edges, &EDGE_IDS);
        let stale_config = std::fs::read_to_string(edges[0].config_path()).expect("config");
        for edge in &mut edges {
            edge.write_config(&files, &all, new_keys);
        }
        edges[2]
            .start(&stores)
            .expect("the first edge on the new members starts");
        let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
        while !(edges[0].fenced() && edges[1].fenced()) {
            assert!(
                std::time::Instant::now() < deadline,
                "the edges on the old members were not fenced"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        edges[0].crash();
        edges[1].crash();

        // Edge 11 restarted on its old config is refused, and says what to do.
        std::fs::write(edges[0].config_path(), &stale_config).expect("config");
        let refused = edges[0]
            .start(&stores)
            .expect_err("a stale config is refused");
        assert!(refused.contains("membership_epoch"), "{refused}");
        for edge in &mut edges[..2] {
            edge.write_config(&files, &all, new_keys);
            edge.start(&stores).expect("restart on the new members");
        }
        wait_links(&edges, 2);
        acked.extend(send_numbered(&dave_client, carol, 3..6, "on the new members").await);
        assert_numbered_delivered(&mut carol_client, &acked).await;
    }
}

/// With `cluster.link_certificates_name_the_edge`, edges whose certificates name them link and
/// carry messages as before (the dialing side checks the accepting edge's name, the accepting
/// side the name the dialer's `Hello` claims).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_whose_certificates_name_them_link_and_carry_messages() {
    let files = ClusterFiles::new();
    let ids = [11u32, 22];
    files.make_ca_naming("named", &[(11, Some(11)), (22, Some(22))]);
    let members: Vec<(u32, SocketAddr)> = ids.iter().map(|id| (*id, free_addr())).collect();
    let edges: Vec<Edge> = members
        .iter()
        .map(|(id, addr)| {
            let config = files.config_with(
                *id,
                "named",
                &members,
                "link_certificates_name_the_edge = true\n",
            );
            Edge::start_on(*addr, 1, None, &config, &[])
        })
        .collect();
    let homed_on = |edge: u32| {
        (1..)
            .find(|user| home_edge(*user, &ids) == edge)
            .expect("a user")
    };
    let (alice, bob) = (homed_on(11), homed_on(22));
    let alice_client = client_via(&files, &edges[0], alice).await;
    let mut bob_client = client_via(&files, &edges[1], bob).await;
    let acked = send_numbered(&alice_client, bob, 0..3, "across the named link").await;
    assert_numbered_delivered(&mut bob_client, &acked).await;
}

/// With names per edge, a certificate that names another edge links nowhere: the edge that
/// dials it finds the wrong name at the handshake, and the edge it dials refuses its `Hello`
/// for an edge its certificate does not name. (Here edge 22 itself has the setting off, so it
/// starts with a certificate naming edge 44; with it on it would refuse to start.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_naming_another_edge_links_nowhere() {
    let files = ClusterFiles::new();
    files.make_ca_naming("named", &[(11, Some(11)), (22, Some(44))]);
    let members = [(11u32, free_addr()), (22u32, free_addr())];
    let checking = files.config_with(
        11,
        "named",
        &members,
        "link_certificates_name_the_edge = true\n",
    );
    let lying = files.config_with(22, "named", &members, "");
    let edges = [
        Edge::start_on(members[0].1, 1, None, &checking, &[]),
        Edge::start_on(members[1].1, 1, None, &lying, &[]),
    ];
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Edge 11's link to 22 fails its handshake. (Edge 22's to 11 completes its handshake, and
    // 22 logs it up, before 11 reads its Hello and closes it.)
    let log = edges[0].log.lock().expect("log").clone();
    assert!(
        !log.iter().any(|line| line.contains("link up")),
        "edge 11 linked to a certificate naming edge 44: {:?}",
        log.iter().rev().take(20).collect::<Vec<_>>()
    );
    let refused = edges[0]
        .log
        .lock()
        .expect("log")
        .iter()
        .any(|line| line.contains("its certificate names"));
    assert!(
        refused,
        "edge 11 refused the Hello of a certificate naming edge 44"
    );
}
