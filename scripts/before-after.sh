#!/usr/bin/env bash
# Server CPU per message of one model before and after a change, and of the C yardstick,
# all three measured at once (see bench/README.md: "measure the two sides at the same
# time"), so whatever else the machine does falls on all of them alike.
#
#   scripts/before-after.sh OLD_REVERB MODEL [REPEATS] [DURATION_S]
#   e.g. scripts/before-after.sh /tmp/old/target/release/reverb epoll 5 3
#
# OLD_REVERB is a release build of the older commit (build it in its own directory:
# `git archive OLD | tar -x -C DIR && cargo build --release --manifest-path DIR/Cargo.toml`).
# The three servers run pinned to CPU 0 with `--threads 1`, one echoload per server pinned
# to CPU 1, over the same window; each repeat covers c=50 and c=500, depth 1 and 8, 1 KiB.
# The table gives the median per-run ratios new/old, old/C and new/C.
set -euo pipefail

old=${1:?usage: scripts/before-after.sh OLD_REVERB MODEL [REPEATS] [DURATION_S]}
model=${2:?usage: scripts/before-after.sh OLD_REVERB MODEL [REPEATS] [DURATION_S]}
repeats=${3:-5}
duration=${4:-3}
cd "$(dirname "$0")/.."
source scripts/yardstick.sh
cargo build --release --quiet
new=target/release/reverb
results=$(mktemp)
servers=()
trap 'rm -f "$results"; kill "${servers[@]}" 2>/dev/null || true' EXIT

# A port nobody holds right now (other programs share this machine).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() {
    for _ in $(seq 50); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return; fi
        sleep 0.1
    done
    echo "no server on port $1" >&2
    exit 1
}

echo "uptime before: $(uptime)" >&2
for rep in $(seq "$repeats"); do
    for config in "50 1024 1" "50 1024 8" "500 1024 1" "500 1024 8"; do
        read -r conns size depth <<<"$config"
        port_old=$(free_port)
        port_new=$(free_port)
        port_c=$(free_port)
        taskset -c 0 "$old" serve --model "$model" --threads 1 --tcp "127.0.0.1:$port_old" \
            >/dev/null 2>&1 &
        pid_old=$!
        taskset -c 0 "$new" serve --model "$model" --threads 1 --tcp "127.0.0.1:$port_new" \
            >/dev/null 2>&1 &
        pid_new=$!
        taskset -c 0 "$YARDSTICK/c-epoll-echo" "$port_c" 127.0.0.1 >/dev/null 2>&1 &
        pid_c=$!
        servers=("$pid_old" "$pid_new" "$pid_c")
        wait_port "$port_old"
        wait_port "$port_new"
        wait_port "$port_c"
        clients=()
        for side in "old $port_old $pid_old" "new $port_new $pid_new" "c $port_c $pid_c"; do
            read -r name port pid <<<"$side"
            (
                line=$(taskset -c 1 "$YARDSTICK/echoload" --port "$port" --conns "$conns" \
                    --size "$size" --depth "$depth" --warmup 1 --duration "$duration" --pid "$pid")
                echo "$rep $name $conns $size $depth $line" >>"$results"
            ) &
            clients+=($!)
        done
        wait "${clients[@]}" || true
        kill -TERM "${servers[@]}" 2>/dev/null || true
        wait "${servers[@]}" 2>/dev/null || true
        servers=()
        echo "repeat $rep c=$conns s=$size depth $depth done" >&2
    done
done
echo "uptime after: $(uptime)" >&2

python3 - "$results" <<'PY'
import json, statistics, sys
rows = {}
for raw in open(sys.argv[1]):
    rep, name, conns, size, depth, line = raw.split(" ", 5)
    r = json.loads(line)
    if r["errors"] or not r["msgs_per_s"]:
        print(f"ERROR in {name} c={conns} depth {depth}: {line.strip()}")
        continue
    us = r["server_cpu_pct"] / 100 / r["msgs_per_s"] * 1e6
    rows.setdefault((int(conns), int(size), int(depth)), {}).setdefault(rep, {})[name] = us
print("| config | old µs/msg | new µs/msg | C µs/msg | new/old | old/C | new/C | per-run new/old |")
print("|---|---|---|---|---|---|---|---|")
for (conns, size, depth), reps in sorted(rows.items()):
    runs = [r for r in reps.values() if len(r) == 3]
    if not runs:
        continue
    med = lambda key: statistics.median(r[key] for r in runs)
    ratio = lambda a, b: statistics.median(r[a] / r[b] for r in runs)
    per_run = " ".join(f"{r['new'] / r['old']:.3f}" for r in runs)
    print(f"| c={conns} s={size} depth {depth} | {med('old'):.2f} | {med('new'):.2f} | "
          f"{med('c'):.2f} | {ratio('new', 'old'):.3f} | {ratio('old', 'c'):.3f} | "
          f"{ratio('new', 'c'):.3f} | {per_run} |")
PY
