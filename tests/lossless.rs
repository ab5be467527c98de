//! Strictly lossless graceful paths: a client that never retries loses no request on any graceful
//! path of the tree (refork, reload, scale down, recycling, a worker's graceful stop, the server's
//! graceful stop).
//!
//! The load is [`StrictLoad`]: kept-alive connections sending POSTs with a body, each request
//! written once; a request written to a connection that the server then closed or reset without
//! a complete response is lost. Each test runs the load at 16 and at 256 connections across one
//! event, checks that the event really happened (a new generation, workers replaced, fewer
//! workers, the server gone), and asserts that nothing was lost.

mod common;

use std::time::Duration;

use common::status::{child_rows, Row};
use common::strict::{StrictLoad, StrictReport};
use common::{poll_until, Launch, Server};
use nix::sys::signal::Signal;

/// Upper bound of one load run; the tests stop it much sooner, once the event is over.
const LOAD_MAX: Duration = Duration::from_secs(60);
/// Longest wait for an event (a rollout, a reload, a recycle) to complete (debug build, 2 busy
/// cores, up to 256 connections of load).
const EVENT_TIMEOUT: Duration = Duration::from_secs(40);
/// Responses the load must have received before the event, and again after it.
const FLOWING: u64 = 300;

fn rows(server: &Server) -> Vec<Row> {
    child_rows(server, &server.status()).expect("processes")
}

/// A settled tree: one mold and `workers` serving workers numbered 0..workers, all of the
/// mold's generation, and its hot spare standing by, nothing else.
#[derive(Debug, Clone)]
struct Settled {
    generation: u64,
    workers: Vec<i32>,
}

/// Waits until the tree is settled with `workers` workers and `ok` accepts it.
fn wait_settled(server: &Server, workers: usize, ok: impl Fn(&Settled) -> bool) -> Settled {
    let mut last = Vec::new();
    let found = poll_until(EVENT_TIMEOUT, || {
        last = rows(server);
        let molds: Vec<_> = last.iter().filter(|r| r.role == "mold").collect();
        let mut ws: Vec<_> = last.iter().filter(|r| r.role == "worker").collect();
        ws.sort_by_key(|r| r.nr);
        let [mold] = molds[..] else { return None };
        // The hot spare (spare_workers 1 by default) stands by, refreshed from the mold.
        let spares: Vec<_> = last.iter().filter(|r| r.role == "spare").collect();
        let settled = mold.state == "mold"
            && last.len() == workers + 1 + spares.len()
            && spares.len() == 1
            && spares
                .iter()
                .all(|s| s.state == "standby" && s.generation == mold.generation)
            && ws.iter().enumerate().all(|(i, w)| {
                w.nr == Some(i as u64)
                    && w.generation == mold.generation
                    && (w.state == "ready" || w.state == "busy")
            });
        let s = Settled {
            generation: mold.generation,
            workers: ws.iter().map(|w| w.pid).collect(),
        };
        (settled && ok(&s)).then_some(s)
    });
    found.unwrap_or_else(|| {
        panic!(
            "the tree did not settle within {EVENT_TIMEOUT:?}: {last:?}\nlog:\n{}",
            server.log.text()
        )
    })
}

/// Waits until the strict load has received `n` more responses than `from`.
fn wait_answered(load: &StrictLoad, from: u64, n: u64, server: &Server) {
    poll_until(EVENT_TIMEOUT, || {
        (load.answered() >= from + n).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the load got {} responses, waiting for {}; log:\n{}",
            load.answered(),
            from + n,
            server.log.text()
        )
    });
}

/// Runs a strict load of `connections` against `server`'s first address: waits until it flows,
/// runs `event` (which makes the event happen and waits until it is complete), waits until the
/// load flows again, and stops it.
fn across(server: &Server, connections: usize, event: impl FnOnce()) -> StrictReport {
    let load = StrictLoad::start(&server.addr(), connections, "/", LOAD_MAX);
    wait_answered(&load, 0, FLOWING, server);
    event();
    wait_answered(&load, load.answered(), FLOWING, server);
    load.stop()
}

/// Asserts that nothing was lost and every response was a 200.
fn assert_lossless(report: &StrictReport, what: &str, server: &Server) {
    assert!(
        report.lost.is_empty() && report.status(200) == report.answered,
        "{what}: {}\nlog:\n{}",
        report.summary(),
        server.log.text()
    );
    eprintln!("{what}: {}", report.summary());
}

fn start(workers: usize, extra: &[&str]) -> Server {
    Launch::tine()
        .args(["--workers", &workers.to_string()])
        .args(extra)
        .start()
}

