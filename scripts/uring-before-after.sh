#!/usr/bin/env bash
# Server CPU per message of `uring --threads 1` before and after a change, against the C
# yardstick, measured in the same windows (scripts/lib/paired.sh: the three servers run
# together pinned to CPU 0, their echoload clients together pinned to CPU 1).
#
# Usage: scripts/uring-before-after.sh BEFORE_BINARY [REPS] [DURATION_S]
# Env:   YARDSTICK_OUT (default target/yardstick), REVERB (default target/release/reverb)
# Prints, per configuration (c=50 and c=500, depth 1 and 8, 1 KiB), each server's median
# CPU µs per message, and the medians of the per-window ratios after/before and
# after/c-epoll, before/c-epoll.
set -euo pipefail
cd "$(dirname "$0")/.."

BEFORE=${1:?usage: scripts/uring-before-after.sh BEFORE_BINARY [REPS] [DURATION_S]}
REPS=${2:-5} DURATION=${3:-3}
REVERB=${REVERB:-target/release/reverb}
[ -x "$REVERB" ] || cargo build --release --quiet
source scripts/lib/paired.sh

for config in "50 1" "50 8" "500 1" "500 8"; do
    read -r conns depth <<<"$config"
    for rep in $(seq "$REPS"); do
        paired_server c-epoll "$YARDSTICK/c-epoll-echo" PORT "$PAIRED_HOST"
        paired_server before "$BEFORE" serve --model uring --threads 1 --tcp "$PAIRED_HOST:PORT"
        paired_server after "$REVERB" serve --model uring --threads 1 --tcp "$PAIRED_HOST:PORT"
        paired_window "c=$conns/s=1024/depth=$depth" "$rep" "$conns" 1024 "$depth" c-epoll before after
        paired_stop
    done
done
paired_header "uring before and after, $REPS windows of ${DURATION}s"
paired_report --sides c-epoll,before,after \
    --ratio after/before --ratio after/c-epoll --ratio before/c-epoll
