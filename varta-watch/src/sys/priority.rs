//! The observer's own CPU share. On a node whose workloads saturate the CPUs the observer
//! must still be scheduled to drain beats, or it falls behind the very agents it watches; a
//! lower nice value gives it a larger CFS share (each step about 1.25x).

use std::io;

use crate::sys::logger::event;

/// Sets this process's nice value (threads started later inherit it). Lowering it below the
/// current value needs CAP_SYS_NICE: without it the daemon says so in one line and goes on.
pub fn set_nice(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: setpriority has no memory preconditions; `who` 0 is the calling thread, which
    // starts every other thread of the daemon afterwards.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc == 0 {
        event!(info, "priority", nice = nice);
    } else {
        let e = io::Error::last_os_error();
        event!(
            warn,
            "priority_unchanged",
            nice = nice,
            reason = format!("{e}: lowering the nice value needs CAP_SYS_NICE"),
        );
    }
}
