//! Accept balance (`accept_balance`): a burst of new keep-alive connections on an idle server is
//! spread over the workers, a stopped worker does not stop the others from accepting, and
//! connection churn does not make the workers take turns leaving the reactor. In a
//! file of its own so that no other test's load runs beside it: a worker busy elsewhere is passed
//! over by the kernel, which would spread the connections by itself.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

/// Keep-alive connections opened in one burst.
const BURST: usize = 16;
/// Above its fair share, what a worker may hold (the rule's least slack, plus one for the race
/// of two workers accepting at once).
const SLACK: usize = 3;

/// Opens `n` connections at once, then sends one request on each and reads its answer; returns
/// the open clients and how many each worker took, by pid (`x-tine-worker`).
fn burst(addr: &Addr, n: usize) -> (Vec<Client>, HashMap<i32, usize>) {
    let mut clients: Vec<Client> = (0..n)
        .map(|_| Client::connect(addr).expect("connect"))
        .collect();
    let mut taken = HashMap::new();
    for client in &mut clients {
        client.send_request("GET", "/", &[], b"").expect("send");
    }
    for client in &mut clients {
        let response = client.read_response(false).expect("a response");
        assert_eq!(response.status, 200);
        *taken
            .entry(response.worker().expect("x-tine-worker"))
            .or_default() += 1;
    }
    (clients, taken)
}

/// A tree of 2 workers with `accept_balance` on, answering with `x-tine-worker`, each deferral
/// logged ([`DEFERRAL`]).
fn two_balanced_workers() -> Server {
    Launch::tine()
        .args([
            "--workers",
            "2",
            "--debug-headers",
            "--accept-balance",
            "true",
            "--log-level",
            "info,tine::worker::balance=debug",
        ])
        .start()
}

/// The debug line of a worker starting to leave new connections to a lighter peer.
const DEFERRAL: &str = "accept balance: leaving new connections to a lighter peer";

#[test]
fn a_burst_of_keep_alive_connections_is_spread_over_idle_workers() {
    // Without the rule, the first worker woken takes the whole burst nearly every time on an idle
    // 2-core machine (16/0, 15/1 or 14/2 in 13 of 14 bursts, 11/5 once): the second worker, woken
    // for the second connection, waits under SCHED_BATCH for a CPU while the first one's accept
    // loop empties the queue. With it, no worker holds more than its share and the slack.
    spread_over_idle_workers(|_| {});
}

#[test]
fn a_burst_right_after_one_connection_closed_is_spread_too() {
    // As `wrk` starts: it connects once and closes to check the address, then opens all its
    // connections at once (a load balancer's health check before its pool connects is the same).
    // When one close within `QUIET` kept a worker from deferring, the worker that had taken it
    // took the whole burst, or the other one deferred to it and it took the rest (64/0, 63/1,
    // 57/7 of `wrk -c64` on shared cores). Under that rule this test failed in 2 of 3 runs (a
    // run passes when the worker that took the check is not the one woken for the burst).
    spread_over_idle_workers(|server| {
        let mut check = Client::connect(&server.addr()).expect("connect");
        let response = check
            .request("GET", "/", &[("Connection", "close")], b"")
            .expect("a response");
        assert_eq!(response.status, 200);
        // Closed by the worker, so that its close is counted before the burst.
        let (_, closed) = check.read_until_closed(IO_TIMEOUT);
        assert!(
            closed,
            "the server did not close a `Connection: close` connection"
        );
    });
}

