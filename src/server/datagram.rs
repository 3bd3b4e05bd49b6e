//! Answering datagrams: the reflection guard, the protocol's one reply, panic isolation.

use super::connection::{HandlerPanicked, catch_datagram_panic};
use super::lifecycle::{DatagramDrop, LoopLog, datagram_transport};
use crate::metrics::Transport;
use crate::net::{DatagramSocket, Peer, Received};
use crate::protocol::Protocol;
use std::io;
use std::net::{IpAddr, SocketAddr};

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

/// Turns datagrams into replies for one socket, reusing one reply buffer.
#[derive(Debug)]
pub struct DatagramReplier {
    protocol: Protocol,
    reply: Vec<u8>,
}

impl DatagramReplier {
    /// A replier speaking `protocol`.
    pub fn new(protocol: Protocol) -> Self {
        DatagramReplier {
            protocol,
            reply: Vec::new(),
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
        if !datagram_source_allowed(peer) {
            log.dropped(peer, transport, &DatagramDrop::ReflectionGuard);
            return None;
        }
        let DatagramReplier { protocol, reply } = self;
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
        let transport = datagram_transport(socket);
        if let Some(reply) = self.reply(peer, transport, datagram, log) {
            log.reply_sent(peer, transport, &socket.send_to(reply, peer));
        }
    }

    /// Answers what one receive on `socket` got into `buf` from `peer`: a whole datagram
    /// is answered ([`DatagramReplier::answer`]); a truncated one is counted, logged and
    /// dropped (`too_large`), never echoed short.
    pub fn answer_received(
        &mut self,
        socket: &DatagramSocket,
        peer: &Peer,
        received: Received,
        buf: &[u8],
        log: &LoopLog,
    ) {
        match received {
            Received::Whole(len) => self.answer(socket, peer, &buf[..len], log),
            Received::Truncated(len) => {
                let transport = datagram_transport(socket);
                log.datagram_received(transport, len);
                let max = buf.len();
                log.dropped(peer, transport, &DatagramDrop::TooLarge { len, max });
            }
        }
    }

    /// Receives and answers up to `max` datagrams queued on the non-blocking `socket`,
    /// using `buf` (of [`DatagramSocket::max_datagram_bytes`]) to receive.
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
    ) -> io::Result<()> {
        for _ in 0..max {
            let (received, peer) = match socket.recv_from(buf) {
                Ok(received) => received,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if is_per_peer_datagram_error(&e) => continue,
                Err(e) => return Err(e),
            };
            self.answer_received(socket, &peer, received, buf, log);
        }
        Ok(())
    }
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
    }
}
