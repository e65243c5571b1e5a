//! `--config FILE`: a TOML file with the same keys as the long flags
//! (`threshold-ms = 2000`, `allow-cross-namespace-agents = true`, `recovery-env = ["A=1"]`).
//! Its keys become command-line arguments placed before the real ones, so flags override
//! it; a key whose environment variable is set is left out, so the environment does too.
//! The file must be private to the observer's user (see [`args`]), at start and on reload.

use std::{ffi::OsString, path::Path, process::ExitCode};

use super::{
    cli::{CommandLine, env_name},
    private_file,
};

/// The command line, with `--config`'s keys in front when it names a file. A bad flag or
/// file is one line on stderr naming it, and exit code 2.
pub fn parse_command_line() -> Result<CommandLine, ExitCode> {
    let line = match CommandLine::parse_from(std::env::args_os()) {
        Ok(line) => line,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("varta-watch: error: {}", first_line(&e));
            return Err(ExitCode::from(2));
        }
    };
    match (&line.cli.command, &line.cli.daemon.observer.config) {
        (None, Some(path)) => with_file(path).map_err(|e| {
            eprintln!("varta-watch: error: --config: {e}");
            ExitCode::from(2)
        }),
        _ => Ok(line),
    }
}

/// The command line again, with the file's keys in front (flags override them).
pub fn with_file(path: &Path) -> Result<CommandLine, String> {
    let file_args = args(path)?;
    let mut argv: Vec<OsString> = std::env::args_os().collect();
    argv.splice(1..1, file_args.into_iter().map(Into::into));
    CommandLine::parse_from(argv).map_err(|e| format!("{}: {}", path.display(), first_line(&e)))
}

/// One line that names the flag, not clap's usage block.
fn first_line(e: &clap::Error) -> String {
    let text = e.to_string();
    text.lines()
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ")
        .to_owned()
}

/// The file as arguments, or a one-line reason it is invalid. It may name the recovery
/// command and its environment, so it gets the checks of `--recovery-exec-file`: owned by
/// the observer's user, mode 0600, not a symlink, checked on the opened file.
pub fn args(path: &Path) -> Result<Vec<String>, String> {
    let text = private_file::read_private(path)?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        format!(
            "{}: {}",
            path.display(),
            e.message().lines().next().unwrap_or("invalid TOML")
        )
    })?;
    let mut args = Vec::new();
    for (key, value) in table {
        if key == "config" {
            return Err(format!(
                "{}: `config` cannot name another file",
                path.display()
            ));
        }
        if std::env::var_os(env_name(&key)).is_some() {
            continue;
        }
        let flag = format!("--{key}");
        let scalar = |v: &toml::Value| match v {
            toml::Value::String(s) => Ok(s.clone()),
            toml::Value::Integer(i) => Ok(i.to_string()),
            other => Err(format!(
                "{}: {key}: unsupported value {other}",
                path.display()
            )),
        };
        match &value {
            toml::Value::Boolean(true) => args.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for item in items {
                    args.push(flag.clone());
                    args.push(scalar(item)?);
                }
            }
            v => {
                args.push(flag);
                args.push(scalar(v)?);
            }
        }
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_become_flags() {
        let dir = std::env::temp_dir().join(format!("varta-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "threshold-ms = 1500\nallow-cross-namespace-agents = true\nrecovery-inherit-env = false\nrecovery-env = [\"A=1\", \"B=2\"]\n").unwrap();
        let got = args(&path).unwrap();
        assert_eq!(
            got,
            [
                "--allow-cross-namespace-agents",
                "--recovery-env",
                "A=1",
                "--recovery-env",
                "B=2",
                "--threshold-ms",
                "1500"
            ]
        );
        std::fs::write(&path, "threshold-ms = [\n").unwrap();
        assert!(args(&path).unwrap_err().contains("c.toml"));
        std::fs::write(&path, "threshold-ms = 1.5\n").unwrap();
        assert!(args(&path).unwrap_err().contains("threshold-ms"));
        // Anyone could make it run anything as the observer: refused.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(args(&path).unwrap_err().contains("mode 0666"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
