//! Raw stream serving: every accepted connection goes to the app's handler.

use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::http::AsyncListener;
use super::Stop;
use crate::app::{Connection, StreamHandler};
use crate::config::Config;
use crate::ipc::scoreboard::SlotWriter;
use crate::listener::Listener;

pub(super) fn spawn_accept_loop(
    listener: &Listener,
    handler: StreamHandler,
    config: Arc<Config>,
    slot: SlotWriter<'static>,
    mut stop: watch::Receiver<Stop>,
) -> io::Result<JoinHandle<()>> {
    let listener = AsyncListener::from_listener(listener, config.exclusive_accept)?;
    Ok(tokio::spawn(async move {
        // Every connection task holds a clone of `open`; `recv` returns None once all have ended.
        let (open, mut all_closed) = mpsc::channel::<()>(1);
        // Owns the drain tracker's sender: dropping it is part of the drain.
        let serve = move |conn: Connection| {
            let handler = handler.clone();
            let in_flight = InFlight::begin(slot, open.clone());
            tokio::spawn(async move {
                // The handler's own call too: a panic before its future exists ends the same way.
                let run = AssertUnwindSafe(async move { handler(conn).await });
                if let Err(panic) = run.catch_unwind().await {
                    tracing::error!(
                        panic = panic_message(&*panic),
                        "stream handler panicked; its connection is closed"
                    );
                }
                drop(in_flight);
            });
        };
        loop {
            let conn = tokio::select! {
                biased;
                _ = stop.changed() => break,
                c = listener.accept_connection(config.nodelay) => c,
            };
            serve(conn);
        }
        // What is queued already is this worker's to serve (see `AsyncListener::into_queued`).
        for accepted in listener.into_queued(config.nodelay) {
            serve(accepted.into());
        }
        drop(serve);
        // The handlers heard of the drain through `Worker::shutdown`; the monitor's
        // graceful_timeout bounds the wait for those that do not listen.
        let _ = all_closed.recv().await;
    }))
}

/// One stream connection in flight: counted on the scoreboard and by the drain until dropped,
/// however the handler ends (returns, panics, or is dropped with the runtime).
struct InFlight {
    slot: SlotWriter<'static>,
    _open: mpsc::Sender<()>,
}

impl InFlight {
    fn begin(slot: SlotWriter<'static>, open: mpsc::Sender<()>) -> InFlight {
        slot.begin_request("STREAM", "");
        InFlight { slot, _open: open }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.slot.end_request();
    }
}

/// The message of a panic payload (a `&str` or a `String`, as `panic!` makes them).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(not a string)"
    }
}
