//! Serving from one thread that waits for readiness: the code `busy-poll`, `select` and
//! `poll` share. Those models differ only in *how* they learn which descriptors are ready
//! (ask each one, or ask the kernel with fd sets or a pollfd array); everything they do
//! once they know lives here, in [`ReadinessServer`].
//!
//! A model's turn is always the same: list what to watch ([`ReadinessServer::interests`]),
//! wait by its mechanism for at most [`ReadinessServer::timeout`], hand each ready source to
//! [`ReadinessServer::handle`], then call [`ReadinessServer::expire`] for the clocks, until
//! [`ReadinessServer::is_finished`].
//!
//! Connections live in a slab (`Vec<Option<Entry>>` plus a free list) keyed by [`Token`]:
//! closing one empties its slot instead of removing it from a list, so a pass over the
//! ready sources never skips or revisits one (a tutorial's busy-poll server removed
//! clients from the list it was iterating, and skipped the next one).

use super::counting::{close_reason, stream_transport};
use super::one_socket::{answer_pending_datagrams, flush, read_available};
use super::{
    ACCEPT_PAUSE, AcceptAction, Admission, Connection, DATAGRAM_BUFFER_BYTES, DatagramReplier,
    Listeners, Protocol, READ_BUFFER_BYTES, Shutdown, accept_action, log_accept_pause, log_idle,
    log_over_limit,
};
use crate::metrics::{CloseReason, Counters, Transport};
use crate::net::{Peer, Stream};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};

/// A connection's slot in the slab: the key a model keeps next to a descriptor it watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token(pub usize);

/// Something a model watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The shutdown eventfd: readable once shutdown fired.
    Shutdown,
    /// Stream listener number `n` (index into `Listeners::streams`).
    Listener(usize),
    /// Datagram socket number `n` (index into `Listeners::datagrams`).
    Datagrams(usize),
    /// A connection.
    Connection(Token),
}

/// What a model should wait for on a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interest {
    /// Wait until it is readable (input, a connection to accept, EOF or an error).
    pub read: bool,
    /// Wait until it is writable; only while output is owed, or the wait would never sleep.
    pub write: bool,
}

impl Interest {
    const READ: Interest = Interest {
        read: true,
        write: false,
    };
}

/// What a model learned about a source. An error or hang-up counts as both: the next
/// read or write reports it, and the connection closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// Reading (or accepting) will not block.
    pub readable: bool,
    /// Writing will not block.
    pub writable: bool,
}

struct Entry {
    stream: Stream,
    connection: Connection,
    /// Holds this connection's place under `--max-conns` until the slot empties.
    _admission: Admission,
    /// When the peer last sent something, for `--idle-timeout`.
    last_input: Instant,
}

/// Everything a single-threaded readiness model serves, except the waiting.
pub struct ReadinessServer {
    listeners: Listeners,
    protocol: Protocol,
    shutdown: Shutdown,
    entries: Vec<Option<Entry>>,
    /// Empty slots of `entries`, reused before the slab grows.
    free: Vec<usize>,
    open: usize,
    repliers: Vec<DatagramReplier>,
    /// One read buffer for every connection: a single thread reads one at a time.
    read_buf: Vec<u8>,
    datagram_buf: Vec<u8>,
    /// Descriptors from this one up cannot be watched by the model (select's FD_SETSIZE).
    fd_limit: Option<(RawFd, &'static str)>,
    /// Out of descriptors: accept nothing until then.
    accept_paused_until: Option<Instant>,
    /// Set when shutdown fired: connections still owing bytes are cut at this instant.
    drain_deadline: Option<Instant>,
    /// This loop's counters: it is their only writer.
    counters: Counters,
}

impl ReadinessServer {
    /// Takes over the listeners, switched to non-blocking mode.
    ///
    /// # Errors
    ///
    /// The OS error of switching a socket to non-blocking mode.
    pub fn new(listeners: Listeners, protocol: Protocol, shutdown: Shutdown) -> io::Result<Self> {
        for listener in &listeners.streams {
            listener.set_nonblocking(true)?;
        }
        for socket in &listeners.datagrams {
            socket.set_nonblocking(true)?;
        }
        let repliers = listeners
            .datagrams
            .iter()
            .map(|_| DatagramReplier::new(protocol.clone()))
            .collect();
        Ok(ReadinessServer {
            counters: listeners.limits.metrics.counters(),
            listeners,
            protocol,
            shutdown,
            entries: Vec::new(),
            free: Vec::new(),
            open: 0,
            repliers,
            read_buf: vec![0; READ_BUFFER_BYTES],
            datagram_buf: vec![0; DATAGRAM_BUFFER_BYTES],
            fd_limit: None,
            accept_paused_until: None,
            drain_deadline: None,
        })
    }

