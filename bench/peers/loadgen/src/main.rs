//! Load client of tine's peer suite (`bench/peers/run.sh`). One thread, one `epoll` (mio), any
//! number of HTTP/1.1 keep-alive connections. Two modes:
//!
//! - `open`: open-loop paced `GET`s, the way wrk2 paces (wrk2 is not packaged by Debian). Request
//!   `i` of connection `j` is due at `t0 + (i + j / conns) * conns / rate`; a connection has at most
//!   one request in flight, so when a response is late the requests due behind it wait, and every
//!   latency is measured from the request's *due* time: a server stall shows in every request it
//!   delayed (no coordinated omission). The client's own lag (due → actually written, on a
//!   connection that was idle at its due time) is reported apart, so a run where the client itself
//!   could not keep up is visible. Requests due during `--warmup` are sent but not recorded.
//! - `strict`: a client that never retries (wrk's POSTs, nginx proxying a POST): each connection
//!   sends `POST` with a small body in a loop, reads each response completely, and opens a new
//!   connection only after a response that said `Connection: close` or after a failure. A request
//!   written (even partly) that gets no complete response (EOF, reset, 5 s without an answer) is
//!   *lost*; a connect that fails is a connect error (nothing was written). Prints `flowing` once
//!   the first response arrived, then stops after `--seconds` or as soon as its stdin closes or
//!   gets a line, and reports the time of each loss so a driver can attribute it to an event.
//!
//! Bounded: `--seconds` of load, then at most 1 s (open) or 5 s (strict) for the requests still
//! in flight. Output: one JSON object on stdout at the end.

use std::collections::BTreeMap;
use std::io::{self, BufRead, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

/// A request unanswered for this long counts as lost (strict) or timed out (open).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed connect before the next one (strict: a refused connect is not a request).
const CONNECT_BACKOFF: Duration = Duration::from_millis(5);
/// The body of every strict `POST`.
const BODY: &[u8] = b"strict=1&lost=never";

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Open,
    Strict,
}

struct Args {
    mode: Mode,
    addr: SocketAddr,
    conns: usize,
    rate: f64,
    seconds: f64,
    warmup: f64,
    path: String,
    /// Open: write every recorded request slower than this (µs) to `slow_log`, with its due time.
    slow_us: u32,
    slow_log: Option<String>,
}

fn usage() -> ! {
    eprintln!(
        "usage: peers-loadgen open --addr HOST:PORT --rate REQ_PER_S [--conns 32] [--seconds 10] [--warmup 1] [--path /] [--slow-log FILE --slow-us N]\n       \
         peers-loadgen strict --addr HOST:PORT [--conns 16] [--seconds 60] [--path /]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1);
    let mode = match it.next().as_deref() {
        Some("open") => Mode::Open,
        Some("strict") => Mode::Strict,
        _ => usage(),
    };
    let mut a = Args {
        mode,
        addr: "127.0.0.1:8080".parse().expect("literal"),
        conns: if mode == Mode::Open { 32 } else { 16 },
        rate: 0.0,
        seconds: if mode == Mode::Open { 10.0 } else { 60.0 },
        warmup: if mode == Mode::Open { 1.0 } else { 0.0 },
        path: "/".into(),
        slow_us: 0,
        slow_log: None,
    };
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| usage());
        let bad = |what: &str| -> ! {
            eprintln!("peers-loadgen: invalid value {value:?} for {flag}: expected {what}");
            std::process::exit(2)
        };
        let positive = |v: &str| v.parse::<f64>().ok().filter(|x| *x > 0.0 && x.is_finite());
        match flag.as_str() {
            "--addr" => a.addr = value.parse().unwrap_or_else(|_| bad("HOST:PORT")),
            "--conns" => {
                a.conns = value
                    .parse()
                    .ok()
                    .filter(|c| *c > 0 && *c < 60_000)
                    .unwrap_or_else(|| bad("a positive integer"))
            }
            "--rate" => a.rate = positive(&value).unwrap_or_else(|| bad("requests/s > 0")),
            "--seconds" => a.seconds = positive(&value).unwrap_or_else(|| bad("seconds > 0")),
            "--warmup" => {
                a.warmup = value
                    .parse()
                    .ok()
                    .filter(|x: &f64| *x >= 0.0)
                    .unwrap_or_else(|| bad("seconds >= 0"))
            }
            "--path" if value.starts_with('/') => a.path = value,
            "--path" => bad("a path starting with /"),
            "--slow-log" => a.slow_log = Some(value),
            "--slow-us" => a.slow_us = value.parse().unwrap_or_else(|_| bad("microseconds")),
            _ => usage(),
        }
    }
    if a.mode == Mode::Open && a.rate == 0.0 {
        eprintln!("peers-loadgen: open mode needs --rate");
        usage();
    }
    a
}

