//! The tree survives its own faults: logging that cannot write, signal dispositions and
//! descriptors inherited from whoever started it, descriptor exhaustion.

mod common;

use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::faults::{
    open_fds, open_files_limit, status_json, wait_generation, CloseAfterLine, StallAfterLine,
};
use common::*;
use nix::sys::signal::Signal;

/// How long a refork or a reload may take to roll 2-3 workers over (debug build, busy machine).
const ROLLOUT: Duration = Duration::from_secs(60);

/// USR2, HUP and TTIN each take effect (a new generation, another new generation, one worker
/// more), the tree answers requests, and the drops are counted.
fn obeys_signals_while_logs_fail(server: &Server, addr: &Addr) {
    let socket = &server.control_socket;
    let g0 = wait_generation(socket, 2, None, READY_TIMEOUT)
        .unwrap_or_else(|s| panic!("not 2 serving workers: {s}"));
    server.signal(Signal::SIGUSR2);
    let g1 = wait_generation(socket, 2, Some(g0), ROLLOUT)
        .unwrap_or_else(|s| panic!("USR2 made no new generation after gen:{g0}: {s}"));
    server.signal(Signal::SIGHUP);
    let g2 = wait_generation(socket, 2, Some(g1), ROLLOUT)
        .unwrap_or_else(|s| panic!("HUP made no new generation after gen:{g1}: {s}"));
    server.signal(Signal::SIGTTIN);
    wait_generation(socket, 3, None, ROLLOUT)
        .unwrap_or_else(|s| panic!("TTIN did not add a worker to gen:{g2}: {s}"));
    let response = get(addr, "/").expect("GET / after the signals");
    assert_eq!(response.status, 200);
    assert!(!gone(server.pid), "the monitor died");
    let status = status_json(socket).expect("ctl status --json");
    let dropped = status["log_lines_dropped"].as_u64().unwrap_or(0);
    assert!(dropped > 0, "no dropped log line counted: {status}");
    let text = ctl(socket, &["status"]).expect("ctl status");
    assert!(text.contains("log lines dropped: "), "{text}");
}

