//! `io_uring` (Linux 5.19+): the kernel performs the I/O and reports each finished operation.
//!
//! Technique: a ring per loop; multishot accepts, multishot receives into buffers the kernel
//! picks, and sends of the shared output buffer, all submitted in one system call per turn.
//! Cost: a buffer lent to the kernel stays lent until its completion, even after a close
//! (`sys/uring.rs` keeps it), and every result arrives later, in another turn of the loop.
//! Limit: Linux only; often disabled (sysctl kernel.io_uring_disabled, container seccomp).

use crate::net::Peer;
use crate::server::event_loops::listener_for_another_loop;
use crate::server::is_per_peer_datagram_error;
use crate::server::{
    ACCEPT_PAUSE, AcceptAction, Admission, Connection, ConnectionCounter, DATAGRAM_BUFFER_BYTES,
    DatagramReplier, Limits, Listeners, Protocol, RunOptions, ServeError, Shutdown, accept_action,
    log_accept_pause, log_idle, log_over_limit, log_send_failure,
};
use crate::sys::errno;
use crate::sys::uring::{Completion, Key, Ring, probe};
use socket2::{SockAddr, SockRef};
use std::io;
use std::net::{Shutdown as Direction, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{self, UnixStream};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

/// How often connections are checked against `--idle-timeout`.
const IDLE_SCAN_INTERVAL: Duration = Duration::from_millis(250);
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

/// Serves every listener from `threads` rings (default: one per core) until `shutdown`
/// fires and the drain ends.
///
/// # Errors
///
/// A ring that cannot be set up, or a listener that broke.
pub fn run(
    listeners: Listeners,
    protocol: Protocol,
    shutdown: Shutdown,
    options: RunOptions,
) -> Result<(), ServeError> {
    let loops = options.threads.unwrap_or_else(super::default_loops).max(1);
    let mut sockets = Vec::new();
    for n in 0..loops {
        // Each loop gets its own SO_REUSEPORT listener for TCP (its own accept queue).
        let streams = listeners.streams.iter().map(|listener| {
            let fd = match n {
                0 => listener.as_fd().try_clone_to_owned()?,
                _ => listener_for_another_loop(listener)?
                    .into_std()
                    .map_or_else(OwnedFd::from, OwnedFd::from),
            };
            Ok((fd, listener.name(), listener.is_tcp()))
        });
        let streams = streams.collect::<io::Result<Vec<_>>>()?;
        let datagrams = listeners
            .datagrams
            .iter()
            .map(|d| d.as_fd().try_clone_to_owned());
        sockets.push((streams, datagrams.collect::<io::Result<Vec<_>>>()?));
    }
    let barrier = &Barrier::new(sockets.len());
    let (protocol, shutdown, listeners) = (&protocol, &shutdown, &listeners);
    thread::scope(|scope| {
        let handles: Vec<_> = sockets
            .into_iter()
            .map(|(streams, datagrams)| {
                scope.spawn(move || {
                    let event_loop = Loop::new(listeners, protocol, shutdown, streams, datagrams);
                    // Every ring (and its descriptor) exists before any loop accepts, so
                    // accepted connections cannot use up the descriptors a ring needs.
                    barrier.wait();
                    let result = event_loop.and_then(|l| l.serve().map_err(ServeError::Io));
                    if result.is_err() {
                        // One loop failed: the others stop too, and drain.
                        shutdown.fire();
                    }
                    result
                })
            })
            .collect();
        // Join every loop; the first error wins.
        let results = handles
            .into_iter()
            .map(|handle| (handle.join()).unwrap_or_else(|panic| std::panic::resume_unwind(panic)));
        results.fold(Ok(()), Result::and)
    })
}

/// One accepted stream and what the loop knows about it.
struct Conn {
    key: Key,
    connection: Connection,
    last_input: Instant,
    /// Listed in `Loop::dirty`, to be pumped after this batch.
    is_dirty: bool,
    _admission: Admission,
}

struct StreamListener<'a> {
    key: Key,
    name: &'a str,
    is_tcp: bool,
    paused_until: Option<Instant>,
}

struct DatagramSocket {
    key: Key,
    replier: DatagramReplier,
    /// A datagram arrived while the previous reply was in flight; answer it next.
    has_pending: bool,
    last_peer: Option<Peer>,
}

