//! Chaos: under a strict load (POSTs that are never retried), a seeded random schedule of the
//! faults and operator actions a production tree meets — `kill -9` of workers and of the mold,
//! `USR2` (refork), `HUP` (reload), `TTIN`/`TTOU`, `tine ctl scale N`, `tine ctl kill-worker NR`,
//! and `kill -9` of what a refork or reload just started (the promoted worker turning into the new
//! mold, a reload's new mold) — and then the tree must be whole again:
//!
//! - the monitor never dies;
//! - after the chaos the tree converges, within [`CONVERGE_TIMEOUT`], to the target the operator
//!   asked for: that many workers, numbered 0..N, all ready, none older than the mold (its rollout
//!   is complete), one mold, no other child of the monitor;
//! - the monitor's open descriptors and the zombies tine must reap (children of the monitor, a
//!   subreaper, and of the mold) are what they were before the chaos (the tree is scaled back to
//!   its first size to compare like with like);
//! - every lost request is excused by a `kill -9`: it was written on a connection that the killed
//!   process held at the moment of the kill. To know which connections those are, each process is
//!   frozen (`SIGSTOP`) just before its kill, so it cannot accept another one, and its server-side
//!   sockets are matched to the client's local ports through `/proc/net/tcp`. A connection whose
//!   last response came from the killed pid (`x-tine-worker`) is attributed to it as well (the
//!   kill by `ctl kill-worker` is done by the monitor, which may pick another process of that
//!   number). A request lost on any other connection is a failure: every other event is a graceful
//!   path and must lose nothing.
//!
//! What the machine, not tine, caused is excused and reported apart, never silently: a `ctl`
//! call that timed out while samples showed the monitor and the client waiting for a CPU, or the
//! monitor idle while the kernel held the client as it started, mapping a file (this VM's memory
//! monitor, `kdamond`, holds a shared library's mapping lock for seconds under load: see
//! [`SYS_MAPPING`]; a step that never returns prints every blocked thread on the machine); a read
//! that timed out while the whole machine stalled; and an operator command that failed, a read
//! that timed out or an event that ran past [`EVENT_HARD_LIMIT`] while the kernel itself reported
//! starving its own threads (`/dev/kmsg`: "rcu_preempt kthread starved for N jiffies",
//! "workqueue lockup ... stuck for Ns"; see `common::kmsg`), as this CI VM's kernel
//! (`PREEMPT_NONE`) sometimes does for up to a minute under load. The invariants above (the
//! monitor alive, the tree converged, descriptors and zombies flat) are never excused.
//!
//! The schedule is random with a seed printed at the start; `CHAOS_SEED=N` replays it (the timing
//! of a busy machine still varies). `CHAOS_SECONDS=N` sets the length of the chaos (default
//! [`DEFAULT_CHAOS_SECONDS`]; `bench/chaos/` runs it for ten minutes). `CHAOS_EXAMPLE=NAME`
//! serves an example app (`examples/NAME.rs`, e.g. `tokio_full` or `axum`) instead of the `tine`
//! binary's `hello`, and `CHAOS_PATH` sets the path the load POSTs to (default `/`).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::status::{child_rows, Row};
use common::strict::{Lost, StrictLoad, StrictReport};
use common::*;
use nix::sys::signal::Signal;

/// Length of the chaos in the suite: about a minute (with start-up and convergence, a little more).
const DEFAULT_CHAOS_SECONDS: u64 = 60;
/// Workers at start (and after the final scale back, for the descriptor comparison).
const START_WORKERS: usize = 3;
/// The chaos keeps the target within 1..=MAX_TARGET (a 2-core machine).
const MAX_TARGET: usize = 4;
/// Client connections of the strict load (the measurements used 16).
const CONNECTIONS: usize = 16;
/// Longest the tree may take to converge after the chaos (a debug build on 2 busy cores; a
/// graceful rollout of a few workers takes well under a second when nothing is wrong).
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Descriptors the monitor may hold beyond its start count after convergence (a control
/// connection being closed while it is counted).
const FD_TOLERANCE: usize = 2;
/// An event taking longer than this is reported with the time of each of its steps (a `ctl`
/// call or a signal's effect that waits).
const SLOW_EVENT: Duration = Duration::from_secs(2);
/// An event taking longer than this is a stall, printed as one (not a failure: on two cores at a
/// load average of 50 one `ctl` call may use its whole [`CTL_TIMEOUT`]).
const STALLED_EVENT: Duration = Duration::from_secs(10);
/// An event taking longer than this fails the test, naming the event and the step it is stuck
/// in. Every step has its own bound (a `ctl` call [`CTL_TIMEOUT`], a wait for a log line 5 s,
/// for a freeze 2 s) and an event's steps stay under this unless one of them blocks without
/// bound (a `/proc` read, a spawn) or two `ctl` calls both time out (itself a failure). A
/// watchdog thread enforces it when the step never returns: it kills the tree and ends the test
/// process, since the harness cannot interrupt a blocked thread.
const EVENT_HARD_LIMIT: Duration = Duration::from_secs(30);
/// The hard limit of an event during which the kernel reported starving its own threads (see
/// [`common::kmsg`]): it reports only after 30–60 s of it, and everything waits meanwhile.
const KERNEL_STARVED_LIMIT: Duration = Duration::from_secs(90);
/// How far around a window of kernel starvation a failure still counts as inside it (the kernel's
/// stamps and its "stuck for" figures are coarse).
const KERNEL_MARGIN: Duration = Duration::from_secs(5);
/// Pause between two events: at random within this range (pacing of the schedule).
const GAP_MS: (u64, u64) = (20, 250);

// ---------------------------------------------------------------------------------------------
// The schedule

/// A small seeded generator (splitmix64): the schedule must be replayable from one printed
/// number, and this is all the randomness the test needs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[self.next() as usize % items.len()])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    KillWorker,
    KillMold,
    Refork,
    Reload,
    Ttin,
    Ttou,
    Scale,
    CtlKillWorker,
    /// `USR2` or `HUP`, then `kill -9` of the process it starts: the promoted worker while it turns
    /// into the new mold, or the reload's new mold before it is ready (the states a rollout
    /// passes through, which an arbitrary pick almost never meets).
    KillInTransition,
}

/// Relative frequency of each kind.
const WEIGHTS: &[(Kind, u64)] = &[
    (Kind::KillWorker, 3),
    (Kind::KillMold, 1),
    (Kind::Refork, 2),
    (Kind::Reload, 1),
    (Kind::Ttin, 1),
    (Kind::Ttou, 1),
    (Kind::Scale, 1),
    (Kind::CtlKillWorker, 2),
    (Kind::KillInTransition, 1),
];

fn pick_kind(rng: &mut Rng) -> Kind {
    let total: u64 = WEIGHTS.iter().map(|(_, w)| w).sum();
    let mut n = rng.next() % total;
    for (kind, w) in WEIGHTS {
        if n < *w {
            return *kind;
        }
        n -= w;
    }
    unreachable!()
}

/// A SIGKILL the chaos caused: the process, when, and the client ports of the connections it
/// held then (`None` when it could not be frozen and looked at first).
#[derive(Debug)]
struct Kill {
    pid: i32,
    /// When the process was frozen (it served nothing after), or, if it was not, the start of
    /// the window in which the monitor killed it.
    at: Instant,
    /// The end of that window. For a frozen process: when the stop was seen to take effect
    /// (between `at` and then it may still have accepted connections, which it then held).
    until: Instant,
    /// How long it stayed frozen before the SIGKILL (zero when it was not frozen).
    frozen_for: Duration,
    ports: Option<HashSet<u16>>,
}

/// The steps of the event under way, timed, shared with the watchdog (which names the step an
/// event is stuck in) and reported for slow events.
#[derive(Clone, Default)]
struct Steps(Arc<Mutex<StepsState>>);

#[derive(Default)]
struct StepsState {
    /// The event under way and when it began (`None` between events).
    event: Option<(String, Instant)>,
    /// The step under way and when it began.
    current: Option<(String, Instant)>,
    /// The finished steps of this event and how long each took.
    done: Vec<(String, Duration)>,
    /// The chaos is over: the watchdog ends.
    over: bool,
}

impl Steps {
    fn state(&self) -> std::sync::MutexGuard<'_, StepsState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn begin_event(&self, what: &str) {
        let mut s = self.state();
        s.event = Some((what.to_string(), Instant::now()));
        s.current = None;
        s.done.clear();
    }

    /// Ends the step under way (if any) and begins `what`.
    fn step(&self, what: impl Into<String>) {
        let mut s = self.state();
        if let Some((name, began)) = s.current.take() {
            s.done.push((name, began.elapsed()));
        }
        s.current = Some((what.into(), Instant::now()));
    }

    /// Ends the event: its steps with their durations.
    fn end_event(&self) -> Vec<(String, Duration)> {
        let mut s = self.state();
        if let Some((name, began)) = s.current.take() {
            s.done.push((name, began.elapsed()));
        }
        s.event = None;
        std::mem::take(&mut s.done)
    }

    /// Where the event under way is, and when it began, if it has run past `limit`.
    fn overdue(&self, limit: Duration) -> Option<(String, Instant)> {
        let s = self.state();
        let (what, began) = s.event.as_ref()?;
        if began.elapsed() <= limit {
            return None;
        }
        let (step, step_began) = s.current.as_ref()?;
        let text = format!(
            "event {what} has run for {:?}, {:?} of it in the step \"{step}\" (done before it: {})",
            began.elapsed(),
            step_began.elapsed(),
            describe_steps(&s.done)
        );
        Some((text, *began))
    }
}

/// Steps and their durations, the ones that took time (or the longest if none did).
fn describe_steps(steps: &[(String, Duration)]) -> String {
    let notable: Vec<String> = steps
        .iter()
        .filter(|(_, d)| *d >= Duration::from_millis(100))
        .map(|(name, d)| format!("{name} {d:.2?}"))
        .collect();
    if !notable.is_empty() {
        return notable.join(", ");
    }
    steps
        .iter()
        .max_by_key(|(_, d)| *d)
        .map(|(name, d)| format!("longest: {name} {d:.2?}"))
        .unwrap_or_else(|| "none".into())
}

/// The kernel's log, read for its reports of starving its own threads (`None` when `/dev/kmsg`
/// cannot be read): shared by the loop, the watchdog and the summary.
type Kernel = Arc<Mutex<Option<common::kmsg::KernelLog>>>;

/// The kernel's report of starving its own threads, if one covers part of `[began, ended]`.
fn kernel_starved_during(kernel: &Kernel, began: Instant, ended: Instant) -> Option<String> {
    let mut kernel = kernel.lock().unwrap_or_else(|e| e.into_inner());
    let reports = kernel.as_mut()?.starvation();
    starvation_during(&reports, began, ended).map(|w| w.line.clone())
}

