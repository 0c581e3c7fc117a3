//! Issue 11: one abusive client cannot hurt the others. Deadlines for `Hello` and for a started
//! frame, send budgets, the limit on unauthenticated connections, and QUIC Retry, each against
//! the real `courier-edge` binary (see `common`). None asserts on speed.

mod common;

use std::time::Duration;

use common::{EVENT_TIMEOUT, Edge};
use courier_client::ClientError;
use courier_client::raw::RawConnection;
use courier_protocol::{ErrorCode, Frame};

/// How long a test waits for the edge to act on a deadline of a few hundred ms.
const DEADLINE_GRACE: Duration = Duration::from_secs(10);

/// A fresh client of `user` sends to `to` and is acknowledged in time: what a test checks after
/// an attack, that everyone else is still served.
async fn a_send_is_acknowledged(edge: &Edge, user: u64, to: u64, body: &[u8]) {
    let client = edge.client(user).await;
    let receipt = tokio::time::timeout(EVENT_TIMEOUT, client.send(to, body.to_vec()))
        .await
        .expect("answered in time")
        .expect("acknowledged");
    assert!(receipt.seq > 0);
}

/// `sends` Send frames to `to`, client ids 1 to `sends`, back to back: what a pipelining
/// client writes at once.
fn send_burst(sends: u64, to: u64, body: &[u8]) -> Vec<u8> {
    let mut burst = Vec::new();
    for client_id in 1..=sends {
        let frame = Frame::Send {
            client_id,
            to,
            body: body.to_vec(),
            ttl_secs: None,
        };
        burst.extend(courier_protocol::encode_to_vec(&frame).expect("encode"));
    }
    burst
}

async fn closed_code(raw: &RawConnection) -> Option<ErrorCode> {
    let error = tokio::time::timeout(DEADLINE_GRACE, raw.closed())
        .await
        .expect("the edge closes the connection in time");
    match error {
        ClientError::Closed { code, .. } => code,
        other => panic!("closed without an application code: {other:?}"),
    }
}

