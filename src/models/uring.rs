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
//! coarse wheel of the scalable models ([`LoopClock`]). Loops: each has its own SO_REUSEPORT
//! accept queue (`Model::accept_queues`) and a duplicate of every datagram socket.

use crate::metrics::Transport;
use crate::net::{self, Peer, Stream};
use crate::server::event_loops::{LoopSources, run_loops, split_sources};
use crate::server::loop_clock::LoopClock;
use crate::server::readiness::LoopConfig;
use crate::server::{
    Accepted, Admission, CloseReason, Connection, DatagramReplier, Ending, Linger, Listeners,
    LoopLog, Protocol, RunOptions, ServeError, Shutdown, datagram_transport, end,
    is_per_peer_datagram_error, listener_transport, on_accept,
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
    let config = LoopConfig::new(&listeners, protocol, shutdown.clone());
    let setup = |_, sources| Loop::new(sources, config.clone());
    run_loops(
        "uring",
        sources,
        &shutdown,
        &options.on_serving,
        setup,
        Loop::serve,
    )
    .map_err(ServeError::Io)
}

/// What a token names in a loop's slab: nearly always a connection, so that variant is
/// stored inline rather than boxed (one allocation less per connection).
#[allow(clippy::large_enum_variant)]
enum Source {
    Conn(Conn),
    Listener { name: Rc<str>, transport: Transport },
    Datagrams(DatagramReplier, Transport),
    Shutdown,
}

/// One accepted stream and what the loop knows about it.
struct Conn {
    connection: Connection,
    /// When input last arrived, for the idle wheel.
    last_input: Instant,
    /// Listed in `Loop::dirty`, to be pumped after this batch.
    is_dirty: bool,
    _admission: Admission,
}

/// One thread's ring and everything it serves.
struct Loop {
    ring: Ring,
    sources: Slab<Source>,
    config: LoopConfig,
    /// The accept pause, the idle wheel and the drain deadline.
    clock: LoopClock,
    /// Where every connection event of this loop is logged.
    log: LoopLog,
    /// The output allocation lent to whichever connection must copy a reply, so that
    /// an idle connection holds none ([`Connection::lend_spare`]).
    spare: Vec<u8>,
    /// Connections touched by this batch of completions (see `Loop::mark`).
    dirty: Vec<Token>,
}

impl Loop {
    fn new(sources: LoopSources, config: LoopConfig) -> io::Result<Self> {
        let (mut ring, mut slab) = (Ring::new()?, Slab::default());
        let token = slab.insert(Source::Shutdown);
        ring.add(token, config.shutdown.fd().try_clone_to_owned()?);
        ring.arm_readable(token);
        for listener in sources.streams {
            let (name, transport) = (Rc::from(listener.name()), listener_transport(&listener));
            let token = slab.insert(Source::Listener { name, transport });
            ring.add(token, OwnedFd::from(listener));
            ring.arm_accept(token);
        }
        for socket in sources.datagrams {
            let replier = DatagramReplier::new(config.protocol.clone());
            let token = slab.insert(Source::Datagrams(replier, datagram_transport(&socket)));
            let max_datagram_bytes = socket.max_datagram_bytes();
            ring.add_datagram(token, OwnedFd::from(socket), max_datagram_bytes);
            ring.arm_datagram_receive(token);
        }
        Ok(Loop {
            ring,
            sources: slab,
            clock: LoopClock::new(config.limits.idle_timeout),
            log: LoopLog::new(config.limits.metrics),
            config,
            spare: Vec::new(),
            dirty: Vec::new(),
        })
    }

