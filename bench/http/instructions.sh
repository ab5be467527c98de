#!/usr/bin/env bash
# User-space instructions per request of server builds on the hello benchmark, counted by
# valgrind's callgrind in the serving process (a profiling aid, not a result). Unlike CPU time, the
# count does not depend on what else the machine runs, and it needs no hardware counters (this
# VM exposes none to `perf stat`): the same binary gave 8,385 instructions per request in two
# runs at load 16 and 25.
#
#   bench/http/instructions.sh BIN...
#   bench/http/instructions.sh /tmp/tine-before target/release/tine bench/hyper-hello/target/release/hyper-hello
#
# Each BIN runs under callgrind twice, with `wrk -t1 -c16` for SHORT (default 2) and then LONG
# (default 6) seconds, and stops gracefully (SIGTERM) so that every process writes its counts; the
# instructions per request are the serving process's difference between the two runs divided by
# the difference in requests answered, so start-up and shutdown cancel out. tine builds run as
# `serve --workers 1 --spare-workers 0` (the serving process is the worker); a path containing
# `hyper-hello` as `hyper-hello ADDR 1`. The callgrind files stay in OUT (default a new directory
# under /tmp) for `callgrind_annotate`. Needs valgrind and wrk (Debian: valgrind, wrk). Every
# process started is killed on exit; every load is bounded by wrk -d and `timeout`.
set -u
if (($# < 1)); then
    sed -n '2,18p' "$0" >&2
    exit 2
fi
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
bench_need valgrind wrk curl
SHORT=${SHORT:-2}
LONG=${LONG:-6}
OUT=${OUT:-$(mktemp -d /tmp/tine-instructions.XXXXXX)}
trap bench_stop_started EXIT

# run BIN DIR PORT SECS: BIN under callgrind in DIR, SECS seconds of load, a graceful stop; prints
# "REQUESTS INSTRUCTIONS" of the process that counted the most (the one that served).
run() {
    local bin=$1 dir=$2 port=$3 secs=$4
    # Runs in a subshell of its own (`< <(run ..)`): it kills what it started when it exits.
    trap bench_stop_started EXIT
    # --trace-children: tine's monitor starts its mold and workers by exec (tine again).
    if [[ $bin == *hyper-hello* ]]; then
        bench_start "$dir" valgrind --tool=callgrind "$bin" "127.0.0.1:$port" 1
    else
        bench_start "$dir" valgrind --tool=callgrind --trace-children=yes "$bin" serve \
            --workers 1 --spare-workers 0 --listen "127.0.0.1:$port" --control-socket "$dir/ctl.sock"
    fi
    local root=$BENCH_PID
    # Slow under valgrind: up to 60 s to answer.
    for _ in $(seq 1 6); do bench_wait_http "$port" 2>/dev/null && break; done
    timeout $((secs + 30)) wrk -t1 -c16 -d"${secs}s" "http://127.0.0.1:$port/" >"$dir/wrk"
    kill -TERM "$root"
    for _ in $(seq 1 600); do
        kill -0 "$root" 2>/dev/null || break
        sleep 0.1
    done
    local n ir
    n=$(awk '/requests in/{print $1}' "$dir/wrk")
    ir=$(for f in "$dir"/callgrind.out.*; do
        awk '/^(summary|totals):/{print $2; exit}' "$f"
    done | sort -n | tail -1)
    echo "${n:-0} ${ir:-0}"
}

bench_machine
i=0
for bin in "$@"; do
    bin="$(realpath "$bin")"
    read -r n1 ir1 < <(run "$bin" "$OUT/$i-short" $((19400 + 2 * i)) "$SHORT")
    read -r n2 ir2 < <(run "$bin" "$OUT/$i-long" $((19401 + 2 * i)) "$LONG")
    awk -v b="$bin" -v n1="$n1" -v n2="$n2" -v i1="$ir1" -v i2="$ir2" 'BEGIN{
        if (n2 <= n1) { printf "%s: no more requests in the long run (%d vs %d)\n", b, n2, n1; exit }
        printf "%s: %.0f instructions per request (%d and %d requests)\n", b, (i2 - i1) / (n2 - n1), n1, n2 }'
    i=$((i + 1))
done
echo "callgrind files: $OUT"
