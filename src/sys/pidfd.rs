//! Process descriptors (pidfds), and letting the kernel reap a process's children.
//!
//! Why the monitor lets the kernel reap: whoever reaps a process runs the last of its teardown
//! (`release_task`, which invalidates the process's `/proc` entries). When the reaper is the
//! parent, that work waits on the dead process's last thread still invalidating its own entries,
//! and the parent spins in the kernel until that thread gets a CPU again: seconds, for a thread
//! of low priority on a loaded machine (bench/results/respawn.md, session 13). With `SIGCHLD`'s
//! `SA_NOCLDWAIT` flag the dying process releases itself, in its own time, and since Linux 6.15
//! the kernel keeps the exit status for a pidfd of the process (`PIDFD_INFO_EXIT`), so the
//! parent learns how its child ended without reaping it.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Opens a pidfd for `pid` (close-on-exec). The caller must know `pid` still names the process it
/// means: a child of this process that was not reaped yet, or this process itself.
pub fn open(pid: Pid) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags (none), reads no memory of ours and returns a new
    // descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Opens a pidfd for `pid`, a process this one believes is its child, and checks that it is: a
/// child that was not reaped yet (running or a zombie). With the kernel reaping children, a pid
/// read a moment ago may already be free, or someone else's.
pub fn open_child(pid: Pid) -> io::Result<OwnedFd> {
    let fd = open(pid)?;
    // The descriptor names whoever held `pid` when it was opened; if our child holds it after,
    // it held it then (a pid is reused only after its holder is reaped, and our child was not).
    if crate::sys::process::is_unreaped_child(pid) {
        Ok(fd)
    } else {
        Err(io::Error::from_raw_os_error(libc::ESRCH))
    }
}

