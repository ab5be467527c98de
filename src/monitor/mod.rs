//! The monitor: a single-threaded poll loop that keeps the tree alive.
//!
//! It never runs app code and never starts a thread (it forks). One `poll` covers the signalfd,
//! one channel per child, the control socket and a timer; every decision is made in
//! [`Monitor::reconcile`], which compares the table of children with the target and acts.

mod accept;
mod children;
mod control;
pub(crate) mod events;
mod limits;
pub(crate) mod memory;
mod metrics;
mod priority;
mod profiling;
mod queue;
mod refork;
mod reload;
mod rollout;
mod spares;
mod start;
mod status;
mod systemd;
mod watch;

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::resource::{getrusage, Usage, UsageWho};
use nix::sys::signal::Signal;
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::config::Config;
use crate::ctl::protocol::{self, Op, Reply};
use crate::ipc::channel::ChannelError;
use crate::ipc::message::{Command, Report};
use crate::ipc::scoreboard::Scoreboard;
use crate::listener::Listener;
use control::ControlServer;

pub(crate) use children::{Child, Kind, Phase};
pub(crate) use reload::HANDOVER_VERSION;
pub use start::run;
pub(crate) use start::{check_descriptor_budget, nofile_hard_limit};

/// Why the monitor could not start or had to give up.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// The configuration or the app's check refused to start (exit code 2).
    #[error("{0}")]
    Config(String),
    /// A system call failed while starting.
    #[error("{what}: {source}")]
    Setup {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// Children kept failing to start while no worker served.
    #[error("giving up after {0} consecutive failed spawns: {1}")]
    SpawnErrors(u32, String),
}

impl MonitorError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            MonitorError::Config(_) => 2,
            MonitorError::Setup { .. } => 2,
            MonitorError::SpawnErrors(..) => 1,
        }
    }
}

fn setup(what: &'static str) -> impl FnOnce(std::io::Error) -> MonitorError {
    move |source| MonitorError::Setup { what, source }
}

/// What the loop is doing overall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Running,
    Stopping { graceful: bool, deadline: Instant },
}

/// The longest a graceful stop waits for TCP handshakes under way (see `Monitor::stop`): a round
/// trip on any sane network, and the 200 ms a client may hold back its final ACK.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(1);

/// The monitor's state.
pub(crate) struct Monitor {
    config: Config,
    listeners: Vec<Listener>,
    board: &'static Scoreboard,
    signals: SignalFd,
    control: Option<ControlServer>,
    /// The Prometheus endpoint (`metrics_listen`), if configured: see `metrics`.
    metrics: Option<metrics::MetricsServer>,
    /// Children by scoreboard slot.
    children: BTreeMap<usize, Child>,
    target: usize,
    mode: Mode,
    pid: Pid,
    started: Instant,
    spawn_errors: u32,
    /// A worker has been ready since this image started (adopted ready workers count): from
    /// then on, failed starts never end the monitor, however many (see `reconcile`).
    ever_served: bool,
    last_spawn_error: String,
    backoff_until: Option<Instant>,
    announced_ready: bool,
    title: String,
    pid_file: Option<PathBuf>,
    /// Restarts by reason, for metrics.
    restarts: BTreeMap<String, u64>,
    spawn_mold: fn(&mut Monitor, u32) -> std::io::Result<()>,
    /// A reload under way.
    reload: Option<reload::Progress>,
    /// A reload's preflight under way.
    preflight: Option<reload::Preflight>,
    /// The last spawn request sent to a mold.
    next_request: u64,
    /// For each of `listeners` (same order): it came from systemd socket activation, and is
    /// systemd's (its socket unit keeps it, queuing connections for the next start).
    from_systemd: Vec<bool>,
    /// A graceful stop waiting, before it tells the children, for TCP handshakes under way on
    /// these addresses to reach a queue (see `stop`), until the instant given.
    handshake_wait: Option<(Instant, Vec<std::net::SocketAddr>)>,
    /// Watchdog ping interval and last ping.
    watchdog: Option<(Duration, Instant)>,
    /// Development mode's file watcher.
    watcher: Option<watch::Watcher>,
    /// A boot-only reload under way: when it started and what changed.
    boot_reload: Option<(Instant, std::path::PathBuf)>,
    last_limits: Instant,
    /// The rollout to a new generation under way (reload or refork): see `rollout`.
    rollout: Option<rollout::Rollout>,
    /// Abandoned rollouts by cause (`reload`, `refork`), for metrics.
    rollouts_failed: BTreeMap<String, u64>,
    /// The latest abandoned rollout, for `ctl status`.
    last_rollout_failure: Option<rollout::Failure>,
    /// Whether the latest rollout that ended was abandoned (a gauge for alerts).
    last_rollout_failed: bool,
    /// `refork_after` does not refork this generation again: a refork from it was abandoned.
    refork_paused: Option<u32>,
    /// Starts that failed for lack of resources since one last succeeded (backoff only).
    resource_errors: u32,
    /// Every start that failed for lack of resources, for metrics.
    resource_errors_total: u64,
    /// Recent reforks, reloads, kills, deaths, recycles and scaling, for `ctl status` and `tine top`.
    events: events::Events,
    /// Workers' profiles and the `ctl profile` clients waiting for them.
    profiles: profiling::Profiles,
    /// Every process's memory figures, shared by `ctl status`, the metrics and the limits.
    memory: memory::MemoryCache,
    /// Hot spares that took over from a worker (see `spares`), for metrics.
    spare_activations: u64,
    /// When a spare last took over: its replacement is requested a little later
    /// (`spares::REFILL_DELAY`).
    last_spare_activation: Option<Instant>,
    /// Dead workers (slot, number, when to stop waiting) whose place a spare is taking on its
    /// own: the kernel woke its watcher before the monitor heard of the death (see
    /// `spares::TAKEOVER_WAIT`).
    pending_takeovers: Vec<(usize, u32, Instant)>,
    /// Holders of dead workers' memory (`crate::sys::holder`), adopted by the monitor when
    /// their worker died and gone a moment later: an orphan like any other to `waitpid`, but
    /// expected, so not logged as one. Each with when its worker's exit was handled.
    dead_holders: Vec<(Pid, Instant)>,
    /// The kernel reaps children (`SA_NOCLDWAIT`) and their exits are read from their pidfds
    /// (see `crate::sys::pidfd`); otherwise the monitor reaps them with `waitpid`.
    pub(crate) kernel_reaps: bool,
    /// When `poll` last returned ([`crate::log::monotonic_us`]), for the `tine::respawn` lines.
    woke_us: u64,
    /// The monitor's CPU time then ([`crate::log::thread_cpu_us`]).
    woke_cpu_us: u64,
}

/// How long an exit seen on a pidfd may wait for the kernel to store its status before it is
/// handled without one. The kernel stores it as the process's last thread releases the process:
/// microseconds later, or, for a last thread that waits for a CPU, much later.
const EXIT_STATUS_PATIENCE: Duration = Duration::from_secs(60);

/// How long a worker requested from a mold that then died may still report itself.
const ORPHANED_SPAWN_GRACE: Duration = Duration::from_secs(3);

