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
    agents_sharing_a_hold_slot_are_both_counted_every_beat_once,
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

/// Rule 6 of `varta_common::wakeup`: a known agent's routine beats are counted in its hold
/// slot (`filter::hold_slot`, its host tgid's low bits), not put in the ring. Of two agents
/// whose tgids share a slot, the first owns it and the other's beats all go through the
/// ring: both are counted, every beat once, and only the first's are held.
fn agents_sharing_a_hold_slot_are_both_counted_every_beat_once() {
    let d = Daemon::builder("hold-slot", "ebpf")
        .args(["--threshold-ms", "2000", "--max-beat-rate", "0"])
        .start_ebpf();
    let socket = d.socket.to_str().unwrap().to_owned();
    // 150 beats, 20 ms apart: 3 s each.
    let pace = ["pace", "150", "20"];
    let first = sender(&socket, &pace);
    let pid = first.pid();
    d.wait_log_all(
        &["event=agent_new", &format!("pid={pid}")],
        Duration::from_secs(10),
    );
    let second = same_slot_process(pid, || sender(&socket, &pace));
    let other = second.pid();
    assert_eq!(
        varta_common::filter::hold_slot(pid),
        varta_common::filter::hold_slot(other)
    );
    let (sent_first, ..) = summary(first);
    let (sent_second, ..) = summary(second);
    let beats = |pid: u32| format!("varta_beats_total{{pid=\"{pid}\"}}");
    d.wait_metric(&beats(pid), sent_first as f64, Duration::from_secs(10));
    d.wait_metric(&beats(other), sent_second as f64, Duration::from_secs(10));
    // A beat counted twice would show once the rest is folded in: a fold interval later.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(d.metric(&beats(pid)), sent_first as f64, "{}", d.log_text());
    assert_eq!(
        d.metric(&beats(other)),
        sent_second as f64,
        "{}",
        d.log_text()
    );
    let held = d.metric("varta_datapath_beats_held_total");
    assert!(
        held >= sent_first as f64 / 2.0 && held <= sent_first as f64,
        "{held} beats held: the slot's owner's ({sent_first} sent), not the other's"
    );
}

/// Spawns a process whose pid is `pid` plus or minus a multiple of `HOLD_SLOTS` (the kernel's
/// next pid steered there), retrying where another task took the pid meanwhile.
fn same_slot_process(pid: u32, spawn: impl Fn() -> varta_e2e::Proc) -> varta_e2e::Proc {
    const NEXT_PID: &str = "/proc/sys/kernel/ns_last_pid";
    let slots = varta_common::filter::HOLD_SLOTS;
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let targets = (1..64)
        .flat_map(|k| [pid.checked_add(k * slots), pid.checked_sub(k * slots)])
        .flatten()
        .filter(|&t| t > 1000 && t < pid_max);
    for target in targets {
        if std::path::Path::new(&format!("/proc/{target}")).exists() {
            continue;
        }
        std::fs::write(NEXT_PID, (target - 1).to_string()).unwrap();
        let process = spawn();
        if process.pid() == target {
            return process;
        }
        drop(process);
    }
    panic!("no process could be started on the hold slot of pid {pid} (pid_max {pid_max})");
}
