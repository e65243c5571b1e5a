//! Recovery cannot be denied by one user: budgets per uid, one-shot agents limited to half
//! of the global limits, and a stall's suppressed recovery retried while it stays stalled.

use std::{
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use varta_e2e::{Daemon, Proc, bin, log_has, require_root, target_bin};

/// Runs `cmd` as `uid` (real and effective) through setpriv.
fn as_uid(uid: u32, program: &std::path::Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .arg(program);
    cmd
}

#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn a_throwaway_agent_flood_from_one_uid_leaves_another_uids_recovery_needs_root() {
    require_root!("setpriv to two uids");
    let d = Daemon::builder("recovery-fair", "userspace")
        .world_writable()
        .args(["--socket-mode", "0666"])
        .args(["--threshold-ms", "500", "--shutdown-grace-ms", "100"])
        .args(["--recovery-exec", "/bin/sleep 30"])
        .args(["--recovery-established-after-ms", "1000"])
        .start();
    let socket = d.socket.to_str().unwrap().to_owned();
    // The flood: uid 65534 starts dying agents (beat once, then the panic-terminal frame)
    // as fast as it can, for the whole test.
    let done = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let flood = {
        let (done, sent, socket) = (done.clone(), sent.clone(), socket.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let batch: Vec<_> = (0..20)
                    .map(|_| {
                        Proc::spawn(
                            as_uid(65534, &target_bin("varta-sender"))
                                .args([socket.as_str(), "dying"])
                                .stdout(Stdio::null()),
                        )
                    })
                    .collect();
                for p in batch {
                    p.wait();
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    // The flood holds every global limit before the honest agent stalls.
    d.wait_logs(
        &["event=recovery", "outcome=suppressed"],
        20,
        Duration::from_secs(30),
    );
    // An honest agent of uid 1000 beats for longer than a one-shot, then dies silently.
    let honest = Proc::spawn(
        as_uid(1000, &bin())
            .args(["agent", "--interval-ms", "50", "--socket", &socket])
            .stderr(Stdio::null()),
    );
    let pid = honest.pid();
    d.wait_log_all(
        &["event=agent_new", &format!("pid={pid}")],
        Duration::from_secs(10),
    );
    std::thread::sleep(Duration::from_millis(1500));
    drop(honest);
    let started = d.wait_log_all(
        &["event=recovery_started", &format!("pid={pid}")],
        Duration::from_secs(20),
    );
    done.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    assert!(log_has(&started, "uid=1000"), "{started}");
    assert!(log_has(&started, "established=true"), "{started}");
    let flooded = d.count_logs(&["event=recovery_started", "uid=65534"]);
    let suppressed = d.count_logs(&["event=recovery", "outcome=suppressed"]);
    eprintln!(
        "{} dying agents of uid 65534: {flooded} recoveries started for them, {suppressed} suppressed; the honest agent's started: {started}",
        sent.load(Ordering::Relaxed)
    );
    assert!(suppressed > 0);
}

#[test]
fn a_suppressed_recovery_runs_once_a_slot_frees_while_the_agent_stays_stalled() {
    let d = Daemon::builder("recovery-rearm", "userspace")
        .args(["--threshold-ms", "300", "--shutdown-grace-ms", "100"])
        .args(["--recovery-max-concurrent", "1"])
        // Runs 1 s (`timeout` ends the sleep, whose argument is the pid).
        .args(["--recovery-exec", "/usr/bin/timeout 1 /bin/sleep {pid}"])
        .start();
    // Two agents stall in the same instant: one slot, so the second is suppressed first.
    let (a, b) = (d.agent(50), d.agent(50));
    let pids = [a.pid(), b.pid()];
    for pid in pids {
        d.wait_log_all(
            &["event=agent_new", &format!("pid={pid}")],
            Duration::from_secs(10),
        );
    }
    drop((a, b));
    let suppressed = d.wait_log_all(
        &["event=recovery", "outcome=suppressed", "max_running"],
        Duration::from_secs(10),
    );
    assert!(log_has(&suppressed, "retried"), "{suppressed}");
    let second = varta_e2e::log_field(&suppressed, "pid").to_owned();
    let retried = d.wait_log_all(
        &[
            "event=recovery_started",
            &format!("pid={second}"),
            "retried=true",
        ],
        Duration::from_secs(10),
    );
    // Once per stall: it ran, so it is not tried again.
    d.wait_log_all(
        &[
            "event=recovery",
            &format!("pid={second}"),
            "outcome=failure",
        ],
        Duration::from_secs(10),
    );
    assert_eq!(
        d.count_logs(&["event=recovery_started", &format!("pid={second}")]),
        1,
        "{retried}"
    );
}