impl Monitor {
    fn run_loop(&mut self) -> Result<u8, MonitorError> {
        self.reconcile()?;
        loop {
            let timeout = self.poll_timeout();
            let ready = self.wait(timeout);
            self.woke_us = crate::log::monotonic_us();
            self.woke_cpu_us = crate::log::thread_cpu_us();
            let turn = turn_usage();
            for source in ready {
                let began = Instant::now();
                let step = match source {
                    Source::Signals => {
                        self.on_signals();
                        "signals"
                    }
                    Source::Child(slot) => {
                        self.on_child_readable(slot);
                        "a child's channel"
                    }
                    Source::DeathNotice(slot) => {
                        self.on_death_notice(slot);
                        "a worker's death notice"
                    }
                    Source::Exited(slot) => {
                        if let Some(c) = self.children.get_mut(&slot) {
                            c.exited.get_or_insert_with(Instant::now);
                        }
                        "a child's pidfd"
                    }
                    Source::Control => {
                        self.on_control();
                        "control socket accept"
                    }
                    Source::ControlClient(i) => {
                        if let Some(command) = self.on_control_client(i) {
                            slow_step(&format!("ctl {command}"), began, &turn);
                            continue;
                        }
                        "control client"
                    }
                    Source::Watch => {
                        if let Some(w) = &mut self.watcher {
                            w.on_readable();
                        }
                        "file watcher"
                    }
                    Source::Metrics => {
                        if let Some(server) = &mut self.metrics {
                            server.on_listener();
                        }
                        "metrics accept"
                    }
                    Source::MetricsClient(id) => {
                        if let Some(mut server) = self.metrics.take() {
                            server.on_client(id, || self.status());
                            self.metrics = Some(server);
                        }
                        "metrics request"
                    }
                };
                slow_step(step, began, &turn);
            }
            let began = Instant::now();
            self.reap();
            let began = slow_step("reap", began, &turn);
            self.check_profiles();
            let began = slow_step("profiles", began, &turn);
            self.check_limits();
            let began = slow_step("limits", began, &turn);
            // Event-driven too: the next old worker is replaced as soon as the last one is.
            self.advance_rollout();
            let began = slow_step("advance rollout", began, &turn);
            self.check_preflight();
            let began = slow_step("reload preflight", began, &turn);
            self.check_rollout();
            let began = slow_step("check rollout", began, &turn);
            self.check_watch();
            let began = slow_step("watch", began, &turn);
            systemd::watchdog_tick(self);
            slow_step("systemd watchdog", began, &turn);
            self.check_handshake_wait();
            if let Mode::Stopping { deadline, .. } = self.mode {
                if self.children.is_empty() {
                    tracing::info!("stopped");
                    return Ok(0);
                }
                if Instant::now() >= deadline {
                    self.kill_everything();
                    tracing::info!("stopped (remaining processes killed at the deadline)");
                    return Ok(0);
                }
            }
            let began = Instant::now();
            self.settle_pending_takeovers();
            self.settle_activated_priorities();
            self.reconcile()?;
            self.sync_takeovers();
            let began = slow_step("reconcile", began, &turn);
            self.update_title();
            slow_step("process title", began, &turn);
        }
    }

