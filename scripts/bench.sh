#!/usr/bin/env bash
# Server CPU per message of one reverb model against the C yardstick, measured in the
# same run, alternating the two servers (see bench/README.md).
#
#   scripts/bench.sh MODEL [REPEATS] [DURATION_S]     e.g. scripts/bench.sh epoll 3 3
#
# Server pinned to CPU 0, echoload to CPU 1. For each configuration (c=50 s=1024 depth 1,
# c=50 s=1024 depth 8, c=500 s=1024 depth 1) and each repeat, both servers are measured
# back to back; the table shows the median server CPU per message of each and the ratio
# of the medians (model / c-epoll-echo). Extra reverb flags: REVERB_FLAGS (default
# "--threads 1"). BASELINE=epoll compares against another reverb model instead of C, and
# BASELINE=tokio-echo against the plain tokio echo server in bench/tokio-echo.
set -euo pipefail

model=${1:?usage: scripts/bench.sh MODEL [REPEATS] [DURATION_S]}
repeats=${2:-3}
duration=${3:-3}
flags=${REVERB_FLAGS:---threads 1}
baseline=${BASELINE:-c-epoll-echo}
cd "$(dirname "$0")/.."
source scripts/yardstick.sh
out=$YARDSTICK
[[ $baseline == tokio-echo ]] && build_tokio_echo
cargo build --release --quiet
reverb=target/release/reverb
results=$(mktemp)
trap 'rm -f "$results"; [[ -n ${server:-} ]] && kill "$server" 2>/dev/null || true' EXIT

# A port nobody holds right now (other agents share this machine).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_server NAME PORT: starts the server pinned to CPU 0, sets $server.
start_server() {
    if [[ $1 == c-epoll-echo ]]; then
        taskset -c 0 "$out/c-epoll-echo" "$2" 127.0.0.1 &
    elif [[ $1 == tokio-echo ]]; then
        taskset -c 0 "$TOKIO_ECHO" --port "$2" --runtime current &
    else
        # shellcheck disable=SC2086
        taskset -c 0 "$reverb" serve --model "$1" $flags --tcp "127.0.0.1:$2" >/dev/null &
    fi
    server=$!
    for _ in $(seq 50); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then return; fi
        sleep 0.1
    done
    echo "server $1 did not start on port $2" >&2
    exit 1
}

echo "uptime before: $(uptime)" >&2
n=0
for rep in $(seq "$repeats"); do
    for config in "50 1024 1" "50 1024 8" "500 1024 1"; do
        read -r conns size depth <<<"$config"
        for name in "$model" "$baseline"; do
            n=$((n + 1))
            port=$(free_port)
            start_server "$name" "$port"
            line=$(taskset -c 1 "$out/echoload" --port "$port" --conns "$conns" --size "$size" \
                --depth "$depth" --warmup 1 --duration "$duration" --pid "$server")
            kill -TERM "$server"
            wait "$server" 2>/dev/null || true
            server=
            echo "$rep $name $conns $size $depth $line" >>"$results"
            summary=$(python3 -c "import json,sys; r=json.loads(sys.argv[1]); print('%.0f msg/s, server %.1f%% CPU, errors %d' % (r['msgs_per_s'], r['server_cpu_pct'], r['errors']))" "$line")
            echo "rep $rep $name c=$conns s=$size d=$depth: $summary" >&2
        done
    done
done
echo "uptime after: $(uptime)" >&2

python3 - "$results" "$model" "$baseline" <<'EOF'
import json, statistics, sys
rows = {}
for raw in open(sys.argv[1]):
    rep, name, conns, size, depth, line = raw.split(" ", 5)
    r = json.loads(line)
    if r["errors"] or not r["msgs_per_s"]:
        print(f"ERROR in {name} c={conns} d={depth}: {line.strip()}")
        continue
    us = r["server_cpu_pct"] / 100 / r["msgs_per_s"] * 1e6
    rows.setdefault((int(conns), int(size), int(depth)), {}).setdefault(name, []).append(
        (us, r["msgs_per_s"]))
model, baseline = sys.argv[2], sys.argv[3]
print(f"| config | {model} µs/msg | {baseline} µs/msg | ratio (median) | per-repeat ratios |")
print("|---|---|---|---|---|")
for (conns, size, depth), by in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][2])):
    m = [u for u, _ in by.get(model, [])]
    c = [u for u, _ in by.get(baseline, [])]
    if not m or not c:
        continue
    pairs = " ".join(f"{a / b:.3f}" for a, b in zip(m, c))
    print(f"| c={conns} s={size} depth {depth} | {statistics.median(m):.2f} | "
          f"{statistics.median(c):.2f} | {statistics.median(m) / statistics.median(c):.3f} | {pairs} |")
EOF
