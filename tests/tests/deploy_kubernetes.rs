//! deploy/kubernetes*: every manifest passes the Kubernetes OpenAPI schema
//! (kubernetes-validate, strict), each kustomization lists exactly its files (and renders,
//! where kubectl is installed), the ConfigMap is varta.toml with the checksum that rolls the
//! pods, the daemon accepts that configuration, and the grace period covers the shutdown grace.

use std::{path::PathBuf, process::Command, time::Duration};

use varta_e2e::{
    Daemon,
    deploy::{self, deploy_file, repo, require_tool},
};

const KUSTOMIZATIONS: [&str; 4] = [
    "kubernetes",
    "kubernetes-scrape-annotations",
    "kubernetes-privileged",
    "kubernetes-userspace",
];

/// The list under `key:` in a kustomization (`- item` lines, or `- path: item` for patches).
fn list(kustomization: &str, key: &str) -> Vec<String> {
    kustomization
        .lines()
        .skip_while(|l| l.trim() != format!("{key}:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.trim().strip_prefix("- "))
        .map(|i| i.trim_start_matches("path: ").to_owned())
        .collect()
}

fn yaml_files(dir: &PathBuf) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    files.sort();
    files
}

#[test]
fn each_kustomization_lists_exactly_its_files() {
    for k in KUSTOMIZATIONS {
        let dir = repo().join("deploy").join(k);
        let text = deploy_file(&format!("{k}/kustomization.yaml"));
        let mut listed: Vec<String> = list(&text, "resources")
            .into_iter()
            .chain(list(&text, "patches"))
            .filter(|r| !r.starts_with("../"))
            .collect();
        listed.sort();
        assert_eq!(listed, yaml_files(&dir), "{k}/kustomization.yaml");
        for base in list(&text, "resources")
            .iter()
            .filter(|r| r.starts_with("../"))
        {
            assert!(
                dir.join(base).join("kustomization.yaml").exists(),
                "{k}: {base}"
            );
        }
    }
}

/// Runs kubernetes-validate --strict on `files`: every resource must pass; the only kinds
/// without a schema may be `allowed_unknown` (CRDs such as ServiceMonitor, documented in
/// the README as checked by hand).
fn validate(files: &[PathBuf], allowed_unknown: &[&str]) -> usize {
    let (ok, out) = deploy::run(
        Command::new("kubernetes-validate")
            .arg("--strict")
            .args(files),
    );
    assert!(ok, "kubernetes-validate failed:\n{out}");
    let mut passed = 0;
    for line in out.lines() {
        if line.contains(" passed for resource ") {
            passed += 1;
        } else if line.contains("Couldn't find schema for kind") {
            assert!(
                allowed_unknown
                    .iter()
                    .any(|k| line.contains(&format!("kind {k} "))),
                "no schema: {line}"
            );
        } else {
            assert!(line.trim().is_empty(), "kubernetes-validate: {line}\n{out}");
        }
    }
    passed
}

#[test]
#[ignore = "needs kubernetes-validate: run by `cargo xtask test`, which installs it"]
fn every_manifest_passes_the_kubernetes_schema() {
    require_tool(
        varta_e2e::this_test!(),
        "kubernetes-validate",
        &["--version"],
    );
    let base = repo().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = yaml_files(&base).iter().map(|f| base.join(f)).collect();
    files.push(base.join("examples/workload-pod.yaml"));
    // Namespace, ServiceAccount, ConfigMap, DaemonSet, Service, NetworkPolicy, the example
    // Pod.
    assert_eq!(validate(&files, &["ServiceMonitor"]), 7);

    // The overlays are patches; what they produce is validated once rendered.
    let kubectl = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !kubectl {
        eprintln!(
            "kubectl is not installed: the overlays are checked by each_kustomization_lists_exactly_its_files only"
        );
        return;
    }
    let out_dir = varta_e2e::scratch("kustomize");
    for (k, kinds) in KUSTOMIZATIONS.iter().zip([6, 6, 6, 6]) {
        let (ok, rendered) = deploy::run(
            Command::new("kubectl")
                .arg("kustomize")
                .arg(repo().join("deploy").join(k)),
        );
        assert!(ok, "kubectl kustomize {k}:\n{rendered}");
        let file = out_dir.join(format!("{k}.yaml"));
        std::fs::write(&file, &rendered).unwrap();
        assert_eq!(validate(&[file], &["ServiceMonitor"]), kinds, "{k}");
        match *k {
            "kubernetes-privileged" => assert!(rendered.contains("privileged: true")),
            "kubernetes-userspace" => {
                assert!(rendered.contains("- --datapath\n        - userspace"));
                assert!(rendered.contains("add: []"));
                assert!(
                    rendered.contains("name: net.unix.max_dgram_qlen\n          value: \"512\"")
                );
            }
            "kubernetes-scrape-annotations" => {
                assert!(rendered.contains("prometheus.io/scrape: \"true\""));
                assert!(!rendered.contains("kind: ServiceMonitor"));
            }
            _ => assert!(!rendered.contains("privileged: true")),
        }
    }
}

#[test]
fn servicemonitor_selects_the_service_and_its_metrics_port() {
    let sm = deploy_file("kubernetes/servicemonitor.yaml");
    let svc = deploy_file("kubernetes/service.yaml");
    let ds = deploy_file("kubernetes/daemonset.yaml");
    for needle in ["app.kubernetes.io/name: varta-watch", "clusterIP: None"] {
        assert!(svc.contains(needle), "service.yaml: {needle}");
    }
    assert!(sm.contains("app.kubernetes.io/name: varta-watch"));
    assert!(sm.contains("- port: metrics") && svc.contains("- name: metrics"));
    assert!(ds.contains("- name: metrics") && ds.contains("containerPort: 9100"));
}

#[test]
fn configmap_is_varta_toml_and_its_checksum_rolls_the_pods() {
    let toml = deploy_file("kubernetes/varta.toml");
    let cm = deploy_file("kubernetes/configmap.yaml");
    let embedded: String = cm
        .lines()
        .skip_while(|l| !l.contains("varta.toml: |"))
        .skip(1)
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert_eq!(
        embedded, toml,
        "configmap.yaml must carry varta.toml verbatim"
    );
    let (ok, sum) =
        deploy::run(Command::new("sha256sum").arg(repo().join("deploy/kubernetes/varta.toml")));
    assert!(ok);
    let sum = sum.split_whitespace().next().unwrap();
    let ds = deploy_file("kubernetes/daemonset.yaml");
    assert!(
        ds.contains(&format!("checksum/config: \"{sum}\"")),
        "daemonset.yaml's checksum/config must be {sum}"
    );
    // terminationGracePeriodSeconds = shutdown grace + 2 s for drain, flush and detach.
    let grace_ms: u64 = deploy::manifest_config("shutdown-grace-ms")
        .parse()
        .unwrap();
    let period: u64 = ds
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(period, grace_ms.div_ceil(1000) + 2);
    assert!(ds.contains("terminationMessagePolicy: FallbackToLogsOnError"));
}

#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn the_daemon_accepts_the_manifest_configuration_needs_root() {
    varta_e2e::require_root!("the metrics token file must be root's");
    // The file as the pod reads it, with the Secret's file where the DaemonSet mounts it
    // (here a scratch copy), the socket in a scratch directory and the metrics port free;
    // the address stays the manifest's (not loopback, so the token is required).
    let ds = deploy_file("kubernetes/daemonset.yaml");
    let token_path = deploy::manifest_config("prom-token-file");
    let mount = token_path.rsplit_once('/').unwrap().0;
    assert!(
        ds.contains(&format!("mountPath: {mount}")),
        "the Secret is mounted at {mount}"
    );
    let dir = varta_e2e::scratch("k8s-token");
    let (token_file, token) = deploy::token_file(&dir);
    // The file as the ConfigMap mounts it: mode 0600 (defaultMode), root's.
    let config = deploy::private_copy(&dir, "kubernetes/varta.toml");
    assert!(
        ds.contains("defaultMode: 0600"),
        "the ConfigMap's file is private"
    );
    let ip = deploy::manifest_config("prom-addr")
        .rsplit_once(':')
        .unwrap()
        .0
        .to_owned();
    let mut d = Daemon::builder("k8s-config", "auto")
        .no_metrics()
        .args(["--config", config.to_str().unwrap()])
        .args(["--prom-token-file", token_file.to_str().unwrap()])
        .args(["--prom-addr", &format!("{ip}:0")])
        .start();
    let ready = d.wait_log("event=ready", Duration::from_secs(1));
    assert!(ready.contains("threshold_ms=5000"), "{ready}");
    let addr = d.prom.expect("metrics address in the ready line");
    assert_eq!(deploy::http_get(addr, "/metrics").0, 401);
    assert_eq!(
        deploy::http_get_with_token(addr, "/metrics", Some(&token)).0,
        200
    );
    assert_eq!(deploy::http_get(addr, "/readyz").0, 200);
    assert_eq!(deploy::http_get(addr, "/healthz").0, 200);
    assert!(d.stop().success());
}

