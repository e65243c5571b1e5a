//! What the kernel cannot keep across an observer restart: each tracked agent's identity,
//! process start time (against pid reuse), last nonce and whether its stall was surfaced,
//! and the `varta_*_total` counters. A state file next to the socket (`<socket>.state`),
//! written atomically (a temporary file in the same directory, `O_NOFOLLOW`, mode 0600, then
//! `rename`) at shutdown and checkpointed while running; taken only when it was written in
//! this boot (`boot_id`), by this user, not writable by others.
//!
//! One line per item, tab-separated `key=value` fields, values percent-escaped:
//! `varta-state 1`, `boot_id=..`, `clock=..`, `agent\t...`, `counter\t<sample>\t<value>`,
//! `secure\tkey=<hex>\tpid=..\tiv=<hex>\tcounter=..` (the secure UDP replay sessions).

use std::{
    collections::HashMap,
    io::{self, Read, Write},
    net::SocketAddr,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use varta_common::Status;

use crate::{
    actions::identity::Identity,
    actions::metrics::{Metrics, OutcomeLabel, PidLabel, ReasonLabel, SignalLabel},
    datapath::{HeldSeen, secure::SavedSession},
    observer::tracker::Restored,
    sys::{clock::ClockSource, process::StartTime},
    vocab::beat::Origin,
};

const MAGIC: &str = "varta-state 1";

/// How often the state is checkpointed while running (and after a stall, at most this
/// often: [`STALL_CHECKPOINT_MS`]).
pub const CHECKPOINT_MS: u64 = 1000;
pub const STALL_CHECKPOINT_MS: u64 = 100;

pub fn path_for(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".state");
    PathBuf::from(p)
}

pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

#[derive(Debug, Clone)]
pub struct SavedAgent {
    pub agent: Restored,
    pub identity: Identity,
}

#[derive(Debug, Default)]
pub struct State {
    pub boot_id: String,
    pub clock: String,
    pub agents: Vec<SavedAgent>,
    /// `name{labels}` -> value, of every `varta_*_total` sample.
    pub counters: Vec<(String, f64)>,
    /// How far the beats the kernel holds were counted in those counters.
    pub held: Vec<HeldSeen>,
    /// Secure UDP replay sessions, least recently seen first: a capture replayed after a
    /// restart is refused as it was before.
    pub secure: Vec<SavedSession>,
}

