#!/usr/bin/env bash
# Runs a command in a network namespace of its own whose loopback drops, once each, chosen
# client-to-server packets of every TCP connection, so the server accepts connections late
# and out of the order their `connect` calls returned.
#
#   scripts/late-accept.sh FIRST LAST CMD...
#   e.g. scripts/late-accept.sh 2 2 cargo test --test scale      # every final ACK, once
#        scripts/late-accept.sh 2 3 cargo test --test conformance  # the ACK and first data
#
# Packets are counted per connection in the client-to-server direction, the SYN being
# packet 1: `2 2` drops each handshake's final ACK. `connect` has returned by then (it returns
# on the SYN-ACK), but the listener only queues the connection for `accept` when an ACK or
# the client's first data arrives. A busy machine does the same by chance: the final ACK waits
# in a CPU's backlog while later handshakes complete on the other CPU. A test that passes
# here does not rely on the server having accepted a connection because `connect` returned.
#
# Needs root, `unshare` and `iptables` with the conntrack and connbytes matches. Nothing
# outside the new namespace is touched; its loopback is the only interface. Bounded to
# 25 minutes. Prints the rule's packet count on stderr at the end, so a run whose rule
# matched nothing is seen.
set -euo pipefail

usage="usage: scripts/late-accept.sh FIRST LAST CMD..."
first=${1:?$usage}
last=${2:?$usage}
shift 2
[ $# -gt 0 ] || { echo "$usage" >&2; exit 2; }
case "$first$last" in
*[!0-9]*) echo "late-accept: FIRST and LAST must be packet numbers (1 is the SYN), got '$first' '$last'" >&2; exit 2 ;;
esac
[ "$first" -le "$last" ] || { echo "late-accept: FIRST ($first) must not exceed LAST ($last)" >&2; exit 2; }
for tool in unshare iptables; do
    command -v "$tool" >/dev/null || { echo "late-accept: needs $tool" >&2; exit 2; }
done

exec timeout 1500 unshare --net bash -c '
set -u
ip link set lo up
iptables -A INPUT -i lo -p tcp -m conntrack --ctdir ORIGINAL \
    -m connbytes --connbytes "$1:$2" --connbytes-dir original --connbytes-mode packets -j DROP
shift 2
rc=0
"$@" || rc=$?
iptables -L INPUT -v -n -x >&2
exit $rc
' late-accept "$first" "$last" "$@"
