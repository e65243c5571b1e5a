//! deploy/systemd: `systemd-analyze verify` accepts the unit, and the daemon speaks the
//! notification protocol such a unit relies on, with no flag: READY=1 after start-up,
//! WATCHDOG=1 at half of $WATCHDOG_USEC, STOPPING=1 on SIGTERM; to a path and to an
//! @abstract $NOTIFY_SOCKET. Also /healthz and /readyz, which the DaemonSet probes.

use std::{
    os::unix::net::UnixDatagram,
    process::Command,
    time::{Duration, Instant},
};

use varta_e2e::{
    Daemon,
    deploy::{self, deploy_file, http_get, require_tool},
    scratch,
};

#[test]
#[ignore = "needs systemd-analyze: run by `cargo xtask test`, which installs it"]
fn systemd_analyze_verify_accepts_the_unit() {
    require_tool(varta_e2e::this_test!(), "systemd-analyze", &["--version"]);
    let unit = deploy_file("systemd/varta-watch.service");
    // verify checks that ExecStart= is executable: point it at this build, change nothing else.
    let installed = "/usr/local/bin/varta-watch";
    assert!(unit.contains(&format!("ExecStart={installed} ")));
    let dir = scratch("systemd-verify");
    let path = dir.join("varta-watch.service");
    std::fs::write(
        &path,
        unit.replace(installed, &varta_e2e::bin().display().to_string()),
    )
    .unwrap();
    let (ok, out) = deploy::run(Command::new("systemd-analyze").arg("verify").arg(&path));
    assert!(
        ok && out.trim().is_empty(),
        "systemd-analyze verify:\n{out}"
    );
    for directive in [
        "Type=notify",
        "WatchdogSec=",
        "RuntimeDirectory=varta",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "SystemCallFilter=@system-service bpf",
        "ReadWritePaths=-/sys/fs/bpf",
        "RuntimeDirectoryPreserve=yes",
        "CPUWeight=",
        "Nice=",
    ] {
        assert!(unit.contains(directive), "the unit lacks {directive}");
    }
    // The unit's capabilities are the DaemonSet's, which deploy_capabilities measures.
    let caps: Vec<String> = deploy::manifest_capabilities()
        .iter()
        .map(|c| format!("CAP_{c}"))
        .collect();
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        let line = format!("{key}={}", caps.join(" "));
        assert!(unit.lines().any(|l| l == line), "the unit needs {line}");
    }
}

