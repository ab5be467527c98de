//! The processes forked by the spawner: the spawner's own loop, and the job worker's loop.
//!
//! Both are single-threaded and never return: they end with `_exit`, so no destructor of the
//! user's program (forked along with it) ever runs in them.

use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{getppid, setpgid, Pid};

use super::job::Registry;
use super::wire::{
    self, Call, Failure, FromSpawner, FromWorker, PanicReport, Received, Receiver, Status,
    ToSpawner, ToWorker,
};
use crate::sys::process::{
    close_fds_except, exit_now, reset_signals, set_parent_death_signal, set_thread_name, Forked,
};

/// One diagnostic line on stderr, never a panic (`eprintln!` panics when stderr is gone): the
/// server's writer when it is built, which never waits either and counts what it drops.
#[cfg(feature = "server")]
use crate::log::print_stderr;

/// One diagnostic line on stderr, never a panic (`eprintln!` panics when stderr is gone). Without
/// the server's log these rare lines are one plain write each, a failure ignored.
#[cfg(not(feature = "server"))]
fn print_stderr(message: impl std::fmt::Display) {
    let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{message}\n").as_bytes());
}

/// Exit code of a process whose own code failed unexpectedly (EX_SOFTWARE).
const EXIT_INTERNAL: i32 = 70;
/// Exit code of a worker after a job panicked.
const EXIT_PANICKED: i32 = 101;
/// How long the spawner waits for a worker that closed its channel to be reapable before it
/// kills it (it may have left a child holding the channel open).
const REAP_PATIENCE: Duration = Duration::from_secs(1);

/// Runs the spawner process; `parent` is the user's process, `ctl` its end of the control channel.
pub(crate) fn spawner_main(ctl: OwnedFd, registry: Registry, parent: Pid) -> ! {
    let code =
        match std::panic::catch_unwind(AssertUnwindSafe(|| spawner_loop(ctl, &registry, parent))) {
            Ok(()) => 0,
            Err(_) => EXIT_INTERNAL,
        };
    exit_now(code)
}

struct Children {
    live: HashSet<i32>,
    released: HashSet<i32>,
}

