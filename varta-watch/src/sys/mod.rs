//! Thin wrappers over the operating system: clocks, pidfds, /proc, socket options,
//! readiness of raw file descriptors, and the log sink.

pub mod clock;
pub mod logger;
pub mod pidfd;
pub mod procfs;
pub mod readiness;
pub mod sock;
