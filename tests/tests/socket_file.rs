//! The socket path belongs to the observer that bound it: a second observer started on it
//! with `--no-takeover` is refused and leaves it alone (without that flag it takes over:
//! `takeover.rs`), and an observer whose file was replaced under it does not remove the
//! replacement at exit.

use std::{
    io::Read,
    os::unix::net::UnixDatagram,
    process::{Command, Stdio},
    time::Duration,
};

use varta_e2e::{Daemon, Proc, bin, wait_for};

const WAIT: Duration = Duration::from_secs(10);

fn beat(d: &Daemon) {
    let st = Command::new(bin())
        .arg("beat")
        .arg("--socket")
        .arg(&d.socket)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn a_second_observer_on_a_live_socket_is_refused_and_leaves_it_alone() {
    let d = Daemon::builder("socket-owner", "userspace")
        .args(["--threshold-ms", "60000"])
        .start();
    let mut second = Proc::spawn(
        Command::new(bin())
            .arg("--socket")
            .arg(&d.socket)
            .args(["--threshold-ms", "1000", "--datapath", "userspace"])
            .arg("--no-takeover")
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let mut pipe = second.take_stderr().unwrap();
    let exited = wait_for("the second observer to exit", WAIT, || {
        second.try_wait().ok_or_else(|| "still running".to_owned())
    });
    let mut stderr = String::new();
    pipe.read_to_string(&mut stderr).unwrap();
    assert!(!exited.success(), "{stderr}");
    assert!(
        stderr.contains("event=fatal") && stderr.contains("socket of a running observer"),
        "{stderr}"
    );
    // The running observer still has its socket: beats reach it.
    assert!(d.socket.exists());
    beat(&d);
    d.wait_metric("varta_watch_pids_tracked", 1.0, WAIT);
}

#[test]
fn a_replaced_socket_file_is_not_removed_at_exit() {
    let mut d = Daemon::builder("socket-replaced", "userspace")
        .args(["--threshold-ms", "60000"])
        .start();
    let other = d.socket.with_file_name("other.sock");
    let _other = UnixDatagram::bind(&other).unwrap();
    std::fs::rename(&other, &d.socket).unwrap();
    assert!(d.stop().success());
    assert!(
        d.socket.exists(),
        "the observer removed a socket it did not bind"
    );
    d.wait_log("event=socket_file_kept", WAIT);
}
