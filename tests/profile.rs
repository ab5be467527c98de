//! Seeing inside a running tree (issue 12 parts 1 and 2): `SIGUSR2` to a worker toggles a CPU
//! profile written as a flamegraph, `tine ctl profile` does it through the monitor, a forgotten
//! profile stops by itself, and a worker killed for `timeout` has its stack in the log first.
//!
//! Real processes, real signals, real files: the SVGs are read back and checked.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::strict::StrictLoad;
use common::{ctl_within, poll_until, spawn_ctl, Addr, Launch, Server};
use nix::sys::signal::Signal;

/// A profile is symbolized with the debug build's full debug information: seconds on a busy CI.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// The path after `svg=` in a `profile written` log line.
fn svg_of(line: &str) -> PathBuf {
    let path = line
        .split("svg=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no svg= in {line:?}"));
    PathBuf::from(path)
}

/// Reads an SVG the profiler wrote and checks it is a whole flamegraph; returns its text.
fn read_flamegraph(svg: &Path) -> String {
    let text = std::fs::read_to_string(svg)
        .unwrap_or_else(|e| panic!("cannot read the flamegraph {}: {e}", svg.display()));
    assert!(
        text.starts_with("<?xml") && text.contains("<svg") && text.trim_end().ends_with("</svg>"),
        "{} is not a whole SVG document: {:.300}",
        svg.display(),
        text
    );
    let name = svg.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    assert!(
        name.starts_with("tine-profile-worker") && name.ends_with(".svg"),
        "unexpected file name {name}"
    );
    let folded = svg.with_extension("folded");
    assert!(
        folded.is_file(),
        "no folded stacks beside {}",
        svg.display()
    );
    text
}

/// `tine ctl ARGS` with a longer patience than the harness's (a profile takes its length, then
/// symbolizing): stdout on success, stderr on failure.
fn ctl_slow(server: &Server, args: &[&str]) -> Result<String, String> {
    ctl_within(
        &server.control_socket,
        args,
        WRITE_TIMEOUT + Duration::from_secs(20),
    )
}

/// The worker's pid with number `nr` in `ctl status`.
fn worker_pid(server: &Server, nr: u64) -> i32 {
    server
        .workers()
        .iter()
        .find(|(n, _, _)| *n == nr)
        .map(|(_, pid, _)| *pid)
        .unwrap_or_else(|| panic!("no worker {nr}: {:?}", server.workers()))
}

/// Sends `SIGUSR2` to worker `pid` and waits for it to say its profile started; returns the log
/// mark from before the signal.
fn start_profile_by_signal(server: &Server, pid: i32) -> usize {
    let mark = server.log.mark();
    server.signal_process(pid, Signal::SIGUSR2);
    server
        .log
        .wait_for_log_since(mark, "profiling started (SIGUSR2)", Duration::from_secs(10));
    mark
}

/// Asserts that `ctl status` marks no process as being profiled.
fn assert_no_process_marked_as_profiling(server: &Server) {
    let status = server.status();
    let profiling: Vec<_> = status["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .filter(|p| !p["profiling"].is_null())
        .collect();
    assert!(profiling.is_empty(), "still marked: {profiling:?}");
}

/// Waits until the strict load has `more` answers beyond what it had when called.
fn wait_for_answers(load: &StrictLoad, more: u64, server: &Server) {
    let from = load.answered();
    poll_until(Duration::from_secs(30), || {
        (load.answered() >= from + more).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "load stalled at {} answers; log:\n{}",
            load.answered(),
            server.log.text()
        )
    });
}