/// A client that finishes the handshake and never says `Hello` is closed once
/// `hello_timeout_ms` has passed, with a reason about its input; a client that logs in on time
/// is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_hello_is_closed_after_the_hello_timeout() {
    let edge = Edge::start_with(1, "[limits]\nhello_timeout_ms = 300\n", &[]);
    let connector = edge.connector();
    let silent = RawConnection::connect(&connector, edge.addr)
        .await
        .expect("handshake");
    let mut on_time = edge.raw_session(&connector, 5, 0).await;
    let close = tokio::time::timeout(DEADLINE_GRACE, silent.closed())
        .await
        .expect("closed in time");
    match close {
        ClientError::Closed { code, reason } => {
            assert_eq!(code, Some(ErrorCode::TimedOut));
            assert!(reason.contains("no Hello within"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // The logged-in connection outlives the deadline.
    tokio::time::sleep(Duration::from_millis(600)).await;
    on_time
        .write_frame(&Frame::Ping { nonce: 1 })
        .await
        .expect("ping");
    let pong = tokio::time::timeout(EVENT_TIMEOUT, on_time.read_frame())
        .await
        .expect("pong in time")
        .expect("still open");
    assert_eq!(pong, Frame::Pong { nonce: 1 });
}

/// A frame whose length prefix arrived and whose body never does closes its connection after
/// `frame_timeout_ms`; a connection sending whole frames slowly stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_left_unfinished_closes_its_connection() {
    let edge = Edge::start_with(1, "[limits]\nframe_timeout_ms = 300\n", &[]);
    let connector = edge.connector();
    let mut stalled = edge.raw_session(&connector, 6, 0).await;
    let mut slow = edge.raw_session(&connector, 7, 0).await;
    let ping = courier_protocol::encode_to_vec(&Frame::Ping { nonce: 2 }).expect("encode");
    // The prefix and one byte of the body.
    stalled
        .write_bytes(&ping[..courier_protocol::LENGTH_PREFIX_BYTES + 1])
        .await
        .expect("partial frame");
    for nonce in 0..6 {
        slow.write_frame(&Frame::Ping { nonce })
            .await
            .expect("ping");
        let pong = slow.read_frame().await.expect("slow client stays open");
        assert_eq!(pong, Frame::Pong { nonce });
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Retryable: an honest client on a slow link meets the deadline too, and reconnects.
    let code = closed_code(&stalled).await.expect("a code");
    assert_eq!(code, ErrorCode::TimedOut);
    assert!(!courier_protocol::client::is_fatal_code(code));
}

/// The frame timeout is per frame: a client whose every write finishes one frame and starts
/// the next (a phone uploading large messages back to back: its reads almost never end on a
/// frame's boundary) stays open while each frame comes within the timeout, however long the
/// whole goes on. Before, the timeout ran from the first frame's start and closed such a client
/// with a fatal `Malformed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_writes_end_mid_frame_stays_while_each_frame_is_on_time() {
    let edge = Edge::start_with(1, "[limits]\nframe_timeout_ms = 300\n", &[]);
    let connector = edge.connector();
    let mut uploader = edge.raw_session(&connector, 6, 0).await;
    let frames: Vec<Vec<u8>> = (0..8)
        .map(|nonce| courier_protocol::encode_to_vec(&Frame::Ping { nonce }).expect("encode"))
        .collect();
    let split = courier_protocol::LENGTH_PREFIX_BYTES + 1;
    uploader
        .write_bytes(&frames[0][..split])
        .await
        .expect("the first frame's start");
    // Each write ends frame `nonce` and starts the next; 7 writes 150 ms apart, 1 s in all.
    for nonce in 0..7u64 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let mut write = frames[nonce as usize][split..].to_vec();
        write.extend_from_slice(&frames[nonce as usize + 1][..split]);
        uploader
            .write_bytes(&write)
            .await
            .expect("the rest and the next start");
        let pong = uploader.read_frame().await.expect("stays open");
        assert_eq!(pong, Frame::Pong { nonce });
    }
}

/// `limits.handshakes_per_address_max` counts a connection from its first packet until its
/// `Hello` is accepted, not only while its handshake runs: one address cannot hold the
/// shard's unauthenticated connections by finishing handshakes and saying nothing. Once a
/// connection logs in it no longer counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_hello_count_against_their_address() {
    let edge = Edge::start_with(1, "[limits]\nhandshakes_per_address_max = 3\n", &[]);
    let connector = edge.connector();
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(
            RawConnection::connect(&connector, edge.addr)
                .await
                .expect("within the address's limit"),
        );
    }
    let refused = RawConnection::connect(&connector, edge.addr).await;
    assert!(
        refused.is_err(),
        "a fourth connection without Hello from the address is refused"
    );
    // One of them logs in: its place is free again.
    let mut first = silent.remove(0);
    first
        .write_frame(&Frame::Hello {
            token: edge.token(31, 0).into_bytes(),
            device: 0,
            acked_up_to: 0,
            resume_after_seq: 0,
        })
        .await
        .expect("Hello");
    let welcome = first.read_frame().await.expect("Welcome");
    assert!(matches!(welcome, Frame::Welcome { .. }), "{welcome:?}");
    RawConnection::connect(&connector, edge.addr)
        .await
        .expect("room again once one logged in");
}

/// A connection that pipelines sends past its budget gets a retryable `Overloaded` and is then
/// slowed: the edge stops reading it until the budget refills, so most of the burst waits in
/// flow control instead of being decoded and refused. Another user's send on the same shard is
/// acknowledged at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_over_its_budget_is_refused_then_slowed_and_others_still_send() {
    let edge = Edge::start_with(
        1,
        "[limits.send_per_connection]\nmessages_per_sec = 1\nmessages_burst = 5\n\
         bytes_per_sec = 0\nbytes_burst = 0\n",
        &[],
    );
    let connector = edge.connector();
    let mut flooder = edge.raw_session(&connector, 8, 0).await;
    let sends = 30u64;
    let burst = send_burst(sends, 9, b"flood");
    flooder.write_bytes(&burst).await.expect("flood");
    let (mut acked, mut refused) = (0u64, 0u64);
    // Two seconds of answers: the burst of 5, a refusal, then about one send per second.
    let window = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(frame) = tokio::time::timeout_at(window, flooder.read_frame()).await {
        match frame.expect("open") {
            Frame::SendAck { .. } => acked += 1,
            Frame::SendError {
                code: ErrorCode::Overloaded,
                retryable: true,
                ..
            } => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        (5..=8).contains(&acked) && refused >= 1,
        "the burst passes, then sends are refused: {acked} acked, {refused} refused"
    );
    assert!(
        acked + refused < sends / 2,
        "the rest waits unread instead of being refused: {acked} acked, {refused} refused"
    );
    // Another user's send is acknowledged.
    a_send_is_acknowledged(&edge, 10, 9, b"hello").await;
}

