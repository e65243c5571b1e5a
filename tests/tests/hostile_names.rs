//! Every process can name itself: agents exec'd through symlinks whose names hold quotes,
//! backslashes, newlines, terminal escapes, `=`, bytes that are not UTF-8 and 15-byte
//! injections. Their names reach every output, and none of those breaks: the exposition
//! still parses (promtool), each JSON log line is one object with one key per field, the
//! export keeps its columns, and `top` prints no control byte.

use std::{
    ffi::OsStr,
    os::unix::ffi::OsStrExt,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use varta_e2e::{Daemon, Proc, bin, deploy, on_both_datapaths, scratch};

const WAIT: Duration = Duration::from_secs(10);

/// Raw process names; the kernel keeps the first 15 bytes as `comm`.
const NAMES: [&[u8]; 9] = [
    b"x\"y",
    b"a\"pid=1",
    b"back\\slash",
    b"nl\nx",
    b"\x1b[2Jesc\x07",
    b"a=b c",
    b"\xff\xfe\xc3",
    b"\"}1\nfoo 1\n#abcdef",
    b"\"x\"event=\"stall",
];

/// One agent per hostile name, each exec'd through a symlink of that name to the binary.
fn hostile_agents(dir: &Path, socket: &Path) -> Vec<Proc> {
    NAMES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let sub = dir.join(i.to_string());
            std::fs::create_dir_all(&sub).unwrap();
            let link = sub.join(OsStr::from_bytes(name));
            std::os::unix::fs::symlink(bin(), &link).unwrap();
            Proc::spawn(
                Command::new(&link)
                    .args(["agent", "--interval-ms", "50", "--socket"])
                    .arg(socket)
                    .stdin(Stdio::null())
                    .stderr(Stdio::null()),
            )
        })
        .collect()
}

fn no_control(text: &str) -> bool {
    !text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
}

fn metrics_exports_and_top(datapath: &str) {
    let dir = scratch(&format!("hostile-{datapath}"));
    let d = Daemon::builder("hostile", datapath)
        .export_file()
        .args(["--threshold-ms", "400"])
        .start();
    let agents = hostile_agents(&dir, &d.socket);
    d.wait_logs(&["event=agent_new"], NAMES.len(), WAIT);

    let (code, body) = d.get_metrics(None);
    assert_eq!(code, 200);
    assert_eq!(
        body.lines()
            .filter(|l| l.starts_with("varta_agent_info{"))
            .count(),
        NAMES.len(),
        "one series per agent, none injected:\n{body}"
    );
    assert!(no_control(&body), "{body:?}");
    // Stalls: each export line keeps its ten columns and no control byte.
    for agent in &agents {
        agent.signal(libc::SIGSTOP);
    }
    d.wait_logs(&["event=stall"], NAMES.len(), WAIT);
    // The export is written by a thread of its own: it may lag the log lines a little.
    // An agent may stall twice on a loaded machine (once late, once wedged): counted by pid.
    let stalled_pids = |text: &str| {
        text.lines()
            .filter(|l| l.split('\t').nth(1) == Some("stall"))
            .filter_map(|l| l.split('\t').nth(2).map(str::to_owned))
            .collect::<std::collections::BTreeSet<String>>()
    };
    let export = varta_e2e::wait_for("every agent's stall in the export", WAIT, || {
        let text = d.export_text();
        if stalled_pids(&text).len() >= NAMES.len() {
            Ok(text)
        } else {
            Err(text)
        }
    });
    let wedged: std::collections::BTreeSet<String> =
        agents.iter().map(|a| a.pid().to_string()).collect();
    assert_eq!(stalled_pids(&export), wedged, "{export}");
    let stalls: Vec<&str> = export
        .lines()
        .filter(|l| l.split('\t').nth(1) == Some("stall"))
        .collect();
    for line in stalls {
        assert_eq!(line.split('\t').count(), 10, "{line:?}");
        assert!(no_control(line), "{line:?}");
    }

    let top = Command::new(bin())
        .args(["top", "--addr", &d.prom.unwrap().to_string()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&top.stdout);
    assert!(top.status.success(), "{shown}");
    assert!(no_control(&shown), "{shown:?}");
    assert!(shown.contains("x\"y"), "{shown}");
}

fn json_logs_keep_one_key_per_field(datapath: &str) {
    let dir = scratch(&format!("hostile-json-{datapath}"));
    let d = Daemon::builder("hostile-json", datapath)
        .args(["--threshold-ms", "60000", "--log-format", "json"])
        .spawn();
    d.wait_log("\"event\":\"ready\"", WAIT);
    let _agents = hostile_agents(&dir, &d.socket);
    let new = d.wait_logs(&["\"event\":\"agent_new\""], NAMES.len(), WAIT);
    let mut comms = Vec::new();
    for line in &new {
        for key in ["\"pid\":", "\"event\":", "\"comm\":", "\"unit\":"] {
            assert_eq!(line.matches(key).count(), 1, "{key} once in {line}");
        }
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let comm = v["comm"].as_str().unwrap().to_owned();
        assert!(no_control(&comm) && !comm.contains('\n'), "{line}");
        comms.push(comm);
    }
    for plain in [
        "x\"y",
        "a\"pid=1",
        "back\\slash",
        "a=b c",
        "\"x\"event=\"stall",
    ] {
        assert!(comms.iter().any(|c| c == plain), "{plain} in {comms:?}");
    }
    for line in d.logs() {
        serde_json::from_str::<serde_json::Value>(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
}

on_both_datapaths!(metrics_exports_and_top, json_logs_keep_one_key_per_field);

/// Prometheus's own parser takes the exposition with every hostile name in it.
#[test]
#[ignore = "needs promtool: run by `cargo xtask test`, which installs it"]
fn the_exposition_with_hostile_names_passes_promtool() {
    deploy::require_tool(varta_e2e::this_test!(), "promtool", &["--version"]);
    let dir = scratch("hostile-promtool");
    let d = Daemon::builder("hostile-promtool", "userspace")
        .args(["--threshold-ms", "60000"])
        .start();
    let _agents = hostile_agents(&dir, &d.socket);
    d.wait_logs(&["event=agent_new"], NAMES.len(), WAIT);
    let (_, body) = d.get_metrics(None);
    let (_, out) = deploy::run(
        Command::new("sh")
            .args([
                "-c",
                "printf '%s' \"$BODY\" | promtool check metrics 2>&1; echo promtool_exit=$?",
            ])
            .env("BODY", &body),
    );
    // Exit 3 is lint advice (OpenMetrics counters read as untyped series); 1 is a parse
    // error: the exposition a scrape would refuse.
    assert!(
        !out.contains("error while linting") && !out.contains("promtool_exit=1"),
        "{out}\n{body}"
    );
}
