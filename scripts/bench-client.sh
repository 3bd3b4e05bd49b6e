#!/usr/bin/env bash
# Compares `reverb bench --threads 1` with the yardstick's C load generator `echoload`,
# both loading the yardstick's c-epoll-echo: server pinned to CPU 0, load to CPU 1,
# the two generators alternated within each repetition.
#
# Usage: scripts/bench-client.sh [REPS] [DURATION_S]
# Env:   YARDSTICK_OUT (default /tmp/yardstick), REVERB (default target/release/reverb),
#        PORT (default 17070), CONFIGS ("conns:size:depth ...", default the issue's three)
# Prints one line per run, then per configuration the medians and the ratios
# reverb/echoload of msgs/s and of client CPU per message.
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${1:-3}
DURATION=${2:-4}
WARMUP=1
OUT=${YARDSTICK_OUT:-/tmp/yardstick}
REVERB=${REVERB:-target/release/reverb}
PORT=${PORT:-17070}
CONFIGS=${CONFIGS:-"1:64:1 50:1024:1 50:1024:8"}

make -s -C /work/shared/yardstick OUT="$OUT" >/dev/null
[ -x "$REVERB" ] || cargo build --release --quiet

taskset -c 0 "$OUT/c-epoll-echo" "$PORT" 127.0.0.1 >/dev/null 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
sleep 0.3

echo "# $(date -u +%FT%TZ) load: $(cut -d' ' -f1-3 /proc/loadavg)"
results=$(mktemp)
for config in $CONFIGS; do
    IFS=: read -r conns size depth <<<"$config"
    for rep in $(seq "$REPS"); do
        e=$(taskset -c 1 "$OUT/echoload" --port "$PORT" --conns "$conns" --size "$size" \
            --depth "$depth" --duration "$DURATION" --warmup "$WARMUP")
        r=$(taskset -c 1 "$REVERB" bench "127.0.0.1:$PORT" --conns "$conns" --size "$size" \
            --depth "$depth" --duration "$DURATION" --warmup "$WARMUP" --threads 1 --json)
        for tool in echoload reverb; do
            json=$e; [ "$tool" = reverb ] && json=$r
            line=$(jq -r --arg tool "$tool" --arg config "$config" \
                '[$config, $tool, .msgs_per_s, (.client_cpu_s / .msgs * 1e6), .errors + (.mismatches // 0)] | @tsv' <<<"$json")
            echo "$line" | tee -a "$results"
        done
    done
done

echo
printf '%-12s %14s %14s %10s %12s %12s %10s\n' config echoload_msg/s reverb_msg/s ratio \
    echoload_us/m reverb_us/m cpu_ratio
for config in $CONFIGS; do
    python3 - "$results" "$config" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
config = sys.argv[2]
def med(tool, col):
    return statistics.median(float(r[col]) for r in rows if r[0] == config and r[1] == tool)
e_rate, r_rate = med("echoload", 2), med("reverb", 2)
e_cpu, r_cpu = med("echoload", 3), med("reverb", 3)
print(f"{config:<12} {e_rate:14.0f} {r_rate:14.0f} {r_rate / e_rate:10.3f} {e_cpu:12.3f} {r_cpu:12.3f} {r_cpu / e_cpu:10.3f}")
PY
done
rm -f "$results"
