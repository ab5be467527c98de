#!/usr/bin/env bash
# What a running profile costs: one release `tine` (1 worker, `hello`), rounds of a 5 s
# `wrk -t1 -c64` with no profile and one while `tine ctl profile 0` samples the worker (99 Hz), in
# alternating order. Prints req/s and server CPU per request (user+system of the whole tree,
# /proc/PID/stat) for each, the on/off ratio of CPU per request within each round, then medians
# and ranges. What an idle profiler costs (none running) is an A/B of builds instead:
# bench/http/ab.sh 1 ROUNDS OLD_BIN NEW_BIN.
#
#   bench/profile/overhead.sh [ROUNDS]       # default 6; builds target/release/tine if missing
#   BIN=/path/to/tine bench/profile/overhead.sh 2
#
# Every process started is killed on exit; every load is bounded by wrk -d and `timeout`.
set -u
cd "$(dirname "$0")/../.."
ROUNDS=${1:-6}
. bench/lib.sh
bench_need wrk curl
BIN=$(bench_release_tine) || exit 1
bench_work_dir tine-overhead
WORK=$BENCH_WORK
PORT=${PORT:-19182}
bench_machine
bench_serve_tine "$BIN" "$WORK" "$PORT" --workers 1 --profile-dir "$WORK" || exit 1
server=$BENCH_PID
# One measured run: prints "REQ_PER_S US_PER_REQ".
measure() {
    local c0 c1 out n rps
    c0=$(bench_tree_ticks "$server")
    out=$(timeout 15 wrk -t1 -c64 -d5s "http://127.0.0.1:$PORT/")
    c1=$(bench_tree_ticks "$server")
    n=$(awk '/requests in/{print $1}' <<<"$out")
    rps=$(awk '/Requests\/sec/{printf "%d", $2}' <<<"$out")
    awk -v a="$c0" -v b="$c1" -v n="$n" -v t="$BENCH_TICK_US" -v r="$rps" 'BEGIN{printf "%d %.2f\n", r, (b-a)*t/n}'
}
timeout 5 wrk -t1 -c64 -d2s "http://127.0.0.1:$PORT/" >/dev/null # warm-up
# One run with a profile sampling the worker: prints "REQ_PER_S US_PER_REQ".
profiled() {
    "$BIN" ctl --control-socket "$WORK/ctl.sock" profile 0 --seconds 7 >"$WORK/svg" 2>&1 &
    local ctl=$! out
    sleep 0.5 # the profile has started (the monitor relays it at once)
    out=$(measure)
    wait "$ctl"
    echo "$out"
}
off=()
on=()
ratios=()
for r in $(seq 1 "$ROUNDS"); do
    # Odd rounds measure without a profile first, even rounds with one first: drift in the
    # machine's load (the other users of a shared machine) then weighs on both sides alike.
    if ((r % 2)); then
        a=$(measure)
        b=$(profiled)
    else
        b=$(profiled)
        a=$(measure)
    fi
    ratio=$(awk -v a="${a#* }" -v b="${b#* }" 'BEGIN{printf "%+.1f", (b/a-1)*100}')
    echo "round $r: off ${a% *} req/s ${a#* } µs/req | on ${b% *} req/s ${b#* } µs/req | CPU/req on vs off ${ratio}% ($(cat "$WORK/svg"))"
    off+=("$a")
    on+=("$b")
    ratios+=("$ratio")
done
median() { sort -g | awk '{v[NR]=$1} END{print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }
range() { sort -g | awk 'NR==1{lo=$1} {hi=$1} END{print lo "-" hi}'; }
for mode in off on; do
    declare -n runs=$mode
    rps=$(printf '%s\n' "${runs[@]}" | awk '{print $1}' | median)
    us=$(printf '%s\n' "${runs[@]}" | awk '{print $2}' | median)
    rps_range=$(printf '%s\n' "${runs[@]}" | awk '{print $1}' | range)
    us_range=$(printf '%s\n' "${runs[@]}" | awk '{print $2}' | range)
    echo "profiling $mode: median $rps req/s (range $rps_range), median $us µs CPU/req (range $us_range)"
done
echo "CPU per request, on vs off, paired by round: median $(printf '%s\n' "${ratios[@]}" | median)% (range $(printf '%s\n' "${ratios[@]}" | range)%)"
