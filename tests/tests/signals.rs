//! The daemon's own signal handling: shutdown, reload, snapshots, a signal storm with and
//! without glibc's rseq registration, the installed action as the kernel reports it, and a
//! negative control proving a handler without SA_RESTORER kills the process.

use std::{
    os::unix::process::ExitStatusExt,
    process::Command,
    time::{Duration, Instant},
};

use varta_e2e::{Daemon, kill, reap};

use varta_e2e::on_both_datapaths;

on_both_datapaths!(
    sigterm_exits_cleanly_within_a_second,
    signal_storm_loses_no_beat
);

fn sigterm_exits_cleanly_within_a_second(datapath: &str) {
    let dir = varta_e2e::scratch(&format!("sigterm-export-{datapath}"));
    let export = dir.join("events.tsv");
    let d = Daemon::builder("sigterm", datapath)
        .args([
            "--threshold-ms",
            "5000",
            "--export-file",
            export.to_str().unwrap(),
        ])
        .start();
    let mut agent = d.agent(20);
    let pid = agent.id();
    let beats = format!("varta_beats_total{{pid=\"{pid}\"}}");
    d.wait_metric(&beats, Duration::from_secs(5), |v| v >= 10.0);
    kill(&mut agent, libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(100));
    let counted = d.metric(&beats);
    let socket = d.socket.clone();
    let (status, took) = d.stop();
    assert_eq!(status.code(), Some(0));
    assert!(took < Duration::from_secs(1), "exit took {took:?}");
    assert!(!socket.exists(), "socket removed");
    let text = std::fs::read_to_string(&export).unwrap();
    assert!(text.ends_with('\n'), "complete last line");
    let lines = text
        .lines()
        .filter(|l| l.split('\t').nth(1) == Some("beat"))
        .count();
    assert_eq!(
        lines as f64, counted,
        "every counted beat is in the export file"
    );
    reap(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key))
        .unwrap_or_else(|| panic!("{key} in {line}"))
}

