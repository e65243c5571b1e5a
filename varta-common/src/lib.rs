//! Types both sides of the kernel boundary compile: the VLP v0.2 wire format, its CRC-32C,
//! the drop reasons that both datapaths count, the attestation decision and the token buckets
//! (admission) both apply, and the records and map values the eBPF
//! program exchanges with the daemon.
#![no_std]

pub mod attest;
pub mod cbpf;
pub mod crc32c;
pub mod drop;
pub mod filter;
pub mod frame;
pub mod ratelimit;
pub mod secure;
pub mod wakeup;

pub use drop::DropReason;
pub use frame::{DecodeError, FRAME_LEN, Frame, Status};
pub use secure::{SECURE_FRAME_LEN, SECURE_MASTER_FRAME_LEN};
