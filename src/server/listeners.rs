//! Bound sockets: binding with the contract's rules, and the socket types models use.

use super::{Limits, ServeError};
use crate::addr::ListenSpec;
use socket2::{Domain, SockAddr, Socket, Type};
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown as Direction, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{self, UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Pending connections the kernel may queue per listener before the model accepts them.
const LISTEN_BACKLOG: i32 = 1024;

/// Who is at the other end of a connection or sent a datagram.
#[derive(Clone, Debug)]
pub enum Peer {
    /// An IP peer.
    Ip(SocketAddr),
    /// A Unix socket peer; often unnamed for stream clients.
    Unix(net::SocketAddr),
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
    /// Shuts down our sending side: the peer reads EOF after the bytes already sent.
    ///
    /// # Errors
    ///
    /// The OS error of `shutdown`, e.g. `ENOTCONN` when the peer is gone.
    pub fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(Direction::Write),
            Stream::Unix(s) => s.shutdown(Direction::Write),
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
    /// The OS error of `read`, including `WouldBlock` on a non-blocking stream.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }

    /// Writes some prefix of `bytes` and returns its length; callers pass the count to
    /// `WriteBuffer::advance`.
    ///
    /// # Errors
    ///
    /// The OS error of `write`, including `WouldBlock` on a non-blocking stream.
    pub fn write(&self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write(bytes),
            Stream::Unix(s) => (&*s).write(bytes),
        }
    }

    /// Consumes the stream into a socket2 socket, for options std lacks.
    pub fn into_socket(self) -> Socket {
        match self {
            Stream::Tcp(s) => Socket::from(s),
            Stream::Unix(s) => Socket::from(s),
        }
    }
}

impl AsFd for Stream {
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
    pub(super) socket: ListenerSocket,
    /// The bound address, as printed in the `listening` line.
    pub(super) name: String,
    /// Set when siblings are separate SO_REUSEPORT sockets with their own accept queues.
    pub(super) reuseport_addr: Option<SocketAddr>,
}

#[derive(Debug)]
pub(super) enum ListenerSocket {
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

