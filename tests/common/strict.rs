//! A strict HTTP/1.1 load client: the way a client that never retries sees a server.
//!
//! wrk sending POSTs, nginx proxying a POST, Go with a body it cannot replay: none of them resend
//! a request once any of it was written. So a request written (even partly) to a kept-alive
//! connection that the server then closed or reset without answering is lost, whatever the
//! reason. [`StrictLoad`] counts exactly that: each of its connections sends `POST path` with a
//! small `Content-Length` body in a loop, reads each response completely, never retries, and opens
//! a new connection only after a response that said `Connection: close` or after a failure.
//!
//! One thread per connection with blocking sockets (a small stack each, so 256 connections are
//! cheap). Bounded: every socket has a read and write timeout, and the load stops by itself after
//! its `max` time; [`StrictLoad::stop`] lets each connection finish the request it is on (its
//! response is awaited, not abandoned), then joins.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Addr, Client, Stream};

/// The request body every request carries.
const BODY: &[u8] = b"strict=1&lost=never";
/// Read/write timeout of a strict connection: a request unanswered for this long is lost.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed connect before the next try (a refused connect is not a request).
const CONNECT_BACKOFF: Duration = Duration::from_millis(5);

/// What a [`StrictLoad`] saw, once stopped.
#[derive(Debug, Default, Clone)]
pub struct StrictReport {
    /// Complete responses received.
    pub answered: u64,
    /// Complete responses by status code.
    pub by_status: BTreeMap<u16, u64>,
    /// Requests written (even partly) that got no complete response: why, one line each.
    pub lost: Vec<String>,
    /// Connects that failed (no request was written on them).
    pub connect_errors: u64,
    /// The lost requests again, each with what is known of its connection (to attribute a loss to
    /// the process that held the connection, as the chaos test does).
    pub lost_detail: Vec<Lost>,
}

/// One lost request and its connection.
#[derive(Debug, Clone)]
pub struct Lost {
    /// Why (the same line as in [`StrictReport::lost`]).
    pub why: String,
    /// The client socket's local address (with the server's address it names the server-side
    /// socket in `/proc/net/tcp`).
    pub local: Option<SocketAddr>,
    /// The worker that sent the last response on this connection (`x-tine-worker`, with
    /// `--debug-headers`); `None` on a connection's first request.
    pub last_worker: Option<i32>,
    /// When the connection was opened (just before its connect call).
    pub connected_at: Instant,
    /// When the loss was seen.
    pub at: Instant,
}

impl StrictReport {
    /// Responses with status `code`.
    pub fn status(&self, code: u16) -> u64 {
        self.by_status.get(&code).copied().unwrap_or(0)
    }

    /// A one-line summary for assertion messages: answered, statuses, lost (with the first few
    /// reasons), connect errors.
    pub fn summary(&self) -> String {
        let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
        for why in &self.lost {
            *reasons.entry(why.as_str()).or_default() += 1;
        }
        format!(
            "answered {} {:?}, lost {} {:?}, connect errors {}",
            self.answered,
            self.by_status,
            self.lost.len(),
            reasons,
            self.connect_errors
        )
    }
}

/// A running strict load (see the module doc).
pub struct StrictLoad {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    threads: Vec<JoinHandle<StrictReport>>,
}

impl StrictLoad {
    /// `connections` kept-alive connections, each sending `POST path` with a small body in a
    /// loop, never retrying; reconnects only after a response that said `Connection: close` (or
    /// after a failure, counted as lost). Bounded: stops by itself after `max` time.
    pub fn start(addr: &Addr, connections: usize, path: &str, max: Duration) -> StrictLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let until = Instant::now() + max;
        let request: Arc<[u8]> = {
            let mut r = format!(
                "POST {path} HTTP/1.1\r\nHost: localhost\r\n\
                 Content-Type: application/x-www-form-urlencoded\r\n\
                 Content-Length: {}\r\n\r\n",
                BODY.len()
            )
            .into_bytes();
            r.extend_from_slice(BODY);
            r.into()
        };
        let threads = (0..connections)
            .map(|i| {
                let (addr, stop, answered, request) = (
                    addr.clone(),
                    stop.clone(),
                    answered.clone(),
                    request.clone(),
                );
                std::thread::Builder::new()
                    .name(format!("strict-{i}"))
                    .stack_size(128 * 1024)
                    .spawn(move || connection_loop(&addr, &request, &stop, &answered, until))
                    .expect("spawn a strict load thread")
            })
            .collect();
        StrictLoad {
            stop,
            answered,
            threads,
        }
    }

    /// Responses so far, all connections together (for waiting until the load is flowing).
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Stops sending (each connection finishes the request it is on) and joins.
    pub fn stop(mut self) -> StrictReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = StrictReport::default();
        for t in std::mem::take(&mut self.threads) {
            let mine = t.join().expect("a strict load thread panicked");
            all.answered += mine.answered;
            for (k, v) in mine.by_status {
                *all.by_status.entry(k).or_default() += v;
            }
            all.lost.extend(mine.lost);
            all.connect_errors += mine.connect_errors;
            all.lost_detail.extend(mine.lost_detail);
        }
        all
    }
}

