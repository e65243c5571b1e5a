//! Where the kernel keeps a token bucket: its virtual clock is a `u64` inside a BPF map value,
//! shared by every CPU. The arithmetic is `varta_common::ratelimit`, the same the daemon runs.
//!
//! The BPF target has atomic add but no compare-and-swap, so `core`'s atomic types offer no
//! `fetch_add` there; the intrinsic compiles to `BPF_ATOMIC | BPF_FETCH` (cpu v3). Plain
//! aligned 64-bit loads and stores are single instructions, so volatile access suffices
//! for them (LLVM's BPF backend cannot select atomic loads).

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    ptr::{read_volatile, write_volatile},
};

use varta_common::ratelimit::TatCell;

/// A bucket's clock in a live map value.
pub struct MapCell(*mut u64);

impl MapCell {
    /// # Safety
    /// `tat` points into a BPF map value that stays valid for the whole program run, 8-byte
    /// aligned.
    #[inline(always)]
    pub unsafe fn new(tat: *mut u64) -> Self {
        MapCell(tat)
    }
}

impl TatCell for MapCell {
    #[inline(always)]
    fn load(&mut self) -> u64 {
        // SAFETY: `MapCell::new`'s contract: a live, aligned map value.
        unsafe { read_volatile(self.0) }
    }

    #[inline(always)]
    fn store(&mut self, value: u64) {
        // SAFETY: as above.
        unsafe { write_volatile(self.0, value) }
    }

    #[inline(always)]
    fn fetch_add(&mut self, delta: u64) -> u64 {
        // SAFETY: as above; the add is one atomic instruction on the map value.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(self.0, delta) }
    }
}
