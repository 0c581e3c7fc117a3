//! Reading a small request from a local client within a deadline, for the threads off the data
//! path (health and metrics, the control socket), which serve one client at a time: a client
//! trickling bytes cannot hold them.

use std::io::{self, Read};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// A stream whose reads can time out.
pub(crate) trait TimedStream: Read {
    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl TimedStream for TcpStream {
    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
}

impl TimedStream for UnixStream {
    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
}

/// Why [`read_until`] stopped.
#[derive(Debug)]
pub(crate) enum ReadEnd {
    /// `done` held for what was read.
    Done,
    /// `bytes_max` bytes arrived without `done` holding.
    TooLarge,
    /// `timeout` passed.
    TimedOut,
    /// The client closed its side first.
    Closed,
    Failed(io::Error),
}

/// Reads until `done` holds for what arrived, at most `bytes_max` bytes (a read may overshoot
/// by one chunk) and within `timeout` in all; returns what arrived and why it stopped.
pub(crate) fn read_until<S: TimedStream>(
    stream: &mut S,
    timeout: Duration,
    bytes_max: usize,
    done: impl Fn(&[u8]) -> bool,
) -> (Vec<u8>, ReadEnd) {
    let deadline = Instant::now() + timeout;
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        if done(&bytes) {
            return (bytes, ReadEnd::Done);
        }
        if bytes.len() >= bytes_max {
            return (bytes, ReadEnd::TooLarge);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (bytes, ReadEnd::TimedOut);
        }
        let _ = stream.set_timeout(Some(left));
        match stream.read(&mut chunk) {
            Ok(0) => return (bytes, ReadEnd::Closed),
            Ok(read) => bytes.extend_from_slice(&chunk[..read]),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) if error.kind() == io::ErrorKind::TimedOut => {}
            Err(error) => return (bytes, ReadEnd::Failed(error)),
        }
    }
}
