#!/usr/bin/env bash
# Static files: tine `--app static` vs nginx (nginx-light, sendfile on), side by side in one run.
#
#   bench/static/run.sh          # ~5 minutes with the defaults; writes bench/results/static.md
#
# What it does:
#   1. builds tine (cargo build --release) unless SKIP_BUILD=1;
#   2. makes a root with one file of each size (12 B, 1 KiB, 64 KiB, 1 MiB, 16 MiB; random bytes);
#   3. starts on loopback tine (serve --workers 2 --app static --root DIR) and nginx (2 workers,
#      sendfile on, tcp_nopush on, no access log, same root);
#   4. checks both serve every file byte for byte (sha256 of a curl download);
#   5. warms both up, then for ROUNDS rounds runs wrk -c$CONNS against each size, tine and nginx
#      interleaved (size by size inside a round), recording req/s, p50/p99, wrk's errors by kind
#      and the CPU time the server's whole process tree used per request (bench/static/cpu.py:
#      every thread's schedstat, in nanoseconds), with the time its threads waited for a CPU and
#      how long wrk overran its duration (both say when the machine, not the server, stalled);
#   6. writes the report on top of OUT's earlier ones: machine, load average, command, per-round
#      table, medians with min-max, ratios tine/nginx.
# Every process it starts is killed on exit (trap EXIT); every load is bounded by wrk -d and timeout.
#
# Knobs (environment): ROUNDS=3 DURATION=4 (s per wrk run) WARMUP=1 CONNS=16 WRK_THREADS=1
#   SIZES="12 1024 65536 1048576 16777216" PORT_BASE=18180 SKIP_BUILD=0
#   OUT=bench/results/static.md (the new report goes on top, earlier ones stay below; KEEP_EARLIER=0
#   replaces the file)  BENCH_TINE_BIN=path (another build; shows in the report)
#   BENCH_TINE_ARGS="--sched-batch false" (extra serve flags; shown in the report's tine command)
#   BENCH_TINE_BEFORE_BIN=path (optional: an older build, run as a third server "before", same
#   flags, interleaved with the others, so a change is seen against the same noise)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"

ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-4}"
WARMUP="${WARMUP:-1}"
CONNS="${CONNS:-16}"
WRK_THREADS="${WRK_THREADS:-1}"
SIZES="${SIZES:-12 1024 65536 1048576 16777216}"
PORT_BASE="${PORT_BASE:-18180}"
SKIP_BUILD="${SKIP_BUILD:-0}"
OUT="${OUT:-$ROOT/bench/results/static.md}"
KEEP_EARLIER="${KEEP_EARLIER:-1}"
TINE_BIN="${BENCH_TINE_BIN:-$ROOT/target/release/tine}"
TINE_PORT=$((PORT_BASE + 1))
NGINX_PORT=$((PORT_BASE + 2))
BEFORE_PORT=$((PORT_BASE + 3))
BEFORE_BIN="${BENCH_TINE_BEFORE_BIN:-}"

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

WORK="$(mktemp -d /tmp/tine-bench-static.XXXXXX)"
STARTED=()
descendants() {
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$child"
        descendants "$child"
    done
}
stop_tree() {
    local root="$1" pids p i
    pids="$root $(descendants "$root" | tr '\n' ' ')"
    kill -TERM "$root" 2>/dev/null || return 0
    for i in $(seq 1 30); do
        kill -0 "$root" 2>/dev/null || break
        sleep 0.1
    done
    for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done
    wait "$root" 2>/dev/null || true
}
cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${STARTED[@]}"; do stop_tree "$pid"; done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for tool in wrk nginx curl python3 ps ss sha256sum; do
    command -v "$tool" >/dev/null || die "'$tool' not found (Debian: apt-get install -y wrk nginx-light curl procps iproute2)"
done
for port in "$TINE_PORT" "$NGINX_PORT" "$BEFORE_PORT"; do
    ss -Htln "sport = :$port" | grep -q . && die "port $port is in use; set PORT_BASE"
done
if [[ "$SKIP_BUILD" != 1 ]]; then
    log "building tine (cargo build --release --bin tine)"
    (cd "$ROOT" && cargo build --release --bin tine) >"$WORK/build.log" 2>&1 || {
        tail -20 "$WORK/build.log" >&2
        die "tine does not build"
    }
fi
[[ -x "$TINE_BIN" ]] || die "missing $TINE_BIN"

