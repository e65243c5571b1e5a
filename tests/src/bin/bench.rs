//! `cargo xtask bench`: the daemon's cost per datagram, eBPF against userspace datapath
//! (and the incumbent varta-watch 0.2.0 when its binary is given), measured in one run.
//!
//! Scenarios, each against a fresh daemon:
//! - junk: 4 processes send 250k invalid frames each (bad CRC) while one agent beats;
//! - beats: 1 process sends 400k valid beats (rate limits off).
//!
//! Figures: the daemon's CPU time (utime+stime from /proc) and its context switches (its
//! wake-ups) during the scenario. Ratios are taken within this run: machines are noisy.

use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

struct Sample {
    cpu_s: f64,
    switches: u64,
    wall_s: f64,
}

fn proc_cost(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let mut switches = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        for l in status.lines() {
            if l.starts_with("voluntary_ctxt_switches")
                || l.starts_with("nonvoluntary_ctxt_switches")
            {
                switches += l.split_whitespace().last().unwrap().parse::<u64>().unwrap();
            }
        }
    }
    (ticks as f64 / hz, switches)
}

fn start(bin: &Path, args: &[&str], socket: &Path) -> Child {
    let _ = std::fs::remove_file(socket);
    let child = Command::new(bin)
        .arg("--socket")
        .arg(socket)
        .args(["--threshold-ms", "5000"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < end, "{} did not bind", bin.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    child
}

fn junk(socket: &Path) {
    let mut bad = varta_e2e::frame(4242, 1);
    bad[31] ^= 0xff;
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let socket = socket.to_path_buf();
            std::thread::spawn(move || {
                let s = UnixDatagram::unbound().unwrap();
                for _ in 0..250_000 {
                    while s.send_to(&bad, &socket).is_err() {
                        std::thread::yield_now();
                    }
                }
            })
        })
        .collect();
    let agent = UnixDatagram::unbound().unwrap();
    let pid = std::process::id();
    let mut nonce = 1;
    while !workers.iter().all(|w| w.is_finished()) {
        let _ = agent.send_to(&varta_e2e::frame(pid, nonce), socket);
        nonce += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    for w in workers {
        w.join().unwrap();
    }
}

fn beats(socket: &Path) {
    let s = UnixDatagram::unbound().unwrap();
    let pid = std::process::id();
    for nonce in 1..=400_000u64 {
        let f = varta_e2e::frame(pid, nonce);
        while s.send_to(&f, socket).is_err() {
            std::thread::yield_now();
        }
    }
}

fn measure(bin: &Path, args: &[&str], scenario: fn(&Path)) -> Sample {
    let dir = std::env::temp_dir().join(format!("varta-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("bench.sock");
    let mut child = start(bin, args, &socket);
    let (cpu0, sw0) = proc_cost(child.id());
    let t = Instant::now();
    scenario(&socket);
    std::thread::sleep(Duration::from_millis(300)); // let it drain
    let wall_s = t.elapsed().as_secs_f64();
    let (cpu1, sw1) = proc_cost(child.id());
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Sample {
        cpu_s: cpu1 - cpu0,
        switches: sw1 - sw0,
        wall_s,
    }
}

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let ours = args
        .first()
        .expect("usage: varta-bench <varta-watch> [incumbent varta-watch 0.2.0]");
    let incumbent = args.get(1);
    let mut rows: Vec<(&str, String, Sample)> = Vec::new();
    for (scenario, run) in [
        ("junk 1M invalid", junk as fn(&Path)),
        ("beats 400k valid", beats as fn(&Path)),
    ] {
        let common = ["--max-beat-rate", "0", "--global-beat-rate", "0"];
        let mut userspace = vec!["--datapath", "userspace"];
        userspace.extend(common);
        let mut ebpf = vec!["--datapath", "ebpf"];
        ebpf.extend(common);
        rows.push((
            scenario,
            "varta-watch userspace".into(),
            measure(ours, &userspace, run),
        ));
        rows.push((
            scenario,
            "varta-watch ebpf".into(),
            measure(ours, &ebpf, run),
        ));
        if let Some(inc) = incumbent {
            rows.push((
                scenario,
                "incumbent 0.2.0".into(),
                measure(inc, &common, run),
            ));
        }
    }
    println!(
        "{:<18} {:<24} {:>10} {:>12} {:>8}",
        "scenario", "daemon", "cpu_ms", "ctx_switches", "wall_s"
    );
    for (scenario, who, s) in &rows {
        println!(
            "{scenario:<18} {who:<24} {:>10.0} {:>12} {:>8.2}",
            s.cpu_s * 1e3,
            s.switches,
            s.wall_s
        );
    }
    println!();
    for scenario in ["junk 1M invalid", "beats 400k valid"] {
        let get = |w: &str| {
            rows.iter()
                .find(|(s, who, _)| *s == scenario && who == w)
                .map(|r| &r.2)
        };
        let (u, e) = (
            get("varta-watch userspace").unwrap(),
            get("varta-watch ebpf").unwrap(),
        );
        println!(
            "{scenario}: ebpf/userspace cpu {:.3}, wake-ups {:.3}",
            e.cpu_s / u.cpu_s.max(1e-3),
            e.switches as f64 / u.switches.max(1) as f64
        );
        if let Some(i) = get("incumbent 0.2.0") {
            println!(
                "{scenario}: ebpf/incumbent cpu {:.3}, wake-ups {:.3}",
                e.cpu_s / i.cpu_s.max(1e-3),
                e.switches as f64 / i.switches.max(1) as f64
            );
        }
    }
}
