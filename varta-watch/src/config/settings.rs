//! What a reload changes, read off the flag declarations: every setting's raw value as it
//! was given (command line, `--config` file, environment or default), compared by name.
//! Settings in the `live` group take effect at once; any other that changed needs a restart.
//! For a flag naming a file whose content is the setting (a key, a token, a command), the
//! content counts too: a rotated key under the same path is a change (M9 of the hardening
//! review: it was taken as no change, and the revoked key stayed valid without a word).

use std::collections::BTreeMap;

use clap::ArgMatches;

use super::cli::{LIVE, command};

/// Flags whose file's content is the setting.
const CONTENT_FILES: [&str; 5] = [
    "key-file",
    "accepted-key-file",
    "master-key-file",
    "prom-token-file",
    "recovery-exec-file",
];

/// `path#<fingerprint of its content>` (the first 8 bytes of its SHA-256, or `unreadable`).
fn with_content(path: String) -> String {
    use sha2::{Digest, Sha256};
    let print = match std::fs::read(&path) {
        Ok(bytes) => Sha256::digest(&bytes)[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        Err(_) => "unreadable".to_owned(),
    };
    format!("{path}#{print}")
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// Long flag name -> how it was given.
    values: BTreeMap<String, Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// In the `live` group: takes effect on reload.
    live: bool,
    /// A repeatable flag (`--recovery-env`): its values may hold secrets and are not logged.
    repeatable: bool,
    raw: Vec<String>,
}

impl Settings {
    pub fn from_matches(matches: &ArgMatches) -> Settings {
        let mut cmd = command();
        // Group memberships declared on the flags are resolved when the command is built.
        cmd.build();
        let live: Vec<&clap::Id> = cmd
            .get_groups()
            .filter(|g| g.get_id() == LIVE)
            .flat_map(|g| g.get_args())
            .collect();
        let mut values = BTreeMap::new();
        for arg in cmd.get_arguments() {
            let (Some(long), id) = (arg.get_long(), arg.get_id()) else {
                continue;
            };
            if matches!(long, "help" | "version") {
                continue;
            }
            let content = CONTENT_FILES.contains(&long);
            let raw = matches
                .get_raw(id.as_str())
                .map(|v| {
                    v.map(|s| s.to_string_lossy().into_owned())
                        .map(|v| if content { with_content(v) } else { v })
                        .collect()
                })
                .unwrap_or_default();
            let entry = Entry {
                live: live.contains(&id),
                repeatable: matches!(arg.get_action(), clap::ArgAction::Append),
                raw,
            };
            values.insert(long.to_owned(), entry);
        }
        Settings { values }
    }

    /// Names of the changed settings that only take effect at the next start.
    pub fn restart_only_changes(&self, new: &Settings) -> Vec<String> {
        self.changed(new)
            .filter(|(_, old, _)| !old.live)
            .map(|(name, ..)| name.to_owned())
            .collect()
    }

    /// The changed settings that take effect at once, as `name=old->new` (or the name alone
    /// for a repeated flag, whose values may hold secrets).
    pub fn live_changes(&self, new: &Settings) -> Vec<String> {
        self.changed(new)
            .filter(|(_, old, _)| old.live)
            .map(|(name, old, new)| match (&old.raw[..], &new.raw[..]) {
                _ if old.repeatable => name.to_owned(),
                ([old], [new]) => format!("{name}={old}->{new}"),
                ([], [new]) => format!("{name}=none->{new}"),
                ([old], []) => format!("{name}={old}->none"),
                _ => name.to_owned(),
            })
            .collect()
    }

    /// Takes over the live settings of `new`; restart-only ones keep their running values,
    /// so a change still pending a restart is named again at the next reload.
    pub fn adopt_live(&mut self, new: &Settings) {
        for (name, entry) in &mut self.values {
            if let (true, Some(now)) = (entry.live, new.values.get(name)) {
                entry.raw.clone_from(&now.raw);
            }
        }
    }

    fn changed<'a>(
        &'a self,
        new: &'a Settings,
    ) -> impl Iterator<Item = (&'a str, &'a Entry, &'a Entry)> {
        self.values.iter().filter_map(|(name, old)| {
            let now = new.values.get(name)?;
            (old.raw != now.raw).then_some((name.as_str(), old, now))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::cli::CommandLine;

    #[test]
    fn a_file_whose_content_changed_is_a_changed_setting() {
        let dir = std::env::temp_dir().join(format!("varta-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key");
        std::fs::write(&key, "a".repeat(64)).unwrap();
        let args = ["--socket", "/a", "--threshold-ms", "5", "--key-file"];
        let with_key = |k: &str| {
            let mut v: Vec<&str> = args.to_vec();
            v.push(k);
            settings(&v)
        };
        let path = key.to_str().unwrap();
        let old = with_key(path);
        assert!(old.restart_only_changes(&with_key(path)).is_empty());
        std::fs::write(&key, "b".repeat(64)).unwrap();
        assert_eq!(old.restart_only_changes(&with_key(path)), ["key-file"]);
        std::fs::remove_dir_all(&dir).unwrap();
        let declared: Vec<String> = command()
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_owned))
            .collect();
        for flag in CONTENT_FILES {
            assert!(
                declared.iter().any(|d| d == flag),
                "--{flag} is not declared"
            );
        }
    }

    fn settings(args: &[&str]) -> Settings {
        let argv = ["varta-watch"].iter().chain(args);
        Settings::from_matches(&CommandLine::parse_from(argv).unwrap().matches)
    }

    #[test]
    fn live_and_restart_only_changes_come_from_the_declarations() {
        let old = settings(&["--socket", "/a", "--threshold-ms", "5000"]);
        let new = settings(&[
            "--socket",
            "/b",
            "--threshold-ms",
            "300",
            "--recovery-exec",
            "/bin/true",
            "--recovery-env",
            "TOKEN=secret",
        ]);
        assert_eq!(old.restart_only_changes(&new), ["socket"]);
        assert_eq!(
            old.live_changes(&new),
            [
                "recovery-env",
                "recovery-exec=none->/bin/true",
                "threshold-ms=5000->300"
            ]
        );
        assert!(old.live_changes(&old).is_empty());
        let mut running = old.clone();
        running.adopt_live(&new);
        assert!(running.live_changes(&new).is_empty());
        assert_eq!(running.restart_only_changes(&new), ["socket"]);
    }
}
