//! Property tests of the two rules both datapaths take from `varta-common`: the attestation
//! decision (`attest::decide`) and the admission sequence (`ratelimit::admit`), run by the
//! eBPF filter on its maps and by the daemon on its own buckets.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use varta_common::{
    DropReason,
    attest::decide,
    ratelimit::{Buckets, Limit, admit},
};

/// Buckets as the daemon keeps them, and which agents are tracked.
#[derive(Default)]
struct Model {
    agents: HashMap<u64, u64>,
    global: u64,
    tracked: HashSet<u64>,
}

impl Buckets for Model {
    type Cell<'a> = &'a mut u64;

    fn agent(&mut self, key: u64) -> Option<&mut u64> {
        self.agents.get_mut(&key)
    }

    fn create(&mut self, key: u64, tat: u64) {
        assert!(self.agents.insert(key, tat).is_none(), "created twice");
    }

    fn tracked(&mut self, key: u64) -> bool {
        self.tracked.contains(&key)
    }

    fn global(&mut self) -> Option<&mut u64> {
        Some(&mut self.global)
    }
}

fn limit() -> impl Strategy<Value = Option<Limit>> {
    prop_oneof![
        Just(None),
        (1u32..50, 0u32..10).prop_map(|(r, b)| Limit::new(r, b))
    ]
}

/// Beats: agent key, whether it is tracked from then on, gap since the previous beat.
fn beats() -> impl Strategy<Value = Vec<(u64, bool, u64)>> {
    proptest::collection::vec((0u64..6, any::<bool>(), 0u64..200_000_000), 1..300)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Accepted exactly when the frame carries the sender's own pid and the namespace policy
    /// allows it; a lie is a spoof whatever the policy.
    #[test]
    fn attestation(frame in 0u32..4, honest in 0u32..4, cross: bool, allow: bool) {
        let got = decide(frame, honest, cross, allow);
        let want = if frame != honest {
            Err(DropReason::Spoof)
        } else if cross && !allow {
            Err(DropReason::Namespace)
        } else {
            Ok(())
        };
        prop_assert_eq!(got, want);
    }

    /// The sequence: a first beat creates the agent's bucket and says so, once; the per-agent
    /// bucket refuses first; a tracked agent with a per-agent limit is never charged to the
    /// global bucket; without limits everything is admitted; and each bucket admits no more
    /// than it would alone.
    #[test]
    fn admission(per_agent in limit(), global in limit(), beats in beats()) {
        let mut m = Model::default();
        let mut now = 1_000_000_000u64;
        let mut seen = HashSet::new();
        let mut alone: HashMap<u64, u64> = HashMap::new();
        for (key, track, gap) in beats {
            now += gap;
            let tracked = m.tracked.contains(&key);
            let global_before = m.global;
            let got = admit(&mut m, key, per_agent, global, now);
            prop_assert!(m.agents.contains_key(&key), "every beat leaves a bucket");
            let first = seen.insert(key);
            // The agent's own bucket, taken alone: its verdict comes first.
            let own = per_agent.is_none_or(|l| l.take(alone.entry(key).or_insert(0), now));
            match got {
                Ok(was_first) => {
                    prop_assert_eq!(was_first, first);
                    prop_assert!(own);
                }
                Err(DropReason::RatePerPid) => {
                    prop_assert!(!own && !first, "a first beat takes from a full bucket");
                    prop_assert_eq!(m.global, global_before, "refused before the global bucket");
                }
                Err(DropReason::RateGlobal) => {
                    prop_assert!(own && global.is_some());
                    prop_assert!(!(tracked && per_agent.is_some()), "tracked agents are exempt");
                }
                Err(other) => prop_assert!(false, "{other:?}"),
            }
            if per_agent.is_none() && global.is_none() {
                prop_assert!(got.is_ok());
            }
            if track {
                m.tracked.insert(key);
            }
        }
    }
}
