//! The layers of ARCHITECTURE.md, checked: every module of `src/` uses only modules of its own
//! layer and of the layers below it, and no two top-level modules import each other (directly
//! or round a longer cycle). A failure names the file and the import.
//!
//! The check reads the sources as text: every `crate::<module>` path (in `use` lines and in
//! expressions alike), `super::` paths that climb out to the crate root, and the binary's
//! `feishu_reply_gateway::<module>` paths. Comments and string literals are skipped (a doc
//! link is not a dependency).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, top to bottom (ARCHITECTURE.md). A module may use its own layer and those
/// below it.
const LAYERS: &[(&str, &[&str])] = &[
    ("entry", &["main", "app", "reload"]),
    ("api", &["grpc", "auth", "listen", "client", "proto"]),
    (
        "backends",
        &["cluster", "jobs", "redis_conn", "fake_feishu"],
    ),
    (
        "domain",
        &["scheduler", "stream", "reply", "budget", "chat_cache"],
    ),
    ("upstream", &["feishu"]),
    ("foundation", &["config", "metrics", "telemetry"]),
    ("quota", &["quota"]),
];

/// One import of one file: the top-level module it names, where.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Import {
    file: String,
    line: usize,
    target: String,
    text: String,
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, ms)| ms.contains(&module))
}

/// Blanks out comments and the contents of string and char literals, keeping line breaks
/// (so line numbers stay right).
fn strip(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if b[i] == b'\n' {
                        out.push('\n');
                    }
                    i += 1;
                }
            }
        } else if c == b'r' && matches!(b.get(i + 1), Some(b'#') | Some(b'"')) && !ident(b, i) {
            // Raw string r"…" or r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(c as char);
                i += 1;
                continue;
            }
            j += 1;
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            while j < b.len() && !b[j..].starts_with(&close) {
                if b[j] == b'\n' {
                    out.push('\n');
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j + close.len();
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                if i < b.len() && b[i] == b'\n' {
                    out.push('\n');
                }
                i += 1;
            }
            out.push_str("\"\"");
            i += 1;
        } else if c == b'\'' && is_char_literal(b, i) {
            // A char literal ('x', '\n', '\u{..}'), not a lifetime.
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            out.push_str("' '");
            i += 1;
        } else {
            // Copy one whole UTF-8 character.
            let len = utf8_len(c);
            out.push_str(&src[i..i + len]);
            i += len;
        }
    }
    out
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

/// Whether the byte before `i` continues an identifier (so `r` is not a raw-string prefix).
fn ident(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

fn is_char_literal(b: &[u8], i: usize) -> bool {
    match (b.get(i + 1), b.get(i + 2)) {
        (Some(b'\\'), _) => true,
        (Some(_), Some(b'\'')) => true,
        // A multi-byte character: 'é'.
        (Some(&c), _) if c >= 0x80 => {
            let len = utf8_len(c);
            b.get(i + 1 + len) == Some(&b'\'')
        }
        _ => false,
    }
}

/// The top-level module a file belongs to, and how deep it sits below the crate root
/// (`src/a.rs` and `src/a/mod.rs`: 1; `src/a/b.rs`: 2).
fn module_of(rel: &Path) -> (String, usize) {
    let parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let top = parts[0].trim_end_matches(".rs").to_owned();
    let last = parts.last().map(String::as_str);
    let depth = if parts.len() == 1 {
        1
    } else if last == Some("mod.rs") {
        parts.len() - 1
    } else {
        parts.len()
    };
    (top, depth)
}

/// The top-level modules a file's source names.
fn imports(file: &str, depth: usize, src: &str) -> Vec<Import> {
    let code = strip(src);
    let mut found = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let mut rest = line;
        while let Some(target) = next_path(&mut rest, depth) {
            for t in target {
                found.push(Import {
                    file: file.to_owned(),
                    line: n + 1,
                    target: t,
                    text: src.lines().nth(n).unwrap_or("").trim().to_owned(),
                });
            }
        }
    }
    found
}

/// The next crate-rooted path in `rest` (advancing it): the top-level modules it names (a
/// `crate::{a, b::c}` group names several).
fn next_path(rest: &mut &str, depth: usize) -> Option<Vec<String>> {
    loop {
        let (at, root_len) = [
            ("crate::", 7),
            ("feishu_reply_gateway::", 22),
            ("super::", 7),
        ]
        .iter()
        .filter_map(|(p, len)| find_word(rest, p).map(|i| (i, *len)))
        .min()?;
        let word = &rest[at..];
        let mut after = &word[root_len..];
        if word.starts_with("super::") {
            // Climb: as many `super::` as the file is deep reaches the crate root.
            let mut ups = 1;
            while let Some(r) = after.strip_prefix("super::") {
                ups += 1;
                after = r;
            }
            if ups < depth {
                *rest = after;
                continue;
            }
        }
        *rest = after;
        return Some(group_heads(after));
    }
}

