#!/usr/bin/env bash
# What ran on the server's CPU while requests were late: one server pinned to CPU 0, the
# open-loop client (peers-loadgen) on CPU 1 at RATE req/s for 8 s with --slow-log (every request
# slower than SLOW_US, default 1000, with its due time on CLOCK_MONOTONIC), and perf recording
# every context switch on CPU 0 (`perf record -k CLOCK_MONOTONIC -C 0 -e sched:sched_switch`).
# tail_attribution.py then merges the late requests' windows into stall episodes and sums, per
# task name, the time each task held CPU 0 inside them ("swapper/0": the CPU idle while requests
# were late, i.e. the delay was elsewhere: the client's CPU, the loopback path, or the VM not
# running this vCPU), beside the whole run's shares.
#
#   bench/peers/tail-attribution.sh NAME RATE -- SERVER COMMAND...     (root, perf; port 18555)
#   bench/peers/tail-attribution.sh tine 50000 -- target/release/tine serve --listen 127.0.0.1:18555 --workers 1 --app hello
#   bench/peers/tail-attribution.sh hyper 50000 -- bench/hyper-hello/target/release/hyper-hello 127.0.0.1:18555 1
#
# The server must listen on 127.0.0.1:18555 and answer GET /. It and its children are killed at
# the end (bench_stop_started). Output in OUT (default bench/results/tmp/tail/NAME).
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/lib.sh
if [ $# -lt 4 ] || [ "$3" != "--" ]; then
  sed -n '2,16p' "$0" >&2
  exit 2
fi
name=$1 rate=$2
shift 3
mkdir -p "${OUT:-bench/results/tmp/tail}"
out=$(realpath "${OUT:-bench/results/tmp/tail}")/$name
loadgen=bench/peers/loadgen/target/release/peers-loadgen
[ -x "$loadgen" ] || (cd bench/peers/loadgen && cargo build --release --quiet)
command -v perf >/dev/null || { echo "needs perf (apt-get install linux-perf)" >&2; exit 2; }
bench_need taskset curl
# bench_start runs the server in $out (its log: $out/log): a relative path to it must not break.
if [[ $1 == */* ]]; then set -- "$(realpath "$1")" "${@:2}"; fi
trap bench_stop_started EXIT
bench_start "$out" taskset -c 0 "$@"
bench_wait_http 18555
timeout 120 perf record -q -m 1024 -k CLOCK_MONOTONIC -C 0 -e sched:sched_switch -o "$out/perf.data" -- \
  taskset -c 1 "$loadgen" open --addr 127.0.0.1:18555 --rate "$rate" --conns 32 --seconds 8 \
  --warmup 1 --slow-log "$out/slow.txt" --slow-us "${SLOW_US:-1000}" > "$out/loadgen.json"
bench_perf_text "$out/perf.data" "$out/perf.txt"
python3 bench/peers/tail_attribution.py "$out" "$name"
