#!/usr/bin/env python3
"""Strict-client losses per graceful event: tine (each graceful path) and nginx (HUP, QUIT).

    bench/lossless/run.py                          # ~4 minutes; writes bench/results/lossless.{md,json}
    bench/lossless/run.py --tine-old PATH          # also a column for another tine build (e.g. an older main)
    bench/lossless/run.py --quick                  # 16 connections only, to bench/results/tmp/

The client is wrk sending POSTs with a small body (post.lua), which never retries a request: a
request written to a connection that the server then closes without a response is a read or write
error (or a timeout), counted here as lost. A `Connection: close` response is not an error (wrk
reconnects); a refused connect is not a request (wrk's "connect" errors are reported apart).

For each path and connection count: start the server (3 workers, `hello` app, or nginx with 3
workers and `return 200`), start wrk for a fixed time, wait one second, make the events happen
(waiting for each to complete: the new generation settled, the reload complete, the worker count
reached, the recycled workers exited), and read wrk's summary. Lost per event = lost / events.
Everything started is killed on exit; every load is bounded by wrk -d.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
POST_LUA = os.path.join(HERE, "post.lua")
sys.path.insert(0, os.path.dirname(HERE))
from nginx_hello import nginx_hello_command  # noqa: E402 (bench/ is on the path only now)
WORKERS = 3
SPARES = 1  # tine's default spare_workers: a settled tree has one hot spare standing by
EVENT_TIMEOUT = 30.0

STARTED = []  # Popen objects to kill on exit


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(what, timeout, f):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = f()
        if v:
            return v
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


def children(pid):
    try:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                             text=True, check=False).stdout
    except OSError:
        return []
    return [int(p) for p in out.split()]


def kill_tree(p):
    pids = [p.pid]
    i = 0
    while i < len(pids):
        pids.extend(children(pids[i]))
        i += 1
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


class Tine:
    def __init__(self, exe, extra, workers, work):
        self.port = free_port()
        self.ctl_sock = os.path.join(work, f"ctl-{self.port}.sock")
        self.log_path = os.path.join(work, f"tine-{self.port}.log")
        self.log = open(self.log_path, "w")
        self.cmd = [exe, "serve", "--listen", f"127.0.0.1:{self.port}", "--workers", str(workers),
                    "--control-socket", self.ctl_sock] + extra
        self.exe = exe
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=self.log,
                                     stdin=subprocess.DEVNULL, start_new_session=True, cwd=work)
        STARTED.append(self.proc)
        poll("tine ready", 20, lambda: "tine ready" in self.text())

    def text(self):
        with open(self.log_path) as f:
            return f.read()

    def status(self):
        out = subprocess.run([self.exe, "ctl", "--control-socket", self.ctl_sock, "status", "--json"],
                             capture_output=True, text=True, timeout=10)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def settled(self, workers):
        """(mold generation, worker pids) once the tree is one mold, `workers` ready workers of its
        generation and tine's default one hot spare of it standing by, nothing else; else None."""
        s = self.status()
        if not s:
            return None
        procs = [p for p in s["processes"] if p["role"] != "monitor"]
        molds = [p for p in procs if p["role"] == "mold"]
        ws = [p for p in procs if p["role"] == "worker"]
        spares = [p for p in procs if p["role"] == "spare"]
        if len(molds) != 1 or len(ws) != workers or len(spares) != SPARES or len(procs) != workers + SPARES + 1:
            return None
        g = molds[0]["generation"]
        if not all(w["generation"] == g and w["state"] in ("ready", "busy") for w in ws):
            return None
        if not all(p["generation"] == g and p["state"] == "standby" for p in spares):
            return None
        return g, sorted(w["pid"] for w in ws)

    def signal(self, sig):
        os.kill(self.proc.pid, sig)

    def ctl(self, *args):
        subprocess.run([self.exe, "ctl", "--control-socket", self.ctl_sock, *args], check=True,
                       capture_output=True, timeout=10)

    def stop(self):
        kill_tree(self.proc)
        self.log.close()


class Nginx:
    def __init__(self, work, workers):
        self.port = free_port()
        self.cmd = nginx_hello_command(os.path.join(work, f"nginx-{self.port}"), self.port, workers)
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        STARTED.append(self.proc)
        self.workers = workers
        poll("nginx workers", 10, lambda: len(children(self.proc.pid)) == workers and self.answers())

    def answers(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self):
        kill_tree(self.proc)


def wrk(port, connections, seconds):
    threads = 1 if connections <= 16 else 2
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
           "-s", POST_LUA, f"http://127.0.0.1:{port}/"]
    return cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)


