#!/usr/bin/env bash
# Server CPU per message with TLS against plaintext: the same model, c=50, 1 KiB messages,
# depth 1 and 8, both sides in the same windows (scripts/lib/paired.sh): a plaintext and a
# TLS server of the same binary pinned to CPU 0, one `reverb bench` each (tcp:// and
# tls://, echoload speaks no TLS) pinned to CPU 1.
#
#   scripts/tls-cost.sh [MODEL] [REPEATS] [DURATION_S]     e.g. scripts/tls-cost.sh epoll 5 3
#
# Server CPU is utime + stime from /proc/PID/stat, sampled when the load starts (each bench
# connects, makes its handshakes, and starts its load at the same --start-at instant) and
# when it ends; messages are the bench's count over its window. TLS uses --tls-self-signed
# and `bench tls://... --insecure` (TLS 1.3, TLS_AES_256_GCM_SHA384 with ring). The servers
# run with --threads 1 unless REVERB_FLAGS says otherwise.
set -euo pipefail

model=${1:-epoll}
repeats=${2:-5}
DURATION=${3:-3}
flags=${REVERB_FLAGS:---threads 1}
cd "$(dirname "$0")/.."
[[ -n ${SKIP_BUILD:-} ]] || cargo build --release --quiet
reverb=${REVERB:-target/release/reverb}
source scripts/lib/paired.sh
clk=$(getconf CLK_TCK)

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

paired_load() { # NAME REP CONNS SIZE DEPTH: the bench's JSON, with the server's CPU
    local scheme=tcp verify= pid=${PAIRED_PID[$1]} report before after
    [[ $1 == tls ]] && scheme=tls verify=--insecure
    # shellcheck disable=SC2086
    taskset -c 1 "$reverb" bench "$scheme://127.0.0.1:${PAIRED_PORT[$1]}" $verify \
        --conns "$3" --size "$4" --depth "$5" --duration "$DURATION" --warmup 0 \
        --start-at "$START_AT" --json >"$PAIRED_LOGS/bench-$1" &
    local bench=$!
    sleep "$(python3 -c "import time; print(max(0, $START_AT - time.time()))")"
    before=$(cpu_ticks "$pid")
    wait "$bench" || true
    after=$(cpu_ticks "$pid")
    python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
r["server_cpu_s"] = int(sys.argv[2]) / int(sys.argv[3])
print(json.dumps({k: r[k] for k in ("msgs", "msgs_per_s", "errors", "server_cpu_s", "latency_us")}))
' "$PAIRED_LOGS/bench-$1" "$((after - before))" "$clk"
}

for rep in $(seq "$repeats"); do
    for depth in 1 8; do
        # shellcheck disable=SC2086
        paired_server plain "$reverb" serve --model "$model" $flags --tcp 127.0.0.1:PORT
        # shellcheck disable=SC2086
        paired_server tls "$reverb" serve --model "$model" $flags --tls-self-signed --tcp 127.0.0.1:PORT
        START_AT=$(python3 -c 'import time; print(f"{time.time() + 2:.3f}")')
        paired_window "$model/c=50/s=1024/depth=$depth" "$rep" 50 1024 "$depth" plain tls
        paired_stop
    done
done
paired_header "TLS against plaintext, $model $flags, $repeats windows of ${DURATION}s"
paired_report --sides plain,tls --ratio tls/plain
