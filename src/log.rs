//! Logging through `tracing`: every line carries the process's role tag (`monitor`,
//! `mold gen:1`, `worker[2] gen:1`) and pid, in plain or JSON format.

use std::fmt::Write as _;
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
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(Format {
            json: format == LogFormat::Json,
        })
        .finish();
    tracing::subscriber::set_global_default(subscriber).map_err(|e| e.to_string())
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
        if self.json {
            let mut obj = serde_json::Map::new();
            obj.insert("time".into(), time.into());
            obj.insert("level".into(), level.as_str().into());
            obj.insert("process".into(), tag.into());
            obj.insert("pid".into(), pid.into());
            obj.insert("message".into(), fields.message.into());
            for (k, v) in fields.rest {
                obj.insert(k.into(), v.into());
            }
            writeln!(w, "{}", serde_json::Value::Object(obj))
        } else {
            let mut line = format!(
                "{time} {:>5} tine {tag} pid={pid}: {}",
                level.as_str(),
                fields.message
            );
            for (k, v) in fields.rest {
                let _ = write!(line, " {k}={v}");
            }
            writeln!(w, "{line}")
        }
    }
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
pub(crate) fn open_log_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    adopt_log_fd(Some(file.try_clone()?.into()));
    Ok(file)
}

/// Makes `fd` this process's stdout and stderr (a reopened log file).
pub(crate) fn adopt_log_fd(fd: Option<std::os::fd::OwnedFd>) {
    use std::os::fd::AsRawFd;
    if let Some(fd) = fd {
        let _ = nix::unistd::dup2(fd.as_raw_fd(), 1);
        let _ = nix::unistd::dup2(fd.as_raw_fd(), 2);
    }
}
