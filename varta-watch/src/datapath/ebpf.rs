//! The eBPF datapath: loads the socket filters, attaches them to the observer's sockets,
//! configures them through a map, and drains accepted beats from the ring buffer in
//! batches. Ordinary beats are submitted without a wake-up and drained on a short timer;
//! urgent ones (Critical, a new agent, a sender to verify) and a filling ring wake the
//! daemon at once. Before any stall is decided the ring is drained, so a beat waiting in
//! it can never cause a false stall.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::unix::net::UnixDatagram,
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{ProgramError, SocketFilter},
};
use tokio::io::unix::AsyncFd;
use varta_common::{
    DropReason, Frame,
    kernel::{
        BeatRecord, Bucket, CLOCK_BOOTTIME, CLOCK_MONOTONIC, FilterConfig, KIND_VERIFY,
        MAP_BUCKETS, MAP_CONFIG, MAP_DROPS, MAP_EVENTS, MAP_VERDICTS, RING_BYTES, TRANSPORT_UDP4,
        TRANSPORT_UDP6, TRANSPORT_UDS, VERDICT_ALLOW, VERDICT_DENY_NAMESPACE, Verdict,
    },
};

use super::{Beat, Datapath, Origin, attest::Attestation};
use crate::{
    actions::metrics::KernelDrops,
    config::Limits,
    observer::drops::DropCounters,
    sys::clock::ClockSource,
    sys::pidfd::ExitWatcher,
    sys::procfs::{self, PidNs},
};

/// The object `cargo xtask build` embedded (empty in a plain `cargo build`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/varta-ebpf.o"));

/// Ordinary beats wait at most this long in the ring buffer while any agent is watched.
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);

/// Why the eBPF datapath cannot run here: one line for the log or the error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

pub struct EbpfDatapath {
    /// Owns the loaded programs and their maps for as long as the daemon runs.
    _ebpf: Ebpf,
    ring: AsyncFd<RingBuf<MapData>>,
    config: Array<MapData, FilterConfig>,
    filter_config: FilterConfig,
    verdicts: BpfHashMap<MapData, u32, Verdict>,
    /// The sockets the programs are attached to.
    _uds: UnixDatagram,
    _udp: Option<UdpSocket>,
    logger: Option<AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>>,
    drops: Arc<DropCounters>,
    attestation: Attestation,
    /// Verified senders in other pid namespaces (host tgid -> namespace), until they exit.
    foreign: HashMap<u32, PidNs>,
    exits: ExitWatcher,
    /// Per-agent token buckets; an agent without one is new to the kernel, and its next
    /// beat wakes the daemon.
    buckets: BpfHashMap<MapData, u64, Bucket>,
    /// Some agent is watched for a stall: ordinary beats are drained on the timer.
    watching: bool,
}

