//! `epoll(7)`: one reactor thread per core sleeps until the kernel names the ready sockets.
//!
//! Technique: step 8 of the ladder. Level-triggered epoll; connections in a slab keyed by token (with a
//! generation against stale events); per wake-up one `read` and one `write` per ready
//! socket, through one read buffer per loop; idle deadlines on a coarse wheel.
//! Cost: O(ready) per wake-up; `epoll_ctl` only when a connection's interest changes.
//! Limit: Linux only; one slow handler stalls every connection of its loop.
//!
//! Level-triggered, not edge-triggered: with EPOLLET a loop must read until `EAGAIN` (one
//! extra system call per message) or remember "maybe more" per connection, or an event is
//! lost. Level-triggered lets us read once per wake-up, as the C yardstick does, and makes
//! backpressure a matter of dropping EPOLLIN from the interest when the write buffer fills.
//!
//! Loops: every loop watches the same listeners (one accept queue) with EPOLLEXCLUSIVE, so
//! a connection wakes one idle loop, not all; after accepting, a loop re-adds the listener
//! to move to the back of the wake-up queue, which spreads connections round the loops.
//! SO_REUSEPORT siblings spread as evenly and cost no more per message, but each has its own
//! queue: out of descriptors, a connection can wait in one loop's queue while the other
//! loop takes every freed descriptor (conformance `out_of_descriptors_pauses` hangs). Datagram
//! sockets are shared by every loop the same way. Measurements: docs/benchmarks.md.

use crate::metrics::{CloseReason, Counters, Transport};
use crate::net::{DatagramSocket, Stream, StreamListener};
use crate::server::counting::{
    close_reason, count_datagram, datagram_transport, handler_panicked, stream_transport,
};
use crate::server::event_loops::{LoopSources, run_loops, split_sources};
use crate::server::idle_wheel::IdleWheel;
use crate::server::is_per_peer_datagram_error;
use crate::server::linger;
use crate::server::{
    ACCEPT_PAUSE, AcceptAction, Admission, Connection, ConnectionCounter, DATAGRAM_BUFFER_BYTES,
    DatagramReplier, Limits, Listeners, Protocol, READ_BUFFER_BYTES, RunOptions, ServeError,
    Shutdown, accept_action, log_accept_pause, log_idle, log_over_limit, log_send_failure,
};
use crate::slab::{Slab, Token};
use crate::sys::epoll::{self, Epoll, Events};
use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

/// Events one `epoll_wait` can return.
const EVENTS_PER_WAIT: usize = 1024;
/// Connections accepted, or datagrams answered, per readiness event before the loop
/// serves others: a flood on one socket cannot starve the rest.
const BATCH: usize = 64;
/// The token of the shutdown eventfd; listeners follow it, then datagram sockets. Their
/// generation is 0, which the slab never gives a connection.
const SHUTDOWN_TOKEN: Token = Token::reserved(0);

const EPOLLIN: u32 = epoll::EPOLLIN as u32;
const EPOLLOUT: u32 = epoll::EPOLLOUT as u32;
const EPOLLERR: u32 = epoll::EPOLLERR as u32;
const EPOLLHUP: u32 = epoll::EPOLLHUP as u32;
const EPOLLEXCLUSIVE: u32 = epoll::EPOLLEXCLUSIVE as u32;

/// The token of a loop's `n`th own source (the shutdown eventfd, then listeners, then
/// datagram sockets).
fn reserved(n: usize) -> Token {
    Token::reserved(u32::try_from(n).expect("fewer than 2^32 listeners"))
}

/// Serves every listener with `threads` event loops until `shutdown` fires and drains.
///
/// # Errors
///
/// Setting up a loop failed, or a listener broke (the other loops then drain and stop).
pub fn run(
    mut listeners: Listeners,
    protocol: Protocol,
    shutdown: Shutdown,
    options: RunOptions,
) -> Result<(), ServeError> {
    let loops = options.threads.unwrap_or_else(super::default_loops).max(1);
    let sources = split_sources(&mut listeners, loops, true)?;
    run_loops(
        "epoll",
        sources,
        &shutdown,
        |_, sources| EventLoop::new(sources, loops > 1, &listeners, &protocol, &shutdown),
        |event_loop| event_loop.run(&shutdown),
    )?;
    // Dropping the listeners removes the Unix socket files, once every loop is done.
    drop(listeners);
    Ok(())
}

