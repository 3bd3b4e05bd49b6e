//! `io_uring` (Linux 5.19+): the kernel performs the I/O and reports each finished operation.
//!
//! Step 11 of the ladder. Technique: a ring per loop; multishot accepts, multishot receives
//! into buffers the kernel picks, and echoes sent straight from the buffer they arrived in,
//! all submitted in one system call per turn.
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
use crate::server::loop_clock::{Expiring, LoopClock};
use crate::server::readiness::LoopConfig;
use crate::server::task::close_served;
use crate::server::{
    Accepted, Admission, CloseReason, Connection, DatagramReplier, Listeners, LoopLog, Protocol,
    RunOptions, ServeError, Shutdown, datagram_transport, is_per_peer_datagram_error,
    listener_transport, on_accept,
};
use crate::slab::{Slab, Token};
use crate::sys::uring::{Completion, Received, ReceivedDatagram, Ring, SentBytes};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

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
    let serving = &options.on_serving;
    let config = LoopConfig::new(&listeners, protocol, shutdown.clone());
    let sources = split_sources(&mut listeners, super::loop_count(&options), true)?;
    let setup = |_, sources| Loop::new(sources, config.clone());
    run_loops("uring", sources, &shutdown, serving, setup, Loop::serve).map_err(ServeError::Io)
}

/// What a token names in a loop's slab: nearly always a connection, so that variant is
/// stored inline rather than boxed (one allocation less per connection).
#[allow(clippy::large_enum_variant)]
enum Source {
    Conn(Conn),
    Listener { name: String, transport: Transport },
    Datagrams(DatagramReplier, Transport),
    Shutdown,
}

impl Expiring for Source {
    fn expiring(&mut self) -> Option<(&Connection, &mut Instant)> {
        match self {
            Source::Conn(conn) => Some((&conn.connection, &mut conn.last_progress)),
            _ => None,
        }
    }
}

