//! What `top` shows, read from scrapes: one [`Snapshot`] per scrape, and the [`Model`] that
//! remembers enough between scrapes for rates and last-beat ages. Works with our metric
//! names and the incumbent 0.2.0's (the same `varta_*_total` families, minus the ones only
//! we export).

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

use super::scrape::Sample;
use crate::vocab::drops::INCUMBENT_DROPS;

/// `varta_status` of a stalled agent.
const STATUS_STALL: f64 = 3.0;

/// Identity labels of `varta_agent_info`, in the order shown (`pod` for observers that
/// name it so).
const IDENTITY: [&str; 5] = ["comm", "unit", "pod", "pod_uid", "container_id"];

#[derive(Debug, Default, Clone)]
pub struct AgentSample {
    pub beats: f64,
    pub status: Option<f64>,
    pub stalls: f64,
    pub exits: f64,
    /// From a `varta_agent_last_beat_age_seconds` gauge, when the observer has one.
    pub age: Option<f64>,
    pub identity: String,
}

/// One scrape, interpreted.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// `varta_datapath_info`'s labels (mode, attest, ...); None for the incumbent.
    pub datapath: Option<Vec<(String, String)>>,
    pub tracked: Option<f64>,
    pub uptime: Option<f64>,
    pub agents: BTreeMap<u32, AgentSample>,
    pub drops: BTreeMap<String, f64>,
}

impl Snapshot {
    pub fn from_samples(samples: &[Sample]) -> Snapshot {
        let mut s = Snapshot::default();
        let mut ours_drops = false;
        for m in samples {
            let pid = m.label("pid").and_then(|p| p.parse::<u32>().ok());
            match (m.name.as_str(), pid) {
                ("varta_datapath_info", _) => s.datapath = Some(m.labels.clone()),
                ("varta_watch_pids_tracked", _) => s.tracked = Some(m.value),
                ("varta_watch_uptime_seconds", _) => s.uptime = Some(m.value),
                ("varta_beats_total", Some(p)) => s.agent(p).beats = m.value,
                ("varta_status", Some(p)) => s.agent(p).status = Some(m.value),
                ("varta_stalls_total", Some(p)) => s.agent(p).stalls = m.value,
                ("varta_exits_total", Some(p)) => s.agent(p).exits = m.value,
                ("varta_agent_last_beat_age_seconds", Some(p)) => s.agent(p).age = Some(m.value),
                ("varta_agent_info", Some(p)) => s.agent(p).identity = identity(m),
                ("varta_frames_dropped_total", _) => {
                    ours_drops = true;
                    let reason = m.label("reason").unwrap_or("?");
                    *s.drops.entry(reason.to_owned()).or_default() += m.value;
                }
                _ => {}
            }
        }
        if !ours_drops {
            s.drops = incumbent_drops(samples);
        }
        s
    }

    fn agent(&mut self, pid: u32) -> &mut AgentSample {
        self.agents.entry(pid).or_default()
    }

    pub fn total_beats(&self) -> f64 {
        self.agents.values().map(|a| a.beats).sum()
    }

    pub fn total_stalls(&self) -> f64 {
        self.agents.values().map(|a| a.stalls).sum()
    }

    pub fn total_exits(&self) -> f64 {
        self.agents.values().map(|a| a.exits).sum()
    }
}

