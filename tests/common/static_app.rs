//! The `static` reference app as the static-file tests start it: on one worker and no spare, so
//! that every request reaches the one process a test watches (with strace, say).

use std::path::Path;
use std::time::Duration;

use super::{strace, Launch, Server};

/// `tine serve --app static --root ROOT` on one worker, no spare; returns once it is ready.
pub fn serve_on_one_worker(root: &Path) -> Server {
    Launch::tine()
        .args(["--app", "static", "--workers", "1", "--spare-workers", "0"])
        .arg("--root")
        .arg(root)
        .start()
}

/// For a test that traces the worker: [`serve_on_one_worker`] and the pid of that worker once it
/// serves; `None` (the test is skipped, which [`strace::available`] says on stderr) when strace
/// is not installed.
pub fn serve_on_one_traceable_worker(root: &Path) -> Option<(Server, i32)> {
    if !strace::available() {
        return None;
    }
    let server = serve_on_one_worker(root);
    let worker = server.wait_workers(1, Duration::from_secs(30))[0];
    Some((server, worker))
}
