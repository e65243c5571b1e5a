//! The userspace datapath drops junk in the kernel too: a classic BPF filter built from
//! the decode rules (`varta_common::cbpf`) is attached to its socket, without privilege.
//! While junk is rare every junk frame reaches the daemon and is counted exactly; under a
//! flood the filter lets one in `--userspace-junk-sample-one-in` through, each counted as
//! that many (estimates, said by `varta_junk_sample_one_in`), and when the flood is over
//! the counts are exact again.

use std::time::Duration;

use varta_e2e::{
    Daemon, frame, hex_encode,
    sender::{sender, summary},
};

#[test]
fn junk_flood_is_dropped_in_the_kernel_and_sampled_on_the_userspace_datapath() {
    // As root, the queue of 513 the systemd unit and the overlay give the socket (read by
    // the kernel when the socket is made; put back once the daemon runs): what the exact
    // filter let up is still queued when the flood switches it to sampling, each frame
    // then counted as one, not as a sample.
    let d = {
        let _qlen = varta_e2e::is_root()
            .then(|| varta_e2e::Sysctl::set("/proc/sys/net/unix/max_dgram_qlen", 512).unwrap());
        Daemon::builder("junk-classic", "userspace")
            .args(["--threshold-ms", "1000"])
            .start()
    };
    d.wait_log_all(
        &[
            "event=classic_filter_attached",
            "socket=uds",
            "sample_one_in=1",
        ],
        Duration::from_secs(5),
    );
    let agent = d.agent(100);
    let beats = format!("varta_beats_total{{pid=\"{}\"}}", agent.pid());
    d.wait_metric(&beats, 1.0, Duration::from_secs(5));

    let mut bad_crc = frame(std::process::id(), 1);
    bad_crc[31] ^= 0xff;
    const EACH: u64 = 50_000;
    const SENDERS: u64 = 4;
    let socket = d.socket.to_str().unwrap().to_owned();
    let flood: Vec<_> = (0..SENDERS)
        .map(|_| sender(&socket, &["hex", &EACH.to_string(), &hex_encode(&bad_crc)]))
        .collect();
    let mut sent = 0;
    for s in flood {
        sent += summary(s).0;
    }
    assert_eq!(sent, EACH * SENDERS);
    // Two more honest beats: what the flood left queued has been read by then.
    let before = d.metric(&beats);
    d.wait_metric(&beats, before + 2.0, Duration::from_secs(5));

    d.wait_log_all(
        &["event=junk_counting", "mode=sampled", "sample_one_in=1024"],
        Duration::from_secs(5),
    );
    assert_eq!(d.metric("varta_junk_sample_one_in"), 1024.0);
    // Exact until the switch, then each sample counts for 1,024: an estimate of the flood.
    // ~195 samples of 1,024 (a standard deviation of ~7 %) and the exact count before.
    let estimate = d.metric("varta_decode_errors_total{kind=\"bad_crc\"}");
    println!("{estimate} bad-CRC frames estimated out of {sent}");
    assert!(
        estimate > sent as f64 * 0.6 && estimate < sent as f64 * 1.4,
        "{estimate} bad-CRC frames estimated out of {sent}"
    );
    assert_eq!(d.count_logs(&["event=stall"]), 0, "{}", d.log_text());
    assert_eq!(
        d.metric("varta_frames_dropped_total{reason=\"rate_global\"}"),
        0.0
    );
    // Quiet again: exact counts come back.
    d.wait_log_all(
        &["event=junk_counting", "mode=exact", "sample_one_in=1"],
        Duration::from_secs(20),
    );
    assert_eq!(d.metric("varta_junk_sample_one_in"), 1.0);
    drop(agent);
}

/// A misconfigured client's few bad frames are each counted, on both datapaths, as the
/// incumbent counts them.
fn rare_junk_is_counted_exactly(datapath: &str) {
    let d = Daemon::builder("junk-rare", datapath)
        .args(["--threshold-ms", "1000"])
        .start();
    let mut bad_magic = frame(std::process::id(), 1);
    bad_magic[0] = b'X';
    for _ in 0..5 {
        d.send(&bad_magic);
    }
    d.wait_metric(
        "varta_decode_errors_total{kind=\"bad_magic\"}",
        5.0,
        Duration::from_secs(5),
    );
    assert_eq!(
        d.metric("varta_decode_errors_total{kind=\"bad_magic\"}"),
        5.0
    );
    assert_eq!(d.metric("varta_junk_sample_one_in"), 1.0);
}

varta_e2e::on_both_datapaths!(rare_junk_is_counted_exactly);

/// UDP datagrams the kernel drops because the daemon's socket queue is full (the daemon
/// stopped here; on the userspace datapath it drains on a timer under load) are counted as
/// `queue_full`: every frame sent is either a beat or such a drop.
#[test]
fn a_full_udp_queue_is_counted_on_the_userspace_datapath() {
    let d = Daemon::builder("udp-queue-full", "userspace")
        .args(["--threshold-ms", "60000", "--udp-port", "0"])
        .args(["--i-accept-plaintext-udp", "--max-beat-rate", "0"])
        .args(["--global-beat-rate", "0"])
        .start();
    let ready = d.wait_log("event=ready", Duration::from_secs(5));
    let udp: std::net::SocketAddr = varta_e2e::log_field(&ready, "udp").parse().unwrap();
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let pid = std::process::id();
    let beats = format!("varta_beats_total{{pid=\"{pid}\"}}");
    let full = "varta_frames_dropped_total{reason=\"queue_full\"}";
    sock.send_to(&frame(pid, 1), udp).unwrap();
    d.wait_metric(&beats, 1.0, Duration::from_secs(5));
    assert_eq!(d.metric(full), 0.0);

    // Far more than the socket's receive buffer holds, while nothing reads it.
    const SENT: u64 = 5_000;
    d.signal(libc::SIGSTOP);
    for nonce in 2..2 + SENT {
        sock.send_to(&frame(pid, nonce), udp).unwrap();
    }
    d.signal(libc::SIGCONT);
    let sent = 1 + SENT;
    let settled = d.wait_metrics(
        "every frame a beat or a queue_full drop",
        Duration::from_secs(10),
        |m| {
            let (b, f) = (m.get(&beats).copied(), m.get(full).copied());
            match (b, f) {
                (Some(b), Some(f)) if b + f == sent as f64 => Ok((b, f)),
                _ => Err(format!("beats {b:?}, queue_full {f:?}, of {sent}")),
            }
        },
    );
    assert!(settled.1 > 0.0 && settled.0 > 1.0, "{settled:?}");
}
