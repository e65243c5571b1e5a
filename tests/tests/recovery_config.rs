//! What configures recovery cannot be turned against the host: a `--config` file (which may
//! set `recovery-exec` and `recovery-env`) must be the observer's user's, mode 0600, not a
//! symlink, at start and on every reload; `recovery-env` refuses loader variables (`LD_*`,
//! `GCONV_PATH`, ...) unless `--i-accept-recovery-env-loader-variables`.

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use varta_e2e::{Daemon, bin, require_root, scratch};

const WAIT: Duration = Duration::from_secs(30);

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Starts the daemon expecting it to refuse: its one stderr line, after asserting exit 2.
#[track_caller]
fn refused(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(bin())
        .arg("--socket")
        .arg(dir.join("refused.sock"))
        .args(["--threshold-ms", "1000", "--datapath", "userspace"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "{args:?}: not one line: {stderr}"
    );
    assert!(!dir.join("refused.sock").exists(), "no socket was bound");
    stderr
}

#[test]
fn a_config_file_others_may_write_or_read_is_refused_at_start() {
    let dir = scratch("config-mode");
    let config = dir.join("varta.toml");
    let path = config.to_str().unwrap();
    for mode in [0o666, 0o644, 0o620] {
        write(&config, "recovery-exec = \"/bin/true\"\n", mode);
        let line = refused(&dir, &["--config", path]);
        assert!(line.contains("--config") && line.contains(path), "{line}");
        assert!(line.contains(&format!("mode {mode:04o}")), "{line}");
    }
    write(&config, "recovery-exec = \"/bin/true\"\n", 0o600);
    let link = dir.join("link.toml");
    std::os::unix::fs::symlink(&config, &link).unwrap();
    let line = refused(&dir, &["--config", link.to_str().unwrap()]);
    assert!(
        line.contains("--config") && line.contains("symlink"),
        "{line}"
    );
}

#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn a_config_file_of_another_user_is_refused_needs_root() {
    require_root!("chown to another user");
    let dir = scratch("config-owner");
    let config = dir.join("varta.toml");
    write(&config, "threshold-ms = 1000\n", 0o600);
    std::os::unix::fs::chown(&config, Some(65534), None).unwrap();
    let line = refused(&dir, &["--config", config.to_str().unwrap()]);
    assert!(
        line.contains("--config") && line.contains("uid 65534"),
        "{line}"
    );
}

#[test]
fn a_reload_of_a_config_file_that_became_world_writable_is_rejected() {
    let dir = scratch("config-reload-mode");
    let config = dir.join("varta.toml");
    write(&config, "threshold-ms = 5000\n", 0o600);
    let d = Daemon::builder("config-reload-mode", "userspace")
        .args(["--config", config.to_str().unwrap()])
        .start();
    // Someone could have written a recovery command into it: the whole file is refused.
    write(
        &config,
        "threshold-ms = 300\nrecovery-exec = \"/bin/true\"\n",
        0o666,
    );
    d.signal(libc::SIGHUP);
    let rejected = d.wait_log("event=reload_rejected", WAIT);
    assert!(rejected.contains("mode 0666"), "{rejected}");
    assert_eq!(d.count_logs(&["event=reload"]), 0);
    // Made private again, the same content is taken.
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    d.signal(libc::SIGHUP);
    let reloaded = d.wait_log("event=reload", WAIT);
    assert!(reloaded.contains("threshold-ms=5000->300"), "{reloaded}");
}

#[test]
fn recovery_env_refuses_loader_variables_unless_accepted() {
    let dir = scratch("recovery-env-loader");
    for var in [
        "LD_PRELOAD=/tmp/x.so",
        "GCONV_PATH=/tmp",
        "GLIBC_TUNABLES=x=1",
    ] {
        let line = refused(
            &dir,
            &["--recovery-exec", "/bin/true", "--recovery-env", var],
        );
        let name = var.split_once('=').unwrap().0;
        assert!(
            line.contains("--recovery-env") && line.contains(name),
            "{line}"
        );
        assert!(
            line.contains("--i-accept-recovery-env-loader-variables"),
            "{line}"
        );
    }
    // From a configuration file too.
    let config = dir.join("varta.toml");
    write(
        &config,
        "recovery-exec = \"/bin/true\"\nrecovery-env = [\"LD_LIBRARY_PATH=/tmp\"]\n",
        0o600,
    );
    let line = refused(&dir, &["--config", config.to_str().unwrap()]);
    assert!(line.contains("LD_LIBRARY_PATH"), "{line}");

    // Accepted, the variable reaches the recovery command: it succeeds only if it sees it.
    let script = dir.join("recover.sh");
    write(
        &script,
        "#!/bin/sh\n[ \"$LD_BIND_NOW\" = 1 ] && [ -n \"$1\" ]\n",
        0o700,
    );
    let d = Daemon::builder("recovery-env-accepted", "userspace")
        .args(["--threshold-ms", "300"])
        .args(["--recovery-exec", &format!("{} {{pid}}", script.display())])
        .args(["--recovery-env", "LD_BIND_NOW=1"])
        .arg("--i-accept-recovery-env-loader-variables")
        .start();
    let agent = d.agent(3_600_000);
    let pid = format!("pid={}", agent.pid());
    d.wait_log_all(&["event=stall", &pid], WAIT);
    let done = d.wait_log_all(&["event=recovery", &pid], WAIT);
    assert!(done.contains("outcome=success"), "{}", d.log_text());
}
