//! gRPC as a tested citizen (issue 16): `examples/grpc.rs`, a tonic service served by tine through
//! `tonic::service::Routes`, driven by real tonic clients (the code generated from
//! `examples/grpc/greeter.proto`, tonic's codec, HTTP/2 by hyper).
//!
//! - unary, failing (`INVALID_ARGUMENT` and its message) and server-streaming calls arrive whole;
//! - a method learns its caller: `tonic::Request::remote_addr()` on TCP, tonic's `UdsConnectInfo`
//!   (the client's credentials) on a unix socket;
//! - the client's deadline (`grpc-timeout`) is enforced by the server: a call with a 50 ms
//!   deadline against a 10 s method ends with `DEADLINE_EXCEEDED` promptly, as does a stream that
//!   outlives its deadline;
//! - across a `HUP` reload and a `USR2` refork under load (a tonic `Channel` and hyper-util's
//!   pooled client), every unary call and every 100-message stream completes: 0 failures,
//!   counted, streams under way when their worker began to drain included. Calls the server
//!   provably did not run (cancelled unsent, or refused by a GOAWAY) are sent again, as gRPC's
//!   own clients do transparently and tonic does not, and counted apart.
//!
//! Needs tine's `tonic` feature (the example does): `cargo test --features tonic --test grpc`.

#![cfg(feature = "tonic")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::status::child_rows;
use common::{poll_until, Launch, Server};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nix::sys::signal::Signal;
use tonic::transport::Endpoint;
use tonic::{Code, Request};
use tower::ServiceExt;

/// The client and messages generated from `examples/grpc/greeter.proto` (as the example uses).
mod greeter {
    include!("../examples/grpc/greeter.rs");
}

use greeter::greeter_client::GreeterClient;
use greeter::{CountReply, CountRequest, HelloRequest, WaitRequest};

/// Longest any one call may take in these tests before it counts as hung (debug build, 2 busy
/// cores); the deadline tests assert far tighter bounds of their own.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait for a reload or refork to complete under load.
const EVENT_TIMEOUT: Duration = Duration::from_secs(40);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Starts `examples/grpc` with `workers` workers; returns it and its TCP address.
fn start(workers: usize) -> (Server, SocketAddr) {
    let server = Launch::example("grpc")
        .args(["--workers", &workers.to_string()])
        .start();
    let addr = server.tcp_addr();
    (server, addr)
}

/// The generated client over either transport the tests use: a tonic `Channel` or hyper-util's
/// HTTP/2 client (one type, so that the helpers below take either).
type Client = GreeterClient<Transport>;
type Transport = tower::util::BoxCloneService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    TransportError,
>;

/// A transport's error, boxed. A newtype, not the bare box: with `Box<dyn Error>` as the
/// service's error, the compiler cannot prove the calls' futures `Send`.
#[derive(Debug)]
struct TransportError(tonic::codegen::StdError);

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for TransportError {
    /// The transport's own error, so that its chain (tonic's, hyper's, h2's) stays readable.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

fn boxed<S, B>(transport: S) -> Transport
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<tonic::codegen::StdError>,
    B: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    let transport = transport
        .map_response(|response| response.map(tonic::body::Body::new))
        .map_err(|e| TransportError(e.into()));
    tower::util::BoxCloneService::new(transport)
}

