//! Opening files beneath a directory, resolved by the kernel (`openat2(2)`), so that what is
//! opened is exactly what was checked: no window between a check and an open for a symlink to be
//! swapped in, and no component (an index file appended later, a symlink's target) left unchecked.

use std::fs::File;
use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, RawFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};

/// What [`open_beneath`] does with symbolic links met on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Symlinks {
    /// Follow a symlink whose target resolves beneath the directory by a relative path; refuse
    /// one that leaves it, with `..` or any absolute target (`EXDEV`).
    WithinDir,
    /// Refuse every symlink, in any component (`ELOOP`).
    Never,
}

/// How often an open that the kernel abandoned because of a concurrent rename or mount (`EAGAIN`)
/// is tried again before giving up with that error.
const RETRIES_ON_RACE: usize = 8;

/// Opens `path`, a relative path, for reading beneath the directory `dir`, resolving every
/// component (symlink targets included) in the kernel with `RESOLVE_BENEATH`: nothing outside
/// `dir` can be reached, and `/proc`-style magic links are never followed. The file is opened
/// non-blocking (a FIFO cannot stall the caller) and without becoming a controlling terminal.
///
/// Errors worth telling apart: `EXDEV` (the path or a symlink's target leaves `dir`), `ELOOP`
/// (a symlink with [`Symlinks::Never`], or too many), `ENOENT`/`ENOTDIR` (no such file), and
/// `ENOSYS` (a kernel older than Linux 5.6, or a sandbox that filters `openat2`).
pub fn open_beneath(dir: BorrowedFd<'_>, path: &Path, symlinks: Symlinks) -> io::Result<File> {
    open_beneath_as(
        dir,
        path,
        symlinks,
        OFlag::O_RDONLY | OFlag::O_NOCTTY | OFlag::O_NONBLOCK,
    )
}

/// Finds `path` beneath `dir` exactly as [`open_beneath`] does (the same resolution, the same
/// errors), but opens it only as a location (`O_PATH`): enough to `fstat` it, not to read it. It
/// costs less than an open for reading (no permission check of the file itself, no open or close
/// notification), for a caller that already holds the file's bytes and only needs to know that
/// the path still leads to the same version of the same file.
pub fn locate_beneath(dir: BorrowedFd<'_>, path: &Path, symlinks: Symlinks) -> io::Result<File> {
    open_beneath_as(dir, path, symlinks, OFlag::O_PATH)
}

fn open_beneath_as(
    dir: BorrowedFd<'_>,
    path: &Path,
    symlinks: Symlinks,
    flags: OFlag,
) -> io::Result<File> {
    let resolve = match symlinks {
        Symlinks::WithinDir => ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        Symlinks::Never => ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS,
    };
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .resolve(resolve);
    let path = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    let mut tries = 0;
    let fd: RawFd = loop {
        match nix::fcntl::openat2(std::os::fd::AsRawFd::as_raw_fd(&dir), path, how) {
            Err(Errno::EAGAIN) if tries < RETRIES_ON_RACE => tries += 1,
            Err(Errno::EINTR) => {}
            other => break other?,
        }
    };
    // SAFETY: openat2 just returned this descriptor to us: it is open and nothing else in the
    // process knows its number, so the File is its only owner and closes it once.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Reads up to `max` bytes of `file` at `offset`, appended to `buf`, only if they are in the page
/// cache: `preadv2` with `RWF_NOWAIT`, so the caller's thread never waits for a disk. Returns the
/// number of bytes read (0 at the end of the file); [`io::ErrorKind::WouldBlock`] when the data
/// would have to come from the disk, and `EOPNOTSUPP` where the filesystem cannot tell: then read
/// it somewhere a wait does no harm (a blocking pool).
pub fn read_cached_at(
    file: &File,
    buf: &mut Vec<u8>,
    max: usize,
    offset: u64,
) -> io::Result<usize> {
    buf.reserve(max);
    let spare = &mut buf.spare_capacity_mut()[..max];
    let iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: spare.len(),
    };
    let offset = libc::off_t::try_from(offset).map_err(|_| io::Error::from(Errno::EINVAL))?;
    let read = loop {
        // SAFETY: the iovec describes `max` bytes of `buf`'s spare capacity, which `buf` owns and
        // nothing else touches during the call; the descriptor is open (borrowed from `file`).
        let n = unsafe {
            libc::preadv2(
                std::os::fd::AsRawFd::as_raw_fd(file),
                &iov,
                1,
                offset,
                libc::RWF_NOWAIT,
            )
        };
        match Errno::result(n) {
            Err(Errno::EINTR) => {}
            other => break other?,
        }
    };
    let read = read as usize;
    // SAFETY: the kernel wrote `read` (<= max) bytes into the spare capacity starting at len.
    unsafe { buf.set_len(buf.len() + read) };
    Ok(read)
}