    /// Polls every source once; returns those that are readable.
    fn wait(&mut self, timeout: Duration) -> Vec<Source> {
        let mut sources = vec![Source::Signals];
        let mut fds = vec![PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
        for (slot, c) in &self.children {
            // First: a death notice is the earliest word of a worker's death.
            if let Some(notice) = &c.death_notice {
                sources.push(Source::DeathNotice(*slot));
                fds.push(PollFd::new(notice.as_fd(), PollFlags::POLLIN));
            }
            if let Some(ch) = &c.channel {
                sources.push(Source::Child(*slot));
                fds.push(PollFd::new(ch.as_fd(), PollFlags::POLLIN));
            }
            // Readable once it has exited (and stays so: left out once seen, see `reap`).
            if let (true, Some(pidfd), None) = (self.kernel_reaps, &c.pidfd, c.exited) {
                sources.push(Source::Exited(*slot));
                fds.push(PollFd::new(pidfd.as_fd(), PollFlags::POLLIN));
            }
        }
        if let Some(control) = &self.control {
            if let Some(fd) = control.accept_fd() {
                sources.push(Source::Control);
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
            }
            for (i, fd) in control.client_fds().enumerate() {
                sources.push(Source::ControlClient(i));
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
            }
        }
        if let Some(w) = &self.watcher {
            sources.push(Source::Watch);
            fds.push(PollFd::new(w.fd(), PollFlags::POLLIN));
        }
        if let Some(metrics) = &self.metrics {
            if let Some(fd) = metrics.accept_fd() {
                sources.push(Source::Metrics);
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
            }
            for (id, fd, events) in metrics.client_fds() {
                sources.push(Source::MetricsClient(id));
                fds.push(PollFd::new(fd, events));
            }
        }
        let ms = timeout.as_millis().min(60_000) as u16;
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) | Err(_) => Vec::new(),
            Ok(_) => fds
                .iter()
                .zip(sources)
                .filter(|(fd, _)| fd.revents().is_some_and(|r| !r.is_empty()))
                .map(|(_, s)| s)
                .collect(),
        }
    }

    fn poll_timeout(&self) -> Duration {
        // The limit checks (hang detection, max_requests, memory) run every 100 ms: wake for them.
        let mut t = Duration::from_millis(100);
        let now = Instant::now();
        if let Some(b) = self.backoff_until {
            t = t.min(b.saturating_duration_since(now));
        }
        if let Mode::Stopping { deadline, .. } = self.mode {
            t = t
                .min(deadline.saturating_duration_since(now))
                .min(Duration::from_millis(50));
        }
        if self.handshake_wait.is_some() {
            t = t.min(Duration::from_millis(5));
        }
        if let Some(due) = self.watcher.as_ref().and_then(|w| w.deadline()) {
            t = t.min(due.saturating_duration_since(now));
        }
        // A paused accept (out of descriptors) resumes on time.
        let resumes = [
            self.control.as_ref().and_then(|c| c.accept_resumes_at()),
            self.metrics.as_ref().and_then(|m| m.accept_resumes_at()),
        ];
        for at in resumes.into_iter().flatten() {
            t = t.min(at.saturating_duration_since(now));
        }
        if self.reload.is_some() || self.boot_reload.is_some() || self.preflight_running() {
            // Reloads are timed: look at their progress often.
            t = t.min(Duration::from_millis(5));
        }
        if let Some(since) = self.children.values().filter_map(|c| c.exited).max() {
            // An exit seen whose status the kernel has not stored yet (see `next_exit`): looked
            // at again after a quarter of the wait so far, between 1 and 100 ms.
            let wait =
                (since.elapsed() / 4).clamp(Duration::from_millis(1), Duration::from_millis(100));
            t = t.min(wait);
        }
        for (_, _, until) in &self.pending_takeovers {
            t = t.min(until.saturating_duration_since(now));
        }
        if let Some(due) = self.spare_refill_due() {
            t = t.min(due.saturating_duration_since(now));
        }
        t.max(Duration::from_millis(1))
    }

    fn on_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else {
                continue;
            };
            match sig {
                Signal::SIGCHLD => {} // reaped after every wake-up
                Signal::SIGINT => self.stop(false, "SIGINT"),
                Signal::SIGTERM | Signal::SIGQUIT => self.stop(true, sig.as_str()),
                Signal::SIGTTIN => {
                    self.scale(self.target + 1, "SIGTTIN");
                }
                Signal::SIGTTOU => {
                    self.scale(self.target.saturating_sub(1), "SIGTTOU");
                }
                Signal::SIGUSR1 => {
                    let _ = self.reopen_logs();
                }
                Signal::SIGUSR2 => self.refork(None, "SIGUSR2"),
                Signal::SIGHUP => self.reload(None, "SIGHUP"),
                _ => {}
            }
        }
    }

    /// Changes the number of workers, within 1..=max_workers. Returns the new target.
    pub(crate) fn scale(&mut self, n: usize, why: &str) -> usize {
        if self.mode != Mode::Running {
            return self.target;
        }
        let n = n.clamp(1, self.config.max_workers);
        if n != self.target {
            tracing::info!(from = self.target, to = n, "{why}: scaling");
            self.events
                .push("scale", format!("workers {} -> {n} ({why})", self.target));
            self.target = n;
        }
        n
    }

    /// Starts a graceful or quick stop of the whole tree.
    pub(crate) fn stop(&mut self, graceful: bool, why: &str) {
        if let Mode::Stopping {
            graceful: was_graceful,
            ..
        } = self.mode
        {
            if was_graceful && !graceful {
                tracing::info!("{why}: quick stop");
            } else {
                return;
            }
        } else {
            tracing::info!(graceful, "{why}: stopping");
        }
        systemd::notify_stopping();
        // No spare takes a place on its own any more: the monitor decides everything now.
        self.close_takeovers();
        self.finish_reload(Err("the server is stopping".into()));
        self.drop_rollout("the server is stopping");
        let wait = if graceful {
            self.config.graceful_timeout
        } else {
            Duration::from_secs(1)
        };
        self.mode = Mode::Stopping {
            graceful,
            deadline: Instant::now() + wait,
        };
        // Nothing will accept again. First no new connection may join a queue (before any child
        // hears of the stop and takes its queue for the last time): whichever process lets go
        // of a socket last, the mold included, would reset what joined after that last take,
        // requests already written. A systemd socket unit keeps its own copy, queuing new
        // connections for the next start: its sockets are left as they are. Then the socket
        // closes as the children stop listening, and a new connect is refused.
        for l in self.own_listeners() {
            if let Err(e) = l.refuse_new_connections() {
                tracing::warn!(error = %e, listener = %l.addr(), "cannot stop new connections from queuing");
            }
        }
        let tcp: Vec<std::net::SocketAddr> = self
            .own_listeners()
            .filter_map(Listener::tcp_local_addr)
            .collect();
        for l in &self.listeners {
            if let Err(e) = l.close_in_place() {
                tracing::warn!(error = %e, listener = %l.addr(), "cannot close the listener");
            }
        }
        // A handshake the kernel answered before the filter completes when the client's ACK
        // arrives, a round trip later: if every worker had taken its queue for the last time by
        // then, that connection (its request maybe already sent) would be reset. The workers go
        // on accepting until no handshake is under way (bounded).
        self.handshake_wait = None;
        if graceful {
            let under_way = handshakes_under_way(&tcp);
            if under_way > 0 {
                tracing::info!(
                    handshakes = under_way,
                    "waiting for the TCP handshakes under way before stopping the children"
                );
                self.handshake_wait = Some((Instant::now() + HANDSHAKE_WAIT, tcp));
                return;
            }
        }
        self.stop_children(graceful);
    }

    /// The listeners that are tine's own (bound from `listen`), not systemd's.
    fn own_listeners(&self) -> impl Iterator<Item = &Listener> {
        self.listeners
            .iter()
            .zip(&self.from_systemd)
            .filter(|(_, from_systemd)| !**from_systemd)
            .map(|(l, _)| l)
    }

    /// Tells every child to stop (graceful), or sends it SIGTERM (quick).
    fn stop_children(&mut self, graceful: bool) {
        let slots: Vec<usize> = self.children.keys().copied().collect();
        for slot in slots {
            if graceful {
                self.retire(slot, "stop");
            } else if let Some(c) = self.children.get_mut(&slot) {
                let _ = c.signal(Signal::SIGTERM, self.kernel_reaps);
            }
        }
    }

    /// A graceful stop waiting for handshakes (see `stop`): tells the children once none is under
    /// way, or at the wait's end.
    fn check_handshake_wait(&mut self) {
        let Some((until, addrs)) = &self.handshake_wait else {
            return;
        };
        let left = handshakes_under_way(addrs);
        let timed_out = Instant::now() >= *until;
        if left > 0 && !timed_out {
            return;
        }
        if left > 0 {
            tracing::warn!(
                handshakes = left,
                "stopping the children with TCP handshakes still under way"
            );
        }
        self.handshake_wait = None;
        self.stop_children(true);
    }

    /// Asks a child to stop gracefully; it is killed if still alive after graceful_timeout.
    pub(crate) fn retire(&mut self, slot: usize, reason: &str) {
        let grace = self.config.graceful_timeout;
        let Some(c) = self.children.get_mut(&slot) else {
            return;
        };
        if c.is_retiring() {
            return;
        }
        // No spare takes its place on its own from now on; and a spare that has just taken a
        // dead worker's place is a worker now (ratified when that death is handled), not a spare
        // to retire, unless everything stops.
        match c.kind {
            Kind::Worker => self.board.close_takeover(slot),
            Kind::Spare if !self.board.disarm_standby(slot) && self.mode == Mode::Running => {
                return;
            }
            _ => {}
        }
        tracing::info!(
            nr = c.log_nr(),
            pid = c.pid_raw(),
            generation = c.generation,
            reason,
            "retiring {}",
            c.kind.name()
        );
        let sent = c
            .channel
            .as_ref()
            .is_some_and(|ch| ch.send(&Command::Stop { graceful: true }, &[]).is_ok());
        if !sent {
            let _ = c.signal(Signal::SIGTERM, self.kernel_reaps);
        }
        if c.kind == Kind::Spare {
            // A spare standing by reads its channel when this word moves (`worker::takeover`).
            self.board.bump_roster();
        }
        c.phase = Phase::Retiring {
            reason: reason.to_string(),
            kill_at: Instant::now() + grace,
        };
    }

    /// Kills a child at once, logging why.
    pub(crate) fn kill_child(&mut self, slot: usize, reason: &str) {
        let Some(c) = self.children.get_mut(&slot) else {
            return;
        };
        if let (Some((killed_at, times)), Some(_)) = (c.killed, c.pid) {
            // Killed before and still not reaped: its exit is stuck in the kernel (a SIGKILL
            // cannot hurry a process that is already exiting). Again, in case it was not; said
            // every tenth time, not every second, with the reason it was first killed for.
            let _ = c.signal(Signal::SIGKILL, self.kernel_reaps);
            c.killed = Some((killed_at, times + 1));
            if times % 10 == 0 {
                tracing::warn!(
                    nr = c.log_nr(),
                    pid = c.pid_raw(),
                    generation = c.generation,
                    waited_ms = killed_at.elapsed().as_millis() as u64,
                    "{} still not gone after SIGKILL: the kernel has not finished its exit",
                    c.kind.name()
                );
            }
            if let Phase::Retiring { kill_at, .. } = &mut c.phase {
                *kill_at = Instant::now() + Duration::from_secs(1);
            }
            return;
        }
        // The oldest request in flight, from the scoreboard (only if the slot is this child's).
        let request = self
            .board
            .read(slot)
            .filter(|v| v.in_flight > 0 && c.pid.is_some_and(|p| p.as_raw() == v.pid))
            .map(|v| v.request)
            .unwrap_or_else(|| "none".into());
        tracing::warn!(
            nr = c.log_nr(),
            pid = c.pid_raw(),
            generation = c.generation,
            reason,
            request = %request,
            "killing {}",
            c.kind.name()
        );
        self.events.push(
            "kill",
            format!(
                "killed {} pid {}: {reason} (request in flight: {request})",
                c.label(),
                c.pid_raw()
            ),
        );
        match c.pid {
            Some(_) => {
                let _ = c.signal(Signal::SIGKILL, self.kernel_reaps);
                c.killed = Some((Instant::now(), 1));
                // Killed again (and logged again) only if it is somehow still there in a second.
                c.phase = Phase::Retiring {
                    reason: reason.to_string(),
                    kill_at: Instant::now() + Duration::from_secs(1),
                };
            }
            None => {
                // Requested from the mold but never reported: forget it.
                self.children.remove(&slot);
                self.board.clear(slot);
            }
        }
    }

    /// `SIGUSR2` and `tine ctl refork`. A `ctl refork` client (`waiter`) is answered when the
    /// new generation serves (its first worker is ready) or the refork fails.
    pub(crate) fn refork(&mut self, waiter: Option<std::os::unix::net::UnixStream>, why: &str) {
        tracing::info!("{why}: refork requested");
        match refork::request_refork(self) {
            Ok(()) => {
                self.events
                    .push("refork", format!("refork requested ({why})"));
                if let (Some(w), Some(r)) = (waiter, &mut self.rollout) {
                    r.waiters.push(w);
                }
            }
            Err(e) => {
                tracing::warn!("{why}: refork refused: {e}");
                self.events
                    .push("refork", format!("refork refused ({why}): {e}"));
                if let Some(w) = waiter {
                    let _ =
                        crate::ctl::protocol::send_reply(w, Err(format!("refork refused: {e}")));
                }
            }
        }
    }

    fn on_child_readable(&mut self, slot: usize) {
        // At most a batch per wake-up: a child that sends without pause must not keep the
        // monitor from everything else (the rest is read on the next turn of the loop).
        for _ in 0..64 {
            let Some(c) = self.children.get_mut(&slot) else {
                return;
            };
            let Some(ch) = &c.channel else { return };
            match ch.recv::<Report>(false) {
                Ok(Some(r)) => {
                    let fd = r.fds.into_iter().next();
                    self.on_report(slot, r.msg, fd)
                }
                Ok(None) => {
                    // The child closed its end: it is exiting. SIGCHLD (and its pidfd) follows, a
                    // little later (the kernel closes a process's files before it tells its
                    // parent).
                    let closed_us = crate::log::monotonic_us();
                    let (pid, woke_us, woke_cpu_us) = (c.pid_raw(), self.woke_us, self.woke_cpu_us);
                    self.channel_closed(slot);
                    tracing::debug!(
                        target: "tine::respawn",
                        child = pid,
                        woke_us,
                        woke_cpu_us,
                        closed_us,
                        "channel closed"
                    );
                    return;
                }
                Err(ChannelError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(ChannelError::Io(e)) => {
                    // ECONNRESET and the like: the child is gone (killed with unread packets), not
                    // misbehaving. SIGCHLD follows; the reason it was ended is kept.
                    tracing::debug!(slot, error = %e, "child channel closed");
                    self.channel_closed(slot);
                    return;
                }
                Err(ChannelError::Decode(crate::ipc::message::DecodeError::Version(v))) => {
                    tracing::warn!(
                        slot,
                        version = v,
                        "child speaks another wire version; retiring it"
                    );
                    self.retire(slot, "wire version");
                    return;
                }
                Err(e) => {
                    // Broken peer: replace it, never trust it again.
                    c.channel = None;
                    let reason = format!("malformed message: {e}");
                    self.kill_child(slot, &reason);
                    return;
                }
            }
        }
    }

    /// The death notice of the child in `slot` hung up (see `worker::sentinel`): nothing is sent
    /// on it, so it is readable only once the thread holding its other end is gone, which happens
    /// when the process exits, before its channel closes (or when a worker being promoted to mold
    /// ends it: ignored). A serving worker's place is taken at once by a ready spare; its channel
    /// is still read for what it said before it went, and its reaping follows as for any death.
    fn on_death_notice(&mut self, slot: usize) {
        let Some(c) = self.children.get_mut(&slot) else {
            return;
        };
        // Readable means hung up only if there is nothing to read: a worker that wrote on it (it
        // never should) is not taken for dead; its notice is dropped and its channel tells.
        if let Some(notice) = &c.death_notice {
            use std::os::fd::AsRawFd;
            let flags =
                nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
            match nix::sys::socket::recv(notice.as_raw_fd(), &mut [0u8; 1], flags) {
                Ok(0) => {}
                Err(nix::errno::Errno::EAGAIN) => return,
                Ok(_) | Err(_) => {
                    tracing::warn!(
                        pid = c.pid_raw(),
                        "a worker's death notice carried data instead of hanging up; ignored"
                    );
                    c.death_notice = None;
                    return;
                }
            }
        }
        c.death_notice = None;
        let (active, nr) = (c.is_active_worker(), c.nr);
        let taken = self.settle_or_await_takeover(slot, nr);
        let Some(c) = self.children.get_mut(&slot) else {
            return;
        };
        if !active && !taken {
            return;
        }
        c.dying = true;
        // Only its exit hangs it up, but a worker could also close it by lying (a descriptor of
        // its own in `Hello`): it is gone either way. (A SIGKILL changes nothing for a process
        // already exiting: its exit status stays, and a core dump was written before its
        // threads could exit.)
        let _ = c.signal(Signal::SIGKILL, self.kernel_reaps);
        let (nr, pid) = (c.nr, c.pid_raw());
        let (woke_us, woke_cpu_us) = (self.woke_us, self.woke_cpu_us);
        if !taken {
            self.replace_at_once(nr);
        }
        tracing::debug!(
            target: "tine::respawn",
            child = pid,
            woke_us,
            woke_cpu_us,
            "death notice"
        );
    }

    /// The child in `slot` closed its channel: it is exiting. A serving worker's place is taken
    /// at once by a ready spare.
    fn channel_closed(&mut self, slot: usize) {
        let Some(c) = self.children.get_mut(&slot) else {
            return;
        };
        let (was_active, nr) = (c.is_active_worker(), c.nr);
        c.channel = None;
        if self.settle_or_await_takeover(slot, nr) {
            return;
        }
        if was_active {
            self.replace_at_once(nr);
        }
    }

    /// Acts on a child's report; `fd` is the descriptor that came with it, if any.
    fn on_report(&mut self, slot: usize, report: Report, fd: Option<std::os::fd::OwnedFd>) {
        let Some(c) = self.children.get_mut(&slot) else {
            return;
        };
        match report {
            Report::Hello { pid } => {
                if c.pid.is_none() && pid > 1 {
                    c.pid = Some(Pid::from_raw(pid));
                }
                // A worker's or spare's death notice (a mold sends none). Only the first.
                if c.kind != Kind::Mold && c.death_notice.is_none() {
                    c.death_notice = fd;
                }
            }
            Report::Ready => {
                if c.phase == Phase::Starting || c.phase == Phase::Promoting {
                    let was_promoting = c.phase == Phase::Promoting;
                    let elapsed = c.started.elapsed();
                    c.phase = Phase::Ready;
                    let label = if was_promoting {
                        format!(
                            "mold (gen:{}, promoted from worker[{}])",
                            c.promoted_generation, c.nr
                        )
                    } else {
                        c.label()
                    };
                    tracing::info!(
                        pid = c.pid_raw(),
                        elapsed_ms = elapsed.as_millis() as u64,
                        "{label} ready"
                    );
                    self.spawn_errors = 0;
                    self.resource_errors = 0;
                    if c.kind == Kind::Worker && !was_promoting {
                        self.ever_served = true;
                    }
                    if was_promoting {
                        self.board.count_refork();
                    }
                    let (kind, nr, generation, pid) = (c.kind, c.nr, c.generation, c.pid);
                    match kind {
                        // Booted and standing by: it serves once activated.
                        Kind::Spare => spares::raise_standby_priority(pid),
                        Kind::Worker if !was_promoting => {
                            self.rollout_worker_ready(generation);
                            self.retire_replaced(nr, slot);
                        }
                        _ => refork::on_mold_ready(self, slot),
                    }
                }
            }
            Report::Spawned {
                slot: worker_slot,
                request,
                pid,
            } => {
                let (worker_slot, pid) = (worker_slot as usize, Pid::from_raw(pid));
                if pid.as_raw() <= 1 || !self.answers_spawn(slot, worker_slot, request, Some(pid)) {
                    self.stray_spawn_report(slot, "Spawned", worker_slot, request);
                    return;
                }
                if let Some(w) = self.children.get_mut(&worker_slot) {
                    w.pid = Some(pid);
                    // Its pidfd, opened by its parent (the middle process) while no one could
                    // have reaped it; taken if it names the pid reported.
                    if w.pidfd.is_none() {
                        w.pidfd = fd.filter(|fd| crate::sys::pidfd::names(fd.as_fd(), pid));
                    }
                }
            }
            Report::SpawnFailed {
                slot: worker_slot,
                request,
                error,
            } => {
                // Only the mold asked, about a request still pending, can report its failure: a
                // slot of a running process named here is a confused mold, and a report from
                // anyone else (a worker runs the app) must not count towards giving up.
                let worker_slot = worker_slot as usize;
                if !self.answers_spawn(slot, worker_slot, request, None) {
                    self.stray_spawn_report(slot, "SpawnFailed", worker_slot, request);
                    return;
                }
                tracing::error!(error, "mold could not fork a worker");
                let resource = rollout::is_resource_error_text(&error);
                self.children.remove(&worker_slot);
                self.board.clear(worker_slot);
                self.spawn_failed(error, resource);
            }
            Report::Exiting { reason } => {
                tracing::warn!(reason, "{} exiting", c.label());
                c.exit_reason = Some(reason.clone());
                self.last_spawn_error = reason;
            }
            Report::PromotionFailed { reason } => {
                tracing::warn!(reason, "{} cannot be promoted", c.label());
                refork::on_promotion_failed(self, slot, &reason);
            }
            Report::ProfilerReady
            | Report::ProfileStarted { .. }
            | Report::ProfileWritten { .. }
            | Report::ProfileFailed { .. } => self.on_profile_report(slot, report),
        }
    }

    /// Whether a spawn report from the mold in `mold_slot` about `request` answers the worker in
    /// `worker_slot`, asked of that mold with that request: the only spawn report that counts.
    /// The worker must not be forked yet, or, for a `Spawned` naming `reported`, may already
    /// be named so by its own `Hello`.
    fn answers_spawn(
        &self,
        mold_slot: usize,
        worker_slot: usize,
        request: u64,
        reported: Option<Pid>,
    ) -> bool {
        let from_a_mold = self
            .children
            .get(&mold_slot)
            .is_some_and(|m| m.kind == Kind::Mold);
        from_a_mold
            && self.children.get(&worker_slot).is_some_and(|w| {
                matches!(w.kind, Kind::Worker | Kind::Spare)
                    && (w.pid.is_none() || (reported.is_some() && w.pid == reported))
                    && w.request == request
                    && w.requested_from == Some(mold_slot)
            })
    }

    /// A spawn report from a child that was not asked, or about no pending request: ignored, and
    /// logged once per child (a compromised worker could otherwise flood the log).
    fn stray_spawn_report(&mut self, from: usize, what: &str, worker_slot: usize, request: u64) {
        let Some(c) = self.children.get_mut(&from) else {
            return;
        };
        if std::mem::replace(&mut c.stray_report_logged, true) {
            return;
        }
        tracing::warn!(
            pid = c.pid_raw(),
            slot = worker_slot,
            request,
            "ignoring a {what} report from {} about no spawn request pending with it (logged once per process)",
            c.label()
        );
    }

    /// A new worker `nr` is ready: retire the worker it replaces, if any.
    fn retire_replaced(&mut self, nr: u32, new_slot: usize) {
        let old = self
            .children
            .iter()
            .find(|(s, c)| {
                **s != new_slot
                    && c.kind == Kind::Worker
                    && c.nr == nr
                    && c.recycle.is_some()
                    && !c.is_retiring()
            })
            .map(|(s, c)| (*s, c.recycle.clone().unwrap_or_default()));
        if let Some((slot, reason)) = old {
            if reason == children::PROMOTE {
                refork::promote(self, slot);
            } else {
                self.retire(slot, &reason);
            }
        }
    }

    /// A start failed. For lack of resources (`resource`: EAGAIN, ENOMEM, EMFILE, ENFILE) it is
    /// only retried after a capped backoff; otherwise it also counts towards giving up (while no
    /// worker serves) and against a rollout on trial.
    fn spawn_failed(&mut self, error: String, resource: bool) {
        if resource {
            self.resource_errors = self.resource_errors.saturating_add(1);
            self.resource_errors_total += 1;
            let delay = spawn_backoff(self.resource_errors);
            tracing::warn!(
                error,
                retry_in_ms = delay.as_millis() as u64,
                "a start failed for lack of resources; retrying (not counted as a failure)"
            );
            self.backoff_until = Some(Instant::now() + delay);
            return;
        }
        self.spawn_errors = self.spawn_errors.saturating_add(1);
        self.last_spawn_error = error.clone();
        self.backoff_until = Some(Instant::now() + spawn_backoff(self.spawn_errors));
        if self.spawn_errors == self.config.max_consecutive_spawn_errors && self.ever_served {
            let serving = self.serving();
            tracing::error!(
                errors = self.spawn_errors,
                serving,
                error,
                "{}",
                if serving > 0 {
                    "max_consecutive_spawn_errors reached, but workers still serve: staying, retrying every few seconds"
                } else {
                    "max_consecutive_spawn_errors reached with no worker serving, but this tree has served: staying, retrying every few seconds"
                }
            );
        } else if self.ever_served
            && self.spawn_errors > self.config.max_consecutive_spawn_errors
            && self.spawn_errors % 10 == 0
        {
            tracing::error!(
                errors = self.spawn_errors,
                serving = self.serving(),
                error,
                "starts keep failing: still retrying every few seconds"
            );
        }
        self.rollout_failure(&error);
    }

    /// Runs `f` while the kernel keeps exited children as zombies, for `waitpid` (`next_exit`):
    /// around a fork or spawn and the opening of the new child's pidfd, so that a child that exits
    /// at once keeps its pid (the pidfd names it, or fails) and its status; and before a reload's
    /// re-exec, whose next image has none of this one's pidfds.
    pub(crate) fn with_children_kept<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        if !self.kernel_reaps {
            return f(self);
        }
        let kept = crate::sys::pidfd::keep_children_for_waitpid().is_ok();
        let done = f(self);
        if kept {
            if let Err(e) = crate::sys::pidfd::let_kernel_reap_children() {
                tracing::error!(error = %e, "cannot give the kernel the reaping of children back");
            }
        }
        done
    }

    /// Workers serving now.
    fn serving(&self) -> usize {
        self.children
            .values()
            .filter(|c| c.kind == Kind::Worker && c.phase == Phase::Ready)
            .count()
    }

    /// Handles every child that exited: logs why, counts failed starts, replaces it.
    ///
    /// Exits come from `waitpid` where the monitor reaps its children, and from their pidfds
    /// where the kernel does (`kernel_reaps`). `waitpid` is asked in both cases: across a
    /// reload's re-exec, until the new image asks the kernel to reap, a child that dies stays a
    /// zombie for it to collect.
    fn reap(&mut self) {
        while let Some(exit) = self.next_exit() {
            self.on_exit(exit);
        }
    }

    /// The next exit to handle, if any.
    fn next_exit(&mut self) -> Option<Exit> {
        if let Some((pid, raw)) = crate::sys::process::reap_any_child() {
            return Some(Exit {
                pid,
                slot: None,
                how: Ok(raw),
            });
        }
        if !self.kernel_reaps {
            return None;
        }
        self.read_preflight_exit();
        let unwatched_gone =
            |c: &Child| c.pidfd.is_none() && c.pid.is_some() && c.channel.is_none();
        if self.children.values().any(unwatched_gone) {
            // Its pidfd may be in a mold's `Spawned`, not read yet.
            self.read_spawn_reports();
        }
        for (slot, c) in self.children.iter_mut() {
            let Some(pid) = c.pid else { continue };
            let how = match (&c.pidfd, c.exited) {
                (Some(fd), Some(since)) => match crate::sys::pidfd::exit_status(fd.as_fd()) {
                    Ok(Some(raw)) => Ok(raw),
                    // Dead, being released: the kernel stores the status as it releases the
                    // process, in the process's last thread, which may wait for a CPU on a
                    // saturated machine; `poll_timeout` looks again, less and less often. Not
                    // for ever: a process held by a tracer (strace -f) is released when the
                    // tracer lets it go.
                    Ok(None) if since.elapsed() < EXIT_STATUS_PATIENCE => continue,
                    Ok(None) => Err(format!(
                        "exit status not stored by the kernel within {} s",
                        EXIT_STATUS_PATIENCE.as_secs()
                    )),
                    Err(e) => Err(format!("exit status unreadable: {e}")),
                },
                (Some(_), None) => continue,
                // Never watched (no pidfd could be had for it): gone once its channel closed
                // and it is no longer our child.
                (None, _)
                    if c.channel.is_none() && !crate::sys::process::is_unreaped_child(pid) =>
                {
                    Err("exit status unknown: the monitor had no pidfd for it".to_string())
                }
                (None, _) => continue,
            };
            c.pidfd = None;
            c.exited = None;
            return Some(Exit {
                pid,
                slot: Some(*slot),
                how,
            });
        }
        None
    }

    /// Reads what names a new worker and carries its pidfd, before the loop would: the molds'
    /// `Spawned` and the `Hello` of workers not named yet.
    fn read_spawn_reports(&mut self) {
        let unsure: Vec<usize> = self
            .children
            .iter()
            .filter(|(_, c)| c.kind == Kind::Mold || c.pid.is_none())
            .map(|(s, _)| *s)
            .collect();
        for s in unsure {
            self.on_child_readable(s);
        }
    }

    /// Handles one child's exit.
    fn on_exit(&mut self, exit: Exit) {
        let Exit { pid, slot, how } = exit;
        let how = match how {
            Ok(raw) => {
                // Only an exit `waitpid` gave can be the preflight's (which has a pidfd of
                // its own, read by `read_preflight_exit`).
                let status = std::os::unix::process::ExitStatusExt::from_raw(raw);
                if slot.is_none() && self.preflight_exited(pid, status) {
                    return;
                }
                describe_wait_status(raw)
            }
            Err(unknown) => unknown,
        };
        // From a pidfd the slot is known; a pid may already name another process.
        let mut found = slot.or_else(|| self.slot_of(pid));
        if found.is_none() {
            // A worker that died at once may be reaped before the packet naming it was read.
            self.read_spawn_reports();
            found = self.slot_of(pid);
        }
        let Some(slot) = found else {
            if let Some(i) = self.dead_holders.iter().position(|(p, _)| *p == pid) {
                self.dead_holders.swap_remove(i);
                tracing::debug!(
                    pid = pid.as_raw(),
                    how,
                    "reaped the holder of a dead worker's memory"
                );
            } else {
                tracing::info!(pid = pid.as_raw(), how, "reaped an orphan");
            }
            return;
        };
        // What it said before it went (its reason for exiting) is still in its channel.
        self.on_child_readable(slot);
        let Some(c) = self.children.remove(&slot) else {
            return;
        };
        self.note_dead_holder(slot);
        if self.settle_or_await_takeover(slot, c.nr) {
            // A spare took its place on its own, or is taking it (seen only now: nothing else
            // told of it, or the monitor's turn came after the whole exit).
        } else if c.is_active_worker() {
            // Its channel was not seen closed: its place is taken now.
            self.replace_at_once(c.nr);
        }
        tracing::debug!(
            target: "tine::respawn",
            child = pid.as_raw(),
            woke_us = self.woke_us,
            reaped_us = crate::log::monotonic_us(),
            "{} reaped",
            c.label()
        );
        // (A slot whose takeover is pending is cleared once it is settled.)
        if !self.pending_takeovers.iter().any(|p| p.0 == slot) {
            self.board.clear(slot);
        }
        let expected = c.is_retiring() || self.mode != Mode::Running;
        let reason = match &c.phase {
            Phase::Retiring { reason, .. } => reason.clone(),
            _ => "died".to_string(),
        };
        if expected {
            tracing::info!(
                pid = pid.as_raw(),
                nr = c.log_nr(),
                generation = c.generation,
                reason,
                how,
                "{} exited",
                c.kind.name()
            );
        } else {
            tracing::warn!(
                pid = pid.as_raw(),
                nr = c.log_nr(),
                generation = c.generation,
                how,
                "{} died",
                c.kind.name()
            );
            self.events.push(
                "died",
                format!("{} pid {} died ({how})", c.label(), pid.as_raw()),
            );
        }
        if self.mode == Mode::Running {
            // Keyed by the reason's kind ("rollout to gen:7" counts as rollout_to_gen), so
            // the map stays bounded however many generations go by.
            let label = metrics::reason_label(if expected { &reason } else { "died" });
            *self.restarts.entry(label).or_default() += 1;
            if c.phase == Phase::Starting {
                let why = match &c.exit_reason {
                    Some(reason) => format!(": {reason}"),
                    None => String::new(),
                };
                // A worker that could not build its runtime for lack of resources is
                // retried with backoff, like a fork that failed with EAGAIN, never counted.
                let resource = c
                    .exit_reason
                    .as_deref()
                    .is_some_and(rollout::is_resource_exit);
                self.spawn_failed(
                    format!("{} exited before it was ready ({how}){why}", c.label()),
                    resource,
                );
            }
            let new_worker_died = c.kind == Kind::Worker
                && c.phase == Phase::Ready
                && self
                    .rollout
                    .as_ref()
                    .is_some_and(|r| r.generation == c.generation);
            if new_worker_died {
                // A deploy that boots but crashes under traffic fails its rollout too.
                self.rollout_failure(&format!("{} died after it was ready ({how})", c.label()));
            }
            if let Some(r) = &mut self.rollout {
                if c.phase == Phase::Promoting {
                    r.last_error = format!("{} died while being promoted ({how})", c.label());
                } else if c.kind == Kind::Mold
                    && c.generation == r.generation
                    && c.phase != Phase::Starting
                {
                    r.last_error = format!("{} died ({how})", c.label());
                }
            }
        }
    }

    fn slot_of(&self, pid: Pid) -> Option<usize> {
        self.children
            .iter()
            .find(|(_, c)| c.pid == Some(pid))
            .map(|(s, _)| *s)
    }

    fn free_slot(&self) -> Option<usize> {
        (0..self.board.capacity()).find(|s| {
            !self.children.contains_key(s) && !self.pending_takeovers.iter().any(|p| p.0 == *s)
        })
    }

    /// The mold that new workers come from: the newest ready one.
    pub(crate) fn current_mold(&self) -> Option<(usize, &Child)> {
        self.children
            .iter()
            .filter(|(_, c)| c.kind == Kind::Mold && c.phase == Phase::Ready)
            .max_by_key(|(_, c)| c.generation)
            .map(|(s, c)| (*s, c))
    }

    /// Compares the table with the target and acts: get a mold, start missing workers, retire
    /// extra ones, kill what outlived its deadline.
    fn reconcile(&mut self) -> Result<(), MonitorError> {
        let now = Instant::now();
        // Deadlines: retiring children past their grace, children that never got ready.
        let overdue: Vec<(usize, String)> = self
            .children
            .iter()
            .filter_map(|(s, c)| match &c.phase {
                Phase::Retiring { kill_at, reason } if now >= *kill_at && c.pid.is_some() => {
                    let grace = if reason == "timeout" {
                        "timeout_cleanup"
                    } else {
                        "graceful_timeout"
                    };
                    Some((*s, format!("{reason}: still alive after {grace}")))
                }
                Phase::Starting | Phase::Promoting
                    if c.started.elapsed() > self.config.spawn_timeout =>
                {
                    Some((*s, "not ready within spawn_timeout".to_string()))
                }
                // Asked of a mold that died before reporting the fork: the worker may still
                // exist and say hello on its channel (its after-fork sequence waits up to 2 s to
                // be re-parented), so its slot is kept that long, then given up.
                Phase::Starting
                    if c.pid.is_none()
                        && c.started.elapsed() > ORPHANED_SPAWN_GRACE
                        && !self.children.values().any(|m| {
                            m.kind == Kind::Mold && m.generation == c.generation && !m.is_retiring()
                        }) =>
                {
                    Some((*s, "its mold died before reporting it".to_string()))
                }
                _ => None,
            })
            .collect();
        for (slot, reason) in overdue {
            // A process already killed once that is no longer our child was reaped unnoticed:
            // forget it rather than signal its pid, which may belong to someone else by now.
            let gone = self.children.get(&slot).is_some_and(|c| {
                c.is_retiring()
                    && c.pid
                        .is_some_and(|p| !crate::sys::process::is_unreaped_child(p))
            });
            if gone {
                self.children.remove(&slot);
                self.board.clear(slot);
                continue;
            }
            let starting = self.children.get(&slot).is_some_and(|c| !c.is_retiring());
            self.kill_child(slot, &reason);
            if starting {
                self.spawn_failed(reason, false);
            }
        }
        if self.mode != Mode::Running {
            return Ok(());
        }
        // A start-up that never works ends; a tree that has served (since this image started)
        // stays and keeps trying, with capped backoff, even while no worker serves: its workers
        // may all have died of something passing (the OOM killer), and ending the monitor would
        // turn that into an outage no one restarts.
        if self.spawn_errors >= self.config.max_consecutive_spawn_errors
            && self.serving() == 0
            && !self.ever_served
        {
            let error = MonitorError::SpawnErrors(self.spawn_errors, self.last_spawn_error.clone());
            tracing::error!("{error}");
            self.stop(false, "spawn errors");
            self.kill_everything();
            return Err(error);
        }
        if self.backoff_until.is_some_and(|b| now < b) {
            return Ok(());
        }
        self.backoff_until = None;
        if self.current_mold().is_none() {
            self.activate_spares_without_mold();
        }
        // A mold, always.
        let has_mold = self
            .children
            .values()
            .any(|c| c.kind == Kind::Mold && !c.is_retiring());
        if !has_mold {
            if let Err(e) = (self.spawn_mold)(self, 0) {
                tracing::error!(error = %e, "cannot fork the mold");
                self.spawn_failed(e.to_string(), rollout::is_resource_error(&e));
            }
            return Ok(());
        }
        // Retire extra workers: the highest numbers first.
        let mut active: Vec<(u32, usize)> = self
            .children
            .iter()
            .filter(|(_, c)| c.is_active_worker())
            .map(|(s, c)| (c.nr, *s))
            .collect();
        active.sort();
        while active.len() > self.target {
            let (_, slot) = active.pop().expect("non-empty");
            self.retire(slot, "scaled down");
        }
        if active.len() >= self.target {
            self.release_unreplaced(&active);
        }
        // Start missing workers from the current mold.
        let Some((mold_slot, mold)) = self.current_mold() else {
            return Ok(());
        };
        let generation = mold.generation;
        let mut used: Vec<u32> = active.iter().map(|(nr, _)| *nr).collect();
        let mut running = active.len();
        // A spare is taking these places on its own.
        for (_, nr, _) in &self.pending_takeovers {
            if !used.contains(nr) {
                used.push(*nr);
                running += 1;
            }
        }
        if self.reload.is_some()
            && self.config.reload_strategy == crate::config::ReloadStrategy::RetireFirst
        {
            // Memory stays flat: a worker retired by the rollout is replaced once it is gone.
            let leaving = self
                .children
                .values()
                .filter(|c| c.kind == Kind::Worker && c.is_retiring() && c.generation < generation);
            for c in leaving {
                used.push(c.nr);
                running += 1;
            }
        }
        let mut missing: Vec<u32> = (0..self.target as u32)
            .filter(|nr| !used.contains(nr))
            .collect();
        missing.truncate(self.target.saturating_sub(running));
        for nr in missing {
            // A spare took (or is taking) the place of the worker leaving on its own.
            if self.takeover_covers(nr) {
                continue;
            }
            // A hot spare takes over at once; a new one is requested below.
            let oldest = self.spare_generation_for(nr, generation);
            if self.activate_spare(nr, oldest) {
                continue;
            }
            if self.free_slot().is_none() {
                // Every slot is taken by a process still leaving (a wide rollout): wait for one,
                // which is not a failed spawn.
                break;
            }
            if let Err(e) = self.request_child(mold_slot, Kind::Worker, nr, generation) {
                tracing::error!(error = %e, nr, "cannot request a worker");
                self.spawn_failed(e.to_string(), rollout::is_resource_error(&e));
                break;
            }
        }
        if self.backoff_until.is_none() {
            self.keep_spares(mold_slot);
        }
        self.announce_ready();
        Ok(())
    }

    /// Workers marked for replacement (a rollout, a limit, a promotion) with no replacement under
    /// way while the `active` workers already make the target — it went down after they were
    /// marked — would wait for ever, and hold up a rollout with them: each leaves now (retires, or
    /// is promoted), since the target needs no replacement.
    fn release_unreplaced(&mut self, active: &[(u32, usize)]) {
        let waiting: Vec<(usize, u32, String)> = self
            .children
            .iter()
            .filter(|(_, c)| {
                c.kind == Kind::Worker
                    && c.phase == Phase::Ready
                    && !active.iter().any(|(nr, _)| *nr == c.nr)
            })
            .filter_map(|(s, c)| Some((*s, c.nr, c.recycle.clone()?)))
            .collect();
        for (slot, nr, reason) in waiting {
            tracing::info!(
                nr,
                reason,
                target = self.target,
                "a worker marked for replacement needs none (the target is met): it leaves now"
            );
            if reason == children::PROMOTE {
                refork::promote(self, slot);
            } else {
                self.retire(slot, &reason);
            }
        }
    }

    fn announce_ready(&mut self) {
        if self.announced_ready {
            return;
        }
        let ready = self
            .children
            .values()
            .filter(|c| c.kind == Kind::Worker && c.phase == Phase::Ready)
            .count();
        if ready >= self.target {
            self.announced_ready = true;
            let addrs: Vec<String> = self
                .listeners
                .iter()
                .map(|l| l.addr().to_string())
                .collect();
            tracing::info!(workers = ready, listen = addrs.join(","), "tine ready");
            systemd::notify_ready(self, "ready");
        }
    }

    fn update_title(&mut self) {
        let generation = self.current_mold().map(|(_, m)| m.generation).unwrap_or(0);
        let ready = self
            .children
            .values()
            .filter(|c| c.kind == Kind::Worker && c.phase == Phase::Ready)
            .count();
        let title = format!(
            "tine monitor (gen:{generation} workers:{ready}/{})",
            self.target
        );
        if title != self.title {
            crate::sys::proctitle::set(&title);
            self.title = title;
        }
    }

    /// Remembers the holder of the memory of the process that was in `slot`, which just exited
    /// (before the slot is cleared): the monitor adopts it and may reap it. Entries are
    /// forgotten once reaped, or after a minute (the kernel reaped it, or it was never one).
    fn note_dead_holder(&mut self, slot: usize) {
        let now = Instant::now();
        self.dead_holders
            .retain(|(_, at)| now.duration_since(*at) < Duration::from_secs(60));
        if let Some(pid) = self.board.holder(slot) {
            if self.dead_holders.len() < 1024 {
                self.dead_holders.push((Pid::from_raw(pid), now));
            }
        }
    }

    /// SIGKILLs every child, known or adopted orphan, and reaps them.
    fn kill_everything(&mut self) {
        let kernel_reaps = self.kernel_reaps;
        for (slot, c) in self.children.iter_mut() {
            if let Some(pid) = c.pid {
                let request = self
                    .board
                    .read(*slot)
                    .filter(|v| v.in_flight > 0 && v.pid == pid.as_raw())
                    .map(|v| v.request)
                    .unwrap_or_else(|| "none".into());
                tracing::warn!(
                    nr = c.log_nr(),
                    pid = pid.as_raw(),
                    generation = c.generation,
                    reason = "stopping: killing what is left",
                    request = %request,
                    "killing {}",
                    c.kind.name()
                );
                let _ = c.signal(Signal::SIGKILL, kernel_reaps);
            }
        }
        for pid in own_children() {
            let expected = self.children.values().any(|c| c.pid == Some(pid))
                || self.dead_holders.iter().any(|(p, _)| *p == pid);
            if !expected {
                tracing::warn!(
                    pid = pid.as_raw(),
                    reason = "stopping: an orphan adopted by the monitor",
                    "killing a process"
                );
            }
            kill_own_child(pid);
        }
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(5)),
                Ok(_) => {}
                Err(_) => break, // ECHILD: none left
            }
        }
        self.children.clear();
    }

    fn cleanup(&mut self) {
        for pid in own_children() {
            kill_own_child(pid);
        }
        // A socket-activated unix socket's file is systemd's: its socket unit goes on listening
        // there for the next start.
        for l in self.own_listeners() {
            l.cleanup();
        }
        if let Some(control) = self.control.take() {
            control.cleanup();
        }
        if let Some(path) = &self.pid_file {
            let _ = std::fs::remove_file(path);
        }
    }

    fn on_control(&mut self) {
        if let Some(control) = &mut self.control {
            control.accept();
        }
    }

    /// Reads from control client `i`; once its command is whole, runs it and returns it (to
    /// name the step if it was slow).
    fn on_control_client(&mut self, i: usize) -> Option<String> {
        let mut control = self.control.take()?;
        let Some(request) = control.read(i) else {
            self.control = Some(control);
            return None;
        };
        let name = match &request.command {
            Ok(c) => c.chars().take(40).collect(),
            Err(_) => "(malformed)".to_string(),
        };
        if request.command.as_deref() == Ok("reload") {
            // Answered when the reload completes or fails (possibly by the next image).
            self.control = Some(control);
            self.reload(Some(request.client), "ctl reload");
            return Some(name);
        }
        let refork = request
            .command
            .as_deref()
            .is_ok_and(|c| matches!(protocol::parse(c), Ok(Op::Refork)));
        if refork {
            // Answered when the new generation serves or the refork fails.
            self.control = Some(control);
            self.refork(Some(request.client), "ctl refork");
            return Some(name);
        }
        let profile = match request.command.as_deref().map(protocol::parse) {
            Ok(Ok(Op::Profile {
                nr,
                pid,
                seconds,
                json,
            })) => Some((nr, pid, seconds, json)),
            _ => None,
        };
        if let Some((nr, pid, seconds, json)) = profile {
            // Answered when the worker wrote the profile, failed, or exited.
            self.control = Some(control);
            self.profile(request.client, nr, pid, seconds, json);
            return Some(name);
        }
        let reply = self.run_command(request.command);
        control.reply(request.client, reply);
        self.control = Some(control);
        Some(name)
    }

    /// Runs one `ctl` command (but those the loop answers later: reload, refork, profile).
    fn run_command(&mut self, command: Result<String, String>) -> Reply {
        match protocol::parse(&command?)? {
            Op::Status { json: false } => Ok(control::status_text(&self.status())),
            Op::Status { json: true } => Ok(format!("{}\n", control::status_json(&self.status()))),
            Op::Scale(n) => {
                if n == 0 || n > self.config.max_workers {
                    return Err(format!(
                        "scale: {n} is out of range 1..={}",
                        self.config.max_workers
                    ));
                }
                let target = self.scale(n, "ctl scale");
                Ok(format!("workers: {target}\n"))
            }
            Op::Stop { quick: false } => {
                self.stop(true, "ctl stop");
                Ok("stopping\n".into())
            }
            Op::Stop { quick: true } => {
                self.stop(false, "ctl stop --quick");
                Ok("stopping quickly\n".into())
            }
            Op::KillWorker { nr, pid } => {
                let (slot, now) = self
                    .children
                    .iter()
                    .find(|(_, c)| c.kind == Kind::Worker && c.nr == nr && !c.is_retiring())
                    .map(|(s, c)| (*s, c.pid_raw()))
                    .ok_or_else(|| format!("kill-worker: no worker {nr}"))?;
                if let Some(pid) = pid.filter(|pid| *pid != now) {
                    return Err(format!(
                        "kill-worker: worker {nr} is pid {now} now, not {pid}; nothing killed"
                    ));
                }
                self.kill_child(slot, "ctl kill-worker");
                Ok(format!("killed worker {nr}\n"))
            }
            // The loop passes `refork` its connection to wait on; this is only reached for a client
            // settled just before a reload's exec, which rolls every worker over anyway.
            Op::Refork => Err("refork refused: a reload is in progress".into()),
            // Likewise: the loop keeps a `profile` client until the worker answers.
            Op::Profile { .. } => Err("profile refused: a reload is in progress".into()),
            Op::ReopenLogs => self.reopen_logs(),
        }
    }

    /// `SIGUSR1` and `ctl reopen-logs`: reopens the log file (after rotation) here and in every
    /// child, which get the new descriptor with the message.
    pub(crate) fn reopen_logs(&mut self) -> Result<String, String> {
        let Some(path) = self.config.log_file.clone() else {
            tracing::info!("reopen logs: no log_file configured; logs go to stderr");
            return Err("no log_file configured; logs go to stderr".into());
        };
        match crate::log::open_log_file(&path, self.config.run_as) {
            Ok(file) => {
                for c in self.children.values() {
                    if let Some(ch) = &c.channel {
                        let _ = ch.send(&Command::ReopenLogs, &[file.as_fd()]);
                    }
                }
                // Standing-by spares read their channel when this word moves (`worker::takeover`).
                self.board.bump_roster();
                tracing::info!(path = %path.display(), "log file reopened");
                Ok(format!("reopened {}\n", path.display()))
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot reopen the log file");
                Err(format!("cannot reopen {}: {e}", path.display()))
            }
        }
    }

    pub(crate) fn is_running(&self) -> bool {
        self.mode == Mode::Running
    }
}

