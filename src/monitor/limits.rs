//! Policy on the monitor's tick: hang detection and per-worker limits, each ending in
//! replace-then-retire.

use std::time::{Duration, Instant};

use super::{Kind, Monitor, Phase};
use crate::config::Config;
use crate::ipc::message::Command;
use crate::ipc::scoreboard::{age, SlotView};
use crate::sys::meminfo;

/// Whether a worker is hung, and why: no heartbeat for longer than `timeout`, or, with several
/// runtime threads, a request in flight for longer than `timeout`. With one thread a blocked
/// handler stops the tick, so the heartbeat alone is exact, and a slow request that awaits is not
/// a hang (`request_timeout` bounds it). With several, a handler spinning on one thread leaves the
/// tick running on another: the age of the oldest request in flight is what shows it.
pub(super) fn hang(cfg: &Config, view: &SlotView) -> Option<String> {
    let silent = age(view.heartbeat_ms);
    if silent > cfg.timeout {
        return Some(format!("no heartbeat for {:.1} s", silent.as_secs_f64()));
    }
    if cfg.worker_threads > 1 && view.in_flight > 0 && view.oldest_start_ms > 0 {
        let running = age(view.oldest_start_ms);
        if running > cfg.timeout {
            return Some(format!(
                "a request in flight for {:.1} s",
                running.as_secs_f64()
            ));
        }
    }
    None
}

/// max_requests for a new worker, with its jitter (deterministic per slot and time, no RNG state).
pub(super) fn max_requests_for(config: &Config, slot: usize) -> u64 {
    if config.max_requests == 0 {
        return 0;
    }
    let jitter = if config.max_requests_jitter == 0 {
        0
    } else {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos() as u64
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
        let cfg = &self.config;
        let mut hung = Vec::new();
        let mut recycle = Vec::new();
        for (slot, c) in &mut self.children {
            // A worker already marked for recycling can still hang while its replacement starts,
            // and a spare standing by heartbeats too: a hung one would not take over.
            if c.kind == Kind::Mold || c.phase != Phase::Ready {
                continue;
            }
            let Some(view) = self.board.read(*slot) else {
                continue;
            };
            let Some(pid) = c.pid else { continue };
            if view.pid != pid.as_raw() {
                continue;
            }
            if let Some(why) = hang(cfg, &view) {
                hung.push((*slot, why, view.request.clone()));
                continue;
            }
            if c.kind == Kind::Spare || c.recycle.is_some() {
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
            if cfg.max_pss_mb > 0
                && c.pss_checked
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(5))
            {
                c.pss_checked = Some(Instant::now());
                // From the cache `ctl status` and the metrics share (zeros for a process gone).
                let m = self.memory.get(pid.as_raw());
                if m.pss_kb > cfg.max_pss_mb * 1024 {
                    recycle.push((*slot, format!("max_pss_mb (pss {} MiB)", m.pss_kb / 1024)));
                    continue;
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
        // Hung workers: asked to exit now, killed after timeout_cleanup. Their request is logged,
        // and each of their threads is asked for its stack, which the worker logs before the kill.
        for (slot, why, request) in hung {
            if let Some(pid) = self.children.get(&slot).and_then(|c| c.pid) {
                self.request_stacks(pid.as_raw());
            }
            let Some(c) = self.children.get_mut(&slot) else {
                continue;
            };
            tracing::warn!(
                nr = c.log_nr(),
                pid = c.pid_raw(),
                generation = c.generation,
                reason = "timeout",
                why,
                request = %request,
                "worker is hung; asked its threads for their stacks; asking it to exit, killing \
                 it after timeout_cleanup"
            );
            if let Some(ch) = &c.channel {
                let _ = ch.send(&Command::Stop { graceful: true }, &[]);
            }
            self.events.push(
                "timeout",
                format!(
                    "{} pid {} hung ({why}), serving {request}: asked to exit",
                    c.label(),
                    c.pid_raw()
                ),
            );
            c.recycle = Some("timeout".into());
            c.phase = Phase::Retiring {
                reason: "timeout".into(),
                kill_at: Instant::now() + cfg.timeout_cleanup,
            };
        }
        // Limits: replace-then-retire, at most refork_max_unavailable replacements at once.
        for (slot, reason) in recycle {
            if self.replacements_in_flight() >= cfg.refork_max_unavailable {
                break;
            }
            if let Some(c) = self.children.get_mut(&slot) {
                tracing::info!(
                    nr = c.log_nr(),
                    pid = c.pid_raw(),
                    generation = c.generation,
                    reason,
                    "recycling worker"
                );
                self.events.push(
                    "recycle",
                    format!("{} pid {} recycled: {reason}", c.label(), c.pid_raw()),
                );
                c.recycle = Some(reason);
            }
        }
        self.advance_rollout();
        self.check_refork_after();
    }
}
