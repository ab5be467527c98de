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
BIN=$(realpath "${BIN:-target/release/tine}")
[[ -x $BIN ]] || cargo build --release
for tool in wrk curl; do
    command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install -y $tool)" >&2; exit 1; }
done
WORK=$(mktemp -d /tmp/tine-flame.XXXXXX)
PORT=${PORT:-19181}
(cd "$WORK" && exec "$BIN" serve --workers 1 --listen "127.0.0.1:$PORT" \
    --control-socket "$WORK/ctl.sock" --profile-dir "$WORK" >"$WORK/log" 2>&1) &
server=$!
cleanup() {
    pkill -KILL -P "$server" 2>/dev/null || true
    kill -KILL "$server" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
for _ in $(seq 1 100); do
    curl -s -o /dev/null "127.0.0.1:$PORT/" && break
    sleep 0.1
done
timeout 30 wrk -t1 -c64 -d12s "http://127.0.0.1:$PORT/" >"$WORK/wrk.txt" &
load=$!
sleep 1 # the load is flowing
svg=$("$BIN" ctl --control-socket "$WORK/ctl.sock" profile 0 --seconds 10)
wait "$load"
cp "$svg" bench/results/flamegraph-hello.svg
# The folded stacks (a MiB of long generic names) are not kept; their count is.
echo "bench/results/flamegraph-hello.svg: $(grep -c '' "${svg%.svg}.folded") distinct stacks"
grep 'Requests/sec' "$WORK/wrk.txt"
