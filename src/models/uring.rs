//! `io_uring` (Linux 5.19+): the kernel performs the I/O and reports each finished operation.
//!
//! Step 11 of the ladder. Technique: a ring per loop; multishot accepts, multishot receives
//! into buffers the kernel picks, and sends of the shared output buffer, all submitted in
//! one system call per turn.
//! Cost: a buffer lent to the kernel stays lent until its completion, even after a close
//! (`sys/uring` keeps it), and every result arrives later, in another turn of the loop.
//! Limit: Linux only; often disabled (sysctl kernel.io_uring_disabled, container seccomp).
//!
//! Every socket of a loop (connections, listeners, datagram sockets, the shutdown eventfd)
//! has one [`Token`] in the loop's slab and the ring slot of that token. A datagram reply
//! goes out at once with a plain non-blocking `sendto`: a peer whose queue is full loses
//! that reply and delays no one, and nothing waits in the ring for it. Idle timeouts: the
//! coarse wheel of the scalable models ([`IdleWheel`]). Loops: each has its own SO_REUSEPORT
//! accept queue (`Model::accept_queues`) and a duplicate of every datagram socket.

use crate::metrics::Transport;
use crate::net::{Peer, Stream};
use crate::server::event_loops::{LoopSources, run_loops, split_sources};
use crate::server::idle_wheel::IdleWheel;
use crate::server::{
    ACCEPT_PAUSE, AcceptAction, Admission, Connection, ConnectionCounter, DatagramDrop,
    DatagramReplier, Limits, Listeners, LoopLog, Protocol, RunOptions, ServeError, Shutdown,
    accept_action, is_per_peer_datagram_error, log_accept_pause, log_idle, log_over_limit,
};
use crate::slab::{Slab, Token};
use crate::sys::errno;
use crate::sys::uring::{Completion, Received, ReceivedDatagram, Ring};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// After the drain timeout, how long cancelled operations may take to complete.
const CANCEL_GRACE: Duration = Duration::from_secs(1);
/// The most one receive may be armed for; the output buffer's room usually decides.
const MAX_RECEIVE_BUDGET_BYTES: usize = 1 << 30;

/// Serves every listener from `options.threads` rings (default: one per core) until
/// `shutdown` fires and the drain ends.
///
/// # Errors
///
/// A ring that cannot be set up (no loop serves until every ring exists), or a listener
/// that broke.
pub fn run(
    mut listeners: Listeners,
    protocol: Protocol,
    shutdown: Shutdown,
    options: RunOptions,
) -> Result<(), ServeError> {
    let loops = options.threads.unwrap_or_else(super::default_loops).max(1);
    let sources = split_sources(&mut listeners, loops, true)?;
    let (limits, counter) = (&listeners.limits, &listeners.counter);
    let setup = |_, sources| Loop::new(sources, &protocol, limits, counter, &shutdown);
    run_loops("uring", sources, &shutdown, setup, Loop::serve).map_err(ServeError::Io)
}

/// What a token names in a loop's slab.
enum Source {
    Conn(Conn),
    Listener { name: Rc<str>, is_tcp: bool },
    Datagrams(DatagramReplier),
    Shutdown,
}

/// One accepted stream and what the loop knows about it.
struct Conn {
    connection: Connection,
    /// The idle wheel's tick of the last input.
    last_input_tick: u32,
    /// Listed in `Loop::dirty`, to be pumped after this batch.
    is_dirty: bool,
    _admission: Admission,
}

/// One thread's ring and everything it serves.
struct Loop<'a> {
    ring: Ring,
    sources: Slab<Source>,
    /// Listeners that ran out of descriptors, and when they accept again.
    paused: Vec<(Instant, Token)>,
    protocol: &'a Protocol,
    limits: &'a Limits,
    counter: &'a ConnectionCounter,
    idle: Option<IdleWheel>,
    /// Connections touched by this batch of completions (see `Loop::mark`).
    dirty: Vec<Token>,
    /// Set when shutdown fired: stop accepting, send what is owed until then.
    drain_deadline: Option<Instant>,
    /// The time when the last wait returned: one clock read per batch of completions.
    now: Instant,
}

