//! A tokio program that runs CPU jobs and crashing jobs in a pool of worker processes, and prints
//! what happened.
//!
//! Run it with `cargo run --example spawner`.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tine::spawner::{Job, Spawner};

/// CPU work: the n-th Fibonacci number, computed the slow way.
#[derive(Serialize, Deserialize)]
struct Fib(u32);

impl Job for Fib {
    const NAME: &'static str = "example.fib";
    type Output = (u64, u32);
    fn run(self) -> (u64, u32) {
        fn fib(n: u32) -> u64 {
            if n < 2 {
                n as u64
            } else {
                fib(n - 1) + fib(n - 2)
            }
        }
        (fib(self.0), std::process::id())
    }
}

/// A job that takes its worker down in the way named.
#[derive(Serialize, Deserialize)]
enum Crash {
    Abort,
    Panic,
    Exit(i32),
    Hang,
}

impl Job for Crash {
    const NAME: &'static str = "example.crash";
    type Output = ();
    fn run(self) {
        match self {
            Crash::Abort => std::process::abort(),
            Crash::Panic => panic!("this job panics on purpose"),
            Crash::Exit(code) => std::process::exit(code),
            Crash::Hang => std::thread::sleep(Duration::from_secs(3600)),
        }
    }
}

// No #[tokio::main]: the spawner must fork before the runtime starts its threads.
fn main() -> anyhow::Result<()> {
    let spawner = Spawner::builder()
        .register::<Fib>()
        .register::<Crash>()
        .start()?;
    println!("spawner started: pid {}", spawner.pid());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let pool = spawner
            .pool()
            .max_workers(2)
            .timeout(Duration::from_secs(2))
            .build();

        let started = Instant::now();
        let jobs: Vec<_> = (30..36)
            .map(|n| {
                let pool = pool.clone();
                tokio::spawn(async move { (n, pool.run(Fib(n)).await) })
            })
            .collect();
        for job in jobs {
            let (n, result) = job.await?;
            let (value, pid) = result?;
            println!("fib({n}) = {value:>8}  (worker {pid})");
        }
        println!(
            "6 CPU jobs on {} workers took {:.0?}",
            pool.live_workers(),
            started.elapsed()
        );

        // Rust's stderr shows the job's panic message too; that is the default panic hook.
        for crash in [Crash::Abort, Crash::Panic, Crash::Exit(3), Crash::Hang] {
            match pool.run(crash).await {
                Ok(()) => println!("unexpectedly fine"),
                Err(e) => println!("crash job -> {e}"),
            }
        }
        let (value, pid) = pool.run(Fib(20)).await?;
        println!("and the pool goes on: fib(20) = {value} (worker {pid})");
        anyhow::Ok(())
    })
}
