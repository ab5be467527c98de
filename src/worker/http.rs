//! HTTP serving with hyper: HTTP/1.1 keep-alive, HTTP/2 with prior knowledge, a request-head
//! timeout and size limit, and graceful drain.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tower::ServiceExt;

use super::Stop;
use crate::app::{full, HttpService, Request};
use crate::config::Config;
use crate::ipc::scoreboard::SlotWriter;
use crate::listener::Listener;

/// Set when this worker starts draining. An HTTP/1 response written from then on says
/// `Connection: close` itself: hyper's graceful shutdown only marks a request it is already
/// serving, so the first request of a fresh connection, read and answered in the same turn as
/// the drain began, was answered as kept alive and then the connection closed under the client.
pub(super) static DRAINING: AtomicBool = AtomicBool::new(false);

/// An accepted connection of either listener kind.
enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// A listener converted to tokio (a duplicate of the inherited descriptor).
pub(super) enum AsyncListener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl AsyncListener {
    pub(super) fn from_listener(listener: &Listener) -> io::Result<AsyncListener> {
        Ok(match listener {
            Listener::Tcp(l, _) => {
                let l = l.try_clone()?;
                l.set_nonblocking(true)?;
                AsyncListener::Tcp(tokio::net::TcpListener::from_std(l)?)
            }
            Listener::Unix(l, _) => {
                let l = l.try_clone()?;
                l.set_nonblocking(true)?;
                AsyncListener::Unix(tokio::net::UnixListener::from_std(l)?)
            }
        })
    }

