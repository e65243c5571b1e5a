//! Text that comes from outside the observer (process names, cgroup paths): made printable
//! once where it is read, then quoted by each output's own rule (log values in
//! `sys::logger`, metric labels in `actions::metrics`, export columns in `actions::export`).
//!
//! Any process can name itself (`prctl(PR_SET_NAME)`, or exec through a symlink) and a
//! delegated cgroup subtree can name its own groups: quotes, backslashes, newlines, terminal
//! escapes and bytes that are not UTF-8 all reach /proc.

use std::fmt::Write;

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

/// `c` as printable text: itself, or a control character as `\xNN` (`\u{NNNN}` above 0xff).
pub fn push_printable(out: &mut String, c: char) {
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
}