    /// Closes every accepted connection whose descriptor is `limit` or more, logging it
    /// with `name` (the mechanism's constant, `FD_SETSIZE`), instead of serving it.
    pub fn refuse_fds_from(&mut self, limit: usize, name: &'static str) {
        self.fd_limit = Some((RawFd::try_from(limit).unwrap_or(RawFd::MAX), name));
    }

    /// The shutdown handle, for a model that checks it rather than watching its eventfd.
    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    /// Every source to watch now, with its descriptor and what to wait for.
    ///
    /// Listeners are left out while accepting is paused or shutdown has fired, and the
    /// shutdown eventfd once it has fired (it stays readable, so watching it would spin).
    pub fn interests(
        &self,
        now: Instant,
    ) -> impl Iterator<Item = (Source, BorrowedFd<'_>, Interest)> + '_ {
        let is_draining = self.drain_deadline.is_some();
        let shutdown =
            (!is_draining).then(|| (Source::Shutdown, self.shutdown.fd(), Interest::READ));
        let listeners = self
            .listeners
            .streams
            .iter()
            .enumerate()
            .filter(move |_| self.is_accepting(now))
            .map(|(n, l)| (Source::Listener(n), l.as_fd(), Interest::READ));
        let datagrams = self
            .listeners
            .datagrams
            .iter()
            .enumerate()
            .filter(move |_| !is_draining)
            .map(|(n, d)| (Source::Datagrams(n), d.as_fd(), Interest::READ));
        let connections = self.entries.iter().enumerate().filter_map(|(slot, entry)| {
            let entry = entry.as_ref()?;
            let interest = Interest {
                read: entry.connection.wants_read(),
                write: entry.connection.wants_write(),
            };
            Some((
                Source::Connection(Token(slot)),
                entry.stream.as_fd(),
                interest,
            ))
        });
        shutdown
            .into_iter()
            .chain(listeners)
            .chain(datagrams)
            .chain(connections)
    }

    /// How long the model may sleep: until the nearest idle timeout, the end of an accept
    /// pause or the drain deadline (`None`: until something is ready).
    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        let idle = self.listeners.limits.idle_timeout;
        let idle_deadlines = self
            .entries
            .iter()
            .flatten()
            .filter_map(|entry| idle_deadline(entry, idle));
        idle_deadlines
            .chain(self.accept_paused_until)
            .chain(self.drain_deadline)
            .min()
            .map(|deadline| deadline.saturating_duration_since(now))
    }

    /// Acts on a source the model found ready.
    ///
    /// # Errors
    ///
    /// A listener or datagram socket that broke; a connection's error only closes it.
    pub fn handle(&mut self, source: Source, ready: Ready) -> io::Result<()> {
        match source {
            Source::Shutdown => self.begin_drain(),
            Source::Listener(n) => self.accept_ready(n)?,
            Source::Datagrams(n) if self.drain_deadline.is_none() => {
                let socket = &self.listeners.datagrams[n];
                let (replier, buf) = (&mut self.repliers[n], &mut self.datagram_buf);
                answer_pending_datagrams(socket, replier, buf, &self.counters)?;
            }
            Source::Datagrams(_) => {}
            Source::Connection(token) => self.serve_ready(token, ready),
        }
        Ok(())
    }

