//! Async sockets: [`Async`] wraps any socket, registers it with the reactor once, and turns
//! each non-blocking system call into a future that waits for readiness on `WouldBlock`.
//!
//! The same few traits describe std's sockets and reverb's own `server` types, so one
//! wrapper serves TCP, UDP and Unix sockets alike:
//! [`Listener`] (`accept`), [`ByteStream`] (`read`, `write`), [`Datagram`]
//! (`recv_from`, `send_to`).

use super::executor::{Core, current};
use super::reactor::Direction;
use crate::server::{DatagramSocket, Peer, Stream, StreamListener};
use socket2::SockRef;
use std::future::poll_fn;
use std::io::{self, Read, Write};
use std::net::{self, SocketAddr};
use std::os::fd::AsFd;
use std::os::unix::net as unix;
use std::rc::Rc;
use std::task::{Context, Poll};

/// An async TCP listener.
pub type TcpListener = Async<net::TcpListener>;
/// An async TCP stream.
pub type TcpStream = Async<net::TcpStream>;
/// An async UDP socket.
pub type UdpSocket = Async<net::UdpSocket>;
/// An async Unix stream listener.
pub type UnixListener = Async<unix::UnixListener>;
/// An async Unix stream.
pub type UnixStream = Async<unix::UnixStream>;
/// An async Unix datagram socket.
pub type UnixDatagram = Async<unix::UnixDatagram>;

/// A non-blocking socket registered with the current runtime's reactor.
///
/// One task may wait to read and one to write at a time (a second waiter in the same
/// direction replaces the first, which then relies on being polled again).
#[derive(Debug)]
pub struct Async<T: AsFd> {
    io: T,
    key: u64,
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
        loop {
            if self
                .core
                .reactor
                .poll_ready(self.key, direction, cx)
                .is_pending()
            {
                return Poll::Pending;
            }
            match op(&self.io) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.core.reactor.clear_ready(self.key, direction);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                result => return Poll::Ready(result),
            }
        }
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

/// A listening socket.
pub trait Listener: AsFd {
    /// The connected socket `accept` returns.
    type Stream: AsFd;
    /// The peer's address.
    type Addr;
    /// One non-blocking `accept`.
    ///
    /// # Errors
    ///
    /// The OS error of `accept`.
    fn accept_now(&self) -> io::Result<(Self::Stream, Self::Addr)>;
}

/// A connected byte stream.
pub trait ByteStream: AsFd {
    /// One `read` into `buf`; `Ok(0)` is the peer's EOF.
    ///
    /// # Errors
    ///
    /// The OS error of `read`.
    fn read_now(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// One `write` of a prefix of `bytes`; returns its length.
    ///
    /// # Errors
    ///
    /// The OS error of `write`.
    fn write_now(&self, bytes: &[u8]) -> io::Result<usize>;
}

/// A datagram socket.
pub trait Datagram: AsFd {
    /// A sender's or receiver's address.
    type Addr;
    /// Receives one datagram; returns its length and sender.
    ///
    /// # Errors
    ///
    /// The OS error of `recvfrom`.
    fn recv_now(&self, buf: &mut [u8]) -> io::Result<(usize, Self::Addr)>;
    /// Sends `datagram` to `addr` as one datagram.
    ///
    /// # Errors
    ///
    /// The OS error of `sendto`.
    fn send_now(&self, datagram: &[u8], addr: &Self::Addr) -> io::Result<usize>;
}

/// What `accept` yields: the new connection, already registered, and its peer.
pub type Accepted<L> = (Async<<L as Listener>::Stream>, <L as Listener>::Addr);

impl<L: Listener> Async<L> {
    /// Polls for one connection, registered with this runtime on arrival.
    pub fn poll_accept(&self, cx: &Context<'_>) -> Poll<io::Result<Accepted<L>>> {
        self.poll_io(cx, Direction::Read, L::accept_now)
            .map(|accepted| accepted.and_then(|(stream, addr)| Ok((Async::new(stream)?, addr))))
    }