/// The wait before the next start after `failures` failed ones in a row: 100 ms, doubling, at most
/// 5 s.
fn spawn_backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(6);
    Duration::from_millis(100 << exp).min(Duration::from_secs(5))
}

/// A step of the monitor's loop that takes longer than this is logged: the loop serves every
/// child, signal and `ctl` call in turn, so one step that blocks delays them all.
const SLOW_STEP: Duration = Duration::from_millis(100);

/// This thread's resource usage at the start of a turn of the loop (after `poll`), to tell in
/// a slow step's warning whether the monitor was computing, blocked, or waiting for a CPU.
fn turn_usage() -> Option<Usage> {
    getrusage(UsageWho::RUSAGE_THREAD).ok()
}

/// Logs `step` (a warning, counted in metrics) if it ran for over [`SLOW_STEP`] since `began`;
/// returns now, the start of the next step. The warning says what the monitor's thread did since
/// the turn of the loop began (`turn`): CPU time used, times it blocked (voluntary context
/// switches: a system call that waited) and times it was preempted (a busy machine).
fn slow_step(step: &str, began: Instant, turn: &Option<Usage>) -> Instant {
    let now = Instant::now();
    let took = now.duration_since(began);
    if took > SLOW_STEP {
        SLOW_STEPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (cpu_ms, blocked, preempted) = match (turn, turn_usage()) {
            (Some(a), Some(b)) => {
                let cpu = |u: &Usage| {
                    let t = u.user_time() + u.system_time();
                    t.tv_sec() * 1000 + t.tv_usec() / 1000
                };
                (
                    cpu(&b) - cpu(a),
                    b.voluntary_context_switches() - a.voluntary_context_switches(),
                    b.involuntary_context_switches() - a.involuntary_context_switches(),
                )
            }
            _ => (-1, -1, -1),
        };
        tracing::warn!(
            step,
            took_ms = took.as_millis() as u64,
            cpu_ms,
            blocked,
            preempted,
            "slow monitor step: every child, signal and ctl call waited for it (cpu_ms, blocked, preempted: since this turn of the loop began)"
        );
    }
    now
}

