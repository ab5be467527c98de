//! tine's reload benchmark (run by `bench/reload/run.sh`): how long an edit takes to be served, and
//! what clients see meanwhile, for three ways of getting it live:
//!
//! - **boot**: `tine serve --watch-boot DIR`; the edited file is read by the app's `boot`, so new
//!   workers are forked from the running mold (no preload, no exec);
//! - **full**: `tine serve --watch DIR`; the edited file is read by `preload`, so the monitor
//!   re-execs in place, forks a fresh mold (preload again) and rolls every worker over;
//! - **restart**: what `cargo watch -x run` and similar tools do: stop the process (`SIGTERM`, a
//!   graceful stop), start it again.
//!
//! The app is `examples/watch_demo` (release build): `GET /` answers the file its `boot` read,
//! `GET /preload` the one its `preload` read, after sleeping `--preload-ms` (standing for an app's
//! expensive start-up). One round: paced background load on `GET /` (half the threads open a
//! connection per request, half keep theirs alive), 300 ms of it, then the file gets a new token at
//! `t0`; a prober polls (a new connection every millisecond) until the answer is the token at `t1`.
//! `t1 - t0` is the number reported. The round ends when the monitor logs that every worker was
//! replaced (or, for restart, when the new tree answers), plus 200 ms of load. Every request of the
//! load is classified: answered (200), refused, reset or closed before a response, timed out, other
//! status. A request sent on a kept-alive connection that the server closed while it was idle is
//! sent again on a new connection, as browsers, curl and Go do; those are counted as retried.
//!
//! The three modes run interleaved, round by round, on three server trees (different ports), so
//! that drift of the machine hits them alike; the first round of each is a warm-up and is dropped.
//! Bounded: every wait has a deadline, every load thread stops by itself after 120 s.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Boot,
    Full,
    Restart,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Boot => "boot",
            Mode::Full => "full",
            Mode::Restart => "restart",
        }
    }
}

struct Args {
    exe: PathBuf,
    repo: PathBuf,
    workers: usize,
    rounds: usize,
    preload_ms: Vec<u64>,
    rate: f64,
    threads: usize,
    out: Option<PathBuf>,
    json: Option<PathBuf>,
}

fn usage() -> ! {
    eprintln!(
        "usage: reload-bench --exe PATH/watch_demo [--repo DIR] [--workers 4] [--rounds 10] [--preload-ms 0,250] \
         [--rate 1000] [--threads 4] [--out report.md] [--json raw.json]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        exe: PathBuf::new(),
        repo: PathBuf::from("."),
        workers: 4,
        rounds: 10,
        preload_ms: vec![0, 250],
        rate: 1000.0,
        threads: 4,
        out: None,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| usage());
        let num = |v: &str| v.parse::<f64>().unwrap_or_else(|_| usage());
        match k.as_str() {
            "--exe" => a.exe = PathBuf::from(v),
            "--repo" => a.repo = PathBuf::from(v),
            "--workers" => a.workers = num(&v) as usize,
            "--rounds" => a.rounds = num(&v) as usize,
            "--preload-ms" => a.preload_ms = v.split(',').map(|p| num(p) as u64).collect(),
            "--rate" => a.rate = num(&v),
            "--threads" => a.threads = num(&v) as usize,
            "--out" => a.out = Some(PathBuf::from(v)),
            "--json" => a.json = Some(PathBuf::from(v)),
            _ => usage(),
        }
    }
    if !a.exe.is_file() || a.rounds == 0 || a.threads == 0 || a.rate <= 0.0 {
        usage();
    }
    a
}

// ---------------------------------------------------------------------------------------------
// HTTP client

/// Why a request got no good answer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Fail {
    Refused,
    Reset,
    Timeout,
    Status(u16),
    Other(String),
}

impl Fail {
    fn label(&self) -> String {
        match self {
            Fail::Refused => "refused".into(),
            Fail::Reset => "reset/closed".into(),
            Fail::Timeout => "timeout".into(),
            Fail::Status(s) => format!("status {s}"),
            Fail::Other(e) => e.clone(),
        }
    }
}

