//! Who sent a Unix datagram. The filter runs in the sender's task context (a Unix datagram
//! send runs the receiver's filter), so the current task is the sender. Two ways to learn its
//! identity, one per UDS program; `varta_common::filter::Attest` says which the daemon loaded.

use core::mem::{MaybeUninit, size_of};

use aya_ebpf::{
    bindings::bpf_pidns_info,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_ns_current_pid_tgid,
        bpf_probe_read_kernel, generated,
    },
};
use varta_common::{
    DropReason,
    filter::{self, FilterConfig},
};

pub struct Sender {
    /// The sender's tgid in the initial pid namespace.
    pub host_tgid: u32,
    /// Its tgid in the observer's pid namespace; `None` when it lives in another one.
    pub observer_tgid: Option<u32>,
    /// When its process started (`filter::start_ticks`; 0: unknown).
    pub start_ticks: u32,
}

/// When the current task's process started: its thread-group leader's `start_boottime`
/// (the clock /proc shows), as `BeatRecord::start_ticks`. 0 without the offsets (no BTF) or
/// when the task cannot be read: the daemon then binds the sender as before, by pid alone.
/// `is_leader`: the current task is its thread-group leader, whose field is read directly
/// (one probe read, not two: each costs ~65 ns of the sender's send).
#[inline(always)]
fn start_ticks(cfg: &FilterConfig, is_leader: bool) -> u32 {
    if cfg.task.task_start_boottime == 0 {
        return 0;
    }
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let leader = if is_leader {
        task
    } else {
        read_u64(task.wrapping_add(cfg.task.task_group_leader as usize)) as usize as *const u8
    };
    if leader.is_null() {
        return 0;
    }
    filter::start_ticks(read_u64(
        leader.wrapping_add(cfg.task.task_start_boottime as usize),
    ))
}

/// A kernel u64 at `at`; 0 when it cannot be read. Into an uninitialised word, not
/// `bpf_probe_read_kernel::<T>` (its value is undefined after a failed read, and LLVM then
/// spills a register the verifier of Linux 6.12 sees unset, `R2 !read_ok`) nor a zeroed
/// byte array (zeroed by a call to a byte-at-a-time memset subprogram).
#[inline(always)]
fn read_u64(at: *const u8) -> u64 {
    let mut value = MaybeUninit::<u64>::uninit();
    // SAFETY: bpf_probe_read_kernel copies from any kernel address into our 8-byte buffer
    // and fails cleanly on a bad one, zeroing the buffer then: either way all 8 bytes are
    // written. The offsets are the running kernel's, from its BTF.
    unsafe {
        generated::bpf_probe_read_kernel(value.as_mut_ptr() as *mut _, 8, at as *const _);
        value.assume_init()
    }
}

pub trait Attest {
    fn sender(cfg: &FilterConfig) -> Result<Sender, DropReason>;
    /// The sender's host tgid alone, cheaper than [`Attest::sender`]: its agent's key, under
    /// which the daemon may have recorded it as attested (`wakeup` rule 6).
    fn host_tgid(cfg: &FilterConfig) -> Option<u32>;
}

/// Linux 6.10 and later: the pid helpers, which know pid namespaces themselves (the task is
/// read only for the sender's start time, when the daemon found the offsets).
pub struct PidTgidHelper;

impl Attest for PidTgidHelper {
    #[inline(always)]
    fn sender(cfg: &FilterConfig) -> Result<Sender, DropReason> {
        let pid_tgid = bpf_get_current_pid_tgid();
        let host_tgid = (pid_tgid >> 32) as u32;
        let mut ns = bpf_pidns_info { pid: 0, tgid: 0 };
        // SAFETY: `ns` is a writable bpf_pidns_info of exactly the size passed.
        let same_ns = unsafe {
            bpf_get_ns_current_pid_tgid(
                cfg.pidns_dev,
                cfg.pidns_ino,
                &mut ns,
                size_of::<bpf_pidns_info>() as u32,
            )
        } == 0;
        Ok(Sender {
            host_tgid,
            observer_tgid: same_ns.then_some(ns.tgid),
            start_ticks: start_ticks(cfg, pid_tgid as u32 == host_tgid),
        })
    }

    #[inline(always)]
    fn host_tgid(_cfg: &FilterConfig) -> Option<u32> {
        Some((bpf_get_current_pid_tgid() >> 32) as u32)
    }
}

/// Any kernel with BTF: reads the current task's fields at offsets from the kernel's BTF. The
/// daemon uses it only when it runs in the initial pid namespace, where a sender is in the
/// observer's namespace exactly when its `struct pid` is at level 0, and its tgid there is
/// its host tgid.
pub struct TaskRead;

impl Attest for TaskRead {
    #[inline(always)]
    fn sender(cfg: &FilterConfig) -> Result<Sender, DropReason> {
        // A sender whose task cannot be read cannot be attested: refused like a lie.
        let unreadable = |_| DropReason::Spoof;
        // SAFETY: helper without arguments.
        let task = unsafe { bpf_get_current_task() } as *const u8;
        let at = |offset: u32| task.wrapping_add(offset as usize);
        // SAFETY: bpf_probe_read_kernel copies from any kernel address and fails cleanly
        // on a bad one; the offsets are the running kernel's, from its BTF.
        let host_tgid: u32 = unsafe { bpf_probe_read_kernel(at(cfg.task.task_tgid) as *const u32) }
            .map_err(unreadable)?;
        // SAFETY: as above.
        let pid: *const u8 =
            unsafe { bpf_probe_read_kernel(at(cfg.task.task_thread_pid) as *const *const u8) }
                .map_err(unreadable)?;
        // SAFETY: as above.
        let level: u32 = unsafe {
            bpf_probe_read_kernel(pid.wrapping_add(cfg.task.pid_level as usize) as *const u32)
        }
        .map_err(unreadable)?;
        Ok(Sender {
            host_tgid,
            observer_tgid: (level == 0).then_some(host_tgid),
            // Whether it leads its thread group would cost a read of its own.
            start_ticks: start_ticks(cfg, false),
        })
    }

    #[inline(always)]
    fn host_tgid(cfg: &FilterConfig) -> Option<u32> {
        // SAFETY: helper without arguments.
        let task = unsafe { bpf_get_current_task() } as *const u8;
        // SAFETY: as in `sender`.
        unsafe {
            bpf_probe_read_kernel(task.wrapping_add(cfg.task.task_tgid as usize) as *const u32)
        }
        .ok()
    }
}

/// The UDP program: its senders are known only by the pid they frame; never asked.
pub struct Unattested;

impl Attest for Unattested {
    #[inline(always)]
    fn sender(_cfg: &FilterConfig) -> Result<Sender, DropReason> {
        Err(DropReason::Spoof)
    }

    #[inline(always)]
    fn host_tgid(_cfg: &FilterConfig) -> Option<u32> {
        None
    }
}
