//! The commit logic of a home shard, written once against [`Store`].
//!
//! [`Committer::commit_batch`] stores a group-commit batch in one transaction: each send gets the next
//! dense, gapless sequence number of its recipient's inbox unless its (sender, client id) was
//! already stored; each link records a device of an inbox (a new one starts at the inbox's
//! head); each ack moves a device's cursor, and an inbox's messages are deleted up to the
//! lowest cursor of its devices. [`read_inbox`] serves sync, and [`expire`] deletes undelivered
//! messages after their retention and dedupe records after their window.
//!
//! An inbox that expiry emptied is forgotten ([`Request::Forget`]): its counter is deleted and
//! the shard's seq floor (`keys::floor`) raised to its last seq. An inbox without a counter
//! continues from the floor, so a seq is never used twice in an inbox, and a sender who
//! addresses a million ids that never log in leaves no record once their messages expire.

use std::collections::BTreeMap;

use crate::config::HOUR_MS;
use crate::envelope::{self, StoredMessage};
use crate::keys;
use crate::store::{CommitVersion, Store, StoreError, Transaction};
use crate::{CoreConfig, FastHashMap, FastHashSet, UnixMillis, UserId};

/// A request to an inbox's home shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Send(SendRequest),
    /// A device logs in: record it (a device new to the inbox starts at the inbox's head) and
    /// move its cursor to `acked_up_to`, what its application consumed.
    Link {
        inbox: UserId,
        device: u32,
        acked_up_to: u64,
    },
    /// `device` consumed every message of `inbox` up to and including `up_to_seq`. Messages
    /// are deleted once every device of the inbox consumed them.
    Ack {
        inbox: UserId,
        device: u32,
        up_to_seq: u64,
    },
    /// Expiry found `inbox` empty: if it still holds no message, delete its counter and raise
    /// the shard's seq floor to its last seq (decision 0011).
    Forget {
        inbox: UserId,
    },
    /// Erasure on request (`courier-edge ctl purge`): delete every message of `inbox`, its
    /// dedupe records and its counter (then forgotten like an emptied inbox, so its seqs
    /// never repeat), and reset its device records past the erased seqs, seen now (decision
    /// 0044). Messages the user sent to others stay in their inboxes.
    Purge {
        inbox: UserId,
    },
}

/// A message to store. The sender comes from the authenticated connection, never a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendRequest {
    pub sender: UserId,
    pub client_id: u64,
    pub to: UserId,
    pub body: Vec<u8>,
    pub ttl_secs: Option<u32>,
}

/// The result of one request of a committed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The message is stored as `seq`. `fresh` is false when an earlier attempt with the same
    /// (sender, client id) had stored it; then `server_time_ms` is the time of that commit.
    /// `live`: connected devices may get it from this outcome, with this send's body. False
    /// when an earlier attempt stored it and the inbox no longer holds it with this body: it
    /// was consumed or expired (nothing to deliver again), or the retry carries another body
    /// than the one stored (devices must all see the stored one; they read it from the store).
    Stored {
        seq: u64,
        server_time_ms: UnixMillis,
        expire_at_ms: UnixMillis,
        fresh: bool,
        live: bool,
    },
    /// The device's cursor after the link: delivery to it starts after this seq. Every seq
    /// after it and before `first_seq` is gone (acknowledged by every device, or expired);
    /// `first_seq` is the first stored message after the cursor, or the next seq the inbox
    /// will assign when none is stored. `last_seq` is the inbox's last assigned seq: when
    /// `first_seq` is past it, nothing after the cursor is stored, and the connection has
    /// nothing to read before its first live delivery.
    Linked {
        cursor: u64,
        first_seq: u64,
        last_seq: u64,
    },
    Acked,
    /// `Some(last_seq)`: the inbox held no message and was forgotten, so every seq of it up
    /// to `last_seq` is gone for good (its open connections are told: a read of an inbox
    /// without a counter declares no hole past what it scans). `None`: a send came since,
    /// and the inbox keeps its counter.
    Forgotten {
        last_seq: Option<u64>,
    },
    /// Every message of the inbox, up to `last_seq`, is erased.
    Purged {
        last_seq: u64,
    },
    /// Not stored: the recipient has never logged in, and `recipients_must_exist` is set.
    UnknownRecipient,
}

/// Commits batches for one home shard, remembering each inbox's last sequence number.
///
/// The shard is the only writer of its inboxes (the FoundationDB backend fences stale owners),
/// so a sequence number it committed stays the latest until it commits the next: the cache
/// saves one store read per send. It also remembers up to where each inbox is already
/// deleted, so an ack clears only the live messages instead of scanning every tombstone since
/// seq 1, and the inbox's device records, so an ack reads no range at all. Any failed commit
/// empties the cache, because an unknown result may or may not have advanced the counters.
#[derive(Debug)]
pub struct Committer {
    config: CoreConfig,
    known: InboxFacts,
    /// What the batch being committed learns, kept between batches so that its maps keep
    /// their capacity instead of growing from empty in every attempt (−0.6% of a committed
    /// message's instructions in the store bench).
    learned: InboxFacts,
    /// The lease the cache was learned under (`Store::lease_claim`): under another one, the
    /// cache is dropped, since the users' inboxes may have been written by another edge.
    lease_claim: Option<(u32, u64)>,
    /// Logins committed without a write (decision 0034), for the simulation's proof that the
    /// case was exercised.
    logins_unwritten: u64,
}

/// What the committer knows about inboxes from its own commits.
#[derive(Debug, Default)]
struct InboxFacts {
    /// The last sequence number assigned in each inbox.
    last_seqs: FastHashMap<UserId, u64>,
    /// Every message up to this seq is deleted.
    acked_up_to: FastHashMap<UserId, u64>,
    /// Expiry index entries (bucket, inbox) already written: an inbox's entry is written once
    /// per bucket, not once per batch.
    expiry_written: FastHashSet<(u64, UserId)>,
    /// Inboxes this batch forgot or purged (only in what a batch learned): the cache's last
    /// seq and device records no longer apply to them.
    forgotten: FastHashSet<UserId>,
    /// Every device record of an inbox, as committed: each ack rewrites one, and in fjall's
    /// memtable a range over keys rewritten thousands of times since the last flush walks
    /// every version, so reading the records back on every ack cost more than the ack.
    devices: FastHashMap<UserId, Vec<DeviceRecord>>,
    /// The records in `devices`, which the cache's bound counts (an inbox holds up to
    /// `DEVICES_PER_INBOX_MAX`).
    device_records: usize,
    /// Logins of this batch that left their device record as it was (only in what a batch
    /// learned).
    logins_unwritten: u64,
}

/// A device record: everything up to `cursor` consumed; last linked or acked at `last_seen_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DeviceRecord {
    device: u32,
    cursor: u64,
    last_seen_ms: UnixMillis,
}

impl InboxFacts {
    fn len(&self) -> usize {
        self.last_seqs.len()
            + self.acked_up_to.len()
            + self.expiry_written.len()
            + self.device_records
    }

    fn clear(&mut self) {
        self.last_seqs.clear();
        self.acked_up_to.clear();
        self.expiry_written.clear();
        self.forgotten.clear();
        self.devices.clear();
        self.device_records = 0;
        self.logins_unwritten = 0;
    }

    fn insert_devices(&mut self, inbox: UserId, records: Vec<DeviceRecord>) {
        self.device_records += records.len();
        if let Some(old) = self.devices.insert(inbox, records) {
            self.device_records -= old.len();
        }
    }

    fn remove_devices(&mut self, inbox: UserId) {
        if let Some(old) = self.devices.remove(&inbox) {
            self.device_records -= old.len();
        }
    }

    /// Takes in what a batch learned, leaving `learned` empty with its capacity kept.
    fn absorb(&mut self, learned: &mut InboxFacts) {
        for inbox in learned.forgotten.drain() {
            if !learned.last_seqs.contains_key(&inbox) {
                self.last_seqs.remove(&inbox);
            }
            self.acked_up_to.remove(&inbox);
            self.remove_devices(inbox);
        }
        self.last_seqs.extend(learned.last_seqs.drain());
        self.acked_up_to.extend(learned.acked_up_to.drain());
        self.expiry_written.extend(learned.expiry_written.drain());
        for (inbox, records) in learned.devices.drain() {
            self.insert_devices(inbox, records);
        }
        learned.device_records = 0;
    }
}

impl Committer {
    pub fn new(config: &CoreConfig) -> Committer {
        Committer {
            config: config.clone(),
            known: InboxFacts::default(),
            learned: InboxFacts::default(),
            lease_claim: None,
            logins_unwritten: 0,
        }
    }

    /// Commits `requests` in one transaction, retrying conflicts and unknown results up to
    /// `config.commit_attempts_max` times. Returns one outcome per request, in order.
    ///
    /// Every write is idempotent under retry: a send whose earlier attempt landed is found by
    /// its dedupe record and answered with the same sequence number.
    pub fn commit_batch<S: Store>(
        &mut self,
        store: &S,
        requests: &[Request],
        now: UnixMillis,
    ) -> Result<Vec<Outcome>, StoreError> {
        self.commit_batch_with(store, requests, now, false)
            .map(|(outcomes, _)| outcomes)
    }

    /// Like [`commit_batch`](Committer::commit_batch), but on a store that
    /// [`defers_sync`](Store::defers_sync) returns once the batch is written, before it is
    /// durable, with the version to make durable with [`Store::sync_through`] before anyone
    /// is told (decision 0027); `None` when the commit is durable already. What the batch
    /// taught this committer holds for the next batch, written on top of it; if the sync
    /// fails, the caller calls [`forget_cached`](Committer::forget_cached).
    pub fn commit_batch_unsynced<S: Store>(
        &mut self,
        store: &S,
        requests: &[Request],
        now: UnixMillis,
    ) -> Result<(Vec<Outcome>, Option<CommitVersion>), StoreError> {
        let unsynced = store.defers_sync();
        let (outcomes, version) = self.commit_batch_with(store, requests, now, unsynced)?;
        Ok((outcomes, unsynced.then_some(version)))
    }

    /// Forgets every cached fact (last seqs, cursors): after a commit this committer wrote
    /// failed to become durable, they may be ahead of the store.
    pub fn forget_cached(&mut self) {
        self.known.clear();
    }

    /// Logins committed that left their device's record as it was (decision 0034).
    pub fn logins_unwritten(&self) -> u64 {
        self.logins_unwritten
    }

    fn commit_batch_with<S: Store>(
        &mut self,
        store: &S,
        requests: &[Request],
        now: UnixMillis,
        unsynced: bool,
    ) -> Result<(Vec<Outcome>, CommitVersion), StoreError> {
        let lease_claim = store.lease_claim();
        if lease_claim != self.lease_claim {
            self.known.clear();
            self.lease_claim = lease_claim;
        }
        // Sequence numbers that an attempt with an unknown result may have committed. If a
        // retry then finds the same seq through the dedupe record, the message is still fresh:
        // nobody has been told about it yet.
        let mut maybe_committed: Vec<Option<u64>> = vec![None; requests.len()];
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = self.attempt(store, requests, now, unsynced);
            let (mut outcomes, version) = match result {
                Ok(written) => written,
                Err((error, outcomes)) => {
                    self.known.clear();
                    if !(error.is_retryable() && attempt < self.config.commit_attempts_max) {
                        return Err(error);
                    }
                    if error == StoreError::CommitUnknown {
                        for (slot, outcome) in maybe_committed.iter_mut().zip(&outcomes) {
                            if let Outcome::Stored {
                                seq, fresh: true, ..
                            } = outcome
                            {
                                *slot = Some(*seq);
                            }
                        }
                    }
                    continue;
                }
            };
            for (outcome, earlier) in outcomes.iter_mut().zip(&maybe_committed) {
                if let Outcome::Stored { seq, fresh, .. } = outcome
                    && !*fresh
                    && *earlier == Some(*seq)
                {
                    *fresh = true;
                }
            }
            if self.known.len() + self.learned.len() > self.config.seq_cache_entries_max {
                // Bounded: start over rather than track recency; misses only cost a read.
                self.known.clear();
            }
            self.logins_unwritten += self.learned.logins_unwritten;
            self.known.absorb(&mut self.learned);
            return Ok((outcomes, version));
        }
    }

    /// One transaction; what it learns is left in `self.learned`. On failure, returns the
    /// outcomes it would have had, so the caller can remember which sequence numbers an
    /// unknown commit may have stored.
    fn attempt<S: Store>(
        &mut self,
        store: &S,
        requests: &[Request],
        now: UnixMillis,
        unsynced: bool,
    ) -> Result<(Vec<Outcome>, CommitVersion), (StoreError, Vec<Outcome>)> {
        self.learned.clear();
        let begun = if unsynced {
            store.begin_unsynced()
        } else {
            store.begin()
        };
        let mut txn = begun.map_err(|error| (error, Vec::new()))?;
        let outcomes = write_batch(
            &mut txn,
            requests,
            now,
            &self.config,
            &self.known,
            &mut self.learned,
        )
        .map_err(|error| (error, Vec::new()))?;
        match txn.commit() {
            Ok(version) => Ok((outcomes, version)),
            Err(error) => Err((error, outcomes)),
        }
    }
}

