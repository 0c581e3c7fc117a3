//! The home shard's request queue and group-commit batching, sans-IO.
//!
//! The runtime feeds sends in with [`InboxShard::handle_send`] and acks with
//! [`InboxShard::handle_ack`], takes a batch with
//! [`InboxShard::poll_batch`] when its input has run dry (or the queue holds a full batch),
//! commits it with [`crate::commit::Committer::commit_batch`] on a thread that may block, and hands the
//! result back to [`InboxShard::handle_commit`], which returns what to send to whom. At most
//! `batches_in_flight_max` batches are in flight (2 by default: the next one is written while
//! the previous one's fsync runs, decision 0027), and their results come back in the order
//! they were taken; meanwhile new requests queue up and form the next, larger batch, so light
//! load gets low latency and heavy load gets large batches.
//!
//! Acks are coalesced per inbox and device (only the highest `up_to_seq` matters) and kept
//! until a commit applies them: a failed commit puts them back, so an ack is never lost to a
//! store error. Links (a device logging in) queue like sends and go back to the queue after a
//! failed commit: their answer (the device's cursor) lets the connection start.
//!
//! Call order: `handle_send`/`handle_ack`* → `poll_batch` → (commit) → `handle_commit` → …

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::FastHashMap;

use courier_protocol::ErrorCode;

use crate::commit::{Outcome, Request, SendRequest};
use crate::envelope::StoredMessage;
use crate::store::StoreError;
use crate::{CoreConfig, UnixMillis, UserId};

/// Requests taken from the queue to be committed together: first the sends, then the links,
/// then the acks, then the forgets. `tags` has one entry per send and per link, in order: whatever the runtime
/// needs to route the answer (a connection handle, a reply channel).
#[derive(Debug)]
pub struct Batch<T> {
    /// Numbers the shard's batches in the order it took them: results come back in it.
    pub number: u64,
    pub requests: Vec<Request>,
    pub tags: Vec<T>,
    /// When each send was queued, in order (the runtime measures send-to-commit latency).
    pub send_queued_ms: Vec<UnixMillis>,
    /// Requests were left queued that make a batch at once (sends, links, purges, due acks):
    /// the batch reached a maximum, so the next one is ready, and a second may be in flight.
    /// Then it pays to write the next batch while this one's fsync runs (decision 0027);
    /// otherwise the runtime commits this one in one step, which at a pace saves the
    /// hand-over between two threads and keeps the latency of one batch at a time.
    pub more_waiting: bool,
}

/// Purges (erasure on request) one batch carries at most, on top of `batch_requests_max`.
pub const PURGES_PER_BATCH_MAX: usize = 8;

/// What the runtime must do after a commit.
#[derive(Debug, PartialEq, Eq)]
pub enum Output<T> {
    /// Tell the sender its message is durable.
    SendAck {
        tag: T,
        client_id: u64,
        /// The send's body bytes (its connection counts the bytes it has in flight).
        body_bytes: usize,
        seq: u64,
        server_time_ms: UnixMillis,
    },
    /// Tell the sender its message was not stored.
    SendError {
        tag: T,
        client_id: u64,
        body_bytes: usize,
        code: ErrorCode,
    },
    /// Push a newly stored message to the recipient's open connections.
    Deliver(StoredMessage),
    /// `inbox` holds (or held) `seq`, which no live delivery carried: its open connections
    /// that have not had it read the store. An earlier attempt of a retried send stored it in
    /// a commit whose result was unknown (which delivered nothing), and the retry found it
    /// consumed, expired or stored with another body, so it cannot deliver it either. `seq`
    /// is `u64::MAX` after a failed commit that may have stored a send for `inbox`, at what
    /// seq is not known: every open connection reads.
    CatchUp { inbox: UserId, seq: u64 },
    /// Every seq of `inbox` up to `up_to_seq` is gone: the inbox was forgotten (it held no
    /// message) or purged. Its open connections still behind it declare the hole: a read of
    /// an inbox without a counter declares none past what it scans, so such a connection
    /// would wait for them until the inbox's next message or the device's next login.
    ///
    /// `purged`: the inbox was purged and its device records reset past it (decision 0044);
    /// its open connections are closed to log in again, so each device is welcomed with the
    /// erased seqs declared a hole and its cursor past them.
    Gone {
        inbox: UserId,
        up_to_seq: u64,
        purged: bool,
    },
    /// The device is linked: delivery to its connection starts after `cursor`, and the first
    /// stored message after it is `first_seq` (see `Outcome::Linked`). `stored_after_cursor`
    /// is false when the inbox held nothing after the cursor at the link's commit.
    Linked {
        tag: T,
        cursor: u64,
        first_seq: u64,
        stored_after_cursor: bool,
    },
}

/// The send is handed back so the runtime can refuse it with `code`: `Overloaded` when the
/// queue (or the sender's share of it) is full, `StoreUnavailable` while the store is slow.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused<T> {
    pub send: SendRequest,
    pub tag: T,
    pub code: ErrorCode,
}

/// A home shard's queue of requests waiting to be committed.
#[derive(Debug)]
pub struct InboxShard<T> {
    batch_requests_max: usize,
    /// What the next batch takes at most: `batch_requests_max`, halved after each failed
    /// commit, held there for `BATCH_SHRUNK_HOLD_MS`, then doubled back after each commit
    /// that succeeds. A batch too big for the store's time limit (FoundationDB's: a login's
    /// reads are sequential round trips, and 160 of them after a restart can outlast it)
    /// failed as a conflict on every attempt, and was put back whole, to fail again at the
    /// same size for good. (Doubled back at once, every other batch failed, at the cost of
    /// all its attempts, for as long as the cause lasted.)
    batch_requests_now: usize,
    /// `batch_requests_now` grows again from then on.
    batch_grows_from_ms: UnixMillis,
    batch_bytes_max: usize,
    queue_requests_max: usize,
    queue_bytes_max: usize,
    /// Sends waiting, with their tags and when they were queued.
    queue: VecDeque<(SendRequest, T, UnixMillis)>,
    queue_bytes: usize,
    queue_requests_per_sender_max: usize,
    queue_bytes_per_sender_max: usize,
    /// Sends and body bytes each sender has in `queue`.
    queued_by_sender: FastHashMap<UserId, (usize, usize)>,
    /// Devices logging in: (inbox, device, acked_up_to), with their tags.
    links: VecDeque<((UserId, u32, u64), T)>,
    /// Highest ack per inbox and device, not yet committed.
    acks: BTreeMap<(UserId, u32), u64>,
    /// Inboxes expiry emptied, to be forgotten (`Request::Forget`); at most
    /// `queue_requests_max`.
    forgets: BTreeSet<UserId>,
    /// Inboxes an operator asked to erase (`Request::Purge`); at most `queue_requests_max`.
    purges: BTreeSet<UserId>,
    /// Inboxes of sends in failed commits that may have stored them (an unknown result):
    /// such a commit delivered nothing, and a sender that never retries (an app that lost
    /// its outbox) would leave the recipient's open connections behind it. Their connections
    /// read the store twice: after the next commit that succeeds (the store works again),
    /// and once every such commit has landed if it ever will (`unknown_results_landed_by_ms`).
    /// At most `queue_requests_max`: past it, those devices get the message at their next
    /// reconnect or delivery.
    sends_of_unknown_commits: BTreeSet<UserId>,
    /// Whether the next commit that succeeds sends `sends_of_unknown_commits` to the store.
    unknown_results_read_at_next_commit: bool,
    /// When every failed commit that may have stored has landed or never will
    /// (`UNKNOWN_RESULT_LANDS_WITHIN_MS` after the latest one's result): then those inboxes'
    /// connections read the store again and the set is emptied (`poll_unknown_results`).
    unknown_results_landed_by_ms: Option<UnixMillis>,
    /// When the oldest ack (or forget) arrived; they alone make a batch `ack_delay_ms` later.
    acks_waiting_since_ms: Option<UnixMillis>,
    ack_delay_ms: u64,
    /// Batches taken and not yet answered, oldest first: each one's number and when it was
    /// taken. Once the oldest has taken `commit_slow_ms`, the store is slow and sends are
    /// refused at once instead of queueing behind it (a circuit breaker).
    in_flight: VecDeque<(u64, UnixMillis)>,
    batches_in_flight_max: usize,
    batches_taken: u64,
    commit_slow_ms: u64,
    /// The store is near its memory bound (the log engine's `store.log_memory_bytes_max`):
    /// sends are refused until deliveries and expiry free room; acks still go, and free it.
    store_full: bool,
}

