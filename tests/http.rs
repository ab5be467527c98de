//! The HTTP face of a worker: keep-alive, hostile clients (malformed requests, oversized heads,
//! slowloris), unix socket listeners, the drain of kept-alive connections on shutdown, HTTP/2 with
//! prior knowledge, and the debug switches.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

fn start(args: &[&str]) -> Server {
    Launch::tine()
        .args(["--debug-headers", "--debug-routes"])
        .args(args)
        .start()
}

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    let server = start(&["--workers", "2"]);
    let mut client = Client::connect(&server.addr()).expect("connect");
    let mut pids = Vec::new();
    for _ in 0..5 {
        let r = client
            .get("/")
            .expect("request on the kept-alive connection");
        assert_eq!((r.status, r.text().as_str()), (200, "hello\n"));
        assert!(!r.closes(), "kept alive: {:?}", r.headers);
        pids.push(r.worker().expect("x-tine-worker"));
    }
    assert!(
        pids.windows(2).all(|w| w[0] == w[1]),
        "one connection, one worker: {pids:?}"
    );
    let r = client
        .request("GET", "/", &[("Connection", "close")], b"")
        .expect("last request");
    assert!(r.closes());
    let (rest, closed) = client.read_until_closed(Duration::from_secs(5));
    assert!(
        closed && rest.is_empty(),
        "the server closes after `Connection: close`"
    );
}

#[test]
fn unknown_path_is_404_and_post_bodies_are_read() {
    let server = start(&["--workers", "1"]);
    assert_eq!(server.get("/nope").status, 404);
    let mut client = Client::connect(&server.addr()).unwrap();
    let r = client
        .request("POST", "/", &[], &[b'x'; 1000])
        .expect("POST with a body");
    assert_eq!(r.status, 200);
    // The small body the handler ignored was discarded: the connection is still usable.
    assert_eq!(client.get("/").expect("next request").status, 200);
}