/// Thousands of SIGHUP and SIGUSR1 within a second while agents beat every 5 ms; with
/// glibc's rseq registration on (its default) and off. How rseq is checked: the daemon logs
/// glibc's `__rseq_size` at start-up (non-zero = registered, 0 = disabled).
fn signal_storm_loses_no_beat(datapath: &str) {
    for rseq in [true, false] {
        let mut b = Daemon::builder(&format!("storm-rseq-{rseq}"), datapath).args([
            "--threshold-ms",
            "400",
            "--max-beat-rate",
            "0",
        ]);
        if !rseq {
            b = b.wrapped(["env", "GLIBC_TUNABLES=glibc.pthread.rseq=0"]);
        }
        let d = b.start();
        let installed = d
            .wait_log("event=signals_installed", Duration::from_secs(1))
            .unwrap();
        let rseq_size: u32 = field(&installed, "rseq_size=").parse().unwrap();
        assert_eq!(
            rseq_size > 0,
            rseq,
            "rseq registration as requested: {installed}"
        );

        let mut agents: Vec<_> = (0..3).map(|_| d.agent(5)).collect();
        std::thread::sleep(Duration::from_millis(100));
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < Duration::from_secs(1) {
            for sig in [libc::SIGHUP, libc::SIGUSR1] {
                d.signal(sig);
                sent += 1;
            }
            // Leave the 2-core machine some room for the agents and the daemon.
            std::thread::sleep(Duration::from_micros(100));
        }
        assert!(sent >= 2000, "a storm: {sent} signals");
        std::thread::sleep(Duration::from_millis(100));
        let m = d.metrics();
        let hup = m["varta_signals_received_total{signal=\"SIGHUP\"}"];
        let usr1 = m["varta_signals_received_total{signal=\"SIGUSR1\"}"];
        assert!(hup >= 1.0 && usr1 >= 1.0, "handled: hup {hup} usr1 {usr1}");
        assert!(d.count_logs(&["event=snapshot "]) >= 1);

        // Freeze the agents: each stall line carries the agent's last nonce, which must
        // equal the beats counted for it (nonces start at 1): no beat lost or mis-tracked.
        let stall_of = |pid: u32| vec!["event=stall".to_owned(), format!("pid={pid} ")];
        let before: Vec<usize> = agents
            .iter()
            .map(|a| {
                d.count_logs(
                    &stall_of(a.id())
                        .iter()
                        .map(String::as_str)
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        for a in &mut agents {
            kill(a, libc::SIGSTOP);
        }
        for (a, seen) in agents.iter().zip(before) {
            let parts = stall_of(a.id());
            let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
            let end = Instant::now() + Duration::from_secs(5);
            while d.count_logs(&parts) <= seen && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(10));
            }
            let line = d
                .logs()
                .into_iter()
                .filter(|l| parts.iter().all(|p| l.contains(p)))
                .nth(seen)
                .unwrap_or_else(|| {
                    panic!("stall of {} after the freeze:\n{}", a.id(), d.log_text())
                });
            let last_nonce: f64 = field(&line, "last_nonce=").parse().unwrap();
            assert_eq!(
                d.metric(&format!("varta_beats_total{{pid=\"{}\"}}", a.id())),
                last_nonce,
                "{line}"
            );
            assert!(last_nonce > 50.0);
        }
        let m = d.metrics();
        for reason in ["replay", "spoof", "ringbuf_full", "rate_global"] {
            assert_eq!(
                m[&format!("varta_frames_dropped_total{{reason=\"{reason}\"}}")],
                0.0,
                "{reason}"
            );
        }
        let (status, _) = d.stop();
        assert_eq!(status.code(), Some(0), "survived the storm");
        for a in agents {
            reap(a);
        }
    }
}

#[test]
fn sighup_reloads_the_config_file_and_rejects_an_invalid_one() {
    let dir = varta_e2e::scratch("reload-config");
    let config = dir.join("varta.toml");
    std::fs::write(&config, "threshold-ms = 5000\nmax-beat-rate = 100\n").unwrap();
    let d = Daemon::builder("reload", "userspace")
        .args(["--config", config.to_str().unwrap()])
        .start();
    assert!(d.log_text().contains("threshold_ms=5000"));
    let mut agent = d.agent(20);
    let pid = agent.id();
    d.wait_log_all(
        &["event=agent_new", &format!("pid={pid}")],
        Duration::from_secs(5),
    )
    .unwrap();

    std::fs::write(&config, "threshold-ms = 300\nmax-beat-rate = 100\n").unwrap();
    d.signal(libc::SIGHUP);
    let line = d
        .wait_log("event=reload ", Duration::from_secs(2))
        .unwrap_or_else(|| panic!("{}", d.log_text()));
    assert!(line.contains("changed=threshold-ms=5000->300"), "{line}");
    kill(&mut agent, libc::SIGSTOP);
    let stopped = Instant::now();
    d.wait_log_all(
        &["event=stall", &format!("pid={pid}")],
        Duration::from_secs(2),
    )
    .expect("the new threshold applies");
    assert!(stopped.elapsed() < Duration::from_millis(300 + 250));

    // An invalid file is rejected whole; the running configuration stays.
    std::fs::write(&config, "threshold-ms = 100\nmax-beat-rate = \"fast\"\n").unwrap();
    d.signal(libc::SIGHUP);
    let rejected = d
        .wait_log("event=reload_rejected", Duration::from_secs(2))
        .unwrap_or_else(|| panic!("{}", d.log_text()));
    assert!(rejected.contains("max-beat-rate"), "{rejected}");
    assert_eq!(d.count_logs(&["event=reload "]), 1);
    // A flag given on the command line wins over the file (checked at start-up).
    drop(d);
    std::fs::write(&config, "threshold-ms = 100\nmax-beat-rate = 50\n").unwrap();
    let d = Daemon::builder("reload-precedence", "userspace")
        .args([
            "--config",
            config.to_str().unwrap(),
            "--threshold-ms",
            "700",
            "--max-beat-rate",
            "5",
        ])
        .start();
    assert!(
        d.log_text().contains("threshold_ms=700"),
        "{}",
        d.log_text()
    );
    reap(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sighup_reopens_the_export_file_for_rotation() {
    let dir = varta_e2e::scratch("rotate");
    let export = dir.join("events.tsv");
    let d = Daemon::builder("rotate", "userspace")
        .args([
            "--threshold-ms",
            "5000",
            "--export-file",
            export.to_str().unwrap(),
        ])
        .start();
    d.send(&varta_e2e::frame(std::process::id(), 1));
    d.wait_log("event=agent_new", Duration::from_secs(2))
        .unwrap();
    std::fs::rename(&export, dir.join("events.tsv.1")).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log("event=export_reopened", Duration::from_secs(2))
        .unwrap();
    d.send(&varta_e2e::frame(std::process::id(), 2));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        std::fs::read_to_string(&export).unwrap().lines().count(),
        1,
        "new beats go to the new file"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("events.tsv.1"))
            .unwrap()
            .lines()
            .count(),
        1
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The action the kernel holds (read back at start-up) has SA_RESTORER and a restorer inside
/// the daemon's own executable text; with `--signal-handler-mode libc` it is libc's.
#[test]
fn installed_action_has_sa_restorer_and_our_own_restorer() {
    for (mode, ours) in [("direct", true), ("libc", false)] {
        let d = Daemon::builder(&format!("readback-{mode}"), "userspace")
            .args(["--threshold-ms", "1000", "--signal-handler-mode", mode])
            .start();
        let line = d
            .wait_log("event=signals_installed", Duration::from_secs(1))
            .unwrap();
        let flags = u64::from_str_radix(field(&line, "flags=0x"), 16).unwrap();
        assert_ne!(flags & 0x0400_0000, 0, "SA_RESTORER: {line}");
        assert_ne!(flags & libc::SA_RESTART as u64, 0, "SA_RESTART: {line}");
        assert!(line.contains("self_test=passed"));
        let restorer = u64::from_str_radix(field(&line, "restorer=0x"), 16).unwrap();
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", d.pid())).unwrap();
        let owner = maps
            .lines()
            .find(|l| {
                let (lo, hi) = l
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .split_once('-')
                    .unwrap();
                (u64::from_str_radix(lo, 16).unwrap()..u64::from_str_radix(hi, 16).unwrap())
                    .contains(&restorer)
            })
            .unwrap_or_else(|| panic!("restorer {restorer:#x} in no mapping"));
        assert!(
            owner.split_whitespace().nth(1).unwrap().contains('x'),
            "executable mapping: {owner}"
        );
        let in_daemon = owner.ends_with(varta_e2e::bin().file_name().unwrap().to_str().unwrap());
        assert_eq!(in_daemon, ours, "{mode}: restorer in {owner}");
    }
}

/// The negative control: a handler installed with the raw system call but without
/// SA_RESTORER kills the process with SIGSEGV as soon as the signal arrives.
#[test]
fn negative_control_without_sa_restorer_dies_by_sigsegv() {
    let out = Command::new(env!("CARGO_BIN_EXE_varta-sigtest"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSEGV),
        "{:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.stdout.is_empty(), "it never got past the signal");
}