/// A client over a tonic `Channel` to `addr` (as a tonic app makes one: it reconnects by
/// itself) whose connections' local addresses are recorded in the returned list, newest last.
fn channel(addr: SocketAddr) -> (Client, Arc<Mutex<Vec<SocketAddr>>>) {
    let locals = Arc::new(Mutex::new(Vec::new()));
    let record = locals.clone();
    let connector = tower::service_fn(move |_: http::Uri| {
        let record = record.clone();
        async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            record.lock().unwrap().push(stream.local_addr()?);
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector_lazy(connector);
    (GreeterClient::new(boxed(channel)), locals)
}

/// A client over hyper-util's pooled HTTP/2 client instead of a tonic `Channel`. A `Channel`
/// enforces a call's deadline itself (it ends the call with `CANCELLED` when its `grpc-timeout`
/// passes); this one only sends the header, as a client that trusts the server to do it, so what
/// comes back shows what the server did.
fn plain_client(addr: SocketAddr) -> Client {
    let pooled = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<tonic::body::Body>();
    let origin = format!("http://{addr}").parse().unwrap();
    GreeterClient::with_origin(boxed(pooled), origin)
}

fn hello(name: &str) -> HelloRequest {
    HelloRequest { name: name.into() }
}

/// A `Count` call: the replies received, and how the stream ended.
async fn count_replies(
    client: &mut Client,
    request: Request<CountRequest>,
) -> (Vec<CountReply>, Result<(), tonic::Status>) {
    let mut replies = Vec::new();
    let mut stream = match client.count(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return (replies, Err(status)),
    };
    loop {
        match stream.message().await {
            Ok(Some(reply)) => replies.push(reply),
            Ok(None) => return (replies, Ok(())),
            Err(status) => return (replies, Err(status)),
        }
    }
}

/// A `Count` call: the numbers received, and how the stream ended.
async fn count(
    client: &mut Client,
    request: Request<CountRequest>,
) -> (Vec<u32>, Result<(), tonic::Status>) {
    let (replies, end) = count_replies(client, request).await;
    (replies.iter().map(|r| r.n).collect(), end)
}

/// Now, in ms since the epoch (the server's log lines are stamped with the same clock).
fn now_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.expect("a clock after 1970").as_millis() as u64
}

/// A log line's time stamp (`2026-11-30T20:25:16.826Z …`) in ms since the epoch.
fn log_ms(line: &str) -> Option<u64> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut ymd = date.split('-').map(|f| f.parse::<i64>().ok());
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let (hms, ms) = time.split_once('.')?;
    let mut hms = hms.split(':').map(|f| f.parse::<i64>().ok());
    let (h, min, sec) = (hms.next()??, hms.next()??, hms.next()??);
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + min * 60 + sec;
    Some(secs as u64 * 1000 + ms.parse::<u64>().ok()?)
}

/// When each worker began to drain, from the log: `(pid, ms since the epoch)` of every
/// `retiring worker` (replaced) and `promoting worker` (to become a mold) line.
fn drains(server: &Server) -> Vec<(u32, u64)> {
    let lines = server.log.lines();
    lines
        .iter()
        .filter_map(|line| {
            let (_, message) = line.split_once(": ")?;
            if !(message.starts_with("retiring worker ")
                || message.starts_with("promoting worker "))
            {
                return None;
            }
            let pid = message.split(" pid=").nth(1)?.split_whitespace().next()?;
            Some((pid.parse().ok()?, log_ms(line)?))
        })
        .collect()
}

#[test]
fn unary_failing_and_streaming_calls_arrive_with_their_statuses_and_messages() {
    let (server, addr) = start(2);
    let workers = server.wait_workers(2, EVENT_TIMEOUT);
    runtime().block_on(async {
        let (mut client, _) = channel(addr);
        tokio::time::timeout(CALL_TIMEOUT, async {
            let reply = client.say_hello(hello("tine")).await.unwrap().into_inner();
            assert_eq!(reply.message, "hello, tine");
            assert!(
                workers.contains(&(reply.pid as i32)),
                "{reply:?} {workers:?}"
            );

            let status = client.say_hello(hello("")).await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert_eq!(status.message(), "name must not be empty");

            let request = CountRequest {
                count: 100,
                pause_ms: 0,
            };
            let (numbers, end) = count(&mut client, Request::new(request)).await;
            assert!(end.is_ok(), "{end:?}");
            assert_eq!(numbers, (0..100).collect::<Vec<_>>());

            // A stream refused before its first message: the status arrives just the same.
            let request = CountRequest {
                count: 1_000_000,
                pause_ms: 0,
            };
            let (numbers, end) = count(&mut client, Request::new(request)).await;
            let status = end.unwrap_err();
            assert!(numbers.is_empty());
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert!(status.message().contains("count is at most"), "{status:?}");
        })
        .await
        .expect("the calls completed in time");
    });
}

