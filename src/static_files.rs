//! The `static` app's file serving: files under a root directory with ranges, `ETag` and
//! `Last-Modified` validators, conditional requests and index files, and no way out of the root.
//!
//! Every file is opened by [`open_beneath_root`], which resolves the whole request path in the
//! kernel beneath a descriptor of the root (`openat2` with `RESOLVE_BENEATH`), index file
//! included; the response is then built from that one open descriptor (its `fstat`, its bytes).
//! So what is served is exactly what was checked: there is no separate check for a symlink to be
//! swapped under, and no file opened by a path that was not checked.

use std::convert::Infallible;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use nix::errno::Errno;
use tine::app::{full, Body, Request};
use tine::config::FollowSymlinks;
use tine::sys::fs::{open_beneath, read_cached_at, Symlinks};
use tine::Handler;

/// Files (ranges) up to this size are read at once into one buffer; larger ones are sent from the
/// file ([`Body::file`]).
const READ_AT_ONCE: usize = 16 * 1024;

/// The name served for a directory requested with a trailing slash.
const INDEX: &str = "index.html";

/// An open root directory and the symlink policy every open beneath it follows.
pub struct Root {
    dir: File,
    symlinks: Symlinks,
}

/// What [`open_beneath_root`] found for a request path.
pub enum Found {
    /// A regular file (for a directory path with a slash, its index file), open for reading.
    File {
        /// The open file: what was checked is what is read.
        file: File,
        /// Its size, from `fstat`.
        len: u64,
        /// Its modification time, from `fstat`.
        modified: SystemTime,
        /// The name its content type is guessed from.
        name: PathBuf,
    },
    /// A directory requested without its trailing slash: redirect to the path with one.
    Directory,
}

/// Why [`open_beneath_root`] found nothing to serve.
#[derive(Debug)]
pub enum Refused {
    /// No such file, not a regular file, or a path that is not a plain relative one: 404.
    NotFound,
    /// The path, or a symlink on it, leads out of the root (or is a symlink with
    /// `follow_symlinks = never`): 403.
    Forbidden,
    /// The system failed (out of descriptors, an old kernel): 500.
    Failed(io::Error),
}

impl Root {
    /// Opens `root` (which may itself be reached through symlinks) for the opens beneath it.
    /// Fails if it is not a directory, or if the kernel cannot resolve beneath a directory
    /// (`openat2` needs Linux 5.6 or later).
    pub fn open(root: &Path, follow: FollowSymlinks) -> anyhow::Result<Root> {
        let dir =
            File::open(root).with_context(|| format!("cannot open root {}", root.display()))?;
        if !dir.metadata()?.is_dir() {
            anyhow::bail!("root {} is not a directory", root.display());
        }
        let symlinks = match follow {
            FollowSymlinks::WithinRoot => Symlinks::WithinDir,
            FollowSymlinks::Never => Symlinks::Never,
        };
        let root_handle = Root { dir, symlinks };
        open_beneath(root_handle.dir.as_fd(), Path::new("."), Symlinks::Never).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOSYS) {
                anyhow::anyhow!(
                    "the static app needs openat2 (Linux 5.6 or later) to keep every open beneath \
                     its root; this kernel or sandbox refuses it"
                )
            } else {
                anyhow::Error::new(e).context(format!("cannot open root {}", root.display()))
            }
        })?;
        Ok(root_handle)
    }
}

/// Opens what the URI path `uri_path` names beneath `root`: a regular file, or for a directory
/// path ending in `/` its `index.html`, every component (symlink targets included) resolved by
/// the kernel beneath the root under the root's symlink policy. The path is percent-decoded;
/// `..`, absolute components and NUL bytes are refused outright.
pub fn open_beneath_root(root: &Root, uri_path: &str) -> Result<Found, Refused> {
    let relative = relative_path(uri_path).ok_or(Refused::NotFound)?;
    let open = |path: &Path| {
        let file = open_beneath(root.dir.as_fd(), path, root.symlinks).map_err(refusal)?;
        let meta = file.metadata().map_err(Refused::Failed)?;
        Ok::<_, Refused>((file, meta))
    };
    let (mut file, mut meta) = open(&relative)?;
    let mut name = relative;
    if meta.is_dir() {
        if !uri_path.ends_with('/') {
            return Ok(Found::Directory);
        }
        name.push(INDEX);
        (file, meta) = open(&name)?;
    }
    if !meta.is_file() {
        return Err(Refused::NotFound);
    }
    Ok(Found::File {
        len: meta.len(),
        modified: meta.modified().unwrap_or(UNIX_EPOCH),
        file,
        name,
    })
}

