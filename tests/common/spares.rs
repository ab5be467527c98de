//! Hot spares (`spare_workers`, 1 by default) as tests see them in `ctl status --json`.

use std::time::Duration;

use super::{poll_until, Server};

/// Waits until `ctl status` shows `n` spares standing by (booted, accepting nothing); returns
/// their pids. Panics with the last status on timeout.
pub fn wait_spares(server: &Server, n: usize, timeout: Duration) -> Vec<i32> {
    let mut last = serde_json::Value::Null;
    poll_until(timeout, || {
        last = server.status();
        let pids: Vec<i32> = last["processes"]
            .as_array()?
            .iter()
            .filter(|p| p["role"] == "spare" && p["state"] == "standby")
            .filter_map(|p| p["pid"].as_i64().map(|pid| pid as i32))
            .collect();
        for pid in &pids {
            server.remember(*pid);
        }
        (pids.len() == n).then_some(pids)
    })
    .unwrap_or_else(|| panic!("not {n} spares standing by within {timeout:?}: {last}"))
}
