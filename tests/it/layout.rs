//! The shape of `src/`: no import cycle between files (of any length: a → b → c → a as
//! well as a ↔ b), and imports between top-level modules run one way (no loop such as
//! checkpoint → model → checkpoint).
//!
//! # How imports are read
//!
//! From the source text, with comments and string and character literals blanked
//! first, so that neither a doc example nor a message counts. An import is any path
//! that starts with `crate::`, `super::` (any number of them: `super::super::x`) or
//! `self::`, wherever it stands: in a `use` (a `pub use` re-export included) or inline
//! in code (`crate::a::b::f(…)`). Brace lists are followed to every leaf, nested ones
//! too: `use crate::{model::Gpt, train::{self, step::x}}` names `crate::model::Gpt`,
//! `crate::train` and `crate::train::step::x`. `super` and `self` are taken relative to
//! the module they stand in, inline `mod m { … }` blocks included.
//!
//! A path names the file that defines its longest prefix with a file of its own:
//! `crate::model::fused::norm::rms` is `model/fused/norm.rs`, `crate::model::Gpt` is
//! `model/mod.rs`, and `crate::Result` is `lib.rs`. An item re-exported by a `pub use`
//! counts as the re-exporting file's, since that is the file its users name.
//!
//! # What is left out, and why
//!
//! - **Test code.** An item under `#[cfg(test)]` (or any `cfg` that holds only in
//!   tests, such as `cfg(all(test, unix))`) is skipped up to its end: the test module
//!   or function to its matching closing brace, a `use` or `const` to its semicolon. The
//!   code after it is read as usual, so a `#[cfg(test)] mod tests { … }` in the middle
//!   of a file hides nothing below it. A test module in its own file (`#[cfg(test)] mod
//!   tests;`) is left out whole, with every module under it. Tests may import freely:
//!   they sit outside the layering that the library's own code must keep, and no
//!   non-test code can import them, so they cannot close a loop in the library.
//! - **`main.rs`**: the binary is a crate of its own that reaches the library as
//!   `lit_claire::…`; the library cannot import it back.
//! - **A parent's own children** named without `self::` (`mod a; pub use a::X;`): a
//!   module declaring and re-exporting its children is the module tree itself, not an
//!   import between layers. The price: a loop closed only through a parent's use of
//!   its child (`train/mod.rs` naming `trainer::X` while `trainer.rs` names
//!   `super::Y`) is not seen. `self::a::X` is read like any other path.
//!
//! Every cycle in the file graph lies inside one strongly connected component (found
//! with Tarjan's algorithm). A failure names, for each component, shortest cycles that
//! between them pass through all its files, each as a path a → b → c → a with, for
//! every step, the line and the path that makes it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;

/// Source files by path relative to `src/` (`model/fused/norm.rs`), with their text.
type Files = BTreeMap<String, String>;

/// Where one file names another: the line in the importing file and the path named
/// there, written out in full (`crate::model::b::f`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Site {
    line: usize,
    path: String,
}

/// For each file, the files it imports (itself left out), with the first place each is
/// named.
type Graph = BTreeMap<String, BTreeMap<String, Site>>;

// ----------------------------------------------------------------------------------
// Reading one file
// ----------------------------------------------------------------------------------

