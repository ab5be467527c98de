//! The shared harness of tine's black-box tests: real processes, real sockets, real signals.
//!
//! Every test file does `mod common;` and uses what it needs:
//!
//! - [`Launch`] starts `tine serve` (or an example binary's `serve`) as a child process, on its own
//!   loopback port and its own control socket in a fresh [`TempDir`]; [`Launch::start`] returns
//!   once the log says `tine ready`. The running tree is a [`Server`]: its stderr is captured line by
//!   line ([`Log`]), [`Server::ctl`] runs `tine ctl` against it, [`Server::tree`] lists its
//!   processes with their `ps` titles. Dropping a [`Server`] SIGKILLs the monitor and every
//!   process of its tree, pass or fail, and prints the captured log if the test failed.
//! - [`Launch::run`] runs a command that is expected to exit by itself (`tine check`, a `serve`
//!   with a bad config) and returns its exit status and output.
//! - [`Client`] / [`get`]: a small HTTP/1.1 client over a std `TcpStream` or `UnixStream` that
//!   sends exactly the bytes it is given (so tests can send malformed or hostile requests).
//! - [`load`]: a bounded concurrent load generator that counts responses by status and by worker
//!   pid (the `x-tine-worker` header of `--debug-headers`).
//! - [`proc_info`], [`descendants`], [`title`], [`gone`]: the process table, from `/proc`.
//! - [`poll_until`]: the only way tests wait: a short poll loop with a deadline, never a bare sleep
//!   used as synchronization.
//!
//! Tests never fork in their own threads: they only spawn processes with `std::process::Command`.

#![allow(dead_code)] // each test file uses a different part of the harness

pub mod client_addr;
pub mod metrics;
pub mod pidfd;
pub mod websocket;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub mod spares;
pub mod stall;
pub mod status;
pub mod strace;
pub mod strict;
pub mod strict_h2;
pub mod tmux;

/// How long a tree may take to report `tine ready` (debug build, 2 busy cores).
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Read/write timeout of every client socket: a stuck server fails the test instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a `tine ctl` call may take.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval of [`poll_until`].
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The `tine` binary under test.
pub fn tine_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tine"))
}

/// Calls `f` every few milliseconds until it returns `Some`, or `None` once `timeout` has passed.
pub fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

// ---------------------------------------------------------------------------------------------
// Temporary directories and ports

/// A fresh directory under the system temp dir, removed on drop. Its path is short, so unix socket
/// paths inside it stay far below the 108-byte limit.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a new, empty directory.
    pub fn new() -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("tine-t{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create a temp dir");
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// Writes a file inside the directory (creating parent directories) and returns its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create parent dir");
        }
        std::fs::write(&path, contents).expect("write a file");
        path
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A loopback TCP port that was free a moment ago (bind port 0, read it, close).
///
/// Prefer letting the server bind `127.0.0.1:0` itself (what [`Launch`] does by default, race
/// free); use this only when a test needs to know the port before the server starts.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

// ---------------------------------------------------------------------------------------------
// Captured output

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    eof: bool,
}

/// Lines read from a child's pipe by a background thread, shared with the test.
///
/// The pipe of a server's stderr is inherited by every process of the tree, so [`Log::wait_eof`]
/// returning `true` also proves that no process of the tree is left holding it.
#[derive(Clone, Default)]
pub struct Log {
    inner: Arc<(Mutex<LogState>, Condvar)>,
}

