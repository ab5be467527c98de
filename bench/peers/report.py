#!/usr/bin/env python3
"""Turns bench/results/peers.json (written by peers.py) into bench/results/peers.md and the SVG
charts bench/results/peers-*.svg. Standard library only; the SVG is written by hand here, so the
charts are regenerated from the numbers on every run, never drawn.

Usage: report.py [RESULTS_DIR]   (metadata for the machine table comes in BENCH_* variables)
"""
import json
import math
import os
import statistics
import sys
from html import escape

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "results")
R = json.load(open(os.path.join(OUT, "peers.json")))
env = os.environ.get
SERVERS = list(R["servers"])
LABEL = {k: v["label"] for k, v in R["servers"].items()}
PEERS = [s for s in SERVERS if s != "tine-alt"]  # the peer charts: tine at its defaults
COLORS = {"tine": "#d9480f", "tine-alt": "#f08c00", "nginx": "#2b8a3e", "hyper": "#1971c2", "puma": "#ae3ec9",
          "unicorn": "#862e9c", "gunicorn": "#0c8599", "uwsgi": "#5c940d"}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs):
    xs = [x for x in xs if x is not None]
    return (min(xs), max(xs)) if xs else (None, None)


def fmt_us(us):
    if us is None:
        return "n/a"
    if us >= 1e6:
        return f"{us / 1e6:.2f} s"
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


def fmt_n(x):
    return "n/a" if x is None else f"{x:,.0f}"


def fmt_mib(kb):
    return "n/a" if kb is None else f"{kb / 1024:.2f} MiB"


def fmt_ms(ms):
    return "n/a" if ms is None else (f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms")


# ------------------------------------------------------------------ SVG
def hbar(path, title, note, cats, series, fmt, log=False, tick_fmt=None):
    """Horizontal grouped bars. series: [(name, color, values, lows, highs)], one value per cat
    (None = not applicable); lows/highs draw the spread (min–max over rounds) as a whisker."""
    left, right, bar, gap, group_gap = 150, 130, 13, 2, 12
    width = 820
    plot_w = width - left - right
    legend_h = 22 if len(series) > 1 else 0
    top = 46 + legend_h
    group_h = len(series) * (bar + gap) + group_gap
    height = top + len(cats) * group_h + 34
    vals = [v for _, _, vs, lo, hi in series for v in list(vs) + list(hi or []) if v is not None and v > 0]
    vmax = max(vals) if vals else 1
    if log:
        vmin = min(vals) if vals else 1
        lo_e, hi_e = math.floor(math.log10(vmin)), math.ceil(math.log10(vmax))
        if hi_e == lo_e:
            hi_e += 1

        def x(v):
            v = max(v, 10 ** lo_e)
            return left + plot_w * (math.log10(v) - lo_e) / (hi_e - lo_e)
        ticks = [10 ** e for e in range(lo_e, hi_e + 1)]
    else:
        step = 10 ** math.floor(math.log10(vmax))
        for m in (1, 2, 2.5, 5, 10):
            if vmax / (step * m) <= 6:
                step *= m
                break
        top_v = math.ceil(vmax / step) * step

        def x(v):
            return left + plot_w * v / top_v
        ticks = [i * step for i in range(int(top_v / step) + 1)]
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
         'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">',
         f'<rect width="{width}" height="{height}" fill="white"/>',
         f'<text x="{left}" y="20" font-size="15" font-weight="bold">{escape(title)}</text>',
         f'<text x="{left}" y="38" fill="#555">{escape(note)}</text>']
    if len(series) > 1:
        lx = left
        for name, color, *_ in series:
            o.append(f'<rect x="{lx}" y="{48}" width="12" height="12" fill="{color}"/>')
            o.append(f'<text x="{lx + 16}" y="{58}">{escape(name)}</text>')
            lx += 24 + 7.5 * len(name)
    axis_y = top + len(cats) * group_h
    for t in ticks:
        tx = x(t)
        o.append(f'<line x1="{tx:.1f}" y1="{top - 4}" x2="{tx:.1f}" y2="{axis_y}" stroke="#e5e5e5"/>')
        o.append(f'<text x="{tx:.1f}" y="{axis_y + 16}" text-anchor="middle" fill="#555">{escape((tick_fmt or fmt)(t))}</text>')
    for ci, cat in enumerate(cats):
        gy = top + ci * group_h
        o.append(f'<text x="{left - 8}" y="{gy + len(series) * (bar + gap) / 2 + 4:.1f}" text-anchor="end" '
                 f'font-weight="bold">{escape(LABEL.get(cat, cat))}</text>')
        for si, (name, color, vs, lows, highs) in enumerate(series):
            y = gy + si * (bar + gap)
            v = vs[ci]
            if v is None:
                o.append(f'<text x="{left + 4}" y="{y + bar - 3}" fill="#888">n/a</text>')
                continue
            c = COLORS.get(cat, color) if len(series) == 1 else color
            x0 = x(10 ** lo_e) if log else left
            o.append(f'<rect x="{x0:.1f}" y="{y}" width="{max(1.0, x(v) - x0):.1f}" height="{bar}" fill="{c}"/>')
            lo, hi = (lows[ci] if lows else None), (highs[ci] if highs else None)
            if lo is not None and hi is not None and hi > lo:
                o.append(f'<line x1="{x(lo):.1f}" y1="{y + bar / 2}" x2="{x(hi):.1f}" y2="{y + bar / 2}" stroke="#222"/>')
                for e in (lo, hi):
                    o.append(f'<line x1="{x(e):.1f}" y1="{y + 2}" x2="{x(e):.1f}" y2="{y + bar - 2}" stroke="#222"/>')
            end = max(x(v), x(hi) if hi else 0)
            o.append(f'<text x="{end + 5:.1f}" y="{y + bar - 3}">{escape(fmt(v))}</text>')
    o.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + plot_w}" y2="{axis_y}" stroke="#999"/>')
    o.append("</svg>")
    with open(os.path.join(OUT, path), "w") as f:
        f.write("\n".join(o) + "\n")


