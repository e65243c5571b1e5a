//! Unit tests of the tracker (see also `tracker_props`).
use super::*;

pub(super) const T: u64 = 1_000;

pub(super) fn frame(pid: u32, nonce: u64) -> Frame {
    Frame {
        status: Status::Ok,
        pid,
        timestamp: 0,
        nonce,
        payload: 0,
    }
}

pub(super) const UDS: Origin = Origin::Uds {
    cross_namespace: false,
};

pub(super) fn stalls(t: &mut Tracker, now: u64) -> Vec<u32> {
    let mut out = Vec::new();
    t.expire(now, &mut out);
    out.into_iter().map(|s| s.pid).collect()
}

#[test]
fn one_stall_per_silence_and_rearm_on_beat() {
    let mut t = Tracker::new(8, EvictionPolicy::Strict, T);
    t.record(10, &frame(10, 1), UDS, 0).unwrap();
    assert_eq!(t.next_deadline(), Some(T));
    t.record(10, &frame(10, 2), UDS, 500).unwrap();
    assert!(
        stalls(&mut t, T).is_empty(),
        "the beat at 500 moved the deadline"
    );
    assert_eq!(t.next_deadline(), Some(500 + T));
    assert_eq!(stalls(&mut t, 1500), vec![10]);
    assert!(
        stalls(&mut t, 10_000).is_empty(),
        "exactly once per silence"
    );
    assert_eq!(t.next_deadline(), None, "nothing to wake up for");
    assert_eq!(
        t.record(10, &frame(10, 3), UDS, 20_000),
        Ok(Accepted::Resumed)
    );
    assert_eq!(stalls(&mut t, 20_000 + T), vec![10]);
}

#[test]
fn settling_moves_deadlines_of_agents_that_beat_and_leaves_due_ones() {
    let mut t = Tracker::new(8, EvictionPolicy::Strict, T);
    t.record(10, &frame(10, 1), UDS, 0).unwrap();
    t.record(11, &frame(11, 1), UDS, 0).unwrap();
    t.record(10, &frame(10, 2), UDS, T / 2).unwrap();
    // At T both deadlines come due; agent 10 beat since: only 11's decision is due.
    t.settle(T);
    assert_eq!(t.next_deadline(), Some(T));
    assert_eq!(stalls(&mut t, T), vec![11]);
    // Now only 10's stale-free deadline is left, half a threshold on; settling changes none.
    t.settle(T + 1);
    assert_eq!(t.next_deadline(), Some(T + T / 2));
    assert!(stalls(&mut t, T + 1).is_empty());
}

#[test]
fn a_new_threshold_moves_pending_deadlines() {
    let mut t = Tracker::new(8, EvictionPolicy::Strict, 10 * T);
    t.record(10, &frame(10, 1), UDS, 0).unwrap();
    t.set_threshold_ns(T);
    assert_eq!(t.next_deadline(), Some(T));
    assert_eq!(stalls(&mut t, T), vec![10]);
}

#[test]
fn nonce_rules() {
    let mut t = Tracker::new(8, EvictionPolicy::Strict, T);
    t.record(10, &frame(10, 5), UDS, 0).unwrap();
    assert_eq!(t.record(10, &frame(10, 5), UDS, 1), Err(DropReason::Replay));
    assert_eq!(t.record(10, &frame(10, 4), UDS, 1), Err(DropReason::Replay));
    assert_eq!(t.record(10, &frame(10, 1), UDS, 2), Ok(Accepted::Restarted));
    assert_eq!(
        t.record(10, &frame(10, 1), UDS, 3),
        Err(DropReason::Replay),
        "duplicate of the session start"
    );
    assert_eq!(
        t.record(10, &frame(10, u64::MAX - 1), UDS, 4),
        Ok(Accepted::Beat)
    );
    assert_eq!(t.record(10, &frame(10, 0), UDS, 5), Ok(Accepted::Wrapped));
    assert_eq!(t.record(10, &frame(10, 1), UDS, 6), Ok(Accepted::Beat));
    let udp = Origin::Udp {
        source: "127.0.0.1:9".parse().unwrap(),
    };
    assert_eq!(
        t.record(10, &frame(10, 7), udp, 7),
        Err(DropReason::OriginConflict)
    );
}

