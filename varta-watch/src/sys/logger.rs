//! One line per event on stderr. Text: `ts=<unix seconds> level=<level> <key=value ...>`.
//! JSON (`--log-format json`): the same fields as one object per line,
//! `{"ts":1764012345.120,"level":"warn","event":"stall","pid":42,...}`: integers stay
//! numbers, every other value is a string, a word without `=` goes to `"msg"`.

use std::{
    borrow::Cow,
    collections::HashMap,
    fmt::Write as _,
    io::Write,
    sync::{LazyLock, Mutex},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use varta_common::ratelimit::Limit;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `ts=... level=... event=... key=value ...`
    Text,
    /// `{"ts":...,"level":"...","event":"...",...}`
    Json,
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

/// The `event=` of a line's fields, `-` when it has none.
fn event_kind(fields: &str) -> &str {
    fields
        .split_whitespace()
        .find_map(|f| f.strip_prefix("event="))
        .unwrap_or("-")
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
        let ts = format!("{}.{:03}", ts.as_secs(), ts.subsec_millis());
        let level = record.level().as_str().to_ascii_lowercase();
        // Kernel-side diagnostics (aya-log) arrive as free text: keep them one line too.
        let fields = if record.target().starts_with("varta_watch") {
            record.args().to_string()
        } else {
            format!(
                "event=ebpf_log msg=\"{}\"",
                record.args().to_string().replace('"', "'")
            )
        };
        let kind = event_kind(&fields);
        let Some(suppressed) = self.quota.lock().ok().and_then(|mut q| q.admit(kind)) else {
            return;
        };
        let mut out = String::new();
        if suppressed > 0 {
            let note = format!("event=log_suppressed kind={kind} lines={suppressed}");
            self.push_line(&mut out, &ts, "warn", &note);
        }
        self.push_line(&mut out, &ts, &level, &fields);
        let _ = std::io::stderr().lock().write_all(out.as_bytes());
    }

    fn flush(&self) {}
}

impl LineLogger {
    fn push_line(&self, out: &mut String, ts: &str, level: &str, fields: &str) {
        match self.format {
            LogFormat::Text => {
                let _ = write!(out, "ts={ts} level={level} {fields}");
            }
            LogFormat::Json => out.push_str(&json_line(ts, level, fields)),
        }
        out.push('\n');
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

/// The `key=value` fields of a text line. A value may be `"quoted"`, with `\"` and `\\`
/// inside (`sys::text::Quoted` writes them); its escapes are read back here.
fn fields(text: &str) -> Vec<(&str, Cow<'_, str>)> {
    let mut out = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let word_end = rest.find(' ').unwrap_or(rest.len());
        match rest[..word_end].split_once('=') {
            Some((key, _)) if !key.is_empty() => {
                let value_start = key.len() + 1;
                let after = &rest[value_start..];
                let (value, used) = match after.strip_prefix('"') {
                    Some(quoted) => unquote(quoted),
                    None => {
                        let end = after.find(' ').unwrap_or(after.len());
                        (Cow::Borrowed(&after[..end]), end)
                    }
                };
                out.push((key, value));
                rest = after[used..].trim_start();
            }
            _ => {
                out.push(("msg", Cow::Borrowed(&rest[..word_end])));
                rest = rest[word_end..].trim_start();
            }
        }
    }
    out
}

/// A quoted value's text (after its opening quote) up to the closing quote, unescaped, and
/// the bytes it took with both quotes; unterminated: the rest of the line.
fn unquote(quoted: &str) -> (Cow<'_, str>, usize) {
    let mut value = String::new();
    let mut chars = quoted.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => {
                return (
                    if value.len() == i {
                        Cow::Borrowed(&quoted[..i])
                    } else {
                        Cow::Owned(value)
                    },
                    i + 2,
                );
            }
            '\\' => match chars.next() {
                Some((_, next @ ('"' | '\\'))) => value.push(next),
                Some((_, other)) => {
                    value.push('\\');
                    value.push(other);
                }
                None => value.push('\\'),
            },
            c => value.push(c),
        }
    }
    (Cow::Owned(value), quoted.len() + 1)
}

fn json_line(ts: &str, level: &str, text: &str) -> String {
    let mut line = format!("{{\"ts\":{ts},\"level\":\"{level}\"");
    for (key, value) in fields(text) {
        line.push_str(",\"");
        escape_into(&mut line, key);
        line.push_str("\":");
        let value = value.as_ref();
        let integer = !value.is_empty()
            && value.len() < 19
            && value
                .trim_start_matches('-')
                .bytes()
                .all(|b| b.is_ascii_digit())
            && value != "-";
        if integer {
            line.push_str(value);
        } else {
            line.push('"');
            escape_into(&mut line, value);
            line.push('"');
        }
    }
    line.push('}');
    line
}

fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(event_kind("event=stall pid=1"), "stall");
        assert_eq!(event_kind("msg=x"), "-");
    }

    #[test]
    fn text_fields_become_one_json_object() {
        let line = json_line(
            "1.500",
            "warn",
            "event=recovery pid=42 outcome=failure detail=\"exit status: 3\" path=a\\b x=-",
        );
        assert_eq!(
            line,
            "{\"ts\":1.500,\"level\":\"warn\",\"event\":\"recovery\",\"pid\":42,\
             \"outcome\":\"failure\",\"detail\":\"exit status: 3\",\"path\":\"a\\\\b\",\"x\":\"-\"}"
        );
    }

    #[test]
    fn words_without_a_key_and_odd_quotes_are_kept() {
        assert_eq!(
            fields("event=x free word=\"unterminated"),
            vec![
                ("event", "x".into()),
                ("msg", "free".into()),
                ("word", "unterminated".into())
            ]
        );
    }

    #[test]
    fn a_quoted_hostile_value_stays_one_field() {
        use crate::sys::text::Quoted;
        for hostile in [
            "a\"pid=1",
            "\"x\"event=\"stall\"pid=\"1\".service",
            "b\\",
            "q\\\"",
            "a b=c",
        ] {
            let text = format!("event=agent_new pid=7 comm={} unit=-", Quoted(hostile));
            let got = fields(&text);
            assert_eq!(
                got,
                vec![
                    ("event", "agent_new".into()),
                    ("pid", "7".into()),
                    ("comm", hostile.into()),
                    ("unit", "-".into())
                ],
                "{text}"
            );
            let json: serde_json::Value =
                serde_json::from_str(&json_line("1.000", "info", &text)).unwrap();
            assert_eq!(json["comm"], hostile);
            assert_eq!(json["pid"], 7);
        }
    }
}
