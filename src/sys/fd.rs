//! File descriptor ownership at the boundary with the kernel.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Takes ownership of a descriptor that the kernel just handed to this process (received with
/// SCM_RIGHTS or inherited across a fork under an agreed number).
///
/// The caller must be the only owner of `fd`.
pub fn adopt(fd: RawFd) -> OwnedFd {
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
