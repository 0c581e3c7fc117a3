//! Limits and retention of the core, sized once at start-up.

use courier_protocol::FRAME_BYTES_MAX;

/// Configuration of the core. Every queue, batch and scan has a maximum here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreConfig {
    /// Undelivered messages are deleted this long after they were sent (R4).
    pub retention_ms: u64,
    /// A retry with the same (sender, client id) is stored once if it arrives within this window
    /// of the first commit. Records live between one and two windows, plus
    /// `commit::DEDUPE_CLEAR_SLACK_MS`.
    pub dedupe_window_ms: u64,
    /// Granularity of the expiry index: a message is deleted at most this late.
    pub expiry_bucket_ms: u64,
    /// Requests per group-commit batch.
    pub batch_requests_max: usize,
    /// Body bytes per group-commit batch (keeps FoundationDB transactions under 1 MB).
    pub batch_bytes_max: usize,
    /// Requests waiting for a batch on one shard; beyond it, sends are refused as overloaded.
    pub queue_requests_max: usize,
    /// Body bytes waiting for a batch on one shard.
    pub queue_bytes_max: usize,
    /// Sends of one sender waiting for a batch on one shard: one flooding sender gets its
    /// share of the queue and `Overloaded` beyond it, and everyone else still gets in.
    pub queue_requests_per_sender_max: usize,
    /// Body bytes of one sender waiting for a batch on one shard.
    pub queue_bytes_per_sender_max: usize,
    /// Attempts per batch when the store reports a conflict or an unknown commit result.
    pub commit_attempts_max: u32,
    /// Keys one expiry pass may read.
    pub expire_scan_keys_max: usize,
    /// The longest a round of expiry's device sweep should take (a round takes an eighth of
    /// the retention, at most this): `crate::commit::device_sweep_round_ms`.
    pub device_sweep_round_ms_max: u64,
    /// Messages one sync read returns.
    pub sync_messages_max: usize,
    /// Inboxes whose last sequence number a shard remembers (saves a store read per send).
    pub seq_cache_entries_max: usize,
    /// How long acks wait before they are committed: a device's acks in that time make one
    /// cursor write and one batch of deletes, riding in the first batch after the delay (or
    /// making one of their own). Acks only move cursors and delete delivered messages; nobody
    /// waits for them, and a lost one means a re-delivery the client drops.
    pub ack_commit_delay_ms: u64,
    /// A commit that has taken longer than this opens a circuit breaker: new sends are refused
    /// with `StoreUnavailable` (retry later) until it completes, instead of queueing behind a
    /// slow or stuck store.
    pub commit_slow_ms: u64,
    /// Batches a shard may have taken and not yet answered: 2 lets the next batch's work
    /// (and, on the log engine, its journal write) go while the previous one's fsync runs
    /// (decision 0027); 1 commits one batch at a time. Answers always go in the order the
    /// batches were taken.
    pub batches_in_flight_max: usize,
    /// Refuse sends (`BadRecipient`) to users that never logged in: no inbox record is made
    /// for an id nobody uses. Off by default, since apps may message users before their first
    /// login.
    pub recipients_must_exist: bool,
}

pub(crate) const HOUR_MS: u64 = 3600 * 1000;

/// The most batches in flight that help: a shard's committer writes one batch at a time,
/// and a store keeps at most one written commit waiting for its fsync (decision 0027).
pub const BATCHES_IN_FLIGHT_LIMIT: usize = 2;

impl Default for CoreConfig {
    fn default() -> CoreConfig {
        CoreConfig {
            retention_ms: 30 * 24 * HOUR_MS,
            dedupe_window_ms: 24 * HOUR_MS,
            expiry_bucket_ms: HOUR_MS,
            batch_requests_max: 1_000,
            batch_bytes_max: 512 * 1024,
            queue_requests_max: 10_000,
            queue_bytes_max: 16 * 1024 * 1024,
            queue_requests_per_sender_max: 1_000,
            queue_bytes_per_sender_max: 2 * 1024 * 1024,
            commit_attempts_max: 5,
            expire_scan_keys_max: 10_000,
            device_sweep_round_ms_max: 24 * HOUR_MS,
            sync_messages_max: 256,
            seq_cache_entries_max: 262_144,
            ack_commit_delay_ms: 50,
            commit_slow_ms: 2_000,
            batches_in_flight_max: 2,
            recipients_must_exist: false,
        }
    }
}

/// A configuration value that cannot work, with the field and what is expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {expected}")]
pub struct ConfigError {
    pub field: &'static str,
    pub expected: &'static str,
}

/// The longest acks may wait before they are committed.
pub const ACK_COMMIT_DELAY_MS_LIMIT: u64 = 60_000;

impl CoreConfig {
    /// Checks relations between the values; the runtime calls this at start-up.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |field, expected| Err(ConfigError { field, expected });
        if self.retention_ms == 0 {
            return fail("retention_ms", "a positive duration");
        }
        if self.dedupe_window_ms == 0 {
            return fail("dedupe_window_ms", "a positive duration");
        }
        if self.expiry_bucket_ms == 0 || self.expiry_bucket_ms > self.retention_ms {
            return fail("expiry_bucket_ms", "positive and at most retention_ms");
        }
        if self.batch_requests_max == 0 {
            return fail("batch_requests_max", "at least 1");
        }
        if self.batch_bytes_max < FRAME_BYTES_MAX {
            return fail(
                "batch_bytes_max",
                "at least one maximal frame (66560 bytes)",
            );
        }
        if self.queue_requests_max < self.batch_requests_max {
            return fail("queue_requests_max", "at least batch_requests_max");
        }
        if self.queue_bytes_max < self.batch_bytes_max {
            return fail("queue_bytes_max", "at least batch_bytes_max");
        }
        if self.queue_requests_per_sender_max == 0
            || self.queue_requests_per_sender_max > self.queue_requests_max
        {
            return fail(
                "queue_requests_per_sender_max",
                "at least 1 and at most queue_requests_max",
            );
        }
        if self.queue_bytes_per_sender_max < FRAME_BYTES_MAX
            || self.queue_bytes_per_sender_max > self.queue_bytes_max
        {
            return fail(
                "queue_bytes_per_sender_max",
                "at least one maximal frame (66560 bytes) and at most queue_bytes_max",
            );
        }
        if self.commit_slow_ms == 0 {
            return fail("commit_slow_ms", "at least 1");
        }
        if self.ack_commit_delay_ms > ACK_COMMIT_DELAY_MS_LIMIT {
            return fail(
                "ack_commit_delay_ms",
                "at most 60000 (a minute): acks delete delivered messages, and every ack waiting \
                 is a re-delivery after a crash",
            );
        }
        if !(1..=BATCHES_IN_FLIGHT_LIMIT).contains(&self.batches_in_flight_max) {
            return fail("batches_in_flight_max", "1 or 2");
        }
        if self.commit_attempts_max == 0 {
            return fail("commit_attempts_max", "at least 1");
        }
        if self.expire_scan_keys_max == 0 || self.sync_messages_max == 0 {
            return fail("expire_scan_keys_max/sync_messages_max", "at least 1");
        }
        Ok(())
    }
}
