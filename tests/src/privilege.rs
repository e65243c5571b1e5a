//! Running the daemon with exactly the capabilities users grant it: the DaemonSet's list,
//! the systemd unit's, or a set a test names.

use crate::deploy::deploy_file;

/// setpriv limiting root's bounding, inheritable and ambient sets to `caps` (`bpf`,
/// `CAP_PERFMON`, `PERFMON`: any case, with or without the prefix), so uid 0 keeps exactly
/// those as its effective set across exec.
pub fn with_exactly<S: AsRef<str>>(caps: &[S]) -> Vec<String> {
    let set: String = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| {
            let c = c.as_ref().to_ascii_lowercase();
            format!("+{}", c.strip_prefix("cap_").unwrap_or(&c))
        }))
        .collect::<Vec<_>>()
        .join(",");
    [
        "setpriv",
        "--reuid",
        "0",
        "--bounding-set",
        &set,
        "--inh-caps",
        &set,
        "--ambient-caps",
        &set,
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

/// `AmbientCapabilities=` of the shipped systemd unit.
pub fn unit_capabilities() -> Vec<String> {
    deploy_file("systemd/varta-watch.service")
        .lines()
        .find_map(|l| l.trim().strip_prefix("AmbientCapabilities="))
        .expect("the unit grants ambient capabilities")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}
