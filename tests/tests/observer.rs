//! The observer end to end, with real processes and sockets, on both datapaths. Each test
//! runs as `<name>::userspace` and `<name>::ebpf_needs_root`.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use varta_e2e::{Daemon, bin, decode_error_vectors, frame, kill, reap, snake};

use varta_e2e::on_both_datapaths;

on_both_datapaths!(
    agent_stall_fires_once_and_rearms,
    decode_error_vectors_are_counted_and_nothing_tracked,
    forged_pid_is_a_spoof_and_the_real_agent_is_untouched,
    replayed_nonce_is_dropped,
    capacity_strict_and_balanced,
    recovery_runs_times_out_and_debounces,
    export_file_and_metrics_after_a_scripted_scenario,
    critical_and_panic_terminal_are_surfaced_at_once,
);

const THRESHOLD_MS: u64 = 600;

fn agent_stall_fires_once_and_rearms(datapath: &str) {
    let d = Daemon::builder("stall", datapath)
        .args(["--threshold-ms", &THRESHOLD_MS.to_string()])
        .start();
    let mut agent = d.agent(50);
    let pid = agent.id();
    let beats = format!("varta_beats_total{{pid=\"{pid}\"}}");
    let stalls = format!("varta_stalls_total{{pid=\"{pid}\"}}");
    assert!(
        d.wait_metric(&beats, Duration::from_secs(5), |v| v >= 3.0) >= 3.0,
        "agent tracked"
    );
    assert_eq!(d.metric("varta_watch_pids_tracked"), 1.0);

    // Silence (SIGSTOP): exactly one stall, within threshold + 250 ms of the last beat.
    kill(&mut agent, libc::SIGSTOP);
    let stopped = Instant::now();
    let line = d
        .wait_log_all(
            &["event=stall", &format!("pid={pid}")],
            Duration::from_secs(5),
        )
        .expect("stall surfaced");
    let latency = stopped.elapsed();
    assert!(
        latency <= Duration::from_millis(THRESHOLD_MS + 250),
        "stall after {latency:?}: {line}"
    );
    assert_eq!(d.metric(&stalls), 1.0);
    std::thread::sleep(Duration::from_millis(THRESHOLD_MS * 2));
    assert_eq!(d.metric(&stalls), 1.0, "one stall per silence");
    assert_eq!(d.count_logs(&["event=stall", &format!("pid={pid}")]), 1);

    // It beats again: the stall re-arms.
    kill(&mut agent, libc::SIGCONT);
    d.wait_log_all(
        &["event=agent_resumed", &format!("pid={pid}")],
        Duration::from_secs(5),
    )
    .expect("resumed");
    // Killed for good: one more stall.
    let killed = Instant::now();
    reap(agent);
    d.wait_metric(&stalls, Duration::from_secs(5), |v| v >= 2.0);
    assert!(killed.elapsed() <= Duration::from_millis(THRESHOLD_MS + 250 + 100));
    assert_eq!(d.metric(&stalls), 2.0);
    std::thread::sleep(Duration::from_millis(THRESHOLD_MS * 2));
    assert_eq!(d.metric(&stalls), 2.0);
}

fn decode_error_vectors_are_counted_and_nothing_tracked(datapath: &str) {
    let d = Daemon::builder("decode", datapath)
        .args(["--threshold-ms", "1000"])
        .start();
    let vectors = decode_error_vectors();
    assert_eq!(vectors.len(), 9);
    for (_, wire) in &vectors {
        d.send(wire);
    }
    // Wrong lengths: empty, short, one too many, far too long.
    for len in [0usize, 31, 33, 200] {
        d.send(&vec![0x56; len]);
    }
    let mut expected = std::collections::HashMap::new();
    for (err, _) in &vectors {
        *expected.entry(snake(err)).or_insert(0.0) += 1.0;
    }
    d.wait_metric(
        "varta_frames_dropped_total{reason=\"length\"}",
        Duration::from_secs(5),
        |v| v >= 4.0,
    );
    d.wait_metric(
        "varta_frames_dropped_total{reason=\"decode\"}",
        Duration::from_secs(5),
        |v| v >= 9.0,
    );
    let m = d.metrics();
    for (kind, n) in &expected {
        assert_eq!(
            m.get(&format!("varta_decode_errors_total{{kind=\"{kind}\"}}")),
            Some(n),
            "{kind}"
        );
    }
    assert_eq!(m["varta_frames_dropped_total{reason=\"decode\"}"], 9.0);
    assert_eq!(m["varta_frames_dropped_total{reason=\"length\"}"], 4.0);
    assert_eq!(m["varta_watch_pids_tracked"], 0.0);
    assert_eq!(
        m["varta_datapath_beats_delivered_total"], 0.0,
        "nothing was handed to the pipeline"
    );
    assert!(!m.keys().any(|k| k.starts_with("varta_beats_total")));
}

