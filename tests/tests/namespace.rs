//! Agents in a child pid namespace (`unshare --pid --fork`), framing their namespace-local
//! pid, on both datapaths. One test per binary run at a time: the pid-reuse step steers
//! the kernel's next pid and must not race other tests' processes.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use varta_e2e::{
    Daemon, EBPF, Proc, bin,
    deploy::manifest_capabilities,
    log_field,
    privilege::{unit_capabilities, with_exactly},
    require_root,
};

/// `sh` is pid 1 of the new namespace and forks the command, which gets pid 2 there.
fn in_child_namespace(args: &[String]) -> Proc {
    in_child_namespace_as(None, args)
}

/// As [`in_child_namespace`], the command run as `uid` (and its gid, no groups, no
/// capabilities) when given, else as root with every capability.
fn in_child_namespace_as(uid: Option<u32>, args: &[String]) -> Proc {
    let user = uid.map_or(String::new(), |uid| {
        format!("setpriv --reuid {uid} --regid {uid} --clear-groups ")
    });
    let script = format!("{user}{} \"$@\"; :", bin().display());
    Proc::spawn(
        Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child", "sh", "-c", &script, "sh"])
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null()),
    )
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
        3.0,
        Duration::from_secs(5),
    );
    assert_eq!(
        d.metric("varta_watch_pids_tracked"),
        0.0,
        "{}",
        d.log_text()
    );
    assert!(d.metric("varta_frame_namespace_mismatch_total") >= 3.0);
    drop((agent, d));

    // Allowed: tracked under its host pid, with its own pid alongside.
    let d = Daemon::builder("ns-allow", datapath)
        .args(["--threshold-ms", "2000", "--allow-cross-namespace-agents"])
        .start();
    let agent = in_child_namespace(&agent_args(&d));
    let line = d.wait_log_all(
        &["event=agent_new", "cross_namespace=true"],
        Duration::from_secs(5),
    );
    let host: u32 = log_field(&line, "pid").parse().unwrap();
    let own: u32 = log_field(&line, "frame_pid").parse().unwrap();
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
        5.0,
        Duration::from_secs(5),
    );
    assert_eq!(
        d.metric("varta_frames_dropped_total{reason=\"spoof\"}"),
        0.0
    );

    // A process in a namespace framing another pid is still a spoof.
    in_child_namespace(&[
        "beat".into(),
        "--pid".into(),
        "4242".into(),
        "--socket".into(),
        d.socket.display().to_string(),
    ])
    .wait_success();
    d.wait_metric(
        "varta_frames_dropped_total{reason=\"spoof\"}",
        1.0,
        Duration::from_secs(5),
    );
    assert_eq!(
        d.metric("varta_frames_dropped_total{reason=\"spoof\"}"),
        1.0
    );

    if datapath == "ebpf" {
        a_reused_host_pid_is_verified_afresh(&d, agent, host);
    }
}

