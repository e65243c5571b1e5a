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

/// L4: the pid of a first beat reused before /proc is read. With the start time the kernel
/// attested, the process /proc shows is not taken for the sender: neither its start time
/// nor its uid becomes the agent's (so it is never recovered, nor charged to that uid).
#[test]
fn a_pid_reused_before_the_first_read_never_lends_its_process() {
    let mut t = Tracker::new(8, EvictionPolicy::Strict, T);
    // Whoever holds the pid now started at tick 0x1_0000_0200 and belongs to uid 0.
    t.read_start_times(|_| Some(StartTime(0x1_0000_0200)));
    t.read_uids(8, |_| Some(0));
    // The sender started at another tick: the pid was reused since its beat.
    t.record_attested(10, &frame(10, 1), UDS, 0, SenderStart::Ticks(0x100))
        .unwrap();
    let agent = t.get(10).unwrap();
    assert_eq!((agent.started, agent.uid), (None, None));
    assert_eq!(t.of_uid(0), 0);
    assert_eq!(
        Continuity::of(agent.started, Some(StartTime(0x1_0000_0200))),
        Continuity::Reused,
        "recovery refuses it"
    );
    // A sender known to have exited before it was read: whatever holds the pid is not it.
    t.record_attested(12, &frame(12, 1), UDS, 0, SenderStart::Exited)
        .unwrap();
    assert_eq!(t.get(12).map(|a| (a.started, a.uid)), Some((None, None)));
    // The sender itself (the low 32 bits of its start time attested): known as it is.
    t.record_attested(11, &frame(11, 1), UDS, 0, SenderStart::Ticks(0x200))
        .unwrap();
    let agent = t.get(11).unwrap();
    assert_eq!(
        (agent.started, agent.uid),
        (Some(StartTime(0x1_0000_0200)), Some(0))
    );
}

/// Without an attested start time, the uid read counts only if the pid held the same
/// process before and after it.
#[test]
fn a_pid_reused_during_the_read_lends_no_uid() {
    let reads = Arc::new(AtomicU64::new(0));
    let mut t = Tracker::new(8, EvictionPolicy::Strict, T);
    // The first read shows the sender (tick 100), every later one another process.
    let n = reads.clone();
    t.read_start_times(move |_| {
        let ticks = if n.fetch_add(1, Ordering::Relaxed) == 0 {
            100
        } else {
            200
        };
        Some(StartTime(ticks))
    });
    t.read_uids(8, |_| Some(0));
    t.record(10, &frame(10, 1), UDS, 0).unwrap();
    let agent = t.get(10).unwrap();
    assert_eq!((agent.started, agent.uid), (Some(StartTime(100)), None));
    assert_eq!(t.of_uid(0), 0);
}
