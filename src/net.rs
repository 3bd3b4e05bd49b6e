//! Socket types every model and the runtime share: who a peer is ([`Peer`]), a connected
//! [`Stream`], a [`StreamListener`] and a [`DatagramSocket`], each TCP/UDP or Unix alike.
//!
//! Binding with the command line's rules (stale Unix sockets, "address in use") lives in
//! `server::Listeners`; these types only know the sockets themselves.

use socket2::{Domain, SockAddr, SockRef, Socket, Type};
use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{self, UnixDatagram, UnixListener, UnixStream};

/// Pending connections the kernel may queue per listener before the model accepts them.
const LISTEN_BACKLOG: i32 = 1024;

/// The largest UDP datagram the server receives and answers whole: a 65,535-byte IPv4
/// packet less its 20-byte IP header and 8-byte UDP header (RFC 791, RFC 768). A larger
/// IPv6 payload (up to 65,527 bytes) is read truncated and dropped.
pub const MAX_UDP_DATAGRAM_BYTES: usize = 65_507;

/// The most memory one Unix datagram may take in the server, whatever the kernel would
/// allow: the user-space receive buffer of each Unix datagram socket is at most this.
pub const MAX_UNIX_DATAGRAM_BYTES: usize = 16 * 1024 * 1024;

/// Bytes of a Unix datagram socket's send buffer no datagram can use: Linux refuses a
/// datagram longer than `SO_SNDBUF - 32` with `EMSGSIZE` (`unix_dgram_sendmsg` in
/// `net/unix/af_unix.c`).
const UNIX_DATAGRAM_SEND_OVERHEAD: usize = 32;

/// The kernel buffers (each way) a UDP socket asks for: room for several datagrams of
/// [`MAX_UDP_DATAGRAM_BYTES`], so one whole datagram always fits.
const UDP_SOCKET_BUFFER_BYTES: usize = 1024 * 1024;

/// How much of one datagram a receive got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// All of it: this many bytes at the start of the buffer.
    Whole(usize),
    /// Only the buffer's length of it: the datagram had this many bytes, more than the
    /// buffer holds. It must not be answered (that would echo it short).
    Truncated(usize),
}

/// Who is at the other end of a connection or sent a datagram.
#[derive(Clone, Debug)]
pub enum Peer {
    /// An IP peer.
    Ip(SocketAddr),
    /// A Unix socket peer; often unnamed for stream clients.
    Unix(net::SocketAddr),
}

impl Peer {
    /// The sender of a datagram as the kernel wrote it in a message header.
    pub fn from_sock_addr(addr: &SockAddr) -> Peer {
        if let Some(addr) = addr.as_socket() {
            return Peer::Ip(addr);
        }
        let named = addr.as_unix().or_else(|| {
            let name = addr.as_abstract_namespace()?;
            net::SocketAddr::from_abstract_name(name).ok()
        });
        // An unnamed sender: an empty path is how std spells it.
        let unnamed = || net::SocketAddr::from_pathname("").expect("an empty path is short enough");
        Peer::Unix(named.unwrap_or_else(unnamed))
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Ip(addr) => write!(f, "{addr}"),
            Peer::Unix(addr) => match (addr.as_pathname(), addr.as_abstract_name()) {
                (Some(path), _) => write!(f, "unix:{}", path.display()),
                (None, Some(name)) => write!(f, "unix:@{}", String::from_utf8_lossy(name)),
                (None, None) => f.write_str("unix:(unnamed)"),
            },
        }
    }
}

/// A connected stream, TCP or Unix; models treat both alike.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix stream.
    Unix(UnixStream),
}

impl Stream {
    /// Whether a read that took less than it asked for may still have left input queued,
    /// so that only a read that finds nothing proves the socket empty: a Unix stream read
    /// stops after a message that carried descriptors or other credentials
    /// (unix_stream_read_generic). A TCP read copies until the queue is empty
    /// (tcp_recvmsg), except at an urgent mark, which the readiness mechanism reports
    /// apart (`EPOLLPRI`).
    #[inline]
    pub fn reads_may_stop_short(&self) -> bool {
        matches!(self, Stream::Unix(_))
    }

