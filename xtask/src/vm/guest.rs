//! Reading what a guest printed on its serial console: its `@@vm:<tag> <text>` marker
//! lines, the daemon logs and the metrics it dumped, and `key=value` fields.

use std::collections::HashMap;

/// `key=value` fields of a daemon log line or a guest marker line; a value may be quoted
/// (`reason="..."`). Words without `=` are skipped. The one parser of such lines here.
pub fn fields(line: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = line.trim_start();
    while !rest.is_empty() {
        let word_end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let Some(eq) = rest[..word_end].find('=') else {
            rest = rest[word_end..].trim_start();
            continue;
        };
        let key = rest[..eq].to_owned();
        let after = &rest[eq + 1..];
        let (value, next) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"').unwrap_or(quoted.len());
                (&quoted[..end], quoted.get(end + 1..).unwrap_or(""))
            }
            None => {
                let end = after.find(char::is_whitespace).unwrap_or(after.len());
                (&after[..end], &after[end..])
            }
        };
        out.insert(key, value.to_owned());
        rest = next.trim_start();
    }
    out
}

/// The guest's `@@vm:<tag> <text>` lines, wherever in a serial line they start.
fn markers(serial: &[String]) -> Vec<(&str, &str)> {
    serial
        .iter()
        .filter_map(|l| l.split_once("@@vm:").map(|(_, m)| m))
        .map(|m| m.split_once(' ').unwrap_or((m, "")))
        .collect()
}

/// The guest's last marker line before its metrics and logs: how far a hung guest got.
pub fn progress(serial: &[String]) -> String {
    markers(serial)
        .iter()
        .rev()
        .find(|(tag, _)| !tag.starts_with("log") && !matches!(*tag, "metric" | "main"))
        .map_or("nothing (init not reached)".into(), |(tag, text)| {
            format!("{tag} {text}")
        })
}

pub fn reached_init(serial: &[String]) -> bool {
    markers(serial).iter().any(|(tag, _)| *tag == "begin")
}

pub struct Guest<'a> {
    pub marks: Vec<(&'a str, &'a str)>,
    pub metrics: HashMap<String, f64>,
}

impl<'a> Guest<'a> {
    pub fn new(serial: &'a [String]) -> Self {
        let marks = markers(serial);
        let metrics = marks
            .iter()
            .filter(|(tag, _)| *tag == "metric")
            .filter(|(_, l)| !l.starts_with('#'))
            .filter_map(|(_, l)| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect();
        Self { marks, metrics }
    }

    /// Fields of the first marker with TAG (and, if given, NAME=name).
    pub fn mark(&self, tag: &str, name: Option<&str>) -> Option<HashMap<String, String>> {
        self.marks
            .iter()
            .filter(|(t, _)| *t == tag)
            .map(|(_, text)| fields(text))
            .find(|f| name.is_none_or(|n| f.get("name").map(String::as_str) == Some(n)))
    }

    /// The daemon log of a run (`main`, or `log.<caps run>`).
    pub fn log(&self, tag: &str) -> Vec<HashMap<String, String>> {
        self.marks
            .iter()
            .filter(|(t, _)| *t == tag)
            .map(|(_, text)| fields(text))
            .collect()
    }
    /// The labels of the first sample of metric NAME that is set to 1.
    pub fn labels(&self, name: &str) -> Option<HashMap<String, String>> {
        self.metrics
            .iter()
            .filter(|(_, v)| **v == 1.0)
            .find_map(|(k, _)| k.strip_prefix(name)?.strip_prefix('{')?.strip_suffix('}'))
            .map(|labels| fields(&labels.replace("\",", "\" ")))
    }

    pub fn metric(&self, sample: &str) -> Option<f64> {
        self.metrics.get(sample).copied()
    }

    pub fn sent(&self, tag: &str) -> Option<(f64, String)> {
        let f = self.mark(tag, None)?;
        Some((f.get("sent")?.parse().ok()?, f.get("pid")?.clone()))
    }
}

pub fn event<'l>(
    log: &'l [HashMap<String, String>],
    name: &str,
) -> Option<&'l HashMap<String, String>> {
    log.iter()
        .find(|f| f.get("event").map(String::as_str) == Some(name))
}

pub fn get(f: Option<&HashMap<String, String>>, key: &str) -> String {
    f.and_then(|f| f.get(key))
        .cloned()
        .unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_take_quoted_values_and_skip_plain_words() {
        let f = fields(
            "\x1b[0mts=1.2 level=warn event=datapath_fallback datapath=userspace reason=\"no CAP_BPF here\" x",
        );
        assert_eq!(f["reason"], "no CAP_BPF here");
        assert_eq!(f["event"], "datapath_fallback");
        assert_eq!(f.len(), 5);
    }

    #[test]
    fn markers_are_found_after_escape_codes() {
        let serial = vec!["\x1b[?25l@@vm:begin kernel=6.1.0-56-amd64 arch=x86_64".to_owned()];
        assert!(reached_init(&serial));
        assert_eq!(progress(&serial), "begin kernel=6.1.0-56-amd64 arch=x86_64");
    }

    #[test]
    fn metric_labels_are_fields() {
        let serial = vec![
            "@@vm:metric varta_datapath_info{mode=\"userspace\",attest=\"none\"} 0".to_owned(),
            "@@vm:metric varta_datapath_info{mode=\"ebpf\",attest=\"task_read\"} 1".to_owned(),
        ];
        let labels = Guest::new(&serial).labels("varta_datapath_info").unwrap();
        assert_eq!(labels["mode"], "ebpf");
        assert_eq!(labels["attest"], "task_read");
    }
}
