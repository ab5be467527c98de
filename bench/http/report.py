#!/usr/bin/env python3
"""Turns the raw files of one bench/http/run.sh run into the markdown report (stdout).

Usage: report.py WORK_DIR ROOT   (metadata comes in BENCH_* environment variables).
"""
import csv
import os
import statistics
import sys

work, root = sys.argv[1], sys.argv[2]
env = os.environ.get
have_tine = env("BENCH_HAVE_TINE") == "1"

rows = list(csv.DictReader(open(os.path.join(work, "rounds.tsv")), delimiter="\t"))
servers = [s for s in ("tine", "nginx", "hyper") if any(r["server"] == s for r in rows)]
rounds = sorted({int(r["round"]) for r in rows})
by = {(int(r["round"]), r["server"]): r for r in rows}


def col(server, key):
    return [float(by[(n, server)][key]) for n in rounds if (n, server) in by]


def med(server, key):
    return statistics.median(col(server, key))


def fmt_us(us):
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


out = []
p = out.append
title = "HTTP hello benchmark: tine vs nginx vs hyper"
if not have_tine:
    title += " — DEVELOPMENT RUN WITHOUT TINE (not a result)"
p(f"# {title}\n")
p(f"Run {env('BENCH_DATE')} by `bench/http/run.sh` ({env('BENCH_SETTINGS')}).\n")

# ------------------------------------------------------------------ medians
p(f"## Medians over {len(rounds)} interleaved rounds\n")
p("| server | req/s | p50 latency | p90 latency | p99 latency | server CPU per request | errors (all rounds) |")
p("|---|---:|---:|---:|---:|---:|---:|")
for s in servers:
    cpu_per_req = statistics.median(
        float(by[(n, s)]["server_cpu_s"]) * 1e6 / max(1, int(by[(n, s)]["requests"])) for n in rounds
    )
    errs = sum(int(x) for x in col(s, "errors"))
    p(
        f"| {s} | {med(s, 'req_s'):,.0f} | {fmt_us(med(s, 'p50_us'))} | {fmt_us(med(s, 'p90_us'))} | "
        f"{fmt_us(med(s, 'p99_us'))} | {cpu_per_req:.1f} µs | {errs:.0f} |"
    )
p("")
p("Server CPU per request = user+system CPU time of the server's whole process tree during the run")
p("(from /proc/PID/stat) divided by the requests served: lower means cheaper per request.\n")

if have_tine:
    p("## Ratios (goal: req/s ratios ≥ 1.0)\n")
    p("| ratio | req/s (higher is better for tine) | p50 latency (lower is better for tine) | p99 latency (lower is better for tine) | median of per-round req/s ratios |")
    p("|---|---:|---:|---:|---:|")
    for peer in ("nginx", "hyper"):
        paired = [
            float(by[(n, "tine")]["req_s"]) / float(by[(n, peer)]["req_s"])
            for n in rounds
            if (n, "tine") in by and (n, peer) in by
        ]
        r = med("tine", "req_s") / med(peer, "req_s")
        goal = "meets goal" if r >= 1.0 else "BELOW GOAL"
        p(
            f"| tine/{peer} | **{r:.3f}** ({goal}) | {med('tine', 'p50_us') / med(peer, 'p50_us'):.3f} | "
            f"{med('tine', 'p99_us') / med(peer, 'p99_us'):.3f} | {statistics.median(paired):.3f} |"
        )
    p("")

# ------------------------------------------------------------------ quiet runs only
# Runs during which other work on the machine took at most 5% of the CPU on offer: the same
# comparison with the noisiest runs left out (reported beside the full medians, never instead).
offered = int(env("BENCH_NPROC")) * float(env("BENCH_DURATION"))
quiet = {s: [r for r in rows if r["server"] == s and float(r["other_cpu_s"]) <= 0.05 * offered] for s in servers}
if all(quiet[s] for s in servers):
    p("## Medians over quiet runs only\n")
    p("Runs in which other work on the machine used at most 5% of the CPU on offer (see the *other CPU*")
    p("column below); fewer runs, but no outside noise.\n")
    p("| server | quiet runs | req/s | p50 latency | p99 latency | server CPU per request |")
    p("|---|---:|---:|---:|---:|---:|")
    qmed = {}
    for s in servers:
        q = quiet[s]
        qmed[s] = statistics.median(float(r["req_s"]) for r in q)
        cpu = statistics.median(float(r["server_cpu_s"]) * 1e6 / max(1, int(r["requests"])) for r in q)
        p(
            f"| {s} | {len(q)} | {qmed[s]:,.0f} | {fmt_us(statistics.median(float(r['p50_us']) for r in q))} | "
            f"{fmt_us(statistics.median(float(r['p99_us']) for r in q))} | {cpu:.1f} µs |"
        )
    if have_tine:
        p("")
        p(f"Quiet-run req/s ratios: tine/nginx {qmed['tine'] / qmed['nginx']:.3f}, tine/hyper {qmed['tine'] / qmed['hyper']:.3f}.")
    p("")

# ------------------------------------------------------------------ memory
def mem(name):
    path = os.path.join(work, name)
    rows = [line.rstrip("\n").split("\t") for line in open(path) if line.strip()]
    # Titles carry the temporary directory and this checkout's path: keep the report portable.
    return [r[:4] + [r[4].replace(work, "$TMP").replace(root + "/", "")] for r in rows]


def kb(v):
    return "n/a" if v == "NA" else f"{int(v) / 1024:.2f} MiB ({int(v):,} kB)"


