//! The userspace datapath drops junk in the kernel too: a classic BPF filter built from
//! the decode rules (`varta_common::cbpf`) is attached to its socket, without privilege,
//! and lets one junk frame in `--userspace-junk-sample-one-in` through to be counted.

use std::time::Duration;

use varta_e2e::{
    Daemon, frame, hex_encode,
    sender::{sender, summary},
};

#[test]
fn junk_flood_is_dropped_in_the_kernel_and_sampled_on_the_userspace_datapath() {
    let d = Daemon::builder("junk-classic", "userspace")
        .args(["--threshold-ms", "1000"])
        .start();
    d.wait_log_all(
        &[
            "event=classic_filter_attached",
            "socket=uds",
            "sample_one_in=1024",
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

    let sampled = d.metric("varta_decode_errors_total{kind=\"bad_crc\"}");
    let expected = sent as f64 / 1024.0;
    assert!(
        sampled > 0.0 && sampled < expected * 4.0,
        "{sampled} bad-CRC frames reached the daemon out of {sent} (about {expected} expected)"
    );
    assert_eq!(d.count_logs(&["event=stall"]), 0, "{}", d.log_text());
    assert_eq!(
        d.metric("varta_frames_dropped_total{reason=\"rate_global\"}"),
        0.0
    );
    drop(agent);
}
