#!/usr/bin/env bash
# Every performance comparison in docs/benchmarks.md in one run, on a quiet machine:
# each script alternates the two programs it compares, pinned as bench/README.md says
# (server CPU 0, load CPU 1), and prints medians of per-repeat ratios.
#
#   scripts/bench-all.sh [REPEATS] [DURATION_S]       (about 10 minutes with 5 3)
set -euo pipefail
repeats=${1:-5}
secs=${2:-3}
cd "$(dirname "$0")/.."
cargo build --release --quiet
echo "### start $(date -u +%FT%TZ) $(uptime)"
echo "### epoll vs c-epoll-echo (target <= 1.05)"
scripts/bench.sh epoll "$repeats" "$secs"
echo "### tokio vs epoll (target <= 1.05)"
BASELINE=epoll scripts/bench.sh tokio "$repeats" "$secs"
echo "### async vs tokio (target <= 1.10)"
BASELINE=tokio scripts/bench.sh async "$repeats" "$secs"
echo "### uring vs c-epoll-echo (target <= 0.90)"
for config in "50 1024 1" "50 1024 8" "500 1024 1"; do
    # shellcheck disable=SC2086
    scripts/bench-uring.sh $config "$repeats" 2
done
echo "### reverb bench vs echoload (target: CPU <= 1.10, msgs/s within 5 %)"
scripts/bench-client.sh "$repeats" "$secs"
echo "### memory per idle connection (target <= 4 KiB)"
for model in epoll async tokio; do
    scripts/idle-rss.sh "$model" 10000 1024
done
echo "### end $(date -u +%FT%TZ) $(uptime)"
