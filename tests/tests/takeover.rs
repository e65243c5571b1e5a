//! Takeover: a second `varta-watch` started on the socket of a running one takes over its
//! sockets (the very same socket objects) and state, and the first exits 0. Agents are the
//! upstream Rust client `varta-client` 0.2.0 at its default settings
//! (`examples/upstream_agent.rs`): they connect once and never reconnect.

use std::{
    collections::HashMap,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use varta_e2e::{Daemon, Proc, log_field, log_has, target_bin};

const WAIT: Duration = Duration::from_secs(15);

fn upstream_agent(socket: &std::path::Path, interval_ms: u64) -> Proc {
    Proc::spawn(
        Command::new(target_bin("examples/upstream_agent"))
            .arg(socket)
            .arg(interval_ms.to_string()),
    )
}

fn beats_sample(pid: u32) -> String {
    format!("varta_beats_total{{pid=\"{pid}\"}}")
}

fn wait_new(d: &Daemon, pid: u32) {
    d.wait_log_all(&["event=agent_new", &format!("pid={pid}")], WAIT);
}

fn stalls_of(d: &Daemon, pid: u32) -> usize {
    d.count_logs(&["event=stall", &format!("pid={pid}")])
}

/// Scrapes the metrics address over and over (it is handed over: the same listener serves
/// both observers in turn) and records every counter that ever went down.
struct Scraper {
    stop: Arc<AtomicBool>,
    /// Scrapes answered, counters that went down, scrapes that failed.
    seen: Arc<Mutex<(usize, Vec<String>, usize)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Scraper {
    fn start(addr: std::net::SocketAddr) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new((0, Vec::new(), 0)));
        let (s, r) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let mut last: HashMap<String, f64> = HashMap::new();
            while !s.load(Ordering::Relaxed) {
                let Some(body) = scrape(addr) else {
                    r.lock().unwrap().2 += 1;
                    continue;
                };
                let mut seen = r.lock().unwrap();
                seen.0 += 1;
                for (sample, value) in varta_e2e::parse_metrics(&body) {
                    if !sample.starts_with("varta_beats_total")
                        && !sample.starts_with("varta_datapath_beats_delivered_total")
                    {
                        continue;
                    }
                    if let Some(&before) = last.get(&sample)
                        && value < before
                    {
                        seen.1.push(format!("{sample}: {before} -> {value}"));
                    }
                    last.insert(sample, value);
                }
            }
        });
        Scraper {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// (scrapes answered, decreases seen, scrapes failed)
    fn finish(mut self) -> (usize, Vec<String>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// GET /metrics; `None` when the connection failed or the answer was not a 200.
fn scrape(addr: std::net::SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1) == Some("200")).then(|| body.to_owned())
}

/// The scenario, as a takeover: 3 live agents and one SIGSTOPped 300 ms before.
fn takeover_keeps_agents_counters_and_the_wedged_stall(datapath: &str) {
    let args = ["--threshold-ms", "1500"];
    let start = |b: varta_e2e::DaemonBuilder| {
        if datapath == "ebpf" {
            b.start_ebpf()
        } else {
            b.start()
        }
    };
    let mut d1 = start(Daemon::builder("takeover", datapath).args(args));
    let d1_pid = d1.pid();
    let live: Vec<Proc> = (0..3).map(|_| upstream_agent(&d1.socket, 100)).collect();
    let wedged = upstream_agent(&d1.socket, 100);
    for a in live.iter().chain([&wedged]) {
        wait_new(&d1, a.pid());
        d1.wait_metric(&beats_sample(a.pid()), 3.0, WAIT);
    }
    let scraper = Scraper::start(d1.prom.unwrap());
    wedged.signal(libc::SIGSTOP);
    // The scenario: wedged 300 ms before the takeover (setup, not an assertion).
    std::thread::sleep(Duration::from_millis(300));
    let d2 = start(Daemon::builder("takeover", datapath).args(args).beside(&d1));
    // The first exits 0, after saying to whom it handed over.
    assert!(d1.wait_exit(WAIT).success(), "{}", d1.log_text());
    let handed = d1.wait_log("event=handed_over", WAIT);
    assert_eq!(log_field(&handed, "peer_pid"), d2.pid().to_string());
    let resumed = d2.wait_log("event=resumed", Duration::ZERO);
    assert!(
        log_has(&resumed, "from=handover") && log_has(&resumed, &format!("peer_pid={d1_pid}")),
        "{resumed}"
    );
    assert_eq!(log_field(&resumed, "agents"), "4", "{resumed}");
    assert_eq!(d2.prom, d1.prom, "the metrics listener is handed over");
    // The live agents keep being counted on the same socket object, without reconnecting.
    for a in &live {
        let b0 = d2.metric(&beats_sample(a.pid()));
        assert!(b0 > 0.0, "beats_total carried over for {}", a.pid());
        d2.wait_metric(&beats_sample(a.pid()), b0 + 10.0, WAIT);
    }
    // The wedged one is surfaced once, by whichever observer's deadline came (the second).
    d2.wait_log_all(&["event=stall", &format!("pid={}", wedged.pid())], WAIT);
    d2.wait_one_threshold();
    assert_eq!(
        stalls_of(&d1, wedged.pid()) + stalls_of(&d2, wedged.pid()),
        1,
        "{}\n---\n{}",
        d1.log_text(),
        d2.log_text()
    );
    for a in &live {
        assert_eq!(stalls_of(&d1, a.pid()) + stalls_of(&d2, a.pid()), 0);
        assert_eq!(
            d2.count_logs(&["event=agent_new", &format!("pid={}", a.pid())]),
            0,
            "agent {} was taken over, not new",
            a.pid()
        );
    }
    assert_eq!(
        d2.metric("varta_frames_dropped_total{reason=\"replay\"}"),
        0.0
    );
    let (scrapes, decreases, failed) = scraper.finish();
    assert!(scrapes > 10, "{scrapes} scrapes");
    assert!(decreases.is_empty(), "counters went down: {decreases:?}");
    assert_eq!(failed, 0, "every scrape across the takeover is answered");
}

