//! What a run measured and checked: a table for people, JSON for tools (docs/bench.md).

use std::path::Path;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latency {
    pub fn from_histogram(histogram: &Histogram<u64>) -> Option<Latency> {
        if histogram.is_empty() {
            return None;
        }
        Some(Latency {
            count: histogram.len(),
            p50_us: histogram.value_at_quantile(0.50),
            p90_us: histogram.value_at_quantile(0.90),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
        })
    }
}

/// From this fraction of its CPUs busy, the load generator's report warns that its own
/// queueing is in the latencies (a run at 10,000 msgs/s on one core is at 0.95–0.98 here).
pub const LOAD_GENERATOR_BUSY_WARN: f64 = 0.9;

/// Counts a report divides by its deliveries (`Report::note_per_delivered`): the costs that
/// come per packet, per wake-up and per byte written rather than per second.
pub const PER_DELIVERED: &[&str] = &[
    "udp_datagrams",
    "tcp_segments",
    "edge_context_switches",
    "disk_write_bytes",
];

/// A histogram for microsecond latencies from 1 µs to 10 minutes, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// One run's results.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub workload: String,
    /// The command line that produced this report.
    pub command: String,
    pub started_at_unix_ms: u64,
    pub params: serde_json::Value,
    pub duration_secs: f64,
    pub messages_sent: u64,
    pub messages_acked: u64,
    pub messages_delivered: u64,
    /// Acknowledged by the server, never delivered. Must be 0.
    pub lost: u64,
    /// Delivered more than once to the application (after the SDK's dedupe). Must be 0.
    pub duplicates: u64,
    /// Delivered out of sequence order in an inbox. Must be 0.
    pub reordered: u64,
    /// Delivered under another sequence number than the sender was told. Must be 0.
    pub seq_mismatches: u64,
    /// Delivered to a receiver no message of whose sender it was (another pair's), or with
    /// a body other than the one sent (damaged, cut short). Must be 0.
    pub misdelivered: u64,
    pub delivered_per_sec: f64,
    pub send_ack_latency: Option<Latency>,
    pub deliver_latency: Option<Latency>,
    /// What served the run: "edge", or the peer a comparison ran against, like
    /// "redis 7.0.15" (`redis-pairs`). The `edge_*` fields below are that server's.
    pub server: String,
    /// CPU seconds the edge process used during the run, when its PID is known.
    pub edge_cpu_secs: Option<f64>,
    /// The edge's resident memory at the end of the run, when its PID is known.
    pub edge_rss_bytes: Option<u64>,
    /// Workload-specific results.
    pub extra: serde_json::Map<String, serde_json::Value>,
    pub errors: Vec<String>,
}

impl Report {
    pub fn new(workload: &str, params: serde_json::Value) -> Report {
        Report {
            workload: workload.to_string(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            started_at_unix_ms: courier_core::clock::wall_clock_ms(),
            params,
            duration_secs: 0.0,
            messages_sent: 0,
            messages_acked: 0,
            messages_delivered: 0,
            lost: 0,
            duplicates: 0,
            reordered: 0,
            seq_mismatches: 0,
            misdelivered: 0,
            delivered_per_sec: 0.0,
            send_ack_latency: None,
            deliver_latency: None,
            server: "edge".into(),
            edge_cpu_secs: None,
            edge_rss_bytes: None,
            extra: serde_json::Map::new(),
            errors: Vec::new(),
        }
    }

    /// Delivered messages per CPU-second the edge used: efficiency that survives a shared box
    /// better than throughput does.
    pub fn delivered_per_edge_cpu_sec(&self) -> Option<f64> {
        let cpu = self.edge_cpu_secs.filter(|cpu| *cpu > 0.0)?;
        (self.messages_delivered > 0).then(|| self.messages_delivered as f64 / cpu)
    }

    /// Counts, per message index of one pair, the acknowledged messages never delivered
    /// (`lost`) and those delivered under another seq than the sender was told
    /// (`seq_mismatches`); 0 means not acknowledged, or not delivered.
    pub fn check_seqs(
        &mut self,
        acked: impl Iterator<Item = u64>,
        delivered: impl Iterator<Item = u64>,
    ) {
        for (acked, delivered) in acked.zip(delivered) {
            if acked != 0 && delivered == 0 {
                self.lost += 1;
            } else if acked != 0 && acked != delivered {
                self.seq_mismatches += 1;
            }
        }
    }

    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.duplicates == 0
            && self.reordered == 0
            && self.seq_mismatches == 0
            && self.misdelivered == 0
            && self.errors.is_empty()
    }

