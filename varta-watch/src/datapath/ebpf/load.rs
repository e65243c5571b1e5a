//! Loading the filter: the embedded object, the attestation method the running kernel allows
//! (tried in order of preference), attaching, and a reason in plain words when none works.

use std::{net::UdpSocket, os::fd::AsFd, os::unix::net::UnixDatagram, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData},
    programs::{ProgramError, SocketFilter},
};
use varta_common::filter::{Attest, FilterConfig, map, program};

use super::{btf, caps};
use crate::sys::{logger::event, procfs};

/// The object `cargo xtask build` embedded (empty in a plain `cargo build`).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/varta-ebpf.o"));

/// Testing only: `auto` (the default), `pid_tgid_helper` or `task_read`, so that the tests
/// run every method on one kernel.
pub const ATTEST_ENV: &str = "VARTA_EBPF_ATTEST";

/// Why the eBPF datapath cannot run here: one line for the log or the error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// The methods to try, in order.
pub fn requested_methods() -> Result<Vec<Attest>, Unavailable> {
    match std::env::var(ATTEST_ENV).as_deref() {
        Err(_) | Ok("auto") => Ok(Attest::ALL.to_vec()),
        Ok(name) => Attest::ALL
            .into_iter()
            .find(|a| a.name() == name)
            .map(|a| vec![a])
            .ok_or_else(|| {
                Unavailable(format!(
                    "{ATTEST_ENV}={name}: expected auto, pid_tgid_helper or task_read"
                ))
            }),
    }
}

/// What can be known before trying: an embedded object and the capabilities.
/// The inode of the initial pid namespace (`PROC_PID_INIT_INO`), the same on every kernel.
const INITIAL_PID_NS_INO: u64 = 0xEFFF_FFFC;

pub fn preflight() -> Result<(), Unavailable> {
    if OBJECT.is_empty() {
        return Err(Unavailable(
            "this binary was built without the eBPF object (build it with `cargo xtask build`)"
                .into(),
        ));
    }
    // The filter keys agents by host tgid and the daemon looks them up in /proc: both mean
    // nothing in another pid namespace (M8 of the hardening review). Its own /proc cannot
    // tell (NSpid starts at the namespace /proc was mounted for); the namespace's inode can.
    let own =
        procfs::own_pid_ns().map_err(|e| Unavailable(format!("reading /proc/self/ns/pid: {e}")))?;
    if own.ino != INITIAL_PID_NS_INO {
        return Err(Unavailable(
            "the observer is not in the host's pid namespace: the kernel names senders by their host pid, which this namespace cannot see (run it with the host's pid namespace: hostPID: true, --pid=host)"
                .into(),
        ));
    }
    let effective = caps::effective()
        .map_err(|e| Unavailable(format!("reading this process's capabilities: {e}")))?;
    let memlock = caps::memlock_hard_limit()
        .map_err(|e| Unavailable(format!("reading RLIMIT_MEMLOCK: {e}")))?;
    let needed = caps::needed(kernel_version(), memlock);
    let missing = caps::missing(&needed, effective);
    if !missing.is_empty() {
        let names: Vec<_> = missing.iter().map(|c| c.name).collect();
        let all: Vec<_> = needed.iter().map(|c| c.name).collect();
        let memlock_note = if missing.contains(&caps::CAP_SYS_RESOURCE) {
            format!(
                "; kernel {} charges BPF maps to RLIMIT_MEMLOCK, {} KiB here",
                kernel_release(),
                memlock / 1024
            )
        } else {
            String::new()
        };
        return Err(Unavailable(format!(
            "missing capability {} (run as root, or grant {}){memlock_note}",
            names.join(" and "),
            all.join(", ")
        )));
    }
    Ok(())
}

/// Creates the maps, the ring buffer sized for `ring_bytes`. Nothing runs until a program is
/// attached.
/// With `pin_dir`, every map is pinned there by name, or opened from there when a previous
/// instance pinned it.
pub fn open(ring_bytes: u32, pin_dir: Option<&Path>) -> Result<Ebpf, Unavailable> {
    let mut loader = EbpfLoader::new();
    loader.map_max_entries(map::EVENTS, ring_bytes);
    if let Some(dir) = pin_dir {
        for name in map::ALL {
            loader.map_pin_path(name, dir.join(name));
        }
    }
    loader.load(OBJECT).map_err(|e| {
        Unavailable(format!(
            "loading the eBPF object on kernel {}: {e}",
            kernel_release()
        ))
    })
}

