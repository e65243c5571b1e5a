//! Embeds the eBPF object that `cargo xtask build` names in VARTA_EBPF_OBJECT. A plain
//! `cargo build` (no xtask, no nightly) embeds nothing: that binary runs the userspace
//! datapath and says why when asked for eBPF.

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=VARTA_EBPF_OBJECT");
    println!("cargo:rustc-check-cfg=cfg(varta_no_ebpf_object)");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("varta-ebpf.o");
    match env::var_os("VARTA_EBPF_OBJECT") {
        Some(path) => {
            let path = PathBuf::from(path);
            println!("cargo:rerun-if-changed={}", path.display());
            fs::copy(&path, &out)
                .unwrap_or_else(|e| panic!("copying eBPF object {}: {e}", path.display()));
        }
        None => {
            fs::write(&out, []).expect("writing empty eBPF object");
            // The tests of the embedded object are ignored in such a build.
            println!("cargo:rustc-cfg=varta_no_ebpf_object");
        }
    }
}