/// The value of an unlabelled metric in `GET /metrics`.
fn metric(metrics: &Addr, name: &str) -> Option<u64> {
    let body = get(metrics, "/metrics").ok()?.text();
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn the_tree_keeps_serving_and_obeys_signals_after_its_stderr_pipe_is_closed() {
    let server = Launch::tine()
        .args(["--workers", "2"])
        .spawn_with(|stderr| Log::capture(CloseAfterLine::new(stderr, "tine ready")));
    server.wait_ready();
    let addr = server.addr();
    // The test's end of the stderr pipe is closed: every later log line of the tree meets EPIPE.
    assert!(
        poll_until(Duration::from_secs(5), || server.log.is_eof().then_some(())).is_some(),
        "the stderr reader did not stop"
    );
    obeys_signals_while_logs_fail(&server, &addr);
}

#[test]
fn the_tree_keeps_serving_and_obeys_signals_while_the_reader_of_its_stderr_stalls() {
    let server = Launch::tine()
        .args(["--workers", "2"])
        .spawn_with(|stderr| {
            Log::capture(StallAfterLine::new(
                stderr,
                "tine ready",
                Duration::from_secs(120),
            ))
        });
    server.wait_ready();
    let addr = server.addr();
    // Lines enough to fill the one page left in the pipe: `reopen-logs` without a log file
    // answers an error and logs a line of about 100 bytes.
    for i in 0..60 {
        match server.ctl(&["reopen-logs"]) {
            Err(e) if e.contains("no log_file") => {}
            other => panic!("reopen-logs #{i} while the log is stalled: {other:?}"),
        }
    }
    obeys_signals_while_logs_fail(&server, &addr);
}

#[test]
fn the_tree_keeps_serving_and_obeys_signals_with_log_file_dev_full() {
    let port = free_port();
    let metrics_port = free_port();
    let server = Launch::tine()
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .args(["--workers", "2", "--log-file", "/dev/full"])
        .spawn();
    let addr = Addr::Tcp(format!("127.0.0.1:{port}").parse().unwrap());
    // Reopening the log file (USR1) opens /dev/full again: still nothing can be written.
    let socket: &Path = &server.control_socket;
    wait_generation(socket, 2, None, READY_TIMEOUT)
        .unwrap_or_else(|s| panic!("not ready with log_file = /dev/full: {s}"));
    server.signal(Signal::SIGUSR1);
    obeys_signals_while_logs_fail(&server, &addr);
    let metrics = Addr::Tcp(format!("127.0.0.1:{metrics_port}").parse().unwrap());
    let dropped = metric(&metrics, "tine_log_lines_dropped_total").unwrap_or(0);
    assert!(dropped > 0, "tine_log_lines_dropped_total is {dropped}");
}

/// Whether signal `sig` is in the hexadecimal signal mask `mask` (`SigIgn:` of /proc/PID/status).
fn in_mask(mask: &str, sig: Signal) -> bool {
    u64::from_str_radix(mask.trim(), 16).is_ok_and(|m| m & (1 << (sig as i32 - 1)) != 0)
}

#[test]
fn a_worker_death_is_reaped_and_replaced_when_the_launcher_ignored_sigchld() {
    // A launcher that ignores SIGCHLD and blocks SIGALRM (both survive an exec): GNU env does it.
    let launcher = ["--ignore-signal=CHLD", "--block-signal=ALRM"];
    let probe = Command::new("env")
        .args(launcher)
        .args(["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"])
        .output()
        .expect("run env");
    let probe = String::from_utf8_lossy(&probe.stdout).to_string();
    let field = |name: &str| {
        probe
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        in_mask(&field("SigIgn:"), Signal::SIGCHLD) && in_mask(&field("SigBlk:"), Signal::SIGALRM),
        "env did not ignore SIGCHLD and block SIGALRM: {probe}"
    );

    let server = Launch::program(PathBuf::from("env"))
        .subcommand(None)
        .args(launcher)
        .arg(tine_bin())
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--control-socket", "ctl.sock"])
        .args(["--workers", "2"])
        .start();
    let ignored = status_field(server.pid, "SigIgn").unwrap_or_default();
    assert!(
        !in_mask(&ignored, Signal::SIGCHLD) && in_mask(&ignored, Signal::SIGPIPE),
        "the monitor's ignored signals are {ignored}: SIGCHLD must not be, SIGPIPE must be"
    );
    let blocked = status_field(server.pid, "SigBlk").unwrap_or_default();
    assert!(
        !in_mask(&blocked, Signal::SIGALRM),
        "the monitor still blocks SIGALRM: SigBlk {blocked}"
    );
    let before = server.wait_workers(2, READY_TIMEOUT);
    server.signal_process(before[0], Signal::SIGKILL);
    let replaced = poll_until(Duration::from_secs(20), || {
        let now = server.workers();
        let serving = now.len() == 2
            && now
                .iter()
                .all(|(_, pid, state)| *pid != before[0] && (state == "ready" || state == "busy"));
        serving.then_some(now)
    });
    assert!(
        replaced.is_some(),
        "worker 0 (pid {}) was not reaped and replaced: {:?}",
        before[0],
        server.workers()
    );
    server.log.wait_for_log("died", Duration::from_secs(5));
}

/// Starts `sleep` from a worker (`GET addr /subprocess/60`) and returns the socket inodes it
/// holds; the sleep is killed before returning.
fn subprocess_sockets(server: &Server, addr: &Addr) -> Vec<u64> {
    let pid: i32 = get(addr, "/subprocess/60")
        .expect("GET /subprocess/60")
        .text()
        .trim()
        .parse()
        .expect("the pid of the subprocess");
    server.remember(pid);
    let held = socket_inodes(pid);
    server.signal_process(pid, Signal::SIGKILL);
    held
}

/// The sockets among `watched` that a worker's subprocess holds.
fn sockets_leaked_to_a_subprocess(server: &Server, watched: &[u64]) -> Vec<u64> {
    let held = subprocess_sockets(server, &server.addr());
    held.into_iter().filter(|i| watched.contains(i)).collect()
}

#[test]
fn a_workers_subprocess_holds_no_listening_socket_after_a_reload() {
    let server = Launch::tine()
        .args(["--workers", "1", "--debug-routes"])
        .start();
    let listener = tcp_socket_inode(server.tcp_addr(), "0.0.0.0:0".parse().unwrap())
        .expect("the listener's inode");
    let g0 = wait_generation(&server.control_socket, 1, None, READY_TIMEOUT)
        .unwrap_or_else(|s| panic!("not ready: {s}"));
    // The monitor's own sockets too (control socket, channels): none may leak.
    let mut watched = socket_inodes(server.pid);
    watched.push(listener);
    assert_eq!(
        sockets_leaked_to_a_subprocess(&server, &watched),
        Vec::<u64>::new()
    );
    // After a reload, the listeners and the rest came across an execve.
    server.signal(Signal::SIGHUP);
    wait_generation(&server.control_socket, 1, Some(g0), ROLLOUT)
        .unwrap_or_else(|s| panic!("the reload made no new generation: {s}"));
    let mut watched = socket_inodes(server.pid);
    watched.push(listener);
    let leaked = sockets_leaked_to_a_subprocess(&server, &watched);
    assert!(
        leaked.is_empty(),
        "a worker's subprocess holds the monitor's sockets {leaked:?} (listener {listener})"
    );
}

/// This process's hard `RLIMIT_NOFILE`.
fn hard_nofile() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit")
        .1
}

