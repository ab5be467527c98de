//! Reload without downtime, black box: `SIGHUP` and `tine ctl reload` with a rebuilt binary under
//! load, refused reloads (a config that does not validate, a binary that exits at once, a new mold
//! whose preload fails), `reload_strategy = retire-first`, development mode (`--watch-boot`,
//! `--watch`, a rebuilt executable), `SIGUSR1` log reopening and the pid file across a reload.
//!
//! The servers run a copy of an example binary (`hello_v1`, `watch_demo`) from a temp dir as
//! `app`, so that the tests can replace that file the way cargo or a deploy tool does (write a
//! temporary name, then rename over it) while the monitor runs it.
//!
//! Every server listens on a fixed free port rather than `127.0.0.1:0`: the new image matches the
//! handed-over listeners to the configured addresses, and a configured port 0 matches none of them
//! (see the issue note).

mod common;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// Longest a reload may take in these tests (debug builds, two busy cores, parallel tests).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Helpers of this file

/// A directory with the executable under test as `app`, replaced the way cargo and deploy tools
/// replace files: written under a temporary name, then renamed over the old one (the running
/// image keeps its inode; the path names the new file).
///
/// The copies are written by `cp`, never through a descriptor of this process: a test thread's
/// `Command::spawn` forks this multi-threaded process, and a child that inherited a descriptor open
/// for writing (until its exec closes it) makes executing the file fail with `ETXTBSY`.
struct AppDir {
    dir: TempDir,
}

impl AppDir {
    fn new(build: &Path) -> AppDir {
        let app = AppDir {
            dir: TempDir::new(),
        };
        app.install(build);
        app
    }

    fn exe(&self) -> PathBuf {
        self.dir.join("app")
    }

    /// Replaces `app` with a copy of `build`, atomically.
    fn install(&self, build: &Path) {
        let tmp = self.dir.join(".app.new");
        let status = std::process::Command::new("cp")
            .arg(build)
            .arg(&tmp)
            .status()
            .expect("run cp");
        assert!(status.success(), "cp {} {}", build.display(), tmp.display());
        std::fs::rename(&tmp, self.exe()).expect("rename over app");
    }

    /// Replaces `app` with a file holding `text` (executable or not), atomically.
    fn install_text(&self, text: &str, executable: bool) {
        let source = self.dir.write("source.txt", text);
        let tmp = self.dir.join(".app.new");
        let mode = if executable { "755" } else { "644" };
        let status = std::process::Command::new("install")
            .args(["-m", mode])
            .arg(&source)
            .arg(&tmp)
            .status()
            .expect("run install");
        assert!(status.success(), "install {}", source.display());
        std::fs::rename(&tmp, self.exe()).expect("rename over app");
    }
}

/// `--listen 127.0.0.1:PORT` on a port that was free a moment ago.
fn listen_arg() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// Writes `contents` to `path` the way editors that save atomically do: a temporary file in the
/// same directory, renamed over the old one.
fn write_atomically(path: &Path, contents: impl AsRef<[u8]>) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, contents).expect("write the temporary file");
    std::fs::rename(&tmp, path).expect("rename over the file");
}

/// Where `/proc/PID/exe` points (` (deleted)` once the file was replaced).
fn exe_link(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// The titles of the tree, sorted.
fn titles(server: &Server) -> Vec<String> {
    let mut t: Vec<String> = server.tree().into_iter().map(|p| p.title).collect();
    t.sort();
    t
}

/// The titles of a settled tree of generation `generation` with `workers` workers (and the hot
/// spare, `spare_workers` 1 by default, refreshed from the generation's mold).
fn settled(generation: u32, workers: usize) -> Vec<String> {
    let mut t = vec![
        format!("tine mold (gen:{generation})"),
        format!("tine spare (gen:{generation})"),
    ];
    t.extend((0..workers).map(|nr| format!("tine worker[{nr}] (gen:{generation})")));
    t.sort();
    t
}

/// Waits until the tree is exactly the mold, `workers` workers and the spare of `generation`.
fn wait_settled(server: &Server, generation: u32, workers: usize) -> Vec<Proc> {
    let want = settled(generation, workers);
    let mut last = Vec::new();
    let ok = poll_until(Duration::from_secs(10), || {
        last = titles(server);
        (last == want).then_some(())
    });
    assert!(
        ok.is_some(),
        "tree is not {want:?} but {last:?}; log:\n{}",
        server.log.text()
    );
    server.tree()
}

/// The milliseconds in a `... in N ms` / `ms=N` log line.
fn millis_in(line: &str) -> u64 {
    let after = line
        .split(" in ")
        .nth(1)
        .or_else(|| line.split("ms=").nth(1))
        .unwrap_or_default();
    after
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("no milliseconds in {line:?}"))
}

/// One request of a [`Traffic`] run.
#[derive(Debug, Clone)]
struct Sample {
    start: Instant,
    end: Instant,
    /// Status and body, or why there was no response.
    result: Result<(u16, String), String>,
    /// Sent again on a new connection after a kept-alive one was closed under it (what browsers,
    /// curl and Go do with an idempotent request).
    retried: bool,
}

