//! What each guest does (figures handed to `/init` on the kernel command line) and the
//! judgement of what it printed. Expectations that depend on the kernel (attestation
//! method, datapath) come from the daemon's own lines, never from a table here.

use std::collections::HashMap;

use super::guest::{Guest, event, fields, get};

/// One parsed daemon log line.
type Fields = HashMap<String, String>;

const SPOOF: u64 = 50;
const JUNK: u64 = 40;
const SHORT: u64 = 10;
const FLOOD: u64 = 500;
/// --max-beat-rate of the main run: far below FLOOD, far above the agents' 10 beats/s.
const RATE: u64 = 50;
const THRESHOLD_MS: u64 = 1000;

/// Kernel command-line parameters that become `/init`'s environment.
pub fn cmdline() -> String {
    format!(
        "vm_mode=scenario vm_spoof={SPOOF} vm_junk={JUNK} vm_short={SHORT} \
         vm_flood={FLOOD} vm_rate={RATE} vm_threshold={THRESHOLD_MS}"
    )
}

/// One kernel's outcome, as the verdict line and the table show it.
#[derive(Debug, Default)]
pub struct Report {
    pub release: String,
    pub datapath: String,
    pub attest: String,
    pub beats: Option<f64>,
    pub spoof_dropped: Option<f64>,
    pub junk_dropped: Option<f64>,
    pub stall: bool,
    pub sigterm: Option<i32>,
    pub fallback_reason_ok: bool,
    /// The capabilities the daemon said it needs (CAP_BPF,CAP_PERFMON, ...).
    pub least_privilege: String,
    /// Everything that is not as it must be; empty = pass.
    pub problems: Vec<String>,
}

pub fn judge(serial: &[String]) -> Report {
    let g = Guest::new(serial);
    let mut r = Report {
        release: get(g.mark("begin", None).as_ref(), "kernel"),
        ..Report::default()
    };
    steps(&g, &mut r.problems);
    let main = g.log("main");
    datapath(&g, &main, &mut r);
    let agent = get(g.mark("agent", None).as_ref(), "pid");
    kernel_drops(&g, &agent, &mut r);
    cross_namespace(&main, &mut r.problems);
    stall_and_exit(&g, &main, &agent, &mut r);
    restart(&g, &mut r.problems);
    least_privilege(&g, &mut r);
    if !g.marks.iter().any(|(t, _)| *t == "end") {
        r.problems.push("the scenario did not finish".into());
    }
    r
}

/// Every step `/init` ran exited 0 within its time.
fn steps(g: &Guest<'_>, p: &mut Vec<String>) {
    for (_, text) in g.marks.iter().filter(|(t, _)| *t == "step") {
        let f = fields(text);
        if f.get("rc").map(String::as_str) != Some("0") {
            p.push(format!(
                "step {} timed out or failed",
                get(Some(&f), "name")
            ));
        }
    }
}

/// The eBPF datapath loaded, with an attestation method, and the metric says what the ready
/// line says.
fn datapath(g: &Guest<'_>, main: &[Fields], r: &mut Report) {
    let ready = event(main, "ready");
    r.datapath = get(ready, "datapath");
    r.attest = get(ready, "attest");
    let p = &mut r.problems;
    if r.datapath != "ebpf" {
        let why = get(event(main, "datapath_fallback"), "reason");
        p.push(format!("datapath={} (reason: {why})", r.datapath));
    } else if r.attest == "-" {
        p.push("the ready line names no attest= method".into());
    }
    let info = g.labels("varta_datapath_info");
    for (key, said) in [("mode", &r.datapath), ("attest", &r.attest)] {
        let exported = get(info.as_ref(), key);
        if said != "-" && exported != *said {
            p.push(format!(
                "varta_datapath_info{{{key}}} is {exported}, the ready line says {said}"
            ));
        }
    }
}