/// `p` in `s` where it starts a path (not inside a longer identifier such as `$crate::`).
fn find_word(s: &str, p: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = s[from..].find(p) {
        let at = from + i;
        let before = s[..at].chars().next_back();
        if !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            return Some(at);
        }
        from = at + p.len();
    }
    None
}

/// The first segment of a path, or of each path of a `{…}` group (one level: a group's
/// members name top-level modules).
fn group_heads(after: &str) -> Vec<String> {
    let head = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    if let Some(inner) = after.trim_start().strip_prefix('{') {
        let mut depth = 0;
        let mut end = inner.len();
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    end = i;
                    break;
                }
                '}' => depth -= 1,
                _ => {}
            }
        }
        let mut heads = Vec::new();
        let mut depth = 0;
        let mut start = 0;
        let body = &inner[..end];
        for (i, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    heads.push(head(&body[start..i]));
                    start = i + 1;
                }
                _ => {}
            }
        }
        heads.push(head(&body[start..]));
        heads
            .into_iter()
            .filter(|h| !h.is_empty() && h != "self")
            .collect()
    } else {
        let h = head(after);
        if h.is_empty() { Vec::new() } else { vec![h] }
    }
}

/// Every import between top-level modules of the tree at `src`.
fn scan(src: &Path) -> BTreeMap<String, Vec<Import>> {
    let mut files = Vec::new();
    collect(src, &mut files);
    let mut by_module: BTreeMap<String, Vec<Import>> = BTreeMap::new();
    for path in files {
        let rel = path.strip_prefix(src).expect("under src");
        if rel == Path::new("lib.rs") {
            // The crate root declares the modules; `proto` is defined in it.
            let text = std::fs::read_to_string(&path).expect("readable");
            let module = by_module.entry("proto".into()).or_default();
            module.extend(
                imports("lib.rs", 1, &text)
                    .into_iter()
                    .filter(|i| i.target != "proto"),
            );
            continue;
        }
        let (module, depth) = module_of(rel);
        let text = std::fs::read_to_string(&path).expect("readable");
        let file = rel.to_string_lossy().into_owned();
        let entry = by_module.entry(module.clone()).or_default();
        entry.extend(
            imports(&file, depth, &text)
                .into_iter()
                .filter(|i| i.target != module),
        );
    }
    by_module
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("readable dir")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// What breaks the layering: unknown modules, imports of a layer above, and cycles between
/// top-level modules (each edge named by one of its imports).
fn violations(by_module: &BTreeMap<String, Vec<Import>>) -> Vec<String> {
    let mut out = Vec::new();
    let mut known: BTreeSet<&str> = by_module.keys().map(String::as_str).collect();
    for m in &known {
        if layer_of(m).is_none() {
            out.push(format!(
                "module `{m}` is in no layer: add it to LAYERS (tests/architecture.rs) and ARCHITECTURE.md"
            ));
        }
    }
    known.extend(LAYERS.iter().flat_map(|(_, ms)| ms.iter().copied()));
    let mut edges: BTreeMap<&str, BTreeMap<&str, &Import>> = BTreeMap::new();
    for (m, imports) in by_module {
        for i in imports {
            if !known.contains(i.target.as_str()) {
                // A name that is not a module of ours (`crate::SomeReexport`, a macro).
                continue;
            }
            edges
                .entry(m.as_str())
                .or_default()
                .entry(i.target.as_str())
                .or_insert(i);
            if let (Some(from), Some(to)) = (layer_of(m), layer_of(&i.target))
                && to < from
            {
                out.push(format!(
                    "{}:{}: `{}` ({}) uses `{}` ({}), a layer above it: `{}`",
                    i.file, i.line, m, LAYERS[from].0, i.target, LAYERS[to].0, i.text
                ));
            }
        }
    }
    let cycles = cycles(&edges);
    if cycles.len() > 10 {
        out.push(format!(
            "{} import cycles between top-level modules; the first 10:",
            cycles.len()
        ));
    }
    for cycle in cycles.into_iter().take(10) {
        let hops: Vec<String> = cycle
            .windows(2)
            .map(|w| {
                let i = edges[w[0]][w[1]];
                format!("{} -> {} ({}:{}: `{}`)", w[0], w[1], i.file, i.line, i.text)
            })
            .collect();
        out.push(format!("import cycle: {}", hops.join("; ")));
    }
    out
}

/// Every elementary cycle found by a depth-first search, once each (as a closed walk
/// starting at its smallest module).
fn cycles<'a>(edges: &BTreeMap<&'a str, BTreeMap<&'a str, &Import>>) -> Vec<Vec<&'a str>> {
    fn walk<'a>(
        start: &'a str,
        at: &'a str,
        path: &mut Vec<&'a str>,
        edges: &BTreeMap<&'a str, BTreeMap<&'a str, &Import>>,
        found: &mut BTreeSet<Vec<&'a str>>,
    ) {
        for &next in edges.get(at).map(|e| e.keys()).into_iter().flatten() {
            if next == start {
                let mut c = path.clone();
                c.push(start);
                found.insert(c);
            } else if next > start && !path.contains(&next) {
                path.push(next);
                walk(start, next, path, edges, found);
                path.pop();
            }
        }
    }
    let mut found = BTreeSet::new();
    for &start in edges.keys() {
        walk(start, start, &mut vec![start], edges, &mut found);
    }
    found.into_iter().collect()
}

