//! Writes that never wait, and descriptor flags the monitor restores on what it inherits.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};

/// Writes `buf` to `fd` at its current offset (or the end, under `O_APPEND`) without waiting: a
/// full pipe or socket answers `EAGAIN` instead of blocking, whatever the descriptor's own
/// `O_NONBLOCK` flag says (`pwritev2` with `RWF_NOWAIT`). Descriptors that do not support it
/// (regular files, most devices) answer `EOPNOTSUPP`: write to those with [`write`].
pub fn write_nowait(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `iov` points into `buf`, valid for `buf.len()` bytes for the whole call, and the
    // kernel only reads from it (a write). Offset -1 means "the current offset". `fd` is open
    // for the whole call: it is borrowed.
    let n = unsafe { libc::pwritev2(fd.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Writes `buf` to `fd` with one `write(2)` (it may block, and may write only a part).
pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    Ok(nix::unistd::write(fd, buf)?)
}

/// Sets `FD_CLOEXEC` on `fd`. A descriptor handed across an `execve` (a reload's re-exec,
/// systemd's socket activation) arrives without it, and must not leak into the programs the tree
/// runs later: a worker's subprocess would otherwise hold the listening socket open.
pub fn set_cloexec(fd: impl AsRawFd) -> io::Result<()> {
    let flags = FdFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFD)?);
    if !flags.contains(FdFlag::FD_CLOEXEC) {
        fcntl(
            fd.as_raw_fd(),
            FcntlArg::F_SETFD(flags | FdFlag::FD_CLOEXEC),
        )?;
    }
    Ok(())
}

/// Whether `fd` has `FD_CLOEXEC` set.
pub fn is_cloexec(fd: impl AsRawFd) -> io::Result<bool> {
    let flags = FdFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFD)?);
    Ok(flags.contains(FdFlag::FD_CLOEXEC))
}

/// Sends up to `count` bytes of `file` from `offset` to the socket `out` with `sendfile(2)`: the
/// kernel hands the page cache's pages to the socket, never copying them through user space.
/// Returns the bytes sent (0: `offset` is at or past the end of the file); `WouldBlock` when a
/// non-blocking socket is full. Reading a page that is not cached waits for the disk: callers
/// that must not wait check [`crate::sys::fs::cached_bytes`] first.
pub fn sendfile_at(
    out: BorrowedFd<'_>,
    file: BorrowedFd<'_>,
    offset: u64,
    count: usize,
) -> io::Result<usize> {
    let mut offset =
        libc::off64_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        match nix::sys::sendfile::sendfile64(out, file, Some(&mut offset), count) {
            Err(nix::errno::Errno::EINTR) => {}
            other => return Ok(other?),
        }
    }
}

/// Sends `bufs` on the socket `fd` without waiting (`MSG_DONTWAIT`, and `MSG_NOSIGNAL`: a closed
/// peer is `EPIPE`, not a signal). With `more`, the kernel is told that more data follows at once
/// (`MSG_MORE`, as `TCP_CORK` for one call): a response head sent just before its body by
/// [`sendfile_at`] leaves in the same packets as the body's first bytes.
pub fn send_vectored(
    fd: BorrowedFd<'_>,
    bufs: &[io::IoSlice<'_>],
    more: bool,
) -> io::Result<usize> {
    use nix::sys::socket::{sendmsg, MsgFlags};
    let mut flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    if more {
        // nix 0.29 has no name for it.
        flags |= MsgFlags::from_bits_retain(libc::MSG_MORE);
    }
    loop {
        match sendmsg::<()>(fd.as_raw_fd(), bufs, &[], flags, None) {
            Err(nix::errno::Errno::EINTR) => {}
            other => return Ok(other?),
        }
    }
}