idle, after = mem("mem-idle.tsv"), mem("mem-after.tsv")
after_by_role = {r[0]: r for r in after}
p("## Memory: PSS from /proc/PID/smaps_rollup\n")
p("Idle = after start-up, before any load; after load = 1 s after the last wrk run ended.\n")
p("| process | title (cmdline) | idle PSS | idle RSS | PSS after load |")
p("|---|---|---:|---:|---:|")
for role, pid, pss, rss, title in idle:
    a = after_by_role.get(role, [role, "NA", "NA", "NA", ""])
    p(f"| {role} | `{title}` | {kb(pss)} | {kb(rss)} | {kb(a[2])} |")
p("")
roles = {r[0]: r for r in idle}
w, nw = roles.get("tine worker[0]"), roles.get("nginx worker[0]")
m = roles.get("tine monitor")
if w and nw and w[2] != "NA" and nw[2] != "NA":
    ratio = int(w[2]) / int(nw[2])
    goal = "meets goal" if ratio < 1.0 else "BELOW GOAL"
    p(f"Idle PSS ratio tine worker[0] / nginx worker[0]: **{ratio:.2f}** (goal: < 1.0, {goal}).")
    if m and m[2] != "NA":
        p(f"Idle PSS ratio tine monitor / nginx master: {int(m[2]) / int(roles['nginx master'][2]):.2f}.")
    p("")

# ------------------------------------------------------------------ machine & commands
p("## Machine\n")
p("| | |")
p("|---|---|")
p(f"| nproc | {env('BENCH_NPROC')} |")
p(f"| CPU | {env('BENCH_CPU')} |")
p(f"| memory | {env('BENCH_MEM')} |")
p(f"| kernel | {env('BENCH_KERNEL')} |")
p(f"| rustc | {env('BENCH_RUSTC')} |")
p(f"| nginx | {env('BENCH_NGINX')} (Debian nginx-light) |")
p(f"| wrk | {env('BENCH_WRK')} |")
p(f"| tine commit | {env('BENCH_GIT')} |")
p(f"| load average (1/5/15 min) | {env('BENCH_LOADAVG')} |")
p(f"| quiet gate | {env('BENCH_QUIET')} |")
p("")
p("## Commands\n")
p("```")
p("bench/http/run.sh        # " + env("BENCH_SETTINGS"))
p("")
p("# load, per run (PORT = the server's port; stats.lua only adds a machine-readable summary line)")
p(env("BENCH_WRK_CMD").replace(root + "/", ""))
p("")
p("# servers")
if have_tine:
    p("A: " + env("BENCH_TINE_CMD").replace(root + "/", ""))
p("B: " + env("BENCH_NGINX_CMD").replace(work, "$TMP") + "   # config below")
p("C: " + env("BENCH_HYPER_CMD").replace(root + "/", ""))
p("```\n")
p("nginx config (`$TMP` is a fresh temporary directory):\n")
p("```nginx")
p(open(os.path.join(work, "nginx", "nginx.conf")).read().replace(work, "$TMP").rstrip())
p("```\n")

# ------------------------------------------------------------------ per round
p("## Per-round raw numbers\n")
p("Order within each round: " + ", ".join(servers) + ". All servers run during the whole benchmark; only the one")
p("under load is busy. CPU columns are seconds of CPU time during the run (the machine has")
p(f"{env('BENCH_NPROC')} cores, so a {env('BENCH_DURATION')} s run offers {int(env('BENCH_NPROC')) * float(env('BENCH_DURATION')):g} CPU-seconds); *softirq* is the")
p("kernel's network processing not charged to a process (mostly this benchmark's loopback traffic);")
p("*other* is everything else on the machine (builds, tests of other work): rounds with much of it")
p(f"are noisy. Quiet gate: {env('BENCH_QUIET')}. *Connections per process*: how wrk's")
p("connections were spread over the server's processes mid-run (hyper is one process).\n")
p("| round | server | req/s | p50 | p90 | p99 | max | requests | errors | server CPU s | wrk CPU s | softirq s | other CPU s | connections per process |")
p("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for n in rounds:
    for s in servers:
        r = by.get((n, s))
        if not r:
            continue
        p(
            f"| {n} | {s} | {float(r['req_s']):,.0f} | {fmt_us(float(r['p50_us']))} | {fmt_us(float(r['p90_us']))} | "
            f"{fmt_us(float(r['p99_us']))} | {fmt_us(float(r['max_us']))} | {int(r['requests']):,} | {r['errors']} | "
            f"{r['server_cpu_s']} | {r['wrk_cpu_s']} | {r['softirq_s']} | {r['other_cpu_s']} | {r['conn_spread']} |"
        )
p("")

# ------------------------------------------------------------------ responses & tree
p("## Response of each server to `GET /`\n")
p("Header bytes matter at this size: every server sends `hello\\n` plus its headers.\n")
for s in servers:
    path = os.path.join(work, f"headers-{s}.txt")
    if os.path.exists(path):
        p(f"{s}:\n\n```http\n{open(path).read().rstrip()}\n```\n")
p("## Process tree at idle\n")
p("```")
p(open(os.path.join(work, "ps-forest.txt")).read().replace(work, "$TMP").replace(root + "/", "").rstrip())
p("```\n")

p("## Method\n")
p("See `bench/http/README.md`. In short: the three servers and wrk share the machine's cores;")
p("each server gets the same wrk settings, interleaved within every round so that drift on the")
p("machine (other work, thermal state) hits all of them alike; medians damp single outliers.")
print("\n".join(out))
