#!/usr/bin/env bash
# Mutation testing of reverb's core: for each small change cargo-mutants makes to the core
# (a condition negated, a return value replaced, a `/` turned into `*`), does a test fail?
#
# Usage: scripts/mutants.sh [GROUP|FILE...]   (default: small)
#   small       src/buffer.rs, src/protocol/, src/addr.rs: the library's unit tests
#   datagram    src/server/datagram.rs: its unit tests, then the datagram cases of poll
#   connection  src/server/connection.rs: its unit tests, poll's quicker cases, input
#               queued before an edge-triggered wake (tests/edge_triggered.rs), then all
#               of epoll's
#   readiness   src/server/readiness.rs: poll's quicker cases, select past FD_SETSIZE,
#               input queued before an edge-triggered wake, all of epoll's cases, then
#               busy-poll's (it serves every connection every pass) (poll rebuilds its interest each turn and scans
#               for idle connections; epoll keeps interest in the kernel, `sync`, and uses
#               the idle wheel)
#   shared      src/server/accept.rs, lifecycle.rs, mod.rs: the unit tests, poll's quicker
#               cases, poll's metrics tests, then all of epoll's cases
#   server      connection, readiness and shared, one after another
#   all         every group above
#   task        src/server/task.rs, task_buffers.rs: the server's unit tests, tokio's
#               quicker cases, then all of async's, tokio's and uring's cases (the task
#               models, the only ones that run these files; uring only `close_served`);
#               not part of `all`
#   process     the server's process around its loops, each file against the tests that
#               reach it (none of the groups above runs them):
#     listeners   src/server/listeners.rs: the command line's listener tests (Unix socket
#                 paths, readiness lines, an address in use), every model's `max_conns`
#                 case, the server's unit tests (places held by lingering sockets), then
#                 poll's quicker cases
#     activation  src/server/activation.rs: tests/systemd.rs, with the real
#                 `systemd-socket-activate`
#     children    src/server/children.rs: `forking`'s process tests (reaping, a stuck
#                 child killed, its metrics), then every `forking` test (its conformance
#                 cases and running out of processes as well)
#     signals     src/server/stop_signal.rs, shutdown.rs: the server's unit tests, tokio's
#                 quicker cases, then poll's quicker cases
#               (each also a group of its own); not part of `all`
#   lingering   src/server/linger.rs: the server's unit tests, tests/linger.rs (a refused
#               peer's clean close, a lingering close that must not spin), then all of
#               epoll's cases; not part of `all`
#   loops       src/server/event_loops.rs, one_socket.rs: the server's unit tests,
#               tests/event_loops.rs (several loops sharing listeners, pool's queue at
#               shutdown), then poll's quicker cases; not part of `all`
#   FILE...     the named files: the unit tests, poll's quicker cases, then all of epoll's
#
# Each group runs in stages, cheapest first: a later stage (`--iterate`) tests only the
# mutants the earlier ones missed or that timed out, so a mutant the unit tests catch
# costs one build of the library's unit tests, not of the binary and the conformance
# tests as well. `poll` stands for the readiness models: it runs the same shared core as
# epoll, select and busy-poll (`src/server/readiness.rs`), and its cases take no longer.
#
# Environment:
#   MUTANTS_TIMEOUT     seconds one mutant's tests may take before it counts as timed out
#                       (default 150; a hung case fails by itself within a minute, see
#                       docs/testing.md)
#   MUTANTS_JOBS        mutants built and tested at once (default 1: the machine is shared)
#   MUTANTS_OUT         where each group's mutants.out goes, in a directory named after
#                       the group (default target/mutants)
#   MUTANTS_TARGET_DIR  the cargo target directory of the mutants' builds (default
#                       target/mutants-build); it is kept, so the dependencies are built
#                       once, not once per run
#   MUTANTS_IN_PLACE    1: mutate this tree itself instead of a copy (`--in-place`), so
#                       the crate's own build is incremental from run to run; the tree must
#                       not be edited while it runs (use a separate worktree)
#   MUTANTS_ARGS        more cargo-mutants arguments, split on spaces (`--re read_limit`,
#                       `--iterate` to resume a run into the same MUTANTS_OUT)
#   MUTANTS_STAGES      the stages to run instead of each group's, in order, split on
#                       spaces: names of the test selections below (`CONFORMANCE_EPOLL
#                       SCALE` for mutants an earlier run's first stage already missed)
#
# Mutants are built without debug information (CARGO_PROFILE_*_DEBUG=0): each one is a
# rebuild of the crate, and the debug information is most of the link time.
#
# The tests run with REVERB_TEST_FAIL_FAST=1: the first conformance case that fails ends its
# test binary (tests/common/mod.rs), since one failure is a catch; a mutant that breaks every
# case (the loop never watches anything) is then caught in seconds, not timed out.
#
# Servers a killed test left running (their test process is gone) are killed, by pid, as
# soon as they are seen, and at the end of each stage every process started from the
# mutants' target directory is killed. Prints each group's caught, missed, timed-out and
# unviable counts over all its stages, then each stage's, and the mutants still missed or
# timed out after the last stage.
set -euo pipefail
cd "$(dirname "$0")/.."

