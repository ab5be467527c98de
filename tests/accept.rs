//! How new connections reach the workers: by default one idle worker is woken per connection
//! (`EPOLLEXCLUSIVE`); `exclusive_accept = false` wakes them all. In a file of its own so that
//! no other test's load runs beside it: a worker busy elsewhere is passed over by the kernel,
//! which would blur what is counted here.

mod common;

use common::*;

/// Voluntary context switches (one per sleep and wake-up) of every thread of `pid`: whichever of a
/// worker's runtime threads waits on the listener is the one woken, not necessarily its first.
fn wake_ups(pid: i32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("a worker's threads");
    tasks
        .filter_map(|t| t.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|tid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
            status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Opens `n` connections one after another on an idle server, one request each; returns how
/// often each worker was woken meanwhile (see [`wake_ups`]), fewest first.
fn wake_ups_per_worker(server: &Server, workers: &[i32], n: usize) -> Vec<u64> {
    let before: Vec<u64> = workers.iter().map(|p| wake_ups(*p)).collect();
    for _ in 0..n {
        assert_eq!(get(&server.addr(), "/").expect("GET").status, 200);
    }
    let mut woken: Vec<u64> = workers
        .iter()
        .zip(before)
        .map(|(p, b)| wake_ups(*p) - b)
        .collect();
    woken.sort_unstable();
    woken
}

#[test]
fn a_new_connection_wakes_one_idle_worker_not_all() {
    // Default: EPOLLEXCLUSIVE. 100 connections wake a worker that takes them (the first idle one
    // in line; another when the first is still busy closing the previous connection); the other
    // idle workers sleep on (a few wake-ups of their own timers at most).
    let server = Launch::tine().args(["--workers", "4"]).start();
    let workers = server.wait_workers(4, READY_TIMEOUT);
    let woken = wake_ups_per_worker(&server, &workers, 100);
    // On a loaded machine the one woken is sometimes still busy with the previous connection, so
    // the next goes to another: then two or three workers share the connections, but one at
    // least sleeps through nearly all of them.
    assert!(
        woken[0] < 20,
        "idle workers were woken for connections they did not take: {woken:?}"
    );
    // `exclusive_accept = false`: every idle worker is woken for every connection (the herd).
    let herd = Launch::tine()
        .args(["--workers", "4", "--exclusive-accept", "false"])
        .start();
    let workers = herd.wait_workers(4, READY_TIMEOUT);
    let woken = wake_ups_per_worker(&herd, &workers, 100);
    // Every worker, the least woken too, wakes for a good share of the connections (wake-ups that
    // come while a thread is still running merge into one: the least woken of four saw 44 to 96
    // of 100 in runs at load 4-15, against 0-11 with exclusive wake-ups).
    assert!(
        woken[0] > 25,
        "without exclusive wake-ups, every idle worker wakes for each connection: {woken:?}"
    );
}
