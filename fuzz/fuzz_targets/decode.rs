//! The frame decoders (client frames and edge-to-edge link frames) on arbitrary bytes, read back
//! to back as a stream reader does: they never panic, never claim more bytes than they were
//! given, and what they decode re-encodes to the same frame.

#![no_main]

use courier_protocol::DecodeError;
use courier_protocol::link::{decode_link, encode_link};
use libfuzzer_sys::fuzz_target;

/// Decodes frames from `data` back to back with `decode`, checking each against `encode`.
fn read_back_to_back<F: PartialEq + std::fmt::Debug>(
    data: &[u8],
    decode: fn(&[u8]) -> Result<Option<(F, usize)>, DecodeError>,
    encode: fn(&F) -> Vec<u8>,
) {
    let mut rest = data;
    for _ in 0..64 {
        match decode(rest) {
            Ok(Some((frame, used))) => {
                assert!(used > courier_protocol::LENGTH_PREFIX_BYTES && used <= rest.len());
                let bytes = encode(&frame);
                let (again, again_used) = decode(&bytes)
                    .expect("its encoding decodes")
                    .expect("its encoding is whole");
                assert_eq!(again, frame);
                assert_eq!(again_used, bytes.len());
                rest = &rest[used..];
            }
            Ok(None) | Err(_) => break,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    read_back_to_back(data, courier_protocol::decode, |frame| {
        courier_protocol::encode_to_vec(frame).expect("a decoded frame encodes")
    });
    read_back_to_back(data, decode_link, |frame| {
        let mut bytes = Vec::new();
        encode_link(frame, &mut bytes).expect("a decoded link frame encodes");
        bytes
    });
});
