#!/usr/bin/env python3
"""Reforking memory benchmark: total PSS of tine's process tree with and without reforking.

    bench/refork/run.py                 # ~3 minutes; writes bench/results/refork.{md,json} + refork-pss.svg
    bench/refork/run.py --quick         # smaller, for trying the harness; writes to bench/results/tmp/

What it does (see bench/refork/README.md for the why of each choice):
  1. builds tine (release) and the load client bench/refork/loadgen (std-only Rust, release);
  2. mode "off": starts `tine serve --app cache-demo --workers 4 --keys 1024 --block-kb 256`, sends the
     warm-up traffic (the same seeded random-key stream in both modes, paced, keep-alive connections of
     bounded length), samples the PSS of the whole process tree every --sample-every requests, waits
     until the tree is settled, and takes the final measurement;
  3. mode "refork": the same with `--refork-after T,false`, T chosen so that the promoted worker has
     served >= T requests itself (checked: the monitor logs the promoted worker's request count); after
     the traffic it waits until the rollout is complete (every worker of the new generation, per
     `tine ctl status --json`) and takes the final measurement;
  4. latency: on the warm refork-mode server, constant paced load for --latency-seconds while
     `tine ctl refork` is issued --latency-reforks times; requests due while a rollout was running
     (from the promotion log line to the exit of the last old worker) are compared with the rest;
  5. sweep: the same traffic with other refork_after values (total PSS only);
  6. writes the report with the machine, the exact commands, the numbers and the SVG plot.

PSS is read by this script from /proc/PID/smaps_rollup of every process of the tree (the monitor and
all its descendants, found through /proc/PID/task/*/children), independently of tine's own status.
Everything it starts is stopped on exit (SIGTERM, then SIGKILL of every recorded descendant); every
load is bounded by a request count and a wall-clock limit.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TINE = os.path.join(ROOT, "target", "release", "tine")
LOADGEN_TARGET = os.path.join(ROOT, "target", "bench-refork")
LOADGEN = os.path.join(LOADGEN_TARGET, "release", "refork-loadgen")
WORKERS = 4


def log(msg):
    print(f"[refork-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ /proc


def children_of(pid):
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out.extend(int(p) for p in f.read().split())
        except OSError:
            pass
    return out


def tree(root):
    """The root and all its descendants, parents first."""
    seen, todo = [], [root]
    while todo:
        p = todo.pop(0)
        if p in seen:
            continue
        seen.append(p)
        todo.extend(children_of(p))
    return seen


def smaps_rollup(pid):
    """Rss, Pss, USS (private clean + dirty) in KiB, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            text = f.read()
    except OSError:
        return None
    v = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
            v[parts[0][:-1]] = int(parts[1])
    if "Pss" not in v:
        return None
    return {
        "rss_kb": v.get("Rss", 0),
        "pss_kb": v["Pss"],
        "uss_kb": v.get("Private_Clean", 0) + v.get("Private_Dirty", 0),
        "anon_kb": v.get("Anonymous", 0),
    }


