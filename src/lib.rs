//! tine: a preforking, reforking application server and process-pool library for Linux.
//!
//! # Theory of operation
//!
//! A user's app (any `tower::Service` over HTTP, such as an axum `Router`, or a raw stream
//! handler) runs in N worker processes that share the listening sockets. Four roles:
//!
//! ```text
//! tine monitor (gen:1 workers:4/4)   single-threaded poll loop; never runs app code
//!  ├─ tine mold (gen:1)              the template: forks workers on request, serves nothing
//!  ├─ tine worker[0] (gen:1)         serves requests
//!  ├─ tine worker[1] (gen:0)         an older generation, being rolled over
//!  └─ tine spare (gen:1)             booted, accepting nothing until it replaces a worker
//! ```
//!
//! **Monitor** ([`run`] → `monitor`). Stands on firm ground first: signal dispositions a
//! launcher left (an ignored `SIGCHLD`) are reset, `RLIMIT_NOFILE` is raised to its hard limit
//! (a `max_workers` that cannot fit is refused), descriptors inherited across an `execve` get
//! `FD_CLOEXEC` back. Parses the config ([`config`]), binds the listeners
//! ([`listener`]), creates the scoreboard (a sealed memfd, [`ipc::scoreboard`]) and the control
//! socket, becomes a child subreaper, blocks its signals and reads them from a signalfd, and forks
//! the generation-0 mold. Then it loops on one `poll` over the signalfd, one channel per child, the
//! control socket and a timer. Each wake-up ends in `reconcile`, which compares the table of
//! children with the target (a mold, N workers) and acts; a tick checks limits and hangs; the
//! control socket (`tine ctl`, and `tine top`, a live terminal view built on `ctl status --json`
//! with the recent events the monitor keeps) and an optional Prometheus endpoint are served by
//! the same loop. It never starts a thread: before every fork the thread count is checked
//! ([`sys::process::fork`]; no fork if it cannot be read). Logging never ends or blocks it (a line that cannot be written is
//! dropped and counted), and accept errors on its sockets back off instead of spinning.
//!
//! **Mold** (`mold`). Generation 0 is forked by the monitor and runs [`App::preload`] — the
//! expensive start-up every worker shares copy-on-write. On `SpawnWorker` it forks twice: the
//! middle process reports the grandchild's pid and exits, so the worker is re-parented to the
//! monitor and is the mold's sibling. The monitor makes each worker's `SOCK_SEQPACKET` channel and
//! passes one end through the mold with `SCM_RIGHTS` ([`ipc::channel`], [`ipc::message`]:
//! versioned, one message per packet; a malformed packet gets the child replaced, never a panic).
//!
//! **Worker** (`worker`). Every child runs the same after-fork sequence first (`child`): own
//! process group, close inherited fds (but the runtime's process-wide ones, which the
//! generation-0 mold learns before `preload`; a worker gets its own copy of tokio's signal
//! self-pipe), reset signals (a worker keeps its mold's: the app's), parent-death signal, check
//! the parent is the monitor. A worker registers on its channel, runs [`App::boot`], builds a
//! tokio runtime (current-thread by default) and serves HTTP/1.1 and HTTP/2 with hyper, or hands
//! connections to a stream handler. A new connection wakes one idle worker (`EPOLLEXCLUSIVE` on
//! the runtime's registration of the listener, [`sys::epoll`]), and a worker that holds
//! clearly more connections than a serving peer leaves new ones to it for a few milliseconds
//! (`accept_balance`, `worker::balance`: the peer's count on the scoreboard must move, so a stopped
//! peer is passed over); one task per listener accepts, and sweeps its connections for the head, keep-alive and request-body deadlines, so a request
//! arms no timer (a worker holding `max_connections` stops accepting until one closes); its
//! bookkeeping is its scoreboard slot. Workers run under `SCHED_BATCH` (`sched_batch`): woken on a busy CPU, they wait for the running
//! task's slice instead of preempting it, which batches requests when cores are oversubscribed.
//! The monitor, which needs little CPU but needs it at once, runs `monitor_nice_boost` (5) nice
//! levels above the tree when it may (`CAP_SYS_NICE`): on a saturated machine a `ctl` reply, a
//! reap or a hang check does not wait seconds behind busy processes.
//! It counts requests and refreshes a heartbeat in its scoreboard slot; the monitor reads those
//! for hang detection, `max_requests`, memory and CPU limits. A graceful stop drains, losing no
//! request of a client that never retries: the worker stops accepting but serves what is queued,
//! a kept-alive connection is kept until its next request (or the idle deadline) and that request
//! is answered with `Connection: close` (HTTP/2: `GOAWAY`), closes are lingering, and a stop of the
//! whole tree first stops new connections from joining the listening sockets' queues (a SYN-dropping
//! socket filter; a unix socket's path removed), waits for handshakes under way, then closes the
//! sockets, so that no connection is left queued to be reset (docs/SIGNALS.md).
//! Upgraded connections (WebSockets) and stream connections count as in flight until the app drops
//! them; the app learns that the drain began from [`Worker::shutdown`] and ends them politely (a
//! close frame `1001 going away`), or the monitor kills the worker at `graceful_timeout`.
//!
//! **Hot spares** (`spare_workers`, default 1; `monitor::spares`). A spare is a worker forked
//! from the current mold with `SpawnSpare`: it points its listening sockets' descriptors at
//! `/dev/null` (its reactor waits on none, so it cannot accept; a copy of each stays aside),
//! boots, builds its runtime, spawns its accept loops (each waiting for its listener), reports
//! ready and waits (`worker::takeover`, in `futex_waitv`) on the serving workers' robust futex
//! words in the scoreboard and on a roster word the monitor moves when it sends it a command. A
//! worker killed or crashed dies with its death-notice thread owning such a word: early in that
//! thread's exit (`exit_mm`, before its descriptors close) the kernel marks the word
//! `OWNER_DIED` and wakes the spare, which claims
//! the place with two compare-and-swaps (its own standby word, the dead worker's takeover word,
//! both opened by the monitor only while it would itself replace that worker with that spare),
//! puts its copies of the listening sockets back and serves, without waiting for the monitor,
//! which ratifies the takeover when it hears of the death. Otherwise (the monitor closed the
//! words: a drain, a recycle, a rollout, a reload, a promotion, a stop), a serving worker whose
//! death notice hangs up is exiting: a ready spare takes its number at once. The
//! notice (`worker::sentinel`, passed with `Hello`) is a socket held by a thread of the worker
//! with a descriptor table of its own, so it hangs up as the worker's threads start exiting,
//! before the kernel has unmapped its memory (without the holder below, its channel and its
//! clients' connections close only after that; without a notice the channel's EOF serves). That
//! unmapping is not on the path of the replacement either (`teardown_holder`, on by default, see
//! docs/DEPLOYMENT.md): each worker starts, at boot, a holder of its memory (`sys::holder`), a
//! sleeping child process sharing its address space (`CLONE_VM`, another thread group), so the
//! kill of the worker leaves the memory mapped, its threads exit and its connections close at
//! once, and the holder lets go of the memory 20 ms later, its exit doing the teardown. Whenever
//! `reconcile` finds a worker number missing — a death, a limit's replace-then-retire, a scale-up, a rollout's
//! replacement — it first takes a ready spare (its standby word, so that a spare that took a place
//! on its own is not activated twice) and sends it `Activate { nr }` with the listening sockets
//! (more than 8 go ahead in `ListeningSockets`): the spare puts them back in place, points the
//! placeholder sockets its accept loops stood by on at them (their reactor registrations made
//! while it stood by, so opening them is a `dup3` and an `epoll_ctl` each) and accepts at once,
//! and a new spare is requested 5 ms later (not while the takeover needs the CPUs:
//! `spares::REFILL_DELAY`). Only when no spare is ready is a worker forked and booted.
//! Spares come from the newest ready mold; older spares retire once the new generation is proven
//! and has its own ready, so a worker that dies during a rollout's trial is still replaced at once.
//! A spare's `boot` runs before it has a number ([`Worker::is_spare`], [`Worker::current_nr`]).
//!
//! **Reforking.** Once a worker is warm (`refork_after`, `SIGUSR2`, `tine ctl refork`) it is
//! promoted: a replacement starts first, then the worker drains, drops its runtime, runs
//! [`App::before_mold`], checks it is single-threaded and becomes the mold of generation N+1.
//! Older workers are then replaced a few at a time, replace-then-retire, so memory warmed at run
//! time is shared copy-on-write again. The new generation is on trial until every worker is of it
//! and ready: the previous mold stays meanwhile, and if new workers keep failing to start — before
//! the first is ready or after some already serve — the rollout is abandoned, the new workers that
//! serve are replaced from the previous mold, and the old generation serves on at full strength (a
//! rollout rolls back, never down, and never sits half done).
//! Shared data should be read through `&'static` references: a reference-count increment is a
//! write that un-shares a page.
//!
//! **Reload.** `SIGHUP` or `tine ctl reload` first runs the executable on disk (the path saved at
//! start) as `tine check` with the same arguments; if that fails, nothing changes. Then the
//! monitor re-executes itself in place, handing every fd it polls (listeners, child channels,
//! control and metrics sockets, the scoreboard memfd, a waiting `ctl reload`) to the new image with
//! a JSON state memfd. The new image adopts its children (still its own after `execve`), forks a
//! fresh preloaded mold and rolls every worker over; if that mold or its workers fail, the
//! rollout is abandoned and the adopted generation keeps serving. Development mode (`--watch`, `--watch-boot`) drives the same machinery from an
//! inotify fd in the poll loop; systemd socket activation and `sd_notify` are in the monitor too.
//!
//! **Supervision.** Every death of a worker or mold is reaped and explained (exit code, signal,
//! limit, timeout). On
//! Linux 6.15 and later the kernel reaps the monitor's children (`SA_NOCLDWAIT`) and the monitor
//! reads each exit status from the child's pidfd ([`sys::pidfd`]): releasing a dead process
//! then runs in that process, not in the monitor, which waited there on a dying worker's last
//! thread (an adopted orphan is then reaped without a log line). Every signal to a child goes
//! through its pidfd. Older kernels (or
//! `monitor_reaps = true`) keep the monitor's `waitpid`. Replacements back off exponentially on
//! crash loops, and the monitor exits after `max_consecutive_spawn_errors` only if no worker has been ready since it started (a tree that
//! has served keeps retrying, even with no worker left). A start that fails for lack of resources
//! (`EAGAIN`, `ENOMEM`, `EMFILE`, `ENFILE` from `fork` or `socketpair`, or from building a worker's
//! tokio runtime) is retried with capped backoff and never counted. Limits end in replace-then-retire, so capacity never dips. If the
//! monitor dies, the parent-death signal and EOF on the channels take every child with it.
//!
//! **Spawner** ([`spawner`]). Separate from the server: a process forked first thing in `main`
//! that runs typed jobs in pooled, isolated worker processes.
//!
//! **Seeing inside** (`worker::profile`, docs/DEBUGGING.md). Each worker runs one more thread,
//! `tine-profile`, joined before the worker exits or is promoted. `SIGUSR2` to a worker (or
//! `tine ctl profile`, through the monitor and the channel) starts a CPU profile: `ITIMER_PROF`
//! sends `SIGPROF` to the running thread, whose handler records its stack into a preallocated
//! buffer; the thread writes a flamegraph when it stops. A worker found hung is sent a real-time
//! signal on each thread before the kill; each records its stack, and the thread logs them,
//! symbolized.
//!
//! Raw system calls are wrapped in [`sys`] only; the rest is safe Rust. Signals: `INT` quick
//! stop, `TERM`/`QUIT` graceful stop, `HUP` reload, `USR2` refork (to a worker: toggle its
//! profile), `USR1` reopen logs, `TTIN`/`TTOU` one worker more/less.
//!
//! Where each part lives in the source, one room per process role with dependencies pointing
//! down, is `ARCHITECTURE.md` (`tests/layout.rs` holds the code to it).
#![deny(missing_docs)]

