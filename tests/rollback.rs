//! A rollout that fails rolls back, never down (issue 10): a reload or a refork whose new workers
//! cannot start is abandoned, the old generation goes on serving at full strength, the failure
//! shows in `ctl status`, the metrics, the log and the `ctl` reply; a fork failing with `EAGAIN`
//! (the process limit of the workers' user reached) is retried, never counted, and leaves the
//! serving tree intact; and replacements that keep failing never end a tree that still serves
//! (`max_consecutive_spawn_errors` ends only a start-up that never works).
//!
//! Each test keeps a load of `GET`s on kept-alive connections (never retried) running through the
//! whole failure and checks that every request was answered, by the old workers.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::metrics::sample_value;
use common::strict::StrictLoad;
use common::*;
use nix::sys::signal::Signal;

/// How long the old generation must keep serving after a failed rollout (issue 10: 60 s).
const SERVE_AFTER_FAILURE: Duration = Duration::from_secs(60);
/// Longest a rollout (or its failure) may take here (debug builds, busy shared cores).
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(60);

/// `GET`s on kept-alive connections from a few threads, paced, until stopped (bounded by count
/// and time): every request either gets a response or is a failure, never retried; a connection
/// is replaced only after a response that said `Connection: close`.
struct Probe {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Debug, Default, Clone)]
struct Tally {
    /// Responses by (status, body).
    answers: BTreeMap<(u16, String), u64>,
    /// Responses by the worker pid that sent them.
    by_worker: BTreeMap<i32, u64>,
    /// Requests without a response, with why.
    failures: Vec<String>,
}

impl Tally {
    fn answered(&self) -> u64 {
        self.answers.values().sum()
    }
}

impl Probe {
    fn start(addr: Addr, path: &'static str, threads: usize, max: Duration) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let until = Instant::now() + max;
        let threads = (0..threads)
            .map(|_| {
                let (stop, tally, addr) = (stop.clone(), tally.clone(), addr.clone());
                std::thread::spawn(move || {
                    let mut conn: Option<Client> = None;
                    for _ in 0..1_000_000 {
                        if stop.load(Ordering::Relaxed) || Instant::now() >= until {
                            break;
                        }
                        let result = match conn.take() {
                            Some(c) => Ok(c),
                            None => Client::connect(&addr),
                        }
                        .and_then(|mut c| {
                            let r = c.get(path)?;
                            if !r.closes() {
                                conn = Some(c);
                            }
                            Ok(r)
                        });
                        let mut t = tally.lock().unwrap();
                        match result {
                            Ok(r) => {
                                *t.answers.entry((r.status, r.text())).or_default() += 1;
                                *t.by_worker.entry(r.worker().unwrap_or(0)).or_default() += 1;
                            }
                            Err(e) => t.failures.push(format!("GET {path}: {e}")),
                        }
                        drop(t);
                        // A steady trickle, not a flood: the point is coverage over time.
                        std::thread::sleep(Duration::from_millis(5));
                    }
                })
            })
            .collect();
        Probe {
            stop,
            tally,
            threads,
        }
    }

    fn snapshot(&self) -> Tally {
        self.tally.lock().unwrap().clone()
    }

    /// Waits until `n` more requests have been answered.
    fn wait_more(&self, n: u64, timeout: Duration) {
        let from = self.snapshot().answered();
        let ok = poll_until(timeout, || {
            (self.snapshot().answered() >= from + n).then_some(())
        });
        assert!(ok.is_some(), "load stalled: {:?}", self.snapshot());
    }

    fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("probe thread");
        }
        let tally = self.tally.lock().unwrap().clone();
        tally
    }
}

/// Keeps `probe` running for `period`, checking every second that the monitor is alive and
/// that the tree is still `expected` (the old generation, untouched).
fn serve_for(server: &mut Server, probe: &Probe, period: Duration, expected: &[Proc]) {
    let until = Instant::now() + period;
    while Instant::now() < until {
        assert!(
            !server.has_exited(),
            "the monitor exited; log:\n{}",
            server.log.text()
        );
        assert_eq!(
            titled(server),
            titled_of(expected),
            "the old generation must serve untouched"
        );
        let failures = probe.snapshot().failures;
        assert!(failures.is_empty(), "{failures:?}");
        // A round is paced by the load itself: a hundred more answers (a fraction of a second).
        probe.wait_more(100, Duration::from_secs(10));
    }
}

/// The tree as (pid, title), sorted.
fn titled(server: &Server) -> Vec<(i32, String)> {
    titled_of(&server.tree())
}

fn titled_of(procs: &[Proc]) -> Vec<(i32, String)> {
    let mut v: Vec<_> = procs.iter().map(|p| (p.pid, p.title.clone())).collect();
    v.sort();
    v
}