def title(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def is_holder(pid):
    """A worker's holder of its memory (`teardown_holder`): its address space is its worker's,
    so its PSS is the worker's again and is left out of the totals."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(" (", 1)[1].rsplit(")", 1)[0] == "tine-holder"
    except (OSError, IndexError):
        return False


def sample_tree(root):
    procs = []
    for pid in tree(root):
        if is_holder(pid):
            continue
        m = smaps_rollup(pid)
        if m is not None:
            procs.append({"pid": pid, "title": title(pid), **m})
    return {"total_pss_kb": sum(p["pss_kb"] for p in procs), "processes": procs}


# ------------------------------------------------------------------ processes

STARTED = []  # Popen objects of every server started


def stop_server(proc):
    if proc.poll() is not None:
        return
    pids = tree(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    for p in pids + tree(proc.pid):
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def cleanup(*_):
    for proc in STARTED:
        stop_server(proc)


def on_signal(signum, _frame):
    cleanup()
    sys.exit(128 + signum)


def ctl(sock, *words):
    r = subprocess.run([TINE, "ctl", "--control-socket", sock, *words], capture_output=True, text=True, timeout=15)
    if r.returncode != 0:
        raise RuntimeError(f"tine ctl {' '.join(words)}: {r.stderr.strip()}")
    return r.stdout


def status(sock):
    return json.loads(ctl(sock, "status", "--json"))


def wait_for(predicate, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}")


def serve_command(args, port, sock, refork_after):
    cmd = [TINE, "serve", "--listen", f"127.0.0.1:{port}", "--workers", str(WORKERS), "--app", "cache-demo",
           "--keys", str(args.keys), "--block-kb", str(args.block_kb), "--control-socket", sock]
    if refork_after:
        cmd += ["--refork-after", refork_after]
    return cmd + args.serve_args.split()


def start_server(cmd, logpath):
    logf = open(logpath, "w")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    STARTED.append(proc)

    def ready():
        if proc.poll() is not None:
            raise RuntimeError(f"tine exited with {proc.returncode}; see {logpath}:\n{open(logpath).read()[-2000:]}")
        with open(logpath) as f:
            return "tine ready" in f.read()

    wait_for(ready, 30, "`tine ready` in the log")
    return proc


def settled(sock, min_generation):
    """The tree is settled: one ready mold of generation >= min_generation and WORKERS ready workers, all of
    the mold's generation, nothing starting, promoting or retiring."""
    st = status(sock)
    procs = st["processes"]
    molds = [p for p in procs if p["role"] == "mold"]
    workers = [p for p in procs if p["role"] == "worker"]
    if len(molds) != 1 or molds[0]["state"] != "mold" or molds[0]["generation"] < min_generation:
        return None
    g = molds[0]["generation"]
    if len(workers) != WORKERS or any(w["generation"] != g or w["state"] not in ("ready", "busy") for w in workers):
        return None
    return st


# ------------------------------------------------------------------ load


def run_load(args, port, requests, rate, seed, latency_out, on_progress=None, max_seconds=None):
    cmd = [LOADGEN, "--addr", f"127.0.0.1:{port}", "--keys", str(args.keys), "--requests", str(requests),
           "--conns", str(args.conns), "--rate", str(rate), "--per-conn", str(args.per_conn), "--seed", str(seed),
           "--progress", str(args.sample_every), "--latency-out", latency_out,
           "--max-seconds", str(max_seconds or (requests / rate * 3 + 30))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    progress = []
    summary = None
    for line in proc.stdout:
        if line.startswith("progress "):
            _, n, unix_us = line.split()
            progress.append((int(n), int(unix_us)))
            if on_progress:
                on_progress(int(n), int(unix_us))
        elif line.startswith("summary "):
            summary = json.loads(line[len("summary "):])
    proc.wait(timeout=30)
    if proc.returncode != 0 or summary is None:
        raise RuntimeError(f"load client failed with {proc.returncode}")
    return {"command": " ".join(cmd), "summary": summary, "progress": progress}


# ------------------------------------------------------------------ tine's log

LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z")


def log_events(path):
    """(unix_us, line) of every timestamped line."""
    out = []
    with open(path) as f:
        for line in f:
            m = LOG_TS.match(line)
            if m:
                t = datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.timezone.utc)
                out.append((int(t.timestamp() * 1e6), line.rstrip("\n")))
    return out


def rollouts(path):
    """Each refork: generation, promoted worker's request count, start (promotion), mold ready, end (last
    old-generation worker or old mold exited)."""
    events = log_events(path)
    out = {}
    for t, line in events:
        m = re.search(r"promoting worker to mold of gen:(\d+) nr=(\d+) pid=(\d+) generation=\d+ requests=(\d+)", line)
        if m:
            g = int(m.group(1))
            out[g] = {"generation": g, "worker": int(m.group(2)), "promoted_requests": int(m.group(4)), "start_us": t,
                      "mold_ready_us": None, "end_us": None}
            continue
        m = re.search(r"mold \(gen:(\d+), promoted from worker\[\d+\]\) ready", line)
        if m and int(m.group(1)) in out:
            out[int(m.group(1))]["mold_ready_us"] = t
            continue
        m = re.search(r"reason=rollout to gen:(\d+) how=", line)
        if m and int(m.group(1)) in out:
            out[int(m.group(1))]["end_us"] = t
            continue
        m = re.search(r"mold exited .*generation=(\d+) reason=replaced by a newer mold", line)
        if m and int(m.group(1)) + 1 in out:
            r = out[int(m.group(1)) + 1]
            r["end_us"] = max(r["end_us"] or 0, t)
    return [out[g] for g in sorted(out)]


# ------------------------------------------------------------------ latency


def read_latencies(path):
    """(due_us, sent_us, done_us, status) per request, unix time."""
    out = []
    with open(path) as f:
        for line in f:
            a = line.split()
            if len(a) == 4:
                out.append((int(a[0]), int(a[1]), int(a[2]), int(a[3])))
    return out


def pct(values, p):
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def latency_split(records, windows):
    """Latency stats of requests due inside any window vs outside all of them."""

    def inside(due):
        return any(a <= due <= b for a, b in windows)

    groups = {"rollout": [], "steady": []}
    for due, sent, done, st in records:
        groups["rollout" if inside(due) else "steady"].append((done - due, done - sent, st))
    out = {}
    for name, rows in groups.items():
        d = [r[0] for r in rows]
        s = [r[1] for r in rows]
        out[name] = {
            "requests": len(rows),
            "failed": sum(1 for r in rows if r[2] != 200),
            "from_due_us": {f"p{p}": pct(d, p) for p in (50, 90, 99, 99.9)} | {"max": max(d) if d else None},
            "from_sent_us": {f"p{p}": pct(s, p) for p in (50, 90, 99, 99.9)} | {"max": max(s) if s else None},
        }
    return out


# ------------------------------------------------------------------ modes


def memory_mode(args, name, refork_after, work, port):
    sock = os.path.join(work, f"{name}.sock")
    logpath = os.path.join(work, f"{name}.log")
    cmd = serve_command(args, port, sock, refork_after)
    log(f"mode {name}: {' '.join(cmd)}")
    proc = start_server(cmd, logpath)
    samples = [{"requests": 0, "unix_us": int(time.time() * 1e6), "total_pss_kb": sample_tree(proc.pid)["total_pss_kb"]}]

    def on_progress(n, unix_us):
        s = sample_tree(proc.pid)
        samples.append({"requests": n, "unix_us": unix_us, "total_pss_kb": s["total_pss_kb"]})

    latency_file = os.path.join(work, f"{name}-latency.txt")
    load = run_load(args, port, args.requests, args.rate, args.seed, latency_file, on_progress)
    log(f"mode {name}: traffic done: {json.dumps(load['summary'])[:300]}")
    # Every number before `false` is one promotion.
    min_gen = len([x for x in refork_after.split(",") if x != "false"]) if refork_after else 0
    t0 = time.monotonic()
    st = wait_for(lambda: settled(sock, min_gen), 60, f"a settled tree of generation >= {min_gen}", interval=0.1)
    settle_s = time.monotonic() - t0
    time.sleep(args.settle)
    final = sample_tree(proc.pid)
    st = status(sock)
    samples.append({"requests": args.requests, "unix_us": int(time.time() * 1e6), "total_pss_kb": final["total_pss_kb"],
                    "final": True})
    result = {
        "mode": name,
        "command": " ".join(cmd),
        "load": {"command": load["command"], "summary": load["summary"]},
        "samples": samples,
        "progress": load["progress"],
        "final": final,
        "status": st,
        "settle_wait_s": round(settle_s, 3),
        "rollouts": rollouts(logpath),
        "log_tail": open(logpath).read().splitlines()[-60:],
    }
    if refork_after:
        lat = read_latencies(latency_file)
        windows = [(r["start_us"], r["end_us"]) for r in result["rollouts"] if r["end_us"]]
        result["latency"] = latency_split(lat, windows)
    return proc, sock, logpath, result


def latency_phase(args, proc, sock, logpath, work, port):
    """Constant paced load on the warm refork-mode server; `ctl refork` issued a few times."""
    latency_file = os.path.join(work, "latency-phase.txt")
    duration = args.latency_seconds
    requests = int(args.rate * duration)
    before = {r["generation"] for r in rollouts(logpath)}
    triggers = []
    errors = []

    def rollout_done(g):
        # From the log, not from `ctl status`: a status call reads smaps_rollup of every process
        # (page-table walks in the monitor), which would load the machine during the very window
        # being measured.
        text = open(logpath).read()
        return (text.count(f"reason=rollout to gen:{g} how=") >= WORKERS
                and re.search(rf"mold exited .*generation={g - 1} reason=replaced by a newer mold", text) is not None)

    def trigger():
        try:
            gap = duration / (args.latency_reforks + 1)
            g = max(p["generation"] for p in status(sock)["processes"] if p["role"] == "mold")
            for _ in range(args.latency_reforks):
                time.sleep(gap)
                triggers.append(int(time.time() * 1e6))
                ctl(sock, "refork")
                g += 1
                wait_for(lambda: rollout_done(g), 30, f"rollout to gen:{g} in the log", interval=0.05)
        except Exception as e:  # reported, never swallowed
            errors.append(repr(e))

    th = threading.Thread(target=trigger, daemon=True)
    log(f"latency phase: {requests} requests at {args.rate}/s, {args.latency_reforks} reforks via `tine ctl refork`")
    th.start()
    load = run_load(args, port, requests, args.rate, args.seed + 1, latency_file)
    th.join(timeout=60)
    if errors:
        raise RuntimeError(f"latency phase refork trigger failed: {errors}")
    done = [r for r in rollouts(logpath) if r["generation"] not in before]
    windows = [(r["start_us"], r["end_us"]) for r in done if r["end_us"]]
    lat = read_latencies(latency_file)
    return {
        "load": {"command": load["command"], "summary": load["summary"]},
        "rollouts": done,
        "split": latency_split(lat, windows),
        "rollout_ms": [round((b - a) / 1000, 1) for a, b in windows],
    }


# ------------------------------------------------------------------ plot


def time_to_requests(progress, unix_us):
    """Interpolates the request count at a wall-clock time from the load client's progress lines."""
    pts = [(0, progress[0][1] - (progress[1][1] - progress[0][1]) if len(progress) > 1 else progress[0][1])] + progress
    for (n0, t0), (n1, t1) in zip(pts, pts[1:]):
        if t0 <= unix_us <= t1 and t1 > t0:
            return n0 + (n1 - n0) * (unix_us - t0) / (t1 - t0)
    return None


def svg_plot(off, rf, warm_worker_kb, warm_set_kb, path, n_requests, quick):
    W, H = 860, 500
    ml, mr, mt, mb = 80, 30, 50, 70
    pw, ph = W - ml - mr, H - mt - mb
    series = [("reforking off", off["samples"], "#c0392b"), (rf.get("label", "refork_after"), rf["samples"], "#2471a3")]
    ymax_mib = max(s["total_pss_kb"] for _, ss, _ in series for s in ss) / 1024
    step = 100 if ymax_mib > 400 else 50
    ytop = (int(ymax_mib / step) + 1) * step
    xtop = n_requests

    def X(n):
        return ml + pw * n / xtop

    def Y(mib):
        return mt + ph * (1 - mib / ytop)

    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
         f'font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15">tine cache-demo, {WORKERS} workers, '
         f'K={rf["keys"]} x {rf["block_kb"]} KiB: total PSS of the process tree{" (QUICK, not a result)" if quick else ""}</text>']
    for v in range(0, ytop + 1, step):
        o.append(f'<line x1="{ml}" y1="{Y(v):.1f}" x2="{ml + pw}" y2="{Y(v):.1f}" stroke="#e5e5e5"/>')
        o.append(f'<text x="{ml - 8}" y="{Y(v) + 4:.1f}" text-anchor="end">{v}</text>')
    xstep = 10000 if xtop >= 50000 else max(1000, xtop // 10 // 1000 * 1000)
    for n in range(0, xtop + 1, xstep):
        o.append(f'<line x1="{X(n):.1f}" y1="{mt}" x2="{X(n):.1f}" y2="{mt + ph}" stroke="#f0f0f0"/>')
        o.append(f'<text x="{X(n):.1f}" y="{mt + ph + 18}" text-anchor="middle">{n // 1000}k</text>')
    o.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    o.append(f'<text x="{ml + pw / 2}" y="{H - 25}" text-anchor="middle">requests served (whole tree)</text>')
    o.append(f'<text transform="translate(22,{mt + ph / 2}) rotate(-90)" text-anchor="middle">total PSS (MiB)</text>')
    # Reference levels; the warm set's label goes left and below its line, the others right and above
    # (the warm set and one warm worker are a few MiB apart).
    for label, kb, dash, left in (("one warm worker", warm_worker_kb, "6,4", False),
                                  ("1.3x one warm worker (goal)", 1.3 * warm_worker_kb, "2,3", False),
                                  ("warm set", warm_set_kb, "10,3,2,3", True)):
        y = Y(kb / 1024)
        o.append(f'<line x1="{ml}" y1="{y:.1f}" x2="{ml + pw}" y2="{y:.1f}" stroke="#777" stroke-dasharray="{dash}"/>')
        x, anchor, ty = (ml + 6, "start", y + 14) if left else (ml + pw - 4, "end", y - 4)
        o.append(f'<text x="{x}" y="{ty:.1f}" text-anchor="{anchor}" fill="#555">{label} ({kb / 1024:.0f} MiB)</text>')
    for i, r in enumerate(rf["rollouts"]):
        n = time_to_requests(rf["progress"], r["start_us"])
        if n is None:
            continue
        took = f", rollout {(r['end_us'] - r['start_us']) / 1000:.0f} ms" if r.get("end_us") else ""
        o.append(f'<line x1="{X(n):.1f}" y1="{mt}" x2="{X(n):.1f}" y2="{mt + ph}" stroke="#2471a3" '
                 f'stroke-dasharray="3,3" opacity="0.6"/>')
        o.append(f'<text x="{X(n) + 4:.1f}" y="{mt + 14 + 14 * i}" fill="#2471a3">gen:{r["generation"]}: '
                 f'worker[{r["worker"]}] promoted after {r["promoted_requests"]} requests{took}</text>')
    for label, ss, color in series:
        pts = " ".join(f"{X(s['requests']):.1f},{Y(s['total_pss_kb'] / 1024):.1f}" for s in ss)
        o.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
        for s in ss:
            if s.get("final"):
                o.append(f'<circle cx="{X(s["requests"]):.1f}" cy="{Y(s["total_pss_kb"] / 1024):.1f}" r="4" fill="{color}"/>')
    # The legend sits between the two final levels, right half: clear of both curves after the warm-up.
    mid_mib = (1.3 * warm_worker_kb + off["samples"][-1]["total_pss_kb"]) / 2 / 1024
    texts = [f"{label}: {ss[-1]['total_pss_kb'] / 1024:.0f} MiB after the traffic (dot)" for label, ss, _ in series]
    lw = 42 + 7 * max(len(t) for t in texts)
    lx, ly = ml + pw - lw - 10, min(mt + ph - 40, max(mt + 40, Y(mid_mib)))
    o.append(f'<rect x="{lx - 6}" y="{ly - 14}" width="{lw}" height="44" fill="white" stroke="#ccc"/>')
    for i, ((_, _, color), text) in enumerate(zip(series, texts)):
        o.append(f'<line x1="{lx}" y1="{ly + i * 18 - 4}" x2="{lx + 24}" y2="{ly + i * 18 - 4}" stroke="{color}" stroke-width="2"/>')
        o.append(f'<text x="{lx + 30}" y="{ly + i * 18}">{text}</text>')
    o.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")


# ------------------------------------------------------------------ report


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return "?"


def machine():
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", open("/proc/meminfo").read()).group(1))
    thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip() if os.path.exists(
        "/sys/kernel/mm/transparent_hugepage/enabled") else "n/a"
    return {
        "cpu": sh("lscpu | sed -n 's/^Model name: *//p'") or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "libc": sh("ldd --version | head -1"),
        "rustc": sh("rustc -V"),
        "thp": thp,
        "commit": sh(f"git -C {ROOT} rev-parse --short HEAD") + (" (dirty tree)" if sh(f"git -C {ROOT} status --porcelain -- src") else ""),
        "loadavg_before": open("/proc/loadavg").read().split()[:3],
    }


def kb_mib(kb):
    return f"{kb / 1024:.1f} MiB"


def proc_table(final, st):
    by_pid = {p["pid"]: p for p in st["processes"]}
    rows = ["| process | requests | RSS | PSS | USS |", "|---|---:|---:|---:|---:|"]
    for p in final["processes"]:
        req = by_pid.get(p["pid"], {}).get("requests", "")
        rows.append(f"| `{p['title']}` | {req} | {kb_mib(p['rss_kb'])} | {kb_mib(p['pss_kb'])} | {kb_mib(p['uss_kb'])} |")
    rows.append(f"| **total** | | | **{kb_mib(final['total_pss_kb'])}** | |")
    return "\n".join(rows)


def promotions(rollouts):
    return ", ".join(f"gen:{r['generation']} ({r['promoted_requests']})" for r in rollouts)


LAT_HEADER = [
    "| window | requests | failed | p50 (due) | p99 (due) | p99.9 (due) | max (due) | p50 (sent) | p99 (sent) |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
]


def lat_row(name, s):
    d, t = s["from_due_us"], s["from_sent_us"]

    def ms(v):
        return "-" if v is None else f"{v / 1000:.2f}"

    return (f"| {name} | {s['requests']} | {s['failed']} | {ms(d['p50'])} | {ms(d['p99'])} | {ms(d['p99.9'])} | {ms(d['max'])} | "
            f"{ms(t['p50'])} | {ms(t['p99'])} |")


def write_report(args, m, off, rf, lat, sweep, out_dir, svg_name, written=None):
    warm_set_kb = args.keys * args.block_kb
    off_workers = [p for p in off["final"]["processes"] if "worker[" in p["title"]]
    warm_worker_kb = sum(p["pss_kb"] for p in off_workers) / len(off_workers)
    warm_worker_rss_kb = sum(p["rss_kb"] for p in off_workers) / len(off_workers)
    off_total, rf_total = off["final"]["total_pss_kb"], rf["final"]["total_pss_kb"]
    reduction = 1 - rf_total / off_total
    ratio = rf_total / warm_worker_kb
    ok = ratio < 1.3 and reduction >= 0.65
    promoted = rf["rollouts"][0] if rf["rollouts"] else None
    mold = [p for p in rf["final"]["processes"] if "mold" in p["title"]]
    summary = {
        "warm_set_kb": warm_set_kb,
        "off_total_pss_kb": off_total,
        "refork_total_pss_kb": rf_total,
        "one_warm_worker_pss_kb": round(warm_worker_kb),
        "one_warm_worker_rss_kb": round(warm_worker_rss_kb),
        "reduction_percent": round(100 * reduction, 1),
        "ratio_to_one_warm_worker": round(ratio, 3),
        "goal_met": ok,
    }
    q = " (QUICK RUN: harness check, not a result)" if args.quick else ""
    lines = [
        f"# Reforking memory benchmark{q}",
        "",
        f"Run {written or time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `bench/refork/run.py"
        f"{' --quick' if args.quick else ''}` (see bench/refork/README.md). Release build.",
        "",
        "## Result",
        "",
        f"| | total PSS of the tree | vs one warm worker |",
        "|---|---:|---:|",
        f"| reforking off | **{kb_mib(off_total)}** | {off_total / warm_worker_kb:.2f}x |",
        f"| `--refork-after {args.refork_after},false` | **{kb_mib(rf_total)}** | **{ratio:.3f}x** |",
        "",
        f"- Warm set: {args.keys} keys x {args.block_kb} KiB = **{kb_mib(warm_set_kb)}** (what each process that "
        "has touched every key holds privately unless it is shared).",
        f"- One warm worker (mean of the 4 workers of the reforking-off run after the traffic): PSS "
        f"{kb_mib(warm_worker_kb)}, RSS {kb_mib(warm_worker_rss_kb)}.",
        f"- Reduction of the whole tree's PSS with reforking: **{100 * reduction:.1f}%** (the ceiling with 4 workers "
        "is 75%: one copy instead of four).",
        f"- Goal (tree < 1.3x one warm worker and reduction >= 65%): **{'met' if ok else 'MISSED'}**.",
    ]
    if promoted:
        lines += [
            f"- Promotion: worker[{promoted['worker']}] had served **{promoted['promoted_requests']}** requests itself "
            f"(threshold {args.refork_after}; a random key stream touches all {args.keys} keys after about "
            f"K ln K = {int(args.keys * __import__('math').log(args.keys))} on average). The new mold's RSS after the "
            f"rollout: {kb_mib(mold[0]['rss_kb']) if mold else '?'} (>= the warm set: it holds every block)."
        ]
    lines += [
        f"- Plot: [{svg_name}]({svg_name}): total PSS against requests served, both modes, sampled every "
        f"{args.sample_every} requests; the dots are the final measurements after the tree settled.",
        "",
        f"![total PSS against requests]({svg_name})",
        "",
        "## When to refork: other thresholds, same traffic",
        "",
        "A promotion shares what the promoted worker had warmed; what it had not, every new worker builds "
        "again privately. Same traffic, other `--refork-after` values (each its own run):",
        "",
        "| `--refork-after` | promotions (worker's requests at promotion) | mold RSS | total PSS after the traffic | vs reforking off |",
        "|---|---|---:|---:|---:|",
        *[f"| `{w['refork_after']}` | {promotions(w['rollouts'])} | "
          f"{kb_mib(w['mold_rss_kb'])} | {kb_mib(w['total_pss_kb'])} | -{100 * (1 - w['total_pss_kb'] / off_total):.1f}% |"
          for w in sweep],
        f"| `{args.refork_after},false` (above) | gen:1 ({promoted['promoted_requests'] if promoted else '?'}) | "
        f"{kb_mib(mold[0]['rss_kb']) if mold else '?'} | {kb_mib(rf_total)} | -{100 * reduction:.1f}% |",
        "",
        "## Latency during a rollout vs steady state",
        "",
        f"Constant paced load ({args.rate} req/s, {args.conns} keep-alive connections, random keys, all warm) on the "
        f"reforking server for {args.latency_seconds} s, with {len(lat['rollouts'])} reforks issued by "
        "`tine ctl refork` while it ran. \"rollout\" = requests due between the promotion log line and the exit of "
        "the last old-generation process; \"steady\" = all other requests of the same run. Latency from the due "
        "time (open-loop pacing: includes queueing behind a stall) and from the moment it was sent. Times in ms.",
        "",
        *LAT_HEADER,
        lat_row("steady", lat["split"]["steady"]),
        lat_row("rollout", lat["split"]["rollout"]),
        "",
        f"Rollout durations (promotion to last old process gone): {', '.join(f'{x:.0f} ms' for x in lat['rollout_ms'])}. "
        f"Load client: {lat['load']['summary']['ok']} ok, {lat['load']['summary']['failed']} failed, "
        f"{lat['load']['summary']['bad_status']} non-200, {lat['load']['summary']['retried_idle_close']} resent after "
        "an idle keep-alive close (a draining worker closes idle connections; the request never reached it), "
        f"{lat['load']['summary']['server_closed']} `Connection: close` responses.",
        "",
        "For context only, the memory run with `refork_after` (not a latency measurement: the script reads every "
        "process's smaps_rollup every 0.4 s during it, and \"steady\" includes the first touches that build blocks):",
        "",
        *LAT_HEADER,
        lat_row("steady (includes cold first touches)", rf["latency"]["steady"]),
        lat_row("rollout", rf["latency"]["rollout"]),
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; memory {m['memory_gib']} GiB; kernel {m['kernel']}; {m['libc']}; "
        f"{m['rustc']}; transparent huge pages: `{m['thp']}`",
        f"- tine commit {m['commit']}; load average before the run: {' '.join(m['loadavg_before'])}, after: "
        f"{' '.join(m.get('loadavg_after', ['?']))} (other work on the machine shows in the latencies)",
        "- Load client, server and this script share the cores (nothing pinned).",
        "",
        "## Commands",
        "",
        "```",
        f"# reforking off\n{off['command']}\n{off['load']['command']}",
        f"# reforking on\n{rf['command']}\n{rf['load']['command']}",
        f"# latency phase (same server as 'reforking on', after the memory measurement)\n{lat['load']['command']}",
        "```",
        "",
        "## Final process trees",
        "",
        "Reforking off (after the traffic):",
        "",
        proc_table(off["final"], off["status"]),
        "",
        f"Reforking on (after the traffic and the rollout; waited {rf['settle_wait_s']} s for the rollout to settle):",
        "",
        proc_table(rf["final"], rf["status"]),
        "",
        "## Traffic",
        "",
        f"Both modes: {args.requests} requests, seed {args.seed}, {args.rate} req/s, {args.conns} connections, "
        f"each closed by the client after {args.per_conn} requests.",
        "",
        f"- off: {json.dumps(off['load']['summary'])}",
        f"- refork: {json.dumps(rf['load']['summary'])}",
        "",
        "Raw samples and status snapshots: `refork.json` next to this file.",
    ]
    with open(os.path.join(out_dir, "refork.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return summary


# ------------------------------------------------------------------ main


def rewrite_report(args):
    """Rewrites the report and the plot from a recorded refork.json (after a change of wording)."""
    with open(os.path.join(args.out_dir, "refork.json")) as f:
        d = json.load(f)
    saved = argparse.Namespace(**d["args"])
    off, rf = d["off"], d["refork"]
    svg_name = "refork-pss-quick.svg" if saved.quick else "refork-pss.svg"
    off_workers = [p for p in off["final"]["processes"] if "worker[" in p["title"]]
    warm_worker_kb = sum(p["pss_kb"] for p in off_workers) / len(off_workers)
    svg_plot(off, rf, warm_worker_kb, saved.keys * saved.block_kb, os.path.join(args.out_dir, svg_name), saved.requests,
             saved.quick)
    write_report(saved, d["machine"], off, rf, d["latency"], d.get("sweep", []), args.out_dir, svg_name,
                 written=d.get("written"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=1024)
    ap.add_argument("--block-kb", type=int, default=256)
    ap.add_argument("--requests", type=int, default=100_000, help="warm-up traffic per mode")
    ap.add_argument("--refork-after", type=int, default=12_000, help="refork_after threshold (once: ',false')")
    ap.add_argument("--rate", type=int, default=5000, help="requests per second, paced")
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--per-conn", type=int, default=100, help="requests per connection before the client reconnects")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sample-every", type=int, default=2000, help="PSS sample every N requests")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds to wait before the final measurement")
    ap.add_argument("--latency-seconds", type=int, default=30)
    ap.add_argument("--latency-reforks", type=int, default=20)
    ap.add_argument("--sweep", default="1000,false;4000,false;1000,4000,12000,false",
                    help="other refork_after values to measure, ';'-separated ('' for none)")
    ap.add_argument("--serve-args", default="", help="extra `tine serve` arguments for every run, e.g. '--worker-threads 2'")
    ap.add_argument("--port", type=int, default=18095)
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small run to try the harness; the report says so")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite refork.md and the SVG from the refork.json of --out-dir (no run)")
    args = ap.parse_args()
    if args.report_only:
        rewrite_report(args)
        return
    if args.quick:
        args.keys, args.block_kb, args.requests, args.refork_after = 256, 64, 12000, 2500
        args.latency_seconds, args.latency_reforks = 6, 2
        args.sweep = "500,false"
        # A quick run never overwrites the recorded result (bench/results/tmp/ is git-ignored).
        args.out_dir = os.path.join(args.out_dir, "tmp")
    for tool in ("cargo",):
        if not shutil.which(tool):
            sys.exit(f"refork bench: {tool} not found")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if not args.skip_build:
        log("building tine and the load client (release)")
        subprocess.run(["cargo", "build", "--release", "--bin", "tine"], cwd=ROOT, check=True)
        subprocess.run(["cargo", "build", "--release", "--manifest-path", os.path.join(HERE, "loadgen", "Cargo.toml"),
                        "--target-dir", LOADGEN_TARGET], cwd=ROOT, check=True)
    m = machine()
    work = tempfile.mkdtemp(prefix="tine-bench-refork.")
    os.makedirs(args.out_dir, exist_ok=True)
    try:
        proc, _, _, off = memory_mode(args, "off", None, work, args.port)
        stop_server(proc)
        proc, sock, logpath, rf = memory_mode(args, "refork", f"{args.refork_after},false", work, args.port + 1)
        rf["keys"], rf["block_kb"] = args.keys, args.block_kb
        rf["label"] = f"--refork-after {args.refork_after},false"
        if not rf["rollouts"]:
            raise RuntimeError("refork_after never triggered; see " + logpath)
        lat = latency_phase(args, proc, sock, logpath, work, args.port + 1)
        stop_server(proc)
        sweep = []
        for i, spec in enumerate(args.sweep.split(";") if args.sweep else []):
            proc, _, _, r = memory_mode(args, f"sweep{i}", spec, work, args.port + 2 + i)
            stop_server(proc)
            sweep.append({"refork_after": spec, "total_pss_kb": r["final"]["total_pss_kb"], "rollouts": r["rollouts"],
                          "mold_rss_kb": sum(p["rss_kb"] for p in r["final"]["processes"] if "mold" in p["title"])})
    finally:
        cleanup()
    m["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    svg_name = "refork-pss-quick.svg" if args.quick else "refork-pss.svg"
    off_workers = [p for p in off["final"]["processes"] if "worker[" in p["title"]]
    warm_worker_kb = sum(p["pss_kb"] for p in off_workers) / len(off_workers)
    svg_plot(off, rf, warm_worker_kb, args.keys * args.block_kb, os.path.join(args.out_dir, svg_name), args.requests, args.quick)
    summary = write_report(args, m, off, rf, lat, sweep, args.out_dir, svg_name)
    with open(os.path.join(args.out_dir, "refork.json"), "w") as f:
        json.dump({"args": vars(args), "written": time.strftime('%Y-%m-%d %H:%M:%S %Z'), "machine": m, "summary": summary, "off": off, "refork": rf, "latency": lat, "sweep": sweep}, f, indent=1)
    log(f"summary: {json.dumps(summary)}")
    log(f"report: {os.path.join(args.out_dir, 'refork.md')}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
