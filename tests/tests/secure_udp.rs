//! Secure UDP against the real upstream client: `varta-client` 0.2.0 with its `secure-udp`
//! feature, in each key mode, on both datapaths; tampered and wrong-key frames are counted,
//! never tracked.

use std::{
    net::{SocketAddr, UdpSocket},
    os::unix::fs::PermissionsExt,
    path::Path,
    time::Duration,
};

use varta_client::{BeatOutcome, BeatTransport, Status, Varta};
use varta_e2e::{Daemon, log_field, on_both_datapaths, vectors};
use varta_vlp::crypto::Key;

const KEY_A: [u8; 32] = [0xa1; 32];
const KEY_B: [u8; 32] = [0xb2; 32];
const MASTER: [u8; 32] = [0x5e; 32];
const WAIT: Duration = Duration::from_secs(10);

fn key_file(dir: &Path, name: &str, keys: &[[u8; 32]]) -> String {
    let path = dir.join(name);
    let text: String = keys.iter().map(|k| vectors::hex_encode(k) + "\n").collect();
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_str().unwrap().to_owned()
}

/// A daemon listening for secure UDP with the key flags `keys` makes, and its UDP address.
fn daemon(name: &str, datapath: &str, keys: impl Fn(&Path) -> Vec<String>) -> (Daemon, SocketAddr) {
    let dir = varta_e2e::scratch(&format!("{name}-{datapath}-keys"));
    let b = Daemon::builder(name, datapath)
        .args(["--threshold-ms", "5000", "--udp-port", "0"])
        .args(keys(&dir));
    let d = b.start_checked();
    // The key files were read (once) at start.
    drop(dir);
    let ready = d.wait_log("event=ready", WAIT);
    let addr = log_field(&ready, "udp").parse().unwrap();
    (d, addr)
}

fn beats_of_this_process(d: &Daemon) -> f64 {
    let pid = std::process::id();
    d.metrics()
        .get(&format!("varta_beats_total{{pid=\"{pid}\"}}"))
        .copied()
        .unwrap_or(0.0)
}

/// Sends `n` beats with `client` and waits until the daemon has counted them all.
fn beat_and_count<T: BeatTransport>(d: &Daemon, client: &mut Varta<T>, n: usize) {
    let before = beats_of_this_process(d);
    for _ in 0..n {
        let outcome = client.beat(Status::Ok, 7);
        assert!(matches!(outcome, BeatOutcome::Sent), "{outcome:?}");
    }
    let pid = std::process::id();
    d.wait_metric(
        &format!("varta_beats_total{{pid=\"{pid}\"}}"),
        before + n as f64,
        WAIT,
    );
}

fn shared_key(datapath: &str) {
    let (d, addr) = daemon("secure-shared", datapath, |dir| {
        vec!["--key-file".into(), key_file(dir, "key", &[KEY_A])]
    });
    let mut client = Varta::connect_secure_udp(addr, Key::from_bytes(KEY_A)).unwrap();
    beat_and_count(&d, &mut client, 5);
    // A client with a key the daemon does not hold is refused and counted, never tracked.
    let mut stranger = Varta::connect_secure_udp(addr, Key::from_bytes(KEY_B)).unwrap();
    let before = beats_of_this_process(&d);
    assert!(matches!(stranger.beat(Status::Ok, 0), BeatOutcome::Sent));
    d.wait_metric("varta_frame_auth_failures_total", 1.0, WAIT);
    assert_eq!(beats_of_this_process(&d), before);
}

fn accepted_keys_rotation(datapath: &str) {
    let (d, addr) = daemon("secure-rotation", datapath, |dir| {
        vec![
            "--key-file".into(),
            key_file(dir, "key", &[KEY_A]),
            "--accepted-key-file".into(),
            key_file(dir, "accepted", &[KEY_B]),
        ]
    });
    let mut old = Varta::connect_secure_udp(addr, Key::from_bytes(KEY_A)).unwrap();
    beat_and_count(&d, &mut old, 3);
    let mut new = Varta::connect_secure_udp(addr, Key::from_bytes(KEY_B)).unwrap();
    beat_and_count(&d, &mut new, 3);
    assert_eq!(d.metric("varta_frame_auth_failures_total"), 0.0);
}

fn master_key(datapath: &str) {
    let (d, addr) = daemon("secure-master", datapath, |dir| {
        vec![
            "--master-key-file".into(),
            key_file(dir, "master", &[MASTER]),
        ]
    });
    let mut client = Varta::connect_secure_udp_with_master(addr, Key::from_bytes(MASTER)).unwrap();
    beat_and_count(&d, &mut client, 5);
}

