#!/usr/bin/env bash
# System calls, context switches and CPU migrations per request of server builds on the hello
# benchmark, per thread of the server's whole process tree (a profiling aid, not a result): the
# kernel side of CPU per request, which instructions.sh (user space only) does not see. Like the
# allocation count, these counts hardly move with the machine's load; they do move with how many
# requests one wake-up finds waiting (a saturated server reads more per `epoll_wait`), so compare
# servers under the same load and pinning.
#
#   bench/http/syscalls.sh SECONDS BIN...
#   bench/http/syscalls.sh 5 target/release/tine bench/hyper-hello/target/release/hyper-hello
#
# Each BIN is started with its whole tree on CPU 0 (`taskset -c 0`) and loaded by `wrk -t1
# -c$CONNS` (default 16) on CPU 1, as the peer suite's pinned phase does (PIN=0: nothing pinned);
# after a 1 s warm-up, `perf stat --per-thread` counts every `syscalls:sys_enter_*` tracepoint,
# `raw_syscalls:sys_enter`, `context-switches` and `cpu-migrations` in every thread of the tree
# for SECONDS of load, and the counts are divided by the requests wrk reports. tine builds run as
# `serve --workers 1` with every other setting at its default (the monitor, mold, hot spare and
# each process's threads are all counted); a path containing `hyper-hello` as `hyper-hello ADDR 1`.
# TINE_ARGS: more `serve` flags for the tine builds (e.g. `--sched-batch false`). Pinned, CPU 0 as
# a whole is counted too (every task on it, and its softirqs and wake-ups, per request).
# Needs root and perf (Debian: linux-perf), wrk, python3. Every process started is killed on exit;
# every load is bounded by wrk -d and `timeout`.
set -u
if (($# < 2)); then
    sed -n '2,21p' "$0" >&2
    exit 2
fi
SECONDS_EACH=$1
shift
CONNS=${CONNS:-16}
PIN=${PIN:-1}
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
bench_need wrk curl perf python3
bench_work_dir tine-syscalls
WORK=$BENCH_WORK
ulimit -n 65536 2>/dev/null || true
bench_pin

bench_machine
echo "# wrk -t1 -c$CONNS -d${SECONDS_EACH}s; pinned: $([[ $PIN == 1 ]] && echo 'server tree on CPU 0, wrk on CPU 1' || echo no)"
i=0
for bin in "$@"; do
    bin="$(realpath "$bin")"
    port=$((19500 + i))
    dir="$WORK/$i"
    # shellcheck disable=SC2086 # TINE_ARGS: words
    bench_start_hello "$bin" "$dir" "$port" 1 ${TINE_ARGS:-} || exit 1
    if [[ $bin != *hyper-hello* ]]; then
        # The hot spare boots after the worker: wait (bounded) for it to stand by.
        for _ in $(seq 1 100); do
            for p in $(bench_tree "$BENCH_PID"); do
                tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null
                echo
            done | grep -q '^tine spare' && break
            sleep 0.1
        done
    fi
    pid=$BENCH_PID
    timeout 5 "${BENCH_LOAD_PIN[@]}" wrk -t1 "-c$CONNS" -d1s "http://127.0.0.1:$port/" >/dev/null
    list=$(bench_tree "$pid" | paste -sd,)
    # Thread names now (perf prints comm-tid, and comm is cut to 15 bytes anyway).
    for p in $(bench_tree "$pid"); do
        for t in /proc/"$p"/task/*; do
            printf '%s %s %s\n' "${t##*/}" "$p" "$(tr '\0' ' ' <"/proc/$p/cmdline" | cut -c1-40)"
        done
    done >"$dir/threads"
    if [[ $PIN == 1 ]]; then
        timeout $((SECONDS_EACH + 60)) perf stat -C 0 -x, -o "$dir/cpu0" -e context-switches \
            -e cpu-migrations -e irq:softirq_entry -e sched:sched_wakeup -e sched:sched_switch \
            -- sleep "$SECONDS_EACH" &
        cpu0=$!
    fi
    timeout $((SECONDS_EACH + 60)) perf stat --per-thread -x, -o "$dir/stat" \
        -e raw_syscalls:sys_enter -e context-switches -e cpu-migrations -e 'syscalls:sys_enter_*' \
        -p "$list" -- "${BENCH_LOAD_PIN[@]}" wrk -t1 "-c$CONNS" -d"${SECONDS_EACH}s" \
        "http://127.0.0.1:$port/" >"$dir/wrk"
    [[ $PIN == 1 ]] && wait "$cpu0"
    n=$(awk '/requests in/{print $1}' "$dir/wrk")
    echo "$(awk '/Requests\/sec/{printf "%d", $2}' "$dir/wrk") req/s (with perf attached: not a throughput result)"
    python3 - "$bin" "${n:-0}" "$dir/stat" "$dir/threads" "$dir/cpu0" <<'EOF'
import collections, sys
binary, requests, stat, threads, cpu0 = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
if requests == 0:
    sys.exit(f"{binary}: wrk reported no requests")
owner = {}
for line in open(threads):
    tid, pid, cmd = line.rstrip("\n").split(" ", 2)
    owner[tid] = cmd.strip()
per_thread = collections.defaultdict(lambda: collections.Counter())
total = collections.Counter()
for line in open(stat):
    f = line.strip().split(",")
    if len(f) < 4 or line.startswith("#"):
        continue
    thread, count, event = f[0], f[1], f[3]
    try:
        count = int(float(count))
    except ValueError:
        continue  # <not counted>, <not supported>
    event = event.replace("syscalls:sys_enter_", "").replace("raw_syscalls:sys_enter", "syscalls")
    per_thread[thread][event] += count
    total[event] += count
def per(x):
    return x / requests
print(f"{binary}: {requests} requests")
print(f"  whole tree, per request: {per(total['syscalls']):.3f} system calls, "
      f"{per(total['context-switches']):.4f} context switches, {per(total['cpu-migrations']):.4f} migrations")
calls = [(e, c) for e, c in total.items() if e not in ("syscalls", "context-switches", "cpu-migrations") and c]
print("  system calls per request (whole tree, 0.0005 or more):")
for e, c in sorted(calls, key=lambda x: -x[1]):
    if per(c) >= 0.0005:
        print(f"    {e:24} {per(c):8.4f}")
print("  per thread (system calls, context switches per request; the thread's three busiest calls):")
for thread, c in sorted(per_thread.items(), key=lambda x: -x[1]["syscalls"]):
    if not c["syscalls"] and not c["context-switches"]:
        continue
    tid = thread.rsplit("-", 1)[-1]
    top = sorted(((e, n) for e, n in c.items() if e not in ("syscalls", "context-switches", "cpu-migrations") and n),
                 key=lambda x: -x[1])[:3]
    tops = ", ".join(f"{e} {per(n):.4f}" for e, n in top)
    print(f"    {thread:22} {per(c['syscalls']):8.4f} {per(c['context-switches']):8.4f}  "
          f"[{owner.get(tid, '?')}] {tops}")
try:
    rows = [l.strip().split(",") for l in open(cpu0) if l.strip() and not l.startswith("#")]
    counts = {r[2]: int(float(r[0])) for r in rows if len(r) > 2 and r[0].replace(".", "").isdigit()}
    print("  CPU 0 as a whole (the load's wall time; every task on it), per request: " + ", ".join(
        f"{e} {per(n):.4f}" for e, n in counts.items()))
except OSError:
    pass
EOF
    bench_stop_started
    BENCH_STARTED=()
    i=$((i + 1))
done
