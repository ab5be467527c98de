#!/usr/bin/env bash
# Peer suite: tine vs nginx, plain hyper, puma, unicorn, gunicorn and uWSGI on one `hello` app.
#
#   bench/peers/run.sh                 # ~15-25 minutes (waits for a quiet machine before each run)
#   ROUNDS=1 DURATION=2 KILLS=2 RELOADS=1 OPEN_SECONDS=3 OUT_DIR=/tmp/p bench/peers/run.sh   # smoke run
#   ONLY=tine,nginx,hyper PHASES=pinned,open-pinned bench/peers/run.sh                      # a subset
#
# 1. installs what is missing from Debian packages (wrk, nginx-light, ruby, puma, unicorn,
#    gunicorn, uwsgi-core + uwsgi-plugin-python3, curl, util-linux for taskset), as root;
# 2. builds tine (release), bench/hyper-hello and bench/peers/loadgen;
# 3. runs bench/peers/peers.py (servers, loads, measurements -> OUT_DIR/peers.json);
# 4. runs bench/peers/report.py (OUT_DIR/peers.md and the SVG charts OUT_DIR/peers-*.svg).
# Knobs (environment) are listed in bench/peers/README.md. Every process started is killed on exit;
# every load is bounded in time.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
export OUT_DIR="${OUT_DIR:-$ROOT/bench/results}"
log() { printf '[peers %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# ---------------------------------------------------------------- 1. packages
need=()
for pair in wrk:wrk nginx:nginx-light ruby:ruby puma:puma unicorn:unicorn gunicorn:gunicorn \
    uwsgi:uwsgi-core curl:curl taskset:util-linux; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
[[ -e /usr/lib/uwsgi/plugins/python3_plugin.so ]] || need+=(uwsgi-plugin-python3)
if ((${#need[@]})); then
    log "installing Debian packages: ${need[*]}"
    if [[ $(id -u) != 0 ]]; then
        echo "run as root, or install them yourself: apt-get install -y ${need[*]}" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
[[ $(nproc) -ge 2 ]] || { echo "needs at least 2 CPUs (server on CPU 0, load on CPU 1)" >&2; exit 1; }

# ---------------------------------------------------------------- 2. builds
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    log "building tine, bench/hyper-hello, bench/peers/loadgen (release)"
    (cd "$ROOT" && cargo build --release --bin tine -q)
    (cd "$ROOT/bench/hyper-hello" && cargo build --release -q)
    (cd "$HERE/loadgen" && cargo build --release -q)
fi

# ---------------------------------------------------------------- 3. measure
python3 "$HERE/peers.py"

# ---------------------------------------------------------------- 4. report
export BENCH_NPROC="$(nproc)"
export BENCH_CPU="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
export BENCH_MEM="$(awk '/^MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
export BENCH_KERNEL="$(uname -srm)"
export BENCH_RUSTC="$(rustc --version)"
export BENCH_GIT="$(git -C "$ROOT" rev-parse --short HEAD) ($(git -C "$ROOT" log -1 --format=%s | cut -c1-80))$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo '; working tree has uncommitted changes under src/ or Cargo.*')"
export BENCH_VERSIONS="$(nginx -v 2>&1 | sed 's/nginx version: //'); wrk $(dpkg-query -W -f='${Version}' wrk 2>/dev/null); $(ruby -v | cut -d' ' -f1-2); puma $(puma --version | awk '{print $3}'); unicorn $(unicorn -v | awk '{print $2}'); gunicorn $(gunicorn --version | tr -dc '0-9.'); uWSGI $(uwsgi --version) , both on Debian's $(/usr/bin/python3 --version 2>&1)"
python3 "$HERE/report.py" "$OUT_DIR" >"$OUT_DIR/peers.md"
log "wrote $OUT_DIR/peers.md and $OUT_DIR/peers-*.svg"
