//! The worker: serves requests on the inherited listeners until told to stop or to become a mold.

mod balance;
mod http;
mod policy;
mod profile;
mod sentinel;
mod stream;
mod takeover;

pub(crate) use policy::restore_scheduling_policy;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, watch};

use crate::app::{App, Handler, Worker};
use crate::config::Config;
use crate::ipc::channel::{Channel, ChannelError};
use crate::ipc::message::{Command, Report};
use crate::ipc::scoreboard::{self, Role, SlotWriter, State};
use crate::listener::Listener;

/// What a worker needs to start, handed over by the mold after the fork.
pub(crate) struct Start<'a> {
    pub nr: u32,
    /// A hot spare: boots, then waits for the monitor's `Activate` before it accepts.
    pub spare: bool,
    pub generation: u32,
    pub slot: usize,
    pub channel: Channel,
    pub listeners: &'a [Listener],
    pub config: &'a Config,
}

/// How a worker's life ended.
pub(crate) enum Outcome {
    /// Exit the process with this code.
    Exit(i32),
    /// Become the mold of `generation`, writing scoreboard `slot`; the channel stays.
    Promote {
        generation: u32,
        slot: usize,
        channel: Channel,
    },
}

/// What the worker's event loop was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    Running,
    Graceful,
    Quick,
    Promote { generation: u32, slot: u32 },
}

