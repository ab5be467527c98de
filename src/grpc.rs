//! gRPC deadlines for a tonic service served by tine (Cargo feature `tonic`).
//!
//! tonic's own server (`tonic::transport::Server`) enforces the deadline a client sends in the
//! `grpc-timeout` header; a service served as plain HTTP (`tonic::service::Routes`, as under tine
//! or `axum::serve`) does not, so a method keeps working for a caller that gave up long ago. Wrap
//! the routes in [`DeadlineLayer`]:
//!
//! ```
//! use tower::Layer;
//!
//! /// `routes` is, for example, `Routes::new(GreeterServer::new(MyGreeter))`.
//! fn handler(routes: tonic::service::Routes) -> tine::Handler {
//!     tine::Handler::http(tine::grpc::DeadlineLayer::new().layer(routes))
//! }
//! ```
//!
//! A call still running when its deadline passes is dropped (the method's future is cancelled,
//! as under tonic's server) and ends with `DEADLINE_EXCEEDED`: a trailers-only response if the
//! method had not answered yet; for a streaming response already under way, trailers that end
//! the stream where it stands (tonic's own server times only the response head, and lets a
//! stream run past the deadline). tonic's server reports its own timeout as `CANCELLED`
//! ("Timeout expired"); the gRPC specification's status for it is `DEADLINE_EXCEEDED`, which is
//! what a client of grpc-go or grpcio reports too.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Frame, SizeHint};
use tokio::time::Sleep;

use crate::app::BoxError;

/// The request header in which a gRPC client sends its deadline.
const GRPC_TIMEOUT: &str = "grpc-timeout";

/// A [`tower::Layer`] that enforces every call's deadline (the client's `grpc-timeout` header,
/// and optionally a cap of the server's own): see the [module](self) documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer {
    server_timeout: Option<Duration>,
}

impl DeadlineLayer {
    /// Enforces the deadline each client sends; a call without one may run as long as it takes.
    pub fn new() -> DeadlineLayer {
        DeadlineLayer::default()
    }

    /// Also ends every call after `timeout` at most, whatever deadline its client sent, or if it
    /// sent none (as `tonic::transport::Server::builder().timeout(..)` does).
    pub fn server_timeout(mut self, timeout: Duration) -> DeadlineLayer {
        self.server_timeout = Some(timeout);
        self
    }
}

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline {
            inner,
            server_timeout: self.server_timeout,
        }
    }
}

/// The service [`DeadlineLayer`] makes: `inner`, with each call ended at its deadline.
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    server_timeout: Option<Duration>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for Deadline<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        // An unreadable header is ignored, as tonic's server does: the call gets no deadline.
        let client = parse_grpc_timeout(request.headers()).ok().flatten();
        let timeout = match (client, self.server_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        DeadlineFuture {
            inner: self.inner.call(request),
            // Boxed: a timer is big, and a call without a deadline (the common case) has none.
            timer: timeout.map(|t| Timer {
                sleep: Box::pin(tokio::time::sleep(t)),
                timeout: t,
            }),
        }
    }
}

/// A call's deadline: the timer, and the timeout it was set from (for the error message).
struct Timer {
    sleep: Pin<Box<Sleep>>,
    timeout: Duration,
}

impl Timer {
    /// The status a call ends with when its deadline passes.
    fn status(&self) -> tonic::Status {
        tonic::Status::deadline_exceeded(format!(
            "deadline exceeded: the call's timeout of {:?} passed",
            self.timeout
        ))
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`Deadline`].
    pub struct DeadlineFuture<F> {
        #[pin]
        inner: F,
        timer: Option<Timer>,
    }
}

impl<F, ResBody, E> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Output = Result<http::Response<tonic::body::Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            let timer = this.timer.take();
            return Poll::Ready(result.map(|response| {
                response.map(|body| match timer {
                    // The rest of the call (a streamed response) runs under the same deadline.
                    Some(timer) => tonic::body::Body::new(DeadlineBody {
                        inner: body,
                        timer: Some(timer),
                    }),
                    None => tonic::body::Body::new(body),
                })
            }));
        }
        if let Some(timer) = this.timer {
            ready!(timer.sleep.as_mut().poll(cx));
            // Returning drops the method's future (its work is cancelled) once this is dropped.
            return Poll::Ready(Ok(timer.status().into_http()));
        }
        Poll::Pending
    }
}

pin_project_lite::pin_project! {
    /// A response body that ends with `DEADLINE_EXCEEDED` trailers if its deadline passes first.
    struct DeadlineBody<B> {
        #[pin]
        inner: B,
        // `None` once the body has ended: by itself (its own trailers) or at the deadline.
        timer: Option<Timer>,
    }
}

