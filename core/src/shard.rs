//! The home shard's request queue and group-commit batching, sans-IO.
//!
//! The runtime feeds requests in with [`InboxShard::handle_request`], takes a batch with
//! [`InboxShard::poll_batch`] when its input has run dry (or the queue holds a full batch),
//! commits it with [`crate::commit::commit_batch`] on a thread that may block, and hands the
//! result back to [`InboxShard::handle_commit`], which returns what to send to whom. Only one
//! batch is in flight at a time: while it commits, new requests queue up and form the next,
//! larger batch, so light load gets low latency and heavy load gets large batches.
//!
//! Call order: `handle_request`* → `poll_batch` → (commit) → `handle_commit` → `poll_batch` …

use std::collections::VecDeque;

use courier_protocol::ErrorCode;

use crate::commit::{Outcome, Request};
use crate::envelope::StoredMessage;
use crate::store::StoreError;
use crate::{CoreConfig, UnixMillis, UserId};

/// Requests taken from the queue to be committed together. `tags` has one entry per request:
/// whatever the runtime needs to route the answer (a connection handle, a reply channel).
#[derive(Debug)]
pub struct Batch<T> {
    pub requests: Vec<Request>,
    pub tags: Vec<T>,
}

/// What the runtime must do after a commit.
#[derive(Debug, PartialEq, Eq)]
pub enum Output<T> {
    /// Tell the sender its message is durable.
    SendAck {
        tag: T,
        client_id: u64,
        seq: u64,
        server_time_ms: UnixMillis,
    },
    /// Tell the sender its message was not stored.
    SendError { tag: T, client_id: u64, code: ErrorCode },
    /// Push a newly stored message to the recipient's open connections.
    Deliver(StoredMessage),
    /// The ack was applied (or, if `applied` is false, failed and will be redone by a later ack).
    Acked {
        tag: T,
        inbox: UserId,
        up_to_seq: u64,
        applied: bool,
    },
}

/// The queue was full; the request is handed back so the runtime can refuse it.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused<T> {
    pub request: Request,
    pub tag: T,
}

/// A home shard's queue of requests waiting to be committed.
#[derive(Debug)]
pub struct InboxShard<T> {
    batch_requests_max: usize,
    batch_bytes_max: usize,
    queue_requests_max: usize,
    queue_bytes_max: usize,
    queue: VecDeque<(Request, T)>,
    queue_bytes: usize,
    batch_in_flight: bool,
}

impl<T> InboxShard<T> {
    pub fn new(config: &CoreConfig) -> InboxShard<T> {
        InboxShard {
            batch_requests_max: config.batch_requests_max,
            batch_bytes_max: config.batch_bytes_max,
            queue_requests_max: config.queue_requests_max,
            queue_bytes_max: config.queue_bytes_max,
            queue: VecDeque::new(),
            queue_bytes: 0,
            batch_in_flight: false,
        }
    }

    /// Requests waiting for a batch.
    pub fn queued_requests(&self) -> usize {
        self.queue.len()
    }

    pub fn batch_in_flight(&self) -> bool {
        self.batch_in_flight
    }

    /// Whether the queue already holds a full batch, so waiting for more input gains nothing.
    pub fn has_full_batch(&self) -> bool {
        self.queue.len() >= self.batch_requests_max || self.queue_bytes >= self.batch_bytes_max
    }

    /// Queues a request, or refuses it when the queue is at its maximum (backpressure: the
    /// runtime answers `Overloaded`, and the sender retries later).
    pub fn handle_request(&mut self, request: Request, tag: T) -> Result<(), Refused<T>> {
        let bytes = request.body_bytes();
        if self.queue.len() >= self.queue_requests_max || self.queue_bytes + bytes > self.queue_bytes_max {
            return Err(Refused { request, tag });
        }
        self.queue_bytes += bytes;
        self.queue.push_back((request, tag));
        Ok(())
    }

    /// Takes the next batch: as many queued requests as fit the maxima, at least one. `None`
    /// while a batch is in flight or when nothing is queued.
    pub fn poll_batch(&mut self) -> Option<Batch<T>> {
        if self.batch_in_flight || self.queue.is_empty() {
            return None;
        }
        let mut batch = Batch {
            requests: Vec::new(),
            tags: Vec::new(),
        };
        let mut batch_bytes = 0;
        while let Some((request, _)) = self.queue.front() {
            let bytes = request.body_bytes();
            let full = batch.requests.len() >= self.batch_requests_max
                || (!batch.requests.is_empty() && batch_bytes + bytes > self.batch_bytes_max);
            if full {
                break;
            }
            let (request, tag) = self.queue.pop_front().expect("front exists");
            self.queue_bytes -= bytes;
            batch_bytes += bytes;
            batch.requests.push(request);
            batch.tags.push(tag);
        }
        self.batch_in_flight = true;
        Some(batch)
    }

