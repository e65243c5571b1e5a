//! `varta-watch` as a real process: start it, read its log, scrape its metrics, wait for
//! either, and stop it. Dropping a `Daemon` kills and reaps it (a `Proc`) and removes its
//! directory (a `Scratch`).

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    net::SocketAddr,
    os::unix::net::UnixDatagram,
    path::PathBuf,
    process::{Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{Proc, bin, forced_attest, log_field, log_has, parse_metrics, scratch, wait_for};

pub struct Daemon {
    process: Proc,
    pub dir: crate::Scratch,
    pub socket: PathBuf,
    /// `--export-file`, when started with [`DaemonBuilder::export_file`].
    pub export: Option<PathBuf>,
    pub prom: Option<SocketAddr>,
    lines: Arc<Mutex<Vec<String>>>,
    client: UnixDatagram,
    /// Set by [`Daemon::into_dir`]: the next daemon on this socket resumes the pins.
    keep_pins: bool,
}

/// A daemon's pinned maps (`pins=` of its start-up line) are removed with it, unless a
/// restart takes them over.
impl Drop for Daemon {
    fn drop(&mut self) {
        // An observer that handed over left its pins to its successor.
        if self.keep_pins || self.count_logs(&["event=handed_over"]) > 0 {
            return;
        }
        for line in self.logs() {
            if (log_has(&line, "event=resumed") || log_has(&line, "event=fresh"))
                && let Some(dir) = std::path::Path::new(&log_field(&line, "pins")).parent()
                && dir.starts_with("/sys/fs/bpf")
            {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

pub struct DaemonBuilder {
    name: String,
    datapath: String,
    args: Vec<String>,
    metrics: bool,
    export: bool,
    wrapper: Vec<String>,
    world_writable: bool,
    env: Vec<(String, String)>,
    /// The directory (and socket) of a previous daemon: a restart.
    reuse: Option<crate::Scratch>,
    /// The directory (and socket) of a daemon still running, which the previous one owns:
    /// a takeover.
    beside: Option<PathBuf>,
}

impl DaemonBuilder {
    /// Starts in the directory, on the socket, of a previous daemon ([`Daemon::into_dir`]):
    /// a restart of that observer.
    pub fn in_dir(mut self, dir: crate::Scratch) -> Self {
        self.reuse = Some(dir);
        self
    }

    /// Starts on the socket of `running` while it runs (its directory stays `running`'s):
    /// a takeover.
    pub fn beside(mut self, running: &Daemon) -> Self {
        self.beside = Some(running.dir.to_path_buf());
        self
    }

    /// Sets an environment variable for the daemon.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, a: I) -> Self {
        self.args.extend(a.into_iter().map(Into::into));
        self
    }

    pub fn no_metrics(mut self) -> Self {
        self.metrics = false;
        self
    }

    /// Writes events to `events.tsv` in the daemon's directory (`Daemon::export`).
    pub fn export_file(mut self) -> Self {
        self.export = true;
        self
    }

    /// The socket directory is writable by anyone (for a daemon run as another user).
    pub fn world_writable(mut self) -> Self {
        self.world_writable = true;
        self
    }

    /// Runs the daemon under a wrapper command (e.g. setpriv).
    pub fn wrapped<I: IntoIterator<Item = S>, S: Into<String>>(mut self, w: I) -> Self {
        self.wrapper = w.into_iter().map(Into::into).collect();
        self
    }

    /// Starts the daemon and waits for its `event=ready` line.
    #[track_caller]
    pub fn start(self) -> Daemon {
        let ebpf = self.datapath != "userspace";
        let mut d = self.spawn();
        let ready = d.wait_log("event=ready", Duration::from_secs(20));
        if let Some(method) = forced_attest()
            && ebpf
        {
            assert!(
                log_has(&ready, "datapath=ebpf") && log_has(&ready, &format!("attest={method}")),
                "not on the eBPF datapath with {method} attestation: {ready}\n{}",
                d.log_text()
            );
        }
        d.prom = log_field(&ready, "metrics").parse().ok();
        d
    }

    /// Starts the daemon on the datapath it was built for, and for eBPF checks that is the
    /// one it runs ([`Self::start_ebpf`]): no fallback to userspace passes unseen.
    #[track_caller]
    pub fn start_checked(self) -> Daemon {
        if self.datapath == "ebpf" {
            self.start_ebpf()
        } else {
            self.start()
        }
    }

    /// Starts the daemon on the eBPF datapath and checks that is the one it runs.
    #[track_caller]
    pub fn start_ebpf(self) -> Daemon {
        assert_eq!(self.datapath, "ebpf");
        let d = self.start();
        let info = d.datapath_info();
        assert!(info.contains("{mode=\"ebpf\","), "{info}\n{}", d.log_text());
        assert_eq!(d.metric(&info), 1.0, "{}", d.log_text());
        d
    }

    /// Starts the daemon without waiting.
    pub fn spawn(self) -> Daemon {
        let (dir, socket) = match self.beside {
            Some(path) => (crate::Scratch::none(), path.join("varta.sock")),
            None => {
                let dir = self.reuse.unwrap_or_else(|| scratch(&self.name));
                let socket = dir.join("varta.sock");
                (dir, socket)
            }
        };
        let export = self
            .export
            .then(|| socket.parent().unwrap().join("events.tsv"));
        if self.world_writable {
            std::fs::set_permissions(&*dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
                .unwrap();
        }
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        cmd.arg("--socket")
            .arg(&socket)
            .args(["--datapath", &self.datapath]);
        if self.metrics {
            cmd.args(["--prom-addr", "127.0.0.1:0"]);
        }
        if let Some(export) = &export {
            cmd.arg("--export-file").arg(export);
        }
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd.env("VARTA_LOG", "info").envs(self.env);
        if let Some(method) = forced_attest() {
            cmd.env("VARTA_EBPF_ATTEST", method);
        }
        let mut process = Proc::spawn(&mut cmd);
        let stderr = process.take_stderr().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Daemon {
            process,
            dir,
            socket,
            export,
            prom: None,
            lines,
            client: UnixDatagram::unbound().unwrap(),
            keep_pins: false,
        }
    }
}

/// How long a daemon may take to exit once asked (a hang guard, not a figure).
const EXIT_GUARD: Duration = Duration::from_secs(10);

impl Daemon {
    pub fn builder(name: &str, datapath: &str) -> DaemonBuilder {
        DaemonBuilder {
            name: format!("{name}-{datapath}"),
            datapath: datapath.into(),
            args: Vec::new(),
            metrics: true,
            export: false,
            wrapper: Vec::new(),
            world_writable: false,
            env: Vec::new(),
            reuse: None,
            beside: None,
        }
    }

    /// Ends this daemon (SIGKILL if it still runs) and hands its directory, socket, state
    /// file and pinned maps to the next one (`DaemonBuilder::in_dir`).
    pub fn into_dir(mut self) -> crate::Scratch {
        self.keep_pins = true;
        if !self.process.reaped() && self.process.try_wait().is_none() {
            self.signal(libc::SIGKILL);
            let _ = self.wait_exit(EXIT_GUARD);
        }
        std::mem::replace(&mut self.dir, crate::Scratch::none())
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn logs(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn log_text(&self) -> String {
        self.logs().join("\n")
    }

    /// Every log line having each of `parts` (see [`log_has`]).
    pub fn matching_logs(&self, parts: &[&str]) -> Vec<String> {
        self.logs()
            .into_iter()
            .filter(|l| parts.iter().all(|p| log_has(l, p)))
            .collect()
    }

    pub fn count_logs(&self, parts: &[&str]) -> usize {
        self.matching_logs(parts).len()
    }

    /// Waits until at least `n` log lines have each of `parts`; returns them all.
    #[track_caller]
    pub fn wait_logs(&self, parts: &[&str], n: usize, timeout: Duration) -> Vec<String> {
        wait_for(&format!("{n} log line(s) with {parts:?}"), timeout, || {
            let found = self.matching_logs(parts);
            if found.len() >= n {
                Ok(found)
            } else {
                Err(format!(
                    "{} such line(s); log:\n{}",
                    found.len(),
                    self.log_text()
                ))
            }
        })
    }

    /// The first log line having each of `parts`, waiting up to `timeout`.
    #[track_caller]
    pub fn wait_log_all(&self, parts: &[&str], timeout: Duration) -> String {
        self.wait_logs(parts, 1, timeout).swap_remove(0)
    }

    #[track_caller]
    pub fn wait_log(&self, part: &str, timeout: Duration) -> String {
        self.wait_log_all(&[part], timeout)
    }

    /// The `varta_datapath_info` sample this daemon exports, from its `event=ready` line.
    pub fn datapath_info(&self) -> String {
        let ready = self.wait_log("event=ready", Duration::ZERO);
        format!(
            "varta_datapath_info{{mode=\"{}\",attest=\"{}\"}}",
            log_field(&ready, "datapath"),
            log_field(&ready, "attest")
        )
    }

    /// GET /metrics (optionally with a bearer token): (status code, body).
    pub fn get_metrics(&self, token: Option<&str>) -> (u16, String) {
        let addr = self.prom.expect("daemon started with metrics");
        crate::deploy::http_get_with_token(addr, "/metrics", token)
    }

    /// Every sample: `name{labels}` -> value.
    pub fn metrics(&self) -> HashMap<String, f64> {
        parse_metrics(&self.get_metrics(None).1)
    }

    /// One sample, 0 when absent.
    pub fn metric(&self, sample: &str) -> f64 {
        self.metrics().get(sample).copied().unwrap_or(0.0)
    }

    /// Waits until `sample` is at least `at_least`; returns its value then.
    #[track_caller]
    pub fn wait_metric(&self, sample: &str, at_least: f64, timeout: Duration) -> f64 {
        wait_for(&format!("{sample} >= {at_least}"), timeout, || {
            let v = self.metric(sample);
            if v >= at_least {
                Ok(v)
            } else {
                Err(v.to_string())
            }
        })
    }

    /// Waits until `check` accepts a scrape (its `Err` says what it saw).
    #[track_caller]
    pub fn wait_metrics<T>(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&HashMap<String, f64>) -> Result<T, String>,
    ) -> T {
        wait_for(what, timeout, || check(&self.metrics()))
    }

    /// Sends raw bytes from this (test) process.
    pub fn send(&self, bytes: &[u8]) {
        self.client.send_to(bytes, &self.socket).unwrap();
    }

    /// Starts `varta-watch agent` beating every `interval_ms`.
    pub fn agent(&self, interval_ms: u64) -> Proc {
        Proc::spawn(
            Command::new(bin())
                .args(["agent", "--interval-ms", &interval_ms.to_string()])
                .arg("--socket")
                .arg(&self.socket)
                .stderr(Stdio::null()),
        )
    }

    /// Starts an agent beating every `interval_ms`, waits until it is tracked, kills it and
    /// waits for its stall: the pid of an agent that stalled.
    #[track_caller]
    pub fn stalled_agent(&self, interval_ms: u64) -> u32 {
        let agent = self.agent(interval_ms);
        let pid = agent.pid();
        self.wait_log_all(
            &["event=agent_new", &format!("pid={pid}")],
            Duration::from_secs(10),
        );
        drop(agent);
        self.wait_log_all(
            &["event=stall", &format!("pid={pid}")],
            Duration::from_secs(10),
        );
        pid
    }

    /// Starts an agent that beats once (and lives on), and waits for its stall: afterwards
    /// a whole threshold has passed in the daemon since the call, and every stall due
    /// before has been surfaced. The event that a quiet period is over.
    #[track_caller]
    pub fn wait_one_threshold(&self) {
        let sentinel = self.agent(3_600_000);
        let pid = format!("pid={}", sentinel.pid());
        self.wait_log_all(&["event=stall", &pid], Duration::from_secs(30));
    }

    pub fn signal(&self, sig: i32) {
        self.process.signal(sig);
    }

    /// SIGTERM, then waits for the exit. The log, and the directory with the export file,
    /// stay readable until the `Daemon` drops.
    #[track_caller]
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(EXIT_GUARD)
    }

    /// Waits for the daemon to exit (on its own, or as asked), and reaps it.
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        wait_for("the daemon to exit", timeout, || {
            self.process
                .try_wait()
                .ok_or_else(|| "still running".to_owned())
        })
    }

    /// The export file's content (the daemon was started with `export_file`); empty for
    /// the instant a rotation has renamed it and not yet created the next one.
    pub fn export_text(&self) -> String {
        let path = self.export.as_ref().expect("started with export_file()");
        match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => panic!("{}: {e}", path.display()),
        }
    }
}
