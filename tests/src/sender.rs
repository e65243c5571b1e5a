//! The test sender (`src/bin/sender.rs`) as the tests drive it.

use std::process::{Command, Stdio};

use crate::{Proc, log_field, target_bin};

/// Starts the sender with its summary line (`sent= pid= elapsed_ns=`) piped.
pub fn sender(target: &str, args: &[&str]) -> Proc {
    Proc::spawn(
        Command::new(target_bin("varta-sender"))
            .arg(target)
            .args(args)
            .stdout(Stdio::piped()),
    )
}

/// Waits for a sender to finish: (frames sent, its pid, elapsed seconds).
#[track_caller]
pub fn summary(sender: Proc) -> (u64, u32, f64) {
    let out = sender.wait_with_output();
    assert!(out.status.success(), "varta-sender: {}", out.status);
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    (
        log_field(&line, "sent").parse().unwrap(),
        log_field(&line, "pid").parse().unwrap(),
        log_field(&line, "elapsed_ns").parse::<f64>().unwrap() / 1e9,
    )
}

/// Runs the sender to completion: (frames sent, its pid, elapsed seconds).
#[track_caller]
pub fn send(target: &str, args: &[&str]) -> (u64, u32, f64) {
    summary(sender(target, args))
}
