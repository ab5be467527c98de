//! The Prometheus endpoint served by the monitor: content checked against the tree and our own
//! load, the accept-queue depth of real listeners (TCP and unix) with a stuck worker, hostile
//! clients, and a bind error.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use common::metrics::metrics_addr;
use common::*;

/// One sample: metric name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Sample {
    fn label(&self, key: &str) -> &str {
        self.labels.get(key).map(String::as_str).unwrap_or("")
    }
}

/// Parses the text exposition format strictly enough to catch a malformed line.
fn parse(text: &str) -> Vec<Sample> {
    let mut typed = BTreeMap::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(["gauge", "counter"].contains(&kind), "{line}");
            typed.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(
            !line.is_empty() && !line.starts_with('#'),
            "unexpected line {line:?}"
        );
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        assert!(value.is_finite());
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                let mut labels = BTreeMap::new();
                let mut chars = body.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                    assert_eq!(chars.next(), Some('"'), "{line:?}");
                    let mut value = String::new();
                    loop {
                        match chars
                            .next()
                            .unwrap_or_else(|| panic!("unterminated value in {line:?}"))
                        {
                            '\\' => value.push(match chars.next() {
                                Some('n') => '\n',
                                Some(c) => c,
                                None => panic!("{line:?}"),
                            }),
                            '"' => break,
                            c => value.push(c),
                        }
                    }
                    labels.insert(key, value);
                    if chars.peek() == Some(&',') {
                        chars.next();
                    }
                }
                (name.to_string(), labels)
            }
        };
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line:?}"
        );
        assert!(
            typed.contains_key(&name),
            "sample before its # TYPE: {line:?}"
        );
        if typed[&name] == "counter" {
            assert!(
                name.ends_with("_total"),
                "a counter is named *_total: {name}"
            );
        }
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

fn scrape(server: &Server) -> Vec<Sample> {
    let r = get(&Addr::Tcp(metrics_addr(server)), "/metrics")
        .unwrap_or_else(|e| panic!("scrape: {e}; log:\n{}", server.log.text()));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    parse(&r.text())
}

fn samples<'a>(all: &'a [Sample], name: &str) -> Vec<&'a Sample> {
    all.iter().filter(|s| s.name == name).collect()
}

fn value(all: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    all.iter()
        .find(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == *v))
        .map(|s| s.value)
}

/// `tine serve ARGS` with metrics on a free loopback port, listening on a free loopback TCP port
/// and on the unix socket `DIR/http.sock`: the tree and the socket's path.
fn start_on_tcp_and_unix(dir: &TempDir, args: &[&str]) -> (Server, PathBuf) {
    let unix = dir.join("http.sock");
    let server = Launch::tine()
        .args(args)
        .args(["--metrics-listen", "127.0.0.1:0"])
        .args(["--listen", "127.0.0.1:0"])
        .arg("--listen")
        .arg(format!("unix:{}", unix.display()))
        .start();
    (server, unix)
}

