//! An observer under test as a process: started with the flags a scenario needs, its
//! /metrics scraped, its CPU, context switches and RSS read from /proc, stopped with
//! SIGTERM and timed.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// One of the observers compared.
#[derive(Clone, Debug)]
pub struct Observer {
    pub name: &'static str,
    pub bin: PathBuf,
    pub args: Vec<String>,
    pub incumbent: bool,
}

impl Observer {
    pub fn ours(bin: &Path, datapath: &'static str) -> Observer {
        Observer {
            name: if datapath == "ebpf" {
                crate::report::OURS_EBPF
            } else {
                crate::report::OURS_USERSPACE
            },
            bin: bin.to_owned(),
            args: vec!["--datapath".into(), datapath.into()],
            incumbent: false,
        }
    }

    pub fn incumbent(bin: &Path) -> Observer {
        Observer {
            name: "incumbent-0.2.0",
            bin: bin.to_owned(),
            // Its /metrics allows 5 scrapes/s per source by default; the bench polls.
            args: [
                "--prom-rate-limit-per-sec",
                "1000000",
                "--prom-rate-limit-burst",
                "1000000",
            ]
            .map(String::from)
            .to_vec(),
            incumbent: true,
        }
    }

    /// Starts it on a fresh socket in `dir` with `extra` flags; waits for /metrics.
    pub fn start(&self, dir: &Path, threshold_ms: u64, extra: &[String]) -> Running {
        let socket = dir.join(format!("{}.sock", self.name));
        let _ = std::fs::remove_file(&socket);
        let mut run = self.spawn(dir, socket, free_port(), threshold_ms, extra);
        let end = Instant::now() + Duration::from_secs(30);
        while !(run.socket.exists() && run.try_metrics().is_some()) {
            if let Some(st) = run.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{} {:?} exited at start: {st}", self.name, self.args);
            }
            assert!(Instant::now() < end, "{} did not start", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
        run
    }

    /// Starts a second instance with the same socket and metrics address while `old` runs
    /// (a restart by takeover, as an operator runs it: the same command line again); returns
    /// once `old` has exited, having handed over, and the new one answers /metrics.
    pub fn start_beside(
        &self,
        old: &mut Running,
        dir: &Path,
        threshold_ms: u64,
        extra: &[String],
    ) -> Running {
        let mut run = self.spawn(dir, old.socket.clone(), old.prom, threshold_ms, extra);
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = run.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{} {:?} exited at a takeover: {st}", self.name, self.args);
            }
            let old_gone = old.child.as_mut().unwrap().try_wait().unwrap().is_some();
            if old_gone && run.try_metrics().is_some() {
                return run;
            }
            assert!(Instant::now() < end, "{} did not take over", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn(
        &self,
        dir: &Path,
        socket: PathBuf,
        prom: SocketAddr,
        threshold_ms: u64,
        extra: &[String],
    ) -> Running {
        let token_file = dir.join("token");
        let token = "0123456789abcdef".repeat(4);
        if !token_file.exists() {
            std::fs::write(&token_file, &token).unwrap();
            std::fs::set_permissions(
                &token_file,
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .unwrap();
        }
        let child = Command::new(&self.bin)
            .arg("--socket")
            .arg(&socket)
            .args(["--threshold-ms", &threshold_ms.to_string()])
            .args(["--prom-addr", &prom.to_string()])
            .arg("--prom-token-file")
            .arg(&token_file)
            .args(&self.args)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        Running {
            child: Some(child),
            socket,
            prom,
            token,
            name: self.name,
        }
    }
}

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

pub struct Running {
    child: Option<Child>,
    pub socket: PathBuf,
    pub prom: SocketAddr,
    token: String,
    pub name: &'static str,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Every sample of one scrape, `name{labels}` -> value.
    pub fn try_metrics(&self) -> Option<HashMap<String, f64>> {
        let mut s = TcpStream::connect_timeout(&self.prom, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET /metrics HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
            self.token
        )
        .ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        let (head, body) = resp.split_once("\r\n\r\n")?;
        if head.split_whitespace().nth(1) != Some("200") {
            return None;
        }
        Some(varta_e2e::parse_metrics(body))
    }

    /// One scrape; a few attempts, since the sweep also scrapes while the agents beat and the
    /// incumbent's single loop may then leave one unanswered. `Err` says which observer
    /// stopped answering: the caller records it and moves on.
    pub fn scrape(&self) -> Result<HashMap<String, f64>, String> {
        for _ in 0..10 {
            if let Some(m) = self.try_metrics() {
                return Ok(m);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("{}: /metrics did not answer 10 scrapes", self.name))
    }

    /// [`Self::scrape`] where a silent observer ends the scenario (caught per scenario by
    /// the bench's main loop and reported there).
    #[track_caller]
    pub fn metrics(&self) -> HashMap<String, f64> {
        self.scrape().unwrap_or_else(|e| panic!("{e}"))
    }

    /// The sum of every sample of a family (`varta_beats_total` over all pids).
    pub fn family_sum(&self, family: &str) -> Result<f64, String> {
        let prefix = format!("{family}{{");
        Ok(self
            .scrape()?
            .iter()
            .filter(|(k, _)| *k == family || k.starts_with(&prefix))
            .map(|(_, v)| v)
            .sum())
    }

    /// (CPU seconds, context switches of all its threads).
    pub fn cost(&self) -> (f64, u64) {
        proc_cost(self.pid())
    }

    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap();
        kib * 1024
    }

    /// SIGTERM, then the time until it exited.
    pub fn stop(mut self) -> Duration {
        let mut child = self.child.take().unwrap();
        let t = Instant::now();
        // SAFETY: kill(2) on our unreaped child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let end = t + Duration::from_secs(10);
        loop {
            if child.try_wait().unwrap().is_some() {
                return t.elapsed();
            }
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                return t.elapsed();
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// CPU seconds on the CPU (schedstat: nanoseconds, where utime+stime count 10 ms ticks)
/// and voluntary+involuntary context switches, summed over every thread.
pub fn proc_cost(pid: u32) -> (f64, u64) {
    let mut run_ns = 0u64;
    let mut switches = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let sched = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        run_ns += sched
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        for l in status.lines() {
            if l.starts_with("voluntary_ctxt_switches")
                || l.starts_with("nonvoluntary_ctxt_switches")
            {
                switches += l.split_whitespace().last().unwrap().parse::<u64>().unwrap();
            }
        }
    }
    (run_ns as f64 / 1e9, switches)
}

fn hz() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// Busy CPU seconds of the whole machine, all CPUs: their time since boot less their idle
/// time (the in-kernel filter runs in the senders' context, so the observer's own CPU alone
/// would flatter the eBPF datapath). /proc/stat's idle and iowait are measured at each
/// entry to and exit from idle on a tickless kernel, but its busy fields are sampled at the
/// tick, which misses work done in bursts between idle periods: a pacing sender's. Summed,
/// those fields said 1.8 us a frame for the floor at 160k beats/s while the senders'
/// threads alone were on a CPU 2.5 us a frame (their schedstat); this says 2.9-3.2 (all
/// else that ran meanwhile included).
pub fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let mut lines = stat.lines();
    let cpu: Vec<u64> = lines
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let idle = (cpu[3] + cpu[4]) as f64 / hz();
    let cpus = lines
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count();
    cpus as f64 * since_boot() - idle
}

/// Seconds on the clock /proc/stat's idle time is counted against (it stops in suspend).
fn since_boot() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the local it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    assert_eq!(rc, 0, "clock_gettime: {}", std::io::Error::last_os_error());
    now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
}
