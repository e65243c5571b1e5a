//! The in-kernel receive path of varta-watch. Built for `bpfel-unknown-none` by
//! `cargo xtask build-ebpf`; on any other target this crate is an empty binary so that
//! workspace-wide cargo commands keep working.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod attest;
#[cfg(target_arch = "bpf")]
mod filter;
#[cfg(target_arch = "bpf")]
mod ratelimit;

/// The kernel lets only GPL-compatible programs call GPL-only helpers such as
/// `bpf_probe_read_kernel`; the daemon's loader passes this section as the program license.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves there is no path here; a loop keeps the signature honest.
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("varta-ebpf is an eBPF object: build it with `cargo xtask build-ebpf`");
    std::process::exit(2);
}
