//! Issue 12, items 4 and 5: `courier-edge ctl` against a running edge, over its control socket.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Edge, assert_quiet, next_message};
use courier_protocol::ErrorCode;

/// Runs `courier-edge ctl --socket SOCKET ARGS`; returns its exit success and stdout+stderr.
fn ctl(socket: &Path, args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_courier-edge"))
        .arg("ctl")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run courier-edge ctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_lists_disconnects_and_purges_a_user_and_drains_the_edge() {
    let mut edge = Edge::start(2);
    let socket = edge.data_dir.join("control.sock");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&socket)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "only the edge's user may open the socket"
        );
    }

    let (ok, out) = ctl(&socket, &["status"]);
    assert!(
        ok && out.contains("2 shard(s)") && out.contains("serving"),
        "{out}"
    );

    // A connected user is listed with its device and address, then disconnected: the SDK
    // sees `Disconnected` and does not reconnect.
    let mut watched = edge.client(9001).await;
    let (ok, out) = ctl(&socket, &["connections", "--user", "9001"]);
    assert!(ok && out.contains("1 connection(s)"), "{out}");
    assert!(out.contains("device 0 from 127.0.0.1:"), "{out}");
    let (ok, out) = ctl(&socket, &["--json", "connections", "--user", "9002"]);
    assert!(ok && out.contains("\"connections\": []"), "{out}");
    let (ok, out) = ctl(&socket, &["disconnect", "--user", "9001"]);
    assert!(ok && out.contains("closed 1 connection(s)"), "{out}");
    let ended = tokio::time::timeout(Duration::from_secs(10), watched.recv())
        .await
        .expect("the client noticed the disconnect");
    assert!(ended.is_none(), "the client stopped");
    let refused = watched
        .send(9002, b"after".to_vec())
        .await
        .expect_err("a disconnected client sends nothing");
    assert_eq!(refused.code(), Some(ErrorCode::Disconnected));
    let (ok, out) = ctl(&socket, &["connections", "--user", "9001"]);
    assert!(ok && out.contains("0 connection(s)"), "{out}");

    // Erasure on request: three messages wait for user 9003, whose two devices are connected.
    // The purge disconnects both and erases the messages. The next message gets a seq above the
    // erased ones and reaches each device when it comes back, the second one back too (its
    // record was reset, not deleted: decision 0044).
    let sender = edge.client(9004).await;
    let phone = edge.client_device(9003, 0).await;
    let laptop = edge.client_device(9003, 1).await;
    for i in 0..3u8 {
        let receipt = sender.send(9003, vec![b'x', i]).await.expect("send");
        assert_eq!(receipt.seq, u64::from(i) + 1);
    }
    let (ok, out) = ctl(&socket, &["purge", "--user", "9003"]);
    assert!(!ok && out.contains("--yes"), "a purge needs --yes: {out}");
    let (ok, out) = ctl(&socket, &["purge", "--user", "9003", "--yes"]);
    assert!(
        ok && out.contains("closed 2 connection(s)") && out.contains("erased"),
        "{out}"
    );
    for mut device in [phone, laptop] {
        // Once the purge's `Disconnected` is read, `recv` ends (what the SDK still buffered
        // is not handed out); before it, a delivery may be.
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            while device.recv_message().await.is_some() {}
        })
        .await;
        assert!(ended.is_ok(), "the purge disconnected the device");
    }
    let receipt = sender.send(9003, b"fresh".to_vec()).await.expect("send");
    assert!(
        receipt.seq > 3,
        "seq {} reused after the purge",
        receipt.seq
    );
    let mut phone = edge.client_device(9003, 0).await;
    assert_eq!(next_message(&mut phone).await.body, b"fresh");
    // The phone acknowledges it meanwhile: the laptop's reset record keeps it stored.
    assert_quiet(&mut phone).await;
    let mut laptop = edge.client_device(9003, 1).await;
    assert_eq!(next_message(&mut laptop).await.body, b"fresh");
    assert_quiet(&mut laptop).await;

    // Bad input gets a sentence, not a crash.
    let (ok, out) = ctl(Path::new("/nonexistent/control.sock"), &["status"]);
    assert!(
        !ok && out.contains("cannot reach the edge's control socket"),
        "{out}"
    );

    for garbage in [
        "garbage\n",
        "{\"command\":\"purge\"}\n",
        "{\"command\":\"status\"",
    ] {
        use std::io::{Read, Write};
        let mut stream = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
        stream.write_all(garbage.as_bytes()).expect("write");
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("answer");
        assert!(answer.contains("\"error\""), "{garbage:?} -> {answer}");
    }
    let (ok, out) = ctl(&socket, &["status"]);
    assert!(ok, "the edge still answers: {out}");

    // Drain: the edge stops as after SIGTERM, exit 0, and removes its socket.
    let (ok, out) = ctl(&socket, &["drain"]);
    assert!(ok && out.contains("draining"), "{out}");
    let status = edge
        .wait_exit(Duration::from_secs(30))
        .expect("the edge stopped after the drain");
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "the socket file is removed on exit");
}