/// The first of `reports` that covers part of `[began, ended]` (with [`KERNEL_MARGIN`]).
fn starvation_during(
    reports: &[common::kmsg::Starvation],
    began: Instant,
    ended: Instant,
) -> Option<&common::kmsg::Starvation> {
    reports
        .iter()
        .find(|w| w.overlaps(began, ended, KERNEL_MARGIN))
}

/// Fails the test when an event runs past [`EVENT_HARD_LIMIT`] and never returns: prints where
/// it is stuck, kills the tree (the monitor first, so it starts nothing more) and ends the test
/// process with a failure (a blocked thread cannot be interrupted, nor the harness told).
fn start_watchdog(
    steps: Steps,
    kernel: Kernel,
    monitor: i32,
    seed: u64,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(500));
        if steps.state().over {
            return;
        }
        // The loop fails the test itself when the event returns; give it a moment to.
        let Some((stuck, began)) = steps.overdue(EVENT_HARD_LIMIT + Duration::from_secs(5)) else {
            continue;
        };
        // While the kernel says it starves its own threads, nothing can be asked to be on time.
        if began.elapsed() < KERNEL_STARVED_LIMIT
            && kernel_starved_during(&kernel, began, Instant::now()).is_some()
        {
            continue;
        }
        // Written to the process's stderr directly: `eprintln!` in a thread the test started is
        // captured with the test's output, which `exit` below throws away unprinted (a CI run
        // ended with exit code 101 and not a word of why).
        let say = |line: String| {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "{line}");
        };
        say(format!(
            "chaos: FAILED (seed {seed}): {stuck}; over the hard limit of {EVENT_HARD_LIMIT:?}: killing the tree and ending the test"
        ));
        // What the slow `ctl` calls saw (the kernel side of the monitor and the client, and the
        // monitor's log meanwhile): the only trace of a stuck monitor this exit path keeps.
        let stalls = CTL_STALLS.lock().unwrap_or_else(|e| e.into_inner());
        for stall in stalls.iter().rev().take(6).rev() {
            say(format!("chaos: {stall}"));
        }
        drop(stalls);
        // What every blocked thread on the machine, and every thread of this test's own tree,
        // is doing now: a step stuck before its `ctl` call even sampled (blocked in the spawn
        // of `tine ctl`, say) leaves no other trace. Streamed line by line, bounded: reading a
        // thread's stack can itself wait.
        let dump = std::thread::spawn(move || {
            for line in stuck_threads(Suspects::AllOf(std::process::id() as i32)) {
                say(format!("chaos: stuck: {line}"));
            }
        });
        let until = Instant::now() + Duration::from_secs(10);
        while !dump.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        // The monitor is the test's child, not reaped: its number is its own. The others are
        // signalled through pidfds (a number may be reused by then).
        signal(monitor, Signal::SIGSTOP);
        for p in tree_states(monitor) {
            if let Some(process) = common::pidfd::ProcessHandle::descendant_of(p.pid, monitor) {
                process.signal(Signal::SIGKILL);
            }
        }
        signal(monitor, Signal::SIGKILL);
        std::process::exit(101);
    })
}

/// Whose threads [`stuck_threads`] lists.
#[derive(Clone, Copy)]
enum Suspects {
    /// The test is over: every thread of this process and of its descendants (the tree, a
    /// `tine ctl` client) whatever its state, besides the machine's blocked and runnable ones.
    AllOf(i32),
    /// The test goes on: the machine's blocked and runnable threads outside the tree under this
    /// monitor (and outside any process named `tine…`). A tree process's threads are not looked
    /// up: the `/proc/PID/task/TID` entries a
    /// look-up leaves make the monitor's reap of that process spin (see `name_runtime_thread` in
    /// src/worker/mod.rs; a sampling that listed them caused a 10 s reap).
    OutsideTree(i32),
}

/// The threads worth reading when a step never returns, each with its state, `wchan`, system
/// call, CPU time and kernel stack (see [`Suspects`]). Yields lines as it goes (see the
/// watchdog).
fn stuck_threads(suspects: Suspects) -> impl Iterator<Item = String> {
    let all = proc_table();
    let (Suspects::AllOf(root) | Suspects::OutsideTree(root)) = suspects;
    let mut under: HashSet<i32> = descendants_in(&all, root).map(|p| p.pid).collect();
    under.insert(root);
    all.into_iter().flat_map(move |p| {
        let ours = matches!(suspects, Suspects::AllOf(_)) && under.contains(&p.pid);
        // Also by name: a worker whose parent (the mold's forking child) was reaped between the
        // reads of the table would look outside the tree.
        let skipped = matches!(suspects, Suspects::OutsideTree(_))
            && (under.contains(&p.pid) || p.comm.starts_with("tine"));
        let tasks = if skipped { Vec::new() } else { task_ids(p.pid) };
        tasks.into_iter().filter_map(move |tid| {
            let thread = ThreadSample::read(p.pid, &tid, 16)?;
            (ours || thread.state == 'D' || thread.state == 'R').then(|| {
                format!(
                    "{}/{tid} ({}){} {}",
                    p.pid,
                    thread.comm,
                    if ours { " ours" } else { "" },
                    thread.text
                )
            })
        })
    })
}

// ---------------------------------------------------------------------------------------------
// Watched `ctl` calls

/// A `ctl` call still outstanding after this is sampled (see [`ctl`]).
const CTL_SAMPLE_AFTER: Duration = Duration::from_secs(1);
/// Samples kept per stalled call.
const CTL_SAMPLES: usize = 12;

