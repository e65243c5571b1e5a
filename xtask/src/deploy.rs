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
    // The socket-activation restart test (tests/tests/takeover.rs).
    ("/usr/bin/systemd-socket-activate", "systemd"),
    ("/usr/bin/setpriv", "util-linux"),
    ("/usr/bin/pip3", "python3-pip"),
    // The DaemonSet's pod on containerd's CRI (tests/tests/deploy_cri.rs).
    ("/usr/bin/containerd", "containerd"),
    ("/usr/bin/ctr", "containerd"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    // `kubectl kustomize` renders the manifests (kept when the machine has a newer kubectl).
    ("/usr/bin/kubectl", "kubernetes-client"),
];

/// What the CRI test's Python "kubelet" (tests/cri/kubelet.py) imports, from PyPI.
/// The tests' Python packages: the CRI test's kubelet stand-in, and the upstream PyPI client
/// (`varta` 0.2.0) as an agent.
const TEST_PYTHON_PACKAGES: [&str; 4] = [
    "grpcio>=1.60,<2",
    "protobuf>=4.25,<7",
    "PyYAML>=6,<7",
    "varta==0.2.0",
];

pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// Installs, when missing, everything the deploy tests run; one `xtask:` line per step.
pub fn ensure_tools() -> Result<()> {
    crate::toolchain::install_missing(PACKAGES)?;
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

/// A virtual environment under the tool cache with grpcio, protobuf and PyYAML for the
/// CRI test; its python.
pub fn ensure_test_python() -> Result<std::path::PathBuf> {
    let venv = crate::toolchain::cache_dir().join("test-venv");
    let python = venv.join("bin/python");
    let stamp = venv.join("installed");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == TEST_PYTHON_PACKAGES.join(" ")) {
        return Ok(python);
    }
    eprintln!(
        "xtask: creating the tests' Python venv ({}) from PyPI",
        TEST_PYTHON_PACKAGES.join(", ")
    );
    let _ = std::fs::remove_dir_all(&venv);
    status(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    status(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(TEST_PYTHON_PACKAGES),
    )?;
    std::fs::write(&stamp, TEST_PYTHON_PACKAGES.join(" "))?;
    Ok(python)
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

/// The image's name in local container storage.
pub const IMAGE: &str = "localhost/varta-watch:dev";

/// Builds the static binary as shipped (musl, profile `dist`, eBPF object embedded).
pub fn static_binary(object: &Path) -> Result<std::path::PathBuf> {
    ensure_musl_target()?;
    eprintln!("xtask: building the static varta-watch ({MUSL_TARGET}, profile dist)");
    crate::status(crate::cargo(object).args([
        "build",
        "--quiet",
        "--profile",
        "dist",
        "--package",
        "varta-watch",
        "--target",
        MUSL_TARGET,
    ]))?;
    let bin = crate::target_dir()
        .join(MUSL_TARGET)
        .join("dist")
        .join("varta-watch");
    // A static binary has no program interpreter (PT_INTERP) to resolve at exec.
    let elf = std::fs::read(&bin)?;
    if elf.windows(b"/ld-linux".len()).any(|w| w == b"/ld-linux") {
        bail!("{} is dynamically linked", bin.display());
    }
    Ok(bin)
}

/// `cargo xtask image`: the static binary, then deploy/Containerfile with buildah; prints
/// the image id and size. Returns the image id and the static binary it holds.
pub fn image(object: &Path) -> Result<(String, std::path::PathBuf)> {
    let bin = static_binary(object)?;
    let root = crate::workspace_root();
    let context = crate::target_dir().join("image-context");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context)?;
    std::fs::copy(&bin, context.join("varta-watch"))?;
    std::fs::copy(
        root.join("deploy/kubernetes/varta.toml"),
        context.join("varta.toml"),
    )?;
    eprintln!("xtask: building image {IMAGE} from deploy/Containerfile (buildah)");
    let out = Command::new("buildah")
        .args(["build", "--quiet", "--layers=false", "-f"])
        .arg(root.join("deploy/Containerfile"))
        .args(["-t", IMAGE])
        .arg(&context)
        .output()?;
    if !out.status.success() {
        bail!(
            "buildah build failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let inspect = Command::new("podman")
        .args(["image", "inspect", "--format", "{{.Id}} {{.Size}}", IMAGE])
        .output()?;
    if !inspect.status.success() {
        bail!(
            "podman image inspect {IMAGE}: {}",
            String::from_utf8_lossy(&inspect.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&inspect.stdout);
    let mut parts = text.split_whitespace();
    let (id, size) = (parts.next().unwrap_or("?"), parts.next().unwrap_or("0"));
    let size: u64 = size.parse().unwrap_or(0);
    println!(
        "image {IMAGE} id={} size={size} bytes ({:.1} MiB)",
        &id[..id.len().min(12)],
        size as f64 / (1024.0 * 1024.0)
    );
    // The id, not the tag: another checkout building meanwhile may move the tag.
    Ok((id.to_owned(), bin))
}
