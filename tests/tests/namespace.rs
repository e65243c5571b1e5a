//! Agents in a child pid namespace (`unshare --pid --fork`), framing their namespace-local
//! pid, on both datapaths. One test per binary run at a time: the pid-reuse step steers
//! the kernel's next pid and must not race other tests' processes.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use varta_e2e::{Daemon, bin, ebpf_enabled, is_root, reap};

/// `sh` is pid 1 of the new namespace and forks the command, which gets pid 2 there.
fn in_child_namespace(args: &[String]) -> Child {
    let script = format!("{} \"$@\"; :", bin().display());
    Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child", "sh", "-c", &script, "sh"])
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("unshare")
}

fn agent_args(d: &Daemon) -> Vec<String> {
    vec![
        "agent".into(),
        "--interval-ms".into(),
        "50".into(),
        "--socket".into(),
        d.socket.display().to_string(),
    ]
}

fn field(line: &str, key: &str) -> u32 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key))
        .unwrap()
        .parse()
        .unwrap()
}

/// Serialises the two tests of this file (see the module comment).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn cross_namespace_agents(datapath: &str) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Default: dropped and counted, nothing tracked.
    let d = Daemon::builder("ns-default", datapath)
        .args(["--threshold-ms", "2000"])
        .start();
    let agent = in_child_namespace(&agent_args(&d));
    d.wait_metric(
        "varta_frames_dropped_total{reason=\"namespace\"}",
        Duration::from_secs(5),
        |v| v >= 3.0,
    );
    assert_eq!(
        d.metric("varta_watch_pids_tracked"),
        0.0,
        "{}",
        d.log_text()
    );
    assert!(d.metric("varta_frame_namespace_mismatch_total") >= 3.0);
    reap(agent);
    drop(d);

    // Allowed: tracked under its host pid, with its own pid alongside.
    let d = Daemon::builder("ns-allow", datapath)
        .args(["--threshold-ms", "2000", "--allow-cross-namespace-agents"])
        .start();
    let agent = in_child_namespace(&agent_args(&d));
    let line = d
        .wait_log_all(
            &["event=agent_new", "cross_namespace=true"],
            Duration::from_secs(5),
        )
        .unwrap_or_else(|| panic!("{}", d.log_text()));
    let (host, own) = (field(&line, "pid="), field(&line, "frame_pid="));
    assert_eq!(own, 2, "{line}");
    assert_ne!(host, own);
    let status = std::fs::read_to_string(format!("/proc/{host}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert!(
        nspid
            .split_whitespace()
            .skip(1)
            .eq([host.to_string(), "2".to_string()]
                .iter()
                .map(String::as_str)),
        "{nspid}"
    );
    d.wait_metric(
        &format!("varta_beats_total{{pid=\"{host}\"}}"),
        Duration::from_secs(5),
        |v| v >= 5.0,
    );
    assert_eq!(
        d.metric("varta_frames_dropped_total{reason=\"spoof\"}"),
        0.0
    );

    // A process in a namespace framing another pid is still a spoof.
    let mut forger = in_child_namespace(&[
        "beat".into(),
        "--pid".into(),
        "4242".into(),
        "--socket".into(),
        d.socket.display().to_string(),
    ]);
    assert!(forger.wait().unwrap().success());
    d.wait_metric(
        "varta_frames_dropped_total{reason=\"spoof\"}",
        Duration::from_secs(5),
        |v| v >= 1.0,
    );
    assert_eq!(
        d.metric("varta_frames_dropped_total{reason=\"spoof\"}"),
        1.0
    );

    // After the agent exits, a new process that reuses its host pid is verified afresh.
    reap(agent);
    if datapath == "ebpf" {
        let asked =
            |d: &Daemon| d.count_logs(&["event=cross_namespace_sender", &format!("tgid={host} ")]);
        assert_eq!(asked(&d), 1);
        std::thread::sleep(Duration::from_millis(200)); // the daemon sees the exit through its pidfd
        let beat = [
            "beat".to_string(),
            "--socket".into(),
            d.socket.display().to_string(),
        ];
        let beats = format!("varta_beats_total{{pid=\"{host}\"}}");
        let before = d.metric(&beats);
        // unshare, its sh and then the beat process take consecutive pids (sometimes one
        // more in between): steer the kernel's next pid so the beat process gets `host`.
        let landed = (0..40).any(|i| {
            std::fs::write(
                "/proc/sys/kernel/ns_last_pid",
                (host - 3 - i % 2).to_string(),
            )
            .unwrap();
            let mut c = in_child_namespace(&beat);
            assert!(c.wait().unwrap().success());
            std::thread::sleep(Duration::from_millis(50));
            asked(&d) > 1 || d.metric(&beats) > before
        });
        assert!(landed, "could not steer a new process onto pid {host}");
        assert_eq!(
            asked(&d),
            2,
            "the new process was verified, not waved through:\n{}",
            d.log_text()
        );
    }
}

#[test]
fn cross_namespace_agents_userspace_needs_root() {
    if !is_root() {
        eprintln!("skipping: unshare --pid needs root");
        return;
    }
    cross_namespace_agents("userspace");
}

#[test]
fn cross_namespace_agents_ebpf_needs_root() {
    if !ebpf_enabled("cross_namespace_agents_ebpf_needs_root") {
        return;
    }
    cross_namespace_agents("ebpf");
}

#[test]
fn cross_namespace_agents_ebpf_task_read_needs_root() {
    if !ebpf_enabled("cross_namespace_agents_ebpf_task_read_needs_root") {
        return;
    }
    varta_e2e::with_attest("task_read", || cross_namespace_agents("ebpf"));
}
