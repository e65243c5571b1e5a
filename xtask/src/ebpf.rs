//! Builds the eBPF object. Cargo's own fingerprints are the cache: the nightly build runs on
//! every `cargo xtask build/run/test` and is a no-op when neither `varta-ebpf` nor
//! `varta-common` changed, so the object the daemon embeds is always built from the current
//! sources and a userspace-only change costs no eBPF rebuild.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::{status, toolchain, workspace_root};

/// The daemon's build script embeds the object named by this variable.
pub const OBJECT_ENV: &str = "VARTA_EBPF_OBJECT";
const TARGET: &str = "bpfel-unknown-none";

pub fn build() -> Result<PathBuf> {
    let linker_dir = toolchain::ensure_bpf_linker()?;
    let root = workspace_root();
    // A target directory of its own: nightly and stable fingerprints never evict each other.
    let target_dir = root.join("target").join("ebpf");
    let path = std::env::join_paths(std::iter::once(linker_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))?;
    status(
        toolchain::nightly("cargo")
            .current_dir(&root)
            .args([
                "build",
                "--package",
                "varta-ebpf",
                "--release",
                "--target",
                TARGET,
                "-Z",
                "build-std=core",
            ])
            .arg("--target-dir")
            .arg(&target_dir)
            .env("PATH", path)
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                ["-Cdebuginfo=2", "-Ctarget-cpu=v3", "-Clink-arg=--btf"].join("\x1f"),
            ),
    )
    .context("building the eBPF object")?;
    Ok(target_dir.join(TARGET).join("release").join("varta-ebpf"))
}
