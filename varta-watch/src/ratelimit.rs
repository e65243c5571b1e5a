//! Token buckets for the userspace datapath (the eBPF program has its own, in the kernel).

use std::collections::HashMap;

use varta_common::DropReason;

use crate::config::Limits;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ns: u64,
}

impl Bucket {
    fn full(burst: u32, now_ns: u64) -> Self {
        Bucket {
            tokens: burst as f64,
            at_ns: now_ns,
        }
    }

    fn take(&mut self, now_ns: u64, rate: u32, burst: u32) -> bool {
        let elapsed = now_ns.saturating_sub(self.at_ns) as f64 / 1e9;
        self.tokens = (self.tokens + elapsed * rate as f64).min(burst as f64);
        self.at_ns = now_ns;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct RateLimiter {
    limits: Limits,
    per_pid: HashMap<u32, Bucket>,
    global: Bucket,
    /// Above this many per-agent buckets, full ones are forgotten (they equal a new one).
    max_buckets: usize,
}

impl RateLimiter {
    pub fn new(limits: Limits, max_agents: usize, now_ns: u64) -> Self {
        RateLimiter {
            global: Bucket::full(limits.global_burst, now_ns),
            limits,
            per_pid: HashMap::new(),
            max_buckets: max_agents * 4 + 1024,
        }
    }

    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    pub fn check(&mut self, pid: u32, now_ns: u64) -> Result<(), DropReason> {
        let l = &self.limits;
        if l.per_pid_rate > 0 {
            if self.per_pid.len() >= self.max_buckets && !self.per_pid.contains_key(&pid) {
                let (rate, burst) = (l.per_pid_rate, l.per_pid_burst());
                self.per_pid.retain(|_, b| {
                    let mut probe = *b;
                    probe.take(now_ns, rate, burst);
                    probe.tokens + 1.0 < burst as f64
                });
            }
            let burst = l.per_pid_burst();
            let bucket = self
                .per_pid
                .entry(pid)
                .or_insert_with(|| Bucket::full(burst, now_ns));
            if !bucket.take(now_ns, l.per_pid_rate, burst) {
                return Err(DropReason::RatePerPid);
            }
        }
        if l.global_rate > 0 && !self.global.take(now_ns, l.global_rate, l.global_burst) {
            return Err(DropReason::RateGlobal);
        }
        Ok(())
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
        let mut r = RateLimiter::new(limits(10, 0, 0), 8, 0);
        let admitted = (0..100).filter(|_| r.check(7, 0).is_ok()).count();
        assert_eq!(admitted, 10, "one second of burst");
        assert_eq!(r.check(7, 0), Err(DropReason::RatePerPid));
        assert!(r.check(8, 0).is_ok(), "another agent has its own bucket");
        assert!(r.check(7, 100_000_000).is_ok(), "one token per 100 ms");
        assert!(r.check(7, 100_000_000).is_err());
    }

    #[test]
    fn global_bucket_spans_agents() {
        let mut r = RateLimiter::new(limits(0, 5, 3), 8, 0);
        let admitted = (0..10u32).filter(|p| r.check(*p + 2, 0).is_ok()).count();
        assert_eq!(admitted, 3);
        assert_eq!(r.check(99, 0), Err(DropReason::RateGlobal));
        assert!(r.check(99, 200_000_000).is_ok());
    }
}
