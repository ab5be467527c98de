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
//! main thread's), only system calls made here by hand, from its own stack (a leaked block); libc's
//! `clone` wrapper is used only where its child path touches no thread state either (glibc 2.25
//! and later, musl). It starts with every signal blocked (by the system call: libc keeps two of
//! its own unblocked) and never unblocks one, so no handler of the worker's runs in it; it keeps a
//! descriptor table of its own with only the pidfd in it (so it holds none of the worker's
//! connections or sockets open); it gives up core dumps and confines itself (`no_new_privs` and a
//! seccomp filter: wait, sleep, exit), since the worker could rewrite its stack, and [`start`]
//! returns only once it has (or ends it); and it leaves no exit signal to its parent: a "clone"
//! child, which `wait` and `waitpid` without `__WALL` do not report, so an app that waits for all
//! its children is not held up by it. Its scheduling policy is the worker's. When the worker is
//! gone it is the monitor's (a subreaper): the kernel or the monitor reaps it, and the monitor
//! knows its pid from the worker's scoreboard slot.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::bpf::op;

/// How long the holder outlives the worker before it lets go of the memory: past the first
/// answers of the worker's replacement, and short enough that a crash loop never keeps more
/// than a dead worker's memory or so.
pub const LINGER: Duration = Duration::from_millis(20);

/// How long [`start`] waits for the holder to have confined itself before it gives up on it.
const CONFINE_WAIT: Duration = Duration::from_secs(1);

/// The holder's stack: it makes a few system calls from one small frame.
const STACK_SIZE: usize = 16 * 1024;

/// The holder's name (`comm`, as `ps` and `top` show it), with the NULs of its 16 bytes.
const NAME_BYTES: &[u8; 16] = b"tine-holder\0\0\0\0\0";

/// The pid of this process's holder, once [`start`] made one (0: none). A forked child inherits
/// its parent's value until it starts its own (a failed start sets 0).
static HOLDER: AtomicI32 = AtomicI32::new(0);

/// The block holding this process's holder's stack and [`Handoff`] (null: none). Never freed
/// while its holder may run; a forked child inherits a copy it does not use, freed by
/// [`forget_inherited`].
static BLOCK: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());

/// What the worker hands the holder, at the bottom of the holder's block (its stack grows down
/// from the top): read by the holder, and `confined` written by it once it has confined itself.
#[repr(C)]
struct Handoff {
    pidfd: u32,
    linger_ms: u32,
    /// 0 while the holder confines itself; [`CONFINED`] or [`UNCONFINED`] after.
    confined: AtomicU32,
}

/// `Handoff::confined`: `no_new_privs` and the seccomp filter are in place.
const CONFINED: u32 = 1;
/// `Handoff::confined`: the kernel refused one of them.
const UNCONFINED: u32 = 2;

fn block_layout() -> std::alloc::Layout {
    std::alloc::Layout::from_size_align(STACK_SIZE, 4096).expect("a valid layout")
}

/// The holder of this process's memory, if it started one (a worker, or a worker promoted to
/// mold, which keeps its holder).
pub(crate) fn this_process_holder() -> Option<i32> {
    Some(HOLDER.load(Ordering::Relaxed)).filter(|pid| *pid > 0)
}

/// Forgets a holder inherited across a fork: a forked process starts without one, and its copy
/// of the parent holder's block (stack and handoff) is of no use to it.
pub(crate) fn forget_inherited() {
    HOLDER.store(0, Ordering::Relaxed);
    let block = BLOCK.swap(std::ptr::null_mut(), Ordering::Relaxed);
    if !block.is_null() {
        // SAFETY: this process's copy of a block allocated with `block_layout` by the parent's
        // `start`; no holder runs on this copy (the parent's holder runs on the parent's).
        unsafe { std::alloc::dealloc(block, block_layout()) };
    }
}

