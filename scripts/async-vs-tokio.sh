#!/usr/bin/env bash
# async (one binary) vs tokio (another binary), alternating, server CPU 0, echoload CPU 1.
#   ASYNC_BIN=... TOKIO_BIN=... REPEATS=3 DURATION=3 scripts/async-vs-tokio.sh
# Builds the yardstick (bench/) and a release reverb. Prints CPU per message and p99 per
# model and configuration, medians over REPEATS.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/yardstick.sh
cargo build --release --quiet
async_bin=${ASYNC_BIN:-target/release/reverb}
tokio_bin=${TOKIO_BIN:-target/release/reverb}
for rep in $(seq ${REPEATS:-3}); do
  IFS=, read -ra configs <<<"${CONFIGS:-50 1024 1,50 1024 8,500 1024 1}"
  for config in "${configs[@]}"; do
    read -r conns size depth <<<"$config"
    for model in async tokio; do
      bin=$async_bin; [[ $model == tokio ]] && bin=$tokio_bin
      out=$(mktemp)
      taskset -c 0 $bin serve --model $model --threads 1 --tcp 127.0.0.1:0 >$out 2>/dev/null &
      server=$!
      for _ in $(seq 50); do [[ -s $out ]] && break; sleep 0.1; done
      port=$(sed -n 's#^listening tcp://127.0.0.1:##p' $out)
      line=$(taskset -c 1 $YARDSTICK/echoload --port $port --conns $conns --size $size \
          --depth $depth --warmup 1 --duration ${DURATION:-3} --pid $server)
      kill -TERM $server; wait $server 2>/dev/null; rm -f $out
      echo "$rep $model $conns $depth $line"
    done
  done
done | python3 -c '
import sys, json, statistics
rows = {}
for l in sys.stdin:
    rep, model, conns, depth, js = l.split(" ", 4)
    r = json.loads(js)
    us = r["server_cpu_pct"] / 100 / r["msgs_per_s"] * 1e6 if r["msgs_per_s"] else float("nan")
    rows.setdefault((conns, depth), {}).setdefault(model, []).append((us, r["lat_us"]["p99"] / 1000, r["errors"]))
print("| config | async µs/msg | tokio µs/msg | ratio (median) | per-repeat ratios | async p99 ms | tokio p99 ms | p99 per repeat (async/tokio) |")
print("|---|---|---|---|---|---|---|---|")
for (conns, depth), m in sorted(rows.items(), key=lambda kv: (int(kv[0][0]), int(kv[0][1]))):
    a, t = m["async"], m["tokio"]
    ratios = " ".join("%.3f" % (x[0] / y[0]) for x, y in zip(a, t))
    ma, mt = statistics.median(x[0] for x in a), statistics.median(x[0] for x in t)
    pa, pt = statistics.median(x[1] for x in a), statistics.median(x[1] for x in t)
    errs = sum(x[2] for x in a + t)
    per = " ".join("%.0f/%.0f" % (x[1], y[1]) for x, y in zip(a, t))
    print(f"| c={conns} s=1024 depth {depth} | {ma:.2f} | {mt:.2f} | {ma/mt:.3f} | {ratios} | {pa:.1f} | {pt:.1f} | {per} |" + (f" errors {errs}" if errs else ""))
'
