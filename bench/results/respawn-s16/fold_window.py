import json, sys, re, collections
d = json.loads(open(sys.argv[1]).readline())
rounds = d["rounds_timeline"]
win = {}
for r in rounds:
    win.setdefault(r["pid"], []).append((r["kill_us"], (r["probe_first_us"] or r["first_us"])))
head = re.compile(r"^(\S.*?)\s+(-?\d+)/(-?\d+)\s+([\d.]+):")
folded = collections.Counter(); leaf = collections.Counter(); n = 0
def flush(pid, t, stack):
    global n
    if pid in win and any(a <= t <= b for a, b in win[pid]):
        n += 1
        fr = [s for s in stack]
        leaf[fr[0] if fr else '?'] += 1
        folded[';'.join(reversed(fr[:14]))] += 1
cur = None; stack = []
for line in open(sys.argv[2]):
    m = head.match(line)
    if m:
        if cur: flush(cur[0], cur[1], stack)
        cur = (int(m.group(2)), float(m.group(4))*1e6); stack = []
    elif line.strip():
        parts = line.split(None, 1)
        stack.append(parts[1].strip() if len(parts) > 1 else '?')
if cur: flush(cur[0], cur[1], stack)
print("samples", n)
for k, v in leaf.most_common(40): print(v, k)
print()
incl = collections.Counter()
for st, v in folded.items():
    for f in set(st.split(';')): incl[f] += v
for k, v in incl.most_common(70): print(v, k)