/// `text` with comments, string literals (raw and byte ones too) and character
/// literals turned into spaces. Newlines are kept, so byte offsets and line numbers are
/// those of the original; lifetimes (`'a`) stay.
fn blank_comments_and_literals(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for x in &mut out[from..to.min(b.len())] {
            if *x != b'\n' {
                *x = b' ';
            }
        }
    };
    let ident_byte = |i: usize| b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] >= 0x80;
    let mut i = 0;
    while i < b.len() {
        let next = b.get(i + 1).copied();
        match b[i] {
            b'/' if next == Some(b'/') => {
                let end = text[i..].find('\n').map_or(b.len(), |n| i + n);
                blank(&mut out, i, end);
                i = end;
            }
            b'/' if next == Some(b'*') => {
                // Block comments nest.
                let (mut depth, mut j) = (1, i + 2);
                while j < b.len() && depth > 0 {
                    if b[j..].starts_with(b"/*") {
                        depth += 1;
                        j += 2;
                    } else if b[j..].starts_with(b"*/") {
                        depth -= 1;
                        j += 2;
                    } else {
                        j += 1;
                    }
                }
                blank(&mut out, i, j);
                i = j;
            }
            b'"' => {
                let mut j = i + 1;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                blank(&mut out, i, j + 1);
                i = j + 1;
            }
            // A raw string: `r"…"`, `r#"…"#`, `br"…"`, `cr#"…"#`.
            b'r' | b'b' | b'c' if i == 0 || !ident_byte(i - 1) => {
                let mut j = i;
                if b[j] != b'r' {
                    j += 1;
                }
                if b.get(j) != Some(&b'r') {
                    i += 1;
                    continue;
                }
                j += 1;
                let hashes = b[j..].iter().take_while(|&&c| c == b'#').count();
                j += hashes;
                if b.get(j) != Some(&b'"') {
                    i += 1;
                    continue;
                }
                let close = format!("\"{}", "#".repeat(hashes));
                let end = text[j + 1..]
                    .find(&close)
                    .map_or(b.len(), |n| j + 1 + n + close.len());
                blank(&mut out, i, end);
                i = end;
            }
            b'\'' => {
                // A character literal (`'x'`, `'\n'`, `'\u{7f}'`, `'{'`), or else a
                // lifetime or label, which is left as it is.
                if next == Some(b'\\') {
                    let end = text
                        .get(i + 3..)
                        .and_then(|s| s.find('\''))
                        .map_or(b.len(), |n| i + 3 + n + 1);
                    blank(&mut out, i, end);
                    i = end;
                } else if let Some(c) = text[i + 1..].chars().next()
                    && b.get(i + 1 + c.len_utf8()) == Some(&b'\'')
                {
                    let end = i + 2 + c.len_utf8();
                    blank(&mut out, i, end);
                    i = end;
                } else {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    String::from_utf8(out).expect("only ASCII bytes were written")
}

/// A token of blanked source: an identifier (or number), `::`, or one other character,
/// with its byte offset.
#[derive(Clone, Copy, Debug)]
struct Token<'a> {
    text: &'a str,
    at: usize,
}

fn tokens(code: &str) -> Vec<Token<'_>> {
    let b = code.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80;
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let len = if b[i].is_ascii_whitespace() {
            i += 1;
            continue;
        } else if word(b[i]) {
            b[i..].iter().take_while(|&&c| word(c)).count()
        } else if b[i..].starts_with(b"::") {
            2
        } else {
            1
        };
        out.push(Token {
            text: &code[i..i + len],
            at: i,
        });
        i += len;
    }
    out
}

fn is_ident(t: &str) -> bool {
    t.bytes()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_' || c >= 0x80)
}

/// Whether a `cfg` predicate (the tokens inside `cfg(…)`) holds only when compiling
/// tests: `test`, an `all(…)` with such a term, or an `any(…)` whose terms all are.
/// `not(…)` and everything else are taken as holding outside tests too.
fn cfg_only_in_tests(pred: &[&str]) -> bool {
    /// Reads one predicate at `toks[i]`: (only in tests, index after it).
    fn one(toks: &[&str], i: usize) -> (bool, usize) {
        let Some(&name) = toks.get(i) else {
            return (false, i);
        };
        if toks.get(i + 1) == Some(&"(") {
            let mut terms = Vec::new();
            let mut j = i + 2;
            while j < toks.len() && toks[j] != ")" {
                let (t, next) = one(toks, j);
                terms.push(t);
                j = next;
                if toks.get(j) == Some(&",") {
                    j += 1;
                }
            }
            let only = match name {
                "all" => terms.iter().any(|&t| t),
                "any" => !terms.is_empty() && terms.iter().all(|&t| t),
                _ => false,
            };
            return (only, j + 1);
        }
        // `test`, `unix`, or `feature = "…"` (the literal is blank by now).
        let mut j = i + 1;
        if toks.get(j) == Some(&"=") {
            while j < toks.len() && toks[j] != "," && toks[j] != ")" {
                j += 1;
            }
        }
        (name == "test", j)
    }
    one(pred, 0).0
}