/// Waits until the tree is exactly a mold, `workers` workers and the spares, all of one generation
/// > `above`; returns that generation.
fn wait_new_generation(server: &Server, above: u32, workers: usize) -> u32 {
    let spares = configured_spares(server);
    let mut last = Vec::new();
    let found = poll_until(ROLLOUT_TIMEOUT, || {
        last = titled(server);
        let generation = last.iter().find_map(|(_, t)| {
            t.strip_prefix("tine mold (gen:")?
                .strip_suffix(')')?
                .parse::<u32>()
                .ok()
        })?;
        let mut want: Vec<String> = (0..workers)
            .map(|nr| format!("tine worker[{nr}] (gen:{generation})"))
            .collect();
        want.push(format!("tine mold (gen:{generation})"));
        want.extend(spare_titles(spares, generation));
        want.sort();
        let mut have: Vec<String> = last.iter().map(|(_, t)| t.clone()).collect();
        have.sort();
        (generation > above && have == want).then_some(generation)
    });
    found.unwrap_or_else(|| {
        panic!(
            "no settled generation above {above}: {last:?}; log:\n{}",
            server.log.text()
        )
    })
}

/// `examples/watch_demo.rs` with two workers on a free port, its boot reading `boot`, and `extra`
/// flags.
fn watch_demo(boot: &Path, extra: &[&str]) -> Server {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["--listen", listen.as_str(), "--workers", "2"];
    args.extend_from_slice(extra);
    Launch::example("watch_demo")
        .args(args)
        .env("WATCH_DEMO_BOOT_FILE", boot)
        .start()
}

/// The hot spares the tree keeps (`spare_workers`, 1 by default).
fn configured_spares(server: &Server) -> usize {
    server.status()["spare_workers"].as_u64().unwrap_or(0) as usize
}

/// The titles of `n` spares of `generation` (a settled tree's spares come from its mold).
fn spare_titles(n: usize, generation: u32) -> Vec<String> {
    vec![format!("tine spare (gen:{generation})"); n]
}

/// Waits until the tree is the mold, `workers` workers and the spares of generation 0; returns
/// it.
fn wait_gen0(server: &Server, workers: usize) -> Vec<Proc> {
    let mut want: Vec<String> = (0..workers)
        .map(|nr| format!("tine worker[{nr}] (gen:0)"))
        .collect();
    want.push("tine mold (gen:0)".into());
    want.extend(spare_titles(configured_spares(server), 0));
    want.sort();
    let mut last = Vec::new();
    let ok = poll_until(READY_TIMEOUT, || {
        last = titled(server).into_iter().map(|(_, t)| t).collect();
        last.sort();
        (last == want).then_some(())
    });
    assert!(ok.is_some(), "tree {last:?}; log:\n{}", server.log.text());
    server.tree()
}

/// Lets the new generation answer a few requests, stops the load and checks that every request
/// was answered with 200 and that the monitor still runs.
fn finish_clean(probe: Probe, server: &mut Server) -> Tally {
    probe.wait_more(20, Duration::from_secs(10));
    let tally = probe.finish();
    assert!(tally.failures.is_empty(), "{:?}", tally.failures);
    assert!(
        tally.answers.keys().all(|(s, _)| *s == 200),
        "{:?}",
        tally.answers
    );
    assert!(!server.has_exited(), "{}", server.log.text());
    tally
}

/// Runs `ctl COMMAND`, which must fail with an error naming each of `needles`, and waits for the
/// monitor's log to say the rollout was abandoned.
fn expect_rolled_back(server: &Server, command: &str, needles: &[&str]) {
    let mark = server.log.mark();
    let err = server
        .ctl(&[command])
        .expect_err("the new generation cannot start: the rollout fails");
    for needle in needles {
        assert!(err.contains(needle), "{needle:?} not in {err:?}");
    }
    server
        .log
        .wait_for_log_since(mark, "rollout abandoned", Duration::from_secs(5));
}

/// Asserts that `text` (a `ctl` error) names each of `needles`, with the log if not.
fn assert_names(text: &str, needles: &[&str], server: &Server) {
    for needle in needles {
        assert!(
            text.contains(needle),
            "{needle:?} not in {text:?}; log:\n{}",
            server.log.text()
        );
    }
}

/// Writes `contents` to `path` atomically (temporary file, then rename).
fn write_atomically(path: &Path, contents: impl AsRef<[u8]>) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, contents).expect("write the temporary file");
    std::fs::rename(&tmp, path).expect("rename over the file");
}

// ---------------------------------------------------------------------------------------------
// (a) reload