fn clock_name(c: ClockSource) -> &'static str {
    match c {
        ClockSource::Monotonic => "monotonic",
        ClockSource::Boottime => "boottime",
    }
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' | '\t' | '\n' | '=' | '\r' => out.push_str(&format!("%{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fn unesc(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len() + 1
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(bytes: &[u8; 8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 8]> {
    if text.len() != 16 {
        return None;
    }
    let mut out = [0u8; 8];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl State {
    /// The state of a running observer.
    pub fn capture<'a>(
        clock: ClockSource,
        agents: impl Iterator<Item = (&'a u32, &'a crate::observer::tracker::Agent)>,
        identity_of: impl Fn(u32) -> Identity,
        metrics: &Metrics,
        secure: Vec<SavedSession>,
        held: Vec<HeldSeen>,
    ) -> State {
        let agents = agents
            .map(|(&pid, a)| SavedAgent {
                agent: Restored {
                    pid,
                    origin: a.origin,
                    frame_pid: a.frame_pid,
                    last_beat_ns: a.last_beat_ns,
                    last_nonce: a.last_nonce,
                    status: a.status,
                    stalled: a.stalled,
                    dead: a.dead,
                    started: a.started,
                },
                identity: identity_of(pid),
            })
            .collect();
        let counters = metrics
            .encode()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (sample, value) = l.rsplit_once(' ')?;
                let name = sample.split('{').next()?;
                (name.ends_with("_total") && counter_carried(name))
                    .then(|| Some((sample.to_owned(), value.parse().ok()?)))?
            })
            .collect();
        State {
            boot_id: boot_id(),
            clock: clock_name(clock).to_owned(),
            agents,
            counters,
            held,
            secure,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = format!(
            "{MAGIC}\nboot_id={}\nclock={}\n",
            esc(&self.boot_id),
            self.clock
        );
        for s in &self.agents {
            let a = &s.agent;
            let (transport, extra) = match a.origin {
                Origin::Uds {
                    cross_namespace: false,
                } => ("uds", String::new()),
                Origin::Uds {
                    cross_namespace: true,
                } => ("uds", "\tcross_namespace=1".to_owned()),
                Origin::Udp { source } => ("udp", format!("\tsource={source}")),
            };
            let i = &s.identity;
            out.push_str(&format!(
                "agent\tpid={}\ttransport={transport}{extra}\tframe_pid={}\tlast_beat_ns={}\tnonce={}\tstatus={}\tstalled={}\tdead={}\tstarted={}\tcomm={}\tcgroup={}\tunit={}\tcontainer_id={}\tpod_uid={}\n",
                a.pid,
                a.frame_pid,
                a.last_beat_ns,
                a.last_nonce,
                a.status as u8,
                a.stalled as u8,
                a.dead as u8,
                a.started.map_or("-".to_owned(), |s| s.0.to_string()),
                esc(&i.comm),
                esc(&i.cgroup),
                esc(&i.unit),
                esc(&i.container_id),
                esc(&i.pod_uid),
            ));
        }
        for (sample, value) in &self.counters {
            out.push_str(&format!("counter\t{}\t{value}\n", esc(sample)));
        }
        for h in &self.held {
            out.push_str(&format!(
                "held\tkey={}\tsince_ns={}\tcount={}\n",
                h.key, h.since_ns, h.held
            ));
        }
        for s in &self.secure {
            out.push_str(&format!(
                "secure\tkey={}\tpid={}\tiv={}\tcounter={}\n",
                hex(&s.key),
                s.pid,
                hex(&s.iv_random),
                s.counter
            ));
        }
        out
    }

    pub fn decode(text: &str) -> Result<State, String> {
        let mut lines = text.lines();
        if lines.next() != Some(MAGIC) {
            return Err(format!("not a state file of this format ({MAGIC})"));
        }
        let mut state = State::default();
        for line in lines {
            let mut fields = line.split('\t');
            match fields.next() {
                Some("agent") => {
                    let kv: HashMap<&str, String> = pairs(fields)
                        .into_iter()
                        .map(|(k, v)| (k, unesc(v)))
                        .collect();
                    state.agents.push(agent_of(&kv).ok_or_else(|| bad(line))?);
                }
                Some("secure") => state
                    .secure
                    .push(session_of(&pairs(fields)).ok_or_else(|| bad(line))?),
                Some("held") => state
                    .held
                    .push(held_of(&pairs(fields)).ok_or_else(|| bad(line))?),
                Some("counter") => {
                    let (Some(sample), Some(value)) = (fields.next(), fields.next()) else {
                        return Err(bad(line));
                    };
                    let value = value.parse().map_err(|_| bad(line))?;
                    state.counters.push((unesc(sample), value));
                }
                Some(other) => {
                    if let Some(v) = other.strip_prefix("boot_id=") {
                        state.boot_id = unesc(v);
                    } else if let Some(v) = other.strip_prefix("clock=") {
                        state.clock = v.to_owned();
                    }
                }
                None => {}
            }
        }
        Ok(state)
    }

    /// Writes the file atomically: a temporary file beside it (never through a symlink,
    /// 0600), then a rename over it.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let tmp = {
            let mut p = path.as_os_str().to_owned();
            p.push(format!(".tmp.{}", std::process::id()));
            PathBuf::from(p)
        };
        let _ = std::fs::remove_file(&tmp);
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&tmp)?;
            f.write_all(self.encode().as_bytes())?;
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// The state a previous instance left, if it may be taken: `Err` says why not.
    pub fn load(path: &Path) -> Result<Option<State>, String> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path);
        let mut file = match file {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("opening {}: {e}", path.display())),
        };
        let meta = file.metadata().map_err(|e| e.to_string())?;
        // SAFETY: no arguments.
        let euid = unsafe { libc::geteuid() };
        if !meta.is_file() || meta.uid() != euid || meta.mode() & 0o022 != 0 {
            return Err(format!(
                "{} is not a regular file of uid {euid} writable only by it",
                path.display()
            ));
        }
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        let state = State::decode(&text)?;
        let boot = boot_id();
        if state.boot_id != boot {
            return Err(format!(
                "it was written in another boot (boot_id {}, now {boot})",
                state.boot_id
            ));
        }
        Ok(Some(state))
    }

    /// Brings the agents' times to `clock` when the previous instance ran on the other one.
    pub fn convert_clock(&mut self, clock: ClockSource) {
        let want = clock_name(clock);
        if self.clock == want {
            return;
        }
        // boottime = monotonic + time suspended.
        let slept = i128::from(crate::sys::clock::slept_ns());
        let delta = if clock == ClockSource::Boottime {
            slept
        } else {
            -slept
        };
        for a in &mut self.agents {
            a.agent.last_beat_ns = (a.agent.last_beat_ns as i128 + delta).max(0) as u64;
        }
        self.clock = want.to_owned();
    }

    /// Adds the carried counters to a fresh registry: `varta_*_total` stay monotonic.
    pub fn restore_counters(&self, m: &Metrics) {
        for (sample, value) in &self.counters {
            let value = *value as u64;
            let (name, labels) = match sample.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (sample.as_str(), ""),
            };
            let label = labels
                .split_once("=\"")
                .map(|(_, v)| v.trim_end_matches('"').to_owned());
            let pid = || label.as_deref().and_then(|v| v.parse().ok());
            let leak = || -> &'static str {
                Box::leak(label.clone().unwrap_or_default().into_boxed_str())
            };
            match name {
                "varta_beats_total"
                | "varta_stalls_total"
                | "varta_exits_total"
                | "varta_criticals_total" => {
                    let family = match name {
                        "varta_beats_total" => &m.beats,
                        "varta_stalls_total" => &m.stalls,
                        "varta_exits_total" => &m.exits,
                        _ => &m.criticals,
                    };
                    if let Some(pid) = pid() {
                        family.get_or_create(&PidLabel { pid }).inc_by(value);
                    }
                }
                "varta_recovery_outcomes_total" => {
                    m.recovery_outcomes
                        .get_or_create(&OutcomeLabel { outcome: leak() })
                        .inc_by(value);
                }
                "varta_recovery_refused_total" => {
                    m.recovery_refused
                        .get_or_create(&ReasonLabel { reason: leak() })
                        .inc_by(value);
                }
                "varta_recovery_suppressed_total" => {
                    m.recovery_suppressed
                        .get_or_create(&ReasonLabel { reason: leak() })
                        .inc_by(value);
                }
                "varta_signals_received_total" => {
                    m.signals
                        .get_or_create(&SignalLabel { signal: leak() })
                        .inc_by(value);
                }
                "varta_prom_auth_failures_total" => {
                    m.prom_auth_failures.inc_by(value);
                }
                "varta_tracker_evicted_total" => {
                    m.evicted.inc_by(value);
                }
                "varta_agent_restarts_total" => {
                    m.restarts.inc_by(value);
                }
                "varta_nonce_wrap_total" => {
                    m.nonce_wraps.inc_by(value);
                }
                "varta_datapath_beats_delivered_total" => {
                    m.delivered.inc_by(value);
                }
                _ => {}
            }
        }
    }
}

