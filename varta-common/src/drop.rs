//! Why a datagram was not accepted. Both datapaths count with these indices: the eBPF program
//! in a per-CPU array, the daemon in its own counters; the exporter adds the two.

use crate::frame::DecodeError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Datagram length other than 32 bytes.
    Length,
    /// The frame failed VLP v0.2 decoding.
    Decode(DecodeError),
    /// The frame's pid is not the kernel-attested sender's.
    Spoof,
    /// Sender in another pid namespace without `--allow-cross-namespace-agents`.
    Namespace,
    /// Frame pid above the kernel's pid_max.
    PidMax,
    RatePerPid,
    RateGlobal,
    /// Tracker full and nothing evictable.
    Capacity,
    /// Nonce not above the agent's last one (duplicate or replay).
    Replay,
    /// A pid first seen on one transport beating on another.
    OriginConflict,
    /// The eBPF ring buffer had no room for the record.
    RingbufFull,
    /// Cross-namespace sender whose identity the daemon has not verified yet.
    AttestPending,
    /// A plaintext UDP frame on a port that accepts only secure (authenticated) frames.
    Plaintext,
    /// A secure UDP frame no key authenticated.
    Auth,
    /// An authenticated secure UDP frame whose plaintext is not a valid frame of its sender.
    Decrypt,
}

/// The reasons after the decode errors, in index order.
const AFTER_DECODE: [DropReason; 13] = [
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
    DropReason::Plaintext,
    DropReason::Auth,
    DropReason::Decrypt,
];

/// Index of the first reason after the decode errors.
const AFTER_DECODE_START: usize = 1 + DecodeError::COUNT;

impl DropReason {
    pub const COUNT: usize = AFTER_DECODE_START + AFTER_DECODE.len();

    /// Every reason in index order (`ALL[r.index()] == r`): length, the decode errors in their
    /// normative order, then the rest.
    pub const ALL: [DropReason; Self::COUNT] = {
        let mut all = [DropReason::Length; Self::COUNT];
        let mut i = 0;
        while i < DecodeError::COUNT {
            all[1 + i] = DropReason::Decode(DecodeError::ALL[i]);
            i += 1;
        }
        let mut j = 0;
        while j < AFTER_DECODE.len() {
            all[AFTER_DECODE_START + j] = AFTER_DECODE[j];
            j += 1;
        }
        all
    };

    /// The slot of this reason in the kernel's and the daemon's counter arrays.
    pub const fn index(self) -> usize {
        let after = match self {
            DropReason::Length => return 0,
            DropReason::Decode(e) => return 1 + e.index(),
            DropReason::Spoof => 0,
            DropReason::Namespace => 1,
            DropReason::PidMax => 2,
            DropReason::RatePerPid => 3,
            DropReason::RateGlobal => 4,
            DropReason::Capacity => 5,
            DropReason::Replay => 6,
            DropReason::OriginConflict => 7,
            DropReason::RingbufFull => 8,
            DropReason::AttestPending => 9,
            DropReason::Plaintext => 10,
            DropReason::Auth => 11,
            DropReason::Decrypt => 12,
        };
        AFTER_DECODE_START + after
    }

    pub const fn from_decode(e: DecodeError) -> DropReason {
        DropReason::Decode(e)
    }

    /// The `reason` label of `varta_frames_dropped_total`; every decode error is `decode`
    /// there (its kind is in `varta_decode_errors_total`).
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::Length => "length",
            DropReason::Decode(_) => "decode",
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
            DropReason::Plaintext => "plaintext",
            DropReason::Auth => "auth",
            DropReason::Decrypt => "decrypt",
        }
    }
}

impl From<DecodeError> for DropReason {
    fn from(e: DecodeError) -> Self {
        DropReason::Decode(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_dense_and_follow_the_decode_errors() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?}");
        }
        for (i, e) in DecodeError::ALL.into_iter().enumerate() {
            assert_eq!(e.index(), i);
            let r = DropReason::from_decode(e);
            assert_eq!(r.index(), 1 + i);
            assert_eq!(r.name(), "decode");
        }
        // The counters the kernel already wrote keep their meaning: the layout is part of the
        // kernel boundary.
        assert_eq!(DropReason::Spoof.index(), 9);
        assert_eq!(DropReason::AttestPending.index(), 18);
        assert_eq!(DropReason::Plaintext.index(), 19);
        assert_eq!(DropReason::Decrypt.index(), 21);
        assert_eq!(DropReason::COUNT, 22);
    }
}