/// Waits until the log shows `n` workers that exited after being recycled for `reason` (a prefix
/// of the logged reason, e.g. `max_requests`), each with exit code 0 (a graceful stop).
fn wait_recycled(server: &Server, reason: &str, n: usize) {
    let pattern = format!("reason={reason}");
    let exited = |l: &String| l.contains("worker exited") && l.contains(&pattern);
    poll_until(EVENT_TIMEOUT, || {
        (server.log.lines().iter().filter(|l| exited(l)).count() >= n).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "not {n} workers recycled for {reason} within {EVENT_TIMEOUT:?}; log:\n{}",
            server.log.text()
        )
    });
    for line in server.log.lines().iter().filter(|l| exited(l)) {
        assert!(
            line.contains("how=exit code 0"),
            "not a graceful exit: {line}"
        );
    }
}

/// One test per connection count: `mod NAME { c16, c256 }`.
macro_rules! at_16_and_256 {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn c16() {
                super::$name(16);
            }
            #[test]
            fn c256() {
                super::$name(256);
            }
        }
    )*};
}

at_16_and_256!(
    refork,
    reload,
    scale_down_ttou,
    scale_down_ctl,
    recycle_max_requests,
    recycle_memory,
    recycle_cpu,
    recycle_lifetime,
);

/// TERM under load: every request written is answered. Connections a client opens after the stop
/// began are refused, never queued to be reset when the last process lets go of the socket (the
/// mold exiting after every worker took its queue did that: 3 of 441 lost at 16 connections, and
/// 256 of 1,223 at 256 in one of 40 local runs).
mod graceful_stop {
    #[test]
    fn c16() {
        super::graceful_stop(16);
    }
    #[test]
    fn c256() {
        super::graceful_stop(256);
    }
}

/// USR2, three times: each time a worker is promoted to the next generation's mold and every
/// worker is rolled over.
fn refork(connections: usize) {
    let server = start(3, &[]);
    let mut before = wait_settled(&server, 3, |_| true);
    let report = across(&server, connections, || {
        for _ in 0..3 {
            server.signal(Signal::SIGUSR2);
            let after = wait_settled(&server, 3, |s| s.generation == before.generation + 1);
            assert!(after.workers.iter().all(|w| !before.workers.contains(w)));
            before = after;
        }
    });
    assert_lossless(
        &report,
        &format!("3 × USR2 refork, {connections} connections"),
        &server,
    );
}

/// HUP, twice: each time the monitor re-executes itself, a new mold is preloaded and every
/// worker is replaced.
fn reload(connections: usize) {
    let server = start(3, &[]);
    let mut before = wait_settled(&server, 3, |_| true);
    let report = across(&server, connections, || {
        for _ in 0..2 {
            let mark = server.log.mark();
            server.signal(Signal::SIGHUP);
            server
                .log
                .wait_for_log_since(mark, "reload complete", EVENT_TIMEOUT);
            let after = wait_settled(&server, 3, |s| {
                s.workers.iter().all(|w| !before.workers.contains(w))
            });
            for pid in &before.workers {
                poll_until(EVENT_TIMEOUT, || common::gone(*pid).then_some(()))
                    .unwrap_or_else(|| panic!("old worker {pid} still there after the reload"));
            }
            before = after;
        }
    });
    assert_lossless(
        &report,
        &format!("2 × HUP reload, {connections} connections"),
        &server,
    );
}

/// TTOU, three times: from 4 workers to 1, one at a time.
fn scale_down_ttou(connections: usize) {
    let server = start(4, &[]);
    wait_settled(&server, 4, |_| true);
    let report = across(&server, connections, || {
        for n in (1..4).rev() {
            server.signal(Signal::SIGTTOU);
            wait_settled(&server, n, |_| true);
        }
    });
    assert_lossless(
        &report,
        &format!("3 × TTOU, {connections} connections"),
        &server,
    );
}

/// `ctl scale`: from 5 workers to 2, then to 1.
fn scale_down_ctl(connections: usize) {
    let server = start(5, &[]);
    wait_settled(&server, 5, |_| true);
    let report = across(&server, connections, || {
        for n in [2, 1] {
            server.ctl(&["scale", &n.to_string()]).expect("ctl scale");
            wait_settled(&server, n, |_| true);
        }
    });
    assert_lossless(
        &report,
        &format!("ctl scale 5→2→1, {connections} connections"),
        &server,
    );
}

/// max_requests: workers recycled again and again under the load.
fn recycle_max_requests(connections: usize) {
    let server = start(3, &["--max-requests", "200"]);
    let report = across(&server, connections, || {
        wait_recycled(&server, "max_requests", 8);
    });
    assert_lossless(
        &report,
        &format!("max_requests, {connections} connections"),
        &server,
    );
}

