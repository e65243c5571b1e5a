//! What only the eBPF datapath does, with either attestation method: drops in the kernel,
//! exact in-kernel counters, UDP. Every test here needs root (CAP_BPF + CAP_PERFMON); CI runs
//! them as root. Rate limits, ring overflow and wake-ups are in `ebpf_limits.rs`, who may
//! load the datapath in `privileges.rs`.

use std::time::Duration;

use varta_e2e::{
    Daemon, decode_error_vectors, hex_encode,
    sender::{send, sender, summary},
};

varta_e2e::on_both_attestations!(
    junk_flood_from_several_processes_is_counted_exactly_in_the_kernel,
    spoof_over_uds_is_dropped_in_the_kernel,
    plaintext_udp_junk_is_counted_in_the_kernel_and_beats_carry_the_source,
);

fn junk_flood_from_several_processes_is_counted_exactly_in_the_kernel() {
    let d = Daemon::builder("junk-flood", "ebpf")
        .args(["--threshold-ms", "1000"])
        .start_ebpf();
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

fn spoof_over_uds_is_dropped_in_the_kernel() {
    let d = Daemon::builder("kernel-spoof", "ebpf")
        .args(["--threshold-ms", "1000"])
        .start_ebpf();
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

fn plaintext_udp_junk_is_counted_in_the_kernel_and_beats_carry_the_source() {
    // Every feature on at once: this load also proves the verifier accepts both programs.
    let port = free_udp_port();
    let d = Daemon::builder("udp", "ebpf")
        .args([
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
        ])
        .start_ebpf();
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
