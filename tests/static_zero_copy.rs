//! The static app's large files: sent from the page cache with `sendfile(2)` on HTTP/1 (windows
//! of the file handed to the socket in place of hyper's buffers), read in chunks on HTTP/2, and
//! the same bytes either way: whole, in ranges across windows, kept alive, pipelined, after a
//! HEAD, and from a file that is not in the page cache.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// Bigger than two of the body's 4 MiB windows, so a response takes three.
const BIG: usize = 9 * 1024 * 1024 + 12_345;

/// Pseudo-random bytes (xorshift), so a misplaced window cannot pass for the right one.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

struct Site {
    dir: TempDir,
    big: Vec<u8>,
    mid: Vec<u8>,
}

impl Site {
    fn new() -> Site {
        let dir = TempDir::new();
        let big = pattern(BIG, 7);
        let mid = pattern(70_000, 11);
        dir.write("root/big.bin", &big);
        dir.write("root/mid.bin", &mid);
        dir.write("root/small.txt", "small\n");
        Site { dir, big, mid }
    }

    fn start(&self) -> Server {
        static_app::serve_on_one_worker(&self.dir.join("root"))
    }
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first differing byte at {i}");
    }
}

#[test]
fn a_large_file_is_sent_with_sendfile_not_read_through_the_worker() {
    let site = Site::new();
    let Some((server, worker)) = static_app::serve_on_one_traceable_worker(&site.dir.join("root"))
    else {
        return;
    };
    // Warm the page cache (and the worker) so that the traced request is the steady state.
    assert_same(&server.get("/big.bin").body, &site.big, "warm-up");
    let trace = strace::Trace::attach(
        worker,
        "sendfile,read,pread64,preadv,preadv2,readv",
        site.dir.path(),
    );
    let r = server.get("/big.bin");
    assert_eq!(r.status, 200);
    assert_same(&r.body, &site.big, "traced GET");
    let calls = trace.finish();
    let sent: u64 = calls
        .iter()
        .filter(|l| l.contains("sendfile("))
        .filter_map(|l| strace::returned(l))
        .sum();
    let file_reads: Vec<&String> = calls
        .iter()
        .filter(|l| l.contains("pread") || l.contains("preadv") || l.contains("readv("))
        .collect();
    assert_eq!(
        sent,
        BIG as u64,
        "the file's bytes went out by sendfile: {:#?}",
        &calls[..calls.len().min(40)]
    );
    assert!(
        file_reads.is_empty(),
        "no read of the file through the worker: {file_reads:#?}"
    );
}

#[test]
fn large_files_give_the_same_bytes_in_ranges_kept_alive_pipelined_and_after_head() {
    let site = Site::new();
    let server = site.start();
    let addr = server.addr();
    let mut c = Client::connect(&addr).unwrap();
    // Whole, twice on one connection.
    for round in 0..2 {
        let r = c.get("/big.bin").unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-length"), Some(BIG.to_string().as_str()));
        assert_same(&r.body, &site.big, &format!("whole, round {round}"));
    }
    // A HEAD between two GETs leaves nothing behind on the connection.
    let r = c.request("HEAD", "/big.bin", &[], b"").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some(BIG.to_string().as_str()));
    assert!(r.body.is_empty());
    let r = c.get("/mid.bin").unwrap();
    assert_same(&r.body, &site.mid, "mid after HEAD");
    // Ranges: across the first window's end, from the middle of one window to the middle of the
    // third, a suffix longer than a window, and an open end.
    let four = 4 * 1024 * 1024;
    for (range, start, end) in [
        (
            format!("bytes={}-{}", four - 1000, four + 999),
            four - 1000,
            four + 1000,
        ),
        (
            format!("bytes=1000-{}", 2 * four + 5000),
            1000,
            2 * four + 5001,
        ),
        ("bytes=-5000000".to_string(), BIG - 5_000_000, BIG),
        (format!("bytes={}-", BIG - 10), BIG - 10, BIG),
    ] {
        let r = c
            .request("GET", "/big.bin", &[("Range", &range)], b"")
            .unwrap();
        assert_eq!(r.status, 206, "{range}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {start}-{}/{BIG}", end - 1).as_str()),
            "{range}"
        );
        assert_same(&r.body, &site.big[start..end], &range);
    }
    // Pipelined: three requests in one write, answered in order.
    let mut pipelined = Vec::new();
    for path in ["/big.bin", "/small.txt", "/mid.bin"] {
        pipelined.extend_from_slice(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    }
    c.send(&pipelined).unwrap();
    assert_same(
        &c.read_response(false).unwrap().body,
        &site.big,
        "pipelined big",
    );
    assert_eq!(c.read_response(false).unwrap().text(), "small\n");
    assert_same(
        &c.read_response(false).unwrap().body,
        &site.mid,
        "pipelined mid",
    );
}

#[test]
fn http2_reads_the_same_large_file() {
    let site = Site::new();
    let server = site.start();
    let url: http::Uri = format!("http://{}/big.bin", server.tcp_addr())
        .parse()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (status, version, body) = rt.block_on(async {
        use http_body_util::BodyExt as _;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let r = tokio::time::timeout(Duration::from_secs(60), async {
            let r = client.get(url).await.unwrap();
            let (parts, body) = r.into_parts();
            (
                parts.status,
                parts.version,
                body.collect().await.unwrap().to_bytes(),
            )
        })
        .await
        .expect("answered within 60 s");
        r
    });
    assert_eq!(status, 200);
    assert_eq!(version, http::Version::HTTP_2);
    assert_same(&body, &site.big, "HTTP/2");
}

/// Drops `path`'s pages from the page cache.
fn evict(path: &Path) {
    use std::os::fd::AsRawFd as _;
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    nix::fcntl::posix_fadvise(
        f.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .unwrap();
}

#[test]
fn a_file_not_in_the_page_cache_is_served_whole() {
    let site = Site::new();
    let server = site.start();
    let addr = server.addr();
    let mut c = Client::connect(&addr).unwrap();
    for round in 0..2 {
        evict(&site.dir.join("root/big.bin"));
        let r = c.get("/big.bin").unwrap();
        assert_same(&r.body, &site.big, &format!("cold, round {round}"));
        evict(&site.dir.join("root/big.bin"));
        let r = c
            .request(
                "GET",
                "/big.bin",
                &[("Range", "bytes=3000000-7000000")],
                b"",
            )
            .unwrap();
        assert_same(&r.body, &site.big[3_000_000..7_000_001], "cold range");
    }
}
