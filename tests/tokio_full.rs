//! An app built with `tokio = { features = ["full"] }` (`examples/tokio_full.rs`: `tokio::signal`
//! and `tokio::process` in its handlers, a runtime built and dropped in `preload`) is reforked 50
//! times under strict load (POSTs never retried), then reloaded and reforked once more: every
//! generation becomes ready and serves both routes, its processes share no socket but the
//! listeners, and no request is lost
//! (docs/FORK_SAFETY.md, "Runtimes").
//!
//! Before the fix, the workers closed tokio's signal self-pipe, which `preload`'s runtime had
//! left in a static: no runtime could be built (EINVAL or EBADF), and no worker ever served. With
//! the self-pipe kept but shared by the mold and its workers, a worker's own SIGUSR1 is not
//! delivered (a sibling reads the wake-up); with the signal actions reset in the workers, the
//! workers of a reforked generation die of the signal.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::strict::{StrictLoad, StrictReport};
use common::{poll_until, Launch, Server};
use nix::sys::signal::Signal;

const WORKERS: usize = 2;
const REFORKS: u64 = 50;
/// Longest wait for one refork's new generation to be ready (debug build, 2 busy cores).
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(20);
/// The load's bound: it stops by itself after this.
const LOAD_LIMIT: Duration = Duration::from_secs(150);

/// One generation, once ready.
struct Generation {
    mold: i32,
    workers: Vec<i32>,
}

/// `generation` once the tree is exactly its mold, `WORKERS` ready workers and a spare.
fn wait_generation(server: &Server, generation: u64) -> Generation {
    let mut last = serde_json::Value::Null;
    let found = poll_until(ROLLOUT_TIMEOUT, || {
        last = server.status();
        let processes: Vec<_> = last["processes"]
            .as_array()?
            .iter()
            .filter(|p| p["role"] != "monitor")
            .collect();
        let of_generation = |p: &&&serde_json::Value| p["generation"].as_u64() == Some(generation);
        let pids = |role: &str, states: &[&str]| -> Vec<i32> {
            processes
                .iter()
                .filter(|p| p["role"] == role && states.iter().any(|s| p["state"] == *s))
                .filter(of_generation)
                .filter_map(|p| p["pid"].as_i64().map(|pid| pid as i32))
                .collect()
        };
        let molds = pids("mold", &["mold"]);
        let workers = pids("worker", &["ready", "busy"]);
        // And the hot spare (spare_workers 1 by default), refreshed from the mold.
        let spares = pids("spare", &["standby"]);
        (processes.len() == WORKERS + 2
            && molds.len() == 1
            && workers.len() == WORKERS
            && spares.len() == 1)
            .then(|| Generation {
                mold: molds[0],
                workers,
            })
    });
    found.unwrap_or_else(|| {
        panic!(
            "gen:{generation} not ready with {WORKERS} workers within {ROLLOUT_TIMEOUT:?}: {last}\nlog:\n{}",
            server.log.text()
        )
    })
}

/// The sockets (`socket:[inode]`) that process `pid` holds.
fn sockets(pid: i32) -> BTreeSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|entry| std::fs::read_link(entry.path()).ok())
                .map(|target| target.to_string_lossy().into_owned())
                .filter(|target| target.starts_with("socket:"))
                .collect()
        })
        .unwrap_or_default()
}

/// The only sockets a generation's processes share with each other are the listeners (which the
/// monitor holds too): not the mold's channel, not a sibling's, and not tokio's signal self-pipe,
/// which each worker has a copy of its own.
fn shares_only_listeners(server: &Server, generation: u64, g: &Generation) {
    let [first, second] = g.workers[..] else {
        panic!("{WORKERS} workers expected: {:?}", g.workers)
    };
    let listeners: BTreeSet<String> = sockets(server.pid)
        .intersection(&sockets(first))
        .cloned()
        .collect();
    assert!(!listeners.is_empty(), "a worker holds the listener");
    for (a, b, what) in [
        (first, second, "two workers"),
        (g.mold, first, "the mold and a worker"),
        (g.mold, second, "the mold and a worker"),
    ] {
        let shared: BTreeSet<String> = sockets(a).intersection(&sockets(b)).cloned().collect();
        assert_eq!(
            shared, listeners,
            "gen:{generation}: {what} ({a}, {b}) share sockets besides the listeners"
        );
    }
}

/// `/process` and `/signal` answer correctly, from workers of the current generation.
fn routes_work(server: &Server, generation: u64, workers: &[i32]) {
    for (path, expected) in [
        ("/process", "exit status: 0\n"),
        ("/signal", "received SIGUSR1\n"),
        (
            "/preload",
            "preload ran `true` (exit status: 0) and computed 42\n",
        ),
    ] {
        for _ in 0..4 {
            let response = server.get(path);
            assert_eq!(
                (response.status, response.text().as_str()),
                (200, expected),
                "GET {path} in gen:{generation}"
            );
            let pid: i32 = response
                .header("x-tine-worker")
                .and_then(|v| v.parse().ok())
                .expect("x-tine-worker header");
            assert!(
                workers.contains(&pid),
                "GET {path} answered by {pid}, not a gen:{generation} worker {workers:?}"
            );
        }
    }
}