/// Where one connection is.
enum State {
    /// Waiting for the non-blocking connect to finish.
    Connecting,
    /// Connected, nothing in flight.
    Idle,
    /// A request is being written (`written` bytes so far) or its response read.
    Busy { written: usize },
    /// Closed; reconnect at `at`.
    Down { at: Instant },
}

struct Conn {
    stream: Option<TcpStream>,
    state: State,
    /// Response bytes read so far for the request in flight.
    buf: Vec<u8>,
    /// Open mode: index of the next request of this connection to be due.
    next: u64,
    /// The request in flight: when it was due (open) or written (strict), and whether to record it.
    due: Instant,
    record: bool,
    /// When the connection last became idle (open mode: to tell the client's own lag).
    idle_since: Instant,
}

/// What one complete response said.
struct Response {
    status: u16,
    len: usize,
    close: bool,
}

/// Parses one complete response at the start of `buf`; `Ok(None)` if more bytes are needed.
fn parse_response(buf: &[u8], eof: bool) -> Result<Option<Response>, String> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > 64 * 1024 {
            return Err("response head over 64 KiB".into());
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "response head not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let http10 = status_line.starts_with("HTTP/1.0");
    let (mut length, mut close, mut keep_alive) = (None, http10, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (
            name.trim().to_ascii_lowercase(),
            value.trim().to_ascii_lowercase(),
        );
        match name.as_str() {
            "content-length" => {
                length = Some(value.parse::<usize>().map_err(|_| "bad content-length")?)
            }
            "connection" if value.contains("close") => close = true,
            "connection" if value.contains("keep-alive") => keep_alive = true,
            "transfer-encoding" if value.contains("chunked") => {
                return Err("chunked responses are not supported by this client".into())
            }
            _ => {}
        }
    }
    if http10 && keep_alive {
        close = false;
    }
    let body_start = head_end + 4;
    match length {
        Some(n) if buf.len() >= body_start + n => Ok(Some(Response {
            status,
            len: body_start + n,
            close,
        })),
        Some(_) => Ok(None),
        // No length: the body runs to EOF.
        None if eof => Ok(Some(Response {
            status,
            len: buf.len(),
            close: true,
        })),
        None => Ok(None),
    }
}

/// Everything measured, reported as JSON at the end.
#[derive(Default)]
struct Stats {
    answered: u64,
    by_status: BTreeMap<u16, u64>,
    /// Open: latencies (µs from due time) of recorded requests.
    latencies_us: Vec<u32>,
    /// Open: client lag (µs from due time to written) of requests whose connection was idle then.
    send_lag_us: Vec<u32>,
    /// Open, with `--slow-log`: (due, seconds after the recorded window began; latency µs;
    /// connection) of each request slower than `--slow-us`, to see when stalls happen.
    slow: Vec<(f64, u32, usize)>,
    /// Strict: lost requests, (seconds since start, why).
    lost: Vec<(f64, String)>,
    /// Open: failed requests (EOF, reset, timeout, bad response), why → count.
    errors: BTreeMap<String, u64>,
    connect_errors: u64,
    connects: u64,
    /// Server closed a connection that had nothing in flight (not a loss).
    idle_closes: u64,
    /// Open: requests that were due within the run but never sent (a connection still busy).
    unsent: u64,
    /// Open: recorded requests still unanswered when the client stopped.
    unanswered_at_stop: u64,
    first_answer: Option<f64>,
}

