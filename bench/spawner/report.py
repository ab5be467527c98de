"""Turns bench/results/spawner.jsonl into the markdown report: medians over rounds, and ratios
against the goals of issue 6."""
import json
import platform
import statistics
import subprocess
import sys
from collections import defaultdict

raw, command = sys.argv[1], sys.argv[2]
by = defaultdict(lambda: defaultdict(list))
loads = []
for line in open(raw):
    d = json.loads(line)
    loads.append(d["load"])
    for k in ("p50_us", "p99_us", "jobs_per_s"):
        if k in d:
            by[d["name"]][k].append(d[k])
med = {name: {k: statistics.median(v) for k, v in ks.items()} for name, ks in by.items()}
rounds = max(len(ks.get("p50_us", ks.get("jobs_per_s", []))) for ks in by.values())


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def lat(name):
    return med[name]["p50_us"]


floor = lat("floor")
ppe = min(lat("python_fork_latency"), lat("python_forkserver_latency"))
ppe_tp = max(med["python_fork_throughput"]["jobs_per_s"], med["python_forkserver_throughput"]["jobs_per_s"])
tine_tp = max(med["throughput_blocking_2threads"]["jobs_per_s"], med["throughput_await_16tasks"]["jobs_per_s"])

print("# Spawner benchmark\n")
print(f"- command: `{command}`")
print(f"- machine: {sh('nproc')} CPUs, kernel {platform.release()}, {sh('rustc --version')}, {sh('python3 --version')}")
print(f"- {rounds} interleaved rounds (tine, then Python); every figure is the median over rounds of that round's"
      f" figure; 1-min load average at round start: {', '.join(str(l) for l in sorted(set(loads)))}")
print("- trivial job: `x + 1` on a u64 / int; latency = one job at a time, submit to result in hand\n")
print("## Round-trip latency of a trivial job\n")
print("| what | p50 µs | p99 µs | p50 / floor |")
print("|---|---:|---:|---:|")
for name, label in [
    ("floor", "floor: bare SOCK_SEQPACKET ping-pong, 1 byte each way"),
    ("run_blocking", "tine `pool.run_blocking(job)`"),
    ("run_await_mt", "tine `pool.run(job).await`, multi-thread runtime"),
    ("run_await_ct", "tine `pool.run(job).await`, current-thread runtime"),
    ("python_fork_latency", "ProcessPoolExecutor (fork)"),
    ("python_forkserver_latency", "ProcessPoolExecutor (forkserver)"),
]:
    m = med[name]
    print(f"| {label} | {m['p50_us']:.1f} | {m['p99_us']:.1f} | {m['p50_us'] / floor:.2f}× |")
print("\n## Throughput with 2 workers\n")
print("| what | jobs/s |")
print("|---|---:|")
for name, label in [
    ("throughput_blocking_2threads", "tine, 2 threads calling `run_blocking`"),
    ("throughput_await_16tasks", "tine, 16 tokio tasks awaiting `run`"),
    ("python_fork_throughput", "ProcessPoolExecutor (fork), `map(chunksize=1)`"),
    ("python_forkserver_throughput", "ProcessPoolExecutor (forkserver), `map(chunksize=1)`"),
]:
    print(f"| {label} | {med[name]['jobs_per_s']:,.0f} |")
print("\n## One-shot\n")
print("| what | p50 µs | p99 µs |")
print("|---|---:|---:|")
for name, label in [("bare_fork", "bare fork + `_exit` + waitpid"), ("one_shot", "tine one-shot job (fresh process, result back)")]:
    print(f"| {label} | {med[name]['p50_us']:.1f} | {med[name]['p99_us']:.1f} |")


def goal(text, value, ok):
    print(f"| {text} | {value} | {'met' if ok else '**missed**'} |")


print("\n## Against the goals of issue 6\n")
print("| goal | measured | |")
print("|---|---:|---|")
rb, ra = lat("run_blocking"), lat("run_await_mt")
goal("`run_blocking` p50 ≤ 1.5× the floor", f"{rb / floor:.2f}×", rb / floor <= 1.5)
goal("`run(..).await` p50 ≤ 2.5× the floor (multi-thread runtime)", f"{ra / floor:.2f}×", ra / floor <= 2.5)
goal("`run_blocking` p50 ≥ 4× lower than ProcessPoolExecutor (best of fork, forkserver)", f"{ppe / rb:.1f}× lower", ppe / rb >= 4)
goal("`run(..).await` p50 ≥ 4× lower than ProcessPoolExecutor", f"{ppe / ra:.1f}× lower", ppe / ra >= 4)
goal("throughput ≥ 5× ProcessPoolExecutor's (best vs best)", f"{tine_tp / ppe_tp:.1f}×", tine_tp / ppe_tp >= 5)
goal("one-shot p50 ≤ 2× bare fork", f"{lat('one_shot') / lat('bare_fork'):.2f}×", lat("one_shot") / lat("bare_fork") <= 2)