impl<'a> Loop<'a> {
    fn new(
        sources: LoopSources,
        protocol: &'a Protocol,
        limits: &'a Limits,
        counter: &'a ConnectionCounter,
        shutdown: &Shutdown,
    ) -> io::Result<Self> {
        let (mut ring, mut slab) = (Ring::new()?, Slab::default());
        let token = slab.insert(Source::Shutdown);
        ring.add(token, shutdown.fd().try_clone_to_owned()?);
        ring.arm_readable(token);
        for listener in sources.streams {
            let (name, is_tcp) = (Rc::from(listener.name()), listener.is_tcp());
            let token = slab.insert(Source::Listener { name, is_tcp });
            ring.add(token, OwnedFd::from(listener));
            ring.arm_accept(token);
        }
        for socket in sources.datagrams {
            let token = slab.insert(Source::Datagrams(DatagramReplier::new(protocol.clone())));
            let max_datagram_bytes = socket.max_datagram_bytes();
            ring.add_datagram(token, OwnedFd::from(socket), max_datagram_bytes);
            ring.arm_datagram_receive(token);
        }
        Ok(Loop {
            ring,
            sources: slab,
            paused: Vec::new(),
            protocol,
            limits,
            counter,
            idle: limits.idle_timeout.map(IdleWheel::new),
            dirty: Vec::new(),
            drain_deadline: None,
            now: Instant::now(),
        })
    }

    fn serve(mut self) -> io::Result<()> {
        loop {
            self.now = Instant::now();
            self.on_timers();
            let timeout = match self.drain_deadline {
                Some(at) if self.ring.live_slots() == 0 || self.now >= at + CANCEL_GRACE => {
                    return Ok(());
                }
                // Past the drain deadline every slot is closing: wait for its cancellation.
                Some(at) if self.now >= at => Some(CANCEL_GRACE),
                _ => self.next_timeout(),
            };
            self.ring.wait(timeout)?;
            self.now = Instant::now();
            while let Some(completion) = self.ring.next_completion() {
                match completion {
                    Completion::Accepted {
                        token,
                        result,
                        is_armed,
                    } => {
                        self.on_accept(token, result, is_armed)?;
                    }
                    Completion::Received { token, result } => self.on_receive(token, result),
                    Completion::Sent { token, result } => self.on_sent(token, result),
                    Completion::DatagramReceived { token, result } => {
                        self.on_datagram(token, result)?;
                    }
                    Completion::Readable { .. } => self.start_drain(),
                }
            }
            for token in std::mem::take(&mut self.dirty) {
                self.pump(token);
            }
        }
    }

    fn conn(&mut self, token: Token) -> Option<&mut Conn> {
        match self.sources.get_mut(token)? {
            Source::Conn(conn) => Some(conn),
            _ => None,
        }
    }

    /// Closes `token`'s socket; the ring frees it once its operations have completed.
    fn close(&mut self, token: Token) {
        self.ring.close(token);
        self.sources.remove(token);
    }

    /// How long until a timer needs the loop: an accept pause, an idle tick, the drain.
    fn next_timeout(&self) -> Option<Duration> {
        let pauses = self.paused.iter().map(|(until, _)| *until);
        let at = pauses.chain(self.drain_deadline).min();
        let until = at.map(|at| at.saturating_duration_since(self.now));
        let idle = self
            .idle
            .as_ref()
            .and_then(|w| w.time_to_next_tick(self.now));
        until.into_iter().chain(idle).min()
    }