/// What was seen during `ctl` calls that took over [`CTL_SAMPLE_AFTER`]: printed at the end.
static CTL_STALLS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Every `ctl` call of the chaos: how many, the slowest, and the failures (a `ctl status` that
/// fails is otherwise only a `None` to its caller).
#[derive(Default)]
struct CtlStats {
    calls: u64,
    over_100ms: u64,
    slowest: Duration,
    failures: Vec<String>,
}

static CTL_STATS: Mutex<CtlStats> = Mutex::new(CtlStats {
    calls: 0,
    over_100ms: 0,
    slowest: Duration::ZERO,
    failures: Vec::new(),
});

/// A stall of the whole machine (or of this test process): a thread that wakes every 50 ms woke
/// `gap` late. `accounted` is the CPU time `/proc/stat` counted meanwhile, per CPU, busy or idle:
/// about `gap` when the machine ran (this process was starved), far less when the machine itself
/// was stopped (a paused virtual machine counts no ticks).
struct MachineStall {
    at: Instant,
    gap: Duration,
    accounted: f64,
    busy: f64,
    steal: f64,
}

/// The `cpu` line of `/proc/stat`: user, nice, system, idle, iowait, irq, softirq, steal (ticks).
fn cpu_ticks() -> Vec<u64> {
    std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// Watches for machine stalls (see [`MachineStall`]) until `over` is set.
fn start_stall_watch(
    over: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<MachineStall>> {
    std::thread::spawn(move || {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        // USER_HZ: 100 on every Linux architecture tine supports.
        let per_second = 100.0 * cpus;
        let mut stalls = Vec::new();
        let mut last = (Instant::now(), cpu_ticks());
        while !over.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
            let now = (Instant::now(), cpu_ticks());
            let gap = now.0.duration_since(last.0);
            if gap > Duration::from_secs(1) && now.1.len() == 8 && last.1.len() == 8 {
                let d: Vec<f64> = now
                    .1
                    .iter()
                    .zip(&last.1)
                    .map(|(b, a)| b.saturating_sub(*a) as f64 / per_second)
                    .collect();
                stalls.push(MachineStall {
                    at: last.0,
                    gap,
                    accounted: d.iter().sum(),
                    busy: d.iter().sum::<f64>() - d[3] - d[4],
                    steal: d[7],
                });
            }
            last = now;
        }
        stalls
    })
}

/// `tine ctl ARGS` (as [`common::ctl`]: a child process, as an operator runs it, bounded by
/// [`CTL_TIMEOUT`]), watched: while the call is outstanding past [`CTL_SAMPLE_AFTER`], the kernel
/// side of the monitor and of the `tine ctl` process is sampled every 250 ms (see
/// [`sample_procs`]); the samples and the monitor's log lines of that time go to [`CTL_STALLS`].
/// A `ctl` reply that waits seconds is the symptom this test hunts: the samples say whether the
/// monitor was blocked (and in what), runnable but not run, or never asked.
fn ctl(server: &Server, args: &[&str]) -> Result<String, CtlError> {
    let began = Instant::now();
    let mark = server.log.mark();
    let mut child = std::process::Command::new(tine_bin())
        .arg("ctl")
        .arg("--control-socket")
        .arg(&server.control_socket)
        .args(args)
        .env_remove("TINE_CONTROL_SOCKET")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| CtlError {
            text: format!("spawn tine ctl: {e}"),
            starved: false,
        })?;
    let spawned = began.elapsed();
    let pid = child.id() as i32;
    let out = Log::capture(child.stdout.take().expect("stdout"));
    let err = Log::capture(child.stderr.take().expect("stderr"));
    let mut samples = Vec::new();
    let mut probes: Vec<(Duration, Probe)> = Vec::new();
    let mut next_sample = began + CTL_SAMPLE_AFTER;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        let now = Instant::now();
        if now.duration_since(began) >= CTL_TIMEOUT {
            break None;
        }
        if now >= next_sample {
            next_sample = now + Duration::from_millis(250);
            let monitor = server.pid;
            let at = now.duration_since(began);
            // Unreaped, so `pid` is still this call's process. The probe (states and system
            // calls, what the verdict on a timeout rests on) is taken until the end of the call,
            // first and on its own: a slow text sample must not cost it.
            if let Some(probe) = bounded(Duration::from_secs(1), move || Probe::of(monitor, pid)) {
                probes.push((at, probe));
            }
            if samples.len() < CTL_SAMPLES {
                // The first sample and every fourth also list the machine's blocked and runnable
                // threads: a client blocked on a lock (seen: `tine ctl` in `D` on libc's mapping
                // lock) is held up by whoever holds it.
                let machine = samples.len() % 4 == 0;
                let seen = bounded(Duration::from_secs(1), move || {
                    let mut text = sample_procs(&[("monitor", monitor), ("tine ctl", pid)]);
                    if machine {
                        for line in stuck_threads(Suspects::OutsideTree(monitor)) {
                            text.push_str(&format!("\n      machine: {line}"));
                        }
                    }
                    text
                });
                samples.push(match seen {
                    Some(text) => format!("at {at:.2?}: {text}"),
                    None => format!("at {at:.2?}: reading /proc did not return within 1 s"),
                });
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = began.elapsed();
    if status.is_none() {
        let _ = child.kill();
        // Reaped only if it dies soon: a client in uninterruptible sleep (seen: blocked 35 s and
        // more mapping a file while it started, see [`SYS_MAPPING`]) dies only when the kernel
        // lets it, and an unbounded `wait` here held the whole chaos loop past its hard limit.
        let dead = poll_until(Duration::from_secs(2), || {
            child.try_wait().ok().flatten().map(|_| ())
        });
        if dead.is_none() {
            std::thread::spawn(move || {
                let _ = child.wait();
            });
        }
    }
    {
        let mut stats = CTL_STATS.lock().unwrap_or_else(|e| e.into_inner());
        stats.calls += 1;
        stats.over_100ms += u64::from(took > Duration::from_millis(100));
        stats.slowest = stats.slowest.max(took);
        if !status.is_some_and(|s| s.success()) && stats.failures.len() < 20 {
            let why = match status {
                Some(s) => format!("{s}: {}", err.text()),
                None => "killed at the limit".into(),
            };
            stats
                .failures
                .push(format!("ctl {args:?} after {took:.2?}: {why}"));
        }
    }
    if took >= CTL_SAMPLE_AFTER {
        let lines = server.log.lines();
        let during: Vec<&String> = lines.iter().skip(mark).take(40).collect();
        let mut text = format!(
            "ctl {args:?} took {took:.2?} (spawning it {spawned:.2?}){}\n",
            if status.is_none() {
                ", killed at the limit"
            } else {
                ""
            }
        );
        for s in &samples {
            text.push_str(&format!("    {s}\n"));
        }
        text.push_str("    monitor log meanwhile:\n");
        for l in during {
            text.push_str(&format!("      {l}\n"));
        }
        CTL_STALLS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(text);
    }
    let Some(status) = status else {
        let starved = starved_not_stalled(&probes);
        let text = format!(
            "tine ctl {args:?} did not finish within {CTL_TIMEOUT:?}: {}",
            match &starved {
                Ok(why) => format!("excused: {why}"),
                Err(why) => why.clone(),
            }
        );
        if starved.is_ok() {
            STARVED_CTL
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(text.clone());
        }
        return Err(CtlError {
            text,
            starved: starved.is_ok(),
        });
    };
    out.wait_eof(Duration::from_secs(2));
    err.wait_eof(Duration::from_secs(2));
    if status.success() {
        Ok(out.lines().iter().map(|l| format!("{l}\n")).collect())
    } else {
        Err(CtlError {
            text: format!("{status}: {}", err.text()),
            starved: false,
        })
    }
}

/// A `ctl` call that failed: why, and whether it only timed out because the machine did not run
/// the monitor or the client (see [`starved_not_stalled`]).
#[derive(Debug)]
struct CtlError {
    text: String,
    starved: bool,
}

impl std::fmt::Display for CtlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// `ctl` calls that timed out while the machine, not the monitor, was the cause: reported, not
/// failed.
static STARVED_CTL: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// What a sample saw of the monitor and of the `ctl` client: their states (`R` runnable, `S`
/// asleep, `D` uninterruptible…), the system call the monitor is in (`None` while it runs), and
/// its CPU time so far.
#[derive(Debug, Clone, Copy)]
struct Probe {
    monitor_state: char,
    monitor_syscall: Option<u64>,
    monitor_cpu_ms: u64,
    client_state: char,
    /// The system call the client is in (`None` while it runs).
    client_syscall: Option<u64>,
}

impl Probe {
    fn of(monitor: i32, client: i32) -> Probe {
        let state = |pid: i32| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.rfind(')')
                .and_then(|i| stat.get(i + 2..))
                .and_then(|rest| rest.chars().next())
                .unwrap_or('?')
        };
        let syscall = |pid: i32| {
            std::fs::read_to_string(format!("/proc/{pid}/syscall"))
                .ok()
                .and_then(|text| syscall_number(&text))
        };
        let cpu = std::fs::read_to_string(format!("/proc/{monitor}/schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            / 1_000_000;
        Probe {
            monitor_state: state(monitor),
            monitor_syscall: syscall(monitor),
            monitor_cpu_ms: cpu,
            client_state: state(client),
            client_syscall: syscall(client),
        }
    }
}

/// The system call that `/proc/PID/syscall` names: its number, [`FAULTING`] for `-1` (blocked
/// outside any system call: in a page fault), `None` for `running`.
fn syscall_number(text: &str) -> Option<u64> {
    let call: i64 = text.split_whitespace().next()?.parse().ok()?;
    Some(if call < 0 { FAULTING } else { call as u64 })
}

/// `poll(2)`: the monitor's loop sleeps in it between events.
const SYS_POLL: u64 = libc::SYS_poll as u64;
/// `exit_group(2)`: a `ctl` client in it has printed its reply and is ending.
const SYS_EXIT_GROUP: u64 = libc::SYS_exit_group as u64;
/// What `/proc/PID/syscall` says (`-1`) of a thread blocked outside any system call: in a page
/// fault. A `ctl` client asleep (`D`) in one waits for the kernel to read a page of a file it maps
/// (its executable, a library) from disk: seen for 10 s in a CI run whose disk writeback was
/// throttled (`folio_wait_bit_common < filemap_fault`), with the monitor idle in `poll`.
const FAULTING: u64 = u64::MAX;
/// `mmap(2)`: its fifth argument is the descriptor of the file it maps.
const SYS_MMAP: u64 = libc::SYS_mmap as u64;
/// The system calls in which a process maps or unmaps files (`mmap`, `mprotect`,
/// `munmap`, `execve`): a `ctl` client asleep (`D`) in one of them while it starts has not
/// reached the monitor yet. It waits for a file's mapping lock (`i_mmap_rwsem` of the `tine`
/// executable or of a shared library every process maps), which this VM's kernel memory
/// monitor (`kdamond`, DAMON's physical-address sampling) holds while it walks the file's
/// mappings: seen held 35 s and more under the chaos load, with the monitor idle meanwhile.
const SYS_MAPPING: [u64; 4] = [
    SYS_MMAP,
    libc::SYS_mprotect as u64,
    libc::SYS_munmap as u64,
    libc::SYS_execve as u64,
];

/// Whether a `ctl` call that timed out was only kept waiting for a CPU (`Ok`, with the evidence),
/// or the monitor stalled (`Err`, with what it was seen doing). Starved: in every sample the
/// monitor or the client was runnable (waiting for a CPU, or running), or the monitor was idle
/// with the client in `exit_group` (its reply printed, the kernel tearing it down) or held by the
/// kernel (`D`) mapping a file or paging one in (see [`SYS_MAPPING`], [`FAULTING`]: running its own
/// code, not waiting for a reply), and the monitor did not spend the time computing (a busy loop would be a stall too). Stalled: a sample with both
/// asleep in something other than the monitor's `poll` with the client waiting for its reply
/// (the monitor blocked in a system call, or not woken for a request it had), or no sample at all.
fn starved_not_stalled(probes: &[(Duration, Probe)]) -> Result<String, String> {
    let (Some((first_at, first)), Some((last_at, last))) = (probes.first(), probes.last()) else {
        return Err("not sampled".into());
    };
    let mut held_by_kernel = 0;
    for (at, p) in probes {
        let monitor_waits_for_cpu = p.monitor_state == 'R';
        let client_waits_for_cpu = p.client_state == 'R';
        let monitor_idle = p.monitor_state == 'S' && p.monitor_syscall == Some(SYS_POLL);
        // Seen in a 600 s run: the client stuck for over 9 s in `exit_group`, in D state in
        // exit_mmap -> free_pgtables -> unlink_file_vma_batch_process (the lock of the file
        // mapping every process of the tree shares: the tine executable), with its reply
        // printed and the monitor idle. The kernel's, not the monitor's.
        let client_exiting = p.client_syscall == Some(SYS_EXIT_GROUP);
        // The client blocked mapping a file while it starts (see [`SYS_MAPPING`]), or reading a
        // page of one in a fault (see [`FAULTING`]): held by the kernel while it runs its own code,
        // not waiting for the monitor.
        let client_held_by_kernel = p.client_state == 'D'
            && p.client_syscall
                .is_some_and(|call| SYS_MAPPING.contains(&call) || call == FAULTING);
        held_by_kernel += usize::from(monitor_idle && client_held_by_kernel);
        if !(monitor_waits_for_cpu
            || client_waits_for_cpu
            || (monitor_idle && (client_exiting || client_held_by_kernel)))
        {
            return Err(format!(
                "at {at:.2?} the monitor was {} (syscall {:?}) and the client {}: {}",
                p.monitor_state,
                p.monitor_syscall.map(|call| call as i64),
                p.client_state,
                if monitor_idle {
                    "the monitor sleeps in poll while the client waits for its reply"
                } else {
                    "the monitor is blocked"
                }
            ));
        }
    }
    let sampled = last_at.saturating_sub(*first_at);
    let cpu = last.monitor_cpu_ms.saturating_sub(first.monitor_cpu_ms);
    if sampled > Duration::from_millis(500) && cpu as u128 * 2 > sampled.as_millis() {
        return Err(format!(
            "the monitor computed for {cpu} ms of {sampled:.2?} (a busy loop)"
        ));
    }
    Ok(format!(
        "in all {} samples the monitor or the client was runnable (waiting for a CPU), or the monitor idle while the client was exiting after its reply or blocked mapping a file or faulting in a page of one ({held_by_kernel} samples: the kernel held it, see SYS_MAPPING and FAULTING); the monitor computed {cpu} ms of {sampled:.2?}",
        probes.len()
    ))
}

/// The thread ids `/proc/PID/task` lists (none if the process is gone).
fn task_ids(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// What the kernel shows of one thread (see [`sample_procs`]).
struct ThreadSample {
    /// Its name (`comm`).
    comm: String,
    /// Its state (`R`, `S`, `D`…).
    state: char,
    /// State, `wchan`, system call (and the file an `mmap` maps), CPU time and run-queue wait
    /// in ms, and the first `depth` frames of the kernel stack.
    text: String,
}

impl ThreadSample {
    /// Reads thread `tid` of `pid`; `None` if it is gone.
    fn read(pid: i32, tid: &str, depth: usize) -> Option<ThreadSample> {
        let read = |path: String| std::fs::read_to_string(path).unwrap_or_default();
        let dir = format!("/proc/{pid}/task/{tid}");
        let stat = read(format!("{dir}/stat"));
        let comm = stat.get(stat.find('(')? + 1..stat.rfind(')')?)?.to_string();
        let state = stat.get(stat.rfind(')')? + 2..)?.chars().next()?;
        let call = read(format!("{dir}/syscall"));
        let mut syscall: Vec<String> = call
            .split_whitespace()
            .take(2)
            .map(str::to_string)
            .collect();
        // An `mmap` of a file: which file (its fifth argument is the descriptor).
        if syscall.first().and_then(|c| c.parse::<u64>().ok()) == Some(SYS_MMAP) {
            let fd = call
                .split_whitespace()
                .nth(5)
                .and_then(|fd| i64::from_str_radix(fd.trim_start_matches("0x"), 16).ok());
            if let Some(target) =
                fd.and_then(|fd| std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok())
            {
                syscall.push(format!("({})", target.display()));
            }
        }
        let sched: Vec<u64> = read(format!("{dir}/schedstat"))
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        let stack: Vec<String> = read(format!("{dir}/stack"))
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .map(|f| f.split('+').next().unwrap_or(f).to_string())
            .take(depth)
            .collect();
        let text = format!(
            "{state} wchan={} syscall={} cpu={}ms wait={}ms stack=[{}]",
            read(format!("{dir}/wchan")),
            syscall.join(" "),
            sched.first().copied().unwrap_or(0) / 1_000_000,
            sched.get(1).copied().unwrap_or(0) / 1_000_000,
            stack.join(" < ")
        );
        Some(ThreadSample { comm, state, text })
    }
}

/// The kernel side of each process: per thread its state, the kernel function it sleeps in
/// (`wchan`), the system call it is in (`syscall`: number and first argument), its CPU time
/// and run-queue wait so far (`schedstat`, in ms: a runnable thread not run shows as wait
/// growing between samples) and its kernel stack; and the `/proc` files the process has open
/// (a read of another process's `/proc` entry is the suspect of a blocked monitor).
fn sample_procs(procs: &[(&str, i32)]) -> String {
    let mut out = Vec::new();
    for (label, pid) in procs {
        let tasks = task_ids(*pid);
        if tasks.is_empty() {
            out.push(format!("{label} {pid}: gone"));
            continue;
        }
        for tid in tasks {
            if let Some(thread) = ThreadSample::read(*pid, &tid, 12) {
                out.push(format!("{label} {pid}/{tid} {}", thread.text));
            }
        }
        let proc_files: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .map(|t| t.display().to_string())
                    .filter(|t| t.starts_with("/proc"))
                    .collect()
            })
            .unwrap_or_default();
        if !proc_files.is_empty() {
            out.push(format!("{label} {pid} has open: {}", proc_files.join(", ")));
        }
    }
    out.join("; ")
}

// ---------------------------------------------------------------------------------------------
// Looking at the tree

/// The children in `ctl status --json` and the target; `None` if the call failed.
fn status(server: &Server) -> Option<(Vec<Row>, usize)> {
    let out = ctl(server, &["status", "--json"]).ok()?;
    let json: serde_json::Value = serde_json::from_str(&out).ok()?;
    let rows = child_rows(server, &json)?;
    Some((rows, json["target"].as_u64()? as usize))
}

/// Why the tree is not (yet) exactly `target` ready workers, none older than its one mold.
fn not_converged(server: &Server, target: usize) -> Option<String> {
    let Some((rows, reported)) = status(server) else {
        return Some("ctl status failed".into());
    };
    if reported != target {
        return Some(format!(
            "target is {reported}, the operator asked for {target}"
        ));
    }
    let molds: Vec<&Row> = rows.iter().filter(|r| r.role == "mold").collect();
    let [mold] = molds.as_slice() else {
        return Some(format!("{} molds: {rows:?}", molds.len()));
    };
    if mold.state != "mold" {
        return Some(format!("mold not ready: {mold:?}"));
    }
    let mut workers: Vec<&Row> = rows.iter().filter(|r| r.role == "worker").collect();
    workers.sort_by_key(|r| r.nr);
    // Hot spares (spare_workers 1 by default) come and go with the events: not counted here.
    let spares = rows.iter().filter(|r| r.role == "spare").count();
    let settled = rows.len() == target + 1 + spares
        && workers.len() == target
        && workers.iter().enumerate().all(|(i, w)| {
            // No worker older than the mold: its rollout is complete. Newer ones are fine: when
            // a new mold dies during its rollout, the workers it made stay, and the monitor
            // forks a fresh generation-0 mold (src/monitor/refork.rs, next_generation).
            w.nr == Some(i as u64)
                && w.generation >= mold.generation
                && (w.state == "ready" || w.state == "busy")
        });
    if !settled {
        return Some(format!("not settled: {rows:?}"));
    }
    // The process table agrees: the monitor has no other child (the workers' own children
    // belong to the app).
    // Hot spare workers (`tine-spare`, issue 13) are children of the monitor by design.
    let children: Vec<TreeProc> = tree_states(server.pid)
        .into_iter()
        .filter(|p| p.ppid == server.pid && p.state != 'Z' && !p.comm.starts_with("tine-spare"))
        .collect();
    if children.len() != target + 1 {
        return Some(format!(
            "{} live children of the monitor: {children:?}",
            children.len()
        ));
    }
    None
}

/// The monitor's open descriptors.
fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A process of the tree, from `/proc/PID/stat`.
#[derive(Debug, Clone)]
struct TreeProc {
    pid: i32,
    ppid: i32,
    state: char,
    /// The main thread's name (tine names its processes `tine-mold`, `tine-worker-N`).
    comm: String,
}

/// Every process under `root` (children, grandchildren…), from `/proc/PID/stat` alone: unlike
/// the harness's [`descendants`] it reads no command line, which takes the memory-map lock of
/// every process on the machine and can wait on any of them.
fn tree_states(root: i32) -> Vec<TreeProc> {
    let all = proc_table();
    descendants_in(&all, root).cloned().collect()
}

/// Every process on the machine, from `/proc/PID/stat` alone (see [`tree_states`]).
fn proc_table() -> Vec<TreeProc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let comm = stat.get(stat.find('(')? + 1..stat.rfind(')')?)?.to_string();
            let mut fields = stat.get(stat.rfind(')')? + 2..)?.split_whitespace();
            let state = fields.next()?.chars().next()?;
            let ppid = fields.next()?.parse().ok()?;
            Some(TreeProc {
                pid,
                ppid,
                state,
                comm,
            })
        })
        .collect()
}

