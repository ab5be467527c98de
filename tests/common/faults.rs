//! Helpers for fault-injection tests: a stderr whose reader goes away, the tree's status read
//! over the control socket while its log is gone.

use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::time::Duration;

use super::{ctl, poll_until};

/// A reader of a child's stderr that passes lines through until one contains `pattern`, then
/// closes the pipe (every later write of the tree gets `EPIPE`) and reports EOF.
pub struct CloseAfterLine<R: Read> {
    inner: Option<BufReader<R>>,
    pattern: &'static str,
    pending: Vec<u8>,
    cut: bool,
}

impl<R: Read> CloseAfterLine<R> {
    /// Reads `reader` until a line containing `pattern` has been passed on.
    pub fn new(reader: R, pattern: &'static str) -> CloseAfterLine<R> {
        CloseAfterLine {
            inner: Some(BufReader::new(reader)),
            pattern,
            pending: Vec::new(),
            cut: false,
        }
    }
}

impl<R: Read> Read for CloseAfterLine<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pending.is_empty() {
            if self.cut {
                // Dropping the reader closes the read end of the pipe.
                self.inner = None;
                return Ok(0);
            }
            let Some(inner) = &mut self.inner else {
                return Ok(0);
            };
            let n = inner.read_until(b'\n', &mut self.pending)?;
            if n == 0 {
                return Ok(0);
            }
            if String::from_utf8_lossy(&self.pending).contains(self.pattern) {
                self.cut = true;
            }
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending[..n]);
        self.pending.drain(..n);
        Ok(n)
    }
}

/// `ctl status --json` on `socket`, parsed; `None` if the call fails.
pub fn status_json(socket: &Path) -> Option<serde_json::Value> {
    let out = ctl(socket, &["status", "--json"]).ok()?;
    serde_json::from_str(&out).ok()
}

/// The generation of the newest mold and of every worker (`ctl status --json`).
pub fn generations(status: &serde_json::Value) -> (u64, Vec<(u64, String)>) {
    let procs = status["processes"].as_array().cloned().unwrap_or_default();
    let mold = procs
        .iter()
        .filter(|p| p["role"] == "mold")
        .filter_map(|p| p["generation"].as_u64())
        .max()
        .unwrap_or(0);
    let workers = procs
        .iter()
        .filter(|p| p["role"] == "worker")
        .map(|p| {
            (
                p["generation"].as_u64().unwrap_or(0),
                p["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    (mold, workers)
}

/// Waits until the tree on `socket` has `workers` serving workers, all of a generation newer
/// than `after` (pass `None` to accept any), from a mold of that generation. Returns the
/// generation; `Err` with the last status on timeout.
pub fn wait_generation(
    socket: &Path,
    workers: usize,
    after: Option<u64>,
    timeout: Duration,
) -> Result<u64, String> {
    let mut last = String::new();
    poll_until(timeout, || {
        let status = status_json(socket)?;
        last = status.to_string();
        let (mold, ws) = generations(&status);
        let newer = after.is_none_or(|g| mold > g);
        let serving = ws.len() == workers
            && ws
                .iter()
                .all(|(g, s)| *g == mold && (s == "ready" || s == "busy"));
        (newer && serving).then_some(mold)
    })
    .ok_or(last)
}

/// CPU time (user + system) that process `pid` has used so far; `None` once it is gone.
pub fn cpu_time(pid: i32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Some(Duration::from_millis(ticks * 1000 / per_second))
}

/// The soft and hard "Max open files" of `pid`, from `/proc/PID/limits`.
pub fn open_files_limit(pid: i32) -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut numbers = line["Max open files".len()..].split_whitespace();
    Some((numbers.next()?.parse().ok()?, numbers.next()?.parse().ok()?))
}

/// Number of open descriptors of `pid`.
pub fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A reader of a child's stderr that passes lines through until one contains `pattern`, then
/// shrinks the pipe to one page and stops reading, holding it open: a reader that stalls (a
/// paused pager, a stuck log collector). Reports EOF after `hold` (the test is over by then).
pub struct StallAfterLine {
    inner: CloseAfterLine<std::process::ChildStderr>,
    fd: std::os::fd::RawFd,
    hold: Duration,
}

impl StallAfterLine {
    /// Reads `reader` until a line containing `pattern` has been passed on, then stalls.
    pub fn new(
        reader: std::process::ChildStderr,
        pattern: &'static str,
        hold: Duration,
    ) -> StallAfterLine {
        use std::os::fd::AsRawFd;
        let fd = reader.as_raw_fd();
        StallAfterLine {
            inner: CloseAfterLine::new(reader, pattern),
            fd,
            hold,
        }
    }
}

impl Read for StallAfterLine {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.inner.cut || !self.inner.pending.is_empty() {
            return self.inner.read(buf);
        }
        // Everything written so far has been read: the pipe is empty, so it can shrink to the
        // smallest size (the tree grew it at start), and a few lines fill it.
        let _ = nix::fcntl::fcntl(self.fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(4096));
        std::thread::sleep(self.hold);
        Ok(0)
    }
}
