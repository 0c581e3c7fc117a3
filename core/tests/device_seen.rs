//! A device that stays connected is never forgotten, however long it receives nothing.
//!
//! A device unseen for the retention period is forgotten by the next commit that writes its
//! inbox's devices, and its inbox's messages are then deleted up to the other devices'
//! cursors. Only acks and logins marked a device seen, so one that stayed connected longer than
//! the retention period with nothing to acknowledge was forgotten while it lived: the next
//! message was deleted as soon as another device of the user acknowledged it. The session now
//! marks a connected device seen every `min(retention / 8, 1 h)`.

mod common;
use common::one_shard::{OneShard, delivered};

use courier_core::CoreConfig;
use courier_core::commit;
use courier_core::session::SessionConfig;
use courier_protocol::Frame;

#[test]
fn a_connected_device_is_not_forgotten_however_long_nothing_comes() {
    let core = CoreConfig {
        retention_ms: 80_000,
        ..CoreConfig::default()
    };
    let mut edge = OneShard::new(SessionConfig::new(0, 1, core));
    let (laptop, phone, sender) = (0, 1, 2);
    edge.login(laptop, 1, 0);
    edge.login(sender, 2, 0);
    // Three retention periods pass; the laptop stays connected and nothing comes.
    for _ in 0..240 {
        edge.now += 1_000;
        edge.settle();
    }
    edge.login(phone, 1, 1);
    edge.frame(
        sender,
        Frame::Send {
            client_id: 1,
            to: 1,
            body: b"for both devices".to_vec(),
            ttl_secs: None,
        },
    );
    let seq = *delivered(&edge.settle(), phone)
        .first()
        .expect("delivered to the phone");
    // The phone acknowledges it; the laptop has not yet.
    edge.frame(phone, Frame::Ack { up_to_seq: seq });
    for _ in 0..3 {
        edge.now += 1_000;
        edge.settle();
    }
    let stored = commit::read_inbox(&edge.store, 1, 0, edge.now, &edge.core)
        .expect("read")
        .messages;
    assert!(
        stored.iter().any(|message| message.seq == seq),
        "the message the laptop has not acknowledged is still stored"
    );
}
