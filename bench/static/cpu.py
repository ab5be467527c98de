#!/usr/bin/env python3
"""CPU time of a process tree, to the nanosecond, for bench/static/run.sh.

    cpu.py snapshot ROOT_PID > BEFORE.json   # ... the load runs ...
    cpu.py snapshot ROOT_PID > AFTER.json
    cpu.py diff BEFORE.json AFTER.json       # prints: cpu_s runq_s source

cpu_s: the time the tree's threads ran during the interval, from each thread's
/proc/PID/task/TID/schedstat (nanoseconds; utime+stime in /proc/PID/stat come in 10 ms clock
ticks, too coarse for a 3 s run that uses 0.3 s of CPU). runq_s: the time its threads were
runnable but waited for a CPU (schedstat's second field): when it is large, the machine starved
the server, whatever the server did. A thread that ends during the interval takes its schedstat
with it; then the interval falls back to the processes' utime+stime (which keep the time of
their ended threads) and source says "ticks".
"""

import json
import os
import sys


def children_of():
    kids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


def snapshot(root):
    kids = children_of()
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(kids.get(pid, []))
    procs, threads = {}, {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            # utime and stime: fields 14 and 15 of stat, 12 and 13 after the command.
            procs[pid] = int(fields[11]) + int(fields[12])
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    run, wait = f.read().split()[:2]
                threads[tid] = [int(run), int(wait)]
        except (OSError, ValueError):
            continue  # ended meanwhile
    return {"procs": procs, "threads": threads}


def diff(before, after):
    tck = os.sysconf("SC_CLK_TCK")
    run = wait = 0
    ended = False
    for tid, (r0, w0) in before["threads"].items():
        if tid not in after["threads"]:
            ended = True
            continue
        r1, w1 = after["threads"][tid]
        run += r1 - r0
        wait += w1 - w0
    for tid, (r1, w1) in after["threads"].items():
        if tid not in before["threads"]:
            run += r1
            wait += w1
    if ended:
        ticks = sum(t - before["procs"].get(p, 0) for p, t in after["procs"].items())
        return ticks / tck, wait / 1e9, "ticks"
    return run / 1e9, wait / 1e9, "schedstat"


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "snapshot":
        json.dump(snapshot(int(sys.argv[2])), sys.stdout)
    elif len(sys.argv) == 4 and sys.argv[1] == "diff":
        with open(sys.argv[2]) as f:
            before = json.load(f)
        with open(sys.argv[3]) as f:
            after = json.load(f)
        cpu, runq, source = diff(before, after)
        print(f"{cpu:.4f} {runq:.4f} {source}")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
