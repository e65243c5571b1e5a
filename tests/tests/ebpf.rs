//! What only the eBPF datapath does, with either attestation method: drops in the kernel,
//! exact in-kernel counters, rate limits and ring-buffer overflow in the kernel, UDP, and
//! the batched drain. Every test here needs root (CAP_BPF + CAP_PERFMON); CI runs them as root.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use varta_e2e::{Daemon, decode_error_vectors, reap};

/// Each scenario twice: with the attestation the daemon picks on this kernel, and forced to
/// task_read (`VARTA_EBPF_ATTEST`), so both methods meet every assertion.
macro_rules! on_both_attestations {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn ebpf_needs_root() {
                if varta_e2e::ebpf_enabled(concat!(stringify!($name), "::ebpf_needs_root")) {
                    super::$name();
                }
            }

            #[test]
            fn ebpf_task_read_needs_root() {
                if varta_e2e::ebpf_enabled(concat!(stringify!($name), "::ebpf_task_read_needs_root")) {
                    varta_e2e::with_attest("task_read", super::$name);
                }
            }
        }
    )*};
}

on_both_attestations!(
    junk_flood_from_several_processes_is_counted_exactly_in_the_kernel,
    spoof_over_uds_is_dropped_in_the_kernel,
    per_agent_rate_limit_holds_within_5_percent,
    global_rate_limit_holds_within_5_percent,
    ring_buffer_overflow_is_counted,
    plaintext_udp_junk_is_counted_in_the_kernel_and_beats_carry_the_source,
    batched_drain_idle_sleep_and_prompt_resume,
);

const SENDER: &str = env!("CARGO_BIN_EXE_varta-sender");

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs the sender to completion: (frames sent, sender pid, elapsed seconds).
fn send(target: &str, args: &[&str]) -> (u64, u32, f64) {
    let out = Command::new(SENDER)
        .arg(target)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k))
            .unwrap()
            .to_owned()
    };
    (
        field("sent=").parse().unwrap(),
        field("pid=").parse().unwrap(),
        field("elapsed_ns=").parse::<f64>().unwrap() / 1e9,
    )
}

fn ebpf_daemon(name: &str, args: &[&str]) -> Daemon {
    let d = Daemon::builder(name, "ebpf")
        .args(args.iter().copied())
        .start();
    let info = d.datapath_info();
    assert!(info.contains("{mode=\"ebpf\","), "{info}\n{}", d.log_text());
    assert_eq!(d.metric(&info), 1.0, "{}", d.log_text());
    d
}

