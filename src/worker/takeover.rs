//! A standing-by spare waits here, in its main thread: on its channel (for `Activate`, `Stop`, …)
//! and on the robust futex words of the serving workers (see `sentinel`). When the kernel marks
//! one `OWNER_DIED` (its worker died abnormally) it wakes this thread directly, early in the dying
//! thread's exit; the spare claims that worker's place in shared memory and opens its gates
//! without waiting for the monitor's `Activate`. One wake-up between the death and the spare
//! running, and no other thread to hand the claim to.
//!
//! Who decides. A spare says in its standby word, before it reports ready, that it watches
//! (`Scoreboard::watch_standby`; not where it cannot wait on futexes, see [`available`], and no
//! more once a wait failed). The monitor opens a worker's takeover word only while it is serving
//! capacity that it would replace at once with any spare (`Takeover::Open`), and arms a watching
//! spare's standby word only while that spare could be activated (`Scoreboard::arm_standby`); it
//! waits a moment for a spare's claim only if one is armed. It closes and disarms
//! them before retiring, rolling over or promoting a worker, during a reload or rollout, and when
//! the tree stops. A claim takes the spare's own standby word first (armed → taken), then the dead
//! worker's takeover word (open → claimed by this slot), and gives the first back if the second
//! fails; the monitor takes a spare's standby word before it sends `Activate`, and settles a dead
//! worker's takeover word (swaps it closed) before it activates a spare for it. So each death is
//! replaced once (by one spare, or by the monitor), and each spare takes one place.
//!
//! The kernel wakes one waiter per death, so only spares that may claim wait on the workers'
//! words: a spare watches them only while its own standby word is armed. If the one woken cannot
//! claim anyway (two spares raced for two deaths), the monitor replaces the worker as before,
//! after `monitor::spares::TAKEOVER_WAIT`.
//!
//! Waiting. The thread sleeps in `futex_waitv` on the roster word (bumped by a worker that starts
//! owning its word, and by the monitor after it sends a spare a command and when it arms or
//! disarms spares), the workers' words while armed, and a timeout for the heartbeat (the runtime's
//! heartbeat task does not run while this thread, the current-thread runtime's only one, is
//! blocked here). While not armed the timeout is a few ms ([`UNARMED_WAIT`]): a monitor of an
//! older build never arms it (it knows no watching spares), and one from before spares took places
//! on their own never bumps the roster either (a rollback adopts this build's spares): its
//! `Activate` must not wait for the heartbeat. The channel is read without blocking after each
//! wake-up; a monitor that dies without a word is noticed at the next heartbeat. If a
//! wait fails for good (anything but a timeout, a signal or a word that moved), the spare goes
//! back to waiting on its channel alone, as where `futex_waitv` is missing or refused.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::ipc::scoreboard::{self, Takeover};
use crate::sys::futex::{self, Waiter, OWNER_DIED, TID_MASK, WAITERS};

/// At most this many words per wait (the kernel's limit for `futex_waitv`).
const MAX_WAITERS: usize = 128;

/// How often the heartbeat is refreshed while standing by (as the runtime's task does).
const HEARTBEAT: Duration = Duration::from_millis(500);

/// The longest wait while this spare is not armed (see `stand_by`).
const UNARMED_WAIT: Duration = Duration::from_millis(5);

/// The worker whose place this spare took: its number, and when (`tine::respawn` timeline).
pub(crate) struct Claimed {
    pub nr: u32,
    pub at: Option<crate::log::RespawnStamp>,
}

/// How the standby ended.
pub(crate) enum Woken<T> {
    /// This spare took a dead worker's place.
    Claimed(Claimed),
    /// The channel said what to do (`read` returned it).
    Told(T),
    /// Waiting on the words failed for good (not a timeout, a signal or a word that moved): the
    /// spare waits on its channel alone from now on.
    CannotWatch,
}

