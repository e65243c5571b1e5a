//! The DaemonSet's pod as a kubelet runs it, on containerd's CRI.
//!
//! The manifest is rendered as `kubectl apply -k` would send it (`kubectl kustomize
//! deploy/kubernetes`); `tests/cri/kubelet.py` builds from its pod template, and from the
//! example workload pod, the CRI requests a kubelet builds (RunPodSandbox, CreateContainer:
//! namespaces incl. hostPID, hostPath / ConfigMap subPath / Secret mounts, security context,
//! RuntimeDefault seccomp, capabilities, resources) and sends them to a containerd of this
//! test's own (Debian's containerd and runc, `restrict_oom_score_adj = true`, a bridge CNI
//! network, its root, state and socket in a scratch directory). Images: the one `cargo
//! xtask image` built (VARTA_IMAGE), imported from an OCI archive under the manifest's name,
//! and a pause image built here (a static binary calling pause(2)). Checked: the eBPF
//! datapath attaches, the probes answer on the pod's address, an agent in the workload pod
//! (uid 65534, the socket directory read-only) is tracked with its container id and pod uid,
//! and SIGTERM within terminationGracePeriodSeconds exits 0. Then the DaemonSet's rollout
//! (`maxSurge: 1, maxUnavailable: 0`): a second pod of the same template beside the first
//! takes over (`event=resumed from=handover`); the old container holds (running, alive, not
//! ready, no socket but its probe listener) and a restart of it holds at once; the live
//! agent is counted on without a gap, an agent wedged 300 ms before the rollout is surfaced
//! exactly once, carried counters never go down; the old pod, deleted, exits 0 at once on
//! SIGTERM and the new one counts on.
//!
//! `cargo xtask test` installs containerd, runc, the CNI plugins and a Python venv with
//! grpcio, protobuf and PyYAML (VARTA_TEST_PYTHON). Under CI=true anything missing fails.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use varta_e2e::{
    EBPF, Proc,
    deploy::{self, repo},
    require_root, scratch,
};

/// What the test needs that `cargo xtask test` installs: (program, probe arguments).
const TOOLS: [(&str, &[&str]); 6] = [
    ("containerd", &["--version"]),
    ("ctr", &["--version"]),
    ("runc", &["--version"]),
    ("musl-gcc", &["--version"]),
    ("buildah", &["--version"]),
    ("kubectl", &["version", "--client"]),
];
const CNI_BIN: &str = "/usr/lib/cni";

/// Skips (or, under CI=true, fails) with the reason.
/// What the test needs and lacks: it fails naming it (a plain `cargo test` ignores it).
fn unavailable(why: &str) -> bool {
    varta_e2e::require("the CRI test", false, why);
    true
}

/// containerd started on a private configuration; stopped, unmounted and removed on drop.
struct Containerd {
    proc: Option<Proc>,
    dir: PathBuf,
    bridge: String,
    pause: String,
}

impl Containerd {
    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("-a").arg(self.socket()).args(["-n", "k8s.io"]);
        cmd
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(p) = self.proc.take() {
            p.signal(libc::SIGTERM);
            let _ = p.wait();
        }
        // Shims exit with their containers; what containerd mounted under its root goes.
        remove_run_dir(&self.dir);
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        let _ = Command::new("podman").args(["rmi", &self.pause]).output();
    }
}

/// A run's directory under /run, with what is mounted below it (deepest first).
fn remove_run_dir(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dir_s = dir.display().to_string();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&dir_s))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").args(["-l", p]).output();
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// What an earlier run killed before its cleanup left (its directory, mounts and pause
/// image are named by its pid): removed when that process is gone.
fn remove_stale_runs() {
    let Ok(entries) = std::fs::read_dir("/run") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("varta-cri-") else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        eprintln!("deploy_cri: removing /run/{name}, left by an interrupted run");
        remove_run_dir(&entry.path());
        let _ = Command::new("podman")
            .args(["rmi", &format!("localhost/varta-pause:test-{pid}")])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &format!("vcri{}", pid % 100_000)])
            .output();
    }
}

