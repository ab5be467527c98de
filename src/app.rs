//! The application API: the [`App`] trait and the [`Handler`] a worker serves.
//!
//! An app has two start-up phases. [`App::preload`] runs once in the generation-0 mold: load what
//! every worker shares copy-on-write (tables, models, indexes). [`App::boot`] runs in each worker
//! after the fork: open what must be per process (connection pools, runtimes' clients), and return
//! the [`Handler`] that serves requests. Nothing in this module depends on the worker's internals.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use bytes::Bytes;

pub use crate::body::{full, Body, BoxError};
use crate::config::Config;
pub use crate::request_body::{BodyTimedOut, RequestBody};

/// The request type a worker hands to the app's service. Its body is hyper's `Incoming`, watched
/// for `body_read_timeout` (see [`RequestBody`]).
pub type Request = http::Request<RequestBody>;
/// The app's HTTP service as a worker serves it: any `tower::Service` over [`Request`]s, its
/// type erased ([`HttpService::new`]; [`Handler::http`] makes one). Cloneable, and itself a
/// `tower::Service` whose every call boxes its future, as tower's `BoxCloneService` does.
///
/// Why not a `BoxCloneService`: a worker calls it once per request, and each layer of that one
/// (a dynamic `poll_ready`, a dynamic `call`, its `MapFuture`, the `service_fn` that converts
/// the response) moved the request or the response once more. Here a request is one dynamic
/// call, which calls the service in place when it is ready (nearly always) and boxes its future
/// with the conversion of its response.
pub struct HttpService {
    inner: Box<dyn ErasedService>,
}

/// The app's future as a worker receives it: its response converted to [`Body`].
pub(crate) type AppFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl HttpService {
    /// Erases `service`'s type. Its errors become `500 Internal Server Error` (and are logged),
    /// its response bodies [`Body`] ([`Body::new`]).
    pub fn new<S, B>(service: S) -> HttpService
    where
        S: tower::Service<Request, Response = http::Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        HttpService {
            inner: Box::new(Typed(service)),
        }
    }

    /// Calls the service with `req` in place when it is ready now (most services always are: a
    /// `Router`, a `service_fn`), so a request costs no clone of it; otherwise a clone once it is
    /// ready, as tower requires.
    pub(crate) fn call_in_place(&mut self, req: Request) -> AppFuture {
        self.inner.call(req)
    }
}

impl Clone for HttpService {
    fn clone(&self) -> HttpService {
        HttpService {
            inner: self.inner.clone_box(),
        }
    }
}

impl std::fmt::Debug for HttpService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpService")
    }
}

/// Always ready: a call that finds the service not ready waits for a clone of it instead.
impl tower::Service<Request> for HttpService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = AppFuture;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> AppFuture {
        self.inner.call(req)
    }
}

/// An app's service behind [`HttpService`].
trait ErasedService: Send {
    fn call(&mut self, req: Request) -> AppFuture;
    fn clone_box(&self) -> Box<dyn ErasedService>;
}

struct Typed<S>(S);

impl<S, B> ErasedService for Typed<S>
where
    S: tower::Service<Request, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    fn call(&mut self, req: Request) -> AppFuture {
        use futures_util::FutureExt as _;
        use std::task::{Context, Poll, Waker};
        use tower::ServiceExt as _;
        // A `map` of the app's future rather than an `async` block awaiting it: the future boxed
        // is then the app's future and nothing more (an `async` block keeps the future it awaits
        // twice, as its capture and as the awaited value, and moves it from one to the other on
        // its first poll). The rare not-ready path has its own box: in the common future it
        // would carry the request.
        match self.0.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => Box::pin(self.0.call(req).map(answer)),
            _ => Box::pin(self.0.clone().oneshot(req).map(answer)),
        }
    }

    fn clone_box(&self) -> Box<dyn ErasedService> {
        Box::new(Typed(self.0.clone()))
    }
}

/// The app's answer as a worker sends it: its body a [`Body`], an error a `500`.
fn answer<B, E>(answer: Result<http::Response<B>, E>) -> Result<http::Response<Body>, Infallible>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    E: Into<BoxError>,
{
    Ok(match answer {
        Ok(r) => r.map(Body::new),
        Err(e) => {
            let e: BoxError = e.into();
            tracing::error!(error = %e, "service error");
            let mut resp =
                http::Response::new(full(Bytes::from_static(b"internal server error\n")));
            *resp.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            resp
        }
    })
}
/// A boxed raw stream handler.
pub type StreamHandler =
    Arc<dyn Fn(Connection) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A user application served by tine.
