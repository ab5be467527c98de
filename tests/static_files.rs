//! The `static` reference app: files under `--root` with ranges, ETag, index files, and no way out
//! of the root.

mod common;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use common::*;

const SECRET: &str = "TOP SECRET, outside the root";

/// A temp dir with `root/` (what is served) and `secret.txt` next to it (what must never be).
struct Site {
    dir: TempDir,
    big: Vec<u8>,
}

impl Site {
    fn new() -> Site {
        let dir = TempDir::new();
        dir.write("secret.txt", SECRET);
        dir.write("root/index.html", "<h1>root index</h1>\n");
        dir.write("root/hello.txt", "hello static\n");
        dir.write("root/sub/index.html", "<h1>sub index</h1>\n");
        dir.write("root/sub/page.html", "<p>page</p>\n");
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        dir.write("root/big.bin", &big);
        let root = dir.join("root");
        symlink(dir.join("secret.txt"), root.join("link-out")).unwrap();
        symlink("../secret.txt", root.join("relative-link-out")).unwrap();
        symlink(dir.path(), root.join("dir-out")).unwrap();
        symlink("/etc", root.join("etc-link")).unwrap();
        symlink("hello.txt", root.join("link-in")).unwrap();
        Site { dir, big }
    }

    fn start(&self) -> Server {
        Launch::tine()
            .args(["--app", "static", "--workers", "1", "--root"])
            .arg(self.dir.join("root"))
            .start()
    }
}

#[test]
fn serves_files_with_type_length_and_validators() {
    let site = Site::new();
    let server = site.start();
    let r = server.get("/hello.txt");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello static\n");
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "{:?}",
        r.headers
    );
    assert_eq!(r.header("content-length"), Some("13"));
    assert!(r.header("last-modified").is_some(), "{:?}", r.headers);
    assert_eq!(r.header("accept-ranges"), Some("bytes"), "{:?}", r.headers);
    let etag = r
        .header("etag")
        .unwrap_or_else(|| panic!("an ETag: {:?}", r.headers))
        .to_string();
    assert!(
        etag.ends_with('"') && (etag.starts_with('"') || etag.starts_with("W/\"")),
        "a quoted ETag: {etag}"
    );
    // Stable across requests, different for another file.
    assert_eq!(server.get("/hello.txt").header("etag"), Some(etag.as_str()));
    assert_ne!(server.get("/big.bin").header("etag"), Some(etag.as_str()));
    let r = server.get("/sub/page.html");
    assert!(r
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/html")));
    assert_eq!(server.get("/missing.txt").status, 404);
}

#[test]
fn conditional_requests_get_304() {
    let site = Site::new();
    let server = site.start();
    let addr = server.addr();
    let r = server.get("/hello.txt");
    let etag = r.header("etag").expect("etag").to_string();
    let r = get_with(&addr, "/hello.txt", &[("If-None-Match", &etag)]).unwrap();
    assert_eq!(r.status, 304, "{:?}", r.headers);
    assert!(r.body.is_empty());
    assert_eq!(r.header("etag"), Some(etag.as_str()));
    let r = get_with(
        &addr,
        "/hello.txt",
        &[("If-None-Match", "\"something-else\"")],
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let r = get_with(&addr, "/hello.txt", &[("If-None-Match", "*")]).unwrap();
    assert_eq!(r.status, 304);
    // A changed file gets a new ETag.
    std::fs::write(site.dir.join("root/hello.txt"), "hello again, longer\n").unwrap();
    let r = get_with(&addr, "/hello.txt", &[("If-None-Match", &etag)]).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello again, longer\n");
    assert_ne!(r.header("etag"), Some(etag.as_str()));
}

#[test]
fn byte_ranges_get_206() {
    let site = Site::new();
    let server = site.start();
    let addr = server.addr();
    let r = get_with(&addr, "/big.bin", &[("Range", "bytes=10-19")]).unwrap();
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 10-19/100000"));
    assert_eq!(r.body, site.big[10..20]);
    let r = get_with(&addr, "/big.bin", &[("Range", "bytes=-5")]).unwrap();
    assert_eq!(r.status, 206);
    assert_eq!(r.body, site.big[100_000 - 5..]);
    let r = get_with(&addr, "/big.bin", &[("Range", "bytes=99990-")]).unwrap();
    assert_eq!(r.status, 206);
    assert_eq!(r.body, site.big[99_990..]);
    let r = get_with(&addr, "/big.bin", &[("Range", "bytes=200000-")]).unwrap();
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */100000"));
    let r = server.get("/big.bin");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, site.big);
}