/// What a starting observer takes back, and the one line that says so.
pub struct Resume {
    pub agents: Vec<SavedAgent>,
    pub state: Option<State>,
    pub said: Said,
}

/// The line a starting observer says about what it took back.
pub enum Said {
    /// Agents came back from a running observer, the pins or the state file.
    Resumed {
        agents: usize,
        from: &'static str,
        /// The observer that handed over: its pid and the handover version.
        handover: Option<(u32, u32)>,
        stalled: usize,
        from_kernel_only: usize,
        queued_beats: u64,
        /// Routine beats the kernel held for them meanwhile (`wakeup` rule 6), not yet
        /// counted.
        held_beats: u64,
        state_file: String,
        pins: Option<String>,
    },
    /// Nothing to take back, and why.
    Fresh {
        reason: String,
        pins: Option<String>,
    },
}

impl Said {
    pub fn log(&self) {
        use crate::sys::logger::event;
        match self {
            Said::Resumed {
                agents,
                from,
                handover,
                stalled,
                from_kernel_only,
                queued_beats,
                held_beats,
                state_file,
                pins,
            } => event!(
                info,
                "resumed",
                agents = agents,
                from = from,
                peer_pid = handover.map(|(pid, _)| pid),
                version = handover.map(|(_, version)| version),
                stalled = stalled,
                from_kernel_only = from_kernel_only,
                queued_beats = queued_beats,
                held_beats = held_beats,
                state_file = state_file.as_str(),
                pins = pins.as_deref(),
            ),
            Said::Fresh { reason, pins } => event!(
                info,
                "fresh",
                reason = reason.as_str(),
                pins = pins.as_deref(),
            ),
        }
    }
}