# ---------------------------------------------------------------- files
DOCS="$WORK/docs"
mkdir -p "$DOCS"
chmod 755 "$WORK" "$DOCS" # nginx's workers run as nobody when started by root
for size in $SIZES; do head -c "$size" /dev/urandom >"$DOCS/f$size.bin"; done
echo "<p>index</p>" >"$DOCS/index.html"

wait_port() { # name port pid
    local i
    for i in $(seq 1 300); do
        kill -0 "$3" 2>/dev/null || return 1
        curl -sf -o /dev/null -m 1 "http://127.0.0.1:$2/index.html" && return 0
        sleep 0.1
    done
    return 1
}

read -r -a TINE_EXTRA_ARGS <<<"${BENCH_TINE_ARGS:-}"
TINE_CMD=("$TINE_BIN" serve --listen "127.0.0.1:$TINE_PORT" --workers 2 --app static --root "$DOCS" "${TINE_EXTRA_ARGS[@]}")
unset_env=()
for v in $(compgen -e | grep '^TINE_' || true); do unset_env+=(-u "$v"); done
(cd "$WORK" && exec env "${unset_env[@]}" "${TINE_CMD[@]}") >"$WORK/tine.out" 2>"$WORK/tine.err" </dev/null &
TINE_PID=$!
STARTED+=("$TINE_PID")
wait_port tine "$TINE_PORT" "$TINE_PID" || {
    tail -20 "$WORK/tine.err" >&2
    die "tine does not serve"
}
for i in $(seq 1 300); do
    grep -q 'tine ready' "$WORK/tine.err" "$WORK/tine.out" && break
    sleep 0.1
done
SERVERS=(tine nginx)
if [[ -n "$BEFORE_BIN" ]]; then
    [[ -x "$BEFORE_BIN" ]] || die "missing $BEFORE_BIN"
    BEFORE_CMD=("$BEFORE_BIN" serve --listen "127.0.0.1:$BEFORE_PORT" --control-socket "$WORK/before.sock" --workers 2 --app static --root "$DOCS" "${TINE_EXTRA_ARGS[@]}")
    (cd "$WORK" && exec env "${unset_env[@]}" "${BEFORE_CMD[@]}") >"$WORK/before.out" 2>"$WORK/before.err" </dev/null &
    BEFORE_PID=$!
    STARTED+=("$BEFORE_PID")
    wait_port before "$BEFORE_PORT" "$BEFORE_PID" || {
        tail -20 "$WORK/before.err" >&2
        die "the before build does not serve"
    }
    SERVERS+=(before)
fi
port_of() { case "$1" in tine) echo "$TINE_PORT" ;; nginx) echo "$NGINX_PORT" ;; before) echo "$BEFORE_PORT" ;; esac; }
pid_of() { case "$1" in tine) echo "$TINE_PID" ;; nginx) echo "$NGINX_PID" ;; before) echo "$BEFORE_PID" ;; esac; }

NG="$WORK/nginx"
mkdir -p "$NG/logs" "$NG/tmp"
cat >"$NG/nginx.conf" <<EOF
worker_processes 2;
daemon off;
master_process on;
pid $NG/nginx.pid;
error_log $NG/logs/error.log warn;
events { worker_connections 4096; }
http {
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path $NG/tmp/body;
    proxy_temp_path $NG/tmp/proxy;
    fastcgi_temp_path $NG/tmp/fastcgi;
    uwsgi_temp_path $NG/tmp/uwsgi;
    scgi_temp_path $NG/tmp/scgi;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        root $DOCS;
    }
}
EOF
NGINX_CMD=(nginx -p "$NG" -c "$NG/nginx.conf" -e "$NG/logs/error.log")
"${NGINX_CMD[@]}" -t >"$WORK/nginx-t.log" 2>&1 || {
    cat "$WORK/nginx-t.log" >&2
    die "nginx config test failed"
}
"${NGINX_CMD[@]}" >"$WORK/nginx.out" 2>&1 </dev/null &
NGINX_PID=$!
STARTED+=("$NGINX_PID")
wait_port nginx "$NGINX_PORT" "$NGINX_PID" || die "nginx does not serve"

