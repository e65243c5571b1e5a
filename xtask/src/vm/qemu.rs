//! Boots one guest under qemu with a deadline: the serial console is captured line by line
//! (and kept in a log file); a guest still running at the deadline is killed and reported.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::kernels::Arch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// qemu exited by itself (the guest powered off or panicked).
    Exited,
    /// Still running at the deadline: killed.
    TimedOut,
}

#[derive(Debug)]
pub struct Boot {
    pub serial: Vec<String>,
    pub ending: Ending,
    pub seconds: f64,
}

/// Boots KERNEL with INITRD; EXTRA is appended to the kernel command line.
pub fn boot(
    arch: Arch,
    accel: Accel,
    kernel: &Path,
    initrd: &Path,
    extra: &str,
    deadline: Duration,
    log: &Path,
) -> Result<Boot> {
    boot_with_memory(arch, accel, kernel, initrd, extra, deadline, log, "1G")
}

/// [`boot`] with MEMORY (qemu's `-m`) instead of 1G: a guest whose root filesystem is its
/// initramfs needs room for both while the kernel unpacks it.
#[allow(clippy::too_many_arguments)]
pub fn boot_with_memory(
    arch: Arch,
    accel: Accel,
    kernel: &Path,
    initrd: &Path,
    extra: &str,
    deadline: Duration,
    log: &Path,
    memory: &str,
) -> Result<Boot> {
    let (program, console, machine): (&str, &str, &[&str]) = match (arch, accel) {
        (Arch::Amd64, Accel::Tcg) => ("qemu-system-x86_64", "ttyS0", &["-cpu", "max"]),
        (Arch::Amd64, Accel::Kvm) => ("qemu-system-x86_64", "ttyS0", &["-cpu", "host"]),
        // Pointer authentication emulated the cheap way: 1.4 s to init instead of 4.5 s.
        (Arch::Arm64, Accel::Tcg) => (
            "qemu-system-aarch64",
            "ttyAMA0",
            &["-M", "virt", "-cpu", "max,pauth-impdef=on"],
        ),
        (Arch::Arm64, Accel::Kvm) => (
            "qemu-system-aarch64",
            "ttyAMA0",
            &["-M", "virt", "-cpu", "host"],
        ),
    };
    let mut cmd = Command::new(program);
    cmd.args(["-accel", accel.name()])
        .args(machine)
        .args(["-smp", "2", "-m", memory, "-no-reboot"])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console={console} panic=-1 quiet {extra}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {program}"))?;
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let tx_err = tx.clone();
    let readers = [
        std::thread::spawn(move || forward(stdout, &tx)),
        std::thread::spawn(move || forward(stderr, &tx_err)),
    ];
    let mut file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut serial = Vec::new();
    let mut ending = Ending::Exited;
    loop {
        let left = deadline.saturating_sub(started.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let _ = writeln!(file, "{line}");
                // After this qemu pauses the guest for good instead of exiting.
                let paused = line.contains("KVM internal error");
                serial.push(line);
                if paused {
                    let _ = child.kill();
                    break;
                }
            }
            // Both pipes closed: qemu is gone.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                ending = Ending::TimedOut;
                let _ = child.kill();
                break;
            }
        }
    }
    let _ = child
        .wait()
        .with_context(|| format!("waiting for {program}"))?;
    for r in readers {
        let _ = r.join();
    }
    let seconds = started.elapsed().as_secs_f64();
    if ending == Ending::TimedOut {
        let _ = writeln!(file, "xtask: killed after {seconds:.0} s");
    }
    Ok(Boot {
        serial,
        ending,
        seconds,
    })
}

fn forward(pipe: impl std::io::Read, tx: &mpsc::Sender<String>) {
    for line in BufReader::new(pipe).split(b'\n') {
        let Ok(line) = line else { return };
        let text = String::from_utf8_lossy(&line)
            .trim_end_matches('\r')
            .to_owned();
        if tx.send(text).is_err() {
            return;
        }
    }
}

/// KVM when this machine's guests can use it (a brief probe boot reaching init), else TCG.
pub fn pick_accel(arch: Arch, kernel: &Path, initrd: &Path, log: &Path) -> Accel {
    let usable = arch.is_host()
        && fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
    if !usable {
        eprintln!(
            "xtask: vm: no usable /dev/kvm for {} guests: TCG",
            arch.uname()
        );
        return Accel::Tcg;
    }
    let probe = boot(
        arch,
        Accel::Kvm,
        kernel,
        initrd,
        "vm_mode=probe",
        // A KVM guest reaches init in about a second; a failing one stalls or pauses.
        Duration::from_secs(8),
        log,
    );
    match probe {
        Ok(b) if super::guest::reached_init(&b.serial) => {
            eprintln!(
                "xtask: vm: KVM probe reached init in {:.1} s: KVM",
                b.seconds
            );
            Accel::Kvm
        }
        _ => {
            eprintln!(
                "xtask: vm: KVM probe did not reach init (see {}): TCG",
                log.display()
            );
            Accel::Tcg
        }
    }
}
