//! Agents named by what operators know: an agent in a cgroup named like a Kubernetes
//! container scope (containerd, systemd driver) and one in a systemd service's cgroup,
//! created under this machine's cgroup v2 mount. Their stall/agent_new lines and
//! `varta_agent_info` carry comm, unit, container id and pod UID; the info series goes when
//! the agent leaves the tracker (evicted here, with a capacity of one).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use varta_e2e::{Daemon, Proc, bin, require_root};

const CONTAINER: &str = "4f3c2a1b0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b";
const POD: &str = "8d3a1e2f-4b5c-4d6e-8f70-91a2b3c4d5e6";

/// Where cgroup v2 is mounted (hybrid hosts mount it at /sys/fs/cgroup/unified).
fn cgroup2_mount() -> Option<PathBuf> {
    std::fs::read_to_string("/proc/self/mounts")
        .ok()?
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(PathBuf::from)
}

/// Cgroups created for this test; removed (deepest first) when dropped.
struct Cgroups(Vec<PathBuf>);

impl Cgroups {
    fn create(&mut self, root: &Path, rel: &str) -> PathBuf {
        let mut dir = root.to_path_buf();
        for part in rel.split('/') {
            dir.push(part);
            if !dir.exists() {
                std::fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
                self.0.push(dir.clone());
            }
        }
        dir
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for dir in self.0.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// `varta-watch agent` that first moves itself into `cgroup`.
fn agent_in(cgroup: &Path, socket: &Path) -> Proc {
    Proc::spawn(
        Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" && exec "$2" agent --interval-ms 50 --socket "$3""#)
            .args(["sh"])
            .arg(cgroup)
            .arg(bin())
            .arg(socket)
            .stderr(Stdio::inherit()),
    )
}

#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn agents_are_named_by_container_pod_and_systemd_unit_needs_root() {
    require_root!("creating cgroups");
    let mount = cgroup2_mount().expect("a cgroup v2 mount in /proc/self/mounts");
    // A slice, as systemd names its grouping: the unit is the first group below the slices.
    let base = format!("varta-e2e-{}.slice", std::process::id());
    let mut cgroups = Cgroups(Vec::new());
    let kube = cgroups.create(
        &mount,
        &format!(
            "{base}/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{CONTAINER}.scope",
            POD.replace('-', "_")
        ),
    );
    let service = cgroups.create(
        &mount,
        &format!("{base}/system.slice/varta-e2e-worker.service"),
    );

    let mut d = Daemon::builder("identity", "userspace")
        .args(["--threshold-ms", "300", "--tracker-capacity", "1"])
        .start();

    let pod_agent = agent_in(&kube, &d.socket);
    let pid = pod_agent.pid();
    let new = d.wait_log_all(
        &["event=agent_new", &format!("pid={pid}")],
        Duration::from_secs(10),
    );
    assert!(
        new.contains(&format!(
            "comm=varta-watch unit=- container_id={CONTAINER} pod_uid={POD}"
        )),
        "{new}"
    );
    let info = format!(
        "varta_agent_info{{pid=\"{pid}\",comm=\"varta-watch\",unit=\"\",container_id=\"{CONTAINER}\",pod_uid=\"{POD}\"}}"
    );
    assert_eq!(d.metric(&info), 1.0, "{}", d.get_metrics(None).1);
    drop(pod_agent);
    let stall = d.wait_log_all(
        &["event=stall", &format!("pid={pid}")],
        Duration::from_secs(10),
    );
    assert!(
        stall.contains(&format!("container_id={CONTAINER} pod_uid={POD}")),
        "{stall}"
    );

    // The stalled agent is evicted for the next one: its info series stays for
    // --agent-series-retention-secs, so its stall is still named in the next scrapes.
    let unit_agent = agent_in(&service, &d.socket);
    let upid = unit_agent.pid();
    let new = d.wait_log_all(
        &["event=agent_new", &format!("pid={upid}")],
        Duration::from_secs(10),
    );
    assert!(
        new.contains("comm=varta-watch unit=varta-e2e-worker.service container_id=- pod_uid=-"),
        "{new}"
    );
    let metrics = d.get_metrics(None).1;
    let mut infos: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("varta_agent_info{"))
        .collect();
    infos.sort_by_key(|l| !l.contains(&format!("pid=\"{pid}\"")));
    assert_eq!(
        infos,
        [
            format!("{info} 1"),
            format!(
                "varta_agent_info{{pid=\"{upid}\",comm=\"varta-watch\",unit=\"varta-e2e-worker.service\",container_id=\"\",pod_uid=\"\"}} 1"
            )
        ],
        "{metrics}"
    );
    drop(unit_agent);
    assert!(d.stop().success());
}
