//! Property tests of the decoder. Its inputs cover every datagram length 0..=64, with most
//! weight on 32 bytes (the only length that reaches the decoder) and on near-valid frames:
//! a valid frame with one field replaced and the CRC resealed, so the checks behind the CRC
//! are exercised, not just the CRC.

use proptest::{prelude::*, strategy::ValueTree, test_runner::TestRunner};
use varta_common::{FRAME_LEN, Frame, Status, frame::seal};

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

/// The byte ranges of the fields a CRC covers: magic, version, status, pid, timestamp,
/// nonce, payload.
const FIELDS: [std::ops::Range<usize>; 7] = [0..2, 2..3, 3..4, 4..8, 8..16, 16..24, 24..28];

/// A valid frame with one field overwritten by arbitrary bytes (often a boundary value) and
/// the CRC resealed.
fn near_valid_frame() -> impl Strategy<Value = Vec<u8>> {
    let value = prop_oneof![
        Just(0u64),
        Just(1u64),
        Just(u64::MAX),
        Just(u64::from(u32::MAX)),
        any::<u64>(),
    ];
    (valid_frame(), 0..FIELDS.len(), value).prop_map(|(frame, field, value)| {
        let mut buf = frame.encode();
        let range = FIELDS[field].clone();
        let len = range.len();
        buf[range].copy_from_slice(&value.to_le_bytes()[..len]);
        seal(&mut buf);
        buf.to_vec()
    })
}

/// Datagrams as the socket hands them over: any length up to 64, 32 bytes most of the time.
fn datagram() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => (0usize..=64).prop_flat_map(|len| proptest::collection::vec(any::<u8>(), len)),
        3 => proptest::collection::vec(any::<u8>(), FRAME_LEN),
        5 => near_valid_frame(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn decode_inverts_encode(frame in valid_frame()) {
        prop_assert_eq!(Frame::decode(&frame.encode()), Ok(frame));
    }

    /// Only exactly 32 bytes reach the decoder (the rest is a length drop); whatever it
    /// accepts is canonical: re-encoding gives the same bytes.
    #[test]
    fn decode_accepts_only_what_it_would_encode(bytes in datagram()) {
        if let Ok(buf) = <[u8; FRAME_LEN]>::try_from(bytes.as_slice())
            && let Ok(frame) = Frame::decode(&buf)
        {
            prop_assert_eq!(frame.encode(), buf);
        }
    }

    #[test]
    fn any_single_bit_flip_in_the_covered_bytes_is_rejected(frame in valid_frame(), bit in 0usize..(28 * 8)) {
        let mut buf = frame.encode();
        buf[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(Frame::decode(&buf).is_err());
    }
}

/// The generator itself: every length 0..=64 occurs, 32 bytes dominate, and near-valid
/// frames are both accepted and rejected (so both outcomes are exercised).
#[test]
fn datagrams_cover_every_length_weighted_on_32_and_near_valid() {
    let mut runner = TestRunner::deterministic();
    let strategy = datagram();
    let mut by_len = [0usize; 65];
    let (mut accepted, mut rejected) = (0, 0);
    const N: usize = 20_000;
    for _ in 0..N {
        let bytes = strategy.new_tree(&mut runner).unwrap().current();
        by_len[bytes.len()] += 1;
        if let Ok(buf) = <[u8; FRAME_LEN]>::try_from(bytes.as_slice()) {
            match Frame::decode(&buf) {
                Ok(_) => accepted += 1,
                Err(_) => rejected += 1,
            }
        }
    }
    let missing: Vec<usize> = (0..=64).filter(|&l| by_len[l] == 0).collect();
    assert!(missing.is_empty(), "lengths never generated: {missing:?}");
    assert!(
        by_len[FRAME_LEN] * 2 > N,
        "32 bytes in {} of {N}",
        by_len[FRAME_LEN]
    );
    assert!(accepted * 10 > N, "accepted {accepted} of {N}");
    assert!(rejected * 10 > N, "rejected {rejected} of {N}");
}
