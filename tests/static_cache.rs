//! The static app's small files kept in each worker's memory: answered without reading the file
//! again, yet checked on every request, so that a file changed, replaced, removed or swapped for
//! a symlink out of the root is never answered from memory.

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;

const SECRET: &str = "TOP SECRET, outside the root";

/// Waits until `path` last changed more than a second ago (what the app waits for before it
/// keeps a file): a wait on the file's age, which only time passing can satisfy.
fn wait_settled(path: &Path) {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::symlink_metadata(path).unwrap();
    let changed = SystemTime::UNIX_EPOCH
        + Duration::new(meta.ctime() as u64, meta.ctime_nsec() as u32)
            .max(Duration::new(meta.mtime() as u64, meta.mtime_nsec() as u32));
    let settled = changed + Duration::from_millis(1300);
    if let Ok(left) = settled.duration_since(SystemTime::now()) {
        std::thread::sleep(left);
    }
}

struct Site {
    dir: TempDir,
}

impl Site {
    fn new() -> Site {
        let dir = TempDir::new();
        dir.write("secret.txt", SECRET);
        dir.write("root/a.txt", "version one\n");
        dir.write("root/b.txt", "bravo file\n");
        dir.write("root/gone.txt", "about to go\n");
        dir.write("root/sub/index.html", "<p>index one</p>\n");
        symlink("a.txt", dir.join("root/link.txt")).unwrap();
        Site { dir }
    }

    fn root(&self, name: &str) -> std::path::PathBuf {
        self.dir.join("root").join(name)
    }

    fn start(&self) -> Server {
        static_app::serve_on_one_worker(&self.dir.join("root"))
    }
}

#[test]
fn a_small_file_is_answered_from_memory_after_its_first_request() {
    let site = Site::new();
    let Some((server, worker)) = static_app::serve_on_one_traceable_worker(&site.dir.join("root"))
    else {
        return;
    };
    wait_settled(&site.root("a.txt"));
    // The first request reads the file and keeps it.
    assert_eq!(server.get("/a.txt").text(), "version one\n");
    let trace = strace::Trace::attach(
        worker,
        "openat,openat2,read,pread64,preadv,preadv2,sendfile",
        site.dir.path(),
    );
    let mut client = Client::connect(&server.addr()).unwrap();
    for _ in 0..3 {
        let r = client.get("/a.txt").unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "version one\n");
        assert!(r.header("etag").is_some() && r.header("last-modified").is_some());
    }
    let calls = trace.finish();
    let located: Vec<&String> = calls
        .iter()
        .filter(|l| l.contains("openat2(") && l.contains("\"a.txt\""))
        .collect();
    assert_eq!(
        located.len(),
        3,
        "the path is resolved beneath the root on every request: {calls:#?}"
    );
    assert!(
        located.iter().all(|l| l.contains("O_PATH")),
        "located (O_PATH), not opened for reading: {located:#?}"
    );
    let reads: Vec<&String> = calls
        .iter()
        .filter(|l| l.contains("pread") || l.contains("sendfile("))
        .collect();
    assert!(reads.is_empty(), "the file is not read again: {reads:#?}");
}

#[test]
fn a_kept_file_that_changes_on_disk_is_served_fresh() {
    use std::os::unix::fs::MetadataExt as _;
    let site = Site::new();
    let server = site.start();
    let addr = server.addr();
    for name in ["a.txt", "b.txt", "gone.txt", "sub/index.html"] {
        wait_settled(&site.root(name));
    }
    // Kept: each asked once (a second ask is then answered from memory).
    for (path, want) in [
        ("/a.txt", "version one\n"),
        ("/link.txt", "version one\n"),
        ("/b.txt", "bravo file\n"),
        ("/gone.txt", "about to go\n"),
        ("/sub/", "<p>index one</p>\n"),
    ] {
        for _ in 0..2 {
            assert_eq!(server.get(path).text(), want, "{path}");
        }
    }

    // Rewritten in place with the same size, its modification time set back: only the change
    // time tells.
    let a = site.root("a.txt");
    let mtime = std::fs::metadata(&a).unwrap().modified().unwrap();
    std::fs::write(&a, "version two\n").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&a)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_eq!(std::fs::metadata(&a).unwrap().modified().unwrap(), mtime);
    assert_eq!(server.get("/a.txt").text(), "version two\n");
    assert_eq!(server.get("/link.txt").text(), "version two\n");

    // Replaced by a rename (another inode), same size and times.
    let b = site.root("b.txt");
    let b_meta = std::fs::metadata(&b).unwrap();
    let new_b = site.dir.write("root/.b.new", "BRAVO FILE\n");
    std::fs::File::options()
        .write(true)
        .open(&new_b)
        .unwrap()
        .set_modified(b_meta.modified().unwrap())
        .unwrap();
    std::fs::rename(&new_b, &b).unwrap();
    assert_ne!(std::fs::metadata(&b).unwrap().ino(), b_meta.ino());
    assert_eq!(server.get("/b.txt").text(), "BRAVO FILE\n");

    // Removed.
    std::fs::remove_file(site.root("gone.txt")).unwrap();
    assert_eq!(server.get("/gone.txt").status, 404);

    // An index file replaced.
    std::fs::write(site.root("sub/index.html"), "<p>index two</p>\n").unwrap();
    assert_eq!(server.get("/sub/").text(), "<p>index two</p>\n");

    // A kept symlink swapped for one out of the root: refused, never the kept bytes nor the
    // secret.
    let link = site.root("link.txt");
    std::fs::remove_file(&link).unwrap();
    symlink("../secret.txt", &link).unwrap();
    let r = get(&addr, "/link.txt").unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(!r.text().contains("SECRET") && !r.text().contains("version"));
}

#[test]
fn a_kept_file_still_answers_ranges_conditionals_and_head() {
    let site = Site::new();
    let server = site.start();
    let addr = server.addr();
    wait_settled(&site.root("a.txt"));
    let first = server.get("/a.txt");
    let etag = first.header("etag").unwrap().to_string();
    let modified = first.header("last-modified").unwrap().to_string();
    for _ in 0..2 {
        let r = get_with(&addr, "/a.txt", &[("Range", "bytes=2-5")]).unwrap();
        assert_eq!(r.status, 206);
        assert_eq!(r.text(), "rsio");
        assert_eq!(r.header("content-range"), Some("bytes 2-5/12"));
        let r = get_with(&addr, "/a.txt", &[("Range", "bytes=-3")]).unwrap();
        assert_eq!(r.text(), "ne\n");
        let r = get_with(&addr, "/a.txt", &[("Range", "bytes=50-")]).unwrap();
        assert_eq!(r.status, 416);
        assert_eq!(r.header("content-range"), Some("bytes */12"));
        let r = get_with(&addr, "/a.txt", &[("If-None-Match", &etag)]).unwrap();
        assert_eq!(r.status, 304);
        assert_eq!(r.header("etag"), Some(etag.as_str()));
        let r = get_with(&addr, "/a.txt", &[("If-Modified-Since", &modified)]).unwrap();
        assert_eq!(r.status, 304);
        assert_eq!(r.header("etag"), Some(etag.as_str()));
        let mut c = Client::connect(&addr).unwrap();
        let r = c.request("HEAD", "/a.txt", &[], b"").unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-length"), Some("12"));
        assert!(r.body.is_empty());
        let r = c.get("/a.txt").unwrap();
        assert_eq!(r.text(), "version one\n");
    }
}
