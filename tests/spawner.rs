//! Black-box tests of `tine::spawner`: each runs `examples/spawner_probe` (a real program that
//! starts a real spawner) as a child process, because forking inside the test harness's threads
//! is not allowed. The probe prints `RESULT {json}` lines; the tests assert on them.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Builds the probe (cargo does not build examples for `cargo test --test spawner`) and returns
/// its path, next to the `tine` binary's directory.
fn probe_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_tine"));
        let profile_dir = bin.parent().expect("target/<profile>").to_path_buf();
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet", "--example", "spawner_probe"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .expect("run cargo build --example spawner_probe");
        assert!(status.success(), "building the probe failed");
        profile_dir.join("examples").join("spawner_probe")
    })
    .clone()
}

/// A running probe; dropping it kills it (its spawner and workers follow by parent-death signal).
struct Probe {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every stdout line read so far.
    seen: Vec<String>,
    /// Everything the probe (its spawner and workers too) wrote on stderr, when captured: read to
    /// its end (every writer gone) by a thread.
    stderr: Option<mpsc::Receiver<String>>,
}

impl Probe {
    fn start(args: &[&str]) -> Probe {
        Probe::start_with(args, &[], false)
    }

    /// Starts the probe with extra environment variables, capturing its stderr if asked.
    fn start_with(args: &[&str], env: &[(&str, &str)], capture_stderr: bool) -> Probe {
        let mut child = Command::new(probe_path())
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(if capture_stderr {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("start the probe");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = child.stderr.take().map(|mut err| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = std::io::Read::read_to_string(&mut err, &mut text);
                let _ = tx.send(text);
            });
            rx
        });
        Probe {
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    /// Reads lines until `marker` (returned: the RESULT objects seen before it), within `patience`.
    fn until(&mut self, marker: &str, patience: Duration) -> Vec<Value> {
        let deadline = Instant::now() + patience;
        let mut results = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left);
            if let Ok(line) = &line {
                self.seen.push(line.clone());
            }
            match line {
                Ok(line) if line == marker => return results,
                Ok(line) => {
                    if let Some(json) = line.strip_prefix("RESULT ") {
                        results.push(serde_json::from_str(json).expect("probe printed valid JSON"));
                    }
                }
                Err(_) => panic!("probe did not print {marker:?} within {patience:?}; results so far: {results:?}"),
            }
        }
    }

    /// Runs a scenario to its end and returns its results.
    fn run(args: &[&str], patience: Duration) -> Vec<Value> {
        Probe::start(args).finish(args, patience)
    }

    /// Reads the scenario's results to `DONE` and waits for the probe to exit successfully.
    fn finish(&mut self, args: &[&str], patience: Duration) -> Vec<Value> {
        let probe = self;
        let results = probe.until("DONE", patience);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match probe.child.try_wait().expect("try_wait") {
                Some(status) => {
                    assert!(status.success(), "probe {args:?} exited with {status}");
                    break;
                }
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                None => panic!("probe {args:?} did not exit after DONE"),
            }
        }
        results
    }

    /// The whole stderr of the probe and of every process it forked, once all of them are gone.
    fn stderr(&mut self) -> String {
        let rx = self.stderr.take().expect("started with capture_stderr");
        rx.recv_timeout(Duration::from_secs(10))
            .expect("stderr closed within 10 s of the probe's exit")
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn case<'a>(results: &'a [Value], name: &str) -> &'a Value {
    results
        .iter()
        .find(|r| r["case"] == name)
        .unwrap_or_else(|| panic!("no case {name:?} in {results:?}"))
}

fn alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