struct Client {
    args: Args,
    request: Vec<u8>,
    poll: Poll,
    conns: Vec<Conn>,
    stats: Stats,
    t0: Instant,
    /// Open mode: seconds between two requests of one connection.
    interval: f64,
    record_from: Instant,
    end: Instant,
}

impl Client {
    fn due_of(&self, j: usize, i: u64) -> Instant {
        let at = (i as f64 + j as f64 / self.args.conns as f64) * self.interval;
        self.t0 + Duration::from_secs_f64(at)
    }

    fn connect(&mut self, j: usize, now: Instant) {
        self.stats.connects += 1;
        match TcpStream::connect(self.args.addr) {
            Ok(mut s) => {
                match self.poll.registry().register(
                    &mut s,
                    Token(j),
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    Ok(()) => {
                        self.conns[j].stream = Some(s);
                        self.conns[j].state = State::Connecting;
                    }
                    Err(e) => self.connect_failed(j, now, &e),
                }
            }
            Err(e) => self.connect_failed(j, now, &e),
        }
    }

    fn connect_failed(&mut self, j: usize, now: Instant, _e: &io::Error) {
        self.stats.connect_errors += 1;
        self.conns[j].stream = None;
        self.conns[j].state = State::Down {
            at: now + CONNECT_BACKOFF,
        };
    }

    /// Closes connection `j`; `failure` is why its request in flight failed (if one was).
    fn close(&mut self, j: usize, now: Instant, failure: Option<String>) {
        if let Some(mut s) = self.conns[j].stream.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        let in_flight = matches!(self.conns[j].state, State::Busy { .. });
        if let Some(why) = failure {
            if in_flight {
                match self.args.mode {
                    Mode::Strict => self.stats.lost.push(((now - self.t0).as_secs_f64(), why)),
                    Mode::Open => *self.stats.errors.entry(why).or_default() += 1,
                }
            } else if why.starts_with("connect") {
                self.stats.connect_errors += 1;
            } else {
                self.stats.idle_closes += 1;
            }
        }
        self.conns[j].buf.clear();
        self.conns[j].state = State::Down { at: now };
    }

    /// Starts the next request on idle connection `j` if one is due (open) or at once (strict).
    fn maybe_send(&mut self, j: usize, now: Instant) {
        if !matches!(self.conns[j].state, State::Idle) || now >= self.end {
            return;
        }
        match self.args.mode {
            Mode::Open => {
                let due = self.due_of(j, self.conns[j].next);
                if due > now {
                    return;
                }
                // Lag of the client itself: only meaningful when the connection was idle at `due`
                // (otherwise the wait was for the server's previous answer).
                if due >= self.record_from && self.conns[j].idle_since <= due {
                    self.stats.send_lag_us.push(micros(now - due));
                }
                self.conns[j].next += 1;
                self.conns[j].due = due;
                self.conns[j].record = due >= self.record_from;
            }
            Mode::Strict => {
                self.conns[j].due = now;
                self.conns[j].record = true;
            }
        }
        self.conns[j].state = State::Busy { written: 0 };
        self.write(j, now);
    }

