//! Serving from threads and processes: the code `blocking`, `threaded`, `pool` and
//! `forking` share. Those models differ only in *who* runs [`serve_connection`]: the
//! accepting thread itself, a new thread, a pooled worker, or a forked child. That is the
//! lesson of Python's `socketserver` too: one handler, many server classes.
//!
//! A thread here blocks in `poll(2)` on its one socket *and* the shutdown eventfd, rather
//! than in `read(2)` alone: a thread stuck in `read` cannot hear SIGTERM, cannot send a
//! reply while the peer is still sending, and cannot time out an idle peer.

use super::counting::{
    close_reason, count_datagram, datagram_transport, handler_panicked, stream_transport,
};
use super::{
    ACCEPT_PAUSE, AcceptAction, Admission, Connection, ConnectionCounter, DatagramReplier, Limits,
    READ_BUFFER_BYTES, Shutdown, accept_action, is_per_peer_datagram_error, log_accept_pause,
    log_idle, log_over_limit, log_send_failure,
};
use crate::metrics::{CloseReason, Counters, Metrics, Transport};
use crate::net::{DatagramSocket, Peer, Stream, StreamListener};
use crate::protocol::Protocol;
use crate::sys::poll::{self, POLLERR, POLLHUP, POLLIN, POLLOUT};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

/// What woke a thread that waited for one descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The descriptor is ready.
    Ready,
    /// Shutdown fired.
    Shutdown,
    /// The timeout passed.
    Timeout,
}

/// Sleeps until `fd` has one of `events`, shutdown fires, or `timeout` passes.
///
/// # Errors
///
/// The OS error of `poll`.
pub fn wait_for(
    fd: BorrowedFd<'_>,
    events: i16,
    shutdown: &Shutdown,
    timeout: Option<Duration>,
) -> io::Result<Wake> {
    let mut entries = [poll::entry(fd, events), poll::entry(shutdown.fd(), POLLIN)];
    if poll::poll(&mut entries, timeout)? == 0 {
        return Ok(Wake::Timeout);
    }
    if entries[1].revents != 0 {
        return Ok(Wake::Shutdown);
    }
    Ok(Wake::Ready)
}

/// Accepts connections until shutdown fires, handing each admitted one to `dispatch`.
///
/// Connections past `--max-conns` are accepted and closed at once, so the client reads
/// EOF instead of waiting in the backlog.
///
/// # Errors
///
/// A listener error that is not about one connection (see `server::accept_action`).
pub fn accept_until_shutdown(
    listener: &StreamListener,
    counter: &ConnectionCounter,
    shutdown: &Shutdown,
    metrics: Metrics,
    mut dispatch: impl FnMut(Stream, Peer, Admission),
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    // The accepting thread's own counters (each connection's thread has its own).
    let counters = metrics.counters();
    let transport = if listener.is_tcp() {
        Transport::Tcp
    } else {
        Transport::Unix
    };
    loop {
        if wait_for(listener.as_fd(), POLLIN, shutdown, None)? == Wake::Shutdown {
            return Ok(());
        }
        match listener.accept() {
            Ok((stream, peer)) => match counter.admit() {
                Some(admission) => {
                    tracing::debug!("accepted {peer} on {}", listener.name());
                    counters.accepted(transport);
                    dispatch(stream, peer, admission);
                }
                None => {
                    counters.refused(transport);
                    log_over_limit(&peer, counter.max_conns().unwrap_or(0));
                }
            },
            Err(e) => match accept_action(&e) {
                AcceptAction::Wait | AcceptAction::Retry => {}
                AcceptAction::Pause => {
                    log_accept_pause(listener.name(), &e);
                    counters.accept_paused(transport);
                    if wait_for(shutdown.fd(), POLLIN, shutdown, Some(ACCEPT_PAUSE))?
                        != Wake::Timeout
                    {
                        return Ok(());
                    }
                }
                AcceptAction::Fail => return Err(e),
            },
        }
    }
}

/// Serves one stream connection on the calling thread until the peer is done, its
/// handler panics, it idles out, or shutdown's drain ends; errors are logged, not returned.
pub fn serve_connection(
    stream: Stream,
    peer: Peer,
    protocol: &Protocol,
    limits: &Limits,
    shutdown: &Shutdown,
) {
    let mut connection = Connection::new(protocol, peer, limits, stream.as_fd());
    // A slot for this connection's thread (or forked child), folded in when it ends.
    let counters = limits.metrics.counters();
    let transport = stream_transport(&stream);
    let reason = match drive(&stream, &mut connection, limits, shutdown, &counters) {
        Ok(reason) => reason,
        Err(e) => {
            tracing::debug!("connection {} ended: {e}", connection.peer());
            close_reason(&e)
        }
    };
    if reason == CloseReason::HandlerPanic {
        counters.handler_panicked(transport);
    }
    counters.closed(transport, reason);
    if matches!(reason, CloseReason::Reset | CloseReason::Error) {
        return;
    }
    if connection.needs_linger() {
        // This thread (or process) has nothing else to serve: it waits for the peer here.
        super::linger::linger_here(&stream, shutdown, limits.drain_timeout);
    } else {
        // The peer half-closed and has every reply: it reads EOF now.
        let _ = stream.shutdown_write();
    }
}

