//! The `varta-watch` binary: parses the command line and hands it to the library (see
//! `lib.rs` for the data flow): `config` parses, `daemon` runs, `agent` sends, `top` shows.

use std::process::ExitCode;

use varta_watch::{agent, config, config::cli::Command, daemon, sys, top};

fn main() -> ExitCode {
    let line = match config::parse_command_line() {
        Ok(line) => line,
        Err(code) => return code,
    };
    sys::logger::init(line.cli.daemon.observer.log_format);
    let result = match &line.cli.command {
        Some(Command::Beat(args)) => agent::beat(args),
        Some(Command::Agent(args)) => agent::agent(args),
        Some(Command::Top(args)) => top::run(args),
        None => return daemon::run(&line),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("varta-watch: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
