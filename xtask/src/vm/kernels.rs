//! Debian's kernels (and busybox-static) for the VM runner, fetched through a private apt
//! configuration and state directory under the tool cache: the machine's own apt
//! configuration is never read for sources nor changed. Everything is cached after the
//! first download.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::toolchain;

/// A guest architecture: Debian's name for it and how qemu boots it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    pub fn debian(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The architecture as `uname -m` prints it (and as the table shows it).
    pub fn uname(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64",
            Arch::Arm64 => "aarch64",
        }
    }

    pub fn is_host(self) -> bool {
        std::env::consts::ARCH == self.uname()
    }
}

/// One kernel of the matrix: the name `--kernels` takes, and where Debian serves it.
#[derive(Debug, Clone, Copy)]
pub struct KernelSpec {
    pub name: &'static str,
    pub arch: Arch,
    pub suite: &'static str,
}

pub const ALL: [KernelSpec; 4] = [
    KernelSpec {
        name: "5.10",
        arch: Arch::Amd64,
        suite: "bullseye",
    },
    KernelSpec {
        name: "6.1",
        arch: Arch::Amd64,
        suite: "bookworm",
    },
    KernelSpec {
        name: "6.12",
        arch: Arch::Amd64,
        suite: "trixie",
    },
    KernelSpec {
        name: "arm64-6.12",
        arch: Arch::Arm64,
        suite: "trixie",
    },
];

/// The suites the private sources list names (each with its `-security` suite).
const SUITES: [&str; 3] = ["bullseye", "bookworm", "trixie"];
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// A downloaded kernel: its image and Debian's name for it (`6.1.0-56-amd64 6.1.192-1`).
#[derive(Debug)]
pub struct Kernel {
    pub image: PathBuf,
    pub package: String,
}

fn vm_cache() -> PathBuf {
    toolchain::cache_dir().join("vm")
}

/// apt-get / apt-cache against the private configuration of one architecture.
struct PrivateApt {
    arch: Arch,
    root: PathBuf,
    updated: bool,
}