#[test]
fn takeover_on_the_userspace_datapath() {
    takeover_keeps_agents_counters_and_the_wedged_stall("userspace");
}

#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn takeover_on_the_ebpf_datapath_needs_root() {
    varta_e2e::require_root!(varta_e2e::EBPF);
    takeover_keeps_agents_counters_and_the_wedged_stall("ebpf");
}

/// A newer build (one that speaks handover versions 1 and 2) takes over from this one, at
/// the version both speak.
#[test]
fn a_newer_build_takes_over() {
    let mut d1 = Daemon::builder("takeover-newer", "userspace")
        .args(["--threshold-ms", "1500"])
        .start();
    let a = upstream_agent(&d1.socket, 100);
    wait_new(&d1, a.pid());
    let d2 = Daemon::builder("takeover-newer", "userspace")
        .args(["--threshold-ms", "1500"])
        .env("VARTA_TAKEOVER_VERSIONS", "1-2")
        .beside(&d1)
        .start();
    assert!(d1.wait_exit(WAIT).success(), "{}", d1.log_text());
    let resumed = d2.wait_log("event=resumed", Duration::ZERO);
    assert!(
        log_has(&resumed, "from=handover") && log_has(&resumed, "version=1"),
        "{resumed}"
    );
    let b0 = d2.metric(&beats_sample(a.pid()));
    d2.wait_metric(&beats_sample(a.pid()), b0 + 5.0, WAIT);
}

/// A build that speaks no version the running one does is refused: the running one says so
/// in one line and carries on; the newcomer exits 1, saying why and what to do.
#[test]
fn an_incompatible_build_is_refused_and_exits() {
    let d1 = Daemon::builder("takeover-incompatible", "userspace")
        .args(["--threshold-ms", "1500"])
        .start();
    let a = upstream_agent(&d1.socket, 100);
    wait_new(&d1, a.pid());
    let mut d2 = Daemon::builder("takeover-incompatible", "userspace")
        .args(["--threshold-ms", "1500"])
        .env("VARTA_TAKEOVER_VERSIONS", "2-2")
        .beside(&d1)
        .spawn();
    assert_eq!(d2.wait_exit(WAIT).code(), Some(1), "{}", d2.log_text());
    let fatal = d2.wait_log("event=fatal", WAIT);
    assert!(fatal.contains("refused the takeover"), "{fatal}");
    let refused = d1.wait_log("event=takeover_refused", WAIT);
    assert!(refused.contains("versions 2-2"), "{refused}");
    // The first one carries on, on its socket.
    let b0 = d1.metric(&beats_sample(a.pid()));
    d1.wait_metric(&beats_sample(a.pid()), b0 + 5.0, WAIT);
    assert!(d1.socket.exists());
}

/// `--no-takeover` refuses to start while another observer runs on the socket.
#[test]
fn no_takeover_refuses() {
    let d1 = Daemon::builder("takeover-refused", "userspace")
        .args(["--threshold-ms", "1500"])
        .start();
    let a = upstream_agent(&d1.socket, 100);
    wait_new(&d1, a.pid());
    let mut d2 = Daemon::builder("takeover-refused", "userspace")
        .args(["--threshold-ms", "1500"])
        .arg("--no-takeover")
        .beside(&d1)
        .spawn();
    assert_eq!(d2.wait_exit(WAIT).code(), Some(1), "{}", d2.log_text());
    let fatal = d2.wait_log("event=fatal", WAIT);
    assert!(fatal.contains("--no-takeover"), "{fatal}");
    assert_eq!(d1.count_logs(&["event=takeover_requested"]), 0);
    let b0 = d1.metric(&beats_sample(a.pid()));
    d1.wait_metric(&beats_sample(a.pid()), b0 + 5.0, WAIT);
}

/// The control socket is the owner's alone: mode 0600.
#[test]
fn the_control_socket_is_private() {
    let d1 = Daemon::builder("takeover-ctl", "userspace")
        .args(["--threshold-ms", "1500"])
        .start();
    let ctl = d1.dir.join("varta.sock.ctl");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&ctl).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
}
