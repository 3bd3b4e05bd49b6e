#!/usr/bin/env bash
# Mutation testing of reverb's core: for each small change cargo-mutants makes to the core
# (a condition negated, a return value replaced, a `/` turned into `*`), does a test fail?
#
# Usage: scripts/mutants.sh [small|datagram|server|all|FILE...]   (default: small)
#   small     src/buffer.rs, src/protocol/, src/addr.rs, against the library's unit tests
#   datagram  src/server/datagram.rs, against the unit tests and the conformance cases of
#             one model (epoll, over TCP)
#   server    the shared stream core (src/server/connection.rs, readiness.rs, accept.rs,
#             lifecycle.rs, mod.rs: whichever exist), against the unit tests and the
#             conformance cases of epoll (cargo stops at the first failing test binary,
#             so a mutant the unit tests catch costs no conformance run)
#   all       the three groups above, one after another
#   FILE...   the named files, against the unit tests and epoll's conformance cases
#
# Environment:
#   MUTANTS_TIMEOUT   seconds one mutant's tests may take before it counts as timed out
#                     (default 300; a hung test is a failure of the tests, see
#                     docs/testing.md)
#   MUTANTS_JOBS      mutants built and tested at once (default 1: the machine is shared)
#   MUTANTS_OUT       where each group's mutants.out goes, in a directory named after the
#                     group (default target/mutants)
#   MUTANTS_ARGS      more cargo-mutants arguments, split on spaces (`--re read_limit`)
#
# Mutants are built without debug information (CARGO_PROFILE_*_DEBUG=0): each one is a
# rebuild of the crate, and the debug information is most of the link time.
#
# Servers a killed test left running (their test process is gone) are killed, by pid, as
# soon as they are seen, and every server started from the scratch copies is killed at the
# end. Prints each group's caught, missed, timed-out and unviable counts, and the missed
# mutants.
set -euo pipefail
cd "$(dirname "$0")/.."

SMALL_FILES=(src/buffer.rs 'src/protocol/*.rs' src/addr.rs)
DATAGRAM_FILES=(src/server/datagram.rs)
SERVER_FILES=(src/server/connection.rs src/server/readiness.rs src/server/accept.rs
              src/server/lifecycle.rs src/server/mod.rs)

# Test selections, as cargo test arguments. Conformance: every case of epoll over TCP (the
# Unix-socket and 4 MiB variants repeat the same code paths).
CONFORMANCE_FILTER=('epoll::' --skip 'unix_stream' --skip 'tcp_4m')
UNIT_TESTS=(--lib)
UNIT_AND_CONFORMANCE=(--lib --test conformance -- 'tests::' "${CONFORMANCE_FILTER[@]}")

if ! cargo mutants --version >/dev/null 2>&1; then
    echo "installing cargo-mutants" >&2
    cargo install --locked --quiet cargo-mutants
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

# Runs cargo-mutants on one group of files and prints its counts; the exit status is 0
# unless cargo-mutants itself failed (a broken baseline, a bad flag).
run_group() {
    local group="$1" tests_name="$2"
    shift 2
    local -n tests="$tests_name"
    local file_args=() pattern
    for pattern in "$@"; do
        # Globs are expanded by cargo-mutants; plain paths must exist.
        if [[ $pattern == *'*'* || -e $pattern ]]; then
            file_args+=(--file "$pattern")
        fi
    done
    if [[ ${#file_args[@]} -eq 0 ]]; then
        echo "$group: none of $* exists" >&2
        return 2
    fi
    local dir="$out/$group"
    mkdir -p "$dir"
    echo "$group: cargo mutants on $* (tests: ${tests[*]})" >&2
    local status=0 started=$SECONDS
    # shellcheck disable=SC2086 # MUTANTS_ARGS is split on purpose
    TMPDIR="$scratch" CARGO_PROFILE_DEV_DEBUG=0 CARGO_PROFILE_TEST_DEBUG=0 cargo mutants \
        "${file_args[@]}" \
        --jobs "${MUTANTS_JOBS:-1}" \
        --timeout "${MUTANTS_TIMEOUT:-300}" \
        --output "$dir" \
        --no-shuffle \
        ${MUTANTS_ARGS:-} \
        -- "${tests[@]}" \
        || status=$?
    kill_leftover_servers all
    report "$group" "$dir/mutants.out" $((SECONDS - started))
    # cargo-mutants exits 2 when a mutant was missed and 3 when one timed out: those are
    # the counts above; anything else is a failure of the run.
    case $status in
        0 | 2 | 3) return 0 ;;
        *) return "$status" ;;
    esac
}

# `grep -c` prints 0 itself on an empty file (and exits 1): count only when it exists.
count() {
    if [[ -f $1 ]]; then grep -c . "$1" || true; else echo 0; fi
}

report() {
    local group="$1" dir="$2" seconds="$3"
    echo
    echo "$group ($((seconds / 60)) min $((seconds % 60)) s):"
    echo "  caught:    $(count "$dir/caught.txt")"
    echo "  missed:    $(count "$dir/missed.txt")"
    echo "  timed out: $(count "$dir/timeout.txt")"
    echo "  unviable:  $(count "$dir/unviable.txt")"
    if [[ -s $dir/missed.txt ]]; then
        echo "  missed mutants (each needs a test, or a reason in docs/testing.md):"
        sed 's/^/    /' "$dir/missed.txt"
    fi
    if [[ -s $dir/timeout.txt ]]; then
        echo "  timed-out mutants (each needs a reason in docs/testing.md):"
        sed 's/^/    /' "$dir/timeout.txt"
    fi
}

case "${1:-small}" in
    small) run_group small UNIT_TESTS "${SMALL_FILES[@]}" ;;
    datagram) run_group datagram UNIT_AND_CONFORMANCE "${DATAGRAM_FILES[@]}" ;;
    server) run_group server UNIT_AND_CONFORMANCE "${SERVER_FILES[@]}" ;;
    all)
        run_group small UNIT_TESTS "${SMALL_FILES[@]}"
        run_group datagram UNIT_AND_CONFORMANCE "${DATAGRAM_FILES[@]}"
        run_group server UNIT_AND_CONFORMANCE "${SERVER_FILES[@]}"
        ;;
    *) run_group files UNIT_AND_CONFORMANCE "$@" ;;
esac
