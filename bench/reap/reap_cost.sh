#!/bin/bash
# What reaping a worker costs the monitor: tine (3 workers, max_lifetime 1, so a worker is
# recycled about every 330 ms) under wrk POST load at 256 connections, the monitor's wait4 calls
# timed with strace -T for 11 s. Prints, per run, the reaps seen and their wait4 time (median, p90,
# max, sum) and the monitor's slow-step warnings.
#
#   bench/reap/reap_cost.sh [TINE_BINARY ...]     (default: target/debug/tine; several: interleaved)
#   ROUNDS=3 PORT=18732 bench/reap/reap_cost.sh old/tine target/debug/tine
#
# Needs wrk and strace (ptrace of a process you own: kernel.yama.ptrace_scope 0 or 1 as parent).
set -eu
rounds=${ROUNDS:-3}
port=${PORT:-18732}
bins=("$@")
[ ${#bins[@]} -eq 0 ] && bins=(target/debug/tine)
work=$(mktemp -d)
monitor=
trap 'rm -rf "$work"; [ -n "$monitor" ] && kill "$monitor" 2>/dev/null' EXIT
printf 'wrk.method = "POST"\nwrk.body = "hello"\n' > "$work/post.lua"
for round in $(seq "$rounds"); do
  for bin in "${bins[@]}"; do
    log="$work/tree.log"
    "$bin" serve --listen "127.0.0.1:$port" --workers 3 --max-lifetime 1 \
      --control-socket "$work/ctl.sock" > /dev/null 2> "$log" &
    monitor=$!
    for _ in $(seq 100); do grep -q "worker\[2\].*ready" "$log" && break; sleep 0.1; done
    timeout 20 wrk -t2 -c256 -d12s -s "$work/post.lua" "http://127.0.0.1:$port/" > /dev/null 2>&1 &
    load=$!
    sleep 1
    # (timeout ends strace: its status is not this run's)
    { timeout 11 strace -qq -T -e trace=wait4 -p "$monitor" 2>&1 || true; } | grep "= [1-9][0-9]* <" |
      awk '{print $NF}' | tr -d '<>' | sort -n |
      awk -v bin="$bin" -v r="$round" '{a[NR]=$1; s+=$1} END {
        printf "round %d %s: reaps %d, wait4 s: median %.4f p90 %.4f max %.4f sum %.3f\n",
          r, bin, NR, a[int(NR/2)+1], a[int(NR*0.9)], a[NR], s }'
    kill "$monitor"; wait "$monitor" 2>/dev/null || true
    wait "$load" 2>/dev/null || true
    echo "  slow monitor steps: $(grep -c 'slow monitor step' "$log" || true), load $(cut -d' ' -f1 /proc/loadavg)"
  done
done
