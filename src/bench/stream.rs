//! A stream connection (TCP, Unix stream) under the bench's loop.
//!
//! Each connection is two cursors over its byte stream: how far we have handed bytes to
//! the kernel, and how far the echo has come back. Message content is recomputed from
//! (connection, message, offset) on both sides, so a connection holds only the send times
//! of its in-flight messages, whatever the depth or message size.

use super::Plan;
use super::engine::{Conn, ConnId, Flow, Io, Opened};
use super::transport::Stream;
use std::io;
use std::net::IpAddr;
use std::os::fd::BorrowedFd;

/// Bytes read per `read` call; also the most generated per `write` call.
const IO_CHUNK_BYTES: usize = 256 * 1024;

/// One client connection: its socket and its two stream cursors.
pub(super) struct StreamConn {
    id: ConnId,
    stream: Stream,
    /// Whether the last write stopped at `WouldBlock` (EPOLLOUT wanted).
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

impl StreamConn {
    fn new(plan: &Plan, id: ConnId, stream: Stream) -> Self {
        StreamConn {
            id,
            stream,
            wants_write: false,
            queued: 0,
            sent_message: 0,
            sent_offset: 0,
            received_message: 0,
            received_offset: 0,
            send_ns: vec![0; plan.config.window() as usize].into_boxed_slice(),
        }
    }

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

    fn open_flow(&self) -> Flow {
        Flow::Open {
            wants_write: self.wants_write,
        }
    }

    /// The connection failed with an OS error: count it and describe it.
    fn fail(&self, io: &mut Io<'_>, what: &str, error: &io::Error) -> Flow {
        io.tally.errors.reset += 1;
        let slot = self.id.slot;
        io.tally
            .note(format!("connection {slot}: {what} failed: {error}"));
        Flow::Closed
    }

    /// Hands the kernel as many queued bytes as it takes.
    fn flush(&mut self, io: &mut Io<'_>) -> Flow {
        let plan = io.plan;
        let content = &plan.content;
        let size = content.size();
        while self.has_unsent() {
            // Regenerate the unsent bytes; nothing sent is kept.
            let buf = &mut io.write_buf;
            let mut len = 0;
            let (mut message, mut offset) = (self.sent_message, self.sent_offset);
            while len < buf.len() && message < self.queued {
                let take = (size - offset).min(buf.len() - len);
                content.fill(self.id.content, message, offset, &mut buf[len..len + take]);
                len += take;
                offset += take;
                if offset == size {
                    message += 1;
                    offset = 0;
                }
            }
            match self.stream.write(&io.write_buf[..len]) {
                Ok(0) => {
                    let error = io::Error::from(io::ErrorKind::WriteZero);
                    return self.fail(io, "write", &error);
                }
                Ok(written) => {
                    // The kernel may take fewer bytes than offered; the rest waits.
                    let position = self.sent_offset + written;
                    self.sent_message += (position / size) as u64;
                    self.sent_offset = position % size;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wants_write = true;
                    return self.open_flow();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.fail(io, "write", &e),
            }
        }
        self.wants_write = false;
        self.open_flow()
    }
}

impl Conn for StreamConn {
    const READ_BUF_BYTES: usize = IO_CHUNK_BYTES;
    const WRITE_BUF_BYTES: usize = IO_CHUNK_BYTES;
    const EXPIRES: bool = false;

    fn open(plan: &Plan, id: ConnId, source: Option<IpAddr>) -> io::Result<Opened<Self>> {
        Ok(match Stream::open(&plan.endpoint, source)? {
            Opened::Established(stream) => Opened::Established(StreamConn::new(plan, id, stream)),
            Opened::Connecting(stream) => Opened::Connecting(StreamConn::new(plan, id, stream)),
            Opened::Busy => Opened::Busy,
        })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.stream.fd()
    }

    fn connect_state(&self) -> io::Result<bool> {
        self.stream.connect_state()
    }

    fn start(&mut self, io: &mut Io<'_>, now: u64) -> Flow {
        if io.plan.config.rate.is_some() {
            return self.send_due(io, now).0;
        }
        for _ in 0..io.plan.config.depth {
            if io.may_send(now, self.queued) {
                self.queue(now);
            }
        }
        self.flush(io)
    }