/// Runs a worker to the end of its life. Called in the freshly forked process, after
/// `child::after_fork`.
pub(crate) fn run<A: App>(app: &A, start: Start<'_>) -> Outcome {
    let Start {
        nr,
        spare,
        generation,
        slot,
        channel,
        listeners,
        config,
    } = start;
    let mut held = Vec::new();
    if spare {
        // Until activated this process must not accept: its listening sockets' descriptors point
        // at /dev/null (nothing registered with its reactor can accept from them). It keeps a
        // copy of each aside, unregistered, to put back if it takes a dead worker's place on its
        // own (`takeover`); the monitor passes them with `Activate` otherwise, and the copies go
        // as soon as the standby ends any other way (or at once, if it cannot stand by on its
        // own). A stop does not wait on it: told to stop, it exits at once.
        for listener in listeners {
            match std::os::fd::AsFd::as_fd(listener).try_clone_to_owned() {
                Ok(fd) => held.push(fd),
                Err(e) => {
                    tracing::debug!(error = %e, "no copy of the listening socket kept: this spare waits for the monitor's Activate only");
                    held.clear();
                    break;
                }
            }
        }
        for listener in listeners {
            if let Err(e) = listener.close_in_place() {
                tracing::error!(error = %e, listener = %listener.addr(), "cannot let go of the listener");
                return Outcome::Exit(72);
            }
        }
        crate::sys::proctitle::set(&format!("tine spare (gen:{generation})"));
        crate::sys::process::set_thread_name("tine-spare");
        crate::log::set_process_tag(format!("spare gen:{generation}"));
    } else {
        take_identity(nr, generation);
    }
    let Some(slot_writer) = scoreboard::global().slot(slot) else {
        tracing::error!(slot, "scoreboard slot out of range");
        return Outcome::Exit(72);
    };
    let pid = std::process::id() as i32;
    slot_writer.claim(pid, Role::Worker, generation, nr, State::Booting);
    // Started while this is the only thread (its descriptor table is copied then emptied); the
    // monitor's end goes with `Hello`. Without it the monitor hears of a death by the channel.
    let robust = scoreboard::global().owner_word(slot);
    let (sentinel, notice) = match sentinel::Sentinel::start(robust) {
        Ok((s, notice)) => (Some(s), Some(notice)),
        Err(e) => {
            tracing::warn!(
                error = %e,
                "no death-notice thread (a process or thread limit?): this worker serves, and the \
                 monitor hears of its death only when it is gone"
            );
            (None, None)
        }
    };
    // After the death-notice thread started: it keeps SCHED_OTHER (a policy applies per thread
    // and is inherited at creation), so that it preempts when the worker is killed. Before the
    // app's boot, the profiler and the runtime start threads: those inherit SCHED_BATCH. A
    // spare moves back for a moment while it stands by and starts serving (see `policy`).
    if config.sched_batch {
        policy::enter_sched_batch();
    }
    // The holder of this process's memory, started from this thread (the process's main one,
    // whose child it is; its policy, inherited, is the worker's): when this process dies, the
    // holder's later exit tears the memory down (see `sys::holder`). Its pid in the slot tells
    // the monitor, which adopts it then, what it is.
    crate::sys::holder::forget_inherited();
    let holder = match config.teardown_holder.then(crate::sys::holder::start) {
        Some(Ok(pid)) => pid,
        Some(Err(e)) if e.kind() == std::io::ErrorKind::Unsupported => {
            tracing::debug!("no holder of this worker's memory on this platform (an old glibc?): its last thread tears it down");
            0
        }
        Some(Err(e)) => {
            tracing::warn!(error = %e, "no holder of this worker's memory (a process limit?): this worker serves, and its last thread tears its memory down when it exits");
            0
        }
        None => 0,
    };
    if let Some(word) = scoreboard::global().holder_word(slot) {
        word.store(holder as u32, std::sync::atomic::Ordering::Release);
    }
    let notice_fds: Vec<_> = notice.iter().map(std::os::fd::AsFd::as_fd).collect();
    if channel.send(&Report::Hello { pid }, &notice_fds).is_err() {
        return Outcome::Exit(72);
    }
    drop(notice_fds);
    drop(notice);
    let worker = Worker {
        nr,
        spare,
        generation,
        config: config.clone(),
        shutdown: crate::app::Shutdown::default(),
    };
    let handler = match app.boot(&worker) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "boot failed");
            let reason = format!("boot failed: {e:#}");
            // The monitor quotes it when it reports the failed start (`ctl status`, reload).
            let _ = channel.send(&Report::Exiting { reason }, &[]);
            return Outcome::Exit(3);
        }
    };
    let profiler = start_profiler(nr, generation, slot, config, &channel);
    let mut builder = if config.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(config.worker_threads);
        // An activated spare's threads take its number as they wake (see name_runtime_thread).
        b.on_thread_unpark(name_runtime_thread);
        b
    };
    if spare && config.sched_batch {
        // A spare's policy changes reach the runtime's threads by their ids (see `policy`).
        builder
            .on_thread_start(policy::runtime_thread_started)
            .on_thread_stop(policy::runtime_thread_stopped);
    }
    let runtime = match builder
        .enable_all()
        // A spare's threads are named once it has a number (see `take_identity`).
        .thread_name_fn(|| match Worker::current_nr() {
            Some(nr) => format!("tine-w{nr}"),
            None => SPARE_THREAD_NAME.to_string(),
        })
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the runtime");
            let reason = format!("{}{e}", crate::ipc::message::RUNTIME_BUILD_FAILED);
            let _ = channel.send(&Report::Exiting { reason }, &[]);
            return Outcome::Exit(3);
        }
    };
    let config = Arc::new(config.clone());
    let (stop, channel) = runtime.block_on(serve(Serving {
        handler,
        listeners,
        config: config.clone(),
        slot: slot_writer,
        slot_index: slot,
        held,
        channel,
        shutdown: worker.shutdown(),
        profiler: profiler.as_ref().map(profile::Agent::handle),
        spare: spare.then_some(generation),
        connect_info: app.connect_info(),
    }));
    // A profile still running is written now; the thread must be gone before a promotion.
    if let Some(profiler) = profiler {
        profiler.shutdown();
    }
    let Some(channel) = channel else {
        return Outcome::Exit(0);
    };
    match stop {
        Stop::Promote { generation, slot } => {
            // The runtime must be gone, threads and all, before this process may fork. The
            // sentinel too (the monitor ignores its hang-up from a worker it is promoting).
            runtime.shutdown_timeout(Duration::from_secs(5));
            if let Some(sentinel) = sentinel {
                sentinel.stop();
            }
            Outcome::Promote {
                generation,
                slot: slot as usize,
                channel,
            }
        }
        _ => {
            runtime.shutdown_timeout(Duration::from_millis(100));
            Outcome::Exit(0)
        }
    }
}

