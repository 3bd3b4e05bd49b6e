//! A datagram connection (UDP, Unix datagram) under the bench's loop.
//!
//! Each "connection" is a connected socket of its own (a Unix datagram one is bound to a
//! temporary path, removed afterwards). Datagrams carry their sequence number, so replies
//! may come in any order. A connection keeps a sliding window of message slots: a message
//! unanswered for [`DATAGRAM_LOSS_TIMEOUT`] is counted lost and its slot freed; a reply
//! arriving after that is counted late. Loss is not an error: wrong, duplicated or
//! never-sent datagrams are.

use super::content::Content;
use super::engine::{Conn, ConnId, Flow, Io, Opened};
use super::transport::Datagram;
use super::{DATAGRAM_LOSS_TIMEOUT, MAX_DATAGRAM_BYTES, Plan};
use std::io;
use std::net::IpAddr;
use std::os::fd::BorrowedFd;

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

pub(super) struct DatagramConn {
    id: ConnId,
    socket: Datagram,
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

impl DatagramConn {
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

    fn open_flow(&self) -> Flow {
        Flow::Open {
            wants_write: self.wants_write,
        }
    }

    /// Sends what may be sent now: closed loop, until `depth` are in flight; open loop,
    /// every message whose time has come. Returns when the next open-loop send is due.
    fn send_ready(&mut self, io: &mut Io<'_>, now: u64) -> (Flow, u64) {
        let depth = u64::from(io.plan.config.depth);
        let timeline = io.timeline;
        loop {
            if self.wants_write {
                return (self.open_flow(), u64::MAX);
            }
            let scheduled =
                io.plan
                    .scheduled_ns(&timeline, self.id.slot, self.id.schedule_base + self.next);
            let latency_from_ns = match scheduled {
                Some(due) if due > now || !io.may_send(due, self.next) => {
                    let next_due = if io.may_send(due, self.next) {
                        due
                    } else {
                        u64::MAX
                    };
                    return (self.open_flow(), next_due);
                }
                Some(due) => due,
                None if self.next - self.oldest >= depth || !io.may_send(now, self.next) => {
                    return (self.open_flow(), u64::MAX);
                }
                None => now,
            };
            if !self.has_room() {
                // Open loop, window full: this send waits; its latency counts from `due`.
                return (self.open_flow(), u64::MAX);
            }
            let size = io.plan.content.size();
            let message = self.next;
            io.plan
                .content
                .fill_datagram(self.id.content, message, &mut io.write_buf[..size]);
            match self.socket.send(&io.write_buf[..size]) {
                Ok(_) => {
                    *self.slot(message) = Slot {
                        message,
                        state: SlotState::Outstanding,
                        sent_ns: now,
                        latency_from_ns,
                    };
                    self.next += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wants_write = true;
                    return (self.open_flow(), u64::MAX);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (self.fail(io, "send", &e), u64::MAX),
            }
        }
    }

    /// An OS error (e.g. refused: nobody listens): count it and describe it. Its in-flight
    /// datagrams are not counted lost; the failure is the error.
    fn fail(&mut self, io: &mut Io<'_>, what: &str, error: &io::Error) -> Flow {
        io.tally.errors.reset += 1;
        io.tally.note(format!(
            "connection {}: {what} failed: {error}",
            self.id.slot
        ));
        self.oldest = self.next;
        Flow::Closed
    }

    /// Counts messages unanswered since `now - timeout` as lost and frees their slots.
    fn declare_lost(&mut self, io: &mut Io<'_>, now: u64) {
        let timeout_ns = DATAGRAM_LOSS_TIMEOUT.as_nanos() as u64;
        for message in self.oldest..self.next {
            let slot = self.slot(message);
            if slot.state == SlotState::Outstanding
                && slot.sent_ns.saturating_add(timeout_ns) <= now
            {
                slot.state = SlotState::Lost;
                io.tally.lost += 1;
            }
        }
        self.slide();
    }
}

impl Conn for DatagramConn {
    const READ_BUF_BYTES: usize = MAX_DATAGRAM_BYTES + 1;
    const WRITE_BUF_BYTES: usize = MAX_DATAGRAM_BYTES;
    const EXPIRES: bool = true;

