//! The run's output: a markdown table with ours/incumbent ratios, PNG plots (plotters),
//! and `kernel.pid_max` raised for part of the run (`varta_e2e::Sysctl`).

use std::{fmt::Write as _, path::Path, time::Duration};

use plotters::prelude::*;

use varta_e2e::Sysctl;

use crate::{
    Fig,
    scenarios::{FLOOR_ROUNDS, Step},
};

pub const OURS_EBPF: &str = "ours-ebpf";
pub const OURS_USERSPACE: &str = "ours-userspace";
const INCUMBENT: &str = "incumbent-0.2.0";
/// The null receiver: what sending a datagram costs the machine with nobody reading it.
pub const FLOOR: &str = "floor-null-receiver";

/// Raises kernel.pid_max (frames with a pid above it are refused) to `at_least` until the
/// guard is dropped; `None` when it is that high already, or cannot be raised (said why).
pub fn raise_pid_max(at_least: u32) -> Option<Sysctl> {
    const PATH: &str = "/proc/sys/kernel/pid_max";
    let now = std::fs::read_to_string(PATH).unwrap_or_default();
    if now.trim().parse::<u32>().unwrap_or(0) >= at_least {
        return None;
    }
    Sysctl::set(PATH, at_least)
        .inspect_err(|e| {
            eprintln!(
                "varta-bench: cannot raise pid_max to {at_least} ({e}): the many-agents run will fall short"
            )
        })
        .ok()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    // How many datagrams a Unix socket queues: what the userspace datapath may batch.
    let qlen = std::fs::read_to_string("/proc/sys/net/unix/max_dgram_qlen").unwrap_or_default();
    format!(
        "{cores} CPUs ({cpu}), kernel {}, net.unix.max_dgram_qlen {}",
        kernel.trim(),
        qlen.trim()
    )
}

/// The table: one row per scenario x figure, one column per observer, and the ratios.
pub fn markdown(figs: &[Fig], notes: &[String], took: Duration, full: bool) -> String {
    let mut rows: Vec<(&str, &str, &str)> = Vec::new();
    for f in figs {
        if !rows
            .iter()
            .any(|(s, fig, _)| *s == f.scenario && *fig == f.figure)
        {
            rows.push((&f.scenario, &f.figure, f.unit));
        }
    }
    let get = |o: &str, s: &str, fig: &str| {
        figs.iter()
            .find(|f| f.observer == o && f.scenario == s && f.figure == fig)
            .map(|f| f.value)
    };
    let num = |v: Option<f64>| match v {
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.3}"),
        None => "-".into(),
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.3}", a / b),
        _ => "-".into(),
    };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Machine: {}. Run took {:.0} s{}.\n",
        machine(),
        took.as_secs_f64(),
        if full { " (--full)" } else { "" }
    );
    let _ = writeln!(
        md,
        "| scenario | figure | unit | ours eBPF | ours userspace | incumbent 0.2.0 | eBPF / incumbent | userspace / incumbent |"
    );
    let _ = writeln!(md, "|---|---|---|---:|---:|---:|---:|---:|");
    for (s, fig, unit) in rows {
        let (e, u, i) = (
            get(OURS_EBPF, s, fig),
            get(OURS_USERSPACE, s, fig),
            get(INCUMBENT, s, fig),
        );
        let _ = writeln!(
            md,
            "| {s} | {fig} | {unit} | {} | {} | {} | {} | {} |",
            num(e),
            num(u),
            num(i),
            ratio(e, i),
            ratio(u, i)
        );
    }
    for (figure, ratio, heading) in [
        (
            "machine_cpu_per_frame",
            "ratio_to_floor",
            "Whole-machine CPU per frame against the floor (a null receiver on the same socket path, 64 senders; medians of {rounds} rounds in turns, each ratio the median of the rounds' ratios):",
        ),
        (
            "involved_cpu_per_frame",
            "involved_ratio_to_floor",
            "The same turns, the CPU of the senders and the receiver only (their threads' on-CPU time, /proc/<pid>/schedstat, read over the same window: other tenants' load on the machine is left out):",
        ),
    ] {
        let floor_rows: Vec<&Fig> = figs
            .iter()
            .filter(|f| f.observer == FLOOR && f.figure == figure)
            .collect();
        if floor_rows.is_empty() {
            continue;
        }
        let heading = heading.replace("{rounds}", &FLOOR_ROUNDS.to_string());
        let _ = writeln!(md, "\n{heading}\n");
        let _ = writeln!(
            md,
            "| scenario | floor us | ours eBPF us | eBPF / floor | ours userspace us | userspace / floor |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
        for f in floor_rows {
            let medians = |o: &str| {
                (
                    num(get(o, &f.scenario, &f.figure)),
                    num(get(o, &f.scenario, ratio)),
                )
            };
            let ((e, e_ratio), (u, u_ratio)) = (medians(OURS_EBPF), medians(OURS_USERSPACE));
            let _ = writeln!(
                md,
                "| {} | {} | {e} | {e_ratio} | {u} | {u_ratio} |",
                f.scenario,
                num(Some(f.value)),
            );
        }
    }
    if !notes.is_empty() {
        let _ = writeln!(md, "\nNotes on this run:");
        for note in notes {
            let _ = writeln!(md, "- {note}");
        }
    }
    md
}