/// A reload into a deploy whose `boot` fails in every new worker (the app's boot file is no
/// longer text; `check` only sees that it exists): `ctl reload` answers with the error, the old
/// workers answer every request for 60 s, the monitor stays, `ctl status` and the metrics show the
/// failure; once the file is fixed the next reload goes through.
#[test]
fn a_reload_whose_workers_cannot_boot_rolls_back_and_the_old_workers_keep_serving() {
    let dir = TempDir::new();
    let boot = dir.write("boot.txt", "v1\n");
    let mut server = watch_demo(
        &boot,
        &["--debug-headers", "--metrics-listen", "127.0.0.1:0"],
    );
    let gen0 = wait_gen0(&server, 2);
    let probe = Probe::start(server.addr(), "/", 3, Duration::from_secs(150));
    probe.wait_more(20, Duration::from_secs(10));

    write_atomically(&boot, b"\xff\xfe not text\n");
    expect_rolled_back(
        &server,
        "reload",
        &[
            "reload to gen:1 failed",
            "boot failed",
            "rolled back: the old generation keeps serving (gen:0)",
        ],
    );
    // The new mold goes; what is left is exactly the old generation, same processes.
    let settled = poll_until(Duration::from_secs(10), || {
        (titled(&server) == titled_of(&gen0)).then_some(())
    });
    assert!(
        settled.is_some(),
        "tree {:?}, expected {:?}",
        titled(&server),
        titled_of(&gen0)
    );

    let status = server.ctl(&["status"]).expect("ctl status");
    let line = status
        .lines()
        .find(|l| l.starts_with("last failed rollout: reload to gen:1 failed"))
        .unwrap_or_else(|| panic!("no failure line in:\n{status}"));
    assert!(line.contains("boot failed"), "{line}");
    let json = server.status();
    assert_eq!(json["last_failed_rollout"]["generation"], 1, "{json}");
    assert_eq!(json["rollouts_failed"], 1, "{json}");
    assert_eq!(
        sample_value(&server, "tine_rollouts_failed_total{cause=\"reload\"}"),
        Some(1.0)
    );
    assert_eq!(sample_value(&server, "tine_last_rollout_failed"), Some(1.0));

    serve_for(&mut server, &probe, SERVE_AFTER_FAILURE, &gen0);

    // The deploy is fixed: the next reload goes through.
    write_atomically(&boot, "v2\n");
    let out = server
        .ctl(&["reload"])
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", server.log.text()));
    assert!(out.starts_with("reloaded in "), "{out}");
    wait_new_generation(&server, 0, 2);
    let tally = finish_clean(probe, &mut server);
    let bodies: Vec<&String> = tally.answers.keys().map(|(_, b)| b).collect();
    assert_eq!(bodies, ["v1\n", "v2\n"], "{:?}", tally.answers);
    assert_eq!(sample_value(&server, "tine_last_rollout_failed"), Some(0.0));
}

// ---------------------------------------------------------------------------------------------
// (b) refork

/// Launches the reference app with `workers` workers, its debug routes and metrics, and the debug knob
/// `knob` set to `value` (for `TINE_DEBUG_*_BREAKS_BOOT`, a file that does not exist yet: the
/// workers of a mold made while it exists fail in `boot`, all of them, or all but the number the
/// file holds).
fn debug_hello(workers: usize, knob: &str, value: impl AsRef<std::ffi::OsStr>) -> Launch {
    Launch::debug_hello(workers)
        .args(["--metrics-listen", "127.0.0.1:0", "--spawn-timeout", "10"])
        .env(knob, value)
}

/// A refork whose promoted mold cannot make a worker that boots (the app's state after
/// promotion is broken): `ctl refork` answers with the error, the previous mold is still there,
/// the old workers serve every request for 60 s; once the cause is gone, a refork goes through.
#[test]
fn a_refork_whose_new_workers_cannot_boot_rolls_back_to_the_previous_mold() {
    let dir = TempDir::new();
    let breaker = dir.join("break-promotion");
    let mut server = debug_hello(2, "TINE_DEBUG_PROMOTION_BREAKS_BOOT", &breaker).start();
    wait_gen0(&server, 2);
    let probe = Probe::start(server.addr(), "/", 3, Duration::from_secs(150));
    probe.wait_more(20, Duration::from_secs(10));
    let mold0 = server.with_title("tine mold (gen:0)");

    std::fs::write(&breaker, "").unwrap();
    expect_rolled_back(
        &server,
        "refork",
        &[
            "refork to gen:1 failed",
            "boot failed: debug: promoted while",
            "rolled back: the old generation keeps serving (gen:0)",
        ],
    );
    // The promoted worker was replaced before it left, and the gen:0 mold never went away.
    let gen0 = wait_gen0(&server, 2);
    assert_eq!(
        server.with_title("tine mold (gen:0)"),
        mold0,
        "the previous mold stays"
    );
    let status = server.ctl(&["status"]).expect("ctl status");
    assert!(
        status.lines().any(
            |l| l.starts_with("last failed rollout: refork to gen:1 failed")
                && l.contains("boot failed")
        ),
        "{status}"
    );
    assert_eq!(
        sample_value(&server, "tine_rollouts_failed_total{cause=\"refork\"}"),
        Some(1.0)
    );

    serve_for(&mut server, &probe, SERVE_AFTER_FAILURE, &gen0);

    std::fs::remove_file(&breaker).unwrap();
    let out = server
        .ctl(&["refork"])
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", server.log.text()));
    assert!(out.contains("serving in"), "{out}");
    wait_new_generation(&server, 0, 2);
    finish_clean(probe, &mut server);
}

// ---------------------------------------------------------------------------------------------
// A rollout that fails half-way: its first new worker serves, the next ones cannot boot