    fn on_timers(&mut self) {
        let now = self.now;
        while let Some(at) = self.paused.iter().position(|(until, _)| now >= *until) {
            let (_, token) = self.paused.swap_remove(at);
            self.ring.arm_accept(token);
        }
        if let Some(mut wheel) = self.idle.take() {
            let (now_tick, idle_ticks) = (wheel.tick_at(now), wheel.deadline(0));
            let mut idle = Vec::new();
            wheel.expire(now_tick, |token| {
                let Some(Source::Conn(conn)) = self.sources.get_mut(token) else {
                    return None;
                };
                if !conn.connection.wants_read() {
                    // Not waiting for input (backpressure, flushing): not idle, look later.
                    conn.last_input_tick = now_tick;
                } else if now_tick >= conn.last_input_tick.saturating_add(idle_ticks) {
                    idle.push(token);
                    return None;
                }
                Some(conn.last_input_tick)
            });
            self.idle = Some(wheel);
            let timeout = self.limits.idle_timeout.unwrap_or_default();
            for token in idle {
                if let Some(conn) = self.conn(token) {
                    log_idle(conn.connection.peer(), timeout);
                }
                self.close(token);
            }
        }
        if self.drain_deadline.is_some_and(|deadline| now >= deadline) {
            for token in self.sources.tokens() {
                if let Some(conn) = self.conn(token) {
                    let (peer, owed) = (conn.connection.peer(), conn.connection.owed());
                    tracing::warn!("closing {peer}: drain timeout with {owed} bytes still owed");
                    self.close(token);
                }
            }
        }
    }

    fn on_accept(
        &mut self,
        token: Token,
        result: io::Result<OwnedFd>,
        more: bool,
    ) -> io::Result<()> {
        let Some(Source::Listener { name, is_tcp }) = self.sources.get(token) else {
            return Ok(());
        };
        let (name, mut is_paused) = (name.clone(), false);
        match result.and_then(|fd| Stream::from_accepted(fd, *is_tcp)) {
            Ok((stream, peer)) => self.admit(stream, peer, &name),
            Err(e) => match accept_action(&e) {
                AcceptAction::Wait | AcceptAction::Retry => {}
                AcceptAction::Pause => {
                    log_accept_pause(&name, &e);
                    self.paused.push((self.now + ACCEPT_PAUSE, token));
                    is_paused = true;
                }
                AcceptAction::Fail => return Err(e),
            },
        }
        // A multishot accept ends after any error; arm it again unless paused.
        if !more && !is_paused {
            self.ring.arm_accept(token);
        }
        Ok(())
    }

    fn admit(&mut self, stream: Stream, peer: Peer, listener: &str) {
        let Some(admission) = self.counter.admit() else {
            return log_over_limit(&peer, self.counter.max_conns().unwrap_or(0));
        };
        tracing::debug!("accepted {peer} on {listener}");
        let connection = Connection::new(self.protocol, peer, self.limits, stream.as_fd());
        let last_input_tick = self.idle.as_ref().map_or(0, |w| w.tick_at(self.now));
        let conn = Conn {
            connection,
            last_input_tick,
            is_dirty: false,
            _admission: admission,
        };
        let token = self.sources.insert(Source::Conn(conn));
        self.ring.add(token, OwnedFd::from(stream));
        if let Some(wheel) = self.idle.as_mut() {
            wheel.insert(token, last_input_tick);
        }
        self.pump(token);
    }

    fn on_receive(&mut self, token: Token, result: io::Result<Option<Received>>) {
        let now_tick = self.idle.as_ref().map_or(0, |w| w.tick_at(self.now));
        let Some(Source::Conn(conn)) = self.sources.get_mut(token) else {
            if let Ok(Some(received)) = result {
                self.ring.recycle(received);
            }
            return;
        };
        let handled = match result {
            Ok(None) => conn.connection.receive_eof(),
            // The ring's budget was the connection's read limit, so these bytes fit.
            Ok(Some(received)) => {
                let handled = conn.connection.receive(self.ring.received(&received));
                self.ring.recycle(received);
                handled
            }
            // ENOBUFS: every provided buffer was in use; ECANCELED: drain stopped reading.
            Err(e) if matches!(e.raw_os_error(), Some(errno::ENOBUFS | errno::ECANCELED)) => {
                return self.mark(token);
            }
            Err(e) => {
                tracing::debug!("connection {} ended: {e}", conn.connection.peer());
                return self.close(token);
            }
        };
        conn.last_input_tick = now_tick;
        match handled {
            Ok(()) => self.mark(token),
            // The handler panicked (already logged): close this connection only.
            Err(_) => self.close(token),
        }
    }

