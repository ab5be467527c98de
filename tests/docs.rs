//! The Markdown documentation's code blocks stay honest: every Rust block of `README.md` and
//! `docs/*.md` is compiled by `cargo test` as a doctest (`src/doc_examples.rs` includes the
//! files), so this checks that no file is left out of that list and that every fence names its
//! language (rustdoc compiles a fence without one as Rust).

use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every Markdown file under docs/.
fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    for entry in std::fs::read_dir(root().join("docs")).expect("docs/") {
        let path = entry.expect("docs/ entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// The opening fences of a Markdown text: (line number, info string).
fn fences(text: &str) -> Vec<(usize, String)> {
    let mut open: Option<&str> = None;
    let mut found = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let Some(marker) = ["```", "~~~"].into_iter().find(|m| trimmed.starts_with(m)) else {
            continue;
        };
        match open {
            None => {
                open = Some(marker);
                found.push((i + 1, trimmed.trim_start_matches(marker).trim().to_string()));
            }
            Some(m) if m == marker && trimmed.trim_start_matches(marker).trim().is_empty() => {
                open = None
            }
            Some(_) => {}
        }
    }
    found
}

#[test]
fn every_markdown_file_is_compiled_as_doctests() {
    let list =
        std::fs::read_to_string(root().join("src/doc_examples.rs")).expect("src/doc_examples.rs");
    let missing: Vec<String> = markdown_files()
        .iter()
        .map(|p| p.strip_prefix(root()).unwrap().display().to_string())
        .filter(|rel| !list.contains(&format!("include_str!(\"../{rel}\")")))
        .collect();
    assert!(
        missing.is_empty(),
        "add these to src/doc_examples.rs (#[doc = include_str!(\"../PATH\")] on a struct), so \
         their Rust blocks are compiled: {missing:?}"
    );
}

#[test]
fn every_fence_names_its_language() {
    let mut bare = Vec::new();
    for path in markdown_files() {
        let text = std::fs::read_to_string(&path).expect("read a Markdown file");
        for (line, info) in fences(&text) {
            if info.is_empty() {
                bare.push(format!(
                    "{}:{line}",
                    path.strip_prefix(root()).unwrap().display()
                ));
            }
        }
    }
    assert!(
        bare.is_empty(),
        "fences without a language are compiled as Rust by rustdoc; write ```rust (compiled), \
         ```rust,no_run (compiled, not run), ```rust,ignore (a sketch) or ```text, ```sh, ...: \
         {bare:?}"
    );
}