/// A connection with the maximum of sends in flight is not read until one is answered: a
/// pipelining client waits in flow control, and every send is eventually acknowledged without
/// a single `TooManyInFlight` beyond the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelining_client_is_held_back_at_its_in_flight_limit() {
    let edge = Edge::start_with(1, "[limits]\nsends_in_flight_per_connection_max = 2\n", &[]);
    let connector = edge.connector();
    let mut pipeliner = edge.raw_session(&connector, 14, 0).await;
    let sends = 200u64;
    let burst = send_burst(sends, 15, &[1; 100]);
    pipeliner.write_bytes(&burst).await.expect("pipeline");
    let (mut acked, mut too_many) = (0u64, 0u64);
    while acked + too_many < sends {
        let frame = tokio::time::timeout(EVENT_TIMEOUT, pipeliner.read_frame())
            .await
            .expect("an answer in time")
            .expect("open");
        match frame {
            Frame::SendAck { .. } => acked += 1,
            Frame::SendError {
                code: ErrorCode::TooManyInFlight,
                ..
            } => too_many += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    // Each refusal pauses the input until an answer: at most one refusal per answer, far
    // fewer than without the pause (where every send past the second in a burst is refused).
    assert!(
        too_many <= acked,
        "{acked} acked, {too_many} refused with TooManyInFlight"
    );
    assert!(acked >= sends / 2, "{acked} acked, {too_many} refused");
}

/// Past `unauthenticated_connections_per_shard_max` connections without `Hello`, new
/// connections are refused; once one logs in there is room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_have_their_own_limit() {
    let edge = Edge::start_with(
        1,
        "[limits]\nunauthenticated_connections_per_shard_max = 3\n",
        &[],
    );
    let connector = edge.connector();
    let mut waiting = Vec::new();
    for _ in 0..3 {
        waiting.push(
            RawConnection::connect(&connector, edge.addr)
                .await
                .expect("under the limit"),
        );
    }
    let refused = RawConnection::connect(&connector, edge.addr).await;
    assert!(
        refused.is_err(),
        "a fourth connection without Hello is refused"
    );
    // One of them logs in: it no longer counts.
    let mut first = waiting.remove(0);
    first
        .write_frame(&Frame::Hello {
            token: edge.token(11, 0).into_bytes(),
            device: 0,
            acked_up_to: 0,
            resume_after_seq: 0,
        })
        .await
        .expect("hello");
    assert!(matches!(
        first.read_frame().await.expect("welcome"),
        Frame::Welcome { .. }
    ));
    RawConnection::connect(&connector, edge.addr)
        .await
        .expect("room again after a login");
}

/// Above `retry_above_unauthenticated`, a new client must prove its address with a QUIC Retry
/// first; a real client does so by itself and logs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_retry_threshold_clients_still_connect_through_a_retry() {
    let edge = Edge::start_with(1, "[limits]\nretry_above_unauthenticated = 1\n", &[]);
    let connector = edge.connector();
    let _waiting = RawConnection::connect(&connector, edge.addr)
        .await
        .expect("first connection");
    a_send_is_acknowledged(&edge, 12, 13, b"after retry").await;
}

