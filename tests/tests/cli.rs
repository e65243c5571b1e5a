//! The command line as an operator meets it: incumbent unit files, bad flags, metrics access.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use varta_e2e::{Daemon, bin, scratch};

/// Every flag of the incumbent varta-watch 0.2.0, with a plausible value, as a unit file
/// would carry them; the ones without an effect here must each warn exactly once.
#[test]
fn incumbent_unit_file_command_line_starts_and_warns_once_per_ignored_flag() {
    let dir = scratch("unit-file");
    let key = dir.join("key.hex");
    std::fs::write(&key, "00".repeat(32)).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "a".repeat(64)).unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let export = dir.join("export.tsv");
    let audit = dir.join("audit.tsv");
    let heartbeat = dir.join("heartbeat");
    let k = key.to_str().unwrap();
    let implemented: Vec<String> = [
        "--threshold-ms",
        "2000",
        "--socket-mode",
        "0660",
        "--uds-rcvbuf-bytes",
        "262144",
        "--udp-port",
        "0",
        "--udp-bind-addr",
        "127.0.0.1",
        "--i-accept-plaintext-udp",
        "--plaintext-udp-i-accept-recovery-on-unauthenticated-transport",
        "--key-file",
        k,
        "--accepted-key-file",
        k,
        "--master-key-file",
        k,
        "--i-accept-secure-udp-non-loopback",
        "--secure-udp-i-accept-recovery-on-unauthenticated-transport",
        "--tracker-capacity",
        "512",
        "--tracker-eviction-policy",
        "balanced",
        "--max-beat-rate",
        "50",
        "--global-beat-rate",
        "4000",
        "--global-beat-burst",
        "8000",
        "--allow-cross-namespace-agents",
        "--clock-source",
        "boottime",
        "--recovery-exec",
        "/bin/true {pid}",
        "--recovery-debounce-ms",
        "2000",
        "--recovery-timeout-ms",
        "5000",
        "--recovery-env",
        "A=1",
        "--recovery-env",
        "B=2",
        "--recovery-inherit-env",
        "--shutdown-grace-ms",
        "1000",
        "--signal-handler-mode",
        "direct",
        "--export-file",
        export.to_str().unwrap(),
        "--prom-token-file",
        token.to_str().unwrap(),
        "--recovery-capture-stdio",
        "--recovery-capture-bytes",
        "4096",
        "--recovery-audit-file",
        audit.to_str().unwrap(),
        "--recovery-audit-max-bytes",
        "1048576",
        "--recovery-audit-sync-every",
        "1",
        "--export-file-max-bytes",
        "1048576",
        "--export-file-sync-every",
        "0",
        "--heartbeat-file",
        heartbeat.to_str().unwrap(),
        "--self-watchdog-secs",
        "10",
        "--hw-watchdog",
        "/dev/null",
        "--inject-wedge-ms",
        "0",
        "--prom-rate-limit-per-sec",
        "5",
        "--prom-rate-limit-burst",
        "10",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let ignored: Vec<(&str, Option<&str>)> = vec![
        ("--read-timeout-ms", Some("100")),
        ("--eviction-scan-window", Some("256")),
        ("--strict-namespace-check", None),
        ("--audit-fsync-budget-ms", Some("50")),
        ("--audit-sync-interval-ms", Some("0")),
        ("--audit-rotation-budget-ms", Some("50")),
        ("--iteration-budget-ms", Some("10")),
        ("--scrape-budget-ms", Some("10")),
    ];
    let mut b = Daemon::builder("unit-file", "userspace").args(implemented);
    for (flag, value) in &ignored {
        b = b.arg(*flag);
        if let Some(v) = value {
            b = b.arg(*v);
        }
    }
    let mut d = b.start();
    for (flag, _) in &ignored {
        let n = d.count_logs(&["event=flag_ignored", &format!("flag={flag}")]);
        assert_eq!(n, 1, "{flag} warned {n} times:\n{}", d.log_text());
    }
    assert_eq!(d.count_logs(&["event=flag_ignored"]), ignored.len());
    assert_eq!(d.count_logs(&["level=error"]), 0, "{}", d.log_text());
    // Like the incumbent: plaintext UDP is announced as unauthenticated at start.
    assert_eq!(
        d.count_logs(&["event=plaintext_udp_unauthenticated"]),
        1,
        "{}",
        d.log_text()
    );
    let (code, body) = d.get_metrics(Some(&"a".repeat(64)));
    assert_eq!(code, 200);
    assert!(body.contains("varta_tracker_capacity 512"));
    assert!(d.stop().success());
}

