#!/usr/bin/env bash
# The one-core consolidation's "no slowdown" check in one run: server CPU per message of this build against
# a build of an older commit, for `epoll` and `uring` (each beside the C yardstick) and for
# `async` (beside the `tokio` model of the same build, so its figure is its ratio to tokio
# in each build), at c=50 and c=500, depth 1 and 8, 1 KiB.
#
#   scripts/no-slowdown.sh OLD_REVERB [NEW_REVERB]
#   e.g. git archive b7939ce | tar -x -C /tmp/old && \
#        cargo build --release --manifest-path /tmp/old/Cargo.toml --target-dir /tmp/old/target
#        scripts/no-slowdown.sh /tmp/old/target/release/reverb
#
# Every window runs its sides at the same time, servers pinned to CPU 0 and one echoload
# each to CPU 1, and which side starts first alternates (scripts/lib/paired.sh); each
# repeat measures every model and configuration once. Target: each median ratio new/old
# (for async: (new async / new tokio) / (old async / old tokio)) at most 1.03.
# Env: REPEATS (5), DURATION (3 s), CONFIGS ("conns size depth,..."), MODELS ("epoll uring
#      async"), NETNS (see paired.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
old=${1:?usage: scripts/no-slowdown.sh OLD_REVERB [NEW_REVERB]}
new=${2:-target/release/reverb}
[[ -n ${2:-} || -n ${SKIP_BUILD:-} ]] || cargo build --release --quiet
source scripts/lib/paired.sh
IFS=, read -ra configs <<<"${CONFIGS:-50 1024 1,50 1024 8,500 1024 1,500 1024 8}"
ulimit -n "$(ulimit -Hn)"

serve() { # NAME BINARY MODEL
    paired_server "$1" "$2" serve --model "$3" --threads 1 --tcp "$PAIRED_HOST:PORT"
}

paired_header "no slowdown: old $old, new $new, REPEATS=${REPEATS:-5} DURATION=${DURATION:-3}s"
for rep in $(seq "${REPEATS:-5}"); do
    for config in "${configs[@]}"; do
        read -r conns size depth <<<"$config"
        for model in ${MODELS:-epoll uring async}; do
            group="$model/c=$conns/s=$size/depth=$depth"
            if [[ $model == async ]]; then
                serve old-async "$old" async
                serve old-tokio "$old" tokio
                serve new-async "$new" async
                serve new-tokio "$new" tokio
                paired_window "$group" "$rep" "$conns" "$size" "$depth" \
                    old-async old-tokio new-async new-tokio
            else
                serve old "$old" "$model"
                serve new "$new" "$model"
                paired_server c-epoll "$YARDSTICK/c-epoll-echo" PORT "$PAIRED_HOST"
                paired_window "$group" "$rep" "$conns" "$size" "$depth" old new c-epoll
            fi
            paired_stop
        done
    done
done
echo
paired_header "server CPU per message (µs), new against old; target: every ratio ≤ 1.03"
paired_report --sides old,new,c-epoll,old-async,old-tokio,new-async,new-tokio \
    --ratio 'new/old<=1.03' --ratio old/c-epoll --ratio new/c-epoll \
    --ratio '(new-async/new-tokio)/(old-async/old-tokio)<=1.03' \
    --ratio new-async/new-tokio --ratio old-async/old-tokio