impl<B> http_body::Body for DeadlineBody<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let Some(timer) = this.timer else {
            return Poll::Ready(None);
        };
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if frame.is_trailers() {
                    // The method's own status: the call is over, its deadline no longer matters.
                    *this.timer = None;
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                *this.timer = None;
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        ready!(timer.sleep.as_mut().poll(cx));
        let mut trailers = HeaderMap::new();
        let status = timer.status();
        *this.timer = None;
        if let Err(e) = status.add_header(&mut trailers) {
            return Poll::Ready(Some(Err(e.into())));
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.timer.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // Not the inner body's: an exact length would be wrong if the deadline cuts it short.
        SizeHint::default()
    }
}

/// The `grpc-timeout` header's duration: `Ok(None)` without one, `Err` if it is malformed.
///
/// The format (gRPC over HTTP/2): at most 8 ASCII digits and a unit, `H` hours, `M` minutes, `S`
/// seconds, `m` milliseconds, `u` microseconds, `n` nanoseconds.
fn parse_grpc_timeout(headers: &HeaderMap<HeaderValue>) -> Result<Option<Duration>, ()> {
    let Some(value) = headers.get(GRPC_TIMEOUT) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| ())?;
    let Some(unit) = value.chars().last() else {
        return Err(());
    };
    let digits = &value[..value.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(());
    }
    // At most 8 digits: no overflow below, even in hours.
    let n: u64 = digits.parse().map_err(|_| ())?;
    Ok(Some(match unit {
        'H' => Duration::from_secs(n * 3600),
        'M' => Duration::from_secs(n * 60),
        'S' => Duration::from_secs(n),
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        'n' => Duration::from_nanos(n),
        _ => return Err(()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: &str) -> Result<Option<Duration>, ()> {
        let mut headers = HeaderMap::new();
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_str(value).unwrap());
        parse_grpc_timeout(&headers)
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse("2H"), Ok(Some(Duration::from_secs(7200))));
        assert_eq!(parse("3M"), Ok(Some(Duration::from_secs(180))));
        assert_eq!(parse("4S"), Ok(Some(Duration::from_secs(4))));
        assert_eq!(parse("50m"), Ok(Some(Duration::from_millis(50))));
        assert_eq!(parse("7u"), Ok(Some(Duration::from_micros(7))));
        assert_eq!(
            parse("99999999n"),
            Ok(Some(Duration::from_nanos(99_999_999)))
        );
        assert_eq!(parse("0m"), Ok(Some(Duration::ZERO)));
        assert_eq!(parse_grpc_timeout(&HeaderMap::new()), Ok(None));
    }

    /// Calls `layer` around a method that answers after `method`; returns the response's
    /// `grpc-status` (head or trailers) and how long the call took.
    fn call(layer: DeadlineLayer, header: Option<&str>, method: Duration) -> (String, Duration) {
        use http_body_util::BodyExt;
        use tower::{Layer, ServiceExt};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let slow = tower::service_fn(move |_: http::Request<()>| async move {
                tokio::time::sleep(method).await;
                let mut response = http::Response::new(http_body_util::Full::new(Bytes::new()));
                response
                    .headers_mut()
                    .insert("grpc-status", HeaderValue::from_static("0"));
                Ok::<_, std::convert::Infallible>(response)
            });
            let mut request = http::Request::new(());
            if let Some(value) = header {
                let value = HeaderValue::from_str(value).unwrap();
                request.headers_mut().insert(GRPC_TIMEOUT, value);
            }
            let started = std::time::Instant::now();
            let response = layer.layer(slow).oneshot(request).await.unwrap();
            let (head, body) = response.into_parts();
            let trailers = body.collect().await.unwrap().trailers().cloned();
            let status = head
                .headers
                .get("grpc-status")
                .or(trailers.as_ref().and_then(|t| t.get("grpc-status")))
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            (status, started.elapsed())
        })
    }

    #[test]
    fn the_server_timeout_caps_a_call_without_a_deadline_and_the_shorter_one_wins() {
        let ten_s = Duration::from_secs(10);
        let capped = DeadlineLayer::new().server_timeout(Duration::from_millis(50));
        let (status, took) = call(capped, None, ten_s);
        assert_eq!(status, "4"); // DEADLINE_EXCEEDED
        assert!(took < Duration::from_secs(5), "{took:?}");
        // The client's 50 ms is shorter than the server's 10 s.
        let (status, took) = call(
            DeadlineLayer::new().server_timeout(ten_s),
            Some("50m"),
            ten_s,
        );
        assert_eq!(status, "4");
        assert!(took < Duration::from_secs(5), "{took:?}");
        // A call that meets its deadline keeps its own status.
        let (status, _) = call(capped, Some("10S"), Duration::from_millis(1));
        assert_eq!(status, "0");
        let (status, _) = call(DeadlineLayer::new(), None, Duration::from_millis(1));
        assert_eq!(status, "0");
    }

    #[test]
    fn malformed_grpc_timeouts_are_refused() {
        for bad in [
            "",
            "m",
            "123456789m",
            "5",
            "5x",
            "-5m",
            "+5m",
            "5 m",
            "1.5S",
            "5mm",
        ] {
            assert_eq!(parse(bad), Err(()), "{bad:?}");
        }
    }
}