    /// Adds `bench_busy_fraction`: the load generator's CPU over the measured stretch (the
    /// first send to the last delivery; for a drain, the drain), as a fraction of the CPUs it
    /// may run on (`cpus`). Near 1 its own queueing is in every latency it measured, so the
    /// report then says so.
    pub fn note_load_generator_busy(&mut self, cpus: usize) {
        let (cpu_key, secs) = if self.extra.contains_key("drain_secs") {
            (
                "drain_bench_cpu_secs",
                self.extra.get("drain_secs").and_then(|v| v.as_f64()),
            )
        } else {
            ("bench_cpu_secs", Some(self.duration_secs))
        };
        let Some(cpu_secs) = self.extra.get(cpu_key).and_then(|v| v.as_f64()) else {
            return;
        };
        let Some(secs) = secs.filter(|secs| *secs > 0.0) else {
            return;
        };
        if self.messages_delivered == 0 {
            return;
        }
        let busy = cpu_secs / (secs * cpus.max(1) as f64);
        self.extra.insert(
            "bench_busy_fraction".into(),
            serde_json::json!((busy * 100.0).round() / 100.0),
        );
    }

    /// Adds `name`, a count the run made (packets both ways, the server's context switches,
    /// bytes written to the disk); `note_per_delivered` divides it by the deliveries.
    pub fn record_count(&mut self, name: &str, count: u64) {
        self.extra.insert(name.into(), serde_json::json!(count));
    }

    /// Adds `{name}_per_delivered` for every count in `PER_DELIVERED` the report holds, once
    /// it has deliveries.
    pub fn note_per_delivered(&mut self) {
        if self.messages_delivered == 0 {
            return;
        }
        for name in PER_DELIVERED {
            let Some(count) = self.extra.get(*name).and_then(|v| v.as_u64()) else {
                continue;
            };
            let per_delivered = count as f64 / self.messages_delivered as f64;
            self.extra.insert(
                format!("{name}_per_delivered"),
                serde_json::json!((per_delivered * 100.0).round() / 100.0),
            );
        }
    }

    /// Whether the load generator was busy enough to distort the latencies it measured.
    pub fn load_generator_saturated(&self) -> bool {
        self.extra
            .get("bench_busy_fraction")
            .and_then(|v| v.as_f64())
            .is_some_and(|busy| busy >= LOAD_GENERATOR_BUSY_WARN)
    }

    pub fn print(&self) {
        println!();
        println!(
            "courier-bench {} ({:.2} s)",
            self.workload, self.duration_secs
        );
        println!("  params     {}", self.params);
        if self.messages_sent > 0 {
            println!(
                "  messages   sent {}  acked {}  delivered {}  ({:.0} delivered/s)",
                self.messages_sent,
                self.messages_acked,
                self.messages_delivered,
                self.delivered_per_sec
            );
            println!(
                "  checks     lost {}  duplicates {}  reordered {}  seq mismatches {}  misdelivered {}  => {}",
                self.lost,
                self.duplicates,
                self.reordered,
                self.seq_mismatches,
                self.misdelivered,
                if self.passed() { "PASS" } else { "FAIL" }
            );
        }
        println!("  latency µs         p50      p90      p99    p99.9      max    count");
        for (name, latency) in [
            ("send→ack", &self.send_ack_latency),
            ("send→deliver", &self.deliver_latency),
        ] {
            if let Some(l) = latency {
                println!(
                    "  {name:<14} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
                    l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us, l.count
                );
            }
        }
        let server = &self.server;
        if let Some(cpu) = self.edge_cpu_secs {
            println!("  {server:<12} cpu {cpu:.2} s");
            if let Some(per_cpu) = self.delivered_per_edge_cpu_sec() {
                println!("  {server:<12} {per_cpu:.0} delivered per server CPU-second");
            }
        }
        if let Some(rss) = self.edge_rss_bytes {
            println!(
                "  {server:<12} rss {:.1} MiB",
                rss as f64 / (1024.0 * 1024.0)
            );
        }
        for (key, value) in &self.extra {
            match value.as_array() {
                // A table: one row per line.
                Some(rows) => {
                    for row in rows {
                        println!("  {key:<10} {row}");
                    }
                }
                None => println!("  {key:<10} {value}"),
            }
        }
        for error in &self.errors {
            println!("  error      {error}");
        }
    }

    pub fn write_json(&self, path: &Path) -> Result<(), String> {
        let mut value =
            serde_json::to_value(self).map_err(|e| format!("cannot encode the report: {e}"))?;
        if let Some(object) = value.as_object_mut() {
            object.insert(
                "delivered_per_edge_cpu_sec".into(),
                serde_json::json!(self.delivered_per_edge_cpu_sec()),
            );
        }
        let text = serde_json::to_string_pretty(&value)
            .map_err(|e| format!("cannot encode the report: {e}"))?;
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }
}

/// TCP segments, from the kernel's counters in `/proc/net/snmp` (IPv4 and IPv6 alike): what
/// the Redis peer's runs exchange, for a packets-per-message figure next to Courier's UDP
/// datagrams (which its clients' QUIC connections count themselves). The counters are the
/// machine's, so a run's share is exact only while nothing else on the box uses TCP. On
/// loopback every segment counts once as sent and once as received, so the sent count is
/// every segment between the clients and the server, both ways.
#[derive(Debug, Clone, Copy)]
pub struct TcpSegments {
    received: u64,
    sent: u64,
}

