//! Hot spares (`spare_workers`): workers forked from the current mold and booted ahead of need
//! that accept nothing until the monitor activates one with a single message (`Activate`).
//!
//! A worker that dies, one recycled by a limit or replaced by a rollout, and one added by a
//! scale-up are all a worker number missing from the table in `reconcile`: a ready spare takes
//! that number at once, and a new spare is requested from the current mold [`REFILL_DELAY`] later
//! (not while the takeover needs the CPUs), booting in the background. Only when no ready spare fits is a worker forked and
//! booted the ordinary way.
//!
//! Generations. Spares come from the current mold (the newest ready one), so a refork or a reload
//! refreshes them: once the new generation is proven (one of its workers served) and has its
//! spares ready, older spares retire. Until then the older spares stay: a worker that dies while a
//! new generation is on trial is still replaced at once, by a spare of the old generation, which
//! the rollout then rolls over like any old worker; if the rollout is abandoned, the new
//! generation's spares go with it. A spare older than the current mold never replaces a worker
//! that a rollout is rolling to the current generation (it would be rolled over in turn).
//!
//! A spare does not listen while it stands by: it points its listening sockets' descriptors at
//! `/dev/null` before `boot`, so its reactor waits on none and it cannot accept. It keeps one copy
//! of each aside (registered nowhere) for a takeover of its own (below); told to stop, it exits at
//! once, copies and all, so a stop of the tree never waits on it. `Activate` passes the sockets
//! (`SCM_RIGHTS`, in the monitor's order, which is the spare's).
//!
//! Takeover without the monitor (`worker::takeover`). A serving worker's death-notice thread owns
//! a robust futex word in the worker's scoreboard slot; a standing-by spare sleeps on those words
//! (in its main thread). When a worker is killed or crashes, the kernel marks its word
//! `OWNER_DIED` early in the dying thread's exit and wakes one spare, which claims the place: its
//! own standby word (armed → taken), then the dead worker's takeover word (open → claimed by its
//! slot). The monitor decides which words are open and which spares armed (`sync_takeovers`,
//! every turn). Open: only a ready, serving worker's, in a running tree with no reload, rollout
//! or promotion under way. Armed: only ready spares that `knows_spares`, that said before they
//! reported ready that they watch the words (a spare that cannot stand by on futexes, or of a
//! build that does not say, is never armed), and that are of the newest generation with a ready
//! spare (an older spare stays unarmed beside them: the monitor would not choose it). It closes a
//! worker's word before it retires or promotes it, and all of them when the tree stops or
//! re-executes. When it
//! hears of a death whose word is still open though the kernel marked the robust word and a spare
//! is armed, a spare was woken before the monitor (the kernel marks the word before the death
//! notice hangs up): the monitor leaves it the place for up to [`TAKEOVER_WAIT`]. Then, or at
//! once otherwise, it settles the word (`ratify_takeover`): claimed, the spare becomes worker `nr`
//! in its table (logged `hot_spare=true took_over=true`, counted in `spare_activations`, refilled
//! after [`REFILL_DELAY`]); still open, it closes it, so no spare claims it later, and activates a
//! spare as before, taking the spare's standby word first (one that took a place on its own is
//! passed over). And before it replaces a worker number itself (`reconcile`, `replace_at_once`),
//! it closes the takeover words of the workers leaving with that number (killed, retiring, rolled
//! over: their words may still be open within the turn that made them leave), ratifying a claim
//! it finds there (`takeover_covers`). So exactly one of the spares or the monitor replaces a dead
//! worker. The spare
//! waits in its main thread, which the monitor raises (`raise_standby_priority`): a separate
//! watcher thread at the tree's level waited for a CPU behind the busy workers (kill → claim
//! 404 µs median under the respawn bench's load), and handing its claim to the runtime's thread
//! took another wake-up (~100 µs). Where `futex_waitv` is missing (Linux < 5.16) or refused (a
//! seccomp filter), or where the spare could not keep copies of the listening sockets, the spare
//! waits on its channel only and says so at debug level; it does not say it watches, so it is never
//! armed and the monitor replaces a dead worker at once, as before spares took places on their own.
//!
//! The monitor keeps the roster word moving for the spares: it bumps it after it sends a spare a
//! command (`Activate`, `Stop`, `ReopenLogs`), since a spare standing by sleeps on futexes, not
//! on its channel, and reads the channel when woken; and after it arms or disarms spares, since a
//! spare watches the workers' words only while it is armed (the kernel wakes one waiter per
//! death: a spare that may not claim must not be that one).
//!
//! A spare counts in `ctl status` (role `spare`, state `standby`), in the PSS totals and in the
//! metrics, but not towards `workers`. Spares are only requested of, and activated from, molds
//! that speak the messages with this image's listening sockets ([`super::Child::knows_spares`]):
//! those this image forked or promoted, and those a reload adopted when the handover says the
//! previous image could use them (its own `knows_spares`) and the listening sockets are the same,
//! in the same order. So after a reload that rolls back, the adopted mold goes on making spares.
//! What an older build handed over says nothing and is never asked: the reload rolls it over, and
//! the new mold's spares replace the adopted ones.
//!
//! The time from a worker's death to its replacement serving is traced by debug lines of target
//! `tine::respawn` (`--log-level warn,tine::respawn=debug`) with `CLOCK_MONOTONIC` and thread CPU
//! timestamps: the monitor's wake-up, the `Activate` sent, the spare's receipt, its gates open,
//! its first accept and first request. `bench/respawn/timeline.py` lays them out per stage.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use super::{limits, Child, Kind, Mode, Monitor, Phase};
use crate::ipc::channel::{Channel, MAX_FDS};
use crate::ipc::message::Command;
use crate::ipc::scoreboard::{age, Takeover};
use crate::listener::Listener;

