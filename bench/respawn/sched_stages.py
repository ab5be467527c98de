#!/usr/bin/env python3
"""Stages from kill -9 to a serving replacement, from the kernel's scheduler tracepoints.

Usage: sched_stages.py DRIVER.json PERF.txt  (see sched-stages.sh, which makes both)

DRIVER.json is respawn_bench's JSON line (its `rounds_timeline`: per kill, the victim's pid, the
replacement's pid, CLOCK_MONOTONIC µs of the kill and of the client's answer). PERF.txt is
`perf script -F comm,pid,tid,cpu,time,event,trace` of a `perf record -k CLOCK_MONOTONIC -a`
around the driver. Each stage is the first such event within 4 ms after its kill, in µs:

  sentinel_woken   the kill woke the dead worker's death-notice thread (src/worker/sentinel.rs)
  sentinel_runs    that thread got a CPU (its exit marks the robust word and wakes the spare)
  spare_woken      the replacement was woken
  spare_runs       the replacement got a CPU
  spare_futex_ret  its futex_waitv returned (src/worker/takeover.rs)
  first_accept     its first accept4 that returned a connection
  first_write      its first writev (a response)
  group_dead       the dead process's last thread exited (it then tears the memory down)
  first_answer     the client read the answer (the new-connection probe on kills with one, else
                   a kept-alive client's reconnection)
"""
import bisect
import json
import re
import statistics
import sys

EVENT = re.compile(r'^\s*(\S.*?)\s+(\d+)/(-?\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)$')


def main():
    driver = json.load(open(sys.argv[1]))
    events = []
    for line in open(sys.argv[2]):
        m = EVENT.match(line)
        if m:
            events.append((float(m.group(5)), int(m.group(2)), m.group(6), m.group(7)))
    events.sort(key=lambda e: e[0])
    times = [e[0] for e in events]
    rows = []
    for kill in driver["rounds_timeline"]:
        victim, new, at = kill["victim"], kill["pid"], kill["kill_us"] / 1e6
        lo, hi = bisect.bisect_left(times, at - 0.0001), bisect.bisect_right(times, at + 0.004)
        window = events[lo:hi]

        def first(pred):
            return next(((e[0] - at) * 1e6 for e in window if pred(e)), None)

        # The dead worker's death-notice thread: the one the kill woke (the spare has one too).
        woken = next((e for e in window if e[2] == "sched:sched_wakeup"
                      and "comm=tine-sentinel" in e[3]), None)
        sentinel = re.search(r"pid=(\d+)", woken[3]).group(1) if woken else None
        answer = kill["probe_first_us"] if kill["probe"] else kill["first_us"]
        rows.append({
            "sentinel_woken": (woken[0] - at) * 1e6 if woken else None,
            "sentinel_runs": first(lambda e: sentinel is not None and e[2] == "sched:sched_switch"
                                   and f"next_pid={sentinel} " in e[3]),
            "spare_woken": first(lambda e: e[2] == "sched:sched_wakeup" and f"pid={new} " in e[3]),
            "spare_runs": first(lambda e: e[2] == "sched:sched_switch" and f"next_pid={new} " in e[3]),
            "spare_futex_ret": first(lambda e: e[1] == new and e[2].endswith("sys_exit_futex_waitv")),
            "first_accept": first(lambda e: e[1] == new and e[2].endswith("sys_exit_accept4")
                                  and not e[3].startswith("0xffff")),
            "first_write": first(lambda e: e[1] == new and e[2].endswith("sys_enter_writev")),
            "group_dead": first(lambda e: e[1] == victim and e[2] == "sched:sched_process_exit"
                                and "group_dead=true" in e[3]),
            # 0: no answer was read (a failed probe).
            "first_answer": answer - kill["kill_us"] if answer > 0 else None,
        })

    def line(name, values):
        values = sorted(v for v in values if v is not None)
        if values:
            n = len(values)
            print(f"{name:34s} {n:3d} {statistics.median(values):7.0f} "
                  f"{values[n // 10]:6.0f} {values[(9 * n) // 10]:6.0f}")

    print(f"{'stage (µs after the kill)':34s} {'n':>3s} {'median':>7s} {'p10':>6s} {'p90':>6s}")
    for name in rows[0]:
        line(name, (r[name] for r in rows))
    print(f"{'between stages (µs)':34s}")
    for a, b in [("sentinel_woken", "sentinel_runs"), ("spare_woken", "spare_runs"),
                 ("spare_runs", "first_accept"), ("first_accept", "first_write"),
                 ("first_write", "first_answer")]:
        line(f"{a} -> {b}", (r[b] - r[a] if r[a] is not None and r[b] is not None else None
                             for r in rows))


if __name__ == "__main__":
    main()
