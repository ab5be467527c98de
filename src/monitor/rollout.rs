//! A rollout that fails rolls back, never down.
//!
//! A new generation — the freshly preloaded mold of a reload, or the promoted worker of a refork —
//! is on trial until the rollout is done: every worker is of the new generation and ready, and no
//! older worker serves any more (they may still be draining). Meanwhile the previous mold stays,
//! and every old worker keeps serving (one marked for replacement leaves only once its
//! replacement is ready). The trial fails after `rollout_max_failures` failures during the
//! rollout, counted over the whole trial (a start that failed: `boot` returned an error, the
//! runtime could not be built, the worker died or missed `spawn_timeout`; or a worker of the new
//! generation that died after it was ready, as a deploy that crashes under traffic does), when the
//! new mold dies, or when the promotion fails, whether or not some workers of the new generation
//! are already serving. Then the rollout is
//! abandoned: the new mold retires, the workers it was starting are ended, the ones it started
//! that serve are replaced from the previous mold and then drain (replace-then-retire, so the old
//! generation is back at full strength without a gap), the old workers' replacement marks are
//! cleared, and the failure is logged, kept for `ctl status` and the metrics, and answered to
//! whoever waits in `ctl reload` or `ctl refork`. Automatic reforks (`refork_after`) pause until an
//! operator's refork or a successful rollout.
//!
//! A start that failed for lack of resources (a fork or socket pair failing with `EAGAIN`,
//! `ENOMEM`, `EMFILE` or `ENFILE`) is not a failure of the new generation: it is retried with a
//! capped backoff and never counted, neither here nor towards `max_consecutive_spawn_errors`.

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::children::PROMOTE;
use super::{Kind, Monitor, Phase};

/// What started a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Cause {
    /// `SIGHUP`, `ctl reload`, development mode: a freshly preloaded mold.
    Reload,
    /// `SIGUSR2`, `ctl refork`, `refork_after`: a promoted worker.
    Refork,
}

impl Cause {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Cause::Reload => "reload",
            Cause::Refork => "refork",
        }
    }
}

/// A rollout to a new generation, from its start until every worker is of that generation, or
/// until it is abandoned.
pub(crate) struct Rollout {
    /// The generation being rolled out (its mold's).
    pub generation: u32,
    /// The generation of the mold that served when it started (none: no ready mold then).
    pub from: Option<u32>,
    pub cause: Cause,
    pub started: Instant,
    /// Failures since the rollout began: failed starts, and workers of the new generation that
    /// died after they were ready.
    pub failures: u32,
    /// Why the last start failed.
    pub last_error: String,
    /// When the first worker of the new generation got ready (ms after `started`).
    pub first_ready_ms: Option<u64>,
    /// Every worker is of the new generation and ready, and no older one serves: the trial is
    /// over, the old mold retires, and a failure no longer rolls back.
    pub proven: bool,
    /// `ctl refork` clients waiting for the end of the trial.
    pub waiters: Vec<UnixStream>,
}

/// A rollout that was abandoned, for `ctl status`, the metrics and the next image after a reload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Failure {
    pub generation: u32,
    pub from: Option<u32>,
    pub cause: Cause,
    pub reason: String,
    /// What serves since.
    #[serde(default)]
    pub outcome: String,
    pub at: SystemTime,
}

impl Failure {
    /// One line for `ctl status`.
    pub(crate) fn describe(&self) -> String {
        let ago = SystemTime::now()
            .duration_since(self.at)
            .unwrap_or_default()
            .as_secs();
        format!(
            "{} to gen:{} failed {ago} s ago: {}; {}",
            self.cause.name(),
            self.generation,
            self.reason,
            self.outcome
        )
    }
}

/// What serves after a rollout from `from` is abandoned.
fn kept(from: Option<u32>) -> String {
    match from {
        Some(g) => format!("rolled back: the old generation keeps serving (gen:{g})"),
        None => "rolled back: the old generation keeps serving".into(),
    }
}

pub(super) use crate::sys::process::is_resource_error;