/// One connection in the slab.
struct Entry {
    stream: Stream,
    connection: Connection,
    /// The events registered with epoll now, so `epoll_ctl` runs only when they change.
    interest: u32,
    last_input_tick: u32,
    /// Holds this connection's place under `--max-conns` until it is dropped.
    _admission: Admission,
}

/// One reactor: its epoll instance, its sockets, its connections.
struct EventLoop {
    epoll: Epoll,
    streams: Vec<StreamListener>,
    datagrams: Vec<DatagramSocket>,
    replier: DatagramReplier,
    connections: Slab<Entry>,
    idle: Option<IdleWheel>,
    /// The one read buffer of this loop, shared by every connection it serves.
    buf: Vec<u8>,
    /// The one output allocation lent to a connection while it produces replies, so a
    /// message costs no allocation and an idle connection holds none.
    spare: Vec<u8>,
    protocol: Protocol,
    limits: Limits,
    counter: ConnectionCounter,
    /// Accepting is paused (listeners out of the epoll set) until then, after EMFILE.
    accept_paused_until: Option<Instant>,
    /// Set once shutdown fired: owed bytes are flushed until then.
    drain_deadline: Option<Instant>,
    /// Whether other loops accept from the same listeners (one shared accept queue).
    is_sharing_listeners: bool,
    /// This loop's own counters: it is their only writer.
    counters: Counters,
}

