//! The VLP v0.2 frame: 32 bytes, little-endian.
//!
//! ```text
//! 0..2 magic "VA" | 2 version 2 | 3 status | 4..8 pid u32 | 8..16 timestamp u64
//! 16..24 nonce u64 | 24..28 payload u32 | 28..32 CRC-32C over bytes 0..28
//! ```

use crate::crc32c;

pub const FRAME_LEN: usize = 32;
/// Secure UDP frames (AEAD-wrapped): shared-key and master-key forms, in bytes.
pub const SECURE_FRAME_LENS: [u32; 2] = [
    crate::secure::SECURE_FRAME_LEN as u32,
    crate::secure::SECURE_MASTER_FRAME_LEN as u32,
];
/// What precedes the frame in a UDP datagram as a socket filter sees it.
pub const UDP_HEADER_LEN: u32 = 8;
pub const MAGIC: [u8; 2] = [0x56, 0x41];
pub const VERSION: u8 = 2;
/// With status Critical this nonce marks the panic-terminal frame: the agent is dying.
pub const NONCE_TERMINAL: u64 = u64::MAX;
/// Where the CRC-32C sits: it covers the bytes before it.
pub const CRC_OFFSET: usize = 28;

#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Ok = 0,
    Degraded = 1,
    Critical = 2,
    /// Observer-only: the observer's verdict on a silent agent, never valid on the wire.
    Stall = 3,
}

impl Status {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Status::Ok),
            1 => Some(Status::Degraded),
            2 => Some(Status::Critical),
            3 => Some(Status::Stall),
            _ => None,
        }
    }

    /// Lower-case name, as the export file and logs spell it.
    pub const fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Degraded => "degraded",
            Status::Critical => "critical",
            Status::Stall => "stall",
        }
    }
}

/// Decode failures in the normative order: the first failing check wins.
/// [`crate::DropReason::Decode`] carries them; its indices follow from these.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecodeError {
    BadMagic,
    BadVersion,
    BadCrc,
    BadStatus,
    StallOnWire,
    BadPid,
    BadTimestamp,
    BadNonce,
}

impl DecodeError {
    pub const COUNT: usize = 8;

    /// Every error, in the normative order (`ALL[e.index()] == e`).
    pub const ALL: [DecodeError; Self::COUNT] = [
        DecodeError::BadMagic,
        DecodeError::BadVersion,
        DecodeError::BadCrc,
        DecodeError::BadStatus,
        DecodeError::StallOnWire,
        DecodeError::BadPid,
        DecodeError::BadTimestamp,
        DecodeError::BadNonce,
    ];

    pub const fn index(self) -> usize {
        self as usize
    }

    /// snake_case name: the `kind` label of `varta_decode_errors_total`.
    pub const fn name(self) -> &'static str {
        match self {
            DecodeError::BadMagic => "bad_magic",
            DecodeError::BadVersion => "bad_version",
            DecodeError::BadCrc => "bad_crc",
            DecodeError::BadStatus => "bad_status",
            DecodeError::StallOnWire => "stall_on_wire",
            DecodeError::BadPid => "bad_pid",
            DecodeError::BadTimestamp => "bad_timestamp",
            DecodeError::BadNonce => "bad_nonce",
        }
    }
}

/// A decoded, valid VLP v0.2 frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub status: Status,
    pub pid: u32,
    pub timestamp: u64,
    pub nonce: u64,
    pub payload: u32,
}

impl Frame {
    /// The panic-terminal marker: Critical with nonce u64::MAX.
    pub const fn is_panic_terminal(&self) -> bool {
        matches!(self.status, Status::Critical) && self.nonce == NONCE_TERMINAL
    }

    /// Serialises the frame, CRC included. Encodes any field values; whether they decode
    /// is [`Frame::decode`]'s business (tests encode invalid frames on purpose).
    pub fn encode(&self) -> [u8; FRAME_LEN] {
        let mut buf = [0u8; FRAME_LEN];
        buf[0..2].copy_from_slice(&MAGIC);
        buf[2] = VERSION;
        buf[3] = self.status as u8;
        buf[4..8].copy_from_slice(&self.pid.to_le_bytes());
        buf[8..16].copy_from_slice(&self.timestamp.to_le_bytes());
        buf[16..24].copy_from_slice(&self.nonce.to_le_bytes());
        buf[24..28].copy_from_slice(&self.payload.to_le_bytes());
        seal(&mut buf);
        buf
    }

    /// Decodes in the normative order: BadMagic, BadVersion, BadCrc, BadStatus, StallOnWire,
    /// BadPid, BadTimestamp, BadNonce.
    #[inline(always)]
    pub fn decode(buf: &[u8; FRAME_LEN]) -> Result<Frame, DecodeError> {
        Self::decode_checking_crc(buf, true)
    }

    /// A frame the socket filter accepted (a ring record: the filter ran [`Frame::decode`]
    /// over these very bytes): every check but the CRC's, which the filter computed. The
    /// CRC is the decode's costliest part (a table lookup per byte, one after another).
    #[inline(always)]
    pub fn decode_accepted(buf: &[u8; FRAME_LEN]) -> Result<Frame, DecodeError> {
        Self::decode_checking_crc(buf, false)
    }

