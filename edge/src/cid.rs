//! Connection ids that name their shard, so datagrams find their connection's shard.
//!
//! The kernel spreads datagrams over the shards' `SO_REUSEPORT` sockets by hashing the 4-tuple,
//! which changes when a phone changes network. Every connection id the server issues carries
//! the shard id in its first byte; a shard that receives a short-header datagram naming another
//! shard forwards it there. Long-header packets (the handshake) come from one 4-tuple and stay
//! where the kernel put them.

use quinn_proto::{ConnectionId, ConnectionIdGenerator};
use rand::RngCore;

/// Bytes of every server-issued connection id.
pub const CID_BYTES: usize = 8;

/// Issues random connection ids whose first byte is the shard id.
#[derive(Debug)]
pub struct ShardCidGenerator {
    shard: u8,
}

impl ShardCidGenerator {
    pub fn new(shard: u8) -> ShardCidGenerator {
        ShardCidGenerator { shard }
    }
}

impl ConnectionIdGenerator for ShardCidGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut bytes = [0u8; CID_BYTES];
        rand::thread_rng().fill_bytes(&mut bytes[1..]);
        bytes[0] = self.shard;
        ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        CID_BYTES
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

/// The shard a datagram's destination connection id names, for short-header packets.
pub fn shard_of_datagram(datagram: &[u8]) -> Option<u8> {
    let first = *datagram.first()?;
    if first & 0x80 != 0 {
        return None;
    }
    // Short header: flags byte, then the destination connection id.
    if datagram.len() < 1 + CID_BYTES {
        return None;
    }
    Some(datagram[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_ids_name_the_shard_and_short_headers_are_steered() {
        let mut generator = ShardCidGenerator::new(3);
        let cid = generator.generate_cid();
        assert_eq!(cid.len(), CID_BYTES);
        assert_eq!(cid[0], 3);
        let mut short = vec![0x40];
        short.extend_from_slice(&cid);
        short.extend_from_slice(&[0; 20]);
        assert_eq!(shard_of_datagram(&short), Some(3));
        let long = [0xC0, 0, 0, 0, 1, 8, 9, 9, 9, 9, 9, 9, 9, 9];
        assert_eq!(shard_of_datagram(&long), None);
        assert_eq!(shard_of_datagram(&[]), None);
    }
}
