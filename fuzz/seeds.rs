//! Writes starting inputs for the fuzz targets into `corpus/`: a session where two users log
//! in on both shards, send, commit, acknowledge and sync, and one where the other edge of the
//! cluster links in, forwards a send and answers one, so the fuzzer starts from deep states
//! instead of having to find a valid token first. Run by `fuzz/run` (without instrumentation).

use courier_core::placement::home_edge;
use courier_protocol::link::{LinkFrame, LinkSendResult, encode_link};
use courier_protocol::{Frame, encode_to_vec};

/// The cluster of `fuzz_targets/session.rs`: this edge, its peer, and an edge that is dead.
const EDGES: [u32; 3] = [1, 2, 3];

/// The `nth` user who lives on `edge`.
fn user_on(edge: u32, nth: usize) -> u64 {
    (1..)
        .filter(|user| home_edge(*user, &EDGES) == edge)
        .nth(nth)
        .expect("users on every edge")
}

fn link_frame(op: u8, frame: &LinkFrame, out: &mut Vec<u8>) {
    out.push(op);
    encode_link(frame, out).expect("seed link frames encode");
}

fn frame(op: u8, frame: &Frame, out: &mut Vec<u8>) {
    out.push(op);
    out.extend(encode_to_vec(frame).expect("seed frames encode"));
}

fn hello(user: u64, device: u32) -> Frame {
    Frame::Hello {
        token: format!("{user}:{device}").into_bytes(),
        device,
        acked_up_to: 0,
        resume_after_seq: 0,
    }
}

fn main() -> std::io::Result<()> {
    // Ops (fuzz_targets/session.rs): bit 0 shard, bits 1-2 slot, bit 3 flag, high nibble kind:
    // 0 open, 1-6 frame, 7 lost, 8 time, 9 partial frame, 10 outbound bytes, 11 shedding,
    // 12 commit (bits 1-3 zero; otherwise takeover: 1 serve edge 3, 2 serve edge 2, 3 release
    // 3, 4 release 2, 5 edge 2 serves 3, 6 no one serves for another, 7 drain to edge 2),
    // 13 link frame from the peer, 14 answer on this shard's link, 15 link events (bits 2-3:
    // up, down, open, closed).
    let (alice, bob) = (user_on(1, 0), user_on(1, 1));
    let mut session = Vec::new();
    session.push(0x00); // open shard 0, slot 0
    frame(0x10, &hello(alice, 0), &mut session);
    session.push(0x01); // open shard 1, slot 0
    frame(0x11, &hello(bob, 0), &mut session);
    session.extend([0xC0, 0xC1, 0xC0, 0xC1]); // commit the links
    for client_id in 1..=4 {
        let send = Frame::Send {
            client_id,
            to: bob,
            body: b"seed".to_vec(),
            ttl_secs: None,
        };
        frame(0x10, &send, &mut session);
    }
    session.extend([0xC0, 0xC1, 0xC0, 0xC1]);
    frame(0x11, &Frame::Ack { up_to_seq: 2 }, &mut session);
    frame(0x11, &Frame::Sync { after_seq: 0 }, &mut session);
    session.extend([0x8F, 0xC0, 0xC1]);
    std::fs::create_dir_all("corpus/session")?;
    std::fs::write("corpus/session/seed-two-users", &session)?;

    // The peer edge links to shard 0 and forwards a send to a user here; shard 0's own link
    // comes up, a local user sends to a user of the peer, and the peer answers.
    let carol = user_on(2, 0);
    let mut link = Vec::new();
    link.push(0x00);
    frame(0x10, &hello(alice, 0), &mut link);
    link.extend([0xC0, 0xC0]);
    link.push(0xF8); // open link 0 on shard 0
    link_frame(0xD0, &LinkFrame::Hello { edge: 2 }, &mut link);
    let forwarded = LinkFrame::Send {
        request_id: 1,
        sender: carol,
        client_id: 9,
        to: alice,
        body: b"from the peer".to_vec(),
        ttl_secs: None,
    };
    link_frame(0xD0, &forwarded, &mut link);
    link.extend([0xC0, 0xC0]);
    link.push(0xF0); // shard 0's link to the peer is up
    let send = Frame::Send {
        client_id: 1,
        to: carol,
        body: b"to the peer".to_vec(),
        ttl_secs: None,
    };
    frame(0x10, &send, &mut link);
    let answer = LinkFrame::SendResult {
        request_id: 1,
        result: LinkSendResult::Stored {
            seq: 1,
            server_time_ms: 1_700_000_000_000,
        },
    };
    link_frame(0xE0, &answer, &mut link);
    link.push(0xF4); // and down
    std::fs::write("corpus/session/seed-link", &link)?;

    // Edge 3 is dead and served here: its user logs in, sends to a user of this edge, and is
    // redirected when edge 3 is released; then this edge drains.
    let dave = user_on(3, 0);
    let mut takeover = vec![0xC2, 0xC3]; // both shards serve edge 3
    takeover.push(0x00);
    frame(0x10, &hello(dave, 0), &mut takeover);
    takeover.extend([0xC0, 0xC1, 0xC0, 0xC1]);
    let send = Frame::Send {
        client_id: 1,
        to: alice,
        body: b"from a guest".to_vec(),
        ttl_secs: None,
    };
    frame(0x10, &send, &mut takeover);
    takeover.extend([0xC0, 0xC1, 0xC0, 0xC1]);
    takeover.extend([0xC6, 0xC7]); // release edge 3
    takeover.extend([0xCE, 0xCF]); // drain to edge 2
    std::fs::write("corpus/session/seed-takeover", &takeover)?;

    let mut stream = Vec::new();
    for f in [
        hello(5, 0),
        Frame::Ping { nonce: 1 },
        Frame::Ack { up_to_seq: 3 },
    ] {
        stream.extend(encode_to_vec(&f).expect("encode"));
    }
    std::fs::create_dir_all("corpus/decode")?;
    std::fs::write("corpus/decode/seed-frames", &stream)?;
    Ok(())
}
