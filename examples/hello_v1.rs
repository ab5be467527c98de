//! Build A of the reload tests and benchmark: a tiny app that answers `hello v1` on `GET /`.
//! `examples/hello_v2.rs` is this same source built under another name, answering `hello v2`: two
//! builds that differ in what they answer, like an app before and after an edit.
//!
//! `tests/reload.rs` starts a copy of this binary, replaces the file with `hello_v2` (copy to a
//! temporary name, then rename, as cargo and deploy tools do) and sends `SIGHUP`: the same monitor
//! then serves `hello v2` without a failed request.
//!
//! ```sh
//! cargo run --example hello_v1 -- serve --listen 127.0.0.1:3000 --workers 2
//! curl 127.0.0.1:3000/   # hello v1
//! ```
//!
//! Two more routes let the tests look inside a worker:
//! - `GET /env/NAME`: the value of environment variable `NAME` as this worker sees it (404 if
//!   unset). `/proc/PID/environ` cannot show it: tine rewrites that area with the process title.
//! - `GET /log/WORD`: writes `app says word=WORD` to this worker's log (stderr, or the `log_file`
//!   after `SIGUSR1` reopened it).

use std::convert::Infallible;

use bytes::Bytes;
use http::{Response, StatusCode};
use tine::app::{full, Body, Request};
use tine::{App, Context, Handler, Worker};

/// `hello v1` or `hello v2`, from the name of the example being built.
fn answer() -> &'static str {
    match env!("CARGO_CRATE_NAME") {
        "hello_v2" => "hello v2\n",
        _ => "hello v1\n",
    }
}

struct Hello;

fn respond(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

async fn handle(req: Request) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    Ok(if path == "/" {
        respond(StatusCode::OK, answer().to_string())
    } else if let Some(name) = path.strip_prefix("/env/") {
        match std::env::var(name) {
            Ok(value) => respond(StatusCode::OK, value),
            Err(_) => respond(StatusCode::NOT_FOUND, "unset\n".into()),
        }
    } else if let Some(word) = path.strip_prefix("/log/") {
        tracing::info!(word, "app says");
        respond(StatusCode::OK, "logged\n".into())
    } else {
        respond(StatusCode::NOT_FOUND, "not found\n".into())
    })
}

impl App for Hello {
    fn preload(_ctx: &Context) -> anyhow::Result<Self> {
        Ok(Hello)
    }

    fn boot(&self, _worker: &Worker) -> anyhow::Result<Handler> {
        Ok(Handler::http(tower::service_fn(handle)))
    }
}

/// Also the `main` of `hello_v2`, which includes this file as a module.
pub fn main() -> std::process::ExitCode {
    tine::run::<Hello>()
}
