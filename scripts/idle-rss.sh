#!/usr/bin/env bash
# Server memory per idle connection: RSS after opening CONNS connections minus RSS before,
# divided by CONNS (VmRSS from /proc/PID/status).
#
#   scripts/idle-rss.sh MODEL [CONNS] [MESSAGE_BYTES]     e.g. scripts/idle-rss.sh epoll
#   TLS=1 scripts/idle-rss.sh MODEL ...                    the same over TLS
#
# Each connection first sends MESSAGE_BYTES (default 1024; 0 for none) and reads the echo,
# so the server has used that connection's buffers; then all sit idle. With TLS=1 the
# server runs with --tls-self-signed and each client (Python's ssl module) makes its
# handshake first. The server runs with --threads 1 unless REVERB_FLAGS says otherwise.
# Env: REVERB_BIN (default target/release/reverb), SKIP_BUILD (do not build it).
set -euo pipefail

model=${1:?usage: scripts/idle-rss.sh MODEL [CONNS] [MESSAGE_BYTES]}
conns=${2:-10000}
message=${3:-1024}
flags=${REVERB_FLAGS:---threads 1}
mode=plain
[[ -n ${TLS:-} ]] && mode=tls flags="$flags --tls-self-signed"
cd "$(dirname "$0")/.."
[[ -n ${SKIP_BUILD:-} ]] || cargo build --release --quiet
ulimit -n "$(ulimit -Hn)"
if (($(ulimit -n) < conns + 100)); then
    echo "open-file limit $(ulimit -n) is too low for $conns connections" >&2
    exit 1
fi
out=$(mktemp)
# shellcheck disable=SC2086
"${REVERB_BIN:-target/release/reverb}" serve --model "$model" $flags --tcp 127.0.0.1:0 >"$out" 2>/dev/null &
server=$!
client=
trap 'kill "$server" ${client:+"$client"} 2>/dev/null || true; wait 2>/dev/null; rm -f "$out"' EXIT
for _ in $(seq 50); do grep -q listening "$out" && break; sleep 0.1; done
port=$(sed -n 's#^listening tcp://127.0.0.1:##p' "$out")
sleep 0.5
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$server/status"; }
open_fds() { find "/proc/$server/fd" -mindepth 1 -maxdepth 1 | wc -l; }
before=$(rss_kib)
fds_before=$(open_fds)

python3 - "$port" "$conns" "$message" "$mode" >"$out" <<'PY' &
import socket, ssl, sys, time
port, conns, size, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
socks = []
for n in range(conns):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    if mode == "tls":
        s = ctx.wrap_socket(s, server_hostname="localhost")
    if size:
        s.sendall(payload)
        got = b""
        while len(got) < size:
            chunk = s.recv(size - len(got))
            if not chunk:
                sys.exit(f"connection {n} closed early")
            got += chunk
        assert got == payload, f"connection {n}: wrong echo"
    socks.append(s)
print("ready", flush=True)
time.sleep(600)
PY
client=$!
for _ in $(seq 1800); do grep -q ready "$out" 2>/dev/null && break; sleep 0.1; done
grep -q ready "$out" || { echo "client did not finish connecting" >&2; exit 1; }
# The accept loop may still be catching up with the last handshakes.
for _ in $(seq 100); do (($(open_fds) - fds_before >= conns)) && break; sleep 0.1; done
sleep 1
after=$(rss_kib)
echo "mode=$mode model=$model conns=$conns message_bytes=$message flags='$flags'"
echo "rss_before_kib=$before rss_after_kib=$after open_fds=$(open_fds)"
python3 -c "import sys; b, a, n = map(int, sys.argv[1:]); print('rss_per_conn_bytes=%.0f' % ((a - b) * 1024 / n))" \
    "$before" "$after" "$conns"