SMALL_FILES=(src/buffer.rs 'src/protocol/*.rs' src/addr.rs)
DATAGRAM_FILES=(src/server/datagram.rs)
CONNECTION_FILES=(src/server/connection.rs)
READINESS_FILES=(src/server/readiness.rs)
SHARED_FILES=(src/server/accept.rs src/server/lifecycle.rs src/server/mod.rs)
TASK_FILES=(src/server/task.rs src/server/task_buffers.rs)
LISTENERS_FILES=(src/server/listeners.rs)
ACTIVATION_FILES=(src/server/activation.rs)
CHILDREN_FILES=(src/server/children.rs)
SIGNALS_FILES=(src/server/stop_signal.rs src/server/shutdown.rs)
LINGER_FILES=(src/server/linger.rs)
LOOPS_FILES=(src/server/event_loops.rs src/server/one_socket.rs)

# Test selections, as cargo test arguments (libtest filters match substrings, so `poll::`
# needs epoll and busy-poll skipped).
POLL_ONLY=(--skip 'epoll::' --skip 'busy_poll::')
# Unit tests: all but the runtime's, the load generator's and compare's, which no core
# file reaches and which take a third of the time.
UNIT_TESTS=(--lib -- --skip 'runtime::' --skip 'bench::' --skip 'compare::')
UNIT_DATAGRAM=(--lib -- 'server::datagram::')
UNIT_SERVER=(--lib -- 'server::')
UNIT_CONNECTION=(--lib -- 'server::connection::')
# poll's conformance cases over TCP (the Unix-socket and 4 MiB variants repeat the same
# code paths), and only its datagram cases.
# Without the two slowest cases (half the time): a later stage runs every case on what
# this one misses.
CONFORMANCE=(--test conformance -- 'poll::' "${POLL_ONLY[@]}" --skip 'unix_stream' --skip 'tcp_4m'
             --skip 'idle_close_lingers' --skip 'unread_flood_bounded')