/// How long the monitor leaves a dead worker's place to a spare the kernel woke
/// (`settle_or_await_takeover`) before it activates one itself: the spare claims within a few
/// hundred microseconds unless the machine is saturated, or the woken spare may not take it (the
/// kernel wakes one waiter per death).
const TAKEOVER_WAIT: Duration = Duration::from_millis(2);

/// A spare whose heartbeat is older than this is passed over (it refreshes it every 500 ms).
const STALE_HEARTBEAT_MS: u64 = 2000;

/// How long after a spare took over its replacement is requested. The mold's fork and the new
/// spare's boot (its runtime, its warm-up request) take a CPU for a millisecond or more; requested
/// in the same turn as `Activate`, the fork came ~0.45 ms later, just when the activated spare
/// accepts the connections queued for it and answers them, and on a machine with few CPUs they
/// compete. A second death within this time finds no spare standing by (as it would while the new
/// one boots anyway).
const REFILL_DELAY: Duration = Duration::from_millis(5);

/// How long after its activation the monitor checks that a spare put its main thread back to the
/// tree's priority and `SCHED_BATCH` (`settle_activated_priorities`): the spare does it itself
/// after its first moments (50 ms, `worker::policy::FIRST_SERVICE`), in a task of its runtime,
/// which a handler that blocks that runtime from the first request would hold up for as long as
/// it hangs (with one runtime thread, the default).
const SETTLE_PRIORITY_AFTER: Duration = Duration::from_millis(250);

impl Monitor {
    /// Activates a ready spare of generation `min_generation` or newer as worker `nr`: true if
    /// one took over. The newest generation is preferred.
    pub(super) fn activate_spare(&mut self, nr: u32, min_generation: u32) -> bool {
        let mut passed_over = Vec::new();
        loop {
            let Some(slot) = self
                .children
                .iter()
                .filter(|(s, c)| {
                    !passed_over.contains(*s)
                        && c.kind == Kind::Spare
                        && c.knows_spares
                        && c.phase == Phase::Ready
                        && c.generation >= min_generation
                        && self.is_alive_on_the_board(**s, c)
                })
                .max_by_key(|(s, c)| (c.generation, std::cmp::Reverse(**s)))
                .map(|(s, _)| *s)
            else {
                return false;
            };
            // Taken in shared memory first: a spare that has just taken a dead worker's place on
            // its own (see `worker::takeover`) is not activated again.
            if !self.board.take_standby(slot, false) {
                passed_over.push(slot);
                continue;
            }
            let Some(c) = self.children.get_mut(&slot) else {
                return false;
            };
            let sent_at = crate::log::respawn_stamp();
            let sent = c
                .channel
                .as_ref()
                .is_some_and(|ch| send_activation(ch, nr, &self.listeners).is_ok());
            if !sent {
                // Gone without our noticing yet: SIGCHLD follows. Try the next one.
                c.channel = None;
                self.kill_child(slot, "its channel closed while it stood by");
                continue;
            }
            if let Some(at) = sent_at {
                tracing::debug!(
                    target: "tine::respawn",
                    spare = c.pid_raw(),
                    nr,
                    sent_us = at.us,
                    sent_cpu_us = at.cpu_us,
                    "spare activated"
                );
            }
            self.spare_became_worker(slot, nr, false);
            return true;
        }
    }

