//! Harness for the end-to-end tests: starts `varta-watch` as a real process on a socket of
//! its own, scrapes its metrics, reads its log lines, and drives agents. Every wait here
//! either gets what it waited for or fails the test naming what it awaited and what it saw
//! last; every process it starts is killed and reaped when its guard drops.

mod daemon;
pub mod deploy;
pub mod logs;
pub mod privilege;
mod process;
pub mod sender;
#[path = "../../varta-common/tests/support/vectors.rs"]
pub mod vectors;

use std::{
    collections::HashMap,
    ops::Deref,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

pub use daemon::{Daemon, DaemonBuilder};
pub use process::{Proc, context_switches};
pub use vectors::{decode_error_vectors, hex_decode, hex_encode};

use varta_common::{Frame, Status};

/// The daemon binary: `VARTA_WATCH_BIN`, else the workspace's debug build.
pub fn bin() -> PathBuf {
    match std::env::var_os("VARTA_WATCH_BIN") {
        Some(p) => PathBuf::from(p),
        None => target_bin("varta-watch"),
    }
}

/// A binary of the workspace's debug build.
pub fn target_bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug").join(name);
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo xtask test`",
        bin.display()
    );
    bin
}

/// A kernel setting under /proc/sys changed for a while (root), put back on drop.
pub struct Sysctl {
    path: &'static str,
    old: String,
}

impl Sysctl {
    pub fn set(path: &'static str, value: u32) -> std::io::Result<Sysctl> {
        let old = std::fs::read_to_string(path)?;
        std::fs::write(path, value.to_string())?;
        Ok(Sysctl { path, old })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, self.old.trim());
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The reason every test that needs root is ignored with in a plain `cargo test`. The
/// `#[ignore = "..."]` attribute takes only a literal, so each such test spells it out; a
/// unit test below checks that they all say exactly this.
pub const NEEDS_ROOT: &str =
    "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root";

/// The one policy for tests that need what a plain `cargo test` may not have: root, a tool
/// that `cargo xtask test` installs, the image it builds. Such a test is `#[ignore]`d with
/// the reason, so a plain `cargo test` lists it as ignored, never as passed. `cargo xtask
/// test` includes ignored tests (`--include-ignored`) as root and under CI=true (the tests
/// that need root are left out when it runs without root outside CI). A test that runs
/// anyway and lacks what it needs fails here, naming what: under CI that is a failure, as
/// everything must run there, and elsewhere it was asked for explicitly.
#[track_caller]
pub fn require(test: &str, met: bool, what: &str) {
    assert!(
        met,
        "{test} cannot run here: {what}. A plain `cargo test` ignores it; `cargo xtask test` runs it (as root)"
    );
}

/// [`require`]s root for a test whose name says so (`..._needs_root`, ignored with
/// [`NEEDS_ROOT`]); `why` says what needs it.
#[track_caller]
pub fn needs_root(test: &str, why: &str) {
    assert!(
        test.ends_with("needs_root"),
        "{test} needs root ({why}): its name must end in `needs_root`"
    );
    require(test, is_root(), &format!("needs root ({why})"));
}

/// The calling function's path, e.g. `ebpf::ring_buffer_overflow_is_counted_needs_root`.
#[macro_export]
macro_rules! this_test {
    () => {{
        fn f() {}
        let name = std::any::type_name_of_val(&f);
        name.strip_suffix("::f").unwrap_or(name)
    }};
}

/// Fails the calling test unless it runs as root (see [`needs_root`]).
#[macro_export]
macro_rules! require_root {
    ($why:expr) => {
        $crate::needs_root($crate::this_test!(), $why)
    };
}

/// Why the eBPF datapath needs root.
pub const EBPF: &str = "the eBPF datapath needs CAP_BPF + CAP_PERFMON";

/// Generates `<name>::userspace`, `<name>::ebpf_needs_root` (the attestation the daemon
/// picks on this kernel) and `<name>::ebpf_task_read_needs_root` (forced to task_read, see
/// [`with_attest`]) tests calling `<name>(datapath)`; the eBPF ones are ignored with
/// [`NEEDS_ROOT`].
#[macro_export]
macro_rules! on_both_datapaths {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn userspace() {
                super::$name("userspace");
            }

            #[test]
            #[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
            fn ebpf_needs_root() {
                $crate::require_root!($crate::EBPF);
                super::$name("ebpf");
            }

            #[test]
            #[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
            fn ebpf_task_read_needs_root() {
                $crate::require_root!($crate::EBPF);
                $crate::with_attest("task_read", || super::$name("ebpf"));
            }
        }
    )*};
}

