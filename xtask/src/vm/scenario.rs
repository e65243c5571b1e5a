//! What each guest does (figures handed to `/init` on the kernel command line) and the
//! judgement of what it printed. Expectations that depend on the kernel (attestation
//! method, datapath) come from the daemon's own lines, never from a table here.

use std::collections::HashMap;

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

/// `key=value` fields of a daemon log line or a guest marker line; a value may be quoted
/// (`reason="..."`). Words without `=` are skipped. The one parser of such lines here.
pub fn fields(line: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = line.trim_start();
    while !rest.is_empty() {
        let word_end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let Some(eq) = rest[..word_end].find('=') else {
            rest = rest[word_end..].trim_start();
            continue;
        };
        let key = rest[..eq].to_owned();
        let after = &rest[eq + 1..];
        let (value, next) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"').unwrap_or(quoted.len());
                (&quoted[..end], quoted.get(end + 1..).unwrap_or(""))
            }
            None => {
                let end = after.find(char::is_whitespace).unwrap_or(after.len());
                (&after[..end], &after[end..])
            }
        };
        out.insert(key, value.to_owned());
        rest = next.trim_start();
    }
    out
}

/// The guest's `@@vm:<tag> <text>` lines, wherever in a serial line they start.
fn markers(serial: &[String]) -> Vec<(&str, &str)> {
    serial
        .iter()
        .filter_map(|l| l.split_once("@@vm:").map(|(_, m)| m))
        .map(|m| m.split_once(' ').unwrap_or((m, "")))
        .collect()
}

/// The guest's last marker line before its metrics and logs: how far a hung guest got.
pub fn progress(serial: &[String]) -> String {
    markers(serial)
        .iter()
        .rev()
        .find(|(tag, _)| !tag.starts_with("log") && !matches!(*tag, "metric" | "main"))
        .map_or("nothing (init not reached)".into(), |(tag, text)| {
            format!("{tag} {text}")
        })
}

pub fn reached_init(serial: &[String]) -> bool {
    markers(serial).iter().any(|(tag, _)| *tag == "begin")
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

struct Guest<'a> {
    marks: Vec<(&'a str, &'a str)>,
    metrics: HashMap<String, f64>,
}

impl<'a> Guest<'a> {
    fn new(serial: &'a [String]) -> Self {
        let marks = markers(serial);
        let metrics = marks
            .iter()
            .filter(|(tag, _)| *tag == "metric")
            .filter(|(_, l)| !l.starts_with('#'))
            .filter_map(|(_, l)| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect();
        Self { marks, metrics }
    }

    /// Fields of the first marker with TAG (and, if given, NAME=name).
    fn mark(&self, tag: &str, name: Option<&str>) -> Option<HashMap<String, String>> {
        self.marks
            .iter()
            .filter(|(t, _)| *t == tag)
            .map(|(_, text)| fields(text))
            .find(|f| name.is_none_or(|n| f.get("name").map(String::as_str) == Some(n)))
    }

    /// The daemon log of a run (`main`, or `log.<caps run>`).
    fn log(&self, tag: &str) -> Vec<HashMap<String, String>> {
        self.marks
            .iter()
            .filter(|(t, _)| *t == tag)
            .map(|(_, text)| fields(text))
            .collect()
    }

    /// The labels of the first sample of metric NAME that is set to 1.
    fn labels(&self, name: &str) -> Option<HashMap<String, String>> {
        self.metrics
            .iter()
            .filter(|(_, v)| **v == 1.0)
            .find_map(|(k, _)| k.strip_prefix(name)?.strip_prefix('{')?.strip_suffix('}'))
            .map(|labels| fields(&labels.replace("\",", "\" ")))
    }

    fn metric(&self, sample: &str) -> Option<f64> {
        self.metrics.get(sample).copied()
    }

    fn sent(&self, tag: &str) -> Option<(f64, String)> {
        let f = self.mark(tag, None)?;
        Some((f.get("sent")?.parse().ok()?, f.get("pid")?.clone()))
    }
}

fn event<'l>(
    log: &'l [HashMap<String, String>],
    name: &str,
) -> Option<&'l HashMap<String, String>> {
    log.iter()
        .find(|f| f.get("event").map(String::as_str) == Some(name))
}

fn get(f: Option<&HashMap<String, String>>, key: &str) -> String {
    f.and_then(|f| f.get(key))
        .cloned()
        .unwrap_or_else(|| "-".into())
}

