#!/usr/bin/env bash
# Server CPU per message of `uring --threads 1` before and after a change, against the C
# yardstick, measured in the same windows: the three servers run together pinned to CPU 0,
# three echoload clients together pinned to CPU 1, each client with --pid of its server
# (bench/README.md: whatever the machine does during a window falls on all alike).
#
# Usage: scripts/uring-before-after.sh BEFORE_BINARY [REPS] [DURATION_S]
# Env:   YARDSTICK_OUT (default target/yardstick), REVERB (default target/release/reverb)
# Prints, per configuration (c=50 and c=500, depth 1 and 8, 1 KiB), each server's median
# CPU µs per message, and the medians of the per-window ratios after/before and
# after/c-epoll, before/c-epoll.
set -euo pipefail
cd "$(dirname "$0")/.."

BEFORE=$1 REPS=${2:-5} DURATION=${3:-3}
REVERB=${REVERB:-target/release/reverb}
source scripts/yardstick.sh
[ -x "$REVERB" ] || cargo build --release --quiet
RUNS=$(mktemp)
trap 'rm -f "$RUNS" "$RUNS".*' EXIT

start_reverb() { # BINARY NAME: starts it on CPU 0, sets PID and PORT
  : >"$RUNS.$2"
  taskset -c 0 "$1" serve --model uring --threads 1 --tcp 127.0.0.1:0 >"$RUNS.$2" 2>/dev/null &
  PID=$!
  for _ in $(seq 1 100); do grep -q listening "$RUNS.$2" && break; sleep 0.05; done
  PORT=$(grep -o 'tcp://[^ ]*' "$RUNS.$2" | sed 's/.*://')
}

for config in "50 1" "50 8" "500 1" "500 8"; do
  read -r CONNS DEPTH <<<"$config"
  : >"$RUNS"
  for rep in $(seq 1 "$REPS"); do
    C_PORT=$((20000 + RANDOM % 20000))
    taskset -c 0 "$YARDSTICK/c-epoll-echo" "$C_PORT" >/dev/null 2>&1 &
    C_PID=$!
    start_reverb "$BEFORE" before; B_PID=$PID B_PORT=$PORT
    start_reverb "$REVERB" after; A_PID=$PID A_PORT=$PORT
    sleep 0.2
    for side in "c-epoll $C_PORT $C_PID" "before $B_PORT $B_PID" "after $A_PORT $A_PID"; do
      read -r name port pid <<<"$side"
      (timeout 60 taskset -c 1 "$YARDSTICK/echoload" --port "$port" --conns "$CONNS" \
        --size 1024 --depth "$DEPTH" --duration "$DURATION" --warmup 1 --pid "$pid" \
        | sed "s/^/$rep $name /" >>"$RUNS") &
    done
    wait "$(jobs -p | tail -1)" 2>/dev/null || true
    sleep "$((DURATION + 2))"
    kill -TERM "$C_PID" "$B_PID" "$A_PID" 2>/dev/null || true
    wait 2>/dev/null || true
  done
  echo "# c=$CONNS s=1024 depth=$DEPTH, $REPS windows of ${DURATION}s, $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
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
        us.setdefault(rep, {})[name] = d["server_cpu_pct"] / 100 / d["msgs_per_s"] * 1e6
full = [r for r in us.values() if len(r) == 3]
for name in ("c-epoll", "before", "after"):
    print(f"{name:8s} µs/msg {[round(r[name], 2) for r in full]} median {statistics.median(r[name] for r in full):.2f}")
for a, b in (("after", "before"), ("after", "c-epoll"), ("before", "c-epoll")):
    ratios = [r[a] / r[b] for r in full]
    print(f"ratio {a}/{b} {[round(x, 3) for x in ratios]} median {statistics.median(ratios):.3f}")
PY
done
