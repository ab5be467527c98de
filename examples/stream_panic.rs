//! A raw stream app whose handler has a bug: it panics on a line that says `panic`. Every other
//! line is answered `ok` and the connection closes. `tests/examples.rs` runs it as a child process
//! to check that a panic ends only the connection it happened on: the worker goes on serving, its
//! in-flight count (`tine ctl status`) goes back to zero, and it still stops gracefully.
//!
//! ```sh
//! cargo run --example stream_panic -- serve --listen 127.0.0.1:2201 --workers 1
//! printf 'hi\n' | nc 127.0.0.1 2201       # ok
//! printf 'panic\n' | nc 127.0.0.1 2201    # (closed; the log says the handler panicked)
//! ```

use tine::{App, Connection, Context, Handler, Worker};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

struct StreamPanic;

impl App for StreamPanic {
    fn preload(_ctx: &Context) -> anyhow::Result<Self> {
        Ok(StreamPanic)
    }

    fn boot(&self, _worker: &Worker) -> anyhow::Result<Handler> {
        Ok(Handler::stream(serve))
    }
}

async fn serve(conn: Connection) {
    let mut conn = BufReader::new(conn);
    let mut line = String::new();
    if conn.read_line(&mut line).await.is_err() {
        return;
    }
    if line.trim_end() == "panic" {
        panic!("the handler's bug: asked to panic");
    }
    let _ = conn.get_mut().write_all(b"ok\n").await;
    let _ = conn.get_mut().shutdown().await;
}

fn main() -> std::process::ExitCode {
    tine::run::<StreamPanic>()
}
