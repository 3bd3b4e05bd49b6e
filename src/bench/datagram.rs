//! The datagram client loop (UDP, Unix datagram): one level-triggered epoll per thread.
//!
//! Each "connection" is a connected socket of its own (a Unix datagram one is bound to a
//! temporary path, or the server could not answer it; the path is removed afterwards).
//! Datagrams carry their sequence number, so replies may come in any order. A connection
//! keeps a sliding window of message slots: a message unanswered for
//! [`DATAGRAM_LOSS_TIMEOUT`] is counted lost and its slot freed; a reply arriving after
//! that is counted late. Loss is not an error: wrong, duplicated or never-sent datagrams are.

use super::content::Content;
use super::{
    AlignedBuf, DATAGRAM_LOSS_TIMEOUT, MAX_DATAGRAM_BYTES, PUBLISH_EVERY_NS, Plan, Tally, Timeline,
};
use super::{index_of, index_u32};
use crate::addr::Endpoint;
use crate::slab::Token;
use crate::sys::epoll::{EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, Epoll, Events};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

/// How often in-flight datagrams are checked against the loss timeout.
const LOSS_SCAN_EVERY_NS: u64 = 10_000_000;

enum Socket {
    Udp(UdpSocket),
    /// The path is held only to be removed when the socket goes.
    Unix {
        socket: UnixDatagram,
        _path: BoundPath,
    },
}

impl Socket {
    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Udp(s) => s.send(buf),
            Socket::Unix { socket: s, .. } => s.send(buf),
        }
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Udp(s) => s.recv(buf),
            Socket::Unix { socket: s, .. } => s.recv(buf),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Udp(s) => s.as_fd(),
            Socket::Unix { socket: s, .. } => s.as_fd(),
        }
    }
}

/// The path a Unix datagram client socket is bound to; removed when dropped.
struct BoundPath(PathBuf);

impl BoundPath {
    fn new(id: u32) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "reverb-bench-{}-{id}-{}.sock",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        BoundPath(std::env::temp_dir().join(name))
    }
}

impl Drop for BoundPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn open(endpoint: &Endpoint, id: u32) -> io::Result<Socket> {
    let socket = match endpoint {
        Endpoint::Udp(addr) => {
            let local: SocketAddr = if addr.is_ipv6() {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            };
            let socket = UdpSocket::bind(local)?;
            socket.connect(addr)?;
            socket.set_nonblocking(true)?;
            Socket::Udp(socket)
        }
        Endpoint::UnixDatagram(path) => {
            let own = BoundPath::new(id);
            let socket = UnixDatagram::bind(&own.0)?;
            socket.connect(path)?;
            socket.set_nonblocking(true)?;
            Socket::Unix { socket, _path: own }
        }
        Endpoint::Tcp(_) | Endpoint::Unix(_) | Endpoint::Tls { .. } => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a datagram endpoint",
            ));
        }
    };
    Ok(socket)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Outstanding,
    Answered,
    Lost,
}

/// One message of the window.
#[derive(Clone, Copy)]
struct Slot {
    message: u64,
    state: SlotState,
    /// When it was actually sent (for the loss timeout).
    sent_ns: u64,
    /// Where its latency counts from: the send, or (open loop) its scheduled time.
    latency_from_ns: u64,
}

struct Connection {
    id: u32,
    socket: Option<Socket>,
    wants_write: bool,
    /// The next message number to send.
    next: u64,
    /// The oldest message not yet answered or lost; the window is `oldest..next`.
    oldest: u64,
    /// At most this many messages span the window.
    window: u64,
    /// Message `m` lives at `m % len`; there are twice `window` slots, so an answered
    /// message stays recognisable (a duplicate of it is caught) for a window's worth of
    /// further sends.
    slots: Box<[Slot]>,
}

impl Connection {
    fn slot(&mut self, message: u64) -> &mut Slot {
        let len = self.slots.len() as u64;
        &mut self.slots[(message % len) as usize]
    }

    fn has_room(&self) -> bool {
        self.next - self.oldest < self.window
    }

    /// Moves `oldest` past answered and lost messages.
    fn slide(&mut self) {
        while self.oldest < self.next && self.slot(self.oldest).state != SlotState::Outstanding {
            self.oldest += 1;
        }
    }

    fn in_flight(&self) -> bool {
        self.oldest < self.next
    }
}

struct Worker<'a> {
    plan: &'a Plan,
    content: &'a Content,
    epoll: Epoll,
    connections: Vec<Connection>,
    tally: Tally,
    buf: AlignedBuf,
    unpublished: u64,
    /// Lost messages since the start; those answered late are subtracted at the end.
    declared_lost: u64,
}

