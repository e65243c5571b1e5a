//! Per-agent series stay bounded under process churn: at most `--agent-series-max` agents
//! have them, a gone agent's are dropped after `--agent-series-retention-secs`, and a stall
//! stays in /metrics for that long even when its agent is evicted from the tracker.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use varta_e2e::{Daemon, parse_metrics, sender};

const CAP: usize = 500;
/// A scrape with `CAP` agents' series (beats, status, stalls, agent_info: about 300 bytes an
/// agent) and every fixed metric stays under this.
const SCRAPE_BOUND: usize = 256 * 1024;

/// Samples with a pid label, by metric name.
fn per_agent(body: &str) -> std::collections::HashMap<String, usize> {
    let mut by_name = std::collections::HashMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        if line.contains("pid=\"") {
            let name = line.split('{').next().unwrap().to_owned();
            *by_name.entry(name).or_default() += 1;
        }
    }
    by_name
}

#[test]
fn ten_thousand_short_lived_agents_never_leave_more_than_the_cap() {
    let d = Daemon::builder("series-churn", "userspace")
        .args(["--tracker-capacity", "65536", "--threshold-ms", "300"])
        .args(["--global-beat-rate", "0", "--max-beat-rate", "0"])
        .args(["--agent-series-max", &CAP.to_string()])
        .args(["--agent-series-retention-secs", "2"])
        .start();
    let done = Arc::new(AtomicBool::new(false));
    let (most, biggest) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let addr = d.prom.unwrap();
    let sampler = {
        let (done, most, biggest) = (done.clone(), most.clone(), biggest.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let (_, body) = varta_e2e::deploy::http_get(addr, "/metrics");
                biggest.fetch_max(body.len(), Ordering::Relaxed);
                let widest = per_agent(&body).into_values().max().unwrap_or(0);
                most.fetch_max(widest, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let socket = d.socket.to_str().unwrap().to_owned();
    let mut agents = 0;
    while agents < 10_000 {
        let (sent, _, _) = sender::send(&socket, &["churn", "0", "1000"]);
        agents += sent;
    }
    // Every agent tracked, then stalled, then gone: the aggregate counts all of them.
    let tracked = d.wait_metrics(
        "5,000 stalls and no agent with series left",
        Duration::from_secs(60),
        |m| {
            let stalls = m.get("varta_agent_stalls_total").copied().unwrap_or(0.0);
            let series = m.get("varta_agent_series").copied().unwrap_or(-1.0);
            match stalls >= 5_000.0 && series == 0.0 {
                true => Ok(stalls),
                false => Err(format!("{stalls} stalls, {series} agents with series")),
            }
        },
    );
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let m = d.metrics();
    assert!(
        m["varta_agent_series_overflow_total"] > 0.0,
        "{agents} agents, the cap was reached"
    );
    let most = most.load(Ordering::Relaxed);
    let biggest = biggest.load(Ordering::Relaxed);
    eprintln!(
        "{agents} agents forked, {tracked} stalls; at most {most} series of one per-agent metric, largest scrape {biggest} bytes"
    );
    assert!(most <= CAP, "{most} series of one per-agent metric > {CAP}");
    assert!(biggest < SCRAPE_BOUND, "a scrape of {biggest} bytes");
    let (_, body) = varta_e2e::deploy::http_get(addr, "/metrics");
    assert!(
        per_agent(&body).is_empty(),
        "gone agents' series dropped:\n{body}"
    );
    assert_eq!(
        parse_metrics(&body)["varta_agents{state=\"stalled\"}"],
        m["varta_agents{state=\"stalled\"}"]
    );
}

#[test]
fn a_stall_stays_in_metrics_after_its_agent_is_evicted() {
    let d = Daemon::builder("series-evicted", "userspace")
        .args(["--tracker-capacity", "1", "--threshold-ms", "300"])
        .start();
    let pid = d.stalled_agent(50);
    // A new agent takes the stalled one's place in the tracker.
    let other = d.agent(50);
    d.wait_log_all(
        &["event=agent_evicted", &format!("pid={pid}")],
        Duration::from_secs(10),
    );
    let m = d.metrics();
    assert_eq!(m[&format!("varta_stalls_total{{pid=\"{pid}\"}}")], 1.0);
    assert!(
        m.keys()
            .any(|k| k.starts_with("varta_agent_info{") && k.contains(&format!("pid=\"{pid}\""))),
        "the name the alert joins on is kept too"
    );
    assert_eq!(m["varta_agent_stalls_total"], 1.0);
    assert_eq!(m["varta_tracker_evicted_total"], 1.0);
    drop(other);
}

#[test]
fn a_gone_agents_series_are_dropped_after_the_retention() {
    let d = Daemon::builder("series-retention", "userspace")
        .args([
            "--threshold-ms",
            "300",
            "--agent-series-retention-secs",
            "1",
        ])
        .start();
    let pid = d.stalled_agent(50);
    let sample = format!("varta_stalls_total{{pid=\"{pid}\"}}");
    assert_eq!(d.metric(&sample), 1.0);
    d.wait_metrics("its series dropped", Duration::from_secs(10), |m| {
        match m.get(&sample) {
            None => Ok(()),
            Some(v) => Err(format!("{sample} {v}")),
        }
    });
    let m = d.metrics();
    assert_eq!(m["varta_agent_stalls_total"], 1.0, "the aggregate stays");
    assert_eq!(m["varta_agents{state=\"stalled\"}"], 1.0, "still tracked");
}
