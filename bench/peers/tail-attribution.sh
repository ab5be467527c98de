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
# The server must listen on 127.0.0.1:18555 and answer GET /. Its whole process group is killed at
# the end. Output in OUT (default bench/results/tmp/tail/NAME).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ $# -lt 4 ] || [ "$3" != "--" ]; then
  sed -n '2,16p' "$0" >&2
  exit 2
fi
name=$1 rate=$2
shift 3
out=${OUT:-bench/results/tmp/tail}/$name
mkdir -p "$out"
loadgen=bench/peers/loadgen/target/release/peers-loadgen
[ -x "$loadgen" ] || (cd bench/peers/loadgen && cargo build --release --quiet)
command -v perf >/dev/null || { echo "needs perf (apt-get install linux-perf)" >&2; exit 2; }
setsid taskset -c 0 "$@" > "$out/server.log" 2>&1 &
server=$!
trap 'kill -TERM -- -$server 2>/dev/null; sleep 1; kill -KILL -- -$server 2>/dev/null || true' EXIT
up=
for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:18555/ && up=1 && break; sleep 0.1; done
[ -n "$up" ] || { echo "the server did not answer on 127.0.0.1:18555 in 10 s (log: $out/server.log)" >&2; exit 1; }
timeout 120 perf record -q -m 1024 -k CLOCK_MONOTONIC -C 0 -e sched:sched_switch -o "$out/perf.data" -- \
  taskset -c 1 "$loadgen" open --addr 127.0.0.1:18555 --rate "$rate" --conns 32 --seconds 8 \
  --warmup 1 --slow-log "$out/slow.txt" --slow-us "${SLOW_US:-1000}" > "$out/loadgen.json"
perf script -i "$out/perf.data" -F comm,pid,tid,cpu,time,event,trace 2> "$out/perf-script.err" > "$out/perf.txt"
# Lost events leave gaps the attribution would credit to the task before them: say so.
if grep -qi lost "$out/perf-script.err"; then
  echo "warning: perf lost events (see $out/perf-script.err): shares may be wrong" >&2
fi
python3 bench/peers/tail_attribution.py "$out" "$name"