/// Starts the worker's profiler thread (`SIGUSR2`, `ctl profile`, hang stacks: `profile`).
/// Without it the worker serves on, and ignores those signals (as inherited from its mold).
fn start_profiler(
    nr: u32,
    generation: u32,
    slot: usize,
    config: &Config,
    channel: &Channel,
) -> Option<profile::Agent> {
    use std::os::fd::AsFd;
    let reports = match channel.as_fd().try_clone_to_owned() {
        Ok(fd) => Channel::from_fd(fd),
        Err(e) => {
            tracing::warn!(error = %e, "profiling unavailable: cannot duplicate the channel");
            return None;
        }
    };
    let settings = profile::Settings {
        nr,
        generation,
        slot,
        dir: config.profile_dir.clone(),
        max_seconds: config.profile_max_seconds,
        threads: config.worker_threads,
    };
    match profile::Agent::start(settings, reports) {
        Ok(agent) => Some(agent),
        Err(e) => {
            tracing::warn!(error = %e, "profiling unavailable: cannot start its thread");
            None
        }
    }
}

/// Serves until stopped; returns why it stopped.
/// Names this process as worker `nr`: title, thread name, log tag and [`Worker::current_nr`].
fn take_identity(nr: u32, generation: u32) {
    crate::app::set_current_nr(nr);
    crate::sys::proctitle::set(&format!("tine worker[{nr}] (gen:{generation})"));
    crate::sys::process::set_thread_name(&format!("tine-worker-{nr}"));
    crate::log::set_process_tag(format!("worker[{nr}] gen:{generation}"));
}

/// The name of a hot spare's runtime threads until it is activated.
const SPARE_THREAD_NAME: &str = "tine-spare-w";

/// Names the calling runtime thread after the worker number this process serves as, if it does
/// not carry it yet. A hot spare starts its runtime before it has a number (its threads are
/// [`SPARE_THREAD_NAME`]); each thread renames itself the next time it wakes after the activation
/// (`on_thread_unpark`: one relaxed load and a thread-local compare when nothing changed).
///
/// Not by writing `/proc/self/task/TID/comm` for every thread: listing or looking up
/// `/proc/self/task` leaves a dentry per thread in the kernel's cache, and when the worker exits
/// its last thread, still invalidating its own, holds them while the monitor, woken by the
/// group leader's death, reaps it and must invalidate the same dentries: the monitor's `waitpid`
/// spun in `shrink_dcache_parent` until that thread got a CPU again (median 4-19 ms, up to
/// 0.5 s per reap at load 14, seconds at load 65; ~0.1 ms without those dentries:
/// bench/reap/reap_cost.sh).
fn name_runtime_thread() {
    thread_local! {
        static NAMED_AS: std::cell::Cell<u32> = const { std::cell::Cell::new(u32::MAX) };
    }
    let Some(nr) = Worker::current_nr() else {
        return;
    };
    if NAMED_AS.get() != nr {
        NAMED_AS.set(nr);
        crate::sys::process::set_thread_name(&format!("tine-w{nr}"));
    }
}

/// What [`serve`] needs.
struct Serving<'a> {
    handler: Handler,
    listeners: &'a [Listener],
    config: Arc<Config>,
    slot: SlotWriter<'static>,
    /// The scoreboard slot `slot` writes.
    slot_index: usize,
    /// A hot spare's own copies of the listening sockets (see `run`), empty otherwise.
    held: Vec<std::os::fd::OwnedFd>,
    channel: Channel,
    shutdown: crate::app::Shutdown,
    profiler: Option<profile::Handle>,
    /// A hot spare's generation: it waits for `Activate` before it accepts.
    spare: Option<u32>,
    /// Whether HTTP requests carry their connection's addresses ([`App::connect_info`]).
    connect_info: bool,
}

