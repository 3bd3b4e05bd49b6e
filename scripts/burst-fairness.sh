#!/usr/bin/env bash
# Fairness under bursts: 50 connections each keeping 2 messages of 256 KiB in flight,
# round-trip latency p99 and maximum of each model against the others, measured with
# `reverb bench` in the same windows (scripts/lib/paired.sh: the servers together on CPU 0,
# one bench each together on CPU 1). A model that lets one connection take more than its
# share of a turn shows it here as a long tail.
#
#   scripts/burst-fairness.sh [REPEATS] [DURATION_S]      e.g. scripts/burst-fairness.sh 5 5
#
# Targets: uring's p99 and max at most 1.5 x epoll's; epoll, async and tokio within 1.5 x
# of each other (the same check). Env: CONNS (50), SIZE (262144), DEPTH (2), REVERB,
# ONLY_URING (1: skip the epoll/async/tokio group), URING_BEFORE (a second uring binary, run
# as side "before" in the uring windows, for a paired before/after), TASKS_BEFORE (a second
# binary whose async and tokio run as sides "async-before" and "tokio-before" in the
# epoll/async/tokio windows), ONLY_TASKS (1: skip the uring group).
set -euo pipefail
cd "$(dirname "$0")/.."
repeats=${1:-5}
DURATION=${2:-5}
conns=${CONNS:-50} size=${SIZE:-262144} depth=${DEPTH:-2}
REVERB=${REVERB:-target/release/reverb}
[[ -n ${SKIP_BUILD:-} ]] || cargo build --release --quiet
source scripts/lib/paired.sh

paired_load() { # NAME REP CONNS SIZE DEPTH: the bench's JSON
    timeout $((DURATION + 60)) taskset -c 1 "${PAIRED_LOAD_NS[@]}" \
        "$REVERB" bench "tcp://$PAIRED_HOST:${PAIRED_PORT[$1]}" \
        --conns "$3" --size "$4" --depth "$5" --warmup 1 --duration "$DURATION" --json |
        python3 -c 'import json, sys; r = json.load(sys.stdin); print(json.dumps({k: r[k] for k in ("msgs", "msgs_per_s", "errors", "latency_us")}))'
}

for rep in $(seq "$repeats"); do
    if [[ -n ${ONLY_TASKS:-} ]]; then :; else
    for model in epoll uring; do
        paired_server "$model" "$REVERB" serve --model "$model" --threads 1 --tcp "$PAIRED_HOST:PORT"
    done
    sides=(epoll uring)
    if [[ -n ${URING_BEFORE:-} ]]; then
        paired_server before "$URING_BEFORE" serve --model uring --threads 1 --tcp "$PAIRED_HOST:PORT"
        sides+=(before)
    fi
    paired_window "uring-vs-epoll" "$rep" "$conns" "$size" "$depth" "${sides[@]}"
    paired_stop
    fi
    [[ -z ${ONLY_URING:-} ]] || continue
    for model in epoll async tokio; do
        paired_server "$model" "$REVERB" serve --model "$model" --threads 1 --tcp "$PAIRED_HOST:PORT"
    done
    sides=(epoll async tokio)
    if [[ -n ${TASKS_BEFORE:-} ]]; then
        for model in async tokio; do
            paired_server "$model-before" "$TASKS_BEFORE" serve --model "$model" --threads 1 --tcp "$PAIRED_HOST:PORT"
            sides+=("$model-before")
        done
    fi
    paired_window "epoll-async-tokio" "$rep" "$conns" "$size" "$depth" "${sides[@]}"
    paired_stop
done
for metric in p99 max; do
    paired_header "burst fairness: $metric latency, c=$conns s=$size depth=$depth, $repeats windows of ${DURATION}s"
    paired_report --metric "$metric" --sides epoll,uring,before,async,tokio${TASKS_BEFORE:+,async-before,tokio-before} \
        --ratio 'uring/epoll<=1.5' ${URING_BEFORE:+--ratio before/epoll --ratio uring/before} \
        ${TASKS_BEFORE:+--ratio async/async-before --ratio tokio/tokio-before --ratio async-before/epoll --ratio tokio-before/epoll} \
        --ratio 'async/epoll<=1.5' --ratio 'tokio/epoll<=1.5' \
        --ratio 'epoll/async<=1.5' --ratio 'epoll/tokio<=1.5' --ratio 'async/tokio<=1.5' \
        --ratio 'tokio/async<=1.5'
done
