#!/usr/bin/env bash
# Server CPU per message of the `async` and `tokio` models (`--threads 1`) before and after
# a change, measured in the same windows: the BEFORE and AFTER servers run together pinned
# to CPU 0, one echoload client each together on CPU 1, each with --pid of its server
# (bench/README.md: whatever the machine does during a window falls on both alike). Which
# side starts first alternates per repeat.
#
# Usage: scripts/async-before-after.sh BEFORE_BINARY [AFTER_BINARY]
# Env:   MODELS (default "async tokio"), REPEATS (5), DURATION (3 s),
#        CONFIGS ("conns size depth,..."; default c=50 and c=500, depth 1 and 8, 1 KiB)
# Prints per model and configuration the median CPU µs per message of each side and the
# median of the per-window ratios after/before.
set -uo pipefail
cd "$(dirname "$0")/.."
old=${1:?usage: scripts/async-before-after.sh BEFORE_BINARY [AFTER_BINARY]}
new=${2:-target/release/reverb}
source scripts/yardstick.sh
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
IFS=, read -ra configs <<<"${CONFIGS:-50 1024 1,50 1024 8,500 1024 1,500 1024 8}"
start() { # BINARY MODEL: prints its pid and port
  local log; log=$(mktemp -p "$out")
  taskset -c 0 "$1" serve --model "$2" --threads 1 --tcp 127.0.0.1:0 >"$log" 2>/dev/null &
  local pid=$!
  for _ in $(seq 100); do [[ -s $log ]] && break; sleep 0.05; done
  echo $pid "$(sed -n 's#^listening tcp://127.0.0.1:##p' "$log")"
}
for rep in $(seq ${REPEATS:-5}); do
  for config in "${configs[@]}"; do
    read -r conns size depth <<<"$config"
    for model in ${MODELS:-async tokio}; do
      # Who starts first alternates, so neither side always gets the head start.
      if (( rep % 2 )); then
        read -r opid oport < <(start $old $model); read -r npid nport < <(start $new $model)
      else
        read -r npid nport < <(start $new $model); read -r opid oport < <(start $old $model)
      fi
      args="--conns $conns --size $size --depth $depth --warmup 1 --duration ${DURATION:-3}"
      if (( rep % 2 )); then
        taskset -c 1 "$YARDSTICK/echoload" --port $oport $args --pid $opid >"$out/before.json" &
        a=$!
        taskset -c 1 "$YARDSTICK/echoload" --port $nport $args --pid $npid >"$out/after.json" &
        b=$!
      else
        taskset -c 1 "$YARDSTICK/echoload" --port $nport $args --pid $npid >"$out/after.json" &
        b=$!
        taskset -c 1 "$YARDSTICK/echoload" --port $oport $args --pid $opid >"$out/before.json" &
        a=$!
      fi
      wait $a $b
      kill -TERM $opid $npid; wait $opid $npid 2>/dev/null
      echo "$rep $model $conns $depth $(cat "$out/before.json") $(cat "$out/after.json")"
    done
  done
done | python3 -c '
import sys, json, statistics
rows = {}
for l in sys.stdin:
    rep, model, conns, depth, rest = l.split(" ", 4)
    o, n = [json.loads(x) for x in rest.replace("} {", "}\n{").splitlines()]
    us = lambda r: r["server_cpu_pct"] / 100 / r["msgs_per_s"] * 1e6 if r["msgs_per_s"] else float("nan")
    rows.setdefault((model, int(conns), int(depth)), []).append((us(o), us(n), o["errors"] + n["errors"]))
print("| model | config | before µs/msg | after µs/msg | after/before (median) | per-run ratios |")
print("|---|---|---|---|---|---|")
for (model, c, d), rs in sorted(rows.items()):
    ratios = [n / o for o, n, _ in rs]
    errs = sum(e for *_, e in rs)
    print(f"| {model} | c={c} s=1024 depth {d} | {statistics.median(o for o,_,_ in rs):.2f} | {statistics.median(n for _,n,_ in rs):.2f} | {statistics.median(ratios):.3f} | " + " ".join("%.3f" % r for r in ratios) + " |" + (f" errors {errs}" if errs else ""))
'
