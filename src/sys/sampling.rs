//! The signal side of profiling and of hung workers' stacks (`crate::worker::profile` is the rest): the
//! handlers, the `ITIMER_PROF` timer, and the preallocated memory the handlers write into.
//!
//! # What runs in signal context, and why it is async-signal-safe
//!
//! Three handlers, installed by [`install_handlers`] in a worker:
//!
//! - `SIGUSR2`: sets a bit and writes to an eventfd: the profiler thread toggles the profile.
//! - [`stack_signal`] (a real-time signal the monitor sends to each thread of a hung worker): the
//!   thread records its own stack into one of [`MAX_STACKS`] static slots, then sets a bit and
//!   writes to the eventfd.
//! - `SIGPROF` (from `ITIMER_PROF`, only while a profile runs): the thread records its own stack as
//!   one sample into a buffer allocated before the timer started.
//!
//! They touch only atomics, the preallocated memory, `write(2)` on the eventfd and `gettid(2)`:
//! no allocation, no lock, no formatting, errno saved and restored. The stack is taken with
//! `backtrace::trace_unsynchronized`, which on Linux is libgcc's `_Unwind_Backtrace`: it walks the
//! `.eh_frame` tables without allocating, and finds them with glibc's `_dl_find_object` (glibc
//! 2.35 and later), which takes no lock; the one-time initialisation inside libgcc is done by
//! [`warm_up_unwinder`] outside signal context first. Symbolization (which allocates and reads
//! files) happens later, on an ordinary thread.
//!
//! Nothing here survives a fork in a harmful way: `ITIMER_PROF` is not inherited by a child, the
//! buffers are freed when a profile stops, and [`uninstall_handlers`] (called before a worker is
//! promoted to a mold) ignores the signals again before it closes the eventfd.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Frames kept per stack (the innermost ones: a deeper stack is cut at its outer end).
pub const MAX_FRAMES: usize = 128;
/// Threads of one hung worker whose stacks are kept.
pub const MAX_STACKS: usize = 16;

/// [`take_pending`] bit: `SIGUSR2` arrived (toggle the profile).
pub const PENDING_TOGGLE: u32 = 1;
/// [`take_pending`] bit: at least one thread recorded its stack on [`stack_signal`].
pub const PENDING_STACK: u32 = 2;
/// [`take_pending`] bit: ordinary code asked the profiler thread to look at its requests.
pub const PENDING_REQUEST: u32 = 4;

/// The eventfd the handlers write to, -1 when none is installed.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
/// What woke the profiler thread (`PENDING_*` bits).
static PENDING: AtomicU32 = AtomicU32::new(0);
/// Handlers running now (of any of the three): memory they use is freed only when this is 0.
static IN_HANDLER: AtomicUsize = AtomicUsize::new(0);

/// Words of one sample: thread id, number of frames, frames.
const SAMPLE_WORDS: usize = 2 + MAX_FRAMES;

/// The samples of the running profile: one word holding the capacity `n`, then `n` samples of
/// [`SAMPLE_WORDS`] words (the capacity travels with the buffer it describes).
static SAMPLES: AtomicPtr<AtomicUsize> = AtomicPtr::new(std::ptr::null_mut());
static SAMPLES_NEXT: AtomicUsize = AtomicUsize::new(0);
static SAMPLES_DROPPED: AtomicU64 = AtomicU64::new(0);

/// One thread's stack, recorded on [`stack_signal`].
struct StackSlot {
    tid: AtomicUsize,
    /// Frames recorded; 0 while the slot is unused or being written (published last).
    depth: AtomicUsize,
    frames: [AtomicUsize; MAX_FRAMES],
}

#[allow(clippy::declare_interior_mutable_const)] // only used to initialize the static array
const EMPTY_SLOT: StackSlot = StackSlot {
    tid: AtomicUsize::new(0),
    depth: AtomicUsize::new(0),
    frames: [const { AtomicUsize::new(0) }; MAX_FRAMES],
};
static STACKS: [StackSlot; MAX_STACKS] = [EMPTY_SLOT; MAX_STACKS];
static STACKS_NEXT: AtomicUsize = AtomicUsize::new(0);

