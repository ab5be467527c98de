//! Reforking: promotion of a warm worker to the mold of the next generation, then a paced
//! rollout of the older workers (replace-then-retire, `refork_max_unavailable` at a time).

use std::time::Instant;

use nix::sys::signal::Signal;

use super::children::PROMOTE;
use super::{Kind, Monitor, Phase};
use crate::ipc::message::Command;

impl Monitor {
    /// Workers marked for replacement whose replacement is not ready yet.
    pub(super) fn replacements_in_flight(&self) -> usize {
        self.children
            .values()
            .filter(|c| c.kind == Kind::Worker && c.recycle.is_some() && !c.is_retiring())
            .count()
    }

    pub(super) fn promotion_in_progress(&self) -> bool {
        self.children
            .values()
            .any(|c| c.phase == Phase::Promoting || c.recycle.as_deref() == Some(PROMOTE))
    }

    /// Rolls workers older than the current mold over, a few at a time; retires old molds when
    /// nothing of their generation is pending.
    pub(super) fn advance_rollout(&mut self) {
        let Some((_, mold)) = self.current_mold() else {
            return;
        };
        let generation = mold.generation;
        let width = self.config.refork_max_unavailable;
        // A reload with `retire-first` retires an old worker before starting its replacement, so
        // that memory stays flat; otherwise (surge, and every refork) the replacement comes first.
        let retire_first = self.reload.is_some()
            && self.config.reload_strategy == crate::config::ReloadStrategy::RetireFirst;
        let mut in_flight = self.replacements_in_flight();
        if retire_first {
            in_flight += self
                .children
                .values()
                .filter(|c| {
                    c.kind == Kind::Worker
                        && (c.phase == Phase::Starting
                            || (c.is_retiring() && c.generation < generation))
                })
                .count();
        }
        let old: Vec<usize> = self
            .children
            .iter()
            .filter(|(_, c)| {
                c.kind == Kind::Worker
                    && c.generation < generation
                    && c.is_active_worker()
                    && c.phase == Phase::Ready
            })
            .map(|(s, _)| *s)
            .collect();
        for slot in old {
            if in_flight >= width {
                break;
            }
            if let Some(c) = self.children.get_mut(&slot) {
                tracing::info!(
                    nr = c.log_nr(),
                    pid = c.pid_raw(),
                    from = c.generation,
                    to = generation,
                    "rolling worker to the new generation"
                );
                let reason = format!("rollout to gen:{generation}");
                if retire_first {
                    self.retire(slot, &reason);
                } else {
                    c.recycle = Some(reason);
                }
                in_flight += 1;
            }
        }
        let old_molds: Vec<(usize, u32)> = self
            .children
            .iter()
            .filter(|(_, c)| c.kind == Kind::Mold && c.generation < generation && !c.is_retiring())
            .map(|(s, c)| (*s, c.generation))
            .collect();
        if !self.generation_proven(generation) {
            // The new generation is on trial: the old mold stays until every worker is of the new
            // generation and ready, so that a rollout that fails half-way can roll back to it.
            return;
        }
        for (slot, g) in old_molds {
            let pending = self
                .children
                .values()
                .any(|c| c.kind != Kind::Mold && c.generation == g && c.phase == Phase::Starting);
            if !pending {
                self.retire(slot, "replaced by a newer mold");
            }
        }
    }

    pub(super) fn check_refork_after(&mut self) {
        let Some((_, mold)) = self.current_mold() else {
            return;
        };
        let generation = mold.generation;
        let Some(threshold) = self.config.refork_after.threshold(generation) else {
            return;
        };
        if self.promotion_in_progress() || self.rollout.is_some() {
            return;
        }
        if self.refork_paused == Some(generation) {
            // A refork from this generation was abandoned: reforking it again would most likely
            // fail the same way. An operator's refork, or a successful rollout, resumes.
            return;
        }
        // Only once the rollout to this generation is complete.
        if self
            .children
            .values()
            .any(|c| c.kind == Kind::Worker && c.generation < generation)
        {
            return;
        }
        let warm = self.children.iter().any(|(s, c)| {
            c.kind == Kind::Worker
                && c.generation >= generation
                && c.phase == Phase::Ready
                && self
                    .board
                    .read(*s)
                    .is_some_and(|v| v.requests >= threshold && v.fork_safe)
        });
        if warm {
            tracing::info!(generation, threshold, "refork_after reached");
            match request_refork(self) {
                Ok(()) => self.events.push(
                    "refork",
                    format!(
                        "refork requested (refork_after {threshold} reached by gen:{generation})"
                    ),
                ),
                Err(e) => tracing::warn!("refork_after: refork refused: {e}"),
            }
        }
    }
}

