//! Unsafe wrappers used only by the spawner.

use std::io;

use super::process::Forked;

/// Forks without looking at `/proc/self/task` first.
///
/// For the spawner process only: it is created by a checked [`super::process::fork`] (a forked
/// child has exactly one thread) and never starts a thread, so the check would cost ~20 µs per
/// worker for nothing.
///
/// # Contract
///
/// The calling process has exactly one thread (forking with more copies locks other threads may
/// hold). Nothing checks it, so the function is crate-private: its one caller is the spawner's
/// loop; anyone else forks with the checked [`super::process::fork`].
pub(crate) fn fork_single_threaded() -> io::Result<Forked> {
    // SAFETY: per this function's contract the process is single-threaded, so the child gets a
    // consistent copy of every lock and of the allocator; no other thread can hold one mid-update.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(Forked::Parent(child)),
        nix::unistd::ForkResult::Child => Ok(Forked::Child),
    }
}

/// Registers a borrowed descriptor with the current tokio runtime's reactor, for readiness.
///
/// Panics outside a tokio runtime (as tokio does).
pub fn watch_readable(
    fd: std::os::fd::BorrowedFd<'_>,
) -> io::Result<tokio::io::unix::AsyncFd<std::os::fd::BorrowedFd<'_>>> {
    // SAFETY: a BorrowedFd is open for its whole lifetime and always names the same descriptor,
    // and the AsyncFd holds that borrow, so it cannot outlive the descriptor it watches.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}