/// The unprivileged agent is tracked, and every spoofed, junk, short and over-rate frame was
/// counted and dropped in the kernel.
fn kernel_drops(g: &Guest<'_>, agent: &str, r: &mut Report) {
    let p = &mut r.problems;
    r.beats = g.metric(&format!("varta_beats_total{{pid=\"{agent}\"}}"));
    if r.beats.unwrap_or(0.0) < 1.0 {
        p.push(format!(
            "the unprivileged agent (pid {agent}) was not tracked"
        ));
    }
    let dropped = |reason: &str| {
        g.metric(&format!(
            "varta_frames_dropped_total{{reason=\"{reason}\"}}"
        ))
    };
    let spoof = g.sent("spoof").map(|s| s.0);
    r.spoof_dropped = dropped("spoof");
    expect(p, "frames_dropped{spoof}", r.spoof_dropped, spoof);
    let junk = g.sent("junk").map(|s| s.0);
    let short = g.sent("short").map(|s| s.0);
    expect(p, "frames_dropped{decode}", dropped("decode"), junk);
    expect(
        p,
        "decode_errors{bad_magic}",
        g.metric("varta_decode_errors_total{kind=\"bad_magic\"}"),
        junk,
    );
    expect(p, "frames_dropped{length}", dropped("length"), short);
    r.junk_dropped = dropped("decode").zip(dropped("length")).map(|(a, b)| a + b);

    let rate = dropped("rate_per_pid");
    match g.sent("flood") {
        Some((sent, pid)) => {
            let admitted = g.metric(&format!("varta_beats_total{{pid=\"{pid}\"}}"));
            if rate.unwrap_or(0.0) < 1.0 {
                p.push(format!(
                    "the over-rate agent: no rate_per_pid drops ({rate:?})"
                ));
            }
            expect(
                p,
                "over-rate agent: admitted + rate_per_pid",
                admitted.zip(rate).map(|(a, b)| a + b),
                Some(sent),
            );
        }
        None => p.push("the over-rate sender did not report".into()),
    }
    // Rule 6 of `varta_common::wakeup` on this kernel's verifier and helpers: the tracked
    // agents' routine beats were held in the kernel, and counted when folded in.
    if g.metric("varta_datapath_beats_held_total").unwrap_or(0.0) < 1.0 {
        p.push("no routine beat was held in the kernel (varta_datapath_beats_held_total)".into());
    }
    // Dropped in the kernel: every beat delivered to the daemon was accepted there, so none
    // of the spoofed, junk or over-rate frames reached it.
    let accepted: f64 = g
        .metrics
        .iter()
        .filter(|(k, _)| k.starts_with("varta_beats_total{"))
        .map(|(_, v)| v)
        .sum();
    let delivered = g
        .metric("varta_datapath_beats_delivered_total")
        .unwrap_or(0.0);
    if delivered != accepted {
        p.push(format!(
            "{} frames reached userspace and were refused there (delivered {delivered}, accepted {accepted})",
            delivered - accepted
        ));
    }
}

/// The agent in a child pid namespace is tracked under its host pid, and said so.
fn cross_namespace(main: &[Fields], p: &mut Vec<String>) {
    let cross = main.iter().find(|f| {
        f.get("event").map(String::as_str) == Some("agent_new")
            && f.get("cross_namespace").map(String::as_str) == Some("true")
    });
    match cross {
        Some(f)
            if f.get("frame_pid").map(String::as_str) == Some("2")
                && f.get("pid") != f.get("frame_pid") => {}
        other => p.push(format!(
            "cross-namespace agent not tracked under its host pid: {other:?}"
        )),
    }
    if event(main, "cross_namespace_sender").is_none() {
        p.push("no event=cross_namespace_sender line".into());
    }
}

/// The wedged agent's stall was surfaced and SIGTERM ended the daemon with status 0.
fn stall_and_exit(g: &Guest<'_>, main: &[Fields], agent: &str, r: &mut Report) {
    r.stall = main.iter().any(|f| {
        f.get("event").map(String::as_str) == Some("stall")
            && f.get("pid").map(String::as_str) == Some(agent)
    });
    if !r.stall {
        r.problems
            .push(format!("no stall surfaced for pid {agent}"));
    }
    r.sigterm = g
        .mark("sigterm", None)
        .and_then(|f| f.get("rc")?.parse().ok());
    if r.sigterm != Some(0) {
        r.problems
            .push(format!("SIGTERM exit status {:?}", r.sigterm));
    }
}

/// The second instance resumed the pins and ran to a clean exit (its steps, resumed and the
/// agent's stall, are judged with the others).
fn restart(g: &Guest<'_>, p: &mut Vec<String>) {
    let restart = g.log("restart");
    let resumed = event(&restart, "resumed");
    if get(resumed, "from") != "pins" {
        p.push(format!(
            "after the restart: no event=resumed from=pins (from={})",
            get(resumed, "from")
        ));
    }
    let restart_sigterm: Option<i32> = g
        .mark("restart_sigterm", None)
        .and_then(|f| f.get("rc")?.parse().ok());
    if restart_sigterm != Some(0) {
        p.push(format!(
            "SIGTERM exit status after the restart {restart_sigterm:?}"
        ));
    }
}

fn expect(p: &mut Vec<String>, what: &str, got: Option<f64>, want: Option<f64>) {
    match (got, want) {
        (_, None) => p.push(format!("{what}: the sender did not report")),
        (None, Some(w)) => p.push(format!("{what}: no such metric, expected {w}")),
        (Some(g), Some(w)) if g != w => p.push(format!("{what}: {g}, expected {w}")),
        _ => {}
    }
}

