//! Raw stream serving: every accepted connection goes to the app's handler.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
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
        // Every connection task holds a clone; the drain waits until only this one is left.
        let in_flight = Arc::new(());
        let serve = |conn: Connection| {
            let handler = handler.clone();
            let token = in_flight.clone();
            slot.begin_request("STREAM", "");
            tokio::spawn(async move {
                handler(conn).await;
                slot.end_request();
                drop(token);
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
        // What is queued already is this worker's to serve (see `AsyncListener::queued`).
        for accepted in listener.queued(config.nodelay) {
            serve(accepted.into());
        }
        drop(listener);
        while Arc::strong_count(&in_flight) > 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }))
}
