//! `cargo xtask run --demo`: the observer, a handful of agents, and within seconds one of
//! each thing it is for: an agent wedged (SIGSTOP) and one killed, both surfaced as stalls,
//! one dying with a panic-terminal frame (an exit), and the recovery command run for each.
//! In a terminal with tmux, `varta-watch top` watches in a split; else the log lines tell
//! it. Ctrl-C (or SIGTERM) stops everything it started.

use std::{
    io::{BufRead, BufReader, IsTerminal},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Short, so the whole story fits in a few seconds.
const THRESHOLD_MS: &str = "1000";
const AGENT_INTERVAL_MS: &str = "250";
/// Healthy agents, plus the wedged, the killed and the dying one.
const HEALTHY: usize = 2;
/// Beats the dying agent sends before its panic-terminal frame.
const BEATS_BEFORE_PANIC: &str = "12";
/// A harmless recovery command: the daemon logs that it ran and how it ended.
const RECOVERY: &str = "/bin/echo recovered {pid}";

enum Msg {
    Line(String),
    DaemonGone,
    Stop,
}

pub fn run(bin: &Path, args: &[String]) -> Result<()> {
    let interactive = std::io::stdout().is_terminal();
    if interactive && std::env::var_os("TMUX").is_none() && has_tmux() {
        return in_tmux(bin, args);
    }
    let (tx, rx) = mpsc::channel();
    let stop = tx.clone();
    ctrlc::set_handler(move || {
        let _ = stop.send(Msg::Stop);
    })
    .context("installing the Ctrl-C handler")?;

    let dir = std::env::temp_dir().join(format!("varta-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut demo = Demo {
        children: Vec::new(),
        pane: None,
        dir,
    };
    let result = demo.play(bin, args, interactive, tx, &rx);
    demo.stop();
    result
}

/// Runs this same demo inside a new tmux session, where it splits off `top`.
fn in_tmux(bin: &Path, args: &[String]) -> Result<()> {
    let me = std::env::current_exe().context("locating xtask")?;
    let mut inner = format!("{} run --demo --bin {}", quote(&me), quote(bin));
    if !args.is_empty() {
        inner.push_str(" --");
        for a in args {
            inner.push(' ');
            inner.push_str(&quote(Path::new(a)));
        }
    }
    eprintln!("xtask: demo: in a tmux session (Ctrl-C ends it)");
    crate::status(Command::new("tmux").args(["new-session", &inner]))
}

fn quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

fn has_tmux() -> bool {
    Command::new("tmux")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

struct Demo {
    /// The daemon first, then the agents.
    children: Vec<Child>,
    /// The tmux pane running `top`.
    pane: Option<String>,
    dir: PathBuf,
}

impl Demo {
    fn play(
        &mut self,
        bin: &Path,
        args: &[String],
        interactive: bool,
        tx: mpsc::Sender<Msg>,
        rx: &mpsc::Receiver<Msg>,
    ) -> Result<()> {
        let socket = self.dir.join("varta.sock");
        let mut daemon = Command::new(bin);
        daemon
            .arg("--socket")
            .arg(&socket)
            .args([
                "--threshold-ms",
                THRESHOLD_MS,
                "--prom-addr",
                "127.0.0.1:9100",
            ])
            .args(["--recovery-exec", RECOVERY])
            .args(args)
            .env("VARTA_LOG", "info")
            .stderr(Stdio::piped());
        eprintln!(
            "xtask: demo: {} --socket {} --threshold-ms {THRESHOLD_MS} --prom-addr 127.0.0.1:9100 --recovery-exec \"{RECOVERY}\" {}",
            bin.display(),
            socket.display(),
            args.join(" ")
        );
        let mut child = spawn(&mut daemon)?;
        let stderr = child.stderr.take().expect("piped");
        eprintln!("xtask: demo: observer pid {}", child.id());
        self.children.push(child);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                if tx.send(Msg::Line(line)).is_err() {
                    return;
                }
            }
            let _ = tx.send(Msg::DaemonGone);
        });

        let Some(ready) = wait_line(rx, Duration::from_secs(30), |l| l.contains("event=ready"))?
        else {
            return Ok(());
        };
        let metrics = field(&ready, "metrics");
        if interactive && std::env::var_os("TMUX").is_some() && metrics != "-" {
            self.split_top(bin, metrics)?;
        }

        let agent = |extra: &[&str]| {
            let mut cmd = Command::new(bin);
            cmd.args(["agent", "--interval-ms", AGENT_INTERVAL_MS])
                .arg("--socket")
                .arg(&socket)
                .args(extra);
            spawn(&mut cmd)
        };
        let mut pids = Vec::new();
        for _ in 0..HEALTHY + 2 {
            let c = agent(&[])?;
            pids.push(c.id());
            self.children.push(c);
        }
        let dying = agent(&["--panic-after", BEATS_BEFORE_PANIC])?;
        pids.push(dying.id());
        self.children.push(dying);
        let list: Vec<String> = pids.iter().map(u32::to_string).collect();
        eprintln!("xtask: demo: agents {}", list.join(" "));
        let mut unseen: Vec<String> = pids.iter().map(|p| format!("pid={p}")).collect();
        while !unseen.is_empty() {
            let new = wait_line(rx, Duration::from_secs(10), |l| {
                l.contains("event=agent_new") && unseen.iter().any(|p| field_is(l, p))
            })?;
            let Some(new) = new else {
                return Ok(());
            };
            unseen.retain(|p| !field_is(&new, p));
        }

        // A moment of health first, so the view shows what changes.
        std::thread::sleep(Duration::from_millis(1500));
        let (wedged, killed, dying) = (pids[HEALTHY], pids[HEALTHY + 1], pids[HEALTHY + 2]);
        eprintln!(
            "xtask: demo: wedging agent {wedged} (SIGSTOP): expect event=stall pid={wedged} in ~{THRESHOLD_MS} ms, then its recovery"
        );
        signal(wedged, libc::SIGSTOP);
        eprintln!(
            "xtask: demo: killing agent {killed} (SIGKILL): expect event=stall pid={killed}, then its recovery"
        );
        signal(killed, libc::SIGKILL);
        eprintln!(
            "xtask: demo: agent {dying} sends a panic-terminal frame after {BEATS_BEFORE_PANIC} beats: expect event=exit pid={dying}, then its recovery"
        );
        eprintln!("xtask: demo: running; Ctrl-C stops everything");
        loop {
            match rx.recv() {
                Ok(Msg::Line(_)) => {}
                Ok(Msg::Stop) | Err(_) => return Ok(()),
                Ok(Msg::DaemonGone) => bail!("the observer exited (its log is above)"),
            }
        }
    }

    fn split_top(&mut self, bin: &Path, metrics: &str) -> Result<()> {
        let top = format!("{} top --addr {metrics}", quote(bin));
        let out = Command::new("tmux")
            .args(["split-window", "-h", "-P", "-F", "#{pane_id}", &top])
            .output()
            .context("tmux split-window")?;
        if !out.status.success() {
            bail!(
                "tmux split-window: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.pane = Some(String::from_utf8_lossy(&out.stdout).trim().to_owned());
        Ok(())
    }

    /// The daemon gets SIGTERM (a clean exit, recoveries reaped); agents, wedged ones
    /// included, SIGKILL. Every child is reaped before this returns.
    fn stop(&mut self) {
        if let Some(pane) = self.pane.take() {
            let _ = Command::new("tmux")
                .args(["kill-pane", "-t", &pane])
                .status();
        }
        let mut children = std::mem::take(&mut self.children).into_iter();
        if let Some(mut daemon) = children.next() {
            signal(daemon.id(), libc::SIGTERM);
            let end = Instant::now() + Duration::from_secs(5);
            while matches!(daemon.try_wait(), Ok(None)) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        for mut agent in children {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        eprintln!("xtask: demo: stopped");
    }
}

/// Starts a child in its own process group (Ctrl-C reaches only xtask, which stops
/// everything in order) that dies with xtask even if xtask is killed.
fn spawn(cmd: &mut Command) -> Result<Child> {
    cmd.process_group(0);
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the
    // parent; the closure runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("starting {cmd:?}"))
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child we have not reaped yet.
    unsafe { libc::kill(pid as i32, sig) };
}

fn field_is(line: &str, key_value: &str) -> bool {
    line.split_whitespace().any(|f| f == key_value)
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or("-")
}

/// The next log line `want` accepts; None on Ctrl-C; fails when the daemon exits or
/// after `timeout`.
fn wait_line(
    rx: &mpsc::Receiver<Msg>,
    timeout: Duration,
    want: impl Fn(&str) -> bool,
) -> Result<Option<String>> {
    let end = Instant::now() + timeout;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Msg::Line(l)) if want(&l) => return Ok(Some(l)),
            Ok(Msg::Line(_)) => {}
            Ok(Msg::Stop) => return Ok(None),
            Ok(Msg::DaemonGone) => bail!("the observer exited (its log is above)"),
            Err(_) => bail!("waited {timeout:?} for the observer"),
        }
    }
}