#[test]
fn directories_serve_their_index() {
    let site = Site::new();
    let server = site.start();
    let r = server.get("/");
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "<h1>root index</h1>\n")
    );
    let r = server.get("/sub/");
    assert_eq!((r.status, r.text().as_str()), (200, "<h1>sub index</h1>\n"));
    let r = server.get("/sub");
    assert!(
        matches!(r.status, 301 | 307 | 308),
        "redirect to the slash: {}",
        r.status
    );
    assert_eq!(r.header("location"), Some("/sub/"));
    let mut client = Client::connect(&server.addr()).unwrap();
    let r = client.request("HEAD", "/hello.txt", &[], b"").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("13"));
    assert!(r.body.is_empty());
}

#[test]
fn a_symlink_inside_the_root_to_a_file_inside_is_served() {
    let site = Site::new();
    let server = site.start();
    let r = server.get("/link-in");
    assert_eq!((r.status, r.text().as_str()), (200, "hello static\n"));
}

#[test]
fn no_path_leaves_the_root() {
    let site = Site::new();
    let server = site.start();
    let addr = server.addr();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let passwd_line = passwd.lines().next().unwrap_or("root:x:0:0").to_string();
    for path in [
        "/../etc/passwd",
        "/../../../../../../../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/%2E%2E/%2E%2E/%2E%2E/%2E%2E/%2E%2E/%2E%2E/etc/passwd",
        "/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/..%2f..%2f..%2f..%2f..%2f..%2fetc/passwd",
        "/%252e%252e/%252e%252e/etc/passwd",
        "/%2fetc%2fpasswd",
        "//etc/passwd",
        "/sub/../../secret.txt",
        "/sub/%2e%2e/%2e%2e/secret.txt",
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/link-out",
        "/relative-link-out",
        "/dir-out/secret.txt",
        "/dir-out/root/../secret.txt",
        "/etc-link/passwd",
        "/%65tc-link/passwd",
        "/etc-link/../secret.txt",
        "/sub/..%5c..%5csecret.txt",
        "http://localhost/../secret.txt",
    ] {
        let r = get(&addr, path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let body = r.text();
        assert!(!body.contains(SECRET), "{path}: served the secret file");
        assert!(!body.contains(&passwd_line), "{path}: served /etc/passwd");
        assert!(
            matches!(r.status, 403 | 404),
            "{path}: status {} (expected 403 or 404)",
            r.status
        );
    }
    // Request targets hyper refuses outright are fine too, as long as nothing is served.
    for path in ["/..\\..\\secret.txt", "/../\u{0}secret.txt"] {
        if let Ok(r) = get(&addr, path) {
            assert!(
                matches!(r.status, 400 | 403 | 404),
                "{path:?}: {}",
                r.status
            );
            assert!(!r.text().contains(SECRET));
        }
    }
    assert_eq!(
        server.get("/hello.txt").status,
        200,
        "the server is fine afterwards"
    );
}

#[test]
fn a_root_given_through_a_symlink_still_serves() {
    // The root itself may be a symlink (e.g. a `current` release link): files inside are served.
    let site = Site::new();
    let link = site.dir.join("current");
    symlink(site.dir.join("root"), &link).unwrap();
    let server = Launch::tine()
        .args(["--app", "static", "--workers", "1", "--root"])
        .arg(&link)
        .start();
    assert_eq!(server.get("/hello.txt").status, 200);
    assert_eq!(server.get("/link-out").status / 100, 4);
    let r = server.get("/dir-out/secret.txt");
    assert!(!r.text().contains(SECRET) && r.status / 100 == 4);
}

impl Site {
    fn start_with(&self, follow_symlinks: &str) -> Server {
        Launch::tine()
            .args(["--app", "static", "--workers", "1", "--follow-symlinks"])
            .arg(follow_symlinks)
            .arg("--root")
            .arg(self.dir.join("root"))
            .start()
    }

    /// Nested directories and links: chains and directory links that stay inside, and one
    /// deep link that climbs out.
    fn add_nested_links(&self) {
        let root = self.dir.join("root");
        self.dir.write("root/a/b/deep.txt", "deep inside\n");
        symlink("../../sub/page.html", root.join("a/b/up-in")).unwrap();
        symlink("../../../secret.txt", root.join("a/b/up-out")).unwrap();
        symlink("sub", root.join("dir-in")).unwrap();
        symlink("link-in", root.join("chain")).unwrap();
        symlink("../a", root.join("sub/a-link")).unwrap();
    }
}

/// Whether a response shows any byte of what lies outside the root.
fn leaks(r: &Response) -> bool {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let passwd_line = passwd.lines().next().unwrap_or("root:x:0:0").to_string();
    let body = r.text();
    body.contains(SECRET) || body.contains(&passwd_line)
}

#[test]
fn an_index_file_that_links_out_of_the_root_is_refused() {
    // The index file is appended to a directory path: it must be resolved beneath the root like
    // any other file, not after the check.
    let site = Site::new();
    let root = site.dir.join("root");
    std::fs::create_dir_all(root.join("d")).unwrap();
    symlink("/etc/passwd", root.join("d/index.html")).unwrap();
    std::fs::create_dir_all(root.join("e")).unwrap();
    symlink("../../secret.txt", root.join("e/index.html")).unwrap();
    std::fs::create_dir_all(root.join("f")).unwrap();
    symlink("../hello.txt", root.join("f/index.html")).unwrap();
    let server = site.start();
    for path in ["/d/", "/e/", "/d/index.html", "/e/index.html"] {
        let r = server.get(path);
        assert!(!leaks(&r), "{path}: served a file outside the root");
        assert_eq!(r.status, 403, "{path}");
    }
    // An index file that links to a file inside the root is served, with the index's type.
    let r = server.get("/f/");
    assert_eq!((r.status, r.text().as_str()), (200, "hello static\n"));
    assert!(r
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/html")));
}

#[test]
fn nested_symlinks_within_the_root_follow_the_policy() {
    let site = Site::new();
    site.add_nested_links();
    let inside = [
        ("/a/b/up-in", "<p>page</p>\n"),
        ("/dir-in/page.html", "<p>page</p>\n"),
        ("/dir-in/", "<h1>sub index</h1>\n"),
        ("/chain", "hello static\n"),
        ("/sub/a-link/b/deep.txt", "deep inside\n"),
        ("/a/b/deep.txt", "deep inside\n"),
    ];
    let outside = [
        "/a/b/up-out",
        "/link-out",
        "/relative-link-out",
        "/dir-out/secret.txt",
        "/etc-link/passwd",
    ];
    {
        let server = site.start(); // within-root, the default
        for (path, body) in inside {
            let r = server.get(path);
            assert_eq!((r.status, r.text().as_str()), (200, body), "{path}");
        }
        for path in outside {
            let r = server.get(path);
            assert!(!leaks(&r), "{path}: served a file outside the root");
            assert_eq!(r.status, 403, "{path}");
        }
    }
    let server = site.start_with("never");
    for (path, body) in inside {
        let r = server.get(path);
        // Plain files through plain directories are still served; any link on the way is not.
        if path == "/a/b/deep.txt" {
            assert_eq!((r.status, r.text().as_str()), (200, body), "{path}");
        } else {
            assert_eq!(
                r.status, 403,
                "{path}: a symlink with follow_symlinks = never"
            );
        }
    }
    for path in outside {
        let r = server.get(path);
        assert!(!leaks(&r), "{path}: served a file outside the root");
        assert_eq!(r.status, 403, "{path}");
    }
    assert_eq!(server.get("/hello.txt").status, 200);
}

#[test]
fn a_symlink_swapped_between_check_and_open_never_leaks() {
    // One thread swaps two links (a file and a directory's index file) between a target inside
    // the root and one outside, with atomic renames, as fast as it can; two clients request them
    // the whole time. Whatever the interleaving, a response is the inside file or a refusal,
    // never the outside one. Bounded: 3 s of requests.
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let site = Site::new();
    let root = site.dir.join("root");
    std::fs::create_dir_all(root.join("swapdir")).unwrap();
    let outside = site.dir.join("secret.txt");
    let server = site.start();
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (root, stop) = (root.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            let targets = [
                (
                    Path::new("hello.txt").to_path_buf(),
                    PathBuf::from("../hello.txt"),
                ),
                (outside.clone(), outside.clone()),
            ];
            while !stop.load(Ordering::Relaxed) && swaps < 5_000_000 {
                let (file_target, index_target) = &targets[(swaps % 2) as usize];
                let tmp = root.join(".swap-tmp");
                let _ = std::fs::remove_file(&tmp);
                symlink(file_target, &tmp).unwrap();
                std::fs::rename(&tmp, root.join("swap")).unwrap();
                symlink(index_target, &tmp).unwrap();
                std::fs::rename(&tmp, root.join("swapdir/index.html")).unwrap();
                swaps += 1;
            }
            swaps
        })
    };
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let addr = server.addr();
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(3);
                // Never panics: the swapper must be stopped whatever happens here.
                let (mut served, mut refused, mut wrong) = (0u64, 0u64, Vec::new());
                let mut client = match Client::connect(&addr) {
                    Ok(c) => c,
                    Err(e) => return (served, refused, vec![format!("connect: {e}")]),
                };
                while Instant::now() < deadline {
                    for path in ["/swap", "/swapdir/"] {
                        let r = match client.get(path) {
                            Ok(r) => r,
                            Err(e) => return (served, refused, vec![format!("{path}: {e}")]),
                        };
                        if leaks(&r) {
                            wrong.push(format!("{path}: served the file outside the root"));
                        }
                        match (r.status, r.text().as_str()) {
                            (200, "hello static\n") => served += 1,
                            (403 | 404, _) => refused += 1,
                            (status, body) => wrong.push(format!("{path}: {status} {body:?}")),
                        }
                    }
                }
                (served, refused, wrong)
            })
        })
        .collect();
    let results: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    let served: u64 = results.iter().map(|r| r.0).sum();
    let refused: u64 = results.iter().map(|r| r.1).sum();
    let wrong: Vec<_> = results.iter().flat_map(|r| r.2.clone()).collect();
    let wrong_file = wrong.iter().filter(|w| w.starts_with("/swap:")).count();
    eprintln!(
        "swaps {swaps}, served {served}, refused {refused}, wrong {} (/swap: {wrong_file})",
        wrong.len()
    );
    assert!(
        wrong.is_empty(),
        "{} wrong answers, first ones: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    // Both states were seen: the race was really run.
    assert!(
        served > 0 && refused > 0,
        "served {served}, refused {refused}"
    );
}

