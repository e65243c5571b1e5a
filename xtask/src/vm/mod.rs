//! `cargo xtask vm-test`: the daemon, with the eBPF object embedded, booted on Debian's
//! kernels under qemu, each guest running the same scenario (see init.sh and scenario.rs).
//! One verdict line per kernel, then a table.

mod guest;
mod initramfs;
mod kernels;
mod qemu;
mod rootfs;
mod scenario;
pub mod systemd;

use std::{path::PathBuf, time::Duration, time::Instant};

use anyhow::{Result, bail};

use crate::{ebpf, target_dir, toolchain};
use kernels::{ALL, Arch, KernelSpec};
use qemu::{Accel, Ending};
use scenario::Report;

/// A guest still running after this is hung: killed and reported. A scenario takes 11 to
/// 19 s under TCG on an idle machine; this leaves room for a busy one.
const DEADLINE: Duration = Duration::from_secs(180);

/// The default selection: the x86_64 set.
fn default_kernels() -> Vec<String> {
    ALL.iter()
        .filter(|k| k.arch == Arch::Amd64)
        .map(|k| k.name.to_owned())
        .collect()
}

fn select(names: &[String], full: bool) -> Result<Vec<KernelSpec>> {
    let names = match (names.is_empty(), full) {
        (_, true) => ALL.iter().map(|k| k.name.to_owned()).collect(),
        (true, false) => default_kernels(),
        (false, false) => names.to_vec(),
    };
    names
        .iter()
        .map(|n| {
            ALL.iter().find(|k| k.name == n).copied().ok_or_else(|| {
                let known: Vec<_> = ALL.iter().map(|k| k.name).collect();
                anyhow::anyhow!(
                    "--kernels: unknown kernel {n:?} (known: {})",
                    known.join(", ")
                )
            })
        })
        .collect()
}

/// One row of the result: a report, or why there is none.
struct Row {
    spec: KernelSpec,
    report: Report,
}

pub fn run(names: &[String], full: bool) -> Result<()> {
    let specs = select(names, full)?;
    let started = Instant::now();
    let arm64 = specs.iter().any(|k| k.arch == Arch::Arm64);
    toolchain::ensure_vm_packages(arm64)?;
    let object = ebpf::build()?;
    let logs = target_dir().join("vm");
    std::fs::create_dir_all(&logs)?;

    let mut fetcher = kernels::Fetcher::new();
    let mut images: Vec<(Arch, PathBuf, Accel)> = Vec::new();
    let mut rows = Vec::new();
    for spec in &specs {
        let mut row = Row {
            spec: *spec,
            report: Report::default(),
        };
        let kernel = match fetcher.kernel(spec) {
            Ok(k) => k,
            Err(e) => {
                row.report.problems.push(format!("{e:#}"));
                println!("xtask: vm-test {}: FAIL: {e:#}", spec.name);
                rows.push(row);
                continue;
            }
        };
        if !images.iter().any(|(a, _, _)| *a == spec.arch) {
            let busybox = fetcher.busybox(spec.arch)?;
            let initrd = initramfs::build(spec.arch, &object, &busybox)?;
            let probe_log = logs.join(format!("kvm-probe-{}.log", spec.arch.uname()));
            let accel = qemu::pick_accel(spec.arch, &kernel.image, &initrd, &probe_log);
            images.push((spec.arch, initrd, accel));
        }
        let (_, initrd, accel) = images
            .iter()
            .find(|(a, _, _)| *a == spec.arch)
            .expect("built above");
        let log = logs.join(format!("{}-serial.log", spec.name));
        eprintln!(
            "xtask: vm-test {}: booting {} ({}, {})",
            spec.name,
            kernel.package,
            spec.arch.uname(),
            accel.name()
        );
        let boot = qemu::boot(
            spec.arch,
            *accel,
            &kernel.image,
            initrd,
            &scenario::cmdline(),
            DEADLINE,
            &log,
        )?;
        row.report = scenario::judge(&boot.serial);
        if boot.ending == Ending::TimedOut {
            row.report.problems = vec![format!(
                "hung: killed after {:.0} s; the guest's last line: {}",
                boot.seconds,
                guest::progress(&boot.serial)
            )];
        }
        let verdict = if row.report.problems.is_empty() {
            "PASS".to_owned()
        } else {
            format!(
                "FAIL: {} (serial log: {})",
                row.report.problems.join("; "),
                log.display()
            )
        };
        println!(
            "xtask: vm-test {} ({}, {}, {}, {:.1} s, least privilege {}): {verdict}",
            spec.name,
            row.report.release,
            spec.arch.uname(),
            accel.name(),
            boot.seconds,
            or_dash(&row.report.least_privilege),
        );
        rows.push(row);
    }
    print_table(&rows);
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| !r.report.problems.is_empty())
        .map(|r| r.spec.name)
        .collect();
    println!(
        "xtask: vm-test: {} kernels in {:.0} s",
        rows.len(),
        started.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        bail!("vm-test failed on {}", failed.join(", "));
    }
    Ok(())
}

fn print_table(rows: &[Row]) {
    let header = [
        "kernel",
        "arch",
        "datapath",
        "attest",
        "beats",
        "spoof_dropped",
        "junk_dropped",
        "stall",
        "sigterm",
        "fallback_reason_ok",
    ];
    let num = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
    let yes = |b: bool| if b { "yes" } else { "no" }.to_owned();
    let mut lines = vec![header.map(str::to_owned).to_vec()];
    for r in rows {
        let rep = &r.report;
        let kernel = if rep.release.is_empty() || rep.release == "-" {
            r.spec.name.to_owned()
        } else {
            rep.release.clone()
        };
        lines.push(vec![
            kernel,
            r.spec.arch.uname().to_owned(),
            or_dash(&rep.datapath),
            or_dash(&rep.attest),
            num(rep.beats),
            num(rep.spoof_dropped),
            num(rep.junk_dropped),
            yes(rep.stall),
            rep.sigterm.map_or("-".to_owned(), |s| format!("exit {s}")),
            yes(rep.fallback_reason_ok),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| lines.iter().map(|l| l[i].len()).max().unwrap_or(0))
        .collect();
    for l in lines {
        let cells: Vec<String> = l
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}