    /// A connection accepted on a TCP (`is_tcp`) or Unix listener by other means than
    /// [`StreamListener::accept`] (an io_uring completion), set up the same way, with its
    /// peer's address.
    ///
    /// # Errors
    ///
    /// `ECONNABORTED` when the peer is already gone (`getpeername` failed), as `accept`
    /// reports a connection that died in the queue.
    pub fn from_accepted(fd: OwnedFd, is_tcp: bool) -> io::Result<(Stream, Peer)> {
        let aborted = |_| io::Error::from_raw_os_error(crate::sys::errno::ECONNABORTED);
        if is_tcp {
            let stream = TcpStream::from(fd);
            // Nodelay failing leaves a working, if slower, connection.
            let _ = stream.set_nodelay(true);
            let peer = stream.peer_addr().map_err(aborted)?;
            return Ok((Stream::Tcp(stream), Peer::Ip(peer)));
        }
        let stream = UnixStream::from(fd);
        let peer = stream.peer_addr().map_err(aborted)?;
        Ok((Stream::Unix(stream), Peer::Unix(peer)))
    }

    /// A second descriptor for the connected stream socket `fd`, which stays open while
    /// either is: a runtime that owns its socket in its own type (tokio, io_uring) closes
    /// its descriptor and hands this one to the lingering close.
    ///
    /// # Errors
    ///
    /// The OS error of `fcntl(F_DUPFD_CLOEXEC)` (`EMFILE` when out of descriptors) or of
    /// `getsockopt(SO_DOMAIN)`.
    pub fn duplicate(fd: BorrowedFd<'_>) -> io::Result<Stream> {
        let is_unix = socket2::SockRef::from(&fd).domain()? == Domain::UNIX;
        let fd = fd.try_clone_to_owned()?;
        Ok(if is_unix {
            Stream::Unix(UnixStream::from(fd))
        } else {
            Stream::Tcp(TcpStream::from(fd))
        })
    }

    /// Shuts down our sending side: the peer reads EOF after the bytes already sent.
    ///
    /// # Errors
    ///
    /// The OS error of `shutdown`, e.g. `ENOTCONN` when the peer is gone.
    pub fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
        }
    }

    /// Switches between blocking and non-blocking I/O.
    ///
    /// # Errors
    ///
    /// The OS error of `fcntl`/`ioctl`.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(nonblocking),
            Stream::Unix(s) => s.set_nonblocking(nonblocking),
        }
    }

    /// Reads into `buf`; `Ok(0)` is the peer's EOF.
    ///
    /// # Errors
    ///
    /// The OS error of `recvfrom`, including `WouldBlock` on a non-blocking stream.
    #[inline]
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // Straight to `recvfrom`, without libc's cancellation bookkeeping (sys::stream).
        crate::sys::stream::recv(self.as_fd(), buf)
    }

    /// Writes some prefix of `bytes` and returns its length; callers pass the count to
    /// `WriteBuffer::advance`.
    ///
    /// # Errors
    ///
    /// The OS error of `sendto`, including `WouldBlock` on a non-blocking stream.
    #[inline]
    pub fn write(&self, bytes: &[u8]) -> io::Result<usize> {
        crate::sys::stream::send(self.as_fd(), bytes)
    }
}

impl AsFd for Stream {
    #[inline]
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

/// A listening stream socket.
#[derive(Debug)]
pub struct StreamListener {
    socket: ListenerSocket,
    /// The bound address, as printed in the `listening` line.
    name: String,
    /// The address of a TCP listener bound with SO_REUSEPORT, which
    /// [`StreamListener::bind_own_queue`] binds again; `None` for every other listener.
    reuseport_addr: Option<SocketAddr>,
}

#[derive(Debug)]
enum ListenerSocket {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl StreamListener {
    /// Accepts one connection; TCP connections get `TCP_NODELAY`, because an echo's
    /// replies are small and Nagle's algorithm would hold them back for the peer's ACK.
    ///
    /// # Errors
    ///
    /// The OS error of `accept`; sort it with `server::accept_action`.
    pub fn accept(&self) -> io::Result<(Stream, Peer)> {
        match &self.socket {
            ListenerSocket::Tcp(listener) => {
                let (stream, peer) = listener.accept()?;
                // Nodelay failing leaves a working, if slower, connection.
                let _ = stream.set_nodelay(true);
                Ok((Stream::Tcp(stream), Peer::Ip(peer)))
            }
            ListenerSocket::Unix(listener) => {
                let (stream, peer) = listener.accept()?;
                Ok((Stream::Unix(stream), Peer::Unix(peer)))
            }
        }
    }

    /// Switches between blocking and non-blocking accepts.
    ///
    /// # Errors
    ///
    /// The OS error of `ioctl`.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match &self.socket {
            ListenerSocket::Tcp(l) => l.set_nonblocking(nonblocking),
            ListenerSocket::Unix(l) => l.set_nonblocking(nonblocking),
        }
    }

