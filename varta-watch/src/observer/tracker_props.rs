//! Property tests of the tracker: no sequence of beats, stalls, evictions, exits, restarts
//! and replays breaks its invariants.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use varta_common::{Frame, Status};

use crate::{
    config::cli::EvictionPolicy,
    observer::tracker::{Accepted, Tracker},
    vocab::beat::Origin,
};

const T: u64 = 1_000;
const UDS: Origin = Origin::Uds {
    cross_namespace: false,
};

#[derive(Debug, Clone)]
enum Op {
    /// A beat from `pid` with the next nonce, `dt` after the previous op.
    Beat { pid: u32, dt: u64 },
    /// Nonce 1 again: a restart.
    Restart { pid: u32, dt: u64 },
    /// The panic-terminal frame.
    Exit { pid: u32, dt: u64 },
    /// A replayed (old) nonce.
    Replay { pid: u32 },
    /// Time passes; due stalls are surfaced.
    Expire { dt: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    let pid = 1u32..12;
    let dt = prop_oneof![Just(0u64), 0..T / 2, 0..3 * T];
    prop_oneof![
        4 => (pid.clone(), dt.clone()).prop_map(|(pid, dt)| Op::Beat { pid, dt }),
        1 => (pid.clone(), dt.clone()).prop_map(|(pid, dt)| Op::Restart { pid, dt }),
        1 => (pid.clone(), dt.clone()).prop_map(|(pid, dt)| Op::Exit { pid, dt }),
        1 => pid.prop_map(|pid| Op::Replay { pid }),
        3 => dt.prop_map(|dt| Op::Expire { dt }),
    ]
}

fn frame(pid: u32, nonce: u64, status: Status) -> Frame {
    Frame {
        status,
        pid,
        timestamp: 0,
        nonce,
        payload: 0,
    }
}

/// What the test knows of each tracked agent.
#[derive(Debug, Default, Clone)]
struct Model {
    nonce: u64,
    last_beat: u64,
    stalled: bool,
    dead: bool,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn invariants_hold_for_any_sequence(
        capacity in 1usize..6,
        balanced in any::<bool>(),
        ops in prop::collection::vec(op(), 1..200),
    ) {
        let policy = if balanced { EvictionPolicy::Balanced } else { EvictionPolicy::Strict };
        let mut t = Tracker::new(capacity, policy, T);
        let mut model: HashMap<u32, Model> = HashMap::new();
        let mut now = 0u64;
        for op in ops {
            let (pid, nonce, status) = match op {
                Op::Beat { pid, dt } => {
                    now += dt;
                    let next = model.get(&pid).map_or(1, |m| m.nonce.min(u64::MAX - 2) + 1);
                    (pid, next, Status::Ok)
                }
                Op::Restart { pid, dt } => { now += dt; (pid, 1, Status::Ok) }
                Op::Exit { pid, dt } => { now += dt; (pid, u64::MAX, Status::Critical) }
                Op::Replay { pid } => {
                    let Some(m) = model.get(&pid) else { continue };
                    if m.nonce <= 1 || m.nonce == u64::MAX { continue; }
                    let r = t.record(pid, &frame(pid, m.nonce, Status::Ok), UDS, now);
                    prop_assert!(r.is_err(), "a replayed nonce was accepted: {r:?}");
                    continue;
                }
                Op::Expire { dt } => {
                    now += dt;
                    let mut out = Vec::new();
                    t.expire(now, &mut out);
                    let mut seen = HashSet::new();
                    for s in &out {
                        prop_assert!(seen.insert(s.pid), "two stalls for {} at once", s.pid);
                        let m = model.get_mut(&s.pid).expect("a stall for an unknown agent");
                        prop_assert!(!m.stalled, "a second stall in one silence for {}", s.pid);
                        prop_assert!(!m.dead, "a stall after the panic-terminal frame");
                        prop_assert!(m.last_beat + T <= now, "a stall before its deadline");
                        m.stalled = true;
                    }
                    // No stall is missed: every watched agent silent past T is stalled now.
                    for (pid, m) in &model {
                        if !m.dead && m.last_beat + T <= now {
                            prop_assert!(m.stalled, "agent {pid} silent past T not stalled");
                        }
                    }
                    continue;
                }
            };
            match t.record(pid, &frame(pid, nonce, status), UDS, now) {
                Ok(accepted) => {
                    if let Accepted::New { evicted: Some(old) } = accepted {
                        let m = model.remove(&old).expect("evicted an unknown agent");
                        if !balanced {
                            prop_assert!(m.stalled || m.dead, "strict evicted a live agent");
                        }
                    }
                    if matches!(accepted, Accepted::New { .. }) {
                        prop_assert!(!model.contains_key(&pid));
                    }
                    model.insert(pid, Model {
                        nonce,
                        last_beat: now,
                        stalled: false,
                        dead: status == Status::Critical,
                    });
                }
                Err(reason) => {
                    // Only a full tracker or a nonce that is not new may refuse.
                    let known = model.get(&pid);
                    prop_assert!(
                        known.is_some() || t.len() == capacity,
                        "refused {pid} ({reason:?}) with room left"
                    );
                }
            }
            let (evictable, deadlines) = t.queue_lens();
            prop_assert!(t.len() <= t.capacity());
            prop_assert_eq!(t.len(), model.len());
            prop_assert!(evictable <= capacity, "eviction queue {evictable} > {capacity}");
            prop_assert!(deadlines <= 2 * capacity, "deadline heap {deadlines}");
            for (state, n) in t.counts() {
                let counted = t
                    .agents()
                    .filter(|(_, a)| crate::observer::tracker::AgentState::of(a) == state)
                    .count();
                prop_assert_eq!(n, counted, "{:?} agents counted as they changed", state);
            }
        }
    }
}
