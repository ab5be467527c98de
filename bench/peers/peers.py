#!/usr/bin/env python3
"""tine's peer suite: tine vs nginx, plain hyper, puma, unicorn, gunicorn and uWSGI on one `hello`
app shape. Run through bench/peers/run.sh (which installs and builds what this needs); see
bench/peers/README.md for what is measured and why. Writes bench/results/peers.md, peers.json and
the SVG charts bench/results/peers-*.svg. Standard library only.

Every process started here is killed on exit (its whole tree: every pid recorded while it ran),
every load is bounded (wrk -d and a timeout, the strict and open-loop clients stop by themselves).
"""
import json
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
APPS = os.path.join(HERE, "apps")
sys.path.insert(0, os.path.dirname(HERE))
from nginx_hello import nginx_hello_command  # noqa: E402 (bench/ is on the path only now)


def env_int(name, default):
    return int(os.environ.get(name, default))


def env_float(name, default):
    return float(os.environ.get(name, default))


ROUNDS = env_int("ROUNDS", 3)
DURATION = env_int("DURATION", 5)  # s per wrk run
WARMUP = env_int("WARMUP", 2)
CONNS = env_int("CONNS", 64)
# wrk threads in the shared phase (the pinned phase has one CPU for the client: always 1). One
# wrk thread can use one core only: at ~100% of it the client, not the server, sets the pace.
SHARED_WRK_THREADS = env_int("SHARED_WRK_THREADS", 1)
OPEN_SECONDS = env_float("OPEN_SECONDS", 8)
OPEN_CONNS = env_int("OPEN_CONNS", 32)
OPEN_FRACTIONS = [float(x) for x in os.environ.get("OPEN_FRACTIONS", "0.5,0.9").split(",")]
KILLS = env_int("KILLS", 7)
RELOADS = env_int("RELOADS", 3)
STRICT_CONNS = env_int("STRICT_CONNS", 16)
RELOAD_TIMEOUT = env_int("RELOAD_TIMEOUT", 90)  # puma's phased restart waits up to worker_shutdown_timeout (30 s) per worker
PORT_BASE = env_int("PORT_BASE", 19600)
PHASES = os.environ.get("PHASES", "shared,open-shared,reload,pinned,open-pinned,kill").split(",")
ONLY = [x for x in os.environ.get("ONLY", "").split(",") if x]
OUT_DIR = os.environ.get("OUT_DIR", os.path.join(ROOT, "bench", "results"))
TINE_BIN = os.environ.get("BENCH_TINE_BIN", os.path.join(ROOT, "target", "release", "tine"))
HYPER_BIN = os.path.join(ROOT, "bench", "hyper-hello", "target", "release", "hyper-hello")
LOADGEN = os.path.join(HERE, "loadgen", "target", "release", "peers-loadgen")
STATS_LUA = os.path.join(ROOT, "bench", "http", "stats.lua")
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVER_CPU, LOAD_CPU = "0", "1"


def log(msg):
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ processes
def children(pid):
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def descendants(pid):
    out, todo = [], children(pid)
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def is_holder(pid):
    """A tine worker's holder of its memory (`teardown_holder`): it shares its worker's address
    space and title, so it is neither a worker nor overhead, and its memory is its worker's."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(" (", 1)[1].rsplit(")", 1)[0] == "tine-holder"
    except (OSError, IndexError):
        return False


def smaps_kb(pid, key):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError):
        return 0


def get(port, timeout=1.0, method="GET"):
    """One request on a fresh connection: (status, body) or raises OSError."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"{method} / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            m = re.search(rb"(?i)content-length:\s*(\d+)", head)
            if sep and m and len(body) >= int(m.group(1)):
                break
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1."):
        raise OSError("no HTTP response")
    return int(head.split()[1]), body


