//! Harness for the end-to-end tests: starts `varta-watch` as a real process on a socket of
//! its own, scrapes its metrics, reads its log lines, and drives agents.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

pub mod deploy;

use varta_common::{Frame, Status};

/// The daemon binary: `VARTA_WATCH_BIN`, else the workspace's debug build.
pub fn bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VARTA_WATCH_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug/varta-watch");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo xtask test`",
        bin.display()
    );
    bin
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether eBPF tests run here. Under CI=true they always run (and fail if eBPF cannot
/// load); elsewhere they are skipped, with the reason printed, when not root.
pub fn ebpf_enabled(test: &str) -> bool {
    if std::env::var("CI").is_ok_and(|v| v == "true") || is_root() {
        return true;
    }
    eprintln!("skipping {test}: eBPF tests need root (CAP_BPF + CAP_NET_ADMIN); CI runs them");
    false
}

/// Generates `<name>::userspace` and `<name>::ebpf_needs_root` tests calling
/// `<name>(datapath)`; the eBPF one skips (with a reason) only outside CI without root.
#[macro_export]
macro_rules! on_both_datapaths {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn userspace() {
                super::$name("userspace");
            }

            #[test]
            fn ebpf_needs_root() {
                if $crate::ebpf_enabled(concat!(stringify!($name), "::ebpf_needs_root")) {
                    super::$name("ebpf");
                }
            }
        }
    )*};
}

/// A unique scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("varta-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub struct Daemon {
    child: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub prom: Option<SocketAddr>,
    lines: Arc<Mutex<Vec<String>>>,
    client: UnixDatagram,
    /// Reaped through `wait_exit_status`: never signal that pid again.
    reaped: std::sync::atomic::AtomicBool,
}

pub struct DaemonBuilder {
    name: String,
    datapath: String,
    args: Vec<String>,
    metrics: bool,
    wrapper: Vec<String>,
    world_writable: bool,
    env: Vec<(String, String)>,
}

impl DaemonBuilder {
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
    pub fn start(self) -> Daemon {
        let d = self.spawn();
        let ready = d.wait_log("event=ready", Duration::from_secs(20));
        let Some(ready) = ready else {
            panic!("daemon did not become ready; log:\n{}", d.log_text());
        };
        let mut d = d;
        d.prom = ready
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("metrics="))
            .and_then(|a| a.parse().ok());
        d
    }

    /// Starts the daemon without waiting.
    pub fn spawn(self) -> Daemon {
        let dir = scratch(&self.name);
        let socket = dir.join("varta.sock");
        if self.world_writable {
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
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
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd.env("VARTA_LOG", "info").envs(self.env);
        let mut child = cmd.spawn().expect("starting varta-watch");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Daemon {
            child: Some(child),
            dir,
            socket,
            prom: None,
            lines,
            client: UnixDatagram::unbound().unwrap(),
            reaped: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Daemon {
    pub fn builder(name: &str, datapath: &str) -> DaemonBuilder {
        DaemonBuilder {
            name: format!("{name}-{datapath}"),
            datapath: datapath.into(),
            args: Vec::new(),
            metrics: true,
            wrapper: Vec::new(),
            world_writable: false,
            env: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn logs(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn log_text(&self) -> String {
        self.logs().join("\n")
    }

    /// The first log line containing every one of `parts`, waiting up to `timeout`.
    pub fn wait_log_all(&self, parts: &[&str], timeout: Duration) -> Option<String> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .logs()
                .into_iter()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return Some(l);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn wait_log(&self, part: &str, timeout: Duration) -> Option<String> {
        self.wait_log_all(&[part], timeout)
    }

    pub fn count_logs(&self, parts: &[&str]) -> usize {
        self.logs()
            .iter()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .count()
    }

    /// GET /metrics (optionally with a bearer token): (status code, body).
    pub fn get_metrics(&self, token: Option<&str>) -> (u16, String) {
        let addr = self.prom.expect("daemon started with metrics");
        let mut s = TcpStream::connect(addr).unwrap();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let code = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (code, body)
    }

    /// Every sample: `name{labels}` -> value.
    pub fn metrics(&self) -> HashMap<String, f64> {
        parse_metrics(&self.get_metrics(None).1)
    }

    /// One sample, 0 when absent.
    pub fn metric(&self, sample: &str) -> f64 {
        self.metrics().get(sample).copied().unwrap_or(0.0)
    }

    /// Waits until `sample` satisfies `ok`.
    pub fn wait_metric(&self, sample: &str, timeout: Duration, ok: impl Fn(f64) -> bool) -> f64 {
        let end = Instant::now() + timeout;
        loop {
            let v = self.metric(sample);
            if ok(v) || Instant::now() > end {
                return v;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends raw bytes from this (test) process.
    pub fn send(&self, bytes: &[u8]) {
        self.client.send_to(bytes, &self.socket).unwrap();
    }

    /// Starts `varta-watch agent` beating every `interval_ms`.
    pub fn agent(&self, interval_ms: u64) -> Child {
        Command::new(bin())
            .args([
                "agent",
                "--interval-ms",
                &interval_ms.to_string(),
                "--socket",
            ])
            .arg(&self.socket)
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child, which has not been reaped.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// SIGTERM, then wait: the exit status and how long the exit took.
    pub fn stop(mut self) -> (ExitStatus, Duration) {
        let t = Instant::now();
        self.signal(libc::SIGTERM);
        let st = self.child.take().unwrap().wait().unwrap();
        (st, t.elapsed())
    }

    /// Waits for the daemon to exit on its own, keeping its log readable.
    pub fn wait_exit_status(&self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        let pid = self.pid() as i32;
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our own child with a live status slot.
            let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if rc == pid {
                self.reaped
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                return Some(std::os::unix::process::ExitStatusExt::from_raw(status));
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the daemon to exit on its own.
    pub fn wait_exit(mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self
            .child
            .take()
            .filter(|_| !self.reaped.load(std::sync::atomic::Ordering::Relaxed))
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn parse_metrics(body: &str) -> HashMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

pub fn frame(pid: u32, nonce: u64) -> [u8; 32] {
    Frame {
        status: Status::Ok,
        pid,
        timestamp: 1,
        nonce,
        payload: 0,
    }
    .encode()
}

pub fn kill(child: &mut Child, sig: i32) {
    // SAFETY: kill(2) on our own, unreaped child.
    unsafe { libc::kill(child.id() as i32, sig) };
}

pub fn reap(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The conformance vectors (a copy lives in varta-common/data).
pub fn vectors() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../varta-common/data/vlp-v0.2-vectors.json"),
    )
    .unwrap()
}

/// `(expected decode error, wire bytes)` for every decode-error vector.
pub fn decode_error_vectors() -> Vec<(String, Vec<u8>)> {
    let text = vectors();
    let mut out = Vec::new();
    // A dependency-free scan of the JSON: each decode-error object names its error and wire.
    for chunk in text.split("\"kind\": \"decode_error\"").skip(1) {
        let field = |name: &str| {
            let at = chunk.find(&format!("\"{name}\": \""))? + name.len() + 5;
            Some(chunk[at..].split('"').next()?.to_owned())
        };
        let (err, wire) = (
            field("expected_decode_error").unwrap(),
            field("wire_hex").unwrap(),
        );
        let bytes = (0..wire.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&wire[i..i + 2], 16).unwrap())
            .collect();
        out.push((err, bytes));
    }
    out
}

/// snake_case of a decode error name (`BadMagic` -> `bad_magic`).
pub fn snake(name: &str) -> String {
    let mut s = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            s.push('_');
        }
        s.push(c.to_ascii_lowercase());
    }
    s
}