///
/// `Self` is the state that `preload` builds in the mold; every worker forked from that mold sees it
/// copy-on-write. Read shared data through plain references, not per-request `Arc` clones: a
/// reference-count increment is a write that un-shares the page (see docs/FORK_SAFETY.md).
pub trait App: Sized + 'static {
    /// Checks the configuration before anything starts (`tine check`, and `serve` before binding).
    fn check(config: &Config) -> anyhow::Result<()> {
        let _ = config;
        Ok(())
    }

    /// Builds the shared state, once, in the generation-0 mold.
    fn preload(ctx: &Context) -> anyhow::Result<Self>;

    /// Builds the per-process handler, in each worker.
    fn boot(&self, worker: &Worker) -> anyhow::Result<Handler>;

    /// Runs in a worker that is being promoted to the mold of a new generation, after its runtime
    /// is gone and before it forks anything: close what must not be inherited by new workers.
    fn before_mold(&mut self) -> anyhow::Result<()> {
        Ok(())
    }

    /// Whether every HTTP request carries its connection's addresses in its extensions
    /// ([`ConnectInfo`], and axum's and tonic's types with those Cargo features). Default `true`.
    ///
    /// An app that never reads them may return `false`: its requests then carry no extensions
    /// of tine's, which saves each request the map `http::Extensions` allocates on its first
    /// insert (three heap allocations and their frees, about a tenth of a `hello` request's
    /// user-space instructions), and each connection the two system calls that look its
    /// addresses up. Stream handlers are not affected ([`Connection::connect_info`]).
    fn connect_info(&self) -> bool {
        true
    }
}

/// What `preload` sees: the configuration.
#[derive(Debug)]
pub struct Context {
    pub(crate) config: Config,
}

impl Context {
    /// The running configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }
}

/// What `boot` sees: which worker this is.
#[derive(Debug)]
pub struct Worker {
    pub(crate) nr: u32,
    /// A hot spare booting before it knows which worker it will be.
    pub(crate) spare: bool,
    pub(crate) generation: u32,
    pub(crate) config: Config,
    pub(crate) shutdown: Shutdown,
}

static FORK_SAFE: AtomicBool = AtomicBool::new(true);

/// This process's worker number once it serves ([`Worker::current_nr`]); `u32::MAX`: none yet.
static CURRENT_NR: AtomicU32 = AtomicU32::new(u32::MAX);

/// Records the worker number this process serves as (at start, or at a spare's activation).
pub(crate) fn set_current_nr(nr: u32) {
    CURRENT_NR.store(nr, Ordering::Relaxed);
}

impl Worker {
    /// The worker number (`worker[N]` in `ps`).
    ///
    /// A hot spare (`spare_workers`) boots before it knows which worker it will replace: its
    /// `nr()` is then [`Worker::SPARE_NR`] and [`Worker::is_spare`] is true. It takes a number
    /// when the monitor activates it; read that with [`Worker::current_nr`] (for example in a
    /// handler) rather than keeping the number seen in `boot`. Until then nothing else shows a
    /// number for it either: `ps` says `tine spare (gen:N)`, its runtime threads `tine-spare-w`,
    /// the monitor's log lines carry no `nr`; once activated as worker N it is `worker[N]`, its
    /// threads `tine-wN` and its profiles `tine-profile-workerN-…`, like a worker booted as N.
    pub fn nr(&self) -> u32 {
        self.nr
    }

    /// What [`Worker::nr`] says in the `boot` of a hot spare, which has no number yet.
    pub const SPARE_NR: u32 = u32::MAX;

    /// Whether this `boot` runs in a hot spare: a worker booted ahead of need that accepts
    /// nothing until the monitor activates it in place of a worker that died, was recycled or
    /// is added. Its number is known only then ([`Worker::current_nr`]).
    pub fn is_spare(&self) -> bool {
        self.spare
    }

    /// The number of the worker this process serves as now: `None` in a spare not activated yet
    /// (and outside a worker).
    pub fn current_nr() -> Option<u32> {
        match CURRENT_NR.load(Ordering::Relaxed) {
            u32::MAX => None,
            nr => Some(nr),
        }
    }

