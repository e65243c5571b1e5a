//! Who an agent is, in the names operators use: its command name, its cgroup, the systemd
//! unit it runs in (bare metal), and the container id and pod UID (Kubernetes with
//! containerd, CRI-O or docker, systemd or cgroupfs driver). Read once, on an agent's
//! first beat, from `/proc/<pid>/comm` and `/proc/<pid>/cgroup`.

use crate::sys::text::printable;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub comm: String,
    pub cgroup: String,
    pub unit: String,
    pub container_id: String,
    pub pod_uid: String,
}

impl Identity {
    /// Reads `pid`'s identity (as this observer's pid namespace sees it). What cannot be
    /// read (the process already exited) stays empty.
    pub fn read(pid: u32) -> Identity {
        // Both are the process's own choice: made printable here, quoted by each output.
        let read = |what: &str| std::fs::read(format!("/proc/{pid}/{what}")).unwrap_or_default();
        let comm = read("comm");
        let comm = printable(comm.strip_suffix(b"\n").unwrap_or(&comm));
        let cgroup = read("cgroup");
        let cgroup = printable(cgroup_path(&String::from_utf8_lossy(&cgroup)).as_bytes());
        Identity {
            comm,
            ..Identity::from_cgroup(&cgroup)
        }
    }

    /// Unit, container id and pod UID named by a cgroup path. A delegated subtree (a user's
    /// systemd manager, a container allowed to make cgroups) may name its groups anything,
    /// so only what a delegate cannot forge is taken (M6 of the hardening review): the unit
    /// is the first group below the slices, as systemd itself assigns a process to a unit
    /// (everything under `user@1000.service` is that user manager's); the container and pod
    /// are the outermost ones on the path (a container's own subgroups cannot pose as
    /// another), and none under a user's manager (`user@UID.service`).
    pub fn from_cgroup(path: &str) -> Identity {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let delegated_to_a_user = parts
            .iter()
            .any(|p| p.starts_with("user@") && p.ends_with(".service"));
        let container_id = if delegated_to_a_user {
            String::new()
        } else {
            parts
                .iter()
                .find_map(|p| container_id(p))
                .unwrap_or_default()
                .to_owned()
        };
        let pod_uid = if !delegated_to_a_user && parts.iter().any(|p| p.starts_with("kubepods")) {
            parts.iter().find_map(|p| pod_uid(p)).unwrap_or_default()
        } else {
            String::new()
        };
        // A container's scope is not a unit an operator manages; a service or session is.
        let unit = parts
            .iter()
            .find(|p| !p.ends_with(".slice"))
            .filter(|p| {
                p.ends_with(".service") || (p.ends_with(".scope") && container_id.is_empty())
            })
            .map(|p| (*p).to_owned())
            .unwrap_or_default();
        Identity {
            comm: String::new(),
            cgroup: path.to_owned(),
            unit,
            container_id,
            pod_uid,
        }
    }
}

impl Identity {
    /// The labels of `varta_agent_info` for this agent.
    pub fn label(&self, pid: u32) -> crate::actions::metrics::AgentInfoLabel {
        use crate::actions::metrics::LabelText;
        crate::actions::metrics::AgentInfoLabel {
            pid,
            comm: LabelText(self.comm.clone()),
            unit: LabelText(self.unit.clone()),
            container_id: LabelText(self.container_id.clone()),
            pod_uid: LabelText(self.pod_uid.clone()),
        }
    }
}

/// A name as a log value: `None` (written `-`) when it is not known.
pub fn known(name: &str) -> Option<&str> {
    (!name.is_empty()).then_some(name)
}

/// The cgroup v2 path (`0::/...`); on a hybrid host whose v2 hierarchy holds nobody, the
/// systemd v1 hierarchy's (`N:name=systemd:/...`).
fn cgroup_path(text: &str) -> &str {
    let v2 = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim);
    let systemd = text
        .lines()
        .find_map(|l| l.split_once(":name=systemd:").map(|(_, p)| p.trim()));
    match v2 {
        Some(path) if path != "/" => path,
        _ => systemd.or(v2).unwrap_or(""),
    }
}

