#!/usr/bin/env python3
"""Where the time from kill -9 to a serving replacement goes, per stage.

Joins the driver's per-round client timestamps (`rounds_timeline` in its JSON line, from
`respawn_bench --timeline LOG`) with tine's `tine::respawn` debug lines in LOG, all on
CLOCK_MONOTONIC (µs):

  kill      the driver's kill(SIGKILL) of the worker
  reset     a client first saw its connection to the dead worker fail (the kernel closed its files)
  notice    the dead worker's death notice hung up (src/worker/sentinel.rs; woke_us of that turn)
  closed    the monitor read EOF on the dead worker's channel (woke_us: when its poll returned)
  woke      the monitor's poll returned in the turn that first saw the death (notice, closed or
            reaped)
  reaped    the monitor's waitpid returned the worker
  claimed   the spare, woken by the kernel (the dead worker's robust futex), claimed its place
            (src/worker/takeover.rs); absent when the monitor activated the spare
  sent      the monitor sent Activate to the spare
  received  the spare read Activate, or went on from its own claim
  listening the spare opened its accept loops' gates (sockets back in place)
  named     the spare took its new identity (title, log tag, thread names)
  accepted  the spare accepted its first connection
  parsed    the spare's HTTP stack handed the first request to the app
  first     a kept-alive client read the end of the first response from the spare
  probe     the new connection opened right after the kill (kills with a probe only: every other
            one, see examples/respawn_bench.rs) read the end of its response from the spare

Kills with and without a probe are laid out apart: with one, the spare's first accept is usually
the probe's connection; without, a kept-alive client's reconnection after its reset.

Usage: timeline.py RESULT.jsonl LOG [LOG...]   (one LOG per JSON line, in order)
"""
import json
import re
import statistics
import sys

STAGES = [
    ("kill", "reset"), ("reset", "woke"), ("kill", "woke"), ("kill", "notice"), ("kill", "closed"), ("woke", "sent"), ("sent", "received"), ("kill", "claimed"), ("claimed", "received"), ("received", "listening"),
    ("listening", "named"), ("named", "accepted"), ("accepted", "parsed"), ("parsed", "first"),
    ("kill", "first"), ("parsed", "probe"), ("kill", "probe"),
    # The replacement's capacity back: its gates open (it accepts), then its first accept.
    ("kill", "listening"), ("kill", "accepted"),
    # CPU time used by the monitor (woke -> sent) and the spare's thread (received -> ...).
    ("woke_cpu", "sent_cpu"), ("received_cpu", "listening_cpu"), ("listening_cpu", "named_cpu"),
    ("named_cpu", "accepted_cpu"), ("accepted_cpu", "parsed_cpu"), ("received_cpu", "parsed_cpu"),
    # Page faults of the spare's thread (minor and major) over the same spans.
    ("received_flt", "listening_flt"), ("listening_flt", "accepted_flt"),
    ("accepted_flt", "parsed_flt"),
]
FAULT_STAMPS = ("received_flt", "listening_flt", "accepted_flt", "parsed_flt")


