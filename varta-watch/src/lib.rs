//! varta-watch: the observer daemon, and a tiny agent for scripts and demos.
//!
//! Data flow: socket -> eBPF filter (or userspace receive) -> datapath -> observer (gates,
//! rate limits, tracker, stall deadlines) -> actions (log, export, metrics, recovery).
//! The binary (`main.rs`) only wires: `config` parses, `daemon` runs, `agent` sends, `top`
//! shows. The library is what the binary, the fuzz targets (`fuzz/`: `datapath::secure`,
//! `datapath::attest`) and the signal tests on other architectures (`tests/signal-arch`:
//! `signal::handlers`) build on; the modules nothing outside the crate needs stay private.

mod actions;
pub mod agent;
pub mod config;
pub mod daemon;
pub mod datapath;
mod observer;
mod ratelimit;
pub mod signal;
pub mod sys;
pub mod top;
pub mod vocab;
