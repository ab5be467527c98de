#!/usr/bin/env python3
# Diagnostic for bench/results/chaos.md (session 13): run beside a chaos run, e.g.
#   bench/chaos/reapwatch.py 280 > /tmp/reapwatch.out
# Reads /proc/PID/task only of the dying (zombie) worker the monitor is reaping.
"""While the chaos test's monitor spins in its reap (kernel stack in shrink_dcache_parent/d_walk),
print who else is runnable or blocked and what the dying worker's remaining threads do."""
import os, sys, time
def rd(p):
    try:
        with open(p) as f: return f.read()
    except Exception: return ""
def stat(pid, tid=None):
    s = rd(f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat")
    if not s: return None
    comm = s[s.find('(')+1:s.rfind(')')]
    f = s[s.rfind(')')+2:].split()
    return comm, f[0], int(f[1]), int(f[15]) if len(f) > 15 else 0  # comm, state, ppid, prio-ish
def stack(path):
    return " < ".join(l.split()[1].split('+')[0] for l in rd(path).splitlines()[:10] if len(l.split()) > 1)
def monitor():
    for p in os.listdir('/proc'):
        if not p.isdigit(): continue
        st = stat(p)
        if st and st[0] == 'tine':
            par = stat(st[2])
            if par and par[0].startswith('chaos'): return int(p)
    return None
deadline = time.time() + float(sys.argv[1] if len(sys.argv) > 1 else 300)
mon = None; events = 0
while time.time() < deadline and events < 40:
    if mon is None or not os.path.exists(f"/proc/{mon}"):
        mon = monitor(); time.sleep(0.2); continue
    ms = rd(f"/proc/{mon}/stack")
    if "shrink_dcache_parent" not in ms and "d_walk" not in ms and "select_collect" not in ms:
        time.sleep(0.02); continue
    events += 1
    out = [f"=== {time.strftime('%H:%M:%S')} monitor {mon} in reap: {stack(f'/proc/{mon}/stack')}"]
    for p in os.listdir('/proc'):
        if not p.isdigit() or int(p) == mon: continue
        st = stat(p)
        if not st: continue
        comm, state, ppid, _ = st
        if ppid == mon and state in 'ZX':
            for t in os.listdir(f"/proc/{p}/task") if os.path.isdir(f"/proc/{p}/task") else []:
                ts = stat(p, t)
                if ts: out.append(f"  dying {p}/{t} ({ts[0]}) {ts[1]} sched={rd(f'/proc/{p}/task/{t}/schedstat').strip()} stack=[{stack(f'/proc/{p}/task/{t}/stack')}]")
        elif state in 'RD' and ppid != mon:
            out.append(f"  {state} {p} ({comm}) ppid={ppid} stack=[{stack(f'/proc/{p}/stack')}]")
    print("\n".join(out), flush=True)
    time.sleep(0.5)
