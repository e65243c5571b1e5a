//! The eBPF datapath's limits and wake-ups: per-agent and global rate limits and ring-buffer
//! overflow counted in the kernel, batched draining, an idle daemon that sleeps. Every test
//! here needs root (CAP_BPF + CAP_PERFMON); CI runs them as root.

use std::{collections::HashMap, time::Duration};

use varta_e2e::{
    Daemon,
    sender::{send, sender, summary},
};

varta_e2e::on_both_attestations!(
    per_agent_rate_limit_holds_within_5_percent,
    global_rate_limit_holds_within_5_percent,
    ring_buffer_overflow_is_counted,
    batched_drain_idle_sleep_and_prompt_resume,
);

/// Waits until the beats of every agent plus the frames counted as `reason` account for
/// `sent` frames (the ring buffer is drained); returns (beats, `reason` count).
#[track_caller]
fn wait_accounted(d: &Daemon, sent: u64, beats_of: &str, reason: &str) -> (f64, f64) {
    d.wait_metrics(
        &format!("{sent} frames admitted ({beats_of}) or counted as {reason}"),
        Duration::from_secs(10),
        |m: &HashMap<String, f64>| {
            let beats: f64 = m
                .iter()
                .filter(|(k, _)| k.starts_with(beats_of))
                .map(|(_, v)| v)
                .sum();
            let counted = m.get(reason).copied().unwrap_or(0.0);
            if beats + counted >= sent as f64 {
                Ok((beats, counted))
            } else {
                Err(format!("{beats} admitted + {counted} counted"))
            }
        },
    )
}

/// A limit of `rate` a second with a burst of one second's worth, while senders sent for
/// between `secs.0` and `secs.1` seconds: admitted within 5% of what that window allows, and
/// every frame sent either admitted or counted as limited.
#[track_caller]
fn assert_rate(what: &str, rate: f64, secs: (f64, f64), sent: u64, admitted: f64, limited: f64) {
    let allowed = |secs: f64| rate + rate * secs;
    let (low, high) = (allowed(secs.0) * 0.95, allowed(secs.1) * 1.05);
    println!(
        "{what}: sent {sent} in {:.3}..{:.3}s, admitted {admitted}, allowed {low:.0}..{high:.0}",
        secs.0, secs.1
    );
    assert!(
        (low..=high).contains(&admitted),
        "admitted {admitted}, allowed {low:.0}..{high:.0}"
    );
    assert_eq!(
        limited + admitted,
        sent as f64,
        "every frame admitted or counted"
    );
}

fn per_agent_rate_limit_holds_within_5_percent() {
    const RATE: f64 = 200.0;
    let d = Daemon::builder("rate-per-pid", "ebpf")
        .args([
            "--threshold-ms",
            "5000",
            "--max-beat-rate",
            "200",
            "--global-beat-rate",
            "0",
        ])
        .start_ebpf();
    let (sent, pid, secs) = send(d.socket.to_str().unwrap(), &["flood", "0", "2000"]);
    let beats = format!("varta_beats_total{{pid=\"{pid}\"}}");
    let (admitted, limited) = wait_accounted(
        &d,
        sent,
        &beats,
        "varta_rate_limited_total{reason=\"per_pid\"}",
    );
    assert_rate("per-agent", RATE, (secs, secs), sent, admitted, limited);
}

fn global_rate_limit_holds_within_5_percent() {
    const RATE: f64 = 1000.0;
    let d = Daemon::builder("rate-global", "ebpf")
        .args([
            "--threshold-ms",
            "5000",
            "--max-beat-rate",
            "0",
            "--global-beat-rate",
            "1000",
            "--global-beat-burst",
            "1000",
        ])
        .start_ebpf();
    let socket = d.socket.to_str().unwrap().to_owned();
    let started = std::time::Instant::now();
    let senders: Vec<_> = (0..3)
        .map(|_| sender(&socket, &["flood", "0", "2000"]))
        .collect();
    let summaries: Vec<_> = senders.into_iter().map(summary).collect();
    // The senders overlap: together they sent for at least the longest one's own time, and
    // at most the wall-clock time around all three (process start-up included).
    let busiest = summaries.iter().map(|s| s.2).fold(0.0, f64::max);
    let secs = (busiest, started.elapsed().as_secs_f64());
    let sent: u64 = summaries.iter().map(|s| s.0).sum();
    let (admitted, limited) = wait_accounted(
        &d,
        sent,
        "varta_beats_total{",
        "varta_rate_limited_total{reason=\"global\"}",
    );
    assert_rate("global (3 processes)", RATE, secs, sent, admitted, limited);
}

