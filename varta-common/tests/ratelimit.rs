//! Property tests of the token bucket both datapaths apply (the kernel's map value and the
//! daemon's `u64` run this same arithmetic).

use proptest::prelude::*;
use varta_common::ratelimit::{Limit, is_full};

const NS_PER_SEC: u64 = 1_000_000_000;

/// Arrival times: a start anywhere on the clock (0 included) and increasing gaps.
fn arrivals() -> impl Strategy<Value = Vec<u64>> {
    (
        prop_oneof![Just(0u64), 0u64..1 << 62],
        proptest::collection::vec(
            prop_oneof![Just(0u64), 0u64..NS_PER_SEC, 0u64..10 * NS_PER_SEC],
            1..200,
        ),
    )
        .prop_map(|(start, gaps)| {
            gaps.iter()
                .scan(start, |t, gap| {
                    *t += gap;
                    Some(*t)
                })
                .collect()
        })
}

fn shape() -> impl Strategy<Value = (u32, u32)> {
    (
        prop_oneof![1u32..100, 1u32..100_000, Just(u32::MAX)],
        prop_oneof![0u32..20, 1u32..10_000],
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Over any stretch of time, a bucket admits at most its burst plus one beat per interval
    /// elapsed (the rate rounded to whole nanoseconds per token, never up).
    #[test]
    fn never_more_than_burst_plus_elapsed_times_rate((rate, burst) in shape(), times in arrivals()) {
        let limit = Limit::new(rate, burst).unwrap();
        let interval = limit.interval_ns();
        prop_assert!(interval >= 1);
        prop_assert!(interval * rate as u64 <= NS_PER_SEC || interval == 1);
        let burst = burst.max(1) as u64;
        let mut tat = 0u64;
        let admitted: Vec<u64> = times.iter().copied().filter(|&t| limit.take(&mut tat, t)).collect();
        for (i, &from) in admitted.iter().enumerate() {
            for (j, &to) in admitted.iter().enumerate().skip(i) {
                let count = (j - i + 1) as u64;
                prop_assert!(
                    count <= burst + (to - from) / interval,
                    "{count} beats admitted in {} ns (burst {burst}, interval {interval})",
                    to - from
                );
            }
        }
    }

    /// A sender that keeps to the rate is never refused.
    #[test]
    fn a_sender_at_the_rate_is_always_admitted((rate, burst) in shape(), start in 0u64..1 << 62, extra in proptest::collection::vec(0u64..NS_PER_SEC, 1..100)) {
        let limit = Limit::new(rate, burst).unwrap();
        let mut tat = 0u64;
        let mut now = start;
        for gap in extra {
            prop_assert!(limit.take(&mut tat, now));
            now += limit.interval_ns() + gap;
        }
    }

    /// A full bucket (new, or idle for a whole burst) admits exactly `burst` beats at once, and
    /// after waiting k intervals exactly min(k, burst) more.
    #[test]
    fn a_full_idle_bucket_admits_exactly_burst((rate, burst) in (1u32..1000, 0u32..200), start in 0u64..1 << 62, idle in 0u64..400, waited in 0u64..400) {
        let limit = Limit::new(rate, burst).unwrap();
        let burst = burst.max(1) as u64;
        let mut tat = 0u64;
        prop_assert!(is_full(tat, start));
        let take_all = |tat: &mut u64, now: u64| (0..burst + 5).filter(|_| limit.take(tat, now)).count() as u64;
        prop_assert_eq!(take_all(&mut tat, start), burst);
        prop_assert!(!is_full(tat, start));

        // Idle for at least the burst's depth: full again, and idle time beyond it is forgotten.
        let later = start + limit.interval_ns() * (burst + idle);
        prop_assert!(is_full(tat, later));
        prop_assert_eq!(take_all(&mut tat, later), burst);

        let refill = later + limit.interval_ns() * waited;
        prop_assert_eq!(take_all(&mut tat, refill), waited.min(burst));
    }
}

#[test]
fn zero_rate_is_no_limit() {
    assert_eq!(Limit::new(0, 10), None);
}