impl PrivateApt {
    fn new(arch: Arch) -> Result<Self> {
        let root = vm_cache().join(format!("apt-{}", arch.debian()));
        for dir in [
            "state/lists/partial",
            "cache/archives/partial",
            "download",
            "empty",
        ] {
            fs::create_dir_all(root.join(dir))
                .with_context(|| format!("creating {}", root.join(dir).display()))?;
        }
        let status = root.join("state/status");
        if !status.exists() {
            fs::write(&status, "")?;
        }
        let (main, security) = mirrors();
        let mut list = String::new();
        for suite in SUITES {
            list.push_str(&format!("deb [signed-by={KEYRING}] {main} {suite} main\n"));
            list.push_str(&format!(
                "deb [signed-by={KEYRING}] {security} {suite}-security main\n"
            ));
        }
        fs::write(root.join("sources.list"), list)?;
        Ok(Self {
            arch,
            root,
            updated: false,
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let root = self.root.display();
        for opt in [
            format!("Dir::Etc::sourcelist={root}/sources.list"),
            format!("Dir::Etc::sourceparts={root}/empty"),
            format!("Dir::Etc::preferences={root}/empty/preferences"),
            format!("Dir::Etc::preferencesparts={root}/empty"),
            format!("Dir::State={root}/state"),
            format!("Dir::State::status={root}/state/status"),
            format!("Dir::Cache={root}/cache"),
            format!("APT::Architecture={}", self.arch.debian()),
            format!("APT::Architectures={}", self.arch.debian()),
            // The cache lives in the invoking user's home, which apt's _apt user cannot enter.
            "APT::Sandbox::User=root".into(),
        ] {
            cmd.arg("-o").arg(opt);
        }
        cmd.current_dir(self.root.join("download"));
        cmd
    }

    fn update(&mut self) -> Result<()> {
        if !self.updated {
            eprintln!(
                "xtask: vm: updating the private {} package lists ({})",
                self.arch.debian(),
                SUITES.join(", ")
            );
            crate::status(self.command("apt-get").args(["update", "-qq"]))
                .context("apt-get update (private VM-runner sources)")?;
            self.updated = true;
        }
        Ok(())
    }

    fn query(&self, args: &[&str]) -> Result<String> {
        let out = self
            .command("apt-cache")
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("apt-cache {}", args.join(" ")))?;
        if !out.status.success() {
            bail!("apt-cache {} failed: {}", args.join(" "), out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Downloads PACKAGE and unpacks it into DEST (replaced).
    fn fetch(&self, package: &str, dest: &Path) -> Result<()> {
        eprintln!("xtask: vm: downloading {package} ({})", self.arch.debian());
        let download = self.root.join("download");
        for old in fs::read_dir(&download)? {
            fs::remove_file(old?.path())?;
        }
        let ok = self
            .command("apt-get")
            .args(["download", "-qq", package])
            .status()
            .with_context(|| format!("running apt-get download {package}"))?
            .success();
        let deb = fs::read_dir(&download)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"));
        let Some(deb) = deb.filter(|_| ok) else {
            bail!(
                "could not download the Debian package {package} ({})",
                self.arch.debian()
            );
        };
        let _ = fs::remove_dir_all(dest);
        fs::create_dir_all(dest)?;
        crate::status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dest))
            .with_context(|| format!("unpacking {}", deb.display()))
    }
}

/// The main and security mirrors this machine's Debian sources use (deb822 or one-line
/// format), else deb.debian.org.
pub(super) fn mirrors() -> (String, String) {
    let mut main = None;
    let mut security = None;
    for file in [
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/sources.list",
    ] {
        let text = fs::read_to_string(file).unwrap_or_default();
        for word in text.split_whitespace() {
            if !word.starts_with("http") {
                continue;
            }
            let word = word.trim_end_matches('/').to_owned();
            if word.ends_with("/debian-security") {
                security.get_or_insert(word);
            } else if word.ends_with("/debian") {
                main.get_or_insert(word);
            }
        }
    }
    (
        main.unwrap_or_else(|| "http://deb.debian.org/debian".into()),
        security.unwrap_or_else(|| "http://deb.debian.org/debian-security".into()),
    )
}

/// The kernel images and busybox for the selected kernels, downloaded when not cached.
pub struct Fetcher {
    apts: Vec<PrivateApt>,
}

impl Fetcher {
    pub fn new() -> Self {
        Self { apts: Vec::new() }
    }

    fn apt(&mut self, arch: Arch) -> Result<&mut PrivateApt> {
        if let Some(i) = self.apts.iter().position(|a| a.arch == arch) {
            return Ok(&mut self.apts[i]);
        }
        self.apts.push(PrivateApt::new(arch)?);
        Ok(self.apts.last_mut().expect("just pushed"))
    }

    pub fn kernel(&mut self, spec: &KernelSpec) -> Result<Kernel> {
        let dir = vm_cache().join("kernels").join(spec.name);
        let (image, name_file) = (dir.join("vmlinuz"), dir.join("package"));
        if image.exists() && name_file.exists() {
            return Ok(Kernel {
                image,
                package: fs::read_to_string(&name_file)?.trim().to_owned(),
            });
        }
        let apt = self.apt(spec.arch)?;
        apt.update()?;
        let meta = format!("linux-image-{}", spec.arch.debian());
        let madison = apt.query(&["madison", &meta])?;
        // Newest first; the suite's own version or its security update.
        let version = madison
            .lines()
            .find_map(|l| {
                let cols: Vec<&str> = l.split('|').map(str::trim).collect();
                let from_suite = cols.get(2)?.split_whitespace().nth(1)?;
                let suite = from_suite.split('/').next()?;
                (suite == spec.suite || suite == format!("{}-security", spec.suite))
                    .then(|| cols[1].to_owned())
            })
            .with_context(|| format!("no {meta} in Debian {}: {madison}", spec.suite))?;
        let depends = apt.query(&["depends", &format!("{meta}={version}")])?;
        let image_pkg = depends
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|d| d.starts_with("linux-image-") && !d.contains('<'))
            .with_context(|| format!("{meta}={version} names no kernel package"))?;
        let package = format!("{image_pkg}-unsigned");
        let unpacked = vm_cache().join("unpack");
        apt.fetch(&package, &unpacked)
            .with_context(|| format!("kernel {}", spec.name))?;
        let boot = unpacked.join("boot");
        let vmlinuz = fs::read_dir(&boot)
            .with_context(|| format!("{package} has no /boot"))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-"))
            })
            .with_context(|| format!("{package} has no /boot/vmlinuz-*"))?;
        fs::create_dir_all(&dir)?;
        fs::copy(&vmlinuz, &image)?;
        let label = format!("{image_pkg} {version}");
        fs::write(&name_file, &label)?;
        let _ = fs::remove_dir_all(&unpacked);
        Ok(Kernel {
            image,
            package: label,
        })
    }

    /// Debian's static busybox for ARCH.
    pub fn busybox(&mut self, arch: Arch) -> Result<PathBuf> {
        let cached = vm_cache()
            .join(format!("busybox-{}", arch.debian()))
            .join("busybox");
        if cached.exists() {
            return Ok(cached);
        }
        let apt = self.apt(arch)?;
        apt.update()?;
        let unpacked = vm_cache().join("unpack");
        apt.fetch("busybox-static", &unpacked)?;
        let found = ["usr/bin/busybox", "bin/busybox"]
            .iter()
            .map(|p| unpacked.join(p))
            .find(|p| p.exists())
            .context("busybox-static has no busybox binary")?;
        fs::create_dir_all(cached.parent().expect("has a parent"))?;
        fs::copy(found, &cached)?;
        let _ = fs::remove_dir_all(&unpacked);
        Ok(cached)
    }
}
