#!/usr/bin/env bash
# Makes bench/results/flamegraph-hello.svg, the README's picture: a release `tine`
# serving `hello` with one worker under `wrk -t1 -c64`, profiled with `tine ctl profile 0`.
#
#   bench/profile/flamegraph.sh              # builds target/release/tine if missing
#   BIN=/path/to/tine bench/profile/flamegraph.sh
#
# Every process started is killed on exit; the load is bounded by wrk -d and `timeout`.
set -eu
cd "$(dirname "$0")/../.."
. bench/lib.sh
bench_need wrk curl
BIN=$(bench_release_tine) || exit 1
bench_work_dir tine-flame
WORK=$BENCH_WORK
PORT=${PORT:-19181}
bench_machine
bench_serve_tine "$BIN" "$WORK" "$PORT" --workers 1 --profile-dir "$WORK"
timeout 30 wrk -t1 -c64 -d12s "http://127.0.0.1:$PORT/" >"$WORK/wrk.txt" &
load=$!
sleep 1 # the load is flowing
svg=$("$BIN" ctl --control-socket "$WORK/ctl.sock" profile 0 --seconds 10)
wait "$load"
cp "$svg" bench/results/flamegraph-hello.svg
# The folded stacks (a MiB of long generic names) are not kept; their count is.
echo "bench/results/flamegraph-hello.svg: $(grep -c '' "${svg%.svg}.folded") distinct stacks"
grep 'Requests/sec' "$WORK/wrk.txt"