/// Workers of the half-way tests: enough that "full strength" means more than the one worker
/// the broken generation managed to start.
const HALF_WAY_WORKERS: usize = 3;
/// Connections of the strict load across a half-way failure and the fixed rollout after it.
const STRICT_CONNECTIONS: usize = 16;

/// Waits until the strict load has `n` more answers than now.
fn wait_flowing(load: &StrictLoad, n: u64, server: &Server) {
    let from = load.answered();
    let ok = poll_until(ROLLOUT_TIMEOUT, || {
        (load.answered() >= from + n).then_some(())
    });
    assert!(
        ok.is_some(),
        "the strict load stalled at {}; log:\n{}",
        load.answered(),
        server.log.text()
    );
}

/// The half-way failure of a rollout by `command` (`refork`, `reload`): the breaker file says
/// that only the first worker of the new mold boots. The first new worker gets ready and serves,
/// the second fails `rollout_max_failures` times, and the rollout is abandoned anyway:
/// `ctl COMMAND` answers the error, the new generation's serving worker is replaced from the
/// previous mold and drains, and the tree is the previous mold (the same process) with every
/// worker of the old generation, at full count. A strict client (POSTs on kept-alive connections,
/// never retried) loses nothing throughout. Then, with the breaker gone, the same command rolls
/// every worker over as before.
fn a_rollout_that_fails_half_way_rolls_back(knob: &str, command: &str) {
    let dir = TempDir::new();
    let breaker = dir.join("break-boot");
    let mut server = debug_hello(HALF_WAY_WORKERS, knob, &breaker).start();
    wait_gen0(&server, HALF_WAY_WORKERS);
    let mold0 = server.with_title("tine mold (gen:0)");
    assert_eq!(mold0.len(), 1, "{mold0:?}");
    let load = StrictLoad::start(
        &server.addr(),
        STRICT_CONNECTIONS,
        "/",
        Duration::from_secs(150),
    );
    wait_flowing(&load, 300, &server);

    std::fs::write(&breaker, "1\n").unwrap();
    let mark = server.log.mark();
    expect_rolled_back(
        &server,
        command,
        &[
            &format!("{command} to gen:1 failed"),
            "only the first 1 worker(s) of this mold boot",
            "rolled back: the old generation keeps serving (gen:0)",
        ],
    );
    // It failed half-way: a worker of the new generation had been ready and serving.
    let lines = server.log.lines()[mark..].to_vec();
    assert!(
        lines.iter().any(|l| l.contains("(gen:1) ready")),
        "no worker of gen:1 got ready before the rollout failed; log:\n{}",
        server.log.text()
    );
    // Back to the old generation at full count, from the same mold; the gen:1 worker drained.
    let gen0 = wait_gen0(&server, HALF_WAY_WORKERS);
    assert_eq!(
        server.with_title("tine mold (gen:0)"),
        mold0,
        "the previous mold stays"
    );
    assert_eq!(
        sample_value(
            &server,
            &format!("tine_rollouts_failed_total{{cause=\"{command}\"}}")
        ),
        Some(1.0)
    );
    assert_eq!(sample_value(&server, "tine_last_rollout_failed"), Some(1.0));
    let status = server.ctl(&["status"]).expect("ctl status");
    assert!(
        status.lines().any(|l| l
            .starts_with(&format!("last failed rollout: {command} to gen:1 failed"))
            && l.contains("replaced from the previous mold")),
        "{status}"
    );
    // The old generation serves on, untouched, and nothing sits half-done.
    wait_flowing(&load, 300, &server);
    assert!(!server.has_exited(), "{}", server.log.text());
    assert_eq!(
        titled(&server),
        titled_of(&gen0),
        "the old generation serves untouched"
    );

    // The deploy is fixed: a rollout that succeeds rolls every worker over, as before.
    std::fs::remove_file(&breaker).unwrap();
    let out = server
        .ctl(&[command])
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", server.log.text()));
    let done = if command == "reload" {
        "reloaded in "
    } else {
        "serving in"
    };
    assert!(out.contains(done), "{out}");
    let generation = wait_new_generation(&server, 0, HALF_WAY_WORKERS);
    assert!(
        server.with_title("tine mold (gen:0)").is_empty(),
        "the previous mold retires once the rollout is complete"
    );
    wait_flowing(&load, 300, &server);
    let report = load.stop();
    eprintln!(
        "{command} failing half-way, rolled back, then fixed and rolled out ({STRICT_CONNECTIONS} strict connections): {}",
        report.summary()
    );
    assert!(
        report.lost.is_empty() && report.status(200) == report.answered,
        "{}; log:\n{}",
        report.summary(),
        server.log.text()
    );
    assert_eq!(sample_value(&server, "tine_last_rollout_failed"), Some(0.0));
    assert!(generation >= 1);
}

/// A refork whose promoted mold boots its first worker and then no other: rolled back.
#[test]
fn a_refork_whose_second_new_worker_cannot_boot_rolls_back_completely() {
    a_rollout_that_fails_half_way_rolls_back("TINE_DEBUG_PROMOTION_BREAKS_BOOT", "refork");
}

