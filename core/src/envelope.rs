//! The stored form of a message: a fixed little-endian header, then the opaque body.
//!
//! This is an on-disk format, versioned by its first byte. It is not rkyv: the header is four
//! fields, and a hand-written layout keeps the format obvious and stable across crate upgrades.

use crate::{UnixMillis, UserId};

const VERSION: u8 = 1;
/// Bytes of the header before the body.
pub const HEADER_BYTES: usize = 1 + 8 + 8 + 8;

/// A message as stored in an inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub inbox: UserId,
    pub seq: u64,
    pub from: UserId,
    pub sent_at_ms: UnixMillis,
    /// When the message is deleted if still undelivered.
    pub expire_at_ms: UnixMillis,
    pub body: Vec<u8>,
}

/// The stored value of a message (everything but the inbox and seq, which are the key) is
/// this header, then the body (`Transaction::set_concat` stores the two without joining them
/// first).
pub fn header(
    from: UserId,
    sent_at_ms: UnixMillis,
    expire_at_ms: UnixMillis,
) -> [u8; HEADER_BYTES] {
    let mut header = [0u8; HEADER_BYTES];
    header[0] = VERSION;
    header[1..9].copy_from_slice(&from.to_le_bytes());
    header[9..17].copy_from_slice(&sent_at_ms.to_le_bytes());
    header[17..].copy_from_slice(&expire_at_ms.to_le_bytes());
    header
}

/// Decodes a stored value. `None` means the store holds bytes this version cannot read, which
/// is corruption or a downgrade; callers report it rather than guess.
pub fn decode(inbox: UserId, seq: u64, value: &[u8]) -> Option<StoredMessage> {
    let (header, body) = value.split_at_checked(HEADER_BYTES)?;
    if header[0] != VERSION {
        return None;
    }
    let field = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    Some(StoredMessage {
        inbox,
        seq,
        from: field(1),
        sent_at_ms: field(9),
        expire_at_ms: field(17),
        body: body.to_vec(),
    })
}

/// Reads only the commit time of a stored value, for the expiry scan.
pub fn sent_at_ms(value: &[u8]) -> Option<UnixMillis> {
    Some(u64::from_le_bytes(value.get(9..17)?.try_into().ok()?))
}

/// Reads only the expiry time of a stored value, for the expiry scan.
pub fn expire_at_ms(value: &[u8]) -> Option<UnixMillis> {
    Some(u64::from_le_bytes(value.get(17..25)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects_truncated_or_unknown_version() {
        let value = [&header(5, 1000, 2000)[..], b"hello"].concat();
        let message = decode(9, 3, &value).unwrap();
        assert_eq!(message.from, 5);
        assert_eq!(message.body, b"hello");
        assert_eq!(expire_at_ms(&value), Some(2000));
        assert_eq!(sent_at_ms(&value), Some(1000));
        assert_eq!(decode(9, 3, &value[..HEADER_BYTES - 1]), None);
        let mut future = value.clone();
        future[0] = 2;
        assert_eq!(decode(9, 3, &future), None);
    }
}