/// How many bytes of `file`'s range `[offset, offset + len)` are in the page cache, counted in
/// whole pages (`cachestat(2)`, Linux 6.5): a range is wholly cached when the result is at least
/// `len`. `None` when the kernel cannot tell (older than 6.5, or a sandbox filters the call).
pub fn cached_bytes(file: &File, offset: u64, len: u64) -> Option<u64> {
    /// `struct cachestat_range` of the kernel's uapi.
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    /// `struct cachestat` of the kernel's uapi (its fields in pages).
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    /// The call's number: the same on every architecture (the unified syscall table).
    const SYS_CACHESTAT: libc::c_long = 451;
    if len == 0 {
        return Some(0);
    }
    let page = 4096u64;
    let first_page = offset / page;
    let range = Range {
        off: first_page * page,
        len: (offset + len).div_ceil(page) * page - first_page * page,
    };
    let mut stat = Stat::default();
    // SAFETY: `range` and `stat` are live, properly aligned values of the layouts the kernel's
    // uapi defines for this call, which reads the first and writes the second only during the
    // call; the descriptor is open (borrowed from `file`); flags must be 0.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            std::os::fd::AsRawFd::as_raw_fd(file),
            &range as *const Range,
            &mut stat as *mut Stat,
            0 as libc::c_uint,
        )
    };
    if r != 0 {
        return None;
    }
    // The range is page-aligned, so its cached pages cover `len` only if all of them are there.
    let pages = range.len / page;
    Some(if stat.nr_cache >= pages {
        len
    } else {
        stat.nr_cache * page
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::symlink;

    fn tree() -> (std::path::PathBuf, File) {
        let base = std::env::temp_dir().join(format!(
            "tine-open-beneath-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("root/sub")).unwrap();
        std::fs::write(base.join("secret"), "secret").unwrap();
        std::fs::write(base.join("root/file"), "file").unwrap();
        symlink("../file", base.join("root/sub/up-in")).unwrap();
        symlink("../../secret", base.join("root/sub/up-out")).unwrap();
        symlink(base.join("root/file"), base.join("root/absolute-in")).unwrap();
        let root = File::open(base.join("root")).unwrap();
        (base, root)
    }

    fn read(root: &File, path: &str, symlinks: Symlinks) -> Result<String, Errno> {
        let mut f = open_beneath(root.as_fd(), Path::new(path), symlinks)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap()))?;
        let mut s = String::new();
        io::Read::read_to_string(&mut f, &mut s).unwrap();
        Ok(s)
    }

    #[test]
    fn resolves_beneath_only() {
        let (base, root) = tree();
        use Symlinks::*;
        assert_eq!(read(&root, "file", Never).as_deref(), Ok("file"));
        assert_eq!(read(&root, "sub/up-in", WithinDir).as_deref(), Ok("file"));
        assert_eq!(read(&root, "sub/up-in", Never), Err(Errno::ELOOP));
        assert_eq!(read(&root, "sub/up-out", WithinDir), Err(Errno::EXDEV));
        assert_eq!(read(&root, "../secret", WithinDir), Err(Errno::EXDEV));
        assert_eq!(read(&root, "absolute-in", WithinDir), Err(Errno::EXDEV));
        assert_eq!(read(&root, "missing", WithinDir), Err(Errno::ENOENT));
        // Located the same way, refused the same way; enough to stat, not to read.
        let located = locate_beneath(root.as_fd(), Path::new("sub/up-in"), WithinDir).unwrap();
        assert_eq!(located.metadata().unwrap().len(), 4);
        assert!(io::Read::read(&mut &located, &mut [0u8; 4]).is_err());
        for (path, errno) in [("sub/up-out", Errno::EXDEV), ("absolute-in", Errno::EXDEV)] {
            let e = locate_beneath(root.as_fd(), Path::new(path), WithinDir).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(errno as i32), "{path}");
        }
        let e = locate_beneath(root.as_fd(), Path::new("sub/up-in"), Never).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(Errno::ELOOP as i32));
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn cached_bytes_sees_a_file_leave_the_page_cache() {
        let path = std::env::temp_dir().join(format!("tine-cachestat-{}", std::process::id()));
        std::fs::write(&path, vec![1u8; 64 * 1024]).unwrap();
        let file = File::open(&path).unwrap();
        let mut all = Vec::new();
        io::Read::read_to_end(&mut &file, &mut all).unwrap();
        let Some(cached) = cached_bytes(&file, 100, 20_000) else {
            std::fs::remove_file(&path).unwrap();
            return; // a kernel before 6.5: callers treat the answer as unknown
        };
        assert_eq!(cached, 20_000, "just read: all cached");
        file.sync_all().unwrap();
        nix::fcntl::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
        assert!(cached_bytes(&file, 100, 20_000).unwrap() < 20_000);
        std::fs::remove_file(&path).unwrap();
    }
}
