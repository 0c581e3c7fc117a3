//! Health checks for supervisors and load balancers, `GET /livez` and `GET /readyz`, and
//! Prometheus metrics, `GET /metrics` (`crate::metrics`), on the `[metrics] listen` address,
//! served off the data path by a thread per connection, at most `CONNECTIONS_MAX` at once.
//!
//! - `/livez` answers 200 while the process runs and every shard that started answers within
//!   `SHARD_SILENT_MAX` (each beats every second from a task on its executor); 503 naming the
//!   shard otherwise, so a supervisor restarts an edge whose shard is wedged.
//! - `/readyz` answers 200 only when every shard runs with its store open, no store is being
//!   reopened after a failed write, and the edge is not draining; otherwise 503 and the reason.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// A request that does not arrive within this long is dropped, and a response not taken
/// within it is given up: a client that sends nothing (or reads nothing) holds its thread
/// no longer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once. One thread served them in turn: a single client that opened a
/// connection and sent nothing, every two seconds, made every liveness probe behind it wait
/// past a supervisor's timeout (Kubernetes': 1 s), and the supervisor restarted the edge.
/// Past this many the newest is closed at once.
const CONNECTIONS_MAX: usize = 16;
/// Connections served at once from one address: one client holding every slot (sixteen that
/// send nothing, opened again as they time out) failed the supervisor's probes from
/// elsewhere, and Kubernetes took the edge out of its load balancer, then restarted it.
const CONNECTIONS_PER_ADDRESS_MAX: usize = 4;
/// After a failed accept (out of file descriptors), the wait before the next: the error
/// repeats at once while the cause lasts, and the loop spun a core.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);
/// Bytes of a request read at most; a health check's request line is far shorter.
const REQUEST_BYTES_MAX: usize = 4096;

/// How often a shard beats (`Health::beat`).
pub const SHARD_BEAT_INTERVAL: Duration = Duration::from_secs(1);
/// A shard that has not beaten for this long is wedged: `/livez` fails. Long next to any pause
/// a shard's executor makes (its store work runs on other threads).
const SHARD_SILENT_MAX: Duration = Duration::from_secs(30);

/// What `/livez` and `/readyz` report, updated by the shards and the main thread.
#[derive(Debug)]
pub struct Health {
    shards: usize,
    /// Since when the beats count.
    started: Instant,
    /// Per shard: milliseconds after `started` of its last beat, plus 1 (0: never beat, not
    /// started yet or still starting).
    beats_ms: Vec<AtomicU64>,
    /// Shards that opened their store and serve.
    shards_ready: AtomicUsize,
    /// Shards whose store is being reopened after a failed write.
    stores_recovering: AtomicUsize,
    draining: Arc<AtomicBool>,
}

impl Health {
    /// `draining` is set as the edge starts to stop (before a hand-over to its successor).
    pub fn new(shards: usize, draining: Arc<AtomicBool>) -> Arc<Health> {
        Arc::new(Health {
            shards,
            started: Instant::now(),
            beats_ms: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            shards_ready: AtomicUsize::new(0),
            stores_recovering: AtomicUsize::new(0),
            draining,
        })
    }

    /// `shard`'s executor ran its beat task now.
    pub fn beat(&self, shard: usize) {
        if let Some(beat) = self.beats_ms.get(shard) {
            let now_ms = self.started.elapsed().as_millis() as u64;
            beat.store(now_ms + 1, Ordering::Relaxed);
        }
    }

    /// `Ok` while every shard that has beaten beat within `silent_max` of `now`, else which
    /// one did not.
    fn liveness_at(&self, now: Instant, silent_max: Duration) -> Result<(), String> {
        let now_ms = now.saturating_duration_since(self.started).as_millis() as u64;
        for (shard, beat) in self.beats_ms.iter().enumerate() {
            let beat = beat.load(Ordering::Relaxed);
            if beat == 0 {
                continue;
            }
            let silent_ms = now_ms.saturating_sub(beat - 1);
            if silent_ms > silent_max.as_millis() as u64 {
                return Err(format!(
                    "shard {shard} has not run its tasks for {} s: it is wedged",
                    silent_ms / 1000
                ));
            }
        }
        Ok(())
    }