    /// The bound address, with its scheme (`tcp://127.0.0.1:41234`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A TCP listener on `addr`. With `reuseport`, the socket is bound with SO_REUSEPORT
    /// so that [`StreamListener::bind_own_queue`] can add listeners with their own accept
    /// queues; it is bound once without it first, so a port another server holds (even one
    /// of ours with SO_REUSEPORT) fails with "address in use" instead of joining its group.
    ///
    /// # Errors
    ///
    /// The OS error of `socket`, `bind` or `listen`.
    pub fn bind_tcp(addr: SocketAddr, reuseport: bool) -> io::Result<StreamListener> {
        let plain = bind_tcp(addr, false)?;
        let local = plain
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("bound TCP socket has no IP address"))?;
        let socket = if reuseport {
            drop(plain);
            bind_tcp(local, true)?
        } else {
            plain
        };
        Ok(StreamListener {
            socket: ListenerSocket::Tcp(socket.into()),
            name: format!("tcp://{local}"),
            reuseport_addr: reuseport.then_some(local),
        })
    }

    /// Wraps a listening TCP socket bound by someone else (socket activation); `name` is
    /// its address as the `listening` line prints it. It gets no siblings with queues of
    /// their own: its owner did not set SO_REUSEPORT.
    pub fn from_tcp(listener: TcpListener, name: String) -> StreamListener {
        StreamListener {
            socket: ListenerSocket::Tcp(listener),
            name,
            reuseport_addr: None,
        }
    }

    /// Wraps a bound Unix listener; `name` is its address as the `listening` line prints it.
    pub fn from_unix(listener: UnixListener, name: String) -> StreamListener {
        StreamListener {
            socket: ListenerSocket::Unix(listener),
            name,
            reuseport_addr: None,
        }
    }

    /// The same listening socket under a second descriptor: both take connections from
    /// one accept queue.
    ///
    /// # Errors
    ///
    /// The OS error of `dup`.
    pub fn share_queue(&self) -> io::Result<StreamListener> {
        let socket = match &self.socket {
            ListenerSocket::Tcp(l) => ListenerSocket::Tcp(l.try_clone()?),
            ListenerSocket::Unix(l) => ListenerSocket::Unix(l.try_clone()?),
        };
        Ok(StreamListener {
            socket,
            name: self.name.clone(),
            reuseport_addr: self.reuseport_addr,
        })
    }

    /// A new SO_REUSEPORT socket on this listener's address, with an accept queue of its
    /// own; the kernel spreads new connections across the group by a hash of their
    /// addresses.
    ///
    /// # Errors
    ///
    /// `Unsupported` unless this is a TCP listener from [`StreamListener::bind_tcp`] with
    /// `reuseport`; else the OS error of binding the new socket.
    pub fn bind_own_queue(&self) -> io::Result<StreamListener> {
        let Some(addr) = self.reuseport_addr else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "only a TCP listener bound with SO_REUSEPORT can have siblings with their own queue",
            ));
        };
        Ok(StreamListener {
            socket: ListenerSocket::Tcp(bind_tcp(addr, true)?.into()),
            name: self.name.clone(),
            reuseport_addr: Some(addr),
        })
    }

    /// Whether [`StreamListener::bind_own_queue`] can add a sibling with its own queue.
    pub fn can_have_own_queue(&self) -> bool {
        self.reuseport_addr.is_some()
    }

    /// Whether this is a TCP listener.
    pub fn is_tcp(&self) -> bool {
        matches!(self.socket, ListenerSocket::Tcp(_))
    }

    /// The std TCP listener, for runtimes that adopt it (tokio).
    pub fn into_std(self) -> Result<TcpListener, UnixListener> {
        match self.socket {
            ListenerSocket::Tcp(l) => Ok(l),
            ListenerSocket::Unix(l) => Err(l),
        }
    }
}

impl AsFd for StreamListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.socket {
            ListenerSocket::Tcp(l) => l.as_fd(),
            ListenerSocket::Unix(l) => l.as_fd(),
        }
    }
}

/// A datagram socket, UDP or Unix.
#[derive(Debug)]
pub enum DatagramSocket {
    /// UDP.
    Udp(UdpSocket),
    /// Unix datagram.
    Unix(UnixDatagram),
}