fn classify(e: &io::Error) -> Fail {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => Fail::Refused,
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => Fail::Reset,
        WouldBlock | TimedOut => Fail::Timeout,
        _ => Fail::Other(e.to_string()),
    }
}

const IO_TIMEOUT: Duration = Duration::from_secs(5);

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One `GET path` on `s`: status, body, and whether the server closes the connection after it.
fn exchange(s: &mut TcpStream, path: &str, close: bool) -> io::Result<(u16, String, bool)> {
    let conn = if close { "Connection: close\r\n" } else { "" };
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: bench\r\n{conn}\r\n").as_bytes())?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before a response",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other("bad status line"))?;
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    let len: usize = header("content-length:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other("no content-length"))?;
    let closes = close || header("connection:").is_some_and(|v| v.contains("close"));
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed inside the body",
            ));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    Ok((status, String::from_utf8_lossy(&body).into_owned(), closes))
}

/// `GET path` on a new connection.
fn get(addr: SocketAddr, path: &str) -> Result<String, Fail> {
    let mut s = connect(addr).map_err(|e| classify(&e))?;
    match exchange(&mut s, path, true) {
        Ok((200, body, _)) => Ok(body),
        Ok((status, _, _)) => Err(Fail::Status(status)),
        Err(e) => Err(classify(&e)),
    }
}

/// `GET path` on the kept-alive connection `conn` (opened if needed, dropped when the server
/// closes it); a request on a reused connection that the server closed is sent once more.
fn get_kept_alive(
    addr: SocketAddr,
    path: &str,
    conn: &mut Option<TcpStream>,
) -> (Result<String, Fail>, bool) {
    let mut retried = false;
    let result = match conn.take() {
        Some(mut s) => match exchange(&mut s, path, false) {
            Err(e) if classify(&e) == Fail::Reset => {
                retried = true;
                connect(addr).and_then(|mut s| exchange(&mut s, path, false).map(|r| (r, s)))
            }
            other => other.map(|r| (r, s)),
        },
        None => connect(addr).and_then(|mut s| exchange(&mut s, path, false).map(|r| (r, s))),
    };
    let result = match result {
        Ok(((status, body, closes), s)) => {
            if !closes {
                *conn = Some(s);
            }
            if status == 200 {
                Ok(body)
            } else {
                Err(Fail::Status(status))
            }
        }
        Err(e) => Err(classify(&e)),
    };
    (result, retried)
}

// ---------------------------------------------------------------------------------------------
// Load

struct Rec {
    result: Result<String, Fail>,
    retried: bool,
}

/// Paced background load: `threads` threads, `rate` requests per second in total.
struct Load {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<Vec<Rec>>>,
}

impl Load {
    fn start(addr: SocketAddr, threads: usize, rate: f64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let interval = Duration::from_secs_f64(threads as f64 / rate);
        let t0 = Instant::now();
        let handles = (0..threads)
            .map(|i| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let keep_alive = i % 2 == 1;
                    let mut conn = None;
                    let mut recs = Vec::new();
                    let mut next = t0 + interval.mul_f64(i as f64 / threads as f64);
                    while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(120) {
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        }
                        // Open loop, but no burst to catch up after a stall.
                        next = (next + interval).max(Instant::now() - interval);
                        let (result, retried) = if keep_alive {
                            get_kept_alive(addr, "/", &mut conn)
                        } else {
                            (get(addr, "/"), false)
                        };
                        recs.push(Rec { result, retried });
                    }
                    recs
                })
            })
            .collect();
        Load { stop, handles }
    }

    fn finish(self) -> Vec<Rec> {
        self.stop.store(true, Ordering::Relaxed);
        self.handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    }
}

