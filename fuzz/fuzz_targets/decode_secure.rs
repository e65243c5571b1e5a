//! The daemon's secure UDP decoder (`varta_watch::datapath::secure`) on any input: it never
//! panics; random bytes never authenticate; a frame sealed with a known key, shared or
//! master-derived, opens exactly when not one byte of it was changed; and the same frame a
//! second time is a replay.
#![no_main]

use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, aead::AeadInPlace};
use libfuzzer_sys::fuzz_target;
use varta_common::{DropReason, Frame, Status};
use varta_watch::{
    config::secure_keys::SecureKeys,
    datapath::secure::SecureDecoder,
};

const SHARED: [u8; 32] = [7; 32];
const MASTER: [u8; 32] = [9; 32];

fn decoder() -> SecureDecoder {
    SecureDecoder::new(SecureKeys {
        shared: vec![zeroize::Zeroizing::new(SHARED)],
        master: Some(zeroize::Zeroizing::new(MASTER)),
    })
}

fn byte(data: &[u8], at: usize) -> u8 {
    data.get(at).copied().unwrap_or(0)
}

/// A frame sealed as an agent seals it: `[agent_pid] iv_random iv_counter ciphertext tag`.
fn seal(frame: &Frame, iv: [u8; 12], master: bool) -> Vec<u8> {
    let key = if master {
        *SecureKeys::agent_key(&MASTER, frame.pid)
    } else {
        SHARED
    };
    let prefix = if master {
        frame.pid.to_le_bytes().to_vec()
    } else {
        Vec::new()
    };
    let mut sealed = frame.encode();
    let tag = ChaCha20Poly1305::new((&key).into())
        .encrypt_in_place_detached(Nonce::from_slice(&iv), &prefix, &mut sealed)
        .expect("32 bytes seal");
    [prefix, iv.to_vec(), sealed.to_vec(), tag.to_vec()].concat()
}

fuzz_target!(|data: &[u8]| {
    // Whatever arrives: no panic, and nothing a fuzzer can type authenticates.
    assert!(decoder().open(data).is_err(), "unsealed bytes were accepted");

    // A real frame, sealed, then perhaps one byte changed.
    let frame = Frame {
        status: Status::Ok,
        pid: 2 + u32::from_le_bytes([byte(data, 0), byte(data, 1), byte(data, 2), 0]),
        timestamp: u64::from(byte(data, 3)),
        nonce: 1 + u64::from(byte(data, 4)),
        payload: u32::from(byte(data, 5)),
    };
    let mut iv = [0u8; 12];
    for (i, b) in iv.iter_mut().enumerate() {
        *b = byte(data, 6 + i);
    }
    let master = byte(data, 18) & 1 == 1;
    let mut wire = seal(&frame, iv, master);
    let (at, flip) = (byte(data, 19) as usize % wire.len(), byte(data, 20));
    wire[at] ^= flip;
    let mut d = decoder();
    match d.open(&wire) {
        Ok(opened) => {
            assert_eq!(flip, 0, "a changed byte {at} was accepted");
            assert_eq!(opened, frame);
            assert_eq!(d.open(&wire), Err(DropReason::Replay), "a replay was accepted");
        }
        Err(refused) => assert_ne!(flip, 0, "an intact sealed frame was refused: {refused:?}"),
    }
});
