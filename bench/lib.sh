# Shell shared by the bench scripts: tools, the release build, servers started and killed, waiting
# for a port, CPU time of a process tree, and a header naming the machine and its load.
# Source it (it runs nothing by itself):
#
#   . "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
#
# A script that starts servers with bench_start sets `trap bench_stop_started EXIT` (or calls
# bench_stop_started from its own EXIT trap), so every process it started is killed on exit.

# The pids bench_start started (each the root of its own tree).
BENCH_STARTED=()

# bench_need TOOL...: exits with a message naming the install command when a tool is missing.
bench_need() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null || {
            echo "needs $tool (apt-get install -y $tool)" >&2
            exit 1
        }
    done
}

# bench_release_tine: prints the path of the release tine (BIN if set), building it first when the
# default one is missing. Call it as `BIN=$(bench_release_tine) || exit 1`.
bench_release_tine() {
    local root bin
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    bin="${BIN:-$root/target/release/tine}"
    if [[ ! -x $bin && -z ${BIN:-} ]]; then
        (cd "$root" && cargo build --release --bin tine >&2) || exit 1
    fi
    [[ -x $bin ]] || {
        echo "$bin is not an executable" >&2
        exit 1
    }
    realpath "$bin"
}

# bench_release_example NAME: builds the example NAME (release) and prints its path. Call it as
# `BIN=$(bench_release_example NAME) || exit 1`.
bench_release_example() {
    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    (cd "$root" && cargo build --release --quiet --example "$1" >&2) || exit 1
    echo "${CARGO_TARGET_DIR:-$root/target}/release/examples/$1"
}

# bench_start DIR CMD...: runs CMD in DIR in the background, stdout and stderr to DIR/log, and
# remembers it for bench_stop_started. Its pid is in BENCH_PID (call it as is, not in $(...)).
bench_start() {
    local dir=$1
    shift
    mkdir -p "$dir"
    (cd "$dir" && exec "$@" >log 2>&1) &
    BENCH_PID=$!
    # Not a job of the script's any more: bash then says nothing when the EXIT trap kills it.
    disown "$BENCH_PID"
    BENCH_STARTED+=("$BENCH_PID")
}

# bench_serve_tine BIN DIR PORT [ARG...]: `BIN serve --listen 127.0.0.1:PORT --control-socket
# DIR/ctl.sock ARG...` started in DIR (bench_start: BENCH_PID is its monitor), then waits until it
# answers HTTP; returns 1 if it never does.
bench_serve_tine() {
    local bin=$1 dir=$2 port=$3
    shift 3
    bench_start "$dir" "$bin" serve --listen "127.0.0.1:$port" --control-socket "$dir/ctl.sock" "$@"
    bench_wait_http "$port"
}

# The commands that put a server's tree on CPU 0 and a load generator on CPU 1 (see bench_pin).
BENCH_SERVER_PIN=()
BENCH_LOAD_PIN=()

# bench_pin: with PIN=1, sets BENCH_SERVER_PIN and BENCH_LOAD_PIN to `taskset -c 0` and
# `taskset -c 1` (the peer suite's pinned phase); leaves them empty otherwise.
bench_pin() {
    if [[ ${PIN:-0} == 1 ]]; then
        bench_need taskset
        BENCH_SERVER_PIN=(taskset -c 0)
        BENCH_LOAD_PIN=(taskset -c 1)
    fi
}

# bench_start_hello BIN DIR PORT WORKERS [ARG...]: starts BIN's hello server in DIR (bench_start,
# under BENCH_SERVER_PIN: BENCH_PID is its root) and waits until it answers; returns 1 if it never
# does. A path containing `hyper-hello` runs as `BIN 127.0.0.1:PORT WORKERS`, anything else as
# tine's `serve --listen 127.0.0.1:PORT --control-socket DIR/ctl.sock --workers WORKERS ARG...`.
bench_start_hello() {
    local bin=$1 dir=$2 port=$3 workers=$4
    shift 4
    if [[ $bin == *hyper-hello* ]]; then
        bench_start "$dir" "${BENCH_SERVER_PIN[@]}" "$bin" "127.0.0.1:$port" "$workers"
    else
        bench_start "$dir" "${BENCH_SERVER_PIN[@]}" "$bin" serve --listen "127.0.0.1:$port" \
            --control-socket "$dir/ctl.sock" --workers "$workers" "$@"
    fi
    bench_wait_http "$port"
}

# bench_work_dir NAME: makes a fresh /tmp/NAME.XXXXXX, puts its path in BENCH_WORK and sets the
# EXIT trap that kills what bench_start started and removes the directory (call it as is, not in
# $(...); a script with more to clean up sets its own trap instead).
bench_work_dir() {
    BENCH_WORK="$(mktemp -d "/tmp/$1.XXXXXX")"
    trap 'bench_stop_started; rm -rf "$BENCH_WORK"' EXIT
}

# bench_stop_started: SIGKILLs every process bench_start started and their children (tine's
# monitor takes the rest of its tree down when it dies).
bench_stop_started() {
    local p
    for p in "${BENCH_STARTED[@]}"; do
        pkill -KILL -P "$p" 2>/dev/null || true
        kill -KILL "$p" 2>/dev/null || true
    done
}

# bench_wait_http PORT: returns once 127.0.0.1:PORT answers an HTTP request; after 10 s, says so
# and returns 1.
bench_wait_http() {
    local port=$1
    for _ in $(seq 1 100); do
        curl -s -o /dev/null "127.0.0.1:$port/" && return 0
        sleep 0.1
    done
    echo "nothing answered on 127.0.0.1:$port within 10 s" >&2
    return 1
}

# bench_perf_text DATA TXT: `perf script` of DATA (task, pid/tid, CPU, time, event, its fields)
# into TXT, with a warning when perf lost events: their gaps would read as waits, or as time of
# the task that ran before them.
bench_perf_text() {
    perf script -i "$1" -F comm,pid,tid,cpu,time,event,trace 2>"$2.err" >"$2"
    if grep -qi lost "$2.err"; then
        echo "warning: perf lost events (see $2.err): the analysis may be wrong" >&2
    fi
}

# bench_tree PID: PID and every descendant of it, one a line.
bench_tree() {
    local c
    echo "$1"
    for c in $(pgrep -P "$1"); do bench_tree "$c"; done
}

# bench_tree_ticks PID [FIELD]: CPU clock ticks of PID and its descendants, user+system (fields 14
# and 15 of /proc/PID/stat), or only FIELD (14: user time).
bench_tree_ticks() {
    local total=0 p t
    for p in $(bench_tree "$1"); do
        t=$(awk -v f="${2:-0}" '{print f ? $f : $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)
        total=$((total + ${t:-0}))
    done
    echo "$total"
}

# Microseconds in a clock tick (for bench_tree_ticks).
BENCH_TICK_US=$((1000000 / $(getconf CLK_TCK)))

# bench_machine: one line naming the machine, its load and the commit measured.
bench_machine() {
    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    printf '# %s; %s CPUs (%s); load %s; %s; commit %s\n' \
        "$(date -u '+%Y-%m-%d %H:%M UTC')" "$(nproc)" \
        "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" \
        "$(cut -d' ' -f1-3 /proc/loadavg)" "$(uname -sr)" \
        "$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
}