    /// The worker in `dead` (number `nr`) died. If a spare is taking its place on its own — its
    /// takeover word still open, its robust word marked `OWNER_DIED` (the kernel then woke a
    /// standing-by spare, before the monitor could hear of the death) and a spare armed (only
    /// spares that watch the words are ever armed) — the
    /// monitor leaves it that place for up to [`TAKEOVER_WAIT`] (its slot is not reused
    /// meanwhile). Otherwise it settles the word now (`ratify_takeover`). True if the place is
    /// taken care of: taken by a spare, or left to one for now.
    pub(super) fn settle_or_await_takeover(&mut self, dead: usize, nr: u32) -> bool {
        if self.pending_takeovers.iter().any(|p| p.0 == dead) {
            return true;
        }
        let under_way = self.mode == Mode::Running
            && matches!(self.board.takeover(dead), Takeover::Open { .. })
            && self.board.owner_died(dead)
            && self
                .children
                .iter()
                .any(|(s, c)| c.kind == Kind::Spare && self.board.standby_armed(*s));
        if under_way {
            self.pending_takeovers
                .push((dead, nr, Instant::now() + TAKEOVER_WAIT));
            return true;
        }
        self.ratify_takeover(dead, nr)
    }

    /// Before the monitor replaces worker `nr` itself: closes the takeover words of the workers
    /// numbered `nr` that are leaving (retiring, killed, rolled over, promoted: not active), so
    /// that no spare takes their place too. True if a spare already took one's place (it is
    /// ratified, and replaces `nr`) or is taking it (a pending takeover): nothing to replace.
    pub(super) fn takeover_covers(&mut self, nr: u32) -> bool {
        if self.pending_takeovers.iter().any(|p| p.1 == nr) {
            return true;
        }
        let leaving: Vec<usize> = self
            .children
            .iter()
            .filter(|(_, c)| c.kind == Kind::Worker && c.nr == nr && !c.is_active_worker())
            .map(|(s, _)| *s)
            .collect();
        let mut covered = false;
        for slot in leaving {
            self.board.close_takeover(slot);
            if matches!(self.board.takeover(slot), Takeover::Claimed { .. }) {
                covered |= self.ratify_takeover(slot, nr);
            }
        }
        covered
    }

    /// Settles the takeovers the monitor was leaving to a spare: ratified once claimed; at the
    /// end of the wait, the monitor replaces the worker itself (each turn of the loop).
    pub(super) fn settle_pending_takeovers(&mut self) {
        let now = Instant::now();
        let due: Vec<(usize, u32)> = self
            .pending_takeovers
            .iter()
            .filter(|(slot, _, until)| {
                now >= *until || matches!(self.board.takeover(*slot), Takeover::Claimed { .. })
            })
            .map(|(slot, nr, _)| (*slot, *nr))
            .collect();
        for (slot, nr) in due {
            self.pending_takeovers.retain(|p| p.0 != slot);
            if !self.ratify_takeover(slot, nr) {
                tracing::debug!(
                    nr,
                    "no spare took the dead worker's place on its own: the monitor activates one"
                );
                self.replace_at_once(nr);
            }
            // Reaped meanwhile: its slot was kept until now.
            if !self.children.contains_key(&slot) {
                self.board.clear(slot);
            }
        }
    }