/// After a cross-namespace agent exits, a new process that reuses its host pid is verified
/// afresh, not waved through on the old verdict. The daemon forgets the verdict when the exit
/// shows on its pidfd (no line says so); the agent's stall comes a whole threshold after that.
///
/// unshare, its sh and then the beat process take consecutive pids (sometimes one more in
/// between): the kernel's next pid is steered so the beat process gets `host`. A task created
/// meanwhile (a kernel worker, a daemon thread) can land on `host` and keep it for minutes;
/// then a new agent is started and its pid is the one reused.
fn a_reused_host_pid_is_verified_afresh(d: &Daemon, mut agent: Proc, mut host: u32) {
    let asked =
        |host: u32| d.count_logs(&["event=cross_namespace_sender", &format!("tgid={host}")]);
    // Every frame ends up delivered or dropped: each beat is waited for until handled.
    let handled = || -> f64 {
        d.metrics()
            .iter()
            .filter(|(k, _)| {
                k.starts_with("varta_frames_dropped_total{")
                    || *k == "varta_datapath_beats_delivered_total"
            })
            .map(|(_, v)| v)
            .sum()
    };
    let beat = [
        "beat".to_string(),
        "--socket".into(),
        d.socket.display().to_string(),
    ];
    let mut holders = Vec::new();
    for _agent in 0..3 {
        assert_eq!(asked(host), 1, "{}", d.log_text());
        drop(agent);
        d.wait_log_all(
            &["event=stall", &format!("pid={host}")],
            Duration::from_secs(10),
        );
        let beats = format!("varta_beats_total{{pid=\"{host}\"}}");
        let before = d.metric(&beats);
        for i in 0..200 {
            if let Ok(holder) = std::fs::read_to_string(format!("/proc/{host}/comm")) {
                holders.push(format!("{host}: {}", holder.trim()));
                break;
            }
            let seen = handled();
            std::fs::write(
                "/proc/sys/kernel/ns_last_pid",
                (host - 3 - i % 2).to_string(),
            )
            .unwrap();
            in_child_namespace(&beat).wait_success();
            varta_e2e::wait_for("the beat to be handled", Duration::from_secs(5), || {
                let now = handled();
                if now > seen {
                    Ok(())
                } else {
                    Err(now.to_string())
                }
            });
            if asked(host) > 1 || d.metric(&beats) > before {
                assert_eq!(
                    asked(host),
                    2,
                    "the new process was verified, not waved through:\n{}",
                    d.log_text()
                );
                return;
            }
        }
        // `host` is taken: a new agent, whose pid is the next one to reuse.
        let known: Vec<String> = d
            .matching_logs(&["event=agent_new", "cross_namespace=true"])
            .iter()
            .map(|l| log_field(l, "pid").to_string())
            .collect();
        agent = in_child_namespace(&agent_args(d));
        host = varta_e2e::wait_for("the new agent", Duration::from_secs(5), || {
            d.matching_logs(&["event=agent_new", "cross_namespace=true"])
                .iter()
                .map(|l| log_field(l, "pid").to_string())
                .find(|pid| !known.contains(pid))
                .ok_or_else(|| "no new agent yet".to_string())
        })
        .parse()
        .unwrap();
        d.wait_metric(
            &format!("varta_beats_total{{pid=\"{host}\"}}"),
            1.0,
            Duration::from_secs(5),
        );
    }
    panic!("could not steer a new process onto a reused pid; taken meanwhile: {holders:?}");
}

#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn cross_namespace_agents_userspace_needs_root() {
    require_root!("unshare --pid needs CAP_SYS_ADMIN");
    cross_namespace_agents("userspace");
}

#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn cross_namespace_agents_ebpf_needs_root() {
    require_root!(EBPF);
    cross_namespace_agents("ebpf");
}

#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn cross_namespace_agents_ebpf_task_read_needs_root() {
    require_root!(EBPF);
    varta_e2e::with_attest("task_read", || cross_namespace_agents("ebpf"));
}

/// Under exactly the capabilities users grant the observer (the DaemonSet's and the unit's:
/// no CAP_SYS_PTRACE, so `/proc/<pid>/ns/pid` of an agent is out of reach), agents in a
/// child pid namespace are tracked: unprivileged (uid 65534, as the example workload pod
/// runs) and root with every capability. Nothing is refused as a spoof.
fn container_agents_under_least_privilege(datapath: &str) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for (who, caps) in [
        ("daemonset", manifest_capabilities()),
        ("unit", unit_capabilities()),
    ] {
        let d = Daemon::builder(&format!("ns-least-{who}"), datapath)
            .world_writable()
            .wrapped(with_exactly(&caps))
            .args(["--threshold-ms", "2000", "--allow-cross-namespace-agents"])
            .args(["--socket-mode", "0666"])
            .start();
        assert!(
            d.datapath_info().contains(&format!("mode=\"{datapath}\"")),
            "{who} {caps:?}: {}",
            d.log_text()
        );
        let agents = [Some(65534), None].map(|uid| in_child_namespace_as(uid, &agent_args(&d)));
        let new = d.wait_logs(
            &["event=agent_new", "cross_namespace=true"],
            agents.len(),
            Duration::from_secs(10),
        );
        for line in &new {
            let host: u32 = log_field(line, "pid").parse().unwrap();
            assert_eq!(log_field(line, "frame_pid"), "2", "{line}");
            d.wait_metric(
                &format!("varta_beats_total{{pid=\"{host}\"}}"),
                3.0,
                Duration::from_secs(5),
            );
        }
        assert_eq!(
            d.metric("varta_frames_dropped_total{reason=\"spoof\"}"),
            0.0,
            "{who}: {}",
            d.log_text()
        );
        drop(agents);
    }
}

