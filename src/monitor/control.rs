//! The control socket: a unix socket (mode 0600, peer uid checked) that takes one-line commands
//! from `tine ctl` and answers with text or JSON. Served by the monitor's poll loop, never blocking
//! it: a client that sends garbage or too much gets an error reply and is closed.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use serde_json::json;

use super::{Child, Kind, Monitor, Phase};
use crate::ctl::protocol::{self, parse, Op, Reply, MAX_COMMAND};
use crate::ipc::scoreboard::{age, SlotView};
use crate::sys::meminfo;

/// Clients kept at once while they send their command.
pub(crate) const MAX_CLIENTS: usize = 32;

/// The listening control socket and its connected clients.
pub(crate) struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    clients: Vec<Client>,
    backoff: AcceptBackoff,
}

/// What to do after a failed `accept`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AcceptError {
    /// Nothing is pending.
    Empty,
    /// That one connection failed (aborted by its client, interrupted): accept the next.
    Skip,
    /// A resource is short (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`): accepting is paused.
    Paused,
}

/// Pauses accepting on a listener after an error that retrying at once would only repeat. The
/// connection stays queued, so the listener stays readable: polling it again right away would
/// spin the single-threaded monitor at 100% CPU. The pause doubles with every failure in a row,
/// from 10 ms to 1 s; the listener is left out of the poll set meanwhile.
#[derive(Debug, Default)]
pub(crate) struct AcceptBackoff {
    failures: u32,
    until: Option<Instant>,
}

impl AcceptBackoff {
    /// Whether accepting is paused now.
    pub(crate) fn is_paused(&self) -> bool {
        self.until.is_some_and(|u| Instant::now() < u)
    }

    /// When the pause ends, if one is on.
    pub(crate) fn resumes_at(&self) -> Option<Instant> {
        self.until.filter(|u| Instant::now() < *u)
    }

    /// An accept succeeded: no pause.
    pub(crate) fn succeeded(&mut self) {
        self.failures = 0;
        self.until = None;
    }

    /// Classifies a failed accept on `what` and pauses if a resource is short.
    pub(crate) fn failed(&mut self, what: &str, e: &io::Error) -> AcceptError {
        if e.kind() == io::ErrorKind::WouldBlock {
            return AcceptError::Empty;
        }
        if matches!(
            e.raw_os_error(),
            Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO | libc::EPERM)
        ) {
            return AcceptError::Skip;
        }
        self.failures = self.failures.saturating_add(1);
        let pause = Duration::from_millis(10 << self.failures.min(7)).min(Duration::from_secs(1));
        self.until = Some(Instant::now() + pause);
        if self.failures == 1 {
            tracing::warn!(error = %e, "{what}: accept failed; pausing accepts (retried with backoff up to 1 s)");
        } else {
            tracing::debug!(error = %e, failures = self.failures, "{what}: accept failed again");
        }
        AcceptError::Paused
    }
}

struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
    since: Instant,
}

/// A complete command from a client.
pub(crate) struct Request {
    pub client: UnixStream,
    pub command: Result<String, String>,
}

impl ControlServer {
    /// Binds the socket with mode 0600.
    pub(crate) fn bind(path: &Path) -> io::Result<ControlServer> {
        crate::listener::remove_stale_socket(path).map_err(|e| {
            io::Error::new(e.kind(), format!("control socket {}: {e}", path.display()))
        })?;
        let listener = UnixListener::bind(path).map_err(|e| {
            io::Error::new(e.kind(), format!("control socket {}: {e}", path.display()))
        })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(ControlServer {
            listener,
            path: path.to_owned(),
            clients: Vec::new(),
            backoff: AcceptBackoff::default(),
        })
    }

    /// Takes over a control socket handed across a re-exec.
    pub(crate) fn adopt(fd: std::os::fd::OwnedFd, path: &Path) -> io::Result<ControlServer> {
        let listener = UnixListener::from(fd);
        listener.set_nonblocking(true)?;
        Ok(ControlServer {
            listener,
            path: path.to_owned(),
            clients: Vec::new(),
            backoff: AcceptBackoff::default(),
        })
    }

