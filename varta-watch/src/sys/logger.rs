//! One line per event on stderr, from typed fields. A call site names its event with a
//! literal and gives each field once, typed ([`event!`], over `log`'s key-values):
//!
//! ```ignore
//! event!(warn, "stall", pid = pid, silent_ms = ms, path:% = path.display(), error:% = e);
//! ```
//!
//! and one encoder per format writes the record: text (`--log-format text`,
//! `ts=1764012345.120 level=warn event=stall pid=42 path="/run/my dir"`) or JSON (one object
//! per line, `{"ts":1764012345.120,"level":"warn","event":"stall","pid":42,...}`). Integers
//! and bools stay typed in JSON, an absent value (`None`) is `-` in text and `null` in JSON,
//! everything else is a string. A string is made printable (a control character becomes
//! `\xNN`, as `sys::text::printable` does), then text writes it bare when it is one plain
//! word and quoted otherwise, with `\"` and `\\` its only escapes; JSON escapes it as JSON.
//! Call sites never quote: a path, an io error or a process name is just a value.
//!
//! Lines of other crates (aya, aya-log: free text) become `event=ebpf_log msg="..."`.

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::Write,
    sync::{LazyLock, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use log::kv::{self, VisitSource, VisitValue};
use varta_common::ratelimit::Limit;

use crate::sys::text::push_printable;

/// One event line: `event!(level, "name", key = value, key:% = display, ...)`. The name is
/// a literal, so every event is found by grepping its name; `:%` takes a value by its
/// `Display` (paths, errors, addresses), `:?` by its `Debug`.
macro_rules! event {
    ($level:ident, $name:literal $(,)?) => {
        ::log::$level!($name)
    };
    ($level:ident, $name:literal, $($key:tt $(:$capture:tt)? = $value:expr),+ $(,)?) => {
        ::log::$level!($($key $(:$capture)? = $value),+; $name)
    };
}
pub(crate) use event;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `ts=... level=... event=... key=value ...`
    Text,
    /// `{"ts":...,"level":"...","event":"...",...}`
    Json,
}

/// A field's value, as the record typed it.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    /// `None`: `-` in text, `null` in JSON.
    Absent,
    /// An integer or a finite float, written as it is.
    Number(String),
    Bool(bool),
    Str(String),
}

/// One event, ready for either encoder.
#[derive(Debug)]
struct Line<'a> {
    ts: Duration,
    level: &'a str,
    event: &'a str,
    fields: Vec<(String, Value)>,
}

/// The fields reserved for the line itself: a record's own field of that name is dropped.
const RESERVED: [&str; 3] = ["ts", "level", "event"];

impl<'a> Line<'a> {
    /// What the rate limit counts it under: its event, and its outcome where it has one, so
    /// a flood of recoveries that did not run (suppressed, refused) never silences the
    /// lines of those that did.
    fn kind(&self) -> String {
        match self.fields.iter().find(|(key, _)| key == "outcome") {
            Some((_, Value::Str(outcome))) => format!("{}:{outcome}", self.event),
            _ => self.event.to_owned(),
        }
    }

