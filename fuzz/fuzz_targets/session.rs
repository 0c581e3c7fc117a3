//! The session layer of two shards on arbitrary input: connections open and close, send any
//! frame (decoded from the input, so every frame kind and field value the decoder accepts),
//! time passes, batches commit through the real commit logic on the memory store, and reads are
//! served from it. The shards are one edge of a two-edge cluster, so users of the other edge
//! are redirected and sends to them forwarded, and the input also plays the other edge: any
//! link frame on a link it opened or on this shard's link to it, links up, down and closed.
//! A third edge never links: the input makes it dead and served here (takeover: served,
//! released, or served by the peer), and drains this edge, shard by shard as the edge's
//! shards apply such changes at their own ticks. Nothing may panic, and every effect names a
//! connection the shard holds or held.

#![no_main]

use courier_core::CoreConfig;
use courier_core::commit::{Committer, read_inbox};
use courier_core::session::{
    AuthFailure, Authenticator, ClusterView, ConnRef, EdgeMember, EdgeSession, Effect,
    SessionConfig,
};
use courier_core::store::memory::MemoryStore;
use courier_protocol::ErrorCode;
use courier_protocol::link::decode_link;
use libfuzzer_sys::fuzz_target;

/// Tokens are `user:device` in decimal, as in the simulation.
struct FuzzAuth;

impl Authenticator for FuzzAuth {
    fn authenticate(&self, token: &[u8], device: u32, _now: u64) -> Result<u64, AuthFailure> {
        std::str::from_utf8(token)
            .ok()
            .and_then(|t| t.split_once(':'))
            .filter(|(_, d)| d.parse() == Ok(device))
            .and_then(|(u, _)| u.parse().ok())
            .ok_or(AuthFailure {
                code: ErrorCode::Unauthenticated,
                reason: "bad token".into(),
            })
    }
}

const SHARDS: u32 = 2;
const LOCAL_EDGE: u32 = 1;
const PEER_EDGE: u32 = 2;
/// Never links; its users are served here, by the peer, or by no one (takeover).
const DEAD_EDGE: u32 = 3;

