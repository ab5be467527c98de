//! The shared harness of tine's black-box tests: real processes, real sockets, real signals.
//!
//! Every test file does `mod common;` and uses what it needs:
//!
//! - [`Launch`] starts `tine serve` (or an example binary's `serve`) as a child process, on its own
//!   loopback port and its own control socket in a fresh [`TempDir`]; [`Launch::start`] returns
//!   once the log says `tine ready`. The running tree is a [`Server`]: its stderr is captured line by
//!   line ([`Log`]), [`Server::ctl`] runs `tine ctl` against it, [`Server::tree`] lists its
//!   processes with their `ps` titles. Dropping a [`Server`] SIGKILLs the monitor and every
//!   process of its tree, pass or fail, and prints the captured log if the test failed
//!   (`server.rs`; the captured output in `output.rs`).
//! - [`Launch::run`] runs a command that is expected to exit by itself (`tine check`, a `serve`
//!   with a bad config) and returns its exit status and output.
//! - [`Client`] / [`get`]: a small HTTP/1.1 client over a std `TcpStream` or `UnixStream` that
//!   sends exactly the bytes it is given (so tests can send malformed or hostile requests)
//!   (`client.rs`).
//! - [`load`]: a bounded concurrent load generator that counts responses by status and by worker
//!   pid (the `x-tine-worker` header of `--debug-headers`) (`load.rs`).
//! - [`proc_info`], [`descendants`], [`title`], [`gone`]: the process table, from `/proc`
//!   (`procfs.rs`).
//! - [`poll_until`]: the only way tests wait: a short poll loop with a deadline, never a bare sleep
//!   used as synchronization.
//!
//! Tests never fork in their own threads: they only spawn processes with `std::process::Command`.

#![allow(dead_code)] // each test file uses a different part of the harness

// The harness by concern; everything is re-exported here, so tests say `common::Launch`, whatever
// file holds it (a test that uses nothing of a file would warn of an unused import).
mod client;
mod load;
mod output;
mod procfs;
mod server;
#[allow(unused_imports)]
pub use {client::*, load::*, output::*, procfs::*, server::*};

pub mod client_addr;
pub mod debug_hello;
pub mod kmsg;
pub mod metrics;
pub mod pidfd;
pub mod websocket;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub mod sched;
pub mod spares;
pub mod stall;
pub mod static_app;
pub mod status;
pub mod strace;
pub mod strict;
pub mod strict_h2;
pub mod tmux;
pub mod tree_signals;

/// How long a tree may take to report `tine ready` (debug build, 2 busy cores).
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Read/write timeout of every client socket: a stuck server fails the test instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a `tine ctl` call may take.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval of [`poll_until`].
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The `tine` binary under test.
pub fn tine_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tine"))
}

/// Calls `f` every few milliseconds until it returns `Some`, or `None` once `timeout` has passed.
pub fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

// ---------------------------------------------------------------------------------------------
// Temporary directories and ports

/// A fresh directory under the system temp dir, removed on drop. Its path is short, so unix socket
/// paths inside it stay far below the 108-byte limit.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a new, empty directory.
    pub fn new() -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("tine-t{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create a temp dir");
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// Writes a file inside the directory (creating parent directories) and returns its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create parent dir");
        }
        std::fs::write(&path, contents).expect("write a file");
        path
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A loopback TCP port that was free a moment ago (bind port 0, read it, close).
///
/// Prefer letting the server bind `127.0.0.1:0` itself (what [`Launch`] does by default, race
/// free); use this only when a test needs to know the port before the server starts.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

pub mod faults;