    /// Accepts one connection.
    ///
    /// # Errors
    ///
    /// The OS error of `accept` (sort it with `server::accept_action`) or of registering.
    pub async fn accept(&self) -> io::Result<Accepted<L>> {
        poll_fn(|cx| self.poll_accept(cx)).await
    }
}

impl<S: ByteStream> Async<S> {
    /// Reads into `buf`; `Ok(0)` is the peer's EOF.
    ///
    /// # Errors
    ///
    /// The OS error of `read`, e.g. a reset.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_with(|io| io.read_now(buf)).await
    }

    /// Writes a prefix of `bytes`, as much as the kernel takes; returns its length.
    ///
    /// # Errors
    ///
    /// The OS error of `write`, e.g. a broken pipe.
    pub async fn write(&self, bytes: &[u8]) -> io::Result<usize> {
        self.write_with(|io| io.write_now(bytes)).await
    }

    /// Writes all of `bytes`, waiting for room as often as the kernel takes only part.
    ///
    /// # Errors
    ///
    /// As [`Async::write`]; `WriteZero` if the kernel took nothing.
    pub async fn write_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match self.write(bytes).await? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                written => bytes = &bytes[written..],
            }
        }
        Ok(())
    }
}

impl<D: Datagram> Async<D> {
    /// Receives one datagram into `buf`; returns its length and sender.
    ///
    /// # Errors
    ///
    /// The OS error of `recvfrom`.
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, D::Addr)> {
        self.read_with(|io| io.recv_now(buf)).await
    }

    /// Sends `datagram` to `addr` as one datagram.
    ///
    /// # Errors
    ///
    /// The OS error of `sendto`.
    pub async fn send_to(&self, datagram: &[u8], addr: &D::Addr) -> io::Result<usize> {
        self.write_with(|io| io.send_now(datagram, addr)).await
    }
}

macro_rules! byte_stream {
    ($($t:ty),*) => {$(
        impl ByteStream for $t {
            fn read_now(&self, buf: &mut [u8]) -> io::Result<usize> {
                (&*self).read(buf)
            }
            fn write_now(&self, bytes: &[u8]) -> io::Result<usize> {
                (&*self).write(bytes)
            }
        }
    )*};
}
byte_stream!(net::TcpStream, unix::UnixStream);

impl ByteStream for Stream {
    fn read_now(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf)
    }
    fn write_now(&self, bytes: &[u8]) -> io::Result<usize> {
        self.write(bytes)
    }
}

impl Listener for net::TcpListener {
    type Stream = net::TcpStream;
    type Addr = SocketAddr;
    fn accept_now(&self) -> io::Result<(net::TcpStream, SocketAddr)> {
        self.accept()
    }
}

impl Listener for unix::UnixListener {
    type Stream = unix::UnixStream;
    type Addr = unix::SocketAddr;
    fn accept_now(&self) -> io::Result<(unix::UnixStream, unix::SocketAddr)> {
        self.accept()
    }
}

impl Listener for StreamListener {
    type Stream = Stream;
    type Addr = Peer;
    fn accept_now(&self) -> io::Result<(Stream, Peer)> {
        self.accept()
    }
}

impl Datagram for net::UdpSocket {
    type Addr = SocketAddr;
    fn recv_now(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.recv_from(buf)
    }
    fn send_now(&self, datagram: &[u8], addr: &SocketAddr) -> io::Result<usize> {
        self.send_to(datagram, addr)
    }
}

impl Datagram for unix::UnixDatagram {
    type Addr = unix::SocketAddr;
    fn recv_now(&self, buf: &mut [u8]) -> io::Result<(usize, unix::SocketAddr)> {
        self.recv_from(buf)
    }
    fn send_now(&self, datagram: &[u8], addr: &unix::SocketAddr) -> io::Result<usize> {
        self.send_to_addr(datagram, addr)
    }
}

impl Datagram for DatagramSocket {
    type Addr = Peer;
    fn recv_now(&self, buf: &mut [u8]) -> io::Result<(usize, Peer)> {
        self.recv_from(buf)
    }
    fn send_now(&self, datagram: &[u8], peer: &Peer) -> io::Result<usize> {
        self.send_to(datagram, peer)
    }
}
