//! Reload without downtime: preflight the executable on disk, re-exec in place handing every fd
//! over, adopt the children, then fork a fresh preloaded mold and roll every worker over.
//!
//! The handover is a JSON document in a memfd whose number travels in `TINE_HANDOVER_FD`; every fd
//! it names is inherited across `execve` (close-on-exec cleared just before). The PID, the
//! children (still ours: `execve` keeps them and the subreaper flag) and the listening sockets
//! stay; only the monitor's code and config change.

use std::collections::BTreeMap;
use std::ffi::{CString, OsString};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use serde::{Deserialize, Serialize};

use super::{Child, Kind, Monitor, Phase};
use crate::ipc::channel::Channel;
use crate::ipc::scoreboard::now_ms;

/// Format version of [`Handover`]; `tine check` prints it so a preflight can refuse a binary that
/// cannot read this one's handover.
pub const HANDOVER_VERSION: u32 = 1;
const HANDOVER_ENV: &str = "TINE_HANDOVER_FD";

/// Everything the next monitor image needs.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Handover {
    pub version: u32,
    pub listeners: Vec<HandedListener>,
    pub control: Option<(RawFd, std::path::PathBuf)>,
    pub scoreboard: (RawFd, usize),
    pub children: Vec<HandedChild>,
    pub target: usize,
    /// The `workers` of the configuration the old image ran with: if the new one says the same,
    /// the target a `ctl scale` or `TTIN`/`TTOU` set is kept.
    #[serde(default)]
    pub configured_workers: Option<usize>,
    /// `ctl reload` connections waiting for the outcome.
    pub waiters: Vec<RawFd>,
    /// When the reload started (ms on the monotonic clock, which survives exec).
    pub reload_started_ms: u64,
    pub restarts: BTreeMap<String, u64>,
    /// The metrics listener and its address.
    #[serde(default)]
    pub metrics: Option<(RawFd, std::net::SocketAddr)>,
    /// Abandoned rollouts by cause, the latest one, and whether the latest rollout failed.
    #[serde(default)]
    pub rollouts_failed: BTreeMap<String, u64>,
    #[serde(default)]
    pub last_rollout_failure: Option<super::rollout::Failure>,
    #[serde(default)]
    pub last_rollout_failed: bool,
    /// Starts that failed for lack of resources, for metrics.
    #[serde(default)]
    pub resource_errors_total: u64,
    /// The recent events (`ctl status`, `tine top`).
    #[serde(default)]
    pub events: Vec<super::events::Event>,
    /// The nice value of the tree (the one tine was started with): the monitor may run above it
    /// (`monitor_nice_boost`), and its new image must not take its own as the tree's.
    #[serde(default)]
    pub tree_nice: Option<i32>,
    /// Hot spares activated, for metrics.
    #[serde(default)]
    pub spare_activations: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct HandedListener {
    pub fd: RawFd,
    pub addr: String,
    /// Came from systemd socket activation (served when no `listen` is configured).
    pub activated: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct HandedChild {
    pub channel: Option<RawFd>,
    pub pid: i32,
    pub worker: bool,
    pub nr: u32,
    pub generation: u32,
    pub slot: usize,
    pub ready: bool,
    pub retiring: Option<String>,
    /// Marked for replacement, and why (a limit, a rolled-back generation).
    #[serde(default)]
    pub recycle: Option<String>,
    /// A hot spare (also `worker`: an older image that does not know spares takes it for a
    /// surplus worker, numbered out of range, and retires it).
    #[serde(default)]
    pub spare: bool,
    /// Whether the image that hands it over could ask it for spares (a mold) or activate it (a
    /// spare): it was forked or promoted by an image that speaks `SpawnSpare` and `Activate`,
    /// with that image's listening sockets. An image from before this field says nothing, so
    /// what it hands over is never asked (see `spares`).
    #[serde(default)]
    pub knows_spares: bool,
}

/// A reload in progress: who waits for it, and since when.
pub(crate) struct Progress {
    pub started_ms: u64,
    pub waiters: Vec<UnixStream>,
    /// Parts of the new configuration that could not be applied (reported as a failure).
    pub problems: Vec<String>,
}

/// Reads and removes the handover left by the previous image, if any.
pub(crate) fn take_handover() -> Result<Option<Handover>, String> {
    let Some(value) = std::env::var_os(HANDOVER_ENV) else {
        return Ok(None);
    };
    // Single-threaded here (start of the monitor): changing the environment is sound.
    std::env::remove_var(HANDOVER_ENV);
    let fd: RawFd = value
        .to_string_lossy()
        .parse()
        .ok()
        .filter(|fd| *fd >= 0)
        .ok_or_else(|| format!("bad {HANDOVER_ENV}"))?;
    let mut file = std::fs::File::from(crate::sys::fd::adopt(fd));
    let mut text = Vec::new();
    file.rewind()
        .and_then(|_| file.read_to_end(&mut text))
        .map_err(|e| format!("reading the handover: {e}"))?;
    parse_handover(&text).map(Some)
}

/// Most scoreboard slots a handover may name (`max_workers` is at most 4096, a rollout adds at
/// most as many again, and the spares of two generations).
const MAX_HANDED_SLOTS: usize = 2 * 4096 + 2 + 2 * crate::config::MAX_SPARE_WORKERS;

/// Parses and checks a handover: the right version, and nothing that the adoption would take on
/// trust and turn into harm: every descriptor non-negative and named once (each becomes an
/// owner that closes it), every pid positive (0 or -1 would make a signal hit a whole group or
/// every process), every slot inside the scoreboard.
fn parse_handover(bytes: &[u8]) -> Result<Handover, String> {
    let handover: Handover = serde_json::from_slice(bytes).map_err(|e| format!("handover: {e}"))?;
    if handover.version != HANDOVER_VERSION {
        return Err(format!(
            "handover version {} (this build reads {HANDOVER_VERSION})",
            handover.version
        ));
    }
    let (_, capacity) = handover.scoreboard;
    if capacity == 0 || capacity > MAX_HANDED_SLOTS {
        return Err(format!("handover: scoreboard of {capacity} slots"));
    }
    let fds = handover
        .listeners
        .iter()
        .map(|l| l.fd)
        .chain(handover.control.as_ref().map(|(fd, _)| *fd))
        .chain([handover.scoreboard.0])
        .chain(handover.children.iter().filter_map(|c| c.channel))
        .chain(handover.waiters.iter().copied())
        .chain(handover.metrics.map(|(fd, _)| fd));
    let mut seen = std::collections::BTreeSet::new();
    for fd in fds {
        if fd < 0 || !seen.insert(fd) {
            return Err(format!(
                "handover: descriptor {fd} is invalid or named twice"
            ));
        }
    }
    let mut slots = std::collections::BTreeSet::new();
    for c in &handover.children {
        if c.pid <= 0 {
            return Err(format!("handover: child pid {}", c.pid));
        }
        if c.slot >= capacity || !slots.insert(c.slot) {
            return Err(format!(
                "handover: child slot {} is invalid or named twice",
                c.slot
            ));
        }
    }
    Ok(handover)
}

/// A preflight under way: the executable on disk running `check` with the same arguments. The
/// monitor's loop goes on meanwhile; the check's exit arrives with SIGCHLD like any child's.
pub(crate) struct Preflight {
    child: std::process::Child,
    /// The check's stdout and stderr: memfds, not pipes, so that neither a chatty check nor a
    /// background process that inherited them can block the monitor reading them.
    output: (std::fs::File, std::fs::File),
    started: Instant,
    started_ms: u64,
    waiters: Vec<UnixStream>,
    status: Option<std::process::ExitStatus>,
    /// A pidfd for the check: how it ended when the kernel reaps children (`Monitor::reap`).
    pidfd: std::os::fd::OwnedFd,
}

/// How long a preflight may run before it is killed and the reload refused.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the executable on disk in check mode with the same arguments.
fn start_preflight() -> Result<(std::process::Child, (std::fs::File, std::fs::File)), String> {
    let exe = crate::sys::exe::saved_exe();
    let argv = crate::sys::exe::saved_argv();
    let serve = argv
        .iter()
        .position(|a| a == "serve")
        .ok_or("the saved command line has no `serve`")?;
    let memfd = |name: &str| -> Result<std::fs::File, String> {
        let name = CString::new(name).expect("no NUL");
        nix::sys::memfd::memfd_create(&name, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .map(std::fs::File::from)
            .map_err(|e| format!("memfd for the preflight: {e}"))
    };
    let (out, err) = (memfd("tine-preflight-out")?, memfd("tine-preflight-err")?);
    let dup = |f: &std::fs::File| f.try_clone().map_err(|e| e.to_string());
    let child = std::process::Command::new(exe)
        .arg("check")
        .args(&argv[serve + 1..])
        .stdin(std::process::Stdio::null())
        .stdout(dup(&out)?)
        .stderr(dup(&err)?)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    Ok((child, (out, err)))
}

/// Judges a finished preflight by its exit status and output.
fn judge_preflight(
    output: &mut (std::fs::File, std::fs::File),
    status: std::process::ExitStatus,
) -> Result<(), String> {
    /// Enough of the check's output to judge it and to quote its error.
    const KEEP: u64 = 64 * 1024;
    let read = |f: &mut std::fs::File| {
        let mut text = String::new();
        if f.rewind().is_ok() {
            let _ = f.take(KEEP).read_to_string(&mut text);
        }
        text
    };
    let out = read(&mut output.0);
    let err = read(&mut output.1);
    if !status.success() {
        let why = err
            .lines()
            .chain(out.lines())
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output")
            .trim()
            .to_string();
        return Err(format!(
            "new executable refused the configuration ({status}): {why}"
        ));
    }
    let wanted = format!("handover version {HANDOVER_VERSION}");
    if !out.contains(&wanted) {
        return Err(format!(
            "new executable does not speak {wanted}: {:?}",
            out.trim()
        ));
    }
    Ok(())
}

fn set_cloexec(fd: RawFd, on: bool) -> nix::Result<()> {
    fcntl(
        fd,
        FcntlArg::F_SETFD(if on {
            FdFlag::FD_CLOEXEC
        } else {
            FdFlag::empty()
        }),
    )
    .map(|_| ())
}

impl Monitor {
    /// `SIGHUP` / `ctl reload`: preflight, then re-exec with the handover. Returns only on failure
    /// (with everything left as it was), or at once if a reload is already under way.
    pub(crate) fn reload(&mut self, waiter: Option<UnixStream>, why: &str) {
        if let Some(progress) = &mut self.reload {
            tracing::info!("{why}: a reload is already in progress");
            progress.waiters.extend(waiter);
            return;
        }
        if let Some(preflight) = &mut self.preflight {
            tracing::info!("{why}: a reload is already being checked");
            preflight.waiters.extend(waiter);
            return;
        }
        if !self.is_running() {
            if let Some(w) = waiter {
                let _ = crate::ctl::protocol::send_reply(w, Err("stopping".into()));
            }
            return;
        }
        tracing::info!("{why}: reloading");
        self.events
            .push("reload", format!("reload requested ({why})"));
        super::systemd::notify_reloading(self);
        let waiters: Vec<UnixStream> = waiter.into_iter().collect();
        let started = self.with_children_kept(|_| {
            start_preflight().and_then(|(mut child, output)| {
                // Watched from the start (`with_children_kept`: a check that exits at once stays
                // a zombie until its pidfd is open).
                let pid = nix::unistd::Pid::from_raw(child.id() as i32);
                match crate::sys::pidfd::open_child(pid) {
                    Ok(pidfd) => Ok((child, output, pidfd)),
                    Err(e) => {
                        // Out of descriptors, say: still ours, so its pid is still its own.
                        if crate::sys::process::is_unreaped_child(pid) {
                            let _ = child.kill();
                        }
                        Err(format!("cannot watch the check process (pid {pid}): {e}"))
                    }
                }
            })
        });
        match started {
            Ok((child, output, pidfd)) => {
                self.preflight = Some(Preflight {
                    child,
                    output,
                    started: Instant::now(),
                    started_ms: now_ms(),
                    waiters,
                    status: None,
                    pidfd,
                })
            }
            Err(error) => self.refuse_reload(error, waiters),
        }
    }

    /// Called by `reap` with every exit status: true if it was the preflight's.
    pub(crate) fn preflight_exited(
        &mut self,
        pid: nix::unistd::Pid,
        status: std::process::ExitStatus,
    ) -> bool {
        match &mut self.preflight {
            Some(p) if p.child.id() as i32 == pid.as_raw() => {
                p.status = Some(status);
                true
            }
            _ => false,
        }
    }

    /// Whether a preflight runs whose status is not known yet (`poll_timeout` looks often).
    pub(crate) fn preflight_running(&self) -> bool {
        self.preflight.as_ref().is_some_and(|p| p.status.is_none())
    }

    /// With the kernel reaping children: takes the check's status from its pidfd once it has
    /// one (`Monitor::reap`).
    pub(crate) fn read_preflight_exit(&mut self) {
        if let Some(p) = &mut self.preflight {
            if p.status.is_none() {
                if let Ok(Some(raw)) = crate::sys::pidfd::exit_status(p.pidfd.as_fd()) {
                    p.status = Some(std::os::unix::process::ExitStatusExt::from_raw(raw));
                }
            }
        }
    }

    /// On every turn of the loop: once the preflight is done, re-exec or refuse; past its
    /// deadline, kill it and refuse.
    pub(crate) fn check_preflight(&mut self) {
        let Some(p) = &mut self.preflight else { return };
        let Some(status) = p.status else {
            if p.started.elapsed() > PREFLIGHT_TIMEOUT {
                // Through its pidfd: its pid may be someone else's once the kernel reaped it.
                // (Its exit is then the kernel's to reap, or the loop's `waitpid`, as an orphan.)
                let _ = crate::sys::pidfd::send_signal(
                    std::os::fd::AsFd::as_fd(&p.pidfd),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let mut p = self.preflight.take().expect("checked above");
                let error = format!(
                    "{} check did not finish within {} s",
                    crate::sys::exe::saved_exe().display(),
                    PREFLIGHT_TIMEOUT.as_secs()
                );
                self.refuse_reload(error, std::mem::take(&mut p.waiters));
            }
            return;
        };
        if self.children.values().any(|c| c.phase == Phase::Promoting) {
            // A worker half-way to becoming a mold cannot be handed over faithfully: exec once
            // the promotion has ended (it is bounded by spawn_timeout). One only chosen for
            // promotion (its replacement not ready yet, maybe for lack of resources) is handed
            // over as the worker it still is.
            return;
        }
        let mut p = self.preflight.take().expect("checked above");
        let mut waiters = std::mem::take(&mut p.waiters);
        let result = judge_preflight(&mut p.output, status).and_then(|()| {
            // Control clients already accepted would lose their connection at the exec.
            self.settle_control_clients(&mut waiters);
            if !self.is_running() {
                return Err("the server is stopping".to_string());
            }
            // The new image rolls every worker to a generation of its own; one on trial goes back
            // first, so that the reload's own rollback has the previous mold to go back to.
            self.interrupt_rollout("interrupted by a reload, which rolls every worker over");
            self.exec_with_handover(p.started_ms, &waiters)
        });
        // Only failures come back here.
        self.refuse_reload(result.err().unwrap_or_default(), waiters);
    }

    fn refuse_reload(&mut self, error: String, waiters: Vec<UnixStream>) {
        tracing::error!(error, "reload refused; the running service is unchanged");
        self.events
            .push("reload", format!("reload refused: {error}"));
        if self.is_running() {
            super::systemd::notify_ready(self, "reload failed; old generation serving");
        }
        for w in waiters {
            let _ = crate::ctl::protocol::send_reply(w, Err(format!("reload failed: {error}")));
        }
    }

    /// Answers every control client the loop has accepted but not served yet, before the exec
    /// closes their connections: `reload` joins this reload's waiters, any other command runs now.
    /// Clients still in the listener's backlog need nothing: the listener is handed over. A client
    /// that has not sent its whole command within a few milliseconds is told to retry.
    fn settle_control_clients(&mut self, waiters: &mut Vec<UnixStream>) {
        let Some(mut control) = self.control.take() else {
            return;
        };
        let deadline = Instant::now() + Duration::from_millis(50);
        loop {
            let mut served = false;
            for i in (0..control.client_fds().count()).rev() {
                let Some(request) = control.read(i) else {
                    continue;
                };
                served = true;
                if request.command.as_deref() == Ok("reload") {
                    waiters.push(request.client);
                } else {
                    let reply = self.run_command(request.command);
                    control.reply(request.client, reply);
                }
            }
            if control.client_fds().count() == 0 || Instant::now() >= deadline {
                break;
            }
            if !served {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        for fd in control.client_fds() {
            let _ = nix::unistd::write(
                fd,
                b"ERR the server is re-executing for a reload; try again\n",
            );
        }
        self.control = Some(control);
    }

    fn exec_with_handover(
        &mut self,
        started_ms: u64,
        waiters: &[UnixStream],
    ) -> Result<(), String> {
        // From here on a child that exits stays a zombie for the next image's `waitpid`: the
        // kernel would reap it, and its pidfd (close-on-exec) goes with this image. The exits
        // already seen are handled now.
        self.with_children_kept(|m| {
            if m.kernel_reaps {
                m.reap();
            }
            m.exec_with_handover_as_is(started_ms, waiters)
        })
    }

    fn exec_with_handover_as_is(
        &mut self,
        started_ms: u64,
        waiters: &[UnixStream],
    ) -> Result<(), String> {
        // The next image decides anew which spare may take a place on its own (an older one
        // never does): none may meanwhile.
        self.close_takeovers();
        let mut handover = Handover {
            version: HANDOVER_VERSION,
            listeners: self
                .listeners
                .iter()
                .zip(&self.from_systemd)
                .map(|(l, from_systemd)| HandedListener {
                    fd: l.raw_fd(),
                    addr: l.addr().to_string(),
                    activated: *from_systemd,
                })
                .collect(),
            control: self
                .control
                .as_ref()
                .map(|c| (c.listener_fd().as_raw_fd(), c.path().to_owned())),
            scoreboard: (self.board.fd().as_raw_fd(), self.board.capacity()),
            children: Vec::new(),
            target: self.target,
            configured_workers: Some(self.config.workers),
            waiters: waiters.iter().map(|w| w.as_raw_fd()).collect(),
            reload_started_ms: started_ms,
            restarts: self.restarts.clone(),
            rollouts_failed: self.rollouts_failed.clone(),
            last_rollout_failure: self.last_rollout_failure.clone(),
            last_rollout_failed: self.last_rollout_failed,
            resource_errors_total: self.resource_errors_total,
            events: self.events.to_vec(),
            tree_nice: Some(super::priority::tree_nice()),
            spare_activations: self.spare_activations,
            metrics: self.metrics.as_ref().and_then(|m| {
                m.local_addr()
                    .ok()
                    .map(|a| (m.listener_fd().as_raw_fd(), a))
            }),
        };
        for (slot, c) in &self.children {
            let Some(pid) = c.pid else { continue }; // never reported: its channel closes, it exits
            handover.children.push(HandedChild {
                channel: c.channel.as_ref().map(|ch| ch.as_raw_fd()),
                pid: pid.as_raw(),
                worker: c.kind != Kind::Mold,
                spare: c.kind == Kind::Spare,
                nr: c.nr,
                generation: if c.phase == Phase::Promoting {
                    c.promoted_generation
                } else {
                    c.generation
                },
                slot: *slot,
                ready: c.phase == Phase::Ready || c.phase == Phase::Promoting,
                retiring: match &c.phase {
                    Phase::Retiring { reason, .. } => Some(reason.clone()),
                    _ => None,
                },
                recycle: c.recycle.clone(),
                knows_spares: c.knows_spares,
            });
        }
        let mut fds: Vec<RawFd> = handover.listeners.iter().map(|l| l.fd).collect();
        fds.extend(handover.control.as_ref().map(|c| c.0));
        fds.push(handover.scoreboard.0);
        fds.extend(handover.metrics.map(|m| m.0));
        fds.extend(handover.children.iter().filter_map(|c| c.channel));
        fds.extend(&handover.waiters);
        let json = serde_json::to_vec(&handover).map_err(|e| e.to_string())?;
        let name = CString::new("tine-handover").expect("no NUL");
        let memfd = nix::sys::memfd::memfd_create(&name, nix::sys::memfd::MemFdCreateFlag::empty())
            .map_err(|e| e.to_string())?;
        let mut file = std::fs::File::from(memfd);
        file.write_all(&json)
            .map_err(|e| format!("writing the handover: {e}"))?;
        for fd in &fds {
            set_cloexec(*fd, false).map_err(|e| format!("fd {fd}: {e}"))?;
        }
        let exe = crate::sys::exe::saved_exe();
        let cstr = |s: &std::ffi::OsStr| CString::new(s.as_bytes()).map_err(|e| e.to_string());
        let path = cstr(exe.as_os_str())?;
        let argv: Vec<CString> = crate::sys::exe::saved_argv()
            .iter()
            .map(|a| cstr(a))
            .collect::<Result<_, _>>()?;
        let mut env: Vec<CString> = Vec::new();
        for (k, v) in std::env::vars_os() {
            if k == HANDOVER_ENV {
                continue;
            }
            let mut kv = OsString::from(&k);
            kv.push("=");
            kv.push(&v);
            env.push(cstr(&kv)?);
        }
        env.push(CString::new(format!("{HANDOVER_ENV}={}", file.as_raw_fd())).expect("no NUL"));
        tracing::info!(exe = %exe.display(), children = handover.children.len(), "re-executing with the handover");
        let error = nix::unistd::execve(&path, &argv, &env)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        // Still here: execve failed. Put the close-on-exec flags back.
        for fd in &fds {
            let _ = set_cloexec(*fd, true);
        }
        Err(format!("execve {}: {error}", exe.display()))
    }

    /// Rebuilds the children table from a handover; children that died meanwhile are reaped by
    /// the loop's first `reap`. `same_listeners`: this image serves exactly the listening sockets
    /// the previous one did, in the same order (an `Activate` passes them in this image's order,
    /// and a spare takes them back in its mold's).
    pub(crate) fn adopt_children(&mut self, handed: Vec<HandedChild>, same_listeners: bool) {
        let grace = self.config.graceful_timeout;
        for h in handed {
            let channel = h
                .channel
                .map(|fd| Channel::from_fd(crate::sys::fd::adopt(fd)));
            let kind = match (h.worker, h.spare) {
                (true, true) => Kind::Spare,
                (true, false) => Kind::Worker,
                (false, _) => Kind::Mold,
            };
            let Some(channel) = channel else { continue };
            let mut c = Child::new(kind, h.nr, h.generation, channel);
            let pid = nix::unistd::Pid::from_raw(h.pid);
            c.pid = Some(pid);
            // Still this process's child (an exec changes no parent); one that died meanwhile is
            // a zombie the loop's first `reap` collects.
            c.pidfd = crate::sys::pidfd::open_child(pid).ok();
            // Asked for spares (a mold) or activated (a spare) only if the previous image could,
            // with the same listening sockets: see `spares`.
            c.knows_spares = h.knows_spares && same_listeners;
            c.phase = match h.retiring {
                Some(reason) => Phase::Retiring {
                    reason,
                    kill_at: Instant::now() + grace,
                },
                None if h.ready => Phase::Ready,
                None => Phase::Starting,
            };
            // Still to be replaced (from whatever mold is current after the exec); a promotion
            // in view is not: the reload rolls every worker over anyway.
            c.recycle = h
                .recycle
                .filter(|r| c.kind == Kind::Worker && r != super::children::PROMOTE);
            // The tree served before the re-exec: its failed starts never end this image.
            if c.kind == Kind::Worker && c.phase == Phase::Ready {
                self.ever_served = true;
            }
            self.children.insert(h.slot, c);
        }
    }

    /// Forks the preloaded mold of a reload and records the reload as in progress.
    pub(crate) fn start_reloaded_generation(
        &mut self,
        started_ms: u64,
        waiters: Vec<UnixStream>,
        problems: Vec<String>,
    ) {
        let generation = self
            .children
            .values()
            .map(|c| c.generation)
            .max()
            .map(|g| g + 1)
            .unwrap_or(0);
        self.reload = Some(Progress {
            started_ms,
            waiters,
            problems,
        });
        self.begin_rollout(super::rollout::Cause::Reload, generation, Vec::new());
        if let Err(e) = (self.spawn_mold)(self, generation) {
            self.abandon_rollout(format!("cannot fork the new mold: {e}"));
        }
    }

    pub(crate) fn finish_reload(&mut self, outcome: Result<String, String>) {
        let Some(progress) = self.reload.take() else {
            return;
        };
        // New code runs, but part of the new configuration did not apply: say so, as a failure.
        let outcome = match outcome {
            Ok(msg) if !progress.problems.is_empty() => Err(format!(
                "{} but not all of the new configuration applies: {}",
                msg.trim(),
                progress.problems.join("; ")
            )),
            other => other,
        };
        match &outcome {
            Ok(msg) => tracing::info!("reload complete: {}", msg.trim()),
            Err(e) => tracing::error!("reload failed: {e}"),
        }
        self.events.push(
            "reload",
            match &outcome {
                Ok(msg) => format!("reload complete: {}", msg.trim()),
                Err(e) => format!("reload failed: {e}"),
            },
        );
        super::systemd::notify_ready(
            self,
            if outcome.is_ok() {
                "reloaded"
            } else {
                "reload failed; old generation serving"
            },
        );
        for w in progress.waiters {
            let _ = crate::ctl::protocol::send_reply(w, outcome.clone());
        }
    }
}

/// Adopts a `ctl reload` connection handed over by the previous image.
pub(crate) fn adopt_waiter(fd: RawFd) -> UnixStream {
    UnixStream::from(crate::sys::fd::adopt(fd))
}

/// Property-based fuzzing (proptest; `PROPTEST_CASES` raises the case count) of the handover
/// reader: any bytes are a handover or an error, never a panic, and an accepted handover names
/// no descriptor, pid or slot that adoption would misuse.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn handover() -> impl Strategy<Value = serde_json::Value> {
        let fd = prop_oneof![4 => 3..64i32, 1 => any::<i32>()];
        let child = (
            prop::option::of(fd.clone()),
            prop_oneof![4 => 2..100_000i32, 1 => any::<i32>()],
            0..20usize,
            any::<bool>(),
        )
            .prop_map(|(channel, pid, slot, worker)| {
                serde_json::json!({
                    "channel": channel, "pid": pid, "worker": worker, "nr": 0, "generation": 0,
                    "slot": slot, "ready": true, "retiring": null,
                })
            });
        (
            prop::collection::vec(fd.clone(), 0..3),
            fd.clone(),
            prop_oneof![4 => 1..64usize, 1 => any::<usize>()],
            prop::collection::vec(child, 0..4),
            prop::collection::vec(fd, 0..2),
            prop_oneof![9 => Just(HANDOVER_VERSION), 1 => any::<u32>()],
        )
            .prop_map(|(listeners, board_fd, capacity, children, waiters, version)| {
                let listeners: Vec<_> = listeners
                    .into_iter()
                    .map(|fd| serde_json::json!({"fd": fd, "addr": "127.0.0.1:1", "activated": false}))
                    .collect();
                serde_json::json!({
                    "version": version, "listeners": listeners, "control": null,
                    "scoreboard": [board_fd, capacity], "children": children, "target": 1,
                    "waiters": waiters, "reload_started_ms": 0, "restarts": {},
                })
            })
    }

    proptest! {
        #[test]
        fn any_bytes_are_a_handover_or_an_error(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_handover(&bytes);
        }

        #[test]
        fn an_accepted_handover_is_safe_to_adopt(doc in handover()) {
            let text = serde_json::to_vec(&doc).unwrap();
            if let Ok(h) = parse_handover(&text) {
                prop_assert_eq!(h.version, HANDOVER_VERSION);
                prop_assert!(h.scoreboard.1 > 0 && h.scoreboard.1 <= MAX_HANDED_SLOTS);
                let mut fds: Vec<RawFd> = h.listeners.iter().map(|l| l.fd).collect();
                fds.push(h.scoreboard.0);
                fds.extend(h.children.iter().filter_map(|c| c.channel));
                fds.extend(&h.waiters);
                prop_assert!(fds.iter().all(|fd| *fd >= 0));
                let n = fds.len();
                fds.sort_unstable();
                fds.dedup();
                prop_assert_eq!(fds.len(), n, "a descriptor named twice");
                for c in &h.children {
                    prop_assert!(c.pid > 0 && c.slot < h.scoreboard.1);
                }
            }
        }

        #[test]
        fn mutated_handovers_are_a_handover_or_an_error(
            doc in handover(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut text = serde_json::to_vec(&doc).unwrap();
            for (at, byte) in flips {
                let i = at.index(text.len());
                text[i] ^= byte;
            }
            let _ = parse_handover(&text);
        }
    }
}
