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
