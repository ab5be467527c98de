//! File descriptor ownership at the boundary with the kernel.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Takes ownership of a descriptor that the kernel just handed to this process (received with
/// SCM_RIGHTS or inherited across a fork under an agreed number).
///
/// # Contract
///
/// `fd` must be open and owned by nothing else in this process (no other `OwnedFd`, `File` or
/// socket closes it); otherwise two owners close it and the second close may hit an unrelated
/// descriptor that reused the number. Safe in name only, so crate-private: every caller names
/// where its number came from (a receive, a handover, systemd's `LISTEN_FDS`).
pub(crate) fn adopt(fd: RawFd) -> OwnedFd {
    // SAFETY: per this function's contract the descriptor is open and owned by nobody else in this
    // process, so wrapping it in an OwnedFd that will close it once is sound.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Registers a descriptor-owning value with the tokio reactor of the current runtime.
///
/// `T: Into<OwnedFd>` means `inner` owns its descriptor, so the fd stays open for as long as the
/// registration (which owns `inner`) lives.
pub fn register_async<T>(inner: T) -> std::io::Result<tokio::io::unix::AsyncFd<T>>
where
    T: std::os::fd::AsRawFd + Into<OwnedFd>,
{
    // SAFETY: `inner` owns its descriptor (it converts into an OwnedFd) and is moved into the
    // AsyncFd, so the descriptor cannot be closed while it is registered.
    unsafe { tokio::io::unix::AsyncFd::register(inner) }.map_err(|e| e.into_parts().1)
}

/// The descriptors open in this process, ascending (read from `/proc/self/fd`; the directory's own
/// descriptor, closed once read, is left out).
pub fn open_fds() -> std::io::Result<Vec<RawFd>> {
    let listed: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let mut open: Vec<RawFd> = listed.into_iter().filter(|fd| is_open(*fd)).collect();
    open.sort_unstable();
    Ok(open)
}

/// Whether `fd` is an open descriptor of this process.
pub fn is_open(fd: RawFd) -> bool {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_ok()
}

/// What `/proc/self/fd/N` names: a path, `socket:[inode]`, `pipe:[inode]`, `anon_inode:[eventfd]`.
pub fn describe(fd: RawFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|target| target.to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("unreadable: {e}"))
}

/// Whether `fd` is a stream socket of the local (`AF_UNIX`) domain: one end of a socket pair such
/// as a runtime's signal self-pipe.
pub fn is_unix_stream_socket(fd: RawFd) -> bool {
    if !is_open(fd) {
        return false;
    }
    // SAFETY: `fd` is open (checked just above) and only borrowed for the two getsockopt calls
    // below, during which this single-threaded child closes nothing.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let socket = socket2::SockRef::from(&borrowed);
    matches!(
        (socket.domain(), socket.r#type()),
        (Ok(domain), Ok(ty)) if domain == socket2::Domain::UNIX && ty == socket2::Type::STREAM
    )
}

/// Replaces the socket pair at `(a, b)` with a fresh one at the same numbers, with the same
/// descriptor and status flags (`FD_CLOEXEC`, `O_NONBLOCK`).
///
/// A forked child shares its parent's socket pair: a byte one process writes (a signal handler's
/// wake-up) can be read by another. Renewed, the pair is this process's alone, and every value that
/// holds the numbers (a runtime's statics) keeps working unchanged. Both ends of a `socketpair` are
/// alike, so which number gets which end does not matter.
///
/// # Contract
///
/// The caller (a forked child, single-threaded) accepts that whatever owns `a` and `b` now holds
/// the fresh pair: crate-private, as it changes descriptors that other values own.
#[cfg_attr(not(feature = "server"), allow(dead_code))] // only the server's after-fork sequence
pub(crate) fn renew_socket_pair(a: RawFd, b: RawFd) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsRawFd;
    if !is_unix_stream_socket(a) || !is_unix_stream_socket(b) {
        return Err(std::io::Error::other(format!(
            "descriptors {a} and {b} are not a unix stream socket pair any more"
        )));
    }
    let (x, y) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    for (fresh, old) in [(x, a), (y, b)] {
        let status = OFlag::from_bits_truncate(fcntl(old, FcntlArg::F_GETFL)?);
        let fd_flags = FdFlag::from_bits_truncate(fcntl(old, FcntlArg::F_GETFD)?);
        fcntl(fresh.as_raw_fd(), FcntlArg::F_SETFL(status))?;
        let cloexec = if fd_flags.contains(FdFlag::FD_CLOEXEC) {
            OFlag::O_CLOEXEC
        } else {
            OFlag::empty()
        };
        // dup3 closes the old pair's end at `old` and puts the fresh end there in one step; `fresh`
        // itself is closed when it goes out of scope.
        nix::unistd::dup3(fresh.as_raw_fd(), old, cloexec)?;
    }
    Ok(())
}

/// Gives the calling thread a descriptor table of its own (a copy of the process's), then closes
/// every descriptor in that copy but `keep`. The process's other threads keep the shared table,
/// where `keep` stays open until they close it: once they do, this thread alone holds it, and it
/// closes when this thread exits (see `worker::sentinel`). Needs Linux 5.9 (`close_range`).
pub fn keep_only_in_own_table(keep: RawFd) -> std::io::Result<()> {
    if keep < 0 {
        return Err(std::io::Error::other("negative descriptor"));
    }
    // SAFETY: CLOSE_RANGE_UNSHARE makes this thread's table private first, so only descriptors
    // of that copy close: no other thread's descriptor (nor any OwnedFd of this process, whose
    // numbers live in the shared table) is affected.
    unsafe { crate::sys::process::close_range_except(&[keep], libc::CLOSE_RANGE_UNSHARE) }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn a_thread_keeps_one_descriptor_in_a_table_of_its_own() {
        let kept = std::fs::File::open("/dev/null").expect("open");
        let other = std::fs::File::open("/dev/null").expect("open");
        let (kept_fd, other_fd) = (kept.as_raw_fd(), other.as_raw_fd());
        let seen = std::thread::spawn(move || {
            keep_only_in_own_table(kept_fd).expect("close_range");
            (is_open(kept_fd), is_open(other_fd), is_open(2))
        })
        .join()
        .expect("the thread");
        assert_eq!(seen, (true, false, false), "in the thread's own table");
        // The process's table is untouched.
        assert!(is_open(kept_fd) && is_open(other_fd) && is_open(2));
    }
}
