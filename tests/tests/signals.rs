//! The daemon's own signal handling: shutdown, reload, snapshots, a signal storm with and
//! without glibc's rseq registration, the installed action as the kernel reports it, and a
//! negative control proving a handler without SA_RESTORER kills the process.

use std::{
    os::unix::process::ExitStatusExt,
    process::Command,
    time::{Duration, Instant},
};

use varta_e2e::{Daemon, frame, log_field};

use varta_e2e::on_both_datapaths;

on_both_datapaths!(sigterm_exits_cleanly, signal_storm_loses_no_beat);

fn sigterm_exits_cleanly(datapath: &str) {
    let mut d = Daemon::builder("sigterm", datapath)
        .export_file()
        .args(["--threshold-ms", "5000"])
        .start();
    let agent = d.agent(20);
    let pid = agent.pid();
    let beats = format!("varta_beats_total{{pid=\"{pid}\"}}");
    d.wait_metric(&beats, 10.0, Duration::from_secs(5));
    agent.signal(libc::SIGSTOP);
    // A frame of ours after the agent's last: once it is counted, so is every beat before.
    let me = std::process::id();
    d.send(&frame(me, 1));
    d.wait_metric(
        &format!("varta_beats_total{{pid=\"{me}\"}}"),
        1.0,
        Duration::from_secs(5),
    );
    let counted = d.metric(&beats);
    let socket = d.socket.clone();
    assert_eq!(d.stop().code(), Some(0));
    assert!(!socket.exists(), "socket removed");
    let text = d.export_text();
    assert!(text.ends_with('\n'), "complete last line");
    let pid = pid.to_string();
    let lines = text
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            f.get(1) == Some(&"beat") && f.get(2) == Some(&pid.as_str())
        })
        .count();
    assert_eq!(
        lines as f64, counted,
        "every counted beat is in the export file"
    );
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
        let installed = d.wait_log("event=signals_installed", Duration::from_secs(5));
        let rseq_size: u32 = log_field(&installed, "rseq_size").parse().unwrap();
        assert_eq!(
            rseq_size > 0,
            rseq,
            "rseq registration as requested: {installed}"
        );

        let agents: Vec<_> = (0..3).map(|_| d.agent(5)).collect();
        for a in &agents {
            d.wait_log_all(
                &["event=agent_new", &format!("pid={}", a.pid())],
                Duration::from_secs(5),
            );
        }
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
        let (hup, usr1) = d.wait_metrics("both signals handled", Duration::from_secs(5), |m| {
            let hup = m["varta_signals_received_total{signal=\"SIGHUP\"}"];
            let usr1 = m["varta_signals_received_total{signal=\"SIGUSR1\"}"];
            if hup >= 1.0 && usr1 >= 1.0 {
                Ok((hup, usr1))
            } else {
                Err(format!("hup {hup} usr1 {usr1}"))
            }
        });
        assert!(hup >= 1.0 && usr1 >= 1.0, "handled: hup {hup} usr1 {usr1}");
        d.wait_log("event=snapshot", Duration::from_secs(5));

        // Freeze the agents: each stall line carries the agent's last nonce, which must
        // equal the beats counted for it (nonces start at 1): no beat lost or mis-tracked.
        let pids: Vec<String> = agents.iter().map(|a| format!("pid={}", a.pid())).collect();
        let before: Vec<usize> = pids
            .iter()
            .map(|pid| d.count_logs(&["event=stall", pid]))
            .collect();
        for a in &agents {
            a.signal(libc::SIGSTOP);
        }
        for ((a, pid), seen) in agents.iter().zip(&pids).zip(before) {
            let line = d
                .wait_logs(&["event=stall", pid], seen + 1, Duration::from_secs(5))
                .swap_remove(seen);
            let last_nonce: f64 = log_field(&line, "last_nonce").parse().unwrap();
            assert_eq!(
                d.metric(&format!("varta_beats_total{{pid=\"{}\"}}", a.pid())),
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
        let mut d = d;
        assert_eq!(d.stop().code(), Some(0), "survived the storm");
        drop(agents);
    }
}

