//! `cargo xtask bench [--full]`: builds the release daemon, installs the incumbent 0.2.0,
//! runs `varta-bench` (tests/src/bin/bench) and turns its output into BENCHMARKS.md, with
//! the plots copied next to it (docs/bench/) so the committed page shows them.

use std::{path::Path, process::Command};

use anyhow::{Context, Result};

use crate::{build, cargo, ebpf, status, target_dir, toolchain, workspace_root};

const PLOTS: [&str; 4] = [
    "stall-latency.png",
    "rate-loss.png",
    "rate-cpu.png",
    "rss.png",
];

/// The socket queue the bench's observers get: systemd's `net.unix.max_dgram_qlen`
/// (`/usr/lib/sysctl.d/50-default.conf`), as on the hosts the daemon is deployed on, so the
/// figures do not depend on this machine's setting. The kernel's default, 10, is measured
/// beside it (`rate_20k_qlen_10`).
const BENCH_QLEN: u32 = 512;

pub fn run(full: bool) -> Result<()> {
    toolchain::ensure_bench_packages()?;
    let ours = build(true)?;
    let incumbent = toolchain::ensure_incumbent()?;
    let out = target_dir().join("bench");
    status(cargo(&ebpf::build()?).args([
        "build",
        "--release",
        "--quiet",
        "--package",
        "varta-e2e",
        "--bin",
        "varta-bench",
    ]))?;
    let bench = target_dir().join("release/varta-bench");
    // As root: in a network namespace of its own (loopback only, the queue set there),
    // which also keeps the bench's sysctl changes off the machine's.
    let mut cmd = if crate::is_root() {
        eprintln!(
            "xtask: benchmarking in a network namespace of its own (net.unix.max_dgram_qlen {BENCH_QLEN}); figures in {}",
            out.display()
        );
        let mut cmd = Command::new("unshare");
        cmd.args(["--net", "--", "sh", "-c"]).arg(format!(
            "ip link set lo up && echo {BENCH_QLEN} > /proc/sys/net/unix/max_dgram_qlen && exec \"$0\" \"$@\""
        ));
        cmd.arg(&bench);
        cmd
    } else {
        eprintln!(
            "xtask: benchmarking in this network namespace (not root: its net.unix.max_dgram_qlen, and no rate_20k_qlen_10); figures in {}",
            out.display()
        );
        Command::new(&bench)
    };
    if full {
        cmd.arg("--full");
    }
    status(cmd.arg(&out).arg(&ours).arg(&incumbent))?;
    write_page(&out, full)
}

fn write_page(out: &Path, full: bool) -> Result<()> {
    let root = workspace_root();
    let summary = std::fs::read_to_string(out.join("summary.md"))
        .with_context(|| format!("reading {}/summary.md", out.display()))?;
    let docs = root.join("docs/bench");
    std::fs::create_dir_all(&docs)?;
    let mut plots = String::new();
    for p in PLOTS {
        if std::fs::copy(out.join(p), docs.join(p)).is_ok() {
            plots.push_str(&format!("![{p}](docs/bench/{p})\n\n"));
        }
    }
    let command = if full {
        "cargo xtask bench --full"
    } else {
        "cargo xtask bench"
    };
    let mut page = std::fs::read_to_string(root.join("xtask/src/bench-notes.md"))
        .context("reading xtask/src/bench-notes.md")?;
    page = page
        .replace("{command}", command)
        .replace("{kernel}", uname().trim())
        .replace("{table}", summary.trim())
        .replace("{plots}", plots.trim());
    std::fs::write(root.join("BENCHMARKS.md"), page)?;
    eprintln!("xtask: wrote BENCHMARKS.md and docs/bench/*.png");
    Ok(())
}

fn uname() -> String {
    Command::new("uname")
        .arg("-a")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}
