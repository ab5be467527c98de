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
per_round = defaultdict(dict)
loads = []
for line in open(raw):
    d = json.loads(line)
    loads.append(d["load"])
    per_round[d["round"]][d["name"]] = d
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


def round_ratio(a, b, key="p50_us"):
    """Median over rounds of a/b measured in the same round (robust to a shared, noisy machine)."""
    return statistics.median(r[a][key] / r[b][key] for r in per_round.values() if a in r and b in r)


def goal(text, value, ok):
    print(f"| {text} | {value} | {'met' if ok else '**missed**'} |")


print("\n## Against the goals of issue 6\n")
print("Ratios are medians over rounds of the ratio measured within each round.\n")
print("| goal | measured | |")
print("|---|---:|---|")
rb, ra, rc = (round_ratio(n, "floor") for n in ("run_blocking", "run_await_mt", "run_await_ct"))
goal("`run_blocking` p50 ≤ 1.5× the floor", f"{rb:.2f}×", rb <= 1.5)
goal("`run(..).await` p50 ≤ 2.5× the floor (multi-thread runtime)", f"{ra:.2f}×", ra <= 2.5)
goal("`run(..).await` p50 ≤ 2.5× the floor (current-thread runtime)", f"{rc:.2f}×", rc <= 2.5)
for name, label in [("run_blocking", "`run_blocking`"), ("run_await_mt", "`run(..).await`")]:
    for py in ("fork", "forkserver"):
        x = round_ratio(f"python_{py}_latency", name)
        goal(f"{label} p50 ≥ 4× lower than ProcessPoolExecutor ({py})", f"{x:.1f}× lower", x >= 4)
for name, label in [("throughput_blocking_2threads", "2 threads `run_blocking`"), ("throughput_await_16tasks", "16 tasks `run`")]:
    for py in ("fork", "forkserver"):
        x = round_ratio(name, f"python_{py}_throughput", "jobs_per_s")
        goal(f"throughput ({label}) ≥ 5× ProcessPoolExecutor ({py})", f"{x:.1f}×", x >= 5)
x = round_ratio("one_shot", "bare_fork")
goal("one-shot p50 ≤ 2× bare fork", f"{x:.2f}×", x <= 2)