#[test]
fn a_method_learns_its_caller_on_tcp_and_on_a_unix_socket() {
    let dir = common::TempDir::new();
    let sock = dir.join("grpc.sock");
    let server = Launch::example("grpc")
        .args(["--workers", "1", "--listen", "127.0.0.1:0", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .start();
    let addr = server.tcp_addr();
    runtime().block_on(async {
        // TCP: `remote_addr()` is the client's end of the connection.
        let (mut client, locals) = channel(addr);
        let reply = tokio::time::timeout(CALL_TIMEOUT, client.say_hello(hello("me")))
            .await
            .expect("an answer in time")
            .unwrap()
            .into_inner();
        let me = *locals.lock().unwrap().last().expect("a connection");
        assert_eq!(reply.peer, me.to_string());

        // A unix socket: tonic's `UdsConnectInfo`, with this process's credentials.
        let path = sock.clone();
        let connector = tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        let channel =
            Endpoint::from_static("http://localhost").connect_with_connector_lazy(connector);
        let mut client = GreeterClient::new(boxed(channel));
        let reply = tokio::time::timeout(CALL_TIMEOUT, client.say_hello(hello("me")))
            .await
            .expect("an answer in time")
            .unwrap()
            .into_inner();
        let expected = format!(
            "unix pid={} uid={}",
            std::process::id(),
            nix::unistd::getuid()
        );
        assert_eq!(reply.peer, expected);
        assert_eq!(reply.message, "hello, me");
    });
    // `server` drops (the tree is killed) before `dir`, which holds the socket.
}

#[test]
fn a_call_with_a_50ms_deadline_against_a_slow_method_ends_with_deadline_exceeded_promptly() {
    let (_server, addr) = start(1);
    runtime().block_on(async {
        let mut client = plain_client(addr);
        // Warm up: the connection and the worker are ready, so the timing below is the call's.
        let reply = client.say_hello(hello("warm")).await.unwrap().into_inner();
        assert_eq!(reply.message, "hello, warm");

        let mut request = Request::new(WaitRequest { millis: 10_000 });
        request.set_timeout(Duration::from_millis(50));
        let started = Instant::now();
        let result = tokio::time::timeout(CALL_TIMEOUT, client.wait(request))
            .await
            .expect("an answer in time");
        let took = started.elapsed();
        let status = result.expect_err("the 10 s call must not succeed under a 50 ms deadline");
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert!(status.message().contains("deadline exceeded"), "{status:?}");
        // 50 ms plus a loaded machine's scheduling; without enforcement it would take 10 s.
        assert!(took < Duration::from_secs(2), "took {took:?}");

        // A deadline the method meets changes nothing; a call without one runs its course.
        let mut request = Request::new(WaitRequest { millis: 20 });
        request.set_timeout(Duration::from_secs(10));
        assert!(client.wait(request).await.unwrap().into_inner().waited_ms >= 20);
        let request = Request::new(WaitRequest { millis: 300 });
        assert!(client.wait(request).await.unwrap().into_inner().waited_ms >= 300);
    });
}

#[test]
fn a_stream_that_outlives_its_deadline_ends_with_deadline_exceeded() {
    let (_server, addr) = start(1);
    runtime().block_on(async {
        let mut client = plain_client(addr);
        let reply = client.say_hello(hello("warm")).await.unwrap().into_inner();
        assert_eq!(reply.message, "hello, warm");

        // 100 replies 50 ms apart take 5 s; the deadline is 500 ms.
        let mut request = Request::new(CountRequest {
            count: 100,
            pause_ms: 50,
        });
        request.set_timeout(Duration::from_millis(500));
        let started = Instant::now();
        let (numbers, end) = tokio::time::timeout(CALL_TIMEOUT, count(&mut client, request))
            .await
            .expect("the stream ended in time");
        let took = started.elapsed();
        let status = end.expect_err("the 5 s stream must not complete under a 500 ms deadline");
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert!(
            !numbers.is_empty() && numbers.len() < 100,
            "{} replies",
            numbers.len()
        );
        assert_eq!(numbers, (0..numbers.len() as u32).collect::<Vec<_>>());
        assert!(took < Duration::from_secs(3), "took {took:?}");
    });
}

// ---------------------------------------------------------------------------------------------
// Across a reload and a refork

/// What the load saw.
#[derive(Default)]
struct Tally {
    calls_ok: AtomicU64,
    streams_ok: AtomicU64,
    /// Calls and streams the server did not run (see [`not_processed`]), sent again, by client.
    retried: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Every failed call or stream, with why.
    failures: Mutex<Vec<String>>,
    /// The worker pids that answered.
    pids: Mutex<BTreeSet<u32>>,
    /// Every completed stream: when it started and ended (ms since the epoch, as the server's
    /// log lines are stamped) and the worker that sent it.
    streams_done: Mutex<Vec<(u64, u64, u32)>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
    }
    fn calls(&self) -> u64 {
        self.calls_ok.load(Ordering::Relaxed)
    }
    fn streams(&self) -> u64 {
        self.streams_ok.load(Ordering::Relaxed)
    }
    fn retry(&self, client: &'static str, why: &'static str) {
        *self
            .retried
            .lock()
            .unwrap()
            .entry((client, why))
            .or_default() += 1;
    }
}

/// Whether `status` is a call the server cannot have run, which gRPC's own clients (C core, Go,
/// Java) retry transparently, and tonic does not:
/// - hyper cancelled it unsent (`hyper::Error::is_canceled`: hyper hands such a request back
///   unsent): a tonic `Channel` queues calls on a connection that received a GOAWAY while a
///   stream was still open, then fails them so;
/// - the server refused its stream with its final GOAWAY (`NO_ERROR`, a last stream id below
///   this stream's): HTTP/2 guarantees the server did not process it (RFC 9113, 6.8).
///
/// Only these are retried, and counted: `Some("unsent")` or `Some("refused")`.
fn not_processed(status: &tonic::Status) -> Option<&'static str> {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(|e| e.is_canceled())
        {
            return Some("unsent");
        }
        if let Some(e) = e.downcast_ref::<h2::Error>() {
            let refused =
                e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR);
            return refused.then_some("refused");
        }
        source = e.source();
    }
    None
}

