//! Answering datagrams: the reflection guard, the protocol's one reply, panic isolation.

use super::connection::{HandlerPanicked, catch_datagram_panic};
use super::lifecycle::{DatagramDrop, LoopLog, datagram_transport};
use crate::metrics::Transport;
use crate::net::{DatagramSocket, Peer, Received};
use crate::protocol::Protocol;
use std::io;
use std::net::{IpAddr, SocketAddr};

/// Datagrams a thread or task answers per readiness of one socket before it looks at
/// shutdown and its other work again ([`DatagramReplier::answer_queued`]'s `max`).
pub const DATAGRAM_BATCH: usize = 64;

/// Whether an echo may answer a datagram from `peer`.
///
/// Spoofed sources are how echo servers become reflectors: a datagram "from" another
/// echo's port 7 (or any port below 1024) starts a loop between the two, and one "from" a
/// broadcast or multicast address multiplies the reply. Such datagrams are dropped.
pub fn datagram_source_allowed(peer: &Peer) -> bool {
    match peer {
        Peer::Unix(_) => true,
        Peer::Ip(addr) => is_ip_source_allowed(addr),
    }
}

fn is_ip_source_allowed(addr: &SocketAddr) -> bool {
    if addr.port() < 1024 {
        return false;
    }
    match addr.ip() {
        IpAddr::V4(ip) => !(ip.is_broadcast() || ip.is_multicast() || ip.is_unspecified()),
        IpAddr::V6(ip) => {
            if let Some(v4) = ip.to_ipv4_mapped() {
                return is_ip_source_allowed(&SocketAddr::new(IpAddr::V4(v4), addr.port()));
            }
            !(ip.is_multicast() || ip.is_unspecified())
        }
    }
}

/// Whether `peer` is the socket's own address, `local`: a datagram forged "from" it would
/// have the socket answer itself for ever. A socket bound to every address (`0.0.0.0`,
/// `::`) cannot tell which of the host's addresses is its own, so there any source with
/// its port is taken as its own; that also keeps two echoes on the same port, one per
/// host, from answering each other.
fn is_own_address(peer: &Peer, local: Option<SocketAddr>) -> bool {
    let (Peer::Ip(source), Some(local)) = (peer, local) else {
        return false;
    };
    let canonical = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    source.port() == local.port()
        && (local.ip().is_unspecified() || canonical(source.ip()) == canonical(local.ip()))
}

/// Turns datagrams into replies for one socket, reusing one reply buffer.
#[derive(Debug)]
pub struct DatagramReplier {
    protocol: Protocol,
    reply: Vec<u8>,
    /// The UDP address of the socket answered, for the guard against its own address:
    /// looked up once, when the replier is made for its socket, not per datagram.
    local: Option<SocketAddr>,
}

impl DatagramReplier {
    /// A replier speaking `protocol` that learns its socket's address with each
    /// [`DatagramReplier::answer`] (a process per datagram, as `forking`, answers each
    /// datagram of every socket with one replier).
    pub fn new(protocol: Protocol) -> Self {
        DatagramReplier {
            protocol,
            reply: Vec::new(),
            local: None,
        }
    }

    /// A replier speaking `protocol` for `socket` alone: the one
    /// [`DatagramReplier::answer_queued`] and [`DatagramReplier::answer_with`] need.
    pub fn for_socket(protocol: Protocol, socket: &DatagramSocket) -> Self {
        DatagramReplier {
            local: socket.local_ip(),
            ..DatagramReplier::new(protocol)
        }
    }

    /// Counts `datagram` from `peer` over `transport` in `log`, and returns the reply
    /// owed to it, or `None` when it gets none (a guarded source, or a handler that
    /// panicked; both are logged and counted). The model sends the reply and tells `log`
    /// how that went ([`LoopLog::reply_sent`]); [`DatagramReplier::answer`] does both.
    pub fn reply(
        &mut self,
        peer: &Peer,
        transport: Transport,
        datagram: &[u8],
        log: &LoopLog,
    ) -> Option<&[u8]> {
        log.datagram_received(transport, datagram.len());
        if !datagram_source_allowed(peer) || is_own_address(peer, self.local) {
            log.dropped(peer, transport, &DatagramDrop::ReflectionGuard);
            return None;
        }
        let DatagramReplier {
            protocol, reply, ..
        } = self;
        match catch_datagram_panic(peer, || protocol.reply_to_datagram(datagram, reply)) {
            Ok(()) => Some(&self.reply),
            Err(HandlerPanicked) => {
                log.dropped(peer, transport, &DatagramDrop::HandlerPanicked);
                None
            }
        }
    }

    /// Answers one datagram `peer` sent to the non-blocking `socket`; a reply that cannot
    /// be sent at once is logged and dropped, and the socket keeps serving others.
    pub fn answer(&mut self, socket: &DatagramSocket, peer: &Peer, datagram: &[u8], log: &LoopLog) {
        self.local = socket.local_ip();
        self.answer_own(socket, peer, datagram, log);
    }

