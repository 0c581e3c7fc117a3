//! `pairs --driver direct` (bench/src/direct.rs) drives its clients with quinn-proto and the
//! SDK's protocol session from one thread: against a real two-shard edge it must pass the same
//! checks as the SDK's driver, closed loop, paced and in the offline drain, and say which
//! driver ran.

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
fn the_direct_driver_drains_what_offline_receivers_missed_and_refuses_what_it_cannot_run() {
    // The receivers log in, leave, and come back together once every send is answered: 100 of
    // them after 1,000 sends each, long enough for their first connections to drain, so that
    // the endpoint hands those connections' handles to returning ones (a driver that lost
    // track of that left receivers unanswered: this failed 2 of 2 runs).
    let (passed, report, stderr) = run(&[
        "offline", "--driver", "direct", "--pairs", "100", "--msgs", "1000",
    ]);
    assert!(passed, "offline failed: {report}\n{stderr}");
    assert_eq!(report["workload"], "offline", "{report}");
    assert_eq!(report["messages_delivered"], 100 * 1000, "{report}");
    for check in ["lost", "duplicates", "reordered", "seq_mismatches"] {
        assert_eq!(report[check], 0, "{check}: {report}");
    }
    assert!(
        report["extra"]["drain_per_sec"].as_f64().unwrap_or(0.0) > 0.0,
        "{report}"
    );
    assert!(
        report["extra"]["drain_edge_cpu_secs"].is_number(),
        "{report}"
    );

    let (passed, _, stderr) = run(&["pairs", "--driver", "direct", "--settle-secs", "1"]);
    assert!(!passed);
    assert!(
        stderr.contains("--settle-secs needs --driver sdk"),
        "{stderr}"
    );
}
