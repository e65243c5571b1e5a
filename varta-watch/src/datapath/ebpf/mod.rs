//! The eBPF datapath: loads the socket filters, attaches them to the observer's sockets,
//! configures them through a map, and drains accepted beats from the ring buffer in
//! batches. When the daemon wakes for them is `varta_common::wakeup`'s policy; rules 2 to 4
//! of it are applied here, and the routine beats the kernel holds (rule 6) folded in.

mod btf;
mod caps;
mod early;
mod held;
mod load;
pub mod pins;
mod ring;

use crate::sys::logger::event;
use std::{
    collections::{HashMap, HashSet},
    io,
    net::UdpSocket,
    os::unix::net::UnixDatagram,
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
};
use tokio::io::unix::AsyncFd;
use varta_common::{
    DropReason,
    filter::{
        Attest, Bucket, CLOCK_BOOTTIME, CLOCK_MONOTONIC, FilterConfig, Tracked, UDP_PLAINTEXT,
        UDP_SECURE, Verdict, map, ring_bytes,
    },
    wakeup,
};

pub use load::{Unavailable, detach};

use super::{Datapath, attest::Attestation};
use crate::{
    config::{Config, Limits},
    sys::{
        clock::ClockSource,
        pidfd::ExitWatcher,
        procfs::{self, PidNs},
    },
    vocab::{
        beat::{Beat, Origin},
        drops::{DropCounters, KernelDrops},
    },
};

/// Rule 2 of `varta_common::wakeup`.
const DRAIN_INTERVAL: Duration = Duration::from_millis(wakeup::DRAIN_INTERVAL_MS);
/// Rule 6 of `varta_common::wakeup`.
const FOLD_INTERVAL: Duration = Duration::from_millis(wakeup::FOLD_INTERVAL_MS);

type Logger = AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>;

pub struct EbpfDatapath {
    /// Owns the loaded programs and their maps for as long as the daemon runs.
    _ebpf: Ebpf,
    attest: Attest,
    ring: AsyncFd<RingBuf<MapData>>,
    config: Array<MapData, FilterConfig>,
    filter_config: FilterConfig,
    verdicts: BpfHashMap<MapData, u32, Verdict>,
    /// The sockets the programs are attached to.
    uds: UnixDatagram,
    _udp: Option<UdpSocket>,
    logger: Option<Logger>,
    drops: Arc<DropCounters>,
    attestation: Attestation,
    /// Processes (host tgids) whose exit is watched, one watch each: verified senders in
    /// other pid namespaces, and tracked agents whose routine beats the kernel holds.
    watched: HashSet<u32>,
    exits: ExitWatcher,
    /// Per-agent token buckets; an agent without one is new to the kernel, and its next
    /// beat wakes the daemon.
    buckets: BpfHashMap<MapData, u64, Bucket>,
    /// The agents the tracker holds, as the kernel knows them (exempt from the global
    /// bucket), and their keys by tracked pid.
    tracked: BpfHashMap<MapData, u64, Tracked>,
    /// The entries of the agents whose routine beats the kernel holds, by slot.
    hold: Array<MapData, Tracked>,
    tracked_keys: HashMap<u32, u64>,
    /// Per tracked key, how far its held beats were folded in.
    folded: HashMap<u64, super::HeldSeen>,
    /// Held beats folded in outside a drain (a previous instance's, or an entry's about to
    /// be written), for the next one.
    pending: Vec<Beat>,
    /// The daemon's clock (`Tracked::since_ns`).
    clock: ClockSource,
    /// Exit-watched agents whose last attested beat came before the watch began: the kernel
    /// holds none of their beats until one came through the ring, attested since.
    unconfirmed: HashSet<u64>,
    /// When the beats the kernel holds are next folded in (rule 6): while any agent's are.
    fold_at: Option<tokio::time::Instant>,
    /// Some agent is watched for a stall: ordinary beats are drained on the timer.
    watching: bool,
    /// When the drain timer (rule 2) fires: kept here, not in `recv`'s future, which is
    /// dropped whenever another arm of the main loop fires first (a probe, a scrape, a
    /// signal): recreated each time, a frequent wake-up would keep putting it off.
    drain_at: Option<tokio::time::Instant>,
    /// The records of one drain, reused.
    records: Vec<varta_common::filter::BeatRecord>,
    /// Reads the secure UDP frames the filter passes up unopened.
    secure_udp: Option<super::udp::UdpReceiver>,
}

/// The maps the daemon keeps after attaching.
struct Maps {
    ring: AsyncFd<RingBuf<MapData>>,
    verdicts: BpfHashMap<MapData, u32, Verdict>,
    buckets: BpfHashMap<MapData, u64, Bucket>,
    tracked: BpfHashMap<MapData, u64, Tracked>,
    hold: Array<MapData, Tracked>,
    kernel_drops: KernelDrops,
}