/// Merges what the pinned maps know (`kernel`, when they were resumed) with the state file
/// (`state`, or why it was not taken) into the agents to take back. `handover`: the state
/// came from a running observer that hands over (its pid, the handover version).
pub fn plan(
    pins: Option<&crate::datapath::ebpf::pins::Pins>,
    kernel: &[crate::datapath::ebpf::KernelAgent],
    state: Result<Option<State>, String>,
    clock: ClockSource,
    handover: Option<(u32, u32)>,
) -> (Resume, Vec<u64>) {
    use varta_common::filter::TRANSPORT_UDS;
    let (mut state, state_note) = match state {
        Ok(Some(mut s)) => {
            s.convert_clock(clock);
            let note = if handover.is_some() {
                "handed over"
            } else {
                "taken"
            };
            (Some(s), note.to_owned())
        }
        Ok(None) => (None, "none".to_owned()),
        Err(why) => (None, format!("refused ({why})")),
    };
    let seen: &[HeldSeen] = state.as_ref().map_or(&[], |s| &s.held);
    let held_beats = kernel
        .iter()
        .map(|k| k.held.since(seen.iter().find(|s| s.key == k.key)))
        .sum();
    let mut agents: Vec<SavedAgent> = state
        .as_mut()
        .map(|s| std::mem::take(&mut s.agents))
        .unwrap_or_default();
    let mut index: HashMap<u32, usize> = agents
        .iter()
        .enumerate()
        .map(|(i, a)| (a.agent.pid, i))
        .collect();
    let mut dropped = Vec::new();
    let mut from_kernel = 0;
    for k in kernel {
        let pid = k.key as u32;
        match (index.get(&pid), k.last) {
            (Some(&i), Some((last, ..)))
                if agents[i].agent.origin.transport_code() == k.transport =>
            {
                let a = &mut agents[i].agent;
                a.last_beat_ns = a.last_beat_ns.max(last);
            }
            (Some(_), _) => {}
            (None, Some((last, _, frame_pid))) => {
                from_kernel += 1;
                let origin = if k.transport == TRANSPORT_UDS {
                    Origin::Uds {
                        cross_namespace: crate::sys::procfs::sender(pid)
                            .is_ok_and(|s| s.cross_namespace),
                    }
                } else {
                    let ip: std::net::IpAddr =
                        if k.transport == varta_common::filter::TRANSPORT_UDP4 {
                            std::net::Ipv4Addr::UNSPECIFIED.into()
                        } else {
                            std::net::Ipv6Addr::UNSPECIFIED.into()
                        };
                    Origin::Udp {
                        source: SocketAddr::new(ip, 0),
                    }
                };
                let uds = k.transport == TRANSPORT_UDS;
                index.insert(pid, agents.len());
                agents.push(SavedAgent {
                    agent: Restored {
                        pid,
                        origin,
                        frame_pid,
                        last_beat_ns: last,
                        last_nonce: 0,
                        status: Status::Ok,
                        stalled: false,
                        dead: false,
                        started: uds.then(|| StartTime::of(pid)).flatten(),
                    },
                    identity: if uds {
                        Identity::read(pid)
                    } else {
                        Identity::default()
                    },
                });
            }
            // No bucket: its stall or exit was surfaced (the daemon removes the bucket then)
            // and the state that said so is gone: nothing to watch.
            (None, None) => dropped.push(k.key),
        }
    }
    let stalled = agents.iter().filter(|a| a.agent.stalled).count();
    let resumed_pins = pins.is_some_and(|p| p.resume);
    let from = if handover.is_some() {
        Some("handover")
    } else if resumed_pins {
        Some("pins")
    } else if state.is_some() {
        Some("state_file")
    } else {
        None
    };
    let pins_dir = pins
        .and_then(|p| p.dir.as_deref())
        .map(|d| d.display().to_string());
    let said = match from {
        Some(from) => Said::Resumed {
            agents: agents.len(),
            from,
            handover,
            stalled,
            from_kernel_only: from_kernel,
            queued_beats: pins.and_then(|p| p.queued).unwrap_or(0),
            held_beats,
            state_file: state_note,
            pins: pins_dir,
        },
        None => Said::Fresh {
            reason: format!(
                "{}; state file: {state_note}",
                pins.map_or("the userspace datapath pins nothing", |p| &p.fresh_reason)
            ),
            pins: pins_dir,
        },
    };
    (
        Resume {
            agents,
            state,
            said,
        },
        dropped,
    )
}

