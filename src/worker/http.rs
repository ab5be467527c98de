//! HTTP serving with hyper: HTTP/1.1 keep-alive, HTTP/2 with prior knowledge, a request-head
//! timeout and size limit, and graceful drain.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
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
            let activity = Arc::new(Activity::default());
            let service = request_service(service.clone(), config.clone(), slot, activity.clone());
            let life = ConnectionLife {
                stop: stop.clone(),
                activity,
                patience: config.header_read_timeout,
                _open: open.clone(),
            };
            match accepted {
                Accepted::Tcp(s) => builder.spawn(s, service, life),
                Accepted::Unix(s) => builder.spawn(s, service, life),
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

/// The connection builders: HTTP/1.1, and HTTP/2 with prior knowledge when enabled.
///
/// The protocol is told by peeking at the first bytes (the HTTP/2 preface) before hyper sees the
/// socket, once per connection. hyper-util's auto builder does that by wrapping the stream in a
/// rewind buffer that every later read goes through, and its `serve_connection_with_upgrades`
/// ignores `http1_only`; peeking keeps the request path as short as plain hyper's.
struct Builder {
    http1: http1::Builder,
    http2: Option<http2::Builder<TokioExecutor>>,
}

/// A socket whose first bytes can be looked at without consuming them.
trait Peek: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Sync + 'static {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    fn try_peek(&self, buf: &mut [u8]) -> io::Result<usize>;
}

fn peek_fd(fd: std::os::fd::RawFd, buf: &mut [u8]) -> io::Result<usize> {
    use nix::sys::socket::{recv, MsgFlags};
    recv(fd, buf, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)
}

impl Peek for tokio::net::TcpStream {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        tokio::net::TcpStream::readable(self)
    }
    fn try_peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        self.try_io(tokio::io::Interest::READABLE, || {
            peek_fd(self.as_raw_fd(), buf)
        })
    }
}

impl Peek for tokio::net::UnixStream {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        tokio::net::UnixStream::readable(self)
    }
    fn try_peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        self.try_io(tokio::io::Interest::READABLE, || {
            peek_fd(self.as_raw_fd(), buf)
        })
    }
}

