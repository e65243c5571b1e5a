//! Thin wrappers over the operating system: clocks, pidfds, /proc, socket options,
//! readiness of raw file descriptors, the log sink, and service-manager notifications.

pub mod clock;
pub mod logger;
pub mod notify;
pub mod pidfd;
pub mod priority;
pub mod process;
pub mod procfs;
pub mod readiness;
pub mod sock;
