//! Issue 12, item 2: `/livez` and `/readyz` on `[metrics] listen`, on the real binary.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::Edge;

fn get(addr: &str, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the health listener");
    stream.write_all(request.as_bytes()).expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[test]
fn livez_and_readyz_answer_once_every_shard_serves() {
    let addr = common::free_addr().to_string();
    let edge = Edge::start_with(2, &format!("[metrics]\nlisten = \"{addr}\"\n"), &[]);
    assert_eq!(
        get(&addr, "GET /livez HTTP/1.1\r\n\r\n"),
        (200, "ok\n".into())
    );
    assert_eq!(
        get(&addr, "GET /readyz HTTP/1.1\r\n\r\n"),
        (200, "ready\n".into())
    );
    assert_eq!(get(&addr, "GET /nothing HTTP/1.1\r\n\r\n").0, 404);
    assert_eq!(get(&addr, "POST /readyz HTTP/1.1\r\n\r\n").0, 405);
    drop(edge);
}

/// A client that opens a connection and sends nothing does not hold up the probes: they are
/// answered while it still waits (one thread served connections in turn, so a probe waited
/// for the idle one's 2 s timeout, past a supervisor's 1 s, and the edge was restarted).
#[test]
fn an_idle_connection_does_not_hold_up_the_probes() {
    let addr = common::free_addr().to_string();
    let edge = Edge::start_with(1, &format!("[metrics]\nlisten = \"{addr}\"\n"), &[]);
    let mut idle = TcpStream::connect(&addr).expect("connect");
    assert_eq!(
        get(&addr, "GET /livez HTTP/1.1\r\n\r\n"),
        (200, "ok\n".into())
    );
    // Had the probe waited for the idle connection, the edge would have closed that by now.
    idle.set_nonblocking(true).expect("nonblocking");
    let mut byte = [0u8; 1];
    match idle.read(&mut byte) {
        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the idle connection was closed before the probe was answered: {other:?}"),
    }
    drop(edge);
}
