//! Property tests: decoding arbitrary bytes never panics and never allocates beyond the limits.
//!
//! Feeds 60,000 random byte strings and 60,000 mutated valid frames to `decode`, counting the
//! bytes each decode allocates with a per-thread counting allocator. Also checks that every
//! valid frame survives an encode/decode round trip.

#![allow(unsafe_code)] // The counting allocator below is the only unsafe code, in a test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use courier_protocol::*;
use proptest::prelude::*;

struct CountingAllocator;

thread_local! {
    static ALLOCATED_BYTES: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator and only adds a thread-local counter.

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATED_BYTES.try_with(|c| c.set(c.get() + layout.size()));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATED_BYTES.try_with(|c| c.set(c.get() + new_size));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Upper bound on what one decode may allocate: the aligned copy of the frame, the owned fields
/// (never more than the frame's bytes), and small change for error messages.
const DECODE_ALLOCATED_BYTES_MAX: usize = 2 * FRAME_BYTES_MAX + 4096;

fn decode_counting(bytes: &[u8]) -> (Result<Option<(Frame, usize)>, DecodeError>, usize) {
    let before = ALLOCATED_BYTES.with(|c| c.get());
    let result = decode(bytes);
    let allocated = ALLOCATED_BYTES.with(|c| c.get()) - before;
    (result, allocated)
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop::sample::select(ALL_ERROR_CODES.to_vec())
}

fn signal_kind() -> impl Strategy<Value = SignalKind> {
    prop::sample::select(vec![
        SignalKind::Typing,
        SignalKind::StoppedTyping,
        SignalKind::Online,
        SignalKind::Offline,
        SignalKind::Custom,
    ])
}

fn nonzero() -> impl Strategy<Value = u64> {
    1..=u64::MAX
}

fn text(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..max / 4).prop_map(|chars| chars.into_iter().collect())
}

