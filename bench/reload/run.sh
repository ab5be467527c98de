#!/usr/bin/env bash
# tine's reload benchmark: builds release binaries, then runs bench/reload/driver, which writes
# bench/results/reload.md (report) and bench/results/reload.json (raw rounds).
#
#   bench/reload/run.sh                 # ~2 minutes
#   bench/reload/run.sh --quick         # 2 rounds, preload 0 only; writes to bench/results/tmp/
#   bench/reload/run.sh --rounds 20 --rate 2000 --preload-ms 0,500   # any driver option
set -euo pipefail
cd "$(dirname "$0")/../.."
out=bench/results
args=()
if [ "${1:-}" = "--quick" ]; then
  shift
  out=bench/results/tmp
  args=(--rounds 2 --preload-ms 0)
fi
mkdir -p "$out"
cargo build --release --quiet --example watch_demo
CARGO_TARGET_DIR=target/bench-reload cargo build --release --quiet --manifest-path bench/reload/driver/Cargo.toml
exec target/bench-reload/release/reload-bench --exe target/release/examples/watch_demo --repo . \
  --out "$out/reload.md" --json "$out/reload.json" "${args[@]}" "$@"