    /// The line of `record`: its literal message is the event name (ours), or it is another
    /// crate's free text, kept as `msg`.
    fn of(record: &'a log::Record<'a>, ts: Duration, level: &'a str) -> Line<'a> {
        let ours = record.target().starts_with("varta_watch");
        let (event, msg) = match record.args().as_str() {
            Some(name) if ours => (name, None),
            _ if ours => ("-", Some(record.args().to_string())),
            _ => ("ebpf_log", Some(record.args().to_string())),
        };
        let mut line = Line {
            ts,
            level,
            event,
            fields: Vec::new(),
        };
        if let Some(msg) = msg {
            line.push("msg", Value::Str(msg));
        }
        let _ = record.key_values().visit(&mut Fields(&mut line));
        line
    }

    /// Adds a field unless its key is already there (each key once).
    fn push(&mut self, key: &str, value: Value) {
        if !RESERVED.contains(&key) && !self.fields.iter().any(|(k, _)| k == key) {
            self.fields.push((key.to_owned(), value));
        }
    }

    /// The text encoder.
    fn text(&self, out: &mut String) {
        let _ = write!(
            out,
            "ts={}.{:03} level={} event=",
            self.ts.as_secs(),
            self.ts.subsec_millis(),
            self.level
        );
        text_value(out, &Value::Str(self.event.to_owned()));
        for (key, value) in &self.fields {
            out.push(' ');
            text_value(out, &Value::Str(key.clone()));
            out.push('=');
            text_value(out, value);
        }
        out.push('\n');
    }

    /// The JSON encoder.
    fn json(&self, out: &mut String) {
        let _ = write!(
            out,
            "{{\"ts\":{}.{:03},\"level\":",
            self.ts.as_secs(),
            self.ts.subsec_millis()
        );
        json_string(out, self.level);
        out.push_str(",\"event\":");
        json_string(out, self.event);
        for (key, value) in &self.fields {
            out.push(',');
            json_string(out, key);
            out.push(':');
            match value {
                Value::Absent => out.push_str("null"),
                Value::Number(n) => out.push_str(n),
                Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
                Value::Str(s) => json_string(out, s),
            }
        }
        out.push_str("}\n");
    }
}

/// Collects a record's key-values as typed fields.
struct Fields<'l, 'a>(&'l mut Line<'a>);

impl<'kvs> VisitSource<'kvs> for Fields<'_, '_> {
    fn visit_pair(&mut self, key: kv::Key<'kvs>, value: kv::Value<'kvs>) -> Result<(), kv::Error> {
        let mut typed = Typed(None);
        value.visit(&mut typed)?;
        let value = typed.0.unwrap_or_else(|| Value::Str(value.to_string()));
        self.0.push(key.as_str(), value);
        Ok(())
    }
}

/// One value's type, as `log` hands it over.
struct Typed(Option<Value>);

impl<'v> VisitValue<'v> for Typed {
    fn visit_any(&mut self, value: kv::Value) -> Result<(), kv::Error> {
        self.0 = Some(Value::Str(value.to_string()));
        Ok(())
    }
    fn visit_null(&mut self) -> Result<(), kv::Error> {
        self.0 = Some(Value::Absent);
        Ok(())
    }
    fn visit_u64(&mut self, value: u64) -> Result<(), kv::Error> {
        self.0 = Some(Value::Number(value.to_string()));
        Ok(())
    }
    fn visit_i64(&mut self, value: i64) -> Result<(), kv::Error> {
        self.0 = Some(Value::Number(value.to_string()));
        Ok(())
    }
    fn visit_u128(&mut self, value: u128) -> Result<(), kv::Error> {
        self.0 = Some(Value::Number(value.to_string()));
        Ok(())
    }
    fn visit_i128(&mut self, value: i128) -> Result<(), kv::Error> {
        self.0 = Some(Value::Number(value.to_string()));
        Ok(())
    }
    fn visit_f64(&mut self, value: f64) -> Result<(), kv::Error> {
        // JSON has no NaN or infinity: those stay words.
        self.0 = Some(if value.is_finite() {
            Value::Number(value.to_string())
        } else {
            Value::Str(value.to_string())
        });
        Ok(())
    }
    fn visit_bool(&mut self, value: bool) -> Result<(), kv::Error> {
        self.0 = Some(Value::Bool(value));
        Ok(())
    }
    fn visit_str(&mut self, value: &str) -> Result<(), kv::Error> {
        self.0 = Some(Value::Str(value.to_owned()));
        Ok(())
    }
    fn visit_char(&mut self, value: char) -> Result<(), kv::Error> {
        self.0 = Some(Value::Str(value.to_string()));
        Ok(())
    }
}

/// Each character of `s` made printable (`sys::text::push_printable`) through `put`, which
/// escapes for its format.
fn printable_chars(s: &str, mut put: impl FnMut(char)) {
    let mut shown = String::new();
    for c in s.chars() {
        shown.clear();
        push_printable(&mut shown, c);
        shown.chars().for_each(&mut put);
    }
}

/// A text value: bare when it is one plain word, else quoted with `\"` and `\\`.
fn text_value(out: &mut String, value: &Value) {
    let s = match value {
        Value::Absent => return out.push('-'),
        Value::Number(n) => return out.push_str(n),
        Value::Bool(b) => return out.push_str(if *b { "true" } else { "false" }),
        Value::Str(s) => s,
    };
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && !matches!(c, '"' | '\\' | '='));
    if plain {
        return out.push_str(s);
    }
    out.push('"');
    printable_chars(s, |c| match c {
        '"' => out.push_str("\\\""),
        '\\' => out.push_str("\\\\"),
        c => out.push(c),
    });
    out.push('"');
}

