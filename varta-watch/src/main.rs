//! varta-watch: the observer daemon, and a tiny agent for scripts and demos.
//!
//! Data flow: socket -> eBPF filter (or userspace receive) -> datapath -> observer (gates,
//! rate limits, tracker, stall deadlines) -> actions (log, export, metrics, recovery).
//! This file only wires: `config` parses, `daemon` runs, `agent` sends, `top` shows.

mod actions;
mod agent;
mod config;
mod daemon;
mod datapath;
mod observer;
mod ratelimit;
mod signal;
mod sys;
mod top;

use std::process::ExitCode;

use crate::config::cli::Command;

fn main() -> ExitCode {
    let line = match config::parse_command_line() {
        Ok(line) => line,
        Err(code) => return code,
    };
    sys::logger::init();
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
