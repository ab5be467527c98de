//! The status snapshot: what `ctl status` (text and JSON, and so `tine top`) and the Prometheus
//! endpoint show, built by the monitor in one place from its table of children, the scoreboard
//! and its memory cache. The control server (`control.rs`) and the metrics (`metrics.rs`) read
//! this snapshot and never the monitor's fields.

use std::collections::BTreeMap;
use std::time::Duration;

use super::events::Events;
use super::rollout::Failure;
use super::{Child, Kind, Monitor, Phase};
use crate::ipc::scoreboard::{age, Scoreboard, SlotView};
use crate::listener::Listener;
use crate::sys::meminfo;

/// The tree at one moment, as operators see it.
pub(crate) struct Status<'a> {
    /// The monitor, then molds, workers by number and hot spares.
    pub rows: Vec<ProcessRow>,
    /// Serving (not stopping).
    pub running: bool,
    pub uptime: Duration,
    /// Generation of the current mold.
    pub generation: Option<u32>,
    /// Workers the monitor keeps running, and the most it may.
    pub target: usize,
    pub max_workers: usize,
    pub spare_workers: usize,
    pub spare_activations: u64,
    /// Workers by state and generation, spares by state (every child, started or not).
    pub workers_by_state: BTreeMap<(&'static str, u32), u64>,
    pub spares_by_state: BTreeMap<&'static str, u64>,
    /// Requests served by the tree, exited processes included; completed reforks.
    pub requests_total: u64,
    pub reforks: u64,
    /// Restarts by reason; abandoned rollouts by cause.
    pub restarts: &'a BTreeMap<String, u64>,
    pub rollouts_failed: &'a BTreeMap<String, u64>,
    /// The rollout under way, in words and as JSON.
    pub rollout: Option<String>,
    pub rollout_json: serde_json::Value,
    pub last_rollout_failure: Option<&'a Failure>,
    /// Whether the latest rollout that ended was abandoned.
    pub last_rollout_failed: bool,
    /// Starts that failed for lack of resources.
    pub resource_errors_total: u64,
    pub events: &'a Events,
    /// The listening sockets (their accept queues are read by whoever shows them).
    pub listeners: &'a [Listener],
    /// Log lines the tree could not write; loop steps of the monitor over 100 ms.
    pub log_lines_dropped: u64,
    pub slow_steps: u64,
}

/// One process of the tree, as `status` and the metrics show it.
pub(crate) struct ProcessRow {
    pub role: &'static str,
    /// Worker number (workers only).
    pub nr: Option<u32>,
    pub pid: i32,
    pub generation: u32,
    pub state: String,
    pub requests: u64,
    pub in_flight: u64,
    /// Connections a worker holds, and times it stopped accepting at `max_connections`.
    pub connections: u64,
    pub accept_pauses: u64,
    /// Method and path of the oldest request in flight, and how long it has run.
    pub oldest_request: Option<(String, Duration)>,
    pub uptime_s: u64,
    pub mem: meminfo::Memory,
    /// The profile running in this worker: for how long, and its limit in seconds.
    pub profiling: Option<(Duration, u32)>,
}

/// The state of a child as shown to operators: the monitor's phase, refined by the scoreboard.
pub(crate) fn child_state(c: &Child, view: Option<&SlotView>) -> &'static str {
    match &c.phase {
        Phase::Retiring { .. } => "retiring",
        Phase::Starting => "starting",
        Phase::Promoting => "promoting",
        Phase::Ready => view.map(|v| v.state.name()).unwrap_or("ready"),
    }
}

