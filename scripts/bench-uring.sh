#!/usr/bin/env bash
# Compares `reverb serve --model uring --threads 1` with the yardstick's c-epoll-echo under
# the yardstick's echoload: server pinned to CPU 0, load to CPU 1, the two servers
# alternated within each repetition, server CPU per message from echoload's --pid.
#
# Usage: scripts/bench-uring.sh CONNS SIZE DEPTH [REPS] [DURATION_S]
# Env:   YARDSTICK_OUT (default target/yardstick), REVERB (default target/release/reverb)
# Prints each server's per-run CPU µs per message, then the per-repetition ratios
# uring / c-epoll and their median (runs without a CPU reading are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."

CONNS=$1 SIZE=$2 DEPTH=$3 REPS=${4:-5} DURATION=${5:-2}
REVERB=${REVERB:-target/release/reverb}
source scripts/yardstick.sh
OUT=$YARDSTICK
[ -x "$REVERB" ] || cargo build --release --quiet
RUNS=$(mktemp)
LISTEN=$(mktemp)
trap 'rm -f "$RUNS" "$LISTEN"' EXIT

for _ in $(seq 1 "$REPS"); do
  for server in c-epoll uring; do
    if [ "$server" = c-epoll ]; then
      PORT=$((20000 + RANDOM % 20000))
      taskset -c 0 "$OUT/c-epoll-echo" "$PORT" >/dev/null 2>&1 &
      PID=$!
      sleep 0.2
    else
      : >"$LISTEN"
      taskset -c 0 "$REVERB" serve --model uring --threads 1 --tcp 127.0.0.1:0 >"$LISTEN" 2>/dev/null &
      PID=$!
      for _ in $(seq 1 50); do grep -q listening "$LISTEN" && break; sleep 0.05; done
      PORT=$(grep -o 'tcp://[^ ]*' "$LISTEN" | sed 's/.*://')
    fi
    RESULT=$(timeout 60 taskset -c 1 "$OUT/echoload" --port "$PORT" --conns "$CONNS" \
      --size "$SIZE" --depth "$DEPTH" --duration "$DURATION" --warmup 0.5 --pid "$PID" || true)
    kill -TERM "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    echo "$server $RESULT" >>"$RUNS"
  done
done

echo "# c=$CONNS s=$SIZE depth=$DEPTH, $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$RUNS" <<'PY'
import json, statistics, sys
runs, ratios, last = {"c-epoll": [], "uring": []}, [], None
for line in open(sys.argv[1]):
    name, text = line.split(" ", 1)
    try:
        d = json.loads(text)
    except ValueError:
        last = None
        continue
    if not d.get("msgs_per_s") or "server_cpu_pct" not in d:
        last = None
        continue
    us = d["server_cpu_pct"] / 100 / d["msgs_per_s"] * 1e6
    runs[name].append((us, d["msgs_per_s"], d["errors"]))
    if name == "c-epoll":
        last = us
    elif last:
        ratios.append(us / last)
        last = None
for name, v in runs.items():
    print(f"{name:8s} µs/msg {[round(x[0], 3) for x in v]} median {statistics.median(x[0] for x in v):.3f}"
          f"  msgs/s median {statistics.median(x[1] for x in v):.0f}  errors {sum(x[2] for x in v)}")
print(f"ratio uring/c-epoll {[round(r, 3) for r in ratios]} median {statistics.median(ratios):.3f}")
PY
