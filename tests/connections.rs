//! What one client may hold of a worker (issue 11 item 4, issue 16 item 2): a request body the
//! client stops sending (`body_read_timeout`: 408 and close), the connections a worker accepts
//! (`max_connections`: the rest wait in the listen queue or go to other workers), and how long an
//! idle kept-alive HTTP/1.1 connection is kept (`keepalive_timeout`, distinct from the head
//! deadline). HTTP/2's idle GOAWAY is in tests/http2.rs.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::metrics::metrics_addr;
use common::*;

fn start(args: &[&str]) -> Server {
    Launch::tine()
        .args(["--debug-headers", "--debug-routes"])
        .args(args)
        .start()
}

/// Reads what the server sends until it closes (or `timeout`); returns it and when it closed.
fn until_closed(s: &mut TcpStream, timeout: Duration) -> (String, Option<Instant>) {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (String::from_utf8_lossy(&out).into(), None);
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut chunk) {
            Ok(0) => return (String::from_utf8_lossy(&out).into(), Some(Instant::now())),
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if is_closed_error(&e) => {
                return (String::from_utf8_lossy(&out).into(), Some(Instant::now()))
            }
            Err(_) => return (String::from_utf8_lossy(&out).into(), None),
        }
    }
}

/// Nothing arrives on `s` for `wait`, and it stays open.
fn assert_silent(s: &mut TcpStream, wait: Duration, what: &str) {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut byte = [0u8; 1];
    match s.read(&mut byte) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("{what}: expected silence, got {other:?} {byte:?}"),
    }
}