/// Steps of the loop that took over [`SLOW_STEP`] (`tine_monitor_slow_steps_total`).
static SLOW_STEPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Steps of the monitor's loop that took over 100 ms since it started.
pub(crate) fn slow_steps() -> u64 {
    SLOW_STEPS.load(std::sync::atomic::Ordering::Relaxed)
}

/// A child's exit, as `reap` learned it.
struct Exit {
    pid: Pid,
    /// Its slot, when the exit came from its pidfd (a pid alone may name another process by
    /// then); `None` from `waitpid`.
    slot: Option<usize>,
    /// Its wait status, or why there is none.
    how: Result<i32, String>,
}

/// A wait status in words: "exit code 3", "signal SIGKILL", "signal SIGSEGV (core dumped)",
/// "signal 40" for a signal nix has no name for (a real-time one).
fn describe_wait_status(raw: i32) -> String {
    if libc::WIFEXITED(raw) {
        return format!("exit code {}", libc::WEXITSTATUS(raw));
    }
    if libc::WIFSIGNALED(raw) {
        let number = libc::WTERMSIG(raw);
        let name = Signal::try_from(number)
            .map_or_else(|_| number.to_string(), |s| s.as_str().to_string());
        let core = if libc::WCOREDUMP(raw) {
            " (core dumped)"
        } else {
            ""
        };
        return format!("signal {name}{core}");
    }
    format!("wait status {raw:#x}")
}

