//! Runs a command with fewer privileges, for the VM runner's guests (busybox has no
//! `setpriv --bounding-set`/`--reuid`):
//! `varta-caps [--keep CAP,CAP,...] [--uid N] -- COMMAND ARGS...`.
//! `--keep` limits the bounding, permitted, effective and inheritable sets to the named
//! capabilities (`bpf`, `net_admin`, `perfmon`, ... or `none`), so a uid-0 command gets
//! exactly those after exec. `--uid` switches uid and gid to N (all capabilities go).

use std::{ffi::CString, process::exit};

/// Capability names in number order (`capabilities(7)`), up to CAP_CHECKPOINT_RESTORE.
const NAMES: [&str; 41] = [
    "chown",
    "dac_override",
    "dac_read_search",
    "fowner",
    "fsetid",
    "kill",
    "setgid",
    "setuid",
    "setpcap",
    "linux_immutable",
    "net_bind_service",
    "net_broadcast",
    "net_admin",
    "net_raw",
    "ipc_lock",
    "ipc_owner",
    "sys_module",
    "sys_rawio",
    "sys_chroot",
    "sys_ptrace",
    "sys_pacct",
    "sys_admin",
    "sys_boot",
    "sys_nice",
    "sys_resource",
    "sys_time",
    "sys_tty_config",
    "mknod",
    "lease",
    "audit_write",
    "audit_control",
    "setfcap",
    "mac_override",
    "mac_admin",
    "syslog",
    "wake_alarm",
    "block_suspend",
    "audit_read",
    "perfmon",
    "bpf",
    "checkpoint_restore",
];

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

fn fail(msg: String) -> ! {
    eprintln!("varta-caps: {msg}");
    exit(125)
}

fn cap_number(name: &str) -> u32 {
    let name = name.trim().to_ascii_lowercase();
    let name = name.strip_prefix("cap_").unwrap_or(&name);
    match NAMES.iter().position(|n| *n == name) {
        Some(i) => i as u32,
        None => fail(format!("--keep: unknown capability {name:?}")),
    }
}

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(NAMES.len() as u32 - 1)
}

/// Bounding set first (needs CAP_SETPCAP, which is dropped with the rest afterwards).
fn keep_only(keep: &[u32]) {
    for cap in 0..=last_cap() {
        if keep.contains(&cap) {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            fail(format!(
                "dropping capability {cap} from the bounding set: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    let mut data = [CapData::default(); 2];
    for &cap in keep {
        let word = &mut data[(cap / 32) as usize];
        let bit = 1u32 << (cap % 32);
        word.effective |= bit;
        word.permitted |= bit;
        word.inheritable |= bit;
    }
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: capset(2) with a version-3 header and the two data words it expects.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        fail(format!("capset: {}", std::io::Error::last_os_error()));
    }
}

fn set_uid(uid: u32) {
    // SAFETY: plain id-changing syscalls; groups cleared first while still privileged.
    let ok = unsafe {
        libc::setgroups(0, std::ptr::null()) == 0
            && libc::setresgid(uid, uid, uid) == 0
            && libc::setresuid(uid, uid, uid) == 0
    };
    if !ok {
        fail(format!("--uid {uid}: {}", std::io::Error::last_os_error()));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(split) = args.iter().position(|a| a == "--") else {
        fail("usage: varta-caps [--keep CAP,...] [--uid N] -- COMMAND ARGS...".into())
    };
    let (opts, command) = (&args[..split], &args[split + 1..]);
    if command.is_empty() {
        fail("no command after --".into());
    }
    let mut i = 0;
    while i < opts.len() {
        let value = opts
            .get(i + 1)
            .unwrap_or_else(|| fail(format!("{} needs a value", opts[i])));
        match opts[i].as_str() {
            "--keep" if value == "none" => keep_only(&[]),
            "--keep" => keep_only(&value.split(',').map(cap_number).collect::<Vec<_>>()),
            "--uid" => set_uid(
                value
                    .parse()
                    .unwrap_or_else(|_| fail(format!("--uid: not a number: {value}"))),
            ),
            other => fail(format!("unknown option {other}")),
        }
        i += 2;
    }
    let argv: Vec<CString> = command
        .iter()
        .map(|a| CString::new(a.as_str()).unwrap_or_else(|_| fail(format!("NUL in {a:?}"))))
        .collect();
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: a NULL-terminated argv of live CStrings; execvp returns only on failure.
    unsafe { libc::execvp(ptrs[0], ptrs.as_ptr()) };
    fail(format!(
        "exec {}: {}",
        command[0],
        std::io::Error::last_os_error()
    ))
}
