//! The reference apps of the `tine` binary: `hello` (the benchmark app), `static` (files under
//! `--root`) and `cache-demo` (lazily warmed blocks that make reforking's memory effect visible).
//!
//! One file each: `hello.rs` (with its debug routes), `static_files.rs`, `cache_demo.rs`; this
//! file selects one (`--app`) and runs its `check`, `preload` and `boot`.

mod cache_demo;
mod hello;
mod static_files;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http::{Response, StatusCode};
use tine::app::{full, Body, Request};
use tine::config::FollowSymlinks;
use tine::{App, Config, Context, Handler, Worker};

use cache_demo::{cache, Block};
use hello::{debug_boot_sleep, echo, hello, Breakage};

/// The app selected by `--app`.
pub enum Reference {
    Hello {
        debug_routes: bool,
        /// Set by `preload` under `TINE_DEBUG_PRELOAD_BREAKS_BOOT` or by `before_mold` under
        /// `TINE_DEBUG_PROMOTION_BREAKS_BOOT`: how this mold's workers fail in `boot`.
        broken: Option<Breakage>,
    },
    Static {
        root: PathBuf,
        follow_symlinks: FollowSymlinks,
    },
    CacheDemo {
        table: &'static [OnceLock<Block>],
        block_kb: u64,
    },
}

impl App for Reference {
    fn check(config: &Config) -> anyhow::Result<()> {
        match config.app.as_str() {
            "hello" => Ok(()),
            "static" => {
                let root = config
                    .root
                    .as_ref()
                    .context("invalid value for `root`: the static app needs --root DIR")?;
                if !root.is_dir() {
                    bail!(
                        "invalid value {:?} for `root`: expected an existing directory",
                        root.display().to_string()
                    );
                }
                // Refuses a kernel without openat2 now rather than in every worker.
                static_files::Root::open(root, config.follow_symlinks)?;
                Ok(())
            }
            "cache-demo" => {
                if config.keys == 0 || config.keys > 1 << 20 {
                    bail!(
                        "invalid value {} for `keys`: expected 1 to 1048576",
                        config.keys
                    );
                }
                if config.block_kb == 0 || config.block_kb > 1 << 16 {
                    bail!(
                        "invalid value {} for `block_kb`: expected 1 to 65536",
                        config.block_kb
                    );
                }
                Ok(())
            }
            other => {
                bail!("invalid value {other:?} for `app`: expected hello, static or cache-demo")
            }
        }
    }

    fn preload(ctx: &Context) -> anyhow::Result<Self> {
        let config = ctx.config();
        Ok(match config.app.as_str() {
            "static" => {
                let root = config.root.clone().context("static app needs a root")?;
                Reference::Static {
                    root: root
                        .canonicalize()
                        .with_context(|| format!("root {}", root.display()))?,
                    follow_symlinks: config.follow_symlinks,
                }
            }
            "cache-demo" => {
                // The table of empty cells is shared by every worker; a worker fills the cells it
                // needs. Leaked to give plain `&'static` reads: no reference counts to write.
                let table: Vec<OnceLock<Block>> =
                    (0..config.keys).map(|_| OnceLock::new()).collect();
                Reference::CacheDemo {
                    table: Box::leak(table.into_boxed_slice()),
                    block_kb: config.block_kb,
                }
            }
            _ => Reference::Hello {
                debug_routes: config.debug_routes,
                broken: if config.debug_routes {
                    Breakage::from_env("TINE_DEBUG_PRELOAD_BREAKS_BOOT", "preloaded")?
                } else {
                    None
                },
            },
        })
    }

    fn boot(&self, _worker: &Worker) -> anyhow::Result<Handler> {
        Ok(match self {
            Reference::Hello {
                debug_routes,
                broken,
            } => {
                let debug = *debug_routes;
                if debug {
                    debug_boot_sleep()?;
                }
                if let Some(broken) = broken {
                    broken.take_turn()?;
                }
                Handler::http(tower::service_fn(move |req: Request| {
                    if debug && req.uri().path() == "/echo" {
                        return echo(req);
                    }
                    hello(&req, debug)
                }))
            }
            // Each worker opens the root itself: a descriptor of its own, after any privilege drop.
            Reference::Static {
                root,
                follow_symlinks,
            } => static_files::handler(static_files::Root::open(root, *follow_symlinks)?),
            Reference::CacheDemo { table, block_kb } => {
                let (table, block_kb) = (*table, *block_kb);
                Handler::http(tower::service_fn(move |req: Request| async move {
                    Ok::<_, Infallible>(cache(table, block_kb, &req))
                }))
            }
        })
    }

    /// None of the reference apps reads the peer's address: their requests skip the extensions
    /// map it would cost (see `App::connect_info`).
    fn connect_info(&self) -> bool {
        false
    }

    fn before_mold(&mut self) -> anyhow::Result<()> {
        if let Reference::Hello {
            debug_routes: true,
            broken,
        } = self
        {
            if let Some(breakage) =
                Breakage::from_env("TINE_DEBUG_PROMOTION_BREAKS_BOOT", "promoted")?
            {
                *broken = Some(breakage);
            }
        }
        Ok(())
    }
}

pub(super) fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}

/// A 200 with a computed body.
pub(super) fn text_owned(body: String) -> Response<Body> {
    Response::new(full(Bytes::from(body)))
}
