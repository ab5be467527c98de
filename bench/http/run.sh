#!/usr/bin/env bash
# HTTP hello benchmark: tine vs nginx vs plain hyper, side by side in one run.
#
#   bench/http/run.sh            # full run (~2 minutes), writes bench/results/http-<date>.md
#
# What it does (see bench/http/README.md for the why of each choice):
#   1. checks that wrk and nginx are installed (installs nothing: `apt-get install -y wrk nginx-light`);
#   2. builds tine (`cargo build --release`) and bench/hyper-hello (release);
#   3. starts on loopback, all at once:
#        A  tine serve --workers 2 --app hello
#        B  nginx (nginx-light), 2 workers, `return 200 "hello\n"`, own prefix/pid/temp dirs
#        C  hyper-hello, tokio multi-thread runtime with 2 worker threads
#   4. records idle PSS (/proc/PID/smaps_rollup) of tine's monitor/mold/workers and nginx's processes;
#   5. warms each server up, then runs wrk against them interleaved A B C, A B C, ... for ROUNDS rounds;
#   6. writes the report (machine, versions, command, per-round numbers, medians, ratios, PSS).
# Every process it starts is killed on exit (trap EXIT), every load is bounded by wrk -d and `timeout`.
#
# Knobs (environment): ROUNDS=5 DURATION=5 (s per wrk run) WARMUP=2 (s) CONNS=64 WRK_THREADS=1
#   QUIET_WAIT=20 QUIET_MAX_BUSY=15 (before each run, wait up to 20 s for the machine to be <=15% busy)
#   PORT_BASE=18080 (uses PORT_BASE+1..+3) SKIP_BUILD=1 (use the existing binaries)
#   BENCH_TINE_BIN=path BENCH_TINE_ARGS="--flag value" (experiments only: another tine build, extra serve flags;
#   both show in the report's command)
#   OUT_DIR=bench/results  ALLOW_NO_TINE=1 (harness development only: skip tine if it cannot run;
#   a report written that way says so in its title and is never a result).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"

ROUNDS="${ROUNDS:-5}"
DURATION="${DURATION:-5}"
WARMUP="${WARMUP:-2}"
CONNS="${CONNS:-64}"
WRK_THREADS="${WRK_THREADS:-1}"
PORT_BASE="${PORT_BASE:-18080}"
SKIP_BUILD="${SKIP_BUILD:-0}"
ALLOW_NO_TINE="${ALLOW_NO_TINE:-0}"
OUT_DIR="${OUT_DIR:-$ROOT/bench/results}"

TINE_PORT=$((PORT_BASE + 1))
NGINX_PORT=$((PORT_BASE + 2))
HYPER_PORT=$((PORT_BASE + 3))
TINE_BIN="${BENCH_TINE_BIN:-$ROOT/target/release/tine}"
read -r -a TINE_EXTRA_ARGS <<<"${BENCH_TINE_ARGS:-}"
HYPER_DIR="$ROOT/bench/hyper-hello"
HYPER_BIN="$HYPER_DIR/target/release/hyper-hello"

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

# ---------------------------------------------------------------- cleanup
WORK="$(mktemp -d /tmp/tine-bench-http.XXXXXX)"
STARTED=() # pids of the processes this script started (each the root of its own tree)

# All descendants of a pid (tine's monitor is a subreaper: its workers are its children).
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
    for i in $(seq 1 30); do # graceful first, up to 3 s
        kill -0 "$root" 2>/dev/null || break
        sleep 0.1
    done
    for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done
    wait "$root" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local pid
    for pid in "${STARTED[@]}"; do stop_tree "$pid"; done
    if [[ "${KEEP_WORK:-0}" == 1 ]]; then
        log "kept work dir $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- prerequisites
for tool in wrk nginx curl python3 ps ss; do
    command -v "$tool" >/dev/null || die "'$tool' not found; install it (Debian: apt-get install -y wrk nginx-light curl procps iproute2)"
done
for port in "$TINE_PORT" "$NGINX_PORT" "$HYPER_PORT"; do
    if ss -Htln "sport = :$port" | grep -q .; then
        die "port $port is already in use; set PORT_BASE to a free range"
    fi
done