    /// Open loop: queues every message whose scheduled time has come (within the window
    /// bound) and returns when the next one is due.
    fn send_due(&mut self, io: &mut Io<'_>, now: u64) -> (Flow, u64) {
        let before = self.queued;
        let mut next_due = u64::MAX;
        let timeline = io.timeline;
        while let Some(due) =
            io.plan
                .scheduled_ns(&timeline, self.id.slot, self.id.schedule_base + self.queued)
        {
            if due > now || !io.may_send(due, self.queued) {
                if io.may_send(due, self.queued) {
                    next_due = due;
                }
                break;
            }
            if self.in_flight() >= self.send_ns.len() as u64 {
                // Full: this send waits for a reply; its latency still counts from `due`.
                break;
            }
            self.queue(due);
        }
        if self.queued != before && !self.wants_write {
            return (self.flush(io), next_due);
        }
        (self.open_flow(), next_due)
    }

    fn on_writable(&mut self, io: &mut Io<'_>, _now: u64) -> Flow {
        self.flush(io)
    }

    /// Reads once, checks every byte against what was sent at that stream position, and
    /// (closed loop) replaces each completed message with a new one.
    fn on_readable(&mut self, io: &mut Io<'_>, _now: u64) -> Flow {
        let size = io.plan.content.size();
        let slot = self.id.slot;
        let n = match self.stream.read(&mut io.read_buf) {
            Ok(0) => {
                let now = io.plan.now_ns();
                if self.in_flight() == 0 && !io.may_send(now, self.queued) {
                    // Finished: everything owed came back before the server closed.
                    return Flow::Closed;
                }
                io.tally.errors.closed_early += 1;
                io.tally.note(format!(
                    "connection {slot}: server closed the connection with {} message(s) \
                     unanswered (next expected: byte {} of message {})",
                    self.in_flight(),
                    self.received_offset,
                    self.received_message
                ));
                return Flow::Closed;
            }
            Ok(n) => n,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                return self.open_flow();
            }
            Err(e) => return self.fail(io, "read", &e),
        };
        // The time the bytes arrived: after the read, so the read's own cost counts.
        let now = io.plan.now_ns();
        let is_closed_loop = io.plan.config.rate.is_none();
        let mut at = 0;
        while at < n {
            // An echo cannot return a byte before it was sent: only sent bytes are expected.
            let sent_ahead = if self.received_message < self.sent_message {
                size - self.received_offset
            } else {
                self.sent_offset.saturating_sub(self.received_offset)
            };
            if sent_ahead == 0 {
                io.tally.mismatches += 1;
                io.tally.note(format!(
                    "connection {slot}: {} byte(s) came back that were never sent \
                     (after byte {} of message {})",
                    n - at,
                    self.received_offset,
                    self.received_message
                ));
                return Flow::Closed;
            }
            let take = sent_ahead.min(n - at);
            let got = &io.read_buf[at..at + take];
            let (message, offset) = (self.received_message, self.received_offset);
            if let Some((wrong, expected)) =
                io.plan.content.check(self.id.content, message, offset, got)
            {
                let was = got[wrong];
                io.tally.mismatches += 1;
                io.tally.note(format!(
                    "connection {slot}: byte {} of message {message} was {was:#04x}, expected \
                     {expected:#04x}",
                    offset + wrong,
                ));
                return Flow::Closed;
            }
            at += take;
            self.received_offset += take;
            if self.received_offset == size {
                let index = (message % self.send_ns.len() as u64) as usize;
                io.complete(now, now.saturating_sub(self.send_ns[index]));
                self.received_message += 1;
                self.received_offset = 0;
                if is_closed_loop && io.may_send(now, self.queued) {
                    self.queue(now);
                }
            }
        }
        if self.has_unsent() && !self.wants_write {
            return self.flush(io);
        }
        self.open_flow()
    }

    fn expire(&mut self, _io: &mut Io<'_>, _now: u64) -> Flow {
        self.open_flow()
    }

    fn is_idle(&self) -> bool {
        self.in_flight() == 0
    }

    fn messages(&self) -> u64 {
        self.queued
    }

    fn is_spent(&self, lifetime: u64) -> bool {
        self.received_message >= lifetime
    }

    /// After the drain: every message still owed is an error.
    fn finish(&mut self, io: &mut Io<'_>) {
        let owed = self.in_flight();
        if owed == 0 {
            return;
        }
        let drain = io.plan.config.drain_timeout.as_secs_f64();
        io.tally.errors.missing += owed;
        io.tally.note(format!(
            "connection {}: {owed} message(s) still unanswered {drain} s after the window \
             (next expected: byte {} of message {})",
            self.id.slot, self.received_offset, self.received_message
        ));
    }
}
