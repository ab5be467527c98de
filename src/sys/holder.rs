//! The holder of a worker's memory: a sleeping process that shares the worker's address space
//! (`CLONE_VM`, but not a thread of the worker), so that when the worker dies the kernel's
//! teardown of that memory runs in the holder, a moment later, instead of in the worker's last
//! thread on the path of its replacement.
//!
//! Why. When a process dies, the last user of its address space tears it down (`exit_mmap`:
//! every page unmapped; ~250–350 µs of kernel CPU for a `hello` worker, tens of milliseconds for
//! a worker with hundreds of MiB of heap), and only then closes its descriptors: its clients'
//! connections stay open, unanswered, through the teardown, and a kernel without preemption
//! (`PREEMPT_NONE`, common on servers) keeps that CPU meanwhile, even from the spare taking the
//! worker's place or the client waiting for its answer. A kill of the worker does not reach the
//! holder (another thread group), so the worker's threads exit without tearing anything down and
//! its connections close at once; the holder, which waits on a pidfd of the worker, exits
//! [`LINGER`] after the worker's last thread, and its exit is the teardown
//! (bench/results/respawn.md, session 15).
//!
//! The holder runs code that touches nothing of the worker's: it shares the worker's memory and
//! its thread pointer, so it calls no libc function (`errno` and thread-locals are the worker's
//! main thread's), only system calls made here by hand, from its own stack (a leaked block). It
//! starts with every signal blocked and never unblocks one, so no handler of the worker's runs
//! in it; it keeps a descriptor table of its own with only the pidfd in it (so it holds none of
//! the worker's connections or sockets open); and it leaves no exit signal to its parent: a
//! "clone" child, which `wait` and `waitpid` without `__WALL` do not report, so an app that waits
//! for all its children is not held up by it. When the worker is gone it is the monitor's (a
//! subreaper): the kernel or the monitor reaps it, and the monitor knows its pid from the
//! worker's scoreboard slot.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

/// How long the holder outlives the worker before it lets go of the memory: past the first
/// answers of the worker's replacement, and short enough that a crash loop never keeps more
/// than a dead worker's memory or so.
pub const LINGER: Duration = Duration::from_millis(20);

/// The holder's stack: it makes a few system calls from one small frame.
const STACK_SIZE: usize = 16 * 1024;

/// The holder's name (`comm`, as `ps` and `top` show it), with the NULs of its 16 bytes.
const NAME_BYTES: &[u8; 16] = b"tine-holder\0\0\0\0\0";

/// The pid of this process's holder, once [`start`] made one (0: none). A forked child inherits
/// its parent's value until it starts its own (a failed start sets 0).
static HOLDER: AtomicI32 = AtomicI32::new(0);

/// The holder of this process's memory, if it started one (a worker, or a worker promoted to
/// mold, which keeps its holder).
pub(crate) fn this_process_holder() -> Option<i32> {
    Some(HOLDER.load(Ordering::Relaxed)).filter(|pid| *pid > 0)
}

/// Forgets a holder pid inherited across a fork: a forked process starts without a holder.
pub(crate) fn forget_inherited() {
    HOLDER.store(0, Ordering::Relaxed);
}

/// Starts the holder of the calling process's memory. Returns its pid.
///
/// # Contract
/// Called from the thread that lives as long as the process (its main thread): the holder is
/// its child.
pub(crate) fn start() -> io::Result<i32> {
    let started = start_holder();
    HOLDER.store(*started.as_ref().unwrap_or(&0), Ordering::Relaxed);
    started
}

