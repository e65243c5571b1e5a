//! `cargo xtask run --demo` as a newcomer runs it, but with stdout not a terminal: within
//! ten seconds of the observer being ready its log shows the wedged and the killed agent
//! stalled, the dying agent's exit, and a recovery for each; Ctrl-C (SIGINT) stops it and
//! leaves no process behind.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use varta_e2e::{Proc, bin, log_field, log_has, target_bin, wait_for};

/// The first line having every one of `parts`, waiting up to `timeout`.
#[track_caller]
fn wait_line(lines: &Mutex<Vec<String>>, parts: &[&str], timeout: Duration) -> String {
    wait_for(&format!("a demo line with {parts:?}"), timeout, || {
        let lines = lines.lock().unwrap();
        lines
            .iter()
            .find(|l| parts.iter().all(|p| log_has(l, p)))
            .cloned()
            .ok_or_else(|| lines.join("\n"))
    })
}

#[test]
fn demo_shows_a_stall_an_exit_and_recoveries_and_leaves_nothing_running() {
    let mut demo = Proc::spawn(
        Command::new(target_bin("xtask"))
            .args(["run", "--demo", "--bin"])
            .arg(bin())
            .args([
                "--",
                "--prom-addr",
                "127.0.0.1:0",
                "--datapath",
                "userspace",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let stderr = demo.take_stderr().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });

    let ready = wait_line(&lines, &["event=ready"], Duration::from_secs(30));
    // What the demo promises a newcomer: all of it within ten seconds of the observer.
    let promise = Instant::now() + Duration::from_secs(10);
    let left = || promise.saturating_duration_since(Instant::now());
    let observer: u32 = log_field(&ready, "pid").parse().unwrap();
    let agents_line = wait_line(&lines, &["xtask: demo: agents"], left());
    let agents: Vec<u32> = agents_line
        .rsplit(':')
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(agents.len(), 5, "{agents_line}");
    let (wedged, killed, dying) = (agents[2], agents[3], agents[4]);

    for (event, pid) in [
        ("event=stall", wedged),
        ("event=stall", killed),
        ("event=exit", dying),
    ] {
        let pid = format!("pid={pid}");
        wait_line(&lines, &[event, &pid], left());
        wait_line(&lines, &["event=recovery", &pid, "outcome=success"], left());
    }
    let healthy = format!("pid={}", agents[0]);
    assert!(
        !lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| log_has(l, "event=stall") && log_has(l, &healthy)),
        "a healthy agent stalled:\n{}",
        lines.lock().unwrap().join("\n")
    );

    demo.signal(libc::SIGINT);
    wait_for(
        "the demo to exit on SIGINT",
        Duration::from_secs(15),
        || demo.try_wait().ok_or_else(|| "running".to_owned()),
    );
    wait_line(&lines, &["xtask: demo: stopped"], Duration::from_secs(5));
    for pid in std::iter::once(observer).chain(agents) {
        let proc = format!("/proc/{pid}");
        wait_for(
            &format!("demo process {pid} to be gone"),
            Duration::from_secs(5),
            || {
                if Path::new(&proc).exists() {
                    Err(std::fs::read_to_string(format!("{proc}/cmdline")).unwrap_or_default())
                } else {
                    Ok(())
                }
            },
        );
    }
}
