//! `varta-watch top` as a person sees it: run in a tmux pane against a daemon with agents,
//! the pane captured as text; and its plain snapshot when stdout is not a terminal.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use varta_e2e::{Daemon, bin, scratch, wait_for};

/// A tmux server of its own (`-L`), killed with everything in it when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// Starts `command` in a detached 120x30 pane (the test fails where tmux is missing:
    /// it is ignored in a plain `cargo test`, and `cargo xtask test` installs tmux).
    #[track_caller]
    fn start(test: &str, name: &str, command: &str) -> Tmux {
        varta_e2e::require(
            test,
            Path::new("/usr/bin/tmux").exists(),
            "tmux is missing (`cargo xtask test` installs it)",
        );
        let tmux = Tmux {
            socket: format!("varta-top-{}-{name}", std::process::id()),
        };
        let out = tmux.run(&[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "120",
            "-y",
            "30",
            command,
        ]);
        assert!(out.status.success(), "tmux new-session: {out:?}");
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .env("TERM", "xterm-256color")
            .stdin(Stdio::null())
            .output()
            .expect("running tmux")
    }

    fn pane(&self) -> String {
        let out = self.run(&["capture-pane", "-p", "-t", "top"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until a line of the pane has every one of `parts`; returns that line.
    #[track_caller]
    fn wait_line(&self, parts: &[&str], log: &Path) -> String {
        wait_for(
            &format!("a line with {parts:?} in the pane"),
            Duration::from_secs(20),
            || {
                let pane = self.pane();
                pane.lines()
                    .find(|l| parts.iter().all(|p| l.contains(p)))
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        let err = std::fs::read_to_string(log).unwrap_or_default();
                        format!("pane:\n{pane}\ntop's stderr: {err}")
                    })
            },
        )
    }

    fn alive(&self) -> bool {
        self.run(&["has-session", "-t", "top"]).status.success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// A table row's first cell is the pid.
fn row_of(pid: u32) -> String {
    format!("│{pid} ")
}

#[test]
#[ignore = "needs tmux: run by `cargo xtask test`, which installs it"]
fn top_in_a_terminal_shows_an_agent_then_its_stall() {
    let d = Daemon::builder("top-tmux", "userspace")
        .args(["--threshold-ms", "1000"])
        .start();
    let mut agent = d.agent(100);
    let pid = agent.pid();
    d.wait_metric(
        &format!("varta_beats_total{{pid=\"{pid}\"}}"),
        1.0,
        Duration::from_secs(10),
    );
    let dir = scratch("top-tmux-pane");
    let log = dir.join("top.err");
    let command = format!(
        "exec {} top --addr {} 2>{}",
        bin().display(),
        d.prom.unwrap(),
        log.display()
    );
    let tmux = Tmux::start(varta_e2e::this_test!(), "live", &command);

    let row = tmux.wait_line(&[&row_of(pid), " ok "], &log);
    assert!(!row.contains("STALLED"), "{row}");
    tmux.wait_line(&["datapath=userspace"], &log);

    agent.signal(libc::SIGKILL);
    wait_for("the agent to die", Duration::from_secs(5), || {
        agent.try_wait().ok_or_else(|| "alive".to_owned())
    });
    let row = tmux.wait_line(&[&row_of(pid), "STALLED"], &log);
    // PID STATUS LAST-BEAT BEATS STALLS: one stall counted.
    assert_eq!(row.split_whitespace().nth(4), Some("1"), "{row}");

    let out = tmux.run(&["send-keys", "-t", "top", "q"]);
    assert!(out.status.success(), "tmux send-keys: {out:?}");
    wait_for("top to quit on q", Duration::from_secs(10), || {
        if tmux.alive() {
            Err(tmux.pane())
        } else {
            Ok(())
        }
    });
}

/// What `top` prints to a pipe.
fn snapshot(args: &[&str]) -> Output {
    Command::new(bin())
        .arg("top")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running varta-watch top")
}

#[test]
fn top_to_a_pipe_prints_one_plain_snapshot() {
    let d = Daemon::builder("top-plain", "userspace")
        .args(["--threshold-ms", "60000"])
        .start();
    let agent = d.agent(100);
    let pid = agent.pid();
    d.wait_metric(
        &format!("varta_beats_total{{pid=\"{pid}\"}}"),
        1.0,
        Duration::from_secs(10),
    );

    let out = snapshot(&["--addr", &d.prom.unwrap().to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        !text.contains('\x1b'),
        "no escape codes in a snapshot: {text:?}"
    );
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].contains("datapath=userspace"), "{text}");
    assert!(lines[1].contains("agents tracked 1"), "{text}");
    // Two scrapes a second apart: the agent's beats in between give a rate.
    let rate = lines[1]
        .split("beats/s ")
        .nth(1)
        .and_then(|r| r.split(' ').next());
    assert!(
        rate.and_then(|r| r.parse::<u64>().ok())
            .is_some_and(|r| r >= 1),
        "{text}"
    );
    let row = lines
        .iter()
        .find(|l| l.starts_with(&format!("{pid} ")))
        .unwrap_or_else(|| panic!("no row for {pid}:\n{text}"));
    assert_eq!(row.split_whitespace().nth(1), Some("ok"), "{row}");
    // Its identity, from varta_agent_info.
    assert!(row.ends_with("comm=varta-watch"), "{row}");
}

#[test]
fn top_without_the_token_says_which_flag_is_missing() {
    let dir = scratch("top-token");
    let token = dir.join("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let d = Daemon::builder("top-token", "userspace")
        .args(["--threshold-ms", "60000"])
        .arg("--prom-token-file")
        .arg(token.display().to_string())
        .start();
    let addr = d.prom.unwrap().to_string();

    let refused = snapshot(&["--addr", &addr]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("--token-file"), "{err}");

    let ok = snapshot(&[
        "--addr",
        &addr,
        "--token-file",
        &token.display().to_string(),
    ]);
    assert!(ok.status.success(), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("agents tracked 0"));
}
