//! Forking, process attributes and the after-fork reset.

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;

use nix::sys::signal::{self, SigHandler, SigSet, SigmaskHow, Signal};
use nix::unistd::Pid;

/// What [`fork`] returned in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// This is the parent; the child has this pid.
    Parent(Pid),
    /// This is the new child.
    Child,
}

/// The process has more than one thread, so it must not fork.
#[derive(Debug, thiserror::Error)]
#[error("refusing to fork: this process has {count} threads ({names}); fork only from a single-threaded process")]
pub struct NotSingleThreaded {
    /// How many threads `/proc/self/task` lists.
    pub count: usize,
    /// Their names, from `/proc/self/task/*/comm`.
    pub names: String,
}

/// Lists the threads of this process as `tid:name` pairs.
pub fn threads() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for entry in dir.flatten() {
            let tid = entry.file_name().to_string_lossy().parse().unwrap_or(0);
            let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            out.push((tid, name.trim().to_string()));
        }
    }
    out.sort();
    out
}

/// Fails, naming the threads, unless this process has exactly one thread.
pub fn ensure_single_threaded() -> Result<(), NotSingleThreaded> {
    let threads = threads();
    if threads.len() <= 1 {
        return Ok(());
    }
    let names = threads
        .iter()
        .map(|(tid, name)| format!("{tid} {name:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    Err(NotSingleThreaded {
        count: threads.len(),
        names,
    })
}

/// Waits up to `patience` for this process to be single-threaded (exited threads can linger in
/// `/proc/self/task` for a moment), then checks once more.
pub fn await_single_threaded(patience: std::time::Duration) -> Result<(), NotSingleThreaded> {
    let until = std::time::Instant::now() + patience;
    while std::time::Instant::now() < until {
        if threads().len() <= 1 {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    ensure_single_threaded()
}

/// Forks this process after checking that it is single-threaded.
pub fn fork() -> io::Result<Forked> {
    ensure_single_threaded().map_err(io::Error::other)?;
    // SAFETY: the process has one thread (checked just above), so the child gets a consistent copy
    // of every lock and allocator state; no other thread can be holding one mid-update.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(Forked::Parent(child)),
        nix::unistd::ForkResult::Child => Ok(Forked::Child),
    }
}

/// Ends this process at once with `code`: no atexit handlers, no destructors, no stdio flush.
///
/// The right exit for a forked child that must not run its parent's cleanup.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` has no preconditions; it never returns.
    unsafe { libc::_exit(code) }
}

/// Sets the signal this process receives when its parent thread dies.
pub fn set_parent_death_signal(signal: Signal) -> io::Result<()> {
    nix::sys::prctl::set_pdeathsig(signal)?;
    Ok(())
}

/// Makes this process the reaper of orphaned descendants.
pub fn set_child_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)?;
    Ok(())
}

/// The scheduling policies [`switch_policy`] moves between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// `SCHED_OTHER`, the default.
    Other,
    /// `SCHED_BATCH`: a thread woken on a busy CPU does not preempt the task running there; it
    /// runs when that one sleeps or its time slice ends (at once on an idle CPU).
    Batch,
}

impl Policy {
    fn raw(self) -> libc::c_int {
        match self {
            Policy::Other => libc::SCHED_OTHER,
            Policy::Batch => libc::SCHED_BATCH,
        }
    }
}

/// Moves the calling thread (and the threads it starts later) from `from` to `to`, only if its
/// policy is `from` now: a policy the operator chose (`chrt`, a systemd `CPUSchedulingPolicy=`) is
/// left alone. Returns whether it switched. Both policies run at static priority 0, so no
/// privilege is needed between them.
pub fn switch_policy(from: Policy, to: Policy) -> io::Result<bool> {
    // SAFETY: sched_getscheduler takes no pointer; pid 0 names the calling thread.
    let current = unsafe { libc::sched_getscheduler(0) };
    if current < 0 {
        return Err(io::Error::last_os_error());
    }
    if current & !libc::SCHED_RESET_ON_FORK != from.raw() {
        return Ok(false);
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler reads `param`, a valid initialized struct that outlives the
    // call; pid 0 names the calling thread.
    let rc = unsafe { libc::sched_setscheduler(0, to.raw(), &param) };
    if rc == 0 {
        Ok(true)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets the short name of the calling thread (`comm`, 15 bytes).
pub fn set_thread_name(name: &str) {
    let short: String = name.chars().take(15).collect();
    if let Ok(c) = CString::new(short) {
        let _ = nix::sys::prctl::set_name(&c);
    }
}

/// Closes every fd of this process that is not in `keep`.
pub fn close_fds_except(keep: &[RawFd]) -> io::Result<()> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter(|fd| **fd >= 0)
        .map(|fd| *fd as u32)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut first = 0u32;
    for fd in keep.into_iter().chain(std::iter::once(u32::MAX)) {
        if fd > first {
            let last = fd - 1;
            // SAFETY: close_range only closes descriptors; the caller keeps the ones it still owns
            // in `keep`, and Rust objects that own closed fds are not used again in the child.
            let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if fd == u32::MAX {
            break;
        }
        first = fd + 1;
    }
    Ok(())
}

/// Restores every signal to its default action and unblocks all signals.
///
/// A forked child inherits the monitor's blocked mask (the monitor reads signals from a
/// signalfd) and any handlers; both must be undone before app code runs.
pub fn reset_signals() -> io::Result<()> {
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: installing SIG_DFL runs no code of ours in signal context.
        let _ = unsafe { signal::signal(sig, SigHandler::SigDfl) };
    }
    signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
    Ok(())
}

/// Ignores `signal` in this process (e.g. SIGPIPE in workers).
pub fn ignore_signal(sig: Signal) -> io::Result<()> {
    // SAFETY: SIG_IGN runs no code in signal context.
    unsafe { signal::signal(sig, SigHandler::SigIgn) }?;
    Ok(())
}
