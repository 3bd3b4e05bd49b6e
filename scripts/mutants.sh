#!/usr/bin/env bash
# Mutation testing of reverb's core: for each small change cargo-mutants makes to the core
# (a condition negated, a return value replaced, a `/` turned into `*`), does a test fail?
#
# Usage: scripts/mutants.sh [small|server|all|FILE...]   (default: small)
#   small   src/buffer.rs, src/protocol/, src/addr.rs
#   server  the shared server core: src/server/connection.rs, datagram.rs, readiness.rs,
#           admission and drain code (whatever of SERVER_FILES exists)
#   all     both
#
# Tests run against each mutant: every unit test of the library, and for `server`, `all` and
# named files also the conformance cases of one model (epoll, over TCP). Environment:
#   MUTANTS_TIMEOUT   seconds one mutant's tests may take before it counts as timed out
#                     (default 300; a hung test is a failure of the tests, see
#                     docs/testing.md)
#   MUTANTS_JOBS      mutants built and tested at once (default 1: the machine is shared)
#   MUTANTS_OUT       where mutants.out goes (default target/mutants)
#
# Servers a killed test left running (their test process is gone) are killed, by pid, as
# soon as they are seen, and every server started from the scratch copies is killed at the
# end. Prints the caught, missed, timed-out and unviable counts, and the missed mutants.
set -euo pipefail
cd "$(dirname "$0")/.."

SMALL_FILES=(src/buffer.rs 'src/protocol/*.rs' src/addr.rs)
SERVER_FILES=(src/server/connection.rs src/server/datagram.rs src/server/readiness.rs
              src/server/admission.rs src/server/drain.rs src/server/mod.rs)

# The socket-free files are covered by the unit tests alone; the server core also needs the
# conformance cases of one model (epoll over TCP), which run the real binary.
UNIT_TESTS=(--lib)
CONFORMANCE_TESTS=(--lib --test conformance
                   -- 'tests::' 'epoll::' --skip 'unix_stream' --skip 'tcp_4m')
case "${1:-small}" in
    small) files=("${SMALL_FILES[@]}"); tests=("${UNIT_TESTS[@]}") ;;
    server) files=("${SERVER_FILES[@]}"); tests=("${CONFORMANCE_TESTS[@]}") ;;
    all) files=("${SMALL_FILES[@]}" "${SERVER_FILES[@]}"); tests=("${CONFORMANCE_TESTS[@]}") ;;
    *) files=("$@"); tests=("${CONFORMANCE_TESTS[@]}") ;;
esac

if ! cargo mutants --version >/dev/null 2>&1; then
    echo "installing cargo-mutants" >&2
    cargo install --locked --quiet cargo-mutants
fi

file_args=()
for pattern in "${files[@]}"; do
    # Globs are expanded by cargo-mutants; plain paths must exist.
    if [[ $pattern == *'*'* || -e $pattern ]]; then
        file_args+=(--file "$pattern")
    fi
done
if [[ ${#file_args[@]} -eq 0 ]]; then
    echo "none of ${files[*]} exists" >&2
    exit 2
fi

out="${MUTANTS_OUT:-target/mutants}"
mkdir -p "$out"
# Scratch copies (and the servers their tests start) live under one directory of our own,
# so that a leftover server is recognised by where its binary is, and nothing else is.
scratch="$(mktemp -d "${TMPDIR:-/tmp}/reverb-mutants.XXXXXX")"

# Kills, by pid, every process whose binary lies under the scratch directory and whose
# parent is gone (reparented to pid 1); with "all", every such process.
kill_leftover_servers() {
    local which="$1" pid exe ppid
    for proc in /proc/[0-9]*; do
        pid="${proc#/proc/}"
        exe="$(readlink "$proc/exe" 2>/dev/null)" || continue
        [[ $exe == "$scratch"/* ]] || continue
        ppid="$(awk '/^PPid:/ {print $2}' "$proc/status" 2>/dev/null)" || continue
        if [[ $which == all || $ppid == 1 ]]; then
            echo "killing leftover server $pid ($exe)" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}

(
    while sleep 10; do kill_leftover_servers orphans; done
) &
reaper=$!
cleanup() {
    kill "$reaper" 2>/dev/null || true
    kill_leftover_servers all
    rm -rf "$scratch"
}
trap cleanup EXIT

echo "cargo mutants on: ${files[*]}" >&2
status=0
TMPDIR="$scratch" cargo mutants \
    "${file_args[@]}" \
    --jobs "${MUTANTS_JOBS:-1}" \
    --timeout "${MUTANTS_TIMEOUT:-300}" \
    --output "$out" \
    --no-shuffle \
    -- "${tests[@]}" \
    || status=$?

dir="$out/mutants.out"
# `grep -c` prints 0 itself on an empty file (and exits 1): count only when the file exists.
count() {
    if [[ -f $dir/$1 ]]; then grep -c . "$dir/$1" || true; else echo 0; fi
}
echo
echo "caught:    $(count caught.txt)"
echo "missed:    $(count missed.txt)"
echo "timed out: $(count timeout.txt)"
echo "unviable:  $(count unviable.txt)"
if [[ -s $dir/missed.txt ]]; then
    echo
    echo "missed mutants (each needs a test, or a reason in docs/testing.md):"
    cat "$dir/missed.txt"
fi
# cargo-mutants exits 2 when a mutant was missed and 3 when one timed out: report those
# as the counts above, and anything else (a broken baseline, a bad flag) as a failure.
case $status in
    0 | 2 | 3) exit 0 ;;
    *) exit "$status" ;;
esac