#[test]
fn a_max_workers_that_cannot_fit_under_rlimit_nofile_is_refused_with_exit_2() {
    for sub in ["serve", "check"] {
        let out = Launch::program(PathBuf::from("prlimit"))
            .subcommand(None)
            .args(["--nofile=64:64", "--"])
            .arg(tine_bin())
            .arg(sub)
            .args(["--listen", "127.0.0.1:0", "--control-socket", "ctl.sock"])
            .args(["--workers", "1", "--max-workers", "100"])
            .run(Duration::from_secs(20));
        let stderr = out.stderr_text();
        assert_eq!(out.code(), Some(2), "{sub}: {stderr}");
        assert!(
            stderr.contains("`max_workers`") && stderr.contains("RLIMIT_NOFILE"),
            "{sub}: {stderr}"
        );
    }
}

#[test]
fn the_monitor_raises_its_descriptor_limit_to_the_hard_limit() {
    let hard = hard_nofile().min(8192);
    assert!(hard > 512, "this test needs a hard RLIMIT_NOFILE above 512");
    let server = Launch::program(PathBuf::from("prlimit"))
        .subcommand(None)
        .arg(format!("--nofile=256:{hard}"))
        .arg("--")
        .arg(tine_bin())
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--control-socket", "ctl.sock"])
        .args(["--workers", "1"])
        .start();
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    assert_eq!(open_files_limit(server.pid), Some((hard, hard)), "monitor");
    assert_eq!(open_files_limit(worker), Some((hard, hard)), "worker");
}

/// A tree of one serving worker with a metrics port, and that port's address.
fn one_worker_with_metrics() -> (Server, SocketAddr) {
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let server = Launch::tine()
        .args(["--workers", "1"])
        .arg("--metrics-listen")
        .arg(metrics.to_string())
        .start();
    server.wait_workers(1, READY_TIMEOUT);
    (server, metrics)
}