/// How many times a call the server did not run is sent again.
const RETRIES: usize = 3;

/// Unary calls, one after another, until `stop`; every one must succeed.
async fn unary_loop(
    (kind, mut client): (&'static str, Client),
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let name = format!("call-{i}");
        let mut tries = 0;
        let result = loop {
            let call = tokio::time::timeout(CALL_TIMEOUT, client.say_hello(hello(&name))).await;
            match call {
                Ok(Err(status)) if not_processed(&status).is_some() && tries < RETRIES => {
                    tries += 1;
                    tally.retry(kind, not_processed(&status).unwrap_or_default());
                }
                other => break other,
            }
        };
        match result {
            Ok(Ok(reply)) => {
                let reply = reply.into_inner();
                if reply.message == format!("hello, {name}") {
                    tally.pids.lock().unwrap().insert(reply.pid);
                    tally.calls_ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    tally.fail(format!("{kind} {name}: wrong reply {reply:?}"));
                }
            }
            Ok(Err(status)) => tally.fail(format!("{kind} {name}: {status:?}")),
            Err(_) => tally.fail(format!(
                "{kind} {name}: no answer within {CALL_TIMEOUT:?} (sent at {} ms)",
                now_ms() - CALL_TIMEOUT.as_millis() as u64
            )),
        }
        i += 1;
    }
}

