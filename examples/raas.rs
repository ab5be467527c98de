//! RAAS, "Reverse string As A Service": the line service of the classic prefork tutorial, served
//! by tine's worker processes with a raw stream handler.
//!
//! A client connects, sends one line, reads the line reversed, and the server closes the
//! connection: one request per connection.
//!
//! ```sh
//! cargo run --release --example raas -- serve --listen 127.0.0.1:2200 --workers 3
//! printf 'hello\n' | nc 127.0.0.1 2200        # olleh
//! ```
//!
//! Everything else (`ps` titles, `tine ctl`, signals, scaling, limits) is tine's, as for any app.
//!
//! When its worker drains (a graceful stop, a refork, a reload, a recycle), a connection still
//! waiting for its line hears of it through [`tine::Worker::shutdown`]: a line already on its way
//! gets `drain_grace` more (the setting HTTP connections get for the same reason), then the client
//! is told `error: server going away` and the connection closes, so the worker exits then instead
//! of holding its drain for a silent client until `graceful_timeout`.

use std::time::Duration;

use tine::{App, Connection, Context, Handler, Shutdown, Worker};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// The longest line accepted, newline included; a longer one gets an error line.
const MAX_LINE: u64 = 64 * 1024;

struct Raas;

impl App for Raas {
    fn preload(_ctx: &Context) -> anyhow::Result<Self> {
        Ok(Raas)
    }

    fn boot(&self, worker: &Worker) -> anyhow::Result<Handler> {
        // A client that never finishes its line must not hold the connection for ever: it gets the
        // same patience as an HTTP client sending its request head.
        let patience = worker.config().header_read_timeout;
        // Once the worker drains, a line still on its way gets this long.
        let grace = worker.config().drain_grace;
        let shutdown = worker.shutdown();
        Ok(Handler::stream(move |conn| {
            serve(conn, patience, grace, shutdown.clone())
        }))
    }
}

/// One request: read a line, answer it reversed, close.
async fn serve(conn: Connection, patience: Duration, grace: Duration, shutdown: Shutdown) {
    let mut conn = BufReader::new(conn);
    let mut line = Vec::new();
    let read = {
        let mut limited = (&mut conn).take(MAX_LINE);
        let read = tokio::time::timeout(patience, limited.read_until(b'\n', &mut line));
        tokio::pin!(read);
        tokio::select! {
            biased;
            r = &mut read => Some(r),
            // Draining: `None` if the line does not come within the grace.
            _ = shutdown.wait() => tokio::time::timeout(grace, &mut read).await.ok(),
        }
    };
    let reply = match read {
        None => "error: server going away\n".to_string(),
        Some(Err(_)) => return, // too slow: close without an answer
        Some(Ok(Err(_))) => return,
        Some(Ok(Ok(0))) => return, // closed without sending anything
        Some(Ok(Ok(_))) if !line.ends_with(b"\n") && line.len() as u64 >= MAX_LINE => {
            format!("error: line longer than {MAX_LINE} bytes\n")
        }
        Some(Ok(Ok(_))) => match std::str::from_utf8(&line) {
            // A last line without a newline (the client shut down its side) is answered too.
            Ok(text) => format!("{}\n", reverse(text.trim_end_matches(['\n', '\r']))),
            Err(_) => "error: not UTF-8\n".to_string(),
        },
    };
    let conn = conn.get_mut();
    let _ = conn.write_all(reply.as_bytes()).await;
    let _ = conn.shutdown().await;
}

/// Reverses by characters (not bytes), so UTF-8 text stays UTF-8.
fn reverse(text: &str) -> String {
    text.chars().rev().collect()
}

fn main() -> std::process::ExitCode {
    tine::run::<Raas>()
}