    /// The path the socket is bound to.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn listener_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    pub(crate) fn client_fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.clients.iter().map(|c| c.stream.as_fd())
    }

    /// The listener to poll for new clients; `None` while accepting is paused after an error.
    pub(crate) fn accept_fd(&self) -> Option<BorrowedFd<'_>> {
        (!self.backoff.is_paused()).then(|| self.listener.as_fd())
    }

    /// When a paused accept resumes (the poll loop wakes for it).
    pub(crate) fn accept_resumes_at(&self) -> Option<Instant> {
        self.backoff.resumes_at()
    }

    /// Accepts pending clients, at most [`MAX_CLIENTS`] per call (the rest on the next turn of the
    /// loop); refuses those of another user (root is always allowed). After an accept error that
    /// would repeat (out of descriptors), pauses accepting instead of spinning.
    pub(crate) fn accept(&mut self) {
        // Clients that said nothing in time free their descriptors first.
        self.clients
            .retain(|c| c.since.elapsed() < Duration::from_secs(10));
        for _ in 0..MAX_CLIENTS {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => {
                    self.backoff.succeeded();
                    stream
                }
                Err(e) => match self.backoff.failed("control socket", &e) {
                    AcceptError::Skip => continue,
                    AcceptError::Empty | AcceptError::Paused => return,
                },
            };
            // The socket's mode is only the first fence (a chmod or a shared directory opens it):
            // the peer's credentials, from the kernel, decide.
            let cred = getsockopt(&stream, PeerCredentials).ok();
            let owner = nix::unistd::geteuid().as_raw();
            let allowed = cred.is_some_and(|c| c.uid() == 0 || c.uid() == owner);
            if !allowed {
                tracing::warn!(
                    peer_uid = cred.map(|c| c.uid() as i64).unwrap_or(-1),
                    peer_pid = cred.map(|c| c.pid()).unwrap_or(0),
                    "control socket: refused a client of another user"
                );
                let _ = reply_to(stream, Err("permission denied: only root or the server's owner may use the control socket".into()));
                continue;
            }
            if stream.set_nonblocking(true).is_ok() {
                // Full of clients that say nothing: the oldest makes room, so a real `ctl` call
                // always gets through.
                if self.clients.len() >= MAX_CLIENTS {
                    self.clients.remove(0);
                }
                self.clients.push(Client {
                    stream,
                    buf: Vec::new(),
                    since: Instant::now(),
                });
            }
        }
    }

    /// Reads from client `i`; returns its command once a whole line (or an error) is in.
    pub(crate) fn read(&mut self, i: usize) -> Option<Request> {
        let client = self.clients.get_mut(i)?;
        let mut chunk = [0u8; 512];
        let done = loop {
            match client.stream.read(&mut chunk) {
                Ok(0) => break true,
                Ok(n) => {
                    client.buf.extend_from_slice(&chunk[..n]);
                    if client.buf.contains(&b'\n') || client.buf.len() > MAX_COMMAND {
                        break true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                Err(_) => break true,
            }
        };
        if !done {
            return None;
        }
        let mut client = self.clients.remove(i);
        if client.buf.len() > MAX_COMMAND {
            // Drain a bounded amount of what is still coming, so that closing with unread data
            // does not reset the connection before the client reads the error.
            for _ in 0..64 {
                if !matches!(client.stream.read(&mut chunk), Ok(n) if n > 0) {
                    break;
                }
            }
        }
        let command = protocol::decode_command(&client.buf);
        Some(Request {
            client: client.stream,
            command,
        })
    }

    pub(crate) fn reply(&self, client: UnixStream, reply: Reply) {
        let _ = reply_to(client, reply);
    }

    pub(crate) fn cleanup(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Writes a reply and closes the connection, never waiting: a reply (a few KiB) fits in a fresh
/// socket's send buffer, so only a client that sent much more than a command and reads nothing
/// can fill it, and then it loses the rest of its reply, not the monitor its time.
pub(crate) fn reply_to(mut stream: UnixStream, reply: Reply) -> io::Result<()> {
    stream.set_nonblocking(true)?;
    stream.write_all(protocol::encode_reply(reply).as_bytes())
}

/// Runs one command against the monitor.
pub(crate) fn handle(m: &mut Monitor, command: Result<String, String>) -> Reply {
    match parse(&command?)? {
        Op::Status { json: false } => Ok(status_text(m)),
        Op::Status { json: true } => Ok(format!("{}\n", status_json(m))),
        Op::Scale(n) => {
            if n == 0 || n > m.config.max_workers {
                return Err(format!(
                    "scale: {n} is out of range 1..={}",
                    m.config.max_workers
                ));
            }
            let target = m.scale(n, "ctl scale");
            Ok(format!("workers: {target}\n"))
        }
        Op::Stop { quick: false } => {
            m.stop(true, "ctl stop");
            Ok("stopping\n".into())
        }
        Op::Stop { quick: true } => {
            m.stop(false, "ctl stop --quick");
            Ok("stopping quickly\n".into())
        }
        Op::KillWorker(nr) => {
            let slot = m
                .children
                .iter()
                .find(|(_, c)| c.kind == Kind::Worker && c.nr == nr && !c.is_retiring())
                .map(|(s, _)| *s)
                .ok_or_else(|| format!("kill-worker: no worker {nr}"))?;
            m.kill_child(slot, "ctl kill-worker");
            Ok(format!("killed worker {nr}\n"))
        }
        // The loop passes `refork` its connection to wait on; this is only reached for a client
        // settled just before a reload's exec, which rolls every worker over anyway.
        Op::Refork => Err("refork refused: a reload is in progress".into()),
        // Likewise: the loop keeps a `profile` client until the worker answers.
        Op::Profile { .. } => Err("profile refused: a reload is in progress".into()),
        Op::ReopenLogs => m.reopen_logs(),
    }
}

/// One process of the tree, as `status` and the metrics show it.
pub(crate) struct ProcessRow {
    pub role: &'static str,
    /// Worker number (workers only).
    pub nr: Option<u32>,
    pub pid: i32,
    pub generation: u32,
    pub state: String,
    pub requests: u64,
    pub in_flight: u64,
    /// Connections a worker holds, and times it stopped accepting at `max_connections`.
    pub connections: u64,
    pub accept_pauses: u64,
    /// Method and path of the oldest request in flight, and how long it has run.
    pub oldest_request: Option<(String, Duration)>,
    pub uptime_s: u64,
    pub mem: meminfo::Memory,
    /// The profile running in this worker: for how long, and its limit in seconds.
    pub profiling: Option<(Duration, u32)>,
}

/// The state of a child as shown to operators: the monitor's phase, refined by the scoreboard.
pub(crate) fn child_state(c: &Child, view: Option<&SlotView>) -> &'static str {
    match &c.phase {
        Phase::Retiring { .. } => "retiring",
        Phase::Starting => "starting",
        Phase::Promoting => "promoting",
        Phase::Ready => view.map(|v| v.state.name()).unwrap_or("ready"),
    }
}

/// The monitor, then molds, workers by number and hot spares, with memory from the monitor's cache.
pub(crate) fn process_rows(m: &Monitor) -> Vec<ProcessRow> {
    let pid = std::process::id() as i32;
    let generation = m.current_mold().map(|(_, c)| c.generation).unwrap_or(0);
    let mut rows = vec![ProcessRow {
        role: "monitor",
        nr: None,
        pid,
        generation,
        state: if m.is_running() {
            "running".into()
        } else {
            "stopping".into()
        },
        requests: 0,
        in_flight: 0,
        connections: 0,
        accept_pauses: 0,
        oldest_request: None,
        uptime_s: m.started.elapsed().as_secs(),
        mem: m.memory.get(pid),
        profiling: None,
    }];
    let mut children: Vec<_> = m.children.iter().filter(|(_, c)| c.pid.is_some()).collect();
    // Molds, workers by number, then spares.
    children.sort_by_key(|(s, c)| (c.kind != Kind::Mold, c.kind == Kind::Spare, c.nr, **s));
    for (slot, c) in children {
        // A slot still holding another pid (not claimed yet) says nothing about this child.
        let view = m.board.read(*slot).filter(|v| v.pid == c.pid_raw());
        let oldest_request = view
            .as_ref()
            .filter(|v| v.in_flight > 0 && v.oldest_start_ms > 0)
            .map(|v| (v.request.clone(), age(v.oldest_start_ms)));
        rows.push(ProcessRow {
            role: c.kind.name(),
            nr: (c.kind == Kind::Worker).then_some(c.nr),
            pid: c.pid_raw(),
            generation: c.generation,
            state: child_state(c, view.as_ref()).to_string(),
            requests: view.as_ref().map(|v| v.requests).unwrap_or(0),
            in_flight: view.as_ref().map(|v| v.in_flight).unwrap_or(0),
            connections: view.as_ref().map(|v| v.connections).unwrap_or(0),
            accept_pauses: view.as_ref().map(|v| v.accept_pauses).unwrap_or(0),
            oldest_request,
            uptime_s: c.started.elapsed().as_secs(),
            mem: m.memory.get(c.pid_raw()),
            profiling: m
                .profiles
                .running(c.pid_raw())
                .map(|run| (run.since.elapsed(), run.seconds)),
        });
    }
    let live: Vec<i32> = rows.iter().map(|r| r.pid).collect();
    m.memory.retain(&live);
    rows
}

pub(crate) fn shared_percent(mem: &meminfo::Memory) -> f64 {
    if mem.rss_kb == 0 {
        0.0
    } else {
        100.0 * mem.shared_kb as f64 / mem.rss_kb as f64
    }
}

fn status_text(m: &Monitor) -> String {
    let mut out = format!(
        "{:<8} {:>3} {:>8} {:>4} {:<10} {:>10} {:>8} {:>9} {:>9} {:>9} {:>7}\n",
        "ROLE",
        "NR",
        "PID",
        "GEN",
        "STATE",
        "REQUESTS",
        "UPTIME",
        "RSS_KB",
        "PSS_KB",
        "USS_KB",
        "SHARED"
    );
    let rows = process_rows(m);
    let total_pss: u64 = rows.iter().map(|r| r.mem.pss_kb).sum();
    for r in &rows {
        out.push_str(&format!(
            "{:<8} {:>3} {:>8} {:>4} {:<10} {:>10} {:>7}s {:>9} {:>9} {:>9} {:>6.1}%\n",
            r.role,
            r.nr.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
            r.pid,
            r.generation,
            r.state,
            r.requests,
            r.uptime_s,
            r.mem.rss_kb,
            r.mem.pss_kb,
            r.mem.uss_kb,
            shared_percent(&r.mem)
        ));
    }
    out.push_str(&format!(
        "total PSS: {total_pss} KiB; workers: target {}; spares: {} kept, {} activated\n",
        m.target, m.config.spare_workers, m.spare_activations
    ));
    for r in &rows {
        if let (Some(nr), Some((elapsed, limit))) = (r.nr, r.profiling) {
            out.push_str(&format!(
                "profiling: worker {nr} (pid {}) for {} s, stops after {limit} s\n",
                r.pid,
                elapsed.as_secs()
            ));
        }
    }
    let dropped = crate::log::lines_dropped();
    if dropped > 0 {
        out.push_str(&format!(
            "log lines dropped: {dropped} (stderr or the log file could not take them)\n"
        ));
    }
    if let Some(rollout) = m.rollout_status() {
        out.push_str(&format!("rollout: {rollout}\n"));
    }
    if let Some(failure) = &m.last_rollout_failure {
        out.push_str(&format!("last failed rollout: {}\n", failure.describe()));
    }
    if m.resource_errors_total > 0 {
        out.push_str(&format!(
            "starts delayed for lack of resources (EAGAIN, ENOMEM, EMFILE, ENFILE): {}\n",
            m.resource_errors_total
        ));
    }
    out
}

/// The status as JSON: `{"processes": [...], "target": N, "total_pss_kb": N, ...}`. What `tine
/// top` shows comes from here: per process also its CPU time (`cpu_ms`, for CPU %), and for the
/// tree restarts by reason, the listeners' accept queues and the recent events.
pub(crate) fn status_json(m: &Monitor) -> serde_json::Value {
    let rows = process_rows(m);
    let total_pss: u64 = rows.iter().map(|r| r.mem.pss_kb).sum();
    let processes: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({
                "role": r.role,
                "nr": r.nr,
                "pid": r.pid,
                "generation": r.generation,
                "state": r.state,
                "requests": r.requests,
                "uptime_s": r.uptime_s,
                "rss_kb": r.mem.rss_kb,
                "pss_kb": r.mem.pss_kb,
                "uss_kb": r.mem.uss_kb,
                "shared_percent": (shared_percent(&r.mem) * 10.0).round() / 10.0,
                "in_flight": r.in_flight,
                "connections": r.connections,
                "oldest_request": r.oldest_request.as_ref().map(|(text, _)| text.clone()),
                "oldest_request_ms": r.oldest_request.as_ref().map(|(_, age)| age.as_millis() as u64),
                "cpu_ms": meminfo::cpu_seconds(r.pid).map(|s| (s * 1000.0).round() as u64),
                "profiling": r.profiling.map(|(elapsed, limit)| json!({
                    "elapsed_ms": elapsed.as_millis() as u64,
                    "max_seconds": limit,
                })),
            })
        })
        .collect();
    let queues = super::metrics::queue::depths(&m.listeners);
    let listen_queues: Vec<_> = m
        .listeners
        .iter()
        .zip(&queues)
        .map(|(l, q)| {
            json!({
                "listener": l.addr().to_string(),
                "waiting": q.map(|q| q.waiting),
                "limit": q.map(|q| q.limit),
            })
        })
        .collect();
    let last_failed_rollout = m.last_rollout_failure.as_ref().map(|f| {
        json!({
            "cause": f.cause.name(),
            "generation": f.generation,
            "from": f.from,
            "reason": f.reason,
            "text": f.describe(),
        })
    });
    json!({
        "processes": processes,
        "target": m.target,
        "total_pss_kb": total_pss,
        "log_lines_dropped": crate::log::lines_dropped(),
        "rollout": m.rollout_json(),
        "last_failed_rollout": last_failed_rollout,
        "rollouts_failed": m.rollouts_failed.values().sum::<u64>(),
        "spawn_resource_errors": m.resource_errors_total,
        "max_workers": m.config.max_workers,
        "generation": m.current_mold().map(|(_, c)| c.generation),
        "requests_total": super::metrics::total_requests(m.board),
        "reforks": m.board.reforks(),
        "restarts": m.restarts,
        "listen_queues": listen_queues,
        "events": m.events.iter().collect::<Vec<_>>(),
        "spare_workers": m.config.spare_workers,
        "spare_activations": m.spare_activations,
    })
}