    /// Another listener for the same address, for one more event loop.
    ///
    /// For TCP bound with `Listeners::bind(.., reuseport = true)` this is a new
    /// SO_REUSEPORT socket with its own accept queue, and the kernel spreads connections
    /// across the siblings; otherwise it is the same socket under a second descriptor,
    /// sharing one queue.
    ///
    /// # Errors
    ///
    /// The OS error of `dup` or of binding the sibling.
    pub fn sibling(&self) -> io::Result<StreamListener> {
        let socket = match (&self.socket, self.reuseport_addr) {
            (ListenerSocket::Tcp(_), Some(addr)) => {
                ListenerSocket::Tcp(bind_tcp(addr, true)?.into())
            }
            (ListenerSocket::Tcp(l), None) => ListenerSocket::Tcp(l.try_clone()?),
            (ListenerSocket::Unix(l), _) => ListenerSocket::Unix(l.try_clone()?),
        };
        Ok(StreamListener {
            socket,
            name: self.name.clone(),
            reuseport_addr: self.reuseport_addr,
        })
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
    /// Receives one datagram into `buf`; returns its length and sender.
    ///
    /// # Errors
    ///
    /// The OS error of `recvfrom`, including `WouldBlock` on a non-blocking socket.
    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, Peer)> {
        match self {
            DatagramSocket::Udp(s) => s.recv_from(buf).map(|(n, a)| (n, Peer::Ip(a))),
            DatagramSocket::Unix(s) => s.recv_from(buf).map(|(n, a)| (n, Peer::Unix(a))),
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

/// Counts open stream connections against `--max-conns`, across every thread or loop.
#[derive(Clone, Debug)]
pub struct ConnectionCounter {
    open: Arc<AtomicUsize>,
    max_conns: Option<usize>,
}

/// One admitted connection; dropping it frees its place under `--max-conns`.
#[derive(Debug)]
pub struct Admission {
    open: Arc<AtomicUsize>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionCounter {
    /// A counter for at most `max_conns` connections (`None`: unlimited).
    pub fn new(max_conns: Option<usize>) -> Self {
        ConnectionCounter {
            open: Arc::new(AtomicUsize::new(0)),
            max_conns,
        }
    }

    /// Takes a place, or `None` when `max_conns` are already open.
    pub fn admit(&self) -> Option<Admission> {
        let max = self.max_conns.unwrap_or(usize::MAX);
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()
            .map(|_| Admission {
                open: self.open.clone(),
            })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// The limit, if any.
    pub fn max_conns(&self) -> Option<usize> {
        self.max_conns
    }
}

/// Removes a Unix socket file we created when the server ends, unless something else
/// has replaced it meanwhile.
#[derive(Debug)]
struct UnixPathGuard {
    path: PathBuf,
    inode: u64,
    device: u64,
}

impl Drop for UnixPathGuard {
    fn drop(&mut self) {
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if meta.ino() == self.inode && meta.dev() == self.device {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// Every socket the server was asked to serve, bound and listening.
#[derive(Debug)]
pub struct Listeners {
    /// Stream listeners (TCP and Unix), in the order the flags were given.
    pub streams: Vec<StreamListener>,
    /// Datagram sockets (UDP and Unix), in the order the flags were given.
    pub datagrams: Vec<DatagramSocket>,
    /// The operator's limits.
    pub limits: Limits,
    /// Open connections against `--max-conns`, shared by every thread of the model.
    pub counter: ConnectionCounter,
    /// Every bound address in flag order, as the `listening` lines print it.
    pub(super) names: Vec<String>,
    unix_paths: Vec<UnixPathGuard>,
}

impl Listeners {
    /// Binds every spec in order.
    ///
    /// With `reuseport`, TCP listeners are bound so that [`StreamListener::sibling`] can
    /// add SO_REUSEPORT siblings; a plain bind is tried first, so an address another
    /// server holds is still reported as in use.
    ///
    /// # Errors
    ///
    /// The first spec that cannot be bound, naming it as the user typed it.
    pub fn bind(specs: &[ListenSpec], limits: Limits, reuseport: bool) -> Result<Self, ServeError> {
        let mut listeners = Listeners::empty(limits);
        for spec in specs {
            let addr = spec.to_string();
            let bind_error = |source| ServeError::Bind {
                addr: addr.clone(),
                source,
            };
            match spec {
                ListenSpec::Tcp(want) => {
                    let (listener, local) =
                        bind_tcp_checked(*want, reuseport).map_err(bind_error)?;
                    let name = format!("tcp://{local}");
                    listeners.names.push(name.clone());
                    listeners.streams.push(StreamListener {
                        socket: ListenerSocket::Tcp(listener),
                        name,
                        reuseport_addr: reuseport.then_some(local),
                    });
                }
                ListenSpec::Udp(want) => {
                    let socket = bind_udp(*want).map_err(bind_error)?;
                    let local = socket.local_addr().map_err(bind_error)?;
                    listeners.names.push(format!("udp://{local}"));
                    listeners.datagrams.push(DatagramSocket::Udp(socket));
                }
                ListenSpec::Unix(path) => {
                    prepare_unix_path(&addr, path, false)?;
                    let listener = UnixListener::bind(path).map_err(bind_error)?;
                    listeners
                        .unix_paths
                        .push(guard_for(path).map_err(bind_error)?);
                    let name = ListenSpec::Unix(absolute_or_as_typed(path)).to_string();
                    listeners.names.push(name.clone());
                    listeners.streams.push(StreamListener {
                        socket: ListenerSocket::Unix(listener),
                        name,
                        reuseport_addr: None,
                    });
                }
                ListenSpec::UnixDatagram(path) => {
                    prepare_unix_path(&addr, path, true)?;
                    let socket = UnixDatagram::bind(path).map_err(bind_error)?;
                    listeners
                        .unix_paths
                        .push(guard_for(path).map_err(bind_error)?);
                    let name = ListenSpec::UnixDatagram(absolute_or_as_typed(path));
                    listeners.names.push(name.to_string());
                    listeners.datagrams.push(DatagramSocket::Unix(socket));
                }
            }
        }
        Ok(listeners)
    }

    /// No listener yet.
    pub(super) fn empty(limits: Limits) -> Self {
        Listeners {
            streams: Vec::new(),
            datagrams: Vec::new(),
            counter: ConnectionCounter::new(limits.max_conns),
            limits,
            names: Vec::new(),
            unix_paths: Vec::new(),
        }
    }

    /// Every bound address in flag order, e.g. `tcp://127.0.0.1:41234`.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Raw descriptors of every listener, for models that must close them in a child.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.streams
            .iter()
            .map(|l| l.as_fd().as_raw_fd())
            .chain(self.datagrams.iter().map(|d| d.as_fd().as_raw_fd()))
            .collect()
    }
}

/// The path a readiness line names: absolute, as `unix:///abs/path` addresses are, so a
/// script can hand it to `reverb client` (errors still name the path as typed).
fn absolute_or_as_typed(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn domain_of(addr: &SocketAddr) -> Domain {
    if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    }
}

fn bind_tcp(addr: SocketAddr, reuseport: bool) -> io::Result<Socket> {
    let socket = Socket::new(domain_of(&addr), Type::STREAM.cloexec(), None)?;
    if addr.is_ipv6() {
        // `[::]` means IPv6 only; IPv4 is asked for with its own --tcp flag.
        socket.set_only_v6(true)?;
    }
    // Lets a restarted server bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if reuseport {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket)
}

/// Binds TCP; with `reuseport`, first without it, so a port another server holds (even
/// one of ours with SO_REUSEPORT) fails with "address in use" instead of joining its group.
fn bind_tcp_checked(addr: SocketAddr, reuseport: bool) -> io::Result<(TcpListener, SocketAddr)> {
    let plain = bind_tcp(addr, false)?;
    let local = plain
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("bound TCP socket has no IP address"))?;
    if !reuseport {
        return Ok((plain.into(), local));
    }
    drop(plain);
    Ok((bind_tcp(local, true)?.into(), local))
}

fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(domain_of(&addr), Type::DGRAM.cloexec(), None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // No SO_REUSEADDR: on UDP it would let two servers bind one port and split its traffic.
    socket.bind(&SockAddr::from(addr))?;
    Ok(socket.into())
}

/// Applies the Unix path rules: a stale socket is replaced, a live one is in use, and a
/// path that is not a socket is never touched.
fn prepare_unix_path(addr: &str, path: &Path, datagram: bool) -> Result<(), ServeError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServeError::Bind {
                addr: addr.to_string(),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ServeError::NotASocket {
            addr: addr.to_string(),
            path: path.to_path_buf(),
        });
    }
    let probe = if datagram {
        UnixDatagram::unbound().and_then(|s| s.connect(path))
    } else {
        UnixStream::connect(path).map(drop)
    };
    match probe {
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            tracing::info!("replacing stale socket {}", path.display());
            fs::remove_file(path).map_err(|source| ServeError::Bind {
                addr: addr.to_string(),
                source,
            })
        }
        // A live socket of either type (EPROTOTYPE: alive, but the other kind).
        Ok(()) => Err(ServeError::UnixPathInUse {
            addr: addr.to_string(),
            path: path.to_path_buf(),
        }),
        Err(e) if e.raw_os_error() == Some(libc::EPROTOTYPE) => Err(ServeError::UnixPathInUse {
            addr: addr.to_string(),
            path: path.to_path_buf(),
        }),
        Err(source) => Err(ServeError::Bind {
            addr: addr.to_string(),
            source,
        }),
    }
}

fn guard_for(path: &Path) -> io::Result<UnixPathGuard> {
    let meta = fs::symlink_metadata(path)?;
    Ok(UnixPathGuard {
        path: path.to_path_buf(),
        inode: meta.ino(),
        device: meta.dev(),
    })
}