impl<T> InboxShard<T> {
    pub fn new(config: &CoreConfig) -> InboxShard<T> {
        InboxShard {
            batch_requests_max: config.batch_requests_max,
            batch_requests_now: config.batch_requests_max,
            batch_grows_from_ms: 0,
            batch_bytes_max: config.batch_bytes_max,
            queue_requests_max: config.queue_requests_max,
            queue_bytes_max: config.queue_bytes_max,
            queue: VecDeque::new(),
            queue_bytes: 0,
            queue_requests_per_sender_max: config.queue_requests_per_sender_max,
            queue_bytes_per_sender_max: config.queue_bytes_per_sender_max,
            queued_by_sender: FastHashMap::default(),
            links: VecDeque::new(),
            acks: BTreeMap::new(),
            forgets: BTreeSet::new(),
            purges: BTreeSet::new(),
            sends_of_unknown_commits: BTreeSet::new(),
            unknown_results_read_at_next_commit: false,
            unknown_results_landed_by_ms: None,
            acks_waiting_since_ms: None,
            ack_delay_ms: config.ack_commit_delay_ms,
            in_flight: VecDeque::new(),
            batches_in_flight_max: config.batches_in_flight_max.max(1),
            batches_taken: 0,
            commit_slow_ms: config.commit_slow_ms,
            store_full: false,
        }
    }

    /// Tells the shard whether its store is near its memory bound (the runtime asks the store
    /// after every commit). While it is, sends are refused with `StoreUnavailable` before
    /// they reach a batch, so the batches that still go (acks, links) never fail on the bound.
    pub fn set_store_full(&mut self, full: bool) {
        self.store_full = full;
    }

    pub fn store_full(&self) -> bool {
        self.store_full
    }

    /// When the waiting acks make a batch on their own, if nothing else comes first: the
    /// runtime calls `poll_batch` again then. `None` when no acks wait, a batch is due anyway,
    /// or no batch can be taken before one in flight comes back.
    pub fn batch_deadline_ms(&self) -> Option<UnixMillis> {
        if self.in_flight.len() >= self.batches_in_flight_max
            || !self.queue.is_empty()
            || !self.links.is_empty()
            || !self.purges.is_empty()
        {
            return None;
        }
        self.acks_waiting_since_ms
            .map(|since| since.saturating_add(self.ack_delay_ms))
    }

    /// Makes the acks (and forgets) waiting now due at once: a draining edge commits them
    /// before it exits instead of waiting out `ack_commit_delay_ms`, which may be longer than
    /// its grace.
    pub fn acks_due_now(&mut self) {
        if self.acks_waiting_since_ms.is_some() {
            self.acks_waiting_since_ms = Some(0);
        }
    }

    /// Sends waiting for a batch.
    pub fn queued_sends(&self) -> usize {
        self.queue.len()
    }

    /// Sends, links, acks and forgets waiting for a batch.
    pub fn queued_requests(&self) -> usize {
        self.queue.len()
            + self.links.len()
            + self.acks.len()
            + self.forgets.len()
            + self.purges.len()
    }