#[test]
fn metrics_describe_the_tree_and_the_load() {
    let dir = TempDir::new();
    let (server, unix) = start_on_tcp_and_unix(
        &dir,
        &["--workers", "2", "--debug-headers", "--backlog", "77"],
    );
    let workers = server.wait_workers(2, READY_TIMEOUT);
    let tcp = Addr::Tcp(server.tcp_addr());
    let report = load(&tcp, "/", 2, 25, false, Duration::from_secs(30));
    assert_eq!(report.status(200), 50, "{report:?}");

    let m = scrape(&server);
    assert_eq!(value(&m, "tine_up", &[]), Some(1.0));
    assert_eq!(value(&m, "tine_workers_target", &[]), Some(2.0));
    assert_eq!(
        value(
            &m,
            "tine_workers",
            &[("state", "ready"), ("generation", "0")]
        ),
        Some(2.0)
    );
    assert_eq!(value(&m, "tine_generation", &[]), Some(0.0));
    assert_eq!(value(&m, "tine_requests_total", &[]), Some(50.0));
    assert_eq!(value(&m, "tine_reforks_total", &[]), Some(0.0));
    assert!(
        samples(&m, "tine_restarts_total").is_empty(),
        "no restarts yet"
    );
    let per_worker = samples(&m, "tine_worker_requests_total");
    assert_eq!(per_worker.iter().map(|s| s.value).sum::<f64>(), 50.0);
    let mut pids: Vec<i32> = per_worker
        .iter()
        .map(|s| s.label("pid").parse().unwrap())
        .collect();
    pids.sort();
    let mut expected = workers.clone();
    expected.sort();
    assert_eq!(pids, expected);

    // Memory of every process of the tree, with its role.
    for pid in server.all_pids() {
        let of = |name: &str| {
            samples(&m, name)
                .into_iter()
                .find(|s| s.label("pid") == pid.to_string())
                .unwrap_or_else(|| panic!("no {name} for pid {pid}"))
                .clone()
        };
        let (rss, pss, uss) = (
            of("tine_process_resident_memory_bytes"),
            of("tine_process_pss_bytes"),
            of("tine_process_uss_bytes"),
        );
        assert!(
            uss.value > 0.0 && uss.value <= pss.value && pss.value <= rss.value,
            "{rss:?} {pss:?} {uss:?}"
        );
        let role = rss.label("role");
        assert!(
            ["monitor", "mold", "worker", "spare"].contains(&role),
            "{rss:?}"
        );
        assert_eq!(role == "worker", !rss.label("nr").is_empty(), "{rss:?}");
        assert_eq!(role == "monitor", pid == server.pid);
    }

    // Both listeners, idle, with their configured backlog as the limit.
    for listener in [
        server.tcp_addr().to_string(),
        format!("unix:{}", unix.display()),
    ] {
        assert_eq!(
            value(&m, "tine_listen_queue_length", &[("listener", &listener)]),
            Some(0.0),
            "{listener}"
        );
        assert_eq!(
            value(&m, "tine_listen_queue_limit", &[("listener", &listener)]),
            Some(77.0),
            "{listener}"
        );
    }

    // A killed worker: a restart by reason, and the total keeps what the dead worker served.
    server.ctl(&["kill-worker", "0"]).expect("kill-worker");
    let replaced = poll_until(Duration::from_secs(10), || {
        let w = server.workers();
        (w.len() == 2
            && !w.iter().any(|(_, pid, _)| *pid == workers[0])
            && w.iter().all(|(_, _, s)| s == "ready"))
        .then_some(w)
    });
    assert!(
        replaced.is_some(),
        "worker 0 replaced; log:\n{}",
        server.log.text()
    );
    let m = scrape(&server);
    assert_eq!(
        value(&m, "tine_restarts_total", &[("reason", "ctl_kill_worker")]),
        Some(1.0),
        "{m:?}"
    );
    eprintln!("after the kill: {:?}", samples(&m, "tine_restarts_total"));
    assert_eq!(
        value(&m, "tine_requests_total", &[]),
        Some(50.0),
        "the total counts exited workers too"
    );
    assert_eq!(
        value(
            &m,
            "tine_workers",
            &[("state", "ready"), ("generation", "0")]
        ),
        Some(2.0)
    );
    assert!(!samples(&m, "tine_process_pss_bytes")
        .iter()
        .any(|s| s.label("pid") == workers[0].to_string()));
}

