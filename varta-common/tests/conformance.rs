//! Every CRC and frame vector of the VLP v0.2 conformance file (a copy of
//! `shared/conformance/vlp-v0.2-vectors.json` lives in `data/`).

// Shared with the end-to-end harness, which uses what this test does not.
#[allow(dead_code, reason = "the harness uses the rest of the module")]
mod support;

use support::vectors::{FrameVector, vectors};
use varta_common::{DecodeError, Frame, crc32c};

fn error(name: &str) -> DecodeError {
    *DecodeError::ALL
        .iter()
        .find(|e| format!("{e:?}") == name)
        .unwrap_or_else(|| panic!("unknown decode error {name}"))
}

#[test]
fn crc32c_vectors() {
    let list = vectors().crc32c;
    assert!(list.len() >= 5);
    for case in list {
        assert_eq!(crc32c::checksum(&case.input), case.crc, "{}", case.id);
    }
}

#[test]
fn frame_vectors() {
    let (mut roundtrips, mut errors) = (0, 0);
    for case in vectors().frames {
        match case {
            FrameVector::Roundtrip { id, frame, wire } => {
                assert_eq!(frame.encode().as_slice(), wire.as_slice(), "{id}: encode");
                let buf: [u8; 32] = wire.try_into().unwrap();
                assert_eq!(Frame::decode(&buf), Ok(frame), "{id}: decode");
                roundtrips += 1;
            }
            FrameVector::DecodeError {
                id,
                error: name,
                wire,
            } => {
                let buf: [u8; 32] = wire.try_into().unwrap();
                assert_eq!(Frame::decode(&buf), Err(error(&name)), "{id}");
                errors += 1;
            }
        }
    }
    assert_eq!((roundtrips, errors), (6, 9));
}
