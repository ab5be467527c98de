//! The sequence every child runs right after its fork, in DESIGN.md's order, and the runtime's
//! process-wide descriptors that every child keeps (docs/FORK_SAFETY.md).

use std::os::fd::RawFd;
use std::sync::OnceLock;

use nix::sys::signal::Signal;
use nix::unistd::{getppid, setpgid, Pid};

use crate::config::RunAs;
use crate::sys::{fd, process};

/// Which process forked this child: it decides what the child inherited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForkedBy {
    /// The monitor (a generation-0 mold): every descriptor, signal action and the blocked mask are
    /// the monitor's, none of them the app's.
    Monitor,
    /// A mold (a worker): besides tine's own descriptors, the mold holds what `preload` or a
    /// promoted worker's life left, and the runtime's process-wide state, whose signal actions
    /// and self-pipe the worker needs.
    Mold,
}

/// Runs the after-fork sequence: own process group, close inherited fds not in `keep` (nor the
/// runtime's process-wide ones, in a worker), reset signals (only those the monitor set: a worker
/// keeps its mold's), drop privileges to `run_as`, parent-death signal, check the parent is
/// `monitor`. Exits the process on failure.
///
/// A worker forked through a mold's double fork is re-parented to the monitor (a subreaper) only
/// when the middle process exits, so it first waits, briefly, to be the monitor's child: setting the
/// parent-death signal earlier would tie it to the middle process.
pub fn after_fork(monitor: Pid, keep: &[RawFd], run_as: Option<RunAs>, forked_by: ForkedBy) {
    // A terminal's Ctrl-C goes to the foreground process group: only the monitor's.
    let _ = setpgid(Pid::from_raw(0), Pid::from_raw(0));
    let mut keep = keep.to_vec();
    keep.extend([0, 1, 2]);
    if forked_by == ForkedBy::Mold {
        keep.extend(runtime_descriptors().all());
    }
    if process::close_fds_except(&keep).is_err() {
        process::exit_now(70);
    }
    match forked_by {
        ForkedBy::Monitor => {
            if process::reset_signals().is_err() {
                process::exit_now(70);
            }
            // Rust's runtime ignores SIGPIPE so that writes to closed sockets are errors, not
            // deaths.
            let _ = process::ignore_signal(Signal::SIGPIPE);
            // SIGUSR2 and the hang-stack signal are a worker's (crate::worker::profile): a mold, and a
            // worker until it installs its handlers, ignores them rather than dies of them.
            let _ = crate::sys::sampling::ignore_profiling_signals();
        }
        ForkedBy::Mold => {
            // The mold's signal actions are the app's (tokio's handlers among them, which its
            // registry installs once per process and never again): kept. SIGPIPE is ignored since
            // the generation-0 mold.
            if process::unblock_signals().is_err() {
                process::exit_now(70);
            }
            if let Err(e) = runtime_descriptors().renew() {
                tracing::error!(error = %e, "cannot renew the runtime's self-pipe");
                process::exit_now(70);
            }
        }
    }
    // systemd's notification socket belongs to the monitor alone. Single-threaded here, so
    // changing the environment is sound.
    std::env::remove_var("NOTIFY_SOCKET");
    // Privileges go before the parent-death signal: a uid change clears it.
    // A worker forked by a mold that already dropped them has nothing left to drop.
    let already = |uid: u32, gid: u32| {
        nix::unistd::getuid().as_raw() == uid && nix::unistd::getgid().as_raw() == gid
    };
    if let Some(RunAs { uid, gid }) = run_as.filter(|r| !already(r.uid, r.gid)) {
        let gid = nix::unistd::Gid::from_raw(gid);
        if nix::unistd::setgroups(&[gid]).is_err()
            || nix::unistd::setgid(gid).is_err()
            || nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)).is_err()
        {
            crate::log::print_stderr(format_args!("tine: cannot switch to uid {uid} gid {gid}"));
            process::exit_now(73);
        }
    }
    let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while getppid() != monitor {
        if std::time::Instant::now() > until {
            process::exit_now(71);
        }
        std::thread::yield_now();
    }
    if process::set_parent_death_signal(Signal::SIGKILL).is_err() {
        process::exit_now(70);
    }
    // The monitor may have died between the check above and the prctl.
    if getppid() != monitor {
        process::exit_now(71);
    }
    if forked_by == ForkedBy::Monitor {
        learn_runtime_descriptors();
    }
}