    /// Shutdown fired: accept nothing more, read nothing more, send what is owed until the
    /// drain timeout.
    pub fn begin_drain(&mut self) {
        if self.drain_deadline.is_some() {
            return;
        }
        self.drain_deadline = Some(Instant::now() + self.listeners.limits.drain_timeout);
        for slot in 0..self.entries.len() {
            if let Some(entry) = &mut self.entries[slot] {
                entry.connection.stop_reading();
                // One that owes nothing is done now; it would never be ready again.
                self.close_if_finished(slot);
            }
        }
    }

    /// Closes connections idle past `--idle-timeout`, and after the drain deadline every
    /// connection still open.
    pub fn expire(&mut self, now: Instant) {
        let is_past_drain = self.drain_deadline.is_some_and(|deadline| now >= deadline);
        let idle = self.listeners.limits.idle_timeout;
        for slot in 0..self.entries.len() {
            let Some(entry) = &self.entries[slot] else {
                continue;
            };
            let transport = stream_transport(&entry.stream);
            if is_past_drain {
                self.counters.closed(transport, CloseReason::DrainCut);
                tracing::warn!(
                    "closing {}: drain timeout with {} bytes still owed",
                    entry.connection.peer(),
                    entry.connection.owed()
                );
            } else if idle_deadline(entry, idle).is_some_and(|deadline| now >= deadline) {
                log_idle(entry.connection.peer(), idle.unwrap_or_default());
                self.counters.closed(transport, CloseReason::IdleTimeout);
                if let Some(Some(entry)) = self.entries.get_mut(slot) {
                    // With TLS this queues close_notify; an idle peer has room for it.
                    entry.connection.stop_reading();
                    let _ = flush(&entry.stream, &mut entry.connection, &self.counters);
                }
            } else {
                continue;
            }
            self.close_lingering(slot);
        }
    }

    /// Whether shutdown fired and every connection is closed: `run` may return.
    pub fn is_finished(&self) -> bool {
        self.drain_deadline.is_some() && self.open == 0
    }

    fn is_accepting(&self, now: Instant) -> bool {
        self.drain_deadline.is_none() && self.accept_paused_until.is_none_or(|until| now >= until)
    }

    /// Accepts every connection queued on listener `n`.
    fn accept_ready(&mut self, n: usize) -> io::Result<()> {
        if !self.is_accepting(Instant::now()) {
            return Ok(());
        }
        self.accept_paused_until = None;
        loop {
            let listener = &self.listeners.streams[n];
            let (stream, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) => match accept_action(&e) {
                    AcceptAction::Wait => return Ok(()),
                    AcceptAction::Retry => continue,
                    AcceptAction::Pause => {
                        log_accept_pause(listener.name(), &e);
                        let transport = if listener.is_tcp() {
                            Transport::Tcp
                        } else {
                            Transport::Unix
                        };
                        self.counters.accept_paused(transport);
                        self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                        return Ok(());
                    }
                    AcceptAction::Fail => return Err(e),
                },
            };
            self.admit(stream, peer, n)?;
        }
    }

