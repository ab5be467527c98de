//! Driver of bench/respawn: the time from `kill -9` of a busy worker to the first response served
//! by another process, for tine (with and without a hot spare) and for nginx.
//!
//! One worker serves, so every request waits for the replacement: `--clients` kept-alive
//! connections send `GET /` in a loop (the worker is busy when it dies) and each reconnects at
//! once after a failure. Each round reads the pid that served the latest response
//! (`x-tine-worker`, tine's `--debug-headers`; nginx adds the same header from `$pid`),
//! SIGKILLs it, and stops the clock at the end of the first response that names another pid.
//! Between rounds the tree settles (tine: a spare stands by again, if any).
//!
//! Two measures, from alternate kills of the same run (`--probe alternate`, the default):
//! - **kept-alive** (kills without a probe): the first response by another pid on one of the
//!   kept-alive clients' connections. Those clients were talking to the killed worker, so they
//!   learn of its death only when the kernel resets their connections, which it does after it
//!   has torn the dead process's memory down (~0.4-0.7 ms on the 2-vCPU VM of
//!   bench/results/respawn.md, for tine and nginx alike): that is part of what they wait for.
//! - **new connection** (kills with a probe): right after `kill` returns, this thread opens a new
//!   connection and sends `GET /`, as the next client of a busy server would; the clock stops at
//!   the end of its response if another pid sent it. A probe whose connection fails or that the
//!   dying worker still answered (it can accept in the instant before the signal lands) connects
//!   again at once (`probe_retries`). This is the replacement *serving*: the time until a new
//!   client is answered by it, without the dead worker's teardown on the client's side.
//!
//! ```text
//! cargo build --release --example respawn_bench
//! target/release/examples/respawn_bench --server tine --tine target/release/tine --spares 1
//! target/release/examples/respawn_bench --server nginx
//! ```
//! Prints one JSON line of results; bench/respawn/run.sh runs the variants and writes the report.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The round under way: whom we killed and when, and the first response from anyone else.
#[derive(Default)]
struct Round {
    victim: i32,
    killed: Option<Instant>,
    first: Option<(Instant, i32)>,
    /// `--timeline`: CLOCK_MONOTONIC (µs) just before the kill, when a client first saw its
    /// connection fail, and at the end of the first response by another process.
    kill_us: u64,
    reset_us: u64,
    first_us: u64,
}

struct Shared {
    stop: AtomicBool,
    round: Mutex<Round>,
    /// The pid of the latest response, and when it came.
    latest: Mutex<Option<(Instant, i32)>>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| default.to_string())
    };
    let server = opt("--server", "tine");
    let rounds: usize = opt("--rounds", "50").parse().expect("--rounds N");
    let clients: usize = opt("--clients", "4").parse().expect("--clients N");
    let spares = opt("--spares", "1");
    let tine = opt("--tine", "target/release/tine");
    // `--timeline FILE`: tine logs its `tine::respawn` debug lines to FILE (stderr), and the
    // result carries each round's client-side timestamps, for bench/respawn/timeline.py.
    let timeline = opt("--timeline", "");
    // Which kills also get a new-connection probe: alternate (odd rounds), always, never.
    let probe = match opt("--probe", "alternate").as_str() {
        "alternate" => Probe::Alternate,
        "always" => Probe::Always,
        "never" => Probe::Never,
        other => panic!("--probe alternate|always|never, not {other}"),
    };
    // `--server-cpus LIST`: the server runs on these CPUs only (through `taskset -c LIST`), as in
    // bench/peers' pinned phase; pin the driver to the others (`taskset -c` in ab.sh) so that the
    // clients' wake-ups do not wait for the server's CPUs. Empty: shared CPUs. (The worker count,
    // whose default follows the CPUs tine may use, is given: one. A worker's runtime threads
    // default to one either way.)
    let server_cpus = opt("--server-cpus", "");
    let launch = |program: &str| {
        if server_cpus.is_empty() {
            Command::new(program)
        } else {
            let mut c = Command::new("taskset");
            c.args(["-c", &server_cpus, program]);
            c
        }
    };
    let work = std::env::temp_dir().join(format!("respawn-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("work dir");
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let control = work.join("ctl.sock");
    let mut child = match server.as_str() {
        "tine" => launch(&tine)
            .args([
                "serve",
                "--workers",
                "1",
                "--debug-headers",
                "--log-level",
                if timeline.is_empty() {
                    "warn"
                } else {
                    "warn,tine::respawn=debug"
                },
            ])
            .args(["--spare-workers", &spares])
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--control-socket")
            .arg(&control)
            .stdout(Stdio::null())
            .stderr(if timeline.is_empty() {
                Stdio::null()
            } else {
                Stdio::from(std::fs::File::create(&timeline).expect("--timeline FILE"))
            })
            .spawn()
            .expect("start tine"),
        "nginx" => start_nginx(launch("nginx"), &work, port),
        other => panic!("--server tine|nginx, not {other}"),
    };
    let result = std::panic::catch_unwind(|| {
        run(
            &server,
            addr,
            &control,
            rounds,
            clients,
            spares.parse().unwrap_or(0),
            probe,
        )
    });
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&work);
    // What the line cannot tell otherwise: where the server ran, and the holder setting it got
    // from this environment (bench/respawn/ab.sh's ENV_A/ENV_B).
    let setup = format!(
        "\"server_cpus\":\"{server_cpus}\",\"tine_teardown_holder\":\"{}\",",
        std::env::var("TINE_TEARDOWN_HOLDER").unwrap_or_else(|_| "default".into())
    );
    match result {
        Ok(line) => println!("{{{setup}{}", &line[1..]),
        Err(_) => std::process::exit(1),
    }
}