/// Polls `GET path` on new connections, one per millisecond, until the answer is `token`; returns
/// when it was received.
fn probe(addr: SocketAddr, path: &str, token: &str, deadline: Instant) -> Option<Instant> {
    while Instant::now() < deadline {
        if get(addr, path).is_ok_and(|b| b == token) {
            return Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Server trees

struct Server {
    exe: PathBuf,
    child: Option<Child>,
    dir: PathBuf,
    log: PathBuf,
    addr: SocketAddr,
    workers: usize,
    preload_ms: u64,
    mode: Mode,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

impl Server {
    fn new(exe: &Path, mode: Mode, workers: usize, preload_ms: u64) -> Server {
        let dir = std::env::temp_dir().join(format!(
            "tine-reload-bench-{}-{}-{preload_ms}",
            std::process::id(),
            mode.name()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("templates")).expect("create the templates dir");
        std::fs::create_dir_all(dir.join("data")).expect("create the data dir");
        std::fs::write(dir.join("templates/index.txt"), "start\n").expect("write the template");
        std::fs::write(dir.join("data/table.txt"), "start\n").expect("write the data");
        let log = dir.join("tine.log");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut s = Server {
            exe: exe.to_owned(),
            child: None,
            dir,
            log,
            addr,
            workers,
            preload_ms,
            mode,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let from = self.log_len();
        let mut cmd = Command::new(&self.exe);
        cmd.arg("serve")
            .args([
                "--listen",
                &self.addr.to_string(),
                "--workers",
                &self.workers.to_string(),
            ])
            .arg("--control-socket")
            .arg(self.dir.join("ctl.sock"))
            .env("WATCH_DEMO_BOOT_FILE", self.dir.join("templates/index.txt"))
            .env("WATCH_DEMO_PRELOAD_FILE", self.dir.join("data/table.txt"))
            .env("WATCH_DEMO_PRELOAD_MS", self.preload_ms.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log)
                    .expect("open the log"),
            );
        match self.mode {
            Mode::Boot => cmd.arg("--watch-boot").arg(self.dir.join("templates")),
            Mode::Full => cmd.arg("--watch").arg(self.dir.join("data")),
            Mode::Restart => &mut cmd,
        };
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        self.child = Some(cmd.spawn().expect("start the server"));
        if self
            .wait_log(from, "tine ready", Duration::from_secs(60))
            .is_none()
        {
            panic!(
                "{} server not ready:\n{}",
                self.mode.name(),
                self.log_text(from)
            );
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn log_len(&self) -> usize {
        std::fs::metadata(&self.log)
            .map(|m| m.len() as usize)
            .unwrap_or(0)
    }

    fn log_text(&self, from: usize) -> String {
        let bytes = std::fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(bytes.get(from..).unwrap_or_default()).into_owned()
    }

    /// Waits for a log line containing `pattern` after byte `from`; the line and when it was seen.
    fn wait_log(&self, from: usize, pattern: &str, timeout: Duration) -> Option<(String, Instant)> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(line) = self.log_text(from).lines().find(|l| l.contains(pattern)) {
                return Some((line.to_string(), Instant::now()));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    /// Graceful stop: `SIGTERM` to the monitor, wait for its exit.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The children follow a dead monitor (parent-death signal, EOF on their channels).
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Rounds

struct Round {
    mode: Mode,
    preload_ms: u64,
    /// From the file change to the first response with the new content.
    first_new: Duration,
    /// From the file change to every worker serving the new content: the monitor's "complete" log
    /// line seen (reloads), or the new tree's `tine ready` (restart).
    all_new: Duration,
    /// What the monitor logged for the whole reload (from the debounced change), if it logs one.
    monitor_ms: Option<u64>,
    requests: usize,
    failures: BTreeMap<String, usize>,
    retried: usize,
}

fn millis_in(line: &str) -> Option<u64> {
    let after = line
        .split("ms=")
        .nth(1)
        .or_else(|| line.split("reloaded in ").nth(1))?;
    after
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .ok()
}

fn summarize(
    mode: Mode,
    preload_ms: u64,
    first_new: Duration,
    all_new: Duration,
    monitor_ms: Option<u64>,
    recs: Vec<Rec>,
) -> Round {
    let mut failures = BTreeMap::new();
    for r in &recs {
        if let Err(f) = &r.result {
            *failures.entry(f.label()).or_default() += 1;
        }
    }
    Round {
        mode,
        preload_ms,
        first_new,
        all_new,
        monitor_ms,
        requests: recs.len(),
        failures,
        retried: recs.iter().filter(|r| r.retried).count(),
    }
}

fn reload_round(server: &Server, round: usize, args: &Args) -> Round {
    let (file, path, done) = match server.mode {
        Mode::Boot => ("templates/index.txt", "/", "boot reload complete"),
        _ => ("data/table.txt", "/preload", "reload complete: reloaded in"),
    };
    let token = format!("{}-{round}-{}\n", server.mode.name(), server.preload_ms);
    let load = Load::start(server.addr, args.threads, args.rate);
    std::thread::sleep(Duration::from_millis(300));
    let from = server.log_len();
    let t0 = Instant::now();
    std::fs::write(server.dir.join(file), &token).expect("edit the file");
    let t1 = probe(server.addr, path, &token, t0 + Duration::from_secs(60)).unwrap_or_else(|| {
        panic!(
            "{}: the new content never came:\n{}",
            server.mode.name(),
            server.log_text(from)
        )
    });
    let (line, t2) = server
        .wait_log(from, done, Duration::from_secs(60))
        .unwrap_or_else(|| {
            panic!(
                "{}: no {done:?} line:\n{}",
                server.mode.name(),
                server.log_text(from)
            )
        });
    std::thread::sleep(Duration::from_millis(200));
    let recs = load.finish();
    summarize(
        server.mode,
        server.preload_ms,
        t1 - t0,
        t2 - t0,
        millis_in(&line),
        recs,
    )
}

fn restart_round(server: &mut Server, round: usize, args: &Args) -> Round {
    let token = format!("restart-{round}-{}\n", server.preload_ms);
    let load = Load::start(server.addr, args.threads, args.rate);
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    std::fs::write(server.dir.join("templates/index.txt"), &token).expect("edit the file");
    let prober = std::thread::spawn({
        let (addr, token) = (server.addr, token.clone());
        move || probe(addr, "/", &token, t0 + Duration::from_secs(60))
    });
    server.stop();
    server.spawn();
    let t2 = Instant::now();
    let t1 = prober
        .join()
        .ok()
        .flatten()
        .expect("the restarted server never served the new content");
    std::thread::sleep(Duration::from_millis(200));
    let recs = load.finish();
    summarize(
        Mode::Restart,
        server.preload_ms,
        t1 - t0,
        t2 - t0,
        None,
        recs,
    )
}

// ---------------------------------------------------------------------------------------------
// Report

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn sh(cmd: &str, args: &[&str], dir: &Path) -> String {
    Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine(repo: &Path) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: u64 = mem
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let commit = sh("git", &["rev-parse", "--short", "HEAD"], repo);
    let dirty = if sh(
        "git",
        &["status", "--porcelain", "--untracked-files=no"],
        repo,
    )
    .is_empty()
    {
        ""
    } else {
        " (with uncommitted changes)"
    };
    format!(
        "- CPU: {model}, {cpus} logical CPUs; RAM {:.1} GiB; Linux {}\n- {}; tine at {commit}{dirty}\n",
        mem_kb as f64 / 1048576.0,
        kernel.trim(),
        sh("rustc", &["-V"], repo)
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn report(rounds: &[Round], args: &Args, command: &str, load_before: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Reload benchmark\n");
    let _ = writeln!(out, "Time from a file change to the first response with the new content, and what clients see meanwhile.");
    let _ = writeln!(
        out,
        "Written by `bench/reload/run.sh` (see bench/reload/README.md). Release build.\n"
    );
    let _ = writeln!(out, "{}- Load average (1, 5, 15 min) before the run: {load_before}; after: {} (other work on the machine shares its 2 cores).\n", machine(&args.repo), loadavg());
    let _ = writeln!(out, "Command: `{command}`\n");
    let _ = writeln!(
        out,
        "Setup: `examples/watch_demo`, {} workers; paced background load of {} req/s on `GET /` from {} threads (half a new connection per \
         request, half kept-alive); {} measured rounds per mode after one warm-up round, the three modes interleaved round by round.\n",
        args.workers, args.rate, args.threads, args.rounds
    );
    for &preload in &args.preload_ms {
        let _ = writeln!(out, "## preload {preload} ms\n");
        let _ = writeln!(
            out,
            "| mode | file change → first new response, median (min–max) | file change → every worker new, median | monitor's own figure, median | requests | failed | retried on a new connection |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---|---:|");
        let mut medians = BTreeMap::new();
        for mode in [Mode::Boot, Mode::Full, Mode::Restart] {
            let rs: Vec<&Round> = rounds
                .iter()
                .filter(|r| r.mode == mode && r.preload_ms == preload)
                .collect();
            if rs.is_empty() {
                continue;
            }
            let firsts: Vec<f64> = rs.iter().map(|r| ms(r.first_new)).collect();
            let med = median(firsts.clone());
            medians.insert(mode.name(), med);
            let (lo, hi) = (
                firsts.iter().cloned().fold(f64::INFINITY, f64::min),
                firsts.iter().cloned().fold(0.0, f64::max),
            );
            let all_new = median(rs.iter().map(|r| ms(r.all_new)).collect());
            let monitor: Vec<f64> = rs
                .iter()
                .filter_map(|r| r.monitor_ms.map(|m| m as f64))
                .collect();
            let monitor = if monitor.is_empty() {
                "—".to_string()
            } else {
                format!("{:.0} ms", median(monitor))
            };
            let requests: usize = rs.iter().map(|r| r.requests).sum();
            let mut failures: BTreeMap<&str, usize> = BTreeMap::new();
            for r in &rs {
                for (k, v) in &r.failures {
                    *failures.entry(k.as_str()).or_default() += v;
                }
            }
            let failed: usize = failures.values().sum();
            let detail = if failed == 0 {
                "**0**".to_string()
            } else {
                format!(
                    "**{failed}** ({})",
                    failures
                        .iter()
                        .map(|(k, v)| format!("{v} {k}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            let retried: usize = rs.iter().map(|r| r.retried).sum();
            let label = match mode {
                Mode::Boot => "boot-only reload (`--watch-boot`)",
                Mode::Full => "full reload (`--watch`: re-exec, new preload)",
                Mode::Restart => "restart (`SIGTERM`, start again)",
            };
            let _ = writeln!(out, "| {label} | **{med:.1} ms** ({lo:.1}–{hi:.1}) | {all_new:.1} ms | {monitor} | {requests} | {detail} | {retried} |");
        }
        let _ = writeln!(out);
        if let (Some(b), Some(f), Some(r)) = (
            medians.get("boot"),
            medians.get("full"),
            medians.get("restart"),
        ) {
            let _ = writeln!(
                out,
                "- Time to new content relative to the restart's (restart = 1): boot-only reload **{:.2}x**, full reload **{:.2}x**.",
                b / r,
                f / r
            );
            let _ = writeln!(
                out,
                "- Goal boot-only ≤ 100 ms: **{}** ({b:.1} ms).",
                if *b <= 100.0 { "met" } else { "missed" }
            );
            let goal = 300.0 + preload as f64;
            let _ = writeln!(
                out,
                "- Goal full ≤ 300 ms + preload = {goal:.0} ms: **{}** ({f:.1} ms).\n",
                if *f <= goal { "met" } else { "missed" }
            );
        }
    }
    let reload_failures: usize = rounds
        .iter()
        .filter(|r| r.mode != Mode::Restart)
        .map(|r| r.failures.values().sum::<usize>())
        .sum();
    let served = if reload_failures == 0 {
        "The reloads keep the listening socket and serve throughout: every request of their load was answered 200.".to_string()
    } else {
        format!("The reloads keep the listening socket, yet {reload_failures} requests of their load failed (see the tables).")
    };
    let _ = writeln!(out, "## Reading the numbers\n");
    let _ = writeln!(
        out,
        "- The restart is triggered by the driver at the instant of the change: no watcher, no debounce, no build (a real \
         `cargo watch -x run` adds its own delay, 0.5 s by default, and the compile). tine's times include inotify and its 20 ms \
         debounce, which is most of a boot-only reload: the monitor's own figure, from the debounced change to the last \
         worker replaced, is a few milliseconds.\n\
         - A restart pays the app's preload on every edit; a boot-only reload never does (its time does not move with the \
         preload); a full reload pays it, plus the preflight (`check` run of the executable) and the exec.\n\
         - What a restart costs is what clients see: connections refused while no process listens, and connections reset \
         that were queued on the old socket when it closed. {served} \"Retried\" counts requests sent on a kept-alive \
         connection that a draining worker had closed while it was idle, sent again on a new connection as browsers, curl \
         and Go do."
    );
    out
}

fn json(rounds: &[Round]) -> String {
    let rows: Vec<String> = rounds
        .iter()
        .map(|r| {
            let failures: Vec<String> = r.failures.iter().map(|(k, v)| format!("{k:?}: {v}")).collect();
            format!(
                "  {{\"mode\": \"{}\", \"preload_ms\": {}, \"first_new_ms\": {:.3}, \"all_new_ms\": {:.3}, \"monitor_ms\": {}, \"requests\": {}, \"retried\": {}, \"failures\": {{{}}}}}",
                r.mode.name(),
                r.preload_ms,
                ms(r.first_new),
                ms(r.all_new),
                r.monitor_ms.map(|m| m.to_string()).unwrap_or_else(|| "null".into()),
                r.requests,
                r.retried,
                failures.join(", ")
            )
        })
        .collect();
    format!("[\n{}\n]\n", rows.join(",\n"))
}

fn main() {
    let args = parse_args();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let load_before = loadavg();
    let mut rounds = Vec::new();
    for &preload in &args.preload_ms {
        let boot = Server::new(&args.exe, Mode::Boot, args.workers, preload);
        let full = Server::new(&args.exe, Mode::Full, args.workers, preload);
        let mut restart = Server::new(&args.exe, Mode::Restart, args.workers, preload);
        eprintln!(
            "preload {preload} ms: boot pid {}, full pid {}, restart pid {}",
            boot.pid(),
            full.pid(),
            restart.pid()
        );
        for round in 0..=args.rounds {
            let measured = [
                reload_round(&boot, round, &args),
                reload_round(&full, round, &args),
                restart_round(&mut restart, round, &args),
            ];
            for r in &measured {
                let failed: usize = r.failures.values().sum();
                eprintln!(
                    "  round {round}{} {:8} first new {:7.1} ms  all new {:7.1} ms  monitor {:>5}  requests {:5}  failed {failed} {:?}  retried {}",
                    if round == 0 { " (warm-up)" } else { "" },
                    r.mode.name(),
                    ms(r.first_new),
                    ms(r.all_new),
                    r.monitor_ms.map(|m| format!("{m}ms")).unwrap_or_else(|| "-".into()),
                    r.requests,
                    r.failures,
                    r.retried
                );
            }
            if round > 0 {
                rounds.extend(measured);
            }
        }
        restart.stop();
    }
    let text = report(&rounds, &args, &command, &load_before);
    match &args.out {
        Some(path) => std::fs::write(path, &text).expect("write the report"),
        None => print!("{text}"),
    }
    if let Some(path) = &args.json {
        std::fs::write(path, json(&rounds)).expect("write the raw results");
    }
}