    /// Gives an accepted connection a slot, or closes it at once when it is over
    /// `--max-conns` or its descriptor cannot be watched.
    fn admit(&mut self, stream: Stream, peer: Peer, listener: usize) -> io::Result<()> {
        let fd = stream.as_fd().as_raw_fd();
        let transport = stream_transport(&stream);
        if let Some((limit, name)) = self.fd_limit.filter(|(limit, _)| fd >= *limit) {
            tracing::warn!("fd {fd} >= {name} ({limit}): cannot watch it; closing {peer}");
            self.counters.refused(transport);
            return Ok(());
        }
        let counter = &self.listeners.counter;
        let Some(admission) = counter.admit() else {
            self.counters.refused(transport);
            log_over_limit(&peer, counter.max_conns().unwrap_or(0));
            return Ok(());
        };
        self.counters.accepted(transport);
        if let Err(e) = stream.set_nonblocking(true) {
            tracing::warn!("closing {peer}: {e}");
            self.counters.closed(transport, CloseReason::Error);
            return Ok(());
        }
        tracing::debug!(
            "accepted {peer} on {}",
            self.listeners.streams[listener].name()
        );
        let connection =
            Connection::new(&self.protocol, peer, &self.listeners.limits, stream.as_fd());
        let entry = Entry {
            stream,
            connection,
            _admission: admission,
            last_input: Instant::now(),
        };
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.entries.push(None);
                self.entries.len() - 1
            }
        };
        self.entries[slot] = Some(entry);
        self.open += 1;
        // A greeting is owed at once; the next turn waits for writable to send it.
        Ok(())
    }

    /// Reads what a ready connection sent and sends what it is owed; closes it when it is
    /// finished or failed.
    ///
    /// A slot emptied earlier in the turn is skipped. Within a turn, listeners are served
    /// before connections, so no slot is refilled before its stale readiness arrives; if a
    /// model ever reorders that, the new connection costs one read that finds `WouldBlock`.
    fn serve_ready(&mut self, Token(slot): Token, ready: Ready) {
        let Some(Some(entry)) = self.entries.get_mut(slot) else {
            return;
        };
        let mut served = Ok(());
        if ready.readable && entry.connection.wants_read() {
            let (connection, buf) = (&mut entry.connection, &mut self.read_buf);
            match read_available(&entry.stream, connection, buf, &self.counters) {
                Ok(true) => entry.last_input = Instant::now(),
                Ok(false) => {}
                Err(e) => served = Err(e),
            }
        }
        // Replies to what was just read go out now, without waiting for another turn.
        if served.is_ok() && (ready.writable || ready.readable) {
            served = flush(&entry.stream, &mut entry.connection, &self.counters);
        }
        match served {
            Ok(()) => self.close_if_finished(slot),
            Err(e) => {
                tracing::debug!("connection {} ended: {e}", entry.connection.peer());
                let (transport, reason) = (stream_transport(&entry.stream), close_reason(&e));
                if reason == CloseReason::HandlerPanic {
                    self.counters.handler_panicked(transport);
                }
                self.counters.closed(transport, reason);
                self.close(slot);
            }
        }
    }

    /// Closes the connection in `slot` if it owes nothing more and reads nothing more; the
    /// peer reads EOF after its last reply.
    fn close_if_finished(&mut self, slot: usize) {
        if let Some(entry) = &self.entries[slot] {
            if entry.connection.is_finished() {
                let reason = entry
                    .connection
                    .finish_reason(self.drain_deadline.is_some());
                self.counters
                    .closed(stream_transport(&entry.stream), reason);
                if entry.connection.needs_linger() {
                    self.close_lingering(slot);
                } else {
                    let _ = entry.stream.shutdown_write();
                    self.close(slot);
                }
            }
        }
    }

    fn close(&mut self, slot: usize) {
        if self.entries[slot].take().is_some() {
            self.free.push(slot);
            self.open -= 1;
        }
    }

    /// Closes the connection in `slot` first, with a lingering close (see
    /// [`super::linger`]); everything it could send was sent.
    fn close_lingering(&mut self, slot: usize) {
        if let Some(entry) = self.entries[slot].take() {
            self.free.push(slot);
            self.open -= 1;
            super::linger::hand_off(entry.stream);
        }
    }
}

/// When `entry` idles out: only while it is being read, as in the thread models (a peer
/// that is being sent a backlog, or that half-closed, is not idle).
fn idle_deadline(entry: &Entry, idle_timeout: Option<Duration>) -> Option<Instant> {
    let idle = idle_timeout.filter(|_| entry.connection.wants_read())?;
    Some(entry.last_input + idle)
}
