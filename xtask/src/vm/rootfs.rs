//! A Debian root filesystem with systemd as PID 1 for `vm-test --systemd`: made once with
//! debootstrap from the mirror this machine's apt already uses, trimmed, and cached under
//! the tool cache as an uncompressed initramfs (the guest runs from it: no disk, no
//! modules to load before systemd starts).

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::{status, toolchain};

/// The suite: Debian 12, whose glibc the development machines' binaries are built against,
/// booted on its own 6.1 kernel.
pub const SUITE: &str = "bookworm";
/// Besides minbase: systemd as init, `ps`/`pgrep` for the scenario.
const INCLUDE: &str = "systemd,systemd-sysv,procps";
/// Bumped when the recipe below changes, so a cached root filesystem is rebuilt.
const RECIPE: u32 = 1;

/// Units that only slow the boot down under emulation, or would fight the scenario for the
/// console.
const MASKED: [&str; 8] = [
    "getty.target",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "systemd-tmpfiles-clean.timer",
    "systemd-timesyncd.service",
];

/// The cached root filesystem as a newc cpio, built when missing.
pub fn ensure() -> Result<PathBuf> {
    let dir = toolchain::cache_dir().join("vm");
    let cpio = dir.join(format!("rootfs-{SUITE}-systemd-r{RECIPE}.cpio"));
    if cpio.exists() {
        return Ok(cpio);
    }
    toolchain::install_missing(&[("/usr/sbin/debootstrap", "debootstrap")])?;
    let root = dir.join(format!("rootfs-{SUITE}-build"));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root)?;
    let (mirror, _) = super::kernels::mirrors();
    eprintln!(
        "xtask: vm: debootstrap {SUITE} (minbase + {INCLUDE}) from {mirror} (a few minutes, once)"
    );
    let log = dir.join("debootstrap.log");
    let out = fs::File::create(&log)?;
    status(
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={INCLUDE}")])
            .args([SUITE])
            .arg(&root)
            .arg(&mirror)
            .stdout(out.try_clone()?)
            .stderr(out),
    )
    .with_context(|| format!("debootstrap {SUITE} (log: {})", log.display()))?;
    trim(&root)?;
    eprintln!("xtask: vm: packing the {SUITE} root filesystem");
    let partial = cpio.with_extension("partial");
    pack(&root, &partial, false)?;
    fs::rename(&partial, &cpio)?;
    let _ = fs::remove_dir_all(&root);
    Ok(cpio)
}

/// Removes what a test guest never reads and masks what it never needs.
fn trim(root: &Path) -> Result<()> {
    for dir in [
        "usr/share/doc",
        "usr/share/man",
        "usr/share/locale",
        "usr/share/info",
        "var/cache/apt",
        "var/lib/apt/lists",
        "var/cache/debconf",
    ] {
        let path = root.join(dir);
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)?;
    }
    let units = root.join("etc/systemd/system");
    fs::create_dir_all(&units)?;
    for unit in MASKED {
        let link = units.join(unit);
        let _ = fs::remove_file(&link);
        symlink("/dev/null", &link)?;
    }
    fs::write(root.join("etc/hostname"), "varta-vm\n")?;
    fs::write(root.join("etc/fstab"), "# the root is the initramfs\n")?;
    // An empty machine-id: systemd makes a transient one at each boot.
    fs::write(root.join("etc/machine-id"), "")?;
    Ok(())
}

/// Packs DIR into a newc cpio at OUT; `as_root` records every file as root's (for a tree a
/// non-root build made).
pub fn pack(dir: &Path, out: &Path, as_root: bool) -> Result<()> {
    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let owner = if as_root { "-R 0:0" } else { "" };
    status(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc {owner} --quiet"
            ))
            .current_dir(dir)
            .stdout(file),
    )
    .with_context(|| format!("packing {} with cpio", dir.display()))
}
