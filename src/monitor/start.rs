//! Starting the monitor: fresh (bind, create) or after a reload's re-exec (adopt what the previous
//! image handed over), then into the loop. Also the fork of a preloading mold.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use super::control::ControlServer;
use super::{priority, reload, setup, systemd, watch, Child, Kind, Mode, Monitor, MonitorError};
use crate::app::App;
use crate::child;
use crate::config::{Config, ListenAddr};
use crate::ipc::channel::Channel;
use crate::ipc::scoreboard::{self, Scoreboard};
use crate::listener::Listener;
use crate::mold;
use crate::sys::process::{self, Forked};

/// Runs the server with app `A` until it is stopped. Returns the exit code.
///
/// After a reload's re-exec this same function starts again: it finds the handover left by the
/// previous image and adopts its sockets, scoreboard and children instead of creating them.
pub fn run<A: App>(config: Config) -> Result<u8, MonitorError> {
    // First, firm ground: the signal state and the descriptor limit are this process's, not
    // whatever the launcher (or the previous image) left.
    let mut mask = SigSet::empty();
    for sig in HANDLED_SIGNALS {
        mask.add(sig);
    }
    process::reset_inherited_signals(&mask).map_err(setup("cannot reset signal dispositions"))?;
    A::check(&config).map_err(|e| MonitorError::Config(format!("{e:#}")))?;
    let handover = reload::take_handover().map_err(MonitorError::Config)?;
    if let Some(h) = &handover {
        restore_cloexec(h);
    }
    let nofile = raise_nofile_limit();
    if let Err(e) = check_descriptor_budget(&config, nofile) {
        if handover.is_none() {
            return Err(MonitorError::Config(e));
        }
        // The tree is serving: refusing now would end it. `tine check` (the preflight) refuses.
        tracing::error!("{e}");
    }
    // After a re-exec, children are already serving: a resource the new config adds but cannot
    // get (an address in use, say) must not take the tree down. It is reported to whoever waits
    // for the reload, and what was handed over keeps serving.
    let mut problems = Vec::new();
    let (listeners, from_systemd, control, board) = match &handover {
        Some(h) => adopt_resources(&config, h, &mut problems)?,
        None => fresh_resources(&config)?,
    };
    let board = scoreboard::install(board);
    // Handed over across a reload when the address stays; bound otherwise.
    let handed_metrics = handover.as_ref().and_then(|h| h.metrics);
    let metrics = match (config.metrics_listen, handed_metrics) {
        (Some(addr), Some((fd, old)))
            if same_listener(&ListenAddr::Tcp(old), &ListenAddr::Tcp(addr)) =>
        {
            Some(
                super::metrics::MetricsServer::adopt(crate::sys::fd::adopt(fd))
                    .map_err(setup("cannot adopt the metrics listener"))?,
            )
        }
        (wanted, handed) => {
            drop(handed.map(|(fd, _)| crate::sys::fd::adopt(fd)));
            match wanted.map(super::metrics::MetricsServer::bind).transpose() {
                Ok(m) => m,
                Err(e) if handover.is_some() => {
                    problems.push(format!("metrics: {e}"));
                    None
                }
                Err(e) => return Err(MonitorError::Config(e.to_string())),
            }
        }
    };
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| setup("cannot create the signalfd")(e.into()))?;
    process::set_child_subreaper().map_err(setup("cannot become a subreaper"))?;
    // The kernel reaps where it keeps exit statuses for pidfds, unless the config says not to.
    // The flag itself is set once the children a previous image handed over have pidfds (below):
    // until then one that dies stays a zombie, whose status `waitpid` still gives.
    let kernel_reaps = !config.monitor_reaps && crate::sys::pidfd::kernel_keeps_exit_status();
    let pid_file = config.pid_file.clone();
    if let Some(path) = &pid_file {
        write_pid_file(path).map_err(setup("cannot write the pid file"))?;
    }
    crate::log::set_process_tag("monitor".into());
    let tree_nice = match handover.as_ref().and_then(|h| h.tree_nice) {
        Some(n) => n,
        None => process::nice().unwrap_or(0),
    };
    priority::settle(tree_nice, config.monitor_nice_boost);
    let addrs: Vec<String> = listeners.iter().map(|l| l.addr().to_string()).collect();
    let reaper = if kernel_reaps { "kernel" } else { "monitor" };
    if handover.is_none() {
        tracing::info!(
            listen = addrs.join(","),
            workers = config.workers,
            reaper,
            "starting"
        );
    } else {
        tracing::info!(
            listen = addrs.join(","),
            workers = config.workers,
            reaper,
            "new image running; adopting the tree"
        );
    }
    let mut monitor = Monitor {
        target: config.workers,
        config,
        listeners,
        board,
        signals,
        control: Some(control),
        metrics,
        children: BTreeMap::new(),
        mode: Mode::Running,
        pid: nix::unistd::getpid(),
        started: Instant::now(),
        spawn_errors: 0,
        ever_served: false,
        last_spawn_error: String::new(),
        backoff_until: None,
        announced_ready: false,
        title: String::new(),
        pid_file,
        restarts: BTreeMap::new(),
        spawn_mold: fork_mold::<A>,
        reload: None,
        preflight: None,
        next_request: 0,
        from_systemd,
        handshake_wait: None,
        watchdog: systemd::watchdog_interval().map(|i| (i, Instant::now())),
        watcher: None,
        boot_reload: None,
        last_limits: Instant::now(),
        rollout: None,
        rollouts_failed: BTreeMap::new(),
        last_rollout_failure: None,
        last_rollout_failed: false,
        refork_paused: None,
        resource_errors: 0,
        resource_errors_total: 0,
        events: super::events::Events::default(),
        profiles: Default::default(),
        memory: Default::default(),
        spare_activations: 0,
        last_spare_activation: None,
        pending_takeovers: Vec::new(),
        dead_holders: Vec::new(),
        woke_us: 0,
        kernel_reaps,
        woke_cpu_us: 0,
    };
    if !monitor.config.watch.is_empty() || !monitor.config.watch_boot.is_empty() {
        let w = watch::Watcher::new(
            &monitor.config.watch,
            &monitor.config.watch_boot,
            crate::sys::exe::saved_exe(),
        )
        .map_err(|e| MonitorError::Config(e.to_string()))?;
        monitor.watcher = Some(w);
    }
    if let Some(h) = handover {
        // A worker count set at run time (`ctl scale`, TTIN/TTOU) outlives a reload unless the
        // reload changes `workers` itself.
        if h.configured_workers == Some(monitor.config.workers) && h.target != monitor.target {
            monitor.target = h.target.clamp(1, monitor.config.max_workers);
            tracing::info!(
                workers = monitor.target,
                configured = monitor.config.workers,
                "keeping the worker count set at run time (the reload does not change `workers`)"
            );
        }
        monitor.announced_ready = true;
        monitor.restarts = h.restarts;
        monitor.rollouts_failed = h.rollouts_failed;
        monitor.last_rollout_failure = h.last_rollout_failure;
        monitor.last_rollout_failed = h.last_rollout_failed;
        monitor.resource_errors_total = h.resource_errors_total;
        monitor.events = super::events::Events::from_handover(h.events);
        monitor.spare_activations = h.spare_activations;
        let handed: Vec<RawFd> = h.listeners.iter().map(|l| l.fd).collect();
        let serving: Vec<RawFd> = monitor.listeners.iter().map(Listener::raw_fd).collect();
        monitor.adopt_children(h.children, handed == serving);
        let waiters = h.waiters.into_iter().map(reload::adopt_waiter).collect();
        for p in &problems {
            tracing::error!(problem = %p, "reload: the new configuration could not be applied in full");
        }
        monitor.start_reloaded_generation(h.reload_started_ms, waiters, problems);
    }
    if kernel_reaps {
        if let Err(e) = crate::sys::pidfd::let_kernel_reap_children() {
            tracing::warn!(error = %e, "cannot let the kernel reap children; the monitor reaps them");
            monitor.kernel_reaps = false;
        }
    }
    let result = monitor.run_loop();
    monitor.cleanup();
    result
}