/// Before `Hello` only a `Hello` fits: a connection whose first frame announces more is closed
/// at once with `FrameTooLarge`, before the edge buffers its body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_frame_before_hello_is_refused_at_its_length_prefix() {
    let edge = Edge::start(1);
    let connector = edge.connector();
    let mut raw = RawConnection::connect(&connector, edge.addr)
        .await
        .expect("handshake");
    let send = courier_protocol::encode_to_vec(&Frame::Send {
        client_id: 1,
        to: 2,
        body: vec![0; courier_protocol::BODY_BYTES_MAX],
        ttl_secs: None,
    })
    .expect("encode");
    // Only the length prefix: the edge decides on it alone.
    raw.write_bytes(&send[..courier_protocol::LENGTH_PREFIX_BYTES])
        .await
        .expect("prefix");
    let close = tokio::time::timeout(DEADLINE_GRACE, raw.closed())
        .await
        .expect("closed in time");
    match close {
        ClientError::Closed { code, reason } => {
            assert_eq!(code, Some(ErrorCode::FrameTooLarge));
            assert!(reason.contains("must be a Hello"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

/// Near its memory ceiling the edge refuses new connections instead of growing past it, and
/// once they are gone (and the heap trimmed) it accepts new ones again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_refuses_new_connections_near_its_memory_ceiling_and_recovers() {
    let ceiling_bytes: u64 = 64 * 1024 * 1024;
    let edge = Edge::start_with(
        2,
        &format!(
            "[limits]\nmemory_bytes_max = {ceiling_bytes}\nhello_timeout_ms = 120000\n\
             unauthenticated_connections_per_shard_max = 100000\n"
        ),
        &[],
    );
    let connectors: Vec<_> = (0..8).map(|_| edge.connector()).collect();
    let mut held = Vec::new();
    let mut refused = false;
    let mut peak_rss = 0;
    'open: for round in 0..200 {
        let mut attempts = tokio::task::JoinSet::new();
        for i in 0..32 {
            let connector = connectors[(round * 32 + i) % connectors.len()].clone();
            let addr = edge.addr;
            attempts.spawn(async move { RawConnection::connect(&connector, addr).await });
        }
        while let Some(result) = attempts.join_next().await {
            match result.expect("task") {
                Ok(raw) => held.push(raw),
                Err(_) => refused = true,
            }
        }
        peak_rss = peak_rss.max(edge.rss_bytes());
        if refused {
            break 'open;
        }
    }
    assert!(
        refused,
        "no connection was refused: {} held, edge at {} MiB",
        held.len(),
        edge.rss_bytes() / (1024 * 1024)
    );
    assert!(
        peak_rss <= ceiling_bytes,
        "the edge grew to {} MiB, past its ceiling of {} MiB",
        peak_rss / (1024 * 1024),
        ceiling_bytes / (1024 * 1024)
    );
    // Everything goes away; the edge frees the connections, trims, and takes new ones.
    for raw in &held {
        raw.connection.close(0u32.into(), b"done");
    }
    drop(held);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if RawConnection::connect(&connectors[0], edge.addr)
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still refusing a minute after the load left (edge at {} MiB)",
            edge.rss_bytes() / (1024 * 1024)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// With `recipients_must_exist`, a send to a user that never logged in is refused for good
/// with `BadRecipient`, and once that user has logged in the same sender reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_recipients_must_exist_only_known_users_can_be_messaged() {
    let edge = Edge::start_with(2, "[limits]\nrecipients_must_exist = true\n", &[]);
    let sender = edge.client(30).await;
    let refused = tokio::time::timeout(EVENT_TIMEOUT, sender.send(31, b"anyone?".to_vec()))
        .await
        .expect("answered in time");
    assert_eq!(
        refused.as_ref().err().and_then(|e| e.code()),
        Some(ErrorCode::BadRecipient),
        "{refused:?}"
    );
    let recipient = edge.client(31).await;
    let receipt = tokio::time::timeout(EVENT_TIMEOUT, sender.send(31, b"hello".to_vec()))
        .await
        .expect("answered in time")
        .expect("a user that logged in can be messaged");
    assert!(receipt.seq > 0);
    drop(recipient);
}

/// A ClientHello the edge refuses (here: an application protocol it does not speak) fails the
/// connection in its first packet. The client must hear why at once, in a CONNECTION_CLOSE
/// protected with the Initial keys (the vendored quinn-proto derives them again for that
/// close, having handed its first copy to the connection), rather than wait out its idle
/// timeout; and the edge goes on serving everyone else. (The ClientHello, with ring's X25519
/// share, fits in the first Initial packet, so the refusal comes from that packet's handling,
/// the path the patch changed; a hybrid post-quantum share would span two packets.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hello_the_edge_refuses_is_answered_with_a_close_at_once() {
    let edge = Edge::start(1);
    let pem = std::fs::read(edge.data_dir.join("tls/cert.pem")).expect("dev cert");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.expect("certificate")).expect("root");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"not-courier".to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(std::sync::Arc::new(tls))
        .expect("QUIC TLS config");
    let mut config = quinn::ClientConfig::new(std::sync::Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    // Long enough that a missing close shows as a timeout, not as this error.
    transport.max_idle_timeout(Some(Duration::from_secs(60).try_into().expect("idle")));
    config.transport_config(std::sync::Arc::new(transport));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");

    let connecting = endpoint
        .connect_with(config, edge.addr, "localhost")
        .expect("connect");
    let error = tokio::time::timeout(EVENT_TIMEOUT, connecting)
        .await
        .expect("the edge answers the refused handshake with a close, in time")
        .expect_err("no application protocol in common");
    // TLS alert 120, no_application_protocol, as QUIC's CRYPTO_ERROR range carries it.
    match &error {
        quinn::ConnectionError::ConnectionClosed(close) => {
            assert_eq!(u64::from(close.error_code), 0x100 + 120, "{error}");
        }
        other => panic!("expected the edge's CONNECTION_CLOSE, got {other}"),
    }

    a_send_is_acknowledged(&edge, 21, 22, b"still served").await;
}

/// Handshakes that never go on, sent with another client's source address (spoofed, so they
/// never see an answer), cannot lock that client out: once an address holds half its
/// `handshakes_per_address_max`, its new connections must first prove the address with a
/// QUIC Retry, which spoofed ones never do and a real client does at once. Before, the
/// spoofer's Initials took the whole budget, and the real client was refused for as long as
/// they stayed (`hello_timeout_ms`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_handshakes_cannot_fill_another_addresss_budget() {
    let edge = Edge::start_with(1, "[limits]\nhandshakes_per_address_max = 4\n", &[]);
    let connector = edge.connector();
    // Sixteen first datagrams from the victim's address (loopback, other ports), each of a
    // handshake that never goes on.
    for _ in 0..16 {
        let datagram =
            courier_client::raw::initial_datagram(&connector, edge.addr).expect("an Initial");
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket.send_to(&datagram, edge.addr).expect("send");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The real client from the same address is let in, and logs in.
    tokio::time::timeout(EVENT_TIMEOUT, edge.raw_session(&connector, 41, 0))
        .await
        .expect("the real client logs in in time");
}

/// The edge takes no QUIC DATAGRAM frames: it never reads them, so had it advertised them
/// (quinn's default), a client could have filled quinn's queue of unread ones (1.25 MB per
/// connection, each entry holding its whole packet) for as long as it stayed connected,
/// outside every limit of the edge. Unadvertised, the client's quinn refuses to send one, and
/// a DATAGRAM frame sent anyway is a protocol violation that closes only its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_takes_no_quic_datagrams() {
    let edge = Edge::start_with(1, "", &[]);
    let connector = edge.connector();
    let raw = RawConnection::connect(&connector, edge.addr)
        .await
        .expect("handshake");
    assert_eq!(
        raw.connection.max_datagram_size(),
        None,
        "the edge advertised QUIC datagrams"
    );
    assert!(
        raw.connection
            .send_datagram(bytes::Bytes::from_static(b"x"))
            .is_err(),
        "a datagram was accepted for sending"
    );
    a_send_is_acknowledged(&edge, 23, 24, b"still served").await;
}

