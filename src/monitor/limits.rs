//! Policy on the monitor's tick: hang detection, per-worker limits (recycled replace-then-retire),
//! and reforking (promotion of a warm worker, then a paced rollout).

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};

use super::{Kind, Monitor, Phase};
use crate::config::Config;
use crate::ipc::message::Command;
use crate::ipc::scoreboard::age;
use crate::sys::meminfo;

/// Reason string that marks a worker chosen for promotion (recycled by promotion, not retirement).
pub(super) const PROMOTE: &str = "promotion to mold";

/// max_requests for a new worker, with its jitter (deterministic per slot and time, no RNG state).
pub(super) fn max_requests_for(config: &Config, slot: usize) -> u64 {
    if config.max_requests == 0 {
        return 0;
    }
    let jitter = if config.max_requests_jitter == 0 {
        0
    } else {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos() as u64
            ^ (slot as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        seed % (config.max_requests_jitter + 1)
    };
    config.max_requests + jitter
}

impl Monitor {
    /// Runs the periodic checks, at most every 100 ms.
    pub(super) fn check_limits(&mut self) {
        if self.last_limits.elapsed() < Duration::from_millis(100) || !self.is_running() {
            return;
        }
        self.last_limits = Instant::now();
        let cfg = self.config.clone();
        let mut hung = Vec::new();
        let mut recycle = Vec::new();
        for (slot, c) in &mut self.children {
            if c.kind != Kind::Worker || c.phase != Phase::Ready || c.recycle.is_some() {
                continue;
            }
            let Some(view) = self.board.read(*slot) else { continue };
            let Some(pid) = c.pid else { continue };
            if view.pid != pid.as_raw() {
                continue;
            }
            let silent = age(view.heartbeat_ms);
            if silent > cfg.timeout {
                hung.push((*slot, silent, view.request.clone()));
                continue;
            }
            if c.max_requests > 0 && view.requests >= c.max_requests {
                recycle.push((*slot, format!("max_requests ({} served)", view.requests)));
                continue;
            }
            if cfg.max_rss_mb > 0 {
                if let Some(rss) = meminfo::rss_kb(pid.as_raw()) {
                    if rss > cfg.max_rss_mb * 1024 {
                        recycle.push((*slot, format!("max_rss_mb (rss {} MiB)", rss / 1024)));
                        continue;
                    }
                }
            }
            if cfg.max_pss_mb > 0 && c.pss_checked.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                c.pss_checked = Some(Instant::now());
                if let Some(m) = meminfo::memory(pid.as_raw()) {
                    if m.pss_kb > cfg.max_pss_mb * 1024 {
                        recycle.push((*slot, format!("max_pss_mb (pss {} MiB)", m.pss_kb / 1024)));
                        continue;
                    }
                }
            }
            if cfg.max_cpu_seconds > 0 {
                if let Some(cpu) = meminfo::cpu_seconds(pid.as_raw()) {
                    if cpu > cfg.max_cpu_seconds as f64 {
                        recycle.push((*slot, format!("max_cpu_seconds ({cpu:.1} s)")));
                        continue;
                    }
                }
            }
            if !cfg.max_lifetime.is_zero() && c.started.elapsed() > cfg.max_lifetime {
                recycle.push((*slot, "max_lifetime".into()));
            }
        }
        // Hung workers: asked to exit now, killed after timeout_cleanup. Their request is logged.
        for c in self.children.values_mut() {
            if c.hang_warned && !c.is_retiring() {
                c.hang_warned = false;
            }
        }
        for (slot, silent, request) in hung {
            let Some(c) = self.children.get_mut(&slot) else { continue };
            tracing::warn!(
                nr = c.nr,
                pid = c.pid_raw(),
                generation = c.generation,
                reason = "timeout",
                silent_s = silent.as_secs(),
                request = %request,
                "worker is not responding; asking it to exit"
            );
            if let Some(ch) = &c.channel {
                let _ = ch.send(&Command::Stop { graceful: true }, &[]);
            }
            c.recycle = Some("timeout".into());
            c.phase = Phase::Retiring { reason: "timeout".into(), kill_at: Instant::now() + cfg.timeout_cleanup };
        }
        // Limits: replace-then-retire, at most refork_max_unavailable replacements at once.
        for (slot, reason) in recycle {
            if self.replacements_in_flight() >= cfg.refork_max_unavailable {
                break;
            }
            if let Some(c) = self.children.get_mut(&slot) {
                tracing::info!(nr = c.nr, pid = c.pid_raw(), generation = c.generation, reason, "recycling worker");
                c.recycle = Some(reason);
            }
        }
        self.advance_rollout();
        self.check_refork_after();
    }

    /// Workers marked for replacement whose replacement is not ready yet.
    fn replacements_in_flight(&self) -> usize {
        self.children.values().filter(|c| c.kind == Kind::Worker && c.recycle.is_some() && !c.is_retiring()).count()
    }

    fn promotion_in_progress(&self) -> bool {
        self.children.values().any(|c| c.phase == Phase::Promoting || c.recycle.as_deref() == Some(PROMOTE))
    }

    /// Rolls workers older than the current mold over, a few at a time; retires old molds when
    /// nothing of their generation is pending.
    fn advance_rollout(&mut self) {
        let Some((_, mold)) = self.current_mold() else { return };
        let generation = mold.generation;
        let width = self.config.refork_max_unavailable;
        let mut in_flight = self.replacements_in_flight();
        let old: Vec<usize> = self
            .children
            .iter()
            .filter(|(_, c)| c.kind == Kind::Worker && c.generation < generation && c.is_active_worker() && c.phase == Phase::Ready)
            .map(|(s, _)| *s)
            .collect();
        for slot in old {
            if in_flight >= width {
                break;
            }
            if let Some(c) = self.children.get_mut(&slot) {
                tracing::info!(nr = c.nr, pid = c.pid_raw(), from = c.generation, to = generation, "rolling worker to the new generation");
                c.recycle = Some(format!("rollout to gen:{generation}"));
                in_flight += 1;
            }
        }
        let old_molds: Vec<(usize, u32)> = self
            .children
            .iter()
            .filter(|(_, c)| c.kind == Kind::Mold && c.generation < generation && !c.is_retiring())
            .map(|(s, c)| (*s, c.generation))
            .collect();
        for (slot, g) in old_molds {
            let pending = self.children.values().any(|c| c.kind == Kind::Worker && c.generation == g && c.phase == Phase::Starting);
            if !pending {
                self.retire(slot, "replaced by a newer mold");
            }
        }
    }

    fn check_refork_after(&mut self) {
        let Some((_, mold)) = self.current_mold() else { return };
        let generation = mold.generation;
        let Some(threshold) = self.config.refork_after.threshold(generation) else { return };
        if self.promotion_in_progress() {
            return;
        }
        // Only once the rollout to this generation is complete.
        if self.children.values().any(|c| c.kind == Kind::Worker && c.generation < generation) {
            return;
        }
        let warm = self.children.iter().any(|(s, c)| {
            c.kind == Kind::Worker
                && c.generation == generation
                && c.phase == Phase::Ready
                && self.board.read(*s).is_some_and(|v| v.requests >= threshold && v.fork_safe)
        });
        if warm {
            tracing::info!(generation, threshold, "refork_after reached");
            request_refork(self);
        }
    }
}