impl EventLoop {
    fn new(
        LoopSources { streams, datagrams }: LoopSources,
        is_sharing_listeners: bool,
        listeners: &Listeners,
        protocol: &Protocol,
        shutdown: &Shutdown,
    ) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.add(shutdown.fd(), SHUTDOWN_TOKEN, EPOLLIN)?;
        let buf_bytes = if datagrams.is_empty() {
            READ_BUFFER_BYTES
        } else {
            DATAGRAM_BUFFER_BYTES
        };
        let event_loop = EventLoop {
            epoll,
            streams,
            datagrams,
            replier: DatagramReplier::new(protocol.clone()),
            connections: Slab::default(),
            idle: listeners.limits.idle_timeout.map(IdleWheel::new),
            buf: vec![0; buf_bytes],
            spare: Vec::new(),
            protocol: protocol.clone(),
            limits: listeners.limits.clone(),
            counter: listeners.counter.clone(),
            accept_paused_until: None,
            drain_deadline: None,
            is_sharing_listeners,
            counters: listeners.limits.metrics.counters(),
        };
        for socket in &event_loop.datagrams {
            socket.set_nonblocking(true)?;
        }
        for listener in &event_loop.streams {
            listener.set_nonblocking(true)?;
        }
        event_loop.watch_sources(true)?;
        Ok(event_loop)
    }

    /// Adds (or removes) the listeners, and the datagram sockets when `with_datagrams`.
    fn watch_sources(&self, with_datagrams: bool) -> io::Result<()> {
        let streams = self.streams.iter().map(AsFd::as_fd);
        let datagrams = self
            .datagrams
            .iter()
            .map(AsFd::as_fd)
            .take(if with_datagrams { usize::MAX } else { 0 });
        for (i, fd) in streams.enumerate() {
            self.epoll
                .add(fd, reserved(1 + i), EPOLLIN | EPOLLEXCLUSIVE)?;
        }
        for (i, fd) in datagrams.enumerate() {
            self.epoll.add(
                fd,
                reserved(1 + self.streams.len() + i),
                EPOLLIN | EPOLLEXCLUSIVE,
            )?;
        }
        Ok(())
    }

    fn unwatch_listeners(&self) {
        for listener in &self.streams {
            // Already out of the set while accepting is paused; nothing to undo then.
            let _ = self.epoll.delete(listener.as_fd());
        }
    }

    fn run(mut self, shutdown: &Shutdown) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS_PER_WAIT);
        loop {
            // The clock is read only while something is timed: a busy loop without
            // --idle-timeout pays no clock reads.
            let is_timed = self.idle.is_some()
                || self.accept_paused_until.is_some()
                || self.drain_deadline.is_some();
            let timeout = is_timed.then(|| self.timeout(Instant::now())).flatten();
            self.epoll.wait(&mut events, timeout)?;
            let now = is_timed.then(Instant::now);
            let now_tick = now.map_or(0, |now| self.expire_idle(now));
            for (token, readiness) in events.iter() {
                match token.reserved_index() {
                    None => self.serve(token, readiness, now_tick),
                    Some(0) => self.begin_drain(shutdown)?,
                    // Listeners and datagram sockets are out of the set once draining;
                    // this event came in the same batch as the shutdown.
                    _ if self.drain_deadline.is_some() => {}
                    Some(source) if source <= self.streams.len() => {
                        let index = source - 1;
                        self.accept_ready(index, now_tick)?;
                        if self.is_sharing_listeners && self.accept_paused_until.is_none() {
                            // EPOLLEXCLUSIVE wakes the first idle epoll on the listener's
                            // wait queue; re-adding moves this loop to the back, so new
                            // connections go round the loops instead of all to loop 0.
                            let fd = self.streams[index].as_fd();
                            self.epoll.delete(fd)?;
                            self.epoll.add(fd, token, EPOLLIN | EPOLLEXCLUSIVE)?;
                        }
                    }
                    Some(source) => self.answer_datagrams(source - 1 - self.streams.len())?,
                }
            }
            if self.drain_deadline.is_some() && self.connections.is_empty() {
                return Ok(());
            }
            let Some(now) = now else { continue };
            if self.accept_paused_until.is_some_and(|t| now >= t) {
                self.accept_paused_until = None;
                self.watch_sources(false)?;
            }
            if self.drain_deadline.is_some_and(|t| now >= t) {
                for token in self.connections.tokens() {
                    if let Some(entry) = self.connections.remove(token) {
                        let transport = stream_transport(&entry.stream);
                        self.counters.closed(transport, CloseReason::DrainCut);
                        let (peer, owed) = (entry.connection.peer(), entry.connection.owed());
                        tracing::warn!(
                            "closing {peer}: drain timeout with {owed} bytes still owed"
                        );
                        close_lingering(&self.epoll, entry.stream);
                    }
                }
                return Ok(());
            }
        }
    }

    /// How long the loop may sleep: until the next idle tick, the end of an accept pause,
    /// or the drain deadline, whichever comes first.
    fn timeout(&self, now: Instant) -> Option<Duration> {
        let idle = self
            .idle
            .as_ref()
            .and_then(|wheel| wheel.time_to_next_tick(now));
        let deadlines = [self.accept_paused_until, self.drain_deadline];
        let until = deadlines
            .into_iter()
            .flatten()
            .map(|t| t.saturating_duration_since(now));
        idle.into_iter().chain(until).min()
    }

    /// Closes connections that idled out; returns the current tick.
    fn expire_idle(&mut self, now: Instant) -> u32 {
        let Some(wheel) = self.idle.as_mut() else {
            return 0;
        };
        let now_tick = wheel.tick_at(now);
        let connections = &mut self.connections;
        let counters = &self.counters;
        let epoll = &self.epoll;
        let idle_timeout = self.limits.idle_timeout.unwrap_or_default();
        let idle_ticks = wheel.deadline(0);
        wheel.expire(now_tick, |token| {
            let entry = connections.get_mut(token)?;
            if !entry.connection.wants_read() {
                // Not waiting for input (backpressure, flushing): not idle, look later.
                entry.last_input_tick = now_tick;
                return Some(now_tick);
            }
            if now_tick < entry.last_input_tick.saturating_add(idle_ticks) {
                return Some(entry.last_input_tick);
            }
            log_idle(entry.connection.peer(), idle_timeout);
            counters.closed(stream_transport(&entry.stream), CloseReason::IdleTimeout);
            // With TLS this queues close_notify; an idle peer has room for it.
            entry.connection.stop_reading();
            let _ = exchange(entry, 0, &mut [], &mut Vec::new(), now_tick, counters);
            if let Some(entry) = connections.remove(token) {
                close_lingering(epoll, entry.stream);
            }
            None
        });
        now_tick
    }

    fn accept_ready(&mut self, index: usize, now_tick: u32) -> io::Result<()> {
        for _ in 0..BATCH {
            let listener = &self.streams[index];
            match listener.accept() {
                Ok((stream, peer)) => {
                    let transport = stream_transport(&stream);
                    let Some(admission) = self.counter.admit() else {
                        self.counters.refused(transport);
                        log_over_limit(&peer, self.counter.max_conns().unwrap_or(0));
                        continue;
                    };
                    self.counters.accepted(transport);
                    tracing::debug!("accepted {peer} on {}", listener.name());
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!("dropping {peer}: {e}");
                        self.counters.closed(transport, CloseReason::Error);
                        continue;
                    }
                    let connection =
                        Connection::new(&self.protocol, peer, &self.limits, stream.as_fd());
                    let interest = interest_of(&connection);
                    let token = self.connections.insert(Entry {
                        stream,
                        connection,
                        interest,
                        last_input_tick: now_tick,
                        _admission: admission,
                    });
                    let Some(entry) = self.connections.get_mut(token) else {
                        continue;
                    };
                    if let Err(e) = self.epoll.add(entry.stream.as_fd(), token, interest) {
                        tracing::warn!(
                            "dropping {}: cannot watch it: {e}",
                            entry.connection.peer()
                        );
                        self.connections.remove(token);
                        self.counters.closed(transport, CloseReason::Error);
                        continue;
                    }
                    if let Some(wheel) = self.idle.as_mut() {
                        wheel.insert(token, now_tick);
                    }
                }
                Err(e) => match accept_action(&e) {
                    AcceptAction::Wait => return Ok(()),
                    AcceptAction::Retry => {}
                    AcceptAction::Pause => {
                        // Out of descriptors: the listener stays readable, so watching it
                        // would spin; take every listener out of the set for a while.
                        log_accept_pause(listener.name(), &e);
                        let transport = if listener.is_tcp() {
                            Transport::Tcp
                        } else {
                            Transport::Unix
                        };
                        self.counters.accept_paused(transport);
                        self.unwatch_listeners();
                        self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                        return Ok(());
                    }
                    AcceptAction::Fail => return Err(e),
                },
            }
        }
        Ok(())
    }

    fn answer_datagrams(&mut self, index: usize) -> io::Result<()> {
        let socket = &self.datagrams[index];
        for _ in 0..BATCH {
            let (n, peer) = match socket.recv_from(&mut self.buf) {
                Ok(received) => received,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if is_per_peer_datagram_error(&e) => continue,
                Err(e) => return Err(e),
            };
            let reply = self.replier.reply(&peer, &self.buf[..n]);
            let sent = reply.map(|reply| socket.send_to(reply, &peer));
            if let Some(Err(e)) = &sent {
                log_send_failure(&peer, e);
            }
            let transport = datagram_transport(socket);
            let reply_len = reply.map(<[u8]>::len);
            count_datagram(
                &self.counters,
                transport,
                &peer,
                n,
                reply_len,
                sent.as_ref(),
            );
        }
        Ok(())
    }

    /// One readiness event for a connection: one read, then write what is owed.
    fn serve(&mut self, token: Token, readiness: u32, now_tick: u32) {
        // A stale token: the connection closed earlier in this batch.
        let Some(entry) = self.connections.get_mut(token) else {
            return;
        };
        let result = exchange(
            entry,
            readiness,
            &mut self.buf[..READ_BUFFER_BYTES],
            &mut self.spare,
            now_tick,
            &self.counters,
        );
        self.settle(token, result);
    }

    /// Closes a connection that failed or finished, or updates what epoll watches for it.
    fn settle(&mut self, token: Token, result: io::Result<()>) {
        let Some(entry) = self.connections.get_mut(token) else {
            return;
        };
        let outcome = result.and_then(|()| {
            if entry.connection.is_finished() {
                // Everything owed was sent: closed below, the peer reads EOF after it.
                return Ok(false);
            }
            let interest = interest_of(&entry.connection);
            if interest != entry.interest {
                self.epoll.modify(entry.stream.as_fd(), token, interest)?;
                entry.interest = interest;
            }
            Ok(true)
        });
        let transport = stream_transport(&entry.stream);
        match outcome {
            Ok(true) => {}
            Ok(false) => {
                let reason = entry
                    .connection
                    .finish_reason(self.drain_deadline.is_some());
                self.counters.closed(transport, reason);
                let needs_linger = entry.connection.needs_linger();
                if let Some(entry) = self.connections.remove(token) {
                    if needs_linger {
                        close_lingering(&self.epoll, entry.stream);
                    } else {
                        // The peer half-closed and has every reply: it reads EOF now.
                        let _ = entry.stream.shutdown_write();
                    }
                }
            }
            Err(e) => {
                let reason = close_reason(&e);
                if reason == CloseReason::HandlerPanic {
                    self.counters.handler_panicked(transport);
                }
                self.counters.closed(transport, reason);
                tracing::debug!("connection {} ended: {e}", entry.connection.peer());
                // Closing the only descriptor also removes it from the epoll set.
                self.connections.remove(token);
            }
        }
    }

    /// Shutdown fired: stop accepting and reading, flush what is owed.
    fn begin_drain(&mut self, shutdown: &Shutdown) -> io::Result<()> {
        // The eventfd stays readable forever: stop watching it, or every wait returns at once.
        self.epoll.delete(shutdown.fd())?;
        self.unwatch_listeners();
        for socket in &self.datagrams {
            let _ = self.epoll.delete(socket.as_fd());
        }
        self.accept_paused_until = None;
        self.drain_deadline = Some(Instant::now() + self.limits.drain_timeout);
        for token in self.connections.tokens() {
            if let Some(entry) = self.connections.get_mut(token) {
                entry.connection.stop_reading();
                let result = exchange(entry, 0, &mut [], &mut self.spare, 0, &self.counters);
                self.settle(token, result);
            }
        }
        Ok(())
    }
}