/// Sends `sig` to the process `fd` names; fails with `ESRCH` once it has exited. Unlike `kill`,
/// never reaches another process that reused the pid.
pub fn send_signal(fd: BorrowedFd<'_>, sig: Signal) -> io::Result<()> {
    let null: *const libc::siginfo_t = std::ptr::null();
    // SAFETY: pidfd_send_signal with a null siginfo and no flags reads no memory of ours; `fd` is
    // a descriptor borrowed for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig as libc::c_int,
            null,
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The wait status (as `waitpid` gives it) of the process `fd` names, once it has exited and
/// been reaped; `None` while it runs, and in the moment between its exit and its release.
/// Needs Linux 6.15 ([`kernel_keeps_exit_status`]).
pub fn exit_status(fd: BorrowedFd<'_>) -> io::Result<Option<i32>> {
    let info = info(fd, libc::PIDFD_INFO_EXIT)?;
    Ok(has(&info, libc::PIDFD_INFO_EXIT).then_some(info.exit_code))
}

/// Whether `fd` names process `pid` (in this process's pid namespace), or a process that has
/// exited and been released, whose status the kernel keeps (its pid is no longer known then, and
/// a process gone can be sent no signal). Linux 6.15.
pub fn names(fd: BorrowedFd<'_>, pid: Pid) -> bool {
    match info(fd, libc::PIDFD_INFO_PID | libc::PIDFD_INFO_EXIT) {
        Ok(info) if has(&info, libc::PIDFD_INFO_PID) => info.pid as i32 == pid.as_raw(),
        Ok(info) => has(&info, libc::PIDFD_INFO_EXIT),
        Err(_) => false,
    }
}

/// What the kernel tells of the process `fd` names (`PIDFD_GET_INFO`), asked for `mask`; the
/// answer's mask says which of it is there.
fn info(fd: BorrowedFd<'_>, mask: libc::c_uint) -> io::Result<libc::pidfd_info> {
    // SAFETY: pidfd_info is plain integers, for which all-zero is a valid value.
    let mut info: libc::pidfd_info = unsafe { std::mem::zeroed() };
    info.mask = mask as u64;
    // SAFETY: PIDFD_GET_INFO reads and writes at most size_of::<pidfd_info>() bytes (the size is
    // encoded in the request number) of `info`, which is valid and writable for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::PIDFD_GET_INFO, &mut info) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// Whether the kernel's answer `info` holds `bit`.
fn has(info: &libc::pidfd_info, bit: libc::c_uint) -> bool {
    info.mask & bit as u64 != 0
}

/// Whether this kernel keeps a process's exit status for its pidfds after the process is reaped
/// (`PIDFD_INFO_EXIT`, Linux 6.15). Without it, a parent must reap its children itself to learn
/// how they ended.
pub fn kernel_keeps_exit_status() -> bool {
    static KEEPS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *KEEPS.get_or_init(probe_exit_status)
}

/// Asks the kernel, once: see [`kernel_keeps_exit_status`].
fn probe_exit_status() -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    if !release_at_least(release.trim(), (6, 15)) {
        return false;
    }
    // And the request exists here (a kernel built without pidfs would refuse it).
    open(nix::unistd::getpid()).is_ok_and(|fd| {
        use std::os::fd::AsFd;
        exit_status(fd.as_fd()).is_ok()
    })
}

/// Whether a kernel release string ("6.18.44-fc-v1147") is at least `major.minor`.
fn release_at_least(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let (Some(Ok(a)), Some(Ok(b))) = (
        parts.next().map(str::parse::<u32>),
        parts.next().map(str::parse::<u32>),
    ) else {
        return false;
    };
    (a, b) >= (major, minor)
}

/// Makes the kernel reap this process's children as they exit (`SIGCHLD` keeps its default
/// action, with `SA_NOCLDWAIT`): they never become zombies, `SIGCHLD` is still sent, and `wait`
/// no longer returns their status (read it from a pidfd, [`exit_status`]). A forked child that
/// installs its own `SIGCHLD` action, or calls `execve`, drops the flag.
pub fn let_kernel_reap_children() -> io::Result<()> {
    set_sigchld_flags(libc::SA_NOCLDWAIT)
}

/// Undoes [`let_kernel_reap_children`]: children that exit from now on stay zombies until this
/// process reaps them. For the moment between starting a child and opening its pidfd, so that
/// a child that exits at once keeps its pid and status for `waitpid`.
pub fn keep_children_for_waitpid() -> io::Result<()> {
    set_sigchld_flags(0)
}

/// Gives `SIGCHLD` its default action with `flags`.
fn set_sigchld_flags(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: sigaction is plain data; zeroed is a valid value (empty mask, no flags).
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = libc::SIG_DFL;
    action.sa_flags = flags;
    // SAFETY: installs the default action (no code of ours runs in signal context); `action` is
    // valid for the call and the old action is not asked for.
    let rc = unsafe { libc::sigaction(libc::SIGCHLD, &action, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_compare_by_major_then_minor() {
        assert!(release_at_least("6.18.44-fc-v1147", (6, 15)));
        assert!(release_at_least("6.15.0", (6, 15)));
        assert!(release_at_least("7.0-rc1", (6, 15)));
        assert!(!release_at_least("6.14.11-arch1", (6, 15)));
        assert!(!release_at_least("5.19.0", (6, 15)));
        assert!(!release_at_least("garbage", (6, 15)));
    }

    #[test]
    fn a_reaped_childs_status_is_read_from_its_pidfd() {
        if !kernel_keeps_exit_status() {
            eprintln!("skipped: this kernel keeps no exit status for pidfds (Linux < 6.15)");
            return;
        }
        use std::os::fd::AsFd;
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read _; exit 7"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        let pid = Pid::from_raw(child.id() as i32);
        let fd = open_child(pid).expect("our unreaped child");
        assert!(names(fd.as_fd(), pid));
        assert!(!names(fd.as_fd(), Pid::from_raw(pid.as_raw() + 1)));
        assert_eq!(exit_status(fd.as_fd()).unwrap(), None, "still running");
        drop(child.stdin.take());
        assert_eq!(child.wait().unwrap().code(), Some(7));
        // Reaped: `pid` is free now, and the pidfd still says how its process ended.
        assert_eq!(exit_status(fd.as_fd()).unwrap(), Some(7 << 8));
        assert!(open_child(pid).is_err(), "no longer our child");
        assert!(send_signal(fd.as_fd(), Signal::SIGTERM).is_err(), "gone");
    }
}
