//! The admission gate both datapaths share after attestation: the pid_max gate. (The
//! namespace policy is part of attestation: `datapath::attest`.)

use std::time::{Duration, Instant};

use varta_common::DropReason;

use crate::{datapath::Beat, sys::procfs};

/// pid_max is re-read at most this often, and only when a beat arrives (no timer).
const PID_MAX_REFRESH: Duration = Duration::from_secs(5);

pub struct Gates {
    pid_max: u32,
    pid_max_read_at: Instant,
}

impl Gates {
    pub fn new() -> Self {
        Gates {
            pid_max: read_pid_max(),
            pid_max_read_at: Instant::now(),
        }
    }

    pub fn pid_max(&self) -> u32 {
        self.pid_max
    }

    pub fn check(&mut self, beat: &Beat) -> Result<(), DropReason> {
        if self.pid_max_read_at.elapsed() >= PID_MAX_REFRESH {
            self.pid_max = read_pid_max();
            self.pid_max_read_at = Instant::now();
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
