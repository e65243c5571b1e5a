//! Who may load the eBPF datapath: the least capability set it loads with on this kernel,
//! the fallback naming each capability removed from it, and an unprivileged user. Root (or
//! CI) only: the daemon is started through setpriv.

use std::time::Duration;

use varta_e2e::{Daemon, EBPF, privilege::with_exactly, require_root};

/// The capabilities the eBPF datapath loads with on this kernel, and no more (CAP_NET_ADMIN
/// is not among them: loading and attaching socket filters does not need it).
fn least_privilege() -> Vec<&'static str> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let version = (parts.next().unwrap(), parts.next().unwrap());
    let mut caps = vec!["bpf", "perfmon"];
    if version < (5, 11) {
        // BPF maps are charged to RLIMIT_MEMLOCK, raised with this.
        caps.push("sys_resource");
    }
    caps
}

#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn least_privilege_loads_and_each_capability_less_falls_back_naming_it_needs_root() {
    require_root!(EBPF);
    let least = least_privilege();
    for method in ["pid_tgid_helper", "task_read"] {
        varta_e2e::with_attest(method, || {
            let d = Daemon::builder("least-privilege", "ebpf")
                .wrapped(with_exactly(&least))
                .args(["--threshold-ms", "500"])
                .start();
            assert!(
                d.datapath_info().contains("mode=\"ebpf\""),
                "{}",
                d.log_text()
            );
        });
    }
    for dropped in &least {
        let fewer: Vec<&str> = least.iter().copied().filter(|c| c != dropped).collect();
        let d = Daemon::builder(&format!("without-{dropped}"), "auto")
            .wrapped(with_exactly(&fewer))
            .args(["--threshold-ms", "500"])
            .start();
        let fallback = d.wait_log("event=datapath_fallback", Duration::from_secs(5));
        let named = format!("CAP_{}", dropped.to_ascii_uppercase());
        assert!(
            fallback.contains(&format!("missing capability {named}")),
            "{fallback}"
        );
        assert_eq!(
            d.datapath_info(),
            "varta_datapath_info{mode=\"userspace\",attest=\"scm_credentials\"}"
        );
    }
}

#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn without_privileges_ebpf_fails_with_the_reason_and_auto_falls_back_needs_root() {
    require_root!(EBPF);
    let nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ];
    let mut d = Daemon::builder("unprivileged-ebpf", "ebpf")
        .world_writable()
        .wrapped(nobody)
        .args(["--threshold-ms", "500"])
        .spawn();
    assert_eq!(d.wait_exit(Duration::from_secs(10)).code(), Some(1));
    let line = d.wait_log("missing capability", Duration::from_secs(5));
    assert!(
        line.contains("CAP_BPF")
            && line.contains("CAP_PERFMON")
            && line.contains("--datapath ebpf"),
        "{line}"
    );
    assert_eq!(
        d.count_logs(&["level=error"]),
        1,
        "one line: {}",
        d.log_text()
    );

    // auto: one fallback line, then a working observer on the userspace datapath.
    let d = Daemon::builder("unprivileged-auto", "auto")
        .world_writable()
        .wrapped(nobody)
        .args(["--threshold-ms", "500"])
        .start();
    let fallback = d.wait_log("event=datapath_fallback", Duration::from_secs(5));
    assert!(
        fallback.contains("missing capability CAP_BPF and CAP_PERFMON"),
        "{fallback}"
    );
    assert_eq!(
        d.metric("varta_datapath_info{mode=\"userspace\",attest=\"scm_credentials\"}"),
        1.0
    );
    let agent = d.agent(50);
    let pid = format!("pid={}", agent.pid());
    d.wait_log_all(&["event=agent_new", &pid], Duration::from_secs(5));
    drop(agent);
    d.wait_log_all(&["event=stall", &pid], Duration::from_secs(5));
}