fn forged_pid_is_a_spoof_and_the_real_agent_is_untouched(datapath: &str) {
    let d = Daemon::builder("spoof", datapath)
        .args(["--threshold-ms", "5000"])
        .start();
    let agent = d.agent(50);
    let pid = agent.id();
    let beats = format!("varta_beats_total{{pid=\"{pid}\"}}");
    d.wait_metric(&beats, Duration::from_secs(5), |v| v >= 2.0);
    // This test process claims the agent's pid, with a nonce far ahead of the agent's.
    for nonce in 0..5 {
        d.send(&frame(pid, 1_000_000 + nonce));
    }
    d.wait_metric(
        "varta_frames_dropped_total{reason=\"spoof\"}",
        Duration::from_secs(5),
        |v| v >= 5.0,
    );
    let before = d.metric(&beats);
    std::thread::sleep(Duration::from_millis(300));
    let m = d.metrics();
    assert_eq!(m["varta_frames_dropped_total{reason=\"spoof\"}"], 5.0);
    assert_eq!(m["varta_frame_auth_failures_total"], 5.0);
    assert_eq!(
        m["varta_frames_dropped_total{reason=\"replay\"}"], 0.0,
        "the agent's own nonces still count"
    );
    assert!(m[&beats] > before, "the real agent keeps beating");
    reap(agent);
}

fn replayed_nonce_is_dropped(datapath: &str) {
    let d = Daemon::builder("replay", datapath)
        .args(["--threshold-ms", "5000"])
        .start();
    let me = std::process::id();
    d.send(&frame(me, 7));
    d.send(&frame(me, 7));
    d.send(&frame(me, 3));
    d.send(&frame(me, 8));
    let beats = format!("varta_beats_total{{pid=\"{me}\"}}");
    d.wait_metric(&beats, Duration::from_secs(5), |v| v >= 2.0);
    d.wait_metric(
        "varta_frames_dropped_total{reason=\"replay\"}",
        Duration::from_secs(5),
        |v| v >= 2.0,
    );
    let m = d.metrics();
    assert_eq!(m[&beats], 2.0);
    assert_eq!(m["varta_frames_dropped_total{reason=\"replay\"}"], 2.0);
}

