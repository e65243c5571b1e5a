//! The DaemonSet's capability list is the minimum for the eBPF datapath, measured: the
//! daemon started (as uid 0) with exactly the capabilities daemonset.yaml adds attaches the
//! eBPF datapath; with any one of them removed it falls back to userspace and its fallback
//! line names the missing capability.

use std::time::Duration;

use varta_e2e::{
    Daemon, EBPF, deploy::manifest_capabilities, privilege::with_exactly, require_root,
};

#[test]
#[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
fn the_manifest_capabilities_attach_ebpf_and_each_is_needed_needs_root() {
    require_root!(EBPF);
    let caps = manifest_capabilities();
    assert!(
        !caps.is_empty() && !caps.contains(&"ALL".to_owned()),
        "{caps:?}"
    );

    let d = Daemon::builder("caps-all", "auto")
        .args(["--threshold-ms", "1000"])
        .wrapped(with_exactly(&caps))
        .start();
    let ready = d.wait_log("event=ready", Duration::from_secs(1));
    assert!(
        ready.contains("datapath=ebpf"),
        "with {caps:?}: {}",
        d.log_text()
    );
    drop(d);

    let mut unnamed = Vec::new();
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let d = Daemon::builder(&format!("caps-no-{missing}"), "auto")
            .args(["--threshold-ms", "1000"])
            .wrapped(with_exactly(&fewer))
            .start();
        let ready = d.wait_log("event=ready", Duration::from_secs(1));
        assert!(
            ready.contains("datapath=userspace"),
            "without CAP_{missing} the daemon still attached eBPF: CAP_{missing} is not needed\n{}",
            d.log_text()
        );
        let fallback = d.wait_log("event=datapath_fallback", Duration::from_secs(1));
        if !fallback.contains(&format!("CAP_{missing}")) {
            unnamed.push(format!("CAP_{missing}: {fallback}"));
        }
    }
    assert!(
        unnamed.is_empty(),
        "the fallback line does not name the missing capability:\n{}",
        unnamed.join("\n")
    );
}
