//! The shape of `src/`: imports between top-level modules run one way (no loop such as
//! checkpoint → model → checkpoint), and no two files import each other.
//!
//! Imports are read from the source text: every `crate::a::b` and `super::b` path
//! outside comments and before a file's `#[cfg(test)]` section, resolved to the file
//! that defines it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a file: `src/model/fused/norm.rs` → `[model, fused, norm]`,
/// `src/hf/mod.rs` → `[hf]`.
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src()).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The file defining the longest prefix of module path `path` that has a file.
fn file_of(path: &[String]) -> Option<PathBuf> {
    (1..=path.len()).rev().find_map(|n| {
        let base = src().join(path[..n].join("/"));
        [base.with_extension("rs"), base.join("mod.rs")]
            .into_iter()
            .find(|f| f.is_file())
    })
}

/// Identifiers after `prefix::` in `code`, as module paths (`crate::a::b::{c, d}` gives
/// `[a, b]`; a brace list is not followed).
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let mut parts = Vec::new();
        let mut s = rest;
        loop {
            let end = s
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(s.len());
            if end == 0 {
                break;
            }
            parts.push(s[..end].to_string());
            s = &s[end..];
            match s.strip_prefix("::") {
                Some(t) => s = t,
                None => break,
            }
        }
        if !parts.is_empty() {
            out.push(parts);
        }
    }
    out
}

/// Every file each file imports (other than itself).
fn file_imports() -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut graph = BTreeMap::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let code: String = text
            .lines()
            .take_while(|l| !l.trim_start().starts_with("#[cfg(test)]"))
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let me = module_of(&f);
        let mut deps = BTreeSet::new();
        for p in paths_after(&code, "crate::") {
            deps.extend(file_of(&p));
        }
        // `super::x` in module a::b (a/b.rs or a/b/mod.rs) is a::x.
        for p in paths_after(&code, "super::") {
            let mut parent = me.clone();
            parent.pop();
            parent.extend(p);
            deps.extend(file_of(&parent));
        }
        deps.remove(&f);
        graph.insert(f, deps);
    }
    graph
}

fn top(f: &Path) -> String {
    module_of(f)[0].clone()
}

#[test]
fn no_two_files_import_each_other() {
    let g = file_imports();
    let mut pairs = Vec::new();
    for (a, deps) in &g {
        for b in deps {
            if a < b && g.get(b).is_some_and(|d| d.contains(a)) {
                pairs.push(format!("{} <-> {}", a.display(), b.display()));
            }
        }
    }
    assert!(pairs.is_empty(), "files importing each other: {pairs:#?}");
}

#[test]
fn top_level_modules_import_one_way() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (f, deps) in file_imports() {
        let a = top(&f);
        if a == "lib" || a == "main" {
            continue;
        }
        let entry = g.entry(a.clone()).or_default();
        entry.extend(
            deps.iter()
                .map(|d| top(d))
                .filter(|b| *b != a && b != "lib"),
        );
    }
    // Depth-first search for a cycle, reporting it.
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in g.keys() {
        if let Some(cycle) = visit(n, &g, &mut Vec::new(), &mut done) {
            panic!("import loop between modules: {}", cycle.join(" -> "));
        }
    }
    // The loop this test was written for must stay broken.
    assert!(
        !g["model"].contains("hf"),
        "model imports hf: {:?}",
        g["model"]
    );
}

/// The reader above finds imports at all (a test that could not fail is no test).
#[test]
fn the_import_reader_sees_known_imports() {
    let g = file_imports();
    let trainer = src().join("train/trainer.rs");
    assert!(g[&trainer].contains(&src().join("train/checkpoint.rs")));
    assert!(g[&trainer].contains(&src().join("strategy/mod.rs")));
    assert!(g[&src().join("hf/mod.rs")].contains(&src().join("model/weights.rs")));
}
