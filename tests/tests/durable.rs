//! Durable files: the recovery audit trail, export rotation, and observing that carries on
//! when the export file's directory vanishes or its disk is full.

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    time::Duration,
};

use varta_e2e::{Daemon, frame, wait_for};

const WAIT: Duration = Duration::from_secs(10);

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Waits until `path` has at least `n` lines having `part`; returns them.
#[track_caller]
fn wait_lines(path: &Path, part: &str, n: usize) -> Vec<String> {
    wait_for(
        &format!("{n} line(s) with {part:?} in {}", path.display()),
        WAIT,
        || {
            let found: Vec<String> = lines(path)
                .into_iter()
                .filter(|l| l.contains(part))
                .collect();
            if found.len() >= n {
                Ok(found)
            } else {
                Err(format!("{:?}", lines(path)))
            }
        },
    )
}

#[test]
fn audit_records_spawn_and_outcome_with_captured_output_and_reopens_on_sighup() {
    let dir = varta_e2e::scratch("audit");
    let script = dir.join("recover.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"recovering $1\"\necho \"tab\there\" >&2\nhead -c 10000 /dev/zero\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, PermissionsExt::from_mode(0o755)).unwrap();
    let audit = dir.join("audit.tsv");
    let d = Daemon::builder("audit", "userspace")
        .args(["--threshold-ms", "300", "--recovery-debounce-ms", "0"])
        .arg("--recovery-exec")
        .arg(format!("{} {{pid}}", script.display()))
        .args(["--recovery-capture-stdio", "--recovery-capture-bytes", "64"])
        .arg("--recovery-audit-file")
        .arg(audit.to_str().unwrap())
        .start();
    let me = std::process::id();
    d.send(&frame(me, 1));
    let done = wait_lines(&audit, "\tfailure\t", 1);
    let spawned = wait_lines(&audit, "\tspawned\t", 1);
    let s: Vec<&str> = spawned[0].split('\t').collect();
    let f: Vec<&str> = done[0].split('\t').collect();
    assert_eq!(s.len(), 8, "{spawned:?}");
    assert_eq!(f.len(), 8, "{done:?}");
    assert_eq!(
        (s[2], f[2]),
        (me.to_string().as_str(), me.to_string().as_str())
    );
    assert_eq!(s[3], f[3], "the same child in both records");
    assert!(s[3].parse::<u32>().is_ok(), "child pid: {s:?}");
    assert_eq!(f[5], "exit:3");
    assert!(f[6].parse::<u64>().is_ok(), "duration: {f:?}");
    // Output is kept in order, bounded (64 bytes, then "..."), escaped into one field.
    let output = f[7];
    assert!(
        output.starts_with(&format!("recovering {me}\\n")),
        "{output}"
    );
    assert!(output.ends_with("..."), "{output}");
    assert!(
        output.contains("tab\\there\\n") || output.contains("\\x00"),
        "{output}"
    );
    let mode = std::fs::metadata(&audit).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // SIGHUP after an external rotation: new records go to a new file at the path.
    let rotated = dir.join("audit.tsv.old");
    std::fs::rename(&audit, &rotated).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log_all(
        &["event=file_reopened", "file=audit", "reason=sighup"],
        WAIT,
    );
    d.send(&frame(me, 2));
    d.wait_logs(&["event=recovery", "outcome=failure"], 2, WAIT);
    wait_lines(&audit, "\tfailure\t", 1);
    assert_eq!(lines(&rotated).len(), 2, "{:?}", lines(&rotated));
    let flagged = d.count_logs(&["event=flag_ignored"]);
    assert_eq!(flagged, 0, "{}", d.log_text());
}

#[test]
fn export_rotates_at_its_size_keeping_five_generations() {
    let d = Daemon::builder("export-rotate", "userspace")
        .export_file()
        .args(["--threshold-ms", "60000", "--max-beat-rate", "0"])
        .args([
            "--export-file-max-bytes",
            "300",
            "--export-file-sync-every",
            "1",
        ])
        .start();
    let export = d.export.clone().unwrap();
    let me = std::process::id();
    // One line is about 40 bytes: 200 beats fill far more than 6 files of 300 bytes.
    for nonce in 1..=200 {
        d.send(&frame(me, nonce));
    }
    let last = format!("\t{me}\t200\t");
    wait_for("the 200th beat's line", WAIT, || {
        if d.export_text().contains(&last) {
            Ok(())
        } else {
            Err(d.export_text())
        }
    });
    let name = |n: u32| export.with_extension(format!("tsv.{n}"));
    for n in 1..=5 {
        let g = std::fs::read_to_string(name(n)).unwrap();
        assert!(g.len() <= 300 && g.ends_with('\n'), "{}: {g:?}", n);
    }
    assert!(!name(6).exists());
    assert!(std::fs::metadata(&export).unwrap().len() <= 300);
    assert!(d.metric("varta_file_rotations_total{file=\"export\"}") >= 5.0);
    assert!(d.metric("varta_file_sync_seconds_count{file=\"export\"}") >= 1.0);
}

/// The fds of `pid` that name a deleted file.
fn deleted_fds(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .filter(|p| p.ends_with("(deleted)"))
        .collect()
}

#[test]
fn a_vanished_export_directory_is_counted_and_observing_continues() {
    let base = varta_e2e::scratch("vanish-export");
    let out = base.join("out");
    std::fs::create_dir(&out).unwrap();
    let export = out.join("events.tsv");
    let d = Daemon::builder("vanish", "userspace")
        .args(["--threshold-ms", "60000", "--max-beat-rate", "0"])
        .arg("--export-file")
        .arg(export.to_str().unwrap())
        .start();
    let me = std::process::id();
    d.send(&frame(me, 1));
    wait_lines(&export, "\tbeat\t", 1);
    std::fs::remove_dir_all(&out).unwrap();
    // Beats keep coming in and are counted while no export file can be written.
    let beats = format!("varta_beats_total{{pid=\"{me}\"}}");
    let mut nonce = 1;
    wait_for("export lines counted as lost", WAIT, || {
        nonce += 1;
        d.send(&frame(me, nonce));
        let lost = d.metric("varta_file_records_lost_total{file=\"export\"}");
        if lost >= 1.0 {
            Ok(())
        } else {
            Err(format!("lost={lost}"))
        }
    });
    d.wait_metric(&beats, nonce as f64, WAIT);
    d.wait_log_all(&["event=file_vanished", "file=export"], WAIT);
    d.wait_log_all(&["event=file_error", "file=export", "op=open"], WAIT);
    assert_eq!(
        deleted_fds(d.pid()),
        Vec::<String>::new(),
        "a deleted file kept open"
    );
    // The directory comes back: the writer opens a new file there by itself.
    std::fs::create_dir(&out).unwrap();
    wait_for("lines in the new export file", WAIT, || {
        nonce += 1;
        d.send(&frame(me, nonce));
        if lines(&export).is_empty() {
            Err("none".to_owned())
        } else {
            Ok(())
        }
    });
    // A SIGHUP whose reopen fails leaves no file open either.
    std::fs::remove_dir_all(&out).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log_all(&["event=file_reopen_failed", "file=export"], WAIT);
    assert_eq!(
        deleted_fds(d.pid()),
        Vec::<String>::new(),
        "a deleted file kept open"
    );
    assert_eq!(d.count_logs(&["level=error"]), 0, "{}", d.log_text());
}

/// Unmounts on drop (pass or fail).
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn a_full_disk_is_counted_and_observing_continues_needs_root() {
    varta_e2e::require_root!("mounting a small tmpfs");
    let base = varta_e2e::scratch("full-disk");
    let mnt = base.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=16k",
            "varta-full",
            mnt.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(ok.success(), "mount -t tmpfs failed");
    let _mount = Mount(mnt.clone());
    let export = mnt.join("events.tsv");
    let d = Daemon::builder("full-disk", "userspace")
        .args(["--threshold-ms", "60000", "--max-beat-rate", "0"])
        .args(["--export-file-sync-every", "1"])
        .arg("--export-file")
        .arg(export.to_str().unwrap())
        .start();
    let me = std::process::id();
    let mut nonce = 0;
    wait_for(
        "a failed write to the full disk",
        Duration::from_secs(30),
        || {
            for _ in 0..50 {
                nonce += 1;
                d.send(&frame(me, nonce));
            }
            let failed = d.metric("varta_file_errors_total{file=\"export\",op=\"write\"}");
            if failed >= 1.0 {
                Ok(())
            } else {
                Err(format!("write errors={failed}"))
            }
        },
    );
    let beats = format!("varta_beats_total{{pid=\"{me}\"}}");
    d.wait_metric(&beats, nonce as f64, WAIT);
    d.wait_log_all(&["event=file_error", "file=export", "op=write"], WAIT);
    // One log line for many failures (once a minute).
    for _ in 0..100 {
        nonce += 1;
        d.send(&frame(me, nonce));
    }
    d.wait_metric(&beats, nonce as f64, WAIT);
    assert_eq!(
        d.count_logs(&["event=file_error", "op=write"]),
        1,
        "{}",
        d.log_text()
    );
    // Only whole lines in the file.
    let text = std::fs::read_to_string(&export).unwrap();
    assert!(text.ends_with('\n'));
    assert!(text.lines().all(|l| l.split('\t').count() == 6), "{text}");
    assert_eq!(
        export.metadata().unwrap().dev(),
        mnt.metadata().unwrap().dev()
    );
}

/// M4: a flood of panic-terminal frames from fresh pids (plaintext UDP claims, each a
/// recovery not run and audited `suppressed`) overwhelms the audit writer, while the
/// recoveries of ten agents that beat once and died really run: each one's `spawned` and
/// outcome records are in the file; what the flood loses is counted.
#[test]
fn a_flood_of_suppressed_recoveries_never_loses_a_real_audit_record() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    const REAL: usize = 10;
    let dir = varta_e2e::scratch("audit-flood");
    let audit = dir.join("audit.tsv");
    let d = Daemon::builder("audit-flood", "userspace")
        .args(["--threshold-ms", "500", "--recovery-debounce-ms", "0"])
        .args(["--recovery-exec", "/bin/true {pid}"])
        .args([
            "--recovery-max-concurrent",
            "100",
            "--recovery-spawn-rate",
            "100",
        ])
        .args(["--recovery-max-concurrent-per-uid", "100"])
        .args(["--recovery-spawn-rate-per-uid", "100"])
        .args(["--recovery-established-after-ms", "0"])
        .args(["--udp-port", "0", "--i-accept-plaintext-udp"])
        .arg("--plaintext-udp-i-accept-recovery-on-unauthenticated-transport")
        .args([
            "--global-beat-rate",
            "1000000",
            "--global-beat-burst",
            "1000000",
        ])
        .arg("--recovery-audit-file")
        .arg(audit.to_str().unwrap())
        .start();
    let ready = d.wait_log("event=ready", WAIT);
    let udp: std::net::SocketAddr = varta_e2e::log_field(&ready, "udp").parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Claimed pids cycle below pid_max, skipping live processes (the real agents among
    // them); the tracker (256) has evicted each dead one long before its pid comes round
    // again, so every frame is a fresh agent's death.
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut pid = 300;
            while !stop.load(Ordering::Relaxed) {
                pid = if pid + 1 >= pid_max { 300 } else { pid + 1 };
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = sock.send_to(&varta_e2e::panic_terminal_frame(pid), udp);
                }
            }
        })
    };
    // The writer is held still (on a quiet machine it keeps up with the flood): the
    // queue fills with the flood's records and the rest are lost, as on a slow disk.
    let writer = StoppedThread::named(d.pid(), "varta-audit");
    let lost = "varta_file_records_lost_total{file=\"audit\"}";
    d.wait_metric(lost, 1.0, WAIT);
    // The real ones: each beats once and exits; at its stall its recovery runs.
    let socket = d.socket.to_str().unwrap().to_owned();
    let real: Vec<u32> = (0..REAL)
        .map(|_| {
            let beat = varta_e2e::Proc::spawn(
                std::process::Command::new(varta_e2e::bin()).args(["beat", "--socket", &socket]),
            );
            let pid = beat.pid();
            beat.wait_success();
            // Apart, so that their records meet the flood at different moments.
            std::thread::sleep(Duration::from_millis(100));
            pid
        })
        .collect();
    // The flood's recoveries are all suppressed: a success is a real one (their log lines
    // may be among those the logger's rate limit drops under the flood).
    d.wait_metric(
        "varta_recovery_outcomes_total{outcome=\"success\"}",
        REAL as f64,
        WAIT,
    );
    // Every record was queued (or lost) by now; the file's own thread writes them.
    drop(writer);
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    assert!(
        d.metric(lost) > 0.0,
        "the flood never overwhelmed the writer"
    );
    let has = |pid: u32, outcome: &str| {
        let (pid, outcome) = (format!("\t{pid}\t"), format!("\t{outcome}\t"));
        lines(&audit)
            .iter()
            .any(|l| l.contains(&pid) && l.contains(&outcome))
    };
    wait_for("the real records in the audit file", WAIT, || {
        let missing: Vec<(u32, &str)> = real
            .iter()
            .flat_map(|&pid| [(pid, "spawned"), (pid, "success")])
            .filter(|&(pid, outcome)| !has(pid, outcome))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("missing: {missing:?}"))
        }
    });
}