/// Writes one attempt of a batch into `txn`.
///
/// `known` holds what earlier commits established; `learned` receives what this batch
/// establishes (last seqs are also written back to the store once at the end).
fn write_batch<T: Transaction>(
    txn: &mut T,
    requests: &[Request],
    now: UnixMillis,
    config: &CoreConfig,
    known: &InboxFacts,
    learned: &mut InboxFacts,
) -> Result<Vec<Outcome>, StoreError> {
    let dedupe_bucket = now / config.dedupe_window_ms;
    // New cursors of the devices this batch links or acks.
    let mut devices: BTreeMap<(UserId, u32), u64> = BTreeMap::new();
    let mut seqs = SeqSource::default();
    let mut outcomes = Vec::with_capacity(requests.len());
    // Every send's dedupe lookups start loading at once: each would otherwise wait for its
    // own memory load (the embedded stores' filter, decision 0030), or on FoundationDB its own
    // round trip, behind the sends before it. So do the counters of inboxes not cached.
    for request in requests {
        if let Request::Send(send) = request {
            for bucket in dedupe_buckets(dedupe_bucket) {
                txn.prefetch(&keys::dedupe(bucket, send.to, send.sender, send.client_id));
            }
            if !known.last_seqs.contains_key(&send.to) {
                txn.prefetch(&keys::counter(send.to));
            }
        }
    }
    for request in requests {
        let outcome = match request {
            Request::Send(send) => {
                if let Some(found) = find_dedupe(txn, dedupe_bucket, send, now)? {
                    found
                } else if config.recipients_must_exist
                    && !learned.last_seqs.contains_key(&send.to)
                    && !known.last_seqs.contains_key(&send.to)
                    && stored_devices(txn, send.to, learned, known)?.is_empty()
                {
                    // The deployment's directory is the set of users that ever logged in: a
                    // send to anyone else creates nothing.
                    Outcome::UnknownRecipient
                } else {
                    let last = seqs.last_seq_of(txn, send.to, learned, known)?;
                    let seq = last.checked_add(1).ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "inbox {} has used every sequence number",
                            send.to
                        ))
                    })?;
                    learned.last_seqs.insert(send.to, seq);
                    let ttl_ms = send
                        .ttl_secs
                        .map_or(config.retention_ms, |ttl| u64::from(ttl) * 1000);
                    let expire_at_ms = now.saturating_add(ttl_ms.min(config.retention_ms));
                    txn.set_concat(
                        &keys::message(send.to, seq),
                        &envelope::header(send.sender, now, expire_at_ms),
                        &send.body,
                    );
                    let (record, record_bytes) =
                        dedupe_record(seq, now, expire_at_ms, txn.holds_short_values_inline());
                    txn.set(
                        &keys::dedupe(dedupe_bucket, send.to, send.sender, send.client_id),
                        &record[..record_bytes],
                    );
                    let expiry = (expire_at_ms / config.expiry_bucket_ms, send.to);
                    // A bucket that ends soon is written every time: an expiry pass that began
                    // after this batch took its time may already have cleared the entry the
                    // cache remembers, and the message would be left out.
                    let ends_soon = expiry.0 <= (now / config.expiry_bucket_ms).saturating_add(1);
                    let cached = !ends_soon
                        && (known.expiry_written.contains(&expiry)
                            || !learned.expiry_written.insert(expiry));
                    if !cached {
                        txn.set(&keys::expiry(expiry.0, expiry.1), &[]);
                    }
                    Outcome::Stored {
                        seq,
                        server_time_ms: now,
                        expire_at_ms,
                        fresh: true,
                        live: true,
                    }
                }
            }
            Request::Link {
                inbox,
                device,
                acked_up_to,
            } => {
                let last = seqs.last_seq_of(txn, *inbox, learned, known)?;
                let before = device_record(txn, &devices, *inbox, *device, learned, known)?;
                let cursor = match before.map(|(cursor, _)| cursor) {
                    // The inbox's first device gets everything stored; a device added to an
                    // inbox that has others starts at the head (it gets what is sent after it
                    // links, like a newly linked companion device).
                    None if has_live_device(
                        txn, &devices, *inbox, now, config, learned, known,
                    )? =>
                    {
                        last
                    }
                    None => (*acked_up_to).min(last),
                    Some(cursor) => cursor.max((*acked_up_to).min(last)),
                };
                // A device that logs in again with nothing consumed since, seen recently: its
                // record would be rewritten with only a newer `last_seen_ms`. It is left as
                // it is (decision 0034), so a reconnect writes nothing and waits for no sync.
                let written_anyway = devices.contains_key(&(*inbox, *device));
                let unchanged = !written_anyway
                    && before.is_some_and(|(stored, last_seen_ms)| {
                        stored == cursor
                            && last_seen_ms.saturating_add(device_seen_refresh_ms(config)) >= now
                    });
                if unchanged {
                    learned.logins_unwritten += 1;
                } else {
                    devices.insert((*inbox, *device), cursor);
                }
                let after_cursor = txn.get_range(
                    &keys::message(*inbox, cursor.saturating_add(1)),
                    &keys::message(*inbox, u64::MAX),
                    1,
                )?;
                let first_seq = match after_cursor.first() {
                    Some((key, _)) => {
                        keys::parse_message(key)
                            .map(|(_, seq)| seq)
                            .ok_or_else(|| {
                                StoreError::Corrupt("message key of unexpected shape".into())
                            })?
                    }
                    None => last.saturating_add(1),
                };
                Outcome::Linked {
                    cursor,
                    first_seq,
                    last_seq: last,
                }
            }
            Request::Ack {
                inbox,
                device,
                up_to_seq,
            } => {
                // A cursor never passes the inbox's head, so a hostile ack cannot delete
                // messages that are not written yet.
                let last = seqs.last_seq_of(txn, *inbox, learned, known)?;
                // A device without a record (never linked, or forgotten) records nothing. (A
                // purge resets the records, so an ack that was on the way moves no cursor
                // back: a cursor only moves up.)
                if let Some((cursor, _)) =
                    device_record(txn, &devices, *inbox, *device, learned, known)?
                {
                    devices.insert((*inbox, *device), cursor.max((*up_to_seq).min(last)));
                }
                Outcome::Acked
            }
            Request::Forget { inbox } => {
                // Expiry saw the inbox empty; a send may have come since.
                txn.clear(&keys::emptied(*inbox));
                let (start, end) = (keys::message(*inbox, 0), keys::message(*inbox, u64::MAX));
                let last_seq = if txn.get_range(&start, &end, 1)?.is_empty() {
                    Some(seqs.forget(txn, *inbox, learned, known)?)
                } else {
                    None
                };
                Outcome::Forgotten { last_seq }
            }
            Request::Purge { inbox } => {
                let last_key = keys::message(*inbox, u64::MAX);
                txn.clear_range(&keys::message(*inbox, 0), &last_key);
                txn.clear(&last_key);
                // The devices stay, each reset past what is erased and seen now (below): a
                // device that comes back is known, so what is sent to the user from now on
                // waits for it. Erased, every device but the first back started at the
                // head and missed what was sent before it came (decision 0044).
                let mut reset = Vec::new();
                for record in stored_devices(txn, *inbox, learned, known)? {
                    if record.last_seen_ms.saturating_add(config.retention_ms) < now {
                        // Unseen for the retention period: forgotten, not kept alive.
                        txn.clear(&keys::device(*inbox, record.device));
                    } else {
                        reset.push(record.device);
                    }
                }
                reset.extend(
                    devices
                        .range((*inbox, 0)..=(*inbox, u32::MAX))
                        .map(|((_, device), _)| *device),
                );
                // Dedupe records live in the current and the previous bucket (`find_dedupe`),
                // and the one before those until expiry clears it: it waits
                // `DEDUPE_CLEAR_SLACK_MS` past the window for clocks behind its own.
                for bucket in (0..3).filter_map(|back| dedupe_bucket.checked_sub(back)) {
                    let (start, end) = keys::dedupe_inbox_range(bucket, *inbox);
                    txn.clear_range(&start, &end);
                }
                txn.clear(&keys::emptied(*inbox));
                let last_seq = seqs.forget(txn, *inbox, learned, known)?;
                // Device updates this batch made before the purge are reset too; the records
                // are written with the batch's time, like every moved cursor.
                for device in reset {
                    devices.insert((*inbox, device), last_seq);
                }
                learned.acked_up_to.insert(*inbox, last_seq);
                Outcome::Purged { last_seq }
            }
        };
        outcomes.push(outcome);
    }
    // Devices whose cursor moved: write them, then delete each touched inbox's messages up to
    // the lowest cursor of its live devices.
    let mut inboxes: Vec<UserId> = devices.keys().map(|(inbox, _)| *inbox).collect();
    inboxes.dedup();
    for inbox in inboxes {
        let stored = stored_devices(txn, inbox, learned, known)?;
        // Every transaction that writes device records deletes the inbox's messages up to the
        // lowest cursor it leaves (below), so before this batch nothing at or below the lowest
        // stored cursor is stored.
        let stored_lowest = stored.iter().map(|record| record.cursor).min();
        let mut kept = Vec::with_capacity(stored.len() + 1);
        let mut lowest: Option<u64> = None;
        let mut forgot_one = false;
        for record in stored {
            if devices.contains_key(&(inbox, record.device)) {
                continue; // Written below, with its new cursor.
            }
            if record.last_seen_ms.saturating_add(config.retention_ms) < now {
                // Unseen for the retention period: forgotten (one per inbox and transaction,
                // so the transaction's size stays bounded; the next ack takes the next).
                if !forgot_one {
                    txn.clear(&keys::device(inbox, record.device));
                    forgot_one = true;
                    continue;
                }
            }
            lowest = Some(lowest.map_or(record.cursor, |l| l.min(record.cursor)));
            kept.push(record);
        }
        for ((_, device), cursor) in devices.range((inbox, 0)..=(inbox, u32::MAX)) {
            txn.set(&keys::device(inbox, *device), &encode_device(*cursor, now));
            lowest = Some(lowest.map_or(*cursor, |l| l.min(*cursor)));
            kept.push(DeviceRecord {
                device: *device,
                cursor: *cursor,
                last_seen_ms: now,
            });
        }
        learned.insert_devices(inbox, kept);
        let Some(delete_up_to) = lowest else {
            continue;
        };
        // Start after what is known to be deleted: deleted keys leave tombstones that a
        // range scan from seq 1 would walk on every ack. The committer remembers where its
        // deletes ended; before its first delete of the inbox (after a login, a restart, or
        // once the inbox left its cache), the lowest stored cursor says the same.
        // (A purge in this batch deleted every message up to its cursors already.)
        let known_deleted_up_to = learned
            .acked_up_to
            .get(&inbox)
            .or_else(|| known.acked_up_to.get(&inbox))
            .copied()
            .or(stored_lowest);
        let deleted_up_to = known_deleted_up_to.unwrap_or(0);
        if delete_up_to > deleted_up_to {
            let begin = keys::message(inbox, deleted_up_to.saturating_add(1));
            let end = keys::message(inbox, delete_up_to.saturating_add(1));
            match known_deleted_up_to {
                // The usual ack: the messages right after what is known deleted. The range is
                // cleared with its keys listed, because the embedded engines have no range
                // delete and turn a plain range clear into a scan of every table at commit
                // (11% of the edge's CPU at 10,000 msgs/s). Message keys have one length, so
                // the seqs list every key the range can hold. A key that expiry deleted
                // already gets a second tombstone.
                Some(_) if delete_up_to - deleted_up_to <= ACK_LISTED_CLEARS_MAX => txn
                    .clear_range_with_keys(
                        &begin,
                        &end,
                        (deleted_up_to + 1..=delete_up_to).map(|seq| keys::message(inbox, seq)),
                    ),
                _ => txn.clear_range(&begin, &end),
            }
            learned.acked_up_to.insert(inbox, delete_up_to);
        }
    }
    for (inbox, last) in learned.last_seqs.iter() {
        txn.set(&keys::counter(*inbox), &last.to_le_bytes());
    }
    if let Some(floor) = seqs.floor_raised_to {
        txn.atomic_max(&keys::floor(), floor);
    }
    // The server time high-water mark: after a restart, time never runs back behind it. A
    // batch of logins that changed nothing hands out no time and writes nothing at all.
    let wrote_nothing = devices.is_empty()
        && requests
            .iter()
            .all(|request| matches!(request, Request::Link { .. }));
    if !wrote_nothing {
        txn.atomic_max(&keys::clock(), now);
    }
    Ok(outcomes)
}

/// Where a batch gets an inbox's last seq: the batch itself, the committer's cache, the
/// inbox's counter, or — for an inbox without a counter — the shard's seq floor.
#[derive(Debug, Default)]
struct SeqSource {
    /// The floor as stored when this batch first needed it, read at most once.
    floor_stored: Option<u64>,
    /// The floor this batch raised by forgetting inboxes; written once at the end.
    floor_raised_to: Option<u64>,
}

impl SeqSource {
    fn last_seq_of<T: Transaction>(
        &mut self,
        txn: &mut T,
        inbox: UserId,
        batch: &InboxFacts,
        known: &InboxFacts,
    ) -> Result<u64, StoreError> {
        if let Some(last) = batch.last_seqs.get(&inbox) {
            return Ok(*last);
        }
        if !batch.forgotten.contains(&inbox)
            && let Some(last) = known.last_seqs.get(&inbox)
        {
            // Decided without reading the counter: the commit must still conflict with one
            // that changed it since. On FoundationDB an attempt whose result was unknown may
            // land after a later batch stored a send at the same seq, and would overwrite it.
            txn.add_read_conflict(&keys::counter(inbox));
            return Ok(*last);
        }
        match read_counter(txn, inbox)? {
            Some(last) => Ok(last),
            None => self.floor(txn),
        }
    }

    /// The floor: as stored, or as this batch raised it.
    ///
    /// The stored floor is a snapshot read: it adds no read conflict, so on FoundationDB a
    /// send to a new inbox does not conflict with another shard forgetting one of its own
    /// inboxes. That is safe because the floor only has to be above the seqs of this shard's
    /// own forgotten inboxes, and this shard raised it for those in batches written before
    /// this one began: one committer per shard writes its batches one after another, each
    /// committed (or, on the log store, pending and read by the next, decision 0027) before
    /// the next begins; a takeover fences the old owner.
    fn floor<T: Transaction>(&mut self, txn: &mut T) -> Result<u64, StoreError> {
        let stored = match self.floor_stored {
            Some(floor) => floor,
            None => {
                let floor = read_floor(txn)?;
                self.floor_stored = Some(floor);
                floor
            }
        };
        Ok(stored.max(self.floor_raised_to.unwrap_or(0)))
    }

    /// Deletes `inbox`'s counter and raises the floor to its last seq (an atomic max at the
    /// end of the batch, with no read), so the next seq of the inbox is above every seq it
    /// ever had; `batch` learns that the inbox is forgotten. Returns that last seq.
    fn forget<T: Transaction>(
        &mut self,
        txn: &mut T,
        inbox: UserId,
        batch: &mut InboxFacts,
        known: &InboxFacts,
    ) -> Result<u64, StoreError> {
        let last = self.last_seq_of(txn, inbox, batch, known)?;
        txn.clear(&keys::counter(inbox));
        self.floor_raised_to = Some(self.floor_raised_to.unwrap_or(0).max(last));
        batch.last_seqs.remove(&inbox);
        batch.forgotten.insert(inbox);
        Ok(last)
    }
}

/// Looks for an earlier commit of the same (sender, client id) in the current and previous
/// dedupe buckets; together they cover at least one whole window.
fn find_dedupe<T: Transaction>(
    txn: &mut T,
    dedupe_bucket: u64,
    send: &SendRequest,
    now: UnixMillis,
) -> Result<Option<Outcome>, StoreError> {
    for bucket in dedupe_buckets(dedupe_bucket) {
        let key = keys::dedupe(bucket, send.to, send.sender, send.client_id);
        if let Some(record) = txn.get(&key)? {
            let Some((seq, server_time_ms, expire_at_ms)) = parse_dedupe_record(&record) else {
                return Err(StoreError::Corrupt(format!(
                    "dedupe record of {} bytes",
                    record.len()
                )));
            };
            // A retry: delivered live only as stored, and not once expired, by this batch's
            // time or by the store's clock mark (a batch keeps its time across attempts, and
            // a read may have declared it a hole meanwhile; expiry has yet to delete it): the
            // connections behind it read the store instead. Rare, so the reads cost little;
            // the mark's without a conflict, since every commit raises it.
            let mark = if near_expiry(expire_at_ms, now) {
                parse_clock_mark(txn.get_snapshot(&keys::clock())?)?
            } else {
                0
            };
            let live = expire_at_ms > now.max(mark)
                && txn
                    .get(&keys::message(send.to, seq))?
                    .and_then(|value| envelope::decode(send.to, seq, &value))
                    .is_some_and(|stored| stored.from == send.sender && stored.body == send.body);
            return Ok(Some(Outcome::Stored {
                seq,
                server_time_ms,
                expire_at_ms,
                fresh: false,
                live,
            }));
        }
    }
    Ok(None)
}

/// The buckets a send's dedupe record may be in: the current one and the one before it.
fn dedupe_buckets(dedupe_bucket: u64) -> impl Iterator<Item = u64> {
    [Some(dedupe_bucket), dedupe_bucket.checked_sub(1)]
        .into_iter()
        .flatten()
}

/// A dedupe record's value: seq, server time, expiry, little-endian. The expiry takes 4 bytes
/// as milliseconds after the server time when `short` and it fits (a lifetime under 49.7 days):
/// 20 bytes, which the embedded stores hold inline. Otherwise 8 (24 bytes, as every record
/// before). Decision 0002.
fn dedupe_record(
    seq: u64,
    server_time_ms: u64,
    expire_at_ms: u64,
    short: bool,
) -> ([u8; 24], usize) {
    let mut record = [0u8; 24];
    record[..8].copy_from_slice(&seq.to_le_bytes());
    record[8..16].copy_from_slice(&server_time_ms.to_le_bytes());
    let lifetime_ms = expire_at_ms
        .checked_sub(server_time_ms)
        .and_then(|lifetime_ms| u32::try_from(lifetime_ms).ok());
    match lifetime_ms.filter(|_| short) {
        Some(lifetime_ms) => {
            record[16..20].copy_from_slice(&lifetime_ms.to_le_bytes());
            (record, 20)
        }
        None => {
            record[16..].copy_from_slice(&expire_at_ms.to_le_bytes());
            (record, 24)
        }
    }
}

/// The seq, server time and expiry of a dedupe record's value, of either length.
fn parse_dedupe_record(record: &[u8]) -> Option<(u64, u64, u64)> {
    let field = |at: usize| record.get(at..at + 8).and_then(keys::le_u64);
    let (seq, server_time_ms) = (field(0)?, field(8)?);
    let expire_at_ms = match record.len() {
        20 => {
            let lifetime_ms = u32::from_le_bytes(record[16..20].try_into().ok()?);
            server_time_ms.checked_add(u64::from(lifetime_ms))?
        }
        24 => field(16)?,
        _ => return None,
    };
    Some((seq, server_time_ms, expire_at_ms))
}

/// At most this many messages an ack deletes by listing their keys; more (or after a seq the
/// committer does not know to be deleted) take a range clear that the embedded engines scan
/// (see `write_batch`). Both delete exactly the same keys. The bound keeps few the tombstones
/// of seqs that expiry deleted already.
const ACK_LISTED_CLEARS_MAX: u64 = 1024;

/// Devices one inbox may have (a device id is at most `DEVICE_ID_MAX`).
const DEVICES_PER_INBOX_MAX: usize = courier_protocol::DEVICE_ID_MAX as usize + 1;

/// The device records of `inbox` as stored before this batch's device writes: from the
/// committer's cache, or read. An inbox this batch purged is read (the purge cleared its
/// records in the transaction, not in the cache).
///
/// From the cache, the whole range is marked read (`add_read_conflict_range`): this batch
/// may forget a device or delete up to the lowest cursor from it, and a commit of it that
/// lands late on FoundationDB must not stand over a later login's record (a device forgotten
/// just after it came back, or a new device's cursor missing from the lowest).
fn stored_devices<T: Transaction>(
    txn: &mut T,
    inbox: UserId,
    batch: &InboxFacts,
    known: &InboxFacts,
) -> Result<Vec<DeviceRecord>, StoreError> {
    let (start, end) = keys::device_range(inbox);
    if !batch.forgotten.contains(&inbox)
        && let Some(records) = known.devices.get(&inbox)
    {
        txn.add_read_conflict_range(&start, &end);
        return Ok(records.clone());
    }
    let stored = txn.get_range(&start, &end, DEVICES_PER_INBOX_MAX + 1)?;
    let mut records = Vec::with_capacity(stored.len());
    for (key, value) in stored {
        let Some((_, device)) = keys::parse_device(&key) else {
            return Err(StoreError::Corrupt("device key of unexpected shape".into()));
        };
        let (cursor, last_seen_ms) = decode_device(&value)?;
        records.push(DeviceRecord {
            device,
            cursor,
            last_seen_ms,
        });
    }
    Ok(records)
}