pub fn judge(serial: &[String]) -> Report {
    let g = Guest::new(serial);
    let mut r = Report {
        release: get(g.mark("begin", None).as_ref(), "kernel"),
        ..Report::default()
    };
    let p = &mut r.problems;
    for (_, text) in g.marks.iter().filter(|(t, _)| *t == "step") {
        let f = fields(text);
        if f.get("rc").map(String::as_str) != Some("0") {
            p.push(format!(
                "step {} timed out or failed",
                get(Some(&f), "name")
            ));
        }
    }

    let main = g.log("main");
    let ready = event(&main, "ready");
    r.datapath = get(ready, "datapath");
    r.attest = get(ready, "attest");
    if r.datapath != "ebpf" {
        let why = get(event(&main, "datapath_fallback"), "reason");
        p.push(format!("datapath={} (reason: {why})", r.datapath));
    } else if r.attest == "-" {
        p.push("the ready line names no attest= method".into());
    }
    // The metric says what the ready line says.
    let info = g.labels("varta_datapath_info");
    for (key, said) in [("mode", &r.datapath), ("attest", &r.attest)] {
        let exported = get(info.as_ref(), key);
        if said != "-" && exported != *said {
            p.push(format!(
                "varta_datapath_info{{{key}}} is {exported}, the ready line says {said}"
            ));
        }
    }

    let agent = get(g.mark("agent", None).as_ref(), "pid");
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
    // Dropped in the kernel: what reached userspace was accepted, none of the spoofs or
    // over-rate frames.
    let accepted: f64 = g
        .metrics
        .iter()
        .filter(|(k, _)| k.starts_with("varta_beats_total{"))
        .map(|(_, v)| v)
        .sum();
    let delivered = g
        .metric("varta_datapath_beats_delivered_total")
        .unwrap_or(0.0);
    let bound = spoof.unwrap_or(0.0).min(rate.unwrap_or(0.0));
    if delivered - accepted >= bound {
        p.push(format!(
            "{} frames reached userspace and were refused there (delivered {delivered}, accepted {accepted})",
            delivered - accepted
        ));
    }

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
    if event(&main, "cross_namespace_sender").is_none() {
        p.push("no event=cross_namespace_sender line".into());
    }

    r.stall = main.iter().any(|f| {
        f.get("event").map(String::as_str) == Some("stall") && f.get("pid") == Some(&agent)
    });
    if !r.stall {
        p.push(format!("no stall surfaced for pid {agent}"));
    }
    r.sigterm = g
        .mark("sigterm", None)
        .and_then(|f| f.get("rc")?.parse().ok());
    if r.sigterm != Some(0) {
        p.push(format!("SIGTERM exit status {:?}", r.sigterm));
    }

    least_privilege(&g, &mut r);
    let p = &mut r.problems;
    if !g.marks.iter().any(|(t, _)| *t == "end") {
        p.push("the scenario did not finish".into());
    }
    r
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
    let named = capability_names(&get(event(&none, "datapath_fallback"), "reason"));
    r.least_privilege = named.join(",");
    r.fallback_reason_ok = !named.is_empty();
    let p = &mut r.problems;
    if named.is_empty() {
        p.push("without capabilities the daemon named none it needs".into());
        return;
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
        if datapath != "userspace" || !capability_names(&reason).contains(cap) {
            r.fallback_reason_ok = false;
            p.push(format!(
                "without {cap}: datapath={datapath}, reason does not name it: {reason}"
            ));
        }
    }
}

/// The `CAP_*` names a text mentions, sorted, once each (as init.sh derives them too).
fn capability_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
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
    fn fields_take_quoted_values_and_skip_plain_words() {
        let f = fields(
            "\x1b[0mts=1.2 level=warn event=datapath_fallback datapath=userspace reason=\"no CAP_BPF here\" x",
        );
        assert_eq!(f["reason"], "no CAP_BPF here");
        assert_eq!(f["event"], "datapath_fallback");
        assert_eq!(f.len(), 5);
    }

    #[test]
    fn capability_names_are_found_once_each() {
        assert_eq!(
            capability_names(
                "missing capability CAP_BPF, CAP_PERFMON (or grant CAP_BPF, CAP_PERFMON)"
            ),
            ["CAP_BPF", "CAP_PERFMON"]
        );
        assert!(capability_names("Permission denied; CAP_ alone").is_empty());
    }

    #[test]
    fn metric_labels_are_fields() {
        let serial = vec![
            "@@vm:metric varta_datapath_info{mode=\"userspace\",attest=\"none\"} 0".to_owned(),
            "@@vm:metric varta_datapath_info{mode=\"ebpf\",attest=\"task_read\"} 1".to_owned(),
        ];
        let labels = Guest::new(&serial).labels("varta_datapath_info").unwrap();
        assert_eq!(labels["mode"], "ebpf");
        assert_eq!(labels["attest"], "task_read");
    }

    #[test]
    fn markers_are_found_after_escape_codes() {
        let serial = vec!["\x1b[?25l@@vm:begin kernel=6.1.0-56-amd64 arch=x86_64".to_owned()];
        assert!(reached_init(&serial));
        assert_eq!(judge(&serial).release, "6.1.0-56-amd64");
    }
}
