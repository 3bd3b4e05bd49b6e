//! Async sockets: [`Async`] wraps a socket, registers it with the reactor once, and turns
//! each non-blocking system call into a future that waits for readiness on `WouldBlock`.
//!
//! reverb's socket types already put TCP and Unix behind one type each, so three
//! wrappers cover all four transports: streams ([`Async::read`], [`Async::write_all`]),
//! datagram sockets ([`Async::recv_from`]) and listeners, whose `accept` goes through
//! [`Async::read_with`], which turns any non-blocking call into a future.

use super::executor::{Core, current};
use super::reactor::Direction;
use crate::net::{DatagramSocket, Peer, Received, Stream, StreamListener};
use crate::slab::Token;
use socket2::SockRef;
use std::future::poll_fn;
use std::io;
use std::net;
use std::os::fd::AsFd;
use std::rc::Rc;
use std::task::{Context, Poll};

/// An async TCP listener.
pub type TcpListener = Async<StreamListener>;
/// An async Unix stream listener (the same type: `StreamListener` covers both).
pub type UnixListener = Async<StreamListener>;
/// An async TCP stream.
pub type TcpStream = Async<Stream>;
/// An async Unix stream.
pub type UnixStream = Async<Stream>;
/// An async UDP socket.
pub type UdpSocket = Async<DatagramSocket>;
/// An async Unix datagram socket.
pub type UnixDatagram = Async<DatagramSocket>;

/// A non-blocking socket registered with the current runtime's reactor.
///
/// One task may wait to read and one to write at a time (a second waiter in the same
/// direction replaces the first, which then relies on being polled again).
pub struct Async<T: AsFd> {
    io: T,
    key: Token,
    core: Rc<Core>,
}

impl<T: AsFd> Async<T> {
    /// Makes `io` non-blocking and registers it with the current runtime.
    ///
    /// # Errors
    ///
    /// Outside a runtime's `block_on`, or the OS error of `ioctl`/`epoll_ctl`.
    pub fn new(io: T) -> io::Result<Self> {
        let core = current().ok_or_else(|| io::Error::other("no runtime on this thread"))?;
        SockRef::from(&io).set_nonblocking(true)?;
        let key = core.reactor.register(io.as_fd())?;
        Ok(Async { io, key, core })
    }

    /// The socket itself, for calls that never block (options, addresses).
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// Runs `op` once `direction` is ready, again after each `WouldBlock` and readiness
    /// edge, until it returns something else.
    pub fn poll_io<R>(
        &self,
        cx: &Context<'_>,
        direction: Direction,
        mut op: impl FnMut(&T) -> io::Result<R>,
    ) -> Poll<io::Result<R>> {
        let reactor = &self.core.reactor;
        std::task::ready!(self.core.poll_budget(cx));
        loop {
            if reactor.poll_ready(self.key, direction, cx).is_pending() {
                return Poll::Pending;
            }
            match op(&self.io) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    reactor.clear_ready(self.key, direction);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                result => return Poll::Ready(result),
            }
        }
    }

    /// Waits until `direction` is ready, without any system call, so the task holds no
    /// buffer while it waits (tokio's `readable()`; follow it with [`Async::try_read`]).
    /// Readiness is cached, so this may be `Ready` at once and the call after it still say
    /// `WouldBlock`.
    pub async fn ready(&self, direction: Direction) {
        poll_fn(|cx| {
            std::task::ready!(self.core.poll_budget(cx));
            self.core.reactor.poll_ready(self.key, direction, cx)
        })
        .await;
    }

    /// Forgets the cached readiness, as a `WouldBlock` would. Call it when a call proved
    /// the kernel has nothing more (a short read took all queued bytes), which saves the
    /// system call that would only say `WouldBlock`; the next edge sets it again.
    pub fn clear_ready(&self, direction: Direction) {
        self.core.reactor.clear_ready(self.key, direction);
    }

    /// Waits until `op` stops saying `WouldBlock` for reading.
    ///
    /// # Errors
    ///
    /// Whatever `op` returns other than `WouldBlock`.
    pub async fn read_with<R>(&self, mut op: impl FnMut(&T) -> io::Result<R>) -> io::Result<R> {
        poll_fn(|cx| self.poll_io(cx, Direction::Read, &mut op)).await
    }

    /// Waits until `op` stops saying `WouldBlock` for writing.
    ///
    /// # Errors
    ///
    /// Whatever `op` returns other than `WouldBlock`.
    pub async fn write_with<R>(&self, mut op: impl FnMut(&T) -> io::Result<R>) -> io::Result<R> {
        poll_fn(|cx| self.poll_io(cx, Direction::Write, &mut op)).await
    }

    /// Shuts down one or both directions (`Write`: the peer reads EOF after what was sent).
    ///
    /// # Errors
    ///
    /// The OS error of `shutdown`, e.g. `ENOTCONN`.
    pub fn shutdown(&self, how: net::Shutdown) -> io::Result<()> {
        SockRef::from(&self.io).shutdown(how)
    }
}