impl DatagramSocket {
    /// A UDP socket bound to `addr`, and the address it got (port 0 picks one).
    ///
    /// # Errors
    ///
    /// The OS error of `socket`, `bind` or `getsockname`.
    pub fn bind_udp(addr: SocketAddr) -> io::Result<(DatagramSocket, SocketAddr)> {
        let socket = Socket::new(domain_of(&addr), Type::DGRAM.cloexec(), None)?;
        set_ipv6_only(&socket, &addr)?;
        // No SO_REUSEADDR: on UDP it would let two servers bind one port and split its traffic.
        socket.bind(&SockAddr::from(addr))?;
        let socket = UdpSocket::from(socket);
        let local = socket.local_addr()?;
        Ok((DatagramSocket::Udp(socket), local))
    }

    /// Receives one datagram into `buf`; returns how much of it `buf` got, and its
    /// sender. A datagram longer than `buf` is [`Received::Truncated`] (the kernel says so:
    /// `recvfrom` with `MSG_TRUNC` returns the real length).
    ///
    /// # Errors
    ///
    /// The OS error of `recvfrom`, including `WouldBlock` on a non-blocking socket.
    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<(Received, Peer)> {
        let (len, sender) = crate::sys::datagram::recv_from_whole(self.as_fd(), buf)?;
        let received = if len > buf.len() {
            Received::Truncated(len)
        } else {
            Received::Whole(len)
        };
        Ok((received, Peer::from_sock_addr(&sender)))
    }

    /// Raises the kernel's send and receive buffers of this socket so that every datagram
    /// up to [`DatagramSocket::max_datagram_bytes`] can be received and answered whole.
    ///
    /// Linux doubles what is asked (for its own bookkeeping) and silently caps the request
    /// at `net.core.wmem_max` / `net.core.rmem_max` (socket(7)); a buffer that is already
    /// larger is left alone.
    ///
    /// # Errors
    ///
    /// The OS error of `getsockopt` or `setsockopt`.
    pub fn size_buffers(&self) -> io::Result<()> {
        let socket = SockRef::from(self);
        let wanted = match self {
            DatagramSocket::Udp(_) => UDP_SOCKET_BUFFER_BYTES,
            DatagramSocket::Unix(_) => MAX_UNIX_DATAGRAM_BYTES + UNIX_DATAGRAM_SEND_OVERHEAD,
        };
        if socket.send_buffer_size()? < wanted {
            socket.set_send_buffer_size(wanted.div_ceil(2))?;
        }
        if socket.recv_buffer_size()? < wanted {
            socket.set_recv_buffer_size(wanted.div_ceil(2))?;
        }
        Ok(())
    }

    /// The UDP address the socket is bound to (`None` for a Unix socket, whose sender the
    /// kernel names: it cannot be forged).
    pub fn local_ip(&self) -> Option<SocketAddr> {
        match self {
            DatagramSocket::Udp(socket) => socket.local_addr().ok(),
            DatagramSocket::Unix(_) => None,
        }
    }

    /// The longest datagram this socket receives and answers whole, so the size of its
    /// receive buffer: [`MAX_UDP_DATAGRAM_BYTES`] for UDP; for Unix datagrams, what its
    /// send buffer lets it send back (`SO_SNDBUF - 32`; after
    /// [`DatagramSocket::size_buffers`] that is `2 * net.core.wmem_max - 32`), at most
    /// [`MAX_UNIX_DATAGRAM_BYTES`].
    pub fn max_datagram_bytes(&self) -> usize {
        match self {
            DatagramSocket::Udp(_) => MAX_UDP_DATAGRAM_BYTES,
            DatagramSocket::Unix(socket) => SockRef::from(socket)
                .send_buffer_size()
                .map_or(MAX_UDP_DATAGRAM_BYTES, |bytes| {
                    bytes.saturating_sub(UNIX_DATAGRAM_SEND_OVERHEAD)
                })
                .min(MAX_UNIX_DATAGRAM_BYTES),
        }
    }

    /// Sends `datagram` to `peer` as one datagram.
    ///
    /// # Errors
    ///
    /// The OS error of `sendto`; an unnamed Unix peer cannot be answered (`EDESTADDRREQ`
    /// style error).
    pub fn send_to(&self, datagram: &[u8], peer: &Peer) -> io::Result<usize> {
        match (self, peer) {
            (DatagramSocket::Udp(s), Peer::Ip(addr)) => s.send_to(datagram, addr),
            (DatagramSocket::Unix(s), Peer::Unix(addr)) => {
                if addr.is_unnamed() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrNotAvailable,
                        "the sender's socket is unnamed, so no reply can reach it",
                    ));
                }
                s.send_to_addr(datagram, addr)
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "peer address of the wrong family",
            )),
        }
    }

    /// Switches between blocking and non-blocking I/O.
    ///
    /// # Errors
    ///
    /// The OS error of `ioctl`.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match self {
            DatagramSocket::Udp(s) => s.set_nonblocking(nonblocking),
            DatagramSocket::Unix(s) => s.set_nonblocking(nonblocking),
        }
    }

    /// Another descriptor for the same socket (shared receive queue).
    ///
    /// # Errors
    ///
    /// The OS error of `dup`.
    pub fn try_clone(&self) -> io::Result<DatagramSocket> {
        Ok(match self {
            DatagramSocket::Udp(s) => DatagramSocket::Udp(s.try_clone()?),
            DatagramSocket::Unix(s) => DatagramSocket::Unix(s.try_clone()?),
        })
    }
}

