//! SIGHUP: the configuration file read again. What may change at run time takes effect;
//! what needs a restart is named.

use super::{Config, RecoveryConfig, file};

/// The configuration from the file and the command line again; the whole file is valid or
/// nothing changes.
pub fn reload(running: &Config) -> Result<Config, String> {
    let path = running
        .config_file
        .as_ref()
        .ok_or("no --config file to re-read")?;
    let cli = file::with_file(path)?;
    Config::from_args(&cli.daemon).map_err(|e| format!("{}: {e}", path.display()))
}

impl Config {
    /// Settings that differ in `new` but only take effect at the next start.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let mut check = |name, differs: bool| {
            if differs {
                changed.push(name);
            }
        };
        check("socket", self.socket != new.socket);
        check("socket-mode", self.socket_mode != new.socket_mode);
        check(
            "uds-rcvbuf-bytes",
            self.uds_rcvbuf_bytes != new.uds_rcvbuf_bytes,
        );
        check("udp-port", self.udp != new.udp);
        check("datapath", self.datapath != new.datapath);
        check("clock-source", self.clock != new.clock);
        check(
            "tracker-capacity",
            self.tracker_capacity != new.tracker_capacity,
        );
        check("tracker-eviction-policy", self.eviction != new.eviction);
        check(
            "allow-cross-namespace-agents",
            self.allow_cross_namespace != new.allow_cross_namespace,
        );
        check("export-file", self.export_file != new.export_file);
        check("prom-addr", self.prom_addr != new.prom_addr);
        check("prom-token-file", self.prom_token != new.prom_token);
        check("signal-handler-mode", self.signal_mode != new.signal_mode);
        changed
    }

    /// What a reload changes at run time, as `name=old->new` items.
    pub fn live_changes(&self, new: &Config) -> Vec<String> {
        let (a, b) = (&self.limits, &new.limits);
        let mut changed = Vec::new();
        for (name, old, new) in [
            ("threshold-ms", a.threshold_ms, b.threshold_ms),
            (
                "max-beat-rate",
                a.per_pid_rate as u64,
                b.per_pid_rate as u64,
            ),
            (
                "global-beat-rate",
                a.global_rate as u64,
                b.global_rate as u64,
            ),
            (
                "global-beat-burst",
                a.global_burst as u64,
                b.global_burst as u64,
            ),
        ] {
            if old != new {
                changed.push(format!("{name}={old}->{new}"));
            }
        }
        if self.recovery != new.recovery {
            let show = |r: &Option<RecoveryConfig>| {
                r.as_ref().map_or("none".to_owned(), |r| r.argv.join(" "))
            };
            changed.push(format!(
                "recovery='{}'->'{}'",
                show(&self.recovery),
                show(&new.recovery)
            ));
        }
        changed
    }
}
