import os, sys, json, time, subprocess, re, threading
sys.path.insert(0, "/work/main/bench/peers")
os.environ.setdefault("SHARED_WRK_THREADS", "2")
import peers
rounds = int(sys.argv[1])
servers = []
try:
    peers.TINE_BIN = "/tmp/bins/tine-even"
    peers.start_all([("tine", "tine", "tine"), ("hyper", "hyper", "hyper")], 2, False, "/work/notes/even", 19900, servers)
    # the even variant: same binary, env switch
    env = dict(os.environ, TINE_EXP_BAL_EVEN="1")
    ev = peers.Server("tine-even", "tine-even", "tine", 19910, 2, False, "/work/notes/even")
    ev.env["TINE_EXP_BAL_EVEN"] = "1"
    servers.append(ev); ev.start(); ev.wait_ready(); ev.track()
    for s in servers: peers.run_wrk(s, 2, False)
    res = {s.name: [] for s in servers}
    for r in range(rounds):
        for s in servers:
            peers.wait_quiet()
            split = {}
            def sample():
                time.sleep(2.5)
                out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{s.port} )"], capture_output=True, text=True).stdout
                for pid in re.findall(r"pid=(\d+)", out): split[pid] = split.get(pid, 0) + 1
            th = threading.Thread(target=sample); th.start()
            x = peers.run_wrk(s, 5, False); th.join()
            res[s.name].append(x["req_s"])
            print(r, s.name, round(x["req_s"]), round(x["server_cpu_us_per_req"], 2), x["p99_us"], sorted(split.values()), flush=True)
    for k, v in res.items():
        v2 = sorted(v); print(k, "median", round(v2[len(v2)//2]))
    for k in ("tine", "tine-even"):
        rs = sorted(a / b for a, b in zip(res[k], res["hyper"])); print(k, "/hyper median", round(rs[len(rs)//2], 3), round(rs[0], 3), round(rs[-1], 3))
finally:
    for s in servers: s.stop()