/// Bounded background load: threads that `GET` a path until stopped (at most [`Traffic::MAX`]
/// requests each, and never past [`Traffic::DEADLINE`]). Half of the threads open a new connection
/// per request; the other half keep theirs alive.
struct Traffic {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Traffic {
    const MAX: usize = 20_000;
    const DEADLINE: Duration = Duration::from_secs(90);

    fn start(addr: &Addr, path: &str, threads: usize) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let until = Instant::now() + Self::DEADLINE;
        let threads = (0..threads)
            .map(|i| {
                let (addr, path, stop, samples) = (
                    addr.clone(),
                    path.to_string(),
                    stop.clone(),
                    samples.clone(),
                );
                std::thread::spawn(move || {
                    let keep_alive = i % 2 == 1;
                    let mut conn: Option<Client> = None;
                    for _ in 0..Self::MAX {
                        if stop.load(Ordering::Relaxed) || Instant::now() >= until {
                            break;
                        }
                        let start = Instant::now();
                        let (result, retried) = if keep_alive {
                            kept_alive_get(&addr, &path, &mut conn)
                        } else {
                            (get(&addr, &path), false)
                        };
                        let result = result
                            .map(|r| (r.status, r.text()))
                            .map_err(|e| e.to_string());
                        samples.lock().unwrap().push(Sample {
                            start,
                            end: Instant::now(),
                            result,
                            retried,
                        });
                        // Paced: a steady load, not a saturation of the two cores.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            samples,
            threads,
        }
    }

    fn count(&self, pred: impl Fn(&Sample) -> bool) -> usize {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter(|s| pred(s))
            .count()
    }

    /// Waits until `n` requests that started after `t` have finished.
    fn wait_after(&self, t: Instant, n: usize) {
        let ok = poll_until(Duration::from_secs(30), || {
            (self.count(|s| s.start >= t) >= n).then_some(())
        });
        assert!(
            ok.is_some(),
            "fewer than {n} requests after the mark: {}",
            self.count(|s| s.start >= t)
        );
    }

    fn finish(mut self) -> Vec<Sample> {
        self.halt();
        std::mem::take(&mut *self.samples.lock().unwrap())
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.halt();
    }
}

/// `GET` on the kept-alive connection, reopened when the server closed it; a request on a reused
/// connection that the server closed before answering is sent once more on a new one.
fn kept_alive_get(
    addr: &Addr,
    path: &str,
    conn: &mut Option<Client>,
) -> (io::Result<Response>, bool) {
    let mut retried = false;
    let result = match conn.take() {
        Some(mut c) => match c.get(path) {
            Err(e) if is_closed_error(&e) => {
                retried = true;
                Client::connect(addr).and_then(|mut c| c.get(path).map(|r| (r, c)))
            }
            other => other.map(|r| (r, c)),
        },
        None => Client::connect(addr).and_then(|mut c| c.get(path).map(|r| (r, c))),
    };
    let result = result.map(|(r, c)| {
        if !r.closes() {
            *conn = Some(c);
        }
        r
    });
    (result, retried)
}

/// Asserts that every request got a 200 with one of `bodies`; returns how many were retried.
fn assert_all_ok(samples: &[Sample], bodies: &[&str], log: &Log) -> usize {
    let bad: Vec<&Sample> = samples
        .iter()
        .filter(|s| !matches!(&s.result, Ok((200, b)) if bodies.contains(&b.as_str())))
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {} requests failed, e.g. {:?}; log:\n{}",
        bad.len(),
        samples.len(),
        &bad[..bad.len().min(5)],
        log.text()
    );
    samples.iter().filter(|s| s.retried).count()
}

fn body_of(s: &Sample) -> &str {
    s.result.as_ref().map(|(_, b)| b.as_str()).unwrap_or("")
}

// ---------------------------------------------------------------------------------------------
// Reload with a rebuilt binary

#[test]
fn hup_with_a_rebuilt_binary_switches_versions_under_load_without_a_failed_request() {
    let app = AppDir::new(&example_bin("hello_v1"));
    let server = Launch::program(app.exe())
        .args(["--listen", &listen_arg(), "--workers", "3"])
        .start();
    let addr = server.addr();
    let before = wait_settled(&server, 0, 3);
    assert_eq!(server.get("/").text(), "hello v1\n");
    assert_eq!(exe_link(server.pid), app.exe().display().to_string());

    let traffic = Traffic::start(&addr, "/", 4);
    traffic.wait_after(Instant::now(), 50);
    app.install(&example_bin("hello_v2"));
    assert!(
        exe_link(server.pid).ends_with(" (deleted)"),
        "the running image is the replaced file: {}",
        exe_link(server.pid)
    );

    let mark = server.log.mark();
    let hup_at = Instant::now();
    server.signal(Signal::SIGHUP);
    let line = server
        .log
        .wait_for_log_since(mark, "reload complete: reloaded in", RELOAD_TIMEOUT);
    let done_at = Instant::now();
    traffic.wait_after(done_at, 100);
    let samples = traffic.finish();

    // Every request of the run was answered 200, by one version or the other.
    let retried = assert_all_ok(&samples, &["hello v1\n", "hello v2\n"], &server.log);
    let v1_before = samples
        .iter()
        .filter(|s| s.end < hup_at)
        .all(|s| body_of(s) == "hello v1\n");
    assert!(v1_before, "only v1 before the HUP");
    let after: Vec<&Sample> = samples.iter().filter(|s| s.start > done_at).collect();
    assert!(
        after.len() >= 100 && after.iter().all(|s| body_of(s) == "hello v2\n"),
        "only v2 once the reload is complete"
    );
    eprintln!(
        "{} requests, {retried} retried on a new connection after a kept-alive one was closed; {}",
        samples.len(),
        line
    );

    // Same monitor, now running the new file; nothing of the old generation is left.
    let adopted = server
        .log
        .wait_for_log_since(mark, "new image running", Duration::from_secs(1));
    assert_eq!(
        pids_in(&adopted),
        [server.pid],
        "the new image runs in the monitor's pid"
    );
    assert_eq!(
        exe_link(server.pid),
        app.exe().display().to_string(),
        "the monitor runs the new file"
    );
    let after_tree = wait_settled(&server, 1, 3);
    for p in &before {
        assert!(
            gone(p.pid),
            "{} ({}) of the old generation is gone",
            p.title,
            p.pid
        );
        assert!(after_tree.iter().all(|q| q.pid != p.pid));
    }
    assert!(
        after_tree.iter().all(|p| p.ppid == server.pid),
        "every child is the monitor's: {after_tree:?}"
    );
    assert_eq!(
        title(server.pid).as_deref(),
        Some("tine monitor (gen:1 workers:3/3)")
    );
    assert_eq!(server.get("/").text(), "hello v2\n");
}

#[test]
fn ctl_reload_waits_for_the_outcome_and_a_second_waiter_shares_it() {
    let app = AppDir::new(&example_bin("hello_v1"));
    let server = Launch::program(app.exe())
        .args(["--listen", &listen_arg(), "--workers", "2"])
        .start();
    wait_settled(&server, 0, 2);
    app.install(&example_bin("hello_v2"));
    // Two `ctl reload` at once: one reload, both told its outcome (the second joins the first, or
    // comes after it and runs a reload of its own).
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| server.ctl(&["reload"]));
        let b = s.spawn(|| server.ctl(&["reload"]));
        (a.join().unwrap(), b.join().unwrap())
    });
    for out in [&a, &b] {
        let out = out
            .as_ref()
            .unwrap_or_else(|e| panic!("ctl reload failed: {e}; log:\n{}", server.log.text()));
        let out = out.trim_end();
        assert!(
            out.starts_with("reloaded in ")
                && (out.ends_with(" ms (gen:1)") || out.ends_with(" ms (gen:2)")),
            "{out:?}"
        );
    }
    assert_eq!(server.get("/").text(), "hello v2\n");
    let generation =
        if a.as_deref().unwrap().contains("gen:2") || b.as_deref().unwrap().contains("gen:2") {
            2
        } else {
            1
        };
    wait_settled(&server, generation, 2);
}

