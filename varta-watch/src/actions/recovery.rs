//! Recovery commands for stalled and dying agents: argv with `{pid}` substituted, no shell,
//! a cleared environment unless asked otherwise, debounced per pid, killed at the timeout,
//! and always reaped (a pidfd tells when the child exits; waitpid collects it).
//!
//! Whoever can write to the socket decides when recovery runs, so the host is protected
//! globally too: at most `max_running` commands at once and at most `spawn_rate` starts a
//! second (a token bucket of one second's burst); a recovery over either limit is
//! suppressed and counted, not queued. At shutdown the commands still running after the
//! grace period are killed ([`Recovery::kill_all`]).
//!
//! Nor can one user take them all: the agents of one uid (the agent's process uid) get at
//! most `max_running_per_uid` running and `spawn_rate_per_uid` starts a second, and one-shot
//! agents (beat for less than `established_after`) together at most half of each global
//! limit, so agents with a history keep the rest. A stall's suppressed recovery is retried
//! by `actions` while the agent stays stalled.
//!
//! The command is told a pid, so that pid must still be the process that beat: just before
//! the spawn, the process holding it is compared with the agent's recorded start time
//! (`sys::process`). A pid another process holds now is never recovered (suppressed,
//! `pid_reused`); a pid nobody holds (the agent died) is, as the command may restart it.
//! A UDP agent's pid is only a claim, possibly of another host: not checked.

use std::{
    collections::{HashMap, HashSet},
    os::unix::process::CommandExt,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use varta_common::ratelimit::Limit;

use crate::{
    config::RecoveryConfig,
    sys::{
        pidfd::ExitWatcher,
        process::{Continuity, StartTime},
    },
    vocab::{
        beat::Origin,
        recovery::{Finished, NotRun, Outcome, Run},
    },
};

/// Whose recovery it is, for the budgets per uid (or pod) and for one-shot agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Who {
    /// The agent's process uid (None: unknown, a UDP agent).
    pub uid: Option<u32>,
    /// A key of the agent's pod (a hash of its pod uid), when it runs in one.
    pub pod: Option<u64>,
    /// Beat for at least `established_after`.
    pub established: bool,
}

impl Default for Who {
    fn default() -> Self {
        Who {
            uid: None,
            pod: None,
            established: true,
        }
    }
}

/// Whose budget a recovery is charged to: the agent's pod when it runs in one, so pods that
/// run as one uid (often root) do not share one; else its uid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Tenant {
    Pod(u64),
    Uid(u32),
}

impl Who {
    fn tenant(&self) -> Option<Tenant> {
        self.pod.map(Tenant::Pod).or(self.uid.map(Tenant::Uid))
    }
}

/// What an admitted recovery takes: its spawn tokens (the buckets' clocks after the take)
/// and when it was admitted.
#[derive(Debug, Clone, Copy)]
struct Admitted {
    now: Instant,
    spawn_tat: u64,
    uid_budget: Option<Budget>,
    one_shot_tat: u64,
}

/// A budget: commands running, and a spawn bucket's clock.
#[derive(Debug, Default, Clone, Copy)]
struct Budget {
    running: usize,
    tat: u64,
}

pub struct Recovery {
    config: RecoveryConfig,
    /// Budgets per tenant, pod or uid (entries with nothing running and a full bucket are
    /// dropped).
    per_tenant: HashMap<Tenant, Budget>,
    /// The one-shot agents' shared budget.
    one_shot: Budget,
    /// Whose each running command is (by child pid), to give its slot back.
    owners: HashMap<u32, Who>,
    last_run: HashMap<u32, Instant>,
    running: usize,
    /// Process groups of the commands not yet reaped: a supervisor removes its child before
    /// reaping it, so every pid here is still ours to kill.
    children: Arc<Mutex<HashSet<u32>>>,
    /// The spawn rate's bucket (`varta_common::ratelimit`, the beats' integer arithmetic):
    /// its clock, in nanoseconds since `epoch`.
    spawn_tat: u64,
    epoch: Instant,
    tx: mpsc::UnboundedSender<Finished>,
    rx: mpsc::UnboundedReceiver<Finished>,
    /// The observer is shutting down: nothing new is started (what runs is awaited).
    stopping: bool,
}

