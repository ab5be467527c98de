//! `hello`, the benchmark app: `GET /` answers `hello`.
//!
//! Its debug hooks, active only with `--debug-routes` (tests use them to make real failures): the
//! routes `/sleep/MS`, `/stream/MS` (a body that pauses), `/spin` (blocks the worker's thread
//! forever), `/leak/KB`, `/crash` (aborts), `/subprocess/SECS` (starts `sleep SECS`, answers its
//! pid), `/echo` and `/connect-info` (whether the request carries a `tine::ConnectInfo`: the
//! reference apps read none, so they ask tine for none); the environment variable `TINE_DEBUG_BOOT_SLEEP_MS`, which makes every
//! worker's `boot` block that long before it reports ready (a worker that never gets ready, for
//! `spawn_timeout`); `TINE_DEBUG_PROMOTION_BREAKS_BOOT=FILE`: a worker promoted to mold while
//! `FILE` exists keeps a broken state, so every worker that mold forks fails in `boot` (an app
//! whose state does not survive promotion, for the rollback of a failed refork); and
//! `TINE_DEBUG_PRELOAD_BREAKS_BOOT=FILE`: the same for a mold that preloads while `FILE` exists
//! (the new mold of a reload: a deploy that cannot boot). For both, a number `N` in `FILE` lets
//! the first `N` workers of that mold boot and breaks only the later ones (a deploy that works in
//! one worker and fails in the next, for the rollback of a rollout half done).

use std::convert::Infallible;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http::{Response, StatusCode};
use tine::app::{full, Body, Request};

use super::{text, text_owned};

/// How the workers of a mold made under a debug knob fail in `boot` (debug routes only).
pub struct Breakage {
    /// Why `boot` fails.
    why: String,
    /// Workers of this mold that boot normally before the others fail (the file's number).
    spared: u32,
    /// Prefix of the files by which this mold's workers claim their turn to boot (`PREFIX1`,
    /// `PREFIX2`, …, each created exclusively, so two workers never get the same turn).
    turns: String,
}

impl Breakage {
    /// The breakage that the knob `var` asks of a mold made (`how`: preloaded, promoted) now:
    /// none unless the file it names exists.
    pub(super) fn from_env(var: &str, how: &str) -> anyhow::Result<Option<Breakage>> {
        let Some(file) = std::env::var_os(var) else {
            return Ok(None);
        };
        let file = Path::new(&file);
        let Ok(text) = std::fs::read_to_string(file) else {
            return Ok(None);
        };
        let spared = match text.trim() {
            "" => 0,
            n => n.parse().with_context(|| {
                format!(
                    "invalid content {n:?} in {} ({var}): expected a number of workers",
                    file.display()
                )
            })?,
        };
        Ok(Some(Breakage {
            why: format!("debug: {how} while {} existed ({var})", file.display()),
            spared,
            turns: format!("{}.boot-{}-", file.display(), std::process::id()),
        }))
    }

    /// Called in `boot`: fails unless this worker is one of the first `spared` of its mold.
    pub(super) fn take_turn(&self) -> anyhow::Result<()> {
        for turn in 1..=self.spared {
            let claim = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(format!("{}{turn}", self.turns));
            match claim {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => bail!("{}: cannot claim a turn: {e}", self.why),
            }
        }
        if self.spared == 0 {
            bail!("{}", self.why);
        }
        bail!(
            "{}: only the first {} worker(s) of this mold boot",
            self.why,
            self.spared
        )
    }
}

/// `TINE_DEBUG_BOOT_SLEEP_MS`: blocks this worker's boot (debug routes only).
pub(super) fn debug_boot_sleep() -> anyhow::Result<()> {
    let Ok(value) = std::env::var("TINE_DEBUG_BOOT_SLEEP_MS") else {
        return Ok(());
    };
    let ms: u64 = value.trim().parse().with_context(|| {
        format!("invalid value {value:?} for TINE_DEBUG_BOOT_SLEEP_MS: expected milliseconds")
    })?;
    tracing::warn!(ms, "TINE_DEBUG_BOOT_SLEEP_MS: sleeping in boot");
    std::thread::sleep(Duration::from_millis(ms));
    Ok(())
}