impl Log {
    /// Starts a thread that reads `reader` line by line until EOF.
    pub fn capture(reader: impl Read + Send + 'static) -> Log {
        let log = Log::default();
        let writer = log.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\n', '\r'])
                            .to_string();
                        let (state, cv) = &*writer.inner;
                        state.lock().unwrap().lines.push(line);
                        cv.notify_all();
                    }
                }
            }
            let (state, cv) = &*writer.inner;
            state.lock().unwrap().eof = true;
            cv.notify_all();
        });
        log
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.inner.0.lock().unwrap().lines.clone()
    }

    /// Every line so far, joined.
    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// The number of lines so far: pass it to the `*_since` methods to look only at what comes
    /// after an action.
    pub fn mark(&self) -> usize {
        self.inner.0.lock().unwrap().lines.len()
    }

    /// The first line containing `pattern`.
    pub fn find(&self, pattern: &str) -> Option<String> {
        self.lines().into_iter().find(|l| l.contains(pattern))
    }

    /// How many lines contain `pattern`.
    pub fn count(&self, pattern: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(pattern)).count()
    }

    /// Waits for a line at index `since` or later that satisfies `pred`; `None` on timeout or if
    /// the pipe closed without one.
    pub fn wait_for_line_since(
        &self,
        since: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (state, cv) = &*self.inner;
        let mut guard = state.lock().unwrap();
        let mut checked = since;
        loop {
            if let Some(line) = guard.lines.iter().skip(checked).find(|l| pred(l)) {
                return Some(line.clone());
            }
            checked = checked.max(guard.lines.len());
            if guard.eof {
                return None;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            guard = cv.wait_timeout(guard, left).unwrap().0;
        }
    }

    /// Waits for a line containing `pattern` (anywhere in the log); panics with the log if none
    /// comes within `timeout`.
    pub fn wait_for_log(&self, pattern: &str, timeout: Duration) -> String {
        self.wait_for_log_since(0, pattern, timeout)
    }

    /// Waits for a line containing `pattern` at index `mark` or later; panics with the log if none
    /// comes within `timeout`.
    pub fn wait_for_log_since(&self, mark: usize, pattern: &str, timeout: Duration) -> String {
        match self.wait_for_line_since(mark, timeout, |l| l.contains(pattern)) {
            Some(line) => line,
            None => panic!(
                "no log line containing {pattern:?} (after line {mark}) within {timeout:?}{}; log:\n{}",
                if self.is_eof() { " (the pipe closed)" } else { "" },
                self.text()
            ),
        }
    }

    /// Whether the writing ends of the pipe are all closed.
    pub fn is_eof(&self) -> bool {
        self.inner.0.lock().unwrap().eof
    }

    /// Waits until every writer closed the pipe; `false` on timeout.
    pub fn wait_eof(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (state, cv) = &*self.inner;
        let mut guard = state.lock().unwrap();
        while !guard.eof {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            guard = cv.wait_timeout(guard, left).unwrap().0;
        }
        true
    }
}

impl fmt::Debug for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

