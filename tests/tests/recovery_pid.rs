//! A pid is not a process: after an agent exits, the kernel may give its pid to another
//! process. Recovery is never run for a pid another process holds now, and a "restart"
//! (nonce 1) from another process under the same pid is a new agent. The reuse is forced:
//! `clone3(2)` with `set_tid` (root) starts the second process with exactly the first one's
//! pid, on both datapaths.

use std::{
    ffi::CString,
    time::{Duration, Instant},
};

use varta_e2e::{Daemon, EBPF, bin, frame, require_root};

const WAIT: Duration = Duration::from_secs(30);
const THRESHOLD_MS: u64 = 2000;

/// A process started at a chosen pid; killed and reaped when dropped.
struct AtPid(u32);

impl AtPid {
    /// Runs `argv` (argv[0] a path) as a child whose pid is `pid`, which must be free.
    #[track_caller]
    fn spawn(pid: u32, argv: &[&str]) -> AtPid {
        let args: Vec<CString> = argv.iter().map(|a| CString::new(*a).unwrap()).collect();
        let mut ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        let tid = pid as libc::pid_t;
        // SAFETY: clone_args is plain integers; all-zero is its "no options" value.
        let mut clone: libc::clone_args = unsafe { std::mem::zeroed() };
        clone.exit_signal = libc::SIGCHLD as u64;
        clone.set_tid = &tid as *const libc::pid_t as u64;
        clone.set_tid_size = 1;
        // SAFETY: clone3 without CLONE_VM behaves like fork: the child gets a copy of this
        // address space with only this thread, and calls nothing but execv and _exit (both
        // async-signal-safe) on the argv prepared above; `clone` and `tid` outlive the call.
        let got = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &clone as *const libc::clone_args,
                std::mem::size_of::<libc::clone_args>(),
            )
        };
        if got == 0 {
            // SAFETY: see above; execv only returns on failure.
            unsafe {
                libc::execv(ptrs[0], ptrs.as_ptr());
                libc::_exit(127);
            }
        }
        assert!(
            got > 0,
            "clone3 at pid {pid}: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(got as u32, pid);
        AtPid(pid)
    }

    fn alive(&self) -> bool {
        std::path::Path::new(&format!("/proc/{}", self.0)).exists()
    }
}

impl Drop for AtPid {
    fn drop(&mut self) {
        // SAFETY: our own child, not reaped yet (only this drop reaps it).
        unsafe {
            libc::kill(self.0 as libc::pid_t, libc::SIGKILL);
            libc::waitpid(self.0 as libc::pid_t, std::ptr::null_mut(), 0);
        }
    }
}

fn daemon(name: &str, datapath: &str) -> Daemon {
    Daemon::builder(name, datapath)
        .args(["--threshold-ms", &THRESHOLD_MS.to_string()])
        .args(["--recovery-exec", "/bin/true {pid}"])
        .start()
}

/// Starts an agent beating every 100 ms and waits until the daemon tracks it: (its guard,
/// its pid).
fn tracked_agent(d: &Daemon) -> (varta_e2e::Proc, u32) {
    let agent = d.agent(100);
    let pid = agent.pid();
    d.wait_log_all(&["event=agent_new", &format!("pid={pid}")], WAIT);
    (agent, pid)
}

/// Field 22 of `/proc/<pid>/stat`: when the process started, in clock ticks since boot.
fn start_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    rest.split_whitespace().nth(19).unwrap().parse().unwrap()
}

/// Clock ticks since boot now (the clock of [`start_ticks`]).
fn boot_ticks() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    assert_eq!(rc, 0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    (now.tv_sec as u64 * hz) + (now.tv_nsec as u64 * hz / 1_000_000_000)
}

/// The agent exits and another process takes its pid before the agent's silence can reach
/// the threshold; the guard of that process. Fails rather than race if it took longer.
/// Start times count clock ticks (10 ms), so two processes started within one tick look
/// alike: only a forced reuse can be that fast, and this one waits for the next tick.
fn replace(agent: varta_e2e::Proc, pid: u32, argv: &[&str]) -> AtPid {
    let started = start_ticks(pid);
    let killed = Instant::now();
    drop(agent);
    varta_e2e::wait_for("the clock tick after the agent's start", WAIT, || {
        let now = boot_ticks();
        if now > started {
            Ok(())
        } else {
            Err(format!("{now} ticks, started at {started}"))
        }
    });
    let other = AtPid::spawn(pid, argv);
    assert!(
        killed.elapsed() < Duration::from_millis(THRESHOLD_MS),
        "pid {pid} was taken over only after the threshold: the stall may have come first"
    );
    other
}

fn a_reused_pid_is_never_recovered(datapath: &str) {
    let d = daemon("pid-reuse", datapath);
    let (agent, pid) = tracked_agent(&d);
    // A control: an agent that stalls alive (stopped) is recovered.
    let (stopped, control) = tracked_agent(&d);
    let other = replace(agent, pid, &["/bin/sleep", "60"]);
    stopped.signal(libc::SIGSTOP);
    d.wait_log_all(&["event=stall", &format!("pid={pid}")], WAIT);
    d.wait_log_all(
        &[
            "event=recovery",
            &format!("pid={pid}"),
            "outcome=suppressed",
            "detail=pid_reused",
        ],
        WAIT,
    );
    d.wait_metric(
        "varta_recovery_suppressed_total{reason=\"pid_reused\"}",
        1.0,
        WAIT,
    );
    d.wait_log_all(&["event=recovery_started", &format!("pid={control}")], WAIT);
    assert_eq!(
        d.count_logs(&["event=recovery_started", &format!("pid={pid}")]),
        0,
        "{}",
        d.log_text()
    );
    assert!(
        other.alive(),
        "the process holding the reused pid was left alone"
    );
    drop(stopped);
}

