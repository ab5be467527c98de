//! The `static` app's file serving: files under a root directory with ranges, `ETag` and
//! `Last-Modified` validators, conditional requests and index files, and no way out of the root.
//!
//! Every file is opened by [`open_beneath_root`], which resolves the whole request path in the
//! kernel beneath a descriptor of the root (`openat2` with `RESOLVE_BENEATH`), index file
//! included; the response is then built from that one open descriptor (its `fstat`, its bytes).
//! So what is served is exactly what was checked: there is no separate check for a symlink to be
//! swapped under, and no file opened by a path that was not checked.
//!
//! **Small files are kept in memory, per worker** (up to [`READ_AT_ONCE`] bytes each,
//! [`CACHE_ENTRIES`] files and [`CACHE_BYTES`] in all; filled as files are first served, not in
//! `preload`, so that nothing is kept for files no one asks for). A kept file is still checked on
//! every request: its path is resolved again beneath the root under the same symlink policy
//! (`openat2` with `O_PATH`: located, not opened for reading) and its `fstat` must show the same
//! version (device, inode, size, modification and change times), else it is forgotten and the
//! request served from the disk. The change time cannot be set back by anyone, so a rewrite that
//! keeps size and modification time is still seen. A file changed less than [`SETTLED`] ago is
//! never kept: file times are coarse (a clock tick), and two writes within one tick can leave the
//! same times behind.
//!
//! A larger file is opened and `fstat`ed on every request (its bytes are sent from that
//! descriptor); what its answers carry besides the bytes (`ETag`, `Last-Modified`, content type)
//! is worked out once per version of the file and reused while the `fstat` shows that version.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use nix::errno::Errno;
use tine::app::{full, Body, Request};
use tine::config::FollowSymlinks;
use tine::sys::fs::{locate_beneath, open_beneath, read_cached_at, Symlinks};
use tine::Handler;

/// Files (ranges) up to this size are read at once into one buffer; larger ones are sent from the
/// file ([`Body::file`]).
const READ_AT_ONCE: usize = 16 * 1024;

/// The name served for a directory requested with a trailing slash.
const INDEX: &str = "index.html";

/// The most files a worker keeps in memory.
const CACHE_ENTRIES: usize = 4096;
/// The most bytes of files a worker keeps in memory.
const CACHE_BYTES: usize = 32 << 20;
/// How long ago a file must have last changed to be kept in memory (see the module's doc).
const SETTLED: Duration = Duration::from_secs(1);

/// An open root directory, the symlink policy every open beneath it follows, and the small files
/// this worker keeps.
pub struct Root {
    dir: File,
    symlinks: Symlinks,
    cache: Mutex<Cache>,
}

/// The small files a worker keeps, by request path (the URI's path as received).
#[derive(Default)]
struct Cache {
    entries: HashMap<String, Arc<Kept>>,
    bytes: usize,
    /// What the answers for a larger file (sent from its open descriptor) carry besides its
    /// bytes, by request path: worked out again only when the file's `fstat` shows another
    /// version (at most [`CACHE_ENTRIES`]).
    described: HashMap<String, Arc<Described>>,
}

/// The validators and content type of one version of a file: a function of its name, size and
/// modification time alone, so reusing them for the same version is always right.
struct Described {
    name: PathBuf,
    version: Version,
    validators: Validators,
    content_type: &'static str,
}

/// A small file kept in memory, with everything its answers carry.
struct Kept {
    /// The path opened for it beneath the root (a directory's index file included): located
    /// again on every request.
    name: PathBuf,
    version: Version,
    validators: Validators,
    content_type: &'static str,
    bytes: Bytes,
}

