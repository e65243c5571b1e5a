//! What only the eBPF datapath does: drops in the kernel, exact in-kernel counters, rate
//! limits and ring-buffer overflow in the kernel, and the fallback without privileges.
//! Every test here needs root (CAP_BPF + CAP_NET_ADMIN); CI runs them as root.

use std::{
    collections::HashMap,
    process::{Command, Stdio},
    time::Duration,
};

use varta_e2e::{Daemon, EBPF, Proc, decode_error_vectors, hex_encode, log_field, require_root};

/// The sender, started with its summary line (`sent= pid= elapsed_ns=`) piped.
fn sender(target: &str, args: &[&str]) -> Proc {
    Proc::spawn(
        Command::new(env!("CARGO_BIN_EXE_varta-sender"))
            .arg(target)
            .args(args)
            .stdout(Stdio::piped()),
    )
}

/// What a sender reported when it finished: (frames sent, its pid, elapsed seconds).
fn summary(sender: Proc) -> (u64, u32, f64) {
    let out = sender.output();
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    (
        log_field(&line, "sent").parse().unwrap(),
        log_field(&line, "pid").parse().unwrap(),
        log_field(&line, "elapsed_ns").parse::<f64>().unwrap() / 1e9,
    )
}

/// Runs the sender to completion: (frames sent, sender pid, elapsed seconds).
fn send(target: &str, args: &[&str]) -> (u64, u32, f64) {
    summary(sender(target, args))
}

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

fn ebpf_daemon(name: &str, args: &[&str]) -> Daemon {
    let d = Daemon::builder(name, "ebpf")
        .args(args.iter().copied())
        .start();
    assert_eq!(
        d.metric("varta_datapath_info{mode=\"ebpf\"}"),
        1.0,
        "{}",
        d.log_text()
    );
    d
}

#[test]
fn junk_flood_from_several_processes_is_counted_exactly_in_the_kernel_needs_root() {
    require_root!(EBPF);
    let d = ebpf_daemon("junk-flood", &["--threshold-ms", "1000"]);
    let socket = d.socket.to_str().unwrap().to_owned();
    const EACH: u64 = 500;
    let mut payloads: Vec<(String, Vec<u8>)> = decode_error_vectors();
    for len in [1usize, 31, 33, 64] {
        payloads.push(("Length".into(), vec![0x56; len]));
    }
    // One process per payload, all at once.
    let children: Vec<_> = payloads
        .iter()
        .map(|(_, bytes)| sender(&socket, &["hex", &EACH.to_string(), &hex_encode(bytes)]))
        .collect();
    for c in children {
        summary(c);
    }
    let mut expected = std::collections::HashMap::new();
    for (name, _) in &payloads {
        *expected.entry(name.clone()).or_insert(0u64) += EACH;
    }
    let total_decode: u64 = expected
        .iter()
        .filter(|(k, _)| *k != "Length")
        .map(|(_, v)| v)
        .sum();
    d.wait_metric(
        "varta_frames_dropped_total{reason=\"decode\"}",
        total_decode as f64,
        Duration::from_secs(5),
    );
    let m = d.metrics();
    for (name, n) in &expected {
        let sample = if name == "Length" {
            "varta_frames_dropped_total{reason=\"length\"}".to_owned()
        } else {
            format!(
                "varta_decode_errors_total{{kind=\"{}\"}}",
                varta_e2e::snake(name)
            )
        };
        assert_eq!(m[&sample], *n as f64, "{sample}");
    }
    assert_eq!(
        m["varta_frames_dropped_total{reason=\"decode\"}"],
        total_decode as f64
    );
    assert_eq!(
        m["varta_datapath_beats_delivered_total"], 0.0,
        "no junk reached userspace"
    );
}