    pub fn batch_in_flight(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// Batches taken so far: the next batch's `number`.
    pub fn batches_taken(&self) -> u64 {
        self.batches_taken
    }

    /// Batches taken and not yet answered.
    pub fn batches_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether the oldest commit in flight has taken longer than `commit_slow_ms` (the
    /// breaker is open: sends are refused until it completes).
    pub fn store_slow(&self, now_ms: UnixMillis) -> bool {
        self.in_flight
            .front()
            .is_some_and(|(_, taken_ms)| now_ms.saturating_sub(*taken_ms) > self.commit_slow_ms)
    }

    /// When `poll_unknown_results` has reads to start: once every failed commit that may
    /// have stored sends has landed or never will.
    pub fn unknown_results_landed_by_ms(&self) -> Option<UnixMillis> {
        self.unknown_results_landed_by_ms
    }

    /// After `unknown_results_landed_by_ms`: the open connections of the inboxes of sends in
    /// failed commits that may have stored them read the store (`Output::CatchUp`), which
    /// holds by now whatever those commits stored.
    pub fn poll_unknown_results(&mut self, now_ms: UnixMillis) -> Vec<Output<T>> {
        let mut outputs = Vec::new();
        if self
            .unknown_results_landed_by_ms
            .is_some_and(|landed_by| landed_by <= now_ms)
        {
            self.read_unknown_results(&mut outputs);
            self.sends_of_unknown_commits.clear();
            self.unknown_results_read_at_next_commit = false;
            self.unknown_results_landed_by_ms = None;
        }
        outputs
    }

    /// Sends the open connections of `sends_of_unknown_commits` to the store, whatever seq
    /// those commits gave.
    fn read_unknown_results(&self, outputs: &mut Vec<Output<T>>) {
        outputs.extend(
            self.sends_of_unknown_commits
                .iter()
                .map(|&inbox| Output::CatchUp {
                    inbox,
                    seq: u64::MAX,
                }),
        );
    }

    /// Queues a send, or refuses it when the queue is at its maximum (backpressure: the
    /// runtime answers `Overloaded`, and the sender retries later).
    ///
    /// Each sender may hold at most its share of the queue (`queue_requests_per_sender_max`,
    /// `queue_bytes_per_sender_max`), so one flooding sender cannot crowd out the others.
    ///
    /// While the oldest batch in flight has taken longer than `commit_slow_ms`, or the store is near
    /// its memory bound (`set_store_full`), every send is refused with `StoreUnavailable`: the
    /// client retries later instead of waiting in a queue that does not move.
    pub fn handle_send(
        &mut self,
        send: SendRequest,
        tag: T,
        now_ms: UnixMillis,
    ) -> Result<(), Refused<T>> {
        if self.store_full || self.store_slow(now_ms) {
            return Err(Refused {
                send,
                tag,
                code: ErrorCode::StoreUnavailable,
            });
        }
        let bytes = send.body.len();
        let (sender_requests, sender_bytes) = self
            .queued_by_sender
            .get(&send.sender)
            .copied()
            .unwrap_or((0, 0));
        if self.queue.len() >= self.queue_requests_max
            || self.queue_bytes + bytes > self.queue_bytes_max
            || sender_requests >= self.queue_requests_per_sender_max
            || sender_bytes + bytes > self.queue_bytes_per_sender_max
        {
            return Err(Refused {
                send,
                tag,
                code: ErrorCode::Overloaded,
            });
        }
        self.queued_by_sender
            .insert(send.sender, (sender_requests + 1, sender_bytes + bytes));
        self.queue_bytes += bytes;
        self.queue.push_back((send, tag, now_ms));
        Ok(())
    }

    /// Queues the login of `device` of `inbox`, or refuses it when `queue_requests_max` logins
    /// already wait (the runtime answers `Overloaded`; the client reconnects later).
    pub fn handle_link(
        &mut self,
        inbox: UserId,
        device: u32,
        acked_up_to: u64,
        tag: T,
    ) -> Result<(), T> {
        if self.links.len() >= self.queue_requests_max {
            return Err(tag);
        }
        // The device's acks still waiting (`ack_commit_delay_ms`) are what it consumed: the
        // login carries them, so the connection it opens is not given those messages again.
        let acked_up_to = match self.acks.remove(&(inbox, device)) {
            Some(waiting) => acked_up_to.max(waiting),
            None => acked_up_to,
        };
        if self.acks.is_empty() && self.forgets.is_empty() {
            self.acks_waiting_since_ms = None;
        }
        self.links.push_back(((inbox, device, acked_up_to), tag));
        Ok(())
    }

    /// Records that `device` of `inbox` consumed everything up to `up_to_seq`, merged with
    /// earlier acks of the same device.
    ///
    /// Never refused: a refused ack was lost for good when the device had nothing more to
    /// acknowledge, and the acknowledged messages stayed stored until it reconnected (the
    /// simulation found it). The table is bounded without a limit of its own: it holds one
    /// entry per device, and only a device with an open, logged-in connection sends acks
    /// (`EdgeSession` acknowledges for the connection's own user and device, which its signed
    /// token names). While commits succeed it holds about as many entries as the shard has
    /// connections; while they fail, failed batches put their acks back, and it holds one per
    /// device of the shard's inboxes that acked since, connected or not, until a commit
    /// takes them (`batch_requests_max` at a time).
    pub fn handle_ack(&mut self, inbox: UserId, device: u32, up_to_seq: u64, now_ms: UnixMillis) {
        let entry = self.acks.entry((inbox, device)).or_insert(up_to_seq);
        *entry = (*entry).max(up_to_seq);
        self.acks_waiting_since_ms.get_or_insert(now_ms);
    }

    /// Queues `inbox`, which expiry found empty, to be forgotten with a later batch (its
    /// counter deleted, decision 0011). Returns false when `queue_requests_max` wait already:
    /// then the counter stays, which costs a record and nothing else.
    pub fn handle_emptied(&mut self, inbox: UserId, now_ms: UnixMillis) -> bool {
        if !insert_bounded(&mut self.forgets, inbox, self.queue_requests_max) {
            return false;
        }
        self.acks_waiting_since_ms.get_or_insert(now_ms);
        true
    }

    /// Whether [`InboxShard::handle_purge`] would take `inbox` now.
    pub fn purge_has_room(&self, inbox: UserId) -> bool {
        self.purges.len() < self.queue_requests_max || self.purges.contains(&inbox)
    }

    /// Queues the erasure of `inbox` (`Request::Purge`) for the next batch. Returns false when
    /// `queue_requests_max` purges wait already (the operator tries again).
    pub fn handle_purge(&mut self, inbox: UserId) -> Option<Vec<T>> {
        if !insert_bounded(&mut self.purges, inbox, self.queue_requests_max) {
            return None;
        }
        // Acks of the inbox's devices that wait would only move cursors about to be erased.
        self.acks
            .retain(|(acked_inbox, _), _| *acked_inbox != inbox);
        // Logins waiting to be linked would commit after the purge (purges go first in a
        // batch) and welcome a connection the purge's disconnect may have closed already.
        // They are refused: the devices log in again, as every connection of the user does.
        let (refused, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.links)
            .into_iter()
            .partition(|((linked_inbox, _, _), _)| *linked_inbox == inbox);
        self.links = kept;
        Some(refused.into_iter().map(|(_, tag)| tag).collect())
    }

    /// Takes the next batch: as many queued requests as fit the maxima, at least one. `None`
    /// while `batches_in_flight_max` batches are in flight, when nothing is queued, or when only acks wait and the
    /// oldest has waited less than `ack_commit_delay_ms` (see `batch_deadline_ms`) and they do
    /// not fill a batch. Such acks also stay behind when sends or links make a batch.
    pub fn poll_batch(&mut self, now_ms: UnixMillis) -> Option<Batch<T>> {
        if self.in_flight.len() >= self.batches_in_flight_max || self.queued_requests() == 0 {
            return None;
        }
        let acks_only = self.queue.is_empty() && self.links.is_empty() && self.purges.is_empty();
        // Acks wait `ack_delay_ms` even when sends go, so that a device's acks in that time
        // take one device-record write and one batch of deletes: riding along with every
        // send batch, each ack cost its own device write at 10,000 msgs/s (decision 0009).
        let acks_due = self.acks.len() + self.forgets.len() >= self.batch_requests_max
            || self
                .acks_waiting_since_ms
                .is_some_and(|since| now_ms >= since.saturating_add(self.ack_delay_ms));
        if acks_only && !acks_due {
            return None;
        }
        let mut batch = Batch {
            number: self.batches_taken,
            requests: Vec::new(),
            tags: Vec::new(),
            send_queued_ms: Vec::new(),
            more_waiting: false,
        };
        // Purges go first: a purge erases what was committed before it, and the sends and
        // logins that share its batch come after it (they may have been queued after it). A
        // purge later in the batch would erase a send the batch acknowledges and the device
        // record of a login it welcomes. Purges are rare and clear whole ranges: a few per
        // batch keep its size bounded.
        for _ in 0..PURGES_PER_BATCH_MAX {
            let Some(inbox) = self.purges.pop_first() else {
                break;
            };
            batch.requests.push(Request::Purge { inbox });
        }
        let requests_max = self.batch_requests_now;
        let mut batch_bytes = 0;
        while let Some((send, ..)) = self.queue.front() {
            let bytes = send.body.len();
            let full = batch.requests.len() >= requests_max
                || (!batch.requests.is_empty() && batch_bytes + bytes > self.batch_bytes_max);
            if full {
                break;
            }
            let (send, tag, queued_ms) = self.queue.pop_front().expect("front exists");
            self.queue_bytes -= bytes;
            if let Some(queued) = self.queued_by_sender.get_mut(&send.sender) {
                queued.0 -= 1;
                queued.1 -= bytes;
                if queued.0 == 0 {
                    self.queued_by_sender.remove(&send.sender);
                }
            }
            batch_bytes += bytes;
            batch.requests.push(Request::Send(send));
            batch.tags.push(tag);
            batch.send_queued_ms.push(queued_ms);
        }
        // Links and acks cost no body bytes; up to `batch_requests_now` of them together ride
        // along with the sends, links first (a connection waits for its link).
        let mut device_updates = 0;
        while device_updates < requests_max {
            let Some(((inbox, device, acked_up_to), tag)) = self.links.pop_front() else {
                break;
            };
            device_updates += 1;
            batch.requests.push(Request::Link {
                inbox,
                device,
                acked_up_to,
            });
            batch.tags.push(tag);
        }
        while acks_due && device_updates < requests_max {
            let Some(((inbox, device), up_to_seq)) = self.acks.pop_first() else {
                break;
            };
            device_updates += 1;
            batch.requests.push(Request::Ack {
                inbox,
                device,
                up_to_seq,
            });
        }
        while acks_due && device_updates < requests_max {
            let Some(inbox) = self.forgets.pop_first() else {
                break;
            };
            device_updates += 1;
            batch.requests.push(Request::Forget { inbox });
        }
        if self.acks.is_empty() && self.forgets.is_empty() {
            self.acks_waiting_since_ms = None;
        }
        // Due acks or forgets left over, or purges, make a next batch at once too. With one
        // batch in flight nothing could overlap: the batch commits in one step, as before.
        let acks_left_due = acks_due && !(self.acks.is_empty() && self.forgets.is_empty());
        batch.more_waiting = self.batches_in_flight_max > 1
            && (!self.queue.is_empty()
                || !self.links.is_empty()
                || !self.purges.is_empty()
                || acks_left_due);
        self.in_flight.push_back((self.batches_taken, now_ms));
        self.batches_taken += 1;
        Some(batch)
    }

    /// Empties the queue when its users move to another edge (a takeover ends): returns
    /// the sends waiting, for the caller to refuse; logins, acks, forgets and purges waiting
    /// are dropped (clients repeat logins and acks where they log in next).
    pub fn take_queued_sends(&mut self) -> Vec<(SendRequest, T)> {
        self.queue_bytes = 0;
        self.queued_by_sender.clear();
        self.links.clear();
        self.acks.clear();
        self.forgets.clear();
        self.purges.clear();
        self.acks_waiting_since_ms = None;
        self.queue
            .drain(..)
            .map(|(send, tag, _)| (send, tag))
            .collect()
    }

    /// Turns the result of committing `batch` into answers and deliveries. Acks of a failed
    /// batch go back into the ack table to be retried with the next batch.
    ///
    /// Results come back in the order the batches were taken (the oldest in flight first):
    /// a send's answer and delivery never overtake an earlier batch's. `now_ms` is when the
    /// result came back: an unknown result may still land until
    /// `UNKNOWN_RESULT_LANDS_WITHIN_MS` after it.
    pub fn handle_commit(
        &mut self,
        now_ms: UnixMillis,
        batch: Batch<T>,
        result: Result<Vec<Outcome>, StoreError>,
    ) -> Vec<Output<T>> {
        let oldest = self.in_flight.pop_front().map(|(number, _)| number);
        assert_eq!(
            oldest,
            Some(batch.number),
            "handle_commit takes the oldest batch in flight"
        );
        let mut outputs = Vec::with_capacity(batch.tags.len() * 2);
        let mut tags = batch.tags.into_iter();
        match result {
            Ok(_) if now_ms >= self.batch_grows_from_ms => {
                self.batch_requests_now = self
                    .batch_requests_now
                    .saturating_mul(2)
                    .min(self.batch_requests_max);
            }
            Ok(_) => {}
            // What a batch's size can cause: a transaction past the store's time limit ends as
            // a conflict (during its reads) or an unknown result (during its commit). A failed
            // write or fsync, or a fence, says nothing of the size (shrunk and held for them,
            // a disk that filled for a while left batches of 8 for a minute after it
            // recovered, with the reconnect storm at its peak). Nor does a batch of a few.
            Err(StoreError::Conflict | StoreError::CommitUnknown)
                if batch.requests.len() > BATCH_SHRUNK_MIN =>
            {
                // Half the failed batch: a second batch in flight, taken at the old size,
                // failing as well halves nothing more.
                self.batch_requests_now = self
                    .batch_requests_now
                    .min((batch.requests.len() / 2).max(BATCH_SHRUNK_MIN))
                    .min(self.batch_requests_max);
                self.batch_grows_from_ms = now_ms.saturating_add(BATCH_SHRUNK_HOLD_MS);
            }
            Err(_) => {}
        }
        match result {
            Ok(outcomes) => {
                assert_eq!(
                    outcomes.len(),
                    batch.requests.len(),
                    "one outcome per request"
                );
                for (request, outcome) in batch.requests.into_iter().zip(outcomes) {
                    match (request, outcome) {
                        (
                            Request::Send(send),
                            Outcome::Stored {
                                seq,
                                server_time_ms,
                                expire_at_ms,
                                fresh: _,
                                live,
                            },
                        ) => {
                            let tag = tags.next().expect("one tag per send");
                            outputs.push(Output::SendAck {
                                tag,
                                client_id: send.client_id,
                                body_bytes: send.body.len(),
                                seq,
                                server_time_ms,
                            });
                            // Delivered even when an earlier attempt stored it (not `fresh`):
                            // that attempt may have ended in an unknown result, which delivered
                            // nothing. A connection skips a seq it already has. Not when the
                            // store no longer holds it as this send carries it (`live`):
                            // then the connections still behind it read the store, which
                            // gives them the stored body or declares the seq a hole.
                            if !live {
                                outputs.push(Output::CatchUp {
                                    inbox: send.to,
                                    seq,
                                });
                                continue;
                            }
                            outputs.push(Output::Deliver(StoredMessage {
                                inbox: send.to,
                                seq,
                                from: send.sender,
                                sent_at_ms: server_time_ms,
                                expire_at_ms,
                                body: send.body,
                            }));
                        }
                        (
                            Request::Link { .. },
                            Outcome::Linked {
                                cursor,
                                first_seq,
                                last_seq,
                            },
                        ) => {
                            let tag = tags.next().expect("one tag per link");
                            outputs.push(Output::Linked {
                                tag,
                                cursor,
                                first_seq,
                                stored_after_cursor: first_seq <= last_seq,
                            });
                        }
                        (Request::Ack { .. }, Outcome::Acked) => {}
                        (Request::Forget { .. }, Outcome::Forgotten { last_seq: None }) => {}
                        (
                            Request::Forget { inbox },
                            Outcome::Forgotten {
                                last_seq: Some(last_seq),
                            },
                        ) => outputs.push(Output::Gone {
                            inbox,
                            up_to_seq: last_seq,
                            purged: false,
                        }),
                        (Request::Purge { inbox }, Outcome::Purged { last_seq }) => {
                            outputs.push(Output::Gone {
                                inbox,
                                up_to_seq: last_seq,
                                purged: true,
                            })
                        }
                        (Request::Send(send), Outcome::UnknownRecipient) => {
                            outputs.push(Output::SendError {
                                tag: tags.next().expect("one tag per send"),
                                client_id: send.client_id,
                                body_bytes: send.body.len(),
                                code: ErrorCode::BadRecipient,
                            });
                        }
                        (request, outcome) => {
                            unreachable!("commit_batch answered {request:?} with {outcome:?}")
                        }
                    }
                }
                if std::mem::take(&mut self.unknown_results_read_at_next_commit) {
                    self.read_unknown_results(&mut outputs);
                }
            }
            Err(error) => {
                // Nothing was written on a conflict or when fenced; anything else may have
                // stored the batch's sends.
                let may_have_stored = !matches!(error, StoreError::Conflict | StoreError::Fenced);
                let mut links = Vec::new();
                let mut retried_acks = false;
                for request in batch.requests {
                    match request {
                        Request::Send(send) => {
                            if may_have_stored {
                                insert_bounded(
                                    &mut self.sends_of_unknown_commits,
                                    send.to,
                                    self.queue_requests_max,
                                );
                                self.unknown_results_read_at_next_commit = true;
                                self.unknown_results_landed_by_ms =
                                    Some(now_ms.saturating_add(UNKNOWN_RESULT_LANDS_WITHIN_MS));
                            }
                            outputs.push(Output::SendError {
                                tag: tags.next().expect("one tag per send"),
                                client_id: send.client_id,
                                body_bytes: send.body.len(),
                                code: ErrorCode::StoreUnavailable,
                            });
                        }
                        Request::Link {
                            inbox,
                            device,
                            acked_up_to,
                        } => links.push((
                            (inbox, device, acked_up_to),
                            tags.next().expect("one tag per link"),
                        )),
                        Request::Ack {
                            inbox,
                            device,
                            up_to_seq,
                        } => {
                            // Re-inserting never grows the table past its maximum by more
                            // than the batches in flight took out of it.
                            let merged = self.acks.entry((inbox, device)).or_insert(up_to_seq);
                            *merged = (*merged).max(up_to_seq);
                            retried_acks = true;
                        }
                        Request::Forget { inbox } => {
                            self.forgets.insert(inbox);
                            retried_acks = true;
                        }
                        Request::Purge { inbox } => {
                            self.purges.insert(inbox);
                        }
                    }
                }
                if retried_acks {
                    // Retried with the next batch, without waiting again.
                    self.acks_waiting_since_ms = Some(0);
                }
                // Back to the front of the queue, in order, to be retried with the next batch.
                for link in links.into_iter().rev() {
                    self.links.push_front(link);
                }
            }
        }
        outputs
    }
}

/// How long a batch size halved after a failed commit is kept before it grows again: the
/// cause (a login storm's cold caches) outlasts a few batches.
pub const BATCH_SHRUNK_HOLD_MS: u64 = 60_000;
/// The fewest requests a batch is halved to: a store that cannot commit this many logins
/// within its time limit is failing, not slow.
const BATCH_SHRUNK_MIN: usize = 8;

/// How long after a commit's unknown result came back the commit may still land.
/// FoundationDB resolves a commit within its transaction window: it refuses one whose read
/// version is more than 5 seconds old, and every attempt of a batch read its version before
/// the result came back. So a send answered `StoreUnavailable` may appear in the store after
/// a later commit succeeded, which is when the first read of its inbox's connections runs;
/// the second runs after this. The embedded stores never land late: a failed write or fsync
/// poisons the store, and it is reopened before the next commit.
pub const UNKNOWN_RESULT_LANDS_WITHIN_MS: u64 = 6_000;

/// Adds `inbox` to `set` unless that would pass `max`; whether it is in the set now.
fn insert_bounded(set: &mut BTreeSet<UserId>, inbox: UserId, max: usize) -> bool {
    if set.len() >= max && !set.contains(&inbox) {
        return false;
    }
    set.insert(inbox);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(client_id: u64, body_bytes: usize) -> SendRequest {
        SendRequest {
            sender: 1,
            client_id,
            to: 2,
            body: vec![0; body_bytes],
            ttl_secs: None,
        }
    }

    #[test]
    fn batches_respect_count_and_byte_maxima_and_one_in_flight() {
        let config = CoreConfig {
            batches_in_flight_max: 1,
            batch_requests_max: 3,
            batch_bytes_max: 100_000,
            queue_requests_max: 5,
            queue_bytes_max: 300_000,
            ..CoreConfig::default()
        };
        let mut shard = InboxShard::new(&config);
        for id in 1..=5 {
            shard.handle_send(send(id, 10), id, 0).unwrap();
        }
        let refused = shard.handle_send(send(6, 10), 6, 0).unwrap_err();
        assert_eq!(refused.tag, 6);

        let batch = shard.poll_batch(u64::MAX).unwrap();
        assert_eq!(batch.tags, vec![1, 2, 3]);
        assert!(
            !batch.more_waiting,
            "with one batch in flight nothing overlaps: it commits in one step"
        );
        assert!(
            shard.poll_batch(u64::MAX).is_none(),
            "only one batch in flight"
        );
        let outputs = shard.handle_commit(0, batch, Err(StoreError::CommitUnknown));
        assert!(outputs.iter().all(|o| matches!(
            o,
            Output::SendError {
                code: ErrorCode::StoreUnavailable,
                ..
            }
        )));

        // A batch of a few requests that failed is not a reason to take fewer.
        let batch = shard.poll_batch(u64::MAX).unwrap();
        assert_eq!(batch.tags, vec![4, 5]);
        shard.handle_commit(0, batch, Err(StoreError::Conflict));
        // Bytes: 60 KB + 60 KB exceeds 100 KB, so each large request gets its own batch.
        shard.handle_send(send(8, 60_000), 8, 0).unwrap();
        shard.handle_send(send(9, 60_000), 9, 0).unwrap();
        let batch = shard.poll_batch(u64::MAX).unwrap();
        assert_eq!(batch.tags, vec![8]);
    }

    /// A batch too big for the store (here: more reads than it takes in one transaction, as
    /// FoundationDB's time limit is for a login's sequential reads) is followed by smaller
    /// ones until they fit, and the size grows back after. Before, the failed batch was put
    /// back whole and failed at the same size on every attempt: no login was ever answered.
    #[test]
    fn a_batch_too_big_for_the_store_is_followed_by_smaller_ones() {
        use crate::commit::Committer;
        use crate::store::fault::{FaultRates, FaultStore};
        use crate::store::memory::MemoryStore;
        let config = CoreConfig {
            batches_in_flight_max: 1,
            batch_requests_max: 64,
            commit_attempts_max: 2,
            ..CoreConfig::default()
        };
        let store = FaultStore::new(MemoryStore::new(), FaultRates::default(), 5);
        store.set_reads_per_transaction_max(100);
        let mut shard = InboxShard::new(&config);
        let mut committer = Committer::new(&config);
        for inbox in 1..=200u64 {
            shard.handle_link(inbox, 0, 0, inbox).unwrap();
        }
        let mut linked = 0;
        let mut sizes = Vec::new();
        for round in 0..100 {
            let Some(batch) = shard.poll_batch(u64::MAX) else {
                break;
            };
            sizes.push(batch.requests.len());
            let result = committer.commit_batch(&store, &batch.requests, 1_000);
            // A second apart: the halved size is held for a minute, then grows back.
            let outputs = shard.handle_commit(round * 1_000, batch, result);
            linked += outputs
                .iter()
                .filter(|output| matches!(output, Output::Linked { .. }))
                .count();
        }
        assert_eq!(linked, 200, "every login answered; batch sizes {sizes:?}");
        // 64 fails, 32 fits and is kept while there is work (it would be doubled back after a
        // minute): one failed batch, not one in every two.
        assert_eq!(sizes[..3], [64, 32, 32], "{sizes:?}");
        let failed = sizes.iter().filter(|size| **size > 32).count();
        assert_eq!(failed, 1, "{sizes:?}");
        // After the hold the size grows back.
        for inbox in 201..=210u64 {
            shard.handle_link(inbox, 0, 0, inbox).unwrap();
        }
        store.set_reads_per_transaction_max(0);
        let batch = shard.poll_batch(u64::MAX).expect("a batch");
        let result = committer.commit_batch(&store, &batch.requests, 1_000);
        shard.handle_commit(BATCH_SHRUNK_HOLD_MS + 1_000_000, batch, result);
        assert_eq!(shard.batch_requests_now, 64);
    }

    /// With two batches in flight, both taken at the size that fails, the second's failure
    /// halves nothing more (halving the size again made it a quarter, held for a minute); and
    /// a failed write (a full disk) shrinks nothing, since a batch's size cannot cause it.
    #[test]
    fn a_second_failed_batch_in_flight_and_a_failed_write_shrink_nothing_more() {
        let config = CoreConfig {
            batches_in_flight_max: 2,
            batch_requests_max: 64,
            ..CoreConfig::default()
        };
        let mut shard = InboxShard::new(&config);
        for inbox in 1..=300u64 {
            shard.handle_link(inbox, 0, 0, inbox).unwrap();
        }
        let first = shard.poll_batch(u64::MAX).expect("a batch");
        let second = shard
            .poll_batch(u64::MAX)
            .expect("a second batch in flight");
        assert_eq!((first.requests.len(), second.requests.len()), (64, 64));
        shard.handle_commit(0, first, Err(StoreError::Conflict));
        shard.handle_commit(0, second, Err(StoreError::CommitUnknown));
        assert_eq!(shard.batch_requests_now, 32);
        let third = shard.poll_batch(u64::MAX).expect("a batch");
        assert_eq!(third.requests.len(), 32);
        shard.handle_commit(0, third, Err(StoreError::Poisoned));
        assert_eq!(
            shard.batch_requests_now, 32,
            "a failed write says nothing of the size"
        );
    }

    /// Takes the next batch, commits it on `store` through `committer` and hands the result
    /// back: the outcomes and what the shard answers.
    fn commit_next_batch(
        shard: &mut InboxShard<u64>,
        committer: &mut crate::commit::Committer,
        store: &crate::store::memory::MemoryStore,
    ) -> (Vec<crate::commit::Outcome>, Vec<Output<u64>>) {
        let batch = shard.poll_batch(u64::MAX).expect("a batch");
        let outcomes = committer
            .commit_batch(store, &batch.requests, 1_000)
            .expect("commit");
        let outputs = shard.handle_commit(0, batch, Ok(outcomes.clone()));
        (outcomes, outputs)
    }

    /// A send whose first commit stored it but ended in an unknown result (answered
    /// `StoreUnavailable`, delivered nothing), retried after it expired and expiry deleted it:
    /// the retry cannot deliver it (`live` false), so the recipient's connections still behind
    /// it are sent to the store, which declares it a hole. Before, a device connected
    /// throughout never moved past it (simulation seed 75476).
    #[test]
    fn a_retry_that_cannot_deliver_what_an_unknown_commit_stored_sends_its_inbox_to_the_store() {
        use crate::commit::Committer;
        use crate::store::memory::MemoryStore;
        let config = CoreConfig {
            expiry_bucket_ms: 1_000,
            ..CoreConfig::default()
        };
        let store = MemoryStore::new();
        let mut committer = Committer::new(&config);
        let mut shard = InboxShard::new(&config);
        let expiring = SendRequest {
            ttl_secs: Some(1),
            ..send(1, 10)
        };
        shard.handle_send(expiring.clone(), 1, 0).unwrap();
        let batch = shard.poll_batch(u64::MAX).unwrap();
        committer
            .commit_batch(&store, &batch.requests, 1_000)
            .expect("commit");
        let outputs = shard.handle_commit(0, batch, Err(StoreError::CommitUnknown));
        assert!(
            matches!(
                outputs[..],
                [Output::SendError {
                    code: ErrorCode::StoreUnavailable,
                    ..
                }]
            ),
            "{outputs:?}"
        );
        // Expiry deletes it; then the retry comes.
        while crate::commit::expire(&store, 5_000, &config).unwrap().more {}
        shard.handle_send(expiring, 2, 0).unwrap();
        let batch = shard.poll_batch(u64::MAX).unwrap();
        let outcomes = committer
            .commit_batch(&store, &batch.requests, 5_000)
            .expect("commit");
        let outputs = shard.handle_commit(0, batch, Ok(outcomes));
        assert!(
            matches!(
                outputs[..],
                [
                    Output::SendAck { seq: 1, .. },
                    Output::CatchUp { inbox: 2, seq: 1 },
                    // And the catch-up every failed commit that may have stored leads to.
                    Output::CatchUp {
                        inbox: 2,
                        seq: u64::MAX
                    },
                ]
            ),
            "{outputs:?}"
        );
    }

    /// A failed commit that may have stored its sends (an unknown result, a failed write)
    /// delivered nothing: if their senders never retry, the next commit that succeeds sends
    /// the recipients' open connections to the store, once. A conflict wrote nothing and
    /// leads to no read.
    #[test]
    fn the_commit_after_an_unknown_result_sends_its_recipients_to_the_store() {
        let config = CoreConfig::default();
        let mut shard = InboxShard::new(&config);
        let to = |to: UserId| SendRequest { to, ..send(to, 10) };
        shard.handle_send(to(5), 1, 0).unwrap();
        let batch = shard.poll_batch(u64::MAX).unwrap();
        shard.handle_commit(0, batch, Err(StoreError::Conflict));
        shard.handle_send(to(6), 2, 0).unwrap();
        let batch = shard.poll_batch(u64::MAX).unwrap();
        shard.handle_commit(0, batch, Err(StoreError::CommitUnknown));
        shard.handle_send(to(7), 3, 0).unwrap();
        let batch = shard.poll_batch(u64::MAX).unwrap();
        let stored = Outcome::Stored {
            seq: 1,
            server_time_ms: 10,
            expire_at_ms: 1_000,
            fresh: true,
            live: true,
        };
        let outputs = shard.handle_commit(0, batch, Ok(vec![stored]));
        let catch_ups: Vec<_> = outputs
            .iter()
            .filter(|output| matches!(output, Output::CatchUp { .. }))
            .collect();
        assert_eq!(
            catch_ups,
            vec![&Output::CatchUp {
                inbox: 6,
                seq: u64::MAX
            }]
        );
        shard.handle_send(to(7), 4, 0).unwrap();
        let batch = shard.poll_batch(u64::MAX).unwrap();
        let outputs = shard.handle_commit(0, batch, Ok(vec![stored]));
        assert!(
            !outputs
                .iter()
                .any(|output| matches!(output, Output::CatchUp { .. })),
            "once: {outputs:?}"
        );
    }

    /// A forget that found its inbox empty, and a purge, tell the inbox's open connections
    /// that every seq up to its last is gone; a forget that found a message (a send came
    /// since) tells nothing.
    #[test]
    fn a_forgotten_or_purged_inbox_is_declared_gone_up_to_its_last_seq() {
        let config = CoreConfig::default();
        let mut shard = InboxShard::<u64>::new(&config);
        assert!(shard.handle_emptied(5, 0));
        assert!(shard.handle_emptied(6, 0));
        assert_eq!(shard.handle_purge(7), Some(Vec::new()));
        let batch = shard.poll_batch(u64::MAX).unwrap();
        let outcomes = batch
            .requests
            .iter()
            .map(|request| match request {
                Request::Forget { inbox: 5 } => Outcome::Forgotten { last_seq: Some(3) },
                Request::Forget { .. } => Outcome::Forgotten { last_seq: None },
                Request::Purge { .. } => Outcome::Purged { last_seq: 9 },
                other => panic!("{other:?}"),
            })
            .collect();
        let mut outputs = shard.handle_commit(0, batch, Ok(outcomes));
        outputs.sort_by_key(|output| match output {
            Output::Gone { inbox, .. } => *inbox,
            _ => 0,
        });
        assert_eq!(
            outputs,
            vec![
                Output::Gone {
                    inbox: 5,
                    up_to_seq: 3,
                    purged: false,
                },
                Output::Gone {
                    inbox: 7,
                    up_to_seq: 9,
                    purged: true,
                },
            ]
        );
    }

    /// A FoundationDB commit whose result was unknown may land after a later commit
    /// succeeded, so after the read that commit led to. Once it has landed or never will
    /// (`UNKNOWN_RESULT_LANDS_WITHIN_MS` after the latest such result), the connections of
    /// its inboxes read the store again, once; a later unknown result moves that time.
    #[test]
    fn the_inboxes_of_unknown_results_are_read_again_once_those_commits_have_landed() {
        let config = CoreConfig::default();
        let mut shard = InboxShard::new(&config);
        let to = |to: UserId| SendRequest { to, ..send(to, 10) };
        let fail = |shard: &mut InboxShard<u64>, inbox: UserId, now_ms: UnixMillis| {
            shard.handle_send(to(inbox), inbox, now_ms).unwrap();
            let batch = shard.poll_batch(u64::MAX).unwrap();
            shard.handle_commit(now_ms, batch, Err(StoreError::CommitUnknown));
        };
        assert_eq!(shard.unknown_results_landed_by_ms(), None);
        fail(&mut shard, 5, 1_000);
        assert_eq!(
            shard.unknown_results_landed_by_ms(),
            Some(1_000 + UNKNOWN_RESULT_LANDS_WITHIN_MS)
        );
        fail(&mut shard, 6, 2_000);
        let landed_by = 2_000 + UNKNOWN_RESULT_LANDS_WITHIN_MS;
        assert_eq!(shard.unknown_results_landed_by_ms(), Some(landed_by));
        assert!(shard.poll_unknown_results(landed_by - 1).is_empty());
        let read = |inbox| Output::CatchUp {
            inbox,
            seq: u64::MAX,
        };
        assert_eq!(
            shard.poll_unknown_results(landed_by),
            vec![read(5), read(6)]
        );
        assert_eq!(shard.unknown_results_landed_by_ms(), None);
        assert!(shard.poll_unknown_results(u64::MAX).is_empty(), "once");
        // A conflict wrote nothing: nothing to wait for.
        shard.handle_send(to(7), 7, 9_000).unwrap();
        let batch = shard.poll_batch(u64::MAX).unwrap();
        shard.handle_commit(9_000, batch, Err(StoreError::Conflict));
        assert_eq!(shard.unknown_results_landed_by_ms(), None);
    }

    /// A purge erases what was committed before it, not the sends and logins of its own
    /// batch: a send queued after the purge is stored (above the erased seqs) and acknowledged,
    /// and a login after it keeps its device record. Before, the purge came last in the batch
    /// and erased both after they were answered.
    #[test]
    fn a_purge_spares_the_sends_and_logins_that_share_its_batch() {
        use crate::commit::{Committer, Outcome, read_inbox};
        use crate::keys;
        use crate::store::memory::MemoryStore;
        use crate::store::{Store, Transaction};
        let config = CoreConfig::default();
        let store = MemoryStore::new();
        let mut committer = Committer::new(&config);
        let mut shard = InboxShard::new(&config);
        shard.handle_send(send(1, 10), 1, 0).unwrap();
        commit_next_batch(&mut shard, &mut committer, &store);
        assert!(shard.handle_purge(2).is_some());
        shard.handle_send(send(2, 10), 2, 0).unwrap();
        shard.handle_link(2, 0, 0, 3).unwrap();
        let (outcomes, _) = commit_next_batch(&mut shard, &mut committer, &store);
        let stored_seq = outcomes
            .iter()
            .find_map(|outcome| match outcome {
                Outcome::Stored { seq, .. } => Some(*seq),
                _ => None,
            })
            .expect("the send was stored");
        let inbox = read_inbox(&store, 2, 0, 1_000, &config).expect("read");
        let seqs: Vec<u64> = inbox.messages.iter().map(|message| message.seq).collect();
        assert_eq!(
            seqs,
            vec![stored_seq],
            "the acknowledged send survives the purge"
        );
        assert!(stored_seq > 1, "above the erased seq");
        let device = store.begin().unwrap().get(&keys::device(2, 0)).unwrap();
        assert!(
            device.is_some(),
            "the login's device record survives the purge"
        );
    }

    /// A retry (same sender and client id) is acknowledged with the stored seq, and delivered
    /// live only as stored: a retry that carries another body does not give connected devices
    /// a seq whose body differs from the one the others read from the store.
    #[test]
    fn a_retry_is_delivered_live_only_with_the_stored_body() {
        use crate::commit::Committer;
        use crate::store::memory::MemoryStore;
        let config = CoreConfig::default();
        let store = MemoryStore::new();
        let mut committer = Committer::new(&config);
        let mut shard = InboxShard::new(&config);
        let mut commit = |body: &[u8]| {
            let request = SendRequest {
                sender: 1,
                client_id: 7,
                to: 2,
                body: body.to_vec(),
                ttl_secs: None,
            };
            shard.handle_send(request, 0, 0).unwrap();
            let (_, outputs) = commit_next_batch(&mut shard, &mut committer, &store);
            let acked = outputs
                .iter()
                .find_map(|output| match output {
                    Output::SendAck { seq, .. } => Some(*seq),
                    _ => None,
                })
                .expect("acknowledged");
            let delivered: Vec<(u64, Vec<u8>)> = outputs
                .into_iter()
                .filter_map(|output| match output {
                    Output::Deliver(message) => Some((message.seq, message.body)),
                    _ => None,
                })
                .collect();
            (acked, delivered)
        };
        let (seq, delivered) = commit(b"A");
        assert_eq!(delivered, vec![(seq, b"A".to_vec())]);
        let (again, delivered) = commit(b"A");
        assert_eq!(again, seq, "a retry is acknowledged with the stored seq");
        assert_eq!(
            delivered,
            vec![(seq, b"A".to_vec())],
            "delivered again as stored"
        );
        let (changed, delivered) = commit(b"B");
        assert_eq!(changed, seq);
        assert_eq!(
            delivered,
            vec![],
            "never delivered with a body the store does not hold"
        );
    }

    /// With two batches in flight the second is taken while the first commits; a third waits
    /// for the first's result, and results are taken oldest first. A failed first batch
    /// puts its acks back even though the second, taken after, carried newer ones.
    #[test]
    fn two_batches_in_flight_are_answered_in_the_order_taken() {
        let config = CoreConfig {
            batches_in_flight_max: 2,
            batch_requests_max: 2,
            ack_commit_delay_ms: 0,
            commit_slow_ms: 1_000,
            ..CoreConfig::default()
        };
        let mut shard = InboxShard::new(&config);
        for id in 1..=6 {
            shard.handle_send(send(id, 10), id, 0).unwrap();
        }
        let first = shard.poll_batch(0).unwrap();
        let second = shard.poll_batch(5).unwrap();
        assert_eq!(
            (first.tags.clone(), second.tags.clone()),
            (vec![1, 2], vec![3, 4])
        );
        assert!(
            first.more_waiting && second.more_waiting,
            "each left sends queued"
        );
        assert!(shard.poll_batch(10).is_none(), "at most two in flight");
        assert_eq!(shard.batch_deadline_ms(), None);
        assert!(
            shard.store_slow(1_001),
            "the breaker counts from the oldest batch"
        );
        let stored = |seq| Outcome::Stored {
            seq,
            server_time_ms: 0,
            expire_at_ms: 9_000,
            fresh: true,
            live: true,
        };
        let outputs = shard.handle_commit(0, first, Ok(vec![stored(1), stored(2)]));
        assert!(matches!(outputs[0], Output::SendAck { tag: 1, seq: 1, .. }));
        assert!(
            !shard.store_slow(1_001),
            "the oldest in flight is the second now"
        );
        let third = shard.poll_batch(20).unwrap();
        assert_eq!(third.tags, vec![5, 6]);
        assert!(!third.more_waiting, "the queue is empty after it");
        shard.handle_commit(0, second, Ok(vec![stored(3), stored(4)]));
        shard.handle_commit(0, third, Ok(vec![stored(5), stored(6)]));
        assert!(!shard.batch_in_flight());

        // A failed batch's acks come back behind a later batch's newer ones.
        shard.handle_ack(5, 0, 3, 30);
        let acks = shard.poll_batch(30).unwrap();
        shard.handle_ack(5, 0, 7, 31);
        let newer = shard.poll_batch(31).unwrap();
        assert!(
            shard
                .handle_commit(0, acks, Err(StoreError::Poisoned))
                .is_empty()
        );
        shard.handle_commit(0, newer, Ok(vec![Outcome::Acked]));
        let retry = shard.poll_batch(32).unwrap();
        assert_eq!(
            retry.requests,
            vec![Request::Ack {
                inbox: 5,
                device: 0,
                up_to_seq: 3
            }],
            "retried: the store keeps a device's highest cursor"
        );
    }

    #[test]
    #[should_panic(expected = "oldest batch in flight")]
    fn a_result_out_of_order_is_a_bug() {
        let mut shard = InboxShard::new(&CoreConfig::default());
        shard.handle_send(send(1, 10), 1, 0).unwrap();
        let first = shard.poll_batch(0).unwrap();
        shard.handle_send(send(2, 10), 2, 0).unwrap();
        let second = shard.poll_batch(0).unwrap();
        drop(first);
        shard.handle_commit(0, second, Err(StoreError::Poisoned));
    }

    #[test]
    fn a_flooding_sender_gets_its_share_of_the_queue_and_others_still_get_in() {
        let config = CoreConfig {
            queue_requests_max: 10,
            queue_requests_per_sender_max: 3,
            ..CoreConfig::default()
        };
        let mut shard = InboxShard::new(&config);
        let from = |sender: UserId, client_id: u64| SendRequest {
            sender,
            ..send(client_id, 10)
        };
        for id in 1..=3 {
            shard.handle_send(from(7, id), id, 0).unwrap();
        }
        assert!(
            shard.handle_send(from(7, 4), 4, 0).is_err(),
            "over its share"
        );
        shard.handle_send(from(8, 5), 5, 0).unwrap();
        // Once its sends are taken for a batch, the flooder has room again.
        let batch = shard.poll_batch(u64::MAX).unwrap();
        assert_eq!(batch.tags, vec![1, 2, 3, 5]);
        shard.handle_send(from(7, 6), 6, 0).unwrap();
    }

    #[test]
    fn a_slow_commit_opens_the_breaker_until_it_completes() {
        let config = CoreConfig {
            commit_slow_ms: 1_000,
            ..CoreConfig::default()
        };
        let mut shard = InboxShard::new(&config);
        shard.handle_send(send(1, 10), 1, 0).unwrap();
        let batch = shard.poll_batch(10).unwrap();
        shard.handle_send(send(2, 10), 2, 900).unwrap();
        assert!(!shard.store_slow(1_010));
        let refused = shard.handle_send(send(3, 10), 3, 1_011).unwrap_err();
        assert_eq!(refused.code, ErrorCode::StoreUnavailable);
        // The slow commit ends (here: failed; its send is answered StoreUnavailable).
        shard.handle_commit(0, batch, Err(StoreError::Io("slow disk".into())));
        assert!(!shard.store_slow(5_000), "closed once the commit is back");
        shard.handle_send(send(4, 10), 4, 5_000).unwrap();
    }

    /// A store at its memory bound refuses sends at the door, so no batch carrying acks fails
    /// on the bound; acks still make batches, and once they freed room sends go again.
    #[test]
    fn a_full_store_refuses_sends_but_takes_acks() {
        let mut shard = InboxShard::new(&CoreConfig::default());
        shard.set_store_full(true);
        let refused = shard.handle_send(send(1, 10), 1, 0).unwrap_err();
        assert_eq!(refused.code, ErrorCode::StoreUnavailable);
        shard.handle_ack(5, 0, 3, 0);
        let batch = shard.poll_batch(u64::MAX).unwrap();
        assert!(
            batch
                .requests
                .iter()
                .all(|request| matches!(request, Request::Ack { .. })),
            "only acks in the batch: {:?}",
            batch.requests
        );
        shard.handle_commit(0, batch, Ok(vec![Outcome::Acked]));
        shard.set_store_full(false);
        shard.handle_send(send(2, 10), 2, 0).unwrap();
    }

    #[test]
    fn acks_coalesce_per_inbox_and_survive_a_failed_commit() {
        let mut shard: InboxShard<()> = InboxShard::new(&CoreConfig::default());
        shard.handle_ack(5, 0, 3, 0);
        shard.handle_ack(5, 0, 9, 0);
        shard.handle_ack(5, 0, 4, 0);
        shard.handle_ack(6, 0, 1, 0);
        let batch = shard.poll_batch(u64::MAX).unwrap();
        assert_eq!(
            batch.requests,
            vec![
                Request::Ack {
                    inbox: 5,
                    device: 0,
                    up_to_seq: 9
                },
                Request::Ack {
                    inbox: 6,
                    device: 0,
                    up_to_seq: 1
                }
            ]
        );
        shard.handle_ack(5, 0, 2, 0);
        assert!(
            shard
                .handle_commit(0, batch, Err(StoreError::CommitUnknown))
                .is_empty()
        );
        let retry = shard.poll_batch(u64::MAX).unwrap();
        assert_eq!(
            retry.requests,
            vec![
                Request::Ack {
                    inbox: 5,
                    device: 0,
                    up_to_seq: 9
                },
                Request::Ack {
                    inbox: 6,
                    device: 0,
                    up_to_seq: 1
                }
            ]
        );
    }

    #[test]
    fn a_login_carries_the_acks_its_device_has_waiting() {
        let mut shard: InboxShard<u32> = InboxShard::new(&CoreConfig::default());
        shard.handle_ack(5, 0, 3, 1_000);
        shard.handle_ack(5, 1, 7, 1_000);
        // Device 0 closes and logs in again at once, saying it consumed nothing (a fresh
        // install): the wait for company must not make it receive seqs 1 to 3 again.
        shard.handle_link(5, 0, 0, 9).unwrap();
        let batch = shard.poll_batch(1_001).unwrap();
        assert_eq!(
            batch.requests,
            vec![Request::Link {
                inbox: 5,
                device: 0,
                acked_up_to: 3
            }],
            "device 1's ack keeps waiting for its delay"
        );
    }

    #[test]
    fn acks_wait_their_delay_even_when_sends_go_then_ride_with_the_next_batch() {
        let config = CoreConfig {
            ack_commit_delay_ms: 50,
            ..CoreConfig::default()
        };
        let mut shard: InboxShard<u32> = InboxShard::new(&config);
        shard.handle_ack(5, 0, 3, 1_000);
        assert_eq!(shard.batch_deadline_ms(), Some(1_050));
        assert!(shard.poll_batch(1_049).is_none(), "an ack alone waits");
        // A send arrives: it goes at once, and the ack keeps waiting for more acks of its
        // device (one cursor write for all of them).
        shard.handle_send(send(1, 10), 1, 0).unwrap();
        assert_eq!(shard.batch_deadline_ms(), None, "a batch is due now");
        let batch = shard.poll_batch(1_010).unwrap();
        assert_eq!(batch.requests.len(), 1, "{:?}", batch.requests);
        shard.handle_commit(
            1_010,
            batch,
            Ok(vec![Outcome::Stored {
                seq: 1,
                server_time_ms: 1_010,
                expire_at_ms: 9_000,
                fresh: true,
                live: true,
            }]),
        );
        shard.handle_ack(5, 0, 4, 1_020);
        assert_eq!(shard.batch_deadline_ms(), Some(1_050));
        // Its delay over, the ack rides with the next send.
        shard.handle_send(send(2, 10), 2, 0).unwrap();
        let batch = shard.poll_batch(1_050).unwrap();
        assert_eq!(batch.requests.len(), 2);
        assert!(matches!(
            batch.requests[1],
            Request::Ack { up_to_seq: 4, .. }
        ));
        // A failed commit answers the send (its client retries) and keeps the ack, which is
        // retried at once, without waiting again.
        assert_eq!(
            shard
                .handle_commit(0, batch, Err(StoreError::Conflict))
                .len(),
            1
        );
        let batch = shard.poll_batch(1_051).unwrap();
        assert_eq!(batch.requests.len(), 1);
        shard.handle_commit(0, batch, Ok(vec![Outcome::Acked]));
        // Nothing else comes: an ack makes its own batch once its delay has passed.
        shard.handle_ack(7, 0, 1, 3_000);
        assert!(shard.poll_batch(3_049).is_none());
        assert!(shard.poll_batch(3_050).is_some());
    }
}
