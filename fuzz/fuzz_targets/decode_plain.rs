//! The plain frame decoder on any input: it never panics; a frame it accepts encodes back
//! to the same bytes; and no single flipped bit of an accepted frame is accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use varta_common::{FRAME_LEN, Frame};

fuzz_target!(|data: &[u8]| {
    let Ok(buf) = <[u8; FRAME_LEN]>::try_from(data) else {
        // Only whole frames reach the decoder; still decode the first 32 bytes of longer
        // inputs, so the fuzzer explores the decoder whatever length it tries.
        if let Some(head) = data.get(..FRAME_LEN) {
            let _ = Frame::decode(head.try_into().unwrap());
        }
        return;
    };
    let Ok(frame) = Frame::decode(&buf) else {
        return;
    };
    assert_eq!(frame.encode(), buf, "an accepted frame has one encoding");
    for bit in 0..FRAME_LEN * 8 {
        let mut flipped = buf;
        flipped[bit / 8] ^= 1 << (bit % 8);
        assert!(
            Frame::decode(&flipped).is_err(),
            "bit {bit} flipped and still accepted"
        );
    }
});