/// Which kills get a new-connection probe (see the crate doc).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Probe {
    Alternate,
    Always,
    Never,
}

impl Probe {
    fn in_round(self, round: usize) -> bool {
        match self {
            Probe::Alternate => round % 2 == 1,
            Probe::Always => true,
            Probe::Never => false,
        }
    }
}

/// A new connection's answer after the kill: when it ended, who sent it, and how many
/// connections it took (failed or answered by the victim before).
struct Probed {
    at: Instant,
    at_us: u64,
    pid: i32,
    retries: u32,
}

/// Opens a new connection at once, again and again, until a process other than `victim`
/// answers `GET /` on it (or `deadline` passes).
fn probe_new_connection(addr: SocketAddr, victim: i32, deadline: Instant) -> Option<Probed> {
    let mut buf = vec![0u8; 4096];
    let mut retries = 0;
    while Instant::now() < deadline {
        let answered = TcpStream::connect(addr).ok().and_then(|mut s| {
            let _ = s.set_nodelay(true);
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            exchange(&mut s, &mut buf)
        });
        match answered {
            Some(pid) if pid != victim => {
                return Some(Probed {
                    at: Instant::now(),
                    at_us: monotonic_us(),
                    pid,
                    retries,
                })
            }
            _ => retries += 1,
        }
    }
    None
}

