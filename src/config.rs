//! Configuration: one set of options, read from a TOML file, `TINE_*` environment variables and
//! command-line flags, in that rising order of precedence (flag > env > file > default).
//!
//! [`Options`] is the single list of keys: clap reads it from flags and the environment, serde from
//! the file (`snake_case` keys; the flag is the same name in kebab-case). [`Config`] is the
//! validated result with every default filled in.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

/// A bad configuration: names the key, the value and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has an unknown key or a bad value.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid value {value:?} for `{key}`: expected {expected}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
        /// What would have been accepted.
        expected: String,
    },
}

/// A listening address: `HOST:PORT`, `[::1]:PORT` or `unix:/path`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    /// A TCP address.
    Tcp(std::net::SocketAddr),
    /// A unix stream socket path.
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path, e.g. unix:/run/tine.sock".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Ok(addr) = s.parse() {
            return Ok(ListenAddr::Tcp(addr));
        }
        // `localhost:8080` and other names: resolve once, take the first address.
        use std::net::ToSocketAddrs;
        match s.to_socket_addrs().ok().and_then(|mut a| a.next()) {
            Some(addr) if s.contains(':') => Ok(ListenAddr::Tcp(addr)),
            _ => Err(format!("{s:?} is not HOST:PORT, [IPv6]:PORT or unix:/path")),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A duration given as seconds (`30`, `1.5`) or with a unit (`500ms`, `30s`, `2m`, `1h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub Duration);

impl FromStr for Seconds {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let value: f64 = num
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a duration (e.g. 30, 1.5, 500ms, 30s, 2m)"))?;
        let scale = match unit {
            "" | "s" => 1.0,
            "ms" => 0.001,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("{s:?} has an unknown unit (use ms, s, m or h)")),
        };
        if value.is_nan() || value < 0.0 {
            return Err(format!("{s:?} is not a non-negative duration"));
        }
        Seconds::checked(Duration::try_from_secs_f64(value * scale).ok(), s)
    }
}

impl Seconds {
    /// The longest duration accepted: 100 years is "never" for a timeout, and far enough from
    /// the limits of `Instant` arithmetic that adding it to the clock cannot overflow.
    pub const MAX: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

    fn checked(d: Option<Duration>, text: impl fmt::Display) -> Result<Seconds, String> {
        match d {
            Some(d) if d <= Self::MAX => Ok(Seconds(d)),
            _ => Err(format!("{text} is too long a duration (at most 100 years)")),
        }
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Float(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => {
                Seconds::checked(Some(Duration::from_secs(n)), n).map_err(serde::de::Error::custom)
            }
            Raw::Float(f) => format!("{f}").parse().map_err(serde::de::Error::custom),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// `refork_after`: request counts that trigger the next promotion (see docs/REFORKING.md).
///
/// `50,100,1000` refork after 50 requests of generation 0, 100 of generation 1 and 1000 of every
/// later one; `3000,false` reforks once and then never again; an empty list turns it off.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReforkAfter {
    /// The thresholds, one per generation.
    pub thresholds: Vec<u64>,
    /// Whether the last threshold repeats for every later generation.
    pub repeat_last: bool,
}

impl ReforkAfter {
    /// The request count that triggers a refork out of `generation`, if any.
    pub fn threshold(&self, generation: u32) -> Option<u64> {
        match self.thresholds.get(generation as usize) {
            Some(t) => Some(*t),
            None if self.repeat_last => self.thresholds.last().copied(),
            None => None,
        }
    }

    fn from_items(items: Vec<String>) -> Result<Self, String> {
        let mut out = ReforkAfter {
            thresholds: Vec::new(),
            repeat_last: true,
        };
        let n = items.len();
        for (i, item) in items.into_iter().enumerate() {
            let item = item.trim().to_string();
            if item.is_empty() {
                continue;
            }
            if item == "false" && i + 1 == n {
                out.repeat_last = false;
            } else {
                let v: u64 = item.parse().map_err(|_| {
                    format!("{item:?} is not a request count (a list like 50,100,1000 that may end with false)")
                })?;
                if v == 0 {
                    return Err("request counts must be at least 1".into());
                }
                out.thresholds.push(v);
            }
        }
        Ok(out)
    }
}

impl FromStr for ReforkAfter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::from_items(s.split(',').map(str::to_string).collect())
    }
}

impl<'de> Deserialize<'de> for ReforkAfter {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Item {
            N(u64),
            B(bool),
        }
        let items = Vec::<Item>::deserialize(d)?;
        let mut text = Vec::new();
        for item in items {
            match item {
                Item::N(n) => text.push(n.to_string()),
                Item::B(false) => text.push("false".into()),
                Item::B(true) => {
                    return Err(serde::de::Error::custom("only `false` may end the list"))
                }
            }
        }
        ReforkAfter::from_items(text).map_err(serde::de::Error::custom)
    }
}

/// How a reload replaces the running generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ReloadStrategy {
    /// Start each replacement before retiring the old worker (capacity never dips).
    #[default]
    Surge,
    /// Retire an old worker first, then start its replacement (memory stays flat).
    RetireFirst,
}

/// What the `static` app does with symbolic links under its root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FollowSymlinks {
    /// Follow a symlink whose target resolves beneath the root by a relative path; refuse one
    /// that leads out (with `..` or an absolute target, even one that points back inside).
    #[default]
    WithinRoot,
    /// Refuse every symlink beneath the root (the root's own path may still contain some).
    Never,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

macro_rules! options {
    ($( $(#[doc = $doc:literal])* $(#[arg($($arg:tt)*)])? $name:ident : $ty:ty ),* $(,)?) => {
        /// Every configuration key, each optional: the same struct is read from flags and
        /// environment (clap; each flag's variable is `TINE_` + the key in upper case) and from the
        /// config file (serde); [`Options::or`] layers them.
        #[derive(Debug, Clone, Default, clap::Args, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct Options {
            $(
                $(#[doc = $doc])*
                #[arg(long $(, $($arg)*)?)]
                pub $name: Option<$ty>,
            )*
        }

        impl Options {
            /// Takes each key from `self` if set, else from `lower`.
            pub fn or(self, lower: Options) -> Options {
                Options { $( $name: self.$name.or(lower.$name), )* }
            }
        }
    };
}

options! {
    /// Address to listen on: HOST:PORT, `[::1]:PORT` or unix:/path (repeatable) [default: 127.0.0.1:8080]
    #[arg(value_delimiter = ',', num_args = 1, action = clap::ArgAction::Append)]
    listen: Vec<ListenAddr>,
    /// Number of worker processes [default: one per CPU]
    workers: usize,
    /// Upper bound on workers; sizes the scoreboard; must fit under RLIMIT_NOFILE (about two
    /// descriptors per child in the monitor) [default: 64]
    max_workers: usize,
    /// Built-in reference app to serve: hello, static or cache-demo [default: hello]
    app: String,
    /// Directory served by the `static` app
    root: PathBuf,
    /// Symlinks beneath `root` the `static` app follows: within-root (those that resolve
    /// beneath it by a relative path) or never [default: within-root]
    #[arg(value_enum)]
    follow_symlinks: FollowSymlinks,
    /// Number of keys of the `cache-demo` app [default: 1024]
    keys: u64,
    /// Block size in KiB of the `cache-demo` app [default: 256]
    block_kb: u64,
    /// Control socket path [default: tine.sock in the working directory]
    control_socket: PathBuf,
    /// Write the monitor's pid here (atomically; removed on exit)
    pid_file: PathBuf,
    /// Listen queue length [default: 1024]
    backlog: i32,
    /// Set SO_REUSEPORT, to share the port with another instance [default: false]
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    reuseport: bool,
    /// Set TCP_NODELAY on accepted connections [default: true]
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    nodelay: bool,
    /// Wake one idle worker per new connection (EPOLLEXCLUSIVE, as nginx); false wakes every
    /// idle worker to race for it [default: true]
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    exclusive_accept: bool,
    /// Spread new connections over the workers: a worker holding clearly more connections than
    /// another serving worker (more than twice its count, plus 2), at most one of whose
    /// connections closed in the last 5 ms, leaves new ones to it for a few milliseconds at most
    /// [default: true]
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    accept_balance: bool,
    /// Run workers under SCHED_BATCH: a worker woken on a busy CPU waits for the running task's
    /// time slice instead of preempting it (fewer context switches when CPUs are oversubscribed)
    /// [default: true]
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    sched_batch: bool,
    /// Reap children with the monitor's own waitpid even where the kernel can reap them and keep
    /// their exit status for pidfds (Linux 6.15 and later; see docs/DEPLOYMENT.md) [default:
    /// false]
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    monitor_reaps: bool,
    /// Give each worker a holder of its memory: a sleeping process that shares the worker's
    /// address space, so that when the worker dies its connections close at once and the
    /// kernel's teardown of its memory runs in the holder a moment later, off the path of its
    /// replacement (see docs/DEPLOYMENT.md) [default: true]
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    teardown_holder: bool,
    /// Nice levels the monitor raises its own CPU priority above the tree's (0 to 39; 0 = none):
    /// on a saturated machine the monitor, which needs little CPU but needs it at once, is not
    /// kept waiting behind busy processes. Needs CAP_SYS_NICE (root) or RLIMIT_NICE, else the
    /// monitor stays at the tree's level (logged); the mold and workers keep the inherited nice
    /// value [default: 5]
    monitor_nice_boost: u8,
    /// Permission bits of unix listening sockets, octal [default: 660]
    unix_mode: String,
    /// Seconds a graceful stop waits for in-flight requests and connections (WebSockets, streams) before SIGKILL [default: 30]
    graceful_timeout: Seconds,
    /// Seconds a client may take to send the request head (slowloris guard) [default: 10]
    header_read_timeout: Seconds,
    /// Seconds a draining worker keeps an idle kept-alive connection for the request the client
    /// may already be sending (answered with `Connection: close`) [default: header_read_timeout]
    drain_grace: Seconds,
    /// Seconds an idle kept-alive connection (HTTP/1.1 between requests, HTTP/2 with no stream
    /// open) is kept; an idle HTTP/2 connection is closed with a GOAWAY [default: 75]
    keepalive_timeout: Seconds,
    /// Seconds allowed between two reads of a request body while the app waits for it; past it
    /// the request is answered 408 and its connection closed (0 = no limit) [default: 60]
    body_read_timeout: Seconds,
    /// Connections one worker holds at once; past it the worker stops accepting until one
    /// closes, leaving new connections to other workers and the listen queue [default: 4096]
    max_connections: usize,
    /// Expect a PROXY protocol header (v1 or v2, as HAProxy, nginx and cloud load balancers send)
    /// first on every connection of every listener; the client address it carries becomes the
    /// request's peer. A connection without a valid one within header_read_timeout is closed
    /// [default: false]
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    proxy_protocol: bool,
    /// Largest request head in bytes; larger gets 431 [default: 16384, at least 8192]
    max_header_bytes: usize,
    /// Serve HTTP/2 with prior knowledge next to HTTP/1.1 [default: true]
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    http2: bool,
    /// HTTP/2: streams (requests) a client may have open at once on one connection, advertised in
    /// SETTINGS [default: 200]
    http2_max_concurrent_streams: u32,
    /// HTTP/2: send a PING after this long without a frame from the client, to tell a dead
    /// connection (0 = never) [default: 0]
    http2_keepalive_interval: Seconds,
    /// HTTP/2: close the connection if a keep-alive PING is not answered within this
    /// [default: 20]
    http2_keepalive_timeout: Seconds,
    /// HTTP/2: bytes a client may send on one stream before the server's window update
    /// (flow control) [default: 1048576]
    http2_initial_stream_window: u32,
    /// HTTP/2: bytes a client may send on the whole connection before a window update
    /// [default: 1048576]
    http2_initial_connection_window: u32,
    /// HTTP/2: largest frame payload the server accepts, advertised in SETTINGS (16384 to
    /// 16777215) [default: 16384]
    http2_max_frame_size: u32,
    /// Tokio worker threads per worker process; 1 is a current-thread runtime [default: 1]
    worker_threads: usize,
    /// Add an `x-tine-worker: PID` header to every response (for tests) [default: false]
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    debug_headers: bool,
    /// Enable the reference app's debug routes (/echo, /sleep/MS, /stream/MS, /spin, /leak/KB, /crash, /subprocess/SECS) [default: false]
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    debug_routes: bool,
    /// Consecutive failed spawns before the monitor gives up and exits, only if no worker has
    /// been ready since it started (a start-up that never works) [default: 10]
    max_consecutive_spawn_errors: u32,
    /// Failures of a new generation during its rollout (failed starts, and its workers dying
    /// after they were ready) after which the rollout is abandoned and the previous generation
    /// keeps serving [default: 3]
    rollout_max_failures: u32,
    /// Seconds a new process may take to report ready [default: 30]
    spawn_timeout: Seconds,
    /// Seconds without a heartbeat before a worker is asked to exit [default: 30]
    timeout: Seconds,
    /// Seconds after `timeout` before a hung worker is killed [default: 5]
    timeout_cleanup: Seconds,
    /// Seconds a request may run before it gets 504 (0 = no limit) [default: 0]
    request_timeout: Seconds,
    /// Recycle a worker after this many requests (0 = never) [default: 0]
    max_requests: u64,
    /// Add up to this many requests to max_requests per worker, at random [default: 0]
    max_requests_jitter: u64,
    /// Recycle a worker whose RSS exceeds this many MiB (0 = no limit) [default: 0]
    max_rss_mb: u64,
    /// Recycle a worker whose PSS exceeds this many MiB (0 = no limit) [default: 0]
    max_pss_mb: u64,
    /// Recycle a worker after this much CPU time in seconds (0 = no limit) [default: 0]
    max_cpu_seconds: u64,
    /// Recycle a worker after this long (0 = no limit) [default: 0]
    max_lifetime: Seconds,
    /// Refork after these request counts, e.g. 50,100,1000 or 3000,false [default: off]
    refork_after: ReforkAfter,
    /// Old-generation workers replaced at once during a rollout [default: 1]
    refork_max_unavailable: usize,
    /// How reload replaces workers [default: surge]
    #[arg(value_enum)]
    reload_strategy: ReloadStrategy,
    /// Hot spares: workers forked and booted ahead of need that accept nothing until one takes
    /// over from a worker that died, was recycled or is added (0 to 16) [default: 1]
    spare_workers: usize,
    /// Prometheus metrics address, served by the monitor (HOST:PORT) [default: off]
    metrics_listen: std::net::SocketAddr,
    /// Log format [default: plain]
    #[arg(value_enum)]
    log_format: LogFormat,
    /// Log filter, e.g. info or tine=debug [default: info]
    log_level: String,
    /// Append logs (and the children's stdout/stderr) to this file; USR1 reopens it. Not a
    /// symbolic link, and with `user`, not owned or writable by that user
    log_file: PathBuf,
    /// Development mode: reload everything when a file under PATH changes (repeatable)
    #[arg(num_args = 1, action = clap::ArgAction::Append)]
    watch: Vec<PathBuf>,
    /// Development mode: new workers from the current mold when a file under PATH changes (repeatable)
    #[arg(num_args = 1, action = clap::ArgAction::Append)]
    watch_boot: Vec<PathBuf>,
    /// Run the mold and workers as this user (name or uid); the monitor keeps root to bind and signal
    user: String,
    /// Run the mold and workers with this group (name or gid) [default: the user's group]
    group: String,
    /// Directory where a worker writes its profile (SIGUSR2 to a worker, `tine ctl profile`):
    /// tine-profile-worker<NR>-<PID>-<UNIX TIME>.svg and .folded [default: the working directory]
    profile_dir: PathBuf,
    /// Seconds after which a profile started with SIGUSR2 stops by itself and is written (also
    /// the most `ctl profile --seconds` may ask) [default: 300]
    profile_max_seconds: u32,
}

/// The most hot spares (`spare_workers`) a tree keeps.
pub const MAX_SPARE_WORKERS: usize = 16;

/// The validated configuration with every default filled in.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listening addresses.
    pub listen: Vec<ListenAddr>,
    /// Whether `listen` was given (flag, env or file) rather than defaulted: without it, sockets
    /// passed by systemd socket activation are served instead of the default address.
    pub listen_given: bool,
    /// Workers to run.
    pub workers: usize,
    /// Upper bound on workers.
    pub max_workers: usize,
    /// Reference app name.
    pub app: String,
    /// Static app root.
    pub root: Option<PathBuf>,
    /// Symlinks the static app follows beneath its root.
    pub follow_symlinks: FollowSymlinks,
    /// cache-demo keys.
    pub keys: u64,
    /// cache-demo block size in KiB.
    pub block_kb: u64,
    /// Control socket path.
    pub control_socket: PathBuf,
    /// Pid file.
    pub pid_file: Option<PathBuf>,
    /// Where workers write their profiles.
    pub profile_dir: PathBuf,
    /// The longest a profile runs.
    pub profile_max_seconds: u32,
    /// Listen backlog.
    pub backlog: i32,
    /// SO_REUSEPORT.
    pub reuseport: bool,
    /// TCP_NODELAY on accepted sockets.
    pub nodelay: bool,
    /// One idle worker woken per new connection.
    pub exclusive_accept: bool,
    /// A worker well above its lightest serving peer's connections leaves new ones to it.
    pub accept_balance: bool,
    /// Workers under SCHED_BATCH.
    pub sched_batch: bool,
    /// The monitor reaps its children itself, even where the kernel could (see
    /// `crate::sys::pidfd`).
    pub monitor_reaps: bool,
    /// Each worker starts a holder of its memory (see `crate::sys::holder`).
    pub teardown_holder: bool,
    /// Nice levels the monitor runs above the tree (0: none).
    pub monitor_nice_boost: u8,
    /// Unix socket permission bits.
    pub unix_mode: u32,
    /// Graceful stop limit.
    pub graceful_timeout: Duration,
    /// Request head read limit.
    pub header_read_timeout: Duration,
    /// How long a draining worker keeps an idle kept-alive connection.
    pub drain_grace: Duration,
    /// How long an idle kept-alive connection is kept.
    pub keepalive_timeout: Duration,
    /// Longest wait between two reads of a request body (zero: no limit).
    pub body_read_timeout: Duration,
    /// Connections one worker holds at once.
    pub max_connections: usize,
    /// Every connection starts with a PROXY protocol header.
    pub proxy_protocol: bool,
    /// Request head size limit.
    pub max_header_bytes: usize,
    /// HTTP/2 prior knowledge.
    pub http2: bool,
    /// HTTP/2 settings and keep-alive pings.
    pub http2_settings: Http2Settings,
    /// Runtime threads per worker.
    pub worker_threads: usize,
    /// Debug response header.
    pub debug_headers: bool,
    /// Debug routes of the reference app.
    pub debug_routes: bool,
    /// Spawn failures before giving up (only if no worker has ever been ready).
    pub max_consecutive_spawn_errors: u32,
    /// Failed starts of a new generation before its rollout is abandoned.
    pub rollout_max_failures: u32,
    /// Ready deadline for new processes.
    pub spawn_timeout: Duration,
    /// Heartbeat timeout.
    pub timeout: Duration,
    /// Grace after the heartbeat timeout.
    pub timeout_cleanup: Duration,
    /// Per-request limit (zero: none).
    pub request_timeout: Duration,
    /// Requests before recycling (0: never).
    pub max_requests: u64,
    /// Random extra requests.
    pub max_requests_jitter: u64,
    /// RSS limit in MiB (0: none).
    pub max_rss_mb: u64,
    /// PSS limit in MiB (0: none).
    pub max_pss_mb: u64,
    /// CPU limit in seconds (0: none).
    pub max_cpu_seconds: u64,
    /// Lifetime limit (zero: none).
    pub max_lifetime: Duration,
    /// Refork thresholds.
    pub refork_after: ReforkAfter,
    /// Rollout width.
    pub refork_max_unavailable: usize,
    /// Reload strategy.
    pub reload_strategy: ReloadStrategy,
    /// Hot spare workers kept booted, not accepting, to take over at once.
    pub spare_workers: usize,
    /// Metrics address.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
    /// Log file (stderr if none).
    pub log_file: Option<PathBuf>,
    /// Paths whose change triggers a full reload.
    pub watch: Vec<PathBuf>,
    /// Paths whose change triggers new workers from the current mold.
    pub watch_boot: Vec<PathBuf>,
    /// Privileges the children drop to.
    pub run_as: Option<RunAs>,
}

/// What an HTTP/2 connection advertises and how it checks its client is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Settings {
    /// SETTINGS_MAX_CONCURRENT_STREAMS.
    pub max_concurrent_streams: u32,
    /// Idle time before a keep-alive PING (`None`: never).
    pub keepalive_interval: Option<Duration>,
    /// How long a keep-alive PING may go unanswered.
    pub keepalive_timeout: Duration,
    /// SETTINGS_INITIAL_WINDOW_SIZE.
    pub initial_stream_window: u32,
    /// The connection's flow-control window.
    pub initial_connection_window: u32,
    /// SETTINGS_MAX_FRAME_SIZE.
    pub max_frame_size: u32,
}

/// A uid and gid the children switch to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

fn resolve_run_as(
    user: Option<String>,
    group: Option<String>,
) -> Result<Option<RunAs>, ConfigError> {
    use nix::unistd::{Group, User};
    let invalid = |key: &'static str, value: &str, expected: &str| ConfigError::Invalid {
        key,
        value: value.to_string(),
        expected: expected.to_string(),
    };
    let Some(user_text) = user else {
        if let Some(g) = group {
            return Err(invalid("group", &g, "a group only together with `user`"));
        }
        return Ok(None);
    };
    let user = match user_text.parse::<u32>() {
        Ok(uid) => User::from_uid(uid.into()).ok().flatten(),
        Err(_) => User::from_name(&user_text).ok().flatten(),
    }
    .ok_or_else(|| invalid("user", &user_text, "an existing user name or uid"))?;
    let gid = match group {
        None => user.gid.as_raw(),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => Group::from_name(&g)
                .ok()
                .flatten()
                .ok_or_else(|| invalid("group", &g, "an existing group name or gid"))?
                .gid
                .as_raw(),
        },
    };
    Ok(Some(RunAs {
        uid: user.uid.as_raw(),
        gid,
    }))
}

impl Options {
    /// Reads a config file.
    pub fn from_file(path: &Path) -> Result<Options, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e
                .to_string()
                .replace('\n', " ")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        })
    }

    /// Validates and fills in defaults.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        fn invalid(key: &'static str, value: impl fmt::Debug, expected: &str) -> ConfigError {
            ConfigError::Invalid {
                key,
                value: format!("{value:?}"),
                expected: expected.into(),
            }
        }
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let max_workers = self.max_workers.unwrap_or(64);
        if max_workers == 0 || max_workers > 4096 {
            return Err(invalid(
                "max_workers",
                max_workers,
                "a number from 1 to 4096",
            ));
        }
        let workers = self.workers.unwrap_or(cpus.min(max_workers));
        if workers == 0 || workers > max_workers {
            return Err(invalid(
                "workers",
                workers,
                &format!("a number from 1 to max_workers ({max_workers})"),
            ));
        }
        let app = self.app.unwrap_or_else(|| "hello".into());
        let backlog = self.backlog.unwrap_or(1024);
        if backlog <= 0 {
            return Err(invalid("backlog", backlog, "a positive number"));
        }
        let unix_mode_text = self.unix_mode.unwrap_or_else(|| "660".into());
        let unix_mode = u32::from_str_radix(unix_mode_text.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                invalid(
                    "unix_mode",
                    &unix_mode_text,
                    "octal permission bits like 660",
                )
            })?;
        let max_header_bytes = self.max_header_bytes.unwrap_or(16 * 1024);
        if !(8192..=1 << 20).contains(&max_header_bytes) {
            return Err(invalid(
                "max_header_bytes",
                max_header_bytes,
                "a size from 8192 to 1048576",
            ));
        }
        let worker_threads = self.worker_threads.unwrap_or(1);
        if worker_threads == 0 || worker_threads > 256 {
            return Err(invalid(
                "worker_threads",
                worker_threads,
                "a number from 1 to 256",
            ));
        }
        let listen_given = self.listen.as_ref().is_some_and(|l| !l.is_empty());
        let mut listen = self.listen.unwrap_or_default();
        if listen.is_empty() {
            listen.push(ListenAddr::Tcp(([127, 0, 0, 1], 8080).into()));
        }
        let monitor_nice_boost = self.monitor_nice_boost.unwrap_or(5);
        if monitor_nice_boost > 39 {
            return Err(invalid(
                "monitor_nice_boost",
                monitor_nice_boost,
                "a number from 0 to 39 (nice values span -20 to 19)",
            ));
        }
        let max_consecutive_spawn_errors = self.max_consecutive_spawn_errors.unwrap_or(10);
        if max_consecutive_spawn_errors == 0 {
            return Err(invalid("max_consecutive_spawn_errors", 0, "at least 1"));
        }
        let rollout_max_failures = self.rollout_max_failures.unwrap_or(3);
        if rollout_max_failures == 0 {
            return Err(invalid("rollout_max_failures", 0, "at least 1"));
        }
        let refork_max_unavailable = self.refork_max_unavailable.unwrap_or(1);
        // More than every worker at once means nothing more, and it sizes the scoreboard.
        if refork_max_unavailable == 0 || refork_max_unavailable > max_workers {
            return Err(invalid(
                "refork_max_unavailable",
                refork_max_unavailable,
                &format!("a number from 1 to max_workers ({max_workers})"),
            ));
        }
        let spare_workers = self.spare_workers.unwrap_or(1);
        // Each spare takes two scoreboard slots during a rollout (the old generation's and the
        // new one's): a bound keeps the scoreboard and the monitor's descriptors small.
        if spare_workers > MAX_SPARE_WORKERS {
            return Err(invalid(
                "spare_workers",
                spare_workers,
                &format!("a number from 0 to {MAX_SPARE_WORKERS}"),
            ));
        }
        let secs = |v: Option<Seconds>, default: u64| {
            v.map(|s| s.0).unwrap_or(Duration::from_secs(default))
        };
        let timeout = secs(self.timeout, 30);
        if timeout.is_zero() {
            return Err(invalid("timeout", timeout, "a positive duration"));
        }
        let spawn_timeout = secs(self.spawn_timeout, 30);
        if spawn_timeout.is_zero() {
            return Err(invalid(
                "spawn_timeout",
                spawn_timeout,
                "a positive duration",
            ));
        }
        // Zero would not mean "no limit": hyper (and the worker's first-request deadline) would
        // close every connection before its first byte.
        let header_read_timeout = secs(self.header_read_timeout, 10);
        if header_read_timeout.is_zero() {
            return Err(invalid(
                "header_read_timeout",
                header_read_timeout,
                "a positive duration",
            ));
        }
        let keepalive_timeout = secs(self.keepalive_timeout, 75);
        let body_read_timeout = secs(self.body_read_timeout, 60);
        // Zero would close every kept-alive connection at the next sweep.
        if keepalive_timeout.is_zero() {
            return Err(invalid(
                "keepalive_timeout",
                keepalive_timeout,
                "a positive duration",
            ));
        }
        let max_connections = self.max_connections.unwrap_or(4096);
        if !(1..=1 << 20).contains(&max_connections) {
            return Err(invalid(
                "max_connections",
                max_connections,
                "a number from 1 to 1048576",
            ));
        }
        let http2_settings = Http2Settings {
            max_concurrent_streams: self.http2_max_concurrent_streams.unwrap_or(200),
            keepalive_interval: self
                .http2_keepalive_interval
                .map(|s| s.0)
                .filter(|d| !d.is_zero()),
            keepalive_timeout: secs(self.http2_keepalive_timeout, 20),
            initial_stream_window: self.http2_initial_stream_window.unwrap_or(1 << 20),
            initial_connection_window: self.http2_initial_connection_window.unwrap_or(1 << 20),
            max_frame_size: self.http2_max_frame_size.unwrap_or(16 * 1024),
        };
        // The ranges RFC 9113 allows (section 6.5.2); hyper would panic or send a bad frame.
        const MAX_WINDOW: u32 = (1 << 31) - 1;
        if http2_settings.max_concurrent_streams == 0 {
            return Err(invalid("http2_max_concurrent_streams", 0, "at least 1"));
        }
        if http2_settings.keepalive_timeout.is_zero() {
            return Err(invalid(
                "http2_keepalive_timeout",
                http2_settings.keepalive_timeout,
                "a positive duration",
            ));
        }
        for (key, window) in [
            (
                "http2_initial_stream_window",
                http2_settings.initial_stream_window,
            ),
            (
                "http2_initial_connection_window",
                http2_settings.initial_connection_window,
            ),
        ] {
            if !(1..=MAX_WINDOW).contains(&window) {
                return Err(invalid(key, window, "a size from 1 to 2147483647"));
            }
        }
        if !((1 << 14)..(1 << 24)).contains(&http2_settings.max_frame_size) {
            return Err(invalid(
                "http2_max_frame_size",
                http2_settings.max_frame_size,
                "a size from 16384 to 16777215",
            ));
        }
        let profile_max_seconds = self.profile_max_seconds.unwrap_or(300);
        if !(1..=86_400).contains(&profile_max_seconds) {
            return Err(invalid(
                "profile_max_seconds",
                profile_max_seconds,
                "a number of seconds from 1 to 86400",
            ));
        }
        Ok(Config {
            listen,
            listen_given,
            workers,
            max_workers,
            app,
            root: self.root,
            follow_symlinks: self.follow_symlinks.unwrap_or_default(),
            keys: self.keys.unwrap_or(1024),
            block_kb: self.block_kb.unwrap_or(256),
            control_socket: self
                .control_socket
                .unwrap_or_else(|| PathBuf::from("tine.sock")),
            pid_file: self.pid_file,
            profile_dir: self.profile_dir.unwrap_or_else(|| PathBuf::from(".")),
            profile_max_seconds,
            backlog,
            reuseport: self.reuseport.unwrap_or(false),
            nodelay: self.nodelay.unwrap_or(true),
            exclusive_accept: self.exclusive_accept.unwrap_or(true),
            accept_balance: self.accept_balance.unwrap_or(true),
            sched_batch: self.sched_batch.unwrap_or(true),
            monitor_reaps: self.monitor_reaps.unwrap_or(false),
            teardown_holder: self.teardown_holder.unwrap_or(true),
            monitor_nice_boost,
            unix_mode,
            graceful_timeout: secs(self.graceful_timeout, 30),
            header_read_timeout,
            drain_grace: self.drain_grace.map_or(header_read_timeout, |s| s.0),
            keepalive_timeout,
            body_read_timeout,
            max_connections,
            proxy_protocol: self.proxy_protocol.unwrap_or(false),
            max_header_bytes,
            http2: self.http2.unwrap_or(true),
            http2_settings,
            worker_threads,
            debug_headers: self.debug_headers.unwrap_or(false),
            debug_routes: self.debug_routes.unwrap_or(false),
            max_consecutive_spawn_errors,
            rollout_max_failures,
            spawn_timeout,
            timeout,
            timeout_cleanup: secs(self.timeout_cleanup, 5),
            request_timeout: secs(self.request_timeout, 0),
            max_requests: self.max_requests.unwrap_or(0),
            max_requests_jitter: self.max_requests_jitter.unwrap_or(0),
            max_rss_mb: self.max_rss_mb.unwrap_or(0),
            max_pss_mb: self.max_pss_mb.unwrap_or(0),
            max_cpu_seconds: self.max_cpu_seconds.unwrap_or(0),
            max_lifetime: secs(self.max_lifetime, 0),
            refork_after: self.refork_after.unwrap_or_default(),
            refork_max_unavailable,
            reload_strategy: self.reload_strategy.unwrap_or_default(),
            spare_workers,
            metrics_listen: self.metrics_listen,
            log_format: self.log_format.unwrap_or_default(),
            log_level: self.log_level.unwrap_or_else(|| "info".into()),
            log_file: self.log_file,
            watch: self.watch.unwrap_or_default(),
            watch_boot: self.watch_boot.unwrap_or_default(),
            run_as: resolve_run_as(self.user, self.group)?,
        })
    }
}
