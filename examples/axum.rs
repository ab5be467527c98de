//! An axum application under tine: the `Router` is built in each worker's `boot` and served as is.
//!
//! ```sh
//! cargo run --release --example axum -- serve --listen 127.0.0.1:3000 --workers 4
//! curl 127.0.0.1:3000/                 # hello from axum
//! curl 127.0.0.1:3000/users/7          # {"id":7,"name":"user-7"}
//! curl 127.0.0.1:3000/whoami           # {"worker":0,"generation":0,"pid":…}
//! curl -d 'some text' 127.0.0.1:3000/echo
//! websocat ws://127.0.0.1:3000/ws      # a WebSocket that echoes messages
//! curl -N 127.0.0.1:3000/events        # server-sent events: a count every 500 ms
//! ```
//!
//! `preload` runs once, in the generation-0 mold: what it builds (here a small table) is shared
//! copy-on-write by every worker. It is leaked into a `&'static` and read by plain reference: a
//! cloned `Arc` per request would write its reference count and un-share the page.
//!
//! `/ws` is a WebSocket route that ends itself politely when its worker drains (a graceful stop, a
//! refork, a reload, a recycle): it watches [`tine::Worker::shutdown`] and sends a close frame
//! `1001 going away`, so the client reconnects to a worker that stays and this one exits at once
//! rather than holding the drain until `graceful_timeout`. `/events` (server-sent events) does the
//! same for a response that never ends by itself: on drain it sends a last `bye` event and ends.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use tine::{App, Context, Handler, Shutdown, Worker};

/// Built once before the fork, shared by every worker.
struct Shared {
    names: Vec<String>,
}

struct AxumApp {
    shared: &'static Shared,
}

/// Per-worker state handed to the handlers (cheap to clone: two references and two numbers).
#[derive(Clone, Copy)]
struct PerWorker {
    shared: &'static Shared,
    nr: u32,
    generation: u32,
    /// Leaked once per worker, so that the state stays `Copy` and a request clones no `Arc`.
    shutdown: &'static Shutdown,
}

#[derive(Serialize)]
struct User {
    id: u32,
    name: String,
}

#[derive(Serialize)]
struct WhoAmI {
    worker: u32,
    generation: u32,
    pid: u32,
}

impl App for AxumApp {
    fn preload(_ctx: &Context) -> anyhow::Result<Self> {
        let names = (0..1000).map(|i| format!("user-{i}")).collect();
        Ok(AxumApp {
            shared: Box::leak(Box::new(Shared { names })),
        })
    }

    fn boot(&self, worker: &Worker) -> anyhow::Result<Handler> {
        let state = PerWorker {
            shared: self.shared,
            nr: worker.nr(),
            generation: worker.generation(),
            shutdown: Box::leak(Box::new(worker.shutdown())),
        };
        let router = Router::new()
            .route("/", get(|| async { "hello from axum\n" }))
            .route("/users/{id}", get(user))
            .route("/whoami", get(whoami))
            .route("/echo", post(|body: String| async move { body }))
            .route("/ws", get(websocket))
            .route("/events", get(events))
            .with_state(state);
        Ok(Handler::http(router))
    }
}

async fn user(
    State(state): State<PerWorker>,
    Path(id): Path<u32>,
) -> Result<Json<User>, StatusCode> {
    let name = state
        .shared
        .names
        .get(id as usize)
        .ok_or(StatusCode::NOT_FOUND)?;
    Ok(Json(User {
        id,
        name: name.clone(),
    }))
}

async fn whoami(State(state): State<PerWorker>) -> Json<WhoAmI> {
    Json(WhoAmI {
        // A hot spare learns its number when it is activated, after boot.
        worker: Worker::current_nr().unwrap_or(state.nr),
        generation: state.generation,
        pid: std::process::id(),
    })
}

async fn websocket(State(state): State<PerWorker>, upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(move |socket| echo(socket, state.shutdown))
}

/// Echoes every message until the client closes, or until this worker drains: then it sends a
/// close frame `1001 going away` and gives the client a moment to answer it.
async fn echo(mut socket: WebSocket, shutdown: &'static Shutdown) {
    let draining = shutdown.wait();
    tokio::pin!(draining);
    loop {
        let message = tokio::select! {
            _ = &mut draining => break,
            m = socket.recv() => m,
        };
        let reply = match message {
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => m,
            // Pings are answered by axum itself; pongs need nothing.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            // The client closed (axum answers its close frame) or the connection failed.
            Some(Ok(Message::Close(_)) | Err(_)) | None => return,
        };
        if socket.send(reply).await.is_err() {
            return;
        }
    }
    let goodbye = CloseFrame {
        code: close_code::AWAY,
        reason: "server going away".into(),
    };
    if socket.send(Message::Close(Some(goodbye))).await.is_err() {
        return;
    }
    // The closing handshake: wait (briefly: the worker is waiting for this connection) for the
    // client's close frame, discarding what it sent meanwhile.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(m)) = socket.recv().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// A count every 500 ms, for as long as the client listens, or until this worker drains: then a
/// last `bye` event, and the response ends (so the connection closes and the worker can exit).
async fn events(
    State(state): State<PerWorker>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let shutdown = state.shutdown;
    // The state is the next count, `None` once the last event is out.
    let counts = futures_util::stream::unfold(Some(0u64), move |next| async move {
        let n = next?;
        let pause = Duration::from_millis(if n == 0 { 0 } else { 500 });
        tokio::select! {
            _ = shutdown.wait() => {
                let bye = Event::default().event("bye").data("server going away");
                Some((Ok(bye), None))
            }
            _ = tokio::time::sleep(pause) => {
                Some((Ok(Event::default().data(n.to_string())), Some(n + 1)))
            }
        }
    });
    Sse::new(counts)
}

fn main() -> std::process::ExitCode {
    tine::run::<AxumApp>()
}
