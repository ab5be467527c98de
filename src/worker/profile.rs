//! Seeing inside a worker: on-demand CPU profiles (flamegraphs) and the stacks of hung workers.
//!
//! Each worker runs one extra thread, `tine-profile`, started after `boot` and joined before the
//! worker exits or is promoted to a mold (a mold must be single-threaded). It sleeps on an eventfd
//! that the signal handlers of [`crate::sys::sampling`] write to, and does everything that may not
//! run in a signal handler:
//!
//! - `SIGUSR2` (or [`Command::Profile`](crate::ipc::message::Command::Profile) from `tine ctl
//!   profile`) starts a profile: `ITIMER_PROF` makes the kernel send `SIGPROF` to whichever thread
//!   of the worker uses the CPU, 99 times per CPU-second, and the handler records that thread's
//!   stack into a preallocated buffer. The next `SIGUSR2`, the time limit (`profile_max_seconds`,
//!   or the `--seconds` of `ctl profile`) or the worker's exit stops it; this thread then
//!   symbolizes the stacks (DWARF line tables: the release profile keeps them), writes the folded
//!   stacks and a flamegraph (inferno) to `profile_dir`, logs where, and tells the monitor.
//! - The monitor sends [`stack_signal`](crate::sys::sampling::stack_signal) to every thread of a
//!   worker it found hung; each records its own stack with the same unwinder, and this thread logs
//!   them, symbolized, with the request the worker was serving, before the monitor kills it.
//!
//! Why not the `pprof` crate: it keeps its sample table behind a process-wide `Lazy` that opens a
//! temporary file on first use and holds it for the life of the process. A worker that profiled
//! and was then promoted would pass that descriptor number to a mold whose workers close it after
//! their fork (docs/FORK_SAFETY.md), so a profile in one of them would write into, and then close,
//! whatever reused the number (a client's connection). Here the sample buffer lives only while a
//! profile runs, nothing is opened in signal context, and the thread and handlers are gone before
//! a promotion.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use crate::ipc::channel::Channel;
use crate::ipc::message::Report;
use crate::sys::sampling::{self, Stack};

/// Samples per second of CPU time while profiling.
pub const SAMPLE_HZ: u32 = 99;
/// Most samples one profile keeps (a sample takes about 1 KiB, touched only when taken; more are
/// counted as dropped).
const MAX_SAMPLES: usize = 1 << 16;
/// Longest stack text logged for a hung worker.
const MAX_STACK_TEXT: usize = 48 * 1024;

/// What the profiler thread of a worker needs to know.
pub(crate) struct Settings {
    /// Worker number and generation, for file names and titles.
    pub nr: u32,
    pub generation: u32,
    /// The worker's scoreboard slot (the request it serves, for hang stacks).
    pub slot: usize,
    /// Where profiles are written.
    pub dir: PathBuf,
    /// The longest a profile runs.
    pub max_seconds: u32,
    /// Runtime threads (sizes the sample buffer).
    pub threads: usize,
}

enum Request {
    Start { seconds: u32 },
    Shutdown,
}

/// The worker's profiler thread. [`Agent::shutdown`] (or dropping it) stops any profile, writing
/// it, and joins the thread.
pub(crate) struct Agent {
    thread: Option<std::thread::JoinHandle<()>>,
    requests: mpsc::Sender<Request>,
}

/// Asks the profiler thread for a profile (from the worker's command reader).
#[derive(Clone)]
pub(crate) struct Handle {
    requests: mpsc::Sender<Request>,
}

impl Handle {
    /// Starts a profile of `seconds` (capped by `profile_max_seconds`); the thread reports to the
    /// monitor when it starts, and when it is written or fails.
    pub(crate) fn start(&self, seconds: u32) {
        if self.requests.send(Request::Start { seconds }).is_ok() {
            sampling::wake(sampling::PENDING_REQUEST);
        }
    }
}

