//! Writes starting inputs for the fuzz targets into `corpus/`: a session where two users log
//! in on both shards, send, commit, acknowledge and sync, so the fuzzer starts from deep states
//! instead of having to find a valid token first. Run by `fuzz/run` (without instrumentation).

use courier_protocol::{Frame, encode_to_vec};

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
    // 12-15 commit.
    let mut session = Vec::new();
    session.push(0x00); // open shard 0, slot 0
    frame(0x10, &hello(5, 0), &mut session);
    session.push(0x01); // open shard 1, slot 0
    frame(0x11, &hello(6, 0), &mut session);
    session.extend([0xC0, 0xC1, 0xC0, 0xC1]); // commit the links
    for client_id in 1..=4 {
        let send = Frame::Send {
            client_id,
            to: 6,
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

    let mut stream = Vec::new();
    for f in [hello(5, 0), Frame::Ping { nonce: 1 }, Frame::Ack { up_to_seq: 3 }] {
        stream.extend(encode_to_vec(&f).expect("encode"));
    }
    std::fs::create_dir_all("corpus/decode")?;
    std::fs::write("corpus/decode/seed-frames", &stream)?;
    Ok(())
}
