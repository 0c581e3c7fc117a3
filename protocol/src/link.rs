//! The edge-to-edge link protocol (issue 13, decision 0013): what one edge of a cluster asks of
//! the edge where a user lives, and the answers.
//!
//! A link is a QUIC connection between two edges on its own ALPN ([`LINK_ALPN`]), authenticated
//! by mutual TLS with the cluster's CA. It carries one bidirectional stream of frames framed
//! like client frames (a 4-byte big-endian length, then an rkyv archive), and the same rules
//! hold: the peer is another edge, but its bytes are still checked before anything acts on
//! them, because a bug or a version skew on one edge must not take down another.
//!
//! The connecting edge sends [`LinkFrame::Hello`] first, then requests (`Send`, `Signal`); the
//! accepting edge answers each `Send` with a `SendResult` carrying the same `request_id`.

use rkyv::{Archive, Deserialize, Serialize, rancor};

use crate::frame::{check_len, check_max, check_nonzero};
use crate::{
    BODY_BYTES_MAX, DecodeError, EncodeError, ErrorCode, FRAME_BYTES_MAX, SIGNAL_PAYLOAD_BYTES_MAX,
    SignalKind, TTL_SECS_MAX,
};

/// The ALPN of edge-to-edge links. Client connections never use it.
pub const LINK_ALPN: &[u8] = b"courier-link/1";

/// One frame on a link.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum LinkFrame {
    /// First frame from the connecting edge: which member of the cluster it is.
    Hello { edge: u32 },
    /// Store this message in the inbox of `to`, which lives on the receiving edge. `sender` was
    /// authenticated by the forwarding edge.
    Send {
        request_id: u64,
        sender: u64,
        client_id: u64,
        to: u64,
        body: Vec<u8>,
        ttl_secs: Option<u32>,
    },
    /// The answer to the `Send` with the same `request_id`.
    SendResult {
        request_id: u64,
        result: LinkSendResult,
    },
    /// An ephemeral signal for `to`, which lives on the receiving edge; never answered.
    Signal {
        to: u64,
        from: u64,
        kind: SignalKind,
        payload: Vec<u8>,
    },
}

/// How a forwarded send ended.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkSendResult {
    /// Committed in the recipient's inbox as `seq`.
    Stored { seq: u64, server_time_ms: u64 },
    /// Refused; the sender's client gets `SendError` with this code.
    Refused { code: ErrorCode },
}

impl LinkSendResult {
    /// From a send's outcome as the session carries it: `(seq, server_time_ms)` or a code.
    pub fn from_result(result: Result<(u64, u64), ErrorCode>) -> LinkSendResult {
        match result {
            Ok((seq, server_time_ms)) => LinkSendResult::Stored {
                seq,
                server_time_ms,
            },
            Err(code) => LinkSendResult::Refused { code },
        }
    }

    /// The outcome as the session carries it.
    pub fn into_result(self) -> Result<(u64, u64), ErrorCode> {
        match self {
            LinkSendResult::Stored {
                seq,
                server_time_ms,
            } => Ok((seq, server_time_ms)),
            LinkSendResult::Refused { code } => Err(code),
        }
    }
}

impl LinkFrame {
    /// Checks every field against its limit; [`encode_link`] and [`decode_link`] call this.
    pub fn check_limits(&self) -> Result<(), DecodeError> {
        match self {
            LinkFrame::Hello { .. } => Ok(()),
            LinkFrame::Send {
                sender,
                client_id,
                to,
                body,
                ttl_secs,
                ..
            } => {
                check_nonzero("link_send.sender", *sender)?;
                check_nonzero("link_send.client_id", *client_id)?;
                check_nonzero("link_send.to", *to)?;
                check_len("link_send.body", body.len(), BODY_BYTES_MAX)?;
                match ttl_secs {
                    Some(ttl) => check_max(
                        "link_send.ttl_secs",
                        u64::from(*ttl),
                        u64::from(TTL_SECS_MAX),
                    ),
                    None => Ok(()),
                }
            }
            LinkFrame::SendResult { result, .. } => match result {
                LinkSendResult::Stored { seq, .. } => check_nonzero("link_send_result.seq", *seq),
                LinkSendResult::Refused { .. } => Ok(()),
            },
            LinkFrame::Signal {
                to, from, payload, ..
            } => {
                check_nonzero("link_signal.to", *to)?;
                check_nonzero("link_signal.from", *from)?;
                check_len(
                    "link_signal.payload",
                    payload.len(),
                    SIGNAL_PAYLOAD_BYTES_MAX,
                )
            }
        }
    }