/// 100-message streams (2 ms apart), one after another, until `stop`; every one must deliver
/// 0..100 in order and end with OK. A stream that broke after it started is never retried.
async fn stream_loop(
    (kind, mut client): (&'static str, Client),
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut tries = 0;
        let mut started = now_ms();
        let result = loop {
            let request = Request::new(CountRequest {
                count: 100,
                pause_ms: 2,
            });
            match tokio::time::timeout(CALL_TIMEOUT, count_replies(&mut client, request)).await {
                Ok((replies, Err(status)))
                    if replies.is_empty()
                        && not_processed(&status).is_some()
                        && tries < RETRIES =>
                {
                    tries += 1;
                    tally.retry(kind, not_processed(&status).unwrap_or_default());
                    started = now_ms();
                }
                other => break other,
            }
        };
        match result {
            Ok((replies, Ok(())))
                if replies.iter().map(|r| r.n).eq(0..100)
                    && replies.iter().all(|r| r.pid == replies[0].pid) =>
            {
                let done = (started, now_ms(), replies[0].pid);
                tally.streams_done.lock().unwrap().push(done);
                tally.streams_ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok((replies, end)) => tally.fail(format!(
                "{kind} stream {i}: {} messages ({:?}…), ended {end:?}",
                replies.len(),
                replies.first()
            )),
            Err(_) => tally.fail(format!(
                "{kind} stream {i}: not over within {CALL_TIMEOUT:?} (started at {started} ms)"
            )),
        }
        i += 1;
    }
}

/// A settled tree: its mold's generation and pid, and its workers' pids.
struct Settled {
    generation: u64,
    mold: i32,
    workers: Vec<i32>,
}

/// The tree once it is settled: one mold and `workers` ready workers of its generation, numbered
/// 0..workers (and any hot spares).
fn settled(server: &Server, workers: usize) -> Option<Settled> {
    let rows = child_rows(server, &server.status())?;
    let molds: Vec<_> = rows.iter().filter(|r| r.role == "mold").collect();
    let [mold] = molds[..] else { return None };
    let mut ws: Vec<_> = rows.iter().filter(|r| r.role == "worker").collect();
    ws.sort_by_key(|r| r.nr);
    // Hot spares (`spare_workers`) stand by beside the workers and serve nothing until used.
    let spares = rows.iter().filter(|r| r.role == "spare").count();
    let ok = mold.state == "mold"
        && rows.len() == workers + 1 + spares
        && ws.iter().enumerate().all(|(i, w)| {
            w.nr == Some(i as u64)
                && w.generation == mold.generation
                && (w.state == "ready" || w.state == "busy")
        });
    ok.then(|| Settled {
        generation: mold.generation,
        mold: mold.pid,
        workers: ws.iter().map(|w| w.pid).collect(),
    })
}

/// Waits until the tree is settled and `ok` accepts it.
fn wait_settled(server: &Server, workers: usize, ok: impl Fn(&Settled) -> bool) -> Settled {
    poll_until(EVENT_TIMEOUT, || settled(server, workers).filter(&ok)).unwrap_or_else(|| {
        panic!(
            "the tree did not settle within {EVENT_TIMEOUT:?}; log:\n{}",
            server.log.text()
        )
    })
}

/// Waits until the old workers are gone (their calls and streams done), but the one that became
/// the mold (`mold`, after a refork), and the load has gone on for `calls` more unary calls and
/// `streams` more streams.
fn wait_flowing(server: &Server, tally: &Tally, old: &[i32], mold: i32, calls: u64, streams: u64) {
    for pid in old.iter().filter(|p| **p != mold) {
        poll_until(EVENT_TIMEOUT, || common::gone(*pid).then_some(()))
            .unwrap_or_else(|| panic!("old worker {pid} still there; log:\n{}", server.log.text()));
    }
    let (c, s) = (tally.calls() + calls, tally.streams() + streams);
    poll_until(EVENT_TIMEOUT, || {
        (tally.calls() >= c && tally.streams() >= s).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the load stalled: {} calls (waiting for {c}), {} streams (waiting for {s}), \
             failures {:?}; log:\n{}",
            tally.calls(),
            tally.streams(),
            tally.failures.lock().unwrap(),
            server.log.text()
        )
    });
}