/// Starts the holder of the calling process's memory and waits (briefly) until it has
/// confined itself. Returns its pid.
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
    let supported = cfg!(all(
        any(target_arch = "x86_64", target_arch = "aarch64"),
        target_pointer_width = "64"
    ));
    if !supported || !libc_clone_is_clean() {
        return Err(io::Error::from(io::ErrorKind::Unsupported));
    }
    // Its own process, whose whole thread group's exit makes this readable.
    let pidfd = super::pidfd::open(nix::unistd::getpid())?;
    let layout = block_layout();
    // SAFETY: the layout's size is not zero.
    let block = unsafe { std::alloc::alloc(layout) };
    if block.is_null() {
        return Err(io::Error::from(io::ErrorKind::OutOfMemory));
    }
    let handoff = block.cast::<Handoff>();
    // SAFETY: the block is STACK_SIZE bytes, page-aligned: room and alignment for a Handoff at
    // its start, which nothing else uses.
    unsafe {
        handoff.write(Handoff {
            pidfd: pidfd.as_raw_fd() as u32,
            linger_ms: LINGER.as_millis() as u32,
            confined: AtomicU32::new(0),
        })
    };
    // Every signal blocked across the clone, with the system call itself: libc's
    // `pthread_sigmask` leaves its own two (cancellation, set*id) unblocked, and a handler of
    // theirs running in the holder would run on this thread's state. The holder inherits the
    // mask and keeps it; this thread gets its own back at once.
    let mut kept_mask: u64 = 0;
    let blocked = set_signal_mask(!0, Some(&mut kept_mask));
    let cloned = if blocked != 0 {
        Err(io::Error::from_raw_os_error(-blocked as i32))
    } else {
        // SAFETY: `holder_main` runs on the block (its top is one past its end, in bounds),
        // which is never freed while the holder may run: it may outlive everything of this
        // process but the memory it shares. It makes only raw system calls and touches only
        // its own frame, the handoff and statics, so sharing this thread's memory and thread
        // pointer is sound (`libc_clone_is_clean`: the wrapper's child path touches neither);
        // with every signal blocked no handler runs in it. No `CLONE_FILES` (its table is a
        // copy, which it empties but for the pidfd) and exit signal 0.
        let pid = unsafe {
            libc::clone(
                holder_main,
                block.add(STACK_SIZE).cast(),
                libc::CLONE_VM,
                handoff.cast(),
            )
        };
        let cloned = if pid > 0 {
            Ok(pid)
        } else {
            Err(io::Error::last_os_error())
        };
        set_signal_mask(kept_mask, None);
        cloned
    };
    // This process's copy of the pidfd closes here; the holder's copy is its own.
    drop(pidfd);
    let pid = match cloned {
        Ok(pid) => pid,
        Err(e) => {
            // SAFETY: no holder started; the block is this thread's again.
            unsafe { std::alloc::dealloc(block, layout) };
            return Err(e);
        }
    };
    BLOCK.store(block, Ordering::Relaxed);
    // Back only once it has confined itself: until then it holds copies of this process's
    // descriptors and could do what this process can.
    // SAFETY: the handoff lives as long as the block, which is never freed now.
    let confined = unsafe { &(*handoff).confined };
    let until = Instant::now() + CONFINE_WAIT;
    let refused = loop {
        match confined.load(Ordering::Acquire) {
            CONFINED => return Ok(pid),
            UNCONFINED => {
                break io::Error::other(
                    "the holder could not confine itself (no_new_privs or seccomp refused)",
                )
            }
            _ if Instant::now() >= until => {
                break io::Error::other("the holder did not confine itself in time");
            }
            _ => std::thread::sleep(Duration::from_micros(50)),
        }
    };
    // Not kept: ended and reaped here (a "clone" child, waited for as one), so that neither a
    // zombie nor an unconfined process stays. Its block stays leaked: it may still be running
    // on it until the kill lands.
    let pid = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::__WCLONE));
    BLOCK.store(std::ptr::null_mut(), Ordering::Relaxed);
    Err(refused)
}

/// Sets the calling thread's signal mask to `mask` (all 64 signals, libc's own too) by the system
/// call, the previous one into `old`; returns the kernel's result (0, or a negative errno).
fn set_signal_mask(mask: u64, old: Option<&mut u64>) -> i64 {
    let old = old.map_or(0, |o| o as *mut u64 as u64);
    // SAFETY: rt_sigprocmask reads the 8-byte set `mask` and writes the one `old` points to (or
    // none), both alive for the call.
    unsafe {
        raw::syscall(
            libc::SYS_rt_sigprocmask as u64,
            [
                libc::SIG_SETMASK as u64,
                &mask as *const u64 as u64,
                old,
                8,
                0,
                0,
            ],
        )
    }
}

