//! Shared memory: a sealed memfd mapped into every process of the tree.

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::mman::{mmap, MapFlags, ProtFlags};

/// A shared, fixed-size mapping of a memfd, viewed as an array of `AtomicU64` words.
///
/// Every access is atomic, so a writer in another process can never make a reader here observe
/// undefined behaviour: at worst it reads garbage values, which callers validate.
pub struct SharedWords {
    fd: OwnedFd,
    ptr: NonNull<AtomicU64>,
    words: usize,
}

// SAFETY: the mapping is only accessed through atomics, which are Sync.
unsafe impl Send for SharedWords {}
// SAFETY: as above.
unsafe impl Sync for SharedWords {}

impl SharedWords {
    /// Creates a memfd of `words` 64-bit words, seals its size, and maps it shared.
    pub fn create(name: &str, words: usize) -> io::Result<Self> {
        let cname = std::ffi::CString::new(name).map_err(io::Error::other)?;
        let fd = memfd_create(
            &cname,
            MemFdCreateFlag::MFD_ALLOW_SEALING | MemFdCreateFlag::MFD_CLOEXEC,
        )?;
        let bytes = words * 8;
        nix::unistd::ftruncate(&fd, bytes as i64)?;
        fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
            ),
        )?;
        Self::map(fd, words)
    }

    /// Maps an existing memfd (for example one handed over across a re-exec).
    pub fn map(fd: OwnedFd, words: usize) -> io::Result<Self> {
        let len = NonZeroUsize::new(words * 8).ok_or_else(|| io::Error::other("empty mapping"))?;
        let actual = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&fd))?.st_size as usize;
        if actual < words * 8 {
            return Err(io::Error::other(
                "shared memory file is smaller than expected",
            ));
        }
        // SAFETY: a fresh shared mapping of a file we own, with length checked against its size
        // (which is sealed against shrinking); nothing else in this process aliases it.
        let ptr = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd.as_fd(),
                0,
            )
        }?;
        Ok(SharedWords {
            fd,
            ptr: ptr.cast(),
            words,
        })
    }

    /// The memfd behind the mapping.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Word `index` viewed as two 32-bit atomics (each can be a futex word). A word used this way must never be accessed through [`Self::words`]
    /// (mixed-size atomic accesses to one location are not allowed).
    pub fn halves(&self, index: usize) -> Option<&[AtomicU32; 2]> {
        if index >= self.words {
            return None;
        }
        // SAFETY: `index` is in the mapping (checked), which lives as long as `self`; an 8-byte
        // aligned word is two 4-byte aligned u32s, and [AtomicU32; 2] has their layout. Callers
        // access this word only as AtomicU32s (documented above), so no access is mixed-size.
        Some(unsafe { &*self.ptr.as_ptr().add(index).cast::<[AtomicU32; 2]>() })
    }

    /// The mapping as a slice of atomics.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is `words` 8-byte words long, page aligned (so aligned for u64), lives
        // as long as `self` (it is never unmapped), and AtomicU64 has the layout of u64; all access
        // goes through atomic operations, so concurrent writes by other processes are not UB.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.words) }
    }
}