/// Every frame that satisfies the limits.
fn valid_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (bytes(64), 0..=DEVICE_ID_MAX, any::<u64>(), any::<u64>()).prop_map(
            |(token, device, a, b)| Frame::Hello {
                token,
                device,
                acked_up_to: a.min(b),
                resume_after_seq: a.max(b),
            }
        ),
        any::<u64>().prop_map(|up_to_seq| Frame::Hole { up_to_seq }),
        (
            nonzero(),
            0..=DEVICE_ID_MAX,
            any::<u64>(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(user, device, server_time_ms, acked_up_to, first_seq)| {
                Frame::Welcome {
                    user,
                    device,
                    server_time_ms,
                    acked_up_to,
                    first_seq,
                }
            }),
        (
            nonzero(),
            nonzero(),
            bytes(300),
            prop::option::of(0..=TTL_SECS_MAX)
        )
            .prop_map(|(client_id, to, body, ttl_secs)| Frame::Send {
                client_id,
                to,
                body,
                ttl_secs
            }),
        (nonzero(), nonzero(), any::<u64>()).prop_map(|(client_id, seq, server_time_ms)| {
            Frame::SendAck {
                client_id,
                seq,
                server_time_ms,
            }
        }),
        (nonzero(), error_code(), any::<bool>()).prop_map(|(client_id, code, retryable)| {
            Frame::SendError {
                client_id,
                code,
                retryable,
            }
        }),
        (nonzero(), nonzero(), any::<u64>(), bytes(300)).prop_map(
            |(seq, from, sent_at_ms, body)| Frame::Deliver {
                seq,
                from,
                sent_at_ms,
                body
            }
        ),
        any::<u64>().prop_map(|up_to_seq| Frame::Ack { up_to_seq }),
        any::<u64>().prop_map(|after_seq| Frame::Sync { after_seq }),
        (nonzero(), signal_kind(), bytes(SIGNAL_PAYLOAD_BYTES_MAX)).prop_map(
            |(peer, kind, payload)| Frame::Signal {
                peer,
                kind,
                payload
            }
        ),
        any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
        (
            text(TEXT_BYTES_MAX),
            prop::option::of(text(ADDRESS_BYTES_MAX))
        )
            .prop_map(|(reason, reconnect_to)| Frame::Goaway {
                reason,
                reconnect_to
            }),
        (error_code(), text(TEXT_BYTES_MAX))
            .prop_map(|(code, message)| Frame::Error { code, message }),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit {
        index: usize,
        bit: u8,
    },
    SetByte {
        index: usize,
        value: u8,
    },
    Truncate {
        len: usize,
    },
    Insert {
        index: usize,
        value: u8,
    },
    /// Overwrite four bytes with a u32, which hits lengths and relative pointers.
    SetWord {
        index: usize,
        value: u32,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0..8u8).prop_map(|(index, bit)| Mutation::FlipBit { index, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(index, value)| Mutation::SetByte { index, value }),
        any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        (any::<usize>(), any::<u8>()).prop_map(|(index, value)| Mutation::Insert { index, value }),
        (any::<usize>(), any::<u32>())
            .prop_map(|(index, value)| Mutation::SetWord { index, value }),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    let len = bytes.len().max(1);
    match *mutation {
        Mutation::FlipBit { index, bit } => {
            if let Some(b) = bytes.get_mut(index % len) {
                *b ^= 1 << bit;
            }
        }
        Mutation::SetByte { index, value } => {
            if let Some(b) = bytes.get_mut(index % len) {
                *b = value;
            }
        }
        Mutation::Truncate { len: keep } => bytes.truncate(keep % len),
        Mutation::Insert { index, value } => bytes.insert(index % len.min(bytes.len() + 1), value),
        Mutation::SetWord { index, value } => {
            let start = index % len;
            for (offset, byte) in value.to_le_bytes().into_iter().enumerate() {
                if let Some(b) = bytes.get_mut(start + offset) {
                    *b = byte;
                }
            }
        }
    }
}

/// Whatever decode returned, it must be consistent: a frame satisfies its limits and the
/// consumed count lies within the input.
fn check_outcome(
    input: &[u8],
    outcome: &Result<Option<(Frame, usize)>, DecodeError>,
    allocated: usize,
) {
    assert!(
        allocated <= DECODE_ALLOCATED_BYTES_MAX,
        "decode allocated {allocated} bytes for {} input bytes",
        input.len()
    );
    if let Ok(Some((frame, consumed))) = outcome {
        assert!(*consumed <= input.len());
        frame
            .check_limits()
            .expect("decoded frame must satisfy the limits");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

    #[test]
    fn valid_frames_round_trip(frame in valid_frame()) {
        let bytes = encode_to_vec(&frame).unwrap();
        let (outcome, allocated) = decode_counting(&bytes);
        check_outcome(&bytes, &outcome, allocated);
        prop_assert_eq!(outcome, Ok(Some((frame, bytes.len()))));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 60_000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(mut input in bytes(600), length_prefix in any::<Option<u32>>()) {
        // Half the inputs get a plausible length prefix so the archive validator is reached.
        if let Some(prefix) = length_prefix {
            let length = (prefix as usize % (input.len() + 8)) as u32;
            input.splice(0..0, length.to_be_bytes());
        }
        let (outcome, allocated) = decode_counting(&input);
        check_outcome(&input, &outcome, allocated);
    }

    #[test]
    fn mutated_frames_never_panic(
        frame in valid_frame(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let mut input = encode_to_vec(&frame).unwrap();
        for m in &mutations {
            apply(&mut input, m);
        }
        let (outcome, allocated) = decode_counting(&input);
        check_outcome(&input, &outcome, allocated);
    }
}

#[test]
fn huge_length_prefix_allocates_nothing_large() {
    let input = [0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3];
    let (outcome, allocated) = decode_counting(&input);
    assert_eq!(outcome.unwrap_err().code(), ErrorCode::FrameTooLarge);
    assert!(allocated < 1024, "allocated {allocated} bytes");
}