/// Where the maps are pinned: `--bpf-pin-dir`, the socket they belong to, `--fresh-state`.
pub struct PinRequest<'a> {
    pub root: &'a std::path::Path,
    pub socket: &'a std::path::Path,
    pub fresh: bool,
}

/// An agent the daemon tracked, as the pinned maps know it.
#[derive(Debug, Clone, Copy)]
pub struct KernelAgent {
    /// The key in the maps (`varta_common::filter::agent_key`).
    pub key: u64,
    pub transport: u8,
    /// Its last beat the kernel queued, and the pids of that beat; `None` when the kernel
    /// holds no bucket for it (its stall or exit was surfaced, or none was ever written).
    pub last: Option<(u64, u32, u32)>,
    /// The routine beats held in its entry (rule 6), and since when.
    pub held: super::HeldSeen,
}

impl EbpfDatapath {
    /// Loads and attaches the programs, or says in one line why that is not possible here.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        uds: UnixDatagram,
        udp: Option<UdpSocket>,
        settings: &Config,
        drops: Arc<DropCounters>,
        pin: PinRequest<'_>,
    ) -> Result<(Self, KernelDrops, pins::Pins), Unavailable> {
        let (clock, limits) = (settings.clock, &settings.limits);
        let tracker_capacity = settings.tracker_capacity as u32;
        let methods = load::requested_methods()?;
        load::preflight()?;
        let mut pins = pins::prepare(pin.root, pin.socket, pin.fresh, load::OBJECT);
        let mut ring_bytes = ring_bytes(tracker_capacity, limits.per_pid_burst());
        if let Some(pinned) = pins
            .dir
            .as_deref()
            .filter(|_| pins.resume)
            .and_then(pins::pinned_ring_bytes)
            && pinned != ring_bytes
        {
            event!(
                info,
                "ebpf_ring_resumed",
                bytes = pinned,
                wanted = ring_bytes,
                reason = "the pinned ring keeps its size; --fresh-state resizes it",
            );
            ring_bytes = pinned;
        }
        let mut ebpf = match load::open(ring_bytes, pins.dir.as_deref()) {
            Ok(ebpf) => ebpf,
            Err(e) if pins.dir.is_some() => {
                // Pins this process may not open or create: run without them, and say so.
                event!(
                    warn,
                    "pins_unavailable",
                    dir = pins.dir.as_deref().map(|d| d.display().to_string()),
                    reason:% = e,
                );
                pins = pins::Pins {
                    dir: None,
                    resume: false,
                    fresh_reason: format!("the pinned maps could not be used: {e}"),
                    queued: None,
                };
                load::open(ring_bytes, None)?
            }
            Err(e) => return Err(e),
        };
        event!(
            info,
            "ebpf_ring",
            bytes = ring_bytes,
            tracker_capacity = tracker_capacity,
        );
        let logger = aya_log::EbpfLogger::init_with_logger(&mut ebpf, log::logger())
            .ok()
            .and_then(|l| crate::sys::readiness::readable(l).ok());
        let own_ns = procfs::own_pid_ns()
            .map_err(|e| Unavailable(format!("reading /proc/self/ns/pid: {e}")))?;
        let mut filter_config = FilterConfig {
            udp_accept: udp_accept(settings),
            // The export file has a line per beat: every beat must come up.
            hold_routine: settings.export_file.is_none() as u32,
            ..initial_config(own_ns, clock, limits)
        };
        let mut config: Array<MapData, FilterConfig> = take_map(&mut ebpf, map::CONFIG)?;
        let attest = load::attach_uds(&mut ebpf, &methods, &mut config, &mut filter_config, &uds)?;
        if let Some(udp) = &udp {
            load::attach_udp(&mut ebpf, udp)?;
        }
        let mut maps = Maps::take(&mut ebpf)?;
        if pins.resume {
            // Verdicts outlived the exit watchers that kept them true (a pid may have been
            // reused meanwhile): every cross-namespace sender is verified again.
            let stale: Vec<u32> = maps.verdicts.keys().filter_map(Result::ok).collect();
            for tgid in stale {
                let _ = maps.verdicts.remove(&tgid);
            }
        }
        let mut datapath = EbpfDatapath {
            _ebpf: ebpf,
            attest,
            ring: maps.ring,
            config,
            filter_config,
            verdicts: maps.verdicts,
            uds,
            _udp: udp,
            logger,
            drops,
            attestation: Attestation::new(settings.allow_cross_namespace),
            watched: HashSet::new(),
            exits: ExitWatcher::new(),
            buckets: maps.buckets,
            tracked: maps.tracked,
            hold: maps.hold,
            tracked_keys: HashMap::new(),
            folded: HashMap::new(),
            pending: Vec::new(),
            clock,
            unconfirmed: HashSet::new(),
            fold_at: None,
            watching: false,
            drain_at: None,
            records: Vec::new(),
            secure_udp: None,
        };
        datapath.take_queued_before_attach();
        Ok((datapath, maps.kernel_drops, pins))
    }

    /// The tracker took back `pid` (known to the kernel under `key`), or did not (`None`):
    /// the tracked set is made to match.
    pub fn restored(&mut self, key: u64, pid: Option<u32>) {
        match pid {
            Some(pid) => {
                self.tracked_keys.insert(pid, key);
            }
            None => self.untrack(key),
        }
    }

    /// Everything queued (ring, secure UDP socket, and held beats folded in already), without
    /// what the kernel holds now.
    fn drain_queued(&mut self, out: &mut Vec<Beat>) {
        self.drain_at = None;
        out.append(&mut self.pending);
        if let Some(Err(e)) = self
            .secure_udp
            .as_mut()
            .map(|udp| udp.drain(out, super::DRAIN_BUDGET))
        {
            event!(warn, "receive_error", transport = "udp", error:% = e);
        }
        self.drain_ring(out);
    }

    /// Secure UDP frames are read from the socket, not the ring buffer.
    pub fn set_secure_udp(&mut self, receiver: super::udp::UdpReceiver) {
        self.secure_udp = Some(receiver);
    }
}

