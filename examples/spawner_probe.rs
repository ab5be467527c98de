//! Test driver for `tests/spawner.rs`: runs one scenario (argv[1]) against a real spawner and
//! prints what it saw as `RESULT {json}` lines, then `DONE`. The test asserts on those facts.
//!
//! It exists because the spawner forks: that must happen in a fresh single-threaded process,
//! never in the test harness's threads.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tine::spawner::{Error, Fd, Job, Spawner};

#[derive(Serialize, Deserialize)]
struct Echo {
    text: String,
    blob: Vec<u8>,
}
impl Job for Echo {
    const NAME: &'static str = "probe.echo";
    type Output = (String, usize, u64, u32);
    fn run(self) -> Self::Output {
        let sum = self.blob.iter().map(|b| *b as u64).sum();
        (
            self.text.to_uppercase(),
            self.blob.len(),
            sum,
            std::process::id(),
        )
    }
}

/// An output of `len` bytes.
#[derive(Serialize, Deserialize)]
struct Bytes {
    len: usize,
}
impl Job for Bytes {
    const NAME: &'static str = "probe.bytes";
    type Output = Vec<u8>;
    fn run(self) -> Vec<u8> {
        vec![7; self.len]
    }
}

#[derive(Serialize, Deserialize)]
struct Pid;
impl Job for Pid {
    const NAME: &'static str = "probe.pid";
    type Output = u32;
    fn run(self) -> u32 {
        std::process::id()
    }
}

/// Crashes the worker in the way named.
#[derive(Serialize, Deserialize)]
struct Crash(String);
impl Job for Crash {
    const NAME: &'static str = "probe.crash";
    type Output = ();
    fn run(self) {
        match self.0.as_str() {
            "abort" => std::process::abort(),
            // A genuine SIGSEGV from the kernel's point of view; a wild pointer would need
            // `unsafe`, which this crate keeps in src/sys only.
            "segv" => {
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSEGV);
            }
            "exit3" => std::process::exit(3),
            "panic" => panic!("the probe panicked on purpose"),
            _ => {}
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Sleep(u64);
impl Job for Sleep {
    const NAME: &'static str = "probe.sleep";
    type Output = u32;
    fn run(self) -> u32 {
        std::thread::sleep(Duration::from_millis(self.0));
        std::process::id()
    }
}

/// Allocates and touches this many MiB, holds them a while.
#[derive(Serialize, Deserialize)]
struct Hog(usize);
impl Job for Hog {
    const NAME: &'static str = "probe.hog";
    type Output = usize;
    fn run(self) -> usize {
        let mut v: Vec<Vec<u8>> = Vec::new();
        for _ in 0..self.0 {
            v.push(vec![1u8; 1 << 20]);
        }
        std::thread::sleep(Duration::from_millis(500));
        v.iter().map(|c| c.len()).sum()
    }
}

/// Answers on a socket handed over with the job.
#[derive(Serialize, Deserialize)]
struct Greet {
    sock: Fd,
}
impl Job for Greet {
    const NAME: &'static str = "probe.greet";
    type Output = u32;
    fn run(self) -> u32 {
        let mut s = TcpStream::from(self.sock.into_owned());
        let mut line = [0u8; 5];
        let _ = s.read_exact(&mut line);
        let _ = write!(
            s,
            "hello {} from {}",
            String::from_utf8_lossy(&line),
            std::process::id()
        );
        std::process::id()
    }
}

/// Returns a descriptor: the read end of a pipe with a message in it.
#[derive(Serialize, Deserialize)]
struct MakePipe;
impl Job for MakePipe {
    const NAME: &'static str = "probe.makepipe";
    type Output = Fd;
    fn run(self) -> Fd {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let mut w = std::fs::File::from(w);
        let _ = w.write_all(b"piped from worker");
        Fd::new(r)
    }
}

/// Panics and catches its own panic, the way a library (a tokio runtime, a plugin host) does.
#[derive(Serialize, Deserialize)]
enum CatchOwn {
    /// `catch_unwind` around a panic: returns whether it caught one.
    CatchUnwind,
    /// A current-thread tokio runtime whose task panics: returns whether the join said so.
    TokioTask,
    /// Catches one panic, then panics for real: the second must be the one reported.
    ThenEscape,
    /// Panics while unwinding from a panic (a `Drop` that panics): the process aborts.
    PanicInDrop,
}
impl Job for CatchOwn {
    const NAME: &'static str = "probe.catch-own";
    type Output = (bool, u32);
    fn run(self) -> (bool, u32) {
        let caught = match self {
            CatchOwn::CatchUnwind => {
                std::panic::catch_unwind(|| panic!("inner panic, caught by the job")).is_err()
            }
            CatchOwn::TokioTask => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    tokio::spawn(async { panic!("task panic, caught by tokio") })
                        .await
                        .is_err_and(|e| e.is_panic())
                })
            }
            CatchOwn::ThenEscape => {
                let _ = std::panic::catch_unwind(|| panic!("first panic, caught"));
                panic!("second panic, escapes")
            }
            CatchOwn::PanicInDrop => {
                struct Bomb;
                impl Drop for Bomb {
                    fn drop(&mut self) {
                        panic!("panic in drop while unwinding");
                    }
                }
                let _bomb = Bomb;
                panic!("panic that unwinds into a panicking drop")
            }
        };
        (caught, std::process::id())
    }
}