def parse_log(path):
    """Events by pid: the monitor's about a child (child=/spare=), the spare's about itself."""
    by_pid = {}
    for line in open(path, errors="replace"):
        if "tine::respawn" not in line and "_us=" not in line:
            continue
        fields = dict(re.findall(r" (\w+)=(\S+)", line))
        def ev(pid, name, value):
            by_pid.setdefault(int(pid.rstrip(":")), {}).setdefault(name, int(value.rstrip(":")))
        if "reaped" in line and "reaped_us" in fields:
            ev(fields["child"], "reaped", fields["reaped_us"])
            ev(fields["child"], "woke", fields["woke_us"])
            if "woke_cpu_us" in fields:
                ev(fields["child"], "woke_cpu", fields["woke_cpu_us"])
        elif "death notice" in line and "woke_us" in fields:
            ev(fields["child"], "notice", fields["woke_us"])
            ev(fields["child"], "woke", fields["woke_us"])
            ev(fields["child"], "woke_cpu", fields["woke_cpu_us"])
        elif "channel closed" in line and "closed_us" in fields:
            ev(fields["child"], "closed", fields["closed_us"])
            ev(fields["child"], "woke", fields["woke_us"])
            ev(fields["child"], "woke_cpu", fields["woke_cpu_us"])
        elif "spare activated" in line and "sent_us" in fields:
            ev(fields["spare"], "sent", fields["sent_us"])
            ev(fields["spare"], "sent_cpu", fields["sent_cpu_us"])
        elif "claimed_us" in fields:
            ev(fields["pid"], "claimed", fields["claimed_us"])
        elif "received_us" in fields:
            ev(fields["pid"], "received", fields["received_us"])
            ev(fields["pid"], "listening", fields["listening_us"])
            ev(fields["pid"], "named", fields["named_us"])
            for k in ("received", "listening", "named"):
                ev(fields["pid"], k + "_cpu", fields[k + "_cpu_us"])
            for k in ("received", "listening"):
                if k + "_flt" in fields:
                    ev(fields["pid"], k + "_flt", fields[k + "_flt"])
        elif "accepted_us" in fields:
            ev(fields["pid"], "accepted", fields["accepted_us"])
            ev(fields["pid"], "accepted_cpu", fields["accepted_cpu_us"])
            if "accepted_flt" in fields:
                ev(fields["pid"], "accepted_flt", fields["accepted_flt"])
        elif "parsed_us" in fields:
            ev(fields["pid"], "parsed", fields["parsed_us"])
            ev(fields["pid"], "parsed_cpu", fields["parsed_cpu_us"])
            if "parsed_flt" in fields:
                ev(fields["pid"], "parsed_flt", fields["parsed_flt"])
    return by_pid


def q(xs, p):
    xs = sorted(xs)
    return xs[round((len(xs) - 1) * p)] if xs else float("nan")


VERBOSE = bool(__import__("os").environ.get("VERBOSE"))


def main():
    results = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    logs = sys.argv[2:]
    rows = []
    for result, log in zip(results, logs):
        events = parse_log(log)
        for r in result.get("rounds_timeline", []):
            victim, spare = events.get(r["victim"], {}), events.get(r["pid"], {})
            t = {"kill": r["kill_us"], "reset": r["reset_us"] or None, "first": r["first_us"],
                 "probe": r.get("probe_first_us") or None, "probing": r.get("probe", False)}
            for name in ("woke", "reaped", "closed", "notice", "woke_cpu"):
                t[name] = victim.get(name)
            for name in ("claimed", "sent", "received", "listening", "named", "accepted", "parsed",
                         "sent_cpu", "received_cpu", "listening_cpu", "named_cpu",
                         "accepted_cpu", "parsed_cpu", *FAULT_STAMPS):
                t[name] = spare.get(name)
            rows.append(t)
    for r in rows if VERBOSE else []:
        print(" ".join(f"{k}={r[k] - r['kill'] if r.get(k) else None}" for k in
                       ("reset", "woke", "closed", "sent", "received", "listening", "named",
                        "accepted", "parsed", "first", "reaped")))
    for title, part in (("kills with a new-connection probe", [r for r in rows if r["probing"]]),
                        ("kills without (kept-alive clients only)", [r for r in rows if not r["probing"]])):
        if not part:
            continue
        print(f"{len(part)} {title}")
        print(f"{'stage':<22} {'n':>4} {'median':>9} {'p10':>9} {'p90':>9}  (µs; _flt: page faults)")
        for a, b in STAGES:
            d = [r[b] - r[a] for r in part if r.get(a) is not None and r.get(b) is not None]
            if d:
                print(f"{a + ' -> ' + b:<22} {len(d):>4} {statistics.median(d):>9.0f} "
                      f"{q(d, .1):>9.0f} {q(d, .9):>9.0f}")
        print()


if __name__ == "__main__":
    main()
