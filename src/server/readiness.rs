//! The readiness core: everything a loop does once it knows which descriptors are ready,
//! shared by `busy-poll`, `select`, `poll` and `epoll`. Those models differ only in how
//! they learn what is ready (try everything, fd sets, a pollfd array, the kernel's
//! interest list); the accepting, reading, answering, timing out and draining is here.
//!
//! A model's turn: wait by its mechanism for at most [`ReadinessCore::timeout`], call
//! [`ReadinessCore::expire`] for the clocks, then hand each ready source to
//! [`ReadinessCore::handle`], until [`ReadinessCore::is_finished`]. A model that rebuilds
//! its sets each turn asks for [`ReadinessCore::interests`]; one that keeps them in the
//! kernel asks for the changes only ([`ReadinessCore::sync`]).
//!
//! Sources are named by [`Token`]s: reserved ones for the loop's own sockets (the shutdown
//! eventfd, then its listeners, then its datagram sockets) and slab tokens for
//! connections. Closing a connection empties its slab slot and bumps its generation, so a
//! pass over the ready sources never skips one, and a stale event for a reused slot finds
//! nothing (the tutorial's busy-poll server removed clients from the list it was walking).

use super::accept::{Accepted, accept_and_admit};
use super::event_loops::LoopSources;
use super::lifecycle::{CloseReason, Ending, Linger, LoopLog, close, end, stream_transport};
use super::loop_clock::{Expiring, LoopClock};
use super::read_buffer::ReadBuffer;
use super::{
    Admission, Connection, ConnectionCounter, DatagramReplier, Limits, Listeners, Protocol,
    READ_BUFFER_BYTES, ReadOutcome, Shutdown,
};
use crate::net::{DatagramSocket, Stream, StreamListener};
use crate::slab::{Slab, Token};
pub use crate::sys::Interest;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};

/// Connections accepted, or datagrams answered, per readiness of one socket before the
/// loop serves others: a flood on one socket cannot starve the rest.
const BATCH: usize = 64;
/// The reserved token of the shutdown eventfd; listeners and datagram sockets follow.
const SHUTDOWN: usize = 0;

/// How a loop finds connections that sent nothing for `--idle-timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleCheck {
    /// Look at every connection each turn: O(connections), which the rebuild-every-turn
    /// models pay anyway; exact to the turn.
    Scan,
    /// A coarse timing wheel ([`IdleWheel`](super::idle_wheel::IdleWheel), kept by
    /// [`LoopClock`]): each connection is looked at about once per
    /// timeout, so thousands of connections cost nothing per turn.
    Wheel,
}

/// What every loop of a model shares.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    /// The protocol every connection speaks.
    pub protocol: Protocol,
    /// The operator's limits.
    pub limits: Limits,
    /// Open connections of every loop against `--max-conns`.
    pub counter: ConnectionCounter,
    /// Fires once, for every loop.
    pub shutdown: Shutdown,
}

impl LoopConfig {
    /// The configuration `listeners` were bound with, speaking `protocol`.
    pub fn new(listeners: &Listeners, protocol: Protocol, shutdown: Shutdown) -> Self {
        LoopConfig {
            protocol,
            limits: listeners.limits.clone(),
            counter: listeners.counter.clone(),
            shutdown,
        }
    }
}

/// `repr(C)`, in the order a message touches the fields: the socket, what is watched,
/// then the connection (whose own hot fields come first), so that serving a message reads
/// the slot's first two cache lines and not five scattered ones (the C yardstick's whole
/// per-connection state is one line; docs/benchmarks.md has the profile).
#[repr(C)]
struct Entry {
    stream: Stream,
    /// What the model's mechanism was last told to watch ([`ReadinessCore::sync`]).
    watched: Interest,
    /// `Some` while kept to be served again next turn ([`ReadinessCore::serve_again`]),
    /// with whether to keep it until a read finds nothing (the peer's EOF or urgent data
    /// arrived), not only until a read is short.
    again: Option<bool>,
    connection: Connection,
    /// The turn in which the connection last made progress, for `--idle-timeout`: a byte
    /// read from the peer, or a byte of its replies taken by the kernel.
    last_progress: Instant,
    /// This connection's place under `--max-conns`, held until its socket is closed
    /// (after the lingering close, if it gets one).
    place: Admission,
}

impl Expiring for Entry {
    fn expiring(&mut self) -> Option<(&Connection, &mut Instant)> {
        Some((&self.connection, &mut self.last_progress))
    }
}