impl Agent {
    /// Installs the signal handlers and starts the thread; `channel` (a duplicate of the worker's)
    /// carries its reports to the monitor.
    pub(crate) fn start(settings: Settings, channel: Channel) -> std::io::Result<Agent> {
        sampling::install_handlers()?;
        let (requests, received) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("tine-profile".into())
            .spawn(move || {
                let mut thread = ProfilerThread {
                    settings,
                    channel,
                    running: None,
                };
                thread.run(received);
                sampling::uninstall_handlers();
            });
        match spawned {
            Ok(thread) => Ok(Agent {
                thread: Some(thread),
                requests,
            }),
            Err(e) => {
                sampling::uninstall_handlers();
                Err(e)
            }
        }
    }

    pub(crate) fn handle(&self) -> Handle {
        Handle {
            requests: self.requests.clone(),
        }
    }

    /// Stops a running profile (writing it), removes the handlers and joins the thread.
    pub(crate) fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let _ = self.requests.send(Request::Shutdown);
        sampling::wake(sampling::PENDING_REQUEST);
        let _ = thread.join();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A profile in progress.
struct Running {
    started: Instant,
    deadline: Instant,
    seconds: u32,
    /// Who started it (`SIGUSR2`, `tine ctl profile`), for the log.
    by: &'static str,
}

struct ProfilerThread {
    settings: Settings,
    channel: Channel,
    running: Option<Running>,
}

impl ProfilerThread {
    fn run(&mut self, requests: mpsc::Receiver<Request>) {
        self.report(&Report::ProfilerReady);
        loop {
            let timeout = self
                .running
                .as_ref()
                .map(|r| r.deadline.saturating_duration_since(Instant::now()));
            sampling::wait_for_wake(timeout);
            let pending = sampling::take_pending();
            let mut shutdown = false;
            while let Ok(request) = requests.try_recv() {
                match request {
                    Request::Start { seconds } => {
                        if self.running.is_some() {
                            self.report(&Report::ProfileFailed {
                                error: "this worker is already being profiled".into(),
                                still_running: true,
                            });
                        } else {
                            self.start(seconds, "tine ctl profile");
                        }
                    }
                    Request::Shutdown => shutdown = true,
                }
            }
            if pending & sampling::PENDING_TOGGLE != 0 {
                if self.running.is_some() {
                    self.finish("the second SIGUSR2");
                } else {
                    self.start(self.settings.max_seconds, "SIGUSR2");
                }
            }
            if pending & sampling::PENDING_STACK != 0 {
                self.log_stacks();
            }
            if self
                .running
                .as_ref()
                .is_some_and(|r| Instant::now() >= r.deadline)
            {
                let why = if self.running.as_ref().is_some_and(|r| r.by == "SIGUSR2") {
                    "profile_max_seconds"
                } else {
                    "its time (--seconds)"
                };
                self.finish(why);
            }
            if shutdown {
                if self.running.is_some() {
                    self.finish("the worker's exit or promotion");
                }
                return;
            }
        }
    }

    /// Sends a report to the monitor; a full channel is retried briefly, then the report dropped
    /// (the log still says what happened).
    fn report(&self, report: &Report) {
        for _ in 0..100 {
            match self.channel.send(report, &[]) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => return,
            }
        }
    }

    fn start(&mut self, seconds: u32, by: &'static str) {
        // A profile_dir that is missing or not a directory fails the profile now, not after it
        // ran for its whole length (the write checks again: the directory may go meanwhile).
        if let Err(e) = absolute(&self.settings.dir) {
            tracing::error!(error = %e, "cannot start profiling: nowhere to write the profile");
            self.report(&Report::ProfileFailed {
                error: format!("cannot start profiling: {e}"),
                still_running: false,
            });
            return;
        }
        let seconds = seconds.clamp(1, self.settings.max_seconds.max(1));
        let capacity = (seconds as usize)
            .saturating_mul(SAMPLE_HZ as usize)
            .saturating_mul(self.settings.threads.max(1))
            .saturating_add(64)
            .min(MAX_SAMPLES);
        match sampling::start_sampling(SAMPLE_HZ, capacity) {
            Ok(()) => {
                let now = Instant::now();
                self.running = Some(Running {
                    started: now,
                    deadline: now + Duration::from_secs(seconds as u64),
                    seconds,
                    by,
                });
                tracing::info!(
                    seconds,
                    hz = SAMPLE_HZ,
                    "profiling started ({by}); it stops at the next SIGUSR2, after {seconds} s, \
                     or when the worker exits"
                );
                self.report(&Report::ProfileStarted { seconds });
            }
            Err(e) => {
                let _ = sampling::stop_sampling();
                tracing::warn!(error = %e, "cannot start profiling");
                self.report(&Report::ProfileFailed {
                    error: format!("cannot start profiling: {e}"),
                    still_running: false,
                });
            }
        }
    }

