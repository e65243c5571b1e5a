//! What the observer does about what it sees, end to end on both datapaths: recovery
//! commands, the export file and the metrics after a scripted scenario, critical and
//! panic-terminal frames. Each test runs as `<name>::userspace` and `<name>::ebpf_needs_root`.

use std::{process::Command, time::Duration};

use varta_e2e::{Daemon, Proc, bin, frame};

use varta_e2e::on_both_datapaths;

on_both_datapaths!(
    recovery_runs_times_out_and_debounces,
    export_file_and_metrics_after_a_scripted_scenario,
    critical_and_panic_terminal_are_surfaced_at_once,
);

fn recovery_runs_times_out_and_debounces(datapath: &str) {
    let dir = varta_e2e::scratch(&format!("recovery-script-{datapath}"));
    let script = dir.join("recover.sh");
    let out = dir.join("recovered");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$1 $FOO $HOME\" >> {}\n[ \"$2\" = hang ] && sleep 30\nexit 0\n",
            out.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    // Runs with the pid, a clean environment plus --recovery-env; debounced per pid.
    let d = Daemon::builder("recovery", datapath)
        .args([
            "--threshold-ms",
            "300",
            "--recovery-debounce-ms",
            "60000",
            "--recovery-env",
            "FOO=bar",
        ])
        .arg("--recovery-exec")
        .arg(format!("{} {{pid}}", script.display()))
        .start();
    let me = std::process::id();
    d.send(&frame(me, 1));
    d.wait_log_all(
        &["event=recovery", &format!("pid={me}"), "outcome=success"],
        Duration::from_secs(5),
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        format!("{me} bar \n"),
        "pid substituted, env cleared"
    );
    // A second stall of the same pid within the debounce window does not run it again.
    d.send(&frame(me, 2));
    d.wait_log_all(
        &["event=recovery", &format!("pid={me}"), "outcome=debounced"],
        Duration::from_secs(5),
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 1);
    assert_eq!(
        d.metric("varta_recovery_outcomes_total{outcome=\"success\"}"),
        1.0
    );
    assert_eq!(
        d.metric("varta_recovery_outcomes_total{outcome=\"debounced\"}"),
        1.0
    );
    drop(d);

    // A hanging command is killed at the timeout, and reaped.
    let d = Daemon::builder("recovery-timeout", datapath)
        .args(["--threshold-ms", "300", "--recovery-timeout-ms", "400"])
        .arg("--recovery-exec")
        .arg(format!("{} {{pid}} hang", script.display()))
        .start();
    d.send(&frame(me, 1));
    d.wait_log_all(
        &["event=recovery", "outcome=timeout"],
        Duration::from_secs(5),
    );
    let children = std::fs::read_to_string(format!("/proc/{}/task/{}/children", d.pid(), d.pid()))
        .unwrap_or_default();
    assert!(
        children.trim().is_empty(),
        "no child left, zombie or alive: {children}"
    );
}

