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
# Env: DURATION (measured seconds per window, default 3), WARMUP (default 1),
#      NETNS=1: servers and load in two network namespaces joined by a veth pair instead
#      of on loopback (below); needs root. $PAIRED_HOST is the address servers listen on.

source scripts/yardstick.sh
PAIRED_RESULTS=$(mktemp)
PAIRED_LOGS=$(mktemp -d)
declare -A PAIRED_PID=() PAIRED_PORT=()
PAIRED_HOST=127.0.0.1
PAIRED_SERVER_NS=() PAIRED_LOAD_NS=() # command prefixes that enter a namespace
PAIRED_NETNS=()                       # namespaces to delete on exit
trap 'paired_stop; paired_netns_down; rm -rf "$PAIRED_RESULTS" "$PAIRED_LOGS"' EXIT
# A signal still runs the EXIT trap, so no namespace outlives the script.
trap 'exit 130' INT TERM HUP

# NETNS=1: loopback short-cuts the network stack (no device, no qdisc, a larger MTU);
# a veth pair between two namespaces takes the path a packet from another host takes,
# as far as one machine can: the servers live in one namespace, the load in the other.
# Traffic stays on that pair; both namespaces (and with them the pair) are deleted on exit.
paired_netns_up() {
    local server=reverb-srv-$$ load=reverb-load-$$
    PAIRED_NETNS=("$server" "$load")
    ip netns add "$server"
    ip netns add "$load"
    ip link add "rvs$$" netns "$server" type veth peer name "rvl$$" netns "$load"
    ip -n "$server" addr add 10.77.0.1/24 dev "rvs$$"
    ip -n "$load" addr add 10.77.0.2/24 dev "rvl$$"
    ip -n "$server" link set "rvs$$" up
    ip -n "$load" link set "rvl$$" up
    PAIRED_HOST=10.77.0.1
    PAIRED_SERVER_NS=(ip netns exec "$server")
    PAIRED_LOAD_NS=(ip netns exec "$load")
}

paired_netns_down() {
    local ns
    for ns in "${PAIRED_NETNS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    PAIRED_NETNS=()
}

if [[ -n ${NETNS:-} && ${NETNS:-} != 0 ]]; then
    paired_netns_up || {
        echo "NETNS=1: cannot create the namespaces and veth pair (root and iproute2 needed)" >&2
        exit 1
    }
fi

# A port nobody holds right now (other programs share this machine).
paired_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

paired_server() {
    local name=$1 port
    shift
    port=$(paired_free_port)
    # `ip netns exec` and taskset both exec, so $! is the server itself (for --pid).
    taskset -c 0 "${PAIRED_SERVER_NS[@]}" "${@//PORT/$port}" >"$PAIRED_LOGS/$name" 2>&1 &
    PAIRED_PID[$name]=$!
    PAIRED_PORT[$name]=$port
    for _ in $(seq 100); do
        if "${PAIRED_LOAD_NS[@]}" bash -c "exec 3<>/dev/tcp/$PAIRED_HOST/$port" 2>/dev/null; then
            return 0
        fi
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
    timeout $((${DURATION:-3} + ${WARMUP:-1} + 60)) taskset -c 1 "${PAIRED_LOAD_NS[@]}" \
        "$YARDSTICK/echoload" --host "$PAIRED_HOST" --port "${PAIRED_PORT[$1]}" --conns "$3" --size "$4" --depth "$5" \
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
    local path=loopback
    ((${#PAIRED_NETNS[@]})) && path="veth pair between namespaces $PAIRED_HOST"
    echo "# $*; $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores, $path"
}