/// Whether the client opens with the HTTP/2 preface. `Err` if it closed first.
async fn starts_with_http2_preface<S: Peek>(stream: &S) -> io::Result<bool> {
    const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut buf = [0u8; 24];
    loop {
        stream.readable().await?;
        match stream.try_peek(&mut buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) if buf[..n] != PREFACE[..n] => return Ok(false),
            Ok(n) if n == PREFACE.len() => return Ok(true),
            // A preface split across packets (rare): the bytes stay readable, so wait a moment
            // rather than spin; the caller's deadline bounds this.
            Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

impl Builder {
    fn new(config: &Config) -> Builder {
        // No timer for HTTP/1: hyper would arm a boxed sleep for every request head. The head
        // deadline is kept per connection instead, by `ConnectionLife::drive`'s coarse watch.
        let mut http1 = http1::Builder::new();
        http1.max_buf_size(config.max_header_bytes).keep_alive(true);
        let http2 = config.http2.then(|| {
            let mut b = http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new());
            b
        });
        Builder { http1, http2 }
    }

    /// Serves one connection in a task of its own.
    fn spawn<I, S>(&'static self, io: I, service: S, life: ConnectionLife)
    where
        I: Peek,
        S: hyper::service::Service<
                Request,
                Response = http::Response<crate::app::Body>,
                Error = std::convert::Infallible,
            > + Send
            + 'static,
        S::Future: Send + 'static,
    {
        tokio::spawn(async move {
            let sniffed = match &self.http2 {
                None => false,
                Some(_) => {
                    match tokio::time::timeout(life.patience, starts_with_http2_preface(&io)).await
                    {
                        Ok(Ok(h2)) => h2,
                        // Closed, failed, or silent past the head deadline (slowloris): drop it.
                        _ => return,
                    }
                }
            };
            let io = Counted {
                inner: io,
                activity: life.activity.clone(),
            };
            if let (true, Some(http2)) = (sniffed, &self.http2) {
                let conn = http2.serve_connection(TokioIo::new(io), service);
                return life.drive(conn, |c| c.graceful_shutdown()).await;
            }
            let conn = self
                .http1
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            life.drive(conn, |c| c.graceful_shutdown()).await
        });
    }
}

/// What one connection's task needs besides the connection: the worker's stop signal (to drain),
/// whether a request has arrived yet, and the drain tracker.
struct ConnectionLife {
    stop: watch::Receiver<Stop>,
    activity: Arc<Activity>,
    patience: Duration,
    _open: mpsc::Sender<()>,
}

impl ConnectionLife {
    /// Serves `conn` to its end. When the worker stops, `drain` asks it to finish gracefully.
    ///
    /// Deadlines are kept coarsely, with one ticker per connection (period `patience`) instead of
    /// a timer armed for every request: at each tick, a connection that has completed no request
    /// head, written nothing and has no request in flight since the previous tick is closed. So a
    /// client that sends nothing, trickles a head (slowloris), or idles on keep-alive is cut off
    /// after `patience` to `2 × patience` (the first head must come within `patience`); a slow
    /// download (writes) or a long request (in flight) is not.
    async fn drive<C: Future>(mut self, conn: C, drain: fn(Pin<&mut C>)) {
        let mut conn = std::pin::pin!(conn);
        let start = tokio::time::Instant::now() + self.patience;
        let mut watch = tokio::time::interval_at(start, self.patience);
        let mut last = self.activity.progress();
        // The drain waits for the first request: a graceful shutdown before it would close a
        // fresh connection whose request is already on its way, unanswered (a reset or an empty
        // reply while a worker is recycled). Once a request is in, hyper drains properly (it
        // answers it, with `Connection: close`); a connection that never sends one is closed by
        // the watch as usual.
        let mut stopping = *self.stop.borrow_and_update() != Stop::Running;
        let mut draining = false;
        loop {
            if stopping && !draining && self.activity.heads.load(Ordering::Relaxed) > 0 {
                draining = true;
                drain(conn.as_mut());
            }
            tokio::select! {
                // The connection is the hot branch: poll it first, skip select's random start.
                biased;
                _ = conn.as_mut() => return,
                _ = watch.tick() => {
                    let now = self.activity.progress();
                    if now == last && self.activity.busy.load(Ordering::Relaxed) == 0 {
                        return; // dropping the connection closes the socket
                    }
                    last = now;
                }
                _ = self.stop.changed(), if !stopping => stopping = true,
                // Stopping, and the first request not in yet: drain once it is.
                _ = self.activity.arrived.notified(), if stopping && !draining => {}
            }
        }
    }
}

/// What a connection has done, for its coarse deadlines and its drain: request heads completed
/// (the first one also wakes a drain waiting for it; notify_one keeps a permit, so an arrival
/// between two looks is not lost), writes, and requests in flight.
#[derive(Default)]
struct Activity {
    arrived: tokio::sync::Notify,
    heads: AtomicU64,
    writes: AtomicU64,
    busy: AtomicU64,
}

impl Activity {
    /// Called for every request head.
    fn mark(&self) {
        if self.heads.fetch_add(1, Ordering::Relaxed) == 0 {
            self.arrived.notify_one();
        }
    }

    fn progress(&self) -> (u64, u64) {
        (
            self.heads.load(Ordering::Relaxed),
            self.writes.load(Ordering::Relaxed),
        )
    }
}

/// Counts a request in flight on its connection until dropped (however the request ends).
struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: &Arc<Activity>) -> Busy {
        activity.busy.fetch_add(1, Ordering::Relaxed);
        Busy(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's socket, counting successful writes for the coarse deadline watch.
struct Counted<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            if *n > 0 {
                self.activity.writes.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            if *n > 0 {
                self.activity.writes.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The size of a request head as sent, near enough: request line and header lines.
fn head_size(req: &Request) -> usize {
    let line = req.method().as_str().len()
        + req.uri().path_and_query().map_or(1, |p| p.as_str().len())
        + 12;
    req.headers()
        .iter()
        .fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}

/// Wraps the app's service: scoreboard accounting, the request timeout, the debug header.
fn request_service(
    service: HttpService,
    config: Arc<Config>,
    slot: SlotWriter<'static>,
    activity: Arc<Activity>,
) -> impl hyper::service::Service<
    Request,
    Response = http::Response<crate::app::Body>,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<
        Output = Result<http::Response<crate::app::Body>, std::convert::Infallible>,
    > + Send,
> + Clone {
    // Per-connection copies of what every request needs: no reference count touched per request.
    let (max_head, request_timeout, debug_headers) = (
        config.max_header_bytes,
        config.request_timeout,
        config.debug_headers,
    );
    // The connection's own handle on the service, called in place: `Handler::http` services are
    // always ready, so a request costs no clone of the boxed service. One that is not ready (a
    // hand-built `Handler::Http`) is cloned and driven to readiness as tower requires.
    let own = std::cell::RefCell::new(service);
    hyper::service::service_fn(move |req: Request| {
        activity.mark();
        let busy = Busy::new(&activity);
        // hyper bounds its read buffer by max_header_bytes, but a head that arrives in one large
        // read can pass whole; the limit is a promise, so check it exactly.
        let oversized = head_size(&req) > max_head;
        let http1 = req.version() <= http::Version::HTTP_11;
        // Ends (counted, and no longer the oldest in flight) when dropped, however the request
        // ends: the scoreboard's hang detection sees the oldest request's age.
        let guard = slot.track_request(req.method().as_str(), req.uri().path());
        let call = {
            let mut svc = own.borrow_mut();
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            match tower::Service::poll_ready(&mut *svc, &mut cx) {
                std::task::Poll::Ready(Ok(())) => tower::Service::call(&mut *svc, req),
                _ => Box::pin(svc.clone().oneshot(req)),
            }
        };
        async move {
            if oversized {
                let mut r = http::Response::new(full("request header fields too large\n"));
                *r.status_mut() = http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
                r.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
                return Ok(r);
            }
            let mut response = if request_timeout.is_zero() {
                call.await?
            } else {
                match tokio::time::timeout(request_timeout, call).await {
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
            drop(busy);
            if http1 && DRAINING.load(Ordering::Relaxed) {
                response.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            if debug_headers {
                response
                    .headers_mut()
                    .insert("x-tine-worker", http::HeaderValue::from(std::process::id()));
            }
            Ok(response)
        }
    })
}