fn export_file_and_metrics_after_a_scripted_scenario(datapath: &str) {
    // Exact counters of junk: rare junk is never sampled.
    let mut d = Daemon::builder("export", datapath)
        .export_file()
        .args(["--threshold-ms", "400"])
        .start();
    let me = std::process::id();
    use varta_common::{Frame, Status};
    d.send(
        &Frame {
            status: Status::Ok,
            pid: me,
            timestamp: 5,
            nonce: 1,
            payload: 10,
        }
        .encode(),
    );
    d.send(
        &Frame {
            status: Status::Degraded,
            pid: me,
            timestamp: 6,
            nonce: 2,
            payload: 20,
        }
        .encode(),
    );
    d.send(
        &Frame {
            status: Status::Ok,
            pid: me,
            timestamp: 7,
            nonce: 2,
            payload: 30,
        }
        .encode(),
    ); // replay
    d.send(&[1, 2, 3]); // wrong length
    d.wait_log_all(
        &["event=stall", &format!("pid={me}")],
        Duration::from_secs(5),
    );

    // The metrics, line by line (every varta_ sample but uptime and the rcvbuf size).
    let (_, body) = d.get_metrics(None);
    let mut lines: Vec<&str> = body
        .lines()
        .filter(|l| {
            l.starts_with("varta_")
                && !l.starts_with("varta_watch_uptime")
                && !l.starts_with("varta_observer_uds_rcvbuf")
                && !l.starts_with("varta_pid_max_current")
                && !l.starts_with("varta_agent_info")
        })
        .collect();
    lines.sort();
    let info = d.datapath_info();
    assert!(info.contains(&format!("{{mode=\"{datapath}\",")), "{info}");
    // The agent (this test process) named by its command (deploy_identity checks the rest).
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
    let agent_info: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("varta_agent_info"))
        .collect();
    assert_eq!(agent_info.len(), 1, "{body}");
    assert!(
        agent_info[0].contains(&format!("pid=\"{me}\",comm=\"{}\"", comm.trim_end())),
        "{}",
        agent_info[0]
    );
    let mut expected: Vec<String> = vec![
        format!("varta_beats_total{{pid=\"{me}\"}} 2"),
        format!("varta_stalls_total{{pid=\"{me}\"}} 1"),
        format!("varta_status{{pid=\"{me}\"}} 3"),
        format!("{info} 1"),
        "varta_datapath_beats_delivered_total 3".into(),
        // The export file has a line per beat: the kernel holds none (`wakeup` rule 6).
        "varta_datapath_beats_held_total 0".into(),
        "varta_frame_auth_failures_total 0".into(),
        "varta_frame_decrypt_failures_total 0".into(),
        "varta_frame_namespace_mismatch_total 0".into(),
        "varta_frame_rejected_pid_above_max_total 0".into(),
        "varta_frames_dropped_total{reason=\"length\"} 1".into(),
        "varta_frames_dropped_total{reason=\"replay\"} 1".into(),
        "varta_prom_auth_failures_total 0".into(),
        "varta_rate_limited_total{reason=\"global\"} 0".into(),
        "varta_rate_limited_total{reason=\"per_pid\"} 0".into(),
        "varta_tracker_capacity 256".into(),
        "varta_tracker_capacity_exceeded_total 0".into(),
        "varta_tracker_evicted_total 0".into(),
        "varta_truncated_datagrams_total 1".into(),
        "varta_watch_pids_tracked 1".into(),
        // Exact counts: no junk flood sampled.
        "varta_junk_sample_one_in 1".into(),
        "varta_denied_senders 0".into(),
        "varta_agent_restarts_total 0".into(),
        "varta_nonce_wrap_total 0".into(),
        // The aggregates every agent counts in, whatever --agent-series-max.
        "varta_agents{state=\"live\"} 0".into(),
        "varta_agents{state=\"stalled\"} 1".into(),
        "varta_agents{state=\"dead\"} 0".into(),
        "varta_agent_stalls_total 1".into(),
        "varta_agent_exits_total 0".into(),
        "varta_agent_series 1".into(),
        "varta_agent_series_overflow_total 0".into(),
    ];
    for kind in [
        "bad_magic",
        "bad_version",
        "bad_crc",
        "bad_status",
        "stall_on_wire",
        "bad_pid",
        "bad_timestamp",
        "bad_nonce",
    ] {
        expected.push(format!("varta_decode_errors_total{{kind=\"{kind}\"}} 0"));
    }
    for reason in [
        "decode",
        "spoof",
        "namespace",
        "pid_max",
        "rate_per_pid",
        "rate_global",
        "capacity",
        "origin_conflict",
        "ringbuf_full",
        "attest_pending",
        "plaintext",
        "auth",
        "decrypt",
        "queue_full",
    ] {
        expected.push(format!(
            "varta_frames_dropped_total{{reason=\"{reason}\"}} 0"
        ));
    }
    expected.sort();
    assert_eq!(lines, expected);

    assert!(d.stop().success());

    let text = d.export_text();
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split('\t').collect()).collect();
    // The incumbent's six columns; a stall adds the agent's comm, unit, container, pod.
    let shape: Vec<Vec<&str>> = rows.iter().map(|r| r[1..r.len().min(6)].to_vec()).collect();
    assert_eq!(rows[2].len(), 10, "{text}");
    assert!(
        rows[2][6] != "-",
        "the stall names the agent's comm: {text}"
    );
    let me = me.to_string();
    assert_eq!(
        shape,
        vec![
            vec!["beat", me.as_str(), "1", "ok", "10"],
            vec!["beat", me.as_str(), "2", "degraded", "20"],
            vec!["stall", me.as_str(), "2", "stall", "-"],
        ],
        "{text}"
    );
    // Observer-relative timestamps, in order; the stall comes a threshold after the last beat.
    let ns: Vec<u64> = rows.iter().map(|r| r[0].parse().unwrap()).collect();
    assert!(ns.windows(2).all(|w| w[0] <= w[1]));
    // (Beats are stamped when processed, the stall from the kernel's receive time: on eBPF
    // a beat drained late can make this gap shorter than the threshold; see the report.)
    assert!(
        ns[2] - ns[1] >= 400_000_000,
        "stall {} ns after the last beat:\n{text}",
        ns[2] - ns[1]
    );
}

/// The position of the first log line with every one of `parts`, if any.
fn first_line(d: &Daemon, parts: &[&str]) -> Option<usize> {
    d.logs()
        .iter()
        .position(|l| parts.iter().all(|p| varta_e2e::log_has(l, p)))
}

fn critical_and_panic_terminal_are_surfaced_at_once(datapath: &str) {
    let d = Daemon::builder("critical", datapath)
        .args(["--threshold-ms", "500"])
        .start();
    let beat = Proc::spawn(
        Command::new(bin())
            .args(["beat", "--status", "critical", "--payload", "9", "--socket"])
            .arg(&d.socket),
    );
    let beat_pid = format!("pid={}", beat.pid());
    beat.wait_success();
    let line = d.wait_log_all(&["event=critical", &beat_pid], Duration::from_secs(5));
    assert!(line.contains("payload=9"), "{line}");
    // At once: before the silence of that one-shot sender could have become a stall.
    let critical = first_line(&d, &["event=critical", &beat_pid]);
    let stall = first_line(&d, &["event=stall", &beat_pid]);
    assert!(
        stall.is_none_or(|s| Some(s) > critical),
        "critical surfaced only after a threshold:\n{}",
        d.log_text()
    );

    // The panic-terminal frame: an exit event at once, and no stall for that death.
    let me = std::process::id();
    let me_is = format!("pid={me}");
    d.send(&frame(me, 1));
    d.send(&varta_e2e::panic_terminal_frame(me));
    d.wait_log_all(&["event=exit", &me_is], Duration::from_secs(5));
    // Every stall due from those frames has been surfaced once a later agent's has.
    d.wait_one_threshold();
    assert_eq!(
        d.count_logs(&["event=stall", &me_is]),
        0,
        "{}",
        d.log_text()
    );
    assert_eq!(d.metric(&format!("varta_exits_total{{pid=\"{me}\"}}")), 1.0);
}