def tick_us(us):
    if us >= 1e6:
        return f"{us / 1e6:g} s"
    return f"{us / 1000:g} ms" if us >= 1000 else f"{us:g} µs"


def tick_ms(ms):
    return f"{ms / 1000:g} s" if ms >= 1000 else f"{ms:g} ms"


def k_fmt(v):
    return f"{v / 1000:.0f}k" if v >= 1000 else f"{v:.0f}"


# ------------------------------------------------------------------ data
def wrk(layout, s, key):
    return [r[key] for r in R.get(f"wrk_{layout}", {}).get(s, [])]


def paired(layout, a, b, key="req_s"):
    ra, rb = R.get(f"wrk_{layout}", {}).get(a, []), R.get(f"wrk_{layout}", {}).get(b, [])
    return [x[key] / y[key] for x, y in zip(ra, rb) if y[key]]


def worker_pss(s):
    m = R["servers"][s].get("memory_idle")
    return med(m["worker_pss_kb"]) if m and m["worker_pss_kb"] else None


charts = []
if "wrk_shared" in R or "wrk_pinned" in R:
    series = []
    for layout, color, what in (("shared", "#1c7ed6", "shared cores, 2 workers"),
                                ("pinned", "#f76707", "pinned: server on CPU 0, 1 worker; wrk on CPU 1")):
        if f"wrk_{layout}" in R:
            series.append((what, color, [med(wrk(layout, s, "req_s")) for s in PEERS],
                           [spread(wrk(layout, s, "req_s"))[0] for s in PEERS],
                           [spread(wrk(layout, s, "req_s"))[1] for s in PEERS]))
    hbar("peers-throughput.svg", "hello: requests per second (higher is better)",
         f"wrk -t1 -c{R['settings']['CONNS']}, median of {R['settings']['ROUNDS']} interleaved rounds; whisker = min–max",
         PEERS, series, k_fmt)
    charts.append(("Throughput", "peers-throughput.svg"))
if "wrk_shared" in R:
    series = [("p50", "#74c0fc", [med(wrk("shared", s, "p50_us")) for s in PEERS], None, None),
              ("p99", "#1864ab", [med(wrk("shared", s, "p99_us")) for s in PEERS],
               [spread(wrk("shared", s, "p99_us"))[0] for s in PEERS], [spread(wrk("shared", s, "p99_us"))[1] for s in PEERS])]
    hbar("peers-latency.svg", "hello at saturation: latency (lower is better; log scale)",
         "wrk closed loop, shared cores, 2 workers; median of rounds, whisker = p99 min–max",
         PEERS, series, fmt_us, log=True, tick_fmt=tick_us)
    charts.append(("Latency at saturation", "peers-latency.svg"))