#[test]
fn malformed_requests_get_400() {
    let server = start(&["--workers", "1"]);
    let addr = server.addr();
    for bad in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Without Colon\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n",
    ] {
        let shown = String::from_utf8_lossy(bad);
        let mut client = Client::connect(&addr).unwrap();
        client.send(bad).unwrap();
        let r = client
            .read_response(false)
            .unwrap_or_else(|e| panic!("{shown:?}: no response: {e}"));
        assert_eq!(r.status, 400, "{shown:?}");
        let (_, closed) = client.read_until_closed(Duration::from_secs(5));
        assert!(closed, "{shown:?}: the connection is closed after a 400");
    }
    // The worker is fine.
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn oversized_request_heads_get_431() {
    let server = start(&["--workers", "1"]);
    let addr = server.addr();
    // Default limit: 16 KiB for the whole head.
    let big = "a".repeat(20 * 1024);
    let r = get_with(&addr, "/", &[("X-Big", &big)]).expect("a response, not a reset");
    assert_eq!(r.status, 431);
    // Just under the limit is fine.
    let ok = "a".repeat(12 * 1024);
    assert_eq!(
        get_with(&addr, "/", &[("X-Ok", &ok)])
            .expect("response")
            .status,
        200
    );
    // A long request line counts too.
    let long_path = format!("/{}", "p".repeat(20 * 1024));
    let r = get(&addr, &long_path).expect("a response");
    assert!(r.status == 431 || r.status == 414, "long URI: {}", r.status);
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn an_oversized_head_never_reaches_the_app() {
    // `/crash` aborts the worker if the app sees it: a refused head must not get that far.
    let server = start(&["--workers", "1"]);
    let [worker] = server.wait_workers(1, READY_TIMEOUT)[..] else {
        unreachable!()
    };
    let big = "a".repeat(20 * 1024);
    let r = get_with(&server.addr(), "/crash", &[("X-Big", &big)]).expect("a response");
    assert_eq!(r.status, 431);
    let after = server.get("/");
    assert_eq!(after.status, 200);
    assert_eq!(after.worker(), Some(worker), "the same worker still serves");
}

#[test]
fn ended_connections_free_their_memory_before_the_next_sweep() {
    // With a long header_read_timeout the sweep is minutes away; connections that ended
    // meanwhile must not pile up (their tasks, buffers, or bookkeeping).
    let server = start(&["--workers", "1", "--header-read-timeout", "300"]);
    let [worker] = server.wait_workers(1, READY_TIMEOUT)[..] else {
        unreachable!()
    };
    let addr = server.tcp_addr();
    let one_request_each = |n: usize| {
        use std::io::{Read, Write};
        for _ in 0..n {
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut buf = [0u8; 512];
            assert!(s.read(&mut buf).expect("response") > 0);
        }
    };
    one_request_each(500); // the allocator's first growth
    let before = status_number(worker, "VmRSS");
    one_request_each(5000);
    let grown = status_number(worker, "VmRSS").saturating_sub(before);
    assert!(
        grown < 1024,
        "5000 ended connections kept {grown} KiB until the next sweep"
    );
}

#[test]
fn max_header_bytes_is_configurable() {
    let server = start(&["--workers", "1", "--max-header-bytes", "65536"]);
    let big = "a".repeat(40 * 1024);
    assert_eq!(
        get_with(&server.addr(), "/", &[("X-Big", &big)])
            .expect("response")
            .status,
        200
    );
    let huge = "a".repeat(70 * 1024);
    assert_eq!(
        get_with(&server.addr(), "/", &[("X-Big", &huge)])
            .expect("response")
            .status,
        431
    );
}

/// Sends `bytes` and then nothing: the server must close the connection within the header-read
/// timeout (1 s here) plus slack, and never answer 200.
fn assert_slow_client_is_cut(addr: &Addr, bytes: &[u8], what: &str) {
    let mut client = Client::connect(addr).unwrap();
    let sent = Instant::now();
    if !bytes.is_empty() {
        client.send(bytes).unwrap();
    }
    let (got, closed) = client.read_until_closed(Duration::from_secs(6));
    let took = sent.elapsed();
    assert!(closed, "{what}: still open after {took:?}");
    assert!(
        took >= Duration::from_millis(900),
        "{what}: closed after {took:?}, before the timeout"
    );
    assert!(
        took < Duration::from_secs(4),
        "{what}: closed only after {took:?}"
    );
    let text = String::from_utf8_lossy(&got);
    assert!(
        !text.contains(" 200 "),
        "{what}: a partial request was answered: {text:?}"
    );
}

#[test]
fn slowloris_partial_headers_are_cut_off() {
    let server = start(&["--workers", "1", "--header-read-timeout", "1"]);
    let addr = server.addr();
    // Slow clients are cut while others are served: hold three at once.
    let slow: Vec<_> = [
        &b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n"[..],
        b"GET /",
        b"POST / HTTP/1.1\r\n",
    ]
    .into_iter()
    .map(|bytes| {
        let addr = addr.clone();
        std::thread::spawn(move || {
            assert_slow_client_is_cut(&addr, bytes, &String::from_utf8_lossy(bytes))
        })
    })
    .collect();
    assert_eq!(
        server.get("/").status,
        200,
        "the worker serves others meanwhile"
    );
    for t in slow {
        t.join().expect("slow client");
    }
}

#[test]
fn slowloris_silent_connections_are_cut_off() {
    // A client that connects and sends nothing, or the start of the HTTP/2 preface, must not
    // hold a connection for ever either.
    let server = start(&["--workers", "1", "--header-read-timeout", "1"]);
    let addr = server.addr();
    let slow: Vec<_> = [&b""[..], b"PRI * HTTP/2.0\r\n"]
        .into_iter()
        .map(|bytes| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                assert_slow_client_is_cut(
                    &addr,
                    bytes,
                    &format!("{:?}", String::from_utf8_lossy(bytes)),
                )
            })
        })
        .collect();
    for t in slow {
        t.join().expect("slow client");
    }
}

#[test]
fn idle_keep_alive_connections_are_closed_after_the_keepalive_timeout() {
    let server = start(&["--workers", "1", "--keepalive-timeout", "1"]);
    let mut client = Client::connect(&server.addr()).unwrap();
    assert_eq!(client.get("/").unwrap().status, 200);
    let idle = Instant::now();
    let (_, closed) = client.read_until_closed(Duration::from_secs(6));
    assert!(closed, "an idle kept-alive connection is closed");
    assert!(
        idle.elapsed() < Duration::from_secs(4),
        "{:?}",
        idle.elapsed()
    );
}

#[test]
fn a_response_that_pauses_longer_than_the_head_timeout_is_not_cut() {
    // Server-sent events idle between events: the app is still writing the response, so the
    // connection's deadlines (header_read_timeout and keepalive_timeout, 1 s here) must not
    // close it.
    let server = start(&[
        "--workers",
        "1",
        "--header-read-timeout",
        "1",
        "--keepalive-timeout",
        "1",
    ]);
    let mut client = Client::connect(&server.addr()).unwrap();
    let started = Instant::now();
    let r = client
        .get("/stream/2500")
        .expect("the whole streamed response");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "first\nlast\n");
    assert!(started.elapsed() >= Duration::from_millis(2500));
    // And once it has ended, the connection idles out as usual.
    let (_, closed) = client.read_until_closed(Duration::from_secs(6));
    assert!(closed, "idle after the stream: closed by the sweep");
}

