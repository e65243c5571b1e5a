//! Child processes the tests start (agents, senders, namespaced commands): a guard that kills
//! and reaps its process when dropped, so a failing test leaves nothing beating.

use std::process::{Child, Command, ExitStatus, Output};

pub struct Proc {
    child: Option<Child>,
    what: String,
}

impl Proc {
    #[track_caller]
    pub fn spawn(cmd: &mut Command) -> Proc {
        let what = format!("{cmd:?}");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        Proc {
            child: Some(child),
            what,
        }
    }

    /// Its piped stderr, to read from another thread.
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.as_mut()?.stderr.take()
    }

    pub fn pid(&self) -> u32 {
        self.child().id()
    }

    fn child(&self) -> &Child {
        self.child.as_ref().expect("not yet reaped")
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child, which has not been reaped (we hold it).
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// Whether it was reaped already.
    pub fn reaped(&self) -> bool {
        self.child.is_none()
    }

    /// Reaps it if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("not yet reaped");
        let status = child
            .try_wait()
            .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.what))?;
        self.child = None;
        Some(status)
    }

    /// Waits for it to exit by itself (a process that ends on its own, e.g. a sender).
    pub fn wait(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("not yet reaped");
        child
            .wait()
            .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.what))
    }

    /// Waits for it to exit by itself and asserts it succeeded.
    #[track_caller]
    pub fn wait_success(self) {
        let what = self.what.clone();
        let status = self.wait();
        assert!(status.success(), "{what}: {status}");
    }

    /// Waits for it to exit by itself, collecting its piped output. The status is the
    /// caller's to judge, with the output in its message (a failing run says why).
    #[track_caller]
    pub fn wait_with_output(mut self) -> Output {
        let child = self.child.take().expect("not yet reaped");
        child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.what))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Context switches (voluntary and involuntary) of all of `pid`'s threads: how often it woke.
pub fn context_switches(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|t| {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .map(|l| l.split_whitespace().last().unwrap().parse::<u64>().unwrap())
                .sum::<u64>()
        })
        .sum()
}