/// What `hello` answers: a fixed text, made when polled, or any other response, boxed (the debug
/// routes only). The future stays small: a worker boxes it and moves it into the box, so a
/// response made at once would be copied with it (a `std::future::Ready` of it is as large as
/// the response), and copied out again when polled.
pub(super) enum HelloFuture {
    /// A text response (`GET /`, and not found).
    Text(StatusCode, &'static str),
    /// Anything else.
    Other(std::pin::Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>),
}

impl Future for HelloFuture {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.get_mut() {
            HelloFuture::Text(status, body) => std::task::Poll::Ready(Ok(text(*status, body))),
            HelloFuture::Other(other) => other.as_mut().poll(cx),
        }
    }
}

/// The benchmark app. Routed before any await: the request is not kept in the response future,
/// so the common answer costs no copies of it.
pub(super) fn hello(req: &Request, debug: bool) -> HelloFuture {
    let now = |r: Response<Body>| HelloFuture::Other(Box::pin(std::future::ready(Ok(r))));
    let path = req.uri().path();
    if path == "/" {
        return HelloFuture::Text(StatusCode::OK, "hello\n");
    }
    if !debug {
        return HelloFuture::Text(StatusCode::NOT_FOUND, "not found\n");
    }
    let arg = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|n| n.parse::<u64>().ok())
    };
    if let Some(ms) = arg("/stream/") {
        // The head and a first line now, the last line after a pause (a stream that idles, as
        // server-sent events do between events).
        now(Response::new(Body::new(Paused {
            pause: Box::pin(tokio::time::sleep(Duration::from_millis(ms))),
            sent: 0,
        })))
    } else if let Some(ms) = arg("/sleep/") {
        HelloFuture::Other(Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(text(StatusCode::OK, "slept\n"))
        }))
    } else if path == "/spin" {
        // Blocks the worker's only thread: what the hang detector is for.
        #[allow(clippy::empty_loop)]
        loop {}
    } else if let Some(kb) = arg("/leak/") {
        let mut block = vec![0u8; (kb as usize) * 1024];
        for page in block.chunks_mut(4096) {
            page[0] = 1;
        }
        std::mem::forget(block);
        now(text(StatusCode::OK, "leaked\n"))
    } else if path == "/connect-info" {
        let carried = req.extensions().get::<tine::ConnectInfo>().is_some();
        now(text(
            StatusCode::OK,
            if carried { "carried\n" } else { "none\n" },
        ))
    } else if path == "/crash" {
        std::process::abort();
    } else if let Some(secs) = arg("/subprocess/") {
        // A subprocess as apps start them (std's Command): what it inherits is what leaks.
        match std::process::Command::new("sleep")
            .arg(secs.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            Ok(child) => now(text_owned(format!("{}\n", child.id()))),
            Err(e) => now(text_owned(format!("cannot run sleep: {e}\n"))),
        }
    } else {
        now(text(StatusCode::NOT_FOUND, "not found\n"))
    }
}

/// `/echo` (debug routes): reads the whole request body, then answers it. A body that fails
/// (the client left, or stopped sending for `body_read_timeout`) is answered 400 with the error;
/// tine answers a timed-out body 408 itself.
pub(super) fn echo(req: Request) -> HelloFuture {
    use http_body_util::BodyExt;
    HelloFuture::Other(Box::pin(async move {
        Ok(match req.into_body().collect().await {
            Ok(body) => Response::new(full(body.to_bytes())),
            Err(e) => {
                let mut r = text_owned(format!("cannot read the body: {e}\n"));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                r
            }
        })
    }))
}

/// The body of `/stream/MS`: `first\n`, a pause, `last\n`.
struct Paused {
    pause: std::pin::Pin<Box<tokio::time::Sleep>>,
    sent: u8,
}

impl http_body::Body for Paused {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        use std::future::Future as _;
        use std::task::Poll;
        let this = &mut *self;
        let line = match this.sent {
            0 => "first\n",
            1 if this.pause.as_mut().poll(cx).is_pending() => return Poll::Pending,
            1 => "last\n",
            _ => return Poll::Ready(None),
        };
        self.sent += 1;
        Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
            line.as_bytes(),
        )))))
    }
}