/// A reload (re-exec in place) whose new mold boots its first worker and then no other: rolled
/// back.
#[test]
fn a_reload_whose_second_new_worker_cannot_boot_rolls_back_completely() {
    a_rollout_that_fails_half_way_rolls_back("TINE_DEBUG_PRELOAD_BREAKS_BOOT", "reload");
}

/// A refork whose new workers boot and then die (SIGKILLed here the moment each reports ready, as
/// a deploy that crashes under traffic ends them): each death of a ready gen:1 worker during the
/// rollout counts, and after `rollout_max_failures` (3) the rollout is abandoned though gen:1
/// workers were serving. `ctl refork` answers the error, and the tree is the previous mold (the
/// same process) with every worker of gen:0 again.
#[test]
fn a_refork_whose_new_workers_die_once_ready_rolls_back() {
    // Each worker takes 300 ms to boot: the rollout of 4 lasts over a second, and a killed gen:1
    // worker is not back before the next one is ready.
    let mut server = debug_hello(4, "TINE_DEBUG_BOOT_SLEEP_MS", "300").start();
    wait_gen0(&server, 4);
    let mold0 = server.with_title("tine mold (gen:0)");
    let mark = server.log.mark();
    let socket = server.control_socket.clone();
    let refork = std::thread::spawn(move || ctl(&socket, &["refork"]));
    let mut killed: Vec<i32> = Vec::new();
    while killed.len() < 3 {
        let line = server.log.wait_for_line_since(mark, ROLLOUT_TIMEOUT, |l| {
            l.contains("(gen:1) ready pid=")
                && l.contains("worker[")
                && !killed
                    .iter()
                    .any(|p| l.contains(&format!("ready pid={p} ")))
        });
        let line = line.unwrap_or_else(|| {
            panic!(
                "no more gen:1 workers got ready after killing {killed:?}; log:\n{}",
                server.log.text()
            )
        });
        let pid: i32 = line
            .split("ready pid=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {line:?}"));
        server.remember(pid);
        server.signal_process(pid, Signal::SIGKILL);
        killed.push(pid);
    }
    let err = refork
        .join()
        .expect("ctl thread")
        .expect_err("the new workers keep dying: the refork fails");
    for needle in [
        "refork to gen:1 failed: 3 failures of the new generation",
        "died after it was ready (signal SIGKILL)",
        "rolled back: the old generation keeps serving (gen:0)",
    ] {
        assert!(err.contains(needle), "{needle:?} not in {err:?}");
    }
    wait_gen0(&server, 4);
    assert_eq!(
        server.with_title("tine mold (gen:0)"),
        mold0,
        "the previous mold stays"
    );
    for _ in 0..20 {
        let r = server.get("/");
        assert_eq!((r.status, r.text()), (200, "hello\n".to_string()));
    }
    assert!(!server.has_exited(), "{}", server.log.text());
}

/// A refork on trial that cannot complete: three workers, a promoted mold that boots only its
/// first worker, `rollout_max_failures` = `limit`. Started with `ctl refork`, whose reply
/// [`FailingRefork::outcome`] waits for.
struct FailingRefork {
    server: Server,
    /// The gen:0 mold.
    mold0: Vec<Proc>,
    /// The log's length when the refork was asked.
    mark: usize,
    refork: Option<JoinHandle<Result<String, String>>>,
    /// Holds the breaker file.
    _dir: TempDir,
}

impl FailingRefork {
    /// Starts the server and the refork; returns once `failures` starts of the new generation
    /// failed.
    fn start(limit: u32, failures: u32) -> FailingRefork {
        let dir = TempDir::new();
        let breaker = dir.join("break-boot");
        let server = debug_hello(3, "TINE_DEBUG_PROMOTION_BREAKS_BOOT", &breaker)
            .env("TINE_ROLLOUT_MAX_FAILURES", limit.to_string())
            .start();
        wait_gen0(&server, 3);
        let mold0 = server.with_title("tine mold (gen:0)");
        std::fs::write(&breaker, "1\n").unwrap();
        let mark = server.log.mark();
        let socket = server.control_socket.clone();
        let refork = std::thread::spawn(move || ctl(&socket, &["refork"]));
        server.log.wait_for_log_since(
            mark,
            &format!("failures={failures} limit={limit}"),
            ROLLOUT_TIMEOUT,
        );
        FailingRefork {
            server,
            mold0,
            mark,
            refork: Some(refork),
            _dir: dir,
        }
    }

    /// The `ctl refork` reply, which must be an error.
    fn outcome(&mut self) -> String {
        self.refork
            .take()
            .expect("asked once")
            .join()
            .expect("ctl thread")
            .expect_err("the refork fails")
    }
}

