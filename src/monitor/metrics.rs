//! Prometheus metrics on the optional `metrics_listen` address, served by the monitor's poll loop.
//!
//! The monitor is single-threaded and must never block, so this is a deliberately tiny HTTP/1.x
//! server: non-blocking accept, the request head read with a size cap and a deadline, one
//! response (`GET /metrics`: the text exposition format; any other path 404, another method 405,
//! a malformed head 400), then close. Nothing a client sends can panic or stall the monitor; a
//! bounded number of clients is kept, the oldest dropped first.
//!
//! What is exported comes from the monitor's table and the scoreboard: workers by state and
//! generation, requests (per worker, in flight, the tree's total including exited processes),
//! restarts by reason, reforks, log lines the tree could not write, memory per process (RSS, PSS,
//! USS: `smaps_rollup` walks page tables, so the figures come from the monitor's one cache,
//! `monitor::memory`, shared with `ctl status`: at most 1 s old)
//! and the accept-queue depth of every listener (from the kernel's `sock_diag` netlink interface,
//! which also covers unix listeners, whose queue `/proc/net/unix` does not show).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use super::accept::{AcceptBackoff, AcceptError};
use super::queue;
use super::status::{ProcessRow, Status};

/// Largest request head accepted (request line and headers).
const MAX_HEAD: usize = 8 * 1024;
/// Clients kept at once; a new one beyond this evicts the oldest.
pub(crate) const MAX_CLIENTS: usize = 16;
/// Time a client has to send its head and read the response.
const CLIENT_DEADLINE: Duration = Duration::from_secs(5);
/// How long what a client sends after its response is still read (so that closing does not reset
/// the connection under a response it has not read yet).
const DRAIN_DEADLINE: Duration = Duration::from_millis(500);
/// Bytes read from one client per wake-up of the monitor, at most: a client that keeps sending
/// cannot hold the single-threaded monitor (hang checks, reaping, `ctl`) in a read loop.
const READ_BUDGET: usize = 64 * 1024;

/// The metrics listener and its clients.
pub(crate) struct MetricsServer {
    listener: TcpListener,
    clients: Vec<Client>,
    next_id: u64,
    /// Highest total of requests reported: the counter never goes back, even while a promoted
    /// worker's count moves from its slot to the scoreboard header.
    requests_high_water: u64,
    backoff: AcceptBackoff,
}

struct Client {
    id: u64,
    stream: TcpStream,
    head: Vec<u8>,
    /// The response and how much of it is written, once the head is in.
    out: Option<(Vec<u8>, usize)>,
    since: Instant,
    /// The response is sent and the write side shut: what the client still sends is read and
    /// discarded, a bounded amount per wake-up, until EOF or this deadline.
    draining_until: Option<Instant>,
}

/// Whether the poll loop should wait to read from or to write to a client.
fn interest(c: &Client) -> nix::poll::PollFlags {
    if c.out.is_some() && c.draining_until.is_none() {
        nix::poll::PollFlags::POLLOUT
    } else {
        nix::poll::PollFlags::POLLIN
    }
}