/// A JSON string of `s`, made printable first (so it holds what the text line holds).
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    printable_chars(s, |c| match c {
        '"' => out.push_str("\\\""),
        '\\' => out.push_str("\\\\"),
        c => out.push(c),
    });
    out.push('"');
}

struct LineLogger {
    level: log::LevelFilter,
    format: LogFormat,
    quota: Mutex<Quota>,
}

/// Lines of one event kind per second, and how many may come at once, before further lines
/// of that kind are counted instead of written: a flood of one kind (Critical frames, new
/// agents churning, the kernel's lines for senders it cannot place) cannot push the others
/// out of journald's rate limit or block the event loop on a slow log pipe.
const LINES_PER_SEC: u32 = 50;
const LINES_BURST: u32 = 500;
/// Event kinds with a bucket of their own (event names are the daemon's own literals).
const KINDS: usize = 256;

/// Per event kind: the bucket's clock, lines suppressed since the last one written, and in
/// all.
#[derive(Default)]
struct Quota {
    kinds: HashMap<String, (u64, u64, u64)>,
}

static STARTED: LazyLock<Instant> = LazyLock::new(Instant::now);
static SUPPRESSED: Mutex<Vec<(String, u64)>> = Mutex::new(Vec::new());

impl Quota {
    /// Whether a line of `kind` may be written now, and how many of its kind were
    /// suppressed before it (to be said first).
    fn admit(&mut self, kind: &str) -> Option<u64> {
        let now = STARTED.elapsed().as_nanos() as u64 + 1;
        let limit = Limit::new(LINES_PER_SEC, LINES_BURST)?;
        if self.kinds.len() >= KINDS && !self.kinds.contains_key(kind) {
            return Some(0);
        }
        let (tat, pending, total) = self.kinds.entry(kind.to_owned()).or_default();
        if limit.take(tat, now) {
            Some(std::mem::take(pending))
        } else {
            *pending += 1;
            *total += 1;
            if let Ok(mut all) = SUPPRESSED.lock() {
                match all.iter_mut().find(|(k, _)| k == kind) {
                    Some((_, n)) => *n = *total,
                    None => all.push((kind.to_owned(), *total)),
                }
            }
            None
        }
    }
}

/// Log lines suppressed so far, by event kind (`varta_log_suppressed_total{event}`).
pub fn suppressed() -> Vec<(String, u64)> {
    SUPPRESSED.lock().map(|all| all.clone()).unwrap_or_default()
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
        let line = Line::of(record, ts, &level);
        let kind = line.kind();
        let Some(suppressed) = self.quota.lock().ok().and_then(|mut q| q.admit(&kind)) else {
            return;
        };
        let mut out = String::new();
        if suppressed > 0 {
            let mut note = Line {
                ts,
                level: "warn",
                event: "log_suppressed",
                fields: Vec::new(),
            };
            note.push("kind", Value::Str(kind));
            note.push("lines", Value::Number(suppressed.to_string()));
            self.encode(&note, &mut out);
        }
        self.encode(&line, &mut out);
        let _ = std::io::stderr().lock().write_all(out.as_bytes());
    }

    fn flush(&self) {}
}

