//! The stream client loop (TCP, Unix stream): one level-triggered epoll per thread.
//!
//! Each connection is two cursors over its byte stream: how far we have handed bytes to
//! the kernel, and how far the echo has come back. Message content is recomputed from
//! (connection, message, offset) on both sides, so a connection holds only the send times
//! of its in-flight messages, whatever the depth or message size.

use super::content::Content;
use super::{AlignedBuf, MAX_WAIT, PUBLISH_EVERY_NS, Plan, Tally, Timeline};
use super::{index_of, index_u32};
use crate::addr::Endpoint;
use crate::slab::Token;
use crate::sys::epoll::{EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, Epoll, Events};
use socket2::{Domain, SockAddr, Socket, Type};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Bytes read per `read` call; also the most generated per `write` call.
const IO_CHUNK_BYTES: usize = 256 * 1024;

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }

    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
        }
    }

    fn take_error(&self) -> io::Result<Option<io::Error>> {
        match self {
            Stream::Tcp(s) => s.take_error(),
            Stream::Unix(s) => s.take_error(),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

/// One client connection: its socket and its two stream cursors.
struct Connection {
    id: u32,
    /// `None` once the connection is closed (failed, wrong bytes, or finished).
    stream: Option<Stream>,
    is_connecting: bool,
    /// Whether EPOLLOUT is in the registered interest.
    wants_write: bool,
    /// Messages queued for sending so far.
    queued: u64,
    /// The next byte to hand the kernel: message number and offset in it.
    sent_message: u64,
    sent_offset: usize,
    /// The next byte expected back.
    received_message: u64,
    received_offset: usize,
    /// Send (open loop: scheduled) time of message `m` at `m % len`, for the in-flight ones.
    send_ns: Box<[u64]>,
}

impl Connection {
    fn in_flight(&self) -> u64 {
        self.queued - self.received_message
    }

    fn has_unsent(&self) -> bool {
        self.sent_message < self.queued
    }

    fn queue(&mut self, at_ns: u64) {
        let slot = (self.queued % self.send_ns.len() as u64) as usize;
        self.send_ns[slot] = at_ns;
        self.queued += 1;
    }
}

/// One thread's state: its epoll, its connections, and its scratch buffers.
struct Worker<'a> {
    plan: &'a Plan,
    content: &'a Content,
    epoll: Epoll,
    connections: Vec<Connection>,
    tally: Tally,
    read_buf: AlignedBuf,
    write_buf: AlignedBuf,
    /// Messages verified since the last publish to `plan.verified`.
    unpublished: u64,
}

/// Connects `ids` to the plan's endpoint, waits at the start gate, runs the load, and
/// returns this thread's counts.
pub(super) fn run_worker(plan: &Plan, ids: &[u32]) -> io::Result<Tally> {
    let (epoll, tally) = plan.prepare_worker()?;
    let mut worker = Worker {
        plan,
        content: &plan.content,
        epoll,
        connections: Vec::with_capacity(ids.len()),
        tally,
        read_buf: AlignedBuf::new(IO_CHUNK_BYTES),
        write_buf: AlignedBuf::new(IO_CHUNK_BYTES),
        unpublished: 0,
    };
    worker.connect_all(ids);
    let Some(start) = plan.gate.arrive_and_wait() else {
        return Ok(worker.tally);
    };
    let timeline = plan.timeline(start);
    worker.run(&timeline)?;
    Ok(worker.tally)
}

fn open(endpoint: &Endpoint, deadline: std::time::Instant) -> io::Result<(Stream, bool)> {
    match endpoint {
        Endpoint::Tcp(addr) => {
            let socket = Socket::new(Domain::for_address(*addr), Type::STREAM.nonblocking(), None)?;
            socket.set_tcp_nodelay(true)?;
            let is_connecting = match socket.connect(&SockAddr::from(*addr)) {
                Ok(()) => false,
                Err(e) if e.raw_os_error() == Some(crate::sys::errno::EINPROGRESS) => true,
                Err(e) => return Err(e),
            };
            Ok((Stream::Tcp(socket.into()), is_connecting))
        }
        Endpoint::Unix(path) => {
            let socket = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None)?;
            let addr = SockAddr::unix(path)?;
            // A non-blocking Unix connect never waits: EAGAIN means the listener's backlog
            // is full, so try again until the deadline.
            loop {
                match socket.connect(&addr) {
                    Ok(()) => break,
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok((Stream::Unix(socket.into()), false))
        }
        Endpoint::Tls {
            addr,
            server_name,
            verify,
        } => {
            // The handshake is made here, blocking; the engine then sees a plain stream.
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let tcp =
                std::net::TcpStream::connect_timeout(addr, left.max(Duration::from_millis(1)))?;
            tcp.set_nodelay(true)?;
            let plain = crate::tls_client::connect(tcp, server_name, verify)?;
            plain.set_nonblocking(true)?;
            Ok((Stream::Unix(plain), false))
        }
        Endpoint::Udp(_) | Endpoint::UnixDatagram(_) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a stream endpoint",
        )),
    }
}

