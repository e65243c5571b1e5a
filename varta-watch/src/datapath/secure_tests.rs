use chacha20poly1305::aead::AeadInPlace;
use serde_json::Value;
use zeroize::Zeroizing;

use super::*;
use crate::vocab::drops::DropCounters;

fn vectors() -> Vec<Value> {
    let all: Value = serde_json::from_str(include_str!(
        "../../../varta-common/data/vlp-v0.2-vectors.json"
    ))
    .unwrap();
    all["secure_frame_vectors"].as_array().unwrap().clone()
}

fn hex(v: &Value) -> Vec<u8> {
    let s = v.as_str().unwrap();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn key(v: &Value) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(hex(v).try_into().unwrap())
}

fn decoder_for(v: &Value) -> SecureDecoder {
    let mut keys = SecureKeys::default();
    match v["kind"].as_str().unwrap() {
        "shared_key_seal" => keys.shared.push(key(&v["key_hex"])),
        _ => keys.master = Some(key(&v["master_key_hex"])),
    }
    SecureDecoder::new(keys)
}

fn seal_vectors() -> Vec<Value> {
    let seals: Vec<Value> = vectors()
        .into_iter()
        .filter(|v| v["kind"] != "kdf_agent_key")
        .collect();
    assert_eq!(seals.len(), 2, "a shared-key and a master-key vector");
    seals
}

#[test]
fn every_vector_decrypts_to_its_frame() {
    for v in seal_vectors() {
        let wire = hex(&v["expected_wire_hex"]);
        let frame = decoder_for(&v).open(&wire).unwrap();
        assert_eq!(
            frame.encode().to_vec(),
            hex(&v["plaintext_hex"]),
            "{}",
            v["id"]
        );
    }
}

#[test]
fn agent_keys_are_derived_as_the_vectors_say() {
    for v in vectors() {
        let (id, expected) = match v["kind"].as_str().unwrap() {
            "kdf_agent_key" => (v["agent_id"].as_u64(), &v["expected_okm_hex"]),
            "master_key_seal" => (v["agent_pid"].as_u64(), &v["derived_agent_key_hex"]),
            _ => continue,
        };
        let derived = SecureKeys::agent_key(&key(&v["master_key_hex"]), id.unwrap() as u32);
        assert_eq!(derived.to_vec(), hex(expected), "{}", v["id"]);
    }
}

#[test]
fn every_tampered_byte_is_refused_and_counted() {
    let drops = DropCounters::default();
    let mut refused = 0;
    for v in seal_vectors() {
        let wire = hex(&v["expected_wire_hex"]);
        for i in 0..wire.len() {
            for bit in [0x01, 0x80] {
                let mut bad = wire.clone();
                bad[i] ^= bit;
                let err = decoder_for(&v).open(&bad).unwrap_err();
                assert_eq!(err, DropReason::Auth, "{} byte {i}", v["id"]);
                drops.add(err);
                refused += 1;
            }
        }
        // Truncated or extended: not a secure frame at all.
        assert_eq!(decoder_for(&v).open(&wire[1..]), Err(DropReason::Length));
    }
    // Counted where every other drop is, by its reason.
    assert_eq!(drops.snapshot()[DropReason::Auth.index()], refused);
}

#[test]
fn a_replayed_or_older_counter_is_refused() {
    for v in seal_vectors() {
        let wire = hex(&v["expected_wire_hex"]);
        let mut decoder = decoder_for(&v);
        decoder.open(&wire).unwrap();
        assert_eq!(decoder.open(&wire), Err(DropReason::Replay), "{}", v["id"]);
    }
}

/// Seals `frame` with `key` the way a shared-key client does.
fn seal(key: &[u8; 32], iv_random: [u8; 8], counter: u32, frame: &Frame) -> Vec<u8> {
    let mut nonce = [0u8; 12];
    nonce[..8].copy_from_slice(&iv_random);
    nonce[8..].copy_from_slice(&counter.to_le_bytes());
    let mut body = frame.encode();
    let tag = ChaCha20Poly1305::new(key.into())
        .encrypt_in_place_detached(Nonce::from_slice(&nonce), b"", &mut body)
        .unwrap();
    [&nonce[..], &body[..], tag.as_slice()].concat()
}

#[test]
fn rotation_accepts_every_listed_key_and_nothing_else() {
    let frame =
        Frame::decode(&hex(&seal_vectors()[0]["plaintext_hex"]).try_into().unwrap()).unwrap();
    let mut keys = SecureKeys::default();
    keys.shared.push(Zeroizing::new([1; 32]));
    keys.shared.push(Zeroizing::new([2; 32]));
    let mut decoder = SecureDecoder::new(keys);
    assert!(decoder.open(&seal(&[1; 32], [1; 8], 0, &frame)).is_ok());
    assert!(decoder.open(&seal(&[2; 32], [2; 8], 0, &frame)).is_ok());
    assert_eq!(
        decoder.open(&seal(&[3; 32], [3; 8], 0, &frame)),
        Err(DropReason::Auth)
    );
}

#[test]
fn session_state_is_bounded_and_forgets_the_least_recent() {
    let mut decoder = SecureDecoder::new(SecureKeys::default());
    let first = (0, 0, [0xff; 8]);
    decoder.fresh(first, 5).unwrap();
    for i in 0..SESSIONS as u64 {
        decoder.fresh((0, 0, i.to_le_bytes()), 0).unwrap();
        // Keep one old session recent: it must survive.
        decoder.fresh((0, 1, [0; 8]), i as u32 + 1).unwrap();
    }
    assert!(decoder.last_counter.len() <= SESSIONS);
    assert!(decoder.order.len() <= 2 * SESSIONS + 1);
    // The first session was evicted (its counter forgotten); the recent one was not.
    assert!(!decoder.last_counter.contains_key(&first));
    assert_eq!(decoder.fresh((0, 1, [0; 8]), 1), Err(DropReason::Replay));
}

/// L7: a frame accepted before a restart is a replay after it, when the next instance took
/// over the sessions; by key, whatever slot the key holds then, and only keys still held.
#[test]
fn sessions_outlive_the_decoder() {
    for v in seal_vectors() {
        let wire = hex(&v["expected_wire_hex"]);
        let mut before = decoder_for(&v);
        before.open(&wire).unwrap();
        let saved = before.sessions();
        assert_eq!(saved.len(), 1);

        let mut after = decoder_for(&v);
        // Another key first: the session's key moved to another slot.
        after.keys.shared.insert(0, Zeroizing::new([0x11; 32]));
        after.restore_sessions(&saved);
        assert_eq!(after.open(&wire), Err(DropReason::Replay), "{}", v["id"]);

        // A decoder without the session's key takes nothing over.
        let mut other = SecureDecoder::new(SecureKeys {
            shared: vec![Zeroizing::new([0x11; 32])],
            master: Some(Zeroizing::new([0x22; 32])),
        });
        other.restore_sessions(&saved);
        assert!(other.sessions().is_empty());
    }
}