/// One loop's sockets and connections, and everything it does with them except waiting.
pub struct ReadinessCore {
    /// Its listeners, each `None` once closed: the drain closes them as soon as the
    /// mechanism no longer watches them, so that the kernel refuses new clients rather than
    /// completing handshakes nobody will accept. A kernel-kept interest list (epoll) must
    /// forget a listener first: a duplicate of it elsewhere (another loop's, systemd's)
    /// would keep it in the list after its close, reporting events for a closed descriptor.
    listeners: Vec<Option<StreamListener>>,
    datagrams: Vec<DatagramSocket>,
    config: LoopConfig,
    connections: Slab<Entry>,
    /// What the mechanism watches for the shutdown eventfd, listeners and datagram sockets.
    watched: Vec<Interest>,
    /// Sources whose interest may differ from what the mechanism watches.
    changed: Vec<Token>,
    /// One per datagram socket, in the same order.
    repliers: Vec<DatagramReplier>,
    /// One read buffer for every connection and datagram: the loop reads one at a time.
    buf: ReadBuffer,
    /// The longest datagram each datagram socket answers whole: the part of `buf` it
    /// receives into, so a longer one is read truncated and dropped.
    datagram_max: Vec<usize>,
    /// The output allocation lent to whichever connection is producing replies, so a
    /// message costs no allocation and an idle connection holds none.
    spare: Vec<u8>,
    log: LoopLog,
    /// How this loop finds connections idle past `--idle-timeout`; `None` without it.
    idle: Option<IdleCheck>,
    /// Descriptors from this one up cannot be watched (select's FD_SETSIZE).
    fd_limit: Option<(RawFd, &'static str)>,
    /// The accept pause, the idle wheel (with [`IdleCheck::Wheel`]) and the drain
    /// deadline; read once after the wait, only while something is timed.
    clock: LoopClock,
    /// Connections ended first whose sockets a kernel-kept mechanism (epoll) still
    /// watches: [`ReadinessCore::sync`] unwatches them, then hands them to the lingering
    /// close, whose descriptor would otherwise keep them in the interest list.
    unwatching: Vec<(Token, Stream, Interest, Admission)>,
    /// Connections to serve again next turn without waiting, for a mechanism that reports
    /// input only when more arrives ([`ReadinessCore::handle_edge`]): their last read may
    /// have left input, or their peer's EOF or urgent data was reported (`Entry::again`).
    again: Vec<Token>,
}

impl ReadinessCore {
    /// Takes over one loop's sockets, switched to non-blocking mode.
    ///
    /// # Errors
    ///
    /// The OS error of switching a socket to non-blocking mode.
    pub fn new(sources: LoopSources, config: LoopConfig, idle: IdleCheck) -> io::Result<Self> {
        for listener in &sources.streams {
            listener.set_nonblocking(true)?;
        }
        for socket in &sources.datagrams {
            socket.set_nonblocking(true)?;
        }
        let own_sources = 1 + sources.streams.len() + sources.datagrams.len();
        let datagram_max: Vec<usize> = (sources.datagrams.iter())
            .map(DatagramSocket::max_datagram_bytes)
            .collect();
        let buf_bytes = datagram_max
            .iter()
            .fold(READ_BUFFER_BYTES, |a, &b| a.max(b));
        let idle_timeout = config.limits.idle_timeout;
        let clock = LoopClock::new(idle_timeout.filter(|_| idle == IdleCheck::Wheel));
        let idle = idle_timeout.map(|_| idle);
        let log = LoopLog::new(config.limits.metrics);
        Ok(ReadinessCore {
            repliers: (sources.datagrams.iter())
                .map(|socket| DatagramReplier::for_socket(config.protocol.clone(), socket))
                .collect(),
            listeners: sources.streams.into_iter().map(Some).collect(),
            datagrams: sources.datagrams,
            config,
            connections: Slab::default(),
            watched: vec![Interest::NONE; own_sources],
            changed: (0..own_sources).map(reserved).collect(),
            buf: ReadBuffer::new(buf_bytes),
            datagram_max,
            spare: Vec::new(),
            log,
            idle,
            fd_limit: None,
            clock,
            unwatching: Vec::new(),
            again: Vec::new(),
        })
    }