#[test]
fn unix_socket_listener_serves_and_is_cleaned_up() {
    let dir = TempDir::new();
    let path = dir.join("web.sock");
    let listen = format!("unix:{}", path.display());
    let mut server = Launch::tine()
        .args(["--workers", "2", "--debug-headers", "--listen", &listen])
        .start();
    assert_eq!(server.addr(), Addr::Unix(path.clone()));
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::metadata(&path).expect("socket file");
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o660,
        "default unix_mode"
    );
    let r = server.get("/");
    assert_eq!((r.status, r.text().as_str()), (200, "hello\n"));
    let report = load(&server.addr(), "/", 4, 20, true, Duration::from_secs(20));
    assert_eq!(report.status(200), 80, "{report:?}");
    server.signal(Signal::SIGTERM);
    assert_eq!(server.exit_code_within(Duration::from_secs(10)), 0);
    assert!(!path.exists(), "the socket file is removed on exit");
}

#[test]
fn tcp_and_unix_listeners_together_and_a_stale_socket_file_is_replaced() {
    let dir = TempDir::new();
    let path = dir.join("stale.sock");
    // A socket file left by a dead server: bound, then its listener dropped.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
    assert!(path.exists());
    let listen = format!("unix:{}", path.display());
    let server = Launch::tine()
        .args([
            "--workers",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--listen",
            &listen,
            "--unix-mode",
            "600",
        ])
        .start();
    let addrs = server.addrs();
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    for addr in &addrs {
        assert_eq!(get(addr, "/").expect("GET").status, 200, "{addr}");
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn draining_a_kept_alive_connection_says_connection_close() {
    let mut server = start(&["--workers", "1", "--graceful-timeout", "20"]);
    let mut client = Client::connect(&server.addr()).unwrap();
    let first = client.get("/").expect("first request");
    assert!(!first.closes());
    client.send_request("GET", "/sleep/1500", &[], b"").unwrap();
    server.wait_busy(Duration::from_secs(10));
    server.signal(Signal::SIGTERM);
    let r = client
        .read_response(false)
        .expect("the in-flight request is answered");
    assert_eq!(r.status, 200);
    assert!(
        r.closes(),
        "the response during the drain says `Connection: close`: {:?}",
        r.headers
    );
    let (_, closed) = client.read_until_closed(Duration::from_secs(5));
    assert!(closed, "and the server closes the connection");
    assert_eq!(server.exit_code_within(Duration::from_secs(10)), 0);
}

#[test]
fn a_fresh_connection_accepted_before_the_drain_is_answered() {
    // A worker accepted the connection, then was told to stop before the request arrived: the
    // request must still be answered (with `Connection: close`), not cut off unanswered.
    let mut server = start(&["--workers", "1", "--graceful-timeout", "20"]);
    let [worker] = server.wait_workers(1, READY_TIMEOUT)[..] else {
        unreachable!()
    };
    let addr = server.tcp_addr();
    let listener = tcp_socket_inode(addr, "0.0.0.0:0".parse().unwrap()).expect("listener inode");
    // Serving, the worker holds the inherited listener and its runtime's duplicate of it.
    let count = |inode: u64| {
        socket_inodes(worker)
            .iter()
            .filter(|i| **i == inode)
            .count()
    };
    assert_eq!(count(listener), 2, "{:?}", socket_inodes(worker));
    let mut client = Client::connect(&Addr::Tcp(addr)).unwrap();
    let Stream::Tcp(tcp) = &client.stream else {
        unreachable!()
    };
    // Until it is accepted, the server side of the connection has no file: its inode reads 0.
    let local = tcp.local_addr().unwrap();
    poll_until(Duration::from_secs(5), || {
        let conn = tcp_socket_inode(addr, local).filter(|i| *i != 0)?;
        (count(conn) == 1).then_some(())
    })
    .expect("the worker accepted the connection");
    server.signal(Signal::SIGTERM);
    // The drain has begun once the worker closed the listener, its runtime's duplicate and the
    // inherited descriptor both (a stopping tree stops listening).
    poll_until(Duration::from_secs(5), || {
        (count(listener) == 0).then_some(())
    })
    .expect("the worker stopped accepting");
    let r = client
        .get("/")
        .expect("the request on the fresh connection is answered");
    assert_eq!(r.status, 200);
    assert!(r.closes(), "{:?}", r.headers);
    let (_, closed) = client.read_until_closed(Duration::from_secs(5));
    assert!(closed, "and the server closes it");
    assert_eq!(server.exit_code_within(Duration::from_secs(10)), 0);
}

#[test]
fn idle_kept_alive_connections_are_kept_for_their_next_request_on_graceful_stop() {
    // A kept-alive connection idle when the drain begins may already carry the client's next
    // request: closing it at once would lose that request for a client that never retries. It is
    // kept until its next request, answered with `Connection: close`, or closed once idle for the
    // drain grace (1 s here; the idle deadline, keepalive_timeout, is 75 s), so idle clients do
    // not hold the stop long.
    let mut server = start(&["--workers", "1", "--drain-grace", "1"]);
    let [worker] = server.wait_workers(1, READY_TIMEOUT)[..] else {
        unreachable!()
    };
    let listener =
        tcp_socket_inode(server.tcp_addr(), "0.0.0.0:0".parse().unwrap()).expect("listener inode");
    let mut clients: Vec<Client> = (0..4)
        .map(|_| Client::connect(&server.addr()).unwrap())
        .collect();
    for c in &mut clients {
        let r = c.get("/").unwrap();
        assert_eq!(r.status, 200);
        assert!(!r.closes(), "kept alive before the drain: {:?}", r.headers);
    }
    let stop = Instant::now();
    server.signal(Signal::SIGTERM);
    // The drain has begun once the worker no longer holds the listener.
    poll_until(Duration::from_secs(5), || {
        (!socket_inodes(worker).contains(&listener)).then_some(())
    })
    .expect("the worker stopped accepting");
    let (talking, silent) = clients.split_at_mut(2);
    for c in talking {
        let r = c
            .request("POST", "/", &[], b"sent while the worker drains")
            .expect("the next request on an idle connection is answered during the drain");
        assert_eq!(r.status, 200);
        assert!(r.closes(), "and says `Connection: close`: {:?}", r.headers);
        let (rest, closed) = c.read_until_closed(Duration::from_secs(5));
        assert!(
            closed && rest.is_empty(),
            "then the server closes it: {rest:?}"
        );
    }
    for c in silent {
        let (rest, closed) = c.read_until_closed(Duration::from_secs(5));
        assert!(
            closed && rest.is_empty(),
            "silent ones are closed at the end of the drain grace"
        );
    }
    assert_eq!(server.exit_code_within(Duration::from_secs(5)), 0);
    assert!(
        stop.elapsed() < Duration::from_secs(4),
        "idle connections hold the stop no longer than the drain grace: {:?}",
        stop.elapsed()
    );
}

#[test]
fn request_timeout_answers_504() {
    let server = start(&["--workers", "1", "--request-timeout", "300ms"]);
    let started = Instant::now();
    let r = server.get("/sleep/5000");
    assert_eq!(r.status, 504);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(server.get("/sleep/10").status, 200);
}

/// The reference apps read no peer address and say so (`App::connect_info` returns false): their
/// requests carry no `tine::ConnectInfo`, so each skips the extensions map it would cost. An app
/// that keeps the default gets it on every request (tests/connect_info.rs).
#[test]
fn an_app_that_reads_no_peer_address_gets_no_connect_info() {
    let server = start(&["--workers", "1"]);
    let r = server.get("/connect-info");
    assert_eq!((r.status, r.text().as_str()), (200, "none\n"));
}

#[test]
fn debug_header_and_routes_are_off_by_default() {
    let server = Launch::tine().args(["--workers", "1"]).start();
    let r = server.get("/");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-tine-worker"), None);
    assert_eq!(server.get("/sleep/1").status, 404);
    assert_eq!(server.get("/crash").status, 404);
}

#[test]
fn http2_with_prior_knowledge() {
    let server = start(&["--workers", "1"]);
    let mut client = Client::connect(&server.addr()).unwrap();
    // The client preface, then an empty SETTINGS frame.
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    client.send(&preface).unwrap();
    let mut header = [0u8; 9];
    std::io::Read::read_exact(&mut client.stream, &mut header).expect("a frame from the server");
    assert_eq!(
        header[3], 0x4,
        "the server's first frame is SETTINGS: {header:?}"
    );
}

#[test]
fn http2_can_be_turned_off() {
    let server = start(&["--workers", "1", "--http2", "false"]);
    let mut client = Client::connect(&server.addr()).unwrap();
    client.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    let (got, _) = client.read_until_closed(Duration::from_secs(5));
    assert!(
        !got.starts_with(&[0, 0]) || got.len() < 9 || got[3] != 0x4,
        "no HTTP/2 SETTINGS frame: {got:?}"
    );
}

#[test]
fn a_crashing_request_kills_only_its_worker() {
    let server = start(&["--workers", "2"]);
    let before = server.wait_workers(2, READY_TIMEOUT);
    let mark = server.log.mark();
    // Aborted mid-request: no response, then a replacement.
    let r = get(&server.addr(), "/crash");
    assert!(r.is_err(), "no response from an aborted worker: {r:?}");
    server
        .log
        .wait_for_log_since(mark, "worker died", Duration::from_secs(5));
    let after = server.wait_workers(2, Duration::from_secs(10));
    assert_eq!(
        after.iter().filter(|p| before.contains(p)).count(),
        1,
        "one survivor, one replacement: {before:?} → {after:?}"
    );
    let report = load(&server.addr(), "/", 4, 10, false, Duration::from_secs(20));
    assert_eq!(report.status(200), 40, "{report:?}");
}