impl Monitor {
    /// The status now. Memory figures come from the monitor's cache.
    pub(super) fn status(&self) -> Status<'_> {
        let mut workers_by_state: BTreeMap<(&str, u32), u64> = BTreeMap::new();
        let mut spares_by_state: BTreeMap<&str, u64> = BTreeMap::new();
        for (slot, c) in &self.children {
            let view = || {
                self.board
                    .read(*slot)
                    .filter(|v| c.pid.is_some_and(|p| p.as_raw() == v.pid))
            };
            match c.kind {
                Kind::Worker => {
                    *workers_by_state
                        .entry((child_state(c, view().as_ref()), c.generation))
                        .or_default() += 1
                }
                Kind::Spare => {
                    *spares_by_state
                        .entry(child_state(c, view().as_ref()))
                        .or_default() += 1
                }
                Kind::Mold => {}
            }
        }
        Status {
            rows: self.process_rows(),
            running: self.is_running(),
            uptime: self.started.elapsed(),
            generation: self.current_mold().map(|(_, c)| c.generation),
            target: self.target,
            max_workers: self.config.max_workers,
            spare_workers: self.config.spare_workers,
            spare_activations: self.spare_activations,
            workers_by_state,
            spares_by_state,
            requests_total: total_requests(self.board),
            reforks: self.board.reforks(),
            restarts: &self.restarts,
            rollouts_failed: &self.rollouts_failed,
            rollout: self.rollout_status(),
            rollout_json: self.rollout_json(),
            last_rollout_failure: self.last_rollout_failure.as_ref(),
            last_rollout_failed: self.last_rollout_failed,
            resource_errors_total: self.resource_errors_total,
            events: &self.events,
            listeners: &self.listeners,
            log_lines_dropped: crate::log::lines_dropped(),
            slow_steps: super::slow_steps(),
        }
    }

    /// The monitor, then molds, workers by number and hot spares, with memory from the cache.
    fn process_rows(&self) -> Vec<ProcessRow> {
        let pid = std::process::id() as i32;
        let generation = self.current_mold().map(|(_, c)| c.generation).unwrap_or(0);
        let mut rows = vec![ProcessRow {
            role: "monitor",
            nr: None,
            pid,
            generation,
            state: if self.is_running() {
                "running".into()
            } else {
                "stopping".into()
            },
            requests: 0,
            in_flight: 0,
            connections: 0,
            accept_pauses: 0,
            oldest_request: None,
            uptime_s: self.started.elapsed().as_secs(),
            mem: self.memory.get(pid),
            profiling: None,
        }];
        let mut children: Vec<_> = self
            .children
            .iter()
            .filter(|(_, c)| c.pid.is_some())
            .collect();
        // Molds, workers by number, then spares.
        children.sort_by_key(|(s, c)| (c.kind != Kind::Mold, c.kind == Kind::Spare, c.nr, **s));
        for (slot, c) in children {
            // A slot still holding another pid (not claimed yet) says nothing about this child.
            let view = self.board.read(*slot).filter(|v| v.pid == c.pid_raw());
            let oldest_request = view
                .as_ref()
                .filter(|v| v.in_flight > 0 && v.oldest_start_ms > 0)
                .map(|v| (v.request.clone(), age(v.oldest_start_ms)));
            rows.push(ProcessRow {
                role: c.kind.name(),
                nr: (c.kind == Kind::Worker).then_some(c.nr),
                pid: c.pid_raw(),
                generation: c.generation,
                state: child_state(c, view.as_ref()).to_string(),
                requests: view.as_ref().map(|v| v.requests).unwrap_or(0),
                in_flight: view.as_ref().map(|v| v.in_flight).unwrap_or(0),
                connections: view.as_ref().map(|v| v.connections).unwrap_or(0),
                accept_pauses: view.as_ref().map(|v| v.accept_pauses).unwrap_or(0),
                oldest_request,
                uptime_s: c.started.elapsed().as_secs(),
                mem: self.memory.get(c.pid_raw()),
                profiling: self
                    .profiles
                    .running(c.pid_raw())
                    .map(|run| (run.since.elapsed(), run.seconds)),
            });
        }
        let live: Vec<i32> = rows.iter().map(|r| r.pid).collect();
        self.memory.retain(&live);
        rows
    }
}

pub(crate) fn shared_percent(mem: &meminfo::Memory) -> f64 {
    if mem.rss_kb == 0 {
        0.0
    } else {
        100.0 * mem.shared_kb as f64 / mem.rss_kb as f64
    }
}

/// The tree's requests: every live slot plus what gone processes served. Saturating: each slot's
/// count is written by its worker, and whatever a corrupt one wrote must not panic the monitor
/// (an overflow panics a debug build) nor wrap the total around.
pub(crate) fn total_requests(board: &Scoreboard) -> u64 {
    // Header first: a count moving from a slot to the header meanwhile is missed, not doubled;
    // the high-water mark then hides the dip.
    let gone = board.requests_of_gone();
    (0..board.capacity())
        .filter_map(|s| board.read(s))
        .fold(gone, |total, v| total.saturating_add(v.requests))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::scoreboard::{Role, State};

    #[test]
    fn the_total_of_corrupt_request_counts_saturates() {
        let board = Scoreboard::create(3).expect("a scoreboard");
        for slot in 0..3 {
            let writer = board.slot(slot).expect("a slot");
            writer.claim(
                1000 + slot as i32,
                Role::Worker,
                1,
                slot as u32,
                State::Ready,
            );
            board.write_requests_count(slot, u64::MAX / 2);
        }
        assert_eq!(total_requests(&board), u64::MAX);
    }
}
