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
# Every process started is killed on exit; every load is bounded by wrk -d and `timeout`.
set -u
if (($# < 3)); then
    sed -n '2,12p' "$0" >&2
    exit 2
fi
WORKERS=$1
ROUNDS=$2
shift 2
TICK_US=$((1000000 / $(getconf CLK_TCK)))
WORK="$(mktemp -d /tmp/tine-ab.XXXXXX)"
pids=()
ports=()
cleanup() {
    for p in "${pids[@]}"; do
        pkill -KILL -P "$p" 2>/dev/null
        kill -KILL "$p" 2>/dev/null
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

i=0
for bin in "$@"; do
    bin="$(realpath "$bin")"
    port=$((19100 + i))
    dir="$WORK/$i"
    mkdir -p "$dir"
    if [[ $bin == *hyper-hello* ]]; then
        (cd "$dir" && exec "$bin" "127.0.0.1:$port" "$WORKERS" >log 2>&1) &
    else
        (cd "$dir" && exec "$bin" serve --workers "$WORKERS" --listen "127.0.0.1:$port" \
            --control-socket "$dir/ctl.sock" >log 2>&1) &
    fi
    pids+=($!)
    ports+=("$port")
    i=$((i + 1))
done
for port in "${ports[@]}"; do
    for _ in $(seq 1 100); do
        curl -s -o /dev/null "127.0.0.1:$port/" && break
        sleep 0.1
    done
done

# CPU ticks of a process and its children and grandchildren; $2 = 14 for user time only.
tree_ticks() {
    local total=0 p t
    for p in $1 $(pgrep -P "$1") $(for c in $(pgrep -P "$1"); do pgrep -P "$c"; done); do
        t=$(awk -v f="${2:-0}" '{print f ? $f : $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)
        total=$((total + t))
    done
    echo "$total"
}

for r in $(seq 1 "$ROUNDS"); do
    line="round $r:"
    for i in "${!pids[@]}"; do
        port=${ports[$i]}
        pid=${pids[$i]}
        timeout 5 wrk -t1 -c64 -d1s "http://127.0.0.1:$port/" >/dev/null
        c0=$(tree_ticks "$pid")
        u0=$(tree_ticks "$pid" 14)
        out=$(timeout 15 wrk -t1 -c64 -d5s "http://127.0.0.1:$port/")
        c1=$(tree_ticks "$pid")
        u1=$(tree_ticks "$pid" 14)
        n=$(awk '/requests in/{print $1}' <<<"$out")
        rps=$(awk '/Requests\/sec/{printf "%d", $2}' <<<"$out")
        per=$(awk -v a="$c0" -v b="$c1" -v n="$n" -v t="$TICK_US" 'BEGIN{printf "%.2f", (b-a)*t/n}')
        user=$(awk -v a="$u0" -v b="$u1" -v n="$n" -v t="$TICK_US" 'BEGIN{printf "%.2f", (b-a)*t/n}')
        line="$line  [$i] $rps req/s, $per µs/req (user $user)"
    done
    echo "$line"
done