    fn write(&mut self, j: usize, now: Instant) {
        let State::Busy { written } = self.conns[j].state else {
            return;
        };
        if written >= self.request.len() {
            return;
        }
        let Some(stream) = self.conns[j].stream.as_mut() else {
            return;
        };
        let mut w = written;
        let result = loop {
            match stream.write(&self.request[w..]) {
                Ok(0) => break Err("write returned 0".to_string()),
                Ok(n) => {
                    w += n;
                    if w == self.request.len() {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break Err(format!("write: {}", kind(&e))),
            }
        };
        self.conns[j].state = State::Busy { written: w };
        if let Err(why) = result {
            self.close(j, now, Some(why));
        }
    }

    fn read(&mut self, j: usize, now: Instant) {
        let conn = &mut self.conns[j];
        let Some(stream) = conn.stream.as_mut() else {
            return;
        };
        let mut chunk = [0u8; 16 * 1024];
        let mut eof = false;
        let mut failure = None;
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    failure = Some(format!("read: {}", kind(&e)));
                    break;
                }
            }
        }
        if !matches!(self.conns[j].state, State::Busy { .. }) {
            if eof || failure.is_some() {
                self.close(
                    j,
                    now,
                    Some(failure.unwrap_or_else(|| "EOF while idle".into())),
                );
            } else if !self.conns[j].buf.is_empty() {
                self.conns[j].buf.clear();
                self.close(j, now, Some("bytes while idle".into()));
            }
            return;
        }
        match parse_response(&self.conns[j].buf, eof) {
            Ok(Some(resp)) => {
                self.finish(j, now, &resp);
                if resp.close || eof {
                    self.close(j, now, None);
                } else if resp.len < self.conns[j].buf.len() {
                    self.close(j, now, Some("bytes after the response".into()));
                } else {
                    self.conns[j].buf.clear();
                    self.conns[j].state = State::Idle;
                    self.conns[j].idle_since = now;
                    self.maybe_send(j, now);
                }
            }
            Ok(None) if eof => {
                let why = if self.conns[j].buf.is_empty() {
                    "EOF before any response byte"
                } else {
                    "EOF in the response"
                };
                self.close(j, now, Some(why.into()));
            }
            Ok(None) => {
                if let Some(why) = failure {
                    self.close(j, now, Some(why));
                }
            }
            Err(why) => self.close(j, now, Some(why)),
        }
    }

    fn finish(&mut self, j: usize, now: Instant, resp: &Response) {
        self.stats.answered += 1;
        *self.stats.by_status.entry(resp.status).or_default() += 1;
        self.stats
            .first_answer
            .get_or_insert((now - self.t0).as_secs_f64());
        if self.args.mode == Mode::Open && self.conns[j].record {
            let latency = micros(now - self.conns[j].due);
            self.stats.latencies_us.push(latency);
            if self.args.slow_log.is_some() && latency > self.args.slow_us {
                let due = self.conns[j]
                    .due
                    .saturating_duration_since(self.record_from);
                self.stats.slow.push((due.as_secs_f64(), latency, j));
            }
        }
    }

    fn run(&mut self, stop: &AtomicBool) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut flowing_said = false;
        let hard_end = self.end
            + if self.args.mode == Mode::Open {
                Duration::from_secs(1)
            } else {
                REQUEST_TIMEOUT
            };
        for j in 0..self.conns.len() {
            self.connect(j, Instant::now());
        }
        loop {
            let now = Instant::now();
            if stop.load(Ordering::Relaxed) && self.end > now {
                self.end = now;
            }
            let draining = now >= self.end;
            let busy = self
                .conns
                .iter()
                .filter(|c| matches!(c.state, State::Busy { .. } | State::Connecting))
                .count();
            if (draining && busy == 0) || now >= hard_end {
                break;
            }
            if self.args.mode == Mode::Strict && !flowing_said && self.stats.answered > 0 {
                println!("flowing");
                io::stdout().flush()?;
                flowing_said = true;
            }
            // Next thing due: a paced request, a reconnect, or a timeout check every 10 ms.
            let mut wake = now + Duration::from_millis(10);
            for j in 0..self.conns.len() {
                match self.conns[j].state {
                    State::Idle if self.args.mode == Mode::Open && !draining => {
                        wake = wake.min(self.due_of(j, self.conns[j].next));
                    }
                    State::Down { at } if !draining => wake = wake.min(at),
                    State::Busy { .. } if now - self.conns[j].due > REQUEST_TIMEOUT => {
                        self.close(j, now, Some("no response within 5 s".into()));
                    }
                    _ => {}
                }
            }
            // epoll_wait counts its timeout in milliseconds, too coarse for pacing at 100k+ req/s;
            // so wait on the epoll fd itself with ppoll (nanoseconds; timer slack set to 1 ns in
            // main), then collect the events without blocking. No spinning: the client uses only
            // the CPU its work needs, which matters when it shares the cores with the server.
            wait_readable(self.poll.as_raw_fd(), wake.saturating_duration_since(now));
            match self.poll.poll(&mut events, Some(Duration::ZERO)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            for ev in events.iter() {
                let j = ev.token().0;
                if matches!(self.conns[j].state, State::Connecting) {
                    let stream = self.conns[j]
                        .stream
                        .as_ref()
                        .expect("connecting has a stream");
                    match stream.take_error() {
                        Ok(None) if stream.peer_addr().is_ok() => {
                            let _ = stream.set_nodelay(true);
                            self.conns[j].state = State::Idle;
                            self.conns[j].idle_since = now;
                            self.conns[j].buf.clear();
                        }
                        Ok(None) if !ev.is_error() && !ev.is_write_closed() => continue,
                        _ => {
                            if let Some(mut s) = self.conns[j].stream.take() {
                                let _ = self.poll.registry().deregister(&mut s);
                            }
                            self.stats.connect_errors += 1;
                            self.conns[j].state = State::Down {
                                at: now + CONNECT_BACKOFF,
                            };
                            continue;
                        }
                    }
                }
                if ev.is_writable() {
                    self.write(j, now);
                }
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    self.read(j, now);
                }
            }
            let now = Instant::now();
            for j in 0..self.conns.len() {
                match self.conns[j].state {
                    State::Down { at } if at <= now && now < self.end => self.connect(j, now),
                    State::Idle => self.maybe_send(j, now),
                    _ => {}
                }
            }
        }
        // Open mode: requests that fell due within the run but were never sent (their connection
        // was waiting for a late answer), and requests still unanswered now, are in the latency
        // record too, each with the time it has waited so far (a lower bound): a stall must
        // raise the percentiles, never shrink the sample.
        let stopped = Instant::now();
        if self.args.mode == Mode::Open {
            let end = self.end;
            for j in 0..self.conns.len() {
                let mut i = self.conns[j].next;
                while self.due_of(j, i) < end {
                    let due = self.due_of(j, i);
                    if due >= self.record_from {
                        self.stats.unsent += 1;
                        self.stats.latencies_us.push(micros(stopped - due));
                    }
                    i += 1;
                }
                if matches!(self.conns[j].state, State::Busy { .. }) && self.conns[j].record {
                    self.stats.unanswered_at_stop += 1;
                    self.stats
                        .latencies_us
                        .push(micros(stopped - self.conns[j].due));
                }
            }
        }
        for j in 0..self.conns.len() {
            if matches!(self.conns[j].state, State::Busy { .. }) {
                self.close(
                    j,
                    stopped,
                    Some("still unanswered when the client stopped".into()),
                );
            }
        }
        Ok(())
    }
}

