//! The mold: the template process of a generation. It serves nothing; on the monitor's request it
//! forks a worker as a sibling (fork, fork again, the middle process exits, the grandchild is
//! re-parented to the monitor, a subreaper).

use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::sys::wait::waitpid;
use nix::unistd::Pid;

use crate::app::{App, Context};
use crate::child;
use crate::config::Config;
use crate::ipc::channel::{Channel, ChannelError};
use crate::ipc::message::{Command, Report};
use crate::ipc::scoreboard::{self, Role, State};
use crate::listener::Listener;
use crate::sys::process::{self, Forked};
use crate::worker;

/// What a mold needs.
pub(crate) struct Start<'a> {
    pub monitor: Pid,
    pub generation: u32,
    pub slot: usize,
    pub channel: Channel,
    pub listeners: &'a [Listener],
    pub config: &'a Config,
}

/// Entry of the generation-0 mold, right after the monitor's fork: preload, then serve as mold.
pub(crate) fn run_generation_zero<A: App>(start: Start<'_>) -> i32 {
    set_identity(&start);
    let ctx = Context {
        config: start.config.clone(),
    };
    let mut app = match A::preload(&ctx) {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "preload failed");
            let _ = start.channel.send(
                &Report::Exiting {
                    reason: format!("preload failed: {e:#}"),
                },
                &[],
            );
            return 4;
        }
    };
    child::warn_about_app_descriptors(&tine_descriptors(&start), "preload");
    run(&mut app, start)
}

/// The descriptors tine itself hands to a mold's workers: the listeners and the channel.
fn tine_descriptors(start: &Start<'_>) -> Vec<std::os::fd::RawFd> {
    let mut known: Vec<_> = start.listeners.iter().map(Listener::raw_fd).collect();
    known.push(start.channel.as_raw_fd());
    known
}

fn set_identity(start: &Start<'_>) {
    crate::sys::proctitle::set(&format!("tine mold (gen:{})", start.generation));
    crate::sys::process::set_thread_name("tine-mold");
    crate::log::set_process_tag(format!("mold gen:{}", start.generation));
    if let Some(slot) = scoreboard::global().slot(start.slot) {
        slot.claim(
            std::process::id() as i32,
            Role::Mold,
            start.generation,
            0,
            State::Mold,
        );
    }
    // A worker promoted to mold keeps the holder of its memory: named in the slot, so that the
    // monitor knows it for what it is when this mold is gone.
    if let Some(word) = scoreboard::global().holder_word(start.slot) {
        let holder = crate::sys::holder::this_process_holder().unwrap_or(0);
        word.store(holder as u32, std::sync::atomic::Ordering::Release);
    }
}

/// The mold loop: fork workers on request until told to stop or the monitor goes away.
pub(crate) fn run<A: App>(app: &mut A, start: Start<'_>) -> i32 {
    set_identity(&start);
    let pid = std::process::id() as i32;
    if start.channel.send(&Report::Hello { pid }, &[]).is_err()
        || start.channel.send(&Report::Ready, &[]).is_err()
    {
        return 72;
    }
    tracing::debug!("mold ready");
    let mut fork_failures = 0;
    loop {
        let received = match start.channel.recv::<Command>(true) {
            Ok(Some(r)) => r,
            Ok(None) => return 0,
            Err(ChannelError::Io(e)) => {
                tracing::error!(error = %e, "mold channel failed");
                return 72;
            }
            // An upgraded monitor speaking a newer wire format: this mold's generation is old.
            Err(ChannelError::Decode(crate::ipc::message::DecodeError::Version(v))) => {
                tracing::warn!(
                    version = v,
                    "the monitor speaks another wire version; retiring"
                );
                return 0;
            }
            Err(e) => {
                tracing::error!(error = %e, "bad message from the monitor");
                continue;
            }
        };
        match received.msg {
            Command::SpawnWorker { nr, slot, request } => {
                let request = (nr, slot, request);
                if spawn_requested(app, &start, request, received.fds, &mut fork_failures) {
                    // The monitor notices and makes a fresh generation-0 mold.
                    return 75;
                }
            }
            Command::SpawnSpare { slot, request } => {
                let request = (SPARE, slot, request);
                if spawn_requested(app, &start, request, received.fds, &mut fork_failures) {
                    return 75;
                }
            }
            Command::Stop { .. } => return 0,
            Command::ReopenLogs => crate::log::adopt_log_fd(received.fds.into_iter().next()),
            Command::Promote { .. } => tracing::warn!("ignoring Promote sent to a mold"),
            Command::Profile { .. } => tracing::warn!("ignoring Profile sent to a mold"),
            Command::Activate { .. } | Command::ListeningSockets => {
                tracing::warn!("ignoring {:?} sent to a mold", received.msg)
            }
        }
    }
}

