//! The user's side of the control channel to the spawner process.

use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeVal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::error::{Death, Error};
use super::job::Registry;
use super::wire::{self, FromSpawner, Received, Receiver, Status, ToSpawner};

/// How long a request to the spawner may take before the spawner counts as hung. Its work is a
/// fork or a reap of a process that is already exiting: milliseconds.
const SPAWNER_PATIENCE: Duration = Duration::from_secs(10);

/// A live spawner process and the channel to it, shared by every pool.
pub(crate) struct Link {
    pid: Pid,
    registry: Registry,
    chan: Mutex<Chan>,
    /// The cgroup's `oom_kill` count when last looked at: a rise tells an OOM kill from another
    /// SIGKILL.
    oom_kills: AtomicU64,
}

struct Chan {
    fd: Option<OwnedFd>,
    rx: Receiver,
    /// Set once the spawner is known to be gone: every later call fails at once with it.
    gone: Option<String>,
}

impl Link {
    pub(crate) fn new(pid: Pid, fd: OwnedFd, registry: Registry) -> std::io::Result<Self> {
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &TimeVal::new(SPAWNER_PATIENCE.as_secs() as _, 0),
        )?;
        Ok(Link {
            pid,
            registry,
            chan: Mutex::new(Chan {
                fd: Some(fd),
                rx: Receiver::new(),
                gone: None,
            }),
            oom_kills: AtomicU64::new(oom_kill_count().unwrap_or(0)),
        })
    }

    pub(crate) fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Sends a request and waits for its answer.
    pub(crate) fn request(
        &self,
        msg: &ToSpawner,
        fds: &[RawFd],
    ) -> Result<(FromSpawner, Vec<OwnedFd>), Error> {
        let mut chan = self.chan.lock().unwrap_or_else(|e| e.into_inner());
        let chan = &mut *chan;
        let body = match wire::encode(msg) {
            Ok(body) => body,
            Err(e) => return Err(self.gone(chan, format!("cannot encode a request: {e}"))),
        };
        let fd = self.usable(chan)?;
        if let Err(e) = wire::send(fd.as_fd(), &body, fds) {
            return Err(self.gone(chan, format!("sending to it failed: {e}")));
        }
        let fd = chan.fd.as_ref().expect("checked by usable()");
        match chan.rx.recv(fd.as_fd(), false) {
            Ok(Received::Message(body, fds)) => match wire::decode::<FromSpawner>(&body) {
                Ok(reply) => Ok((reply, fds)),
                Err(e) => Err(self.gone(chan, format!("it sent a malformed reply: {e}"))),
            },
            Ok(Received::Eof) => Err(self.gone(chan, "it closed the channel".into())),
            Ok(Received::WouldBlock) => {
                Err(self.gone(chan, format!("no answer within {SPAWNER_PATIENCE:?}")))
            }
            Err(e) => Err(self.gone(chan, format!("reading from it failed: {e}"))),
        }
    }

    /// Sends a message that has no answer (best effort: a gone spawner took its workers along).
    pub(crate) fn notify(&self, msg: &ToSpawner) {
        let mut chan = self.chan.lock().unwrap_or_else(|e| e.into_inner());
        let chan = &mut *chan;
        let Ok(fd) = self.usable(chan) else { return };
        if let Ok(body) = wire::encode(msg) {
            if let Err(e) = wire::send(fd.as_fd(), &body, &[]) {
                self.gone(chan, format!("sending to it failed: {e}"));
            }
        }
    }

    /// Asks the spawner how `pid` ended (killing it first if `kill`).
    pub(crate) fn reap(&self, pid: i32, kill: bool) -> Result<Death, Error> {
        match self.request(&ToSpawner::Reap { pid, kill }, &[])? {
            (FromSpawner::Reaped { pid: p, status }, _) if p == pid => Ok(self.death(status, kill)),
            (other, _) => Err(self.protocol(format!("expected Reaped({pid}), got {other:?}"))),
        }
    }

    fn death(&self, status: Status, killed_by_us: bool) -> Death {
        match status {
            Status::Exited(code) => Death::Exited(code),
            Status::Signaled { signal, core } => {
                if signal == libc::SIGKILL && !killed_by_us {
                    if let Some(now) = oom_kill_count() {
                        if now > self.oom_kills.swap(now, Ordering::Relaxed) {
                            return Death::OomKilled;
                        }
                    }
                }
                Death::Signaled {
                    signal,
                    core_dumped: core,
                }
            }
            Status::Unknown => Death::Unknown,
        }
    }

    pub(crate) fn protocol(&self, detail: String) -> Error {
        let mut chan = self.chan.lock().unwrap_or_else(|e| e.into_inner());
        self.gone(&mut chan, detail)
    }

    fn usable<'a>(&self, chan: &'a Chan) -> Result<&'a OwnedFd, Error> {
        if let Some(detail) = &chan.gone {
            return Err(Error::SpawnerGone {
                pid: self.pid(),
                detail: detail.clone(),
            });
        }
        Ok(chan.fd.as_ref().expect("fd is only taken on drop"))
    }

    /// Marks the spawner as gone (killing it if it still runs: it is of no use any more) and
    /// returns the error, with its exit status when it can be had.
    fn gone(&self, chan: &mut Chan, what: String) -> Error {
        if chan.gone.is_none() {
            let status = match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {
                    let _ = kill(self.pid, Signal::SIGKILL);
                    let _ = waitpid(self.pid, None);
                    "it was killed, being of no use".to_string()
                }
                Ok(WaitStatus::Exited(_, code)) => format!("it exited with code {code}"),
                Ok(WaitStatus::Signaled(_, sig, _)) => format!("it was killed by {sig}"),
                _ => "its status is unknown".to_string(),
            };
            chan.gone = Some(format!("{what}; {status}"));
        }
        Error::SpawnerGone {
            pid: self.pid(),
            detail: chan.gone.clone().unwrap_or_default(),
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let gone = {
            let mut chan = self.chan.lock().unwrap_or_else(|e| e.into_inner());
            // Closing the channel tells the spawner to kill its workers and exit.
            chan.fd.take();
            chan.gone.is_some()
        };
        if gone {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(200))
                }
                Ok(WaitStatus::StillAlive) => {
                    let _ = kill(self.pid, Signal::SIGKILL);
                    let _ = waitpid(self.pid, None);
                    return;
                }
                _ => return,
            }
        }
    }
}

/// The `oom_kill` count of this process's cgroup (v2), from `memory.events`.
fn oom_kill_count() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let events =
        std::fs::read_to_string(format!("/sys/fs/cgroup{}/memory.events", path.trim())).ok()?;
    events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}
