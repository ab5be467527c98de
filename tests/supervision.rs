//! Supervision: hang detection (one and several runtime threads), recycling at `max_rss_mb` and
//! `max_requests` under load with every response counted, and `spawn_timeout`.
//!
//! Everything runs the real `tine` binary with the reference app's debug hooks: `/spin` blocks a
//! worker thread forever, `/leak/KB` leaks memory, `TINE_DEBUG_BOOT_SLEEP_MS` blocks `boot`.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Time for the monitor to notice past a deadline: the worker's 500 ms tick, the 100 ms limit
/// check, the poll wake-up, and a busy debug build on two cores.
const SLACK: Duration = Duration::from_millis(2500);

/// The value of field `key` of a log line (`… pid=N: message key=value key=value`): values may
/// contain spaces (`request=GET /spin`), so a value ends at the next ` word=`.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let fields = &line[line.find(": ")? + 2..];
    let start = fields.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &fields[start..];
    let is_key_start = |i: usize| {
        let word: String = rest[i + 1..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        !word.is_empty() && rest[i + 1 + word.len()..].starts_with('=')
    };
    let end = rest
        .char_indices()
        .find(|(i, c)| *c == ' ' && is_key_start(*i))
        .map(|(i, _)| i)
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

/// Sends `GET /spin` on its own thread; the connection can only end when the worker dies.
fn spin(server: &Server) -> std::thread::JoinHandle<std::io::Result<Response>> {
    let addr = server.addr();
    std::thread::spawn(move || get(&addr, "/spin"))
}

/// The hung worker is asked to exit at `timeout` and SIGKILLed at `timeout + timeout_cleanup`;
/// the kill is logged at warn with nr, pid, generation, reason and the request.
fn assert_spin_is_killed(server: &Server, threads: usize) {
    let workers = server.wait_workers(server_workers(server), READY_TIMEOUT);
    let mark = server.log.mark();
    let started = Instant::now();
    let client = spin(server);
    let soft = server
        .log
        .wait_for_log_since(mark, "worker is hung", Duration::from_secs(20));
    let soft_at = started.elapsed();
    let kill = server
        .log
        .wait_for_log_since(mark, "killing worker", Duration::from_secs(20));
    let killed_at = started.elapsed();
    eprintln!("threads={threads}: asked to exit after {soft_at:?}, killed after {killed_at:?}\n{soft}\n{kill}");

    // timeout 1 s + timeout_cleanup 1 s, plus the tick and check granularity.
    assert!(
        killed_at <= Duration::from_secs(2) + SLACK,
        "killed only after {killed_at:?}: {kill}"
    );
    assert!(
        killed_at - soft_at >= Duration::from_millis(900),
        "killed {:?} after the soft stop, before timeout_cleanup",
        killed_at - soft_at
    );
    assert!(
        soft.contains("WARN")
            && soft.contains("request=GET /spin")
            && soft.contains("reason=timeout"),
        "{soft}"
    );
    assert!(kill.contains("WARN"), "a kill is logged at warn: {kill}");
    assert!(
        kill.contains("request=GET /spin"),
        "the kill names the request: {kill}"
    );
    assert!(
        kill.contains("reason=timeout: still alive after timeout_cleanup"),
        "{kill}"
    );
    assert_eq!(field(&kill, "generation"), Some("0"), "{kill}");
    let pid: i32 = field(&kill, "pid")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {kill}"));
    let nr: u64 = field(&kill, "nr")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no nr in {kill}"));
    assert!(
        workers.contains(&pid),
        "the killed pid {pid} was one of the workers {workers:?}"
    );
    assert_eq!(
        workers.get(nr as usize),
        Some(&pid),
        "nr={nr} is the number of pid {pid}"
    );

    // The client's connection ends with the worker, and the service goes on with a replacement.
    let result = client.join().expect("spin client thread");
    assert!(
        result.is_err(),
        "a request to a killed worker cannot succeed: {result:?}"
    );
    assert!(
        poll_until(Duration::from_secs(5), || gone(pid).then_some(())).is_some(),
        "pid {pid} is still alive"
    );
    let after = server.wait_workers(workers.len(), READY_TIMEOUT);
    assert!(!after.contains(&pid));
    assert_eq!(server.get("/").status, 200);
    let exited = server.log.wait_for_log_since(
        mark,
        &format!("worker exited pid={pid}"),
        Duration::from_secs(5),
    );
    assert!(
        exited.contains("reason=timeout") && exited.contains("how=signal SIGKILL"),
        "{exited}"
    );
}

fn server_workers(server: &Server) -> usize {
    server.status()["target"].as_u64().expect("target") as usize
}

/// Two workers with the debug routes (`/spin`), a hang `timeout` and `timeout_cleanup` of 1 s
/// each, and `extra` arguments.
fn spin_tree(extra: &[&str]) -> Server {
    Launch::tine()
        .args(["--workers", "2", "--debug-routes"])
        .args(["--timeout", "1", "--timeout-cleanup", "1"])
        .args(extra)
        .start()
}

#[test]
fn a_spinning_handler_is_killed_within_timeout_and_cleanup_and_the_log_names_it() {
    let server = spin_tree(&[]);
    assert_spin_is_killed(&server, 1);
}

/// A handler spinning on one of several runtime threads may or may not stall the rest of the
/// runtime (tokio gives no progress guarantee with a blocked worker thread): either way it is
/// killed in time, and the log names it.
#[test]
fn with_worker_threads_a_spinning_handler_is_killed_too() {
    let server = spin_tree(&["--worker-threads", "2"]);
    assert_spin_is_killed(&server, 2);
}

/// With several runtime threads the tick keeps running while a request is stuck on another:
/// the age of the oldest request in flight is what counts, even while newer requests keep
/// starting and ending on the same worker (a "latest request" slot would report those instead).
/// An awaiting request makes this deterministic: the runtime stays healthy throughout.
#[test]
fn with_worker_threads_the_oldest_request_counts_while_newer_ones_come_and_go() {
    let server = Launch::tine()
        .args([
            "--workers",
            "1",
            "--worker-threads",
            "2",
            "--debug-routes",
            "--debug-headers",
        ])
        .args(["--timeout", "1", "--timeout-cleanup", "1"])
        .start();
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    let mark = server.log.mark();
    let started = Instant::now();
    let addr = server.addr();
    let stuck = std::thread::spawn(move || get(&addr, "/sleep/30000"));
    // Fast requests on the same worker meanwhile (bounded in count and time).
    let mut served_meanwhile = 0;
    let mut seen_in_status = None;
    for _ in 0..300 {
        if server
            .log
            .wait_for_line_since(mark, Duration::from_millis(1), |l| {
                l.contains("worker is hung")
            })
            .is_some()
        {
            break;
        }
        if let Ok(r) = get(&server.addr(), "/") {
            if r.status == 200 && r.worker() == Some(worker) {
                served_meanwhile += 1;
            }
        }
        if seen_in_status.is_none() && served_meanwhile >= 5 {
            let status = server.status();
            let w = status["processes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["role"] == "worker")
                .cloned()
                .unwrap();
            seen_in_status = Some((
                w["oldest_request"].clone(),
                w["oldest_request_ms"].as_u64().unwrap_or(0),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let soft = server
        .log
        .wait_for_log_since(mark, "worker is hung", Duration::from_secs(20));
    let kill = server
        .log
        .wait_for_log_since(mark, "killing worker", Duration::from_secs(20));
    let killed_at = started.elapsed();
    eprintln!("served {served_meanwhile} requests meanwhile; status saw {seen_in_status:?}; killed after {killed_at:?}\n{soft}\n{kill}");
    assert!(
        served_meanwhile >= 5,
        "the worker kept serving other requests"
    );
    let (oldest, age_ms) = seen_in_status.expect("a status while the slow request was in flight");
    assert_eq!(
        oldest, "GET /sleep/30000",
        "the slot shows the oldest request, not the latest"
    );
    assert!(
        age_ms > 0 && age_ms <= started.elapsed().as_millis() as u64,
        "its age counts from its own start: {age_ms} ms"
    );
    assert!(
        soft.contains("why=a request in flight for"),
        "caught by the request's age (the tick ran): {soft}"
    );
    assert!(
        soft.contains("request=GET /sleep/30000") && kill.contains("request=GET /sleep/30000"),
        "{soft}\n{kill}"
    );
    assert!(
        killed_at <= Duration::from_secs(2) + SLACK,
        "killed only after {killed_at:?}"
    );
    assert!(
        stuck.join().expect("client thread").is_err(),
        "the stuck request ends with its worker"
    );
    server.wait_workers(1, READY_TIMEOUT);
    assert_eq!(server.get("/").status, 200);
}

/// With one runtime thread an awaiting request is not a hang (the tick runs; `request_timeout`
/// is what bounds slow requests): only a stopped tick is.
#[test]
fn with_one_thread_a_slow_awaiting_request_is_not_a_hang() {
    let server = Launch::tine()
        .args([
            "--workers",
            "1",
            "--debug-routes",
            "--timeout",
            "1",
            "--timeout-cleanup",
            "1",
        ])
        .start();
    let started = Instant::now();
    let r = server.get("/sleep/2500");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(started.elapsed() >= Duration::from_millis(2500));
    assert_eq!(
        server.log.count("worker is hung"),
        0,
        "{}",
        server.log.text()
    );
    assert_eq!(server.log.count("killing"), 0);
}

/// Asserts that every recycled worker's replacement was ready before it was told to retire
/// (first waiting for the last recycles, marked as the load ended, to complete).
fn assert_replace_then_retire(server: &Server, reason: &str) -> usize {
    let marked =
        |l: &str| l.contains("recycling worker") && l.contains(&format!("reason={reason}"));
    let complete = poll_until(Duration::from_secs(10), || {
        let log = server.log.lines();
        let all_retired = log.iter().filter(|l| marked(l)).all(|l| {
            let pid = field(l, "pid").unwrap_or("?");
            log.iter()
                .any(|r| r.contains("retiring worker") && r.contains(&format!(" pid={pid} ")))
        });
        all_retired.then_some(log)
    });
    let log = complete.unwrap_or_else(|| {
        panic!(
            "a worker marked for recycling was never retired:\n{}",
            server.log.text()
        )
    });
    let mut recycled = 0;
    for (i, line) in log.iter().enumerate() {
        if !(line.contains("recycling worker") && line.contains(&format!("reason={reason}"))) {
            continue;
        }
        recycled += 1;
        let nr = field(line, "nr").expect("nr");
        let pid = field(line, "pid").expect("pid");
        let retired = log[i..]
            .iter()
            .position(|l| l.contains("retiring worker") && l.contains(&format!(" pid={pid} ")))
            .map(|j| i + j)
            .unwrap_or_else(|| panic!("worker {pid} marked for recycling was never retired"));
        let ready = log[i..retired]
            .iter()
            .any(|l| l.contains(&format!("worker[{nr}] (gen:0) ready")));
        assert!(
            ready,
            "worker {pid} (nr {nr}) retired before its replacement was ready:\n{}",
            log[i..=retired].join("\n")
        );
    }
    recycled
}

/// Starts 2 workers with `limit` (the flags), sends `threads × per_thread` `GET path` on new
/// connections, and asserts that every one was answered 200 while workers were recycled for
/// `reason`, replace-then-retire. Returns the load report and the number of recycles.
fn recycled_under_load(
    limit: &[&str],
    path: &str,
    threads: usize,
    per_thread: usize,
    reason: &str,
) -> (LoadReport, usize) {
    let server = Launch::tine()
        .args(["--workers", "2", "--debug-routes", "--debug-headers"])
        .args(limit)
        .start();
    server.wait_workers(2, READY_TIMEOUT);
    let report = load(
        &server.addr(),
        path,
        threads,
        per_thread,
        false,
        Duration::from_secs(90),
    );
    eprintln!("{reason}: {report:?}");
    assert!(
        report.errors.is_empty(),
        "failed requests: {:?}",
        report.errors
    );
    assert_eq!(report.skipped, 0);
    assert_eq!(
        report.status(200),
        threads * per_thread,
        "every request answered 200: {:?}",
        report.by_status
    );
    let recycled = assert_replace_then_retire(&server, reason);
    assert!(
        report.by_worker.len() > 2,
        "replacements answered too: {:?}",
        report.by_worker
    );
    let exited = poll_until(Duration::from_secs(10), || {
        let lines = server.log.lines();
        let n = lines
            .iter()
            .filter(|l| l.contains("worker exited") && l.contains(&format!("reason={reason}")))
            .count();
        (n >= recycled).then_some(n)
    });
    assert!(
        exited.is_some(),
        "every recycled worker exited with its reason"
    );
    // The tree is whole again afterwards.
    server.wait_workers(2, READY_TIMEOUT);
    (report, recycled)
}

#[test]
fn a_leaking_worker_is_recycled_at_max_rss_mb_without_a_failed_request() {
    // 4 × 1500 requests leaking 64 KiB each: 375 MiB in all, several times a worker's limit, and
    // long enough for recycling to happen under the load.
    let (_, recycled) =
        recycled_under_load(&["--max-rss-mb", "48"], "/leak/64", 4, 1500, "max_rss_mb");
    assert!(
        recycled >= 2,
        "at least two recycles at max_rss_mb, saw {recycled}"
    );
}

#[test]
fn max_requests_recycles_under_load_with_zero_failures() {
    // Requests of at least 5 ms, so that the load lasts well over a second: the limit is checked
    // on the monitor's 100 ms tick, and a worker overshoots it by what it serves in between.
    let limit = ["--max-requests", "40", "--max-requests-jitter", "10"];
    let (_, recycled) = recycled_under_load(&limit, "/sleep/5", 4, 300, "max_requests");
    assert!(
        recycled >= 4,
        "1200 requests over workers recycled past ~50 each: saw {recycled}"
    );
}

#[test]
fn a_worker_that_never_gets_ready_is_killed_at_spawn_timeout_and_the_monitor_gives_up() {
    let finished = Launch::tine()
        .args([
            "--workers",
            "1",
            "--debug-routes",
            "--spawn-timeout",
            "1",
            "--max-consecutive-spawn-errors",
            "3",
        ])
        .env("TINE_DEBUG_BOOT_SLEEP_MS", "60000")
        .run(Duration::from_secs(40));
    let log = finished.stderr_text();
    eprintln!("{log}");
    assert_eq!(
        finished.code(),
        Some(1),
        "exit code 1 after the spawn errors"
    );
    let kills: Vec<&String> = finished
        .stderr
        .iter()
        .filter(|l| l.contains("killing worker"))
        .collect();
    assert!(
        kills.len() >= 3,
        "each worker that missed spawn_timeout is killed"
    );
    for k in &kills[..3] {
        assert!(
            k.contains("WARN") && k.contains("reason=not ready within spawn_timeout"),
            "{k}"
        );
        assert!(
            field(k, "pid").is_some_and(|p| p.parse::<i32>().is_ok_and(|p| p > 1))
                && k.contains(" nr=0 "),
            "{k}"
        );
    }
    assert!(
        log.contains("giving up after 3 consecutive failed spawns: not ready within spawn_timeout"),
        "{log}"
    );
    // Three rounds of 1 s, with back-off in between: not much longer.
    assert!(
        finished.elapsed >= Duration::from_secs(3),
        "{:?}",
        finished.elapsed
    );
    assert!(
        finished.elapsed < Duration::from_secs(20),
        "{:?}",
        finished.elapsed
    );
    assert!(finished.pipes_closed, "no process of the tree is left");
}

#[test]
fn a_slow_boot_within_spawn_timeout_is_waited_for() {
    let server = Launch::tine()
        .args(["--workers", "1", "--debug-routes", "--spawn-timeout", "10"])
        .env("TINE_DEBUG_BOOT_SLEEP_MS", "700")
        .start();
    let ready = server
        .log
        .wait_for_log("worker[0] (gen:0) ready", READY_TIMEOUT);
    let elapsed: u64 = field(&ready, "elapsed_ms")
        .and_then(|e| e.parse().ok())
        .expect("elapsed_ms");
    assert!(elapsed >= 700, "boot slept 700 ms: {ready}");
    assert_eq!(server.log.count("killing"), 0, "{}", server.log.text());
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn field_parser_handles_values_with_spaces() {
    let line = "x  WARN tine monitor pid=1: killing worker nr=1 pid=42 generation=0 reason=timeout: still alive after timeout_cleanup request=GET /spin";
    assert_eq!(field(line, "nr"), Some("1"));
    assert_eq!(field(line, "pid"), Some("42"));
    assert_eq!(
        field(line, "reason"),
        Some("timeout: still alive after timeout_cleanup")
    );
    assert_eq!(field(line, "request"), Some("GET /spin"));
}

#[test]
fn max_lifetime_recycles_replace_then_retire_under_load() {
    // About three seconds of requests: every worker outlives its second at least once meanwhile.
    let (_, recycled) = recycled_under_load(
        &["--max-lifetime", "1"],
        "/sleep/10",
        2,
        250,
        "max_lifetime",
    );
    assert!(recycled >= 2, "saw {recycled} recycles at max_lifetime");
}

#[test]
fn a_leaking_worker_is_recycled_at_max_pss_mb() {
    let server = Launch::tine()
        .args([
            "--workers",
            "1",
            "--debug-headers",
            "--debug-routes",
            "--max-pss-mb",
            "40",
        ])
        .start();
    let first = server.wait_workers(1, READY_TIMEOUT)[0];
    // PSS is read at most every 5 s per worker: leak in bounded rounds until it is noticed.
    let mut total = LoadReport::default();
    let found = poll_until(Duration::from_secs(30), || {
        let r = load(
            &server.addr(),
            "/leak/256",
            2,
            20,
            false,
            Duration::from_secs(10),
        );
        *total.by_status.entry(200).or_default() += r.status(200);
        total.errors.extend(r.errors);
        server.log.find("reason=max_pss_mb")
    });
    assert!(
        found.is_some(),
        "never recycled at max_pss_mb; log:\n{}",
        server.log.text()
    );
    assert!(
        total.errors.is_empty(),
        "failed requests: {:?}",
        total.errors
    );
    assert_replace_then_retire(&server, "max_pss_mb");
    let after = server.wait_workers(1, READY_TIMEOUT);
    assert_ne!(after[0], first, "the leaking worker was replaced");
}
