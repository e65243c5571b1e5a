//! Recovery that cannot be turned against the host: a global cap on running commands and a
//! global spawn rate, however many agents die at once; a death never preceded by a beat
//! runs nothing; at shutdown, commands still running after the grace period are killed.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use varta_e2e::{Daemon, panic_terminal_frame, sender};

const WAIT: Duration = Duration::from_secs(30);
/// `--recovery-max-concurrent`'s default.
const CAP: usize = 16;

/// Live children of `parent` (its recovery commands), from /proc.
fn children(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // `pid (comm) state ppid ...`: the comm may hold spaces, so split after `)`.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = &stat[stat.rfind(')')? + 2..];
                    let mut fields = rest.split_whitespace();
                    let state = fields.next()?;
                    let ppid: u32 = fields.next()?.parse().ok()?;
                    Some(ppid == parent && state != "Z")
                })
                .unwrap_or(false)
        })
        .collect()
}

fn recovery_daemon(name: &str) -> Daemon {
    Daemon::builder(name, "userspace")
        .args(["--threshold-ms", "60000", "--shutdown-grace-ms", "100"])
        .args(["--recovery-exec", "/bin/sleep 30"])
        // Every agent here is one uid's and one-shot: these tests are of the global limits,
        // so the per-uid and one-shot ones (tests/tests/recovery_fair.rs) are made as wide.
        .args(["--recovery-max-concurrent-per-uid", "16"])
        .args(["--recovery-spawn-rate-per-uid", "10"])
        .args(["--recovery-established-after-ms", "0"])
        .start()
}

fn suppressed(d: &Daemon, reason: &str) -> f64 {
    d.metrics()
        .get(&format!(
            "varta_recovery_suppressed_total{{reason=\"{reason}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
}

#[test]
fn five_hundred_dying_agents_never_run_more_than_the_cap() {
    let mut d = recovery_daemon("recovery-cap");
    let daemon_pid = d.pid();
    // Sample the daemon's children for the whole run.
    let done = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (done, most) = (done.clone(), most.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                most.fetch_max(children(daemon_pid).len(), Ordering::Relaxed);
            }
        })
    };
    let socket = d.socket.to_str().unwrap().to_owned();
    for batch in 0..10 {
        let senders: Vec<_> = (0..50)
            .map(|_| sender::sender(&socket, &["dying"]))
            .collect();
        for s in senders {
            let (sent, _, _) = sender::summary(s);
            assert_eq!(sent, 2, "batch {batch}");
        }
    }
    d.wait_logs(&["event=exit", "known=true"], 500, WAIT);
    let started = d.count_logs(&["event=recovery_started"]);
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let most = most.load(Ordering::Relaxed);
    let now = children(daemon_pid).len();
    assert!(
        most <= CAP,
        "{most} recovery commands ran at once (cap {CAP})"
    );
    assert!(now >= 1 && started >= 1, "no recovery ran at all");
    let limited = suppressed(&d, "max_running") + suppressed(&d, "spawn_rate");
    eprintln!(
        "recovery cap: most_running={most} started={started} suppressed={limited} max_running={} spawn_rate={}",
        suppressed(&d, "max_running"),
        suppressed(&d, "spawn_rate")
    );
    // 500 deaths in far less than 49 s: the spawn rate (10/s, burst 10) must have bitten.
    assert!(suppressed(&d, "spawn_rate") > 0.0, "{}", d.log_text());
    assert_eq!(
        started as f64 + limited,
        500.0,
        "every death either started a recovery or was suppressed and counted"
    );
    // Shutdown kills what still runs after the grace period.
    let running = children(daemon_pid);
    assert!(d.stop().success());
    d.wait_log("event=shutdown_recoveries_killed", WAIT);
    for child in running {
        assert!(
            !std::path::Path::new(&format!("/proc/{child}")).exists(),
            "recovery command {child} outlived the daemon"
        );
    }
}

#[test]
fn a_death_without_an_earlier_beat_runs_no_recovery() {
    let mut d = recovery_daemon("recovery-unknown");
    let pid = std::process::id();
    d.send(&panic_terminal_frame(pid));
    d.wait_log_all(&["event=exit", &format!("pid={pid}"), "known=false"], WAIT);
    d.wait_metric(
        "varta_recovery_suppressed_total{reason=\"unknown_agent\"}",
        1.0,
        WAIT,
    );
    assert_eq!(d.count_logs(&["event=recovery_started"]), 0);
    assert!(children(d.pid()).is_empty());
    assert!(d.stop().success());
}

#[test]
fn shutdown_kills_recovery_commands_after_the_grace_period() {
    let mut d = recovery_daemon("recovery-shutdown");
    let socket = d.socket.to_str().unwrap().to_owned();
    let (sent, agent, _) = sender::send(&socket, &["dying"]);
    assert_eq!(sent, 2);
    d.wait_log_all(&["event=recovery_started", &format!("pid={agent}")], WAIT);
    let running = children(d.pid());
    assert_eq!(running.len(), 1, "one recovery command");
    assert!(d.stop().success());
    d.wait_log("event=shutdown_recoveries_killed running=1", WAIT);
    // Killed and reaped by the daemon before it exited: no such process any more.
    assert!(
        !std::path::Path::new(&format!("/proc/{}", running[0])).exists(),
        "recovery command {} outlived the daemon",
        running[0]
    );
}

/// The recovery limits have safe defaults: a command is killed after 30 s, at most 16 run
/// at once, at most 10 start a second.
#[test]
fn recovery_limits_have_safe_defaults() {
    let out = std::process::Command::new(varta_e2e::bin())
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for (flag, default) in [
        ("--recovery-timeout-ms", "30000"),
        ("--recovery-max-concurrent", "16"),
        ("--recovery-spawn-rate", "10"),
    ] {
        let at = help
            .find(flag)
            .unwrap_or_else(|| panic!("{flag} missing:\n{help}"));
        let entry = &help[at..];
        let entry = &entry[..entry[2..].find("\n  -").map_or(entry.len(), |e| e + 2)];
        assert!(
            entry.contains(&format!("[default: {default}]")),
            "{flag}: {entry}"
        );
    }
}