    /// `Ok` while the process runs and no shard is wedged, else why.
    pub fn liveness(&self) -> Result<(), String> {
        self.liveness_at(Instant::now(), SHARD_SILENT_MAX)
    }

    pub fn shard_ready(&self) {
        self.shards_ready.fetch_add(1, Ordering::SeqCst);
    }

    /// A shard's store started or finished being reopened.
    pub fn store_recovering(&self, recovering: bool) {
        if recovering {
            self.stores_recovering.fetch_add(1, Ordering::SeqCst);
        } else {
            self.stores_recovering.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// `Ok` when ready, else why not.
    pub fn readiness(&self) -> Result<(), String> {
        if self.draining.load(Ordering::SeqCst) {
            return Err("draining: the edge is shutting down".into());
        }
        let ready = self.shards_ready.load(Ordering::SeqCst);
        if ready < self.shards {
            return Err(format!("starting: {ready} of {} shards ready", self.shards));
        }
        let recovering = self.stores_recovering.load(Ordering::SeqCst);
        if recovering > 0 {
            return Err(format!(
                "{recovering} shard(s) reopening their store after a failed write"
            ));
        }
        Ok(())
    }
}

/// Binds `listen` and serves the health endpoints on a thread of their own.
pub fn start(
    listen: SocketAddr,
    health: Arc<Health>,
    metrics: Arc<crate::metrics::Metrics>,
) -> Result<(), String> {
    let listener = TcpListener::bind(listen).map_err(|e| {
        format!("cannot listen on metrics.listen {listen}: {e}; choose a free address")
    })?;
    std::thread::Builder::new()
        .name("courier-health".into())
        .spawn(move || {
            let serving = Arc::new(Serving::default());
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(stream) => stream,
                    Err(error) => {
                        warn!(%error, "health endpoint: accept failed");
                        std::thread::sleep(ACCEPT_RETRY_DELAY);
                        continue;
                    }
                };
                let Ok(peer) = stream.peer_addr().map(|peer| peer.ip()) else {
                    continue;
                };
                if !serving.admit(peer) {
                    continue; // Dropped: closed at once.
                }
                let (health, metrics, done) = (
                    Arc::clone(&health),
                    Arc::clone(&metrics),
                    Arc::clone(&serving),
                );
                let spawned = std::thread::Builder::new()
                    .name("courier-health-conn".into())
                    .spawn(move || {
                        serve_one(stream, &health, &metrics);
                        done.release(peer);
                    });
                if let Err(error) = spawned {
                    serving.release(peer);
                    warn!(%error, "health endpoint: cannot start a thread for a connection");
                }
            }
        })
        .map_err(|e| format!("cannot start the health thread: {e}"))?;
    info!(%listen, "metrics on /metrics, health checks on /livez and /readyz");
    Ok(())
}

/// Connections being served, by the address they come from (at most `CONNECTIONS_MAX`
/// entries).
#[derive(Default)]
struct Serving {
    by_address: std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>,
}

impl Serving {
    /// Counts a connection from `peer` in, unless the listener or that address is at its
    /// bound.
    fn admit(&self, peer: IpAddr) -> bool {
        let mut by_address = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = by_address.values().sum();
        let from_peer = by_address.get(&peer).copied().unwrap_or(0);
        if total >= CONNECTIONS_MAX || from_peer >= CONNECTIONS_PER_ADDRESS_MAX {
            return false;
        }
        by_address.insert(peer, from_peer + 1);
        true
    }