/// One accepted stream and what the loop knows about it.
struct Conn {
    connection: Connection,
    /// When input last came or the kernel last took replies, for the idle wheel.
    last_progress: Instant,
    /// Listed in `Loop::dirty`, to be pumped after this batch.
    is_dirty: bool,
    /// Its place under `--max-conns`, held until its socket is closed.
    place: Admission,
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
            let (name, transport) = (listener.name().to_string(), listener_transport(&listener));
            let token = slab.insert(Source::Listener { name, transport });
            ring.add(token, OwnedFd::from(listener));
            ring.arm_accept(token);
        }
        for socket in sources.datagrams {
            let replier = DatagramReplier::for_socket(config.protocol.clone(), &socket);
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
            // Every connection drained or cut (past the deadline): done. Dropping the ring
            // waits for the completions of what it still cancels.
            if self.clock.drain_deadline().is_some() && self.sources.is_empty() {
                return Ok(());
            }
            self.ring.wait(self.clock.timeout())?;
            self.clock.tick();
            while let Some((token, completion)) = self.ring.next_completion() {
                match completion {
                    Completion::Accepted { result, is_armed } => {
                        self.on_accept(token, result, is_armed)?;
                    }
                    Completion::Received(result) => self.on_receive(token, result),
                    Completion::Sent { result, sent } => self.on_sent(token, result, sent),
                    Completion::DatagramReceived(result) => self.on_datagram(token, result)?,
                    Completion::Readable => self.start_drain(),
                }
            }
            for token in std::mem::take(&mut self.dirty) {
                self.pump(token);
            }
        }
    }

    /// Ends `token`'s connection for `reason` (or retires a listener or datagram socket):
    /// the one way this loop closes. The ring frees its own descriptor once its operations
    /// have completed; a lingering close gets a duplicate of it.
    fn close(&mut self, token: Token, mut reason: CloseReason) {
        if let CloseReason::DrainTimeout { owed } = &mut reason {
            *owed += self.ring.sending_bytes(token);
        }
        if let Some(Source::Conn(mut conn)) = self.sources.remove(token) {
            let is_sending = self.ring.is_sending(token);
            if let Some(fd) = self.ring.fd(token) {
                let (connection, place) = (&mut conn.connection, conn.place);
                close_served(fd, connection, reason, &self.log, place, is_sending);
            }
        }
        self.ring.close(token);
    }

    fn on_timers(&mut self) {
        while let Some(listener) = self.clock.resume_next() {
            self.ring.arm_accept(listener);
        }
        for (token, reason) in self.clock.expired(&mut self.sources) {
            self.close(token, reason);
        }
    }

    fn on_accept(&mut self, token: Token, fd: io::Result<OwnedFd>, more: bool) -> io::Result<()> {
        let Some(Source::Listener { name, transport }) = self.sources.get(token) else {
            return Ok(());
        };
        let accepted = fd.and_then(|fd| Stream::from_accepted(fd, *transport == Transport::Tcp));
        match on_accept(accepted, name, *transport, &self.config.counter, &self.log)? {
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
            last_progress: self.clock.now(),
            is_dirty: false,
            place: admission,
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
            // The ring's budget was the connection's read limit, so these bytes fit.
            Ok(Some(received)) => {
                let connection = &mut conn.connection;
                self.log.received(connection.transport(), received.len());
                // Write-through: with nothing owed and no send in flight, an echo leaves
                // straight from the provided buffer (zero-copy); anything else is copied.
                connection.lend_spare(&mut self.spare);
                let take = |bytes: &[u8], may_send| connection.receive_lent(bytes, may_send);
                self.ring.take_received(token, received, take);
                connection.return_spare(&mut self.spare);
                Ok(true)
            }
            // EOF (`Ok(0)`) or an error.
            result => (conn.connection).on_read(result.map(|_| 0), &[], &self.log),
        };
        match outcome {
            Ok(true) => {
                conn.last_progress = self.clock.now();
                self.mark(token);
            }
            Ok(false) => self.mark(token),
            Err(reason) => self.close(token, reason),
        }
    }

    fn on_sent(&mut self, token: Token, result: io::Result<usize>, sent: SentBytes) {
        match (self.sources.get_mut(token), result) {
            // The kernel may take fewer bytes than offered; the rest goes in the next send,
            // ahead of anything queued meanwhile.
            (Some(Source::Conn(conn)), Ok(written)) => {
                conn.connection.owe_first(self.ring.unsent(&sent, written));
                // An idle connection keeps no output allocation.
                conn.connection.return_spare(&mut self.spare);
                self.log.sent(conn.connection.transport(), written);
                // A peer still taking its replies is not idle, however slowly it takes them.
                conn.last_progress = self.clock.now();
                self.mark(token);
            }
            (Some(Source::Conn(_)), Err(e)) => self.close(token, CloseReason::Failed(e)),
            _ => {}
        }
        self.ring.recycle_sent(sent);
    }

    /// Remembers to pump `token` once this batch of completions is handled, so that all the
    /// input a batch brought leaves in one send per connection, not one per completion.
    fn mark(&mut self, token: Token) {
        match self.sources.get_mut(token) {
            Some(Source::Conn(conn)) if !conn.is_dirty => {
                conn.is_dirty = true;
                self.dirty.push(token);
            }
            _ => {}
        }
    }

    /// Starts what the connection needs next: a send of what is owed (held by the ring, not
    /// twice), a receive of what fits under `--max-buffer`, or, once finished, the close.
    fn pump(&mut self, token: Token) {
        let Some(Source::Conn(conn)) = self.sources.get_mut(token) else {
            return;
        };
        conn.is_dirty = false;
        if conn.connection.wants_write() {
            let taken = self.ring.send(token, conn.connection.unsent());
            conn.connection.advance(taken);
            conn.connection.return_spare(&mut self.spare);
        }
        // Backpressure: with no room the receive stays unarmed until a send drains.
        let budget = conn.connection.read_limit(MAX_RECEIVE_BUDGET_BYTES);
        self.ring.arm_receive(token, budget);
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
                let whole = net::Received::Whole(datagram.len);
                let received = datagram
                    .truncated_from
                    .map_or(whole, net::Received::Truncated);
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
            let Some(Source::Conn(conn)) = self.sources.get_mut(token) else {
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
