//! Where a connection's life is recorded and ended: every event of a loop passes through
//! its [`LoopLog`], and every connection the server ends goes through [`close`].
//!
//! One place for each, so that what must reach every model is written once: the log lines,
//! the per-loop counters, and the lingering close.

use super::ACCEPT_PAUSE;
use crate::metrics::{self, Counters, DropReason, Metrics, Transport};
use crate::net::{DatagramSocket, Peer, Stream, StreamListener};
use std::io;
use std::time::Duration;

/// Why the server ends a connection.
#[derive(Debug)]
pub enum CloseReason {
    /// The peer half-closed and every reply owed was sent: it reads EOF after the last.
    PeerEof,
    /// The protocol said goodbye (`until-quit`'s `quit`) and everything owed was sent.
    Quit,
    /// A layer refused the peer before the protocol began (a bad PROXY header, a failed
    /// TLS handshake, the setup deadline); what it owed (a TLS alert) was sent.
    Rejected,
    /// Shutdown: everything owed was sent before `--drain-timeout`.
    Drained,
    /// Nothing arrived for `--idle-timeout`.
    Idle(Duration),
    /// `--max-conns` connections were already open: refused, never admitted.
    OverLimit(usize),
    /// The protocol handler panicked (already logged with the panic message).
    HandlerPanicked,
    /// The drain timeout passed with `owed` bytes still unsent.
    DrainTimeout {
        /// Bytes the peer never got.
        owed: usize,
    },
    /// The model cannot watch this connection (select's `FD_SETSIZE`, a failed
    /// `epoll_ctl`, a failed switch to non-blocking mode).
    CannotWatch(String),
    /// A read or write failed: the peer reset or went away.
    Failed(io::Error),
}

impl CloseReason {
    /// Whether everything owed was sent, so the peer should read EOF after the last reply.
    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            CloseReason::PeerEof
                | CloseReason::Quit
                | CloseReason::Rejected
                | CloseReason::Drained
                | CloseReason::HandlerPanicked
        )
    }

    /// What closing for this reason does to the socket: every close the server starts
    /// before the peer's EOF is a lingering close, so the peer's unread bytes cannot turn
    /// it into a reset that destroys the replies still on their way.
    pub fn ending(&self) -> Ending {
        match self {
            CloseReason::PeerEof => Ending::Eof,
            CloseReason::Quit
            | CloseReason::Rejected
            | CloseReason::Drained
            | CloseReason::HandlerPanicked
            | CloseReason::Idle(_)
            | CloseReason::DrainTimeout { .. } => Ending::Lingering,
            CloseReason::OverLimit(_) => Ending::Refused,
            CloseReason::CannotWatch(_) | CloseReason::Failed(_) => Ending::Abort,
        }
    }

    /// The `reason` label it is counted under, or `None` for a connection never admitted.
    fn counted_as(&self) -> Option<metrics::CloseReason> {
        Some(match self {
            CloseReason::PeerEof => metrics::CloseReason::PeerEof,
            CloseReason::Quit => metrics::CloseReason::Quit,
            CloseReason::Rejected => metrics::CloseReason::Rejected,
            CloseReason::Drained => metrics::CloseReason::Drain,
            CloseReason::Idle(_) => metrics::CloseReason::IdleTimeout,
            CloseReason::OverLimit(_) => return None,
            CloseReason::HandlerPanicked => metrics::CloseReason::HandlerPanic,
            CloseReason::DrainTimeout { .. } => metrics::CloseReason::DrainCut,
            CloseReason::CannotWatch(_) => metrics::CloseReason::Error,
            CloseReason::Failed(e) => match e.kind() {
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                    metrics::CloseReason::Reset
                }
                _ => metrics::CloseReason::Error,
            },
        })
    }
}

/// Why a datagram got no answer.
#[derive(Debug)]
pub enum DatagramDrop<'a> {
    /// Its source may be spoofed to turn the server into a reflector.
    ReflectionGuard,
    /// The protocol handler panicked (already logged).
    HandlerPanicked,
    /// `sendto` failed.
    SendFailed(&'a io::Error),
}