/// One thread's ring and everything it serves.
struct Loop<'a> {
    ring: Ring,
    protocol: &'a Protocol,
    limits: &'a Limits,
    counter: &'a ConnectionCounter,
    listeners: Vec<StreamListener<'a>>,
    datagrams: Vec<DatagramSocket>,
    /// Connections by slot index (`Key::index`).
    conns: Vec<Option<Conn>>,
    /// Connections touched by this batch of completions (see `Loop::mark`).
    dirty: Vec<Key>,
    shutdown: Key,
    /// Set when shutdown fired: stop accepting, send what is owed until then.
    drain_deadline: Option<Instant>,
    next_idle_scan: Instant,
    /// The time when the last wait returned: one clock read per batch of completions.
    now: Instant,
}

impl<'a> Loop<'a> {
    fn new(
        listeners: &'a Listeners,
        protocol: &'a Protocol,
        shutdown: &Shutdown,
        streams: Vec<(OwnedFd, &'a str, bool)>,
        datagrams: Vec<OwnedFd>,
    ) -> Result<Self, ServeError> {
        let unavailable = |source| ServeError::ModelUnavailable {
            model: "uring",
            source,
        };
        let mut ring = Ring::new().map_err(unavailable)?;
        let watched = shutdown.fd().try_clone_to_owned()?;
        let shutdown = ring.add(watched);
        ring.arm_readable(shutdown);
        let listeners_here = streams.into_iter().map(|(fd, name, is_tcp)| {
            let key = ring.add(fd);
            ring.arm_accept(key);
            StreamListener {
                key,
                name,
                is_tcp,
                paused_until: None,
            }
        });
        let listeners_here = listeners_here.collect();
        let datagrams = datagrams.into_iter().map(|fd| {
            let key = ring.add_datagram(fd, DATAGRAM_BUFFER_BYTES);
            ring.arm_datagram_receive(key);
            DatagramSocket {
                key,
                replier: DatagramReplier::new(protocol.clone()),
                has_pending: false,
                last_peer: None,
            }
        });
        Ok(Loop {
            datagrams: datagrams.collect(),
            ring,
            protocol,
            limits: &listeners.limits,
            counter: &listeners.counter,
            listeners: listeners_here,
            conns: Vec::new(),
            dirty: Vec::new(),
            shutdown,
            drain_deadline: None,
            next_idle_scan: Instant::now(),
            now: Instant::now(),
        })
    }

    fn serve(mut self) -> io::Result<()> {
        loop {
            self.now = Instant::now();
            let now = self.now;
            self.on_timers(now);
            let timeout = match self.drain_deadline {
                Some(deadline) if self.ring.live_slots() == 0 || now >= deadline + CANCEL_GRACE => {
                    return Ok(());
                }
                // Past the drain deadline every slot is closing: wait for its cancellation.
                Some(deadline) if now >= deadline => Some(CANCEL_GRACE),
                _ => self
                    .next_deadline()
                    .map(|at| at.saturating_duration_since(now)),
            };
            self.ring.wait(timeout)?;
            self.now = Instant::now();
            while let Some(completion) = self.ring.next_completion() {
                match completion {
                    Completion::Accepted {
                        key,
                        result,
                        is_armed,
                    } => self.on_accept(key, result, is_armed)?,
                    Completion::Received { key, result } => self.on_receive(key, result),
                    Completion::Sent { key, result } => self.on_sent(key, result),
                    Completion::DatagramReceived { key, result } => {
                        self.on_datagram(key, result)?
                    }
                    Completion::DatagramSent { key, result } => self.on_datagram_sent(key, result),
                    Completion::Readable { .. } => self.start_drain(),
                }
            }
            for key in std::mem::take(&mut self.dirty) {
                self.pump(key);
            }
        }
    }

    /// The earliest moment a timer needs the loop: an accept pause's end, an idle scan,
    /// or the drain deadline.
    fn next_deadline(&self) -> Option<Instant> {
        let pauses = self.listeners.iter().filter_map(|l| l.paused_until);
        let idle_scan = self.limits.idle_timeout.map(|_| self.next_idle_scan);
        pauses.chain(idle_scan).chain(self.drain_deadline).min()
    }

    fn on_timers(&mut self, now: Instant) {
        for listener in &mut self.listeners {
            if listener.paused_until.is_some_and(|until| now >= until) {
                listener.paused_until = None;
                self.ring.arm_accept(listener.key);
            }
        }
        if let Some(idle) = self
            .limits
            .idle_timeout
            .filter(|_| now >= self.next_idle_scan)
        {
            self.next_idle_scan = now + IDLE_SCAN_INTERVAL;
            // Only a connection we are reading can be idle; one held back by backpressure
            // is waiting for its peer to read, not to write.
            let idle_conns: Vec<Key> = (self.conns.iter().flatten())
                .filter(|c| c.connection.wants_read() && now - c.last_input >= idle)
                .map(|c| c.key)
                .collect();
            for key in idle_conns {
                if let Some(conn) = self.conn(key) {
                    log_idle(conn.connection.peer(), idle);
                }
                self.close(key);
            }
        }
        if self.drain_deadline.is_some_and(|deadline| now >= deadline) {
            for conn in self.conns.iter_mut().filter_map(Option::take) {
                tracing::warn!(
                    "closing {}: drain timeout with {} bytes still owed",
                    conn.connection.peer(),
                    conn.connection.owed()
                );
                self.ring.close(conn.key);
            }
        }
    }

    fn on_accept(
        &mut self,
        key: Key,
        result: io::Result<OwnedFd>,
        is_armed: bool,
    ) -> io::Result<()> {
        let Some(at) = self.listeners.iter().position(|l| l.key == key) else {
            return Ok(());
        };
        match result {
            Ok(fd) => self.admit(at, fd),
            Err(e) => match accept_action(&e) {
                AcceptAction::Wait | AcceptAction::Retry => {}
                AcceptAction::Pause => {
                    log_accept_pause(self.listeners[at].name, &e);
                    self.listeners[at].paused_until = Some(self.now + ACCEPT_PAUSE);
                }
                AcceptAction::Fail => return Err(e),
            },
        }
        // A multishot accept ends after any error; arm it again unless paused.
        if !is_armed && self.listeners[at].paused_until.is_none() {
            self.ring.arm_accept(key);
        }
        Ok(())
    }

    fn admit(&mut self, at: usize, fd: OwnedFd) {
        let listener = &self.listeners[at];
        let (fd, peer) = match identify(fd, listener.is_tcp) {
            Ok(identified) => identified,
            Err(e) => return tracing::debug!("a connection on {} vanished: {e}", listener.name),
        };
        let Some(admission) = self.counter.admit() else {
            return log_over_limit(&peer, self.counter.max_conns().unwrap_or(0));
        };
        tracing::debug!("accepted {peer} on {}", listener.name);
        let connection = Connection::new(self.protocol, peer, self.limits, fd.as_fd());
        let key = self.ring.add(fd);
        if self.conns.len() <= key.index() {
            self.conns.resize_with(key.index() + 1, || None);
        }
        self.conns[key.index()] = Some(Conn {
            key,
            connection,
            last_input: self.now,
            is_dirty: false,
            _admission: admission,
        });
        self.pump(key);
    }

    fn conn(&mut self, key: Key) -> Option<&mut Conn> {
        conn_of(&mut self.conns, key)
    }

    fn close(&mut self, key: Key) {
        self.ring.close(key);
        if let Some(slot) = self.conns.get_mut(key.index()) {
            slot.take_if(|conn| conn.key == key);
        }
    }

    fn on_receive(&mut self, key: Key, result: io::Result<usize>) {
        let Some(conn) = conn_of(&mut self.conns, key) else {
            return;
        };
        let handled = match result {
            Ok(0) => conn.connection.receive_eof(),
            // The ring's budget was the connection's read limit, so these bytes fit.
            Ok(_) => conn.connection.receive(self.ring.received()),
            // ENOBUFS: every provided buffer was in use; ECANCELED: drain stopped reading.
            Err(e) if matches!(e.raw_os_error(), Some(errno::ENOBUFS | errno::ECANCELED)) => {
                return self.mark(key);
            }
            Err(e) => {
                tracing::debug!("connection {} ended: {e}", conn.connection.peer());
                return self.close(key);
            }
        };
        conn.last_input = self.now;
        match handled {
            Ok(()) => self.mark(key),
            // The handler panicked (already logged): close this connection only.
            Err(_) => self.close(key),
        }
    }

    fn on_sent(&mut self, key: Key, result: io::Result<usize>) {
        let Some(conn) = self.conn(key) else {
            return;
        };
        match result {
            // The kernel may take fewer bytes than offered; the rest goes in the next send.
            Ok(written) => conn.connection.advance(written),
            Err(e) => {
                tracing::debug!("connection {} ended: {e}", conn.connection.peer());
                return self.close(key);
            }
        }
        self.mark(key);
    }

    /// Remembers to pump `key` once this batch of completions is handled, so that all the
    /// input a batch brought leaves in one send per connection, not one per completion.
    fn mark(&mut self, key: Key) {
        if let Some(conn) = self.conn(key).filter(|conn| !conn.is_dirty) {
            conn.is_dirty = true;
            self.dirty.push(key);
        }
    }

    /// Starts what the connection needs next: a send of what is owed, a receive of what
    /// fits under `--max-buffer`, or, once it is finished, the close.
    fn pump(&mut self, key: Key) {
        let Some(conn) = conn_of(&mut self.conns, key) else {
            return;
        };
        conn.is_dirty = false;
        if conn.connection.wants_write() && !self.ring.is_sending(key) {
            self.ring.send(key, conn.connection.unsent());
        }
        if !self.ring.is_receiving(key) {
            // Backpressure: with no room the receive stays unarmed until a send drains.
            let budget = conn.connection.read_limit(MAX_RECEIVE_BUDGET_BYTES);
            if budget > 0 {
                self.ring.arm_receive(key, budget);
            }
        }
        if conn.connection.is_finished() && !self.ring.is_sending(key) {
            // Everything owed was sent: the peer reads EOF after the last reply.
            if let Some(fd) = self.ring.fd(key) {
                let _ = SockRef::from(&fd).shutdown(Direction::Write);
            }
            self.close(key);
        }
    }

    fn on_datagram(&mut self, key: Key, result: io::Result<usize>) -> io::Result<()> {
        let Some(at) = self.datagrams.iter().position(|d| d.key == key) else {
            return Ok(());
        };
        match result {
            Ok(_) if self.ring.is_sending(key) => self.datagrams[at].has_pending = true,
            Ok(_) => self.answer(at),
            Err(e) if is_per_peer_datagram_error(&e) => {
                self.ring.arm_datagram_receive(key);
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Replies to the datagram just received, then receives the next one.
    fn answer(&mut self, at: usize) {
        let socket = &mut self.datagrams[at];
        if let Some((datagram, sender, is_truncated)) = self.ring.datagram(socket.key) {
            let peer = peer_of(&sender);
            if is_truncated {
                tracing::warn!(
                    "dropping a datagram from {peer}: over {DATAGRAM_BUFFER_BYTES} bytes"
                );
            } else if let Some(reply) = socket.replier.reply(&peer, datagram) {
                self.ring.send_datagram(socket.key, reply);
            }
            socket.last_peer = Some(peer);
        }
        self.ring.arm_datagram_receive(socket.key);
    }

    fn on_datagram_sent(&mut self, key: Key, result: io::Result<usize>) {
        let Some(at) = self.datagrams.iter().position(|d| d.key == key) else {
            return;
        };
        if let (Err(e), Some(peer)) = (result, &self.datagrams[at].last_peer) {
            log_send_failure(peer, &e);
        }
        if std::mem::take(&mut self.datagrams[at].has_pending) {
            self.answer(at);
        }
    }

    /// Shutdown fired: stop accepting and receiving, keep sending what is owed.
    fn start_drain(&mut self) {
        if self.drain_deadline.is_some() {
            return;
        }
        self.drain_deadline = Some(self.now + self.limits.drain_timeout);
        let listeners = self.listeners.iter().map(|l| l.key);
        let others: Vec<Key> = listeners
            .chain(self.datagrams.iter().map(|d| d.key))
            .chain([self.shutdown])
            .collect();
        for key in others {
            self.ring.close(key);
        }
        let conns: Vec<Key> = self.conns.iter().flatten().map(|c| c.key).collect();
        for key in conns {
            if let Some(conn) = self.conn(key) {
                conn.connection.stop_reading();
            }
            self.ring.cancel_receive(key);
            self.pump(key);
        }
    }
}

/// The connection in `key`'s slot, unless the slot holds a newer one.
fn conn_of(conns: &mut [Option<Conn>], key: Key) -> Option<&mut Conn> {
    let slot = conns.get_mut(key.index())?;
    slot.as_mut().filter(|conn| conn.key == key)
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

/// The sender of a datagram, as the rest of the server names peers.
fn peer_of(sender: &SockAddr) -> Peer {
    if let Some(addr) = sender.as_socket() {
        return Peer::Ip(addr);
    }
    let named = sender.as_unix().or_else(|| {
        let name = sender.as_abstract_namespace()?;
        net::SocketAddr::from_abstract_name(name).ok()
    });
    // An unnamed sender: an empty path is how std spells it.
    let unnamed = || net::SocketAddr::from_pathname("").expect("an empty path is short enough");
    Peer::Unix(named.unwrap_or_else(unnamed))
}
