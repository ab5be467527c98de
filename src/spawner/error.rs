//! Typed errors: which worker died, and why.

use std::fmt;
use std::time::Duration;

use nix::sys::signal::Signal;

/// How a worker process ended, as its parent (the spawner) saw it with `waitpid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Death {
    /// It exited with this code (a `std::process::exit` in the job, for example).
    Exited(i32),
    /// A signal killed it: SIGABRT for an abort, SIGSEGV for a wild memory access, ...
    Signaled {
        /// The signal number.
        signal: i32,
        /// Whether the kernel wrote a core dump.
        core_dumped: bool,
    },
    /// A SIGKILL that tine did not send, while the OOM-kill count of this cgroup went up: the
    /// kernel's OOM killer, most likely.
    OomKilled,
    /// The spawner could not tell (the process was not its child any more).
    Unknown,
}

impl fmt::Display for Death {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Death::Exited(code) => write!(f, "exited with code {code}"),
            Death::Signaled { signal, core_dumped } => {
                let name = Signal::try_from(*signal).map(|s| s.as_str()).unwrap_or("unknown signal");
                write!(f, "killed by signal {signal} ({name}){}", if *core_dumped { ", core dumped" } else { "" })
            }
            Death::OomKilled => write!(f, "killed by the kernel's OOM killer (SIGKILL while the cgroup's oom_kill count rose)"),
            Death::Unknown => write!(f, "ended in a way the spawner could not tell"),
        }
    }
}

impl Death {
    /// The signal that killed the worker, if one did and it is a standard one (real-time signals
    /// have no [`Signal`] value: read the number in [`Death::Signaled`]).
    pub fn signal(&self) -> Option<Signal> {
        self.signal_number().and_then(|n| Signal::try_from(n).ok())
    }

    /// The number of the signal that killed the worker (an OOM kill is a SIGKILL).
    fn signal_number(&self) -> Option<i32> {
        match self {
            Death::Signaled { signal, .. } => Some(*signal),
            Death::OomKilled => Some(Signal::SIGKILL as i32),
            _ => None,
        }
    }
}

/// A signal named either way: a [`Signal`] (`Signal::SIGSEGV`, no `libc` needed) or its number
/// (`libc::SIGSEGV`).
pub trait SignalNumber {
    /// The signal's number.
    fn number(self) -> i32;
}

impl SignalNumber for Signal {
    fn number(self) -> i32 {
        self as i32
    }
}

impl SignalNumber for i32 {
    fn number(self) -> i32 {
        self
    }
}

/// Which side could not (de)serialize a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The caller could not encode the job.
    EncodeJob,
    /// The worker could not decode the job.
    DecodeJob,
    /// The worker could not encode the output.
    EncodeOutput,
    /// The caller could not decode the output.
    DecodeOutput,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::EncodeJob => "encoding the job in the caller",
            Side::DecodeJob => "decoding the job in the worker",
            Side::EncodeOutput => "encoding the output in the worker",
            Side::DecodeOutput => "decoding the output in the caller",
        })
    }
}

