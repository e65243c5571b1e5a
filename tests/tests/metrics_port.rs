//! The metrics port. Anyone who can reach it (any pod can reach the DaemonSet's) cannot keep
//! the kubelet's probes or a scrape waiting: with hundreds of idle connections, trickled
//! requests and more held open, `/healthz` still answers within the kubelet's 2 s timeout,
//! and the daemon holds a bounded number of descriptors.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use varta_e2e::{Daemon, wait_for};

/// The kubelet's probe timeout in the shipped DaemonSet.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// GET `path` on a fresh connection, as a probe does; the status and how long it took.
fn probe(addr: SocketAddr, path: &str) -> (u16, Duration) {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).unwrap();
    s.set_read_timeout(Some(PROBE_TIMEOUT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let code = String::from_utf8_lossy(&resp)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, started.elapsed())
}

/// Raises this process's descriptor limit to its hard limit (the test holds ~1,100).
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a valid, owned rlimit struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

fn daemon_fds(d: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .unwrap()
        .count()
}

#[test]
fn probes_answer_while_idle_and_trickling_connections_hold_the_port() {
    raise_fd_limit();
    let d = Daemon::builder("http-exhaustion", "userspace")
        .args(["--threshold-ms", "60000"])
        .start();
    let addr = d.prom.unwrap();
    let baseline = daemon_fds(&d);
    let mut held = Vec::new();
    for round in [200usize, 1000] {
        while held.len() < round {
            let mut s = TcpStream::connect(addr).unwrap();
            // Every fifth one trickles half a request (slowloris); the rest send nothing.
            if held.len() % 5 == 0 {
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                    .unwrap();
            }
            held.push(s);
        }
        for path in ["/healthz", "/readyz", "/metrics"] {
            let (code, took) = probe(addr, path);
            assert_eq!(code, 200, "{path} with {round} connections held");
            assert!(
                took < PROBE_TIMEOUT,
                "{path} took {took:?} with {round} connections held"
            );
        }
        // Connections that lost their place are closed as their tasks see it.
        wait_for(
            "the daemon to hold at most 64 connections",
            PROBE_TIMEOUT,
            || {
                let fds = daemon_fds(&d);
                if fds <= baseline + 64 {
                    Ok(())
                } else {
                    Err(format!(
                        "{fds} descriptors (from {baseline}) with {round} held"
                    ))
                }
            },
        );
    }
}

/// `--prom-rate-limit-per-sec` and `--prom-rate-limit-burst` as the incumbent has them:
/// scrapes of /metrics beyond the burst from one address get 429 until the bucket refills;
/// the probes are never limited.
#[test]
fn scrapes_beyond_the_per_source_limit_get_429_and_probes_never_do() {
    let d = Daemon::builder("prom-rate", "userspace")
        .args(["--threshold-ms", "60000"])
        .args([
            "--prom-rate-limit-per-sec",
            "1",
            "--prom-rate-limit-burst",
            "2",
        ])
        .start();
    let addr = d.prom.unwrap();
    let codes: Vec<u16> = (0..4).map(|_| probe(addr, "/metrics").0).collect();
    assert_eq!(&codes[..2], [200, 200], "{codes:?}");
    assert!(codes[2..].contains(&429), "{codes:?}");
    for _ in 0..5 {
        assert_eq!(probe(addr, "/healthz").0, 200);
    }
    wait_for(
        "the bucket to refill",
        Duration::from_secs(3),
        || match probe(addr, "/metrics").0 {
            200 => Ok(()),
            code => Err(code.to_string()),
        },
    );
    assert_eq!(d.count_logs(&["event=flag_ignored"]), 0, "{}", d.log_text());
}