impl EbpfDatapath {
    /// Loads and attaches the programs, or says in one line why that is not possible here.
    pub fn start(
        uds: UnixDatagram,
        udp: Option<UdpSocket>,
        clock: ClockSource,
        limits: &Limits,
        allow_cross_namespace: bool,
        drops: Arc<DropCounters>,
    ) -> Result<(Self, KernelDrops), Unavailable> {
        preflight()?;
        let mut ebpf =
            Ebpf::load(OBJECT).map_err(|e| Unavailable(format!("loading the eBPF object: {e}")))?;
        let logger = aya_log::EbpfLogger::init_with_logger(&mut ebpf, log::logger())
            .ok()
            .and_then(|l| crate::sys::readiness::readable(l).ok());

        let own_ns = procfs::pid_ns(None)
            .map_err(|e| Unavailable(format!("reading /proc/self/ns/pid: {e}")))?;
        let mut config: Array<MapData, FilterConfig> = take_map(&mut ebpf, MAP_CONFIG)?;
        let filter_config = FilterConfig {
            per_pid_rate: limits.per_pid_rate,
            per_pid_burst: limits.per_pid_burst(),
            global_rate: limits.global_rate,
            global_burst: limits.global_burst,
            pidns_dev: own_ns.dev,
            pidns_ino: own_ns.ino,
            clock: match clock {
                ClockSource::Monotonic => CLOCK_MONOTONIC,
                ClockSource::Boottime => CLOCK_BOOTTIME,
            },
            wakeup_watermark: RING_BYTES / 4,
        };
        config
            .set(0, filter_config, 0)
            .map_err(|e| Unavailable(format!("configuring the filter: {e}")))?;

        // Configured before attaching: the first datagram already meets the real settings.
        attach(&mut ebpf, "varta_uds", &uds)?;
        if let Some(udp) = &udp {
            attach(&mut ebpf, "varta_udp", udp)?;
        }

        let ring: RingBuf<MapData> = take_map(&mut ebpf, MAP_EVENTS)?;
        let ring = crate::sys::readiness::readable(ring)
            .map_err(|e| Unavailable(format!("polling the ring buffer: {e}")))?;
        let verdicts = take_map(&mut ebpf, MAP_VERDICTS)?;
        let buckets = take_map(&mut ebpf, MAP_BUCKETS)?;
        let kernel_drops: PerCpuArray<MapData, u64> = take_map(&mut ebpf, MAP_DROPS)?;
        let kernel_drops = Mutex::new(kernel_drops);
        let read_drops: KernelDrops = Box::new(move || {
            let map = kernel_drops.lock().ok()?;
            let mut sums = [0u64; DropReason::COUNT];
            for (i, sum) in sums.iter_mut().enumerate() {
                *sum = map.get(&(i as u32), 0).ok()?.iter().sum();
            }
            Some(sums)
        });

        Ok((
            EbpfDatapath {
                _ebpf: ebpf,
                ring,
                config,
                filter_config,
                verdicts,
                _uds: uds,
                _udp: udp,
                logger,
                drops,
                attestation: Attestation::new(own_ns, allow_cross_namespace),
                foreign: HashMap::new(),
                exits: ExitWatcher::new(),
                buckets,
                watching: false,
            },
            read_drops,
        ))
    }

    fn handle(&mut self, rec: &BeatRecord, out: &mut Vec<Beat>) {
        let Ok(frame) = Frame::decode(&rec.frame) else {
            // The kernel validated it with the same decoder: this cannot happen.
            log::error!("event=ebpf_record_invalid transport={}", rec.transport);
            return;
        };
        let origin = match rec.transport {
            TRANSPORT_UDS if rec.kind == KIND_VERIFY => match self.verify(rec.host_tgid, &frame) {
                Ok(ns) => Origin::Uds {
                    foreign_ns: Some(ns),
                },
                Err(reason) => {
                    self.drops.add(reason);
                    return;
                }
            },
            TRANSPORT_UDS if rec.observer_tgid == 0 => Origin::Uds {
                foreign_ns: Some(
                    self.foreign
                        .get(&rec.host_tgid)
                        .copied()
                        .unwrap_or(PidNs { dev: 0, ino: 0 }),
                ),
            },
            TRANSPORT_UDS => Origin::Uds { foreign_ns: None },
            TRANSPORT_UDP4 | TRANSPORT_UDP6 => {
                let ip = if rec.transport == TRANSPORT_UDP4 {
                    IpAddr::V4(Ipv4Addr::new(
                        rec.src_addr[0],
                        rec.src_addr[1],
                        rec.src_addr[2],
                        rec.src_addr[3],
                    ))
                } else {
                    IpAddr::V6(Ipv6Addr::from(rec.src_addr))
                };
                Origin::Udp {
                    source: SocketAddr::new(ip, rec.src_port),
                }
            }
            other => {
                log::error!("event=ebpf_record_invalid transport={other}");
                return;
            }
        };
        let pid = match origin {
            Origin::Uds { foreign_ns: None } => rec.observer_tgid,
            Origin::Uds {
                foreign_ns: Some(_),
            } => rec.host_tgid,
            Origin::Udp { .. } => frame.pid,
        };
        out.push(Beat {
            pid,
            frame,
            origin,
            recv_ns: rec.recv_ns,
        });
    }