/// The most failed accepts in a row that the monitor logged for `listener` ("control socket" or
/// "metrics"): the first failure logs a warning, every later one a debug line with `failures=N`.
fn accept_failures_in_a_row(lines: &[String], listener: &str) -> u64 {
    let prefix = format!("{listener}: accept failed");
    lines
        .iter()
        .filter(|l| l.contains(&prefix))
        .map(|l| {
            l.split("failures=")
                .nth(1)
                .and_then(|rest| {
                    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    digits.parse().ok()
                })
                .unwrap_or(1)
        })
        .max()
        .unwrap_or(0)
}

/// How many failed accepts in a row one listener can make within `window` when the pause after
/// each doubles from 10 ms to 1 s: one, then one more after each pause that fits, plus slack.
/// A slow machine only makes fewer attempts in the window, never more.
fn accept_attempts_allowed(window: Duration) -> u64 {
    let mut pause = Duration::from_millis(10);
    let mut spent = Duration::ZERO;
    let mut attempts = 1;
    while spent + pause <= window {
        spent += pause;
        attempts += 1;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
    attempts + 2
}

#[test]
fn out_of_descriptors_the_monitor_backs_off_accepting_and_recovers() {
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // Debug lines of the two accepting listeners count every failed accept.
    let server = Launch::tine()
        .args(["--workers", "1"])
        .arg("--metrics-listen")
        .arg(metrics.to_string())
        .args(["--log-level", "info,tine::monitor::accept=debug"])
        .start();
    server.wait_workers(1, READY_TIMEOUT);
    let pid = server.pid.to_string();
    let (soft, hard) = open_files_limit(server.pid).expect("limits");
    // Room for two more descriptors only.
    let tight = open_fds(server.pid) + 2;
    let set_limit = |soft: u64| {
        let ok = Command::new("prlimit")
            .args(["--pid", &pid])
            .arg(format!("--nofile={soft}:{hard}"))
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "prlimit --pid {pid} --nofile={soft}:{hard}");
    };
    let mark = server.log.mark();
    // No accept can fail before this instant, so the window measured from here holds every
    // failure counted below (and is, if anything, longer than the monitor's).
    let window_start = Instant::now();
    set_limit(tight as u64);
    // Clients that connect and say nothing: the first two are accepted, then every accept of
    // both listeners fails with EMFILE while connections stay queued.
    let mut idle: Vec<Box<dyn std::any::Any>> = Vec::new();
    for _ in 0..20 {
        idle.push(Box::new(
            UnixStream::connect(&server.control_socket).expect("connect to the control socket"),
        ));
        idle.push(Box::new(
            std::net::TcpStream::connect(metrics).expect("connect to the metrics port"),
        ));
    }
    let fds_full = poll_until(Duration::from_secs(5), || {
        (open_fds(server.pid) >= tight).then_some(())
    });
    assert!(
        fds_full.is_some(),
        "the monitor did not take the idle clients"
    );
    // The window ends once both listeners have failed 8 times in a row: with the backoff that
    // takes 10+20+...+640 ms = 1.27 s at least; a monitor that retried at once would log
    // thousands of failures by then.
    for listener in ["control socket", "metrics"] {
        let reached = poll_until(Duration::from_secs(30), || {
            let lines = server.log.lines();
            (accept_failures_in_a_row(&lines[mark..], listener) >= 8).then_some(())
        });
        assert!(
            reached.is_some(),
            "{listener}: no 8 failed accepts in a row logged within 30 s"
        );
    }
    let lines = server.log.lines();
    let window = window_start.elapsed();
    let allowed = accept_attempts_allowed(window);
    for listener in ["control socket", "metrics"] {
        let failures = accept_failures_in_a_row(&lines[mark..], listener);
        eprintln!("{listener}: {failures} failed accepts in {window:?} (at most {allowed})");
        assert!(
            failures <= allowed,
            "{listener}: {failures} failed accepts in {window:?}; with the backoff at most {allowed}"
        );
    }
    // Recovery: the clients go, the limit comes back, control and metrics answer again.
    drop(idle);
    set_limit(soft);
    let status = poll_until(Duration::from_secs(10), || server.ctl(&["status"]).ok());
    assert!(
        status.is_some(),
        "ctl status does not answer after recovery"
    );
    let answered = poll_until(Duration::from_secs(10), || {
        get(&Addr::Tcp(metrics), "/metrics")
            .ok()
            .filter(|r| r.status == 200)
    });
    assert!(
        answered.is_some(),
        "GET /metrics does not answer after recovery"
    );
    assert!(!gone(server.pid));
}

