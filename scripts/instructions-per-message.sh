#!/usr/bin/env bash
# User-space instructions per reply of one echo server, counted by callgrind (valgrind):
# a figure that does not depend on what else the machine runs, for comparing hot paths
# where hardware counters are missing (this VM) or CPU-time ratios drown in noise.
#
#   scripts/instructions-per-message.sh CONNS DEPTH CMD...     (the word PORT in CMD
#                                                               becomes a free port)
#   scripts/instructions-per-message.sh 50 1 target/release/reverb serve --model epoll \
#       --threads 1 --tcp 127.0.0.1:PORT
#   scripts/instructions-per-message.sh 50 1 target/yardstick/c-epoll-echo PORT 127.0.0.1
#
# The server runs under callgrind with instrumentation off, pinned to CPU 0; echoload
# (1 KiB messages, pinned to CPU 1) connects and warms up; then, over the same DURATION
# seconds, callgrind counts the server's instructions and `perf stat` its sendto calls.
# Prints both and instructions per sendto: one sendto per message at depth 1 (at depth 8
# one reply write carries several messages). Under valgrind the server runs some 50 times
# slower, so its waits return more events each than in a real run: the figure is the
# user-space code per reply, not the cost of waking up, and kernel work is not in it.
# Env: DURATION (4 s), WARMUP (2 s), OUT (callgrind's output file, kept for
# callgrind_annotate; default a temporary file, deleted).
set -euo pipefail
cd "$(dirname "$0")/.."
conns=${1:?usage: scripts/instructions-per-message.sh CONNS DEPTH CMD...}
depth=${2:?usage: scripts/instructions-per-message.sh CONNS DEPTH CMD...}
shift 2
((${#@})) || { echo "usage: scripts/instructions-per-message.sh CONNS DEPTH CMD..." >&2; exit 2; }
for tool in valgrind callgrind_control perf taskset; do
    command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install valgrind linux-perf util-linux)" >&2; exit 1; }
done
source scripts/yardstick.sh
duration=${DURATION:-4} warmup=${WARMUP:-2}
out=${OUT:-$(mktemp)}
logs=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
taskset -c 0 valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
    "${@//PORT/$port}" >"$logs/server" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -rf "$logs"; [[ -n ${OUT:-} ]] || rm -f "$out"*' EXIT
for _ in $(seq 300); do
    bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null && break
    sleep 0.1
done
timeout $((warmup + duration + 60)) taskset -c 1 "$YARDSTICK/echoload" --port "$port" --conns "$conns" \
    --size 1024 --depth "$depth" --warmup "$warmup" --duration $((duration + 2)) >"$logs/load" &
load=$!
sleep "$warmup"
callgrind_control -i on "$server" >/dev/null 2>&1
perf stat -x, -e syscalls:sys_enter_sendto -p "$server" -- sleep "$duration" 2>"$logs/sends"
callgrind_control -i off "$server" >/dev/null 2>&1
callgrind_control -d "$server" >/dev/null 2>&1
wait "$load" || true
sends=$(awk -F, '/sys_enter_sendto/ {print $1}' "$logs/sends")
instructions=$(callgrind_annotate "$out".* 2>/dev/null | awk '/PROGRAM TOTALS/ && !n++ {gsub(",", "", $1); print $1}')
[[ $sends =~ ^[0-9]+$ && $sends -gt 0 && $instructions =~ ^[0-9]+$ ]] || {
    echo "no count: sendto '$sends', instructions '$instructions' ($(head -c 300 "$logs/server"))" >&2
    exit 1
}
echo "c=$conns depth=$depth: $instructions instructions, $sends sendto, $((instructions / sends)) per sendto: $*"