/// The counters [`State::restore_counters`] knows how to carry.
fn counter_carried(name: &str) -> bool {
    matches!(
        name,
        "varta_beats_total"
            | "varta_stalls_total"
            | "varta_exits_total"
            | "varta_criticals_total"
            | "varta_recovery_outcomes_total"
            | "varta_recovery_refused_total"
            | "varta_recovery_suppressed_total"
            | "varta_signals_received_total"
            | "varta_prom_auth_failures_total"
            | "varta_tracker_evicted_total"
            | "varta_agent_restarts_total"
            | "varta_nonce_wrap_total"
            | "varta_datapath_beats_delivered_total"
            | "varta_datapath_beats_held_total"
    )
}

/// A line's `key=value` fields.
fn pairs<'a>(fields: impl Iterator<Item = &'a str>) -> HashMap<&'a str, &'a str> {
    fields.filter_map(|f| f.split_once('=')).collect()
}

fn bad(line: &str) -> String {
    format!("bad line: {line}")
}

fn session_of(kv: &HashMap<&str, &str>) -> Option<SavedSession> {
    Some(SavedSession {
        key: unhex(kv.get("key")?)?,
        pid: kv.get("pid")?.parse().ok()?,
        iv_random: unhex(kv.get("iv")?)?,
        counter: kv.get("counter")?.parse().ok()?,
    })
}

fn held_of(kv: &HashMap<&str, &str>) -> Option<HeldSeen> {
    let num = |k: &str| kv.get(k)?.parse::<u64>().ok();
    Some(HeldSeen {
        key: num("key")?,
        since_ns: num("since_ns")?,
        held: num("count")?,
    })
}

