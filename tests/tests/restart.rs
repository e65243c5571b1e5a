//! Stop, then start, on the eBPF datapath: the filter's maps are pinned, so the old socket's
//! filter (alive while connected clients hold the socket) keeps queueing beats in the pinned
//! ring, which the next instance drains. Agents are the upstream Rust client `varta-client`
//! 0.2.0 at its default settings (`examples/upstream_agent.rs`): they connect once and never
//! reconnect. Every test here needs root (CAP_BPF + CAP_PERFMON, and bpffs).

use std::{process::Command, time::Duration};

use varta_e2e::{Daemon, Proc, target_bin};

const WAIT: Duration = Duration::from_secs(15);

fn upstream_agent(d: &Daemon, interval_ms: u64) -> Proc {
    Proc::spawn(
        Command::new(target_bin("examples/upstream_agent"))
            .arg(&d.socket)
            .arg(interval_ms.to_string()),
    )
}

fn beats(d: &Daemon, pid: u32) -> f64 {
    d.metric(&format!("varta_beats_total{{pid=\"{pid}\"}}"))
}

fn replays(d: &Daemon) -> f64 {
    d.metric("varta_frames_dropped_total{reason=\"replay\"}")
}

fn wait_new(d: &Daemon, pid: u32) {
    d.wait_log_all(&["event=agent_new", &format!("pid={pid}")], WAIT);
}

fn stalls_of(d: &Daemon, pid: u32) -> usize {
    d.count_logs(&["event=stall", &format!("pid={pid}")])
}

/// SIGTERM to `d1` (it must exit cleanly), then the same eBPF command line again in its
/// directory (its state file, its pins).
fn sigterm_then_start(mut d1: Daemon, name: &str, args: &[&str]) -> Daemon {
    assert!(d1.stop().success(), "{}", d1.log_text());
    Daemon::builder(name, "ebpf")
        .args(args.iter().copied())
        .in_dir(d1.into_dir())
        .start_ebpf()
}

/// (a) SIGTERM, then the same command line again.
#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn sigterm_then_start_keeps_agents_and_surfaces_the_wedged_one_once_needs_root() {
    varta_e2e::require_root!(varta_e2e::EBPF);
    let args = ["--threshold-ms", "1500"];
    let mut d1 = Daemon::builder("restart-term", "ebpf")
        .args(args)
        .start_ebpf();
    let live: Vec<Proc> = (0..3).map(|_| upstream_agent(&d1, 100)).collect();
    let wedged = upstream_agent(&d1, 100);
    for a in live.iter().chain([&wedged]) {
        wait_new(&d1, a.pid());
    }
    wedged.signal(libc::SIGSTOP);
    // The scenario: wedged 300 ms before the restart.
    std::thread::sleep(Duration::from_millis(300));
    assert!(d1.stop().success(), "{}", d1.log_text());
    let first_log = d1.log_text();
    let d2 = Daemon::builder("restart-term", "ebpf")
        .args(args)
        .in_dir(d1.into_dir())
        .start_ebpf();
    let resumed = d2.wait_log("event=resumed", Duration::ZERO);
    assert!(
        varta_e2e::log_has(&resumed, "from=pins"),
        "{resumed}\n{}",
        d2.log_text()
    );
    assert_eq!(varta_e2e::log_field(&resumed, "agents"), "4", "{resumed}");
    // The live agents keep being counted, without reconnecting: their beats reach the old
    // socket, whose filter queues them in the pinned ring this instance drains.
    let start: Vec<f64> = live.iter().map(|a| beats(&d2, a.pid())).collect();
    for (a, b0) in live.iter().zip(&start) {
        assert!(*b0 > 0.0, "beats_total carried over for {}", a.pid());
        d2.wait_metric(
            &format!("varta_beats_total{{pid=\"{}\"}}", a.pid()),
            b0 + 10.0,
            WAIT,
        );
    }
    // The wedged one is surfaced, by the second instance, once.
    d2.wait_log_all(&["event=stall", &format!("pid={}", wedged.pid())], WAIT);
    d2.wait_one_threshold();
    assert_eq!(stalls_of(&d2, wedged.pid()), 1, "{}", d2.log_text());
    assert!(
        !first_log.contains(&format!("event=stall pid={} ", wedged.pid())),
        "{first_log}"
    );
    for a in &live {
        assert_eq!(stalls_of(&d2, a.pid()), 0, "live agent {} stalled", a.pid());
        assert_eq!(
            d2.count_logs(&["event=agent_new", &format!("pid={}", a.pid())]),
            0,
            "agent {} was taken over, not new",
            a.pid()
        );
    }
    assert_eq!(replays(&d2), 0.0, "no beat consumed twice");
    assert_eq!(d2.count_logs(&["event=ebpf_record_short"]), 0);
}

