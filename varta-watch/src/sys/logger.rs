//! One line per event on stderr: `ts=<unix seconds> level=<level> <key=value ...>`.

use std::{
    io::Write,
    time::{SystemTime, UNIX_EPOCH},
};

struct LineLogger {
    level: log::LevelFilter,
}

impl log::Log for LineLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let level = record.level().as_str().to_ascii_lowercase();
        let mut line = format!(
            "ts={}.{:03} level={level} ",
            ts.as_secs(),
            ts.subsec_millis()
        );
        // Kernel-side diagnostics (aya-log) arrive as free text: keep them one line too.
        if record.target().starts_with("varta_watch") {
            line.push_str(&record.args().to_string());
        } else {
            line.push_str(&format!(
                "event=ebpf_log msg=\"{}\"",
                record.args().to_string().replace('"', "'")
            ));
        }
        line.push('\n');
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// `VARTA_LOG=debug|info|warn|error` picks the level (default info).
pub fn init() {
    let level = std::env::var("VARTA_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    let logger = Box::leak(Box::new(LineLogger { level }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}
