//! HTTP serving with hyper: HTTP/1.1 keep-alive, HTTP/2 with prior knowledge, a request-head
//! timeout and size limit, and graceful drain.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower::ServiceExt;

use super::Stop;
use crate::app::{full, HttpService, Request};
use crate::config::Config;
use crate::ipc::scoreboard::SlotWriter;
use crate::listener::Listener;

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
    let builder: &'static auto::Builder<TokioExecutor> = Box::leak(Box::new(builder(&config)));
    Ok(tokio::spawn(async move {
        let graceful = GracefulShutdown::new();
        loop {
            let accepted = tokio::select! {
                biased;
                _ = stop.changed() => break,
                a = listener.accept(config.nodelay) => a,
            };
            let service = request_service(service.clone(), config.clone(), slot);
            match accepted {
                Accepted::Tcp(s) => {
                    let conn = graceful.watch(builder.serve_connection_with_upgrades(TokioIo::new(s), service));
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                }
                Accepted::Unix(s) => {
                    let conn = graceful.watch(builder.serve_connection_with_upgrades(TokioIo::new(s), service));
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                }
            }
        }
        // Stop accepting before draining: the listener's duplicate closes here.
        drop(listener);
        // Kept-alive connections answer their next request with `Connection: close`; idle ones
        // close now. The monitor's graceful_timeout bounds this.
        graceful.shutdown().await;
    }))
}

fn builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(config.max_header_bytes)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    if config.http2 {
        builder
    } else {
        builder.http1_only()
    }
}

/// Wraps the app's service: scoreboard accounting, the request timeout, the debug header.
fn request_service(
    service: HttpService,
    config: Arc<Config>,
    slot: SlotWriter<'static>,
) -> impl hyper::service::Service<
    Request,
    Response = http::Response<crate::app::Body>,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<Output = Result<http::Response<crate::app::Body>, std::convert::Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |req: Request| {
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
            if config.debug_headers {
                response.headers_mut().insert("x-tine-worker", http::HeaderValue::from(std::process::id()));
            }
            Ok(response)
        }
    })
}
