# Sourced by the other scripts, from the repository root: builds the yardsticks in bench/
# (see bench/README.md) and sets their paths.
#   YARDSTICK      directory of c-epoll-echo and echoload (default target/yardstick)
#   TOKIO_ECHO     the tokio-echo binary, built by build_tokio_echo
YARDSTICK=${YARDSTICK_OUT:-$PWD/target/yardstick}
make -s -C bench OUT="$YARDSTICK" >&2
TOKIO_ECHO=$PWD/target/tokio-echo/release/tokio-echo

build_tokio_echo() {
    cargo build --release --locked --quiet --manifest-path bench/tokio-echo/Cargo.toml \
        --target-dir target/tokio-echo >&2
}