/// Loads the UDS program of the first method the kernel accepts, with the configuration that
/// method needs, and attaches it. Configured before attaching: the first datagram already
/// meets the real settings.
pub fn attach_uds(
    ebpf: &mut Ebpf,
    methods: &[Attest],
    config_map: &mut Array<MapData, FilterConfig>,
    config: &mut FilterConfig,
    uds: &UnixDatagram,
) -> Result<Attest, Unavailable> {
    let mut refused = Vec::new();
    for &method in methods {
        match prepare(method, config_map, config).and_then(|()| load(ebpf, method.uds_program())) {
            Ok(()) => {
                for (earlier, reason) in &refused {
                    event!(
                        info,
                        "ebpf_attest_skipped",
                        attest = Attest::name(*earlier),
                        reason:% = reason,
                    );
                }
                attach(ebpf, method.uds_program(), uds)?;
                return Ok(method);
            }
            Err(reason) => refused.push((method, reason)),
        }
    }
    let reasons: Vec<_> = refused
        .iter()
        .map(|(method, reason)| format!("{} attestation: {reason}", method.name()))
        .collect();
    Err(Unavailable(format!(
        "kernel {}: {}",
        kernel_release(),
        reasons.join("; ")
    )))
}

pub fn attach_udp(ebpf: &mut Ebpf, udp: &UdpSocket) -> Result<(), Unavailable> {
    load(ebpf, program::UDP).map_err(|r| Unavailable(format!("{}: {r}", program::UDP)))?;
    attach(ebpf, program::UDP, udp)
}

/// What a method needs besides its program.
fn prepare(
    method: Attest,
    config_map: &mut Array<MapData, FilterConfig>,
    config: &mut FilterConfig,
) -> Result<(), String> {
    // Task_read needs the kernel's layout; the helper method reads only the sender's start
    // time with it, and does without when the kernel publishes no BTF.
    config.task = match (method, btf::task_offsets()) {
        (_, Ok(offsets)) => offsets,
        (Attest::TaskRead, Err(e)) => return Err(e.to_string()),
        (Attest::PidTgidHelper, Err(_)) => Default::default(),
    };
    config_map
        .set(0, *config, 0)
        .map_err(|e| format!("configuring the filter: {e}"))
}

fn load(ebpf: &mut Ebpf, name: &str) -> Result<(), String> {
    program(ebpf, name)?.load().map_err(explain)
}