/// The relative path a URI path names: percent-decoded, leading slashes and `.` dropped; `None`
/// for `..`, an embedded NUL or anything that is not valid UTF-8.
fn relative_path(uri_path: &str) -> Option<PathBuf> {
    let decoded = percent_encoding::percent_decode_str(uri_path)
        .decode_utf8()
        .ok()?;
    if decoded.contains('\0') {
        return None;
    }
    let mut path = PathBuf::new();
    for part in Path::new(decoded.trim_start_matches('/')).components() {
        match part {
            Component::Normal(p) => path.push(p),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(path)
}

fn refusal(e: io::Error) -> Refused {
    match e.raw_os_error().map(Errno::from_raw) {
        Some(Errno::EXDEV | Errno::ELOOP) => Refused::Forbidden,
        Some(
            Errno::ENOENT | Errno::ENOTDIR | Errno::EACCES | Errno::ENAMETOOLONG | Errno::EINVAL,
        ) => Refused::NotFound,
        _ => Refused::Failed(e),
    }
}

/// The static app's handler: serves files beneath `root`.
pub fn handler(root: Root) -> Handler {
    let root = Arc::new(root);
    Handler::http(tower::service_fn(move |req: Request| {
        std::future::ready(Ok::<_, Infallible>(respond(&root, &req)))
    }))
}

fn respond(root: &Root, req: &Request) -> Response<Body> {
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let mut r = status(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let path = req.uri().path();
    let (file, len, modified, name) = match open_beneath_root(root, path) {
        Ok(Found::File {
            file,
            len,
            modified,
            name,
        }) => (file, len, modified, name),
        Ok(Found::Directory) => {
            let mut location = format!("{path}/");
            if let Some(query) = req.uri().query() {
                location.push('?');
                location.push_str(query);
            }
            let mut r = status(StatusCode::TEMPORARY_REDIRECT, "");
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            return r;
        }
        Err(Refused::NotFound) => return status(StatusCode::NOT_FOUND, "not found\n"),
        Err(Refused::Forbidden) => return status(StatusCode::FORBIDDEN, "forbidden\n"),
        Err(Refused::Failed(e)) => {
            tracing::warn!(error = %e, "static: cannot open a file beneath the root");
            return status(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n");
        }
    };
    serve_file(req, file, len, modified, &name)
}

/// The validators of one file version, from its `fstat`.
struct Validators {
    /// `"mtime-size"` in hex, like nginx's: strong, it changes with every write that changes
    /// either.
    etag: HeaderValue,
    /// Modification time in whole seconds (what HTTP dates carry).
    modified: SystemTime,
}

impl Validators {
    fn of(len: u64, modified: SystemTime) -> Validators {
        let since_epoch = modified.duration_since(UNIX_EPOCH).unwrap_or_default();
        let etag = format!("\"{:x}-{:x}\"", since_epoch.as_nanos(), len);
        Validators {
            etag: HeaderValue::from_str(&etag).expect("hex digits and quotes"),
            modified: UNIX_EPOCH + std::time::Duration::from_secs(since_epoch.as_secs()),
        }
    }

    fn last_modified(&self) -> HeaderValue {
        HeaderValue::from_str(&httpdate::fmt_http_date(self.modified)).expect("an HTTP date")
    }

    /// Whether an entity-tag list (`If-Match`, `If-None-Match`) names this version: `*`, or the
    /// tag itself (weakly when `weak`, as `If-None-Match` compares).
    fn listed_in(&self, headers: &HeaderMap, name: header::HeaderName, weak: bool) -> bool {
        let tag = self.etag.to_str().unwrap_or_default();
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .any(|t| t == "*" || t == tag || (weak && t.strip_prefix("W/") == Some(tag)))
    }

    /// The date of header `name`, if present and valid.
    fn date(headers: &HeaderMap, name: header::HeaderName) -> Option<SystemTime> {
        httpdate::parse_http_date(headers.get(name)?.to_str().ok()?).ok()
    }
}

/// The answer for an open regular file: preconditions (RFC 9110 §13.2.2 order), then a range or
/// the whole file. Every answer, 304 included, carries the validators and `Cache-Control`.
fn serve_file(
    req: &Request,
    file: File,
    size: u64,
    modified: SystemTime,
    name: &Path,
) -> Response<Body> {
    let headers = req.headers();
    let v = Validators::of(size, modified);
    let with_validators = |mut r: Response<Body>| {
        // The file may change on disk at any moment and nothing says how long it stays fresh:
        // caches keep it but check back (cheap: a 304) rather than guess a lifetime from its
        // age (the heuristic freshness REDbot warns about).
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r.headers_mut().insert(header::ETAG, v.etag.clone());
        r.headers_mut()
            .insert(header::LAST_MODIFIED, v.last_modified());
        r
    };
    // 1-2: If-Match, else If-Unmodified-Since.
    let precondition_failed = if headers.contains_key(header::IF_MATCH) {
        !v.listed_in(headers, header::IF_MATCH, false)
    } else {
        Validators::date(headers, header::IF_UNMODIFIED_SINCE).is_some_and(|d| v.modified > d)
    };
    if precondition_failed {
        return with_validators(status(StatusCode::PRECONDITION_FAILED, ""));
    }
    // 3-4: If-None-Match, else If-Modified-Since.
    let not_modified = if headers.contains_key(header::IF_NONE_MATCH) {
        v.listed_in(headers, header::IF_NONE_MATCH, true)
    } else {
        Validators::date(headers, header::IF_MODIFIED_SINCE).is_some_and(|d| v.modified <= d)
    };
    if not_modified {
        return with_validators(status(StatusCode::NOT_MODIFIED, ""));
    }
    // 5: If-Range decides whether Range applies.
    let range_applies = match headers.get(header::IF_RANGE).and_then(|h| h.to_str().ok()) {
        None => true,
        Some(tag) if tag.starts_with('"') => tag == v.etag.to_str().unwrap_or_default(),
        Some(date) => httpdate::parse_http_date(date).is_ok_and(|d| d == v.modified),
    };
    let range = headers
        .get(header::RANGE)
        .filter(|_| range_applies)
        .and_then(|h| h.to_str().ok())
        .map(|h| http_range_header::parse_range_header(h).and_then(|ranges| ranges.validate(size)));
    let (status_code, start, len) = match range {
        None => (StatusCode::OK, 0, size),
        Some(Ok(ranges)) if ranges.len() == 1 => {
            let (start, end) = (*ranges[0].start(), *ranges[0].end());
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        // Several ranges: served whole (RFC 9110 lets a server ignore Range), not as multipart.
        Some(Ok(_)) => (StatusCode::OK, 0, size),
        Some(Err(_)) => {
            let mut r = status(StatusCode::RANGE_NOT_SATISFIABLE, "");
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).expect("digits"),
            );
            return with_validators(r);
        }
    };
    let body = if req.method() == Method::HEAD {
        Body::empty()
    } else {
        match file_body(file, start, len) {
            Ok(body) => body,
            Err(e) => {
                tracing::warn!(error = %e, "static: cannot read a file beneath the root");
                return status(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n");
            }
        }
    };
    let mut r = Response::new(body);
    *r.status_mut() = status_code;
    let h = r.headers_mut();
    let content_type = mime_guess::from_path(name)
        .first_raw()
        .unwrap_or("application/octet-stream");
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if status_code == StatusCode::PARTIAL_CONTENT {
        let content_range = format!("bytes {start}-{}/{size}", start + len - 1);
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&content_range).expect("digits"),
        );
    }
    with_validators(r)
}

/// `len` bytes of `file` from `start`. Up to [`READ_AT_ONCE`] bytes in the page cache are read at
/// once on the worker's thread and answered as one buffer (for a small file one read costs less
/// than setting up `sendfile`); anything else is a [`Body::file`], sent from the page cache with
/// `sendfile(2)` on HTTP/1 (read in chunks on HTTP/2), never waiting for a disk on the worker's
/// thread.
fn file_body(file: File, start: u64, len: u64) -> io::Result<Body> {
    if len <= READ_AT_ONCE as u64 {
        let mut bytes = Vec::new();
        loop {
            let missing = len as usize - bytes.len();
            if missing == 0 {
                return Ok(full(bytes));
            }
            let at = start + bytes.len() as u64;
            match read_cached_at(&file, &mut bytes, missing, at) {
                Ok(0) => return Err(shrank()),
                Ok(_) => {}
                // Not (all) cached: the body reads it in the blocking pool.
                Err(e) if must_wait(&e) => break,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(Body::file(file, start, len))
}

/// Whether a read failed only because its bytes are not in the page cache (or the filesystem
/// cannot say).
fn must_wait(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

fn shrank() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the file shrank while it was served",
    )
}

fn status(code: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = code;
    r
}

/// Property-based: whatever the request path (percent-encoding, `..`, slashes, links in any
/// order), what is opened is a file beneath the root, never the file outside it.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::{symlink, MetadataExt as _};

    struct Tree {
        base: PathBuf,
        secret: (u64, u64),
    }

    impl Tree {
        fn new() -> Tree {
            let base = std::env::temp_dir().join(format!(
                "tine-static-fuzz-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&base);
            let root = base.join("root");
            std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
            std::fs::write(base.join("secret"), "secret").unwrap();
            std::fs::write(root.join("index.html"), "index").unwrap();
            std::fs::write(root.join("sub/page.html"), "page").unwrap();
            symlink(base.join("secret"), root.join("abs-out")).unwrap();
            symlink("../secret", root.join("rel-out")).unwrap();
            symlink("../../secret", root.join("sub/up-out")).unwrap();
            symlink("..", root.join("sub/deeper/parent")).unwrap();
            symlink("../..", root.join("sub/deeper/grandparent")).unwrap();
            symlink(&base, root.join("base")).unwrap();
            symlink("page.html", root.join("sub/in")).unwrap();
            let meta = std::fs::metadata(base.join("secret")).unwrap();
            Tree {
                base,
                secret: (meta.dev(), meta.ino()),
            }
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.base);
        }
    }

    fn uri_path() -> impl Strategy<Value = String> {
        let part = prop::sample::select(vec![
            "..",
            ".",
            "%2e%2e",
            "%2E%2e",
            "%252e%252e",
            "sub",
            "deeper",
            "parent",
            "grandparent",
            "abs-out",
            "rel-out",
            "up-out",
            "base",
            "root",
            "secret",
            "in",
            "page.html",
            "index.html",
            "%2f",
            "%2fsecret",
            "",
            "%00",
            "..%2f",
            "%5c..",
            "\u{e9}",
        ]);
        (prop::collection::vec(part, 0..7), any::<bool>()).prop_map(|(parts, slash)| {
            let mut p = format!("/{}", parts.join("/"));
            if slash {
                p.push('/');
            }
            p
        })
    }

    proptest! {
        #[test]
        fn nothing_outside_the_root_is_ever_opened(
            paths in prop::collection::vec(uri_path(), 1..16),
        ) {
            let tree = Tree::new();
            for follow in [FollowSymlinks::WithinRoot, FollowSymlinks::Never] {
                let root = Root::open(&tree.base.join("root"), follow).unwrap();
                for path in &paths {
                    if let Ok(Found::File { file, .. }) = open_beneath_root(&root, path) {
                        let meta = file.metadata().unwrap();
                        prop_assert_ne!((meta.dev(), meta.ino()), tree.secret, "{}", path);
                    }
                }
            }
        }
    }

    #[test]
    fn the_links_inside_are_followed_only_within_root() {
        let tree = Tree::new();
        let root = Root::open(&tree.base.join("root"), FollowSymlinks::WithinRoot).unwrap();
        assert!(matches!(
            open_beneath_root(&root, "/sub/deeper/parent/in"),
            Ok(Found::File { .. })
        ));
        assert!(matches!(
            open_beneath_root(&root, "/sub/deeper/grandparent/"),
            Ok(Found::File { .. })
        ));
        for path in ["/abs-out", "/rel-out", "/sub/up-out", "/base/secret"] {
            assert!(
                matches!(open_beneath_root(&root, path), Err(Refused::Forbidden)),
                "{path}"
            );
        }
        let root = Root::open(&tree.base.join("root"), FollowSymlinks::Never).unwrap();
        assert!(matches!(
            open_beneath_root(&root, "/sub/in"),
            Err(Refused::Forbidden)
        ));
        assert!(matches!(
            open_beneath_root(&root, "/sub/page.html"),
            Ok(Found::File { .. })
        ));
    }
}

/// The paths a body takes: a file in the page cache is read on the worker's thread, one that is
/// not (dropped from the cache here) through the blocking pool; the bytes are the same.
#[cfg(test)]
mod bodies {
    use super::*;

    /// The chunk size of a file body read in copy mode (HTTP/2).
    const CHUNK: usize = 256 * 1024;
    use http_body_util::BodyExt as _;
    use std::os::fd::AsRawFd as _;

    fn collect(body: Body) -> Vec<u8> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async { body.collect().await.unwrap().to_bytes().to_vec() })
    }

    /// Writes `bytes` to a new file and drops its pages from the page cache.
    fn cold_file(name: &str, bytes: &[u8]) -> (PathBuf, File) {
        let path = std::env::temp_dir().join(format!("tine-static-{name}-{}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        let file = File::open(&path).unwrap();
        file.sync_all().unwrap();
        nix::fcntl::posix_fadvise(
            file.as_raw_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
        (path, file)
    }

    #[test]
    fn cached_and_uncached_files_give_the_same_bytes() {
        let content: Vec<u8> = (0..(3 * CHUNK + 1000) as u32)
            .map(|i| (i % 253) as u8)
            .collect();
        for (start, len) in [(0, content.len()), (5, 100), (CHUNK - 3, CHUNK + 10)] {
            let want = &content[start..start + len];
            let (path, cold) = cold_file("cold", &content);
            // Not in the cache: the worker's thread is told to wait (or the filesystem cannot
            // tell); the body then reads through the blocking pool.
            let mut probe = Vec::new();
            if let Err(e) = read_cached_at(&cold, &mut probe, 10, start as u64) {
                assert!(must_wait(&e), "{e}");
            }
            let cold = File::open(&path).unwrap();
            nix::fcntl::posix_fadvise(
                cold.as_raw_fd(),
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            )
            .unwrap();
            let body = file_body(cold, start as u64, len as u64).unwrap();
            assert_eq!(collect(body), want, "cold, {start}+{len}");
            // Now cached (just read): read on the worker's thread.
            let warm = File::open(&path).unwrap();
            let body = file_body(warm, start as u64, len as u64).unwrap();
            assert_eq!(collect(body), want, "warm, {start}+{len}");
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn a_file_that_shrinks_while_served_ends_in_an_error_not_short_bytes() {
        let content = vec![7u8; 2 * CHUNK];
        let path = std::env::temp_dir().join(format!("tine-static-shrink-{}", std::process::id()));
        std::fs::write(&path, &content).unwrap();
        let file = File::open(&path).unwrap();
        let body = file_body(file, 0, content.len() as u64).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(10)
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(rt.block_on(body.collect()).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
