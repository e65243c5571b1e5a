//! The daemon's layers, held by the build: every `crate::` path in `varta-watch/src` names a
//! module its own module may import, by [`LAYERS`], the one table of allowed edges. Runs with
//! `cargo test` (so in `cargo xtask test` and CI), and fails naming each `file:line` that
//! imports against the layering.
//!
//! A module tree with this check instead of a crate per layer: the layers move types
//! between modules, not across published APIs, and one crate keeps one build, one set of
//! `pub(crate)` items and the library the fuzz targets and tests already depend on.

use std::{fs, path::Path};

/// Each top-level module of `src/` and the modules it may import, in layer order: a module
/// names only modules above it in this table, so the layers have no cycle (checked).
///
/// The bottom (`sys`, the shared vocabulary, `signal`, `config`, `ratelimit`) is below every
/// stage; the pipeline is socket -> `datapath` -> `observer` -> `actions`; `daemon` wires
/// them (start-up, the event loop, the HTTP server, the state file). `agent` and `top` are
/// clients of the daemon's interfaces, beside it.
const LAYERS: &[(&str, &[&str])] = &[
    ("sys", &[]),
    ("vocab", &["sys"]),
    ("signal", &["sys"]),
    ("config", &["sys", "vocab", "signal"]),
    ("ratelimit", &["sys", "vocab", "config"]),
    (
        "datapath",
        &["sys", "vocab", "signal", "config", "ratelimit"],
    ),
    (
        "observer",
        &["sys", "vocab", "signal", "config", "ratelimit", "datapath"],
    ),
    (
        "actions",
        &[
            "sys",
            "vocab",
            "signal",
            "config",
            "ratelimit",
            "datapath",
            "observer",
        ],
    ),
    (
        "daemon",
        &[
            "sys",
            "vocab",
            "signal",
            "config",
            "ratelimit",
            "datapath",
            "observer",
            "actions",
        ],
    ),
    ("agent", &["sys", "vocab", "config"]),
    ("top", &["sys", "vocab", "config"]),
];

/// One `crate::<module>` reference: the file, its line and the module named.
#[derive(Debug, PartialEq, Eq)]
struct Import {
    line: usize,
    module: String,
}

/// The top-level modules `source` names through `crate::`: `crate::a::b`, and each item
/// of a group, `crate::{a::x, b::{y, z}}`. Comments are skipped.
fn imports(source: &str) -> Vec<Import> {
    let mut out = Vec::new();
    let code = strip_comments(source);
    let bytes = code.as_bytes();
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    let mut from = 0;
    while let Some(found) = code[from..].find("crate::") {
        let at = from + found;
        from = at + "crate::".len();
        // `varta_crate::`, `$crate::` are other paths.
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        if bytes.get(from) == Some(&b'{') {
            // A group: the names at its first level.
            let mut depth = 0;
            let mut expect_name = true;
            let mut i = from;
            while i < bytes.len() {
                match bytes[i] {
                    b'{' => {
                        depth += 1;
                        expect_name = depth == 1;
                    }
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    b',' if depth == 1 => expect_name = true,
                    c if expect_name && (c.is_ascii_alphabetic() || c == b'_') => {
                        let end = ident_end(&code, i);
                        out.push(Import {
                            line: line_of(i),
                            module: code[i..end].to_owned(),
                        });
                        expect_name = false;
                        i = end;
                        continue;
                    }
                    _ => {}
                }
                i += 1;
            }
        } else {
            let end = ident_end(&code, from);
            if end > from {
                out.push(Import {
                    line: line_of(at),
                    module: code[from..end].to_owned(),
                });
            }
        }
    }
    out
}

fn ident_end(code: &str, from: usize) -> usize {
    code[from..]
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .map_or(code.len(), |n| from + n)
}

