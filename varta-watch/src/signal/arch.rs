//! Per-architecture signal return.
//!
//! x86_64: the kernel returns from a handler to `sa_restorer`, which must be a bare
//! `rt_sigreturn` with no stack frame of its own; without SA_RESTORER the process dies with
//! SIGSEGV when the signal arrives. aarch64 and riscv64 return through the kernel's vDSO
//! trampoline, so no restorer is installed there.

#[cfg(target_arch = "x86_64")]
mod imp {
    pub const SA_RESTORER: u64 = 0x0400_0000;
    pub const RESTORER_FLAGS: u64 = SA_RESTORER;

    // The trampoline: `mov $15, %eax; syscall` (15 = rt_sigreturn), never returns. The CFI
    // marks it a signal frame so debuggers and unwinders step through it correctly; the
    // nop before the label keeps "return address - 1" inside the described range, as
    // unwinders look up the caller's FDE that way. Hidden: private to this binary.
    core::arch::global_asm!(
        ".pushsection .text.varta_restore_rt,\"ax\",@progbits",
        ".globl varta_restore_rt",
        ".hidden varta_restore_rt",
        ".type varta_restore_rt,@function",
        ".cfi_startproc",
        ".cfi_signal_frame",
        "nop",
        "varta_restore_rt:",
        "mov eax, 15",
        "syscall",
        "ud2",
        ".cfi_endproc",
        ".size varta_restore_rt, . - varta_restore_rt",
        ".popsection",
    );

    unsafe extern "C" {
        fn varta_restore_rt();
    }

    pub fn restorer() -> usize {
        varta_restore_rt as *const () as usize
    }
}

#[cfg(any(target_arch = "aarch64", target_arch = "riscv64"))]
mod imp {
    #[cfg(target_arch = "aarch64")]
    pub const SA_RESTORER: u64 = 0x0400_0000;
    /// The kernel's vDSO `rt_sigreturn` trampoline is used: no SA_RESTORER.
    pub const RESTORER_FLAGS: u64 = 0;

    pub fn restorer() -> usize {
        0
    }
}

#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
)))]
compile_error!("varta-watch's signal module supports x86_64, aarch64 and riscv64 only");

pub use imp::*;
