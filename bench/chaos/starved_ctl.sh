#!/usr/bin/env bash
# How long `tine ctl status` takes while the CPUs are saturated, with the monitor at the tree's
# priority (monitor_nice_boost = 0) and boosted (the default, 5): BUSY busy-loop processes at nice
# 0 (default 4 per CPU) compete with the tree for SECONDS each round; the `ctl` client runs at nice
# -10 so that only the monitor's priority differs between rounds (it needs root, as the boost does).
# Bounded: every busy loop ends by itself (timeout) and the server is stopped after each round.
#
#   bench/chaos/starved_ctl.sh            # 2 rounds, 300 calls each
set -euo pipefail
cd "$(dirname "$0")/../.."
calls=${CALLS:-300}
busy=${BUSY:-$(( $(nproc) * 4 ))}
seconds=${SECONDS_PER_ROUND:-40}
cargo build -q --bin tine
tine=target/debug/tine
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for boost in 0 5; do
    sock=$dir/ctl-$boost.sock
    timeout $((seconds + 20)) "$tine" serve --listen 127.0.0.1:0 --workers 2 --control-socket "$sock" \
        --monitor-nice-boost "$boost" 2>"$dir/log-$boost" &
    server=$!
    for _ in $(seq 100); do [ -S "$sock" ] && "$tine" ctl --control-socket "$sock" status >/dev/null 2>&1 && break; sleep 0.1; done
    loops=()
    for _ in $(seq "$busy"); do timeout "$seconds" sh -c 'while :; do :; done' & loops+=($!); done
    sleep 2
    monitor=$("$tine" ctl --control-socket "$sock" status | awk '$1 == "monitor" { print $3 }')
    read -r _ wait0 runs0 <"/proc/$monitor/schedstat"
    : >"$dir/lat-$boost"
    for _ in $(seq "$calls"); do
        t0=$(date +%s%N)
        nice -n -10 "$tine" ctl --control-socket "$sock" status >/dev/null || echo "ctl failed" >&2
        echo $(( ($(date +%s%N) - t0) / 1000 )) >>"$dir/lat-$boost"
    done
    read -r _ wait1 runs1 <"/proc/$monitor/schedstat"
    kill "${loops[@]}" 2>/dev/null || true
    wait "${loops[@]}" 2>/dev/null || true
    "$tine" ctl --control-socket "$sock" stop >/dev/null || true
    wait "$server" || true
    # The monitor's own wait for a CPU (schedstat: time runnable but not running, and times run),
    # whatever the client's: the part of the latency the boost is about.
    sort -n "$dir/lat-$boost" | awk -v boost="$boost" -v busy="$busy" \
        -v wait=$(( (wait1 - wait0) / 1000 )) -v runs=$(( runs1 - runs0 )) '{ v[NR] = $1 } END {
        printf "monitor_nice_boost %s, %d busy loops: %d ctl status calls: p50 %.1f ms, p90 %.1f ms, p99 %.1f ms, max %.1f ms; the monitor waited for a CPU %.0f ms over %d runs (%.2f ms per run)\n",
            boost, busy, NR, v[int(NR*0.5)]/1000, v[int(NR*0.9)]/1000, v[int(NR*0.99)]/1000, v[NR]/1000,
            wait/1000, runs, (runs ? wait/1000/runs : 0) }'
done
