//! An app built with `tokio = { features = ["full"] }` (`examples/tokio_full.rs`: `tokio::signal`
//! and `tokio::process` in its handlers, a runtime built and dropped in `preload`) is reforked 50
//! times under load: every generation becomes ready and serves both routes, and no request is lost
//! (docs/FORK_SAFETY.md, "Runtimes").
//!
//! Before the fix, the workers closed tokio's signal self-pipe, which `preload`'s runtime had
//! left in a static: no runtime could be built (EINVAL or EBADF), and no worker ever served.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{poll_until, Addr, Launch, Server};

const WORKERS: usize = 2;
const REFORKS: u64 = 50;
/// Longest wait for one refork's new generation to be ready (debug build, 2 busy cores).
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(20);
/// The whole test's bound: the load stops by itself after this.
const LOAD_LIMIT: Duration = Duration::from_secs(150);

/// The worker pids of `generation` once the tree is exactly its mold and `WORKERS` ready workers.
fn wait_generation(server: &Server, generation: u64) -> Vec<i32> {
    let mut last = serde_json::Value::Null;
    let found = poll_until(ROLLOUT_TIMEOUT, || {
        last = server.status();
        let processes: Vec<_> = last["processes"]
            .as_array()?
            .iter()
            .filter(|p| p["role"] != "monitor")
            .collect();
        let of_generation = |p: &&&serde_json::Value| p["generation"].as_u64() == Some(generation);
        let molds = processes
            .iter()
            .filter(|p| p["role"] == "mold" && p["state"] == "mold")
            .filter(of_generation)
            .count();
        let workers: Vec<i32> = processes
            .iter()
            .filter(|p| p["role"] == "worker" && (p["state"] == "ready" || p["state"] == "busy"))
            .filter(of_generation)
            .filter_map(|p| p["pid"].as_i64().map(|pid| pid as i32))
            .collect();
        (processes.len() == WORKERS + 1 && molds == 1 && workers.len() == WORKERS)
            .then_some(workers)
    });
    found.unwrap_or_else(|| {
        panic!(
            "gen:{generation} not ready with {WORKERS} workers within {ROLLOUT_TIMEOUT:?}: {last}\nlog:\n{}",
            server.log.text()
        )
    })
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

/// What the load saw.
#[derive(Debug, Default)]
struct LoadReport {
    answered: u64,
    by_status: BTreeMap<u16, u64>,
    lost: Vec<String>,
}

/// Client threads, each sending `GET path` on a fresh connection in a loop (a request sent and not
/// answered is lost), until stopped or `LOAD_LIMIT`.
struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    report: Arc<Mutex<LoadReport>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(addr: &Addr, paths: &[&'static str]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let report = Arc::new(Mutex::new(LoadReport::default()));
        let threads = paths
            .iter()
            .map(|&path| {
                let (addr, stop, answered, report) =
                    (addr.clone(), stop.clone(), answered.clone(), report.clone());
                std::thread::spawn(move || {
                    let until = Instant::now() + LOAD_LIMIT;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                        let outcome = common::get(&addr, path);
                        let mut report = report.lock().unwrap();
                        match outcome {
                            Ok(response) => {
                                answered.fetch_add(1, Ordering::Relaxed);
                                report.answered += 1;
                                *report.by_status.entry(response.status).or_default() += 1;
                            }
                            Err(e) => report.lost.push(format!("GET {path}: {e}")),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            answered,
            report,
            threads,
        }
    }

    fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("load thread");
        }
        std::mem::take(&mut *self.report.lock().unwrap())
    }
}

#[test]
fn tokio_full_app_survives_50_reforks_under_load() {
    let started = Instant::now();
    let server = Launch::example("tokio_full")
        .args(["--workers", &WORKERS.to_string(), "--debug-headers"])
        .start();
    let workers = wait_generation(&server, 0);
    routes_work(&server, 0, &workers);
    let load = Load::start(&server.addr(), &["/", "/", "/process", "/signal"]);
    poll_until(Duration::from_secs(10), || {
        (load.answered() > 20).then_some(())
    })
    .expect("the load is answered");
    let mut previous = load.answered();
    for generation in 1..=REFORKS {
        server.ctl(&["refork"]).expect("ctl refork");
        let workers = wait_generation(&server, generation);
        if [1, 2, 10, 25, REFORKS].contains(&generation) {
            routes_work(&server, generation, &workers);
        }
        // Every generation serves the load too, not only the checks above.
        let now = poll_until(Duration::from_secs(10), || {
            let now = load.answered();
            (now > previous).then_some(now)
        });
        previous = now.unwrap_or_else(|| panic!("no load answered in gen:{generation}"));
    }
    let report = load.stop();
    let elapsed = started.elapsed();
    eprintln!(
        "{REFORKS} reforks in {elapsed:?}: {} answered {:?}, {} lost",
        report.answered,
        report.by_status,
        report.lost.len()
    );
    assert!(
        report.lost.is_empty(),
        "lost requests: {:?}\nlog:\n{}",
        report.lost,
        server.log.text()
    );
    assert_eq!(
        report.by_status.keys().collect::<Vec<_>>(),
        [&200],
        "every answer a 200"
    );
    assert_eq!(
        server.log.count("cannot build the runtime"),
        0,
        "log:\n{}",
        server.log.text()
    );
}