// ---------------------------------------------------------------------------------------------
// Refused reloads: the running tree is untouched

/// The pids of the tree, sorted.
/// The monitor we started still runs, as the monitor: a refused reload replaces nothing.
fn assert_same_monitor(server: &mut Server) {
    assert!(
        !server.has_exited(),
        "the monitor (pid {}) is still running",
        server.pid
    );
    let t = title(server.pid).unwrap_or_default();
    assert!(
        t.starts_with("tine monitor (gen:0 "),
        "pid {} is the gen:0 monitor: {t:?}",
        server.pid
    );
}

fn tree_pids(server: &Server) -> Vec<i32> {
    let mut pids: Vec<i32> = server.tree().iter().map(|p| p.pid).collect();
    pids.sort();
    pids
}

#[test]
fn a_new_listen_address_that_is_taken_does_not_take_the_tree_down() {
    let app = AppDir::new(&example_bin("hello_v1"));
    let first = listen_arg();
    let config = app.dir.write(
        "tine.toml",
        format!("workers = 1\nlisten = [\"{first}\"]\n"),
    );
    let mut server = Launch::program(app.exe())
        .no_default_listen()
        .arg("--config")
        .arg(&config)
        .start();
    wait_settled(&server, 0, 1);
    // The new config adds an address another process holds: the preflight cannot see that.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap();
    std::fs::write(
        &config,
        format!("workers = 1\nlisten = [\"{first}\", \"{taken}\"]\n"),
    )
    .unwrap();
    let err = server
        .ctl(&["reload"])
        .expect_err("the reload reports what it could not apply");
    assert!(
        err.contains("not all of the new configuration applies")
            && err.contains(&taken.to_string()),
        "{err}"
    );
    // Still serving on the old address, in the same monitor process (now running generation 1).
    assert_eq!(server.get("/").text(), "hello v1\n");
    assert!(!server.has_exited(), "the monitor is still running");
    let t = title(server.pid).unwrap_or_default();
    assert!(t.starts_with("tine monitor (gen:1 "), "{t:?}");
}

