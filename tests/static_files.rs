//! The `static` reference app: files under `--root` with ranges, ETag, index files, and no way out
//! of the root.

mod common;

use std::os::unix::fs::symlink;

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
