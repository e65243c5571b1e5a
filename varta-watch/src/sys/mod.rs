//! Thin wrappers over the operating system: clocks, pidfds, /proc, socket options,
//! readiness of raw file descriptors, the log sink, service-manager notifications, and the
//! observer's own watchdogs and heartbeat file.

pub mod clock;
pub mod deadline;
pub mod fdlimit;
pub mod fdpass;
pub mod heartbeat;
pub mod listen_fds;
pub mod logger;
pub mod memory;
pub mod notify;
pub mod owned_file;
pub mod pidfd;
pub mod priority;
pub mod process;
pub mod procfs;
pub mod readiness;
pub mod recv;
pub mod sock;
pub mod text;
pub mod watchdog;