fn ring_buffer_overflow_is_counted() {
    let d = Daemon::builder("ring-overflow", "ebpf")
        .args([
            "--threshold-ms",
            "5000",
            "--max-beat-rate",
            "0",
            "--global-beat-rate",
            "0",
        ])
        .start_ebpf();
    // A daemon that cannot drain (stopped) and a burst larger than the ring.
    d.signal(libc::SIGSTOP);
    let (sent, _, _) = send(d.socket.to_str().unwrap(), &["flood", "40000"]);
    d.signal(libc::SIGCONT);
    let (delivered, full) = wait_accounted(
        &d,
        sent,
        "varta_datapath_beats_delivered_total",
        "varta_frames_dropped_total{reason=\"ringbuf_full\"}",
    );
    println!("ring overflow: sent {sent}, delivered {delivered}, ringbuf_full {full}");
    assert!(full > 0.0);
    assert_eq!(
        delivered + full,
        sent as f64,
        "every frame delivered or counted, none lost silently"
    );
}

/// The daemon's drain timer while an agent is watched (`datapath/ebpf.rs`).
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);

/// Beats are drained in batches, not one wake-up each; once every agent has stalled the
/// daemon sleeps (its drain timer is off); and a stalled agent's next beat wakes it by
/// itself (with the timer off nothing else would). The figures are `cargo xtask bench`'s.
fn batched_drain_idle_sleep_and_prompt_resume() {
    let d = Daemon::builder("idle", "ebpf")
        .args(["--threshold-ms", "300"])
        .start_ebpf();
    let agent = d.agent(2);
    let pid = agent.pid();
    let beats = format!("varta_beats_total{{pid=\"{pid}\"}}");
    d.wait_metric(&beats, 10.0, Duration::from_secs(5));
    // Measurement windows: nothing may scrape (wake) the daemon during them. Two seconds:
    // the routine beats the kernel holds are counted when folded in (rule 6), at least every
    // second.
    let window = Duration::from_secs(2);
    let (b0, s0) = (d.metric(&beats), varta_e2e::context_switches(d.pid()));
    std::thread::sleep(window);
    let (b1, s1) = (d.metric(&beats), varta_e2e::context_switches(d.pid()));
    println!(
        "watching: {} beats, {} context switches in {window:?}",
        b1 - b0,
        s1 - s0
    );
    assert!(b1 - b0 > 100.0, "the agent beats");
    assert!(
        ((s1 - s0) as f64) < b1 - b0,
        "batched: {} switches for {} beats",
        s1 - s0,
        b1 - b0
    );

    agent.signal(libc::SIGSTOP);
    d.wait_log_all(
        &["event=stall", &format!("pid={pid}")],
        Duration::from_secs(5),
    );
    let s2 = varta_e2e::context_switches(d.pid());
    std::thread::sleep(window);
    let s3 = varta_e2e::context_switches(d.pid());
    let ticks = (window.as_millis() / DRAIN_INTERVAL.as_millis()) as u64;
    println!("idle: {} context switches in {window:?}", s3 - s2);
    assert!(
        s3 - s2 < ticks,
        "an idle daemon sleeps: {} switches, the drain timer alone would make {ticks}",
        s3 - s2
    );

    agent.signal(libc::SIGCONT);
    d.wait_log_all(
        &["event=agent_resumed", &format!("pid={pid}")],
        Duration::from_secs(5),
    );
}