    /// [`DatagramReplier::answer`] by the replier made for `socket`, which knows its address.
    fn answer_own(&mut self, socket: &DatagramSocket, peer: &Peer, datagram: &[u8], log: &LoopLog) {
        let transport = datagram_transport(socket);
        if let Some(reply) = self.reply(peer, transport, datagram, log) {
            log.reply_sent(peer, transport, &socket.send_to(reply, peer));
        }
    }

    /// Answers what one receive got into `buf` from `peer`, on a socket of `transport`
    /// that `send` writes the reply to with one non-blocking send (a model whose socket
    /// sits in a ring, not in a [`DatagramSocket`] of its own): a whole datagram is
    /// answered; a truncated one is counted, logged and dropped (`too_large`), never
    /// echoed short.
    pub fn answer_with(
        &mut self,
        peer: &Peer,
        transport: Transport,
        received: Received,
        buf: &[u8],
        log: &LoopLog,
        send: impl FnOnce(&[u8]) -> io::Result<usize>,
    ) {
        match received {
            Received::Whole(len) => {
                if let Some(reply) = self.reply(peer, transport, &buf[..len], log) {
                    log.reply_sent(peer, transport, &send(reply));
                }
            }
            Received::Truncated(len) => drop_too_large(peer, transport, len, buf.len(), log),
        }
    }

    /// Receives and answers up to `max` datagrams queued on the non-blocking `socket`, the
    /// one this replier was made for ([`DatagramReplier::for_socket`]),
    /// using `buf` (of [`DatagramSocket::max_datagram_bytes`]) to receive. Returns whether
    /// the queue was emptied (a receive found nothing), so that a runtime that caches
    /// readiness knows to wait for the next edge; `false`: more may wait.
    ///
    /// # Errors
    ///
    /// A receive error other than "nothing queued" or one about an earlier peer
    /// ([`is_per_peer_datagram_error`]).
    pub fn answer_queued(
        &mut self,
        socket: &DatagramSocket,
        buf: &mut [u8],
        max: usize,
        log: &LoopLog,
    ) -> io::Result<bool> {
        for _ in 0..max {
            match receive_datagram(socket, buf, log)? {
                Receipt::Datagram(len, peer) => self.answer_own(socket, &peer, &buf[..len], log),
                Receipt::Nothing => {}
                Receipt::Empty => return Ok(true),
            }
        }
        Ok(false)
    }
}

/// What one receive on a datagram socket came to.
#[derive(Debug)]
pub enum Receipt {
    /// A whole datagram of this many bytes from this peer, to answer.
    Datagram(usize, Peer),
    /// Nothing to answer: a datagram too large (counted, logged and dropped), or an
    /// error about an earlier peer ([`is_per_peer_datagram_error`]).
    Nothing,
    /// Nothing is queued.
    Empty,
}

/// Receives one datagram from the non-blocking `socket` into `buf` (of
/// [`DatagramSocket::max_datagram_bytes`]); one read truncated is dropped here, never
/// answered short.
///
/// # Errors
///
/// A receive error about the socket itself.
pub fn receive_datagram(
    socket: &DatagramSocket,
    buf: &mut [u8],
    log: &LoopLog,
) -> io::Result<Receipt> {
    match socket.recv_from(buf) {
        Ok((Received::Whole(len), peer)) => Ok(Receipt::Datagram(len, peer)),
        Ok((Received::Truncated(len), peer)) => {
            let transport = datagram_transport(socket);
            drop_too_large(&peer, transport, len, buf.len(), log);
            Ok(Receipt::Nothing)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Receipt::Empty),
        Err(e) if is_per_peer_datagram_error(&e) => Ok(Receipt::Nothing),
        Err(e) => Err(e),
    }
}

/// Counts and drops a datagram of `len` bytes that was read truncated into a buffer of
/// `max` bytes.
fn drop_too_large(peer: &Peer, transport: Transport, len: usize, max: usize, log: &LoopLog) {
    log.datagram_received(transport, len);
    log.dropped(peer, transport, &DatagramDrop::TooLarge { len, max });
}

