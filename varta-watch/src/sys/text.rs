//! Text that comes from outside the observer (process names, cgroup paths): made printable
//! once where it is read, then quoted by each output's own rule (log values here, metric
//! labels in `actions::metrics`, export columns in `actions::export`).
//!
//! Any process can name itself (`prctl(PR_SET_NAME)`, or exec through a symlink) and a
//! delegated cgroup subtree can name its own groups: quotes, backslashes, newlines, terminal
//! escapes and bytes that are not UTF-8 all reach /proc.

use std::fmt::{self, Write};

/// `bytes` as printable UTF-8: valid characters kept, except control characters, which
/// become `\xNN` (`\u{NNNN}` above 0xff), as every byte that is not UTF-8 does (`\xNN`).
/// Nothing that reaches a log, a metric or a terminal from here can end a line or steer a
/// terminal.
pub fn printable(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            push_printable(&mut out, c);
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

fn push_printable(out: &mut String, c: char) {
    match c as u32 {
        _ if !c.is_control() => out.push(c),
        n @ 0..=0xff => {
            let _ = write!(out, "\\x{n:02x}");
        }
        n => {
            let _ = write!(out, "\\u{{{n:04x}}}");
        }
    }
}

/// A log value as one field whatever it holds: `"..."` with `\` and `"` escaped (and any
/// control character made printable), so `comm="a\"pid=1"` stays one key in text and JSON
/// (`sys::logger` reads the escapes back).
#[derive(Debug, Clone, Copy)]
pub struct Quoted<'a>(pub &'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        for c in self.0.chars() {
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                c if c.is_control() => {
                    let mut s = String::new();
                    push_printable(&mut s, c);
                    f.write_str(&s)?;
                }
                c => f.write_char(c)?,
            }
        }
        f.write_char('"')
    }
}

/// A log value as logfmt writes it: bare when it is one plain word, else [`Quoted`].
#[derive(Debug, Clone, Copy)]
pub struct LogValue<'a>(pub &'a str);

impl fmt::Display for LogValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plain = !self.0.is_empty()
            && self
                .0
                .chars()
                .all(|c| !c.is_whitespace() && !c.is_control() && !matches!(c, '"' | '\\' | '='));
        if plain {
            f.write_str(self.0)
        } else {
            Quoted(self.0).fmt(f)
        }
    }
}

/// `value` written as one log value ([`LogValue`]): for errors and paths, whose text is
/// not ours (`error={}`, `q(&e)`).
pub fn q(value: impl fmt::Display) -> String {
    LogValue(&value.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_become_printable() {
        assert_eq!(printable(b"worker"), "worker");
        assert_eq!(printable(b"x\"y"), "x\"y");
        assert_eq!(printable(b"a\nb\x1b[2J\x7f"), "a\\x0ab\\x1b[2J\\x7f");
        assert_eq!(printable(b"\xff\xfeok\xc3"), "\\xff\\xfeok\\xc3");
        assert_eq!(printable("zoë\u{85}".as_bytes()), "zoë\\x85");
        assert!(
            printable(&(0..=255u8).collect::<Vec<_>>())
                .chars()
                .all(|c| !c.is_control())
        );
    }

    #[test]
    fn quoted_values_escape_quotes_and_backslashes() {
        assert_eq!(Quoted("a\"pid=1").to_string(), r#""a\"pid=1""#);
        assert_eq!(Quoted(r"c:\x").to_string(), r#""c:\\x""#);
        assert_eq!(Quoted("two words").to_string(), "\"two words\"");
        assert_eq!(Quoted("nl\n").to_string(), "\"nl\\x0a\"");
        assert_eq!(LogValue("w.service").to_string(), "w.service");
        assert_eq!(LogValue("my worker").to_string(), "\"my worker\"");
        assert_eq!(LogValue("a=b").to_string(), "\"a=b\"");
        assert_eq!(LogValue("").to_string(), "\"\"");
    }
}
