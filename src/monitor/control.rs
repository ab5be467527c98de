//! The control socket: a unix socket (mode 0600, peer uid checked) that takes one-line commands
//! from `tine ctl` and answers with text or JSON. Served by the monitor's poll loop, never blocking
//! it: a client that sends garbage or too much gets an error reply and is closed.

use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use serde_json::json;

use super::accept::{AcceptBackoff, AcceptError};
use super::queue;
use super::status::{shared_percent, Status};
use crate::ctl::protocol::{self, Reply, MAX_COMMAND};
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
                let _ = protocol::send_reply(stream, Err("permission denied: only root or the server's owner may use the control socket".into()));
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
        let _ = protocol::send_reply(client, reply);
    }

    pub(crate) fn cleanup(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `ctl status`: a table of the processes, then the tree's figures.
pub(super) fn status_text(s: &Status) -> String {
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
    let rows = &s.rows;
    let total_pss: u64 = rows.iter().map(|r| r.mem.pss_kb).sum();
    for r in rows {
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
        s.target, s.spare_workers, s.spare_activations
    ));
    for r in rows {
        if let (Some(nr), Some((elapsed, limit))) = (r.nr, r.profiling) {
            out.push_str(&format!(
                "profiling: worker {nr} (pid {}) for {} s, stops after {limit} s\n",
                r.pid,
                elapsed.as_secs()
            ));
        }
    }
    let dropped = s.log_lines_dropped;
    if dropped > 0 {
        out.push_str(&format!(
            "log lines dropped: {dropped} (stderr or the log file could not take them)\n"
        ));
    }
    if let Some(rollout) = &s.rollout {
        out.push_str(&format!("rollout: {rollout}\n"));
    }
    if let Some(failure) = s.last_rollout_failure {
        out.push_str(&format!("last failed rollout: {}\n", failure.describe()));
    }
    if s.resource_errors_total > 0 {
        out.push_str(&format!(
            "starts delayed for lack of resources (EAGAIN, ENOMEM, EMFILE, ENFILE): {}\n",
            s.resource_errors_total
        ));
    }
    out
}

/// The status as JSON: `{"processes": [...], "target": N, "total_pss_kb": N, ...}`. What `tine
/// top` shows comes from here: per process also its CPU time (`cpu_ms`, for CPU %), and for the
/// tree restarts by reason, the listeners' accept queues and the recent events.
pub(super) fn status_json(s: &Status) -> serde_json::Value {
    let rows = &s.rows;
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
    let queues = queue::depths(s.listeners);
    let listen_queues: Vec<_> = s
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
    let last_failed_rollout = s.last_rollout_failure.map(|f| {
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
        "target": s.target,
        "total_pss_kb": total_pss,
        "log_lines_dropped": s.log_lines_dropped,
        "rollout": s.rollout_json,
        "last_failed_rollout": last_failed_rollout,
        "rollouts_failed": s.rollouts_failed.values().sum::<u64>(),
        "spawn_resource_errors": s.resource_errors_total,
        "max_workers": s.max_workers,
        "generation": s.generation,
        "requests_total": s.requests_total,
        "reforks": s.reforks,
        "restarts": s.restarts,
        "listen_queues": listen_queues,
        "events": s.events.iter().collect::<Vec<_>>(),
        "spare_workers": s.spare_workers,
        "spare_activations": s.spare_activations,
    })
}
