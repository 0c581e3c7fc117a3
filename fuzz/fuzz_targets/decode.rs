//! The frame decoders (client frames and edge-to-edge link frames) on arbitrary bytes, read back
//! to back as a stream reader does: they never panic, never claim more bytes than they were
//! given, and what they decode re-encodes to the same frame.

#![no_main]

use courier_protocol::link::{decode_link, encode_link};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    for _ in 0..64 {
        match courier_protocol::decode(rest) {
            Ok(Some((frame, used))) => {
                assert!(used > courier_protocol::LENGTH_PREFIX_BYTES && used <= rest.len());
                let bytes =
                    courier_protocol::encode_to_vec(&frame).expect("a decoded frame encodes");
                let (again, again_used) = courier_protocol::decode(&bytes)
                    .expect("its encoding decodes")
                    .expect("its encoding is whole");
                assert_eq!(again, frame);
                assert_eq!(again_used, bytes.len());
                rest = &rest[used..];
            }
            Ok(None) | Err(_) => break,
        }
    }
    let mut rest = data;
    for _ in 0..64 {
        match decode_link(rest) {
            Ok(Some((frame, used))) => {
                assert!(used > courier_protocol::LENGTH_PREFIX_BYTES && used <= rest.len());
                let mut bytes = Vec::new();
                encode_link(&frame, &mut bytes).expect("a decoded link frame encodes");
                let (again, again_used) = decode_link(&bytes)
                    .expect("its encoding decodes")
                    .expect("its encoding is whole");
                assert_eq!(again, frame);
                assert_eq!(again_used, bytes.len());
                rest = &rest[used..];
            }
            Ok(None) | Err(_) => break,
        }
    }
});
