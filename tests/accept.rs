//! How new connections reach the workers: by default one idle worker is woken per connection
//! (`EPOLLEXCLUSIVE`); `exclusive_accept = false` wakes them all. In a file of its own so that
//! no other test's load runs beside it: a worker busy elsewhere is passed over by the kernel,
//! which would blur what is counted here.

mod common;

use common::*;

/// Opens `n` connections one after another on an idle server, one request each; returns how
/// often each worker was woken meanwhile (voluntary context switches: one per sleep and wake-up),
/// fewest first.
fn wake_ups_per_worker(server: &Server, workers: &[i32], n: usize) -> Vec<u64> {
    let before: Vec<u64> = workers
        .iter()
        .map(|p| status_number(*p, "voluntary_ctxt_switches"))
        .collect();
    for _ in 0..n {
        assert_eq!(get(&server.addr(), "/").expect("GET").status, 200);
    }
    let mut woken: Vec<u64> = workers
        .iter()
        .zip(before)
        .map(|(p, b)| status_number(*p, "voluntary_ctxt_switches") - b)
        .collect();
    woken.sort_unstable();
    woken
}

#[test]
fn a_new_connection_wakes_one_idle_worker_not_all() {
    // Default: EPOLLEXCLUSIVE. 100 connections wake a worker that takes them (the first idle one
    // in line; a second one when the first is still busy closing the previous connection); the
    // other idle workers sleep on (a few wake-ups of their own timers at most).
    let server = Launch::tine().args(["--workers", "4"]).start();
    let workers = server.wait_workers(4, READY_TIMEOUT);
    let woken = wake_ups_per_worker(&server, &workers, 100);
    assert!(
        woken[..2].iter().sum::<u64>() < 20,
        "idle workers were woken for connections they did not take: {woken:?}"
    );
    // `exclusive_accept = false`: every idle worker is woken for every connection (the herd).
    let herd = Launch::tine()
        .args(["--workers", "4", "--exclusive-accept", "false"])
        .start();
    let workers = herd.wait_workers(4, READY_TIMEOUT);
    let woken = wake_ups_per_worker(&herd, &workers, 100);
    assert!(
        woken[..3].iter().sum::<u64>() > 150,
        "without exclusive wake-ups, every idle worker wakes for each connection: {woken:?}"
    );
}
