#!/usr/bin/env bash
# Heap allocations per request of server builds on the hello benchmark (a profiling aid, not a
# result): counts every call of libc's malloc, calloc and realloc in the server's whole process
# tree (uprobes, `perf stat`) during a `wrk -t1 -c16` run, divided by the requests answered.
# Unlike req/s and CPU time, the count does not depend on what else the machine runs: it is the
# steadiest comparison of per-request work on a busy machine.
#
#   bench/http/allocs.sh SECONDS BIN...
#   bench/http/allocs.sh 3 target/release/tine bench/hyper-hello/target/release/hyper-hello
#
# tine builds run as `serve --workers 1 --spare-workers 0`, a path containing `hyper-hello` as
# `hyper-hello ADDR 1`. Needs root (uprobes) and `perf` (Debian: linux-perf). The probes are added
# for the run and deleted on exit; every process started is killed on exit; loads are bounded.
set -u
if (($# < 2)); then
    sed -n '2,13p' "$0" >&2
    exit 2
fi
SECONDS_EACH=$1
shift
LIBC=$(ldconfig -p | awk '/libc\.so\.6 .*x86-64/{print $NF; exit}')
[[ -n $LIBC ]] || { echo "libc.so.6 not found" >&2; exit 1; }
command -v perf >/dev/null || { echo "needs perf (apt-get install -y linux-perf)" >&2; exit 1; }
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
bench_need wrk curl
WORK="$(mktemp -d /tmp/tine-allocs.XXXXXX)"
added=()
cleanup() {
    bench_stop_started
    for e in "${added[@]}"; do
        perf probe -q -d "$e" 2>/dev/null
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

bench_machine
events=()
for f in malloc calloc realloc; do
    ev="probe_libc:tine_allocs_$f"
    perf probe -q -x "$LIBC" -a "tine_allocs_$f=$f" || { echo "cannot add a uprobe on $f" >&2; exit 1; }
    added+=("$ev")
    events+=(-e "$ev")
done

i=0
for bin in "$@"; do
    bin="$(realpath "$bin")"
    port=$((19300 + i))
    dir="$WORK/$i"
    if [[ $bin == *hyper-hello* ]]; then
        bench_start "$dir" "$bin" "127.0.0.1:$port" 1
        bench_wait_http "$port" || exit 1
    else
        bench_serve_tine "$bin" "$dir" "$port" --workers 1 --spare-workers 0 || exit 1
    fi
    pid=$BENCH_PID
    timeout 5 wrk -t1 -c16 -d1s "http://127.0.0.1:$port/" >/dev/null
    list=$(bench_tree "$pid" | paste -sd,)
    timeout $((SECONDS_EACH + 20)) perf stat -x, "${events[@]}" -p "$list" -o "$dir/stat" -- \
        wrk -t1 -c16 -d"${SECONDS_EACH}s" "http://127.0.0.1:$port/" >"$dir/wrk"
    n=$(awk '/requests in/{print $1}' "$dir/wrk")
    calls=$(awk -F, '/tine_allocs_/{s += $1} END{print s + 0}' "$dir/stat")
    awk -v b="$bin" -v c="$calls" -v n="$n" \
        'BEGIN{printf "%s: %d requests, %d allocations, %.2f per request\n", b, n, c, c / n}'
    i=$((i + 1))
done
