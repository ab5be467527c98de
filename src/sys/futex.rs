//! Futexes on shared words: waking, waiting on several at once (`futex_waitv`, Linux 5.16+),
//! and a thread's one-entry robust list (`set_robust_list`), which makes the kernel mark a word
//! `FUTEX_OWNER_DIED` and wake one of its waiters when the thread that owns it dies.
//!
//! How the kernel does it (kernel/futex/core.c, kernel/exit.c): a dying thread's `do_exit` runs
//! `exit_mm`, whose `exit_mm_release` → `futex_exit_release` walks the thread's robust list
//! while its address space is still there, before `exit_files`. For each word whose owner
//! (`FUTEX_TID_MASK` bits) is the dying thread's id, it replaces the word with `FUTEX_OWNER_DIED`
//! (keeping `FUTEX_WAITERS`; the owner's id is gone) and, if `FUTEX_WAITERS` was set, wakes one waiter with a *shared* wake: a
//! waiter in another process sleeping on the same word of a `MAP_SHARED` mapping wakes.
//!
//! glibc registers a robust list per thread at its start, for the thread's robust pthread
//! mutexes, and on Linux relies on the kernel's walk of that list alone (its user-space walk at a
//! thread's exit is only for kernels without `set_robust_list`). A thread can register one list,
//! so [`own_robust_word`] does not chain to glibc's: it replaces it. A robust mutex that thread
//! held when it died would then never be marked `OWNER_DIED`, and its waiters would hang. That is
//! harmless for the one caller, a worker's death-notice thread (`worker::sentinel`), only because
//! it takes no robust mutex: it parks (std's `Mutex` is a plain futex, and glibc's internal locks
//! are not robust). Never call it on a thread that could: one running application code, or a
//! thread of a pool.

use std::io;
use std::sync::atomic::AtomicU32;

/// Set in a robust word by the kernel when its owner died.
pub const OWNER_DIED: u32 = libc::FUTEX_OWNER_DIED;
/// Set in a robust word by its waiters, so that the owner's death wakes one.
pub const WAITERS: u32 = libc::FUTEX_WAITERS;
/// The owner's thread id in a robust word.
pub const TID_MASK: u32 = libc::FUTEX_TID_MASK;

/// `futex_waitv` flags: a 32-bit word; a word of this process only.
const FUTEX2_SIZE_U32: u32 = libc::FUTEX2_SIZE_U32 as u32;
const FUTEX2_PRIVATE: u32 = libc::FUTEX2_PRIVATE as u32;

/// One word to wait on (`struct futex_waitv` of the kernel's uapi; libc's has a private padding
/// field, so it cannot be built without `mem::zeroed`).
#[repr(C)]
struct FutexWaitv {
    val: u64,
    uaddr: u64,
    flags: u32,
    reserved: u32,
}

/// A word to wait on with [`wait_any`]: sleep while it holds `expected`.
pub struct Waiter<'a> {
    /// The word.
    pub word: &'a AtomicU32,
    /// The value it must still hold for the wait to sleep.
    pub expected: u32,
    /// A word of this process's own memory (not shared with another process).
    pub private: bool,
}