/// [`is_resource_error`] for an error that crossed the channel as text (a mold's `SpawnFailed`):
/// `std::io::Error` prints an OS error as `… (os error N)`.
pub(crate) fn is_resource_error_text(error: &str) -> bool {
    error
        .rsplit_once("(os error ")
        .and_then(|(_, code)| code.strip_suffix(')'))
        .and_then(|code| code.parse::<i32>().ok())
        .is_some_and(|code| is_resource_error(&std::io::Error::from_raw_os_error(code)))
}

/// Whether a worker that exited before it was ready, saying `reason` ([`Report::Exiting`]), did
/// so for lack of resources: its tokio runtime could not be built with `EAGAIN`, `ENOMEM`,
/// `EMFILE` or `ENFILE`. Only the runtime's own failure counts: an app's `boot` failing is the
/// app's, whatever OS error it names.
///
/// [`Report::Exiting`]: crate::ipc::message::Report::Exiting
pub(crate) fn is_resource_exit(reason: &str) -> bool {
    reason.starts_with(crate::ipc::message::RUNTIME_BUILD_FAILED) && is_resource_error_text(reason)
}

impl Monitor {
    /// Records the start of a rollout to `generation`.
    pub(super) fn begin_rollout(
        &mut self,
        cause: Cause,
        generation: u32,
        waiters: Vec<UnixStream>,
    ) {
        let from = self.current_mold().map(|(_, m)| m.generation);
        self.rollout = Some(Rollout {
            generation,
            from,
            cause,
            started: Instant::now(),
            failures: 0,
            last_error: String::new(),
            first_ready_ms: None,
            proven: false,
            waiters,
        });
    }

    /// A start failed (not for lack of resources), or a worker of the new generation died:
    /// counts against a rollout on trial.
    pub(super) fn rollout_failure(&mut self, error: &str) {
        let limit = self.config.rollout_max_failures;
        let Some(r) = &mut self.rollout else { return };
        if r.proven {
            return;
        }
        r.failures += 1;
        r.last_error = error.to_string();
        tracing::warn!(
            generation = r.generation,
            failures = r.failures,
            limit,
            error,
            "a failure during the rollout to gen:{}",
            r.generation
        );
        if r.failures >= limit {
            let reason = format!(
                "{} failures of the new generation; last: {error}",
                r.failures
            );
            self.abandon_rollout(reason);
        }
    }

    /// A worker of `generation` is ready. The trial goes on until every worker is of the new
    /// generation ([`Monitor::check_rollout`]); failures before it still count.
    pub(super) fn rollout_worker_ready(&mut self, generation: u32) {
        let Some(r) = &mut self.rollout else { return };
        if r.proven || generation != r.generation || r.first_ready_ms.is_some() {
            return;
        }
        let ms = r.started.elapsed().as_millis() as u64;
        r.first_ready_ms = Some(ms);
        tracing::info!(
            generation,
            elapsed_ms = ms,
            "gen:{generation} serves: its first worker is ready; rolling the others over (the previous mold stays until every worker is rolled)"
        );
    }

