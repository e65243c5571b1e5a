//! `cargo xtask fuzz`: the cargo-fuzz targets in `fuzz/` (nightly, libFuzzer), each for a
//! bounded time. `cargo xtask test` runs them under CI=true.

use std::time::Duration;

use anyhow::{Context, Result};

use crate::{status, toolchain, workspace_root};

/// The targets in `fuzz/Cargo.toml`.
const TARGETS: [&str; 3] = ["decode_plain", "decode_secure", "attestation"];

/// Runs every target for `each`; a crash (a failed property) fails the run, and libFuzzer
/// leaves the input under `fuzz/artifacts/<target>/`.
pub fn run(each: Duration) -> Result<()> {
    let bin = toolchain::ensure_cargo_fuzz()?;
    let path = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))?;
    let dir = workspace_root().join("fuzz");
    for target in TARGETS {
        eprintln!("xtask: fuzzing {target} for {} s", each.as_secs());
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        status(
            toolchain::nightly("cargo")
                .current_dir(&dir)
                .env("PATH", &path)
                .args(["fuzz", "run", target])
                .arg(&corpus)
                // Read-only seeds: the conformance vectors' frames (valid ones reach past
                // the CRC check at once).
                .arg(dir.join("seeds").join(target))
                .arg("--")
                .arg(format!("-max_total_time={}", each.as_secs()))
                .arg("-print_final_stats=1"),
        )
        .with_context(|| format!("fuzz target {target}"))?;
    }
    Ok(())
}
