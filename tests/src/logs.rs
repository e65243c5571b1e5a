//! Strict readers of the daemon's log lines, one per `--log-format`: each gives a line's
//! fields in order, as the text format writes their values (a JSON `null` as `-`, numbers
//! and bools as written), or says why the line is not well-formed.

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

/// A text line: `key=value` fields separated by one space; a value is one plain word (no
/// space, `"`, `\`, `=` or control character) or quoted, with `\"` and `\\` its only
/// escapes. Each key once.
pub fn text_fields(line: &str) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut rest = line;
    loop {
        let eq = rest
            .find('=')
            .ok_or_else(|| format!("no '=' in {rest:?}"))?;
        let key = &rest[..eq];
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(format!("bad key {key:?}"));
        }
        rest = &rest[eq + 1..];
        let value = match rest.strip_prefix('"') {
            Some(quoted) => {
                let mut value = String::new();
                let mut chars = quoted.char_indices();
                let end = loop {
                    match chars.next() {
                        Some((i, '"')) => break i + 1,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, c @ ('"' | '\\'))) => value.push(c),
                            other => return Err(format!("bad escape {other:?} in {key}")),
                        },
                        Some((_, c)) if c.is_control() => {
                            return Err(format!("control character in {key}"));
                        }
                        Some((_, c)) => value.push(c),
                        None => return Err(format!("unterminated {key}")),
                    }
                };
                rest = &quoted[end..];
                value
            }
            None => {
                let end = rest.find(' ').unwrap_or(rest.len());
                let word = &rest[..end];
                if word.is_empty()
                    || word.contains(|c: char| c.is_control() || matches!(c, '"' | '\\' | '='))
                {
                    return Err(format!("bad bare value {word:?} of {key}"));
                }
                rest = &rest[end..];
                word.to_owned()
            }
        };
        if out.iter().any(|(k, _)| k == key) {
            return Err(format!("{key} twice"));
        }
        out.push((key.to_owned(), value));
        if rest.is_empty() {
            return Ok(out);
        }
        rest = rest
            .strip_prefix(' ')
            .filter(|r| !r.starts_with(' '))
            .ok_or_else(|| format!("no single space after {key}"))?;
    }
}

/// A JSON line: one object of scalars, each key once.
pub fn json_fields(line: &str) -> Result<Vec<(String, String)>, String> {
    let Pairs(pairs) = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let mut out: Vec<(String, String)> = Vec::new();
    for (key, value) in pairs {
        if out.iter().any(|(k, _)| *k == key) {
            return Err(format!("{key} twice"));
        }
        let value = match value {
            serde_json::Value::Null => "-".to_owned(),
            serde_json::Value::String(s) => s,
            serde_json::Value::Bool(b) => b.to_string(),
            serde_json::Value::Number(n) => n.to_string(),
            other => return Err(format!("{key} is not a scalar: {other}")),
        };
        out.push((key, value));
    }
    Ok(out)
}

/// An object's entries in order, duplicates kept (`serde_json::Value` keeps the last).
struct Pairs(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Pairs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = Pairs;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Pairs, A::Error> {
                let mut pairs = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    pairs.push(entry);
                }
                Ok(Pairs(pairs))
            }
        }
        d.deserialize_map(Entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readers_take_well_formed_lines_and_refuse_the_rest() {
        let fields = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            text_fields(r#"event=x path="/a \"b\" \\c" n=-"#).unwrap(),
            fields(&[("event", "x"), ("path", "/a \"b\" \\c"), ("n", "-")])
        );
        assert_eq!(
            json_fields(r#"{"event":"x","path":"/a \"b\"","n":null,"k":true,"p":42}"#).unwrap(),
            fields(&[
                ("event", "x"),
                ("path", "/a \"b\""),
                ("n", "-"),
                ("k", "true"),
                ("p", "42")
            ])
        );
        for bad in [
            "event=x path=/a b",
            "event=x  n=1",
            r#"event=x p="a\nb""#,
            r#"event=x p="open"#,
            "event=x event=y",
            "event=x p=a\"b",
        ] {
            assert!(text_fields(bad).is_err(), "{bad}");
        }
        for bad in [r#"{"a":1,"a":2}"#, r#"{"a":[1]}"#, "{\"a\":1"] {
            assert!(json_fields(bad).is_err(), "{bad}");
        }
    }
}
