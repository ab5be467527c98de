"""Peers of the tine spawner benchmark: Python's concurrent.futures.ProcessPoolExecutor.

Prints one JSON object per measurement, like examples/spawner_bench.rs:
round-trip latency of a trivial job (submit().result(), one at a time) and throughput with
2 workers (map with chunksize=1), for the fork and forkserver start methods.
Usage: python3 peers.py [ROUNDS]
"""
import json
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor


def trivial(x):
    return x + 1


def report(name, samples):
    samples.sort()
    n = len(samples)
    pick = lambda q: samples[min(int(n * q), n - 1)] * 1e6
    print(json.dumps({"name": name, "n": n, "p50_us": pick(0.5), "p99_us": pick(0.99),
                      "mean_us": sum(samples) / n * 1e6}), flush=True)


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    for method in ("fork", "forkserver"):
        ctx = mp.get_context(method)
        with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as ex:
            for i in range(rounds // 10):
                ex.submit(trivial, i).result()
            samples = []
            for i in range(rounds):
                t = time.perf_counter()
                assert ex.submit(trivial, i).result() == i + 1
                samples.append(time.perf_counter() - t)
            report(f"python_{method}_latency", samples)
            jobs = rounds * 2
            t = time.perf_counter()
            total = sum(ex.map(trivial, range(jobs), chunksize=1))
            secs = time.perf_counter() - t
            assert total == sum(range(1, jobs + 1))
            print(json.dumps({"name": f"python_{method}_throughput", "jobs": jobs, "jobs_per_s": jobs / secs}),
                  flush=True)


if __name__ == "__main__":
    main()