fn identity(m: &Sample) -> String {
    IDENTITY
        .iter()
        .filter_map(|k| {
            let v = m.label(k).filter(|v| !v.is_empty())?;
            // A container id is recognisable by its first 12 hex digits, as docker shows it.
            let v = if *k == "container_id" {
                &v[..v.len().min(12)]
            } else {
                v
            };
            Some(format!("{k}={v}"))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The incumbent has no `varta_frames_dropped`: its separate counters, by the same reasons.
fn incumbent_drops(samples: &[Sample]) -> BTreeMap<String, f64> {
    let mut drops = BTreeMap::new();
    for m in samples {
        let reason = match m.name.as_str() {
            "varta_decode_errors_total" => format!("decode_{}", m.label("kind").unwrap_or("?")),
            "varta_rate_limited_total" => format!("rate_{}", m.label("reason").unwrap_or("?")),
            name => match INCUMBENT_DROPS
                .iter()
                .find(|(n, ..)| name.strip_suffix("_total") == Some(*n))
            {
                Some((.., reasons)) => reasons[0].name().to_owned(),
                None => continue,
            },
        };
        *drops.entry(reason).or_default() += m.value;
    }
    drops
}

/// One agent as shown: a row of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub pid: u32,
    pub status: &'static str,
    /// Seconds since its last beat; `at_least` when no beat was seen since `top` started.
    pub age: Option<(f64, bool)>,
    pub beats: f64,
    pub stalls: f64,
    pub exits: f64,
    pub identity: String,
    pub stalled: bool,
}

fn status_name(status: Option<f64>, exits: f64) -> &'static str {
    match status {
        // Its last frame was the panic-terminal one.
        Some(2.0) if exits > 0.0 => "EXITED",
        Some(0.0) => "ok",
        Some(1.0) => "degraded",
        Some(2.0) => "critical",
        Some(STATUS_STALL) => "STALLED",
        _ => "?",
    }
}

/// Beats/s history points kept for the sparkline.
const HISTORY: usize = 120;

/// Scrapes so far: the latest snapshot, when each agent's beat counter last moved, and the
/// beats/s history.
#[derive(Debug, Default)]
pub struct Model {
    pub latest: Option<Snapshot>,
    taken: Option<Instant>,
    /// pid -> (beat count, when it was first seen at that count, whether it moved since
    /// `top` started watching it).
    seen: BTreeMap<u32, (f64, Instant, bool)>,
    pub rates: VecDeque<u64>,
    pub error: Option<String>,
}

impl Model {
    pub fn update(&mut self, snap: Snapshot, now: Instant) {
        if let (Some(prev), Some(taken)) = (&self.latest, self.taken) {
            let dt = now.duration_since(taken).max(Duration::from_millis(1));
            let delta = (snap.total_beats() - prev.total_beats()).max(0.0);
            self.rates
                .push_back((delta / dt.as_secs_f64()).round() as u64);
            if self.rates.len() > HISTORY {
                self.rates.pop_front();
            }
        }
        self.seen.retain(|pid, _| snap.agents.contains_key(pid));
        for (pid, a) in &snap.agents {
            let entry = self.seen.entry(*pid).or_insert((a.beats, now, false));
            if entry.0 != a.beats {
                *entry = (a.beats, now, true);
            }
        }
        self.latest = Some(snap);
        self.taken = Some(now);
        self.error = None;
    }

    pub fn beats_per_sec(&self) -> Option<u64> {
        self.rates.back().copied()
    }

    /// The agents, stalest first (stalled ones lead, then the longest silent).
    pub fn rows(&self, now: Instant) -> Vec<Row> {
        let Some(snap) = &self.latest else {
            return Vec::new();
        };
        let mut rows: Vec<Row> = snap
            .agents
            .iter()
            .map(|(pid, a)| {
                let derived = self
                    .seen
                    .get(pid)
                    .map(|(_, at, moved)| (now.duration_since(*at).as_secs_f64(), !moved));
                Row {
                    pid: *pid,
                    status: status_name(a.status, a.exits),
                    age: a.age.map(|s| (s, false)).or(derived),
                    beats: a.beats,
                    stalls: a.stalls,
                    exits: a.exits,
                    identity: a.identity.clone(),
                    stalled: a.status == Some(STATUS_STALL),
                }
            })
            .collect();
        let age = |r: &Row| r.age.map_or(0.0, |(s, _)| s);
        rows.sort_by(|a, b| {
            b.stalled
                .cmp(&a.stalled)
                .then(age(b).total_cmp(&age(a)))
                .then(a.pid.cmp(&b.pid))
        });
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::super::scrape::parse;
    use super::*;

    const OURS: &str = "varta_datapath_info{mode=\"ebpf\",attest=\"pidfd\"} 1\n\
        varta_watch_pids_tracked 2\nvarta_beats_total{pid=\"10\"} 5\n\
        varta_beats_total{pid=\"11\"} 7\nvarta_status{pid=\"10\"} 0\nvarta_status{pid=\"11\"} 3\n\
        varta_stalls_total{pid=\"11\"} 1\nvarta_exits_total{pid=\"10\"} 0\n\
        varta_agent_info{pid=\"10\",comm=\"nginx\",unit=\"nginx.service\",container_id=\"0123456789abcdef\",pod_uid=\"\"} 1\n\
        varta_frames_dropped_total{reason=\"spoof\"} 2\nvarta_frames_dropped_total{reason=\"length\"} 0\n\
        varta_frame_auth_failures_total 2\n";

    const INCUMBENT: &str = "varta_watch_pids_tracked 1\nvarta_beats_total{pid=\"9\"} 3\n\
        varta_status{pid=\"9\"} 0\nvarta_decode_errors_total{kind=\"bad_magic\"} 4\n\
        varta_rate_limited_total{reason=\"per_pid\"} 1\nvarta_frame_auth_failures_total 2\n";

    #[test]
    fn our_metrics() {
        let s = Snapshot::from_samples(&parse(OURS));
        let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        assert_eq!(
            s.datapath,
            Some(vec![pair("mode", "ebpf"), pair("attest", "pidfd")])
        );
        assert_eq!(s.tracked, Some(2.0));
        assert_eq!(
            s.agents[&10].identity,
            "comm=nginx unit=nginx.service container_id=0123456789ab"
        );
        assert_eq!(s.total_stalls(), 1.0);
        // Ours: the drops by reason, not counted again under the incumbent's names.
        assert_eq!(s.drops.get("spoof"), Some(&2.0));
        assert_eq!(s.drops.len(), 2);
    }

    #[test]
    fn incumbent_metrics() {
        let s = Snapshot::from_samples(&parse(INCUMBENT));
        assert_eq!(s.datapath, None);
        assert_eq!(s.agents[&9].beats, 3.0);
        assert_eq!(s.drops.get("decode_bad_magic"), Some(&4.0));
        assert_eq!(s.drops.get("rate_per_pid"), Some(&1.0));
        assert_eq!(s.drops.get("spoof"), Some(&2.0));
    }

    #[test]
    fn rates_ages_and_order() {
        let t0 = Instant::now();
        let mut m = Model::default();
        m.update(Snapshot::from_samples(&parse(OURS)), t0);
        let later = OURS.replace("{pid=\"10\"} 5", "{pid=\"10\"} 25");
        let t1 = t0 + Duration::from_secs(2);
        m.update(Snapshot::from_samples(&parse(&later)), t1);
        assert_eq!(m.beats_per_sec(), Some(10));
        let rows = m.rows(t1 + Duration::from_secs(1));
        // The stalled agent first; the one that beat at t1 is 1 s old, a known age.
        assert_eq!(
            (rows[0].pid, rows[0].status, rows[0].stalled),
            (11, "STALLED", true)
        );
        assert_eq!(rows[1].age, Some((1.0, false)));
        // Never seen beating since top started: an age of at least 3 s.
        assert_eq!(rows[0].age, Some((3.0, true)));
    }
}