#[test]
fn a_udp_claim_gives_way_to_the_attested_local_process() {
    let mut t = Tracker::new(8, EvictionPolicy::Strict, T);
    let udp = Origin::Udp {
        source: "127.0.0.1:9".parse().unwrap(),
    };
    t.record(20, &frame(20, 1_000), udp, 0).unwrap();
    // Whatever the claim's nonce, the local agent under that pid is taken in.
    assert_eq!(t.record(20, &frame(20, 1), UDS, 1), Ok(Accepted::Replaced));
    assert_eq!(t.get(20).unwrap().origin, UDS);
    // And from then on the claim is the one refused.
    assert_eq!(
        t.record(20, &frame(20, 2_000), udp, 2),
        Err(DropReason::OriginConflict)
    );
}

#[test]
fn panic_terminal_suppresses_the_stall() {
    let mut t = Tracker::new(8, EvictionPolicy::Strict, T);
    t.record(10, &frame(10, 1), UDS, 0).unwrap();
    let terminal = Frame {
        status: Status::Critical,
        nonce: u64::MAX,
        ..frame(10, 0)
    };
    t.record(10, &terminal, UDS, 10).unwrap();
    assert!(t.get(10).unwrap().dead);
    assert!(stalls(&mut t, 100 * T).is_empty());
    assert_eq!(
        t.record(10, &frame(10, 1), UDS, 200 * T),
        Ok(Accepted::Restarted)
    );
    assert_eq!(stalls(&mut t, 201 * T), vec![10]);
}

#[test]
fn strict_evicts_only_stalled_agents() {
    let mut t = Tracker::new(2, EvictionPolicy::Strict, T);
    t.record(10, &frame(10, 1), UDS, 0).unwrap();
    t.record(11, &frame(11, 1), UDS, 500).unwrap();
    assert_eq!(
        t.record(12, &frame(12, 1), UDS, 600),
        Err(DropReason::Capacity)
    );
    assert_eq!(stalls(&mut t, 1200), vec![10]);
    assert_eq!(
        t.record(12, &frame(12, 1), UDS, 1200),
        Ok(Accepted::New { evicted: Some(10) })
    );
    assert_eq!(t.len(), 2);
}

#[test]
fn balanced_evicts_the_agent_silent_longest() {
    let mut t = Tracker::new(2, EvictionPolicy::Balanced, T);
    t.record(10, &frame(10, 1), UDS, 0).unwrap();
    t.record(11, &frame(11, 1), UDS, 100).unwrap();
    t.record(10, &frame(10, 2), UDS, 200).unwrap();
    // 11 is now the one silent longest, although 10's queue entry is older.
    assert_eq!(
        t.record(12, &frame(12, 1), UDS, 300),
        Ok(Accepted::New { evicted: Some(11) })
    );
    assert!(t.get(11).is_none());
    assert_eq!(stalls(&mut t, 200 + T), vec![10]);
}

/// A tracker whose pids 100..199 are uid 1000's and 200..299 uid 2000's.
fn two_tenants(capacity: usize, per_uid: usize, policy: EvictionPolicy) -> Tracker {
    let mut t = Tracker::new(capacity, policy, T);
    t.read_uids(per_uid, |pid| Some(if pid < 200 { 1000 } else { 2000 }));
    t
}

