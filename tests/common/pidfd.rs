//! Signals that reach only the process that was meant.
//!
//! A pid read from `ctl status`, a log line or `/proc` may name another process by the time it is
//! signalled: the process exited, was reaped, and its number went to a new one (pid_max is 32768
//! here, and a build beside a test starts thousands of processes a minute). A `kill -9` by number
//! once took a `rustc` of a build running beside the chaos run. A [`ProcessHandle`] is a pidfd:
//! opened while the pid is checked to be the process wanted (a descendant of the monitor, say), it
//! names that process for good, and a signal through it reaches that process or nothing.

use std::os::fd::{AsFd, OwnedFd};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags};

use super::{proc_info, Proc};

/// A process, held by a pidfd (see the module doc).
#[derive(Debug)]
pub struct ProcessHandle {
    pid: i32,
    fd: OwnedFd,
}

impl ProcessHandle {
    /// A handle on `pid` if the process that has that number now passes `check` (given its
    /// `/proc/PID/stat`). The check is tied to the handle's process: the pidfd is opened first and
    /// must still be alive after the check (a live process keeps its number, so what `/proc` said
    /// was about it).
    pub fn open_if(pid: i32, check: impl FnOnce(&Proc) -> bool) -> Option<ProcessHandle> {
        // kill(0 or -1, …) semantics never apply to a pidfd, but pid 1 is never one of ours.
        if pid <= 1 {
            return None;
        }
        let fd = pidfd_open(Pid::from_raw(pid)?, PidfdFlags::empty()).ok()?;
        let handle = ProcessHandle { pid, fd };
        let info = proc_info(pid)?;
        (info.state != 'Z' && check(&info) && handle.alive()).then_some(handle)
    }

    /// A handle on `pid` if it is, now, a live descendant of `root` (its chain of parents reaches
    /// `root`).
    pub fn descendant_of(pid: i32, root: i32) -> Option<ProcessHandle> {
        ProcessHandle::open_if(pid, |p| descends_from(p, root))
    }

    /// The process's number (valid as a name for it only while it lives).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `sig` to this process; false if it has exited (nothing else can get it).
    pub fn signal(&self, sig: Signal) -> bool {
        let Some(sig) = rustix::process::Signal::from_named_raw(sig as i32) else {
            return false;
        };
        pidfd_send_signal(&self.fd, sig).is_ok()
    }

    /// Whether the process has not exited yet (a pidfd turns readable when it exits).
    pub fn alive(&self) -> bool {
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(0) => true,
            Ok(_) => false,
            // Cannot tell: treat as alive (a signal to an exited process is refused anyway).
            Err(_) => true,
        }
    }

    /// The process's state letter from `/proc/PID/stat` (`R`, `S`, `T`…), or `None` once it has
    /// exited (a zombie included): read by number, then confirmed to be this process.
    pub fn state(&self) -> Option<char> {
        let state = proc_info(self.pid)?.state;
        (state != 'Z' && self.alive()).then_some(state)
    }
}

/// Whether `p`'s chain of parents (read now from `/proc`) reaches `root`.
pub fn descends_from(p: &Proc, root: i32) -> bool {
    let mut parent = p.ppid;
    // A chain is short (monitor, mold, worker, an app's subprocess); bounded against a cycle read
    // across pid reuse.
    for _ in 0..64 {
        if parent == root {
            return true;
        }
        if parent <= 1 {
            return false;
        }
        match proc_info(parent) {
            Some(q) => parent = q.ppid,
            None => return false,
        }
    }
    false
}
