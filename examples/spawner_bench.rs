//! Benchmark of `tine::spawner` and of its floor, for `bench/spawner/run.sh`.
//!
//! Prints one JSON object per measurement on stdout:
//! * `floor`: a bare SOCK_SEQPACKET ping-pong (1 byte each way) between this process and a forked
//!   child: the least any process pool can cost per round trip;
//! * `run_blocking`, `run_await_mt`, `run_await_ct`: round trip of a trivial job through a pool
//!   (blocking; awaited on a multi-thread runtime; awaited on a current-thread runtime);
//! * `throughput_*`: trivial jobs per second with 2 workers;
//! * `bare_fork` and `one_shot`: fork + `_exit` + waitpid, against a one-shot job.
//!
//! Usage: `spawner_bench [ROUNDS]` (default 20000 round trips per latency measurement).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sched::{sched_setaffinity, CpuSet};
use nix::sys::socket::{recvmsg, sendmsg, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use nix::sys::wait::waitpid;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tine::spawner::{Job, Spawner};
use tine::sys::process::{exit_now, fork, Forked};

#[derive(Serialize, Deserialize)]
struct Trivial(u64);
impl Job for Trivial {
    const NAME: &'static str = "bench.trivial";
    type Output = u64;
    fn run(self) -> u64 {
        self.0 + 1
    }
}

/// Pins the calling thread (and what it forks later) to one CPU; `None`: to every CPU again.
fn pin(cpu: Option<usize>) {
    let mut set = CpuSet::new();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for c in 0..cpus {
        if cpu.is_none_or(|only| only == c) {
            set.set(c).expect("cpu index");
        }
    }
    sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).expect("sched_setaffinity");
}

/// Pins the worker that runs it to a CPU: for measuring round trips across CPUs.
#[derive(Serialize, Deserialize)]
struct PinWorker(usize);
impl Job for PinWorker {
    const NAME: &'static str = "bench.pin-worker";
    type Output = ();
    fn run(self) {
        pin(Some(self.0));
    }
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let us = |d: Duration| d.as_nanos() as f64 / 1000.0;
    let pick = |q: f64| us(samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)]);
    let mean = samples.iter().map(|d| us(*d)).sum::<f64>() / samples.len() as f64;
    println!(
        "{}",
        json!({"name": name, "n": samples.len(), "p50_us": pick(0.50), "p99_us": pick(0.99), "mean_us": mean})
    );
}

fn send1(fd: &OwnedFd) {
    sendmsg::<()>(
        fd.as_raw_fd(),
        &[IoSlice::new(&[1])],
        &[],
        MsgFlags::empty(),
        None,
    )
    .expect("send");
}

fn recv1(fd: &OwnedFd) -> usize {
    let mut b = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut b)];
    recvmsg::<()>(fd.as_raw_fd(), &mut iov, None, MsgFlags::empty())
        .map(|m| m.bytes)
        .unwrap_or(0)
}

/// The floor: one byte there and back over a SOCK_SEQPACKET socketpair. With `cross`, the two
/// processes are pinned to different CPUs (0 and 1): every message wakes the other CPU.
fn floor(rounds: usize, cross: bool) {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair");
    match fork().expect("fork") {
        Forked::Child => {
            drop(a);
            if cross {
                pin(Some(1));
            }
            while recv1(&b) == 1 {
                send1(&b);
            }
            exit_now(0);
        }
        Forked::Parent(pid) => {
            drop(b);
            if cross {
                pin(Some(0));
            }
            for _ in 0..rounds / 10 {
                send1(&a);
                recv1(&a);
            }
            let mut samples = Vec::with_capacity(rounds);
            for _ in 0..rounds {
                let t = Instant::now();
                send1(&a);
                recv1(&a);
                samples.push(t.elapsed());
            }
            drop(a);
            let _ = waitpid(pid, None);
            if cross {
                pin(None);
            }
            report(if cross { "floor_cross" } else { "floor" }, samples);
        }
    }
}

