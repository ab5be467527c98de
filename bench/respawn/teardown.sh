#!/usr/bin/env bash
# The kernel's part of kill -9 -> replacement: how long a killed worker takes to die (its threads
# exiting, its address space unmapped, its connections reset), for tine and for nginx, from kernel
# tracepoints recorded while examples/respawn_bench kills the worker (see teardown.py).
# Needs root (perf record -a with tracepoints). Prints the tables; raw text stays in $OUT.
#
#   bench/respawn/teardown.sh                    # 20 kills each
#   ROUNDS=10 SKIP_BUILD=1 TINE_BIN=... DRIVER=... bench/respawn/teardown.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${ROUNDS:-20}
out=${OUT:-$(mktemp -d /tmp/respawn-teardown.XXXXXX)}
if [ -z "${SKIP_BUILD:-}" ]; then
  cargo build --release --quiet --bin tine --example respawn_bench
fi
driver=${DRIVER:-target/release/examples/respawn_bench}
tine=${TINE_BIN:-target/release/tine}
command -v perf >/dev/null || { echo "teardown.sh needs perf" >&2; exit 2; }
events=(-e signal:signal_generate -e sched:sched_process_exit -e mmap:exit_mmap
        -e tcp:tcp_send_reset -e sched:sched_switch)
for server in tine nginx; do
  perf record -q -o "$out/$server.data" -a "${events[@]}" -- \
    "$driver" --server "$server" --spares 1 --rounds "$rounds" --tine "$tine" > "$out/$server.jsonl"
  perf script -i "$out/$server.data" -F comm,tid,pid,cpu,time,event,trace > "$out/$server.txt" 2>/dev/null
  rm -f "$out/$server.data"
  echo "== $server (kill -> ..., from kernel tracepoints)"
  python3 bench/respawn/teardown.py "$out/$server.txt" "$(basename "$driver" | cut -c1-15)"
done
echo "raw: $out" >&2
