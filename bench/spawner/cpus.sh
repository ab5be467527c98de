#!/usr/bin/env bash
# Where the round trip's time goes on this machine: the spawner benchmark run unpinned (the
# scheduler places caller and worker) and pinned to one CPU (`taskset -c 0`), with the spin on
# the answer / next job at its default (50 µs) and off (TINE_SPAWNER_SPIN_US=0), beside Python's
# ProcessPoolExecutor unpinned and pinned. The bench also forces caller and worker onto different
# CPUs (`*_cross`). Interleaved rounds; medians go to bench/results/spawner-cpus.md, raw lines to
# bench/results/spawner-cpus.jsonl.
# Usage: bench/spawner/cpus.sh [ROUNDS] [N]   (defaults 3 rounds, 10000 round trips)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${1:-3}
N=${2:-10000}
PY_N=$((N / 4))
. bench/lib.sh
BIN=$(bench_release_example spawner_bench) || exit 1
RAW=bench/results/spawner-cpus.jsonl
: > "$RAW"
tag() { sed "s/^{/{\"round\":$1,\"load\":$(cut -d' ' -f1 /proc/loadavg),\"placement\":\"$2\",\"spin\":\"$3\",/"; }
for r in $(seq "$ROUNDS"); do
  for spin in 50 0; do
    TINE_SPAWNER_SPIN_US=$spin timeout 300 "$BIN" "$N" | tag "$r" unpinned "$spin" >> "$RAW"
    TINE_SPAWNER_SPIN_US=$spin timeout 300 taskset -c 0 "$BIN" "$N" | tag "$r" pinned "$spin" >> "$RAW"
  done
  timeout 600 python3 bench/spawner/peers.py "$PY_N" | tag "$r" unpinned - >> "$RAW"
  timeout 600 taskset -c 0 python3 bench/spawner/peers.py "$PY_N" | tag "$r" pinned - >> "$RAW"
done
python3 - "$RAW" "bench/spawner/cpus.sh $ROUNDS $N" > bench/results/spawner-cpus.md <<'PY'
import json, platform, statistics, subprocess, sys
from collections import defaultdict
raw, command = sys.argv[1], sys.argv[2]
vals = defaultdict(list)
loads = set()
for line in open(raw):
    d = json.loads(line)
    loads.add(d["load"])
    for k in ("p50_us", "p99_us", "jobs_per_s"):
        if k in d:
            vals[(d["name"], d["placement"], d["spin"], k)].append(d[k])
def cell(name, placement, spin, k="p50_us"):
    v = vals.get((name, placement, spin, k)) or vals.get((name, placement, "-", k))
    if not v:
        return "–"
    m = statistics.median(v)
    return f"{m:,.0f}" if k == "jobs_per_s" else f"{m:.1f}"
sh = lambda c: subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()
print("# Spawner round trips: unpinned, pinned, across CPUs\n")
print(f"- command: `{command}`")
print(f"- machine: {sh('nproc')} CPUs, kernel {platform.release()}, {sh('rustc --version')}, {sh('python3 --version')}")
print(f"- medians over rounds; 1-min load average at the runs: {', '.join(str(l) for l in sorted(loads))}")
print("- unpinned: the scheduler places caller and worker (on a quiet machine it keeps them on one CPU;")
print("  under load they often land on different CPUs); pinned: `taskset -c 0`, everything on one CPU;")
print("  `cross`: the bench pins the caller to CPU 0 and the worker to CPU 1 (every message wakes the other CPU).")
print("- spin: how long a `run_blocking` caller spins on its answer and a worker on its next job before sleeping")
print("  (default 50 µs; `TINE_SPAWNER_SPIN_US=0` turns it off). Python has no such setting: its figure is repeated.\n")
cols = [("unpinned", "50"), ("unpinned", "0"), ("pinned", "50"), ("pinned", "0")]
for title, key, rows in [
    ("Round trip of a trivial job, p50 µs", "p50_us", [
        ("floor", "floor: bare SOCK_SEQPACKET ping-pong"),
        ("floor_cross", "floor across CPUs"),
        ("run_blocking", "tine `run_blocking`"),
        ("run_blocking_cross", "tine `run_blocking` across CPUs"),
        ("run_await_mt", "tine `run().await`, multi-thread runtime"),
        ("run_await_ct", "tine `run().await`, current-thread runtime"),
        ("python_fork_latency", "ProcessPoolExecutor (fork)"),
        ("python_forkserver_latency", "ProcessPoolExecutor (forkserver)"),
    ]),
    ("Round trip of a trivial job, p99 µs", "p99_us", [
        ("run_blocking", "tine `run_blocking`"),
        ("run_blocking_cross", "tine `run_blocking` across CPUs"),
        ("run_await_mt", "tine `run().await`, multi-thread runtime"),
        ("python_fork_latency", "ProcessPoolExecutor (fork)"),
    ]),
    ("Throughput with 2 workers, jobs/s", "jobs_per_s", [
        ("throughput_blocking_2threads", "tine, 2 threads calling `run_blocking`"),
        ("throughput_await_16tasks", "tine, 16 tokio tasks awaiting `run`"),
        ("python_fork_throughput", "ProcessPoolExecutor (fork)"),
        ("python_forkserver_throughput", "ProcessPoolExecutor (forkserver)"),
    ]),
]:
    print(f"## {title}\n")
    print("| what | " + " | ".join(f"{p}, spin {s}" for p, s in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name, label in rows:
        print(f"| {label} | " + " | ".join(cell(name, p, s, key) for p, s in cols) + " |")
    print()
PY
cat bench/results/spawner-cpus.md
