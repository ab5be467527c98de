#!/usr/bin/env bash
# Spawner benchmark: tine's pools vs Python's ProcessPoolExecutor (fork, forkserver) vs the floor
# (a bare SOCK_SEQPACKET ping-pong), and a one-shot job vs bare fork+exit+waitpid.
# Interleaved rounds (Rust bench, then Python, ROUNDS times); medians of the per-round figures go to
# bench/results/spawner.md, raw lines to bench/results/spawner.jsonl.
# Usage: bench/spawner/run.sh [ROUNDS] [N]   (defaults 5 rounds, 20000 round trips per measurement)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${1:-5}
N=${2:-20000}
PY_N=$((N / 4))
. bench/lib.sh
BIN=$(bench_release_example spawner_bench) || exit 1
mkdir -p bench/results
RAW=bench/results/spawner.jsonl
: > "$RAW"
# The machine is shared: wait (bounded) for it to be quiet, and record the load of every round.
wait_quiet() {
  for _ in $(seq ${QUIET_TRIES:-60}); do
    awk '{exit !($1 < 0.7)}' /proc/loadavg && return
    sleep 2
  done
}
for r in $(seq "$ROUNDS"); do
  wait_quiet
  load=$(cut -d' ' -f1 /proc/loadavg)
  timeout 300 "$BIN" "$N" | sed "s/^{/{\"round\":$r,\"load\":$load,/" >> "$RAW"
  timeout 600 python3 bench/spawner/peers.py "$PY_N" | sed "s/^{/{\"round\":$r,\"load\":$load,/" >> "$RAW"
done
python3 bench/spawner/report.py "$RAW" "bench/spawner/run.sh $ROUNDS $N" > bench/results/spawner.md
cat bench/results/spawner.md