    fn on_sent(&mut self, token: Token, result: io::Result<usize>) {
        let Some(conn) = self.conn(token) else {
            return;
        };
        match result {
            // The kernel may take fewer bytes than offered; the rest goes in the next send.
            Ok(written) => conn.connection.advance(written),
            Err(e) => {
                tracing::debug!("connection {} ended: {e}", conn.connection.peer());
                return self.close(token);
            }
        }
        self.mark(token);
    }

    /// Remembers to pump `token` once this batch of completions is handled, so that all the
    /// input a batch brought leaves in one send per connection, not one per completion.
    fn mark(&mut self, token: Token) {
        if let Some(conn) = self.conn(token).filter(|conn| !conn.is_dirty) {
            conn.is_dirty = true;
            self.dirty.push(token);
        }
    }

    /// Starts what the connection needs next: a send of what is owed, a receive of what
    /// fits under `--max-buffer`, or, once it is finished, the close.
    fn pump(&mut self, token: Token) {
        let Some(Source::Conn(conn)) = self.sources.get_mut(token) else {
            return;
        };
        conn.is_dirty = false;
        if conn.connection.wants_write() && !self.ring.is_sending(token) {
            self.ring.send(token, conn.connection.unsent());
        }
        // Backpressure: with no room the receive stays unarmed until a send drains.
        let budget = conn.connection.read_limit(MAX_RECEIVE_BUDGET_BYTES);
        if budget > 0 && !self.ring.is_receiving(token) {
            self.ring.arm_receive(token, budget);
        }
        if conn.connection.is_finished() && !self.ring.is_sending(token) {
            // Everything owed was sent: the peer reads EOF after the last reply.
            self.ring.shutdown_write(token);
            self.close(token);
        }
    }

    /// Answers a datagram at once (a reply that cannot be queued is dropped, not kept),
    /// then receives the next one.
    fn on_datagram(
        &mut self,
        token: Token,
        result: io::Result<ReceivedDatagram>,
    ) -> io::Result<()> {
        let Some(Source::Datagrams(replier)) = self.sources.get_mut(token) else {
            return Ok(());
        };
        match result {
            Ok(datagram) if datagram.is_truncated => {
                let peer = Peer::from_sock_addr(&datagram.sender);
                let transport = match peer {
                    Peer::Ip(_) => Transport::Udp,
                    Peer::Unix(_) => Transport::UnixDatagram,
                };
                let (len, max) = (datagram.full_len, datagram.len);
                let log = LoopLog::default();
                log.datagram_received(transport, len);
                log.dropped(&peer, transport, &DatagramDrop::TooLarge { len, max });
            }
            Ok(datagram) => {
                let peer = Peer::from_sock_addr(&datagram.sender);
                let bytes = self.ring.datagram_bytes(token, &datagram);
                let transport = match peer {
                    Peer::Ip(_) => Transport::Udp,
                    Peer::Unix(_) => Transport::UnixDatagram,
                };
                // Logs only: this model does not count yet.
                let log = LoopLog::default();
                if let Some(reply) = replier.reply(&peer, transport, bytes, &log) {
                    let sent = self.ring.send_datagram(token, &datagram.sender, reply);
                    log.reply_sent(&peer, transport, &sent);
                }
            }
            Err(e) if is_per_peer_datagram_error(&e) => {}
            Err(e) => return Err(e),
        }
        self.ring.arm_datagram_receive(token);
        Ok(())
    }

    /// Shutdown fired: stop accepting and receiving, keep sending what is owed.
    fn start_drain(&mut self) {
        if self.drain_deadline.is_some() {
            return;
        }
        self.drain_deadline = Some(self.now + self.limits.drain_timeout);
        for token in self.sources.tokens() {
            let Some(conn) = self.conn(token) else {
                // A listener, a datagram socket, the shutdown eventfd: done with.
                self.close(token);
                continue;
            };
            conn.connection.stop_reading();
            self.ring.cancel_receive(token);
            self.pump(token);
        }
    }
}
