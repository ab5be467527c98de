#!/usr/bin/env bash
# What a running profile costs: one release `tine` (1 worker, `hello`), rounds alternating a 5 s
# `wrk -t1 -c64` with no profile and one while `tine ctl profile 0` samples the worker (99 Hz).
# Prints req/s and server CPU per request (user+system of the whole tree, /proc/PID/stat) for each,
# then the medians. What an idle profiler costs (none running) is an A/B of builds instead:
# bench/http/ab.sh 1 ROUNDS OLD_BIN NEW_BIN.
#
#   bench/profile/overhead.sh [ROUNDS]       # default 6; BIN=... to pick the binary
#
# Every process started is killed on exit; every load is bounded by wrk -d and `timeout`.
set -u
cd "$(dirname "$0")/../.."
ROUNDS=${1:-6}
BIN=$(realpath "${BIN:-target/release/tine}")
[[ -x $BIN ]] || { echo "build it first: cargo build --release" >&2; exit 1; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))
WORK=$(mktemp -d /tmp/tine-overhead.XXXXXX)
PORT=${PORT:-19182}
(cd "$WORK" && exec "$BIN" serve --workers 1 --listen "127.0.0.1:$PORT" \
    --control-socket "$WORK/ctl.sock" --profile-dir "$WORK" >"$WORK/log" 2>&1) &
server=$!
cleanup() {
    pkill -KILL -P "$server" 2>/dev/null
    kill -KILL "$server" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
for _ in $(seq 1 100); do
    curl -s -o /dev/null "127.0.0.1:$PORT/" && break
    sleep 0.1
done
tree_ticks() {
    local total=0 p t
    for p in $1 $(pgrep -P "$1") $(for c in $(pgrep -P "$1"); do pgrep -P "$c"; done); do
        t=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)
        total=$((total + t))
    done
    echo "$total"
}
# One measured run: prints "REQ_PER_S US_PER_REQ".
measure() {
    local c0 c1 out n rps
    c0=$(tree_ticks "$server")
    out=$(timeout 15 wrk -t1 -c64 -d5s "http://127.0.0.1:$PORT/")
    c1=$(tree_ticks "$server")
    n=$(awk '/requests in/{print $1}' <<<"$out")
    rps=$(awk '/Requests\/sec/{printf "%d", $2}' <<<"$out")
    awk -v a="$c0" -v b="$c1" -v n="$n" -v t="$TICK_US" -v r="$rps" 'BEGIN{printf "%d %.2f\n", r, (b-a)*t/n}'
}
timeout 5 wrk -t1 -c64 -d2s "http://127.0.0.1:$PORT/" >/dev/null # warm-up
off=()
on=()
for r in $(seq 1 "$ROUNDS"); do
    a=$(measure)
    "$BIN" ctl --control-socket "$WORK/ctl.sock" profile 0 --seconds 7 >"$WORK/svg" 2>&1 &
    ctl=$!
    sleep 0.5 # the profile has started (the monitor relays it at once)
    b=$(measure)
    wait "$ctl"
    echo "round $r: off ${a% *} req/s ${a#* } µs/req | on ${b% *} req/s ${b#* } µs/req ($(cat "$WORK/svg"))"
    off+=("$a")
    on+=("$b")
done
median() { sort -n | awk '{v[NR]=$1} END{print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }
for mode in off on; do
    declare -n runs=$mode
    rps=$(printf '%s\n' "${runs[@]}" | awk '{print $1}' | median)
    us=$(printf '%s\n' "${runs[@]}" | awk '{print $2}' | median)
    lo=$(printf '%s\n' "${runs[@]}" | awk '{print $1}' | sort -n | head -1)
    hi=$(printf '%s\n' "${runs[@]}" | awk '{print $1}' | sort -n | tail -1)
    echo "profiling $mode: median $rps req/s (range $lo-$hi), median $us µs CPU/req"
done
