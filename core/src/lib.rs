//! Courier's domain core, sans-IO.
//!
//! It decides where a user's inbox lives ([`placement`]), batches requests for a home shard
//! ([`shard::InboxShard`]), commits them through the FoundationDB-shaped [`store::Store`] trait
//! ([`commit`]), and deletes what was acknowledged or expired. Time and randomness are inputs:
//! nothing here reads a clock, spawns a thread or touches a socket. Store backends do blocking
//! I/O; the runtime calls them from a thread that may block (never an executor thread).

pub mod budget;
pub mod clock;
pub mod commit;
pub mod config;
pub mod envelope;
pub mod keys;
pub mod membership;
pub mod placement;
pub mod rng;
pub mod session;
pub mod shard;
pub mod store;
pub mod takeover;

pub use config::CoreConfig;

/// Maps and sets on the per-message paths (the session layer, the shards, the committer's
/// caches): ahash with per-process random keys instead of std's SipHash (docs/decisions/0021).
/// Their keys include ids chosen by clients, so the hash stays keyed.
pub type FastHashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
/// See [`FastHashMap`].
pub type FastHashSet<K> = std::collections::HashSet<K, ahash::RandomState>;

/// A user id; also names the user's inbox. 0 is reserved.
pub type UserId = u64;

/// Milliseconds since the Unix epoch. The runtime passes the current time in; the core never
/// reads a clock.
pub type UnixMillis = u64;