/// The listeners, and for each (in the same order) whether it is systemd's (passed by socket
/// activation: its socket unit keeps it for the next start), the control socket, the scoreboard.
type Resources = (Vec<Listener>, Vec<bool>, ControlServer, Scoreboard);

/// Binds (or takes from systemd) the listeners, the control socket and a new scoreboard.
fn fresh_resources(config: &Config) -> Result<Resources, MonitorError> {
    let activated = systemd::take_activated_sockets().map_err(MonitorError::Config)?;
    let (listeners, from_systemd) = if !activated.is_empty() && !config.listen_given {
        let listeners: Vec<Listener> = activated
            .into_iter()
            .map(|(l, name)| {
                tracing::info!(name, addr = %l.addr(), "serving a socket-activated listener");
                l
            })
            .collect();
        let from_systemd = vec![true; listeners.len()];
        (listeners, from_systemd)
    } else {
        if !activated.is_empty() {
            tracing::warn!("`listen` is configured: ignoring the socket-activated listeners");
        }
        let listeners =
            Listener::bind_all(config).map_err(|e| MonitorError::Config(e.to_string()))?;
        let from_systemd = vec![false; listeners.len()];
        (listeners, from_systemd)
    };
    let control = ControlServer::bind(&config.control_socket)
        .map_err(|e| MonitorError::Config(e.to_string()))?;
    let capacity = scoreboard_slots(config);
    let board = Scoreboard::create(capacity).map_err(setup("cannot create the scoreboard"))?;
    Ok((listeners, from_systemd, control, board))
}

