//! Prometheus metrics, updated as events happen. Drop and decode counters are collected at
//! scrape time from the daemon's counters plus, with the eBPF datapath, the program's
//! per-CPU counters.

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::Instant,
};

use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
        text::encode,
    },
    metrics::{
        MetricType, counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge,
        gauge::Gauge,
    },
    registry::Registry,
};
use varta_common::{DecodeError, DropReason, cbpf};

use crate::vocab::drops::{DropCounters, INCUMBENT_DROPS, KernelDrops};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PidLabel {
    pub pid: u32,
}

/// `varta_agent_info`: an agent named the way operators know it (empty = unknown).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentInfoLabel {
    pub pid: u32,
    pub comm: LabelText,
    pub unit: LabelText,
    pub container_id: LabelText,
    pub pod_uid: LabelText,
}

/// A label value that came from outside (a process name, a cgroup path), written with the
/// exposition format's escapes: prometheus-client writes `String` label values verbatim, so
/// one `"` or newline in a process name would break every scrape of the node.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct LabelText(pub String);

impl EncodeLabelValue for LabelText {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        use fmt::Write;
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DatapathLabels {
    pub mode: &'static str,
    pub attest: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignalLabel {
    pub signal: &'static str,
}

#[derive(Default)]
pub struct Metrics {
    registry: Registry,
    pub beats: Family<PidLabel, Counter>,
    pub stalls: Family<PidLabel, Counter>,
    pub status: Family<PidLabel, Gauge>,
    pub exits: Family<PidLabel, Counter>,
    pub criticals: Family<PidLabel, Counter>,
    pub agent_info: Family<AgentInfoLabel, Gauge>,
    /// The aggregates that survive every per-agent bound (no pid label).
    pub agents: Family<StateLabel, Gauge>,
    pub agent_stalls: Counter,
    pub agent_exits: Counter,
    /// Agents with per-agent series now, and agents refused them (the cap was reached).
    pub agent_series: Gauge,
    pub agent_series_overflow: Counter,
    pub recovery_outcomes: Family<OutcomeLabel, Counter>,
    pub recovery_refused: Family<ReasonLabel, Counter>,
    pub recovery_suppressed: Family<ReasonLabel, Counter>,
    pub prom_auth_failures: Counter,
    pub evicted: Counter,
    pub restarts: Counter,
    pub nonce_wraps: Counter,
    pub pids_tracked: Gauge,
    pub pid_max: Gauge,
    pub signals: Family<SignalLabel, Counter>,
    pub rcvbuf_bytes: Gauge,
    pub delivered: Counter,
    pub held: Counter,
    /// The export and audit files (`sink`).
    pub files: crate::actions::sink::FileMetrics,
    kernel_drops: Arc<Mutex<Option<KernelDrops>>>,
}

/// Registers each field of `Metrics` under its name and help: one row per metric, in
/// exposition order.
macro_rules! register {
    ($m:ident; $($field:ident: $name:literal, $help:literal;)*) => {
        $($m.registry.register($name, $help, $m.$field.clone());)*
    };
}

impl Metrics {
    pub fn new(
        drops: Arc<DropCounters>,
        datapath: &'static str,
        attest: &'static str,
        capacity: usize,
    ) -> Self {
        let mut m = Metrics::default();
        register! {
            m;
            beats: "varta_beats",
                "Accepted beats per agent";
            stalls: "varta_stalls",
                "Stalls surfaced per agent";
            status: "varta_status",
                "Last status per agent (0 ok, 1 degraded, 2 critical, 3 stall)";
            exits: "varta_exits",
                "Panic-terminal frames (agent dying) per agent";
            agent_info: "varta_agent_info",
                "One series per tracked agent: its command, systemd unit, container and pod";
            agents: "varta_agents",
                "Agents tracked now, by state (live, stalled, dead: sent the panic-terminal frame); no pid, so it survives --agent-series-max";
            agent_stalls: "varta_agent_stalls",
                "Stalls surfaced, all agents together (counted also for agents beyond --agent-series-max)";
            agent_exits: "varta_agent_exits",
                "Panic-terminal frames, all agents together (counted also for agents beyond --agent-series-max)";
            agent_series: "varta_agent_series",
                "Agents with per-agent series (pid label) in this exposition now, at most --agent-series-max";
            agent_series_overflow: "varta_agent_series_overflow",
                "New agents given no per-agent series because --agent-series-max agents had them (counted in the aggregates only)";
            criticals: "varta_criticals",
                "Critical beats per agent";
            recovery_outcomes: "varta_recovery_outcomes",
                "Recovery commands by outcome";
            recovery_refused: "varta_recovery_refused",
                "Recoveries refused, by reason";
            recovery_suppressed: "varta_recovery_suppressed",
                "Recoveries not run: a limit bit (global: max_running, spawn_rate; the agent's uid, or its pod: uid_max_running, uid_spawn_rate; one-shot agents: one_shot_max_running, one_shot_spawn_rate), or the agent was never seen beating (unknown_agent)";
            prom_auth_failures: "varta_prom_auth_failures",
                "Scrapes refused for a missing or wrong bearer token";
            evicted: "varta_tracker_evicted",
                "Agents evicted to make room for new ones";
            restarts: "varta_agent_restarts",
                "Agents that started a new session (nonce 1) under a known pid";
            nonce_wraps: "varta_nonce_wrap",
                "Agents whose nonce wrapped past u64::MAX";
            pids_tracked: "varta_watch_pids_tracked",
                "Agents tracked now";
            pid_max: "varta_pid_max_current",
                "The kernel's pid_max as last read";
            signals: "varta_signals_received",
                "Signals handled, by signal";
            delivered: "varta_datapath_beats_delivered",
                "Valid, attested frames the datapath handed to the daemon's pipeline";
            held: "varta_datapath_beats_held",
                "Of those, routine beats the eBPF filter counted in the kernel instead of queueing each";
            rcvbuf_bytes: "varta_observer_uds_rcvbuf_bytes",
                "SO_RCVBUF the kernel granted the observer socket";
        }
        for state in ["live", "stalled", "dead"] {
            m.agents.get_or_create(&StateLabel { state }).set(0);
        }
        m.files.register(&mut m.registry);
        let info = Family::<DatapathLabels, Gauge>::default();
        info.get_or_create(&DatapathLabels {
            mode: datapath,
            attest,
        })
        .set(1);
        m.registry.register(
            "varta_datapath_info",
            "The active datapath (mode: ebpf or userspace) and how it attests senders (attest: pid_tgid_helper, task_read or scm_credentials)",
            info,
        );
        let capacity_gauge = Gauge::<i64>::default();
        capacity_gauge.set(capacity as i64);
        m.registry.register(
            "varta_tracker_capacity",
            "Most agents tracked at once",
            capacity_gauge,
        );
        m.registry.register_collector(Box::new(DropCollector {
            drops,
            kernel: m.kernel_drops.clone(),
            started: Instant::now(),
        }));
        m.registry.register_collector(Box::new(LogCollector));
        m
    }

    /// Adds the eBPF program's counters to every drop and decode metric.
    pub fn set_kernel_drops(&self, read: KernelDrops) {
        self.kernel_drops.lock().expect("poisoned").replace(read);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// `varta_log_suppressed_total{event}`: lines the logger counted instead of writing.
#[derive(Debug)]
struct LogCollector;

impl Collector for LogCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let mut family = encoder.encode_descriptor(
            "varta_log_suppressed",
            "Log lines not written (over their event kind's rate), by event kind",
            None,
            MetricType::Counter,
        )?;
        for (event, n) in crate::sys::logger::suppressed() {
            ConstCounter::new(n).encode(family.encode_family(&[("event", event.as_str())])?)?;
        }
        Ok(())
    }
}

struct DropCollector {
    drops: Arc<DropCounters>,
    kernel: Arc<Mutex<Option<KernelDrops>>>,
    started: Instant,
}

impl fmt::Debug for DropCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DropCollector")
    }
}

