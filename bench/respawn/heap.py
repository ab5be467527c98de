#!/usr/bin/env python3
"""kill -9 of a worker with a warm heap: how soon its kept-alive clients learn of the death, and
how soon a new connection is answered by another process.

Usage: heap.py TINE_BIN [--mb 256] [--rounds 5] [--env-a K=V,...] [--env-b K=V,...] [--out FILE]

Runs the `cache-demo` app (one worker, one spare) twice per round, variant A then B (each with its
environment), interleaved. Each run: warms the worker's heap to --mb MiB (`GET /cache/k` builds
a 256 KiB block per key in that worker), opens 4 kept-alive connections served by it, kills it
(SIGKILL) and times, from just before the kill:
  reset   each kept-alive connection's end (EOF or reset: the kernel closed the dead worker's
          connections), median of the 4;
  answer  a new connection's first `GET /` answered by another pid (retried at once on failure).
Bounded: every socket has a timeout, every run a deadline; the tree is stopped after each run.
"""
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

BLOCK_KB = 256


def opt(name, default):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def env_of(spec):
    return dict(kv.split("=", 1) for kv in spec.split(",") if kv)


def request(sock, path):
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower().decode()] = v.strip().decode()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return headers, body


def connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def one_run(tine, port, extra_env, mb):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINE_")}
    env.update(extra_env)
    ctl = f"/tmp/heap-bench-{port}.sock"
    proc = subprocess.Popen(
        [tine, "serve", "--listen", f"127.0.0.1:{port}", "--workers", "1", "--spare-workers", "1",
         "--app", "cache-demo", "--keys", str(max(1, mb * 1024 // BLOCK_KB)), "--block-kb",
         str(BLOCK_KB), "--debug-headers", "--control-socket", ctl],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                s = connect(port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("tine did not listen")
                time.sleep(0.02)
        headers, _ = request(s, "/")
        victim = int(headers["x-tine-worker"])
        for k in range(mb * 1024 // BLOCK_KB):
            h, _ = request(s, f"/cache/{k}")
            assert int(h["x-tine-worker"]) == victim
        kept = [s] + [connect(port) for _ in range(3)]
        for c in kept[1:]:
            h, _ = request(c, "/")
            assert int(h["x-tine-worker"]) == victim, "a kept-alive connection went elsewhere"
        # The spare must be standing by: wait for it in ctl status.
        deadline = time.monotonic() + 30
        while True:
            out = subprocess.run([tine, "ctl", "--control-socket", ctl, "status", "--json"],
                                 capture_output=True, text=True, timeout=10).stdout
            if '"standby"' in out or '"Standby"' in out:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("no spare stood by: " + out[:300])
            time.sleep(0.05)
        time.sleep(0.2)
        import select
        import threading
        answer = [None]

        def probe():
            while answer[0] is None and time.monotonic() - t0 < 5:
                try:
                    p = connect(port)
                    h, _ = request(p, "/")
                    if int(h["x-tine-worker"]) != victim:
                        answer[0] = time.monotonic() - t0
                    p.close()
                except OSError:
                    pass

        prober = threading.Thread(target=probe)
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        prober.start()
        resets, waiting = [], list(kept)
        while waiting and time.monotonic() - t0 < 5:
            ready, _, _ = select.select(waiting, [], [], 0.5)
            now = time.monotonic()
            for c in ready:
                resets.append(now - t0)
                waiting.remove(c)
        prober.join()
        answer = answer[0]
        return {"answer_us": round(answer * 1e6) if answer else None,
                "reset_us": round(statistics.median(resets) * 1e6),
                "reset_max_us": round(max(resets) * 1e6)}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main():
    tine = sys.argv[1]
    mb = int(opt("--mb", "256"))
    rounds = int(opt("--rounds", "5"))
    variants = {"A": env_of(opt("--env-a", "")), "B": env_of(opt("--env-b", ""))}
    out = open(opt("--out", "/dev/null"), "a")
    rows = {"A": [], "B": []}
    for r in range(rounds):
        for name, env in variants.items():
            row = one_run(tine, 19750 + r % 2 * 10 + (name == "B"), env, mb)
            row.update(variant=name, mb=mb, round=r)
            rows[name].append(row)
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(json.dumps(row), file=sys.stderr)
    for name in rows:
        for key in ("reset_us", "answer_us"):
            xs = [x[key] for x in rows[name] if x[key] is not None]
            print(f"{name} {variants[name]} {key}: median {statistics.median(xs)} "
                  f"min {min(xs)} max {max(xs)} (n={len(xs)})")


if __name__ == "__main__":
    main()