/// The processes of `all` under `root` (children, grandchildren…).
fn descendants_in(all: &[TreeProc], root: i32) -> impl Iterator<Item = &TreeProc> {
    let mut out = Vec::new();
    let mut parents = vec![root];
    while let Some(parent) = parents.pop() {
        for p in all.iter().filter(|p| p.ppid == parent) {
            out.push(p);
            parents.push(p.pid);
        }
    }
    out.into_iter()
}

/// Zombies that tine should reap: children of the monitor (its own, and orphans re-parented to
/// it, a child subreaper) and of the mold. A worker's own children are the app's to reap.
fn zombies(monitor: i32) -> Vec<i32> {
    let tree = tree_states(monitor);
    let molds: HashSet<i32> = tree
        .iter()
        .filter(|p| p.ppid == monitor && p.comm.starts_with("tine-mold"))
        .map(|p| p.pid)
        .collect();
    tree.iter()
        .filter(|p| p.state == 'Z' && (p.ppid == monitor || molds.contains(&p.ppid)))
        .map(|p| p.pid)
        .collect()
}

/// `a.b.c.d:port` as `/proc/net/tcp` prints it (address as a native-endian u32, port big-endian).
fn proc_net_hex(addr: SocketAddr) -> String {
    let SocketAddr::V4(a) = addr else {
        panic!("the chaos test listens on IPv4 loopback, not {addr}")
    };
    format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(a.ip().octets()),
        a.port()
    )
}

/// Runs `f` on a thread of its own and waits at most `limit` for it: `None` if it did not return
/// by then (the thread is left to finish). A `/proc` read can block: a scan of the process table
/// between two events took 173 s and 258 s in two ten-minute runs on this shared machine, and
/// must not hold the schedule.
fn bounded<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

/// Longest a `/proc` look-up of the chaos loop may take (see [`bounded`]).
const PROC_SCAN_LIMIT: Duration = Duration::from_secs(5);

/// The client ports of the connections to `server_addr` whose server side `pid` holds.
fn client_ports_held_by(pid: i32, server_addr: SocketAddr) -> HashSet<u16> {
    let inodes: HashSet<u64> = socket_inodes(pid).into_iter().collect();
    let local = proc_net_hex(server_addr);
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(1) != Some(&local.as_str()) {
                return None;
            }
            let inode: u64 = f.get(9)?.parse().ok()?;
            if !inodes.contains(&inode) {
                return None;
            }
            let port = f.get(2)?.rsplit(':').next()?;
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}

/// Whether `process` is stopped (a `SIGSTOP` took effect), a zombie or gone.
fn stopped_or_gone(process: &common::pidfd::ProcessHandle) -> bool {
    matches!(process.state(), Some('T' | 't') | None)
}

/// Freezes `pid` (if it is still a process of the tree under `monitor`), notes the connections it
/// holds, and SIGKILLs it. Signals go through a pidfd: a pid read from `ctl status` a moment ago
/// may name another process by now (pid reuse), which must never be signalled.
fn freeze_and_kill(pid: i32, monitor: i32, server_addr: SocketAddr, steps: &Steps) -> Kill {
    // kill(0 or -1, …) would signal the test's own process group or every process.
    assert!(pid > 1, "ctl status reported pid {pid} for a child");
    // The kill counts from the freeze: from then on the process answers nothing, and the client
    // may see the end of a connection before `kill` returns here.
    let at = Instant::now();
    steps.step(format!("SIGSTOP pid {pid} and wait for the stop"));
    let Some(process) = common::pidfd::ProcessHandle::descendant_of(pid, monitor) else {
        // Gone already: nothing to signal (the number may be another process's now), and its
        // connections ended with it.
        return Kill {
            pid,
            at,
            until: at,
            frozen_for: Duration::ZERO,
            ports: Some(HashSet::new()),
        };
    };
    process.signal(Signal::SIGSTOP);
    // A stopped process accepts nothing more; wait until the stop took effect.
    let stopped = poll_until(Duration::from_secs(2), || {
        stopped_or_gone(&process).then_some(())
    });
    // Until here the process may have run on (the pidfd checks and the signal's delivery take
    // time on a loaded machine): a connection it accepted meanwhile is among the ports read next.
    let until = Instant::now();
    steps.step(format!("/proc/{pid}/fd and /proc/net/tcp"));
    // Not looked at in time: attributed by the last response on each connection instead.
    let ports = stopped.and_then(|()| {
        bounded(PROC_SCAN_LIMIT, move || {
            client_ports_held_by(pid, server_addr)
        })
    });
    steps.step(format!("SIGKILL pid {pid}"));
    process.signal(Signal::SIGKILL);
    Kill {
        pid,
        at,
        until,
        frozen_for: at.elapsed(),
        ports,
    }
}

