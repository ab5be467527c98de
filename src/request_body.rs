//! The request body an app reads: hyper's `Incoming`, watched for a client that stops sending.
//!
//! Why a wrapper rather than counting bytes on the connection: a connection cannot tell an app
//! that waits for the next part of a body from an app that has read the whole body and is still
//! working (hyper reads the socket in both cases: for the body, or to notice the client leaving),
//! so `body_read_timeout` would either cut long requests or miss stalled bodies. The body itself
//! knows: [`RequestBody::poll_frame`] returning `Pending` is exactly "the app waits for the client".
//! The wrapper keeps no timer: it marks its [`BodyWatch`], and the accept loop's sweep, which
//! already walks every connection a few times per timeout, judges the waits (see
//! `worker::http::Connections`). A request without a body (most of them) carries no watch at all.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

use crate::body::BoxError;

/// The body of a request as the app receives it ([`crate::app::Request`]): hyper's `Incoming`,
/// plus tine's `body_read_timeout`.
///
/// It is an ordinary [`http_body::Body`]: axum's extractors, tonic, `http_body_util::BodyExt`
/// work on it as on `Incoming`. If the client stops sending while the app waits for the next part
/// for `body_read_timeout`, reading it fails with [`BodyTimedOut`] and the request is answered
/// `408 Request Timeout` (its connection then closes), whatever the app does with the error.
pub struct RequestBody {
    inner: Incoming,
    watch: Option<Watched>,
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody")
            .field("inner", &self.inner)
            .field("watched", &self.watch.is_some())
            .finish()
    }
}

impl RequestBody {
    pub(crate) fn new(inner: Incoming, watch: Option<Arc<BodyWatch>>) -> RequestBody {
        RequestBody {
            inner,
            watch: watch.map(Watched),
        }
    }

    /// hyper's own body, for code that must have that type. Reading it is then no longer
    /// watched: a client that stops sending holds the request until `request_timeout`.
    pub fn into_incoming(self) -> Incoming {
        self.inner
    }
}

/// A body's hold on its watch: a body dropped while waiting no longer counts as waiting.
struct Watched(Arc<BodyWatch>);

impl Drop for Watched {
    fn drop(&mut self) {
        self.0.waiting.store(false, Ordering::Release);
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(Watched(watch)) = &this.watch else {
            return Pin::new(&mut this.inner).poll_frame(cx).map_err(Into::into);
        };
        if let Some(timed_out) = watch.timed_out() {
            return Poll::Ready(Some(Err(timed_out.into())));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {
                *watch.waker() = Some(cx.waker().clone());
                watch.waiting.store(true, Ordering::Release);
                // The sweep may have judged between the check above and the store: look again,
                // now that it can find the waker.
                match watch.timed_out() {
                    Some(timed_out) => Poll::Ready(Some(Err(timed_out.into()))),
                    None => Poll::Pending,
                }
            }
            Poll::Ready(frame) => {
                watch.waiting.store(false, Ordering::Release);
                watch.progress.fetch_add(1, Ordering::Relaxed);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> SizeHint {
        http_body::Body::size_hint(&self.inner)
    }
}

/// The error a [`RequestBody`] read fails with once the client has sent nothing for
/// `body_read_timeout` while the app waited. The request is answered 408 by tine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyTimedOut {
    /// The configured `body_read_timeout`.
    pub after: Duration,
}

impl std::fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "request body timed out: nothing received for {:?} (body_read_timeout)",
            self.after
        )
    }
}

impl std::error::Error for BodyTimedOut {}

/// What a watched body and the accept loop's sweep share.
#[derive(Default)]
pub(crate) struct BodyWatch {
    /// Frames the app received.
    progress: AtomicU64,
    /// Whether the app is waiting for the next frame (its last poll returned `Pending`).
    waiting: AtomicBool,
    /// Set by the sweep: the body failed, the request is answered 408.
    stalled: AtomicBool,
    /// The task waiting on the body.
    waker: Mutex<Option<Waker>>,
    /// Wakes the request's own future, which answers 408 even if the app ignores the error.
    notify: tokio::sync::Notify,
    /// The sweep's view, touched by the sweep only: the progress it saw last, and how many sweep
    /// periods the body has waited without any.
    seen: AtomicU64,
    idle: AtomicU32,
    /// The timeout, for the error message.
    after: Duration,
}

impl BodyWatch {
    pub(crate) fn new(after: Duration) -> BodyWatch {
        BodyWatch {
            after,
            // Not a progress count: the first sweep only takes its baseline, so a body that
            // began waiting just before a sweep is not judged on a partial period.
            seen: AtomicU64::new(u64::MAX),
            ..BodyWatch::default()
        }
    }

    fn waker(&self) -> std::sync::MutexGuard<'_, Option<Waker>> {
        self.waker.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn timed_out(&self) -> Option<BodyTimedOut> {
        self.stalled
            .load(Ordering::Acquire)
            .then_some(BodyTimedOut { after: self.after })
    }

    /// One sweep: counts a period in which the app waited and nothing came; after `limit` such
    /// periods in a row, fails the body and wakes the app and the request. Returns whether it
    /// failed now.
    pub(crate) fn sweep(&self, limit: u32) -> bool {
        if self.stalled.load(Ordering::Relaxed) {
            return false;
        }
        let progress = self.progress.load(Ordering::Relaxed);
        let waiting = self.waiting.load(Ordering::Acquire);
        let idle = match (waiting, progress == self.seen.load(Ordering::Relaxed)) {
            (true, true) => self.idle.load(Ordering::Relaxed) + 1,
            _ => 0,
        };
        self.seen.store(progress, Ordering::Relaxed);
        self.idle.store(idle, Ordering::Relaxed);
        if idle < limit {
            return false;
        }
        self.stalled.store(true, Ordering::Release);
        if let Some(waker) = self.waker().take() {
            waker.wake();
        }
        self.notify.notify_waiters();
        true
    }

    /// Resolves once the sweep has failed the body.
    pub(crate) async fn stalled(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.stalled.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}
