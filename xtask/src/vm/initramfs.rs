//! One initramfs per guest architecture, from artifacts built once: the daemon with the
//! eBPF object embedded (for x86_64 the very binary `cargo xtask build` and the end-to-end
//! tests use; for arm64 the same sources cross-built, the same bpfel object), the test
//! sender, the capability helper, Debian's busybox, their shared libraries and `/init`.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use super::kernels::Arch;
use crate::{cargo, status, target_dir, toolchain, toolchain::capture};

/// The guest's `/init` (busybox sh): the scenario each VM runs.
const INIT: &str = include_str!("init.sh");
/// The helpers the scenario runs besides the daemon (tests/src/bin).
const HELPERS: [&str; 2] = ["varta-sender", "varta-caps"];
const AARCH64: &str = "aarch64-unknown-linux-gnu";
const AARCH64_SYSROOT: &str = "/usr/aarch64-linux-gnu/lib";

/// Builds the guest binaries for ARCH and packs them with BUSYBOX into an uncompressed
/// initramfs (the guest copies it instead of decompressing it under emulation).
pub fn build(arch: Arch, object: &Path, busybox: &Path) -> Result<PathBuf> {
    let bins = binaries(arch, object)?;
    eprintln!("xtask: vm: packing the {} initramfs", arch.uname());
    let root = target_dir()
        .join("vm")
        .join(format!("root-{}", arch.uname()));
    let _ = fs::remove_dir_all(&root);
    for dir in ["bin", "proc", "sys", "dev", "tmp", "run"] {
        fs::create_dir_all(root.join(dir))?;
    }
    // A temporary directory is 0700: unprivileged senders in the guest could not reach
    // the socket.
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755))?;
    copy_into(&root, busybox, "/bin/busybox")?;
    for bin in &bins {
        let name = bin.file_name().and_then(|n| n.to_str()).expect("named");
        copy_into(&root, bin, &format!("/bin/{name}"))?;
    }
    for (src, dest) in shared_libraries(arch, &bins)? {
        copy_into(&root, &src, &dest)?;
    }
    fs::write(root.join("init"), INIT)?;
    fs::set_permissions(root.join("init"), fs::Permissions::from_mode(0o755))?;

    let image = target_dir()
        .join("vm")
        .join(format!("initramfs-{}.cpio", arch.uname()));
    let out = fs::File::create(&image).with_context(|| format!("creating {}", image.display()))?;
    status(
        Command::new("sh")
            .args([
                "-c",
                "find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet",
            ])
            .current_dir(&root)
            .stdout(out),
    )
    .context("packing the initramfs with cpio")?;
    Ok(image)
}

fn copy_into(root: &Path, src: &Path, guest_path: &str) -> Result<()> {
    let dest = root.join(guest_path.trim_start_matches('/'));
    fs::create_dir_all(dest.parent().expect("has a parent"))?;
    fs::copy(src, &dest).with_context(|| format!("copying {}", src.display()))?;
    Ok(())
}

/// The daemon first, then the helpers.
fn binaries(arch: Arch, object: &Path) -> Result<Vec<PathBuf>> {
    let (target, out_dir) = if arch.is_host() {
        (None, target_dir().join("debug"))
    } else if arch == Arch::Arm64 {
        toolchain::ensure_rust_target(AARCH64)?;
        eprintln!("xtask: vm: cross-building the daemon and helpers for {AARCH64}");
        (Some(AARCH64), target_dir().join(AARCH64).join("debug"))
    } else {
        bail!("no cross build for {} guests", arch.uname());
    };
    let with_target = |cmd: &mut Command| {
        if let Some(t) = target {
            cmd.args(["--target", t]).env(
                "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
                "aarch64-linux-gnu-gcc",
            );
        }
    };
    let mut daemon = cargo(object);
    daemon.args(["build", "--package", "varta-watch"]);
    with_target(&mut daemon);
    status(&mut daemon).context("building varta-watch for the VM")?;
    let mut helpers = cargo(object);
    helpers.args(["build", "--package", "varta-e2e"]);
    for h in HELPERS {
        helpers.args(["--bin", h]);
    }
    with_target(&mut helpers);
    status(&mut helpers).context("building the VM test helpers")?;
    Ok(std::iter::once("varta-watch")
        .chain(HELPERS)
        .map(|b| out_dir.join(b))
        .collect())
}

/// (file on this machine, path in the guest) of every shared library the binaries load.
fn shared_libraries(arch: Arch, bins: &[PathBuf]) -> Result<Vec<(PathBuf, String)>> {
    let mut libs: Vec<(PathBuf, String)> = Vec::new();
    for bin in bins {
        let found = if arch.is_host() {
            ldd(bin)?
        } else {
            cross_needed(bin)?
        };
        for lib in found {
            if !libs.contains(&lib) {
                libs.push(lib);
            }
        }
    }
    Ok(libs)
}

fn ldd(bin: &Path) -> Result<Vec<(PathBuf, String)>> {
    let text = capture(Command::new("ldd").arg(bin))?;
    // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`
    Ok(text
        .lines()
        .filter_map(|l| {
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/')
                .then(|| (PathBuf::from(path), path.to_owned()))
        })
        .collect())
}

/// A cross-built binary's interpreter and NEEDED libraries, from the cross sysroot, placed
/// where Debian's arm64 loader looks for them.
fn cross_needed(bin: &Path) -> Result<Vec<(PathBuf, String)>> {
    let headers = capture(
        Command::new("aarch64-linux-gnu-readelf")
            .arg("-lW")
            .arg(bin),
    )?;
    let interp = headers
        .lines()
        .find_map(|l| l.split("program interpreter: ").nth(1))
        .and_then(|rest| rest.strip_suffix(']'))
        .with_context(|| format!("{} names no program interpreter", bin.display()))?;
    let file = Path::new(interp).file_name().expect("interpreter file");
    let mut libs = vec![(Path::new(AARCH64_SYSROOT).join(file), interp.to_owned())];
    let dynamic = capture(
        Command::new("aarch64-linux-gnu-readelf")
            .arg("-dW")
            .arg(bin),
    )?;
    for l in dynamic.lines().filter(|l| l.contains("(NEEDED)")) {
        let name = l
            .split('[')
            .nth(1)
            .and_then(|r| r.strip_suffix(']'))
            .with_context(|| format!("unreadable NEEDED line: {l}"))?;
        libs.push((
            Path::new(AARCH64_SYSROOT).join(name),
            format!("/lib/aarch64-linux-gnu/{name}"),
        ));
    }
    Ok(libs)
}
