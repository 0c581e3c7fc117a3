use super::*;

fn send_frame(body_bytes: usize) -> Frame {
    Frame::Send {
        client_id: 7,
        to: 42,
        body: vec![0xAB; body_bytes],
        ttl_secs: Some(60),
    }
}

fn deliver_frame() -> Frame {
    Frame::Deliver {
        seq: 1,
        from: 2,
        sent_at_ms: 3,
        body: b"hi".to_vec(),
    }
}

#[test]
fn round_trip_keeps_every_field() {
    let frames = [
        Frame::Hello {
            token: b"token".to_vec(),
            device: 3,
            acked_up_to: 7,
            resume_after_seq: 9,
        },
        send_frame(200),
        deliver_frame(),
        Frame::Hole { up_to_seq: 41 },
        Frame::Error {
            code: ErrorCode::TokenExpired,
            message: "token expired: mint a new one".into(),
        },
    ];
    let mut stream = Vec::new();
    for frame in &frames {
        encode(frame, &mut stream).unwrap();
    }
    let mut rest = &stream[..];
    for frame in &frames {
        let (decoded, consumed) = decode(rest).unwrap().unwrap();
        assert_eq!(&decoded, frame);
        rest = &rest[consumed..];
    }
    assert!(rest.is_empty());
}

/// A frame is archived in place at the end of the output, wherever that is: the same bytes
/// as an archive in a buffer of its own (rkyv's `to_bytes`), so its padding holds once the
/// reader copies the body to an aligned buffer.
#[test]
fn a_frame_archived_in_place_is_the_archive_of_its_own() {
    let frames = [
        send_frame(0),
        send_frame(3),
        deliver_frame(),
        Frame::Hole { up_to_seq: 41 },
    ];
    for frame in &frames {
        let own = rkyv::to_bytes::<rancor::Error>(frame).unwrap();
        for already in 0..17 {
            let mut out = vec![0xEE; already];
            encode(frame, &mut out).unwrap();
            assert_eq!(&out[..already], &vec![0xEE; already][..]);
            let prefix = u32::from_be_bytes(out[already..already + 4].try_into().unwrap());
            assert_eq!(prefix as usize, own.len());
            assert_eq!(
                &out[already + 4..],
                &own[..],
                "{frame:?} after {already} bytes"
            );
        }
    }
}

/// Link frames take the same path (`encode_link`).
#[test]
fn a_link_frame_archived_in_place_is_the_archive_of_its_own() {
    let frame = link::LinkFrame::Send {
        request_id: 1,
        sender: 2,
        client_id: 3,
        to: 4,
        body: b"abc".to_vec(),
        ttl_secs: Some(5),
    };
    let own = rkyv::to_bytes::<rancor::Error>(&frame).unwrap();
    for already in 0..17 {
        let mut out = vec![0xEE; already];
        link::encode_link(&frame, &mut out).unwrap();
        assert_eq!(&out[already + 4..], &own[..], "after {already} bytes");
        assert_eq!(
            link::decode_link(&out[already..]).unwrap().unwrap().0,
            frame
        );
    }
}

/// An archive over the frame limit is refused, and the buffer is left as it was: no length
/// prefix, no part of the archive.
#[test]
fn an_archive_over_the_limit_leaves_the_buffer_as_it_was() {
    let mut out = vec![1, 2, 3];
    let error = append_archived(&vec![0u8; FRAME_BYTES_MAX + 1], &mut out).unwrap_err();
    assert!(matches!(
        error,
        EncodeError::Invalid(DecodeError::FrameTooLarge { .. })
    ));
    assert_eq!(out, [1, 2, 3]);
}

#[test]
fn partial_frame_asks_for_more_bytes() {
    let bytes = encode_to_vec(&send_frame(10)).unwrap();
    for cut in 0..bytes.len() {
        assert_eq!(decode(&bytes[..cut]), Ok(None), "cut at {cut}");
    }
}

