//! The Courier edge server: one glommio executor per core terminating QUIC with quinn-proto,
//! committing through `courier-core`. The binary is `courier-edge` (`cli::main`).

pub mod auth;
pub mod backend;
mod bounded_read;
pub mod cid;
pub mod cli;
pub mod config;
pub mod control;
pub mod health;
mod lanes;
pub mod memory;
mod mesh;
pub mod metrics;
pub mod server;
mod shard;
pub mod stores;
pub mod takeover;
pub mod tls;

/// jemalloc for every binary that links the edge (the edge, the load generator that embeds
/// it, the tests). glibc's malloc grows a thread's heap a page at a time with `mprotect` and
/// coalesces freed chunks on the store writer's hot path; jemalloc cost the edge 10–20% less
/// CPU per message and per connection (decision 0022).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