    /// Every turn of the loop: ends a rollout whose new generation is gone (failed) or complete.
    pub(super) fn check_rollout(&mut self) {
        if !self.is_running() {
            return;
        }
        let Some(r) = &self.rollout else { return };
        let g = r.generation;
        let new_ready = self
            .children
            .values()
            .filter(|c| c.kind == Kind::Worker && c.generation == g && c.phase == Phase::Ready)
            .count();
        let mold = self
            .children
            .values()
            .find(|c| c.kind == Kind::Mold && c.generation == g && !c.is_retiring());
        let promoting = self.children.values().any(|c| {
            c.kind == Kind::Worker
                && ((c.phase == Phase::Promoting && c.promoted_generation == g)
                    || c.recycle.as_deref() == Some(PROMOTE))
        });
        if mold.is_none() && !promoting {
            // A reload forks its mold at once; give a mold that died at once its exit report.
            if r.cause == Cause::Reload && r.started.elapsed() < Duration::from_millis(50) {
                return;
            }
            let why = if !r.last_error.is_empty() {
                r.last_error.clone()
            } else if !self.last_spawn_error.is_empty() {
                self.last_spawn_error.clone()
            } else {
                "it exited".to_string()
            };
            let reason = match r.cause {
                Cause::Reload => format!("the new mold failed ({why})"),
                Cause::Refork if r.proven || new_ready > 0 => {
                    format!("the new mold died during its rollout ({why})")
                }
                Cause::Refork => format!("no new mold ({why})"),
            };
            self.abandon_rollout(reason);
            return;
        }
        let mold_ready = mold.is_some_and(|m| m.phase == Phase::Ready);
        let old_serving = self
            .children
            .values()
            .any(|c| c.kind == Kind::Worker && c.generation < g && !c.is_retiring());
        let rolled = mold_ready && !old_serving && new_ready >= self.target;
        if rolled && !r.proven {
            self.rollout_proven(new_ready);
        }
        let old_left = self
            .children
            .values()
            .any(|c| c.kind == Kind::Worker && c.generation < g);
        let Some(r) = &self.rollout else { return };
        if !(r.proven && mold_ready && !old_left && new_ready >= self.target) {
            return;
        }
        let r = self.rollout.take().expect("checked above");
        let ms = r.started.elapsed().as_millis() as u64;
        tracing::info!(
            generation = g,
            elapsed_ms = ms,
            "rollout to gen:{g} ({}) complete",
            r.cause.name()
        );
        self.events.push(
            "rollout",
            format!(
                "rollout to gen:{g} ({}) complete in {ms} ms",
                r.cause.name()
            ),
        );
        self.last_rollout_failed = false;
        self.refork_paused = None;
        if let Some(progress) = self.reload.as_ref().filter(|_| r.cause == Cause::Reload) {
            // From the reload's start, in the previous image (the monotonic clock survives exec).
            let ms = crate::ipc::scoreboard::now_ms().saturating_sub(progress.started_ms);
            self.finish_reload(Ok(format!("reloaded in {ms} ms (gen:{g})\n")));
        }
        for w in r.waiters {
            let _ = crate::ctl::protocol::send_reply(
                w,
                Ok(format!("reforked to gen:{g} in {ms} ms\n")),
            );
        }
    }

    /// Every worker of the tree is of the new generation and ready: the trial is over. The old
    /// mold retires (`advance_rollout`), the old workers finish draining, and `ctl refork` is
    /// answered.
    fn rollout_proven(&mut self, workers: usize) {
        let Some(r) = &mut self.rollout else { return };
        r.proven = true;
        let g = r.generation;
        let ms = r.started.elapsed().as_millis() as u64;
        let first = r.first_ready_ms.unwrap_or(ms);
        tracing::info!(
            generation = g,
            elapsed_ms = ms,
            workers,
            "gen:{g} serves with every worker ready; the previous mold retires"
        );
        let reply = format!(
            "gen:{g} serving in {ms} ms: all {workers} workers ready (the first after {first} ms); the old workers drain\n"
        );
        for w in std::mem::take(&mut r.waiters) {
            let _ = crate::ctl::protocol::send_reply(w, Ok(reply.clone()));
        }
    }

    /// Gives the rollout up: the new mold and whatever it was starting go, the workers it
    /// started that serve are replaced from the previous mold and then retire, the old workers
    /// lose their replacement marks and keep serving, and the failure is reported.
    pub(super) fn abandon_rollout(&mut self, reason: String) {
        self.end_rollout(reason, true);
    }

    /// A reload is about to re-execute while a rollout is on trial: it is rolled back as a failed
    /// one would be (the reload then rolls every worker over, and can itself roll back to the
    /// previous mold, not to the interrupted generation's), but not counted as a failure. A
    /// rollout past its trial is only forgotten: its generation stays.
    pub(super) fn interrupt_rollout(&mut self, why: &str) {
        if self.rollout.as_ref().is_some_and(|r| !r.proven) {
            self.end_rollout(why.to_string(), false);
        } else {
            self.drop_rollout(why);
        }
    }