#[test]
fn a_body_trickled_then_stalled_is_answered_408_after_body_read_timeout() {
    let server = start(&["--workers", "1", "--body-read-timeout", "2"]);
    let mut s = TcpStream::connect(server.tcp_addr()).unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        .unwrap();
    // One byte a second for longer than the timeout: it is the time between two reads that is
    // limited, not the whole body's.
    let mut stalled = Instant::now();
    for byte in b"trickle" {
        s.write_all(&[*byte]).unwrap();
        stalled = Instant::now();
        assert_silent(&mut s, Duration::from_secs(1), "while the body trickles");
    }
    // Then the client stops sending: cut 2 s after the last byte (the sweep judges every second
    // here, so within 3 s).
    let (got, closed) = until_closed(&mut s, Duration::from_secs(10));
    let closed = closed.expect("the connection is closed");
    assert!(
        got.starts_with("HTTP/1.1 408 "),
        "answered 408 Request Timeout: {got:?}"
    );
    assert!(
        got.to_ascii_lowercase().contains("connection: close"),
        "{got:?}"
    );
    let took = closed - stalled;
    assert!(
        took >= Duration::from_millis(1900),
        "cut after {took:?}, before body_read_timeout"
    );
    assert!(took < Duration::from_secs(5), "cut only after {took:?}");
    // The worker serves on.
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn a_body_the_app_does_not_wait_for_is_not_cut() {
    // The app sleeps without reading the body it was sent whole: the client is not late, so
    // body_read_timeout does not apply (request_timeout would).
    let server = start(&["--workers", "1", "--body-read-timeout", "1"]);
    let mut c = Client::connect(&server.addr()).unwrap();
    let r = c
        .request("POST", "/sleep/2500", &[], b"a body nobody reads")
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    // And one the app reads whole, echoed.
    let r = c.request("POST", "/echo", &[], b"echo me").unwrap();
    assert_eq!((r.status, r.text()), (200, "echo me".to_string()));
}

/// Each worker's samples of a per-worker metric family, by pid.
fn per_worker(server: &Server, family: &str) -> Vec<(i32, u64)> {
    let r = get(&Addr::Tcp(metrics_addr(server)), "/metrics").expect("scrape");
    r.text()
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .map(|l| {
            let pid = l.split("pid=\"").nth(1).unwrap().split('"').next().unwrap();
            let value = l.rsplit_once(' ').unwrap().1;
            (pid.parse().unwrap(), value.parse().unwrap())
        })
        .collect()
}

#[test]
fn a_worker_holds_at_most_max_connections_and_the_queue_keeps_the_rest() {
    let server = start(&[
        "--workers",
        "2",
        "--max-connections",
        "64",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let workers = server.wait_workers(2, READY_TIMEOUT);
    let sockets_before: Vec<usize> = workers.iter().map(|p| socket_inodes(*p).len()).collect();
    // 300 idle clients: connected (the kernel completes the handshake for the listen queue),
    // sending nothing yet.
    let mut clients: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(server.tcp_addr()).expect("connect"))
        .collect();
    // Each worker fills up to its limit, then stops accepting.
    let held = poll_until(Duration::from_secs(15), || {
        let held = per_worker(&server, "tine_worker_connections");
        (held.len() == 2 && held.iter().all(|(_, n)| *n == 64)).then_some(held)
    })
    .unwrap_or_else(|| {
        panic!(
            "each worker holds 64: {:?}",
            per_worker(&server, "tine_worker_connections")
        )
    });
    // And holds no more, as its descriptors show too.
    for _ in 0..10 {
        for (pid, n) in per_worker(&server, "tine_worker_connections") {
            assert!(n <= 64, "worker {pid} holds {n}");
        }
        for (pid, before) in workers.iter().zip(&sockets_before) {
            let now = socket_inodes(*pid).len();
            assert!(
                now <= before + 64,
                "worker {pid}: {now} sockets, {before} before 300 clients"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for (pid, pauses) in per_worker(&server, "tine_worker_max_connections_reached_total") {
        assert!(pauses >= 1, "worker {pid} counted its pause: {held:?}");
    }
    // Every client now asks: the accepted ones are answered and closed, making room for the
    // queued ones, until all 300 are served. None is lost.
    for c in &mut clients {
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
    }
    let mut served = 0;
    for (i, c) in clients.iter_mut().enumerate() {
        let (got, closed) = until_closed(c, Duration::from_secs(20));
        assert!(
            closed.is_some() && got.starts_with("HTTP/1.1 200 "),
            "client {i}: {got:?}"
        );
        served += 1;
    }
    assert_eq!(served, 300);
}

#[test]
fn an_idle_kept_alive_connection_is_kept_for_keepalive_timeout_not_the_head_deadline() {
    let server = start(&[
        "--workers",
        "1",
        "--header-read-timeout",
        "1",
        "--keepalive-timeout",
        "3",
    ]);
    let mut c = Client::connect(&server.addr()).unwrap();
    assert_eq!(c.get("/").unwrap().status, 200);
    let idle = Instant::now();
    let mut s = match c.stream {
        Stream::Tcp(s) => s,
        Stream::Unix(_) => unreachable!(),
    };
    // Past the head deadline (1 s, the sweep judging every 0.5 s): still open.
    assert_silent(
        &mut s,
        Duration::from_millis(2200),
        "idle past header_read_timeout",
    );
    // Closed at keepalive_timeout.
    let (rest, closed) = until_closed(&mut s, Duration::from_secs(10));
    let closed = closed.expect("closed at keepalive_timeout");
    assert!(rest.is_empty(), "{rest:?}");
    let took = closed - idle;
    assert!(took >= Duration::from_millis(2900), "closed after {took:?}");
    assert!(took < Duration::from_secs(5), "closed only after {took:?}");
    // A new connection that sends nothing still gets only the head deadline.
    let mut silent = TcpStream::connect(server.tcp_addr()).unwrap();
    let connected = Instant::now();
    let (_, closed) = until_closed(&mut silent, Duration::from_secs(10));
    let took = closed.expect("a silent connection is cut") - connected;
    assert!(took < Duration::from_millis(2500), "cut after {took:?}");
}

#[test]
fn a_stalled_http2_request_body_ends_its_stream_with_408_and_the_connection_serves_on() {
    let server = start(&["--workers", "1", "--body-read-timeout", "1"]);
    let addr = server.tcp_addr();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let io = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut client, connection) = h2::client::handshake(io).await.unwrap();
        tokio::spawn(connection);
        let request = http::Request::post(format!("http://{addr}/echo"))
            .body(())
            .unwrap();
        let (response, mut body) = client.send_request(request, false).unwrap();
        body.send_data(bytes::Bytes::from_static(b"a first part"), false)
            .unwrap();
        // Then nothing more: the stream's body stalls (the stream stays open on our side).
        let stalled = Instant::now();
        let response = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("an answer in time")
            .unwrap();
        let took = stalled.elapsed();
        assert_eq!(response.status(), 408);
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(4),
            "408 after {took:?} (body_read_timeout 1 s)"
        );
        // The connection is not the stalled stream's: another request on it is served.
        client = client
            .ready()
            .await
            .expect("the connection is still usable");
        let request = http::Request::post(format!("http://{addr}/echo"))
            .body(())
            .unwrap();
        let (response, mut body) = client.send_request(request, false).unwrap();
        body.send_data(bytes::Bytes::from_static(b"whole"), true)
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("an answer in time")
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut got = Vec::new();
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            body.flow_control().release_capacity(chunk.len()).unwrap();
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, b"whole");
    });
}

#[test]
fn max_connections_caps_stream_handler_connections_too() {
    // raas: a raw stream handler, one line per connection.
    let server = Launch::example("raas")
        .args(["--workers", "1", "--max-connections", "2"])
        .start();
    let addr = server.tcp_addr();
    let line = |s: &mut TcpStream, text: &[u8]| {
        s.write_all(text).unwrap();
        until_closed(s, Duration::from_secs(10))
    };
    let mut first = TcpStream::connect(addr).unwrap();
    let mut second = TcpStream::connect(addr).unwrap();
    // Both accepted (an answer proves it for the second; the first is still waiting).
    assert_eq!(line(&mut second, b"ab\n").0, "ba\n");
    let mut held = TcpStream::connect(addr).unwrap();
    let mut queued = TcpStream::connect(addr).unwrap();
    queued.write_all(b"abc\n").unwrap();
    // Two open (first, held): the fourth waits in the listen queue, unanswered.
    assert_silent(
        &mut queued,
        Duration::from_secs(1),
        "beyond max_connections",
    );
    // One closes: the queued one is accepted and answered.
    assert_eq!(line(&mut first, b"x\n").0, "x\n");
    let (got, closed) = until_closed(&mut queued, Duration::from_secs(10));
    assert_eq!((got.as_str(), closed.is_some()), ("cba\n", true));
    assert_eq!(line(&mut held, b"yz\n").0, "zy\n");
}