for size in $SIZES; do
    want="$(sha256sum <"$DOCS/f$size.bin" | cut -d' ' -f1)"
    for name in "${SERVERS[@]}"; do
        port="$(port_of "$name")"
        got="$(curl -sf -m 20 "http://127.0.0.1:$port/f$size.bin" | sha256sum | cut -d' ' -f1)"
        [[ "$got" == "$want" ]] || die "port $port serves f$size.bin wrong"
    done
done
curl -s -D - -o /dev/null "http://127.0.0.1:$TINE_PORT/f12.bin" | tr -d '\r' >"$WORK/headers-tine.txt"
curl -s -D - -o /dev/null "http://127.0.0.1:$NGINX_PORT/f12.bin" | tr -d '\r' >"$WORK/headers-nginx.txt"

# ---------------------------------------------------------------- load
RAW="$WORK/rounds.tsv"
printf 'round\tsize\tserver\treq_s\tp50_us\tp99_us\terrors\tserver_cpu_s\trequests\terr_kinds\trunq_s\twrk_overrun_s\tcpu_source\twrk_cpu_s\n' >"$RAW"
run_one() { # round size name port pid
    local out="$WORK/wrk-$3-$2-$1.txt" log_at
    log_at="$(wc -l <"$(log_of "$3")")"
    python3 "$HERE/cpu.py" snapshot "$5" >"$WORK/cpu0.json"
    # wrk's own CPU (user and system, of every thread) too: on loopback the kernel charges part of
    # one side's TCP work to the other, so server + wrk is the fair total.
    local TIMEFORMAT='%3U %3S'
    { time timeout -k 5 $((DURATION + 30)) wrk -t"$WRK_THREADS" -c"$CONNS" -d"$DURATION"s --latency \
        -s "$ROOT/bench/http/stats.lua" "http://127.0.0.1:$4/f$2.bin" >"$out" 2>&1; } 2>"$WORK/wrk.time" ||
        die "wrk against $3 failed: $(tail -3 "$out")"
    python3 "$HERE/cpu.py" snapshot "$5" >"$WORK/cpu1.json"
    kill -0 "$5" 2>/dev/null || die "$3 died during the run"
    python3 - "$1" "$2" "$3" "$out" "$(python3 "$HERE/cpu.py" diff "$WORK/cpu0.json" "$WORK/cpu1.json")" "$DURATION" "$(awk '{print $1 + $2}' "$WORK/wrk.time")" >>"$RAW" <<'PY'
import sys
rnd, size, name, path, cpu, duration, wrk_cpu = sys.argv[1:]
cpu_s, runq_s, source = cpu.split()
line = next(l for l in open(path) if l.startswith("RESULT "))
kv = dict(x.split("=") for x in line.split()[1:])
n, dur = int(kv["requests"]), int(kv["duration_us"]) / 1e6
kinds = {k[4:]: int(v) for k, v in kv.items() if k.startswith("err_") and int(v)}
errs = sum(kinds.values())
# wrk's own thread stops within 0.1 s of the duration: more means wrk itself did not run.
overrun = max(0.0, dur - float(duration))
print("\t".join(map(str, [rnd, size, name, round(n / dur, 1), kv["p50_us"], kv["p99_us"], errs,
                          cpu_s, n, ",".join(f"{k}={v}" for k, v in kinds.items()) or "-",
                          runq_s, round(overrun, 2), source, wrk_cpu])))
PY
    if [[ "$(tail -1 "$RAW" | cut -f7)" != 0 ]]; then
        # Keep what the server said during a run with errors (tine's log; nginx's error log).
        {
            echo "== round $1, $2 B, $3"
            tail -n +"$((log_at + 1))" "$(log_of "$3")" | { grep -v ' INFO ' || echo "(nothing)"; } | tail -20
        } >>"$WORK/errors.log"
    fi
    tail -1 "$RAW" | awk -F'\t' '{printf "  round %s %9s B %-6s %10s req/s  p50 %7s us  p99 %7s us  errors %s (%s)  server cpu %ss  run-queue wait %ss  wrk overran %ss\n", $1, $2, $3, $4, $5, $6, $7, $10, $8, $11, $12}' >&2
}
log_of() { case "$1" in tine) echo "$WORK/tine.err" ;; nginx) echo "$NG/logs/error.log" ;; before) echo "$WORK/before.err" ;; esac; }
touch "$WORK/errors.log"

LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
log "warm-up ${WARMUP}s per server and size"
for size in $SIZES; do
    for name in "${SERVERS[@]}"; do
        port="$(port_of "$name")"
        timeout -k 5 $((WARMUP + 30)) wrk -t1 -c"$CONNS" -d"$WARMUP"s "http://127.0.0.1:$port/f$size.bin" >/dev/null 2>&1 ||
            die "warm-up failed on port $port"
    done
done
log "measuring: $ROUNDS rounds x sizes ($SIZES) x 2 servers x ${DURATION}s"
for round in $(seq 1 "$ROUNDS"); do
    for size in $SIZES; do
        # Rotate who goes first, so no server always runs right after another.
        n=${#SERVERS[@]}
        for k in $(seq 0 $((n - 1))); do
            name="${SERVERS[$(((round + k) % n))]}"
            run_one "$round" "$size" "$name" "$(port_of "$name")" "$(pid_of "$name")"
        done
    done
done
LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------- report
mkdir -p "$(dirname "$OUT")"
export B_DATE="$(date -u '+%F %T UTC')" B_NPROC="$(nproc)" B_KERNEL="$(uname -srm)"
export B_CPU="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
export B_MEM="$(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
export B_NGINX="$(nginx -v 2>&1)" B_WRK="$(wrk -v 2>&1 | head -1)"
export B_COMMIT="$(cd "$ROOT" && git rev-parse --short HEAD)$(cd "$ROOT" && git diff --quiet HEAD || echo '+dirty')"
export B_LOAD_BEFORE="$LOAD_BEFORE" B_LOAD_AFTER="$LOAD_AFTER"
export B_BEFORE="${BEFORE_BIN:+${BEFORE_CMD[*]}}"
export B_CMD="${BENCH_TINE_BEFORE_BIN:+BENCH_TINE_BEFORE_BIN=$BENCH_TINE_BEFORE_BIN }${BENCH_TINE_ARGS:+BENCH_TINE_ARGS=\"$BENCH_TINE_ARGS\" }ROUNDS=$ROUNDS DURATION=$DURATION CONNS=$CONNS bench/static/run.sh"
export B_TINE_CMD="${TINE_CMD[*]}" B_WRK_CMD="wrk -t$WRK_THREADS -c$CONNS -d${DURATION}s --latency URL"
python3 - "$RAW" "$WORK/headers-tine.txt" "$WORK/headers-nginx.txt" "$WORK/errors.log" >"$WORK/report.md" <<'PY'
import os, statistics, sys
from collections import defaultdict
raw, htine, hnginx, errlog = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(raw)][1:]
by = defaultdict(list)
for r in rows:
    by[(int(r[1]), r[2])].append(r)
def human(n):
    for unit, f in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= f and n % f == 0:
            return f"{n // f} {unit}"
    return f"{n} B"
def med(rs, i, f=float):
    v = [f(r[i]) for r in rs]
    return statistics.median(v), min(v), max(v)
e = os.environ
print("# Static files: tine vs nginx (sendfile on)\n")
print(f"- date: {e['B_DATE']}; tine commit {e['B_COMMIT']}")
print(f"- machine: {e['B_CPU']}, {e['B_NPROC']} cores, {e['B_MEM']}, {e['B_KERNEL']}")
print(f"- load average (1/5/15 min) before: {e['B_LOAD_BEFORE']}; after: {e['B_LOAD_AFTER']} "
      "(the machine is shared with other builds: treat small differences as noise)")
print(f"- {e['B_NGINX']}; {e['B_WRK']}")
print(f"- command: `{e['B_CMD']}`")
print(f"- tine: `{e['B_TINE_CMD']}`; nginx: 2 workers, sendfile on, tcp_nopush on, access_log off")
if e.get("B_BEFORE"):
    print(f"- before (an older tine build, same flags): `{e['B_BEFORE']}`")
print(f"- load: `{e['B_WRK_CMD']}` on the same machine, the servers interleaved in every round\n")
print("## Medians (min-max over rounds)\n")
print("Ratios are against nginx in the same round: req/s ratio (median of the per-round ratios, "
      "their min-max), and CPU per request ratio (below 1: less CPU than nginx per request).\n")
print("| size | server | req/s | req/s ratio | p50 / p99 µs | CPU µs/req | CPU ratio | with wrk's µs/req | with wrk's ratio | errors |")
print("|---|---|---|---|---|---|---|---|---|---|")
def cpu_of(r):
    return float(r[7]) / max(1, int(r[8])) * 1e6