impl TcpSegments {
    /// The counters now, or `None` where `/proc/net/snmp` cannot be read (not Linux).
    pub fn read() -> Option<TcpSegments> {
        TcpSegments::parse(&std::fs::read_to_string("/proc/net/snmp").ok()?)
    }

    /// The counters in the text of `/proc/net/snmp`.
    fn parse(snmp: &str) -> Option<TcpSegments> {
        // Two lines: the field names, then the values.
        let mut lines = snmp.lines().filter(|line| line.starts_with("Tcp:"));
        let names: Vec<&str> = lines.next()?.split_whitespace().collect();
        let values: Vec<&str> = lines.next()?.split_whitespace().collect();
        let field = |name: &str| -> Option<u64> {
            let index = names.iter().position(|n| *n == name)?;
            values.get(index)?.parse().ok()
        };
        Some(TcpSegments {
            received: field("InSegs")?,
            sent: field("OutSegs")?,
        })
    }

    /// Adds the segments since `self` to `report` (`Report::record_count`). `loopback`: the
    /// server is on this machine's loopback (count the sent side only, which holds both
    /// directions); otherwise this machine's sends and receives are the clients' two
    /// directions. Records nothing if the counters cannot be read again.
    pub fn record_since(&self, report: &mut Report, loopback: bool) {
        let Some(now) = TcpSegments::read() else {
            return;
        };
        let sent = now.sent.saturating_sub(self.sent);
        let received = now.received.saturating_sub(self.received);
        let segments = if loopback { sent } else { sent + received };
        report.record_count("tcp_segments", segments);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNMP: &str = "\
Ip: Forwarding DefaultTTL InReceives
Ip: 1 64 123
Tcp: RtoAlgorithm RtoMin InSegs OutSegs RetransSegs
Tcp: 1 200 1744947 1743673 334
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors
Udp: 7677192 5907 31585 7747558 31585
";

    #[test]
    fn the_load_generators_busy_fraction_uses_the_measured_stretch_and_its_cpus() {
        let mut paced = Report::new("pairs", serde_json::json!({}));
        paced.duration_secs = 5.0;
        paced.messages_delivered = 50_000;
        paced
            .extra
            .insert("bench_cpu_secs".into(), serde_json::json!(4.8));
        paced.note_load_generator_busy(1);
        assert_eq!(paced.extra["bench_busy_fraction"], serde_json::json!(0.96));
        assert!(paced.load_generator_saturated());
        paced.note_load_generator_busy(2);
        assert_eq!(paced.extra["bench_busy_fraction"], serde_json::json!(0.48));
        assert!(!paced.load_generator_saturated());

        // A drain counts the drain alone, not the sends before it.
        let mut drain = Report::new("offline", serde_json::json!({}));
        drain.duration_secs = 3.0;
        drain.messages_delivered = 100_000;
        for (key, value) in [
            ("bench_cpu_secs", 2.9),
            ("drain_secs", 0.5),
            ("drain_bench_cpu_secs", 0.2),
        ] {
            drain.extra.insert(key.into(), serde_json::json!(value));
        }
        drain.note_load_generator_busy(1);
        assert_eq!(drain.extra["bench_busy_fraction"], serde_json::json!(0.4));
    }

    #[test]
    fn seqs_count_lost_and_mismatched_messages_by_index() {
        let mut report = Report::new("pairs", serde_json::json!({}));
        // Index 0 fine, 1 lost, 2 never acknowledged (not lost), 3 under another seq.
        report.check_seqs([5, 6, 0, 8].into_iter(), [5, 0, 7, 9].into_iter());
        assert_eq!((report.lost, report.seq_mismatches), (1, 1));
    }

    #[test]
    fn counts_are_divided_by_the_deliveries_once_there_are_some() {
        let mut report = Report::new("pairs", serde_json::json!({}));
        report.record_count("udp_datagrams", 331_000);
        report.record_count("edge_context_switches", 27_783);
        report.note_per_delivered();
        assert!(!report.extra.contains_key("udp_datagrams_per_delivered"));
        report.messages_delivered = 100_000;
        report.note_per_delivered();
        assert_eq!(
            report.extra["udp_datagrams_per_delivered"],
            serde_json::json!(3.31)
        );
        assert_eq!(
            report.extra["edge_context_switches_per_delivered"],
            serde_json::json!(0.28)
        );
        assert!(!report.extra.contains_key("tcp_segments_per_delivered"));
    }

    #[test]
    fn tcp_segments_are_read_by_field_name_from_the_tcp_lines() {
        let tcp = TcpSegments::parse(SNMP).expect("tcp lines");
        assert_eq!((tcp.received, tcp.sent), (1_744_947, 1_743_673));
        assert!(TcpSegments::parse("Ip: Forwarding\nIp: 1\n").is_none());
    }
}
