//! The container image (`cargo xtask image`, named in VARTA_IMAGE by `cargo xtask test`) run
//! with podman the way the DaemonSet runs it: host pid namespace, the socket directory
//! bind-mounted, the ConfigMap's file mounted at /etc/varta, all capabilities dropped but the
//! manifest's, no new privileges, a read-only root filesystem, uid 0. The eBPF datapath must
//! attach, a beat from a host process must be tracked, and SIGTERM must exit 0.
//!
//! Differences from a pod, on purpose: `--network host` with metrics on a free port of the
//! manifest's address (a pod has its own network namespace; this machine has no pod
//! network), the Secret's token file mounted from a scratch file, and
//! `--runtime runc` plus explicit ulimits, which this machine needs (see README).

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use varta_e2e::{
    EBPF, Proc, bin,
    deploy::{self, http_get},
    log_has, require_root, scratch,
};

/// `podman run` in the foreground; the container is removed when dropped.
struct Container {
    name: String,
    run: Option<Proc>,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Container {
    /// The first log line having each of `parts` (see `log_has`), or None after `timeout`.
    fn wait_log(&self, parts: &[&str], timeout: Duration) -> Option<String> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| parts.iter().all(|p| log_has(l, p)))
            {
                return Some(l.clone());
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log_text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "--force", "--time", "0", &self.name])
            .output();
        drop(self.run.take());
    }
}

/// Podman's default seccomp profile, granting `bpf` with CAP_BPF and `perf_event_open` with
/// CAP_PERFMON as containerd's and CRI-O's RuntimeDefault do (the DaemonSet asks for
/// RuntimeDefault). Debian 12's podman profile allows them only with CAP_SYS_ADMIN: with
/// it unchanged, map creation fails and the daemon falls back to userspace.
fn runtime_default_seccomp(dir: &std::path::Path) -> std::path::PathBuf {
    let out = dir.with_extension("seccomp.json");
    let script = r#"
import json, sys
p = json.load(open("/usr/share/containers/seccomp.json"))
for e in p["syscalls"]:
    if e["action"] == "SCMP_ACT_ERRNO":
        e["names"] = [n for n in e["names"] if n not in ("bpf", "perf_event_open")]
p["syscalls"] = [e for e in p["syscalls"] if e["names"]]
for name, cap in (("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")):
    p["syscalls"].append({"names": [name], "action": "SCMP_ACT_ALLOW", "includes": {"caps": [cap]}})
json.dump(p, open(sys.argv[1], "w"))
"#;
    let (ok, text) = deploy::run(Command::new("python3").args(["-c", script]).arg(&out));
    assert!(ok, "deriving the seccomp profile: {text}");
    out
}

#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn the_image_runs_as_the_daemonset_does_attaches_ebpf_tracks_a_host_beat_and_stops_on_sigterm_needs_root()
 {
    require_root!(EBPF);
    let image = std::env::var("VARTA_IMAGE").unwrap_or_default();
    varta_e2e::require(
        varta_e2e::this_test!(),
        !image.is_empty(),
        "VARTA_IMAGE is unset (`cargo xtask test` builds the image and sets it)",
    );
    let caps = deploy::manifest_capabilities();
    let dir = scratch("image");
    let port = deploy::free_port();
    let token_dir = scratch("image-token");
    let (token_file, token) = deploy::token_file(&token_dir);
    let token_mount = deploy::manifest_config("prom-token-file");
    let ip = deploy::manifest_config("prom-addr")
        .rsplit_once(':')
        .unwrap()
        .0
        .to_owned();
    let name = format!("varta-test-{}", std::process::id());
    let mut cmd = Command::new("podman");
    cmd.args(["--runtime", "runc", "run", "--rm", "--name", &name])
        .args(["--pid=host", "--network=host", "--user", "0:0"])
        .args([
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=4096:4096",
        ])
        .args(["--cap-drop=all", &format!("--cap-add={}", caps.join(","))])
        .args(["--security-opt", "no-new-privileges", "--read-only"])
        .arg(format!(
            "--security-opt=seccomp={}",
            runtime_default_seccomp(&dir).display()
        ))
        .arg("--volume")
        .arg(format!("{}:/run/varta", dir.display()))
        .arg("--volume")
        .arg(format!(
            "{}:/etc/varta/varta.toml:ro",
            deploy::private_copy(&token_dir, "kubernetes/varta.toml").display()
        ))
        .arg("--volume")
        .arg(format!("{}:{token_mount}:ro", token_file.display()))
        .args(["--env", "VARTA_LOG=info", &image])
        .args(["--config", "/etc/varta/varta.toml", "--threshold-ms", "500"])
        .arg(format!("--prom-addr={ip}:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut run = Proc::spawn(&mut cmd);
    let stderr = run.take_stderr().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    let mut c = Container {
        name,
        run: Some(run),
        lines,
    };
    let Some(ready) = c.wait_log(&["event=ready"], Duration::from_secs(60)) else {
        let exited = c.run.as_mut().unwrap().try_wait();
        panic!(
            "podman could not run the image ({}); podman said:\n{}",
            exited.map_or("still running".into(), |s| s.to_string()),
            c.log_text()
        );
    };
    assert!(ready.contains("datapath=ebpf"), "{}", c.log_text());
    assert!(ready.contains("socket=/run/varta/varta.sock"), "{ready}");
    // What the kubelet probes and Prometheus (with the Secret's token) see.
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(http_get(addr, "/readyz"), (200, "ready\n".to_owned()));
    assert_eq!(http_get(addr, "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(http_get(addr, "/metrics").0, 401);
    let (code, body) = deploy::http_get_with_token(addr, "/metrics", Some(&token));
    assert_eq!(code, 200);
    assert!(
        body.contains("varta_datapath_info{mode=\"ebpf\",attest="),
        "{body}"
    );

    // A host process beats through the bind-mounted directory; the container sees its pid.
    let agent = Proc::spawn(
        Command::new(bin())
            .args(["agent", "--interval-ms", "100", "--socket"])
            .arg(dir.join("varta.sock"))
            .stderr(Stdio::null()),
    );
    let pid = format!("pid={}", agent.pid());
    let tracked = c.wait_log(&["event=agent_new", &pid], Duration::from_secs(10));
    drop(agent);
    assert!(tracked.is_some(), "beat not tracked:\n{}", c.log_text());
    let stall = c.wait_log(&["event=stall", &pid], Duration::from_secs(10));
    assert!(stall.is_some(), "no stall:\n{}", c.log_text());

    let (ok, out) = deploy::run(Command::new("podman").args(["kill", "--signal", "TERM", &c.name]));
    assert!(ok, "podman kill: {out}");
    let status = c.run.take().unwrap().wait();
    assert!(
        status.success(),
        "exit after SIGTERM: {status}\n{}",
        c.log_text()
    );
    let _ = std::fs::remove_file(dir.with_extension("seccomp.json"));
}
