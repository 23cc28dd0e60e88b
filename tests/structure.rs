//! The shape of the code, as a reviewer would check it: no two files of `src/` import each other
//! (directly or round a circle), and no function is longer than a screen (80 lines).
//! Reads the source only; needs no cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Longest function body allowed in `src/`, in lines.
const MAX_FN_LINES: usize = 80;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `src/a/b.rs` and `src/a/b/mod.rs` -> `a::b`; `src/lib.rs` -> ``.
fn module_of(src: &Path, p: &Path) -> String {
    let rel = p.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts.join("::")
}

/// Unit tests (`#[cfg(test)]` files and modules) may import anything: only production code counts.
fn production(text: &str) -> &str {
    text.find("#[cfg(test)]\nmod tests").map(|i| &text[..i]).unwrap_or(text)
}

/// The modules of this crate a file names, as `crate::x::y` paths, resolved to the longest known module.
fn imports(text: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        let path: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
        let mut segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
        while !segs.is_empty() {
            let m = segs.join("::");
            if known.contains(&m) {
                out.insert(m);
                break;
            }
            segs.pop();
        }
        // `use crate::{a, b::c}`
        if path.is_empty() && rest.starts_with('{') {
            let group: String = rest.chars().skip(1).take_while(|c| *c != '}').collect();
            for item in group.split(',') {
                let first = item.trim().split("::").next().unwrap_or_default().to_owned();
                if known.contains(&first) {
                    out.insert(first);
                }
            }
        }
    }
    out
}

fn cycle_from(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_owned(), vec![start.to_owned()])];
    let mut seen = BTreeSet::new();
    while let Some((node, path)) = stack.pop() {
        for next in graph.get(&node).into_iter().flatten() {
            if next == start {
                let mut c = path.clone();
                c.push(start.to_owned());
                return Some(c);
            }
            if seen.insert(next.clone()) {
                let mut p = path.clone();
                p.push(next.clone());
                stack.push((next.clone(), p));
            }
        }
    }
    None
}

fn all_files() -> (PathBuf, Vec<PathBuf>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    (src, files)
}

#[test]
fn no_file_of_src_imports_a_file_that_imports_it_back() {
    let (src, files) = all_files();
    let known: BTreeSet<String> = files.iter().map(|p| module_of(&src, p)).filter(|m| !m.is_empty()).collect();
    assert!(known.contains("plan") && known.contains("act"), "modules found: {known:?}");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in &files {
        let m = module_of(&src, p);
        let text = std::fs::read_to_string(p).unwrap();
        // A child module (`plan::tests`, `secrets::env`) may use its parent: that is one module.
        let deps = imports(production(&text), &known)
            .into_iter()
            .filter(|d| *d != m && !m.starts_with(&format!("{d}::")) && !d.starts_with(&format!("{m}::")))
            .collect();
        graph.insert(m, deps);
    }
    let cycles: Vec<String> = graph
        .keys()
        .filter_map(|m| cycle_from(&graph, m))
        .map(|c| c.join(" -> "))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(cycles.is_empty(), "import circles in src/:\n{}", cycles.join("\n"));
}

/// Lines of each `fn` body, found by brace depth (strings and comments holding braces are rare
/// enough in this code base that the count stays honest; a miscount errs towards longer).
fn function_lengths(text: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i].trim_start();
        let is_fn = ["fn ", "pub fn ", "async fn ", "pub async fn ", "pub(crate) fn ", "pub(crate) async fn "]
            .iter()
            .any(|p| l.starts_with(p));
        if !is_fn {
            i += 1;
            continue;
        }
        let name: String = l
            .split("fn ")
            .nth(1)
            .unwrap_or_default()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let (mut depth, mut opened, start) = (0i32, false, i);
        let mut j = i;
        while j < lines.len() {
            for c in lines[j].chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    ';' if !opened && depth == 0 => break,
                    _ => {}
                }
            }
            if (opened && depth <= 0) || (!opened && lines[j].trim_end().ends_with(';')) {
                break;
            }
            j += 1;
        }
        out.push((name, start + 1, j + 1 - start));
        i = start + 1;
    }
    out
}

#[test]
fn no_function_in_src_is_longer_than_a_screen() {
    let (src, files) = all_files();
    let mut long = Vec::new();
    for p in &files {
        let text = std::fs::read_to_string(p).unwrap();
        for (name, line, len) in function_lengths(production(&text)) {
            if len > MAX_FN_LINES {
                long.push(format!("{}:{line} {name}: {len} lines", p.strip_prefix(&src).unwrap().display()));
            }
        }
    }
    assert!(long.is_empty(), "functions over {MAX_FN_LINES} lines:\n{}", long.join("\n"));
}

#[test]
fn the_checks_themselves_find_what_they_look_for() {
    let known: BTreeSet<String> = ["a".to_owned(), "b".to_owned(), "b::c".to_owned()].into();
    assert_eq!(
        imports("use crate::b::c::X;\nuse crate::{a, b::c};", &known),
        ["a", "b", "b::c"].map(String::from).into()
    );
    let graph: BTreeMap<String, BTreeSet<String>> =
        [("a".to_owned(), ["b".to_owned()].into()), ("b".to_owned(), ["a".to_owned()].into())].into();
    assert!(cycle_from(&graph, "a").is_some());
    let body = format!("fn f() {{\n{}}}\nfn g() {{ }}\n", "    x;\n".repeat(5));
    assert_eq!(function_lengths(&body), vec![("f".to_owned(), 1, 7), ("g".to_owned(), 8, 1)]);
}

fn every_file(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            every_file(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        if p.is_dir() && !name.starts_with('.') && name != "target" && name != "node_modules" {
            markdown_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "md") {
            out.push(p);
        }
    }
}

/// Every relative link of the repository's Markdown, and every `docs/...` or `deploy/...` path that
/// src/, examples/ or deploy/ names, points at a file the repository contains.
#[test]
fn no_document_or_comment_points_at_a_file_the_repository_does_not_contain() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut docs = Vec::new();
    markdown_files(root, &mut docs);
    assert!(docs.iter().any(|p| p.ends_with("docs/design.md")), "docs/design.md is the design reference");
    let mut dead = Vec::new();
    for p in &docs {
        let text = std::fs::read_to_string(p).unwrap();
        for (i, _) in text.match_indices("](") {
            let target: String = text[i + 2..].chars().take_while(|c| *c != ')' && *c != '#' && *c != ' ').collect();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            if !p.parent().unwrap().join(&target).exists() {
                dead.push(format!("{}: {target}", p.strip_prefix(root).unwrap().display()));
            }
        }
    }
    let (_, mut files) = all_files();
    for dir in ["examples", "deploy"] {
        let mut more = Vec::new();
        every_file(&root.join(dir), &mut more);
        files.extend(more);
    }
    for p in files {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        for prefix in ["docs/", "deploy/"] {
            for (i, _) in text.match_indices(prefix) {
                let path: String =
                    text[i..].chars().take_while(|c| c.is_alphanumeric() || "/._-".contains(*c)).collect();
                let path = path.trim_end_matches(['.', '/']);
                if path.contains('.') && !root.join(path).exists() {
                    dead.push(format!("{}: {path}", p.strip_prefix(root).unwrap().display()));
                }
            }
        }
    }
    assert!(dead.is_empty(), "references to files that do not exist:\n{}", dead.join("\n"));
}