    /// The generation of the mold this worker was forked from.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The running configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The signal that this worker has started draining: keep a clone wherever a connection may
    /// outlive a request (a WebSocket task, a stream handler, a response that streams events).
    ///
    /// A worker drains when it stops gracefully (`TERM`, scale down, a limit, a reload's
    /// roll-over) or is promoted to a mold (refork). It stops accepting, lets its requests finish
    /// and then waits, up to `graceful_timeout` (`spawn_timeout` for a promotion), for every
    /// connection it still has, upgraded ones (WebSockets) and stream connections included: the
    /// monitor kills it after that. A
    /// long-lived connection should therefore watch this signal and end itself politely (a
    /// WebSocket close frame `1001 going away`, a goodbye line), so the client reconnects to a
    /// worker that stays and this one exits at once. See [`Shutdown`].
    pub fn shutdown(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Marks this process as no longer safe to fork (for example after starting a thread or
    /// opening a connection that children must not share): it will never be promoted to a mold.
    pub fn mark_not_fork_safe() {
        FORK_SAFE.store(false, Ordering::Relaxed);
    }

    /// Whether this process may still be promoted to a mold.
    pub fn is_fork_safe() -> bool {
        FORK_SAFE.load(Ordering::Relaxed)
    }
}

/// The signal that a worker has started draining, from [`Worker::shutdown`]: cheap to clone (a
/// reference count), usable from any task of the worker's runtime.
///
/// ```no_run
/// # use tine::{App, Context, Handler, Worker};
/// # use tokio::io::AsyncWriteExt;
/// # struct Ticker;
/// # impl App for Ticker {
/// #     fn preload(_: &Context) -> anyhow::Result<Self> { Ok(Ticker) }
/// fn boot(&self, worker: &Worker) -> anyhow::Result<Handler> {
///     let shutdown = worker.shutdown();
///     Ok(Handler::stream(move |mut conn| {
///         let shutdown = shutdown.clone();
///         async move {
///             let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
///             loop {
///                 tokio::select! {
///                     _ = shutdown.wait() => {
///                         // Told before the connection is cut: say goodbye and end it.
///                         let _ = conn.write_all(b"bye: server going away\n").await;
///                         return;
///                     }
///                     _ = tick.tick() => {
///                         if conn.write_all(b"tick\n").await.is_err() {
///                             return;
///                         }
///                     }
///                 }
///             }
///         }
///     }))
/// }
/// # }
/// ```
///
/// `examples/axum.rs` does the same for a WebSocket route (a close frame `1001 going away`).
/// Nothing of this costs a request anything: an app that never asks for the signal pays nothing.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: tokio_util::sync::CancellationToken,
}

impl Shutdown {
    /// Whether the worker has started draining.
    pub fn is_draining(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes when the worker starts draining (at once if it has). Owns what it needs, so it
    /// can be moved into a spawned task or polled in a `select!` loop; making one costs a
    /// reference count, not an allocation.
    pub fn wait(&self) -> impl Future<Output = ()> + Send + Sync + 'static {
        self.token.clone().cancelled_owned()
    }

    /// Starts the drain: every waiter wakes.
    pub(crate) fn begin(&self) {
        self.token.cancel();
    }
}

/// What a worker serves: an HTTP service or a raw stream handler.
#[derive(Clone)]
pub enum Handler {
    /// Any `tower::Service` over HTTP requests, such as an axum `Router`.
    Http(HttpService),
    /// A function called with every accepted connection.
    Stream(StreamHandler),
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Handler::Http(_) => "Handler::Http",
            Handler::Stream(_) => "Handler::Stream",
        })
    }
}

impl Handler {
    /// Serves HTTP with `service` (for example an axum `Router`). Service errors become 500.
    pub fn http<S, B>(service: S) -> Handler
    where
        S: tower::Service<Request, Response = http::Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Handler::Http(HttpService::new(service))
    }

    /// Serves raw connections: `handler` is called with each accepted connection.
    pub fn stream<F, Fut>(handler: F) -> Handler
    where
        F: Fn(Connection) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Handler::Stream(Arc::new(move |c| Box::pin(handler(c))))
    }
}

/// The two ends of the connection a request came on: in every request's extensions.
///
/// Read it with `req.extensions().get::<tine::ConnectInfo>()`, or in axum with the
/// `Extension<tine::ConnectInfo>` extractor. With tine's Cargo feature `axum`, a TCP request also
/// carries axum's `ConnectInfo<SocketAddr>` (the `ConnectInfo` extractor works as under
/// `axum::serve` with `into_make_service_with_connect_info`); with `tonic`, tonic's
/// `TcpConnectInfo` or `UdsConnectInfo` (so `tonic::Request::remote_addr()` works).
///
/// ```
/// # use tine::ConnectInfo;
/// fn client<B>(req: &http::Request<B>) -> String {
///     match req.extensions().get::<ConnectInfo>() {
///         Some(ConnectInfo::Tcp { peer, .. }) => peer.ip().to_string(),
///         Some(ConnectInfo::Unix { peer: Some(cred), .. }) => format!("uid {}", cred.uid()),
///         _ => "unknown".into(),
///     }
/// }
/// ```
///
/// A stream handler gets the same from [`Connection::connect_info`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectInfo {
    /// A TCP connection.
    Tcp {
        /// The client's address.
        peer: std::net::SocketAddr,
        /// The address it connected to (the listener's, or with a wildcard listener, the
        /// interface's).
        local: std::net::SocketAddr,
    },
    /// A unix socket connection.
    Unix {
        /// The client process's credentials (`SO_PEERCRED`), if the kernel gave them.
        peer: Option<tokio::net::unix::UCred>,
        /// The listening socket's path, if it has one.
        local: Option<Arc<std::path::Path>>,
    },
}