    /// The worker in `dead` (number `nr`) died: settles its takeover word, and if a spare took
    /// its place on its own (see `worker::takeover`), makes that spare worker `nr` in the table,
    /// as `activate_spare` does for the spare it activates. True if one did.
    pub(super) fn ratify_takeover(&mut self, dead: usize, nr: u32) -> bool {
        let Some(by) = self.board.settle_takeover(dead) else {
            return false;
        };
        // The claimer must still be there, a spare that took itself (not a new spare that
        // reuses the slot of one that claimed, then died before this).
        let taken = self.board.standby_taken(by);
        if !(taken
            && self
                .children
                .get(&by)
                .is_some_and(|c| c.kind == Kind::Spare))
        {
            tracing::warn!(
                slot = by,
                nr,
                "a dead worker's place was claimed from a slot that holds no such spare; ignored"
            );
            return false;
        }
        self.spare_became_worker(by, nr, true);
        true
    }

    /// The spare in `slot` is worker `nr` from now on, activated by the monitor or, with
    /// `took_over`, by its own takeover: the table, the counters, the "ready" line, the rollout,
    /// and the retirement of what it replaces.
    fn spare_became_worker(&mut self, slot: usize, nr: u32, took_over: bool) {
        let Some(c) = self.children.get_mut(&slot) else {
            return;
        };
        let stood_by = c.started.elapsed();
        c.kind = Kind::Worker;
        c.nr = nr;
        // Its life as a worker starts now: max_lifetime, max_requests and the uptime count from
        // here.
        c.started = Instant::now();
        c.max_requests = limits::max_requests_for(&self.config, slot);
        c.settle_priority_at = Some(Instant::now() + SETTLE_PRIORITY_AFTER);
        let (pid, generation, label) = (c.pid_raw(), c.generation, c.label());
        self.spare_activations += 1;
        self.last_spare_activation = Some(Instant::now());
        self.ever_served = true;
        // The same message as a worker that booted, so that whoever waits for it finds it;
        // `took_over` (only when true) tells a spare's own takeover apart.
        tracing::info!(
            pid,
            hot_spare = true,
            took_over = took_over.then_some(true),
            stood_by_ms = stood_by.as_millis() as u64,
            "{label} ready"
        );
        self.rollout_worker_ready(generation);
        self.retire_replaced(nr, slot);
    }

    /// Opens the takeover words of the workers a spare may replace on its own, arms the spares
    /// that may (ready spares of the newest generation that has one ready, the one
    /// `activate_spare` prefers), and closes and disarms the rest (each turn of the loop; see
    /// `worker::takeover`). Only while nothing else is under way: during a reload, a rollout or
    /// a promotion, or once the tree stops, the monitor alone replaces a dead worker (with the
    /// generation rules of `spare_generation_for`).
    pub(super) fn sync_takeovers(&self) {
        let calm = self.mode == Mode::Running
            && self.reload.is_none()
            && self.rollout.is_none()
            && !self.promotion_in_progress();
        // Only spares of the newest generation that has one ready: `activate_spare` would pick
        // one of those, and the kernel wakes whichever spare waits first, so an older spare
        // armed beside them could take a place that a rollout then rolls over at once.
        let newest = self
            .children
            .values()
            .filter(|c| c.kind == Kind::Spare && c.phase == Phase::Ready && !c.is_retiring())
            .map(|c| c.generation)
            .max();
        // A spare watches the workers' words only while armed (`worker::takeover`), and it
        // sleeps meanwhile: it hears of its arming or disarming by the roster.
        let mut changed = false;
        for (slot, c) in &self.children {
            if self.pending_takeovers.iter().any(|p| p.0 == *slot) {
                // Dead, its place being taken: settled by `settle_pending_takeovers`.
                continue;
            }
            match c.kind {
                Kind::Worker => {
                    if calm
                        && c.phase == Phase::Ready
                        && c.is_active_worker()
                        && (c.nr as usize) < self.target
                    {
                        self.board.open_takeover(*slot, c.nr);
                    } else {
                        self.board.close_takeover(*slot);
                    }
                }
                Kind::Spare => {
                    if calm
                        && c.phase == Phase::Ready
                        && c.knows_spares
                        && !c.is_retiring()
                        && Some(c.generation) == newest
                    {
                        if self.board.arm_standby(*slot) {
                            // Said, so that one can tell (tests do) when a spare may take a
                            // place on its own: a spare standing by (`ctl status`) is armed only
                            // at the end of the monitor's turn, or not at all.
                            tracing::debug!(
                                pid = c.pid_raw(),
                                generation = c.generation,
                                "spare armed: it may take a dead worker's place on its own"
                            );
                            changed = true;
                        }
                    } else if self.board.standby_armed(*slot) {
                        let _ = self.board.disarm_standby(*slot);
                        tracing::debug!(
                            pid = c.pid_raw(),
                            generation = c.generation,
                            "spare disarmed"
                        );
                        changed = true;
                    }
                }
                _ => {}
            }
        }
        if changed {
            self.board.bump_roster();
        }
    }