#[test]
fn a_config_that_does_not_validate_is_refused_and_a_good_one_is_applied() {
    let app = AppDir::new(&example_bin("hello_v1"));
    let config = app.dir.write("tine.toml", "workers = 2\n");
    let mut server = Launch::program(app.exe())
        .args(["--listen", &listen_arg()])
        .arg("--config")
        .arg(&config)
        .start();
    wait_settled(&server, 0, 2);
    let pids = tree_pids(&server);

    std::fs::write(&config, "workers = 2\nworkerz = 3\n").unwrap();
    let mark = server.log.mark();
    let err = server
        .ctl(&["reload"])
        .expect_err("a config with an unknown key is refused");
    assert!(
        err.contains("reload failed") && err.contains("workerz"),
        "ctl reload names the key: {err}"
    );
    server.log.wait_for_log_since(
        mark,
        "reload refused; the running service is unchanged",
        Duration::from_secs(5),
    );
    assert!(
        server.log.lines()[mark..]
            .iter()
            .all(|l| !l.contains("re-executing")),
        "nothing was re-executed"
    );
    assert_eq!(tree_pids(&server), pids, "the same processes serve");
    assert_eq!(server.get("/").text(), "hello v1\n");

    // A bad value is refused the same way, with the key and the value.
    std::fs::write(&config, "workers = \"many\"\n").unwrap();
    let err = server.ctl(&["reload"]).expect_err("a bad value is refused");
    assert!(err.contains("workers"), "{err}");
    assert_eq!(tree_pids(&server), pids);
    assert_same_monitor(&mut server);

    // Fixed: the reload applies the new config (three workers) in the same monitor.
    std::fs::write(&config, "workers = 3\n").unwrap();
    let out = server.ctl(&["reload"]).unwrap_or_else(|e| {
        panic!(
            "reload with a good config: {e}; log:\n{}",
            server.log.text()
        )
    });
    assert!(out.starts_with("reloaded in "), "{out}");
    wait_settled(&server, 1, 3);
    assert!(!server
        .log
        .text()
        .contains(&format!("monitor pid={} exited", server.pid)));
}

#[test]
fn a_worker_count_set_at_run_time_survives_a_reload_unless_workers_changes() {
    let dir = TempDir::new();
    let config = dir.write("tine.toml", "workers = 2\n");
    let server = Launch::example("hello_v1")
        .args(["--listen", &listen_arg()])
        .arg("--config")
        .arg(&config)
        .start();
    wait_settled(&server, 0, 2);
    assert_eq!(server.ctl(&["scale", "3"]).map(|_| ()), Ok(()));
    wait_settled(&server, 0, 3);
    // The config still says 2: the reload keeps the 3 set at run time.
    let out = server.ctl(&["reload"]).expect("reload");
    assert!(out.starts_with("reloaded in "), "{out}");
    wait_settled(&server, 1, 3);
    // The config now says 1: that is applied.
    std::fs::write(&config, "workers = 1\n").unwrap();
    let out = server.ctl(&["reload"]).expect("reload");
    assert!(out.starts_with("reloaded in "), "{out}");
    wait_settled(&server, 2, 1);
}

#[test]
fn a_binary_that_exits_at_once_is_refused_and_the_old_tree_keeps_serving() {
    let app = AppDir::new(&example_bin("hello_v1"));
    let mut server = Launch::program(app.exe())
        .args(["--listen", &listen_arg(), "--workers", "2"])
        .start();
    let addr = server.addr();
    wait_settled(&server, 0, 2);
    let pids = tree_pids(&server);
    let traffic = Traffic::start(&addr, "/", 2);

    app.install_text("#!/bin/sh\nexit 1\n", true);
    let mark = server.log.mark();
    server.signal(Signal::SIGHUP);
    let line = server
        .log
        .wait_for_log_since(mark, "reload refused", Duration::from_secs(15));
    assert!(line.contains("exit status: 1"), "{line}");
    let err = server
        .ctl(&["reload"])
        .expect_err("ctl reload reports the failure");
    assert!(
        err.contains("reload failed: new executable refused the configuration (exit status: 1)"),
        "{err}"
    );

    // A file that cannot be executed at all.
    app.install_text("not a program", false);
    let err = server
        .ctl(&["reload"])
        .expect_err("a non-executable file is refused");
    assert!(err.contains("cannot run"), "{err}");

    traffic.wait_after(Instant::now(), 50);
    let samples = traffic.finish();
    assert_all_ok(&samples, &["hello v1\n"], &server.log);
    assert_eq!(tree_pids(&server), pids, "the same processes serve");
    assert_same_monitor(&mut server);
    assert!(
        !server.log.text().contains("re-executing"),
        "never re-executed"
    );

    // A good binary again: the reload goes through.
    app.install(&example_bin("hello_v2"));
    let out = server
        .ctl(&["reload"])
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", server.log.text()));
    assert!(out.contains("(gen:1)"), "{out}");
    assert_eq!(server.get("/").text(), "hello v2\n");
}