/// (b) SIGKILL, and a 3 s gap before the new start: the beats sent meanwhile wait in the
/// pinned ring and are counted, in order (a beat consumed twice or out of order would be a
/// replay), none empty.
#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn sigkill_and_a_gap_loses_no_beat_needs_root() {
    varta_e2e::require_root!(varta_e2e::EBPF);
    let args = ["--threshold-ms", "2000"];
    let mut d1 = Daemon::builder("restart-kill", "ebpf")
        .args(args)
        .start_ebpf();
    let agents: Vec<Proc> = (0..2).map(|_| upstream_agent(&d1, 100)).collect();
    for a in &agents {
        wait_new(&d1, a.pid());
        d1.wait_metric(
            &format!("varta_beats_total{{pid=\"{}\"}}", a.pid()),
            5.0,
            WAIT,
        );
    }
    d1.signal(libc::SIGKILL);
    d1.wait_exit(WAIT);
    // The rollout's gap, with nobody draining (setup, not an assertion).
    std::thread::sleep(Duration::from_secs(3));
    let d2 = Daemon::builder("restart-kill", "ebpf")
        .args(args)
        .in_dir(d1.into_dir())
        .start_ebpf();
    let resumed = d2.wait_log("event=resumed", Duration::ZERO);
    assert!(varta_e2e::log_has(&resumed, "from=pins"), "{resumed}");
    let waiting = |field| -> u64 { varta_e2e::log_field(&resumed, field).parse().unwrap() };
    // 2 agents x 10 beats/s x 3 s: 60, less what scheduling delays; in the pinned ring, or
    // held in the agents' buckets (`varta_common::wakeup` rule 6).
    let waited = waiting("queued_beats") + waiting("held_beats");
    assert!(waited >= 40, "{resumed}");
    for a in &agents {
        // The checkpoint before the kill is at most a second old: every beat of the gap
        // (about 30 per agent) is counted on top of it.
        let counted = d2.wait_metric(
            &format!("varta_beats_total{{pid=\"{}\"}}", a.pid()),
            30.0,
            WAIT,
        );
        assert!(counted >= 30.0, "{counted}");
        assert_eq!(stalls_of(&d2, a.pid()), 0, "{}", d2.log_text());
    }
    assert_eq!(
        replays(&d2),
        0.0,
        "every queued beat consumed once, in order"
    );
    assert_eq!(d2.count_logs(&["event=ebpf_record_short"]), 0);
    assert!(d2.metric("varta_datapath_beats_delivered_total") >= waited as f64);
}

/// (c) A stall the first instance surfaced is not surfaced again by the next one, after a
/// SIGTERM nor after a SIGKILL.
#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn a_stall_surfaced_before_the_restart_is_not_surfaced_again_needs_root() {
    varta_e2e::require_root!(varta_e2e::EBPF);
    let args = ["--threshold-ms", "500"];
    let d1 = Daemon::builder("restart-stalled", "ebpf")
        .args(args)
        .start_ebpf();
    let live = upstream_agent(&d1, 100);
    let wedged = upstream_agent(&d1, 100);
    wait_new(&d1, live.pid());
    wait_new(&d1, wedged.pid());
    wedged.signal(libc::SIGSTOP);
    d1.wait_log_all(&["event=stall", &format!("pid={}", wedged.pid())], WAIT);
    let mut d2 = sigterm_then_start(d1, "restart-stalled", &args);
    let resumed = d2.wait_log("event=resumed", Duration::ZERO);
    assert!(varta_e2e::log_has(&resumed, "stalled=1"), "{resumed}");
    d2.wait_one_threshold();
    assert_eq!(stalls_of(&d2, wedged.pid()), 0, "{}", d2.log_text());
    assert_eq!(stalls_of(&d2, live.pid()), 0, "{}", d2.log_text());
    d2.signal(libc::SIGKILL);
    d2.wait_exit(WAIT);
    let d3 = Daemon::builder("restart-stalled", "ebpf")
        .args(args)
        .in_dir(d2.into_dir())
        .start_ebpf();
    d3.wait_one_threshold();
    assert_eq!(stalls_of(&d3, wedged.pid()), 0, "{}", d3.log_text());
    assert_eq!(stalls_of(&d3, live.pid()), 0, "{}", d3.log_text());
    // It beats again: resumed, as a stalled agent does.
    wedged.signal(libc::SIGCONT);
    d3.wait_log_all(
        &["event=agent_resumed", &format!("pid={}", wedged.pid())],
        WAIT,
    );
}