if [[ "$SKIP_BUILD" != 1 ]]; then
    log "building tine (cargo build --release)"
    if ! (cd "$ROOT" && cargo build --release --bin tine) >"$WORK/build-tine.log" 2>&1; then
        tail -20 "$WORK/build-tine.log" >&2
        if [[ "$ALLOW_NO_TINE" == 1 ]]; then log "tine does not build; skipping it (ALLOW_NO_TINE=1)"; else die "tine does not build"; fi
    fi
    log "building bench/hyper-hello (release)"
    (cd "$HYPER_DIR" && cargo build --release) >"$WORK/build-hyper.log" 2>&1 ||
        {
            tail -20 "$WORK/build-hyper.log" >&2
            die "hyper-hello does not build"
        }
fi
[[ -x "$HYPER_BIN" ]] || die "missing $HYPER_BIN"

# ---------------------------------------------------------------- servers
# Poll until GET / answers exactly "hello\n" (or the process dies / 30 s pass).
wait_hello() {
    local name="$1" port="$2" pid="$3" i body
    for i in $(seq 1 300); do
        kill -0 "$pid" 2>/dev/null || return 1
        body="$(curl -s -m 1 "http://127.0.0.1:$port/" 2>/dev/null || true)"
        if [[ "$body" == "hello" ]]; then return 0; fi
        sleep 0.1
    done
    log "$name did not answer hello on port $port within 30 s"
    return 1
}

TINE_PID=""
start_tine() {
    if [[ ! -x "$TINE_BIN" ]]; then
        [[ "$ALLOW_NO_TINE" == 1 ]] && { log "no tine binary; skipping tine (ALLOW_NO_TINE=1)"; return 0; }
        die "missing $TINE_BIN"
    fi
    TINE_CMD=("$TINE_BIN" serve --listen "127.0.0.1:$TINE_PORT" --workers 2 --app hello "${TINE_EXTRA_ARGS[@]}")
    # tine reads TINE_* variables as config: run it with none from this shell. Its working
    # directory is the temp dir, so its default control socket (tine.sock) lands there.
    local unset_env=() v
    for v in $(compgen -e | grep '^TINE_' || true); do unset_env+=(-u "$v"); done
    (cd "$WORK" && exec env "${unset_env[@]}" "${TINE_CMD[@]}") >"$WORK/tine.out" 2>"$WORK/tine.err" </dev/null &
    TINE_PID=$!
    STARTED+=("$TINE_PID")
    if ! wait_hello tine "$TINE_PORT" "$TINE_PID"; then
        tail -20 "$WORK/tine.err" >&2
        if [[ "$ALLOW_NO_TINE" == 1 ]]; then
            log "tine does not serve; skipping it (ALLOW_NO_TINE=1)"
            stop_tree "$TINE_PID"
            TINE_PID=""
            return 0
        fi
        die "tine does not serve hello on 127.0.0.1:$TINE_PORT"
    fi
    # The monitor says `tine ready` once every worker serves; the port answering only proves one.
    local i
    for i in $(seq 1 300); do
        grep -q 'tine ready' "$WORK/tine.err" "$WORK/tine.out" && return 0
        sleep 0.1
    done
    log "warning: no 'tine ready' line after 30 s (continuing: the port answers)"
}

NGINX_PID=""
start_nginx() {
    local p="$WORK/nginx"
    mkdir -p "$p/logs" "$p/tmp"
    # Fair, minimal config: 2 workers, no access log, long keep-alive, nothing else on the path.
    cat >"$p/nginx.conf" <<EOF
worker_processes 2;
daemon off;
master_process on;
pid $p/nginx.pid;
error_log $p/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 100000;
    default_type text/plain;
    client_body_temp_path $p/tmp/body;
    proxy_temp_path $p/tmp/proxy;
    fastcgi_temp_path $p/tmp/fastcgi;
    uwsgi_temp_path $p/tmp/uwsgi;
    scgi_temp_path $p/tmp/scgi;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / { return 200 "hello\n"; }
    }
}
EOF
    NGINX_CMD=(nginx -p "$p" -c "$p/nginx.conf" -e "$p/logs/error.log")
    "${NGINX_CMD[@]}" -t >"$WORK/nginx-t.log" 2>&1 || {
        cat "$WORK/nginx-t.log" >&2
        die "nginx config test failed"
    }
    "${NGINX_CMD[@]}" >"$WORK/nginx.out" 2>&1 </dev/null &
    NGINX_PID=$!
    STARTED+=("$NGINX_PID")
    wait_hello nginx "$NGINX_PORT" "$NGINX_PID" || {
        cat "$p/logs/error.log" >&2
        die "nginx does not serve"
    }
}

