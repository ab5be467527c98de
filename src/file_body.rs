//! A response body that is a range of an open file ([`crate::Body::file`]).
//!
//! On an HTTP/1 connection of a worker, the bytes never pass through user space: the body hands
//! the connection *windows* of the file, and the connection's socket sends each with
//! `sendfile(2)` when hyper writes it (see `worker::http`, `ZeroCopy`). hyper owns the
//! connection's writes, so a window travels through it as a placeholder buffer of the same
//! length, which the socket recognises by its address and replaces with the file's pages; hyper
//! keeps doing the HTTP/1 framing, keep-alive and back-pressure as for any body.
//!
//! Everywhere else (HTTP/2, or a body polled outside a worker's connection), it is read in
//! chunks. Either way the worker's thread never waits for a disk: a read is tried on the page
//! cache only (`RWF_NOWAIT`) and done in tokio's blocking pool when the disk is needed, and a
//! window is sent only once the page cache holds all of it (`cachestat(2)`; the blocking pool
//! reads it in first otherwise).

use std::fs::File;
use std::future::Future as _;
use std::io;
use std::os::fd::AsFd as _;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::Frame;

use crate::sys::fs::{cached_bytes, read_cached_at};

/// Chunks read when the body is copied (HTTP/2): large, so the per-chunk cost (a read, a wake-up,
/// a write) stays small next to the copying.
const CHUNK: usize = 256 * 1024;

/// The most one window covers: the length of the placeholder it travels as.
pub(crate) const WINDOW: usize = 4 << 20;

/// The zero bytes a window travels through hyper as ([`placeholder`]). Never written to a
/// socket: the connection sends the file instead. Allocated zeroed and never touched, so it costs
/// address space, not memory.
static PLACEHOLDER: OnceLock<&'static [u8]> = OnceLock::new();

/// A window of `len` bytes as hyper sees it: a buffer in [`PLACEHOLDER`].
fn placeholder(len: usize) -> Bytes {
    let region = PLACEHOLDER.get_or_init(|| Box::leak(vec![0u8; WINDOW].into_boxed_slice()));
    Bytes::from_static(&region[..len])
}

/// Where `buf` starts in the placeholder region, if it lies in it (then it is a window, or what
/// remains of one after a partial send, and the connection sends the file instead).
pub(crate) fn placeholder_offset(buf: &[u8]) -> Option<usize> {
    let region = PLACEHOLDER.get()?;
    let start = region.as_ptr() as usize;
    let at = (buf.as_ptr() as usize).checked_sub(start)?;
    (at < region.len() && !buf.is_empty()).then_some(at)
}

/// A part of a file to send with `sendfile(2)`, in the page cache when it was handed out.
pub(crate) struct Window {
    pub(crate) file: Arc<File>,
    pub(crate) offset: u64,
    pub(crate) len: usize,
}

/// `len` bytes of a file from an offset, read in chunks or sent in windows.
pub(crate) struct FileBody {
    file: Arc<File>,
    offset: u64,
    remaining: u64,
    /// A chunk being read in the blocking pool (copy mode).
    reading: Option<tokio::task::JoinHandle<io::Result<Vec<u8>>>>,
    /// A window being brought into the page cache in the blocking pool (zero-copy mode).
    warming: Option<tokio::task::JoinHandle<io::Result<()>>>,
}

impl FileBody {
    pub(crate) fn new(file: File, offset: u64, len: u64) -> FileBody {
        FileBody {
            file: Arc::new(file),
            offset,
            remaining: len,
            reading: None,
            warming: None,
        }
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    pub(crate) fn len(&self) -> u64 {
        self.remaining
    }

    fn advance(&mut self, chunk: Vec<u8>) -> Option<io::Result<Frame<Bytes>>> {
        if chunk.is_empty() {
            self.remaining = 0;
            return Some(Err(shrank()));
        }
        self.offset += chunk.len() as u64;
        self.remaining -= chunk.len() as u64;
        Some(Ok(Frame::data(Bytes::from(chunk))))
    }

    /// Copy mode: the next chunk of bytes.
    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        if let Some(task) = &mut self.reading {
            let read = ready!(Pin::new(task).poll(cx));
            self.reading = None;
            return Poll::Ready(match read.map_err(io::Error::other).and_then(|r| r) {
                Ok(chunk) => self.advance(chunk),
                Err(e) => Some(Err(e)),
            });
        }
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let want = self.remaining.min(CHUNK as u64) as usize;
        let mut chunk = Vec::new();
        match read_cached_at(&self.file, &mut chunk, want, self.offset) {
            Ok(_) => Poll::Ready(self.advance(chunk)),
            Err(e) if must_wait(&e) => {
                let (file, offset) = (self.file.clone(), self.offset);
                self.reading = Some(tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt as _;
                    let mut chunk = vec![0; want];
                    let n = file.read_at(&mut chunk, offset)?;
                    chunk.truncate(n);
                    Ok(chunk)
                }));
                self.poll_frame(cx)
            }
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    /// Zero-copy mode: the next window, once the page cache holds it, and the placeholder that
    /// stands for it in hyper.
    pub(crate) fn poll_next_window(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<(Window, Bytes)>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let len = self.remaining.min(WINDOW as u64) as usize;
        if let Some(task) = &mut self.warming {
            let warmed = ready!(Pin::new(task).poll(cx));
            self.warming = None;
            if let Err(e) = warmed.map_err(io::Error::other).and_then(|r| r) {
                self.remaining = 0;
                return Poll::Ready(Some(Err(e)));
            }
        } else if cached_bytes(&self.file, self.offset, len as u64).is_some_and(|n| n < len as u64)
        {
            // Some of it would come from the disk: read it into the page cache where a wait
            // does no harm. (A kernel that cannot tell sends at once, as nginx does.)
            let (file, offset) = (self.file.clone(), self.offset);
            self.warming = Some(tokio::task::spawn_blocking(move || {
                warm(&file, offset, len)
            }));
            return self.poll_next_window(cx);
        }
        let window = Window {
            file: self.file.clone(),
            offset: self.offset,
            len,
        };
        self.offset += len as u64;
        self.remaining -= len as u64;
        Poll::Ready(Some(Ok((window, placeholder(len)))))
    }
}

/// Reads `[offset, offset + len)` of `file` so that the page cache holds it (blocking pool).
fn warm(file: &File, offset: u64, len: usize) -> io::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let _ = nix::fcntl::posix_fadvise(
        std::os::fd::AsRawFd::as_raw_fd(&file.as_fd()),
        offset as libc::off_t,
        len as libc::off_t,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
    );
    let mut scratch = vec![0u8; CHUNK.min(len)];
    let mut done = 0;
    while done < len {
        let want = (len - done).min(scratch.len());
        match file.read_at(&mut scratch[..want], offset + done as u64)? {
            0 => return Err(shrank()),
            n => done += n,
        }
    }
    Ok(())
}

/// Whether a read failed only because its bytes are not in the page cache (or the filesystem
/// cannot say): then it is done in the blocking pool instead.
pub(crate) fn must_wait(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

/// The error of a file that ended before the length its response promised.
pub(crate) fn shrank() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the file shrank while it was served",
    )
}