    #[inline(always)]
    fn decode_checking_crc(buf: &[u8; FRAME_LEN], crc: bool) -> Result<Frame, DecodeError> {
        if buf[0] != MAGIC[0] || buf[1] != MAGIC[1] {
            return Err(DecodeError::BadMagic);
        }
        if buf[2] != VERSION {
            return Err(DecodeError::BadVersion);
        }
        if crc && crc_of(buf) != read_u32(buf, CRC_OFFSET) {
            return Err(DecodeError::BadCrc);
        }
        let status = match Status::from_u8(buf[3]) {
            None => return Err(DecodeError::BadStatus),
            Some(Status::Stall) => return Err(DecodeError::StallOnWire),
            Some(s) => s,
        };
        let pid = read_u32(buf, 4);
        if pid <= 1 {
            return Err(DecodeError::BadPid);
        }
        let timestamp = read_u64(buf, 8);
        if timestamp == u64::MAX {
            return Err(DecodeError::BadTimestamp);
        }
        let nonce = read_u64(buf, 16);
        if nonce == NONCE_TERMINAL && !matches!(status, Status::Critical) {
            return Err(DecodeError::BadNonce);
        }
        Ok(Frame {
            status,
            pid,
            timestamp,
            nonce,
            payload: read_u32(buf, 24),
        })
    }
}

/// Recomputes and stores the CRC of a raw frame (tests forge frames with it).
pub fn seal(buf: &mut [u8; FRAME_LEN]) {
    let crc = crc_of(buf);
    buf[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
}

#[inline(always)]
fn crc_of(buf: &[u8; FRAME_LEN]) -> u32 {
    // A fixed trip count over a fixed-size array: the verifier sees a bounded loop and every
    // table index is masked to 0..256. Four bytes a step (`crc32c::step4`).
    const _: () = assert!(CRC_OFFSET.is_multiple_of(4));
    let mut state = !0u32;
    let mut i = 0;
    while i < CRC_OFFSET {
        // One load, not `read_u32`'s four bytes: in the eBPF filter, whose copy of the frame
        // is 8-aligned, LLVM keeps a word assembled from bytes as four loads and shifts.
        // SAFETY: i + 4 <= CRC_OFFSET < FRAME_LEN: four bytes inside `buf`, read unaligned.
        let word = unsafe { buf.as_ptr().add(i).cast::<u32>().read_unaligned() };
        state = crc32c::step4(state, u32::from_le(word));
        i += 4;
    }
    !state
}

#[inline(always)]
fn read_u32(buf: &[u8; FRAME_LEN], at: usize) -> u32 {
    u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

#[inline(always)]
fn read_u64(buf: &[u8; FRAME_LEN], at: usize) -> u64 {
    let mut b = [0u8; 8];
    let mut i = 0;
    while i < 8 {
        b[i] = buf[at + i];
        i += 1;
    }
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_terminal_is_valid_only_with_critical() {
        let f = Frame {
            status: Status::Critical,
            pid: 7,
            timestamp: 0,
            nonce: u64::MAX,
            payload: 0,
        };
        assert_eq!(Frame::decode(&f.encode()), Ok(f));
        assert!(f.is_panic_terminal());
        let g = Frame {
            status: Status::Degraded,
            ..f
        };
        assert_eq!(Frame::decode(&g.encode()), Err(DecodeError::BadNonce));
    }

    proptest::proptest! {
        /// What the filter accepts, the daemon reads back as the same frame without its CRC.
        #[test]
        fn decode_accepted_agrees_with_decode_on_sealed_frames(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), FRAME_LEN),
            valid_head in proptest::prelude::any::<bool>(),
        ) {
            let mut buf: [u8; FRAME_LEN] = bytes.try_into().unwrap();
            if valid_head {
                buf[..3].copy_from_slice(&[MAGIC[0], MAGIC[1], VERSION]);
                buf[3] %= 4;
            }
            seal(&mut buf);
            proptest::prop_assert_eq!(Frame::decode_accepted(&buf), Frame::decode(&buf));
        }
    }

    /// A valid Ok frame of pid 9, encoded.
    fn ok_frame() -> [u8; FRAME_LEN] {
        Frame {
            status: Status::Ok,
            pid: 9,
            timestamp: 1,
            nonce: 1,
            payload: 0,
        }
        .encode()
    }

    #[test]
    fn decode_accepted_skips_only_the_crc() {
        let mut buf = ok_frame();
        buf[31] ^= 1;
        assert_eq!(Frame::decode(&buf), Err(DecodeError::BadCrc));
        assert!(Frame::decode_accepted(&buf).is_ok());
        buf[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(Frame::decode_accepted(&buf), Err(DecodeError::BadPid));
    }

    #[test]
    fn first_failure_wins() {
        // Bad magic and bad CRC together: magic is checked first.
        let mut buf = ok_frame();
        buf[0] = 0;
        buf[31] ^= 1;
        assert_eq!(Frame::decode(&buf), Err(DecodeError::BadMagic));
        // Stall status with a correct CRC and a bad pid: StallOnWire precedes BadPid.
        let f = Frame {
            status: Status::Stall,
            pid: 0,
            timestamp: 1,
            nonce: 1,
            payload: 0,
        };
        assert_eq!(Frame::decode(&f.encode()), Err(DecodeError::StallOnWire));
    }
}
