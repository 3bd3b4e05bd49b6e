//! Listeners from socket activation: the sockets a service manager bound and passed.

use super::{Limits, Listeners, ServeError};
use crate::addr::ListenSpec;
use crate::net::{DatagramSocket, StreamListener};
use crate::sys::activation::PassedFd;
use socket2::{Domain, Socket, Type};
use std::io;
use std::net::{TcpListener, UdpSocket};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{UnixDatagram, UnixListener};

impl Listeners {
    /// Serves the sockets a service manager passed, in the order passed, instead of
    /// binding: listening TCP and Unix stream sockets, UDP and Unix datagram sockets.
    /// Their Unix socket files belong to the service manager and are never removed.
    ///
    /// # Errors
    ///
    /// A passed socket of another kind (for example a connected one, from `Accept=yes`),
    /// named by its position and `FileDescriptorName=`.
    pub fn adopt(passed: Vec<PassedFd>, limits: Limits) -> Result<Self, ServeError> {
        let mut listeners = Listeners::empty(limits);
        for (index, PassedFd { fd, name }) in passed.into_iter().enumerate() {
            let label = match &name {
                Some(name) => format!("passed socket {} ({name})", index + 3),
                None => format!("passed socket {}", index + 3),
            };
            let fail = |source: io::Error| ServeError::Bind {
                addr: label.clone(),
                source,
            };
            let socket = Socket::from(fd);
            let domain = socket.domain().map_err(fail)?;
            let kind = socket.r#type().map_err(fail)?;
            let is_inet = domain == Domain::IPV4 || domain == Domain::IPV6;
            let unsupported = |what: &str| {
                fail(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{what}; expected a listening TCP or Unix stream socket, \
                         or a UDP or Unix datagram socket"
                    ),
                ))
            };
            if kind == Type::STREAM && !socket.is_listener().map_err(fail)? {
                return Err(unsupported(
                    "a stream socket that is not listening (Accept=yes?)",
                ));
            }
            match (is_inet, domain == Domain::UNIX, kind) {
                (true, _, Type::STREAM) => {
                    let listener: TcpListener = socket.into();
                    let local = listener.local_addr().map_err(fail)?;
                    let name = format!("tcp://{local}");
                    listeners.push_stream(StreamListener::from_tcp(listener, name));
                }
                (true, _, Type::DGRAM) => {
                    let socket: UdpSocket = socket.into();
                    let local = socket.local_addr().map_err(fail)?;
                    listeners
                        .push_datagram(format!("udp://{local}"), DatagramSocket::Udp(socket))
                        .map_err(fail)?;
                }
                (_, true, Type::STREAM) => {
                    let listener: UnixListener = socket.into();
                    let local = listener.local_addr().map_err(fail)?;
                    let name = unix_name(&local, false);
                    listeners.push_stream(StreamListener::from_unix(listener, name));
                }
                (_, true, Type::DGRAM) => {
                    let socket: UnixDatagram = socket.into();
                    let local = socket.local_addr().map_err(fail)?;
                    let name = unix_name(&local, true);
                    listeners
                        .push_datagram(name, DatagramSocket::Unix(socket))
                        .map_err(fail)?;
                }
                _ => return Err(unsupported("an unsupported socket family or type")),
            }
        }
        Ok(listeners)
    }

    fn push_stream(&mut self, listener: StreamListener) {
        self.names.push(listener.name().to_string());
        self.streams.push(listener);
    }

    fn push_datagram(&mut self, name: String, socket: DatagramSocket) -> io::Result<()> {
        socket.size_buffers()?;
        self.names.push(name);
        self.datagrams.push(socket);
        Ok(())
    }
}

/// `unix:///path` (or `unix-dgram://`), `unix://@name` for an abstract socket.
fn unix_name(addr: &std::os::unix::net::SocketAddr, is_datagram: bool) -> String {
    let scheme = if is_datagram { "unix-dgram" } else { "unix" };
    match (addr.as_pathname(), addr.as_abstract_name()) {
        (Some(path), _) if is_datagram => ListenSpec::UnixDatagram(path.to_path_buf()).to_string(),
        (Some(path), _) => ListenSpec::Unix(path.to_path_buf()).to_string(),
        (None, Some(name)) => format!("{scheme}://@{}", String::from_utf8_lossy(name)),
        (None, None) => format!("{scheme}://(unnamed)"),
    }
}
