//! The VLP v0.2 conformance vectors (`data/vlp-v0.2-vectors.json`) and the hex they spell
//! bytes in: the one reader both the conformance test and the end-to-end harness use
//! (the harness includes this file with `#[path]`).

use serde_json::Value;
use varta_common::{Frame, Status};

/// `"5641"` -> `[0x56, 0x41]`; panics on odd length or a non-hex digit (test data only).
pub fn hex_decode(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd-length hex: {s}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or_else(|_| panic!("not hex: {s}")))
        .collect()
}

/// `[0x56, 0x41]` -> `"5641"`.
pub fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub struct CrcVector {
    pub id: String,
    pub input: Vec<u8>,
    pub crc: u32,
}

pub enum FrameVector {
    Roundtrip {
        id: String,
        frame: Frame,
        wire: Vec<u8>,
    },
    /// `error` is the `DecodeError` variant's name, e.g. `BadMagic`.
    DecodeError {
        id: String,
        error: String,
        wire: Vec<u8>,
    },
}

pub struct Vectors {
    pub crc32c: Vec<CrcVector>,
    pub frames: Vec<FrameVector>,
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("vector field {key} is not a string: {v}"))
}

fn number(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("vector field {key} is not a number: {v}"))
}

fn status(name: &str) -> Status {
    match name {
        "ok" => Status::Ok,
        "degraded" => Status::Degraded,
        "critical" => Status::Critical,
        other => panic!("unknown status {other}"),
    }
}

fn frame_vector(case: &Value) -> FrameVector {
    let id = text(case, "id").to_owned();
    match text(case, "kind") {
        "encode_decode_roundtrip" => {
            let i = &case["inputs"];
            FrameVector::Roundtrip {
                frame: Frame {
                    status: status(text(i, "status")),
                    pid: u32::try_from(number(i, "pid")).unwrap(),
                    timestamp: number(i, "timestamp"),
                    nonce: number(i, "nonce"),
                    payload: u32::try_from(number(i, "payload")).unwrap(),
                },
                wire: hex_decode(text(case, "expected_wire_hex")),
                id,
            }
        }
        "decode_error" => FrameVector::DecodeError {
            error: text(case, "expected_decode_error").to_owned(),
            wire: hex_decode(text(case, "wire_hex")),
            id,
        },
        other => panic!("{id}: unknown vector kind {other}"),
    }
}

/// Every vector of the file, parsed.
pub fn vectors() -> Vectors {
    let v: Value = serde_json::from_str(include_str!("../../data/vlp-v0.2-vectors.json"))
        .expect("the vectors file parses");
    let list = |key: &str| {
        v[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} is not a list"))
            .clone()
    };
    Vectors {
        crc32c: list("crc32c_vectors")
            .iter()
            .map(|c| CrcVector {
                id: text(c, "id").to_owned(),
                input: hex_decode(text(c, "input_hex")),
                crc: u32::from_str_radix(text(c, "expected_crc_hex"), 16).unwrap(),
            })
            .collect(),
        frames: list("frame_vectors").iter().map(frame_vector).collect(),
    }
}

/// `(expected decode error name, wire bytes)` of every decode-error vector.
pub fn decode_error_vectors() -> Vec<(String, Vec<u8>)> {
    vectors()
        .frames
        .into_iter()
        .filter_map(|f| match f {
            FrameVector::DecodeError { error, wire, .. } => Some((error, wire)),
            FrameVector::Roundtrip { .. } => None,
        })
        .collect()
}

/// The secure-frame vectors (`secure_frame_vectors`), as JSON: shared-key and master-key
/// seals and the agent-key derivation.
pub fn secure_vectors() -> Vec<Value> {
    let v: Value = serde_json::from_str(include_str!("../../data/vlp-v0.2-vectors.json"))
        .expect("the vectors file is JSON");
    v["secure_frame_vectors"]
        .as_array()
        .expect("secure_frame_vectors is an array")
        .clone()
}
