//! Where a guest's clients go when this edge stops serving them, and where a login for a user
//! whose home no one serves goes: never to a home the view holds dead. A dead edge answers
//! nothing, and a client sent there waits out its whole welcome timeout (10 s) before it comes
//! back; closed as retryable (`ShardUnavailable`), it comes back after its reconnect backoff
//! and is sent to whoever serves its home by then.

mod common;
use common::SimAuth;
use common::one_shard::{cluster_shard, conn, effects, hello, user_homed_on};

use std::collections::BTreeMap;

use courier_core::CoreConfig;
use courier_core::session::{EdgeSession, Effect};
use courier_core::store::StoreError;
use courier_core::store::memory::MemoryStore;
use courier_core::takeover::{Lease, ShardGuests};
use courier_protocol::{ErrorCode, Frame};

const EDGES: [u32; 3] = [1, 2, 3];
const NOW: u64 = 1_700_000_000_000;

fn session() -> EdgeSession<SimAuth> {
    cluster_shard(1, &EDGES)
}

fn user_of(edge: u32) -> u64 {
    user_homed_on(edge, &EDGES)
}

/// How `slot`'s connection ended among `effects`: the address it was sent to, or the code
/// it was closed with.
fn ending(effects: &[Effect], slot: usize) -> Option<Result<String, ErrorCode>> {
    effects.iter().find_map(|effect| match effect {
        Effect::Redirect {
            conn, reconnect_to, ..
        } if conn.slot == slot => Some(Ok(reconnect_to.clone())),
        Effect::Close { conn, code, .. } if conn.slot == slot => Some(Err(*code)),
        _ => None,
    })
}

/// Commits every guest batch waiting, with `result` in place of the store's answer when
/// given.
fn commit_guests(
    session: &mut EdgeSession<SimAuth>,
    guests: &mut ShardGuests,
    store: &MemoryStore,
    result: Option<Result<Vec<courier_core::commit::Outcome>, StoreError>>,
) -> Option<(u32, Lease)> {
    let mut commit = guests.next(session, NOW)?;
    let result = result.unwrap_or_else(|| {
        commit
            .committer
            .commit_batch(store, &commit.batch.requests, NOW)
    });
    guests.finish(session, NOW, commit, result)
}

/// Edge 1 serves edge 2's users as a guest. A guest commit comes back fenced (another edge
/// claimed them; the view does not say who yet): the logged-in client is closed retryably,
/// not sent to edge 2, which the view holds dead. A login meanwhile is turned away the same
/// way, and, once the view names the new server, sent there; with edge 2 judged dead and no
/// one holding its lease, turned away again; with edge 2 unknown to the view (this edge
/// watches no leases), sent home as before.
#[test]
fn a_released_guest_s_clients_are_not_sent_to_a_home_the_view_holds_dead() {
    let user = user_of(2);
    let mut shard = session();
    let mut guests = ShardGuests::new(&CoreConfig::default());
    let store = MemoryStore::new();
    let lease = Lease {
        epoch: 2,
        holder: 1,
        owner: 11,
    };
    // The planner's view while edge 1 holds edge 2's lease: 2 → 1.
    shard.set_servers(BTreeMap::from([(2, Some(1))]));
    guests.apply(&mut shard, &BTreeMap::from([(2, lease)]));

    shard.open_connection(NOW, conn(0));
    shard.handle_frame(NOW, conn(0), hello(user, 0), false);
    assert_eq!(commit_guests(&mut shard, &mut guests, &store, None), None);
    let welcomed = effects(&mut shard).into_iter().any(|effect| {
        matches!(
            effect,
            Effect::Write {
                frame: Frame::Welcome { .. },
                ..
            }
        )
    });
    assert!(welcomed, "logged in as a guest");

    let send = Frame::Send {
        client_id: 1,
        to: user,
        body: b"fenced".to_vec(),
        ttl_secs: None,
    };
    shard.handle_frame(NOW, conn(0), send, false);
    let reported = commit_guests(
        &mut shard,
        &mut guests,
        &store,
        Some(Err(StoreError::Fenced)),
    );
    assert_eq!(
        reported,
        Some((2, lease)),
        "the fence is reported to the planner"
    );
    let released = effects(&mut shard);
    assert_eq!(
        ending(&released, 0),
        Some(Err(ErrorCode::ShardUnavailable)),
        "closed retryably, not sent to the dead home: {released:?}"
    );

    // A login before the planner says who claimed them: turned away too.
    let login = |shard: &mut EdgeSession<SimAuth>, slot: usize| {
        shard.open_connection(NOW, conn(slot));
        shard.handle_frame(NOW, conn(slot), hello(user, 0), false);
        ending(&effects(shard), slot)
    };
    assert_eq!(login(&mut shard, 1), Some(Err(ErrorCode::ShardUnavailable)));
    shard.set_servers(BTreeMap::from([(2, Some(3))]));
    assert_eq!(login(&mut shard, 2), Some(Ok("edge-3".into())));
    shard.set_servers(BTreeMap::from([(2, None)]));
    assert_eq!(login(&mut shard, 3), Some(Err(ErrorCode::ShardUnavailable)));
    shard.set_servers(BTreeMap::new());
    assert_eq!(login(&mut shard, 4), Some(Ok("edge-2".into())));
}