/// One recorded stack: the thread and its frames, innermost first. The first frame is the exact
/// interrupted instruction; the others are return addresses (symbolize `ip - 1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stack {
    /// Kernel thread id.
    pub tid: u32,
    /// Instruction addresses, innermost first.
    pub frames: Vec<usize>,
}

/// The real-time signal that asks every thread of a worker for its stack (`SIGRTMIN + 4`, a
/// number no library of the server uses). Ignored by molds, caught by workers.
pub fn stack_signal() -> libc::c_int {
    libc::SIGRTMIN() + 4
}

/// Sends [`stack_signal`] to thread `tid` of process `pid` (`tgkill(2)`: the thread must belong to
/// that process, so a recycled thread id elsewhere is never hit).
pub fn request_stack(pid: i32, tid: i32) -> io::Result<()> {
    // SAFETY: tgkill takes plain integers and sends a signal; no memory is involved.
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, stack_signal()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes this process ignore `SIGUSR2` and [`stack_signal`]: what a mold does (the monitor's
/// `SIGUSR2` means refork; a mold has nothing to profile), and what a worker inherits until it
/// installs its handlers. Without it, both would end the process (their default action).
pub fn ignore_profiling_signals() -> io::Result<()> {
    for sig in [libc::SIGUSR2, stack_signal()] {
        set_action(sig, libc::SIG_IGN)?;
    }
    Ok(())
}

fn set_action(sig: libc::c_int, handler: libc::sighandler_t) -> io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid value (empty mask, no flags); fields are set below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handler;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    // Neither sampling nor stack recording nests inside the other on one thread.
    // SAFETY: sa_mask is a valid sigset_t owned by `action`; sigemptyset/sigaddset only write it.
    unsafe {
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaddset(&mut action.sa_mask, libc::SIGPROF);
        libc::sigaddset(&mut action.sa_mask, stack_signal());
    }
    // SAFETY: `action` is fully initialized and outlives the call; the handlers installed here
    // (SIG_IGN or the functions of this module) are async-signal-safe (see the module doc).
    let rc = unsafe { libc::sigaction(sig, &action, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Unwinds once outside signal context, so that the unwinder's one-time initialisation (inside
/// libgcc, under a `pthread_once`) never first runs inside a handler.
pub fn warm_up_unwinder() {
    let mut frames = 0;
    backtrace::trace(|_| {
        frames += 1;
        frames < 4
    });
}

/// Creates the eventfd the handlers wake the profiler thread with and installs the `SIGUSR2` and
/// [`stack_signal`] handlers. Returns the eventfd, to poll for `POLLIN` and then call
/// [`take_pending`].
///
/// # Contract
///
/// At most once until [`uninstall_handlers`]; the returned descriptor belongs to this module and is
/// closed by [`uninstall_handlers`]: crate-private.
pub(crate) fn install_handlers() -> io::Result<RawFd> {
    if WAKE_FD.load(Ordering::SeqCst) >= 0 {
        return Err(io::Error::other("profiling handlers are already installed"));
    }
    warm_up_unwinder();
    // SAFETY: eventfd takes plain integers and returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    WAKE_FD.store(fd, Ordering::SeqCst);
    PENDING.store(0, Ordering::SeqCst);
    STACKS_NEXT.store(0, Ordering::SeqCst);
    let installed = set_action(libc::SIGUSR2, on_toggle as *const () as libc::sighandler_t)
        .and_then(|()| set_action(stack_signal(), on_stack as *const () as libc::sighandler_t));
    if let Err(e) = installed {
        uninstall_handlers();
        return Err(e);
    }
    Ok(fd)
}

/// Stops any running profile, ignores the signals again, waits for handlers still running on
/// other threads, and closes the eventfd. Safe to call when nothing is installed.
pub fn uninstall_handlers() {
    let _ = stop_sampling();
    let _ = ignore_profiling_signals();
    // Swapped out before waiting: a handler (or `wake`, `take_pending`) counted in IN_HANDLER
    // only after the wait began loads -1.
    let fd = WAKE_FD.swap(-1, Ordering::SeqCst);
    quiesce();
    if fd >= 0 {
        // SAFETY: `fd` is the eventfd this module created and owns; no user of it is left
        // (WAKE_FD is -1 and those that loaded it before have returned, see `quiesce`).
        unsafe { libc::close(fd) };
    }
}

/// Waits until no handler runs on any thread.
fn quiesce() {
    while IN_HANDLER.load(Ordering::SeqCst) > 0 {
        std::thread::yield_now();
    }
}

/// Waits until a handler or [`wake`] wrote to the eventfd, or `timeout` passed (`None`: no limit).
/// Without handlers installed, just sleeps (at most 100 ms).
pub fn wait_for_wake(timeout: Option<std::time::Duration>) {
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd < 0 {
        std::thread::sleep(timeout.unwrap_or(std::time::Duration::from_millis(100)));
        return;
    }
    let ms = timeout
        .map(|t| t.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int)
        .unwrap_or(-1);
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes one valid local pollfd. It only waits on the descriptor and
    // consumes nothing: were the number closed and reused meanwhile (uninstall_handlers on
    // another thread), the worst outcome is an early wake-up.
    let _ = unsafe { libc::poll(&mut pollfd, 1, ms) };
}

/// Reads and clears what woke the profiler thread (`PENDING_*` bits).
pub fn take_pending() -> u32 {
    let _scope = HandlerScope::enter();
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into a local u64; a non-blocking eventfd with nothing to read
        // returns EAGAIN, which is fine.
        let _ = unsafe { libc::read(fd, (&mut count as *mut u64).cast(), 8) };
    }
    PENDING.swap(0, Ordering::SeqCst)
}

/// Wakes the profiler thread from ordinary code with `bits`.
pub fn wake(bits: u32) {
    let _scope = HandlerScope::enter();
    PENDING.fetch_or(bits, Ordering::SeqCst);
    write_wake_fd();
}

/// Async-signal-safe: one `write(2)` of 8 bytes to the eventfd, if there is one.
fn write_wake_fd() {
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a local u64 to the module's eventfd (kept open while any
        // handler runs, see `uninstall_handlers`); write is async-signal-safe.
        let _ = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Counts this handler (or ordinary code using the eventfd) as running for as long as it lives,
/// and keeps errno as it was.
struct HandlerScope(libc::c_int);

impl HandlerScope {
    fn enter() -> HandlerScope {
        IN_HANDLER.fetch_add(1, Ordering::SeqCst);
        // SAFETY: __errno_location returns this thread's errno, always valid.
        HandlerScope(unsafe { *libc::__errno_location() })
    }
}

impl Drop for HandlerScope {
    fn drop(&mut self) {
        // SAFETY: as above; restores the interrupted code's errno.
        unsafe { *libc::__errno_location() = self.0 };
        IN_HANDLER.fetch_sub(1, Ordering::SeqCst);
    }
}

extern "C" fn on_toggle(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _scope = HandlerScope::enter();
    PENDING.fetch_or(PENDING_TOGGLE, Ordering::SeqCst);
    write_wake_fd();
}

extern "C" fn on_stack(_: libc::c_int, _: *mut libc::siginfo_t, ucontext: *mut libc::c_void) {
    let _scope = HandlerScope::enter();
    let i = STACKS_NEXT.fetch_add(1, Ordering::SeqCst);
    if let Some(slot) = STACKS.get(i) {
        slot.depth.store(0, Ordering::SeqCst);
        let depth = record_stack(ucontext, &slot.frames);
        slot.tid.store(gettid(), Ordering::SeqCst);
        slot.depth.store(depth, Ordering::SeqCst);
    }
    PENDING.fetch_or(PENDING_STACK, Ordering::SeqCst);
    write_wake_fd();
}

extern "C" fn on_sample(_: libc::c_int, _: *mut libc::siginfo_t, ucontext: *mut libc::c_void) {
    let _scope = HandlerScope::enter();
    let buf = SAMPLES.load(Ordering::SeqCst);
    if buf.is_null() {
        return;
    }
    // SAFETY: `buf` is a live buffer of start_sampling (stop_sampling swaps it out, then waits
    // for IN_HANDLER to drop to 0 before freeing it); its first word is its capacity.
    let capacity = unsafe { &*buf }.load(Ordering::Relaxed);
    let i = SAMPLES_NEXT.fetch_add(1, Ordering::SeqCst);
    if i >= capacity {
        SAMPLES_DROPPED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // SAFETY: the buffer holds 1 + capacity * SAMPLE_WORDS words (see above); sample
    // `i < capacity` is this handler's alone (claimed by the fetch_add above).
    let words = unsafe { std::slice::from_raw_parts(buf.add(1 + i * SAMPLE_WORDS), SAMPLE_WORDS) };
    let depth = record_stack(ucontext, &words[2..]);
    words[0].store(gettid(), Ordering::Relaxed);
    words[1].store(depth, Ordering::Release);
}

fn gettid() -> usize {
    // SAFETY: gettid takes no argument and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as usize }
}

/// The instruction the signal interrupted, from the handler's `ucontext`.
fn interrupted_pc(ucontext: *mut libc::c_void) -> usize {
    if ucontext.is_null() {
        return 0;
    }
    let ucontext = ucontext.cast::<libc::ucontext_t>();
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler; reading a register
    // it saved is a plain load.
    let pc = unsafe { (*ucontext).uc_mcontext.gregs[libc::REG_RIP as usize] as usize };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: as above.
    let pc = unsafe { (*ucontext).uc_mcontext.pc as usize };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let pc = 0;
    pc
}

/// Records the interrupted code's stack into `out`, innermost first, leaving out the handler's own
/// frames (everything before the frame of the interrupted instruction). Returns the frames written.
fn record_stack(ucontext: *mut libc::c_void, out: &[AtomicUsize]) -> usize {
    let pc = interrupted_pc(ucontext);
    let mut depth = 0;
    let mut found = pc == 0;
    // SAFETY: trace_unsynchronized must not run concurrently with itself on another thread unless
    // the unwinder is thread-safe: libgcc's `_Unwind_Backtrace` is (it keeps no shared mutable
    // state once initialized, which `warm_up_unwinder` did), and it neither allocates nor locks
    // (see the module doc), so it may run in a signal handler.
    unsafe {
        backtrace::trace_unsynchronized(|frame| {
            let ip = frame.ip() as usize;
            if !found {
                if ip != pc {
                    return true; // still inside the handler
                }
                found = true;
            }
            if ip == 0 {
                return false; // the end of the stack (the outermost frame's return address)
            }
            out[depth].store(ip, Ordering::Relaxed);
            depth += 1;
            depth < out.len()
        });
    }
    if !found && pc != 0 {
        // The unwinder did not get through the signal frame: the interrupted instruction alone.
        out[0].store(pc, Ordering::Relaxed);
        depth = 1;
    }
    depth
}

/// Starts sampling every thread of this process at `hz` samples per second of CPU time
/// (`ITIMER_PROF`), keeping at most `capacity` samples (later ones are counted as dropped).
pub fn start_sampling(hz: u32, capacity: usize) -> io::Result<()> {
    warm_up_unwinder();
    let capacity = capacity.max(1);
    // Zeroed memory from the allocator (fresh pages for a large buffer): only the samples taken
    // touch it, so a long limit costs memory only if the profile runs that long.
    let words: Box<[usize]> = vec![0usize; 1 + capacity * SAMPLE_WORDS].into_boxed_slice();
    let words = Box::into_raw(words).cast::<AtomicUsize>();
    // SAFETY: `words` points to at least one initialized usize, and AtomicUsize has the same size,
    // alignment and bit validity as usize; nothing else sees the buffer yet.
    unsafe { &*words }.store(capacity, Ordering::Relaxed);
    SAMPLES_NEXT.store(0, Ordering::SeqCst);
    SAMPLES_DROPPED.store(0, Ordering::SeqCst);
    if SAMPLES
        .compare_exchange(
            std::ptr::null_mut(),
            words,
            Ordering::SeqCst,
            Ordering::SeqCst,
        )
        .is_err()
    {
        // SAFETY: `words` came from Box::into_raw just above and was never shared.
        drop(unsafe { boxed_samples(words) });
        return Err(io::Error::other("a profile is already running"));
    }
    set_action(libc::SIGPROF, on_sample as *const () as libc::sighandler_t)?;
    set_prof_timer(hz.clamp(1, 1000))
}

fn set_prof_timer(hz: u32) -> io::Result<()> {
    let usec = if hz == 0 { 0 } else { 1_000_000 / hz as i64 };
    let interval = libc::timeval {
        tv_sec: usec / 1_000_000,
        tv_usec: usec % 1_000_000,
    };
    let timer = libc::itimerval {
        it_interval: interval,
        it_value: interval,
    };
    // SAFETY: setitimer reads `timer`, a valid local, and writes no old value (null).
    let rc = unsafe { libc::setitimer(libc::ITIMER_PROF, &timer, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What a stopped profile collected.
#[derive(Debug, Default)]
pub struct Samples {
    /// One stack per sample.
    pub stacks: Vec<Stack>,
    /// Samples that did not fit in the buffer.
    pub dropped: u64,
}

/// Stops the timer, ignores `SIGPROF`, and returns the samples (`None` if no profile ran).
pub fn stop_sampling() -> Option<Samples> {
    let _ = set_prof_timer(0);
    let buf = SAMPLES.swap(std::ptr::null_mut(), Ordering::SeqCst);
    // A SIGPROF already pending is discarded once ignored.
    let _ = set_action(libc::SIGPROF, libc::SIG_IGN);
    if buf.is_null() {
        return None;
    }
    quiesce();
    // SAFETY: `buf` was published by start_sampling, swapped out above, and no handler uses it any
    // more (quiesce): this is its only owner.
    let words = unsafe { boxed_samples(buf) };
    let capacity = words[0].load(Ordering::Relaxed);
    let taken = SAMPLES_NEXT.load(Ordering::SeqCst).min(capacity);
    let stacks = words[1..]
        .chunks(SAMPLE_WORDS)
        .take(taken)
        .filter_map(|w| {
            let depth = w[1].load(Ordering::Acquire).min(MAX_FRAMES);
            (depth > 0).then(|| Stack {
                tid: w[0].load(Ordering::Relaxed) as u32,
                frames: w[2..2 + depth]
                    .iter()
                    .map(|f| f.load(Ordering::Relaxed))
                    .collect(),
            })
        })
        .collect();
    Some(Samples {
        stacks,
        dropped: SAMPLES_DROPPED.load(Ordering::SeqCst),
    })
}

/// Takes back ownership of a sample buffer made by `start_sampling`.
///
/// # Safety
///
/// `buf` must come from `Box::into_raw` in `start_sampling` (a boxed `[usize]`, which has the
/// layout of `[AtomicUsize]`; its first word is its capacity), and nothing else may use it any
/// more.
unsafe fn boxed_samples(buf: *mut AtomicUsize) -> Box<[AtomicUsize]> {
    // SAFETY: per the contract, the first word is valid and holds the capacity.
    let capacity = unsafe { &*buf }.load(Ordering::Relaxed);
    // SAFETY: per the contract, `buf` is a boxed slice of exactly this many words, owned here.
    unsafe {
        Box::from_raw(std::ptr::slice_from_raw_parts_mut(
            buf,
            1 + capacity * SAMPLE_WORDS,
        ))
    }
}

/// The stacks recorded on [`stack_signal`] since the last call, and clears them.
pub fn take_stacks() -> Vec<Stack> {
    let taken = STACKS_NEXT.swap(0, Ordering::SeqCst).min(MAX_STACKS);
    STACKS[..taken]
        .iter()
        .filter_map(|slot| {
            let depth = slot.depth.swap(0, Ordering::SeqCst).min(MAX_FRAMES);
            (depth > 0).then(|| Stack {
                tid: slot.tid.load(Ordering::SeqCst) as u32,
                frames: slot.frames[..depth]
                    .iter()
                    .map(|f| f.load(Ordering::Relaxed))
                    .collect(),
            })
        })
        .collect()
}

/// How many threads have started recording a stack since the last [`take_stacks`].
pub fn stacks_claimed() -> usize {
    STACKS_NEXT.load(Ordering::SeqCst)
}
