//! A worker's death notice: a thread of its own descriptor table, holding one end of a socket
//! pair whose other end the monitor polls, so that the monitor hears of the worker's death at the
//! start of the kernel's teardown rather than at its end.
//!
//! Why. When a process is killed, each of its threads runs `do_exit`, which lets go of the
//! address space (`exit_mm`) before the descriptor table (`exit_files`), and the last thread to
//! let go of the address space tears it down (`exit_mmap`: every mapped page unmapped). The
//! descriptors shared by all threads (the channel to the monitor, the clients' connections) close
//! only when the last thread sharing the table exits. So with one table the monitor reads EOF on
//! the channel, and clients see their connections reset, only after the whole address space is
//! gone: ~250 µs of kernel CPU for a hello worker (5 MB resident) on the 2-vCPU VM of
//! bench/results/respawn.md, and more with a bigger heap.
//!
//! This thread's table is its own (`CLOSE_RANGE_UNSHARE`) and holds only its end of the pair.
//! Whichever order the threads die in:
//! - this thread exits before the last of the others: it is not the last user of the address
//!   space, so its exit closes its table at once, and the monitor's end reads EOF (hangs up)
//!   while another thread is still tearing the address space down;
//! - it exits last: the other threads have closed the shared table already (the channel, the
//!   connections) and it is this thread that tears the address space down, after them.
//!
//! Either way the monitor knows before `exit_mmap` and has a spare serving meanwhile. (With the
//! holder of the worker's memory, `sys::holder`, no thread of the worker runs `exit_mmap` at all:
//! the shared table closes as soon as the threads sharing it have exited.)
//!
//! The same thread owns the worker's robust futex word (scoreboard, see `takeover`): it registers
//! a one-entry robust list pointing at it (`sys::futex::own_robust_word`), and while the worker is
//! serving capacity ([`arm`]) the word holds its thread id. When the thread dies with the process,
//! its `exit_mm` (before `exit_files`) makes the kernel mark the word `OWNER_DIED` and wake a
//! standing-by spare, which takes the worker's place without waiting for the monitor.
//! Whatever ends a worker on purpose (a stop, a drain, a promotion, the monitor gone) releases the
//! word first ([`disarm`]), so only an abnormal death (a kill, a crash, an abort) leaves it marked.
//!
//! Nothing is ever sent on the pair; it only ever hangs up, when this thread exits: when the
//! process exits (killed, crashed or done) or when [`Sentinel::stop`] ends it, before a worker
//! promoted to mold forks (a mold must be single-threaded). The monitor (`on_death_notice`) acts
//! only on a worker that is serving and not being promoted.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

/// This process's robust word and its death-notice thread's id, while that thread runs and owns
/// the word (a `Mutex`, not a `OnceLock`: a worker promoted to mold clears it before it forks).
static ROBUST: Mutex<Option<(&'static AtomicU32, u32)>> = Mutex::new(None);

/// This worker is now capacity that a spare may replace at once: its robust word names the
/// death-notice thread, so that the kernel marks it `OWNER_DIED` (and wakes a watching spare) if
/// the process dies before [`disarm`]. Standing-by spares are told to watch it.
pub(crate) fn arm() {
    let robust = *ROBUST.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((word, tid)) = robust {
        word.store(tid, Ordering::Release);
        crate::ipc::scoreboard::global().bump_roster();
    }
}

/// This worker stops being such capacity (told to stop, drain or become a mold): its death from
/// now on is no spare's business but the monitor's.
pub(crate) fn disarm() {
    let robust = *ROBUST.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((word, _)) = robust {
        word.store(0, Ordering::Release);
    }
}

/// The running death-notice thread.
pub(crate) struct Sentinel {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Sentinel {
    /// Starts the thread. Returns it and the monitor's end of the pair (for `Report::Hello`).
    /// Call it while this process has no other thread that opens descriptors.
    ///
    /// With `robust`, this worker's robust word (see [`arm`]), the thread makes it its robust
    /// futex; without (or if the kernel refuses), only the monitor's notice tells of a death.
    pub(crate) fn start(
        robust: Option<&'static AtomicU32>,
    ) -> std::io::Result<(Sentinel, OwnedFd)> {
        let (monitor_end, own_end) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let (kept_tx, kept_rx) = std::sync::mpsc::sync_channel(1);
        let keep = own_end.as_raw_fd();
        let thread = std::thread::Builder::new()
            .name("tine-sentinel".into())
            .stack_size(64 * 1024)
            .spawn({
                let stop = stop.clone();
                move || {
                    // No signal may run its handler here: handlers wake their thread of interest
                    // by writing to a descriptor (the profiler's eventfd, tokio's signal pipe in
                    // the app) that this thread's table does not have, so a process-directed
                    // signal delivered to this thread would be lost, and the monitor's request
                    // for a hung worker's stacks (one signal per thread) went unanswered. Blocked
                    // here, the kernel delivers such signals to another thread.
                    let _ = nix::sys::signal::pthread_sigmask(
                        nix::sys::signal::SigmaskHow::SIG_BLOCK,
                        Some(&nix::sys::signal::SigSet::all()),
                        None,
                    );
                    // Its id in the robust word marks the worker alive (see `arm`). This
                    // replaces glibc's robust list for this thread: harmless only because it takes
                    // no robust mutex (it parks); see `sys::futex`.
                    let owner = robust.and_then(|word| {
                        crate::sys::futex::own_robust_word(word)
                            .ok()
                            .map(|()| (word, crate::sys::futex::gettid()))
                    });
                    // From here on this thread uses no descriptor (not even stderr): it only parks.
                    let kept = crate::sys::fd::keep_only_in_own_table(keep);
                    let _ = kept_tx.send(kept.map(|()| owner));
                    while !stop.load(Ordering::Acquire) {
                        std::thread::park();
                    }
                }
            })?;
        let sentinel = Sentinel { stop, thread };
        let kept = kept_rx
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("the thread ended")));
        // The shared table's copy goes now: the sentinel's own table holds the only one.
        drop(own_end);
        match kept {
            Ok(owner) => {
                if owner.is_none() && robust.is_some() {
                    tracing::debug!("no robust futex for the death-notice thread: a spare takes this worker's place only when the monitor says so");
                }
                *ROBUST.lock().unwrap_or_else(|e| e.into_inner()) = owner;
                Ok((sentinel, monitor_end))
            }
            Err(e) => {
                sentinel.stop();
                Err(e)
            }
        }
    }

    /// Ends the thread (its end of the pair closes with it) and waits for it. Its robust word is
    /// released first.
    pub(crate) fn stop(self) {
        disarm();
        *ROBUST.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.stop.store(true, Ordering::Release);
        self.thread.thread().unpark();
        let _ = self.thread.join();
    }
}