/// A device's cursor and when it was last seen: as this batch left them (seen
/// `UnixMillis::MAX`, as good as now: the batch writes the record with its time), or as
/// stored; `None` for a device new to the inbox.
fn device_record<T: Transaction>(
    txn: &mut T,
    batch_cursors: &BTreeMap<(UserId, u32), u64>,
    inbox: UserId,
    device: u32,
    batch: &InboxFacts,
    known: &InboxFacts,
) -> Result<Option<(u64, UnixMillis)>, StoreError> {
    if let Some(cursor) = batch_cursors.get(&(inbox, device)) {
        return Ok(Some((*cursor, UnixMillis::MAX)));
    }
    if !batch.forgotten.contains(&inbox)
        && let Some(records) = known.devices.get(&inbox)
    {
        // No conflict range of its own: a batch that writes from this answer writes the
        // inbox's device records, and `stored_devices` marks their whole range read then.
        let record = records.iter().find(|record| record.device == device);
        return Ok(record.map(|record| (record.cursor, record.last_seen_ms)));
    }
    match txn.get(&keys::device(inbox, device))? {
        None => Ok(None),
        Some(value) => decode_device(&value).map(Some),
    }
}

/// How stale a device's `last_seen_ms` may grow before a login rewrites it: an eighth of the
/// retention period, at most an hour. A device is forgotten (and stops holding back its
/// inbox's deletes) only after a whole retention period unseen, so a record at most this much
/// older than the device's last login changes when that happens by at most this much.
/// How often a device's record is marked seen again at the least: by a login that finds it
/// older (decision 0034), and by a connection that stays open (`EdgeSession`'s refresh). Far
/// inside the retention period, after which an unseen device is forgotten.
pub(crate) fn device_seen_refresh_ms(config: &CoreConfig) -> u64 {
    // At least 1 ms: a refresh due at once would re-arm itself forever.
    (config.retention_ms / 8).clamp(1, HOUR_MS)
}

/// Whether `inbox` has a device seen within the retention period (stored, or linked by this
/// batch).
fn has_live_device<T: Transaction>(
    txn: &mut T,
    batch_cursors: &BTreeMap<(UserId, u32), u64>,
    inbox: UserId,
    now: UnixMillis,
    config: &CoreConfig,
    batch: &InboxFacts,
    known: &InboxFacts,
) -> Result<bool, StoreError> {
    if batch_cursors
        .range((inbox, 0)..=(inbox, u32::MAX))
        .next()
        .is_some()
    {
        return Ok(true);
    }
    Ok(stored_devices(txn, inbox, batch, known)?
        .iter()
        .any(|record| record.last_seen_ms.saturating_add(config.retention_ms) >= now))
}

fn encode_device(cursor: u64, last_seen_ms: UnixMillis) -> [u8; 16] {
    let mut value = [0u8; 16];
    value[..8].copy_from_slice(&cursor.to_le_bytes());
    value[8..].copy_from_slice(&last_seen_ms.to_le_bytes());
    value
}

pub(crate) fn decode_device(value: &[u8]) -> Result<(u64, UnixMillis), StoreError> {
    match (
        value.get(..8).and_then(keys::le_u64),
        value.get(8..16).and_then(keys::le_u64),
    ) {
        (Some(cursor), Some(last_seen_ms)) => Ok((cursor, last_seen_ms)),
        _ => Err(StoreError::Corrupt(format!(
            "device record of {} bytes",
            value.len()
        ))),
    }
}

fn read_counter<T: Transaction>(txn: &mut T, inbox: UserId) -> Result<Option<u64>, StoreError> {
    match txn.get(&keys::counter(inbox))? {
        None => Ok(None),
        Some(value) => keys::le_u64(&value).map(Some).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "counter of inbox {inbox} has {} bytes",
                value.len()
            ))
        }),
    }
}

fn read_floor<T: Transaction>(txn: &mut T) -> Result<u64, StoreError> {
    match txn.get_snapshot(&keys::floor())? {
        None => Ok(0),
        Some(value) => keys::le_u64(&value)
            .ok_or_else(|| StoreError::Corrupt(format!("seq floor of {} bytes", value.len()))),
    }
}

/// The inbox's last seq as stored: its counter, or the shard's floor when it has none.
fn read_last_seq<T: Transaction>(txn: &mut T, inbox: UserId) -> Result<u64, StoreError> {
    match read_counter(txn, inbox)? {
        Some(last) => Ok(last),
        None => read_floor(txn),
    }
}

/// The highest time any commit used: the start of a [`crate::clock::ServerClock`].
pub fn clock_high_water<S: Store>(store: &S) -> Result<UnixMillis, StoreError> {
    read_clock_mark(&mut store.begin()?)
}

fn read_clock_mark<T: Transaction>(txn: &mut T) -> Result<UnixMillis, StoreError> {
    parse_clock_mark(txn.get(&keys::clock())?)
}

/// The clock mark's stored value (none: 0).
fn parse_clock_mark(value: Option<Vec<u8>>) -> Result<UnixMillis, StoreError> {
    match value {
        None => Ok(0),
        Some(value) => keys::le_u64(&value)
            .ok_or_else(|| StoreError::Corrupt(format!("clock of {} bytes", value.len()))),
    }
}

/// Whether a message expiring at `expire_at_ms` is close enough to its expiry, by a clock
/// at `now`, that the store's clock mark must be read to judge it: within
/// `DEDUPE_CLEAR_SLACK_MS`, the clock skew tolerated between the edges of a cluster. On
/// FoundationDB the mark is one key for the whole cluster, so it is read only then, not by
/// every sync read and retry.
fn near_expiry(expire_at_ms: UnixMillis, now: UnixMillis) -> bool {
    expire_at_ms <= now.saturating_add(DEDUPE_CLEAR_SLACK_MS)
}

/// The sizes a store's keys were written with (`record_key_sizes`), kept in one record: the
/// expiry bucket (the expiry index's keys hold bucket numbers: read with another size, every
/// entry names the wrong time, and the messages it indexes may never expire) and the dedupe
/// window (dedupe records' keys hold window numbers: with another window, expiry never reaches
/// the records written before, and a retry across the change is stored twice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySizes {
    pub expiry_bucket_ms: u64,
    /// `None` in a record from before the window was kept.
    pub dedupe_window_ms: Option<u64>,
}

impl KeySizes {
    /// Whether a store written with these sizes cannot be served with `expiry_bucket_ms` and
    /// `dedupe_window_ms` (a record without a window differs in the bucket only).
    pub fn differ_from(&self, expiry_bucket_ms: u64, dedupe_window_ms: u64) -> bool {
        self.expiry_bucket_ms != expiry_bucket_ms
            || self
                .dedupe_window_ms
                .is_some_and(|window_ms| window_ms != dedupe_window_ms)
    }
}

/// The sizes recorded in `store`, if any.
pub fn stored_key_sizes<S: Store>(store: &S) -> Result<Option<KeySizes>, StoreError> {
    let value = retrying(|| {
        store
            .begin_read()
            .and_then(|mut txn| txn.get(&keys::expiry_bucket_size()))
    })?;
    value.map(|value| parse_key_sizes(&value)).transpose()
}

fn parse_key_sizes(value: &[u8]) -> Result<KeySizes, StoreError> {
    let corrupt = || StoreError::Corrupt(format!("key sizes record of {} bytes", value.len()));
    match value.len() {
        8 | 16 => Ok(KeySizes {
            expiry_bucket_ms: keys::le_u64(value).ok_or_else(corrupt)?,
            dedupe_window_ms: value.get(8..).and_then(keys::le_u64),
        }),
        _ => Err(corrupt()),
    }
}

/// Records the sizes in a store that has none (new, or from before they were kept: it takes
/// those it is opened with), and the dedupe window in a record from before it was kept. Edges
/// on a shared store may record them at once: their commits conflict, and a retry finds the
/// record the first one wrote.
pub fn record_key_sizes<S: Store>(
    store: &S,
    expiry_bucket_ms: u64,
    dedupe_window_ms: u64,
) -> Result<(), StoreError> {
    retrying(|| {
        let mut txn = store.begin()?;
        let expiry_bucket_ms = match txn.get(&keys::expiry_bucket_size())? {
            Some(value) => {
                let recorded = parse_key_sizes(&value)?;
                if recorded.dedupe_window_ms.is_some() {
                    return Ok(());
                }
                recorded.expiry_bucket_ms
            }
            None => expiry_bucket_ms,
        };
        let mut value = [0u8; 16];
        value[..8].copy_from_slice(&expiry_bucket_ms.to_le_bytes());
        value[8..].copy_from_slice(&dedupe_window_ms.to_le_bytes());
        txn.set(&keys::expiry_bucket_size(), &value);
        txn.commit().map(|_| ())
    })
}

/// Runs `attempt` again, up to three times in all, while it fails with a retryable error:
/// for the few reads and writes at start-up, outside the batches' own retries.
fn retrying<T>(mut attempt: impl FnMut() -> Result<T, StoreError>) -> Result<T, StoreError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        match attempt() {
            Err(error) if error.is_retryable() && attempts < 3 => {}
            result => return result,
        }
    }
}

/// The last sequence number of `inbox`: the last one assigned, or for an inbox without a
/// counter (never written to, or forgotten) the shard's floor, above every seq it ever had.
pub fn last_seq<S: Store>(store: &S, inbox: UserId) -> Result<u64, StoreError> {
    let mut txn = store.begin()?;
    read_last_seq(&mut txn, inbox)
}

/// Whether `inbox` has a counter record (something was sent to it and it was not forgotten).
pub fn has_counter<S: Store>(store: &S, inbox: UserId) -> Result<bool, StoreError> {
    let mut txn = store.begin_read()?;
    Ok(read_counter(&mut txn, inbox)?.is_some())
}

/// One page of an inbox for a device whose cursor is at some `after_seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxPage {
    /// Stored, unexpired messages after `after_seq`, in sequence order (see [`read_inbox`]
    /// for what expired means).
    pub messages: Vec<StoredMessage>,
    /// Every seq in `after_seq + 1 ..= covered_up_to` that is not in `messages` is gone for good
    /// (acknowledged, expired, or past retention): the server declares it a hole instead of
    /// letting the device wait for it. At least `after_seq`.
    pub covered_up_to: u64,
    /// The page stopped at `config.sync_messages_max` keys: read again after `covered_up_to`.
    pub more: bool,
}

/// Up to `config.sync_messages_max` keys of `inbox` after `after_seq`: the stored, unexpired
/// messages among them, and how far the page covers the inbox (see [`InboxPage`]).
///
/// A message is expired once its expiry is at or before the store's clock high-water mark
/// (`keys::clock`), raised to `now` first when the page holds a message expired by `now`
/// that the mark has not passed yet. A device told a message is gone (a hole) must never get
/// it later, and every later clock starts past the mark: this edge's after a restart with the
/// wall clock stepped back, and on FoundationDB, where the mark is the cluster's, another
/// edge's behind this one. The raise is a commit of its own, in the rare read that meets a
/// message expired since its store's last commit or expiry pass; if the store takes no
/// write, the read answers all the same and delivers those messages.
pub fn read_inbox<S: Store>(
    store: &S,
    inbox: UserId,
    after_seq: u64,
    now: UnixMillis,
    config: &CoreConfig,
) -> Result<InboxPage, StoreError> {
    let mut txn = store.begin_read()?;
    let begin = keys::message(inbox, after_seq.saturating_add(1));
    let end = keys::message(inbox, u64::MAX);
    let mut messages = Vec::new();
    let mut scanned = 0usize;
    let mut last_scanned = after_seq;
    let mut corrupt = None;
    // Decoded from the engine's bytes as they are scanned: no copy of each pair first.
    txn.scan_range(&begin, &end, config.sync_messages_max, &mut |key, value| {
        scanned += 1;
        let Some((_, seq)) = keys::parse_message(key) else {
            corrupt = Some(StoreError::Corrupt(
                "message key of unexpected shape".into(),
            ));
            return false;
        };
        last_scanned = seq;
        let Some(message) = envelope::decode(inbox, seq, value) else {
            corrupt = Some(StoreError::Corrupt(format!(
                "message {seq} of inbox {inbox}"
            )));
            return false;
        };
        messages.push(message);
        true
    })?;
    if let Some(error) = corrupt {
        return Err(error);
    }
    let more = scanned >= config.sync_messages_max;
    // A full page covers what it scanned. A short one saw every stored message, so it covers
    // the inbox up to its counter, read in the same transaction: a seq at or below it is
    // committed or will never be used, so if it is not stored it is gone. An inbox without a
    // counter covers only what was scanned, not up to the floor: on FoundationDB the shards
    // share the floor and raise it with their forgets, while a send to this inbox in flight
    // may hold a seq it took from the floor before (a snapshot read, decision 0011) that it
    // has not committed yet. The device's next message, or its next login, moves it on.
    let covered_up_to = if more {
        last_scanned
    } else {
        read_counter(&mut txn, inbox)?.map_or(last_scanned, |last| last.max(last_scanned))
    };
    // An edge further behind the mark than the skew `near_expiry` tolerates may deliver
    // what one ahead declared gone, as it may store a retry twice.
    let mut mark = if messages
        .iter()
        .any(|message| near_expiry(message.expire_at_ms, now))
    {
        read_clock_mark(&mut txn)?
    } else {
        0
    };
    drop(txn);
    let expired_past_mark =
        |message: &StoredMessage| message.expire_at_ms <= now && message.expire_at_ms > mark;
    if messages.iter().any(expired_past_mark) {
        match raise_clock_mark(store, now) {
            Ok(()) => mark = mark.max(now),
            // Fenced: the edge stops. A conflict or an unknown result (FoundationDB) may go
            // the next time: the read is tried again, as any failed read is.
            Err(error) if error == StoreError::Fenced || error.is_retryable() => {
                return Err(error);
            }
            // The store takes no write now (a full disk, a failed fsync): the read still
            // answers, and what expired past the mark is delivered, not declared gone.
            Err(_) => {}
        }
    }
    messages.retain(|message| message.expire_at_ms > mark);
    Ok(InboxPage {
        messages,
        covered_up_to: covered_up_to.max(after_seq),
        more,
    })
}

/// Raises the store's clock high-water mark to `now`, durably.
fn raise_clock_mark<S: Store>(store: &S, now: UnixMillis) -> Result<(), StoreError> {
    let mut txn = store.begin()?;
    txn.atomic_max(&keys::clock(), now);
    txn.commit().map(|_| ())
}

/// Messages an expiry scan reads at a time: most scans stop within the first page.
pub const EXPIRY_PAGE_KEYS: usize = 64;

/// An expiry index entry's value when a pass ran out of budget inside its inbox: this tag, then
/// the seq to go on after (u64 LE). Other values (empty; older versions: a seq) mean "from the
/// start".
const EXPIRY_RESUME_TAG: u8 = b'r';

/// What one [`expire`] pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExpireReport {
    pub messages_deleted: u64,
    pub index_entries_cleared: u64,
    /// Inboxes expiry left without a message (this pass or an earlier one) that are not yet
    /// forgotten: hand each to its home shard as a [`Request::Forget`], so the counter goes
    /// too: those this pass emptied, and on a round's first pass up to
    /// `expire_scan_keys_max / 2` more recorded before. Each stays recorded (a `g` record)
    /// until its forget commits, so a crash in between loses none. At most
    /// `expire_scan_keys_max`.
    pub emptied: Vec<UserId>,
    /// This pass began a round of passes (see `expire`): it listed the emptied inboxes
    /// recorded before, and scanned the expiry index from its start.
    pub round_began: bool,
    /// The scan budget ran out; call again.
    pub more: bool,
    /// The sweep of device records is behind its round's schedule (a large store: a pass
    /// reads `DEVICE_SWEEP_KEYS_MAX` of them): call [`sweep_devices`] until it says it no
    /// longer is.
    pub devices_behind: bool,
    /// On stores the shards share ([`expire_shared`]): the first error of a store whose pass
    /// or listing failed. The other stores' passes ran and their `more` stands: handle the
    /// error as a failed pass (a `Fenced` one is returned as an error instead, since the edge
    /// must stop).
    pub store_failed: Option<StoreError>,
    /// Dropping the old dedupe buckets' tables failed (on the log engine it needs a
    /// checkpoint, which a full disk refuses): the pass expired messages and left those
    /// records to the next pass's drop.
    pub dedupe_tables_drop_failed: Option<String>,
}

/// Deletes dedupe records older than their window and messages past their expiry, reading at
/// most `config.expire_scan_keys_max` keys (at least 4), plus a few more to see where ranges
/// end and where the last pass stopped. Idempotent; run it periodically and again while
/// [`ExpireReport::more`] is set.
pub fn expire<S: Store>(
    store: &S,
    now: UnixMillis,
    config: &CoreConfig,
) -> Result<ExpireReport, StoreError> {
    let mut scan_keys_max = config.expire_scan_keys_max;
    expire_sized(store, now, config, &mut scan_keys_max)
}

