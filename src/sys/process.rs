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

/// Why this process must not fork: it has more than one thread, or its threads cannot be counted.
#[derive(Debug, thiserror::Error)]
pub enum NotSingleThreaded {
    /// `/proc/self/task` lists more than one thread.
    #[error("refusing to fork: this process has {count} threads ({names}); fork only from a single-threaded process")]
    Threads {
        /// How many threads `/proc/self/task` lists.
        count: usize,
        /// Their names, from `/proc/self/task/*/comm`.
        names: String,
    },
    /// `/proc/self/task` could not be read: the fork is refused rather than risked blind.
    #[error("refusing to fork: cannot count this process's threads ({0}); is /proc mounted?")]
    Unknown(String),
}

/// Where the kernel lists the threads of this process.
const TASK_DIR: &str = "/proc/self/task";

/// Lists the threads of this process as `tid:name` pairs; fails if `/proc/self/task` cannot be
/// read (no /proc, or another file system mounted over it).
pub fn threads() -> io::Result<Vec<(u32, String)>> {
    threads_in(std::path::Path::new(TASK_DIR))
}

/// Lists the threads in a `/proc/PID/task`-like directory. Every process has a thread, so an
/// empty or unparsable listing is an error, never "no other thread".
fn threads_in(dir: &std::path::Path) -> io::Result<Vec<(u32, String)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let tid = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                io::Error::other(format!("{} lists {:?}", dir.display(), entry.file_name()))
            })?;
        let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        out.push((tid, name.trim().to_string()));
    }
    if out.is_empty() {
        return Err(io::Error::other(format!(
            "{} lists no thread",
            dir.display()
        )));
    }
    out.sort();
    Ok(out)
}

/// The decision of [`ensure_single_threaded`] on a listing of threads.
fn single_threaded(threads: io::Result<Vec<(u32, String)>>) -> Result<(), NotSingleThreaded> {
    let threads = threads.map_err(|e| NotSingleThreaded::Unknown(format!("{TASK_DIR}: {e}")))?;
    if threads.len() == 1 {
        return Ok(());
    }
    let names = threads
        .iter()
        .map(|(tid, name)| format!("{tid} {name:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    Err(NotSingleThreaded::Threads {
        count: threads.len(),
        names,
    })
}

/// Fails, naming the threads, unless this process has exactly one thread. Fails too when the
/// threads cannot be counted: forking blind could copy a lock held by a thread nobody saw.
pub fn ensure_single_threaded() -> Result<(), NotSingleThreaded> {
    single_threaded(threads())
}

/// Waits up to `patience` for this process to be single-threaded (exited threads can linger in
/// `/proc/self/task` for a moment), then checks once more.
pub fn await_single_threaded(patience: std::time::Duration) -> Result<(), NotSingleThreaded> {
    let until = std::time::Instant::now() + patience;
    while std::time::Instant::now() < until {
        match threads() {
            Ok(t) if t.len() == 1 => return Ok(()),
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
            Err(_) => break,
        }
    }
    ensure_single_threaded()
}

/// Whether a failed start (`fork`, `socketpair`, building a runtime: an `io::Error` as the mold
/// or the monitor got it) means that the system lacked a resource (processes, memory,
/// descriptors) rather than that the new code is broken: such a start is retried, never counted.
#[cfg(feature = "server")]
pub(crate) fn is_resource_error(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EAGAIN | libc::ENOMEM | libc::EMFILE | libc::ENFILE)
    )
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

/// The calling thread's nice value (`getpriority`; on Linux, `PRIO_PROCESS` with pid 0 names
/// the calling thread, and a process of one thread is that thread).
pub fn nice() -> io::Result<i32> {
    nice_of_raw(0)
}

/// The nice value of thread `tid` (a process's main thread has its pid).
pub fn nice_of(tid: Pid) -> io::Result<i32> {
    match libc::id_t::try_from(tid.as_raw()) {
        // 0 would name the calling thread.
        Ok(0) | Err(_) => Err(io::Error::from(io::ErrorKind::InvalidInput)),
        Ok(who) => nice_of_raw(who),
    }
}

/// `getpriority(PRIO_PROCESS, who)`, told apart from a failure (a nice value may be -1).
fn nice_of_raw(who: libc::id_t) -> io::Result<i32> {
    // SAFETY: errno is thread-local and writable; it is cleared so that a nice value of -1 can be
    // told from a failure, as getpriority(2) prescribes.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: getpriority takes no pointer; `who` names a thread (0: the calling one), and a
    // number of no thread only makes it fail with ESRCH.
    let n = unsafe { libc::getpriority(libc::PRIO_PROCESS, who) };
    if n == -1 {
        let e = io::Error::last_os_error();
        if e.raw_os_error().is_some_and(|code| code != 0) {
            return Err(e);
        }
    }
    Ok(n)
}