#[test]
fn listen_queue_depth_shows_connections_waiting_behind_a_stuck_worker() {
    // One worker, stuck in /spin (the hang timeout far away), accepts nothing: new connections
    // wait in the kernel's accept queues, which is what the metric shows.
    let dir = TempDir::new();
    let (server, unix) = start_on_tcp_and_unix(
        &dir,
        &["--workers", "1", "--debug-routes", "--timeout", "60"],
    );
    server.wait_workers(1, READY_TIMEOUT);
    let tcp = server.tcp_addr();
    let spin_addr = Addr::Tcp(tcp);
    let _spin = std::thread::spawn(move || get(&spin_addr, "/spin"));
    let stuck = poll_until(Duration::from_secs(10), || {
        let s = server.status();
        let w = s["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["role"] == "worker")
            .cloned()?;
        (w["oldest_request"] == "GET /spin").then_some(())
    });
    assert!(stuck.is_some(), "the worker took the spin");

    let waiting_tcp: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(tcp).unwrap()).collect();
    let waiting_unix: Vec<UnixStream> = (0..3)
        .map(|_| UnixStream::connect(&unix).unwrap())
        .collect();
    let unix_label = format!("unix:{}", unix.display());
    let seen = poll_until(Duration::from_secs(5), || {
        let m = scrape(&server);
        let t = value(
            &m,
            "tine_listen_queue_length",
            &[("listener", &tcp.to_string())],
        )?;
        let u = value(&m, "tine_listen_queue_length", &[("listener", &unix_label)])?;
        (t == 5.0 && u == 3.0).then_some((t, u))
    });
    assert!(
        seen.is_some(),
        "queue depths 5 (tcp) and 3 (unix): last scrape {:?}",
        {
            let m = scrape(&server);
            samples(&m, "tine_listen_queue_length")
                .into_iter()
                .cloned()
                .collect::<Vec<_>>()
        }
    );
    // The stuck request shows in the worker's series.
    let m = scrape(&server);
    assert_eq!(
        value(&m, "tine_worker_requests_in_flight", &[("nr", "0")]),
        Some(1.0)
    );
    assert!(value(&m, "tine_worker_oldest_request_seconds", &[("nr", "0")]).unwrap() > 0.0);
    assert_eq!(
        value(
            &m,
            "tine_workers",
            &[("state", "busy"), ("generation", "0")]
        ),
        Some(1.0)
    );
    drop(waiting_tcp);
    drop(waiting_unix);
}

#[test]
fn hostile_metrics_clients_get_errors_and_never_stall_the_monitor() {
    let server = Launch::tine()
        .args(["--workers", "1", "--metrics-listen", "127.0.0.1:0"])
        .start();
    let addr = Addr::Tcp(metrics_addr(&server));
    let status = |bytes: &[u8]| {
        raw_request(&addr, bytes)
            .map(|r| r.status)
            .unwrap_or_else(|e| panic!("{bytes:?}: {e}"))
    };

    // Idle clients first (more than the server keeps), left connected throughout.
    let idle: Vec<TcpStream> = (0..24)
        .map(|_| TcpStream::connect(metrics_addr(&server)).unwrap())
        .collect();
    let mut partial = TcpStream::connect(metrics_addr(&server)).unwrap();
    partial.write_all(b"GET /metr").unwrap();

    assert_eq!(status(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"), 404);
    let r = raw_request(
        &addr,
        b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    )
    .unwrap();
    assert_eq!((r.status, r.header("allow")), (405, Some("GET")));
    assert_eq!(status(b"garbage\r\n\r\n"), 400);
    assert_eq!(status(b"GET /metrics\r\n\r\n"), 400);
    assert_eq!(status(b"GET /metrics HTTP/9.9\r\n\r\n"), 400);
    assert_eq!(status(b"G\xffT /metrics HTTP/1.1\r\n\r\n"), 400);
    assert_eq!(status(b"\r\n\r\n"), 400);
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    assert_eq!(status(huge.as_bytes()), 400);
    // A head without its blank line, then the client closes: no answer, no harm.
    let mut c = TcpStream::connect(metrics_addr(&server)).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
    drop(c);

    // With all of that going on, a real scrape works, and so does everything else.
    assert_eq!(value(&scrape(&server), "tine_up", &[]), Some(1.0));
    assert_eq!(status(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), 200);
    assert!(!gone(server.pid));
    assert_eq!(server.get("/").status, 200);
    assert!(server.ctl(&["status"]).is_ok());
    assert_eq!(server.log.count("killing"), 0);
    drop(idle);
    drop(partial);
}

#[test]
fn a_metrics_address_in_use_is_a_config_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let finished = Launch::tine()
        .args(["--workers", "1", "--metrics-listen", &addr])
        .run(Duration::from_secs(20));
    let err = finished.stderr_text();
    assert_eq!(finished.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("cannot listen on metrics_listen {addr}")),
        "{err}"
    );
    assert!(
        finished.pipes_closed && !err.contains("forked mold"),
        "nothing started: {err}"
    );
}