    /// Accepts the next connection, waiting out transient errors (a full fd table, a connection
    /// reset before it was accepted) rather than ending the loop.
    async fn accept(&self, nodelay: bool) -> Accepted {
        loop {
            let result = match self {
                AsyncListener::Tcp(l) => l.accept().await.map(|(s, _)| {
                    if nodelay {
                        let _ = s.set_nodelay(true);
                    }
                    Accepted::Tcp(s)
                }),
                AsyncListener::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
            };
            match result {
                Ok(a) => return a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Accepts a connection as a stream handler's [`crate::app::Connection`].
    pub(super) async fn accept_connection(&self, nodelay: bool) -> crate::app::Connection {
        match self.accept(nodelay).await {
            Accepted::Tcp(s) => crate::app::Connection::Tcp(s),
            Accepted::Unix(s) => crate::app::Connection::Unix(s),
        }
    }
}

pub(super) fn spawn_accept_loop(
    listener: &Listener,
    service: HttpService,
    config: Arc<Config>,
    slot: SlotWriter<'static>,
    mut stop: watch::Receiver<Stop>,
) -> io::Result<JoinHandle<()>> {
    let listener = AsyncListener::from_listener(listener)?;
    // The builder lives as long as the worker; leaking it gives connections a 'static borrow.
    let builder: &'static Builder = Box::leak(Box::new(Builder::new(&config)));
    Ok(tokio::spawn(async move {
        // Every connection task holds a clone of `open`; `recv` returns None once all have ended.
        let (open, mut all_closed) = mpsc::channel::<()>(1);
        loop {
            let accepted = tokio::select! {
                biased;
                _ = stop.changed() => break,
                a = listener.accept(config.nodelay) => a,
            };
            let first_request = Arc::new(FirstRequest::default());
            let service =
                request_service(service.clone(), config.clone(), slot, first_request.clone());
            let life = ConnectionLife {
                stop: stop.clone(),
                first_request,
                patience: config.header_read_timeout,
                _open: open.clone(),
            };
            match accepted {
                Accepted::Tcp(s) => builder.spawn(TokioIo::new(s), service, life),
                Accepted::Unix(s) => builder.spawn(TokioIo::new(s), service, life),
            }
        }
        // Stop accepting before draining: the listener's duplicate closes here.
        drop(listener);
        // Kept-alive connections answer their next request with `Connection: close`; idle ones
        // close now. The monitor's graceful_timeout bounds this.
        drop(open);
        let _ = all_closed.recv().await;
    }))
}

/// The connection builder.
///
/// Why two kinds: hyper-util's auto builder ignores `http1_only` in
/// `serve_connection_with_upgrades` (documented there), so `--http2 false` still spoke HTTP/2;
/// with HTTP/2 off, hyper's own HTTP/1 builder serves (upgrades included).
enum Builder {
    Auto(auto::Builder<TokioExecutor>),
    Http1(http1::Builder),
}

impl Builder {
    fn new(config: &Config) -> Builder {
        if config.http2 {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(config.header_read_timeout)
                .max_buf_size(config.max_header_bytes)
                .keep_alive(true);
            builder.http2().timer(TokioTimer::new());
            Builder::Auto(builder)
        } else {
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(config.header_read_timeout)
                .max_buf_size(config.max_header_bytes)
                .keep_alive(true);
            Builder::Http1(builder)
        }
    }

    /// Serves one connection in a task of its own.
    fn spawn<I, S>(&'static self, io: TokioIo<I>, service: S, life: ConnectionLife)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        S: hyper::service::Service<
                Request,
                Response = http::Response<crate::app::Body>,
                Error = std::convert::Infallible,
            > + Send
            + 'static,
        S::Future: Send + 'static,
    {
        match self {
            Builder::Auto(b) => {
                let conn = b.serve_connection_with_upgrades(io, service);
                tokio::spawn(life.drive(conn, |c| c.graceful_shutdown()));
            }
            Builder::Http1(b) => {
                let conn = b.serve_connection(io, service).with_upgrades();
                tokio::spawn(life.drive(conn, |c| c.graceful_shutdown()));
            }
        }
    }
}

/// What one connection's task needs besides the connection: the worker's stop signal (to drain),
/// whether a request has arrived yet, and the drain tracker.
struct ConnectionLife {
    stop: watch::Receiver<Stop>,
    first_request: Arc<FirstRequest>,
    patience: Duration,
    _open: mpsc::Sender<()>,
}

impl ConnectionLife {
    /// Serves `conn` to its end. When the worker stops, `drain` asks it to finish gracefully.
    ///
    /// A connection with no complete request head within `patience` is closed. hyper's own
    /// `header_read_timeout` does not cover this: the auto builder first reads up to 24 bytes to
    /// tell HTTP/1 from the HTTP/2 preface, without a timer, so a client that sent nothing (or a
    /// partial preface) held its connection, and a worker's descriptors, for ever (slowloris).
    /// Later idle periods of an HTTP/1 connection are hyper's timer's.
    async fn drive<C: Future>(mut self, conn: C, drain: fn(Pin<&mut C>)) {
        let mut conn = std::pin::pin!(conn);
        let mut first_deadline = std::pin::pin!(tokio::time::sleep(self.patience));
        let mut waiting_first = true;
        // The drain waits for the first request: the auto builder's graceful shutdown *cancels* a
        // connection still telling HTTP/1 from HTTP/2, closing it with the client's request
        // unanswered (a reset or an empty reply while a worker is recycled). Once a request is
        // in, hyper drains properly (it answers it, with `Connection: close`); a connection that
        // never sends one is closed at `patience` as usual.
        let mut stopping = *self.stop.borrow_and_update() != Stop::Running;
        let mut draining = false;
        loop {
            if stopping && !draining && self.first_request.seen.load(Ordering::Relaxed) {
                draining = true;
                drain(conn.as_mut());
            }
            tokio::select! {
                // The connection is the hot branch: poll it first, skip select's random start.
                biased;
                _ = conn.as_mut() => return,
                _ = first_deadline.as_mut(), if waiting_first => {
                    if !self.first_request.seen.load(Ordering::Relaxed) {
                        return; // dropping the connection closes the socket
                    }
                    waiting_first = false;
                }
                _ = self.stop.changed(), if !stopping => stopping = true,
                // The first request is in: stop watching the deadline (so later wake-ups of this
                // connection poll nothing but it), and, if stopping, drain now.
                _ = self.first_request.arrived.notified(), if waiting_first || (stopping && !draining) => {
                    waiting_first = false;
                }
            }
        }
    }
}

/// Whether a connection's first request head has arrived, with a wake-up for a drain waiting for
/// it (notify_one keeps a permit, so an arrival between two looks is not lost).
#[derive(Default)]
struct FirstRequest {
    seen: AtomicBool,
    arrived: tokio::sync::Notify,
}

impl FirstRequest {
    /// Called for every request; only the first one notifies.
    fn mark(&self) {
        if !self.seen.load(Ordering::Relaxed) {
            self.seen.store(true, Ordering::Relaxed);
            self.arrived.notify_one();
        }
    }
}

/// Wraps the app's service: scoreboard accounting, the request timeout, the debug header.
fn request_service(
    service: HttpService,
    config: Arc<Config>,
    slot: SlotWriter<'static>,
    first_request: Arc<FirstRequest>,
) -> impl hyper::service::Service<
    Request,
    Response = http::Response<crate::app::Body>,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<
        Output = Result<http::Response<crate::app::Body>, std::convert::Infallible>,
    > + Send,
> + Clone {
    hyper::service::service_fn(move |req: Request| {
        first_request.mark();
        let http1 = req.version() <= http::Version::HTTP_11;
        // Ends (counted, and no longer the oldest in flight) when dropped, however the request
        // ends: the scoreboard's hang detection sees the oldest request's age.
        let guard = slot.track_request(req.method().as_str(), req.uri().path());
        let call = service.clone().oneshot(req);
        let config = config.clone();
        async move {
            let mut response = if config.request_timeout.is_zero() {
                call.await?
            } else {
                match tokio::time::timeout(config.request_timeout, call).await {
                    Ok(r) => r?,
                    Err(_) => {
                        // The handler's future was dropped with the timeout.
                        let mut r = http::Response::new(full("request timed out\n"));
                        *r.status_mut() = http::StatusCode::GATEWAY_TIMEOUT;
                        r
                    }
                }
            };
            drop(guard);
            if http1 && DRAINING.load(Ordering::Relaxed) {
                response.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            if config.debug_headers {
                response
                    .headers_mut()
                    .insert("x-tine-worker", http::HeaderValue::from(std::process::id()));
            }
            Ok(response)
        }
    })
}