/// What 50 reforks under strict load saw.
struct Run {
    server: Server,
    /// One report per route, in `ROUTES`' order.
    reports: Vec<StrictReport>,
}

/// Routes under load, with their number of strict connections: 16 in all, so every refork finds
/// each worker holding several kept-alive connections with requests in flight.
const ROUTES: [(&str, usize); 3] = [("/", 10), ("/process", 2), ("/signal", 4)];

/// Starts the example, reforks it `REFORKS` times under strict load, each time waiting for the new
/// generation to be ready and to serve, and checking the routes in a few generations.
fn reforks_under_strict_load() -> Run {
    let started = Instant::now();
    let server = Launch::example("tokio_full")
        .args(["--workers", &WORKERS.to_string(), "--debug-headers"])
        .start();
    let g = wait_generation(&server, 0);
    routes_work(&server, 0, &g.workers);
    shares_only_listeners(&server, 0, &g);
    // Strict clients (POSTs on kept-alive connections, never retried) on every route: a promoted
    // worker has spawned children and has tokio's SIGUSR1 handler installed before it forks the
    // next generation.
    let addr = server.addr();
    let loads: Vec<StrictLoad> = ROUTES
        .into_iter()
        .map(|(path, connections)| StrictLoad::start(&addr, connections, path, LOAD_LIMIT))
        .collect();
    let answered = || loads.iter().map(StrictLoad::answered).sum::<u64>();
    poll_until(Duration::from_secs(10), || (answered() > 20).then_some(()))
        .expect("the load is answered");
    let mut previous = answered();
    let mut slowest = Duration::ZERO;
    for generation in 1..=REFORKS {
        let refork_started = Instant::now();
        server.ctl(&["refork"]).expect("ctl refork");
        let g = wait_generation(&server, generation);
        slowest = slowest.max(refork_started.elapsed());
        if [1, 2, 10, 25, REFORKS].contains(&generation) {
            routes_work(&server, generation, &g.workers);
            shares_only_listeners(&server, generation, &g);
        }
        // Every generation serves the load too, not only the checks above.
        let now = poll_until(Duration::from_secs(10), || {
            let now = answered();
            (now > previous).then_some(now)
        });
        previous = now.unwrap_or_else(|| panic!("no load answered in gen:{generation}"));
    }
    // A reload (HUP: the monitor re-executes itself and forks a fresh generation-0 mold, which
    // learns the runtime's descriptors anew), then one more refork from it.
    server.signal(Signal::SIGHUP);
    let reloaded = wait_generation(&server, REFORKS + 1);
    routes_work(&server, REFORKS + 1, &reloaded.workers);
    server.ctl(&["refork"]).expect("ctl refork");
    let last = wait_generation(&server, REFORKS + 2);
    routes_work(&server, REFORKS + 2, &last.workers);
    shares_only_listeners(&server, REFORKS + 2, &last);
    let reports: Vec<StrictReport> = loads.into_iter().map(StrictLoad::stop).collect();
    eprintln!(
        "{REFORKS} reforks, a reload and a refork in {:?} (slowest of the 50: {slowest:?})",
        started.elapsed()
    );
    for ((path, _), report) in ROUTES.iter().zip(&reports) {
        eprintln!("POST {path}: {}", report.summary());
    }
    Run { server, reports }
}

/// Every generation became ready and served `/process` and `/signal` (checked in
/// `reforks_under_strict_load`), every answer was a 200, no request was lost, and no worker died on
/// the way (a worker whose SIGUSR1 action was reset dies of its own signal).
#[test]
fn tokio_full_app_survives_50_reforks_under_load() {
    let Run { server, reports } = reforks_under_strict_load();
    for ((path, _), report) in ROUTES.iter().zip(&reports) {
        assert_eq!(
            report.by_status.keys().collect::<Vec<_>>(),
            [&200],
            "POST {path}: every answer a 200: {}",
            report.summary()
        );
    }
    let lost: Vec<&String> = reports.iter().flat_map(|r| &r.lost).collect();
    assert!(
        lost.is_empty(),
        "{} lost requests: {lost:?}\nlog:\n{}",
        lost.len(),
        server.log.text()
    );
    for sign_of_trouble in [
        "cannot build the runtime",
        " died",
        "SIGUSR1",
        "self-pipe",
        "left descriptors open",
    ] {
        assert_eq!(
            server.log.count(sign_of_trouble),
            0,
            "{sign_of_trouble:?} in the log:\n{}",
            server.log.text()
        );
    }
}