/// Opens a socket per id, waits at the start gate, runs the load, returns the counts.
pub(super) fn run_worker(plan: &Plan, ids: &[u32]) -> io::Result<Tally> {
    let (epoll, tally) = plan.prepare_worker()?;
    let window = plan.config.window() as usize;
    let mut worker = Worker {
        plan,
        content: &plan.content,
        epoll,
        connections: Vec::with_capacity(ids.len()),
        tally,
        buf: AlignedBuf::new(MAX_DATAGRAM_BYTES + 1),
        unpublished: 0,
        declared_lost: 0,
    };
    for &id in ids {
        let token = Token::reserved(index_u32(worker.connections.len()));
        let opened = open(&plan.endpoint, id).and_then(|socket| {
            worker.epoll.add(socket.fd(), token, EPOLLIN as u32)?;
            Ok(socket)
        });
        match opened {
            Ok(socket) => {
                worker.tally.established += 1;
                let free = Slot {
                    message: u64::MAX,
                    state: SlotState::Answered,
                    sent_ns: 0,
                    latency_from_ns: 0,
                };
                worker.connections.push(Connection {
                    id,
                    socket: Some(socket),
                    wants_write: false,
                    next: 0,
                    oldest: 0,
                    window: window as u64,
                    slots: vec![free; 2 * window].into_boxed_slice(),
                });
            }
            Err(e) => {
                worker.tally.errors.connect_failed += 1;
                let endpoint = &plan.endpoint;
                worker.tally.note(format!(
                    "connection {id}: cannot connect to {endpoint}: {e}"
                ));
            }
        }
    }
    let Some(start) = plan.gate.arrive_and_wait() else {
        return Ok(worker.tally);
    };
    let timeline = plan.timeline(start);
    worker.run(&timeline)?;
    worker.tally.lost = worker.declared_lost.saturating_sub(worker.tally.late);
    Ok(worker.tally)
}

