//! File descriptors. At start the daemon raises its `RLIMIT_NOFILE` soft limit to the hard
//! limit. Descriptors held for a long time on behalf of senders (the pidfds that watch
//! attested senders for their exit) draw on a budget of half of what is left after
//! [`RESERVE`]; the reserve stays free for what must always work: recovery commands
//! (their pidfd, pipes and /dev/null), the export and audit files, /metrics connections
//! (at most `daemon::http_conn::MAX_CONNECTIONS`), sockets and the eBPF objects.

use std::{
    io,
    sync::atomic::{AtomicUsize, Ordering},
};

/// Descriptors never handed to per-sender watchers.
pub const RESERVE: usize = 128;

/// Watcher descriptors still available.
static WATCH_BUDGET: AtomicUsize = AtomicUsize::new(0);

/// The limits after raising: (soft, hard), and the watcher budget set from them.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub soft: u64,
    pub hard: u64,
    pub watch_budget: usize,
}

/// Raises the soft limit to the hard one and sets the watcher budget.
pub fn raise() -> io::Result<Limits> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the live struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit from the live struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    let budget = watch_budget(lim.rlim_cur);
    WATCH_BUDGET.store(budget, Ordering::Relaxed);
    Ok(Limits {
        soft: lim.rlim_cur,
        hard: lim.rlim_max,
        watch_budget: budget,
    })
}

fn watch_budget(soft: u64) -> usize {
    let soft = usize::try_from(soft).unwrap_or(usize::MAX);
    soft.saturating_sub(RESERVE) / 2
}

/// One descriptor of the watcher budget, given back when dropped.
#[derive(Debug)]
pub struct WatchSlot(());

impl WatchSlot {
    /// A slot, or `None` when the budget is spent.
    pub fn take() -> Option<WatchSlot> {
        WATCH_BUDGET
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .ok()
            .map(|_| WatchSlot(()))
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        WATCH_BUDGET.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_of_what_the_reserve_leaves() {
        assert_eq!(watch_budget(256), 64);
        assert_eq!(watch_budget(1024), 448);
        assert_eq!(watch_budget(64), 0);
    }
}
