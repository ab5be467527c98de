//! An app whose worker 0 is not fork-safe: its `boot` starts a background thread (a stand-in for
//! a metrics flusher, a client library's I/O thread, a connection children must not share) and
//! marks the process with [`tine::Worker::mark_not_fork_safe`]. The monitor never promotes such a
//! worker to a mold; the other workers stay candidates. `tests/refork.rs` runs it as a child process.
//!
//! ```sh
//! cargo run --example not_fork_safe -- serve --listen 127.0.0.1:8080 --workers 2 --debug-headers
//! curl -s localhost:8080/          # worker 0 pid 1234 fork_safe false threads 4
//! ```
//!
//! Every response says which worker answered, whether it is still fork-safe, and how many threads
//! the process has: the runtime's, tine's `tine-profile` (joined before any promotion), and, in
//! worker 0, the app's.

use std::convert::Infallible;
use std::process::ExitCode;
use std::time::Duration;

use tine::app::{full, Request};
use tine::{App, Context, Handler, Worker};

struct NotForkSafe;

impl App for NotForkSafe {
    fn preload(_ctx: &Context) -> anyhow::Result<Self> {
        Ok(NotForkSafe)
    }

    fn boot(&self, worker: &Worker) -> anyhow::Result<Handler> {
        let nr = worker.nr();
        if nr == 0 {
            // A process with a second thread must never fork (the thread's locks would be copied
            // mid-update, and the thread itself would not exist in the child). Say so up front,
            // so that the monitor never picks this worker for promotion.
            std::thread::Builder::new()
                .name("flusher".into())
                .spawn(|| loop {
                    std::thread::sleep(Duration::from_secs(3600));
                })?;
            Worker::mark_not_fork_safe();
        }
        let pid = std::process::id();
        Ok(Handler::http(tower::service_fn(
            move |_req: Request| async move {
                let threads = std::fs::read_dir("/proc/self/task")
                    .map(|d| d.count())
                    .unwrap_or(0);
                let body = format!(
                    "worker {nr} pid {pid} fork_safe {} threads {threads}\n",
                    Worker::is_fork_safe()
                );
                Ok::<_, Infallible>(http::Response::new(full(body)))
            },
        )))
    }
}

fn main() -> ExitCode {
    tine::run::<NotForkSafe>()
}
