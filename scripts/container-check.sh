#!/usr/bin/env bash
# Builds the container image without pulling anything and checks it: the image's
# entrypoint, user and ports, then the binary taken out of it (podman create + export)
# serving an echo on loopback. Containers cannot be started here, so the binary is run
# directly from the exported filesystem.
#
#   scripts/container-check.sh            (needs podman; .ci/run installs it)
#   REVERB_STATIC=path/to/reverb scripts/container-check.sh   (skip the build)
set -euo pipefail
cd "$(dirname "$0")/.."

image=localhost/reverb:check
target=x86_64-unknown-linux-gnu
work=$(mktemp -d)
container=
server=
cleanup() {
    [ -n "$server" ] && kill "$server" 2>/dev/null || true
    [ -n "$container" ] && podman rm -f "$container" >/dev/null 2>&1 || true
    # The image is only checked, never kept: each run would otherwise leave a dangling
    # layer of the binary's size in the machine's container storage.
    podman rmi -f "$image" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "== static binary"
binary=target/$target/release/reverb
if [ -n "${REVERB_STATIC:-}" ]; then
    # A static binary built elsewhere (same flags), e.g. in another target directory.
    mkdir -p "$(dirname "$binary")"
    cp "$REVERB_STATIC" "$binary"
else
    RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release --locked --quiet --target "$target"
fi
if ldd "$binary" 2>&1 | grep -q "=>"; then
    echo "not statically linked:"; ldd "$binary"; exit 1
fi

echo "== podman build (FROM scratch: nothing to pull)"
# Committing the layer needs room for about twice the binary in the container storage and
# its temporary directory; a full disk surfaces there only as "read/write on closed pipe".
storage=$(podman info --format '{{.Store.GraphRoot}}' 2>/dev/null || echo /var/lib/containers)
mkdir -p "$storage"
free_kib=$(df -Pk "$storage" | awk 'NR==2 {print $4}')
need_kib=$(( $(du -k "$binary" | cut -f1) * 4 ))
if [ "$free_kib" -lt "$need_kib" ]; then
    echo "only $((free_kib / 1024)) MiB free under $storage; the image build needs about $((need_kib / 1024)) MiB"
    df -h "$storage" "${TMPDIR:-/var/tmp}"
    exit 1
fi
if ! podman build --pull=never --quiet -f Containerfile -t "$image" . >/dev/null; then
    echo "podman build failed; free space where it writes:"
    df -h "$storage" "${TMPDIR:-/var/tmp}"
    exit 1
fi

echo "== podman image inspect"
inspect=$(podman image inspect "$image" --format \
    'entrypoint={{json .Config.Entrypoint}} cmd={{json .Config.Cmd}} user={{.Config.User}} ports={{json .Config.ExposedPorts}} size={{.Size}}')
echo "$inspect"
want() {
    case "$inspect" in
        *"$1"*) ;;
        *) echo "image lacks $1"; exit 1 ;;
    esac
}
want 'entrypoint=["/usr/local/bin/reverb"]'
want 'user=65532:65532'
want '"7007/tcp"'
want '"7007/udp"'
want '"9100/tcp"'
want '"--tcp","0.0.0.0:7007"'

echo "== the binary exported from the image serves an echo"
container=$(podman create "$image")
podman export "$container" | tar -x -C "$work" usr/local/bin/reverb
exported=$work/usr/local/bin/reverb
"$exported" serve --tcp 127.0.0.1:0 --metrics 127.0.0.1:0 >"$work/ready" 2>"$work/log" &
server=$!
for _ in $(seq 100); do
    [ "$(wc -l <"$work/ready")" -ge 2 ] && break
    sleep 0.1
done
addr=$(sed -n 's|^listening tcp://||p' "$work/ready")
metrics=$(sed -n 's|^listening http://||p' "$work/ready")
[ -n "$addr" ] || { echo "no listening line"; cat "$work/log"; exit 1; }
reply=$(printf 'hello from the image\n' | timeout 10 "$exported" client "tcp://$addr")
[ "$reply" = "hello from the image" ] || { echo "echo came back as: $reply"; exit 1; }
echo "echo ok via tcp://$addr"
exec 3<>"/dev/tcp/${metrics%:*}/${metrics##*:}"
printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
grep -q '^reverb_connections_accepted_total{transport="tcp"} 1' <&3 \
    || echo "note: the accepted counter is not 1 (is counting wired into this model?)"
exec 3<&-
kill -TERM "$server"
wait "$server"
server=
echo "container check passed"