/// Why a job did not produce its output.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The worker process died while it held the job.
    #[error("job worker {pid} died: {death}")]
    WorkerDied {
        /// The worker's pid.
        pid: i32,
        /// How it ended.
        death: Death,
    },
    /// The job ran past the pool's timeout; its worker was killed (and will be replaced).
    #[error("job timed out after {timeout:?}; worker {pid} was killed")]
    Timeout {
        /// The worker's pid.
        pid: i32,
        /// The pool's per-job timeout.
        timeout: Duration,
    },
    /// The worker's resident memory went over the pool's limit during the job; it was killed.
    #[error("job worker {pid} used {rss_kb} KiB, over the limit of {limit_kb} KiB; it was killed")]
    MemoryLimit {
        /// The worker's pid.
        pid: i32,
        /// Its resident set size when it was caught.
        rss_kb: u64,
        /// The pool's limit.
        limit_kb: u64,
    },
    /// A panic escaped the job's `run` (a panic the job catches itself is no failure); the
    /// worker reported it and exited.
    #[error("job panicked in worker {pid}: {message}")]
    Panicked {
        /// The worker's pid.
        pid: i32,
        /// The panic message (with its location).
        message: String,
        /// The panic's backtrace as the worker captured it, when backtraces are enabled
        /// (`RUST_BACKTRACE=1` or `RUST_LIB_BACKTRACE=1` in the worker's environment), at most
        /// 32 KiB of it. Not part of the one-line `Display`.
        backtrace: Option<String>,
    },
    /// A job or its output could not be serialized or deserialized.
    #[error("serialization failed {side} (worker {pid:?}): {message}")]
    Serialization {
        /// The worker involved, if one was.
        pid: Option<i32>,
        /// Where it failed.
        side: Side,
        /// The serializer's message.
        message: String,
    },
    /// The job type was not registered before the spawner started.
    #[error(
        "job type {name:?} is not registered: register it on the SpawnerBuilder before start()"
    )]
    UnknownJob {
        /// The job type's name.
        name: String,
    },
    /// The spawner process is gone (or stopped answering): no worker can be started or reaped.
    #[error("the spawner (pid {pid}) is gone: {detail}")]
    SpawnerGone {
        /// The spawner's pid.
        pid: i32,
        /// What was seen: its exit status, or the I/O error.
        detail: String,
    },
    /// The spawner could not fork a worker.
    #[error("the spawner could not start a worker: {0}")]
    SpawnFailed(String),
    /// A peer sent something this side cannot understand (another wire version, a truncated
    /// packet); the worker involved is discarded.
    #[error("protocol error with worker {pid}: {detail}")]
    Protocol {
        /// The worker's pid.
        pid: i32,
        /// What was wrong.
        detail: String,
    },
    /// An I/O error on a worker's channel.
    #[error("I/O error on the channel of worker {pid}: {source}")]
    Io {
        /// The worker's pid.
        pid: i32,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The pid of the worker involved, if one was.
    pub fn pid(&self) -> Option<i32> {
        match self {
            Error::WorkerDied { pid, .. }
            | Error::Timeout { pid, .. }
            | Error::MemoryLimit { pid, .. }
            | Error::Panicked { pid, .. }
            | Error::Protocol { pid, .. }
            | Error::Io { pid, .. } => Some(*pid),
            Error::Serialization { pid, .. } => *pid,
            _ => None,
        }
    }

    /// The worker died on its own (signal or exit), as opposed to being killed by the pool.
    pub fn is_crash(&self) -> bool {
        matches!(self, Error::WorkerDied { .. })
    }

    /// The worker was killed by this signal: a [`Signal`] (`Signal::SIGSEGV`) or its number
    /// (`libc::SIGSEGV`).
    pub fn is_signal(&self, signal: impl SignalNumber) -> bool {
        match self {
            Error::WorkerDied { death, .. } => death.signal_number() == Some(signal.number()),
            _ => false,
        }
    }

    /// The signal that killed the worker, if one did and it is a standard one.
    pub fn signal(&self) -> Option<Signal> {
        match self {
            Error::WorkerDied { death, .. } => death.signal(),
            _ => None,
        }
    }

    /// The panic's backtrace, for [`Error::Panicked`] when backtraces were enabled.
    pub fn backtrace(&self) -> Option<&str> {
        match self {
            Error::Panicked { backtrace, .. } => backtrace.as_deref(),
            _ => None,
        }
    }

    /// The job timed out.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// The pool's memory limit was hit.
    pub fn is_memory_limit(&self) -> bool {
        matches!(self, Error::MemoryLimit { .. })
    }

    /// The kernel's OOM killer took the worker (as far as can be told).
    pub fn is_oom_killed(&self) -> bool {
        matches!(
            self,
            Error::WorkerDied {
                death: Death::OomKilled,
                ..
            }
        )
    }

    /// The job panicked.
    pub fn is_panic(&self) -> bool {
        matches!(self, Error::Panicked { .. })
    }

    /// A value could not be (de)serialized.
    pub fn is_serialization(&self) -> bool {
        matches!(self, Error::Serialization { .. })
    }

    /// The spawner is gone: nothing more can run on it.
    pub fn is_spawner_gone(&self) -> bool {
        matches!(self, Error::SpawnerGone { .. })
    }
}

/// Why the spawner could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Other threads exist; forking now could copy a lock held by one of them.
    #[error("start the spawner first thing in main, before any thread (a tokio runtime, a logger) starts: {0}")]
    NotSingleThreaded(#[from] crate::sys::process::NotSingleThreaded),
    /// Two job types share a name.
    #[error("two job types are registered under the name {0:?}")]
    DuplicateJob(&'static str),
    /// A system call failed.
    #[error("could not start the spawner: {0}")]
    Io(#[from] std::io::Error),
}
