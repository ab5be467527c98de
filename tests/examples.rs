//! The examples, run as real programs: `raas` (reverse-a-string over raw TCP) with a real socket
//! client, and `axum` (an axum Router under tine).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::websocket;
use common::*;
use nix::sys::signal::Signal;

/// One RAAS request: connect, send `input`, (optionally) shut down the writing half, read until
/// the server closes.
fn raas(addr: SocketAddr, input: &[u8], shutdown_write: bool) -> String {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(input).expect("send");
    if shutdown_write {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .expect("read until the server closes");
    String::from_utf8(out).expect("UTF-8 answer")
}

#[test]
fn raas_reverses_a_line_per_connection() {
    let mut server = Launch::example("raas").args(["--workers", "2"]).start();
    let addr = server.tcp_addr();
    assert_eq!(
        raas(addr, b"hello\n", false),
        "olleh\n",
        "one line in, reversed, then the server closes"
    );
    assert_eq!(
        raas(addr, b"h\xc3\xa9llo w\xc3\xb6rld\r\n", false),
        "dlr\u{f6}w oll\u{e9}h\n",
        "by characters, CRLF accepted"
    );
    assert_eq!(
        raas(addr, b"no newline", true),
        "enilwen on\n",
        "a last line ended by EOF"
    );
    assert_eq!(raas(addr, b"\n", false), "\n");
    assert_eq!(
        raas(addr, b"first\nsecond\n", false),
        "tsrif\n",
        "one request per connection"
    );
    assert_eq!(raas(addr, b"", true), "", "nothing sent, nothing answered");
    // The process tree is tine's, with the example binary as its program.
    let titles: Vec<String> = server.tree().into_iter().map(|p| p.title).collect();
    assert!(
        titles.contains(&"tine mold (gen:0)".to_string()),
        "{titles:?}"
    );
    assert!(
        titles.contains(&"tine worker[1] (gen:0)".to_string()),
        "{titles:?}"
    );
    server.signal(Signal::SIGTERM);
    assert_eq!(server.exit_code_within(Duration::from_secs(10)), 0);
}

#[test]
fn raas_serves_concurrent_clients_across_workers() {
    let server = Launch::example("raas").args(["--workers", "2"]).start();
    let addr = server.tcp_addr();
    let deadline = Instant::now() + Duration::from_secs(30);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                s.spawn(move || {
                    for i in 0..25 {
                        assert!(Instant::now() < deadline, "load took too long");
                        let input = format!("client {t} request {i} ☃\n");
                        let expected: String =
                            input.trim_end().chars().rev().collect::<String>() + "\n";
                        assert_eq!(raas(addr, input.as_bytes(), false), expected);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("client thread");
        }
    });
    // Both workers took connections: the scoreboard counts them.
    let status = server.status();
    let counts: Vec<u64> = status["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["role"] == "worker")
        .map(|p| p["requests"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(counts.iter().sum::<u64>(), 200, "{status}");
    assert!(
        counts.iter().all(|c| *c > 0),
        "connections spread over the workers: {counts:?}"
    );
}

#[test]
fn raas_cuts_off_a_client_that_never_finishes_its_line() {
    let server = Launch::example("raas")
        .args(["--workers", "1", "--header-read-timeout", "1"])
        .start();
    let mut s = TcpStream::connect(server.tcp_addr()).unwrap();
    s.write_all(b"half a li").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    let r = s.read_to_end(&mut out);
    assert!(
        r.is_ok() || r.as_ref().is_err_and(is_closed_error),
        "closed by the server, not timed out: {r:?}"
    );
    assert!(out.is_empty(), "no answer to an unfinished line: {out:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    // Others are served meanwhile and after.
    assert_eq!(raas(server.tcp_addr(), b"abc\n", false), "cba\n");
}

#[test]
fn raas_long_lines_get_an_error() {
    let server = Launch::example("raas").args(["--workers", "1"]).start();
    let long = vec![b'x'; 100 * 1024];
    let mut s = TcpStream::connect(server.tcp_addr()).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    // The server may close before reading everything: a failed write is fine, the answer counts.
    let _ = s.write_all(&long);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("error: line longer than"), "{out:?}");
}

#[test]
fn axum_router_under_tine() {
    let mut server = Launch::example("axum")
        .args(["--workers", "2", "--debug-headers"])
        .start();
    let r = server.get("/");
    assert_eq!((r.status, r.text().as_str()), (200, "hello from axum\n"));
    let r = server.get("/users/7");
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|t| t.starts_with("application/json")));
    let user: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
    assert_eq!(user, serde_json::json!({"id": 7, "name": "user-7"}));
    assert_eq!(
        server.get("/users/5000").status,
        404,
        "the handler's own 404"
    );
    assert_eq!(
        server.get("/users/not-a-number").status,
        400,
        "axum's path rejection"
    );
    assert_eq!(server.get("/no/such/route").status, 404);
    let mut client = Client::connect(&server.addr()).unwrap();
    let r = client
        .request(
            "POST",
            "/echo",
            &[("Content-Type", "text/plain")],
            "some text ✓".as_bytes(),
        )
        .unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "some text ✓"));
    let r = client.request("GET", "/echo", &[], b"").unwrap();
    assert_eq!(
        r.status, 405,
        "method not allowed, on the same kept-alive connection"
    );
    // /whoami is answered by the worker whose pid tine's debug header names.
    let r = client.get("/whoami").unwrap();
    let who: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
    assert_eq!(who["pid"].as_i64(), r.worker().map(i64::from), "{who}");
    assert_eq!(who["generation"], 0);
    // Concurrent load reaches both workers.
    let workers = server.wait_workers(2, READY_TIMEOUT);
    let report = load(&server.addr(), "/", 8, 40, false, Duration::from_secs(30));
    assert_eq!(report.status(200), 320, "{report:?}");
    assert!(report.by_worker.len() >= 2, "{report:?}");
    assert!(
        report.by_worker.keys().all(|p| workers.contains(p)),
        "{report:?} vs {workers:?}"
    );
    // Idle, the kept-alive client would be kept for its next request for drain_grace (10 s).
    drop(client);
    server.signal(Signal::SIGTERM);
    assert_eq!(server.exit_code_within(Duration::from_secs(10)), 0);
}

