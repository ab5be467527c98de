//! Load client of tine's reforking benchmark (bench/refork/run.py).
//!
//! `--conns` threads, one HTTP/1.1 keep-alive connection each, send `GET /cache/{k}` with `k` drawn
//! from a seeded xorshift stream (so both modes of the benchmark see the same keys), paced at
//! `--rate` requests per second in total. Every connection is closed by the client after
//! `--per-conn` requests and opened again, so the kernel spreads the connections over all workers
//! (a keep-alive connection sticks to the worker that accepted it).
//!
//! Pacing is open-loop per connection: request `i` of connection `j` is due at
//! `t0 + (i + j / conns) / (rate / conns)`; its latency is measured from that due time, so a stall
//! shows up in the requests that queued behind it (no coordinated omission), and also from the
//! moment it was actually sent.
//!
//! Bounded: `--requests` in total and `--max-seconds` of wall time, whichever comes first.
//!
//! Failures are counted, never hidden. One case is retried, as browsers, curl and Go do: a request
//! written to a kept-alive connection that the server closed while it was idle (EOF or reset before
//! any byte of the response). A draining tine worker closes idle connections; the request never
//! reached the app, so resending it on a fresh connection is safe. Those retries are counted too.
//!
//! Output on stdout: `progress N UNIX_US` every `--progress` completed requests, and one final
//! `summary {json}` line. `--latency-out FILE` writes one line per request:
//! `due_unix_us sent_unix_us done_unix_us status`.

use std::io::{self, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

struct Args {
    addr: SocketAddr,
    keys: u64,
    requests: u64,
    conns: u64,
    rate: f64,
    per_conn: u64,
    seed: u64,
    progress: u64,
    latency_out: Option<String>,
    max_seconds: f64,
}

fn usage() -> ! {
    eprintln!(
        "usage: refork-loadgen --addr HOST:PORT --keys K --requests N [--conns 16] [--rate 5000] \
         [--per-conn 100] [--seed 1] [--progress 1000] [--latency-out FILE] [--max-seconds 300]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        addr: "127.0.0.1:18095".parse().expect("literal"),
        keys: 1024,
        requests: 0,
        conns: 16,
        rate: 5000.0,
        per_conn: 100,
        seed: 1,
        progress: 1000,
        latency_out: None,
        max_seconds: 300.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| usage());
        let bad = |what: &str| -> ! {
            eprintln!("refork-loadgen: invalid value {value:?} for {flag}: expected {what}");
            std::process::exit(2)
        };
        match flag.as_str() {
            "--addr" => a.addr = value.parse().unwrap_or_else(|_| bad("HOST:PORT")),
            "--keys" => {
                a.keys = value
                    .parse()
                    .ok()
                    .filter(|k| *k > 0)
                    .unwrap_or_else(|| bad("a positive integer"))
            }
            "--requests" => a.requests = value.parse().unwrap_or_else(|_| bad("an integer")),
            "--conns" => {
                a.conns = value
                    .parse()
                    .ok()
                    .filter(|c| *c > 0)
                    .unwrap_or_else(|| bad("a positive integer"))
            }
            "--rate" => {
                a.rate = value
                    .parse()
                    .ok()
                    .filter(|r: &f64| *r > 0.0)
                    .unwrap_or_else(|| bad("requests/s > 0"))
            }
            "--per-conn" => {
                a.per_conn = value
                    .parse()
                    .ok()
                    .filter(|c| *c > 0)
                    .unwrap_or_else(|| bad("a positive integer"))
            }
            "--seed" => a.seed = value.parse().unwrap_or_else(|_| bad("an integer")),
            "--progress" => {
                a.progress = value
                    .parse()
                    .ok()
                    .filter(|p| *p > 0)
                    .unwrap_or_else(|| bad("a positive integer"))
            }
            "--latency-out" => a.latency_out = Some(value),
            "--max-seconds" => {
                a.max_seconds = value
                    .parse()
                    .ok()
                    .filter(|s: &f64| *s > 0.0)
                    .unwrap_or_else(|| bad("seconds > 0"))
            }
            _ => usage(),
        }
    }
    if a.requests == 0 {
        usage();
    }
    a
}

/// One request's record, in microseconds since the run's start.
#[derive(Clone, Copy)]
struct Record {
    due: u64,
    sent: u64,
    done: u64,
    status: u16,
}

#[derive(Default)]
struct Counts {
    ok: u64,
    bad_status: u64,
    failed: u64,
    retried_idle_close: u64,
    server_closed: u64,
    connects: u64,
}

