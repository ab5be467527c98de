//! The monitor's side of profiling (crate::worker::profile): `tine ctl profile`, which workers are being
//! profiled (for `ctl status`), and asking a hung worker's threads for their stacks.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::{Kind, Monitor, Phase};
use crate::ipc::message::{Command, Report};

/// How long a `ctl profile` client waits beyond the profile's own length (symbolizing and writing).
const WRITE_GRACE: Duration = Duration::from_secs(60);
/// Threads of a hung worker asked for their stacks (the worker keeps at most as many).
const MAX_THREADS_ASKED: usize = crate::sys::sampling::MAX_STACKS;

/// Profiles in progress and the `ctl profile` clients waiting for them.
#[derive(Default)]
pub(crate) struct Profiles {
    /// Workers whose profiler thread runs (they said [`Report::ProfilerReady`]), by pid.
    ready: BTreeSet<i32>,
    /// Profiles running, by worker pid.
    running: BTreeMap<i32, Run>,
    waiters: Vec<Waiter>,
}

/// A profile running in a worker, as `ctl status` shows it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    pub since: Instant,
    /// The longest it runs.
    pub seconds: u32,
}

struct Waiter {
    pid: i32,
    nr: u32,
    client: UnixStream,
    deadline: Instant,
    json: bool,
}

impl Profiles {
    /// The profile running in worker `pid`, if any.
    pub(crate) fn running(&self, pid: i32) -> Option<Run> {
        self.running.get(&pid).copied()
    }

    /// Removes and returns the clients waiting for worker `pid`'s profile.
    fn take_waiters(&mut self, pid: i32) -> Vec<Waiter> {
        let (mine, others) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| w.pid == pid);
        self.waiters = others;
        mine
    }
}

fn answer(waiter: Waiter, reply: Result<String, String>) {
    let _ = crate::ctl::protocol::send_reply(waiter.client, reply);
}

impl Monitor {
    /// `tine ctl profile NR [--pid PID] [--seconds N] [--json]`: answered with the SVG's path
    /// once worker NR wrote it, or with an error. With `pid`, only that process is profiled: a
    /// client that showed the operator a pid (`tine top`) must not profile the worker that took
    /// its number since.
    pub(crate) fn profile(
        &mut self,
        client: UnixStream,
        nr: u32,
        pid: Option<i32>,
        seconds: u32,
        json: bool,
    ) {
        match self.start_profile(nr, pid, seconds) {
            Ok(pid) => self.profiles.waiters.push(Waiter {
                pid,
                nr,
                client,
                deadline: Instant::now() + Duration::from_secs(seconds as u64) + WRITE_GRACE,
                json,
            }),
            Err(e) => {
                let _ = crate::ctl::protocol::send_reply(client, Err(format!("profile: {e}")));
            }
        }
    }

    fn start_profile(&mut self, nr: u32, asked: Option<i32>, seconds: u32) -> Result<i32, String> {
        let max = self.config.profile_max_seconds;
        if seconds == 0 || seconds > max {
            return Err(format!(
                "--seconds {seconds} is out of range 1..={max} (profile_max_seconds)"
            ));
        }
        let worker = self.children.values().find(|c| {
            c.kind == Kind::Worker && c.nr == nr && c.phase == Phase::Ready && c.pid.is_some()
        });
        let now = worker.map(|c| c.pid_raw());
        match (asked, now) {
            (Some(asked), Some(now)) if asked != now => {
                return Err(format!(
                    "worker {nr} is pid {now} now, not {asked}; nothing profiled"
                ));
            }
            (Some(asked), None) => {
                return Err(format!(
                    "no ready worker {nr} (pid {asked} is gone); nothing profiled"
                ));
            }
            _ => {}
        }
        let Some(c) = worker else {
            return Err(format!("no ready worker {nr}"));
        };
        let pid = c.pid_raw();
        if !self.profiles.ready.contains(&pid) {
            return Err(format!(
                "worker {nr} (pid {pid}) has no profiler (a worker of the tine before the last \
                 reload, or its profiler thread could not start: see its log)"
            ));
        }
        if let Some(run) = self.profiles.running.get(&pid) {
            return Err(format!(
                "worker {nr} (pid {pid}) is already being profiled (for {} s of at most {} s; \
                 `kill -USR2 {pid}` stops it)",
                run.since.elapsed().as_secs(),
                run.seconds
            ));
        }
        let sent = c
            .channel
            .as_ref()
            .is_some_and(|ch| ch.send(&Command::Profile { seconds }, &[]).is_ok());
        if !sent {
            return Err(format!("cannot reach worker {nr} (pid {pid})"));
        }
        tracing::info!(nr, pid, seconds, "ctl profile: profiling worker");
        Ok(pid)
    }

