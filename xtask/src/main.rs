//! `cargo xtask <command>`: everything that is not plain cargo.

mod bench;
mod demo;
mod deploy;
mod ebpf;
mod fuzz;
mod toolchain;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "varta-ebpf developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF object (installs nightly rust-src and bpf-linker when missing).
    BuildEbpf,
    /// Build the eBPF object and the daemon with the object embedded.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build and start the observer with the default development configuration.
    /// Arguments after `--` are passed to varta-watch and override the defaults.
    Run {
        #[arg(long)]
        release: bool,
        /// Also start demo agents, wedge one, kill one and let one die with a panic frame:
        /// a stall, an exit and a recovery within seconds (`varta-watch top` in a tmux
        /// split when the terminal has tmux). Ctrl-C stops everything.
        #[arg(long)]
        demo: bool,
        /// Run this varta-watch binary instead of building one.
        #[arg(long)]
        bin: Option<PathBuf>,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run every test: unit, property, conformance and end-to-end (eBPF ones included).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Benchmark our observer (eBPF and userspace) against the incumbent 0.2.0: figures in
    /// target/bench/ (results.json, PNG plots) and BENCHMARKS.md. About 5 minutes, as root in a network namespace of its own.
    Bench {
        /// More trials, rates and longer steps.
        #[arg(long)]
        full: bool,
    },
    /// Boot Debian's kernels under qemu and prove the datapath in each (default: the
    /// x86_64 set 5.10, 6.1, 6.12).
    VmTest {
        /// Comma-separated: 5.10, 6.1, 6.12, arm64-6.12.
        #[arg(long, value_delimiter = ',')]
        kernels: Vec<String>,
        /// Every kernel, arm64 included.
        #[arg(long)]
        full: bool,
        /// Instead: deploy/systemd under a real systemd (PID 1) in a Debian 12 VM.
        #[arg(long, conflicts_with_all = ["kernels", "full"])]
        systemd: bool,
    },
    /// Build the container image (deploy/Containerfile, static binary) and print its id and size.
    Image,
    /// Run each cargo-fuzz target in fuzz/ for a while (installs nightly cargo-fuzz).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 20)]
        secs: u64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::BuildEbpf => ebpf::build().map(drop),
        Task::Build { release } => {
            let bin = build(release)?;
            eprintln!("xtask: built {}", bin.display());
            Ok(())
        }
        Task::Run {
            release,
            demo,
            bin,
            args,
        } => {
            let bin = match bin {
                Some(bin) => bin,
                None => build(release)?,
            };
            if demo {
                demo::run(&bin, &args)
            } else {
                run(&bin, &args)
            }
        }
        Task::Test { args } => test(&args),
        Task::Bench { full } => bench::run(full),
        Task::VmTest { systemd: true, .. } => vm::systemd::run(),
        Task::VmTest { kernels, full, .. } => vm::run(&kernels, full),
        Task::Image => deploy::image(&ebpf::build()?).map(drop),
        Task::Fuzz { secs } => fuzz::run(std::time::Duration::from_secs(secs)),
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// A stable-toolchain cargo command at the workspace root, with the embedded eBPF object.
pub fn cargo(object: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root())
        .env(ebpf::OBJECT_ENV, object);
    cmd
}

fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

/// The daemon with the eBPF object embedded: a debug build, or with `release` the binary
/// as shipped: profile `dist` and statically linked (glibc's `crt-static`: no shared C
/// library pages in its RSS, no loader at start; the image's is musl,
/// `deploy::static_binary`).
pub fn build(release: bool) -> Result<PathBuf> {
    let object = ebpf::build()?;
    let mut cmd = cargo(&object);
    cmd.args(["build", "--package", "varta-watch"]);
    if release {
        let host = host_target();
        // The flag for the target only: build scripts and proc macros stay dynamic.
        let flags = format!(
            "CARGO_TARGET_{}_RUSTFLAGS",
            host.to_uppercase().replace('-', "_")
        );
        status(
            cmd.args(["--profile", "dist", "--target", &host])
                .env(flags, "-C target-feature=+crt-static"),
        )?;
        return Ok(target_dir().join(host).join("dist").join("varta-watch"));
    }
    status(&mut cmd)?;
    Ok(target_dir().join("debug").join("varta-watch"))
}

/// This machine's target (the daemon is built on Linux with glibc).
fn host_target() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The embedded development configuration: a socket under /run/varta as root, else under
/// $XDG_RUNTIME_DIR; metrics on 127.0.0.1:9100; a 2 s stall threshold.
fn run(bin: &Path, args: &[String]) -> Result<()> {
    let dir = if is_root() {
        PathBuf::from("/run/varta")
    } else {
        std::env::var_os("XDG_RUNTIME_DIR")
            .map(|d| PathBuf::from(d).join("varta"))
            .context("not root and XDG_RUNTIME_DIR is unset: pass --socket after `--`")?
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let socket = dir.join("varta.sock");
    let mut cmd = Command::new(bin);
    cmd.arg("--socket")
        .arg(&socket)
        .args(["--threshold-ms", "2000", "--prom-addr", "127.0.0.1:9100"])
        .args(args);
    eprintln!(
        "xtask: {} --socket {} --threshold-ms 2000 --prom-addr 127.0.0.1:9100 {}",
        bin.display(),
        socket.display(),
        args.join(" ")
    );
    let err = exec(cmd);
    Err(err).context("starting varta-watch")
}

fn exec(mut cmd: Command) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    cmd.exec()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// CI=true: everything must run, and what cannot run fails instead of being skipped.
/// The one place xtask reads it.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The test harness arguments that decide which ignored tests run. Tests that need root or
/// a tool are `#[ignore]`d with the reason (see `varta_e2e::require`), so that a plain
/// `cargo test` lists them as ignored; here they run: all of them as root and under CI
/// (where one that cannot run fails), and without root the ones that need no root (the
/// tools are installed by now).
fn harness_args() -> Vec<&'static str> {
    if in_ci() || is_root() {
        vec!["--include-ignored"]
    } else {
        eprintln!(
            "xtask: not root: the tests that need root (named *_needs_root) are left out; run as root to include them"
        );
        vec!["--include-ignored", "--skip", "needs_root"]
    }
}