/// The worker's `in_flight` and `requests` in `ctl status` (one worker).
fn lone_worker_counts(server: &Server) -> (u64, u64) {
    let status = server.status();
    let workers: Vec<_> = status["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .filter(|p| p["role"] == "worker")
        .map(|p| {
            (
                p["in_flight"].as_u64().unwrap_or(u64::MAX),
                p["requests"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect();
    assert_eq!(workers.len(), 1, "{status}");
    workers[0]
}

/// Waits until the lone worker's (in_flight, requests) are `want`; panics with the last seen.
fn wait_counts(server: &Server, want: (u64, u64), why: &str) {
    let mut last = (0, 0);
    let found = poll_until(Duration::from_secs(5), || {
        last = lone_worker_counts(server);
        (last == want).then_some(())
    });
    assert!(
        found.is_some(),
        "{why}: (in_flight, requests) is {last:?}, not {want:?}; log:\n{}",
        server.log.text()
    );
}

/// Reads until the server closes; an error that means "closed" counts as the end.
fn read_until_closed(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let r = s.read_to_end(&mut out);
    assert!(
        r.is_ok() || r.as_ref().is_err_and(is_closed_error),
        "closed by the server, not timed out: {r:?} after {out:?}"
    );
    String::from_utf8(out).expect("UTF-8 answer")
}

/// Asserts that the tree exits with status 0 within 10 s of `started` (the graceful stop's
/// signal): long before the tests' graceful_timeout of 30 s.
fn assert_exits_0_within_10_s(server: &mut Server, started: Instant) {
    assert_eq!(server.exit_code_within(Duration::from_secs(10)), 0);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// Asserts that the log never says a worker was still alive after graceful_timeout (the monitor
/// kills such a worker; a handler that watches `Worker::shutdown` lets it end sooner).
fn assert_no_worker_was_killed_at_graceful_timeout(server: &Server) {
    assert_eq!(
        server.log.count("still alive after graceful_timeout"),
        0,
        "{}",
        server.log.text()
    );
}

/// A stream handler that watches `Worker::shutdown` lets its worker drain promptly: on TERM, a
/// client half-way through its line still gets its answer, a client that sent nothing is told
/// the server is going away after `drain_grace`, and the tree exits long before graceful_timeout
/// (before, the silent client held the worker until the monitor killed it at graceful_timeout).
#[test]
fn raas_tells_waiting_clients_and_exits_on_a_graceful_stop() {
    let mut server = Launch::example("raas")
        .args(["--workers", "1", "--header-read-timeout", "60"])
        .args(["--graceful-timeout", "30", "--drain-grace", "2"])
        .start();
    server.wait_workers(1, READY_TIMEOUT);
    let addr = server.tcp_addr();
    let connect = || {
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s
    };
    let mut silent = connect();
    let mut halfway = connect();
    halfway.write_all(b"hel").unwrap();
    wait_counts(&server, (2, 0), "both connections are in the handler");
    let started = Instant::now();
    server.signal(Signal::SIGTERM);
    halfway.write_all(b"lo\n").unwrap();
    assert_eq!(
        read_until_closed(&mut halfway),
        "olleh\n",
        "a line that was on its way is answered"
    );
    assert_eq!(
        read_until_closed(&mut silent),
        "error: server going away\n",
        "a client that sent nothing is told, then closed"
    );
    assert_exits_0_within_10_s(&mut server, started);
    assert_no_worker_was_killed_at_graceful_timeout(&server);
}

/// A stream handler that panics ends its own connection, nothing more: the panic is logged, the
/// worker's in-flight count goes back to zero (it was stuck at one), the worker goes on serving
/// and still stops gracefully.
#[test]
fn stream_handler_panic_ends_its_connection_only() {
    let mut server = Launch::example("stream_panic")
        .args(["--workers", "1"])
        .start();
    server.wait_workers(1, READY_TIMEOUT);
    let addr = server.tcp_addr();
    let send = |line: &[u8]| {
        let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.write_all(line).unwrap();
        read_until_closed(&mut s)
    };
    assert_eq!(
        send(b"panic\n"),
        "",
        "the panicking handler's connection is closed"
    );
    wait_counts(&server, (0, 1), "the panicked connection has ended");
    server
        .log
        .wait_for_log("stream handler panicked", IO_TIMEOUT);
    assert_eq!(send(b"hi\n"), "ok\n", "the worker goes on serving");
    wait_counts(&server, (0, 2), "both connections have ended");
    let pids = server.wait_workers(1, READY_TIMEOUT);
    server.signal(Signal::SIGTERM);
    assert_eq!(server.exit_code_within(Duration::from_secs(10)), 0);
    assert!(gone(pids[0]));
}

/// Opens `/ws` of the axum example and checks it echoes.
fn axum_websocket(server: &Server) -> websocket::WebSocket {
    let mut ws = websocket::WebSocket::connect(server.tcp_addr(), "/ws", IO_TIMEOUT);
    assert_eq!(ws.round_trip("hello ✓", IO_TIMEOUT), "hello ✓");
    ws
}

/// How long a client takes to answer the server's close frame in these tests: the drain must
/// wait for it (the example's handler gives it 2 s).
const SLOW_CLOSE_REPLY: Duration = Duration::from_secs(1);

/// Asserts that the server ends `ws` with a close frame `1001 going away` (before, the connection
/// was cut without one when the worker's runtime went), that the drain waits for the closing
/// handshake while the client takes its time to answer (`still_draining` stays true meanwhile),
/// and that the connection then ends cleanly.
fn assert_going_away(
    ws: &mut websocket::WebSocket,
    server: &Server,
    still_draining: impl Fn() -> bool,
) {
    let close = ws.until_close(Duration::from_secs(10));
    assert_eq!(
        close.code(),
        Some(1001),
        "a close frame 1001 (going away) before the end: {close:?}; log:\n{}",
        server.log.text()
    );
    // A slow client: the upgraded connection is still in flight, so the drain is not over. (A
    // bounded watch for something that must not happen, not a wait.)
    let ended_early = poll_until(SLOW_CLOSE_REPLY, || (!still_draining()).then_some(()));
    assert!(
        ended_early.is_none(),
        "the drain ended before the WebSocket's closing handshake; log:\n{}",
        server.log.text()
    );
    let end = ws.until_end(Duration::from_secs(10));
    assert_eq!(
        end.then, None,
        "a clean end after the closing handshake: {end:?}"
    );
}

/// A WebSocket open when the server stops gracefully is told `1001 going away`; the worker waits
/// for its closing handshake and exits at once after (not killed at graceful_timeout).
#[test]
fn axum_websocket_is_told_going_away_on_a_graceful_stop() {
    let mut server = Launch::example("axum")
        .args(["--workers", "1", "--graceful-timeout", "30"])
        .start();
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    let mut ws = axum_websocket(&server);
    let started = Instant::now();
    server.signal(Signal::SIGTERM);
    assert_going_away(&mut ws, &server, || !gone(worker));
    assert_exits_0_within_10_s(&mut server, started);
    assert!(gone(worker));
    assert_no_worker_was_killed_at_graceful_timeout(&server);
}

/// A WebSocket open on the worker that a refork promotes is told `1001 going away`; the
/// promotion waits for its closing handshake and completes at once after: the worker becomes the
/// gen:1 mold and a gen:1 worker serves WebSockets.
#[test]
fn axum_websocket_is_told_going_away_on_a_refork() {
    let server = Launch::example("axum")
        .args(["--workers", "1", "--graceful-timeout", "30"])
        .start();
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    let mut ws = axum_websocket(&server);
    let started = Instant::now();
    server.signal(Signal::SIGUSR2);
    assert_going_away(&mut ws, &server, || {
        title(worker).is_some_and(|t| t.starts_with("tine worker["))
    });
    // The promoted worker is the gen:1 mold, and one gen:1 worker serves.
    let mut last = serde_json::Value::Null;
    let settled = poll_until(Duration::from_secs(15), || {
        last = server.status();
        let procs: Vec<_> = last["processes"]
            .as_array()?
            .iter()
            .filter(|p| p["role"] != "monitor")
            .cloned()
            .collect();
        let mold = procs.iter().find(|p| p["role"] == "mold")?;
        let workers: Vec<_> = procs.iter().filter(|p| p["role"] == "worker").collect();
        // And the hot spare (spare_workers 1 by default), refreshed from the new mold.
        let spares: Vec<_> = procs.iter().filter(|p| p["role"] == "spare").collect();
        (procs.len() == 3
            && spares.len() == 1
            && spares[0]["generation"] == 1
            && spares[0]["state"] == "standby"
            && mold["pid"].as_i64() == Some(worker.into())
            && mold["generation"] == 1
            && workers.len() == 1
            && workers[0]["generation"] == 1
            && workers[0]["state"] == "ready")
            .then_some(())
    });
    assert!(
        settled.is_some(),
        "worker {worker} promoted to the gen:1 mold: {last}; log:\n{}",
        server.log.text()
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    drop(axum_websocket(&server));
}

/// A WebSocket handshake that reaches a worker already draining (on a connection it had taken but
/// whose first request came after the drain began) still upgrades, and is told `1001 going away`
/// at once. Before, the drain's `Connection: close` replaced the 101's `Connection: upgrade` and
/// the client's handshake failed.
#[test]
fn axum_websocket_handshake_during_a_drain_upgrades_then_goes_away() {
    let mut server = Launch::example("axum")
        .args(["--workers", "1", "--graceful-timeout", "30"])
        .start();
    server.wait_workers(1, READY_TIMEOUT);
    let mut first = axum_websocket(&server);
    let late = TcpStream::connect_timeout(&server.tcp_addr(), IO_TIMEOUT).expect("connect");
    server.signal(Signal::SIGTERM);
    // The first WebSocket's close frame says the drain has begun; leaving it unanswered for now
    // keeps the worker draining (the example waits up to 2 s for the reply).
    assert_eq!(
        first.until_close(Duration::from_secs(10)).code(),
        Some(1001)
    );
    let mut ws = websocket::WebSocket::handshake(late, "/ws", IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", server.log.text()));
    let ending = ws.until_end(Duration::from_secs(10));
    assert_eq!(ending.code(), Some(1001), "{ending:?}");
    assert_eq!(ending.then, None, "{ending:?}");
    let ending = first.until_end(Duration::from_secs(10));
    assert_eq!(ending.then, None, "{ending:?}");
    assert_eq!(server.exit_code_within(Duration::from_secs(10)), 0);
}

/// A reload (HUP) rolls every worker over: a WebSocket open on an old worker is told
/// `1001 going away`, the old worker waits for its closing handshake and exits, and a worker of
/// the reloaded tree serves WebSockets.
#[test]
fn axum_websocket_is_told_going_away_on_a_reload() {
    let server = Launch::example("axum")
        .args(["--workers", "1", "--graceful-timeout", "30"])
        .start();
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    let mut ws = axum_websocket(&server);
    server.signal(Signal::SIGHUP);
    assert_going_away(&mut ws, &server, || !gone(worker));
    let mut last = Vec::new();
    let replaced = poll_until(Duration::from_secs(15), || {
        last = server.workers();
        (last.len() == 1 && last[0].1 != worker && last[0].2 == "ready").then_some(())
    });
    assert!(
        replaced.is_some() && gone(worker),
        "worker {worker} replaced: {last:?}; log:\n{}",
        server.log.text()
    );
    drop(axum_websocket(&server));
    assert_no_worker_was_killed_at_graceful_timeout(&server);
}

/// A response that never ends by itself (server-sent events) ends when its worker drains, because
/// the handler watches `Worker::shutdown`: the client gets a last `bye` event and the end of the
/// chunked body, and once it lets go of the connection (as `curl -N` does when the response ends)
/// the worker exits at once instead of at graceful_timeout.
#[test]
fn axum_event_stream_ends_with_bye_on_a_graceful_stop() {
    let mut server = Launch::example("axum")
        .args(["--workers", "1", "--graceful-timeout", "30"])
        .start();
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    let mut s = TcpStream::connect_timeout(&server.tcp_addr(), IO_TIMEOUT).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(b"GET /events HTTP/1.1\r\nHost: tine\r\n\r\n")
        .unwrap();
    let mut head = Vec::new();
    let mut buf = [0; 4096];
    while !String::from_utf8_lossy(&head).contains("data: 0") {
        let n = s.read(&mut buf).expect("the first event");
        assert!(n > 0, "closed before the first event: {head:?}");
        head.extend_from_slice(&buf[..n]);
    }
    let started = Instant::now();
    server.signal(Signal::SIGTERM);
    let mut rest = Vec::new();
    while !rest.ends_with(b"\r\n0\r\n\r\n") {
        let n = s.read(&mut buf).expect("the end of the event stream");
        assert!(n > 0, "closed before the end of the body: {rest:?}");
        rest.extend_from_slice(&buf[..n]);
    }
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.contains("event: bye\ndata: server going away\n"),
        "{rest:?}"
    );
    drop(s);
    assert_exits_0_within_10_s(&mut server, started);
    assert!(gone(worker));
}