/// A readable poll source.
enum Source {
    Watch,
    Signals,
    Child(usize),
    /// A worker's death notice (see `on_death_notice`).
    DeathNotice(usize),
    /// A child's pidfd: it has exited (only when the kernel reaps children).
    Exited(usize),
    Control,
    ControlClient(usize),
    Metrics,
    /// A metrics client, by its id (stable while others come and go).
    MetricsClient(u64),
}

/// The TCP handshakes under way on `addrs` (see [`queue::handshakes_under_way`]); none when the
/// kernel cannot be asked, said in the log: the stop then goes on without waiting for them.
fn handshakes_under_way(addrs: &[std::net::SocketAddr]) -> usize {
    queue::handshakes_under_way(addrs).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot count the TCP handshakes under way (sock_diag); not waiting for them");
        0
    })
}

/// Kills `pid`, listed by [`own_children`] a moment ago, if it is still a child of this process:
/// with the kernel reaping children, the pid may be free, or someone else's, by now.
fn kill_own_child(pid: Pid) {
    use std::os::fd::AsFd;
    if let Ok(fd) = crate::sys::pidfd::open_child(pid) {
        let _ = crate::sys::pidfd::send_signal(fd.as_fd(), Signal::SIGKILL);
    }
}

/// Children of this process, from `/proc/self/task/*/children`: the only way to find orphans
/// the monitor adopted as a subreaper (an app's subprocesses), so that a stop ends them too. Best
/// effort (empty without /proc); whether a known child is still ours is asked of the kernel
/// directly ([`crate::sys::process::is_unreaped_child`]), never read from here.
fn own_children() -> Vec<Pid> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse().ok())
                        .map(Pid::from_raw),
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::describe_wait_status;

    #[test]
    fn wait_statuses_read_as_words_real_time_signals_too() {
        assert_eq!(describe_wait_status(3 << 8), "exit code 3");
        assert_eq!(describe_wait_status(0), "exit code 0");
        assert_eq!(describe_wait_status(libc::SIGKILL), "signal SIGKILL");
        assert_eq!(
            describe_wait_status(libc::SIGSEGV | 0x80),
            "signal SIGSEGV (core dumped)"
        );
        let rt = libc::SIGRTMIN() + 10;
        assert_eq!(describe_wait_status(rt), format!("signal {rt}"));
    }
}