#[test]
fn the_monitor_keeps_answering_while_a_slow_preflight_runs() {
    let app = AppDir::new(&example_bin("hello_v1"));
    let mut server = Launch::program(app.exe())
        .args(["--listen", &listen_arg(), "--workers", "1"])
        .start();
    wait_settled(&server, 0, 1);
    // A "new binary" whose check takes 3 s and then fails.
    app.install_text("#!/bin/sh\nsleep 3\nexit 1\n", true);
    let mark = server.log.mark();
    server.signal(Signal::SIGHUP);
    server
        .log
        .wait_for_log_since(mark, "SIGHUP: reloading", Duration::from_secs(5));
    // Meanwhile the control socket answers: the preflight does not block the loop, so the reply
    // comes before the preflight's verdict.
    let status = server
        .ctl(&["status"])
        .expect("status during the preflight");
    assert!(status.contains("worker"), "{status}");
    assert!(
        !server.log.text().contains("reload refused"),
        "status was answered only after the preflight ended"
    );
    let line = server
        .log
        .wait_for_log_since(mark, "reload refused", Duration::from_secs(15));
    assert!(line.contains("exit status: 1"), "{line}");
    assert_eq!(server.get("/").text(), "hello v1\n");
    assert_same_monitor(&mut server);
}

#[test]
fn a_new_mold_whose_preload_fails_leaves_the_old_generation_serving() {
    let app = AppDir::new(&example_bin("watch_demo"));
    let data = app.dir.write("data/table.txt", "alpha\n");
    let mut server = Launch::program(app.exe())
        .args(["--listen", &listen_arg(), "--workers", "2"])
        .env("WATCH_DEMO_PRELOAD_FILE", &data)
        .start();
    let addr = server.addr();
    wait_settled(&server, 0, 2);
    let pids = tree_pids(&server);
    let traffic = Traffic::start(&addr, "/preload", 2);

    // Not UTF-8: `check` (the preflight) only sees a file; `preload` cannot read it as text.
    std::fs::write(&data, b"\xff\xfe not text\n").unwrap();
    let mark = server.log.mark();
    let err = server
        .ctl(&["reload"])
        .expect_err("the reload fails in the new mold");
    assert!(
        err.contains("the new mold failed") && err.contains("the old generation keeps serving"),
        "{err}"
    );
    server
        .log
        .wait_for_log_since(mark, "new image running", Duration::from_secs(1));
    server
        .log
        .wait_for_log_since(mark, "preload failed", Duration::from_secs(1));

    traffic.wait_after(Instant::now(), 50);
    let samples = traffic.finish();
    assert_all_ok(&samples, &["alpha\n"], &server.log);
    assert_eq!(
        tree_pids(&server),
        pids,
        "the adopted old generation still serves, mold included"
    );
    assert_same_monitor(&mut server);

    // Once the data is fixed, the next reload goes through.
    std::fs::write(&data, "beta\n").unwrap();
    let out = server
        .ctl(&["reload"])
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", server.log.text()));
    assert!(out.starts_with("reloaded in "), "{out}");
    assert_eq!(server.get("/preload").text(), "beta\n");
}

// ---------------------------------------------------------------------------------------------
// reload_strategy

#[test]
fn retire_first_reload_retires_each_old_worker_before_starting_its_replacement() {
    let app = AppDir::new(&example_bin("hello_v1"));
    let server = Launch::program(app.exe())
        .args([
            "--listen",
            &listen_arg(),
            "--workers",
            "2",
            "--reload-strategy",
            "retire-first",
        ])
        .start();
    let addr = server.addr();
    wait_settled(&server, 0, 2);
    let traffic = Traffic::start(&addr, "/", 2);
    app.install(&example_bin("hello_v2"));
    let mark = server.log.mark();
    let out = server
        .ctl(&["reload"])
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", server.log.text()));
    assert!(out.starts_with("reloaded in "), "{out}");
    traffic.wait_after(Instant::now(), 50);
    let samples = traffic.finish();
    assert_all_ok(&samples, &["hello v1\n", "hello v2\n"], &server.log);
    // In the log, each old worker is retired before its replacement is ready.
    let lines = server.log.lines()[mark..].to_vec();
    for nr in 0..2 {
        let retired = lines
            .iter()
            .position(|l| l.contains("retiring worker") && l.contains(&format!("nr={nr} ")));
        let ready = lines
            .iter()
            .position(|l| l.contains(&format!("worker[{nr}] (gen:1) ready")));
        assert!(
            matches!((retired, ready), (Some(a), Some(b)) if a < b),
            "worker[{nr}]: retired at {retired:?}, replacement ready at {ready:?}"
        );
    }
    wait_settled(&server, 1, 2);
}

/// What retire-first promises (DESIGN.md: memory stays flat on tight hosts): while an old worker
/// drains, its replacement is not running yet. Today the replacement is started as soon as the old
/// worker is asked to stop (`Monitor::reconcile` does not count a draining worker), so a worker
/// busy with a slow request overlaps with its replacement.
#[test]
fn retire_first_never_runs_more_workers_than_the_target() {
    let server = Launch::tine()
        .args([
            "--listen",
            &listen_arg(),
            "--workers",
            "1",
            "--reload-strategy",
            "retire-first",
            "--debug-routes",
        ])
        .start();
    let addr = server.addr();
    wait_settled(&server, 0, 1);
    // A slow request keeps the old worker draining for two seconds.
    let slow = std::thread::spawn(move || get(&addr, "/sleep/2000").map(|r| r.status));
    let busy = poll_until(Duration::from_secs(5), || {
        server.workers().iter().any(|w| w.2 == "busy").then_some(())
    });
    assert!(busy.is_some(), "the slow request is in flight");
    let reload = std::thread::spawn({
        let socket = server.control_socket.clone();
        move || ctl(&socket, &["reload"])
    });
    let mut most = 0;
    while !reload.is_finished() {
        most = most.max(server.with_title("tine worker[").len());
        std::thread::sleep(Duration::from_millis(5));
    }
    reload.join().unwrap().expect("reload");
    assert_eq!(
        slow.join().unwrap().expect("the slow request is answered"),
        200
    );
    assert!(most <= 1, "at most one worker at any time, saw {most}");
}