#[test]
fn spoof_over_uds_is_dropped_in_the_kernel_needs_root() {
    require_root!(EBPF);
    let d = ebpf_daemon("kernel-spoof", &["--threshold-ms", "1000"]);
    let agent = d.agent(100);
    let victim = agent.pid();
    d.wait_metric(
        &format!("varta_beats_total{{pid=\"{victim}\"}}"),
        1.0,
        Duration::from_secs(5),
    );
    // The victim falls silent (alive, stopped): once it has stalled, none of its beats is
    // still on its way, and nothing else may reach userspace.
    agent.signal(libc::SIGSTOP);
    d.wait_log_all(
        &["event=stall", &format!("pid={victim}")],
        Duration::from_secs(5),
    );
    let delivered = d.metric("varta_datapath_beats_delivered_total");
    let (sent, _, _) = send(
        d.socket.to_str().unwrap(),
        &["forge", "200", &victim.to_string()],
    );
    let spoofs = d.wait_metric(
        "varta_frames_dropped_total{reason=\"spoof\"}",
        sent as f64,
        Duration::from_secs(5),
    );
    assert_eq!(spoofs, 200.0);
    // None of the 200 reached userspace.
    let after = d.metric("varta_datapath_beats_delivered_total");
    assert_eq!(after, delivered, "{delivered} -> {after}");
    assert_eq!(
        d.metric("varta_frames_dropped_total{reason=\"replay\"}"),
        0.0
    );
}

#[test]
fn per_agent_rate_limit_holds_within_5_percent_needs_root() {
    require_root!(EBPF);
    const RATE: f64 = 200.0;
    let d = ebpf_daemon(
        "rate-per-pid",
        &[
            "--threshold-ms",
            "5000",
            "--max-beat-rate",
            "200",
            "--global-beat-rate",
            "0",
        ],
    );
    let (sent, pid, secs) = send(d.socket.to_str().unwrap(), &["flood", "0", "2000"]);
    let beats = format!("varta_beats_total{{pid=\"{pid}\"}}");
    let (admitted, limited) = wait_accounted(
        &d,
        sent,
        &beats,
        "varta_rate_limited_total{reason=\"per_pid\"}",
    );
    let expected = RATE + RATE * secs; // one second of burst, then the rate
    let error = (admitted - expected).abs() / expected;
    println!(
        "per-agent: sent {sent} in {secs:.3}s, admitted {admitted}, expected {expected:.0}, error {:.2}%",
        error * 100.0
    );
    assert!(error < 0.05, "admitted {admitted}, expected {expected:.0}");
    assert_eq!(
        limited + admitted,
        sent as f64,
        "every frame admitted or counted"
    );
}

#[test]
fn global_rate_limit_holds_within_5_percent_needs_root() {
    require_root!(EBPF);
    const RATE: f64 = 1000.0;
    let d = ebpf_daemon(
        "rate-global",
        &[
            "--threshold-ms",
            "5000",
            "--max-beat-rate",
            "0",
            "--global-beat-rate",
            "1000",
            "--global-beat-burst",
            "1000",
        ],
    );
    let socket = d.socket.to_str().unwrap().to_owned();
    let started = std::time::Instant::now();
    let senders: Vec<_> = (0..3)
        .map(|_| sender(&socket, &["flood", "0", "2000"]))
        .collect();
    let sent: u64 = senders.into_iter().map(|s| summary(s).0).sum();
    let secs = started.elapsed().as_secs_f64();
    let (admitted, limited) = wait_accounted(
        &d,
        sent,
        "varta_beats_total{",
        "varta_rate_limited_total{reason=\"global\"}",
    );
    let expected = RATE + RATE * secs;
    let error = (admitted - expected).abs() / expected;
    println!(
        "global: sent {sent} in {secs:.3}s from 3 processes, admitted {admitted}, expected {expected:.0}, error {:.2}%",
        error * 100.0
    );
    assert!(error < 0.05, "admitted {admitted}, expected {expected:.0}");
    assert_eq!(limited + admitted, sent as f64);
}

