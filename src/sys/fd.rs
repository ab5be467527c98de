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