fn capacity_strict_and_balanced(datapath: &str) {
    for policy in ["strict", "balanced"] {
        let d = Daemon::builder(&format!("capacity-{policy}"), datapath)
            .args([
                "--threshold-ms",
                "700",
                "--tracker-capacity",
                "2",
                "--tracker-eviction-policy",
                policy,
            ])
            .start();
        let a = d.agent(50);
        d.wait_log_all(
            &["event=agent_new", &format!("pid={}", a.id())],
            Duration::from_secs(5),
        )
        .unwrap();
        let b = d.agent(50);
        d.wait_log_all(
            &["event=agent_new", &format!("pid={}", b.id())],
            Duration::from_secs(5),
        )
        .unwrap();
        let c = d.agent(50);
        let c_pid = c.id();
        if policy == "strict" {
            // Nothing stalled: the third agent is refused.
            d.wait_metric(
                "varta_frames_dropped_total{reason=\"capacity\"}",
                Duration::from_secs(5),
                |v| v >= 1.0,
            );
            assert_eq!(d.metric("varta_watch_pids_tracked"), 2.0);
            assert_eq!(
                d.metric(&format!("varta_beats_total{{pid=\"{c_pid}\"}}")),
                0.0
            );
            // Once one agent has stalled, it makes room.
            let a_pid = a.id();
            reap(a);
            d.wait_log_all(
                &[
                    "event=agent_evicted",
                    &format!("pid={a_pid}"),
                    &format!("for={c_pid}"),
                ],
                Duration::from_secs(5),
            )
            .unwrap_or_else(|| {
                panic!(
                    "a stalled agent is evicted for the new one:\n{}",
                    d.log_text()
                )
            });
        } else {
            // Balanced: the agent silent longest makes room at once.
            d.wait_log_all(
                &["event=agent_evicted", &format!("for={c_pid}")],
                Duration::from_secs(5),
            )
            .unwrap_or_else(|| panic!("balanced evicts the oldest:\n{}", d.log_text()));
            reap(a);
        }
        assert_eq!(d.metric("varta_watch_pids_tracked"), 2.0);
        assert!(d.metric("varta_tracker_evicted_total") >= 1.0);
        reap(b);
        reap(c);
    }
}

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
        &["event=recovery ", &format!("pid={me}"), "outcome=success"],
        Duration::from_secs(5),
    )
    .unwrap_or_else(|| panic!("recovery ran:\n{}", d.log_text()));
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        format!("{me} bar \n"),
        "pid substituted, env cleared"
    );
    // A second stall of the same pid within the debounce window does not run it again.
    d.send(&frame(me, 2));
    d.wait_log_all(
        &["event=recovery ", &format!("pid={me}"), "outcome=debounced"],
        Duration::from_secs(5),
    )
    .unwrap_or_else(|| panic!("debounced:\n{}", d.log_text()));
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
    let started = Instant::now();
    d.wait_log_all(
        &["event=recovery ", "outcome=timeout"],
        Duration::from_secs(5),
    )
    .unwrap_or_else(|| panic!("timeout:\n{}", d.log_text()));
    assert!(started.elapsed() < Duration::from_secs(3));
    let children = std::fs::read_to_string(format!("/proc/{}/task/{}/children", d.pid(), d.pid()))
        .unwrap_or_default();
    assert!(
        children.trim().is_empty(),
        "no child left, zombie or alive: {children}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn export_file_and_metrics_after_a_scripted_scenario(datapath: &str) {
    let dir = varta_e2e::scratch(&format!("export-file-{datapath}"));
    let export = dir.join("events.tsv");
    let d = Daemon::builder("export", datapath)
        .args([
            "--threshold-ms",
            "400",
            "--export-file",
            export.to_str().unwrap(),
        ])
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
    )
    .unwrap();

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
    // The agent (this test process) named by its command (deploy_identity checks the rest).
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
    let info: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("varta_agent_info"))
        .collect();
    assert_eq!(info.len(), 1, "{body}");
    assert!(
        info[0].contains(&format!("pid=\"{me}\",comm=\"{}\"", comm.trim_end())),
        "{}",
        info[0]
    );
    let mut expected: Vec<String> = vec![
        format!("varta_beats_total{{pid=\"{me}\"}} 2"),
        format!("varta_stalls_total{{pid=\"{me}\"}} 1"),
        format!("varta_status{{pid=\"{me}\"}} 3"),
        format!("varta_datapath_info{{mode=\"{datapath}\"}} 1"),
        "varta_datapath_beats_delivered_total 3".into(),
        "varta_frame_auth_failures_total 0".into(),
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
        "varta_agent_restarts_total 0".into(),
        "varta_nonce_wrap_total 0".into(),
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
    ] {
        expected.push(format!(
            "varta_frames_dropped_total{{reason=\"{reason}\"}} 0"
        ));
    }
    expected.sort();
    assert_eq!(lines, expected);

    let (status, elapsed) = d.stop();
    assert!(status.success());
    assert!(elapsed < Duration::from_secs(1));

    let text = std::fs::read_to_string(&export).unwrap();
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
    assert!(ns[2] - ns[1] >= 400_000_000);
    let _ = std::fs::remove_dir_all(&dir);
}

fn critical_and_panic_terminal_are_surfaced_at_once(datapath: &str) {
    let d = Daemon::builder("critical", datapath)
        .args(["--threshold-ms", "500"])
        .start();
    let status = Command::new(bin())
        .args(["beat", "--status", "critical", "--payload", "9", "--socket"])
        .arg(&d.socket)
        .status()
        .unwrap();
    assert!(status.success());
    let line = d
        .wait_log("event=critical", Duration::from_millis(500))
        .expect("critical surfaced at once");
    assert!(line.contains("payload=9"), "{line}");

    // The panic-terminal frame: an exit event at once, and no stall for that death.
    let me = std::process::id();
    d.send(&frame(me, 1));
    d.send(
        &varta_common::Frame {
            status: varta_common::Status::Critical,
            pid: me,
            timestamp: 1,
            nonce: u64::MAX,
            payload: 0,
        }
        .encode(),
    );
    d.wait_log_all(
        &["event=exit", &format!("pid={me}")],
        Duration::from_millis(500),
    )
    .expect("exit surfaced at once");
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        d.count_logs(&["event=stall", &format!("pid={me}")]),
        0,
        "{}",
        d.log_text()
    );
    assert_eq!(d.metric(&format!("varta_exits_total{{pid=\"{me}\"}}")), 1.0);
}
