#!/usr/bin/env bash
# p99 at c=500 s=1024 depth 1, async vs tokio, alternating; server CPU 0, load CPU 1.
# Builds the yardstick (bench/) and a release reverb.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/yardstick.sh
cargo build --release --quiet
reverb=${REVERB:-target/release/reverb}
conns=${CONNS:-500}; depth=${DEPTH:-1}
for rep in $(seq ${REPEATS:-3}); do
  for model in async tokio; do
    out=$(mktemp)
    taskset -c 0 $reverb serve --model $model --threads 1 --tcp 127.0.0.1:0 >$out 2>/dev/null &
    server=$!
    for _ in $(seq 50); do [[ -s $out ]] && break; sleep 0.1; done
    port=$(sed -n 's#^listening tcp://127.0.0.1:##p' $out)
    line=$(taskset -c 1 $YARDSTICK/echoload --port $port --conns $conns --size 1024 --depth $depth --warmup 1 --duration 3 --pid $server)
    kill -TERM $server; wait $server 2>/dev/null
    rm -f $out
    echo "$rep $model $line"
  done
done | python3 -c "
import sys,json
for l in sys.stdin:
    p=l.split(' ',2)
    r=json.loads(p[2]); print(p[0],p[1],'msgs/s=%.0f p50=%.2fms p99=%.2fms cpu%%=%.1f us/msg=%.2f errors=%d'%(r['msgs_per_s'],r['lat_us']['p50']/1000,r['lat_us']['p99']/1000,r['server_cpu_pct'],r['server_cpu_pct']/100/r['msgs_per_s']*1e6,r['errors']))
"