class StrictLoad:
    """For the stop paths, where wrk cannot tell a refused connect from a lost request (both are
    "read" errors once the server is gone): the same strict client as tests/common/strict.rs, in
    threads. Each connection sends the POST, reads the whole response, never retries; it reconnects
    after `Connection: close` or a failure. A request written without a complete response is lost;
    a refused connect is not a request."""

    REQUEST = (b"POST / HTTP/1.1\r\nHost: localhost\r\n"
               b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 19\r\n\r\n"
               b"strict=1&lost=never")

    def __init__(self, port, connections):
        import threading
        self.port = port
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.requests = self.lost = self.connect_errors = self.non_2xx = 0
        self.threads = [threading.Thread(target=self.loop, daemon=True) for _ in range(connections)]
        for t in self.threads:
            t.start()

    def read_response(self, sock, buf):
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before the response head")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed inside the body")
            rest += chunk
        close = "close" in headers.get("connection", "").lower()
        return status, close, rest[length:]

    def loop(self):
        sock, buf = None, b""
        while not self.stopping.is_set():
            if sock is None:
                try:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                    buf = b""
                except OSError:
                    with self.lock:
                        self.connect_errors += 1
                    time.sleep(0.005)
                    continue
            try:
                sock.sendall(self.REQUEST)
                status, close, buf = self.read_response(sock, buf)
            except (OSError, ValueError, IndexError):
                with self.lock:
                    self.lost += 1
                sock.close()
                sock = None
                continue
            with self.lock:
                self.requests += 1
                self.non_2xx += status // 100 != 2
            if close:
                sock.close()
                sock = None
        if sock is not None:
            sock.close()

    def stop(self):
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=10)
        return {"requests": self.requests, "connect_errors": self.connect_errors,
                "read_errors": 0, "write_errors": 0, "timeouts": 0, "non_2xx": self.non_2xx,
                "lost": self.lost}


def parse_wrk(out):
    n = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    connect, read, write, timeout = map(int, errors.groups()) if errors else (0, 0, 0, 0)
    return {
        "requests": int(n.group(1)) if n else 0,
        "connect_errors": connect,
        "read_errors": read,
        "write_errors": write,
        "timeouts": timeout,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "lost": read + write + timeout,
    }


# ------------------------------------------------------------------------------------------------
# Events. Each returns the number of events it made happen, once all have completed.

def ev_refork(t, n=3):
    g, _ = poll("settled", EVENT_TIMEOUT, lambda: t.settled(WORKERS))
    for i in range(n):
        t.signal(signal.SIGUSR2)
        poll("new generation", EVENT_TIMEOUT,
             lambda: (s := t.settled(WORKERS)) and s[0] == g + i + 1)
    return n


def ev_reload(t, n=3):
    for i in range(n):
        t.signal(signal.SIGHUP)
        poll("reload complete", EVENT_TIMEOUT, lambda: t.text().count("reload complete") == i + 1)
    return n


def ev_ttou(t):
    for n in range(WORKERS - 1, 0, -1):  # 3 -> 2 -> 1: two events
        t.signal(signal.SIGTTOU)
        poll(f"{n} workers", EVENT_TIMEOUT, lambda: t.settled(n))
    return WORKERS - 1


def ev_scale(t):
    t.ctl("scale", "1")  # 3 -> 1: one command, two workers retired
    poll("1 worker", EVENT_TIMEOUT, lambda: t.settled(1))
    return 1


def recycles(reason):
    """Recycling happens by itself under the load: the events are the workers that exited
    recycled for `reason` while wrk ran (counted once it has finished)."""
    def ev(t):
        return lambda: len(re.findall(r"worker exited.*reason=" + reason, t.text()))
    return ev


def ev_term(t):
    t.signal(signal.SIGTERM)
    t.proc.wait(timeout=EVENT_TIMEOUT)
    return 1


TINE_PATHS = [
    # (name, extra serve args, event)
    ("USR2 refork (×3)", [], ev_refork),
    ("HUP reload (×3)", [], ev_reload),
    ("TTOU (3→2→1)", [], ev_ttou),
    ("ctl scale 3→1", [], ev_scale),
    ("max_requests = 3000", ["--max-requests", "3000"], recycles("max_requests")),
    ("max_lifetime = 1 s", ["--max-lifetime", "1"], recycles("max_lifetime")),
    ("max_cpu_seconds = 1", ["--max-cpu-seconds", "1"], recycles("max_cpu_seconds")),
    ("max_rss_mb = 1 (every worker over)", ["--max-rss-mb", "1"], recycles("max_rss_mb")),
    ("TERM (graceful stop)", [], ev_term),
]


def nginx_hup(ng, n=3):
    for _ in range(n):
        old = set(children(ng.proc.pid))
        os.kill(ng.proc.pid, signal.SIGHUP)
        poll("nginx reloaded", EVENT_TIMEOUT,
             lambda: (c := set(children(ng.proc.pid))) and not (c & old) and len(c) == ng.workers)
    return n


