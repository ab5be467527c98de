#!/usr/bin/env bash
# Captures a `tine top` screen for the README (bench/results/top-screen.txt): a tree of three
# workers under light load (a bounded loop of curl requests), one slow request in flight, after a
# refork and a killed worker, so that every part of the screen shows something. The screen is
# read from tmux exactly as a person sees it in a 120x24 terminal.
#
#   bench/top/capture.sh                 # builds and uses target/release/tine
#   TINE=target/debug/tine bench/top/capture.sh
#
# Needs tmux and curl. Everything it starts is stopped when it exits, pass or fail.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ -z "${TINE:-}" ]; then
  cargo build --release --bin tine
  TINE=target/release/tine
fi
TINE=$(realpath "$TINE")
OUT=bench/results/top-screen.txt
DIR=$(mktemp -d)
SOCK="$DIR/tine.sock"
TMUX_SOCK="$DIR/tmux.sock"
LOAD_PID=""
SLOW_PID=""

cleanup() {
  tmux -S "$TMUX_SOCK" kill-server 2>/dev/null || true
  # shellcheck disable=SC2086 # a list of pids
  [ -n "$LOAD_PID" ] && kill $LOAD_PID 2>/dev/null || true
  [ -n "$SLOW_PID" ] && kill "$SLOW_PID" 2>/dev/null || true
  "$TINE" ctl --control-socket "$SOCK" stop --quick >/dev/null 2>&1 || true
  [ -n "${SERVER_PID:-}" ] && wait "$SERVER_PID" 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT

# Waits (at most $2 seconds) until command $1 succeeds.
wait_until() {
  local deadline=$((SECONDS + $2))
  until eval "$1"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "timed out waiting for: $1" >&2
      return 1
    fi
    sleep 0.1
  done
}

"$TINE" serve --workers 3 --debug-routes --listen 127.0.0.1:0 --control-socket "$SOCK" \
  2>"$DIR/log" &
SERVER_PID=$!
wait_until "grep -q 'tine ready' '$DIR/log'" 30
ADDR=$(grep -o 'listen=[^ ]*' "$DIR/log" | head -1 | cut -d= -f2)

# Events: a refork (answered once every worker is of the new generation), then a killed worker.
"$TINE" ctl --control-socket "$SOCK" refork
"$TINE" ctl --control-socket "$SOCK" kill-worker 2

# Light load (three sequential curl loops, each for at most 30 s and 10,000 requests), and one
# request that sleeps 20 s (the oldest request in flight).
load() {
  local end=$((SECONDS + 30)) n=0
  while [ "$SECONDS" -lt "$end" ] && [ "$n" -lt 10000 ]; do
    curl -s -o /dev/null "http://$ADDR/" || true
    n=$((n + 1))
  done
}
load & LOAD_PID="$!"
load & LOAD_PID="$LOAD_PID $!"
load & LOAD_PID="$LOAD_PID $!"
curl -s -o /dev/null "http://$ADDR/sleep/20000" &
SLOW_PID=$!

tmux -S "$TMUX_SOCK" -f /dev/null new-session -d -s top -x 120 -y 24 \
  "$TINE top --control-socket '$SOCK'"
# Rates need two status replies; the slow request must be in flight and the killed worker back.
wait_until "tmux -S '$TMUX_SOCK' capture-pane -p -t top | grep -q 'GET /sleep/20000'" 30
wait_until "[ \$(tmux -S '$TMUX_SOCK' capture-pane -p -t top | grep -c ' ready\| busy') -ge 3 ]" 30
sleep 3 # a few more refreshes, so that requests/s and CPU % cover whole intervals
tmux -S "$TMUX_SOCK" capture-pane -p -t top | sed -e 's/[[:space:]]*$//' >"$OUT"
echo "captured $OUT:"
cat "$OUT"
