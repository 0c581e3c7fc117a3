//! Courier's client wire protocol: frames, limits and error codes. No I/O.
//!
//! A connection carries a byte stream of frames. Each frame is a 4-byte big-endian length
//! followed by an [rkyv] archive of [`Frame`]. Bytes from the network are untrusted: [`decode`]
//! checks the length against [`FRAME_BYTES_MAX`] before it copies anything, validates the archive
//! with `bytecheck`, and then checks every field against its limit ("parse, don't validate"). A
//! frame that comes out of [`decode`] is safe to act on.
//!
//! The protocol version is the ALPN string [`ALPN`]; an incompatible change gets a new ALPN.

pub mod client;
mod frame;
mod limits;
pub mod link;
#[cfg(feature = "token")]
pub mod token;

pub use frame::{ALL_ERROR_CODES, ErrorCode, Frame, SignalKind};
pub use limits::*;

use rkyv::rancor;
use rkyv::util::AlignedVec;

/// The ALPN protocol identifier of this version of the protocol.
pub const ALPN: &[u8] = b"courier/2";

/// Bytes of the length prefix in front of every frame.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Why a frame could not be decoded. Every variant is the peer's fault: answer with
/// [`DecodeError::code`] and close the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {length_bytes} bytes exceeds the limit of {FRAME_BYTES_MAX} bytes")]
    FrameTooLarge { length_bytes: usize },
    #[error("frame length is zero")]
    FrameEmpty,
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("field {field} is {actual}, over the limit of {limit}")]
    LimitExceeded {
        field: &'static str,
        actual: u64,
        limit: u64,
    },
    #[error("field {field} has the reserved value 0")]
    ZeroId { field: &'static str },
}

impl DecodeError {
    /// The error code to send to the peer for this decode failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::FrameEmpty | DecodeError::Malformed(_) | DecodeError::ZeroId { .. } => {
                ErrorCode::Malformed
            }
            DecodeError::LimitExceeded { .. } => ErrorCode::LimitExceeded,
        }
    }
}

/// Why a frame could not be encoded. This is a bug in the caller (it built a frame over a
/// limit), reported instead of sending bytes the peer would reject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("frame would be invalid: {0}")]
    Invalid(#[from] DecodeError),
    #[error("archiving failed: {0}")]
    Archive(String),
}

/// Appends `frame`, length-prefixed, to `out`.
///
/// The frame is checked against the same limits [`decode`] applies, so a peer never receives a
/// frame it must reject. On error `out` is left as it was.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    frame.check_limits()?;
    append_archived(frame, out)
}

/// Appends `value`'s archive with its length prefix (client and link frames alike). The
/// archive is written into `out` in place, not into a buffer of its own that is then copied.
fn append_archived<T>(value: &T, out: &mut Vec<u8>) -> Result<(), EncodeError>
where
    T: for<'a, 'w> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                ArchiveIn<'w>,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rancor::Error,
            >,
        >,
{
    let prefix_at = out.len();
    out.extend_from_slice(&[0; LENGTH_PREFIX_BYTES]);
    let body_at = out.len();
    let written = rkyv::api::high::to_bytes_in::<_, rancor::Error>(
        value,
        ArchiveIn {
            out: &mut *out,
            start: body_at,
        },
    )
    .map(drop);
    let body_bytes = out.len() - body_at;
    let checked = match written {
        Err(error) => Err(EncodeError::Archive(error.to_string())),
        Ok(_) if body_bytes > FRAME_BYTES_MAX => Err(DecodeError::FrameTooLarge {
            length_bytes: body_bytes,
        }
        .into()),
        Ok(_) => Ok(()),
    };
    if let Err(error) = checked {
        out.truncate(prefix_at);
        return Err(error);
    }
    // The cast cannot truncate: FRAME_BYTES_MAX fits in u32 (asserted in limits.rs).
    out[prefix_at..body_at].copy_from_slice(&(body_bytes as u32).to_be_bytes());
    Ok(())
}

/// An archive being written at the end of a buffer. Its positions count from where it starts,
/// so its padding is what it would be in a buffer of its own: the reader copies a frame's body
/// into an aligned buffer of its own before reading it.
struct ArchiveIn<'a> {
    out: &'a mut Vec<u8>,
    start: usize,
}

impl rkyv::ser::Positional for ArchiveIn<'_> {
    fn pos(&self) -> usize {
        self.out.len() - self.start
    }
}