fn run_flags(args: &[&str]) -> (i32, String) {
    let out = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_give_one_line_naming_the_flag_and_exit_2() {
    let dir = scratch("bad-flags");
    let sock = dir.join("s.sock");
    let s = sock.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--socket", s, "--threshold-ms", "abc"], "--threshold-ms"),
        (&["--socket", s, "--threshold-ms", "0"], "--threshold-ms"),
        // Absurd values are refused, never wrapped (threshold x 1e6 ns, Instant + grace).
        (
            &["--socket", s, "--threshold-ms", "18446744073709551"],
            "--threshold-ms",
        ),
        (
            &[
                "--socket",
                s,
                "--threshold-ms",
                "100",
                "--shutdown-grace-ms",
                "99999999999",
            ],
            "--shutdown-grace-ms",
        ),
        (
            &[
                "--socket",
                s,
                "--threshold-ms",
                "100",
                "--tracker-capacity",
                "4294967295",
            ],
            "--tracker-capacity",
        ),
        (&["--socket", s], "--threshold-ms"),
        (&["--threshold-ms", "100"], "--socket"),
        (
            &[
                "--socket",
                s,
                "--threshold-ms",
                "100",
                "--tracker-eviction-policy",
                "lru",
            ],
            "--tracker-eviction-policy",
        ),
        (
            &[
                "--socket",
                s,
                "--threshold-ms",
                "100",
                "--clock-source",
                "realtime",
            ],
            "--clock-source",
        ),
        (
            &[
                "--socket",
                s,
                "--threshold-ms",
                "100",
                "--socket-mode",
                "999",
            ],
            "--socket-mode",
        ),
        (
            &[
                "--socket",
                s,
                "--threshold-ms",
                "100",
                "--tracker-capacity",
                "0",
            ],
            "--tracker-capacity",
        ),
        (
            &["--socket", s, "--threshold-ms", "100", "--udp-port", "9999"],
            "--udp-port",
        ),
        (
            &[
                "--socket",
                s,
                "--threshold-ms",
                "100",
                "--recovery-env",
                "NOEQUALS",
            ],
            "--recovery-env",
        ),
        (
            &[
                "--socket",
                s,
                "--threshold-ms",
                "100",
                "--prom-addr",
                "0.0.0.0:9100",
            ],
            "--prom-addr",
        ),
        (
            &[
                "--socket",
                s,
                "--threshold-ms",
                "100",
                "--prom-addr",
                "nonsense",
            ],
            "--prom-addr",
        ),
        (
            &["--socket", s, "--threshold-ms", "100", "--datapath", "xdp"],
            "--datapath",
        ),
        (
            &["--socket", s, "--threshold-ms", "100", "--no-such-flag"],
            "--no-such-flag",
        ),
        (
            &[
                "--socket",
                s,
                "--threshold-ms",
                "100",
                "--global-beat-burst",
                "0",
            ],
            "--global-beat-burst",
        ),
        (
            &[
                "--socket",
                s,
                "--threshold-ms",
                "100",
                "--prom-token-file",
                "/nonexistent",
            ],
            "--prom-token-file",
        ),
    ];
    for (args, flag) in cases {
        let (code, stderr) = run_flags(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{args:?}: not one line: {stderr}"
        );
        assert!(
            stderr.contains(flag),
            "{args:?}: does not name {flag}: {stderr}"
        );
    }
    assert!(!sock.exists(), "no socket was bound");
}