/// Three rounds, each on a fresh tree of two idle workers: `before_burst`, then a [`BURST`] of
/// keep-alive connections, of which no worker may take more than its share and [`SLACK`].
fn spread_over_idle_workers(before_burst: impl Fn(&Server)) {
    // A fresh server each round: the rule waits for a worker's connections to stop closing (two
    // closes within 5 ms, `QUIET`), and the previous round's closed within milliseconds of the
    // next burst.
    for round in 0..3 {
        let server = two_balanced_workers();
        let workers = server.wait_workers(2, READY_TIMEOUT);
        // Idle means idle: the spare (and its holder) booted, not booting beside the burst.
        server.wait_spare_standing_by(READY_TIMEOUT);
        before_burst(&server);
        let (clients, taken) = burst(&server.addr(), BURST);
        let most = taken.values().copied().max().unwrap_or(0);
        assert!(
            most <= BURST / 2 + SLACK,
            "round {round}: one worker took {most} of {BURST} connections: {taken:?} (workers \
             {workers:?})"
        );
        // Deferrals (usually the spread's doing; on a busy machine the kernel may spread a burst
        // by itself) left the reactor by taking the listener's registration out of the epoll
        // instance and putting it back, not by the slower fallback.
        assert_eq!(
            server.log.find("leaving it by a duplicate"),
            None,
            "round {round}: a worker fell back to leaving the reactor by a duplicate"
        );
        drop(clients);
    }
}

#[test]
fn a_stopped_worker_does_not_stop_the_others_from_accepting() {
    // Worker 1 stopped (SIGSTOP) while idle: its scoreboard slot still says ready, with no
    // connection, so it is the lighter peer worker 0 would leave new connections to. Worker 0
    // waits a few milliseconds for it to take one, sees its count stay, passes it over and takes
    // every connection of the burst, and more afterwards.
    let server = two_balanced_workers();
    let workers = server.wait_workers(2, READY_TIMEOUT);
    let (serving, stopped) = (workers[0], workers[1]);
    signal(stopped, Signal::SIGSTOP);
    let is_stopped = poll_until(IO_TIMEOUT, || {
        (proc_info(stopped)?.state == 'T').then_some(())
    });
    assert!(is_stopped.is_some(), "worker {stopped} did not stop");
    // Every request is answered (within the client's IO_TIMEOUT): none waits for the stopped one.
    let (mut clients, taken) = burst(&server.addr(), BURST);
    assert_eq!(
        taken,
        HashMap::from([(serving, BURST)]),
        "the burst went to the serving worker {serving} alone"
    );
    // One at a time too, while it holds all of them: each is taken.
    for _ in 0..4 {
        let mut client = Client::connect(&server.addr()).expect("connect");
        let response = client.get("/").expect("a response");
        assert_eq!(response.worker(), Some(serving));
        clients.push(client);
    }
    // Resumed, the other worker serves again: the kept-alive connections still answer.
    signal(stopped, Signal::SIGCONT);
    for client in &mut clients {
        assert_eq!(client.get("/").expect("a response").status, 200);
    }
}

#[test]
fn connection_churn_starts_no_storm_of_deferrals() {
    // A new connection per request from 16 clients at once: each worker's count wobbles between
    // 0 and a few, often more than twice the other's plus 2 for a moment (a worker accepts what
    // queued while it served). Weighed at every accept, that made the two workers take turns
    // leaving the reactor: about one deferral per 5 connections under wrk, which cost most of
    // the throughput, and 250 for these 4000 connections with a rule that waited only for a run
    // of 3 accepts without a close. A deferral starts only when at most one of this worker's
    // connections closed in the last 5 ms: churn closes one every few hundred microseconds.
    const CLIENTS: usize = 16;
    const EACH: usize = 250;
    let server = two_balanced_workers();
    server.wait_workers(2, READY_TIMEOUT);
    let report = load(
        &server.addr(),
        "/",
        CLIENTS,
        EACH,
        false,
        Duration::from_secs(60),
    );
    assert!(report.errors.is_empty(), "errors: {:?}", report.errors);
    assert_eq!(report.status(200), CLIENTS * EACH, "{report:?}");
    let deferrals = server.log.count(DEFERRAL);
    assert!(
        deferrals * 100 <= CLIENTS * EACH,
        "{deferrals} deferrals for {} connections (workers {:?})",
        CLIENTS * EACH,
        report.by_worker
    );
}