    fn open(plan: &Plan, id: ConnId, source: Option<IpAddr>) -> io::Result<Opened<Self>> {
        let socket = Datagram::open(&plan.endpoint, id.content, source)?;
        let window = plan.config.window() as usize;
        let free = Slot {
            message: u64::MAX,
            state: SlotState::Answered,
            sent_ns: 0,
            latency_from_ns: 0,
        };
        Ok(Opened::Established(DatagramConn {
            id,
            socket,
            wants_write: false,
            next: 0,
            oldest: 0,
            window: window as u64,
            slots: vec![free; 2 * window].into_boxed_slice(),
        }))
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.socket.fd()
    }

    fn connect_state(&self) -> io::Result<bool> {
        Ok(true)
    }

    fn start(&mut self, io: &mut Io<'_>, now: u64) -> Flow {
        self.send_ready(io, now).0
    }

    fn send_due(&mut self, io: &mut Io<'_>, now: u64) -> (Flow, u64) {
        self.send_ready(io, now)
    }

    fn on_writable(&mut self, io: &mut Io<'_>, now: u64) -> Flow {
        self.wants_write = false;
        self.send_ready(io, now).0
    }

    fn on_readable(&mut self, io: &mut Io<'_>, _now: u64) -> Flow {
        let n = match self.socket.recv(&mut io.read_buf) {
            Ok(n) => n,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                return self.open_flow();
            }
            Err(e) => return self.fail(io, "receive", &e),
        };
        let now = io.plan.now_ns();
        let slot_number = self.id.slot;
        let datagram = &io.read_buf[..n];
        let Some(message) =
            Content::datagram_number(self.id.content, datagram).filter(|m| *m < self.next)
        else {
            io.tally.mismatches += 1;
            io.tally.note(format!(
                "connection {slot_number}: a {n}-byte datagram that answers no message sent"
            ));
            return self.open_flow();
        };
        if !io
            .plan
            .content
            .datagram_matches(self.id.content, message, datagram)
        {
            io.tally.mismatches += 1;
            let size = io.plan.content.size();
            io.tally.note(format!(
                "connection {slot_number}: the reply to datagram {message} is wrong ({n} bytes, \
                 {size} sent)"
            ));
            // Its slot stays outstanding: a correct reply may still come, or it is lost.
            return self.open_flow();
        }
        let slot = *self.slot(message);
        if slot.message != message {
            // Older than the window: it was counted lost long ago.
            io.tally.late += 1;
            io.tally.lost = io.tally.lost.saturating_sub(1);
            return self.open_flow();
        }
        match slot.state {
            SlotState::Outstanding => {
                self.slot(message).state = SlotState::Answered;
                self.slide();
                io.complete(now, now.saturating_sub(slot.latency_from_ns));
                return self.send_ready(io, now).0;
            }
            SlotState::Lost => {
                self.slot(message).state = SlotState::Answered;
                io.tally.late += 1;
                io.tally.lost = io.tally.lost.saturating_sub(1);
            }
            SlotState::Answered => {
                io.tally.mismatches += 1;
                io.tally.note(format!(
                    "connection {slot_number}: datagram {message} came back twice"
                ));
            }
        }
        self.open_flow()
    }

    fn expire(&mut self, io: &mut Io<'_>, now: u64) -> Flow {
        self.declare_lost(io, now);
        if io.plan.config.rate.is_none() {
            // Closed loop: freed slots are sent again at once.
            return self.send_ready(io, now).0;
        }
        self.open_flow()
    }

    fn is_idle(&self) -> bool {
        self.oldest >= self.next
    }

    fn messages(&self) -> u64 {
        self.next
    }

    fn is_spent(&self, lifetime: u64) -> bool {
        self.next >= lifetime && self.is_idle()
    }

    /// Whatever is still unanswered now is lost.
    fn finish(&mut self, io: &mut Io<'_>) {
        self.declare_lost(io, u64::MAX);
    }
}