/// Wakes up to `n` waiters of `word`; `private` for a word no other process maps.
pub fn wake(word: &AtomicU32, n: u32, private: bool) -> io::Result<usize> {
    let op = if private {
        libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG
    } else {
        libc::FUTEX_WAKE
    };
    let n = n.min(i32::MAX as u32) as libc::c_int;
    // SAFETY: FUTEX_WAKE only reads the address to find the futex's key (it never writes it or
    // keeps it); `word` is a live, aligned u32. The timeout, second address and value are unused
    // by this operation.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            op,
            n,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Sleeps until one of `waiters` is woken (or a signal interrupts, or `timeout` passes:
/// `ETIMEDOUT`). Returns at once with `EAGAIN` if a word no longer holds its expected value. At
/// most 128 words (the kernel's limit). `ENOSYS` where the kernel has no `futex_waitv` (before
/// 5.16).
pub fn wait_any(waiters: &[Waiter<'_>], timeout: Option<std::time::Duration>) -> io::Result<usize> {
    let deadline = match timeout {
        Some(t) => {
            let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
            let end = std::time::Duration::new(now.tv_sec() as u64, now.tv_nsec() as u32) + t;
            Some(libc::timespec {
                tv_sec: end.as_secs() as libc::time_t,
                tv_nsec: end.subsec_nanos() as libc::c_long,
            })
        }
        None => None,
    };
    let deadline_ptr = deadline
        .as_ref()
        .map_or(std::ptr::null(), |d| d as *const libc::timespec);
    let v: Vec<FutexWaitv> = waiters
        .iter()
        .map(|w| FutexWaitv {
            val: w.expected as u64,
            uaddr: w.word.as_ptr() as u64,
            flags: FUTEX2_SIZE_U32 | if w.private { FUTEX2_PRIVATE } else { 0 },
            reserved: 0,
        })
        .collect();
    // SAFETY: `v` is an array of `v.len()` well-formed `struct futex_waitv`, alive for the call;
    // each address is a live, aligned u32 borrowed for the call (the kernel only reads them). No
    // flags; the timeout is null (no deadline) or a live absolute CLOCK_MONOTONIC time.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex_waitv,
            v.as_ptr(),
            v.len() as libc::c_uint,
            0 as libc::c_uint,
            deadline_ptr,
            libc::CLOCK_MONOTONIC,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Whether this process may wait with `futex_waitv`: asked with an empty list, which the kernel
/// refuses with `EINVAL` before it reads anything. Only that answer says yes: `ENOSYS` is a kernel
/// without it (before 5.16), and `EPERM` (or any other errno) a seccomp filter that refuses it
/// (container profiles older than the call); every wait would then fail at once.
pub fn have_waitv() -> bool {
    // SAFETY: a null array of length 0 is refused by the kernel before it reads anything.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex_waitv,
            std::ptr::null::<FutexWaitv>(),
            0 as libc::c_uint,
            0 as libc::c_uint,
            std::ptr::null::<libc::timespec>(),
            libc::CLOCK_MONOTONIC,
        )
    };
    r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL)
}

/// `struct robust_list` of the kernel's uapi.
#[repr(C)]
struct RobustList {
    next: *const RobustList,
}

/// `struct robust_list_head` of the kernel's uapi.
#[repr(C)]
struct RobustListHead {
    list: RobustList,
    futex_offset: libc::c_long,
    list_op_pending: *const RobustList,
}

thread_local! {
    /// Whether the calling thread set its robust list here.
    static ROBUST_SET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Makes `word` the calling thread's only robust futex: when this thread dies holding it (its
/// thread id in the word's low bits), the kernel replaces it with [`OWNER_DIED`] (keeping
/// [`WAITERS`]: the id is gone) and, if [`WAITERS`] was set,
/// wakes one waiter (shared wake). Replaces the thread's robust list (glibc's, see the module
/// doc): the robust mutexes the thread might hold would no longer be released at its death, so
/// call it only on a thread that never takes one (no application code, no pool thread). Once per
/// thread; `word` must outlive the thread (a `'static` borrow).
pub fn own_robust_word(word: &'static AtomicU32) -> io::Result<()> {
    ROBUST_SET.with(|set| {
        if set.get() {
            return Err(io::Error::other("this thread's robust list is set already"));
        }
        // Leaked: the kernel reads it when the thread exits, after its thread-local storage is
        // gone (a few words, once per thread that calls this: one per worker).
        let list: &'static mut (RobustListHead, RobustList) = Box::leak(Box::new((
            RobustListHead {
                list: RobustList {
                    next: std::ptr::null(),
                },
                futex_offset: 0,
                list_op_pending: std::ptr::null(),
            },
            RobustList {
                next: std::ptr::null(),
            },
        )));
        let head: *const RobustListHead = &list.0;
        let entry: *const RobustList = &list.1;
        // A circular list: head → entry → head; the word sits at entry + futex_offset.
        list.0.list.next = entry;
        list.1.next = head.cast();
        list.0.futex_offset = (word.as_ptr() as isize - entry as isize) as libc::c_long;
        // SAFETY: `head` points to a well-formed robust list head (one entry, circular, no pending
        // operation) in a leaked heap block, so it stays valid whenever the kernel reads it (at
        // this thread's exit, or never if another list replaces it); the
        // word it designates is a live `'static` aligned u32. The size is the uapi struct's.
        let r = unsafe {
            libc::syscall(
                libc::SYS_set_robust_list,
                head,
                std::mem::size_of::<RobustListHead>(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        set.set(true);
        Ok(())
    })
}

/// The calling thread's id.
pub fn gettid() -> u32 {
    nix::unistd::gettid().as_raw() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Makes the calling thread's `futex_waitv` fail with `EPERM`, as a container's seccomp
    /// profile that predates the call does (the filter is the thread's own: other threads and
    /// the test process keep theirs).
    fn refuse_waitv_in_this_thread() {
        use crate::sys::bpf::op;
        let filter = [
            // The syscall number (offset 0 of `struct seccomp_data`).
            op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 0),
            op(
                libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
                0,
                1,
                libc::SYS_futex_waitv as u32,
            ),
            op(
                libc::BPF_RET | libc::BPF_K,
                0,
                0,
                libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
            ),
            op(libc::BPF_RET | libc::BPF_K, 0, 0, libc::SECCOMP_RET_ALLOW),
        ];
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only; it is required to install a
        // filter without privileges and only forbids this thread gaining privileges by exec.
        let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        assert_eq!(r, 0, "PR_SET_NO_NEW_PRIVS: {}", io::Error::last_os_error());
        // SAFETY: `prog` points to `filter`, a well-formed classic BPF program alive for the call
        // (the kernel copies it); without SECCOMP_FILTER_FLAG_TSYNC it applies to this thread
        // only, and it only makes one syscall, never called here otherwise, fail.
        let r = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &prog as *const libc::sock_fprog,
            )
        };
        assert_eq!(r, 0, "seccomp: {}", io::Error::last_os_error());
    }

    #[test]
    fn futex_waitv_refused_by_seccomp_is_not_available() {
        let here = have_waitv();
        let refused = std::thread::spawn(|| {
            refuse_waitv_in_this_thread();
            let probe = have_waitv();
            let waited = wait_any(
                &[Waiter {
                    word: &AtomicU32::new(0),
                    expected: 0,
                    private: true,
                }],
                Some(std::time::Duration::from_millis(1)),
            );
            (probe, waited.map_err(|e| e.raw_os_error()))
        })
        .join()
        .expect("the filtered thread");
        // The filter works: the call itself fails with EPERM there.
        assert_eq!(refused.1, Err(Some(libc::EPERM)));
        assert!(!refused.0, "EPERM taken for futex_waitv available");
        // Unfiltered, the probe says what the kernel has (5.16 and later: yes).
        let kernel_has_it =
            wait_any(&[], None).err().and_then(|e| e.raw_os_error()) != Some(libc::ENOSYS);
        assert_eq!(here, kernel_has_it);
    }
}
