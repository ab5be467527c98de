#!/usr/bin/env python3
"""gRPC benchmark: examples/grpc.rs under tine vs the same SayHello under tonic's own server.

    bench/grpc/run.py                 # builds, then ROUNDS x 2 servers x DURATION s, interleaved
    ROUNDS=7 DURATION=10 bench/grpc/run.py
    SKIP_BUILD=1 bench/grpc/run.py    # use the binaries already built

Writes bench/results/grpc.md (see bench/grpc/README.md for the why of each choice). Every process
it starts runs in its own process group and is killed on exit; every load is bounded by its
duration and a timeout.
"""

import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
ROUNDS = int(os.environ.get("ROUNDS", "5"))
DURATION = float(os.environ.get("DURATION", "5"))
WARMUP = float(os.environ.get("WARMUP", "2"))
CONNS = int(os.environ.get("CONNS", "4"))
PER_CONN = int(os.environ.get("PER_CONN", "16"))
WORKERS = int(os.environ.get("WORKERS", "2"))
SKIP_BUILD = os.environ.get("SKIP_BUILD") == "1"
OUT = os.environ.get("OUT", os.path.join(ROOT, "bench", "results", "grpc.md"))

TINE_BIN = os.path.join(ROOT, "target", "release", "examples", "grpc")
TONIC_BIN = os.path.join(HERE, "target", "release", "tonic-server")
LOAD_BIN = os.path.join(HERE, "target", "release", "grpc-load")
CLK_TCK = os.sysconf("SC_CLK_TCK")

started = []


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cleanup(*_):
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    started.clear()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(pid):
    """pid and all its descendants."""
    out = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            for child in f.read().split():
                out += tree(int(child))
    except FileNotFoundError:
        pass
    return out


def cpu_seconds(root):
    """utime + stime of root's whole tree (every thread), in seconds."""
    total = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except FileNotFoundError:
            pass
    return total / CLK_TCK


def wait_port(port, proc, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing listens on {port} after {timeout} s")


def start(cmd, port, workdir):
    proc = subprocess.Popen(
        cmd, cwd=workdir, stdout=subprocess.DEVNULL, stderr=open(os.path.join(workdir, f"{port}.log"), "w"),
        start_new_session=True,
    )
    started.append(proc)
    wait_port(port, proc)
    return proc


def load(port, seconds):
    out = subprocess.run(
        [LOAD_BIN, f"127.0.0.1:{port}", str(CONNS), str(PER_CONN), str(seconds)],
        capture_output=True, text=True, timeout=seconds + 60, check=True,
    )
    return json.loads(out.stdout)


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def build():
    log("building examples/grpc (release, --features tonic)")
    subprocess.run(["cargo", "build", "--quiet", "--release", "--example", "grpc", "--features", "tonic"],
                   cwd=ROOT, check=True)
    log("building bench/grpc (release)")
    subprocess.run(["cargo", "build", "--quiet", "--release", "--locked"], cwd=HERE, check=True)


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not SKIP_BUILD:
        build()
    for b in (TINE_BIN, TONIC_BIN, LOAD_BIN):
        if not os.access(b, os.X_OK):
            sys.exit(f"missing {b} (run without SKIP_BUILD=1)")
    workdir = tempfile.mkdtemp(prefix="tine-bench-grpc.")
    tine_port, tonic_port = free_port(), free_port()
    servers = {
        "tine": [TINE_BIN, "serve", "--listen", f"127.0.0.1:{tine_port}", "--workers", str(WORKERS),
                 "--control-socket", os.path.join(workdir, "ctl.sock")],
        "tonic": [TONIC_BIN, f"127.0.0.1:{tonic_port}", str(WORKERS)],
    }
    ports = {"tine": tine_port, "tonic": tonic_port}
    procs = {name: start(cmd, ports[name], workdir) for name, cmd in servers.items()}
    for name in servers:
        log(f"warming up {name}")
        load(ports[name], WARMUP)
    rows = []
    for r in range(ROUNDS):
        for name in servers:
            before_load = loadavg()
            cpu0 = cpu_seconds(procs[name].pid)
            result = load(ports[name], DURATION)
            cpu = cpu_seconds(procs[name].pid) - cpu0
            result.update(round=r + 1, server=name, loadavg=before_load, server_cpu_s=round(cpu, 2),
                          cpu_us_per_call=round(cpu * 1e6 / max(result["calls"], 1), 1))
            log(json.dumps(result))
            rows.append(result)
    cleanup()
    report(rows, servers)


def report(rows, servers):
    def stat(name, key):
        values = [r[key] for r in rows if r["server"] == name]
        return statistics.median(values), min(values), max(values)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    lines = [
        "# gRPC: tine (examples/grpc.rs) vs tonic's own server",
        "",
        f"Written by `bench/grpc/run.py` at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"commit {commit}; {os.cpu_count()} CPUs, {platform.release()}; "
        f"ROUNDS={ROUNDS} DURATION={DURATION} s CONNS={CONNS} PER_CONN={PER_CONN} WORKERS={WORKERS}.",
        "",
        "The machine is shared (other engineers building and testing; load average at each run's start"
        " below): the numbers are noisy, compare medians and look at the spread. The load generator"
        " (one current-thread tonic client process) runs on the same 2 cores as the server.",
        "",
        "| server | started as |",
        "|---|---|",
    ]
    for name, cmd in servers.items():
        shown = " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd)
        lines.append(f"| {name} | `{shown}` |")
    lines += [
        "",
        "Medians (min–max) over the rounds:",
        "",
        "| server | calls/s | server CPU µs per call | p50 µs | p99 µs | failures |",
        "|---|---|---|---|---|---|",
    ]
    for name in servers:
        cells = []
        for key in ("calls_per_s", "cpu_us_per_call", "p50_us", "p99_us"):
            med, lo, hi = stat(name, key)
            cells.append(f"{med:.0f} ({lo:.0f}–{hi:.0f})" if key != "cpu_us_per_call"
                         else f"{med:.1f} ({lo:.1f}–{hi:.1f})")
        failures = sum(r["failures"] for r in rows if r["server"] == name)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {failures} |")
    lines += ["", "Every run:", "", "| round | server | load avg | calls | calls/s | server CPU s | "
              "CPU µs/call | p50 µs | p90 µs | p99 µs | failures |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['round']} | {r['server']} | {r['loadavg']:.1f} | {r['calls']} | {r['calls_per_s']:.0f} "
                     f"| {r['server_cpu_s']} | {r['cpu_us_per_call']} | {r['p50_us']} | {r['p90_us']} "
                     f"| {r['p99_us']} | {r['failures']} |")
    with open(OUT, "w") as f:
        f.write("\n".join(lines) + "\n")
    log(f"wrote {OUT}")


if __name__ == "__main__":
    try:
        main()
    finally:
        cleanup()