/// `--fresh-state` starts empty on purpose and says so.
#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn fresh_state_starts_empty_needs_root() {
    varta_e2e::require_root!(varta_e2e::EBPF);
    let mut d1 = Daemon::builder("restart-fresh", "ebpf")
        .args(["--threshold-ms", "1000"])
        .start_ebpf();
    let a = upstream_agent(&d1, 100);
    wait_new(&d1, a.pid());
    assert!(d1.stop().success());
    let d2 = Daemon::builder("restart-fresh", "ebpf")
        .args(["--threshold-ms", "1000", "--fresh-state"])
        .in_dir(d1.into_dir())
        .start_ebpf();
    let line = d2.wait_log("event=fresh", Duration::ZERO);
    assert!(line.contains("--fresh-state"), "{line}");
    assert_eq!(d2.count_logs(&["event=resumed"]), 0);
}

/// Pins are created and resumed with exactly the capabilities of the DaemonSet and the unit
/// (CAP_BPF, CAP_PERFMON, uid 0), on a host whose bpffs is mounted (as systemd does).
#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn pins_work_with_exactly_cap_bpf_and_cap_perfmon_needs_root() {
    varta_e2e::require_root!(varta_e2e::EBPF);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    if (parts.next().unwrap(), parts.next().unwrap()) < (5, 11) {
        eprintln!("skipping: before 5.11 the least set also holds CAP_SYS_RESOURCE");
        return;
    }
    let fs = Command::new("stat")
        .args(["-f", "-c", "%T", "/sys/fs/bpf"])
        .output()
        .unwrap();
    if String::from_utf8_lossy(&fs.stdout).trim() != "bpf_fs" {
        assert!(
            Command::new("mount")
                .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
                .status()
                .unwrap()
                .success()
        );
    }
    let set = "-all,+bpf,+perfmon";
    let wrapper = [
        "setpriv",
        "--reuid",
        "0",
        "--bounding-set",
        set,
        "--inh-caps",
        set,
        "--ambient-caps",
        set,
    ];
    let args = ["--threshold-ms", "1500"];
    let mut d1 = Daemon::builder("restart-least", "ebpf")
        .wrapped(wrapper)
        .args(args)
        .start_ebpf();
    let fresh = d1.wait_log("event=fresh", Duration::ZERO);
    assert!(fresh.contains("no pinned maps"), "{fresh}");
    let a = upstream_agent(&d1, 100);
    wait_new(&d1, a.pid());
    assert!(d1.stop().success());
    let d2 = Daemon::builder("restart-least", "ebpf")
        .wrapped(wrapper)
        .args(args)
        .in_dir(d1.into_dir())
        .start_ebpf();
    let resumed = d2.wait_log("event=resumed", Duration::ZERO);
    assert!(varta_e2e::log_has(&resumed, "from=pins"), "{resumed}");
    let b0 = beats(&d2, a.pid());
    d2.wait_metric(
        &format!("varta_beats_total{{pid=\"{}\"}}", a.pid()),
        b0 + 5.0,
        WAIT,
    );
    assert_eq!(stalls_of(&d2, a.pid()), 0);
}

/// The upstream PyPI client (`varta` 0.2.0, `Varta.connect` at its defaults: it connects
/// once): counted by the first instance, then by the next one after SIGTERM and a start,
/// without reconnecting and without being taken for a new agent.
#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn the_pypi_client_keeps_being_counted_across_a_restart_needs_root() {
    varta_e2e::require_root!(varta_e2e::EBPF);
    let python = std::env::var_os("VARTA_TEST_PYTHON");
    varta_e2e::require(
        varta_e2e::this_test!(),
        python.is_some(),
        "VARTA_TEST_PYTHON (a Python with the PyPI client `varta` 0.2.0) is unset: run it with `cargo xtask test`",
    );
    let args = ["--threshold-ms", "1500"];
    let d1 = Daemon::builder("restart-pypi", "ebpf")
        .args(args)
        .start_ebpf();
    let agent = Proc::spawn(
        Command::new(python.unwrap())
            .args([
                "-c",
                "import sys, time, varta\n\
                 v = varta.Varta.connect(sys.argv[1])\n\
                 while True:\n    v.beat(varta.Status.OK)\n    time.sleep(0.1)\n",
            ])
            .arg(&d1.socket),
    );
    let pid = agent.pid();
    wait_new(&d1, pid);
    d1.wait_metric(&format!("varta_beats_total{{pid=\"{pid}\"}}"), 3.0, WAIT);
    let d2 = sigterm_then_start(d1, "restart-pypi", &args);
    let carried = beats(&d2, pid);
    d2.wait_metric(
        &format!("varta_beats_total{{pid=\"{pid}\"}}"),
        carried + 5.0,
        WAIT,
    );
    assert_eq!(
        d2.count_logs(&["event=agent_new", &format!("pid={pid}")]),
        0,
        "taken for a new agent:\n{}",
        d2.log_text()
    );
    assert_eq!(stalls_of(&d2, pid), 0, "{}", d2.log_text());
}

