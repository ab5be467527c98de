#!/usr/bin/env bash
# Where the time from kill -9 to a serving replacement goes, as the kernel's scheduler saw it:
# records the scheduler's and a few system calls' tracepoints on every CPU (perf, CLOCK_MONOTONIC,
# the driver's clock) while examples/respawn_bench kills ROUNDS busy workers of tine with a spare,
# then sched_stages.py joins them with the driver's per-kill timestamps: when the dead worker's
# death-notice thread was woken by the kill and when it got a CPU, when the spare was woken (by
# that thread's robust futex) and got a CPU, its first accept and first response write, the dead
# process's last thread out (which tears its memory down), and the client's answer.
# Unlike timeline.py it needs no debug logging in tine, so the spare runs as in production.
#
#   bench/respawn/sched-stages.sh [TINE_BIN]       # needs root and perf (Debian: linux-perf)
#   ROUNDS=20 DRIVER=... OUT=dir bench/respawn/sched-stages.sh /tmp/tine-copy
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/lib.sh
tine=${1:-target/release/tine}
driver=${DRIVER:-target/release/examples/respawn_bench}
rounds=${ROUNDS:-20}
out=${OUT:-bench/results/tmp/sched-stages}
mkdir -p "$out"
command -v perf >/dev/null || { echo "needs perf (apt-get install linux-perf)" >&2; exit 2; }
timeout 600 perf record -q -m 1024 -k CLOCK_MONOTONIC -a -o "$out/perf.data" \
  -e sched:sched_wakeup,sched:sched_switch,sched:sched_process_exit \
  -e syscalls:sys_enter_kill,syscalls:sys_exit_futex_waitv,syscalls:sys_exit_accept4,syscalls:sys_enter_writev \
  -- "$driver" --server tine --spares 1 --rounds "$rounds" --tine "$tine" > "$out/driver.json"
bench_perf_text "$out/perf.data" "$out/perf.txt"
python3 bench/respawn/sched_stages.py "$out/driver.json" "$out/perf.txt"
