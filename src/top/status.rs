//! What `tine top` reads: `ctl status --json`, parsed leniently (a field an older server does
//! not send shows as unknown, never as an error), and the rates computed from two replies in a
//! row: requests per second and CPU % per process.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// One reply of `ctl status --json`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Status {
    pub processes: Vec<Process>,
    pub target: usize,
    pub max_workers: Option<usize>,
    pub generation: Option<u32>,
    pub total_pss_kb: u64,
    pub requests_total: Option<u64>,
    pub reforks: Option<u64>,
    pub restarts: BTreeMap<String, u64>,
    pub listen_queues: Vec<ListenQueue>,
    pub events: Vec<Event>,
    pub rollout: Option<Rollout>,
    pub last_failed_rollout: Option<FailedRollout>,
    pub log_lines_dropped: u64,
}

/// One process row.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Process {
    pub role: String,
    pub nr: Option<u32>,
    pub pid: i32,
    pub generation: u32,
    pub state: String,
    pub requests: u64,
    pub in_flight: u64,
    pub oldest_request: Option<String>,
    pub oldest_request_ms: Option<u64>,
    pub cpu_ms: Option<u64>,
    pub uptime_s: u64,
    pub rss_kb: u64,
    pub pss_kb: u64,
    pub uss_kb: u64,
    pub shared_percent: f64,
    /// Set while the worker is being profiled (`ctl profile`, `p`, or `SIGUSR2` to it).
    pub profiling: Option<Profiling>,
}

/// A profile running in a worker.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Profiling {
    pub elapsed_ms: u64,
    pub max_seconds: u64,
}

/// A listener's accept queue (`waiting` and `limit` unknown where the kernel did not say).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct ListenQueue {
    pub listener: String,
    pub waiting: Option<u32>,
    pub limit: Option<u32>,
}

/// A recent event of the tree.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Event {
    pub unix_ms: u64,
    pub kind: String,
    pub text: String,
}

/// The rollout under way.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Rollout {
    pub cause: String,
    pub generation: u32,
    pub proven: bool,
    pub failures: u32,
    pub seconds: u64,
}

/// The latest abandoned rollout.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct FailedRollout {
    pub text: String,
}

impl Status {
    /// Parses a reply; the error says what was wrong with it.
    pub(crate) fn parse(text: &str) -> Result<Status, String> {
        serde_json::from_str(text).map_err(|e| format!("unreadable status: {e}"))
    }

    /// The workers serving or starting, not leaving: what `+`/`-` count from.
    pub(crate) fn workers(&self) -> impl Iterator<Item = &Process> {
        self.processes.iter().filter(|p| p.role == "worker")
    }
}

/// Rates of one process between two replies.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Rate {
    pub requests_per_s: f64,
    /// CPU time used over wall time, in percent of one core.
    pub cpu_percent: Option<f64>,
}

/// Per-process rates by pid, from the previous reply to this one, `elapsed` apart. A process
/// absent from the previous reply (new, or a reused pid of another role) has none yet.
pub(crate) fn rates(previous: &Status, current: &Status, elapsed: Duration) -> HashMap<i32, Rate> {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return HashMap::new();
    }
    let before: HashMap<(i32, &str), &Process> = previous
        .processes
        .iter()
        .map(|p| ((p.pid, p.role.as_str()), p))
        .collect();
    current
        .processes
        .iter()
        .filter_map(|p| {
            let old = before.get(&(p.pid, p.role.as_str()))?;
            let requests = p.requests.saturating_sub(old.requests) as f64 / secs;
            let cpu = match (old.cpu_ms, p.cpu_ms) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 10.0 / secs),
                _ => None,
            };
            Some((
                p.pid,
                Rate {
                    requests_per_s: requests,
                    cpu_percent: cpu,
                },
            ))
        })
        .collect()
}

/// A reply and when it arrived.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    pub status: Status,
    pub at: Instant,
}

/// The tree's requests per second between two samples: from the tree's total where the server
/// reports one (it counts what exited processes served), else the sum over processes.
pub(crate) fn total_rate(previous: &Sample, current: &Sample, rates: &HashMap<i32, Rate>) -> f64 {
    let secs = current
        .at
        .saturating_duration_since(previous.at)
        .as_secs_f64();
    match (
        previous.status.requests_total,
        current.status.requests_total,
    ) {
        (Some(a), Some(b)) if secs > 0.0 && b >= a => (b - a) as f64 / secs,
        _ => rates.values().map(|r| r.requests_per_s).sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(rows: &[(i32, &str, u64, Option<u64>)]) -> Status {
        Status {
            processes: rows
                .iter()
                .map(|(pid, role, requests, cpu_ms)| Process {
                    pid: *pid,
                    role: role.to_string(),
                    requests: *requests,
                    cpu_ms: *cpu_ms,
                    ..Process::default()
                })
                .collect(),
            ..Status::default()
        }
    }

    #[test]
    fn rates_come_from_the_same_process_in_both_replies() {
        let before = status(&[(10, "worker", 100, Some(1000)), (11, "worker", 5, None)]);
        let after = status(&[
            (10, "worker", 300, Some(1500)),
            (11, "worker", 5, None),
            (12, "worker", 50, Some(10)),
        ]);
        let r = rates(&before, &after, Duration::from_secs(2));
        assert_eq!(r[&10].requests_per_s, 100.0);
        assert_eq!(r[&10].cpu_percent, Some(25.0));
        assert_eq!(r[&11].cpu_percent, None);
        assert!(!r.contains_key(&12), "a new process has no rate yet");
        // A pid reused by another role is not the same process.
        let mold = status(&[(10, "mold", 0, Some(2000))]);
        assert!(rates(&after, &mold, Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn an_older_servers_reply_parses_with_unknowns() {
        let s = Status::parse(
            r#"{"processes":[{"role":"worker","nr":0,"pid":7,"generation":1,"state":"ready",
                "requests":3,"uptime_s":1,"rss_kb":10,"pss_kb":5,"uss_kb":2,"shared_percent":80.0,
                "in_flight":0,"oldest_request":null,"oldest_request_ms":null}],
                "target":1,"total_pss_kb":5}"#,
        )
        .unwrap();
        assert_eq!(s.processes[0].cpu_ms, None);
        assert_eq!(s.requests_total, None);
        assert!(s.events.is_empty());
        assert!(Status::parse("not json").is_err());
    }
}