/// What tells one version of a file from another, from its `fstat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Version {
    fn of(meta: &std::fs::Metadata) -> Version {
        Version {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Whether the file last changed at least [`SETTLED`] ago.
    fn is_settled(&self) -> bool {
        let (secs, nanos) = self.ctime.max(self.mtime);
        let changed =
            UNIX_EPOCH + Duration::new(secs.max(0) as u64, nanos.clamp(0, 999_999_999) as u32);
        SystemTime::now()
            .duration_since(changed)
            .is_ok_and(|age| age >= SETTLED)
    }
}

impl Root {
    /// The kept file for request path `path`, if it is still the version kept (see the module's
    /// doc); a kept file that changed, moved or is refused now is forgotten.
    fn kept(&self, path: &str) -> Option<Arc<Kept>> {
        let kept = self.lock_cache().entries.get(path)?.clone();
        let same = locate_beneath(self.dir.as_fd(), &kept.name, self.symlinks)
            .and_then(|located| located.metadata())
            .is_ok_and(|meta| meta.is_file() && Version::of(&meta) == kept.version);
        if same {
            return Some(kept);
        }
        let mut cache = self.lock_cache();
        if let Some(gone) = cache.entries.remove(path) {
            cache.bytes -= gone.bytes.len();
        }
        None
    }

    /// Keeps a small file read whole, if it has settled and there is room.
    fn keep(&self, path: &str, kept: Kept) {
        if !kept.version.is_settled() {
            return;
        }
        let mut cache = self.lock_cache();
        if cache.entries.len() >= CACHE_ENTRIES
            || cache.bytes + kept.bytes.len() > CACHE_BYTES
            || cache.entries.contains_key(path)
        {
            return;
        }
        cache.bytes += kept.bytes.len();
        cache.entries.insert(path.to_string(), Arc::new(kept));
    }

    /// The validators and content type of the file `path` opened as `name`, at `version`: the
    /// ones worked out for the same version before, else worked out now (and kept for next time).
    fn describe(
        &self,
        path: &str,
        name: PathBuf,
        version: Version,
        modified: SystemTime,
    ) -> Arc<Described> {
        if let Some(d) = self.lock_cache().described.get(path) {
            if d.version == version && d.name == name {
                return d.clone();
            }
        }
        let described = Arc::new(Described {
            validators: Validators::of(version.size, modified),
            content_type: mime_guess::from_path(&name)
                .first_raw()
                .unwrap_or("application/octet-stream"),
            name,
            version,
        });
        let mut cache = self.lock_cache();
        if cache.described.len() < CACHE_ENTRIES || cache.described.contains_key(path) {
            cache.described.insert(path.to_string(), described.clone());
        }
        described
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What [`open_beneath_root`] found for a request path.
pub enum Found {
    /// A regular file (for a directory path with a slash, its index file), open for reading.
    File {
        /// The open file: what was checked is what is read.
        file: File,
        /// Its size, from `fstat`.
        len: u64,
        /// Its version, from the same `fstat`.
        version: Version,
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
        let root_handle = Root {
            dir,
            symlinks,
            cache: Mutex::default(),
        };
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
        version: Version::of(&meta),
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
    if let Some(kept) = root.kept(path) {
        return answer(
            req,
            &kept.validators,
            kept.content_type,
            kept.version.size,
            |start, len| {
                Ok(full(
                    kept.bytes.slice(start as usize..(start + len) as usize),
                ))
            },
        );
    }
    let (file, len, modified, version, name) = match open_beneath_root(root, path) {
        Ok(Found::File {
            file,
            len,
            modified,
            version,
            name,
        }) => (file, len, modified, version, name),
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
    if len > READ_AT_ONCE as u64 {
        // Too large to keep: its validators and content type are kept instead.
        let d = root.describe(path, name, version, modified);
        let read = |start, count| file_body(file, start, count);
        return answer(req, &d.validators, d.content_type, len, read);
    }
    let validators = Validators::of(len, modified);
    let content_type = mime_guess::from_path(&name)
        .first_raw()
        .unwrap_or("application/octet-stream");
    let read = |start: u64, count: u64| {
        if start == 0 && count == len {
            if let Some(bytes) = read_range(&file, 0, len)? {
                root.keep(
                    path,
                    Kept {
                        name,
                        version,
                        validators: validators.clone(),
                        content_type,
                        bytes: bytes.clone(),
                    },
                );
                return Ok(full(bytes));
            }
        }
        file_body(file, start, count)
    };
    answer(req, &validators, content_type, len, read)
}

/// `len` bytes of `file` from `start`, read on this thread if the page cache has them all
/// (`None`: the disk is needed).
fn read_range(file: &File, start: u64, len: u64) -> io::Result<Option<Bytes>> {
    let mut bytes = Vec::new();
    while (bytes.len() as u64) < len {
        let (missing, at) = (len as usize - bytes.len(), start + bytes.len() as u64);
        match read_cached_at(file, &mut bytes, missing, at) {
            Ok(0) => return Err(shrank()),
            Ok(_) => {}
            Err(e) if must_wait(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    Ok(Some(Bytes::from(bytes)))
}

/// The validators of one file version, from its `fstat`.
#[derive(Clone)]
struct Validators {
    /// `"mtime-size"` in hex, like nginx's: strong, it changes with every write that changes
    /// either.
    etag: HeaderValue,
    /// Modification time in whole seconds (what HTTP dates carry).
    modified: SystemTime,
    /// The same as an HTTP date.
    last_modified: HeaderValue,
}

impl Validators {
    fn of(len: u64, modified: SystemTime) -> Validators {
        let since_epoch = modified.duration_since(UNIX_EPOCH).unwrap_or_default();
        let etag = format!("\"{:x}-{:x}\"", since_epoch.as_nanos(), len);
        let modified = UNIX_EPOCH + Duration::from_secs(since_epoch.as_secs());
        Validators {
            etag: HeaderValue::from_str(&etag).expect("hex digits and quotes"),
            modified,
            last_modified: HeaderValue::from_str(&httpdate::fmt_http_date(modified))
                .expect("an HTTP date"),
        }
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

/// The answer for a regular file of `size` bytes: preconditions (RFC 9110 §13.2.2 order), then a
/// range or the whole file, whose bytes `read(start, len)` gives. Every answer, 304 included,
/// carries the validators and `Cache-Control`.
fn answer(
    req: &Request,
    v: &Validators,
    content_type: &'static str,
    size: u64,
    read: impl FnOnce(u64, u64) -> io::Result<Body>,
) -> Response<Body> {
    let headers = req.headers();
    let with_validators = |mut r: Response<Body>| {
        // The file may change on disk at any moment and nothing says how long it stays fresh:
        // caches keep it but check back (cheap: a 304) rather than guess a lifetime from its
        // age (the heuristic freshness REDbot warns about).
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r.headers_mut().insert(header::ETAG, v.etag.clone());
        r.headers_mut()
            .insert(header::LAST_MODIFIED, v.last_modified.clone());
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
        match read(start, len) {
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
        if let Some(bytes) = read_range(&file, start, len)? {
            return Ok(full(bytes));
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
    use std::os::unix::fs::symlink;

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

/// A larger file's validators are worked out once per version: reused while its `fstat` shows
/// the same version, new as soon as it changes (same size, another modification time).
#[cfg(test)]
mod described {
    use super::*;

    #[test]
    fn a_larger_files_validators_are_reused_for_its_version_and_renewed_when_it_changes() {
        let base =
            std::env::temp_dir().join(format!("tine-static-described-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let big = base.join("big.bin");
        std::fs::write(&big, vec![1u8; READ_AT_ONCE + 1]).unwrap();
        let root = Root::open(&base, FollowSymlinks::WithinRoot).unwrap();
        let describe = || match open_beneath_root(&root, "/big.bin") {
            Ok(Found::File {
                version,
                modified,
                name,
                ..
            }) => root.describe("/big.bin", name, version, modified),
            _ => panic!("big.bin not found"),
        };
        let first = describe();
        assert!(
            Arc::ptr_eq(&first, &describe()),
            "the same version is described once"
        );
        assert_eq!(first.content_type, "application/octet-stream");
        // Another version of the same size: only its modification time tells it apart.
        let file = std::fs::OpenOptions::new().write(true).open(&big).unwrap();
        file.set_modified(SystemTime::now() + Duration::from_secs(5))
            .unwrap();
        let second = describe();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_ne!(first.validators.etag, second.validators.etag);
        assert_ne!(
            first.validators.last_modified,
            second.validators.last_modified
        );
        std::fs::remove_dir_all(&base).unwrap();
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