impl Recovery {
    pub fn new(config: RecoveryConfig) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Recovery {
            spawn_tat: 0,
            config,
            per_tenant: HashMap::new(),
            one_shot: Budget::default(),
            owners: HashMap::new(),
            last_run: HashMap::new(),
            running: 0,
            children: Arc::default(),
            epoch: Instant::now(),
            tx,
            rx,
            stopping: false,
        }
    }

    /// Shutdown began: stalls surfaced from now on are recorded, never acted on (the
    /// command would be killed at the end of the grace period, half done).
    pub fn stop_starting(&mut self) {
        self.stopping = true;
    }

    pub fn set_config(&mut self, config: RecoveryConfig) {
        self.config = config;
    }

    /// Whether an agent that beat for `beating_ns` has a history (is not one-shot).
    pub fn established(&self, beating_ns: u64) -> bool {
        beating_ns >= self.config.established_after.as_nanos() as u64
    }

    pub fn running(&self) -> usize {
        self.running
    }

    /// The argv for `pid`: `{pid}` replaced, or the pid appended when no argument has it.
    pub fn argv(template: &[String], pid: u32) -> Vec<String> {
        let pid = pid.to_string();
        let mut argv: Vec<String> = template.iter().map(|a| a.replace("{pid}", &pid)).collect();
        if !template.iter().any(|a| a.contains("{pid}")) {
            argv.push(pid);
        }
        argv
    }

    /// Starts the recovery command for `pid`, whose agent's process started at `started`,
    /// unless refused, debounced or suppressed; the child's pid when it started.
    #[cfg(test)]
    pub fn start(
        &mut self,
        pid: u32,
        origin: Origin,
        started: Option<StartTime>,
    ) -> Result<Option<u32>, NotRun> {
        self.start_for(pid, origin, started, Who::default())
    }

    /// [`Recovery::start`] within `who`'s budgets too: admitted by the policy, then
    /// spawned.
    pub fn start_for(
        &mut self,
        pid: u32,
        origin: Origin,
        started: Option<StartTime>,
        who: Who,
    ) -> Result<Option<u32>, NotRun> {
        let admitted = self.admit(pid, origin, started, who)?;
        self.take(pid, who, admitted);
        Ok(self.spawn(pid, who))
    }

    /// The admission policy, in order: transport, shutdown, debounce, the running caps
    /// (global, the uid's, one-shot agents'), the spawn rates (the same three), and last,
    /// as close to the spawn as it gets, whether the pid is still the agent's. Budgets are
    /// taken from copies: nothing changes unless the command is admitted.
    fn admit(
        &self,
        pid: u32,
        origin: Origin,
        started: Option<StartTime>,
        who: Who,
    ) -> Result<Admitted, NotRun> {
        if matches!(origin, Origin::Udp { .. }) && !self.config.allow_udp {
            return Err(NotRun::Refused("unauthenticated_transport"));
        }
        if self.stopping {
            return Err(NotRun::Suppressed("shutdown"));
        }
        let now = Instant::now();
        if self
            .last_run
            .get(&pid)
            .is_some_and(|t| now.duration_since(*t) < self.config.debounce)
        {
            return Err(NotRun::Debounced);
        }
        if self.running >= self.config.max_running {
            return Err(NotRun::Suppressed("max_running"));
        }
        let half = |n: usize| n.div_ceil(2).max(1);
        let mut uid_budget = who
            .tenant()
            .map(|t| self.per_tenant.get(&t).copied().unwrap_or_default());
        if uid_budget.is_some_and(|b| b.running >= self.config.max_running_per_uid) {
            return Err(NotRun::Suppressed("uid_max_running"));
        }
        let mut one_shot = self.one_shot;
        if !who.established && one_shot.running >= half(self.config.max_running) {
            return Err(NotRun::Suppressed("one_shot_max_running"));
        }
        // One second's burst.
        let now_ns = u64::try_from(now.duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        let take = |rate: u32, tat: &mut u64| {
            Limit::new(rate, rate).is_none_or(|limit| limit.take(tat, now_ns))
        };
        let mut spawn_tat = self.spawn_tat;
        if !take(self.config.spawn_rate, &mut spawn_tat) {
            return Err(NotRun::Suppressed("spawn_rate"));
        }
        if let Some(b) = &mut uid_budget
            && !take(self.config.spawn_rate_per_uid, &mut b.tat)
        {
            return Err(NotRun::Suppressed("uid_spawn_rate"));
        }
        let one_shot_rate = half(self.config.spawn_rate as usize) as u32;
        if !who.established && !take(one_shot_rate, &mut one_shot.tat) {
            return Err(NotRun::Suppressed("one_shot_spawn_rate"));
        }
        if matches!(origin, Origin::Uds { .. })
            && Continuity::check(pid, started) == Continuity::Reused
        {
            return Err(NotRun::Suppressed("pid_reused"));
        }
        Ok(Admitted {
            now,
            spawn_tat,
            uid_budget,
            one_shot_tat: one_shot.tat,
        })
    }

    /// Keeps what an admitted recovery took: the spawn tokens and its debounce time.
    fn take(&mut self, pid: u32, who: Who, admitted: Admitted) {
        self.spawn_tat = admitted.spawn_tat;
        if let (Some(tenant), Some(b)) = (who.tenant(), admitted.uid_budget) {
            self.per_tenant.insert(tenant, b);
        }
        if !who.established {
            self.one_shot.tat = admitted.one_shot_tat;
        }
        let now = admitted.now;
        self.last_run.insert(pid, now);
        if self.last_run.len() > 4096 {
            let debounce = self.config.debounce;
            self.last_run
                .retain(|_, t| now.duration_since(*t) < debounce);
        }
    }

    /// Spawns the command for `pid` and supervises it; the child's pid when it started (a
    /// spawn that failed is reported as finished).
    fn spawn(&mut self, pid: u32, who: Who) -> Option<u32> {
        let argv = Self::argv(&self.config.argv, pid);
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        crate::actions::capture::prepare(&mut cmd, self.config.capture_bytes);
        if !self.config.inherit_env {
            cmd.env_clear().env("PATH", "/usr/bin:/bin");
        }
        cmd.envs(self.config.env.iter().map(|(k, v)| (k, v)));
        // Its own process group: a timeout kills whatever the command started too.
        cmd.process_group(0);
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = self.tx.send(Finished {
                    pid,
                    outcome: Outcome::SpawnFailed,
                    detail: format!("{}: {e}", argv[0]),
                    reason: None,
                    run: None,
                });
                return None;
            }
        };
        self.running += 1;
        if let Some(tenant) = who.tenant() {
            self.per_tenant.entry(tenant).or_default().running += 1;
        }
        if !who.established {
            self.one_shot.running += 1;
        }
        self.owners.insert(child.id(), who);
        self.children.lock().expect("poisoned").insert(child.id());
        let tx = self.tx.clone();
        let timeout = self.config.timeout;
        let children = self.children.clone();
        let child_pid = child.id();
        let capture = crate::actions::capture::start(&mut child, self.config.capture_bytes);
        let spawned_at = Instant::now();
        tokio::spawn(async move {
            let (outcome, detail, status) = supervise(child, timeout, children).await;
            let output = match capture {
                Some(c) => Some(c.finish().await),
                None => None,
            };
            let run = Run {
                child: child_pid,
                status,
                elapsed: spawned_at.elapsed(),
                output,
            };
            let _ = tx.send(Finished {
                pid,
                outcome,
                detail,
                reason: None,
                run: Some(run),
            });
        });
        Some(child_pid)
    }

    /// Kills every running command's process group (shutdown, after the grace period);
    /// their supervisors still reap them and report them finished.
    pub fn kill_all(&self) -> usize {
        let children = self.children.lock().expect("poisoned");
        for &child in children.iter() {
            kill_group(child);
        }
        children.len()
    }

    /// The next finished recovery.
    pub async fn finished(&mut self) -> Finished {
        let finished = self.rx.recv().await.expect("the recovery holds a sender");
        if finished.outcome != Outcome::SpawnFailed {
            self.running -= 1;
        }
        if let Some(who) = (finished.run.as_ref()).and_then(|run| self.owners.remove(&run.child)) {
            if let Some(b) = who.tenant().and_then(|t| self.per_tenant.get_mut(&t)) {
                b.running -= 1;
            }
            if !who.established {
                self.one_shot.running -= 1;
            }
        }
        if self.per_tenant.len() > 1024 {
            let now_ns = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.per_tenant
                .retain(|_, b| b.running > 0 || b.tat > now_ns);
        }
        finished
    }
}

