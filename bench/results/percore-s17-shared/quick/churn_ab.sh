#!/usr/bin/env bash
# Churn (a new connection per request) with accept_balance on vs off, interleaved; tine binary $1.
set -u
bin=$1 rounds=${ROUNDS:-5}
start() { # port balance log
  mkdir -p /tmp/churn-$1; (cd /tmp/churn-$1 && setsid "$bin" serve --listen 127.0.0.1:$1 --workers 2 --app hello --accept-balance $2 ${EXTRA:-} > $3 2>&1 &)
  for i in $(seq 100); do grep -q "tine ready" $3 2>/dev/null && curl -s -m1 127.0.0.1:$1/ >/dev/null && return; sleep 0.1; done
}
start 19801 true /tmp/churn-on.log; start 19802 false /tmp/churn-off.log
for r in $(seq $rounds); do
  for v in on off; do
    port=$([ $v = on ] && echo 19801 || echo 19802)
    rps=$(wrk -t2 -c16 -d5s -H "Connection: close" http://127.0.0.1:$port/ | awk '/Requests\/sec/ {print $2}')
    echo "round $r $v $rps"; sleep 1
  done
done
pkill -f "tine monitor" || true
