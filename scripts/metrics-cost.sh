#!/usr/bin/env bash
# What counting costs: server CPU per message of `epoll --threads 1` with --metrics
# (counting on, and one scrape of /metrics during each window) against the same binary
# without it, measured in the same windows: both servers pinned to CPU 0, two echoload
# clients pinned to CPU 1, each client with --pid of its server (bench/README.md).
#
# Usage: scripts/metrics-cost.sh [REPS] [DURATION_S] [CONNS] [SIZE]
# Env:   YARDSTICK_OUT (default target/yardstick), REVERB (default target/release/reverb)
# Prints each side's CPU µs per message per window and the median of the per-window
# ratios with/without.
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${1:-7} DURATION=${2:-3} CONNS=${3:-50} SIZE=${4:-64}
REVERB=${REVERB:-target/release/reverb}
source scripts/yardstick.sh
[ -x "$REVERB" ] || cargo build --release --quiet
RUNS=$(mktemp)
trap 'rm -f "$RUNS" "$RUNS".*' EXIT

start_reverb() { # NAME EXTRA_ARGS...: starts it on CPU 0, sets PID and PORT
  local name=$1
  shift
  : >"$RUNS.$name"
  taskset -c 0 "$REVERB" serve --model epoll --threads 1 --tcp 127.0.0.1:0 "$@" \
    >"$RUNS.$name" 2>/dev/null &
  PID=$!
  for _ in $(seq 1 100); do grep -q 'listening tcp' "$RUNS.$name" && break; sleep 0.05; done
  PORT=$(grep -o 'tcp://[^ ]*' "$RUNS.$name" | sed 's/.*://')
}

for rep in $(seq 1 "$REPS"); do
  start_reverb without; W_PID=$PID W_PORT=$PORT
  start_reverb with --metrics 127.0.0.1:0; M_PID=$PID M_PORT=$PORT
  for _ in $(seq 1 100); do grep -q 'listening http' "$RUNS.with" && break; sleep 0.05; done
  METRICS=$(grep -o 'http://[^ ]*' "$RUNS.with")
  sleep 0.2
  for side in "without $W_PORT $W_PID" "with $M_PORT $M_PID"; do
    read -r name port pid <<<"$side"
    (timeout 60 taskset -c 1 "$YARDSTICK/echoload" --port "$port" --conns "$CONNS" \
      --size "$SIZE" --depth 1 --duration "$DURATION" --warmup 1 --pid "$pid" \
      | sed "s/^/$rep $name /" >>"$RUNS") &
  done
  # One scrape in the middle of the window, as a Prometheus server would do.
  sleep "$((1 + DURATION / 2))"
  curl -s "$METRICS/metrics" | grep '^reverb_received_bytes_total{transport="tcp"}' >&2 || true
  wait "$(jobs -p | tail -1)" 2>/dev/null || true
  sleep "$((DURATION / 2 + 2))"
  kill -TERM "$W_PID" "$M_PID" 2>/dev/null || true
  wait 2>/dev/null || true
done
echo "# epoll --threads 1, c=$CONNS s=$SIZE depth=1, $REPS windows of ${DURATION}s, $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$RUNS" <<'PY'
import json, statistics, sys
us = {}
for line in open(sys.argv[1]):
    rep, name, text = line.split(" ", 2)
    try:
        d = json.loads(text)
    except ValueError:
        continue
    if d.get("msgs_per_s") and "server_cpu_pct" in d and not d.get("errors"):
        us.setdefault(rep, {})[name] = (d["server_cpu_pct"] / 100 / d["msgs_per_s"] * 1e6, d["msgs_per_s"])
full = [r for r in us.values() if len(r) == 2]
for name in ("without", "with"):
    print(f"{name:8s} µs/msg {[round(r[name][0], 3) for r in full]} median {statistics.median(r[name][0] for r in full):.3f}"
          f"  msgs/s median {statistics.median(r[name][1] for r in full):.0f}")
ratios = [r["with"][0] / r["without"][0] for r in full]
print(f"ratio with/without {[round(x, 3) for x in ratios]} median {statistics.median(ratios):.3f}")
PY