/// Every byte of the conformance vectors' secure frames, flipped, is refused and counted;
/// the untouched frame is accepted; a replay of it is refused.
fn tampered_frames_are_counted(datapath: &str) {
    let secure = vectors::secure_vectors();
    let shared = secure
        .iter()
        .find(|v| v["kind"] == "shared_key_seal")
        .unwrap();
    let master = secure
        .iter()
        .find(|v| v["kind"] == "master_key_seal")
        .unwrap();
    let key = |v: &serde_json::Value, field: &str| -> [u8; 32] {
        vectors::hex_decode(v[field].as_str().unwrap())
            .try_into()
            .unwrap()
    };
    let (d, addr) = daemon("secure-tamper", datapath, |dir| {
        vec![
            "--key-file".into(),
            key_file(dir, "key", &[key(shared, "key_hex")]),
            "--master-key-file".into(),
            key_file(dir, "master", &[key(master, "master_key_hex")]),
        ]
    });
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut sent = 0.0;
    for v in [shared, master] {
        let wire = vectors::hex_decode(v["expected_wire_hex"].as_str().unwrap());
        for i in 0..wire.len() {
            let mut bad = wire.clone();
            bad[i] ^= 0x40;
            sock.send_to(&bad, addr).unwrap();
            sent += 1.0;
        }
    }
    d.wait_metric("varta_frame_auth_failures_total", sent, WAIT);
    assert_eq!(d.metric("varta_frame_auth_failures_total"), sent);
    // The vectors' frames are pid 2: accepted once each, then a replay is refused.
    for v in [shared, master] {
        let wire = vectors::hex_decode(v["expected_wire_hex"].as_str().unwrap());
        sock.send_to(&wire, addr).unwrap();
        sock.send_to(&wire, addr).unwrap();
    }
    d.wait_metric("varta_frames_dropped_total{reason=\"replay\"}", 2.0, WAIT);
}

/// Secure frames meet the per-agent rate limit on both datapaths (on eBPF the kernel never
/// sees them, so the daemon applies it).
fn secure_beats_are_rate_limited(datapath: &str) {
    let (d, addr) = daemon("secure-rate", datapath, |dir| {
        vec![
            "--key-file".into(),
            key_file(dir, "key", &[KEY_A]),
            "--max-beat-rate".into(),
            "5".into(),
        ]
    });
    let mut client = Varta::connect_secure_udp(addr, Key::from_bytes(KEY_A)).unwrap();
    for _ in 0..50 {
        let outcome = client.beat(Status::Ok, 0);
        assert!(matches!(outcome, BeatOutcome::Sent), "{outcome:?}");
    }
    d.wait_metric("varta_rate_limited_total{reason=\"per_pid\"}", 1.0, WAIT);
}

/// A port that accepts only secure frames refuses plaintext ones, whatever keys it holds: a
/// plain beat and then the panic-terminal frame claiming a pid are dropped as `plaintext`
/// (in the kernel on eBPF), never tracked, never an exit, never a recovery.
fn plaintext_to_a_secure_only_port(datapath: &str) {
    type Keys = fn(&Path) -> Vec<String>;
    let modes: [(&str, Keys); 3] = [
        ("shared", |dir| {
            vec!["--key-file".into(), key_file(dir, "key", &[KEY_A])]
        }),
        ("master", |dir| {
            vec![
                "--master-key-file".into(),
                key_file(dir, "master", &[MASTER]),
            ]
        }),
        ("both", |dir| {
            vec![
                "--key-file".into(),
                key_file(dir, "key", &[KEY_A]),
                "--master-key-file".into(),
                key_file(dir, "master", &[MASTER]),
            ]
        }),
    ];
    const CLAIMED: u32 = 31_999;
    for (mode, keys) in modes {
        let (d, addr) = daemon(&format!("plain-to-secure-{mode}"), datapath, |dir| {
            let mut args = keys(dir);
            args.extend([
                "--recovery-exec".into(),
                "/bin/true {pid}".into(),
                "--secure-udp-i-accept-recovery-on-unauthenticated-transport".into(),
            ]);
            args
        });
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.send_to(&varta_e2e::frame(CLAIMED, 1), addr).unwrap();
        sock.send_to(&varta_e2e::panic_terminal_frame(CLAIMED), addr)
            .unwrap();
        d.wait_metric(
            "varta_frames_dropped_total{reason=\"plaintext\"}",
            2.0,
            WAIT,
        );
        // A sealed frame after them is still accepted: the port works, it only refused.
        let mut client = Varta::connect_secure_udp(addr, Key::from_bytes(KEY_A)).unwrap();
        if mode != "master" {
            beat_and_count(&d, &mut client, 1);
        }
        assert_eq!(
            d.metric("varta_frames_dropped_total{reason=\"plaintext\"}"),
            2.0,
            "{mode}"
        );
        for event in ["agent_new", "exit", "recovery_started"] {
            assert!(
                d.matching_logs(&[&format!("event={event}"), &format!("pid={CLAIMED}")])
                    .is_empty(),
                "{mode}: {event} for the plaintext claim:\n{}",
                d.log_text()
            );
        }
        assert!(
            !d.metrics()
                .contains_key(&format!("varta_beats_total{{pid=\"{CLAIMED}\"}}")),
            "{mode}"
        );
    }
}