/// Serves until stopped; returns why it stopped. A hot spare first reports itself ready and
/// waits for the monitor's `Activate`, accepting nothing meanwhile.
async fn serve(serving: Serving<'_>) -> (Stop, Option<Channel>) {
    let Serving {
        handler,
        listeners,
        config,
        slot,
        slot_index,
        held,
        channel,
        shutdown,
        profiler,
        spare,
        connect_info,
    } = serving;
    let channel = match crate::sys::fd::register_async(channel) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the channel");
            return (Stop::Quick, None);
        }
    };
    let (stop_tx, stop_rx) = watch::channel(Stop::Running);
    // Inherited as true by the workers of a promoted worker's generation: reset.
    http::DRAINING.store(false, std::sync::atomic::Ordering::Relaxed);
    let heartbeat = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            slot.heartbeat();
            if !Worker::is_fork_safe() {
                slot.set_not_fork_safe();
            }
        }
    });
    // The accept loops are spawned first, each waiting for its listener's gate: a hot spare has
    // them ready while it stands by, so that activation only opens the gates.
    let mut gates = Vec::new();
    let mut accept_loops = Vec::new();
    for _ in listeners {
        let (gate, gate_rx) = oneshot::channel();
        gates.push(gate);
        accept_loops.push(match &handler {
            Handler::Http(service) => http::spawn_accept_loop(
                gate_rx,
                service.clone(),
                config.clone(),
                slot,
                stop_rx.clone(),
                connect_info,
            ),
            Handler::Stream(f) => {
                stream::spawn_accept_loop(gate_rx, f.clone(), slot, stop_rx.clone())
            }
        });
    }
    // One count of connections for all the listeners: `max_connections` is per worker.
    let capacity = http::Capacity::new(config.max_connections, slot, config.accept_balance);
    let mut activated = None;
    let mut standby_gates: Vec<Option<http::StandbyGate>> = Vec::new();
    if let Some(generation) = spare {
        // Booted, runtime built, accept loops spawned: all that is left at activation is to take
        // the listening sockets back (they come with `Activate`) and open the gates.
        // Off the path of its activation: the reactor's epoll instance, found now, so that
        // making a listener's registration exclusive reads one fdinfo (see `sys::epoll`).
        if config.exclusive_accept {
            let _ = crate::sys::epoll::learn_epoll_instances();
        }
        // And its HTTP stack run once, so that its first request does not run cold (not with
        // `proxy_protocol`: a request without the header would be refused, and logged).
        if let (Handler::Http(service), false) = (&handler, config.proxy_protocol) {
            if let Err(e) = http::warm_up(service.clone(), config.clone(), slot).await {
                tracing::debug!(error = %e, "the spare's warm-up request failed");
            }
        }
        // And each gate registered with the reactor on a placeholder, so that opening it is a
        // `dup3` and an `epoll_ctl` (see `http::StandbyGate`).
        standby_gates = listeners
            .iter()
            .map(|l| http::StandbyGate::prepare(l, &config, capacity.clone()))
            .collect();
        // The monitor may raise this thread's priority while it stands by (see
        // `monitor::spares`): once activated, it puts this one back.
        let standby_nice = crate::sys::process::nice().ok();
        // Whether it can take a place on its own, said in its slot before `Ready`: the monitor
        // arms only a spare that watches, and leaves a dead worker's place to an armed one for a
        // moment (`monitor::spares`); one that cannot watch must not hold that up.
        let watches = held.len() == listeners.len()
            && takeover::available(config.debug_routes)
            && scoreboard::global().watch_standby(slot_index);
        policy::stand_by_under_sched_other();
        slot.set_state(State::Standby);
        if channel.get_ref().send(&Report::Ready, &[]).is_err() {
            return (Stop::Quick, None);
        }
        // It stands by in this thread, on its channel and on the serving workers' robust words
        // (see `takeover`), if it can take a place on its own; otherwise on its channel only.
        // Blocking here holds up nothing the spare needs: with one runtime thread (the default)
        // its other tasks (the heartbeat, refreshed by `stand_by` instead) wait, with more they
        // run on the other threads. Woken by a death, this thread opens the gates itself.
        let activation = if watches {
            let mut sockets = Vec::new();
            let woken = takeover::stand_by(
                slot_index,
                || read_activation(&channel, &mut sockets),
                || slot.heartbeat(),
            );
            match woken {
                takeover::Woken::Claimed(c) => Ok((c.nr, held, Some(c.at))),
                takeover::Woken::Told(r) => {
                    // Activated (the monitor passed the sockets) or told to stop: the copies kept
                    // aside go now, or they would hold the listening sockets open for this
                    // process's whole life, past its own close at a graceful stop.
                    drop(held);
                    r.map(|(nr, sockets)| (nr, sockets, None))
                }
                takeover::Woken::CannotWatch => {
                    drop(held);
                    // With the sockets of a `ListeningSockets` read already, if any.
                    await_activation(&channel, sockets)
                        .await
                        .map(|(nr, sockets)| (nr, sockets, None))
                }
            }
        } else {
            // Copies it cannot use: not kept while it waits, nor once activated.
            drop(held);
            await_activation(&channel, Vec::new())
                .await
                .map(|(nr, sockets)| (nr, sockets, None))
        };
        match activation {
            Ok((nr, sockets, own)) => {
                let received = crate::log::respawn_stamp();
                if sockets.len() != listeners.len() {
                    tracing::error!(
                        passed = sockets.len(),
                        listeners = listeners.len(),
                        "activated with other listening sockets than this spare's"
                    );
                    return (Stop::Quick, None);
                }
                for (listener, socket) in listeners.iter().zip(sockets) {
                    if let Err(e) = listener.reopen_in_place(socket) {
                        tracing::error!(error = %e, listener = %listener.addr(), "cannot take the listener back");
                        return (Stop::Quick, None);
                    }
                }
                // Its number before its first request: handlers may read `Worker::current_nr`.
                crate::app::set_current_nr(nr);
                slot.take_nr(nr);
                activated = Some((nr, generation, received, standby_nice, own));
            }
            Err(why) => {
                tracing::debug!("spare stopping before activation: {why:?}");
                heartbeat.abort();
                return (Stop::Quick, None);
            }
        }
    }
    standby_gates.resize_with(listeners.len(), || None);
    for ((listener, gate), standby) in listeners.iter().zip(gates).zip(standby_gates) {
        let opened = standby.and_then(|s| {
            s.open(listener)
                .inspect_err(|e| {
                    tracing::warn!(error = %e, listener = %listener.addr(), "the prepared gate did not open: registering anew");
                })
                .ok()
        });
        match opened.map_or_else(|| http::Gate::new(listener, &config, capacity.clone()), Ok) {
            Ok(g) => {
                let _ = gate.send(g);
            }
            Err(e) => {
                tracing::error!(error = %e, listener = %listener.addr(), "cannot serve listener");
                return (Stop::Quick, None);
            }
        }
    }
    if let Some((nr, generation, received, standby_nice, own)) = activated {
        let listening = crate::log::respawn_stamp();
        http::LOG_FIRST_ACCEPT.store(true, std::sync::atomic::Ordering::Relaxed);
        http::LOG_FIRST_REQUEST.store(true, std::sync::atomic::Ordering::Relaxed);
        // The rest of its new identity after its gates opened.
        take_identity(nr, generation);
        // Wakes the runtime's threads, so that each renames itself (name_runtime_thread) now
        // rather than when work first comes its way.
        for _ in 0..config.worker_threads {
            tokio::spawn(async {});
        }
        // Back to the tree's priority (raised by the monitor while it stood by) and policy once
        // it has served the connections queued for it: until then its wake-ups preempt, as the
        // woken spare's did. The monitor raised the main thread (the one whose id is the pid);
        // this task may run on any runtime thread, so it names that thread rather than itself.
        tokio::spawn(async move {
            tokio::time::sleep(policy::FIRST_SERVICE).await;
            if let Some(nice) = standby_nice {
                let _ = crate::sys::process::set_nice_of(nix::unistd::Pid::this(), nice);
            }
            policy::serve_under_sched_batch();
        });
        if let (Some(received), Some(listening)) = (received, listening) {
            let named = crate::log::respawn_stamp().unwrap_or_default();
            tokio::spawn(log_activation_timeline(
                received,
                listening,
                named,
                own.flatten(),
            ));
        }
        // Said once it serves (not on the path of its first requests). The monitor ratifies
        // it when it hears of the death (`monitor::spares`).
        if own.is_some() {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                tracing::info!(
                    nr,
                    "took the place of worker[{nr}], which died, without waiting for the monitor"
                );
            });
        }
    }
    slot.set_state(State::Ready);
    // Serving capacity from now on: a spare may replace it at once if it dies.
    sentinel::arm();
    // An activated spare was counted serving by the monitor when it sent `Activate`.
    if spare.is_none() && channel.get_ref().send(&Report::Ready, &[]).is_err() {
        return (Stop::Quick, None);
    }
    if config.debug_routes {
        forge_spawn_reports(channel.get_ref()).await;
    }
    let stop = read_commands(&channel, profiler.as_ref()).await;
    // Whatever it was told (drain, stop, become a mold, or the monitor is gone), what follows is
    // no death for a spare to take over.
    sentinel::disarm();
    heartbeat.abort();
    if stop == Stop::Quick {
        return (stop, None);
    }
    slot.set_state(State::Draining);
    // Before the accept loops and connections hear of the stop: a response written from now on
    // says `Connection: close` (see http::DRAINING).
    http::DRAINING.store(true, std::sync::atomic::Ordering::Relaxed);
    // The app's long-lived connections (WebSockets, stream handlers) hear of it too: the drain
    // waits for them (up to graceful_timeout), so they should end themselves politely now.
    shutdown.begin();
    if stop == Stop::Graceful {
        // This process will not listen again (a worker promoted to mold keeps its listeners).
        // What still holds the socket here is each accept loop's duplicate, closed just after
        // it takes what is queued: once the whole tree stops, no connection is left queued.
        for listener in listeners {
            if let Err(e) = listener.close_in_place() {
                tracing::warn!(error = %e, listener = %listener.addr(), "cannot close the listener");
            }
        }
    }
    let _ = stop_tx.send(stop);
    // Each accept loop stops accepting, then drains its connections.
    for handle in accept_loops {
        let _ = handle.await;
    }
    (stop, Some(channel.into_inner()))
}

