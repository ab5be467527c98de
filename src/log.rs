//! Logging through `tracing`: every line carries the process's role tag (`monitor`,
//! `mold gen:1`, `worker[2] gen:1`) and pid, in plain or JSON format.
//!
//! Logging never ends or blocks a process. Every line is one write to fd 2 (stderr, or the log
//! file made fd 2) that does not wait: a pipe or socket that is full answers `EAGAIN` at once
//! (`RWF_NOWAIT`). A pipe on fd 2 is grown to 1 MiB so bursts fit, and a line that meets a full
//! pipe waits for room at most 20 ms, once per stall (a reader only descheduled catches up; a
//! reader gone for good costs one such wait). A line that cannot be written whole (`EPIPE`,
//! `ENOSPC`, `EIO`, `EAGAIN`) is dropped and counted in the scoreboard's header, which every
//! process of the tree shares, so `tine_log_lines_dropped_total` and `ctl status` show the whole
//! tree's drops. tracing's own
//! writer reports a failed write with `eprintln!`, which panics when stderr is gone: the writer
//! here never reports an error. After `EPIPE` (the reader of stderr went away) lines are dropped
//! without trying, until a log file is reopened onto fd 2.

use std::fmt::Write as _;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing_subscriber::fmt::{format::Writer, FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

static TAG: Mutex<String> = Mutex::new(String::new());

/// Sets this process's tag (called after each fork).
pub fn set_process_tag(tag: String) {
    *TAG.lock().unwrap_or_else(|e| e.into_inner()) = tag;
}

/// Installs the global subscriber, writing to stderr. Safe to call once per process image.
pub fn init(format: LogFormat, filter: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| format!("invalid value {filter:?} for `log_level`: {e}"))?;
    grow_stderr_pipe();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LineWriter)
        .log_internal_errors(false)
        .event_format(Format {
            json: format == LogFormat::Json,
        })
        .finish();
    tracing::subscriber::set_global_default(subscriber).map_err(|e| e.to_string())
}

/// Lines dropped before the scoreboard existed (the monitor's first lines only; every later
/// drop is counted in the scoreboard, shared by the tree).
static DROPPED_EARLY: AtomicU64 = AtomicU64::new(0);
/// fd 2 answered `EPIPE`: nobody reads it any more.
static STDERR_GONE: AtomicBool = AtomicBool::new(false);
/// fd 2 refused `RWF_NOWAIT` (a regular file or a device): plain writes, which do not wait long.
static NOWAIT_UNSUPPORTED: AtomicBool = AtomicBool::new(false);
/// fd 2 was full and stayed full for [`FULL_PATIENCE`]: its reader is stalled (a paused pager, a
/// stuck collector). Lines are dropped at once until a write goes through again.
static STALLED: AtomicBool = AtomicBool::new(false);
/// How long a line waits for room in a full pipe before it is dropped, once per stall: enough for
/// a reader that was only descheduled during a burst of lines, too short to slow a process whose
/// reader is gone for good (after one such wait, lines are dropped without waiting).
const FULL_PATIENCE: std::time::Duration = std::time::Duration::from_millis(20);
/// Room asked for a pipe on fd 2, so bursts of lines fit while its reader catches up (the
/// unprivileged maximum is 1 MiB by default; a smaller grant is kept).
const PIPE_SIZE: i32 = 1 << 20;

/// Log lines the tree failed to write: every process's drops since the scoreboard was created
/// (it survives reloads), plus this process's own from before.
pub(crate) fn lines_dropped() -> u64 {
    let shared = crate::ipc::scoreboard::try_global().map_or(0, |b| b.log_lines_dropped());
    shared + DROPPED_EARLY.load(Ordering::Relaxed)
}