    fn release(&self, peer: IpAddr) {
        let mut by_address = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = by_address.get_mut(&peer) {
            *count -= 1;
            if *count == 0 {
                by_address.remove(&peer);
            }
        }
    }
}

fn serve_one(mut stream: TcpStream, health: &Health, metrics: &crate::metrics::Metrics) {
    // Up to the end of the headers (only Accept matters); whatever arrived is answered.
    let (request, _) = crate::bounded_read::read_until(
        &mut stream,
        REQUEST_TIMEOUT,
        REQUEST_BYTES_MAX,
        |request| {
            request.windows(4).any(|w| w == b"\r\n\r\n") || request.windows(2).any(|w| w == b"\n\n")
        },
    );
    let line = String::from_utf8_lossy(&request);
    // Prometheus asks for OpenMetrics in its Accept header.
    let openmetrics = line
        .to_ascii_lowercase()
        .contains("application/openmetrics-text");
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut content_type = "text/plain; charset=utf-8";
    let (status, body) = match (method, path) {
        ("GET", "/metrics") => {
            content_type = if openmetrics {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            } else {
                "text/plain; version=0.0.4; charset=utf-8"
            };
            ("200 OK", metrics.encode(openmetrics))
        }
        ("GET", "/livez") => match health.liveness() {
            Ok(()) => ("200 OK", "ok\n".to_string()),
            Err(reason) => ("503 Service Unavailable", format!("not live: {reason}\n")),
        },
        ("GET", "/readyz") => match health.readiness() {
            Ok(()) => ("200 OK", "ready\n".to_string()),
            Err(reason) => ("503 Service Unavailable", format!("not ready: {reason}\n")),
        },
        ("GET", _) => (
            "404 Not Found",
            "not found: try /metrics, /livez or /readyz\n".to_string(),
        ),
        _ => ("405 Method Not Allowed", "only GET\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    write_within(&mut stream, response.as_bytes(), REQUEST_TIMEOUT);
}

/// Writes `bytes`, giving up once `timeout` has passed in all: a socket timeout bounds each
/// write, so a client reading a little at a time could hold its thread for as long as it
/// liked.
fn write_within(stream: &mut TcpStream, bytes: &[u8], timeout: std::time::Duration) {
    let deadline = std::time::Instant::now() + timeout;
    let mut written = 0;
    while written < bytes.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || stream.set_write_timeout(Some(left)).is_err() {
            return;
        }
        match stream.write(&bytes[written..]) {
            Ok(0) => return,
            Ok(count) => written += count,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Live while every shard that started beats; a shard silent past the limit is named.
    /// A shard that never beat (still starting) does not count.
    #[test]
    fn live_until_a_started_shard_stops_beating() {
        let health = Health::new(2, Arc::new(AtomicBool::new(false)));
        let limit = Duration::from_secs(30);
        let start = health.started;
        assert_eq!(health.liveness_at(start + 3 * limit, limit), Ok(()));
        health.beat(0);
        health.beat(1);
        assert_eq!(health.liveness_at(Instant::now(), limit), Ok(()));
        let later = Instant::now() + limit + Duration::from_secs(2);
        let error = health.liveness_at(later, limit).unwrap_err();
        assert!(error.contains("shard 0"), "{error}");
    }

    #[test]
    fn ready_only_with_every_shard_up_no_store_reopening_and_no_drain() {
        let draining = Arc::new(AtomicBool::new(false));
        let health = Health::new(2, draining.clone());
        assert!(health.readiness().unwrap_err().contains("0 of 2"));
        health.shard_ready();
        health.shard_ready();
        assert_eq!(health.readiness(), Ok(()));
        health.store_recovering(true);
        assert!(health.readiness().unwrap_err().contains("reopening"));
        health.store_recovering(false);
        assert_eq!(health.readiness(), Ok(()));
        draining.store(true, Ordering::SeqCst);
        assert!(health.readiness().unwrap_err().contains("draining"));
    }
}