/// Scaled down by one (`TTOU`) while a refork waits out the backoff of a replacement that keeps
/// failing (only the promoted mold's first worker boots): the old worker marked for that
/// replacement needs none any more, since the other workers make the new target, and leaves; the
/// rollout goes on, fails its next start (`rollout_max_failures` = 5) and is rolled back, where the
/// previous main waited for that replacement for ever, the rollout neither failing nor completing.
#[test]
fn a_scale_down_during_a_failing_rollout_does_not_stall_it() {
    // Four failed starts: the next one waits out a backoff of 800 ms.
    let mut trial = FailingRefork::start(5, 4);
    let (server, mold0, mark) = (&trial.server, trial.mold0.clone(), trial.mark);
    server.signal(Signal::SIGTTOU);
    let err = trial.outcome();
    let server = &mut trial.server;
    assert_names(
        &err,
        &[
            "refork to gen:1 failed: 5 failures of the new generation",
            "rolled back: the old generation keeps serving (gen:0)",
        ],
        server,
    );
    server.log.wait_for_log_since(
        mark,
        "a worker marked for replacement needs none (the target is met): it leaves now",
        Duration::from_secs(1),
    );
    // The previous mold and two workers of gen:0 (the numbers a scale-down leaves).
    let mut last = Vec::new();
    let settled = poll_until(READY_TIMEOUT, || {
        last = titled(server);
        let workers = last
            .iter()
            .filter(|(_, t)| t.starts_with("tine worker[") && t.ends_with("(gen:0)"))
            .count();
        // And the hot spare (spare_workers 1 by default), not counted here.
        let others = last
            .iter()
            .filter(|(_, t)| !t.starts_with("tine spare"))
            .count();
        (workers == 2 && others == 3 && server.with_title("tine mold (gen:0)") == mold0)
            .then_some(())
    });
    assert!(settled.is_some(), "{last:?}; log:\n{}", server.log.text());
    for _ in 0..20 {
        assert_eq!(server.get("/").status, 200);
    }
    assert!(!server.has_exited(), "{}", server.log.text());
}