/// fork + _exit + waitpid, from this small single-threaded process.
fn bare_fork(rounds: usize) {
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        match fork().expect("fork") {
            Forked::Child => exit_now(0),
            Forked::Parent(pid) => {
                let _ = waitpid(pid, None);
            }
        }
        samples.push(t.elapsed());
    }
    report("bare_fork", samples);
}

fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    let spawner = Spawner::builder()
        .register::<Trivial>()
        .register::<PinWorker>()
        .start()?;
    // Every fork of this process happens here, before any thread exists.
    floor(rounds, false);
    let cross = std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2;
    if cross {
        floor(rounds, true);
    }
    bare_fork(rounds / 10);

    let pool = spawner.pool().max_workers(2).build();
    for i in 0..rounds as u64 / 10 {
        pool.run_blocking(Trivial(i))?;
    }
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds as u64 {
        let t = Instant::now();
        let out = pool.run_blocking(Trivial(i))?;
        samples.push(t.elapsed());
        assert_eq!(out, i + 1);
    }
    report("run_blocking", samples);

    if cross {
        // One worker on CPU 1, the caller on CPU 0: every round trip crosses CPUs.
        let pinned = spawner.pool().max_workers(1).build();
        pinned.run_blocking(PinWorker(1))?;
        pin(Some(0));
        for i in 0..rounds as u64 / 10 {
            pinned.run_blocking(Trivial(i))?;
        }
        let mut samples = Vec::with_capacity(rounds);
        for i in 0..rounds as u64 {
            let t = Instant::now();
            pinned.run_blocking(Trivial(i))?;
            samples.push(t.elapsed());
        }
        pin(None);
        report("run_blocking_cross", samples);
    }

    let one_shot = spawner.pool().one_shot().max_workers(1).build();
    let mut samples = Vec::with_capacity(rounds / 10);
    for i in 0..rounds as u64 / 10 {
        let t = Instant::now();
        one_shot.run_blocking(Trivial(i))?;
        samples.push(t.elapsed());
    }
    report("one_shot", samples);

    for (name, rt) in [
        (
            "run_await_mt",
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?,
        ),
        (
            "run_await_ct",
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        ),
    ] {
        let p = pool.clone();
        // Measured inside a spawned task, where application code runs (a multi-thread runtime's
        // block_on future runs on the calling thread, outside the workers).
        let samples = rt.block_on(async move {
            tokio::spawn(async move {
                for i in 0..rounds as u64 / 10 {
                    p.run(Trivial(i)).await?;
                }
                let mut samples = Vec::with_capacity(rounds);
                for i in 0..rounds as u64 {
                    let t = Instant::now();
                    p.run(Trivial(i)).await?;
                    samples.push(t.elapsed());
                }
                anyhow::Ok(samples)
            })
            .await?
        })?;
        report(name, samples);
    }

    // Throughput with 2 workers: 2 threads calling run_blocking, and 16 tasks awaiting run().
    let jobs = rounds * 2;
    let t = Instant::now();
    std::thread::scope(|s| {
        for k in 0..2 {
            let p = pool.clone();
            s.spawn(move || {
                for i in 0..jobs / 2 {
                    p.run_blocking(Trivial((k * jobs + i) as u64)).expect("job");
                }
            });
        }
    });
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"name": "throughput_blocking_2threads", "jobs": jobs, "jobs_per_s": jobs as f64 / secs})
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let p = pool.clone();
    let secs = rt.block_on(async move {
        let t = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for k in 0..16 {
            let p = p.clone();
            set.spawn(async move {
                for i in 0..jobs / 16 {
                    p.run(Trivial((k * jobs + i) as u64)).await.expect("job");
                }
            });
        }
        while set.join_next().await.is_some() {}
        t.elapsed().as_secs_f64()
    });
    println!(
        "{}",
        json!({"name": "throughput_await_16tasks", "jobs": jobs / 16 * 16, "jobs_per_s": (jobs / 16 * 16) as f64 / secs})
    );
    Ok(())
}