    /// The one loop of a single-threaded model: every socket of `listeners`.
    ///
    /// # Errors
    ///
    /// As [`ReadinessCore::new`].
    pub fn single_loop(
        listeners: &mut Listeners,
        protocol: Protocol,
        shutdown: Shutdown,
        idle: IdleCheck,
    ) -> io::Result<Self> {
        let config = LoopConfig::new(listeners, protocol, shutdown);
        ReadinessCore::new(LoopSources::take_all(listeners), config, idle)
    }

    /// Closes every accepted connection whose descriptor is `limit` or more, logging it
    /// with `name` (the mechanism's constant, `FD_SETSIZE`), instead of serving it.
    pub fn refuse_fds_from(&mut self, limit: usize, name: &'static str) {
        self.fd_limit = Some((RawFd::try_from(limit).unwrap_or(RawFd::MAX), name));
    }

    /// Whether `token` names one of the loop's listeners.
    pub fn is_listener(&self, token: Token) -> bool {
        token
            .reserved_index()
            .is_some_and(|n| n > SHUTDOWN && n <= self.listeners.len())
    }

    /// The descriptor of a source, if it is still open.
    pub fn fd(&self, token: Token) -> Option<BorrowedFd<'_>> {
        let Some(n) = token.reserved_index() else {
            return Some(self.connections.get(token)?.stream.as_fd());
        };
        let streams = self.listeners.len();
        Some(match n {
            SHUTDOWN => self.config.shutdown.fd(),
            n if n <= streams => self.listeners[n - 1].as_ref()?.as_fd(),
            n => self.datagrams.get(n - 1 - streams)?.as_fd(),
        })
    }