/// A captured secure session replayed after the observer restarts (L7), by a stop and a
/// start and by a takeover: every frame is refused as a replay and counted, none is a beat
/// (the first, nonce 1, would otherwise pass as the agent's restart).
fn a_capture_replayed_after_a_restart_is_refused(datapath: &str) {
    let dir = varta_e2e::scratch(&format!("secure-replay-{datapath}-keys"));
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let args = vec![
        "--threshold-ms".to_owned(),
        "60000".into(),
        "--udp-port".into(),
        port.to_string(),
        "--key-file".into(),
        key_file(&dir, "key", &[KEY_A]),
    ];
    let start = |b: varta_e2e::DaemonBuilder| b.args(args.clone()).start_checked();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // The capture: the client beats to a tap, which passes each frame on.
    let tap = UdpSocket::bind("127.0.0.1:0").unwrap();
    tap.set_read_timeout(Some(WAIT)).unwrap();
    let mut client =
        Varta::connect_secure_udp(tap.local_addr().unwrap(), Key::from_bytes(KEY_A)).unwrap();
    let mut d = start(Daemon::builder("secure-replay", datapath));
    let mut captured = Vec::new();
    for _ in 0..3 {
        assert!(matches!(client.beat(Status::Ok, 7), BeatOutcome::Sent));
        let mut buf = [0u8; 128];
        let n = tap.recv(&mut buf).unwrap();
        captured.push(buf[..n].to_vec());
    }
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    for frame in &captured {
        sock.send_to(frame, addr).unwrap();
    }
    let pid = std::process::id();
    let beats = format!("varta_beats_total{{pid=\"{pid}\"}}");
    d.wait_metric(&beats, 3.0, WAIT);
    let replay = "varta_frames_dropped_total{reason=\"replay\"}";
    let replayed_to = |d: &Daemon, how: &str| {
        let (b0, r0) = (d.metric(&beats), d.metric(replay));
        for frame in &captured {
            sock.send_to(frame, addr).unwrap();
        }
        d.wait_metric(replay, r0 + 3.0, WAIT);
        assert_eq!(d.metric(&beats), b0, "{how}: a replayed frame was a beat");
        assert_eq!(
            d.count_logs(&["event=agent_restarted", &format!("pid={pid}")]),
            0,
            "{how}: {}",
            d.log_text()
        );
    };
    assert!(d.stop().success(), "{}", d.log_text());
    let d2 = start(Daemon::builder("secure-replay", datapath).in_dir(d.into_dir()));
    replayed_to(&d2, "stop, then start");
    let mut d2 = d2;
    let d3 = start(Daemon::builder("secure-replay", datapath).beside(&d2));
    assert!(d2.wait_exit(WAIT).success(), "{}", d2.log_text());
    replayed_to(&d3, "takeover");
    drop(dir);
}

on_both_datapaths!(
    plaintext_to_a_secure_only_port,
    secure_beats_are_rate_limited,
    shared_key,
    accepted_keys_rotation,
    master_key,
    tampered_frames_are_counted,
    a_capture_replayed_after_a_restart_is_refused
);

/// Opening secure UDP beyond loopback is said at start, once; on loopback nothing is said.
#[test]
fn secure_udp_beyond_loopback_is_announced() {
    let (wide, _) = daemon("secure-wide", "userspace", |dir| {
        vec![
            "--key-file".into(),
            key_file(dir, "key", &[KEY_A]),
            "--udp-bind-addr".into(),
            "0.0.0.0".into(),
            "--i-accept-secure-udp-non-loopback".into(),
        ]
    });
    assert_eq!(
        wide.count_logs(&["event=secure_udp_non_loopback", "addr=0.0.0.0:0"]),
        1,
        "{}",
        wide.log_text()
    );
    let (local, _) = daemon("secure-local", "userspace", |dir| {
        vec!["--key-file".into(), key_file(dir, "key", &[KEY_A])]
    });
    assert_eq!(local.count_logs(&["event=secure_udp_non_loopback"]), 0);
}