/// `varta-watch.socket` holds the heartbeat socket across restarts (the daemon takes it from
/// LISTEN_FDS): `systemd-analyze verify` accepts it with the service, at the daemon's path.
#[test]
#[ignore = "needs systemd-analyze: run by `cargo xtask test`, which installs it"]
fn systemd_analyze_verify_accepts_the_socket_unit() {
    require_tool(varta_e2e::this_test!(), "systemd-analyze", &["--version"]);
    let socket = deploy_file("systemd/varta-watch.socket");
    for directive in [
        "ListenDatagram=/run/varta/varta.sock",
        "SocketMode=0666",
        "PassCredentials=yes",
    ] {
        assert!(
            socket.lines().any(|l| l == directive),
            "the socket unit lacks {directive}"
        );
    }
    assert!(deploy_file("systemd/varta.toml").contains("socket = \"/run/varta/varta.sock\""));
    let dir = scratch("systemd-verify-socket");
    std::fs::write(dir.join("varta-watch.socket"), &socket).unwrap();
    std::fs::write(
        dir.join("varta-watch.service"),
        deploy_file("systemd/varta-watch.service").replace(
            "/usr/local/bin/varta-watch",
            &varta_e2e::bin().display().to_string(),
        ),
    )
    .unwrap();
    let (ok, out) = deploy::run(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(dir.join("varta-watch.socket"))
            .arg(dir.join("varta-watch.service")),
    );
    assert!(
        ok && out.trim().is_empty(),
        "systemd-analyze verify:\n{out}"
    );
}
/// Receives notifications until `want` arrives (or `timeout`): every message seen, in order.
fn receive_until(sock: &UnixDatagram, want: &str, timeout: Duration) -> Vec<(Instant, String)> {
    let end = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while Instant::now() < end {
        sock.set_read_timeout(Some(
            end.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .unwrap();
        let Ok(n) = sock.recv(&mut buf) else { break };
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = msg.lines().any(|l| l == want);
        seen.push((Instant::now(), msg));
        if done {
            break;
        }
    }
    seen
}

fn states(seen: &[(Instant, String)]) -> Vec<String> {
    seen.iter()
        .flat_map(|(_, m)| m.lines().map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

#[test]
fn ready_watchdog_at_half_the_interval_and_stopping_to_a_path() {
    let dir = scratch("notify-path");
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    const WATCHDOG_USEC: u64 = 400_000;
    let mut d = Daemon::builder("notify-path", "userspace")
        .args(["--threshold-ms", "1000"])
        .env("NOTIFY_SOCKET", path.to_str().unwrap())
        .env("WATCHDOG_USEC", WATCHDOG_USEC.to_string())
        .start();
    let first = receive_until(&sock, "READY=1", Duration::from_secs(5));
    assert_eq!(states(&first), ["READY=1"], "READY=1 comes first, alone");
    d.wait_log("event=ready", Duration::ZERO);

    // Count watchdog pings over a window: at half of WATCHDOG_USEC, so about 2 per
    // WATCHDOG_USEC; never faster than the period allows, and enough that systemd would
    // not have killed the service.
    let t0 = Instant::now();
    let mut pings = Vec::new();
    while pings.len() < 8 {
        let got = receive_until(&sock, "WATCHDOG=1", Duration::from_secs(10));
        assert_eq!(
            states(&got),
            ["WATCHDOG=1"],
            "only watchdog pings while running"
        );
        pings.push(got[0].0);
    }
    let elapsed = t0.elapsed();
    let period = Duration::from_micros(WATCHDOG_USEC / 2);
    // 8 pings after READY (the first may come at once): at least 7 periods apart in total.
    assert!(
        pings[7] - pings[0] >= period * 7 - period / 2,
        "8 pings in {:?}: faster than every {period:?}",
        pings[7] - pings[0]
    );
    assert!(
        elapsed < Duration::from_secs(20),
        "8 pings took {elapsed:?}"
    );

    d.signal(libc::SIGTERM);
    let last = receive_until(&sock, "STOPPING=1", Duration::from_secs(5));
    let last = states(&last);
    assert_eq!(
        last.last().map(String::as_str),
        Some("STOPPING=1"),
        "{last:?}"
    );
    assert!(
        last[..last.len() - 1].iter().all(|s| s == "WATCHDOG=1"),
        "{last:?}"
    );
    assert!(d.wait_exit(Duration::from_secs(5)).success());
}

#[test]
fn ready_and_stopping_to_an_abstract_socket_and_no_watchdog_without_watchdog_usec() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("varta-e2e-notify-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    let mut d = Daemon::builder("notify-abstract", "userspace")
        .args(["--threshold-ms", "1000"])
        .env("NOTIFY_SOCKET", format!("@{name}"))
        .start();
    assert_eq!(
        states(&receive_until(&sock, "READY=1", Duration::from_secs(5))),
        ["READY=1"]
    );
    d.signal(libc::SIGTERM);
    assert_eq!(
        states(&receive_until(&sock, "STOPPING=1", Duration::from_secs(5))),
        ["STOPPING=1"],
        "no WATCHDOG=1 without WATCHDOG_USEC"
    );
    assert!(d.wait_exit(Duration::from_secs(5)).success());
}

#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn healthz_is_answered_by_the_event_loop_and_readyz_after_start_up_needs_root() {
    varta_e2e::require_root!("the metrics token file must be root's");
    let dir = scratch("probes-token");
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{}\n", "ab".repeat(32))).unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let mut d = Daemon::builder("probes", "userspace")
        .args(["--threshold-ms", "1000", "--prom-token-file"])
        .arg(token_file.to_str().unwrap())
        .start();
    let addr = d.prom.unwrap();
    // Kubelet probes carry no token: the probes need none even when /metrics does.
    assert_eq!(http_get(addr, "/metrics").0, 401);
    assert_eq!(http_get(addr, "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(http_get(addr, "/readyz"), (200, "ready\n".to_owned()));
    // The event loop answers while agents beat.
    let agent = d.agent(20);
    for _ in 0..20 {
        assert_eq!(http_get(addr, "/healthz").0, 200);
    }
    drop(agent);
    assert!(d.stop().success());
}