    /// Closes every takeover word and disarms every spare (the tree stops).
    pub(super) fn close_takeovers(&self) {
        for (slot, _, _) in &self.pending_takeovers {
            self.board.close_takeover(*slot);
        }
        let mut changed = false;
        for (slot, c) in &self.children {
            match c.kind {
                Kind::Worker => self.board.close_takeover(*slot),
                Kind::Spare => {
                    changed |= self.board.standby_armed(*slot);
                    let _ = self.board.disarm_standby(*slot);
                }
                _ => {}
            }
        }
        if changed {
            self.board.bump_roster();
        }
    }

    /// Worker `nr` just went: its channel closed (it is exiting: only its exit closes it) or it
    /// was reaped. A ready spare takes its number now, first thing, rather than at the end of the
    /// loop's turn in `reconcile` (which does the rest: a new spare, or a fresh worker if no spare
    /// was ready).
    pub(super) fn replace_at_once(&mut self, nr: u32) {
        if self.mode != Mode::Running || nr as usize >= self.target {
            return;
        }
        if self
            .children
            .values()
            .any(|c| c.is_active_worker() && c.nr == nr)
        {
            return;
        }
        if self.takeover_covers(nr) {
            return;
        }
        let current = self.current_mold().map_or(0, |(_, m)| m.generation);
        let oldest = self.spare_generation_for(nr, current);
        self.activate_spare(nr, oldest);
    }

    /// With no ready mold (it died and a new one preloads), nothing can be forked, but a ready
    /// spare can still take a missing worker's place.
    pub(super) fn activate_spares_without_mold(&mut self) {
        let used: Vec<u32> = self
            .children
            .values()
            .filter(|c| c.is_active_worker())
            .map(|c| c.nr)
            .chain(self.pending_takeovers.iter().map(|p| p.1))
            .collect();
        let missing: Vec<u32> = (0..self.target as u32)
            .filter(|nr| !used.contains(nr))
            .collect();
        for nr in missing {
            if self.takeover_covers(nr) {
                continue;
            }
            if !self.activate_spare(nr, 0) {
                return;
            }
        }
    }

    /// Whether `c`'s scoreboard slot is its own and its heartbeat (every 500 ms) is recent: a
    /// spare that is stopped or stuck would take a worker's place and serve nothing.
    fn is_alive_on_the_board(&self, slot: usize, c: &Child) -> bool {
        let Some(pid) = c.pid else { return false };
        self.board.read(slot).is_some_and(|v| {
            v.pid == pid.as_raw() && age(v.heartbeat_ms) < Duration::from_millis(STALE_HEARTBEAT_MS)
        })
    }

    /// The oldest generation of spare that may take worker `nr`'s place: the current one when a
    /// rollout is replacing it (an older spare would be rolled over in turn), any otherwise.
    pub(super) fn spare_generation_for(&self, nr: u32, current: u32) -> u32 {
        let rolled = self.children.values().any(|c| {
            c.kind == Kind::Worker
                && c.nr == nr
                && c.generation < current
                && c.recycle
                    .as_deref()
                    .is_some_and(|r| r.starts_with("rollout to gen:"))
        });
        let retire_first = self.reload.is_some()
            && self.config.reload_strategy == crate::config::ReloadStrategy::RetireFirst;
        if rolled || retire_first {
            current
        } else {
            0
        }
    }