fn spawner_loop(ctl: OwnedFd, registry: &Registry, parent: Pid) {
    // Own process group: a Ctrl-C on the terminal reaches the user's process, whose death then
    // takes the spawner and its workers down in order (parent-death signals).
    let _ = setpgid(Pid::from_raw(0), Pid::from_raw(0));
    if set_parent_death_signal(Signal::SIGKILL).is_err() || getppid() != parent {
        return;
    }
    let _ = reset_signals();
    let _ = close_fds_except(&[0, 1, 2, ctl.as_raw_fd()]);
    set_thread_name("tine-spawner");
    let me = nix::unistd::getpid();
    let mut rx = Receiver::new();
    let mut kids = Children {
        live: HashSet::new(),
        released: HashSet::new(),
    };
    loop {
        kids.reap_released();
        let timeout = if kids.released.is_empty() {
            PollTimeout::NONE
        } else {
            PollTimeout::from(5u8)
        };
        let mut fds = [PollFd::new(ctl.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
        let (body, fds) = match rx.recv(ctl.as_fd(), true) {
            Ok(Received::Message(body, fds)) => (body, fds),
            Ok(Received::WouldBlock) => continue,
            Ok(Received::Eof) => break,
            // A malformed request from our own parent: drop it, keep serving.
            Err(e) => {
                print_stderr(format_args!(
                    "tine-spawner: ignoring a malformed request: {e}"
                ));
                continue;
            }
        };
        let request: ToSpawner = match wire::decode(&body) {
            Ok(r) => r,
            Err(e) => {
                print_stderr(format_args!(
                    "tine-spawner: ignoring a malformed request: {e}"
                ));
                continue;
            }
        };
        let reply = match request {
            ToSpawner::Spawn { one_shot } => match spawn(registry, me, one_shot, fds) {
                Ok((pid, end)) => {
                    kids.live.insert(pid);
                    let ok = wire::encode(&FromSpawner::Spawned { pid })
                        .and_then(|body| wire::send(ctl.as_fd(), &body, &[end.as_raw_fd()]));
                    if ok.is_err() {
                        break;
                    }
                    continue;
                }
                Err(e) => FromSpawner::SpawnFailed(e.to_string()),
            },
            ToSpawner::Reap { pid, kill: k } => FromSpawner::Reaped {
                pid,
                status: kids.reap(pid, k),
            },
            ToSpawner::Release { pid, kill: k } => {
                if kids.live.contains(&pid) {
                    if k {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                    kids.released.insert(pid);
                }
                continue;
            }
        };
        if wire::encode(&reply)
            .and_then(|body| wire::send(ctl.as_fd(), &body, &[]))
            .is_err()
        {
            break;
        }
    }
    // The user's process closed the channel or died: take every worker down with us.
    for pid in &kids.live {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    for pid in kids.live.clone() {
        let _ = waitpid(Pid::from_raw(pid), None);
    }
}

impl Children {
    fn reap_released(&mut self) {
        let done: Vec<i32> = self
            .released
            .iter()
            .copied()
            .filter(|pid| {
                !matches!(
                    waitpid(Pid::from_raw(*pid), Some(WaitPidFlag::WNOHANG)),
                    Ok(WaitStatus::StillAlive)
                )
            })
            .collect();
        for pid in done {
            self.released.remove(&pid);
            self.live.remove(&pid);
        }
    }

    fn reap(&mut self, pid: i32, kill_first: bool) -> Status {
        if !self.live.remove(&pid) {
            return Status::Unknown;
        }
        self.released.remove(&pid);
        let target = Pid::from_raw(pid);
        if kill_first {
            let _ = kill(target, Signal::SIGKILL);
        }
        let start = Instant::now();
        let mut nap = Duration::from_micros(20);
        loop {
            let flags = if start.elapsed() < REAP_PATIENCE {
                Some(WaitPidFlag::WNOHANG)
            } else {
                None
            };
            if flags.is_none() {
                let _ = kill(target, Signal::SIGKILL);
            }
            match waitpid(target, flags) {
                Ok(WaitStatus::Exited(_, code)) => return Status::Exited(code),
                Ok(WaitStatus::Signaled(_, sig, core)) => {
                    return Status::Signaled {
                        signal: sig as i32,
                        core,
                    }
                }
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return Status::Unknown,
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(5));
        }
    }
}

/// Forks one worker; returns its pid and the caller's end of its channel.
fn spawn(
    registry: &Registry,
    me: Pid,
    one_shot: Option<Call>,
    fds: Vec<OwnedFd>,
) -> std::io::Result<(i32, OwnedFd)> {
    let (caller_end, worker_end) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    match crate::sys::spawner::fork_single_threaded()? {
        Forked::Child => {
            drop(caller_end);
            let job = one_shot.map(|call| (call, fds));
            let code = std::panic::catch_unwind(AssertUnwindSafe(|| {
                worker_main(worker_end, registry, me, job)
            }));
            exit_now(code.unwrap_or(EXIT_INTERNAL))
        }
        Forked::Parent(pid) => Ok((pid.as_raw(), caller_end)),
    }
}

/// The worker's channel, for the panic hook.
static CHANNEL: OnceLock<OwnedFd> = OnceLock::new();

thread_local! {
    /// True on the worker's main thread while it runs a job: a panic there is the job's.
    static IN_JOB: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The last panic the hook saw on the job's thread, for the report if it escapes the job.
    static LAST_PANIC: std::cell::RefCell<Option<PanicReport>> =
        const { std::cell::RefCell::new(None) };
}

fn worker_main(
    chan: OwnedFd,
    registry: &Registry,
    spawner: Pid,
    one_shot: Option<(Call, Vec<OwnedFd>)>,
) -> i32 {
    if set_parent_death_signal(Signal::SIGKILL).is_err() || getppid() != spawner {
        return 0;
    }
    let mut keep: Vec<RawFd> = vec![0, 1, 2, chan.as_raw_fd()];
    if let Some((_, fds)) = &one_shot {
        keep.extend(fds.iter().map(|f| f.as_raw_fd()));
    }
    if close_fds_except(&keep).is_err() {
        return EXIT_INTERNAL;
    }
    set_thread_name("tine-job");
    let chan = CHANNEL.get_or_init(|| chan);
    install_panic_hook();
    if let Some((call, fds)) = one_shot {
        return match run_call(registry, call, fds) {
            Some(()) => 0,
            None => EXIT_PANICKED,
        };
    }
    let mut rx = Receiver::new();
    // Set by the caller of the last job: spin for the next one, or sleep at once.
    let mut spin = Duration::ZERO;
    loop {
        let received = match rx.spin(chan.as_fd(), spin) {
            Ok(Received::WouldBlock) => rx.recv(chan.as_fd(), false),
            other => other,
        };
        let (body, fds) = match received {
            Ok(Received::Message(body, fds)) => (body, fds),
            Ok(Received::WouldBlock) => continue,
            // The pool let go of this worker (or the user's process is gone).
            Ok(Received::Eof) => return 0,
            Err(e) => {
                print_stderr(format_args!(
                    "tine-job: bad message from the pool, exiting: {e}"
                ));
                return EXIT_INTERNAL;
            }
        };
        let call = match wire::decode::<ToWorker>(&body) {
            Ok(ToWorker::Run(call)) => call,
            Err(e) => {
                reply(&FromWorker::Failed(Failure::Decode(e.to_string())), &[]);
                continue;
            }
        };
        spin = Duration::from_micros(call.spin_us.into());
        if run_call(registry, call, fds).is_none() {
            return EXIT_PANICKED;
        }
    }
}

/// Runs one call and answers it; `None` if a panic escaped the job (the worker then exits).
fn run_call(registry: &Registry, call: Call, fds: Vec<OwnedFd>) -> Option<()> {
    let Some(handler) = registry.get(&call.job) else {
        reply(&FromWorker::Failed(Failure::UnknownJob(call.job)), &[]);
        return Some(());
    };
    IN_JOB.with(|f| f.set(true));
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| handler(&call.payload, fds)));
    IN_JOB.with(|f| f.set(false));
    // What the hook saw of the last panic on this thread; a panic the job caught itself leaves
    // one here too, and is no failure.
    let hooked = LAST_PANIC.with(|p| p.take());
    match result {
        Ok(Ok(encoded)) => {
            reply(&FromWorker::Done(encoded.bytes), &encoded.fds);
            Some(())
        }
        Ok(Err(failure)) => {
            reply(&FromWorker::Failed(failure), &[]);
            Some(())
        }
        Err(payload) => {
            // The escaping panic is the last one the hook saw, unless the job replaced the hook:
            // then the payload is all there is.
            let report = hooked.unwrap_or_else(|| PanicReport {
                message: payload_text(payload.as_ref()),
                backtrace: None,
            });
            reply(&FromWorker::Failed(Failure::Panicked(report)), &[]);
            None
        }
    }
}

fn reply(msg: &FromWorker, fds: &[RawFd]) {
    let Some(chan) = CHANNEL.get() else { return };
    match wire::encode(msg) {
        Ok(body) => {
            if body.len() > wire::MAX_MESSAGE {
                // The caller would refuse it: tell it why instead of leaving it waiting.
                let why = format!(
                    "the output is {} bytes encoded, over the wire's limit of {} (pass big data as \
                     a descriptor, e.g. a memfd)",
                    body.len(),
                    wire::MAX_MESSAGE
                );
                return reply(&FromWorker::Failed(Failure::Encode(why)), &[]);
            }
            // A caller that went away (cancelled) shows up as EPIPE: nothing to tell anyone.
            let _ = wire::send(chan.as_fd(), &body, fds);
        }
        Err(e) => print_stderr(format_args!("tine-job: cannot encode a reply: {e}")),
    }
}

/// Most bytes of a panic's backtrace sent to the caller; the rest is cut at a line boundary.
pub(crate) const MAX_BACKTRACE: usize = 32 * 1024;

fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "Box<dyn Any>".to_string())
}

