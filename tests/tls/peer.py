#!/usr/bin/env python3
"""A TLS client built on Python's ssl module (OpenSSL), for reverb's TLS tests.

    peer.py payload TARGET VERSION SIZE   send SIZE random bytes while reading the echo,
                                          then close_notify (a TLS half-close); expect every
                                          byte back, then the server's close_notify
    peer.py flood TARGET VERSION SIZE     as payload, but first send without reading until
                                          the server stops taking bytes; print
                                          "blocked SENT", wait for a line on stdin, go on
    peer.py silent TARGET VERSION SECONDS send nothing after the handshake; expect the
                                          server's close_notify (an idle timeout, a drain)
                                          within SECONDS, then a clean EOF, never a reset

TARGET is HOST:PORT or unix:PATH; VERSION is 1.2 or 1.3. Prints one "ok ..." line and
exits 0, or one line naming what went wrong and exits 1.
"""

import os
import select
import socket
import ssl
import sys
import time

PATIENCE = 60.0


def connect(target):
    if target.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(target[len("unix:"):])
    else:
        host, port = target.rsplit(":", 1)
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
    sock.setblocking(False)
    return sock


def context(version):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    pinned = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[version]
    ctx.minimum_version = pinned
    ctx.maximum_version = pinned
    return ctx


class Peer:
    def __init__(self, target, version):
        self.sock = connect(target)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context(version).wrap_bio(
            self.incoming, self.outgoing, server_hostname="localhost"
        )
        self.wire_out = b""
        self.received = bytearray()
        self.handshake_done = False
        self.close_notify_sent = False
        self.peer_closed = False
        self.socket_eof = False

    def step(self, payload, sent, may_read, may_write):
        """One turn: handshake, encrypt, send, receive, decrypt. Returns the new `sent`."""
        if not self.handshake_done:
            try:
                self.tls.do_handshake()
                self.handshake_done = True
            except ssl.SSLWantReadError:
                pass
        if self.handshake_done and may_write:
            # Keep little ciphertext queued: what the socket does not take waits here.
            while sent < len(payload) and len(self.wire_out) + self.outgoing.pending < 256 * 1024:
                sent += self.tls.write(payload[sent:sent + 16384])
            if sent == len(payload) and not self.close_notify_sent:
                try:
                    self.tls.unwrap()
                except ssl.SSLWantReadError:
                    pass
                self.close_notify_sent = True
        self.wire_out += self.outgoing.read()
        readers = [self.sock] if may_read and not self.socket_eof else []
        writers = [self.sock] if self.wire_out else []
        readable, writable, _ = select.select(readers, writers, [], 0.2)
        if writable:
            try:
                n = self.sock.send(self.wire_out)
                self.wire_out = self.wire_out[n:]
            except BlockingIOError:
                pass
        if readable:
            try:
                data = self.sock.recv(256 * 1024)
                if data:
                    self.incoming.write(data)
                else:
                    self.socket_eof = True
                    self.incoming.write_eof()
            except BlockingIOError:
                pass
            except ConnectionResetError:
                raise SystemExit(fail("connection reset by the server"))
        while True:
            try:
                chunk = self.tls.read(256 * 1024)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
                break
            except ssl.SSLEOFError:
                raise SystemExit(fail("the server closed without close_notify"))
            if not chunk:
                self.peer_closed = True
                break
            self.received += chunk
        return sent


def fail(message):
    print(message, flush=True)
    return 1


def silent(target, version, seconds):
    peer = Peer(target, version)
    deadline = time.monotonic() + seconds
    # The handshake needs our writes; after it, nothing of ours goes out.
    while not (peer.handshake_done and not peer.wire_out):
        if time.monotonic() > deadline:
            return fail("no handshake in time")
        peer.step(b"", 0, may_read=True, may_write=False)
    while not peer.peer_closed:
        if time.monotonic() > deadline:
            return fail(f"no close_notify within {seconds} s")
        if peer.socket_eof:
            return fail("EOF without close_notify")
        peer.step(b"", 0, may_read=True, may_write=False)
    while not peer.socket_eof:
        if time.monotonic() > deadline:
            return fail("close_notify, but no EOF after it")
        peer.step(b"", 0, may_read=True, may_write=False)
    print(f"ok close_notify, then EOF, over {peer.tls.version()}", flush=True)
    return 0


def main():
    if sys.argv[1] == "silent":
        return silent(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    mode, target, version, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    payload = os.urandom(size)
    peer = Peer(target, version)
    sent = 0
    deadline = time.monotonic() + PATIENCE
    if mode == "flood":
        last_progress = time.monotonic()
        wire_sent = 0
        while time.monotonic() - last_progress < 1.5:
            before = len(peer.wire_out) + peer.outgoing.pending
            sent = peer.step(payload, sent, may_read=not peer.handshake_done, may_write=True)
            after = len(peer.wire_out) + peer.outgoing.pending
            if sent == len(payload) and not peer.wire_out:
                return fail("the whole flood was taken without backpressure")
            if after < before or (peer.handshake_done and after == 0):
                last_progress = time.monotonic()
            if time.monotonic() > deadline:
                return fail("flood phase took too long")
        print(f"blocked {sent}", flush=True)
        sys.stdin.readline()
    while not (peer.peer_closed and peer.close_notify_sent and not peer.wire_out):
        if time.monotonic() > deadline:
            return fail(
                f"timed out: sent {sent}/{size}, received {len(peer.received)}, "
                f"close_notify received {peer.peer_closed}"
            )
        if peer.socket_eof and not peer.peer_closed:
            return fail(f"EOF without close_notify after {len(peer.received)} bytes")
        sent = peer.step(payload, sent, may_read=True, may_write=True)
    if bytes(peer.received) != payload:
        return fail(f"received {len(peer.received)} bytes that differ from the {size} sent")
    print(
        f"ok {size} bytes back byte-exact over {peer.tls.version()} {peer.tls.cipher()[0]}, "
        "close_notify both ways",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
