#!/usr/bin/env bash
# A/B of server builds on the hello benchmark: CPU per request, for profiling work (not a result).
#
#   bench/http/ab.sh WORKERS ROUNDS BIN...
#   bench/http/ab.sh 1 4 /tmp/tine-before target/release/tine bench/hyper-hello/target/release/hyper-hello
#
# Starts every BIN at once on loopback (tine builds as `serve --workers WORKERS`, a path containing
# `hyper-hello` as `hyper-hello ADDR WORKERS`), then for ROUNDS rounds runs, for each in turn, a
# 1 s warm-up and a 5 s `wrk -t1 -c64`, and prints req/s, CPU per request of the server's whole
# process tree (user+system, from /proc/PID/stat) and the user part alone. With WORKERS=1 every
# connection sits on the one worker, which takes the connection spread (see http-findings.md) out of
# the comparison; differences under about 0.1 µs per request are noise on this machine.
# PIN=1: every server's whole tree on CPU 0 (`taskset -c 0`) and wrk on CPU 1, as the peer suite's
# pinned phase; CONNS: wrk's connections (default 64).
# Every process started is killed on exit; every load is bounded by wrk -d and `timeout`.
set -u
if (($# < 3)); then
    sed -n '2,15p' "$0" >&2
    exit 2
fi
WORKERS=$1
ROUNDS=$2
shift 2
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
bench_need wrk curl
bench_work_dir tine-ab
WORK=$BENCH_WORK
CONNS=${CONNS:-64}
bench_pin
pids=()
ports=()

i=0
for bin in "$@"; do
    bin="$(realpath "$bin")"
    port=$((19100 + i))
    dir="$WORK/$i"
    bench_start_hello "$bin" "$dir" "$port" "$WORKERS" || exit 1
    pids+=("$BENCH_PID")
    ports+=("$port")
    i=$((i + 1))
done
bench_machine

for r in $(seq 1 "$ROUNDS"); do
    line="round $r:"
    for i in "${!pids[@]}"; do
        port=${ports[$i]}
        pid=${pids[$i]}
        timeout 5 "${BENCH_LOAD_PIN[@]}" wrk -t1 "-c$CONNS" -d1s "http://127.0.0.1:$port/" >/dev/null
        c0=$(bench_tree_ticks "$pid")
        u0=$(bench_tree_ticks "$pid" 14)
        out=$(timeout 15 "${BENCH_LOAD_PIN[@]}" wrk -t1 "-c$CONNS" -d5s "http://127.0.0.1:$port/")
        c1=$(bench_tree_ticks "$pid")
        u1=$(bench_tree_ticks "$pid" 14)
        n=$(awk '/requests in/{print $1}' <<<"$out")
        rps=$(awk '/Requests\/sec/{printf "%d", $2}' <<<"$out")
        per=$(awk -v a="$c0" -v b="$c1" -v n="$n" -v t="$BENCH_TICK_US" 'BEGIN{printf "%.2f", (b-a)*t/n}')
        user=$(awk -v a="$u0" -v b="$u1" -v n="$n" -v t="$BENCH_TICK_US" 'BEGIN{printf "%.2f", (b-a)*t/n}')
        line="$line  [$i] $rps req/s, $per µs/req (user $user)"
    done
    echo "$line"
done
