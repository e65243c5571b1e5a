//! Token buckets as a virtual clock ("theoretical arrival time"): the bucket holds
//! `(now - tat) / interval` tokens, capped at `burst`. Taking a token is one atomic add, so
//! beats arriving on several CPUs at once cannot spend the same token twice.
//!
//! The BPF target has atomic add but no compare-and-swap, so `core`'s atomic types offer no
//! `fetch_add` there; the intrinsic compiles to `BPF_ATOMIC | BPF_FETCH` (cpu v3). Plain
//! aligned 64-bit loads and stores are single instructions, so volatile access suffices
//! for them (LLVM's BPF backend cannot select atomic loads).

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    ptr::{read_volatile, write_volatile},
};

const NS_PER_SEC: u64 = 1_000_000_000;

/// Nanoseconds per token, and the bucket's depth in nanoseconds (at least one token).
#[inline(always)]
fn shape(rate: u32, burst: u32) -> (u64, u64) {
    let interval = if rate == 0 {
        0
    } else {
        NS_PER_SEC / rate as u64
    };
    let burst = if burst == 0 { 1 } else { burst as u64 };
    (interval, interval * burst)
}

/// The virtual clock of a new agent's bucket: full, minus the beat that created it.
#[inline(always)]
pub fn first_beat(now: u64, rate: u32, burst: u32) -> u64 {
    let (interval, depth) = shape(rate, burst);
    now.saturating_sub(depth) + interval
}

/// Takes one token from the bucket whose virtual clock is at `tat`; `false` when empty.
/// `rate` must not be 0 (a 0 rate means no limit and is not checked at all).
#[inline(always)]
pub fn take(tat: *mut u64, now: u64, rate: u32, burst: u32) -> bool {
    let (interval, depth) = shape(rate, burst);
    let floor = now.saturating_sub(depth);
    // SAFETY (every access below): `tat` points into a live BPF map value, 8-byte aligned.
    let mut current = unsafe { read_volatile(tat) };
    if current < floor {
        // A full bucket stays full: forget idle time beyond the burst. This store only races
        // with another CPU refilling the same idle bucket.
        // SAFETY: see above.
        unsafe { write_volatile(tat, floor) };
        current = floor;
    }
    if current + interval > now {
        return false;
    }
    // SAFETY: see above.
    let before = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(tat, interval) };
    if before + interval > now {
        // Another CPU took the last token between our load and our add: give it back.
        // SAFETY: see above.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(tat, interval.wrapping_neg())
        };
        return false;
    }
    true
}