/// Whether this spare can stand by here: `futex_waitv` exists (Linux 5.16+) and no seccomp filter
/// refuses it (`futex::have_waitv`).
/// With `debug` (`debug_routes`), `TINE_DEBUG_NO_FUTEX_WAITV` in the environment says no, as on a
/// kernel without the call (for tests).
pub(crate) fn available(debug: bool) -> bool {
    let ok =
        futex::have_waitv() && !(debug && std::env::var_os("TINE_DEBUG_NO_FUTEX_WAITV").is_some());
    if !ok {
        tracing::debug!("no futex_waitv: this spare waits for the monitor's Activate only");
    }
    ok
}

/// Stands by as the spare in scoreboard slot `own` until it takes a dead worker's place or `read`
/// (the channel, read without blocking) returns something; `heartbeat` is called every
/// [`HEARTBEAT`].
pub(crate) fn stand_by<T>(
    own: usize,
    mut read: impl FnMut() -> Option<T>,
    mut heartbeat: impl FnMut(),
) -> Woken<T> {
    let board = scoreboard::global();
    let roster = board.roster_word();
    let mut beat = Instant::now();
    'scan: loop {
        // Before the channel is read: a command sent after this (the monitor then bumps the
        // roster) makes the wait below return at once.
        let seen = roster.load(Ordering::Acquire);
        if let Some(told) = read() {
            return Woken::Told(told);
        }
        if beat.elapsed() >= HEARTBEAT {
            heartbeat();
            beat = Instant::now();
        }
        let mut waiters = vec![Waiter {
            word: roster,
            expected: seen,
            private: false,
        }];
        // The workers' words only while this spare may claim: the kernel wakes one waiter per
        // death, and a spare that may not claim would take that wake from one that may.
        let armed = board.standby_armed(own);
        let watched = if armed { board.capacity() } else { 0 };
        for slot in (0..watched).filter(|s| *s != own) {
            let Some(word) = board.owner_word(slot) else {
                continue;
            };
            let value = word.load(Ordering::Acquire);
            // The kernel leaves only OWNER_DIED (and WAITERS) in the word of a dead owner.
            if value & OWNER_DIED != 0 {
                if let Some(claimed) = try_claim(own, slot) {
                    return Woken::Claimed(claimed);
                }
                continue;
            }
            if value & TID_MASK == 0 {
                continue;
            }
            // So that the owner's death wakes a waiter.
            if value & WAITERS == 0
                && word
                    .compare_exchange(value, value | WAITERS, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
            {
                continue 'scan;
            }
            if waiters.len() < MAX_WAITERS {
                waiters.push(Waiter {
                    word,
                    expected: value | WAITERS,
                    private: false,
                });
            }
        }
        let mut left = HEARTBEAT.saturating_sub(beat.elapsed());
        if !armed {
            // The monitor bumps the roster when it arms this spare or sends it a command; one of
            // a build before spares took places on their own does neither (a rollback adopts
            // this build's spares): its `Activate` is read within this bound, not at the
            // heartbeat. (While a rollout or reload keeps it unarmed, ~200 wake-ups a second.)
            left = left.min(UNARMED_WAIT);
        }
        match futex::wait_any(&waiters, Some(left)) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EAGAIN | libc::EINTR | libc::ETIMEDOUT)
                ) => {}
            Err(e) => {
                // Not expected once `available` said yes. Trying again would fail again (a
                // retry loop would wake this spare ~100 times a second and read its channel late):
                // the channel alone, as where `futex_waitv` is missing.
                tracing::warn!(error = %e, "futex_waitv failed: this spare waits for the monitor's Activate only");
                // Said first: the monitor must not leave a dead worker's place to this spare.
                board.unwatch_standby(own);
                return Woken::CannotWatch;
            }
        }
    }
}

/// Takes the place of the worker in `dead` (its robust word says it died) if the monitor left
/// it open and this spare is armed.
fn try_claim(own: usize, dead: usize) -> Option<Claimed> {
    let board = scoreboard::global();
    if !matches!(board.takeover(dead), Takeover::Open { .. }) {
        return None;
    }
    if !board.take_standby(own, true) {
        return None;
    }
    match board.claim_takeover(dead, own) {
        Some(nr) => Some(Claimed {
            nr,
            at: crate::log::respawn_stamp(),
        }),
        None => {
            board.release_standby(own);
            None
        }
    }
}