def both_of(r):
    return (float(r[7]) + float(r[13])) / max(1, int(r[8])) * 1e6
names = [x for x in ("tine", "before", "nginx") if any(k[1] == x for k in by)]
for size in sorted({k[0] for k in by}):
    n = {r[0]: r for r in by[(size, "nginx")]}
    for name in names:
        rs = by[(size, name)]
        req = med(rs, 3)
        cpu = statistics.median(cpu_of(r) for r in rs)
        both = statistics.median(both_of(r) for r in rs)
        if name == "nginx":
            ratio, cratio, bratio = "1", "1", "1"
        else:
            rr = sorted(float(r[3]) / float(n[r[0]][3]) for r in rs if r[0] in n)
            cr = sorted(cpu_of(r) / max(1e-9, cpu_of(n[r[0]])) for r in rs if r[0] in n)
            ratio = f"**{statistics.median(rr):.2f}×** ({rr[0]:.2f}-{rr[-1]:.2f})"
            cratio = f"**{statistics.median(cr):.2f}** ({cr[0]:.2f}-{cr[-1]:.2f})"
            br = sorted(both_of(r) / max(1e-9, both_of(n[r[0]])) for r in rs if r[0] in n)
            bratio = f"**{statistics.median(br):.2f}** ({br[0]:.2f}-{br[-1]:.2f})"
        kinds = defaultdict(int)
        for r in rs:
            for kv in filter(None, r[9].split(",")) if r[9] != "-" else []:
                k, v = kv.split("=")
                kinds[k] += int(v)
        errs = sum(kinds.values())
        if errs:
            errs = f"{errs} ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})"
        print(f"| {human(size)} | {name} | {req[0]:,.0f} ({req[1]:,.0f}-{req[2]:,.0f}) | {ratio} "
              f"| {med(rs, 4)[0]:.0f} / {med(rs, 5)[0]:.0f} | {cpu:.1f} | {cratio} | {both:.1f} | {bratio} | {errs} |")
print("\nCPU µs/req: the time every thread of the server's process tree ran during the run "
      "(/proc/PID/task/TID/schedstat, nanoseconds; bench/static/cpu.py) divided by the requests "
      "wrk completed. The kernel's loopback work is charged to whichever task it interrupts, so "
      "part of the receiver's work lands on the server and part of the server's on wrk: compare "
      "medians, not single runs, and the totals with wrk's CPU (user + system of wrk's threads, "
      "from bash's `time`), which no such shifting changes.\n")
print("Errors are wrk's, by kind (timeout: a response not complete 2 s after its request, counted "
      "for every connection waiting at wrk's 2 s check). `wrk overran`: how much longer than its "
      "duration wrk ran; wrk's thread stops within 0.1 s of it, so more means wrk itself was not "
      "running (the machine starved the client). `run-queue s`: the time the server's threads were "
      "runnable but not running (summed over threads), from the same schedstat.\n")
print("## Every round\n")
print("| round | size | server | req/s | p50 µs | p99 µs | errors | server CPU s | wrk CPU s | run-queue s | wrk overran s | requests |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    errs = r[6] if r[6] == "0" else f"{r[6]} ({r[9]})"
    cpu = r[7] if r[12] == "schedstat" else f"{r[7]} (ticks)"
    print(f"| {r[0]} | {human(int(r[1]))} | {r[2]} | {float(r[3]):,.0f} | {r[4]} | {r[5]} | {errs} "
          f"| {cpu} | {r[13]} | {r[10]} | {r[11]} | {r[8]} |")
log = open(errlog).read().strip()
if log:
    print("\n## What the servers logged during runs with errors (INFO lines left out)\n")
    print(f"```\n{log}\n```")
print("\n## Response headers for the 12 B file\n")
for name, path in (("tine", htine), ("nginx", hnginx)):
    print(f"{name}:\n```\n{open(path).read().strip()}\n```")
PY
# The new report goes on top; earlier ones stay below it (KEEP_EARLIER=0: replace the file).
if [[ "$KEEP_EARLIER" == 1 && -s "$OUT" ]]; then
    printf '\n---\n\n' >>"$WORK/report.md"
    cat "$OUT" >>"$WORK/report.md"
fi
cp "$WORK/report.md" "$OUT"
log "wrote $OUT"
sed -n '/## Medians/,/^CPU/{p;/^CPU/q}' "$WORK/report.md" >&2
