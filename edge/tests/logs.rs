//! Issue 12, logs: no message body in any log line at any level, no terminal colours when the
//! output is not a terminal, and `json` as one object per line. On the real binary.

mod common;

use std::time::Duration;

use common::{EVENT_TIMEOUT, Edge, next_message};

/// A body sent, delivered and acknowledged with every target at `trace` appears in no line the
/// edge wrote: not as text, not as the decimal byte list of a `Debug` dump, not as hex.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_carries_a_message_body_even_at_trace_level() {
    let mut edge = Edge::start_with(2, "", &[("RUST_LOG", "trace")]);
    let marker = b"MARKER-body-5d41402abc4b2a76".to_vec();
    let sender = edge.client(41).await;
    let mut receiver = edge.client(42).await;
    tokio::time::timeout(EVENT_TIMEOUT, sender.send(42, marker.clone()))
        .await
        .expect("in time")
        .expect("acknowledged");
    let delivery = next_message(&mut receiver).await;
    assert_eq!(delivery.body, marker);
    receiver.ack(delivery.seq);
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop((sender, receiver));
    assert!(edge.terminate(), "the edge stops cleanly");

    let text = String::from_utf8_lossy(&marker).into_owned();
    let decimal = format!("{:?}", &marker[..8])
        .trim_end_matches(']')
        .to_string();
    let hex: String = marker[..8].iter().map(|b| format!("{b:02x}")).collect();
    let log = edge.log.lock().expect("log");
    assert!(log.len() > 100, "trace logging is on: {} lines", log.len());
    for line in log.iter() {
        for form in [&text, &decimal, &hex] {
            assert!(
                !line.contains(form.as_str()),
                "a log line carries the body: {line}"
            );
        }
    }
}

/// With stderr on a pipe, text lines carry no ANSI escape codes; with `log.format = "json"`,
/// every line is one JSON object with a level and a message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_plain_text_off_a_terminal_and_json_when_asked() {
    let text_edge = Edge::start(1);
    let json_edge = Edge::start_with(1, "[log]\nformat = \"json\"\n", &[]);
    drop(text_edge.client(43).await);
    drop(json_edge.client(44).await);
    {
        let log = text_edge.log.lock().expect("log");
        assert!(!log.is_empty());
        for line in log.iter() {
            assert!(
                !line.contains('\u{1b}'),
                "a colour code in a piped log: {line:?}"
            );
        }
    }
    let log = json_edge.log.lock().expect("log");
    assert!(!log.is_empty());
    for line in log.iter() {
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(object["level"].is_string(), "{line}");
        assert!(object["fields"]["message"].is_string(), "{line}");
    }
}

/// An auth failure and a normal close are logged at info with the peer's address and the
/// user, and the refused token appears in no line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_and_auth_failures_are_logged_with_peer_and_user_never_the_token() {
    let mut edge = Edge::start(1);
    let connector = edge.connector();
    let mut forged = courier_client::raw::RawConnection::connect(&connector, edge.addr)
        .await
        .expect("handshake");
    let bad_token = "not-a-token-4b2a76";
    forged
        .write_frame(&courier_protocol::Frame::Hello {
            token: bad_token.as_bytes().to_vec(),
            device: 0,
            acked_up_to: 0,
            resume_after_seq: 0,
        })
        .await
        .expect("hello");
    let _ = tokio::time::timeout(EVENT_TIMEOUT, forged.closed()).await;
    let mut superseded = edge.raw_session(&connector, 45, 0).await;
    let _newer = edge.raw_session(&connector, 45, 0).await;
    let _ = tokio::time::timeout(EVENT_TIMEOUT, superseded.read_frame()).await;
    assert!(edge.terminate());
    let log = edge.log.lock().expect("log");
    let closes: Vec<&String> = log
        .iter()
        .filter(|line| line.contains("closing connection"))
        .collect();
    assert!(
        closes.iter().any(|l| l.contains("Unauthenticated")
            && l.contains("127.0.0.1")
            && l.contains("INFO")),
        "no info line for the refused token: {closes:?}"
    );
    assert!(
        closes
            .iter()
            .any(|l| l.contains("Superseded") && l.contains("user=45")),
        "no info line naming the superseded user: {closes:?}"
    );
    assert!(
        log.iter().all(|line| !line.contains(bad_token)),
        "the token was logged"
    );
}
