//! The scenarios, each against a fresh observer; every figure comes from the observer's own
//! metrics and /proc, cross-checked with what the generators sent.

use std::{
    collections::HashMap,
    net::UdpSocket,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{
    Fig, Opts,
    observer::{Observer, Running, machine_busy, proc_cost},
    realtime_ns,
};

fn helper(opts: &Opts, args: &[&str]) -> Command {
    let mut c = Command::new(&opts.me);
    c.args(args).stdin(Stdio::null()).stderr(Stdio::null());
    c
}

fn kill(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// Idle: no agents. Wake-ups per second, RSS, and the time SIGTERM takes.
pub fn idle(obs: &Observer, opts: &Opts, out: &mut Vec<Fig>) {
    let run = obs.start(&opts.dir, 60_000, &[]);
    std::thread::sleep(Duration::from_millis(500));
    let (_, sw0) = run.cost();
    let t = Instant::now();
    std::thread::sleep(opts.idle);
    let (_, sw1) = run.cost();
    let wakeups = (sw1 - sw0) as f64 / t.elapsed().as_secs_f64();
    out.push(Fig::new(obs, "idle", "wakeups_per_s", wakeups, "1/s"));
    out.push(Fig::new(
        obs,
        "idle",
        "rss",
        run.rss_bytes() as f64 / 1048576.0,
        "MiB",
    ));
    let exit = run.stop();
    out.push(Fig::new(
        obs,
        "idle",
        "sigterm_exit",
        exit.as_secs_f64() * 1e3,
        "ms",
    ));
}

/// Stall latency: agents (helper processes) beat once and stay silent; the time from
/// their beat to (a) the recovery command running (it stamps the time) and (b) the stall
/// visible in /metrics (polled every millisecond), minus the threshold.
pub fn stall(obs: &Observer, opts: &Opts, out: &mut Vec<Fig>) -> (Vec<f64>, Vec<f64>) {
    const THRESHOLD_MS: u64 = 300;
    let stamps = opts.dir.join(format!("stamps-{}", obs.name));
    let _ = std::fs::remove_dir_all(&stamps);
    std::fs::create_dir_all(&stamps).unwrap();
    let recovery = format!("{} stamp {} {{pid}}", opts.me.display(), stamps.display());
    let mut extra = vec!["--recovery-exec".to_owned(), recovery];
    if !obs.incumbent {
        // Ours limits recovery spawns to 10/s by default, and 2/s per uid (all the trials
        // run as one uid); the trials come 25/s.
        extra.extend(
            [
                "--recovery-spawn-rate",
                "1000",
                "--recovery-spawn-rate-per-uid",
                "1000",
            ]
            .map(String::from),
        );
    }
    let run = Arc::new(obs.start(&opts.dir, THRESHOLD_MS, &extra));

    let seen: Arc<Mutex<HashMap<u32, Option<u64>>>> = Arc::default();
    let poller = {
        let (run, seen) = (run.clone(), seen.clone());
        let trials = opts.trials;
        std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(30);
            while Instant::now() < end {
                let Some(m) = run.try_metrics() else { continue };
                let now = realtime_ns();
                let mut seen = seen.lock().unwrap();
                for (pid, at) in seen.iter_mut().filter(|(_, at)| at.is_none()) {
                    if m.get(&format!("varta_stalls_total{{pid=\"{pid}\"}}"))
                        .is_some_and(|v| *v >= 1.0)
                    {
                        *at = Some(now);
                    }
                }
                if seen.len() == trials && seen.values().all(Option::is_some) {
                    return;
                }
                drop(seen);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let mut agents = Vec::new();
    let mut beats = HashMap::new();
    let socket = run.socket.display().to_string();
    for _ in 0..opts.trials {
        let mut child = helper(opts, &["agent", &socket])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        beats.insert(child.id(), line.trim().parse::<u64>().unwrap());
        seen.lock().unwrap().insert(child.id(), None);
        agents.push(child);
        // Spaced out, so each stall is handled on its own.
        std::thread::sleep(Duration::from_millis(40));
    }
    poller.join().unwrap();
    let threshold_ns = THRESHOLD_MS as f64 * 1e6;
    let mut to_metrics = Vec::new();
    for (pid, at) in seen.lock().unwrap().iter() {
        match at {
            Some(at) => to_metrics.push((*at as f64 - beats[pid] as f64 - threshold_ns) / 1e6),
            None => eprintln!("varta-bench: {}: no stall in /metrics for {pid}", obs.name),
        }
    }
    let mut to_recovery = Vec::new();
    let end = Instant::now() + Duration::from_secs(5);
    for (pid, beat) in &beats {
        let file = stamps.join(format!("rec-{pid}"));
        while !file.exists() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        match std::fs::read_to_string(&file)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        {
            Some(at) => to_recovery.push((at as f64 - *beat as f64 - threshold_ns) / 1e6),
            None => eprintln!("varta-bench: {}: no recovery ran for {pid}", obs.name),
        }
    }
    agents.into_iter().for_each(kill);
    drop(Arc::try_unwrap(run).ok());
    for (name, v) in [
        ("to_recovery", &mut to_recovery),
        ("to_metrics", &mut to_metrics),
    ] {
        v.sort_by(f64::total_cmp);
        out.push(Fig::new(
            obs,
            "stall",
            &format!("{name}_trials"),
            v.len() as f64,
            "",
        ));
        for (q, label) in [(0.5, "p50"), (0.99, "p99"), (1.0, "max")] {
            if let Some(x) = quantile(v, q) {
                out.push(Fig::new(
                    obs,
                    "stall",
                    &format!("{name}_{label}"),
                    x,
                    "ms beyond threshold",
                ));
            }
        }
    }
    (to_recovery, to_metrics)
}

fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[i])
}

/// `--max-beat-rate 0 --global-beat-rate 0`: no rate limit, so every beat sent is one the
/// observer must count; then `more` flags.
fn unlimited(more: &[&str]) -> Vec<String> {
    ["--max-beat-rate", "0", "--global-beat-rate", "0"]
        .iter()
        .chain(more)
        .map(|s| s.to_string())
        .collect()
}

/// What rule 5 of `varta_common::wakeup` costs: a new agent's first beat while 64 agents
/// send 20k routine beats a second (rate limits off), from its send to its beat counted in
/// /metrics (polled every millisecond), 16 trials. Ours only: the figure compares our two
/// datapaths (the eBPF filter wakes the daemon for a first beat at once; the userspace
/// datapath may be draining on its timer).
pub fn urgent_under_load(obs: &Observer, opts: &Opts, out: &mut Vec<Fig>) {
    const TRIALS: usize = 16;
    // Without the agents the sweep left in the state file (they would fill the tracker).
    let extra = unlimited(&["--tracker-capacity", "8192", "--fresh-state"]);
    let run = obs.start(&opts.dir, 600_000, &extra);
    let socket = run.socket.display().to_string();
    let pacers = start_pacers(opts, &socket, 20_000, Sends::Connected);
    std::thread::sleep(WARM_UP);
    let mut waited = Vec::new();
    let mut agents = Vec::new();
    for _ in 0..TRIALS {
        let mut child = helper(opts, &["agent", &socket])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let sent_at: u64 = line.trim().parse().unwrap();
        let sample = format!("varta_beats_total{{pid=\"{}\"}}", child.id());
        let end = Instant::now() + Duration::from_secs(2);
        loop {
            let now = realtime_ns();
            if run
                .try_metrics()
                .is_some_and(|m| m.get(&sample).is_some_and(|v| *v >= 1.0))
            {
                waited.push(now.saturating_sub(sent_at) as f64 / 1e6);
                break;
            }
            if Instant::now() > end {
                eprintln!(
                    "varta-bench: {}: agent {} not counted",
                    obs.name,
                    child.id()
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        agents.push(child);
        std::thread::sleep(Duration::from_millis(30));
    }
    sent_by(pacers);
    agents.into_iter().for_each(kill);
    waited.sort_by(f64::total_cmp);
    let scenario = "new_agent_at_20k";
    out.push(Fig::new(obs, scenario, "trials", waited.len() as f64, ""));
    for (q, label) in [(0.5, "p50"), (0.99, "p99"), (1.0, "max")] {
        if let Some(x) = quantile(&waited, q) {
            out.push(Fig::new(
                obs,
                scenario,
                &format!("to_metrics_{label}"),
                x,
                "ms",
            ));
        }
    }
}

/// One step of the rate sweep.
#[derive(Clone, Debug)]
pub struct Step {
    pub offered: f64,
    pub achieved: f64,
    pub loss: f64,
    pub cpu_per_beat_us: f64,
    pub machine_cpu_per_frame_us: f64,
    pub wakeups_per_s: f64,
}

/// The agents beat this long before a step's costs are measured: their registration (first
/// beat, identity, log line) is a once-per-agent cost, not a cost of each beat.
const WARM_UP: Duration = Duration::from_millis(500);

/// How pacing agents address their frames.
#[derive(Clone, Copy)]
enum Sends {
    /// Connected once, as the upstream clients are.
    Connected,
    /// To the socket's path with every frame.
    ToPath,
}

/// 64 pacing agents sharing `rate` beats a second on `socket`, for the warm-up and one step.
/// `Connected`: each connects its socket once, as the upstream clients do, and a send skips
/// the path lookup (a third to a half of an unconnected `sendto` here): the generators offer
/// more. The floor comparison keeps the unconnected sends it was first measured with.
fn start_pacers(opts: &Opts, socket: &str, rate: u64, sends: Sends) -> Vec<Child> {
    let per = format!("{}", rate / 64);
    let ms = (WARM_UP + opts.step).as_millis().to_string();
    let mode = match sends {
        Sends::Connected => "connected",
        Sends::ToPath => "to_path",
    };
    (0..64)
        .map(|_| {
            helper(opts, &["pace", socket, &per, &ms, mode])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// CPU seconds `busy` over a window of `window` per frame sent in it, in microseconds. The
/// frames sent in the window: its share of the pacers' run, which began with the warm-up.
fn cpu_per_frame_us(busy: f64, window: Duration, sent: u64, opts: &Opts) -> f64 {
    let run_s = (WARM_UP + opts.step).as_secs_f64();
    let sent_in_window = sent as f64 * window.as_secs_f64() / run_s;
    busy / sent_in_window.max(1.0) * 1e6
}

/// Waits for pacing agents to finish; the beats they sent.
fn sent_by(pacers: Vec<Child>) -> u64 {
    pacers
        .into_iter()
        .map(|c| {
            let o = c.wait_with_output().unwrap();
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
        })
        .sum()
}

/// One step of 64 agents beating at `rate` a second in total into a running observer: what
/// it cost the observer and the machine, and how many beats it counted. `Err`: the observer
/// stopped answering (why, naming the step).
fn measure_step(run: &Running, opts: &Opts, rate: u64) -> Result<Step, String> {
    let beats_start = run
        .family_sum("varta_beats_total")
        .map_err(|e| format!("{e} before the {rate}/s step"))?;
    let socket = run.socket.display().to_string();
    let pacers = start_pacers(opts, &socket, rate, Sends::Connected);
    // The costs are measured from here: every agent has started and been registered.
    std::thread::sleep(WARM_UP);
    let beats0 = run.family_sum("varta_beats_total");
    let (cpu0, sw0) = run.cost();
    let busy0 = machine_busy();
    let t = Instant::now();
    let sent = sent_by(pacers);
    let wall = t.elapsed().as_secs_f64();
    // Over the senders' step only, the window `cpu_per_frame_us` divides by.
    let busy1 = machine_busy();
    // Drained when the count stops moving.
    let drained = beats0.and_then(|beats0| {
        let mut counted = run.family_sum("varta_beats_total")? - beats0;
        let end = Instant::now() + Duration::from_secs(3);
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = run.family_sum("varta_beats_total")? - beats0;
            if now == counted || Instant::now() > end {
                return Ok((counted, beats0));
            }
            counted = now;
        }
    });
    let (counted, beats0) = drained.map_err(|e| format!("{e} at the {rate}/s step"))?;
    let (cpu1, sw1) = run.cost();
    let total = counted + beats0 - beats_start;
    let run_s = (WARM_UP + opts.step).as_secs_f64();
    Ok(Step {
        offered: rate as f64,
        achieved: sent as f64 / run_s,
        loss: (sent as f64 - total).max(0.0) / (sent as f64).max(1.0),
        cpu_per_beat_us: (cpu1 - cpu0) / counted.max(1.0) * 1e6,
        machine_cpu_per_frame_us: cpu_per_frame_us(busy1 - busy0, opts.step, sent, opts),
        wakeups_per_s: (sw1 - sw0) as f64 / wall,
    })
}

/// A step's figures under `scenario`.
fn push_step(obs: &Observer, scenario: &str, step: &Step, out: &mut Vec<Fig>) {
    for (fig, v, unit) in [
        ("cpu_per_beat", step.cpu_per_beat_us, "us"),
        ("machine_cpu_per_frame", step.machine_cpu_per_frame_us, "us"),
        ("wakeups_per_s", step.wakeups_per_s, "1/s"),
        // Batched draining: the suite once asserted at most one per 3 beats.
        (
            "wakeups_per_beat",
            step.wakeups_per_s / step.achieved.max(1.0),
            "",
        ),
        ("loss", step.loss, "fraction"),
    ] {
        out.push(Fig::new(obs, scenario, fig, v, unit));
    }
}

/// The kernel's default Unix datagram queue (`net.unix.max_dgram_qlen`), as in a pod's own
/// network namespace or on a host without systemd.
pub const SHALLOW_QLEN: u32 = 10;

/// The 20k step with the observer's socket made under `net.unix.max_dgram_qlen` 10 (the
/// sysctl is read when a socket is created: it is set for the start and put back), beside
/// the bench's own queue (the machine line says which): what batching the userspace
/// datapath keeps in a pod without the kubelet's sysctl (deploy/kubernetes-userspace).
pub fn shallow_queue(obs: &Observer, opts: &Opts, out: &mut Vec<Fig>) {
    let run = {
        const QLEN: &str = "/proc/sys/net/unix/max_dgram_qlen";
        let _qlen = varta_e2e::Sysctl::set(QLEN, SHALLOW_QLEN)
            .unwrap_or_else(|e| panic!("setting net.unix.max_dgram_qlen to {SHALLOW_QLEN}: {e}"));
        obs.start(
            &opts.dir,
            600_000,
            &unlimited(&["--tracker-capacity", "8192"]),
        )
    };
    let step = measure_step(&run, opts, 20_000).unwrap_or_else(|why| panic!("{why}"));
    push_step(obs, &format!("rate_20k_qlen_{SHALLOW_QLEN}"), &step, out);
}

/// 64 agents (helper processes) beat at a total rate stepped up until beats are lost or
/// the senders cannot offer the rate; rate limits off. The steps measured, and why the
/// sweep stopped where it did (a loss, the generators falling short of the offered rate,
/// or the observer no longer answering).
pub fn sweep(obs: &Observer, opts: &Opts, out: &mut Vec<Fig>) -> (Vec<Step>, Option<String>) {
    let extra = unlimited(&["--tracker-capacity", "8192"]);
    let run = obs.start(&opts.dir, 600_000, &extra);
    let mut steps = Vec::new();
    let mut best = 0.0f64;
    let mut stopped = None;
    for &rate in &opts.rates {
        let step = match measure_step(&run, opts, rate) {
            Ok(step) => step,
            Err(why) => {
                stopped = Some(why);
                break;
            }
        };
        eprintln!(
            "varta-bench: {} {rate}/s offered: loss {:.4} cpu/beat {:.2}us",
            obs.name, step.loss, step.cpu_per_beat_us
        );
        let sustained = step.loss == 0.0 && step.achieved >= 0.95 * step.offered;
        if rate == 20_000 {
            push_step(obs, "rate_20k_64_agents", &step, out);
        }
        let (loss, achieved) = (step.loss, step.achieved);
        steps.push(step);
        if !sustained {
            stopped = Some(if loss > 0.0 {
                format!("lost {:.2} % at {rate}/s", loss * 100.0)
            } else {
                format!(
                    "no loss, but the generators reached only {achieved:.0} of {rate}/s: they, not the observer, bound this figure"
                )
            });
            if loss == 0.0 {
                best = best.max(achieved);
            }
            break;
        }
        best = best.max(achieved);
    }
    // The highest rate received without loss, as the generators achieved it.
    out.push(Fig::new(
        obs,
        "sweep_64_agents",
        "max_zero_loss_rate",
        best,
        "beats/s",
    ));
    (steps, stopped)
}

/// The load a restart happens under.
#[derive(Clone, Copy)]
pub enum RestartLoad {
    /// 16 agents at 20 beats/s.
    Light,
    /// The rate scenario's 20k beats/s: 64 agents at 312 beats/s.
    Rate20k,
}

/// A restart in the middle: agents connected once (as the upstream clients are) beat at
/// `load`, one more beats once 300 ms before and stays silent; the observer is stopped and
/// started again (or, `takeover`, a second one is started on the same socket).
/// Figures: beats the agents sent that no instance counted, and how late the silent agent's
/// stall came beyond its deadline (or that it never came).
pub fn restart(obs: &Observer, opts: &Opts, takeover: bool, load: RestartLoad, out: &mut Vec<Fig>) {
    const THRESHOLD_MS: u64 = 1000;
    let (agents, per_agent, suffix) = match load {
        RestartLoad::Light => (16, 20, ""),
        RestartLoad::Rate20k => (64, 20_000 / 64, "_20k"),
    };
    let scenario = if takeover {
        format!("restart_takeover{suffix}")
    } else {
        format!("restart_stop_start{suffix}")
    };
    let scenario = scenario.as_str();
    // No rate limit at 312 beats/s.
    let extra = unlimited(&[]);
    let mut run = obs.start(&opts.dir, THRESHOLD_MS, &extra);
    // Ours carries its counters from the scenarios before (the state file): start from here.
    let baseline = run.family_sum("varta_beats_total").unwrap_or(0.0);
    let socket = run.socket.display().to_string();
    let per_agent = per_agent.to_string();
    let pacers: Vec<Child> = (0..agents)
        .map(|_| {
            helper(opts, &["pace", &socket, &per_agent, "4000", "connected"])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let mut wedged = helper(opts, &["agent", &socket])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(wedged.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let wedged_beat: u64 = line.trim().parse().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let before = run.family_sum("varta_beats_total").unwrap_or(0.0);
    let run = if takeover {
        obs.start_beside(&mut run, &opts.dir, THRESHOLD_MS, &extra)
    } else {
        run.stop();
        obs.start(&opts.dir, THRESHOLD_MS, &extra)
    };
    // The first instance's count carries over (ours) or starts again at 0 (the incumbent).
    let carried = run.family_sum("varta_beats_total").unwrap_or(0.0) >= before;
    let deadline = wedged_beat as f64 + THRESHOLD_MS as f64 * 1e6;
    let mut stall_at = None;
    let end = Instant::now() + Duration::from_secs(5);
    let wedged_stall = format!("varta_stalls_total{{pid=\"{}\"}}", wedged.id());
    // Or restored as stalled: the first instance surfaced it just before handing over.
    let wedged_status = format!("varta_status{{pid=\"{}\"}}", wedged.id());
    while Instant::now() < end && stall_at.is_none() {
        if run.scrape().is_ok_and(|m| {
            m.get(&wedged_stall).is_some_and(|v| *v >= 1.0)
                || m.get(&wedged_status).is_some_and(|v| *v == 3.0)
        }) {
            stall_at = Some(realtime_ns());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let sent = sent_by(pacers);
    std::thread::sleep(Duration::from_millis(300));
    let after = run.family_sum("varta_beats_total").unwrap_or(0.0);
    // The silent agent's one beat is in the count too.
    let counted = if carried { after } else { before + after } - baseline - 1.0;
    let lost = (sent as f64 - counted).max(0.0);
    kill(wedged);
    eprintln!(
        "varta-bench: {} {scenario}: sent {sent}, counted {counted}, stall {}",
        obs.name,
        stall_at.map_or("never".into(), |at| format!(
            "{:.0} ms late",
            (at as f64 - deadline) / 1e6
        ))
    );
    out.push(Fig::new(obs, scenario, "lost_beats", lost, "beats"));
    out.push(Fig::new(
        obs,
        scenario,
        "lost_fraction",
        lost / (sent as f64).max(1.0),
        "fraction",
    ));
    // Never surfaced: -1.
    out.push(Fig::new(
        obs,
        scenario,
        "wedged_stall_beyond_deadline",
        stall_at.map_or(-1.0, |at| (at as f64 - deadline).max(0.0) / 1e6),
        "ms (-1: never)",
    ));
}

/// The rates at which whole-machine CPU per frame is compared with the floor.
const FLOOR_RATES: [u64; 3] = [20_000, 160_000, 320_000];

fn floor_scenario(rate: u64) -> String {
    format!("floor_{}k_64_agents", rate / 1000)
}

/// Turns each receiver takes at each floor rate; the medians are reported.
pub const FLOOR_ROUNDS: usize = 5;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Whole-machine CPU per frame with a null receiver on the socket path (the physical floor
/// of sending a datagram) and with each of `ours`, at the floor rates. The receivers take
/// turns, [`FLOOR_ROUNDS`] rounds at each rate, and each reports the median of its turns:
/// the machine's load drifts by as much as the receivers differ (the floor alone moved
/// 2.8-4.3 us a frame at 160k between runs), and turns taken side by side share the drift.
pub fn floor(ours: &[&Observer], opts: &Opts, out: &mut Vec<Fig>) {
    let socket = opts.dir.join("null.sock");
    let socket_s = socket.display().to_string();
    let mut null = helper(opts, &["null", &socket_s])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    let _ = std::io::BufRead::read_line(
        &mut std::io::BufReader::new(null.stdout.as_mut().unwrap()),
        &mut ready,
    );
    // Without the agents and pins the scenarios before left (the restart's, last).
    let extra = unlimited(&["--tracker-capacity", "8192", "--fresh-state"]);
    let runs: Vec<_> = ours
        .iter()
        .map(|o| o.start(&opts.dir, 600_000, &extra))
        .collect();
    let mut receivers = vec![(crate::report::FLOOR, socket_s, null.id())];
    for (o, run) in ours.iter().zip(&runs) {
        receivers.push((o.name, run.socket.display().to_string(), run.pid()));
    }
    for rate in FLOOR_RATES {
        // Per receiver, per round: (whole machine, senders and receiver only) us a frame.
        let mut turns = vec![Vec::new(); receivers.len()];
        for _ in 0..FLOOR_ROUNDS {
            for (i, (name, socket, receiver)) in receivers.iter().enumerate() {
                let pacers = start_pacers(opts, socket, rate, Sends::ToPath);
                std::thread::sleep(WARM_UP);
                let involved = || {
                    let senders: f64 = pacers.iter().map(|p| proc_cost(p.id()).0).sum();
                    senders + proc_cost(*receiver).0
                };
                let (busy0, involved0, t0) = (machine_busy(), involved(), Instant::now());
                // Read before the senders exit (they would take their CPU time with them).
                std::thread::sleep(opts.step.saturating_sub(Duration::from_millis(100)));
                let (involved1, window) = (involved(), t0.elapsed());
                let sent = sent_by(pacers);
                let per_frame = cpu_per_frame_us(machine_busy() - busy0, opts.step, sent, opts);
                let involved_per_frame =
                    cpu_per_frame_us(involved1 - involved0, window, sent, opts);
                eprintln!(
                    "varta-bench: floor {rate}/s {name}: sent {sent}, {per_frame:.2} us per frame, \
                     senders and receiver {involved_per_frame:.2}"
                );
                turns[i].push((per_frame, involved_per_frame));
            }
        }
        // Each round's ratio is of turns taken seconds apart: the machine's drift between
        // rounds (the floor itself moves by a third) cancels out of it.
        let floor_turns = turns[0].clone();
        for ((name, _, _), values) in receivers.iter().zip(turns) {
            let ratios = |pick: fn(&(f64, f64)) -> f64| -> f64 {
                median(
                    values
                        .iter()
                        .zip(&floor_turns)
                        .map(|(v, f)| pick(v) / pick(f))
                        .collect(),
                )
            };
            let machine = |v: &(f64, f64)| v.0;
            let involved = |v: &(f64, f64)| v.1;
            let mut figures = vec![
                (
                    "machine_cpu_per_frame",
                    median(values.iter().map(machine).collect()),
                    "us",
                ),
                (
                    "involved_cpu_per_frame",
                    median(values.iter().map(involved).collect()),
                    "us",
                ),
            ];
            if *name != crate::report::FLOOR {
                figures.push(("ratio_to_floor", ratios(machine), "x"));
                figures.push(("involved_ratio_to_floor", ratios(involved), "x"));
            }
            for (figure, value, unit) in figures {
                out.push(Fig {
                    observer: name,
                    scenario: floor_scenario(rate),
                    figure: figure.into(),
                    value,
                    unit,
                });
            }
        }
    }
    drop(runs);
    kill(null);
}

/// RSS with `n` agents tracked: plaintext UDP frames with synthetic pids (as many
/// processes would not fit), rate limits off.
pub fn rss(obs: &Observer, opts: &Opts, n: u32, out: &mut Vec<Fig>) -> Option<f64> {
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let extra = unlimited(&[
        "--udp-port",
        &port.to_string(),
        "--udp-bind-addr",
        "127.0.0.1",
        "--i-accept-plaintext-udp",
        "--tracker-capacity",
        &(n + 64).to_string(),
    ]);
    let run = obs.start(&opts.dir, 600_000, &extra);
    let empty = run.rss_bytes();
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.connect(("127.0.0.1", port)).unwrap();
    const FIRST_PID: u32 = 100;
    let mut tracked = 0.0;
    for round in 1..=10u64 {
        for pid in FIRST_PID..FIRST_PID + n {
            let _ = s.send(&varta_e2e::frame(pid, round));
            // About what the socket's default receive buffer holds (~256 small datagrams)
            // per pause: faster, the kernel drops many (`queue_full`), and a run once left
            // 23 agents untracked after all ten rounds.
            if pid % 256 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        tracked = run
            .metrics()
            .get("varta_watch_pids_tracked")
            .copied()
            .unwrap_or(0.0);
        if tracked >= n as f64 {
            break;
        }
    }
    if tracked < n as f64 {
        // Why: the drop counters that moved.
        let mut drops: Vec<String> = run
            .metrics()
            .into_iter()
            .filter(|(k, v)| k.starts_with("varta_frames_dropped_total{") && *v > 0.0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        drops.sort();
        eprintln!(
            "varta-bench: {}: only {tracked} of {n} agents tracked; drops: {}",
            obs.name,
            drops.join(", ")
        );
        return None;
    }
    let full = run.rss_bytes();
    let scenario = format!("rss_{n}_agents");
    let mib = full as f64 / 1048576.0;
    out.push(Fig::new(obs, &scenario, "rss", mib, "MiB"));
    let per_agent = full.saturating_sub(empty) as f64 / n as f64;
    out.push(Fig::new(obs, &scenario, "bytes_per_agent", per_agent, "B"));
    Some(mib)
}

/// Floods while 4 honest agents beat 10 times a second, with each observer's default limits:
/// bad-CRC frames from 1 and from 8 processes, and valid beats of their own pids from 256
/// processes, for 3 s. The observer's CPU, the honest beats counted against sent, and the
/// stalls of the honest agents while they beat (threshold 1 s, ten of their intervals).
pub fn floods(obs: &Observer, opts: &Opts, out: &mut Vec<Fig>) {
    const MS: u64 = 3000;
    for (scenario, kind, processes) in [
        ("flood_junk_1", "junk", 1),
        ("flood_junk_8", "junk", 8),
        ("flood_valid_256", "valid", 256),
    ] {
        let run = obs.start(&opts.dir, 1000, &[]);
        let socket = run.socket.to_str().unwrap().to_owned();
        // Beating until told to stop (stdin closed), so that they outlast the flood.
        let mut honest: Vec<Child> = (0..4)
            .map(|_| {
                let mut c = helper(opts, &["pace", &socket, "10", "0"]);
                c.stdin(Stdio::piped()).stdout(Stdio::piped());
                c.spawn().unwrap()
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let (cpu0, _) = run.cost();
        let flood: Vec<Child> = (0..processes)
            .map(|_| {
                helper(opts, &["flood", &socket, kind, &MS.to_string()])
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut f in flood {
            let _ = f.wait();
        }
        let (cpu1, _) = run.cost();
        // A threshold more, the honest agents still beating: any stall of theirs is false.
        std::thread::sleep(Duration::from_millis(1200));
        let pids: Vec<u32> = honest.iter().map(Child::id).collect();
        let sum = |m: &HashMap<String, f64>, family: &str| -> f64 {
            pids.iter()
                .filter_map(|pid| m.get(&format!("{family}{{pid=\"{pid}\"}}")))
                .fold(0.0, |a, b| a + b)
        };
        let false_stalls = sum(&run.metrics(), "varta_stalls_total");
        let mut sent = 0.0;
        for h in &mut honest {
            drop(h.stdin.take());
        }
        for h in honest {
            let out = h.wait_with_output().unwrap();
            sent += String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<f64>()
                .unwrap_or(0.0);
        }
        // What the last beats left queued is read well inside the threshold.
        std::thread::sleep(Duration::from_millis(200));
        let counted = sum(&run.metrics(), "varta_beats_total");
        out.push(Fig::new(
            obs,
            scenario,
            "observer_cpu",
            (cpu1 - cpu0) * 1e3,
            "ms",
        ));
        out.push(Fig::new(
            obs,
            scenario,
            "honest_counted",
            counted / sent.max(1.0),
            "fraction",
        ));
        out.push(Fig::new(
            obs,
            scenario,
            "false_stalls",
            false_stalls,
            "stalls",
        ));
        run.stop();
    }
}
