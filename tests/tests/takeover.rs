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
                let body = match try_scrape(addr) {
                    Ok(body) => body,
                    Err(e) => {
                        eprintln!("scrape failed: {e}");
                        r.lock().unwrap().2 += 1;
                        continue;
                    }
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
    try_scrape(addr).ok()
}

fn try_scrape(addr: std::net::SocketAddr) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .map_err(|e| format!("read: {e}"))?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or(format!("no header end: {resp:?}"))?;
    if head.split_whitespace().nth(1) == Some("200") {
        Ok(body.to_owned())
    } else {
        Err(head.to_owned())
    }
}

/// The scenario, as a takeover: 3 live agents and one SIGSTOPped 300 ms before.
fn takeover_keeps_agents_counters_and_the_wedged_stall(datapath: &str) {
    let args = ["--threshold-ms", "1500"];
    let mut d1 = Daemon::builder("takeover", datapath)
        .args(args)
        .start_checked();
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
    let d2 = Daemon::builder("takeover", datapath)
        .args(args)
        .beside(&d1)
        .start_checked();
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
    // Every scrape is answered, by one observer or the other: the first stops accepting and
    // answers what it accepted; the successor accepts the rest from the same queue.
    assert!(
        failed == 0,
        "{failed} scrapes across the takeover went unanswered"
    );
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

/// The sockets a process holds (`/proc/<pid>/fd` links to `socket:[inode]`).
fn socket_fds(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.display().to_string())
        .filter(|l| l.starts_with("socket:"))
        .collect()
}

/// Context switches of a process's main thread (the one its event loop runs on).
fn wakeups(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/status"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("ctxt_switches:"))
        .map(|l| l.split_whitespace().last().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// Running (not exited, not a zombie waiting to be reaped).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, r)| !r.starts_with('Z'))
    })
}