#[test]
fn ring_buffer_overflow_is_counted_needs_root() {
    require_root!(EBPF);
    let d = ebpf_daemon(
        "ring-overflow",
        &[
            "--threshold-ms",
            "5000",
            "--max-beat-rate",
            "0",
            "--global-beat-rate",
            "0",
        ],
    );
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

#[test]
fn plaintext_udp_junk_is_counted_in_the_kernel_and_beats_carry_the_source_needs_root() {
    require_root!(EBPF);
    // Every feature on at once: this load also proves the verifier accepts both programs.
    let port = free_udp_port();
    let d = ebpf_daemon(
        "udp",
        &[
            "--threshold-ms",
            "1000",
            "--udp-port",
            &port.to_string(),
            "--udp-bind-addr",
            "127.0.0.1",
            "--i-accept-plaintext-udp",
            "--allow-cross-namespace-agents",
            "--clock-source",
            "boottime",
        ],
    );
    let target = format!("udp:127.0.0.1:{port}");
    for (_, wire) in decode_error_vectors() {
        send(&target, &["hex", "10", &hex_encode(&wire)]);
    }
    send(&target, &["hex", "10", "0102"]);
    d.wait_metric(
        "varta_frames_dropped_total{reason=\"decode\"}",
        90.0,
        Duration::from_secs(5),
    );
    let m = d.metrics();
    assert_eq!(m["varta_frames_dropped_total{reason=\"decode\"}"], 90.0);
    assert_eq!(m["varta_frames_dropped_total{reason=\"length\"}"], 10.0);
    assert_eq!(m["varta_datapath_beats_delivered_total"], 0.0);
    // A valid UDP beat is tracked under its claimed pid.
    let (_, pid, _) = send(&target, &["flood", "3"]);
    d.wait_log_all(
        &["event=agent_new", &format!("pid={pid}"), "transport=udp"],
        Duration::from_secs(5),
    );
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
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
    let line = d.wait_log("missing privilege", Duration::from_secs(5));
    assert!(
        line.contains("CAP_BPF")
            && line.contains("CAP_NET_ADMIN")
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
        fallback.contains("missing privilege CAP_BPF and CAP_NET_ADMIN"),
        "{fallback}"
    );
    assert_eq!(d.metric("varta_datapath_info{mode=\"userspace\"}"), 1.0);
    let agent = d.agent(50);
    let pid = format!("pid={}", agent.pid());
    d.wait_log_all(&["event=agent_new", &pid], Duration::from_secs(5));
    drop(agent);
    d.wait_log_all(&["event=stall", &pid], Duration::from_secs(5));
}

fn context_switches(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|t| {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .map(|l| l.split_whitespace().last().unwrap().parse::<u64>().unwrap())
                .sum::<u64>()
        })
        .sum()
}

/// The daemon's drain timer while an agent is watched (`datapath/ebpf.rs`).
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);

/// Beats are drained in batches, not one wake-up each; once every agent has stalled the
/// daemon sleeps (its drain timer is off); and a stalled agent's next beat wakes it by
/// itself (with the timer off nothing else would). The figures are `cargo xtask bench`'s.
#[test]
fn batched_drain_idle_sleep_and_prompt_resume_needs_root() {
    require_root!(EBPF);
    let d = ebpf_daemon("idle", &["--threshold-ms", "300"]);
    let agent = d.agent(2);
    let pid = agent.pid();
    let beats = format!("varta_beats_total{{pid=\"{pid}\"}}");
    d.wait_metric(&beats, 10.0, Duration::from_secs(5));
    // Measurement windows: nothing may scrape (wake) the daemon during them.
    let window = Duration::from_secs(1);
    let (b0, s0) = (d.metric(&beats), context_switches(d.pid()));
    std::thread::sleep(window);
    let (b1, s1) = (d.metric(&beats), context_switches(d.pid()));
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
    let s2 = context_switches(d.pid());
    std::thread::sleep(window);
    let s3 = context_switches(d.pid());
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
