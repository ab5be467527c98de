//! The `static` app's responses judged by a third-party HTTP checker, REDbot (PyPI `redbot`;
//! `.ci/run` installs it). For each URL REDbot fetches the resource, then checks it with its own
//! requests: `If-None-Match` and `If-Modified-Since` (each must get a 304 that carries the 200's
//! validators), a `Range` (a correct 206), content negotiation. Its HAR output gives every note
//! with a level; any `bad` or `warn` note fails the test, and the checks that prove the 304s and
//! the 206 were exercised must be among the `good` ones.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

/// `redbot` from PATH, or `None` (then the test says so and does nothing: CI installs it).
fn redbot() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("redbot"))
            .find(|p| p.is_file())
    })
}

/// A note REDbot gave, with the notes it nests.
#[derive(Debug)]
struct Note {
    id: String,
    level: String,
    summary: String,
}

fn collect_notes(messages: &serde_json::Value, into: &mut Vec<Note>) {
    for m in messages.as_array().into_iter().flatten() {
        into.push(Note {
            id: m["note_id"].as_str().unwrap_or("?").to_string(),
            level: m["level"].as_str().unwrap_or("?").to_ascii_lowercase(),
            summary: m["summary"].as_str().unwrap_or("").to_string(),
        });
        collect_notes(&m["subnotes"], into);
    }
}

/// Runs REDbot on `url`; returns the status it saw and its notes. Panics if REDbot fails or its
/// output is not the HAR document it promises.
fn check(redbot: &PathBuf, url: &str) -> (u64, Vec<Note>) {
    let out = Command::new("timeout")
        .args(["-k", "5", "60"])
        .arg(redbot)
        .args(["-o", "har", url])
        .output()
        .expect("run redbot");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "redbot {url} failed ({}): {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let har: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("redbot's HAR output for {url} is not JSON ({e}): {stdout}"));
    assert!(
        har["log"]["_red_error"].is_null(),
        "redbot could not check {url}: {}",
        har["log"]["_red_error"]
    );
    let entry = &har["log"]["entries"][0];
    let status = entry["response"]["status"]
        .as_u64()
        .unwrap_or_else(|| panic!("no response in redbot's output for {url}: {stdout}"));
    let mut notes = Vec::new();
    collect_notes(&entry["_red_messages"], &mut notes);
    (status, notes)
}

#[test]
fn redbot_finds_no_problem_in_the_static_apps_responses() {
    let Some(redbot) = redbot() else {
        eprintln!("SKIPPED: `redbot` is not on PATH (pip install redbot; .ci/run installs it)");
        return;
    };
    let dir = TempDir::new();
    // Each file is longer than REDbot's range probe (up to 97 bytes from a random offset): for a
    // shorter one the correct 206 is the whole file, which REDbot warns about (RANGE_CL_FULL)
    // whatever the server does.
    let filler = "static files served by tine, checked by REDbot. ".repeat(4);
    dir.write(
        "root/index.html",
        format!("<!doctype html><title>t</title><p>{filler}</p>\n"),
    );
    dir.write("root/hello.txt", format!("hello {filler}\n"));
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    dir.write("root/big.bin", &big);
    let server = Launch::tine()
        .args(["--app", "static", "--workers", "1", "--root"])
        .arg(dir.join("root"))
        .start();
    let base = format!("http://{}", server.tcp_addr());
    let clean = |path: &str| {
        let url = format!("{base}{path}");
        let (status, notes) = check(&redbot, &url);
        assert_eq!(status, 200, "{url}: {notes:#?}");
        let problems: Vec<String> = notes
            .iter()
            .filter(|n| n.level == "bad" || n.level == "warn")
            .map(|n| format!("{} ({}): {}", n.id, n.level, n.summary))
            .collect();
        assert!(problems.is_empty(), "REDbot on {url}: {problems:#?}");
        for proof in ["INM_304", "IMS_304", "RANGE_CORRECT"] {
            assert!(
                notes.iter().any(|n| n.id == proof && n.level == "good"),
                "REDbot on {url} did not confirm {proof}: {notes:#?}"
            );
        }
    };
    // Files that changed within the last second are not kept in memory: these are all read
    // from the disk.
    let settled = std::time::Instant::now() + std::time::Duration::from_millis(1300);
    // A small file read at once, the index file of `/`, and a file sent by sendfile.
    for path in ["/hello.txt", "/", "/big.bin"] {
        clean(path);
    }
    // The two small ones again once the worker keeps them (asked once after they settled).
    std::thread::sleep(settled.saturating_duration_since(std::time::Instant::now()));
    for path in ["/hello.txt", "/"] {
        assert_eq!(server.get(path).status, 200);
        clean(path);
    }
}