/// max_rss_mb: a limit below what a worker needs, so that every worker is recycled soon after
/// it starts, again and again.
fn recycle_memory(connections: usize) {
    let server = start(3, &["--max-rss-mb", "1"]);
    let report = across(&server, connections, || {
        wait_recycled(&server, "max_rss_mb", 8);
    });
    assert_lossless(
        &report,
        &format!("max_rss_mb, {connections} connections"),
        &server,
    );
}

/// max_cpu_seconds: workers recycled once they have used a second of CPU serving the load.
fn recycle_cpu(connections: usize) {
    let server = start(3, &["--max-cpu-seconds", "1"]);
    let report = across(&server, connections, || {
        wait_recycled(&server, "max_cpu_seconds", 4);
    });
    assert_lossless(
        &report,
        &format!("max_cpu_seconds, {connections} connections"),
        &server,
    );
}

/// max_lifetime: every worker recycled each second.
fn recycle_lifetime(connections: usize) {
    let server = start(3, &["--max-lifetime", "1"]);
    let report = across(&server, connections, || {
        wait_recycled(&server, "max_lifetime", 8);
    });
    assert_lossless(
        &report,
        &format!("max_lifetime, {connections} connections"),
        &server,
    );
}

/// TERM: the whole server stops gracefully. Every request written to a connection it accepted is
/// answered (new connections are refused once it stops listening).
fn graceful_stop(connections: usize) {
    let mut server = start(3, &[]);
    wait_settled(&server, 3, |_| true);
    let load = StrictLoad::start(&server.addr(), connections, "/", LOAD_MAX);
    wait_answered(&load, 0, FLOWING, &server);
    server.signal(Signal::SIGTERM);
    let code = server.exit_code_within(EVENT_TIMEOUT);
    assert_eq!(code, 0, "log:\n{}", server.log.text());
    let report = load.stop();
    assert_drained_by_itself(&server);
    assert_lossless(
        &report,
        &format!("TERM, {connections} connections"),
        &server,
    );
}

/// Idle kept-alive connections do not hold a promotion: a promoted worker keeps them at most a
/// quarter of `spawn_timeout` (it must be a mold within `spawn_timeout`), even when `drain_grace`
/// (here the idle deadline, 20 s) is longer. Held for the whole grace, the promotion would be
/// killed as "not ready within spawn_timeout" (4 s here) and the refork would never complete.
#[test]
fn idle_connections_do_not_hold_a_promotion() {
    let server = start(2, &["--header-read-timeout", "20", "--spawn-timeout", "4"]);
    let before = wait_settled(&server, 2, |_| true);
    // Idle kept-alive connections on the workers (new connections go to whichever is free).
    let mut idle: Vec<common::Client> = (0..6)
        .map(|_| common::Client::connect(&server.addr()).expect("connect"))
        .collect();
    for c in &mut idle {
        let r = c.get("/").expect("GET");
        assert!(r.status == 200 && !r.closes(), "{r:?}");
    }
    server.signal(Signal::SIGUSR2);
    let after = wait_settled(&server, 2, |s| s.generation == before.generation + 1);
    assert!(after.workers.iter().all(|w| !before.workers.contains(w)));
    for trouble in ["not ready within spawn_timeout", "promotion failed"] {
        assert_eq!(
            server.log.count(trouble),
            0,
            "{trouble:?}; log:\n{}",
            server.log.text()
        );
    }
}

/// HTTP/2: a draining worker sends `GOAWAY` and answers every stream up to the last one it names;
/// the strict HTTP/2 client ([`StrictH2Load`]) counts a stream above it as refused (sent again on
/// a new connection by any client) and any other stream left without a complete response as lost.
/// 8 connections of 4 concurrent streams each.
mod http2 {
    use super::*;
    use common::strict_h2::{H2Report, StrictH2Load};

    const CONNECTIONS: usize = 8;
    const STREAMS: usize = 4;

