#!/usr/bin/env bash
# Where `uring` and the C epoll server spend their CPU under the same load: each server
# alone on CPU 0, echoload on CPU 1, then `perf stat` (task-clock, system calls) and
# `perf record -g` of the server while the load runs, and a report of the top symbols.
#
#   scripts/uring-profile.sh [CONNS] [DEPTH] [SECONDS]     e.g. scripts/uring-profile.sh 50 8 3
#   NETNS=1 scripts/uring-profile.sh ...                   over a veth pair (scripts/lib/paired.sh)
#
# Env: REVERB (default target/release/reverb), OUT (default target/uring-profile: the
# perf.data files and reports), SIZE (1024), TOP (25 symbols per report).
set -euo pipefail
cd "$(dirname "$0")/.."
conns=${1:-50} depth=${2:-8} seconds=${3:-3}
REVERB=${REVERB:-target/release/reverb}
OUT=${OUT:-target/uring-profile}
size=${SIZE:-1024}
command -v perf >/dev/null || { echo "perf is needed (apt-get install linux-perf)" >&2; exit 1; }
[ -x "$REVERB" ] || cargo build --release --quiet
source scripts/lib/paired.sh
mkdir -p "$OUT"

profile() { # NAME: the server PAIRED_PID[NAME] under load, profiled
    local name=$1 pid=${PAIRED_PID[$1]}
    DURATION=$((seconds + 2)) WARMUP=1 paired_load "$name" 1 "$conns" "$size" "$depth" >"$OUT/$name.load" &
    local load=$!
    sleep 1.5
    # Both attach to the server for the same span, well inside the load's window.
    perf stat -e task-clock,raw_syscalls:sys_enter -p "$pid" -o "$OUT/$name.stat" -- sleep "$seconds" &
    local stat=$!
    perf record -g -p "$pid" -o "$OUT/$name.data" -- sleep "$seconds" 2>"$OUT/$name.record-log"
    wait "$stat" "$load" || true
    { perf report -i "$OUT/$name.data" --no-children --sort symbol --stdio 2>/dev/null |
        grep -E '^ +[0-9.]+%' | sed 's/  */ /g' | head -"${TOP:-25}"; } >"$OUT/$name.top" || true
}

paired_header "uring profile: c=$conns s=$size depth=$depth, ${seconds}s each"
paired_server c-epoll "$YARDSTICK/c-epoll-echo" PORT "$PAIRED_HOST"
profile c-epoll
paired_stop
paired_server uring "$REVERB" serve --model uring --threads 1 --tcp "$PAIRED_HOST:PORT"
profile uring
paired_stop
for name in c-epoll uring; do
    echo "== $name: $(tail -1 "$OUT/$name.load")"
    grep -E 'task-clock|sys_enter' "$OUT/$name.stat" | sed 's/^ */  /'
    sed 's/^/  /' "$OUT/$name.top"
done