/// Prints a line from the worker, and lists the worker's open descriptors.
#[derive(Serialize, Deserialize)]
struct Inherited;
impl Job for Inherited {
    const NAME: &'static str = "probe.inherited";
    type Output = Vec<String>;
    fn run(self) -> Vec<String> {
        println!("printed by worker {}", std::process::id());
        let mut fds = Vec::new();
        // `read_dir` holds one descriptor of its own on the directory: named, then left out.
        for entry in std::fs::read_dir("/proc/self/fd")
            .expect("/proc/self/fd")
            .flatten()
        {
            let link = std::fs::read_link(entry.path())
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            if !link.starts_with("/proc/") || !link.ends_with("/fd") {
                fds.push(format!("{}={link}", entry.file_name().to_string_lossy()));
            }
        }
        fds.sort();
        fds
    }
}

#[derive(Serialize, Deserialize)]
struct NotRegistered;
impl Job for NotRegistered {
    const NAME: &'static str = "probe.not-registered";
    type Output = ();
    fn run(self) {}
}

fn result(v: serde_json::Value) {
    println!("RESULT {v}");
}

fn kind(e: &Error) -> serde_json::Value {
    json!({
        "display": e.to_string(),
        "pid": e.pid(),
        "crash": e.is_crash(),
        "sigabrt": e.is_signal(libc::SIGABRT),
        "sigsegv": e.is_signal(libc::SIGSEGV),
        "signal_name": e.signal().map(|s| s.as_str()),
        "is_sigsegv_by_name": e.is_signal(tine::spawner::Signal::SIGSEGV),
        "backtrace": e.backtrace(),
        "timeout": e.is_timeout(),
        "memory": e.is_memory_limit(),
        "panic": e.is_panic(),
        "spawner_gone": e.is_spawner_gone(),
        "exit3": matches!(e, Error::WorkerDied { death: tine::spawner::Death::Exited(3), .. }),
    })
}

fn outcome<T: Serialize>(r: Result<T, Error>) -> serde_json::Value {
    match r {
        Ok(v) => json!({"ok": v}),
        Err(e) => json!({"err": kind(&e)}),
    }
}