class Server:
    """One server under test: how to start it, find its workers, reload it."""

    def __init__(self, name, label, kind, port, workers, pinned, work):
        self.name, self.label, self.kind, self.port = name, label, kind, port
        self.nworkers, self.pinned = workers, pinned
        self.dir = os.path.join(work, f"{name}-{'pinned' if pinned else 'shared'}")
        os.makedirs(self.dir, exist_ok=True)
        self.proc = None
        self.seen = set()  # every pid of its tree ever seen, killed at the end
        self.cmd, self.env, self.reload_sig, self.reload_how = self.command()

    def command(self):
        n, port, d = self.nworkers, self.port, self.dir
        env = {k: v for k, v in os.environ.items() if not k.startswith("TINE_")}
        if self.kind == "tine":
            extra = TINE_ALT_ARGS if self.name == "tine-alt" else []
            cmd = [TINE_BIN, "serve", "--listen", f"127.0.0.1:{port}", "--workers", str(n), "--app", "hello", *extra]
            return cmd, env, signal.SIGHUP, "`SIGHUP` (re-exec in place, every worker replaced)"
        if self.kind == "nginx":
            return (nginx_hello_command(d, port, n), env, signal.SIGHUP,
                    "`SIGHUP` (new workers, old ones finish and exit)")
        if self.kind == "hyper":
            return [HYPER_BIN, f"127.0.0.1:{port}", str(n)], env, None, "none (no supervisor: a restart is a new process)"
        if self.kind == "puma":
            env["RACK_ENV"] = "production"
            return (["puma", "-w", str(n), "-b", f"tcp://127.0.0.1:{port}", "-e", "production", "-q",
                     os.path.join(APPS, "hello.ru")], env, signal.SIGUSR1,
                    "`SIGUSR1` (phased restart: workers replaced one at a time)")
        if self.kind == "unicorn":
            with open(f"{d}/unicorn.conf.rb", "w") as f:
                f.write(f"worker_processes {n}\n")
            return (["unicorn", "-E", "production", "-l", f"127.0.0.1:{port}", "-c", f"{d}/unicorn.conf.rb",
                     os.path.join(APPS, "hello.ru")], env, signal.SIGHUP,
                    "`SIGHUP` (config reloaded, workers gracefully restarted)")
        if self.kind == "gunicorn":
            return (["gunicorn", "-w", str(n), "-b", f"127.0.0.1:{port}", "--chdir", APPS, "hello:application"], env,
                    signal.SIGHUP, "`SIGHUP` (new workers, old ones gracefully stopped)")
        if self.kind == "uwsgi":
            return (["uwsgi", "--plugin", "python3", "--master", "--processes", str(n), "--http11-socket",
                     f"127.0.0.1:{port}", "--wsgi-file", os.path.join(APPS, "hello.py"), "--die-on-term",
                     "--disable-logging"], env, signal.SIGHUP, "`SIGHUP` (graceful reload of master and workers)")
        raise ValueError(self.kind)

    def shown_cmd(self):
        s = " ".join(self.cmd).replace(self.dir, "$DIR").replace(ROOT + "/", "")
        return ("taskset -c 0 " if self.pinned else "") + s

    def start(self):
        full = (["taskset", "-c", SERVER_CPU] if self.pinned else []) + self.cmd
        self.out = open(os.path.join(self.dir, "server.log"), "w")
        self.proc = subprocess.Popen(full, cwd=self.dir, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid  # taskset execs the server: same pid

    def track(self):
        if self.proc is not None:
            self.seen.update([self.pid, *descendants(self.pid)])

    def workers(self):
        """Pids of the serving workers (tine: `tine worker[..]` titles; hyper: the process)."""
        if self.kind == "hyper":
            return [self.pid]
        kids = descendants(self.pid) if self.kind == "tine" else children(self.pid)
        if self.kind == "tine":
            return [p for p in kids if cmdline(p).startswith("tine worker[") and not is_holder(p)]
        return kids

    def overhead(self):
        """Pids that are not workers (master/monitor, molds, spares; not holders, whose memory
        is their worker's)."""
        if self.kind == "hyper":
            return []
        w = set(self.workers())
        return [self.pid] + [p for p in descendants(self.pid) if p not in w and not is_holder(p)]

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start-up: {self.log_tail()}")
            self.track()
            try:
                status, body = get(self.port, 0.5)
                expected = 1 if self.kind == "hyper" else self.nworkers  # hyper: one process, N threads
                if status == 200 and body == b"hello\n" and len(self.workers()) == expected:
                    if self.kind != "tine" or "tine ready" in self.log_text():
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready within {timeout}s: {self.log_tail()}")

    def log_text(self):
        try:
            with open(os.path.join(self.dir, "server.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self):
        return " | ".join(self.log_text().strip().splitlines()[-5:])

    def tree_ticks(self):
        return sum(ticks(p) for p in [self.pid, *descendants(self.pid)])

    def stop(self):
        if self.proc is None:
            return
        self.track()
        try:
            os.kill(self.pid, signal.SIGINT if self.kind == "uwsgi" else signal.SIGTERM)
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for p in self.seen:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None


# ------------------------------------------------------------------ machine
def machine_ticks():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # softirq (v[6]) counts as busy: without IRQ time accounting the loopback's softirq work done
    # in a task's context is in that task's stime too, so leaving it out made "other" too low.
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7], sum(v[:8])


def steal_ms():
    """CPU time the hypervisor gave to others while this VM's CPUs wanted to run (all CPUs, ms).

    On a shared host a few ms of steal in a 10 s run puts multi-ms stalls into every server's
    tail alike: a reader must see it beside the percentiles, not mistake it for the server's."""
    with open("/proc/stat") as f:
        v = f.readline().split()
    return int(v[8]) * 1000 // CLK_TCK if len(v) > 8 else 0


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


QUIET_WAIT = env_float("QUIET_WAIT", 5)
QUIET_MAX_BUSY = env_float("QUIET_MAX_BUSY", 15)


def wait_quiet(max_busy=QUIET_MAX_BUSY, wait=QUIET_WAIT):
    """Waits (bounded) for the machine to be at most max_busy% busy over 1 s; returns the last %."""
    deadline = time.monotonic() + wait
    while True:
        a = machine_ticks()
        time.sleep(1)
        b = machine_ticks()
        busy = 100 * (b[0] - a[0]) / max(1, b[1] - a[1])
        if busy <= max_busy or time.monotonic() >= deadline:
            return round(busy)


# ------------------------------------------------------------------ loads
def run_wrk(server, seconds, pinned):
    threads = 1 if pinned else SHARED_WRK_THREADS
    cmd = ["wrk", f"-t{threads}", f"-c{CONNS}", f"-d{seconds}s", "--latency", "-s", STATS_LUA, f"http://127.0.0.1:{server.port}/"]
    if pinned:
        cmd = ["taskset", "-c", LOAD_CPU] + cmd
    t0, m0, st0 = server.tree_ticks(), machine_ticks(), steal_ms()
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t1, m1, st1 = server.tree_ticks(), machine_ticks(), steal_ms()
    # wrk's own CPU (taskset execs it: the child is wrk): on shared cores wrk is one thread, and
    # when it uses a whole core the run measures the client as much as the server.
    wrk_cpu_s = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
    server.track()
    line = next((l for l in out.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk against {server.name} printed no result: {out[-300:]}")
    kv = dict(x.split("=") for x in line.split()[1:])
    n, dur = int(kv["requests"]), int(kv["duration_us"]) / 1e6
    busy_other = ((m1[0] - m0[0]) - (t1 - t0)) / max(1, m1[1] - m0[1])
    return {
        "req_s": n / dur, "requests": n,
        "p50_us": int(kv["p50_us"]), "p90_us": int(kv["p90_us"]), "p99_us": int(kv["p99_us"]),
        "max_us": int(kv["max_us"]),
        "errors": {k[4:]: int(v) for k, v in kv.items() if k.startswith("err_") and int(v)},
        "server_cpu_us_per_req": (t1 - t0) / CLK_TCK * 1e6 / max(1, n),
        "machine_busy_other_pct": round(100 * busy_other, 1),
        "wrk_cpu_pct_of_a_core": round(100 * wrk_cpu_s / dur, 1),
        "host_steal_ms": st1 - st0,
    }


def run_open(server, rate, pinned):
    cmd = [LOADGEN, "open", "--addr", f"127.0.0.1:{server.port}", "--rate", str(int(rate)),
           "--conns", str(OPEN_CONNS), "--seconds", str(OPEN_SECONDS), "--warmup", "1"]
    if pinned:
        cmd = ["taskset", "-c", LOAD_CPU] + cmd
    st0 = steal_ms()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=OPEN_SECONDS + 30)
    st1 = steal_ms()
    server.track()
    try:
        return {**json.loads(out.stdout.strip().splitlines()[-1]), "host_steal_ms": st1 - st0}
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"open-loop client failed against {server.name}: {out.stderr[-300:]}")


def measure_memory(server):
    def pss(pids):
        return [smaps_kb(p, "Pss") for p in pids]
    w, o = server.workers(), server.overhead()
    wp = [x for x in pss(w) if x is not None]
    op = [x for x in pss(o) if x is not None]
    return {
        "worker_pss_kb": wp, "worker_rss_kb": [smaps_kb(p, "Rss") for p in w],
        "overhead_pss_kb": op, "overhead_titles": [cmdline(p)[:60] for p in o],
        "worker_titles": [cmdline(p)[:60] for p in w],
        "total_pss_kb": sum(wp) + sum(op),
    }


def kill_to_serving(server):
    """kill -9 of the only worker, then requests on fresh connections until one is answered: ms."""
    samples, failed_tries = [], 0
    for i in range(KILLS):
        deadline = time.monotonic() + 30
        while len(server.workers()) != 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.name}: no single worker before kill {i}")
            time.sleep(0.02)
        time.sleep(0.3)  # let the previous replacement settle (not part of any measurement)
        victim = server.workers()[0]
        server.track()
        t0 = time.perf_counter()
        os.kill(victim, signal.SIGKILL)
        answered = None
        while time.perf_counter() - t0 < 30:
            try:
                status, body = get(server.port, 10.0)
                if status == 200:
                    answered = time.perf_counter()
                    break
            except OSError:
                failed_tries += 1
                time.sleep(0.0002)
        if answered is None:
            raise RuntimeError(f"{server.name}: nothing answered within 30 s of a kill -9")
        samples.append((answered - t0) * 1000)
        # The replacement must be a new process (not the killed one still answering).
        deadline = time.monotonic() + 30
        while not (len(server.workers()) == 1 and victim not in server.workers()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.name}: no replacement worker after kill {i}")
            time.sleep(0.01)
        server.track()
    return samples, failed_tries


def reload_losses(server):
    """Strict non-retrying POST load; RELOADS graceful reloads, each waited until every worker is new."""
    proc = subprocess.Popen([LOADGEN, "strict", "--addr", f"127.0.0.1:{server.port}", "--conns", str(STRICT_CONNS),
                             "--seconds", str(30 + RELOADS * (RELOAD_TIMEOUT + 5))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    durations, t_start = [], time.monotonic()
    try:
        line = proc.stdout.readline().strip()
        if line != "flowing":
            raise RuntimeError(f"strict client against {server.name}: {line!r}")
        time.sleep(1)
        for i in range(RELOADS):
            old = set(server.workers())
            server.track()
            t0 = time.monotonic()
            os.kill(server.pid, server.reload_sig)
            deadline = t0 + RELOAD_TIMEOUT
            while True:
                server.track()
                now = server.workers()
                if len(now) == server.nworkers and not (set(now) & old):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"reload {i + 1} had not replaced every worker after {RELOAD_TIMEOUT} s")
                time.sleep(0.01)
            durations.append(time.monotonic() - t0)
            time.sleep(1)  # steady load between reloads
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        out = proc.stdout.read()
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = json.loads(out.strip().splitlines()[-1])
    result["reload_seconds"] = durations
    result["load_seconds"] = time.monotonic() - t_start
    return result


# ------------------------------------------------------------------ the run
def tine_default_sched_batch():
    if not os.access(TINE_BIN, os.X_OK):
        return "true"
    out = subprocess.run([TINE_BIN, "serve", "--help"], capture_output=True, text=True).stdout
    m = re.search(r"--sched-batch.*?\[default: (\w+)\]", out, re.S)
    return m.group(1) if m else "true"


DEFAULT_BATCH = tine_default_sched_batch()
ALT_BATCH = "false" if DEFAULT_BATCH == "true" else "true"
# `tine-alt`: the same binary with other serve flags. By default the other scheduling policy
# (issue 13 goal 2 asks which default meets the tail goals); TINE_ALT_ARGS="--spare-workers 0" and
# the like make it a diagnostic of another setting instead (its label names the flags).
TINE_ALT_ARGS = os.environ.get("TINE_ALT_ARGS", "").split() or ["--sched-batch", ALT_BATCH]
TINE_ALT_LABEL = ("tine " + " ".join(TINE_ALT_ARGS) if os.environ.get("TINE_ALT_ARGS")
                  else f"tine sched_batch={ALT_BATCH}")

ALL = [
    ("tine", "tine", "tine"),
    ("tine-alt", TINE_ALT_LABEL, "tine"),
    ("nginx", "nginx", "nginx"),
    ("hyper", "hyper (plain)", "hyper"),
    ("puma", "puma", "puma"),
    ("unicorn", "unicorn", "unicorn"),
    ("gunicorn", "gunicorn", "gunicorn"),
    ("uwsgi", "uWSGI", "uwsgi"),
]
# The per-core/tail comparison (issue 13 goal 2) is among these; the others are in the peer charts.
CORE = ["tine", "tine-alt", "nginx", "hyper"]


def start_all(specs, workers, pinned, work, port0, servers):
    """Starts every server, appending each to `servers` at once (so a failure still stops them all)."""
    for i, (name, label, kind) in enumerate(specs):
        s = Server(name, label, kind, port0 + i, workers, pinned, work)
        servers.append(s)
        s.start()
    for s in servers:
        s.wait_ready()
        s.track()
    return servers


def interleaved(servers, rounds, f, what):
    out = {s.name: [] for s in servers}
    for r in range(rounds):
        for s in servers:
            busy = wait_quiet()
            res = f(s)
            res["machine_busy_before_pct"] = busy
            out[s.name].append(res)
            log(f"{what} round {r + 1} {s.name}: " + ", ".join(
                f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()
                if k in ("req_s", "p50_us", "p99_us", "p999_us", "achieved_rate", "send_lag_p99_us", "errors", "unsent")))
    return out


def main():
    specs = [s for s in ALL if not ONLY or s[0] in ONLY]
    kinds = {kind for _, _, kind in specs}
    for tool, kind in [(TINE_BIN, "tine"), (HYPER_BIN, "hyper"), (LOADGEN, None)]:
        if (kind is None or kind in kinds) and not os.access(tool, os.X_OK):
            sys.exit(f"missing {tool}: run bench/peers/run.sh (it builds it)")
    work = tempfile.mkdtemp(prefix="tine-bench-peers.")
    results = {"settings": {k: globals()[k] for k in (
        "ROUNDS", "DURATION", "WARMUP", "CONNS", "SHARED_WRK_THREADS", "OPEN_SECONDS", "OPEN_CONNS", "OPEN_FRACTIONS", "KILLS", "RELOADS",
        "STRICT_CONNS", "RELOAD_TIMEOUT", "PHASES", "QUIET_WAIT", "QUIET_MAX_BUSY")}, "default_sched_batch": DEFAULT_BATCH, "loadavg_before": loadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "servers": {}, "commands": {}}
    for name, label, kind in specs:
        results["servers"][name] = {"label": label, "kind": kind}
    live = []

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        for layout in ("shared", "pinned"):
            wanted = {"shared": {"shared", "open-shared", "reload"}, "pinned": {"pinned", "open-pinned", "kill"}}
            if not wanted[layout] & set(PHASES):
                continue
            pinned = layout == "pinned"
            workers = 1 if pinned else 2
            log(f"{layout}: starting {len(specs)} servers with {workers} worker(s) each"
                + (" on CPU 0 (load on CPU 1)" if pinned else ""))
            servers = live = []
            start_all(specs, workers, pinned, work, PORT_BASE + (20 if pinned else 0), servers)
            results["commands"][layout] = {s.name: s.shown_cmd() for s in servers}
            time.sleep(1)
            if not pinned:
                for s in servers:
                    results["servers"][s.name]["memory_idle"] = measure_memory(s)
                    results["servers"][s.name]["reload_how"] = s.reload_how
                    results["servers"][s.name]["headers"] = subprocess.run(
                        ["curl", "-s", "-i", f"http://127.0.0.1:{s.port}/"], capture_output=True, text=True
                    ).stdout.replace("\r", "")
            for s in servers:  # warm-up, discarded
                run_wrk(s, WARMUP, pinned)
            if layout in PHASES:
                results[f"wrk_{layout}"] = interleaved(servers, ROUNDS, lambda s: run_wrk(s, DURATION, pinned),
                                                       f"wrk {layout}")
            if f"open-{layout}" in PHASES:
                if "nginx" not in [s.name for s in servers]:
                    log("open-loop needs nginx's peak: skipped")
                else:
                    peak = results.get(f"wrk_{layout}", {}).get("nginx")
                    peak = statistics.median(r["req_s"] for r in peak) if peak else run_wrk(
                        next(s for s in servers if s.name == "nginx"), DURATION, pinned)["req_s"]
                    core = [s for s in servers if s.name in CORE]
                    if peak < 100:
                        raise RuntimeError(f"nginx's {layout} peak was {peak:.0f} req/s: the machine is too busy to measure")
                    results[f"open_{layout}"] = {"nginx_peak": peak, "by_fraction": {}}
                    for frac in OPEN_FRACTIONS:
                        rate = peak * frac
                        results[f"open_{layout}"]["by_fraction"][str(frac)] = interleaved(
                            core, ROUNDS, lambda s: run_open(s, rate, pinned), f"open {layout} {frac:.0%}")
            if layout == "shared" and "reload" in PHASES:
                results["reload"] = {}
                for s in servers:
                    if s.reload_sig is None:
                        continue
                    wait_quiet()
                    try:
                        r = reload_losses(s)
                    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as e:
                        log(f"reload {s.name} failed: {e}")
                        results.setdefault("failures", {})[f"reload {s.name}"] = str(e)
                        continue
                    results["reload"][s.name] = r
                    log(f"reload {s.name}: {len(r['lost'])} lost in {RELOADS} reloads, answered {r['answered']}, "
                        f"connect errors {r['connect_errors']}, reload s {[round(x, 2) for x in r['reload_seconds']]}")
            if layout == "pinned" and "kill" in PHASES:
                results["kill"] = {}
                for s in servers:
                    if s.kind == "hyper":
                        continue
                    try:
                        samples, failed = kill_to_serving(s)
                    except (RuntimeError, OSError) as e:
                        log(f"kill -9 {s.name} failed: {e}")
                        results.setdefault("failures", {})[f"kill {s.name}"] = str(e)
                        continue
                    results["kill"][s.name] = samples
                    results.setdefault("kill_failed_tries", {})[s.name] = failed
                    log(f"kill -9 {s.name}: ms {[round(x, 2) for x in samples]}, failed tries {failed}")
            for s in servers:
                s.stop()
            live = []
    except KeyboardInterrupt:
        log("interrupted")
        raise
    finally:
        for s in live:
            s.stop()
    results["loadavg_after"] = loadavg()
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, "peers.json"), "w") as f:
        json.dump(results, f, indent=1)
    log(f"wrote {OUT_DIR}/peers.json")


if __name__ == "__main__":
    main()