/// Descriptors that the async runtime keeps open in statics for the rest of the process's life once
/// a runtime was built: with tokio's `signal` feature (enabled by any crate in the build, e.g. an
/// app's `tokio = { features = ["full"] }`), the self-pipe its signal handlers write to, a unix
/// socket pair. tokio builds it once per process and every later runtime duplicates its reading
/// end, so closing it makes the next runtime build fail (EBADF), or worse, duplicate whatever took
/// the number.
#[derive(Debug, Default)]
struct RuntimeDescriptors {
    /// Socket pairs: each worker gets a fresh pair at the same numbers.
    pairs: Vec<(RawFd, RawFd)>,
    /// Anything else the runtime left open: kept, shared with the mold (tine cannot renew what it
    /// does not know).
    others: Vec<RawFd>,
}

impl RuntimeDescriptors {
    fn all(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.pairs
            .iter()
            .flat_map(|(a, b)| [*a, *b])
            .chain(self.others.iter().copied())
    }

    /// Gives this process its own self-pipe: a signal caught here must wake this process's
    /// runtime, and a sibling must never read the byte that says so.
    fn renew(&self) -> std::io::Result<()> {
        for (a, b) in &self.pairs {
            fd::renew_socket_pair(*a, *b)?;
        }
        Ok(())
    }
}

/// Set once, in the generation-0 mold; workers and promoted molds inherit it with the memory.
static RUNTIME_DESCRIPTORS: OnceLock<RuntimeDescriptors> = OnceLock::new();

fn runtime_descriptors() -> &'static RuntimeDescriptors {
    RUNTIME_DESCRIPTORS.get_or_init(RuntimeDescriptors::default)
}

/// Builds and drops a runtime, as every worker will, before `preload` runs: the descriptors left
/// open are the runtime's process-wide state, not the app's. Learnt here, in a process that holds
/// nothing else but tine's, their numbers hold for every descendant.
fn learn_runtime_descriptors() {
    let learnt = match probe_runtime() {
        Ok(left) => classify(left),
        Err(e) => {
            tracing::warn!(error = %e, "cannot learn the runtime's process-wide descriptors");
            RuntimeDescriptors::default()
        }
    };
    if !learnt.others.is_empty() {
        let named: Vec<_> = learnt
            .others
            .iter()
            .map(|n| format!("{n} ({})", fd::describe(*n)))
            .collect();
        tracing::warn!(
            descriptors = named.join(", "),
            "building a runtime leaves descriptors open that tine does not know; \
             the mold and its workers share them"
        );
    }
    let _ = RUNTIME_DESCRIPTORS.set(learnt);
}

fn probe_runtime() -> std::io::Result<Vec<RawFd>> {
    let before = fd::open_fds()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    drop(runtime);
    let after = fd::open_fds()?;
    Ok(after.into_iter().filter(|n| !before.contains(n)).collect())
}

fn classify(left: Vec<RawFd>) -> RuntimeDescriptors {
    match left[..] {
        [a, b] if fd::is_unix_stream_socket(a) && fd::is_unix_stream_socket(b) => {
            RuntimeDescriptors {
                pairs: vec![(a, b)],
                others: Vec::new(),
            }
        }
        _ => RuntimeDescriptors {
            pairs: Vec::new(),
            others: left,
        },
    }
}

/// Warns, naming them, about descriptors open in a mold that are neither tine's (`known`, stdio)
/// nor the runtime's: every worker closes them right after its fork (docs/FORK_SAFETY.md), so an
/// object of the app that still holds one holds a number the worker reuses for something else.
pub fn warn_about_app_descriptors(known: &[RawFd], after: &str) {
    let Ok(open) = fd::open_fds() else { return };
    let runtime: Vec<RawFd> = runtime_descriptors().all().collect();
    let leftover: Vec<String> = open
        .into_iter()
        .filter(|n| *n > 2 && !known.contains(n) && !runtime.contains(n))
        .map(|n| format!("{n} ({})", fd::describe(n)))
        .collect();
    if !leftover.is_empty() {
        tracing::warn!(
            descriptors = leftover.join(", "),
            "{after} left descriptors open in the mold; every worker closes them after its fork, \
             so nothing may use them there (docs/FORK_SAFETY.md)"
        );
    }
}

/// Runs `f` in a forked child and ends the process: a panic must never unwind into the parent's
/// code, which would then run on in the child.
pub fn run_child(f: impl FnOnce() -> i32) -> ! {
    let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
    process::exit_now(code)
}
