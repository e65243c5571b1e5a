//! An agent built on the upstream Rust client `varta-client` 0.2.0 at its default settings:
//! it connects once and beats every `INTERVAL_MS` (it never reconnects on its own).
//! `upstream_agent SOCKET INTERVAL_MS`.

use std::time::Duration;

use varta_client::{Status, Varta};

fn main() {
    let mut args = std::env::args().skip(1);
    let socket = args
        .next()
        .expect("usage: upstream_agent SOCKET INTERVAL_MS");
    let interval: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let mut client = loop {
        match Varta::connect(&socket) {
            Ok(c) => break c,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    loop {
        let _ = client.beat(Status::Ok, 0);
        std::thread::sleep(Duration::from_millis(interval));
    }
}