if any(R["servers"][s].get("memory_idle") for s in PEERS):
    def mib(kb):
        return None if kb is None else kb / 1024
    series = [("idle PSS per worker", "#2f9e44", [mib(worker_pss(s)) for s in PEERS], None, None),
              ("idle PSS of the rest (master/monitor, mold)", "#b2f2bb",
               [mib(sum(R["servers"][s]["memory_idle"]["overhead_pss_kb"]))
                if R["servers"][s].get("memory_idle") and R["servers"][s]["kind"] != "hyper" else None
                for s in PEERS], None, None)]
    hbar("peers-memory.svg", "Idle memory: PSS (lower is better)",
         "/proc/PID/smaps_rollup after start-up, before any load; 2 workers; hyper is one process",
         PEERS, series, lambda m: f"{m:.1f} MiB", tick_fmt=lambda m: f"{m:g} MiB")
    charts.append(("Memory", "peers-memory.svg"))
if R.get("kill"):
    ks = [s for s in PEERS if s in R["kill"]]
    hbar("peers-kill.svg", "kill -9 of the only worker → a request answered (lower is better; log scale)",
         f"{R['settings']['KILLS']} kills each, 1 worker, pinned to CPU 0; median, whisker = min–max",
         ks, [("ms", "#e03131", [med(R["kill"][s]) for s in ks], [min(R["kill"][s]) for s in ks],
               [max(R["kill"][s]) for s in ks])], fmt_ms, log=True, tick_fmt=tick_ms)
    charts.append(("Replacement", "peers-kill.svg"))
if R.get("reload"):
    rs = [s for s in PEERS if s in R["reload"]]
    n = R["settings"]["RELOADS"]
    hbar("peers-reload.svg", "Requests lost per graceful reload, strict non-retrying client (lower is better)",
         f"{R['settings']['STRICT_CONNS']} kept-alive connections sending POSTs; {n} reloads each; 2 workers",
         rs, [("lost per reload", "#c92a2a", [len(R["reload"][s]["lost"]) / n for s in rs], None, None)],
         lambda v: f"{v:.1f}")
    charts.append(("Reload", "peers-reload.svg"))
for layout in ("pinned", "shared"):
    o = R.get(f"open_{layout}")
    if not o:
        continue
    core = [s for s in SERVERS if s in next(iter(o["by_fraction"].values()))]
    series = []
    shades = {"0.5": ("#a5d8ff", "#4dabf7"), "0.9": ("#1c7ed6", "#0b3d91")}
    for frac, by in o["by_fraction"].items():
        c1, c2 = shades.get(frac, ("#ced4da", "#495057"))
        pct = f"{float(frac):.0%}"
        series.append((f"p99 at {pct}", c1, [med(r["p99_us"] for r in by[s]) for s in core], None, None))
        series.append((f"p99.9 at {pct}", c2, [med(r["p999_us"] for r in by[s]) for s in core], None, None))
    hbar(f"peers-open-{layout}.svg",
         f"Open loop at 50% and 90% of nginx's peak ({layout}): tail latency (lower is better; log scale)",
         f"nginx peak {o['nginx_peak']:,.0f} req/s; peers-loadgen open, {R['settings']['OPEN_CONNS']} connections, "
         f"latency from each request's due time; median of rounds",
         core, series, fmt_us, log=True, tick_fmt=tick_us)
    charts.append((f"Open loop ({layout})", f"peers-open-{layout}.svg"))

# ------------------------------------------------------------------ markdown
out = []
p = out.append
p("# Peer suite: tine vs nginx, plain hyper, puma, unicorn, gunicorn, uWSGI\n")
p(f"Run {R['started']} – {R['finished']} by `bench/peers/run.sh` "
  f"({', '.join(f'{k}={v}' for k, v in R['settings'].items())}).")
p(f"Load average (1/5/15 min): **{R['loadavg_before']}** before, **{R['loadavg_after']}** after. "
  "The machine has 2 cores, shared with other work during the session: read the spreads.\n")
p(f"tine's default `sched_batch` at this commit: **{R['default_sched_batch']}**; "
  f"`{LABEL.get('tine-alt', 'tine-alt')}` is the same binary with "
  + ("the other policy.\n" if LABEL.get("tine-alt", "").startswith("tine sched_batch=")
     else "the flags its label names.\n"))
for title, svg in charts:
    p(f"![{title}]({svg})\n")