#[test]
fn results_round_trip() {
    let r = Probe::run(&["roundtrip"], Duration::from_secs(60));
    assert_eq!(case(&r, "blocking")["r"]["ok"][0], "HÉLLO");
    assert_eq!(case(&r, "blocking")["r"]["ok"][2], 6);
    let big = case(&r, "big");
    assert_eq!(
        big["r"]["ok"][1], 1_000_000,
        "a 1 MB job crosses several packets"
    );
    assert_eq!(big["r"]["ok"][2], big["expect_sum"]);
    for name in ["job_too_big", "output_too_big"] {
        let display = case(&r, name)["r"]["err"]["display"]
            .as_str()
            .unwrap_or_default();
        assert!(
            display.contains("over the wire's limit"),
            "{name}: {:?}",
            case(&r, name)
        );
    }
    assert_eq!(
        case(&r, "after_too_big")["r"]["ok"],
        serde_json::json!([7, 7, 7])
    );
    let a = case(&r, "async");
    assert_eq!(a["r"]["ok"][0], "ASYNC");
    assert_eq!(a["r"]["ok"][2], a["expect_sum"]);
    assert_eq!(
        case(&r, "concurrent")["good"],
        64,
        "every concurrent caller got its own answer"
    );
    assert!(
        case(&r, "concurrent")["live"].as_u64().unwrap() <= 2,
        "max_workers holds"
    );
    assert_eq!(case(&r, "unregistered")["unknown"], true);
}

#[test]
fn crashes_are_typed_and_the_pool_goes_on() {
    let r = Probe::run(&["crash"], Duration::from_secs(60));
    for (how, flag) in [
        ("abort", "sigabrt"),
        ("segv", "sigsegv"),
        ("exit3", "exit3"),
        ("panic", "panic"),
    ] {
        let c = case(&r, how);
        let err = &c["r"]["err"];
        assert_eq!(err[flag], true, "{how}: {c}");
        assert_eq!(
            err["pid"], c["before"],
            "{how}: the error names the worker that ran the job"
        );
        let after = c["after"]["ok"].as_u64().expect("the next job ran");
        assert_ne!(
            Some(after),
            c["before"].as_u64(),
            "{how}: a fresh worker took over"
        );
    }
    let segv = &case(&r, "segv")["r"]["err"];
    assert_eq!(
        segv["signal_name"], "SIGSEGV",
        "Error::signal names it: {segv}"
    );
    assert_eq!(
        segv["is_sigsegv_by_name"], true,
        "is_signal takes a Signal: {segv}"
    );
    let panic = &case(&r, "panic")["r"]["err"]["display"];
    assert!(
        panic
            .as_str()
            .unwrap()
            .contains("the probe panicked on purpose"),
        "{panic}"
    );
    let a = case(&r, "async-abort");
    assert_eq!(a["r"]["err"]["sigabrt"], true, "{a}");
    assert!(a["after"]["ok"].is_u64(), "{a}");
}

#[test]
fn timeout_kills_the_worker() {
    let r = Probe::run(&["timeout"], Duration::from_secs(60));
    for mode in ["blocking", "async"] {
        let c = case(&r, mode);
        assert_eq!(c["r"]["err"]["timeout"], true, "{c}");
        let ms = c["ms"].as_u64().unwrap();
        assert!(
            (300..5_000).contains(&ms),
            "{mode}: timed out after {ms} ms for a 300 ms timeout and a 10 s job"
        );
        assert_eq!(
            c["worker_gone"], true,
            "{mode}: the worker is dead when the error arrives"
        );
        assert!(c["after"]["ok"].is_u64(), "{mode}: the next job ran: {c}");
    }
}

#[test]
fn memory_limit_kills_the_worker() {
    let r = Probe::run(&["memory"], Duration::from_secs(60));
    for mode in ["blocking", "async"] {
        let c = case(&r, mode);
        assert_eq!(c["r"]["err"]["memory"], true, "{c}");
        assert_eq!(
            c["small"]["ok"],
            8 << 20,
            "{mode}: a job within the limit runs: {c}"
        );
    }
    assert_eq!(case(&r, "blocking")["worker_gone"], true);
}

#[test]
fn dropping_the_future_kills_and_replaces_the_worker() {
    let r = Probe::run(&["cancel"], Duration::from_secs(60));
    let c = &r[0];
    assert_eq!(c["cancelled"], true, "{c}");
    assert_eq!(
        c["first_gone"], true,
        "the worker running the cancelled job was killed: {c}"
    );
    assert_ne!(c["next"], c["first"], "a new worker ran the next job: {c}");
    assert!(c["ms"].as_u64().unwrap() < 5_000, "{c}");
}