CONFORMANCE_EPOLL=(--test conformance -- 'epoll::' --skip 'unix_stream' --skip 'tcp_4m')
# select past FD_SETSIZE: the only model whose core refuses descriptors it cannot watch.
SCALE=(--test scale -- 'select')
# What poll counts (`--metrics`): the log's counters, which no conformance case reads.
METRICS=(--test metrics -- 'counts::poll' 'reasons::poll')
CONFORMANCE_DATAGRAM=(--test conformance -- 'poll::datagram' "${POLL_ONLY[@]}")
# The task models (async on the crate's own runtime, tokio, uring): tokio's quicker cases
# (it runs every function of the task files but one, `TaskWaits` aside), then every case of
# the three over TCP (`own_runtime` is async's module; `uring::` would match the Unix and
# 4 MiB variants too).
CONFORMANCE_TOKIO=(--test conformance -- 'tokio::' --skip 'idle_close_lingers' --skip 'unread_flood_bounded')
CONFORMANCE_TASK=(--test conformance -- 'own_runtime::' 'tokio::' 'uring::' --skip 'unix_stream' --skip 'tcp_4m')
# What binding shows users: the Unix path rules (a stale socket replaced, a live one or a
# file refused, the file removed at exit unless replaced), the readiness lines, an address
# in use. Run as root: one test runs the server as nobody (skipped otherwise, and the
# mutant it kills shows as missed).
CLI_LISTENERS=(--test cli -- 'unix_path' 'readiness_' 'address_in_use')
# `--max-conns` in every model (async and uring bind with SO_REUSEPORT, the others not).
MAX_CONNS=(--test conformance -- 'max_conns')
# Socket activation: the real `systemd-socket-activate` passes the sockets. Without it
# (outside CI) every test skips and every mutant shows as missed: install the systemd
# package first, as `.ci/run` does.
SYSTEMD=(--test systemd)
# `forking`, the only model with children: first the tests of the children themselves
# (reaped, a stuck one killed, what its killed children counted), then every test of the
# model: its conformance cases (the filter matches `forking::`) and running out of processes.
FORKING_CHILDREN=(--test cli --test metrics -- 'forking')
FORKING=(--test conformance --test cli --test metrics --test event_loops -- 'forking')
# busy-poll: the readiness model that serves every connection on every pass, read or not
# (what `serve` does after a read that found nothing shows only there).
CONFORMANCE_BUSY_POLL=(--test conformance -- 'busy_poll::' --skip 'unix_stream' --skip 'tcp_4m')
# Input already queued when an edge-triggered loop wakes (epoll), and the same for every
# readiness model: a few seconds.
EDGE=(--test edge_triggered)
# The lingering close over the binary, and the tests of several loops and of pool's queue.
LINGER=(--test linger)
EVENT_LOOPS=(--test event_loops)

if ! cargo mutants --version >/dev/null 2>&1; then
    echo "installing cargo-mutants" >&2
    cargo install --locked --quiet cargo-mutants
fi

out="${MUTANTS_OUT:-target/mutants}"
mkdir -p "$out"
target_dir="${MUTANTS_TARGET_DIR:-target/mutants-build}"
mkdir -p "$target_dir"
target_dir="$(cd "$target_dir" && pwd -P)"
# Scratch copies of the tree live under one directory of our own, removed at the end.
scratch="$(mktemp -d "${TMPDIR:-/tmp}/reverb-mutants.XXXXXX")"

