#!/usr/bin/env bash
# What a graceful stop's wait for TCP handshakes under way costs the monitor per check (it checks
# every 5 ms for up to 1 s): the count through sock_diag (src/monitor/queue.rs) against the
# /proc/net/tcp + tcp6 scan it replaced, with IDLE idle loopback connections open (default 5000).
# Needs 2*IDLE+100 descriptors (ulimit -n). Results: bench/results/stop.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
export TINE_BENCH_IDLE="${IDLE:-5000}"
cargo test --release --lib handshake_scan_cost -- --ignored --nocapture --test-threads 1 2>&1 |
    grep -E 'round|idle connections'