    /// Ends the rollout under way and rolls it back (see [`Monitor::abandon_rollout`]); a
    /// `failed` one is also reported as a failure.
    fn end_rollout(&mut self, reason: String, failed: bool) {
        let Some(r) = self.rollout.take() else { return };
        let g = r.generation;
        let rollout_mark = format!("rollout to gen:{g}");
        let undo_mark = format!("rollout to gen:{g} abandoned");
        let mut retire = Vec::new();
        let mut kill = Vec::new();
        // Numbers of the old workers that serve on: a worker of the new generation with one of
        // them has nothing to wait for (no replacement will come), it retires at once.
        let old_nrs: Vec<u32> = self
            .children
            .values()
            .filter(|c| c.kind == Kind::Worker && c.generation < g && !c.is_retiring())
            .map(|c| c.nr)
            .collect();
        // Once every worker was rolled, the old mold was gone, and its own mold died (nothing else
        // ends a proven rollout): the replacements under way are asked of the next mold, as after
        // any mold's death.
        let roll_back = !r.proven;
        let mut undone = 0;
        for (slot, c) in self.children.iter_mut().filter(|_| roll_back) {
            if c.is_retiring() {
                continue;
            }
            match c.kind {
                Kind::Mold if c.generation == g => retire.push(*slot),
                Kind::Worker if c.phase == Phase::Promoting && c.promoted_generation == g => {
                    retire.push(*slot)
                }
                Kind::Worker if c.generation == g && c.phase == Phase::Starting => kill.push(*slot),
                Kind::Worker if c.generation == g && old_nrs.contains(&c.nr) => retire.push(*slot),
                Kind::Worker if c.generation == g => {
                    // Serving: it leaves once its replacement from the previous mold is ready.
                    c.recycle = Some(undo_mark.clone());
                    undone += 1;
                }
                // Its spares never served: they go with it (the older ones stayed).
                Kind::Spare if c.generation == g => kill.push(*slot),
                Kind::Worker
                    if c.recycle.as_deref() == Some(PROMOTE)
                        || c.recycle.as_deref() == Some(rollout_mark.as_str()) =>
                {
                    // Not leaving after all: its replacement will never come from that mold.
                    c.recycle = None;
                }
                _ => {}
            }
        }
        for slot in retire {
            self.retire(slot, "rollout abandoned");
        }
        for slot in kill {
            self.kill_child(slot, "rollout abandoned");
        }
        // Once every worker was rolled, the old mold was gone: nothing to roll back to, the
        // workers of both generations go on.
        let previous_mold = self
            .children
            .values()
            .any(|c| c.kind == Kind::Mold && c.generation != g && !c.is_retiring());
        let outcome = if r.proven {
            format!("the workers already rolled to gen:{g} and the older ones keep serving")
        } else if !previous_mold {
            // It died during the trial: the old workers serve on, and what is missing comes from
            // a fresh generation-0 mold, which preloads again.
            format!(
                "{}; the previous mold died during the rollout: a fresh gen:0 mold preloads for the missing workers",
                kept(r.from)
            )
        } else if undone > 0 {
            format!(
                "{}; its {undone} worker(s) of gen:{g} are replaced from the previous mold, then drain",
                kept(r.from)
            )
        } else {
            kept(r.from)
        };
        if !failed {
            let message = format!("{} to gen:{g} {reason}; {outcome}", r.cause.name());
            tracing::warn!(generation = g, "rollout interrupted: {message}");
            for w in r.waiters {
                let _ = crate::ctl::protocol::send_reply(w, Err(message.clone()));
            }
            return;
        }
        let message = format!("{} to gen:{g} failed: {reason}; {outcome}", r.cause.name());
        tracing::error!(
            generation = g,
            cause = r.cause.name(),
            "rollout abandoned: {message}"
        );
        self.events
            .push("rollout", format!("rollout abandoned: {message}"));
        *self
            .rollouts_failed
            .entry(r.cause.name().to_string())
            .or_default() += 1;
        self.last_rollout_failed = true;
        self.last_rollout_failure = Some(Failure {
            generation: g,
            from: r.from,
            cause: r.cause,
            reason,
            outcome,
            at: SystemTime::now(),
        });
        // The failed starts were the new generation's: the old one starts afresh, at once.
        self.spawn_errors = 0;
        self.backoff_until = None;
        match r.cause {
            Cause::Reload => self.finish_reload(Err(message.clone())),
            Cause::Refork => self.refork_paused = r.from,
        }
        for w in r.waiters {
            let _ = crate::ctl::protocol::send_reply(w, Err(message.clone()));
        }
    }

