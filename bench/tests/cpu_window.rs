//! The CPU a run reports (the edge's and the load generator's) is counted over the run, not
//! past it: from the clock's start to the last expected delivery, with either driver. The SDK
//! driver read it after its progress line's next tick, up to a second after the run, and
//! after every receiver had closed its connection, so a short run's CPU per message came out
//! several times too high. (What the window holds is compared with the run's duration, with
//! half a second to spare for a busy machine: the old window ran about a second past a run of
//! a few milliseconds.)

use std::process::Command;

fn window_and_duration(driver: &str) -> (f64, f64, serde_json::Value) {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("report.json");
    let output = Command::new(env!("CARGO_BIN_EXE_courier-bench"))
        .args(["--spawn-edge", "--json"])
        .arg(&json)
        .args(["pairs", "--driver", driver, "--pairs", "2", "--msgs", "20"])
        .output()
        .expect("run courier-bench");
    let report: serde_json::Value = std::fs::read(&json)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or(serde_json::Value::Null);
    assert!(
        output.status.success(),
        "{driver}: {report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(report["duplicates"], 0, "{report}");
    let window = report["extra"]["cpu_window_secs"]
        .as_f64()
        .unwrap_or_else(|| panic!("{driver}: no cpu_window_secs: {report}"));
    let duration = report["duration_secs"].as_f64().expect("duration_secs");
    (window, duration, report)
}

#[test]
fn the_cpu_a_run_reports_is_counted_over_the_run() {
    for driver in ["sdk", "direct"] {
        let (window, duration, report) = window_and_duration(driver);
        assert!(
            window < duration + 0.5,
            "{driver}: CPU counted over {window:.3} s of a {duration:.3} s run: {report}"
        );
        assert!(
            window + 0.01 >= duration,
            "{driver}: CPU counted over {window:.3} s, less than the {duration:.3} s run: {report}"
        );
    }
}