/// Polls `check` until it gives `Ok`; after `timeout` fails the test, naming `what` was
/// awaited and the last value seen (the `Err` that `check` gave last).
#[track_caller]
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let end = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if Instant::now() > end => {
                panic!("waited {timeout:?} for {what}; last seen: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// The value of `key` in a `key=value` line (a log line, the sender's summary); the test
/// fails if the line has none.
#[track_caller]
pub fn log_field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in: {line}"))
}

/// Whether `line` has `part`: a `key=value` part matches a whole field, so `pid=12` does
/// not match `pid=123`; any other part (with a space, or without `=`) is a substring.
pub fn log_has(line: &str, part: &str) -> bool {
    if part.contains('=') && !part.contains(char::is_whitespace) {
        line.split_whitespace().any(|f| f == part)
    } else {
        line.contains(part)
    }
}

/// A unique scratch directory for one test, removed when dropped (pass or fail).
pub struct Scratch(PathBuf);

impl Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Scratch {
    /// Owns nothing (what a `Daemon` keeps after handing its directory on).
    pub fn none() -> Scratch {
        Scratch(PathBuf::new())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.0.as_os_str().is_empty() {
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// For scenarios that only the eBPF datapath has: generates `<name>::ebpf_needs_root` (the
/// attestation the daemon picks on this kernel) and `<name>::ebpf_task_read_needs_root`
/// (forced to task_read) tests calling `<name>()`, ignored with [`NEEDS_ROOT`].
#[macro_export]
macro_rules! on_both_attestations {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            #[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
            fn ebpf_needs_root() {
                $crate::require_root!($crate::EBPF);
                super::$name();
            }

            #[test]
            #[ignore = "needs root (eBPF, setpriv, unshare...): run by `cargo xtask test` as root"]
            fn ebpf_task_read_needs_root() {
                $crate::require_root!($crate::EBPF);
                $crate::with_attest("task_read", super::$name);
            }
        }
    )*};
}

thread_local! {
    /// The eBPF attestation method the daemons this test thread starts must use.
    static ATTEST: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

/// Runs `test` with every eBPF daemon it starts forced to attestation `method`
/// (`VARTA_EBPF_ATTEST`: pid_tgid_helper or task_read), so each scenario can meet its
/// assertions with every method on one kernel.
pub fn with_attest(method: &'static str, test: impl FnOnce()) {
    ATTEST.with(|a| a.set(Some(method)));
    test();
    ATTEST.with(|a| a.set(None));
}

/// The method [`with_attest`] forces on this thread, if any.
pub fn forced_attest() -> Option<&'static str> {
    ATTEST.with(|a| a.get())
}

pub fn scratch(name: &str) -> Scratch {
    // A test run under `with_attest` runs beside the same test without it.
    let attest = forced_attest().map_or(String::new(), |m| format!("-{m}"));
    let dir = std::env::temp_dir().join(format!("varta-e2e-{}-{name}{attest}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

pub fn parse_metrics(body: &str) -> HashMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

pub fn frame(pid: u32, nonce: u64) -> [u8; 32] {
    Frame {
        status: Status::Ok,
        pid,
        timestamp: 1,
        nonce,
        payload: 0,
    }
    .encode()
}

/// The panic-terminal frame of `pid`: Critical with the terminal nonce (the agent dies).
pub fn panic_terminal_frame(pid: u32) -> [u8; 32] {
    Frame {
        status: Status::Critical,
        pid,
        timestamp: 1,
        nonce: varta_common::frame::NONCE_TERMINAL,
        payload: 0,
    }
    .encode()
}

/// snake_case of a decode error name (`BadMagic` -> `bad_magic`).
pub fn snake(name: &str) -> String {
    let mut s = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            s.push('_');
        }
        s.push(c.to_ascii_lowercase());
    }
    s
}

#[cfg(test)]
mod tests {
    use std::{path::Path, time::Duration};

    /// Every test that needs root (named `..._needs_root`, in the macros here and in
    /// `tests/*.rs`) is ignored with exactly [`super::NEEDS_ROOT`], and every ignored test
    /// says why.
    #[test]
    fn every_root_test_is_ignored_with_the_one_reason() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = vec![dir.join("src/lib.rs")];
        for entry in std::fs::read_dir(dir.join("tests")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
        let attr = format!("#[ignore = {:?}]", super::NEEDS_ROOT);
        let mut root_tests = 0;
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            let lines: Vec<&str> = text.lines().map(str::trim).collect();
            for (i, line) in lines.iter().enumerate() {
                let at = format!("{}:{}", file.display(), i + 1);
                if line.starts_with("#[ignore") {
                    assert!(
                        line.starts_with("#[ignore = \""),
                        "{at}: an ignore without a reason"
                    );
                }
                let Some(name) = line.strip_prefix("fn ") else {
                    continue;
                };
                if !name.contains("_needs_root(") {
                    continue;
                }
                root_tests += 1;
                let attrs = lines[..i]
                    .iter()
                    .rev()
                    .take_while(|l| l.starts_with("#[") || l.starts_with("///"));
                assert!(
                    attrs.clone().any(|l| *l == attr),
                    "{at}: a test that needs root without {attr}"
                );
            }
        }
        assert!(
            root_tests > 10,
            "found only {root_tests} tests that need root"
        );
    }

    #[test]
    #[should_panic(expected = "waited 20ms for the answer; last seen: 41")]
    fn a_wait_that_times_out_fails_naming_what_and_the_last_value() {
        super::wait_for("the answer", Duration::from_millis(20), || {
            Err::<(), _>("41".to_owned())
        });
    }

    #[test]
    fn key_value_fields_match_whole_fields() {
        let line = "ts=1 level=info event=stall pid=123 frame_pid=2";
        assert_eq!(super::log_field(line, "pid"), "123");
        assert_eq!(super::log_field(line, "frame_pid"), "2");
        assert!(super::log_has(line, "pid=123"));
        assert!(!super::log_has(line, "pid=12"));
        assert!(super::log_has(line, "level=info event"));
    }
}