/// Percentile `p` of `xs` (nearest rank; NaN when empty).
fn percentile(xs: &[f64], p: f64) -> f64 {
    let mut sorted = xs.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn join_us(xs: &[f64]) -> String {
    xs.iter()
        .map(|s| format!("{s:.0}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn run(
    server: &str,
    addr: SocketAddr,
    control: &std::path::Path,
    rounds: usize,
    clients: usize,
    spares: usize,
    probe: Probe,
) -> String {
    wait_until(Duration::from_secs(20), "the server answers", || {
        response_pid(addr).is_some()
    });
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        round: Mutex::new(Round::default()),
        latest: Mutex::new(None),
    });
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let shared = shared.clone();
            std::thread::spawn(move || client(addr, &shared))
        })
        .collect();
    // Kept-alive measure (kills without a probe) and new-connection measure (kills with one).
    let mut samples_us = Vec::new();
    let mut probe_samples_us = Vec::new();
    let mut timeline_rounds = Vec::new();
    let (mut failures, mut probe_failures, mut probe_retries) = (0, 0, 0);
    for round in 0..rounds {
        settle(server, control, spares, &shared);
        let Some((_, victim)) = *shared.latest.lock().unwrap() else {
            failures += 1;
            continue;
        };
        let probing = probe.in_round(round);
        let killed = {
            let mut r = shared.round.lock().unwrap();
            *r = Round {
                victim,
                ..Round::default()
            };
            r.killed = Some(Instant::now());
            r.kill_us = monotonic_us();
            // Under the lock: no response is judged before the clock starts.
            kill(Pid::from_raw(victim), Signal::SIGKILL).expect("kill the worker");
            r.killed.unwrap()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let probed = if probing {
            let p = probe_new_connection(addr, victim, deadline);
            match &p {
                Some(p) => {
                    probe_samples_us.push(p.at.duration_since(killed).as_secs_f64() * 1e6);
                    probe_retries += p.retries;
                }
                None => probe_failures += 1,
            }
            p
        } else {
            None
        };
        let took = loop {
            let r = shared.round.lock().unwrap();
            if let (Some(k), Some((t, pid))) = (r.killed, r.first) {
                let (probe_pid, probe_first_us) =
                    probed.as_ref().map_or((0, 0), |p| (p.pid, p.at_us));
                timeline_rounds.push(format!(
                    "{{\"victim\":{},\"pid\":{pid},\"kill_us\":{},\"reset_us\":{},\"first_us\":{},\
                     \"probe\":{probing},\"probe_pid\":{probe_pid},\"probe_first_us\":{probe_first_us}}}",
                    r.victim, r.kill_us, r.reset_us, r.first_us
                ));
                break Some(t.duration_since(k));
            }
            drop(r);
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        match took {
            // In a probe round the kept-alive clients queue behind the probe: not their measure.
            Some(d) if !probing => samples_us.push(d.as_secs_f64() * 1e6),
            Some(_) => {}
            None => failures += 1,
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    // JSON has no NaN: a measure without samples is null.
    let us = |x: f64| {
        if x.is_nan() {
            "null".to_string()
        } else {
            format!("{x:.0}")
        }
    };
    let pct = |p: f64| us(percentile(&samples_us, p));
    let probe_pct = |p: f64| us(percentile(&probe_samples_us, p));
    format!(
        "{{\"server\":\"{server}\",\"spares\":{},\"rounds\":{rounds},\"failures\":{failures},\
         \"clients\":{clients},\"median_us\":{},\"p10_us\":{},\"p90_us\":{},\
         \"min_us\":{},\"max_us\":{},\"samples_us\":[{}],\
         \"probe_failures\":{probe_failures},\"probe_retries\":{probe_retries},\
         \"probe_median_us\":{},\"probe_p10_us\":{},\"probe_p90_us\":{},\
         \"probe_samples_us\":[{}],\"rounds_timeline\":[{}]}}",
        if server == "tine" { spares } else { 0 },
        pct(0.5),
        pct(0.1),
        pct(0.9),
        pct(0.0),
        pct(1.0),
        join_us(&samples_us),
        probe_pct(0.5),
        probe_pct(0.1),
        probe_pct(0.9),
        join_us(&probe_samples_us),
        timeline_rounds.join(",")
    )
}

/// Waits for the tree to be steady again: a new worker serving for a while and, for tine with
/// spares, a spare standing by.
fn settle(server: &str, control: &std::path::Path, spares: usize, shared: &Shared) {
    let since = Instant::now();
    wait_until(Duration::from_secs(20), "a response after the kill", || {
        shared
            .latest
            .lock()
            .unwrap()
            .is_some_and(|(t, _)| t > since)
    });
    if server == "tine" && spares > 0 {
        wait_until(Duration::from_secs(20), "a spare standing by", || {
            spare_standing_by(control)
        });
    }
    std::thread::sleep(Duration::from_millis(300));
}

/// Whether `ctl status --json` (read straight from the control socket) shows a spare in standby.
fn spare_standing_by(control: &std::path::Path) -> bool {
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(control) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"status --json\n").is_err() {
        return false;
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply.contains("\"role\":\"spare\"") && reply.contains("\"state\":\"standby\"")
}

/// One kept-alive client: `GET /` in a loop; reconnects at once after any failure.
fn client(addr: SocketAddr, shared: &Shared) {
    let mut conn: Option<TcpStream> = None;
    let mut buf = vec![0u8; 4096];
    while !shared.stop.load(Ordering::Relaxed) {
        let stream = match conn.as_mut() {
            Some(s) => s,
            None => match TcpStream::connect(addr) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    conn.insert(s)
                }
                Err(_) => continue,
            },
        };
        match exchange(stream, &mut buf) {
            Some(pid) => {
                let now = Instant::now();
                *shared.latest.lock().unwrap() = Some((now, pid));
                let mut r = shared.round.lock().unwrap();
                if r.killed.is_some() && r.first.is_none() && pid != r.victim {
                    r.first = Some((now, pid));
                    r.first_us = monotonic_us();
                }
            }
            None => {
                let mut r = shared.round.lock().unwrap();
                if r.killed.is_some() && r.reset_us == 0 {
                    r.reset_us = monotonic_us();
                }
                conn = None
            }
        }
    }
}

/// Sends one `GET /` and reads the response: the pid in `x-tine-worker`.
fn exchange(stream: &mut TcpStream, buf: &mut [u8]) -> Option<i32> {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        .ok()?;
    let mut have = 0;
    loop {
        let n = stream.read(&mut buf[have..]).ok()?;
        if n == 0 {
            return None;
        }
        have += n;
        let text = std::str::from_utf8(&buf[..have]).ok()?;
        let Some(end) = text.find("\r\n\r\n") else {
            continue;
        };
        let head = text[..end].to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())?;
        if have < end + 4 + length {
            continue;
        }
        return head
            .lines()
            .find_map(|l| l.strip_prefix("x-tine-worker:"))
            .and_then(|v| v.trim().parse().ok());
    }
}

/// CLOCK_MONOTONIC in µs, the clock of tine's `tine::respawn` debug lines.
fn monotonic_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}

fn response_pid(addr: SocketAddr) -> Option<i32> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    exchange(&mut s, &mut [0u8; 4096])
}

fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn start_nginx(mut nginx: Command, work: &std::path::Path, port: u16) -> Child {
    let p = work.join("nginx");
    std::fs::create_dir_all(p.join("logs")).expect("nginx dir");
    std::fs::create_dir_all(p.join("tmp")).expect("nginx dir");
    let p = p.display();
    let conf = format!(
        "worker_processes 1;
daemon off;
master_process on;
pid {p}/nginx.pid;
error_log {p}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 100000;
    default_type text/plain;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ add_header x-tine-worker $pid always; return 200 \"hello\\n\"; }}
    }}
}}
"
    );
    let path = work.join("nginx.conf");
    std::fs::write(&path, conf).expect("nginx.conf");
    nginx
        .arg("-p")
        .arg(work.join("nginx"))
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(work.join("nginx/logs/error.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx")
}
