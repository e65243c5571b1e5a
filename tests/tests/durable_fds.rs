//! File descriptors: a daemon limited to 256 descriptors still runs recovery while
//! /metrics connections are held open; /metrics closes connections that send nothing; a
//! sender attaching descriptors to its frames cannot make the daemon keep them.

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::{fd::AsRawFd, unix::fs::PermissionsExt},
    time::Duration,
};

use varta_e2e::{Daemon, frame, wait_for};

const WAIT: Duration = Duration::from_secs(20);

fn open_fds(pid: u32) -> usize {
    fd_targets(pid).len()
}

/// What each open descriptor of `pid` refers to, sorted.
fn fd_targets(pid: u32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn with_256_descriptors_and_metrics_connections_held_recovery_still_runs() {
    let dir = varta_e2e::scratch("fd-limit");
    let script = dir.join("recover.sh");
    std::fs::write(&script, "#!/bin/sh\necho recovered \"$1\"\n").unwrap();
    std::fs::set_permissions(&script, PermissionsExt::from_mode(0o755)).unwrap();
    let d = Daemon::builder("fd-limit", "userspace")
        .wrapped(["sh", "-c", "ulimit -n 256; exec \"$0\" \"$@\""])
        .args(["--threshold-ms", "300", "--recovery-capture-stdio"])
        .arg("--recovery-exec")
        .arg(format!("{} {{pid}}", script.display()))
        .start();
    let limit = d.wait_log("event=fd_limit", WAIT);
    assert!(limit.contains("soft=256"), "{limit}");
    // Far more connections than the daemon has descriptors, all held open.
    let addr = d.prom.unwrap();

    let held: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    // The daemon accepted at most its limit of them: its descriptors stay in the reserve.
    let fds = open_fds(d.pid());
    assert!(
        fds < 128,
        "{fds} descriptors open with 300 connections pending"
    );
    let me = std::process::id();
    d.send(&frame(me, 1));
    let line = d.wait_log_all(&["event=recovery", &format!("pid={me}")], WAIT);
    assert!(line.contains("outcome=success"), "{line}\n{}", d.log_text());

    drop(held);
    // Once they are gone, scrapes are served again.
    wait_for("a scrape", WAIT, || match d.get_metrics(None).0 {
        200 => Ok(()),
        code => Err(code.to_string()),
    });
}

#[test]
fn a_metrics_connection_that_sends_nothing_is_closed() {
    let d = Daemon::builder("slow-header", "userspace")
        .args(["--threshold-ms", "1000"])
        .start();
    let mut s = TcpStream::connect(d.prom.unwrap()).unwrap();
    // Half a request, then silence.
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // A guard only: the server closes first (IDLE_TIMEOUT is 5 s).
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the server kept the connection open: {e}"),
    }
    assert_eq!(d.get_metrics(None).0, 200);
}

/// Sends `bytes` to `path` with `fds` attached (SCM_RIGHTS).
fn send_with_fds(
    sock: &std::os::unix::net::UnixDatagram,
    path: &std::path::Path,
    bytes: &[u8],
    fds: &[i32],
) {
    sock.connect(path).ok();
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut _,
        iov_len: bytes.len(),
    };
    let payload = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain data; every pointer set below points at live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: the control buffer has room for one cmsghdr with `payload` bytes.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        assert_eq!(
            libc::sendmsg(sock.as_raw_fd(), &msg, 0),
            bytes.len() as isize,
            "sendmsg: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn descriptors_attached_to_frames_are_not_kept_by_the_daemon() {
    let d = Daemon::builder("scm-rights", "userspace")
        .args(["--threshold-ms", "60000", "--max-beat-rate", "0"])
        .start();
    let me = std::process::id();
    d.send(&frame(me, 1));
    let beats = format!("varta_beats_total{{pid=\"{me}\"}}");
    d.wait_metric(&beats, 1.0, WAIT);
    let before = fd_targets(d.pid());
    let files: Vec<std::fs::File> = (0..4)
        .map(|_| std::fs::File::open("/dev/null").unwrap())
        .collect();
    let fds: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
    let sock = std::os::unix::net::UnixDatagram::unbound().unwrap();
    for nonce in 2..=201 {
        send_with_fds(&sock, &d.socket, &frame(me, nonce), &fds);
    }
    d.wait_metric(&beats, 201.0, WAIT);
    // Sockets come and go with scrapes; the descriptors sent were all /dev/null.
    let null = |v: Vec<String>| v.iter().filter(|t| *t == "/dev/null").count();
    assert_eq!(
        null(fd_targets(d.pid())),
        null(before),
        "descriptors received with frames were kept"
    );
}