/// Every `pid=N` in a log line (the line's own process and any pid it names).
pub fn pids_in(line: &str) -> Vec<i32> {
    line.match_indices("pid=")
        .filter_map(|(i, _)| {
            let digits: String = line[i + 4..]
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            digits.parse().ok()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Example binaries

/// The path of example `name`, built once per test process with `cargo build --example NAME`
/// (`cargo test --test X` does not build examples; a full `cargo test` does, and then this is a
/// quick no-op). The profile follows the `tine` binary's (`--release` when tests run in release).
pub fn example_bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    // Held across the build: concurrent tests wait for one build instead of racing cargo.
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(name) {
        return path.clone();
    }
    let bin = tine_bin();
    let profile_dir = bin.parent().expect("target/<profile>").to_path_buf();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--quiet", "--example", name])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    // The same optional features as this test binary, so an example that needs one builds, and
    // the library is built once for both.
    let features: Vec<&str> = [
        ("axum", cfg!(feature = "axum")),
        ("tonic", cfg!(feature = "tonic")),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("run cargo build --example {name}: {e}"));
    assert!(status.success(), "cargo build --example {name} failed");
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.is_file(),
        "example binary {} is missing after the build",
        path.display()
    );
    built.insert(name.to_string(), path.clone());
    path
}

// ---------------------------------------------------------------------------------------------
// Launching servers

/// How to start a server tree: a program (`tine` or an example) with `serve` and arguments.
///
/// Unless the arguments already say otherwise it adds `--listen 127.0.0.1:0` (the server binds a
/// free port itself; [`Server::addr`] reads the bound address from the log) and `--control-socket
/// DIR/ctl.sock`. The child runs in the temp dir, with every inherited `TINE_*` variable removed,
/// in a process group of its own (a stray signal to the test's group never reaches it, and tests
/// can signal its group like a terminal's Ctrl-C does).
#[derive(Debug, Clone)]
pub struct Launch {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    default_listen: bool,
    default_control: bool,
    subcommand: Option<&'static str>,
}

impl Launch {
    /// `tine serve …`.
    pub fn tine() -> Launch {
        Launch::program(tine_bin())
    }

    /// `examples/NAME serve …` (built on demand).
    pub fn example(name: &str) -> Launch {
        Launch::program(example_bin(name))
    }

    /// `PROGRAM serve …`.
    pub fn program(program: PathBuf) -> Launch {
        Launch {
            program,
            args: Vec::new(),
            env: Vec::new(),
            default_listen: true,
            default_control: true,
            subcommand: Some("serve"),
        }
    }

    /// Replaces `serve` with another subcommand (e.g. `check`); `None` for raw arguments.
    pub fn subcommand(mut self, sub: Option<&'static str>) -> Launch {
        self.subcommand = sub;
        self
    }

    /// Adds one argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Launch {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Launch
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable of the child.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Launch {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Does not add `--listen 127.0.0.1:0` (the listen address comes from a file or variable).
    pub fn no_default_listen(mut self) -> Launch {
        self.default_listen = false;
        self
    }

    /// Does not add `--control-socket DIR/ctl.sock`.
    pub fn no_default_control_socket(mut self) -> Launch {
        self.default_control = false;
        self
    }

    fn has_arg(&self, flag: &str) -> bool {
        let eq = format!("{flag}=");
        self.args
            .iter()
            .any(|a| a.to_str().is_some_and(|a| a == flag || a.starts_with(&eq)))
            || self.env.iter().any(|(k, _)| {
                k.to_str().is_some_and(|k| {
                    k == format!("TINE_{}", flag[2..].replace('-', "_").to_uppercase())
                })
            })
    }

    /// Spawns the program without waiting for anything.
    pub fn spawn(self) -> Server {
        self.spawn_with(Log::capture)
    }

    /// Like [`Launch::spawn`], with the reader of the tree's stderr pipe given to `capture` (which
    /// may, say, close it early).
    pub fn spawn_with(self, capture: impl FnOnce(std::process::ChildStderr) -> Log) -> Server {
        let dir = TempDir::new();
        let control_socket = dir.join("ctl.sock");
        let mut cmd = Command::new(&self.program);
        if let Some(sub) = self.subcommand {
            cmd.arg(sub);
        }
        if self.subcommand == Some("serve") || self.subcommand == Some("check") {
            if self.default_listen && !self.has_arg("--listen") {
                cmd.args(["--listen", "127.0.0.1:0"]);
            }
            if self.default_control && !self.has_arg("--control-socket") {
                cmd.arg("--control-socket").arg(&control_socket);
            }
        }
        cmd.args(&self.args);
        for (k, _) in std::env::vars_os() {
            if k.to_str().is_some_and(|k| k.starts_with("TINE_")) {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.program.display()));
        let pid = child.id() as i32;
        let log = capture(child.stderr.take().expect("stderr"));
        let stdout = Log::capture(child.stdout.take().expect("stdout"));
        let start_time = proc_info(pid).map(|p| p.start_time).unwrap_or(0);
        Server {
            child: Some(child),
            pid,
            start_time,
            log,
            stdout,
            control_socket,
            seen: Mutex::new(HashSet::new()),
            dir,
        }
    }

    /// Spawns the server and waits for `tine ready` (panics with the log if it does not come, or if
    /// the process exits first).
    pub fn start(self) -> Server {
        let server = self.spawn();
        server.wait_ready();
        server
    }

    /// Runs a command that should exit by itself within `timeout` (a `check`, a `serve` with a bad
    /// config): waits for the exit and for the output pipes to close (proving that nothing the
    /// command started still holds them). Panics, killing the tree, if it does not exit in time.
    pub fn run(self, timeout: Duration) -> Finished {
        let started = Instant::now();
        let mut server = self.spawn();
        let status = server.wait_exit(timeout).unwrap_or_else(|| {
            panic!(
                "still running after {timeout:?}; log:\n{}",
                server.log.text()
            )
        });
        let elapsed = started.elapsed();
        let pipes_closed = server.log.wait_eof(Duration::from_secs(2))
            && server.stdout.wait_eof(Duration::from_secs(2));
        Finished {
            status,
            stdout: server.stdout.lines(),
            stderr: server.log.lines(),
            elapsed,
            pipes_closed,
            control_socket_exists: server.control_socket.exists(),
        }
    }
}

/// The outcome of [`Launch::run`].
#[derive(Debug)]
pub struct Finished {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output lines.
    pub stdout: Vec<String>,
    /// Standard error lines.
    pub stderr: Vec<String>,
    /// Time from spawn to exit.
    pub elapsed: Duration,
    /// Whether stdout and stderr reached EOF soon after the exit (no process left holding them).
    pub pipes_closed: bool,
    /// Whether the default control socket path exists after the exit.
    pub control_socket_exists: bool,
}

impl Finished {
    /// The exit code (None if killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Standard error as one string.
    pub fn stderr_text(&self) -> String {
        self.stderr.join("\n")
    }

    /// Standard output as one string.
    pub fn stdout_text(&self) -> String {
        self.stdout.join("\n")
    }
}

/// A running server tree (the monitor is our child). Dropping it kills the whole tree.
pub struct Server {
    child: Option<Child>,
    /// The monitor's pid.
    pub pid: i32,
    start_time: u64,
    /// The monitor's stderr, shared by the whole tree: every log line.
    pub log: Log,
    /// The monitor's stdout.
    pub stdout: Log,
    /// The control socket path.
    pub control_socket: PathBuf,
    /// Every pid known to have belonged to the tree (for the kill guard).
    seen: Mutex<HashSet<i32>>,
    /// The server's working directory (removed after the tree is dead: fields drop after `drop`).
    pub dir: TempDir,
}

impl Server {
    /// Waits for the `tine ready` line.
    pub fn wait_ready(&self) {
        self.log.wait_for_log("tine ready", READY_TIMEOUT);
    }

    /// The listening addresses, as the monitor logged them when it started (`listen=a,b`), with the
    /// real port of a `:0` listener.
    pub fn addrs(&self) -> Vec<Addr> {
        let line = self.log.wait_for_log("starting listen=", READY_TIMEOUT);
        let list = line
            .split("listen=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_default();
        list.split(',')
            .map(|a| {
                a.parse()
                    .unwrap_or_else(|e| panic!("bad listen address {a:?} in {line:?}: {e}"))
            })
            .collect()
    }

    /// The first listening address.
    pub fn addr(&self) -> Addr {
        self.addrs().into_iter().next().expect("one listen address")
    }

    /// The first TCP listening address.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.addrs()
            .into_iter()
            .find_map(|a| match a {
                Addr::Tcp(sa) => Some(sa),
                Addr::Unix(_) => None,
            })
            .expect("a TCP listener")
    }

    /// `GET path` on the first address, `Connection: close`; panics on an I/O error.
    pub fn get(&self, path: &str) -> Response {
        get(&self.addr(), path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}; log:\n{}", self.log.text()))
    }

    /// Runs `tine ctl --control-socket PATH ARGS…`: stdout on success, stderr on failure.
    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        ctl(&self.control_socket, args)
    }

    /// `ctl status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = self
            .ctl(&["status", "--json"])
            .unwrap_or_else(|e| panic!("ctl status: {e}; log:\n{}", self.log.text()));
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("ctl status --json is not JSON ({e}): {out}"))
    }

    /// The workers in `ctl status --json`: (nr, pid, state).
    pub fn workers(&self) -> Vec<(u64, i32, String)> {
        let status = self.status();
        let mut out: Vec<_> = status["processes"]
            .as_array()
            .expect("processes")
            .iter()
            .filter(|p| p["role"] == "worker")
            .map(|p| {
                (
                    p["nr"].as_u64().unwrap_or(u64::MAX),
                    p["pid"].as_i64().unwrap_or(0) as i32,
                    p["state"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        out.sort();
        for (_, pid, _) in &out {
            self.remember(*pid);
        }
        out
    }

    /// Waits until `ctl status` shows exactly `n` workers, all serving (ready or busy), numbered
    /// 0..n; returns their pids by number. Panics with the last status on timeout.
    pub fn wait_workers(&self, n: usize, timeout: Duration) -> Vec<i32> {
        let mut last = Vec::new();
        let found = poll_until(timeout, || {
            last = self.workers();
            let serving = last.len() == n
                && last.iter().enumerate().all(|(i, (nr, _, state))| {
                    *nr == i as u64 && (state == "ready" || state == "busy")
                });
            serving.then(|| last.iter().map(|(_, pid, _)| *pid).collect())
        });
        found.unwrap_or_else(|| {
            panic!(
                "not {n} serving workers within {timeout:?}: {last:?}; log:\n{}",
                self.log.text()
            )
        })
    }

    /// Waits until a worker's scoreboard slot says `busy` (a request is in flight in it).
    pub fn wait_busy(&self, timeout: Duration) {
        let busy = poll_until(timeout, || {
            self.workers()
                .iter()
                .any(|(_, _, state)| state == "busy")
                .then_some(())
        });
        busy.unwrap_or_else(|| panic!("no busy worker within {timeout:?}: {:?}", self.workers()));
    }

    /// Waits for the monitor to exit and returns its exit code; panics with the log if it is
    /// still running after `timeout` or was killed by a signal.
    pub fn exit_code_within(&mut self, timeout: Duration) -> i32 {
        let status = self.wait_exit(timeout).unwrap_or_else(|| {
            panic!("still running after {timeout:?}; log:\n{}", self.log.text())
        });
        status
            .code()
            .unwrap_or_else(|| panic!("killed by a signal: {status}; log:\n{}", self.log.text()))
    }

    /// The tree under the monitor (not including it), with titles; remembered for the kill guard.
    pub fn tree(&self) -> Vec<Proc> {
        let procs = descendants(self.pid);
        for p in &procs {
            self.remember(p.pid);
        }
        procs
    }

    /// The monitor and its tree.
    pub fn all_pids(&self) -> Vec<i32> {
        let mut pids = vec![self.pid];
        pids.extend(self.tree().iter().map(|p| p.pid));
        pids
    }

    /// The tree's processes whose title starts with `prefix` (e.g. `tine worker[`).
    pub fn with_title(&self, prefix: &str) -> Vec<Proc> {
        self.tree()
            .into_iter()
            .filter(|p| p.title.starts_with(prefix))
            .collect()
    }

    /// Records `pid` as part of the tree (the kill guard will kill it if it is still alive and was
    /// started after the monitor).
    pub fn remember(&self, pid: i32) {
        if pid > 1 {
            self.seen.lock().unwrap().insert(pid);
        }
    }

    /// Sends `sig` to the monitor.
    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid), sig)
            .unwrap_or_else(|e| panic!("kill({}, {sig}): {e}", self.pid));
    }

    /// Whether the monitor has exited (reaping it if so).
    pub fn has_exited(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(Some(_))),
            None => true,
        }
    }

    /// Waits for the monitor to exit; `None` on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        poll_until(timeout, || child.try_wait().ok().flatten())
    }

    /// The monitor's pid, start time and every pid that ever belonged to the tree: from the tree
    /// right now and from the log (every line names the pid of the process that wrote it).
    fn known_pids(&self) -> HashSet<i32> {
        let mut pids: HashSet<i32> = self.seen.lock().unwrap().clone();
        for line in self.log.lines() {
            pids.extend(pids_in(&line));
        }
        pids.extend(descendants(self.pid).iter().map(|p| p.pid));
        pids.remove(&self.pid);
        pids
    }

    /// A handle on `pid` if it is one of ours now: a descendant of the monitor, or, once the
    /// monitor is gone, an orphan (adopted by init) started no earlier than the monitor. Never a
    /// process that merely reuses the number of one that was ours (a compiler's, beside the
    /// test): it is held by a pidfd from the check on (see [`pidfd`]).
    fn ours(&self, pid: i32, monitor_alive: bool) -> Option<pidfd::ProcessHandle> {
        pidfd::ProcessHandle::open_if(pid, |p| {
            if monitor_alive {
                pidfd::descends_from(p, self.pid)
            } else {
                p.ppid == 1 && p.start_time >= self.start_time
            }
        })
    }

    /// SIGKILLs the monitor and every process of its tree, then reaps the monitor. Freezes the
    /// tree first (SIGSTOP) so that nothing forks a replacement while it is being killed.
    pub fn kill_tree(&mut self) {
        let monitor_alive = self
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        if monitor_alive {
            // Our child, not reaped yet: its number cannot name another process.
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGSTOP);
        }
        let mut victims: HashMap<i32, pidfd::ProcessHandle> = HashMap::new();
        for _round in 0..20 {
            let before = victims.len();
            for pid in self.known_pids() {
                if victims.contains_key(&pid) {
                    continue;
                }
                if let Some(process) = self.ours(pid, monitor_alive) {
                    process.signal(Signal::SIGSTOP);
                    victims.insert(pid, process);
                }
            }
            if victims.len() == before {
                break;
            }
        }
        for process in victims.values() {
            process.signal(Signal::SIGKILL);
        }
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = poll_until(Duration::from_secs(2), || {
            victims.values().all(|p| !p.alive()).then_some(())
        });
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill_tree();
        if std::thread::panicking() {
            eprintln!(
                "---- server log (pid {}) ----\n{}\n---- end of server log ----",
                self.pid,
                self.log.text()
            );
        }
    }
}