#[test]
fn oversized_length_prefix_is_rejected_before_buffering() {
    let mut bytes = ((FRAME_BYTES_MAX + 1) as u32).to_be_bytes().to_vec();
    bytes.push(0);
    let error = decode(&bytes).unwrap_err();
    assert_eq!(error.code(), ErrorCode::FrameTooLarge);
}

#[test]
fn largest_body_fits_and_one_more_byte_does_not() {
    let max = encode_to_vec(&send_frame(BODY_BYTES_MAX)).unwrap();
    assert!(decode(&max).unwrap().is_some());
    let error = encode_to_vec(&send_frame(BODY_BYTES_MAX + 1)).unwrap_err();
    assert!(matches!(
        error,
        EncodeError::Invalid(DecodeError::LimitExceeded {
            field: "send.body",
            ..
        })
    ));
}

#[test]
fn decoder_rejects_over_limit_fields_a_hostile_encoder_produced() {
    // Archive directly, skipping encode's checks, as a hostile client would.
    let frame = Frame::Hello {
        token: vec![1; TOKEN_BYTES_MAX + 1],
        device: 0,
        acked_up_to: 0,
        resume_after_seq: 0,
    };
    let body = rkyv::to_bytes::<rancor::Error>(&frame).unwrap();
    let error = decode_body(&body).unwrap_err();
    assert_eq!(error.code(), ErrorCode::LimitExceeded);

    let zero_recipient = Frame::Send {
        client_id: 1,
        to: USER_ID_RESERVED,
        body: vec![],
        ttl_secs: None,
    };
    let body = rkyv::to_bytes::<rancor::Error>(&zero_recipient).unwrap();
    assert_eq!(
        decode_body(&body).unwrap_err(),
        DecodeError::ZeroId { field: "send.to" }
    );
}

#[test]
fn zero_length_frame_is_malformed() {
    assert_eq!(decode(&[0, 0, 0, 0]), Err(DecodeError::FrameEmpty));
}

#[test]
fn error_codes_round_trip_through_numbers() {
    for code in ALL_ERROR_CODES {
        assert_eq!(ErrorCode::from_u16(code.to_u16()), Some(code));
    }
    assert_eq!(ErrorCode::from_u16(0), None);
    assert!(ErrorCode::StoreUnavailable.is_retryable());
    assert!(!ErrorCode::Unauthenticated.is_retryable());
}

#[test]
fn only_idempotent_frames_pass_the_0rtt_filter() {
    assert!(send_frame(1).is_idempotent());
    assert!(!Frame::Ack { up_to_seq: 1 }.is_idempotent());
    assert!(
        !Frame::Signal {
            peer: 1,
            kind: SignalKind::Typing,
            payload: vec![]
        }
        .is_idempotent()
    );
}

/// What a client reads when its bytes are refused is a sentence about its input: none of the
/// decoder's internals (the rkyv/rancor text once read "failed without error information;
/// enable debug assertions and the `alloc` feature in rancor").
#[test]
fn decode_errors_describe_the_input_not_the_library() {
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let valid = encode_to_vec(&send_frame(100)).expect("encode");
    for round in 0..2_000 {
        let mut bytes = valid.clone();
        // Corrupt a few body bytes, or truncate the length, or send garbage.
        match round % 3 {
            0 => {
                for _ in 0..4 {
                    let at = LENGTH_PREFIX_BYTES + (next() as usize % (bytes.len() - 4));
                    bytes[at] = next() as u8;
                }
            }
            1 => {
                let length = 1 + next() as usize % 64;
                bytes.truncate(LENGTH_PREFIX_BYTES + length);
                bytes[..4].copy_from_slice(&(length as u32).to_be_bytes());
            }
            _ => {
                bytes = (0..64).map(|_| next() as u8).collect();
            }
        }
        if let Err(error) = decode(&bytes) {
            let text = error.to_string();
            for internal in [
                "rkyv",
                "rancor",
                "archive",
                "debug assertions",
                "Some(",
                "Os {",
            ] {
                assert!(
                    !text.contains(internal),
                    "{text:?} names an internal ({internal})"
                );
            }
        }
    }
}