/// The one place every connection event of one loop (or thread, or forked child) passes:
/// accepted, refused, closed with its reason, bytes in and out, datagrams answered and
/// dropped, accepts paused. It writes the log lines and this loop's counters (`--metrics`),
/// of which it is the only writer.
#[derive(Debug)]
pub struct LoopLog {
    counters: Counters,
}

impl Default for LoopLog {
    /// A log that counts nothing.
    fn default() -> Self {
        LoopLog::new(Metrics::disabled())
    }
}

impl LoopLog {
    /// A log counting into a slot of its own in `metrics`; the slot's counts are kept
    /// when the log is dropped.
    pub fn new(metrics: Metrics) -> Self {
        LoopLog {
            counters: metrics.counters(),
        }
    }

    /// A connection from `peer` over `transport` was accepted on `listener` and admitted.
    pub fn accepted(&self, peer: &Peer, transport: Transport, listener: &str) {
        tracing::debug!("accepted {peer} on {listener}");
        self.counters.accepted(transport);
    }

    /// A connection over `transport` ended for `reason`.
    pub fn closed(&self, peer: &Peer, transport: Transport, reason: &CloseReason) {
        log_close(peer, reason);
        match reason.counted_as() {
            Some(counted) => self.counters.closed(transport, counted),
            None => self.counters.refused(transport),
        }
        if matches!(reason, CloseReason::HandlerPanicked) {
            self.counters.handler_panicked(transport);
        }
    }

    /// `bytes` arrived from a peer over `transport`.
    #[inline]
    pub fn received(&self, transport: Transport, bytes: usize) {
        self.counters.received(transport, bytes);
    }

    /// The kernel took `bytes` owed to a peer over `transport`.
    #[inline]
    pub fn sent(&self, transport: Transport, bytes: usize) {
        self.counters.sent(transport, bytes);
    }

    /// A datagram of `bytes` arrived over `transport`.
    #[inline]
    pub fn datagram_received(&self, transport: Transport, bytes: usize) {
        self.counters.datagram_received(transport, bytes);
    }

    /// The reply to a datagram from `peer` was offered to the kernel: `sent` is what
    /// `sendto` returned (a failure drops the reply).
    pub fn reply_sent(&self, peer: &Peer, transport: Transport, sent: &io::Result<usize>) {
        match sent {
            Ok(bytes) => self.counters.datagram_answered(transport, *bytes),
            Err(e) => self.dropped(peer, transport, &DatagramDrop::SendFailed(e)),
        }
    }

    /// A datagram from `peer` got no answer.
    pub fn dropped(&self, peer: &Peer, transport: Transport, reason: &DatagramDrop<'_>) {
        let counted = match reason {
            DatagramDrop::ReflectionGuard => {
                tracing::debug!("dropping a datagram from {peer}: reflection guard");
                DropReason::ReflectionGuard
            }
            DatagramDrop::HandlerPanicked => {
                self.counters.handler_panicked(transport);
                DropReason::HandlerPanic
            }
            DatagramDrop::SendFailed(e) => {
                super::datagram::log_dropped_reply(peer, e);
                if e.kind() == io::ErrorKind::WouldBlock {
                    DropReason::PeerNotReading
                } else {
                    DropReason::Error
                }
            }
        };
        self.counters.datagram_dropped(transport, counted);
    }

    /// Accepting on the listener named `listener`, of `transport`, failed for want of
    /// descriptors or memory; it pauses for [`ACCEPT_PAUSE`].
    pub fn accept_paused(&self, listener: &str, transport: Transport, error: &io::Error) {
        log_accept_pause(listener, error);
        self.counters.accept_paused(transport);
    }
}