/// Runs `tine ctl --control-socket SOCKET ARGS…` (bounded by [`CTL_TIMEOUT`]): stdout on success,
/// stderr on failure.
pub fn ctl(socket: &Path, args: &[&str]) -> Result<String, String> {
    ctl_within(socket, args, CTL_TIMEOUT)
}

/// [`ctl`] with another patience (a command that answers only once its work is done, such as
/// `ctl profile --seconds N`).
pub fn ctl_within(socket: &Path, args: &[&str], patience: Duration) -> Result<String, String> {
    let (mut child, out, err) = spawn_ctl(socket, args);
    let Some(status) = poll_until(patience, || child.try_wait().ok().flatten()) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!(
            "tine ctl {args:?} did not finish within {patience:?}"
        ));
    };
    out.wait_eof(Duration::from_secs(2));
    err.wait_eof(Duration::from_secs(2));
    let text = |log: &Log| {
        log.lines()
            .iter()
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    };
    if status.success() {
        Ok(text(&out))
    } else {
        Err(format!("{status}: {}", text(&err)))
    }
}

/// Starts `tine ctl --control-socket SOCKET ARGS…`; returns it with its stdout and stderr being
/// read (for a test that watches a command while it runs).
pub fn spawn_ctl(socket: &Path, args: &[&str]) -> (std::process::Child, Log, Log) {
    let mut child = Command::new(tine_bin())
        .arg("ctl")
        .arg("--control-socket")
        .arg(socket)
        .args(args)
        .env_remove("TINE_CONTROL_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tine ctl");
    let out = Log::capture(child.stdout.take().expect("stdout"));
    let err = Log::capture(child.stderr.take().expect("stderr"));
    (child, out, err)
}