    fn wait_answered(load: &StrictH2Load, from: u64, server: &Server) {
        poll_until(EVENT_TIMEOUT, || {
            (load.answered() >= from + FLOWING).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "the HTTP/2 load got {} responses, waiting for {}; log:\n{}",
                load.answered(),
                from + FLOWING,
                server.log.text()
            )
        });
    }

    fn assert_lossless(report: &H2Report, what: &str, server: &Server) {
        eprintln!("{what}: {}", report.summary());
        assert!(
            report.lost.is_empty() && report.by_status.get(&200) == Some(&report.answered),
            "{what}: {}\nlog:\n{}",
            report.summary(),
            server.log.text()
        );
        // Every connection of the start was drained (its worker replaced or stopped): the
        // GOAWAYs happened, the test did not pass by not meeting one.
        assert!(
            report.connections_ended >= CONNECTIONS as u64,
            "{what}: the connections were not drained: {}",
            report.summary()
        );
    }

    /// USR2 three times: every worker is replaced each time, each of its connections drained.
    #[test]
    fn refork() {
        let server = start(3, &[]);
        let mut before = wait_settled(&server, 3, |_| true);
        let load = StrictH2Load::start(server.tcp_addr(), CONNECTIONS, STREAMS, "/", LOAD_MAX);
        wait_answered(&load, 0, &server);
        for _ in 0..3 {
            server.signal(Signal::SIGUSR2);
            let after = wait_settled(&server, 3, |s| s.generation == before.generation + 1);
            assert!(after.workers.iter().all(|w| !before.workers.contains(w)));
            before = after;
        }
        wait_answered(&load, load.answered(), &server);
        let report = load.stop();
        assert_lossless(&report, "HTTP/2, 3 × USR2 refork", &server);
    }

    /// TERM: the whole tree drains its HTTP/2 connections and exits by itself.
    #[test]
    fn graceful_stop() {
        let mut server = start(3, &[]);
        wait_settled(&server, 3, |_| true);
        let load = StrictH2Load::start(server.tcp_addr(), CONNECTIONS, STREAMS, "/", LOAD_MAX);
        wait_answered(&load, 0, &server);
        server.signal(Signal::SIGTERM);
        let code = server.exit_code_within(EVENT_TIMEOUT);
        assert_eq!(code, 0, "log:\n{}", server.log.text());
        let report = load.stop();
        assert_drained_by_itself(&server);
        assert_lossless(&report, "HTTP/2, TERM", &server);
    }
}

/// The server-side state (`st` of `/proc/net/tcp`, `03` for `SYN_RECV`) of the connection from
/// local port `client` to `server`, if the kernel lists it.
fn server_side_state(server: std::net::SocketAddr, client: u16) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let port = |field: &str| u16::from_str_radix(field.rsplit(':').next()?, 16).ok();
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (port(f.get(1)?)? == server.port() && port(f.get(2)?)? == client)
            .then(|| f.get(3).map(|s| s.to_string()))?
    })
}

/// A client whose TCP handshake is still under way when TERM comes (its final ACK not arrived:
/// a client a round trip away, or one that holds the ACK back until it sends — here `TCP_QUICKACK`
/// off, so the ACK leaves with the delayed-ACK timer, up to 200 ms later) is served, not reset.
/// The client already sees its connection open; if every worker had taken its queue for the last
/// time and let go of the socket before the ACK came, the connection would be reset with the
/// request on its way. The tree waits for such handshakes before its workers stop.
#[test]
fn graceful_stop_serves_a_connection_whose_handshake_is_under_way() {
    use std::io::{Read, Write};
    let mut server = start(2, &[]);
    wait_settled(&server, 2, |_| true);
    let addr = server.tcp_addr();
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("a socket");
    socket.set_quickack(false).expect("TCP_QUICKACK off");
    socket.connect(&addr.into()).expect("connect");
    let local = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("the client's address")
        .port();
    assert_eq!(
        server_side_state(addr, local).as_deref(),
        Some("03"),
        "the handshake should still be under way on the server's side (SYN_RECV)"
    );
    server.signal(Signal::SIGTERM);
    // The handshake completes when the client's ACK leaves (the delayed-ACK timer).
    poll_until(EVENT_TIMEOUT, || {
        (server_side_state(addr, local).as_deref() != Some("03")).then_some(())
    })
    .expect("the handshake ends");
    let mut stream = std::net::TcpStream::from(socket);
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a read timeout");
    let body = "strict=1";
    let request = format!(
        "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut response = Vec::new();
    let result = stream
        .write_all(request.as_bytes())
        .and_then(|()| stream.read_to_end(&mut response));
    // Closed here: the worker's lingering close would wait for it.
    drop(stream);
    let text = String::from_utf8_lossy(&response);
    assert!(
        result.is_ok() && text.starts_with("HTTP/1.1 200"),
        "the request on the connection whose handshake was under way at TERM: {result:?}, response {text:?}; log:\n{}",
        server.log.text()
    );
    assert_eq!(
        server.exit_code_within(EVENT_TIMEOUT),
        0,
        "log:\n{}",
        server.log.text()
    );
}

/// The stop's drain ended by itself: nothing was left for the monitor to kill at the end.
fn assert_drained_by_itself(server: &Server) {
    assert!(
        server
            .log
            .find("stopped (remaining processes killed")
            .is_none(),
        "the drain did not end by itself; log:\n{}",
        server.log.text()
    );
}
