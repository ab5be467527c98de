//! The module layout stays what ARCHITECTURE.md says: dependencies point down, no import cycles.
//!
//! ARCHITECTURE.md has a table with one row per top-level module of the library and the modules
//! it may use. This reads the library's source as text (no build of tine is involved) and fails
//! on every `crate::MODULE` that a file names in code (comments are not read) and that its row
//! does not allow; on a row that allows a loop (so the note itself cannot draw a cycle); and on a
//! module without a row, or a row without a module, so the note and the code cannot drift apart.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

const NOTE: &str = "ARCHITECTURE.md";

/// The rows of the note's module table: module → the modules it may use. A row is
/// `` | `name` | what it is | `a`, `b` | `` (the last cell without a name: it uses none).
fn allowed() -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(root().join(NOTE)).expect("ARCHITECTURE.md");
    let mut rows = BTreeMap::new();
    let mut in_section = false;
    for line in text.lines() {
        if line.starts_with("## ") {
            in_section = line.trim() == "## Modules";
            continue;
        }
        if !in_section || !line.starts_with("| `") {
            continue;
        }
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').collect();
        let name = backticked(cells[0]);
        assert_eq!(
            name.len(),
            1,
            "{NOTE}: a module row names one module first: {line}"
        );
        let uses = backticked(cells.last().unwrap());
        let module = name[0].trim_end_matches('/').to_string();
        let uses = uses
            .into_iter()
            .map(|u| u.trim_end_matches('/').to_string());
        assert!(
            rows.insert(module.clone(), uses.collect()).is_none(),
            "{NOTE}: two rows for `{module}`"
        );
    }
    assert!(!rows.is_empty(), "{NOTE} has no table under `## Modules`");
    rows
}

/// The `backticked` words of a table cell.
fn backticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read a source directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The modules of the `tine` binary (declared in main.rs): they stand on the library's public API,
/// above every module of it, and are not part of this table.
fn binary_modules() -> BTreeSet<String> {
    let main = std::fs::read_to_string(root().join("src/main.rs")).expect("src/main.rs");
    main.lines()
        .filter_map(|l| l.trim().strip_prefix("mod ")?.strip_suffix(';'))
        .map(str::to_string)
        .collect()
}

/// The library's files by top-level module (`src/NAME.rs` or `src/NAME/…`).
fn library_files() -> BTreeMap<String, Vec<PathBuf>> {
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let binary = binary_modules();
    let mut by_module: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.strip_suffix(".rs").unwrap_or(&first).to_string();
        if module == "lib" || module == "main" || binary.contains(&module) {
            continue;
        }
        by_module.entry(module).or_default().push(file);
    }
    by_module
}

/// `text` with every `//` comment blanked (doc comments too; a `//` inside a string stays), so
/// that a module named in prose is not taken for an import. Line breaks are kept.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_string = false;
        let mut escaped = false;
        let mut cut = line.len();
        let bytes = line.as_bytes();
        for i in 0..bytes.len() {
            let b = bytes[i];
            if in_string {
                match (escaped, b) {
                    (true, _) => escaped = false,
                    (false, b'\\') => escaped = true,
                    (false, b'"') => in_string = false,
                    _ => {}
                }
            } else if b == b'"' {
                in_string = true;
            } else if b == b'/' && bytes.get(i + 1) == Some(&b'/') {
                cut = i;
                break;
            }
        }
        out.push_str(&line[..cut]);
        out.push('\n');
    }
    out
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The top-level modules `code` names as `crate::NAME` or `crate::{NAME…, …}`, with line numbers.
fn crate_paths(code: &str) -> Vec<(usize, String)> {
    let bytes = code.as_bytes();
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = code[from..].find("crate::").map(|i| from + i) {
        from = at + "crate::".len();
        if at > 0 && (is_ident(bytes[at - 1]) || bytes[at - 1] == b':') {
            continue; // `foo_crate::`, `$crate::`-like or `x::crate::`: not this crate's root
        }
        let line = code[..at].matches('\n').count() + 1;
        if bytes.get(from) == Some(&b'{') {
            // A group: the first name of each item at depth 1.
            let mut depth = 0;
            let mut expect_name = true;
            let mut i = from;
            while i < bytes.len() {
                match bytes[i] {
                    b'{' => {
                        depth += 1;
                        if depth == 1 {
                            expect_name = true;
                        }
                    }
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    b',' if depth == 1 => expect_name = true,
                    b if depth == 1 && expect_name && is_ident(b) => {
                        let end = (i..bytes.len()).find(|&j| !is_ident(bytes[j])).unwrap();
                        found.push((line, code[i..end].to_string()));
                        expect_name = false;
                        i = end;
                        continue;
                    }
                    _ => {}
                }
                i += 1;
            }
        } else {
            let end = (from..bytes.len())
                .find(|&j| !is_ident(bytes[j]))
                .unwrap_or(bytes.len());
            found.push((line, code[from..end].to_string()));
        }
    }
    found
}