/// The frames of a captured backtrace that belong to the job, bounded to [`MAX_BACKTRACE`]
/// bytes: like Rust's short backtraces, without the panic machinery above the panic and without
/// the worker's own frames below the job.
fn bounded_backtrace(trace: &std::backtrace::Backtrace) -> Option<String> {
    if trace.status() != std::backtrace::BacktraceStatus::Captured {
        return None;
    }
    Some(job_frames(&trace.to_string()))
}

/// Frames above the panic that are not the job's: this hook, the panic runtime.
const PANIC_MACHINERY: &[&str] = &[
    "install_panic_hook",
    "core::ops::function::Fn",
    "alloc::boxed::Box<dyn",
    "std::panicking::",
    "core::panicking::",
    "rust_begin_unwind",
    "__rust_end_short_backtrace",
    "std::backtrace",
];
/// The first frame below the job: where tine's worker called it.
const WORKER_FRAME: &str = "tine::spawner::job::handle";

/// Cuts a rendered backtrace (`N: symbol` lines, each followed by `at file:line` lines) down to
/// the job's frames, renumbered from 0, and to [`MAX_BACKTRACE`] bytes.
fn job_frames(rendered: &str) -> String {
    let mut frames: Vec<(&str, Vec<&str>)> = Vec::new();
    for line in rendered.lines() {
        let trimmed = line.trim_start();
        match trimmed.split_once(": ") {
            Some((n, symbol)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                frames.push((symbol, Vec::new()))
            }
            _ => {
                if let Some((_, lines)) = frames.last_mut() {
                    lines.push(trimmed);
                }
            }
        }
    }
    let first = frames
        .iter()
        .position(|(symbol, _)| !PANIC_MACHINERY.iter().any(|m| symbol.contains(m)))
        .unwrap_or(0);
    let last = frames
        .iter()
        .skip(first)
        .position(|(symbol, _)| symbol.contains(WORKER_FRAME))
        .map_or(frames.len(), |i| first + i);
    let mut text = String::new();
    for (i, (symbol, lines)) in frames[first..last].iter().enumerate() {
        let mut frame = format!("{i:>4}: {symbol}\n");
        for line in lines {
            frame.push_str(&format!("             {line}\n"));
        }
        if text.len() + frame.len() > MAX_BACKTRACE {
            text.push_str(&format!(
                "      [{} more frames cut by tine]\n",
                last - first - i
            ));
            break;
        }
        text.push_str(&frame);
    }
    text
}

/// On the job's thread, tells the caller of every panic as it happens (`Panicking`), before the
/// previous hook (which prints it) and before any unwinding or abort: with `panic = "abort"` or a
/// panic while unwinding, that note is the only word of the panic that gets out. The caller treats
/// it as final only if the worker then dies of SIGABRT; a panic the job catches itself is no
/// failure. The note goes out once the previous hook has printed the panic, so a worker is never
/// killed in the middle of writing its backtrace.
fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !IN_JOB.with(|f| f.get()) {
            previous(info);
            return;
        }
        let text = payload_text(info.payload());
        let message = match info.location() {
            Some(loc) => format!("{text} (at {}:{})", loc.file(), loc.line()),
            None => text,
        };
        // `capture` honours RUST_BACKTRACE / RUST_LIB_BACKTRACE: nothing is walked when they are
        // off.
        let backtrace = bounded_backtrace(&std::backtrace::Backtrace::capture());
        let report = PanicReport { message, backtrace };
        previous(info);
        reply(&FromWorker::Panicking(report.clone()), &[]);
        LAST_PANIC.with(|p| *p.borrow_mut() = Some(report));
    }));
}