    fn finish(&mut self, why: &str) {
        let Some(running) = self.running.take() else {
            return;
        };
        let samples = sampling::stop_sampling().unwrap_or_default();
        let elapsed = running.started.elapsed();
        match self.write(&samples, elapsed) {
            Ok(written) => {
                tracing::info!(
                    svg = %written.svg.display(),
                    folded = %written.folded.display(),
                    samples = written.samples,
                    dropped = samples.dropped,
                    seconds = format!("{:.1}", elapsed.as_secs_f64()),
                    "profile written (stopped by {why}; started by {}, limit {} s)",
                    running.by,
                    running.seconds
                );
                self.report(&Report::ProfileWritten {
                    svg: written.svg.display().to_string(),
                    samples: written.samples,
                });
            }
            Err(e) => {
                tracing::error!(error = %e, dir = %self.settings.dir.display(), "cannot write the profile");
                self.report(&Report::ProfileFailed {
                    error: format!("cannot write the profile: {e}"),
                    still_running: false,
                });
            }
        }
    }

    fn write(&self, samples: &sampling::Samples, elapsed: Duration) -> std::io::Result<Written> {
        let pid = std::process::id();
        let unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let dir = absolute(&self.settings.dir)?;
        // A hot spare activated after this agent started has its number only since then.
        let nr = crate::app::Worker::current_nr().unwrap_or(self.settings.nr);
        let base = format!("tine-profile-worker{nr}-{pid}-{unix}");
        let folded_path = dir.join(format!("{base}.folded"));
        let svg_path = dir.join(format!("{base}.svg"));
        let mut symbols = Symbolizer::default();
        let lines = fold(&samples.stacks, &mut symbols);
        release_symbols();
        let mut folded = String::new();
        for line in &lines {
            folded.push_str(line);
            folded.push('\n');
        }
        write_atomically(&folded_path, folded.as_bytes())?;
        let mut options = inferno::flamegraph::Options::default();
        options.title = format!(
            "tine worker[{nr}] (gen:{}) pid {pid}",
            self.settings.generation
        );
        options.subtitle = Some(format!(
            "{} samples at {SAMPLE_HZ} Hz of CPU time over {:.1} s{}",
            samples.stacks.len(),
            elapsed.as_secs_f64(),
            if samples.dropped > 0 {
                format!(" ({} dropped: buffer full)", samples.dropped)
            } else {
                String::new()
            }
        ));
        options.count_name = "samples".into();
        let mut svg = Vec::new();
        if lines.is_empty() {
            // inferno refuses an empty profile; an idle worker still gets a (blank) picture.
            let idle = "(no CPU used while profiling) 1".to_string();
            inferno::flamegraph::from_lines(&mut options, std::iter::once(idle.as_str()), &mut svg)
        } else {
            inferno::flamegraph::from_lines(
                &mut options,
                lines.iter().map(String::as_str),
                &mut svg,
            )
        }
        .map_err(std::io::Error::other)?;
        write_atomically(&svg_path, &svg)?;
        Ok(Written {
            svg: svg_path,
            folded: folded_path,
            samples: samples.stacks.len() as u64,
        })
    }

