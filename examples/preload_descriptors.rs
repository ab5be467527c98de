//! A mistake shown: `preload` opens a file and a socket and keeps them in the app (a log file, a
//! client's connection). Workers must not share them, so every worker closes them right after its
//! fork, and the mold says so in its log, naming each one (docs/FORK_SAFETY.md, "Descriptors and
//! connections"). `tests/fork_safety.rs` runs it as a child process.
//!
//! ```sh
//! cargo run --example preload_descriptors -- serve --listen 127.0.0.1:8080 --workers 2
//! # WARN ... preload left descriptors open in the mold; every worker closes them ...
//! curl -s localhost:8080/   # preload kept descriptors 5 and 6; here 5 is closed, 6 is closed
//! ```
//!
//! The right way: open files, sockets and connection pools in `boot`, one per worker.

use std::convert::Infallible;
use std::fs::File;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, RawFd};
use std::process::ExitCode;

use tine::app::{full, Request};
use tine::{App, Context, Handler, Worker};

struct PreloadDescriptors {
    /// Kept open from `preload`: the mistake this example shows.
    file: File,
    socket: UdpSocket,
}

impl App for PreloadDescriptors {
    fn preload(_ctx: &Context) -> anyhow::Result<Self> {
        let path = std::env::current_dir()?.join("preload-kept.txt");
        std::fs::write(&path, "opened by preload\n")?;
        Ok(PreloadDescriptors {
            file: File::open(&path)?,
            socket: UdpSocket::bind("127.0.0.1:0")?,
        })
    }

    fn boot(&self, _worker: &Worker) -> anyhow::Result<Handler> {
        let kept = [self.file.as_raw_fd(), self.socket.as_raw_fd()];
        Ok(Handler::http(tower::service_fn(move |_req: Request| {
            let report = format!(
                "preload kept descriptors {} and {}; here {} is {}, {} is {}\n",
                kept[0],
                kept[1],
                kept[0],
                what_is(kept[0]),
                kept[1],
                what_is(kept[1])
            );
            async move { Ok::<_, Infallible>(http::Response::new(full(report))) }
        })))
    }
}

/// What descriptor `fd` of this process refers to now.
fn what_is(fd: RawFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|target| format!("now {}", target.display()))
        .unwrap_or_else(|_| "closed".to_string())
}

fn main() -> ExitCode {
    tine::run::<PreloadDescriptors>()
}
