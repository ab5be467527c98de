//! The response body type every worker writes: a complete buffer without an allocation, or any
//! other body boxed.
//!
//! Most responses of a hot app are one buffer (`hello`, JSON, a cached page). Boxing those, as a
//! plain `UnsyncBoxBody` would, costs an allocation and an indirect call per response on the
//! request path; [`Body::new`] recognises the common concrete types and keeps them inline.

use std::any::Any;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;

use crate::file_body::FileBody;

/// Boxed error type used at the service boundary (`tine::app::BoxError`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body: a complete buffer kept inline, or any other body boxed.
pub struct Body {
    kind: Kind,
}

enum Kind {
    /// A complete buffer; `None` once it has been yielded (or if it was empty).
    Full(Option<Bytes>),
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
    /// A range of an open file: sent with `sendfile(2)` on HTTP/1, read in chunks elsewhere.
    File(Box<FileBody>),
}

impl Body {
    /// A body of exactly `bytes` (hyper writes its `Content-Length`).
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        let bytes = bytes.into();
        Body {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
        }
    }

    /// An empty body.
    pub fn empty() -> Body {
        Body {
            kind: Kind::Full(None),
        }
    }

    /// A body of `len` bytes of `file` from `offset` (hyper writes its `Content-Length`).
    ///
    /// On an HTTP/1 connection the bytes go from the page cache to the socket with
    /// `sendfile(2)`, never copied through the worker; on HTTP/2 they are read in chunks. Either
    /// way the worker's thread never waits for a disk: what is not in the page cache is read in
    /// tokio's blocking pool first.
    ///
    /// The file is read as it is at the time each part is sent, so change files by replacing
    /// them (write a new file, `rename` it over the old one), not in place. A file that shrinks
    /// while it is sent ends the response with an error: the connection closes before the
    /// promised length, so the client sees a failed transfer. As with nginx's `sendfile`, the
    /// bytes of that failed transfer may already show the change: the socket holds the page
    /// cache's own pages until they are sent, and truncating a file zeroes the rest of the page
    /// it now ends in (seen: a 32 MiB file truncated to 12,000,000 bytes mid-send gave the
    /// client 1,280 zero bytes after byte 12,000,000, then the original bytes already queued,
    /// then the close).
    pub fn file(file: std::fs::File, offset: u64, len: u64) -> Body {
        Body {
            kind: Kind::File(Box::new(FileBody::new(file, offset, len))),
        }
    }

    /// Converts any body. A [`Body`], `http_body_util::Full<Bytes>`, `Empty<Bytes>` or `String` is
    /// kept without an allocation; anything else is boxed.
    pub fn new<B>(body: B) -> Body
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let mut slot = Some(body);
        let any: &mut dyn Any = &mut slot;
        if let Some(b) = any.downcast_mut::<Option<Body>>() {
            return b.take().expect("just set");
        }
        if let Some(b) = any.downcast_mut::<Option<UnsyncBoxBody<Bytes, BoxError>>>() {
            return Body {
                kind: Kind::Boxed(b.take().expect("just set")),
            };
        }
        if let Some(b) = any.downcast_mut::<Option<http_body_util::Full<Bytes>>>() {
            // A Full yields its one frame at once; a frame it does not yield means it was empty.
            let mut b = b.take().expect("just set");
            let data = Pin::new(&mut b)
                .poll_frame(&mut Context::from_waker(std::task::Waker::noop()))
                .map(|f| f.and_then(|f| f.ok()).and_then(|f| f.into_data().ok()));
            if let Poll::Ready(data) = data {
                return Body {
                    kind: Kind::Full(data),
                };
            }
        }
        if any
            .downcast_mut::<Option<http_body_util::Empty<Bytes>>>()
            .is_some()
        {
            return Body::empty();
        }
        if let Some(b) = any.downcast_mut::<Option<String>>() {
            return Body::full(b.take().expect("just set"));
        }
        let body = slot.expect("not taken by any conversion above");
        Body {
            kind: Kind::Boxed(body.map_err(Into::into).boxed_unsync()),
        }
    }
}

impl Body {
    /// Whether the whole body is already here (nothing to wait for while it is written).
    pub(crate) fn is_complete(&self) -> bool {
        matches!(self.kind, Kind::Full(_))
    }

    /// The file this body sends, if it is one ([`Body::file`]).
    pub(crate) fn file_mut(&mut self) -> Option<&mut FileBody> {
        match &mut self.kind {
            Kind::File(f) => Some(f),
            _ => None,
        }
    }
}

impl Default for Body {
    fn default() -> Body {
        Body::empty()
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Full(b) => f
                .debug_tuple("Body::Full")
                .field(&b.as_ref().map_or(0, Bytes::len))
                .finish(),
            Kind::Boxed(_) => f.write_str("Body::Boxed"),
            Kind::File(b) => f.debug_tuple("Body::File").field(&b.len()).finish(),
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Boxed(b) => Pin::new(b).poll_frame(cx),
            Kind::File(b) => b.poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Boxed(b) => b.is_end_stream(),
            Kind::File(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Boxed(b) => b.size_hint(),
            Kind::File(b) => SizeHint::with_exact(b.len()),
        }
    }
}

/// A complete response body from bytes (same as [`Body::full`]).
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Body::full(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(body: Body) -> (Bytes, Option<u64>) {
        let exact = body.size_hint().exact();
        (body.collect().await.unwrap().to_bytes(), exact)
    }

    #[test]
    fn known_bodies_stay_inline_and_keep_their_length() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let cases: Vec<(Body, &[u8])> = vec![
                (Body::full("abc"), b"abc"),
                (Body::new(Body::full("x")), b"x"),
                (
                    Body::new(http_body_util::Full::new(Bytes::from("full"))),
                    b"full",
                ),
                (Body::new(http_body_util::Full::new(Bytes::new())), b""),
                (Body::new(http_body_util::Empty::<Bytes>::new()), b""),
                (Body::new(String::from("s")), b"s"),
                (Body::empty(), b""),
            ];
            for (body, want) in cases {
                assert!(matches!(body.kind, Kind::Full(_)), "{body:?} was boxed");
                let (got, exact) = collect(body).await;
                assert_eq!(&got[..], want);
                assert_eq!(exact, Some(want.len() as u64));
            }
        });
    }

    /// A body of several frames, of a type `Body::new` does not know.
    struct Parts(std::vec::IntoIter<&'static str>);

    impl http_body::Body for Parts {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            Poll::Ready(
                self.0
                    .next()
                    .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes())))),
            )
        }
    }

    #[test]
    fn other_bodies_are_boxed_and_stream_through() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let body = Body::new(Parts(vec!["a", "bc"].into_iter()));
            assert!(matches!(body.kind, Kind::Boxed(_)));
            assert_eq!(&collect(body).await.0[..], b"abc");
        });
    }
}
