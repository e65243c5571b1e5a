//! The token bucket both datapaths apply: integer arithmetic on one `u64` per bucket, a virtual
//! clock (GCRA, "theoretical arrival time"). The state is the time at which the bucket will be
//! full again: a bucket whose clock is at or before `now` is full, and each admitted beat moves
//! the clock one `interval` later. A beat is refused when that would put the clock more than the
//! bucket's depth (`burst` intervals) ahead of `now`. A zeroed state is a full bucket.
//!
//! Where the state lives is the caller's business ([`TatCell`]): the kernel keeps it in a map
//! value and takes tokens with one atomic add, so beats on several CPUs cannot spend the same
//! token twice; the userspace datapath keeps a plain `u64` per agent.

use crate::DropReason;

const NS_PER_SEC: u64 = 1_000_000_000;

/// Storage of one bucket's virtual clock.
pub trait TatCell {
    fn load(&mut self) -> u64;
    fn store(&mut self, value: u64);
    /// Adds `delta` (wrapping) and returns the value before; atomic where several CPUs share
    /// the cell.
    fn fetch_add(&mut self, delta: u64) -> u64;
}

impl TatCell for u64 {
    fn load(&mut self) -> u64 {
        *self
    }

    fn store(&mut self, value: u64) {
        *self = value;
    }

    fn fetch_add(&mut self, delta: u64) -> u64 {
        let before = *self;
        *self = before.wrapping_add(delta);
        before
    }
}

impl TatCell for &mut u64 {
    fn load(&mut self) -> u64 {
        **self
    }

    fn store(&mut self, value: u64) {
        **self = value;
    }

    fn fetch_add(&mut self, delta: u64) -> u64 {
        (**self).fetch_add(delta)
    }
}

/// Where [`admit`] finds the buckets: the kernel's maps, or the daemon's own.
pub trait Buckets {
    type Cell<'a>: TatCell
    where
        Self: 'a;

    /// The agent's bucket, if it has one.
    fn agent(&mut self, key: u64) -> Option<Self::Cell<'_>>;
    /// Creates the agent's bucket (its first beat) with the clock `tat`.
    fn create(&mut self, key: u64, tat: u64);
    /// The daemon tracks the agent (see [`global_applies`]).
    fn tracked(&mut self, key: u64) -> bool;
    /// The global bucket (`None`: none to charge).
    fn global(&mut self) -> Option<Self::Cell<'_>>;
}

/// The admission of one beat of the agent `key` at `now`, the sequence both datapaths run:
/// the agent's own bucket (created on its first beat, full minus that beat), then the global
/// one unless the agent is tracked ([`global_applies`]). `Ok(true)`: the agent's first beat
/// (it had no bucket).
#[inline(always)]
pub fn admit<B: Buckets>(
    buckets: &mut B,
    key: u64,
    per_agent: Option<Limit>,
    global: Option<Limit>,
    now: u64,
) -> Result<bool, DropReason> {
    let first = match buckets.agent(key) {
        Some(mut tat) => {
            if let Some(limit) = per_agent
                && !limit.take(&mut tat, now)
            {
                return Err(DropReason::RatePerPid);
            }
            false
        }
        None => true,
    };
    if first {
        buckets.create(key, per_agent.map_or(0, |limit| limit.first_beat(now)));
    }
    if let Some(limit) = global
        && global_applies(buckets.tracked(key), per_agent.is_some())
        && let Some(mut tat) = buckets.global()
        && !limit.take(&mut tat, now)
    {
        return Err(DropReason::RateGlobal);
    }
    Ok(first)
}

/// One bucket's shape: `rate` tokens per second, `burst` tokens deep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Nanoseconds per token (at least 1).
    interval_ns: u64,
    /// How far the clock may run ahead of now: the burst in nanoseconds.
    depth_ns: u64,
}

impl Limit {
    /// `None` for rate 0, which means no limit. A burst of 0 is taken as 1.
    #[inline(always)]
    pub const fn new(rate: u32, burst: u32) -> Option<Limit> {
        // The shape is computed for rate 0 too, and only then dropped: a `None` built before
        // it would leave the payload undefined, and LLVM may spill that register, which the
        // kernel's verifier refuses as a read of an unset register (Linux 6.12: `R2
        // !read_ok`). Selected last, LLVM gives the payload the defined value.
        let interval_ns = NS_PER_SEC / if rate == 0 { 1 } else { rate as u64 };
        // Above 1e9 beats per second the interval would round to 0, which admits everything.
        let interval_ns = if interval_ns == 0 { 1 } else { interval_ns };
        let burst = if burst == 0 { 1 } else { burst as u64 };
        let limit = Limit {
            interval_ns,
            // At most 1e9 * u32::MAX: no overflow.
            depth_ns: interval_ns * burst,
        };
        if rate == 0 { None } else { Some(limit) }
    }

    pub const fn interval_ns(&self) -> u64 {
        self.interval_ns
    }

    /// Takes one token at `now`; `false` when the bucket is empty.
    #[inline(always)]
    pub fn take(&self, tat: &mut impl TatCell, now: u64) -> bool {
        let limit = now.saturating_add(self.depth_ns);
        let mut current = tat.load();
        if current < now {
            // A full bucket stays full: forget idle time beyond the burst. This store only
            // races with another CPU refilling the same idle bucket.
            tat.store(now);
            current = now;
        }
        if current.saturating_add(self.interval_ns) > limit {
            return false;
        }
        let before = tat.fetch_add(self.interval_ns);
        if before.saturating_add(self.interval_ns) > limit {
            // Another CPU took the last token between our load and our add: give it back.
            tat.fetch_add(self.interval_ns.wrapping_neg());
            return false;
        }
        true
    }

    /// The clock of a bucket created by the beat it admits at `now`: full, minus that beat.
    #[inline(always)]
    pub const fn first_beat(&self, now: u64) -> u64 {
        now.saturating_add(self.interval_ns)
    }
}

/// Fair admission: whom the global bucket is for. It protects the daemon from senders that
/// would cost it work it has not agreed to: new senders, unattested UDP pid claims, pids
/// churned by forking, agents beyond the tracker's capacity. An agent the daemon already
/// tracks is charged only to its own bucket, so no flood of others can cost it a beat; what
/// tracked agents send together is bounded by `--tracker-capacity` x `--max-beat-rate`.
/// Without a per-agent limit there is no such bound, and the global bucket applies to all.
/// Both datapaths ask this one function.
#[inline(always)]
pub const fn global_applies(tracked: bool, per_agent_limit: bool) -> bool {
    !(tracked && per_agent_limit)
}

/// Whether a bucket whose clock is at `tat` is full at `now` (it then equals a new bucket).
#[inline(always)]
pub const fn is_full(tat: u64, now: u64) -> bool {
    tat <= now
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_zero_is_no_limit_and_huge_rates_still_limit() {
        assert_eq!(Limit::new(0, 5), None);
        let fast = Limit::new(u32::MAX, 1).unwrap();
        let mut tat = 0u64;
        assert!(fast.take(&mut tat, 100));
        assert!(!fast.take(&mut tat, 100));
    }

    #[test]
    fn first_beat_equals_taking_from_a_new_bucket() {
        let limit = Limit::new(10, 10).unwrap();
        let mut tat = 0u64;
        assert!(limit.take(&mut tat, 5_000_000_000));
        assert_eq!(tat, limit.first_beat(5_000_000_000));
    }
}