// ---------------------------------------------------------------------------------------------
// Processes

/// One process, from `/proc/PID/stat` and `/proc/PID/cmdline`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    /// Process id.
    pub pid: i32,
    /// Parent process id.
    pub ppid: i32,
    /// Process group id.
    pub pgid: i32,
    /// State letter (`R`, `S`, `Z`, …).
    pub state: char,
    /// Start time in clock ticks since boot (tells a reused pid apart).
    pub start_time: u64,
    /// The title `ps` shows (cmdline, NULs as spaces, trimmed).
    pub title: String,
}

/// Reads one process; `None` if it does not exist (any more).
pub fn proc_info(pid: i32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces and parentheses.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state) of proc_pid_stat(5).
    let field = |n: usize| fields.get(n - 3).copied();
    Some(Proc {
        pid,
        state: field(3)?.chars().next()?,
        ppid: field(4)?.parse().ok()?,
        pgid: field(5)?.parse().ok()?,
        start_time: field(22)?.parse().ok()?,
        title: title(pid).unwrap_or_default(),
    })
}

/// The value of `key` in `/proc/PID/status` (the text after `key:`, trimmed), if the process
/// and the line exist.
pub fn status_field(pid: i32, key: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let value = l.strip_prefix(key)?.strip_prefix(':')?;
        Some(value.trim().to_string())
    })
}