/// [`expire`], reading at most `*scan_keys_max` keys (at least 4). On a retryable failure
/// each attempt reads half as much, and `*scan_keys_max` is left at the size that committed
/// (or the last one tried), for the caller to start the next pass from.
fn expire_sized<S: Store>(
    store: &S,
    now: UnixMillis,
    config: &CoreConfig,
    scan_keys_max: &mut usize,
) -> Result<ExpireReport, StoreError> {
    let drops_tables = store.drops_tables();
    let mut dedupe_tables_drop_failed = None;
    if drops_tables && let Some(end) = old_dedupe_end(now, config) {
        // A sweep of the old dedupe buckets that begins at the first (the mark says so:
        // `write_expiry` put it there when a bucket fell due) first drops their whole tables,
        // a day's records at the cost of a few files instead of a tombstone each (decision
        // 0038). Dropping again is harmless: a pass after a crash that lost the drop does it.
        let mark = store.begin_read()?.get(&keys::dedupe_expired_below())?;
        // A failed drop must not stop expiry, which frees what a full disk needs: messages
        // still expire, and the next pass tries the drop again.
        if dedupe_sweep_begin(mark, &end) == keys::dedupe_bucket_start(0)
            && let Err(error) = store.drop_tables_within(&keys::dedupe_bucket_start(0), &end)
        {
            dedupe_tables_drop_failed = Some(error.to_string());
        }
    }
    // After a failed drop the old dedupe records wait for the next pass's drop: swept key by
    // key from the start, they would move the mark on, and the rest of the window would go a
    // tombstone each (decision 0038), on a disk that is short of room.
    let sweep_dedupe = dedupe_tables_drop_failed.is_none();
    *scan_keys_max = (*scan_keys_max).max(4);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let keys_max = *scan_keys_max;
        let pass = || -> Result<ExpireReport, StoreError> {
            let mut txn = store.begin()?;
            let report = write_expiry(&mut txn, now, config, keys_max, drops_tables, sweep_dedupe)?;
            txn.commit()?;
            Ok(report)
        };
        match pass() {
            Ok(report) => {
                return Ok(ExpireReport {
                    dedupe_tables_drop_failed,
                    ..report
                });
            }
            // A read or commit that may succeed again. On FoundationDB a pass that reads too
            // much for the transaction's time limit under load fails that way on every
            // attempt at the same size: each retry reads half as much (the pass says `more`).
            Err(error) if error.is_retryable() && attempt < config.commit_attempts_max => {
                *scan_keys_max = (*scan_keys_max / 2).max(4);
            }
            Err(error) => return Err(error),
        }
    }
}

/// How far behind the expiring clock a commit's may be and still find its dedupe records:
/// expiry clears a bucket only once a clock this much behind would no longer read it. A
/// commit takes its time before it waits for the writer (and keeps it across retries), a
/// commit whose result was unknown lands within 6 s, and on FoundationDB one edge's clock
/// expires the buckets every edge reads. Without it, a retry within the window, committed at
/// the window's boundary just after another clock cleared its bucket, was stored twice.
pub const DEDUPE_CLEAR_SLACK_MS: u64 = 10 * 60 * 1000;

/// The end of the dedupe buckets expiry clears: every bucket before the previous one, which
/// dedupe lookups still read, as a clock `DEDUPE_CLEAR_SLACK_MS` behind `now` sees them.
/// `None` while there is none.
fn old_dedupe_end(now: UnixMillis, config: &CoreConfig) -> Option<[u8; 9]> {
    let lagging = now.saturating_sub(DEDUPE_CLEAR_SLACK_MS);
    let keep_from = (lagging / config.dedupe_window_ms).checked_sub(1)?;
    Some(keys::dedupe_bucket_start(keep_from))
}

/// Where a pass's clearing of the old dedupe buckets (up to `end`) begins: at the mark the
/// last pass left, unless it is missing or past `end`. A mark at the end is the one a finished
/// pass left: everything below it is gone. A mark past the end is not one this clock and
/// window would have left (the window was raised, which makes bucket numbers smaller, or the
/// clock was set back): records may lie below it, so the pass starts over from the first
/// bucket.
fn dedupe_sweep_begin(mark: Option<Vec<u8>>, end: &[u8]) -> Vec<u8> {
    match mark {
        Some(mark) if keys::parse_dedupe_bucket(&mark).is_some() && mark.as_slice() <= end => mark,
        _ => keys::dedupe_bucket_start(0).to_vec(),
    }
}

fn write_expiry<T: Transaction>(
    txn: &mut T,
    now: UnixMillis,
    config: &CoreConfig,
    scan_keys_max: usize,
    drops_tables: bool,
    sweep_dedupe: bool,
) -> Result<ExpireReport, StoreError> {
    let mut report = ExpireReport::default();
    // At least 4: half for old dedupe records leaves index entries and messages at least one
    // key each, so every pass makes progress.
    let mut budget = scan_keys_max.max(4);
    // Dedupe lookups read the current and the previous bucket; everything older goes, at
    // most half the budget a pass. (A bucket holds a window's sends: cleared in one
    // transaction, an embedded store would read, and hold a tombstone in memory for, every
    // one of them while its writer lock keeps every commit of the shard waiting.)
    // Each pass begins where the last one stopped: from the start, it would walk the
    // tombstones of every record deleted before (quadratic in a window's sends).
    if let Some(end) = old_dedupe_end(now, config).filter(|_| sweep_dedupe) {
        let begin = dedupe_sweep_begin(txn.get(&keys::dedupe_expired_below())?, &end);
        let start = keys::dedupe_bucket_start(0);
        // A bucket fell due since the last sweep finished (its mark, a bucket's first key, is
        // below the end): where tables can be dropped, the next sweep starts over from the
        // first bucket, after `expire` drops the buckets' whole tables. The mark goes back
        // first, durably, so that a crash cannot leave a dropped tombstone's key (come back)
        // below it.
        let bucket_fell_due =
            begin.len() == start.len() && begin[..] != start[..] && begin[..] < end[..];
        if drops_tables && bucket_fell_due {
            txn.set(&keys::dedupe_expired_below(), &start);
            report.more = true;
        } else {
            let cleared = txn.clear_range_bounded(&begin, &end, budget / 2)?;
            budget -= cleared.keys_read;
            report.more |= !cleared.finished;
            // Engines that delete key by key read what they cleared; FoundationDB cleared the
            // range at once and needs no mark (nor a write every shard would contend on). A
            // sweep from the first bucket that found its tables dropped and nothing left
            // still moves the mark on, or every later pass would drop again.
            let swept_from_start = drops_tables && begin[..] == start[..];
            if cleared.keys_read > 0 || (swept_from_start && cleared.finished) {
                let below = cleared.resume_at.unwrap_or_else(|| end.to_vec());
                txn.set(&keys::dedupe_expired_below(), &below);
                // The mark rests on time never running back behind this pass: after a
                // restart, the clock starts above its high-water mark, so no record goes
                // below the mark.
                txn.atomic_max(&keys::clock(), now);
            }
        }
    }
    // Expiry buckets before `first_live` ended at or before `now`.
    let first_live = now / config.expiry_bucket_ms;
    // Index entries take at most half the budget so messages always get the rest.
    let entries_max = budget / 2;
    // A round of passes (those that say `more`, then the one that does not) goes on where
    // the last one stopped: from the start, each would walk the tombstones of every entry the
    // round cleared before it (quadratic in an hour's inboxes on fjall). A round begins at the
    // start, so an entry put below the mark meanwhile (a send whose clock was behind the
    // pass's) waits at most for the next round. A mark past the live buckets (the clock set
    // back, or larger buckets) is not one this round left.
    let live_start = keys::expiry_bucket_start(first_live);
    let mark = txn.get(&keys::expiry_round_at())?;
    let mark_found = mark.is_some();
    let round_at = mark.filter(|mark| {
        mark.first() == Some(&keys::TAG_EXPIRY) && mark.as_slice() <= &live_start[..]
    });
    let round_begins = round_at.is_none();
    let scan_from = round_at.unwrap_or_else(|| keys::expiry_bucket_start(0).to_vec());
    let entries = txn.get_range(&scan_from, &live_start, entries_max)?;
    let mut round_stopped_at = (entries.len() == entries_max)
        .then(|| entries.last().map(|(key, _)| key.clone()))
        .flatten();
    report.more |= round_stopped_at.is_some();
    budget -= entries.len();
    let mut emptied_now = Vec::new();
    for (key, value) in entries {
        let Some((bucket, inbox)) = keys::parse_expiry(&key) else {
            return Err(StoreError::Corrupt(
                "expiry index entry of unexpected shape".into(),
            ));
        };
        if budget == 0 {
            report.more = true;
            round_stopped_at = Some(key);
            break;
        }
        // A message expiring in `bucket` was stored before the bucket ended, and seqs follow
        // commit time, so the scan ends at the first message stored after it. (The entry is
        // written once per inbox and bucket, so it cannot name the bucket's highest seq.) An
        // earlier pass that ran out of budget in this inbox left where to go on from.
        let bucket_end_ms = bucket
            .saturating_add(1)
            .saturating_mul(config.expiry_bucket_ms);
        let resume_after = match value.as_slice() {
            [EXPIRY_RESUME_TAG, seq @ ..] => keys::le_u64(seq),
            _ => None,
        };
        let last_key = keys::message(inbox, u64::MAX);
        let mut from = keys::message(inbox, resume_after.map_or(0, |seq| seq.saturating_add(1)));
        let mut last_seen: Option<u64> = None;
        let mut complete = false;
        // Pages of a few keys, each charged to the budget: most scans stop within the first.
        while !complete {
            let page_keys = budget.min(EXPIRY_PAGE_KEYS);
            if page_keys == 0 {
                break;
            }
            let page = txn.get_range(&from, &last_key, page_keys)?;
            budget -= page.len();
            complete = page.len() < page_keys;
            for (message_key, message_value) in page {
                let (Some((_, seq)), Some(sent_at_ms), Some(expire_at_ms)) = (
                    keys::parse_message(&message_key),
                    envelope::sent_at_ms(&message_value),
                    envelope::expire_at_ms(&message_value),
                ) else {
                    return Err(StoreError::Corrupt(format!(
                        "message of inbox {inbox} has no header"
                    )));
                };
                if sent_at_ms >= bucket_end_ms {
                    complete = true;
                    break;
                }
                if expire_at_ms <= now {
                    txn.clear(&message_key);
                    report.messages_deleted += 1;
                }
                last_seen = Some(seq);
            }
            match last_seen.and_then(|seq| seq.checked_add(1)) {
                Some(next) => from = keys::message(inbox, next),
                None if last_seen.is_some() => complete = true,
                None => {}
            }
        }
        if !complete {
            // Out of budget inside this inbox: the next pass goes on after the last message
            // seen, so an inbox with more live messages than the budget still gets done.
            if let Some(seq) = last_seen {
                let mut resume = [0u8; 9];
                resume[0] = EXPIRY_RESUME_TAG;
                resume[1..].copy_from_slice(&seq.to_le_bytes());
                txn.set(&key, &resume);
            }
            report.more = true;
            round_stopped_at = Some(key);
            break;
        }
        txn.clear(&key);
        report.index_entries_cleared += 1;
        // Nothing left at all (this transaction sees its own deletes): the home shard forgets
        // the inbox.
        budget = budget.saturating_sub(1);
        if txn
            .get_range(&keys::message(inbox, 0), &last_key, 1)?
            .is_empty()
        {
            txn.set(&keys::emptied(inbox), &[]);
            emptied_now.push(inbox);
        }
    }
    // A message expired at `now` is gone for good: after a restart the clock starts past this
    // time, so no device is told of the hole at a time before the message's expiry (and no
    // later send gets a `sent_at` before that of a message expiry already judged).
    if report.messages_deleted > 0 {
        txn.atomic_max(&keys::clock(), now);
    }
    // The round goes on while the pass has more to do (old dedupe records too: a round that
    // ended with the index would start the next pass at the index's start again).
    match round_stopped_at {
        Some(key) => txn.set(&keys::expiry_round_at(), &key),
        None if report.more => txn.set(&keys::expiry_round_at(), &live_start),
        None if mark_found => txn.clear(&keys::expiry_round_at()),
        None => {}
    }
    report.devices_behind =
        sweep_forgotten_devices(txn, now, config, budget.min(DEVICE_SWEEP_KEYS_MAX))?;
    // Inboxes emptied before and not yet forgotten (their forget was lost in a crash) are
    // listed once a round, by its first pass: every pass would walk the tombstones of the `g`
    // records the round's forgets cleared. Every pass hands on what it emptied itself.
    report.round_began = round_begins;
    if round_begins {
        emptied_now.sort_unstable();
        let (start, end) = keys::tag_range(keys::TAG_EMPTIED);
        for (key, _) in txn.get_range(&start, &end, entries_max)? {
            let inbox = keys::parse_emptied(&key).ok_or_else(|| {
                StoreError::Corrupt("emptied-inbox key of unexpected shape".into())
            })?;
            if emptied_now.binary_search(&inbox).is_err() {
                report.emptied.push(inbox);
            }
        }
    }
    report.emptied.extend(emptied_now);
    Ok(report)
}

/// What a shard keeps between its expiry calls on stores every shard shares
/// ([`expire_shared`], [`sweep_devices_shared`]), one entry per store.
#[derive(Debug, Clone, Default)]
pub struct SharedExpiry {
    /// Where this shard's listing of emptied inboxes goes on (`None`: from the start).
    listed_to: Vec<Option<Vec<u8>>>,
    /// The scan size the store's last pass committed with (0: not yet known, the configured
    /// one): on FoundationDB under load a pass of the configured size can outlast the
    /// transaction's time limit on every attempt, so a smaller size that committed is where
    /// the next pass starts. It grows back an eighth a pass, up to `scan_keys_ceiling`.
    scan_keys_max: Vec<usize>,
    /// How far the scan size may grow in this turn (0: the configured size): a pass that had
    /// to shrink sets it to the size that committed, so the turn's later passes do not grow
    /// back into the limit and fail again (each failure a timeout of seconds). Lifted when
    /// the turn ends: each turn probes for room at most once.
    scan_keys_ceiling: Vec<usize>,
    /// When the store's pass failed in this turn: later calls pass it by (each failure can
    /// take several transaction timeouts) for `SHARED_STORE_RETRY_MS`, or until a call ends
    /// the turn, whichever comes first.
    failed_at: Vec<Option<UnixMillis>>,
    /// The store's device sweep is behind its round ([`ExpireReport::devices_behind`]).
    devices_behind: Vec<bool>,
    /// The first error of a store's device sweep in this catch-up, returned once no store is
    /// behind any more.
    sweep_failed: Option<StoreError>,
}

impl SharedExpiry {
    fn fit(&mut self, stores: usize) {
        self.listed_to.resize(stores, None);
        self.scan_keys_max.resize(stores, 0);
        self.scan_keys_ceiling.resize(stores, 0);
        self.failed_at.resize(stores, None);
        self.devices_behind.resize(stores, false);
    }

    /// Whether the store's pass failed in this turn less than `SHARED_STORE_RETRY_MS` ago.
    fn passes_by(&self, index: usize, now: UnixMillis) -> bool {
        self.failed_at[index]
            .is_some_and(|failed| now < failed.saturating_add(SHARED_STORE_RETRY_MS))
    }
}

/// How long a turn's calls pass a failed shared store by before they try it again, when the
/// turn goes on that long (another store's backlog keeps it going): a minute, the default
/// expiry interval.
const SHARED_STORE_RETRY_MS: UnixMillis = 60_000;

/// One expiry turn of a shard on stores every shard shares (FoundationDB clusters, one store
/// each): if `runs_passes` (one shard of one edge runs them, decision 0011), a pass over every
/// store; then, unless a pass has more to do, a page of each store's inboxes recorded as emptied
/// (`list_emptied`, `expire_scan_keys_max / 2` of them), going on where `state.listed_to` (one
/// position per store) left off. The caller hands [`ExpireReport::emptied`] to its session
/// ([`crate::session::EdgeSession::handle_emptied`]), which keeps those homed on its shard and
/// edge, and calls again while [`ExpireReport::more`] is set: a call that returns without
/// `more` ends the turn.
///
/// A store that fails does not hold up the others: their passes run and their `more` stands,
/// its error comes back in [`ExpireReport::store_failed`], and the turn's later calls pass it
/// by. Only `Fenced` is returned as an error (the edge must stop).
///
/// The edge's FoundationDB backend and the cluster simulation both run this, so the simulation
/// checks what the edge does.
pub fn expire_shared<S: Store>(
    stores: &[S],
    runs_passes: bool,
    state: &mut SharedExpiry,
    now: UnixMillis,
    config: &CoreConfig,
) -> Result<ExpireReport, StoreError> {
    state.fit(stores.len());
    let mut total = ExpireReport::default();
    if runs_passes {
        // A sweep error from an earlier catch-up is not this one's to report.
        state.sweep_failed = None;
        let configured = config.expire_scan_keys_max.max(4);
        for (index, store) in stores.iter().enumerate() {
            if state.passes_by(index, now) {
                continue;
            }
            if state.scan_keys_max[index] == 0 {
                state.scan_keys_max[index] = configured;
            }
            let before = state.scan_keys_max[index];
            let result = expire_sized(store, now, config, &mut state.scan_keys_max[index]);
            let size = &mut state.scan_keys_max[index];
            let ceiling = &mut state.scan_keys_ceiling[index];
            let report = match result {
                Ok(report) => {
                    if *size < before {
                        // It had to shrink: no growing back into the limit this turn.
                        *ceiling = *size;
                    } else {
                        // Back toward the configured size, an eighth a pass that committed.
                        let limit = if *ceiling == 0 { configured } else { *ceiling };
                        *size = (*size + (*size / 8).max(1)).min(limit).max(*size);
                    }
                    state.failed_at[index] = None;
                    report
                }
                Err(StoreError::Fenced) => return Err(StoreError::Fenced),
                Err(error) => {
                    state.failed_at[index] = Some(now);
                    total.store_failed.get_or_insert(error);
                    continue;
                }
            };
            total.messages_deleted += report.messages_deleted;
            total.index_entries_cleared += report.index_entries_cleared;
            total.emptied.extend(report.emptied);
            total.round_began |= report.round_began;
            total.more |= report.more;
            state.devices_behind[index] = report.devices_behind;
            total.devices_behind |= report.devices_behind;
            if total.dedupe_tables_drop_failed.is_none() {
                total.dedupe_tables_drop_failed = report.dedupe_tables_drop_failed;
            }
        }
    }
    // Only an inbox's home shard may forget it, and the passes above run on one shard of one
    // edge: so every shard lists the inboxes recorded as emptied, a page per turn going round
    // the records, and keeps its own. (Left to the passes, the others' inboxes kept their
    // counters, device records and `g` records for good.)
    if !total.more {
        let page = (config.expire_scan_keys_max / 2).max(1);
        for (index, store) in stores.iter().enumerate() {
            if state.passes_by(index, now) {
                continue;
            }
            match list_emptied(store, state.listed_to[index].as_deref(), page) {
                Ok((inboxes, next)) => {
                    total.emptied.extend(inboxes);
                    state.listed_to[index] = next;
                }
                Err(StoreError::Fenced) => return Err(StoreError::Fenced),
                // The page is listed again next turn.
                Err(error) => {
                    total.store_failed.get_or_insert(error);
                }
            }
        }
        // The turn ends: a store that failed is tried again at the next, and each store's
        // scan size may probe for room again.
        state.failed_at.fill(None);
        state.scan_keys_ceiling.fill(0);
    }
    Ok(total)
}

