//! Returning freed heap to the system. Loading the eBPF object parses the kernel's BTF (megabytes,
//! freed right after), but glibc keeps the freed top of its arena: the daemon would idle with
//! that memory resident for its whole life.

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
