//! One GET /metrics and the Prometheus text format (and OpenMetrics, which our daemon
//! serves) read into samples. A tiny parser: `top` needs names, labels and values only, and
//! the maintained parsing crates pull in far more than that.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result, bail};

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A bounded wait per scrape: `top` redraws once a second and says so when the observer
/// does not answer, rather than freezing.
const TIMEOUT: Duration = Duration::from_secs(2);

/// The most `top` reads of one answer: an observer with 65,536 agents serves ~20 MiB.
const MAX_BODY: u64 = 64 << 20;

/// GET /metrics at `addr` (with a bearer token): the body.
pub fn fetch(addr: SocketAddr, token: Option<&str>) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)
        .with_context(|| format!("connecting to {addr} (--addr)"))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    let read = (&mut s)
        .take(MAX_BODY + 1)
        .read_to_end(&mut raw)
        .with_context(|| format!("reading /metrics from {addr}"))?;
    if read as u64 > MAX_BODY {
        bail!("{addr} answered more than {} MiB", MAX_BODY >> 20);
    }
    body(&String::from_utf8_lossy(&raw)).with_context(|| format!("GET http://{addr}/metrics"))
}

/// The body of an HTTP/1.1 response, refusing anything but 200.
fn body(resp: &str) -> Result<String> {
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .context("not an HTTP response")?;
    let code = head.split_whitespace().nth(1).unwrap_or("?");
    match code {
        "200" => {}
        "401" | "403" => bail!("refused ({code}): pass the observer's token with --token-file"),
        "429" => bail!("rate-limited (429): the observer's --prom-rate-limit-per-sec is too low"),
        _ => bail!("answered {code}"),
    }
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .replace(' ', "")
            .starts_with("transfer-encoding:chunked")
    });
    if chunked {
        dechunk(body)
    } else {
        Ok(body.to_owned())
    }
}

fn dechunk(mut rest: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").context("truncated chunk")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .context("bad chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(after.get(..size).context("truncated chunk")?);
        rest = after.get(size..).unwrap_or("").trim_start_matches("\r\n");
    }
}

/// Every sample of a text exposition; lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = crate::sys::text::printable(&line.as_bytes()[..name_end]);
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = rest.split_once('=')?;
            let (value, after) = quoted(after.trim_start().strip_prefix('"')?)?;
            // Whatever the endpoint serves reaches the operator's terminal: never a control
            // byte (an escape sequence, a newline that breaks the table).
            let value = crate::sys::text::printable(value.as_bytes());
            labels.push((printable_key(key), value));
            rest = after;
        }
    }
    // A timestamp may follow the value.
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

fn printable_key(key: &str) -> String {
    crate::sys::text::printable(key.trim().as_bytes())
}

/// A label value up to its closing quote (escapes `\\`, `\"`, `\n`), and what follows.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_and_without_labels() {
        let text = "# HELP varta_beats Accepted beats\n# TYPE varta_beats counter\n\
                    varta_beats_total{pid=\"12\"} 5\nvarta_watch_pids_tracked 3\n\
                    varta_watch_uptime_seconds 1.5 1700000000\n# EOF\n";
        let s = parse(text);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "varta_beats_total");
        assert_eq!(s[0].label("pid"), Some("12"));
        assert_eq!(s[0].value, 5.0);
        assert_eq!(s[1].labels, vec![]);
        assert_eq!(s[2].value, 1.5);
    }

    #[test]
    fn escaped_and_several_labels() {
        let s = parse(r#"varta_agent_info{pid="7",comm="a \"b\"\\c",unit="x,y}.service",} 1"#);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].label("comm"), Some(r#"a "b"\c"#));
        assert_eq!(s[0].label("unit"), Some("x,y}.service"));
        assert_eq!(s[0].label("pid"), Some("7"));
    }

    #[test]
    fn no_control_byte_reaches_the_terminal() {
        let s = parse("varta_agent_info{pid=\"7\",comm=\"x\\n\u{1b}[2Jy\u{7}\"} 1");
        assert_eq!(s[0].label("comm"), Some("x\\x0a\\x1b[2Jy\\x07"));
        assert!(
            s[0].labels
                .iter()
                .all(|(k, v)| !(k.to_owned() + v).chars().any(char::is_control))
        );
    }

    #[test]
    fn broken_lines_are_skipped() {
        assert!(parse("varta_x{pid=\"1} 2\nvarta_y{pid=1} 2\nvarta_z abc\n").is_empty());
        assert_eq!(parse("varta_inf +Inf")[0].value, f64::INFINITY);
    }

    #[test]
    fn responses() {
        let ok = "HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\na 1\n";
        assert_eq!(body(ok).unwrap(), "a 1\n");
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\na 1\n\r\n4\r\nb 2\n\r\n0\r\n\r\n";
        assert_eq!(body(chunked).unwrap(), "a 1\nb 2\n");
        let refused = body("HTTP/1.1 401 Unauthorized\r\n\r\nunauthorized\n").unwrap_err();
        assert!(refused.to_string().contains("--token-file"), "{refused}");
        assert!(body("garbage").is_err());
    }
}
