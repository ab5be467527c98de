//! Reading the monitor's Prometheus endpoint (`--metrics-listen 127.0.0.1:0`) from a test.

use std::net::SocketAddr;

use super::{get, Addr, Server, READY_TIMEOUT};

/// The metrics address, from the monitor's log line.
pub fn metrics_addr(server: &Server) -> SocketAddr {
    let line = server
        .log
        .wait_for_log("serving metrics at http://", READY_TIMEOUT);
    let rest = line.split("http://").nth(1).unwrap();
    rest.split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("{line}: {e}"))
}

/// The value of one sample, named with its labels as the exposition writes them (e.g.
/// `tine_rollouts_failed_total{cause="reload"}`); `None` if absent.
pub fn sample_value(server: &Server, sample: &str) -> Option<f64> {
    let r = get(&Addr::Tcp(metrics_addr(server)), "/metrics")
        .unwrap_or_else(|e| panic!("scrape: {e}; log:\n{}", server.log.text()));
    r.text().lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == sample).then(|| value.parse().ok())?
    })
}
