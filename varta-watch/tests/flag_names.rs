//! Every `--flag` a message of the daemon names (an error, a hint, a log line) is a flag the
//! command line declares, in the daemon or one of its subcommands: a renamed flag cannot
//! leave a message pointing operators at one that no longer exists. Removed flags, named in
//! their own refusal, are declared too (to be refused with the hint).

use std::{collections::BTreeSet, path::Path};

fn declared(cmd: &clap::Command, out: &mut BTreeSet<String>) {
    for arg in cmd.get_arguments() {
        if let Some(long) = arg.get_long() {
            out.insert(format!("--{long}"));
        }
    }
    for sub in cmd.get_subcommands() {
        declared(sub, out);
    }
}

/// `--flag` words inside string literals of `text` (a rough scan: enough for messages).
fn named_in_strings(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (i, chunk) in text.split('"').enumerate() {
        // Odd chunks are inside a string literal (escaped quotes only split a message).
        if i % 2 == 0 {
            continue;
        }
        let mut rest = chunk;
        while let Some(at) = rest.find("--") {
            let flag: String = rest[at + 2..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
                .collect();
            if flag.len() > 1 && flag.starts_with(|c: char| c.is_ascii_lowercase()) {
                found.push(format!("--{flag}"));
            }
            rest = &rest[at + 2..];
        }
    }
    found
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_flag_a_message_names_is_declared() {
    let mut flags = BTreeSet::new();
    declared(&varta_watch::config::cli::command(), &mut flags);
    let mut files = Vec::new();
    sources(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let mut unknown = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for flag in named_in_strings(&text) {
            if !flags.contains(&flag) {
                unknown.push(format!("{}: {flag}", file.display()));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "messages name flags no command declares:\n{}",
        unknown.join("\n")
    );
    assert!(flags.contains("--socket") && flags.len() > 40, "{flags:?}");
}

#[test]
fn the_scan_finds_flags_in_strings_only() {
    assert_eq!(
        named_in_strings(r#"bad("--threshold-ms", "use --socket"); // --not-this"#),
        ["--threshold-ms", "--socket"]
    );
}
