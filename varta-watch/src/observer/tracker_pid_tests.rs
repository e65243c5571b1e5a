//! The tracker's rule for pids taken over by another process (see the module comment).

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use super::tests::{T, UDS, frame, stalls};
use super::*;

#[test]
fn a_restart_from_another_process_is_a_new_agent() {
    let start = Arc::new(AtomicU64::new(100));
    let mut t = Tracker::new(8, EvictionPolicy::Strict, T);
    let now = start.clone();
    t.read_start_times(move |_| Some(StartTime(now.load(Ordering::Relaxed))));
    t.record(10, &frame(10, 1), UDS, 0).unwrap();
    t.record(10, &frame(10, 5), UDS, 1).unwrap();
    assert_eq!(t.get(10).unwrap().started, Some(StartTime(100)));
    // The same process starting a new session: a restart.
    assert_eq!(t.record(10, &frame(10, 1), UDS, 2), Ok(Accepted::Restarted));
    assert_eq!(stalls(&mut t, 2 + T), vec![10]);
    // The pid now held by another process: a new agent, not the stalled one resuming.
    start.store(200, Ordering::Relaxed);
    assert_eq!(
        t.record(10, &frame(10, 2), UDS, 3 * T),
        Ok(Accepted::Replaced)
    );
    let agent = t.get(10).unwrap();
    assert_eq!(
        (agent.started, agent.stalled),
        (Some(StartTime(200)), false)
    );
    assert_eq!(t.len(), 1);
    // Its own silence is surfaced once, on its own deadline.
    assert_eq!(stalls(&mut t, 4 * T), vec![10]);
    assert!(stalls(&mut t, 10 * T).is_empty());
    // An ordinary beat is not checked (no /proc read per beat); a restart is.
    start.store(300, Ordering::Relaxed);
    assert_eq!(
        t.record(10, &frame(10, 1), UDS, 11 * T),
        Ok(Accepted::Replaced)
    );
    assert_eq!(t.record(10, &frame(10, 2), UDS, 11 * T), Ok(Accepted::Beat));
    // The old agent sent only nonce 1: the new process's nonce 1 is no replay.
    t.record(11, &frame(11, 1), UDS, 12 * T).unwrap();
    start.store(400, Ordering::Relaxed);
    assert_eq!(
        t.record(11, &frame(11, 1), UDS, 12 * T),
        Ok(Accepted::Replaced)
    );
    assert_eq!(
        t.record(11, &frame(11, 1), UDS, 12 * T),
        Err(DropReason::Replay)
    );
    // The process gone when looked at: the same agent (nothing else holds the pid).
    let mut gone = Tracker::new(8, EvictionPolicy::Strict, T);
    gone.record(10, &frame(10, 3), UDS, 0).unwrap();
    assert_eq!(
        gone.record(10, &frame(10, 1), UDS, 1),
        Ok(Accepted::Restarted)
    );
}