/// Logs an activated spare's `tine::respawn` lines (`bench/respawn/timeline.py`) once its first
/// request has been read (or after a second): written as they happen, their formatting and
/// writing, cold, lengthened the stages they timed.
async fn log_activation_timeline(
    received: crate::log::RespawnStamp,
    listening: crate::log::RespawnStamp,
    named: crate::log::RespawnStamp,
    claimed: Option<crate::log::RespawnStamp>,
) {
    let parsed = || http::FIRST_PARSED.lock().map_or(true, |p| p.is_some());
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if parsed() {
            break;
        }
    }
    if let Some(at) = claimed {
        tracing::debug!(
            target: "tine::respawn",
            claimed_us = at.us,
            claimed_cpu_us = at.cpu_us,
            "spare claimed a dead worker's place"
        );
    }
    tracing::debug!(
        target: "tine::respawn",
        received_us = received.us,
        received_cpu_us = received.cpu_us,
        received_flt = received.faults,
        listening_us = listening.us,
        listening_cpu_us = listening.cpu_us,
        listening_flt = listening.faults,
        named_us = named.us,
        named_cpu_us = named.cpu_us,
        "spare activated: listening"
    );
    if let Some(at) = http::FIRST_ACCEPTED.lock().ok().and_then(|mut a| a.take()) {
        tracing::debug!(
            target: "tine::respawn",
            accepted_us = at.us,
            accepted_cpu_us = at.cpu_us,
            accepted_flt = at.faults,
            "first connection accepted"
        );
    }
    if let Some(at) = http::FIRST_PARSED.lock().ok().and_then(|mut p| p.take()) {
        tracing::debug!(
            target: "tine::respawn",
            parsed_us = at.us,
            parsed_cpu_us = at.cpu_us,
            parsed_flt = at.faults,
            "first request read"
        );
    }
}