/// [`sweep_devices`] on each store the shards share whose device sweep is behind (as the
/// turn's passes found, [`expire_shared`]), for the shard that runs the passes. A store that
/// fails is passed by for the rest of the catch-up, and its error comes back once no other
/// store is behind. Returns whether any store is still behind.
pub fn sweep_devices_shared<S: Store>(
    stores: &[S],
    state: &mut SharedExpiry,
    now: UnixMillis,
    config: &CoreConfig,
) -> Result<bool, StoreError> {
    state.fit(stores.len());
    for (index, store) in stores.iter().enumerate() {
        if !state.devices_behind[index] {
            continue;
        }
        match sweep_devices(store, now, config) {
            Ok(behind) => state.devices_behind[index] = behind,
            Err(StoreError::Fenced) => return Err(StoreError::Fenced),
            Err(error) => {
                state.devices_behind[index] = false;
                state.sweep_failed.get_or_insert(error);
            }
        }
    }
    if state.devices_behind.contains(&true) {
        return Ok(true);
    }
    state.sweep_failed.take().map_or(Ok(false), Err)
}

/// Up to `max` inboxes recorded as emptied and not yet forgotten (`g` records), after the key
/// `after` (from the start without it), and where the next call goes on (`None`: the start
/// again, the end was reached). Read without conflicts.
///
/// On a store the shards share (FoundationDB), one shard of one edge runs the expiry passes,
/// while only an inbox's home shard may forget it (decision 0011): every shard lists the
/// records this way and forgets its own.
pub fn list_emptied<S: Store>(
    store: &S,
    after: Option<&[u8]>,
    max: usize,
) -> Result<(Vec<UserId>, Option<Vec<u8>>), StoreError> {
    let (start, end) = keys::tag_range(keys::TAG_EMPTIED);
    let from = match after {
        // Just after the key: a zero byte appended makes the next key in order.
        Some(key) if key.first() == Some(&keys::TAG_EMPTIED) => [key, &[0]].concat(),
        _ => start.to_vec(),
    };
    let mut txn = store.begin_read()?;
    let records = txn.get_range(&from, &end, max.max(1))?;
    let next = (records.len() >= max.max(1))
        .then(|| records.last().map(|(key, _)| key.clone()))
        .flatten();
    let inboxes = records
        .iter()
        .map(|(key, _)| {
            keys::parse_emptied(key)
                .ok_or_else(|| StoreError::Corrupt("emptied-inbox key of unexpected shape".into()))
        })
        .collect::<Result<_, _>>()?;
    Ok((inboxes, next))
}

/// Device records a pass of expiry looks at, at most: the sweep is background work, and on
/// FoundationDB every record it reads is a conflict with a commit that writes it.
pub(crate) const DEVICE_SWEEP_KEYS_MAX: usize = 64;

/// The longest a round of the device sweep should take: the sweep reads a bounded number of
/// records a pass, so a store with many (a million devices is 15,625 passes, eleven days at one
/// pass a minute) would delete a record unseen for the retention that much later. A round
/// behind this schedule runs extra passes ([`sweep_devices`]). An eighth of the retention,
/// at most `device_sweep_round_ms_max` (a day): a record is then gone within the retention and
/// a day.
pub fn device_sweep_round_ms(config: &CoreConfig) -> u64 {
    (config.retention_ms / 8).clamp(1, config.device_sweep_round_ms_max.max(1))
}

/// The pace of a round of the device sweep (the `y` record): a round that ends within the pass
/// it began in keeps none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SweepRound {
    began_ms: UnixMillis,
    /// Records the last round read (0: not known, this is the first round kept).
    last_round_keys: u64,
    /// Records this round read so far.
    keys: u64,
}

impl SweepRound {
    fn decode(value: &[u8]) -> Option<SweepRound> {
        let field = |at: usize| Some(u64::from_le_bytes(value.get(at..at + 8)?.try_into().ok()?));
        Some(SweepRound {
            began_ms: field(0)?,
            last_round_keys: field(8)?,
            keys: field(16)?,
        })
    }

    fn encode(&self) -> [u8; 24] {
        let mut value = [0; 24];
        value[..8].copy_from_slice(&self.began_ms.to_le_bytes());
        value[8..16].copy_from_slice(&self.last_round_keys.to_le_bytes());
        value[16..].copy_from_slice(&self.keys.to_le_bytes());
        value
    }

    /// Whether the round read fewer records than its share of the schedule (the last round's
    /// count spread evenly over `round_ms`), or is older than `round_ms`.
    fn behind(&self, now: UnixMillis, round_ms: u64) -> bool {
        let elapsed_ms = now.saturating_sub(self.began_ms);
        // Past its length a round is behind whatever it read (the store grew since the last
        // round, or that round's count was only part of one: a store swept before rounds
        // were kept).
        if elapsed_ms >= round_ms {
            return true;
        }
        if self.last_round_keys == 0 {
            return false;
        }
        let due = u128::from(self.last_round_keys) * u128::from(elapsed_ms) / u128::from(round_ms);
        u128::from(self.keys) < due
    }
}

/// Deletes the records of devices unseen for the retention period whose inbox was forgotten
/// (expiry emptied it and its counter went), looking at up to `keys_max` records after where
/// the last pass stopped (the `w` mark) and starting over at the end. Returns whether the round
/// is behind its schedule (`device_sweep_round_ms`).
///
/// An inbox with a counter forgets its stale devices as its devices ack and log in (one per
/// transaction, `write_devices`); an inbox that no device ever acks again, because the user
/// left, is forgotten by expiry once its messages are gone, and without this sweep its device
/// records would stay forever. Only forgotten inboxes are swept, so no stored message loses a
/// device it waits for. A record a committer still holds in its cache (it read the inbox's
/// devices before this pass) only makes it keep messages longer, or, if that device acks,
/// writes it back: it is alive then.
fn sweep_forgotten_devices<T: Transaction>(
    txn: &mut T,
    now: UnixMillis,
    config: &CoreConfig,
    keys_max: usize,
) -> Result<bool, StoreError> {
    if keys_max == 0 {
        return Ok(false);
    }
    let (start, end) = keys::tag_range(keys::TAG_DEVICE);
    let mark = txn.get(&keys::devices_swept_to())?;
    let from = match &mark {
        // Just after the mark: a zero byte appended makes the next key in order.
        Some(mark) if mark.first() == Some(&keys::TAG_DEVICE) => {
            let mut after = mark.clone();
            after.push(0);
            after
        }
        _ => start.to_vec(),
    };
    let records = txn.get_range(&from, &end, keys_max)?;
    let mut last = None;
    for (key, value) in &records {
        last = Some(key.clone());
        // A record that does not parse is passed, not an error: it would stop every later
        // pass at the same key, and expiry with it. (Its inbox's acks report it.)
        let (Some((inbox, _)), Ok((_, last_seen_ms))) =
            (keys::parse_device(key), decode_device(value))
        else {
            continue;
        };
        // A snapshot read: a send creating the counter meanwhile need not fail the pass (the
        // device is unseen for the retention either way, and its inbox's next ack would
        // forget it too).
        if last_seen_ms.saturating_add(config.retention_ms) < now
            && txn.get_snapshot(&keys::counter(inbox))?.is_none()
        {
            txn.clear(key);
        }
    }
    // The round's pace. A round without a record begins at this pass (one from before the
    // mark's round was kept counts from here).
    let kept = txn
        .get(&keys::devices_sweep_round())?
        .and_then(|value| SweepRound::decode(&value));
    let mut round = kept.unwrap_or(SweepRound {
        began_ms: now,
        last_round_keys: 0,
        keys: 0,
    });
    round.keys += records.len() as u64;
    let round_ended = match last {
        Some(key) if records.len() == keys_max => {
            txn.set(&keys::devices_swept_to(), &key);
            false
        }
        // The end of the records: the next pass starts over.
        _ => {
            if mark.is_some() {
                txn.clear(&keys::devices_swept_to());
            }
            true
        }
    };
    if !round_ended {
        txn.set(&keys::devices_sweep_round(), &round.encode());
        return Ok(round.behind(now, device_sweep_round_ms(config)));
    }
    // A round that ended within one pass needs no pace (and a store that small writes
    // nothing for it); a longer one hands its count to the next round.
    if round.keys <= keys_max as u64 {
        if kept.is_some() {
            txn.clear(&keys::devices_sweep_round());
        }
    } else {
        let next = SweepRound {
            began_ms: now,
            last_round_keys: round.keys,
            keys: 0,
        };
        txn.set(&keys::devices_sweep_round(), &next.encode());
    }
    Ok(false)
}

