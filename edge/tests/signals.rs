//! Issue 12, item 5: signals an operator sends. SIGHUP does not kill the edge; a second SIGTERM
//! during the drain does not turn it into a hard kill.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{EVENT_TIMEOUT, Edge};

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_leaves_the_edge_serving_and_a_second_sigterm_still_drains() {
    let mut edge = Edge::start(2);
    let pid = edge.pid().expect("running");
    signal(pid, "HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = edge.client(51).await;
    tokio::time::timeout(EVENT_TIMEOUT, client.send(52, b"after SIGHUP".to_vec()))
        .await
        .expect("in time")
        .expect("the edge still serves after SIGHUP");
    drop(client);
    assert!(
        edge.log
            .lock()
            .expect("log")
            .iter()
            .any(|line| line.contains("SIGHUP received")),
        "SIGHUP is logged"
    );
    // Two SIGTERMs in a row: the drain runs to its end and the exit is clean.
    signal(pid, "TERM");
    signal(pid, "TERM");
    let status = edge
        .wait_exit(Duration::from_secs(20))
        .expect("the edge exits after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
}