if R.get("failures"):
    p("**Measurements that failed** (the rest of the run went on):\n")
    for what, why in R["failures"].items():
        p(f"- {what}: {why}")
    p("")
p("## All servers\n")
p("Medians over interleaved rounds (min–max in brackets). Shared: 2 workers, wrk on the same 2 cores. "
  "Pinned: 1 worker, the whole server tree on CPU 0 (`taskset -c 0`), wrk on CPU 1.\n")
p("| server | req/s shared | req/s pinned | p50 / p99 shared | p50 / p99 pinned | server CPU per request shared / pinned | "
  "idle PSS per worker | idle PSS rest | kill -9 → answered | lost per reload |")
p("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for s in SERVERS:
    def rs(layout):
        v = wrk(layout, s, "req_s")
        if not v:
            return "n/a"
        lo, hi = spread(v)
        return f"{med(v):,.0f} ({lo:,.0f}–{hi:,.0f})"

    def lat(layout):
        return f"{fmt_us(med(wrk(layout, s, 'p50_us')))} / {fmt_us(med(wrk(layout, s, 'p99_us')))}"
    mem = R["servers"][s].get("memory_idle")
    rest = fmt_mib(sum(mem["overhead_pss_kb"])) if mem and R["servers"][s]["kind"] != "hyper" else "—"
    kill = R.get("kill", {}).get(s)
    kill_s = f"{fmt_ms(med(kill))} ({fmt_ms(min(kill))}–{fmt_ms(max(kill))})" if kill else "n/a (no supervisor)" \
        if R["servers"][s]["kind"] == "hyper" else "not run"
    rel = R.get("reload", {}).get(s)
    rel_s = f"{len(rel['lost']) / R['settings']['RELOADS']:.1f} ({len(rel['lost'])} of {rel['answered'] + len(rel['lost']):,})" \
        if rel else ("n/a" if R["servers"][s]["kind"] == "hyper" else "not run")
    cpu = " / ".join("n/a" if c is None else f"{c:.2f} µs" for c in
                     (med(wrk(layout, s, "server_cpu_us_per_req")) for layout in ("shared", "pinned")))
    p(f"| {LABEL.get(s, s)} | {rs('shared')} | {rs('pinned')} | {lat('shared')} | {lat('pinned')} | "
      f"{cpu} | {fmt_mib(worker_pss(s))} | {rest} | {kill_s} | {rel_s} |")
p("")
if R.get("kill_failed_tries"):
    p("kill -9 → answered: connects or requests that failed (refused, reset, closed) before the answer, all kills: "
      + ", ".join(f"{LABEL.get(s, s)} {n}" for s, n in R["kill_failed_tries"].items()) + ".\n")
p("Server CPU per request: user+system CPU of the server's whole process tree during a wrk run "
  "(/proc/PID/stat) divided by the requests it answered. Unlike req/s and latency it hardly depends "
  "on what else the machine runs, so on a busy machine it is the steadiest comparison of cost.\n")
busy = [r["machine_busy_other_pct"] for layout in ("shared", "pinned") for rs_ in R.get(f"wrk_{layout}", {}).values()
        for r in rs_]
if busy:
    p(f"CPU used by anything but the server under test during the wrk runs (wrk included, % of "
      f"all cores): median {med(busy):.0f}%, min {min(busy):.0f}%, max {max(busy):.0f}%.\n")
for layout in ("shared", "pinned"):
    wc = {s: [r["wrk_cpu_pct_of_a_core"] for r in R.get(f"wrk_{layout}", {}).get(s, []) if "wrk_cpu_pct_of_a_core" in r]
          for s in SERVERS}
    if any(wc.values()):
        threads = R["settings"].get("SHARED_WRK_THREADS", 1) if layout == "shared" else 1
        p(f"wrk's own CPU during the {layout} runs (% of one core; wrk -t{threads} is {threads} "
          f"thread{'s' if threads > 1 else ''}, so near {100 * threads}% the client, not the server, sets the pace): "
          + ", ".join(f"{LABEL.get(s, s)} {med(v):.0f}% ({min(v):.0f}–{max(v):.0f})" for s, v in wc.items() if v) + ".\n")
errs = {(layout, s): sum(sum(r["errors"].values()) for r in R.get(f"wrk_{layout}", {}).get(s, []))
        for layout in ("shared", "pinned") for s in SERVERS}
if any(errs.values()):
    p("wrk socket errors (all rounds): " + ", ".join(f"{LABEL.get(s, s)} {layout} {n}" for (layout, s), n in errs.items() if n)
      + ".\n")

def steal_cell(rs):
    v = [r["host_steal_ms"] for r in rs if "host_steal_ms" in r]
    return f"{med(v):.0f} ms ({min(v)}–{max(v)})" if v else "—"


steal_runs = [r for k, by in R.items() if k.startswith("wrk_") and isinstance(by, dict)
              for rs in by.values() if isinstance(rs, list) for r in rs if "host_steal_ms" in r]
if steal_runs:
    v = [r["host_steal_ms"] for r in steal_runs]
    p(f"Host steal during the wrk runs (CPU time the hypervisor gave other guests, both CPUs): median "
      f"{med(v):.0f} ms per run (min {min(v)}, max {max(v)}); the open-loop tables give it per server.\n")

# ------------------------------------------------------------------ goal 2
p("## Issue 13 goal 2: per core and tail, tine vs nginx vs plain hyper\n")
p("Ratios are tine ÷ peer per interleaved round (paired runs seconds apart): median and min–max over "
  "rounds. Throughput goals: ≥ 1.0 pinned, ≥ 1.05 shared. Tail goals: closed-loop p99 at saturation "
  "≤ 1.5× nginx's; open-loop p99 and p99.9 at 50% and 90% of nginx's peak ≤ 1.1× nginx's.\n")
p("| check | goal | " + " | ".join(LABEL.get(t, t) for t in ("tine", "tine-alt") if t in SERVERS) + " |")
p("|---|---|" + "---:|" * len([t for t in ("tine", "tine-alt") if t in SERVERS]))
verdicts = {}


def cell(vals, goal, higher_better):
    if not vals:
        return "n/a", None
    m, (lo, hi) = med(vals), spread(vals)
    if goal is None:  # shown for context, no verdict
        return f"{m:.2f} ({lo:.2f}–{hi:.2f})", "context"
    ok = m >= goal if higher_better else m <= goal
    # A verdict on the median alone would hide a spread that crosses the goal: say so.
    crosses = lo <= goal <= hi and len(vals) > 1
    verdict = ("met" if ok else "not met") + (" (median; spread crosses the goal)" if crosses else "")
    return f"**{verdict}** {m:.2f} ({lo:.2f}–{hi:.2f})", (None if crosses else ok)


rows = []
for layout, goal in (("pinned", 1.0), ("shared", 1.05)):
    for peer in ("nginx", "hyper"):
        rows.append((f"req/s {layout}, ÷ {LABEL.get(peer, peer)}", f"≥ {goal}", goal, True,
                     lambda t, layout=layout, peer=peer: paired(layout, t, peer)))
for layout in ("pinned", "shared"):
    rows.append((f"server CPU per request {layout}, ÷ nginx (lower is cheaper)", "not a goal", None, False,
                 lambda t, layout=layout: paired(layout, t, "nginx", "server_cpu_us_per_req")))
for layout in ("shared", "pinned"):
    rows.append((f"p99 at saturation {layout} (wrk), ÷ nginx", "≤ 1.5", 1.5, False,
                 lambda t, layout=layout: paired(layout, t, "nginx", "p99_us")))
for layout in ("pinned", "shared"):
    o = R.get(f"open_{layout}")
    if not o:
        continue
    for frac, by in o["by_fraction"].items():
        for key, name in (("p99_us", "p99"), ("p999_us", "p99.9")):
            def f(t, by=by, key=key):
                return [a[key] / b[key] for a, b in zip(by.get(t, []), by.get("nginx", [])) if b[key]]
            rows.append((f"open loop {layout} {float(frac):.0%} of nginx peak, {name} ÷ nginx", "≤ 1.1", 1.1, False, f))
for name, goal_s, goal, hb, f in rows:
    cells = []
    for t in ("tine", "tine-alt"):
        if t not in SERVERS:
            continue
        c, ok = cell(f(t), goal, hb)
        if ok != "context":
            verdicts.setdefault(t, []).append(ok)
        cells.append(c)
    p(f"| {name} | {goal_s} | " + " | ".join(cells) + " |")
p("")
for t, oks in verdicts.items():
    met, not_met = oks.count(True), oks.count(False)
    p(f"- {LABEL.get(t, t)}: {met} checks met and {not_met} not met with every round on the same side of the goal; "
      f"{len(oks) - met - not_met} undecided (the rounds' spread crosses the goal).")
p("")
for layout in ("pinned", "shared"):
    o = R.get(f"open_{layout}")
    if not o:
        continue
    p(f"### Open loop, {layout} (nginx peak {o['nginx_peak']:,.0f} req/s from the wrk rounds above)\n")
    p("| rate | server | achieved req/s | p50 | p99 | p99.9 | max | client lag p99 | unsent | errors | host steal |")
    p("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for frac, by in o["by_fraction"].items():
        for s, rs in by.items():
            p(f"| {float(frac):.0%} ({o['nginx_peak'] * float(frac):,.0f}/s) | {LABEL.get(s, s)} | "
              f"{med(r['achieved_rate'] for r in rs):,.0f} | {fmt_us(med(r['p50_us'] for r in rs))} | "
              f"{fmt_us(med(r['p99_us'] for r in rs))} ({fmt_us(min(r['p99_us'] for r in rs))}–{fmt_us(max(r['p99_us'] for r in rs))}) | "
              f"{fmt_us(med(r['p999_us'] for r in rs))} ({fmt_us(min(r['p999_us'] for r in rs))}–{fmt_us(max(r['p999_us'] for r in rs))}) | "
              f"{fmt_us(med(r['max_us'] for r in rs))} | {fmt_us(med(r['send_lag_p99_us'] for r in rs))} | "
              f"{sum(r['unsent'] for r in rs)} | {sum(sum(r['errors'].values()) for r in rs)} | "
              f"{steal_cell(rs)} |")
    p("")
    p("*Client lag* is the open-loop client's own delay between a request's due time and its write, on "
      "connections that were idle at that time: when it is comparable to a server's p99, the client, "
      "not the server, set that number. *Unsent*: requests due within the run that their connection "
      "never got to send (it was waiting for a late answer). *Host steal*: CPU time the hypervisor "
      "gave to other guests during the run (`/proc/stat` steal, both CPUs; median and min–max over "
      "rounds): a stall of the VM itself, which lands in every server's tail alike.\n")

# ------------------------------------------------------------------ details
p("## How each server was run\n")
for layout in ("shared", "pinned"):
    cmds = R["commands"].get(layout)
    if cmds:
        p(f"{layout}:\n")
        p("```")
        for s, c in cmds.items():
            p(f"{s:9} {c}")
        p("```\n")
p("| server | graceful reload used | keep-alive | response headers |")
p("|---|---|---|---|")
for s in SERVERS:
    h = R["servers"][s].get("headers", "")
    head = h.split("\n\n")[0].strip().replace("\n", " · ")
    ka = "no (closes after each response)" if "connection: close" in h.lower() else "yes"
    p(f"| {LABEL.get(s, s)} | {R['servers'][s].get('reload_how', 'n/a')} | {ka} | `{head}` |")
p("")
if R.get("reload"):
    p("Reloads: seconds from the signal until every worker was a new process, and what was lost:\n")
    p("| server | reload durations | answered | lost | connect errors | why lost |")
    p("|---|---|---:|---:|---:|---|")
    for s, r in R["reload"].items():
        whys = {}
        for _, why in r["lost"]:
            whys[why] = whys.get(why, 0) + 1
        p(f"| {LABEL.get(s, s)} | {', '.join(f'{x:.2f} s' for x in r['reload_seconds'])} | {r['answered']:,} | "
          f"{len(r['lost'])} | {r['connect_errors']} | {'; '.join(f'{k} ×{v}' for k, v in whys.items()) or '—'} |")
    p("")
p("Idle memory per process (PSS, kB):\n")
p("| server | workers | rest (master/monitor, mold, …) |")
p("|---|---|---|")
for s in SERVERS:
    m = R["servers"][s].get("memory_idle")
    if m:
        rest = ", ".join(f"`{t[:40]}` {kb}" for t, kb in zip(m["overhead_titles"], m["overhead_pss_kb"]))
        p(f"| {LABEL.get(s, s)} | {', '.join(str(x) for x in m['worker_pss_kb'])} | {rest or '—'} |")
p("")
p("## Machine\n")
p("| | |")
p("|---|---|")
for k in ("NPROC", "CPU", "MEM", "KERNEL", "RUSTC", "GIT", "VERSIONS"):
    if env(f"BENCH_{k}"):
        p(f"| {k.lower()} | {env(f'BENCH_{k}')} |")
p("")
sys.stdout.write("\n".join(out) + "\n")