/// Takes the sockets and scoreboard of the previous image; binds only what the new config adds.
fn adopt_resources(
    config: &Config,
    h: &reload::Handover,
    problems: &mut Vec<String>,
) -> Result<Resources, MonitorError> {
    let mut handed: Vec<(Listener, bool)> = Vec::new();
    for l in &h.listeners {
        let listener = Listener::from_inherited(crate::sys::fd::adopt(l.fd))
            .map_err(setup("cannot adopt a listener"))?;
        handed.push((listener, l.activated));
    }
    // Whether each socket is systemd's travels with the socket, never with the tree: a stop must
    // leave systemd's sockets as they are and still close off tine's own (see `Monitor::stop`).
    let (listeners, from_systemd): (Vec<Listener>, Vec<bool>) =
        if !config.listen_given && handed.iter().any(|(_, a)| *a) {
            handed.into_iter().unzip()
        } else {
            let mut out = Vec::new();
            for addr in &config.listen {
                match handed
                    .iter()
                    .position(|(l, _)| same_listener(&l.addr(), addr))
                {
                    // A configured address that systemd's socket was bound to keeps that socket,
                    // and it stays systemd's: a stop must neither filter it nor remove its file
                    // (its socket unit goes on listening on it for the next start).
                    Some(i) => out.push(handed.remove(i)),
                    None => match Listener::bind_all(&Config {
                        listen: vec![addr.clone()],
                        ..config.clone()
                    }) {
                        Ok(l) => out.extend(l.into_iter().map(|l| (l, false))),
                        Err(e) => problems.push(e.to_string()),
                    },
                }
            }
            if out.is_empty() {
                // Nothing of the new config could be served: keep serving what was.
                problems.push("kept the previous listeners".into());
                out.append(&mut handed);
            }
            out.into_iter().unzip()
        };
    let control = match &h.control {
        Some((fd, path)) if *path == config.control_socket => {
            ControlServer::adopt(crate::sys::fd::adopt(*fd), path)
                .map_err(setup("cannot adopt the control socket"))?
        }
        other => match ControlServer::bind(&config.control_socket) {
            Ok(c) => {
                if let Some((fd, path)) = other {
                    drop(crate::sys::fd::adopt(*fd));
                    let _ = std::fs::remove_file(path);
                }
                c
            }
            Err(e) => match other {
                Some((fd, path)) => {
                    problems.push(format!("{e}; kept {}", path.display()));
                    ControlServer::adopt(crate::sys::fd::adopt(*fd), path)
                        .map_err(setup("cannot adopt the control socket"))?
                }
                None => return Err(MonitorError::Config(e.to_string())),
            },
        },
    };
    let (fd, capacity) = h.scoreboard;
    let board = match Scoreboard::adopt(crate::sys::fd::adopt(fd), capacity) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "cannot adopt the scoreboard; starting a new one (old children are retired)");
            Scoreboard::create(config.max_workers + config.refork_max_unavailable + 2)
                .map_err(setup("cannot create the scoreboard"))?
        }
    };
    Ok((listeners, from_systemd, control, board))
}

/// Whether a handed-over listener bound at `bound` serves the configured `wanted` address (a
/// configured port 0 matches whatever port the previous image got for the same IP).
fn same_listener(bound: &ListenAddr, wanted: &ListenAddr) -> bool {
    match (bound, wanted) {
        (ListenAddr::Tcp(b), ListenAddr::Tcp(w)) if w.port() == 0 => b.ip() == w.ip(),
        _ => bound == wanted,
    }
}

/// Sets `FD_CLOEXEC` again on every descriptor handed over across the re-exec (they crossed the
/// `execve` without it): none may leak into a program the tree runs later, such as the next
/// reload's preflight or a worker's subprocess.
fn restore_cloexec(h: &reload::Handover) {
    let fds = h
        .listeners
        .iter()
        .map(|l| l.fd)
        .chain(h.control.as_ref().map(|(fd, _)| *fd))
        .chain([h.scoreboard.0])
        .chain(h.children.iter().filter_map(|c| c.channel))
        .chain(h.waiters.iter().copied())
        .chain(h.metrics.map(|(fd, _)| fd));
    for fd in fds {
        if let Err(e) = crate::sys::io::set_cloexec(fd) {
            tracing::warn!(fd, error = %e, "cannot set FD_CLOEXEC on a handed-over descriptor");
        }
    }
}

