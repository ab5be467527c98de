//! An axum application under tine: the `Router` is built in each worker's `boot` and served as is.
//!
//! ```sh
//! cargo run --release --example axum -- serve --listen 127.0.0.1:3000 --workers 4
//! curl 127.0.0.1:3000/                 # hello from axum
//! curl 127.0.0.1:3000/users/7          # {"id":7,"name":"user-7"}
//! curl 127.0.0.1:3000/whoami           # {"worker":0,"generation":0,"pid":…}
//! curl -d 'some text' 127.0.0.1:3000/echo
//! ```
//!
//! `preload` runs once, in the generation-0 mold: what it builds (here a small table) is shared
//! copy-on-write by every worker. It is leaked into a `&'static` and read by plain reference: a
//! cloned `Arc` per request would write its reference count and un-share the page.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use tine::{App, Context, Handler, Worker};

/// Built once before the fork, shared by every worker.
struct Shared {
    names: Vec<String>,
}

struct AxumApp {
    shared: &'static Shared,
}

/// Per-worker state handed to the handlers (cheap to clone: a reference and two numbers).
#[derive(Clone, Copy)]
struct PerWorker {
    shared: &'static Shared,
    nr: u32,
    generation: u32,
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
        };
        let router = Router::new()
            .route("/", get(|| async { "hello from axum\n" }))
            .route("/users/{id}", get(user))
            .route("/whoami", get(whoami))
            .route("/echo", post(|body: String| async move { body }))
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
        worker: state.nr,
        generation: state.generation,
        pid: std::process::id(),
    })
}

fn main() -> std::process::ExitCode {
    tine::run::<AxumApp>()
}