/// The pause image: a static binary that sleeps in pause(2) and exits on SIGTERM/SIGINT,
/// reaping children (the kubelet's pause does the same), as an OCI archive.
fn pause_image(dir: &Path, name: &str) -> PathBuf {
    let src = dir.join("pause.c");
    std::fs::write(
        &src,
        "#include <signal.h>\n#include <sys/wait.h>\n#include <unistd.h>\n\
         static void stop(int s) { (void)s; _exit(0); }\n\
         static void reap(int s) { (void)s; while (waitpid(-1, 0, WNOHANG) > 0) {} }\n\
         int main(void) { signal(SIGINT, stop); signal(SIGTERM, stop); signal(SIGCHLD, reap);\n\
         for (;;) pause(); }\n",
    )
    .unwrap();
    let bin = dir.join("pause");
    let (ok, out) = deploy::run(
        Command::new("musl-gcc")
            .args(["-static", "-Os", "-o"])
            .arg(&bin)
            .arg(&src),
    );
    assert!(ok, "building the pause binary: {out}");
    let (ok, ctr) = deploy::run(Command::new("buildah").args(["from", "scratch"]));
    assert!(ok, "buildah from scratch: {ctr}");
    let ctr = ctr.trim().lines().last().unwrap().to_owned();
    for args in [
        vec![
            "copy".into(),
            ctr.clone(),
            bin.display().to_string(),
            "/pause".into(),
        ],
        vec![
            "config".into(),
            "--entrypoint".into(),
            "[\"/pause\"]".into(),
            ctr.clone(),
        ],
        vec!["commit".into(), "--quiet".into(), ctr.clone(), name.into()],
        vec!["rm".into(), ctr.clone()],
    ] {
        let (ok, out) = deploy::run(Command::new("buildah").args(&args));
        assert!(ok, "buildah {args:?}: {out}");
    }
    let archive = dir.join("pause.tar");
    let (ok, out) = deploy::run(
        Command::new("podman")
            .args(["save", "--quiet", "--format", "oci-archive", "-o"])
            .arg(&archive)
            .arg(name),
    );
    assert!(ok, "podman save {name}: {out}");
    archive
}