    /// A profiling report from the child in `slot`.
    pub(super) fn on_profile_report(&mut self, slot: usize, report: Report) {
        let Some(c) = self.children.get(&slot) else {
            return;
        };
        // Only workers profile; a mold (or a child not yet known by pid) has no business here. A
        // hot spare starts its profiler as it boots, so that it can be profiled once activated.
        let profiles = c.kind == Kind::Worker
            || (c.kind == Kind::Spare && matches!(report, Report::ProfilerReady));
        if !profiles || c.pid.is_none() {
            return;
        }
        let pid = c.pid_raw();
        match report {
            Report::ProfilerReady => {
                self.profiles.ready.insert(pid);
            }
            Report::ProfileStarted { seconds } => {
                self.profiles.running.insert(
                    pid,
                    Run {
                        since: Instant::now(),
                        seconds,
                    },
                );
            }
            Report::ProfileWritten { svg, samples } => {
                self.profiles.running.remove(&pid);
                for waiter in self.profiles.take_waiters(pid) {
                    let reply = if waiter.json {
                        let folded = svg
                            .strip_suffix(".svg")
                            .map(|base| format!("{base}.folded"));
                        let doc = serde_json::json!({
                            "nr": waiter.nr,
                            "pid": pid,
                            "svg": svg,
                            "folded": folded,
                            "samples": samples,
                        });
                        format!("{doc}\n")
                    } else {
                        format!("{svg}\n")
                    };
                    answer(waiter, Ok(reply));
                }
            }
            Report::ProfileFailed {
                error,
                still_running,
            } => {
                if !still_running {
                    self.profiles.running.remove(&pid);
                }
                for waiter in self.profiles.take_waiters(pid) {
                    let nr = waiter.nr;
                    answer(waiter, Err(format!("profile: worker {nr}: {error}")));
                }
            }
            _ => {}
        }
    }

    /// Answers the clients of workers that exited before writing their profile, or took too long;
    /// forgets the profiles of processes that are gone.
    pub(super) fn check_profiles(&mut self) {
        if self.profiles.waiters.is_empty()
            && self.profiles.running.is_empty()
            && self.profiles.ready.is_empty()
        {
            return;
        }
        let live: BTreeSet<i32> = self
            .children
            .values()
            .filter(|c| matches!(c.kind, Kind::Worker | Kind::Spare) && c.pid.is_some())
            .map(|c| c.pid_raw())
            .collect();
        self.profiles.running.retain(|pid, _| live.contains(pid));
        self.profiles.ready.retain(|pid| live.contains(pid));
        let now = Instant::now();
        for waiter in std::mem::take(&mut self.profiles.waiters) {
            let (nr, pid) = (waiter.nr, waiter.pid);
            if !live.contains(&pid) {
                answer(
                    waiter,
                    Err(format!(
                        "profile: worker {nr} (pid {pid}) exited before writing its profile"
                    )),
                );
            } else if now >= waiter.deadline {
                answer(
                    waiter,
                    Err(format!(
                        "profile: worker {nr} (pid {pid}) wrote no profile in time (see its log)"
                    )),
                );
            } else {
                self.profiles.waiters.push(waiter);
            }
        }
    }

    /// Asks every thread of the hung worker `pid` for its stack: the worker's profiler thread logs
    /// them (crate::worker::profile). A worker without the handler ignores the signal (see child.rs).
    pub(super) fn request_stacks(&self, pid: i32) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return;
        };
        let mut asked = 0;
        for task in tasks.flatten() {
            if asked == MAX_THREADS_ASKED {
                break;
            }
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<i32>().ok())
            else {
                continue;
            };
            // The profiler thread itself only waits, and the death notice's thread only parks
            // with every signal blocked: their stacks say nothing about the hang.
            let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if matches!(name.trim(), "tine-profile" | "tine-sentinel") {
                continue;
            }
            if crate::sys::sampling::request_stack(pid, tid).is_ok() {
                asked += 1;
            }
        }
    }
}