fn agent_of(kv: &HashMap<&str, String>) -> Option<SavedAgent> {
    let num = |k: &str| kv.get(k)?.parse::<u64>().ok();
    let origin = match kv.get("transport")?.as_str() {
        "uds" => Origin::Uds {
            cross_namespace: num("cross_namespace") == Some(1),
        },
        "udp" => Origin::Udp {
            source: kv.get("source")?.parse::<SocketAddr>().ok()?,
        },
        _ => return None,
    };
    let s = |k: &str| kv.get(k).cloned().unwrap_or_default();
    Some(SavedAgent {
        agent: Restored {
            pid: num("pid")? as u32,
            origin,
            frame_pid: num("frame_pid")? as u32,
            last_beat_ns: num("last_beat_ns")?,
            last_nonce: num("nonce")?,
            status: Status::from_u8(num("status")? as u8)?,
            stalled: num("stalled")? == 1,
            dead: num("dead")? == 1,
            started: num("started").map(StartTime),
        },
        identity: Identity {
            comm: s("comm"),
            cgroup: s("cgroup"),
            unit: s("unit"),
            container_id: s("container_id"),
            pod_uid: s("pod_uid"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_line_refuses_the_file() {
        let good = format!("{MAGIC}\nheld\tkey=1\tsince_ns=2\tcount=3\n");
        assert_eq!(State::decode(&good).unwrap().held.len(), 1);
        for line in [
            "held\tkey=1\tsince_ns=2",
            "held\tkey=1\tsince_ns=x\tcount=3",
            "secure\tkey=zz\tpid=9\tiv=00\tcounter=1",
            "counter\tvarta_beats_total",
        ] {
            let text = format!("{MAGIC}\n{line}\n");
            assert_eq!(
                State::decode(&text).unwrap_err(),
                format!("bad line: {line}")
            );
        }
    }

    #[test]
    fn a_state_round_trips_through_its_file() {
        let dir = std::env::temp_dir().join(format!("varta-state-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("varta.sock.state");
        let state = State {
            boot_id: boot_id(),
            clock: "monotonic".into(),
            agents: vec![SavedAgent {
                agent: Restored {
                    pid: 42,
                    origin: Origin::Uds {
                        cross_namespace: true,
                    },
                    frame_pid: 7,
                    last_beat_ns: 123,
                    last_nonce: 9,
                    status: Status::Degraded,
                    stalled: true,
                    dead: false,
                    started: Some(StartTime(77)),
                },
                identity: Identity {
                    comm: "a b\tc=%".into(),
                    ..Identity::default()
                },
            }],
            counters: vec![("varta_beats_total{pid=\"42\"}".into(), 17.0)],
            held: vec![HeldSeen {
                key: 42,
                since_ns: u64::MAX,
                held: 3,
            }],
            secure: vec![SavedSession {
                key: [0xfe, 1, 2, 3, 4, 5, 6, 0x80],
                pid: 9,
                iv_random: [0, 0xff, 7, 7, 7, 7, 7, 1],
                counter: u32::MAX,
            }],
        };
        state.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = State::load(&path).unwrap().unwrap();
        assert_eq!(back.agents.len(), 1);
        let a = &back.agents[0];
        assert_eq!(a.identity.comm, "a b\tc=%");
        assert_eq!(
            (a.agent.pid, a.agent.frame_pid, a.agent.last_nonce),
            (42, 7, 9)
        );
        assert!(a.agent.stalled && !a.agent.dead);
        assert_eq!(a.agent.started, Some(StartTime(77)));
        assert_eq!(back.counters, state.counters);
        assert_eq!(back.secure, state.secure);
        assert_eq!(back.held, state.held);
        // Another boot's file is refused.
        let other = State {
            boot_id: "another".into(),
            ..State::default()
        };
        other.save(&path).unwrap();
        assert!(State::load(&path).unwrap_err().contains("another boot"));
        // Never through a symlink.
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", &path).unwrap();
        assert!(State::load(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