/// A reload that interrupts a refork on trial (only the promoted mold's first worker boots), and
/// whose own new workers cannot boot either: the refork is rolled back before the re-exec (and not
/// counted as a failure), so the reload's rollback goes back to the gen:0 mold — the same process —
/// with every worker of gen:0 again. The previous main handed the refork's generation over as if
/// it had served, and rolled the failed reload back to that broken mold.
#[test]
fn a_reload_that_interrupts_a_refork_on_trial_rolls_back_to_the_mold_before_both() {
    let dir = TempDir::new();
    let promotion = dir.join("break-promotion");
    let preload = dir.join("break-preload");
    // With the default hot spare: the gen:0 spare is used up when the refork promotes a worker,
    // and after the reload's rollback the gen:0 mold, adopted by the new image, makes the next
    // one (the handover says it can), so the tree ends with its gen:0 spare.
    let mut server = debug_hello(3, "TINE_DEBUG_PROMOTION_BREAKS_BOOT", &promotion)
        .env("TINE_DEBUG_PRELOAD_BREAKS_BOOT", &preload)
        .env("TINE_ROLLOUT_MAX_FAILURES", "4")
        .start();
    wait_gen0(&server, 3);
    let mold0 = server.with_title("tine mold (gen:0)");
    std::fs::write(&promotion, "1\n").unwrap();
    let mark = server.log.mark();
    server.signal(Signal::SIGUSR2);
    // The refork is on trial: its first worker serves, the second failed once.
    server
        .log
        .wait_for_log_since(mark, "failures=1 limit=4", ROLLOUT_TIMEOUT);
    std::fs::write(&preload, "").unwrap();
    let err = server
        .ctl(&["reload"])
        .expect_err("the reload's workers cannot boot: the reload fails");
    assert_names(
        &err,
        &[
            "failed: 4 failures of the new generation",
            "debug: preloaded while",
            "rolled back: the old generation keeps serving (gen:0)",
        ],
        &server,
    );
    server.log.wait_for_log_since(
        mark,
        "rollout interrupted: refork to gen:1 interrupted by a reload",
        // Said already or about to be; the log reader may lag on a loaded CI machine.
        Duration::from_secs(10),
    );
    wait_gen0(&server, 3);
    assert_eq!(
        server.with_title("tine mold (gen:0)"),
        mold0,
        "the gen:0 mold stays"
    );
    assert_eq!(
        sample_value(&server, "tine_rollouts_failed_total{cause=\"reload\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample_value(&server, "tine_rollouts_failed_total{cause=\"refork\"}"),
        Some(0.0),
        "an interrupted refork is not a failed one"
    );
    for _ in 0..20 {
        assert_eq!(server.get("/").status, 200);
    }
    assert!(!server.has_exited(), "{}", server.log.text());
}

/// The previous mold is killed while a refork is on trial, and then the refork fails (only its
/// first worker boots): there is no mold to roll back to, and the reply says so. The old workers
/// serve on, the new generation's serving worker is replaced all the same, from a fresh gen:0 mold
/// (which preloads again), and the tree is back at full count.
#[test]
fn a_rollout_that_fails_after_the_previous_mold_died_says_so_and_recovers() {
    let mut trial = FailingRefork::start(4, 1);
    let mold0 = trial.mold0.clone();
    trial.server.signal_process(mold0[0].pid, Signal::SIGKILL);
    let err = trial.outcome();
    let server = &mut trial.server;
    assert_names(
        &err,
        &[
            "refork to gen:1 failed: 4 failures of the new generation",
            "the previous mold died during the rollout: a fresh gen:0 mold preloads for the missing workers",
        ],
        server,
    );
    wait_gen0(server, 3);
    let fresh = server.with_title("tine mold (gen:0)");
    assert_ne!(fresh[0].pid, mold0[0].pid, "a fresh gen:0 mold");
    for _ in 0..20 {
        assert_eq!(server.get("/").status, 200);
    }
    assert!(!server.has_exited(), "{}", server.log.text());
}

// ---------------------------------------------------------------------------------------------
// (c) fork fails with EAGAIN

/// Tasks (threads included) whose real uid is `uid`: what `RLIMIT_NPROC` counts.
fn tasks_of(uid: u32) -> u64 {
    let mut n = 0;
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if !p
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        for t in std::fs::read_dir(p.path().join("task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            let real = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u32>().ok());
            if real == Some(uid) {
                n += 1;
            }
        }
    }
    n
}

/// Processes of user `nobody` that only hold a share of its process limit, like other programs
/// of that user would; killed when dropped.
struct Hogs(Vec<std::process::Child>);

impl Hogs {
    fn start(n: u64) -> Hogs {
        let hogs = (0..n)
            .map(|_| {
                std::process::Command::new("setpriv")
                    .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
                    .args(["sleep", "120"])
                    .stdin(std::process::Stdio::null())
                    .spawn()
                    .expect("run setpriv (util-linux)")
            })
            .collect();
        Hogs(hogs)
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for h in &mut self.0 {
            let _ = h.kill();
            let _ = h.wait();
        }
    }
}

/// The mold and workers run as `nobody` under a process limit (`prlimit --nproc`, inherited from
/// the monitor, which as root is exempt itself). Other processes of `nobody` then take what is
/// left of the limit, so every fork the mold tries fails with `EAGAIN`, as on a box at its limit.
/// A refork then cannot start the promoted worker's replacement: the failure is retried with
/// backoff and never counted (`max_consecutive_spawn_errors = 3`, which the old monitor reached in
/// about a second before it killed everything), the mold stays, the workers serve every request.
/// Once those processes exit, the refork completes.
#[test]
fn forks_failing_with_eagain_are_retried_and_leave_the_serving_tree_intact() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "this test starts the server as root (the workers run as nobody)"
    );
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("user nobody")
        .uid
        .as_raw();
    // Room for the whole refork: the old mold, the workers, the replacement, the new mold's
    // workers and the short-lived middle processes of the double fork. Counted in threads: a
    // worker has three (its runtime's, its profiler's, its death notice's).
    let limit = tasks_of(nobody) + 12;
    let mut server = Launch::program("prlimit".into())
        .subcommand(None)
        .arg(format!("--nproc={limit}:{limit}"))
        .arg("--")
        .arg(tine_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--control-socket",
            "ctl.sock",
            "--app",
            "hello",
            "--debug-headers",
            "--workers",
            "2",
            "--user",
            "nobody",
            "--max-consecutive-spawn-errors",
            "3",
            "--metrics-listen",
            "127.0.0.1:0",
            // No hot spare: it would replace the worker chosen for promotion without a fork,
            // and the refork would go ahead; here the replacement itself must be forked.
            "--spare-workers",
            "0",
        ])
        .start();
    let gen0 = wait_gen0(&server, 2);
    let probe = Probe::start(server.addr(), "/", 3, Duration::from_secs(90));
    probe.wait_more(20, Duration::from_secs(10));

    let hogs = Hogs::start(limit.saturating_sub(tasks_of(nobody)));
    let full = poll_until(Duration::from_secs(10), || {
        (tasks_of(nobody) >= limit).then_some(())
    });
    assert!(full.is_some(), "nobody has {} of {limit}", tasks_of(nobody));
    let mark = server.log.mark();
    server.signal(Signal::SIGUSR2);
    // Several failed forks, past max_consecutive_spawn_errors, with the tree as it was.
    let retried = poll_until(Duration::from_secs(30), || {
        (server.log.lines()[mark..]
            .iter()
            .filter(|l| l.contains("mold could not fork a worker"))
            .count()
            >= 6)
            .then_some(())
    });
    assert!(retried.is_some(), "{}", server.log.text());
    assert!(!server.has_exited(), "{}", server.log.text());
    assert_eq!(
        titled(&server),
        titled_of(&gen0),
        "the mold and the workers are the same processes"
    );
    assert!(
        server.log.lines()[mark..]
            .iter()
            .any(|l| l.contains("Resource temporarily unavailable (os error 11)")),
        "the forks failed with EAGAIN: {}",
        server.log.text()
    );
    server.log.wait_for_log_since(
        mark,
        "a start failed for lack of resources; retrying (not counted as a failure)",
        Duration::from_secs(1),
    );
    let status = server.ctl(&["status"]).expect("ctl status");
    assert!(
        status.contains("starts delayed for lack of resources"),
        "{status}"
    );
    assert!(sample_value(&server, "tine_spawn_resource_errors_total").is_some_and(|n| n >= 5.0));
    let failures = probe.snapshot().failures;
    assert!(failures.is_empty(), "{failures:?}");

    // Resources are back: the refork goes through.
    drop(hogs);
    wait_new_generation(&server, 0, 2);
    finish_clean(probe, &mut server);
}