#[test]
fn every_module_uses_only_its_layer_and_those_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let by_module = scan(&src);
    assert!(
        by_module.len() >= 15,
        "read too few modules: {:?}",
        by_module.keys()
    );
    let problems = violations(&by_module);
    assert!(
        problems.is_empty(),
        "the layers of ARCHITECTURE.md are broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn every_layer_module_exists() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let by_module = scan(&src);
    for (layer, modules) in LAYERS {
        for m in *modules {
            assert!(
                by_module.contains_key(*m),
                "LAYERS names `{m}` ({layer}), which src/ does not have"
            );
        }
    }
}

// === the checker itself ===

fn synthetic(files: &[(&str, &str)]) -> BTreeMap<String, Vec<Import>> {
    let mut by_module: BTreeMap<String, Vec<Import>> = BTreeMap::new();
    for (path, text) in files {
        let (module, depth) = module_of(Path::new(path));
        let entry = by_module.entry(module.clone()).or_default();
        entry.extend(
            imports(path, depth, text)
                .into_iter()
                .filter(|i| i.target != module),
        );
    }
    by_module
}

#[test]
fn an_import_of_a_layer_above_is_named_with_its_file_and_line() {
    let m = synthetic(&[
        (
            "scheduler/queue.rs",
            "use std::sync::Arc;\nuse crate::cluster::SharedKey;\n",
        ),
        ("cluster/mod.rs", "use crate::scheduler::gate::Grant;\n"),
    ]);
    let v = violations(&m);
    assert_eq!(v.len(), 2, "{v:?}");
    assert!(
        v[0].starts_with("scheduler/queue.rs:2: `scheduler` (domain) uses `cluster` (backends)"),
        "{v:?}"
    );
    assert!(
        v[1].starts_with("import cycle: cluster -> scheduler"),
        "{v:?}"
    );
}

#[test]
fn groups_expressions_super_paths_and_the_binary_s_paths_count() {
    let m = synthetic(&[
        ("config/mod.rs", "use crate::{quota::QuotaSpec, metrics};\n"),
        (
            "metrics/mod.rs",
            "fn f() { let _ = crate::auth::UNAUTHENTICATED; }\n",
        ),
        (
            "feishu/client.rs",
            "use super::super::budget::Budgets;\nuse super::token::X;\n",
        ),
        ("main.rs", "use feishu_reply_gateway::grpc::ReplyService;\n"),
    ]);
    let targets: BTreeSet<(String, String)> = m
        .iter()
        .flat_map(|(k, v)| v.iter().map(move |i| (k.clone(), i.target.clone())))
        .collect();
    for (from, to) in [
        ("config", "quota"),
        ("config", "metrics"),
        ("metrics", "auth"),
        ("feishu", "budget"),
        ("main", "grpc"),
    ] {
        assert!(
            targets.contains(&(from.into(), to.into())),
            "{from} -> {to} missed: {targets:?}"
        );
    }
    // `super::token` inside feishu/ stays inside feishu.
    assert!(!targets.iter().any(|(_, t)| t == "token"), "{targets:?}");
    let v = violations(&m);
    assert!(
        v.iter()
            .any(|p| p.contains("`metrics` (foundation) uses `auth` (api)")),
        "{v:?}"
    );
    assert!(
        v.iter()
            .any(|p| p.contains("`feishu` (upstream) uses `budget` (domain)")),
        "{v:?}"
    );
}

#[test]
fn comments_strings_and_doc_links_are_not_imports() {
    let m = synthetic(&[(
        "reply.rs",
        "//! See [`crate::grpc::ReplyService`].\n/* crate::app */\nconst S: &str = \"crate::jobs\";\nconst R: &str = r#\"crate::cluster\"#;\nfn f<'a>(x: &'a str) -> char { let _ = x; '\"' }\n",
    )]);
    assert!(m["reply"].is_empty(), "{:?}", m["reply"]);
}

#[test]
fn a_longer_cycle_within_one_layer_is_found() {
    let m = synthetic(&[
        ("jobs/mod.rs", "use crate::cluster::X;\n"),
        ("cluster/mod.rs", "use crate::redis_conn::Y;\n"),
        ("redis_conn/mod.rs", "use crate::jobs::Z;\n"),
    ]);
    let v = violations(&m);
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(
        v[0].starts_with("import cycle: cluster -> redis_conn")
            && v[0].contains("redis_conn -> jobs")
            && v[0].contains("jobs -> cluster"),
        "{v:?}"
    );
}
