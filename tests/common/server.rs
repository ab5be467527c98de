//! Starting servers (`tine serve` or an example's `serve`) as child processes, the running tree
//! as a handle that kills it on drop, and `tine ctl` against it.

use super::*;

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

    /// `ctl status --json`, parsed. A call that does not finish within [`CTL_TIMEOUT`] is tried
    /// once more (said on stderr, with where the client was) before the test fails: this VM has
    /// stalls of several seconds (the disk's writeback, the host) that hold a client as well as a
    /// monitor, and a monitor that does not answer fails the second call too.
    pub fn status(&self) -> serde_json::Value {
        let out = self
            .ctl(&["status", "--json"])
            .or_else(|first| {
                if !first.contains(CTL_TIMED_OUT) {
                    return Err(first);
                }
                eprintln!("ctl status: {first}; trying once more");
                self.ctl(&["status", "--json"])
                    .map_err(|second| format!("{first}; then, tried once more: {second}"))
            })
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

    /// Waits until `ctl status` shows process `pid` serving as worker `nr` (a spare that took a
    /// place, say); `None` on timeout.
    pub fn wait_serving_as(&self, nr: u64, pid: i32, timeout: Duration) -> Option<()> {
        poll_until(timeout, || {
            self.workers()
                .iter()
                .any(|(n, p, _)| *n == nr && *p == pid)
                .then_some(())
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
    /// Without the holders of workers' memory (`teardown_holder`), each of which shows its
    /// worker's title and memory figures: [`Server::holders`] lists them.
    pub fn tree(&self) -> Vec<Proc> {
        self.descendants_remembered()
            .into_iter()
            .filter(|p| !is_holder(p))
            .collect()
    }

    /// The holders of workers' memory under the monitor (see [`Server::tree`]).
    pub fn holders(&self) -> Vec<Proc> {
        self.descendants_remembered()
            .into_iter()
            .filter(is_holder)
            .collect()
    }

    /// Every process under the monitor, remembered for the kill guard.
    fn descendants_remembered(&self) -> Vec<Proc> {
        let procs = descendants(self.pid);
        for p in &procs {
            self.remember(p.pid);
        }
        procs
    }

    /// Waits until `ctl status` shows a spare standing by; panics on timeout, with the status.
    pub fn wait_spare_standing_by(&self, timeout: Duration) {
        let standing_by = poll_until(timeout, || {
            self.status()["processes"]
                .as_array()?
                .iter()
                .any(|p| p["role"] == "spare" && p["state"] == "standby")
                .then_some(())
        });
        assert!(
            standing_by.is_some(),
            "no spare stood by within {timeout:?}: {}",
            self.status()
        );
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

/// What [`ctl_within`]'s error says of a call that did not finish in time.
const CTL_TIMED_OUT: &str = "did not finish within";

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
        // Where the client was, before it goes: a client held by the machine (in `D`, waiting on
        // the disk for a page of its executable) tells a stalled VM from an unanswering monitor.
        let pid = child.id();
        let state = proc_info(pid as i32).map_or('?', |p| p.state);
        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!(
            "tine ctl {args:?} {CTL_TIMED_OUT} {patience:?} (the client was in state {state}, \
             wchan {wchan:?})"
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
