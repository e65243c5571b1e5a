//! Thin wrappers over the operating system: clocks, pidfds, /proc, socket options,
//! readiness of raw file descriptors, the log sink, and the
//! observer's own watchdogs and heartbeat file.

pub mod clock;
pub mod fdlimit;
pub mod heartbeat;
pub mod logger;
pub mod pidfd;
pub mod procfs;
pub mod readiness;
pub mod sock;
pub mod watchdog;
