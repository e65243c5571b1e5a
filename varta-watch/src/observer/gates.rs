//! The admission gate both datapaths share after attestation: the pid_max gate. (The
//! namespace policy is part of attestation: `datapath::attest`.)

use varta_common::DropReason;

use crate::{sys::procfs, vocab::beat::Beat};

/// pid_max is re-read at most this often (ns), and only when a beat arrives (no timer). Timed
/// by the beats' own receive stamps: a clock read per beat was a tenth of the daemon's CPU.
const PID_MAX_REFRESH_NS: u64 = 5_000_000_000;

pub struct Gates {
    pid_max: u32,
    /// On the beats' clock; 0 until the first beat, which reads it again.
    pid_max_read_ns: u64,
}

impl Gates {
    pub fn new() -> Self {
        Gates {
            pid_max: read_pid_max(),
            pid_max_read_ns: 0,
        }
    }

    pub fn pid_max(&self) -> u32 {
        self.pid_max
    }

    pub fn check(&mut self, beat: &Beat) -> Result<(), DropReason> {
        if beat.recv_ns.saturating_sub(self.pid_max_read_ns) >= PID_MAX_REFRESH_NS {
            self.pid_max = read_pid_max();
            self.pid_max_read_ns = beat.recv_ns;
        }
        if beat.frame.pid > self.pid_max {
            return Err(DropReason::PidMax);
        }
        Ok(())
    }
}

fn read_pid_max() -> u32 {
    // Without /proc the gate cannot know the limit and stays open.
    procfs::pid_max().unwrap_or(u32::MAX)
}