fn count_dropped() {
    match crate::ipc::scoreboard::try_global() {
        Some(board) => board.count_log_line_dropped(),
        None => {
            DROPPED_EARLY.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Writes one whole line to fd 2 without waiting; returns whether it was written. A line that
/// could not be written whole is counted as dropped. Never panics.
pub(crate) fn write_line(line: &[u8]) -> bool {
    if line.is_empty() {
        return true;
    }
    if STDERR_GONE.load(Ordering::Relaxed) {
        count_dropped();
        return false;
    }
    let stderr = std::io::stderr();
    let fd = stderr.as_fd();
    let mut rest = line;
    while !rest.is_empty() {
        let written = if NOWAIT_UNSUPPORTED.load(Ordering::Relaxed) {
            crate::sys::io::write(fd, rest)
        } else {
            match crate::sys::io::write_nowait(fd, rest) {
                Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                    NOWAIT_UNSUPPORTED.store(true, Ordering::Relaxed);
                    crate::sys::io::write(fd, rest)
                }
                other => other,
            }
        };
        match written {
            Ok(0) => break,
            Ok(n) => {
                rest = &rest[n..];
                STALLED.store(false, Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if STALLED.load(Ordering::Relaxed) || !wait_writable(fd) {
                    STALLED.store(true, Ordering::Relaxed);
                    break;
                }
            }
            Err(e) => {
                if e.raw_os_error() == Some(libc::EPIPE) {
                    STDERR_GONE.store(true, Ordering::Relaxed);
                }
                break;
            }
        }
    }
    if rest.is_empty() {
        true
    } else {
        count_dropped();
        false
    }
}

/// Waits up to [`FULL_PATIENCE`] for room in `fd`; returns whether there is some.
fn wait_writable(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
    let ms = FULL_PATIENCE.as_millis() as u16;
    matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLOUT))
}

/// Grows the pipe on fd 2, if it is one, so that bursts of lines fit (best effort: the pipe is
/// shared with whoever reads it, and a larger buffer costs them nothing).
fn grow_stderr_pipe() {
    use nix::fcntl::{fcntl, FcntlArg};
    use std::os::fd::AsRawFd;
    let stderr = std::io::stderr();
    let fd = stderr.as_fd().as_raw_fd();
    let is_pipe =
        nix::sys::stat::fstat(fd).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFIFO);
    if is_pipe {
        let _ = fcntl(fd, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
    }
}

/// Writes `message` and a newline to stderr for the few messages that cannot go through the
/// log (before it exists, or in a child about to exit). Never panics, never waits.
pub fn print_stderr(message: impl std::fmt::Display) {
    write_line(format!("{message}\n").as_bytes());
}

/// The writer given to tracing's fmt layer: it formats a whole event into one buffer and writes
/// it with one `write_all`, so each call is one line. It never fails (see the module doc).
struct LineWriter;

impl std::io::Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        write_line(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Format {
    json: bool,
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: Vec<(&'static str, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.rest.push((field.name(), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.rest.push((field.name(), format!("{value:?}")));
        }
    }
}

impl<S, N> FormatEvent<S, N> for Format
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let tag = TAG.lock().map(|t| t.clone()).unwrap_or_default();
        let pid = std::process::id();
        let level = event.metadata().level();
        let time = humantime_now();
        // Fields carry what children and clients said (exit reasons, request lines): escaped, so
        // that nobody can forge a log line or drive the terminal of whoever reads the log.
        let json = self.json;
        if json {
            let mut obj = serde_json::Map::new();
            obj.insert("time".into(), time.into());
            obj.insert("level".into(), level.as_str().into());
            obj.insert("process".into(), escape(&tag, json).into());
            obj.insert("pid".into(), pid.into());
            obj.insert("message".into(), escape(&fields.message, json).into());
            for (k, v) in fields.rest {
                obj.insert(k.into(), escape(&v, json).into());
            }
            writeln!(w, "{}", serde_json::Value::Object(obj))
        } else {
            let mut line = format!(
                "{time} {:>5} tine {} pid={pid}: {}",
                level.as_str(),
                escape(&tag, json),
                escape(&fields.message, json)
            );
            for (k, v) in fields.rest {
                let _ = write!(line, " {k}={}", escape(&v, json));
            }
            writeln!(w, "{line}")
        }
    }
}

/// Whether `c` must not reach a log as itself: control characters (C0, DEL, C1: line breaks,
/// terminal escapes) and the bidirectional overrides that make text display in another order.
fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every character of [`needs_escape`] written as an escape (`\n`, `\u{1b}`), so that
/// one event stays one line. For JSON, only what the JSON encoder leaves raw is escaped here (it
/// escapes C0 itself, and a consumer of JSON wants `\n` back as a line break).
fn escape(text: &str, json: bool) -> std::borrow::Cow<'_, str> {
    let escaped = |c: char| needs_escape(c) && !(json && c < ' ');
    if !text.chars().any(escaped) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if escaped(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// UTC wall-clock time with milliseconds, e.g. `2026-11-22T01:55:06.123Z`.
fn humantime_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_millis()
    )
}

/// Opens `path` for appending and makes it this process's stdout and stderr. Returns the open
/// file, whose descriptor the monitor passes to its children on `SIGUSR1`.
///
/// The monitor opens it, often as root: a symbolic link there is refused (`O_NOFOLLOW`), and
/// when privileges are dropped to `run_as`, so is a file or directory that user could write (it
/// could then point root's writes, or the next reopen, wherever it likes).
pub(crate) fn open_log_file(
    path: &std::path::Path,
    run_as: Option<crate::config::RunAs>,
) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => std::io::Error::new(
                e.kind(),
                "it is a symbolic link (refused: name the file itself)",
            ),
            _ => e,
        })?;
    if let Some(user) = run_as {
        refuse_writable_by(&file.metadata()?, user, "the file")?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => std::path::Path::new("."),
        };
        refuse_writable_by(&std::fs::metadata(dir)?, user, "its directory")?;
    }
    adopt_log_fd(Some(file.try_clone()?.into()));
    Ok(file)
}

