//! The scheduling policy of a worker's threads (`sched_batch`).
//!
//! A worker moves itself from `SCHED_OTHER` to `SCHED_BATCH` right after its death-notice thread
//! started (that one keeps `SCHED_OTHER`: it must preempt to report a death) and before its
//! app's boot, its profiler and its runtime start threads, which inherit the policy. A policy the
//! operator chose (`chrt`, systemd's `CPUSchedulingPolicy=`) is left alone: nothing here touches
//! a process that did not make that first switch itself ([`BATCH_SET_HERE`]).
//!
//! A hot spare is the exception for a moment: it stands by, and serves its [`FIRST_SERVICE`]
//! after it takes a dead worker's place, with its main thread and its runtime's threads under
//! `SCHED_OTHER`, so that its wake-ups (by a death, by `Activate`, by the connections queued
//! while no one accepted) preempt busy tasks instead of waiting for their time slices to end.
//! Then they move to `SCHED_BATCH`. The runtime's threads are found by their ids, kept as they
//! start and stop ([`runtime_thread_started`], [`runtime_thread_stopped`]): not by listing
//! `/proc/self/task`, whose dentries make the monitor's reap of this process spin (see
//! `name_runtime_thread`); that is the suspected reason why a change that listed it (78e5aff,
//! reverted) made tests/chaos's reaps take seconds of the monitor's CPU. Threads an app's
//! handler starts itself during those moments keep the `SCHED_OTHER` they inherit. The move back
//! is a task of the spare's runtime: a handler that blocks the only runtime thread from the first
//! request holds it up, and the monitor then puts the main thread back itself
//! (`monitor::spares`, `settle_activated_priorities`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::sys::process::{switch_policy, switch_policy_of, Policy};

/// How long an activated spare serves under `SCHED_OTHER` (and at the priority it stood by at)
/// before it moves to the tree's priority and to `SCHED_BATCH`: its first connections were
/// queued while no one accepted, and it must not wait at each of its wake-ups for a CPU that the
/// dead worker's teardown and busy peers hold.
pub(super) const FIRST_SERVICE: Duration = Duration::from_millis(50);

/// Whether this process moved itself to `SCHED_BATCH` (so that a spare may move back for a moment,
/// and a worker promoted to mold moves back for good); false where the operator chose a policy or
/// `sched_batch` is off.
static BATCH_SET_HERE: AtomicBool = AtomicBool::new(false);

/// Whether a spare stands by or serves its first moments under `SCHED_OTHER`.
static FIRST_MOMENTS: AtomicBool = AtomicBool::new(false);

/// The ids of the runtime's threads while they run (its workers with `worker_threads` > 1, its
/// blocking pool), other than the main thread.
static RUNTIME_THREADS: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Moves this worker to `SCHED_BATCH` (`sched_batch`), remembering that it did. Call it on the
/// main thread, before threads that should inherit it start.
pub(super) fn enter_sched_batch() {
    match switch_policy(Policy::Other, Policy::Batch) {
        Ok(switched) => BATCH_SET_HERE.store(switched, Ordering::Relaxed),
        Err(e) => tracing::warn!(error = %e, "SCHED_BATCH not set"),
    }
}

/// Undoes this worker's own switch to `SCHED_BATCH`: a worker promoted to mold runs as molds do
/// (the workers it forks switch themselves). Called once its runtime is gone.
pub(crate) fn restore_scheduling_policy() {
    FIRST_MOMENTS.store(false, Ordering::Relaxed);
    if BATCH_SET_HERE.swap(false, Ordering::Relaxed) {
        if let Err(e) = switch_policy(Policy::Batch, Policy::Other) {
            tracing::warn!(error = %e, "SCHED_OTHER not restored");
        }
    }
}

/// A spare's main thread (call it there: it stands by on it) and its runtime's threads move to
/// `SCHED_OTHER` until [`serve_under_sched_batch`], if this process moved itself to
/// `SCHED_BATCH`.
pub(super) fn stand_by_under_sched_other() {
    if !BATCH_SET_HERE.load(Ordering::Relaxed) {
        return;
    }
    FIRST_MOMENTS.store(true, Ordering::Relaxed);
    if let Err(e) = switch_policy(Policy::Batch, Policy::Other) {
        tracing::warn!(error = %e, "the spare stands by under SCHED_BATCH");
    }
    switch_runtime_threads(Policy::Batch, Policy::Other);
}

/// Moves an activated spare's main thread and runtime threads back to `SCHED_BATCH` after
/// [`FIRST_SERVICE`] (see [`stand_by_under_sched_other`]), from any of its runtime threads.
pub(super) fn serve_under_sched_batch() {
    if !BATCH_SET_HERE.load(Ordering::Relaxed) {
        return;
    }
    // Before the threads are switched: one that starts from now on moves itself.
    FIRST_MOMENTS.store(false, Ordering::Relaxed);
    switch_runtime_threads(Policy::Other, Policy::Batch);
    // The main thread last: once it is SCHED_BATCH, so is every runtime thread.
    // Contract: the main thread (the pid) lives as long as the process.
    if let Err(e) = switch_policy_of(std::process::id() as i32, Policy::Other, Policy::Batch) {
        tracing::warn!(error = %e, "SCHED_BATCH not set");
    }
}

/// Switches every running runtime thread in `from` to `to`. The list stays locked meanwhile, so
/// that no thread in it can finish (see [`runtime_thread_stopped`]) and its id be reused by a
/// thread of another process before the switch.
fn switch_runtime_threads(from: Policy, to: Policy) {
    let threads = RUNTIME_THREADS.lock().unwrap_or_else(|e| e.into_inner());
    for &tid in threads.iter() {
        // Contract: a thread in the list is this process's and cannot finish meanwhile.
        if let Err(e) = switch_policy_of(tid, from, to) {
            tracing::warn!(error = %e, tid, "a runtime thread's policy not switched");
        }
    }
}

/// The runtime's `on_thread_start`: keeps the new thread's id, and gives it the policy of the
/// moment, whatever it inherited: `SCHED_OTHER` during a spare's first moments, `SCHED_BATCH`
/// outside them (the main thread of a spare starts the blocking pool's threads). A thread is
/// created before it runs this: one created before a spare stood by but running this only after
/// [`stand_by_under_sched_other`] switched the listed threads was missed by that switch.
///
/// The flag is read and the thread switched under the list's lock, which both switches of the
/// listed threads take after they set the flag: so either this thread is listed before a switch
/// takes the lock (and switched by it) or it reads the flag that switch set.
pub(super) fn runtime_thread_started() {
    let tid = crate::sys::futex::gettid() as i32;
    let mut threads = RUNTIME_THREADS.lock().unwrap_or_else(|e| e.into_inner());
    threads.push(tid);
    if BATCH_SET_HERE.load(Ordering::Relaxed) {
        let _ = match FIRST_MOMENTS.load(Ordering::Relaxed) {
            true => switch_policy(Policy::Batch, Policy::Other),
            false => switch_policy(Policy::Other, Policy::Batch),
        };
    }
    drop(threads);
}

/// The runtime's `on_thread_stop`: forgets the thread's id before it is gone.
pub(super) fn runtime_thread_stopped() {
    let tid = crate::sys::futex::gettid() as i32;
    RUNTIME_THREADS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|t| *t != tid);
}
