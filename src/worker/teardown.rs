//! A worker's last thread: it does nothing while the worker lives, at the lowest priority
//! (nice 19), so that when the worker is killed it is the last of its threads to get a CPU and
//! exit, and the kernel's teardown of the dead worker's memory runs in it, after the work that
//! matters then.
//!
//! Why. When a process is killed, the last of its threads to let go of the address space tears it
//! down (`exit_mmap`: every mapped page unmapped, ~230–350 µs of kernel CPU for a `hello` worker on
//! a 2-vCPU VM), and a kernel without preemption (`PREEMPT_NONE`, common on servers) does not give
//! that CPU back until it is done. Without this thread the teardown fell to whichever of the dead
//! worker's threads the scheduler ran last, at the worker's priority, often on the CPU where the
//! spare taking its place, or the client waiting for the spare's answer, wanted to run next
//! (`bench/results/respawn.md`, session 11). Woken by the kill together with the others, this
//! thread, at nice 19, runs after them and after other runnable tasks of normal priority, so the
//! teardown mostly starts once the spare has answered. Measured (`bench/respawn/ab.sh`, same
//! binary with and without it, 16 blocks of 10 kills in 3 runs): a new connection answered
//! 541 vs 676 µs after the kill (median; faster in 12 of 16 blocks); the dead worker's own
//! kept-alive clients, whose connections the kernel resets only after the teardown, 773 vs
//! 752 µs.
//!
//! The cost: one parked thread per worker (a 64 KiB stack), and on a machine saturated with
//! normal-priority work a dead worker's memory and connections may outlive it a little longer
//! (2 busy loops on 2 CPUs: kill to zombie 0.4 ms median, 4.1 ms at most, as without it).
//! Nothing else changes: it holds no lock, takes no signal (all blocked, like the death notice's
//! thread) and is stopped before a worker is promoted to mold (a mold must be single-threaded).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The thread's name (`comm`): the monitor asks it for no stack when the worker hangs.
const THREAD_NAME: &str = "tine-teardown";

/// The running thread.
pub(crate) struct TeardownThread {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl TeardownThread {
    /// Starts it. Its nice value is its own (Linux sets it per thread), so nothing else of the
    /// worker runs lower for it.
    pub(crate) fn start() -> std::io::Result<TeardownThread> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .stack_size(64 * 1024)
            .spawn({
                let stop = stop.clone();
                move || {
                    // A process-directed signal must go to a thread that handles it (see
                    // `sentinel`), and the monitor's request for a hung worker's stacks skips it.
                    let _ = nix::sys::signal::pthread_sigmask(
                        nix::sys::signal::SigmaskHow::SIG_BLOCK,
                        Some(&nix::sys::signal::SigSet::all()),
                        None,
                    );
                    // Raising one's own nice value needs no privilege.
                    if let Err(e) = crate::sys::process::set_nice(19) {
                        tracing::debug!(error = %e, "the teardown thread keeps the worker's priority");
                    }
                    while !stop.load(Ordering::Acquire) {
                        std::thread::park();
                    }
                }
            })?;
        Ok(TeardownThread { stop, thread })
    }

    /// Ends the thread and waits for it.
    pub(crate) fn stop(self) {
        self.stop.store(true, Ordering::Release);
        self.thread.thread().unpark();
        let _ = self.thread.join();
    }
}