#[test]
fn one_uid_cannot_take_the_tracker_from_another() {
    for policy in [EvictionPolicy::Strict, EvictionPolicy::Balanced] {
        let mut t = two_tenants(4, 2, policy);
        // Alone, uid 1000 may fill the tracker.
        for (i, pid) in [100, 101, 102, 103].into_iter().enumerate() {
            assert!(t.record(pid, &frame(pid, 1), UDS, i as u64).is_ok());
        }
        // uid 2000 is under its quota: the agent of uid 1000 silent longest makes room.
        assert_eq!(
            t.record(200, &frame(200, 1), UDS, 10),
            Ok(Accepted::New { evicted: Some(100) }),
            "{policy:?}"
        );
        assert_eq!(
            t.record(201, &frame(201, 1), UDS, 11),
            Ok(Accepted::New { evicted: Some(101) }),
            "{policy:?}"
        );
        // Now both are at their quota: uid 1000's churn is refused, never evicts uid 2000.
        assert_eq!(
            t.record(104, &frame(104, 1), UDS, 12),
            Err(DropReason::Capacity),
            "{policy:?}"
        );
        assert_eq!((t.of_uid(1000), t.of_uid(2000)), (2, 2));
        // A stalled agent of its own makes room for its new one, not uid 2000's stall.
        t.record(103, &frame(103, 2), UDS, T / 2).unwrap();
        t.record(201, &frame(201, 2), UDS, T / 2).unwrap();
        assert_eq!(stalls(&mut t, T + 10), vec![102, 200]);
        assert_eq!(
            t.record(104, &frame(104, 1), UDS, 2 * T),
            Ok(Accepted::New { evicted: Some(102) }),
            "{policy:?}"
        );
        assert!(t.get(200).is_some_and(|a| a.stalled));
    }
}

#[test]
fn a_full_tracker_takes_room_from_the_largest_tenant_first() {
    let mut t = two_tenants(4, 3, EvictionPolicy::Strict);
    // uid 2000's agent stalls first (the oldest candidate), then one of uid 1000's.
    t.record(200, &frame(200, 1), UDS, 0).unwrap();
    for pid in [100, 101, 102] {
        t.record(pid, &frame(pid, 1), UDS, T / 2).unwrap();
    }
    t.record(101, &frame(101, 2), UDS, T).unwrap();
    t.record(102, &frame(102, 2), UDS, T).unwrap();
    assert_eq!(stalls(&mut t, T), vec![200]);
    assert_eq!(stalls(&mut t, 3 * T / 2), vec![100]);
    // A new agent of uid 2000: uid 1000 has the most agents and gives up its stalled one;
    // uid 2000's stall stays tracked.
    assert_eq!(
        t.record(201, &frame(201, 1), UDS, 2 * T),
        Ok(Accepted::New { evicted: Some(100) })
    );
    assert!(t.get(200).is_some_and(|a| a.stalled));
    let by_state: Vec<_> = t.counts().iter().map(|(_, n)| *n).collect();
    assert_eq!(by_state, [3, 1, 0]);
}

#[test]
fn beats_the_kernel_held_move_the_deadline_and_never_go_back() {
    let mut t = Tracker::new(8, EvictionPolicy::Strict, T);
    t.record(10, &frame(10, 5), UDS, 0).unwrap();
    assert!(t.fold(10, &frame(10, 9), 600), "a live agent");
    assert_eq!(stalls(&mut t, T), Vec::<u32>::new(), "its held beat at 600");
    assert_eq!(
        t.get(10).map(|a| (a.last_nonce, a.last_beat_ns)),
        Some((9, 600))
    );
    // The ring brought a later beat before the fold was taken: nothing goes back, and the
    // next beat of the ring is no replay.
    t.record(10, &frame(10, 12), UDS, 900).unwrap();
    assert!(t.fold(10, &frame(10, 11), 800));
    assert_eq!(
        t.get(10).map(|a| (a.last_nonce, a.last_beat_ns)),
        Some((12, 900))
    );
    assert_eq!(t.record(10, &frame(10, 13), UDS, 950), Ok(Accepted::Beat));
    assert_eq!(stalls(&mut t, 950 + T), vec![10]);
    assert!(
        !t.fold(10, &frame(10, 14), 2500),
        "stalled: taken as a beat"
    );
    assert!(!t.fold(11, &frame(11, 2), 2500), "unknown: taken as a beat");
}
