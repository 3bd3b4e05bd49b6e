//! What the models count (see `crate::metrics`): the transport of a socket, and the
//! reason a connection ended or a datagram went unanswered, decided in one place.

use super::{HandlerPanicked, datagram_source_allowed};
use crate::metrics::{CloseReason, Counters, DropReason, Transport};
use crate::net::{DatagramSocket, Peer, Stream};
use std::io;

impl std::fmt::Display for HandlerPanicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("handler panicked")
    }
}

impl std::error::Error for HandlerPanicked {}

/// `tcp` or `unix`.
pub fn stream_transport(stream: &Stream) -> Transport {
    match stream {
        Stream::Tcp(_) => Transport::Tcp,
        Stream::Unix(_) => Transport::Unix,
    }
}

/// `udp` or `unix-dgram`.
pub fn datagram_transport(socket: &DatagramSocket) -> Transport {
    match socket {
        DatagramSocket::Udp(_) => Transport::Udp,
        DatagramSocket::Unix(_) => Transport::UnixDatagram,
    }
}

/// Why a connection whose I/O failed with `error` ended.
pub fn close_reason(error: &io::Error) -> CloseReason {
    if error
        .get_ref()
        .is_some_and(|inner| inner.is::<HandlerPanicked>())
    {
        return CloseReason::HandlerPanic;
    }
    match error.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => CloseReason::Reset,
        _ => CloseReason::Error,
    }
}

/// The error a connection step returns when its handler panicked.
pub fn handler_panicked() -> io::Error {
    io::Error::other(HandlerPanicked)
}

/// Counts one datagram of `received` bytes from `peer` and what became of it: `reply`
/// is the reply's length, or `None` when it got none; `sent` is the send's result.
pub fn count_datagram(
    counters: &Counters,
    transport: Transport,
    peer: &Peer,
    received: usize,
    reply: Option<usize>,
    sent: Option<&io::Result<usize>>,
) {
    counters.datagram_received(transport, received);
    match (reply, sent) {
        (None, _) if !datagram_source_allowed(peer) => {
            counters.datagram_dropped(transport, DropReason::ReflectionGuard);
        }
        (None, _) => {
            counters.handler_panicked(transport);
            counters.datagram_dropped(transport, DropReason::HandlerPanic);
        }
        (Some(_), Some(Ok(written))) => counters.datagram_answered(transport, *written),
        (Some(_), Some(Err(e))) if e.kind() == io::ErrorKind::WouldBlock => {
            counters.datagram_dropped(transport, DropReason::PeerNotReading);
        }
        (Some(_), _) => counters.datagram_dropped(transport, DropReason::Error),
    }
}