fn start_holder() -> io::Result<i32> {
    if !cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) || !libc_clone_is_clean() {
        return Err(io::Error::from(io::ErrorKind::Unsupported));
    }
    // Its own process, whose whole thread group's exit makes this readable.
    let pidfd = super::pidfd::open(nix::unistd::getpid())?;
    let layout = std::alloc::Layout::from_size_align(STACK_SIZE, 4096)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the layout's size is not zero.
    let stack = unsafe { std::alloc::alloc(layout) };
    if stack.is_null() {
        return Err(io::Error::from(io::ErrorKind::OutOfMemory));
    }
    // Every signal blocked across the clone, with the system call itself: libc's
    // `pthread_sigmask` leaves its own two (cancellation, set*id) unblocked, and a handler of
    // theirs running in the holder would run on this thread's state. The holder inherits the
    // mask and keeps it; this thread gets its own back at once.
    let all: u64 = !0;
    let mut kept_mask: u64 = 0;
    // SAFETY: rt_sigprocmask reads and writes the two 8-byte sets passed, which live here.
    let blocked = unsafe {
        raw::syscall(
            libc::SYS_rt_sigprocmask as u64,
            [
                libc::SIG_SETMASK as u64,
                &all as *const u64 as u64,
                &mut kept_mask as *mut u64 as u64,
                8,
                0,
                0,
            ],
        )
    };
    let started = if blocked != 0 {
        Err(io::Error::from_raw_os_error(-blocked as i32))
    } else {
        let linger_ms = LINGER.as_millis() as u64;
        let arg = (linger_ms << 32) | pidfd.as_raw_fd() as u64;
        // SAFETY: `holder_main` runs on the block that `stack` starts (the top is one past its
        // end, in bounds), which is never freed once the holder runs: it may outlive
        // everything of this process but the memory it shares. It makes only raw system calls
        // and touches only its own frame, so sharing this thread's memory and thread pointer is
        // sound (`libc_clone_is_clean`: the wrapper's child path touches neither); with every
        // signal blocked no handler runs in it. No `CLONE_FILES` (its table is a copy, which it
        // empties but for the pidfd) and exit signal 0.
        let pid = unsafe {
            libc::clone(
                holder_main,
                stack.add(STACK_SIZE).cast(),
                libc::CLONE_VM,
                arg as usize as *mut libc::c_void,
            )
        };
        let started = if pid > 0 {
            Ok(pid)
        } else {
            Err(io::Error::last_os_error())
        };
        // SAFETY: as above; only the mask this thread had is written back.
        unsafe {
            raw::syscall(
                libc::SYS_rt_sigprocmask as u64,
                [
                    libc::SIG_SETMASK as u64,
                    &kept_mask as *const u64 as u64,
                    0,
                    8,
                    0,
                    0,
                ],
            );
        }
        started
    };
    if started.is_err() {
        // SAFETY: no holder started; the block is this thread's again, allocated with `layout`.
        unsafe { std::alloc::dealloc(stack, layout) };
    }
    // This process's copy of the pidfd closes here; the holder's copy is its own.
    drop(pidfd);
    started
}

/// Whether libc's `clone` wrapper leaves the caller's thread-local state alone in a `CLONE_VM`
/// child: glibc before 2.25 wrote the child's pid into the caller's thread block (its pid
/// cache), which would corrupt this thread's; later glibc and musl do not.
fn libc_clone_is_clean() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: gnu_get_libc_version returns a static NUL-terminated string.
        let version = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
        let mut parts = version
            .to_str()
            .unwrap_or("")
            .split('.')
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        (major, minor) >= (2, 25)
    }
    #[cfg(not(target_env = "gnu"))]
    {
        true
    }
}