/// What went wrong with one attempt.
enum Attempt {
    /// The server closed the kept-alive connection before answering: safe to resend.
    ClosedIdle,
    /// Anything else: the request failed.
    Failed(String),
}

struct Conn {
    stream: TcpStream,
    used: u64,
    buf: Vec<u8>,
}

fn connect(addr: SocketAddr) -> io::Result<Conn> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(Conn {
        stream,
        used: 0,
        buf: Vec::with_capacity(4096),
    })
}

/// Sends one request on `conn`; returns the status and whether the server asked to close.
fn exchange(conn: &mut Conn, request: &[u8]) -> Result<(u16, bool), Attempt> {
    let reused = conn.used > 0;
    let idle_or_fail = |e: String, got_bytes: bool| {
        if reused && !got_bytes {
            Attempt::ClosedIdle
        } else {
            Attempt::Failed(e)
        }
    };
    if let Err(e) = conn.stream.write_all(request) {
        return Err(idle_or_fail(format!("write: {e}"), false));
    }
    conn.buf.clear();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        if let Some(p) = find(&conn.buf, b"\r\n\r\n") {
            break p + 4;
        }
        match conn.stream.read(&mut chunk) {
            Ok(0) => {
                return Err(idle_or_fail(
                    "eof before the response".into(),
                    !conn.buf.is_empty(),
                ))
            }
            Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(idle_or_fail(format!("read: {e}"), !conn.buf.is_empty())),
        }
        if conn.buf.len() > 64 * 1024 {
            return Err(Attempt::Failed("response header too long".into()));
        }
    };
    let head = String::from_utf8_lossy(&conn.buf[..header_end]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Attempt::Failed(format!("bad status line: {:?}", head.lines().next())))?;
    let mut length = None;
    let mut close = false;
    for line in head.lines().skip(1) {
        if let Some(v) = line.strip_prefix("content-length:") {
            length = v.trim().parse::<usize>().ok();
        } else if let Some(v) = line.strip_prefix("connection:") {
            close = v.trim() == "close";
        }
    }
    let length = length.ok_or_else(|| Attempt::Failed("no content-length".into()))?;
    while conn.buf.len() < header_end + length {
        match conn.stream.read(&mut chunk) {
            Ok(0) => return Err(Attempt::Failed("eof inside the body".into())),
            Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(Attempt::Failed(format!("read body: {e}"))),
        }
    }
    conn.used += 1;
    Ok((status, close))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

struct Shared {
    args: Args,
    t0: Instant,
    t0_unix_us: u64,
    done: AtomicU64,
    deadline: Instant,
}

fn micros(t0: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(t0).as_micros() as u64
}