// ---------------------------------------------------------------------------------------------
// max_consecutive_spawn_errors

/// A `watch_demo` tree of 2 workers serving its boot file (`v1`), with
/// `max_consecutive_spawn_errors` 3 and no hot spare (it would take over from a killed worker;
/// here every replacement boots): the dir that holds the boot file, the file, the tree and its
/// gen:0 processes once they serve.
fn tree_that_gives_up_after_3_spawn_errors() -> (TempDir, PathBuf, Server, Vec<Proc>) {
    let dir = TempDir::new();
    let boot = dir.write("boot.txt", "v1\n");
    let server = watch_demo(
        &boot,
        &[
            "--max-consecutive-spawn-errors",
            "3",
            "--spare-workers",
            "0",
        ],
    );
    let gen0 = wait_gen0(&server, 2);
    (dir, boot, server, gen0)
}

/// Writes the boot file back to `v1` and waits until the tree is its gen:0 again, as many
/// processes as `gen0`.
fn fix_the_boot_file_and_wait_for_every_worker(server: &Server, boot: &Path, gen0: &[Proc]) {
    write_atomically(boot, "v1\n");
    let back = wait_gen0(server, 2);
    assert_eq!(back.len(), gen0.len());
}

/// A worker that dies while the app cannot boot (its boot file broke) cannot be replaced: the
/// replacements fail again and again, past `max_consecutive_spawn_errors` (3 here, where the old
/// monitor gave up and killed the worker still serving). The monitor stays while a worker serves,
/// keeps retrying with backoff, and the worker comes back once the file is fixed.
#[test]
fn failed_replacements_never_end_a_tree_that_still_serves() {
    let (_dir, boot, mut server, gen0) = tree_that_gives_up_after_3_spawn_errors();
    let survivor = server.workers()[0].1;
    write_atomically(&boot, b"\xff\xfe not text\n");
    let mark = server.log.mark();
    server.ctl(&["kill-worker", "1"]).expect("kill worker 1");
    let failed = poll_until(Duration::from_secs(30), || {
        (server.log.lines()[mark..]
            .iter()
            .filter(|l| l.contains("boot failed"))
            .count()
            >= 5)
            .then_some(())
    });
    assert!(failed.is_some(), "{}", server.log.text());
    assert!(!server.has_exited(), "{}", server.log.text());
    let workers = server.workers();
    assert_eq!(workers[0].1, survivor, "{workers:?}");
    for _ in 0..20 {
        assert_eq!(server.get("/").text(), "v1\n");
    }
    server.log.wait_for_log_since(
        mark,
        "max_consecutive_spawn_errors reached, but workers still serve",
        Duration::from_secs(1),
    );

    fix_the_boot_file_and_wait_for_every_worker(&server, &boot, &gen0);
    assert_eq!(server.workers()[0].1, survivor);
    assert!(!server.has_exited());
}

/// A tree that has served loses every worker while the app cannot boot (they were all killed,
/// as the OOM killer might): no worker serves and the replacements fail past
/// `max_consecutive_spawn_errors` (3 here, where the old monitor exited, leaving nothing to
/// restart them). The monitor stays, keeps retrying with capped backoff, and serves again once
/// the boot file is fixed.
#[test]
fn a_tree_that_served_survives_losing_every_worker_while_boot_fails() {
    let (_dir, boot, mut server, gen0) = tree_that_gives_up_after_3_spawn_errors();
    assert_eq!(server.get("/").text(), "v1\n");
    write_atomically(&boot, b"\xff\xfe not text\n");
    let mark = server.log.mark();
    server.ctl(&["kill-worker", "0"]).expect("kill worker 0");
    server.ctl(&["kill-worker", "1"]).expect("kill worker 1");
    let failed = poll_until(Duration::from_secs(30), || {
        (server.has_exited()
            || server.log.lines()[mark..]
                .iter()
                .filter(|l| l.contains("boot failed"))
                .count()
                >= 6)
            .then_some(())
    });
    assert!(failed.is_some(), "{}", server.log.text());
    assert!(!server.has_exited(), "{}", server.log.text());
    server.log.wait_for_log_since(
        mark,
        "max_consecutive_spawn_errors reached with no worker serving, but this tree has served",
        // Said already or about to be; the log reader may lag on a loaded CI machine.
        Duration::from_secs(10),
    );

    fix_the_boot_file_and_wait_for_every_worker(&server, &boot, &gen0);
    for _ in 0..10 {
        assert_eq!(server.get("/").text(), "v1\n");
    }
    assert!(!server.has_exited());
}
