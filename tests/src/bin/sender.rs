//! A test sender: `varta-sender <socket|udp:ADDR> <mode> [count] [arg]`.
//! Modes: `hex HEX` (send one datagram COUNT times), `flood` (valid frames of our own pid
//! with rising nonces, COUNT of them, or for ARG milliseconds when COUNT is 0), `forge PID`
//! (one valid frame claiming PID), `dying` (one beat, then the panic-terminal frame).
//! Prints what it sent and for how long.

use std::{net::UdpSocket, os::unix::net::UnixDatagram, time::Instant};

enum Out {
    Uds(UnixDatagram, String),
    Udp(UdpSocket),
}

impl Out {
    fn send(&self, b: &[u8]) {
        let _ = match self {
            Out::Uds(s, path) => s.send_to(b, path),
            Out::Udp(s) => s.send(b),
        };
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
        other => panic!("unknown mode {other}"),
    }
    println!(
        "sent={sent} pid={pid} elapsed_ns={}",
        started.elapsed().as_nanos()
    );
}
