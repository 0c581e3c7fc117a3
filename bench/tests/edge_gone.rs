//! A run whose edge stops answering ends by itself: the SDK's clients reconnect and keep their
//! sends pending, so waiting for every send to be answered never ended. The run gives up once
//! nothing was acknowledged or delivered for `--drain-timeout-secs`, and fails.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn a_run_whose_edge_was_killed_ends_and_fails() {
    let mut bench = Command::new(env!("CARGO_BIN_EXE_courier-bench"))
        .args([
            "--spawn-edge",
            "pairs",
            "--driver",
            "sdk",
            "--pairs",
            "4",
            "--msgs",
            "1000000",
            "--drain-timeout-secs",
            "3",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run courier-bench");
    // The edge it spawned: its child running `__edge serve`, once sends are flowing.
    let deadline = Instant::now() + Duration::from_secs(60);
    let edge = loop {
        let found = Command::new("pgrep")
            .args(["-P", &bench.id().to_string(), "-f", "__edge serve"])
            .output()
            .expect("pgrep");
        let pid = String::from_utf8_lossy(&found.stdout).trim().to_string();
        if !pid.is_empty() {
            break pid;
        }
        assert!(Instant::now() < deadline, "the bench spawned no edge");
        assert!(
            bench.try_wait().expect("wait").is_none(),
            "the bench ended early"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_secs(2));
    let killed = Command::new("kill")
        .args(["-KILL", &edge])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = bench.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = bench.kill();
            panic!("the run went on a minute after its edge was killed");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut bench.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("is the edge still running?"), "{stderr}");
}
