//! Property tests of the decoder.

use proptest::prelude::*;
use varta_common::{FRAME_LEN, Frame, Status};

fn valid_frame() -> impl Strategy<Value = Frame> {
    (0u8..3, 2u32.., 0u64..u64::MAX, any::<u64>(), any::<u32>()).prop_map(
        |(status, pid, timestamp, nonce, payload)| {
            let status = Status::from_u8(status).unwrap();
            // u64::MAX is a valid nonce only as the Critical panic-terminal marker.
            let nonce = if nonce == u64::MAX && status != Status::Critical {
                0
            } else {
                nonce
            };
            Frame {
                status,
                pid,
                timestamp,
                nonce,
                payload,
            }
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn decode_inverts_encode(frame in valid_frame()) {
        prop_assert_eq!(Frame::decode(&frame.encode()), Ok(frame));
    }

    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        // Any length: only exactly 32 bytes reach the decoder, the rest is a length error.
        if let Ok(buf) = <[u8; FRAME_LEN]>::try_from(bytes.as_slice()) {
            let _ = Frame::decode(&buf);
        }
    }

    #[test]
    fn any_single_bit_flip_in_the_covered_bytes_is_rejected(frame in valid_frame(), bit in 0usize..(28 * 8)) {
        let mut buf = frame.encode();
        buf[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(Frame::decode(&buf).is_err());
    }
}
