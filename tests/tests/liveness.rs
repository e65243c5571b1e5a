//! The observer's own liveness: the self-watchdog, the heartbeat file, the hardware
//! watchdog protocol (against a FIFO standing in for /dev/watchdog), JSON logs.

use std::{
    ffi::CString,
    io::Read,
    os::unix::{ffi::OsStrExt, process::ExitStatusExt},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use varta_e2e::{Daemon, frame, log_field, wait_for};

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn a_wedged_event_loop_is_aborted_by_the_self_watchdog() {
    let mut d = Daemon::builder("wedge", "userspace")
        // No core file for the deliberate abort.
        .wrapped(["sh", "-c", "ulimit -c 0; exec \"$0\" \"$@\""])
        .args(["--threshold-ms", "60000", "--self-watchdog-secs", "1"])
        .args(["--inject-wedge-ms", "60000"])
        .start();
    d.send(&frame(std::process::id(), 1));
    d.wait_log("event=inject_wedge", WAIT);
    let status = d.wait_exit(WAIT);
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{}", d.log_text());
    d.wait_log_all(&["event=self_watchdog_abort", "level=error"], WAIT);
}

fn progress(path: &Path) -> Result<u64, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    text.split_whitespace()
        .find_map(|kv| kv.strip_prefix("progress="))
        .and_then(|v| v.parse().ok())
        .ok_or(text)
}

#[test]
fn an_idle_loop_keeps_its_heartbeat_file_moving_under_the_self_watchdog() {
    let dir = varta_e2e::scratch("heartbeat");
    let hb = dir.join("heartbeat");
    let mut d = Daemon::builder("heartbeat", "userspace")
        .args(["--threshold-ms", "60000", "--self-watchdog-secs", "1"])
        .arg("--heartbeat-file")
        .arg(hb.to_str().unwrap())
        .start();
    let first = wait_for("a heartbeat line", WAIT, || progress(&hb));
    // Nothing arrives, yet the counter moves, and the watchdog (1 s) does not fire.
    wait_for(
        "the heartbeat counter to move twice",
        WAIT,
        || match progress(&hb)? {
            p if p >= first + 2 => Ok(()),
            p => Err(p.to_string()),
        },
    );
    let line = std::fs::read_to_string(&hb).unwrap();
    assert!(log_field(&line, "ts").parse::<f64>().is_ok(), "{line}");
    assert!(d.stop().success(), "{}", d.log_text());
    assert_eq!(d.count_logs(&["event=self_watchdog_abort"]), 0);
}

#[test]
fn the_hardware_watchdog_is_kicked_and_magic_closed_on_a_clean_shutdown() {
    let dir = varta_e2e::scratch("hw-watchdog");
    let fifo = dir.join("watchdog");
    let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let bytes = Arc::new(Mutex::new(Vec::new()));
    let sink = bytes.clone();
    let reader_path = fifo.clone();
    // The stand-in device's other end: everything written, until the daemon closes it.
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::open(reader_path).unwrap();
        let mut buf = [0u8; 64];
        loop {
            match f.read(&mut buf).unwrap() {
                0 => break,
                n => sink.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
    });
    let mut d = Daemon::builder("hw-watchdog", "userspace")
        .args(["--threshold-ms", "60000"])
        .arg("--hw-watchdog")
        .arg(fifo.to_str().unwrap())
        .start();
    wait_for("two kicks", WAIT, || {
        let b = bytes.lock().unwrap().clone();
        if b.len() >= 2 {
            Ok(())
        } else {
            Err(format!("{b:?}"))
        }
    });
    assert!(d.stop().success(), "{}", d.log_text());
    reader.join().unwrap();
    let b = bytes.lock().unwrap().clone();
    let (last, kicks) = b.split_last().unwrap();
    assert_eq!(*last, b'V', "magic close last: {b:?}");
    assert!(kicks.iter().all(|k| *k == b'k'), "{b:?}");
    d.wait_log("event=hw_watchdog_closed", WAIT);
}

#[test]
fn json_logs_are_one_object_per_line() {
    let d = Daemon::builder("json-log", "userspace")
        .args(["--threshold-ms", "300", "--log-format", "json"])
        .spawn();
    d.wait_log("\"event\":\"ready\"", WAIT);
    let me = std::process::id();
    d.send(&frame(me, 1));
    let stall = d.wait_log("\"event\":\"stall\"", WAIT);
    let v: serde_json::Value = serde_json::from_str(&stall).unwrap();
    assert_eq!(v["pid"], serde_json::json!(me), "{stall}");
    assert_eq!(v["level"], "warn");
    for line in d.logs() {
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["ts"].is_f64() && v["event"].is_string(), "{line}");
    }
}