impl Worker<'_> {
    fn connect_all(&mut self, ids: &[u32]) {
        let config = &self.plan.config;
        let deadline = std::time::Instant::now() + config.connect_timeout;
        let window = config.window() as usize;
        for &id in ids {
            let opened = open(&self.plan.endpoint, deadline).and_then(|(stream, is_connecting)| {
                let token = Token::reserved(index_u32(self.connections.len()));
                let events = if is_connecting { EPOLLOUT } else { EPOLLIN };
                self.epoll.add(stream.fd(), token, events as u32)?;
                Ok((stream, is_connecting))
            });
            match opened {
                Ok((stream, is_connecting)) => {
                    if !is_connecting {
                        self.tally.established += 1;
                    }
                    self.connections.push(Connection {
                        id,
                        stream: Some(stream),
                        is_connecting,
                        wants_write: is_connecting,
                        queued: 0,
                        sent_message: 0,
                        sent_offset: 0,
                        received_message: 0,
                        received_offset: 0,
                        send_ns: vec![0; window].into_boxed_slice(),
                    });
                }
                Err(e) => self.connect_failed(id, &e),
            }
        }
        let mut events = Events::with_capacity(1024);
        let mut pending = self.connections.iter().filter(|c| c.is_connecting).count();
        while pending > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            if self
                .epoll
                .wait(&mut events, Some(left.min(MAX_WAIT)))
                .is_err()
            {
                break;
            }
            for (token, _) in events.iter() {
                let Some(connection) = self.connections.get_mut(index_of(token)) else {
                    continue;
                };
                if !connection.is_connecting {
                    continue;
                }
                pending -= 1;
                connection.is_connecting = false;
                let error = match &connection.stream {
                    Some(stream) => match stream.take_error() {
                        Ok(None) => None,
                        Ok(Some(e)) | Err(e) => Some(e),
                    },
                    None => None,
                };
                match error {
                    None => {
                        self.tally.established += 1;
                        self.set_interest(index_of(token), false);
                    }
                    Some(e) => {
                        let id = connection.id;
                        self.close(index_of(token));
                        self.connect_failed(id, &e);
                    }
                }
            }
        }
        for index in 0..self.connections.len() {
            if self.connections[index].is_connecting {
                let id = self.connections[index].id;
                self.connections[index].is_connecting = false;
                self.close(index);
                let timeout = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
                self.connect_failed(id, &timeout);
            }
        }
    }

    fn connect_failed(&mut self, id: u32, error: &io::Error) {
        self.tally.errors.connect_failed += 1;
        let endpoint = &self.plan.endpoint;
        self.tally.note(format!(
            "connection {id}: cannot connect to {endpoint}: {error}"
        ));
    }

    fn run(&mut self, timeline: &Timeline) -> io::Result<()> {
        let is_open_loop = self.plan.config.rate.is_some();
        if !is_open_loop {
            for index in 0..self.connections.len() {
                if self.connections[index].stream.is_some() {
                    let now = self.plan.now_ns();
                    for _ in 0..self.plan.config.depth {
                        self.connections[index].queue(now);
                    }
                    self.flush(index);
                }
            }
        }
        let mut events = Events::with_capacity(1024);
        // The first iteration checks for live connections.
        let mut last_publish = timeline.start.saturating_sub(PUBLISH_EVERY_NS);
        loop {
            let now = self.plan.now_ns();
            let mut next_due = u64::MAX;
            if is_open_loop && timeline.is_sending(now) {
                next_due = self.send_due(timeline, now);
            }
            if now - last_publish >= PUBLISH_EVERY_NS {
                self.publish();
                last_publish = now;
                // Every connection failed or closed: nothing is left to wait for.
                if self.connections.iter().all(|c| c.stream.is_none()) {
                    break;
                }
            }
            if !timeline.is_sending(now) {
                let is_done = self
                    .connections
                    .iter()
                    .all(|c| c.stream.is_none() || c.in_flight() == 0);
                if is_done || now >= timeline.drain_until {
                    break;
                }
            }
            let timeout = timeline.wait_timeout(now, next_due);
            self.epoll.wait_precise(&mut events, Some(timeout))?;
            for (token, flags) in events.iter() {
                let index = index_of(token);
                if flags & EPOLLOUT as u32 != 0 {
                    self.flush(index);
                }
                if flags & (EPOLLIN | EPOLLERR | EPOLLHUP) as u32 != 0 {
                    self.on_readable(index, timeline);
                }
            }
        }
        self.publish();
        self.count_missing();
        Ok(())
    }

    /// Open loop: queues every message whose scheduled time has come (within the window
    /// bound) and returns when the next one is due.
    fn send_due(&mut self, timeline: &Timeline, now: u64) -> u64 {
        let mut next_due = u64::MAX;
        for index in 0..self.connections.len() {
            let connection = &mut self.connections[index];
            if connection.stream.is_none() {
                continue;
            }
            let before = connection.queued;
            while let Some(due) = self
                .plan
                .scheduled_ns(timeline, connection.id, connection.queued)
            {
                if due > now || !timeline.is_sending(due) {
                    if timeline.is_sending(due) {
                        next_due = next_due.min(due);
                    }
                    break;
                }
                if connection.in_flight() >= connection.send_ns.len() as u64 {
                    // Full: this send waits for a reply; its latency still counts from `due`.
                    break;
                }
                connection.queue(due);
            }
            if connection.queued != before && !connection.wants_write {
                self.flush(index);
            }
        }
        next_due
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
        if let Some(stream) = &connection.stream {
            let events = if wants_write {
                EPOLLIN | EPOLLOUT
            } else {
                EPOLLIN
            };
            if self
                .epoll
                .modify(
                    stream.fd(),
                    Token::reserved(index_u32(index)),
                    events as u32,
                )
                .is_ok()
            {
                connection.wants_write = wants_write;
            }
        }
    }

    fn close(&mut self, index: usize) {
        if let Some(stream) = self.connections[index].stream.take() {
            let _ = self.epoll.delete(stream.fd());
        }
    }

    /// The connection failed with an OS error: count it, describe it, close it.
    fn fail(&mut self, index: usize, what: &str, error: &io::Error) {
        self.tally.errors.reset += 1;
        let id = self.connections[index].id;
        self.tally
            .note(format!("connection {id}: {what} failed: {error}"));
        self.close(index);
    }

    /// Hands the kernel as many queued bytes as it takes.
    fn flush(&mut self, index: usize) {
        let size = self.content.size();
        let connection = &mut self.connections[index];
        let Some(stream) = &connection.stream else {
            return;
        };
        while connection.has_unsent() {
            // Regenerate the unsent bytes; nothing sent is kept.
            let mut len = 0;
            let (mut message, mut offset) = (connection.sent_message, connection.sent_offset);
            while len < self.write_buf.len() && message < connection.queued {
                let take = (size - offset).min(self.write_buf.len() - len);
                self.content.fill(
                    connection.id,
                    message,
                    offset,
                    &mut self.write_buf[len..len + take],
                );
                len += take;
                offset += take;
                if offset == size {
                    message += 1;
                    offset = 0;
                }
            }
            match stream.write(&self.write_buf[..len]) {
                Ok(0) => {
                    let error = io::Error::from(io::ErrorKind::WriteZero);
                    return self.fail(index, "write", &error);
                }
                Ok(written) => {
                    // The kernel may take fewer bytes than offered; the rest waits.
                    let position = connection.sent_offset + written;
                    connection.sent_message += (position / size) as u64;
                    connection.sent_offset = position % size;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !connection.wants_write {
                        self.set_interest(index, true);
                    }
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.fail(index, "write", &e),
            }
        }
        if connection.wants_write {
            self.set_interest(index, false);
        }
    }

    /// Reads once, checks every byte against what was sent at that stream position, and
    /// (closed loop) replaces each completed message with a new one.
    fn on_readable(&mut self, index: usize, timeline: &Timeline) {
        let size = self.content.size();
        let connection = &mut self.connections[index];
        let Some(stream) = &connection.stream else {
            return;
        };
        let n = match stream.read(&mut self.read_buf) {
            Ok(0) => {
                let now = self.plan.now_ns();
                if connection.in_flight() == 0 && !timeline.is_sending(now) {
                    // Finished: everything owed came back before the server closed.
                    self.close(index);
                    return;
                }
                let (id, owed) = (connection.id, connection.in_flight());
                self.tally.errors.closed_early += 1;
                self.tally.note(format!(
                    "connection {id}: server closed the connection with {owed} message(s) \
                     unanswered (next expected: byte {} of message {})",
                    connection.received_offset, connection.received_message
                ));
                self.close(index);
                return;
            }
            Ok(n) => n,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                return;
            }
            Err(e) => return self.fail(index, "read", &e),
        };
        let now = self.plan.now_ns();
        let is_closed_loop = self.plan.config.rate.is_none();
        let is_sending = timeline.is_sending(now);
        let mut at = 0;
        while at < n {
            // An echo cannot return a byte before it was sent: only sent bytes are expected.
            let sent_ahead = if connection.received_message < connection.sent_message {
                size - connection.received_offset
            } else {
                connection
                    .sent_offset
                    .saturating_sub(connection.received_offset)
            };
            if sent_ahead == 0 {
                let (id, extra) = (connection.id, n - at);
                self.tally.mismatches += 1;
                self.tally.note(format!(
                    "connection {id}: {extra} byte(s) came back that were never sent \
                     (after byte {} of message {})",
                    connection.received_offset, connection.received_message
                ));
                self.close(index);
                return;
            }
            let take = sent_ahead.min(n - at);
            let got = &self.read_buf[at..at + take];
            let (message, offset) = (connection.received_message, connection.received_offset);
            if let Some((wrong, expected)) = self.content.check(connection.id, message, offset, got)
            {
                let id = connection.id;
                self.tally.mismatches += 1;
                self.tally.note(format!(
                    "connection {id}: byte {} of message {message} was {:#04x}, expected {:#04x}",
                    offset + wrong,
                    got[wrong],
                    expected
                ));
                self.close(index);
                return;
            }
            at += take;
            connection.received_offset += take;
            if connection.received_offset == size {
                let slot = (message % connection.send_ns.len() as u64) as usize;
                let rtt_ns = now.saturating_sub(connection.send_ns[slot]);
                self.tally.complete(timeline, now, rtt_ns);
                self.unpublished += 1;
                connection.received_message += 1;
                connection.received_offset = 0;
                if is_closed_loop && is_sending {
                    connection.queue(now);
                }
            }
        }
        if connection.has_unsent() && !connection.wants_write {
            self.flush(index);
        }
    }

    /// After the drain: every message still owed on an open stream is an error.
    fn count_missing(&mut self) {
        for index in 0..self.connections.len() {
            let connection = &self.connections[index];
            if connection.stream.is_none() || connection.in_flight() == 0 {
                continue;
            }
            let (id, owed) = (connection.id, connection.in_flight());
            let drain = self.plan.config.drain_timeout.as_secs_f64();
            self.tally.errors.missing += owed;
            self.tally.note(format!(
                "connection {id}: {owed} message(s) still unanswered {drain} s after the window \
                 (next expected: byte {} of message {})",
                connection.received_offset, connection.received_message
            ));
            self.close(index);
        }
    }
}