/// Fails if `user` (with its one group, as children run after the drop) could write to what
/// `meta` describes: as its owner, through its group, or as anyone. A sticky directory writable
/// by all (`/tmp`) is fine: there, only a file's owner may replace it.
fn refuse_writable_by(
    meta: &std::fs::Metadata,
    user: crate::config::RunAs,
    what: &str,
) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.mode();
    let sticky_dir = meta.is_dir() && mode & 0o1000 != 0;
    let writable = (meta.uid() == user.uid && mode & 0o200 != 0)
        || (meta.gid() == user.gid && mode & 0o020 != 0)
        || (mode & 0o002 != 0 && !sticky_dir);
    if meta.uid() == user.uid || writable {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{what} is owned or writable by `user` (uid {}, gid {}), who could redirect the \
                 monitor's writes; make it root's and not writable by that user",
                user.uid, user.gid
            ),
        ));
    }
    Ok(())
}

/// Makes `fd` this process's stdout and stderr (a reopened log file).
pub(crate) fn adopt_log_fd(fd: Option<std::os::fd::OwnedFd>) {
    use std::os::fd::AsRawFd;
    if let Some(fd) = fd {
        let _ = nix::unistd::dup2(fd.as_raw_fd(), 1);
        let _ = nix::unistd::dup2(fd.as_raw_fd(), 2);
        // A new descriptor: it may take lines again, and perhaps without waiting.
        STDERR_GONE.store(false, Ordering::Relaxed);
        NOWAIT_UNSUPPORTED.store(false, Ordering::Relaxed);
        STALLED.store(false, Ordering::Relaxed);
    }
}

/// `CLOCK_MONOTONIC` in microseconds: the same clock in every process of the tree (and in a
/// client on the same machine), so the debug lines of target `tine::respawn` — a worker's death
/// seen by the monitor, a spare's activation sent, received, listening, first connection — can
/// be laid on one timeline (bench/respawn/timeline.py).
pub(crate) fn monotonic_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}

/// This thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`) in microseconds: next to
/// [`monotonic_us`] in the `tine::respawn` lines, it tells work from waiting for a CPU.
pub(crate) fn thread_cpu_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}

/// This thread's page faults so far (minor and major), for the `tine::respawn` lines: a just
/// woken spare touching pages it never touched since its fork pays for each.
pub(crate) fn thread_faults() -> u64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_THREAD)
        .map(|u| (u.minor_page_faults() + u.major_page_faults()) as u64)
        .unwrap_or(0)
}

/// A point of the `tine::respawn` timeline in the calling thread: [`monotonic_us`],
/// [`thread_cpu_us`], [`thread_faults`].
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RespawnStamp {
    pub us: u64,
    pub cpu_us: u64,
    pub faults: u64,
}

/// A [`RespawnStamp`] now, if the `tine::respawn` debug lines are on (else nothing is measured:
/// the CPU clock and the fault count are system calls, on the path they time).
pub(crate) fn respawn_stamp() -> Option<RespawnStamp> {
    tracing::enabled!(target: "tine::respawn", tracing::Level::DEBUG).then(|| RespawnStamp {
        us: monotonic_us(),
        cpu_us: thread_cpu_us(),
        faults: thread_faults(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Formats one event with a field that a child or client could have sent, and returns the
    /// output.
    fn render(json: bool, value: &str) -> String {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || Sink(sink.clone()))
            .event_format(Format { json })
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(reason = value, "worker exiting: {value}");
        });
        let bytes = out.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const FORGED: &str =
        "boom\n2026-11-30T00:00:00.000Z  INFO tine monitor pid=1: all fine\r\x1b[2J\u{9b}31m\u{202e}";

    #[test]
    fn control_characters_in_fields_cannot_forge_lines_or_reach_the_terminal() {
        let plain = render(false, FORGED);
        assert_eq!(plain.lines().count(), 1, "{plain:?}");
        assert!(plain.ends_with('\n'));
        for raw in ['\r', '\x1b', '\u{9b}', '\u{202e}'] {
            assert!(!plain.contains(raw), "{raw:?} in {plain:?}");
        }
        assert!(plain.contains("reason=boom\\n2026-11-30"), "{plain}");
        assert!(plain.contains("\\u{1b}[2J"), "{plain}");
    }

    #[test]
    fn json_lines_stay_one_line_and_escape_what_json_leaves_raw() {
        let json = render(true, FORGED);
        assert_eq!(json.lines().count(), 1, "{json:?}");
        let value: serde_json::Value = serde_json::from_str(json.trim_end()).unwrap();
        let reason = value["reason"].as_str().unwrap();
        // The line break comes back as a line break from the JSON; C1 and bidi do not come raw.
        assert!(reason.starts_with("boom\n2026"), "{reason:?}");
        assert!(
            !reason.contains('\u{9b}') && !reason.contains('\u{202e}'),
            "{reason:?}"
        );
    }
}