    /// Answers and forgets the rollout when the server stops or re-executes.
    pub(super) fn drop_rollout(&mut self, why: &str) {
        if let Some(r) = self.rollout.take() {
            for w in r.waiters {
                let _ = crate::ctl::protocol::send_reply(w, Err(why.to_string()));
            }
        }
    }

    /// Whether the new mold of generation `g` may take over from older molds: every worker is of
    /// generation `g` and ready (always true outside a rollout to `g`).
    pub(super) fn generation_proven(&self, g: u32) -> bool {
        self.rollout
            .as_ref()
            .is_none_or(|r| r.generation != g || r.proven)
    }

    /// Workers of the generation being rolled out that are ready.
    fn rollout_workers_ready(&self) -> usize {
        let Some(r) = &self.rollout else { return 0 };
        self.children
            .values()
            .filter(|c| {
                c.kind == Kind::Worker && c.generation == r.generation && c.phase == Phase::Ready
            })
            .count()
    }

    /// A line for `ctl status` about the rollout under way, if any.
    pub(crate) fn rollout_status(&self) -> Option<String> {
        let r = self.rollout.as_ref()?;
        let from = r
            .from
            .map(|g| format!("gen:{g}"))
            .unwrap_or_else(|| "older workers".into());
        let ready = self.rollout_workers_ready();
        let stage = if r.proven {
            "every worker rolled; the old ones drain".to_string()
        } else if r.failures > 0 {
            format!(
                "on trial, {ready} of {} workers ready, {} failure(s) of {} allowed (last: {})",
                self.target, r.failures, self.config.rollout_max_failures, r.last_error
            )
        } else {
            format!(
                "on trial, {ready} of {} workers ready (the previous mold stays until all are)",
                self.target
            )
        };
        Some(format!(
            "{} from {from} to gen:{}, {} s: {stage}",
            r.cause.name(),
            r.generation,
            r.started.elapsed().as_secs()
        ))
    }

    /// `ctl status --json`'s view of the rollout under way.
    pub(crate) fn rollout_json(&self) -> serde_json::Value {
        match &self.rollout {
            None => serde_json::Value::Null,
            Some(r) => serde_json::json!({
                "cause": r.cause.name(),
                "from": r.from,
                "generation": r.generation,
                "proven": r.proven,
                "workers_ready": self.rollout_workers_ready(),
                "failures": r.failures,
                "last_error": r.last_error,
                "seconds": r.started.elapsed().as_secs(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_errors_are_told_from_the_others_by_their_os_error() {
        let eagain = std::io::Error::from_raw_os_error(libc::EAGAIN);
        assert!(is_resource_error(&eagain));
        assert!(is_resource_error_text(&eagain.to_string()));
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert!(is_resource_error_text(&format!("socketpair: {emfile}")));
        let ebadf = std::io::Error::from_raw_os_error(libc::EBADF);
        assert!(!is_resource_error(&ebadf));
        assert!(!is_resource_error_text(&ebadf.to_string()));
        assert!(!is_resource_error_text(
            "refusing to fork: this process has 2 threads"
        ));
        assert!(!is_resource_error_text("(os error x)"));
    }

    #[test]
    fn a_runtime_that_cannot_be_built_for_lack_of_resources_is_a_resource_exit() {
        let runtime = |errno| {
            format!(
                "{}{}",
                crate::ipc::message::RUNTIME_BUILD_FAILED,
                std::io::Error::from_raw_os_error(errno)
            )
        };
        for errno in [libc::EAGAIN, libc::EMFILE, libc::ENOMEM, libc::ENFILE] {
            assert!(is_resource_exit(&runtime(errno)), "{}", runtime(errno));
        }
        assert!(!is_resource_exit(&runtime(libc::EINVAL)));
        // The app's boot naming an OS error is the app's failure, counted.
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert!(!is_resource_exit(&format!(
            "boot failed: open config: {emfile}"
        )));
    }
}