/// Raises this process's soft `RLIMIT_NOFILE` to the hard limit (children inherit it: workers
/// hold a descriptor per connection). Returns the limit now in force.
fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return u64::MAX;
    };
    if soft >= hard {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => hard,
        Err(e) => {
            tracing::warn!(soft, hard, error = %e, "cannot raise RLIMIT_NOFILE to its hard limit");
            soft
        }
    }
}

/// Descriptors the monitor may hold with `config`: the standard three, the signalfd, scoreboard,
/// listeners, the control socket and its clients, the metrics socket and its clients, the watcher,
/// a reload's memfds and preflight, and per scoreboard slot a child's channel, its death notice
/// and its pidfd, plus the spare end of the channel being made for the next one.
/// Scoreboard slots: every worker, the replacements of a rollout, two molds, and the spares of
/// two generations (during a rollout).
fn scoreboard_slots(config: &Config) -> usize {
    config.max_workers + config.refork_max_unavailable + 2 + 2 * config.spare_workers
}

pub(crate) fn monitor_descriptors(config: &Config) -> u64 {
    let slots = scoreboard_slots(config);
    let fixed = 3 + 2 + config.listen.len() + 1 + super::control::MAX_CLIENTS;
    let metrics = if config.metrics_listen.is_some() {
        1 + super::metrics::MAX_CLIENTS
    } else {
        0
    };
    let reload_and_watch = 16;
    (fixed + metrics + reload_and_watch + 4 * slots) as u64
}

/// Refuses a `max_workers` whose children the monitor could not hold descriptors for under the
/// descriptor limit `limit` (`RLIMIT_NOFILE`, already raised to its hard limit).
pub(crate) fn check_descriptor_budget(config: &Config, limit: u64) -> Result<(), String> {
    let needed = monitor_descriptors(config);
    if needed <= limit {
        return Ok(());
    }
    Err(format!(
        "invalid value {} for `max_workers`: the monitor needs about {needed} file descriptors \
         for it (four per child) but RLIMIT_NOFILE allows {limit}; raise the hard limit \
         (LimitNOFILE= in the systemd unit, `ulimit -Hn`) or lower `max_workers`",
        config.max_workers
    ))
}

/// The descriptor limit a monitor started now would have (the hard `RLIMIT_NOFILE`), for
/// `tine check`.
pub(crate) fn nofile_hard_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(_, hard)| hard)
        .unwrap_or(u64::MAX)
}

/// Signals the monitor reads from its signalfd.
const HANDLED_SIGNALS: [Signal; 10] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGQUIT,
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGCHLD,
    Signal::SIGWINCH,
];

fn write_pid_file(path: &std::path::Path) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
    std::fs::rename(&tmp, path)
}

/// Forks a mold that runs `preload` (monomorphized per app): generation 0 at start and when
/// a mold must be replaced, a new generation on reload.
fn fork_mold<A: App>(m: &mut Monitor, generation: u32) -> std::io::Result<()> {
    let slot = m
        .free_slot()
        .ok_or_else(|| std::io::Error::other("no free scoreboard slot"))?;
    let (mine, theirs) = Channel::pair()?;
    m.board.clear(slot);
    // The pidfd is opened while the kernel keeps an exited child (`with_children_kept`). (The
    // child returns through it too and sets the flag back; its after-fork reset of every signal
    // action clears it again.)
    let forked = m.with_children_kept(|_| {
        process::fork().map(|f| match f {
            Forked::Parent(pid) => (f, crate::sys::pidfd::open_child(pid).ok()),
            Forked::Child => (f, None),
        })
    })?;
    match forked.0 {
        Forked::Parent(pid) => {
            drop(theirs);
            let mut c = Child::new(Kind::Mold, 0, generation, mine);
            c.pid = Some(pid);
            c.pidfd = forked.1;
            c.knows_spares = true;
            tracing::info!(pid = pid.as_raw(), "forked mold (gen:{generation})");
            m.children.insert(slot, c);
            Ok(())
        }
        Forked::Child => child::run_child(|| {
            // The monitor's priority boost is its own: the mold (and the workers it forks) run
            // at the tree's level. Raising a nice value needs no privilege.
            let _ = process::set_nice(priority::tree_nice());
            let mut keep: Vec<_> = m.listeners.iter().map(Listener::raw_fd).collect();
            keep.push(theirs.as_raw_fd());
            child::after_fork(m.pid, &keep, m.config.run_as, child::ForkedBy::Monitor);
            mold::run_generation_zero::<A>(mold::Start {
                monitor: m.pid,
                generation,
                slot,
                channel: theirs,
                listeners: &m.listeners,
                config: &m.config,
            })
        }),
    }
}
