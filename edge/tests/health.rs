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

/// One client that holds every connection it may (idle ones) does not fail the probes from
/// another address: connections are capped per address too. Before, sixteen idle connections
/// from anywhere took every slot, and the probes were refused.
#[test]
fn a_client_holding_connections_does_not_fail_the_probes_from_elsewhere() {
    let addr = common::free_addr().to_string();
    let edge = Edge::start_with(1, &format!("[metrics]\nlisten = \"{addr}\"\n"), &[]);
    // From 127.0.0.2 (loopback answers the whole of 127/8), sixteen that send nothing.
    let idle: Vec<TcpStream> = (0..16).map(|_| connect_from("127.0.0.2", &addr)).collect();
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(
        get(&addr, "GET /livez HTTP/1.1\r\n\r\n"),
        (200, "ok\n".into()),
        "the probe from 127.0.0.1 is answered"
    );
    drop(idle);
    drop(edge);
}

/// A TCP connection to `to` from the address `from`, on a port the kernel picks.
fn connect_from(from: &str, to: &str) -> TcpStream {
    let from: std::net::SocketAddr = format!("{from}:0").parse().expect("from");
    let to: std::net::SocketAddr = to.parse().expect("to");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    let stream = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(from).expect("bind the source address");
        socket
            .connect(to)
            .await
            .expect("connect from the source address")
    });
    let stream = stream.into_std().expect("a std stream");
    stream.set_nonblocking(false).expect("blocking");
    stream
}
