#!/usr/bin/env bash
# Compares `reverb bench --threads 1` with the yardstick's C load generator `echoload`,
# both loading the yardstick's c-epoll-echo: server pinned to CPU 0, load to CPU 1,
# the two generators alternated within each repetition.
#
# Usage: scripts/bench-client.sh [REPS] [DURATION_S]
# Env:   YARDSTICK_OUT (default target/yardstick), REVERB (default target/release/reverb),
#        PORT (default 17070), CONFIGS ("conns:size:depth ...", default three configurations)
# Prints one line per run, then per configuration the medians and the ratios
# reverb/echoload of msgs/s and of client CPU per message.
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${1:-3}
DURATION=${2:-4}
WARMUP=1
REVERB=${REVERB:-target/release/reverb}
PORT=${PORT:-17070}
CONFIGS=${CONFIGS:-"1:64:1 50:1024:1 50:1024:8"}

source scripts/yardstick.sh
OUT=$YARDSTICK
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
# Ratios are taken per repetition (each reverb run against the echoload run just before
# it, so both saw the same machine load), then the median over repetitions.
printf '%-12s %12s %12s %9s %11s %11s %9s\n' config echoload_m/s reverb_m/s rate_ratio \
    echoload_us reverb_us cpu_ratio
for config in $CONFIGS; do
    python3 - "$results" "$config" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
config = sys.argv[2]
e = [r for r in rows if r[0] == config and r[1] == "echoload"]
r = [r for r in rows if r[0] == config and r[1] == "reverb"]
med = statistics.median
rate = med(float(b[2]) / float(a[2]) for a, b in zip(e, r))
cpu = med(float(b[3]) / float(a[3]) for a, b in zip(e, r))
print(f"{config:<12} {med(float(x[2]) for x in e):12.0f} {med(float(x[2]) for x in r):12.0f} "
      f"{rate:9.3f} {med(float(x[3]) for x in e):11.3f} {med(float(x[3]) for x in r):11.3f} {cpu:9.3f}")
PY
done
rm -f "$results"