/// The index of the bracket closing the one at `toks[open]` (or the end).
fn matching(toks: &[Token], open: usize) -> usize {
    let mut depth = 0usize;
    for (i, t) in toks.iter().enumerate().skip(open) {
        match t.text {
            "(" | "[" | "{" => depth += 1,
            ")" | "]" | "}" => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    toks.len()
}

/// If `toks[i..]` is an attribute `#[cfg(…)]` (or, with `inner`, `#![cfg(…)]`), whether
/// it holds only in tests, and the index after it.
fn cfg_attribute(toks: &[Token], i: usize, inner: bool) -> Option<(bool, usize)> {
    let text = |k: usize| toks.get(k).map(|t| t.text);
    let open = if inner { i + 2 } else { i + 1 };
    if text(i) != Some("#") || (inner && text(i + 1) != Some("!")) || text(open) != Some("[") {
        return None;
    }
    let close = matching(toks, open);
    if close >= toks.len() {
        return None;
    }
    if text(open + 1) != Some("cfg") || text(open + 2) != Some("(") {
        return Some((false, close + 1));
    }
    let pred: Vec<&str> = toks[open + 3..close.saturating_sub(1)]
        .iter()
        .map(|t| t.text)
        .collect();
    Some((cfg_only_in_tests(&pred), close + 1))
}

/// The index after the item (or statement, field, match arm) that starts at
/// `toks[start]`, just after its attributes were read: at a `;` outside brackets, or at
/// a `}` closing its body (with a `;` right after it, and not before `else` or `.`).
/// Inside brackets (`nested`), a `,` ends it too, as it ends a field or an arm. A
/// closing bracket of the enclosing code ends it in any case.
fn item_end(toks: &[Token], start: usize, nested: bool) -> usize {
    let mut depth = 0usize;
    let mut i = start;
    while i < toks.len() {
        match toks[i].text {
            "(" | "[" | "{" => depth += 1,
            ")" | "]" | "}" if depth == 0 => return i,
            ")" | "]" => depth -= 1,
            "}" => {
                depth -= 1;
                if depth == 0 {
                    match toks.get(i + 1).map(|t| t.text) {
                        Some(";") => return i + 2,
                        Some("else" | ".") => {}
                        _ => return i + 1,
                    }
                }
            }
            ";" if depth == 0 => return i + 1,
            "," if depth == 0 && nested => return i + 1,
            _ => {}
        }
        i += 1;
    }
    toks.len()
}

/// Reads the path (or `use` tree) whose first segment is `toks[i]`, below module path
/// `prefix`, into `out` as module paths, one per leaf of the tree; returns the index
/// after it. `self` names the prefix itself and each `super` goes one module up.
fn use_tree(toks: &[Token], mut i: usize, prefix: &[String], out: &mut Vec<Vec<String>>) -> usize {
    let mut path = prefix.to_vec();
    loop {
        match toks.get(i).map(|t| t.text) {
            Some("{") => {
                i += 1;
                while i < toks.len() && toks[i].text != "}" {
                    i = use_tree(toks, i, &path, out);
                    // Past `as name` to the `,` or `}`.
                    while i < toks.len() && toks[i].text != "," && toks[i].text != "}" {
                        i += 1;
                    }
                    if toks.get(i).is_some_and(|t| t.text == ",") {
                        i += 1;
                    }
                }
                return i + 1;
            }
            Some("*") => {
                out.push(path);
                return i + 1;
            }
            Some(seg) if is_ident(seg) => {
                match seg {
                    "self" => {}
                    "super" => {
                        path.pop();
                    }
                    _ => path.push(seg.to_string()),
                }
                i += 1;
                if toks.get(i).is_some_and(|t| t.text == "::") {
                    i += 1;
                } else {
                    out.push(path);
                    return i;
                }
            }
            // `crate::f::<T>` or a stray `::`: the path so far.
            _ => {
                out.push(path);
                return i;
            }
        }
    }
}

/// What one file says about the module graph.
#[derive(Debug, Default)]
struct FileFacts {
    /// Every path it names, as a full module path from the crate root, with its line.
    imports: Vec<(usize, Vec<String>)>,
    /// Modules it declares under a test-only `cfg` (full module paths).
    test_modules: Vec<Vec<String>>,
    /// Whether the file itself is compiled only in tests (`#![cfg(test)]`).
    test_only: bool,
}

/// Reads the imports of the file whose module path is `module` (`[]` for the crate
/// root) from its source `text`, skipping test-only items.
fn read_file(module: &[String], text: &str) -> FileFacts {
    let code = blank_comments_and_literals(text);
    let toks = tokens(&code);
    let line = |at: usize| code[..at].matches('\n').count() + 1;
    let text_at = |k: usize| toks.get(k).map(|t| t.text);
    let mut facts = FileFacts::default();
    // One entry per open brace: the name of the inline module it opens, if any.
    let mut braces: Vec<Option<String>> = Vec::new();
    let here = |braces: &[Option<String>]| -> Vec<String> {
        let mut m = module.to_vec();
        m.extend(braces.iter().flatten().cloned());
        m
    };
    let mut i = 0;
    while i < toks.len() {
        if braces.is_empty()
            && let Some((only_tests, _)) = cfg_attribute(&toks, i, true)
            && only_tests
        {
            facts.test_only = true;
            return facts;
        }
        if let Some((only_tests, after)) = cfg_attribute(&toks, i, false) {
            if !only_tests {
                i = after;
                continue;
            }
            let end = item_end(&toks, after, !braces.is_empty());
            // `#[cfg(test)] mod name;` (behind any more attributes and a visibility):
            // that module's file is test code.
            let words: Vec<&str> = toks[after..end].iter().map(|t| t.text).collect();
            if let [.., "mod", name, ";"] = words[..]
                && is_ident(name)
            {
                let mut m = here(&braces);
                m.push(name.to_string());
                facts.test_modules.push(m);
            }
            i = end;
            continue;
        }
        match toks[i].text {
            "{" => {
                let name = match (
                    i.checked_sub(2).and_then(text_at),
                    i.checked_sub(1).and_then(text_at),
                ) {
                    (Some("mod"), Some(name)) => Some(name.to_string()),
                    _ => None,
                };
                braces.push(name);
            }
            "}" => {
                braces.pop();
            }
            root @ ("crate" | "super" | "self")
                if text_at(i + 1) == Some("::")
                    && i.checked_sub(1).and_then(text_at) != Some("::")
                    // `pub(in crate::a)` is a visibility, not an import.
                    && !(i >= 3 && toks[i - 3].text == "pub" && toks[i - 1].text == "in") =>
            {
                let mut start = if root == "crate" {
                    vec![]
                } else {
                    here(&braces)
                };
                if root == "super" {
                    start.pop();
                }
                let mut paths = Vec::new();
                let next = use_tree(&toks, i + 2, &start, &mut paths);
                let l = line(toks[i].at);
                facts.imports.extend(paths.into_iter().map(|p| (l, p)));
                i = next;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    facts
}

// ----------------------------------------------------------------------------------
// The file graph
// ----------------------------------------------------------------------------------

/// The module path of a file: `model/fused/norm.rs` → `[model, fused, norm]`,
/// `hf/mod.rs` → `[hf]`, `lib.rs` → `[]`.
fn module_of(file: &str) -> Vec<String> {
    let mut parts: Vec<String> = file
        .trim_end_matches(".rs")
        .split('/')
        .map(str::to_string)
        .collect();
    if (parts.len() == 1 && parts[0] == "lib") || parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The file defining the longest prefix of module path `path` that has a file
/// (`lib.rs` for the crate root).
fn file_of(files: &Files, path: &[String]) -> Option<String> {
    (0..=path.len()).rev().find_map(|n| {
        let base = path[..n].join("/");
        let candidates = if n == 0 {
            vec!["lib.rs".to_string()]
        } else {
            vec![format!("{base}.rs"), format!("{base}/mod.rs")]
        };
        candidates.into_iter().find(|f| files.contains_key(f))
    })
}

/// The import graph of the library's files, test code and `main.rs` left out.
fn file_graph(files: &Files) -> Graph {
    let facts: BTreeMap<&String, FileFacts> = files
        .iter()
        .filter(|(f, _)| *f != "main.rs")
        .map(|(f, text)| (f, read_file(&module_of(f), text)))
        .collect();
    let test_modules: BTreeSet<&Vec<String>> =
        facts.values().flat_map(|x| &x.test_modules).collect();
    let is_test = |f: &str| {
        let m = module_of(f);
        facts.get(&f.to_string()).is_some_and(|x| x.test_only)
            || (1..=m.len()).any(|n| test_modules.contains(&m[..n].to_vec()))
    };
    let mut graph = Graph::new();
    for (f, x) in &facts {
        if is_test(f) {
            continue;
        }
        let deps = graph.entry(f.to_string()).or_default();
        for (line, path) in &x.imports {
            if let Some(to) = file_of(files, path)
                && to != **f
                && !is_test(&to)
            {
                deps.entry(to).or_insert_with(|| Site {
                    line: *line,
                    path: format!("crate::{}", path.join("::")),
                });
            }
        }
    }
    graph
}

/// The strongly connected components of `graph` with more than one node, each sorted,
/// by Tarjan's algorithm. Every cycle lies within one of them.
fn tangles<V>(graph: &BTreeMap<String, BTreeMap<String, V>>) -> Vec<Vec<String>> {
    struct Tarjan<'g, V> {
        graph: &'g BTreeMap<String, BTreeMap<String, V>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        out: Vec<Vec<String>>,
    }
    impl<'g, V> Tarjan<'g, V> {
        fn visit(&mut self, v: &'g str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flat_map(|d| d.keys()) {
                if !self.index.contains_key(w.as_str()) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w.as_str()]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w.as_str()) {
                    let low = self.low[v].min(self.index[w.as_str()]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.out.push(component);
                }
            }
        }
    }
    let mut t = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.out.sort();
    t.out
}

/// A shortest cycle through `start` within `component`: `[start, …, start]`.
fn shortest_cycle<V>(
    graph: &BTreeMap<String, BTreeMap<String, V>>,
    component: &[String],
    start: &str,
) -> Vec<String> {
    let inside = |v: &str| component.iter().any(|c| c == v);
    let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for w in graph.get(v).into_iter().flat_map(|d| d.keys()) {
            if w == start {
                let mut path = vec![start.to_string()];
                let mut at = v;
                while at != start {
                    path.push(at.to_string());
                    at = came_from[at];
                }
                path.push(start.to_string());
                path.reverse();
                return path;
            }
            if inside(w) && !came_from.contains_key(w.as_str()) {
                came_from.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    unreachable!("{start} is in a strongly connected component, so on a cycle")
}

/// Cycles that between them pass through every file of every tangle: for each tangle,
/// a shortest cycle through its first file not yet on one, until none is left.
fn cycles<V>(graph: &BTreeMap<String, BTreeMap<String, V>>) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for component in tangles(graph) {
        let mut covered = BTreeSet::new();
        for v in &component {
            if !covered.contains(v) {
                let cycle = shortest_cycle(graph, &component, v);
                covered.extend(cycle.iter().cloned());
                out.push(cycle);
            }
        }
    }
    out
}

/// A cycle written out for a person: the path, then the import making each step.
fn describe(graph: &Graph, cycle: &[String]) -> String {
    let mut s = cycle.join(" → ");
    for step in cycle.windows(2) {
        let site = &graph[&step[0]][&step[1]];
        s += &format!(
            "\n    {}:{} names {} ({})",
            step[0], site.line, site.path, step[1]
        );
    }
    s
}

// ----------------------------------------------------------------------------------
// The real tree
// ----------------------------------------------------------------------------------

fn src_files() -> Files {
    fn walk(root: &Path, dir: &Path, out: &mut Files) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy();
                let rel = rel.replace(std::path::MAIN_SEPARATOR, "/");
                out.insert(rel, std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Files::new();
    walk(&root, &root, &mut out);
    out
}

#[test]
fn no_import_cycle_between_files() {
    let graph = file_graph(&src_files());
    let found: Vec<String> = cycles(&graph).iter().map(|c| describe(&graph, c)).collect();
    assert!(
        found.is_empty(),
        "import cycles between files in src/:\n  {}",
        found.join("\n  ")
    );
}

/// The top-level module of a file (`model` for `model/fused/norm.rs`).
fn top(f: &str) -> String {
    module_of(f)
        .first()
        .cloned()
        .unwrap_or_else(|| "lib".into())
}

#[test]
fn top_level_modules_import_one_way() {
    let files = file_graph(&src_files());
    let mut graph: BTreeMap<String, BTreeMap<String, ()>> = BTreeMap::new();
    for (f, deps) in &files {
        let a = top(f);
        if a == "lib" {
            continue;
        }
        let entry = graph.entry(a.clone()).or_default();
        for d in deps.keys() {
            let b = top(d);
            if b != a && b != "lib" {
                entry.insert(b, ());
            }
        }
    }
    let loops: Vec<String> = cycles(&graph).iter().map(|c| c.join(" → ")).collect();
    assert!(
        loops.is_empty(),
        "import loops between top-level modules:\n  {}",
        loops.join("\n  ")
    );
    // The loop this test was written for must stay broken.
    assert!(
        !graph["model"].contains_key("hf"),
        "model imports hf: {:?}",
        graph["model"].keys()
    );
}

/// The reader finds imports in the real tree at all (a test that could not fail is no
/// test), and leaves test files out.
#[test]
fn the_import_reader_sees_known_imports() {
    let g = file_graph(&src_files());
    let trainer = &g["train/trainer.rs"];
    assert!(trainer.contains_key("train/checkpoint.rs"), "{trainer:?}");
    assert!(trainer.contains_key("strategy/mod.rs"), "{trainer:?}");
    assert!(g["hf/mod.rs"].contains_key("model/weights.rs"));
    // `#[cfg(test)] mod tests;` files are test code.
    assert!(!g.contains_key("model/fused/flash/tests.rs"));
    assert!(!g.contains_key("main.rs"));
    assert!(g.len() > 100, "{} files", g.len());
}

// ----------------------------------------------------------------------------------
// The reader and the cycle finder on planted trees
// ----------------------------------------------------------------------------------

fn tree(files: &[(&str, &str)]) -> Files {
    files
        .iter()
        .map(|(f, t)| (f.to_string(), t.to_string()))
        .collect()
}

/// The files `file` imports in `files`.
fn deps_of(files: &Files, file: &str) -> Vec<String> {
    file_graph(files)[file].keys().cloned().collect()
}

#[test]
fn a_three_file_cycle_is_found_and_named() {
    let files = tree(&[
        ("lib.rs", "pub mod a;\npub mod b;\npub mod c;\npub mod d;"),
        ("a.rs", "use crate::b::f;\npub fn g() { f() }"),
        ("b.rs", "pub fn f() {\n    crate::c::h();\n}"),
        ("c.rs", "pub use crate::a::g as h;"),
        // Off the cycle: imports it, but nothing on it imports d.
        ("d.rs", "use crate::a::g;"),
    ]);
    let graph = file_graph(&files);
    let found = cycles(&graph);
    assert_eq!(found, [["a.rs", "b.rs", "c.rs", "a.rs"]]);
    assert_eq!(
        describe(&graph, &found[0]),
        "a.rs → b.rs → c.rs → a.rs\
         \n    a.rs:1 names crate::b::f (b.rs)\
         \n    b.rs:2 names crate::c::h (c.rs)\
         \n    c.rs:1 names crate::a::g (a.rs)"
    );
    // No pair of these files imports each other: the old check saw nothing.
    for (a, deps) in &graph {
        for b in deps.keys() {
            assert!(!graph[b].contains_key(a), "{a} <-> {b}");
        }
    }
}

#[test]
fn a_use_super_brace_cycle_is_found() {
    let files = tree(&[
        ("lib.rs", "pub mod m;"),
        ("m/mod.rs", "mod x;\nmod y;"),
        ("m/x.rs", "use super::{y::Y, Z};\npub struct X;"),
        ("m/y.rs", "use super::{\n    x::{self},\n};\npub struct Y;"),
    ]);
    let graph = file_graph(&files);
    assert_eq!(cycles(&graph), [["m/x.rs", "m/y.rs", "m/x.rs"]]);
    // `super::Z` in m/x.rs is m/mod.rs.
    assert_eq!(deps_of(&files, "m/x.rs"), ["m/mod.rs", "m/y.rs"]);
}

#[test]
fn brace_lists_are_followed_to_every_leaf() {
    let files = tree(&[
        ("lib.rs", ""),
        (
            "a.rs",
            "use crate::{\n    model::{Gpt, fused::{norm, rope::apply as rope}},\n    train::*,\n};",
        ),
        ("model/mod.rs", ""),
        ("model/fused/mod.rs", ""),
        ("model/fused/norm.rs", ""),
        ("model/fused/rope.rs", ""),
        ("train/mod.rs", ""),
        ("train/step.rs", ""),
        ("train/deep/mod.rs", ""),
        (
            "train/deep/far.rs",
            "use super::super::{self as train, step};",
        ),
        (
            "train/deep/near.rs",
            "use super::{self::far, super::step::run};",
        ),
        ("unused.rs", ""),
    ]);
    assert_eq!(
        deps_of(&files, "a.rs"),
        [
            "model/fused/norm.rs",
            "model/fused/rope.rs",
            "model/mod.rs",
            "train/mod.rs"
        ]
    );
    assert_eq!(
        deps_of(&files, "train/deep/far.rs"),
        ["train/mod.rs", "train/step.rs"]
    );
    assert_eq!(
        deps_of(&files, "train/deep/near.rs"),
        ["train/deep/far.rs", "train/step.rs"]
    );
}

#[test]
fn only_the_test_item_is_skipped_not_what_follows_it() {
    let files = tree(&[
        ("lib.rs", ""),
        (
            "a.rs",
            r#"
pub fn f() {}

#[cfg(test)]
mod tests {
    use crate::t::helper;
    fn check() { let _ = '{'; let _ = "}"; }
}

#[cfg(all(test, unix))]
#[allow(unused)]
use crate::u::X;

#[cfg(any(test, feature = "cuda"))]
use crate::v::Y;

#[cfg(test)]
const SHAPE: [usize; 2] = [crate::w::N, 1];

pub fn g() {
    crate::b::h();
}
"#,
        ),
        ("b.rs", ""),
        ("t.rs", ""),
        ("u.rs", ""),
        ("v.rs", ""),
        ("w.rs", ""),
    ]);
    assert_eq!(deps_of(&files, "a.rs"), ["b.rs", "v.rs"]);
}

#[test]
fn test_module_files_are_left_out() {
    let files = tree(&[
        ("lib.rs", "pub mod a;"),
        ("a.rs", "#[cfg(test)]\nmod tests;\npub fn f() {}"),
        ("a/tests.rs", "use crate::b::x;\nmod more;"),
        ("a/tests/more.rs", "use crate::b::y;"),
        ("b.rs", "pub fn x() { crate::a::f() }\n"),
        ("c.rs", "#![cfg(test)]\nuse crate::b::x;"),
    ]);
    let graph = file_graph(&files);
    assert_eq!(graph.keys().collect::<Vec<_>>(), ["a.rs", "b.rs", "lib.rs"]);
    assert!(cycles(&graph).is_empty());
}

#[test]
fn comments_strings_and_visibilities_are_not_imports() {
    let files = tree(&[
        ("lib.rs", ""),
        (
            "a.rs",
            r##"
//! See `crate::b::x`.
/* crate::c::y /* nested crate::c::z */ crate::c::w */
/// Calls [`crate::c::v`].
pub(in crate::d) fn f<'a>(s: &'a str) -> &'a str {
    let _ = "crate::c::u";
    let _ = r#"crate::c::"t"#;
    let _ = b'"';
    let _ = '\'';
    let _ = super::e::g();
    s
}
"##,
        ),
        ("b.rs", ""),
        ("c.rs", ""),
        ("d.rs", ""),
        ("e.rs", ""),
    ]);
    // `super::` from a top-level file is the crate root.
    assert_eq!(deps_of(&files, "a.rs"), ["e.rs"]);
}

#[test]
fn inline_modules_move_super_and_self() {
    let files = tree(&[
        ("lib.rs", ""),
        (
            "m/mod.rs",
            "mod inner {\n    use super::x::A;\n    use self::deep::B;\n    mod deep {}\n}\nuse super::n::C;",
        ),
        ("m/x.rs", ""),
        ("m/inner/deep.rs", ""),
        ("n.rs", ""),
    ]);
    assert_eq!(
        deps_of(&files, "m/mod.rs"),
        ["m/inner/deep.rs", "m/x.rs", "n.rs"]
    );
}

#[test]
fn the_cycle_finder_reports_every_tangle_and_no_false_ones() {
    let g = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeMap<String, ()>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string())
                .or_default()
                .insert(b.to_string(), ());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    // A diamond with no cycle.
    assert!(cycles(&g(&[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")])).is_empty());
    // Two tangles: one of two cycles sharing a file, one of three files.
    let found = cycles(&g(&[
        ("a", "b"),
        ("b", "a"),
        ("b", "c"),
        ("c", "b"),
        ("x", "y"),
        ("y", "z"),
        ("z", "x"),
        ("z", "a"),
    ]));
    assert_eq!(
        found,
        [
            vec!["a", "b", "a"],
            vec!["c", "b", "c"],
            vec!["x", "y", "z", "x"]
        ]
    );
}

#[test]
fn cfg_predicates_that_hold_only_in_tests() {
    let only = |s: &str| {
        let code = blank_comments_and_literals(s);
        let toks: Vec<&str> = tokens(&code).iter().map(|t| t.text).collect();
        cfg_only_in_tests(&toks)
    };
    assert!(only("test"));
    assert!(only("all(test, target_os = \"linux\")"));
    assert!(only("all(unix, any(test, all(test, windows)))"));
    assert!(!only("any(feature = \"cuda\", test)"));
    assert!(!only("not(test)"));
    assert!(!only("feature = \"test\""));
}
