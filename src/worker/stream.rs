//! Raw stream serving: every accepted connection goes to the app's handler.

use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::http::{Admitted, Gate};
use super::Stop;
use crate::app::{Connection, StreamHandler};
use crate::ipc::scoreboard::SlotWriter;

/// Spawns the accept loop of the listener whose [`Gate`] comes through `gate` (dropped unsent: the
/// task ends), as [`super::http::spawn_accept_loop`] does.
pub(super) fn spawn_accept_loop(
    gate: oneshot::Receiver<Gate>,
    handler: StreamHandler,
    slot: SlotWriter<'static>,
    mut stop: watch::Receiver<Stop>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        // Every connection task holds a clone of `open`; `recv` returns None once all have ended.
        let (open, mut all_closed) = mpsc::channel::<()>(1);
        let Ok(mut gate) = gate.await else { return };
        // Owns the drain tracker's sender: dropping it is part of the drain.
        let serve = move |(conn, admitted): (Connection, Admitted)| {
            let handler = handler.clone();
            let in_flight = InFlight::begin(slot, open.clone(), admitted);
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
                (c, admitted) = gate.accept() => (c.into(), admitted),
            };
            serve(conn);
        }
        // What is queued already is this worker's to serve (see `AsyncListener::into_queued`).
        for (accepted, admitted) in gate.into_queued() {
            serve((accepted.into(), admitted));
        }
        drop(serve);
        // The handlers heard of the drain through `Worker::shutdown`; the monitor's
        // graceful_timeout bounds the wait for those that do not listen.
        let _ = all_closed.recv().await;
    })
}

/// One stream connection in flight: counted on the scoreboard and by the drain until dropped,
/// however the handler ends (returns, panics, or is dropped with the runtime).
struct InFlight {
    slot: SlotWriter<'static>,
    _open: mpsc::Sender<()>,
    /// Its place under `max_connections`.
    _admitted: Admitted,
}

impl InFlight {
    fn begin(slot: SlotWriter<'static>, open: mpsc::Sender<()>, admitted: Admitted) -> InFlight {
        slot.begin_request("STREAM", "");
        InFlight {
            slot,
            _open: open,
            _admitted: admitted,
        }
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
