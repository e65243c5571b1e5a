//! deploy/observability: the alert rules pass promtool's checks and unit tests, a real
//! Prometheus scraping a real daemon with the shipped scrape config sees a stall (and fires
//! the alert), and every metric name the rules and the dashboard use is one the daemon
//! exports.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use varta_e2e::{
    Daemon, Proc, deploy,
    deploy::{deploy_file, http_get, repo, require_tool},
    frame,
};

#[test]
#[ignore = "needs promtool: run by `cargo xtask test`, which installs it"]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    require_tool(varta_e2e::this_test!(), "promtool", &["--version"]);
    let dir = repo().join("deploy/observability");
    for args in [
        &["check", "rules", "alerts.yaml"][..],
        &["test", "rules", "alerts.test.yaml"][..],
        &["check", "config", "prometheus.yml"][..],
    ] {
        let (ok, out) = deploy::run(Command::new("promtool").current_dir(&dir).args(args));
        assert!(ok, "promtool {}:\n{out}", args.join(" "));
    }
}

/// Every sample name in a scrape of a daemon that has tracked agents, stalls, an exit and
/// drops (so each per-agent family has samples).
fn exported_names() -> BTreeSet<String> {
    let d = Daemon::builder("deploy-names", "userspace")
        .args(["--threshold-ms", "300"])
        .start();
    d.stalled_agent(50);
    let me = std::process::id();
    d.send(&frame(me, 1));
    d.send(&varta_e2e::panic_terminal_frame(me));
    d.wait_log_all(
        &["event=exit", &format!("pid={me}")],
        Duration::from_secs(10),
    );
    d.send(b"junk");
    // The beat of a live agent: varta_agent_info and friends for a tracked pid.
    let live = d.agent(50);
    d.wait_log_all(
        &["event=agent_new", &format!("pid={}", live.pid())],
        Duration::from_secs(10),
    );
    let (code, body) = d.get_metrics(None);
    drop(live);
    assert_eq!(code, 200);
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_metric_the_dashboard_and_alerts_use_is_exported() {
    let exported = exported_names();
    for file in ["observability/alerts.yaml", "observability/dashboard.json"] {
        let used = deploy::varta_names(&deploy_file(file));
        assert!(used.len() >= 4, "{file} uses only {used:?}");
        let missing: Vec<_> = used.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{file} uses {missing:?}, which the daemon does not export; it exports {exported:?}"
        );
    }
}

/// A Prometheus server on loopback (killed and reaped when dropped, as a `Proc`).
struct Prometheus {
    _process: Proc,
    addr: SocketAddr,
}

impl Prometheus {
    /// GET a query-API path, waiting (polling) until `ok` accepts the body.
    fn wait_for(&self, path: &str, timeout: Duration, ok: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + timeout;
        loop {
            let (code, body) = http_get(self.addr, path);
            if code == 200 && ok(&body) {
                return body;
            }
            assert!(
                Instant::now() < end,
                "Prometheus {path}: last answer {code} {body}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// The first query of the dashboard panel titled `title` (JSON string unescaped).
fn panel_expr(title: &str) -> String {
    let dashboard = deploy_file("observability/dashboard.json");
    let panel = &dashboard[dashboard
        .find(&format!(r#""title": "{title}""#))
        .unwrap_or_else(|| panic!("no panel {title}"))..];
    let expr = &panel[panel.find(r#""expr": ""#).unwrap() + 9..];
    let mut out = String::new();
    let mut chars = expr.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return out,
            '\\' => out.push(chars.next().unwrap()),
            c => out.push(c),
        }
    }
    panic!("unterminated expr in panel {title}")
}

fn url_encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
#[ignore = "needs prometheus: run by `cargo xtask test`, which installs it"]
fn a_real_prometheus_with_the_shipped_config_sees_a_stall_and_fires_the_alert() {
    require_tool(varta_e2e::this_test!(), "prometheus", &["--version"]);
    let mut d = Daemon::builder("deploy-prometheus", "userspace")
        .args(["--threshold-ms", "300"])
        .start();
    let pid = d.stalled_agent(50);

    // The shipped configuration and rules, verbatim; only the targets file is ours.
    let dir = d.dir.join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["prometheus.yml", "alerts.yaml"] {
        std::fs::write(dir.join(f), deploy_file(&format!("observability/{f}"))).unwrap();
    }
    let target = d.prom.expect("daemon serves metrics");
    std::fs::write(
        dir.join("varta-targets.json"),
        format!(r#"[{{"targets": ["{target}"]}}]"#),
    )
    .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", deploy::free_port())
        .parse()
        .unwrap();
    let process = Proc::spawn(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let prom = Prometheus {
        _process: process,
        addr,
    };
    let end = Instant::now() + Duration::from_secs(30);
    while !std::net::TcpStream::connect(addr).is_ok_and(|_| http_get(addr, "/-/ready").0 == 200) {
        assert!(
            Instant::now() < end,
            "Prometheus did not become ready on {addr}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let stall = format!("varta_stalls_total{{job=\"varta-watch\",pid=\"{pid}\"}}");
    let body = prom.wait_for(
        &format!("/api/v1/query?query={}", url_encode(&stall)),
        Duration::from_secs(60),
        |b| b.contains(r#""value":["#) && b.contains(r#""1"]"#),
    );
    assert!(
        body.contains(&format!(r#""instance":"{target}""#)),
        "{body}"
    );
    prom.wait_for(
        &format!(
            "/api/v1/query?query={}",
            url_encode("up{job=\"varta-watch\"} == 1")
        ),
        Duration::from_secs(5),
        |b| b.contains(r#""1"]"#),
    );
    // The shipped rules evaluate on the scraped series: the stall alert fires for that pid.
    let alerts = prom.wait_for("/api/v1/alerts", Duration::from_secs(60), |b| {
        b.contains(r#""alertname":"VartaAgentStalled""#) && b.contains(&format!(r#""pid":"{pid}""#))
    });
    assert!(alerts.contains(r#""state":"firing""#), "{alerts}");
    assert!(
        alerts.contains(r#""comm":"varta-watch""#),
        "the alert names the agent: {alerts}"
    );

    // The dashboard's "stalled agents by unit and pod" panel, as Grafana would send it.
    let query = panel_expr("Stalled agents by unit and pod").replace("$instance", ".*");
    let body = prom.wait_for(
        &format!("/api/v1/query?query={}", url_encode(&query)),
        Duration::from_secs(5),
        |b| b.contains(&format!(r#""pid":"{pid}""#)),
    );
    assert!(body.contains(r#""comm":"varta-watch""#), "{body}");
    drop(prom);
    assert!(d.stop().success());
}
