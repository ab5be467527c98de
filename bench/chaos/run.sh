#!/usr/bin/env bash
# The chaos test of the suite (tests/chaos.rs), run long: a seeded random schedule of kill -9
# (workers, mold), USR2, HUP, TTIN/TTOU, `ctl scale`, `ctl kill-worker` under 16 strict
# connections (POSTs never retried), for CHAOS_SECONDS (default 600), in the test profile the suite
# uses (RELEASE=1 for a release build: faster workers, more requests per event, a long LTO build).
# Writes the figures the test prints (events by kind, lost requests excused by a kill -9 or not,
# convergence time, monitor descriptors, zombies) with the machine and command to
# bench/results/chaos.md (OUT=path to write elsewhere).
#
#   bench/chaos/run.sh                      # 10 minutes, a fresh seed
#   CHAOS_SECONDS=60 CHAOS_SEED=42 bench/chaos/run.sh
#   LOG=/tmp/chaos.log OUT=/tmp/chaos.md bench/chaos/run.sh   # keep the full log, write elsewhere
set -euo pipefail
cd "$(dirname "$0")/../.."

seconds=${CHAOS_SECONDS:-600}
out=${OUT:-bench/results/chaos.md}
# LOG=path keeps the whole output of the test (the server's log included) there.
if [ -n "${LOG:-}" ]; then
    log=$LOG
else
    log=$(mktemp)
    trap 'rm -f "$log"' EXIT
fi

started=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
profile=()
if [ "${RELEASE:-0}" = 1 ]; then profile=(--release); fi
cmd="CHAOS_SECONDS=$seconds${CHAOS_SEED:+ CHAOS_SEED=$CHAOS_SEED}${CHAOS_EXAMPLE:+ CHAOS_EXAMPLE=$CHAOS_EXAMPLE}${CHAOS_PATH:+ CHAOS_PATH=$CHAOS_PATH} cargo test ${profile[*]:-}${profile[*]:+ }--test chaos -- --include-ignored --nocapture"
echo "running: $cmd" >&2
set +e
CHAOS_SECONDS=$seconds cargo test "${profile[@]}" --test chaos -- --include-ignored --nocapture >"$log" 2>&1
status=$?
set -e
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
if [ "$status" -eq 0 ]; then verdict="passed"; else verdict="FAILED (exit $status)"; fi

{
    echo "# Chaos: $seconds s of faults and operator actions under strict load"
    echo
    echo "Run $started by \`bench/chaos/run.sh\` at commit \`$(git rev-parse --short HEAD)\`: \`$cmd\`."
    echo
    echo "Machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')),"
    echo "$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, Linux $(uname -r);"
    echo "load average $load_before before, $load_after after (the machine is shared: other builds"
    echo "and tests ran at the same time, so rates and timings are noisy)."
    echo
    echo "Result: **$verdict**."
    echo
    echo '```'
    grep -E '^(chaos:|  [^ ])' "$log" || true
    grep -E 'panicked at|^test result' "$log" || true
    echo '```'
    if [ "$status" -ne 0 ]; then
        echo
        echo "The failed assertion:"
        echo
        echo '```'
        sed -n '/panicked at/,/^stack backtrace\|^note:/p' "$log" | grep -v '^stack backtrace\|^note:' | head -20
        echo '```'
    fi
} >"$out"
echo "wrote $out ($verdict)" >&2
exit "$status"