#[test]
fn the_daemonset_mounts_the_hosts_bpffs_read_write_for_the_pins() {
    let ds = deploy_file("kubernetes/daemonset.yaml");
    let mount = ds
        .split("- name: bpffs\n")
        .nth(1)
        .expect("a bpffs volumeMount");
    let mount: String = mount.lines().take(3).collect::<Vec<_>>().join("\n");
    assert!(mount.contains("mountPath: /sys/fs/bpf"), "{mount}");
    assert!(!mount.contains("readOnly: true"), "{mount}");
    let volume = ds.rsplit("- name: bpffs\n").next().unwrap();
    let volume: String = volume.lines().take(3).collect::<Vec<_>>().join("\n");
    assert!(volume.contains("path: /sys/fs/bpf"), "{volume}");
}

/// The value of the container's environment variable `name` in the DaemonSet.
fn env_value(ds: &str, name: &str) -> String {
    ds.split(&format!("- name: {name}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("no env {name}"))
        .lines()
        .next()
        .and_then(|l| l.trim().strip_prefix("value: "))
        .unwrap_or_else(|| panic!("env {name} has no value"))
        .to_owned()
}

/// A surge rollout (the new pod takes over beside the old one) needs the old one to hold
/// rather than exit (its kubelet would restart it into taking the node back), and its hold
/// marker in a directory of the pod's own that outlives its container: an emptyDir.
#[test]
fn the_daemonset_rolls_with_a_surge_and_the_old_pod_holds() {
    let ds = deploy_file("kubernetes/daemonset.yaml");
    let rolling = ds.split("rollingUpdate:\n").nth(1).expect("rollingUpdate");
    let settings: Vec<&str> = rolling
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .take(2)
        .collect();
    assert_eq!(settings, ["maxSurge: 1", "maxUnavailable: 0"]);
    assert_eq!(env_value(&ds, "VARTA_AFTER_HANDOVER"), "hold");
    let marker = env_value(&ds, "VARTA_HOLD_MARKER");
    let dir = marker.rsplit_once('/').unwrap().0;
    let mount = ds
        .split(&format!("mountPath: {dir}\n"))
        .next()
        .unwrap()
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap();
    let name = mount
        .trim()
        .strip_prefix("- name: ")
        .unwrap_or_else(|| panic!("nothing is mounted at {dir}"));
    let volume: Vec<&str> = ds
        .rsplit(&format!("- name: {name}\n"))
        .next()
        .unwrap()
        .lines()
        .take(2)
        .map(str::trim)
        .collect();
    assert_eq!(volume[0], "emptyDir:", "{name}: {volume:?}");
    // The variables are the flags' (every daemon flag reads VARTA_<FLAG>).
    let out = Command::new(varta_e2e::bin())
        .args([
            "--socket",
            "/nonexistent/varta.sock",
            "--threshold-ms",
            "1000",
        ])
        .env("VARTA_AFTER_HANDOVER", "exit")
        .env("VARTA_HOLD_MARKER", &marker)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--hold-marker: only with --after-handover hold"),
        "{err}"
    );
}