#[test]
fn sighup_reloads_the_config_file_and_rejects_an_invalid_one() {
    let dir = varta_e2e::scratch("reload-config");
    let config = dir.join("varta.toml");
    std::fs::write(&config, "threshold-ms = 5000\nmax-beat-rate = 100\n").unwrap();
    // A configuration file must be private to the observer's user (tests/tests/recovery_config.rs).
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let d = Daemon::builder("reload", "userspace")
        .args(["--config", config.to_str().unwrap()])
        .start();
    assert!(d.log_text().contains("threshold_ms=5000"));
    let agent = d.agent(20);
    let pid = agent.pid();
    d.wait_log_all(
        &["event=agent_new", &format!("pid={pid}")],
        Duration::from_secs(5),
    );

    std::fs::write(&config, "threshold-ms = 300\nmax-beat-rate = 100\n").unwrap();
    d.signal(libc::SIGHUP);
    let line = d.wait_log("event=reload", Duration::from_secs(5));
    // One value, quoted: it holds `=`.
    assert!(
        line.contains(r#"changed="threshold-ms=5000->300""#),
        "{line}"
    );
    agent.signal(libc::SIGSTOP);
    // The new threshold applies: a stall after 300 ms of silence, long before 5000.
    let stall = d.wait_log_all(
        &["event=stall", &format!("pid={pid}")],
        Duration::from_secs(4),
    );
    let silent_ms: u64 = log_field(&stall, "silent_ms").parse().unwrap();
    assert!((300..5000).contains(&silent_ms), "{stall}");

    // An invalid file is rejected whole; the running configuration stays.
    std::fs::write(&config, "threshold-ms = 100\nmax-beat-rate = \"fast\"\n").unwrap();
    d.signal(libc::SIGHUP);
    let rejected = d.wait_log("event=reload_rejected", Duration::from_secs(5));
    assert!(rejected.contains("max-beat-rate"), "{rejected}");
    assert_eq!(d.count_logs(&["event=reload"]), 1);
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
    drop(agent);
}

#[test]
fn sighup_reopens_the_export_file_for_rotation() {
    let d = Daemon::builder("rotate", "userspace")
        .export_file()
        .args(["--threshold-ms", "5000"])
        .start();
    let export = d.export.clone().unwrap();
    let rotated = d.dir.join("events.tsv.1");
    d.send(&frame(std::process::id(), 1));
    d.wait_log("event=agent_new", Duration::from_secs(5));
    std::fs::rename(&export, &rotated).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log_all(
        &["event=file_reopened", "file=export", "reason=sighup"],
        Duration::from_secs(5),
    );
    d.send(&frame(std::process::id(), 2));
    // New beats go to the new file: wait for its line.
    let lines =
        |path: &std::path::Path| std::fs::read_to_string(path).map_or(0, |t| t.lines().count());
    varta_e2e::wait_for(
        "the second beat's line in the new file",
        Duration::from_secs(5),
        || match lines(&export) {
            0 => Err("no line".to_owned()),
            n => Ok(n),
        },
    );
    assert_eq!(lines(&export), 1, "new beats go to the new file");
    assert_eq!(lines(&rotated), 1);
}

/// The action the kernel holds (read back at start-up) has SA_RESTORER and a restorer inside
/// the daemon's own executable text; with `--signal-handler-mode libc` it is libc's.
#[test]
fn installed_action_has_sa_restorer_and_our_own_restorer() {
    for (mode, ours) in [("direct", true), ("libc", false)] {
        let d = Daemon::builder(&format!("readback-{mode}"), "userspace")
            .args(["--threshold-ms", "1000", "--signal-handler-mode", mode])
            .start();
        let line = d.wait_log("event=signals_installed", Duration::from_secs(5));
        let hex = |key: &str| {
            let v = log_field(&line, key);
            u64::from_str_radix(v.strip_prefix("0x").unwrap_or(v), 16).unwrap()
        };
        let flags = hex("flags");
        assert_ne!(flags & 0x0400_0000, 0, "SA_RESTORER: {line}");
        assert_ne!(flags & libc::SA_RESTART as u64, 0, "SA_RESTART: {line}");
        assert!(line.contains("self_test=passed"));
        let restorer = hex("restorer");
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