impl Drop for StrictLoad {
    fn drop(&mut self) {
        // A test that panicked before `stop`: let the threads end on their own, soon.
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Why a request on an established connection got no complete response.
fn why_lost(phase: &str, e: &io::Error, reused: bool) -> String {
    let conn = if reused { "kept-alive" } else { "fresh" };
    let kind = match e.kind() {
        io::ErrorKind::ConnectionReset => "reset".to_string(),
        io::ErrorKind::UnexpectedEof => "closed".to_string(),
        io::ErrorKind::BrokenPipe => "broken pipe".to_string(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timed out".to_string(),
        other => format!("{other:?}"),
    };
    format!("{phase} on a {conn} connection: {kind}")
}

/// Counts a lost request, with what is known of its connection.
fn lose(
    mine: &mut StrictReport,
    why: String,
    local: Option<SocketAddr>,
    connected_at: Instant,
    last_worker: Option<i32>,
) {
    mine.lost.push(why.clone());
    mine.lost_detail.push(Lost {
        why,
        local,
        last_worker,
        connected_at,
        at: Instant::now(),
    });
}

/// One connection's loop (reconnecting as needed) until stopped or `until`.
fn connection_loop(
    addr: &Addr,
    request: &[u8],
    stop: &AtomicBool,
    answered: &AtomicU64,
    until: Instant,
) -> StrictReport {
    let mut mine = StrictReport::default();
    let mut conn: Option<Client> = None;
    // Requests already answered on the current connection.
    let mut served_here = 0u64;
    // The current connection: local address, when it opened, who answered on it last.
    let mut local = None;
    let mut connected_at = Instant::now();
    let mut last_worker = None;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        // A connection cannot be older than its connect call (a server may accept it before the
        // call returns here).
        let opening = Instant::now();
        let mut client = match conn.take() {
            Some(c) => c,
            None => match Client::connect(addr).and_then(|c| {
                c.stream.set_read_timeout(Some(SOCKET_TIMEOUT))?;
                c.stream.set_write_timeout(Some(SOCKET_TIMEOUT))?;
                Ok(c)
            }) {
                Ok(c) => {
                    served_here = 0;
                    local = match &c.stream {
                        Stream::Tcp(s) => s.local_addr().ok(),
                        Stream::Unix(_) => None,
                    };
                    connected_at = opening;
                    last_worker = None;
                    c
                }
                Err(_) => {
                    mine.connect_errors += 1;
                    std::thread::sleep(CONNECT_BACKOFF);
                    continue;
                }
            },
        };
        let reused = served_here > 0;
        // From here on the request is on the wire (or failed to get there on a connection
        // the server accepted): no complete response means lost, never a retry.
        if let Err(e) = client.send(request) {
            let why = why_lost("write", &e, reused);
            lose(&mut mine, why, local, connected_at, last_worker);
            continue;
        }
        match client.read_response(false) {
            Ok(r) => {
                mine.answered += 1;
                answered.fetch_add(1, Ordering::Relaxed);
                *mine.by_status.entry(r.status).or_default() += 1;
                served_here += 1;
                last_worker = r.worker().or(last_worker);
                if !r.closes() && r.version == "HTTP/1.1" {
                    conn = Some(client);
                }
            }
            Err(e) => {
                let why = why_lost("read", &e, reused);
                lose(&mut mine, why, local, connected_at, last_worker);
            }
        }
    }
    mine
}