fn attach(ebpf: &mut Ebpf, name: &str, socket: &impl AsFd) -> Result<(), Unavailable> {
    program(ebpf, name)
        .map_err(Unavailable)?
        .attach(socket)
        .map(drop)
        .map_err(|e| Unavailable(format!("attaching {name} to the socket: {e}")))
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SocketFilter, String> {
    ebpf.program_mut(name)
        .ok_or_else(|| format!("the eBPF object has no program {name}"))?
        .try_into()
        .map_err(|e| format!("program {name}: {e}"))
}

/// The missing thing behind a refused program, in words.
fn explain(e: ProgramError) -> String {
    let ProgramError::LoadError {
        io_error,
        verifier_log,
    } = &e
    else {
        return e.to_string();
    };
    explain_refusal(io_error, &verifier_log.to_string())
}

fn explain_refusal(io_error: &std::io::Error, log: &str) -> String {
    if let Some(helper) = refused_helper(log) {
        let since = if helper.contains("pid_tgid") {
            " (Linux 6.10 or later allows it)"
        } else {
            ""
        };
        return format!("socket filters may not call {helper} on this kernel{since}");
    }
    match verifier_reason(log) {
        // Without CAP_PERFMON in the initial user namespace the verifier applies the rules
        // for unprivileged programs (the capability check above saw only our namespace).
        Some(line) if line.contains("!root") => format!(
            "the verifier applied its unprivileged rules (CAP_PERFMON is missing in the initial user namespace): {line}"
        ),
        Some(line) => format!("the verifier refused it ({io_error}): {line}"),
        None => format!("the kernel refused it: {io_error}"),
    }
}

/// The helper a verifier log says the program type may not call: `unknown func NAME#ID`
/// (Linux 5.10, 6.1) or `program of this type cannot use helper NAME#ID` (6.12 and later).
fn refused_helper(log: &str) -> Option<&str> {
    log.lines().find_map(|line| {
        let rest = line
            .split_once("program of this type cannot use helper ")
            .or_else(|| line.split_once("unknown func "))?
            .1;
        let name = rest.split('#').next()?.trim();
        (!name.is_empty()).then_some(name)
    })
}

/// The verifier's own reason: its last line that is not one of the statistics it appends.
fn verifier_reason(log: &str) -> Option<&str> {
    const STATISTICS: [&str; 4] = [
        "processed ",
        "verification time",
        "stack depth",
        "max_states_per_insn",
    ];
    log.lines()
        .map(str::trim)
        .rev()
        .find(|l| !l.is_empty() && !STATISTICS.iter().any(|s| l.starts_with(s)))
}

/// (major, minor) of the running kernel.
fn kernel_version() -> (u32, u32) {
    let release = kernel_release();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok());
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Removes whatever filter is attached to the sockets (after a failed start, so the
/// userspace datapath sees every datagram).
pub fn detach(uds: &UnixDatagram, udp: Option<&UdpSocket>) {
    let _ = SocketFilter::detach(uds);
    if let Some(udp) = udp {
        let _ = SocketFilter::detach(udp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_refused_helper_in_every_verifier_wording() {
        // Linux 5.10 and 6.1.
        let old = "0: R1=ctx(id=0,off=0,imm=0) R10=fp0\n\
                   0: (85) call bpf_get_current_pid_tgid#14\n\
                   unknown func bpf_get_current_pid_tgid#14\n\
                   processed 1 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0\n";
        assert_eq!(refused_helper(old), Some("bpf_get_current_pid_tgid"));
        // Linux 6.12 and later.
        let new = "0: (85) call bpf_get_current_uid_gid#15\n\
                   program of this type cannot use helper bpf_get_current_uid_gid#15\n\
                   processed 1 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0\n";
        assert_eq!(refused_helper(new), Some("bpf_get_current_uid_gid"));
        assert_eq!(refused_helper("R1 invalid mem access 'scalar'\n"), None);
    }

    #[test]
    fn the_reason_is_never_the_statistics_line() {
        let log = "12: (0f) r1 += r2\n\
                   R1 pointer arithmetic on fp prohibited, null-check it first\n\
                   processed 13 insns (limit 1000000) max_states_per_insn 0 total_states 1 peak_states 1 mark_read 1\n\
                   verification time 20 usec\nstack depth 40\n\n";
        assert_eq!(
            verifier_reason(log),
            Some("R1 pointer arithmetic on fp prohibited, null-check it first")
        );
        assert_eq!(verifier_reason("processed 1 insns\n"), None);
    }

    #[test]
    fn permission_denied_names_what_is_missing() {
        let denied = std::io::Error::from_raw_os_error(libc::EACCES);
        // 6.18 with CAP_BPF but without CAP_PERFMON.
        let log = "R5 tried to add from different maps, paths or scalars, pointer arithmetic with it prohibited for !root\n\
                   processed 30 insns (limit 1000000) max_states_per_insn 0 total_states 2 peak_states 2 mark_read 1\n";
        let reason = explain_refusal(&denied, log);
        assert!(reason.contains("CAP_PERFMON"), "{reason}");
        assert!(!reason.contains("processed"), "{reason}");
        let helper = explain_refusal(&denied, "unknown func bpf_get_ns_current_pid_tgid#120\n");
        assert_eq!(
            helper,
            "socket filters may not call bpf_get_ns_current_pid_tgid on this kernel (Linux 6.10 or later allows it)"
        );
    }
}