// The application server: everything but the spawner and `sys` (Cargo feature `server`, on by
// default; `default-features = false` builds the spawner alone, without the HTTP stack).
#[cfg(feature = "server")]
pub mod app;
#[cfg(feature = "server")]
mod body;
#[cfg(feature = "server")]
mod child;
#[cfg(feature = "server")]
pub mod cli;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
mod ctl;
#[cfg(all(doctest, feature = "server"))]
mod doc_examples;
#[cfg(feature = "server")]
mod file_body;
#[cfg(feature = "tonic")]
pub mod grpc;
#[cfg(feature = "server")]
pub mod ipc;
#[cfg(feature = "server")]
pub mod listener;
#[cfg(feature = "server")]
mod log;
#[cfg(feature = "server")]
mod mold;
#[cfg(feature = "server")]
mod monitor;
#[cfg(feature = "server")]
mod request_body;
pub mod spawner;
pub mod sys;
#[cfg(feature = "top")]
mod top;
#[cfg(feature = "server")]
mod worker;

#[cfg(feature = "server")]
pub use app::{
    App, Body, ConnectInfo, Connection, Context, Handler, RequestBody, Shutdown, Worker,
};
#[cfg(feature = "server")]
pub use cli::run;
#[cfg(feature = "server")]
pub use config::Config;
#[cfg(feature = "server")]
pub use monitor::MonitorError;