    /// Every source to watch now, with its descriptor and what to wait for; a source that
    /// is watched for nothing is left out.
    pub fn interests(&self) -> impl Iterator<Item = (Token, BorrowedFd<'_>, Interest)> + '_ {
        let own = (0..self.watched.len()).map(reserved);
        let connections = self.connections.iter().map(|(token, _)| token);
        own.chain(connections).filter_map(|token| {
            let interest = self.wanted(token);
            let fd = self.fd(token).filter(|_| interest != Interest::NONE)?;
            Some((token, fd, interest))
        })
    }

    /// Tells a mechanism that keeps interest in the kernel what changed since the last
    /// call: `update(token, fd, watched, wanted)` for each source whose interest changed
    /// (`Interest::NONE` as `watched`: not added yet; as `wanted`: remove it). Closed
    /// connections need no call (closing their only descriptor removes them), except those
    /// closed with a lingering close, which the lingering thread keeps open: they are
    /// removed here before it gets them.
    ///
    /// # Errors
    ///
    /// The first error of `update` for one of the loop's own sockets; a connection that
    /// cannot be watched is closed instead.
    pub fn sync(
        &mut self,
        mut update: impl FnMut(Token, BorrowedFd<'_>, Interest, Interest) -> io::Result<()>,
    ) -> io::Result<()> {
        for (token, stream, watched, place) in self.unwatching.drain(..) {
            // A failure leaves a watched descriptor of a stale token: its events find no
            // connection, and it leaves the set when the lingering close ends.
            let _ = update(token, stream.as_fd(), watched, Interest::NONE);
            end(stream, Ending::Lingering, Linger::Elsewhere(Some(place)));
        }
        let mut changed = std::mem::take(&mut self.changed);
        for &token in &changed {
            let wanted = self.wanted(token);
            let (watched, fd) = match token.reserved_index() {
                Some(n) => (self.watched[n], self.fd(token)),
                None => match self.connections.get(token) {
                    Some(entry) => (entry.watched, Some(entry.stream.as_fd())),
                    None => continue,
                },
            };
            let Some(fd) = fd.filter(|_| watched != wanted) else {
                continue;
            };
            match (update(token, fd, watched, wanted), token.reserved_index()) {
                (Ok(()), Some(n)) => self.watched[n] = wanted,
                (Ok(()), None) => {
                    if let Some(entry) = self.connections.get_mut(token) {
                        entry.watched = wanted;
                    }
                }
                (Err(e), Some(_)) => return Err(e),
                (Err(e), None) => {
                    let why = format!("cannot watch it: {e}");
                    self.close(token, CloseReason::CannotWatch(why));
                }
            }
        }
        changed.clear();
        self.changed = changed;
        self.close_unwatched_listeners();
        Ok(())
    }

    /// How long the model may sleep: until the next idle check, the end of an accept
    /// pause or the drain deadline (`None`: until something is ready). Reads the clock
    /// only while something is timed.
    pub fn timeout(&self) -> Option<Duration> {
        if !self.again.is_empty() {
            // Input is already waiting: look for more without sleeping, then serve it.
            return Some(Duration::ZERO);
        }
        if !self.is_timed() {
            return None;
        }
        let now = Instant::now();
        let scan = match (self.idle, self.config.limits.idle_timeout) {
            (Some(IdleCheck::Scan), Some(timeout)) => (self.connections.iter())
                .map(|(_, entry)| entry.last_progress + timeout)
                .min()
                .map(|deadline| deadline.saturating_duration_since(now)),
            _ => None,
        };
        self.clock.timeout_from(now).into_iter().chain(scan).min()
    }

    /// Runs the clocks after a wait: closes connections idle past `--idle-timeout`, ends an
    /// accept pause, and after the drain deadline cuts every connection still open.
    pub fn expire(&mut self) {
        if !self.is_timed() {
            return;
        }
        self.clock.tick();
        let now = self.clock.now();
        while let Some(listener) = self.clock.resume_next() {
            self.changed.push(listener);
        }
        let mut due = self.clock.expired(&mut self.connections);
        let idle_timeout = self.config.limits.idle_timeout;
        if let (Some(IdleCheck::Scan), Some(timeout)) = (self.idle, idle_timeout) {
            if !self.clock.is_past_drain() {
                let idle = (self.connections.iter())
                    .filter(|(_, e)| now >= e.last_progress + timeout)
                    .map(|(token, _)| (token, CloseReason::Idle(timeout)));
                due.extend(idle);
            }
        }
        for (token, reason) in due {
            if matches!(reason, CloseReason::Idle(_)) && self.is_taking_replies(token) {
                continue;
            }
            self.close(token, reason);
        }
    }

    /// Whether a connection due to close idle is still taking its replies: the kernel
    /// takes some of what it owes now. A send buffer the peer drains slowly may not turn
    /// writable for longer than the timeout (a Unix socket signals it only once three
    /// quarters are free), so one write is tried before the close. Then the idle clock
    /// starts again from now.
    #[cold]
    fn is_taking_replies(&mut self, token: Token) -> bool {
        let Some(entry) = self.connections.get_mut(token) else {
            return false;
        };
        if !entry.connection.wants_write() {
            return false;
        }
        match entry.connection.flush_progress(&entry.stream, &self.log) {
            Ok(true) => {}
            // Closed idle all the same: the write error, if any, comes again at the close.
            Ok(false) | Err(_) => return false,
        }
        entry.last_progress = self.clock.now();
        self.clock.watch(token);
        if interest_of(&entry.connection) != entry.watched {
            self.changed.push(token);
        }
        true
    }

    /// Acts on a source the model found ready.
    ///
    /// # Errors
    ///
    /// A listener or datagram socket that broke; a connection's error only closes it.
    #[inline]
    pub fn handle(&mut self, token: Token, ready: Interest) -> io::Result<()> {
        match token.reserved_index() {
            None => {
                self.serve(token, ready);
                Ok(())
            }
            Some(n) => self.handle_own(n),
        }
    }

    /// As [`ReadinessCore::handle`], for a mechanism that reports a connection only when
    /// something new arrives (epoll's `EPOLLET`), not while input stays queued:
    /// `is_read_closed` says the peer's EOF (or an error) has arrived, `has_urgent` that
    /// urgent data is queued. A connection whose read may have left input is kept and
    /// served again next turn ([`ReadinessCore::serve_again`]) instead of waiting for a
    /// report that would never come; one already kept is served then, not twice in a
    /// turn. After an EOF or urgent data, a short read no longer proves the queue empty
    /// (the EOF is still to be read; a read stops at the urgent mark, tcp(7)), so such a
    /// connection is kept until a read finds nothing. The loop's own sockets are handled
    /// as by `handle` (the mechanism keeps them level-triggered).
    ///
    /// # Errors
    ///
    /// As [`ReadinessCore::handle`].
    #[inline]
    pub fn handle_edge(
        &mut self,
        token: Token,
        ready: Interest,
        is_read_closed: bool,
        has_urgent: bool,
    ) -> io::Result<()> {
        if token.reserved_index().is_some() {
            return self.handle(token, ready);
        }
        self.serve_edge(token, ready, is_read_closed || has_urgent);
        Ok(())
    }

    /// Serves `token` once, and keeps it for the next turn if its read may have left input
    /// (or, `until_empty`, if the read found anything at all); one already kept is only
    /// marked, with `until_empty` added, and served next turn.
    #[inline]
    fn serve_edge(&mut self, token: Token, ready: Interest, until_empty: bool) {
        let served = self.serve_unless_kept(token, ready, Some(until_empty));
        if served.may_hold_more || (until_empty && served.has_arrived) {
            self.serve_again_later(token, until_empty);
        }
    }

    /// Serves once more, as if found readable, every connection
    /// [`ReadinessCore::handle_edge`] kept in the turns before; those that may still hold
    /// input are kept for the next. Called once a turn, before the turn's events.
    #[inline]
    pub fn serve_again(&mut self) {
        if !self.again.is_empty() {
            self.serve_again_now();
        }
    }

    fn serve_again_now(&mut self) {
        let mut again = std::mem::take(&mut self.again);
        for token in again.drain(..) {
            let Some(until_empty) = (self.connections.get_mut(token)).and_then(|e| e.again.take())
            else {
                continue;
            };
            self.serve_edge(token, Interest::READABLE, until_empty);
        }
        if self.again.is_empty() {
            // Keeps the allocation for the next turn.
            self.again = again;
        }
    }

    /// Keeps `token` for [`ReadinessCore::serve_again`] if it is still open and reading:
    /// one that stopped reading is watched for input again when it resumes, and the
    /// mechanism then reports whatever is queued. `until_empty`: keep it until a read
    /// finds nothing, not only until a read is short.
    #[cold]
    fn serve_again_later(&mut self, token: Token, until_empty: bool) {
        let Some(entry) = self.connections.get_mut(token) else {
            return;
        };
        if entry.again.is_none() && entry.connection.wants_read() {
            entry.again = Some(until_empty);
            self.again.push(token);
        }
    }

    /// Acts on one of the loop's own sockets found ready: reserved token `n`.
    fn handle_own(&mut self, n: usize) -> io::Result<()> {
        let streams = self.listeners.len();
        match n {
            // Asked, not assumed: busy polling tries every source, the eventfd included.
            SHUTDOWN if self.config.shutdown.is_fired() => self.begin_drain(),
            SHUTDOWN => {}
            // Listeners and datagram sockets are no longer watched once draining; this
            // readiness came in the same turn as the shutdown.
            _ if self.is_draining() => {}
            n if n <= streams => self.accept_ready(n - 1)?,
            n => {
                let index = n - 1 - streams;
                let socket = &self.datagrams[index];
                let buf = self.buf.first_mut(self.datagram_max[index]);
                self.repliers[index].answer_queued(socket, buf, BATCH, &self.log)?;
            }
        }
        Ok(())
    }

    /// Shutdown fired: accept nothing more, read nothing more, send what is owed until the
    /// drain timeout.
    pub fn begin_drain(&mut self) {
        if self.is_draining() {
            return;
        }
        self.clock.tick();
        self.clock.start_drain(self.config.limits.drain_timeout);
        self.changed.extend((0..self.watched.len()).map(reserved));
        for token in self.connections.tokens() {
            if let Some(entry) = self.connections.get_mut(token) {
                entry.connection.stop_reading();
            }
            // One that owes nothing is done now; it would never be ready again.
            self.serve(token, Interest::WRITABLE);
        }
        self.close_unwatched_listeners();
    }

    /// While draining, closes every listener the mechanism no longer watches: all of them
    /// at once for a mechanism that keeps no interest in the kernel (poll, select, busy
    /// polling never call [`ReadinessCore::sync`]), and for epoll once `sync` removed them.
    fn close_unwatched_listeners(&mut self) {
        if !self.is_draining() {
            return;
        }
        for (n, listener) in self.listeners.iter_mut().enumerate() {
            if self.watched[n + 1] == Interest::NONE {
                *listener = None;
            }
        }
    }

    /// Whether shutdown fired and every connection is closed: `run` may return.
    pub fn is_finished(&self) -> bool {
        self.is_draining() && self.connections.is_empty()
    }

    /// Whether listeners are watched now: not during an accept pause or the drain.
    pub fn is_accepting(&self) -> bool {
        !self.clock.is_pausing() && !self.is_draining()
    }

    fn is_draining(&self) -> bool {
        self.clock.drain_deadline().is_some()
    }

    /// Whether a timer runs: without one, the loop never reads the clock.
    fn is_timed(&self) -> bool {
        self.idle.is_some() || self.clock.is_timing()
    }

    /// What a source should be watched for now.
    fn wanted(&self, token: Token) -> Interest {
        match token.reserved_index() {
            Some(_) if self.is_draining() => Interest::NONE,
            Some(n) if n > SHUTDOWN && n <= self.listeners.len() && !self.is_accepting() => {
                Interest::NONE
            }
            Some(_) => Interest::READABLE,
            None => self
                .connections
                .get(token)
                .map_or(Interest::NONE, |entry| interest_of(&entry.connection)),
        }
    }

    /// Accepts up to [`BATCH`] connections queued on listener `n`.
    fn accept_ready(&mut self, n: usize) -> io::Result<()> {
        if !self.is_accepting() {
            return Ok(());
        }
        for _ in 0..BATCH {
            // Closed only while draining, when nothing is accepted.
            let Some(listener) = &self.listeners[n] else {
                return Ok(());
            };
            match accept_and_admit(listener, &self.config.counter, &self.log)? {
                Accepted::Connection(stream, peer, admission) => {
                    self.admit(stream, peer, admission);
                }
                Accepted::Again => {}
                Accepted::Empty => return Ok(()),
                Accepted::Paused => {
                    // The listener stays readable while descriptors are short: stop
                    // watching it for a while, or the loop would spin.
                    // Out of descriptors is the process's state, not this listener's.
                    self.clock.tick();
                    for listener in (1..=self.listeners.len()).map(reserved) {
                        self.clock.pause(listener);
                        self.changed.push(listener);
                    }
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Gives an admitted connection a slot, unless its descriptor cannot be watched.
    fn admit(&mut self, stream: Stream, peer: crate::net::Peer, admission: Admission) {
        let fd = stream.as_fd().as_raw_fd();
        if let Some((limit, name)) = self.fd_limit.filter(|(limit, _)| fd >= *limit) {
            let why = format!("fd {fd} >= {name} ({limit}): cannot watch it");
            let reason = CloseReason::CannotWatch(why);
            return close(stream, &peer, reason, &self.log, Linger::Elsewhere(None));
        }
        if let Err(e) = stream.set_nonblocking(true) {
            let reason = CloseReason::CannotWatch(e.to_string());
            return close(stream, &peer, reason, &self.log, Linger::Elsewhere(None));
        }
        let limits = &self.config.limits;
        let connection = Connection::new(&self.config.protocol, peer, limits, stream.as_fd());
        let now = self.clock.now();
        let token = self.connections.insert(Entry {
            stream,
            connection,
            place: admission,
            last_progress: now,
            watched: Interest::NONE,
            again: None,
        });
        self.clock.watch(token);
        // A greeting is owed at once; the mechanism learns to wait for writable.
        self.changed.push(token);
        // Refused at birth (its setup cannot be watched, TLS cannot start): it would never
        // be ready for anything it waits for, so it is closed now.
        if self
            .connections
            .get(token)
            .is_some_and(|e| e.connection.is_finished())
        {
            self.serve(token, Interest::WRITABLE);
        }
    }

    /// One readiness of a connection: one read if it is readable and wants input, then
    /// write what is owed until the kernel's send buffer is full; closes it when finished
    /// or failed. A stale token (closed earlier in the turn) finds nothing.
    ///
    /// Returns what the read did: whether anything arrived, and whether the socket may
    /// still hold input that was reported readable and not read
    /// ([`ReadOutcome::may_hold_more`], or no read made); only an edge-triggered mechanism
    /// needs to know. Nothing, for a connection closed or not found.
    fn serve(&mut self, token: Token, ready: Interest) -> ReadOutcome {
        self.serve_unless_kept(token, ready, None)
    }

    /// As [`ReadinessCore::serve`]; with `edge` (`Some(until_empty)`, from
    /// [`ReadinessCore::serve_edge`]), a connection already kept for the next turn is not
    /// served now but marked, its `until_empty` added: the same slab lookup decides both,
    /// one per message.
    #[inline(always)]
    fn serve_unless_kept(
        &mut self,
        token: Token,
        ready: Interest,
        edge: Option<bool>,
    ) -> ReadOutcome {
        const CLOSED: ReadOutcome = ReadOutcome {
            has_arrived: false,
            may_hold_more: false,
        };
        let Some(entry) = self.connections.get_mut(token) else {
            return CLOSED;
        };
        if let (Some(until_empty), Some(was_until_empty)) = (edge, entry.again) {
            entry.again = Some(was_until_empty || until_empty);
            // Served next turn; nothing to keep now.
            return CLOSED;
        }
        let connection = &mut entry.connection;
        let is_through = connection.may_write_through();
        if !is_through {
            connection.lend_spare(&mut self.spare);
        }
        let mut served = Ok(());
        let mut outcome = ReadOutcome {
            has_arrived: false,
            may_hold_more: ready.readable,
        };
        // Whether it wants input is read_some's first question: with no room it reads
        // nothing and says the socket may still hold input, as for one found readable.
        if ready.readable {
            let buf = self.buf.first_mut(READ_BUFFER_BYTES);
            let read = match is_through {
                true => connection.read_through(&entry.stream, buf, &self.log),
                false => {
                    (connection.read_some(&entry.stream, buf, &self.log)).map(|read| (read, false))
                }
            };
            match read {
                Ok((read, is_unchanged)) => {
                    // Written only when timed: the field sits on a cold cache line.
                    if read.has_arrived && self.idle.is_some() {
                        entry.last_progress = self.clock.now();
                    }
                    // Nearly every message of a busy echo server: nothing was owed, and
                    // every byte read went straight back out (or nothing came). The
                    // connection is as it was, still reading and owing nothing, so nothing
                    // is left to write or give back, and its interest and its finishing
                    // are unchanged: none of the questions below needs asking.
                    if is_unchanged {
                        return read;
                    }
                    outcome = read;
                }
                Err(reason) => served = Err(reason),
            }
        }
        // Replies to what was just read go out now, without waiting for another turn.
        if served.is_ok() && self.idle.is_some() {
            // A peer still taking its replies is not idle, however slowly it takes them.
            match connection.flush_progress(&entry.stream, &self.log) {
                Ok(true) => entry.last_progress = self.clock.now(),
                Ok(false) => {}
                Err(reason) => served = Err(reason),
            }
        } else if served.is_ok() {
            served = connection.flush_to(&entry.stream, &self.log);
        }
        connection.return_spare(&mut self.spare);
        match served {
            Err(reason) => {
                self.close(token, reason);
                return CLOSED;
            }
            Ok(()) if entry.connection.is_finished() => {
                let reason =
                    (entry.connection).finish_reason(self.clock.drain_deadline().is_some());
                self.close(token, reason);
                return CLOSED;
            }
            Ok(()) if interest_of(&entry.connection) != entry.watched => self.changed.push(token),
            Ok(()) => {}
        }
        outcome
    }

    // Cold: once per connection, so it stays out of `serve`'s per-message path.
    #[cold]
    fn close(&mut self, token: Token, reason: CloseReason) {
        let Some(mut entry) = self.connections.remove(token) else {
            return;
        };
        let ending = reason.ending();
        if ending == Ending::Lingering && !entry.connection.is_finished() {
            // An idle timeout or a drain cut: with TLS, close_notify goes out first.
            entry.connection.close_first(&entry.stream, &self.log);
        }
        if ending == Ending::Lingering && entry.watched != Interest::NONE {
            let transport = stream_transport(&entry.stream);
            self.log.closed(entry.connection.peer(), transport, &reason);
            (self.unwatching).push((token, entry.stream, entry.watched, entry.place));
            return;
        }
        let (peer, linger) = (
            entry.connection.peer(),
            Linger::Elsewhere(Some(entry.place)),
        );
        close(entry.stream, peer, reason, &self.log, linger);
    }
}

impl Drop for ReadinessCore {
    /// A loop that ends (its mechanism with it) still gives the connections it ended
    /// first their lingering close.
    fn drop(&mut self) {
        for (_, stream, _, place) in self.unwatching.drain(..) {
            end(stream, Ending::Lingering, Linger::Elsewhere(Some(place)));
        }
    }
}

/// The interest of a connection: input while it reads and has room, output while bytes
/// are owed.
#[inline]
fn interest_of(connection: &Connection) -> Interest {
    Interest {
        readable: connection.wants_read(),
        writable: connection.wants_write(),
    }
}

fn reserved(n: usize) -> Token {
    Token::reserved(u32::try_from(n).expect("fewer than 2^32 listeners"))
}
