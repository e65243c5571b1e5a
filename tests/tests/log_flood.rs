//! A flood of one kind of log line (a tracked agent sending Critical frames as fast as it
//! can) is counted, not written: its lines stop at the kind's burst, the rest show in
//! `varta_log_suppressed_total{event}` and one `event=log_suppressed` line, and other kinds
//! (a stall) are still written.

use std::time::Duration;

use varta_common::{Frame, Status};
use varta_e2e::{Daemon, on_both_datapaths};

const WAIT: Duration = Duration::from_secs(10);
const FRAMES: u64 = 2000;

fn critical(pid: u32, nonce: u64) -> [u8; 32] {
    Frame {
        status: Status::Critical,
        pid,
        timestamp: 1,
        nonce,
        payload: 0,
    }
    .encode()
}

fn a_flood_of_one_kind_is_counted_not_written(datapath: &str) {
    let d = Daemon::builder("log-flood", datapath)
        .args(["--threshold-ms", "300", "--max-beat-rate", "0"])
        .start();
    let me = std::process::id();
    for nonce in 1..=FRAMES {
        d.send(&critical(me, nonce));
    }
    let suppressed = "varta_log_suppressed_total{event=\"critical\"}";
    d.wait_metric(suppressed, 1.0, WAIT);
    // The stall of this silent agent is still written.
    d.wait_log_all(&["event=stall", &format!("pid={me}")], WAIT);
    let written = d.count_logs(&["event=critical"]) as f64;
    let counted = d.metric(suppressed);
    assert!(
        written < FRAMES as f64 / 2.0,
        "{written} critical lines written"
    );
    let beats = d.metric(&format!("varta_criticals_total{{pid=\"{me}\"}}"));
    assert_eq!(
        written + counted,
        beats,
        "every critical frame written or counted"
    );
    // The next line of that kind says how many were left out before it.
    d.send(&critical(me, FRAMES + 1));
    let note = d.wait_log_all(&["event=log_suppressed", "kind=critical"], WAIT);
    assert!(
        varta_e2e::log_field(&note, "lines").parse::<f64>().unwrap() >= 1.0,
        "{note}"
    );
}

on_both_datapaths!(a_flood_of_one_kind_is_counted_not_written);
