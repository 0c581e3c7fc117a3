//! A connection's signals and control frames (`Ack`, `Sync`, `Ping`) are budgeted like its
//! sends: a signal costs a message per connection of its recipient, so a client pipelining
//! them without a bound could congest the shards' channels and stall every commit behind them.
//! Beyond the budget a signal is dropped, a control frame is still handled, and either way the
//! connection's input pauses until the budget refills.

mod common;
use common::one_shard::{OneShard, conn};

use courier_core::CoreConfig;
use courier_core::budget::Rate;
use courier_core::session::SessionConfig;
use courier_protocol::{Frame, SignalKind};

const FLOODER: usize = 0;
const PEER: usize = 1;

fn edge() -> OneShard {
    let mut config = SessionConfig::new(0, 1, CoreConfig::default());
    config.signal_rate_per_connection = Rate {
        per_sec: 10,
        burst: 3,
    };
    config.control_frame_rate_per_connection = Rate {
        per_sec: 10,
        burst: 5,
    };
    let mut edge = OneShard::new(config);
    edge.login(FLOODER, 1, 0);
    edge.login(PEER, 2, 0);
    edge
}

fn signal(n: u8) -> Frame {
    Frame::Signal {
        peer: 2,
        kind: SignalKind::Typing,
        payload: vec![n],
    }
}

fn signals_to(frames: &[(usize, Frame)], slot: usize) -> usize {
    frames
        .iter()
        .filter(|(to, frame)| *to == slot && matches!(frame, Frame::Signal { .. }))
        .count()
}

#[test]
fn signals_past_the_budget_are_dropped_and_pause_the_connection() {
    let mut edge = edge();
    for n in 0..10 {
        edge.frame(FLOODER, signal(n));
    }
    let frames = edge.settle();
    assert_eq!(
        signals_to(&frames, PEER),
        3,
        "the burst, no more: {frames:?}"
    );
    assert!(edge.session.input_paused(conn(FLOODER)));
    assert!(!edge.session.input_paused(conn(PEER)), "others read on");
    assert_eq!(edge.session.stats().frames_over_budget, 7);

    // A tenth of a second later the budget holds one again and reading resumes.
    edge.now += 100;
    edge.settle();
    assert!(!edge.session.input_paused(conn(FLOODER)));
    edge.frame(FLOODER, signal(10));
    assert_eq!(signals_to(&edge.settle(), PEER), 1);
}

#[test]
fn control_frames_past_the_budget_are_handled_and_pause_the_connection() {
    let mut edge = edge();
    for nonce in 0..8 {
        edge.frame(FLOODER, Frame::Ping { nonce });
    }
    let frames = edge.settle();
    let pongs = frames
        .iter()
        .filter(|(to, frame)| *to == FLOODER && matches!(frame, Frame::Pong { .. }))
        .count();
    assert_eq!(pongs, 8, "every frame decoded is handled");
    assert!(edge.session.input_paused(conn(FLOODER)));
    assert_eq!(edge.session.stats().frames_over_budget, 3);
    // Signals have a budget of their own.
    edge.frame(FLOODER, signal(0));
    assert_eq!(signals_to(&edge.settle(), PEER), 1);
}