/// Reads once if the socket is readable and the connection wants input, then writes
/// until nothing is owed or the kernel's send buffer is full.
/// Closes a connection the server ends first with a lingering close, on the lingering
/// thread: out of this loop's epoll set first, since the descriptor stays open there.
fn close_lingering(epoll: &Epoll, stream: Stream) {
    let _ = epoll.delete(stream.as_fd());
    linger::hand_off(stream);
}

fn exchange(
    entry: &mut Entry,
    readiness: u32,
    buf: &mut [u8],
    spare: &mut Vec<u8>,
    now_tick: u32,
    counters: &Counters,
) -> io::Result<()> {
    let transport = stream_transport(&entry.stream);
    let connection = &mut entry.connection;
    if readiness & (EPOLLIN | EPOLLHUP | EPOLLERR) != 0 && connection.wants_read() {
        let limit = connection.read_limit(buf.len());
        connection.lend_spare(spare);
        let received = match entry.stream.read(&mut buf[..limit]) {
            Ok(0) => connection.receive_eof(),
            Ok(n) => {
                counters.received(transport, n);
                connection.receive(&buf[..n])
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(())
            }
            Err(e) => return Err(e),
        };
        received.map_err(|_| handler_panicked())?;
        entry.last_input_tick = now_tick;
    }
    while connection.wants_write() {
        match entry.stream.write(connection.unsent()) {
            // The kernel may take fewer bytes than offered; the rest waits for EPOLLOUT.
            Ok(written) => {
                counters.sent(transport, written);
                connection.advance(written);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    connection.return_spare(spare);
    Ok(())
}

/// The events a connection waits for: input while it reads and has room, output while
/// bytes are owed.
fn interest_of(connection: &Connection) -> u32 {
    let mut interest = 0;
    if connection.wants_read() {
        interest |= EPOLLIN;
    }
    if connection.wants_write() {
        interest |= EPOLLOUT;
    }
    interest
}