/// The first number of `key` in `/proc/PID/status` (`VmRSS` in kB, `voluntary_ctxt_switches`).
///
/// # Panics
/// If the process or the line is gone: the caller asked about a process it knows is alive.
pub fn status_number(pid: i32, key: &str) -> u64 {
    status_field(pid, key)
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// The title `ps` shows for `pid`: `/proc/PID/cmdline` with NULs as spaces, trimmed.
pub fn title(pid: i32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let text: String = String::from_utf8_lossy(&raw)
        .chars()
        .map(|c| if c == '\0' { ' ' } else { c })
        .collect();
    Some(text.trim().to_string())
}

/// Every process on the machine.
pub fn all_procs() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(proc_info)
        .collect()
}

/// Every descendant of `root` (children, grandchildren…), found through the parent pids.
pub fn descendants(root: i32) -> Vec<Proc> {
    let procs = all_procs();
    let mut by_parent: HashMap<i32, Vec<&Proc>> = HashMap::new();
    for p in &procs {
        by_parent.entry(p.ppid).or_default().push(p);
    }
    let mut out = Vec::new();
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        for child in by_parent.get(&pid).into_iter().flatten() {
            queue.push(child.pid);
            out.push((*child).clone());
        }
    }
    out.sort_by_key(|p| p.pid);
    out
}

/// Whether `pid` is gone: no such process, or a zombie.
pub fn gone(pid: i32) -> bool {
    match proc_info(pid) {
        Some(p) => p.state == 'Z',
        None => true,
    }
}

/// Sends `sig` to `pid`, ignoring a process that is already gone.
pub fn signal(pid: i32, sig: Signal) {
    let _ = kill(Pid::from_raw(pid), sig);
}

/// The inodes of the sockets open in `pid` (`/proc/PID/fd/* -> socket:[INODE]`), one entry per
/// descriptor (a duplicated socket appears twice).
pub fn socket_inodes(pid: i32) -> Vec<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|target| {
            let t = target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?;
            t.parse().ok()
        })
        .collect()
}

