//! A test sender: `varta-sender <socket|udp:ADDR> <mode> [count] [arg]`.
//! Modes: `hex HEX` (send one datagram COUNT times), `flood` (valid frames of our own pid
//! with rising nonces, COUNT of them, or for ARG milliseconds when COUNT is 0), `forge PID`
//! (one valid frame claiming PID), `dying` (one beat, then the panic-terminal frame),
//! `pace MS` (COUNT beats of our own pid, one every MS milliseconds: an honest agent),
//! `beat MS` (the same from a nonblocking socket, as the real clients send: a beat the full
//! queue refuses is lost),
//! `churn MS` (for MS milliseconds, fork children that each send one beat of their own pid
//! and exit), `rotate` (COUNT frames claiming pids that rotate through 300..30000).
//! Prints what it sent (successfully) and for how long.

use std::{net::UdpSocket, os::unix::net::UnixDatagram, time::Instant};

enum Out {
    Uds(UnixDatagram, String),
    Udp(UdpSocket),
}

impl Out {
    fn set_nonblocking(&self) {
        match self {
            Out::Uds(s, _) => s.set_nonblocking(true),
            Out::Udp(s) => s.set_nonblocking(true),
        }
        .unwrap();
    }

    /// Whether the datagram was sent.
    fn send(&self, b: &[u8]) -> bool {
        match self {
            Out::Uds(s, path) => s.send_to(b, path),
            Out::Udp(s) => s.send(b),
        }
        .is_ok()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let out = match args[1].strip_prefix("udp:") {
        Some(addr) => {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.connect(addr).unwrap();
            Out::Udp(s)
        }
        None => Out::Uds(UnixDatagram::unbound().unwrap(), args[1].clone()),
    };
    let count: u64 = args.get(3).and_then(|c| c.parse().ok()).unwrap_or(1);
    let pid = std::process::id();
    let started = Instant::now();
    let mut sent = 0u64;
    match args[2].as_str() {
        "hex" => {
            let bytes = varta_e2e::hex_decode(&args[4]);
            for _ in 0..count {
                out.send(&bytes);
                sent += 1;
            }
        }
        "flood" => {
            let millis: u128 = args.get(4).and_then(|m| m.parse().ok()).unwrap_or(0);
            let mut nonce = 1;
            while (count > 0 && sent < count)
                || (count == 0 && started.elapsed().as_millis() < millis)
            {
                out.send(&varta_e2e::frame(pid, nonce));
                nonce += 1;
                sent += 1;
            }
        }
        "forge" => {
            let claimed: u32 = args[4].parse().unwrap();
            for nonce in 0..count {
                out.send(&varta_e2e::frame(claimed, 1_000_000 + nonce));
                sent += 1;
            }
        }
        "dying" => {
            out.send(&varta_e2e::frame(pid, 1));
            out.send(&varta_e2e::panic_terminal_frame(pid));
            sent = 2;
        }
        "pace" | "beat" => {
            if args[2] == "beat" {
                out.set_nonblocking();
            }
            let interval = std::time::Duration::from_millis(args[4].parse().unwrap());
            for nonce in 1..=count {
                sent += out.send(&varta_e2e::frame(pid, nonce)) as u64;
                std::thread::sleep(interval);
            }
        }
        "churn" => {
            let millis: u128 = args[4].parse().unwrap();
            // SAFETY: setting SIGCHLD to SIG_IGN has no preconditions: children are reaped
            // by the kernel, none is left a zombie.
            unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
            while started.elapsed().as_millis() < millis {
                // SAFETY: this process is single-threaded; the child only sends and exits.
                match unsafe { libc::fork() } {
                    0 => {
                        let me = std::process::id();
                        out.send(&varta_e2e::frame(me, 1));
                        // SAFETY: _exit skips the parent's atexit handlers and buffers.
                        unsafe { libc::_exit(0) };
                    }
                    -1 => std::thread::yield_now(),
                    _ => sent += 1,
                }
            }
        }
        "rotate" => {
            for i in 0..count {
                let claimed = 300 + (i % 29_700) as u32;
                sent += out.send(&varta_e2e::frame(claimed, 1 + i / 29_700)) as u64;
            }
        }
        other => panic!("unknown mode {other}"),
    }
    println!(
        "sent={sent} pid={pid} elapsed_ns={}",
        started.elapsed().as_nanos()
    );
}