    /// Turns the result of committing `batch` into answers and deliveries.
    pub fn handle_commit(
        &mut self,
        batch: Batch<T>,
        result: Result<Vec<Outcome>, StoreError>,
    ) -> Vec<Output<T>> {
        assert!(self.batch_in_flight, "handle_commit without a batch in flight");
        self.batch_in_flight = false;
        let mut outputs = Vec::with_capacity(batch.requests.len() * 2);
        match result {
            Ok(outcomes) => {
                assert_eq!(outcomes.len(), batch.requests.len(), "one outcome per request");
                for ((request, tag), outcome) in batch.requests.into_iter().zip(batch.tags).zip(outcomes) {
                    match (request, outcome) {
                        (
                            Request::Send(send),
                            Outcome::Stored {
                                seq,
                                server_time_ms,
                                expire_at_ms,
                                fresh,
                            },
                        ) => {
                            outputs.push(Output::SendAck {
                                tag,
                                client_id: send.client_id,
                                seq,
                                server_time_ms,
                            });
                            if fresh {
                                outputs.push(Output::Deliver(StoredMessage {
                                    inbox: send.to,
                                    seq,
                                    from: send.sender,
                                    sent_at_ms: server_time_ms,
                                    expire_at_ms,
                                    body: send.body,
                                }));
                            }
                        }
                        (Request::Ack { inbox, up_to_seq }, Outcome::Acked) => outputs.push(Output::Acked {
                            tag,
                            inbox,
                            up_to_seq,
                            applied: true,
                        }),
                        (request, outcome) => {
                            unreachable!("commit_batch answered {request:?} with {outcome:?}")
                        }
                    }
                }
            }
            Err(_error) => {
                for (request, tag) in batch.requests.into_iter().zip(batch.tags) {
                    match request {
                        Request::Send(send) => outputs.push(Output::SendError {
                            tag,
                            client_id: send.client_id,
                            code: ErrorCode::StoreUnavailable,
                        }),
                        Request::Ack { inbox, up_to_seq } => outputs.push(Output::Acked {
                            tag,
                            inbox,
                            up_to_seq,
                            applied: false,
                        }),
                    }
                }
            }
        }
        outputs
    }

    /// Drops everything queued, as a crash would. Returns the dropped requests' tags so the
    /// runtime can answer them with a retryable error.
    pub fn drain_queue(&mut self) -> Vec<(Request, T)> {
        self.queue_bytes = 0;
        self.queue.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commit::SendRequest;

    fn send(client_id: u64, body_bytes: usize) -> Request {
        Request::Send(SendRequest {
            sender: 1,
            client_id,
            to: 2,
            body: vec![0; body_bytes],
            ttl_secs: None,
        })
    }

    #[test]
    fn batches_respect_count_and_byte_maxima_and_one_in_flight() {
        let config = CoreConfig {
            batch_requests_max: 3,
            batch_bytes_max: 100_000,
            queue_requests_max: 5,
            queue_bytes_max: 300_000,
            ..CoreConfig::default()
        };
        let mut shard = InboxShard::new(&config);
        for id in 1..=5 {
            shard.handle_request(send(id, 10), id).unwrap();
        }
        let refused = shard.handle_request(send(6, 10), 6).unwrap_err();
        assert_eq!(refused.tag, 6);

        let batch = shard.poll_batch().unwrap();
        assert_eq!(batch.tags, vec![1, 2, 3]);
        assert!(shard.poll_batch().is_none(), "only one batch in flight");
        let outputs = shard.handle_commit(batch, Err(StoreError::CommitUnknown));
        assert!(
            outputs
                .iter()
                .all(|o| matches!(o, Output::SendError { code: ErrorCode::StoreUnavailable, .. }))
        );

        let batch = shard.poll_batch().unwrap();
        assert_eq!(batch.tags, vec![4, 5]);
        shard.handle_commit(batch, Err(StoreError::Conflict));
        // Bytes: 60 KB + 60 KB exceeds 100 KB, so each large request gets its own batch.
        shard.handle_request(send(8, 60_000), 8).unwrap();
        shard.handle_request(send(9, 60_000), 9).unwrap();
        let batch = shard.poll_batch().unwrap();
        assert_eq!(batch.tags, vec![8]);
    }
}