fn initial_config(own_ns: PidNs, clock: ClockSource, limits: &Limits) -> FilterConfig {
    let mut config = FilterConfig {
        pidns_dev: own_ns.dev,
        pidns_ino: own_ns.ino,
        clock: match clock {
            ClockSource::Monotonic => CLOCK_MONOTONIC,
            ClockSource::Boottime => CLOCK_BOOTTIME,
        },
        ..FilterConfig::default()
    };
    set_limits(&mut config, limits);
    config
}

/// What the kernel's UDP program lets through: plaintext frames only when the operator
/// accepted them, secure lengths only when a key can open them.
fn udp_accept(settings: &Config) -> u32 {
    let mut accept = 0;
    if settings.plaintext_udp {
        accept |= UDP_PLAINTEXT;
    }
    if !settings.secure.is_empty() {
        accept |= UDP_SECURE;
    }
    accept
}

fn set_limits(config: &mut FilterConfig, limits: &Limits) {
    config.per_pid_rate = limits.per_pid_rate;
    config.per_pid_burst = limits.per_pid_burst();
    config.global_rate = limits.global_rate;
    config.global_burst = limits.global_burst;
}

impl Maps {
    fn take(ebpf: &mut Ebpf) -> Result<Maps, Unavailable> {
        let ring: RingBuf<MapData> = take_map(ebpf, map::EVENTS)?;
        let ring = crate::sys::readiness::readable(ring)
            .map_err(|e| Unavailable(format!("polling the ring buffer: {e}")))?;
        let kernel_drops: PerCpuArray<MapData, u64> = take_map(ebpf, map::DROPS)?;
        let kernel_drops = Mutex::new(kernel_drops);
        Ok(Maps {
            ring,
            verdicts: take_map(ebpf, map::VERDICTS)?,
            buckets: take_map(ebpf, map::BUCKETS)?,
            tracked: take_map(ebpf, map::TRACKED)?,
            hold: take_map(ebpf, map::HOLD)?,
            kernel_drops: Box::new(move || {
                let map = kernel_drops.lock().ok()?;
                let mut sums = [0u64; DropReason::COUNT];
                for (i, sum) in sums.iter_mut().enumerate() {
                    *sum = map.get(&(i as u32), 0).ok()?.iter().sum();
                }
                Some(sums)
            }),
        })
    }
}

fn take_map<M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<M, Unavailable> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| Unavailable(format!("the eBPF object has no map {name}")))?;
    M::try_from(map).map_err(|e| Unavailable(format!("map {name}: {e}")))
}