#[test]
fn metrics_token_is_enforced_and_failures_counted() {
    let dir = scratch("token");
    let token = dir.join("token");
    std::fs::write(&token, "s3cret-token-0123456789\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let d = Daemon::builder("token", "userspace")
        .args([
            "--threshold-ms",
            "1000",
            "--prom-token-file",
            token.to_str().unwrap(),
        ])
        .start();
    assert_eq!(d.get_metrics(None).0, 401);
    assert_eq!(d.get_metrics(Some("wrong-token-0123456789")).0, 401);
    let (code, body) = d.get_metrics(Some("s3cret-token-0123456789"));
    assert_eq!(code, 200);
    assert!(body.contains("varta_prom_auth_failures_total 2"), "{body}");

    // A token readable by others is refused at start-up.
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (code, stderr) = run_flags(&[
        "--socket",
        dir.join("x.sock").to_str().unwrap(),
        "--threshold-ms",
        "1",
        "--prom-token-file",
        token.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("--prom-token-file") && stderr.contains("0600"),
        "{stderr}"
    );
}

#[test]
fn beat_and_agent_subcommands_reach_the_observer() {
    let d = Daemon::builder("subcommands", "userspace")
        .args(["--threshold-ms", "5000"])
        .start();
    let st = Command::new(bin())
        .args(["beat", "--status", "degraded", "--payload", "7", "--socket"])
        .arg(&d.socket)
        .status()
        .unwrap();
    assert!(st.success());
    // The one-shot beat is tracked.
    d.wait_log("event=agent_new", Duration::from_secs(5));
    // Without an observer: a clear error, not a panic.
    let out = Command::new(bin())
        .args(["beat", "--socket", "/nonexistent/varta.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/varta.sock"), "{err}");
}

#[test]
fn shutdown_after_secs_exits_cleanly_and_removes_the_socket() {
    let mut d = Daemon::builder("shutdown-after", "userspace")
        .args(["--threshold-ms", "1000", "--shutdown-after-secs", "1"])
        .start();
    let socket = d.socket.clone();
    assert!(socket.exists());
    // It exits by itself.
    assert!(d.wait_exit(Duration::from_secs(10)).success());
    assert!(!socket.exists());
}

/// What operators of the incumbent rely on at start-up: removed flags exit 2 with the
/// migration hint, UDP plus recovery needs the transport's opt-in, key files must be private
/// regular files, secure UDP stays on loopback unless told otherwise.
#[test]
fn incumbent_start_up_refusals_exit_2_naming_the_flag() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("start-up-refusals");
    let sock = dir.join("s.sock");
    let s = sock.to_str().unwrap();
    let key = |name: &str, text: &str, mode: u32| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let good = key("good.hex", &"00".repeat(32), 0o600);
    let world = key("world.hex", &"00".repeat(32), 0o644);
    let short = key("short.hex", "0011", 0o600);
    let link = dir.join("link.hex");
    std::os::unix::fs::symlink(&good, &link).unwrap();
    let link = link.to_str().unwrap();
    let base = ["--socket", s, "--threshold-ms", "100"];
    let udp = ["--udp-port", "0"];
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (
            vec!["--recovery-cmd", "/bin/true"],
            "--recovery-cmd",
            "use --recovery-exec",
        ),
        (
            vec!["--i-accept-shell-risk"],
            "--i-accept-shell-risk",
            "use --recovery-exec",
        ),
        (
            vec!["--key-env", "VARTA_KEY"],
            "--key-env",
            "use --key-file",
        ),
        (
            [
                &udp[..],
                &["--i-accept-plaintext-udp", "--recovery-exec", "/bin/true"],
            ]
            .concat(),
            "--plaintext-udp-i-accept-recovery-on-unauthenticated-transport",
            "recovery",
        ),
        (
            [
                &udp[..],
                &["--key-file", &good, "--recovery-exec", "/bin/true"],
            ]
            .concat(),
            "--secure-udp-i-accept-recovery-on-unauthenticated-transport",
            "recovery",
        ),
        (
            [&udp[..], &["--key-file", &world]].concat(),
            "--key-file",
            "mode 0600",
        ),
        (
            [&udp[..], &["--master-key-file", link]].concat(),
            "--master-key-file",
            "symlink",
        ),
        (
            [&udp[..], &["--accepted-key-file", &short]].concat(),
            "--accepted-key-file",
            "64 hex digits",
        ),
        (
            [
                &udp[..],
                &["--key-file", &good, "--udp-bind-addr", "0.0.0.0"],
            ]
            .concat(),
            "--udp-bind-addr",
            "--i-accept-secure-udp-non-loopback",
        ),
    ];
    for (extra, flag, hint) in cases {
        let args = [&base[..], &extra[..]].concat();
        let (code, stderr) = run_flags(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{args:?}: not one line: {stderr}"
        );
        assert!(
            stderr.contains(flag) && stderr.contains(hint),
            "{args:?}: does not name {flag} with {hint:?}: {stderr}"
        );
    }
    assert!(!sock.exists(), "no socket was bound");
}

/// Test hooks stay out of the product's help: the hidden incumbent test flags and the
/// attestation override the e2e tests set through the environment. They still parse.
#[test]
fn help_does_not_list_the_test_hooks() {
    for help_flag in ["--help", "-h"] {
        let out = Command::new(bin()).arg(help_flag).output().unwrap();
        assert!(out.status.success(), "{help_flag}: {out:?}");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("--threshold-ms"), "{help_flag}:\n{help}");
        for hook in [
            "--inject-wedge-ms",
            "--shutdown-after-secs",
            "VARTA_INJECT_WEDGE_MS",
            "VARTA_SHUTDOWN_AFTER_SECS",
            "VARTA_EBPF_ATTEST",
        ] {
            assert!(!help.contains(hook), "{help_flag} lists {hook}:\n{help}");
        }
    }
}