#[test]
fn a_304_for_if_modified_since_carries_the_validators() {
    // RFC 9110 §15.4.5: a 304 sends the ETag and Last-Modified the 200 would have sent.
    let site = Site::new();
    let server = site.start();
    let addr = server.addr();
    let r = server.get("/hello.txt");
    let (etag, modified) = (
        r.header("etag").expect("etag").to_string(),
        r.header("last-modified")
            .expect("last-modified")
            .to_string(),
    );
    let r = get_with(&addr, "/hello.txt", &[("If-Modified-Since", &modified)]).unwrap();
    assert_eq!(r.status, 304, "{:?}", r.headers);
    assert_eq!(r.header("etag"), Some(etag.as_str()));
    assert_eq!(r.header("last-modified"), Some(modified.as_str()));
    // If-None-Match wins over If-Modified-Since.
    let r = get_with(
        &addr,
        "/hello.txt",
        &[
            ("If-Modified-Since", &modified),
            ("If-None-Match", "\"other\""),
        ],
    )
    .unwrap();
    assert_eq!(r.status, 200);
    // A range under a stale If-Range is the whole file.
    let r = get_with(
        &addr,
        "/big.bin",
        &[("Range", "bytes=0-9"), ("If-Range", "\"stale\"")],
    )
    .unwrap();
    assert_eq!((r.status, r.body.len()), (200, 100_000));
    let big_etag = server.get("/big.bin").header("etag").unwrap().to_string();
    let r = get_with(
        &addr,
        "/big.bin",
        &[("Range", "bytes=0-9"), ("If-Range", &big_etag)],
    )
    .unwrap();
    assert_eq!((r.status, r.body.as_slice()), (206, &site.big[..10]));
    // If-Match that does not match: 412.
    let r = get_with(&addr, "/hello.txt", &[("If-Match", "\"other\"")]).unwrap();
    assert_eq!(r.status, 412);
}