/// One thread of a process stopped by ptrace (only that thread: the rest runs on), resumed
/// when dropped. Dropped on the thread that made it (the tracer).
struct StoppedThread(i32);

impl StoppedThread {
    fn named(pid: u32, comm: &str) -> StoppedThread {
        // A new thread names itself once it first runs, which on a loaded machine can be
        // after the daemon says it is ready.
        let tid = wait_for(&format!("a thread named {comm} in {pid}"), WAIT, || {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .map_err(|e| e.to_string())?
                .flatten()
                .find(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.trim_end() == comm)
                })
                .and_then(|t| t.file_name().to_str()?.parse::<i32>().ok())
                .ok_or_else(|| "not there yet".to_owned())
        });
        // SAFETY: ptrace requests that take no pointers, on a thread id just read; waitpid
        // writes the status into a local.
        unsafe {
            let seized = libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0);
            assert_eq!(
                seized,
                0,
                "ptrace seize: {}",
                std::io::Error::last_os_error()
            );
            assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0), 0);
            let mut status = 0;
            assert_eq!(libc::waitpid(tid, &mut status, libc::__WALL), tid);
        }
        StoppedThread(tid)
    }
}

impl Drop for StoppedThread {
    fn drop(&mut self) {
        // SAFETY: as above; detaching resumes the thread.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.0, 0, 0) };
    }
}