/// A client's acks left unread when it closes reach its inbox's home shard as one message, the
/// highest. Applied one by one, a client that filled its stream window with small acks while
/// its input was paused (over its send budget) and then closed sent hundreds of thousands of
/// cross-shard messages at once, past the mesh's back-pressure, until other users' control
/// messages (logins, send answers) were dropped at the backlog's hard maximum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_left_unread_at_a_close_reach_the_home_shard_as_one() {
    use courier_core::placement::home_shard;
    // A window of 4 MiB holds about 200,000 acks: past the backlog's hard maximum (65,536)
    // from one connection, if each became a message.
    let metrics = common::free_addr();
    let edge = Edge::start_with(
        2,
        &format!(
            "[metrics]\nlisten = \"{metrics}\"\n\
             [quic]\nstream_receive_window_bytes = 4194304\nreceive_window_bytes = 4194304\n\
             [limits.send_per_connection]\nmessages_per_sec = 1\nmessages_burst = 1\n\
             bytes_per_sec = 0\nbytes_burst = 0\n"
        ),
        &[],
    );
    let accepted_on_shard_1 = || {
        common::metric_at(metrics, "courier_connections_accepted_total", "shard=\"1\"")
            .expect("metrics listener")
    };
    let ack = courier_protocol::encode_to_vec(&Frame::Ack { up_to_seq: 1 }).expect("encode");
    let mut flood = send_burst(2, 1_000, b"over budget");
    flood.extend(ack.repeat(4 * 1024 * 1024 / ack.len() - 16));
    // Users homed on shard 0 whose connections the kernel handed to shard 1, where each ack
    // is a message to shard 0.
    let users = (1..).filter(|user| home_shard(*user, 2) == 0).take(2);
    for user in users {
        // Seq 1 exists and the device holds it: acks of it are the device's to send.
        a_send_is_acknowledged(&edge, 2_500, user, b"seq 1").await;
        let mut connectors = Vec::new();
        let mut on_shard_1 = None;
        for _ in 0..32 {
            let before = accepted_on_shard_1();
            let connector = edge.connector();
            let raw = RawConnection::connect(&connector, edge.addr)
                .await
                .expect("connect");
            connectors.push(connector);
            if accepted_on_shard_1() > before {
                on_shard_1 = Some(raw);
                break;
            }
        }
        let mut raw = on_shard_1.expect("32 connections from new ports, none on shard 1");
        raw.write_frame(&Frame::Hello {
            token: edge.token(user, 0).into_bytes(),
            device: 0,
            acked_up_to: 0,
            resume_after_seq: 1,
        })
        .await
        .expect("hello");
        let welcome = raw.read_frame().await.expect("welcome");
        assert!(matches!(welcome, Frame::Welcome { .. }), "{welcome:?}");
        // The second send is over budget: the edge stops reading this connection for a
        // second, and the acks wait in its stream.
        tokio::time::timeout(EVENT_TIMEOUT, raw.write_bytes(&flood))
            .await
            .expect("the window takes the flood")
            .expect("flood");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (connection, _, _) = raw.into_parts();
        connection.close(0u32.into(), b"gone");
    }
    a_send_is_acknowledged(&edge, 2_501, 2_502, b"after the floods").await;
    // Each ack past the connection's budget for control frames is counted, and the shard
    // reports the count every 10 s: with one message per close, a handful; with one per ack,
    // hundreds of thousands.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let over_budget = loop {
        let reported = edge
            .log
            .lock()
            .expect("log")
            .iter()
            .filter(|line| line.contains("shard=1"))
            .find_map(|line| {
                let (_, after) = line.split_once("frames_over_budget=")?;
                after.split_whitespace().next()?.parse::<u64>().ok()
            });
        if let Some(count) = reported {
            break count;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "shard 1 reported no frames over budget within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        over_budget < 1_000,
        "{over_budget} acks over budget were applied: each left unread became a message"
    );
}