/// The least-privilege runs: the set the daemon names when it holds no capability must be
/// enough (exactly that set loads the eBPF datapath) and each of it necessary (removed, the
/// daemon falls back and names it).
fn least_privilege(g: &Guest<'_>, r: &mut Report) {
    let none = g.log("log.none");
    let named = missing_named(&get(event(&none, "datapath_fallback"), "reason"));
    r.least_privilege = named.join(",");
    r.fallback_reason_ok = !named.is_empty();
    let p = &mut r.problems;
    if named.is_empty() {
        p.push("without capabilities the daemon named none it needs".into());
        return;
    }
    let used = get(g.mark("caps", Some("all")).as_ref(), "keep");
    let expected: Vec<String> = named
        .iter()
        .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect();
    if used != expected.join(",") {
        p.push(format!(
            "the guest ran with {used}, the daemon named {}",
            r.least_privilege
        ));
    }
    let all = g.log("log.all");
    let with_all = get(event(&all, "ready"), "datapath");
    if with_all != "ebpf" {
        let why = get(event(&all, "datapath_fallback"), "reason");
        p.push(format!(
            "with exactly {}: datapath={with_all} (reason: {why})",
            r.least_privilege
        ));
    }
    for cap in &named {
        let short = cap.trim_start_matches("CAP_").to_ascii_lowercase();
        let log = g.log(&format!("log.no_{short}"));
        let reason = get(event(&log, "datapath_fallback"), "reason");
        let datapath = get(event(&log, "ready"), "datapath");
        if datapath != "userspace" || missing_named(&reason) != [cap.clone()] {
            r.fallback_reason_ok = false;
            p.push(format!(
                "without {cap}: datapath={datapath}, reason does not name it (alone) as missing: {reason}"
            ));
        }
    }
}

/// The `CAP_*` names a fallback reason gives as missing: those outside its parentheses
/// (inside, it lists the whole set to grant), sorted, once each.
fn missing_named(reason: &str) -> Vec<String> {
    let mut depth = 0usize;
    let outside: String = reason
        .chars()
        .map(|c| {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.saturating_sub(1),
                _ => {}
            }
            if depth == 0 { c } else { ' ' }
        })
        .collect();
    let mut names: Vec<String> = outside
        .split(|c: char| !(c.is_ascii_uppercase() || c == '_'))
        .filter(|w| w.starts_with("CAP_") && w.len() > 4)
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_missing_capabilities_are_those_named_outside_parentheses() {
        assert_eq!(
            missing_named(
                "missing capability CAP_PERFMON and CAP_BPF (or grant CAP_BPF, CAP_PERFMON, CAP_SYS_RESOURCE)"
            ),
            ["CAP_BPF", "CAP_PERFMON"]
        );
        assert!(missing_named("Permission denied (grant CAP_BPF); CAP_ alone").is_empty());
    }

    /// What the 6.12 guest printed in a passing run (its marker lines).
    const PASSING: &str = include_str!("testdata/serial-6.12.log");

    fn judged(edit: impl Fn(&str) -> String) -> Report {
        let serial: Vec<String> = PASSING.lines().map(&edit).collect();
        judge(&serial)
    }

    #[test]
    fn a_passing_run_passes_and_reads_its_figures() {
        let r = judged(|l| format!("\x1b[?25l{l}"));
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(
            (r.datapath.as_str(), r.attest.as_str()),
            ("ebpf", "pid_tgid_helper")
        );
        assert_eq!((r.spoof_dropped, r.junk_dropped), (Some(50.0), Some(50.0)));
        assert_eq!(r.least_privilege, "CAP_BPF,CAP_PERFMON");
        assert!(r.stall && r.fallback_reason_ok && r.sigterm == Some(0));
    }

    #[test]
    fn each_broken_promise_is_a_problem() {
        let spoof = judged(|l| l.replace("{reason=\"spoof\"} 50", "{reason=\"spoof\"} 49"));
        assert!(
            spoof.problems.iter().any(|p| p.contains("spoof")),
            "{spoof:?}"
        );
        let none_held = judged(|l| l.replace("beats_held_total 20", "beats_held_total 0"));
        assert!(
            none_held.problems.iter().any(|p| p.contains("held")),
            "{none_held:?}"
        );
        let stall = judged(|l| l.replace("event=stall pid=206", "event=stall pid=1"));
        assert!(!stall.stall && !stall.problems.is_empty());
        let vague = judged(|l| {
            if l.starts_with("@@vm:log.no_perfmon") {
                l.replace("missing capability CAP_PERFMON", "Permission denied")
            } else {
                l.to_owned()
            }
        });
        assert!(!vague.fallback_reason_ok, "{vague:?}");
        let not_resumed = judged(|l| l.replace("from=pins", "from=state_file"));
        assert!(
            not_resumed.problems.iter().any(|p| p.contains("restart")),
            "{not_resumed:?}"
        );
        let unfinished = judged(|l| l.replace("@@vm:end", ""));
        assert!(
            unfinished
                .problems
                .iter()
                .any(|p| p.contains("did not finish"))
        );
    }
}
