//! Rate limits of the userspace datapath: the same integer buckets the eBPF filter applies
//! (`varta_common::ratelimit`), admitted by the same sequence (`ratelimit::admit`), with
//! their clocks in a map here instead of in kernel maps.

use std::collections::HashMap;

use varta_common::{
    DropReason,
    ratelimit::{self, Limit, is_full},
};

use crate::config::Limits;

pub struct RateLimiter {
    limits: Limits,
    /// Each agent's bucket clock by agent key (absent: a full bucket).
    per_agent: HashMap<u64, u64>,
    global: u64,
    /// Above this many per-agent buckets, full ones are forgotten (they equal a new one).
    max_buckets: usize,
}

impl RateLimiter {
    pub fn new(limits: Limits, max_agents: usize) -> Self {
        RateLimiter {
            limits,
            per_agent: HashMap::new(),
            global: 0,
            max_buckets: max_agents * 4 + 1024,
        }
    }

    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// One beat of the agent `key` (`Beat::agent_key`); `tracked`: the observer tracks it,
    /// so the global bucket does not apply (`global_applies`).
    pub fn check(&mut self, key: u64, tracked: bool, now_ns: u64) -> Result<(), DropReason> {
        let l = &self.limits;
        let (per_agent, global) = (
            Limit::new(l.per_pid_rate, l.per_pid_burst()),
            Limit::new(l.global_rate, l.global_burst),
        );
        let mut buckets = Buckets {
            limiter: self,
            tracked,
            now_ns,
        };
        ratelimit::admit(&mut buckets, key, per_agent, global, now_ns).map(|_first| ())
    }
}

/// The buckets of `ratelimit::admit` for one beat: the limiter's, and whether the observer
/// tracks the agent.
struct Buckets<'l> {
    limiter: &'l mut RateLimiter,
    tracked: bool,
    now_ns: u64,
}

impl ratelimit::Buckets for Buckets<'_> {
    type Cell<'a>
        = &'a mut u64
    where
        Self: 'a;

    fn agent(&mut self, key: u64) -> Option<&mut u64> {
        self.limiter.per_agent.get_mut(&key)
    }

    fn create(&mut self, key: u64, tat: u64) {
        let buckets = &mut self.limiter.per_agent;
        if buckets.len() >= self.limiter.max_buckets {
            buckets.retain(|_, tat| !is_full(*tat, self.now_ns));
        }
        buckets.insert(key, tat);
    }

    fn tracked(&mut self, _key: u64) -> bool {
        self.tracked
    }

    fn global(&mut self) -> Option<&mut u64> {
        Some(&mut self.limiter.global)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_pid: u32, global: u32, burst: u32) -> Limits {
        Limits {
            threshold_ms: 1000,
            per_pid_rate: per_pid,
            global_rate: global,
            global_burst: burst,
        }
    }

    #[test]
    fn per_pid_bucket_allows_burst_then_rate() {
        let mut r = RateLimiter::new(limits(10, 0, 0), 8);
        let admitted = (0..100).filter(|_| r.check(7, false, 0).is_ok()).count();
        assert_eq!(admitted, 10, "one second of burst");
        assert_eq!(r.check(7, false, 0), Err(DropReason::RatePerPid));
        assert!(
            r.check(8, false, 0).is_ok(),
            "another agent has its own bucket"
        );
        assert!(
            r.check(7, false, 100_000_000).is_ok(),
            "one token per 100 ms"
        );
        assert!(r.check(7, false, 100_000_000).is_err());
    }

    #[test]
    fn global_bucket_spans_agents() {
        let mut r = RateLimiter::new(limits(0, 5, 3), 8);
        let admitted = (0..10u64)
            .filter(|p| r.check(*p + 2, false, 0).is_ok())
            .count();
        assert_eq!(admitted, 3);
        assert_eq!(r.check(99, false, 0), Err(DropReason::RateGlobal));
        assert!(r.check(99, false, 200_000_000).is_ok());
    }

    #[test]
    fn a_tracked_agent_is_not_charged_to_the_drained_global_bucket() {
        let mut r = RateLimiter::new(limits(10, 5, 3), 8);
        let flood = (0..1000u64)
            .filter(|p| r.check(*p + 100, false, 0).is_ok())
            .count();
        assert_eq!(flood, 3, "new senders share the global bucket");
        assert!(
            r.check(7, true, 0).is_ok(),
            "an established agent keeps its beat"
        );
        assert_eq!(r.check(8, false, 0), Err(DropReason::RateGlobal));
        let mut unbounded = RateLimiter::new(limits(0, 5, 3), 8);
        let admitted = (0..10)
            .filter(|_| unbounded.check(7, true, 0).is_ok())
            .count();
        assert_eq!(
            admitted, 3,
            "without a per-agent limit the global one binds everyone"
        );
    }
}