    /// Keeps `spare_workers` spares of the current mold's generation: requests the missing ones
    /// and retires what is surplus or of another generation once the current one can stand in.
    pub(super) fn keep_spares(&mut self, mold_slot: usize) {
        let Some(mold) = self.children.get(&mold_slot) else {
            return;
        };
        let (generation, knows_spares) = (mold.generation, mold.knows_spares);
        let wanted = self.config.spare_workers;
        let current: Vec<(usize, bool)> = self
            .children
            .iter()
            .filter(|(_, c)| {
                c.kind == Kind::Spare && !c.is_retiring() && c.generation == generation
            })
            .map(|(s, c)| (*s, c.phase == Phase::Ready))
            .collect();
        let ready = current.iter().filter(|(_, r)| *r).count();
        // Surplus of this generation (spare_workers lowered by a reload): the last ones go.
        for (slot, _) in current.iter().skip(wanted) {
            self.retire(*slot, "more spares than spare_workers");
        }
        if ready >= wanted && self.generation_proven(generation) {
            let outdated: Vec<usize> = self
                .children
                .iter()
                .filter(|(_, c)| {
                    c.kind == Kind::Spare && !c.is_retiring() && c.generation != generation
                })
                .map(|(s, _)| *s)
                .collect();
            for slot in outdated {
                self.retire(slot, &format!("replaced by a spare of gen:{generation}"));
            }
        }
        // A worker being promoted makes a new mold soon: its spares come from that one. And no
        // spare before a worker has served, or while starts fail: a spare would only double
        // the failed starts of a broken `boot`.
        if !knows_spares
            || self.promotion_in_progress()
            || !self.ever_served
            || self.spawn_errors > 0
            || self.spare_refill_due().is_some()
        {
            return;
        }
        for _ in current.len()..wanted {
            if self.free_slot().is_none() {
                // Every slot is taken (a wide rollout): a spare waits, it is not a failure.
                return;
            }
            if let Err(e) = self.request_child(mold_slot, Kind::Spare, SPARE_NR, generation) {
                tracing::error!(error = %e, "cannot request a spare");
                self.spawn_failed(e.to_string(), super::rollout::is_resource_error(&e));
                return;
            }
        }
    }

    /// When the replacement of a spare that just took over may be requested, if not yet
    /// ([`REFILL_DELAY`]); the loop wakes then.
    pub(super) fn spare_refill_due(&self) -> Option<Instant> {
        let due = self.last_spare_activation? + REFILL_DELAY;
        (due > Instant::now()).then_some(due)
    }

    /// Asks the mold in `mold_slot` for a worker `nr` (or, `kind` [`Kind::Spare`], a hot spare):
    /// its channel goes with the request; the child is in the table, starting, from now on.
    pub(super) fn request_child(
        &mut self,
        mold_slot: usize,
        kind: Kind,
        nr: u32,
        generation: u32,
    ) -> std::io::Result<()> {
        let slot = self
            .free_slot()
            .ok_or_else(|| std::io::Error::other("no free scoreboard slot"))?;
        let (mine, theirs) = Channel::pair()?;
        self.board.clear(slot);
        let mold = self
            .children
            .get(&mold_slot)
            .ok_or_else(|| std::io::Error::other("mold gone"))?;
        let knows_spares = mold.knows_spares;
        let channel = mold
            .channel
            .as_ref()
            .ok_or_else(|| std::io::Error::other("mold channel closed"))?;
        self.next_request += 1;
        let request = self.next_request;
        let command = match kind {
            Kind::Spare => Command::SpawnSpare {
                slot: slot as u32,
                request,
            },
            _ => Command::SpawnWorker {
                nr,
                slot: slot as u32,
                request,
            },
        };
        channel.send(&command, &[theirs.as_fd()])?;
        let mut c = Child::new(kind, nr, generation, mine);
        c.request = request;
        c.requested_from = Some(mold_slot);
        c.knows_spares = knows_spares;
        c.max_requests = limits::max_requests_for(&self.config, slot);
        self.children.insert(slot, c);
        Ok(())
    }
}

/// A spare standing by only waits for `Activate`, and everything after it waits on its wake-up:
/// when the monitor runs above the tree (`monitor_nice_boost` had the privilege), the spare's
/// thread is raised to the monitor's level until it is activated (it then puts itself back, or
/// the monitor does: [`Monitor::settle_activated_priorities`]), so
/// that on a saturated machine its wake-up preempts as the monitor's does instead of queueing
/// behind busy workers. Otherwise it stays at the tree's level. It uses no CPU meanwhile.
pub(super) fn raise_standby_priority(pid: Option<nix::unistd::Pid>) {
    let (Some(pid), Ok(own)) = (pid, crate::sys::process::nice()) else {
        return;
    };
    if own >= super::priority::tree_nice() {
        return;
    }
    if let Err(e) = crate::sys::process::set_nice_of(pid, own) {
        tracing::debug!(error = %e, pid = pid.as_raw(), "a spare's priority stays the tree's");
    }
}

