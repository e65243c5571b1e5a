//! Is the sender of a Unix datagram who its frame says, and may it be tracked? The one
//! decision both datapaths ask, whoever attested the sender (SCM_CREDENTIALS in userspace,
//! the filter's tgid in the kernel).
//!
//! The kernel tells us the sender's pid as the observer's pid namespace sees it. A sender in
//! the same namespace must frame exactly that pid. A sender in another namespace (a
//! container) frames the pid it sees in its own namespace, the last entry of its `NSpid`;
//! such a sender is tracked under the attested (host) pid, and only with
//! `--allow-cross-namespace-agents`. A sender already gone when we look is known only by the
//! attested pid, so its frame must carry that. The decision itself is
//! `varta_common::attest::decide`, the kernel's too. What /proc says of a datagram's sender,
//! bound to the process that sent it, is [`bound_sender`] (the userspace datapath's, and
//! the eBPF datapath's for what reached its socket before the filter).

use std::os::fd::OwnedFd;

use varta_common::{DropReason, attest, filter::NS_PER_CLOCK_TICK};

use crate::{
    sys::{
        clock::ClockSource,
        pidfd::ExitWatcher,
        process::StartTime,
        procfs::{self, Sender},
    },
    vocab::beat::SenderStart,
};

/// What an accepted sender is tracked as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attested {
    /// The attested pid, as the observer's namespace sees it.
    pub pid: u32,
    /// The sender lives in another pid namespace than the observer's.
    pub cross_namespace: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct Attestation {
    allow_cross_namespace: bool,
}

impl Attestation {
    pub fn new(allow_cross_namespace: bool) -> Self {
        Attestation {
            allow_cross_namespace,
        }
    }

    /// The namespace policy: may a sender from another pid namespace be tracked at all?
    pub fn admits(&self, cross_namespace: bool) -> Result<(), DropReason> {
        // Only the policy: a sender framing its own pid.
        attest::decide(0, 0, cross_namespace, self.allow_cross_namespace)
    }

    /// A frame claiming `frame_pid` from the sender the kernel attested as `attested_pid`,
    /// whose /proc entry said `sender` (`None`: already gone). A spoof is refused before
    /// the namespace policy is asked.
    pub fn check(
        &self,
        attested_pid: u32,
        sender: Option<&Sender>,
        frame_pid: u32,
    ) -> Result<Attested, DropReason> {
        let (honest_pid, cross_namespace) = match sender {
            Some(s) if s.cross_namespace => (s.own_pid, true),
            _ => (attested_pid, false),
        };
        attest::decide(
            frame_pid,
            honest_pid,
            cross_namespace,
            self.allow_cross_namespace,
        )?;
        Ok(Attested {
            pid: attested_pid,
            cross_namespace,
        })
    }
}

/// An arrival time is the kernel's realtime stamp moved onto the boot clock, off by
/// microseconds: this much slack keeps a sender that started in the tick of its frame's
/// arrival from looking younger than the frame.
const ARRIVAL_SLACK_NS: u64 = 1_000_000;

/// What /proc says of the process that sent a frame ([`bound_sender`]).
pub enum Bound {
    Sender {
        sender: Sender,
        start: SenderStart,
        /// Opened before the read, still holding the pid after it.
        pidfd: OwnedFd,
    },
    /// The sender is gone (its pid free, or taken by a younger process).
    Exited,
    /// /proc could not be read.
    Unknown,
}

impl Bound {
    /// What the attestation and the tracker take: the sender if known, its start.
    pub fn parts(&self) -> (Option<Sender>, SenderStart) {
        match self {
            Bound::Sender { sender, start, .. } => (Some(*sender), *start),
            Bound::Exited => (None, SenderStart::Exited),
            Bound::Unknown => (None, SenderStart::Unknown),
        }
    }
}

/// Reads a sender's namespace, `NSpid` and start time, bound to the process that sent a
/// frame arriving at `arrived_ns` (on `clock`). A pidfd opened first and still holding the
/// pid after the read says the read was of one process; that process sent the frame unless
/// it started after the frame arrived (the sender exited and its pid was taken since: any
/// process that takes a pid starts after the exit of the one that held it, and that one had
/// sent the frame). Start times count clock ticks, so a pid taken within the tick of the
/// arrival is not told apart (as on the eBPF datapath).
pub fn bound_sender(pid: u32, arrived_ns: u64, clock: ClockSource) -> Bound {
    let pidfd = match ExitWatcher::open(pid) {
        Ok(pidfd) => pidfd,
        // Nobody holds the pid: the sender is gone.
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Bound::Exited,
        Err(_) => return Bound::Unknown,
    };
    let read = procfs::sender(pid).ok().zip(StartTime::of(pid));
    if !ExitWatcher::holds_pid(&pidfd) {
        return Bound::Exited;
    }
    let Some((sender, started)) = read else {
        return Bound::Unknown;
    };
    let arrived_boot_ns = clock.to_boottime_ns(arrived_ns);
    if started.0 > arrived_boot_ns.saturating_add(ARRIVAL_SLACK_NS) / NS_PER_CLOCK_TICK {
        return Bound::Exited;
    }
    Bound::Sender {
        sender,
        start: SenderStart::from_record(started.0 as u32),
        pidfd,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(own_pid: u32) -> Sender {
        Sender {
            cross_namespace: true,
            own_pid,
        }
    }

    #[test]
    fn same_namespace_sender_must_frame_its_pid() {
        let a = Attestation::new(false);
        let me = Sender {
            cross_namespace: false,
            own_pid: 500,
        };
        assert_eq!(
            a.check(500, Some(&me), 500),
            Ok(Attested {
                pid: 500,
                cross_namespace: false
            })
        );
        assert_eq!(a.check(500, Some(&me), 501), Err(DropReason::Spoof));
        assert_eq!(a.check(500, None, 500).map(|x| x.pid), Ok(500), "gone");
        assert_eq!(a.check(500, None, 7), Err(DropReason::Spoof));
    }

    #[test]
    fn container_sender_frames_its_own_pid_and_needs_the_flag() {
        let strict = Attestation::new(false);
        let open = Attestation::new(true);
        let c = container(7);
        assert_eq!(strict.check(900, Some(&c), 7), Err(DropReason::Namespace));
        assert_eq!(
            open.check(900, Some(&c), 7),
            Ok(Attested {
                pid: 900,
                cross_namespace: true
            })
        );
        // Its host pid is not what it frames: a spoof, whatever the policy.
        assert_eq!(open.check(900, Some(&c), 900), Err(DropReason::Spoof));
        assert_eq!(strict.check(900, Some(&c), 8), Err(DropReason::Spoof));
        assert_eq!(strict.admits(true), Err(DropReason::Namespace));
        assert_eq!(strict.admits(false), Ok(()));
    }
}
