//! The monitor runs above the tree's CPU priority (`monitor_nice_boost`, default 5 nice levels),
//! so that a saturated machine does not keep it waiting: in the chaos runs on a shared 2-core
//! machine, `ctl` replies that took seconds were the monitor runnable but not run (its run-queue
//! wait was 10% of its life), not the monitor blocked (bench/results/chaos.md). The mold and the
//! workers keep the nice value tine was started with, also after a reload's re-exec (the new
//! image must not take the monitor's boosted value for the tree's and boost again).

mod common;

use common::status::child_rows;
use common::*;
use nix::sys::signal::Signal;
use std::time::Duration;

/// The nice value of `pid` (field 19 of `/proc/PID/stat`).
fn nice_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    // Fields from 3 on: state is 3, nice is 19.
    rest.split_whitespace()
        .nth(19 - 3)
        .and_then(|n| n.parse().ok())
        .expect("nice field")
}

/// This process's nice value: what tine, started from here, inherits.
fn own_nice() -> i32 {
    nice_of(std::process::id() as i32)
}

/// Whether a process started from here may lower its nice value by `levels`: `CAP_SYS_NICE` in
/// the effective set, or an `RLIMIT_NICE` that allows it (`20 - limit` is the lowest nice value).
fn may_lower_nice_to(target: i32) -> bool {
    const CAP_SYS_NICE: u32 = 23;
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    if cap_eff & (1 << CAP_SYS_NICE) != 0 {
        return true;
    }
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max nice priority"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    20 - soft <= target
}

/// The pids of the mold(s) and workers in `ctl status --json`.
fn children(server: &Server) -> Vec<(String, i32)> {
    let status = server.status();
    child_rows(server, &status)
        .expect("process rows")
        .into_iter()
        .map(|r| (r.role, r.pid))
        .collect()
}

/// The monitor runs `boost` levels above the tree (or at the tree's level, saying why, when it
/// may not), and every child at the tree's level.
fn assert_priorities(server: &Server, tree: i32, boost: i32, when: &str) {
    let wanted = (tree - boost).max(-20);
    let monitor = nice_of(server.pid);
    if may_lower_nice_to(wanted) {
        assert_eq!(
            monitor,
            wanted,
            "{when}: the monitor's nice value (tree at {tree}, boost {boost}); log:\n{}",
            server.log.text()
        );
    } else {
        assert_eq!(
            monitor, tree,
            "{when}: an unprivileged monitor stays at the tree's level"
        );
        assert!(
            server
                .log
                .find("cannot raise the monitor's CPU priority")
                .is_some(),
            "{when}: the monitor says why it is not boosted; log:\n{}",
            server.log.text()
        );
    }
    for (role, pid) in children(server) {
        // A hot spare standing by waits at the monitor's level (see `a_standing_by_spare_…`); a
        // spare just activated as a worker puts itself back 50 ms after its activation (later on
        // a loaded machine): it is given a moment.
        let wanted = if role == "spare" { monitor } else { tree };
        let mut seen = nice_of(pid);
        if seen != wanted {
            poll_until(Duration::from_secs(3), || {
                seen = nice_of(pid);
                (seen == wanted).then_some(())
            });
        }
        assert_eq!(
            seen, wanted,
            "{when}: {role} {pid} runs at nice {wanted} (tree {tree}, monitor {monitor})"
        );
    }
}

/// A hot spare standing by only waits for its activation, and a replacement serves only once it
/// wakes: it waits at the monitor's raised priority (so its wake-up preempts busy workers as the
/// monitor's does), and once activated runs at the tree's level like every worker.
#[test]
fn a_standing_by_spare_waits_at_the_monitors_priority_and_serves_at_the_trees() {
    let tree = own_nice();
    let server = Launch::tine()
        .args(["--workers", "1", "--spare-workers", "1"])
        .start();
    let worker = server.wait_workers(1, READY_TIMEOUT)[0];
    let spare_of = |server: &Server| -> Option<i32> {
        children(server)
            .into_iter()
            .find_map(|(role, pid)| (role == "spare").then_some(pid))
    };
    let spare = poll_until(READY_TIMEOUT, || spare_of(&server)).expect("a spare");
    let monitor = nice_of(server.pid);
    if may_lower_nice_to(tree - 5) {
        assert_eq!(monitor, tree - 5, "the monitor is boosted");
    }
    // Raised when it reports ready.
    poll_until(READY_TIMEOUT, || (nice_of(spare) == monitor).then_some(()))
        .unwrap_or_else(|| panic!("the spare stands at nice {}, not {monitor}", nice_of(spare)));
    server.signal_process(worker, Signal::SIGKILL);
    server
        .wait_serving_as(0, spare, READY_TIMEOUT)
        .expect("the spare serves as worker 0");
    poll_until(READY_TIMEOUT, || (nice_of(spare) == tree).then_some(()))
        .unwrap_or_else(|| panic!("activated, it runs at nice {}, not {tree}", nice_of(spare)));
    let next = poll_until(READY_TIMEOUT, || spare_of(&server).filter(|p| *p != spare))
        .expect("a new spare");
    poll_until(READY_TIMEOUT, || (nice_of(next) == monitor).then_some(()))
        .expect("the new spare stands by at the monitor's level");
}

#[test]
fn the_monitor_runs_above_the_tree_and_its_children_at_the_tree_level_across_a_reload() {
    let tree = own_nice();
    let server = Launch::tine().args(["--workers", "2"]).start();
    server.wait_workers(2, READY_TIMEOUT);
    assert_priorities(&server, tree, 5, "at start");

    // The new image gets the tree's nice value in the handover: it neither boosts again nor
    // gives its new mold the monitor's value.
    let mark = server.log.mark();
    server.signal(Signal::SIGHUP);
    server
        .log
        .wait_for_log_since(mark, "reload complete", READY_TIMEOUT);
    server.wait_workers(2, READY_TIMEOUT);
    assert_priorities(&server, tree, 5, "after a reload");
}

#[test]
fn monitor_nice_boost_zero_leaves_the_monitor_at_the_tree_level() {
    let tree = own_nice();
    let server = Launch::tine()
        .args(["--workers", "1", "--monitor-nice-boost", "0"])
        .start();
    server.wait_workers(1, READY_TIMEOUT);
    assert_eq!(nice_of(server.pid), tree);
    for (role, pid) in children(&server) {
        assert_eq!(nice_of(pid), tree, "{role} {pid}");
    }
}

#[test]
fn a_boost_beyond_the_nice_range_is_refused_with_a_clear_error() {
    let out = std::process::Command::new(tine_bin())
        .args(["check", "--monitor-nice-boost", "40"])
        .output()
        .expect("run tine check");
    assert!(!out.status.success(), "tine check accepted a boost of 40");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("monitor_nice_boost") && err.contains("0 to 39"),
        "the error names the key and the range: {err}"
    );
}
