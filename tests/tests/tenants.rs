//! One uid cannot fill the tracker: `--tracker-max-per-uid` (half the capacity by default).

use std::{process::Stdio, time::Duration};

use varta_e2e::{Daemon, Proc, bin, require_root};

fn agent_as(uid: u32, d: &Daemon) -> Proc {
    Proc::spawn(
        std::process::Command::new("setpriv")
            .args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
            ])
            .arg(bin())
            .args(["agent", "--interval-ms", "100", "--socket"])
            .arg(&d.socket)
            .stderr(Stdio::null()),
    )
}

#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn one_uid_filling_the_tracker_leaves_room_for_another_uids_agent_needs_root() {
    require_root!("setpriv to two uids");
    let d = Daemon::builder("tenants", "userspace")
        .world_writable()
        .args([
            "--socket-mode",
            "0666",
            "--tracker-capacity",
            "8",
            "--threshold-ms",
            "5000",
        ])
        .start();
    // uid 65534 alone fills the tracker (no quota while nobody else needs room).
    let flood: Vec<Proc> = (0..8).map(|_| agent_as(65534, &d)).collect();
    d.wait_metric("varta_watch_pids_tracked", 8.0, Duration::from_secs(10));
    // Another uid's agent is tracked: one of uid 65534's (over its quota of 4) makes room.
    let honest = agent_as(1000, &d);
    d.wait_log_all(
        &["event=agent_new", &format!("pid={}", honest.pid())],
        Duration::from_secs(10),
    );
    let evicted = d.wait_log_all(
        &["event=agent_evicted", &format!("for={}", honest.pid())],
        Duration::from_secs(10),
    );
    let victim: u32 = varta_e2e::log_field(&evicted, "pid").parse().unwrap();
    assert!(flood.iter().any(|p| p.pid() == victim), "{evicted}");
    // The evicted agent beats on: it is refused, never takes the honest agent's place.
    d.wait_metric(
        "varta_frames_dropped_total{reason=\"capacity\"}",
        3.0,
        Duration::from_secs(10),
    );
    assert_eq!(
        d.count_logs(&["event=agent_evicted"]),
        1,
        "{}",
        d.log_text()
    );
    assert!(d.metric(&format!("varta_beats_total{{pid=\"{}\"}}", honest.pid())) >= 1.0);
    drop(flood);
}
