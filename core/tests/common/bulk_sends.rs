//! What the embedded stores' expiry tests share: sends spread over 500 inboxes, and a count of
//! one dedupe bucket's records.

use courier_core::commit::{Request, SendRequest};
use courier_core::keys;
use courier_core::store::{Store, Transaction};

/// A 100-byte send from user 9 to one of 500 inboxes, chosen by `client_id`.
pub fn spread_send(client_id: u64) -> Request {
    Request::Send(SendRequest {
        sender: 9,
        to: 1 + client_id % 500,
        client_id,
        body: vec![7; 100],
        ttl_secs: None,
    })
}

/// How many dedupe records `store` holds in `bucket` (counted up to 10,000).
pub fn dedupe_records<S: Store>(store: &S, bucket: u64) -> usize {
    store
        .begin_read()
        .and_then(|mut txn| {
            txn.get_range(
                &keys::dedupe_bucket_start(bucket),
                &keys::dedupe_bucket_start(bucket + 1),
                10_000,
            )
        })
        .expect("read the dedupe records")
        .len()
}
