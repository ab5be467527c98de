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