fn junk_flood_from_several_processes_is_counted_exactly_in_the_kernel() {
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
        .map(|(_, bytes)| {
            Command::new(SENDER)
                .args([&socket, "hex", &EACH.to_string(), &hex(bytes)])
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
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
        Duration::from_secs(5),
        |v| v >= total_decode as f64,
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

fn spoof_over_uds_is_dropped_in_the_kernel() {
    let d = ebpf_daemon("kernel-spoof", &["--threshold-ms", "1000"]);
    let agent = d.agent(100);
    let victim = agent.id();
    d.wait_metric(
        &format!("varta_beats_total{{pid=\"{victim}\"}}"),
        Duration::from_secs(5),
        |v| v >= 1.0,
    );
    let delivered = d.metric("varta_datapath_beats_delivered_total");
    let (sent, _, _) = send(
        d.socket.to_str().unwrap(),
        &["forge", "200", &victim.to_string()],
    );
    let spoofs = d.wait_metric(
        "varta_frames_dropped_total{reason=\"spoof\"}",
        Duration::from_secs(5),
        |v| v >= sent as f64,
    );
    assert_eq!(spoofs, 200.0);
    // Only the agent's own beats (one per 100 ms) reached userspace, none of the 200.
    let after = d.metric("varta_datapath_beats_delivered_total");
    assert!(after - delivered < 20.0, "{delivered} -> {after}");
    assert_eq!(
        d.metric("varta_frames_dropped_total{reason=\"replay\"}"),
        0.0
    );
    reap(agent);
}

fn per_agent_rate_limit_holds_within_5_percent() {
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
    std::thread::sleep(Duration::from_millis(200));
    let admitted = d.metric(&beats);
    let expected = RATE + RATE * secs; // one second of burst, then the rate
    let error = (admitted - expected).abs() / expected;
    println!(
        "per-agent: sent {sent} in {secs:.3}s, admitted {admitted}, expected {expected:.0}, error {:.2}%",
        error * 100.0
    );
    assert!(error < 0.05, "admitted {admitted}, expected {expected:.0}");
    let limited = d.metric("varta_rate_limited_total{reason=\"per_pid\"}");
    assert_eq!(
        limited + admitted,
        sent as f64,
        "every frame admitted or counted"
    );
}

fn global_rate_limit_holds_within_5_percent() {
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
        .map(|_| {
            Command::new(SENDER)
                .args([&socket, "flood", "0", "2000"])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut sent = 0u64;
    for s in senders {
        let out = s.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        sent += text
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("sent="))
            .unwrap()
            .parse::<u64>()
            .unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(200));
    let m = d.metrics();
    let admitted: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("varta_beats_total{"))
        .map(|(_, v)| v)
        .sum();
    let expected = RATE + RATE * secs;
    let error = (admitted - expected).abs() / expected;
    println!(
        "global: sent {sent} in {secs:.3}s from 3 processes, admitted {admitted}, expected {expected:.0}, error {:.2}%",
        error * 100.0
    );
    assert!(error < 0.05, "admitted {admitted}, expected {expected:.0}");
    assert_eq!(
        m["varta_rate_limited_total{reason=\"global\"}"] + admitted,
        sent as f64
    );
}

fn ring_buffer_overflow_is_counted() {
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
    let full = d.wait_metric(
        "varta_frames_dropped_total{reason=\"ringbuf_full\"}",
        Duration::from_secs(5),
        |v| v > 0.0,
    );
    std::thread::sleep(Duration::from_millis(300));
    let delivered = d.metric("varta_datapath_beats_delivered_total");
    println!("ring overflow: sent {sent}, delivered {delivered}, ringbuf_full {full}");
    assert!(full > 0.0);
    assert_eq!(
        delivered + full,
        sent as f64,
        "every frame delivered or counted, none lost silently"
    );
}

fn plaintext_udp_junk_is_counted_in_the_kernel_and_beats_carry_the_source() {
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
        send(&target, &["hex", "10", &hex(&wire)]);
    }
    send(&target, &["hex", "10", "0102"]);
    d.wait_metric(
        "varta_frames_dropped_total{reason=\"decode\"}",
        Duration::from_secs(5),
        |v| v >= 90.0,
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
    )
    .unwrap_or_else(|| panic!("{}", d.log_text()));
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

/// Beats are drained in batches, not one wake-up each; once every agent has stalled the
/// daemon sleeps; and a stalled agent's next beat wakes it at once.
fn batched_drain_idle_sleep_and_prompt_resume() {
    let d = ebpf_daemon("idle", &["--threshold-ms", "300"]);
    let mut agent = d.agent(2);
    let pid = agent.id();
    let beats = format!("varta_beats_total{{pid=\"{pid}\"}}");
    d.wait_metric(&beats, Duration::from_secs(5), |v| v >= 10.0);
    let (b0, s0) = (d.metric(&beats), context_switches(d.pid()));
    std::thread::sleep(Duration::from_secs(1));
    let (b1, s1) = (d.metric(&beats), context_switches(d.pid()));
    println!(
        "watching: {} beats, {} context switches in 1 s",
        b1 - b0,
        s1 - s0
    );
    assert!(b1 - b0 > 100.0);
    assert!(
        (s1 - s0) as f64 <= (b1 - b0) / 3.0,
        "batched: {} switches for {} beats",
        s1 - s0,
        b1 - b0
    );

    varta_e2e::kill(&mut agent, libc::SIGSTOP);
    d.wait_log_all(
        &["event=stall", &format!("pid={pid}")],
        Duration::from_secs(5),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let s2 = context_switches(d.pid());
    std::thread::sleep(Duration::from_secs(1));
    let s3 = context_switches(d.pid());
    println!("idle: {} context switches in 1 s", s3 - s2);
    assert!(s3 - s2 <= 3, "an idle daemon sleeps: {} switches", s3 - s2);

    varta_e2e::kill(&mut agent, libc::SIGCONT);
    let resumed = std::time::Instant::now();
    d.wait_log_all(
        &["event=agent_resumed", &format!("pid={pid}")],
        Duration::from_secs(2),
    )
    .expect("resumed");
    assert!(
        resumed.elapsed() < Duration::from_millis(200),
        "woken at once: {:?}",
        resumed.elapsed()
    );
    reap(agent);
}