/// Blocks until `fd` is readable or `timeout` has passed (nanosecond precision).
fn wait_readable(fd: RawFd, timeout: Duration) {
    if timeout.is_zero() {
        return;
    }
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `pfd` and `ts` are valid for the call's duration; one pollfd, no signal mask.
    unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
}

/// Sets this thread's timer slack to 1 ns so that short waits end on time (default: 50 µs).
fn tight_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and touches no memory of ours.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
}

/// CLOCK_MONOTONIC now, in seconds.
fn monotonic_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, valid and writable for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

fn kind(e: &io::Error) -> String {
    match e.kind() {
        ErrorKind::ConnectionReset => "connection reset".into(),
        ErrorKind::BrokenPipe => "broken pipe".into(),
        ErrorKind::ConnectionRefused => "connection refused".into(),
        _ => e.to_string(),
    }
}

/// The `q` quantile (0..1) of sorted samples, nearest rank.
fn quantile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn main() {
    let args = parse_args();
    let request = match args.mode {
        Mode::Open => format!("GET {} HTTP/1.1\r\nHost: localhost\r\n\r\n", args.path).into_bytes(),
        Mode::Strict => {
            let mut r = format!(
                "POST {} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
                args.path,
                BODY.len()
            )
            .into_bytes();
            r.extend_from_slice(BODY);
            r
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    if args.mode == Mode::Strict {
        // Stop early when the driver says so (a line) or goes away (EOF).
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = io::stdin().lock().read_line(&mut line);
            stop.store(true, Ordering::Relaxed);
        });
    }
    tight_timer_slack();
    let t0 = Instant::now() + Duration::from_millis(50);
    let interval = if args.rate > 0.0 {
        args.conns as f64 / args.rate
    } else {
        0.0
    };
    let poll = Poll::new().unwrap_or_else(|e| {
        eprintln!("peers-loadgen: epoll: {e}");
        std::process::exit(1)
    });
    let conns = (0..args.conns)
        .map(|_| Conn {
            stream: None,
            state: State::Down { at: t0 },
            buf: Vec::with_capacity(1024),
            next: 0,
            due: t0,
            record: false,
            idle_since: t0,
        })
        .collect();
    let record_from = t0 + Duration::from_secs_f64(args.warmup);
    // The recorded window's start on CLOCK_MONOTONIC (what `Instant` reads, and what
    // `perf record -k CLOCK_MONOTONIC` stamps), so that the slow log can be laid beside a trace.
    let record_from_monotonic_s = monotonic_s() - t0.elapsed().as_secs_f64() + args.warmup;
    let end = record_from + Duration::from_secs_f64(args.seconds);
    let mut client = Client {
        args,
        request,
        poll,
        conns,
        stats: Stats::default(),
        t0,
        interval,
        record_from,
        end,
    };
    if let Err(e) = client.run(&stop) {
        eprintln!("peers-loadgen: {e}");
        std::process::exit(1)
    }
    let s = &mut client.stats;
    if let Some(path) = &client.args.slow_log {
        let mut text = format!(
            "# record_from_monotonic_s {record_from_monotonic_s:.6}\ndue_s latency_us conn\n"
        );
        for (due, latency, j) in &s.slow {
            text.push_str(&format!("{due:.6} {latency} {j}\n"));
        }
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("peers-loadgen: writing {path}: {e}");
        }
    }
    s.latencies_us.sort_unstable();
    s.send_lag_us.sort_unstable();
    let mut out = format!(
        "{{\"mode\":{},\"conns\":{},\"seconds\":{},\"answered\":{},\"connects\":{},\"connect_errors\":{},\"idle_closes\":{}",
        json_str(if client.args.mode == Mode::Open { "open" } else { "strict" }),
        client.args.conns,
        client.args.seconds,
        s.answered,
        s.connects,
        s.connect_errors,
        s.idle_closes
    );
    let statuses: Vec<String> = s
        .by_status
        .iter()
        .map(|(k, v)| format!("\"{k}\":{v}"))
        .collect();
    out.push_str(&format!(",\"by_status\":{{{}}}", statuses.join(",")));
    match client.args.mode {
        Mode::Open => {
            let l = &s.latencies_us;
            // Answered within the measured window (the latency record also holds the unanswered).
            let recorded = l.len() as f64 - s.unsent as f64 - s.unanswered_at_stop as f64;
            out.push_str(&format!(
                ",\"target_rate\":{},\"recorded\":{},\"unanswered_at_stop\":{},\"achieved_rate\":{:.1},\"unsent\":{},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{},\"send_lag_p50_us\":{},\"send_lag_p99_us\":{},\"send_lag_p999_us\":{}",
                client.args.rate,
                l.len(),
                s.unanswered_at_stop,
                recorded / client.args.seconds,
                s.unsent,
                quantile(l, 0.5),
                quantile(l, 0.9),
                quantile(l, 0.99),
                quantile(l, 0.999),
                l.last().copied().unwrap_or(0),
                quantile(&s.send_lag_us, 0.5),
                quantile(&s.send_lag_us, 0.99),
                quantile(&s.send_lag_us, 0.999),
            ));
            let errors: Vec<String> = s
                .errors
                .iter()
                .map(|(k, v)| format!("{}:{v}", json_str(k)))
                .collect();
            out.push_str(&format!(",\"errors\":{{{}}}", errors.join(",")));
        }
        Mode::Strict => {
            let lost: Vec<String> = s
                .lost
                .iter()
                .map(|(t, why)| format!("[{t:.4},{}]", json_str(why)))
                .collect();
            out.push_str(&format!(
                ",\"first_answer_s\":{},\"lost\":[{}]",
                s.first_answer.unwrap_or(-1.0),
                lost.join(",")
            ));
        }
    }
    out.push('}');
    println!("{out}");
}