    /// Logs the stacks the threads recorded on the monitor's signal (this worker is hung).
    fn log_stacks(&self) {
        // The monitor signals every thread; wait (briefly) until the last one has recorded.
        let mut claimed = sampling::stacks_claimed();
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(20));
            let now = sampling::stacks_claimed();
            if now == claimed {
                break;
            }
            claimed = now;
        }
        let me = nix::unistd::gettid().as_raw() as u32;
        let stacks: Vec<Stack> = sampling::take_stacks()
            .into_iter()
            .filter(|s| s.tid != me)
            .collect();
        if stacks.is_empty() {
            return;
        }
        let request = crate::ipc::scoreboard::try_global()
            .and_then(|b| b.read(self.settings.slot))
            .filter(|v| v.pid == std::process::id() as i32 && v.in_flight > 0)
            .map(|v| v.request)
            .unwrap_or_else(|| "none".into());
        let mut symbols = Symbolizer::default();
        let lines = describe_stacks(&stacks, &mut symbols);
        release_symbols();
        // One record per line: a log line never spans lines (the log escapes newlines), and each
        // frame stays greppable.
        tracing::error!(
            request = %request,
            threads = stacks.len(),
            "stack of this hung worker, taken on the monitor's request before it ends the worker \
             (innermost frame first):"
        );
        for line in lines {
            tracing::error!("{line}");
        }
    }
}

struct Written {
    svg: PathBuf,
    folded: PathBuf,
    samples: u64,
}

/// `profile_dir` as an absolute path (relative to the working directory), which must exist.
fn absolute(dir: &Path) -> std::io::Result<PathBuf> {
    match std::fs::canonicalize(dir) {
        Ok(dir) if dir.is_dir() => Ok(dir),
        Ok(_) => Err(std::io::Error::other(format!(
            "profile_dir {} is not a directory",
            dir.display()
        ))),
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            format!("profile_dir {}: {e}", dir.display()),
        )),
    }
}

/// Writes `path` through a temporary file and a rename: whoever sees the name sees it whole.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let written = std::fs::File::create(&tmp).and_then(|mut f| f.write_all(bytes));
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(std::io::Error::new(
            e.kind(),
            format!("{}: {e}", path.display()),
        ));
    }
    Ok(())
}

/// Frees the debug information read to symbolize (tens of MiB for a debug build): a worker profiled
/// once should not keep it.
fn release_symbols() {
    backtrace::clear_symbol_cache();
    crate::sys::process::release_free_memory();
}

/// Where a worker's own stack begins: below it are the frames of the mold and the monitor that
/// forked it (a worker starts as a copy of its mold, in the middle of its code), which say nothing
/// about the worker.
const WORKER_ROOT: &str = "tine::worker::run";

/// A source file as a person reads it: `tokio-1.48.0/src/...` rather than the registry's path,
/// `library/core/...` rather than the compiler's.
fn short_path(path: &str) -> &str {
    if let Some(at) = path.find("/registry/src/") {
        let rest = &path[at + "/registry/src/".len()..];
        return rest
            .split_once('/')
            .map_or(rest, |(_, crate_path)| crate_path);
    }
    if let Some(rest) = path.strip_prefix("/rustc/") {
        return rest.split_once('/').map_or(rest, |(_, library)| library);
    }
    path
}

/// One source-level frame of an instruction address (an address inside inlined code has several).
#[derive(Clone)]
struct Frame {
    name: String,
    location: Option<String>,
}

/// Symbolizes addresses of this process, caching by address.
#[derive(Default)]
struct Symbolizer {
    cache: HashMap<usize, Vec<Frame>>,
}

impl Symbolizer {
    /// The frames at `ip`, innermost first. `exact` for the interrupted instruction itself; every
    /// other address is a return address, looked up one byte back (inside the call).
    fn frames(&mut self, ip: usize, exact: bool) -> &[Frame] {
        let lookup = if exact { ip } else { ip.saturating_sub(1) };
        self.cache.entry(lookup).or_insert_with(|| {
            let mut frames = Vec::new();
            backtrace::resolve(lookup as *mut std::ffi::c_void, |symbol| {
                let name = symbol
                    .name()
                    .map(|n| format!("{n:#}"))
                    .unwrap_or_else(|| format!("{lookup:#x}"));
                let location = symbol.filename().map(|file| {
                    let file = file.display().to_string();
                    match symbol.lineno() {
                        Some(line) => format!("{}:{line}", short_path(&file)),
                        None => short_path(&file).to_string(),
                    }
                });
                frames.push(Frame { name, location });
            });
            if frames.is_empty() {
                frames.push(Frame {
                    name: format!("{lookup:#x}"),
                    location: None,
                });
            }
            frames
        })
    }
}

