//! The `hello` reference app with its debug routes and headers, as the rollout tests (refork,
//! rollback) start it.

use super::Launch;

impl Launch {
    /// `tine serve --app hello --debug-routes --debug-headers --workers WORKERS`; a test adds the
    /// rest (timeouts, metrics, a `TINE_DEBUG_*` knob).
    pub fn debug_hello(workers: usize) -> Launch {
        Launch::tine()
            .args(["--app", "hello", "--debug-routes", "--debug-headers"])
            .arg("--workers")
            .arg(workers.to_string())
    }
}