impl Monitor {
    /// Puts the main thread of each spare activated [`SETTLE_PRIORITY_AFTER`] ago back to the
    /// tree's priority and `SCHED_BATCH` (`sched_batch`), if it is still where it stood by: at
    /// the priority the monitor raised it to (`raise_standby_priority`), under `SCHED_OTHER`.
    /// A spare does that itself after its first moments; one that has not by now is held up by
    /// a handler that blocks its runtime, and must not go on running above the tree meanwhile.
    /// Each turn of the loop (the monitor wakes at least every 100 ms).
    pub(super) fn settle_activated_priorities(&mut self) {
        let now = Instant::now();
        // Every turn: no system call unless a spare's check is due.
        let due = |c: &Child| c.settle_priority_at.is_some_and(|at| at <= now);
        if !self.children.values().any(due) {
            return;
        }
        // The monitor's own level, if above the tree's: what it raised standing-by spares to.
        let tree = super::priority::tree_nice();
        let raised = crate::sys::process::nice().ok().filter(|own| *own < tree);
        let sched_batch = self.config.sched_batch;
        for c in self.children.values_mut() {
            if !due(c) {
                continue;
            }
            c.settle_priority_at = None;
            // A worker promoted to mold meanwhile runs as molds do (`SCHED_OTHER`: the workers it
            // forks inherit it and switch themselves), and one leaving is no matter.
            if c.kind != Kind::Worker
                || c.phase != Phase::Ready
                || !c.is_active_worker()
                || c.exited.is_some()
            {
                continue;
            }
            // Its channel is open (an active worker) and its pidfd has not said it exited: its
            // number is its own but in the moment since (a pid is reused only once its process
            // is released and the pid counter comes round).
            let Some(pid) = c.pid else { continue };
            let mut put_back = Vec::new();
            if let Some(raised) = raised {
                if crate::sys::process::nice_of(pid).is_ok_and(|n| n == raised)
                    && crate::sys::process::set_nice_of(pid, tree).is_ok()
                {
                    put_back.push("its priority");
                }
            }
            use crate::sys::process::{switch_policy_of, Policy};
            // Contract: `pid` is a child of the monitor's that it has not reaped.
            if sched_batch
                && switch_policy_of(pid.as_raw(), Policy::Other, Policy::Batch).unwrap_or(false)
            {
                put_back.push("SCHED_BATCH");
            }
            if !put_back.is_empty() {
                tracing::warn!(
                    pid = pid.as_raw(),
                    nr = c.nr,
                    "{}, an activated spare, still ran as it stood by {} ms after it took its place (a handler busy since its first request?); the monitor put back {}",
                    c.label(),
                    SETTLE_PRIORITY_AFTER.as_millis(),
                    put_back.join(" and ")
                );
            }
        }
    }
}

/// Activates the spare at the other end of `channel` as worker `nr`: `Activate`, carrying the
/// listening sockets in order, preceded by `ListeningSockets` for those beyond what one packet
/// carries.
fn send_activation(channel: &Channel, nr: u32, listeners: &[Listener]) -> std::io::Result<()> {
    let sockets: Vec<_> = listeners.iter().map(|l| l.as_fd()).collect();
    let mut chunks: Vec<&[_]> = sockets.chunks(MAX_FDS).collect();
    let last = chunks.pop().unwrap_or(&[]);
    for chunk in chunks {
        channel.send(&Command::ListeningSockets, chunk)?;
    }
    channel.send(&Command::Activate { nr }, last)?;
    // A spare standing by sleeps on the roster word too (`worker::takeover`): it reads its
    // channel when woken.
    crate::ipc::scoreboard::global().bump_roster();
    Ok(())
}

/// The worker number a spare has in the monitor's table until it is activated (as in its own
/// `boot`): out of every worker's range, so that no table lookup by number finds it, and an
/// older image adopting it across a reload takes it for a surplus worker and retires it.
pub(crate) const SPARE_NR: u32 = crate::app::Worker::SPARE_NR;
