//! The observer end to end, with real processes and sockets, on both datapaths: stalls,
//! drops, spoofs, replays, capacity (what it does about them is in `actions.rs`). Each test
//! runs as `<name>::userspace` and `<name>::ebpf_needs_root`.

use std::time::Duration;

use varta_e2e::{Daemon, decode_error_vectors, frame, log_field, snake};

use varta_e2e::on_both_datapaths;

on_both_datapaths!(
    agent_stall_fires_once_and_rearms,
    decode_error_vectors_are_counted_and_nothing_tracked,
    forged_pid_is_a_spoof_and_the_real_agent_is_untouched,
    replayed_nonce_is_dropped,
    capacity_strict_and_balanced,
);

const THRESHOLD_MS: u64 = 600;

fn agent_stall_fires_once_and_rearms(datapath: &str) {
    let d = Daemon::builder("stall", datapath)
        .args(["--threshold-ms", &THRESHOLD_MS.to_string()])
        .start();
    let agent = d.agent(50);
    let pid = agent.pid();
    let pid_is = format!("pid={pid}");
    let beats = format!("varta_beats_total{{pid=\"{pid}\"}}");
    let stalls = format!("varta_stalls_total{{pid=\"{pid}\"}}");
    d.wait_metric(&beats, 3.0, Duration::from_secs(5));
    assert_eq!(d.metric("varta_watch_pids_tracked"), 1.0);

    // Silence (SIGSTOP): exactly one stall, after at least the threshold of silence.
    agent.signal(libc::SIGSTOP);
    let line = d.wait_log_all(&["event=stall", &pid_is], Duration::from_secs(5));
    let silent_ms: u64 = log_field(&line, "silent_ms").parse().unwrap();
    assert!(silent_ms >= THRESHOLD_MS, "stalled early: {line}");
    assert_eq!(d.metric(&stalls), 1.0);
    d.wait_one_threshold();
    d.wait_one_threshold();
    assert_eq!(d.metric(&stalls), 1.0, "one stall per silence");
    assert_eq!(d.count_logs(&["event=stall", &pid_is]), 1);

    // It beats again: the stall re-arms.
    agent.signal(libc::SIGCONT);
    d.wait_log_all(&["event=agent_resumed", &pid_is], Duration::from_secs(5));
    // Killed for good: one more stall.
    drop(agent);
    d.wait_metric(&stalls, 2.0, Duration::from_secs(5));
    d.wait_one_threshold();
    d.wait_one_threshold();
    assert_eq!(d.metric(&stalls), 2.0);
    let lines = d.matching_logs(&["event=stall", &pid_is]);
    let silent_ms: u64 = log_field(&lines[1], "silent_ms").parse().unwrap();
    assert!(silent_ms >= THRESHOLD_MS, "stalled early: {}", lines[1]);
}

fn decode_error_vectors_are_counted_and_nothing_tracked(datapath: &str) {
    // Every junk frame reaches the userspace decoder (rare junk is never sampled), so each is counted.
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
        4.0,
        Duration::from_secs(5),
    );
    d.wait_metric(
        "varta_frames_dropped_total{reason=\"decode\"}",
        9.0,
        Duration::from_secs(5),
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
    let pid = agent.pid();
    let beats = format!("varta_beats_total{{pid=\"{pid}\"}}");
    d.wait_metric(&beats, 2.0, Duration::from_secs(5));
    // This test process claims the agent's pid, with a nonce far ahead of the agent's.
    for nonce in 0..5 {
        d.send(&frame(pid, 1_000_000 + nonce));
    }
    d.wait_metric(
        "varta_frames_dropped_total{reason=\"spoof\"}",
        5.0,
        Duration::from_secs(5),
    );
    // The real agent keeps beating: its next beats are counted after the forgeries.
    let before = d.metric(&beats);
    d.wait_metric(&beats, before + 1.0, Duration::from_secs(5));
    let m = d.metrics();
    assert_eq!(m["varta_frames_dropped_total{reason=\"spoof\"}"], 5.0);
    assert_eq!(m["varta_frame_auth_failures_total"], 5.0);
    assert_eq!(
        m["varta_frames_dropped_total{reason=\"replay\"}"], 0.0,
        "the agent's own nonces still count"
    );
    assert!(m[&beats] > before, "the real agent keeps beating");
    drop(agent);
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
    d.wait_metric(&beats, 2.0, Duration::from_secs(5));
    d.wait_metric(
        "varta_frames_dropped_total{reason=\"replay\"}",
        2.0,
        Duration::from_secs(5),
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
            &["event=agent_new", &format!("pid={}", a.pid())],
            Duration::from_secs(5),
        );
        let b = d.agent(50);
        d.wait_log_all(
            &["event=agent_new", &format!("pid={}", b.pid())],
            Duration::from_secs(5),
        );
        let c = d.agent(50);
        let c_pid = c.pid();
        if policy == "strict" {
            // Nothing stalled: the third agent is refused.
            d.wait_metric(
                "varta_frames_dropped_total{reason=\"capacity\"}",
                1.0,
                Duration::from_secs(5),
            );
            assert_eq!(d.metric("varta_watch_pids_tracked"), 2.0);
            assert_eq!(
                d.metric(&format!("varta_beats_total{{pid=\"{c_pid}\"}}")),
                0.0
            );
            // Once one agent has stalled, it makes room.
            let a_pid = a.pid();
            drop(a);
            // A stalled agent is evicted for the new one.
            d.wait_log_all(
                &[
                    "event=agent_evicted",
                    &format!("pid={a_pid}"),
                    &format!("for={c_pid}"),
                ],
                Duration::from_secs(5),
            );
        } else {
            // Balanced: the agent silent longest makes room at once.
            d.wait_log_all(
                &["event=agent_evicted", &format!("for={c_pid}")],
                Duration::from_secs(5),
            );
            drop(a);
        }
        assert_eq!(d.metric("varta_watch_pids_tracked"), 2.0);
        assert!(d.metric("varta_tracker_evicted_total") >= 1.0);
        drop((b, c));
    }
}
