//! `cargo xtask <command>`: everything that is not plain cargo.

mod ebpf;
mod fuzz;
mod toolchain;

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
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run every test: unit, property, conformance and end-to-end (eBPF ones included).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the benchmarks and print their figures.
    Bench,
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
        Task::Build { release } => build(release).map(drop),
        Task::Run { release, args } => run(release, &args),
        Task::Test { args } => test(&args),
        Task::Bench => bench(),
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
fn cargo(object: &Path) -> Command {
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

fn build(release: bool) -> Result<PathBuf> {
    let object = ebpf::build()?;
    let mut cmd = cargo(&object);
    cmd.args(["build", "--package", "varta-watch"]);
    if release {
        cmd.arg("--release");
    }
    status(&mut cmd)?;
    let profile = if release { "release" } else { "debug" };
    Ok(target_dir().join(profile).join("varta-watch"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The embedded development configuration: a socket under /run/varta as root, else under
/// $XDG_RUNTIME_DIR; metrics on 127.0.0.1:9100; a 2 s stall threshold.
fn run(release: bool, args: &[String]) -> Result<()> {
    let bin = build(release)?;
    let dir = if is_root() {
        PathBuf::from("/run/varta")
    } else {
        std::env::var_os("XDG_RUNTIME_DIR")
            .map(|d| PathBuf::from(d).join("varta"))
            .context("not root and XDG_RUNTIME_DIR is unset: pass --socket after `--`")?
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let socket = dir.join("varta.sock");
    let mut cmd = Command::new(&bin);
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

fn test(args: &[String]) -> Result<()> {
    toolchain::ensure_test_packages()?;
    let object = ebpf::build()?;
    status(cargo(&object).args(["build", "--package", "varta-watch"]))?;
    status(
        cargo(&object)
            .args(["test", "--workspace", "--no-fail-fast"])
            .args(args),
    )?;
    if args.is_empty() {
        signal_tests()?;
        // Bounded fuzzing belongs to the full run in CI; elsewhere `cargo xtask fuzz`.
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            fuzz::run(std::time::Duration::from_secs(20))?;
        } else {
            eprintln!("xtask: fuzz targets run under CI=true, or with `cargo xtask fuzz`");
        }
    }
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

/// Benchmarks the release build against itself (eBPF vs userspace) and against the
/// incumbent varta-watch 0.2.0 from crates.io, installed once into the tool cache.
fn bench() -> Result<()> {
    let ours = build(true)?;
    let incumbent = toolchain::ensure_incumbent()?;
    let mut cmd = cargo(&ebpf::build()?);
    cmd.args([
        "run",
        "--release",
        "--quiet",
        "--package",
        "varta-e2e",
        "--bin",
        "varta-bench",
        "--",
    ]);
    status(cmd.arg(ours).arg(incumbent))
}