// ---------------------------------------------------------------------------------------------
// The run

/// What the chaos did and saw.
#[derive(Default)]
struct Chaos {
    events: BTreeMap<String, u64>,
    kills: Vec<Kill>,
    /// Problems seen while the chaos ran (an operator command that failed or was not obeyed).
    problems: Vec<String>,
    /// When the event that saw each of [`Chaos::problems`] began and ended (`None` for those
    /// found after the chaos).
    problem_windows: Vec<Option<(Instant, Instant)>>,
    /// The most descriptors the monitor held, and the most zombies under it, at any event (not
    /// asserted: a child that just died is a zombie until the next poll; reported).
    peak_fds: usize,
    peak_zombies: usize,
    /// Events that took over [`SLOW_EVENT`] (the kind, when it began, how long it took, its
    /// steps that took time).
    slow: Vec<String>,
    /// Events that took over [`STALLED_EVENT`], the same way.
    stalled: Vec<String>,
}

impl Chaos {
    fn count(&mut self, what: &str) {
        *self.events.entry(what.to_string()).or_default() += 1;
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

/// Waits for the monitor to report `target` (a TTIN/TTOU is handled asynchronously; two signals
/// of one kind sent before the first is read would merge into one).
/// A `ctl status` call that timed out only for want of a CPU (see [`starved_not_stalled`]) does
/// not count: the wait goes on for as long again, once.
fn wait_target(server: &Server, target: usize, timeout: Duration) -> Result<(), String> {
    let starved = || STARVED_CTL.lock().unwrap_or_else(|e| e.into_inner()).len();
    let starved_before = starved();
    let mut last = None;
    let mut attempt = || {
        poll_until(timeout, || {
            last = status(server).map(|(_, t)| t);
            (last == Some(target)).then_some(())
        })
    };
    let mut reached = attempt();
    if reached.is_none() && starved() > starved_before {
        reached = attempt();
    }
    reached.ok_or_else(|| format!("target {last:?}, expected {target}"))
}

/// One event of kind `kind`; updates the operator's `target`.
fn event(
    server: &Server,
    server_addr: SocketAddr,
    rng: &mut Rng,
    kind: Kind,
    target: &mut usize,
    chaos: &mut Chaos,
    steps: &Steps,
) {
    steps.step("ctl status");
    let rows = status(server).map(|(rows, _)| rows).unwrap_or_default();
    let workers: Vec<&Row> = rows.iter().filter(|r| r.role == "worker").collect();
    match kind {
        Kind::KillWorker => {
            if let Some(w) = rng.pick(&workers) {
                chaos.count("kill -9 worker");
                chaos
                    .kills
                    .push(freeze_and_kill(w.pid, server.pid, server_addr, steps));
            }
        }
        Kind::KillMold => {
            let molds: Vec<&Row> = rows.iter().filter(|r| r.role == "mold").collect();
            if let Some(m) = rng.pick(&molds) {
                chaos.count("kill -9 mold");
                chaos
                    .kills
                    .push(freeze_and_kill(m.pid, server.pid, server_addr, steps));
            }
        }
        Kind::Refork => {
            chaos.count("USR2 (refork)");
            steps.step("SIGUSR2 to the monitor");
            server.signal(Signal::SIGUSR2);
        }
        Kind::Reload => {
            chaos.count("HUP (reload)");
            steps.step("SIGHUP to the monitor");
            server.signal(Signal::SIGHUP);
        }
        Kind::Ttin if *target < MAX_TARGET => {
            chaos.count("TTIN");
            *target += 1;
            steps.step("SIGTTIN, then ctl status until the target is seen");
            server.signal(Signal::SIGTTIN);
            if let Err(e) = wait_target(server, *target, Duration::from_secs(10)) {
                chaos.problems.push(format!("after TTIN: {e}"));
            }
        }
        Kind::Ttou if *target > 1 => {
            chaos.count("TTOU");
            *target -= 1;
            steps.step("SIGTTOU, then ctl status until the target is seen");
            server.signal(Signal::SIGTTOU);
            if let Err(e) = wait_target(server, *target, Duration::from_secs(10)) {
                chaos.problems.push(format!("after TTOU: {e}"));
            }
        }
        Kind::Ttin | Kind::Ttou => {}
        Kind::Scale => {
            let n = rng.range(1, MAX_TARGET as u64) as usize;
            chaos.count("ctl scale");
            steps.step(format!("ctl scale {n}"));
            match ctl(server, &["scale", &n.to_string()]) {
                Ok(_) => *target = n,
                // Applied or not: the next status says; the target to converge to is unknown.
                Err(e) if e.starved => {
                    if let Some((_, t)) = status(server) {
                        *target = t;
                    }
                }
                Err(e) => chaos.problems.push(format!("ctl scale {n}: {e}")),
            }
        }
        Kind::KillInTransition => {
            let (sig, pattern, what) = if rng.next() % 2 == 0 {
                (
                    Signal::SIGUSR2,
                    "promoting worker to mold",
                    "kill -9 promoting worker",
                )
            } else {
                (Signal::SIGHUP, "forked mold", "kill -9 new mold after HUP")
            };
            let mark = server.log.mark();
            steps.step(format!("{sig} to the monitor, wait for \"{pattern}\""));
            server.signal(sig);
            let line = server
                .log
                .wait_for_line_since(mark, Duration::from_secs(5), |l| l.contains(pattern));
            // A refork has nothing to promote while a rollout is under way, a reload may be
            // refused: then there is nothing in transition to kill.
            if let Some(pid) = line.as_deref().and_then(|l| pids_in(l).last().copied()) {
                chaos.count(what);
                chaos
                    .kills
                    .push(freeze_and_kill(pid, server.pid, server_addr, steps));
            } else {
                chaos.count(&format!("{what} (nothing started)"));
            }
        }
        Kind::CtlKillWorker => {
            // Only a number with one live process: that is the one the monitor will kill.
            let single: Vec<&&Row> = workers
                .iter()
                .filter(|w| {
                    workers.iter().filter(|o| o.nr == w.nr).count() == 1
                        && matches!(w.state.as_str(), "ready" | "busy")
                })
                .collect();
            let Some(w) = rng.pick(&single) else { return };
            let nr = w.nr.expect("a worker has a number").to_string();
            assert!(w.pid > 1, "ctl status reported pid {} for a worker", w.pid);
            // Through a pidfd: the number may have gone to another process since the status.
            let Some(process) = common::pidfd::ProcessHandle::descendant_of(w.pid, server.pid)
            else {
                return; // gone since the status: nothing to kill
            };
            chaos.count("ctl kill-worker");
            let at = Instant::now();
            steps.step(format!("SIGSTOP pid {} and wait for the stop", w.pid));
            process.signal(Signal::SIGSTOP);
            let stopped = poll_until(Duration::from_secs(2), || {
                stopped_or_gone(&process).then_some(())
            });
            // As in `freeze_and_kill`: it may have accepted until the stop took effect.
            let stopped_at = Instant::now();
            steps.step(format!("/proc/{}/fd and /proc/net/tcp", w.pid));
            let pid = w.pid;
            let ports = stopped.and_then(|()| {
                bounded(PROC_SCAN_LIMIT, move || {
                    client_ports_held_by(pid, server_addr)
                })
            });
            let mark = server.log.mark();
            steps.step(format!("ctl kill-worker {nr}"));
            match ctl(server, &["kill-worker", &nr]) {
                Ok(_) => {
                    steps.step("wait for the \"killing worker\" line");
                    let line = server
                        .log
                        .wait_for_line_since(mark, Duration::from_secs(5), |l| {
                            l.contains("killing worker") && l.contains("reason=ctl kill-worker")
                        });
                    let until = Instant::now();
                    let killed = line.as_deref().and_then(|l| pids_in(l).last().copied());
                    match killed {
                        Some(pid) if pid == w.pid => chaos.kills.push(Kill {
                            pid,
                            at,
                            until: stopped_at,
                            frozen_for: at.elapsed(),
                            ports,
                        }),
                        Some(pid) => {
                            // The monitor picked another process of that number (a replacement
                            // started meanwhile): it was not frozen first; only `x-tine-worker`
                            // attributes its connections, and it died somewhere in [at, until].
                            process.signal(Signal::SIGCONT);
                            chaos.kills.push(Kill {
                                pid,
                                at,
                                until,
                                frozen_for: Duration::ZERO,
                                ports: None,
                            });
                        }
                        None => {
                            process.signal(Signal::SIGCONT);
                            chaos
                                .problems
                                .push(format!("ctl kill-worker {nr}: no \"killing worker\" line"));
                        }
                    }
                }
                // Not answered in time only because the machine did not run the monitor or the
                // client: whether the monitor got the command is unknown, so the test ends the
                // frozen worker itself (a kill -9 like any other, its connections known).
                Err(e) if e.starved => {
                    steps.step(format!("SIGKILL pid {}", w.pid));
                    process.signal(Signal::SIGKILL);
                    chaos.kills.push(Kill {
                        pid: w.pid,
                        at,
                        until: stopped_at,
                        frozen_for: at.elapsed(),
                        ports,
                    });
                }
                Err(e) => {
                    process.signal(Signal::SIGCONT);
                    chaos.problems.push(format!("ctl kill-worker {nr}: {e}"));
                }
            }
        }
    }
}

/// The strict client's read timeout (tests/common/strict.rs): a request unanswered this long is
/// lost.
const STRICT_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A request lost to the client's read timeout is excused when machine stalls (see
/// [`MachineStall`]) took at least this much of its wait: the server was left well under half the
/// timeout to answer a request it answers in milliseconds. Only timeouts: a reset or a close is
/// the server's doing whatever the machine did.
const STALL_EXCUSE: Duration = Duration::from_millis(2500);

/// How much of `lost`'s wait (the [`STRICT_READ_TIMEOUT`] before it was declared lost) machine
/// stalls covered; zero unless it was lost to a timeout.
fn stalled_through(lost: &Lost, stalls: &[MachineStall]) -> Duration {
    if !lost.why.contains("timed out") {
        return Duration::ZERO;
    }
    let from = lost.at.checked_sub(STRICT_READ_TIMEOUT).unwrap_or(lost.at);
    stalls
        .iter()
        .map(|m| {
            let start = m.at.max(from);
            let end = (m.at + m.gap).min(lost.at);
            end.saturating_duration_since(start)
        })
        .sum()
}

/// A field `name=N` of a log line, as a number.
fn log_field(line: &str, name: &str) -> Option<i64> {
    let pattern = format!(" {name}=");
    let rest = &line[line.find(&pattern)? + pattern.len()..];
    rest.split(|c: char| !(c.is_ascii_digit() || c == '-'))
        .next()?
        .parse()
        .ok()
}

/// How long a `slow monitor step` took (its `took_ms`).
fn slow_step_ms(line: &str) -> i64 {
    log_field(line, "took_ms").unwrap_or(0)
}

/// When a log line was written (its leading `YYYY-MM-DDTHH:MM:SS.mmmZ` stamp), as an [`Instant`]
/// of this process: `at` and `wall` are the same moment on both clocks.
fn log_instant(line: &str, at: Instant, wall: std::time::SystemTime) -> Option<Instant> {
    let stamp = line.split_whitespace().next()?;
    let (date, time) = stamp.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|v| v.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (hh, mm) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let secs: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm), then seconds since the epoch.
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let epoch_s = (days * 86_400 + hh * 3_600 + mm * 60) as f64 + secs;
    let wall_s = wall
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs_f64();
    let offset = Duration::from_secs_f64((epoch_s - wall_s).abs());
    if epoch_s >= wall_s {
        Some(at + offset)
    } else {
        at.checked_sub(offset)
    }
}

/// Whether a `slow monitor step` waited in a system call (`blocked` > 0) rather than only for a
/// CPU (`preempted`) while computing little (`cpu_ms` under half the step).
fn slow_step_blocked(line: &str) -> bool {
    let blocked = log_field(line, "blocked").unwrap_or(0);
    let cpu = log_field(line, "cpu_ms").unwrap_or(0);
    blocked > 0 && cpu * 2 < slow_step_ms(line)
}

/// The kill that excuses `lost`, if any: one that happened while its connection was open, of a
/// process that held that connection: by its server-side socket when the process was frozen and
/// looked at first, else by the last response on the connection.
fn excuse<'a>(lost: &Lost, kills: &'a [Kill]) -> Option<&'a Kill> {
    let port = lost.local.map(|a| a.port());
    kills.iter().find(|k| match &k.ports {
        // Frozen first: exactly the connections it held at the freeze (a connection it had
        // already closed by itself is not excused by a kill that came later; a later connection
        // on the same client port is not the one it held). A connection opened while the stop
        // was being delivered counts if the frozen process held it (a promoting worker takes the
        // queue in one go).
        Some(ports) => {
            lost.connected_at <= k.until
                && k.at <= lost.at
                && port.is_some_and(|p| ports.contains(&p))
        }
        // Killed by the monitor somewhere in [at, until]: a connection it answered on, open
        // before the window ended, lost after it began.
        None => lost.last_worker == Some(k.pid) && lost.connected_at <= k.until && k.at <= lost.at,
    })
}

