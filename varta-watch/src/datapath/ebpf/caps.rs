//! Which of the capabilities the eBPF datapath needs this process holds, read with capget(2)
//! before loading: a missing one is named in the fallback reason instead of the kernel's
//! bare `Permission denied`.

use std::io;

/// A capability the datapath needs, and why (the README's Datapaths section says the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needed {
    pub name: &'static str,
    bit: u32,
    /// CAP_SYS_ADMIN also grants it (the kernel's `bpf_capable()` and `perfmon_capable()`).
    sys_admin_grants: bool,
}

const CAP_SYS_ADMIN: u32 = 21;

/// Creating the maps and loading the programs.
pub const CAP_BPF: Needed = Needed {
    name: "CAP_BPF",
    bit: 39,
    sys_admin_grants: true,
};

/// The verifier's privileged rules (pointer arithmetic on the stack), and for task_read
/// attestation `bpf_get_current_task` and `bpf_probe_read_kernel`.
pub const CAP_PERFMON: Needed = Needed {
    name: "CAP_PERFMON",
    bit: 38,
    sys_admin_grants: true,
};

pub const NEEDED: [Needed; 2] = [CAP_BPF, CAP_PERFMON];

/// Before Linux 5.11 BPF maps are charged to RLIMIT_MEMLOCK (64 KiB unless raised), and
/// raising it past its hard limit needs this.
pub const CAP_SYS_RESOURCE: Needed = Needed {
    name: "CAP_SYS_RESOURCE",
    bit: 24,
    sys_admin_grants: false,
};

/// What this kernel needs: [`NEEDED`], and [`CAP_SYS_RESOURCE`] where maps are charged to
/// a memlock limit that cannot be raised without it.
pub fn needed(kernel: (u32, u32), memlock_hard_limit: u64) -> Vec<Needed> {
    let mut needed = NEEDED.to_vec();
    if kernel < (5, 11) && memlock_hard_limit != libc::RLIM_INFINITY {
        needed.push(CAP_SYS_RESOURCE);
    }
    needed
}

/// The hard RLIMIT_MEMLOCK of this process.
pub fn memlock_hard_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit.rlim_max)
}

/// The effective capability set of this process.
pub fn effective() -> io::Result<u64> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget with a version-3 header reads two `Data` entries into `data`, which
    // holds exactly two; pid 0 is this thread.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(data[0].effective as u64 | (data[1].effective as u64) << 32)
}

/// The `needed` capabilities missing from `effective`, in order.
pub fn missing(needed: &[Needed], effective: u64) -> Vec<Needed> {
    let has = |bit: u32| effective & (1 << bit) != 0;
    needed
        .iter()
        .copied()
        .filter(|cap| !(has(cap.bit) || (cap.sys_admin_grants && has(CAP_SYS_ADMIN))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sys_admin_grants_bpf_and_perfmon_and_each_is_named() {
        assert!(missing(&NEEDED, 1 << CAP_SYS_ADMIN).is_empty());
        assert!(missing(&NEEDED, 1 << 39 | 1 << 38).is_empty());
        assert_eq!(missing(&NEEDED, 1 << 39), vec![CAP_PERFMON]);
        assert_eq!(missing(&NEEDED, 1 << 38), vec![CAP_BPF]);
        assert_eq!(missing(&NEEDED, 0), NEEDED.to_vec());
    }

    #[test]
    fn memlock_charging_kernels_need_sys_resource_unless_the_limit_is_unlimited() {
        assert_eq!(needed((6, 18), 64 << 10), NEEDED.to_vec());
        assert_eq!(needed((5, 11), 64 << 10), NEEDED.to_vec());
        assert_eq!(needed((5, 10), libc::RLIM_INFINITY), NEEDED.to_vec());
        let old = needed((5, 10), 64 << 10);
        assert_eq!(old.last(), Some(&CAP_SYS_RESOURCE));
        let all = 1 << CAP_SYS_ADMIN | 1 << 39 | 1 << 38;
        assert_eq!(missing(&old, all), vec![CAP_SYS_RESOURCE]);
    }

    #[test]
    fn reads_this_process_set() {
        let eff = effective().unwrap();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let cap_eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap();
        assert_eq!(eff, cap_eff);
    }
}