/// The inode of the IPv4 TCP socket bound to `local` and connected to `remote` (for a listening
/// socket, pass `0.0.0.0:0` as `remote`), from `/proc/net/tcp`.
pub fn tcp_socket_inode(local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    fn hex(addr: SocketAddr) -> Option<String> {
        let SocketAddr::V4(a) = addr else { return None };
        // The kernel prints the address as a native-endian u32 (little-endian here), the port
        // big-endian.
        Some(format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(a.ip().octets()),
            a.port()
        ))
    }
    let (local, remote) = (hex(local)?, hex(remote)?);
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&local.as_str()) && f.get(2) == Some(&remote.as_str()))
            .then(|| f.get(9)?.parse().ok())
            .flatten()
    })
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// A listening address: TCP or a unix socket path (`unix:/path`, as tine prints it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// TCP.
    Tcp(SocketAddr),
    /// Unix stream socket.
    Unix(PathBuf),
}

impl std::str::FromStr for Addr {
    type Err = String;
    fn from_str(s: &str) -> Result<Addr, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(Addr::Unix(PathBuf::from(path)));
        }
        s.parse().map(Addr::Tcp).map_err(|e| format!("{s:?}: {e}"))
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Tcp(a) => write!(f, "{a}"),
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl From<SocketAddr> for Addr {
    fn from(a: SocketAddr) -> Addr {
        Addr::Tcp(a)
    }
}

/// A connected client socket.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix.
    Unix(UnixStream),
}

impl Stream {
    /// Connects, with [`IO_TIMEOUT`] on reads and writes.
    pub fn connect(addr: &Addr) -> io::Result<Stream> {
        let stream = match addr {
            Addr::Tcp(a) => Stream::Tcp(TcpStream::connect_timeout(a, IO_TIMEOUT)?),
            Addr::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
        };
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(stream)
    }

    /// Sets the read timeout.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Sets the write timeout.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// Shuts down the writing half (the server reads EOF).
    pub fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// A parsed HTTP/1.x response.
#[derive(Debug, Clone)]
pub struct Response {
    /// `HTTP/1.1`.
    pub version: String,
    /// Status code.
    pub status: u16,
    /// Reason phrase.
    pub reason: String,
    /// Headers in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The pid of the worker that answered (`x-tine-worker`, with `--debug-headers`).
    pub fn worker(&self) -> Option<i32> {
        self.header("x-tine-worker")?.trim().parse().ok()
    }

    /// Whether the server says it closes the connection after this response.
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }
}

/// Whether an I/O error means the peer closed or reset the connection.
pub fn is_closed_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

/// One client connection; requests on it are kept alive unless they say otherwise.
#[derive(Debug)]
pub struct Client {
    /// The socket.
    pub stream: Stream,
    buf: Vec<u8>,
}

/// The largest response head the client accepts.
const MAX_HEAD: usize = 1 << 20;

impl Client {
    /// Connects to `addr`.
    pub fn connect(addr: &Addr) -> io::Result<Client> {
        Ok(Client {
            stream: Stream::connect(addr)?,
            buf: Vec::new(),
        })
    }

    /// Sends raw bytes, exactly as given.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Sends a request: `METHOD PATH HTTP/1.1`, `Host`, the given headers, `Content-Length` when
    /// there is a body. The path is sent verbatim (no normalization).
    pub fn send_request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<()> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.send(&bytes)
    }

    /// Sends a request and reads its response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        self.send_request(method, path, headers, body)?;
        self.read_response(method == "HEAD")
    }

    /// `GET path` on this connection (kept alive).
    pub fn get(&mut self, path: &str) -> io::Result<Response> {
        self.request("GET", path, &[], b"")
    }

    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    fn read_exact_buf(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside the body",
                ));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    fn read_line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).collect();
                return Ok(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            if self.buf.len() > MAX_HEAD {
                return Err(io::Error::other("line too long"));
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a line",
                ));
            }
        }
    }

    /// Reads one response (`head` for a response to HEAD: no body).
    pub fn read_response(&mut self, head: bool) -> io::Result<Response> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(io::Error::other("response head too long"));
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed before a complete response head ({} bytes)",
                        self.buf.len()
                    ),
                ));
            }
        };
        let head_bytes: Vec<u8> = self.buf.drain(..head_end + 4).collect();
        let head_text = String::from_utf8_lossy(&head_bytes[..head_end]).into_owned();
        let mut lines = head_text.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default().to_string();
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
        let reason = parts.next().unwrap_or_default().to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut response = Response {
            version,
            status,
            reason,
            headers,
            body: Vec::new(),
        };
        if head || status / 100 == 1 || status == 204 || status == 304 {
            return Ok(response);
        }
        if response
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            loop {
                let size_line = self.read_line()?;
                let size =
                    usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| io::Error::other(format!("bad chunk size {size_line:?}")))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    while !self.read_line()?.is_empty() {}
                    break;
                }
                let chunk = self.read_exact_buf(size + 2)?;
                response.body.extend_from_slice(&chunk[..size]);
            }
        } else if let Some(len) = response.header("content-length") {
            let len: usize = len
                .trim()
                .parse()
                .map_err(|_| io::Error::other(format!("bad content-length {len:?}")))?;
            response.body = self.read_exact_buf(len)?;
        } else {
            // Delimited by the end of the connection.
            while self.fill()? > 0 {}
            response.body = std::mem::take(&mut self.buf);
        }
        Ok(response)
    }

    /// Reads everything until the server closes the connection (or `timeout`): the bytes, and
    /// whether it was closed (EOF or reset) rather than timed out.
    pub fn read_until_closed(&mut self, timeout: Duration) -> (Vec<u8>, bool) {
        let deadline = Instant::now() + timeout;
        let mut out = std::mem::take(&mut self.buf);
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (out, false);
            }
            let _ = self.stream.set_read_timeout(Some(left));
            match self.stream.read(&mut chunk) {
                Ok(0) => return (out, true),
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(e) if is_closed_error(&e) => return (out, true),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return (out, false)
                }
                Err(_) => return (out, true),
            }
        }
    }
}