#[test]
fn every_call_and_stream_completes_across_a_reload_and_a_refork() {
    let (server, addr) = start(2);
    let first = wait_settled(&server, 2, |_| true);
    let rt = runtime();
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    // A channel starts its connection task on the runtime it is made in.
    let entered = rt.enter();
    // Two clients, as tonic apps make them: a `Channel` (one HTTP/2 connection at a time, which
    // it re-opens by itself) and hyper-util's pooled client (which re-sends by itself a request
    // it had not started to send). Each is shared by three callers and two streamers.
    let mut tasks = Vec::new();
    let (channel, _) = channel(addr);
    let pooled = plain_client(addr);
    let channel = || ("Channel", channel.clone());
    let pooled = || ("hyper-util", pooled.clone());
    for _ in 0..3 {
        tasks.push(rt.spawn(unary_loop(channel(), tally.clone(), stop.clone())));
        tasks.push(rt.spawn(unary_loop(pooled(), tally.clone(), stop.clone())));
    }
    for _ in 0..2 {
        tasks.push(rt.spawn(stream_loop(channel(), tally.clone(), stop.clone())));
        tasks.push(rt.spawn(stream_loop(pooled(), tally.clone(), stop.clone())));
    }
    drop(entered);
    wait_flowing(&server, &tally, &[], 0, 200, 4);

    // HUP: the monitor re-executes itself, preloads a new mold and replaces every worker.
    let mark = server.log.mark();
    server.signal(Signal::SIGHUP);
    server
        .log
        .wait_for_log_since(mark, "reload complete", EVENT_TIMEOUT);
    let reloaded = wait_settled(&server, 2, |s| {
        s.workers.iter().all(|p| !first.workers.contains(p))
    });
    wait_flowing(&server, &tally, &first.workers, 0, 200, 4);
    let after_reload = (tally.calls(), tally.streams());

    // USR2: a worker becomes the next generation's mold and every worker is replaced.
    server.signal(Signal::SIGUSR2);
    let reforked = wait_settled(&server, 2, |s| {
        s.generation == reloaded.generation + 1
            && s.workers.iter().all(|p| !reloaded.workers.contains(p))
    });
    wait_flowing(&server, &tally, &reloaded.workers, reforked.mold, 200, 4);

    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for task in tasks {
            tokio::time::timeout(CALL_TIMEOUT, task)
                .await
                .expect("a client task ended")
                .unwrap();
        }
    });
    let failures = tally.failures.lock().unwrap().clone();
    let pids = tally.pids.lock().unwrap().clone();
    eprintln!(
        "across HUP and USR2: {} unary calls, {} 100-message streams, {} failures, calls the \
         server did not run sent again: {:?} ({} / {} before the refork); workers that \
         answered: {pids:?}",
        tally.calls(),
        tally.streams(),
        failures.len(),
        tally.retried.lock().unwrap(),
        after_reload.0,
        after_reload.1,
    );
    assert!(
        failures.is_empty(),
        "{} failed: {failures:#?}\nlog:\n{}",
        failures.len(),
        server.log.text()
    );
    // Streams really crossed the events: for each, a stream that its worker was still sending
    // when that worker began to drain, completed.
    let drains = drains(&server);
    let streams = tally.streams_done.lock().unwrap().clone();
    for (event, old) in [("HUP", &first), ("USR2", &reloaded)] {
        let spanning = streams.iter().filter(|(start, end, pid)| {
            drains.iter().any(|(p, at)| {
                p == pid && old.workers.contains(&(*p as i32)) && start < at && at < end
            })
        });
        let spanning = spanning.count();
        eprintln!(
            "{event}: {spanning} completed streams were under way when their worker began to drain"
        );
        assert!(
            spanning > 0,
            "{event}: no completed stream spans its worker's drain; streams {streams:?}, drains \
             {drains:?}"
        );
    }
    // Each generation of workers answered: the load really ran across both events.
    for generation in [&first, &reloaded, &reforked] {
        let workers = &generation.workers;
        assert!(
            workers.iter().any(|p| pids.contains(&(*p as u32))),
            "none of {workers:?} answered: {pids:?}"
        );
    }
}