/// Every `image:` of the rendered manifest and the workload pod, as containerd names it
/// (`varta-watch:0.1.0` is `docker.io/library/varta-watch:0.1.0`).
fn image_names(yaml: &str) -> Vec<String> {
    let mut names: Vec<String> = yaml
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image: "))
        .map(|i| {
            let i = i.trim().trim_matches('"');
            let i = if i.contains('/') {
                i.to_owned()
            } else {
                format!("docker.io/library/{i}")
            };
            if i.rsplit('/').next().unwrap().contains(':') {
                i
            } else {
                format!("{i}:latest")
            }
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn the_daemonset_pod_runs_on_containerd_cri_as_a_kubelet_runs_it_needs_root() {
    require_root!(EBPF);
    for (tool, probe) in TOOLS {
        deploy::require_tool("deploy_cri", tool, probe);
    }
    if !Path::new(CNI_BIN).join("bridge").exists()
        && unavailable("no CNI plugins in /usr/lib/cni (Debian containernetworking-plugins)")
    {
        return;
    }
    let (Some(image), Some(python)) = (
        std::env::var_os("VARTA_IMAGE"),
        std::env::var_os("VARTA_TEST_PYTHON"),
    ) else {
        unavailable("VARTA_IMAGE or VARTA_TEST_PYTHON is unset: run it with `cargo xtask test`");
        return;
    };
    let started = Instant::now();
    let scratch_dir = scratch("cri");
    // containerd's socket paths must stay short; a directory of its own under /run.
    let id = std::process::id();
    remove_stale_runs();
    let dir = PathBuf::from(format!("/run/varta-cri-{id}"));
    let _ = std::fs::remove_dir_all(&dir);
    for d in ["cni", "node/sys/fs/bpf"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    // The node's bpffs, as systemd mounts it at boot (the hostPath /sys/fs/bpf): the pods
    // pin their maps there and the rollout's new pod reopens them. Unmounted with the rest.
    let (ok, out) = deploy::run(
        Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir.join("node/sys/fs/bpf")),
    );
    assert!(ok, "mounting the node's bpffs: {out}");
    let pause = format!("localhost/varta-pause:test-{id}");
    let bridge = format!("vcri{}", id % 100_000);
    let subnet = format!("10.231.{}.0/24", id % 250);

    // The manifest as the API server would receive it.
    let (ok, rendered) = deploy::run(
        Command::new("kubectl")
            .arg("kustomize")
            .arg(repo().join("deploy/kubernetes")),
    );
    assert!(ok, "kubectl kustomize deploy/kubernetes:\n{rendered}");
    let manifest = scratch_dir.join("rendered.yaml");
    std::fs::write(&manifest, &rendered).unwrap();
    let (ok, userspace) = deploy::run(
        Command::new("kubectl")
            .arg("kustomize")
            .arg(repo().join("deploy/kubernetes-userspace")),
    );
    assert!(
        ok,
        "kubectl kustomize deploy/kubernetes-userspace:\n{userspace}"
    );
    let userspace_manifest = scratch_dir.join("rendered-userspace.yaml");
    std::fs::write(&userspace_manifest, &userspace).unwrap();
    let workload = repo().join("deploy/kubernetes/examples/workload-pod.yaml");
    let names = image_names(&format!(
        "{rendered}\n{}",
        std::fs::read_to_string(&workload).unwrap()
    ));
    assert_eq!(
        names.len(),
        1,
        "the DaemonSet and the workload pod should run the one image: {names:?}"
    );

    let config = format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # root here lacks CAP_SYS_RESOURCE: runc may not lower oom_score_adj below its own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{d}/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
"#,
        d = dir.display()
    );
    std::fs::write(dir.join("config.toml"), config).unwrap();
    std::fs::write(
        dir.join("cni/10-varta-test.conflist"),
        format!(
            r#"{{"cniVersion":"0.4.0","name":"varta-test","plugins":[{{"type":"bridge","bridge":"{bridge}","isGateway":true,"ipMasq":false,"ipam":{{"type":"host-local","ranges":[[{{"subnet":"{subnet}"}}]],"dataDir":"{d}/ipam"}}}}]}}"#,
            d = dir.display()
        ),
    )
    .unwrap();

    let pause_archive = pause_image(&scratch_dir, &pause);
    let image_archive = scratch_dir.join("image.tar");
    let (ok, out) = deploy::run(
        Command::new("podman")
            .args(["save", "--quiet", "--format", "oci-archive", "-o"])
            .arg(&image_archive)
            .arg(&image),
    );
    assert!(ok, "podman save {}: {out}", image.to_string_lossy());

    let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
    let mut containerd = Containerd {
        proc: Some(Proc::spawn(
            Command::new("containerd")
                .arg("--config")
                .arg(dir.join("config.toml"))
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        )),
        dir: dir.clone(),
        bridge,
        pause: pause.clone(),
    };
    let up = Instant::now();
    while !containerd.socket().exists() {
        if let Some(st) = containerd.proc.as_mut().unwrap().try_wait() {
            panic!(
                "containerd exited ({st}):\n{}",
                std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
            );
        }
        assert!(
            up.elapsed() < Duration::from_secs(30),
            "containerd did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for (archive, index_name) in [(&pause_archive, None), (&image_archive, Some(&names[0]))] {
        let mut cmd = containerd.ctr();
        cmd.args(["images", "import"]);
        if let Some(n) = index_name {
            cmd.args(["--index-name", n]);
        }
        let (ok, out) = deploy::run(cmd.arg(archive));
        assert!(ok, "ctr images import {}: {out}", archive.display());
    }

    let token = "5a".repeat(32);
    let driver = Proc::spawn(
        Command::new(&python)
            .arg(repo().join("tests/cri/kubelet.py"))
            .arg("--socket")
            .arg(containerd.socket())
            .arg("--manifest")
            .arg(&manifest)
            .arg("--workload")
            .arg(&workload)
            .arg("--userspace-manifest")
            .arg(&userspace_manifest)
            .arg("--node-root")
            .arg(dir.join("node"))
            .args(["--token", &token])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let out = driver.wait_with_output();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    let verdicts = varta_e2e::deploy::repo().join("target/cri-verdicts.txt");
    let _ = std::fs::write(&verdicts, &text);
    let containerd_log = std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default();
    drop(containerd);
    assert!(
        out.status.success(),
        "the pod did not run as the manifest says ({}):\n{text}\ncontainerd's log (last 40 lines):\n{}",
        out.status,
        containerd_log
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!("the CRI test took {:.1} s", started.elapsed().as_secs_f64());
}