#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn container_agents_under_least_privilege_userspace_needs_root() {
    require_root!("unshare --pid and setpriv need root");
    container_agents_under_least_privilege("userspace");
}

#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn container_agents_under_least_privilege_ebpf_needs_root() {
    require_root!(EBPF);
    container_agents_under_least_privilege("ebpf");
}

#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn container_agents_under_least_privilege_ebpf_task_read_needs_root() {
    require_root!(EBPF);
    varta_e2e::with_attest("task_read", || {
        container_agents_under_least_privilege("ebpf")
    });
}

/// An observer outside the host's pid namespace (a DaemonSet without `hostPID`) cannot use
/// the eBPF datapath, whose kernel side names senders by host pid: it says so and runs the
/// userspace datapath, where the kernel translates the sender's pid into its namespace.
#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn an_observer_outside_the_host_pid_namespace_falls_back_naming_why_needs_root() {
    require_root!("unshare --pid needs CAP_SYS_ADMIN");
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let d = Daemon::builder("ns-observer", "auto")
        .wrapped(["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"])
        .args(["--threshold-ms", "2000"])
        .start();
    let fallback = d.wait_log("event=datapath_fallback", Duration::from_secs(5));
    assert!(
        fallback.contains("not in the host's pid namespace"),
        "{fallback}"
    );
    assert!(d.datapath_info().contains("mode=\"userspace\""));
}

/// Fork churn inside a container: every frame comes from a new process the kernel must ask
/// the daemon about (M2). Those questions are admitted like any untracked sender's beats,
/// so no more of them reach the daemon (records, wake-ups, /proc reads) than the global
/// bucket allows, while an honest container agent, tracked, keeps beating unharmed.
fn container_fork_churn_asks_within_the_global_bucket() {
    const RATE: f64 = 20.0;
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let d = Daemon::builder("ns-churn", "ebpf")
        .args(["--threshold-ms", "1000", "--allow-cross-namespace-agents"])
        .args(["--global-beat-rate", "20", "--global-beat-burst", "20"])
        .start_ebpf();
    let honest = in_child_namespace(&agent_args(&d));
    let line = d.wait_log_all(
        &["event=agent_new", "cross_namespace=true"],
        Duration::from_secs(5),
    );
    let host: u32 = log_field(&line, "pid").parse().unwrap();
    let beats = format!("varta_beats_total{{pid=\"{host}\"}}");
    d.wait_metric(&beats, 3.0, Duration::from_secs(5));
    // Every question the daemon answered: a verified sender's frame is delivered, a sender
    // gone by then is refused as a spoof (the churners frame their own pid: the kernel
    // refuses none of them so).
    let records = |d: &Daemon| {
        let m = d.metrics();
        m["varta_datapath_beats_delivered_total"]
            + m["varta_frames_dropped_total{reason=\"spoof\"}"]
            - m[beats.as_str()]
    };
    let before = records(&d);
    let started = std::time::Instant::now();
    let churn = Proc::spawn(
        Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child"])
            .arg(varta_e2e::target_bin("varta-sender"))
            .args([d.socket.to_str().unwrap(), "churn", "0", "2000"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped()),
    );
    let (forked, ..) = varta_e2e::sender::summary(churn);
    let window = started.elapsed().as_secs_f64();
    // Drained and answered (the ring is read every 50 ms while an agent is watched).
    std::thread::sleep(Duration::from_millis(500));
    let asked = records(&d) - before;
    let allowed = 20.0 + RATE * window;
    assert!(
        forked as f64 > 2.0 * allowed,
        "the churn forked only {forked} senders in {window:.1} s: it proves nothing"
    );
    assert!(
        asked <= allowed,
        "{asked} questions from {forked} churned senders reached the daemon in {window:.1} s, \
         the global bucket allows {allowed}"
    );
    assert!(d.metric("varta_frames_dropped_total{reason=\"rate_global\"}") > 0.0);
    let stalls = d.count_logs(&["event=stall", &format!("pid={host}")]);
    assert_eq!(stalls, 0, "the honest agent stalled:\n{}", d.log_text());
    let now = d.metric(&beats);
    d.wait_metric(&beats, now + 3.0, Duration::from_secs(5));
    drop(honest);
}

varta_e2e::on_both_attestations!(container_fork_churn_asks_within_the_global_bucket);
