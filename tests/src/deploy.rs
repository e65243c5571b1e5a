//! Helpers for the tests of `deploy/`: the repository's files, and the external tools
//! (promtool, prometheus, podman, systemd-analyze, kubernetes-validate) that `cargo xtask
//! test` installs. A test that needs one is ignored in a plain `cargo test`, naming it.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
};

/// The repository's root directory.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// A file under `deploy/`, read whole.
pub fn deploy_file(rel: &str) -> String {
    let path = repo().join("deploy").join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Fails the test unless `program` runs here (`program` with the probe arguments
/// succeeds). Tests that need a tool are ignored in a plain `cargo test`, with the tool
/// named; `cargo xtask test` installs the tools and runs them (see [`crate::require`]).
#[track_caller]
pub fn require_tool(test: &str, program: &str, probe: &[&str]) {
    let ok = Command::new(program)
        .args(probe)
        .output()
        .is_ok_and(|o| o.status.success());
    crate::require(
        test,
        ok,
        &format!(
            "`{program} {}` does not run (`cargo xtask test` installs it)",
            probe.join(" ")
        ),
    );
}

/// A loopback port free right now (for tools that cannot report a port they chose).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `cmd` to completion: (success, stdout + stderr).
pub fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Every `varta_*` name in `text` (PromQL in rules and dashboards).
pub fn varta_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("varta_") {
        let tail = &rest[at..];
        let len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let before = rest[..at].chars().next_back();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..len].to_owned());
        }
        rest = &tail[len..];
    }
    names
}

/// GET `path` from `addr` over HTTP/1.0 (so no chunked body to decode): (status, body).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    http_get_with_token(addr, path, None)
}

/// [`http_get`] with an optional bearer token.
pub fn http_get_with_token(
    addr: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n{auth}\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// `capabilities: add: [...]` of the DaemonSet's container, e.g. ["BPF", "PERFMON"].
pub fn manifest_capabilities() -> Vec<String> {
    let ds = deploy_file("kubernetes/daemonset.yaml");
    let line = ds
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("add: "))
        .expect("daemonset.yaml adds capabilities");
    line.trim_matches(['[', ']'])
        .split(',')
        .map(|c| c.trim().trim_matches('"').to_owned())
        .filter(|c| !c.is_empty())
        .collect()
}

/// A metrics token file as the DaemonSet's Secret provides it (64 hex, root's, mode 0400):
/// (path, token).
pub fn token_file(dir: &Path) -> (PathBuf, String) {
    use std::os::unix::fs::PermissionsExt;
    let token = "5a".repeat(32);
    let path = dir.join("token");
    std::fs::write(&path, &token).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
    (path, token)
}

/// A copy of a file under `deploy/` in `dir`, mode 0600: how a configuration file must be
/// (a checkout's files are 0644).
pub fn private_copy(dir: &Path, rel: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(Path::new(rel).file_name().expect("a file"));
    std::fs::write(&path, deploy_file(rel)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// The value of `key` in deploy/kubernetes/varta.toml (quotes removed).
pub fn manifest_config(key: &str) -> String {
    deploy_file("kubernetes/varta.toml")
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key} = ")))
        .unwrap_or_else(|| panic!("varta.toml has no {key}"))
        .trim_matches('"')
        .to_owned()
}