    fn serve(mut self) -> io::Result<()> {
        loop {
            self.clock.tick();
            self.on_timers();
            let now = self.clock.now();
            let timeout = match self.clock.drain_deadline() {
                Some(at) if self.ring.live_slots() == 0 || now >= at + CANCEL_GRACE => {
                    return Ok(());
                }
                // Past the drain deadline every slot is closing: wait for its cancellation.
                Some(at) if now >= at => Some(CANCEL_GRACE),
                _ => self.clock.timeout(),
            };
            self.ring.wait(timeout)?;
            self.clock.tick();
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
                    Completion::Sent {
                        token,
                        result,
                        from,
                    } => self.on_sent(token, result, from),
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

    /// Ends `token`'s connection for `reason` (or retires a listener or datagram socket):
    /// the one way this loop closes. A peer that half-closed reads EOF after the last
    /// reply; one the server ends first gets a lingering close; the ring frees its own
    /// descriptor once its operations have completed.
    fn close(&mut self, token: Token, reason: CloseReason) {
        if let Some(Source::Conn(mut conn)) = self.sources.remove(token) {
            let connection = &mut conn.connection;
            self.log
                .closed(connection.peer(), connection.transport(), &reason);
            match reason.ending() {
                Ending::Eof => self.ring.shutdown_write(token),
                Ending::Abort => {}
                // The ring keeps its descriptor until its operations complete; the
                // lingering close gets a duplicate of it.
                ending => {
                    if let Some(Ok(stream)) = self.ring.fd(token).map(Stream::duplicate) {
                        if !connection.is_finished() && !self.ring.is_sending(token) {
                            // An idle timeout or a drain cut: with TLS, close_notify first.
                            connection.close_first(&stream, &self.log);
                        }
                        end(stream, ending, Linger::Elsewhere(Some(conn._admission)));
                    }
                }
            }
        }
        self.ring.close(token);
    }

    fn on_timers(&mut self) {
        while let Some(listener) = self.clock.resume_next() {
            self.ring.arm_accept(listener);
        }
        let (sources, mut idle) = (&self.sources, Vec::new());
        // Replies owed to a peer that does not read them do not make it less idle.
        let last_input = |token| match sources.get(token)? {
            Source::Conn(conn) => Some(conn.last_input),
            _ => None,
        };
        self.clock.expire_idle(last_input, &mut idle);
        let timeout = self.config.limits.idle_timeout.unwrap_or_default();
        for token in idle {
            self.close(token, CloseReason::Idle(timeout));
        }
        if self.clock.is_past_drain() {
            for token in self.sources.tokens() {
                if let Some(conn) = self.conn(token) {
                    let owed = conn.connection.owed();
                    self.close(token, CloseReason::DrainTimeout { owed });
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
        let Some(Source::Listener { name, transport }) = self.sources.get(token) else {
            return Ok(());
        };
        let (name, transport) = (name.clone(), *transport);
        let is_tcp = transport == Transport::Tcp;
        let accepted = result.and_then(|fd| Stream::from_accepted(fd, is_tcp));
        match on_accept(accepted, &name, transport, &self.config.counter, &self.log)? {
            Accepted::Connection(stream, peer, admission) => self.admit(stream, peer, admission),
            Accepted::Paused => self.clock.pause(token),
            Accepted::Again | Accepted::Empty => {}
        }
        // A multishot accept ends after any error; arm it again unless paused.
        if !more && !self.clock.is_paused(token) {
            self.ring.arm_accept(token);
        }
        Ok(())
    }

    fn admit(&mut self, stream: Stream, peer: Peer, admission: Admission) {
        let (config, fd) = (&self.config, stream.as_fd());
        let connection = Connection::new(&config.protocol, peer, &config.limits, fd);
        let conn = Conn {
            connection,
            last_input: self.clock.now(),
            is_dirty: false,
            _admission: admission,
        };
        let token = self.sources.insert(Source::Conn(conn));
        self.ring.add(token, OwnedFd::from(stream));
        self.clock.watch(token);
        self.pump(token);
    }

    fn on_receive(&mut self, token: Token, result: io::Result<Option<Received>>) {
        let Some(Source::Conn(conn)) = self.sources.get_mut(token) else {
            if let Ok(Some(received)) = result {
                self.ring.recycle(received);
            }
            return;
        };
        let outcome = match result {
            // ENOBUFS: every provided buffer was in use; ECANCELED: drain stopped reading.
            Err(e) if matches!(e.raw_os_error(), Some(errno::ENOBUFS | errno::ECANCELED)) => {
                Ok(false)
            }
            // The ring's budget was the connection's read limit, so these bytes fit.
            Ok(Some(received)) => {
                let bytes = self.ring.received(&received);
                self.log.received(conn.connection.transport(), bytes.len());
                // Write-through: with nothing owed and no send in flight, an echo leaves
                // straight from the provided buffer, which the ring keeps until it is sent
                // (if it has a buffer to spare for that: a peer that never reads would
                // keep it for ever).
                let may_send = self.ring.may_send_received(token);
                conn.connection.lend_spare(&mut self.spare);
                let through = conn
                    .connection
                    .receive_through(bytes, |input| match may_send {
                        true => Ok(input.len()),
                        false => Err(io::ErrorKind::WouldBlock.into()),
                    });
                match through {
                    Ok(sent) if sent > 0 => {
                        if let Err(received) = self.ring.send_received(token, received) {
                            // Not sent after all (never expected): owe it as a copy.
                            conn.connection.owe_first(self.ring.received(&received));
                            self.ring.recycle(received);
                        }
                    }
                    _ => self.ring.recycle(received),
                }
                conn.connection.return_spare(&mut self.spare);
                Ok(true)
            }
            // EOF (`Ok(0)`) or an error.
            result => (conn.connection).on_read(result.map(|_| 0), &[], &self.log),
        };
        match outcome {
            Ok(has_input) => {
                conn.last_input = if has_input {
                    self.clock.now()
                } else {
                    conn.last_input
                };
                self.mark(token);
            }
            Err(reason) => self.close(token, reason),
        }
    }

    fn on_sent(&mut self, token: Token, result: io::Result<usize>, from: Option<Received>) {
        if let Some(Source::Conn(conn)) = self.sources.get_mut(token) {
            match result {
                // The kernel may take fewer bytes than offered; the rest goes in the next
                // send, ahead of anything queued meanwhile.
                Ok(written) => {
                    match &from {
                        Some(from) => {
                            let rest = self.ring.received(from).get(written..);
                            conn.connection.owe_first(rest.unwrap_or_default());
                        }
                        None => conn.connection.advance(written),
                    }
                    // An idle connection keeps no output allocation.
                    conn.connection.return_spare(&mut self.spare);
                    self.log.sent(conn.connection.transport(), written);
                    self.mark(token);
                }
                Err(e) => self.close(token, CloseReason::Failed(e)),
            }
        }
        if let Some(from) = from {
            self.ring.recycle(from);
        }
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
        // Input still being sent from a provided buffer counts against the bound too.
        let in_flight = self.ring.sending_received(token);
        let budget =
            (conn.connection.read_limit(MAX_RECEIVE_BUDGET_BYTES)).saturating_sub(in_flight);
        if budget > 0 && !self.ring.is_receiving(token) {
            self.ring.arm_receive(token, budget);
        }
        if conn.connection.is_finished() && !self.ring.is_sending(token) {
            let reason = (conn.connection).finish_reason(self.clock.drain_deadline().is_some());
            self.close(token, reason);
        }
    }

    /// Answers a datagram at once (a reply that cannot be queued is dropped, not kept),
    /// then receives the next one.
    fn on_datagram(
        &mut self,
        token: Token,
        result: io::Result<ReceivedDatagram>,
    ) -> io::Result<()> {
        let Some(Source::Datagrams(replier, transport)) = self.sources.get_mut(token) else {
            return Ok(());
        };
        match result {
            Ok(datagram) => {
                let peer = Peer::from_sock_addr(&datagram.sender);
                let received = match datagram.is_truncated {
                    true => net::Received::Truncated(datagram.full_len),
                    false => net::Received::Whole(datagram.len),
                };
                let (ring, sender) = (&self.ring, &datagram.sender);
                let send = |reply: &[u8]| ring.send_datagram(token, sender, reply);
                let bytes = ring.datagram_bytes(token, &datagram);
                replier.answer_with(&peer, *transport, received, bytes, &self.log, send);
            }
            Err(e) if is_per_peer_datagram_error(&e) => {}
            Err(e) => return Err(e),
        }
        self.ring.arm_datagram_receive(token);
        Ok(())
    }

    /// Shutdown fired: stop accepting and receiving, keep sending what is owed.
    fn start_drain(&mut self) {
        if !self.clock.start_drain(self.config.limits.drain_timeout) {
            return;
        }
        for token in self.sources.tokens() {
            let Some(conn) = self.conn(token) else {
                // A listener, a datagram socket, the shutdown eventfd: done with (only a
                // connection's close is logged, so the reason goes unused).
                self.close(token, CloseReason::Drained);
                continue;
            };
            conn.connection.stop_reading();
            self.ring.cancel_receive(token);
            self.pump(token);
        }
    }
}
