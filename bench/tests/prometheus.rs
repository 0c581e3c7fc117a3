//! Issue 12, item 7: the edge's metrics, checked with the real tools.
//!
//! A real Prometheus scrapes an edge that `courier-bench` loads. Then the test asks
//! Prometheus's HTTP API for the counters it scraped, and they must match what the bench sent
//! and received. `promtool check metrics` must pass on a scrape taken under load.
//!
//! It needs `prometheus` and `promtool` (Debian: `apt-get install prometheus`). Where they are
//! missing the test says so and passes, unless `COURIER_REQUIRE_PROMETHEUS=1` (set by .ci/run,
//! which installs them), so CI cannot skip it silently.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound, then released for the child to take).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// The body of `GET path` on `addr`, or `None` if nothing answered with 200.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_string())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_string()))
}

/// The value of an instant PromQL query that returns one sample.
fn query(prometheus: SocketAddr, promql: &str) -> Option<f64> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let body = http_get(prometheus, &format!("/api/v1/query?query={encoded}"))?;
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    json["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tools_present() -> bool {
    ["prometheus", "promtool"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    })
}

#[test]
fn prometheus_scrapes_counters_that_match_what_the_bench_sent_and_received() {
    if !tools_present() {
        assert!(
            std::env::var("COURIER_REQUIRE_PROMETHEUS").as_deref() != Ok("1"),
            "prometheus and promtool are required (COURIER_REQUIRE_PROMETHEUS=1) but not installed"
        );
        eprintln!("SKIPPED: prometheus or promtool not installed (apt-get install prometheus)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let edge_config = dir.path().join("edge.toml");
    std::fs::write(&edge_config, format!("[metrics]\nlisten = \"{metrics}\"\n")).unwrap();
    let prometheus_config = dir.path().join("prometheus.yml");
    std::fs::write(
        &prometheus_config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  \
             - job_name: courier\n    static_configs:\n      - targets: ['{metrics}']\n"
        ),
    )
    .unwrap();
    let prometheus_log = dir.path().join("prometheus.log");
    let mut prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", prometheus_config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&prometheus_log).expect("log file"))
            .spawn()
            .expect("start prometheus"),
    );
    // Prometheus first, ready to scrape: on a busy machine its start takes seconds, and the
    // edge's counters must be scraped before the edge stops.
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(web, "/-/ready").is_none() {
        let exited = prometheus.0.try_wait().expect("prometheus status");
        assert!(
            exited.is_none() && Instant::now() < deadline,
            "Prometheus did not become ready ({exited:?}):\n{}",
            std::fs::read_to_string(&prometheus_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The bench loads a spawned edge and keeps it up for 10 s after the run, so Prometheus
    // scrapes the final counts: it applies new targets at most every 5 s after its start, and
    // with 5 s a run that took a second less than before (the bench's CPU figures no longer
    // wait for its progress line) ended before the first scrape in CI.
    let report_path = dir.path().join("report.json");
    let (pairs, msgs) = (10u64, 200u64);
    let mut bench = Killed(
        Command::new(env!("CARGO_BIN_EXE_courier-bench"))
            .args(["--spawn-edge", "--edge-shards", "2", "--edge-config"])
            .arg(&edge_config)
            .arg("--json")
            .arg(&report_path)
            .args(["pairs", "--pairs", &pairs.to_string()])
            .args(["--msgs", &msgs.to_string(), "--settle-secs", "10"])
            .stdout(Stdio::null())
            .spawn()
            .expect("start courier-bench"),
    );

    // A scrape under load passes promtool's checks.
    let deadline = Instant::now() + Duration::from_secs(120);
    let scrape = loop {
        if let Some(text) = http_get(metrics, "/metrics")
            && text.contains("courier_frames_received_total")
        {
            break text;
        }
        assert!(Instant::now() < deadline, "the edge never served /metrics");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(scrape.as_bytes())
        .expect("feed promtool");
    let checked = promtool.wait_with_output().expect("promtool");
    assert!(
        checked.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    check_deploy_files(&scrape);

    let status = bench.0.wait().expect("bench");
    assert!(status.success(), "the bench failed: {status}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).expect("report")).expect("json");
    let sent = report["messages_sent"].as_f64().expect("messages_sent");
    let acked = report["messages_acked"].as_f64().expect("messages_acked");
    let delivered = report["messages_delivered"].as_f64().expect("delivered");
    assert_eq!(sent, (pairs * msgs) as f64, "{report}");
    assert_eq!(acked, sent, "{report}");
    assert_eq!(delivered, sent, "{report}");

    // What Prometheus scraped (the last scrape before the edge stopped) matches. The edge has
    // stopped by now, and the first scrape that fails marks its series stale: an instant
    // query would find nothing, so each asks for the last sample of the past minutes.
    let expected = [
        (
            "sum(last_over_time(courier_frames_received_total{kind=\"send\"}[5m]))",
            sent,
        ),
        ("sum(last_over_time(courier_sends_acked_total[5m]))", acked),
        (
            "sum(last_over_time(courier_deliveries_total[5m]))",
            delivered,
        ),
        (
            "sum(last_over_time(courier_delivery_latency_seconds_count[5m]))",
            delivered,
        ),
        (
            "sum(last_over_time(courier_send_ack_latency_seconds_count[5m]))",
            acked,
        ),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got: Vec<Option<f64>> = expected.iter().map(|(q, _)| query(web, q)).collect();
        let all_match = got
            .iter()
            .zip(&expected)
            .all(|(value, (_, want))| *value == Some(*want));
        if all_match {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus's values {got:?} do not match the bench's {:?}; its log:\n{}",
            expected.map(|(q, want)| (q, want)),
            std::fs::read_to_string(&prometheus_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let batches =
        query(web, "sum(last_over_time(courier_commit_batches_total[5m]))").unwrap_or(0.0);
    assert!(batches >= 1.0, "no commit batch counted");
}

/// The alert rules pass `promtool check rules` and their unit tests, and every `courier_`
/// series the alert rules and the Grafana dashboard use is one the edge exports.
fn check_deploy_files(scrape: &str) {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let output = Command::new("promtool")
            .args(args)
            .current_dir(deploy.join("prometheus"))
            .output()
            .expect("promtool");
        assert!(
            output.status.success(),
            "promtool {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // Sample names, and the family names of `# TYPE` lines (a histogram's base name).
    let exported: std::collections::HashSet<&str> = scrape
        .lines()
        .filter_map(|line| match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split(' ').next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        })
        .collect();
    for file in [
        deploy.join("prometheus/alerts.yml"),
        deploy.join("grafana/courier-edge.json"),
    ] {
        let text = std::fs::read_to_string(&file).expect("deploy file");
        let mut rest = text.as_str();
        while let Some(at) = rest.find("courier_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            assert!(
                exported.contains(name.as_str()),
                "{} uses {name}, which the edge does not export",
                file.display()
            );
        }
    }
}
