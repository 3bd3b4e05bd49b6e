#!/usr/bin/env bash
# Server CPU per message of the `async` and `tokio` models (`--threads 1`) before and after
# a change, measured in the same windows (scripts/lib/paired.sh: the BEFORE and AFTER
# servers run together pinned to CPU 0, one echoload client each together on CPU 1; which
# side starts first alternates per repeat).
#
# Usage: scripts/async-before-after.sh BEFORE_BINARY [AFTER_BINARY]
# Env:   MODELS (default "async tokio"), REPEATS (5), DURATION (3 s),
#        CONFIGS ("conns size depth,..."; default c=50 and c=500, depth 1 and 8, 1 KiB)
# Prints per model and configuration the median CPU µs per message of each side and the
# median of the per-window ratios after/before.
set -euo pipefail
cd "$(dirname "$0")/.."
old=${1:?usage: scripts/async-before-after.sh BEFORE_BINARY [AFTER_BINARY]}
new=${2:-target/release/reverb}
source scripts/lib/paired.sh
IFS=, read -ra configs <<<"${CONFIGS:-50 1024 1,50 1024 8,500 1024 1,500 1024 8}"
for rep in $(seq "${REPEATS:-5}"); do
    for config in "${configs[@]}"; do
        read -r conns size depth <<<"$config"
        for model in ${MODELS:-async tokio}; do
            paired_server before "$old" serve --model "$model" --threads 1 --tcp "$PAIRED_HOST:PORT"
            paired_server after "$new" serve --model "$model" --threads 1 --tcp "$PAIRED_HOST:PORT"
            paired_window "$model/c=$conns/s=$size/depth=$depth" "$rep" "$conns" "$size" "$depth" \
                before after
            paired_stop
        done
    done
done
paired_header "before and after, ${REPEATS:-5} windows of ${DURATION:-3}s"
paired_report --sides before,after --ratio after/before