/// Test hook (debug routes only): `TINE_DEBUG_FORGE_SPAWN_REPORTS=FILE` makes the first worker
/// that removes FILE act as a compromised worker would: it sends the monitor forged `SpawnFailed`
/// reports (more than `max_consecutive_spawn_errors`) and `Spawned` reports naming the pid
/// written in FILE, for every slot and request number it can guess. The monitor must ignore them.
async fn forge_spawn_reports(channel: &Channel) {
    let Some(file) = std::env::var_os("TINE_DEBUG_FORGE_SPAWN_REPORTS") else {
        return;
    };
    let Ok(planted) = std::fs::read_to_string(&file) else {
        return;
    };
    // Removing it is the claim: only one worker forges, once.
    if std::fs::remove_file(&file).is_err() {
        return;
    }
    let pid: i32 = planted.trim().parse().unwrap_or(0);
    tracing::warn!(
        pid,
        "TINE_DEBUG_FORGE_SPAWN_REPORTS: sending forged spawn reports"
    );
    let mut forged = Vec::new();
    for request in 1..=32u64 {
        for slot in 0..8u32 {
            forged.push(Report::SpawnFailed {
                slot,
                request,
                error: "forged by a worker".into(),
            });
            forged.push(Report::Spawned { slot, request, pid });
        }
    }
    for report in &forged {
        // The channel is non-blocking: wait for room rather than drop a forgery.
        for _ in 0..1000 {
            match channel.send(report, &[]) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(Duration::from_millis(1)).await
                }
                _ => break,
            }
        }
    }
    tracing::warn!(
        count = forged.len(),
        "TINE_DEBUG_FORGE_SPAWN_REPORTS: forged spawn reports sent"
    );
}