/// Picks the warmest fork-safe worker of the current generation and starts its promotion: a
/// replacement is started first, then the worker is told to become the next mold. A refork
/// requested while one is on trial joins it (`Ok`, the caller waits for its outcome); otherwise
/// `Err` says why nothing was started.
pub(super) fn request_refork(m: &mut Monitor) -> Result<(), String> {
    if !m.is_running() {
        return Err("the server is stopping".into());
    }
    if m.reload.is_some() || m.preflight.is_some() {
        // A refork would make a newer mold than the reload's and confuse its outcome.
        return Err("a reload is in progress".into());
    }
    if let Some(r) = &m.rollout {
        if r.cause == super::rollout::Cause::Refork && !r.proven {
            tracing::info!("a refork to gen:{} is already in progress", r.generation);
            return Ok(());
        }
        return Err(format!(
            "the rollout to gen:{} is still in progress; try again once it is complete",
            r.generation
        ));
    }
    if m.promotion_in_progress() {
        return Err("a promotion is already in progress".into());
    }
    let Some((_, mold)) = m.current_mold() else {
        return Err("no ready mold".into());
    };
    let generation = mold.generation;
    // Workers newer than the current mold exist when a new mold died during its rollout and a
    // fresh generation-0 mold replaced it: they are as good candidates as the mold's own.
    let candidate = m
        .children
        .iter()
        .filter(|(_, c)| {
            c.generation >= generation
                && c.kind == Kind::Worker
                && c.phase == Phase::Ready
                && c.is_active_worker()
        })
        .filter_map(|(s, _)| {
            m.board
                .read(*s)
                .filter(|v| v.fork_safe)
                .map(|v| (v.requests, *s))
        })
        .max();
    let Some((requests, slot)) = candidate else {
        return Err("no fork-safe ready worker to promote".into());
    };
    let next = next_generation(m);
    if let Some(c) = m.children.get_mut(&slot) {
        let (nr, pid, from) = (c.nr, c.pid_raw(), c.generation);
        c.recycle = Some(PROMOTE.into());
        tracing::info!(
            nr,
            pid,
            generation = from,
            requests,
            "promoting worker to mold of gen:{next}"
        );
    }
    m.refork_paused = None;
    m.begin_rollout(super::rollout::Cause::Refork, next, Vec::new());
    Ok(())
}

/// The generation a promoted mold gets: one more than any process has or is being promoted to.
/// Not just one more than the newest mold: after a new mold died during its rollout, its workers
/// outlive it (the monitor forks a fresh generation-0 mold), and their number must not be reused
/// for a different mold, whose rollout would then skip them.
fn next_generation(m: &Monitor) -> u32 {
    m.children
        .values()
        .map(|c| c.generation.max(c.promoted_generation))
        .max()
        .unwrap_or(0)
        + 1
}

/// Called when the replacement of a worker marked [`PROMOTE`] is ready: tell it to promote.
pub(super) fn promote(m: &mut Monitor, slot: usize) {
    // The generation the refork announced (nothing newer can have started meanwhile).
    let next = match &m.rollout {
        Some(r) if r.cause == super::rollout::Cause::Refork => r.generation,
        _ => next_generation(m),
    };
    // Its death from now on is no spare's to take over (see `monitor::spares`).
    m.board.close_takeover(slot);
    let Some(c) = m.children.get_mut(&slot) else {
        return;
    };
    let sent = c.channel.as_ref().is_some_and(|ch| {
        ch.send(
            &Command::Promote {
                generation: next,
                slot: slot as u32,
            },
            &[],
        )
        .is_ok()
    });
    if sent {
        c.phase = Phase::Promoting;
        c.promoted_generation = next;
        c.started = Instant::now();
    } else {
        c.recycle = Some("promotion failed".into());
        // Its replacement is already serving: retire it, or it would hold a rollout slot.
        m.retire(slot, "promotion failed");
        m.abandon_rollout("promotion failed: the worker's channel is closed".into());
    }
}

/// A promoted worker reported ready as a mold: it is the newest mold now; the rollout follows on
/// the next ticks.
pub(super) fn on_mold_ready(m: &mut Monitor, slot: usize) {
    if let Some(c) = m.children.get_mut(&slot) {
        if c.kind == Kind::Worker {
            c.kind = Kind::Mold;
            c.generation = c.promoted_generation;
            c.recycle = None;
            tracing::info!(
                pid = c.pid_raw(),
                generation = c.generation,
                "new mold ready; rolling workers over"
            );
        }
    }
}

/// A promotion failed: the old mold stays; the worker is retired if it is still alive; the
/// refork is abandoned with `reason`.
pub(super) fn on_promotion_failed(m: &mut Monitor, slot: usize, reason: &str) {
    if let Some(c) = m.children.get_mut(&slot) {
        if c.kind == Kind::Worker
            && (c.phase == Phase::Promoting || c.recycle.as_deref() == Some(PROMOTE))
        {
            c.recycle = Some("promotion failed".into());
            if c.phase == Phase::Promoting {
                c.phase = Phase::Ready;
            }
            m.retire(slot, "promotion failed");
            let kernel_reaps = m.kernel_reaps;
            if let Some(c) = m.children.get_mut(&slot) {
                let _ = c.signal(Signal::SIGCONT, kernel_reaps);
            }
            m.abandon_rollout(format!("promotion failed: {reason}"));
        }
    }
}
