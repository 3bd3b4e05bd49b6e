//! The sockets a bench connection talks through, opened non-blocking.
//!
//! [`Stream`] is the byte-stream transport the stream connection (`stream.rs`) reads and
//! writes. A transport that needs its own handshake on top of the socket's (TLS) becomes
//! one more variant: `connect_state` reports it established once its handshake is done,
//! and `read`/`write` carry plaintext, so the connection above it does not change.

use super::engine::Opened;
use crate::addr::Endpoint;
use socket2::{Domain, SockAddr, Socket, Type};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::PathBuf;

/// A stream connection's socket.
pub(super) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// Starts connecting to a stream endpoint (from `source`, when given).
    pub fn open(endpoint: &Endpoint, source: Option<IpAddr>) -> io::Result<Opened<Stream>> {
        match endpoint {
            Endpoint::Tcp(addr) => {
                let socket =
                    Socket::new(Domain::for_address(*addr), Type::STREAM.nonblocking(), None)?;
                socket.set_tcp_nodelay(true)?;
                if let Some(ip) = source {
                    // The port is chosen at connect, per destination, so a source address
                    // is not used up by connections to other servers (ip(7)).
                    crate::sys::bind_no_port::defer_port_to_connect(socket.as_fd())?;
                    socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
                }
                match socket.connect(&SockAddr::from(*addr)) {
                    Ok(()) => Ok(Opened::Established(Stream::Tcp(socket.into()))),
                    Err(e) if is_in_progress(&e) => {
                        Ok(Opened::Connecting(Stream::Tcp(socket.into())))
                    }
                    Err(e) => Err(e),
                }
            }
            Endpoint::Unix(path) => {
                let socket = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None)?;
                match socket.connect(&SockAddr::unix(path)?) {
                    Ok(()) => Ok(Opened::Established(Stream::Unix(socket.into()))),
                    // A non-blocking Unix connect never waits: the listener's backlog is full.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Opened::Busy),
                    Err(e) => Err(e),
                }
            }
            Endpoint::Tls {
                addr,
                server_name,
                verify,
            } => {
                // The handshake is made here, blocking (bounded by its own timeout); the
                // connection above then reads and writes plaintext through a relay.
                let tcp = TcpStream::connect(addr)?;
                tcp.set_nodelay(true)?;
                let plain = crate::tls_client::connect(tcp, server_name, verify)?;
                plain.set_nonblocking(true)?;
                Ok(Opened::Established(Stream::Unix(plain)))
            }
            Endpoint::Udp(_) | Endpoint::UnixDatagram(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a stream endpoint",
            )),
        }
    }

    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }

    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
        }
    }

    /// Whether the connection is established: the socket's pending error if the
    /// handshake failed, `false` while it is still under way.
    pub fn connect_state(&self) -> io::Result<bool> {
        let (error, peer) = match self {
            Stream::Tcp(s) => (s.take_error(), s.peer_addr().map(|_| ())),
            Stream::Unix(s) => (s.take_error(), s.peer_addr().map(|_| ())),
        };
        if let Some(error) = error? {
            return Err(error);
        }
        match peer {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

/// `EINPROGRESS`: a non-blocking TCP connect has started.
fn is_in_progress(error: &io::Error) -> bool {
    error.raw_os_error() == Some(crate::sys::errno::EINPROGRESS)
}

/// A datagram connection's socket, connected to the server.
pub(super) enum Datagram {
    Udp(UdpSocket),
    /// The path is held only to be removed when the socket goes.
    Unix {
        socket: UnixDatagram,
        _path: BoundPath,
    },
}

impl Datagram {
    /// A socket connected to a datagram endpoint (from `source`, when given). A Unix one
    /// is bound to a temporary path, or the server could not answer it.
    pub fn open(endpoint: &Endpoint, id: u64, source: Option<IpAddr>) -> io::Result<Datagram> {
        let socket = match endpoint {
            Endpoint::Udp(addr) => {
                let local: SocketAddr = match source {
                    Some(ip) => SocketAddr::new(ip, 0),
                    None if addr.is_ipv6() => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
                    None => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
                };
                let socket = UdpSocket::bind(local)?;
                socket.connect(addr)?;
                socket.set_nonblocking(true)?;
                Datagram::Udp(socket)
            }
            Endpoint::UnixDatagram(path) => {
                let own = BoundPath::new(id);
                let socket = UnixDatagram::bind(&own.0)?;
                socket.connect(path)?;
                socket.set_nonblocking(true)?;
                Datagram::Unix { socket, _path: own }
            }
            Endpoint::Tcp(_) | Endpoint::Unix(_) | Endpoint::Tls { .. } => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a datagram endpoint",
                ));
            }
        };
        Ok(socket)
    }

    pub fn send(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Datagram::Udp(s) => s.send(buf),
            Datagram::Unix { socket: s, .. } => s.send(buf),
        }
    }

    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Datagram::Udp(s) => s.recv(buf),
            Datagram::Unix { socket: s, .. } => s.recv(buf),
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Datagram::Udp(s) => s.as_fd(),
            Datagram::Unix { socket: s, .. } => s.as_fd(),
        }
    }
}

/// The path a Unix datagram client socket is bound to; removed when dropped.
pub(super) struct BoundPath(PathBuf);

impl BoundPath {
    fn new(id: u64) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "reverb-bench-{}-{id:x}-{}.sock",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        BoundPath(std::env::temp_dir().join(name))
    }
}

impl Drop for BoundPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
