//! The store conformance suite: one set of checks that every backend must pass.
//!
//! Backend tests call [`run_all`] with a function that opens a fresh, empty store. It checks
//! the transaction semantics the commit logic relies on (read-your-writes, atomic commit,
//! ordered ranges, range clears, atomic mutations, durability across reopen) and then runs the
//! commit logic itself on the backend. A failed check panics with the case's name.

use super::{Store, StoreError, Transaction};
use crate::commit::{self, Outcome, Request, SendRequest};
use crate::membership::{self, Membership};
use crate::takeover::{self, LeasedStore};
use crate::{CoreConfig, keys};

/// A backend under test.
pub trait Harness {
    type S: Store;

    fn store(&self) -> &Self::S;

    /// Closes and reopens the store as a restart would. Committed data must survive.
    fn reopen(&mut self);
}

/// One named check of the suite.
type Case<H> = (&'static str, fn(&mut H));

/// Runs every case, each on a fresh store from `fresh`.
pub fn run_all<H: Harness>(mut fresh: impl FnMut() -> H) {
    let cases: [Case<H>; 17] = [
        ("ranges_span_every_key_prefix", ranges_span_every_key_prefix),
        ("reads_its_own_writes", reads_its_own_writes),
        ("commit_is_all_or_nothing", commit_is_all_or_nothing),
        (
            "ranges_are_ordered_limited_and_merged",
            ranges_are_ordered_limited_and_merged,
        ),
        ("clear_range_is_half_open", clear_range_is_half_open),
        (
            "clear_range_with_keys_clears_like_clear_range",
            clear_range_with_keys_clears_like_clear_range,
        ),
        (
            "clear_range_bounded_clears_a_first_part_or_all",
            clear_range_bounded_clears_a_first_part_or_all,
        ),
        (
            "drop_tables_within_drops_nothing_outside",
            drop_tables_within_drops_nothing_outside,
        ),
        (
            "atomic_mutations_are_little_endian",
            atomic_mutations_are_little_endian,
        ),
        ("commit_versions_increase", commit_versions_increase),
        (
            "committed_data_survives_reopen",
            committed_data_survives_reopen,
        ),
        (
            "commit_logic_assigns_dense_seqs_and_dedupes",
            commit_logic_assigns_dense_seqs_and_dedupes,
        ),
        (
            "commit_logic_acks_and_expires",
            commit_logic_acks_and_expires,
        ),
        (
            "commit_logic_deletes_what_every_device_acked",
            commit_logic_deletes_what_every_device_acked,
        ),
        (
            "commit_logic_forgets_emptied_inboxes",
            commit_logic_forgets_emptied_inboxes,
        ),
        ("commit_logic_purges_an_inbox", commit_logic_purges_an_inbox),
        (
            "leases_fence_the_earlier_holder",
            leases_fence_the_earlier_holder,
        ),
    ];
    for (name, case) in cases {
        eprintln!("store conformance: {name}");
        let mut harness = fresh();
        case(&mut harness);
    }
}

fn get<S: Store>(store: &S, key: &[u8]) -> Option<Vec<u8>> {
    let mut txn = store.begin().expect("begin");
    txn.get(key).expect("get")
}

fn write<S: Store>(store: &S, pairs: &[(&[u8], &[u8])]) {
    let mut txn = store.begin().expect("begin");
    for (key, value) in pairs {
        txn.set(key, value);
    }
    txn.commit().expect("commit");
}

fn keys_of(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<&[u8]> {
    pairs.iter().map(|(k, _)| k.as_slice()).collect()
}

fn reads_its_own_writes<H: Harness>(h: &mut H) {
    let mut txn = h.store().begin().expect("begin");
    assert_eq!(txn.get(b"a").unwrap(), None);
    txn.set(b"a", b"1");
    assert_eq!(txn.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
    txn.clear(b"a");
    assert_eq!(txn.get(b"a").unwrap(), None);
    txn.set(b"a", b"2");
    // A value given in two parts (a message's header and body), short and long.
    let long_tail = [7u8; 300];
    txn.set_concat(b"b", b"he", b"llo");
    txn.set_concat(b"c", b"header ", &long_tail);
    let long = [&b"header "[..], &long_tail[..]].concat();
    assert_eq!(txn.get(b"b").unwrap().as_deref(), Some(&b"hello"[..]));
    assert_eq!(txn.get(b"c").unwrap().as_deref(), Some(&long[..]));
    txn.commit().unwrap();
    assert_eq!(get(h.store(), b"a").as_deref(), Some(&b"2"[..]));
    assert_eq!(get(h.store(), b"b").as_deref(), Some(&b"hello"[..]));
    assert_eq!(get(h.store(), b"c").as_deref(), Some(&long[..]));
}

fn commit_is_all_or_nothing<H: Harness>(h: &mut H) {
    {
        let mut txn = h.store().begin().unwrap();
        txn.set(b"dropped", b"x");
        // Dropped without commit.
    }
    assert_eq!(get(h.store(), b"dropped"), None);
    write(h.store(), &[(b"k1", b"v1"), (b"k2", b"v2")]);
    assert_eq!(get(h.store(), b"k1").as_deref(), Some(&b"v1"[..]));
    assert_eq!(get(h.store(), b"k2").as_deref(), Some(&b"v2"[..]));
}

fn ranges_are_ordered_limited_and_merged<H: Harness>(h: &mut H) {
    write(
        h.store(),
        &[
            (b"r/1", b"a"),
            (b"r/3", b"c"),
            (b"r/5", b"e"),
            (b"s/0", b"x"),
        ],
    );
    let mut txn = h.store().begin().unwrap();
    txn.set(b"r/2", b"b");
    txn.clear(b"r/3");
    txn.set(b"r/4", b"d");
    let all = txn.get_range(b"r/", b"r0", 100).unwrap();
    assert_eq!(keys_of(&all), vec![&b"r/1"[..], b"r/2", b"r/4", b"r/5"]);
    assert_eq!(all[1].1, b"b");
    let limited = txn.get_range(b"r/", b"r0", 2).unwrap();
    assert_eq!(keys_of(&limited), vec![&b"r/1"[..], b"r/2"]);
    let tail = txn.get_range(b"r/2", b"r/5", 100).unwrap();
    assert_eq!(keys_of(&tail), vec![&b"r/2"[..], b"r/4"]);
    assert!(
        txn.get_range(b"r/5", b"r/1", 100).unwrap().is_empty(),
        "empty when begin >= end"
    );
    // A scan sees the same pairs (own writes merged, the limit kept) and stops when told.
    let scanned = |txn: &mut <H::S as Store>::Transaction<'_>, limit: usize, stop_after: usize| {
        let mut seen: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        txn.scan_range(b"r/", b"r0", limit, &mut |key, value| {
            seen.push((key.to_vec(), value.to_vec()));
            seen.len() < stop_after
        })
        .unwrap();
        seen
    };
    for limit in 1..=5 {
        assert_eq!(
            scanned(&mut txn, limit, usize::MAX),
            txn.get_range(b"r/", b"r0", limit).unwrap(),
            "limit {limit}"
        );
    }
    assert_eq!(
        keys_of(&scanned(&mut txn, 100, 3)),
        vec![&b"r/1"[..], b"r/2", b"r/4"]
    );
}

/// Backends may partition keys by their first byte (the fjall one does); ranges must still
/// come back in one order across partitions.
fn ranges_span_every_key_prefix<H: Harness>(h: &mut H) {
    let all: [&[u8]; 10] = [
        b"\x00", b"a1", b"c1", b"cz", b"d1", b"e1", b"o1", b"p1", b"q1", b"z1",
    ];
    let pairs: Vec<(&[u8], &[u8])> = all.iter().map(|k| (*k, &b"v"[..])).collect();
    write(h.store(), &pairs);
    let mut txn = h.store().begin().unwrap();
    let every = txn.get_range(b"", b"\xff", 100).unwrap();
    assert_eq!(keys_of(&every), all.to_vec());
    let middle = txn.get_range(b"c5", b"q1", 100).unwrap();
    assert_eq!(
        keys_of(&middle),
        vec![&b"cz"[..], b"d1", b"e1", b"o1", b"p1"]
    );
    let limited = txn.get_range(b"b", b"\xff", 3).unwrap();
    assert_eq!(keys_of(&limited), vec![&b"c1"[..], b"cz", b"d1"]);
    txn.clear_range(b"cz", b"p1");
    txn.commit().unwrap();
    let mut txn = h.store().begin().unwrap();
    let left = txn.get_range(b"", b"\xff", 100).unwrap();
    assert_eq!(
        keys_of(&left),
        vec![&b"\x00"[..], b"a1", b"c1", b"p1", b"q1", b"z1"]
    );
}

fn clear_range_is_half_open<H: Harness>(h: &mut H) {
    write(
        h.store(),
        &[(b"c/1", b""), (b"c/2", b""), (b"c/3", b""), (b"c/4", b"")],
    );
    let mut txn = h.store().begin().unwrap();
    txn.set(b"c/25", b"own write inside the range");
    txn.clear_range(b"c/2", b"c/4");
    txn.set(b"c/3", b"written again after the clear");
    let seen = txn.get_range(b"c/", b"c0", 100).unwrap();
    assert_eq!(keys_of(&seen), vec![&b"c/1"[..], b"c/3", b"c/4"]);
    txn.commit().unwrap();
    let mut txn = h.store().begin().unwrap();
    let after = txn.get_range(b"c/", b"c0", 100).unwrap();
    assert_eq!(keys_of(&after), vec![&b"c/1"[..], b"c/3", b"c/4"]);
    assert_eq!(after[1].1, b"written again after the clear");
}

/// A range cleared with its keys listed (how acks delete messages) reads and commits exactly
/// as a plain range clear: own writes before it go, writes after it stay, the end is excluded.
/// A listed key outside the range is not deleted.
fn clear_range_with_keys_clears_like_clear_range<H: Harness>(h: &mut H) {
    write(
        h.store(),
        &[
            (b"c/1", b""),
            (b"c/2", b""),
            (b"c/3", b""),
            (b"c/4", b""),
            (b"c/5", b""),
        ],
    );
    let mut txn = h.store().begin().unwrap();
    txn.set(b"c/2", b"own write inside the range");
    txn.clear_range_with_keys(b"c/2", b"c/5", [&b"c/2"[..], b"c/3", b"c/4", b"c/5"]);
    txn.set(b"c/3", b"written again after the clear");
    assert_eq!(txn.get(b"c/2").unwrap(), None);
    assert_eq!(txn.get(b"c/4").unwrap(), None);
    let seen = txn.get_range(b"c/", b"c0", 100).unwrap();
    assert_eq!(keys_of(&seen), vec![&b"c/1"[..], b"c/3", b"c/5"]);
    txn.commit().unwrap();
    let mut txn = h.store().begin().unwrap();
    let after = txn.get_range(b"c/", b"c0", 100).unwrap();
    assert_eq!(keys_of(&after), vec![&b"c/1"[..], b"c/3", b"c/5"]);
    assert_eq!(after[1].1, b"written again after the clear");
    drop(txn);
    h.reopen();
    let mut txn = h.store().begin().unwrap();
    let reopened = txn.get_range(b"c/", b"c0", 100).unwrap();
    assert_eq!(keys_of(&reopened), vec![&b"c/1"[..], b"c/3", b"c/5"]);
}

/// A bounded range clear (how expiry drops old dedupe buckets) removes either the whole range
/// or exactly its first `keys_max` keys as the transaction sees them (own writes included),
/// and says which; repeated, it empties the range and nothing outside it.
fn clear_range_bounded_clears_a_first_part_or_all<H: Harness>(h: &mut H) {
    let stored: Vec<Vec<u8>> = (1..=9).map(|n| format!("b/{n}").into_bytes()).collect();
    let mut pairs: Vec<(&[u8], &[u8])> = stored.iter().map(|k| (k.as_slice(), &b"v"[..])).collect();
    pairs.push((b"c/1", b"outside"));
    write(h.store(), &pairs);
    let mut txn = h.store().begin().unwrap();
    txn.set(b"b/2a", b"own write inside the range");
    let first = txn.clear_range_bounded(b"b/", b"b0", 4).unwrap();
    let seen = txn.get_range(b"b/", b"b0", 100).unwrap();
    txn.commit().unwrap();
    let mut txn = h.store().begin().unwrap();
    let left = txn.get_range(b"b/", b"b0", 100).unwrap();
    assert_eq!(
        keys_of(&seen),
        keys_of(&left),
        "what the transaction saw was committed"
    );
    if first.finished {
        assert!(left.is_empty(), "a finished clear leaves nothing");
    } else {
        assert_eq!(first.keys_read, 4);
        let expected: Vec<&[u8]> = vec![b"b/4", b"b/5", b"b/6", b"b/7", b"b/8", b"b/9"];
        assert_eq!(
            keys_of(&left),
            expected,
            "the first four keys went, own write included"
        );
    }
    drop(txn);
    for _ in 0..5 {
        let mut txn = h.store().begin().unwrap();
        let cleared = txn.clear_range_bounded(b"b/", b"b0", 4).unwrap();
        txn.commit().unwrap();
        if cleared.finished {
            break;
        }
    }
    let mut txn = h.store().begin().unwrap();
    assert!(txn.get_range(b"b/", b"b0", 100).unwrap().is_empty());
    assert_eq!(txn.get(b"c/1").unwrap(), Some(b"outside".to_vec()));
}

/// `drop_tables_within` may drop any key of its range (whatever its engine's tables hold
/// whole), never one outside it, nor change a value; a sweep of the range after it clears the
/// rest. Engines that drop no tables leave everything.
fn drop_tables_within_drops_nothing_outside<H: Harness>(h: &mut H) {
    let begin = keys::dedupe_bucket_start(0);
    let end = keys::dedupe_bucket_start(2);
    let inside: Vec<[u8; 33]> = (0..200).map(|n| keys::dedupe(1, n, 3, n)).collect();
    let outside = [keys::dedupe(2, 1, 3, 1), keys::dedupe(5, 2, 3, 2)];
    let mut pairs: Vec<(&[u8], &[u8])> = inside.iter().map(|k| (&k[..], &b"in"[..])).collect();
    pairs.extend(outside.iter().map(|k| (&k[..], &b"out"[..])));
    pairs.push((b"m/1", b"other tag"));
    write(h.store(), &pairs);
    h.store().drop_tables_within(&begin, &end).unwrap();
    let mut txn = h.store().begin().unwrap();
    for (key, value) in txn.get_range(&begin, &end, 1_000).unwrap() {
        assert_eq!(value, b"in".to_vec(), "a key left inside keeps its value");
        assert!(inside.iter().any(|k| k[..] == key[..]));
    }
    for key in &outside {
        assert_eq!(
            txn.get(key).unwrap(),
            Some(b"out".to_vec()),
            "a key past the end stays"
        );
    }
    assert_eq!(txn.get(b"m/1").unwrap(), Some(b"other tag".to_vec()));
    drop(txn);
    for _ in 0..300 {
        let mut txn = h.store().begin().unwrap();
        let cleared = txn.clear_range_bounded(&begin, &end, 10).unwrap();
        txn.commit().unwrap();
        if cleared.finished {
            break;
        }
    }
    let mut txn = h.store().begin().unwrap();
    assert!(txn.get_range(&begin, &end, 1_000).unwrap().is_empty());
    assert_eq!(txn.get(&outside[0]).unwrap(), Some(b"out".to_vec()));
}

fn atomic_mutations_are_little_endian<H: Harness>(h: &mut H) {
    let mut txn = h.store().begin().unwrap();
    txn.atomic_add(b"n", 5);
    txn.atomic_add(b"n", 7);
    txn.atomic_max(b"m", 9);
    txn.atomic_max(b"m", 4);
    txn.commit().unwrap();
    assert_eq!(get(h.store(), b"n"), Some(12u64.to_le_bytes().to_vec()));
    assert_eq!(get(h.store(), b"m"), Some(9u64.to_le_bytes().to_vec()));
    // Values of one byte carry nothing, so they read the same either way round: these apply
    // to values committed before (as the clock mark and the seq floor do), with a carry
    // and a comparison that a big-endian reading gets wrong (2 and 0).
    let mut txn = h.store().begin().unwrap();
    txn.atomic_max(b"m2", 256);
    txn.atomic_add(b"n2", 255);
    txn.commit().unwrap();
    let mut txn = h.store().begin().unwrap();
    txn.atomic_max(b"m2", 2);
    txn.atomic_add(b"n2", 1);
    txn.commit().unwrap();
    assert_eq!(get(h.store(), b"m2"), Some(256u64.to_le_bytes().to_vec()));
    assert_eq!(get(h.store(), b"n2"), Some(256u64.to_le_bytes().to_vec()));
}

fn commit_versions_increase<H: Harness>(h: &mut H) {
    let mut last = 0;
    for i in 0..3u8 {
        let mut txn = h.store().begin().unwrap();
        txn.set(b"v", &[i]);
        let version = txn.commit().unwrap();
        assert!(version > last, "version {version} after {last}");
        last = version;
    }
}

fn committed_data_survives_reopen<H: Harness>(h: &mut H) {
    write(h.store(), &[(b"durable", b"yes")]);
    {
        let mut txn = h.store().begin().unwrap();
        txn.set(b"uncommitted", b"no");
    }
    h.reopen();
    assert_eq!(get(h.store(), b"durable").as_deref(), Some(&b"yes"[..]));
    assert_eq!(get(h.store(), b"uncommitted"), None);
}

fn send(sender: u64, client_id: u64, to: u64, body: &[u8]) -> Request {
    Request::Send(SendRequest {
        sender,
        client_id,
        to,
        body: body.to_vec(),
        ttl_secs: None,
    })
}

fn seq_of(outcome: &Outcome) -> (u64, bool) {
    match outcome {
        Outcome::Stored { seq, fresh, .. } => (*seq, *fresh),
        Outcome::Linked { .. }
        | Outcome::Acked
        | Outcome::Forgotten { .. }
        | Outcome::Purged { .. }
        | Outcome::UnknownRecipient => {
            panic!("expected a stored outcome")
        }
    }
}

fn commit_logic_assigns_dense_seqs_and_dedupes<H: Harness>(h: &mut H) {
    let config = CoreConfig::default();
    let mut committer = commit::Committer::new(&config);
    let now = 1_000_000;
    let batch = [
        send(1, 10, 7, b"a"),
        send(2, 10, 7, b"b"),
        send(1, 10, 7, b"a again"),
        send(1, 11, 8, b"c"),
    ];
    let outcomes = committer.commit_batch(h.store(), &batch, now).unwrap();
    let seqs: Vec<(u64, bool)> = outcomes.iter().map(seq_of).collect();
    assert_eq!(seqs, vec![(1, true), (2, true), (1, false), (1, true)]);
    let retry = committer
        .commit_batch(h.store(), &[send(2, 10, 7, b"b")], now + 1)
        .unwrap();
    assert_eq!(seq_of(&retry[0]), (2, false));
    let next = committer
        .commit_batch(h.store(), &[send(3, 1, 7, b"d")], now + 2)
        .unwrap();
    assert_eq!(seq_of(&next[0]), (3, true));
    h.reopen();
    let messages = commit::read_inbox(h.store(), 7, 0, now + 3, &config)
        .unwrap()
        .messages;
    let bodies: Vec<&[u8]> = messages.iter().map(|m| m.body.as_slice()).collect();
    assert_eq!(bodies, vec![&b"a"[..], b"b", b"d"]);
    assert_eq!(messages[1].from, 2);
    assert_eq!(
        commit::read_inbox(h.store(), 7, 2, now + 3, &config)
            .unwrap()
            .messages
            .len(),
        1
    );
    assert_eq!(commit::last_seq(h.store(), 7).unwrap(), 3);
}

/// Per-device cursors: a message is deleted once every device of its inbox acknowledged it; a
/// device new to the inbox starts at its head; a cursor never passes the head.
fn commit_logic_deletes_what_every_device_acked<H: Harness>(h: &mut H) {
    let config = CoreConfig::default();
    let mut committer = commit::Committer::new(&config);
    let now = 3 * config.dedupe_window_ms;
    let link = |device, acked_up_to| Request::Link {
        inbox: 20,
        device,
        acked_up_to,
    };
    let ack = |device, up_to_seq| Request::Ack {
        inbox: 20,
        device,
        up_to_seq,
    };
    let stored = |h: &mut H| -> Vec<u64> {
        commit::read_inbox(h.store(), 20, 0, now, &config)
            .unwrap()
            .messages
            .iter()
            .map(|m| m.seq)
            .collect()
    };
    // The inbox's first device gets what was stored before it linked.
    committer
        .commit_batch(h.store(), &[send(1, 100, 20, b"early")], now)
        .unwrap();
    let linked = committer
        .commit_batch(h.store(), &[link(0, 0)], now)
        .unwrap();
    assert_eq!(
        linked,
        vec![Outcome::Linked {
            cursor: 0,
            first_seq: 1,
            last_seq: 1
        }]
    );
    committer
        .commit_batch(h.store(), &[ack(0, 1)], now)
        .unwrap();
    let linked = committer
        .commit_batch(h.store(), &[link(1, 0)], now)
        .unwrap();
    assert_eq!(
        linked,
        vec![Outcome::Linked {
            cursor: 1,
            first_seq: 2,
            last_seq: 1
        }],
        "second device: at the head"
    );
    let sends: Vec<Request> = (1..=4).map(|id| send(1, id, 20, b"m")).collect();
    committer.commit_batch(h.store(), &sends, now).unwrap();

    committer
        .commit_batch(h.store(), &[ack(0, 5)], now)
        .unwrap();
    assert_eq!(stored(h), vec![2, 3, 4, 5], "device 1 has not acked");
    committer
        .commit_batch(h.store(), &[ack(1, 3)], now)
        .unwrap();
    assert_eq!(stored(h), vec![4, 5]);
    h.reopen();
    let mut committer = commit::Committer::new(&config);
    let new_device = committer
        .commit_batch(h.store(), &[link(2, 0)], now)
        .unwrap();
    assert_eq!(
        new_device,
        vec![Outcome::Linked {
            cursor: 5,
            first_seq: 6,
            last_seq: 5
        }],
        "a new device starts at the head"
    );
    // A hostile ack far beyond the head moves the cursor to the head only.
    committer
        .commit_batch(h.store(), &[ack(1, 1_000)], now)
        .unwrap();
    assert!(stored(h).is_empty(), "every device is at 5");
    committer
        .commit_batch(h.store(), &[send(1, 6, 20, b"m")], now)
        .unwrap();
    assert_eq!(stored(h), vec![6], "no cursor passed the head");
    // A device that relinks keeps its cursor, and moves it to what its app consumed.
    let relinked = committer
        .commit_batch(h.store(), &[link(0, 6)], now)
        .unwrap();
    assert_eq!(
        relinked,
        vec![Outcome::Linked {
            cursor: 6,
            first_seq: 7,
            last_seq: 6
        }]
    );
}

fn commit_logic_acks_and_expires<H: Harness>(h: &mut H) {
    let config = CoreConfig::default();
    let mut committer = commit::Committer::new(&config);
    let now = 5 * config.dedupe_window_ms;
    let mut sends: Vec<Request> = (1..=5).map(|id| send(1, id, 9, b"m")).collect();
    sends.push(Request::Link {
        inbox: 9,
        device: 0,
        acked_up_to: 0,
    });
    committer.commit_batch(h.store(), &sends, now).unwrap();
    let ack = [Request::Ack {
        inbox: 9,
        device: 0,
        up_to_seq: 3,
    }];
    assert_eq!(
        committer.commit_batch(h.store(), &ack, now).unwrap(),
        vec![Outcome::Acked]
    );
    let page = commit::read_inbox(h.store(), 9, 0, now, &config).unwrap();
    let left: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
    assert_eq!(left, vec![4, 5]);
    // The page covers the inbox to its last seq: 1..=3 are a declared hole, not a gap.
    assert_eq!((page.covered_up_to, page.more), (5, false));

    // After the retention, the rest expires; after two dedupe windows (and expiry's slack for
    // lagging clocks), the dedupe records go.
    let later = now
        + config.retention_ms
        + config.expiry_bucket_ms
        + 2 * config.dedupe_window_ms
        + commit::DEDUPE_CLEAR_SLACK_MS;
    let expired = commit::read_inbox(h.store(), 9, 0, later, &config).unwrap();
    assert!(expired.messages.is_empty());
    assert_eq!(
        expired.covered_up_to, 5,
        "expired messages are a declared hole"
    );
    // Declared gone, they are gone for every later clock: the read moved the store's clock
    // mark to its time first (a restarted clock starts past it).
    assert_eq!(commit::clock_high_water(h.store()).unwrap(), later);
    let report = commit::expire(h.store(), later, &config).unwrap();
    assert_eq!(report.messages_deleted, 2);
    assert!(!report.more);
    assert_eq!(
        report.emptied,
        vec![9],
        "expiry reports the inbox it emptied"
    );
    let mut txn = h.store().begin().unwrap();
    for tag in [keys::TAG_MESSAGE, keys::TAG_DEDUPE, keys::TAG_EXPIRY] {
        let (begin, end) = keys::tag_range(tag);
        let left = txn.get_range(&begin, &end, 10).unwrap();
        assert!(
            left.is_empty(),
            "keys with tag {} left: {left:?}",
            tag as char
        );
    }
    // The counter stays so sequence numbers never repeat.
    assert_eq!(
        txn.get(&keys::counter(9)).unwrap(),
        Some(5u64.to_le_bytes().to_vec())
    );
    drop(txn);
    // A new committer (as after a restart) reads the counter from the store.
    let mut committer = commit::Committer::new(&config);
    let next = committer
        .commit_batch(h.store(), &[send(1, 99, 9, b"n")], later)
        .unwrap();
    assert_eq!(seq_of(&next[0]), (6, true));
}

/// Issue 12: erasure on request leaves nothing of the inbox but the seq floor and its devices:
/// no message, dedupe record or counter, and each device record reset past the erased seqs,
/// seen at the purge (decision 0044). Its seqs never repeat, and other inboxes keep
/// everything.
fn commit_logic_purges_an_inbox<H: Harness>(h: &mut H) {
    let config = CoreConfig::default();
    let mut committer = commit::Committer::new(&config);
    let now = 5 * config.dedupe_window_ms;
    let link = |inbox| Request::Link {
        inbox,
        device: 0,
        acked_up_to: 0,
    };
    let mut batch: Vec<Request> = (1..=4).map(|id| send(1, id, 9, b"erase me")).collect();
    batch.push(send(1, 5, 8, b"keep me"));
    batch.extend([link(9), link(8)]);
    committer.commit_batch(h.store(), &batch, now).unwrap();
    let outcomes = committer
        .commit_batch(h.store(), &[Request::Purge { inbox: 9 }], now)
        .unwrap();
    assert_eq!(outcomes, vec![Outcome::Purged { last_seq: 4 }]);
    let prefix_left = |prefix: Vec<u8>| {
        let mut end = prefix.clone();
        *end.last_mut().unwrap() += 1;
        let mut txn = h.store().begin().unwrap();
        txn.get_range(&prefix, &end, 10).unwrap().len()
    };
    assert_eq!(
        prefix_left(keys::message(9, 0)[..9].to_vec()),
        0,
        "messages"
    );
    let device_of = |inbox| {
        let mut txn = h.store().begin().unwrap();
        let value = txn.get(&keys::device(inbox, 0)).unwrap()?;
        Some(commit::decode_device(&value).unwrap())
    };
    assert_eq!(
        device_of(9),
        Some((4, now)),
        "the device, reset past the erased seqs"
    );
    let bucket = now / config.dedupe_window_ms;
    assert_eq!(
        prefix_left(keys::dedupe(bucket, 9, 0, 0)[..17].to_vec()),
        0,
        "dedupe records"
    );
    assert!(!commit::has_counter(h.store(), 9).unwrap());
    assert_eq!(
        prefix_left(keys::message(8, 0)[..9].to_vec()),
        1,
        "inbox 8 kept"
    );
    assert!(commit::has_counter(h.store(), 8).unwrap());
    // The committer remembers inbox 9's device records from the link. An ack that was on the
    // way moves no cursor back, whether it commits after the purge or in the same batch.
    let late_ack = Request::Ack {
        inbox: 9,
        device: 0,
        up_to_seq: 4,
    };
    committer
        .commit_batch(h.store(), std::slice::from_ref(&late_ack), now)
        .unwrap();
    assert_eq!(device_of(9), Some((4, now)), "ack after");
    committer
        .commit_batch(h.store(), &[link(9), send(1, 20, 9, b"erase me too")], now)
        .unwrap();
    let late_ack = Request::Ack {
        inbox: 9,
        device: 0,
        up_to_seq: 2,
    };
    committer
        .commit_batch(h.store(), &[Request::Purge { inbox: 9 }, late_ack], now)
        .unwrap();
    assert_eq!(device_of(9), Some((5, now)), "same batch");
    // A retry of a purged send inside the dedupe window is a new message, at a new seq.
    let again = committer
        .commit_batch(h.store(), &[send(1, 1, 9, b"new")], now)
        .unwrap();
    assert_eq!(seq_of(&again[0]), (6, true));
}

/// Issue 11: an inbox expiry emptied leaves no record, and its seqs never repeat.
fn commit_logic_forgets_emptied_inboxes<H: Harness>(h: &mut H) {
    let config = CoreConfig::default();
    let mut committer = commit::Committer::new(&config);
    let now = 5 * config.dedupe_window_ms;
    // Inbox 9 gets three messages nobody reads; inbox 8 gets one.
    let sends: Vec<Request> = (1..=3).map(|id| send(1, id, 9, b"m")).collect();
    committer.commit_batch(h.store(), &sends, now).unwrap();
    committer
        .commit_batch(h.store(), &[send(1, 10, 8, b"m")], now)
        .unwrap();
    let later = now
        + config.retention_ms
        + config.expiry_bucket_ms
        + 2 * config.dedupe_window_ms
        + commit::DEDUPE_CLEAR_SLACK_MS;
    let report = commit::expire(h.store(), later, &config).unwrap();
    let mut emptied = report.emptied.clone();
    emptied.sort_unstable();
    assert_eq!(emptied, vec![8, 9]);
    // A send to 8 comes in before its forget: 8 is not empty any more and keeps its counter.
    let forget = |inbox| Request::Forget { inbox };
    let outcomes = committer
        .commit_batch(
            h.store(),
            &[send(2, 1, 8, b"n"), forget(8), forget(9)],
            later,
        )
        .unwrap();
    assert_eq!(seq_of(&outcomes[0]), (2, true));
    assert_eq!(
        &outcomes[1..],
        &[
            Outcome::Forgotten { last_seq: None },
            Outcome::Forgotten { last_seq: Some(3) }
        ],
        "8 keeps its counter; every seq of 9 is gone"
    );
    assert!(commit::has_counter(h.store(), 8).unwrap());
    assert!(
        !commit::has_counter(h.store(), 9).unwrap(),
        "the emptied inbox's counter is gone"
    );
    assert_eq!(commit::last_seq(h.store(), 9).unwrap(), 3, "from the floor");
    // The inbox's next seq is above every seq it had, from this committer (whose cache knew
    // 9 at 3) and from a new one (as after a restart).
    let next = committer
        .commit_batch(h.store(), &[send(1, 50, 9, b"x")], later)
        .unwrap();
    assert_eq!(seq_of(&next[0]), (4, true));
    let mut fresh = commit::Committer::new(&config);
    let next = fresh
        .commit_batch(h.store(), &[send(1, 51, 7, b"y")], later)
        .unwrap();
    assert_eq!(
        seq_of(&next[0]),
        (4, true),
        "a new inbox starts above the floor"
    );
    // A device linking to a forgotten inbox is told everything up to the floor is gone.
    let linked = fresh
        .commit_batch(
            h.store(),
            &[
                forget(7),
                Request::Link {
                    inbox: 6,
                    device: 0,
                    acked_up_to: 0,
                },
            ],
            later,
        )
        .unwrap();
    assert_eq!(
        linked[1],
        Outcome::Linked {
            cursor: 0,
            first_seq: 4,
            last_seq: 3
        }
    );
    // A read of it covers only what it scanned, not up to the floor: on FoundationDB another
    // shard's forget can raise the floor past a seq a send to it holds and has not committed.
    let page = commit::read_inbox(h.store(), 6, 0, later, &config).unwrap();
    assert_eq!((page.messages.len(), page.covered_up_to), (0, 0));
}

/// Takeover (decision 0015) on this backend: a claim of an edge's lease fences the earlier
/// holder's commits and beats, the new holder continues the inbox where it was, and the lease
/// survives a reopen. A later membership (decision 0016) fences the holder again.
fn leases_fence_the_earlier_holder<H: Harness>(h: &mut H) {
    let config = CoreConfig::default();
    let now = 1_000_000;
    let stores = std::slice::from_ref(h.store());
    let members = Membership::new(1, &[5, 6]);
    assert_eq!(
        membership::join(stores, &members),
        Ok(membership::Joined::Changed { previous: None })
    );
    let own = takeover::claim_own(stores, 5, 1, 1).unwrap();
    let mut earlier = commit::Committer::new(&config);
    let first = earlier
        .commit_batch(
            &LeasedStore::new(h.store(), 5, own),
            &[send(1, 1, 7, b"a")],
            now,
        )
        .unwrap();
    assert_eq!(seq_of(&first[0]), (1, true));
    takeover::renew(stores, 5, own, 1).unwrap();
    let seen = takeover::observe_all(stores, &[5]).unwrap()[&5];
    assert_eq!((seen.lease, seen.beat), (Some(own), 1));
    let taken = takeover::claim(stores, 5, 6, 2, seen, 1).unwrap();
    assert_eq!(taken.epoch, own.epoch + 1);
    let refused = earlier.commit_batch(
        &LeasedStore::new(h.store(), 5, own),
        &[send(1, 2, 7, b"b")],
        now + 1,
    );
    assert_eq!(refused, Err(StoreError::Fenced));
    assert_eq!(takeover::renew(stores, 5, own, 1), Err(StoreError::Fenced));
    let mut successor = commit::Committer::new(&config);
    let next = successor
        .commit_batch(
            &LeasedStore::new(h.store(), 5, taken),
            &[send(1, 2, 7, b"b")],
            now + 2,
        )
        .unwrap();
    assert_eq!(seq_of(&next[0]), (2, true));
    h.reopen();
    let stores = std::slice::from_ref(h.store());
    let seen = takeover::observe_all(stores, &[5]).unwrap()[&5];
    assert_eq!(seen.lease, Some(taken));
    assert_eq!(membership::read(stores).unwrap(), Some(members.clone()));

    // Edge 7 joins with the members changed: the successor, still on the old members, is
    // fenced, and the raised lease survives a reopen.
    let changed = Membership::new(2, &[5, 6, 7]);
    membership::join(stores, &changed).unwrap();
    let refused = successor.commit_batch(
        &LeasedStore::new(h.store(), 5, taken),
        &[send(1, 3, 7, b"c")],
        now + 3,
    );
    assert_eq!(refused, Err(StoreError::Fenced));
    h.reopen();
    let stores = std::slice::from_ref(h.store());
    assert!(matches!(
        membership::join(stores, &members),
        Err(membership::JoinError::Stale { .. })
    ));
    let seen = takeover::observe_all(stores, &[5]).unwrap()[&5];
    assert_eq!(seen.lease.map(|lease| lease.epoch), Some(taken.epoch + 1));
}