impl AsFd for DatagramSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            DatagramSocket::Udp(s) => s.as_fd(),
            DatagramSocket::Unix(s) => s.as_fd(),
        }
    }
}

/// What a connect to a Unix socket file found behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnixPathState {
    /// No socket is bound to the file any more (`ECONNREFUSED`): it outlived its server.
    Stale,
    /// A live socket is bound to it.
    Live,
}

/// Finds out whether the socket file at `path` belongs to a live socket, with a connect of
/// the kind `datagram` says that never waits, so a live listener whose accept queue is
/// full cannot hold up the caller. Every answer of connect(2) on a Unix socket
/// (`unix_stream_connect` and `unix_dgram_connect` in Linux's `net/unix/af_unix.c`) that
/// can only come from a live socket counts as live:
///
/// - it connected;
/// - `EPROTOTYPE`: a live socket of the other kind;
/// - `EAGAIN`: a stream listener whose accept queue is full (a blocking connect would wait
///   until it accepts, possibly for ever);
/// - `EPERM`, for a datagram connect: a datagram socket connected to another peer, which
///   takes datagrams from that peer only.
///
/// # Errors
///
/// Any other OS error of `socket` or `connect`, e.g. `EACCES` when the caller may not
/// write to the file: then whether it is live is unknown.
pub fn probe_unix_path(path: &std::path::Path, datagram: bool) -> io::Result<UnixPathState> {
    let kind = if datagram { Type::DGRAM } else { Type::STREAM };
    let socket = Socket::new(Domain::UNIX, kind.nonblocking().cloexec(), None)?;
    let connected = socket.connect(&SockAddr::unix(path)?);
    // The probe's connection, if any, closes here: a live server sees a client that left.
    drop(socket);
    match connected {
        Ok(()) => Ok(UnixPathState::Live),
        Err(e) => match e.raw_os_error() {
            Some(crate::sys::errno::ECONNREFUSED) => Ok(UnixPathState::Stale),
            Some(crate::sys::errno::EPROTOTYPE) => Ok(UnixPathState::Live),
            Some(crate::sys::errno::EPERM) if datagram => Ok(UnixPathState::Live),
            _ if e.kind() == io::ErrorKind::WouldBlock => Ok(UnixPathState::Live),
            _ => Err(e),
        },
    }
}

fn domain_of(addr: &SocketAddr) -> Domain {
    if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    }
}

/// `[::]` means IPv6 only: IPv4 is asked for with its own flag. Every other IPv6 address
/// binds as written; an IPv4-mapped one (`[::ffff:127.0.0.1]`) needs IPv6-only mode off,
/// which is set explicitly because the system default (`net.ipv6.bindv6only`) may differ.
fn set_ipv6_only(socket: &Socket, addr: &SocketAddr) -> io::Result<()> {
    match addr {
        SocketAddr::V6(v6) => socket.set_only_v6(v6.ip().is_unspecified()),
        SocketAddr::V4(_) => Ok(()),
    }
}

fn bind_tcp(addr: SocketAddr, reuseport: bool) -> io::Result<Socket> {
    let socket = Socket::new(domain_of(&addr), Type::STREAM.cloexec(), None)?;
    set_ipv6_only(&socket, &addr)?;
    // Lets a restarted server bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if reuseport {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket)
}

impl From<Stream> for OwnedFd {
    fn from(stream: Stream) -> OwnedFd {
        match stream {
            Stream::Tcp(s) => s.into(),
            Stream::Unix(s) => s.into(),
        }
    }
}

impl From<DatagramSocket> for OwnedFd {
    fn from(socket: DatagramSocket) -> OwnedFd {
        match socket {
            DatagramSocket::Udp(s) => s.into(),
            DatagramSocket::Unix(s) => s.into(),
        }
    }
}

impl From<StreamListener> for OwnedFd {
    fn from(listener: StreamListener) -> OwnedFd {
        listener
            .into_std()
            .map_or_else(OwnedFd::from, OwnedFd::from)
    }
}
