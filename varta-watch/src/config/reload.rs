//! SIGHUP: the configuration file read again. What may change at run time takes effect;
//! what needs a restart is named.

use super::{Config, file};

/// The configuration from the file and the command line again; the whole file is valid or
/// nothing changes.
pub fn reload(running: &Config) -> Result<Config, String> {
    let path = running
        .config_file
        .as_ref()
        .ok_or("no --config file to re-read")?;
    let line = file::with_file(path)?;
    Config::from_command_line(&line).map_err(|e| format!("{}: {e}", path.display()))
}