/// A 64-hex container id in a cgroup component: `cri-containerd-<id>.scope`,
/// `crio-<id>.scope`, `docker-<id>.scope` (systemd driver) or a bare `<id>` (cgroupfs).
fn container_id(part: &str) -> Option<&str> {
    let id = part.strip_suffix(".scope").unwrap_or(part);
    let id = ["cri-containerd-", "crio-", "docker-", "containerd-"]
        .iter()
        .find_map(|prefix| id.strip_prefix(prefix))
        .unwrap_or(id);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// The pod UID in `kubepods-<qos>-pod<uid with _>.slice` (systemd driver) or `pod<uid>`
/// (cgroupfs driver).
fn pod_uid(part: &str) -> Option<String> {
    let part = part.strip_suffix(".slice").unwrap_or(part);
    let uid = part.rsplit_once("pod").map(|(_, uid)| uid)?;
    let uid = uid.replace('_', "-");
    (uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')).then_some(uid)
}

pub use crate::sys::process::uid_of;

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f3c2a1b0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b";
    const POD: &str = "8d3a1e2f-4b5c-4d6e-8f70-91a2b3c4d5e6";

    fn pod_underscored() -> String {
        POD.replace('-', "_")
    }

    #[test]
    fn containerd_with_the_systemd_driver() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope",
            pod_underscored()
        );
        let id = Identity::from_cgroup(&path);
        assert_eq!((id.container_id.as_str(), id.pod_uid.as_str()), (ID, POD));
        assert_eq!(id.unit, "");
    }

    #[test]
    fn crio_and_docker_with_the_systemd_driver() {
        for runtime in ["crio", "docker"] {
            let path = format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/{runtime}-{ID}.scope",
                pod_underscored()
            );
            let id = Identity::from_cgroup(&path);
            assert_eq!(
                (id.container_id.as_str(), id.pod_uid.as_str()),
                (ID, POD),
                "{runtime}"
            );
        }
        // Guaranteed pods sit directly under kubepods.slice.
        let path = format!(
            "/kubepods.slice/kubepods-pod{}.slice/crio-{ID}.scope",
            pod_underscored()
        );
        assert_eq!(Identity::from_cgroup(&path).pod_uid, POD);
    }

    #[test]
    fn a_delegated_subtree_cannot_name_a_system_unit_a_container_or_a_pod() {
        let user = "/user.slice/user-1000.slice/user@1000.service";
        let id = Identity::from_cgroup(&format!("{user}/app.slice/nginx.service"));
        assert_eq!(
            id.unit, "user@1000.service",
            "the user manager's, not nginx's"
        );
        let id = Identity::from_cgroup(&format!("{user}/kubepods/pod{POD}/{ID}"));
        assert_eq!(
            (
                id.unit.as_str(),
                id.container_id.as_str(),
                id.pod_uid.as_str()
            ),
            ("user@1000.service", "", "")
        );
        // A service's own subgroups are still that service.
        let id = Identity::from_cgroup("/system.slice/db.service/worker.service");
        assert_eq!(id.unit, "db.service");
        // A container making cgroups of its own cannot pose as another one.
        let other = "0".repeat(64);
        let id = Identity::from_cgroup(&format!(
            "/kubepods/pod{POD}/{ID}/kubepods/pod00000000-0000-0000-0000-000000000000/{other}"
        ));
        assert_eq!((id.container_id.as_str(), id.pod_uid.as_str()), (ID, POD));
    }

    #[test]
    fn the_cgroupfs_driver() {
        for qos in ["burstable/", "besteffort/", ""] {
            let path = format!("/kubepods/{qos}pod{POD}/{ID}");
            let id = Identity::from_cgroup(&path);
            assert_eq!(
                (id.container_id.as_str(), id.pod_uid.as_str()),
                (ID, POD),
                "{path}"
            );
        }
    }

    #[test]
    fn conmon_is_not_a_container() {
        let path = format!("/machine.slice/crio-conmon-{ID}.scope");
        assert_eq!(Identity::from_cgroup(&path).container_id, "");
    }

    #[test]
    fn docker_outside_kubernetes_has_no_pod() {
        let id = Identity::from_cgroup(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!((id.container_id.as_str(), id.pod_uid.as_str()), (ID, ""));
        let id = Identity::from_cgroup(&format!("/docker/{ID}"));
        assert_eq!(id.container_id, ID);
    }

    #[test]
    fn systemd_services_and_sessions() {
        let id = Identity::from_cgroup("/system.slice/nginx.service");
        assert_eq!(
            (id.unit.as_str(), id.container_id.as_str()),
            ("nginx.service", "")
        );
        let id = Identity::from_cgroup("/system.slice/system-worker.slice/worker@3.service");
        assert_eq!(id.unit, "worker@3.service");
        let id = Identity::from_cgroup("/user.slice/user-1000.slice/session-4.scope");
        assert_eq!(id.unit, "session-4.scope");
        assert_eq!(Identity::from_cgroup("/").unit, "");
    }

    #[test]
    fn the_v2_line_wins_and_a_hybrid_host_falls_back_to_name_systemd() {
        let v2 = "12:pids:/\n1:name=systemd:/x\n0::/system.slice/a.service\n";
        assert_eq!(cgroup_path(v2), "/system.slice/a.service");
        let hybrid = "9:name=systemd:/system.slice/b.service\n4:memory:/m\n0::/\n";
        assert_eq!(cgroup_path(hybrid), "/system.slice/b.service");
        assert_eq!(cgroup_path("0::/\n"), "/");
    }

    #[test]
    fn unknown_names_are_absent_from_the_log() {
        let id = Identity::from_cgroup("/system.slice/w.service");
        assert_eq!(known(&id.unit), Some("w.service"));
        assert_eq!(known(&id.container_id), None);
    }
}
