//! Signals to the processes of a test's tree through pidfds, never by number: the pid a test read
//! from `ctl status`, the log or `/proc` is checked to be a live descendant of the server's
//! monitor as the pidfd is opened, so the signal reaches that process or nothing (see
//! [`pidfd`](super::pidfd) for why a number is not enough).

use nix::sys::signal::Signal;

use super::pidfd::ProcessHandle;
use super::Server;

impl Server {
    /// A pidfd on `pid`, checked to be a live process of this tree (a descendant of the monitor)
    /// now. Panics, with the tree and the log, if it is not: a test names a process it has just
    /// seen in the tree, so one gone already is the test's failure, not something to skip.
    pub fn process(&self, pid: i32) -> ProcessHandle {
        ProcessHandle::descendant_of(pid, self.pid).unwrap_or_else(|| {
            panic!(
                "pid {pid} is not a live process of the tree of monitor {}: {:?}; log:\n{}",
                self.pid,
                self.tree(),
                self.log.text()
            )
        })
    }

    /// Sends `sig` to `pid`, a process of this tree, through a pidfd (see [`Server::process`]).
    pub fn signal_process(&self, pid: i32, sig: Signal) {
        let process = self.process(pid);
        assert!(
            process.signal(sig),
            "{sig} to pid {pid}: it exited as it was signalled"
        );
    }
}