/// The next command from the monitor (`Ok(None)`: the monitor closed the channel).
async fn next_command(
    channel: &AsyncFd<Channel>,
) -> Result<Option<crate::ipc::channel::Received<Command>>, ChannelError> {
    loop {
        let Ok(mut guard) = channel.readable().await else {
            return Ok(None);
        };
        let received = guard.try_io(|inner| match inner.get_ref().recv::<Command>(false) {
            Err(ChannelError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => Err(e),
            other => Ok(other),
        });
        match received {
            Err(_would_block) => continue,
            Ok(Err(e)) => return Err(ChannelError::Io(e)),
            Ok(Ok(r)) => return r,
        }
    }
}

/// How a channel error ends a worker: a monitor upgraded in place that speaks a newer wire
/// format means this worker is of the old generation, so it drains (the new monitor replaces
/// it) rather than dies; anything else ends it at once.
fn stop_for(error: ChannelError) -> Stop {
    match error {
        ChannelError::Decode(crate::ipc::message::DecodeError::Version(v)) => {
            tracing::warn!(
                version = v,
                "the monitor speaks another wire version; draining"
            );
            Stop::Graceful
        }
        e => {
            tracing::error!(error = %e, "bad message from the monitor");
            Stop::Quick
        }
    }
}

/// A hot spare waits here for the monitor: `Ok` to serve as worker `nr` on the listening sockets
/// passed along, or `Err` with how to stop (told to, or the monitor gone).
async fn await_activation(
    channel: &AsyncFd<Channel>,
    mut sockets: Vec<std::os::fd::OwnedFd>,
) -> Result<(u32, Vec<std::os::fd::OwnedFd>), Stop> {
    // More listening sockets than one packet carries come first, in `ListeningSockets` (`sockets`:
    // those read before this was called).
    loop {
        let r = match next_command(channel).await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(Stop::Quick),
            Err(e) => return Err(stop_for(e)),
        };
        match r.msg {
            Command::ListeningSockets => sockets.extend(r.fds),
            Command::Activate { nr } => {
                sockets.extend(r.fds);
                return Ok((nr, sockets));
            }
            Command::Stop { graceful: true } => return Err(Stop::Graceful),
            Command::Stop { graceful: false } => return Err(Stop::Quick),
            Command::ReopenLogs => crate::log::adopt_log_fd(r.fds.into_iter().next()),
            other => tracing::warn!("ignoring {other:?} sent to a spare"),
        }
    }
}