impl<E> rkyv::ser::Writer<E> for ArchiveIn<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), E> {
        self.out.extend_from_slice(bytes);
        Ok(())
    }
}

/// Appends an archived frame body with its length prefix.
#[cfg(test)]
fn append_prefixed(body: &[u8], out: &mut Vec<u8>) -> Result<(), EncodeError> {
    if body.len() > FRAME_BYTES_MAX {
        return Err(DecodeError::FrameTooLarge {
            length_bytes: body.len(),
        }
        .into());
    }
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    Ok(())
}

/// The body of the first frame of `buf` and the bytes it takes with its prefix, once whole.
fn split_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>, DecodeError> {
    let Some(length_bytes) = peek_length(buf)? else {
        return Ok(None);
    };
    let frame_end = LENGTH_PREFIX_BYTES + length_bytes;
    Ok(buf
        .get(LENGTH_PREFIX_BYTES..frame_end)
        .map(|body| (body, frame_end)))
}

/// Encodes one frame into a fresh buffer.
pub fn encode_to_vec(frame: &Frame) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode(frame, &mut out)?;
    Ok(out)
}

/// Decodes the first frame of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame (read more bytes), and
/// `Ok(Some((frame, consumed_bytes)))` when it does. An error means the stream is corrupt or
/// hostile: answer with [`DecodeError::code`] and close it. A length prefix over
/// [`FRAME_BYTES_MAX`] is rejected before any byte of the frame is buffered or copied.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, DecodeError> {
    let Some((body, consumed)) = split_frame(buf)? else {
        return Ok(None);
    };
    let frame = decode_body(body)?;
    Ok(Some((frame, consumed)))
}

/// Reads and checks the length prefix at the front of `buf`, if all four bytes are there.
///
/// Stream readers call this to learn how many bytes to wait for, and to reject an oversized
/// frame before buffering it.
pub fn peek_length(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    let Some(prefix) = buf.first_chunk::<LENGTH_PREFIX_BYTES>() else {
        return Ok(None);
    };
    let length_bytes = u32::from_be_bytes(*prefix) as usize;
    if length_bytes == 0 {
        return Err(DecodeError::FrameEmpty);
    }
    if length_bytes > FRAME_BYTES_MAX {
        return Err(DecodeError::FrameTooLarge { length_bytes });
    }
    Ok(Some(length_bytes))
}

/// Decodes one frame body (the bytes after the length prefix).
pub fn decode_body(body: &[u8]) -> Result<Frame, DecodeError> {
    let frame = with_aligned_body(body, rkyv::from_bytes::<Frame, rancor::Error>)?;
    // rkyv's error text names its own internals (and without its `alloc` feature says only
    // how to get more text): the peer gets a sentence about its bytes instead.
    let frame = frame.map_err(|_| {
        DecodeError::Malformed(
            "the bytes are not a frame of this protocol version (corrupt, truncated, or an \
             unknown frame kind or field value)"
                .into(),
        )
    })?;
    frame.check_limits()?;
    Ok(frame)
}

/// Runs `decode` on a copy of `body` in an aligned buffer, after its size is checked.
fn with_aligned_body<T>(body: &[u8], decode: impl FnOnce(&[u8]) -> T) -> Result<T, DecodeError> {
    if body.is_empty() {
        return Err(DecodeError::FrameEmpty);
    }
    if body.len() > FRAME_BYTES_MAX {
        return Err(DecodeError::FrameTooLarge {
            length_bytes: body.len(),
        });
    }
    Ok(ALIGNED_BODY.with_borrow_mut(|aligned| {
        // rkyv validates alignment; bytes from a stream have none, so copy into an aligned
        // buffer. The copy is bounded by FRAME_BYTES_MAX, checked above.
        aligned.clear();
        aligned.extend_from_slice(body);
        decode(aligned)
    }))
}

thread_local! {
    /// The aligned copy of the frame body being decoded, one per thread and reused: a buffer
    /// per frame was an allocation and a free per frame. Grows to at most `FRAME_BYTES_MAX`
    /// rounded up to a power of two (128 KiB).
    static ALIGNED_BODY: std::cell::RefCell<AlignedVec<16>> =
        std::cell::RefCell::new(AlignedVec::new());
}

#[cfg(test)]
mod tests;