/// The name of thread `tid` of this process, if it still exists.
fn thread_name(tid: u32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .map(|n| n.trim().to_string())
        .unwrap_or_else(|_| format!("thread {tid}"))
}

/// A stack's source-level frames, innermost first, cut below [`WORKER_ROOT`]; whether it was cut.
fn symbolized(stack: &Stack, symbols: &mut Symbolizer) -> (Vec<Frame>, bool) {
    let mut frames = Vec::new();
    for (i, ip) in stack.frames.iter().enumerate() {
        for frame in symbols.frames(*ip, i == 0) {
            frames.push(frame.clone());
            if frame.name == WORKER_ROOT {
                return (frames, true);
            }
        }
    }
    (frames, false)
}

/// Folded stacks (`root;...;leaf COUNT`), sorted, one per distinct stack; the root frame is the
/// thread's name.
fn fold(stacks: &[Stack], symbols: &mut Symbolizer) -> Vec<String> {
    let mut names: HashMap<u32, String> = HashMap::new();
    let mut counts: HashMap<String, u64> = HashMap::new();
    for stack in stacks {
        let thread = names
            .entry(stack.tid)
            .or_insert_with(|| thread_name(stack.tid))
            .clone();
        let mut line = clean(&thread);
        for frame in symbolized(stack, symbols).0.iter().rev() {
            line.push(';');
            line.push_str(&clean(&frame.name));
        }
        *counts.entry(line).or_default() += 1;
    }
    let mut lines: Vec<String> = counts
        .into_iter()
        .map(|(stack, n)| format!("{stack} {n}"))
        .collect();
    lines.sort();
    lines
}

/// A frame name as folded stacks can carry it: `;` separates frames, and a newline ends a line.
fn clean(name: &str) -> String {
    name.replace(';', ",").replace(['\n', '\r'], " ")
}

/// Each thread's stack, innermost frame first, with source locations, one line per frame; at most
/// [`MAX_STACK_TEXT`] bytes in all.
fn describe_stacks(stacks: &[Stack], symbols: &mut Symbolizer) -> Vec<String> {
    let mut lines = Vec::new();
    let mut size = 0;
    'threads: for stack in stacks {
        let (frames, at_root) = symbolized(stack, symbols);
        lines.push(format!(
            "thread {:?} (tid {}):",
            thread_name(stack.tid),
            stack.tid
        ));
        for (n, frame) in frames.iter().enumerate() {
            let line = match &frame.location {
                Some(at) => format!("  #{n} {} at {at}", frame.name),
                None => format!("  #{n} {}", frame.name),
            };
            size += line.len();
            if size > MAX_STACK_TEXT {
                lines.push("  ... (cut: a hung worker's stacks are limited to 48 KiB)".into());
                break 'threads;
            }
            lines.push(line);
        }
        if !at_root && stack.frames.len() == sampling::MAX_FRAMES {
            lines.push(format!(
                "  ... (outer frames cut: at most {} addresses are recorded)",
                sampling::MAX_FRAMES
            ));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_identical_stacks_and_names_the_thread_first() {
        let mut frames = Vec::new();
        backtrace::trace(|frame| {
            frames.push(frame.ip() as usize);
            true
        });
        let tid = nix::unistd::gettid().as_raw() as u32;
        let stack = Stack { tid, frames };
        let lines = fold(&[stack.clone(), stack], &mut Symbolizer::default());
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line = &lines[0];
        assert!(line.ends_with(" 2"), "{line}");
        assert!(
            line.contains("folds_identical_stacks_and_names_the_thread_first"),
            "{line}"
        );
    }

    #[test]
    fn frame_names_cannot_break_the_folded_format() {
        assert_eq!(clean("<[u8; 4] as Foo>::bar\n"), "<[u8, 4] as Foo>::bar ");
    }
}