HYPER_PID=""
start_hyper() {
    HYPER_CMD=("$HYPER_BIN" "127.0.0.1:$HYPER_PORT" 2)
    "${HYPER_CMD[@]}" >"$WORK/hyper.out" 2>&1 </dev/null &
    HYPER_PID=$!
    STARTED+=("$HYPER_PID")
    wait_hello hyper "$HYPER_PORT" "$HYPER_PID" || die "hyper-hello does not serve"
}

log "starting servers (tine :$TINE_PORT, nginx :$NGINX_PORT, hyper :$HYPER_PORT)"
start_tine
start_nginx
start_hyper

# ---------------------------------------------------------------- process facts
cmdline() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | sed 's/ *$//'; }
pss_kb() { awk '/^Pss:/ {print $2}' "/proc/$1/smaps_rollup" 2>/dev/null || echo NA; }
rss_kb() { awk '/^Rss:/ {print $2}' "/proc/$1/smaps_rollup" 2>/dev/null || echo NA; }
# A worker's holder of its memory (`teardown_holder`): same title and memory as its worker.
is_holder() { [[ "$(cat "/proc/$1/comm" 2>/dev/null)" == tine-holder ]]; }
# First descendant of $1 (not a holder) whose title (cmdline) starts with $2.
find_titled() {
    local p
    for p in $(descendants "$1"); do
        if [[ "$(cmdline "$p")" == "$2"* ]] && ! is_holder "$p"; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

# Lines "role<TAB>pid<TAB>pss_kb<TAB>rss_kb<TAB>title" for the processes we compare.
mem_snapshot() {
    local p
    if [[ -n "$TINE_PID" ]]; then
        printf 'tine monitor\t%s\t%s\t%s\t%s\n' "$TINE_PID" "$(pss_kb "$TINE_PID")" "$(rss_kb "$TINE_PID")" "$(cmdline "$TINE_PID")"
        for role in "tine mold" "tine worker[0]" "tine worker[1]"; do
            if p="$(find_titled "$TINE_PID" "$role")"; then
                printf '%s\t%s\t%s\t%s\t%s\n' "$role" "$p" "$(pss_kb "$p")" "$(rss_kb "$p")" "$(cmdline "$p")"
            else
                printf '%s\tNA\tNA\tNA\t(no such process under the monitor)\n' "$role"
            fi
        done
    fi
    printf 'nginx master\t%s\t%s\t%s\t%s\n' "$NGINX_PID" "$(pss_kb "$NGINX_PID")" "$(rss_kb "$NGINX_PID")" "$(cmdline "$NGINX_PID")"
    local n=0
    for p in $(descendants "$NGINX_PID"); do
        printf 'nginx worker[%d]\t%s\t%s\t%s\t%s\n' "$n" "$p" "$(pss_kb "$p")" "$(rss_kb "$p")" "$(cmdline "$p")"
        n=$((n + 1))
    done
    printf 'hyper-hello (whole process)\t%s\t%s\t%s\t%s\n' "$HYPER_PID" "$(pss_kb "$HYPER_PID")" "$(rss_kb "$HYPER_PID")" "$(cmdline "$HYPER_PID")"
}

# CPU time (clock ticks, utime+stime) of a process tree; comm may contain spaces, so cut after ')'.
tree_ticks() {
    local total=0 p t
    for p in "$1" $(descendants "$1"); do
        t="$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}')" || t=0
        total=$((total + ${t:-0}))
    done
    echo "$total"
}

if [[ -n "$TINE_PID" ]]; then
    nworkers=0
    for p in $(descendants "$TINE_PID"); do [[ "$(cmdline "$p")" == "tine worker["* ]] && ! is_holder "$p" && nworkers=$((nworkers + 1)); done
    [[ "$nworkers" == 2 ]] || log "warning: found $nworkers tine worker processes, expected 2"
fi

sleep 1 # let start-up allocations settle before the idle memory snapshot
mem_snapshot >"$WORK/mem-idle.tsv"
ps -o pid,ppid,rss,args --forest -p "$(
    for p in "${STARTED[@]}"; do
        echo "$p"
        descendants "$p"
    done | paste -sd,
)" >"$WORK/ps-forest.txt"

for name in tine nginx hyper; do
    port_var="${name^^}_PORT"
    pid_var="${name^^}_PID"
    [[ -n "${!pid_var}" ]] || continue
    curl -s -i "http://127.0.0.1:${!port_var}/" | tr -d '\r' >"$WORK/headers-$name.txt" || true
