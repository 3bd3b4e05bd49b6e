//! `io_uring` (Linux 5.19+): the kernel performs the I/O and reports each finished operation.
//!
//! Step 11 of the ladder. Technique: a ring per loop; multishot accepts, multishot receives
//! into buffers the kernel picks, and sends of the shared output buffer, all submitted in
//! one system call per turn.
//! Cost: a buffer lent to the kernel stays lent until its completion, even after a close
//! (`sys/uring` keeps it), and every result arrives later, in another turn of the loop.
//! Limit: Linux only; often disabled (sysctl kernel.io_uring_disabled, container seccomp).
//!
//! Idle timeouts: the coarse wheel of the scalable models (`IdleWheel`), looked at once
//! per tick. Loops: each gets its own SO_REUSEPORT accept queue (`Model::accept_queues`)
//! and a duplicate of every datagram socket.

use crate::net::{DatagramSocket, Peer, StreamListener};
use crate::server::event_loops::{LoopSources, run_loops, split_sources};
use crate::server::idle_wheel::IdleWheel;
use crate::server::{
    ACCEPT_PAUSE, AcceptAction, Admission, Connection, ConnectionCounter, DATAGRAM_BUFFER_BYTES,
    DatagramReplier, Limits, Listeners, Protocol, RunOptions, ServeError, Shutdown, accept_action,
    is_per_peer_datagram_error, log_accept_pause, log_idle, log_over_limit, log_send_failure,
};
use crate::slab::{Slab, Token};
use crate::sys::errno;
use crate::sys::uring::{Completion, Received, ReceivedDatagram, Ring, probe};
use socket2::{SockAddr, SockRef};
use std::io;
use std::net::{Shutdown as Direction, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{self, UnixStream};
use std::time::{Duration, Instant};

/// After the drain timeout, how long cancelled operations may take to complete.
const CANCEL_GRACE: Duration = Duration::from_secs(1);
/// The most one receive may be armed for; the output buffer's room usually decides.
const MAX_RECEIVE_BUDGET_BYTES: usize = 1 << 30;

/// Checks that io_uring works here, before anything is bound.
///
/// # Errors
///
/// [`ServeError::ModelUnavailable`], saying why.
pub fn check_available() -> Result<(), ServeError> {
    probe().map_err(|source| ServeError::ModelUnavailable {
        model: "uring",
        source,
    })
}

/// Serves every listener from `options.threads` rings (default: one per core) until
/// `shutdown` fires and the drain ends.
///
/// # Errors
///
/// A ring that cannot be set up (every loop is built before any serves), or a listener
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

/// What a token names in a loop's slab: each has a slot in the ring too.
enum Source {
    Conn(Conn),
    Listener(Listener),
    Datagrams(Datagrams),
    Shutdown,
}

/// A datagram socket's replier, and the one datagram waiting while a reply is in flight.
struct Datagrams {
    replier: DatagramReplier,
    /// Received while the last reply was in flight: answered when that send completes.
    pending: Option<ReceivedDatagram>,
    /// Whom the reply in flight goes to, to name them if it is dropped.
    replying_to: Option<Peer>,
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

struct Listener {
    name: String,
    is_tcp: bool,
    paused_until: Option<Instant>,
}

/// One thread's ring and everything it serves.
struct Loop<'a> {
    ring: Ring,
    sources: Slab<Source>,
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
        let mut ring = Ring::new()?;
        let mut slab = Slab::default();
        let token = slab.insert(Source::Shutdown);
        ring.add(token, shutdown.fd().try_clone_to_owned()?);
        ring.arm_readable(token);
        for listener in sources.streams {
            let (name, is_tcp) = (listener.name().to_string(), listener.is_tcp());
            let token = slab.insert(Source::Listener(Listener {
                name,
                is_tcp,
                paused_until: None,
            }));
            ring.add(token, into_fd(listener));
            ring.arm_accept(token);
        }
        for socket in sources.datagrams {
            let token = slab.insert(Source::Datagrams(Datagrams {
                replier: DatagramReplier::new(protocol.clone()),
                pending: None,
                replying_to: None,
            }));
            let fd = match socket {
                DatagramSocket::Udp(socket) => OwnedFd::from(socket),
                DatagramSocket::Unix(socket) => OwnedFd::from(socket),
            };
            ring.add_datagram(token, fd, DATAGRAM_BUFFER_BYTES);
            ring.arm_datagram_receive(token);
        }
        Ok(Loop {
            ring,
            sources: slab,
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
                Some(deadline)
                    if self.ring.live_slots() == 0 || self.now >= deadline + CANCEL_GRACE =>
                {
                    return Ok(());
                }
                // Past the drain deadline every slot is closing: wait for its cancellation.
                Some(deadline) if self.now >= deadline => Some(CANCEL_GRACE),
                _ => self.next_deadline(),
            };
            self.ring.wait(timeout)?;
            self.now = Instant::now();
            while let Some(completion) = self.ring.next_completion() {
                match completion {
                    Completion::Accepted {
                        token,
                        result,
                        is_armed,
                    } => self.on_accept(token, result, is_armed)?,
                    Completion::Received { token, result } => self.on_receive(token, result),
                    Completion::Sent { token, result } => self.on_sent(token, result),
                    Completion::DatagramReceived { token, result } => {
                        self.on_datagram(token, result)?;
                    }
                    Completion::DatagramSent { token, result } => {
                        self.on_datagram_sent(token, result);
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
        match self.sources.get_mut(token) {
            Some(Source::Conn(conn)) => Some(conn),
            _ => None,
        }
    }

    fn conns(&self) -> Vec<Token> {
        let conns = self
            .sources
            .iter()
            .filter(|(_, s)| matches!(s, Source::Conn(_)));
        conns.map(|(token, _)| token).collect()
    }

    /// How long until a timer needs the loop: an accept pause's end, an idle tick, or the
    /// drain deadline.
    fn next_deadline(&self) -> Option<Duration> {
        let pauses = self.sources.iter().filter_map(|(_, source)| match source {
            Source::Listener(listener) => listener.paused_until,
            _ => None,
        });
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
        let mut resumed = Vec::new();
        for (token, source) in self.sources.iter() {
            if let Source::Listener(l) = source {
                if l.paused_until.is_some_and(|until| now >= until) {
                    resumed.push(token);
                }
            }
        }
        for token in resumed {
            if let Some(Source::Listener(listener)) = self.sources.get_mut(token) {
                listener.paused_until = None;
                self.ring.arm_accept(token);
            }
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
                    return Some(now_tick);
                }
                if now_tick < conn.last_input_tick.saturating_add(idle_ticks) {
                    return Some(conn.last_input_tick);
                }
                idle.push(token);
                None
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
            for token in self.conns() {
                if let Some(conn) = self.conn(token) {
                    tracing::warn!(
                        "closing {}: drain timeout with {} bytes still owed",
                        conn.connection.peer(),
                        conn.connection.owed()
                    );
                }
                self.close(token);
            }
        }
    }

    fn on_accept(
        &mut self,
        token: Token,
        result: io::Result<OwnedFd>,
        is_armed: bool,
    ) -> io::Result<()> {
        let Some(Source::Listener(listener)) = self.sources.get_mut(token) else {
            return Ok(());
        };
        let (name, is_tcp) = (listener.name.clone(), listener.is_tcp);
        match result {
            Ok(fd) => self.admit(&name, is_tcp, fd),
            Err(e) => match accept_action(&e) {
                AcceptAction::Wait | AcceptAction::Retry => {}
                AcceptAction::Pause => {
                    log_accept_pause(&listener.name, &e);
                    listener.paused_until = Some(self.now + ACCEPT_PAUSE);
                }
                AcceptAction::Fail => return Err(e),
            },
        }
        // A multishot accept ends after any error; arm it again unless paused.
        let is_paused = matches!(self.sources.get(token),
            Some(Source::Listener(l)) if l.paused_until.is_some());
        if !is_armed && !is_paused {
            self.ring.arm_accept(token);
        }
        Ok(())
    }

    fn admit(&mut self, listener: &str, is_tcp: bool, fd: OwnedFd) {
        let (fd, peer) = match identify(fd, is_tcp) {
            Ok(identified) => identified,
            Err(e) => return tracing::debug!("a connection on {listener} vanished: {e}"),
        };
        let Some(admission) = self.counter.admit() else {
            return log_over_limit(&peer, self.counter.max_conns().unwrap_or(0));
        };
        tracing::debug!("accepted {peer} on {listener}");
        let connection = Connection::new(self.protocol, peer, self.limits, fd.as_fd());
        let last_input_tick = self.idle.as_ref().map_or(0, |w| w.tick_at(self.now));
        let token = self.sources.insert(Source::Conn(Conn {
            connection,
            last_input_tick,
            is_dirty: false,
            _admission: admission,
        }));
        self.ring.add(token, fd);
        if let Some(wheel) = self.idle.as_mut() {
            wheel.insert(token, last_input_tick);
        }
        self.pump(token);
    }

    fn close(&mut self, token: Token) {
        self.ring.close(token);
        self.sources.remove(token);
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
        if !self.ring.is_receiving(token) {
            // Backpressure: with no room the receive stays unarmed until a send drains.
            let budget = conn.connection.read_limit(MAX_RECEIVE_BUDGET_BYTES);
            if budget > 0 {
                self.ring.arm_receive(token, budget);
            }
        }
        if conn.connection.is_finished() && !self.ring.is_sending(token) {
            // Everything owed was sent: the peer reads EOF after the last reply.
            if let Some(fd) = self.ring.fd(token) {
                let _ = SockRef::from(&fd).shutdown(Direction::Write);
            }
            self.close(token);
        }
    }

    fn on_datagram(
        &mut self,
        token: Token,
        result: io::Result<ReceivedDatagram>,
    ) -> io::Result<()> {
        let Some(Source::Datagrams(socket)) = self.sources.get_mut(token) else {
            return Ok(());
        };
        match result {
            // One reply at a time: this datagram stays in the receive buffer until then.
            Ok(datagram) if self.ring.is_sending(token) => socket.pending = Some(datagram),
            Ok(datagram) => self.answer(token, datagram),
            Err(e) if is_per_peer_datagram_error(&e) => self.ring.arm_datagram_receive(token),
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Replies to `datagram`, then receives the next one.
    fn answer(&mut self, token: Token, datagram: ReceivedDatagram) {
        let Some(Source::Datagrams(socket)) = self.sources.get_mut(token) else {
            return;
        };
        let peer = peer_of(&datagram.sender);
        if datagram.is_truncated {
            tracing::warn!("dropping a datagram from {peer}: over {DATAGRAM_BUFFER_BYTES} bytes");
        } else if let Some(reply) =
            (socket.replier).reply(&peer, self.ring.datagram_bytes(token, &datagram))
        {
            self.ring.send_datagram(token, &datagram.sender, reply);
            socket.replying_to = Some(peer);
        }
        self.ring.arm_datagram_receive(token);
    }

    fn on_datagram_sent(&mut self, token: Token, result: io::Result<usize>) {
        let Some(Source::Datagrams(socket)) = self.sources.get_mut(token) else {
            return;
        };
        if let (Err(e), Some(peer)) = (result, &socket.replying_to) {
            log_send_failure(peer, &e);
        }
        if let Some(datagram) = socket.pending.take() {
            self.answer(token, datagram);
        }
    }

    /// Shutdown fired: stop accepting and receiving, keep sending what is owed.
    fn start_drain(&mut self) {
        if self.drain_deadline.is_some() {
            return;
        }
        self.drain_deadline = Some(self.now + self.limits.drain_timeout);
        let others = self
            .sources
            .iter()
            .filter(|(_, s)| !matches!(s, Source::Conn(_)));
        for token in others.map(|(token, _)| token).collect::<Vec<_>>() {
            self.close(token);
        }
        for token in self.conns() {
            if let Some(conn) = self.conn(token) {
                conn.connection.stop_reading();
            }
            self.ring.cancel_receive(token);
            self.pump(token);
        }
    }
}

/// A listener's descriptor, for the ring to own.
fn into_fd(listener: StreamListener) -> OwnedFd {
    listener
        .into_std()
        .map_or_else(OwnedFd::from, OwnedFd::from)
}

/// Wraps an accepted descriptor: TCP gets `TCP_NODELAY` (Nagle would hold back small
/// replies for the peer's ACK); both learn their peer's address.
fn identify(fd: OwnedFd, is_tcp: bool) -> io::Result<(OwnedFd, Peer)> {
    if is_tcp {
        let stream = TcpStream::from(fd);
        // Nodelay failing leaves a working, if slower, connection.
        let _ = stream.set_nodelay(true);
        let peer = stream.peer_addr()?;
        Ok((stream.into(), Peer::Ip(peer)))
    } else {
        let stream = UnixStream::from(fd);
        let peer = stream.peer_addr()?;
        Ok((stream.into(), Peer::Unix(peer)))
    }
}

/// An unnamed Unix address: an empty path is how std spells it.
fn unnamed() -> net::SocketAddr {
    net::SocketAddr::from_pathname("").expect("an empty path is short enough")
}

/// The sender of a datagram, as the rest of the server names peers.
fn peer_of(sender: &SockAddr) -> Peer {
    if let Some(addr) = sender.as_socket() {
        return Peer::Ip(addr);
    }
    let named = sender.as_unix().or_else(|| {
        let name = sender.as_abstract_namespace()?;
        net::SocketAddr::from_abstract_name(name).ok()
    });
    Peer::Unix(named.unwrap_or_else(unnamed))
}