/// A UDP relay between clients and the edge that holds every datagram for `delay_ms` (as it is
/// when the datagram arrives) before passing it on: a long round trip, made on loopback.
struct DelayingRelay {
    addr: std::net::SocketAddr,
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl DelayingRelay {
    async fn start(edge: std::net::SocketAddr) -> DelayingRelay {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        use tokio::net::UdpSocket;
        let outside = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let inside = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        inside.connect(edge).await.expect("connect to the edge");
        let addr = outside.local_addr().expect("relay address");
        let delay_ms = Arc::new(AtomicU64::new(0));
        let delay = delay_ms.clone();
        let task = tokio::spawn(async move {
            let mut client = None;
            let (mut from_client, mut from_edge) = (vec![0; 65_536], vec![0; 65_536]);
            loop {
                let hold = Duration::from_millis(delay.load(Ordering::Relaxed));
                tokio::select! {
                    Ok((len, peer)) = outside.recv_from(&mut from_client) => {
                        client = Some(peer);
                        let (inside, datagram) = (inside.clone(), from_client[..len].to_vec());
                        tokio::spawn(async move {
                            tokio::time::sleep(hold).await;
                            let _ = inside.send(&datagram).await;
                        });
                    }
                    Ok(len) = inside.recv(&mut from_edge) => {
                        let Some(client) = client else { continue };
                        let (outside, datagram) = (outside.clone(), from_edge[..len].to_vec());
                        tokio::spawn(async move {
                            tokio::time::sleep(hold).await;
                            let _ = outside.send_to(&datagram, client).await;
                        });
                    }
                }
            }
        });
        DelayingRelay {
            addr,
            delay_ms,
            task,
        }
    }

    fn delay(&self, delay: Duration) {
        self.delay_ms.store(
            delay.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

impl Drop for DelayingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A connection the edge closed is dropped within seconds, whatever its round trip. QUIC
/// keeps a closed connection for three probe timeouts, which grow with the round trip and with
/// the `max_ack_delay` the peer chooses (up to 16 s): a client closed before it logged in no
/// longer counts against its address or the unauthenticated limit, so such clients could
/// hold the shard's connection slots, with their buffers, for about 50 s each. Here a round
/// trip of 4 s makes QUIC's three probe timeouts 12 s or more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_connection_is_dropped_within_seconds_whatever_its_round_trip() {
    let metrics = common::free_addr();
    let edge = Edge::start_with(1, &format!("[metrics]\nlisten = \"{metrics}\"\n"), &[]);
    let open = || {
        common::metric_at(metrics, "courier_connections_open", "shard=\"0\"")
            .expect("metrics listener")
    };
    let relay = DelayingRelay::start(edge.addr).await;
    let connector = edge.connector();
    let mut raw = RawConnection::connect(&connector, relay.addr)
        .await
        .expect("handshake");
    let hello = Frame::Hello {
        token: edge.token(3_001, 0).into_bytes(),
        device: 0,
        acked_up_to: 0,
        resume_after_seq: 0,
    };
    raw.write_frame(&hello).await.expect("hello");
    let welcome = raw.read_frame().await.expect("welcome");
    assert!(matches!(welcome, Frame::Welcome { .. }), "{welcome:?}");
    // Two seconds each way: the edge measures the round trip from the client's
    // acknowledgements of its `Pong` (and of its probes meanwhile).
    relay.delay(Duration::from_secs(2));
    raw.write_frame(&Frame::Ping { nonce: 1 })
        .await
        .expect("ping");
    let pong = tokio::time::timeout(Duration::from_secs(20), raw.read_frame())
        .await
        .expect("pong in time")
        .expect("pong");
    assert!(matches!(pong, Frame::Pong { nonce: 1 }), "{pong:?}");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    // A second `Hello` makes the edge close the connection.
    relay.delay(Duration::ZERO);
    raw.write_frame(&hello).await.expect("second hello");
    assert_eq!(closed_code(&raw).await, Some(ErrorCode::UnexpectedFrame));
    let closed = tokio::time::Instant::now();
    // Three seconds of `CLOSED_LINGER_MAX`, and the gauge is published once a second.
    while open() > 0.0 {
        assert!(
            closed.elapsed() < Duration::from_secs(8),
            "the closed connection was still held {:?} after its close",
            closed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A connection whose `Hello` came as 0-RTT data is logged in before its TLS handshake is
/// done; if the handshake never finishes (the client's `Finished` never arrives), the edge
/// closes it at `limits.hello_timeout_ms` as it does a connection without `Hello`. Before,
/// only the idle timeout ended it, and a client that kept sending early data held it, and
/// its place in its address's handshake count, for as long as it liked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_in_0rtt_whose_handshake_never_finishes_is_closed_at_the_hello_timeout() {
    let metrics = common::free_addr();
    let edge = Edge::start_with(
        1,
        &format!("[limits]\nhello_timeout_ms = 1000\n[metrics]\nlisten = \"{metrics}\"\n"),
        &[],
    );
    let connector = edge.connector();
    let token = edge.token(81, 0);
    // A full handshake leaves a session ticket with the connector.
    let first = connector
        .connect(courier_client::ConnectOptions::new(
            edge.addr,
            token.clone(),
            0,
        ))
        .await
        .expect("first connection");
    first.close();
    drop(first);
    let timed_out = || {
        common::metric_at(metrics, "courier_connections_closed_total", "timed_out")
            .expect("metrics")
    };
    assert_eq!(timed_out(), 0.0);
    // Resumed through a relay that drops the client's Handshake packets: its `Hello` in
    // 0-RTT is taken, its `Finished` never arrives.
    let relay = HandshakeDroppingRelay::start(edge.addr).await;
    let resumed = connector
        .connect(courier_client::ConnectOptions::new(relay.addr, token, 0))
        .await
        .expect("resumed connection");
    assert_eq!(
        resumed.zero_rtt_accepted(),
        Some(true),
        "logged in by 0-RTT"
    );
    let started = tokio::time::Instant::now();
    while timed_out() < 1.0 {
        // Generous for a busy machine: the idle timeout (30 s) ended it before.
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "the connection was not closed for its unfinished handshake"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        relay.dropped() > 0,
        "the relay dropped no Handshake packet: the scenario did not happen"
    );
    // The client reconnects through the relay with full handshakes that never finish either
    // (its ticket was used): the session's `Hello` deadline closes those, and the handshake
    // deadline, of the same length, must not close and count them a second time.
    while timed_out() < 4.0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the client's later connections were not closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let closed = timed_out();
    let accepted =
        common::metric_sum_at(metrics, "courier_connections_accepted_total").expect("metrics");
    assert!(
        closed <= accepted,
        "{closed} connections closed for timing out, of {accepted} accepted: some counted twice"
    );
    drop(resumed);
}

/// A UDP relay between a client and the edge that drops every datagram from the client that
/// holds a QUIC Handshake packet (its `Finished`, and its acknowledgements of the edge's
/// flight): the handshake never completes, while Initial, 0-RTT and 1-RTT packets pass.
struct HandshakeDroppingRelay {
    addr: std::net::SocketAddr,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl HandshakeDroppingRelay {
    async fn start(edge: std::net::SocketAddr) -> HandshakeDroppingRelay {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        use tokio::net::UdpSocket;
        let outside = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let inside = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        inside.connect(edge).await.expect("connect to the edge");
        let addr = outside.local_addr().expect("relay address");
        let dropped = Arc::new(AtomicU64::new(0));
        let counter = dropped.clone();
        let task = tokio::spawn(async move {
            let mut client = None;
            let (mut from_client, mut from_edge) = (vec![0; 65_536], vec![0; 65_536]);
            loop {
                tokio::select! {
                    Ok((len, peer)) = outside.recv_from(&mut from_client) => {
                        client = Some(peer);
                        if holds_a_handshake_packet(&from_client[..len]) {
                            counter.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let _ = inside.send(&from_client[..len]).await;
                    }
                    Ok(len) = inside.recv(&mut from_edge) => {
                        if let Some(client) = client {
                            let _ = outside.send_to(&from_edge[..len], client).await;
                        }
                    }
                }
            }
        });
        HandshakeDroppingRelay {
            addr,
            dropped,
            task,
        }
    }

    fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for HandshakeDroppingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether a datagram holds a QUIC version 1 Handshake packet, among its coalesced long
/// header packets (RFC 9000, 17.2).
fn holds_a_handshake_packet(mut datagram: &[u8]) -> bool {
    fn varint(bytes: &[u8]) -> Option<(usize, usize)> {
        let first = *bytes.first()?;
        let len = 1usize << (first >> 6);
        let mut value = u64::from(first & 0x3f);
        for byte in bytes.get(1..len)? {
            value = (value << 8) | u64::from(*byte);
        }
        Some((usize::try_from(value).ok()?, len))
    }
    let next = |packet: &[u8]| -> Option<(u8, usize)> {
        let first = *packet.first()?;
        let kind = (first >> 4) & 0x03;
        let mut at = 5;
        at += 1 + usize::from(*packet.get(at)?);
        at += 1 + usize::from(*packet.get(at)?);
        if kind == 0 {
            let (token_len, len) = varint(packet.get(at..)?)?;
            at += len + token_len;
        }
        let (payload_len, len) = varint(packet.get(at..)?)?;
        Some((kind, at + len + payload_len))
    };
    while datagram.first().is_some_and(|first| first & 0x80 != 0) {
        match next(datagram) {
            Some((2, _)) => return true,
            Some((_, end)) if end <= datagram.len() => datagram = &datagram[end..],
            _ => return false,
        }
    }
    false
}