def nginx_quit(ng):
    os.kill(ng.proc.pid, signal.SIGQUIT)
    ng.proc.wait(timeout=EVENT_TIMEOUT)
    return 1


NGINX_PATHS = [("HUP reload (×3)", nginx_hup), ("QUIT (graceful stop)", nginx_quit)]


def run_one_stop(start, event, connections, seconds):
    """A stop path: the strict client (not wrk) until the server has exited."""
    server = start()
    try:
        load = StrictLoad(server.port, connections)
        time.sleep(1.0)  # load flowing (a bench warm-up, not a synchronization)
        t0 = time.monotonic()
        events = event(server)
        event_s = time.monotonic() - t0
        time.sleep(0.5)  # clients see the refusals
        r = load.stop()
        r.update(events=events, event_seconds=round(event_s, 2),
                 wrk=f"(bench/lossless/run.py StrictLoad, {connections} threads)")
        return r
    finally:
        server.stop()


def run_one(start, event, connections, seconds, work):
    if event in (ev_term, nginx_quit):
        return run_one_stop(start, event, connections, seconds)
    server = start()
    try:
        cmd, load = wrk(server.port, connections, seconds)
        time.sleep(1.0)  # load flowing (a bench warm-up, not a synchronization)
        t0 = time.monotonic()
        events = event(server)
        event_s = time.monotonic() - t0
        out, _ = load.communicate(timeout=seconds + 30)
        if callable(events):
            events = events()
        r = parse_wrk(out)
        r.update(events=events, event_seconds=round(event_s, 2), wrk=" ".join(cmd))
        return r
    finally:
        server.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tine", default=os.path.join(ROOT, "target", "release", "tine"))
    ap.add_argument("--tine-old", help="another tine build for comparison (e.g. the previous main)")
    ap.add_argument("--tine-old-label", default="tine (old)")
    ap.add_argument("--connections", default="16,256")
    ap.add_argument("--seconds", type=int, default=6, help="wrk duration per run")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args()
    if args.quick:
        args.connections = "16"
        args.out = os.path.join(ROOT, "bench", "results", "tmp")
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found (Debian: apt-get install -y wrk nginx-light)")
    conns = [int(c) for c in args.connections.split(",")]
    work = tempfile.mkdtemp(prefix="tine-bench-lossless.")
    builds = [("tine", args.tine)]
    if args.tine_old:
        builds.append((args.tine_old_label, args.tine_old))
    results = []
    try:
        for name, extra, event in TINE_PATHS:
            for c in conns:
                for label, exe in builds:
                    r = run_one(lambda: Tine(exe, extra, WORKERS, work), event, c, args.seconds, work)
                    r.update(server=label, path=name, connections=c,
                             command=f"tine serve --workers {WORKERS} {' '.join(extra)}".strip())
                    print(json.dumps(r), flush=True)
                    results.append(r)
        for name, event in NGINX_PATHS:
            for c in conns:
                r = run_one(lambda: Nginx(work, WORKERS), event, c, args.seconds, work)
                r.update(server="nginx", path=name, connections=c,
                         command=f"nginx, {WORKERS} workers, return 200")
                print(json.dumps(r), flush=True)
                results.append(r)
    finally:
        for p in STARTED:
            if p.poll() is None:
                kill_tree(p)
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lossless.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_report(results, builds, conns, args, os.path.join(args.out, "lossless.md"))


def machine():
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    nginx_v = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    return (f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}; "
            f"{wrk_v.strip()}; {nginx_v}")


def write_report(results, builds, conns, args, path):
    lines = [
        "# Strict-client losses per graceful event",
        "",
        f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {machine()}.",
        "The machine was shared with other builds and tests: throughput varies; losses are what",
        "this file is about.",
        "",
        "Command: `bench/lossless/run.py " + " ".join(sys.argv[1:]) + "` (wrk -t1 for 16 connections,",
        f"-t2 for 256, {args.seconds} s per run, POST with a 19-byte body, `--timeout 5s`; see the",
        "script's docstring). *Lost* = wrk's read + write errors + timeouts: requests written that got",
        "no response. A refused connect is no request (a stopped server refuses new connections).",
        "",
        "| server | path | connections | events | requests | lost | lost per event | connect errors | non-2xx |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        per = r["lost"] / r["events"] if r["events"] else float("nan")
        lines.append(
            f"| {r['server']} | {r['path']} | {r['connections']} | {r['events']} | {r['requests']} | "
            f"{r['lost']} | {per:.1f} | {r['connect_errors']} | {r['non_2xx']} |")
    lines += ["", "Raw results: `lossless.json` (with each run's exact wrk command).", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
