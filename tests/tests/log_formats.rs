//! `--log-format text` and `--log-format json` write the same events with the same fields
//! and values: one scripted scenario (agents start, one stalls, one exits with its panic
//! frame, recoveries run, the export file's directory goes and comes back, a SIGHUP reopens
//! and reloads) run once per format, in a directory whose name holds a space and double
//! quotes, so paths and io error messages are values with spaces and quotes.

use std::{collections::BTreeSet, time::Duration};

use varta_e2e::{
    Daemon, frame,
    logs::{json_fields, text_fields},
    panic_terminal_frame,
};

const WAIT: Duration = Duration::from_secs(15);

/// How a log line of one format is matched: its event, and a field's value.
#[derive(Clone, Copy, PartialEq)]
enum Format {
    Text,
    Json,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Json => "json",
        }
    }
    fn event(self, name: &str) -> String {
        match self {
            Format::Text => format!("event={name} "),
            Format::Json => format!("\"event\":\"{name}\","),
        }
    }
    fn field(self, key: &str, value: impl std::fmt::Display) -> String {
        match self {
            Format::Text => format!(" {key}={value} "),
            Format::Json => format!(",\"{key}\":{value},"),
        }
    }
    fn string(self, key: &str, value: &str) -> String {
        match self {
            Format::Text => format!(" {key}={value}"),
            Format::Json => format!(",\"{key}\":\"{value}\""),
        }
    }
    fn fields(self, line: &str) -> Result<Vec<(String, String)>, String> {
        match self {
            Format::Text => text_fields(line),
            Format::Json => json_fields(line),
        }
    }
}

/// Runs the scenario; every line of the log, read by the format's strict reader, with the
/// run's directory written `<dir>` and every number `<n>` (pids, times, sizes and
/// addresses differ between runs).
fn scenario(format: Format) -> Vec<Vec<(String, String)>> {
    let dir = varta_e2e::scratch(&format!("logs \"q\" {}", format.name()));
    let out = dir.join("out \"x\" y");
    std::fs::create_dir(&out).unwrap();
    let export = out.join("events.tsv");
    let config = dir.join("varta.toml");
    std::fs::write(&config, "threshold-ms = 500\n").unwrap();
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let dir_text = dir.display().to_string();
    let d = Daemon::builder("unused", "userspace")
        .in_dir(dir)
        .no_metrics()
        .args(["--log-format", format.name()])
        .arg("--config")
        .arg(config.to_str().unwrap())
        .arg("--export-file")
        .arg(export.to_str().unwrap())
        .args(["--recovery-exec", "/bin/false"])
        .spawn();
    let wait = |parts: &[&str]| d.wait_log_all(parts, WAIT);
    wait(&[&format.event("ready")]);

    // An agent that beats throughout (its beats keep the export file busy), one that stalls.
    let steady = d.agent(100);
    let stalls = d.agent(100);
    for agent in [&steady, &stalls] {
        wait(&[
            &format.event("agent_new"),
            &format.field("pid", agent.pid()),
        ]);
    }
    let stalled = stalls.pid();
    drop(stalls);
    wait(&[&format.event("stall"), &format.field("pid", stalled)]);
    wait(&[
        &format.event("recovery"),
        &format.field("pid", stalled),
        &format.string("outcome", "failure"),
    ]);

    // This process exits with its panic frame: its recovery runs too.
    let me = std::process::id();
    d.send(&frame(me, 1));
    wait(&[&format.event("agent_new"), &format.field("pid", me)]);
    d.send(&panic_terminal_frame(me));
    wait(&[&format.event("exit"), &format.field("pid", me)]);
    wait(&[
        &format.event("recovery"),
        &format.field("pid", me),
        &format.string("outcome", "failure"),
    ]);

    // The export file's directory goes: an io error; a SIGHUP's reopen fails, the reload
    // takes the new threshold; the directory comes back and the writer reopens the file.
    std::fs::remove_dir_all(&out).unwrap();
    wait(&[&format.event("file_vanished")]);
    wait(&[&format.event("file_error"), &format.string("op", "open")]);
    std::fs::write(&config, "threshold-ms = 600\n").unwrap();
    d.signal(libc::SIGHUP);
    wait(&[&format.event("file_reopen_failed")]);
    wait(&[&format.event("reload")]);
    std::fs::create_dir(&out).unwrap();
    wait(&[
        &format.event("file_reopened"),
        &format.string("reason", "vanished"),
    ]);

    let mut d = d;
    assert!(d.stop().success());
    drop(steady);
    // Numbers, and addresses in hex (the signal restorer's, under ASLR).
    let number = |v: &str| {
        v.parse::<f64>().is_ok()
            || v.strip_prefix("0x")
                .is_some_and(|h| u64::from_str_radix(h, 16).is_ok())
    };
    d.logs()
        .iter()
        .map(|line| {
            let fields = format
                .fields(line)
                .unwrap_or_else(|e| panic!("{}: {e}: {line}", format.name()));
            fields
                .into_iter()
                .map(|(k, v)| {
                    let v = if number(&v) {
                        "<n>".to_owned()
                    } else {
                        v.replace(&dir_text, "<dir>")
                    };
                    (k, v)
                })
                .collect()
        })
        .collect()
}

fn event_of(fields: &[(String, String)]) -> &str {
    fields
        .iter()
        .find(|(k, _)| k == "event")
        .map_or("", |(_, v)| v)
}

#[test]
fn text_and_json_logs_hold_the_same_events_fields_and_values() {
    let text = scenario(Format::Text);
    let json = scenario(Format::Json);
    let events = |lines: &[Vec<(String, String)>]| -> BTreeSet<String> {
        lines.iter().map(|l| event_of(l).to_owned()).collect()
    };
    assert_eq!(events(&text), events(&json));
    for name in [
        "ready",
        "agent_new",
        "stall",
        "exit",
        "recovery_started",
        "recovery",
        "file_vanished",
        "file_error",
        "file_reopen_failed",
        "reload",
        "file_reopened",
        "shutdown",
    ] {
        assert!(events(&text).contains(name), "no {name} line");
    }
    // Line for line per event, the same fields in the same order with the same values.
    let lines = |lines: &[Vec<(String, String)>]| -> BTreeSet<Vec<(String, String)>> {
        lines
            .iter()
            // How often the writer retried the open is a matter of timing.
            .filter(|l| event_of(l) != "file_error")
            .cloned()
            .collect()
    };
    assert_eq!(lines(&text), lines(&json));
    // A hostile path is one value, the same in both: the export file and the io error.
    for lines in [&text, &json] {
        let error = lines.iter().find(|l| event_of(l) == "file_error").unwrap();
        let value = |key: &str| &error.iter().find(|(k, _)| k == key).unwrap().1;
        assert_eq!(value("path"), "<dir>/out \"x\" y/events.tsv");
        assert_eq!(value("error"), "No such file or directory (os error 2)");
    }
}