# Kills, by pid, every process whose binary lies under the mutants' target directory and
# whose parent is gone (reparented to pid 1); with "all", every such process.
kill_leftover_servers() {
    local which="$1" pid exe ppid
    for proc in /proc/[0-9]*; do
        pid="${proc#/proc/}"
        exe="$(readlink "$proc/exe" 2>/dev/null)" || continue
        [[ $exe == "$target_dir"/* ]] || continue
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

# Runs one stage of cargo-mutants on the files of a group, against one test selection;
# the exit status is 0 unless cargo-mutants itself failed (a broken baseline, a bad flag).
run_stage() {
    local dir="$1" iterate="$2" tests_name="$3"
    shift 3
    local -n tests="$tests_name"
    local file_args=() pattern extra=()
    for pattern in "$@"; do
        # Globs are expanded by cargo-mutants; plain paths must exist.
        if [[ $pattern == *'*'* || -e $pattern ]]; then
            file_args+=(--file "$pattern")
        fi
    done
    if [[ ${#file_args[@]} -eq 0 ]]; then
        echo "none of $* exists" >&2
        return 2
    fi
    # cargo-mutants takes the flag once; MUTANTS_ARGS may carry it already (a resumed run).
    if [[ $iterate == yes && " ${MUTANTS_ARGS:-} " != *" --iterate "* ]]; then
        extra+=(--iterate)
    fi
    # --in-place builds in the tree itself, one mutant at a time.
    if [[ ${MUTANTS_IN_PLACE:-0} == 1 ]]; then
        extra+=(--in-place)
    else
        extra+=(--jobs "${MUTANTS_JOBS:-1}")
    fi
    # The test targets (`--lib`, `--test conformance`) go to the build as well, so that a
    # mutant builds only what its tests run (cargo-mutants builds every test target
    # otherwise); the filters after `--` go to the test binaries.
    local arg is_filter=no filters=()
    for arg in "${tests[@]}"; do
        if [[ $is_filter == yes ]]; then
            filters+=("$arg")
        elif [[ $arg == -- ]]; then
            is_filter=yes
        else
            extra+=("--cargo-arg=$arg")
        fi
    done
    echo "cargo mutants on $* (tests: ${tests[*]})" >&2
    local status=0
    # shellcheck disable=SC2086 # MUTANTS_ARGS is split on purpose
    TMPDIR="$scratch" CARGO_TARGET_DIR="$target_dir" REVERB_TEST_FAIL_FAST=1 \
        CARGO_PROFILE_DEV_DEBUG=0 CARGO_PROFILE_TEST_DEBUG=0 cargo mutants \
        "${file_args[@]}" \
        --timeout "${MUTANTS_TIMEOUT:-150}" \
        --output "$dir" \
        --no-shuffle \
        "${extra[@]}" \
        ${MUTANTS_ARGS:-} \
        -- -- "${filters[@]}" \
        || status=$?
    kill_leftover_servers all
    # cargo-mutants exits 2 when a mutant was missed and 3 when one timed out: those are
    # the counts the report prints; anything else is a failure of the run.
    case $status in
        0 | 2 | 3) return 0 ;;
        *) return "$status" ;;
    esac
}

# Runs a group: `run_group NAME "STAGE..." FILE...`, each stage the name of a test
# selection above; the second and later stages test only what the earlier ones left.
# Each stage's outcome lists are kept in STAGE.outcomes/ beside mutants.out, since the
# next stage's mutants.out replaces them.
run_group() {
    local group="$1" stages="${MUTANTS_STAGES:-$2}"
    shift 2
    local dir="$out/$group" started=$SECONDS iterate=no stage list
    for stage in $stages; do
        if ! declare -p "$stage" >/dev/null 2>&1 || [[ $stage != [A-Z_]* ]]; then
            echo "unknown stage $stage: expected one of UNIT_TESTS UNIT_DATAGRAM UNIT_SERVER" \
                "UNIT_CONNECTION CONFORMANCE CONFORMANCE_EPOLL SCALE METRICS CONFORMANCE_DATAGRAM" \
                "CONFORMANCE_TOKIO CONFORMANCE_TASK CLI_LISTENERS MAX_CONNS SYSTEMD FORKING_CHILDREN" \
                "FORKING" >&2
            return 2
        fi
    done
    mkdir -p "$dir"
    rm -rf "$dir"/*.outcomes
    echo "$group:" >&2
    for stage in $stages; do
        touch "$dir/$stage.started"
        run_stage "$dir" "$iterate" "$stage" "$@"
        mkdir -p "$dir/$stage.outcomes"
        # A stage left nothing to test writes no new mutants.out: it counts nothing.
        if [[ $dir/mutants.out/outcomes.json -nt $dir/$stage.started ]]; then
            for list in previously_caught caught missed timeout unviable; do
                if [[ -f $dir/mutants.out/$list.txt ]]; then
                    cp "$dir/mutants.out/$list.txt" "$dir/$stage.outcomes/"
                fi
            done
        fi
        rm -f "$dir/$stage.started"
        iterate=yes
    done
    report "$group" "$dir" "$stages" $((SECONDS - started))
}

# `grep -c` prints 0 itself on an empty file (and exits 1): count only when it exists.
count() {
    if [[ -f $1 ]]; then grep -c . "$1" || true; else echo 0; fi
}

# The group's totals by outcome across its stages: a mutant a stage catches (or finds
# unviable) is not tested again, so caught and unviable add up over the stages; what the
# last stage missed or timed out on survived them all. Then each stage's own counts.
report() {
    local group="$1" dir="$2" stages="$3" seconds="$4"
    local caught=0 unviable=0 stage first last before
    read -r first _ <<<"$stages"
    last="${stages##* }"
    # A run resumed with --iterate starts from what an earlier run caught.
    before="$(count "$dir/$first.outcomes/previously_caught.txt")"
    for stage in $stages; do
        caught=$((caught + $(count "$dir/$stage.outcomes/caught.txt")))
        unviable=$((unviable + $(count "$dir/$stage.outcomes/unviable.txt")))
    done
    # A mutant that timed out in a stage goes on to the next, whose tests may not reach
    # its code at all: missed there, it is still a timeout (a test that noticed too
    # slowly, often on a loaded machine), not a mutant no test notices.
    local earlier="$dir/timed-out-earlier.txt" missed_list="$dir/missed.txt"
    local late_list="$dir/timed-out-then-missed.txt"
    : >"$earlier"
    for stage in $stages; do
        if [[ $stage != "$last" && -f $dir/$stage.outcomes/timeout.txt ]]; then
            cat "$dir/$stage.outcomes/timeout.txt" >>"$earlier"
        fi
    done
    : >"$missed_list"
    : >"$late_list"
    if [[ -f $dir/$last.outcomes/missed.txt ]]; then
        grep -vxFf "$earlier" "$dir/$last.outcomes/missed.txt" >"$missed_list" || true
        grep -xFf "$earlier" "$dir/$last.outcomes/missed.txt" >"$late_list" || true
    fi
    local missed timeout
    missed="$(count "$missed_list")"
    timeout=$(($(count "$dir/$last.outcomes/timeout.txt") + $(count "$late_list")))
    echo
    echo "$group ($((seconds / 60)) min $((seconds % 60)) s), every stage together:"
    if [[ $before -gt 0 ]]; then
        echo "  caught or unviable in an earlier run (--iterate): $before"
    fi
    echo "  caught:    $caught"
    echo "  missed:    $missed"
    echo "  timed out: $timeout"
    echo "  unviable:  $unviable"
    for stage in $stages; do
        local d="$dir/$stage.outcomes"
        echo "  stage $stage: caught $(count "$d/caught.txt"), missed $(count "$d/missed.txt")," \
            "timed out $(count "$d/timeout.txt"), unviable $(count "$d/unviable.txt")"
    done
    if [[ -s $missed_list ]]; then
        echo "  missed mutants (each needs a test, or a reason in docs/testing.md):"
        sed 's/^/    /' "$missed_list"
    fi
    if [[ -s $late_list ]]; then
        echo "  timed out in an earlier stage, then missed by stages that may not reach them"
        echo "  (re-run them with a larger MUTANTS_TIMEOUT before writing a test):"
        sed 's/^/    /' "$late_list"
    fi
    if [[ -s $dir/$last.outcomes/timeout.txt ]]; then
        echo "  timed-out mutants (each needs a reason in docs/testing.md):"
        sed 's/^/    /' "$dir/$last.outcomes/timeout.txt"
    fi
}

group() {
    case "$1" in
        small) run_group small UNIT_TESTS "${SMALL_FILES[@]}" ;;
        datagram) run_group datagram "UNIT_DATAGRAM CONFORMANCE_DATAGRAM" "${DATAGRAM_FILES[@]}" ;;
        connection) run_group connection "UNIT_CONNECTION CONFORMANCE EDGE CONFORMANCE_EPOLL" "${CONNECTION_FILES[@]}" ;;
        readiness) run_group readiness "CONFORMANCE SCALE EDGE CONFORMANCE_EPOLL CONFORMANCE_BUSY_POLL" "${READINESS_FILES[@]}" ;;
        shared) run_group shared "UNIT_SERVER CONFORMANCE METRICS CONFORMANCE_EPOLL" "${SHARED_FILES[@]}" ;;
        task) run_group task "UNIT_SERVER CONFORMANCE_TOKIO CONFORMANCE_TASK" "${TASK_FILES[@]}" ;;
        listeners) run_group listeners "CLI_LISTENERS MAX_CONNS UNIT_SERVER CONFORMANCE" "${LISTENERS_FILES[@]}" ;;
        activation) run_group activation SYSTEMD "${ACTIVATION_FILES[@]}" ;;
        children) run_group children "FORKING_CHILDREN FORKING" "${CHILDREN_FILES[@]}" ;;
        signals) run_group signals "UNIT_SERVER CONFORMANCE_TOKIO CONFORMANCE" "${SIGNALS_FILES[@]}" ;;
        lingering) run_group lingering "UNIT_SERVER LINGER CONFORMANCE_EPOLL" "${LINGER_FILES[@]}" ;;
        loops) run_group loops "UNIT_SERVER EVENT_LOOPS CONFORMANCE" "${LOOPS_FILES[@]}" ;;
        process) group listeners && group activation && group children && group signals ;;
        server) group connection && group readiness && group shared ;;
        all) group small && group datagram && group server ;;
        *) run_group files "UNIT_TESTS CONFORMANCE CONFORMANCE_EPOLL" "$@" ;;
    esac
}
group "${@:-small}"
