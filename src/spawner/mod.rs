//! The spawner: run jobs in pooled, isolated worker processes, from any Rust program.
//!
//! A database runs untrusted scripts this way; here it is a library that a multi-threaded tokio
//! program or a CLI can use:
//!
//! ```text
//! your program (any threads, tokio)          tine-spawner (single-threaded)
//!   Pool::run(job) ──── job ───────────┐         │ fork
//!        ▲                             ▼         ▼
//!        └─────── output ───────── tine-job worker (one end of a socketpair each)
//! ```
//!
//! * [`Spawner::builder`] is called first thing in a synchronous `main`, before any thread exists
//!   (build the tokio runtime after it: `#[tokio::main]` starts threads before the body runs).
//!   It refuses, naming the threads, if the process already has more than one. It forks a small
//!   spawner process that stays single-threaded and forks every worker.
//! * Job types ([`Job`]) are registered on the builder before the start, so the spawner and every
//!   worker forked from it know them: only a stable name travels on the wire, never a code address.
//! * The spawner forks each worker with one end of a fresh `SOCK_SEQPACKET` socketpair and passes
//!   the other end to the pool (SCM_RIGHTS): jobs go straight from the caller to the worker.
//!   Jobs and outputs may carry descriptors ([`Fd`]).
//! * A [`Pool`] has a minimum and maximum size (workers start lazily), `max_jobs_per_worker`, a
//!   per-job timeout (the worker is killed and replaced), a per-worker memory limit, an idle
//!   timeout, and a one-shot mode (a fresh process per job). Dropping a [`Pool::run`] future
//!   kills the worker running its job.
//! * Errors ([`Error`]) say which worker died and why: exit code, signal, timeout, memory limit,
//!   OOM kill (when it can be told), a panic that escapes the job (message, and backtrace when
//!   enabled), serialization failure. A dead spawner is [`Error::SpawnerGone`] on every later
//!   call, never a hang.
//! * No orphans: the spawner and workers get SIGKILL when their parent dies (parent-death
//!   signal) and exit on EOF of their channel.
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//! use tine::spawner::{Job, Spawner};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Square(u64);
//!
//! impl Job for Square {
//!     const NAME: &'static str = "example.square";
//!     type Output = u64;
//!     fn run(self) -> u64 {
//!         self.0 * self.0
//!     }
//! }
//!
//! fn main() -> anyhow::Result<()> {
//!     let spawner = Spawner::builder().register::<Square>().start()?; // before any thread
//!     let rt = tokio::runtime::Runtime::new()?;
//!     rt.block_on(async {
//!         let pool = spawner.pool().max_workers(2).build();
//!         assert_eq!(pool.run(Square(7)).await?, 49);
//!         Ok(())
//!     })
//! }
//! ```
//!
//! The spawner needs none of the server: with `default-features = false` (no `server` feature)
//! tine builds only this module and [`sys`](crate::sys), without the HTTP stack.
//!
//! See `docs/SPAWNER.md` for the design, the limits and the measured costs.

mod error;
mod job;
mod link;
mod pool;
mod process;
mod wire;

use std::io::Write;
use std::sync::Arc;

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

pub use error::{Death, Error, Side, SignalNumber, StartError};
pub use job::{Fd, Job};
/// The signal type of [`Death::signal`] and [`Error::is_signal`], re-exported so that programs need
/// neither `nix` nor `libc` for it.
pub use nix::sys::signal::Signal;
pub use pool::{Pool, PoolBuilder};

use crate::sys::process::{ensure_single_threaded, Forked};

/// Collects the job types, then starts the spawner process.
#[derive(Default)]
pub struct SpawnerBuilder {
    registry: job::Registry,
}

impl SpawnerBuilder {
    /// Makes job type `J` known to the spawner and its workers, under [`Job::NAME`].
    pub fn register<J: Job>(mut self) -> Self {
        self.registry.register::<J>();
        self
    }

    /// Forks the spawner process. Call it while this process has one thread: first thing in
    /// `main`, before a tokio runtime or anything else that starts threads.
    pub fn start(self) -> Result<Spawner, StartError> {
        if let Some(name) = self.registry.duplicate() {
            return Err(StartError::DuplicateJob(name));
        }
        ensure_single_threaded()?;
        // Text printed without a newline sits in this process's stdout buffer; forked as it is, it
        // would be printed again by every worker that prints. Flushing fails only for a closed or
        // broken stream, which the workers inherit anyway.
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        let parent = nix::unistd::getpid();
        let (mine, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        let registry = self.registry.clone();
        match crate::sys::process::fork()? {
            Forked::Child => {
                // Only the spawner's end stays open in it (the loop closes every other fd).
                drop(mine);
                process::spawner_main(theirs, self.registry, parent)
            }
            Forked::Parent(pid) => {
                drop(theirs);
                Ok(Spawner {
                    link: Arc::new(link::Link::new(pid, mine, registry)?),
                })
            }
        }
    }
}

/// A running spawner process. Cheap to clone; the spawner (and every worker) exits once the last
/// clone and the last [`Pool`] are dropped, or when this process dies.
#[derive(Clone)]
pub struct Spawner {
    link: Arc<link::Link>,
}

impl Spawner {
    /// Starts describing a spawner: register the job types, then [`start`](SpawnerBuilder::start).
    pub fn builder() -> SpawnerBuilder {
        SpawnerBuilder::default()
    }

    /// The spawner process's pid.
    pub fn pid(&self) -> i32 {
        self.link.pid()
    }

    /// Starts describing a pool of workers.
    pub fn pool(&self) -> PoolBuilder {
        PoolBuilder::new(self.link.clone())
    }
}

impl std::fmt::Debug for Spawner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spawner")
            .field("pid", &self.pid())
            .field("jobs", self.link.registry())
            .finish()
    }
}