impl Collector for DropCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let mut counts = self.drops.snapshot();
        if let Some(read) = self.kernel.lock().expect("poisoned").as_ref()
            && let Some(kernel) = read()
        {
            for (c, k) in counts.iter_mut().zip(kernel) {
                *c += k;
            }
        }
        let count = |r: DropReason| counts[r.index()];

        let mut family = encoder.encode_descriptor(
            "varta_decode_errors",
            "Frames that failed to decode, by kind",
            None,
            MetricType::Counter,
        )?;
        for e in DecodeError::ALL {
            ConstCounter::new(count(DropReason::from_decode(e)))
                .encode(family.encode_family(&[("kind", e.name())])?)?;
        }

        let mut family = encoder.encode_descriptor(
            "varta_frames_dropped",
            "Datagrams not accepted, by reason",
            None,
            MetricType::Counter,
        )?;
        let mut by_reason: Vec<(&str, u64)> = Vec::new();
        for r in DropReason::ALL {
            match by_reason.iter_mut().find(|(name, _)| *name == r.name()) {
                Some((_, n)) => *n += count(r),
                None => by_reason.push((r.name(), count(r))),
            }
        }
        by_reason.push(("queue_full", self.drops.queue_full()));
        for (reason, n) in by_reason {
            ConstCounter::new(n).encode(family.encode_family(&[("reason", reason)])?)?;
        }

        let gauge = encoder.encode_descriptor(
            "varta_junk_sample_one_in",
            "1: junk (length and decode drops) is counted exactly; N: the userspace datapath samples a junk flood and each sample counts as N (estimates)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.drops.junk_scale() as i64).encode(gauge)?;

        let help = format!(
            "Senders beating over {over} times the per-agent rate whose frames the userspace datapath's classic filter keeps out of its queue; one in {n} is let through and counts as {n} in frames_dropped{{reason=\"rate_per_pid\"}} (estimates)",
            over = cbpf::DENY_OVER_RATE,
            n = cbpf::DENIED_SAMPLE_ONE_IN,
        );
        let gauge =
            encoder.encode_descriptor("varta_denied_senders", &help, None, MetricType::Gauge)?;
        ConstGauge::new(self.drops.denied() as i64).encode(gauge)?;

        let mut family = encoder.encode_descriptor(
            "varta_rate_limited",
            "Beats dropped by a rate limit",
            None,
            MetricType::Counter,
        )?;
        for (reason, r) in [
            ("per_pid", DropReason::RatePerPid),
            ("global", DropReason::RateGlobal),
        ] {
            ConstCounter::new(count(r)).encode(family.encode_family(&[("reason", reason)])?)?;
        }

        // The incumbent's names for the same counts, so existing dashboards keep working.
        for (name, help, reasons) in INCUMBENT_DROPS {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(reasons.iter().map(|r| count(*r)).sum::<u64>()).encode(metric)?;
        }

        let uptime = encoder.encode_descriptor(
            "varta_watch_uptime_seconds",
            "Seconds since the observer started",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.started.elapsed().as_secs_f64()).encode(uptime)
    }
}