/// Why the server stopped worker `pid`, from the first log line that retires, promotes or kills
/// it: `promoted to mold (refork)`, `rollout to gen:N`, `scaled down`, … (for the report of
/// unexcused losses: which graceful path lost them).
fn why_stopped(lines: &[String], pid: i32) -> String {
    let Some(line) = lines.iter().find(|l| {
        ["retiring ", "promoting ", "killing ", "stopping "]
            .iter()
            .any(|w| l.contains(w))
            && pids_in(l).iter().skip(1).any(|p| *p == pid)
    }) else {
        return "not stopped by the monitor".into();
    };
    if line.contains("promoting ") {
        return "promoted to mold (refork)".into();
    }
    let reason = line.split(" reason=").nth(1).unwrap_or(line);
    let reason = reason.split(" request=").next().unwrap_or(reason);
    // One rollout reads like another: `rollout to gen:7` -> `rollout to gen:N`.
    match reason.find("gen:") {
        Some(i) => format!("{}gen:N", &reason[..i]),
        None => reason.to_string(),
    }
}

#[test]
fn the_tree_survives_chaos_converges_and_loses_only_what_kill_9_took() {
    let test_began = Instant::now();
    // The log's wall-clock stamps, as this process's Instants (for the monitor's slow steps).
    let wall_began = std::time::SystemTime::now();
    let seed = env_u64("CHAOS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos() as u64
    });
    let seconds = env_u64("CHAOS_SECONDS").unwrap_or(DEFAULT_CHAOS_SECONDS);
    eprintln!("chaos: seed {seed} (replay with CHAOS_SEED={seed}), {seconds} s");
    let mut rng = Rng(seed);

    let example = std::env::var("CHAOS_EXAMPLE").ok();
    let path = std::env::var("CHAOS_PATH").unwrap_or_else(|_| "/".into());
    eprintln!(
        "chaos: app {}, POST {path}",
        example.as_deref().unwrap_or("tine hello")
    );
    let launch = match &example {
        Some(name) => Launch::example(name),
        None => Launch::tine(),
    };
    // Who reaps (docs/DEPLOYMENT.md, "Who reaps the children"), by a bit of the seed (the random
    // stream of older seeds is unchanged): with the monitor's `waitpid`, a zombie left behind is
    // the monitor's fault and the zombie counts below say so; with the kernel's, the exit
    // statuses come from pidfds.
    let monitor_reaps = seed.rotate_left(17) & 1 == 1;
    eprintln!(
        "chaos: reaper {}",
        if monitor_reaps {
            "monitor (monitor_reaps = true)"
        } else {
            "kernel where it can"
        }
    );
    let server = launch
        .args(["--workers", &START_WORKERS.to_string(), "--debug-headers"])
        .env(
            "TINE_MONITOR_REAPS",
            if monitor_reaps { "true" } else { "false" },
        )
        .start();
    let server_addr = server.tcp_addr();
    server.wait_workers(START_WORKERS, READY_TIMEOUT);

    let max = Duration::from_secs(seconds) + CONVERGE_TIMEOUT * 2 + Duration::from_secs(30);
    let load = StrictLoad::start(&server.addr(), CONNECTIONS, &path, max);
    assert!(
        poll_until(Duration::from_secs(10), || (load.answered() > 0)
            .then_some(()))
        .is_some(),
        "the strict load gets no answer"
    );
    let mut why = None;
    let settled = poll_until(READY_TIMEOUT, || {
        why = not_converged(&server, START_WORKERS);
        why.is_none().then_some(())
    });
    assert!(
        settled.is_some(),
        "the tree does not settle at start: {why:?}"
    );
    let fds_before = fd_count(server.pid);
    let zombies_before = zombies(server.pid).len();

    let mut chaos = Chaos::default();
    let mut target = START_WORKERS;
    let started = Instant::now();
    let mut monitor_died = None;
    let mut server = server;
    let steps = Steps::default();
    let kernel: Kernel = Arc::new(Mutex::new(common::kmsg::KernelLog::open()));
    let watchdog = start_watchdog(steps.clone(), kernel.clone(), server.pid, seed);
    let stall_watch_over = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stall_watch = start_stall_watch(stall_watch_over.clone());
    while started.elapsed() < Duration::from_secs(seconds) {
        if server.has_exited() {
            monitor_died = Some(started.elapsed());
            break;
        }
        let kind = pick_kind(&mut rng);
        let event_began = Instant::now();
        let at = event_began.duration_since(started);
        steps.begin_event(&format!("{kind:?} at {at:.1?}"));
        steps.step("/proc/MONITOR/fd count and /proc/*/stat scan for zombies");
        let monitor = server.pid;
        match bounded(PROC_SCAN_LIMIT, move || {
            (fd_count(monitor), zombies(monitor).len())
        }) {
            Some((fds, zombies)) => {
                chaos.peak_fds = chaos.peak_fds.max(fds);
                chaos.peak_zombies = chaos.peak_zombies.max(zombies);
            }
            None => chaos.stalled.push(format!(
                "{kind:?} at {at:.1?}: the /proc scan for fds and zombies did not return within {PROC_SCAN_LIMIT:?} (skipped)"
            )),
        }
        let kills_before = chaos.kills.len();
        let problems_before = chaos.problems.len();
        event(
            &server,
            server_addr,
            &mut rng,
            kind,
            &mut target,
            &mut chaos,
            &steps,
        );
        let took = event_began.elapsed();
        let event_ended = Instant::now();
        chaos.problem_windows.resize(problems_before, None);
        chaos
            .problem_windows
            .resize(chaos.problems.len(), Some((event_began, event_ended)));
        let done = steps.end_event();
        if took > SLOW_EVENT {
            // Where the time went: each step, and how long a killed process was frozen.
            let frozen = chaos.kills[kills_before..]
                .iter()
                .map(|k| format!("; pid {} frozen for {:.2?}", k.pid, k.frozen_for))
                .collect::<String>();
            let line = format!(
                "{kind:?} at {at:.1?} took {took:.2?} ({}{frozen})",
                describe_steps(&done)
            );
            if took > EVENT_HARD_LIMIT {
                match kernel_starved_during(&kernel, event_began, event_ended) {
                    Some(report) if took <= KERNEL_STARVED_LIMIT => chaos.stalled.push(format!(
                        "{line}; over the hard limit of {EVENT_HARD_LIMIT:?} while the kernel reported \"{report}\""
                    )),
                    _ => panic!(
                        "an event took over the hard limit of {EVENT_HARD_LIMIT:?} (seed {seed}): {line}"
                    ),
                }
            } else if took > STALLED_EVENT {
                chaos.stalled.push(line);
            } else {
                chaos.slow.push(line);
            }
        }
        std::thread::sleep(Duration::from_millis(rng.range(GAP_MS.0, GAP_MS.1)));
    }
    steps.state().over = true;
    let _ = watchdog.join();
    stall_watch_over.store(true, std::sync::atomic::Ordering::Relaxed);
    let machine_stalls = stall_watch.join().unwrap_or_default();
    let chaos_ended = Instant::now();
    let answered_during_chaos = load.answered();

    // Convergence to the operator's target.
    let mut last_why = String::new();
    let converged = monitor_died.is_none()
        && poll_until(CONVERGE_TIMEOUT, || {
            if server.has_exited() {
                return Some(false);
            }
            match not_converged(&server, target) {
                None => Some(true),
                Some(why) => {
                    last_why = why;
                    None
                }
            }
        }) == Some(true);
    let converge_time = chaos_ended.elapsed();

    // Back to the first size, to compare the monitor's descriptors like with like.
    let mut fds_after = None;
    let mut zombies_after = None;
    if converged {
        if target != START_WORKERS {
            server
                .ctl(&["scale", &START_WORKERS.to_string()])
                .unwrap_or_else(|e| panic!("ctl scale back: {e}"));
        }
        let back = poll_until(CONVERGE_TIMEOUT, || {
            not_converged(&server, START_WORKERS)
                .is_none()
                .then_some(())
        });
        if back.is_some() {
            fds_after = Some(fd_count(server.pid));
            // A child that exited a moment ago may not be reaped yet: allow a few polls.
            let mut z = Vec::new();
            let flat = poll_until(Duration::from_secs(5), || {
                z = zombies(server.pid);
                (z.len() <= zombies_before).then_some(())
            });
            zombies_after = Some((z.len(), flat.is_some(), z));
        }
    }
    let answered_at_end = load.answered();
    let stopping = Instant::now();
    let report: StrictReport = load.stop();
    let phases = format!(
        "start {:?}, chaos {:?}, convergence and scale back {:?}, load stop {:?}",
        started.duration_since(test_began),
        chaos_ended.duration_since(started),
        stopping.duration_since(chaos_ended),
        stopping.elapsed()
    );
    let monitor_alive = monitor_died.is_none() && !server.has_exited();

    // What the kernel said of starving its own threads while the chaos ran.
    let kernel_starved: Option<Vec<common::kmsg::Starvation>> = kernel
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_mut()
        .map(|k| k.starvation());
    let in_kernel_starvation = |began: Instant, ended: Instant| {
        starvation_during(kernel_starved.as_deref().unwrap_or_default(), began, ended)
    };

    // Lost requests, excused or not.
    let mut excused = 0;
    let mut excused_by_kernel: Vec<String> = Vec::new();
    let mut excused_by_stall: Vec<String> = Vec::new();
    let mut unexcused: Vec<String> = Vec::new();
    for lost in &report.lost_detail {
        match excuse(lost, &chaos.kills) {
            Some(_) => excused += 1,
            None if lost.why.contains("timed out")
                && in_kernel_starvation(
                    lost.at.checked_sub(STRICT_READ_TIMEOUT).unwrap_or(lost.at),
                    lost.at,
                )
                .is_some() =>
            {
                excused_by_kernel.push(format!(
                    "{} (client {}, {:?} into the chaos)",
                    lost.why,
                    lost.local.map(|a| a.to_string()).unwrap_or_default(),
                    lost.at.saturating_duration_since(started),
                ));
            }
            None if stalled_through(lost, &machine_stalls) >= STALL_EXCUSE => {
                excused_by_stall.push(format!(
                    "{} (client {}, last answered by {:?}, {:?} into the chaos; the machine stalled {:.2?} of its {STRICT_READ_TIMEOUT:?} wait)",
                    lost.why,
                    lost.local.map(|a| a.to_string()).unwrap_or_default(),
                    lost.last_worker,
                    lost.at.saturating_duration_since(started),
                    stalled_through(lost, &machine_stalls)
                ));
            }
            None => {
                // If the chaos killed that worker too, say when and what it held: the kill came
                // after the loss, or the connection was no longer its own.
                let kill = lost.last_worker.and_then(|pid| {
                    let k = chaos.kills.iter().find(|k| k.pid == pid)?;
                    let port = lost.local.map(|a| a.port());
                    Some(format!(
                        "; pid {pid} was SIGKILLed {:?} into the chaos, {}",
                        k.at.saturating_duration_since(started),
                        match &k.ports {
                            Some(ports) => format!(
                                "holding {} connections{}",
                                ports.len(),
                                if port.is_some_and(|p| ports.contains(&p)) {
                                    " (this one too)"
                                } else {
                                    " (not this one)"
                                }
                            ),
                            None => "not frozen first".into(),
                        }
                    ))
                });
                unexcused.push(format!(
                    "{} (client {}, last answered by {}, {:?} into the chaos{})",
                    lost.why,
                    lost.local.map(|a| a.to_string()).unwrap_or_default(),
                    lost.last_worker
                        .map(|p| format!("pid {p}"))
                        .unwrap_or_else(|| "nobody".into()),
                    lost.at.saturating_duration_since(started),
                    kill.unwrap_or_default()
                ))
            }
        }
    }
    let unfrozen_kills = chaos.kills.iter().filter(|k| k.ports.is_none()).count();
    let held_by_killed: usize = chaos
        .kills
        .iter()
        .filter_map(|k| k.ports.as_ref().map(|p| p.len()))
        .sum();

    eprintln!("chaos: seed {seed}, {seconds} s, {CONNECTIONS} strict connections, start workers {START_WORKERS}");
    eprintln!("chaos: events by kind:");
    for (what, n) in &chaos.events {
        eprintln!("  {what:<44} {n}");
    }
    eprintln!(
        "chaos: requests answered {} ({} during the chaos), by status {:?}, connect errors {}",
        report.answered, answered_during_chaos, report.by_status, report.connect_errors
    );
    eprintln!(
        "chaos: lost {} = excused {excused} (connections held by the {} SIGKILLed processes at their kill: {held_by_killed}; {unfrozen_kills} kills not frozen first) + unexcused {}",
        report.lost_detail.len(),
        chaos.kills.len(),
        unexcused.len()
    );
    eprintln!(
        "chaos: lost while the machine stalled (a read that timed out with over {STALL_EXCUSE:?} of its wait in machine stalls; excused, not counted above): {}",
        excused_by_stall.len()
    );
    for l in excused_by_stall.iter().take(20) {
        eprintln!("  lost during a machine stall: {l}");
    }
    let log = server.log.lines();
    let mut by_cause: BTreeMap<String, u64> = BTreeMap::new();
    for lost in &report.lost_detail {
        if excuse(lost, &chaos.kills).is_none()
            && stalled_through(lost, &machine_stalls) < STALL_EXCUSE
        {
            let cause = match lost.last_worker {
                Some(pid) => why_stopped(&log, pid),
                None => "first request of a connection".into(),
            };
            *by_cause.entry(cause).or_default() += 1;
        }
    }
    for (cause, n) in &by_cause {
        eprintln!("  unexcused, worker stopped by {cause:<30} {n}");
    }
    for u in unexcused.iter().take(20) {
        eprintln!("  unexcused: {u}");
    }
    eprintln!(
        "chaos: monitor alive {monitor_alive}{}; converged to {target} workers: {converged} ({converge_time:?} after the chaos){}",
        monitor_died
            .map(|t| format!(" (died {t:?} into the chaos)"))
            .unwrap_or_default(),
        if converged { String::new() } else { format!("; last: {last_why}") }
    );
    eprintln!(
        "chaos: monitor fds {fds_before} before, {fds_after:?} after (at most {} during the chaos); zombies {zombies_before} before, {:?} after (at most {} during the chaos)",
        chaos.peak_fds,
        zombies_after.as_ref().map(|(n, _, _)| *n),
        chaos.peak_zombies
    );
    eprintln!("chaos: took {phases}");
    for slow in &chaos.slow {
        eprintln!("  slow event: {slow}");
    }
    for stalled in &chaos.stalled {
        eprintln!("  stalled event (over {STALLED_EVENT:?}): {stalled}");
    }
    match &kernel_starved {
        None => eprintln!(
            "chaos: the kernel's reports of starving its own threads: /dev/kmsg is not readable here, none excused"
        ),
        Some(reports) => {
            eprintln!(
                "chaos: the kernel's reports of starving its own threads (RCU, workqueues, soft lockups): {}",
                reports.len()
            );
            for w in reports {
                eprintln!(
                    "  kernel starvation from {:.1?} to {:.1?} into the chaos: {}",
                    w.from.saturating_duration_since(started),
                    w.to.saturating_duration_since(started),
                    w.line
                );
            }
        }
    }
    eprintln!(
        "chaos: read timeouts while the kernel starved its own threads (excused, not counted above): {}",
        excused_by_kernel.len()
    );
    for l in excused_by_kernel.iter().take(20) {
        eprintln!("  lost during kernel starvation: {l}");
    }
    // An operator command that failed while the kernel starved its own threads is excused (the
    // convergence checked after the chaos still holds the tree to its target).
    let mut problems = Vec::new();
    for (i, p) in chaos.problems.iter().enumerate() {
        let window = chaos.problem_windows.get(i).copied().flatten();
        match window.and_then(|(began, ended)| in_kernel_starvation(began, ended)) {
            Some(w) => eprintln!(
                "  problem excused (the kernel reported \"{}\" meanwhile): {p}",
                w.line
            ),
            None => {
                eprintln!("  problem: {p}");
                problems.push(p.clone());
            }
        }
    }
    chaos.problems = problems;
    let monitor_slow: Vec<String> = log
        .iter()
        .filter(|l| l.contains("slow monitor step"))
        .cloned()
        .collect();
    eprintln!(
        "chaos: slow monitor steps (over 100 ms, from its log): {}",
        monitor_slow.len()
    );
    for l in monitor_slow.iter().take(20) {
        eprintln!("  slow monitor step: {l}");
    }
    {
        let stats = CTL_STATS.lock().unwrap_or_else(|e| e.into_inner());
        eprintln!(
            "chaos: ctl calls {}, over 100 ms {}, slowest {:.2?}, failed {}",
            stats.calls,
            stats.over_100ms,
            stats.slowest,
            stats.failures.len()
        );
        for f in &stats.failures {
            eprintln!("  ctl failed: {f}");
        }
    }
    eprintln!(
        "chaos: machine stalls (a thread sleeping 50 ms woke over 1 s late): {}",
        machine_stalls.len()
    );
    for m in &machine_stalls {
        eprintln!(
            "  machine stall: {:.1?} into the chaos, {:.2?} long; /proc/stat accounted {:.2} s per CPU meanwhile (busy {:.2}, steal {:.2})",
            m.at.saturating_duration_since(started),
            m.gap,
            m.accounted,
            m.busy,
            m.steal
        );
    }
    let starved_ctl = std::mem::take(&mut *STARVED_CTL.lock().unwrap_or_else(|e| e.into_inner()));
    eprintln!(
        "chaos: ctl calls that timed out for want of a CPU, or with the client held by the kernel mapping or paging in a file (excused): {}",
        starved_ctl.len()
    );
    for s in &starved_ctl {
        eprintln!("  starved ctl: {s}");
    }
    // The stall this test hunts, seen from inside: a step of the monitor's loop that waited in a
    // system call (blocked) for over a second.
    let monitor_blocked: Vec<&String> = monitor_slow
        .iter()
        .filter(|l| slow_step_blocked(l) && slow_step_ms(l) > 1000)
        .collect();
    for l in &monitor_blocked {
        chaos
            .problems
            .push(format!("the monitor blocked for over a second: {l}"));
    }
    // A step that spent over a second of the monitor's own CPU (the reap step that spun 36 s in
    // `wait4` in a CI run): a failure, unless the kernel reported starving its own threads then.
    for l in monitor_slow
        .iter()
        .filter(|l| log_field(l, "cpu_ms").unwrap_or(0) > 1000)
    {
        let window = log_instant(l, test_began, wall_began).map(|ended| {
            let took = Duration::from_millis(slow_step_ms(l).max(0) as u64);
            (ended.checked_sub(took).unwrap_or(ended), ended)
        });
        match window.and_then(|(began, ended)| in_kernel_starvation(began, ended)) {
            Some(w) => eprintln!(
                "  monitor CPU excused (the kernel reported \"{}\" meanwhile): {l}",
                w.line
            ),
            None => chaos.problems.push(format!(
                "the monitor computed for over a second in one step: {l}"
            )),
        }
    }
    let stalls = std::mem::take(&mut *CTL_STALLS.lock().unwrap_or_else(|e| e.into_inner()));
    eprintln!(
        "chaos: ctl calls over {CTL_SAMPLE_AFTER:?}: {}",
        stalls.len()
    );
    for s in stalls.iter().take(10) {
        eprintln!("  slow ctl: {s}");
    }

    assert!(monitor_alive, "the monitor died (seed {seed})");
    assert!(
        converged,
        "the tree did not converge to {target} workers within {CONVERGE_TIMEOUT:?} (seed {seed}): {last_why}"
    );
    let fds_after = fds_after.unwrap_or_else(|| {
        panic!("the tree did not converge back to {START_WORKERS} workers (seed {seed})")
    });
    assert!(
        fds_after <= fds_before + FD_TOLERANCE,
        "the monitor's descriptors grew from {fds_before} to {fds_after} (seed {seed})"
    );
    let (_, zombies_flat, zombie_list) = zombies_after.expect("measured after convergence");
    assert!(
        zombies_flat,
        "zombies under the monitor: {zombies_before} before, {zombie_list:?} after (seed {seed})"
    );
    assert!(
        chaos.problems.is_empty(),
        "operator commands failed or were not obeyed (seed {seed}): {:?}",
        chaos.problems
    );
    assert!(
        answered_at_end > answered_during_chaos,
        "nothing answered after the chaos (seed {seed})"
    );
    assert!(
        unexcused.is_empty(),
        "{} requests lost outside any kill -9 (seed {seed}), by the path that stopped their worker: {by_cause:?}",
        unexcused.len()
    );
}