/// The line for a connection that ended for `reason` (nothing for an ordinary end).
pub(super) fn log_close(peer: &Peer, reason: &CloseReason) {
    match reason {
        CloseReason::PeerEof
        | CloseReason::Quit
        | CloseReason::Rejected
        | CloseReason::Drained
        | CloseReason::HandlerPanicked => {}
        CloseReason::Idle(timeout) => tracing::info!(
            "closing {peer}: idle for {:.1} s (--idle-timeout)",
            timeout.as_secs_f64()
        ),
        CloseReason::OverLimit(max_conns) => {
            tracing::warn!("refusing {peer}: already {max_conns} connections open (--max-conns)");
        }
        CloseReason::DrainTimeout { owed } => {
            tracing::warn!("closing {peer}: drain timeout with {owed} bytes still owed");
        }
        CloseReason::CannotWatch(why) => tracing::warn!("closing {peer}: {why}"),
        CloseReason::Failed(e) => tracing::debug!("connection {peer} ended: {e}"),
    }
}

/// The line for an accept pause on the listener named `listener`, once per pause.
pub(super) fn log_accept_pause(listener: &str, error: &io::Error) {
    tracing::warn!(
        "accept on {listener} failed: {error}; pausing accepts for {} ms",
        ACCEPT_PAUSE.as_millis()
    );
}

/// Ends a connection: the one way the server closes one, whatever the model.
///
/// What the socket gets depends on the reason ([`CloseReason::ending`]): a peer that
/// half-closed reads EOF after the last reply; a connection the server ends first gets a
/// lingering close ([`super::linger`]), on the lingering thread, or on the calling thread
/// when `linger` says so; a broken one is just closed.
pub fn close(stream: Stream, peer: &Peer, reason: CloseReason, log: &LoopLog, linger: Linger<'_>) {
    log.closed(peer, stream_transport(&stream), &reason);
    end(stream, reason.ending(), linger);
}

/// Where a lingering close waits for the peer.
#[derive(Debug, Clone, Copy)]
pub enum Linger<'a> {
    /// On the lingering thread: the caller serves other connections (an event loop, an
    /// async task's runtime, an accepting thread).
    Elsewhere,
    /// On the calling thread, which serves nothing else (a thread or process per
    /// connection); `shutdown` and `drain_timeout` shorten it at exit.
    Here {
        /// The server's shutdown.
        shutdown: &'a super::Shutdown,
        /// `--drain-timeout`.
        drain_timeout: Duration,
    },
}

/// What closing does to the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The peer half-closed and has every reply: shut down our side, close.
    Eof,
    /// The server ends it first: shut down our side, read and discard until the peer's
    /// EOF (bounded), close.
    Lingering,
    /// Refused before it was served: shut down our side, discard what already arrived,
    /// close without waiting, so a refused peer holds no descriptor.
    Refused,
    /// Broken or never watched: close.
    Abort,
}

/// Does `ending` to `stream` (see [`close`]), for a model that logged the close itself.
pub fn end(stream: Stream, ending: Ending, linger: Linger<'_>) {
    match (ending, linger) {
        (Ending::Eof, _) => {
            // The peer may be gone already; closing is all that is left either way.
            let _ = stream.shutdown_write();
        }
        (Ending::Lingering, Linger::Elsewhere) => super::linger::hand_off(stream),
        (
            Ending::Lingering,
            Linger::Here {
                shutdown,
                drain_timeout,
            },
        ) => super::linger::linger_here(&stream, shutdown, drain_timeout),
        (Ending::Refused, _) => super::linger::close_now(&stream),
        (Ending::Abort, _) => {}
    }
}

/// `tcp` or `unix`.
pub fn stream_transport(stream: &Stream) -> Transport {
    match stream {
        Stream::Tcp(_) => Transport::Tcp,
        Stream::Unix(_) => Transport::Unix,
    }
}

/// `tcp` or `unix`: what `listener` accepts.
pub fn listener_transport(listener: &StreamListener) -> Transport {
    if listener.is_tcp() {
        Transport::Tcp
    } else {
        Transport::Unix
    }
}

/// `udp` or `unix-dgram`.
pub fn datagram_transport(socket: &DatagramSocket) -> Transport {
    match socket {
        DatagramSocket::Udp(_) => Transport::Udp,
        DatagramSocket::Unix(_) => Transport::UnixDatagram,
    }
}