fn drive(
    stream: &Stream,
    connection: &mut Connection,
    limits: &Limits,
    shutdown: &Shutdown,
    counters: &Counters,
) -> io::Result<CloseReason> {
    stream.set_nonblocking(true)?;
    let mut buf = vec![0u8; READ_BUFFER_BYTES];
    let mut last_input = Instant::now();
    let mut drain_deadline: Option<Instant> = None;
    if shutdown.is_fired() {
        connection.stop_reading();
        drain_deadline = Some(Instant::now() + limits.drain_timeout);
    }
    loop {
        flush(stream, connection, counters)?;
        if connection.is_finished() {
            // Everything owed was sent: the caller closes, the peer reads EOF after it.
            return Ok(connection.finish_reason(drain_deadline.is_some()));
        }
        let mut events = 0;
        if connection.wants_read() {
            events |= POLLIN;
        }
        if connection.wants_write() {
            events |= POLLOUT;
        }
        let idle_deadline = limits
            .idle_timeout
            .filter(|_| connection.wants_read())
            .map(|idle| last_input + idle);
        let deadline = match (idle_deadline, drain_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let mut entries = [
            poll::entry(stream.as_fd(), events),
            if drain_deadline.is_none() {
                poll::entry(shutdown.fd(), POLLIN)
            } else {
                poll::unused_entry()
            },
        ];
        poll::poll(&mut entries, timeout)?;
        let now = Instant::now();
        if entries[1].revents != 0 {
            // Shutdown: read nothing more, send what is owed within the drain timeout.
            connection.stop_reading();
            drain_deadline = Some(now + limits.drain_timeout);
            continue;
        }
        if drain_deadline.is_some_and(|d| now >= d) {
            tracing::warn!(
                "closing {}: drain timeout with {} bytes still owed",
                connection.peer(),
                connection.owed()
            );
            return Ok(CloseReason::DrainCut);
        }
        if idle_deadline.is_some_and(|d| now >= d) {
            log_idle(connection.peer(), limits.idle_timeout.unwrap_or_default());
            // With TLS this queues close_notify; an idle peer has room for it.
            connection.stop_reading();
            flush(stream, connection, counters)?;
            return Ok(CloseReason::IdleTimeout);
        }
        if entries[0].revents & (POLLIN | POLLHUP | POLLERR) != 0 && connection.wants_read() {
            if read_available(stream, connection, &mut buf, counters)? {
                last_input = now;
            }
        } else if entries[0].revents & (POLLHUP | POLLERR) != 0 && !connection.wants_write() {
            // Nothing to read or write, yet the socket reports an error or hang-up: the
            // peer is gone, and waiting again would spin.
            return Ok(CloseReason::Reset);
        }
    }
}

/// Reads what the kernel has (as far as the bound allows); returns whether any input or
/// EOF arrived.
///
/// # Errors
///
/// A read error (the peer reset), or a handler panic turned into an error to close.
pub fn read_available(
    stream: &Stream,
    connection: &mut Connection,
    buf: &mut [u8],
    counters: &Counters,
) -> io::Result<bool> {
    let mut got_input = false;
    loop {
        let limit = connection.read_limit(buf.len());
        if limit == 0 {
            return Ok(got_input);
        }
        let result = match stream.read(&mut buf[..limit]) {
            Ok(0) => connection.receive_eof(),
            Ok(n) => {
                counters.received(stream_transport(stream), n);
                connection.receive(&buf[..n])
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(got_input),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        got_input = true;
        result.map_err(|_| handler_panicked())?;
    }
}

/// Writes owed bytes until none are left or the kernel's send buffer is full.
///
/// # Errors
///
/// A write error (the peer reset or went away).
pub fn flush(stream: &Stream, connection: &mut Connection, counters: &Counters) -> io::Result<()> {
    while connection.wants_write() {
        match stream.write(connection.unsent()) {
            // The kernel may take fewer bytes than offered; the rest waits for writable.
            Ok(written) => {
                counters.sent(stream_transport(stream), written);
                connection.advance(written);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Answers datagrams on `socket` from the calling thread until shutdown fires.
///
/// Each datagram is answered in microseconds, so one thread per socket serves it; a
/// thread per datagram (as socketserver's ThreadingUDPServer does) would cost more than
/// the work it runs.
///
/// # Errors
///
/// A receive error that is not about one datagram.
pub fn serve_datagrams(
    socket: &DatagramSocket,
    protocol: &Protocol,
    shutdown: &Shutdown,
    metrics: Metrics,
) -> io::Result<()> {
    socket.set_nonblocking(true)?;
    let counters = metrics.counters();
    let mut replier = DatagramReplier::new(protocol.clone());
    let mut buf = vec![0u8; super::DATAGRAM_BUFFER_BYTES];
    loop {
        if wait_for(socket.as_fd(), POLLIN, shutdown, None)? == Wake::Shutdown {
            return Ok(());
        }
        answer_pending_datagrams(socket, &mut replier, &mut buf, &counters)?;
    }
}

/// Answers every datagram queued on a non-blocking `socket`.
///
/// # Errors
///
/// A receive error other than "nothing queued" or an ICMP-reported error of an earlier
/// send (which Linux delivers on the next receive, and which concerns one peer only).
pub fn answer_pending_datagrams(
    socket: &DatagramSocket,
    replier: &mut DatagramReplier,
    buf: &mut [u8],
    counters: &Counters,
) -> io::Result<()> {
    loop {
        let (n, peer) = match socket.recv_from(buf) {
            Ok(received) => received,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if is_per_peer_datagram_error(&e) => continue,
            Err(e) => return Err(e),
        };
        let reply = replier.reply(&peer, &buf[..n]);
        let sent = reply.map(|reply| socket.send_to(reply, &peer));
        if let Some(Err(e)) = &sent {
            log_send_failure(&peer, e);
        }
        let reply_len = reply.map(<[u8]>::len);
        let transport = datagram_transport(socket);
        count_datagram(counters, transport, &peer, n, reply_len, sent.as_ref());
    }
}