/// `cargo test` arguments: the user's (a filter, `--package`, ...), then the harness's
/// after their `--` (or after one of our own).
fn test_args(args: &[String], harness: &[&str]) -> Vec<String> {
    let mut all = args.to_vec();
    if !all.iter().any(|a| a == "--") {
        all.push("--".into());
    }
    all.extend(harness.iter().map(|a| a.to_string()));
    all
}

fn test(args: &[String]) -> Result<()> {
    toolchain::ensure_test_packages()?;
    deploy::ensure_tools()?;
    let object = ebpf::build()?;
    status(cargo(&object).args(["build", "--package", "varta-watch"]))?;
    let (image, static_bin) = deploy::image(&object)?;
    let harness = harness_args();
    let test_python = deploy::ensure_test_python()?;
    // `--workspace`: the end-to-end crate (varta-e2e) is no default member.
    status(
        cargo(&object)
            .args(["test", "--workspace", "--no-fail-fast"])
            .args(test_args(args, &harness))
            .env("VARTA_IMAGE", image)
            .env("VARTA_TEST_PYTHON", test_python),
    )?;
    if args.is_empty() {
        if in_ci() || is_root() {
            eprintln!("xtask: eBPF end-to-end tests again on the image's static binary");
            status(
                cargo(&object)
                    .args(["test", "--package", "varta-e2e", "--test", "ebpf"])
                    .args(test_args(&[], &harness))
                    .env("VARTA_WATCH_BIN", static_bin),
            )?;
        }
        signal_tests()?;
        vm_tests()?;
        // Bounded fuzzing belongs to the full run in CI; elsewhere `cargo xtask fuzz`.
        if in_ci() {
            fuzz::run(std::time::Duration::from_secs(20))?;
        } else {
            eprintln!("xtask: fuzz targets run under CI=true, or with `cargo xtask fuzz`");
        }
    }
    Ok(())
}

/// The VM matrix, every kernel (x86_64 and arm64: about two minutes more on a fresh machine,
/// well inside CI's budget). Under CI it must run; elsewhere it is skipped, with the
/// reason, when qemu is missing and cannot be installed (not root).
fn vm_tests() -> Result<()> {
    let ci = in_ci();
    let qemu = [
        "/usr/bin/qemu-system-x86_64",
        "/usr/bin/qemu-system-aarch64",
    ];
    if !ci && !is_root() && !qemu.iter().all(|q| Path::new(q).exists()) {
        eprintln!(
            "xtask: skipping the VM tests: qemu-system-x86/qemu-system-arm are not installed and installing them needs root (CI runs them)"
        );
        return Ok(());
    }
    let started = std::time::Instant::now();
    vm::run(&[], true)?;
    eprintln!(
        "xtask: VM tests took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if !ci && !is_root() {
        eprintln!(
            "xtask: skipping the systemd VM: debootstrap and its packages need root (CI runs it)"
        );
        return Ok(());
    }
    let started = std::time::Instant::now();
    vm::systemd::run()?;
    eprintln!(
        "xtask: the systemd VM took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The signal module on every supported architecture: natively, then built for aarch64
/// and riscv64 (std from source with nightly) and run under qemu-user; each with glibc's
/// rseq registration at its default and disabled.
fn signal_tests() -> Result<()> {
    let root = workspace_root();
    let native = target_dir().join("debug").join("varta-signal-arch");
    let mut build = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    status(
        build
            .current_dir(&root)
            .args(["build", "--package", "varta-signal-arch"]),
    )?;
    let mut runs = vec![(native, Vec::<String>::new())];
    for (target, linker, qemu, sysroot) in toolchain::CROSS_TARGETS {
        let linker_var = format!(
            "CARGO_TARGET_{}_LINKER",
            target.to_uppercase().replace('-', "_")
        );
        status(
            toolchain::nightly("cargo")
                .current_dir(&root)
                .args([
                    "build",
                    "--quiet",
                    "--package",
                    "varta-signal-arch",
                    "--target",
                    target,
                ])
                .args(["-Z", "build-std=std,panic_abort", "--target-dir"])
                .arg(root.join("target").join("cross"))
                .env(linker_var, linker),
        )
        .with_context(|| format!("building the signal tests for {target}"))?;
        let bin = root
            .join("target/cross")
            .join(target)
            .join("debug/varta-signal-arch");
        runs.push((
            qemu.into(),
            vec!["-L".into(), sysroot.into(), bin.display().to_string()],
        ));
    }
    for (program, args) in runs {
        for rseq in ["default", "off"] {
            eprintln!(
                "xtask: signal tests: {} {} (rseq {rseq})",
                program.display(),
                args.join(" ")
            );
            let mut cmd = Command::new(&program);
            cmd.args(&args);
            if rseq == "off" {
                cmd.env("GLIBC_TUNABLES", "glibc.pthread.rseq=0");
            }
            status(&mut cmd)?;
        }
    }
    Ok(())
}