impl LineLogger {
    fn encode(&self, line: &Line<'_>, out: &mut String) {
        match self.format {
            LogFormat::Text => line.text(out),
            LogFormat::Json => line.json(out),
        }
    }
}

/// `VARTA_LOG=debug|info|warn|error` picks the level (default info).
pub fn init(format: LogFormat) {
    let level = std::env::var("VARTA_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    let logger = Box::leak(Box::new(LineLogger {
        level,
        format,
        quota: Mutex::new(Quota::default()),
    }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use std::{ffi::OsStr, os::unix::ffi::OsStrExt, path::Path};

    use log::kv::Value as V;

    use super::*;

    /// Both lines of a record with `kvs`, from target `target`.
    fn encode(target: &str, args: std::fmt::Arguments<'_>, kvs: &[(&str, V<'_>)]) -> [String; 2] {
        let record = log::Record::builder()
            .args(args)
            .target(target)
            .level(log::Level::Warn)
            .key_values(&kvs)
            .build();
        let line = Line::of(&record, Duration::from_millis(1_500), "warn");
        let (mut text, mut json) = (String::new(), String::new());
        line.text(&mut text);
        line.json(&mut json);
        [text, json]
    }

    #[test]
    fn typed_fields_in_both_formats() {
        let path = Path::new("/run/my dir/\"x\".sock");
        let [text, json] = encode(
            "varta_watch::actions",
            format_args!("stall"),
            &[
                ("pid", V::from(42u32)),
                ("delta", V::from(-3i64)),
                ("known", V::from(true)),
                ("child", log::kv::ToValue::to_value(&None::<u32>)),
                ("path", V::from_display(&path.display())),
                ("error", V::from("Permission denied (os error 13)")),
                ("unit", V::from("w.service")),
                ("pid", V::from(7u32)),
                ("event", V::from("forged")),
            ],
        );
        assert_eq!(
            text,
            "ts=1.500 level=warn event=stall pid=42 delta=-3 known=true child=- \
             path=\"/run/my dir/\\\"x\\\".sock\" error=\"Permission denied (os error 13)\" \
             unit=w.service\n"
        );
        assert_eq!(
            json,
            "{\"ts\":1.500,\"level\":\"warn\",\"event\":\"stall\",\"pid\":42,\"delta\":-3,\
             \"known\":true,\"child\":null,\"path\":\"/run/my dir/\\\"x\\\".sock\",\
             \"error\":\"Permission denied (os error 13)\",\"unit\":\"w.service\"}\n"
        );
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["path"], "/run/my dir/\"x\".sock");
        assert_eq!(v["pid"], 42);
    }

    #[test]
    fn hostile_strings_stay_one_printable_value() {
        let non_utf8 = Path::new(OsStr::from_bytes(b"/tmp/a\xffb"));
        for (hostile, text_form, value) in [
            ("a\"pid=1", r#""a\"pid=1""#, "a\"pid=1"),
            ("back\\slash", r#""back\\slash""#, "back\\slash"),
            ("a=b c", r#""a=b c""#, "a=b c"),
            (
                "nl\nevent=stall",
                r#""nl\\x0aevent=stall""#,
                "nl\\x0aevent=stall",
            ),
            ("esc\x1b[2J", r#""esc\\x1b[2J""#, "esc\\x1b[2J"),
            ("nel\u{85}", r#""nel\\x85""#, "nel\\x85"),
            ("", r#""""#, ""),
            ("-", "-", "-"),
        ] {
            let [text, json] = encode(
                "varta_watch::x",
                format_args!("agent_new"),
                &[("comm", V::from(hostile)), ("pid", V::from(1u32))],
            );
            assert_eq!(
                text,
                format!("ts=1.500 level=warn event=agent_new comm={text_form} pid=1\n")
            );
            assert!(
                !text.trim_end().contains(|c: char| c.is_control()),
                "{text:?}"
            );
            assert!(
                !json.trim_end().contains(|c: char| c.is_control()),
                "{json:?}"
            );
            let v: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(v["comm"], value, "{json}");
            assert_eq!(v["pid"], 1);
        }
        let [text, json] = encode(
            "varta_watch::x",
            format_args!("file_error"),
            &[("path", V::from_display(&non_utf8.display()))],
        );
        assert!(text.contains("path=/tmp/a\u{fffd}b\n"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["path"], "/tmp/a\u{fffd}b");
    }

    #[test]
    fn other_crates_lines_are_kept_as_a_message() {
        let [text, json] = encode("aya_log", format_args!("sender {} \"spoofed\"\n", 12), &[]);
        assert_eq!(
            text,
            "ts=1.500 level=warn event=ebpf_log msg=\"sender 12 \\\"spoofed\\\"\\\\x0a\"\n"
        );
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["event"], "ebpf_log");
        assert_eq!(v["msg"], "sender 12 \"spoofed\"\\x0a");
    }

    /// Encodes what this thread logs through `log` (the macro's real path), as text.
    struct Capture;

    thread_local! {
        static CAPTURED: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            let mut out = String::new();
            Line::of(record, Duration::ZERO, "info").text(&mut out);
            CAPTURED.with(|c| c.borrow_mut().push(out));
        }
        fn flush(&self) {}
    }

    #[test]
    fn the_macro_names_the_event_with_its_literal_and_types_its_fields() {
        let _ = log::set_logger(&Capture);
        log::set_max_level(log::LevelFilter::Trace);
        let path = Path::new("/a b");
        let e = std::io::Error::from_raw_os_error(2);
        event!(info, "ready");
        event!(
            warn,
            "file_error",
            pid = 3u32,
            child = None::<u32>,
            known = false,
            path:% = path.display(),
            error:% = e,
            kind:? = "q",
        );
        let lines = CAPTURED.with(|c| std::mem::take(&mut *c.borrow_mut()));
        assert_eq!(
            lines,
            [
                "ts=0.000 level=info event=ready\n",
                "ts=0.000 level=info event=file_error pid=3 child=- known=false path=\"/a b\" \
                 error=\"No such file or directory (os error 2)\" kind=\"\\\"q\\\"\"\n",
            ]
        );
    }

    #[test]
    fn an_outcome_is_a_kind_of_its_own() {
        let line = |outcome: &str| Line {
            ts: Duration::ZERO,
            level: "info",
            event: "recovery",
            fields: vec![
                ("pid".into(), Value::Number("7".into())),
                ("outcome".into(), Value::Str(outcome.into())),
            ],
        };
        assert_eq!(line("suppressed").kind(), "recovery:suppressed");
        assert_ne!(line("suppressed").kind(), line("success").kind());
        let stall = Line {
            ts: Duration::ZERO,
            level: "warn",
            event: "stall",
            fields: vec![("pid".into(), Value::Number("7".into()))],
        };
        assert_eq!(stall.kind(), "stall");
    }

    #[test]
    fn a_flood_of_one_kind_is_counted_and_leaves_the_others_alone() {
        let mut q = Quota::default();
        let written = (0..2000).filter(|_| q.admit("critical").is_some()).count();
        assert!(
            (LINES_BURST as usize..LINES_BURST as usize + 50).contains(&written),
            "{written}"
        );
        assert_eq!(q.admit("stall"), Some(0), "another kind has its own bucket");
        let (_, pending, total) = q.kinds["critical"];
        assert_eq!(pending, 2000 - written as u64);
        assert_eq!(total, pending);
        assert!(
            suppressed()
                .iter()
                .any(|(k, n)| k == "critical" && *n == total)
        );
    }
}