fn alive(pid: u32) -> bool {
    // A zombie is dead for our purposes: it runs nothing.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

fn wait_gone(pid: u32, patience: Duration) -> bool {
    let until = Instant::now() + patience;
    while Instant::now() < until {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    !alive(pid)
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn children_of(pid: i32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    out
}

fn main() -> anyhow::Result<()> {
    let scenario = std::env::args().nth(1).unwrap_or_default();
    if scenario == "threads" {
        let (tx, rx) = std::sync::mpsc::channel();
        let _t = std::thread::Builder::new()
            .name("busy-thread".into())
            .spawn(move || {
                let _ = tx.send(());
                std::thread::sleep(Duration::from_secs(5))
            })?;
        // The thread names itself once it runs.
        rx.recv()?;
        let r = Spawner::builder().register::<Pid>().start();
        result(json!({"refused": r.is_err(), "message": r.err().map(|e| e.to_string())}));
        println!("DONE");
        return Ok(());
    }
    if scenario == "inherited" {
        // Left in the stdout buffer, without a newline, when the spawner forks.
        print!("UNFLUSHED-BEFORE-START ");
    }
    let spawner = Spawner::builder()
        .register::<Echo>()
        .register::<Bytes>()
        .register::<Pid>()
        .register::<Crash>()
        .register::<Sleep>()
        .register::<Hog>()
        .register::<Greet>()
        .register::<MakePipe>()
        .register::<CatchOwn>()
        .register::<Inherited>()
        .start()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match scenario.as_str() {
        "roundtrip" => {
            let pool = spawner.pool().max_workers(2).build();
            let blob: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
            let sum: u64 = blob.iter().map(|b| *b as u64).sum();
            result(
                json!({"case": "blocking", "r": outcome(pool.run_blocking(Echo { text: "héllo".into(), blob: vec![1, 2, 3] }))}),
            );
            result(
                json!({"case": "big", "expect_sum": sum, "r": outcome(pool.run_blocking(Echo { text: "big".into(), blob: blob.clone() }))}),
            );
            let p = pool.clone();
            let r = rt.block_on(async move {
                p.run(Echo {
                    text: "async".into(),
                    blob,
                })
                .await
            });
            result(json!({"case": "async", "expect_sum": sum, "r": outcome(r)}));
            // Past the wire's limit of one message (64 MiB), either way: a clear error for that
            // call, and the pool serves on.
            let huge = 65 << 20;
            result(
                json!({"case": "job_too_big", "r": outcome(pool.run_blocking(Echo { text: "huge".into(), blob: vec![0; huge] }))}),
            );
            result(
                json!({"case": "output_too_big", "r": outcome(pool.run_blocking(Bytes { len: huge }).map(|v| v.len()))}),
            );
            result(
                json!({"case": "after_too_big", "r": outcome(pool.run_blocking(Bytes { len: 3 }))}),
            );
            // Many concurrent callers on 2 workers: every result must come back to its caller.
            let p = pool.clone();
            let rs = rt.block_on(async move {
                let mut tasks = Vec::new();
                for i in 0..64u32 {
                    let p = p.clone();
                    tasks.push(tokio::spawn(async move {
                        p.run(Echo {
                            text: format!("t{i}"),
                            blob: vec![i as u8],
                        })
                        .await
                    }));
                }
                let mut good = 0;
                for (i, t) in tasks.into_iter().enumerate() {
                    if let Ok(Ok((text, 1, sum, _))) = t.await {
                        if text == format!("T{i}") && sum == i as u64 {
                            good += 1;
                        }
                    }
                }
                good
            });
            result(json!({"case": "concurrent", "good": rs, "live": pool.live_workers()}));
            result(
                json!({"case": "unregistered", "r": outcome(pool.run_blocking(NotRegistered)), "unknown": matches!(pool.run_blocking(NotRegistered), Err(Error::UnknownJob { .. }))}),
            );
        }
        "crash" => {
            let pool = spawner.pool().max_workers(1).build();
            for how in ["abort", "segv", "exit3", "panic"] {
                let before = pool.run_blocking(Pid).ok();
                let r = pool.run_blocking(Crash(how.into()));
                let after = pool.run_blocking(Pid);
                result(
                    json!({"case": how, "before": before, "r": outcome(r), "after": outcome(after)}),
                );
            }
            let p = pool.clone();
            let r = rt.block_on(async move { p.run(Crash("abort".into())).await });
            let p = pool.clone();
            let after = rt.block_on(async move { p.run(Pid).await });
            result(json!({"case": "async-abort", "r": outcome(r), "after": outcome(after)}));
        }
        "timeout" => {
            let pool = spawner
                .pool()
                .max_workers(1)
                .timeout(Duration::from_millis(300))
                .build();
            let t = Instant::now();
            let r = pool.run_blocking(Sleep(10_000));
            let blocking_ms = t.elapsed().as_millis() as u64;
            let gone = r
                .as_ref()
                .err()
                .and_then(|e| e.pid())
                .map(|p| !alive(p as u32));
            result(
                json!({"case": "blocking", "r": outcome(r), "ms": blocking_ms, "worker_gone": gone, "after": outcome(pool.run_blocking(Sleep(10)))}),
            );
            let p = pool.clone();
            let t = Instant::now();
            let r = rt.block_on(async move { p.run(Sleep(10_000)).await });
            let ms = t.elapsed().as_millis() as u64;
            let gone = r
                .as_ref()
                .err()
                .and_then(|e| e.pid())
                .map(|p| !alive(p as u32));
            let p = pool.clone();
            let after = rt.block_on(async move { p.run(Sleep(10)).await });
            result(
                json!({"case": "async", "r": outcome(r), "ms": ms, "worker_gone": gone, "after": outcome(after)}),
            );
        }
        "memory" => {
            let pool = spawner
                .pool()
                .max_workers(1)
                .memory_limit_kb(64 * 1024)
                .build();
            let r = pool.run_blocking(Hog(256));
            let gone = r
                .as_ref()
                .err()
                .and_then(|e| e.pid())
                .map(|p| !alive(p as u32));
            result(
                json!({"case": "blocking", "r": outcome(r), "worker_gone": gone, "small": outcome(pool.run_blocking(Hog(8)))}),
            );
            let p = pool.clone();
            let r = rt.block_on(async move { p.run(Hog(256)).await });
            let p = pool.clone();
            let small = rt.block_on(async move { p.run(Hog(8)).await });
            result(json!({"case": "async", "r": outcome(r), "small": outcome(small)}));
        }
        "cancel" => {
            let pool = spawner.pool().max_workers(1).build();
            let first = pool.run_blocking(Pid)?;
            let p = pool.clone();
            let t = Instant::now();
            let cancelled = rt.block_on(async move {
                tokio::time::timeout(Duration::from_millis(200), p.run(Sleep(30_000)))
                    .await
                    .is_err()
            });
            let gone = wait_gone(first, Duration::from_secs(2));
            let next = pool.run_blocking(Pid)?;
            result(
                json!({"cancelled": cancelled, "first": first, "first_gone": gone, "next": next, "ms": t.elapsed().as_millis() as u64, "live": pool.live_workers()}),
            );
        }
        "fds" => {
            let pool = spawner.pool().max_workers(1).build();
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let mut client = TcpStream::connect(listener.local_addr()?)?;
            client.set_read_timeout(Some(Duration::from_secs(5)))?;
            let (server_side, _) = listener.accept()?;
            client.write_all(b"probe")?;
            let p = pool.clone();
            let worker = rt.block_on(async move {
                p.run(Greet {
                    sock: Fd::new(server_side),
                })
                .await
            })?;
            // The caller's copy closed when the job was sent, the worker's when it returned: EOF.
            let mut answer = String::new();
            client.read_to_string(&mut answer)?;
            let pipe = pool.run_blocking(MakePipe)?;
            let mut text = String::new();
            std::fs::File::from(pipe.into_owned()).read_to_string(&mut text)?;
            result(
                json!({"answer": answer, "worker": worker, "me": std::process::id(), "pipe": text}),
            );
        }
        "orphans" => {
            let pool = spawner.pool().max_workers(3).build();
            let p = pool.clone();
            let busy: Vec<_> = (0..2)
                .map(|_| {
                    let p = p.clone();
                    rt.spawn(async move { p.run(Sleep(60_000)).await })
                })
                .collect();
            // Wait until the two sleepers run, then start a third worker that stays idle.
            let until = Instant::now() + Duration::from_secs(5);
            while children_of(spawner.pid()).len() < 2 && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            let idle = pool.run_blocking(Pid)?;
            result(
                json!({"spawner": spawner.pid(), "workers": children_of(spawner.pid()), "idle": idle}),
            );
            println!("READY");
            std::thread::sleep(Duration::from_secs(30));
            drop(busy);
        }
        "leak" => {
            let n: usize = std::env::args()
                .nth(2)
                .and_then(|a| a.parse().ok())
                .unwrap_or(20_000);
            let pool = spawner
                .pool()
                .max_workers(2)
                .max_jobs_per_worker(500)
                .build();
            pool.run_blocking(Pid)?;
            let fds_before = fd_count() - pool.live_workers();
            let mut pids = std::collections::HashSet::new();
            let t = Instant::now();
            let half = n / 2;
            for _ in 0..half {
                pids.insert(pool.run_blocking(Pid)?);
            }
            let p = pool.clone();
            let async_pids = rt.block_on(async move {
                let mut set = std::collections::HashSet::new();
                let mut tasks = tokio::task::JoinSet::new();
                for _ in 0..4 {
                    let p = p.clone();
                    tasks.spawn(async move {
                        let mut got = Vec::new();
                        for _ in 0..(n - half) / 4 {
                            got.push(p.run(Pid).await);
                        }
                        got
                    });
                }
                let mut errors = 0;
                while let Some(Ok(got)) = tasks.join_next().await {
                    for r in got {
                        match r {
                            Ok(pid) => {
                                set.insert(pid);
                            }
                            Err(_) => errors += 1,
                        }
                    }
                }
                (set, errors)
            });
            pids.extend(async_pids.0);
            // Released workers are reaped by the spawner within a few ms.
            let until = Instant::now() + Duration::from_secs(5);
            while children_of(spawner.pid()).len() > pool.live_workers() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            result(json!({
                "jobs": n, "errors": async_pids.1, "secs": t.elapsed().as_secs_f64(), "distinct_workers": pids.len(),
                "fds_before": fds_before, "fds_after": fd_count() - pool.live_workers(), "live": pool.live_workers(),
                "spawner_children": children_of(spawner.pid()).len(),
            }));
        }
        "spawner-death" => {
            let pool = spawner.pool().max_workers(2).build();
            let before = pool.run_blocking(Pid)?;
            let p = pool.clone();
            let inflight = rt.spawn(async move { p.run(Sleep(30_000)).await });
            let until = Instant::now() + Duration::from_secs(5);
            while children_of(spawner.pid()).len() < 2 && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(spawner.pid()),
                nix::sys::signal::Signal::SIGKILL,
            )?;
            let t = Instant::now();
            let inflight = rt.block_on(async move {
                tokio::time::timeout(Duration::from_secs(10), inflight).await
            });
            let inflight = match inflight {
                Ok(Ok(r)) => outcome(r),
                _ => json!("hung or failed"),
            };
            let next = outcome(pool.run_blocking(Pid));
            let p = pool.clone();
            let next_async = outcome(rt.block_on(async move { p.run(Pid).await }));
            let fresh = outcome(spawner.pool().build().run_blocking(Pid));
            result(
                json!({"before": before, "inflight": inflight, "next": next, "next_async": next_async, "fresh_pool": fresh, "ms": t.elapsed().as_millis() as u64}),
            );
        }
        "oneshot" => {
            let pool = spawner.pool().one_shot().max_workers(2).build();
            let mut pids = Vec::new();
            for _ in 0..5 {
                pids.push(pool.run_blocking(Pid)?);
            }
            let crash = outcome(pool.run_blocking(Crash("abort".into())));
            let p = pool.clone();
            let a = outcome(rt.block_on(async move {
                p.run(Echo {
                    text: "one".into(),
                    blob: vec![7; 10],
                })
                .await
            }));
            let until = Instant::now() + Duration::from_secs(5);
            while !children_of(spawner.pid()).is_empty() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            result(
                json!({"pids": pids, "crash": crash, "async": a, "left": children_of(spawner.pid()).len(), "live": pool.live_workers()}),
            );
        }
        "caught-panic" => {
            let pool = spawner.pool().max_workers(1).build();
            let before = pool.run_blocking(Pid)?;
            let blocking = outcome(pool.run_blocking(CatchOwn::CatchUnwind));
            let tokio_task = outcome(pool.run_blocking(CatchOwn::TokioTask));
            let p = pool.clone();
            let awaited = outcome(rt.block_on(async move { p.run(CatchOwn::CatchUnwind).await }));
            let after = pool.run_blocking(Pid)?;
            let escape = outcome(pool.run_blocking(CatchOwn::ThenEscape));
            let in_drop = outcome(pool.run_blocking(CatchOwn::PanicInDrop));
            let next = outcome(pool.run_blocking(Pid));
            let one_shot = spawner.pool().one_shot().build();
            let one_shot = outcome(one_shot.run_blocking(CatchOwn::CatchUnwind));
            result(json!({
                "before": before, "blocking": blocking, "tokio_task": tokio_task, "awaited": awaited,
                "after": after, "escape": escape, "in_drop": in_drop, "next": next,
                "one_shot": one_shot,
            }));
        }
        "backtrace" => {
            // The test sets RUST_BACKTRACE=1 (the workers inherit it).
            let pool = spawner.pool().max_workers(1).build();
            let panicked = outcome(pool.run_blocking(Crash("panic".into())));
            let p = pool.clone();
            let awaited = outcome(rt.block_on(async move { p.run(Crash("panic".into())).await }));
            result(json!({"blocking": panicked, "awaited": awaited}));
        }
        "inherited" => {
            let pool = spawner.pool().max_workers(2).build();
            let p = pool.clone();
            let (a, b) = rt.block_on(async move {
                let (a, b) = tokio::join!(p.run(Inherited), p.run(Inherited));
                (outcome(a), outcome(b))
            });
            println!();
            result(json!({"a": a, "b": b, "live": pool.live_workers()}));
        }
        other => anyhow::bail!("unknown scenario {other:?}"),
    }
    println!("DONE");
    drop(rt);
    Ok(())
}
