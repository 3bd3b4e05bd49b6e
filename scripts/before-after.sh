#!/usr/bin/env bash
# Server CPU per message of one model before and after a change, and of the C yardstick,
# all three measured in the same windows (scripts/lib/paired.sh), so whatever else the
# machine does falls on all of them alike.
#
#   scripts/before-after.sh OLD_REVERB MODEL [REPEATS] [DURATION_S]
#   e.g. scripts/before-after.sh /tmp/old/target/release/reverb epoll 5 3
#
# OLD_REVERB is a release build of the older commit (build it in its own directory:
# `git archive OLD | tar -x -C DIR && cargo build --release --manifest-path DIR/Cargo.toml`).
# The three servers run pinned to CPU 0 with `--threads 1`, one echoload per server pinned
# to CPU 1, over the same window; each repeat covers c=50 and c=500, depth 1 and 8, 1 KiB.
# The report gives the median per-window ratios new/old, old/C and new/C.
set -euo pipefail

old=${1:?usage: scripts/before-after.sh OLD_REVERB MODEL [REPEATS] [DURATION_S]}
model=${2:?usage: scripts/before-after.sh OLD_REVERB MODEL [REPEATS] [DURATION_S]}
repeats=${3:-5}
DURATION=${4:-3}
cd "$(dirname "$0")/.."
cargo build --release --quiet
new=target/release/reverb
source scripts/lib/paired.sh

paired_header "before"
for rep in $(seq "$repeats"); do
    for config in "50 1024 1" "50 1024 8" "500 1024 1" "500 1024 8"; do
        read -r conns size depth <<<"$config"
        paired_server old "$old" serve --model "$model" --threads 1 --tcp "$PAIRED_HOST:PORT"
        paired_server new "$new" serve --model "$model" --threads 1 --tcp "$PAIRED_HOST:PORT"
        paired_server c "$YARDSTICK/c-epoll-echo" PORT "$PAIRED_HOST"
        paired_window "c=$conns/s=$size/depth=$depth" "$rep" "$conns" "$size" "$depth" old new c
        paired_stop
        echo "repeat $rep c=$conns s=$size depth $depth done" >&2
    done
done
paired_header "$model before and after, $repeats windows of ${DURATION}s"
paired_report --sides old,new,c --ratio new/old --ratio old/c --ratio new/c