/// What [`await_activation`] does, without waiting: reads what the channel holds now and says
/// how the standby ends, if it does (`sockets` keeps the listening sockets passed so far).
fn read_activation(
    channel: &AsyncFd<Channel>,
    sockets: &mut Vec<std::os::fd::OwnedFd>,
) -> Option<Result<(u32, Vec<std::os::fd::OwnedFd>), Stop>> {
    loop {
        let r = match channel.get_ref().recv::<Command>(false) {
            Ok(Some(r)) => r,
            Ok(None) => return Some(Err(Stop::Quick)),
            Err(ChannelError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
            Err(e) => return Some(Err(stop_for(e))),
        };
        match r.msg {
            Command::ListeningSockets => sockets.extend(r.fds),
            Command::Activate { nr } => {
                sockets.extend(r.fds);
                return Some(Ok((nr, std::mem::take(sockets))));
            }
            Command::Stop { graceful: true } => return Some(Err(Stop::Graceful)),
            Command::Stop { graceful: false } => return Some(Err(Stop::Quick)),
            Command::ReopenLogs => crate::log::adopt_log_fd(r.fds.into_iter().next()),
            other => tracing::warn!("ignoring {other:?} sent to a spare"),
        }
    }
}

/// Reads the monitor's commands until one ends the serving loop.
async fn read_commands(channel: &AsyncFd<Channel>, profiler: Option<&profile::Handle>) -> Stop {
    loop {
        let r = match next_command(channel).await {
            // The monitor is gone: nobody can supervise this process any more.
            Ok(None) => return Stop::Quick,
            Ok(Some(r)) => r,
            Err(e) => return stop_for(e),
        };
        match r.msg {
            Command::Stop { graceful: true } => return Stop::Graceful,
            Command::Stop { graceful: false } => return Stop::Quick,
            Command::Promote { generation, slot } => {
                if Worker::is_fork_safe() {
                    return Stop::Promote { generation, slot };
                }
                let report = Report::PromotionFailed {
                    reason: "marked not fork-safe".into(),
                };
                let _ = channel.get_ref().send(&report, &[]);
            }
            Command::ReopenLogs => crate::log::adopt_log_fd(r.fds.into_iter().next()),
            Command::Profile { seconds } => match profiler {
                Some(profiler) => profiler.start(seconds),
                None => {
                    let report = Report::ProfileFailed {
                        error: "profiling is unavailable in this worker (see its log)".into(),
                        still_running: false,
                    };
                    let _ = channel.get_ref().send(&report, &[]);
                }
            },
            other @ (Command::SpawnWorker { .. }
            | Command::SpawnSpare { .. }
            | Command::Activate { .. }
            | Command::ListeningSockets) => {
                tracing::warn!("ignoring {other:?} sent to a serving worker");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{send, MsgFlags};

    use super::*;

    /// Feeds one raw packet (or, with `None`, a closed channel) to a worker's command reader.
    fn read_after(packet: Option<&[u8]>) -> Stop {
        let (monitor, worker) = Channel::pair().expect("socketpair");
        match packet {
            Some(p) => {
                send(monitor.as_raw_fd(), p, MsgFlags::empty()).expect("send");
            }
            None => drop(monitor),
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let fd = crate::sys::fd::register_async(worker).expect("register");
            read_commands(&fd, None).await
        })
    }

    #[test]
    fn commands_and_bad_packets() {
        let graceful = crate::ipc::message::encode(&Command::Stop { graceful: true });
        assert_eq!(read_after(Some(&graceful)), Stop::Graceful);
        // An upgraded monitor speaking another wire version: drain, do not die.
        assert_eq!(read_after(Some(&[9, 0, 1, 2, 3])), Stop::Graceful);
        // Garbage of this version, or the monitor gone: stop at once.
        let [lo, hi] = crate::ipc::message::WIRE_VERSION.to_le_bytes();
        assert_eq!(read_after(Some(&[lo, hi, 200, 200, 200])), Stop::Quick);
        assert_eq!(read_after(None), Stop::Quick);
    }
}