/// Picks the warmest fork-safe worker of the current generation and starts its promotion: a
/// replacement is started first, then the worker is told to become the next mold.
pub(super) fn request_refork(m: &mut Monitor) {
    if !m.is_running() || m.promotion_in_progress() {
        tracing::info!("a promotion is already in progress");
        return;
    }
    let Some((_, mold)) = m.current_mold() else {
        tracing::warn!("no ready mold; refork skipped");
        return;
    };
    let generation = mold.generation;
    let candidate = m
        .children
        .iter()
        .filter(|(_, c)| c.generation == generation && c.kind == Kind::Worker && c.phase == Phase::Ready && c.is_active_worker())
        .filter_map(|(s, _)| m.board.read(*s).filter(|v| v.fork_safe).map(|v| (v.requests, *s)))
        .max();
    let Some((requests, slot)) = candidate else {
        tracing::warn!("no fork-safe ready worker to promote");
        return;
    };
    if let Some(c) = m.children.get_mut(&slot) {
        tracing::info!(nr = c.nr, pid = c.pid_raw(), generation, requests, "promoting worker to mold of gen:{}", generation + 1);
        c.recycle = Some(PROMOTE.into());
    }
}

/// Called when the replacement of a worker marked [`PROMOTE`] is ready: tell it to promote.
pub(super) fn promote(m: &mut Monitor, slot: usize) {
    let next = m.children.values().filter(|c| c.kind == Kind::Mold).map(|c| c.generation).max().unwrap_or(0) + 1;
    let Some(c) = m.children.get_mut(&slot) else { return };
    let sent = c.channel.as_ref().is_some_and(|ch| ch.send(&Command::Promote { generation: next, slot: slot as u32 }, &[]).is_ok());
    if sent {
        c.phase = Phase::Promoting;
        c.promoted_generation = next;
        c.started = Instant::now();
    } else {
        c.recycle = Some("promotion failed".into());
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
            tracing::info!(pid = c.pid_raw(), generation = c.generation, "new mold ready; rolling workers over");
        }
    }
}

/// A promotion failed: the old mold stays; the worker is retired if it is still alive.
pub(super) fn on_promotion_failed(m: &mut Monitor, slot: usize) {
    if let Some(c) = m.children.get_mut(&slot) {
        if c.kind == Kind::Worker && (c.phase == Phase::Promoting || c.recycle.as_deref() == Some(PROMOTE)) {
            c.recycle = Some("promotion failed".into());
            if c.phase == Phase::Promoting {
                c.phase = Phase::Ready;
            }
            let pid = c.pid;
            m.retire(slot, "promotion failed");
            if let Some(pid) = pid {
                let _ = kill(pid, Signal::SIGCONT);
            }
        }
    }
}