/// `--after-handover hold`, as a DaemonSet rolled with maxSurge runs it: the observer that
/// handed over stays, holding no socket and never waking; it never takes over again, nor
/// does a restart of it while its marker exists; SIGTERM ends it at once with 0.
#[test]
fn a_held_observer_holds_nothing_never_takes_over_and_exits_0_on_sigterm() {
    // The markers live beside the pods (an emptyDir each): one directory per "pod".
    let pods = varta_e2e::scratch("hold-markers");
    let held = |name: &str| {
        Daemon::builder("takeover-hold", "userspace").args([
            "--threshold-ms".to_owned(),
            "1500".to_owned(),
            "--after-handover".to_owned(),
            "hold".to_owned(),
            "--hold-marker".to_owned(),
            pods.join(name).display().to_string(),
        ])
    };
    let mut old = held("old").start();
    let a = upstream_agent(&old.socket, 100);
    wait_new(&old, a.pid());
    let new = held("new").beside(&old).start();
    let line = old.wait_log("event=held", WAIT);
    assert_eq!(
        log_field(&line, "peer_pid"),
        new.pid().to_string(),
        "{line}"
    );
    // Same network namespace: the metrics listener went to the successor with the rest.
    assert_eq!(log_field(&line, "probes"), "-", "{line}");
    assert_eq!(new.prom, old.prom);
    assert_eq!(
        std::fs::read_to_string(pods.join("old")).unwrap(),
        format!("peer_pid={}\n", new.pid())
    );
    assert!(
        !pods.join("new").exists(),
        "only the one that handed over is marked"
    );
    let b0 = new.metric(&beats_sample(a.pid()));
    assert!(b0 > 0.0);
    new.wait_metric(&beats_sample(a.pid()), b0 + 5.0, WAIT);
    assert!(running(old.pid()), "{}", old.log_text());
    assert_eq!(
        socket_fds(old.pid()),
        Vec::<String>::new(),
        "{}",
        old.log_text()
    );
    let w0 = wakeups(old.pid());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(wakeups(old.pid()), w0, "the held process woke up");

    // The old pod's container restarted (its marker stays): it holds at once, asks nothing.
    let mut restarted = held("old").beside(&old).spawn();
    let line = restarted.wait_log("event=held", WAIT);
    assert!(line.contains("--hold-marker exists"), "{line}");
    assert_eq!(socket_fds(restarted.pid()), Vec::<String>::new());
    assert_eq!(
        new.count_logs(&["event=takeover_requested"]),
        0,
        "{}",
        new.log_text()
    );
    assert_eq!(restarted.count_logs(&["event=ready"]), 0);

    // Deleted as the controller deletes the old pod: SIGTERM, exit 0 at once.
    for d in [&mut old, &mut restarted] {
        let asked = std::time::Instant::now();
        d.signal(libc::SIGTERM);
        assert!(d.wait_exit(WAIT).success(), "{}", d.log_text());
        let took = asked.elapsed();
        assert!(took < Duration::from_secs(1), "took {took:?} to exit");
        // Its last line may still be on its way from the pipe.
        d.wait_log_all(&["event=shutdown", "held=true"], WAIT);
    }
    // The new one counts on, on the same socket, and nobody took it over.
    let b1 = new.metric(&beats_sample(a.pid()));
    new.wait_metric(&beats_sample(a.pid()), b1 + 5.0, WAIT);
    assert_eq!(new.count_logs(&["event=takeover_requested"]), 0);
    assert_eq!(new.count_logs(&["event=agent_new"]), 0);
    assert_eq!(stalls_of(&new, a.pid()), 0);
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

/// Stop, then start, on the userspace datapath under socket activation: the service manager
/// (`systemd-socket-activate`, as systemd with `varta-watch.socket`) holds the socket between
/// the two runs, so connected agents keep being counted without reconnecting; the state file
/// carries the rest. The wrapper shell plays the manager's restart: each run is exec'd with
/// `LISTEN_PID` set to its own pid.
#[test]
#[ignore = "needs systemd-socket-activate: run by `cargo xtask test`, which installs it"]
fn userspace_restart_under_socket_activation_keeps_agents() {
    use std::io::BufRead;
    varta_e2e::deploy::require_tool(
        varta_e2e::this_test!(),
        "systemd-socket-activate",
        &["--version"],
    );
    let dir = varta_e2e::scratch("socket-activation");
    let socket = dir.join("varta.sock");
    let run = format!(
        "LISTEN_PID=$$ exec {} --socket {} --datapath userspace --threshold-ms 1500 --prom-addr 127.0.0.1:0",
        varta_e2e::bin().display(),
        socket.display()
    );
    let mut manager = Proc::spawn(
        Command::new("systemd-socket-activate")
            .arg("-d")
            .arg("-l")
            .arg(&socket)
            .arg("--fdname=varta")
            .args(["--", "sh", "-c", &format!("sh -c '{run}'; sh -c '{run}'")])
            .env("VARTA_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped()),
    );
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    let stderr = manager.take_stderr().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            sink.lock().unwrap().push(line);
        }
    });
    let matching = |parts: &[&str]| -> Vec<String> {
        lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| parts.iter().all(|p| log_has(l, p)))
            .cloned()
            .collect()
    };
    let wait_lines = |parts: &[&str], n: usize| -> Vec<String> {
        varta_e2e::wait_for(&format!("{n} line(s) with {parts:?}"), WAIT, || {
            let found = matching(parts);
            if found.len() >= n {
                Ok(found)
            } else {
                Err(lines.lock().unwrap().join("\n"))
            }
        })
    };
    let metric = |addr: std::net::SocketAddr, sample: &str| {
        scrape(addr)
            .and_then(|body| varta_e2e::parse_metrics(&body).get(sample).copied())
            .unwrap_or(0.0)
    };
    let wait_metric = |addr, sample: &str, at_least: f64| {
        varta_e2e::wait_for(&format!("{sample} >= {at_least}"), WAIT, || {
            let v = metric(addr, sample);
            if v >= at_least {
                Ok(v)
            } else {
                Err(v.to_string())
            }
        })
    };
    // The manager starts the daemon at the first datagram: the agents' first beats.
    wait_lines(&["Listening on"], 1);
    let live: Vec<Proc> = (0..3).map(|_| upstream_agent(&socket, 100)).collect();
    let wedged = upstream_agent(&socket, 100);
    let first = wait_lines(&["event=ready"], 1).remove(0);
    let pid1: i32 = log_field(&first, "pid").parse().unwrap();
    let prom1 = log_field(&first, "metrics").parse().unwrap();
    for a in live.iter().chain([&wedged]) {
        wait_lines(&["event=agent_new", &format!("pid={}", a.pid())], 1);
        wait_metric(prom1, &beats_sample(a.pid()), 3.0);
    }
    wedged.signal(libc::SIGSTOP);
    // Wedged 300 ms before the restart (setup, not an assertion).
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) on the first run's pid, which the manager's shell waits for.
    assert_eq!(unsafe { libc::kill(pid1, libc::SIGTERM) }, 0);
    let second = wait_lines(&["event=ready"], 2).remove(1);
    let prom2 = log_field(&second, "metrics").parse().unwrap();
    assert_eq!(
        matching(&["event=socket_activation", "sockets=uds:varta"]).len(),
        2
    );
    let resumed = wait_lines(&["event=resumed"], 1).remove(0);
    assert!(log_has(&resumed, "from=state_file"), "{resumed}");
    assert_eq!(log_field(&resumed, "agents"), "4", "{resumed}");
    for a in &live {
        let b0 = metric(prom2, &beats_sample(a.pid()));
        assert!(b0 > 0.0, "beats_total carried over for {}", a.pid());
        wait_metric(prom2, &beats_sample(a.pid()), b0 + 10.0);
        // Tracked since the first run: no second agent_new.
        assert_eq!(
            matching(&["event=agent_new", &format!("pid={}", a.pid())]).len(),
            1
        );
    }
    wait_lines(&["event=stall", &format!("pid={}", wedged.pid())], 1);
    // One more threshold: an agent that beats once stalls after it.
    let sentinel = Proc::spawn(
        Command::new(varta_e2e::bin())
            .args(["agent", "--interval-ms", "3600000", "--socket"])
            .arg(&socket)
            .stderr(std::process::Stdio::null()),
    );
    wait_lines(&["event=stall", &format!("pid={}", sentinel.pid())], 1);
    assert_eq!(
        matching(&["event=stall", &format!("pid={}", wedged.pid())]).len(),
        1
    );
    for a in &live {
        assert!(matching(&["event=stall", &format!("pid={}", a.pid())]).is_empty());
    }
    let pid2: i32 = log_field(&second, "pid").parse().unwrap();
    // SAFETY: kill(2) on the second run's pid.
    unsafe { libc::kill(pid2, libc::SIGTERM) };
    manager.wait();
}
