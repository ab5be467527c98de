#!/usr/bin/env python3
"""The kernel's part of kill -9 -> replacement: how long the killed worker takes to die.

Reads `perf script` text of these tracepoints, recorded system-wide while respawn_bench runs
(bench/respawn/teardown.sh does both):

  signal:signal_generate   the driver's kill(SIGKILL) of the worker (the clock starts)
  sched:sched_process_exit each of the worker's threads entering its exit, before it lets go of
                           the address space (exit_mm) — the first one marks the teardown's start
  mmap:exit_mmap           the end of the address space's teardown, in the last thread to let go
                           of it (every mapped page unmapped, the page tables freed)
  tcp:tcp_send_reset       the first client connection reset as the worker's descriptors close
                           (after exit_mmap unless another thread closes the shared table first)
  sched:sched_switch       whether the thread tearing the address space down was off its CPU

Per kill, in µs from the kill: first thread exiting, last thread exiting, exit_mmap done, first
reset; and the teardown's length (last thread's exit -> exit_mmap done) with its off-CPU part.

Usage: teardown.py PERF_SCRIPT.txt [DRIVER_COMM]   (DRIVER_COMM default: respawn_bench)
"""
import re
import statistics
import sys

EVENT = re.compile(r"^\s*(.+?)\s+(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)$")


def fields(rest):
    return dict(re.findall(r"(\w+)=(\S+)", rest))


def q(xs, p):
    xs = sorted(xs)
    return xs[round((len(xs) - 1) * p)] if xs else float("nan")


def main():
    driver = sys.argv[2] if len(sys.argv) > 2 else "respawn_bench"
    events = []
    for line in open(sys.argv[1], errors="replace"):
        m = EVENT.match(line)
        if m:
            comm, pid, tid, _cpu, t, name, rest = m.groups()
            events.append((float(t) * 1e6, comm, int(pid), int(tid), name.rstrip(":"), rest))
    events.sort(key=lambda e: e[0])
    rows = []
    for i, (t0, comm, _pid, _tid, name, rest) in enumerate(events):
        if name != "signal:signal_generate" or not comm.startswith(driver) or "sig=9 " not in rest:
            continue
        victim = int(fields(rest)["pid"])
        exits, unmapped, reset, switches = {}, None, None, []
        for t, _c, pid, tid, ename, erest in events[i + 1:]:
            if t - t0 > 50_000:
                break
            if ename == "sched:sched_switch":
                f = fields(erest)
                switches.append((t - t0, int(f.get("prev_pid", 0)), int(f.get("next_pid", 0))))
            if pid != victim:
                continue
            if ename == "sched:sched_process_exit":
                exits[tid] = t - t0
            elif ename == "mmap:exit_mmap" and unmapped is None:
                unmapped = (t - t0, tid)
            elif ename == "tcp:tcp_send_reset" and reset is None:
                reset = t - t0
            if unmapped and reset:
                break
        if not exits or unmapped is None or reset is None:
            continue
        last = exits.get(unmapped[1], max(exits.values()))
        off, out_at = 0.0, None
        for t, prev, nxt in switches:
            if last <= t <= unmapped[0]:
                if prev == unmapped[1]:
                    out_at = t
                elif nxt == unmapped[1] and out_at is not None:
                    off, out_at = off + t - out_at, None
        rows.append({
            "threads": len(exits), "first_exit": min(exits.values()), "last_exit": last,
            "unmapped": unmapped[0], "reset": reset, "teardown": unmapped[0] - last, "off_cpu": off,
            "reset_before_unmapped": reset < unmapped[0],
        })
    print(f"{len(rows)} kills (threads per worker: {sorted({r['threads'] for r in rows})}; "
          f"first reset before the address space was gone in {sum(r['reset_before_unmapped'] for r in rows)})")
    print(f"{'µs from the kill':<40} {'median':>7} {'p10':>7} {'p90':>7}")
    for key, label in [("first_exit", "first thread exits"), ("last_exit", "thread that unmaps exits"),
                       ("teardown", "  its exit_mmap (wall)"), ("off_cpu", "  of which off its CPU"),
                       ("unmapped", "address space gone"), ("reset", "first connection reset")]:
        xs = [r[key] for r in rows]
        if xs:
            print(f"{label:<40} {statistics.median(xs):>7.0f} {q(xs, .1):>7.0f} {q(xs, .9):>7.0f}")


if __name__ == "__main__":
    main()
