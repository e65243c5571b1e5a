//! What the tests of `deploy/` need (Prometheus, podman, systemd-analyze, a Kubernetes
//! schema checker, the musl target), and `cargo xtask image`.

use std::{path::Path, process::Command};

use anyhow::{Result, bail};

use crate::status;

/// Debian packages for the deploy tests: (a file the package installs, the package).
const PACKAGES: &[(&str, &str)] = &[
    ("/usr/bin/promtool", "prometheus"),
    ("/usr/bin/prometheus", "prometheus"),
    ("/usr/bin/podman", "podman"),
    ("/usr/bin/buildah", "buildah"),
    // The machine's hybrid cgroup layout makes crun refuse containers; runc runs them.
    ("/usr/sbin/runc", "runc"),
    ("/usr/bin/musl-gcc", "musl-tools"),
    ("/usr/bin/systemd-analyze", "systemd"),
    ("/usr/bin/setpriv", "util-linux"),
    ("/usr/bin/pip3", "python3-pip"),
];

pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// Installs, when missing, everything the deploy tests run; one `xtask:` line per step.
pub fn ensure_tools() -> Result<()> {
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(path, _)| !Path::new(path).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if !missing.is_empty() {
        if !crate::is_root() {
            bail!(
                "missing Debian packages: apt-get install {}",
                missing.join(" ")
            );
        }
        eprintln!("xtask: installing {} (deploy tests)", missing.join(" "));
        status(Command::new("apt-get").args(["update", "-q"]))?;
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    let have_validator = Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_validator {
        eprintln!("xtask: installing kubernetes-validate from PyPI (manifest schema checks)");
        status(Command::new("pip3").args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--break-system-packages",
            "kubernetes-validate",
        ]))?;
    }
    ensure_musl_target()
}

/// The static (musl) target for the container image's binary.
pub fn ensure_musl_target() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == MUSL_TARGET)
    {
        eprintln!("xtask: adding the {MUSL_TARGET} target (static binary for the image)");
        status(Command::new("rustup").args(["target", "add", MUSL_TARGET]))?;
    }
    Ok(())
}
