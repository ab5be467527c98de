#!/usr/bin/env bash
# System calls per request of tine's static app and of nginx (sendfile on), for one file size:
# what each server's worker asks of the kernel to answer it, counted by `strace -c -f`.
#
#   bench/static/syscalls.sh SIZE [CONNS]     # e.g. 16777216 4, or 12 16; ~15 s
#
# Starts both servers on loopback with one worker each (tine: --workers 1 --spare-workers 0;
# nginx: worker_processes 1, as in bench/static/run.sh otherwise), warms each up for 1 s, then
# attaches strace to the worker for a 3 s `wrk -t1 -cCONNS` run and prints the calls per request
# (strace slows the worker: the counts per request are what it measures, not time; strace 6.1
# leaves tine's cachestat, syscall 451, out of its table). Uses
# release tine (target/release/tine, or BENCH_TINE_BIN); builds nothing. Every process it starts
# is killed on exit.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
SIZE="${1:?usage: bench/static/syscalls.sh SIZE [CONNS]}"
CONNS="${2:-4}"
TINE_BIN="${BENCH_TINE_BIN:-$ROOT/target/release/tine}"
PORT_BASE="${PORT_BASE:-18480}"
TINE_PORT=$((PORT_BASE + 1))
NGINX_PORT=$((PORT_BASE + 2))

for tool in wrk nginx curl strace; do
    command -v "$tool" >/dev/null || { echo "'$tool' not found" >&2; exit 1; }
done
[[ -x "$TINE_BIN" ]] || { echo "missing $TINE_BIN (cargo build --release)" >&2; exit 1; }

WORK="$(mktemp -d /tmp/tine-bench-syscalls.XXXXXX)"
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

chmod 755 "$WORK"
mkdir -p "$WORK/docs" "$WORK/nginx/tmp"
chmod 755 "$WORK/docs"
head -c "$SIZE" /dev/urandom >"$WORK/docs/f.bin"
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
master_process on;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    default_type application/octet-stream;
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path $WORK/nginx/tmp/body;
    proxy_temp_path $WORK/nginx/tmp/proxy;
    fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
    scgi_temp_path $WORK/nginx/tmp/scgi;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        root $WORK/docs;
    }
}
EOF

(cd "$WORK" && exec env -u TINE_LOG "$TINE_BIN" serve --listen "127.0.0.1:$TINE_PORT" \
    --control-socket "$WORK/tine.sock" --workers 1 --spare-workers 0 --app static \
    --root "$WORK/docs") >"$WORK/tine.out" 2>"$WORK/tine.err" </dev/null &
TINE_PID=$!
PIDS+=("$TINE_PID")
nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" >/dev/null 2>&1 </dev/null &
NGINX_PID=$!
PIDS+=("$NGINX_PID")

for port in "$TINE_PORT" "$NGINX_PORT"; do
    for i in $(seq 1 100); do
        curl -sf -o /dev/null -m 1 "http://127.0.0.1:$port/f.bin" && break
        [[ $i == 100 ]] && { echo "port $port does not serve" >&2; exit 1; }
        sleep 0.1
    done
done
TINE_WORKER="$(grep -o 'worker\[0\] (gen:0) ready pid=[0-9]*' "$WORK/tine.err" | grep -o '[0-9]*$' | head -1)"
NGINX_WORKER="$(ps -o pid= --ppid "$NGINX_PID" | head -1 | tr -d ' ')"
[[ -n "$TINE_WORKER" && -n "$NGINX_WORKER" ]] || { echo "workers not found" >&2; exit 1; }

echo "calls per request of a $SIZE B file, wrk -t1 -c$CONNS -d3s (strace -c -f on the worker)"
for name in tine nginx; do
    case "$name" in
        tine) port="$TINE_PORT" worker="$TINE_WORKER" ;;
        nginx) port="$NGINX_PORT" worker="$NGINX_WORKER" ;;
    esac
    timeout 10 wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:$port/f.bin" >/dev/null
    timeout 30 strace -c -f -p "$worker" -o "$WORK/strace-$name.txt" 2>/dev/null &
    STRACE_PID=$!
    sleep 0.5 # strace attached
    requests="$(timeout 30 wrk -t1 -c"$CONNS" -d3s -s "$ROOT/bench/http/stats.lua" \
        "http://127.0.0.1:$port/f.bin" | sed -n 's/^RESULT requests=\([0-9]*\).*/\1/p')"
    kill -INT "$STRACE_PID"
    wait "$STRACE_PID" || true
    echo "== $name: $requests requests"
    # strace -c's rows: % time, seconds, usecs/call, calls, [errors,] syscall.
    awk -v n="$requests" 'NR > 2 && $NF != "total" && $1 ~ /^[0-9.]+$/ {
        printf "  %-16s %8.2f\n", $NF, $4 / n }' "$WORK/strace-$name.txt" | sort -k2 -nr | head -12
done