/// Sets the calling thread's nice value (`setpriority`): lowering it needs `CAP_SYS_NICE` or a
/// high enough `RLIMIT_NICE` (`EACCES` otherwise); raising it never does.
pub fn set_nice(n: i32) -> io::Result<()> {
    // SAFETY: setpriority takes no pointer; pid 0 names the calling thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, n) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets the nice value of thread `tid` (a process's main thread has its pid): lowering it needs
/// `CAP_SYS_NICE` or a high enough `RLIMIT_NICE`, and for another user's thread `CAP_SYS_NICE`.
pub fn set_nice_of(tid: Pid, n: i32) -> io::Result<()> {
    let who = libc::id_t::try_from(tid.as_raw())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    if who == 0 {
        // 0 would name the calling thread.
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: setpriority takes no pointer; `who` names one thread (never 0, the caller).
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, who, n) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
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
    switch_policy_of(0, from, to)
}

/// As [`switch_policy`], for thread `tid` (0: the calling thread).
///
/// # Contract
///
/// `tid` is 0, a thread of this process that cannot exit before the call returns, or the main
/// thread of a child of this process that it has not reaped (a zombie keeps its number): a
/// number the kernel has handed to another thread since would switch that one, in any process
/// of the same user.
pub(crate) fn switch_policy_of(tid: libc::pid_t, from: Policy, to: Policy) -> io::Result<bool> {
    // SAFETY: sched_getscheduler takes no pointer; `tid` names a thread (the contract above keeps
    // it this process's), and a number of no thread only makes it fail with ESRCH.
    let current = unsafe { libc::sched_getscheduler(tid) };
    if current < 0 {
        return Err(io::Error::last_os_error());
    }
    if current & !libc::SCHED_RESET_ON_FORK != from.raw() {
        return Ok(false);
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler reads `param`, a valid initialized struct that outlives the
    // call; `tid` names a thread as above.
    let rc = unsafe { libc::sched_setscheduler(tid, to.raw(), &param) };
    if rc == 0 {
        Ok(true)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Gives the memory that the allocator holds free back to the system (glibc's `malloc_trim`), e.g.
/// after a large, short-lived use such as reading debug information.
pub fn release_free_memory() {
    // SAFETY: malloc_trim takes a plain integer and only releases free heap memory; it is
    // thread-safe (it takes the allocator's own locks).
    unsafe { libc::malloc_trim(0) };
}

/// Sets the short name of the calling thread (`comm`, 15 bytes).
pub fn set_thread_name(name: &str) {
    let short: String = name.chars().take(15).collect();
    if let Ok(c) = CString::new(short) {
        let _ = nix::sys::prctl::set_name(&c);
    }
}

/// Closes every fd of this process that is not in `keep`.
///
/// # Contract
///
/// Only for a freshly forked, single-threaded child that will not use, after this call, any value
/// owning a descriptor it did not keep (such a value would read, write or close a number that may
/// since name something else). Safe in name only, so crate-private.
pub(crate) fn close_fds_except(keep: &[RawFd]) -> io::Result<()> {
    // SAFETY: per this function's contract, no value owning a closed descriptor is used again.
    unsafe { close_range_except(keep, 0) }
}

/// `close_range(2)` over every descriptor but `keep`, with `flags` (0, or `CLOSE_RANGE_UNSHARE`
/// to close them in a table of the calling thread's own).
///
/// # Safety
///
/// Without `CLOSE_RANGE_UNSHARE`, the caller must not use again any value owning a descriptor it
/// did not keep (its number may since name something else); with it, only the calling thread's
/// private table changes.
pub(crate) unsafe fn close_range_except(keep: &[RawFd], flags: libc::c_uint) -> io::Result<()> {
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
            // in `keep` and does not use values owning the others (this function's contract).
            let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, flags) };
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
/// signalfd) and any handlers; both must be undone before app code runs. So must `SIGCHLD`'s
/// `SA_NOCLDWAIT` (the kernel reaping the monitor's children, `sys::pidfd`): an app's `wait` for
/// its own child would fail with `ECHILD`. Installing an action with `signal` replaces the flags.
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

/// Unblocks every signal, leaving their actions as they are.
pub fn unblock_signals() -> io::Result<()> {
    signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
    Ok(())
}

/// Ignores `signal` in this process (e.g. SIGPIPE in workers).
pub fn ignore_signal(sig: Signal) -> io::Result<()> {
    // SAFETY: SIG_IGN runs no code in signal context.
    unsafe { signal::signal(sig, SigHandler::SigIgn) }?;
    Ok(())
}

/// Whether `sig`'s disposition in this process is "ignore".
fn is_ignored(sig: Signal) -> io::Result<bool> {
    let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: a null new action only reads the current one into `old`, a valid, writable,
    // zero-initialized sigaction that outlives the call; nothing is installed.
    let rc = unsafe { libc::sigaction(sig as libc::c_int, std::ptr::null(), old.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sigaction succeeded, so it filled `old` (and it was zero-initialized anyway).
    let old = unsafe { old.assume_init() };
    Ok(old.sa_sigaction == libc::SIG_IGN)
}

/// Undoes what a launcher may have left in this process's signal state (a shell's `trap ''`,
/// `nohup`, a supervisor that ignores `SIGCHLD`; ignored signals survive `execve`):
///
/// - every ignored signal gets its default action back. An ignored `SIGCHLD` in particular makes
///   the kernel reap children itself, so the monitor would never learn of a death;
/// - `SIGPIPE` and `SIGXFSZ` are ignored: a write to a closed pipe or past the file size limit is
///   then an error the writer handles (a log line dropped), not the end of the process;
/// - the blocked mask becomes exactly `blocked` (the signals read from a signalfd), in one step,
///   so that none of those that are pending is delivered with its default action meanwhile.
///
/// Handlers need no reset: `execve` resets every caught signal to its default.
pub fn reset_inherited_signals(blocked: &SigSet) -> io::Result<()> {
    signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(blocked), None)?;
    for sig in Signal::iterator() {
        match sig {
            Signal::SIGKILL | Signal::SIGSTOP => {}
            Signal::SIGPIPE | Signal::SIGXFSZ => ignore_signal(sig)?,
            _ => {
                if is_ignored(sig)? {
                    // SAFETY: installing SIG_DFL runs no code of ours in signal context.
                    unsafe { signal::signal(sig, SigHandler::SigDfl) }?;
                }
            }
        }
    }
    Ok(())
}

/// Reaps one child of this process that has exited, if any, without waiting: its pid and raw
/// wait status (decode it with `libc::WIFEXITED` and the like: unlike nix's `WaitStatus`, that
/// also covers a death by a real-time signal, which nix cannot name and would drop after the
/// reap).
pub fn reap_any_child() -> Option<(Pid, i32)> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status to `status`, a valid, writable int for the call.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        match pid {
            0 => return None, // children, none exited
            p if p > 0 => return Some((Pid::from_raw(p), status)),
            _ if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) => continue,
            _ => return None, // ECHILD: no child at all
        }
    }
}

/// Whether `pid` is a child of this process that has not been reaped yet (running, stopped or a
/// zombie). Asked with `waitid(WNOWAIT)`, which reaps nothing; `ECHILD` means it is not, or no
/// longer, our child, so its pid may belong to someone else by now and must not be signalled.
pub fn is_unreaped_child(pid: Pid) -> bool {
    use nix::sys::wait::{waitid, Id, WaitPidFlag};
    let flags = WaitPidFlag::WEXITED
        | WaitPidFlag::WSTOPPED
        | WaitPidFlag::WCONTINUED
        | WaitPidFlag::WNOHANG
        | WaitPidFlag::WNOWAIT;
    loop {
        match waitid(Id::Pid(pid), flags) {
            Ok(_) => return true,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_task_directory_refuses_the_fork() {
        let missing = std::path::Path::new("/nonexistent/proc/self/task");
        let err = single_threaded(threads_in(missing)).unwrap_err();
        assert!(matches!(err, NotSingleThreaded::Unknown(_)), "{err}");
        assert!(err.to_string().contains("refusing to fork"), "{err}");
    }

    #[test]
    fn an_empty_task_directory_refuses_the_fork() {
        // What /proc looks like with an empty file system mounted over it.
        let dir = std::env::temp_dir().join(format!("tine-empty-task-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let decision = single_threaded(threads_in(&dir));
        let _ = std::fs::remove_dir(&dir);
        assert!(matches!(decision, Err(NotSingleThreaded::Unknown(_))));
    }

    #[test]
    fn one_thread_listed_allows_the_fork_and_two_refuse_it() {
        assert!(single_threaded(Ok(vec![(7, "tine".into())])).is_ok());
        let two = single_threaded(Ok(vec![(7, "tine".into()), (8, "tokio".into())]));
        assert!(matches!(
            two,
            Err(NotSingleThreaded::Threads { count: 2, .. })
        ));
    }
}