/// (e) A counter Prometheus saw never goes down across a crash: the state file is written
/// after each scrape is encoded and before it is answered, so an instance killed right
/// after a scrape is followed by one that starts from at least what that scrape showed
/// (else Prometheus reads a reset and rate() spikes).
fn a_scraped_counter_never_goes_down_across_a_sigkill(datapath: &str) {
    let args = ["--threshold-ms", "60000"];
    let mut d1 = Daemon::builder("restart-scraped", datapath)
        .args(args)
        .start_checked();
    let agent = upstream_agent(&d1, 20);
    wait_new(&d1, agent.pid());
    // Past the first periodic checkpoint (a second after the start).
    d1.wait_metric(
        &format!("varta_beats_total{{pid=\"{}\"}}", agent.pid()),
        75.0,
        WAIT,
    );
    // Its last datagrams are taken in; the periodic checkpoint (each second) is most
    // likely older than that.
    agent.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(50));
    let scraped = beats(&d1, agent.pid());
    d1.signal(libc::SIGKILL);
    d1.wait_exit(WAIT);
    let d2 = Daemon::builder("restart-scraped", datapath)
        .args(args)
        .in_dir(d1.into_dir())
        .start_checked();
    let resumed = d2.wait_log("event=resumed", Duration::ZERO);
    let restored = beats(&d2, agent.pid());
    assert!(
        restored >= scraped,
        "scraped {scraped} before the SIGKILL, {restored} after: {resumed}"
    );
}

varta_e2e::on_both_datapaths!(a_scraped_counter_never_goes_down_across_a_sigkill);

/// (f) Routine beats the kernel holds instead of queueing them (`varta_common::wakeup` rule
/// 6) are counted once each: by the first instance up to its SIGTERM, then by the next one
/// from where the first left off (its state file says how far that was). The agent's last
/// nonce is how many beats it sent (the upstream client counts from 1).
#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn held_beats_are_counted_once_across_a_restart_needs_root() {
    varta_e2e::require_root!(varta_e2e::EBPF);
    let args = ["--threshold-ms", "1000", "--max-beat-rate", "0"];
    let d1 = Daemon::builder("restart-held", "ebpf")
        .args(args)
        .start_ebpf();
    let held = "varta_datapath_beats_held_total";
    let agent = upstream_agent(&d1, 40);
    let pid = agent.pid();
    wait_new(&d1, pid);
    d1.wait_metric(held, 5.0, WAIT);
    let d2 = sigterm_then_start(d1, "restart-held", &args);
    let held_before = d2.metric(held);
    d2.wait_metric(held, held_before + 20.0, WAIT);
    agent.signal(libc::SIGKILL);
    // Its stall is decided after what the kernel held is folded in (rule 3).
    let stall = d2.wait_log_all(&["event=stall", &format!("pid={pid}")], WAIT);
    let sent: f64 = varta_e2e::log_field(&stall, "last_nonce").parse().unwrap();
    assert_eq!(beats(&d2, pid), sent, "{}", d2.log_text());
    assert_eq!(replays(&d2), 0.0);
    assert_eq!(stalls_of(&d2, pid), 1, "{}", d2.log_text());
}

/// (g) A sender that addresses the path with each beat (no `connect`) reaches the next
/// instance's socket as soon as it is bound, before the filter is attached to it: what it
/// sent meanwhile was queued on the socket itself, where the eBPF datapath never reads.
/// Those are taken once after the attach: every beat sent is counted.
#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn beats_sent_to_the_path_across_a_restart_are_all_counted_needs_root() {
    varta_e2e::require_root!(varta_e2e::EBPF);
    let args = ["--threshold-ms", "2000", "--max-beat-rate", "0"];
    let d1 = Daemon::builder("restart-to-path", "ebpf")
        .args(args)
        .start_ebpf();
    // 100 beats, 40 ms apart: 4 s, across both instances and the start of the second.
    let agent = varta_e2e::sender::sender(d1.socket.to_str().unwrap(), &["pace", "100", "40"]);
    let pid = agent.pid();
    d1.wait_metric(&format!("varta_beats_total{{pid=\"{pid}\"}}"), 10.0, WAIT);
    let d2 = sigterm_then_start(d1, "restart-to-path", &args);
    let (sent, ..) = varta_e2e::sender::summary(agent);
    d2.wait_metric(
        &format!("varta_beats_total{{pid=\"{pid}\"}}"),
        sent as f64,
        WAIT,
    );
    // A beat counted twice would show once the rest is folded in: a fold interval later.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(beats(&d2, pid), sent as f64, "{}", d2.log_text());
    let early = d2.wait_log("event=queued_before_filter", Duration::ZERO);
    assert!(
        varta_e2e::log_field(&early, "beats")
            .parse::<u64>()
            .unwrap()
            > 0,
        "{early}"
    );
    assert_eq!(replays(&d2), 0.0);
}