impl Worker<'_> {
    fn run(&mut self, timeline: &Timeline) -> io::Result<()> {
        let is_open_loop = self.plan.config.rate.is_some();
        let mut events = Events::with_capacity(1024);
        // The first iteration checks for live connections.
        let mut last_publish = timeline.start.saturating_sub(PUBLISH_EVERY_NS);
        let mut last_scan = timeline.start;
        loop {
            let now = self.plan.now_ns();
            if now - last_scan >= LOSS_SCAN_EVERY_NS {
                self.declare_lost(now);
                last_scan = now;
            }
            let mut next_due = u64::MAX;
            if timeline.is_sending(now) {
                for index in 0..self.connections.len() {
                    if !self.connections[index].wants_write {
                        let due = self.send_ready(index, timeline, now);
                        next_due = next_due.min(due);
                    }
                }
            }
            if now - last_publish >= PUBLISH_EVERY_NS {
                self.publish();
                last_publish = now;
                // Every connection failed or closed: nothing is left to wait for.
                if self.connections.iter().all(|c| c.socket.is_none()) {
                    break;
                }
            }
            if !timeline.is_sending(now) {
                let is_done = self
                    .connections
                    .iter()
                    .all(|c| c.socket.is_none() || !c.in_flight());
                if is_done || now >= timeline.drain_until {
                    break;
                }
            }
            if !is_open_loop {
                next_due = u64::MAX;
            }
            let next_scan = last_scan + LOSS_SCAN_EVERY_NS;
            let timeout = timeline.wait_timeout(now, next_due.min(next_scan));
            self.epoll.wait_precise(&mut events, Some(timeout))?;
            for (token, flags) in events.iter() {
                let index = index_of(token);
                if flags & EPOLLOUT as u32 != 0 {
                    self.set_interest(index, false);
                    let now = self.plan.now_ns();
                    if timeline.is_sending(now) {
                        self.send_ready(index, timeline, now);
                    }
                }
                if flags & (EPOLLIN | EPOLLERR | EPOLLHUP) as u32 != 0 {
                    self.on_readable(index, timeline);
                }
            }
        }
        self.publish();
        // Whatever is still unanswered now is lost.
        let now = u64::MAX;
        self.declare_lost(now);
        Ok(())
    }

    /// Sends what may be sent now: closed loop, until `depth` are in flight; open loop,
    /// every message whose time has come. Returns when the next open-loop send is due.
    fn send_ready(&mut self, index: usize, timeline: &Timeline, now: u64) -> u64 {
        let depth = u64::from(self.plan.config.depth);
        loop {
            let connection = &mut self.connections[index];
            let Some(socket) = &connection.socket else {
                return u64::MAX;
            };
            let latency_from_ns =
                match self
                    .plan
                    .scheduled_ns(timeline, connection.id, connection.next)
                {
                    Some(due) if due > now || !timeline.is_sending(due) => {
                        return if timeline.is_sending(due) {
                            due
                        } else {
                            u64::MAX
                        };
                    }
                    Some(due) => due,
                    None if connection.next - connection.oldest >= depth => return u64::MAX,
                    None => now,
                };
            if !connection.has_room() {
                // Open loop, window full: this send waits; its latency counts from `due`.
                return u64::MAX;
            }
            let size = self.content.size();
            let message = connection.next;
            self.content
                .fill_datagram(connection.id, message, &mut self.buf[..size]);
            match socket.send(&self.buf[..size]) {
                Ok(_) => {
                    *connection.slot(message) = Slot {
                        message,
                        state: SlotState::Outstanding,
                        sent_ns: now,
                        latency_from_ns,
                    };
                    connection.next += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.set_interest(index, true);
                    return u64::MAX;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.fail(index, "send", &e);
                    return u64::MAX;
                }
            }
        }
    }

    fn on_readable(&mut self, index: usize, timeline: &Timeline) {
        let Some(socket) = &self.connections[index].socket else {
            return;
        };
        let n = match socket.recv(&mut self.buf) {
            Ok(n) => n,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                return;
            }
            Err(e) => return self.fail(index, "receive", &e),
        };
        let now = self.plan.now_ns();
        let connection = &mut self.connections[index];
        let id = connection.id;
        let datagram = &self.buf[..n];
        let Some(message) = Content::datagram_number(id, datagram).filter(|m| *m < connection.next)
        else {
            self.tally.mismatches += 1;
            self.tally.note(format!(
                "connection {id}: a {n}-byte datagram that answers no message sent"
            ));
            return;
        };
        if !self.content.datagram_matches(id, message, datagram) {
            self.tally.mismatches += 1;
            let size = self.content.size();
            self.tally.note(format!(
                "connection {id}: the reply to datagram {message} is wrong ({n} bytes, \
                 {size} sent)"
            ));
            // Its slot stays outstanding: a correct reply may still come, or it is lost.
            return;
        }
        let slot = *connection.slot(message);
        if slot.message != message {
            // Older than the window: it was counted lost long ago.
            self.tally.late += 1;
            return;
        }
        match slot.state {
            SlotState::Outstanding => {
                connection.slot(message).state = SlotState::Answered;
                connection.slide();
                let rtt_ns = now.saturating_sub(slot.latency_from_ns);
                self.tally.complete(timeline, now, rtt_ns);
                self.unpublished += 1;
                if timeline.is_sending(now) && !connection.wants_write {
                    self.send_ready(index, timeline, now);
                }
            }
            SlotState::Lost => {
                connection.slot(message).state = SlotState::Answered;
                self.tally.late += 1;
            }
            SlotState::Answered => {
                self.tally.mismatches += 1;
                self.tally.note(format!(
                    "connection {id}: datagram {message} came back twice"
                ));
            }
        }
    }

    /// Counts messages unanswered for the loss timeout as lost and frees their slots.
    fn declare_lost(&mut self, now: u64) {
        let timeout_ns = DATAGRAM_LOSS_TIMEOUT.as_nanos() as u64;
        for connection in &mut self.connections {
            for message in connection.oldest..connection.next {
                let slot = connection.slot(message);
                if slot.state == SlotState::Outstanding
                    && slot.sent_ns.saturating_add(timeout_ns) <= now
                {
                    slot.state = SlotState::Lost;
                    self.declared_lost += 1;
                }
            }
            connection.slide();
        }
    }

    fn publish(&mut self) {
        if self.unpublished > 0 {
            self.plan
                .verified
                .fetch_add(self.unpublished, std::sync::atomic::Ordering::Relaxed);
            self.unpublished = 0;
        }
    }

    fn set_interest(&mut self, index: usize, wants_write: bool) {
        let connection = &mut self.connections[index];
        if connection.wants_write == wants_write {
            return;
        }
        if let Some(socket) = &connection.socket {
            let events = if wants_write {
                EPOLLIN | EPOLLOUT
            } else {
                EPOLLIN
            };
            if self
                .epoll
                .modify(
                    socket.fd(),
                    Token::reserved(index_u32(index)),
                    events as u32,
                )
                .is_ok()
            {
                connection.wants_write = wants_write;
            }
        }
    }

    /// An OS error (e.g. refused: nobody listens): count it, describe it, close the socket.
    /// Its in-flight datagrams are not counted lost; the failure is the error.
    fn fail(&mut self, index: usize, what: &str, error: &io::Error) {
        self.tally.errors.reset += 1;
        let connection = &mut self.connections[index];
        let id = connection.id;
        self.tally
            .note(format!("connection {id}: {what} failed: {error}"));
        if let Some(socket) = connection.socket.take() {
            let _ = self.epoll.delete(socket.fd());
        }
        connection.oldest = connection.next;
    }
}