impl<T: AsFd> Drop for Async<T> {
    fn drop(&mut self) {
        self.core.reactor.deregister(self.key, self.io.as_fd());
    }
}

impl Async<Stream> {
    /// A read took less than it asked for: forgets read readiness when that proves the
    /// kernel has nothing more. It does not where reads stop short
    /// ([`Stream::reads_may_stop_short`]), nor after urgent data (a TCP read stops at the
    /// urgent mark, tcp(7)): there only `WouldBlock` proves it.
    fn clear_after_short_read(&self) {
        if !self.io.reads_may_stop_short() {
            self.core.reactor.clear_after_short_read(self.key);
        }
    }

    /// Reads into `buf`; `Ok(0)` is the peer's EOF.
    ///
    /// A TCP read that fills less than `buf` took everything the kernel had queued (unless
    /// urgent data stopped it at its mark), so the next one waits for the next edge instead
    /// of making a system call that can only say `WouldBlock` (one system call saved per
    /// message; tokio does the same).
    ///
    /// # Errors
    ///
    /// The OS error of `read`, e.g. a reset.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let asked = buf.len();
        let got = self.read_with(|stream| stream.read(buf)).await?;
        if 0 < got && got < asked {
            self.clear_after_short_read();
        }
        Ok(got)
    }

    /// Reads into `buf` now, without waiting: `WouldBlock` when nothing is queued, and the
    /// next [`Async::ready`] then waits for the next edge. A short read clears readiness
    /// too, as in [`Async::read`].
    ///
    /// # Errors
    ///
    /// `WouldBlock`, or the OS error of `read`.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self.io.read(buf) {
            Ok(got) if got == 0 || got == buf.len() => Ok(got),
            Ok(got) => {
                self.clear_after_short_read();
                Ok(got)
            }
            Err(e) => {
                if e.kind() == io::ErrorKind::WouldBlock {
                    self.clear_ready(Direction::Read);
                }
                Err(e)
            }
        }
    }

    /// Writes a prefix of `bytes`, as much as the kernel takes; returns its length.
    ///
    /// A write the kernel took only part of found the send buffer full: the next one
    /// waits for room (the next edge) instead of trying at once.
    ///
    /// # Errors
    ///
    /// The OS error of `write`, e.g. a broken pipe.
    pub async fn write(&self, bytes: &[u8]) -> io::Result<usize> {
        let written = self.write_with(|stream| stream.write(bytes)).await?;
        if written < bytes.len() {
            self.clear_ready(Direction::Write);
        }
        Ok(written)
    }

    /// Writes all of `bytes`, waiting for room as often as the kernel takes only part.
    ///
    /// One `poll_fn` rather than an `async fn` over [`Async::write`]: each `async fn` layer
    /// keeps its arguments twice, and a task waiting here carried 176 bytes for a slice
    /// and a reference (`-Zprint-type-sizes`); this future is those 24 bytes.
    ///
    /// # Errors
    ///
    /// As [`Async::write`]; `WriteZero` if the kernel took nothing.
    pub fn write_all<'a>(
        &'a self,
        mut bytes: &'a [u8],
    ) -> impl Future<Output = io::Result<()>> + 'a {
        poll_fn(move |cx| {
            while !bytes.is_empty() {
                let result = self.poll_io(cx, Direction::Write, |stream| stream.write(bytes));
                match std::task::ready!(result)? {
                    0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    // A short write found the send buffer full: wait for room.
                    written if written < bytes.len() => {
                        self.clear_ready(Direction::Write);
                        bytes = &bytes[written..];
                    }
                    _ => bytes = &[],
                }
            }
            Poll::Ready(Ok(()))
        })
    }
}

impl Async<DatagramSocket> {
    /// Receives one datagram into `buf`; returns how much of it `buf` got (see
    /// [`DatagramSocket::recv_from`]) and its sender.
    ///
    /// # Errors
    ///
    /// The OS error of `recvfrom`.
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(Received, Peer)> {
        self.read_with(|socket| socket.recv_from(buf)).await
    }

    /// Sends `datagram` to `peer` as one datagram.
    ///
    /// # Errors
    ///
    /// The OS error of `sendto`.
    pub async fn send_to(&self, datagram: &[u8], peer: &Peer) -> io::Result<usize> {
        self.write_with(|socket| socket.send_to(datagram, peer))
            .await
    }
}