// ---------------------------------------------------------------------------------------------
// Development mode

/// A watch_demo tree started from a copy in `app`, with `templates/` (read by `boot`) watched with
/// `--watch-boot` and `data/` (read by `preload`) watched with `--watch`.
fn start_watch_demo(app: &AppDir, workers: usize) -> Server {
    let template = app.dir.write("templates/index.txt", "one\n");
    let data = app.dir.write("data/table.txt", "alpha\n");
    Launch::program(app.exe())
        .args([
            "--listen",
            &listen_arg(),
            "--workers",
            &workers.to_string(),
            "--debug-headers",
        ])
        .arg("--watch-boot")
        .arg(app.dir.join("templates"))
        .arg("--watch")
        .arg(app.dir.join("data"))
        .env("WATCH_DEMO_BOOT_FILE", &template)
        .env("WATCH_DEMO_PRELOAD_FILE", &data)
        .start()
}

#[test]
fn watch_boot_change_rolls_new_workers_from_the_current_mold() {
    let app = AppDir::new(&example_bin("watch_demo"));
    let server = start_watch_demo(&app, 4);
    let addr = server.addr();
    let before = wait_settled(&server, 0, 4);
    let mold = before
        .iter()
        .find(|p| p.title.starts_with("tine mold"))
        .unwrap()
        .pid;
    assert_eq!(server.get("/").text(), "one\n");
    let traffic = Traffic::start(&addr, "/", 4);
    traffic.wait_after(Instant::now(), 20);

    // Written in place (IN_CLOSE_WRITE), as most editors without atomic save do.
    let mark = server.log.mark();
    std::fs::write(app.dir.join("templates/index.txt"), "two\n").unwrap();
    let line = server
        .log
        .wait_for_log_since(mark, "boot reload complete", RELOAD_TIMEOUT);
    let done_at = Instant::now();
    assert!(
        line.contains("changed=") && line.contains("templates/index.txt"),
        "the log says what changed: {line}"
    );
    let ms = millis_in(&line);
    server.log.wait_for_log_since(
        mark,
        "watch: new workers from the current mold",
        Duration::from_secs(1),
    );
    traffic.wait_after(done_at, 50);
    let samples = traffic.finish();
    assert_all_ok(&samples, &["one\n", "two\n"], &server.log);
    assert!(
        samples
            .iter()
            .filter(|s| s.start > done_at)
            .all(|s| body_of(s) == "two\n"),
        "only the new content after the reload"
    );
    eprintln!("boot reload of 4 workers: {ms} ms (debug build, under load)");

    // No preload, no re-exec: the same mold, the preloaded data unchanged, new workers.
    let after = wait_settled(&server, 0, 4);
    assert!(
        after.iter().any(|p| p.pid == mold),
        "the mold is the same process"
    );
    assert!(
        before.iter().filter(|p| p.pid != mold).all(|p| gone(p.pid)),
        "every old worker is gone"
    );
    assert!(!server.log.lines()[mark..]
        .iter()
        .any(|l| l.contains("re-executing")));
    assert_eq!(server.get("/preload").text(), "alpha\n");

    // Editor noise does nothing.
    let mark = server.log.mark();
    std::fs::write(app.dir.join("templates/.index.txt.swp"), "x").unwrap();
    std::fs::write(app.dir.join("templates/index.txt~"), "x").unwrap();
    assert!(
        server
            .log
            .wait_for_line_since(mark, Duration::from_millis(500), |l| l.contains("watch:"))
            .is_none(),
        "swap and backup files are ignored"
    );
}

#[test]
fn watch_full_reload_on_a_data_change_and_on_a_rebuilt_binary() {
    let app = AppDir::new(&example_bin("watch_demo"));
    let server = start_watch_demo(&app, 2);
    let addr = server.addr();
    let before = wait_settled(&server, 0, 2);
    assert_eq!(server.get("/preload").text(), "alpha\n");
    let traffic = Traffic::start(&addr, "/preload", 2);

    // Saved atomically (rename over the file): a full reload, a new preload.
    let mark = server.log.mark();
    write_atomically(&app.dir.join("data/table.txt"), "beta\n");
    let line = server
        .log
        .wait_for_log_since(mark, "reload complete: reloaded in", RELOAD_TIMEOUT);
    let done_at = Instant::now();
    let ms = millis_in(&line);
    let why = server
        .log
        .wait_for_log_since(mark, "watch: full reload", Duration::from_secs(1));
    assert!(
        why.contains("data/table.txt"),
        "the log says what changed: {why}"
    );
    traffic.wait_after(done_at, 50);
    let samples = traffic.finish();
    assert_all_ok(&samples, &["alpha\n", "beta\n"], &server.log);
    assert!(samples
        .iter()
        .filter(|s| s.start > done_at)
        .all(|s| body_of(s) == "beta\n"));
    eprintln!("full reload on a data change: {ms} ms (debug build, under load)");
    let after = wait_settled(&server, 1, 2);
    assert!(before.iter().all(|p| gone(p.pid)) && after.iter().all(|p| p.ppid == server.pid));

    // The executable itself is watched: a rebuilt binary is a full reload into the new code.
    let mark = server.log.mark();
    app.install(&example_bin("hello_v2"));
    server
        .log
        .wait_for_log_since(mark, "reload complete: reloaded in", RELOAD_TIMEOUT);
    assert_eq!(server.get("/").text(), "hello v2\n");
    assert_eq!(exe_link(server.pid), app.exe().display().to_string());
    wait_settled(&server, 2, 2);
}