#[test]
fn descriptors_travel_with_jobs_and_outputs() {
    let r = Probe::run(&["fds"], Duration::from_secs(60));
    let c = &r[0];
    assert_eq!(
        c["answer"],
        format!("hello probe from {}", c["worker"]),
        "{c}"
    );
    assert_ne!(
        c["worker"], c["me"],
        "a worker process answered on the socket"
    );
    assert_eq!(c["pipe"], "piped from worker");
}

#[test]
fn one_shot_forks_a_process_per_job() {
    let r = Probe::run(&["oneshot"], Duration::from_secs(60));
    let c = &r[0];
    let pids: std::collections::HashSet<u64> = c["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    assert_eq!(pids.len(), 5, "five jobs, five processes: {c}");
    assert_eq!(c["crash"]["err"]["sigabrt"], true, "{c}");
    assert_eq!(c["async"]["ok"][0], "ONE");
    assert_eq!(c["left"], 0, "every one-shot worker was reaped: {c}");
    assert_eq!(c["live"], 0);
}

#[test]
fn dead_spawner_is_a_typed_error_not_a_hang() {
    let r = Probe::run(&["spawner-death"], Duration::from_secs(60));
    let c = &r[0];
    assert_eq!(
        c["inflight"]["err"]["spawner_gone"], true,
        "the job in flight fails: {c}"
    );
    assert_eq!(c["next"]["err"]["spawner_gone"], true, "{c}");
    assert_eq!(c["next_async"]["err"]["spawner_gone"], true, "{c}");
    assert_eq!(c["fresh_pool"]["err"]["spawner_gone"], true, "{c}");
    assert!(c["ms"].as_u64().unwrap() < 5_000, "{c}");
}

#[test]
fn refuses_to_start_with_other_threads_and_names_them() {
    let r = Probe::run(&["threads"], Duration::from_secs(30));
    assert_eq!(r[0]["refused"], true);
    let msg = r[0]["message"].as_str().unwrap();
    assert!(msg.contains("busy-thread"), "{msg}");
}

#[test]
fn parent_sigkill_leaves_no_orphans() {
    let mut probe = Probe::start(&["orphans"]);
    let r = probe.until("READY", Duration::from_secs(60));
    let spawner = r[0]["spawner"].as_u64().unwrap();
    let workers: Vec<u64> = r[0]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    assert_eq!(workers.len(), 3, "one idle and two busy workers: {r:?}");
    assert!(alive(spawner) && workers.iter().all(|w| alive(*w)));
    probe.child.kill().expect("SIGKILL the probe");
    let killed = Instant::now();
    let _ = probe.child.wait();
    let mut tree = workers.clone();
    tree.push(spawner);
    while tree.iter().any(|p| alive(*p)) && killed.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let left: Vec<u64> = tree.into_iter().filter(|p| alive(*p)).collect();
    assert!(
        left.is_empty(),
        "still running 1 s after the parent's SIGKILL: {left:?}"
    );
}

#[test]
fn twenty_thousand_jobs_leak_no_fd_and_no_process() {
    let r = Probe::run(&["leak", "20000"], Duration::from_secs(240));
    let c = &r[0];
    assert_eq!(c["errors"], 0, "{c}");
    assert_eq!(c["fds_after"], c["fds_before"], "no descriptor leaked: {c}");
    assert!(
        c["distinct_workers"].as_u64().unwrap() >= 20_000 / 500,
        "workers were recycled: {c}"
    );
    assert_eq!(
        c["spawner_children"], c["live"],
        "the spawner has only the live workers as children: {c}"
    );
}

#[test]
fn a_panic_the_job_catches_is_no_failure() {
    let r = Probe::run(&["caught-panic"], Duration::from_secs(60));
    let c = &r[0];
    let before = &c["before"];
    for how in ["blocking", "tokio_task", "awaited"] {
        assert_eq!(
            c[how]["ok"][0], true,
            "{how}: the job caught its panic and returned: {c}"
        );
        assert_eq!(
            &c[how]["ok"][1], before,
            "{how}: the same worker ran it, not killed for a panic it caught: {c}"
        );
    }
    assert_eq!(&c["after"], before, "the worker lives on: {c}");
    let escape = &c["escape"]["err"];
    assert_eq!(escape["panic"], true, "{c}");
    let message = escape["display"].as_str().unwrap();
    assert!(
        message.contains("second panic, escapes") && !message.contains("first panic"),
        "the panic that escaped run() is reported, not the one caught before it: {message}"
    );
    let in_drop = &c["in_drop"]["err"];
    assert_eq!(
        in_drop["panic"], true,
        "an abort after a panic is the panic's: {c}"
    );
    let message = in_drop["display"].as_str().unwrap();
    assert!(
        message.contains("panic that unwinds into a panicking drop")
            && message.contains("panic in drop while unwinding"),
        "{message}"
    );
    assert!(c["next"]["ok"].is_u64(), "{c}");
    assert_eq!(c["one_shot"]["ok"][0], true, "one-shot workers too: {c}");
}

#[test]
fn panic_backtraces_reach_the_caller_and_the_worker_finishes_printing() {
    let args = ["backtrace"];
    let mut probe = Probe::start_with(&args, &[("RUST_BACKTRACE", "1")], true);
    let r = probe.finish(&args, Duration::from_secs(60));
    for mode in ["blocking", "awaited"] {
        let err = &r[0][mode]["err"];
        assert_eq!(err["panic"], true, "{mode}: {err}");
        let trace = err["backtrace"].as_str().unwrap_or_default();
        assert!(
            trace.contains("<spawner_probe::Crash as tine::spawner::job::Job>::run")
                && trace.contains("examples/spawner_probe.rs"),
            "{mode}: the backtrace shows the job's frame: {trace}"
        );
        assert!(
            !trace.contains("install_panic_hook") && !trace.contains("worker_main"),
            "{mode}: only the job's frames: {trace}"
        );
    }
    // Each worker's default hook printed its whole short backtrace (it ends with this note)
    // before the worker went away: none was killed mid-way.
    let stderr = probe.stderr();
    assert_eq!(stderr.matches("stack backtrace:").count(), 2, "{stderr}");
    assert_eq!(
        stderr
            .matches("note: Some details are omitted, run with `RUST_BACKTRACE=full`")
            .count(),
        2,
        "{stderr}"
    );

    let mut probe = Probe::start_with(
        &args,
        &[("RUST_BACKTRACE", "0"), ("RUST_LIB_BACKTRACE", "0")],
        false,
    );
    let r = probe.finish(&args, Duration::from_secs(60));
    assert_eq!(r[0]["blocking"]["err"]["panic"], true, "{r:?}");
    assert!(
        r[0]["blocking"]["err"]["backtrace"].is_null(),
        "no backtrace when they are off: {r:?}"
    );
}

#[test]
fn workers_keep_stdio_and_print_nothing_twice() {
    let args = ["inherited"];
    let mut probe = Probe::start(&args);
    let r = probe.finish(&args, Duration::from_secs(60));
    let stdout = probe.seen.join("\n");
    assert_eq!(
        stdout.matches("UNFLUSHED-BEFORE-START").count(),
        1,
        "text printed before start() without a newline is printed once, not again by each \
         worker: {stdout}"
    );
    assert_eq!(
        stdout.matches("printed by worker").count(),
        2,
        "workers print on the program's stdout: {stdout}"
    );
    for worker in ["a", "b"] {
        let fds: Vec<&str> = r[0][worker]["ok"]
            .as_array()
            .unwrap_or_else(|| panic!("{r:?}"))
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        assert_eq!(
            fds.len(),
            4,
            "stdin, stdout, stderr and the channel: {fds:?}"
        );
        for (i, std) in ["0=", "1=", "2="].into_iter().enumerate() {
            assert!(fds[i].starts_with(std), "{fds:?}");
        }
        assert!(fds[3].contains("socket:"), "the channel: {fds:?}");
    }
}
