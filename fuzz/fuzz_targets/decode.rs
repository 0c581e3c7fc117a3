//! The frame decoder on arbitrary bytes, read back to back as a stream reader does: it never
//! panics, never claims more bytes than it was given, and what it decodes re-encodes to the same
//! frame.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    for _ in 0..64 {
        match courier_protocol::decode(rest) {
            Ok(Some((frame, used))) => {
                assert!(used > courier_protocol::LENGTH_PREFIX_BYTES && used <= rest.len());
                let bytes = courier_protocol::encode_to_vec(&frame).expect("a decoded frame encodes");
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
});