#[derive(Default)]
pub struct Plots {
    /// Per observer: stall latencies to recovery and to /metrics (ms beyond threshold).
    pub stall: Vec<(&'static str, Vec<f64>, Vec<f64>)>,
    pub sweep: Vec<(&'static str, Vec<Step>)>,
    /// Per observer: (agents, RSS MiB).
    pub rss: Vec<(&'static str, Vec<(u32, f64)>)>,
}

type Series = (String, Vec<(f64, f64)>);

impl Plots {
    pub fn draw(&self, dir: &Path) {
        let font = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
        let Ok(bytes) = std::fs::read(font) else {
            eprintln!(
                "varta-bench: no plots: {font} is missing (apt-get install fonts-dejavu-core)"
            );
            return;
        };
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_err() {
            eprintln!("varta-bench: no plots: {font} is not a font");
            return;
        }
        let cdf = |v: &[f64]| -> Vec<(f64, f64)> {
            v.iter()
                .enumerate()
                .map(|(i, x)| (100.0 * (i + 1) as f64 / v.len() as f64, *x))
                .collect()
        };
        let mut stall: Vec<Series> = Vec::new();
        for (o, rec, met) in &self.stall {
            stall.push((format!("{o} to recovery"), cdf(rec)));
            stall.push((format!("{o} to /metrics"), cdf(met)));
        }
        chart(
            &dir.join("stall-latency.png"),
            "Stall latency beyond the threshold",
            "percentile",
            "ms",
            &stall,
            false,
        );
        let sweep = |f: fn(&Step) -> f64| -> Vec<Series> {
            self.sweep
                .iter()
                .map(|(o, steps)| {
                    (
                        o.to_string(),
                        steps.iter().map(|s| (s.offered, f(s))).collect(),
                    )
                })
                .collect()
        };
        chart(
            &dir.join("rate-loss.png"),
            "Loss vs offered rate (64 agents)",
            "offered beats/s",
            "fraction lost",
            &sweep(|s| s.loss),
            true,
        );
        chart(
            &dir.join("rate-cpu.png"),
            "Observer CPU per accepted beat",
            "offered beats/s",
            "us",
            &sweep(|s| s.cpu_per_beat_us),
            true,
        );
        let rss: Vec<Series> = self
            .rss
            .iter()
            .map(|(o, p)| {
                (
                    o.to_string(),
                    p.iter().map(|(n, m)| (*n as f64, *m)).collect(),
                )
            })
            .collect();
        chart(
            &dir.join("rss.png"),
            "RSS vs tracked agents",
            "agents",
            "MiB",
            &rss,
            true,
        );
    }
}

fn chart(path: &Path, title: &str, x: &str, y: &str, series: &[Series], log_x: bool) {
    if let Err(e) = try_chart(path, title, x, y, series, log_x) {
        eprintln!("varta-bench: plotting {}: {e}", path.display());
    }
}

fn try_chart(
    path: &Path,
    title: &str,
    x: &str,
    y: &str,
    series: &[Series],
    log_x: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for (px, py) in points {
        x0 = x0.min(*px);
        x1 = x1.max(*px);
        y1 = y1.max(*py);
    }
    if x0 > x1 {
        return Err("no data".into());
    }
    let y0 = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(0.0, f64::min);
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut b = ChartBuilder::on(&root);
    b.caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60);
    let colors = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
    macro_rules! body {
        ($chart:expr) => {{
            let mut c = $chart;
            c.configure_mesh().x_desc(x).y_desc(y).draw()?;
            for (i, (name, pts)) in series.iter().enumerate() {
                let color = colors[i % colors.len()];
                c.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
                    .label(name.as_str())
                    .legend(move |(lx, ly)| PathElement::new(vec![(lx, ly), (lx + 18, ly)], color));
                c.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
            }
            c.configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }};
    }
    let y_range = y0..(y1 * 1.1).max(y0 + 1e-3);
    if log_x {
        body!(b.build_cartesian_2d((x0.max(1.0)..x1 * 1.2).log_scale(), y_range)?);
    } else {
        body!(b.build_cartesian_2d(x0..x1.max(x0 + 1.0), y_range)?);
    }
    root.present()?;
    Ok(())
}
