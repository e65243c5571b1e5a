//! Returning freed heap to the system. Loading the eBPF object parses the kernel's BTF (megabytes,
//! freed right after), but glibc keeps the freed top of its arena: the daemon would idle with
//! that memory resident for its whole life. And tables that grow with the agents (the tracker,
//! the per-pid metric families) are reallocated at twice the size: glibc serves the first big
//! one with mmap, then, once it is freed, raises its mmap threshold (up to 32 MiB) and serves
//! the next from the heap, where a freed table stays resident.

/// Keeps allocations of 128 KiB and more in mappings of their own, returned to the system
/// when freed: glibc's default threshold, made fixed (setting it turns off the raising).
/// A no-op elsewhere (musl maps large allocations itself).
pub fn map_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called first thing, before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Gives the heap's free pages back to the system (glibc); a no-op elsewhere (musl returns
/// freed memory by itself).
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists under its lock; it has no
    // preconditions and leaves every live allocation untouched.
    unsafe {
        libc::malloc_trim(0);
    }
}
