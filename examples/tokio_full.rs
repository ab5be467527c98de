//! An axum app built the way most are: `tokio = { features = ["full"] }`, with `tokio::signal` and
//! `tokio::process` used in its handlers and async work done in `preload` on a runtime of its own.
//! Reforked as often as you like (docs/FORK_SAFETY.md, "Runtimes").
//!
//! ```sh
//! cargo run --example tokio_full -- serve --listen 127.0.0.1:3000 --workers 2
//! curl 127.0.0.1:3000/           # hello from tokio full (worker 0, gen 0)
//! curl 127.0.0.1:3000/process    # runs `true` with tokio::process: exit status: 0
//! curl 127.0.0.1:3000/signal     # listens for SIGUSR1, sends it to itself, awaits it: received SIGUSR1
//! curl 127.0.0.1:3000/preload    # what preload computed on its runtime
//! kill -USR2 $(pgrep -f 'tine monitor')   # refork, then try the routes again
//! ```
//!
//! The runtime `preload` builds leaves tokio's signal self-pipe behind in a static, and a worker
//! that served `/signal` and is then promoted to mold carries tokio's installed signal handlers
//! into every worker it forks: both are what tine must keep working across forks.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use tine::{App, Context, Handler, Worker};
use tokio::signal::unix::{signal, SignalKind};

/// Computed once by `preload`, asynchronously, and shared by every worker.
struct Preloaded {
    summary: String,
}

struct TokioFullApp {
    preloaded: &'static Preloaded,
}

#[derive(Clone, Copy)]
struct PerWorker {
    preloaded: &'static Preloaded,
    nr: u32,
    generation: u32,
}

impl App for TokioFullApp {
    fn preload(_ctx: &Context) -> anyhow::Result<Self> {
        // A current-thread runtime: dropping it joins the blocking pool's threads (tokio::fs), and
        // the mold forks only once no thread is left.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let summary = runtime.block_on(async {
            let status = tokio::process::Command::new("true").status().await?;
            let _hostname = tokio::fs::read_to_string("/proc/sys/kernel/hostname").await?;
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                let _ = tx.send(6 * 7);
            });
            let answer = rx.await?;
            anyhow::Ok(format!(
                "preload ran `true` ({status}) and computed {answer}\n"
            ))
        })?;
        drop(runtime);
        Ok(TokioFullApp {
            preloaded: Box::leak(Box::new(Preloaded { summary })),
        })
    }

    fn boot(&self, worker: &Worker) -> anyhow::Result<Handler> {
        let state = PerWorker {
            preloaded: self.preloaded,
            nr: worker.nr(),
            generation: worker.generation(),
        };
        let router = Router::new()
            .route("/", get(hello).post(hello))
            // POST as well: a strict load client sends POSTs (never retried).
            .route("/process", get(run_true).post(run_true))
            .route("/signal", get(signal_myself).post(signal_myself))
            .route(
                "/preload",
                get(|State(s): State<PerWorker>| async move { s.preloaded.summary.as_str() }),
            )
            .route("/echo", post(|body: String| async move { body }))
            .with_state(state);
        Ok(Handler::http(router))
    }
}

async fn hello(State(state): State<PerWorker>) -> String {
    format!(
        "hello from tokio full (worker {}, gen {})\n",
        // A hot spare learns its number when it is activated, after boot.
        Worker::current_nr().unwrap_or(state.nr),
        state.generation
    )
}

/// Runs `true` as a child process and answers with its exit status.
async fn run_true() -> Result<String, (StatusCode, String)> {
    let status = tokio::process::Command::new("true")
        .status()
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("spawn: {e}\n")))?;
    Ok(format!("{status}\n"))
}

/// Listens for SIGUSR1, sends it to this process and waits for it (at most 5 s).
async fn signal_myself() -> Result<String, (StatusCode, String)> {
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        (StatusCode::INTERNAL_SERVER_ERROR, format!("{what}: {e}\n"))
    };
    let mut usr1 = signal(SignalKind::user_defined1()).map_err(|e| failed("listen", &e))?;
    nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGUSR1)
        .map_err(|e| failed("kill", &e))?;
    match tokio::time::timeout(Duration::from_secs(5), usr1.recv()).await {
        Ok(Some(())) => Ok("received SIGUSR1\n".to_string()),
        Ok(None) => Err(failed("signal stream", &"ended")),
        Err(_) => Err(failed("SIGUSR1", &"not received within 5 s")),
    }
}

fn main() -> std::process::ExitCode {
    tine::run::<TokioFullApp>()
}
