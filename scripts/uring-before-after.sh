#!/usr/bin/env bash
# Server CPU per message of `uring --threads 1` before and after a change, against the C
# yardstick, measured in the same windows (scripts/lib/paired.sh: the three servers run
# together pinned to CPU 0, their echoload clients together pinned to CPU 1).
#
# Usage: scripts/uring-before-after.sh BEFORE_BINARY [REPS] [DURATION_S]
# Env:   YARDSTICK_OUT (default target/yardstick), REVERB (default target/release/reverb),
#        CONFIGS ("conns size depth,...", default "50 1024 1,50 1024 8,500 1024 1,500 1024 8"),
#        METRIC (cpu, the default, or rate: MB/s, e.g. CONFIGS="50 65536 1" METRIC=rate)
# Prints, per configuration, each server's median CPU µs per message (or MB/s), and the
# medians of the per-window ratios after/before and after/c-epoll, before/c-epoll.
set -euo pipefail
cd "$(dirname "$0")/.."

BEFORE=${1:?usage: scripts/uring-before-after.sh BEFORE_BINARY [REPS] [DURATION_S]}
REPS=${2:-5} DURATION=${3:-3}
REVERB=${REVERB:-target/release/reverb}
[ -x "$REVERB" ] || cargo build --release --quiet
source scripts/lib/paired.sh

IFS=, read -ra configs <<<"${CONFIGS:-50 1024 1,50 1024 8,500 1024 1,500 1024 8}"
for config in "${configs[@]}"; do
    read -r conns size depth <<<"$config"
    for rep in $(seq "$REPS"); do
        paired_server c-epoll "$YARDSTICK/c-epoll-echo" PORT "$PAIRED_HOST"
        paired_server before "$BEFORE" serve --model uring --threads 1 --tcp "$PAIRED_HOST:PORT"
        paired_server after "$REVERB" serve --model uring --threads 1 --tcp "$PAIRED_HOST:PORT"
        paired_window "c=$conns/s=$size/depth=$depth" "$rep" "$conns" "$size" "$depth" c-epoll before after
        paired_stop
    done
done
paired_header "uring before and after, $REPS windows of ${DURATION}s"
paired_report --metric "${METRIC:-cpu}" --sides c-epoll,before,after \
    --ratio after/before --ratio after/c-epoll --ratio before/c-epoll