// ---------------------------------------------------------------------------------------------
// Logs and pid file

/// Waits for a line containing `pattern` in file `path`.
fn wait_in_file(path: &Path, pattern: &str, timeout: Duration) -> String {
    let found = poll_until(timeout, || {
        std::fs::read_to_string(path)
            .ok()?
            .lines()
            .find(|l| l.contains(pattern))
            .map(str::to_string)
    });
    found.unwrap_or_else(|| {
        panic!(
            "no {pattern:?} in {} within {timeout:?}:\n{}",
            path.display(),
            std::fs::read_to_string(path).unwrap_or_default()
        )
    })
}

#[test]
fn usr1_reopens_the_log_file_after_rotation_in_the_monitor_mold_and_workers() {
    let dir = TempDir::new();
    let log = dir.join("tine.log");
    let port = listen_arg();
    let server = Launch::example("hello_v1")
        // Every idle worker races for each connection, so that every worker answers in turn.
        .args(["--listen", &port, "--workers", "2", "--debug-headers"])
        .args(["--exclusive-accept", "false"])
        .arg("--log-file")
        .arg(&log)
        .spawn();
    wait_in_file(&log, "tine ready", READY_TIMEOUT);
    let addr: Addr = port.parse().unwrap();
    assert_eq!(get(&addr, "/log/before").unwrap().status, 200);
    wait_in_file(&log, "app says word=before", Duration::from_secs(5));

    // Rotate: rename, then USR1.
    let rotated = dir.join("tine.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    server.signal(Signal::SIGUSR1);
    wait_in_file(&log, "log file reopened", Duration::from_secs(5));

    // Every worker writes to the new file: ask until both have answered with a line there.
    let workers = server.workers().iter().map(|w| w.1).collect::<Vec<_>>();
    for (i, &pid) in workers.iter().enumerate() {
        let word = format!("after{i}");
        let landed = poll_until(Duration::from_secs(10), || {
            get(&addr, &format!("/log/{word}")).ok()?;
            let text = std::fs::read_to_string(&log).ok()?;
            text.lines()
                .any(|l| l.contains(&format!("pid={pid}:")) && l.contains("app says"))
                .then_some(())
        });
        assert!(
            landed.is_some(),
            "worker {pid} never wrote to the new file:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    // A worker forked after the rotation (from the mold, which reopened too) writes there as well.
    assert_eq!(server.ctl(&["scale", "3"]).map(|_| ()), Ok(()));
    let line = wait_in_file(&log, "worker[2] (gen:0) ready", Duration::from_secs(10));
    let new_pid = *pids_in(&line).last().unwrap();
    let landed = poll_until(Duration::from_secs(10), || {
        let r = get(&addr, "/log/fresh").ok()?;
        (r.worker() == Some(new_pid)).then_some(())
    });
    assert!(landed.is_some(), "worker {new_pid} did not answer");
    wait_in_file(
        &log,
        &format!("pid={new_pid}: app says word=fresh"),
        Duration::from_secs(5),
    );
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(
        old.contains("app says word=before") && !old.contains("word=fresh"),
        "the rotated file keeps the old lines only"
    );

    // The same through the control socket, after a second rotation.
    let rotated2 = dir.join("tine.log.2");
    std::fs::rename(&log, &rotated2).unwrap();
    let out = server.ctl(&["reopen-logs"]).expect("ctl reopen-logs");
    assert!(out.contains("reopened"), "{out}");
    wait_in_file(&log, "log file reopened", Duration::from_secs(5));
    let landed = poll_until(Duration::from_secs(10), || {
        get(&addr, "/log/third").ok()?;
        std::fs::read_to_string(&log)
            .ok()?
            .contains("app says word=third")
            .then_some(())
    });
    assert!(
        landed.is_some(),
        "no worker wrote to the file reopened by ctl"
    );
}

#[test]
fn pid_file_survives_a_reload_and_is_removed_on_exit() {
    let app = AppDir::new(&example_bin("hello_v1"));
    let pid_file = app.dir.join("run/tine.pid");
    std::fs::create_dir_all(pid_file.parent().unwrap()).unwrap();
    let mut server = Launch::program(app.exe())
        .args(["--listen", &listen_arg(), "--workers", "1"])
        .arg("--pid-file")
        .arg(&pid_file)
        .start();
    let read = || std::fs::read_to_string(&pid_file).unwrap_or_default();
    assert_eq!(read(), format!("{}\n", server.pid));
    app.install(&example_bin("hello_v2"));
    server
        .ctl(&["reload"])
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", server.log.text()));
    assert_eq!(
        read(),
        format!("{}\n", server.pid),
        "same pid after the reload"
    );
    let leftovers: Vec<_> = std::fs::read_dir(pid_file.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        leftovers,
        [std::ffi::OsString::from("tine.pid")],
        "no temporary file left"
    );
    server.signal(Signal::SIGTERM);
    assert_eq!(
        server
            .wait_exit(Duration::from_secs(15))
            .and_then(|s| s.code()),
        Some(0)
    );
    assert!(!pid_file.exists(), "removed on exit");
}

// ---------------------------------------------------------------------------------------------
// Behind nginx (docs/DEPLOYMENT.md)

/// The nginx block of docs/DEPLOYMENT.md (the fenced block that starts with
/// `# /etc/nginx/conf.d/tine.conf`), pointed at `upstream` and listening on `listen`.
fn nginx_block_from_the_doc(upstream: &str, listen: &str) -> String {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/DEPLOYMENT.md"))
            .expect("docs/DEPLOYMENT.md");
    let start = doc
        .find("# /etc/nginx/conf.d/tine.conf")
        .expect("the nginx block in docs/DEPLOYMENT.md");
    let block = &doc[start..start + doc[start..].find("```").expect("end of the nginx block")];
    assert!(
        block.contains("server 127.0.0.1:8080") && block.contains("listen 80;"),
        "{block}"
    );
    block
        .replace("server 127.0.0.1:8080", &format!("server {upstream}"))
        .replace("listen 80;", &format!("listen {listen};"))
}

#[test]
fn behind_nginx_with_upstream_keepalive_a_reload_fails_no_request() {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("nginx is installed");
    let app = AppDir::new(&example_bin("hello_v1"));
    let upstream = listen_arg();
    let server = Launch::program(app.exe())
        .args(["--listen", &upstream, "--workers", "2"])
        .start();
    wait_settled(&server, 0, 2);

    let front = listen_arg();
    let dir = TempDir::new();
    let d = dir.path().display();
    let conf = dir.write(
        "nginx.conf",
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 512; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n{}\n}}\n",
            nginx_block_from_the_doc(&upstream, &front)
        ),
    );
    let test = std::process::Command::new(&nginx)
        .arg("-t")
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir.path())
        .output()
        .expect("nginx -t");
    assert!(
        test.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&test.stderr)
    );
    let proxy = Launch::program(nginx)
        .subcommand(None)
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir.path())
        .spawn();
    let front: Addr = front.parse().unwrap();
    let up = poll_until(Duration::from_secs(10), || {
        get(&front, "/").ok().filter(|r| r.status == 200)
    });
    assert!(up.is_some(), "nginx answers: {}", proxy.log.text());

    let traffic = Traffic::start(&front, "/", 4);
    traffic.wait_after(Instant::now(), 50);
    app.install(&example_bin("hello_v2"));
    let mark = server.log.mark();
    server.signal(Signal::SIGHUP);
    server
        .log
        .wait_for_log_since(mark, "reload complete: reloaded in", RELOAD_TIMEOUT);
    let done_at = Instant::now();
    traffic.wait_after(done_at, 100);
    let samples = traffic.finish();
    let errors = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
    let bad: Vec<&Sample> = samples
        .iter()
        .filter(|s| !matches!(&s.result, Ok((200, b)) if b == "hello v1\n" || b == "hello v2\n"))
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {} requests through nginx failed, e.g. {:?}; nginx error log:\n{errors}",
        bad.len(),
        samples.len(),
        &bad[..bad.len().min(5)]
    );
    assert!(samples
        .iter()
        .filter(|s| s.start > done_at)
        .all(|s| body_of(s) == "hello v2\n"));
    // What nginx saw of the drain (kept-alive upstream connections closed under it, retried).
    let closed = errors
        .lines()
        .filter(|l| l.contains("upstream prematurely closed") || l.contains("reset by peer"))
        .count();
    eprintln!(
        "{} requests through nginx; {closed} upstream connections closed under nginx, retried",
        samples.len()
    );
    drop(proxy);
}

#[test]
fn an_inotify_queue_overflow_is_a_full_reload() {
    let app = AppDir::new(&example_bin("watch_demo"));
    let server = start_watch_demo(&app, 1);
    wait_settled(&server, 0, 1);
    let max: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Stopped, the monitor reads nothing: the queue fills up (a create and a close-write per file)
    // and overflows. The workers keep serving meanwhile.
    server.signal(Signal::SIGSTOP);
    let mark = server.log.mark();
    for i in 0..max {
        std::fs::write(app.dir.join(format!("templates/many-{i}.txt")), "").unwrap();
    }
    assert_eq!(
        server.get("/").text(),
        "one\n",
        "served while the monitor is stopped"
    );
    server.signal(Signal::SIGCONT);
    // Only boot-only files changed, but events were lost: what changed is unknown, so everything
    // is reloaded.
    let line = server
        .log
        .wait_for_log_since(mark, "watch: full reload", RELOAD_TIMEOUT);
    assert!(line.contains("(inotify queue overflow)"), "{line}");
    server
        .log
        .wait_for_log_since(mark, "reload complete: reloaded in", RELOAD_TIMEOUT);
    wait_settled(&server, 1, 1);
}
