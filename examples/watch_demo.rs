//! Development mode, made visible: an app whose start-up reads files, so that a reload is the only
//! way an edit reaches the answers.
//!
//! - `preload` (once per mold: the expensive, shared start-up) reads `WATCH_DEMO_PRELOAD_FILE` and
//!   then sleeps `WATCH_DEMO_PRELOAD_MS` milliseconds, standing in for loading a model or an index.
//! - `boot` (in every worker) reads `WATCH_DEMO_BOOT_FILE`, the way an app loads its templates.
//!
//! `GET /` answers the boot file's content as it was when the worker booted, `GET /preload` the
//! preload file's as it was when the mold preloaded. Neither file is read again per request.
//!
//! ```sh
//! mkdir -p /tmp/demo/templates /tmp/demo/data
//! echo hello > /tmp/demo/templates/index.txt; echo v1 > /tmp/demo/data/table.txt
//! WATCH_DEMO_BOOT_FILE=/tmp/demo/templates/index.txt WATCH_DEMO_PRELOAD_FILE=/tmp/demo/data/table.txt \
//!   cargo run --example watch_demo -- serve --listen 127.0.0.1:3000 --workers 4 \
//!   --watch-boot /tmp/demo/templates --watch /tmp/demo/data
//! echo bonjour > /tmp/demo/templates/index.txt   # new workers from the current mold: no preload
//! echo v2 > /tmp/demo/data/table.txt             # full reload: re-exec, new preload
//! ```

use std::convert::Infallible;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Response, StatusCode};
use tine::app::{full, Body, Request};
use tine::{App, Config, Context, Handler, Worker};

const BOOT_FILE: &str = "WATCH_DEMO_BOOT_FILE";
const PRELOAD_FILE: &str = "WATCH_DEMO_PRELOAD_FILE";
const PRELOAD_MS: &str = "WATCH_DEMO_PRELOAD_MS";

struct WatchDemo {
    /// Read once in the mold, shared by every worker forked from it.
    preloaded: &'static str,
}

/// The file named by `var`, if the variable is set.
fn file(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn read(var: &str) -> anyhow::Result<String> {
    match file(var) {
        Some(path) => {
            std::fs::read_to_string(&path).with_context(|| format!("{var}={}", path.display()))
        }
        None => Ok(String::new()),
    }
}

fn preload_ms() -> anyhow::Result<u64> {
    match std::env::var(PRELOAD_MS) {
        Ok(v) => v.trim().parse().with_context(|| {
            format!("invalid value {v:?} for {PRELOAD_MS}: expected milliseconds")
        }),
        Err(_) => Ok(0),
    }
}

impl App for WatchDemo {
    /// `tine check` (and a reload's preflight) refuses what `preload` and `boot` would fail on.
    fn check(_config: &Config) -> anyhow::Result<()> {
        preload_ms()?;
        for var in [BOOT_FILE, PRELOAD_FILE] {
            if let Some(path) = file(var) {
                anyhow::ensure!(
                    path.is_file(),
                    "{var}={}: not a readable file",
                    path.display()
                );
            }
        }
        Ok(())
    }

    fn preload(_ctx: &Context) -> anyhow::Result<Self> {
        let preloaded = read(PRELOAD_FILE)?;
        std::thread::sleep(Duration::from_millis(preload_ms()?));
        Ok(WatchDemo {
            preloaded: Box::leak(preloaded.into_boxed_str()),
        })
    }

    fn boot(&self, _worker: &Worker) -> anyhow::Result<Handler> {
        let booted: &'static str = Box::leak(read(BOOT_FILE)?.into_boxed_str());
        let preloaded = self.preloaded;
        Ok(Handler::http(tower::service_fn(
            move |req: Request| async move {
                let (status, body) = match req.uri().path() {
                    "/" => (StatusCode::OK, booted),
                    "/preload" => (StatusCode::OK, preloaded),
                    _ => (StatusCode::NOT_FOUND, "not found\n"),
                };
                let mut r: Response<Body> =
                    Response::new(full(Bytes::from_static(body.as_bytes())));
                *r.status_mut() = status;
                Ok::<_, Infallible>(r)
            },
        )))
    }
}

fn main() -> std::process::ExitCode {
    tine::run::<WatchDemo>()
}
