#!/usr/bin/env bash
# The bench engine's own numbers: connection churn against the yardstick's c-epoll-echo
# (one connection per message), and 15,000 concurrent connections from one bench process
# spread over eight source addresses, every byte verified.
#
# Usage: scripts/bench-engine.sh [REPS] [DURATION_S]
# Env:   YARDSTICK_OUT (default target/yardstick), REVERB (default target/release/reverb),
#        PORT (default 17080), CONNS_15K (default 15000)
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${1:-3}
DURATION=${2:-3}
REVERB=${REVERB:-target/release/reverb}
PORT=${PORT:-17080}
CONNS_15K=${CONNS_15K:-15000}

source scripts/yardstick.sh
OUT=$YARDSTICK
[ -x "$REVERB" ] || cargo build --release --quiet

echo "# $(date -u +%FT%TZ) load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "## churn: --conn-lifetime 1 against c-epoll-echo (server CPU 0, bench CPU 1)"
taskset -c 0 "$OUT/c-epoll-echo" "$PORT" 127.0.0.1 >/dev/null 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
sleep 0.3
printf '%-6s %12s %12s %12s %12s %8s\n' conns connects/s conn_p50_us conn_p99_us msgs/s errors
for conns in 1 50; do
    for rep in $(seq "$REPS"); do
        taskset -c 1 "$REVERB" bench "127.0.0.1:$PORT" --conns "$conns" --conn-lifetime 1 \
            --duration "$DURATION" --warmup 1 --json \
        | jq -r --arg c "$conns" '[$c, (.connect.opened_per_s|floor),
            .connect.latency_us.p50, .connect.latency_us.p99, (.msgs_per_s|floor),
            .errors + .mismatches] | @tsv' \
        | awk '{printf "%-6s %12s %12s %12s %12s %8s\n", $1, $2, $3, $4, $5, $6}'
    done
done
kill "$SERVER"; wait "$SERVER" 2>/dev/null || true

echo "## $CONNS_15K concurrent connections, sources 127.0.0.2-127.0.0.9, reverb serve --model epoll"
"$REVERB" serve --model epoll --threads 1 --tcp "127.0.0.1:$PORT" >/dev/null 2>&1 &
SERVER=$!
sleep 0.5
"$REVERB" bench "127.0.0.1:$PORT" --conns "$CONNS_15K" --source 127.0.0.2-127.0.0.9 \
    --duration "$DURATION" --warmup 1 --json \
| jq -c '{conns, conns_established, connect_phase_s: .connect.phase_s,
          connect_p99_us: .connect.latency_us.p99, connect_failed: .connect.failed,
          msgs, msgs_per_s, errors, mismatches, p99_us: .latency_us.p99}'
