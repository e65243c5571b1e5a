//! Why a datagram was not accepted. Both datapaths count with these indices: the eBPF program
//! in a per-CPU array, the daemon in its own counters; the exporter adds the two.

use crate::frame::DecodeError;

#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Datagram length other than 32 bytes.
    Length = 0,
    BadMagic = 1,
    BadVersion = 2,
    BadCrc = 3,
    BadStatus = 4,
    StallOnWire = 5,
    BadPid = 6,
    BadTimestamp = 7,
    BadNonce = 8,
    /// The frame's pid is not the kernel-attested sender's.
    Spoof = 9,
    /// Sender in another pid namespace without `--allow-cross-namespace-agents`.
    Namespace = 10,
    /// Frame pid above the kernel's pid_max.
    PidMax = 11,
    RatePerPid = 12,
    RateGlobal = 13,
    /// Tracker full and nothing evictable.
    Capacity = 14,
    /// Nonce not above the agent's last one (duplicate or replay).
    Replay = 15,
    /// A pid first seen on one transport beating on another.
    OriginConflict = 16,
    /// The eBPF ring buffer had no room for the record.
    RingbufFull = 17,
    /// Cross-namespace sender whose identity the daemon has not verified yet.
    AttestPending = 18,
}

impl DropReason {
    pub const COUNT: usize = 19;

    pub const ALL: [DropReason; Self::COUNT] = [
        DropReason::Length,
        DropReason::BadMagic,
        DropReason::BadVersion,
        DropReason::BadCrc,
        DropReason::BadStatus,
        DropReason::StallOnWire,
        DropReason::BadPid,
        DropReason::BadTimestamp,
        DropReason::BadNonce,
        DropReason::Spoof,
        DropReason::Namespace,
        DropReason::PidMax,
        DropReason::RatePerPid,
        DropReason::RateGlobal,
        DropReason::Capacity,
        DropReason::Replay,
        DropReason::OriginConflict,
        DropReason::RingbufFull,
        DropReason::AttestPending,
    ];

    pub const fn index(self) -> usize {
        self as usize
    }

    pub const fn from_decode(e: DecodeError) -> DropReason {
        DropReason::ALL[e as usize]
    }

    /// The decode error this reason stands for, if it is one.
    pub const fn decode_error(self) -> Option<DecodeError> {
        let i = self as usize;
        if i >= 1 && i <= 8 {
            Some(DecodeError::ALL[i - 1])
        } else {
            None
        }
    }

    /// The `reason` label of `varta_frames_dropped_total`; every decode error is `decode`
    /// there (its kind is in `varta_decode_errors_total`).
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::Length => "length",
            DropReason::BadMagic
            | DropReason::BadVersion
            | DropReason::BadCrc
            | DropReason::BadStatus
            | DropReason::StallOnWire
            | DropReason::BadPid
            | DropReason::BadTimestamp
            | DropReason::BadNonce => "decode",
            DropReason::Spoof => "spoof",
            DropReason::Namespace => "namespace",
            DropReason::PidMax => "pid_max",
            DropReason::RatePerPid => "rate_per_pid",
            DropReason::RateGlobal => "rate_global",
            DropReason::Capacity => "capacity",
            DropReason::Replay => "replay",
            DropReason::OriginConflict => "origin_conflict",
            DropReason::RingbufFull => "ringbuf_full",
            DropReason::AttestPending => "attest_pending",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_dense_and_decode_errors_line_up() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        for e in DecodeError::ALL {
            let r = DropReason::from_decode(e);
            assert_eq!(r.decode_error(), Some(e));
            assert_eq!(r.name(), "decode");
        }
        assert_eq!(DropReason::Spoof.decode_error(), None);
        assert_eq!(DropReason::Length.decode_error(), None);
    }
}
