# Paired measurement, sourced by the benchmark scripts (from the repository root).
#
# Sequential runs on a shared machine swing by ±20 %, so two servers are only compared in
# the same window: every side's server runs pinned to CPU 0 at the same time, every side's
# load runs pinned to CPU 1 at the same time, and whatever else the machine does falls on
# all sides alike (bench/README.md). Which side starts first alternates with the repeat.
#
#   source scripts/lib/paired.sh
#   paired_server NAME CMD...     starts a server on CPU 0; the word PORT in CMD becomes a
#                                 free port; sets PAIRED_PID[NAME] and PAIRED_PORT[NAME]
#   paired_window GROUP REP CONNS SIZE DEPTH NAME...
#                                 drives every NAMEd server at once (paired_load), appends
#                                 one "GROUP REP NAME JSON" line each to $PAIRED_RESULTS
#   paired_stop                   stops every server started with paired_server
#   paired_report [ARGS...]       the summary (scripts/lib/paired.py; see its --help)
#
# The load is echoload with --pid (server CPU from /proc/PID/stat over the window); a
# script may redefine paired_load NAME REP CONNS SIZE DEPTH to drive a side otherwise, as
# long as it prints one JSON object with msgs_per_s, server_cpu_pct and errors.
# Env: DURATION (measured seconds per window, default 3), WARMUP (default 1).

source scripts/yardstick.sh
PAIRED_RESULTS=$(mktemp)
PAIRED_LOGS=$(mktemp -d)
declare -A PAIRED_PID=() PAIRED_PORT=()
trap 'paired_stop; rm -rf "$PAIRED_RESULTS" "$PAIRED_LOGS"' EXIT

# A port nobody holds right now (other programs share this machine).
paired_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

paired_server() {
    local name=$1 port
    shift
    port=$(paired_free_port)
    taskset -c 0 "${@//PORT/$port}" >"$PAIRED_LOGS/$name" 2>&1 &
    PAIRED_PID[$name]=$!
    PAIRED_PORT[$name]=$port
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "server $name did not listen on port $port: $(head -c 300 "$PAIRED_LOGS/$name")" >&2
    return 1
}

paired_stop() {
    local pids=("${PAIRED_PID[@]}")
    ((${#pids[@]})) || return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    PAIRED_PID=() PAIRED_PORT=()
}

paired_load() { # NAME REP CONNS SIZE DEPTH
    timeout $((${DURATION:-3} + ${WARMUP:-1} + 60)) taskset -c 1 "$YARDSTICK/echoload" \
        --port "${PAIRED_PORT[$1]}" --conns "$3" --size "$4" --depth "$5" \
        --warmup "${WARMUP:-1}" --duration "${DURATION:-3}" --pid "${PAIRED_PID[$1]}"
}

paired_window() {
    local group=$1 rep=$2 conns=$3 size=$4 depth=$5 name line
    shift 5
    local names=("$@") pids=()
    if ((rep % 2 == 0)); then # alternate who starts first
        local reversed=()
        for name in "${names[@]}"; do reversed=("$name" "${reversed[@]}"); done
        names=("${reversed[@]}")
    fi
    for name in "${names[@]}"; do
        (
            line=$(paired_load "$name" "$rep" "$conns" "$size" "$depth" | tail -1)
            echo "$group $rep $name ${line:-{\}}" >>"$PAIRED_RESULTS"
        ) &
        pids+=($!)
    done
    wait "${pids[@]}" || true
}

paired_report() {
    python3 scripts/lib/paired.py "$PAIRED_RESULTS" "$@"
}

# The header every measurement prints: when, and how busy the machine was.
paired_header() {
    echo "# $*; $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores"
}
