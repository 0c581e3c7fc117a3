//! `pairs --driver direct` (bench/src/direct.rs) drives its clients with quinn-proto and the
//! SDK's protocol session from one thread: against a real two-shard edge it must pass the same
//! checks as the SDK's driver, closed loop and paced, and say which driver ran.

use std::process::Command;

fn run(args: &[&str]) -> (bool, serde_json::Value, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("report.json");
    let output = Command::new(env!("CARGO_BIN_EXE_courier-bench"))
        .args(["--spawn-edge", "--edge-shards", "2", "--json"])
        .arg(&json)
        .args(args)
        .output()
        .expect("run courier-bench");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let report = std::fs::read(&json)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or(serde_json::Value::Null);
    (output.status.success(), report, stderr)
}

#[test]
fn the_direct_driver_delivers_every_message_once_in_order_closed_loop_and_paced() {
    for (extra, msgs) in [
        (&["--in-flight", "8"][..], 300u64),
        (&["--rate", "200"][..], 100u64),
    ] {
        let pairs = 6u64;
        let mut args = vec!["pairs", "--driver", "direct", "--pairs", "6"];
        let msgs_text = msgs.to_string();
        args.extend(["--msgs", &msgs_text]);
        args.extend(extra);
        let (passed, report, stderr) = run(&args);
        assert!(passed, "{args:?} failed: {report}\n{stderr}");
        assert_eq!(report["params"]["driver"], "direct", "{report}");
        assert_eq!(report["messages_acked"], pairs * msgs, "{report}");
        assert_eq!(report["messages_delivered"], pairs * msgs, "{report}");
        for check in ["lost", "duplicates", "reordered", "seq_mismatches"] {
            assert_eq!(report[check], 0, "{args:?}: {check}: {report}");
        }
        assert!(
            report["extra"]["udp_datagrams"].as_u64().unwrap_or(0) > 0,
            "{report}"
        );
        assert!(report["deliver_latency"]["count"].as_u64() == Some(pairs * msgs));
    }
}

#[test]
fn the_direct_driver_refuses_the_drain_it_does_not_run() {
    let (passed, _, stderr) = run(&["offline", "--driver", "direct", "--pairs", "1"]);
    assert!(!passed);
    assert!(stderr.contains("--driver direct runs `pairs`"), "{stderr}");
}