/// The holder: empties its descriptor table but for the pidfd, names itself, waits until the
/// worker's whole thread group has exited, then [`LINGER`]s and returns (the clone wrapper
/// exits): that exit tears the shared memory down.
extern "C" fn holder_main(arg: *mut libc::c_void) -> libc::c_int {
    let arg = arg as usize as u64;
    let pidfd = arg & 0xffff_ffff;
    let linger_ms = arg >> 32;
    // SAFETY (each call): a raw system call whose arguments are numbers or pointers into this
    // frame, valid for the call.
    unsafe {
        if pidfd > 0 {
            raw::syscall(libc::SYS_close_range as u64, [0, pidfd - 1, 0, 0, 0, 0]);
        }
        raw::syscall(
            libc::SYS_close_range as u64,
            [pidfd + 1, u64::from(u32::MAX), 0, 0, 0, 0],
        );
        raw::syscall(
            libc::SYS_prctl as u64,
            [
                libc::PR_SET_NAME as u64,
                NAME_BYTES.as_ptr() as u64,
                0,
                0,
                0,
                0,
            ],
        );
        // What it may do from now on: wait, sleep, exit. A worker that turns hostile (it shares
        // this memory and could rewrite this stack) gains nothing from the holder, whatever
        // sandbox the app puts itself in after the holder started.
        let filter = allowed_calls();
        let program = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr() as *mut libc::sock_filter,
        };
        if raw::syscall(
            libc::SYS_prctl as u64,
            [libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0, 0],
        ) == 0
        {
            raw::syscall(
                libc::SYS_prctl as u64,
                [
                    libc::PR_SET_SECCOMP as u64,
                    libc::SECCOMP_MODE_FILTER as u64,
                    &program as *const libc::sock_fprog as u64,
                    0,
                    0,
                    0,
                ],
            );
        }
        let mut poll = libc::pollfd {
            fd: pidfd as i32,
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            let n = raw::syscall(
                libc::SYS_ppoll as u64,
                [&mut poll as *mut libc::pollfd as u64, 1, 0, 0, 8, 0],
            );
            // Readable: the worker's thread group has exited. No signal can interrupt the wait
            // (all blocked); any other error would only repeat.
            if n != -i64::from(libc::EINTR) {
                break;
            }
        }
        let linger = libc::timespec {
            tv_sec: (linger_ms / 1000) as libc::time_t,
            tv_nsec: ((linger_ms % 1000) * 1_000_000) as libc::c_long,
        };
        raw::syscall(
            libc::SYS_nanosleep as u64,
            [&linger as *const libc::timespec as u64, 0, 0, 0, 0, 0],
        );
    }
    0
}

/// The holder's seccomp filter: the system calls it makes from its wait on (`ppoll`,
/// `nanosleep`, `restart_syscall` after a stop, `exit` from the clone wrapper, `exit_group`,
/// `rt_sigreturn`), for this architecture only; anything else kills it.
fn allowed_calls() -> [libc::sock_filter; 12] {
    #[cfg(target_arch = "x86_64")]
    const ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
    #[cfg(target_arch = "aarch64")]
    const ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    const ARCH: u32 = 0;
    const LOAD: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    // seccomp_data: nr at offset 0, arch at 4.
    [
        op(LOAD, 0, 0, 4),
        op(JEQ, 1, 0, ARCH),
        op(RET, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
        op(LOAD, 0, 0, 0),
        op(JEQ, 6, 0, libc::SYS_ppoll as u32),
        op(JEQ, 5, 0, libc::SYS_nanosleep as u32),
        op(JEQ, 4, 0, libc::SYS_restart_syscall as u32),
        op(JEQ, 3, 0, libc::SYS_exit as u32),
        op(JEQ, 2, 0, libc::SYS_exit_group as u32),
        op(JEQ, 1, 0, libc::SYS_rt_sigreturn as u32),
        op(RET, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
        op(RET, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
}

mod raw {
    /// A system call with six arguments, made without libc: returns the kernel's result (a
    /// negative errno on failure) and touches no thread-local state.
    ///
    /// # Safety
    /// The arguments must be valid for system call `nr`.
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn syscall(nr: u64, a: [u64; 6]) -> i64 {
        let ret: i64;
        // SAFETY: the caller's; the kernel clobbers rcx and r11 and uses no stack of ours.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") nr as i64 => ret,
                in("rdi") a[0], in("rsi") a[1], in("rdx") a[2],
                in("r10") a[3], in("r8") a[4], in("r9") a[5],
                lateout("rcx") _, lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }

    /// See the x86_64 one.
    ///
    /// # Safety
    /// The arguments must be valid for system call `nr`.
    #[cfg(target_arch = "aarch64")]
    pub(super) unsafe fn syscall(nr: u64, a: [u64; 6]) -> i64 {
        let ret: i64;
        // SAFETY: the caller's; the kernel uses no stack of ours.
        unsafe {
            std::arch::asm!(
                "svc 0",
                in("x8") nr,
                inlateout("x0") a[0] as i64 => ret,
                in("x1") a[1], in("x2") a[2], in("x3") a[3], in("x4") a[4], in("x5") a[5],
                options(nostack),
            );
        }
        ret
    }

    /// Never called: [`super::start`] refuses on other architectures.
    ///
    /// # Safety
    /// None needed.
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    pub(super) unsafe fn syscall(_nr: u64, _a: [u64; 6]) -> i64 {
        -i64::from(libc::ENOSYS)
    }
}