done

# ---------------------------------------------------------------- load
CLK_TCK="$(getconf CLK_TCK)"
WRK_TIMEOUT=$((DURATION + 30))
wrk_cmd() { # port seconds
    echo wrk -t"$WRK_THREADS" -c"$CONNS" -d"$2"s --latency -s "$HERE/stats.lua" "http://127.0.0.1:$1/"
}

# CPU ticks of the whole machine from /proc/stat: "TASK SOFTIRQ TOTAL" where TASK is user+nice+
# system+irq+steal. TASK minus the server's and wrk's own CPU is other work on the machine (builds,
# tests) that shared the run; softirq (the loopback network stack) is shown apart since it is
# mostly the benchmark's own traffic.
machine_ticks() {
    awk '/^cpu / {print $2 + $3 + $4 + $7 + $9, $8, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9; exit}' /proc/stat
}

# Waits (at most QUIET_WAIT s) until the machine is nearly idle over a 1 s sample, so a run does
# not start in the middle of someone's build; returns at once on a quiet machine.
QUIET_WAIT="${QUIET_WAIT:-20}"
QUIET_MAX_BUSY="${QUIET_MAX_BUSY:-15}" # percent of all cores
wait_quiet() {
    local deadline=$((SECONDS + QUIET_WAIT)) a b busy
    while :; do
        read -r -a a <<<"$(machine_ticks)"
        sleep 1
        read -r -a b <<<"$(machine_ticks)"
        busy=$(((b[0] + b[1] - a[0] - a[1]) * 100 / (b[2] - a[2] > 0 ? b[2] - a[2] : 1)))
        ((busy <= QUIET_MAX_BUSY)) && return 0
        if ((SECONDS >= deadline)); then
            log "machine still ${busy}% busy after ${QUIET_WAIT}s; measuring anyway (see the other-CPU column)"
            NOISY_RUNS=$((NOISY_RUNS + 1))
            return 0
        fi
    done
}
NOISY_RUNS=0

RAW="$WORK/rounds.tsv"
printf 'round\tserver\treq_s\tp50_us\tp90_us\tp99_us\tmax_us\tmean_us\trequests\terrors\tserver_cpu_s\twrk_cpu_s\tsoftirq_s\tother_cpu_s\tconn_spread\n' >"$RAW"

# run_one ROUND NAME PORT PID
run_one() {
    local round="$1" name="$2" port="$3" pid="$4" t0 t1 m0 m1 out="$WORK/wrk-$2-$1.txt"
    wait_quiet
    t0="$(tree_ticks "$pid")"
    m0="$(machine_ticks)"
    # shellcheck disable=SC2046
    timeout -k 5 "$WRK_TIMEOUT" /usr/bin/time -f '%U %S' -o "$WORK/time.txt" $(wrk_cmd "$port" "$DURATION") >"$out" 2>&1 &
    local wrk_pid=$!
    # Mid-run: how wrk's connections are spread over the server's processes (e.g. "50/14"; one
    # number for a single process). A skewed spread changes how the 2 cores are shared.
    sleep "$(awk -v d="$DURATION" 'BEGIN {print d / 2}')"
    local spread
    spread="$(ss -Htnp state established "( sport = :$port )" | grep -o 'pid=[0-9]*' | sort | uniq -c |
        awk '{print $1}' | sort -rn | paste -sd/)"
    wait "$wrk_pid" || die "wrk against $name failed: $(tail -3 "$out")"
    t1="$(tree_ticks "$pid")"
    m1="$(machine_ticks)"
    kill -0 "$pid" 2>/dev/null || die "$name died during the run"
    python3 - "$round" "$name" "$out" "$((t1 - t0))" "$CLK_TCK" "$WORK/time.txt" "$m0" "$m1" "${spread:-?}" >>"$RAW" <<'PY'
import sys
rnd, name, path, ticks, tck, tpath, m0, m1, spread = sys.argv[1:]
m = [int(b) - int(a) for a, b in zip(m0.split(), m1.split())]
tck = int(tck)
line = next(l for l in open(path) if l.startswith("RESULT "))
kv = dict(x.split("=") for x in line.split()[1:])
n, dur = int(kv["requests"]), int(kv["duration_us"]) / 1e6
errs = sum(int(kv[k]) for k in kv if k.startswith("err_"))
u, s = (float(x) for x in open(tpath).read().split()[-2:])
print("\t".join(map(str, [rnd, name, round(n / dur, 1), kv["p50_us"], kv["p90_us"], kv["p99_us"],
                          kv["max_us"], kv["mean_us"], n, errs,
                          round(int(ticks) / tck, 2), round(u + s, 2), round(m[1] / tck, 2),
                          round(max(0.0, (m[0] - int(ticks)) / tck - (u + s)), 2), spread])))
