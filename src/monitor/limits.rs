//! Policy on the monitor's tick: hang detection and per-worker limits, each ending in
//! replace-then-retire.

use std::time::{Duration, Instant};

use super::{Kind, Monitor, Phase};
use crate::config::Config;
use crate::ipc::message::Command;
use crate::ipc::scoreboard::age;
use crate::sys::meminfo;

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
}
