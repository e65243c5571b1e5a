//! Installs what the eBPF build and the tests need, once, and caches it.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::status;

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Where installed tools are cached across checkouts of the project.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("varta-ebpf")
}

/// `rustup run nightly <program>`, with the stable toolchain's overrides removed.
pub fn nightly(program: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", program]);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "CARGO_MANIFEST_DIR",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs `cmd` and returns its stdout (stderr goes to ours); an error when it fails.
pub fn capture(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Nightly with rust-src (for `-Z build-std=core`).
fn ensure_nightly() -> Result<()> {
    let have_nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !have_nightly {
        eprintln!("xtask: installing the nightly toolchain");
        status(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = capture(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if !components.lines().any(|c| c.starts_with("rust-src")) {
        eprintln!("xtask: adding rust-src to nightly");
        status(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// bpf-linker built against the nightly toolchain's own libLLVM (Debian has no matching
/// LLVM): its major version must equal rustc's. Cached per nightly version.
pub fn ensure_bpf_linker() -> Result<PathBuf> {
    ensure_nightly()?;
    let verbose = capture(nightly("rustc").arg("-vV"))?;
    let field = |name: &str| {
        verbose
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .map(str::to_owned)
    };
    let llvm = field("LLVM version:").context("rustc -vV shows no LLVM version")?;
    let llvm_major = llvm.split('.').next().unwrap_or_default().to_owned();
    let commit = field("commit-hash:").unwrap_or_else(|| "unknown".into());
    let root = cache_dir().join(format!(
        "bpf-linker-{BPF_LINKER_VERSION}-{}",
        &commit[..commit.len().min(12)]
    ));
    let bin = root.join("bin");
    if bin.join("bpf-linker").exists() {
        return Ok(bin);
    }

    let sysroot = PathBuf::from(capture(nightly("rustc").args(["--print", "sysroot"]))?.trim());
    let libllvm = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("libLLVM.so.{llvm_major}")))
        })
        .with_context(|| format!("no libLLVM.so.{llvm_major}* in {}/lib", sysroot.display()))?;
    let prefix = root.join("llvm-prefix");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib)?;
    for name in ["libLLVM.so".into(), libllvm.file_name().unwrap().to_owned()] {
        let link = lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)?;
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {llvm} (a few minutes, once)"
    );
    status(
        nightly("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm_major}"),
            ])
            .arg("--root")
            .arg(&root)
            .env("LLVM_PREFIX", &prefix),
    )?;
    Ok(bin)
}

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// cargo-fuzz for the fuzz targets in `fuzz/` (run with nightly); its bin directory.
pub fn ensure_cargo_fuzz() -> Result<PathBuf> {
    ensure_nightly()?;
    let root = cache_dir().join(format!("cargo-fuzz-{CARGO_FUZZ_VERSION}"));
    let bin = root.join("bin");
    if !bin.join("cargo-fuzz").exists() {
        eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (once)");
        status(
            nightly("cargo")
                .args(["install", "cargo-fuzz", "--locked", "--version"])
                .arg(CARGO_FUZZ_VERSION)
                .arg("--root")
                .arg(&root),
        )?;
    }
    Ok(bin)
}

/// The observer we replace, for the benchmark: varta-watch 0.2.0 from crates.io, pinned
/// (`--locked`), with its /metrics endpoint and plaintext UDP (the many-agents scenario)
/// compiled in.
pub fn ensure_incumbent() -> Result<PathBuf> {
    const FEATURES: &str = "prometheus-exporter,unsafe-plaintext-udp";
    let root = cache_dir().join("incumbent-varta-watch-0.2.0-metrics-udp");
    let bin = root.join("bin").join("varta-watch");
    if !bin.exists() {
        eprintln!("xtask: installing the incumbent varta-watch 0.2.0 ({FEATURES}) for comparison");
        status(
            Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .args(["install", "varta-watch", "--version", "0.2.0", "--locked"])
                .args(["--features", FEATURES, "--root"])
                .arg(&root),
        )?;
    }
    Ok(bin)
}