/// `source` with its comments blanked (line breaks kept, so lines still count).
fn strip_comments(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("//") {
            let end = after.find('\n').unwrap_or(after.len());
            rest = &after[end..];
        } else if let Some(after) = rest.strip_prefix("/*") {
            let end = after.find("*/").map_or(after.len(), |n| n + 2);
            out.extend(after[..end].chars().filter(|&c| c == '\n'));
            rest = &after[end..];
        } else if let Some(after) = rest.strip_prefix("r#\"") {
            // A raw string: kept as `""`.
            let end = after.find("\"#").map_or(after.len(), |n| n + 2);
            out.push_str("\"\"");
            out.extend(after[..end].chars().filter(|&c| c == '\n'));
            rest = &after[end..];
        } else if let Some(len) = char_literal(rest) {
            out.push_str(&rest[..len]);
            rest = &rest[len..];
        } else if rest.starts_with('"') {
            // A string literal: kept as `""` (a `crate::` or `//` inside is not code).
            let body = &rest[1..];
            let mut end = body.len();
            let mut escaped = false;
            for (i, c) in body.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => {
                        end = i;
                        break;
                    }
                    _ => escaped = false,
                }
            }
            out.push_str("\"\"");
            out.extend(body[..end].chars().filter(|&c| c == '\n'));
            rest = body.get(end + 1..).unwrap_or("");
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// The length of the char literal `rest` starts with (`'"'`, `'\\''`), if it does (a lifetime
/// does not).
fn char_literal(rest: &str) -> Option<usize> {
    let body = rest.strip_prefix('\'')?;
    let mut chars = body.char_indices();
    let (_, first) = chars.next()?;
    if first == '\\' {
        return body[2..].find('\'').map(|n| n + 4);
    }
    let (at, next) = chars.next()?;
    (next == '\'').then_some(1 + at + 1)
}

/// The violations in the file `path` (relative to `src/`), as `file:line: message`.
fn check_file(path: &str, source: &str) -> Vec<String> {
    let module = path.split('/').next().unwrap().trim_end_matches(".rs");
    if matches!(module, "lib" | "main") {
        return Vec::new();
    }
    let Some((_, allowed)) = LAYERS.iter().find(|(m, _)| *m == module) else {
        return vec![format!(
            "src/{path}:1: module `{module}` is not in LAYERS (tests/layers.rs): add it with what it may import"
        )];
    };
    imports(source)
        .into_iter()
        .filter(|i| i.module != module && i.module != "self" && !allowed.contains(&&*i.module))
        .map(|i| {
            format!(
                "src/{path}:{}: `{module}` imports `crate::{}`, against the layering (tests/layers.rs: `{module}` may import {allowed:?})",
                i.line, i.module
            )
        })
        .collect()
}

fn rust_files(dir: &Path, prefix: &str, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().into_string().unwrap();
        let rel = format!("{prefix}{name}");
        if entry.file_type().unwrap().is_dir() {
            rust_files(&entry.path(), &format!("{rel}/"), out);
        } else if name.ends_with(".rs") {
            out.push((rel, fs::read_to_string(entry.path()).unwrap()));
        }
    }
}

#[test]
fn every_import_follows_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, "", &mut files);
    assert!(files.len() > 50, "read {} files under {src:?}", files.len());
    let violations: Vec<String> = files
        .iter()
        .flat_map(|(path, source)| check_file(path, source))
        .collect();
    assert!(
        violations.is_empty(),
        "imports against the layering:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_layers_have_no_cycle_and_name_every_module() {
    for (i, (module, allowed)) in LAYERS.iter().enumerate() {
        for a in *allowed {
            let at = LAYERS.iter().position(|(m, _)| m == a);
            assert!(
                at.is_some_and(|at| at < i),
                "`{module}` may import `{a}`, which is not a module above it in LAYERS"
            );
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for entry in fs::read_dir(&src).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let module = name.trim_end_matches(".rs");
        if !matches!(module, "lib" | "main") {
            assert!(
                LAYERS.iter().any(|(m, _)| *m == module),
                "src/{name} is not in LAYERS"
            );
        }
    }
}

#[test]
fn the_check_finds_paths_groups_and_their_lines() {
    let source = "//! crate::actions in a comment\n\
        use crate::{\n    sys::clock,\n    actions::{a, b},\n};\n\
        fn f() { crate::daemon::x(); let _ = \"crate::top\"; varta_crate::y(); }\n\
        /* crate::top */ use crate::datapath::Beat;\n";
    let found: Vec<(usize, &str)> = imports(source)
        .iter()
        .map(|i| {
            (
                i.line,
                match i.module.as_str() {
                    "sys" => "sys",
                    "actions" => "actions",
                    "daemon" => "daemon",
                    "datapath" => "datapath",
                    _ => "?",
                },
            )
        })
        .collect();
    assert_eq!(
        found,
        [(3, "sys"), (4, "actions"), (6, "daemon"), (7, "datapath")]
    );
    assert_eq!(
        strip_comments("let q = '\"'; // x\n'\\''; r#\"a\"b\"#;"),
        "let q = '\"'; \n'\\''; \"\";"
    );
    let bad = check_file("datapath/x.rs", source);
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert!(bad[0].starts_with("src/datapath/x.rs:4: `datapath` imports `crate::actions`"));
    assert!(bad[1].starts_with("src/datapath/x.rs:6: `datapath` imports `crate::daemon`"));
    assert!(check_file("daemon/x.rs", source).is_empty());
    assert!(check_file("newstage/x.rs", "")[0].contains("not in LAYERS"));
}
