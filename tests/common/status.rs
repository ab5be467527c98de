//! The process rows of `ctl status --json`, as tests read them.

use super::Server;

/// One mold's or worker's row of `ctl status --json` (the monitor's own row is left out).
#[derive(Debug, Clone)]
pub struct Row {
    /// `mold` or `worker`.
    pub role: String,
    /// The worker's number (none for a mold).
    pub nr: Option<u64>,
    /// Its pid (0 if missing).
    pub pid: i32,
    /// Its generation (`u64::MAX` if missing).
    pub generation: u64,
    /// Its state (`ready`, `booting`, ...).
    pub state: String,
}

/// The children's rows of a `ctl status --json` reply; each pid is remembered by `server`, so
/// the test's clean-up reaches it. `None` if the reply has no process list.
pub fn child_rows(server: &Server, status: &serde_json::Value) -> Option<Vec<Row>> {
    let rows = status["processes"]
        .as_array()?
        .iter()
        .filter(|p| p["role"] != "monitor")
        .map(|p| {
            let row = Row {
                role: p["role"].as_str().unwrap_or("").to_string(),
                nr: p["nr"].as_u64(),
                pid: p["pid"].as_i64().unwrap_or(0) as i32,
                generation: p["generation"].as_u64().unwrap_or(u64::MAX),
                state: p["state"].as_str().unwrap_or("").to_string(),
            };
            server.remember(row.pid);
            row
        })
        .collect();
    Some(rows)
}