fn run_connection(j: u64, share: u64, sh: &Shared) -> (Vec<Record>, Counts, Vec<String>) {
    let a = &sh.args;
    let interval = Duration::from_secs_f64(a.conns as f64 / a.rate);
    let offset = interval.mul_f64(j as f64 / a.conns as f64);
    let mut rng = (a.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (j + 1).wrapping_mul(0xD1B5_4A32_D192_ED03))
        | 1;
    let mut records = Vec::with_capacity(share as usize);
    let mut counts = Counts::default();
    let mut errors = Vec::new();
    let mut conn: Option<Conn> = None;
    for i in 0..share {
        let due = sh.t0 + offset + interval.mul_f64(i as f64);
        let now = Instant::now();
        if now >= sh.deadline || due >= sh.deadline {
            break;
        }
        if due > now {
            std::thread::sleep(due - now);
        }
        let key = xorshift(&mut rng) % a.keys;
        let request = format!("GET /cache/{key} HTTP/1.1\r\nHost: bench\r\n\r\n");
        let sent = Instant::now();
        let mut outcome = Err(String::new());
        // At most one resend, and only after an idle close on a reused connection.
        for attempt in 0..2 {
            if conn.is_none() {
                match connect(a.addr) {
                    Ok(c) => {
                        counts.connects += 1;
                        conn = Some(c);
                    }
                    Err(e) => {
                        outcome = Err(format!("connect: {e}"));
                        break;
                    }
                }
            }
            let c = conn.as_mut().expect("connected above");
            match exchange(c, request.as_bytes()) {
                Ok((status, close)) => {
                    if close {
                        counts.server_closed += 1;
                        conn = None;
                    } else if c.used >= a.per_conn {
                        conn = None;
                    }
                    outcome = Ok(status);
                    break;
                }
                Err(Attempt::ClosedIdle) if attempt == 0 => {
                    counts.retried_idle_close += 1;
                    conn = None;
                }
                Err(Attempt::ClosedIdle) => {
                    conn = None;
                    outcome = Err("closed before answering, twice".into());
                }
                Err(Attempt::Failed(e)) => {
                    conn = None;
                    outcome = Err(e);
                    break;
                }
            }
        }
        let done = Instant::now();
        let status = match outcome {
            Ok(200) => {
                counts.ok += 1;
                200
            }
            Ok(s) => {
                counts.bad_status += 1;
                if errors.len() < 5 {
                    errors.push(format!("status {s} for /cache/{key}"));
                }
                s
            }
            Err(e) => {
                counts.failed += 1;
                if errors.len() < 5 {
                    errors.push(format!("/cache/{key}: {e}"));
                }
                0
            }
        };
        records.push(Record {
            due: micros(sh.t0, due),
            sent: micros(sh.t0, sent),
            done: micros(sh.t0, done),
            status,
        });
        let n = sh.done.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(a.progress) {
            let unix = sh.t0_unix_us + micros(sh.t0, Instant::now());
            let mut out = io::stdout().lock();
            let _ = writeln!(out, "progress {n} {unix}");
            let _ = out.flush();
        }
    }
    (records, counts, errors)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let args = parse_args();
    let t0_unix_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as u64;
    let t0 = Instant::now() + Duration::from_millis(20);
    let deadline = t0 + Duration::from_secs_f64(args.max_seconds);
    let conns = args.conns;
    let requests = args.requests;
    let sh = Arc::new(Shared {
        args,
        t0,
        t0_unix_us: t0_unix_us + 20_000,
        done: AtomicU64::new(0),
        deadline,
    });
    let threads: Vec<_> = (0..conns)
        .map(|j| {
            let sh = sh.clone();
            let share = requests / conns + u64::from(j < requests % conns);
            std::thread::Builder::new()
                .name(format!("conn-{j}"))
                .spawn(move || run_connection(j, share, &sh))
                .expect("spawn a load thread")
        })
        .collect();
    let mut all = Vec::with_capacity(requests as usize);
    let mut total = Counts::default();
    let mut errors = Vec::new();
    for t in threads {
        let (records, c, e) = t.join().expect("load thread panicked");
        all.extend(records);
        total.ok += c.ok;
        total.bad_status += c.bad_status;
        total.failed += c.failed;
        total.retried_idle_close += c.retried_idle_close;
        total.server_closed += c.server_closed;
        total.connects += c.connects;
        errors.extend(e);
    }
    let elapsed = sh.t0.elapsed().as_secs_f64();
    if let Some(path) = &sh.args.latency_out {
        let file = std::fs::File::create(path).unwrap_or_else(|e| {
            eprintln!("refork-loadgen: cannot write {path}: {e}");
            std::process::exit(1)
        });
        let mut w = BufWriter::new(file);
        let base = sh.t0_unix_us;
        for r in &all {
            let _ = writeln!(
                w,
                "{} {} {} {}",
                base + r.due,
                base + r.sent,
                base + r.done,
                r.status
            );
        }
        let _ = w.flush();
    }
    let mut from_due: Vec<u64> = all.iter().map(|r| r.done - r.due.min(r.done)).collect();
    let mut from_sent: Vec<u64> = all.iter().map(|r| r.done - r.sent.min(r.done)).collect();
    from_due.sort_unstable();
    from_sent.sort_unstable();
    let pct = |v: &[u64]| {
        format!(
            "{{\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{}}}",
            percentile(v, 50.0),
            percentile(v, 90.0),
            percentile(v, 99.0),
            percentile(v, 99.9),
            v.last().copied().unwrap_or(0)
        )
    };
    let errors_json: Vec<String> = errors.iter().take(10).map(|e| format!("{e:?}")).collect();
    println!(
        "summary {{\"requests\":{},\"ok\":{},\"bad_status\":{},\"failed\":{},\"retried_idle_close\":{},\
         \"server_closed\":{},\"connects\":{},\"elapsed_s\":{:.3},\"rate\":{:.1},\"latency_from_due\":{},\
         \"latency_from_sent\":{},\"errors\":[{}]}}",
        all.len(),
        total.ok,
        total.bad_status,
        total.failed,
        total.retried_idle_close,
        total.server_closed,
        total.connects,
        elapsed,
        all.len() as f64 / elapsed,
        pct(&from_due),
        pct(&from_sent),
        errors_json.join(",")
    );
}