    /// A sender in another pid namespace the kernel has no verdict for: check its frame pid
    /// against its own `NSpid`, and leave the verdict in the kernel for its next frames.
    fn verify(&mut self, tgid: u32, frame: &Frame) -> Result<PidNs, DropReason> {
        let known =
            ExitWatcher::open(tgid).and_then(|pidfd| procfs::sender(tgid).map(|s| (pidfd, s)));
        let Ok((pidfd, sender)) = known else {
            // Gone already: nothing to attest; its next frame (if any) asks again.
            let _ = self.verdicts.remove(&tgid);
            return Err(DropReason::Spoof);
        };
        if sender.ns == self.attestation.own_ns() {
            let _ = self.verdicts.remove(&tgid);
            return Err(DropReason::Spoof);
        }
        // The verdict is about the sender, for all its frames: the namespace policy, and the
        // one pid it may frame. This frame is then checked like any other.
        let state = match self.attestation.admits(sender.ns) {
            Ok(()) => VERDICT_ALLOW,
            Err(_) => VERDICT_DENY_NAMESPACE,
        };
        let verdict = Verdict {
            state,
            ns_pid: sender.own_pid,
            asked_ns: 0,
        };
        // A verdict must die with its process (a reused pid must not inherit it): without a
        // watcher (the descriptor budget is spent) none is stored, and the sender's next
        // frame is attested here again.
        if self.exits.watch(tgid, pidfd).is_err() {
            return self
                .attestation
                .check(tgid, Some(&sender), frame.pid)
                .map(|_| sender.ns);
        }
        if let Err(e) = self.verdicts.insert(tgid, verdict, 0) {
            log::warn!("event=ebpf_verdict_failed tgid={tgid} error=\"{e}\"");
        } else {
            self.foreign.insert(tgid, sender.ns);
        }
        log::info!(
            "event=cross_namespace_sender tgid={tgid} own_pid={} frame_pid={} verdict={}",
            sender.own_pid,
            frame.pid,
            if state == VERDICT_ALLOW {
                "allow"
            } else {
                "deny_namespace"
            }
        );
        self.attestation
            .check(tgid, Some(&sender), frame.pid)
            .map(|_| sender.ns)
    }

    /// The process behind a verdict exited: its pid may be reused by anyone.
    fn forget(&mut self, tgid: u32) {
        self.foreign.remove(&tgid);
        let _ = self.verdicts.remove(&tgid);
    }
}

