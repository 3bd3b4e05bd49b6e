#!/usr/bin/env bash
# Server CPU per message with TLS against plaintext: the same model, c=50, 1 KiB messages,
# depth 1 and 8, measured back to back with reverb's own bench.
#
#   scripts/tls-cost.sh [MODEL] [REPEATS] [DURATION_S]     e.g. scripts/tls-cost.sh epoll 3 5
#
# Server pinned to CPU 0 (--threads 1 unless REVERB_FLAGS says otherwise), bench to CPU 1.
# Server CPU is utime + stime from /proc/PID/stat across the bench run (no warmup, so every
# message the bench sent is counted: msgs of the JSON report). TLS uses --tls-self-signed
# and `bench tls://... --insecure` (TLS 1.3, TLS_AES_256_GCM_SHA384 with ring). The table
# shows the median of REPEATS runs.
set -euo pipefail

model=${1:-epoll}
repeats=${2:-3}
duration=${3:-5}
flags=${REVERB_FLAGS:---threads 1}
cd "$(dirname "$0")/.."
[[ -n ${SKIP_BUILD:-} ]] || cargo build --release --quiet
reverb=target/release/reverb
clk=$(getconf CLK_TCK)

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# run MODE DEPTH: prints "cpu_us_per_msg msgs_per_s p99_us".
run() {
    local mode=$1 depth=$2 tls_flag= scheme=tcp verify=
    if [[ $mode == tls ]]; then tls_flag=--tls-self-signed scheme=tls verify=--insecure; fi
    out=$(mktemp)
    # shellcheck disable=SC2086
    taskset -c 0 "$reverb" serve --model "$model" $flags $tls_flag --tcp 127.0.0.1:0 >"$out" 2>/dev/null &
    server=$!
    for _ in $(seq 50); do [[ -s $out ]] && break; sleep 0.1; done
    port=$(sed -n 's#^listening tcp://127.0.0.1:##p' "$out")
    before=$(cpu_ticks "$server")
    # shellcheck disable=SC2086
    report=$(taskset -c 1 "$reverb" bench "$scheme://127.0.0.1:$port" $verify --conns 50 \
        --size 1024 --depth "$depth" --duration "$duration" --warmup 0 --json)
    after=$(cpu_ticks "$server")
    kill "$server"
    wait "$server" 2>/dev/null || true
    rm -f "$out"
    python3 -c '
import json, sys
r = json.loads(sys.argv[1]); ticks = int(sys.argv[2]); clk = int(sys.argv[3])
print("%.2f %.0f %.0f" % (ticks / clk * 1e6 / max(r["msgs"], 1), r["msgs_per_s"], r["latency_us"]["p99"]))
' "$report" "$((after - before))" "$clk"
}

median() { sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }

printf '%-6s %-5s %-6s %14s %10s %8s\n' model depth mode cpu_us_per_msg msgs_per_s p99_us
for depth in 1 8; do
    for mode in plain tls; do
        results=$(for _ in $(seq "$repeats"); do run "$mode" "$depth"; done)
        printf '%-6s %-5s %-6s %14s %10s %8s\n' "$model" "$depth" "$mode" \
            "$(cut -d' ' -f1 <<<"$results" | median)" \
            "$(cut -d' ' -f2 <<<"$results" | median)" \
            "$(cut -d' ' -f3 <<<"$results" | median)"
    done
done