/// One more pass of the device sweep alone, for a round behind its schedule
/// ([`ExpireReport::devices_behind`]): reads up to `DEVICE_SWEEP_KEYS_MAX` records (at most
/// `expire_scan_keys_max`) in a transaction of its own. Returns whether the round is still
/// behind; call again while it is (each call reads records or ends the round).
pub fn sweep_devices<S: Store>(
    store: &S,
    now: UnixMillis,
    config: &CoreConfig,
) -> Result<bool, StoreError> {
    let keys_max = config.expire_scan_keys_max.clamp(1, DEVICE_SWEEP_KEYS_MAX);
    retrying(|| {
        let mut txn = store.begin()?;
        let behind = sweep_forgotten_devices(&mut txn, now, config, keys_max)?;
        txn.commit()?;
        Ok(behind)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    /// The key sizes record holds the expiry bucket and the dedupe window; one from before
    /// the window was kept (8 bytes) gains it at the next record, keeping its bucket; a
    /// recorded window that differs from the configured one is a mismatch, a missing one not.
    #[test]
    fn key_sizes_record_the_dedupe_window_too() {
        let store = MemoryStore::new();
        assert_eq!(stored_key_sizes(&store).unwrap(), None);
        let mut txn = store.begin().unwrap();
        txn.set(&keys::expiry_bucket_size(), &60_000u64.to_le_bytes());
        txn.commit().unwrap();
        let before = stored_key_sizes(&store).unwrap().unwrap();
        assert_eq!(before.dedupe_window_ms, None);
        assert!(
            !before.differ_from(60_000, 86_400_000),
            "no window recorded yet"
        );
        assert!(before.differ_from(120_000, 86_400_000));
        record_key_sizes(&store, 120_000, 86_400_000).unwrap();
        let after = stored_key_sizes(&store).unwrap().unwrap();
        assert_eq!(
            after,
            KeySizes {
                expiry_bucket_ms: 60_000,
                dedupe_window_ms: Some(86_400_000),
            },
            "the recorded bucket stays; the window is added"
        );
        assert!(after.differ_from(60_000, 172_800_000));
        assert!(!after.differ_from(60_000, 86_400_000));
        record_key_sizes(&store, 60_000, 172_800_000).unwrap();
        assert_eq!(
            stored_key_sizes(&store).unwrap(),
            Some(after),
            "never overwritten"
        );
    }

    /// A store whose tables cannot be dropped: the log engine's drop needs a checkpoint,
    /// which a full disk refuses.
    struct DropFails(MemoryStore);

    impl Store for DropFails {
        type Transaction<'a> = <MemoryStore as Store>::Transaction<'a>;

        fn begin(&self) -> Result<Self::Transaction<'_>, StoreError> {
            self.0.begin()
        }

        fn drops_tables(&self) -> bool {
            true
        }

        fn drop_tables_within(&self, _begin: &[u8], _end: &[u8]) -> Result<(), StoreError> {
            Err(StoreError::Io("no space left on device".into()))
        }
    }

    /// A store that cannot be written at all.
    struct Broken;

    impl Store for Broken {
        type Transaction<'a> = <MemoryStore as Store>::Transaction<'a>;

        fn begin(&self) -> Result<Self::Transaction<'_>, StoreError> {
            Err(StoreError::Io("the disk is gone".into()))
        }
    }

    /// On stores the shards share, a store whose expiry fails does not hold up the passes of
    /// the stores after it: their expired messages are deleted, their `more` stands (so the
    /// caller goes on with them at once), and the error comes back in the report. (The first
    /// error ended the round, so one failing store stopped expiry on every store after it,
    /// for as long as it failed; then, returned as an error, it made the caller wait an
    /// interval while the other stores had more to do.)
    #[test]
    fn a_failing_shared_store_does_not_stop_the_others_expiry() {
        enum Either {
            Broken(Broken),
            Fine(MemoryStore),
        }
        impl Store for Either {
            type Transaction<'a> = <MemoryStore as Store>::Transaction<'a>;

            fn begin(&self) -> Result<Self::Transaction<'_>, StoreError> {
                match self {
                    Either::Broken(store) => store.begin(),
                    Either::Fine(store) => store.begin(),
                }
            }
        }
        let config = CoreConfig::default();
        let stores = [Either::Broken(Broken), Either::Fine(MemoryStore::new())];
        let now = 10 * config.expiry_bucket_ms;
        let short_lived = send_with_ttl(1, 7, 1);
        Committer::new(&config)
            .commit_batch(&stores[1], &[short_lived], now)
            .unwrap();
        let later = now + 2 * config.expiry_bucket_ms;
        let mut state = SharedExpiry::default();
        let report = expire_shared(&stores, true, &mut state, later, &config)
            .expect("a failing store is reported, not returned as an error");
        assert!(
            report.store_failed.is_some(),
            "the broken store's error comes back"
        );
        let Either::Fine(fine) = &stores[1] else {
            unreachable!()
        };
        assert_eq!(
            dump_messages(fine),
            0,
            "the other store's expired message is deleted"
        );
        // With more to do on the fine store than a pass reads, the report says so.
        let config = CoreConfig {
            expire_scan_keys_max: 4,
            ..config
        };
        let many: Vec<Request> = (1..=20).map(|id| send_with_ttl(id, 100 + id, 1)).collect();
        Committer::new(&config)
            .commit_batch(&stores[1], &many, later)
            .unwrap();
        let mut state = SharedExpiry::default();
        let much_later = later + 2 * config.expiry_bucket_ms;
        let report =
            expire_shared(&stores, true, &mut state, much_later, &config).expect("reported");
        assert!(report.store_failed.is_some());
        assert!(report.more, "the fine store's pass has more to do: go on");
        // A turn kept going by another store's backlog tries the failed store again after a
        // while (it failed for a moment, and a turn may last hours).
        let retried =
            expire_shared(&stores, true, &mut state, much_later + 60_000, &config).unwrap();
        assert!(retried.store_failed.is_some(), "tried again a minute on");
        assert!(retried.more);
        // The turn's later calls within that minute pass it by.
        let mut calls = 1;
        loop {
            let report = expire_shared(&stores, true, &mut state, much_later, &config).unwrap();
            calls += 1;
            assert_eq!(
                report.store_failed, None,
                "call {calls} tried the failed store again"
            );
            if !report.more {
                break;
            }
        }
        // The next turn tries it again.
        let report = expire_shared(&stores, true, &mut state, much_later, &config).unwrap();
        assert!(
            report.store_failed.is_some(),
            "a new turn tries every store"
        );
    }

    /// A pass that reads too much for the store's time limit (FoundationDB's, under load)
    /// fails the same way on every attempt at the same size: each retry reads half as much,
    /// so the pass commits and the passes after it finish the work. (Retried at the same size,
    /// it failed for good, and nothing expired while the load lasted.)
    #[test]
    fn a_pass_too_large_for_the_transaction_limit_retries_smaller() {
        use crate::store::fault::{FaultRates, FaultStore};
        let config = CoreConfig {
            expire_scan_keys_max: 1_000,
            ..CoreConfig::default()
        };
        let store = FaultStore::new(MemoryStore::new(), FaultRates::default(), 1);
        let now = 10 * config.expiry_bucket_ms;
        let sends: Vec<Request> = (1..=300)
            .map(|id| send_with_ttl(id, 1_000 + id, 1))
            .collect();
        let mut committer = Committer::new(&config);
        for batch in sends.chunks(config.batch_requests_max) {
            committer.commit_batch(&store, batch, now).unwrap();
        }
        // A transaction may read 200 keys: a pass of 1,000 reads about 900 here.
        store.set_reads_per_transaction_max(200);
        let later = now + 2 * config.expiry_bucket_ms;
        let mut passes = 0;
        loop {
            let report = expire(&store, later, &config).expect("a smaller pass commits");
            passes += 1;
            assert!(passes < 100, "the passes finish");
            if !report.more {
                break;
            }
        }
        let mut txn = store.inner().begin().unwrap();
        let (start, end) = keys::tag_range(keys::TAG_MESSAGE);
        assert!(
            txn.get_range(&start, &end, 10).unwrap().is_empty(),
            "every expired message is deleted"
        );
    }

    /// On shared stores the size a pass committed with is where the next starts (growing
    /// back an eighth a pass): under a sustained transaction limit a turn's passes do not each
    /// fail down from the configured size again (on FoundationDB each failure is a timeout of
    /// seconds).
    #[test]
    fn shared_passes_start_from_the_size_that_committed() {
        use crate::store::fault::{FaultRates, FaultStore};
        let config = CoreConfig {
            expire_scan_keys_max: 1_000,
            ..CoreConfig::default()
        };
        let stores = [FaultStore::new(
            MemoryStore::new(),
            FaultRates::default(),
            1,
        )];
        let now = 10 * config.expiry_bucket_ms;
        let sends: Vec<Request> = (1..=2_000)
            .map(|id| send_with_ttl(id, 10_000 + id, 1))
            .collect();
        let mut committer = Committer::new(&config);
        for batch in sends.chunks(config.batch_requests_max) {
            committer.commit_batch(&stores[0], batch, now).unwrap();
        }
        stores[0].set_reads_per_transaction_max(200);
        let later = now + 2 * config.expiry_bucket_ms;
        let mut state = SharedExpiry::default();
        let mut passes = 0;
        while expire_shared(&stores, true, &mut state, later, &config)
            .expect("passes commit")
            .more
        {
            passes += 1;
            assert!(passes < 1_000, "the passes finish");
        }
        let conflicts = stores[0]
            .counts
            .conflicts
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(passes > 10, "{passes} passes");
        assert!(
            conflicts <= 3,
            "{conflicts} failed attempts in one turn of {passes} passes: later passes failed \
             down from the configured size again, or grew back into the limit"
        );
    }

    fn dump_messages(store: &MemoryStore) -> usize {
        let mut txn = store.begin().unwrap();
        let (start, end) = keys::tag_range(keys::TAG_MESSAGE);
        txn.get_range(&start, &end, 10).unwrap().len()
    }

    /// A failed drop of old dedupe tables does not stop expiry: messages past their TTL are
    /// deleted, and the old dedupe records wait for the next pass's drop. (It returned the
    /// error, so no message expired while the drop kept failing, though expiry is what frees
    /// a full disk.)
    #[test]
    fn a_failed_table_drop_does_not_stop_expiry() {
        let config = CoreConfig::default();
        let store = DropFails(MemoryStore::new());
        let mut committer = Committer::new(&config);
        let now = 10 * config.dedupe_window_ms;
        let short_lived = send_with_ttl(1, 7, 1);
        committer.commit_batch(&store, &[short_lived], now).unwrap();
        let later = now + 3 * config.dedupe_window_ms;
        let mut deleted = 0;
        let mut drop_failed = false;
        for _ in 0..20 {
            let report = expire(&store, later, &config).expect("expiry goes on");
            deleted += report.messages_deleted;
            drop_failed |= report.dedupe_tables_drop_failed.is_some();
            if !report.more {
                break;
            }
        }
        assert!(drop_failed, "the drop was tried and its failure reported");
        assert_eq!(deleted, 1, "the message past its TTL is deleted");
        let mut txn = store.begin().unwrap();
        let (start, end) = keys::tag_range(keys::TAG_DEDUPE);
        assert_eq!(
            txn.get_range(&start, &end, 10).unwrap().len(),
            1,
            "the old dedupe record waits for a drop that succeeds, not swept a key at a time"
        );
        assert!(
            txn.get(&keys::dedupe_expired_below()).unwrap().is_none(),
            "the sweep's mark stays at the start, so the next pass drops again"
        );
    }

    fn send(client_id: u64, to: UserId) -> Request {
        Request::Send(SendRequest {
            sender: 1,
            client_id,
            to,
            body: b"hi".to_vec(),
            ttl_secs: None,
        })
    }

    /// `send` with a lifetime of one second.
    fn send_for_a_second(client_id: u64, to: UserId) -> Request {
        let Request::Send(send) = send(client_id, to) else {
            unreachable!()
        };
        Request::Send(SendRequest {
            ttl_secs: Some(1),
            ..send
        })
    }

    /// A store that holds back one commit, as FoundationDB may after an unknown result, and
    /// lands it later by FoundationDB's rule: it commits only if no key range it read (or
    /// marked with `add_read_conflict`) was written by a commit since it began.
    #[derive(Default)]
    struct LateLanding {
        inner: MemoryStore,
        hold_next: std::sync::atomic::AtomicBool,
        held: std::sync::Mutex<Option<HeldCommit>>,
        /// The ranges every commit wrote, in commit order.
        written: std::sync::Mutex<Vec<(Vec<u8>, Vec<u8>)>>,
    }

    struct HeldCommit {
        read: Vec<(Vec<u8>, Vec<u8>)>,
        writes: Vec<HeldWrite>,
        began_at: usize,
    }

    enum HeldWrite {
        Set(Vec<u8>, Vec<u8>),
        Clear(Vec<u8>),
        ClearRange(Vec<u8>, Vec<u8>),
        Add(Vec<u8>, u64),
        Max(Vec<u8>, u64),
    }

    impl HeldWrite {
        fn range(&self) -> (Vec<u8>, Vec<u8>) {
            match self {
                HeldWrite::Set(key, _)
                | HeldWrite::Clear(key)
                | HeldWrite::Add(key, _)
                | HeldWrite::Max(key, _) => key_range(key),
                HeldWrite::ClearRange(begin, end) => (begin.clone(), end.clone()),
            }
        }

        fn apply<T: Transaction>(&self, txn: &mut T) {
            match self {
                HeldWrite::Set(key, value) => txn.set(key, value),
                HeldWrite::Clear(key) => txn.clear(key),
                HeldWrite::ClearRange(begin, end) => txn.clear_range(begin, end),
                HeldWrite::Add(key, delta) => txn.atomic_add(key, *delta),
                HeldWrite::Max(key, value) => txn.atomic_max(key, *value),
            }
        }
    }

    fn key_range(key: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let mut end = key.to_vec();
        end.push(0);
        (key.to_vec(), end)
    }

    struct LateTransaction<'a> {
        store: &'a LateLanding,
        inner: <MemoryStore as Store>::Transaction<'a>,
        read: Vec<(Vec<u8>, Vec<u8>)>,
        writes: Vec<HeldWrite>,
        began_at: usize,
    }

    impl LateLanding {
        /// Lands the held commit if nothing it read was written since it began; returns
        /// whether it did.
        fn land(&self) -> bool {
            let held = self.held.lock().unwrap().take().expect("a held commit");
            let conflicts =
                self.written.lock().unwrap()[held.began_at..]
                    .iter()
                    .any(|(begin, end)| {
                        held.read
                            .iter()
                            .any(|(read_begin, read_end)| begin < read_end && read_begin < end)
                    });
            if conflicts {
                return false;
            }
            let mut txn = self.inner.begin().unwrap();
            for write in &held.writes {
                write.apply(&mut txn);
            }
            txn.commit().unwrap();
            true
        }
    }

    impl Store for LateLanding {
        type Transaction<'a> = LateTransaction<'a>;

        fn begin(&self) -> Result<LateTransaction<'_>, StoreError> {
            Ok(LateTransaction {
                store: self,
                inner: self.inner.begin()?,
                read: Vec::new(),
                writes: Vec::new(),
                began_at: self.written.lock().unwrap().len(),
            })
        }
    }

    impl Transaction for LateTransaction<'_> {
        fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.read.push(key_range(key));
            self.inner.get(key)
        }
        fn get_range(
            &mut self,
            begin: &[u8],
            end: &[u8],
            limit: usize,
        ) -> Result<Vec<crate::store::KeyValue>, StoreError> {
            self.read.push((begin.to_vec(), end.to_vec()));
            self.inner.get_range(begin, end, limit)
        }
        fn add_read_conflict(&mut self, key: &[u8]) {
            self.read.push(key_range(key));
        }
        fn add_read_conflict_range(&mut self, begin: &[u8], end: &[u8]) {
            self.read.push((begin.to_vec(), end.to_vec()));
        }
        fn set(&mut self, key: &[u8], value: &[u8]) {
            self.writes
                .push(HeldWrite::Set(key.to_vec(), value.to_vec()));
            self.inner.set(key, value);
        }
        fn clear(&mut self, key: &[u8]) {
            self.writes.push(HeldWrite::Clear(key.to_vec()));
            self.inner.clear(key);
        }
        fn clear_range(&mut self, begin: &[u8], end: &[u8]) {
            self.writes
                .push(HeldWrite::ClearRange(begin.to_vec(), end.to_vec()));
            self.inner.clear_range(begin, end);
        }
        fn atomic_add(&mut self, key: &[u8], delta: u64) {
            self.writes.push(HeldWrite::Add(key.to_vec(), delta));
            self.inner.atomic_add(key, delta);
        }
        fn atomic_max(&mut self, key: &[u8], value: u64) {
            self.writes.push(HeldWrite::Max(key.to_vec(), value));
            self.inner.atomic_max(key, value);
        }
        fn commit(self) -> Result<CommitVersion, StoreError> {
            let store = self.store;
            if store
                .hold_next
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                // Dropped uncommitted here; it lands when the test says.
                *store.held.lock().unwrap() = Some(HeldCommit {
                    read: self.read,
                    writes: self.writes,
                    began_at: self.began_at,
                });
                return Err(StoreError::CommitUnknown);
            }
            let ranges: Vec<_> = self.writes.iter().map(HeldWrite::range).collect();
            let version = self.inner.commit()?;
            store.written.lock().unwrap().extend(ranges);
            Ok(version)
        }
    }

    /// A batch whose commit had an unknown result and lands after a later batch stored a
    /// send to the same inbox (FoundationDB may let it) does not land over it: the committer
    /// took the inbox's last seq from its cache, without reading the counter, so the commit
    /// conflicted with nothing the later batch wrote, and put its own message at the seq the
    /// later batch had acknowledged, losing that message. Now a cached seq adds a read
    /// conflict on the counter.
    #[test]
    fn a_late_landing_commit_cannot_overwrite_a_later_acknowledged_send() {
        // The held attempt is the batch's only one, as when every retry failed too.
        let config = CoreConfig {
            commit_attempts_max: 1,
            ..CoreConfig::default()
        };
        let store = LateLanding::default();
        let mut committer = Committer::new(&config);
        let now = 1_000_000;
        let from = |sender: UserId, client_id: u64, body: &[u8]| {
            Request::Send(SendRequest {
                sender,
                client_id,
                to: 7,
                body: body.to_vec(),
                ttl_secs: None,
            })
        };
        // The cache learns inbox 7's last seq.
        committer
            .commit_batch(&store, &[from(1, 1, b"first")], now)
            .unwrap();
        store
            .hold_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let unknown = committer.commit_batch(&store, &[from(2, 1, b"from A")], now);
        assert_eq!(unknown.unwrap_err(), StoreError::CommitUnknown);
        let outcomes = committer
            .commit_batch(&store, &[from(3, 1, b"from B")], now)
            .unwrap();
        let [Outcome::Stored { seq: 2, .. }] = outcomes[..] else {
            panic!("B's send stored at seq 2: {outcomes:?}");
        };
        assert!(!store.land(), "the held commit landed over B's");
        let page = read_inbox(&store, 7, 0, now, &config).unwrap();
        let bodies: Vec<(u64, &[u8])> = page
            .messages
            .iter()
            .map(|message| (message.seq, &message.body[..]))
            .collect();
        assert_eq!(bodies, vec![(1, &b"first"[..]), (2, &b"from B"[..])]);
    }

    /// A batch built from the cached device records whose commit had an unknown result, and
    /// that lands after a later login of a device it forgot (FoundationDB may let it), does not
    /// land over that login: it read no device key, so it conflicted with nothing the login
    /// wrote, and it deleted the record of a device that had just been welcomed. That device's
    /// acks then recorded nothing and the others' acks deleted what it had not read. Now the
    /// cached records add a read conflict on the inbox's device range.
    #[test]
    fn a_late_landing_commit_cannot_forget_a_device_that_logged_in_after_it() {
        let config = CoreConfig {
            commit_attempts_max: 1,
            ..CoreConfig::default()
        };
        let store = LateLanding::default();
        let mut committer = Committer::new(&config);
        let link = |device| Request::Link {
            inbox: 7,
            device,
            acked_up_to: 0,
        };
        let ack = |device, up_to_seq| Request::Ack {
            inbox: 7,
            device,
            up_to_seq,
        };
        let t0 = 1_000_000_000;
        // The cache learns both device records; device 0 is seen again halfway, so that the
        // login below leaves its record alone.
        committer
            .commit_batch(&store, &[link(0), link(1)], t0)
            .unwrap();
        committer
            .commit_batch(&store, &[ack(0, 0)], t0 + config.retention_ms / 2)
            .unwrap();
        // A retention period later, device 1 unseen since: an ack of device 0 forgets it.
        let later = t0 + config.retention_ms + 1;
        store
            .hold_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let unknown = committer.commit_batch(&store, &[ack(0, 0)], later);
        assert_eq!(unknown.unwrap_err(), StoreError::CommitUnknown);
        // Device 1 comes back and is welcomed.
        let outcomes = committer.commit_batch(&store, &[link(1)], later).unwrap();
        let [Outcome::Linked { cursor: 0, .. }] = outcomes[..] else {
            panic!("device 1 linked at its cursor: {outcomes:?}");
        };
        assert!(
            !store.land(),
            "the held commit forgot a device that had just logged in"
        );
        // A message to the inbox, read by device 0 alone, waits for device 1.
        let outcomes = committer
            .commit_batch(&store, &[send(1, 7)], later)
            .unwrap();
        let [Outcome::Stored { seq: 1, .. }] = outcomes[..] else {
            panic!("stored at seq 1: {outcomes:?}");
        };
        committer.commit_batch(&store, &[ack(0, 1)], later).unwrap();
        let page = read_inbox(&store, 7, 0, later, &config).unwrap();
        assert_eq!(
            page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![1],
            "the message device 1 has not read is kept"
        );
    }

    fn send_with_ttl(client_id: u64, to: UserId, ttl_secs: u32) -> Request {
        Request::Send(SendRequest {
            sender: 1,
            client_id,
            to,
            body: b"hi".to_vec(),
            ttl_secs: Some(ttl_secs),
        })
    }

    /// A dedupe record's value is 20 bytes (inline in the embedded stores) for any lifetime
    /// that fits 4 bytes of milliseconds, 24 past that or on a store that gains nothing from
    /// it (FoundationDB), and records of both lengths (every record stored before the short
    /// form was 24 bytes) read back the same numbers.
    #[test]
    fn dedupe_records_are_short_when_the_lifetime_fits_and_both_lengths_read() {
        let now = 1_700_000_000_000;
        for (lifetime_ms, bytes) in [
            (0, 20),
            (30 * 24 * 3_600_000, 20),
            (u64::from(u32::MAX), 20),
            (u64::from(u32::MAX) + 1, 24),
            (u64::MAX - now, 24),
        ] {
            for short in [true, false] {
                let (record, len) = dedupe_record(7, now, now + lifetime_ms, short);
                let want = if short { bytes } else { 24 };
                assert_eq!(len, want, "lifetime {lifetime_ms} ms, short {short}");
                assert_eq!(
                    parse_dedupe_record(&record[..len]),
                    Some((7, now, now + lifetime_ms))
                );
            }
        }
        // A record written before the short form: seq, server time, expiry, 8 bytes each.
        let mut old = Vec::new();
        for field in [9u64, now, now + 60_000] {
            old.extend_from_slice(&field.to_le_bytes());
        }
        assert_eq!(parse_dedupe_record(&old), Some((9, now, now + 60_000)));
        // An expiry before the server time (`write_batch` never makes one) takes the long
        // form, which holds any.
        assert_eq!(dedupe_record(1, now, now - 1, true).1, 24);
        for len in [0, 8, 16, 19, 21, 23, 25, 32] {
            assert_eq!(parse_dedupe_record(&vec![1; len]), None, "{len} bytes");
        }
    }

    /// An inbox with more live messages than one pass may read still gets its expiry done:
    /// each pass goes on where the last one stopped, and the passes end.
    #[test]
    fn expiry_goes_on_where_a_pass_ran_out_of_budget() {
        let config = CoreConfig {
            expire_scan_keys_max: 10,
            ..CoreConfig::default()
        };
        let store = MemoryStore::new();
        let mut committer = Committer::new(&config);
        let now = 5 * config.dedupe_window_ms;
        let mut batch: Vec<Request> = (1..=30).map(|id| send(id, 7)).collect();
        batch.push(Request::Send(SendRequest {
            sender: 1,
            client_id: 99,
            to: 7,
            body: b"short".to_vec(),
            ttl_secs: Some(1),
        }));
        committer.commit_batch(&store, &batch, now).unwrap();
        let later = now + 2 * config.expiry_bucket_ms;
        let mut passes = 0;
        let mut deleted = 0;
        loop {
            let report = expire(&store, later, &config).unwrap();
            deleted += report.messages_deleted;
            passes += 1;
            assert!(passes < 20, "expiry never finished");
            if !report.more {
                break;
            }
        }
        assert_eq!(deleted, 1, "only the short-lived message expired");
        let page = read_inbox(&store, 7, 0, later, &config).unwrap();
        assert_eq!(page.messages.len(), 30);
        let mut txn = store.begin().unwrap();
        let (start, end) = keys::tag_range(keys::TAG_EXPIRY);
        let entries = txn.get_range(&start, &end, 10).unwrap();
        assert_eq!(
            entries.len(),
            1,
            "only the retention bucket's entry is left"
        );
    }

    /// A pass that expired a message raises the clock's high-water mark to its time, so an
    /// edge restarted with its wall clock set back does not run at a time before that expiry
    /// (its devices would be told of a hole before the message's TTL ran out).
    #[test]
    fn an_expiry_pass_that_deleted_a_message_raises_the_clock_high_water_mark() {
        let config = CoreConfig::default();
        let store = MemoryStore::new();
        let now = 5 * config.dedupe_window_ms;
        let short = Request::Send(SendRequest {
            sender: 1,
            client_id: 1,
            to: 7,
            body: b"short".to_vec(),
            ttl_secs: Some(1),
        });
        Committer::new(&config)
            .commit_batch(&store, &[short], now)
            .unwrap();
        assert_eq!(clock_high_water(&store).unwrap(), now);
        let later = now + 2 * config.expiry_bucket_ms;
        let report = expire(&store, later, &config).unwrap();
        assert_eq!(report.messages_deleted, 1);
        assert_eq!(clock_high_water(&store).unwrap(), later);
    }

    /// The passes of a round go on where the last one stopped, not from the start of the
    /// index: on fjall each would walk the tombstones of every entry the round had cleared. An
    /// entry put below the mark meanwhile (a send whose clock was behind) waits for the next
    /// round, which starts over. Emptied inboxes are each handed on once by the pass that
    /// emptied them; the `g` records a crash left are listed again by a round's first pass.
    #[test]
    fn a_round_of_expiry_passes_goes_on_where_the_last_stopped() {
        let config = CoreConfig {
            expire_scan_keys_max: 12,
            ..CoreConfig::default()
        };
        let store = MemoryStore::new();
        let mut committer = Committer::new(&config);
        let short = |client_id: u64, to: UserId| {
            Request::Send(SendRequest {
                sender: 1,
                client_id,
                to,
                body: b"short".to_vec(),
                ttl_secs: Some(1),
            })
        };
        let t0 = 10 * config.expiry_bucket_ms;
        let sends: Vec<Request> = (10..30).map(|inbox| short(inbox, inbox)).collect();
        committer.commit_batch(&store, &sends, t0).unwrap();
        let stored = |inbox: UserId| {
            let mut txn = store.begin().unwrap();
            let (start, end) = (keys::message(inbox, 0), keys::message(inbox, u64::MAX));
            txn.get_range(&start, &end, 10).unwrap().len()
        };
        let later = t0 + 2 * config.expiry_bucket_ms;
        let first = expire(&store, later, &config).unwrap();
        assert!(first.more, "20 inboxes take more than one pass of 12 keys");
        assert!(!first.emptied.is_empty());
        // Behind the mark now: a late send to inbox 1 (its entry sorts first in the bucket),
        // and a `g` record left by a crash before its forget.
        committer.commit_batch(&store, &[short(1, 1)], t0).unwrap();
        {
            let mut txn = store.begin().unwrap();
            txn.set(&keys::emptied(999), &[]);
            txn.commit().unwrap();
        }
        let mut emptied = first.emptied.clone();
        let mut passes = 1;
        loop {
            let report = expire(&store, later, &config).unwrap();
            emptied.extend(&report.emptied);
            passes += 1;
            assert!(passes < 30, "the round never finished");
            if !report.more {
                break;
            }
        }
        assert!(passes > 2);
        emptied.sort_unstable();
        assert_eq!(
            emptied,
            (10..30).collect::<Vec<_>>(),
            "each emptied inbox handed on once, by the pass that emptied it"
        );
        assert!((10..30).all(|inbox| stored(inbox) == 0));
        assert_eq!(stored(1), 1, "the round went on from its mark");
        assert_eq!(
            store
                .begin()
                .unwrap()
                .get(&keys::expiry_round_at())
                .unwrap(),
            None
        );
        // Their home shards forget them, as the edge's shards do with what expiry hands on.
        let forgets: Vec<Request> = emptied
            .iter()
            .map(|&inbox| Request::Forget { inbox })
            .collect();
        committer.commit_batch(&store, &forgets, later).unwrap();
        // The next round starts over.
        let next = expire(&store, later, &config).unwrap();
        assert!(!next.more);
        assert_eq!(stored(1), 0, "the next round began at the start");
        let mut listed = next.emptied.clone();
        listed.sort_unstable();
        assert_eq!(
            listed,
            vec![1, 999],
            "a round's first pass lists the g records"
        );
    }

    /// A short page of an inbox with a counter covers up to the counter; of an inbox without
    /// one, only what it scanned, not up to the floor: on FoundationDB another shard's forget
    /// can raise the shared floor past a seq that a send to this inbox took and has not
    /// committed yet, and a hole declared over it would drop that message's live delivery.
    #[test]
    fn a_page_of_an_inbox_without_a_counter_covers_only_what_it_scanned() {
        let config = CoreConfig::default();
        let store = MemoryStore::new();
        let mut txn = store.begin().unwrap();
        txn.atomic_max(&keys::floor(), 500);
        txn.commit().unwrap();
        let page = read_inbox(&store, 5, 3, 1_000, &config).unwrap();
        assert!(page.messages.is_empty());
        assert_eq!(page.covered_up_to, 3, "no hole up to the floor");
        let mut committer = Committer::new(&config);
        committer
            .commit_batch(&store, &[send(1, 5)], 1_000)
            .unwrap();
        let page = read_inbox(&store, 5, 3, 1_000, &config).unwrap();
        assert_eq!(page.messages.len(), 1);
        assert_eq!(page.messages[0].seq, 501, "above the floor");
        assert_eq!(page.covered_up_to, 501, "up to the counter");
    }

    /// A device record stays while its inbox has a counter (its devices' acks and logins
    /// forget it there) or while it was seen within the retention; one of a forgotten inbox
    /// unseen for the retention goes in expiry's sweep, a bounded number per pass, the sweep
    /// going on where the last pass stopped. Before, the record of a user who left stayed
    /// forever.
    #[test]
    fn device_records_of_forgotten_inboxes_go_after_the_retention() {
        let config = CoreConfig {
            expire_scan_keys_max: 4,
            ..CoreConfig::default()
        };
        let store = MemoryStore::new();
        let mut committer = Committer::new(&config);
        let t0 = 1_000;
        // Inboxes 1..=6 each link a device; inbox 6 also has a message (a counter).
        let links: Vec<Request> = (1..=6)
            .map(|inbox| Request::Link {
                inbox,
                device: 0,
                acked_up_to: 0,
            })
            .collect();
        committer.commit_batch(&store, &links, t0).unwrap();
        committer.commit_batch(&store, &[send(1, 6)], t0).unwrap();
        let devices = || {
            let (start, end) = keys::tag_range(keys::TAG_DEVICE);
            let mut txn = store.begin().unwrap();
            txn.get_range(&start, &end, 100)
                .unwrap()
                .iter()
                .filter_map(|(key, _)| keys::parse_device(key).map(|(inbox, _)| inbox))
                .collect::<Vec<_>>()
        };
        // Within the retention nothing goes.
        expire(&store, t0 + config.retention_ms, &config).unwrap();
        assert_eq!(devices(), vec![1, 2, 3, 4, 5, 6]);
        // Past it, at most four records a pass (the budget left), going on where the last
        // pass stopped and starting over at the end, until only inbox 6's is left (it has a
        // counter).
        let later = t0 + config.retention_ms + 1;
        let mut passes = 0;
        while devices() != vec![6] {
            let before = devices().len();
            expire(&store, later, &config).unwrap();
            passes += 1;
            assert!(before - devices().len() <= 4, "at most the budget a pass");
            assert!(
                passes <= 3,
                "the sweep goes on where it stopped: {:?}",
                devices()
            );
        }
        assert!(passes >= 2, "five records take two passes of four");
        expire(&store, later, &config).unwrap();
        assert_eq!(devices(), vec![6], "a counter keeps its inbox's devices");
    }

    /// Links `inboxes` one device each at `now`, without a message (no counter: each inbox is
    /// as expiry leaves a forgotten one).
    fn link_devices(
        store: &MemoryStore,
        config: &CoreConfig,
        inboxes: std::ops::RangeInclusive<u64>,
        now: UnixMillis,
    ) {
        let mut committer = Committer::new(config);
        let links: Vec<Request> = inboxes
            .map(|inbox| Request::Link {
                inbox,
                device: 0,
                acked_up_to: 0,
            })
            .collect();
        for batch in links.chunks(config.batch_requests_max) {
            committer.commit_batch(store, batch, now).unwrap();
        }
    }

    fn device_records(store: &MemoryStore) -> usize {
        let (start, end) = keys::tag_range(keys::TAG_DEVICE);
        let mut txn = store.begin().unwrap();
        txn.get_range(&start, &end, 100_000).unwrap().len()
    }

    fn sweep_round(store: &MemoryStore) -> Option<SweepRound> {
        let mut txn = store.begin().unwrap();
        txn.get(&keys::devices_sweep_round())
            .unwrap()
            .and_then(|value| SweepRound::decode(&value))
    }

    /// A store with more device records than a pass reads (64) sweeps them at a pace: a round
    /// behind its schedule (an eighth of the retention, at most a day) says so, and
    /// `sweep_devices` catches it up in transactions of its own. At one pass a minute a million
    /// records took eleven days a round, and a device unseen for the retention stayed that much
    /// longer.
    #[test]
    fn a_device_sweep_behind_its_round_catches_up_in_passes_of_its_own() {
        let config = CoreConfig {
            expire_scan_keys_max: 1_000,
            ..CoreConfig::default()
        };
        let round_ms = device_sweep_round_ms(&config);
        assert_eq!(
            round_ms,
            24 * crate::config::HOUR_MS,
            "a day at the default retention"
        );
        let store = MemoryStore::new();
        let t0 = 1_000;
        link_devices(&store, &config, 1..=640, t0);
        let later = t0 + config.retention_ms + 1;
        // The first round's first pass: 64 records, nothing known to be behind.
        let report = expire(&store, later, &config).unwrap();
        assert!(!report.devices_behind);
        assert_eq!(device_records(&store), 576);
        // A day on, the round (with no count from a round before) is behind: the pass says so.
        let late = later + round_ms;
        let report = expire(&store, late, &config).unwrap();
        assert!(
            report.devices_behind,
            "a round older than its schedule is behind"
        );
        let mut calls = 0;
        while sweep_devices(&store, late, &config).unwrap() {
            calls += 1;
            assert!(calls <= 10, "each call reads 64 records or ends the round");
        }
        assert_eq!(device_records(&store), 0, "the round caught up to its end");
        assert_eq!(
            sweep_round(&store),
            Some(SweepRound {
                began_ms: late,
                last_round_keys: 640,
                keys: 0
            }),
            "the next round knows how many records a round reads"
        );
        // The next round, paced by that count: half a day in, it reads half of 640 (these
        // records were seen recently, so they stay), no more.
        link_devices(&store, &config, 1_001..=1_640, late);
        let half = late + round_ms / 2;
        assert!(expire(&store, half, &config).unwrap().devices_behind);
        while sweep_devices(&store, half, &config).unwrap() {}
        assert_eq!(sweep_round(&store).map(|round| round.keys), Some(320));
        assert!(!expire(&store, half, &config).unwrap().devices_behind);
        assert_eq!(device_records(&store), 640, "records seen recently stay");
    }

    /// A round older than its length is behind whatever it read: a store that grew since
    /// the last round (or whose last count was only part of a round) still ends its round on
    /// time. Within the length, behind is the last round's count spread over it.
    #[test]
    fn a_round_past_its_length_is_behind_whatever_it_read() {
        let round = SweepRound {
            began_ms: 1_000,
            last_round_keys: 1_000,
            keys: 1_000,
        };
        assert!(
            !round.behind(1_000 + 999, 1_000),
            "read the last round's count"
        );
        assert!(
            round.behind(1_000 + 1_000, 1_000),
            "the round's length passed"
        );
        let half = SweepRound { keys: 499, ..round };
        assert!(half.behind(1_500, 1_000));
        assert!(!SweepRound { keys: 500, ..round }.behind(1_500, 1_000));
        let first = SweepRound {
            last_round_keys: 0,
            keys: 10,
            ..round
        };
        assert!(
            !first.behind(1_999, 1_000),
            "no count: on time until the length"
        );
        assert!(first.behind(2_000, 1_000));
    }

    /// A store whose device records fit in one pass keeps no pace record (its passes write
    /// nothing for the sweep).
    #[test]
    fn a_sweep_that_fits_in_a_pass_writes_no_pace() {
        let config = CoreConfig::default();
        let store = MemoryStore::new();
        link_devices(&store, &config, 1..=30, 1_000);
        for pass in 0..3 {
            let report = expire(&store, 2_000 + pass, &config).unwrap();
            assert!(!report.devices_behind);
            assert_eq!(sweep_round(&store), None);
        }
    }

    /// A retry within the dedupe window finds its first copy even where a clock a little
    /// ahead of its commit's has run expiry at the window's boundary: a commit's time is
    /// taken before it waits for the writer, and on FoundationDB another edge's clock expires
    /// the buckets. Before, that expiry cleared the first copy's bucket, and the retry, 2 ms
    /// inside the window, was stored again under a new seq (decision 0002: stored once).
    #[test]
    fn a_retry_at_the_windows_boundary_finds_its_first_copy_after_a_clock_ahead_expired() {
        for store in [MemoryStore::new(), MemoryStore::dropping_tables()] {
            let config = CoreConfig::default();
            let window = config.dedupe_window_ms;
            let first = Committer::new(&config)
                .commit_batch(&store, &[send(1, 7)], 2 * window - 1)
                .unwrap();
            assert!(matches!(
                first[..],
                [Outcome::Stored {
                    seq: 1,
                    fresh: true,
                    ..
                }]
            ));
            while expire(&store, 3 * window, &config).unwrap().more {}
            // Another committer: nothing of the first copy in its memory.
            let retry = Committer::new(&config)
                .commit_batch(&store, &[send(1, 7)], 3 * window - 2)
                .unwrap();
            assert!(
                matches!(
                    retry[..],
                    [Outcome::Stored {
                        seq: 1,
                        fresh: false,
                        ..
                    }]
                ),
                "the retry was stored again: {retry:?}"
            );
        }
    }

    /// A read whose raise of the clock mark fails (the disk takes no write) still answers:
    /// it delivers the message that expired past the mark rather than declare it gone, as a
    /// read did before it ever wrote.
    #[test]
    fn a_read_whose_mark_raise_fails_still_answers_and_declares_nothing_gone() {
        use crate::store::fault::{FaultRates, FaultStore};
        let config = CoreConfig::default();
        let store = FaultStore::new(MemoryStore::new(), FaultRates::default(), 1);
        let short = send_for_a_second(1, 7);
        Committer::new(&config)
            .commit_batch(&store, &[short], 1_000)
            .unwrap();
        store.set_rates(FaultRates {
            fsync_failure_per_million: 1_000_000,
            ..FaultRates::default()
        });
        let page = read_inbox(&store, 7, 0, 5_000, &config).expect("the read answers");
        let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, vec![1], "declared gone without a durable mark");
        assert!(store.is_poisoned(), "the raise was tried and failed");
    }

    /// A retry that comes after its message expired, before expiry deleted it, is not
    /// delivered live: connections still behind it read the store, which declares it a hole.
    /// Before, the retry delivered the expired message to them.
    #[test]
    fn a_retry_after_its_message_expired_is_not_delivered_live() {
        let config = CoreConfig::default();
        let store = MemoryStore::new();
        let mut committer = Committer::new(&config);
        let short = send_for_a_second(1, 7);
        let live_at = |committer: &mut Committer, now| match committer
            .commit_batch(&store, std::slice::from_ref(&short), now)
            .unwrap()[..]
        {
            [Outcome::Stored { seq: 1, live, .. }] => live,
            ref other => panic!("{other:?}"),
        };
        assert!(live_at(&mut committer, 1_000));
        assert!(live_at(&mut committer, 1_999), "a retry before the expiry");
        assert!(
            !live_at(&mut committer, 2_000),
            "a retry at its expiry was delivered live"
        );
        // A read past the expiry declared it gone and moved the clock mark on: a retry with
        // an earlier time (a batch keeps its time across attempts) is not live either.
        assert!(
            read_inbox(&store, 7, 0, 5_000, &config)
                .unwrap()
                .messages
                .is_empty()
        );
        assert!(
            !live_at(&mut committer, 1_999),
            "a retry with a time before the mark was delivered live after the hole"
        );
    }

    /// A read that leaves an expired message out (the device is told it is gone) first makes
    /// the store's clock high-water mark reach its time, and a message at or below the mark
    /// is gone for any clock: a clock restarted with the wall clock stepped back starts past
    /// the mark, and on FoundationDB another edge's clock may run behind this one's. Before,
    /// a read by `now` alone declared it gone, and a clock restarted behind it delivered it.
    #[test]
    fn a_message_declared_gone_stays_gone_for_every_later_clock() {
        let config = CoreConfig::default();
        let store = MemoryStore::new();
        let mut committer = Committer::new(&config);
        let short = send_for_a_second(1, 7);
        committer.commit_batch(&store, &[short], 1_000).unwrap();
        let seqs_read = |now| -> (Vec<u64>, u64) {
            let page = read_inbox(&store, 7, 0, now, &config).unwrap();
            (
                page.messages.iter().map(|m| m.seq).collect(),
                page.covered_up_to,
            )
        };
        assert_eq!(seqs_read(1_999), (vec![1], 1), "not expired yet");
        assert_eq!(clock_high_water(&store).unwrap(), 1_000, "a read wrote");
        // Expired at 2,000: gone, and the mark moved to the reader's time first.
        assert_eq!(seqs_read(5_000), (vec![], 1));
        assert_eq!(clock_high_water(&store).unwrap(), 5_000);
        let restarted =
            crate::clock::ServerClock::start(1_500, clock_high_water(&store).unwrap(), 0);
        assert_eq!(seqs_read(restarted.now(0)), (vec![], 1), "found live again");
        // A clock behind the mark (another edge's) finds it gone too.
        assert_eq!(
            seqs_read(1_500),
            (vec![], 1),
            "found live by a clock behind"
        );
    }

    /// A purge leaves no dedupe record of the inbox, also in the bucket before the previous
    /// one, which expiry keeps `DEDUPE_CLEAR_SLACK_MS` past the window. Before, it cleared
    /// the current and the previous bucket only.
    #[test]
    fn a_purge_clears_the_dedupe_records_expiry_has_yet_to_clear() {
        let config = CoreConfig::default();
        let store = MemoryStore::new();
        let window = config.dedupe_window_ms;
        let mut committer = Committer::new(&config);
        committer
            .commit_batch(&store, &[send(1, 9)], window + 1)
            .unwrap();
        assert_eq!(dedupe_records_in(&store, 1), 1);
        let purge = [Request::Purge { inbox: 9 }];
        committer
            .commit_batch(&store, &purge, 3 * window + 1)
            .unwrap();
        assert_eq!(dedupe_records_in(&store, 1), 0, "a dedupe record left");
    }

    /// 100 sends in dedupe bucket 1, then 3 in bucket 3 (the current one at an expiry at
    /// `3 * window + DEDUPE_CLEAR_SLACK_MS + 2`).
    fn send_in_buckets_1_and_3(store: &MemoryStore, config: &CoreConfig) {
        let mut committer = Committer::new(config);
        let window = config.dedupe_window_ms;
        let old: Vec<Request> = (1..=100).map(|id| send(id, 7)).collect();
        for batch in old.chunks(config.batch_requests_max) {
            committer.commit_batch(store, batch, window + 1).unwrap();
        }
        let new: Vec<Request> = (1_001..=1_003).map(|id| send(id, 7)).collect();
        committer.commit_batch(store, &new, 3 * window + 1).unwrap();
    }

    /// How many dedupe records `bucket` holds.
    fn dedupe_records_in(store: &MemoryStore, bucket: u64) -> usize {
        let mut txn = store.begin().unwrap();
        txn.get_range(
            &keys::dedupe_bucket_start(bucket),
            &keys::dedupe_bucket_start(bucket + 1),
            1_000,
        )
        .unwrap()
        .len()
    }

    /// On a store that drops whole tables (decision 0038), old dedupe buckets go by a drop and
    /// a sweep of what is left from the first bucket: the first pass drops, the passes after
    /// it clear the rest a bounded number at a time. When a bucket falls due after a finished
    /// sweep, a pass first puts the mark back at the first bucket (durably, before any drop)
    /// and clears no record; the next drops and sweeps. The current bucket stays throughout.
    #[test]
    fn old_dedupe_buckets_go_by_a_drop_and_a_sweep_from_the_first_bucket() {
        let config = CoreConfig {
            expire_scan_keys_max: 40,
            ..CoreConfig::default()
        };
        let store = MemoryStore::dropping_tables();
        let window = config.dedupe_window_ms;
        send_in_buckets_1_and_3(&store, &config);
        let dedupe_records = |bucket: u64| dedupe_records_in(&store, bucket);
        let mark = || {
            store
                .begin()
                .unwrap()
                .get(&keys::dedupe_expired_below())
                .unwrap()
        };
        let now = 3 * window + DEDUPE_CLEAR_SLACK_MS + 2;
        let first = expire(&store, now, &config).unwrap();
        let left = dedupe_records(1);
        assert!(
            left < 80,
            "the first pass dropped tables before it cleared 20 records: {left} left"
        );
        let mut passes = 1;
        let mut report = first;
        while report.more {
            passes += 1;
            assert!(passes < 20, "expiry never finished");
            report = expire(&store, now, &config).unwrap();
        }
        assert_eq!(dedupe_records(1), 0);
        assert_eq!(dedupe_records(3), 3, "the current bucket stays");
        assert_eq!(mark(), Some(keys::dedupe_bucket_start(2).to_vec()));
        // A window later bucket 3 falls due: the first pass only puts the mark back.
        let later = 5 * window + DEDUPE_CLEAR_SLACK_MS + 2;
        let report = expire(&store, later, &config).unwrap();
        assert!(report.more);
        assert_eq!(mark(), Some(keys::dedupe_bucket_start(0).to_vec()));
        assert_eq!(
            dedupe_records(3),
            3,
            "nothing cleared before the mark went back"
        );
        while expire(&store, later, &config).unwrap().more {}
        assert_eq!(dedupe_records(3), 0, "bucket 3 went a window later");
        assert_eq!(mark(), Some(keys::dedupe_bucket_start(4).to_vec()));
        // Later passes in the same window find the sweep finished: no drop, no mark moved.
        assert!(!expire(&store, later + 1, &config).unwrap().more);
        assert_eq!(mark(), Some(keys::dedupe_bucket_start(4).to_vec()));
    }

    /// Dedupe records of buckets past their window go a bounded number per pass (half the
    /// budget), not a whole window's sends in one transaction; the passes say there is more
    /// until they are all gone, the current and previous buckets stay, and the next passes
    /// begin at the mark the last one left.
    #[test]
    fn old_dedupe_records_go_at_most_half_the_budget_per_pass() {
        let config = CoreConfig {
            expire_scan_keys_max: 40,
            ..CoreConfig::default()
        };
        let store = MemoryStore::new();
        let window = config.dedupe_window_ms;
        send_in_buckets_1_and_3(&store, &config);
        let dedupe_records = |bucket: u64| dedupe_records_in(&store, bucket);
        assert_eq!((dedupe_records(1), dedupe_records(3)), (100, 3));
        let now = 3 * window + DEDUPE_CLEAR_SLACK_MS + 2;
        let mut left = vec![dedupe_records(1)];
        loop {
            let report = expire(&store, now, &config).unwrap();
            left.push(dedupe_records(1));
            assert!(left.len() < 20, "expiry never finished: {left:?}");
            if !report.more {
                break;
            }
        }
        assert_eq!(left, vec![100, 80, 60, 40, 20, 0], "20 (half of 40) a pass");
        assert_eq!(dedupe_records(3), 3, "the current bucket stays");
        let mark = || {
            store
                .begin()
                .unwrap()
                .get(&keys::dedupe_expired_below())
                .unwrap()
        };
        assert_eq!(
            mark(),
            Some(keys::dedupe_bucket_start(2).to_vec()),
            "the passes marked everything below the buckets they keep as deleted"
        );
        // Another pass in the same bucket begins at the mark the finished ones left, not at
        // bucket 0: on the embedded engines it would walk the tombstones of everything they
        // deleted, every pass until a compaction. A record put below the mark by hand shows
        // where it begins (it is left).
        {
            let mut txn = store.begin().unwrap();
            txn.set(&keys::dedupe(1, 7, 99, 99), &[0; 20]);
            txn.commit().unwrap();
        }
        assert!(!expire(&store, now + 1, &config).unwrap().more);
        assert_eq!(dedupe_records(1), 1, "the pass began at the mark");
        {
            let mut txn = store.begin().unwrap();
            txn.clear(&keys::dedupe(1, 7, 99, 99));
            txn.commit().unwrap();
        }
        // A window later, bucket 3 is past its window too: the passes go on from the mark
        // and reach it.
        let report = expire(&store, 5 * window + DEDUPE_CLEAR_SLACK_MS + 2, &config).unwrap();
        assert!(!report.more);
        assert_eq!(dedupe_records(3), 0, "bucket 3 went a window later");
        assert_eq!(mark(), Some(keys::dedupe_bucket_start(4).to_vec()));
        // The mark rests on the clock never going back behind the pass: it is in the store's
        // high-water mark, where a restarted clock starts.
        let clock = store.begin().unwrap().get(&keys::clock()).unwrap();
        assert!(
            clock.and_then(|v| keys::le_u64(&v)) >= Some(5 * window + DEDUPE_CLEAR_SLACK_MS + 2)
        );
        // The window raised tenfold: bucket numbers shrink, so new records land below the
        // mark. The passes must start over, not skip them.
        let wider = CoreConfig {
            dedupe_window_ms: 10 * window,
            ..config.clone()
        };
        let mut committer = Committer::new(&wider);
        committer
            .commit_batch(
                &store,
                &[send(2_001, 7)],
                5 * window + DEDUPE_CLEAR_SLACK_MS + 3,
            )
            .unwrap();
        assert_eq!(
            dedupe_records(0),
            1,
            "written in bucket 0 of the wider window"
        );
        let report = expire(&store, 30 * window, &wider).unwrap();
        assert!(!report.more);
        assert_eq!(
            dedupe_records(0),
            0,
            "a record below the old mark still goes"
        );
    }

    /// Acks delete exactly the messages up to the cursor: by a range clear with the keys
    /// listed from where the deleted ones end (which the committer remembers, or reads from
    /// the lowest stored cursor: the first ack, and the first after a restart), a jump of
    /// exactly `ACK_LISTED_CLEARS_MAX` too, and a longer jump by a plain range clear.
    #[test]
    fn acks_delete_exactly_the_acknowledged_messages() {
        let config = CoreConfig::default();
        let store = MemoryStore::new();
        let mut committer = Committer::new(&config);
        let link = Request::Link {
            inbox: 7,
            device: 0,
            acked_up_to: 0,
        };
        committer.commit_batch(&store, &[link], 1_000).unwrap();
        let sends: Vec<Request> = (1..=3_000).map(|id| send(id, 7)).collect();
        for batch in sends.chunks(config.batch_requests_max) {
            committer.commit_batch(&store, batch, 1_000).unwrap();
        }
        let stored = || {
            let mut txn = store.begin().unwrap();
            let (start, end) = (keys::message(7, 0), keys::message(7, u64::MAX));
            let rows = txn.get_range(&start, &end, 10_000).unwrap();
            rows.iter()
                .map(|(key, _)| keys::parse_message(key).unwrap().1)
                .collect::<Vec<u64>>()
        };
        // Acks `up_to_seq` through `committer`, then checks exactly what follows it is stored.
        let ack_and_check = |committer: &mut Committer, up_to_seq: u64, when: &str| {
            let ack = Request::Ack {
                inbox: 7,
                device: 0,
                up_to_seq,
            };
            committer.commit_batch(&store, &[ack], 1_000).unwrap();
            let expected: Vec<u64> = (up_to_seq + 1..=3_000).collect();
            assert_eq!(stored(), expected, "{when}the ack up to {up_to_seq}");
        };
        for up_to_seq in [3, 4, 10, 10 + ACK_LISTED_CLEARS_MAX, 2_900] {
            ack_and_check(&mut committer, up_to_seq, "after ");
        }
        // A restarted edge's committer knows nothing: it starts after the stored cursor.
        let mut restarted = Committer::new(&config);
        for up_to_seq in [2_905, 2_999] {
            ack_and_check(&mut restarted, up_to_seq, "after a restart, ");
        }
    }

    /// A device that logs in again having consumed nothing new, seen within the refresh
    /// period, leaves the store byte for byte as it was, so its reconnect needs no write and no
    /// sync (decision 0034), whether the committer remembers the device or reads it. Its
    /// outcome is what a written login's would be. A moved cursor, a stale last-seen time or a
    /// new device still write.
    #[test]
    fn a_login_that_changes_nothing_writes_nothing() {
        let config = CoreConfig::default();
        let refresh_ms = device_seen_refresh_ms(&config);
        let store = MemoryStore::new();
        let everything = || {
            let mut txn = store.begin().unwrap();
            txn.get_range(&[], &[0xff; 32], 100_000).unwrap()
        };
        let link = |device, acked_up_to| Request::Link {
            inbox: 7,
            device,
            acked_up_to,
        };
        let linked = |cursor, first_seq| Outcome::Linked {
            cursor,
            first_seq,
            last_seq: 3,
        };
        let start = 10 * HOUR_MS;
        let mut committer = Committer::new(&config);
        committer
            .commit_batch(&store, &[link(0, 0)], start)
            .unwrap();
        let sends: Vec<Request> = (1..=3).map(|id| send(id, 7)).collect();
        committer.commit_batch(&store, &sends, start).unwrap();
        let before = everything();
        let outcomes = committer
            .commit_batch(&store, &[link(0, 0)], start + refresh_ms)
            .unwrap();
        assert_eq!(outcomes, vec![linked(0, 1)]);
        assert_eq!(everything(), before, "a remembered device, nothing changed");
        let mut restarted = Committer::new(&config);
        let outcomes = restarted
            .commit_batch(&store, &[link(0, 0), link(0, 0)], start + 1)
            .unwrap();
        assert_eq!(outcomes, vec![linked(0, 1), linked(0, 1)]);
        assert_eq!(everything(), before, "a device read from the store");

        let outcomes = restarted
            .commit_batch(&store, &[link(0, 0), send(4, 8)], start + 2)
            .unwrap();
        assert_eq!(outcomes[0], linked(0, 1));
        assert_ne!(everything(), before, "the send is written");
        let before = everything();
        restarted
            .commit_batch(&store, &[link(0, 0)], start + refresh_ms)
            .unwrap();
        assert_eq!(
            everything(),
            before,
            "still seen at the start, within the period"
        );
        restarted
            .commit_batch(&store, &[link(0, 0)], start + refresh_ms + 1)
            .unwrap();
        assert_ne!(everything(), before, "last seen longer ago than the period");
        let before = everything();
        let outcomes = restarted
            .commit_batch(&store, &[link(0, 2)], start + 2 + refresh_ms + 2)
            .unwrap();
        assert_eq!(outcomes, vec![linked(2, 3)]);
        assert_ne!(everything(), before, "the cursor moved");
        let before = everything();
        restarted
            .commit_batch(&store, &[link(1, 0)], start + 2 + refresh_ms + 3)
            .unwrap();
        assert_ne!(everything(), before, "a new device");
        // A login behind an ack of its own device in one batch: the ack writes the record, so
        // the login is not one that wrote nothing.
        let counted = restarted.logins_unwritten();
        let ack = Request::Ack {
            inbox: 7,
            device: 1,
            up_to_seq: 3,
        };
        restarted
            .commit_batch(&store, &[ack, link(1, 3)], start + 2 + refresh_ms + 4)
            .unwrap();
        assert_eq!(restarted.logins_unwritten(), counted);
        restarted
            .commit_batch(&store, &[link(1, 3)], start + 2 + refresh_ms + 5)
            .unwrap();
        assert_eq!(restarted.logins_unwritten(), counted + 1);
    }

    #[test]
    fn with_recipients_must_exist_only_users_that_logged_in_get_messages() {
        let config = CoreConfig {
            recipients_must_exist: true,
            ..CoreConfig::default()
        };
        let store = MemoryStore::new();
        let mut committer = Committer::new(&config);
        let outcomes = committer
            .commit_batch(&store, &[send(1, 7)], 1_000)
            .unwrap();
        assert_eq!(outcomes, vec![Outcome::UnknownRecipient]);
        assert_eq!(
            last_seq(&store, 7).unwrap(),
            0,
            "no record for an unknown id"
        );
        let link = Request::Link {
            inbox: 7,
            device: 0,
            acked_up_to: 0,
        };
        committer.commit_batch(&store, &[link], 2_000).unwrap();
        let outcomes = committer
            .commit_batch(&store, &[send(2, 7)], 3_000)
            .unwrap();
        assert!(
            matches!(outcomes[0], Outcome::Stored { seq: 1, .. }),
            "{outcomes:?}"
        );
        // Off (the default), anyone can be messaged.
        let mut open = Committer::new(&CoreConfig::default());
        let outcomes = open.commit_batch(&store, &[send(3, 8)], 4_000).unwrap();
        assert!(
            matches!(outcomes[0], Outcome::Stored { seq: 1, .. }),
            "{outcomes:?}"
        );
    }
}