#[test]
fn every_module_uses_only_what_the_architecture_note_allows() {
    let allowed = allowed();
    let files = library_files();
    let mut wrong = Vec::new();
    for (module, paths) in &files {
        let Some(may_use) = allowed.get(module) else {
            continue; // reported by the test below
        };
        for path in paths {
            let text = std::fs::read_to_string(path).expect("read a source file");
            for (line, used) in crate_paths(&code_only(&text)) {
                if used == *module || used == "self" || may_use.contains(&used) {
                    continue;
                }
                // Names re-exported at the crate root (`crate::App`) are not modules.
                if !files.contains_key(&used) {
                    continue;
                }
                wrong.push(format!(
                    "{}:{line}: `{module}` uses `{used}`; {NOTE} lets it use only {:?}",
                    path.strip_prefix(root()).unwrap().display(),
                    may_use
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that {NOTE} does not allow (move the code down, or change the note and say why):\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_architecture_note_has_a_row_for_each_module_and_no_other() {
    let allowed = allowed();
    let modules: BTreeSet<String> = library_files().into_keys().collect();
    let rows: BTreeSet<String> = allowed.keys().cloned().collect();
    let missing: Vec<_> = modules.difference(&rows).collect();
    let stale: Vec<_> = rows.difference(&modules).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "{NOTE}'s module table: modules of src/ without a row {missing:?}, rows without a module {stale:?}"
    );
    for (module, uses) in &allowed {
        let unknown: Vec<_> = uses.iter().filter(|u| !rows.contains(*u)).collect();
        assert!(
            unknown.is_empty(),
            "{NOTE}: `{module}` may use {unknown:?}, which have no row"
        );
    }
}

#[test]
fn the_architecture_note_allows_no_cycle() {
    let allowed = allowed();
    // Depth-first search; a module met again while on the path closes a loop.
    fn visit<'a>(
        module: &'a str,
        allowed: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|m| *m == module) {
            let mut cycle: Vec<String> = path[at..].iter().map(|m| m.to_string()).collect();
            cycle.push(module.to_string());
            return Some(cycle);
        }
        if !done.insert(module) {
            return None;
        }
        path.push(module);
        for next in allowed.get(module).into_iter().flatten() {
            if let Some(cycle) = visit(next, allowed, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for module in allowed.keys() {
        if let Some(cycle) = visit(module, &allowed, &mut Vec::new(), &mut done) {
            panic!("{NOTE} allows a cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn crate_paths_are_read_from_code_not_comments() {
    let code = code_only(
        "use crate::{a::X, b, c::{d, e}};\n\
         // crate::commented\n\
         let s = \"http://x\"; crate::f::g(); // crate::after\n\
         use crate::h::{\n    i,\n};\n\
         foo_crate::z;\n",
    );
    let names: Vec<(usize, String)> = crate_paths(&code);
    let expected: Vec<(usize, String)> = [(1, "a"), (1, "b"), (1, "c"), (3, "f"), (4, "h")]
        .into_iter()
        .map(|(l, n)| (l, n.to_string()))
        .collect();
    assert_eq!(names, expected);
}