#[test]
fn two_usr2_to_a_worker_under_load_write_a_flamegraph_and_it_keeps_serving() {
    let server = Launch::tine().args(["--workers", "1"]).start();
    let pid = server.wait_workers(1, Duration::from_secs(20))[0];
    let load = StrictLoad::start(&server.addr(), 4, "/", Duration::from_secs(90));
    wait_for_answers(&load, 50, &server);

    let mark = start_profile_by_signal(&server, pid);
    // Enough requests under the profiler to be sampled many times over.
    wait_for_answers(&load, 2000, &server);
    server.signal_process(pid, Signal::SIGUSR2);
    let written = server.log.wait_for_log_since(
        mark,
        "profile written (stopped by the second SIGUSR2",
        WRITE_TIMEOUT,
    );
    let svg = svg_of(&written);
    assert!(
        svg.starts_with(server.dir.path()),
        "written outside the working directory (the default profile_dir): {}",
        svg.display()
    );
    let text = read_flamegraph(&svg);
    // The request path, sampled: hyper parsing and writing, tine's service in between.
    assert!(
        text.contains("hyper::proto::h1"),
        "no hyper frame in the flamegraph"
    );
    assert!(
        text.contains("tine::worker::http"),
        "no tine frame in the flamegraph"
    );
    // Stacks start at the worker's own root (the thread, then `tine::worker::run`), not in the
    // mold's and monitor's frames it was forked in; only a stack deeper than the recorded
    // frames can miss it.
    let folded = std::fs::read_to_string(svg.with_extension("folded")).expect("folded");
    let count = |l: &str| -> u64 {
        l.rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let main: Vec<&str> = folded
        .lines()
        .filter(|l| l.starts_with("tine-worker-0;"))
        .collect();
    let total: u64 = main.iter().map(|l| count(l)).sum();
    let rooted: u64 = main
        .iter()
        .filter(|l| l.starts_with("tine-worker-0;tine::worker::run;"))
        .map(|l| count(l))
        .sum();
    assert!(total > 0, "no sample of the worker's thread: {folded:.400}");
    assert!(
        rooted * 10 >= total * 9,
        "{rooted} of {total} samples rooted: {folded:.400}"
    );

    // The same worker serves on, and no request was lost while it was profiled.
    wait_for_answers(&load, 200, &server);
    let report = load.stop();
    assert!(report.lost.is_empty(), "{}", report.summary());
    assert_eq!(report.answered, report.status(200), "{}", report.summary());
    assert_eq!(
        worker_pid(&server, 0),
        pid,
        "the profiled worker was replaced"
    );
    assert_eq!(server.log.count("worker died"), 0, "{}", server.log.text());
}

#[test]
fn ctl_profile_prints_the_path_of_a_valid_svg_and_status_marks_the_worker() {
    let server = Launch::tine().args(["--workers", "2"]).start();
    let pids = server.wait_workers(2, Duration::from_secs(20));
    let load = StrictLoad::start(&server.addr(), 4, "/", Duration::from_secs(90));
    wait_for_answers(&load, 50, &server);

    // Out of range, or no such worker: a clear error and nothing started.
    let err = server.ctl(&["profile", "7"]).unwrap_err();
    assert!(err.contains("no ready worker 7"), "{err}");
    let err = server.ctl(&["profile", "0", "--seconds", "0"]).unwrap_err();
    assert!(err.contains("out of range"), "{err}");
    let err = server.ctl(&["profile", "zero"]).unwrap_err();
    assert!(err.contains("not a worker number"), "{err}");

    // A JSON profile of worker 1, watched from `ctl status` while it runs.
    let (mut json_run, json_out, _json_err) = spawn_ctl(
        &server.control_socket,
        &["profile", "1", "--seconds", "3", "--json"],
    );
    let marked = poll_until(Duration::from_secs(10), || {
        let status = server.status();
        status["processes"]
            .as_array()?
            .iter()
            .find(|p| p["nr"] == 1 && p["profiling"].is_object())
            .map(|p| p["profiling"]["max_seconds"].as_u64())
    });
    assert_eq!(
        marked,
        Some(Some(3)),
        "ctl status --json never marked worker 1"
    );
    let text = server.ctl(&["status"]).expect("ctl status");
    assert!(
        text.contains(&format!("profiling: worker 1 (pid {})", pids[1])),
        "{text}"
    );
    let err = server.ctl(&["profile", "1"]).unwrap_err();
    assert!(err.contains("already being profiled"), "{err}");
    let done = poll_until(WRITE_TIMEOUT, || json_run.try_wait().ok().flatten());
    assert!(
        done.is_some_and(|s| s.success()),
        "ctl profile --json failed: {done:?}"
    );
    json_out.wait_eof(Duration::from_secs(2));
    let reply: serde_json::Value =
        serde_json::from_str(&json_out.text()).expect("ctl profile --json prints JSON");
    assert_eq!(reply["pid"], pids[1]);
    let svg = PathBuf::from(reply["svg"].as_str().expect("svg"));
    read_flamegraph(&svg);
    assert_eq!(
        reply["folded"].as_str(),
        svg.with_extension("folded").to_str()
    );
    assert!(reply["samples"].as_u64().is_some());

    // The plain form prints the path, and the worker is no longer marked.
    let out = ctl_slow(&server, &["profile", "0", "--seconds", "1"]).expect("ctl profile 0");
    let svg = PathBuf::from(out.trim());
    assert!(svg.is_absolute(), "{out}");
    read_flamegraph(&svg);
    assert_no_process_marked_as_profiling(&server);

    let report = load.stop();
    assert!(report.lost.is_empty(), "{}", report.summary());
    assert_eq!(server.workers().len(), 2);
}

#[test]
fn a_forgotten_profile_stops_at_profile_max_seconds() {
    let dir = common::TempDir::new();
    let profiles = dir.join("profiles");
    std::fs::create_dir_all(&profiles).expect("mkdir");
    let server = Launch::tine()
        .args(["--workers", "1", "--profile-max-seconds", "2"])
        .arg("--profile-dir")
        .arg(&profiles)
        .start();
    let pid = server.wait_workers(1, Duration::from_secs(20))[0];
    let mark = start_profile_by_signal(&server, pid);
    // Nobody sends the second USR2.
    let written = server.log.wait_for_log_since(
        mark,
        "profile written (stopped by profile_max_seconds",
        WRITE_TIMEOUT,
    );
    let svg = svg_of(&written);
    assert_eq!(
        svg.parent().map(Path::to_path_buf),
        Some(std::fs::canonicalize(&profiles).expect("canonical")),
        "not written to profile_dir: {written}"
    );
    read_flamegraph(&svg);
    assert_eq!(worker_pid(&server, 0), pid);
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn a_profiled_worker_promoted_to_mold_writes_its_profile_and_its_generation_profiles_too() {
    let server = Launch::tine().args(["--workers", "1"]).start();
    let pid = server.wait_workers(1, Duration::from_secs(20))[0];
    let mark = start_profile_by_signal(&server, pid);
    // The profiled worker is the only candidate: it stops profiling (writing the profile) and
    // is promoted; its profiler thread is gone, or the promotion would fail (one thread only).
    server.ctl(&["refork"]).expect("ctl refork");
    let written = server.log.wait_for_log_since(
        mark,
        "profile written (stopped by the worker's exit or promotion",
        WRITE_TIMEOUT,
    );
    read_flamegraph(&svg_of(&written));
    let new = server.wait_workers(1, Duration::from_secs(30))[0];
    assert_ne!(new, pid);
    // The promoted worker's mold ignores USR2 (it would have died of it before).
    server.signal_process(pid, Signal::SIGUSR2);
    // A worker of the new generation profiles as well.
    let out = ctl_slow(&server, &["profile", "0", "--seconds", "1"]).expect("ctl profile");
    read_flamegraph(Path::new(out.trim()));
    assert!(
        common::proc_info(pid).is_some(),
        "the mold died of SIGUSR2; log:\n{}",
        server.log.text()
    );
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn a_worker_killed_for_timeout_logs_its_stack_naming_the_handler_before_the_kill() {
    let server = Launch::tine()
        .args(["--workers", "1", "--debug-routes", "--timeout", "2"])
        .args(["--timeout-cleanup", "3"])
        .start();
    let pid = server.wait_workers(1, Duration::from_secs(20))[0];
    let mark = server.log.mark();
    // The request never gets an answer: the handler spins on the worker's only thread.
    let Addr::Tcp(addr) = server.addr() else {
        panic!("a TCP listener")
    };
    let mut stuck = std::net::TcpStream::connect(addr).expect("connect");
    stuck
        .write_all(b"GET /spin HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("send");
    let kill_line = server
        .log
        .wait_for_line_since(mark, Duration::from_secs(40), |l| {
            l.contains("killing worker") && l.contains(&format!("pid={pid}"))
        })
        .unwrap_or_else(|| {
            panic!(
                "the hung worker was not killed; log:\n{}",
                server.log.text()
            )
        });
    assert!(kill_line.contains("reason=timeout"), "{kill_line}");
    let lines = server.log.lines();
    let from = lines[mark..]
        .iter()
        .position(|l| l.contains("worker is hung") && l.contains(&format!("pid={pid}")))
        .map(|i| i + mark)
        .unwrap_or_else(|| panic!("no hang line; log:\n{}", server.log.text()));
    let to = lines
        .iter()
        .position(|l| *l == kill_line)
        .expect("the kill line");
    let between = &lines[from..to];
    let header = between
        .iter()
        .find(|l| l.contains("stack of this hung worker"))
        .unwrap_or_else(|| {
            panic!(
                "no stack between the hang and the kill lines; log:\n{}",
                server.log.text()
            )
        });
    assert!(header.contains(&format!("pid={pid}")), "{header}");
    assert!(header.contains("request=GET /spin"), "{header}");
    let handler = between
        .iter()
        .position(|l| l.contains("#") && l.contains("tine::reference::hello"))
        .unwrap_or_else(|| panic!("no frame names the handler; log:\n{}", server.log.text()));
    assert!(
        between[handler].contains("reference/hello.rs"),
        "the frame has no source location: {}",
        between[handler]
    );
    // The hung worker is replaced and the tree serves on.
    let new = server.wait_workers(1, Duration::from_secs(30))[0];
    assert_ne!(new, pid);
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn a_missing_profile_dir_fails_the_profile_at_once_not_after_it_ran() {
    let dir = common::TempDir::new();
    let missing = dir.join("no-such-dir");
    let server = Launch::tine()
        .args(["--workers", "1"])
        .arg("--profile-dir")
        .arg(&missing)
        .start();
    let pid = server.wait_workers(1, Duration::from_secs(20))[0];
    // A 60 s profile with nowhere to write it: the operator hears so now, not in a minute.
    let err = ctl_within(
        &server.control_socket,
        &["profile", "0", "--seconds", "60"],
        Duration::from_secs(20),
    )
    .unwrap_err();
    assert!(
        err.contains("cannot start profiling") && err.contains("no-such-dir"),
        "{err}"
    );
    // Nothing is left running: the worker is not marked, and the next profile is refused again
    // the same way (not "already being profiled"); USR2 logs why, and the worker serves on.
    assert_no_process_marked_as_profiling(&server);
    let mark = server.log.mark();
    server.signal_process(pid, Signal::SIGUSR2);
    let line = server.log.wait_for_log_since(
        mark,
        "cannot start profiling: nowhere to write the profile",
        Duration::from_secs(10),
    );
    assert!(line.contains("no-such-dir"), "{line}");
    assert_eq!(worker_pid(&server, 0), pid);
    assert_eq!(server.get("/").status, 200);
}