#[test]
fn no_fork_when_the_thread_count_cannot_be_read() {
    // An empty file system over /proc, in a user and mount namespace of the test's own.
    let userns = Command::new("unshare")
        .args(["-rm", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !userns {
        // CI (.ci/run) checks `unshare -rm true` first: a test that skipped there would never run.
        assert!(
            std::env::var_os("TINE_TEST_ALLOW_SKIP").is_some(),
            "`unshare -rm true` fails: this test needs user and mount namespaces \
             (set TINE_TEST_ALLOW_SKIP=1 to skip it on a machine without them)"
        );
        eprintln!("SKIPPED (TINE_TEST_ALLOW_SKIP): user namespaces unavailable (unshare -rm)");
        return;
    }
    let out = Launch::program(PathBuf::from("unshare"))
        .subcommand(None)
        .args([
            "-rm",
            "/bin/sh",
            "-c",
            "mount -t tmpfs none /proc && exec \"$0\" serve \"$@\"",
        ])
        .arg(tine_bin())
        .args(["--listen", "127.0.0.1:0", "--control-socket", "ctl.sock"])
        .args(["--workers", "1", "--max-consecutive-spawn-errors", "2"])
        .run(Duration::from_secs(30));
    let stderr = out.stderr_text();
    assert_eq!(out.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("refusing to fork: cannot count"),
        "{stderr}"
    );
    assert!(!stderr.contains("forked mold"), "{stderr}");
}

#[test]
fn a_workers_subprocess_holds_no_socket_activated_listener() {
    let tool = ["/usr/bin", "/bin", "/lib/systemd", "/usr/lib/systemd"]
        .iter()
        .map(|d| Path::new(d).join("systemd-socket-activate"))
        .find(|p| p.is_file())
        .expect("systemd-socket-activate is not installed (Debian package `systemd`)");
    let port = free_port();
    let server = Launch::program(tool)
        .subcommand(None)
        .args(["-l", &format!("127.0.0.1:{port}")])
        .arg(tine_bin())
        .args(["serve", "--workers", "1", "--debug-routes"])
        .args(["--control-socket", "ctl.sock"])
        .spawn();
    server
        .log
        .wait_for_log(&format!("Listening on 127.0.0.1:{port}"), READY_TIMEOUT);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let listener = tcp_socket_inode(addr, "0.0.0.0:0".parse().unwrap()).expect("listener inode");
    // The first connection makes systemd-socket-activate exec the tree, which answers it.
    let held = subprocess_sockets(&server, &Addr::Tcp(addr));
    assert!(
        !held.contains(&listener),
        "a worker's subprocess holds the socket-activated listener {listener}: {held:?}"
    );
}

/// `status` over the control socket as `tine ctl` sends it, without a process start in the
/// measurement: the reply and how long it took.
fn timed_status(socket: &Path) -> (Result<String, String>, Duration) {
    use std::io::{Read, Write};
    let started = Instant::now();
    let result = (|| {
        let mut stream = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        stream
            .write_all(b"status\n")
            .map_err(|e| format!("send: {e}"))?;
        let mut reply = String::new();
        stream
            .read_to_string(&mut reply)
            .map_err(|e| format!("read: {e}"))?;
        Ok(reply)
    })();
    (result, started.elapsed())
}

#[test]
fn ctl_status_answers_in_time_while_a_client_floods_the_metrics_port() {
    let (server, metrics) = one_worker_with_metrics();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Four clients that ask for /metrics and then never stop sending; when the server closes on
    // one, it comes back. Bounded: 20 s at most.
    let floods: Vec<_> = (0..4)
        .map(|_| {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                use std::io::Write;
                let until = Instant::now() + Duration::from_secs(20);
                let chunk = vec![b'x'; 64 * 1024];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < until {
                    let Ok(mut c) = std::net::TcpStream::connect(metrics) else {
                        continue;
                    };
                    let _ = c.set_write_timeout(Some(Duration::from_millis(200)));
                    if c.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
                        .is_err()
                    {
                        continue;
                    }
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < until
                    {
                        match c.write(&chunk) {
                            Ok(n) => {
                                sent.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                            Err(_) => break,
                        }
                    }
                }
            })
        })
        .collect();
    let flowing = poll_until(Duration::from_secs(5), || {
        (sent.load(std::sync::atomic::Ordering::Relaxed) > 1 << 20).then_some(())
    });
    let mut times = Vec::new();
    let mut failures = Vec::new();
    for _ in 0..30 {
        let (reply, took) = timed_status(&server.control_socket);
        match reply {
            Ok(text) if text.starts_with("OK\n") => times.push(took),
            other => failures.push(format!("{other:?} after {took:?}")),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for flood in floods {
        let _ = flood.join();
    }
    assert!(flowing.is_some(), "the flood did not get going");
    eprintln!("ctl status while the metrics port is flooded: {times:?}");
    assert!(failures.is_empty(), "ctl status failed: {failures:?}");
    let slow: Vec<_> = times
        .iter()
        .filter(|t| **t > Duration::from_millis(300))
        .collect();
    assert!(slow.is_empty(), "ctl status took over 300 ms: {times:?}");
}

#[test]
fn a_log_file_that_is_a_symbolic_link_is_refused() {
    let dir = TempDir::new();
    let target = dir.write("elsewhere.log", "");
    let link = dir.join("tine.log");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let out = Launch::tine()
        .args(["--workers", "1", "--log-file"])
        .arg(&link)
        .run(Duration::from_secs(20));
    let stderr = out.stderr_text();
    assert_eq!(out.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("`log_file`") && stderr.contains("symbolic link"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "",
        "written through the link"
    );
}

#[test]
fn a_log_file_or_directory_writable_by_the_unprivileged_user_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: dropping privileges to `user` needs root");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .ok()
        .flatten()
        .expect("user nobody");
    let dir = TempDir::new();
    // A directory nobody owns, and a file nobody owns in a directory of root's.
    let theirs = dir.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(
        &theirs,
        Some(nobody.uid.as_raw()),
        Some(nobody.gid.as_raw()),
    )
    .unwrap();
    let their_file = dir.write("their.log", "");
    std::os::unix::fs::chown(&their_file, Some(nobody.uid.as_raw()), None).unwrap();
    for path in [theirs.join("tine.log"), their_file] {
        let out = Launch::tine()
            .args(["--workers", "1", "--user", "nobody", "--log-file"])
            .arg(&path)
            .run(Duration::from_secs(20));
        let stderr = out.stderr_text();
        assert_eq!(out.code(), Some(2), "{}: {stderr}", path.display());
        assert!(
            stderr.contains("`log_file`") && stderr.contains("writable by `user`"),
            "{}: {stderr}",
            path.display()
        );
    }
    // Root's file in root's directory is fine.
    let server = Launch::tine()
        .args(["--workers", "1", "--user", "nobody", "--log-file"])
        .arg(dir.join("root.log"))
        .spawn();
    let ready = poll_until(READY_TIMEOUT, || {
        std::fs::read_to_string(dir.join("root.log"))
            .ok()
            .filter(|t| t.contains("tine ready"))
    });
    assert!(ready.is_some(), "no `tine ready` in root's log file");
    drop(server);
}