/// Whether libc's `clone` wrapper leaves the caller's thread-local state alone in a `CLONE_VM`
/// child: glibc before 2.25 wrote the child's pid into the caller's thread block (its pid
/// cache), which would corrupt this thread's; later glibc and musl do not. Other libcs (bionic
/// writes the caller's thread id) are refused.
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
    #[cfg(target_env = "musl")]
    {
        true
    }
    #[cfg(not(any(target_env = "gnu", target_env = "musl")))]
    {
        false
    }
}

/// The holder: empties its descriptor table but for the pidfd, names itself, gives up core
/// dumps, confines itself and says so, waits until the worker's whole thread group has exited,
/// then [`LINGER`]s and returns (the clone wrapper exits): that exit tears the shared memory down.
extern "C" fn holder_main(arg: *mut libc::c_void) -> libc::c_int {
    let handoff = arg.cast::<Handoff>();
    // SAFETY: `start_holder` wrote the handoff before the clone and never frees it.
    let (pidfd, linger_ms) =
        unsafe { (u64::from((*handoff).pidfd), u64::from((*handoff).linger_ms)) };
    // SAFETY (each call): a raw system call whose arguments are numbers or pointers into this
    // frame or to statics, valid for the call.
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
        // A holder killed by its filter must not dump the worker's whole memory as a core.
        let no_core = libc::rlimit64 {
            rlim_cur: 0,
            rlim_max: 0,
        };
        raw::syscall(
            libc::SYS_prlimit64 as u64,
            [
                0,
                libc::RLIMIT_CORE as u64,
                &no_core as *const libc::rlimit64 as u64,
                0,
                0,
                0,
            ],
        );
        // What it may do from now on: wait, sleep, exit. A worker that turns hostile (it shares
        // this memory and could rewrite this stack) gains nothing from the holder, whatever
        // sandbox the app puts itself in after the holder started.
        let program = libc::sock_fprog {
            len: ALLOWED_CALLS.len() as u16,
            filter: ALLOWED_CALLS.as_ptr() as *mut libc::sock_filter,
        };
        let confined = raw::syscall(
            libc::SYS_prctl as u64,
            [libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0, 0],
        ) == 0
            && install_filter(&program);
        (*handoff).confined.store(
            if confined { CONFINED } else { UNCONFINED },
            Ordering::Release,
        );
        if !confined {
            return 1;
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

/// Installs the holder's filter without the speculation mitigations the kernel otherwise
/// imposes on a task with a seccomp filter (`SECCOMP_FILTER_FLAG_SPEC_ALLOW`, Linux 4.17: the
/// holder runs no untrusted code, and its teardown should not run slower); with `prctl` where
/// the flag is unknown.
///
/// # Safety
/// Only from the holder, with `no_new_privs` set.
unsafe fn install_filter(program: &libc::sock_fprog) -> bool {
    const SECCOMP_SET_MODE_FILTER: u64 = 1;
    const SECCOMP_FILTER_FLAG_SPEC_ALLOW: u64 = 1 << 2;
    let program = program as *const libc::sock_fprog as u64;
    // SAFETY: seccomp(2) reads the program, which lives for the call.
    let set = unsafe {
        raw::syscall(
            libc::SYS_seccomp as u64,
            [
                SECCOMP_SET_MODE_FILTER,
                SECCOMP_FILTER_FLAG_SPEC_ALLOW,
                program,
                0,
                0,
                0,
            ],
        )
    };
    if set == 0 {
        return true;
    }
    // SAFETY: as above, through prctl.
    let set = unsafe {
        raw::syscall(
            libc::SYS_prctl as u64,
            [
                libc::PR_SET_SECCOMP as u64,
                libc::SECCOMP_MODE_FILTER as u64,
                program,
                0,
                0,
                0,
            ],
        )
    };
    set == 0
}

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const AUDIT_ARCH: u32 = 0;

const LOAD: u32 = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
const JEQ: u32 = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
const RET: u32 = libc::BPF_RET | libc::BPF_K;

/// The holder's seccomp filter: the system calls it makes from its wait on (`ppoll`,
/// `nanosleep`, `restart_syscall` after a stop, `exit` from the clone wrapper, `exit_group`,
/// `rt_sigreturn`), for this architecture only; anything else kills it. A static, so that the
/// holder builds nothing to install it. (`seccomp_data`: the call's number at offset 0, the
/// architecture at 4; a jump counts from the next instruction.)
static ALLOWED_CALLS: [libc::sock_filter; 12] = [
    op(LOAD, 0, 0, 4),
    op(JEQ, 1, 0, AUDIT_ARCH),
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
];

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
