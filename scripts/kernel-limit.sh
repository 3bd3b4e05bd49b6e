#!/usr/bin/env bash
# Every "at the kernel's limit" target in one run, each printed with its verdict:
#
#   server CPU per message, 1 KiB, c=50 and c=500, depth 1 and 8:
#     epoll ≤ 1.00 × c-epoll-echo, uring ≤ 0.90 × c-epoll-echo     (measured together)
#     async ≤ 1.00 × tokio-echo,   tokio ≤ 1.05 × tokio-echo        (measured together)
#   64 KiB, c=50, depth 1: MB/s of every event-driven model ≥ 0.95 × c-epoll-echo's
#     (select, poll, epoll, async, tokio, uring; busy-poll is left out: it spins on the
#     server core and would take it from the side it is paired with)
#   memory per idle connection at 10,000 connections: epoll ≤ 512 B, async and uring
#     ≤ 1 KiB, tokio ≤ 2 KiB
#
#   scripts/kernel-limit.sh                      # REPEATS=5 DURATION=3: about 10 minutes
#   REPEATS=9 DURATION=5 scripts/kernel-limit.sh # the full run, on a quiet machine
#   NETNS=1 PARTS=cpu,rate scripts/kernel-limit.sh
#                      # off loopback: servers and load in two network namespaces joined
#                      # by a veth pair (root; scripts/lib/paired.sh), deleted on exit
#
# Every CPU and throughput figure is the median of REPEATS windows; in each window the
# sides run at the same time, servers pinned to CPU 0 and their echoload clients to CPU 1,
# and which side starts first alternates (scripts/lib/paired.sh). Every reverb model runs
# with --threads 1. tokio-echo is bench/tokio-echo on its current-thread runtime.
# Env: REPEATS (5), DURATION (3 s), CONFIGS ("conns size depth,..." for the CPU targets),
#      IDLE_CONNS (10000), PARTS (cpu,rate,idle: which parts to run), REVERB (binary),
#      NETNS (1: the CPU and throughput parts over a veth pair; idle memory stays on
#      loopback, where the path makes no difference to what a connection holds).
set -euo pipefail
cd "$(dirname "$0")/.."

REPEATS=${REPEATS:-5}
IFS=, read -ra configs <<<"${CONFIGS:-50 1024 1,50 1024 8,500 1024 1,500 1024 8}"
IFS=, read -ra parts <<<"${PARTS:-cpu,rate,idle}"
REVERB=${REVERB:-target/release/reverb}
[[ -n ${SKIP_BUILD:-} ]] || cargo build --release --quiet
source scripts/lib/paired.sh
build_tokio_echo
ulimit -n "$(ulimit -Hn)"

reverb_server() { # NAME MODEL
    paired_server "$1" "$REVERB" serve --model "$2" --threads 1 --tcp "$PAIRED_HOST:PORT"
}
has_part() { [[ " ${parts[*]} " == *" $1 "* ]]; }

paired_header "kernel-limit: REPEATS=$REPEATS DURATION=${DURATION:-3}s, $($REVERB --version 2>/dev/null | head -1)"
if has_part cpu; then
    for config in "${configs[@]}"; do
        read -r conns size depth <<<"$config"
        for rep in $(seq "$REPEATS"); do
            paired_server c-epoll "$YARDSTICK/c-epoll-echo" PORT "$PAIRED_HOST"
            reverb_server epoll epoll
            reverb_server uring uring
            paired_window "c=$conns/s=$size/depth=$depth/vs-c" "$rep" "$conns" "$size" "$depth" \
                c-epoll epoll uring
            paired_stop
            paired_server tokio-echo "$TOKIO_ECHO" --host "$PAIRED_HOST" --port PORT --runtime current
            reverb_server async async
            reverb_server tokio tokio
            paired_window "c=$conns/s=$size/depth=$depth/vs-tokio" "$rep" "$conns" "$size" "$depth" \
                tokio-echo async tokio
            paired_stop
        done
    done
    echo
    paired_header "server CPU per message (µs), lower is better"
    paired_report --metric cpu --sides c-epoll,epoll,uring,tokio-echo,async,tokio \
        --ratio 'epoll/c-epoll<=1.00' --ratio 'uring/c-epoll<=0.90' \
        --ratio 'async/tokio-echo<=1.00' --ratio 'tokio/tokio-echo<=1.05'
    : >"$PAIRED_RESULTS"
fi

if has_part rate; then
    for rep in $(seq "$REPEATS"); do
        for model in select poll epoll async tokio uring; do
            paired_server c-epoll "$YARDSTICK/c-epoll-echo" PORT "$PAIRED_HOST"
            reverb_server "$model" "$model"
            paired_window "c=50/s=65536/depth=1/$model" "$rep" 50 65536 1 c-epoll "$model"
            paired_stop
        done
    done
    echo
    paired_header "throughput (MB/s), 64 KiB, c=50, depth 1; higher is better"
    paired_report --metric rate --sides c-epoll \
        $(for m in select poll epoll async tokio uring; do echo "--ratio $m/c-epoll>=0.95"; done)
    : >"$PAIRED_RESULTS"
fi

if has_part idle; then
    echo
    paired_header "memory per idle connection, ${IDLE_CONNS:-10000} connections, each echoed 1 KiB first"
    for target in "epoll 512" "async 1024" "uring 1024" "tokio 2048"; do
        read -r model bound <<<"$target"
        line=$(SKIP_BUILD=1 REVERB_BIN=$REVERB scripts/idle-rss.sh "$model" "${IDLE_CONNS:-10000}" 1024 |
            grep rss_per_conn_bytes) || line="rss_per_conn_bytes=failed"
        bytes=${line##*=}
        verdict=FAIL
        [[ $bytes =~ ^-?[0-9]+$ ]] && ((bytes <= bound)) && verdict=PASS
        echo "  $model: $bytes B per idle connection   target ≤ $bound B: $verdict"
    done
fi
