//! The Redis Streams peer workloads (`redis-pairs`, `redis-offline`) run end to end against a
//! real `redis-server` and pass the same checks as Courier's: every acknowledged message
//! delivered once, in order, with the report naming the server, its fsync policy and whether
//! it served TLS.
//!
//! It needs `redis-server` (Debian: `apt-get install redis-server`). Where it is missing the
//! test says so and passes, unless `COURIER_REQUIRE_REDIS=1` (set by .ci/run, which installs
//! it), so CI cannot skip it silently.

use std::process::Command;

fn redis_present() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success())
}

fn run(workload: &str, extra: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("report.json");
    let output = Command::new(env!("CARGO_BIN_EXE_courier-bench"))
        .arg("--json")
        .arg(&json)
        .args([
            workload,
            "--pairs",
            "4",
            "--msgs",
            "300",
            "--in-flight",
            "8",
        ])
        .args(extra)
        .output()
        .expect("run courier-bench");
    assert!(
        output.status.success(),
        "{workload} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&std::fs::read(&json).expect("the report")).expect("JSON report")
}

#[test]
fn redis_streams_peer_runs_pairs_and_a_drain_with_every_message_delivered_once() {
    if !redis_present() {
        assert!(
            std::env::var("COURIER_REQUIRE_REDIS").as_deref() != Ok("1"),
            "redis-server is required (COURIER_REQUIRE_REDIS=1) but not installed"
        );
        eprintln!("SKIPPED: redis-server not installed (apt-get install redis-server)");
        return;
    }
    // Closed loop, the drain, and paced (one send per tick, no window).
    for (workload, extra) in [
        ("redis-pairs", &[][..]),
        ("redis-offline", &[][..]),
        ("redis-pairs", &["--rate", "200"][..]),
        // Over TLS 1.3, as Courier's QUIC encrypts: Redis serves TLS alone on its port.
        ("redis-pairs", &["--tls"][..]),
    ] {
        let report = run(workload, extra);
        assert_eq!(report["messages_acked"], 1200, "{workload}: {report}");
        assert_eq!(report["messages_delivered"], 1200, "{workload}: {report}");
        for check in ["lost", "duplicates", "reordered", "seq_mismatches"] {
            assert_eq!(report[check], 0, "{workload}: {check}: {report}");
        }
        assert!(
            report["server"]
                .as_str()
                .is_some_and(|s| s.starts_with("redis ")),
            "{report}"
        );
        // The comparison is with a peer that fsyncs before it answers.
        assert_eq!(report["extra"]["redis_appendfsync"], "always", "{report}");
        assert!(report["edge_cpu_secs"].as_f64().is_some(), "{report}");
        let tls = extra.contains(&"--tls");
        assert_eq!(report["extra"]["redis_tls"], tls, "{report}");
        assert_eq!(
            report["server"]
                .as_str()
                .is_some_and(|s| s.ends_with(" over TLS")),
            tls,
            "{report}"
        );
    }
}