impl Datapath for EbpfDatapath {
    fn mode(&self) -> &'static str {
        "ebpf"
    }

    fn rate_limits_applied(&self) -> bool {
        true
    }

    async fn recv(&mut self, out: &mut Vec<Beat>) -> io::Result<()> {
        let armed = self.watching;
        tokio::select! {
            tgid = self.exits.exited() => {
                self.forget(tgid);
                return Ok(());
            }
            guard = self.ring.readable_mut() => guard?.clear_ready(),
            guard = async { self.logger.as_mut().expect("guarded").readable_mut().await }, if self.logger.is_some() => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
                return Ok(());
            }
            () = tokio::time::sleep(DRAIN_INTERVAL), if armed => {}
        }
        self.drain(out);
        Ok(())
    }

    fn drain(&mut self, out: &mut Vec<Beat>) {
        let mut records = Vec::new();
        {
            let ring = self.ring.get_mut();
            while let Some(item) = ring.next() {
                if item.len() >= size_of::<BeatRecord>() {
                    // SAFETY: the item holds at least one BeatRecord, written by the
                    // program as a whole; the read copes with any alignment.
                    records.push(unsafe {
                        std::ptr::read_unaligned(item.as_ptr() as *const BeatRecord)
                    });
                }
            }
        }
        for rec in &records {
            self.handle(rec, out);
        }
    }

    fn set_watching(&mut self, watching: bool) {
        self.watching = watching;
    }

    fn agent_silent(&mut self, pid: u32, origin: &Origin) {
        // The kernel's key for the agent (see the filter): the tgid over UDS, the transport
        // and claimed pid over UDP. Forgetting its bucket makes its next beat a first beat.
        let key = match origin {
            Origin::Uds { .. } => pid as u64,
            Origin::Udp { source } => {
                let transport = if source.is_ipv4() {
                    TRANSPORT_UDP4
                } else {
                    TRANSPORT_UDP6
                };
                ((transport as u64) << 32) | pid as u64
            }
        };
        let _ = self.buckets.remove(&key);
    }

    fn set_limits(&mut self, limits: &Limits) -> anyhow::Result<()> {
        self.filter_config.per_pid_rate = limits.per_pid_rate;
        self.filter_config.per_pid_burst = limits.per_pid_burst();
        self.filter_config.global_rate = limits.global_rate;
        self.filter_config.global_burst = limits.global_burst;
        self.config.set(0, self.filter_config, 0)?;
        Ok(())
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

fn attach(ebpf: &mut Ebpf, name: &str, socket: &impl std::os::fd::AsFd) -> Result<(), Unavailable> {
    let program: &mut SocketFilter = ebpf
        .program_mut(name)
        .ok_or_else(|| Unavailable(format!("the eBPF object has no program {name}")))?
        .try_into()
        .map_err(|e| Unavailable(format!("program {name}: {e}")))?;
    program
        .load()
        .map_err(|e| Unavailable(explain_load_error(name, e)))?;
    program
        .attach(socket)
        .map_err(|e| Unavailable(format!("attaching {name} to the socket: {e}")))
}

/// Turns a verifier rejection into the kernel feature that is missing.
fn explain_load_error(name: &str, e: ProgramError) -> String {
    let kernel = kernel_release();
    if let ProgramError::LoadError {
        io_error,
        verifier_log,
    } = &e
    {
        let log = verifier_log.to_string();
        for helper in [
            "bpf_get_ns_current_pid_tgid",
            "bpf_get_current_pid_tgid",
            "bpf_ktime_get_boot_ns",
        ] {
            // The verifier names a helper the program type may not call: "unknown func NAME#ID".
            if log.contains(&format!("unknown func {helper}#")) {
                return format!(
                    "kernel {kernel} does not let socket filters call {helper} (sender attestation needs Linux 6.10 or later)"
                );
            }
        }
        let last = log
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_owned();
        return format!("kernel {kernel} refused program {name}: {io_error}; verifier: {last}");
    }
    format!("loading {name} on kernel {kernel}: {e}")
}

/// Checks what can be known before trying: an embedded object, privileges, kernel version.
fn preflight() -> Result<(), Unavailable> {
    if OBJECT.is_empty() {
        return Err(Unavailable(
            "this binary was built without the eBPF object (build it with `cargo xtask build`)"
                .into(),
        ));
    }
    let missing = missing_capabilities();
    if !missing.is_empty() {
        return Err(Unavailable(format!(
            "missing privilege {} (run as root, or grant CAP_BPF and CAP_NET_ADMIN)",
            missing.join(" and ")
        )));
    }
    let release = kernel_release();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version < (5, 8) {
        return Err(Unavailable(format!(
            "kernel {release} has no BPF ring buffer (needs Linux 5.8 or later)"
        )));
    }
    Ok(())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// The capabilities this process lacks for loading and attaching (root has all).
fn missing_capabilities() -> Vec<&'static str> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    let effective = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    let has = |cap: u32| effective & (1 << cap) != 0;
    let mut missing = Vec::new();
    // Before CAP_BPF existed, CAP_SYS_ADMIN covered BPF.
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

/// Removes whatever filter is attached to the sockets (after a failed start, so the
/// userspace datapath sees every datagram).
pub fn detach(uds: &UnixDatagram, udp: Option<&UdpSocket>) {
    let _ = SocketFilter::detach(uds);
    if let Some(udp) = udp {
        let _ = SocketFilter::detach(udp);
    }
}
