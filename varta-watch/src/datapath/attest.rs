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
//! `varta_common::attest::decide`, the kernel's too.

use varta_common::{DropReason, attest};

use crate::sys::procfs::Sender;

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