/// A `ctl` call that timed out is the machine's only when the monitor was not what kept it:
/// idle with its client blocked mapping a file as it started (the VM's `kdamond` holding the
/// file's mapping lock) or faulting in a page of one (a throttled disk), or either of them
/// waiting for a CPU; never with the monitor blocked.
#[test]
fn a_client_blocked_mapping_a_file_is_the_machines_not_the_monitors() {
    let probe = |monitor_state, monitor_syscall, client_state, client_syscall| Probe {
        monitor_state,
        monitor_syscall,
        monitor_cpu_ms: 300,
        client_state,
        client_syscall,
    };
    let at = |ms| Duration::from_millis(ms);
    // The monitor idle in poll, the client in D in mmap (loading libc): excused.
    let starting = [
        (at(1000), probe('S', Some(SYS_POLL), 'D', Some(9))),
        (at(5000), probe('S', Some(SYS_POLL), 'D', Some(9))),
    ];
    let excused = starved_not_stalled(&starting).expect("excused");
    assert!(
        excused.contains("(2 samples: the kernel held it"),
        "{excused}"
    );
    // The same in execve (the kernel loading the executable): excused.
    let exec = [(at(1000), probe('S', Some(SYS_POLL), 'D', Some(59)))];
    assert!(starved_not_stalled(&exec).is_ok());
    // The client asleep in mmap but not in D (a wait it chose?): not excused.
    let asleep = [(at(1000), probe('S', Some(SYS_POLL), 'S', Some(9)))];
    assert!(starved_not_stalled(&asleep).is_err());
    // The monitor blocked in something else while the client starts: not excused.
    let blocked = [(at(1000), probe('D', Some(0), 'D', Some(9)))];
    assert!(starved_not_stalled(&blocked).is_err());
    // The client waiting for its reply (read) with the monitor idle: not excused.
    let unanswered = [(at(1000), probe('S', Some(SYS_POLL), 'S', Some(0)))];
    assert!(starved_not_stalled(&unanswered).is_err());
    // Held while it started, then waiting for a reply the idle monitor never sends: not excused.
    let then_unanswered = [
        (at(1000), probe('S', Some(SYS_POLL), 'D', Some(9))),
        (at(9000), probe('S', Some(SYS_POLL), 'S', Some(0))),
    ];
    assert!(starved_not_stalled(&then_unanswered).is_err());
    // The client in D in a read (not mapping a file): not excused.
    let read = [(at(1000), probe('S', Some(SYS_POLL), 'D', Some(0)))];
    assert!(starved_not_stalled(&read).is_err());
    // The client in D in a page fault (reading its executable from a throttled disk), the monitor
    // idle: excused, as in mmap.
    let faulting = [
        (at(1000), probe('S', Some(SYS_POLL), 'D', Some(FAULTING))),
        (at(9000), probe('S', Some(SYS_POLL), 'D', Some(FAULTING))),
    ];
    assert!(starved_not_stalled(&faulting).is_ok());
    // The same fault, then waiting for a reply the idle monitor never sends: not excused.
    let faulted_then_unanswered = [
        (at(1000), probe('S', Some(SYS_POLL), 'D', Some(FAULTING))),
        (at(9000), probe('S', Some(SYS_POLL), 'S', Some(0))),
    ];
    assert!(starved_not_stalled(&faulted_then_unanswered).is_err());
    // What /proc/PID/syscall says, read: a fault, running, a system call with its arguments.
    assert_eq!(
        syscall_number("-1 0x7ffd2d48f9a8 0x5580d9ecaaa0\n"),
        Some(FAULTING)
    );
    assert_eq!(syscall_number("running\n"), None);
    assert_eq!(
        syscall_number("7 0x5580d9ecaaa0 0x3 0x64 0x0 0x0 0x0 0x7ffd2d48f9a8 0x7f0\n"),
        Some(SYS_POLL)
    );
    // The monitor itself in D in a fault: blocked, not excused.
    let monitor_faulting = [(at(1000), probe('D', Some(FAULTING), 'S', Some(0)))];
    assert!(starved_not_stalled(&monitor_faulting).is_err());
}