fn a_restart_from_another_process_is_a_new_agent(datapath: &str) {
    let d = daemon("pid-restart", datapath);
    let (agent, pid) = tracked_agent(&d);
    let pid_field = format!("pid={pid}");
    // Another process under the same pid starts its own session: nonce 1.
    let socket = d.socket.to_str().unwrap().to_owned();
    let bin = bin().display().to_string();
    let other = replace(
        agent,
        pid,
        &[&bin, "agent", "--interval-ms", "100", "--socket", &socket],
    );
    d.wait_log_all(&["event=agent_replaced", &pid_field], WAIT);
    d.wait_logs(&["event=agent_new", &pid_field], 2, WAIT);
    assert_eq!(d.count_logs(&["event=agent_restarted", &pid_field]), 0);
    assert_eq!(d.metric("varta_agent_restarts_total"), 0.0);
    // The new agent's own process is the one recovery checks against: once it dies, its
    // stall is recovered.
    drop(other);
    d.wait_log_all(&["event=stall", &pid_field], WAIT);
    let started = d.wait_log_all(&["event=recovery_started", &pid_field], WAIT);
    let logs = d.logs();
    let at = |line: &str| logs.iter().position(|l| l == line).unwrap();
    let replaced = d.wait_log_all(&["event=agent_replaced", &pid_field], WAIT);
    assert!(at(&replaced) < at(&started), "{}", d.log_text());
    // The same process starting a new session is a restart of the same agent.
    let me = std::process::id();
    d.send(&frame(me, 5));
    d.send(&frame(me, 1));
    d.wait_log_all(&["event=agent_restarted", &format!("pid={me}")], WAIT);
    assert_eq!(d.count_logs(&["event=agent_replaced"]), 1);
}

/// The pid of an agent's first beat reused before the daemon read /proc for it (L4): the
/// agent beats once and exits while the daemon is stopped (its frame waits in the ring or
/// the socket), and another process takes the pid. The kernel attested the sender's start
/// time with the frame (eBPF), or that process started after the frame arrived (userspace,
/// the kernel's arrival stamp), so it is never named as the agent, nor recovered.
fn a_pid_reused_before_the_first_read_lends_nothing() {
    a_pid_reused_before_the_first_read_lends_nothing_on("ebpf");
}

fn a_pid_reused_before_the_first_read_lends_nothing_on(datapath: &str) {
    let d = daemon("pid-first", datapath);
    let socket = d.socket.to_str().unwrap().to_owned();
    d.signal(libc::SIGSTOP);
    let agent = varta_e2e::Proc::spawn(
        std::process::Command::new(bin()).args(["beat", "--socket", &socket]),
    );
    let pid = agent.pid();
    agent.wait_success();
    let exited = boot_ticks();
    // Two ticks on: the daemon tells a younger process by its start tick against the frame's
    // arrival plus 1 ms of clock slack, which a frame from the last millisecond of a tick
    // carries into the next one.
    varta_e2e::wait_for("the second clock tick after the agent's exit", WAIT, || {
        let now = boot_ticks();
        if now > exited + 1 {
            Ok(())
        } else {
            Err(format!("{now} ticks"))
        }
    });
    let other = AtPid::spawn(pid, &["/bin/sleep", "60"]);
    d.signal(libc::SIGCONT);
    let pid_field = format!("pid={pid}");
    let new = d.wait_log_all(&["event=agent_new", &pid_field], WAIT);
    assert!(new.contains("comm=-"), "named after another process: {new}");
    d.wait_log_all(&["event=stall", &pid_field], WAIT);
    d.wait_log_all(
        &[
            "event=recovery",
            &pid_field,
            "outcome=suppressed",
            "detail=pid_reused",
        ],
        WAIT,
    );
    assert_eq!(
        d.count_logs(&["event=recovery_started", &pid_field]),
        0,
        "{}",
        d.log_text()
    );
    assert!(other.alive());
}

varta_e2e::on_both_attestations!(a_pid_reused_before_the_first_read_lends_nothing);

#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn a_pid_reused_before_the_first_read_lends_nothing_userspace_needs_root() {
    require_root!("clone3 with set_tid needs CAP_SYS_ADMIN");
    a_pid_reused_before_the_first_read_lends_nothing_on("userspace");
}

#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn a_reused_pid_is_never_recovered_userspace_needs_root() {
    require_root!("clone3 with set_tid needs CAP_SYS_ADMIN");
    a_reused_pid_is_never_recovered("userspace");
}

#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn a_reused_pid_is_never_recovered_ebpf_needs_root() {
    require_root!(EBPF);
    a_reused_pid_is_never_recovered("ebpf");
}

#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn a_restart_from_another_process_is_a_new_agent_userspace_needs_root() {
    require_root!("clone3 with set_tid needs CAP_SYS_ADMIN");
    a_restart_from_another_process_is_a_new_agent("userspace");
}

#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn a_restart_from_another_process_is_a_new_agent_ebpf_needs_root() {
    require_root!(EBPF);
    a_restart_from_another_process_is_a_new_agent("ebpf");
}