/// Debian packages the tests use, installed when missing (CI runs as root on a fresh box):
/// `unshare`/`setpriv` for namespace and privilege tests, tmux to look at `varta-watch top`,
/// cross compilers and qemu-user for the signal tests on aarch64 and riscv64.
pub fn ensure_test_packages() -> Result<()> {
    let wanted: &[(&str, &str)] = &[
        ("/usr/bin/unshare", "util-linux"),
        ("/usr/bin/setpriv", "util-linux"),
        ("/usr/bin/tmux", "tmux"),
        ("/usr/bin/qemu-aarch64-static", "qemu-user-static"),
        ("/usr/bin/qemu-riscv64-static", "qemu-user-static"),
        ("/usr/bin/aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
        ("/usr/bin/riscv64-linux-gnu-gcc", "gcc-riscv64-linux-gnu"),
        (
            "/usr/aarch64-linux-gnu/lib/libc.so",
            "libc6-dev-arm64-cross",
        ),
        (
            "/usr/riscv64-linux-gnu/lib/libc.so",
            "libc6-dev-riscv64-cross",
        ),
    ];
    install_missing(wanted)
}

/// What the VM runner needs: qemu for each guest architecture, cpio for the initramfs, and
/// for an arm64 guest the cross compiler (its sysroot holds the guest's shared libraries).
pub fn ensure_vm_packages(arm64: bool) -> Result<()> {
    let mut wanted: Vec<(&str, &str)> = vec![
        ("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
        ("/usr/bin/cpio", "cpio"),
        ("/usr/bin/dpkg-deb", "dpkg"),
    ];
    if arm64 {
        wanted.extend([
            ("/usr/bin/qemu-system-aarch64", "qemu-system-arm"),
            ("/usr/bin/aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
            (
                "/usr/bin/aarch64-linux-gnu-readelf",
                "binutils-aarch64-linux-gnu",
            ),
            (
                "/usr/aarch64-linux-gnu/lib/libc.so",
                "libc6-dev-arm64-cross",
            ),
        ]);
    }
    install_missing(&wanted)
}

/// Installs the package of every (path, package) whose path is missing, one line per step.
pub fn install_missing(wanted: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = wanted
        .iter()
        .filter(|(path, _)| !Path::new(path).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !crate::is_root() {
        bail!(
            "missing Debian packages: apt-get install {}",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    status(Command::new("apt-get").args(["update", "-q"]))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// What the benchmark needs beyond the build: the font its plots are labelled with, and
/// the tools of its network namespace.
pub fn ensure_bench_packages() -> Result<()> {
    install_missing(&[
        (
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "fonts-dejavu-core",
        ),
        ("/usr/bin/unshare", "util-linux"),
        ("/usr/sbin/ip", "iproute2"),
    ])
}

/// A cross target for the signal tests: (rust target, C linker, qemu-user, its sysroot).
pub const CROSS_TARGETS: [(&str, &str, &str, &str); 2] = [
    (
        "aarch64-unknown-linux-gnu",
        "aarch64-linux-gnu-gcc",
        "qemu-aarch64-static",
        "/usr/aarch64-linux-gnu",
    ),
    (
        "riscv64gc-unknown-linux-gnu",
        "riscv64-linux-gnu-gcc",
        "qemu-riscv64-static",
        "/usr/riscv64-linux-gnu",
    ),
];

/// A rustup target of the stable toolchain (the VM runner's arm64 daemon).
pub fn ensure_rust_target(target: &str) -> Result<()> {
    let installed = capture(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if installed.lines().any(|t| t.trim() == target) {
        return Ok(());
    }
    eprintln!("xtask: adding the rust target {target}");
    status(Command::new("rustup").args(["target", "add", target]))
}