/// `GET path` on a new connection with `Connection: close`.
pub fn get(addr: &Addr, path: &str) -> io::Result<Response> {
    get_with(addr, path, &[])
}

/// `GET path` with extra headers, on a new connection with `Connection: close`.
pub fn get_with(addr: &Addr, path: &str, headers: &[(&str, &str)]) -> io::Result<Response> {
    let mut client = Client::connect(addr)?;
    let mut all = vec![("Connection", "close")];
    all.extend_from_slice(headers);
    client.request("GET", path, &all, b"")
}

/// Sends raw bytes on a new connection and reads one response.
pub fn raw_request(addr: &Addr, bytes: &[u8]) -> io::Result<Response> {
    let mut client = Client::connect(addr)?;
    client.send(bytes)?;
    client.read_response(false)
}

// ---------------------------------------------------------------------------------------------
// Load

/// What a [`load`] run saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Responses by status code.
    pub by_status: BTreeMap<u16, usize>,
    /// Responses by the worker pid that answered (`x-tine-worker`; 0 when absent).
    pub by_worker: BTreeMap<i32, usize>,
    /// Requests that got no response, with why.
    pub errors: Vec<String>,
    /// Requests not sent because the deadline passed.
    pub skipped: usize,
}

impl LoadReport {
    /// Responses with status `code`.
    pub fn status(&self, code: u16) -> usize {
        self.by_status.get(&code).copied().unwrap_or(0)
    }

    /// Total responses.
    pub fn responses(&self) -> usize {
        self.by_status.values().sum()
    }
}

/// Sends `threads × per_thread` `GET path` requests concurrently, each on a new connection (or,
/// with `keep_alive`, one connection per thread, reopened if the server closes it). Bounded: every
/// socket has [`IO_TIMEOUT`], and no request starts after `deadline` from now.
pub fn load(
    addr: &Addr,
    path: &str,
    threads: usize,
    per_thread: usize,
    keep_alive: bool,
    deadline: Duration,
) -> LoadReport {
    let report = Mutex::new(LoadReport::default());
    let until = Instant::now() + deadline;
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut mine = LoadReport::default();
                let mut conn: Option<Client> = None;
                for i in 0..per_thread {
                    if Instant::now() >= until {
                        mine.skipped += per_thread - i;
                        break;
                    }
                    let result = if keep_alive {
                        let c = match conn.take() {
                            Some(c) => Ok(c),
                            None => Client::connect(addr),
                        };
                        c.and_then(|mut c| {
                            let r = c.get(path)?;
                            if !r.closes() {
                                conn = Some(c);
                            }
                            Ok(r)
                        })
                    } else {
                        get(addr, path)
                    };
                    match result {
                        Ok(r) => {
                            *mine.by_status.entry(r.status).or_default() += 1;
                            *mine.by_worker.entry(r.worker().unwrap_or(0)).or_default() += 1;
                        }
                        Err(e) => mine.errors.push(e.to_string()),
                    }
                }
                let mut all = report.lock().unwrap();
                for (k, v) in mine.by_status {
                    *all.by_status.entry(k).or_default() += v;
                }
                for (k, v) in mine.by_worker {
                    *all.by_worker.entry(k).or_default() += v;
                }
                all.errors.extend(mine.errors);
                all.skipped += mine.skipped;
            });
        }
    });
    report.into_inner().unwrap()
}
pub mod faults;
