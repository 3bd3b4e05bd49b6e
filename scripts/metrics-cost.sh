#!/usr/bin/env bash
# What counting costs: server CPU per message of `epoll --threads 1` with --metrics
# (counting on, and one scrape of /metrics during each window) against the same binary
# without it, measured in the same windows (scripts/lib/paired.sh).
#
# Usage: scripts/metrics-cost.sh [REPS] [DURATION_S] [CONNS] [SIZE]
# Env:   YARDSTICK_OUT (default target/yardstick), REVERB (default target/release/reverb)
# Prints each side's CPU µs per message per window and the median of the per-window
# ratios with/without.
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${1:-7} DURATION=${2:-3} CONNS=${3:-50} SIZE=${4:-64}
REVERB=${REVERB:-target/release/reverb}
[ -x "$REVERB" ] || cargo build --release --quiet
source scripts/lib/paired.sh

for rep in $(seq "$REPS"); do
    paired_server without "$REVERB" serve --model epoll --threads 1 --tcp 127.0.0.1:PORT
    metrics_port=$(paired_free_port)
    paired_server with "$REVERB" serve --model epoll --threads 1 --tcp 127.0.0.1:PORT \
        --metrics "127.0.0.1:$metrics_port"
    # One scrape in the middle of the window, as a Prometheus server would do.
    (sleep "$((1 + DURATION / 2))"
     curl -s "http://127.0.0.1:$metrics_port/metrics" |
         grep '^reverb_received_bytes_total{transport="tcp"}' >&2 || true) &
    scrape=$!
    paired_window "c=$CONNS/s=$SIZE/depth=1" "$rep" "$CONNS" "$SIZE" 1 without with
    wait "$scrape"
    paired_stop
done
paired_header "epoll --threads 1 with and without --metrics, $REPS windows of ${DURATION}s"
paired_report --sides without,with --ratio with/without