fuzz_target!(|data: &[u8]| {
    let core = CoreConfig {
        batch_requests_max: 4,
        queue_requests_max: 8,
        queue_requests_per_sender_max: 3,
        sync_messages_max: 3,
        ..CoreConfig::default()
    };
    let store = MemoryStore::new();
    let mut shards: Vec<EdgeSession<FuzzAuth>> = (0..SHARDS)
        .map(|shard| {
            let mut config = SessionConfig::new(shard as u8, SHARDS, core.clone());
            config.sends_in_flight_per_connection_max = 2;
            config.send_bytes_in_flight_per_connection_max = 100;
            config.send_budget_per_connection = courier_core::budget::SendBudget {
                messages: courier_core::budget::Rate {
                    per_sec: 5,
                    burst: 3,
                },
                bytes: courier_core::budget::Rate::UNLIMITED,
            };
            config.recipients_per_user_per_window_max = 2;
            config.hello_timeout_ms = 500;
            config.frame_timeout_ms = 300;
            config.link_requests_in_flight_max = 3;
            config.link_send_bytes_in_flight_max = 100;
            config.cluster = Some(ClusterView {
                edge: LOCAL_EDGE,
                members: [LOCAL_EDGE, PEER_EDGE, DEAD_EDGE]
                    .into_iter()
                    .map(|id| EdgeMember {
                        id,
                        client_address: format!("edge-{id}:4433"),
                    })
                    .collect(),
            });
            EdgeSession::new(config, FuzzAuth)
        })
        .collect();
    let mut committers: Vec<Committer> = (0..SHARDS).map(|_| Committer::new(&core)).collect();
    let mut guest_committers: Vec<Committer> = (0..SHARDS).map(|_| Committer::new(&core)).collect();
    let mut now_ms: u64 = 1_700_000_000_000;
    let mut generation = 1u64;
    let mut rest = data;
    let mut steps = 0;
    while let Some((&op, tail)) = rest.split_first() {
        steps += 1;
        if steps > 256 {
            break;
        }
        rest = tail;
        let shard = usize::from(op & 1);
        let slot = usize::from((op >> 1) & 3);
        let conn = |generation| ConnRef {
            shard: shard as u8,
            slot,
            generation,
        };
        match op >> 4 {
            0 => {
                generation += 1;
                shards[shard].open_connection(now_ms, conn(generation));
            }
            1..=6 => {
                let Ok(Some((frame, used))) = courier_protocol::decode(rest) else {
                    continue;
                };
                rest = &rest[used..];
                let early = op & 8 != 0;
                shards[shard].handle_frame(now_ms, conn(generation), frame, early);
            }
            7 => shards[shard].connection_lost(conn(generation)),
            8 => {
                now_ms += u64::from(op & 0x0f) * 97;
                for session in shards.iter_mut() {
                    session.handle_deadlines(now_ms);
                }
            }
            9 => shards[shard].set_partial_frame(now_ms, conn(generation), op & 8 != 0),
            10 => shards[shard].set_outbound_bytes(conn(generation), usize::from(op & 8) * 1000),
            11 => shards[shard].set_shedding(op & 8 != 0),
            // The other edge, on a link it opened (`slot` is the link's id) or on this
            // shard's link to it: any frame, which may break the link protocol (an error,
            // after which the driver closes the link).
            13 | 14 => {
                let Ok(Some((frame, used))) = decode_link(rest) else {
                    continue;
                };
                rest = &rest[used..];
                if op >> 4 == 13 {
                    let _ = shards[shard].handle_link_request(now_ms, slot as u64, frame);
                } else {
                    let _ = shards[shard].handle_link_answer(now_ms, PEER_EDGE, frame);
                }
            }
            15 => match (op >> 2) & 3 {
                0 => shards[shard].link_up(PEER_EDGE),
                1 => shards[shard].link_down(PEER_EDGE),
                2 => shards[shard].open_link(slot as u64, None),
                _ => shards[shard].link_closed(slot as u64),
            },
            // Takeover, on one shard (the edge's shards apply it each at its own tick).
            12 if (op >> 1) & 7 != 0 => match (op >> 1) & 7 {
                1 => shards[shard].serve_guest(DEAD_EDGE),
                2 => shards[shard].serve_guest(PEER_EDGE),
                // Released as the view says, or after a fenced commit (no server known).
                3 if generation % 2 == 0 => shards[shard].release_fenced_guest(DEAD_EDGE),
                3 => shards[shard].release_guest(DEAD_EDGE),
                4 => shards[shard].release_guest(PEER_EDGE),
                // Served by the peer, or by no one yet (judged dead, not yet claimed).
                5 => {
                    let server = (generation % 2 == 1).then_some(PEER_EDGE);
                    shards[shard].set_servers([(DEAD_EDGE, server)].into())
                }
                6 => shards[shard].set_servers(Default::default()),
                _ => shards[shard].drain_to(PEER_EDGE),
            },
            _ => {
                if let Some(batch) = shards[shard].poll_batch(now_ms) {
                    let result = committers[shard].commit_batch(&store, &batch.requests, now_ms);
                    shards[shard].handle_commit(now_ms, batch, result);
                }
                if let Some((guest, batch)) = shards[shard].poll_guest_batch(now_ms) {
                    let committer = &mut guest_committers[shard];
                    let result = committer.commit_batch(&store, &batch.requests, now_ms);
                    shards[shard].handle_guest_commit(now_ms, guest, batch, result);
                }
            }
        }
        // Route effects until none are left (each input causes a bounded number).
        for _ in 0..64 {
            let mut any = false;
            for from in 0..shards.len() {
                while let Some(effect) = shards[from].poll_effect() {
                    any = true;
                    match effect {
                        Effect::Route { shard: to, message } => {
                            assert!(u32::from(to) < SHARDS && usize::from(to) != from);
                            shards[usize::from(to)].handle_message(now_ms, message);
                        }
                        Effect::Read {
                            conn,
                            inbox,
                            after_seq,
                        } => {
                            let page = read_inbox(&store, inbox, after_seq, now_ms, &core);
                            shards[from].handle_read(conn, after_seq, page);
                        }
                        Effect::Write { .. }
                        | Effect::Close { .. }
                        | Effect::ResumeInput { .. }
                        | Effect::Redirect { .. }
                        | Effect::LinkWrite { .. }
                        | Effect::LinkReply { .. } => {}
                    }
                }
            }
            if !any {
                break;
            }
        }
    }
});
