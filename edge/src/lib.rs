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