/// Errors a datagram socket reports about one earlier peer, not about itself: Linux
/// delivers an ICMP error for an earlier send on the next receive.
pub fn is_per_peer_datagram_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::Interrupted
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflection_guard() {
        let allowed = |s: &str| is_ip_source_allowed(&s.parse().unwrap());
        assert!(allowed("127.0.0.1:40000"));
        assert!(allowed("[::1]:40000"));
        assert!(!allowed("127.0.0.1:7"));
        assert!(!allowed("255.255.255.255:40000"));
        assert!(!allowed("224.0.0.1:40000"));
        assert!(!allowed("[ff02::1]:40000"));
        assert!(!allowed("[::ffff:255.255.255.255]:40000"));
        assert!(!allowed("0.0.0.0:40000"));
        assert!(!allowed("[::]:40000"));
    }

    #[test]
    fn a_datagram_from_the_sockets_own_address_is_not_answered() {
        let ip = |s: &str| Peer::Ip(s.parse().unwrap());
        let local = Some("127.0.0.1:17007".parse().unwrap());
        assert!(is_own_address(&ip("127.0.0.1:17007"), local));
        assert!(is_own_address(&ip("[::ffff:127.0.0.1]:17007"), local));
        assert!(!is_own_address(&ip("127.0.0.1:17008"), local));
        assert!(!is_own_address(&ip("127.0.0.2:17007"), local));
        let any = Some("0.0.0.0:17007".parse().unwrap());
        assert!(is_own_address(&ip("10.1.2.3:17007"), any));
        assert!(!is_own_address(&ip("10.1.2.3:17008"), any));
        assert!(!is_own_address(&ip("127.0.0.1:17007"), None));
        let log = LoopLog::default();
        let mut replier =
            DatagramReplier::new(Protocol::new(crate::protocol::ProtocolKind::Echo, 64));
        replier.local = local;
        let own = replier.reply(&ip("127.0.0.1:17007"), Transport::Udp, b"loop", &log);
        assert_eq!(own, None);
        let other = replier.reply(&ip("127.0.0.1:17008"), Transport::Udp, b"hi", &log);
        assert_eq!(other, Some(&b"hi"[..]));
    }

    #[test]
    fn a_replier_made_for_a_socket_knows_its_address() {
        let (socket, local) = DatagramSocket::bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let protocol = Protocol::new(crate::protocol::ProtocolKind::Echo, 64);
        let mut replier = DatagramReplier::for_socket(protocol, &socket);
        let log = LoopLog::default();
        let own = replier.reply(&Peer::Ip(local), Transport::Udp, b"loop", &log);
        assert_eq!(own, None, "a datagram from the socket's own address");
        let other = Peer::Ip(SocketAddr::new(local.ip(), local.port() ^ 1));
        let answered = replier.reply(&other, Transport::Udp, b"hi", &log);
        assert_eq!(answered, Some(&b"hi"[..]));
    }

    #[test]
    fn the_guard_starts_at_port_1024() {
        let allowed = |s: &str| datagram_source_allowed(&Peer::Ip(s.parse().unwrap()));
        assert!(
            !allowed("127.0.0.1:1023"),
            "a system port may be another echo"
        );
        assert!(allowed("127.0.0.1:1024"));
        assert!(!allowed("[::1]:1023"));
        assert!(allowed("[::1]:1024"));
        let (socket, _other) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let unix = Peer::Unix(socket.local_addr().unwrap());
        assert!(
            datagram_source_allowed(&unix),
            "a Unix peer has no port to spoof"
        );
    }

    #[test]
    fn a_replier_answers_with_the_prefix_and_drops_what_it_must() {
        use crate::protocol::ProtocolKind;
        let log = LoopLog::default();
        let protocol = Protocol::new(ProtocolKind::Lines, 64)
            .with_prefix(b"> ")
            .with_panic_on(b"boom");
        let mut replier = DatagramReplier::new(protocol);
        let client = Peer::Ip("127.0.0.1:40000".parse().unwrap());
        assert_eq!(
            replier.reply(&client, Transport::Udp, b"hi\n", &log),
            Some(&b"> hi\n"[..])
        );
        assert_eq!(
            replier.reply(&client, Transport::Udp, b"", &log),
            Some(&b"> "[..]),
            "an empty datagram gets the prefix alone"
        );
        let echo_port = Peer::Ip("127.0.0.1:7".parse().unwrap());
        assert_eq!(
            replier.reply(&echo_port, Transport::Udp, b"hi\n", &log),
            None
        );
        assert_eq!(
            replier.reply(&client, Transport::Udp, b"boom\n", &log),
            None
        );
        assert_eq!(
            replier.reply(&client, Transport::Udp, b"after\n", &log),
            Some(&b"> after\n"[..]),
            "a panic costs only its own datagram"
        );
    }

    #[test]
    fn answer_queued_answers_every_queued_datagram_then_returns() {
        use crate::protocol::ProtocolKind;
        use std::net::UdpSocket;
        use std::time::Duration;
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server.set_nonblocking(true).unwrap();
        let server_addr = server.local_addr().unwrap();
        let socket = DatagramSocket::Udp(server);
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut replier = DatagramReplier::new(Protocol::new(ProtocolKind::Echo, 64));
        let log = LoopLog::default();
        let mut buf = [0u8; 64];
        let emptied = replier.answer_queued(&socket, &mut buf, 8, &log);
        assert!(emptied.expect("an empty queue is not an error"));
        for datagram in [&b"one"[..], b"two", b"three"] {
            client.send_to(datagram, server_addr).unwrap();
        }
        // Loopback delivers at once, but give the kernel a moment on a loaded machine.
        std::thread::sleep(Duration::from_millis(50));
        let emptied = replier.answer_queued(&socket, &mut buf, 2, &log).unwrap();
        assert!(!emptied, "a third datagram waits");
        let mut reply = [0u8; 64];
        for expected in [&b"one"[..], b"two"] {
            let n = client.recv(&mut reply).unwrap();
            assert_eq!(&reply[..n], expected);
        }
        client.set_nonblocking(true).unwrap();
        assert!(
            client.recv(&mut reply).is_err(),
            "at most `max` datagrams are answered at once"
        );
        replier.answer_queued(&socket, &mut buf, 2, &log).unwrap();
        client.set_nonblocking(false).unwrap();
        let n = client.recv(&mut reply).unwrap();
        assert_eq!(&reply[..n], b"three");
    }

    #[test]
    fn answer_sends_the_reply_to_the_peer() {
        use crate::protocol::ProtocolKind;
        use std::net::UdpSocket;
        use std::time::Duration;
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server.set_nonblocking(true).unwrap();
        let socket = DatagramSocket::Udp(server);
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let peer = Peer::Ip(client.local_addr().unwrap());
        let protocol = Protocol::new(ProtocolKind::Lines, 64).with_prefix(b"> ");
        let mut replier = DatagramReplier::new(protocol);
        replier.answer(&socket, &peer, b"ping\n", &LoopLog::default());
        let mut reply = [0u8; 64];
        let n = client.recv(&mut reply).expect("the reply arrives");
        assert_eq!(&reply[..n], b"> ping\n");
    }

    #[test]
    fn an_error_of_the_socket_itself_stops_the_batch() {
        use crate::protocol::ProtocolKind;
        use std::net::{TcpListener, UdpSocket};
        use std::os::fd::OwnedFd;
        // A receive on a listening TCP socket fails with ENOTCONN: an error of the socket,
        // about no peer, which must reach the model rather than be skipped `max` times.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let not_a_datagram_socket = UdpSocket::from(OwnedFd::from(listener));
        not_a_datagram_socket.set_nonblocking(true).unwrap();
        let socket = DatagramSocket::Udp(not_a_datagram_socket);
        let mut replier = DatagramReplier::new(Protocol::new(ProtocolKind::Echo, 64));
        let mut buf = [0u8; 64];
        let result = replier.answer_queued(&socket, &mut buf, 8, &LoopLog::default());
        assert_eq!(
            result.map_err(|e| e.kind()),
            Err(io::ErrorKind::NotConnected)
        );
    }

    #[test]
    fn an_icmp_error_about_an_earlier_reply_is_skipped_and_the_next_datagram_answered() {
        use crate::protocol::ProtocolKind;
        use std::net::UdpSocket;
        use std::time::Duration;
        // A connected UDP socket is told of a port unreachable for what it sent: the next
        // receive returns ECONNREFUSED (udp(7)), ahead of any datagram queued since.
        let gone = UdpSocket::bind("127.0.0.1:0").unwrap();
        let gone_addr = gone.local_addr().unwrap();
        drop(gone);
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server.connect(gone_addr).unwrap();
        server.send(b"reply to a peer that left").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let Ok(client) = UdpSocket::bind(gone_addr) else {
            eprintln!(
                "skipped: port {} was taken again meanwhile",
                gone_addr.port()
            );
            return;
        };
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client
            .send_to(b"next", server.local_addr().unwrap())
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        server.set_nonblocking(true).unwrap();
        let socket = DatagramSocket::Udp(server);
        let mut replier = DatagramReplier::new(Protocol::new(ProtocolKind::Echo, 64));
        let mut buf = [0u8; 64];
        replier
            .answer_queued(&socket, &mut buf, 8, &LoopLog::default())
            .expect("an error about an earlier peer is not the socket's");
        let mut reply = [0u8; 64];
        let n = client
            .recv(&mut reply)
            .expect("the datagram behind the error is answered in the same batch");
        assert_eq!(&reply[..n], b"next");
    }

    #[test]
    fn errors_about_an_earlier_peer_do_not_stop_the_socket() {
        for kind in [
            io::ErrorKind::Interrupted,
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::HostUnreachable,
            io::ErrorKind::NetworkUnreachable,
        ] {
            assert!(is_per_peer_datagram_error(&kind.into()), "{kind:?}");
        }
        for kind in [io::ErrorKind::PermissionDenied, io::ErrorKind::InvalidInput] {
            assert!(!is_per_peer_datagram_error(&kind.into()), "{kind:?}");
        }
    }
}
