//! Every CRC and frame vector of the VLP v0.2 conformance file (a copy of
//! `shared/conformance/vlp-v0.2-vectors.json` lives in `data/`).

use serde_json::Value;
use varta_common::{DecodeError, Frame, Status, crc32c};

fn vectors() -> Value {
    let text = include_str!("../data/vlp-v0.2-vectors.json");
    serde_json::from_str(text).expect("vectors parse")
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn status(name: &str) -> Status {
    match name {
        "ok" => Status::Ok,
        "degraded" => Status::Degraded,
        "critical" => Status::Critical,
        other => panic!("unknown status {other}"),
    }
}

fn error(name: &str) -> DecodeError {
    *DecodeError::ALL
        .iter()
        .find(|e| format!("{e:?}") == name)
        .unwrap_or_else(|| panic!("unknown decode error {name}"))
}

#[test]
fn crc32c_vectors() {
    let v = vectors();
    let list = v["crc32c_vectors"].as_array().unwrap();
    assert!(list.len() >= 5);
    for case in list {
        let input = hex(case["input_hex"].as_str().unwrap());
        let expected = u32::from_str_radix(case["expected_crc_hex"].as_str().unwrap(), 16).unwrap();
        assert_eq!(crc32c::checksum(&input), expected, "{}", case["id"]);
    }
}

#[test]
fn frame_vectors() {
    let v = vectors();
    let (mut roundtrips, mut errors) = (0, 0);
    for case in v["frame_vectors"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        match case["kind"].as_str().unwrap() {
            "encode_decode_roundtrip" => {
                let i = &case["inputs"];
                let frame = Frame {
                    status: status(i["status"].as_str().unwrap()),
                    pid: i["pid"].as_u64().unwrap() as u32,
                    timestamp: i["timestamp"].as_u64().unwrap(),
                    nonce: i["nonce"].as_u64().unwrap(),
                    payload: i["payload"].as_u64().unwrap() as u32,
                };
                let wire = hex(case["expected_wire_hex"].as_str().unwrap());
                assert_eq!(frame.encode().as_slice(), wire.as_slice(), "{id}: encode");
                let buf: [u8; 32] = wire.try_into().unwrap();
                assert_eq!(Frame::decode(&buf), Ok(frame), "{id}: decode");
                roundtrips += 1;
            }
            "decode_error" => {
                let wire = hex(case["wire_hex"].as_str().unwrap());
                let buf: [u8; 32] = wire.try_into().unwrap();
                let expected = error(case["expected_decode_error"].as_str().unwrap());
                assert_eq!(Frame::decode(&buf), Err(expected), "{id}");
                errors += 1;
            }
            other => panic!("{id}: unknown vector kind {other}"),
        }
    }
    assert_eq!((roundtrips, errors), (6, 9));
}