impl MetricsServer {
    /// Binds `addr` (non-blocking).
    pub(crate) fn bind(addr: SocketAddr) -> io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on metrics_listen {addr}: {e}"),
            )
        })?;
        let server = Self::adopt(listener.into())?;
        if let Ok(bound) = server.local_addr() {
            tracing::info!(addr = %bound, "serving metrics at http://{bound}/metrics");
        }
        Ok(server)
    }

    /// Takes over a bound metrics listener (for example one handed across a re-exec).
    pub(crate) fn adopt(fd: OwnedFd) -> io::Result<MetricsServer> {
        let listener = TcpListener::from(fd);
        listener.set_nonblocking(true)?;
        Ok(MetricsServer {
            listener,
            clients: Vec::new(),
            next_id: 0,
            requests_high_water: 0,
            backoff: AcceptBackoff::default(),
        })
    }

    /// The address actually bound.
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The listening descriptor, to poll for readability (and to hand over).
    pub(crate) fn listener_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// The listener to poll for new clients; `None` while accepting is paused after an error.
    pub(crate) fn accept_fd(&self) -> Option<BorrowedFd<'_>> {
        (!self.backoff.is_paused()).then(|| self.listener.as_fd())
    }

    /// When a paused accept resumes (the poll loop wakes for it).
    pub(crate) fn accept_resumes_at(&self) -> Option<Instant> {
        self.backoff.resumes_at()
    }

    /// Each client's id, descriptor and the events to poll it for.
    pub(crate) fn client_fds(
        &self,
    ) -> impl Iterator<Item = (u64, BorrowedFd<'_>, nix::poll::PollFlags)> {
        self.clients
            .iter()
            .map(|c| (c.id, c.stream.as_fd(), interest(c)))
    }

    /// Accepts what is pending, dropping expired clients and, past the cap, the oldest.
    fn accept(&mut self) {
        self.expire();
        for _ in 0..MAX_CLIENTS {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => {
                    self.backoff.succeeded();
                    stream
                }
                // EMFILE and the like pause accepting: retrying at once would spin the monitor.
                Err(e) => match self.backoff.failed("metrics", &e) {
                    AcceptError::Skip => continue,
                    AcceptError::Empty | AcceptError::Paused => return,
                },
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if self.clients.len() >= MAX_CLIENTS {
                self.clients.remove(0);
            }
            self.next_id += 1;
            self.clients.push(Client {
                id: self.next_id,
                stream,
                head: Vec::new(),
                out: None,
                since: Instant::now(),
                draining_until: None,
            });
        }
    }

    /// Reads client `id`'s head; returns the parsed request once it is complete or bad.
    fn read_head(&mut self, id: u64) -> Option<Result<Target, Reject>> {
        let i = self.clients.iter().position(|c| c.id == id)?;
        let c = &mut self.clients[i];
        if c.out.is_some() {
            return None;
        }
        let mut chunk = [0u8; 1024];
        loop {
            match c.stream.read(&mut chunk) {
                Ok(0) => {
                    // The client went away before finishing its head: nobody to answer.
                    self.clients.remove(i);
                    return None;
                }
                Ok(n) => {
                    c.head.extend_from_slice(&chunk[..n]);
                    if let Some(end) = head_end(&c.head) {
                        return Some(parse_head(&c.head[..end]));
                    }
                    if c.head.len() > MAX_HEAD {
                        return Some(Err(Reject::TooLarge));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.clients.remove(i);
                    return None;
                }
            }
        }
    }

    /// Queues a response for client `id` and writes what the socket takes now.
    fn respond(&mut self, id: u64, response: Vec<u8>) {
        if let Some(c) = self.clients.iter_mut().find(|c| c.id == id) {
            c.out = Some((response, 0));
        }
        self.write(id);
    }

    /// Writes the rest of client `id`'s response; closes it when done or broken.
    fn write(&mut self, id: u64) {
        let Some(i) = self.clients.iter().position(|c| c.id == id) else {
            return;
        };
        let c = &mut self.clients[i];
        let Some((out, written)) = &mut c.out else {
            return;
        };
        loop {
            if *written == out.len() {
                // Sent: shut the write side, then read what the client sent beyond its head for
                // a moment (bounded per wake-up, see `drain`), so that closing does not reset
                // the connection before it has read the response.
                let _ = c.stream.shutdown(Shutdown::Write);
                c.draining_until = Some(Instant::now() + DRAIN_DEADLINE);
                self.drain(id);
                return;
            }
            match c.stream.write(&out[*written..]) {
                Ok(0) => break,
                Ok(n) => *written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        self.clients.remove(i);
    }

    /// Reads and discards at most [`READ_BUDGET`] bytes of what client `id` sends after its
    /// response; closes it at EOF, on an error or past its drain deadline.
    fn drain(&mut self, id: u64) {
        let Some(i) = self.clients.iter().position(|c| c.id == id) else {
            return;
        };
        let c = &mut self.clients[i];
        if c.draining_until.is_none_or(|until| Instant::now() >= until) {
            self.clients.remove(i);
            return;
        }
        let mut sink = [0u8; 4096];
        let mut budget = READ_BUDGET;
        while budget > 0 {
            match c.stream.read(&mut sink) {
                Ok(0) => break,
                Ok(n) => budget = budget.saturating_sub(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        if budget > 0 {
            // EOF or an error: done.
            self.clients.remove(i);
        }
        // Budget spent: the rest on a later wake-up, until the deadline.
    }

    /// Drops clients past their deadline (the whole exchange, or the drain after it).
    fn expire(&mut self) {
        let now = Instant::now();
        self.clients.retain(|c| {
            c.since.elapsed() < CLIENT_DEADLINE && c.draining_until.is_none_or(|u| now < u)
        });
    }
}

impl MetricsServer {
    /// The listener is readable: accept.
    pub(super) fn on_listener(&mut self) {
        self.accept();
    }

    /// Client `id` is readable or writable: read its head and answer, or write more of the answer.
    /// The monitor's `status` is taken only when a client asks for the metrics.
    pub(super) fn on_client<'m>(&mut self, id: u64, status: impl FnOnce() -> Status<'m>) {
        self.expire();
        let (writing, draining) = self
            .clients
            .iter()
            .find(|c| c.id == id)
            .map_or((false, false), |c| {
                (c.out.is_some(), c.draining_until.is_some())
            });
        if draining {
            self.drain(id);
        } else if writing {
            self.write(id);
        } else if let Some(request) = self.read_head(id) {
            let response = match request {
                Ok(Target::Metrics) => {
                    let body = render(&status(), &mut self.requests_high_water);
                    response(200, "OK", "text/plain; version=0.0.4; charset=utf-8", &body)
                }
                Ok(Target::WrongMethod) => response(
                    405,
                    "Method Not Allowed",
                    "text/plain",
                    "only GET /metrics\n",
                ),
                Ok(Target::Other) => response(
                    404,
                    "Not Found",
                    "text/plain",
                    "not found: try GET /metrics\n",
                ),
                Err(Reject::TooLarge) => {
                    response(400, "Bad Request", "text/plain", "request head too large\n")
                }
                Err(Reject::Malformed) => {
                    response(400, "Bad Request", "text/plain", "malformed request\n")
                }
            };
            self.respond(id, response);
        }
    }
}

/// What a well-formed request asked for.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Metrics,
    WrongMethod,
    Other,
}

/// Why a request head was refused.
#[derive(Debug, PartialEq, Eq)]
enum Reject {
    TooLarge,
    Malformed,
}

/// The length of the head up to and including its blank line, if it is complete.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Parses the request line of a complete head.
fn parse_head(head: &[u8]) -> Result<Target, Reject> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = std::str::from_utf8(line)
        .map_err(|_| Reject::Malformed)?
        .trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Reject::Malformed);
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    if !token(method) || !target.starts_with('/') || !matches!(version, "HTTP/1.0" | "HTTP/1.1") {
        return Err(Reject::Malformed);
    }
    let path = target.split(['?', '#']).next().unwrap_or_default();
    Ok(match (method, path) {
        ("GET", "/metrics") => Target::Metrics,
        (_, "/metrics") => Target::WrongMethod,
        _ => Target::Other,
    })
}

fn response(code: u16, reason: &str, content_type: &str, body: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if code == 405 {
        out.push_str("Allow: GET\r\n");
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

/// A label value, escaped for the text format.
fn esc(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A restart reason as a short, stable label: the text before any detail, which carries numbers
/// (`max_rss_mb (rss 130 MiB)` → `max_rss_mb`, `timeout: still alive…` → `timeout`).
pub(crate) fn reason_label(reason: &str) -> String {
    let head = reason.split([':', '(']).next().unwrap_or_default().trim();
    let mut out = String::new();
    for ch in head.chars() {
        let ch = if ch.is_ascii_alphanumeric() {
            ch.to_ascii_lowercase()
        } else {
            '_'
        };
        if !(ch == '_' && (out.is_empty() || out.ends_with('_'))) {
            out.push(ch);
        }
    }
    let out = out.trim_end_matches('_');
    if out.is_empty() {
        "unknown".into()
    } else {
        out.into()
    }
}

/// A metric family with one sample per item: name, type, help, and the item's value.
type Family<T, V> = (&'static str, &'static str, &'static str, fn(&T) -> V);

/// Writes `# HELP` and `# TYPE` of a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The whole exposition.
fn render(s: &Status, requests_high_water: &mut u64) -> String {
    let mut out = String::with_capacity(4096);
    let rows = &s.rows;

    family(
        &mut out,
        "tine_up",
        "gauge",
        "1 while the monitor serves (0 while it stops).",
    );
    let _ = writeln!(out, "tine_up {}", u8::from(s.running));
    family(
        &mut out,
        "tine_monitor_uptime_seconds",
        "gauge",
        "Seconds since the monitor started.",
    );
    let _ = writeln!(out, "tine_monitor_uptime_seconds {}", s.uptime.as_secs());
    family(
        &mut out,
        "tine_generation",
        "gauge",
        "Generation of the current mold.",
    );
    let _ = writeln!(out, "tine_generation {}", s.generation.unwrap_or(0));

    family(
        &mut out,
        "tine_workers_target",
        "gauge",
        "Workers the monitor keeps running.",
    );
    let _ = writeln!(out, "tine_workers_target {}", s.target);
    family(
        &mut out,
        "tine_workers",
        "gauge",
        "Worker processes by state and generation.",
    );
    for ((state, generation), n) in &s.workers_by_state {
        let _ = writeln!(
            out,
            "tine_workers{{state=\"{state}\",generation=\"{generation}\"}} {n}"
        );
    }

    family(
        &mut out,
        "tine_requests_total",
        "counter",
        "Requests served by the tree, exited processes included.",
    );
    let total = s.requests_total.max(*requests_high_water);
    *requests_high_water = total;
    let _ = writeln!(out, "tine_requests_total {total}");
    let workers: Vec<_> = rows.iter().filter(|r| r.role == "worker").collect();
    let per_worker: [Family<ProcessRow, String>; 5] = [
        (
            "tine_worker_requests_total",
            "counter",
            "Requests served by one worker process.",
            |r| r.requests.to_string(),
        ),
        (
            "tine_worker_requests_in_flight",
            "gauge",
            "Requests (or stream connections) a worker is serving.",
            |r| r.in_flight.to_string(),
        ),
        (
            "tine_worker_connections",
            "gauge",
            "Connections a worker holds (at most max_connections).",
            |r| r.connections.to_string(),
        ),
        (
            "tine_worker_max_connections_reached_total",
            "counter",
            "Times a worker stopped accepting because it held max_connections.",
            |r| r.accept_pauses.to_string(),
        ),
        (
            "tine_worker_oldest_request_seconds",
            "gauge",
            "Age of a worker's oldest request in flight (0: none).",
            |r| {
                let age = r.oldest_request.as_ref().map(|(_, a)| a.as_secs_f64());
                format!("{:.3}", age.unwrap_or(0.0))
            },
        ),
    ];
    for (name, kind, help, value) in per_worker {
        family(&mut out, name, kind, help);
        for r in &workers {
            let _ = writeln!(
                out,
                "{name}{{nr=\"{}\",pid=\"{}\",generation=\"{}\"}} {}",
                r.nr.unwrap_or(0),
                r.pid,
                r.generation,
                value(r)
            );
        }
    }

    family(
        &mut out,
        "tine_restarts_total",
        "counter",
        "Processes that ended and were replaced, by reason.",
    );
    let mut restarts: BTreeMap<String, u64> = BTreeMap::new();
    for (reason, n) in s.restarts {
        *restarts.entry(reason_label(reason)).or_default() += n;
    }
    for (reason, n) in &restarts {
        let _ = writeln!(out, "tine_restarts_total{{reason=\"{}\"}} {n}", esc(reason));
    }
    family(
        &mut out,
        "tine_reforks_total",
        "counter",
        "Completed reforks: workers promoted to mold.",
    );
    let _ = writeln!(out, "tine_reforks_total {}", s.reforks);
    family(
        &mut out,
        "tine_log_lines_dropped_total",
        "counter",
        "Log lines a process of the tree could not write (stderr gone, disk full, pipe full).",
    );
    let _ = writeln!(out, "tine_log_lines_dropped_total {}", s.log_lines_dropped);
    family(
        &mut out,
        "tine_monitor_slow_steps_total",
        "counter",
        "Steps of the monitor's loop that took over 100 ms (each logged with its name): every child, signal and ctl call waited for them.",
    );
    let _ = writeln!(out, "tine_monitor_slow_steps_total {}", s.slow_steps);
    family(
        &mut out,
        "tine_rollouts_failed_total",
        "counter",
        "Rollouts abandoned (new generation rolled back), by cause: reload or refork.",
    );
    for cause in ["reload", "refork"] {
        let n = s.rollouts_failed.get(cause).copied().unwrap_or(0);
        let _ = writeln!(out, "tine_rollouts_failed_total{{cause=\"{cause}\"}} {n}");
    }
    family(
        &mut out,
        "tine_last_rollout_failed",
        "gauge",
        "1 if the latest rollout that ended was abandoned (an older generation serves), else 0.",
    );
    let _ = writeln!(
        out,
        "tine_last_rollout_failed {}",
        u8::from(s.last_rollout_failed)
    );
    family(
        &mut out,
        "tine_spares",
        "gauge",
        "Hot spares (spare_workers): booted, not accepting, ready to take over (by state).",
    );
    for (state, n) in &s.spares_by_state {
        let _ = writeln!(out, "tine_spares{{state=\"{state}\"}} {n}");
    }
    family(
        &mut out,
        "tine_spare_activations_total",
        "counter",
        "Hot spares that took over from a worker that died, was recycled or was added.",
    );
    let _ = writeln!(out, "tine_spare_activations_total {}", s.spare_activations);
    family(
        &mut out,
        "tine_spawn_resource_errors_total",
        "counter",
        "Starts that failed for lack of resources (EAGAIN, ENOMEM, EMFILE, ENFILE), retried.",
    );
    let _ = writeln!(
        out,
        "tine_spawn_resource_errors_total {}",
        s.resource_errors_total
    );

    let memory_families = [
        (
            "tine_process_resident_memory_bytes",
            "Resident set size (RSS) of a process of the tree.",
        ),
        (
            "tine_process_pss_bytes",
            "Proportional set size (PSS): private memory plus a fair share of shared pages.",
        ),
        (
            "tine_process_uss_bytes",
            "Unique set size (USS): memory only this process maps.",
        ),
    ];
    for (i, (name, help)) in memory_families.iter().enumerate() {
        family(&mut out, name, "gauge", help);
        for r in rows {
            let kb = [r.mem.rss_kb, r.mem.pss_kb, r.mem.uss_kb][i];
            let nr = r.nr.map(|n| format!(",nr=\"{n}\"")).unwrap_or_default();
            let _ = writeln!(
                out,
                "{name}{{role=\"{}\"{nr},pid=\"{}\",generation=\"{}\"}} {}",
                r.role,
                r.pid,
                r.generation,
                kb * 1024
            );
        }
    }

    let queues = queue::depths(s.listeners);
    let per_listener: [Family<queue::Depth, u32>; 2] = [
        (
            "tine_listen_queue_length",
            "gauge",
            "Connections waiting in a listener's accept queue.",
            |q| q.waiting,
        ),
        (
            "tine_listen_queue_limit",
            "gauge",
            "A listener's accept queue limit (its effective backlog).",
            |q| q.limit,
        ),
    ];
    for (name, kind, help, value) in per_listener {
        family(&mut out, name, kind, help);
        for (listener, q) in s.listeners.iter().zip(&queues) {
            if let Some(q) = q {
                let addr = esc(&listener.addr().to_string());
                let _ = writeln!(out, "{name}{{listener=\"{addr}\"}} {}", value(q));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads() {
        assert_eq!(
            parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok(Target::Metrics)
        );
        assert_eq!(
            parse_head(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Ok(Target::Metrics)
        );
        assert_eq!(
            parse_head(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Ok(Target::WrongMethod)
        );
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\n\r\n"), Ok(Target::Other));
        assert_eq!(parse_head(b"GET /metrics\r\n\r\n"), Err(Reject::Malformed));
        assert_eq!(
            parse_head(b"GET metrics HTTP/1.1\r\n\r\n"),
            Err(Reject::Malformed)
        );
        assert_eq!(
            parse_head(b"G\xffT /metrics HTTP/1.1\r\n\r\n"),
            Err(Reject::Malformed)
        );
        assert_eq!(
            parse_head(b"GET /metrics HTTP/2\r\n\r\n"),
            Err(Reject::Malformed)
        );
        assert_eq!(parse_head(b"\r\n\r\n"), Err(Reject::Malformed));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\n\nrest"), Some(16));
    }

    #[test]
    fn restart_reasons_become_short_labels() {
        assert_eq!(reason_label("max_rss_mb (rss 130 MiB)"), "max_rss_mb");
        assert_eq!(
            reason_label("timeout: still alive after timeout_cleanup"),
            "timeout"
        );
        assert_eq!(reason_label("rollout to gen:3"), "rollout_to_gen");
        assert_eq!(reason_label("ctl kill-worker"), "ctl_kill_worker");
        assert_eq!(reason_label(""), "unknown");
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