impl Datapath for EbpfDatapath {
    fn mode(&self) -> &'static str {
        "ebpf"
    }

    fn attest(&self) -> &'static str {
        self.attest.name()
    }

    async fn recv(&mut self, out: &mut Vec<Beat>) -> io::Result<()> {
        let drain_at = self.watching.then(|| {
            *self
                .drain_at
                .get_or_insert_with(|| tokio::time::Instant::now() + DRAIN_INTERVAL)
        });
        let fold_at =
            (self.filter_config.hold_routine != 0 && !self.watched.is_empty()).then(|| {
                *self
                    .fold_at
                    .get_or_insert_with(|| tokio::time::Instant::now() + FOLD_INTERVAL)
            });
        tokio::select! {
            tgid = self.exits.exited() => {
                self.forget(tgid, out);
                return Ok(());
            }
            () = tokio::time::sleep_until(fold_at.unwrap_or_else(tokio::time::Instant::now)), if fold_at.is_some() => {
                self.drain(out);
                return Ok(());
            }
            guard = self.ring.readable_mut() => guard?.clear_ready(),
            guard = async { self.logger.as_mut().expect("guarded").readable_mut().await }, if self.logger.is_some() => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
                return Ok(());
            }
            // Rule 2 of `varta_common::wakeup`: the drain timer runs only while watching.
            () = tokio::time::sleep_until(drain_at.unwrap_or_else(tokio::time::Instant::now)), if drain_at.is_some() => {}
            ready = async { self.secure_udp.as_ref().expect("guarded").readable().await }, if self.secure_udp.is_some() => ready?,
        }
        self.drain_queued(out);
        Ok(())
    }

    /// Rule 3 of `varta_common::wakeup`: called before every stall decision. The buckets are
    /// read before the ring: a beat they count came after every ring record of its agent's
    /// earlier beats, so those are in this drain, and taken first.
    fn drain(&mut self, out: &mut Vec<Beat>) {
        self.fold_at = None;
        let held = self.held_beats();
        self.drain_queued(out);
        out.extend(held);
    }

    fn set_watching(&mut self, watching: bool) {
        self.watching = watching;
        if !watching {
            self.drain_at = None;
        }
    }

    fn agent_silent(&mut self, pid: u32, origin: &Origin) {
        // Rule 4 of `varta_common::wakeup`: its next beat is a first beat again, through
        // the ring (rule 6 holds none until then).
        let key = origin.agent_key(pid);
        let _ = self.buckets.remove(&key);
        if self.tracked_keys.get(&pid) == Some(&key) && self.watched.contains(&pid) {
            let _ = self.write_tracked(pid, key, None);
            self.unconfirmed.insert(key);
        }
    }

    fn agent_tracked(&mut self, pid: u32, origin: &Origin) {
        let key = origin.agent_key(pid);
        // Rule 6 of `varta_common::wakeup`, for attested agents whose exit can be watched:
        // from their next beat through the ring on (`ring::handle`).
        let watched = matches!(origin, Origin::Uds { .. }) && self.watch_exit(pid);
        match self.write_tracked(pid, key, None) {
            Ok(()) => {
                self.tracked_keys.insert(pid, key);
                if watched {
                    self.unconfirmed.insert(key);
                }
            }
            // Full (a tracker above TRACKED_ENTRIES): charged to the global bucket like a
            // new sender, which only costs it beats under a flood.
            Err(e) => event!(debug, "ebpf_tracked_failed", pid = pid, error:% = e),
        }
    }

    fn agent_untracked(&mut self, pid: u32) {
        if let Some(key) = self.tracked_keys.remove(&pid) {
            self.untrack(key);
            self.folded.remove(&key);
            self.unconfirmed.remove(&key);
        }
    }

    fn held_seen(&self) -> Vec<super::HeldSeen> {
        self.folded.values().copied().collect()
    }

    fn restore_held_seen(&mut self, seen: &[super::HeldSeen]) {
        self.restore_held(seen);
    }

    fn secure_sessions(&self) -> Vec<super::secure::SavedSession> {
        self.secure_udp
            .as_ref()
            .map_or(Vec::new(), super::udp::UdpReceiver::sessions)
    }

    fn set_limits(&mut self, limits: &Limits) -> anyhow::Result<()> {
        set_limits(&mut self.filter_config, limits);
        self.config.set(0, self.filter_config, 0)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use varta_common::filter::program;

    use super::load::OBJECT;

    /// The names the daemon looks up are the ones the built object carries (the filter's
    /// `#[map]` statics cannot take their names from `varta_common`).
    #[test]
    #[cfg_attr(
        varta_no_ebpf_object,
        ignore = "built without the eBPF object: `cargo xtask test` embeds it"
    )]
    fn the_embedded_object_has_the_shared_program_and_map_names() {
        let object = aya_obj::Object::parse(OBJECT).unwrap();
        let programs: BTreeSet<&str> = object.programs.keys().map(String::as_str).collect();
        assert_eq!(programs, BTreeSet::from(program::ALL));
        let maps: BTreeSet<&str> = object.maps.keys().map(String::as_str).collect();
        for name in varta_common::filter::map::ALL {
            assert!(maps.contains(name), "no map {name} in {maps:?}");
        }
        assert_eq!(object.license.to_str().unwrap(), "Dual MIT/GPL");
    }
}