PY
    tail -1 "$RAW" | awk -F'\t' '{printf "  round %s %-6s %10s req/s  p50 %6s us  p99 %6s us  errors %s  server cpu %ss  wrk cpu %ss  softirq %ss  other cpu %ss  conns %s\n", $1, $2, $3, $4, $6, $10, $11, $12, $13, $14, $15}' >&2
}

SERVERS=()
[[ -n "$TINE_PID" ]] && SERVERS+=("tine:$TINE_PORT:$TINE_PID")
SERVERS+=("nginx:$NGINX_PORT:$NGINX_PID" "hyper:$HYPER_PORT:$HYPER_PID")

LOADAVG_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
log "warm-up: ${WARMUP}s per server"
for s in "${SERVERS[@]}"; do
    IFS=: read -r name port pid <<<"$s"
    timeout -k 5 $((WARMUP + 30)) $(wrk_cmd "$port" "$WARMUP") >"$WORK/warmup-$name.txt" 2>&1 || die "warm-up of $name failed"
done
log "measuring: $ROUNDS rounds x ${#SERVERS[@]} servers x ${DURATION}s, interleaved"
for round in $(seq 1 "$ROUNDS"); do
    for s in "${SERVERS[@]}"; do
        IFS=: read -r name port pid <<<"$s"
        run_one "$round" "$name" "$port" "$pid"
    done
done
LOADAVG_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"

sleep 1
mem_snapshot >"$WORK/mem-after.tsv"

# ---------------------------------------------------------------- report
mkdir -p "$OUT_DIR"
DATE="$(date +%F)"
REPORT="$OUT_DIR/http-$DATE.md"
[[ -z "$TINE_PID" ]] && REPORT="$OUT_DIR/http-dev-no-tine.md" # never mistaken for a result

export BENCH_DATE="$(date -u '+%F %T UTC')"
export BENCH_NPROC="$(nproc)"
export BENCH_CPU="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
export BENCH_MEM="$(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
export BENCH_KERNEL="$(uname -srm)"
export BENCH_RUSTC="$(rustc --version)"
export BENCH_NGINX="$(nginx -v 2>&1)"
export BENCH_WRK="$(wrk --version 2>&1 | head -1 | sed 's/ Copyright.*//')"
export BENCH_GIT="$(git -C "$ROOT" rev-parse --short HEAD) ($(git -C "$ROOT" log -1 --format=%s | cut -c1-80))$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo '; working tree has uncommitted changes under src/ or Cargo.*')"
export BENCH_DURATION="$DURATION"
export BENCH_SETTINGS="ROUNDS=$ROUNDS DURATION=$DURATION WARMUP=$WARMUP CONNS=$CONNS WRK_THREADS=$WRK_THREADS"
export BENCH_WRK_CMD="$(wrk_cmd PORT "$DURATION")"
export BENCH_TINE_CMD="${TINE_CMD[*]:-}"
export BENCH_NGINX_CMD="${NGINX_CMD[*]}"
export BENCH_HYPER_CMD="${HYPER_CMD[*]}"
export BENCH_LOADAVG="$LOADAVG_BEFORE before, $LOADAVG_AFTER after"
export BENCH_QUIET="each run waited (at most ${QUIET_WAIT}s) for the machine to be at most ${QUIET_MAX_BUSY}% busy; $NOISY_RUNS of $((ROUNDS * ${#SERVERS[@]})) runs started on a busier machine"
export BENCH_HAVE_TINE="${TINE_PID:+1}"
python3 "$HERE/report.py" "$WORK" "$ROOT" >"$REPORT"
if [[ -n "$TINE_PID" ]]; then
    cp "$REPORT" "$OUT_DIR/http-latest.md"
    log "wrote $REPORT and $OUT_DIR/http-latest.md"
else
    log "wrote $REPORT (development run without tine: not a result)"
fi
sed -n '/^## Medians/,/^## Machine/p' "$REPORT" | sed '$d' >&2
