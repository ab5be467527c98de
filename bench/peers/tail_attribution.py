#!/usr/bin/env python3
"""Who held the server's CPU while requests were late (see tail-attribution.sh).

Usage: tail_attribution.py DIR [NAME]   (DIR holds slow.txt, perf.txt and loadgen.json)
"""
import bisect
import collections
import json
import re
import sys

SWITCH = re.compile(r"^\s*(\S.*?)\s+(\d+)/(-?\d+)\s+\[(\d+)\]\s+([\d.]+):\s+sched:sched_switch:\s*(.*)$")


def label(comm, tid, known={}):
    """The task's name, with `[PID]` of its process if that still runs when this reads /proc
    (the server does, under tail-attribution.sh): another program's threads may share a name
    with the server's (tokio's `tokio-rt-worker`)."""
    if tid not in known:
        try:
            tgid = next(l.split()[1] for l in open(f"/proc/{tid}/status") if l.startswith("Tgid:"))
            known[tid] = f"{comm}[{tgid}]" if tid else comm
        except (OSError, StopIteration):
            known[tid] = comm
    return known[tid]


def main():
    d = sys.argv[1]
    name = sys.argv[2] if len(sys.argv) > 2 else d
    lines = open(f"{d}/slow.txt").read().splitlines()
    base = float(lines[0].split()[-1])  # "# record_from_monotonic_s S"
    windows = sorted((base + float(due), base + float(due) + int(lat) / 1e6)
                     for due, lat, _ in (l.split() for l in lines[2:]))
    episodes = []
    for start, end in windows:
        if episodes and start <= episodes[-1][1]:
            episodes[-1][1] = max(episodes[-1][1], end)
        else:
            episodes.append([start, end])
    runs, current = [], None  # (from, to, task name) on the CPU
    for line in open(f"{d}/perf.txt"):
        m = SWITCH.match(line)
        if not m:
            continue
        at = float(m.group(5))
        nxt = re.search(r"next_comm=(.*?) next_pid=(\d+)", m.group(6))
        if current:
            runs.append((current[0], at, current[1]))
        current = (at, label(nxt.group(1), int(nxt.group(2))))
    starts = [r[0] for r in runs]
    inside = collections.Counter()
    for start, end in episodes:
        j = max(0, bisect.bisect_left(starts, start) - 1)
        while j < len(runs) and runs[j][0] < end:
            a, b, task = runs[j]
            overlap = min(b, end) - max(a, start)
            if overlap > 0:
                inside[task] += overlap
            j += 1
    whole = collections.Counter()
    for a, b, task in runs:
        whole[task] += b - a
    span = runs[-1][1] - runs[0][0] if runs else 1
    total = sum(e - s for s, e in episodes) or 1
    r = json.loads(open(f"{d}/loadgen.json").read().strip().splitlines()[-1])
    print(f"{name}: p50 {r.get('p50_us')} µs, p99 {r.get('p99_us')} µs, p99.9 {r.get('p999_us')} µs, "
          f"max {r.get('max_us')} µs; {len(windows)} requests late in {len(episodes)} episodes, "
          f"{total * 1e3:.1f} ms in all, the longest {max((e - s for s, e in episodes), default=0) * 1e3:.1f} ms")
    print("  CPU 0 inside the episodes: " + ", ".join(
        f"{t} {100 * v / total:.1f}%" for t, v in inside.most_common(8)))
    print("  CPU 0 over the whole run:  " + ", ".join(
        f"{t} {100 * v / span:.1f}%" for t, v in whole.most_common(6)))


if __name__ == "__main__":
    main()
