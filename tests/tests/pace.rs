//! When the daemon wakes and what time a beat carries (`varta_common::wakeup`): a beat is
//! dated by its arrival, however late the daemon drains it, so a daemon that could not run
//! for a while decides stalls on the senders' real silence, and no false one; on the
//! userspace datapath routine beats are drained in batches on a timer, while a new agent
//! and a panic-terminal frame are still handled at once and nothing is lost.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use varta_e2e::{
    Daemon, Sysctl, frame, log_field, on_both_datapaths,
    sender::{sender, summary},
    target_bin,
};

on_both_datapaths!(beats_are_dated_by_their_arrival);

fn beats_are_dated_by_their_arrival(datapath: &str) {
    const THRESHOLD_MS: u64 = 600;
    const STOPPED_MS: u64 = 900;
    let d = Daemon::builder("arrival", datapath)
        .args(["--threshold-ms", &THRESHOLD_MS.to_string()])
        .start();
    let agent = d.agent(100);
    d.wait_log_all(
        &["event=agent_new", &format!("pid={}", agent.pid())],
        Duration::from_secs(10),
    );
    let me = std::process::id();
    d.send(&frame(me, 1));
    d.wait_log_all(
        &["event=agent_new", &format!("pid={me}")],
        Duration::from_secs(10),
    );
    // Our last beat arrives while the daemon cannot run; the agent beats on (9 beats queue).
    d.signal(libc::SIGSTOP);
    d.send(&frame(me, 2));
    std::thread::sleep(Duration::from_millis(STOPPED_MS));
    d.signal(libc::SIGCONT);
    let stall = d.wait_log_all(
        &["event=stall", &format!("pid={me} ")],
        Duration::from_secs(5),
    );
    // Dated by its drain, the beat would have stalled a threshold after the SIGCONT, at
    // silent_ms=600; by its arrival, the stall is decided on resuming, 900 ms after it.
    let silent: u64 = log_field(&stall, "silent_ms").parse().unwrap();
    assert!(
        silent >= STOPPED_MS - 50,
        "silent_ms={silent}: the beat was dated by its drain, not its arrival\n{}",
        d.log_text()
    );
    // The agent's beats queued meanwhile count before any decision, each at its arrival.
    d.wait_one_threshold();
    assert_eq!(
        d.count_logs(&["event=stall", &format!("pid={} ", agent.pid())]),
        0,
        "{}",
        d.log_text()
    );
}

/// Under a steady load of routine beats the userspace datapath drains on its timer (fewer
/// wake-ups than beats, none lost), and a new agent or a panic-terminal frame arriving
/// meanwhile is still handled within the timer's longest interval (10 ms; measured in
/// `cargo xtask bench`: here a generous bound only catches one that waits for the load).
/// The daemon's socket is made under systemd's `net.unix.max_dgram_qlen` 512, as on the
/// hosts it is deployed on (and in `deploy/kubernetes-userspace`'s pods): in the kernel's
/// 11-datagram queue a machine busy with other tests fills it between ticks, and rule 5
/// then wakes on most datagrams by design (`cargo xtask bench`, `rate_20k_qlen_10`).
#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn routine_beats_are_batched_and_urgent_ones_are_not_kept_waiting_needs_root() {
    varta_e2e::require_root!("sets net.unix.max_dgram_qlen for the daemon's socket");
    let d = {
        // Read by the kernel when the socket is made; put back once the daemon runs.
        let _qlen = Sysctl::set("/proc/sys/net/unix/max_dgram_qlen", 512).unwrap();
        Daemon::builder("pace", "userspace")
            .args([
                "--threshold-ms",
                "2000",
                "--max-beat-rate",
                "0",
                "--global-beat-rate",
                "0",
            ])
            .start()
    };
    d.wait_log_all(
        &["event=receive_pace", "queue_limit=513"],
        Duration::from_secs(5),
    );
    let socket = d.socket.to_str().unwrap().to_owned();
    const SENDERS: usize = 8;
    const BEATS: u64 = 3000;
    // 8 agents, one beat every millisecond each: about 8k routine beats a second.
    let load: Vec<_> = (0..SENDERS)
        .map(|_| sender(&socket, &["pace", &BEATS.to_string(), "1"]))
        .collect();
    let pids: Vec<u32> = load.iter().map(|s| s.pid()).collect();
    for pid in &pids {
        d.wait_log_all(
            &["event=agent_new", &format!("pid={pid}")],
            Duration::from_secs(10),
        );
    }
    let counted = |d: &Daemon| -> f64 {
        pids.iter()
            .map(|p| d.metric(&format!("varta_beats_total{{pid=\"{p}\"}}")))
            .sum()
    };
    let (beats0, switches0) = (counted(&d), varta_e2e::context_switches(d.pid()));
    std::thread::sleep(Duration::from_millis(1000));
    let (beats1, switches1) = (counted(&d), varta_e2e::context_switches(d.pid()));
    let (beats, switches) = (beats1 - beats0, switches1 - switches0);
    println!("under load: {beats} beats, {switches} daemon context switches in 1 s");
    assert!(beats > 1000.0, "the load ran: {beats} beats");
    assert!(
        (switches as f64) * 2.0 < beats,
        "{switches} wake-ups for {beats} beats: not drained in batches"
    );

    // A new agent sending its panic-terminal frame right after its first beat, under load.
    let t = Instant::now();
    let dying = Command::new(target_bin("varta-sender"))
        .args([&socket, "dying"])
        .output()
        .unwrap();
    assert!(dying.status.success());
    let dying_pid = log_field(&String::from_utf8_lossy(&dying.stdout), "pid").to_owned();
    d.wait_log_all(
        &["event=exit", &format!("pid={dying_pid} ")],
        Duration::from_secs(5),
    );
    let waited = t.elapsed();
    assert!(
        waited < Duration::from_millis(500),
        "a panic-terminal frame under load waited {waited:?}"
    );

    let mut sent = 0;
    for s in load {
        sent += summary(s).0;
    }
    assert_eq!(sent, SENDERS as u64 * BEATS);
    d.wait_metrics("every routine beat counted", Duration::from_secs(5), |_| {
        let c = counted(&d);
        if c == sent as f64 {
            Ok(())
        } else {
            Err(format!("{c} of {sent}"))
        }
    });
    assert_eq!(d.count_logs(&["event=stall"]), 0, "{}", d.log_text());
}