/// The worker number in a spawn request that asks for a hot spare (it gets a real one when the
/// monitor activates it).
const SPARE: u32 = crate::app::Worker::SPARE_NR;

/// Serves one spawn request (`nr` [`SPARE`]: a hot spare) with the channel passed along,
/// reporting a failure to the monitor. Returns true if this mold is unfit to go on: its forks
/// failed twice in a row for a reason of its own.
fn spawn_requested<A: App>(
    app: &mut A,
    start: &Start<'_>,
    (nr, slot, request): (u32, u32, u64),
    fds: Vec<std::os::fd::OwnedFd>,
    fork_failures: &mut u32,
) -> bool {
    let Some(fd) = fds.into_iter().next() else {
        report_spawn_failed(start, slot, request, "no channel passed");
        return false;
    };
    match spawn_worker(app, start, (nr, slot, request), Channel::from_fd(fd)) {
        Ok(()) => *fork_failures = 0,
        Err(e) => {
            // Lack of processes, memory or descriptors is the system's, not this mold's: the
            // monitor retries later. Other errors (this process has threads, say) mean the mold
            // itself is unfit.
            if !process::is_resource_error(&e) {
                *fork_failures += 1;
            }
            tracing::error!(error = %e, nr, "fork failed");
            report_spawn_failed(start, slot, request, &e);
        }
    }
    *fork_failures >= 2
}

/// Forks worker `nr` (or a hot spare) as a sibling: the middle process reports the worker's pid
/// and exits at once.
fn spawn_worker<A: App>(
    app: &mut A,
    start: &Start<'_>,
    (nr, slot, request): (u32, u32, u64),
    channel: Channel,
) -> std::io::Result<()> {
    match process::fork()? {
        Forked::Parent(middle) => {
            drop(channel);
            let _ = waitpid(middle, None);
            Ok(())
        }
        Forked::Child => child::run_child(|| match process::fork() {
            Ok(Forked::Parent(worker)) => {
                // The worker's pidfd goes with the report: opened here, by its parent, it surely
                // names the worker (no one can reap it yet), which a pid read by the monitor
                // later, once the kernel may have reaped it, would not.
                let pidfd = crate::sys::pidfd::open(worker).ok();
                let fds: Vec<_> = pidfd.iter().map(std::os::fd::AsFd::as_fd).collect();
                let _ = start.channel.send(
                    &Report::Spawned {
                        slot,
                        request,
                        pid: worker.as_raw(),
                    },
                    &fds,
                );
                0
            }
            Ok(Forked::Child) => child::run_child(|| {
                let mut keep: Vec<_> = start.listeners.iter().map(Listener::raw_fd).collect();
                keep.push(channel.as_raw_fd());
                child::after_fork(
                    start.monitor,
                    &keep,
                    start.config.run_as,
                    child::ForkedBy::Mold,
                );
                let outcome = worker::run(
                    app,
                    worker::Start {
                        nr,
                        spare: nr == SPARE,
                        generation: start.generation,
                        slot: slot as usize,
                        channel,
                        listeners: start.listeners,
                        config: start.config,
                    },
                );
                match outcome {
                    worker::Outcome::Exit(code) => code,
                    worker::Outcome::Promote {
                        generation,
                        slot,
                        channel,
                    } => become_mold(app, start, generation, slot, channel),
                }
            }),
            Err(e) => {
                report_spawn_failed(start, slot, request, &e);
                1
            }
        }),
    }
}

/// Answers the monitor's request `request` (for scoreboard slot `slot`): no worker comes of it,
/// and why. A failed send means the monitor is gone, and the mold follows it anyway.
fn report_spawn_failed(start: &Start<'_>, slot: u32, request: u64, error: impl std::fmt::Display) {
    let _ = start.channel.send(
        &Report::SpawnFailed {
            slot,
            request,
            error: error.to_string(),
        },
        &[],
    );
}

/// A worker whose runtime is gone becomes the mold of `generation`.
fn become_mold<A: App>(
    app: &mut A,
    parent: &Start<'_>,
    generation: u32,
    slot: usize,
    channel: Channel,
) -> i32 {
    if let Err(e) = app.before_mold() {
        let _ = channel.send(
            &Report::PromotionFailed {
                reason: format!("before_mold failed: {e:#}"),
            },
            &[],
        );
        return 0;
    }
    if let Err(e) = process::await_single_threaded(Duration::from_secs(1)) {
        let _ = channel.send(
            &Report::PromotionFailed {
                reason: e.to_string(),
            },
            &[],
        );
        return 0;
    }
    worker::restore_scheduling_policy();
    let start = Start {
        monitor: parent.monitor,
        generation,
        slot,
        channel,
        listeners: parent.listeners,
        config: parent.config,
    };
    child::warn_about_app_descriptors(&tine_descriptors(&start), "the promoted worker");
    run(app, start)
}
