#!/usr/bin/env bash
# Server memory per idle TLS connection, and per idle plaintext connection for comparison
# (scripts/idle-rss.sh, once plain and once with TLS=1).
#
#   scripts/tls-idle-rss.sh MODEL [CONNS] [MESSAGE_BYTES]     e.g. scripts/tls-idle-rss.sh epoll
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: scripts/tls-idle-rss.sh MODEL [CONNS] [MESSAGE_BYTES]}
[[ -n ${SKIP_BUILD:-} ]] || cargo build --release --quiet
SKIP_BUILD=1 scripts/idle-rss.sh "$model" "${2:-10000}" "${3:-1024}"
SKIP_BUILD=1 TLS=1 scripts/idle-rss.sh "$model" "${2:-10000}" "${3:-1024}"
