//! The tree survives its own faults: logging that cannot write, signal dispositions and
//! descriptors inherited from whoever started it, descriptor exhaustion.

mod common;

use std::path::Path;
use std::time::Duration;

use common::faults::{status_json, wait_generation, CloseAfterLine};
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
