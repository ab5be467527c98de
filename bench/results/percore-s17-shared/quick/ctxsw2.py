import os, sys, glob, time, json, collections
sys.path.insert(0, "/work/main/bench/peers")
os.environ.setdefault("SHARED_WRK_THREADS", "2")
import peers
def per_thread(pids):
    out = {}
    for p in pids:
        title = peers.cmdline(p)[:28]
        for st in glob.glob(f"/proc/{p}/task/*/status"):
            try:
                d = {}
                for l in open(st):
                    k, _, v = l.partition(":")
                    d[k] = v.strip()
                tid = st.split("/")[4]
                stat = open(f"/proc/{p}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
                out[(p, tid)] = (title, d["Name"], int(d["voluntary_ctxt_switches"]), int(d["nonvoluntary_ctxt_switches"]), int(stat[11]) + int(stat[12]))
            except (OSError, KeyError): pass
    return out
name = sys.argv[1]; rounds = int(sys.argv[2])
servers = []
try:
    peers.start_all([(name, name, name.split("-")[0])], 2, False, "/work/notes/ctx", 19710, servers)
    s = servers[0]
    for r in range(rounds):
        peers.wait_quiet()
        pids = [s.pid, *peers.descendants(s.pid)]
        a = per_thread(pids)
        import threading, subprocess, re
        split = {}
        def sample():
            time.sleep(2.5)
            out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{s.port} )"], capture_output=True, text=True).stdout
            for pid in re.findall(r"pid=(\d+)", out):
                split[pid] = split.get(pid, 0) + 1
        th = threading.Thread(target=sample); th.start()
        res = peers.run_wrk(s, 5, False)
        th.join()
        print("   connections per pid:", split)
        b = per_thread(pids)
        n = res["requests"]
        print(f"round {r}: {res['req_s']:.0f} req/s cpu/req {res['server_cpu_us_per_req']:.2f}")
        for k in sorted(b):
            if k in a:
                t, nm, v, iv, cpu = b[k]; _, _, v0, iv0, cpu0 = a[k]
                if v - v0 + iv - iv0 > 50 or cpu - cpu0 > 5:
                    print(f"   {k[0]:>7} {t:28} {nm:16} vol/kreq {1000*(v-v0)/n:7.1f} invol/kreq {1000*(iv-iv0)/n:7.1f} cpu_ticks {cpu-cpu0}")
finally:
    for s in servers: s.stop()
