#!/usr/bin/env bash
# Interleaved A/B of two tine binaries (with a spare) and nginx on both respawn measures (see
# examples/respawn_bench.rs): BLOCKS blocks of ROUNDS kills per variant, alternately measured
# with a new connection and by the kept-alive clients. Raw lines in OUT (default
# bench/results/tmp/respawn-ab.jsonl), then one summary line per variant.
#
#   bench/respawn/ab.sh OLD_TINE NEW_TINE [DRIVER]     # e.g. binaries copied aside
#   ENV_A='TINE_RESPAWN_AB=...' ...                    # environment for A's runs, if any
#   PIN=0:1 ...      # servers on CPU 0 (taskset), the driver and its clients on CPU 1: the
#                    # server's replacement apart from the clients' own wake-ups (shared: unset)
set -euo pipefail
cd "$(dirname "$0")/../.."
a=$1 b=$2 driver=${3:-target/release/examples/respawn_bench}
rounds=${ROUNDS:-20} blocks=${BLOCKS:-3}
pin=() driver_args=()
if [ -n "${PIN:-}" ]; then
  [[ $PIN =~ ^[0-9,-]+:[0-9,-]+$ ]] || { echo "PIN=SERVER_CPUS:DRIVER_CPUS (e.g. 0:1), not $PIN" >&2; exit 2; }
  pin=(taskset -c "${PIN#*:}")
  driver_args=(--server-cpus "${PIN%%:*}")
fi
out=${OUT:-bench/results/tmp/respawn-ab.jsonl}
mkdir -p "$(dirname "$out")"
: > "$out"
for block in $(seq "$blocks"); do
  for variant in A B nginx; do
    echo "block $block: $variant" >&2
    case $variant in
      A) env ${ENV_A:-} "${pin[@]}" "$driver" "${driver_args[@]}" --server tine --spares 1 --rounds "$rounds" --tine "$a" | sed 's/^{/{"variant":"A",/' >> "$out" ;;
      B) env ${ENV_B:-} "${pin[@]}" "$driver" "${driver_args[@]}" --server tine --spares 1 --rounds "$rounds" --tine "$b" | sed 's/^{/{"variant":"B",/' >> "$out" ;;
      nginx) "${pin[@]}" "$driver" "${driver_args[@]}" --server nginx --rounds "$rounds" | sed 's/^{/{"variant":"nginx",/' >> "$out" ;;
    esac
  done
done
python3 - "$out" <<'PY'
import json, sys
def q(xs, p):
    xs = sorted(xs); return xs[round((len(xs) - 1) * p)] if xs else float("nan")
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
for v in ("A", "B", "nginx"):
    rs = [r for r in runs if r["variant"] == v]
    for label, key in (("new connection", "probe_samples_us"), ("kept-alive", "samples_us")):
        s = [x for r in rs for x in r[key]]
        print(f"{v:6} {label:15} n={len(s):3} median {q(s,.5):6.0f} p10 {q(s,.1):6.0f} p90 {q(s,.9):6.0f} µs"
              f"  block medians {[round(q(r[key], .5)) for r in rs]}")
PY
