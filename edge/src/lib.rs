//! The Courier edge server: one glommio executor per core terminating QUIC with quinn-proto,
//! committing through `courier-core`. The binary is `courier-edge` (`cli::main`).

pub mod auth;
pub mod backend;
mod bounded_read;
pub mod cid;
pub mod cli;
pub mod config;
pub mod control;
mod erase_record;
pub mod files;
pub mod health;
pub mod idle;
mod lanes;
pub mod memory;
mod mesh;
pub mod metrics;
pub mod server;
mod shard;
pub mod stores;
pub mod takeover;
pub mod tls;

/// jemalloc as the allocator of every binary that links this library.
///
/// That is the edge, the load generator (whose spawned edge is itself) and the edge processes
/// the tests start. glibc's malloc grew a thread's heap one page per `mprotect` and coalesced
/// freed chunks on the store writer's hot path; with jemalloc the closed loop cost the edge
/// 15–21% less CPU and a connection storm 4–18% less (decision 0022).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
