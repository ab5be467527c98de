//! The monitor's table of children: one entry per scoreboard slot in use.

use std::time::Instant;

use nix::unistd::Pid;

use crate::ipc::channel::Channel;

/// The reason (`Child::recycle`) that marks a worker chosen for promotion: recycled by promotion
/// to mold, not retired.
pub(super) const PROMOTE: &str = "promotion to mold";

/// The role of a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Mold,
    Worker,
    /// A hot spare: a worker booted ahead of need, accepting nothing until activated (it is a
    /// `Worker` from then on).
    Spare,
}

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Mold => "mold",
            Kind::Worker => "worker",
            Kind::Spare => "spare",
        }
    }
}

/// Where a child is in its life, as the monitor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Forked or requested, not ready yet.
    Starting,
    /// Serving (worker) or able to fork (mold).
    Ready,
    /// A worker asked to become a mold.
    Promoting,
    /// Asked to stop; killed at `kill_at` if still alive.
    Retiring { reason: String, kill_at: Instant },
}

/// One child process.
#[derive(Debug)]
pub(crate) struct Child {
    /// None until the mold reports the fork (or the worker says hello).
    pub pid: Option<Pid>,
    pub kind: Kind,
    pub nr: u32,
    pub generation: u32,
    /// None once the child closed its end.
    pub channel: Option<Channel>,
    pub phase: Phase,
    pub started: Instant,
    /// Set when a limit was reached: a replacement is started, then this one is retired.
    pub recycle: Option<String>,
    /// Requests after which this worker is recycled (max_requests plus its jitter), 0 = never.
    pub max_requests: u64,
    /// When its PSS was last read (PSS is costly to read).
    pub pss_checked: Option<Instant>,
    /// The generation this worker becomes the mold of, while promoting.
    pub promoted_generation: u32,
    /// The spawn request that asked for this worker (matches the mold's report of the fork).
    pub request: u64,
    /// The slot of the mold the request was sent to: the only child whose report of it counts.
    pub requested_from: Option<usize>,
    /// Whether a spawn report this child had no business sending was already logged.
    pub stray_report_logged: bool,
    /// Why it said it was exiting (`Report::Exiting`), to explain a failed start.
    pub exit_reason: Option<String>,
    /// Speaks `SpawnSpare` and `Activate` and holds this image's listening sockets, in order: may
    /// make hot spares (a mold) or be activated as one (a spare). True for what this image forked
    /// or promoted; for what a reload adopted, only if the handover says so and the listeners are
    /// unchanged (an older build, or other listeners, would not do).
    pub knows_spares: bool,
    /// When the monitor first sent it `SIGKILL`, and how many it sent: a process the kernel is
    /// still tearing down (its exit stuck in the kernel) is killed again each second, but said so
    /// only every tenth time.
    pub killed: Option<(Instant, u32)>,
    /// A worker's death notice (`worker::sentinel`), sent with its `Hello`: hangs up when the
    /// worker starts exiting, before its channel closes.
    pub death_notice: Option<std::os::fd::OwnedFd>,
    /// Its death notice hung up while it served: it is exiting and its place was taken.
    pub dying: bool,
    /// A pidfd for it (see `crate::sys::pidfd`): signals go through it, never to a pid someone
    /// else may hold by now, and when the kernel reaps children it says how the child ended.
    pub pidfd: Option<std::os::fd::OwnedFd>,
    /// When its pidfd said it exited; its status is awaited (the kernel is still releasing it).
    pub exited: Option<Instant>,
    /// An activated spare: when the monitor checks that it put its main thread back to the
    /// tree's priority and policy after its first moments (`spares::settle_activated_priorities`).
    pub settle_priority_at: Option<Instant>,
}

impl Child {
    pub(crate) fn new(kind: Kind, nr: u32, generation: u32, channel: Channel) -> Child {
        Child {
            pid: None,
            kind,
            nr,
            generation,
            channel: Some(channel),
            phase: Phase::Starting,
            started: Instant::now(),
            recycle: None,
            max_requests: 0,
            pss_checked: None,
            promoted_generation: 0,
            request: 0,
            requested_from: None,
            stray_report_logged: false,
            exit_reason: None,
            knows_spares: false,
            killed: None,
            death_notice: None,
            dying: false,
            settle_priority_at: None,
            pidfd: None,
            exited: None,
        }
    }

    /// Sends `sig` to it: through its pidfd, opened now if it has none yet (still our unreaped
    /// child, checked); by pid only where the monitor reaps its children itself, so that the pid
    /// stays this child's until then. Fails once it has exited.
    pub(crate) fn signal(
        &mut self,
        sig: nix::sys::signal::Signal,
        kernel_reaps: bool,
    ) -> std::io::Result<()> {
        use std::os::fd::AsFd;
        let Some(pid) = self.pid else {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        };
        if self.pidfd.is_none() && self.exited.is_none() {
            self.pidfd = crate::sys::pidfd::open_child(pid).ok();
        }
        match &self.pidfd {
            Some(fd) => crate::sys::pidfd::send_signal(fd.as_fd(), sig),
            None if !kernel_reaps => nix::sys::signal::kill(pid, sig).map_err(std::io::Error::from),
            None => Err(std::io::Error::from_raw_os_error(libc::ESRCH)),
        }
    }

    pub(crate) fn is_retiring(&self) -> bool {
        matches!(self.phase, Phase::Retiring { .. })
    }

    /// A worker that counts towards the target: not leaving. One whose channel closed or whose
    /// death notice hung up is exiting (only its exit does that), even before it is reaped.
    pub(crate) fn is_active_worker(&self) -> bool {
        self.kind == Kind::Worker
            && self.channel.is_some()
            && !self.dying
            && !self.is_retiring()
            && self.recycle.is_none()
            && self.phase != Phase::Promoting
    }

    /// The worker number for a log line: none for a spare, which has none until it is activated
    /// (its `nr` is then [`crate::app::Worker::SPARE_NR`], a number no reader should see).
    pub(crate) fn log_nr(&self) -> Option<u32> {
        (self.kind != Kind::Spare).then_some(self.nr)
    }

    pub(crate) fn pid_raw(&self) -> i32 {
        self.pid.map(|p| p.as_raw()).unwrap_or(0)
    }

    pub(crate) fn label(&self) -> String {
        match self.kind {
            Kind::Mold => format!("mold (gen:{})", self.generation),
            Kind::Worker => format!("worker[{}] (gen:{})", self.nr, self.generation),
            Kind::Spare => format!("spare (gen:{})", self.generation),
        }
    }
}