/// Waits for the child, killing its process group at the timeout; always reaps it.
async fn supervise(
    mut child: std::process::Child,
    timeout: Option<Duration>,
    children: Arc<Mutex<HashSet<u32>>>,
) -> (Outcome, String, Option<std::process::ExitStatus>) {
    let exited = async {
        match ExitWatcher::open(child.id()).and_then(crate::sys::readiness::readable) {
            Ok(fd) => {
                let _ = fd.readable().await;
            }
            // No pidfd (old kernel): poll, slowly, until it is done. try_wait reaps, so
            // the child leaves `children` under the same lock (kill_all never sees it reaped).
            Err(_) => loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let mut running = children.lock().expect("poisoned");
                if matches!(child.try_wait(), Ok(Some(_))) {
                    running.remove(&child.id());
                    break;
                }
            },
        }
    };
    let timed_out = match timeout {
        Some(t) => tokio::time::timeout(t, exited).await.is_err(),
        None => {
            exited.await;
            false
        }
    };
    // Under the lock: once removed, `kill_all` no longer targets it, so it may be reaped.
    {
        let mut running = children.lock().expect("poisoned");
        if timed_out {
            kill_group(child.id());
        }
        running.remove(&child.id());
    }
    // The child has exited (or was just killed): wait() returns promptly and reaps it.
    let status = tokio::task::spawn_blocking(move || child.wait()).await;
    let exit = status.as_ref().ok().and_then(|s| s.as_ref().ok()).copied();
    let (outcome, detail) = match (timed_out, status) {
        (true, _) => (
            Outcome::Timeout,
            format!(
                "killed after {} ms",
                timeout.unwrap_or_default().as_millis()
            ),
        ),
        (false, Ok(Ok(st))) if st.success() => (Outcome::Success, "exit 0".into()),
        (false, Ok(Ok(st))) => (Outcome::Failure, st.to_string()),
        (false, Ok(Err(e))) => (Outcome::Failure, e.to_string()),
        (false, Err(e)) => (Outcome::Failure, e.to_string()),
    };
    (outcome, detail, exit)
}