impl ConnectInfo {
    /// The client's address, for a TCP connection.
    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            ConnectInfo::Tcp { peer, .. } => Some(*peer),
            ConnectInfo::Unix { .. } => None,
        }
    }

    /// The local address, for a TCP connection.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            ConnectInfo::Tcp { local, .. } => Some(*local),
            ConnectInfo::Unix { .. } => None,
        }
    }
}

/// An accepted connection handed to a [`Handler::Stream`].
#[derive(Debug)]
pub enum Connection {
    /// A TCP connection.
    Tcp(tokio::net::TcpStream),
    /// A unix stream connection.
    Unix(tokio::net::UnixStream),
}

/// What every request of one connection carries in its extensions, made once per connection.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    info: ConnectInfo,
    /// tonic's own type for a unix socket (its peer address is shared, not copied, per request).
    #[cfg(feature = "tonic")]
    tonic_uds: Option<tonic::transport::server::UdsConnectInfo>,
}

impl Peer {
    /// A connection accepted on TCP.
    pub(crate) fn tcp(peer: std::net::SocketAddr, local: std::net::SocketAddr) -> Peer {
        Peer {
            info: ConnectInfo::Tcp { peer, local },
            #[cfg(feature = "tonic")]
            tonic_uds: None,
        }
    }

    /// A connection accepted on a unix socket whose path is `local`.
    pub(crate) fn unix(
        stream: &tokio::net::UnixStream,
        local: Option<Arc<std::path::Path>>,
    ) -> Peer {
        let peer = stream.peer_cred().ok();
        Peer {
            info: ConnectInfo::Unix { peer, local },
            #[cfg(feature = "tonic")]
            tonic_uds: Some(tonic::transport::server::UdsConnectInfo {
                peer_addr: stream.peer_addr().ok().map(Arc::new),
                peer_cred: peer,
            }),
        }
    }

    /// The extensions every request of this connection carries, made once per connection: each
    /// request gets a clone (`http::Extensions::extend` takes it whole into a request's empty
    /// extensions), which costs no hashing and no growing of the map, unlike inserting anew.
    pub(crate) fn extensions(&self) -> http::Extensions {
        let mut extensions = http::Extensions::new();
        self.insert_into(&mut extensions);
        extensions
    }

    /// Puts the connection's addresses into a request's extensions: tine's type, and the
    /// ecosystem's with their Cargo features.
    fn insert_into(&self, extensions: &mut http::Extensions) {
        #[cfg(feature = "axum")]
        if let ConnectInfo::Tcp { peer, .. } = self.info {
            extensions.insert(axum::extract::ConnectInfo(peer));
        }
        #[cfg(feature = "tonic")]
        match (&self.info, &self.tonic_uds) {
            (ConnectInfo::Tcp { peer, local }, _) => {
                extensions.insert(tonic::transport::server::TcpConnectInfo {
                    local_addr: Some(*local),
                    remote_addr: Some(*peer),
                });
            }
            (ConnectInfo::Unix { .. }, Some(uds)) => {
                extensions.insert(uds.clone());
            }
            (ConnectInfo::Unix { .. }, None) => {}
        }
        extensions.insert(self.info.clone());
    }
}

impl Connection {
    /// The two ends of this connection, as an HTTP request's [`ConnectInfo`] has them.
    pub fn connect_info(&self) -> std::io::Result<ConnectInfo> {
        match self {
            Connection::Tcp(s) => Ok(ConnectInfo::Tcp {
                peer: s.peer_addr()?,
                local: s.local_addr()?,
            }),
            Connection::Unix(s) => Ok(ConnectInfo::Unix {
                peer: s.peer_cred().ok(),
                local: s.local_addr()?.as_pathname().map(Arc::from),
            }),
        }
    }
}

impl tokio::io::AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Connection::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Connection::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Connection::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Connection::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Connection::Tcp(s) => Pin::new(s).poll_flush(cx),
            Connection::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Connection::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Connection::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