    /// The variant's name, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            LinkFrame::Hello { .. } => "hello",
            LinkFrame::Send { .. } => "send",
            LinkFrame::SendResult { .. } => "send_result",
            LinkFrame::Signal { .. } => "signal",
        }
    }
}

/// Appends `frame`, length-prefixed, to `out`, checked against the limits the peer applies.
pub fn encode_link(frame: &LinkFrame, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    frame.check_limits()?;
    crate::append_archived(frame, out)
}

/// Decodes the first link frame of `buf`, like [`crate::decode`] does client frames:
/// `Ok(None)` until a whole frame is there, an error for bytes that are not a valid frame.
pub fn decode_link(buf: &[u8]) -> Result<Option<(LinkFrame, usize)>, DecodeError> {
    let Some((body, consumed)) = crate::split_frame(buf)? else {
        return Ok(None);
    };
    let frame = crate::with_aligned_body(body, rkyv::from_bytes::<LinkFrame, rancor::Error>)?
        .map_err(|_| DecodeError::Malformed("the bytes are not a link frame".into()))?;
    frame.check_limits()?;
    Ok(Some((frame, consumed)))
}

const _: () = assert!(SIGNAL_PAYLOAD_BYTES_MAX + 64 < FRAME_BYTES_MAX);

#[cfg(test)]
mod tests {
    use super::*;

    fn send(body_bytes: usize) -> LinkFrame {
        LinkFrame::Send {
            request_id: 7,
            sender: 1,
            client_id: 2,
            to: 3,
            body: vec![0xab; body_bytes],
            ttl_secs: Some(60),
        }
    }

    /// Every kind survives a round trip, and a stream of several frames splits where it should.
    #[test]
    fn link_frames_round_trip_in_a_stream() {
        let frames = vec![
            LinkFrame::Hello { edge: 4 },
            send(BODY_BYTES_MAX),
            LinkFrame::SendResult {
                request_id: 7,
                result: LinkSendResult::Stored {
                    seq: 9,
                    server_time_ms: 1_000,
                },
            },
            LinkFrame::SendResult {
                request_id: 8,
                result: LinkSendResult::Refused {
                    code: ErrorCode::ShardUnavailable,
                },
            },
            LinkFrame::Signal {
                to: 3,
                from: 1,
                kind: SignalKind::Typing,
                payload: vec![1; SIGNAL_PAYLOAD_BYTES_MAX],
            },
        ];
        let mut stream = Vec::new();
        for frame in &frames {
            encode_link(frame, &mut stream).unwrap();
        }
        let mut at = 0;
        let mut decoded = Vec::new();
        while let Some((frame, used)) = decode_link(&stream[at..]).unwrap() {
            decoded.push(frame);
            at += used;
        }
        assert_eq!(decoded, frames);
        assert_eq!(at, stream.len());
        // A partial frame waits for more bytes.
        let mut one = Vec::new();
        encode_link(&frames[1], &mut one).unwrap();
        assert_eq!(decode_link(&one[..one.len() - 1]).unwrap(), None);
        assert_eq!(decode_link(&one[..3]).unwrap(), None);
    }

    /// Bytes over a limit or with a reserved id are refused on both sides.
    #[test]
    fn invalid_link_frames_are_refused() {
        assert!(matches!(
            encode_link(&send(BODY_BYTES_MAX + 1), &mut Vec::new()),
            Err(EncodeError::Invalid(DecodeError::LimitExceeded { .. }))
        ));
        let zero_sender = LinkFrame::Send {
            request_id: 1,
            sender: 0,
            client_id: 1,
            to: 1,
            body: Vec::new(),
            ttl_secs: None,
        };
        let bytes = rkyv::to_bytes::<rancor::Error>(&zero_sender).unwrap();
        let mut stream = Vec::new();
        crate::append_prefixed(&bytes, &mut stream).unwrap();
        assert_eq!(
            decode_link(&stream),
            Err(DecodeError::ZeroId {
                field: "link_send.sender"
            })
        );
        assert!(matches!(
            decode_link(&[0, 0, 0, 3, 1, 2, 3]),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode_link(&u32::MAX.to_be_bytes()),
            Err(DecodeError::FrameTooLarge { .. })
        ));
        // A client frame is not a link frame.
        let client = crate::encode_to_vec(&crate::Frame::Ping { nonce: 1 }).unwrap();
        assert!(decode_link(&client).is_err());
    }
}