/// SIGKILL to a recovery command's process group. Only called for a child not reaped yet
/// (see `children`), so its pid cannot have been reused.
fn kill_group(child: u32) {
    // SAFETY: kill(2) has no memory preconditions; the target is the child's own process
    // group (created at spawn), and the child is not reaped yet.
    unsafe { libc::kill(-(child as libc::pid_t), libc::SIGKILL) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn config(max_running: usize, spawn_rate: u32) -> RecoveryConfig {
        RecoveryConfig {
            argv: s(&["/bin/sleep", "30"]),
            debounce: Duration::ZERO,
            timeout: Some(Duration::from_secs(60)),
            max_running,
            spawn_rate,
            max_running_per_uid: max_running,
            spawn_rate_per_uid: spawn_rate,
            established_after: Duration::ZERO,
            env: Vec::new(),
            inherit_env: false,
            allow_udp: false,
            capture_bytes: None,
        }
    }

    const UDS: Origin = Origin::Uds {
        cross_namespace: false,
    };

    /// Starts recovery for `pid` as the process holding it now.
    fn start(r: &mut Recovery, pid: u32) -> Result<Option<u32>, NotRun> {
        r.start(pid, UDS, StartTime::of(pid))
    }

    fn on_runtime(f: impl AsyncFnOnce()) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f());
    }

    /// Kills what is running and waits until every command was reaped.
    async fn end_all(r: &mut Recovery) {
        let n = r.kill_all();
        for _ in 0..n {
            assert_eq!(r.finished().await.outcome, Outcome::Failure);
        }
        assert_eq!(r.running(), 0);
    }

    #[test]
    fn the_global_cap_suppresses_and_kill_all_ends_the_commands() {
        on_runtime(async || {
            let mut r = Recovery::new(config(2, 100));
            assert!(matches!(start(&mut r, 1), Ok(Some(_))));
            assert!(matches!(start(&mut r, 2), Ok(Some(_))));
            assert_eq!(start(&mut r, 3), Err(NotRun::Suppressed("max_running")));
            assert_eq!(r.running(), 2);
            end_all(&mut r).await;
            assert!(matches!(start(&mut r, 3), Ok(Some(_))));
            end_all(&mut r).await;
            // Shutdown began: nothing new starts, whatever the limits.
            r.stop_starting();
            assert_eq!(start(&mut r, 4), Err(NotRun::Suppressed("shutdown")));
        });
    }

    #[test]
    fn pods_of_one_uid_have_budgets_of_their_own() {
        on_runtime(async || {
            let mut cfg = config(10, 100);
            cfg.max_running_per_uid = 1;
            let mut r = Recovery::new(cfg);
            let who = |pod| Who {
                uid: Some(0),
                pod,
                established: true,
            };
            let go = |r: &mut Recovery, pid: u32, w| r.start_for(pid, UDS, StartTime::of(pid), w);
            assert!(matches!(go(&mut r, 1, who(Some(7))), Ok(Some(_))));
            // Another pod of the same uid: a budget of its own.
            assert!(matches!(go(&mut r, 2, who(Some(8))), Ok(Some(_))));
            // The same pod again: its budget is spent.
            let spent = Err(NotRun::Suppressed("uid_max_running"));
            assert_eq!(go(&mut r, 3, who(Some(7))), spent);
            // Outside any pod the uid's budget is apart from its pods'.
            assert!(matches!(go(&mut r, 4, who(None)), Ok(Some(_))));
            assert_eq!(go(&mut r, 5, who(None)), spent);
            end_all(&mut r).await;
        });
    }

    #[test]
    fn the_global_spawn_rate_suppresses() {
        on_runtime(async || {
            let mut r = Recovery::new(config(10, 1));
            assert!(matches!(start(&mut r, 1), Ok(Some(_))));
            assert_eq!(start(&mut r, 2), Err(NotRun::Suppressed("spawn_rate")));
            end_all(&mut r).await;
        });
    }

    #[test]
    fn a_pid_another_process_holds_is_never_recovered() {
        on_runtime(async || {
            let mut r = Recovery::new(config(10, 100));
            let me = std::process::id();
            let mine = StartTime::of(me);
            let other = mine.map(|StartTime(t)| StartTime(t + 1));
            assert_eq!(
                r.start(me, UDS, other),
                Err(NotRun::Suppressed("pid_reused"))
            );
            // Gone before the observer looked, and now held by a process: not the agent.
            assert_eq!(
                r.start(me, UDS, None),
                Err(NotRun::Suppressed("pid_reused"))
            );
            assert_eq!(r.running(), 0);
            // A dead agent's pid that nobody holds is recovered: the command may restart it.
            let mut child = std::process::Command::new("/bin/true").spawn().unwrap();
            let gone = child.id();
            child.wait().unwrap();
            if StartTime::of(gone).is_none() {
                assert!(matches!(r.start(gone, UDS, mine), Ok(Some(_))));
            }
            end_all(&mut r).await;
        });
    }

    #[test]
    fn pid_substitution_or_append() {
        assert_eq!(
            Recovery::argv(&s(&["systemctl", "restart", "app@{pid}"]), 42),
            s(&["systemctl", "restart", "app@42"])
        );
        assert_eq!(
            Recovery::argv(&s(&["/bin/kill", "-9"]), 42),
            s(&["/bin/kill", "-9", "42"])
        );
    }
}