/// The kernel's reports of starving its own threads are read as the windows they describe.
#[test]
fn the_kernels_starvation_reports_are_read_as_windows() {
    use common::kmsg::starved_for;
    assert_eq!(
        starved_for(
            "BUG: workqueue lockup - pool cpus=0 node=0 flags=0x0 nice=0 stuck for 52s!",
            || 250.0
        ),
        Some(Duration::from_secs(52))
    );
    assert_eq!(
        starved_for(
            "rcu: rcu_preempt kthread starved for 14750 jiffies! g7461317 f0x2 RCU_GP_WAIT_FQS(5)",
            || 250.0
        ),
        Some(Duration::from_secs(59))
    );
    assert_eq!(
        starved_for(
            "watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [rustc:123]",
            || 250.0
        ),
        Some(Duration::from_secs(22))
    );
    assert_eq!(
        starved_for("hrtimer: interrupt took 5141 ns", || 250.0),
        None
    );
    let now = Instant::now();
    let w = common::kmsg::Starvation {
        from: now,
        to: now + Duration::from_secs(10),
        line: String::new(),
    };
    let s = Duration::from_secs(1);
    let wall = std::time::UNIX_EPOCH + Duration::from_secs(1_796_097_122);
    let line = "2026-12-01T03:52:04.613Z  WARN tine monitor pid=1: slow monitor step";
    let at = log_instant(line, now, wall).expect("a stamp");
    let off = at.duration_since(now).as_secs_f64();
    assert!((off - 2.613).abs() < 0.001, "{off}");
    assert!(w.overlaps(now + s * 3, now + s * 4, Duration::ZERO));
    assert!(w.overlaps(now + s * 12, now + s * 13, s * 5));
    assert!(!w.overlaps(now + s * 16, now + s * 17, s * 5));
}

/// Starts `sleep 60` (a process outside any tree, the test's own child) with pid `pid`, by
/// setting the kernel's last pid just below it: the way a compiler beside the test gets the number
/// of a worker that died. `None` when the kernel does not let this test set it (not root in the
/// initial pid namespace), or when other processes keep taking the number first.
fn spawn_with_pid(pid: i32) -> Option<std::process::Child> {
    for _ in 0..200 {
        if std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).is_err() {
            return None;
        }
        let mut child = std::process::Command::new("sleep").arg("60").spawn().ok()?;
        if child.id() as i32 == pid {
            return Some(child);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    None
}

/// The kill guard that ends every test's tree must never signal a process that merely reuses
/// the number of one that was in the tree (a SIGKILL by number once took a `rustc` of a build
/// running beside the 600 s chaos run: the guard killed every pid its log ever named that was
/// alive and younger than the monitor). Nor may the chaos's kill -9 of a pid read a moment ago.
#[test]
fn no_signal_reaches_a_process_that_reuses_a_pid_of_the_tree() {
    let server = Launch::tine().args(["--workers", "1"]).start();
    let worker = server
        .log
        .wait_for_line_since(0, Duration::from_secs(10), |l| {
            l.contains("worker[0] (gen:0) ready")
        })
        .and_then(|l| pids_in(&l).last().copied())
        .expect("the worker's ready line names its pid");
    let process = common::pidfd::ProcessHandle::descendant_of(worker, server.pid)
        .expect("the worker is in the tree");
    assert!(process.signal(Signal::SIGKILL));
    // Reaped by the monitor: the number is free.
    poll_until(Duration::from_secs(10), || {
        proc_info(worker).is_none().then_some(())
    })
    .expect("the killed worker is reaped");
    let Some(mut stranger) = spawn_with_pid(worker) else {
        eprintln!(
            "SKIPPED: cannot give a process pid {worker} (needs root to write /proc/sys/kernel/ns_last_pid)"
        );
        return;
    };
    // The handle on the dead worker reaches nothing, not the process with its number now.
    assert!(!process.signal(Signal::SIGKILL));
    // The chaos's kill -9 of a pid from a status read before the worker died.
    let steps = Steps::default();
    let kill = freeze_and_kill(worker, server.pid, server.tcp_addr(), &steps);
    assert_eq!(kill.ports, Some(HashSet::new()));
    // The guard ends the tree; the worker's pid is in its log.
    drop(server);
    let alive = stranger.try_wait().expect("try_wait");
    let _ = stranger.kill();
    let _ = stranger.wait();
    assert!(
        alive.is_none(),
        "pid {worker} (a worker once, now a `sleep` outside the tree) was signalled: {alive:?}"
    );
}
